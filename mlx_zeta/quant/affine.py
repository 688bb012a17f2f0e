"""MLX's affine-quantized Linear layer with a CPU path for many rows: the weights are dequantized
and multiplied by the BLAS (a prompt's prefill), as MLX's CPU ``quantized_matmul`` costs grow
linearly with the rows (``BENCHMARKS.md``: 50x a float32 matmul at 256 rows)."""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

__all__ = ["AffineLinear", "DEQUANTIZE_ROWS", "affine_quantize", "use_affine_linear"]

DEQUANTIZE_ROWS = 8  # rows of x from which the CPU path dequantizes (measured crossover: 4-8 rows)


class AffineLinear(nn.QuantizedLinear):
    r"""``mlx.nn.QuantizedLinear`` (same parameters, same saved names) whose product, on the
    CPU backend with at least :data:`DEQUANTIZE_ROWS` rows of ``x``, is

    .. math::

        y = x\, \hat W^T + b, \qquad \hat W = \text{dequantize}(W_q, s, z)

    through a BLAS matmul (the same :math:`\hat W` that ``quantized_matmul`` multiplies, summed in
    another order: equal to float32 rounding). Fewer rows (a decoding step), another mode than
    ``affine``, or another device (Metal, CUDA) take ``mx.quantized_matmul``. The dequantized
    weight is transient: one layer's float weight at a time on top of the quantized model, in the
    backward pass too (it is dequantized again there rather than kept from the forward pass, so
    adapters on a quantized base train in little more than the quantized model's memory).

    Measured (2 cores, MKL, 4-bit group 64, 1024 -> 5632, 512 rows): 1734 ms -> 54 ms.

    Build one with :meth:`from_quantized` or swap a model's layers with :func:`use_affine_linear`.

    Shape:
        - x: :math:`(*, \text{in})`; output: :math:`(*, \text{out})`.
    """

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "AffineLinear":
        """An ``AffineLinear`` holding ``layer``'s arrays (shared, not copied) and settings."""
        if not isinstance(layer, nn.QuantizedLinear):
            raise ValueError(f"[AffineLinear] expected an mlx.nn.QuantizedLinear, got {type(layer).__name__}")
        out = cls.__new__(cls)
        nn.Module.__init__(out)  # no random weight drawn and quantized, as the constructor would
        out.group_size, out.bits, out.mode = layer.group_size, layer.bits, layer.mode
        for name, value in layer.items():
            out[name] = value
        out.biases = layer.get("biases")
        out.freeze()
        return out

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // max(x.shape[-1], 1)
        if self.mode != "affine" or rows < DEQUANTIZE_ROWS or mx.default_device() != mx.cpu:
            return super().__call__(x)
        y = _dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y


@functools.lru_cache(maxsize=None)
def _dequantized_matmul(group_size: int, bits: int):
    r""":math:`(x, W_q, s, z) \mapsto x\,\hat W^T`, dequantizing :math:`\hat W` only once ``x`` exists
    (MLX would otherwise schedule every layer's independent dequantize early, holding the whole
    model in float during a prefill), and again in the backward pass once the incoming gradient
    exists, instead of keeping the forward's float copy alive: a prefill, or training adapters on a
    quantized base (QLoRA), holds one layer's float weight at a time. The quantized arrays are
    frozen and get zero gradients."""

    @mx.custom_function
    def matmul(x, w, scales, biases):
        w, scales, biases = mx.depends([w, scales, biases], [x])  # not before x exists: one float weight at a time
        return x @ mx.dequantize(w, scales, biases, group_size, bits).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, _output):
        x, w, scales, biases = primals
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])  # not before the gradient arrives
        dx = cotangent @ mx.dequantize(w, scales, biases, group_size, bits)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


def use_affine_linear(model: nn.Module) -> int:
    """Swap, in place, every ``mlx.nn.QuantizedLinear`` of ``model`` (exactly that class) for an
    :class:`AffineLinear` sharing its arrays; returns how many were swapped."""
    from mlx.utils import tree_unflatten

    if not isinstance(model, nn.Module):
        raise ValueError(f"[use_affine_linear] expected an mlx.nn.Module, got {type(model).__name__}")
    swaps = [(p, AffineLinear.from_quantized(m)) for p, m in model.named_modules()
             if type(m) is nn.QuantizedLinear and p]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def affine_quantize(model: nn.Module, group_size: int, bits: int, class_predicate) -> None:
    """``mlx.nn.quantize(model, group_size, bits, class_predicate=...)`` in place, its Linear layers
    made :class:`AffineLinear`: the one way the library quantizes with MLX's affine scheme (the
    converters' ``quantize`` and ``rebuild``, ``freeze_model(head_bits=...)``)."""
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=class_predicate)
    use_affine_linear(model)
