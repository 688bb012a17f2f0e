"""Gradient checkpointing in AttentionLayers (``checkpoint=True``): the loss and every
parameter gradient equal those of the same model without checkpointing; cached decoding
and eval mode bypass it."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_zeta.structs import Decoder, Encoder, Transformer

VOCAB, DIM, B, N = 40, 32, 2, 10

# Checkpointing reruns the same float32 operations on the same inputs in the backward
# pass, so the gradients are expected bit-identical; the bound allows 1e-6 in case a
# backend fuses the recomputed graph differently.
ATOL = 1e-6


def pair(**layer_kw):
    """The same weights twice: without and with checkpointing."""
    plain = Transformer(num_tokens=VOCAB, max_seq_len=32, attn_layers=Decoder(dim=DIM, depth=3, heads=4, **layer_kw))
    ckpt = Transformer(num_tokens=VOCAB, max_seq_len=32,
                       attn_layers=Decoder(dim=DIM, depth=3, heads=4, checkpoint=True, **layer_kw))
    ckpt.update(plain.parameters())
    mx.eval(plain.parameters(), ckpt.parameters())
    return plain, ckpt


def loss_and_grads(model, x, y, **call_kw):
    def loss_fn(m):
        return nn.losses.cross_entropy(m(x, **call_kw), y, reduction="mean")
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads))


def assert_same_grads(plain, ckpt, x, y, **call_kw):
    loss_a, ga = loss_and_grads(plain, x, y, **call_kw)
    loss_b, gb = loss_and_grads(ckpt, x, y, **call_kw)
    assert sorted(ga) == sorted(gb)
    assert len(ga) > 20
    assert abs(loss_a.item() - loss_b.item()) <= ATOL
    worst = max(float(mx.abs(ga[k] - gb[k]).max()) for k in ga)
    assert worst <= ATOL, f"largest gradient difference {worst}"
    for k in ga:  # every parameter actually receives a gradient
        assert float(mx.abs(ga[k]).max()) > 0 or "bias" in k, k


@pytest.mark.parametrize("layer_kw", [
    dict(rotary_pos_emb=True, ff_glu=True, use_rmsnorm=True),
    dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16),  # shared bias table: an input
    dict(alibi_pos_bias=True, pre_norm=False, sliding_window=4),
], ids=["rotary_glu_rmsnorm", "t5_rel_pos", "alibi_post_norm_window"])
def test_checkpointed_gradients_equal(layer_kw):
    plain, ckpt = pair(**layer_kw)
    x = mx.random.randint(0, VOCAB, (B, N)).astype(mx.int32)
    y = mx.random.randint(0, VOCAB, (B, N)).astype(mx.int32)
    assert_same_grads(plain, ckpt, x, y)


def test_checkpointed_gradients_with_mask_and_context():
    """Cross-attention: gradients reach the context (an input of every checkpointed layer)."""
    kw = dict(dim=DIM, depth=2, heads=4)
    plain = Decoder(cross_attend=True, **kw)
    ckpt = Decoder(cross_attend=True, checkpoint=True, **kw)
    ckpt.update(plain.parameters())
    x, ctx = mx.random.normal((B, N, DIM)), mx.random.normal((B, 5, DIM))
    mask = mx.array(np.arange(N)[None] < np.array([[N], [N - 3]]))

    def loss_fn(params, c, model):
        model.update(params)
        return (model(x, mask=mask, context=c) ** 2).mean()
    ga = mx.grad(loss_fn, argnums=(0, 1))(plain.trainable_parameters(), ctx, plain)
    gb = mx.grad(loss_fn, argnums=(0, 1))(ckpt.trainable_parameters(), ctx, ckpt)
    fa, fb = dict(tree_flatten(ga[0])), dict(tree_flatten(gb[0]))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert float(mx.abs(fa[k] - fb[k]).max()) <= ATOL, k
    assert float(mx.abs(ga[1]).max()) > 0
    assert float(mx.abs(ga[1] - gb[1]).max()) <= ATOL


def test_cache_and_eval_bypass_checkpoint():
    """Cached decoding and eval mode call the layers directly; outputs match the plain model."""
    plain, ckpt = pair(rotary_pos_emb=True)
    x = mx.random.randint(0, VOCAB, (1, 6)).astype(mx.int32)
    cache_a, cache_b = plain.make_cache(), ckpt.make_cache()
    out_a, out_b = plain(x, cache=cache_a), ckpt(x, cache=cache_b)
    assert mx.array_equal(out_a, out_b)
    assert cache_b[0].offset == 6
    ckpt.eval()
    assert mx.array_equal(plain(x), ckpt(x))


def test_encoder_checkpoint_flag_routes():
    enc = Encoder(dim=DIM, depth=1, heads=4, checkpoint=True)
    assert enc.checkpoint and not Encoder(dim=DIM, depth=1, heads=4).checkpoint


def test_dropout_masks_equal_in_recomputation():
    """With dropout, the backward pass's recomputation must draw the forward pass's masks.
    Reference: the plain layers, each run after reseeding with the seed the checkpointed
    stack draws for it (same masks by construction, no recomputation)."""
    kw = dict(dim=DIM, depth=2, heads=4, attn_dropout=0.3, ff_dropout=0.5)
    plain, ckpt = Decoder(**kw), Decoder(checkpoint=True, **kw)
    ckpt.update(plain.parameters())
    x = mx.random.normal((B, N, DIM))

    def reference(m):
        h = x
        for layer in m.layers:
            mx.random.seed(mx.random.randint(0, 2**31 - 1, ()).item())
            h = layer(h, None, None, None, None, None, None)
        return (m.final_norm(h) ** 2).sum()

    def grads(model, fn):
        mx.random.seed(1)
        loss, g = nn.value_and_grad(model, fn)(model)
        mx.eval(loss, g)
        return loss.item(), dict(tree_flatten(g))
    loss_a, ga = grads(plain, reference)
    loss_b, gb = grads(ckpt, lambda m: (m(x) ** 2).sum())
    assert abs(loss_a - loss_b) <= 1e-4 * abs(loss_a)
    worst = max(float(mx.abs(ga[k] - gb[k]).max()) for k in ga)
    assert worst <= ATOL, f"largest gradient difference {worst}"
