"""PalmE: zeta's README usage, a ViT's patch embeddings prepended to a decoder LM.

    .venv/bin/python examples/palme.py
"""

import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_zeta.models import PalmE

mx.random.seed(0)

# zeta's README, channels-last: the full-size defaults (a 6-layer ViT on 256x256 images in
# 32x32 patches, a 6-layer 512-wide decoder LM over 20000 tokens; about 58M parameters).
model = PalmE()
img = mx.random.normal((1, 256, 256, 3))  # (batch, height, width, channels)
text = mx.random.randint(0, 20000, (1, 1024))
n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
print(f"PalmE: {n_params / 1e6:.1f}M parameters, {model.num_patches} image positions before the text")

start = time.perf_counter()
out = model(img, text)
mx.eval(out)
print(f"logits {out.shape} for image {img.shape} and text {text.shape} "
      f"({time.perf_counter() - start:.1f} s; the decoder ran over {model.num_patches} + {text.shape[1]} positions)")

# Conditioned generation: the image is prepended on the prefill, then the KV cache decodes.
# A short prompt keeps this quick on a CPU; untrained weights give arbitrary tokens.
start = time.perf_counter()
new = model.generate(img, text[:, :16], 8, top_k=1)
print(f"greedy continuation of a 16-token prompt: {new[0].tolist()} ({time.perf_counter() - start:.1f} s)")
print(f"next-token loss at initialization: {model.loss(img, text[:, :64]).item():.3f} "
      f"(uniform over 20000 tokens: {mx.log(mx.array(20000.0)).item():.3f})")
