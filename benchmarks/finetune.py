"""Fine-tuning memory and speed: full fine-tuning, LoRA and QLoRA of one Llama-shaped model
(random weights), side by side in one run.

1. Builds the model through the llama converter's ``build`` from a config dict (default shape:
   hidden 1024, 16 layers, 16 heads, 4 kv heads, intermediate 2816, vocabulary 32000, untied
   head: 246M parameters, the model of ``benchmarks/generate.py``; ``--quick``: hidden 768,
   8 layers, 99M), float32, the same seed in every mode. Modes:

   - ``full``: every parameter trains (AdamW, float32 weights and moments);
   - ``lora``: the float32 base frozen, rank-8 adapters (``apply_adapters``, scale 2.0, its
     default targets) on every attention and MLP Linear of every block (``to_q``, ``to_k``,
     ``to_v``, ``to_out``, ``ff.proj_in`` = [up; gate], ``ff.proj_out``; not the head); only the
     adapters train;
   - ``qlora``: the same, on a base quantized by the converters' ``quantize`` (MLX affine 4-bit,
     group size 64: every Linear, the head and the embedding).

2. Trains each with ``mlx_zeta.training.Trainer`` (compiled steps, AdamW, no clipping) on
   random token batches of ``--batch`` x ``--seq`` through ``AutoregressiveWrapper``'s
   next-token loss: the same loss and ``mx.value_and_grad`` over the trainable parameters that
   any user of the Trainer gets. Its per-step bookkeeping (a snapshot of references, one
   read-back of loss and gradient norm) is microseconds against a step of seconds here.

3. Each mode runs in a worker process of its own, so MLX's peak-memory counter and buffer cache
   belong to that mode alone. After a warm-up step (compilation, the optimizer's moments
   allocated), ``mx.reset_peak_memory``, then rounds over the modes (``--steps`` steps each,
   the first place taking turns) so load drift on a shared machine touches all modes alike;
   tokens/s = batch x seq / median step time. Peak = ``mx.get_peak_memory`` over the timed
   steps (weights, optimizer state, gradients, activations and transients all included);
   "model + optimizer" = the bytes of the parameters (frozen ones included) and the optimizer
   state.

    nice .venv/bin/python benchmarks/finetune.py [--quick] [--batch 2] [--seq 256] [--rounds 3]
        [--steps 2] [--modes full lora qlora] [--hidden 1024 --layers 16 ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import statistics
import sys

import mlx_zeta  # first: routes MLX's CPU matmuls to the optimized BLAS

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_zeta.converters import llama, quantize
from mlx_zeta.structs import AutoregressiveWrapper
from mlx_zeta.training import Trainer
from mlx_zeta.training.adapters import apply_adapters

from convert import QUICK, add_shape_options, resolve_shape
from generate import FULL

MODES = ("full", "lora", "qlora")
BITS, GROUP_SIZE = 4, 64
RANK, SCALE = 8, 2.0


def build(a: argparse.Namespace, mode: str):
    """(the wrapped model of ``mode``, its adapted paths, the float model's parameter count)."""
    mx.random.seed(0)
    config = dict(model_type="llama", hidden_size=a.hidden, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate,
                  vocab_size=a.vocab, max_position_embeddings=a.seq)
    net = llama.build(llama.ModelArgs.from_dict(config))
    mx.eval(net.parameters())
    count = sum(v.size for _, v in tree_flatten(net.parameters()))
    paths: list = []
    if mode == "qlora":
        quantize(net, BITS, GROUP_SIZE)
        mx.eval(net.parameters())
    if mode != "full":
        paths = apply_adapters(net, rank=RANK, scale=SCALE)  # default targets: every block Linear
        mx.eval(net.parameters())
    return AutoregressiveWrapper(net), paths, count


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))


def worker(conn, mode: str, options: dict) -> None:
    """One mode in its own process: build and warm up, then answer each step count with the step
    times; ``None`` ends it with the memory figures."""
    a = argparse.Namespace(**options)
    model, paths, count = build(a, mode)
    data = np.random.default_rng(0).integers(0, a.vocab, (8, a.batch, a.seq + 1)).astype(np.int32)
    trainer = Trainer(model, optim.AdamW(learning_rate=a.lr, bias_correction=True),
                      lambda i: mx.array(data[i % len(data)]), group=None, progress=False, log_every=10**9)
    for _ in range(a.warmup):
        trainer.train_step()
    mx.clear_cache()
    mx.reset_peak_memory()
    conn.send("ready")
    losses = []
    while (steps := conn.recv()) is not None:
        records = [trainer.train_step() for _ in range(steps)]
        losses += [r["loss"] for r in records]
        conn.send([r["time"] for r in records])
    conn.send(dict(peak=mx.get_peak_memory(), params=nbytes(model.parameters()),
                   optimizer=nbytes(trainer.optimizer.state), adapted=len(paths), total=count,
                   trainable=sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
                   first_loss=losses[0], last_loss=losses[-1]))


def measure(a: argparse.Namespace) -> dict:
    """{mode: figures} with the step times of every timed round; the workers run side by side."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = {}, []
    try:
        for mode in a.modes:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(theirs, mode, vars(a)), daemon=True)
            proc.start()
            procs.append(proc)
            pipes[mode] = mine
            if mine.recv() != "ready":  # one at a time: builds and warm-ups do not overlap
                raise RuntimeError(f"the {mode} worker failed to start")
        times = {mode: [] for mode in pipes}
        for round_ in range(a.rounds):
            shift = round_ % len(pipes)
            order = list(pipes.items())[shift:] + list(pipes.items())[:shift]
            for mode, conn in order:
                conn.send(a.steps)
                times[mode] += conn.recv()
                print(f"round {round_ + 1} {mode}: {', '.join(f'{t:.2f}' for t in times[mode][-a.steps:])} s/step",
                      file=sys.stderr)
        results = {}
        for mode, conn in pipes.items():
            conn.send(None)
            results[mode] = dict(conn.recv(), times=times[mode])
        return results
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def report(results: dict, a: argparse.Namespace, reproduce: str) -> None:
    info = mlx_zeta.blas_info()
    any_ = next(iter(results.values()))
    print(f"\n{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"{mx.default_device()}, BLAS: {info['vendor']}; load average {os.getloadavg()[0]:.1f}")
    print(f"Llama hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv, intermediate "
          f"{a.intermediate}, vocab {a.vocab}: {any_['total'] / 1e6:.0f}M parameters (float32). Batch {a.batch} x "
          f"{a.seq} tokens, AdamW, Trainer (compiled); LoRA rank {RANK}, scale {SCALE}; QLoRA base {BITS}-bit "
          f"group {GROUP_SIZE}; median of {a.rounds} x {a.steps} steps after {a.warmup} warm-up step(s)\n")
    print("| mode | trainable params | adapted layers | model + optimizer MiB | peak memory MiB | peak vs full "
          "| s/step | tokens/s | vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = results.get("full")
    for mode, r in results.items():
        step = statistics.median(r["times"])
        r["tps"] = a.batch * a.seq / step
        peak = f"{r['peak'] / base['peak']:.1%}" if base else "-"
        speed = f"{r['tps'] / (a.batch * a.seq / statistics.median(base['times'])):.2f}x" if base else "-"
        print(f"| {mode} | {r['trainable'] / 1e6:.2f}M ({r['trainable'] / r['total']:.2%}) | {r['adapted']} | "
              f"{(r['params'] + r['optimizer']) / 2**20:.0f} | {r['peak'] / 2**20:.0f} | {peak} | {step:.2f} | "
              f"{r['tps']:.0f} | {speed} |")
    print("\nLoss first -> last timed step: " + "; ".join(
        f"{m} {r['first_loss']:.3f} -> {r['last_loss']:.3f}" for m, r in results.items()))
    if base and "qlora" in results:
        ratio = results["qlora"]["peak"] / base["peak"]
        print(f"QLoRA / full peak memory: {ratio:.1%} ({'within' if ratio <= 0.40 else 'ABOVE'} the 40% target)")
    print(f"\nReproduce: {reproduce}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_options(parser, FULL, QUICK)
    parser.add_argument("--batch", type=int, help="sequences per step (default 2; 1 with --quick)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 256; 64 with --quick)")
    parser.add_argument("--rounds", type=int, help="timed rounds over the modes (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the peak is reset (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = parser.parse_args()
    resolve_shape(parser, a, FULL, QUICK)
    for name, full, quick in (("batch", 2, 1), ("seq", 256, 64), ("rounds", 3, 1)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    if min(a.batch, a.seq, a.rounds, a.steps, a.warmup) < 1:
        parser.error("--batch, --seq, --rounds, --steps and --warmup must be at least 1")
    return a


def main() -> None:
    a = parse_args()
    reproduce = shlex.join(["nice", ".venv/bin/python", "benchmarks/finetune.py", *sys.argv[1:]])
    report(measure(a), a, reproduce)


if __name__ == "__main__":
    main()
