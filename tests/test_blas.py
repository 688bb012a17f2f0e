"""BLAS routing on Linux: what gets loaded, that it is used, and that results stay exact
to float32 tolerance against a float64 numpy reference with and without routing."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="BLAS routing only applies to MLX's Linux CPU wheel")

# Computes a matmul and a GEMV of fixed inputs in a fresh process and reports them.
WORKER = r"""
import json, sys, warnings
warnings.simplefilter("always")
if sys.argv[1] == "mlx-first":
    import mlx.core
with warnings.catch_warnings(record=True) as caught:
    import mlx_zeta
    mlx_zeta.route_blas()  # a second call must neither re-route nor hint again
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((64, 96)).astype(np.float32)
b = rng.standard_normal((96, 48)).astype(np.float32)
v = rng.standard_normal((96,)).astype(np.float32)
mm, mv = mx.array(a) @ mx.array(b), mx.array(a) @ mx.array(v)
print(json.dumps({"info": mlx_zeta.blas_info(), "mm": np.array(mm).tolist(), "mv": np.array(mv).tolist(),
                  "warnings": [str(w.message) for w in caught]}))
"""


def run_worker(mode: str = "normal", **env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_ZETA_")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", WORKER, mode], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def float64_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 96))
    b = rng.standard_normal((96, 48))
    v = rng.standard_normal((96,))
    a, b, v = (x.astype(np.float32).astype(np.float64) for x in (a, b, v))
    return a @ b, a @ v


@linux_only
def test_routed_library_is_loaded_with_sane_threads():
    result = run_worker()
    info = result["info"]
    expected_vendor = {"x86_64": "mkl", "aarch64": "openblas"}.get(platform.machine())
    assert info["reason"] == "routed", info
    assert info["vendor"] == expected_vendor
    assert os.path.isfile(info["library"])
    # One BLAS thread per core at most: more would oversubscribe a 2-core machine.
    assert 1 <= info["threads"] <= os.cpu_count()
    assert result["warnings"] == []


@linux_only
def test_routed_symbols_are_the_ones_mlx_calls():
    """The routed library must define the exact CBLAS entry points MLX resolves."""
    import ctypes

    lib = ctypes.CDLL(run_worker()["info"]["library"])
    for symbol in ("cblas_sgemm", "cblas_sgemv"):
        assert hasattr(lib, symbol), symbol


@pytest.mark.parametrize("env", [{}, {"MLX_ZETA_NO_BLAS": "1"}], ids=["routed", "reference"])
def test_results_match_float64_within_float32_tolerance(env):
    result = run_worker(**env)
    mm_ref, mv_ref = float64_reference()
    # float32 dot products of length 96 with unit-normal terms: error ~ sqrt(96) * eps32 * |terms|.
    np.testing.assert_allclose(np.array(result["mm"]), mm_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(result["mv"]), mv_ref, rtol=1e-5, atol=1e-4)
    if env:
        assert result["info"]["vendor"] == "reference"
        assert "MLX_ZETA_NO_BLAS" in result["info"]["reason"]


@linux_only
def test_hint_once_when_mlx_core_was_imported_first():
    result = run_worker("mlx-first")
    assert result["info"]["vendor"] == "reference"
    assert len(result["warnings"]) == 1
    assert "Import mlx_zeta first" in result["warnings"][0]


@linux_only
def test_bad_override_path_names_the_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_ZETA_")}
    env["MLX_ZETA_BLAS"] = "/nonexistent/libblas.so"
    out = subprocess.run([sys.executable, "-c", "import mlx_zeta"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "MLX_ZETA_BLAS" in out.stderr and "/nonexistent/libblas.so" in out.stderr


@linux_only
def test_routed_and_reference_blas_agree():
    routed, reference = run_worker(), run_worker(MLX_ZETA_NO_BLAS="1")
    assert routed["info"]["vendor"] != reference["info"]["vendor"] == "reference"
    # Same float32 products, different summation order: agree to float32 rounding.
    np.testing.assert_allclose(routed["mm"], reference["mm"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(routed["mv"], reference["mv"], rtol=1e-5, atol=1e-5)
