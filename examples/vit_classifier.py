"""ViTransformerWrapper: train a tiny Vision Transformer to tell which quadrant of a noisy
image holds a striped texture.

(Stripes rather than a bright quadrant: the ViT normalizes each raw patch with a
LayerNorm first, as x-transformers does, which removes a patch's mean brightness.)

    .venv/bin/python examples/vit_classifier.py
"""

import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_zeta.structs import Encoder, ViTransformerWrapper

mx.random.seed(0)
SIZE, QUADRANTS = 16, 4


def make_batch(n: int):
    """n grey 16x16 images (channels-last): noise, plus vertical stripes (+1, -1 by column)
    on one random quadrant (the label)."""
    labels = mx.random.randint(0, QUADRANTS, (n,))
    rows = mx.arange(SIZE)[:, None] >= SIZE // 2  # bottom half
    cols = mx.arange(SIZE)[None, :] >= SIZE // 2  # right half
    quadrant = rows.astype(mx.int32) * 2 + cols.astype(mx.int32)  # (16, 16): 0 1 / 2 3
    stripes = 1.0 - 2.0 * (mx.arange(SIZE) % 2).astype(mx.float32)  # (16,): +1 -1 +1 ...
    marked = (quadrant[None] == labels[:, None, None]).astype(mx.float32)  # (n, 16, 16)
    img = mx.random.normal((n, SIZE, SIZE)) + marked * stripes
    return img[..., None], labels  # (n, 16, 16, 1), (n,)


model = ViTransformerWrapper(image_size=SIZE, patch_size=4, channels=1, num_classes=QUADRANTS,
                             attn_layers=Encoder(dim=32, depth=2, heads=4))
print(f"ViT: {model.num_patches} patches of 4x4, dim 32, depth 2 -> {QUADRANTS} classes")


def loss_fn(model, img, labels):
    return nn.losses.cross_entropy(model(img), labels, reduction="mean")


def accuracy(img, labels) -> float:
    return (mx.argmax(model(img), axis=-1) == labels).mean().item()


optimizer = optim.Adam(learning_rate=3e-3)
step_fn = nn.value_and_grad(model, loss_fn)
test_img, test_labels = make_batch(256)
print(f"before training: test accuracy {accuracy(test_img, test_labels):.2f} (chance {1 / QUADRANTS:.2f})")
start = time.perf_counter()
for step in range(1, 61):
    img, labels = make_batch(32)
    loss, grads = step_fn(model, img, labels)
    optimizer.update(model, grads)
    mx.eval(loss, model.parameters(), optimizer.state)
    if step % 15 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")
print(f"trained 60 steps in {time.perf_counter() - start:.1f} s; "
      f"test accuracy {accuracy(test_img, test_labels):.2f}")
print(f"patch embeddings: {model(test_img[:2], return_embeddings=True).shape}")
