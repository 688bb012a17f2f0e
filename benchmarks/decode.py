"""Decoding speed with and without the KV cache: a 12-layer, width-512 decoder (8 heads,
rotary positions), batch 1, float32, greedy, through ``AutoregressiveWrapper.stream``.

For each context length a prompt of that length is prefilled (not timed), then the
decode steps after the first token are timed: with the cache each step runs one token
through the net; without it each step re-runs the whole sequence so far. Per-token
times are medians over repeats, both variants side by side in one run, in rounds over
every cell (so load drift on a shared machine touches all cells alike). Prints a
Markdown table and the ratio of the cached per-token time at the longest context to
that at the shortest (a KV cache keeps it near 1: per token it reads all cached keys,
but the weights dominate).

    .venv/bin/python benchmarks/decode.py [--repeats 5] [--steps 16] [--uncached-steps 2]
"""

import argparse
import os
import platform
import statistics
import time

import mlx_zeta
import mlx.core as mx

from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer

CONTEXTS = (64, 256, 1024)
VOCAB = 1024


def per_token_seconds(model: AutoregressiveWrapper, prompt: mx.array, steps: int, cache: bool) -> float:
    """Seconds per token over ``steps`` decode steps after the prefill and first token."""
    stream = model.stream(prompt, steps + 1, temperature=0.0, cache=cache)
    mx.eval(next(stream))  # prefill and first token, not timed
    start = time.perf_counter()
    for token in stream:
        mx.eval(token)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps with the cache")
    parser.add_argument("--uncached-steps", type=int, default=2, help="timed decode steps without the cache")
    args = parser.parse_args()

    mx.random.seed(0)
    net = Transformer(num_tokens=VOCAB, max_seq_len=2048,
                      attn_layers=Decoder(dim=512, depth=12, heads=8, rotary_pos_emb=True))
    mx.eval(net.parameters())
    model = AutoregressiveWrapper(net)
    prompts = {c: mx.random.randint(0, VOCAB, (1, c)).astype(mx.int32) for c in CONTEXTS}
    cached = {c: [] for c in CONTEXTS}
    uncached = {c: [] for c in CONTEXTS}
    # Rounds over every context and both variants, so a slow drift of the machine's load
    # touches all cells alike; the first round is a warm-up.
    for round_ in range(args.repeats + 1):
        for c in CONTEXTS:
            t_cached = per_token_seconds(model, prompts[c], args.steps, True)
            t_uncached = per_token_seconds(model, prompts[c], args.uncached_steps, False)
            if round_:
                cached[c].append(t_cached)
                uncached[c].append(t_uncached)
    rows = [(c, statistics.median(cached[c]), statistics.median(uncached[c])) for c in CONTEXTS]

    info = mlx_zeta.blas_info()
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"{mx.default_device()}, BLAS: {info['vendor']}; 12 layers, dim 512, 8 heads, rotary, vocab {VOCAB}, "
          f"batch 1, float32; median of {args.repeats} runs of {args.steps} cached / "
          f"{args.uncached_steps} uncached decode steps\n")
    print("| context | cached ms/token | uncached ms/token | speed-up |")
    print("|---|---|---|---|")
    for context, t_cached, t_uncached in rows:
        print(f"| {context} | {t_cached * 1e3:.2f} | {t_uncached * 1e3:.1f} | {t_uncached / t_cached:.1f}x |")
    ratio = rows[-1][1] / rows[0][1]
    print(f"\ncached per-token time, context {rows[-1][0]} / context {rows[0][0]}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
