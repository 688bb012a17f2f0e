"""MLX's affine-quantized layers routed through :func:`mlx_zeta.kernels.affine_matmul`: on the CPU
the native 4/8-bit kernels (or, without them, the BLAS on a transiently dequantized weight for
many rows), where MLX's CPU ``quantized_matmul`` is slow (``BENCHMARKS.md``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.kernels.affine import DEQUANTIZE_ROWS, affine_matmul

__all__ = ["AffineLinear", "AffineEmbedding", "DEQUANTIZE_ROWS", "affine_quantize", "use_affine_linear"]


class AffineLinear(nn.QuantizedLinear):
    r"""``mlx.nn.QuantizedLinear`` (same parameters, same saved names) whose product

    .. math::

        y = x\, \hat W^T + b, \qquad \hat W = \text{dequantize}(W_q, s, z)

    goes through :func:`mlx_zeta.kernels.affine_matmul`, the one place that picks the path: on the
    CPU, the native 4/8-bit kernels where built (a GEMV per decoding step, a tiled GEMM for a
    prompt or a batch), else a BLAS matmul on the transiently dequantized weight from
    ``DEQUANTIZE_ROWS`` rows on; MLX's ``quantized_matmul`` otherwise (GPU, other modes, other
    bits). Equal to float32 rounding on every path; the backward pass uses one layer's transiently
    dequantized weight at a time (QLoRA).

    Measured (2 cores, 4-bit group 64, 4096 -> 4096; BENCHMARKS.md "Native CPU kernels"): one row
    0.53 ms (``quantized_matmul``: 16.5 ms), 256 rows 52 ms (``quantized_matmul``: 4213 ms).

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
        y = affine_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits, self.mode)
        return y + self["bias"] if "bias" in self else y


class AffineEmbedding(nn.QuantizedEmbedding):
    r"""``mlx.nn.QuantizedEmbedding`` whose ``as_linear`` (a tied output head) goes through
    :func:`mlx_zeta.kernels.affine_matmul` like :class:`AffineLinear`; lookups are MLX's.

    Shape: ``as_linear`` x :math:`(*, \text{dims})` -> :math:`(*, \text{num\_embeddings})`.
    """

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "AffineEmbedding":
        """An ``AffineEmbedding`` holding ``layer``'s arrays (shared, not copied) and settings."""
        if not isinstance(layer, nn.QuantizedEmbedding):
            raise ValueError(f"[AffineEmbedding] expected an mlx.nn.QuantizedEmbedding, got {type(layer).__name__}")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.group_size, out.bits, out.mode = layer.group_size, layer.bits, layer.mode
        out.num_embeddings, out.dims = layer.num_embeddings, layer.dims
        for name, value in layer.items():
            out[name] = value
        out.freeze()
        return out

    def as_linear(self, x: mx.array) -> mx.array:
        return affine_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                             self.mode)


def use_affine_linear(model: nn.Module) -> int:
    """Swap, in place, every ``mlx.nn.QuantizedLinear`` / ``QuantizedEmbedding`` of ``model`` (exactly
    those classes) for an :class:`AffineLinear` / :class:`AffineEmbedding` sharing its arrays;
    returns how many were swapped."""
    from mlx.utils import tree_unflatten

    if not isinstance(model, nn.Module):
        raise ValueError(f"[use_affine_linear] expected an mlx.nn.Module, got {type(model).__name__}")
    swap = {nn.QuantizedLinear: AffineLinear, nn.QuantizedEmbedding: AffineEmbedding}
    swaps = [(p, swap[type(m)].from_quantized(m)) for p, m in model.named_modules() if type(m) in swap and p]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def affine_quantize(model: nn.Module, group_size: int, bits: int, class_predicate) -> None:
    """``mlx.nn.quantize(model, group_size, bits, class_predicate=...)`` in place, its Linear layers
    made :class:`AffineLinear`: the one way the library quantizes with MLX's affine scheme (the
    converters' ``quantize`` and ``rebuild``, ``freeze_model(head_bits=...)``); Embedding layers
    become :class:`AffineEmbedding`."""
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=class_predicate)
    use_affine_linear(model)
