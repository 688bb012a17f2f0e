"""NVIDIA's compiler (NVRTC, from the PyPI wheels of the test extra, no GPU needed) accepts every
CUDA twin of metal/*.cu inside the exact source ``mx.fast.cuda_kernel`` generates, for sm_80 and
sm_90, in every instantiation our code launches (tools/nvrtc.py). Checked against independent
things: the wrapper against a hand-written expansion of MLX's ``build_kernel``; the static shared
memory ptxas reports against the ``__shared__`` declarations counted by hand; the kernel bodies
launched against the sections of the .cu files; and the check can fail: CUDA-only mistakes the
CPU emulator cannot see (a misspelt intrinsic, MLX's undefined ``inf``, too much shared memory)
are rejected with NVRTC's message."""

from pathlib import Path
from unittest import mock
import zipfile

import mlx.core as mx
import pytest

from mlx_zeta.kernels.launch import Kernel
from mlx_zeta.kernels.source import load_source
from mlx_zeta.metal import list_sources
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


nvrtc = load_script(ROOT / "tools" / "nvrtc.py", "mlx_zeta_tools_nvrtc")


@pytest.fixture(scope="module")
def nv():
    try:
        return nvrtc.Nvrtc()
    except (FileNotFoundError, OSError) as e:  # the nvidia-cuda-* wheels of the test extra are absent
        pytest.skip(f"NVRTC is not installed ({e})")


@pytest.fixture(scope="module")
def compiled(nv):
    """Every launch compiled for sm_80 and sm_90 (252 programs; NVRTC's precompiled header
    makes each ~0.25-0.55 s of CPU)."""
    return nvrtc.compile_all(nvrtc.ARCHS, nv=nv)


def _launch(label: str):
    return next(launch for launch in nvrtc.launches() if launch.label() == label)


def test_every_instantiation_compiles(compiled):
    failed = nvrtc.failures(compiled)
    assert not failed, f"{len(failed)} of {len(compiled)} instantiations failed; the first: {failed[0]}"
    assert len(compiled) == 2 * len(nvrtc.launches())


def test_every_cuda_body_is_launched():
    families = [name[:-3] for name in list_sources() if name.endswith(".cu")]
    assert sorted(families) == ["attention", "ternary"]  # a new family needs its entry point in nvrtc.launches()
    bodies = {(f, name) for f in families for name in load_source(f, "cuda").bodies}
    launched = {(launch.kernel.family, launch.kernel.name) for launch in nvrtc.launches()}
    assert launched == bodies
    # 3 dtypes x 6 head dims x {keep, additive} masks (prefill, decode) + combine; 4 x dtypes x (8 GEMV rows + GEMM)
    assert len(nvrtc.launches()) == 18 * 2 * 2 + 18 + 4 * 9


def _shared_bytes(launch) -> int:
    """Static shared memory from the __shared__ declarations of metal/*.cu, counted by hand."""
    t = dict(launch.template)
    if launch.kernel.name == "attention_prefill":  # qs[BQ*D], ks[BK*D], vs[BK*D] of T; ss[BQ*BK] float
        return (t["BQ"] * t["D"] + 2 * t["BK"] * t["D"]) * t["T"].size + t["BQ"] * t["BK"] * 4
    if launch.kernel.name == "attention_decode":  # red_m[4], red_l[4], red_o[4*D] float
        return (4 + 4 + 4 * t["D"]) * 4
    if launch.kernel.name == "ternary_gemm":  # xs[32][33], ws[32][65] of ACC (4 bytes)
        return (32 * 33 + 32 * 65) * 4
    return 0


def test_resources_reported(compiled):
    for (arch, launch), result in compiled.items():
        r = nvrtc.resources(result)
        assert r.shared == _shared_bytes(launch), (arch, launch.label(), r)
        assert 0 < r.registers <= 255 and r.shared <= 48 * 1024, (arch, launch.label(), r)


def test_wrapper_is_mlx_build_kernel():
    launch = _launch("ternary_gemv<ROWS=3, ACC=float32> x=float16")
    src = load_source("ternary", "cuda")
    expected = ('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
                + src.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
                "__global__ void custom_kernel_mlx_zeta_ternary_ternary_gemv_3_float(\n"
                "    const __half* x,\n    const uint8_t* w,\n    const int32_t* dims,\n    float* y) {\n"
                "  constexpr int ROWS = 3;\n  using ACC = float;\n\n"
                + src.bodies["ternary_gemv"] + "\n}\n\n} // namespace mlx::core::cu\n")
    assert nvrtc.mlx_source(launch) == ("custom_kernel_mlx_zeta_ternary_ternary_gemv_3_float", expected)


def test_wrapper_shape_arguments_and_bool_template():
    # MLX adds <name>_shape / _strides / _ndim for inputs of ndim > 0 whose name + suffix occurs in the body
    body = "y[0] = a_shape[0] + a_strides[1] + a_ndim + s_shape[0];"
    fake = dict(name="k", input_names=["a", "s"], output_names=["y"], source=body, header="")
    kernel = Kernel("fake", "k", ("a", "s"), ("y",))
    launch = nvrtc.Launch(kernel, ((mx.bfloat16, 2, 6), (mx.int32, 0, 1)), (("F", False), ("U", mx.float16)), (mx.int64,))
    with mock.patch.object(Kernel, "mlx_kernel_args", lambda self, dialect: fake):
        func, text = nvrtc.mlx_source(launch)
    assert func == "custom_kernel_k_f_float16_t"
    assert ("(\n    const __nv_bfloat16* a,\n    const __grid_constant__ Shape a_shape,\n"
            "    const __grid_constant__ Strides a_strides,\n    const __grid_constant__ int a_ndim,\n"
            "    const int32_t* s,\n    int64_t* y) {\n  constexpr bool F = false;\n  using U = __half;\n\n") in text


def test_precompiled_header_and_report_leave_the_code_alone(nv):
    launch = _launch("attention_prefill<T=bfloat16, D=128, BQ=16, BK=16> mask=float32")
    func, text = nvrtc.mlx_source(launch)
    plain = nv.compile(text, func, "sm_90", extra=())  # MLX's options only
    pch = nv.compile(text, func, "sm_90", extra=("-pch",))
    report = nv.compile(text, func, "sm_90")
    assert pch.cubin == plain.cubin
    # ptxas -v records its options in the toolkit-info note and nowhere else
    a, b = nvrtc.elf_sections(report.cubin), nvrtc.elf_sections(plain.cubin)
    assert a.keys() == b.keys() and f".text.{plain.lowered_name}" in a
    assert [n for n in a if a[n] != b[n]] == [".note.nv.tkinfo"]


@pytest.mark.parametrize("label, old, new, message", [
    # a misspelt warp intrinsic: the emulator would need the same typo to notice
    ("ternary_gemv<ROWS=1, ACC=int32> x=int8", "__shfl_xor_sync(", "__shfl_xor_synk(",
     'identifier "__shfl_xor_synk" is undefined'),
    # MLX's preamble defines no `inf` (attention.cu relied on it until NVRTC said so)
    ("attention_decode_combine<T=float16, D=64>", "(-cuda::std::numeric_limits<float>::infinity())", "(-inf)",
     'identifier "inf" is undefined'),
    # more static shared memory than a CUDA block may have (48 KiB)
    ("attention_prefill<T=float32, D=64, BQ=16, BK=32> mask=bool", "ss[BQ * BK]", "ss[BQ * BK * 64]",
     "uses too much shared data"),
])
def test_planted_cuda_error_is_reported(nv, label, old, new, message):
    func, text = nvrtc.mlx_source(_launch(label))
    assert old in text
    with pytest.raises(nvrtc.NvrtcError, match=message) as err:
        nv.compile(text.replace(old, new), func, "sm_80")
    assert func in str(err.value)


def test_verify_wheel_compares_headers_and_fragments(tmp_path):
    headers = [p.read_bytes() for p in sorted(nvrtc.DEVICE_HEADERS.iterdir()) if p.suffix in (".h", ".cuh")]
    fragments = [f.encode() for f in nvrtc.WRAPPER_FRAGMENTS]

    def wheel(blobs):  # a stand-in for mlx-cuda's wheel: NUL-terminated strings in lib/libmlx.so
        path = tmp_path / "mlx_cuda.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("mlx/lib/libmlx.so", b"\0" + b"\0".join(blobs) + b"\0")
        return path

    assert nvrtc.verify_wheel(wheel(headers + fragments)) == []
    edited = [headers[0].replace(b"#pragma once", b"#pragma  once"), *headers[1:]]
    problems = nvrtc.verify_wheel(wheel(edited + fragments))
    assert len(problems) == 1 and "differs from the copy embedded" in problems[0]
    problems = nvrtc.verify_wheel(wheel(headers + [f for f in fragments if b"execution-space" not in f]))
    assert problems == ["fragment '--device-as-default-execution-space' not found in mlx_cuda.whl"]
