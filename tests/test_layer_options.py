"""norm= and position= of AttentionLayers (mlx_zeta/structs/layer_options.py): parity with the
torch reference built from zeta's / x-transformers' keywords, the same parameters and outputs
as those keywords (which stay accepted), deprecation of norm_factory, and option errors."""

import warnings

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from parity import assert_close, check_parity
from reference.structs import TorchAttentionLayers

from mlx_zeta.nn import RMSNorm, ScaleNorm
from mlx_zeta.structs import Alibi, AttentionLayers, Decoder, Rotary, T5Bias

DIM, B, N = 32, 2, 10

# name: (new-style options, the zeta / x-transformers keywords the torch reference takes)
CASES = {
    "rotary_rmsnorm": (dict(causal=True, norm=RMSNorm, position="rotary"),
                       dict(causal=True, use_rmsnorm=True, rotary_pos_emb=True)),
    "rotary_options_scalenorm": (dict(causal=True, norm=ScaleNorm, position=Rotary(dim=4, xpos=True, xpos_scale_base=16,
                                                                                   base=500.0)),
                                 dict(causal=True, use_scalenorm=True, rotary_pos_emb=True, rotary_emb_dim=4,
                                      rotary_xpos=True, rotary_xpos_scale_base=16, rotary_base=500.0)),
    "alibi_post_norm": (dict(causal=True, position="alibi", pre_norm=False), dict(causal=True, alibi_pos_bias=True,
                                                                                   pre_norm=False)),
    "t5_encoder": (dict(position=T5Bias(num_buckets=8, max_distance=16)),
                   dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_new_options_match_torch_reference(rng, case):
    new, legacy = CASES[case]
    x = rng.standard_normal((B, N, DIM)).astype(np.float32)
    check_parity(AttentionLayers(dim=DIM, depth=2, heads=4, **new), TorchAttentionLayers(dim=DIM, depth=2, heads=4, **legacy),
                 [x], grad_scale=3)


@pytest.mark.parametrize("case", list(CASES))
def test_legacy_keywords_build_the_same_stack(rng, case):
    """The old keywords give the same parameter names and, with the same weights, the same output."""
    new, legacy = CASES[case]
    a, b = AttentionLayers(dim=DIM, depth=2, heads=4, **new), AttentionLayers(dim=DIM, depth=2, heads=4, **legacy)
    assert [k for k, _ in tree_flatten(a.parameters())] == [k for k, _ in tree_flatten(b.parameters())]
    b.update(a.parameters())
    x = mx.array(rng.standard_normal((B, N, DIM)).astype(np.float32))
    assert_close(a(x), b(x), what="position=/norm= vs keywords")


def test_rotary_with_partial_alibi_tuple(rng):
    """A tuple combines rotary angles with ALiBi on the first heads (PaLM-E's decoder), as the
    keywords rotary_pos_emb + alibi_pos_bias + alibi_num_heads do."""
    a = Decoder(dim=DIM, depth=1, heads=4, position=(Rotary(), Alibi(num_heads=2)))
    b = Decoder(dim=DIM, depth=1, heads=4, rotary_pos_emb=True, alibi_pos_bias=True, alibi_num_heads=2)
    assert a.alibi.heads == 2 and "rotary" in a and a.disable_abs_pos_emb
    b.update(a.parameters())
    x = mx.array(rng.standard_normal((B, N, DIM)).astype(np.float32))
    assert_close(a(x), b(x), what="rotary + partial ALiBi")


def test_norm_callable_with_eps_and_deprecated_norm_factory():
    make = lambda d: nn.RMSNorm(d, eps=1e-6)  # noqa: E731
    layers = Decoder(dim=DIM, depth=2, heads=4, norm=make)
    norms = [m for _, m in layers.named_modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(n.eps == 1e-6 for n in norms)
    assert isinstance(AttentionLayers(dim=DIM, depth=1).final_norm, nn.LayerNorm)  # default
    with pytest.warns(DeprecationWarning, match=r"^\[Decoder\] norm_factory is deprecated; pass the same callable as norm="):
        Decoder(dim=DIM, depth=1, norm_factory=make)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the x-transformers aliases are accepted without a warning
        Decoder(dim=DIM, depth=1, use_rmsnorm=True, rotary_pos_emb=True)


def test_option_errors():
    def err(match, **kw):
        with pytest.raises(ValueError, match=match) as info:
            AttentionLayers(**{"dim": DIM, "depth": 1, "heads": 4, **kw})
        assert "\n" not in str(info.value)

    err(r"^\[AttentionLayers\] expected at most one of use_rmsnorm, use_scalenorm, norm_factory, norm, got "
        r"use_rmsnorm=True, .* norm=set", norm=RMSNorm, use_rmsnorm=True)
    err(r"^\[AttentionLayers\] expected norm to be a class or callable \(dim -> nn.Module\), got str", norm="rms")
    err(r"^\[AttentionLayers\] expected position= or the position keywords \['rotary_base', 'rotary_pos_emb'\], "
        r"not both", position="rotary", rotary_pos_emb=True, rotary_base=500.0)
    err(r"^\[AttentionLayers\] expected position to be None, 'rotary', 'alibi', 't5', .* got 'xpos'", position="xpos")
    err(r"^\[AttentionLayers\] expected at most one scheme of each kind and one bias \(ALiBi or T5\) in position, "
        r"got \['Alibi', 'T5Bias'\]", position=("alibi", "t5"))
    err(r"got \['Rotary', 'Rotary'\]", position=("rotary", Rotary(dim=2)))
    err(r"^\[AttentionLayers\] expected rotary_pos_emb=True and causal=True with rotary_xpos .* causal=False",
        position=Rotary(xpos=True))
    err(r"^\[AttentionLayers\] expected 1 <= alibi_num_heads <= heads=4, got 5", position=Alibi(num_heads=5))
    err(r"^\[AttentionLayers\] expected no self-attention position options with only_cross=True", cross_attend=True,
        only_cross=True, position="t5")
    err(r"^\[AttentionLayers\] unknown option\(s\) \['rotary_bogus'\]; .*; zeta / x-transformers aliases: "
        r"\['alibi_num_heads', 'alibi_pos_bias', 'norm_factory'", rotary_bogus=1)
    # keywords set to their "off" values are no conflict with position=
    AttentionLayers(dim=DIM, depth=1, position="alibi", rotary_pos_emb=False, alibi_num_heads=None)
