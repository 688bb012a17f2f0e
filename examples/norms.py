"""The normalisation layers as zeta's docs use them (RMSNorm, SimpleRMSNorm, ScaleNorm,
LayerNorm), a hand-checkable value, and float16 inputs large enough to overflow a naive
sum of squares.

    .venv/bin/python examples/norms.py
"""

import mlx_zeta  # noqa: F401  (before mlx: routes BLAS)
import mlx.core as mx

from mlx_zeta.nn.norms import LayerNorm, RMSNorm, ScaleNorm, SimpleRMSNorm

mx.random.seed(0)


def rms(y: mx.array) -> float:
    return mx.sqrt(mx.mean(y.astype(mx.float32) ** 2)).item()


module = RMSNorm(768)
x = mx.random.normal((2, 197, 768)) * 5.0
y = module(x)
print(f"RMSNorm(768): {x.shape} -> {y.shape}, rms {rms(x):.3f} -> {rms(y):.4f}")

for name, module, shape in [("SimpleRMSNorm(512)", SimpleRMSNorm(512), (1, 10, 512)),
                            ("ScaleNorm(512)", ScaleNorm(512), (1, 10, 512))]:
    y = module(mx.random.normal(shape) * 3.0)
    print(f"{name}: {y.shape}, output rms {rms(y):.4f}")

layer_norm = LayerNorm(dim=10)
y = layer_norm(mx.random.normal((32, 10)) + 4.0)
print(f"LayerNorm(10): {y.shape}, row mean {y.mean(-1).abs().max().item():.2e}, row var {y.var(-1).mean().item():.4f}")

# [3, 4] has norm 5: [3, 4] / 5 * sqrt(2) = [0.8485, 1.1314]
print(f"SimpleRMSNorm(2)([3, 4]) = {[round(v, 4) for v in SimpleRMSNorm(2)(mx.array([3.0, 4.0])).tolist()]}")

# float16 activations around 300: a float16 sum of squares is inf; the layers reduce in float32
x16 = (mx.random.normal((2, 4, 64)) * 40 + 300).astype(mx.float16)
print(f"float16 inputs ~300: naive sum of squares = {mx.sum(x16 * x16, axis=-1)[0, 0].item()}")
for module in (RMSNorm(64), LayerNorm(64)):
    module.set_dtype(mx.float16)
    y = module(x16)
    print(f"  {type(module).__name__}: dtype {y.dtype}, all finite {mx.isfinite(y).all().item()}, rms {rms(y):.4f}")
