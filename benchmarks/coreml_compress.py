"""Phone-sized Core ML decoders: package bytes and numerical error per weight compression, side by side.

Two converted checkpoints (random weights, made here with ``transformers``, converted with
``mlx_zeta.from_pretrained``):

* a Llama-shaped model of ~100M parameters (hidden 768, 8 layers, GQA 12/4 heads, 32000 ids, untied);
* a tiny Qwen3 (hidden 128, 2 layers, qk-norm, tied embeddings).

Each is exported with ``export_decoder`` (capacity 64, one ``prefill_8`` function and ``decode``,
float16 activations) as: fp16 weights, ``compress="int8"``, ``"int4"`` (= int4-block32),
``"palettize4"``, and from an MLX-quantized copy (``mlx_zeta.converters.quantize(model, 4, 64)``,
exported with no ``compress``: its weights map onto Core ML's shift-scale). Every package is run by the
numpy Evaluator (no Apple hardware here): an 8-token prompt, then 32 decode steps fed MLX's greedy
tokens, with the KV cache as state. Against MLX's logits for the same tokens (the float model, or the
quantized one for the MLX-q4 row): the max abs logit error (and relative to the max |logit|), and
greedy agreement, the steps whose argmax equals MLX's greedy token. The MLX-q4 row also gives the
largest distance of a decoded weight from MLX's dequantized weight, in float16 ulps of its row's
largest weight. Package bytes are the folder on disk (its ``weight.bin`` alone too: each function's
program text, ~56 KB, weighs on tiny models).

    nice .venv/bin/python benchmarks/coreml_compress.py [--models llama100m,qwen3] [--modes fp16,int8,...]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_zeta.converters import from_pretrained, quantize
from mlx_zeta.converters.coreml import export_decoder, package_summary
from mlx_zeta.converters.coreml.compress import affine_error
from mlx_zeta.converters.coreml.evaluate import Evaluator
from mlx_zeta.converters.coreml.weights import export_standins
from mlx_zeta.structs import AutoregressiveWrapper

PREFILL, STEPS, CAPACITY = 8, 32, 64
MODES = ("fp16", "int8", "int4", "palettize4", "mlx-q4")
LLAMAS = {  # Llama shapes (untied) by name: ~100M parameters, and a tiny one (benchmarks/coreai_export.py)
    "llama100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=12, num_key_value_heads=4),
    "llama-tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2),
}


def checkpoint(name: str, folder: Path) -> Path:
    """A random transformers checkpoint saved to ``folder``: a Llama of :data:`LLAMAS`, else the tiny Qwen3."""
    import torch
    import transformers

    torch.manual_seed(0)
    if name in LLAMAS:
        config = transformers.LlamaConfig(**LLAMAS[name], max_position_embeddings=CAPACITY, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(vocab_size=2048, hidden_size=128, intermediate_size=384,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, max_position_embeddings=CAPACITY, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    model.eval().save_pretrained(folder)
    return folder


def run_package(package: Path, prompt: np.ndarray, tokens: list) -> np.ndarray:
    """Logits (PREFILL + STEPS, vocab) of ``prefill_8`` on ``prompt`` then ``decode`` fed ``tokens``."""
    state: dict = {}
    prefill = Evaluator(package, function=f"prefill_{PREFILL}", state=state)
    decode = Evaluator(package, function="decode", state=state)
    rows = [prefill({"input_ids": prompt, "position": np.array([0], np.int32)})["logits"][0]]
    for t, token in enumerate(tokens):
        out = decode({"input_ids": np.array([[token]], np.int32), "position": np.array([PREFILL + t], np.int32)})
        rows.append(out["logits"][0])
    return np.concatenate(rows).astype(np.float64)


def reference(model, prompt: np.ndarray):
    """MLX's greedy tokens after ``prompt`` and its logits for prompt + those tokens (all but the last)."""
    tokens = np.array(AutoregressiveWrapper(model).generate(mx.array(prompt), STEPS, temperature=0.0))[0].tolist()
    seq = mx.array([prompt[0].tolist() + tokens[:-1]])
    return tokens, np.array(model(seq).astype(mx.float32))[0].astype(np.float64)


def measure(name: str, mode: str, model, prompt, folder: Path) -> dict:
    tokens, ref = reference(model, prompt)
    start = time.perf_counter()
    package = export_decoder(model, folder / f"{name}-{mode}.mlpackage", capacity=CAPACITY, prefill_lens=(PREFILL,),
                             compress=None if mode in ("fp16", "mlx-q4") else mode)
    exported = time.perf_counter() - start
    got = run_package(package, prompt, tokens[:-1])
    err = np.abs(got - ref)
    greedy = got[PREFILL - 1:].argmax(axis=-1)
    weights = sum(f.stat().st_size for f in package.rglob("weight.bin"))
    row = {"model": name, "mode": mode, "bytes": package_summary(package)["bytes"], "weights": weights,
           "export_s": exported,
           "eval_s": time.perf_counter() - start - exported, "max_abs": float(err.max()),
           "rel": float(err.max() / np.abs(ref).max()), "agree": int(np.sum(greedy == np.array(tokens)))}
    if mode == "mlx-q4":
        with export_standins(model) as (_, weights):
            errors = [affine_error(c, dense, np.float16) for dense, c, kind in weights if kind == "affine"]
        row["ulps"] = max(e["max_ulps"] for e in errors)
        row["exact"] = min(e["exact"] for e in errors)
    return row


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama100m,qwen3")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args(argv)
    print(f"# {platform.machine()}, mlx {mx.__version__}, python {platform.python_version()}")
    print(f"# {shlex.join(['python'] + sys.argv)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model = from_pretrained(checkpoint(name, tmp / name))
            vocab = model.token_emb.weight.shape[0]
            prompt = np.random.default_rng(0).integers(0, vocab, (1, PREFILL)).astype(np.int32)
            print(f"# {name}: {n_params(model) / 1e6:.1f}M parameters", flush=True)
            for mode in args.modes.split(","):
                if mode == "mlx-q4":
                    quantize(model, bits=4, group_size=64)
                rows.append(measure(name, mode, model, prompt, tmp))
                print_row(rows[-1], rows)
                shutil.rmtree(tmp / f"{name}-{mode}.mlpackage")
    return 0


def print_row(row: dict, rows: list) -> None:
    fp16 = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "fp16"), None)
    ratio = f"{row['bytes'] / fp16['bytes']:.3f}x / {row['weights'] / fp16['weights']:.3f}x" if fp16 else "-"
    extra = ""
    if "ulps" in row:
        extra = f" (weights within {row['ulps']:.1f} fp16 ulps of MLX's, >= {row['exact']:.1%} equal)"
    print(f"| {row['model']} | {row['mode']} | {row['bytes'] / 2**20:.2f} MiB | {ratio} | {row['max_abs']:.3g} | "
          f"{row['rel']:.2e} | {row['agree']}/{STEPS} | {row['export_s']:.0f} s | {row['eval_s']:.0f} s{extra} |",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
