"""Planted bugs in every kernel body, Metal and CUDA alike: each mutation below is applied to the
shipped text at test time (its anchor must occur exactly as often as stated, so the list cannot
rot silently), run through the public entry point on the hardened emulator, and must be caught:
by a :class:`KernelFault` (out-of-bounds access; required for every out-of-bounds mutation) or by
an output that differs from the pure-MLX reference (or is not finite).

Per body: an out-of-bounds loop bound (``<`` -> ``<=``), a removed barrier (or, in bodies without
one, a removed SIMD collective), a wrong index or offset, and a read of threadgroup memory before
any write where the body has threadgroup memory. The tally is in metal/README.md.

All mutants are compiled up front on every core (``compile_kernel``); the tests then only run them.
"""

import concurrent.futures
import os
import sys
from typing import Dict, List, NamedTuple

import mlx_zeta  # noqa: F401
import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import KernelSource, load_source
from mlx_zeta.kernels import attention as fa
from mlx_zeta.kernels import launch
from mlx_zeta.kernels.emulate import KernelFault, compile_kernel, compiler, kernel_sources
from mlx_zeta.kernels.packing import pack_2bit
from mlx_zeta.kernels.ternary import ternary_matmul, ternary_matmul_reference

pytestmark = [pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++) to run the kernel emulator"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="poisoned threadgroup memory needs ELF")]


class Bug(NamedTuple):
    label: str
    old: str  # the anchor in the shipped body
    new: str
    count: int = 1  # occurrences of the anchor (all replaced)
    fault: bool = False  # must raise KernelFault (out-of-bounds); else any catch counts
    tries: int = 1  # a race (removed barrier) may, rarely, go the right way
    case: str = ""  # another launch of the body than its default one (RUNS)


MB, CB = "threadgroup_barrier(mem_flags::mem_threadgroup);", "__syncthreads();"
LOGIT = "attn_logit(a, dot, b, h, i, j, slopes, t5_table, t5_buckets, mask);"


def _gemv(collective_old, collective_new):
    return [
        Bug("oob: K loop <=", "for (int k = lane; k < K; k += 32)", "for (int k = lane; k <= K; k += 32)", fault=True),
        Bug("oob: row loop <=", "for (int m = 0; m < ROWS; ++m) {\n    const ACC xv",
            "for (int m = 0; m <= ROWS; ++m) {\n    const ACC xv", fault=True),
        Bug("oob: dropped row guard", "if (p >= P) {", "if (p > P) {", fault=True),
        Bug("wrong index: output slot", "const int o = j * P + p;", "const int o = j * P + p + 1;"),
        Bug("removed collective", collective_old, collective_new),
    ]


def _gemm(barrier):
    return [
        Bug("oob: kk loop <=", "for (int kk = 0; kk < BK; ++kk)", "for (int kk = 0; kk <= BK; ++kk)", fault=True),
        Bug("oob: K bound <=", "gk < K)", "gk <= K)", count=2, fault=True),
        Bug("removed barrier after staging", f"  }}\n  {barrier}\n  for (int kk", "  }\n  for (int kk", tries=3),
        Bug("removed barrier before restaging", f"  }}\n  {barrier}\n}}\nconst int gp", "  }\n}\nconst int gp", tries=3,
            case="K=100"),  # needs several K tiles
        Bug("wrong index: k tile", "const int k0 = t * BK;", "const int k0 = (t + 1) * BK;"),
        # x slots past K are no longer zeroed: the ragged first tile (K = 20) reads poison
        Bug("read before write: x tile tail", "xs[c][r] = (gm < M && gk < K) ? ACC(static_cast<float>(x[gm * K + gk])) "
            ": ACC(0);", "if (gm < M && gk < K) { xs[c][r] = ACC(static_cast<float>(x[gm * K + gk])); }"),
    ]


def _prefill(barrier):
    return [
        Bug("oob: K/V staging loop <=", "for (int x = tid; x < BK * D; x += NT) {",
            "for (int x = tid; x <= BK * D; x += NT) {", fault=True),
        Bug("oob: Q staging loop <=", "for (int x = tid; x < BQ * D; x += NT) {",
            "for (int x = tid; x <= BQ * D; x += NT) {", fault=True),
        Bug("removed barrier after staging", f"  {barrier}\n\n  for (int x = c; x < BK; x += TPQ) {{",
            "\n  for (int x = c; x < BK; x += TPQ) {", tries=3),
        Bug("wrong index: key tile", "const int j = k0 + x / D;", "const int j = k0 + x / D + 1;"),
        Bug("wrong offset: GQA head", "h / (a.hq / a.hkv)) * a.lk * D;", "h % a.hkv) * a.lk * D;"),
        Bug("read before write: hidden scores", f"      s = {LOGIT}\n    }}\n    ss[row * BK + x] = s;",
            f"      ss[row * BK + x] = {LOGIT}\n    }}"),  # slots of hidden keys keep the poison
    ]


def _decode(barrier, max_, collective):
    return [
        Bug("oob: reduction loop <=", f"for (int g = 0; g < NSG; ++g) {{\n    mx = {max_}(mx, red_m[g]);",
            f"for (int g = 0; g <= NSG; ++g) {{\n    mx = {max_}(mx, red_m[g]);", fault=True),
        Bug("oob: key loop <=", "for (int j = j0 + sg; j < j1; j += NSG)", "for (int j = j0 + sg; j <= j1; j += NSG)",
            fault=True),
        Bug("removed barrier before reduction", f"  }}\n  {barrier}\n  float mx", "  }\n  float mx", tries=3),
        Bug("wrong offset: partial slot", "const size_t slot = (size_t(bh) * a.nchunks + chunk) * a.lq + r;",
            "const size_t slot = (size_t(bh) * a.nchunks + chunk) * a.lq;"),
        Bug("read before write: group 0's max", "if (lane == 0) {\n    red_m[sg] = m[r];",
            "if (lane == 0 && sg > 0) {\n    red_m[sg] = m[r];"),
        Bug("removed collective", f"{collective}(part)", "(part)"),
    ]


def _combine(max_):
    return [
        Bug("oob: chunk loop <=", f"for (int cidx = 0; cidx < a.nchunks; ++cidx) {{\n    mx = {max_}",
            f"for (int cidx = 0; cidx <= a.nchunks; ++cidx) {{\n    mx = {max_}", fault=True),
        Bug("oob: dropped d guard", "if (d < D) {", "if (d < 32 * ((D + 31) / 32)) {", fault=True),
        Bug("wrong index: partial output", "acc += part_o[slot * D + d] * w;", "acc += part_o[slot + d] * w;"),
        Bug("wrong offset: chunk slot", "const size_t slot = (size_t(bh) * a.nchunks + cidx) * a.lq + r;",
            "const size_t slot = (size_t(bh) * a.nchunks + cidx) * a.lq;"),
    ]


PLANTED: Dict[tuple, List[Bug]] = {
    ("ternary", "ternary_gemv", "metal"): _gemv("const ACC s = simd_sum(acc[m][j]);", "const ACC s = acc[m][j];"),
    ("ternary", "ternary_gemv", "cuda"): _gemv("s += __shfl_xor_sync(0xffffffffu, s, d);", "(void)d;"),
    ("ternary", "ternary_gemm", "metal"): _gemm(MB),
    ("ternary", "ternary_gemm", "cuda"): _gemm(CB),
    ("attention", "attention_prefill", "metal"): _prefill(MB),
    ("attention", "attention_prefill", "cuda"): _prefill(CB),
    ("attention", "attention_decode", "metal"): _decode(MB, "metal::max", "simd_sum"),
    ("attention", "attention_decode", "cuda"): _decode(CB, "fmaxf", "attn_warp_sum"),
    ("attention", "attention_decode_combine", "metal"): _combine("metal::max"),
    ("attention", "attention_decode_combine", "cuda"): _combine("fmaxf"),
}
CASES = [(key, bug) for key, bugs in PLANTED.items() for bug in bugs]


def _mutant(family, body, dialect, bug):
    src = load_source(family, dialect)
    text = src.bodies[body]
    assert text.count(bug.old) == bug.count, f"{family}.{body} ({dialect}): anchor of {bug.label!r} no longer found"
    return KernelSource(f"{src.path} ({bug.label})", src.header, {**src.bodies, body: text.replace(bug.old, bug.new)})


# ------------------------------------------------------------------ the launches each body is caught on
def _ternary(m, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, (n, k)).astype(np.int8)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8) if dtype == mx.int8 else rng.standard_normal((m, k))
    x = mx.array(x).astype(dtype)
    packed = pack_2bit(w)
    return lambda mode: (ternary_matmul(x, packed, n, use_kernel=mode), ternary_matmul_reference(x, packed, n))


def _attention(lq, d):
    rng = np.random.default_rng(lq)
    shapes = ((1, 4, lq, d), (1, 2, 33, d), (1, 2, 33, d))
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    kw = dict(causal=True, num_splits=3)
    return lambda mode: (fa.fused_attention(q, k, v, use_kernel=mode, **kw),
                         fa.fused_attention(q, k, v, use_kernel=False, **kw))


RUNS = {  # (family, body[, case]) -> f(mode) -> (kernel output, reference)
    ("ternary", "ternary_gemv"): _ternary(3, 100, 100, mx.int8, 0),  # P = 25 packed rows: a ragged last group
    ("ternary", "ternary_gemm"): _ternary(33, 20, 100, mx.float32, 1),  # ragged first K tile, two row tiles
    ("ternary", "ternary_gemm", "K=100"): _ternary(33, 100, 100, mx.float32, 1),  # four K tiles
    ("attention", "attention_prefill"): _attention(17, 64),
    ("attention", "attention_decode"): _attention(3, 80),  # 3 key chunks; D = 80 leaves idle combine threads
    ("attention", "attention_decode_combine"): _attention(3, 80),
}


def _mode(dialect):
    return "emulate" if dialect == "metal" else "emulate-cuda"


@pytest.fixture(scope="module")
def prebuilt():
    """Record each body's launches with the shipped text, then compile every mutant at once."""
    seen, real = {}, launch.emulate

    def spy(kernel, inputs, **kw):
        key = (kernel.family, kernel.name, kw.get("dialect", "metal"))
        seen.setdefault(key, (kernel, [x.dtype for x in inputs], kw))
        return real(kernel, inputs, **kw)

    with pytest.MonkeyPatch.context() as patch:  # records dtypes and template values; runs as before
        patch.setattr(launch, "emulate", spy)
        for (family, body, *case), run in RUNS.items():
            for dialect in ("metal", "cuda"):
                got, want = run(_mode(dialect))
                assert np.allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4), (family, body, case, dialect)
    jobs = []
    for (key, bug) in CASES:
        kernel, dtypes, kw = seen[key]
        jobs.append((kernel, dtypes, dict(template=kw["template"], output_dtypes=kw["output_dtypes"],
                                          dialect=key[2], source=_mutant(*key, bug))))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for job in [pool.submit(compile_kernel, k, d, **kw) for k, d, kw in jobs]:
            try:
                job.result()
            except (RuntimeError, ValueError):
                pass  # a mutant that does not compile is reported by its test
    return True


def _caught(key, bug):
    """'fault' (KernelFault), 'wrong' (output off the reference) or None (missed), over bug.tries runs."""
    family, body, dialect = key
    run = RUNS[(family, body, bug.case) if bug.case else (family, body)]
    with kernel_sources(family, dialect, _mutant(*key, bug)):
        for _ in range(bug.tries):
            try:
                got, want = run(_mode(dialect))
                got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
            except KernelFault:
                return "fault"
            if not (np.isfinite(got).all() and np.allclose(got, want, rtol=1e-4, atol=1e-4)):
                return "wrong"
    return None


@pytest.mark.parametrize("key, bug", CASES, ids=[f"{k[2]}-{k[1]}-{b.label}" for k, b in CASES])
def test_planted_bug_is_caught(prebuilt, key, bug):
    caught = _caught(key, bug)
    assert caught == "fault" if bug.fault else caught is not None, f"{key}: {bug.label!r} went unnoticed ({caught})"


def test_every_body_is_covered():
    """Every kernel body of every source file has planted bugs, at least four each."""
    for family in ("ternary", "attention"):
        for dialect in ("metal", "cuda"):
            for body in load_source(family, dialect).bodies:
                assert len(PLANTED.get((family, body, dialect), ())) >= 4, (family, body, dialect)
