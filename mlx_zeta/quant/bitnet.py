r"""BitNet b1.58's layers around :class:`~mlx_zeta.quant.TernaryLinear`: :class:`SubNormTernaryLinear`
(BitNet's ``attn_sub_norm`` / ``ffn_sub_norm`` before a projection) and :class:`StackedProjection`
(two separately packed projections whose outputs a GLU feed-forward reads as one).

Reference: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
https://arxiv.org/abs/2402.17764. BitNet checkpoints load through :mod:`mlx_zeta.converters.bitnet`.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.quant.ternary import TernaryLinear

__all__ = ["SubNormTernaryLinear", "StackedProjection"]


class SubNormTernaryLinear(TernaryLinear):
    r"""A :class:`TernaryLinear` behind an RMSNorm ``sub_norm`` (BitNet's ``attn_sub_norm`` before
    ``o_proj``, ``ffn_sub_norm`` before ``down_proj``): :math:`y = \mathrm{TernaryLinear}(\mathrm{RMSNorm}(x))`.

    The sub-norm comes first, then the layer's own ``norm`` (if ``norm=True``), as in transformers
    (the sub-norm module, then BitLinear's ``rms_norm``). ``sub_norm_eps``: the sub-norm's epsilon;
    other arguments as :class:`TernaryLinear`. Shape: :math:`(*, in) \to (*, out)`.
    """

    def __init__(self, in_features: int, out_features: int, sub_norm_eps: float = 1e-5, **kwargs: Any):
        super().__init__(in_features, out_features, **kwargs)
        self.sub_norm = nn.RMSNorm(in_features, eps=sub_norm_eps)
        self.freeze()

    def prepare_input(self, x: mx.array) -> mx.array:
        if x.ndim and x.shape[-1] == self.in_features:  # other shapes: TernaryLinear's error
            x = self.sub_norm(x)
        return super().prepare_input(x)

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, sub_norm_eps={self.sub_norm.eps}"


class StackedProjection(nn.Module):
    r"""Two projections of one input with their outputs stacked: :math:`[up(x); gate(x)]`.

    The input projection of a GLU :class:`~mlx_zeta.nn.FeedForward` (value half first, gate half
    second) made of two separately packed ternary layers, each with its own scale.
    Shape: :math:`(*, in) \to (*, out_{up} + out_{gate})`.
    """

    def __init__(self, up: nn.Module, gate: nn.Module):
        super().__init__()
        self.up, self.gate = up, gate

    def __call__(self, x: mx.array) -> mx.array:
        return mx.concatenate([self.up(x), self.gate(x)], axis=-1)
