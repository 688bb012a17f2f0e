"""Running the ``mlx-zeta`` command line in process, for the CLI tests."""

from mlx_zeta.cli import main


def run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``mlx-zeta ARGV`` (arguments made strings)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The one non-empty line of ``err`` (the CLI's errors are one line each)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]
