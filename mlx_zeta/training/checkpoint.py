"""Training checkpoints: model weights, optimizer state, step, RNG state and config,
written atomically (no pickle: safetensors and JSON only).

Layout of a checkpoint root ``directory``::

    directory/
        latest                  # one line: the name of the newest complete checkpoint
        ckpt-00000100/
            model.safetensors       # tree_flatten(model.parameters()), or only the trainable ones
            optimizer.safetensors   # tree_flatten(optimizer.state): moments, step, learning rate
            meta.json               # step, config, extra, RNG key, size and sha256 of each file
        ckpt-00000200/ ...

Atomicity: a checkpoint is written through :func:`mlx_zeta.common.atomic_path`: into a
hidden staging folder beside the others, every file and the folder fsynced, then renamed
to ``ckpt-<step>`` (a rename within one file system is atomic). Only then is the
``latest`` pointer replaced, itself through a fsynced staged file and ``os.replace``.
Old checkpoints beyond ``keep`` are deleted last. At every instant ``latest`` therefore
names a complete checkpoint: a process killed mid-write leaves at most a staging
folder, which readers never look at and the next save removes.

    >>> import mlx.nn as nn
    >>> import mlx.optimizers as optim
    >>> from mlx_zeta.training import load_checkpoint, save_checkpoint
    >>> model, optimizer = nn.Linear(4, 2), optim.Adam(learning_rate=1e-3)
    >>> optimizer.init(model.trainable_parameters())
    >>> save_checkpoint("runs/a", model, optimizer, step=100, config={"dim": 64}).name
    'ckpt-00000100'
    >>> info = load_checkpoint("runs/a", model, optimizer)
    >>> info["step"], info["config"]
    (100, {'dim': 64})

``trainable_only=True`` stores ``model.trainable_parameters()`` alone (adapters on a frozen base:
megabytes instead of the whole model); ``meta.json`` records it and loading then checks and restores
exactly the model's trainable parameters, the frozen ones being the caller's (the same base model).
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_zeta.common import atomic_path, check_int, check_keys, remove_stale

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "CheckpointError"]

FORMAT = 1
LATEST = "latest"
MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.safetensors", "meta.json"
_NAME = re.compile(r"^ckpt-(\d+)(?:\.(\d+))?$")

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_arrays(path: Path, arrays: Dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), arrays)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _order(name: str):
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0))


def _checkpoints(root: Path):
    """Complete checkpoint directories under ``root``, oldest first."""
    names = [p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)] if root.is_dir() else []
    return [root / n for n in sorted(names, key=_order)]


def save_checkpoint(directory: PathLike, model: nn.Module, optimizer: optim.Optimizer, step: int,
                    config: Dict[str, Any], extra: Optional[Dict[str, Any]] = None, keep: int = 3,
                    trainable_only: bool = False) -> Path:
    """Write checkpoint ``step`` under ``directory`` atomically and point ``latest`` at it.

    Args:
        directory (str or os.PathLike): checkpoint root (created if missing).
        model (nn.Module): its ``parameters()`` are saved.
        optimizer (mlx.optimizers.Optimizer): its ``state`` (moments, step counter, learning rate) is saved.
        step (int): training step, part of the checkpoint's name.
        config (dict): JSON-serialisable run configuration.
        extra (dict, optional): more JSON-serialisable state (data position, best loss, ...).
        keep (int): newest checkpoints kept; older ones are deleted after the write. Default: ``3``.
        trainable_only (bool): save ``model.trainable_parameters()`` only (see the module docstring).
            Default: ``False``.

    Returns:
        The path of the new checkpoint directory.
    """
    check_int("save_checkpoint", "step", step, 0)
    check_int("save_checkpoint", "keep", keep, 1)
    meta_json = {"config": config, "extra": extra or {}}
    try:
        json.dumps(meta_json)
    except (TypeError, ValueError) as e:
        raise ValueError(f"[save_checkpoint] expected JSON-serialisable config and extra: {e}") from None
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)  # left by a writer that died (one writer per root)

    weights = dict(tree_flatten(_saved_parameters(model, trainable_only)))
    opt_state = dict(tree_flatten(optimizer.state))
    bad = sorted(k for k, v in opt_state.items() if not isinstance(v, mx.array))
    if bad:
        raise ValueError(f"[save_checkpoint] expected only arrays in optimizer.state, got other values at {bad}")
    rng_key = [int(v) for v in mx.random.state[0].tolist()]  # (2,) uint32
    mx.eval(weights, opt_state)

    name = f"ckpt-{step:08d}"
    n = 0
    while (root / name).exists():  # the same step saved again: a new name, the old one stays valid
        n += 1
        name = f"ckpt-{step:08d}.{n}"
    with atomic_path(root / name, folder=True) as tmp:
        _write_arrays(tmp / MODEL_FILE, weights)
        _write_arrays(tmp / OPTIMIZER_FILE, opt_state)
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                 for f in (MODEL_FILE, OPTIMIZER_FILE)}
        _write_json(tmp / META_FILE, {"format": FORMAT, "step": step, "rng_key": rng_key, "files": files,
                                       "trainable_only": bool(trainable_only), **meta_json})
    with atomic_path(root / LATEST) as pointer:
        pointer.write_text(name + "\n")

    others = [p for p in _checkpoints(root) if p.name != name]
    for old in others[:max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def _saved_parameters(model: nn.Module, trainable_only: bool) -> dict:
    """The parameter tree a checkpoint holds: all of ``model``'s, or its trainable ones."""
    return model.trainable_parameters() if trainable_only else model.parameters()


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The checkpoint that ``directory/latest`` names, or None when there is none yet."""
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not _NAME.match(name):
        raise CheckpointError(f"[load_checkpoint] {pointer} is corrupt: expected a checkpoint name, got {name!r}")
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"[load_checkpoint] {pointer} names {name}, but {path} does not exist")
    return path


def _read_arrays(path: Path, expected: Dict[str, Any]) -> Dict[str, mx.array]:
    if not path.is_file():
        raise CheckpointError(f"[load_checkpoint] missing file {path}")
    size = path.stat().st_size
    if size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
        raise CheckpointError(f"[load_checkpoint] {path} is corrupt: its size or sha256 differs from meta.json "
                              f"(expected {expected.get('bytes')} bytes, found {size})")
    try:
        arrays = mx.load(str(path), format="safetensors")
    except Exception as e:  # noqa: BLE001  (MLX raises several types for a malformed file)
        raise CheckpointError(f"[load_checkpoint] cannot read {path} as safetensors: {e}") from None
    return arrays


def load_checkpoint(directory: PathLike, model: nn.Module, optimizer: Optional[optim.Optimizer] = None) -> Dict[str, Any]:
    """Restore model weights, optimizer state and MLX's global RNG state.

    Args:
        directory (str or os.PathLike): a checkpoint root (its ``latest`` is loaded) or one
            ``ckpt-<step>`` directory.
        model (nn.Module): receives the weights; keys and shapes must match exactly (its trainable
            parameters' when the checkpoint was saved with ``trainable_only=True``).
        optimizer (mlx.optimizers.Optimizer, optional): receives the saved state.

    Returns:
        ``{"step": int, "config": dict, "extra": dict, "path": Path}``.
    """
    given = Path(directory)
    path = given if (given / META_FILE).exists() else latest_checkpoint(given)
    if path is None:
        raise CheckpointError(f"[load_checkpoint] no checkpoint in {given} (no {given / LATEST} and no {META_FILE})")
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        step, files, rng_key = meta["step"], meta["files"], meta["rng_key"]
    except FileNotFoundError:
        raise CheckpointError(f"[load_checkpoint] missing file {meta_path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"[load_checkpoint] {meta_path} is corrupt: {e!r}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"[load_checkpoint] {meta_path}: expected format {FORMAT}, got {meta.get('format')!r}")

    weights = _read_arrays(path / MODEL_FILE, files.get(MODEL_FILE, {}))
    current = dict(tree_flatten(_saved_parameters(model, meta.get("trainable_only") is True)))
    try:  # names and shapes, listed as the converters list them
        check_keys({k: v.shape for k, v in current.items()}, weights, where=f"load_checkpoint {path / MODEL_FILE}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for k, v in current.items():
        if v.dtype != weights[k].dtype:
            raise CheckpointError(f"[load_checkpoint] {path / MODEL_FILE}: {k} expected dtype {v.dtype}, "
                                  f"found {weights[k].dtype}")
    opt_arrays = _read_arrays(path / OPTIMIZER_FILE, files.get(OPTIMIZER_FILE, {})) if optimizer is not None else None

    model.update(tree_unflatten(list(weights.items())))
    if optimizer is not None:
        optimizer.state = tree_unflatten(list(opt_arrays.items()))
    mx.random.seed((int(rng_key[0]) << 32) | int(rng_key[1]))
    mx.eval(model.parameters(), optimizer.state if optimizer is not None else [])
    return {"step": step, "config": meta.get("config", {}), "extra": meta.get("extra", {}), "path": path}
