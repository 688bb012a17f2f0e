"""FeedForward as zeta's README uses it: GLU + post-activation LayerNorm + dropout,
a swish MLP, and the README's positional call, on random inputs.

    .venv/bin/python examples/feedforward.py
"""

import mlx_zeta  # noqa: F401  (before mlx: routes BLAS)
import mlx.core as mx

from mlx_zeta.nn.feedforward import FeedForward

mx.random.seed(0)

# zeta README: FeedForward(256, 512, glu=True, post_act_ln=True, dropout=0.2) on a (1, 256) input
model = FeedForward(256, 512, glu=True, post_act_ln=True, dropout=0.2)
x = mx.random.normal((1, 256))
model.eval()  # dropout off: a deterministic forward pass
output = model(x)
print(f"GLU + post_act_ln: {x.shape} -> {output.shape}, mean {output.mean().item():+.4f}, std {output.std().item():.4f}")

model.train()  # dropout on: a fresh mask each call
print(f"  train mode differs from eval: {not mx.allclose(model(x), output).item()}")

# zeta docs: FeedForward(512, 1024, swish=True) -- dim 512, output 1024, SiLU
model = FeedForward(512, 1024, swish=True)
output = model(mx.random.normal((1, 512)))
print(f"swish: (1, 512) -> {output.shape}, first values {[round(v, 4) for v in output[0, :3].tolist()]}")

# zeta docs, positional: FeedForward(768, 2048, 0.1) -- mult = 0.1 gives a hidden width of 76
model = FeedForward(768, 2048, 0.1)
output = model(mx.random.normal((1, 768)))
print(f"positional (768, 2048, 0.1): hidden width {model.inner_dim}, output {output.shape}")

# SwiGLU, bias-free, with a zero-initialised output projection: the block starts as the zero map
model = FeedForward(64, swiglu=True, no_bias=True, zero_init_output=True)
output = model(mx.random.normal((2, 16, 64)))
print(f"swiglu + zero_init_output: {output.shape}, max |y| = {mx.abs(output).max().item()}")
