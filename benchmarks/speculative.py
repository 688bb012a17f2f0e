"""Speculative decoding speed: a Llama-shaped target (random weights, ~245M parameters) decoded
greedily alone and with a draft, side by side in one run, batch 1.

Drafts (random weights cannot be distilled, so the draft is carved out of the target):

- ``first-L``: the target's first ``L`` layers with the target's own embedding, final norm and head
  (shared, no copy): the realistic case, its acceptance rate is whatever these weights give;
- ``target``: the target itself (every draft accepted: the upper bound of acceptance; the draft then
  costs as much as the target, so this row bounds tokens per round, not speed);
- ``oracle p%``: a draft that costs nothing and replays the target's own continuation, a
  fixed random (1 - p) of its positions replaced by a wrong token: what the verification machinery
  gains at a given agreement, the speed-up a good small draft approaches as its cost goes to zero.

Every speculative run is checked to give the target's own tokens exactly (greedy, or with
``--temperature T`` the tokens plain decoding draws with the same key). Times cover the whole
generation including the prefill of a short prompt (the same for every row); medians over repeats,
in rounds over every row (so load drift on a shared machine touches all rows alike; the first round
is a warm-up). Prints a Markdown table.

    .venv/bin/python benchmarks/speculative.py [--quick] [--tokens 64] [--repeats 3] [--draft-layers 4]
        [--k 2 4] [--temperature 0] [--dtype float32]
"""

import argparse
import os
import platform
import statistics
import time
from typing import Any, Dict, List, Tuple

import mlx_zeta  # noqa: F401  (first: routes MLX's CPU matmuls to the optimized BLAS)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_zeta.converters import llama
from mlx_zeta.lm.speculative import SpeculativeStats, speculative_steps
from mlx_zeta.nn import KVCache
from mlx_zeta.structs import AutoregressiveWrapper, Transformer

FULL = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096)
QUICK = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=704, vocab_size=2000, max_position_embeddings=1024)


def build(config: Dict[str, Any], dtype: mx.Dtype) -> Transformer:
    mx.random.seed(0)
    model = llama.build(llama.ModelArgs.from_dict({"model_type": "llama", **config}))
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def first_layers(target: Transformer, config: Dict[str, Any], layers: int) -> Transformer:
    """The target's first ``layers`` blocks behind its own embedding, final norm and head (shared)."""
    draft = llama.build(llama.ModelArgs.from_dict({"model_type": "llama", **config, "num_hidden_layers": layers}))
    draft.token_emb = target.token_emb
    draft.attn_layers.layers = target.attn_layers.layers[:layers]
    draft.attn_layers.final_norm = target.attn_layers.final_norm
    draft.to_logits = target.to_logits
    draft.eval()
    return draft


class Oracle:
    """A free "draft model": at absolute position ``j`` it is certain of ``seq[j + 1]`` (the
    prompt and the target's tokens), or on a wrong token where ``wrong[j]``. Its cache is a
    KVCache of empty keys, so ``offset`` (its position) grows and trims like a model's."""

    def __init__(self, seq: List[int], vocab: int, agree: float, seed: int = 0):
        self.seq, self.num_tokens = seq + [0], vocab
        self.wrong = np.random.default_rng(seed).random(len(self.seq)) >= agree

    def make_cache(self) -> List[KVCache]:
        return [KVCache()]

    def __call__(self, ids: mx.array, cache: List[KVCache]) -> mx.array:
        start, n = cache[0].offset, ids.shape[1]
        cache[0].update_and_fetch(mx.zeros((1, 1, n, 0)), mx.zeros((1, 1, n, 0)))
        nxt = [(self.seq[j + 1] + int(self.wrong[j])) % self.num_tokens for j in range(start, start + n)]
        logits = np.full((1, n, self.num_tokens), -1e9, np.float32)  # certain at any temperature
        logits[0, np.arange(n), nxt] = 0.0
        return mx.array(logits)


def params(model: Transformer) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))


KEY = mx.random.key(0)


def alone(target: Transformer, prompt: mx.array, n: int, temperature: float) -> Tuple[float, List[int]]:
    start = time.perf_counter()
    toks = [t.item() for t in AutoregressiveWrapper(target).stream(prompt, n, temperature=temperature, key=KEY)]
    return time.perf_counter() - start, toks


def speculative(target: Transformer, draft: Any, prompt: mx.array, n: int, k: int,
                temperature: float) -> Tuple[float, List[int], SpeculativeStats]:
    stats = SpeculativeStats()
    start = time.perf_counter()
    toks = [t for t, _, _ in speculative_steps(target, draft, prompt, target.make_cache(), draft.make_cache(), n,
                                               KEY, num_draft_tokens=k, temperature=temperature,
                                               stats=stats)]
    return time.perf_counter() - start, toks, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer, width-256 target (checks the script)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-layers", type=int, default=None, help="L of the first-L draft (default: depth / 4)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4], help="num_draft_tokens values")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()

    config = QUICK if args.quick else FULL
    target = build(config, getattr(mx, args.dtype))
    layers = args.draft_layers or max(1, config["num_hidden_layers"] // 4)
    small = first_layers(target, config, layers)
    prompt = mx.random.randint(0, config["vocab_size"], (1, args.prompt)).astype(mx.int32)
    _, own = alone(target, prompt, args.tokens, args.temperature)
    seq = prompt[0].tolist() + own
    rows: List[Tuple[str, Any, int]] = [("target alone", None, 0)]
    rows += [(f"first-{layers} draft", small, k) for k in args.k]
    rows += [("target as draft", target, max(args.k))]
    rows += [(f"oracle {p:.0%}", Oracle(seq, config["vocab_size"], p), max(args.k)) for p in (1.0, 0.8, 0.5)]
    times: Dict[int, List[float]] = {i: [] for i in range(len(rows))}
    info: Dict[int, Any] = {}
    for round_ in range(args.repeats + 1):
        for i, (_, draft, k) in enumerate(rows):
            if draft is None:
                seconds, toks = alone(target, prompt, args.tokens, args.temperature)
            else:
                seconds, toks, info[i] = speculative(target, draft, prompt, args.tokens, k, args.temperature)
            assert toks == own, f"row {i}: tokens differ from the target's own tokens"
            if round_:
                times[i].append(seconds)

    base = statistics.median(times[0])
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"{mx.default_device()}; target: Llama-shaped, {config['num_hidden_layers']} layers, width "
          f"{config['hidden_size']}, vocab {config['vocab_size']}, {params(target) / 1e6:.0f}M parameters, random "
          f"weights, {args.dtype}; draft first-{layers}: {params(small) / 1e6:.0f}M parameters (shared); "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, "
          f"batch 1, {args.prompt}-token prompt, {args.tokens} tokens; median of {args.repeats} runs\n")
    print("| decoding | k | acceptance | tokens / target forward | tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for i, (name, draft, k) in enumerate(rows):
        t = statistics.median(times[i])
        s = info.get(i)
        acc = f"{s.acceptance_rate:.1%}" if s else "-"
        per = f"{s.tokens_per_round:.2f}" if s else "1.00"
        print(f"| {name} | {k or '-'} | {acc} | {per} | {args.tokens / t:.1f} | {base / t:.2f}x | yes |")


if __name__ == "__main__":
    main()
