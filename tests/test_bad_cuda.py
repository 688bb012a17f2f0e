"""Malformed input to the NVRTC check of the CUDA twins (tools/nvrtc.py): each case gets one line
naming what is wrong."""

import zipfile
from unittest import mock

import pytest

from badinput import api_error, assert_one_line
from test_kernels_nvrtc import nvrtc


@pytest.mark.parametrize("arch", ["compute_90", "sm_9", "90", "sm_90a", None])
def test_bad_arch(arch):
    api_error(ValueError, nvrtc.Nvrtc.check_arch, arch, names=("[nvrtc]", "sm_80", repr(arch)))


def test_verify_wheel_missing_file(tmp_path):
    api_error(ValueError, nvrtc.verify_wheel, tmp_path / "absent.whl", names=("absent.whl", "wheel"))


def test_verify_wheel_not_a_zip(tmp_path):
    path = tmp_path / "fake.whl"
    path.write_text("not a zip")
    api_error(ValueError, nvrtc.verify_wheel, path, names=("fake.whl", "zip"))


def test_verify_wheel_without_libmlx(tmp_path):
    path = tmp_path / "mlx-0.32.4.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mlx/core.so", b"")
    api_error(ValueError, nvrtc.verify_wheel, path, names=("mlx-0.32.4.whl", "mlx/lib/libmlx.so", "mlx-cuda"))


def test_nvrtc_wheel_absent(tmp_path):
    nvidia = pytest.importorskip("nvidia", reason="the nvidia-cuda-* wheels of the test extra")

    with mock.patch.object(nvidia, "__path__", [str(tmp_path)]):
        api_error(FileNotFoundError, nvrtc.Nvrtc, names=("libnvrtc.so.13", "nvidia-cuda-nvrtc"))


@pytest.mark.parametrize("argv, names", [
    (["--arch", "sm_90", "compute_80"], ("compute_80", "sm_80")),
    (["--verify-wheel", "absent.whl"], ("absent.whl",)),
])
def test_cli_one_line(capsys, tmp_path, argv, names):
    argv = [str(tmp_path / a) if a.endswith(".whl") else a for a in argv]
    assert nvrtc.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvrtc.py: error: ")
    assert_one_line(err, *names)
