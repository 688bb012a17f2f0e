"""Prompt (prefill) and generation speed of mlx_zeta against mlx-lm on the same weights.

1. Writes a randomly initialised Llama checkpoint in the Hugging Face layout (float32, the
   helpers of ``benchmarks/convert.py``) with a word-level tokenizer over its 32000 ids
   (``tokenizers``: token ``t<i>`` is id ``i``), so both libraries load the folder with
   their own tokenizer code. Default shape: hidden 1024, 16 layers, 16 heads, 4 kv heads,
   intermediate 2816, vocabulary 32000, untied head: 244M parameters (``--quick``: hidden
   768, 8 layers, 12 / 4 heads, intermediate 2048: 99M).
2. Converts it with ``mlx-zeta convert`` twice, in fresh processes: float32, and
   ``--quantize 4`` (MLX's affine 4-bit, group size 64: every Linear and the embedding).
   mlx-lm loads the source folder (``mlx_lm.load``) and quantizes the same float weights
   itself (``mlx_lm.utils.quantize_model``, group size 64, 4 bits: the same layers).
3. Generates greedily from the same 512 random prompt ids, 128 new tokens, batch 1, each
   library through its own ``stream_generate`` with the ids as the prompt
   (``mlx_zeta.lm.stream_generate`` once it exists, else ``AutoregressiveWrapper.stream``;
   ``mlx_lm.generate.stream_generate``). Timed the same way from outside for both: prompt
   tokens/s = prompt length / time to the first response; generation tokens/s = the
   remaining responses / the time after the first. Peak memory: ``mx.get_peak_memory``
   after ``mx.reset_peak_memory``. Each library runs in a worker process of its own (started
   by this one, which sends the rounds: the two alternate within each round, the first one
   of a round taking turns); median of
   ``--repeats`` rounds after a warm-up round. Both on MLX's default device, with the BLAS
   that ``import mlx_zeta`` routes into MLX (the mlx-lm worker imports it too). Separate
   processes because in one process mlx-lm's own generation stream slowed later work on the
   default stream by ~17% (measured), which would have charged mlx_zeta for running second.

Needs mlx-lm (``pip install -e '.[bench]'``). Several minutes at full size on two cores:

    nice .venv/bin/python benchmarks/generate.py [--quick] [--repeats 5] [--variants float32 q4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_zeta  # first: routes MLX's CPU matmuls to the optimized BLAS

import mlx.core as mx

from convert import QUICK, add_shape_options, leading_agreement, resolve_shape, run_convert, write_checkpoint

FULL = dict(hidden=1024, layers=16, heads=16, kv_heads=4, intermediate=2816, vocab=32000)
GROUP_SIZE = 64


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` (token ``t<i>`` is id ``i``, split on whitespace) and
    a ``tokenizer_config.json``; no end token, so every run makes all its tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "model_max_length": 1 << 20}))


# --------------------------------------------------------------------------- the two libraries


def zeta_runner(folder: Path):
    """A generation function over the converted folder: ``mlx_zeta.lm`` when present, else the
    older ``AutoregressiveWrapper.stream``."""
    try:
        from mlx_zeta.lm import load, stream_generate
    except ImportError:
        from mlx_zeta.structs import AutoregressiveWrapper

        wrapper = AutoregressiveWrapper(mlx_zeta.from_pretrained(folder))

        def run(ids: list[int], n: int):
            for tok in wrapper.stream(mx.array(ids, mx.int32)[None], n, temperature=0.0):
                yield tok.item()
        return run
    model, tokenizer = load(str(folder))

    def run(ids: list[int], n: int):
        for r in stream_generate(model, tokenizer, ids, max_tokens=n, temperature=0.0):
            yield r.token
    return run


def lm_runner(folder: Path, bits: int | None):
    """A generation function: ``mlx_lm.load`` of the source folder, quantized in memory."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.utils import quantize_model

    model, tokenizer, config = load(str(folder), return_config=True)
    if bits is not None:
        model, _ = quantize_model(model, config, group_size=GROUP_SIZE, bits=bits)
        mx.eval(model.parameters())

    def run(ids: list[int], n: int):
        for r in stream_generate(model, tokenizer, ids, max_tokens=n):
            yield r.token
    return run


def timed(run, ids: list[int], n: int) -> dict:
    """Prompt tokens/s, generation tokens/s, peak memory and tokens of one generation."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens, first = [], None
    for tok in run(ids, n):
        tokens.append(int(tok))
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if len(tokens) != n:
        raise RuntimeError(f"expected {n} tokens, got {len(tokens)}")
    return dict(prompt_tps=len(ids) / (first - start), gen_tps=(n - 1) / (end - first),
                peak=mx.get_peak_memory(), tokens=tokens)


def worker(conn, lib: str, folder: str, bits: int | None) -> None:
    """One library in its own process: load, then answer each (ids, n) with :func:`timed`'s dict.
    Separate processes keep one library's MLX state (its streams, buffer cache) from touching the
    other's timings (mlx-lm decodes on a stream of its own; after that, default-stream work in the
    same process measured ~17% slower)."""
    run = zeta_runner(Path(folder)) if lib == "mlx_zeta" else lm_runner(Path(folder), bits)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(timed(run, *job))


def compare(name: str, folders: dict, bits: int | None, ids: list[int], a: argparse.Namespace) -> list[dict]:
    """Rows for mlx_zeta and mlx-lm (each in a worker process): medians over the rounds after the warm-up."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = {}, []
    try:
        for lib, folder in folders.items():
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(theirs, lib, str(folder), bits), daemon=True)
            proc.start()
            procs.append(proc)
            pipes[lib] = mine
        for conn in pipes.values():
            if conn.recv() != "ready":
                raise RuntimeError("a worker failed to load its model")
        runs: dict[str, list[dict]] = {lib: [] for lib in pipes}
        for round_ in range(a.repeats + 1):
            order = list(pipes.items())
            for lib, conn in (order if round_ % 2 == 0 else order[::-1]):  # ABBA: neither always runs first
                conn.send((ids, a.tokens))
                r = conn.recv()
                print(f"{name} round {round_}{' (warm-up)' if not round_ else ''} {lib}: prompt {r['prompt_tps']:.1f} "
                      f"tok/s, generation {r['gen_tps']:.2f} tok/s, peak {r['peak'] / 2**20:.0f} MiB", file=sys.stderr)
                if round_:
                    runs[lib].append(r)
    finally:
        for conn in pipes.values():
            conn.send(None)
        for proc in procs:
            proc.join(timeout=30)
    return [dict(variant=name, lib=lib, tokens=rs[-1]["tokens"], peak=max(r["peak"] for r in rs),
                 **{k: statistics.median(r[k] for r in rs) for k in ("prompt_tps", "gen_tps")})
            for lib, rs in runs.items()]


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_options(parser, FULL, QUICK)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per run (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    parser.add_argument("--variants", nargs="+", default=["float32", "q4"], choices=["float32", "q4"])
    parser.add_argument("--workdir", type=Path, help="where the temporary checkpoints go (default: system temp)")
    a = parser.parse_args()
    resolve_shape(parser, a, FULL, QUICK)
    a.dtype, a.shard_bytes = "float32", 2**30  # what convert.write_checkpoint reads
    return a


def main() -> None:
    a = parse_args()
    try:
        import mlx_lm
    except ImportError:
        raise SystemExit("mlx-lm is needed: pip install -e '.[bench]'")
    reproduce = shlex.join(["nice", ".venv/bin/python", "benchmarks/generate.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="mlx-zeta-generate-", dir=a.workdir))
    rows: list[dict] = []
    try:
        src = work / "hf"
        n_params = write_checkpoint(src, a)
        write_tokenizer(src, a.vocab)
        ids = mx.random.randint(0, a.vocab, (a.prompt,), key=mx.random.key(1)).tolist()
        for variant in a.variants:
            bits = 4 if variant == "q4" else None
            dst = work / variant
            run_convert(src, dst, *([] if bits is None else ["--quantize", str(bits), "--group-size", str(GROUP_SIZE)]))
            rows += compare(variant, {"mlx_zeta": dst, "mlx-lm": src}, bits, ids, a)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, a, n_params, mlx_lm.__version__, reproduce)


def report(rows: list[dict], a: argparse.Namespace, n_params: int, lm_version: str, reproduce: str) -> None:
    info = mlx_zeta.blas_info()
    print(f"\n{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, mlx-lm "
          f"{lm_version}, {mx.default_device()}, BLAS: {info['vendor']}")
    print(f"Llama hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv, intermediate "
          f"{a.intermediate}, vocab {a.vocab}: {n_params / 1e6:.0f}M parameters. Prompt {a.prompt} tokens, "
          f"{a.tokens} generated, batch 1, greedy; median of {a.repeats} rounds after a warm-up\n")
    print("| weights | library | prompt tok/s | vs mlx-lm | generation tok/s | vs mlx-lm | peak memory MiB |")
    print("|---|---|---|---|---|---|---|")
    base = {r["variant"]: r for r in rows if r["lib"] == "mlx-lm"}
    for r in rows:
        b = base[r["variant"]]
        print(f"| {r['variant']} | {r['lib']} | {r['prompt_tps']:.1f} | {r['prompt_tps'] / b['prompt_tps']:.2f}x | "
              f"{r['gen_tps']:.2f} | {r['gen_tps'] / b['gen_tps']:.2f}x | {r['peak'] / 2**20:.0f} |")
    for variant, b in base.items():
        z = next(r for r in rows if r["variant"] == variant and r["lib"] == "mlx_zeta")
        print(f"\n{variant}: greedy tokens identical for the first {leading_agreement(z['tokens'], b['tokens'])} "
              f"of {a.tokens}", end="")
    print(f"\n\nReproduce: {reproduce}")


if __name__ == "__main__":
    main()
