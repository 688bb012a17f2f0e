"""U-Net segmentation map of a 572x572 tile, as in zeta's README (channels-last here).

zeta's README builds ``Unet(n_channels=1, n_classes=2)`` (width 64) on a 572x572 image; that
forward pass takes about 30 s on a 2-core CPU, so this example uses ``base_channels=16``.
The padded U-Net keeps the input size: 572x572 in, 572x572 out.

    .venv/bin/python examples/unet.py
"""

import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_zeta.nn.unet import Unet

mx.random.seed(0)

model = Unet(n_channels=1, n_classes=2, base_channels=16)
x = mx.random.normal((1, 572, 572, 1))  # (batch, height, width, channels)
start = time.perf_counter()
y = model(x)  # training mode: batch norm uses this batch's statistics
mx.eval(y)
print(f"Unet(n_channels=1, n_classes=2, base_channels=16): {x.shape} -> {y.shape} "
      f"in {time.perf_counter() - start:.2f} s")
print(f"logits mean {y.mean().item():+.4f}, std {y.std().item():.4f}")
probs = mx.softmax(y, axis=-1)
print(f"pixels assigned to class 1: {(probs[..., 1] > 0.5).mean().item():.1%}")

# Odd sizes work in both upsampling modes; eval mode uses the running statistics.
for bilinear in (False, True):
    small = Unet(n_channels=3, n_classes=4, bilinear=bilinear, base_channels=8)
    small.eval()
    out = small(mx.random.normal((2, 37, 45, 3)))
    n_params = sum(v.size for _, v in tree_flatten(small.trainable_parameters()))
    print(f"bilinear={bilinear}: (2, 37, 45, 3) -> {out.shape}, {n_params} parameters")
