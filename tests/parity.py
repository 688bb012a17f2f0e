"""Parity harness: run an mlx_zeta block and an independent torch reference on the
same weights and inputs, then compare outputs and gradients.

The torch device is a parameter: ``cpu`` by default, ``cuda`` when present (or
whatever ``MLX_ZETA_TORCH_DEVICE`` names), so on a GPU machine the same suite is
a set of CUDA parity tests.

Low precision: the MLX block runs in ``dtype`` (its weights and inputs rounded to
``dtype``); the torch reference runs in float32 on those same rounded values. The
difference is then the error of computing in ``dtype``, bounded by TOLERANCES.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_flatten

TORCH_DEVICE = os.environ.get("MLX_ZETA_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")

# Stated tolerances, on |actual - expected| <= atol + rtol * |expected|.
# float32: both sides compute in float32, differences are summation order only.
# float16: 11-bit mantissa, eps ~ 1e-3; a few roundings of intermediates per output.
# bfloat16: 8-bit mantissa, eps ~ 8e-3.
TOLERANCES = {
    mx.float32: dict(rtol=1e-5, atol=1e-5),
    mx.float16: dict(rtol=1e-2, atol=1e-2),
    mx.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
LOW_PRECISION = [mx.float16, mx.bfloat16]

ParamSpec = Union[str, Tuple[str, Callable[[np.ndarray], np.ndarray]]]


def to_numpy(a: mx.array) -> np.ndarray:
    """float64 numpy copy of an MLX array (bfloat16 included)."""
    if a.dtype in (mx.bfloat16, mx.float16):
        a = a.astype(mx.float32)
    return np.array(a).astype(np.float64)


def to_torch(a: Union[mx.array, np.ndarray], device: str = TORCH_DEVICE, requires_grad: bool = False) -> torch.Tensor:
    """float32 torch copy (floating arrays) or exact copy (int/bool arrays)."""
    if isinstance(a, mx.array):
        if a.dtype in (mx.bfloat16, mx.float16):
            a = a.astype(mx.float32)
        a = np.array(a)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_floating_point():
        t = t.float()
    t = t.to(device)
    return t.requires_grad_(requires_grad) if t.is_floating_point() else t


def rounded(x: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """An MLX array of ``x`` in ``dtype`` (floating inputs only are cast)."""
    a = mx.array(x)
    return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a


def assert_close(actual, expected, dtype: mx.Dtype = mx.float32, what: str = "output", scale: float = 1.0) -> None:
    """Compare an MLX result to a torch/numpy reference under the dtype's tolerance.

    ``scale`` widens both tolerances for quantities that sum many terms (stated at the call).
    """
    a = to_numpy(actual) if isinstance(actual, mx.array) else np.asarray(actual, dtype=np.float64)
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().cpu().double().numpy()
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference {e.shape}"
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(a, e, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale, err_msg=f"{what} ({dtype})")


def copy_params(mlx_module: nn.Module, torch_module: torch.nn.Module, param_map: Optional[Dict[str, ParamSpec]] = None) -> Dict[str, ParamSpec]:
    """Copy every trainable MLX parameter into the torch module; return the full map used.

    ``param_map`` maps an MLX parameter name (``"layers.0.weight"``) to a torch name,
    or to ``(torch_name, layout)`` where ``layout`` converts the MLX array to torch's
    layout (e.g. conv weights (O, kh, kw, I) -> (O, I, kh, kw)). Unmapped names are the same
    on both sides. Every torch parameter must receive a value.
    """
    param_map = dict(param_map or {})
    torch_params = dict(torch_module.named_parameters())
    filled = set()
    full = {}
    for name, value in tree_flatten(mlx_module.trainable_parameters()):
        spec = param_map.get(name, name)
        tname, layout = (spec, None) if isinstance(spec, str) else spec
        if tname not in torch_params:
            raise KeyError(f"MLX parameter {name!r} maps to torch {tname!r}, which the reference lacks: {sorted(torch_params)}")
        arr = to_numpy(value)
        if layout is not None:
            arr = layout(arr)
        target = torch_params[tname]
        if tuple(target.shape) != arr.shape:
            raise ValueError(f"{name!r} -> {tname!r}: MLX shape {arr.shape} vs torch {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(arr).to(target))
        filled.add(tname)
        full[name] = (tname, layout)
    missing = set(torch_params) - filled
    if missing:
        raise KeyError(f"torch reference parameters never filled from MLX: {sorted(missing)}")
    return full


def check_parity(
    mlx_module: nn.Module,
    torch_module: torch.nn.Module,
    inputs: Sequence[np.ndarray],
    *,
    dtype: mx.Dtype = mx.float32,
    device: str = TORCH_DEVICE,
    param_map: Optional[Dict[str, ParamSpec]] = None,
    mlx_call: Optional[Callable] = None,
    torch_call: Optional[Callable] = None,
    grad_inputs: Optional[Sequence[int]] = None,
    scale: float = 1.0,
    grad_scale: float = 1.0,
    seed: int = 0,
) -> None:
    """Forward and backward parity of ``mlx_module`` against ``torch_module``.

    ``mlx_call(module, *mx_inputs)`` and ``torch_call(module, *torch_inputs)`` default
    to calling the module on the inputs. Gradients of ``sum(out * g)`` with a fixed
    random cotangent ``g`` are compared for every trainable parameter and for the
    floating inputs listed in ``grad_inputs`` (default: all floating inputs).
    """
    mlx_call = mlx_call or (lambda m, *xs: m(*xs))
    torch_call = torch_call or (lambda m, *xs: m(*xs))
    mlx_module.set_dtype(dtype)
    mapping = copy_params(mlx_module, torch_module, param_map)
    torch_module.to(device)

    floating = [i for i, x in enumerate(inputs) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    grad_inputs = floating if grad_inputs is None else list(grad_inputs)
    mx_inputs = [rounded(x, dtype) for x in inputs]
    t_inputs = [to_torch(x, device, requires_grad=i in grad_inputs) for i, x in enumerate(mx_inputs)]

    t_out = torch_call(torch_module, *t_inputs)
    m_out = mlx_call(mlx_module, *mx_inputs)
    assert_close(m_out, t_out, dtype, "forward", scale)

    cotangent = np.random.default_rng(seed).standard_normal(t_out.shape).astype(np.float32)
    (t_out * torch.from_numpy(cotangent).to(device)).sum().backward()

    g = mx.array(cotangent).astype(dtype)

    def loss(params, *xs):
        mlx_module.update(params)
        return (mlx_call(mlx_module, *xs).astype(mx.float32) * g.astype(mx.float32)).sum()

    argnums = tuple([0] + [1 + i for i in grad_inputs])
    grads = mx.grad(loss, argnums=argnums)(mlx_module.trainable_parameters(), *mx_inputs)
    if len(argnums) == 1:  # mx.grad returns the bare gradient, not a 1-tuple
        grads = (grads,)
    t_params = dict(torch_module.named_parameters())
    for name, value in tree_flatten(grads[0]):
        tname, layout = mapping[name]
        arr = to_numpy(value)
        if layout is not None:
            arr = layout(arr)
        assert t_params[tname].grad is not None, f"torch reference got no gradient for {tname}"
        assert_close(arr, t_params[tname].grad, dtype, f"grad of {name}", grad_scale)
    for k, i in enumerate(grad_inputs):
        assert_close(grads[1 + k], t_inputs[i].grad, dtype, f"grad of input {i}", grad_scale)
