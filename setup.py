"""Builds the optional native CPU kernels (csrc/, the MLX extension mlx_zeta.kernels._cpu) with
CMake against the installed MLX wheel; everything else is declared in pyproject.toml.

The build never fails the install: without a compiler, CMake, or a matching MLX, setup prints one
warning and mlx-zeta installs without the extension (its pure-MLX paths run; see
``mlx_zeta.kernels.info()``). ``MLX_ZETA_NATIVE=0`` skips the build; ``MLX_ZETA_NATIVE=require``
makes a failed build fail the install (used to test the build itself).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class OptionalCMakeBuild(build_ext):
    def build_extension(self, ext):
        mode = os.environ.get("MLX_ZETA_NATIVE", "1")
        if mode == "0":
            print("mlx-zeta: MLX_ZETA_NATIVE=0, native CPU kernels not built", file=sys.stderr)
            return
        try:
            self._cmake(ext)
        except Exception as error:  # noqa: BLE001 - any failure leaves the pure-MLX paths
            if mode == "require":
                raise
            print(f"mlx-zeta: WARNING: native CPU kernels not built ({type(error).__name__}: {error}); "
                  "the pure-MLX paths will run. mlx_zeta.kernels.info() says which kernels are native.",
                  file=sys.stderr)

    def _cmake(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "csrc"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = ["cmake", "-S", str(ext.source_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", jobs]):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
                raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n" + "\n".join(tail))

    def get_ext_filename(self, fullname):  # nanobind names the module itself; keep setuptools' suffix
        return super().get_ext_filename(fullname)


setup(ext_modules=[CMakeExtension("mlx_zeta.kernels._cpu", ROOT / "csrc")],
      cmdclass={"build_ext": OptionalCMakeBuild})
