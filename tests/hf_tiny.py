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


def lift_init(model, norm_markers=("norm",)) -> None:
    """Lift a tiny transformers init (std 0.02) in place so norms, biases and softmax all matter:
    biases and norm weights (a name containing one of ``norm_markers``, case-insensitive) get
    N(0, 0.1^2) noise added, every other parameter is multiplied by 5."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(m in name.lower() for m in norm_markers):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5.0)


def check_sanitize(conv, path: Path, raw: dict | None = None) -> dict:
    """``conv.sanitize`` of the checkpoint in ``path`` is pure (its input untouched), idempotent (a
    second pass returns the very same arrays) and yields exactly ``conv.build``'s parameter names.
    ``conv`` is a converter module; ``raw`` the loaded weights if not the file's as they are.
    Returns the sanitized dict."""
    import json

    from mlx.utils import tree_flatten

    from mlx_zeta.converters import load_state_dict

    args = conv.ModelArgs.from_dict(json.loads((Path(path) / "config.json").read_text()))
    raw = load_state_dict(path) if raw is None else raw
    before = dict(raw)
    once = conv.sanitize(raw, args)
    twice = conv.sanitize(once, args)
    assert raw.keys() == before.keys() and all(raw[k] is before[k] for k in raw), "sanitize changed its input"
    assert once.keys() == twice.keys() and all(once[k] is twice[k] for k in once), "sanitize is not idempotent"
    assert set(once) == {k for k, _ in tree_flatten(conv.build(args).parameters())}
    return once


def to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return x.detach().float().numpy()


# Gradients against transformers in float32, relative to each tensor's own scale (its largest
# |entry|): measured max |diff| / scale 2.6e-7 to 1.1e-5 over the 36 tensors of the BERT, Qwen3, T5
# (both cases), GPT-2 and ViT checks (summation order only); a 0.5% error in one tensor (5e-3) is 50x
# over the bound. (The floor of 1.0 it replaces let any error below 1e-4 pass, 5% of a gradient of 2e-3.)
GRAD_RTOL = 1e-4


def assert_grads_close(grads: dict, pairs, rel: float = GRAD_RTOL) -> float:
    """Each ``(our parameter name, torch gradient)`` pair: max |diff| <= ``rel * scale``, ``scale``
    the reference gradient's own largest entry, which must be non-zero (a zero gradient would make
    any bound vacuous or impossible). Returns the largest max |diff| / scale seen."""
    worst = 0.0
    for name, ref in pairs:
        ref = to_numpy(ref)
        scale = float(np.abs(ref).max())
        err = float(np.abs(to_numpy(grads[name]) - ref).max())
        assert scale > 0, f"{name}: the reference gradient is zero"
        assert err <= rel * scale, f"{name}: max |diff| {err:.3g} vs grad scale {scale:.3g} (rel {err / scale:.3g})"
        worst = max(worst, err / scale)
    return worst


def assert_close(ours, ref, dtype: str = "float32", what: str = "output") -> float:
    """Max abs difference within the tolerance for ``dtype``; returns it (for the report)."""
    a, b = to_numpy(ours), to_numpy(ref)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs reference {b.shape}"
    err = float(np.abs(a - b).max())
    tol = ATOL[dtype] if dtype == "float32" else RTOL_OF_MAX[dtype] * float(np.abs(b).max())
    assert err <= tol, f"{what} ({dtype}): max |diff| {err:.3g} > {tol:.3g}"
    return err
