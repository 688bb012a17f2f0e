"""The ``mlx-zeta`` entry point (``mlx_zeta.cli``, ``python -m mlx_zeta``, the console script) and its
language-model commands ``generate``, ``chat`` and ``serve`` (``mlx_zeta.lm.cli``)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_zeta
from mlx_zeta.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------- the entry point


def test_version_in_process_and_as_python_m(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"mlx-zeta {mlx_zeta.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "mlx_zeta", "--version"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"mlx-zeta {mlx_zeta.__version__}\n", "")
    # the version pyproject.toml ships is the one printed
    assert re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1) == \
        mlx_zeta.__version__


def test_console_script_runs_the_one_main(tmp_path):
    """pyproject's [project.scripts] entry, run as the script pip generates runs it (``from M import F;
    sys.exit(F())``), and the installed script itself where one lies beside this interpreter."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mlx-zeta"]
    assert entry == "mlx_zeta.cli:main"
    module, func = entry.split(":")
    script = tmp_path / "mlx-zeta"
    script.write_text(f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    commands = [[sys.executable, str(script)]]
    installed = Path(sys.executable).parent / "mlx-zeta"
    if installed.is_file() and module in installed.read_text():
        commands.append([str(installed)])
    for cmd in commands:
        proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (0, f"mlx-zeta {mlx_zeta.__version__}\n"), proc.stderr
        proc = subprocess.run([*cmd, "no-such-command"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "invalid choice: 'no-such-command'" in one_line(proc.stderr)


def test_help_lists_every_command_and_usage_errors_are_one_line(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("convert", "export-coreml"):
        assert command in out
    code, _, err = run(capsys)
    assert code == 2 and one_line(err).startswith("mlx-zeta: error: the following arguments are required: COMMAND")
    code, _, err = run(capsys, "convert", "a", "b", "--bogus")
    assert code == 2 and one_line(err).startswith("mlx-zeta convert: error: unrecognized arguments: --bogus")
