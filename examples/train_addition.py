"""The `make demo` main job: train a small decoder to add numbers, then let it answer.

The task is generated, not downloaded: ``a+b=`` with two ``--digits``-digit numbers,
answered by the digits of the sum and an end token, every number written least
significant digit first (the order in which a person carries). A decoder (rotary positions, RMSNorm, SwiGLU) is
trained with :class:`mlx_zeta.training.Trainer` (AdamW, warmup + cosine, gradient
clipping) on the answer tokens only; its BitLinear twin (:func:`mlx_zeta.quant.quantize_model`,
ternary weights) is trained the same way, frozen to packed ternary weights, and both
answer held-out problems by greedy KV-cached generation. Printed: the loss as it goes,
exact-match accuracy of each, sizes.

    .venv/bin/python examples/train_addition.py                 # the default run (~1 min on 2 cores)
    .venv/bin/python examples/train_addition.py --digits 4 --steps 3000 --dim 256 --depth 4
"""

import argparse
import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_zeta.quant import freeze_model, quantize_model
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer
from mlx_zeta.training import Trainer, is_main_process, warmup_cosine, world

PLUS, EQUALS, END = 10, 11, 12  # tokens 0-9 are digits
VOCAB = 13


def digits_of(x: np.ndarray, width: int) -> np.ndarray:
    """(n, width) digits of ``x``, least significant first."""
    return np.stack([(x // 10 ** k) % 10 for k in range(width)], axis=1)


def problems(rng: np.random.Generator, n: int, digits: int):
    """``n`` problems: (prompt tokens (n, 2 digits + 2), answer tokens (n, digits + 2)).

    Every number is written least significant digit first, so answer digit k lines up
    with digit k of both operands and the carry comes from the digit just written.
    """
    a, b = rng.integers(0, 10 ** digits, n), rng.integers(0, 10 ** digits, n)
    prompt = np.concatenate([digits_of(a, digits), np.full((n, 1), PLUS), digits_of(b, digits),
                             np.full((n, 1), EQUALS)], axis=1)
    answer = np.concatenate([digits_of(a + b, digits + 1), np.full((n, 1), END)], axis=1)
    return prompt.astype(np.int32), answer.astype(np.int32)


def show(prompt: np.ndarray, answer: np.ndarray) -> str:
    return "".join("0123456789+=$"[t] for t in np.concatenate([prompt, answer]))


def answer_loss(model: AutoregressiveWrapper, batch) -> mx.array:
    """Next-token cross-entropy on the answer positions only (the prompt is given, not learned)."""
    tokens, prompt_len = batch
    logits = model.net(tokens[:, :-1])[:, prompt_len - 1:]  # predictions of the answer tokens
    return nn.losses.cross_entropy(logits, tokens[:, prompt_len:], reduction="mean")


def accuracy(model: AutoregressiveWrapper, prompt: np.ndarray, answer: np.ndarray) -> float:
    """Exact-match rate of greedy, KV-cached answers."""
    out = model.generate(mx.array(prompt), answer.shape[1], temperature=0)
    return float((np.array(out) == answer).all(axis=1).mean())


def build(args) -> AutoregressiveWrapper:
    layers = Decoder(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True, use_rmsnorm=True,
                     ff_swiglu=True, ff_mult=2)
    return AutoregressiveWrapper(Transformer(num_tokens=VOCAB, max_seq_len=4 * args.digits + 4, attn_layers=layers))


def say(*args) -> None:
    """print on rank 0 only (every rank runs this script under mlx.launch)."""
    if is_main_process():
        print(*args)


def param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def train(name: str, model: AutoregressiveWrapper, args, test, lr: float) -> AutoregressiveWrapper:
    prompt_len = 2 * args.digits + 2

    group = world()  # under mlx.launch: each rank draws its own problems, the Trainer averages gradients
    rank = group.rank() if group is not None else 0

    def batch(i: int):
        prompt, answer = problems(np.random.default_rng([args.seed, i] + ([rank] if rank else [])), args.batch, args.digits)
        return mx.array(np.concatenate([prompt, answer], axis=1)), prompt_len

    schedule = warmup_cosine(lr, warmup_steps=args.steps // 20, total_steps=args.steps, min_lr=lr / 20)
    trainer = Trainer(model, optim.AdamW(learning_rate=schedule, weight_decay=0.01, bias_correction=True), data=batch, loss_fn=answer_loss,
                      max_grad_norm=1.0, log_every=max(1, args.steps // 5), progress=False,
                      eval_fn=lambda m: {"exact_match": accuracy(m, *test)}, eval_every=args.steps,
                      stream=open("/dev/null", "w") if args.quiet else None)
    start = time.perf_counter()
    losses = trainer.train(args.steps)
    say(f"[{name}] {args.steps} steps in {time.perf_counter() - start:.1f} s, loss {losses[0]:.3f} -> "
        f"{np.mean(losses[-20:]):.3f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ternary-lr", type=float, default=3e-3, help="peak learning rate of the BitLinear twin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=500, help="held-out problems")
    parser.add_argument("--no-ternary", action="store_true", help="skip the BitLinear twin")
    parser.add_argument("--quiet", action="store_true", help="no per-step log lines")
    args = parser.parse_args()

    test = problems(np.random.default_rng([args.seed, 10**9]), args.test, args.digits)
    say(f"task: {args.digits}-digit addition, digits least significant first, e.g. {show(test[0][0], test[1][0])}")

    mx.random.seed(args.seed)
    model = train("float", build(args), args, test, args.lr)
    acc = accuracy(model, *test)
    say(f"[float] exact match on {args.test} held-out problems: {acc:.1%}; weights {param_bytes(model) / 1e3:.0f} kB")

    if not args.no_ternary:
        mx.random.seed(args.seed)
        twin = quantize_model(build(args))
        train("ternary", twin, args, test, args.ternary_lr)
        qat = accuracy(twin, *test)
        freeze_model(twin)
        packed = accuracy(twin, *test)
        say(f"[ternary] exact match: {qat:.1%} as trained (BitLinear), {packed:.1%} frozen to packed ternary; "
              f"weights {param_bytes(twin) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
