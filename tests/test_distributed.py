"""Data parallelism (mlx_zeta.training.distributed): two ring-backend processes on
127.0.0.1, started by ``mlx.launch``, each on half of every global batch with averaged
gradients, against one process on the whole batch (tests/_dist_worker.py); plus the
single-process behaviour of the helpers."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import pytest

from mlx_zeta.training.distributed import average_gradients, is_main_process, shard_batch, sync_parameters, world

WORKER = Path(__file__).with_name("_dist_worker.py")
REPO = Path(__file__).resolve().parents[1]

# Two ranks average two half-batch means where one process takes one mean over the whole
# batch: the same sums in another order, a few float32 ulps per step (losses ~3.6 agree
# to 4.8e-7 measured). Ten AdamW steps (lr 1e-2) amplify that where a gradient is near
# zero (the update g / sqrt(v) is then a ratio of two tiny, perturbed numbers): the
# weights agree to 5.5e-6 measured. The bounds leave about 20x room.
LOSS_ATOL, WEIGHT_ATOL = 1e-5, 1e-4


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (mlx.launch uses one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def launcher() -> list:
    script = Path(sys.executable).with_name("mlx.launch")
    if script.exists():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found is None:
        pytest.skip("mlx.launch (installed with mlx >= 0.22) is not on PATH")
    return [found]


def run_worker(cmd: list) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"


def test_two_ring_ranks_match_one_process(tmp_path):
    if not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend")
    single, ring = tmp_path / "single", tmp_path / "ring"
    single.mkdir()
    ring.mkdir()
    run_worker([sys.executable, str(WORKER), "single", str(single)])
    run_worker(launcher() + ["--backend", "ring", "-n", "2", "--starting-port", str(free_port_pair()),
                             "--python", sys.executable, str(WORKER), "ring", str(ring)])

    assert sorted(p.name for p in ring.iterdir()) == ["losses.json", "main-rank0", "weights.safetensors"]
    ref_losses = json.loads((single / "losses.json").read_text())
    losses = json.loads((ring / "losses.json").read_text())
    assert len(losses) == len(ref_losses) == 10
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_ATOL
    assert losses[-1] < losses[0]
    ref_w = mx.load(str(single / "weights.safetensors"))
    w = mx.load(str(ring / "weights.safetensors"))
    assert sorted(w) == sorted(ref_w)
    worst = max(float(mx.abs(w[k] - ref_w[k]).max()) for k in w)
    assert worst <= WEIGHT_ATOL, f"largest weight difference {worst}"


def test_single_process_helpers_are_noops():
    assert world() is None  # run without a launcher
    assert is_main_process(None)
    grads = {"a": mx.ones((2, 3)), "b": [mx.zeros((4,), mx.float16)]}
    assert average_gradients(grads, None) is grads
    batch = (mx.arange(6), mx.arange(6))
    assert shard_batch(batch, None) is batch
    sync_parameters(mx.array(0), None)


class FakeGroup:
    """rank/size only, for the shard arithmetic (no collectives)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_shard_batch_slices_and_checks():
    x = {"tokens": mx.arange(12).reshape(6, 2), "mask": mx.ones((6,), mx.bool_)}
    part = shard_batch(x, FakeGroup(1, 3))
    assert part["tokens"].tolist() == [[4, 5], [6, 7]] and part["mask"].shape == (2,)
    assert shard_batch(mx.arange(4), FakeGroup(0, 2)).tolist() == [0, 1]
    with pytest.raises(ValueError, match="divisible by the 4 ranks, got 6"):
        shard_batch(x, FakeGroup(0, 4))
    assert is_main_process(FakeGroup(0, 2)) and not is_main_process(FakeGroup(1, 2))
