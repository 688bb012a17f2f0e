"""llama.cpp decode speed on random-weight models of given shapes (the reference point of the native
CPU kernels), through llama-cpp-python; a benchmark-only extra (``pip install mlx-zeta[llamacpp]``,
best in its own virtual environment: it builds llama.cpp from source).

For each model: write a GGUF file of Llama architecture (``general.architecture = llama``, no
tokenizer: ``tokenizer.ggml.model = no_vocab``) with random weights, the block matrices quantized by
``gguf.quants`` to the named type (TQ2_0: ternary, 2 bits + one f16 scale per 256 weights; Q4_0:
4 bits + one f16 scale per 32), norms float32, the tied token embedding / output matrix in
``--embed-type``; then load it with ``llama_cpp.Llama`` and time decoding: evaluate a prompt of
``--prompt`` random tokens, then ``--tokens`` single-token evaluations (each one llama_decode of
one token with its logits; no sampling). Tensors of one shape share one random draw (decode time
does not depend on the values; each is still its own copy in the file). Files are cached under
``--dir`` by shape and type.

Models (``--layers`` shrinks them for a quick run):
- bitnet-2b: BitNet b1.58 2B4T's shape (dim 2560, 30 layers, FFN 6912, 20 heads, 5 KV heads,
  vocab 128256), block matrices TQ2_0 (as a Llama-architecture model: no sub-norms, SiLU gate);
- llama-1b: Llama 3.2 1B's shape (dim 2048, 16 layers, FFN 8192, 32 heads, 8 KV heads, vocab
  128256), block matrices Q4_0.

    /tmp/llvenv/bin/python benchmarks/llamacpp_decode.py [--models bitnet-2b llama-1b] [--threads 2]
        [--tokens 32] [--layers N] [--embed-type F16]
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

MODELS = {
    "bitnet-2b": dict(dim=2560, layers=30, ffn=6912, heads=20, kv_heads=5, vocab=128256, qtype="TQ2_0"),
    "llama-1b": dict(dim=2048, layers=16, ffn=8192, heads=32, kv_heads=8, vocab=128256, qtype="Q4_0"),
}


def random_weights(rng, shape, qtype):
    """Quantized bytes of a random (out, in) matrix: ternary draws (values in {-s, 0, s}, exact in
    TQ2_0) for ternary types, Gaussian ones otherwise."""
    import gguf

    if qtype.startswith("TQ"):
        w = rng.integers(-1, 2, size=shape).astype(np.float32) * 0.02
    else:
        w = rng.standard_normal(shape, dtype=np.float32) * shape[1] ** -0.5
    t = gguf.GGMLQuantizationType[qtype]
    return (w if t == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(w, t)), t


def write_gguf(path: str, cfg: dict, embed_type: str, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    dim, ffn, heads, kv, vocab = cfg["dim"], cfg["ffn"], cfg["heads"], cfg["kv_heads"], cfg["vocab"]
    head_dim = dim // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(4096)
    w.add_embedding_length(dim)
    w.add_block_count(cfg["layers"])
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("no_vocab")
    shapes = {"attn_q": (dim, dim), "attn_k": (kv * head_dim, dim), "attn_v": (kv * head_dim, dim),
              "attn_output": (dim, dim), "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
    drawn = {}
    for shape in set(shapes.values()):
        drawn[shape] = random_weights(rng, shape, cfg["qtype"])
    norm = np.ones(dim, np.float32)
    embed, embed_t = random_weights(rng, (vocab, dim), embed_type)
    w.add_tensor("token_embd.weight", embed, raw_dtype=embed_t)  # tied: llama.cpp reuses it as output
    w.add_tensor("output_norm.weight", norm)
    for i in range(cfg["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        for name, shape in shapes.items():
            data, t = drawn[shape]
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def decode_tok_s(path: str, threads: int, prompt: int, tokens: int, vocab: int) -> tuple[float, float]:
    """(decode tokens per second, prompt tokens per second) of llama.cpp on the model at ``path``."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=prompt + tokens + 16, n_batch=max(prompt, 8), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(0, vocab, size=prompt + tokens)]
    llm.eval(ids[:4])  # pages in the weights; then start over
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids[:prompt])
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for t in ids[prompt:]:
        llm.eval([t])
    decode = time.perf_counter() - start
    del llm
    return tokens / decode, prompt / prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens evaluated before timing decode")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens timed")
    parser.add_argument("--layers", type=int, help="override the layer count (quick runs)")
    parser.add_argument("--embed-type", default="F16", help="GGML type of the tied embedding/output matrix")
    parser.add_argument("--dir", default="/tmp/llamacpp_bench", help="where the GGUF files are cached")
    args = parser.parse_args()
    import llama_cpp

    os.makedirs(args.dir, exist_ok=True)
    print(f"llama-cpp-python {llama_cpp.__version__}; {platform.platform()}; {os.cpu_count()} cores; "
          f"{args.threads} threads; prompt {args.prompt} tokens, then {args.tokens} decoded tokens timed; "
          f"tied embedding/output {args.embed_type}")
    print(f"llama.cpp: {llama_cpp.llama_print_system_info().decode().strip()}\n")
    print("| model | type | layers | GGUF MiB | decode tok/s | ms/token | prompt tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        cfg = dict(MODELS[name])
        if args.layers:
            cfg["layers"] = args.layers
        path = os.path.join(args.dir, f"{name}-L{cfg['layers']}-{cfg['qtype']}-emb{args.embed_type}.gguf")
        if not os.path.exists(path):
            start = time.perf_counter()
            write_gguf(path + ".tmp", cfg, args.embed_type)
            os.replace(path + ".tmp", path)
            print(f"  wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        try:
            tok_s, prefill = decode_tok_s(path, args.threads, args.prompt, args.tokens, cfg["vocab"])
            cells = f"{tok_s:.2f} | {1e3 / tok_s:.1f} | {prefill:.1f}"
        except Exception as err:  # an unsupported type or a load failure is a result too
            cells = f"failed: {type(err).__name__}: {err} | - | -"
        print(f"| {name} | {cfg['qtype']} | {cfg['layers']} | {os.path.getsize(path) / 2**20:.0f} | {cells} |",
              flush=True)


if __name__ == "__main__":
    main()
