"""Malformed-input corpus (tests/badinput.py) for the kernel settings and fused_attention's masks
and options: each bad input gets a one-line error naming the setting or argument at fault."""

import mlx_zeta  # noqa: F401
import pytest

import mlx.core as mx

from badinput import api_error
from mlx_zeta.kernels import dispatch, fused_attention, use_kernels

Q = mx.zeros((1, 2, 3, 64))
KV = mx.zeros((1, 1, 5, 64))


def enter(**kwargs):
    with use_kernels(**kwargs):
        pass


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_strict_environment_variable(monkeypatch, value):
    monkeypatch.setenv(dispatch.STRICT_ENV_VAR, value)
    api_error(ValueError, dispatch.kernel_strict, names=("$MLX_ZETA_KERNELS_STRICT", repr(value)),
              pattern="expected .* to be 0 or 1")


def test_strict_environment_variable_is_read_at_the_first_device_call(monkeypatch):
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "metal")
    monkeypatch.setenv(dispatch.STRICT_ENV_VAR, "on")
    api_error(ValueError, dispatch.resolve, names=("$MLX_ZETA_KERNELS_STRICT", "'on'"))


@pytest.mark.parametrize("value", ["yes", 1])
def test_strict_argument(value):
    api_error(ValueError, enter, strict=value, names=("strict", repr(value)), pattern="True, False or None")


def test_mode_argument_with_strict():
    api_error(ValueError, enter, mode="metal", strict=True, names=("mode", "'metal'", "'emulate'"))


@pytest.mark.parametrize("mask,says", [
    (mx.ones((5,), mx.bool_), r"got shape \(5,\)"),                     # 1-D: a key-padding vector needs (1, 5) or (B, 1, 1, 5)
    (mx.ones((1, 1, 1, 3, 5), mx.bool_), r"got shape \(1, 1, 1, 3, 5\)"),  # 5-D
    (mx.ones((3, 4), mx.bool_), r"got shape \(3, 4\)"),                 # wrong key length
    (mx.ones((3, 5), mx.int32), "dtype mlx.core.int32"),               # integer, neither keep nor additive
])
def test_fused_attention_masks(mask, says):
    api_error(ValueError, fused_attention, Q, KV, KV, mask=mask, names=("[fused_attention]", "mask", "(1, 2, 3, 5)"),
              pattern=says)


@pytest.mark.parametrize("option,value", [("softcap", -1.0), ("softcap", 0.0), ("window", 0), ("window", 2.5)])
def test_fused_attention_options(option, value):
    api_error(ValueError, fused_attention, Q, KV, KV, **{option: value}, names=("[fused_attention]", option))
