"""Write every Metal kernel instantiation as the full source ``mx.fast.metal_kernel`` compiles, so
Apple's compiler can check it without a GPU (``.github/workflows/metal.yml``)::

    python tools/metal_sources.py OUT          # one OUT/<kernel name>.metal per instantiation
    python tools/metal_sources.py --xcrun-flags
    xcrun -sdk macosx metal $(python tools/metal_sources.py --xcrun-flags) -c OUT/x.metal -o x.air

The wrapper reproduces MLX's ``metal_kernel`` (ml-explore/mlx ``mlx/backend/common/metal_kernel.cpp``
``write_signature``, ``write_template``, ``make_template_hash``; ``get_type_string`` in
``backend/common/compiled.cpp``; commit :data:`MLX_COMMIT`, the text MLX 0.32.4 generates):

    <header>
    template <int ROWS, typename ACC>               (when there are template arguments)
    [[kernel]] void custom_kernel_<name>_<template hash>_<input types>_<output types>(
      const device <T>* <input> [[buffer(i)]],      (constant for inputs of < 8 elements, & for scalars;
      ...                                             <input>_shape/_strides/_ndim when the body uses them)
      device <T>* <output> [[buffer(j)]],
      uint3 thread_position_in_grid [[thread_position_in_grid]], ...   (attributes the body mentions)
    ) {
    <body>
    }
    template [[host_name("<kernel name>")]] [[kernel]] decltype(<kernel name><values>) <kernel name><values>;

At launch MLX prepends ``metal::utils()`` (its ``kernels/utils.h``, preprocessed), compiles with
the Metal language version of the OS (3.1 on macOS 14, the lowest it uses) in safe math mode.
Each file here starts with ``#include "mlx/backend/metal/kernels/utils.h"`` in its place, found in
the installed ``mlx`` package's ``include`` folder (``--xcrun-flags``). The instantiations are
those the public entry points launch (:func:`launches`). ``tests/test_metal_sources.py`` checks
the text against the source the installed MLX itself generates (recorded by ``mx.export_function``,
which works without Metal) and checks its structure independently.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx

from mlx_zeta.kernels.source import CONSTANT_LIMIT, METAL_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_launches import Launch, recorded_launches  # noqa: E402

MLX_COMMIT = "846d176227a0ac13d2667e58d2bb68b322109ab0"
PRELUDE = '#include "mlx/backend/metal/kernels/utils.h"  // MLX prepends metal::utils(), this header\n'
XCRUN_FLAGS = ("-std=metal3.1", "-fno-fast-math")
# get_type_string (mlx/backend/common/compiled.cpp)
# metal_attributes of metal_kernel(), in MLX's order: added to the signature when the body contains the name
ATTRIBUTES = (("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
              ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
              ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
              ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
              ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
              ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
              ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
              ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
              ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"))


def _value(v: object) -> str:
    if isinstance(v, bool):  # an ostream without boolalpha
        return "1" if v else "0"
    return METAL_TYPES[v] if isinstance(v, mx.Dtype) else str(v)


def template_def(template: Sequence[Tuple[str, object]]) -> str:
    """``write_template``: ``<64, float>``."""
    return "<" + ", ".join(_value(v) for _, v in template) + ">"


def kernel_name(launch: Launch) -> str:
    """``custom_kernel_<name>[_<template hash>]_<input types + s|c>_<output types>``."""
    name = "custom_kernel_" + launch.kernel.mlx_kernel_args("metal")["name"]
    if launch.template:  # make_template_hash: '<', '>' and ', ' become '_', the last '_' dropped
        name += "_" + template_def(launch.template).replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for dtype, ndim, size in launch.inputs:
        name += "_" + METAL_TYPES[dtype] + ("s" if ndim == 0 else "c" if size < CONSTANT_LIMIT else "")
    return name + "".join("_" + METAL_TYPES[d] for d in launch.outputs)


def mlx_source(launch: Launch) -> Tuple[str, str]:
    """(kernel function name, the source ``metal_kernel`` builds for ``launch``, without ``metal::utils()``)."""
    args = launch.kernel.mlx_kernel_args("metal")
    body, func = args["source"], kernel_name(launch)
    attributes = [f"  {kind} {attr} [[{attr}]]" for attr, kind in ATTRIBUTES if attr in body]
    kinds = ["typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int" for _, v in launch.template]
    text = args["header"]
    if launch.template:
        text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, launch.template)) + ">\n"
    text += f"[[kernel]] void {func}(\n"
    index = 0
    for name, (dtype, ndim, size) in zip(args["input_names"], launch.inputs):
        space, ref = ("constant" if size < CONSTANT_LIMIT else "device"), ("&" if ndim == 0 else "*")
        text += f"  const {space} {METAL_TYPES[dtype]}{ref} {name} [[buffer({index})]],\n"
        index += 1
        for suffix, kind in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                             ("_ndim", "const constant int&")):
            if ndim > 0 and name + suffix in body:
                text += f"  {kind} {name}{suffix} [[buffer({index})]],\n"
                index += 1
    last = len(launch.inputs) + len(args["output_names"]) - 1  # MLX's test: counts no shape buffers
    for name, dtype in zip(args["output_names"], launch.outputs):
        text += f"  device {METAL_TYPES[dtype]}* {name} [[buffer({index})]]"
        text += ",\n" if index < last or attributes else ") {\n"
        index += 1
    if attributes:
        text += ",\n".join(attributes) + ") {\n"
    text += body + "\n}\n"
    if launch.template:
        inst = func + template_def(launch.template)
        text += f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({inst}) {inst};\n'
    return func, text


def launches() -> List[Launch]:
    """One launch per distinct Metal source among :func:`recorded_launches` (inputs that differ
    only in ndim give one source)."""
    return list({kernel_name(launch): launch for launch in recorded_launches("emulate")}.values())


def write_all(out: Path) -> List[Path]:
    """One ``<kernel name>.metal`` per launch in ``out`` (created); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for launch in launches():
        func, text = mlx_source(launch)
        path = out / f"{func}.metal"
        path.write_text(PRELUDE + text)
        paths.append(path)
    return paths


def mlx_include() -> Path:
    """The installed MLX's header folder (``mlx/backend/metal/kernels/utils.h`` lies under it)."""
    return Path(mx.__file__).resolve().parent / "include"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for the .metal files")
    parser.add_argument("--xcrun-flags", action="store_true", help="print the flags for `xcrun -sdk macosx metal`")
    args = parser.parse_args(argv)
    if args.xcrun_flags:
        print(" ".join(XCRUN_FLAGS), "-I", mlx_include())
        return 0
    if args.out is None:
        parser.error("expected an output folder or --xcrun-flags")
    paths = write_all(args.out)
    print(f"wrote {len(paths)} Metal sources to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
