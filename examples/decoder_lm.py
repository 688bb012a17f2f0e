"""A small decoder language model, trained and sampled the way zeta's README does it.

``Transformer(num_tokens, max_seq_len, attn_layers=Decoder(...))`` with rotary positions,
grouped-query attention, RMSNorm and SwiGLU, wrapped in ``AutoregressiveWrapper``, learns a
toy task with AdamW: arithmetic progressions modulo the vocabulary, x_t = (s + d t) mod V
with a random start s and stride d in 1..3, so the next token follows from the last two.
Then it continues prompts greedily (KV cache, and checked against recomputation) and by
sampling (temperature, top-k, top-p), streaming tokens as they come.

    .venv/bin/python examples/decoder_lm.py
"""

import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer

VOCAB, SEQ, BATCH, STEPS = 32, 24, 32, 60
mx.random.seed(0)
rng = np.random.default_rng(0)


def batch(n: int) -> mx.array:
    """(n, SEQ) progressions (s + d t) mod VOCAB."""
    start = rng.integers(0, VOCAB, (n, 1))
    stride = rng.integers(1, 4, (n, 1))
    return mx.array(((start + stride * np.arange(SEQ)) % VOCAB).astype(np.int32))


net = Transformer(
    num_tokens=VOCAB,
    max_seq_len=128,
    attn_layers=Decoder(dim=64, depth=2, heads=4, attn_kv_heads=2, rotary_pos_emb=True, use_rmsnorm=True,
                        ff_swiglu=True, ff_mult=2),
)
model = AutoregressiveWrapper(net)
n_params = sum(v.size for _, v in nn.utils.tree_flatten(model.trainable_parameters()))
print(f"decoder LM: {n_params:,} parameters (rotary, GQA 4/2, RMSNorm, SwiGLU)")

optimizer = optim.AdamW(learning_rate=3e-3, weight_decay=0.01)
loss_and_grad = nn.value_and_grad(model, lambda tokens: model(tokens))
start = time.perf_counter()
losses = []
model.train()
for step in range(STEPS):
    loss, grads = loss_and_grad(batch(BATCH))
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, loss)
    losses.append(loss.item())
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  loss {losses[-1]:.3f}")
print(f"trained {STEPS} steps in {time.perf_counter() - start:.1f} s; loss {losses[0]:.2f} -> {losses[-1]:.3f}")
assert losses[-1] < 0.25 * losses[0], "the loss should fall to under a quarter of its start"
model.eval()

# Greedy continuation: each prompt is the start of a progression (strides 1, 2, 3).
prompts = mx.array([[3, 4, 5, 6], [10, 12, 14, 16], [20, 23, 26, 29]], dtype=mx.int32)
greedy = model.generate(prompts, 12, temperature=0.0)
want = (np.array(prompts[:, -1:]) + (np.array(prompts[:, 1:2] - prompts[:, :1])) * np.arange(1, 13)) % VOCAB
accuracy = (np.array(greedy) == want).mean()
for p, g in zip(prompts.tolist(), greedy.tolist()):
    print(f"greedy   {p} -> {g}")
print(f"greedy accuracy against the true continuation: {accuracy:.0%}")
assert accuracy >= 0.9
uncached = model.generate(prompts, 12, temperature=0.0, cache=False)
assert (uncached == greedy).all().item(), "KV-cached and recomputed decoding should agree"

# Sampling: after a single token the stride is unknown, so the model spreads its first
# prediction over 3 strides; temperature with top-k / nucleus filters, reproducible by key.
one = mx.full((4, 1), 5, dtype=mx.int32)
sampled = model.generate(one, 8, temperature=1.0, top_k=5, top_p=0.95, key=mx.random.key(1))
for s in sampled.tolist():
    print(f"sampled  [5] -> {s}")
print(f"first sampled tokens: {sorted(set(sampled[:, 0].tolist()))} (strides 1-3 give 6, 7, 8)")
again = model.generate(one, 8, temperature=1.0, top_k=5, top_p=0.95, key=mx.random.key(1))
assert (again == sampled).all().item(), "the same key should give the same sample"

# Streaming: tokens arrive one step at a time; stop at eos (here: token 0) per row.
print("stream   ", end="")
for tokens in model.stream(prompts[:1], 40, temperature=0.0, eos_token=0):
    print(tokens.item(), end=" ", flush=True)
print("(stopped at eos 0)")
