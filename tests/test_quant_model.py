"""mlx_zeta.quant.model: quantize_model swaps exactly the intended layers of a Transformer,
freeze_model packs them without changing the logits and shrinks the head, and quantization-aware
training reaches the float twin's accuracy on an MLP task and a decoder sequence task."""

from functools import partial

import mlx_zeta  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_zeta.quant import AffineEmbedding, AffineLinear, BitLinear, freeze_model, quantize_model
from mlx_zeta.structs import Decoder, Transformer

DIM, DEPTH, TOKENS, SEQ = 64, 2, 32, 16
PROJECTIONS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff.proj_in", "ff.proj_out"]
EXPECTED = sorted(f"attn_layers.layers.{i}.{p}" for i in range(DEPTH) for p in PROJECTIONS)


def _transformer(**kw):
    return Transformer(num_tokens=TOKENS, max_seq_len=SEQ, attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=4), **kw)


def _twins(**kw):
    """A float Transformer and an identical copy (same parameters)."""
    a = _transformer(**kw)
    b = _transformer(**kw)
    b.update(a.parameters())
    return a, b


def _paths(model, cls):
    return sorted(p for p, m in model.named_modules() if type(m) is cls)


def _tokens(shape=(2, SEQ)):
    return mx.random.randint(0, TOKENS, shape)


def _nbytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ---- quantize_model -----------------------------------------------------------------------------

def test_quantize_model_swaps_the_projections_and_keeps_head_and_embeddings():
    model, hand = _twins()
    assert quantize_model(model) is model
    assert _paths(model, BitLinear) == EXPECTED
    assert _paths(model, nn.Linear) == ["to_logits"]
    assert _paths(model, nn.Embedding) == ["pos_emb.emb", "token_emb"]

    # the same model built by hand: each projection replaced by a BitLinear holding its weight and bias
    for layer in hand.attn_layers.layers:
        for parent, name in [(layer.attn, n) for n in ("to_q", "to_k", "to_v", "to_out")] + \
                            [(layer.ff, n) for n in ("proj_in", "proj_out")]:
            linear = getattr(parent, name)
            bit = BitLinear(linear.weight.shape[1], linear.weight.shape[0], bias="bias" in linear)
            bit.weight = linear.weight
            if "bias" in linear:
                bit.bias = linear.bias
            setattr(parent, name, bit)
    x = _tokens()
    assert mx.array_equal(model(x), hand(x)).item()
    assert not mx.allclose(model(x), _twins()[0](x)).item()  # and it is not the float model


def test_quantize_model_options():
    model = _transformer()
    quantize_model(model, predicate=lambda path, m: ".ff." in path, norm=False, quant_eps=1e-3)
    assert _paths(model, BitLinear) == sorted(f"attn_layers.layers.{i}.ff.{p}" for i in range(DEPTH)
                                              for p in ("proj_in", "proj_out"))
    bit = model.attn_layers.layers[0].ff.proj_in
    assert "norm" not in bit and bit.quant_eps == 1e-3
    # a predicate may take the head too; embeddings are never nn.Linear, so never swapped
    model = quantize_model(_transformer(), predicate=lambda path, m: True)
    assert _paths(model, BitLinear) == sorted(EXPECTED + ["to_logits"]) and _paths(model, nn.Linear) == []
    # a second call changes nothing; train/eval mode and dtype carry over
    model = _transformer()
    model.eval()
    model.set_dtype(mx.bfloat16)
    quantize_model(model)
    before = _paths(model, BitLinear)
    quantize_model(model)
    assert _paths(model, BitLinear) == before == EXPECTED
    bit = model.attn_layers.layers[1].attn.to_q
    assert not bit.training and bit.norm.weight.dtype == mx.bfloat16
    assert model(_tokens()).dtype == mx.bfloat16


def test_quantize_model_tied_embedding_and_lm_head():
    model = quantize_model(_transformer(tie_embedding=True))
    assert _paths(model, BitLinear) == EXPECTED and _paths(model, nn.Linear) == []

    class Wrapped(nn.Module):  # a Hugging Face-style name for the head
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 4)

    assert _paths(quantize_model(Wrapped()), nn.Linear) == ["lm_head"]


@pytest.mark.parametrize("call,message", [
    (lambda: quantize_model(object()), r"^\[quantize_model\] expected model to be an mlx.nn.Module, got object"),
    (lambda: quantize_model(_transformer(), predicate=3), r"^\[quantize_model\] expected predicate to be callable"),
    (lambda: quantize_model(_transformer(), norm=1), r"^\[quantize_model\] expected norm to be a bool, got 1"),
    (lambda: quantize_model(_transformer(), eps=1e-3, bias=True),
     r"^\[quantize_model\] unknown keyword argument\(s\): bias, eps; accepted: predicate, norm, norm_eps, quant_eps"),
    (lambda: quantize_model(nn.Linear(4, 4)), r"^\[quantize_model\] expected a model containing nn.Linear layers"),
])
def test_quantize_model_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- freeze_model -------------------------------------------------------------------------------

def _trained_qat(**kw):
    """A quantized Transformer moved off its init by a few optimizer steps (so the weights are not
    the uniform init and the norms are not all ones)."""
    model = quantize_model(_transformer(**kw))
    opt = optim.Adam(learning_rate=1e-2)
    x = _tokens((4, SEQ))
    grad = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:], reduction="mean"))
    for _ in range(3):
        opt.update(model, grad(model)[1])
    mx.eval(model.parameters())
    return model


class _Recorder(nn.Module):
    """Calls ``layer`` and keeps its last input (to replay each layer's real activations)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.seen = None

    def __call__(self, x):
        self.seen = x
        return self.layer(x)


def test_freeze_model_int8_reproduces_qat_logits():
    pytest.importorskip("mlx_zeta.quant.ternary")
    from mlx_zeta.quant import TernaryLinear

    model = _trained_qat()
    model.eval()
    x = _tokens((8, SEQ))
    qat_logits = model(x)
    qat_bytes = _nbytes(model)

    # layer by layer, on the activations each BitLinear really sees: an int8 TernaryLinear is an exact
    # integer accumulation times the same two scales, so it equals BitLinear up to float32 rounding
    recorders = [(p, _Recorder(m)) for p, m in model.named_modules() if type(m) is BitLinear]
    model.update_modules(tree_unflatten(recorders))
    assert mx.array_equal(model(x), qat_logits).item()
    for path, rec in recorders:
        expected, actual = np.array(rec.layer(rec.seen)), np.array(rec.layer.to_ternary()(rec.seen))
        rel = np.abs(actual - expected).max(-1) / np.abs(expected).max(-1)
        assert rel.max() <= 1e-5, f"{path}: frozen layer differs from BitLinear by {rel.max():.2e} (relative)"
    model.update_modules(tree_unflatten([(p, rec.layer) for p, rec in recorders]))

    assert freeze_model(model) is model
    assert _paths(model, TernaryLinear) == EXPECTED and _paths(model, BitLinear) == []
    assert not model.attn_layers.layers[0].attn.to_q.training
    assert _nbytes(model) < qat_bytes
    # End to end, the layers' ~1e-7 differences reach the next layers' round(x s_x), and where x s_x
    # lies within an ulp of k + 1/2 one int8 value moves by one step (max|x|/127); causal attention
    # carries it to the later positions. Measured per position, max|dz| / max|z| over 6 seeds of this
    # test: the median 1.2e-7 to 1.6e-7, 88-100% of positions within 1e-5, the worst 3.1e-3 (a trained
    # copy-task model, examples/bitnet_qat.py: 489 of 500 sequences within 1e-5, worst 1.2e-3).
    e, a = np.array(qat_logits), np.array(model(x))
    rel = np.abs(a - e).max(-1) / np.abs(e).max(-1)  # (batch, seq)
    assert np.median(rel) <= 1e-5 and rel.max() <= 1e-2, \
        f"frozen vs QAT logits: median {np.median(rel):.2e}, max {rel.max():.2e} (relative, per position)"


def test_freeze_model_float_activations():
    pytest.importorskip("mlx_zeta.quant.ternary")
    model = _trained_qat()
    x = _tokens()
    qat_logits = model(x)
    freeze_model(model, activation="float")
    assert {m.activation for _, m in model.named_modules() if type(m).__name__ == "TernaryLinear"} == {"float"}
    # W1.58A16 skips the int8 activation rounding (steps of max|x|/127): close to, not equal to, QAT
    # (relative logit error measured over 4 seeds: 0.0025-0.0074)
    a, e = np.array(model(x)), np.array(qat_logits)
    err = np.linalg.norm(a - e) / np.linalg.norm(e)
    assert 0 < err < 0.03, f"float-activation logits: relative error {err:.4f}"


@pytest.mark.parametrize("tied", [False, True], ids=["to_logits", "tied"])
def test_freeze_model_head_bits(tied):
    pytest.importorskip("mlx_zeta.quant.ternary")
    model = _trained_qat(tie_embedding=tied)
    twin = quantize_model(_transformer(tie_embedding=tied))
    twin.update(model.parameters())
    x = _tokens()
    freeze_model(twin)  # float head
    freeze_model(model, head_bits=4)
    head = model.token_emb if tied else model.to_logits
    assert type(head) is (AffineEmbedding if tied else AffineLinear)  # MLX's quantized layers + CPU paths
    assert head.bits == 4 and head.group_size == 64
    # the 32 x 64 float32 head (8192 bytes) becomes 4-bit codes (1024 bytes) + a float32 scale and
    # bias per group of 64 (256 bytes); nothing else changes
    assert _nbytes(twin) - _nbytes(model) == TOKENS * DIM * 4 - (TOKENS * DIM // 2 + TOKENS * DIM // 64 * 2 * 4)
    # 4-bit head: relative logit error measured over 4 seeds 0.028-0.042 (to_logits) and 0.066-0.127
    # (tied: the table also feeds the input embeddings); a wrong head would be ~1.4 (uncorrelated)
    a, e = np.array(model(x)), np.array(twin(x))
    err = np.linalg.norm(a - e) / np.linalg.norm(e)
    assert err < 0.25, f"4-bit head: relative logit error {err:.3f}"


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="int4"), r"^\[freeze_model\] expected activation 'int8' or 'float', got 'int4'"),
    (dict(head_bits=5), r"^\[freeze_model\] expected head_bits in \(2, 3, 4, 6, 8\) or None, got 5"),
    (dict(head_bits=True), r"^\[freeze_model\] expected head_bits in \(2, 3, 4, 6, 8\) or None, got True"),
    (dict(group_size=96), r"^\[freeze_model\] expected group_size in \(32, 64, 128\), got 96"),
])
def test_freeze_model_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        freeze_model(quantize_model(_transformer()), **kwargs)


def test_freeze_model_head_errors():
    pytest.importorskip("mlx_zeta.quant.ternary")
    narrow = quantize_model(Transformer(num_tokens=TOKENS, max_seq_len=SEQ,
                                        attn_layers=Decoder(dim=48, depth=1, heads=4)))
    with pytest.raises(ValueError, match=r"^\[freeze_model\] expected the head 'to_logits' input width to be "
                                         r"divisible by group_size=64, got width 48"):
        freeze_model(narrow, head_bits=4)
    headless = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    with pytest.raises(ValueError, match=r"^\[freeze_model\] head_bits was given but the model has no float head"):
        freeze_model(headless, head_bits=4)
    with pytest.raises(ValueError, match=r"^\[freeze_model\] expected model to be an mlx.nn.Module, got int"):
        freeze_model(3)


# ---- quantization-aware training acceptance -----------------------------------------------------

def _fit(model, loss_fn, batches, lr):
    """Adam on ``loss_fn(model, *batch)`` over the batches, one compiled step each."""
    opt = optim.Adam(learning_rate=lr)
    grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        loss, grads = grad(model, *batch)
        opt.update(model, grads)
        return loss

    for batch in batches:
        step(*batch)
        mx.eval(state)
    return model


def _angle_task(n, seed):
    """4 classes of points z in [-1, 1]^2 by a warped angle, theta + sin(3 theta) cut into quadrants,
    embedded in 16-D by a fixed orthonormal map plus N(0, 0.05^2) noise. The class depends on the
    direction of z only: BitLinear's input RMSNorm discards each input's scale, so a task decided by
    |z| (a radius) would be out of reach of the first layer with norm=True (see quantize_model)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (n, 2))
    theta = np.arctan2(z[:, 1], z[:, 0])
    y = np.floor(((theta + np.sin(3 * theta)) % (2 * np.pi)) / (np.pi / 2)).astype(np.int32) % 4
    embed = np.linalg.qr(np.random.default_rng(123).standard_normal((16, 16)))[0][:, :2]
    x = z @ embed.T + 0.05 * rng.standard_normal((n, 16))
    return mx.array(x.astype(np.float32)), mx.array(y)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_qat_mlp_reaches_float_accuracy():
    x_train, y_train = _angle_task(4096, seed=0)
    x_test, y_test = _angle_task(2000, seed=1)
    floating = _MLP()
    ternary = _MLP()
    ternary.update(floating.parameters())  # same init
    quantize_model(ternary)  # all three layers (no head name): BitLinear with its input RMSNorm
    rng = np.random.default_rng(0)
    batches = [(x_train[idx], y_train[idx]) for idx in (mx.array(rng.integers(0, 4096, 128)) for _ in range(300))]
    loss = lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean")  # noqa: E731
    accuracy = {}
    for name, model in (("float", floating), ("ternary", ternary)):
        _fit(model, loss, batches, lr=3e-3)
        accuracy[name] = (model(x_test).argmax(-1) == y_test).mean().item()
    print(f"MLP test accuracy: float {accuracy['float']:.4f}, ternary {accuracy['ternary']:.4f}")
    assert accuracy["float"] > 0.85, f"the float twin did not learn the task: {accuracy}"
    assert accuracy["ternary"] >= 0.9 * accuracy["float"], f"ternary MLP below 90% of the float twin: {accuracy}"


COPY_LEN, DIGITS = 6, 8  # sequences a_1..a_6, SEP, a_1..a_6 over digits 0..7, SEP = 8


def _copy_task(n, seed):
    a = np.random.default_rng(seed).integers(0, DIGITS, (n, COPY_LEN))
    return mx.array(np.concatenate([a, np.full((n, 1), DIGITS), a], axis=1).astype(np.int32))


def _copy_logits(model, seq):
    """Logits at the positions that predict the copied half: (batch, COPY_LEN, DIGITS + 1)."""
    return model(seq[:, :-1])[:, COPY_LEN:]


def test_qat_decoder_reaches_float_accuracy():
    def decoder():
        return Transformer(num_tokens=DIGITS + 1, max_seq_len=2 * COPY_LEN + 1,
                           attn_layers=Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True))

    floating, ternary = decoder(), decoder()
    ternary.update(floating.parameters())
    quantize_model(ternary)  # attention and feed-forward projections; embedding and to_logits stay float
    train, test = _copy_task(8192, seed=0), _copy_task(1000, seed=1)
    rng = np.random.default_rng(0)
    batches = [(train[mx.array(rng.integers(0, 8192, 32))],) for _ in range(200)]

    def loss(m, seq):
        return nn.losses.cross_entropy(_copy_logits(m, seq), seq[:, COPY_LEN + 1:], reduction="mean")

    accuracy = {}
    for name, model in (("float", floating), ("ternary", ternary)):
        _fit(model, loss, batches, lr=3e-3)
        model.eval()
        accuracy[name] = (_copy_logits(model, test).argmax(-1) == test[:, COPY_LEN + 1:]).mean().item()
    print(f"decoder next-token accuracy on held-out copies: float {accuracy['float']:.4f}, "
          f"ternary {accuracy['ternary']:.4f}")
    assert accuracy["float"] > 0.9, f"the float twin did not learn the task: {accuracy}"
    assert accuracy["ternary"] >= 0.9 * accuracy["float"], f"ternary decoder below 90% of the float twin: {accuracy}"
