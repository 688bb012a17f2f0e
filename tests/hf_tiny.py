"""Tiny Hugging Face checkpoints made in the tests (random weights, ``save_pretrained`` to a
temporary folder) and the comparisons the converter tests share. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import mlx.core as mx

# Stated tolerances for converted models against transformers in float32 (the 1e-4),
# and for half precisions relative to the largest reference magnitude: one half-precision
# rounding per op through a few layers (float16 eps 9.8e-4, bfloat16 eps 7.8e-3).
ATOL = {"float32": 1e-4}
RTOL_OF_MAX = {"float16": 2e-2, "bfloat16": 8e-2}


def save_hf(model, folder: Path) -> Path:
    """``model.save_pretrained(folder)`` (safetensors) and the folder back."""
    model.save_pretrained(str(folder))
    return Path(folder)


def seeded(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def to_numpy(x) -> np.ndarray:
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return x.detach().float().numpy()


def assert_close(ours, ref, dtype: str = "float32", what: str = "output") -> float:
    """Max abs difference within the tolerance for ``dtype``; returns it (for the report)."""
    a, b = to_numpy(ours), to_numpy(ref)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs reference {b.shape}"
    err = float(np.abs(a - b).max())
    tol = ATOL[dtype] if dtype == "float32" else RTOL_OF_MAX[dtype] * float(np.abs(b).max())
    assert err <= tol, f"{what} ({dtype}): max |diff| {err:.3g} > {tol:.3g}"
    return err
