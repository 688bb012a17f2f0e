"""Converting a ~1.1B-parameter Llama checkpoint with ``mlx-zeta convert``, then decoding it:
mlx_zeta against mlx-lm on the same weights.

1. Writes a randomly initialised Llama-family checkpoint in the Hugging Face layout
   (``model.layers.i.self_attn.q_proj.weight`` ..., sharded safetensors plus
   ``model.safetensors.index.json`` and ``config.json``) straight from MLX arrays, shard by
   shard, in a temporary folder. Default shape: hidden 2048, 16 layers, 32 heads, 8 kv
   heads, intermediate 8192, vocabulary 32000, untied head: 1.10B parameters, 2.2 GB in
   bfloat16. ``--quick``: hidden 768, 8 layers, 12 / 4 heads, intermediate 2048: 99M.
2. Runs ``mlx-zeta convert SRC DST`` (the installed console script, else
   ``python -m mlx_zeta``) in a fresh process, and reports its wall time
   and peak resident memory (the kernel's high-water mark ``VmHWM`` from
   ``/proc/PID/status``, read when the CLI starts writing and when it has finished) against
   the checkpoint's size on disk. The source was just written, so it is read from
   the page cache: the time is conversion work, not disk speed.
3. Loads the converted folder with ``mlx_zeta.from_pretrained`` and the source folder with
   mlx-lm (``mlx_lm.utils.load_model``: the checkpoint has no tokenizer, so
   ``mlx_lm.load`` does not apply) and decodes greedily from the same random prompt, each
   library through its own cached generator (``AutoregressiveWrapper.stream``,
   ``mlx_lm.generate.generate_step``; both schedule step i + 1 before handing out token i).
   Time to first token (prefill) and decode tokens/s after it; median of ``--repeats``
   rounds, the two libraries alternating within each round, after a warm-up round.
   Both run in this process on the CPU backend, in the checkpoint's dtype, with the BLAS
   that ``import mlx_zeta`` routes into MLX (so mlx-lm gets it too).

Needs mlx-lm (``pip install -e '.[bench]'``). Takes several minutes at full size on two
cores; run it with ``nice`` on a shared machine:

    nice .venv/bin/python benchmarks/convert.py [--quick] [--layers 16 --hidden 2048 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx_zeta  # first: routes MLX's CPU matmuls to the optimized BLAS

import mlx.core as mx

from mlx_zeta.structs import AutoregressiveWrapper

FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000)
QUICK = dict(hidden=768, layers=8, heads=12, kv_heads=4, intermediate=2048, vocab=32000)


def hf_llama_shapes(a: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Hugging Face ``LlamaForCausalLM`` (untied head)."""
    head_dim = a.hidden // a.heads
    shapes = {"model.embed_tokens.weight": (a.vocab, a.hidden)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (a.heads * head_dim, a.hidden),
            p + "self_attn.k_proj.weight": (a.kv_heads * head_dim, a.hidden),
            p + "self_attn.v_proj.weight": (a.kv_heads * head_dim, a.hidden),
            p + "self_attn.o_proj.weight": (a.hidden, a.heads * head_dim),
            p + "mlp.gate_proj.weight": (a.intermediate, a.hidden),
            p + "mlp.up_proj.weight": (a.intermediate, a.hidden),
            p + "mlp.down_proj.weight": (a.hidden, a.intermediate),
            p + "input_layernorm.weight": (a.hidden,),
            p + "post_attention_layernorm.weight": (a.hidden,),
        })
    shapes["model.norm.weight"] = (a.hidden,)
    shapes["lm_head.weight"] = (a.vocab, a.hidden)
    return shapes


def write_checkpoint(folder: Path, a: argparse.Namespace) -> int:
    """Random N(0, 0.02) matrices and unit norms, written shard by shard (at most
    ``--shard-bytes`` each, only one shard in memory); returns the parameter count."""
    dtype = getattr(mx, a.dtype)
    shapes = hf_llama_shapes(a)
    itemsize = mx.zeros((), dtype).itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > a.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    folder.mkdir(parents=True)
    mx.random.seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: mx.ones(shapes[k], dtype) if len(shapes[k]) == 1 else
                   mx.random.normal(shapes[k], dtype=dtype, scale=0.02) for k in names}
        mx.save_safetensors(str(folder / file), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(math.prod(s) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * itemsize}, "weight_map": weight_map}, indent=2))
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=a.hidden,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                  intermediate_size=a.intermediate, vocab_size=a.vocab, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu",
                  torch_dtype=a.dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _vm_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_convert(src: Path, dst: Path, *options: str) -> dict:
    """``mlx-zeta convert src dst [options]`` in a fresh process: wall seconds, its summary line, and its
    peak RSS in bytes: the kernel's high-water mark (``VmHWM``) read when it starts writing
    (``load_peak``) and when it prints its summary (``peak``, after the save). Not
    ``wait4``'s ``ru_maxrss``: Linux carries the forking parent's high-water mark (this
    process's, large once models are loaded) into the child's across ``exec``."""
    script = Path(sys.executable).parent / "mlx-zeta"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "mlx_zeta"]
    cmd += ["convert", str(src), str(dst), *options]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = {"load_peak": None}

    def relay_stderr():  # pass the progress bar through; note the high-water mark when writing starts
        tail = b""
        while chunk := os.read(proc.stderr.fileno(), 4096):
            tail = (tail + chunk)[-64:]
            if seen["load_peak"] is None and b"writing " in tail:
                seen["load_peak"] = _vm_kib(proc.pid, "VmHWM")
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

    relay = threading.Thread(target=relay_stderr, daemon=True)
    relay.start()
    summary, peak = "", None
    for line in proc.stdout:  # the summary is printed after the save, just before exit
        peak = _vm_kib(proc.pid, "VmHWM") or peak
        summary += line.decode()
    proc.wait()
    seconds = time.perf_counter() - start
    relay.join()
    if proc.returncode or peak is None:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit status {proc.returncode})")
    kib = lambda v: None if v is None else v * 1024  # noqa: E731
    return dict(cmd=cmd, seconds=seconds, peak=kib(peak), load_peak=kib(seen["load_peak"]), summary=summary.strip())


def import_baseline() -> int:
    """Peak RSS (``VmHWM``) of a process that only imports the CLI (interpreter, MLX, BLAS), in bytes."""
    code = ("import re, mlx_zeta.cli, mlx_zeta.converters.llama; "
            "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))")
    return int(subprocess.check_output([sys.executable, "-c", code])) * 1024


# --------------------------------------------------------------------------- decoding


def decode_zeta(wrapper: AutoregressiveWrapper, prompt: mx.array, n: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s after it, the tokens)."""
    start = time.perf_counter()
    stream = wrapper.stream(prompt[None], n, temperature=0.0)
    first = next(stream)
    tokens = [first.item()]
    t1 = time.perf_counter()
    tokens += [t.item() for t in stream]
    return t1 - start, (n - 1) / (time.perf_counter() - t1), tokens


def decode_mlx_lm(model, prompt: mx.array, n: int) -> tuple[float, float, list[int]]:
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    steps = generate_step(prompt, model, max_tokens=n)
    tokens = [next(steps)[0]]
    t1 = time.perf_counter()
    tokens += [int(t) for t, _ in steps]
    return t1 - start, (n - 1) / (time.perf_counter() - t1), tokens


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------- main


def add_shape_options(parser: argparse.ArgumentParser, full: dict, quick: dict) -> None:
    """``--quick`` and one option per shape field (``--hidden``, ``--kv-heads``, ...) of ``full``."""
    parser.add_argument("--quick", action="store_true", help="a ~100M model (hidden 768, 8 layers)")
    for name, value in full.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {value} ({quick[name]} with --quick)")


def resolve_shape(parser: argparse.ArgumentParser, a: argparse.Namespace, full: dict, quick: dict) -> None:
    """Fill the shape fields left unset from ``quick`` or ``full``; heads must divide evenly."""
    for name, value in (quick if a.quick else full).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.hidden % a.heads or a.heads % a.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_options(parser, FULL, QUICK)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                        help="checkpoint dtype, kept by the conversion and used by both decoders")
    parser.add_argument("--shard-bytes", type=int, default=2**30, help="source shard size (default 1 GiB)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--no-decode", action="store_true", help="only write and convert")
    parser.add_argument("--workdir", type=Path, help="where the temporary checkpoints go (default: system temp)")
    a = parser.parse_args()
    resolve_shape(parser, a, FULL, QUICK)
    if not a.no_decode:
        try:
            import mlx_lm
        except ImportError:
            parser.error("mlx-lm is needed for the decode comparison: pip install -e '.[bench]' (or --no-decode)")

    reproduce = shlex.join(["nice", ".venv/bin/python", "benchmarks/convert.py", *sys.argv[1:]])
    info = mlx_zeta.blas_info()
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}"
               f"{'' if a.no_decode else f', mlx-lm {mlx_lm.__version__}'}, {mx.default_device()}, "
               f"BLAS: {info['vendor']}")
    work = Path(tempfile.mkdtemp(prefix="mlx-zeta-convert-", dir=a.workdir))
    try:
        src, dst = work / "hf", work / "converted"
        t = time.perf_counter()
        n_params = write_checkpoint(src, a)
        src_bytes = folder_bytes(src)
        print(f"wrote {src}: {n_params / 1e9:.3f}B parameters, {src_bytes / 1e9:.2f} GB {a.dtype} "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        baseline = import_baseline()
        conv = run_convert(src, dst)
        dst_bytes = folder_bytes(dst)
        rows = [] if a.no_decode else decode_table(src, dst, a)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    shape = (f"hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv, intermediate "
             f"{a.intermediate}, vocab {a.vocab}")
    print(f"\n{machine}\nLlama {shape}: {n_params / 1e9:.3f}B parameters, {a.dtype}, "
          f"source {src_bytes / 1e9:.2f} GB on disk\n")
    gb = lambda b: f"{b / 1e9:.2f} GB ({b / src_bytes:.2f}x)"  # noqa: E731
    print("| conversion (`mlx-zeta convert`, fresh process) | value |")
    print("|---|---|")
    print(f"| wall time | {conv['seconds']:.1f} s ({src_bytes / conv['seconds'] / 1e9:.2f} GB/s) |")
    print(f"| peak RSS (ratio to the checkpoint) | {gb(conv['peak'])} |")
    if conv["load_peak"] is not None:
        print(f"| peak RSS when writing starts (after loading) | {gb(conv['load_peak'])} |")
    print(f"| RSS of the imports alone | {gb(baseline)} |")
    print(f"| peak RSS less the imports | {gb(conv['peak'] - baseline)} |")
    print(f"| written | {dst_bytes / 1e9:.2f} GB |")
    print(f"\nCLI: {conv['summary']}")
    if rows:
        print(f"\nDecoding: prompt {a.prompt} tokens, {a.tokens} generated, greedy, batch 1, KV cache, {a.dtype}; "
              f"median of {a.repeats} rounds after a warm-up\n")
        print("| library | load s | prefill + first token s | decode tokens/s | decode speed vs mlx-lm |")
        print("|---|---|---|---|---|")
        for name, load_s, ttft, tps, _ in rows:
            print(f"| {name} | {load_s:.1f} | {ttft:.2f} | {tps:.2f} | {tps / rows[1][3]:.2f}x |")
        agree = leading_agreement(rows[0][4], rows[1][4])
        print(f"\ngreedy tokens identical for the first {agree} of {a.tokens} "
              f"(random weights: near-uniform logits, so {a.dtype} rounding differences can flip the argmax)")
    print(f"\nReproduce: {reproduce}")


def decode_table(src: Path, dst: Path, a: argparse.Namespace) -> list[tuple]:
    """Rows (name, load seconds, median time to first token, median decode tokens/s, tokens)."""
    from mlx_lm.utils import load_model

    t = time.perf_counter()
    zeta = AutoregressiveWrapper(mlx_zeta.from_pretrained(dst))
    zeta_load = time.perf_counter() - t
    t = time.perf_counter()
    lm, _ = load_model(src)
    lm_load = time.perf_counter() - t
    prompt = mx.random.randint(0, a.vocab, (a.prompt,), key=mx.random.key(1)).astype(mx.int32)
    runs = {"mlx_zeta": [], "mlx-lm": []}
    for round_ in range(a.repeats + 1):
        for name, fn in (("mlx_zeta", lambda: decode_zeta(zeta, prompt, a.tokens)),
                         ("mlx-lm", lambda: decode_mlx_lm(lm, prompt, a.tokens))):
            result = fn()
            print(f"round {round_}{' (warm-up)' if not round_ else ''} {name}: first token {result[0] * 1e3:.0f} ms, "
                  f"{result[1]:.2f} tokens/s", file=sys.stderr)
            if round_:
                runs[name].append(result)
    return [(name, load_s, statistics.median(r[0] for r in runs[name]), statistics.median(r[1] for r in runs[name]),
             runs[name][-1][2]) for name, load_s in (("mlx_zeta", zeta_load), ("mlx-lm", lm_load))]


if __name__ == "__main__":
    main()
