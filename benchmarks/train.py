"""Training throughput: mlx_zeta's Trainer against a plain PyTorch loop on the CPU, on
the same model (a 4-layer, width-256 decoder, 8 heads, absolute positions, vocab 1024),
batch 8 x 128 positions, AdamW, gradients clipped to norm 1.

Both sides start from the same weights (copied into the torch twin of
tests/reference/structs.py) and see the same batches. A step is timed from fetching the
batch to the loss read back (the update included). Rows are measured in rounds
(every variant runs ``--steps`` steps per round, the first round is a warm-up), so
load drift on a shared machine touches all rows alike; tokens/s is 8 x 128 over the
median step time. Other processes may share the CPU: compare rows of one run only.

    .venv/bin/python benchmarks/train.py [--rounds 3] [--steps 5] [--bf16]
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer
from mlx_zeta.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

DIM, DEPTH, HEADS, VOCAB, SEQ, BATCH = 256, 4, 8, 1024, 128, 8
HP = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
LR, CLIP = 3e-4, 1.0


def batches(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (count, BATCH, SEQ + 1)).astype(np.int32)


def mlx_runner(data: np.ndarray, **trainer_kw):
    mx.random.seed(0)
    net = Transformer(num_tokens=VOCAB, max_seq_len=SEQ, attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=HEADS))
    mx.eval(net.parameters())
    opt = optim.AdamW(learning_rate=LR, bias_correction=True, **HP)
    trainer = Trainer(AutoregressiveWrapper(net), opt, lambda i: mx.array(data[i % len(data)]), max_grad_norm=CLIP,
                      group=None, progress=False, log_every=10**9, **trainer_kw)

    def step() -> float:
        start = time.perf_counter()
        trainer.train_step()  # evaluates the update and reads the loss back
        return time.perf_counter() - start

    return net, step


def torch_runner(net, data: np.ndarray):
    import torch
    from parity import copy_params
    from reference.structs import TorchAttentionLayers, TorchTransformer
    from reference.training import next_token_loss

    ref = TorchTransformer(VOCAB, SEQ, TorchAttentionLayers(dim=DIM, depth=DEPTH, heads=HEADS, causal=True), DIM)
    copy_params(net, ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, **HP)
    tokens = torch.from_numpy(data).long()
    count = [0]

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = next_token_loss(ref, tokens[count[0] % len(tokens)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        loss.item()
        count[0] += 1
        return time.perf_counter() - start

    return step, torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--bf16", action="store_true", help="add a bfloat16 mixed-precision row (slow on the CPU)")
    args = parser.parse_args()

    data = batches(16)
    net, compiled = mlx_runner(data)
    variants = {"mlx_zeta Trainer, float32, compiled": compiled,
                "mlx_zeta Trainer, float32, compile=False": mlx_runner(data, compile=False)[1]}
    if args.bf16:
        variants["mlx_zeta Trainer, bfloat16 compute (float32 masters)"] = mlx_runner(data, precision="bfloat16")[1]
    torch_step, torch = torch_runner(net, data)
    variants["PyTorch loop (eager), float32"] = torch_step
    times = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name, step in variants.items():
            measured = [step() for _ in range(args.steps)]
            if round_:
                times[name].extend(measured)

    info = mlx_zeta.blas_info()
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__} "
          f"({mx.default_device()}, BLAS: {info['vendor']}), torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); {DEPTH} layers, dim {DIM}, {HEADS} heads, vocab {VOCAB}, batch {BATCH} x {SEQ}, AdamW, clip "
          f"{CLIP}; median of {args.rounds} x {args.steps} steps after a warm-up round\n")
    base = BATCH * SEQ / statistics.median(times["PyTorch loop (eager), float32"])
    print("| training loop | ms/step | tokens/s | vs PyTorch |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        median = statistics.median(ts)
        rate = BATCH * SEQ / median
        print(f"| {name} | {median * 1e3:.1f} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
