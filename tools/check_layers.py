"""Check the layer contracts of ``pyproject.toml`` ([tool.importlinter]) with import-linter.

``mlx_zeta.converters`` and ``mlx_zeta.metal`` live at the top of the repository
(``converters/``, ``metal/``) and are mapped into the package by setuptools' ``package-dir``;
import-linter reads packages from disk, so this script lays the installed shape out in a
temporary folder (``mlx_zeta/`` with ``converters/`` and ``metal/`` inside) and runs the
contracts there. Exit status 0 when every contract holds.

    python tools/check_layers.py
    python tools/check_layers.py --plant "mlx_zeta/kernels/dispatch.py:import mlx_zeta.nn"

``--plant PATH:LINE`` appends ``LINE`` to the staged copy of ``PATH`` (a path inside the
installed package) first: a planted upward import or cycle must make the check fail
(``tests/test_layers.py`` does this).
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"converters": "converters", "metal": "metal"}  # package-dir entries: subpackage -> repository folder


def staged_package(dest: Path) -> Path:
    """Copy the Python sources into ``dest/mlx_zeta`` as they are installed; returns ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mlx_zeta", dest / "mlx_zeta", ignore=ignore)
    for sub, folder in MAPPED.items():
        shutil.copytree(ROOT / folder, dest / "mlx_zeta" / sub, ignore=ignore)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plant", action="append", default=[], metavar="PATH:LINE",
                        help="append LINE to the staged copy of PATH (relative to the staged site folder)")
    args = parser.parse_args(argv)
    from importlinter.cli import lint_imports

    with tempfile.TemporaryDirectory(prefix="mlx_zeta_layers_") as tmp:
        staged_package(Path(tmp))
        for plant in args.plant:
            path, line = plant.split(":", 1)
            with open(Path(tmp, path), "a") as f:
                f.write(f"\n{line}\n")
        sys.path.insert(0, tmp)  # ahead of the editable install's finder
        os.chdir(tmp)
        return lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)


if __name__ == "__main__":
    sys.exit(main())
