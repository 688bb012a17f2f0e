"""Atomic writes: stage beside the target, fsync, then move into place with one rename.

Every writer of the project (converted checkpoints, training checkpoints, Core ML
packages, compiled emulator programs) goes through :func:`atomic_path`::

    with atomic_path("out/model.safetensors") as staged:
        mx.save_safetensors(str(staged), weights)   # staged keeps the target's name

The staged path lives in a hidden folder ``.<name>.tmp-<pid>-<hex>`` beside the target,
so it is on the same file system and keeps the target's file name (writers that add or
check an extension see the one they expect). When the block returns, every staged file
and folder is fsynced and moved onto the target; when it raises, the staging folder is
removed and the target is as it was. A process killed mid-write leaves only the hidden
staging folder, which :func:`remove_stale` clears.
"""

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Union

__all__ = ["atomic_path", "remove_stale", "fsync_tree", "read_json_object"]

PathLike = Union[str, os.PathLike]

_STAGING = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]{8}$")


def _hidden(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """Flush a file, or every file and folder under a folder, to disk."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        if not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        return
    for top, _, names in os.walk(path, topdown=False):
        for name in names:
            fsync_tree(Path(top, name))
        _fsync_dir(Path(top))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _move(staged: Path, target: Path) -> None:
    """Put ``staged`` at ``target``: a rename when ``target`` is absent, ``os.replace`` over a
    file, and over a folder (or a file over a folder, or back) by moving the old one aside first."""
    if not _exists(target):
        os.rename(staged, target)
        return
    if staged.is_dir() or (target.is_dir() and not target.is_symlink()):
        aside = _hidden(target, "old")
        os.rename(target, aside)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _remove(aside)
        return
    os.replace(staged, target)


def _merge(staged: Path, target: Path, order: Sequence[str]) -> None:
    names = [n for n in order if _exists(staged / n)]
    names += sorted(n for n in os.listdir(staged) if n not in names)
    for name in names:
        _move(staged / name, target / name)
    _fsync_dir(target)


@contextmanager
def atomic_path(path: PathLike, *, folder: bool = False, merge: bool = False,
                order: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging path for ``path``; move what the block wrote there onto ``path``.

    On success the staged file or folder is fsynced and renamed onto ``path`` (``os.rename``
    when ``path`` is absent, ``os.replace`` over a file; an existing folder is moved aside,
    the new one renamed in, the old one removed). On an exception nothing of the staged write
    remains and ``path`` is untouched. Parent folders are created.

    Args:
        path (str or os.PathLike): the file or folder to write.
        folder (bool): create the staged path as an empty folder. Default: ``False`` (the
            block creates a file or a folder there itself).
        merge (bool): with ``folder``, when ``path`` is an existing folder, move each staged
            entry into it (each move atomic) instead of replacing the folder, so files of
            ``path`` the block did not write stay. Default: ``False``.
        order (Sequence[str]): with ``merge``, the names moved first, in this order; the
            rest follow sorted. Read when the block ends, so a list the block appends to works.

    Yields:
        The staging path, with the same name as ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    home = _hidden(target, "tmp")
    home.mkdir()
    staged = home / target.name
    try:
        if folder:
            staged.mkdir()
        yield staged
        if not _exists(staged):
            raise FileNotFoundError(f"[atomic_path] expected the block to write {staged}, found nothing")
        fsync_tree(staged)
        if merge and target.is_dir() and not target.is_symlink():
            _merge(staged, target, order)
        else:
            _move(staged, target)
        _fsync_dir(target.parent)
    finally:
        _remove(home)


def remove_stale(folder: PathLike) -> List[Path]:
    """Remove the staging leftovers of dead writers in ``folder`` (for roots with one writer);
    returns what was removed."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _STAGING.match(p.name)] if folder.is_dir() else []
    for p in stale:
        _remove(p)
    return stale


def read_json_object(path: PathLike, owner: str) -> Dict[str, Any]:
    """The JSON object (a dict) in the file ``path``; one-line errors prefixed ``[owner]`` naming it:
    ``FileNotFoundError`` when it is missing, ``ValueError`` when it is unreadable, not UTF-8 JSON or
    not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"[{owner}] expected {path}, not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"[{owner}] {path}: expected JSON, got a parse error ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"[{owner}] {path}: expected a JSON object, got {type(data).__name__}")
    return data
