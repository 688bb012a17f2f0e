"""The layer contracts of pyproject.toml ([tool.importlinter], ARCHITECTURE.md) hold for the tree,
and the check can fail: a planted upward import (kernels importing nn, nn importing structs) and a
planted cycle between two sibling modules are each reported."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the test extra")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "check_layers.py"


def check(*plants: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT)] + [a for p in plants for a in ("--plant", p)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_contracts_hold():
    out = check()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("plant, message", [
    ("mlx_zeta/kernels/dispatch.py:import mlx_zeta.nn.attention",
     "mlx_zeta.kernels is not allowed to import mlx_zeta.nn"),
    ("mlx_zeta/nn/norms.py:from mlx_zeta.structs import transformer",
     "mlx_zeta.nn is not allowed to import mlx_zeta.structs"),
    ("mlx_zeta/kernels/positions.py:from mlx_zeta.kernels import attention",
     "No cycles are allowed in mlx_zeta.kernels"),
])
def test_planted_violation_is_reported(plant, message):
    out = check(plant)
    assert out.returncode != 0
    assert message in out.stdout, out.stdout
