"""Fine-tuning (mlx_zeta.lm.tuning) on the tiny chat checkpoints of lm_tiny.py.

Laws: the loss equals a float64 numpy masked cross-entropy of the model's logits; targets the
mask drops change neither the loss nor any gradient (a kept one does); the first example of a
packed row scores as it does alone. End to end: QLoRA (4-bit base) on a small instruction set
lowers the validation loss and moves greedy answers onto the trained ones; a run killed by
SIGKILL and resumed equals the uninterrupted run bit for bit; DoRA with gradient checkpointing
equals DoRA without; full fine-tuning saves a model that loads back; bad settings are refused
in one line.

Measured on the QLoRA test (Llama-shaped, hidden 64, 2 layers, 14 layers quantized 4-bit, rank 8,
60 steps of 4 at lr 2e-3): validation loss 6.42 -> 3.12 (step 30) -> 2.20 nats per answer token;
greedy answer tokens equal to the trained ones 0 -> 74 of 89 (asserted: <= 10% before, >= 50% after)."""

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from mlx_zeta.converters import from_pretrained  # noqa: E402
from mlx_zeta.converters.swaps import quantize  # noqa: E402
from mlx_zeta.lm import load, stream_generate  # noqa: E402
from mlx_zeta.lm.datasets import Batches, TextDataset, load_datasets  # noqa: E402
from mlx_zeta.lm.tuning import evaluate, loss, perplexity, train  # noqa: E402

TESTS = Path(__file__).resolve().parent
QA = [("what is the fox?", "quick brown fox"), ("who is lazy?", "the lazy dog"), ("say a number", "forty two"),
      ("where is the cafe?", "near the forest"), ("what year?", "nineteen ninety nine"), ("greet me", "hello world"),
      ("what jumps?", "the fox jumps"), ("what do models do?", "they learn to speak"),
      ("which test?", "a test of streaming"), ("what is small?", "a small model"),
      ("what is good?", "the cafe is good"), ("what has words?", "text with many words")]


def chat(q, a=None):
    return [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a is not None else [])


def write_data(folder: Path, splits=("train", "valid")) -> Path:
    """The QA pairs as chats in each split (a memorisation task: valid scores the trained answers)."""
    folder.mkdir(exist_ok=True)
    for split in splits:
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"messages": chat(q, a)}) for q, a in QA) + "\n")
    return folder


def quiet(**kw):
    """train() keywords for tests: no progress bar, the log to a string."""
    return dict(stream=io.StringIO(), progress=False, **kw)


def one_batch(model_dir, tmp_path, mask_prompt=True):
    _, tok = load(model_dir)
    ds = load_datasets(write_data(tmp_path / "d", ("train",)), tok, mask_prompt=mask_prompt)["train"]
    return Batches(ds, 4, shuffle=False)(1)


def flat_grads(model, batch):
    _, grads = nn.value_and_grad(model, loss)(model, batch)
    return dict(tree_flatten(grads))


def test_loss_is_the_masked_cross_entropy_and_masked_targets_change_nothing(tiny_lm, tmp_path):
    model, _ = load(tiny_lm("llama"))
    inputs, targets, mask = one_batch(tiny_lm("llama"), tmp_path)
    m = np.array(mask)
    assert 0 < m.sum() < m.size / 2  # the prompts are masked, the padding too

    z = np.array(model(inputs)).astype(np.float64)  # (4, L, vocab)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.array(targets)[..., None], -1)[..., 0]
    expected = -(picked * m).sum() / m.sum()
    assert abs(loss(model, (inputs, targets, mask)).item() - expected) < 1e-5 * abs(expected)

    # Every dropped target replaced by other tokens: the same loss and gradients, bit for bit.
    other = mx.where(mask, targets, (targets + 7) % 400)
    base, moved = flat_grads(model, (inputs, targets, mask)), flat_grads(model, (inputs, other, mask))
    assert loss(model, (inputs, other, mask)).item() == loss(model, (inputs, targets, mask)).item()
    assert base.keys() == moved.keys() and all(mx.array_equal(base[k], moved[k]) for k in base)
    # ... while one kept target changed moves both (the law can fail).
    r, c = (int(v[0]) for v in np.nonzero(m))
    kept = mx.array(np.where(np.arange(m.size).reshape(m.shape) == r * m.shape[1] + c, np.array(targets) + 1,
                             np.array(targets)))
    assert loss(model, (inputs, kept, mask)).item() != loss(model, (inputs, targets, mask)).item()
    assert not mx.array_equal(flat_grads(model, (inputs, kept, mask))["attn_layers.layers.0.attn.to_q.weight"],
                              base["attn_layers.layers.0.attn.to_q.weight"])


def test_first_packed_example_scores_as_alone(tiny_lm):
    """Causal attention: the row's first example sees nothing of the later ones (which do see it,
    the documented approximation), so its per-token loss equals the unpacked one."""
    model, _ = load(tiny_lm("llama"))
    ds = TextDataset([([1, 30, 31, 32, 33, 34], 2), ([1, 40, 41, 42, 43, 44, 45], 3)], max_seq_len=32)
    (pi, pt, pm), (ui, ut, um) = Batches(ds, 2, pack=True, shuffle=False)(0), Batches(ds, 2, shuffle=False)(0)
    ce = [np.array(nn.losses.cross_entropy(model(i).astype(mx.float32), t, reduction="none")) for i, t in
          ((pi, pt), (ui, ut))]
    np.testing.assert_allclose(ce[0][0, :5], ce[1][0, :5], rtol=1e-5)
    assert np.array(pm).sum() == np.array(um).sum() == 4 + 4


def matched(model, tok, ds):
    """Greedy answer tokens equal to the trained completion's, position by position, over all QA."""
    hits = 0
    for (q, _), (ids, p) in zip(QA, ds.examples):
        want = ids[p:]
        got = [r.token for r in stream_generate(model, tok, chat(q), max_tokens=len(want))]
        hits += sum(a == b for a, b in zip(got, want))
    return hits, sum(len(ids) - p for ids, p in ds.examples)


def test_qlora_lowers_validation_loss_and_learns_the_answers(tiny_lm, tmp_path):
    model, tok = load(tiny_lm("llama"))
    assert quantize(model, 4, group_size=32) == 14  # every Linear and the embedding (inputs 64 or 128)
    data = write_data(tmp_path / "d")
    valid = load_datasets(data, tok, mask_prompt=True)["valid"]
    hits_before, total = matched(model, tok, valid)
    out = train(model, tok, data, rank=8, scale=20.0, iters=60, batch_size=4, learning_rate=2e-3, mask_prompt=True,
                adapter_path=tmp_path / "a", steps_per_eval=30, val_batches=None, save_every=None, **quiet())
    (s0, v0), (_, v_mid), (s_end, v_end) = out["val_losses"]
    assert (s0, s_end) == (0, 60) and v0 > 5.0 and v_end < v_mid < v0 and v_end < 0.5 * v0
    assert abs(evaluate(model, valid, 4) - v_end) < 1e-5 and abs(perplexity(model, valid, 4) - np.exp(v_end)) < 1e-3
    hits_after, _ = matched(model, tok, valid)
    assert hits_before <= total // 10 and hits_after >= total // 2, (hits_before, hits_after, total)
    assert all(m.startswith("attn_layers.layers.") for m in out["modules"]) and len(out["modules"]) == 12
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["rank"] == 8 and config["mask_prompt"] is True
    saved = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved) and len(saved) == 24


RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import mlx_zeta
from mlx_zeta.lm import load
from mlx_zeta.lm.datasets import Batches
from mlx_zeta.lm.tuning import train
from test_lm_tuning import SETTINGS
call = Batches.__call__
def killing(self, i):  # SIGKILL while drawing micro-batch {kill_at} (step 5's second)
    if self.shuffle and i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, i)
Batches.__call__ = killing
model, tok = load({model!r})
train(model, tok, {data!r}, adapter_path={out!r}, **SETTINGS)
"""
SETTINGS = dict(iters=8, batch_size=2, grad_accum=2, save_every=2, dropout=0.1, rank=4, learning_rate=1e-3,
                steps_per_eval=3, val_batches=2, seed=3)


def test_killed_and_resumed_equals_uninterrupted(tiny_lm, tmp_path):
    """Adapter dropout draws from MLX's RNG and the batches reshuffle each epoch (12 examples, 6
    micro-batches of 2): resuming must restore both exactly."""
    folder, data = tiny_lm("llama"), write_data(tmp_path / "d")
    script = RUN.format(tests=str(TESTS), kill_at=9, model=str(folder), data=str(data), out=str(tmp_path / "cut"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "ckpt-00000004"
    assert not (tmp_path / "cut" / "adapters.safetensors").exists()

    model, tok = load(folder)
    resumed = train(model, tok, data, adapter_path=tmp_path / "cut", resume=True, **quiet(**SETTINGS))
    model, tok = load(folder)
    whole = train(model, tok, data, adapter_path=tmp_path / "whole", **quiet(**SETTINGS))
    assert len(resumed["train_losses"]) == 4 and resumed["train_losses"] == whole["train_losses"][4:]
    assert resumed["val_losses"] == [v for v in whole["val_losses"] if v[0] > 4]
    a, b = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("cut", "whole"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    ckpt = mx.load(str(tmp_path / "whole" / "checkpoints" / "ckpt-00000008" / "model.safetensors"))
    assert ckpt.keys() == a.keys()  # checkpoints hold the adapters alone


def test_dora_with_gradient_checkpointing_equals_dora_without(tiny_lm, tmp_path):
    folder, data = tiny_lm("llama"), write_data(tmp_path / "d")
    runs = []
    for checkpointing in (False, True):
        model, tok = load(folder)
        train(model, tok, data, fine_tune_type="dora", rank=4, iters=3, learning_rate=1e-3,
              grad_checkpoint=checkpointing, adapter_path=tmp_path / str(checkpointing), steps_per_eval=None,
              save_every=None, **quiet())
        assert model.attn_layers.checkpoint is checkpointing
        runs.append(mx.load(str(tmp_path / str(checkpointing) / "adapters.safetensors")))
    assert any(k.endswith("magnitude") for k in runs[0])
    worst = max(float(mx.abs(runs[0][k] - runs[1][k]).max()) for k in runs[0])
    assert worst <= 1e-6, worst
    assert json.loads((tmp_path / "True" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"


def test_full_fine_tuning_trains_every_parameter_and_saves_the_model(tiny_lm, tmp_path):
    model, tok = load(tiny_lm("llama"))
    data = write_data(tmp_path / "d", ("train", "valid", "test"))
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    out = train(model, tok, data, fine_tune_type="full", iters=6, learning_rate=1e-3, mask_prompt=True,
                adapter_path=tmp_path / "full", steps_per_eval=6, val_batches=None, save_every=None, test=True,
                **quiet())
    assert out["modules"] == [] and out["val_losses"][-1][1] < out["val_losses"][0][1]
    assert abs(out["test_perplexity"] - np.exp(out["test_loss"])) < 1e-9
    assert abs(out["test_loss"] - out["val_losses"][-1][1]) < 1e-5  # test.jsonl == valid.jsonl
    after = dict(tree_flatten(model.parameters()))
    assert all(not np.array_equal(before[k], np.array(v)) for k, v in after.items())  # every parameter moved
    back = from_pretrained(tmp_path / "full")
    assert all(mx.array_equal(v, after[k]) for k, v in tree_flatten(back.parameters()))
    ckpt = mx.load(str(tmp_path / "full" / "checkpoints" / "ckpt-00000006" / "model.safetensors"))
    assert ckpt.keys() == after.keys()


@pytest.mark.parametrize("settings, expected", [
    (dict(fine_tune_type="qlora"), r"\[train\] expected fine_tune_type"),
    (dict(grad_checkpoint=True, dropout=0.1), r"\[train\] expected dropout=0 with grad_checkpoint"),
    (dict(iters=-1), r"\[train\] expected iters"),
    (dict(save_every=0), r"\[train\] expected save_every"),
    (dict(test=True), r"\[train\] expected .*test.jsonl, not found"),
    (dict(fine_tune_type="full", rank=4), r"\[train\] expected no adapter settings with fine_tune_type='full', "
                                          r"got \['rank'\]"),
    (dict(learning_rate=0.0), r"\[train\] expected learning_rate"),
    (dict(data="empty"), r"\[train\] expected .*train.jsonl, not found"),
    (dict(quantized=True, fine_tune_type="full"), r"\[train\] fine_tune_type='full' trains every parameter, but "
                                                  r"\S+ \(\d+ in all\) is not floating point"),
])
def test_bad_settings_are_refused_in_one_line(tiny_lm, tmp_path, settings, expected):
    model, tok = load(tiny_lm("llama"))
    if settings.pop("quantized", False):
        quantize(model, 4, group_size=32)
    data = tmp_path / "empty" if settings.pop("data", None) else write_data(tmp_path / "d")
    data.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=expected) as info:
        train(model, tok, data, adapter_path=tmp_path / "a", **quiet(**settings))
    assert "\n" not in str(info.value)
