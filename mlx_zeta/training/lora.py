r"""The LoRA and DoRA layers: a frozen Linear base (float, affine-quantized or ternary) plus a trainable
low-rank update, and :func:`dense_weight`, the float weight every supported base multiplies.
Model-wide operations (apply, fuse, save, load) are in :mod:`mlx_zeta.training.adapters`.

The math follows PEFT 0.21.2 (``peft/tuners/lora/layer.py``, ``dora.py``, ``variants.py``),
with the parameters in its layout (``lora_a`` (r, in), ``lora_b`` (out, r)).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.quant.bitlinear import BitLinear, weight_quant
from mlx_zeta.quant.ternary import TernaryLinear

__all__ = ["LoRALinear", "DoRALinear", "dense_weight", "dense_bias", "base_features", "BASES"]

BASES = (nn.Linear, nn.QuantizedLinear, TernaryLinear, BitLinear)  # the Linear kinds an adapter wraps


def base_features(layer: nn.Module) -> Tuple[int, int]:
    """``(out_features, in_features)`` of a supported base layer."""
    if isinstance(layer, (TernaryLinear, BitLinear)):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.scales.shape[1] * layer.group_size
    return tuple(layer.weight.shape)


def dense_weight(layer: nn.Module) -> mx.array:
    r"""The float weight :math:`W` (out, in) that a supported base layer multiplies.

    - ``nn.Linear``: its ``weight``.
    - ``nn.QuantizedLinear`` (and ``AffineLinear``): ``mx.dequantize`` of its words, scales and biases.
    - ``TernaryLinear``: :math:`T/\sigma` ("divide") or :math:`T\sigma` ("multiply"), float32, so that
      its forward is :math:`y \approx x W^T + b` (exact for ``activation="float"``; the int8 path
      quantizes ``x`` per token first).
    - ``BitLinear``: the fake-quantized ternary weight :math:`Q_W / s_w` its forward multiplies
      (not the float latent weight); its RMSNorm and int8 activations are not part of :math:`W`.

    No host synchronisation, so it works inside steps compiled with ``mx.compile``. A LoRA/DoRA
    layer gives its base's weight.
    """
    if isinstance(layer, LoRALinear):
        layer = layer.base
    if isinstance(layer, TernaryLinear):
        return layer.weight_matrix()
    if isinstance(layer, BitLinear):
        return weight_quant(layer.weight, layer.quant_eps)
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits,
                             mode=layer.mode)
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise ValueError(f"[dense_weight] expected one of {', '.join(b.__name__ for b in BASES)}, "
                     f"got {type(layer).__name__}")


def dense_bias(layer: nn.Module) -> Optional[mx.array]:
    """The bias added after the product (TernaryLinear "multiply" scales its stored bias), or None."""
    if "bias" not in layer:
        return None
    if isinstance(layer, TernaryLinear) and layer.scale_convention == "multiply":
        return layer.bias * layer.weight_scale
    return layer.bias


class LoRALinear(nn.Module):
    r"""A frozen Linear layer plus a trainable low-rank update (LoRA, Hu et al., 2021).

    .. math::

        y = \operatorname{base}(x) + s\, (\operatorname{dropout}(x) A^T) B^T

    with :math:`A` = ``lora_a`` (r, in), :math:`B` = ``lora_b`` (out, r), :math:`s` = ``scale``
    (PEFT's ``lora_alpha / r``). :math:`B` starts at zero, so the layer starts equal to its base;
    :math:`A \sim U(-1/\sqrt{in}, 1/\sqrt{in})` (PEFT's ``kaiming_uniform_(a=sqrt(5))``). The adapter
    is float32 whatever the base; the output has the base output's dtype. Dropout (inverted,
    probability ``dropout``) acts on the adapter's input only, in training mode.

    The base is frozen (``nn.Linear``, ``nn.QuantizedLinear``/``AffineLinear``, ``TernaryLinear`` or
    ``BitLinear``) and keeps its kind; gradients still flow through it to ``x``.

    Args:
        base (nn.Module): the layer to adapt.
        rank (int): :math:`r \ge 1`. Default: ``8``.
        scale (float): :math:`s`. Default: ``2.0``.
        dropout (float): dropout probability in [0, 1). Default: ``0.0``.

    Shape:
        - Input: :math:`(*, \text{in})`. Output: :math:`(*, \text{out})`.

    Example:
        >>> import mlx.core as mx
        >>> import mlx.nn as nn
        >>> from mlx_zeta.training import LoRALinear
        >>> layer = LoRALinear(nn.Linear(64, 32), rank=4, scale=2.0)
        >>> layer(mx.zeros((2, 64))).shape
        (2, 32)

    Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685.
    """

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0):
        super().__init__()
        name = type(self).__name__
        if not isinstance(base, BASES) or isinstance(base, LoRALinear):
            raise ValueError(f"[{name}] expected base to be one of {', '.join(b.__name__ for b in BASES)}, "
                             f"got {type(base).__name__}")
        check_int(name, "rank", rank, 1)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise ValueError(f"[{name}] expected scale to be a finite number, got {scale!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"[{name}] expected dropout in [0, 1), got {dropout!r}")
        out_features, in_features = base_features(base)
        base.freeze()
        self.base = base
        self.scale, self.dropout = float(scale), float(dropout)
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_features))
        self.lora_b = mx.zeros((out_features, rank))

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def _extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale}, dropout={self.dropout}")

    def _drop(self, x: mx.array) -> mx.array:
        """Inverted dropout of the adapter's input (training mode, ``dropout > 0`` only)."""
        if not (self.training and self.dropout > 0):
            return x
        keep = mx.random.bernoulli(1.0 - self.dropout, x.shape)
        return mx.where(keep, x / (1.0 - self.dropout), mx.zeros_like(x))

    def _lora(self, x: mx.array) -> mx.array:
        """:math:`(x A^T) B^T` in the adapter's dtype."""
        return (x.astype(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T

    def delta_weight(self) -> mx.array:
        r""":math:`s\, B A` (out, in), the update a fused layer adds to :math:`W`."""
        return self.scale * (self.lora_b @ self.lora_a)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        return (y + self.scale * self._lora(self._drop(x))).astype(y.dtype)

    def updated_weight(self) -> mx.array:
        """:math:`W' = W + s B A` (out, in), float32, :math:`W` = :func:`dense_weight` of the base."""
        return dense_weight(self.base).astype(mx.float32) + self.delta_weight()

    def fused_weight(self) -> mx.array:
        """The weight of the fused layer: :math:`W + s B A` (out, in), float32."""
        return self.updated_weight()


class DoRALinear(LoRALinear):
    r"""Weight-decomposed low-rank adaptation (DoRA, Liu et al., 2024), PEFT 0.21.2's forward.

    With :math:`W` = :func:`dense_weight` of the base, :math:`W' = W + s B A`, the row norms
    :math:`n = \operatorname{sg}(\lVert W'_i \rVert_2)` held constant in the backward pass (paper §4.3)
    and :math:`g = m / n` (``magnitude`` :math:`m` (out,), initialised to :math:`\lVert W_i \rVert_2`):

    .. math::

        y = \operatorname{base}(x) + (g - 1) \odot \operatorname{base}_0(\tilde x)
            + g \odot s\, (\tilde x A^T) B^T

    where :math:`\operatorname{base}_0` is the base without its bias. Without dropout (or in eval
    mode) :math:`\tilde x = x` and this is :math:`g \odot \operatorname{base}_0(x) + b + g \odot s\,(x A^T)B^T`;
    in training with dropout, :math:`\tilde x` is the dropped input in both of the last two terms
    while :math:`\operatorname{base}(x)` keeps the full one, exactly as PEFT. PEFT computes
    :math:`\operatorname{base}_0(\tilde x)` as :math:`\tilde x W^T`; here it is the base's own forward
    minus its bias, the same for float and affine bases and the faithful choice for ternary ones
    (their int8 activations and input norms are not a matmul with :math:`W`).

    Args: as :class:`LoRALinear`.

    Reference: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353.
    """

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.magnitude = mx.linalg.norm(dense_weight(base).astype(mx.float32), axis=1)

    def _gain(self) -> mx.array:
        """:math:`m / \\operatorname{sg}(\\lVert W + sBA \\rVert_{row})`, shape (out,)."""
        norm = mx.linalg.norm(self.updated_weight(), axis=1)
        return self.magnitude / mx.stop_gradient(norm)

    def _base_no_bias(self, y: mx.array) -> mx.array:
        bias = dense_bias(self.base)
        return y if bias is None else y - bias

    def __call__(self, x: mx.array) -> mx.array:
        r"""The adapted layer's output, the DoRA formula above.

        Args:
            x (mx.array): the input, :math:`(*, \text{in})`.

        Returns:
            mx.array: :math:`(*, \text{out})`, in the base output's dtype.
        """
        y = self.base(x)
        dropped = self._drop(x)
        plain = self._base_no_bias(y if dropped is x else self.base(dropped))
        g = self._gain()
        out = y + (g - 1) * plain + g * (self.scale * self._lora(dropped))
        return out.astype(y.dtype)

    def fused_weight(self) -> mx.array:
        r""":math:`m \odot W' / \lVert W' \rVert_{row}` (out, in), float32."""
        weight = self.updated_weight()
        return (self.magnitude / mx.linalg.norm(weight, axis=1))[:, None] * weight


