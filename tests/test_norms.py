"""mlx_zeta.nn.norms against plain-torch references from the formulas, torch's own
rms_norm/layer_norm where the semantics coincide, hand values and invariances."""

import math

import mlx_zeta  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity import LOW_PRECISION, TORCH_DEVICE, assert_close, check_parity, to_numpy, to_torch

from mlx_zeta.nn.norms import LayerNorm, RMSNorm, ScaleNorm, SimpleRMSNorm
from reference.norms import LayerNormRef, RMSNormRef, ScaleNormRef, SimpleRMSNormRef

DIM = 32
DTYPES = [mx.float32] + LOW_PRECISION
LN_EPS = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 1e-3}


def _input(rng, shape=(2, 8, DIM), scale=1.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


def _randomise(module, rng):
    """Move learned gains off their init so their gradients and effect are visible."""
    for name in ("gamma", "g"):
        if name in module:
            setattr(module, name, mx.array(1.0 + 0.3 * rng.standard_normal(module[name].shape).astype(np.float32)))
    return module


def _pair(kind, dtype, stable=False, dim=DIM):
    if kind == "rms":
        return RMSNorm(dim), RMSNormRef(dim)
    if kind == "simple":
        return SimpleRMSNorm(dim), SimpleRMSNormRef(dim)
    if kind == "scale":
        return ScaleNorm(dim), ScaleNormRef(dim)
    return LayerNorm(dim, stable=stable), LayerNormRef(dim, eps=LN_EPS[dtype], stable=stable)


CASES = [("rms", False), ("simple", False), ("scale", False), ("layer", False), ("layer", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,stable", CASES, ids=[f"{k}{'-stable' if s else ''}" for k, s in CASES])
def test_parity_forward_and_grad(kind, stable, dtype, rng):
    mlx_mod, ref = _pair(kind, dtype, stable)
    _randomise(mlx_mod, rng)
    # offset 0.5 gives LayerNorm a non-zero mean to remove
    check_parity(mlx_mod, ref, [_input(rng, offset=0.5)], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_matches_torch_rms_norm(dtype, rng):
    # x / ||x|| * sqrt(d) == x / sqrt(mean(x^2)): torch's rms_norm with eps = 0 on non-zero rows
    norm = _randomise(RMSNorm(DIM), rng)
    norm.set_dtype(dtype)
    x = mx.array(_input(rng)).astype(dtype)
    expected = F.rms_norm(to_torch(x), (DIM,), weight=to_torch(norm.gamma), eps=0.0)
    assert_close(norm(x), expected, dtype)
    assert norm(x).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stable", [False, True])
def test_layernorm_matches_torch_layer_norm(stable, dtype, rng):
    norm = _randomise(LayerNorm(DIM, stable=stable), rng)
    norm.set_dtype(dtype)
    x = mx.array(_input(rng, offset=-2.0)).astype(dtype)
    t = to_torch(x)
    if stable:
        t = t / t.abs().amax(-1, keepdim=True)
    expected = F.layer_norm(t, (DIM,), weight=to_torch(norm.g), bias=None, eps=LN_EPS[dtype])
    assert_close(norm(x), expected, dtype)
    assert norm(x).dtype == dtype


def test_hand_computed_values():
    x = mx.array([3.0, 4.0])
    # ||[3, 4]|| = 5, so x / 5 * sqrt(2) = [0.6, 0.8] * 1.41421 = [0.848528, 1.131371]
    unit = np.array([0.6, 0.8]) * math.sqrt(2)
    assert_close(SimpleRMSNorm(2)(x), unit)
    # ScaleNorm's g starts at sqrt(2): same numbers
    assert_close(ScaleNorm(2)(x), unit)
    # RMSNorm with gamma = [1, 2]: [0.848528, 2.262742]
    rms = RMSNorm(2)
    rms.gamma = mx.array([1.0, 2.0])
    assert_close(rms(x), unit * np.array([1.0, 2.0]))
    # LayerNorm([1, 2, 3]): mean 2, biased var 2/3 -> [-1, 0, 1] / sqrt(2/3 + 1e-5) = [-1.224736, 0, 1.224736]
    assert_close(LayerNorm(3)(mx.array([1.0, 2.0, 3.0])), np.array([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3 + 1e-5))
    # stable: [1, 2, 3] / 3 has var 2/27 -> [-1, 0, 1] / 3 / sqrt(2/27 + 1e-5)
    assert_close(LayerNorm(3, stable=True)(mx.array([1.0, 2.0, 3.0])),
                 np.array([-1.0, 0.0, 1.0]) / 3 / math.sqrt(2 / 27 + 1e-5))


@pytest.mark.parametrize("cls", [RMSNorm, SimpleRMSNorm, ScaleNorm])
def test_rms_family_laws(cls, rng):
    norm = cls(DIM)
    x = mx.array(_input(rng))
    y = norm(x)
    # unit RMS at init: sqrt(mean(y^2)) == 1 per row
    assert_close(mx.sqrt(mx.mean(y * y, axis=-1)), np.ones((2, 8)))
    # invariance under a positive scale, equivariance under a sign flip
    assert_close(norm(7.5 * x), y)
    assert_close(norm(-x), -to_numpy(y))


@pytest.mark.parametrize("stable", [False, True])
def test_layernorm_laws(stable, rng):
    norm = LayerNorm(DIM, eps=1e-12, stable=stable)
    x = mx.array(_input(rng))
    y = norm(x)
    assert_close(mx.mean(y, axis=-1), np.zeros((2, 8)))
    assert_close(mx.mean(y * y, axis=-1), np.ones((2, 8)), scale=10)  # var of a unit-variance row, 32 terms in float32
    assert_close(norm(x + 3.0), y, scale=10)  # shift invariance; the shift costs ~2 bits of x's mantissa
    assert_close(norm(2.0 * x), y)
    # odd function; zeta's stable path divided by the signed max and flipped all-negative rows
    assert_close(norm(-x), -to_numpy(y))
    negative = -mx.abs(x)
    assert_close(norm(negative), LayerNorm(DIM, eps=1e-12)(negative), scale=10)


def test_layernorm_eps_follows_dtype():
    # a row of spread 0.02: var = 1e-4, comparable to fp16_eps, negligible against eps
    x = np.array([[0.0, 0.02]], dtype=np.float32)
    norm = LayerNorm(2, eps=1e-12, fp16_eps=1e-2)
    assert_close(norm(mx.array(x)), [[-1.0, 1.0]])
    # float16: 0.01 / sqrt(1e-4 + 1e-2) = 0.0995
    expected = np.array([[-1.0, 1.0]]) * 0.01 / math.sqrt(1e-4 + 1e-2)
    assert_close(norm(mx.array(x).astype(mx.float16)), expected, mx.float16)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind", ["rms", "simple", "scale", "layer"])
def test_large_inputs_stay_finite_in_half_precision(kind, dtype, rng):
    dim = 64
    x16 = mx.array(_input(rng, (2, 4, dim), scale=40.0, offset=300.0)).astype(dtype)
    if dtype == mx.float16:
        # the hazard is real: the float16 sum of squares (~5.8e6) overflows 65504
        assert mx.isinf(mx.sum(x16 * x16, axis=-1)).all().item()
    mlx_mod, ref = _pair(kind, dtype, dim=dim)
    mlx_mod.set_dtype(dtype)
    y = mlx_mod(x16)
    assert y.dtype == dtype and mx.isfinite(y).all().item()
    with torch.no_grad():
        assert_close(y, ref.to(TORCH_DEVICE)(to_torch(x16)), dtype)
    grad = mx.grad(lambda a: (mlx_mod(a).astype(mx.float32) ** 2).sum())(x16)
    assert mx.isfinite(grad).all().item()


@pytest.mark.parametrize("cls", [RMSNorm, SimpleRMSNorm, ScaleNorm, LayerNorm])
def test_zero_rows_are_safe(cls):
    norm = cls(8)
    x = mx.zeros((2, 8))
    assert_close(norm(x), np.zeros((2, 8)))
    grad = mx.grad(lambda a: norm(a).sum())(x)
    assert mx.isfinite(grad).all().item()


@pytest.mark.parametrize("cls", [RMSNorm, SimpleRMSNorm, ScaleNorm, LayerNorm])
def test_wrong_last_dim_raises(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"^\[{name}\] expected input with last dimension 64, got shape \(2, 5, 32\)"):
        cls(64)(mx.zeros((2, 5, 32)))
    with pytest.raises(ValueError, match=rf"^\[{name}\] expected input with last dimension 64, got shape \(\)"):
        cls(64)(mx.array(1.0))


@pytest.mark.parametrize("cls", [RMSNorm, SimpleRMSNorm, ScaleNorm, LayerNorm])
def test_bad_arguments_raise(cls):
    name = cls.__name__
    for dim in (0, -3, 2.5, None, True):
        with pytest.raises(ValueError, match=rf"^\[{name}\] dim must be a positive integer, got {dim!r}"):
            cls(dim)
    with pytest.raises(ValueError, match=rf"^\[{name}\] eps must be positive, got 0.0"):
        cls(8, eps=0.0)
    if cls is LayerNorm:
        with pytest.raises(ValueError, match=r"^\[LayerNorm\] fp16_eps must be positive, got -1"):
            LayerNorm(8, fp16_eps=-1)


def test_parameters_exist_only_where_learned():
    assert set(dict(RMSNorm(8).trainable_parameters())) == {"gamma"}
    assert dict(SimpleRMSNorm(8).trainable_parameters()) == {}
    assert ScaleNorm(8).g.shape == (1,) and ScaleNorm(8).g.item() == pytest.approx(math.sqrt(8))
    assert set(dict(LayerNorm(8).trainable_parameters())) == {"g"}
