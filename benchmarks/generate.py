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
   after ``mx.reset_peak_memory``. The two libraries alternate within each round; median
   of ``--repeats`` rounds after a warm-up round. All in one process on MLX's default
   device, with the BLAS that ``import mlx_zeta`` routes into MLX (mlx-lm gets it too).

Needs mlx-lm (``pip install -e '.[bench]'``). Several minutes at full size on two cores:

    nice .venv/bin/python benchmarks/generate.py [--quick] [--repeats 5] [--variants float32 q4]
"""

from __future__ import annotations

import argparse
import json
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

from convert import QUICK, leading_agreement, run_convert, write_checkpoint

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


def zeta_load(folder: Path):
    """(generate function, model) for a converted folder: ``mlx_zeta.lm`` when present."""
    try:
        from mlx_zeta.lm import load, stream_generate
    except ImportError:
        from mlx_zeta.structs import AutoregressiveWrapper

        wrapper = AutoregressiveWrapper(mlx_zeta.from_pretrained(folder))

        def run(ids: list[int], n: int):
            for tok in wrapper.stream(mx.array(ids, mx.int32)[None], n, temperature=0.0):
                yield tok.item()
        return run, wrapper.net
    model, tokenizer = load(str(folder))

    def run(ids: list[int], n: int):
        for r in stream_generate(model, tokenizer, ids, max_tokens=n, temperature=0.0):
            yield r.token
    return run, model


def lm_load(folder: Path, bits: int | None):
    """(generate function, model): ``mlx_lm.load`` of the source folder, quantized in memory."""
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
    return run, model


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
        raise SystemExit(f"expected {n} tokens, got {len(tokens)}")
    return dict(prompt_tps=len(ids) / (first - start), gen_tps=(n - 1) / (end - first),
                peak=mx.get_peak_memory(), tokens=tokens)


def compare(name: str, zeta, lm, ids: list[int], a: argparse.Namespace) -> list[dict]:
    """Rows for mlx_zeta and mlx-lm: medians over the rounds after the warm-up."""
    runs: dict[str, list[dict]] = {"mlx_zeta": [], "mlx-lm": []}
    for round_ in range(a.repeats + 1):
        for lib, run in (("mlx_zeta", zeta), ("mlx-lm", lm)):
            r = timed(run, ids, a.tokens)
            print(f"{name} round {round_}{' (warm-up)' if not round_ else ''} {lib}: prompt {r['prompt_tps']:.1f} "
                  f"tok/s, generation {r['gen_tps']:.2f} tok/s, peak {r['peak'] / 2**20:.0f} MiB", file=sys.stderr)
            if round_:
                runs[lib].append(r)
    rows = []
    for lib, rs in runs.items():
        rows.append(dict(variant=name, lib=lib, tokens=rs[-1]["tokens"], peak=max(r["peak"] for r in rs),
                         **{k: statistics.median(r[k] for r in rs) for k in ("prompt_tps", "gen_tps")}))
    return rows


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~100M model (hidden 768, 8 layers)")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {value} ({QUICK[name]} with --quick)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per run (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    parser.add_argument("--variants", nargs="+", default=["float32", "q4"], choices=["float32", "q4"])
    parser.add_argument("--workdir", type=Path, help="where the temporary checkpoints go (default: system temp)")
    a = parser.parse_args()
    for name, value in (QUICK if a.quick else FULL).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.hidden % a.heads or a.heads % a.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
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
            zeta, zeta_model = zeta_load(dst)
            lm, lm_model = lm_load(src, bits)
            rows += compare(variant, zeta, lm, ids, a)
            del zeta, zeta_model, lm, lm_model
            mx.clear_cache()
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
