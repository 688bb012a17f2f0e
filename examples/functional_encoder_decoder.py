"""An encoder-decoder written as pure functions (mlx_zeta.functional), traced, trained a
few steps, then loaded into the equivalent mlx_zeta.nn module, which gives the same output.

The task: read a sequence of random vectors and emit it reversed (teacher forcing).

    .venv/bin/python examples/functional_encoder_decoder.py
"""

import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_zeta import functional as F
from mlx_zeta.functional import _
from mlx_zeta.nn import Attention, FeedForward, RMSNorm

DIM, HEADS, DEPTH, FEATURES, LENGTH = 32, 4, 2, 8, 6


# ---------------------------------------------------------------- the functional model

def encoder_layer(p, x):
    """Pre-norm residual blocks, written with placeholders, chain and skip."""
    x = F.skip(F.chain([F.layer_norm(p["attn_norm"], _), F.multi_head_self_attention(p["attn"], _, heads=HEADS)]), x)
    return F.skip(F.chain([F.layer_norm(p["ff_norm"], _), F.mlp(p["ff"], _, mult=2)]), x)


def decoder_layer(p, y, memory):
    y = y + F.multi_head_self_attention(p["self_attn"], F.layer_norm(p["self_norm"], y), heads=HEADS, causal=True)
    y = y + F.multi_head_attention(p["cross_attn"], F.layer_norm(p["cross_norm"], y), memory, heads=HEADS)
    return y + F.mlp(p["ff"], F.layer_norm(p["ff_norm"], y), mult=2)


def seq2seq(p, src, tgt_in):
    """(B, L, FEATURES) source and shifted target -> (B, L, FEATURES) prediction."""
    x = F.linear(p["src_in"], src, DIM)
    for i in range(DEPTH):
        x = encoder_layer(p["encoder"][i], x)
    memory = F.rms_norm(p["enc_norm"], x)
    y = F.linear(p["tgt_in"], tgt_in, DIM)
    for i in range(DEPTH):
        y = decoder_layer(p["decoder"][i], y, memory)
    return F.linear(p["out"], F.layer_norm(p["out_norm"], y), FEATURES)


# ---------------------------------------------------------------- the same model as modules

class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(DIM), Attention(DIM, heads=HEADS)
        self.ff_norm, self.ff = nn.LayerNorm(DIM), FeedForward(DIM, mult=2)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_norm, self.self_attn = nn.LayerNorm(DIM), Attention(DIM, heads=HEADS, causal=True)
        self.cross_norm, self.cross_attn = nn.LayerNorm(DIM), Attention(DIM, heads=HEADS)
        self.ff_norm, self.ff = nn.LayerNorm(DIM), FeedForward(DIM, mult=2)

    def __call__(self, y, memory):
        y = y + self.self_attn(self.self_norm(y))
        y = y + self.cross_attn(self.cross_norm(y), context=memory)
        return y + self.ff(self.ff_norm(y))


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.src_in, self.tgt_in = nn.Linear(FEATURES, DIM), nn.Linear(FEATURES, DIM)
        self.encoder = [EncoderLayer() for _ in range(DEPTH)]
        self.enc_norm = RMSNorm(DIM)
        self.decoder = [DecoderLayer() for _ in range(DEPTH)]
        self.out_norm, self.out = nn.LayerNorm(DIM), nn.Linear(DIM, FEATURES)

    def __call__(self, src, tgt_in):
        x = self.src_in(src)
        for layer in self.encoder:
            x = layer(x)
        memory = self.enc_norm(x)
        y = self.tgt_in(tgt_in)
        for layer in self.decoder:
            y = layer(y, memory)
        return self.out(self.out_norm(y))


def make_batch(key, n):
    """Source vectors, the decoder input (reversed source shifted right) and the target."""
    src = mx.random.normal((n, LENGTH, FEATURES), key=key)
    target = src[:, ::-1]
    tgt_in = mx.concatenate([mx.zeros((n, 1, FEATURES)), target[:, :-1]], axis=1)
    return src, tgt_in, target


def loss_fn(params, src, tgt_in, target):
    return mx.mean(mx.square(seq2seq(params, src, tgt_in) - target))


def main():
    data_key, init_key = mx.random.split(mx.random.key(0))
    src, tgt_in, target = make_batch(data_key, 2)

    start = time.perf_counter()
    params = F.trace(seq2seq, init_key, src, tgt_in)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(params)}
    module_shapes = {k: tuple(v.shape) for k, v in tree_flatten(Seq2Seq().parameters())}
    print(f"traced {len(shapes)} parameters ({sum(v.size for _, v in tree_flatten(params)):,} values) "
          f"in {time.perf_counter() - start:.2f} s; same names and shapes as the Seq2Seq module: {shapes == module_shapes}")

    step = mx.compile(mx.value_and_grad(loss_fn))
    optimizer = optim.Adam(learning_rate=3e-3)
    keys = mx.random.split(data_key, 60)
    start = time.perf_counter()
    for i in range(60):
        loss, grads = step(params, *make_batch(keys[i], 16))
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        if i % 20 == 0 or i == 59:
            print(f"step {i:2d}  mse {loss.item():.4f}")
    print(f"trained 60 compiled steps in {time.perf_counter() - start:.2f} s")

    module = F.to_module(params, Seq2Seq())
    src, tgt_in, target = make_batch(mx.random.key(1), 4)
    out_f, out_m = seq2seq(params, src, tgt_in), module(src, tgt_in)
    print(f"functional vs module output: max |diff| = {mx.abs(out_f - out_m).max().item():.2e} "
          f"(shapes {tuple(out_f.shape)}); held-out mse {mx.mean(mx.square(out_f - target)).item():.4f}")


if __name__ == "__main__":
    main()
