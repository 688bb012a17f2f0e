"""Tests for mlx_zeta.common: the argument checks and the atomic-write helper."""

import math
import os
import re

import pytest

from mlx_zeta.common import atomic_path, check_choice, check_int, check_int_pair, check_positive, is_int, remove_stale
from mlx_zeta.common import files as files_mod


def _raises(message, fn, *args, **kwargs):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        fn(*args, **kwargs)


# --------------------------------------------------------------------------- checks


def test_check_int_messages():
    _raises("[Owner] expected n to be an int >= 1, got 0", check_int, "Owner", "n", 0, 1)
    _raises("[Owner] expected n to be an int >= -2, got -3", check_int, "Owner", "n", -3, -2)
    _raises("[Owner] expected n to be an int <= 4, got 5", check_int, "Owner", "n", 5, high=4)
    _raises("[Owner] expected n to be an int in [1, 4], got 5", check_int, "Owner", "n", 5, 1, 4)
    _raises("[Owner] expected n to be an int, got 0.5", check_int, "Owner", "n", 0.5)
    _raises("[Owner] expected n to be None or an int >= 1, got 0", check_int, "Owner", "n", 0, 1, optional=True)
    _raises("[Owner] expected n to be None or an int, got 'x'", check_int, "Owner", "n", "x", optional=True)
    _raises("[Owner] expected n to be an int >= 1, got None", check_int, "Owner", "n", None, 1)
    _raises("[Owner] n must be a positive integer, got 0", check_int, "Owner", "n", 0, 1,
            says="n must be a positive integer")


def test_check_int_accepts_and_returns():
    assert check_int("O", "n", 3, 1) == 3
    assert check_int("O", "n", 1, 1, 1) == 1
    assert check_int("O", "n", -7) == -7
    assert check_int("O", "n", None, 1, optional=True) is None


@pytest.mark.parametrize("flag", [True, False])
def test_check_int_rejects_bool(flag):
    # True == 1 and False == 0 are ints to Python; as a width or a count they are a mistake
    _raises(f"[O] expected n to be an int >= 0, got {flag}", check_int, "O", "n", flag, 0)
    _raises(f"[O] expected n to be an int, got {flag}", check_int, "O", "n", flag)
    assert not is_int(flag) and is_int(1) and not is_int(1.0)


def test_check_positive():
    assert check_positive("O", "eps", 1e-5) == 1e-5 and check_positive("O", "eps", 2) == 2
    assert check_positive("O", "eps", None, optional=True) is None
    assert check_positive("O", "eps", math.inf) == math.inf  # as the hand-written `not eps > 0` allowed
    _raises("[O] expected eps > 0, got 0.0", check_positive, "O", "eps", 0.0)
    _raises("[O] expected eps > 0, got -1", check_positive, "O", "eps", -1)
    _raises("[O] expected eps > 0, got nan", check_positive, "O", "eps", math.nan)
    _raises("[O] expected eps > 0, got True", check_positive, "O", "eps", True)
    _raises("[O] expected eps > 0, got '1'", check_positive, "O", "eps", "1")
    _raises("[O] expected eps > 0 or None, got 0", check_positive, "O", "eps", 0, optional=True)
    _raises("[O] eps must be positive, got 0", check_positive, "O", "eps", 0, says="eps must be positive")


def test_check_choice():
    assert check_choice("O", "mode", "a", ("a", "b")) == "a"
    assert check_choice("O", "bits", 4, (2, 4, 8)) == 4
    assert check_choice("O", "bits", None, (2, 4), optional=True) is None
    assert check_choice("O", "flag", True, (True, "auto")) is True
    _raises("[O] expected mode in ('a', 'b'), got 'c'", check_choice, "O", "mode", "c", ("a", "b"))
    _raises("[O] expected mode in ['a', 'b'], got 'c'", check_choice, "O", "mode", "c", ["a", "b"])
    _raises("[O] expected bits in (2, 4) or None, got 3", check_choice, "O", "bits", 3, (2, 4), optional=True)
    # True == 1 would pass a plain `in`; a bool passes only where bools are listed
    _raises("[O] expected bits in (1, 2), got True", check_choice, "O", "bits", True, (1, 2))
    _raises("[O] expected flag in (True, 'auto'), got 1", check_choice, "O", "flag", 1, (True, "auto"))
    _raises("[O] expected activation 'int8' or 'float', got 'x'", check_choice, "O", "activation", "x",
            ("int8", "float"), says="expected activation 'int8' or 'float'")


def test_check_int_pair():
    assert check_int_pair("O", "size", 3) == (3, 3)
    assert check_int_pair("O", "size", [2, 5]) == (2, 5)
    assert check_int_pair("O", "size", (4, 1)) == (4, 1)
    words = "to be a positive int or a pair (h, w) of positive ints"
    for bad in (0, (2, 0), (1, 2, 3), (True, 2), True, (2.0, 2), "22"):
        _raises(f"[O] expected size {words}, got {bad!r}", check_int_pair, "O", "size", bad)
    _raises("[O] size must be a positive int or a pair (h, w) of positive ints, got 0", check_int_pair, "O", "size",
            0, says="size must be a positive int or a pair (h, w) of positive ints")


# --------------------------------------------------------------------------- atomic writes


def _tree(path):
    """{relative path: bytes} of every file under ``path`` (hidden ones included)."""
    out = {}
    for top, _, names in os.walk(path):
        for name in names:
            full = os.path.join(top, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def test_atomic_file_write_and_replace(tmp_path):
    target = tmp_path / "sub" / "model.safetensors"  # parents are created
    with atomic_path(target) as staged:
        assert staged.name == target.name and staged.parent.parent == target.parent  # same name, beside the target
        assert not target.exists()
        staged.write_bytes(b"one")
    assert _tree(tmp_path) == {"sub/model.safetensors": b"one"}
    with atomic_path(target) as staged:
        staged.write_bytes(b"two")
        assert target.read_bytes() == b"one"  # the old file stays until the block ends
    assert _tree(tmp_path) == {"sub/model.safetensors": b"two"}


def test_failing_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(tmp_path / "out.bin") as staged:
            staged.write_bytes(b"half")
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(tmp_path / "pkg", folder=True) as staged:
            (staged / "a").write_bytes(b"a")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_block_that_writes_nothing_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\[atomic_path\] expected the block to write"):
        with atomic_path(tmp_path / "out.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("merge", [False, True])
def test_existing_target_survives_failed_write(tmp_path, merge):
    (tmp_path / "f.txt").write_bytes(b"old")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w").write_bytes(b"old w")
    (tmp_path / "d" / "tokenizer").write_bytes(b"tok")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "f.txt") as staged:
            staged.write_bytes(b"new")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "d", folder=True, merge=merge) as staged:
            (staged / "w").write_bytes(b"new w")
            raise RuntimeError("boom")
    assert _tree(tmp_path) == before


def test_folder_replaces_folder_and_merge_keeps_other_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "w").write_bytes(b"old w")
    (d / "tokenizer").write_bytes(b"tok")
    with atomic_path(d, folder=True, merge=True) as staged:
        (staged / "w").write_bytes(b"new w")
        (staged / "index").write_bytes(b"i")
    assert _tree(tmp_path) == {"d/w": b"new w", "d/index": b"i", "d/tokenizer": b"tok"}
    with atomic_path(d, folder=True) as staged:  # no merge: the folder is replaced whole
        (staged / "only").write_bytes(b"o")
    assert _tree(tmp_path) == {"d/only": b"o"}
    with atomic_path(tmp_path / "d") as staged:  # a file over a folder
        staged.write_bytes(b"file")
    assert _tree(tmp_path) == {"d": b"file"}


def test_merge_order_and_fsync_before_rename(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_bytes(b"old")
    events = []

    def record(kind):
        real = getattr(os, kind)

        def call(*args):
            events.append("fsync" if kind == "fsync" else (kind, os.path.basename(args[1])))
            return real(*args)
        monkeypatch.setattr(os, kind, call)

    for kind in ("fsync", "rename", "replace"):
        record(kind)
    order = []
    with atomic_path(d, folder=True, merge=True, order=order) as staged:
        for name in ("shard-2", "shard-1", "index", "config.json"):
            (staged / name).write_bytes(name.encode())
            order.append(name)
    moves = [e for e in events if e != "fsync"]
    # absent names are renamed in, the existing config.json replaced; in the order the block gave
    assert moves == [("rename", "shard-2"), ("rename", "shard-1"), ("rename", "index"), ("replace", "config.json")]
    first_move = events.index(moves[0])
    assert events[:first_move].count("fsync") >= 5  # four files and the staging folder, before any move
    assert "fsync" in events[first_move:]  # the folder that received them
    assert _tree(d) == {n: n.encode() for n in order}


def test_remove_stale_clears_dead_writers_only(tmp_path, monkeypatch):
    # a writer killed inside the block leaves its staging folder; simulate by skipping the cleanup
    monkeypatch.setattr(files_mod, "_remove", lambda path: None)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "ckpt", folder=True) as staged:
            (staged / "x").write_bytes(b"x")
            raise RuntimeError("killed")
    monkeypatch.undo()
    (tmp_path / "keep.txt").write_bytes(b"k")
    (tmp_path / ".hidden").write_bytes(b"h")
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert len(stale) == 1
    assert [p.name for p in remove_stale(tmp_path)] == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "keep.txt"]
