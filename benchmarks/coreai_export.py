"""Core AI export next to Core ML export, and Apple's Linux Core AI runtime decoding next to MLX.

Per model, side by side in one run (random weights):

* ``gqa-tiny``: a decoder from our blocks (width 64, 2 layers, 4 query / 2 key-value heads, rotary,
  RMSNorm, SwiGLU, 512 ids);
* ``llama-tiny`` and ``llama100m``: ``transformers`` Llama checkpoints (``coreml_compress.LLAMAS``)
  converted with ``mlx_zeta.from_pretrained``.

Each model is exported as a stateful decoder (capacity 64, ``prefill_8`` + ``decode``) by
``export_decoder_coreai`` (``.aimodel``) and by ``export_decoder`` (Core ML ``.mlpackage``, float16),
both with float16 weights and with ``compress="int4"`` (blocks of 32): export wall time and bytes on disk.
Then an 8-token prompt is prefilled and ``--steps`` greedy decode steps are timed (tokens/s, median
of ``--repeats`` rounds, MLX and Core AI alternating): Apple's Core AI runtime (``coreai-core`` on the
Linux CPU, float32 compute, the KV cache as the bundle's states) on bundles with float32 weights, float16
weights and int4 weights (``--int4-steps``, one round: slow), and MLX (CPU, float32, the model's KV
cache through ``AutoregressiveWrapper.stream``). "greedy agree": tokens of the float32-weight bundle,
free running, equal to MLX's. These are Linux CPU numbers of the runtime Apple ships for checking
exports, not device numbers.

    nice .venv/bin/python benchmarks/coreai_export.py [--models gqa-tiny,llama-tiny,llama100m] [--steps 32]
        [--repeats 3] [--int4-steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np

from coreml_compress import CAPACITY, PREFILL, checkpoint, n_params
from decode import per_token_seconds
from mlx_zeta.converters import from_pretrained
from mlx_zeta.converters.coreai import Bundle, export_decoder_coreai, read_bundle_metadata
from mlx_zeta.converters.coreai.stateful import state_names
from mlx_zeta.converters.coreml import export_decoder
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer

MODELS = ("gqa-tiny", "llama-tiny", "llama100m")


def gqa_tiny() -> Transformer:
    mx.random.seed(0)
    model = Transformer(num_tokens=512, max_seq_len=CAPACITY, attn_layers=Decoder(
        dim=64, depth=2, heads=4, attn_kv_heads=2, rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True,
        ff_swish=True))
    mx.eval(model.parameters())
    return model


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def exports(model, folder: Path) -> dict:
    """{(backend, mode): (export s, bytes, path)}: Core AI and Core ML with float16 weights ("fp16") and
    ``compress="int4"``, and a Core AI bundle with float32 weights ("fp32", for the decode checks)."""
    out = {}
    for mode, compress in (("fp16", None), ("int4", "int4"), ("fp32", None)):
        weights = "float32" if mode == "fp32" else "float16"
        path, s = timed(lambda: export_decoder_coreai(model, folder / f"{mode}.aimodel", capacity=CAPACITY,
                                                      prefill_lens=(PREFILL,), weights=weights, compress=compress))
        out["coreai", mode] = (s, folder_bytes(path), path)
        if mode != "fp32":
            path, s = timed(lambda: export_decoder(model, folder / f"{mode}.mlpackage", capacity=CAPACITY,
                                                   prefill_lens=(PREFILL,), compress=compress))
            out["coreml", mode] = (s, folder_bytes(path), path)
    return out


def coreai_decode(path: Path, prompt: np.ndarray, steps: int):
    """(tokens/s of ``steps`` greedy decode calls after the prefill and its token, the greedy tokens)."""
    shapes = json.loads(read_bundle_metadata(path)["user"]["mlx_zeta.state_shapes"])
    with Bundle(path) as bundle:
        state = bundle.new_state({name: np.zeros(shape, np.float32)
                                  for name, shape in zip(state_names(len(shapes) // 2), shapes)})
        feeds = {"input_ids": prompt, "position": np.array([0], np.int32)}
        tokens = [int(bundle(f"prefill_{PREFILL}", feeds, state)["logits"][0, -1].argmax())]
        bundle.signature("decode")  # loads the function: not timed, as MLX's first token is not
        start = time.perf_counter()
        for t in range(steps):
            feeds = {"input_ids": np.array([[tokens[-1]]], np.int32), "position": np.array([PREFILL + t], np.int32)}
            tokens.append(int(bundle("decode", feeds, state)["logits"][0, 0].argmax()))
        return steps / (time.perf_counter() - start), tokens


def speeds(model, packages: dict, prompt: np.ndarray, steps: int, repeats: int, int4_steps: int) -> dict:
    """Median tokens/s of MLX (cached) and of the Core AI fp32/fp16-weight bundles over ``steps`` steps, in
    alternating rounds; the int4 bundle once over ``int4_steps`` (its runtime decodes the weights every
    call: ~10 s per step at 100M); the fp32 bundle's greedy tokens equal to MLX's."""
    wrapper = AutoregressiveWrapper(model)
    want = np.array(wrapper.generate(mx.array(prompt), steps + 1, temperature=0.0))[0].tolist()
    rounds = {"mlx": [], "fp32": [], "fp16": []}
    for _ in range(repeats):
        rounds["mlx"].append(1.0 / per_token_seconds(wrapper, mx.array(prompt), steps, True))
        for mode in ("fp32", "fp16"):
            rate, tokens = coreai_decode(packages["coreai", mode][2], prompt, steps)
            rounds[mode].append(rate)
            if mode == "fp32":
                agree = sum(a == b for a, b in zip(tokens, want))
    out = {k: statistics.median(v) for k, v in rounds.items()}
    out["int4"] = coreai_decode(packages["coreai", "int4"][2], prompt, int4_steps)[0]
    out["agree"] = agree
    return out


def build(name: str, folder: Path):
    return gqa_tiny() if name == "gqa-tiny" else from_pretrained(checkpoint(name, folder / "hf"))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), mlx {mx.__version__}"


HEADER = ("| model | parameters | export s: Core AI fp16 / int4 | Core ML fp16 / int4 | .aimodel MiB fp16 / int4 | "
          ".mlpackage MiB fp16 / int4 | decode tok/s: Core AI fp32 / fp16 / int4 weights | MLX | greedy agree |\n"
          + "| --- " * 9 + "|")


def row(name: str, params: int, ex: dict, sp: dict, steps: int) -> str:
    pair = lambda backend, i, fmt: " / ".join(fmt(ex[backend, m][i]) for m in ("fp16", "int4"))  # noqa: E731
    secs, mib = (lambda v: f"{v:.1f}"), (lambda v: f"{v / 2**20:.2f}")
    return (f"| {name} | {params / 1e6:.1f}M | {pair('coreai', 0, secs)} | {pair('coreml', 0, secs)} | "
            f"{pair('coreai', 1, mib)} | {pair('coreml', 1, mib)} | "
            f"{sp['fp32']:.1f} / {sp['fp16']:.1f} / {sp['int4']:.2f} | {sp['mlx']:.1f} | {sp['agree']}/{steps + 1} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--int4-steps", type=int, default=4)
    args = p.parse_args(argv)
    print(f"# {machine()}, python {platform.python_version()}")
    print(f"# {shlex.join(['python'] + sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:  # not timed: the exporters' lazy imports (coremltools: seconds)
        exports(gqa_tiny(), Path(tmp))
    print(HEADER, flush=True)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model = build(name, Path(tmp))
            vocab = model.token_emb.weight.shape[0]
            prompt = np.random.default_rng(0).integers(0, vocab, (1, PREFILL)).astype(np.int32)
            ex = exports(model, Path(tmp))
            sp = speeds(model, ex, prompt, args.steps, args.repeats, args.int4_steps)
            print(row(name, n_params(model), ex, sp, args.steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
