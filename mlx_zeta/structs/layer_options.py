r"""The two choices an :class:`~mlx_zeta.structs.AttentionLayers` stack takes as one argument
each: ``norm=`` (a class or callable making a norm for a dimension, as in MLX and equinox)
and ``position=`` (the self-attention position schemes: :class:`Rotary`, :class:`Alibi`,
:class:`T5Bias`, their names ``"rotary"``, ``"alibi"``, ``"t5"``, or a tuple of them), and
the mapping of zeta's / x-transformers' keywords (``use_rmsnorm``, ``rotary_pos_emb``,
``alibi_pos_bias``, ``rel_pos_bias``, ...) onto them."""

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.nn.norms import RMSNorm, ScaleNorm
from mlx_zeta.nn.positional import AlibiPositionalBias, RelativePositionBias, RotaryEmbedding

__all__ = ["Alibi", "NormFactory", "Position", "Rotary", "T5Bias", "resolve_norm", "resolve_position"]

NormFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class Rotary:
    r"""Rotary position embedding (RoPE, optionally xPos) on the first ``dim`` features of
    every query/key head; see :class:`~mlx_zeta.nn.RotaryEmbedding`.

    Args:
        dim (int, optional): rotated features per head, even, :math:`\le` ``dim_head``.
            Default: ``dim_head // 2``.
        xpos (bool): xPos scaling (causal stacks only). Default: ``False``.
        xpos_scale_base (float): xPos :math:`\gamma`. Default: ``512``.
        base (float): frequency base. Default: ``10000``.
        interpolation_factor (float): position interpolation factor. Default: ``1.0``.
        inv_freq (array, optional): the ``dim // 2`` frequencies given directly. Default: ``None``.
    """

    dim: Optional[int] = None
    xpos: bool = False
    xpos_scale_base: float = 512
    base: float = 10000
    interpolation_factor: float = 1.0
    inv_freq: Optional[mx.array] = None

    attr = "rotary"  # the stack's attribute (and weight-name prefix) holding the module

    def build(self, owner: str, heads: int, dim_head: int, causal: bool) -> RotaryEmbedding:
        if self.xpos and not causal:
            raise ValueError(f"[{owner}] expected rotary_pos_emb=True and causal=True with rotary_xpos "
                             f"(xPos is not bidirectional), got rotary_pos_emb=True, causal={causal}")
        dim = dim_head // 2 if self.dim is None else self.dim
        if dim > dim_head or dim < 2 or dim % 2:
            raise ValueError(f"[{owner}] expected an even rotary_emb_dim in [2, dim_head={dim_head}], got {dim}")
        return RotaryEmbedding(dim, use_xpos=self.xpos, scale_base=self.xpos_scale_base,
                               interpolation_factor=self.interpolation_factor, base=self.base, inv_freq=self.inv_freq)


@dataclass(frozen=True)
class Alibi:
    r"""ALiBi bias :math:`-m_h|i - j|` on the first ``num_heads`` heads (the rest get none,
    e.g. to rely on rotary positions); see :class:`~mlx_zeta.nn.AlibiPositionalBias`.

    Args:
        num_heads (int, optional): heads with a bias, :math:`1 \le` ``num_heads`` :math:`\le` ``heads``.
            Default: every head.
    """

    num_heads: Optional[int] = None

    attr = "alibi"

    def build(self, owner: str, heads: int, dim_head: int, causal: bool) -> AlibiPositionalBias:
        num = heads if self.num_heads is None else self.num_heads
        check_int(owner, "alibi_num_heads", num, 1, heads, says=f"expected 1 <= alibi_num_heads <= heads={heads}")
        return AlibiPositionalBias(heads=num, total_heads=heads)


@dataclass(frozen=True)
class T5Bias:
    r"""One T5 relative position bias table for the whole stack (bidirectional buckets in
    an encoder, causal ones in a decoder); see :class:`~mlx_zeta.nn.RelativePositionBias`.

    Args:
        num_buckets (int): buckets. Default: ``32``.
        max_distance (int): distance beyond which buckets are shared. Default: ``128``.
    """

    num_buckets: int = 32
    max_distance: int = 128

    attr = "rel_pos"

    def build(self, owner: str, heads: int, dim_head: int, causal: bool) -> RelativePositionBias:
        return RelativePositionBias(bidirectional=not causal, num_buckets=self.num_buckets,
                                    max_distance=self.max_distance, num_heads=heads)


Scheme = Union[Rotary, Alibi, T5Bias]
Position = Union[None, str, Scheme, Sequence[Union[str, Scheme]]]
_NAMED = {"rotary": Rotary, "alibi": Alibi, "t5": T5Bias}
# zeta's / x-transformers' keywords: switch -> (scheme, {keyword: field})
_LEGACY_POSITION = {
    "rotary_pos_emb": (Rotary, {"rotary_emb_dim": "dim", "rotary_xpos": "xpos", "rotary_xpos_scale_base": "xpos_scale_base",
                                "rotary_base": "base", "rotary_interpolation_factor": "interpolation_factor",
                                "rotary_inv_freq": "inv_freq"}),
    "alibi_pos_bias": (Alibi, {"alibi_num_heads": "num_heads"}),
    "rel_pos_bias": (T5Bias, {"rel_pos_num_buckets": "num_buckets", "rel_pos_max_distance": "max_distance"}),
}
# an option given without its switch is an error (others are ignored, as before)
_NEEDS_SWITCH = {"rotary_inv_freq": "rotary_pos_emb", "alibi_num_heads": "alibi_pos_bias"}
LEGACY_POSITION_KEYS = tuple(k for switch, (_, fields) in _LEGACY_POSITION.items() for k in (switch, *fields))
LEGACY_NORM_KEYS = ("use_rmsnorm", "use_scalenorm", "norm_factory")


def resolve_norm(norm: Optional[NormFactory], owner: str, use_rmsnorm: bool = False, use_scalenorm: bool = False,
                 norm_factory: Optional[NormFactory] = None) -> NormFactory:
    """The one ``dim -> nn.Module`` norm maker from ``norm=`` or its aliases: x-transformers'
    ``use_rmsnorm`` (:class:`~mlx_zeta.nn.RMSNorm`) and ``use_scalenorm``
    (:class:`~mlx_zeta.nn.ScaleNorm`), and the deprecated ``norm_factory`` (same as ``norm``).
    Default: ``mlx.nn.LayerNorm``."""
    given = {"use_rmsnorm": bool(use_rmsnorm), "use_scalenorm": bool(use_scalenorm),
             "norm_factory": norm_factory is not None, "norm": norm is not None}
    if sum(given.values()) > 1:
        raise ValueError(f"[{owner}] expected at most one of use_rmsnorm, use_scalenorm, norm_factory, norm, got "
                         f"use_rmsnorm={use_rmsnorm}, use_scalenorm={use_scalenorm}, "
                         f"norm_factory={'set' if norm_factory is not None else None}, "
                         f"norm={'set' if norm is not None else None}")
    if norm_factory is not None:
        warnings.warn(f"[{owner}] norm_factory is deprecated; pass the same callable as norm=", DeprecationWarning,
                      stacklevel=4)
        if not callable(norm_factory):
            raise ValueError(f"[{owner}] expected norm_factory to be callable (dim -> nn.Module), "
                             f"got {type(norm_factory).__name__}")
        return norm_factory
    if norm is not None and not callable(norm):
        raise ValueError(f"[{owner}] expected norm to be a class or callable (dim -> nn.Module), got {type(norm).__name__}")
    return norm or (RMSNorm if use_rmsnorm else ScaleNorm if use_scalenorm else nn.LayerNorm)


def _legacy_schemes(legacy: Dict[str, Any], causal: bool, owner: str) -> Tuple[Scheme, ...]:
    """Schemes from zeta's / x-transformers' position keywords, with their historic checks."""
    if legacy.get("alibi_pos_bias") and legacy.get("rel_pos_bias"):
        raise ValueError(f"[{owner}] expected at most one of alibi_pos_bias, rel_pos_bias, got both")
    rotary = bool(legacy.get("rotary_pos_emb"))
    if legacy.get("rotary_xpos") and not (rotary and causal):
        raise ValueError(f"[{owner}] expected rotary_pos_emb=True and causal=True with rotary_xpos "
                         f"(xPos is not bidirectional), got rotary_pos_emb={rotary}, causal={causal}")
    for option, switch in _NEEDS_SWITCH.items():
        if legacy.get(option) is not None and not legacy.get(switch):
            raise ValueError(f"[{owner}] expected {switch}=True with {option}, got {switch}=False")
    return tuple(cls(**{field: legacy[k] for k, field in fields.items() if k in legacy})
                 for switch, (cls, fields) in _LEGACY_POSITION.items() if legacy.get(switch))


def resolve_position(position: Position, legacy: Dict[str, Any], causal: bool, owner: str) -> Tuple[Scheme, ...]:
    """The stack's position schemes, from ``position=`` or (not both) zeta's / x-transformers'
    keywords in ``legacy``: at most one of each kind and one bias (ALiBi or T5)."""
    given = sorted(k for k, v in legacy.items() if v is not None and v is not False)
    if position is not None and given:
        raise ValueError(f"[{owner}] expected position= or the position keywords {given}, not both")
    if position is None:
        return _legacy_schemes(legacy, causal, owner)
    items = position if isinstance(position, (tuple, list)) else (position,)
    schemes = []
    for item in items:
        if isinstance(item, str) and item in _NAMED:
            item = _NAMED[item]()
        if not isinstance(item, (Rotary, Alibi, T5Bias)):
            raise ValueError(f"[{owner}] expected position to be None, 'rotary', 'alibi', 't5', a Rotary, Alibi or "
                             f"T5Bias, or a tuple of them, got {item!r}")
        schemes.append(item)
    kinds = [type(s) for s in schemes]
    if len(set(kinds)) != len(kinds) or (Alibi in kinds and T5Bias in kinds):
        raise ValueError(f"[{owner}] expected at most one scheme of each kind and one bias (ALiBi or T5) in position, "
                         f"got {[k.__name__ for k in kinds]}")
    return tuple(schemes)
