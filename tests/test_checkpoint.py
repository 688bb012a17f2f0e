"""Training checkpoints (mlx_zeta.training.checkpoint): exact save/load round trip
(weights, optimizer state, RNG), resumed training equal to uninterrupted training, a
process killed mid-write leaving the previous checkpoint loadable, pruning, and errors
that name the file or key."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from mlx_zeta.structs import Decoder, Transformer
from mlx_zeta.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

VOCAB, SEQ, BATCH = 32, 8, 4
CONFIG = {"vocab": VOCAB, "dim": 16, "depth": 1, "lr": 1e-2}
REPO = Path(__file__).resolve().parents[1]


def make_model(seed: int) -> Transformer:
    """A tiny decoder with feed-forward dropout, so training consumes the global RNG."""
    mx.random.seed(seed)
    model = Transformer(num_tokens=VOCAB, max_seq_len=SEQ,
                        attn_layers=Decoder(dim=16, depth=1, heads=2, ff_mult=2, ff_dropout=0.1))
    mx.eval(model.parameters())
    return model


def make_optimizer() -> optim.Optimizer:
    return optim.AdamW(learning_rate=1e-2, weight_decay=0.01)


def batch(step: int):
    """Data from the step index alone (its own key), so a resumed run sees the same data."""
    tokens = mx.random.randint(0, VOCAB, (BATCH, SEQ + 1), key=mx.random.key(1000 + step)).astype(mx.int32)
    return tokens[:, :-1], tokens[:, 1:]


def train(model, optimizer, start: int, stop: int):
    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")
    step_fn = nn.value_and_grad(model, loss_fn)
    losses = []
    for step in range(start, stop):
        loss, grads = step_fn(model, *batch(step))
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses


def flat(tree):
    return dict(tree_flatten(tree))


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and mx.array_equal(fa[k], fb[k]), k


def test_round_trip_exact(tmp_path):
    model, opt = make_model(0), make_optimizer()
    train(model, opt, 0, 3)
    mx.random.seed(7)
    mx.random.uniform(shape=(3,))  # move the RNG away from a plain seed
    path = save_checkpoint(tmp_path, model, opt, step=3, config=CONFIG, extra={"tokens_seen": 96})
    expected_draw = mx.random.normal((5,))

    fresh, fresh_opt = make_model(1), make_optimizer()
    mx.random.seed(123)  # a different RNG state, restored by the load
    info = load_checkpoint(tmp_path, fresh, fresh_opt)
    assert info["step"] == 3 and info["config"] == CONFIG and info["extra"] == {"tokens_seen": 96}
    assert info["path"] == path and path.name == "ckpt-00000003"
    assert mx.array_equal(mx.random.normal((5,)), expected_draw)
    assert_trees_equal(model.parameters(), fresh.parameters())
    assert_trees_equal(opt.state, fresh_opt.state)
    assert fresh_opt.step.item() == 3 and "learning_rate" in fresh_opt.state
    # Loading one checkpoint directory directly works too.
    assert load_checkpoint(path, make_model(2))["step"] == 3


def test_resume_equals_uninterrupted(tmp_path):
    """Train 100 steps vs 50, save, reload into a fresh model and optimizer, 50 more: equal bits."""
    model, opt = make_model(0), make_optimizer()
    losses = train(model, opt, 0, 100)

    first, first_opt = make_model(0), make_optimizer()
    losses_a = train(first, first_opt, 0, 50)
    save_checkpoint(tmp_path, first, first_opt, step=50, config=CONFIG)
    del first, first_opt
    mx.random.seed(999)  # whatever happened in between
    resumed, resumed_opt = make_model(5), make_optimizer()
    info = load_checkpoint(tmp_path, resumed, resumed_opt)
    losses_b = train(resumed, resumed_opt, info["step"], 100)
    assert losses_a + losses_b == losses
    assert losses[-1] < losses[0]
    assert_trees_equal(model.parameters(), resumed.parameters())
    assert_trees_equal(opt.state, resumed_opt.state)


def test_keep_latest_and_same_step_twice(tmp_path):
    model, opt = make_model(0), make_optimizer()
    train(model, opt, 0, 1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, model, opt, step=step, config=CONFIG, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003", "ckpt-00000004", "latest"]
    again = save_checkpoint(tmp_path, model, opt, step=4, config=CONFIG, keep=2)
    assert again.name == "ckpt-00000004.1" and latest_checkpoint(tmp_path) == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004", "ckpt-00000004.1", "latest"]


def test_strict_keys_and_corrupt_files(tmp_path):
    model, opt = make_model(0), make_optimizer()
    train(model, opt, 0, 1)
    path = save_checkpoint(tmp_path, model, opt, step=1, config=CONFIG)
    other = Transformer(num_tokens=VOCAB, max_seq_len=SEQ, attn_layers=Decoder(dim=16, depth=2, heads=2, ff_mult=2))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\] checkpoint does not match the model: "
                                              r"missing keys \d+: attn_layers\.layers\.1\."):
        load_checkpoint(tmp_path, other)
    no_pos = Transformer(num_tokens=VOCAB, max_seq_len=SEQ,
                         attn_layers=Decoder(dim=16, depth=1, heads=2, ff_mult=2, rotary_pos_emb=True))
    with pytest.raises(CheckpointError, match=r"unexpected keys 1: pos_emb\.emb\.weight$"):
        load_checkpoint(tmp_path, no_pos)

    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt-00000001/model\.safetensors is corrupt"):
        load_checkpoint(tmp_path, make_model(0), make_optimizer())
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ckpt-00000001/meta\.json is corrupt"):
        load_checkpoint(tmp_path, make_model(0))
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match=r"latest is corrupt"):
        load_checkpoint(tmp_path, make_model(0))
    with pytest.raises(CheckpointError, match=r"no checkpoint in"):
        load_checkpoint(tmp_path / "empty", make_model(0))
    with pytest.raises(ValueError, match=r"JSON-serialisable"):
        save_checkpoint(tmp_path, model, opt, step=2, config={"f": object()})


# The child saves checkpoint 1, then starts checkpoint 2 with one write stalled halfway
# (stage "weights": the optimizer file, after the weights file, is half written; stage
# "pointer": checkpoint 2 is complete and renamed, but ``latest`` is not yet swapped), says
# READY and waits to be SIGKILLed.
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import mlx_zeta, mlx.core as mx
    import mlx_zeta.training.checkpoint as ck
    from test_checkpoint import make_model, make_optimizer, train, CONFIG
    root, stage = sys.argv[1], sys.argv[2]
    model, opt = make_model(0), make_optimizer()
    train(model, opt, 0, 2)
    ck.save_checkpoint(root, model, opt, step=2, config=CONFIG)
    train(model, opt, 2, 4)

    def stall():
        print("READY", flush=True)
        time.sleep(60)

    if stage == "weights":
        real = ck._write_arrays
        def partial(path, arrays):
            if path.name == ck.OPTIMIZER_FILE:
                real(path, arrays)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                stall()
            real(path, arrays)
        ck._write_arrays = partial
    else:
        def hang(src, dst):
            stall()
        ck.os.replace = hang
    ck.save_checkpoint(root, model, opt, step=4, config=CONFIG)
""")


@pytest.mark.parametrize("stage", ["weights", "pointer"])
def test_kill_during_write_keeps_previous(tmp_path, stage):
    root = tmp_path / "ckpts"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO / "tests")))
    child = subprocess.Popen([sys.executable, str(script), str(root), stage], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    visible = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    hidden = [p for p in root.iterdir() if p.name.startswith(".")]
    if stage == "weights":
        assert visible == ["ckpt-00000002", "latest"] and len(hidden) == 1  # the dead temporary directory
    else:  # checkpoint 4 is complete (renamed only after fsync); the pointer still names 2
        assert visible == ["ckpt-00000002", "ckpt-00000004", "latest"]
        assert load_checkpoint(root / "ckpt-00000004", make_model(1))["step"] == 4
    assert (root / "latest").read_text().strip() == "ckpt-00000002"

    expected, expected_opt = make_model(0), make_optimizer()
    train(expected, expected_opt, 0, 2)
    model, opt = make_model(3), make_optimizer()
    assert load_checkpoint(root, model, opt)["step"] == 2
    assert_trees_equal(expected.parameters(), model.parameters())
    assert_trees_equal(expected_opt.state, opt.state)
    json.loads((root / "ckpt-00000002" / "meta.json").read_text())
    # The next save clears the dead writer's leftovers.
    save_checkpoint(root, model, opt, step=3, config=CONFIG)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_trainable_only_holds_and_restores_only_trainable_parameters(tmp_path):
    """A frozen base with a trainable part: the file holds the trainable names alone; loading
    restores them exactly and leaves the (caller's) frozen weights as they are."""
    def partly_frozen(seed):
        model = make_model(seed)
        model.freeze()
        model.attn_layers.layers[0].ff.unfreeze()
        return model

    model, opt = partly_frozen(0), make_optimizer()
    train(model, opt, 0, 2)
    path = save_checkpoint(tmp_path, model, opt, step=2, config=CONFIG, trainable_only=True)
    saved = mx.load(str(path / "model.safetensors"))
    assert sorted(saved) == sorted(flat(model.trainable_parameters())) and len(saved) < len(flat(model.parameters()))
    assert json.loads((path / "meta.json").read_text())["trainable_only"] is True

    fresh, fresh_opt = partly_frozen(1), make_optimizer()
    frozen_before = {k: v for k, v in flat(fresh.parameters()).items() if k not in saved}
    load_checkpoint(tmp_path, fresh, fresh_opt)
    assert_trees_equal(model.trainable_parameters(), fresh.trainable_parameters())
    assert_trees_equal(opt.state, fresh_opt.state)
    for k, v in frozen_before.items():  # untouched: still seed 1's
        assert mx.array_equal(flat(fresh.parameters())[k], v), k

    other = make_model(0)  # everything trainable: the checkpoint lacks most names
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path, other)
