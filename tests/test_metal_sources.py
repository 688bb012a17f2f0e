"""tools/metal_sources.py, the generator of the full Metal source of every kernel instantiation that
.github/workflows/metal.yml hands Apple's compiler (``xcrun metal``): on Linux, where no Metal
compiler exists, each generated text is checked (1) byte for byte against the source the
installed MLX itself generates in ``mx.fast.metal_kernel`` (recorded by ``mx.export_function``,
which traces Metal kernels without Metal), and (2) for structural facts read off the text with
rules stated here: every buffer the body names is in the signature with its address space and
type, buffer indices count up from 0, attributes carry Metal's types, the template list and its
instantiation agree, and every instantiation our entry points launch is there."""

import re
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import attention, ternary
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
ms = load_script(ROOT / "tools" / "metal_sources.py", "metal_sources")

LAUNCHES = ms.launches()
# Written from Apple's Metal Shading Language specification (table of kernel function input attributes).
ATTRIBUTE_TYPES = {"thread_position_in_grid": "uint3", "threadgroup_position_in_grid": "uint3",
                   "thread_position_in_threadgroup": "uint3", "threads_per_threadgroup": "uint3",
                   "threadgroups_per_grid": "uint3", "threads_per_grid": "uint3", "thread_index_in_threadgroup": "uint",
                   "thread_index_in_simdgroup": "uint", "simdgroup_index_in_threadgroup": "uint",
                   "threads_per_simdgroup": "uint", "simdgroups_per_threadgroup": "uint"}
TYPE_NAMES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t",
              mx.int8: "int8_t", mx.uint8: "uint8_t", mx.bool_: "bool"}  # MLX's Metal spelling of each dtype


def ident(launch):
    return ms.kernel_name(launch)[len("custom_kernel_mlx_zeta_"):]


def test_every_launched_instantiation_is_generated():
    """Counted from the entry points' own constants: attention 3 dtypes x 6 head dims x
    (prefill, decode) x 2 mask dtypes (bool placeholder or keep mask, float additive) + combine
    (3 x 6, mask-free); ternary 4 activation dtypes x (8 GEMV row counts + 1 GEMM)."""
    dims, dtypes = len(attention.HEAD_DIMS), len(attention.DTYPES)
    want = {"attention_prefill": dtypes * dims * 2, "attention_decode": dtypes * dims * 2,
            "attention_decode_combine": dtypes * dims, "ternary_gemv": 4 * ternary.GEMV_MAX_ROWS, "ternary_gemm": 4}
    got = {}
    for launch in LAUNCHES:
        got[launch.kernel.name] = got.get(launch.kernel.name, 0) + 1
    assert got == want
    assert len({ms.kernel_name(x) for x in LAUNCHES}) == len(LAUNCHES)


def mlx_generated(launch, tmp_path):
    """The source MLX's metal_kernel builds for ``launch``, read back from an exported function:
    the CustomKernel primitive stores its name and then its source, each a uint64 length + bytes."""
    args = launch.kernel.mlx_kernel_args("metal")
    kernel = mx.fast.metal_kernel(**args)
    inputs = [mx.zeros((size,) if ndim == 1 else (1,) * (ndim - 1) + (size,), dtype) for dtype, ndim, size in launch.inputs]

    def f(*xs):
        return kernel(inputs=list(xs), template=list(launch.template), grid=(32, 1, 1), threadgroup=(32, 1, 1),
                      output_shapes=[(8,)] * len(launch.outputs), output_dtypes=list(launch.outputs))

    path = tmp_path / f"{ident(launch)}.mlxfn"
    mx.export_function(str(path), f, *inputs)
    raw = path.read_bytes()
    at = raw.index(b"custom_kernel_")
    name_len = int.from_bytes(raw[at - 8:at], "little")
    name = raw[at:at + name_len].decode()
    start = at + name_len + 8
    return name, raw[start:start + int.from_bytes(raw[start - 8:start], "little")].decode()


@pytest.mark.parametrize("launch", LAUNCHES, ids=ident)
def test_the_generated_text_is_mlxs_own(launch, tmp_path):
    name, text = mlx_generated(launch, tmp_path)
    assert (name, text) == ms.mlx_source(launch)


def signature(text, func):
    """[(declaration, attribute)] of the kernel's parameters, e.g. ('const device float* q', 'buffer(0)')."""
    head = text[text.index(f"[[kernel]] void {func}(\n") + len(f"[[kernel]] void {func}(\n"):]
    head = head[:head.index(") {\n")]
    return [re.fullmatch(r"\s*(.+?) \[\[(.+)\]\]\s*", p).groups() for p in head.split(",\n")]


@pytest.mark.parametrize("launch", LAUNCHES, ids=ident)
def test_structure(launch):
    func, text = ms.mlx_source(launch)
    k = launch.kernel
    args = k.mlx_kernel_args("metal")
    body = args["source"]
    params = signature(text, func)
    declared = {decl.split()[-1]: (decl, attr) for decl, attr in params}
    assert len(declared) == len(params)  # no name twice
    # buffers: every input/output the body names, with its address space and type; indices 0, 1, ...
    for n, (name, (dtype, _, _)) in enumerate(zip(k.input_names, launch.inputs)):
        assert re.search(rf"\b{name}\b", body), f"{name} unused by {k.name}"
        assert declared[name] == (f"const device {TYPE_NAMES[dtype]}* {name}", f"buffer({n})"), name
    for n, (name, dtype) in enumerate(zip(k.output_names, launch.outputs), start=len(k.input_names)):
        assert re.search(rf"\b{name}\b", body)
        assert declared[name] == (f"device {TYPE_NAMES[dtype]}* {name}", f"buffer({n})"), name
    # attributes: exactly those the body uses, with Metal's types
    used = {a for a in ATTRIBUTE_TYPES if re.search(rf"\b{a}\b", body)}
    attrs = {name: decl for name, (decl, attr) in declared.items() if not attr.startswith("buffer(")}
    assert set(attrs) == used
    for name, decl in attrs.items():
        assert decl == f"{ATTRIBUTE_TYPES[name]} {name}" and declared[name][1] == name
    # template list and its explicit instantiation agree with the launch's template arguments
    names = ", ".join(n for n, _ in launch.template)
    assert re.search(rf"template <[^>]*>\n\[\[kernel\]\] void {func}\(", text)
    params_t = re.search(rf"template <([^>]*)>\n\[\[kernel\]\] void {func}\(", text).group(1)
    assert ", ".join(p.split()[1] for p in params_t.split(", ")) == names
    values = ", ".join(TYPE_NAMES[v] if isinstance(v, mx.Dtype) else str(int(v)) for _, v in launch.template)
    inst = f"{func}<{values}>"
    assert text.endswith(f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({inst}) {inst};\n')
    assert text.startswith(args["header"]) and body in text
    code = re.sub(r"//[^\n]*|/\*.*?\*/|\"[^\"\n]*\"", "", text, flags=re.S)  # comments and strings out
    for opening, closing in ("()", "{}", "[]"):
        assert code.count(opening) == code.count(closing), opening


def test_the_cli_writes_one_file_per_instantiation(tmp_path, capsys):
    assert ms.main([str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").glob("*.metal"))
    assert len(files) == len(LAUNCHES) and f"wrote {len(LAUNCHES)} Metal sources" in capsys.readouterr().out
    first = files[0].read_text()
    assert first.startswith(ms.PRELUDE) and first[len(ms.PRELUDE):] == ms.mlx_source(
        next(x for x in LAUNCHES if ms.kernel_name(x) == files[0].stem))[1]
    assert ms.main(["--xcrun-flags"]) == 0
    flags = capsys.readouterr().out.split()
    assert flags[:2] == ["-std=metal3.1", "-fno-fast-math"] and flags[2] == "-I"
    assert (Path(flags[3]) / "mlx/backend/metal/kernels/utils.h").is_file()  # the header the prelude includes
    np.testing.assert_equal(len(flags), 4)


def test_the_metal_workflow_runs_every_kernel_test_and_apples_compiler():
    """.github/workflows/metal.yml runs the GPU tests (and the fallback and generator tests) on the
    Mac in strict mode, every file it lists exists, and a step before them compiles this
    generator's output with `xcrun metal`."""
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "metal.yml").read_text())
    steps = workflow["jobs"]["metal-kernels"]["steps"]
    tests = next(s for s in steps if "PYTEST_ARGS" in s.get("run", ""))
    listed = set(re.search(r'PYTEST_ARGS="([^"]*)"', tests["run"]).group(1).split())
    assert {"tests/test_kernels_gpu.py", "tests/test_kernels_fallback.py", "tests/test_metal_sources.py"} <= listed
    assert all((ROOT / path).is_file() for path in listed), listed
    assert tests["env"]["MLX_ZETA_KERNELS_STRICT"] == "1"
    compile_step = next(s["run"] for s in steps if "tools/metal_sources.py" in s.get("run", ""))
    assert "xcrun -sdk macosx metal $flags -c" in compile_step and "--xcrun-flags" in compile_step
    assert steps.index(next(s for s in steps if s.get("run") == compile_step)) < steps.index(tests)
