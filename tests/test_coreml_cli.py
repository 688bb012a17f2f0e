"""``mlx-zeta export-coreml`` as a user runs it: silent unless ``--verbose``, Ctrl-C honoured at every
point (exit 130, one line, nothing half-written), an existing package replaced only with ``--overwrite``.

The Ctrl-C cases run the real command in a child process that sends itself a real SIGINT when a
chosen function is first called (``sys.setprofile``), so each lands at a known moment: as ``main``
starts, while the checkpoint loads, inside coremltools' import where its probe of scipy sits in a
bare ``except:`` (the interrupt used to be swallowed there and the export went on), during
coremltools' pass pipeline, and while the finished package is flushed to disk before it is moved
into place. The children run side by side to keep the wall time small.
"""

import importlib
import logging
import subprocess
import sys
import warnings

import pytest

ct = pytest.importorskip("coremltools")

import mlx.core as mx  # noqa: E402

from badinput import assert_no_partial  # noqa: E402
from mlx_zeta.cli import main  # noqa: E402
from mlx_zeta.converters.pretrained import save_pretrained  # noqa: E402
from test_bad_coreml import CONVERTED  # noqa: E402

DRIVER = r"""
import os, signal, sys
name, path_part = sys.argv[1].split("@")

def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_name == name and path_part in frame.f_code.co_filename:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)

from mlx_zeta.cli import main
sys.setprofile(profile)
code = main(sys.argv[2:])
sys.setprofile(None)
sys.exit(code)
"""
# moment -> the first call that triggers the SIGINT (function name @ part of its file's path)
MOMENTS = {"start": "build_parser@cli.py", "load": "from_pretrained@pretrained.py",
           "import": "<module>@scipy/__init__.py", "convert": "apply_pipeline@pass_pipeline.py",
           "write": "fsync_tree@common/files.py"}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    module = importlib.import_module("mlx_zeta.converters.vit")
    mx.random.seed(0)
    return save_pretrained(module.build(module.ModelArgs.from_dict(CONVERTED["vit"])),
                           tmp_path_factory.mktemp("vit") / "vit", config=CONVERTED["vit"])


@pytest.fixture(scope="module")
def runs(vit, tmp_path_factory):
    """moment -> (process, its output folder) for each interrupted child and a plain export ("quiet")."""
    root = tmp_path_factory.mktemp("runs")
    procs = {}
    for moment in [*MOMENTS, "quiet"]:
        out = root / moment
        out.mkdir()
        argv = [str(vit), str(out / "vit.mlpackage")]
        cmd = [sys.executable, "-c", DRIVER, MOMENTS[moment], "export-coreml", *argv] if moment in MOMENTS else \
            [sys.executable, "-m", "mlx_zeta", "export-coreml", *argv]
        procs[moment] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for moment, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[moment] = (proc.returncode, stdout, stderr, out)
    return results


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(runs, moment):
    code, stdout, stderr, out = runs[moment]
    expected = "mlx-zeta: interrupted" if moment == "start" else "mlx-zeta export-coreml: interrupted"
    assert (code, stdout, stderr) == (130, "", expected + "\n"), (code, stdout, stderr)
    assert list(out.iterdir()) == []


def test_export_prints_only_its_own_line(runs):
    """No progress bars, framework version warnings or "Failed to load _MLModelProxy" lines: stderr is
    empty and stdout is the one summary line."""
    code, stdout, stderr, out = runs["quiet"]
    assert code == 0 and stderr == "", stderr
    lines = stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported ") and "task vit" in lines[0], lines
    assert (out / "vit.mlpackage" / "Manifest.json").is_file()


def _global_state():
    from coremltools.converters.mil.mil.passes import pass_pipeline

    return logging.getLogger("coremltools").level, list(warnings.filters), pass_pipeline.tqdm


def test_overwrite_and_verbose(vit, tmp_path, capsys):
    """An existing package is replaced only with --overwrite (an empty folder needs no flag); the quiet
    export prints one stdout line and nothing on stderr, --verbose lets coremltools' progress bars
    through; either way coremltools' logger level, the warning filters and its tqdm are as before."""
    before = _global_state()
    dst = tmp_path / "a.mlpackage"
    dst.mkdir()
    (dst / "stale.txt").write_text("old export")
    assert main(["export-coreml", str(vit), str(dst)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (dst / "stale.txt").exists()
    assert main(["export-coreml", str(vit), str(dst), "--overwrite"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("exported ") and out.count("\n") == 1
    assert not (dst / "stale.txt").exists() and (dst / "Manifest.json").is_file()
    assert _global_state() == before
    (tmp_path / "empty.mlpackage").mkdir()
    assert main(["export-coreml", str(vit), str(tmp_path / "empty.mlpackage"), "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert "Running MIL default pipeline" in err and out.startswith("exported ")
    assert _global_state() == before
    assert_no_partial(tmp_path)
