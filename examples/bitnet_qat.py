"""BitNet b1.58 end to end: quantization-aware training of a small decoder on a copy task,
freezing it into packed ternary weights, and greedy generation with the frozen model.

    .venv/bin/python examples/bitnet_qat.py

Task: ``a_1 .. a_6 SEP a_1 .. a_6`` over the digits 0-7; the model must copy the digits after SEP.
"""

from functools import partial

import mlx_zeta  # noqa: F401  (before mlx: routes BLAS)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_zeta.quant import BitLinear, TernaryLinear, freeze_model, quantize_model
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer

COPY_LEN, DIGITS = 6, 8
SEP = DIGITS
mx.random.seed(0)


def copy_task(n: int, seed: int) -> mx.array:
    digits = np.random.default_rng(seed).integers(0, DIGITS, (n, COPY_LEN))
    return mx.array(np.concatenate([digits, np.full((n, 1), SEP), digits], axis=1).astype(np.int32))


def build() -> Transformer:
    return Transformer(num_tokens=DIGITS + 1, max_seq_len=2 * COPY_LEN + 1,
                       attn_layers=Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True))


def copy_logits(model: nn.Module, seq: mx.array) -> mx.array:
    return model(seq[:, :-1])[:, COPY_LEN:]  # (batch, COPY_LEN, vocab): the predictions of the copy


def teacher_forced_accuracy(model: nn.Module, seq: mx.array) -> float:
    return (copy_logits(model, seq).argmax(-1) == seq[:, COPY_LEN + 1:]).mean().item()


def generated_accuracy(model: nn.Module, seq: mx.array) -> float:
    """Fraction of held-out rows whose 6 greedily generated digits are all right (KV-cached decoding)."""
    new = AutoregressiveWrapper(model).generate(seq[:, :COPY_LEN + 1], COPY_LEN, temperature=0.0)
    return (new == seq[:, COPY_LEN + 1:]).all(axis=1).mean().item()


def nbytes(model: nn.Module, cls) -> int:
    """Bytes of the parameters of the layers of type ``cls`` (norms included)."""
    return sum(v.nbytes for _, m in model.named_modules() if type(m) is cls for _, v in tree_flatten(m.parameters()))


def total_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# 1. QAT: every attention and feed-forward projection becomes a BitLinear; embeddings and head stay float
model = quantize_model(build())
n_bit = sum(type(m) is BitLinear for _, m in model.named_modules())
print(f"quantize_model: {n_bit} nn.Linear -> BitLinear (ternary weights, int8 activations, straight-through grads)")

train, test = copy_task(8192, seed=0), copy_task(500, seed=1)
opt = optim.Adam(learning_rate=3e-3)
grad = nn.value_and_grad(model, lambda m, seq: nn.losses.cross_entropy(copy_logits(m, seq), seq[:, COPY_LEN + 1:],
                                                                       reduction="mean"))
state = [model.state, opt.state]


@partial(mx.compile, inputs=state, outputs=state)
def step(seq: mx.array) -> mx.array:
    loss, grads = grad(model, seq)
    opt.update(model, grads)
    return loss


rng = np.random.default_rng(0)
for i in range(1, 201):
    loss = step(train[mx.array(rng.integers(0, train.shape[0], 32))])
    mx.eval(state)
    if i % 50 == 0:
        print(f"  step {i:3d}  loss {loss.item():.4f}")
model.eval()
qat = dict(forced=teacher_forced_accuracy(model, test), generated=generated_accuracy(model, test))
logits_qat = copy_logits(model, test)
float_bytes, float_total = nbytes(model, BitLinear), total_bytes(model)

# 2. freeze: pack each BitLinear's ternary weights at 2 bits (TernaryLinear, int8 activations)
twin = quantize_model(build())  # a copy of the trained model, for the 4-bit head below
twin.update(model.parameters())
twin.eval()
freeze_model(model)
frozen = dict(forced=teacher_forced_accuracy(model, test), generated=generated_accuracy(model, test))
# per sequence, max |logit change| / max |logit|: float32 rounding, plus an occasional int8 value moved
# by one step where x s_x sat within an ulp of k + 1/2 (see tests/test_quant_model.py)
drift = mx.abs(copy_logits(model, test) - logits_qat).max(axis=(1, 2)) / mx.abs(logits_qat).max(axis=(1, 2))
packed_bytes = nbytes(model, TernaryLinear)

# 3. and the float head in 4-bit affine groups of 64 (nn.quantize)
freeze_model(twin, head_bits=4)
head4 = dict(forced=teacher_forced_accuracy(twin, test), generated=generated_accuracy(twin, test))

print(f"held-out copy accuracy (next token / whole sequence generated greedily, {test.shape[0]} rows):")
print(f"  QAT (BitLinear, float latent weights):   {qat['forced']:.4f} / {qat['generated']:.4f}")
print(f"  frozen (TernaryLinear, packed, int8 x):  {frozen['forced']:.4f} / {frozen['generated']:.4f}")
print(f"    logits vs QAT, per sequence: {(drift <= 1e-5).sum().item()} of {test.shape[0]} within 1e-5 relative, "
      f"median {np.median(np.array(drift)):.1e}, worst {drift.max().item():.1e}")
print(f"  frozen + 4-bit head:                     {head4['forced']:.4f} / {head4['generated']:.4f}")
print(f"projection bytes (float biases and norm gains included): float32 {float_bytes:,} -> packed {packed_bytes:,} "
      f"({float_bytes / packed_bytes:.1f}x smaller)")
print(f"whole model bytes: {float_total:,} (QAT) -> {total_bytes(model):,} (frozen) "
      f"-> {total_bytes(twin):,} (+ 4-bit head)")
prompt = test[:2, :COPY_LEN + 1]
new = AutoregressiveWrapper(model).generate(prompt, COPY_LEN, temperature=0.0)
print(f"generate (frozen, greedy): prompt {prompt.tolist()} -> {new.tolist()}")
