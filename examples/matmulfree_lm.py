"""A tiny MatMul-free LM (ternary MLGRU token mixer + ternary GLU) trained on a synthetic task:
each sequence counts modulo 16 from a random start with a random stride of 1, 2 or 3, so the
model must infer the stride from the prompt. It then continues prompts greedily, once with the
recurrent cache (one token per step, constant state) and once recomputing the whole sequence.

    .venv/bin/python examples/matmulfree_lm.py
"""

import time

import mlx_zeta  # noqa: F401  (before mlx: routes BLAS)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_zeta.models import MatMulFreeLM
from mlx_zeta.structs.autoregressive import AutoregressiveWrapper

VOCAB, LENGTH, STEPS = 16, 24, 40
mx.random.seed(0)


def batch(n: int) -> mx.array:
    """(n, LENGTH) sequences start + stride * t (mod VOCAB)."""
    start = mx.random.randint(0, VOCAB, (n, 1))
    stride = mx.random.randint(1, 4, (n, 1))
    return (start + stride * mx.arange(LENGTH)[None]) % VOCAB


model = AutoregressiveWrapper(MatMulFreeLM(num_tokens=VOCAB, dim=64, depth=2, max_seq_len=64))
optimizer = optim.Adam(learning_rate=5e-3)
loss_and_grad = nn.value_and_grad(model, lambda tokens: model(tokens))

start = time.perf_counter()
for step in range(STEPS):
    loss, grads = loss_and_grad(batch(16))
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    if step % 8 == 0 or step == STEPS - 1:
        print(f"step {step:2d}  loss {loss.item():.3f}")
print(f"trained {STEPS} steps in {time.perf_counter() - start:.1f} s")

prompt = batch(3)[:, :4]
recurrent = model.generate(prompt, 10, temperature=0.0, cache=True)
recomputed = model.generate(prompt, 10, temperature=0.0, cache=False)
stride = (prompt[:, 1:2] - prompt[:, :1]) % VOCAB
expected = (prompt[:, -1:] + stride * mx.arange(1, 11)[None]) % VOCAB
for i in range(prompt.shape[0]):
    print(f"prompt {prompt[i].tolist()}\n  recurrent  {recurrent[i].tolist()}\n  recomputed {recomputed[i].tolist()}")
print(f"recurrent and recomputed generation agree: {mx.array_equal(recurrent, recomputed).item()}")
print(f"continuations follow the stride rule: {(recurrent == expected).mean().item():.0%} of tokens")
