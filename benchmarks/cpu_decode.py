"""Decode tokens/s of low-bit models on the CPU, native kernels against float32 and the pure-MLX paths.

Two models with random weights, batch 1, greedy, each side by side in one run:

1. A BitNet-b1.58-2B-shaped checkpoint (hidden 2560, 30 layers, intermediate 6912, 20 heads,
   5 kv heads, vocabulary 128256, tied float32 embedding): written in the Hugging Face BitNet
   layout (packed uint8 ``(out/4, in)`` projections with a ``weight_scale`` of shape (1,),
   ``quantization_config`` bitlinear) to a temporary folder and loaded with
   ``mlx_zeta.from_pretrained`` (the BitNet converter's build / sanitize / load). Its float32
   twin is the same model with every ternary layer replaced in place by a float32 ``nn.Linear``
   holding the dequantized weight :math:`T/\\sigma` (behind the same sub-norm): float activations,
   float32 weights.
2. A Llama-3.2-1B-shaped model (hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 kv
   heads, vocabulary 128256, tied embedding) built by the Llama converter in float32 with its
   random initialization, and its 4-bit twin quantized in place the way ``mlx-zeta convert
   --quantize 4`` does (``converters.swaps.quantize(model, 4, 64)``: every Linear an
   ``AffineLinear``, the tied embedding an ``AffineEmbedding``).

Per model and variant: ``AutoregressiveWrapper.stream`` prefills an 8-token prompt with the KV
cache and yields the first token (not timed); the next ``--steps`` tokens (one decode step each,
``mx.eval`` per token) are timed. Variants: float32; low-bit with the native CPU kernels (mode
``auto``); low-bit under ``mlx_zeta.kernels.use_kernels("off")`` (the pure-MLX paths). A
warm-up generation precedes the rounds; the low-bit variants alternate within each of
``--repeats`` rounds; tok/s is the median. Models are built, measured and freed one at a time
(the float32 BitNet twin is ~10 GB). Correctness, not timed: the native and ``off`` runs of each
low-bit model must make the same greedy tokens (the leading agreement is printed; a mismatch at
the first token fails the run). ``head ms`` is one call of the tied output head (logits over the
vocabulary) on one token, for where the time goes.

    .venv/bin/python benchmarks/cpu_decode.py [--layers N] [--steps 16] [--repeats 3] [--models bitnet llama]
        [--ternary-kernel auto]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_zeta  # first: routes MLX's CPU matmuls to the optimized BLAS

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_zeta import kernels
from mlx_zeta.converters import llama as llama_conv
from mlx_zeta.converters.swaps import quantize
from mlx_zeta.quant import TernaryLinear
from mlx_zeta.structs import AutoregressiveWrapper

PROMPT = 8
VOCAB = 128256
BITNET = dict(hidden_size=2560, num_hidden_layers=30, intermediate_size=6912, num_attention_heads=20,
              num_key_value_heads=5)
LLAMA = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=8)


# --------------------------------------------------------------------------- models


def _packed_ternary(out_features: int, in_features: int) -> mx.array:
    """Random HF-layout packed ternary weight, uint8 ``(out/4, in)``: each byte holds four 2-bit
    codes in {0, 1, 2} (= T + 1), drawn uniformly as one base-3 number in [0, 81)."""
    table = mx.array([a | b << 2 | c << 4 | d << 6 for d in range(3) for c in range(3) for b in range(3)
                      for a in range(3)], dtype=mx.uint8)
    return table[mx.random.randint(0, 81, (out_features // 4, in_features))]


def write_bitnet(folder: Path, layers: int) -> None:
    """A random BitNet checkpoint in the Hugging Face layout: ``config.json`` + one safetensors file."""
    dim, inner = BITNET["hidden_size"], BITNET["intermediate_size"]
    head_dim = dim // BITNET["num_attention_heads"]
    kv = BITNET["num_key_value_heads"] * head_dim
    config = dict(model_type="bitnet", architectures=["BitNetForCausalLM"], **BITNET, vocab_size=VOCAB,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="relu2",
                  tie_word_embeddings=True,
                  quantization_config=dict(quant_method="bitnet", linear_class="bitlinear",
                                           quantization_mode="offline"))
    config["num_hidden_layers"] = layers
    weights = {"model.embed_tokens.weight": 0.02 * mx.random.normal((VOCAB, dim)),
               "model.norm.weight": mx.ones((dim,))}
    shapes = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv, dim), "self_attn.v_proj": (kv, dim),
              "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (inner, dim), "mlp.up_proj": (inner, dim),
              "mlp.down_proj": (dim, inner)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, (n, k) in shapes.items():
            weights[p + name + ".weight"] = _packed_ternary(n, k)
            # divide convention: W = T / sigma; sigma = sqrt(k) keeps unit-scale outputs
            weights[p + name + ".weight_scale"] = mx.array([k ** 0.5], dtype=mx.float32)
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"):
            weights[p + norm + ".weight"] = mx.ones((inner if "ffn" in norm else dim,))
    mx.eval(weights)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


class FloatTwin(nn.Module):
    """A ternary layer's float32 twin: its sub-norm / norm (if any), then ``x W^T + b`` with the
    dequantized ``W`` (``TernaryLinear.weight_matrix``); float activations, no int8 step."""

    def __init__(self, layer: TernaryLinear):
        super().__init__()
        for name in ("sub_norm", "norm"):
            if name in layer:
                setattr(self, name, layer[name])
        self.linear = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer)
        self.linear.weight = layer.weight_matrix()
        if "bias" in layer:
            self.linear.bias = layer.bias if layer.scale_convention == "divide" else layer.bias * layer.weight_scale
        mx.eval(self.linear.parameters())

    def __call__(self, x: mx.array) -> mx.array:
        for name in ("sub_norm", "norm"):
            if name in self:
                x = self[name](x)
        return self.linear(x)


def to_float_twin(model: nn.Module) -> int:
    """Replace every ``TernaryLinear`` in place by its :class:`FloatTwin`, one at a time (the packed
    weight is freed as each goes); returns how many."""
    paths = [p for p, m in model.named_modules() if isinstance(m, TernaryLinear)]
    for path in paths:
        *parent, leaf = path.split(".")
        owner = model
        for part in parent:
            owner = owner[int(part)] if part.isdigit() else owner[part]
        setattr(owner, leaf, FloatTwin(getattr(owner, leaf)))
    gc.collect()
    return len(paths)


def build_llama(layers: int) -> nn.Module:
    """A Llama-3.2-1B-shaped float32 model with the converter's build and random initialization."""
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], **LLAMA, vocab_size=VOCAB,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
    config["num_hidden_layers"] = layers
    model = llama_conv.build(llama_conv.ModelArgs.from_dict(config))
    model.token_emb.weight = 0.02 * mx.random.normal(model.token_emb.weight.shape)
    mx.eval(model.parameters())
    return model.eval()


def gigabytes(model: nn.Module) -> float:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def free() -> None:
    gc.collect()
    mx.clear_cache()


# --------------------------------------------------------------------------- timing


def decode(wrapper: AutoregressiveWrapper, prompt: mx.array, steps: int, mode: str) -> tuple[float, list[int]]:
    """(tok/s over ``steps`` decode steps after the prefill and first token, all greedy tokens) in ``mode``."""
    with kernels.use_kernels(mode):
        stream = wrapper.stream(prompt, steps + 1, temperature=0.0, cache=True)
        tokens = [next(stream).item()]  # prefill + first token, not timed
        start = time.perf_counter()
        for token in stream:
            mx.eval(token)
            tokens.append(token.item())
        return steps / (time.perf_counter() - start), tokens


def head_ms(model: nn.Module, dim: int, mode: str, repeats: int = 5) -> float:
    """Median ms of the tied output head (logits over the vocabulary) on one token."""
    h = mx.random.normal((1, 1, dim))
    times = []
    with kernels.use_kernels(mode):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            mx.eval(model.token_emb.as_linear(h))
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def measure(model: nn.Module, dim: int, variants: dict, prompt: mx.array, args) -> dict:
    """``{label: (median tok/s, tokens of the last run, head ms)}`` for ``{label: mode}`` in rounds."""
    wrapper = AutoregressiveWrapper(model)
    for mode in variants.values():  # warm-up: first-call work (caches, kernel setup) is not timed
        decode(wrapper, prompt, 2, mode)
    rates = {label: [] for label in variants}
    tokens = {}
    for _ in range(args.repeats):
        for label, mode in variants.items():
            rate, tokens[label] = decode(wrapper, prompt, args.steps, mode)
            rates[label].append(rate)
    return {label: (statistics.median(rates[label]), tokens[label], head_ms(model, dim, mode))
            for label, mode in variants.items()}


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bitnet_rows(args, prompt: mx.array) -> dict:
    with tempfile.TemporaryDirectory(prefix="cpu_decode_bitnet_") as tmp:
        start = time.perf_counter()
        write_bitnet(Path(tmp), args.layers or BITNET["num_hidden_layers"])
        free()
        model = mlx_zeta.from_pretrained(tmp)
        print(f"# bitnet: wrote + loaded in {time.perf_counter() - start:.0f} s, {gigabytes(model):.2f} GB",
              file=sys.stderr, flush=True)
    kinds = {m.kernel for _, m in model.named_modules() if isinstance(m, TernaryLinear)}
    if args.ternary_kernel:  # the loader builds TernaryLinear(kernel="unpack"), which never takes a native path
        for _, m in model.named_modules():
            if isinstance(m, TernaryLinear):
                m.kernel = args.ternary_kernel
    args.ternary_kernels = f"{'/'.join(sorted(kinds))} as loaded" + (
        f", set to {args.ternary_kernel!r}" if args.ternary_kernel else "")
    low = measure(model, BITNET["hidden_size"], {"native": "auto", "off": "off"}, prompt, args)
    print(f"# bitnet low-bit: { {k: round(v[0], 2) for k, v in low.items()} }", file=sys.stderr, flush=True)
    count = to_float_twin(model)
    free()
    print(f"# bitnet float32 twin: {count} layers, {gigabytes(model):.2f} GB", file=sys.stderr, flush=True)
    high = measure(model, BITNET["hidden_size"], {"float32": "auto"}, prompt, args)
    del model
    free()
    return {**high, **low}


def llama_rows(args, prompt: mx.array) -> dict:
    model = build_llama(args.layers or LLAMA["num_hidden_layers"])
    print(f"# llama float32: {gigabytes(model):.2f} GB", file=sys.stderr, flush=True)
    high = measure(model, LLAMA["hidden_size"], {"float32": "auto"}, prompt, args)
    quantize(model, 4, 64)
    mx.eval(model.parameters())
    free()
    print(f"# llama 4-bit: {gigabytes(model):.2f} GB ({type(model.token_emb).__name__} head)",
          file=sys.stderr, flush=True)
    low = measure(model, LLAMA["hidden_size"], {"native": "auto", "off": "off"}, prompt, args)
    del model
    free()
    return {**high, **low}


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=0, help="depth of every model (default: full depth)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--ternary-kernel", choices=("auto", "fused", "affine", "unpack"),
                        help="set every TernaryLinear's kernel after loading (default: as the loader builds it)")
    parser.add_argument("--models", nargs="+", choices=("bitnet", "llama"), default=["bitnet", "llama"])
    args = parser.parse_args()

    mx.random.seed(0)
    prompt = mx.random.randint(0, VOCAB, (1, PROMPT)).astype(mx.int32)
    info = kernels.info()
    names = {"bitnet": ("BitNet-b1.58-2B-shaped", "ternary", bitnet_rows),
             "llama": ("Llama-3.2-1B-shaped", "4-bit", llama_rows)}
    depth = {"bitnet": BITNET, "llama": LLAMA}
    results, failed = [], False
    for key in args.models:
        title, kind, rows = names[key]
        start = time.perf_counter()
        r = rows(args, prompt)
        seconds = time.perf_counter() - start
        agree = leading_agreement(r["native"][1], r["off"][1])
        failed |= agree == 0
        results.append((title, kind, args.layers or depth[key]["num_hidden_layers"], r, agree, seconds))

    blas = mlx_zeta.blas_info()
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"BLAS: {blas['vendor']}; native CPU kernels: {info['native_cpu_reason']}, ISA {info['cpu_isa']}, "
          f"{info['cpu_threads']} threads; batch 1, greedy, {PROMPT}-token prompt prefilled, then median of "
          f"{args.repeats} runs of {args.steps} timed decode steps"
          + (f"; TernaryLinear kernel: {args.ternary_kernels}" if "bitnet" in args.models else "") + "\n")
    print("| model | layers | float32 tok/s | low-bit native tok/s | low-bit off tok/s | native / float32 "
          "| off / float32 | native / off | head ms (f32 / native / off) | tokens agree |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for title, kind, layers, r, agree, _ in results:
        f, n, o = (r[k][0] for k in ("float32", "native", "off"))
        heads = " / ".join(f"{r[k][2]:.1f}" for k in ("float32", "native", "off"))
        print(f"| {title} ({kind}) | {layers} | {f:.2f} | {n:.2f} | {o:.2f} | {n / f:.2f}x | {o / f:.2f}x "
              f"| {n / o:.2f}x | {heads} | {agree}/{len(r['native'][1])} |")
    print()
    for title, kind, _, r, agree, seconds in results:
        print(f"{title}: {seconds:.0f} s; first native tokens {r['native'][1][:8]}, off {r['off'][1][:8]}"
              + ("" if agree == len(r["native"][1]) else f" (they part at token {agree})"))
    print(f"\ncommand: .venv/bin/python benchmarks/cpu_decode.py {shlex.join(sys.argv[1:])}")
    if failed:
        print("FAILED: the native and off runs of a low-bit model disagree at the first token", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
