"""The malformed-input corpus: helpers every ``tests/test_bad_*.py`` file uses.

Each bad input in the corpus is one test case that calls :func:`api_error` (the Python API) or
:func:`cli_error` (the ``mlx-zeta`` command line). Both assert the house rule for bad input:

* one line of text, no traceback;
* the message names the thing at fault (a class, file or field) and what was expected;
* nothing half-written is left on disk (:func:`assert_no_partial`).

``CORPUS`` counts the cases as they register, so ``pytest --collect-only -q tests/test_bad_*.py`` gives
the size of the corpus.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TEMP_MARKERS = (".tmp-", ".partial", ".tmp")


def assert_no_partial(*folders: Path, allowed: tuple[str, ...] = ()) -> None:
    """No file or folder under ``folders`` looks half-written (a temporary sibling of an atomic write)."""
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        leftovers = [p for p in folder.rglob("*") if any(m in p.name for m in TEMP_MARKERS) and p.name not in allowed]
        assert not leftovers, f"half-written files left behind: {leftovers}"


def assert_one_line(message: str, *names: str, pattern: str | None = None) -> None:
    """``message`` is one line, carries no traceback, mentions every name and matches ``pattern``."""
    text = message.strip()
    assert text, "empty error message"
    assert "\n" not in text, f"error is not one line: {text!r}"
    assert "Traceback" not in text, text
    for name in names:
        assert name in text, f"error does not name {name!r}: {text!r}"
    if pattern is not None:
        assert re.search(pattern, text), f"error {text!r} does not match {pattern!r}"


def api_error(exc_type, fn, *args, names=(), pattern=None, clean=(), **kwargs) -> BaseException:
    """Call ``fn``; it must raise ``exc_type`` with a one-line message naming ``names``; ``clean`` folders
    must hold nothing half-written afterwards. Returns the exception."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert_one_line(str(info.value), *names, pattern=pattern)
    assert_no_partial(*clean)
    return info.value


def cli_error(capsys, argv, *, names=(), pattern=None, clean=(), code=2, absent=()) -> str:
    """Run ``mlx-zeta argv`` in-process; it must exit with ``code`` and print exactly one stderr line
    ``mlx-zeta <command>: error: ...`` naming ``names``; ``absent`` paths must not exist afterwards."""
    from mlx_zeta.cli import main

    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert status == code, f"exit {status}, expected {code}; stderr: {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith(f"mlx-zeta {argv[0]}: error: "), lines[0]
    assert_one_line(lines[0], *names, pattern=pattern)
    for path in absent:
        assert not Path(path).exists(), f"{path} was left on disk"
    assert_no_partial(*clean)
    return lines[0]
