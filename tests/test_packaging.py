"""The wheel built from the repository ships metal/ and converters/ inside mlx_zeta,
installs into a fresh virtual environment, and imports from there."""

import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shipped_files(folder: str) -> set:
    """Files of a top-level repo folder that the wheel must carry (no caches)."""
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    wheels = list(out.glob("mlx_zeta-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_metal_and_converters(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("metal", "mlx_zeta/metal/"), ("converters", "mlx_zeta/converters/")):
        expected = {package + f for f in shipped_files(folder)}
        assert expected <= names, f"wheel lacks {sorted(expected - names)}"
    library = {"mlx_zeta/" + f for f in shipped_files("mlx_zeta") if f.endswith(".py")}
    assert library <= names, f"wheel lacks {sorted(library - names)} (add the package to pyproject.toml)"


def test_wheel_installs_and_imports_in_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)
    # Dependencies (mlx, numpy) come from the test environment, appended after the
    # fresh venv's own site-packages, so the installed wheel shadows the editable checkout.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "test_deps.pth").write_text("\n".join(deps) + "\n")
    probe = (
        "import mlx_zeta, mlx_zeta.converters, mlx_zeta.metal, mlx_zeta.nn;"
        "print(mlx_zeta.__file__); print(mlx_zeta.converters.__file__);"
        "print(','.join(mlx_zeta.metal.list_sources()));"
        "print(mlx_zeta.metal.__file__)"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    assert all(line.startswith(str(env_dir)) for line in (out[0], out[1], out[3])), out
    expected_sources = sorted(f for f in shipped_files("metal") if f.endswith((".metal", ".h", ".cu", ".cuh")))
    assert (out[2].split(",") if out[2] else []) == expected_sources
    assert Path(out[3]).parent.joinpath("README.md").is_file()
    # the console script pip generated from [project.scripts] runs the installed mlx_zeta.cli:main
    script = subprocess.run([str(env_dir / "bin" / "mlx-zeta"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert (script.returncode, script.stdout) == (0, f"mlx-zeta {version}\n"), script.stderr
