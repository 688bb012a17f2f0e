"""Trainer (mlx_zeta.training.trainer): loss trajectories against a PyTorch loop with
copied weights (AdamW + clipping + warm-up/cosine; SGD with momentum + accumulation),
gradient accumulation against one big batch, clipping and schedules against hand
values, mixed precision, logging, evaluation and resuming from a checkpoint."""

import io
import json
import math

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from parity import copy_params
from reference.structs import TorchAttentionLayers, TorchTransformer
from reference.training import train_reference, warmup_cosine_ref

from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer
from mlx_zeta.training import Trainer, warmup_cosine

DIM, DEPTH, HEADS, VOCAB, MAX_LEN, B, N = 32, 2, 4, 50, 32, 4, 17


def build(seed: int = 0, **tf_kw) -> AutoregressiveWrapper:
    """A small decoder LM; the same seed gives the same initial weights."""
    mx.random.seed(seed)
    net = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN, attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=HEADS),
                      **tf_kw)
    mx.eval(net.parameters())
    return AutoregressiveWrapper(net)


def torch_twin(model: AutoregressiveWrapper) -> TorchTransformer:
    ref = TorchTransformer(VOCAB, MAX_LEN, TorchAttentionLayers(dim=DIM, depth=DEPTH, heads=HEADS, causal=True), DIM)
    copy_params(model.net, ref)
    return ref


def token_batches(count: int, b: int = B, seed: int = 1) -> np.ndarray:
    """Learnable sequences: x_t = (start + stride * t) mod VOCAB, random start and stride in 1..3."""
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, VOCAB, (count, b, 1)), rng.integers(1, 4, (count, b, 1))
    return ((start + stride * np.arange(N)) % VOCAB).astype(np.int32)


def flat(model: nn.Module) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def quiet(**kw) -> dict:
    """Trainer keywords for tests: no distributed group, no bar, log to a string."""
    return dict(group=None, progress=False, stream=io.StringIO(), **kw)


# float32 on both sides; the losses are means over 4 x 16 targets and differ only by
# summation order (1.2e-7 relative at step 1). Measured over 20 AdamW steps (clipped,
# warm-up + cosine): max 2.3e-7 relative, weights within 1.2e-7; over 10 SGD steps:
# 2.0e-7. AdamW normalises each update, so rounding does not grow. Stated: 1e-5.
LOSS_RTOL = 1e-5


def test_adamw_warmup_cosine_clipping_matches_torch():
    """20 steps: MLX AdamW(bias_correction=True) == torch AdamW, same decoupled decay lr*wd*w."""
    model = build()
    ref = torch_twin(model)
    data = token_batches(20)
    hp = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = optim.AdamW(learning_rate=warmup_cosine(3e-3, 5, 20, min_lr=3e-4), bias_correction=True, **hp)
    losses = Trainer(model, opt, [mx.array(x) for x in data], max_grad_norm=0.5, **quiet()).train(20)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=0.0, **hp)
    t_losses = train_reference(ref, t_opt, [[torch.from_numpy(x).long()] for x in data], max_grad_norm=0.5,
                               lr_fn=warmup_cosine_ref(3e-3, 5, 20, min_lr=3e-4))
    np.testing.assert_allclose(losses, t_losses, rtol=LOSS_RTOL)
    assert losses[-1] < losses[0] - 0.2  # it learns
    t_params = dict(ref.named_parameters())
    for name, value in flat(model.net).items():
        np.testing.assert_allclose(value, t_params[name].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_sgd_momentum_accumulation_matches_torch():
    """SGD (momentum, nesterov, L2 decay) with 2 micro-batches per step, no compile."""
    model = build()
    ref = torch_twin(model)
    data = token_batches(20)
    hp = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt = optim.SGD(learning_rate=0.1, **hp)
    losses = Trainer(model, opt, [mx.array(x) for x in data], grad_accum_steps=2, compile=False,
                     **quiet()).train(10)
    t_opt = torch.optim.SGD(ref.parameters(), lr=0.1, **hp)
    steps = [[torch.from_numpy(data[2 * i]).long(), torch.from_numpy(data[2 * i + 1]).long()] for i in range(10)]
    np.testing.assert_allclose(losses, train_reference(ref, t_opt, steps), rtol=LOSS_RTOL)


def test_accumulation_equals_one_big_batch():
    """2 micro-batches of 4 per step == 1 batch of 8 (mean loss over equal token counts)."""
    data = token_batches(6)
    small = build()
    Trainer(small, optim.SGD(learning_rate=0.5, momentum=0.9), [mx.array(x) for x in data], grad_accum_steps=2,
            **quiet()).train(3)
    big = build()
    pairs = [np.concatenate([data[2 * i], data[2 * i + 1]]) for i in range(3)]
    Trainer(big, optim.SGD(learning_rate=0.5, momentum=0.9), [mx.array(x) for x in pairs], **quiet()).train(3)
    for name, value in flat(big).items():
        np.testing.assert_allclose(flat(small)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_clipping_by_global_norm_hand_computed():
    """loss = sum(W x + b) with x = (2, 2): dL/dW = (2, 2), dL/db = 1, global norm sqrt(9) = 3.
    Clipped to 1.5 the gradients are halved (1.5 / (3 + 1e-6)); SGD lr 1 subtracts them."""
    lin = nn.Linear(2, 1)
    lin.update({"weight": mx.array([[0.5, -1.0]]), "bias": mx.array([0.25])})
    x = mx.array([[2.0, 2.0]])
    trainer = Trainer(lin, optim.SGD(learning_rate=1.0), lambda i: x, loss_fn=lambda m, b: m(b).sum(),
                      max_grad_norm=1.5, **quiet())
    trainer.train(1)
    scale = 1.5 / (3 + 1e-6)
    np.testing.assert_allclose(np.array(lin.weight), [[0.5 - 2 * scale, -1.0 - 2 * scale]], rtol=1e-6)
    np.testing.assert_allclose(np.array(lin.bias), [0.25 - scale], rtol=1e-6)
    assert trainer.history[0]["grad_norm"] == pytest.approx(3.0, rel=1e-6)
    # below the threshold nothing changes: norm 3 <= 10
    lin.update({"weight": mx.array([[0.5, -1.0]]), "bias": mx.array([0.25])})
    Trainer(lin, optim.SGD(learning_rate=1.0), lambda i: x, loss_fn=lambda m, b: m(b).sum(), max_grad_norm=10.0,
            **quiet()).train(1)
    np.testing.assert_allclose(np.array(lin.weight), [[-1.5, -3.0]], rtol=1e-6)


def test_warmup_cosine_values():
    """peak 1e-3, W = 4, T = 12, min 1e-4: s/W * peak, then 1e-4 + 4.5e-4 (1 + cos(pi (s - 4) / 8))."""
    schedule = warmup_cosine(1e-3, 4, 12, min_lr=1e-4)
    expected = {0: 0.0, 2: 5e-4, 4: 1e-3, 6: 1e-4 + 4.5e-4 * (1 + math.cos(math.pi / 4)), 8: 5.5e-4, 12: 1e-4,
                20: 1e-4}
    for step, lr in expected.items():
        assert schedule(mx.array(step)).item() == pytest.approx(lr, rel=1e-6, abs=1e-12), step
    assert warmup_cosine(2.0, 0, 4)(mx.array(2)).item() == pytest.approx(1.0)  # no warm-up: cosine only
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(1e-3, 10, 10)


def test_logged_lr_is_the_schedule_of_each_update_and_jsonl(tmp_path):
    """Record of step s (1-based) carries lr(s - 1), the rate its update used; every line is JSON."""
    log = tmp_path / "log.jsonl"
    calls = []

    def eval_fn(m):
        calls.append(m.training)
        return {"val": mx.array(1.5)}

    data = token_batches(7)
    trainer = Trainer(build(), optim.Adam(learning_rate=warmup_cosine(1e-3, 2, 6)), [mx.array(x) for x in data],
                      eval_fn=eval_fn, eval_every=3, log_path=str(log), **quiet())
    trainer.train(7)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 8))
    for r in train_lines:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) and r["tokens_per_s"] > 0
        assert r["lr"] == pytest.approx(warmup_cosine_ref(1e-3, 2, 6)(r["step"] - 1), abs=1e-9)
    assert [(r["step"], r["eval"]) for r in lines if "eval" in r] == [(3, {"val": 1.5}), (6, {"val": 1.5})]
    assert calls == [False, False] and trainer.model.training  # eval mode inside the hook, train mode after
    assert trainer.stream.getvalue().splitlines() == log.read_text().splitlines()  # not a terminal: JSON lines


def test_progress_bar_on_terminal():
    stream = io.StringIO()
    Trainer(build(), optim.Adam(learning_rate=1e-3), [mx.array(x) for x in token_batches(2)], group=None,
            progress=True, stream=stream).train(2)
    out = stream.getvalue()
    assert "loss=" in out and "tok_s=" in out and "lr=" in out and not out.lstrip().startswith("{")


def test_bfloat16_keeps_float32_masters_and_tracks_float32_loss():
    """bfloat16 compute: weights and Adam moments stay float32; the losses of 10 steps stay
    within 5e-3 relative of the float32 run (bfloat16 eps 2^-8 ~ 4e-3 per rounding, but the
    loss averages 64 log-softmaxes computed in float32 from bfloat16 logits; measured max
    5.3e-4 on the CPU)."""
    data = [mx.array(x) for x in token_batches(10)]
    ref_losses = Trainer(build(), optim.AdamW(learning_rate=1e-3), data, **quiet()).train(10)
    model = build()
    opt = optim.AdamW(learning_rate=1e-3)
    losses = Trainer(model, opt, data, precision="bfloat16", **quiet()).train(10)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert all(v.dtype == mx.float32 for k, v in tree_flatten(opt.state) if k.endswith((".m", ".v")))
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-3)
    assert losses[-1] < losses[0]


def test_float16_loss_scaling_skips_non_finite_steps():
    data = [mx.array(x) for x in token_batches(3)]
    model = build()
    # eager: the compiled path is the same code as bfloat16's (tested above), and compiling
    # float16 kernels costs ~20 s once on a cold MLX CPU kernel cache
    trainer = Trainer(model, optim.Adam(learning_rate=1e-3), data, precision="float16", compile=False, **quiet())
    trainer.scaler.scale = 2.0 ** 40  # the float16 backward overflows: the step is skipped, the scale halves
    before = flat(model)
    trainer.train(1)
    assert trainer.history[0]["skipped"] and trainer.scaler.scale == 2.0 ** 39
    assert all(np.array_equal(before[k], v) for k, v in flat(model).items())
    trainer.scaler.scale = 2.0 ** 10
    trainer.train(3)
    assert not trainer.history[-1]["skipped"] and np.isfinite(trainer.history[-1]["loss"])
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("source", ["iterable", "callable"])
def test_resume_equals_uninterrupted(tmp_path, source):
    """10 steps == 5 steps, a new Trainer resuming from the checkpoint, 5 more (dropout
    makes the RNG state matter; the iterable is fast-forwarded, the callable indexed)."""
    pytest.importorskip("mlx_zeta.training.checkpoint")
    data = token_batches(20)

    def make_data():
        return [mx.array(x) for x in data] if source == "iterable" else (lambda i: mx.array(data[i]))

    def run(steps, ckpt=None, resume=False):
        model = build(emb_dropout=0.2)
        opt = optim.AdamW(learning_rate=warmup_cosine(1e-3, 2, 10), bias_correction=True)
        kw = dict(checkpoint_dir=str(ckpt), resume=resume) if ckpt else {}
        return model, Trainer(model, opt, make_data(), grad_accum_steps=2, **quiet(**kw)).train(steps)

    full_model, full = run(10)
    run(5, tmp_path)
    model, rest = run(10, tmp_path, resume=True)
    assert len(rest) == 5
    np.testing.assert_array_equal(rest, full[5:])
    for name, value in flat(full_model).items():
        np.testing.assert_array_equal(flat(model)[name], value, err_msg=name)


def test_resume_with_trainable_only_checkpoints_equals_uninterrupted(tmp_path):
    """A frozen base with one trainable block: checkpoints of the trainable parameters alone,
    a fresh model (same base) resumed from them equals 8 uninterrupted steps bit for bit."""
    data = token_batches(8)

    def run(steps, resume=False):
        model = build(emb_dropout=0.2)
        model.freeze()
        model.net.attn_layers.layers[1].unfreeze()
        opt = optim.AdamW(learning_rate=1e-2, bias_correction=True)
        trainer = Trainer(model, opt, lambda i: mx.array(data[i]), checkpoint_trainable_only=True,
                          **quiet(checkpoint_dir=str(tmp_path / ("run" if resume or steps < 8 else "full")),
                                  resume=resume))
        return model, trainer.train(steps)

    full_model, full = run(8)
    run(4)
    model, rest = run(8, resume=True)
    np.testing.assert_array_equal(rest, full[4:])
    from mlx_zeta.training import latest_checkpoint
    saved = mx.load(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert saved.keys() == flat(model).keys()
    assert flat(model).keys() == flat(full_model).keys() and len(flat(model)) < len(tree_flatten(model.parameters()))
    for name, value in flat(full_model).items():
        np.testing.assert_array_equal(flat(model)[name], value, err_msg=name)


def test_validation():
    model = build()
    with pytest.raises(ValueError, match="grad_accum_steps"):
        Trainer(model, optim.SGD(learning_rate=0.1), [], grad_accum_steps=0, group=None)
    with pytest.raises(ValueError, match="precision"):
        Trainer(model, optim.SGD(learning_rate=0.1), [], precision="fp8", group=None)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Trainer(model, optim.SGD(learning_rate=0.1), [], resume=True, group=None)
    with pytest.raises(ValueError, match="eval_fn"):
        Trainer(model, optim.SGD(learning_rate=0.1), [], eval_every=3, group=None)


# ------------------------------------------------------------------ a failed step changes nothing


def scaled_loss(model, batch):
    """The LM loss times a per-batch factor: a factor of NaN makes a bad batch that fails only after
    the update has been computed (the loss check comes last)."""
    tokens, factor = batch
    return model(tokens) * factor


def one_good_step(bad, compile, precision="float32"):
    """Parameters, optimizer state, loss and RNG after [a failing step on `bad`, then] one good step."""
    model = build(emb_dropout=0.1)  # dropout: the step draws from the global random state
    good = (mx.array(token_batches(1)[0]), mx.array(1.0))
    opt = optim.AdamW(learning_rate=warmup_cosine(1e-2, 2, 10), bias_correction=True)
    trainer = Trainer(model, opt, iter([good] if bad is None else [bad, good]), loss_fn=scaled_loss,
                      max_grad_norm=0.5, compile=compile, precision=precision, **quiet())
    mx.random.seed(7)
    if bad is not None:
        with pytest.raises(ValueError, match=r"^\[Trainer\] ") as info:
            trainer.train_step()
        assert "\n" not in str(info.value) and trainer.step == 0
    record = trainer.train_step()
    state = {k: np.array(v) for k, v in tree_flatten(opt.state)}
    scaler = None if trainer.scaler is None else trainer.scaler.state_dict()
    return flat(model), state, record["loss"], np.array(mx.random.state[0]), scaler, trainer.step


BAD_BATCHES = {
    "wrong-shape": lambda: (mx.array(token_batches(1)[0, 0]), mx.array(1.0)),  # raises while tracing the gradient
    "nan-loss": lambda: (mx.array(token_batches(1, seed=3)[0]), mx.array(float("nan"))),  # after the update ran
}


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("bad", sorted(BAD_BATCHES))
def test_a_failed_step_then_a_good_one_equals_the_good_step_alone(bad, compile):
    """Issue 15 item 2: a step that raises leaves parameters, optimizer state (moments, step count,
    scheduled learning rate), the global random state and the step counter as they were, so the next
    good step is bit for bit the good step alone. Before: under compile=True the model was left
    holding traced arrays ("Attempting to eval an array without a primitive"), and a NaN loss was applied."""
    want = one_good_step(None, compile)
    got = one_good_step(BAD_BATCHES[bad](), compile)
    for name, value in want[0].items():
        np.testing.assert_array_equal(got[0][name], value, err_msg=name)
    assert got[1].keys() == want[1].keys()
    for name, value in want[1].items():
        np.testing.assert_array_equal(got[1][name], value, err_msg=name)
    assert got[2] == want[2]  # the loss (float32 bits)
    np.testing.assert_array_equal(got[3], want[3])  # the global random key after the step
    assert got[5] == want[5] == 1


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_a_step_interrupted_while_building_its_update_is_undone(compile):
    """Ctrl-C right after the update was built (weights, Adam moments and step count already replaced,
    by traced arrays under compile=True) and after the float16 loss scaler counted the step: all of it
    is put back, and the next step equals a first step (the scaler grows after growth_interval=2)."""
    def run(interrupt):
        model = build()
        batch = mx.array(token_batches(1)[0])
        opt = optim.AdamW(learning_rate=1e-2, bias_correction=True)
        trainer = Trainer(model, opt, iter([batch] * 3), precision="float16", compile=compile, **quiet())
        trainer.scaler.growth_interval = 2
        if interrupt:
            apply = trainer._apply_fn

            def stop(grads):
                apply(grads)
                trainer._apply_fn = apply
                raise KeyboardInterrupt

            trainer._apply_fn = stop
            with pytest.raises(KeyboardInterrupt):
                trainer.train_step()
            assert trainer.scaler.state_dict() == dict(scale=2.0 ** 15, good_steps=0)
        trainer.train_step()
        return flat(model), {k: np.array(v) for k, v in tree_flatten(opt.state)}, trainer.scaler.state_dict()

    want, got = run(False), run(True)
    assert got[2] == want[2] == dict(scale=2.0 ** 15, good_steps=1)
    for i in (0, 1):
        assert got[i].keys() == want[i].keys()
        for name, value in want[i].items():
            np.testing.assert_array_equal(got[i][name], value, err_msg=name)


def test_callable_data_is_asked_for_the_same_index_after_a_failed_step():
    asked = []

    def data(i):
        asked.append(i)
        return mx.array(token_batches(1)[0]) if len(asked) > 1 else "not a batch"

    trainer = Trainer(build(), optim.SGD(learning_rate=0.1), data, **quiet())
    with pytest.raises(ValueError, match=r"^\[Trainer\] expected each batch to be an array"):
        trainer.train_step()
    trainer.train_step()
    assert asked == [0, 0] and trainer.step == 1
