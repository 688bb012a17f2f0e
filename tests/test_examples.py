"""Every example in examples/ runs to completion and prints what it computed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "tour.py" and not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs(script):
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=EXAMPLES.parent, env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), f"{script.name} printed nothing"


def test_tour_runs_every_example_in_order():
    out = subprocess.run([sys.executable, str(EXAMPLES / "tour.py")] + [p.stem for p in SCRIPTS[:1]],
                         capture_output=True, text=True, timeout=120, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"=== {SCRIPTS[0].stem}" in out.stdout
    bad = subprocess.run([sys.executable, str(EXAMPLES / "tour.py"), "no_such_family"],
                         capture_output=True, text=True, timeout=60, cwd=EXAMPLES.parent)
    assert bad.returncode != 0 and "unknown example" in bad.stderr
