"""Peak memory of one training step with and without gradient checkpointing
(``AttentionLayers(checkpoint=True)``): a 12-layer, width-512 decoder (8 heads, rotary
positions, vocab 1024), batch 1, float32, one forward and backward pass of the
next-token cross-entropy through ``nn.value_and_grad``.

Peak memory is MLX's allocator high-water mark (``mx.get_peak_memory``, reset before each
pass after the weights are materialised), so it counts the weights (~155 MB), the
gradients and the activations kept for the backward pass; the activations are what
checkpointing trades for a second forward pass per layer. Both variants share the
weights and run in one process, alternately; the time is the median over repeats.
Prints a Markdown table and the peak-memory reduction.

    .venv/bin/python benchmarks/grad_checkpoint.py [--seq 1024] [--repeats 1]
"""

import argparse
import os
import platform
import statistics
import time

import mlx_zeta
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_zeta.structs import Decoder, Transformer

VOCAB, DIM, DEPTH, HEADS = 1024, 512, 12, 8


def build(seq: int, checkpoint: bool) -> Transformer:
    return Transformer(num_tokens=VOCAB, max_seq_len=seq,
                       attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=HEADS, rotary_pos_emb=True,
                                           checkpoint=checkpoint))


def step(model: Transformer, x: mx.array, y: mx.array):
    """Peak bytes and seconds of one forward + backward pass."""
    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    del loss, grads
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    mx.random.seed(0)
    models = {False: build(args.seq, False), True: build(args.seq, True)}
    models[True].update(models[False].parameters())
    mx.eval(models[False].parameters())
    tokens = mx.random.randint(0, VOCAB, (1, args.seq + 1)).astype(mx.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    weights = sum(v.nbytes for _, v in tree_flatten(models[False].parameters()))
    peaks = {False: [], True: []}
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for ckpt in (False, True):
            peak, seconds = step(models[ckpt], x, y)
            peaks[ckpt].append(peak)
            times[ckpt].append(seconds)

    info = mlx_zeta.blas_info()
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"{mx.default_device()}, BLAS: {info['vendor']}; {DEPTH} layers, dim {DIM}, {HEADS} heads, rotary, "
          f"vocab {VOCAB}, batch 1, sequence {args.seq}, float32; weights {weights / 2**20:.0f} MiB; "
          f"max peak / median time of {args.repeats} runs\n")
    print("| checkpoint | peak memory (MiB) | peak minus weights (MiB) | forward+backward (s) |")
    print("|---|---|---|---|")
    for ckpt in (False, True):
        peak = max(peaks[ckpt])
        print(f"| {'on' if ckpt else 'off'} | {peak / 2**20:.0f} | {(peak - weights) / 2**20:.0f} | "
              f"{statistics.median(times[ckpt]):.2f} |")
    off, on = max(peaks[False]), max(peaks[True])
    print(f"\npeak memory reduced by {100 * (1 - on / off):.0f}% with checkpointing "
          f"({statistics.median(times[True]) / statistics.median(times[False]):.2f}x the time)")


if __name__ == "__main__":
    main()
