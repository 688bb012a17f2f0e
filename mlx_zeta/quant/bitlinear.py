"""Ternary (1.58-bit) quantization-aware training: the ``BitLinear`` layer that trains
through the BitNet b1.58 quantizers (:mod:`mlx_zeta.quant.quantizers`) with straight-through
gradients."""


import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int, check_positive
from mlx_zeta.quant.quantizers import absmax_scale, absmean_scale, quantize_activations, ternarize

__all__ = ["BitLinear", "absmean_scale", "absmax_scale", "ternarize", "quantize_activations",
           "weight_quant", "activation_quant"]

def _straight_through(x: mx.array, q: mx.array) -> mx.array:
    """Value ``q`` exactly, gradient of the identity in ``x``."""
    return mx.stop_gradient(q) + (x - mx.stop_gradient(x))


def weight_quant(w: mx.array, eps: float = 1e-5) -> mx.array:
    r"""Fake-quantized weights :math:`Q / s_w` with a straight-through gradient (identity).

    Forward: the dequantized ternary weights, in ``w``'s dtype. Backward: :math:`\partial/\partial W = I`
    (Bengio et al., 2013), written as :math:`\operatorname{sg}(Q/s_w) + (W - \operatorname{sg}(W))`: the
    second term is exactly zero, so the forward lies exactly on the ternary grid in every dtype (the
    usual :math:`W + \operatorname{sg}(Q/s_w - W)` rounds twice and leaves some weights one ulp off it).
    """
    q, scale = ternarize(w, eps)
    return _straight_through(w, (q.astype(mx.float32) / scale).astype(w.dtype))


def activation_quant(x: mx.array, eps: float = 1e-5) -> mx.array:
    r"""Fake-quantized activations :math:`Q_x / s_x` with a straight-through gradient (identity)."""
    q, scale = quantize_activations(x, eps)
    return _straight_through(x, (q.astype(mx.float32) / scale).astype(x.dtype))


class BitLinear(nn.Module):
    r"""Linear layer of BitNet b1.58 for quantization-aware training.

    .. math::

        \tilde x = \operatorname{RMSNorm}(x), \qquad
        y = \frac{Q_x}{s_x} \Big(\frac{Q_W}{s_w}\Big)^{\!T} + b

    with per-token int8 activations :math:`Q_x = \operatorname{clip}(\operatorname{round}(\tilde x s_x),
    -128, 127)`, :math:`s_x = 127 / \max|\tilde x|`, and per-tensor ternary weights
    :math:`Q_W = \operatorname{clip}(\operatorname{round}(W s_w), -1, 1)`, :math:`s_w = 1/\operatorname{mean}|W|`.
    Both quantizers pass gradients straight through (STE), so :math:`W` stays a float
    "latent" weight that the optimizer updates. Dividing by both scales dequantizes the
    output: it has the scale of a float ``nn.Linear`` with the same weights (zeta's
    BitLinear omits this and is about 240x off).

    The norm is ``mlx.nn.RMSNorm`` (:math:`x / \sqrt{\operatorname{mean}(x^2) + \epsilon} \odot \gamma`),
    the sub-norm that BitNet puts before every quantized projection. For inference, :meth:`to_ternary`
    packs the weights into a :class:`~mlx_zeta.quant.TernaryLinear`.

    Args:
        in_features (int): input size.
        out_features (int): output size.
        bias (bool): add a float bias. Default: ``False`` (BitNet uses none).
        norm (bool): RMSNorm on the input before quantizing. Default: ``True``.
        norm_eps (float): RMSNorm epsilon. Default: ``1e-6``.
        quant_eps (float): floor on :math:`\max|x|` and :math:`\operatorname{mean}|W|`. Default: ``1e-5``.

    Shape:
        - Input: :math:`(*, \text{in\_features})`. Output: :math:`(*, \text{out\_features})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.quant import BitLinear
        >>> layer = BitLinear(64, 32)
        >>> layer(mx.random.normal((2, 5, 64))).shape
        (2, 5, 32)

    Reference: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
    https://arxiv.org/abs/2402.17764, and its "Training Tips, Code and FAQ" (2024); Wang et al.,
    "BitNet", https://arxiv.org/abs/2310.11453.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: bool = True,
                 norm_eps: float = 1e-6, quant_eps: float = 1e-5):
        super().__init__()
        check_int("BitLinear", "in_features", in_features, 1)
        check_int("BitLinear", "out_features", out_features, 1)
        check_positive("BitLinear", "quant_eps", quant_eps)
        self.in_features, self.out_features, self.quant_eps = in_features, out_features, quant_eps
        bound = in_features ** -0.5  # nn.Linear's initialisation
        self.weight = mx.random.uniform(-bound, bound, (out_features, in_features))
        if bias:
            self.bias = mx.zeros((out_features,))
        if norm:
            self.norm = nn.RMSNorm(in_features, eps=norm_eps)

    @classmethod
    def from_linear(cls, linear: nn.Linear, norm: bool = True, **kwargs) -> "BitLinear":
        """A BitLinear starting from a float ``nn.Linear``'s weight (and bias), in its dtype."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"[BitLinear] from_linear expected an mlx.nn.Linear, got {type(linear).__name__}")
        out_features, in_features = linear.weight.shape
        layer = cls(in_features, out_features, bias="bias" in linear, norm=norm, **kwargs)
        layer.weight = linear.weight
        if "bias" in linear:
            layer.bias = linear.bias
        if norm:  # a bfloat16 Linear gives a bfloat16 BitLinear, not one promoted to float32 by its norm
            layer.norm.weight = layer.norm.weight.astype(linear.weight.dtype)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"[BitLinear] expected input of shape (..., {self.in_features}), got {tuple(x.shape)}")
        if "norm" in self:
            x = self.norm(x)
        y = activation_quant(x, self.quant_eps) @ weight_quant(self.weight, self.quant_eps).T.astype(x.dtype)
        return y + self.bias if "bias" in self else y

    def to_ternary(self, activation: str = "int8") -> nn.Module:
        """The packed inference twin of this layer (see :class:`~mlx_zeta.quant.TernaryLinear`)."""
        from mlx_zeta.quant.ternary import TernaryLinear

        return TernaryLinear.from_bitlinear(self, activation=activation)
