"""Worker for tests/test_distributed.py: train a tiny decoder for a few steps on a global
batch of 2B sequences, either alone (``single``) or as one of the ranks started by
``mlx.launch`` (``ring``), each on its half with averaged gradients. The main process
writes the loss curve (JSON) and the final weights (safetensors); every rank writes a
marker file only if it is the main process.

    python tests/_dist_worker.py single OUT_DIR
    mlx.launch --backend ring -n 2 -p PORT tests/_dist_worker.py ring OUT_DIR
"""

import json
import sys
from pathlib import Path

import mlx_zeta  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_zeta.structs import Decoder, Transformer
from mlx_zeta.training.distributed import average_gradients, is_main_process, shard_batch, sync_parameters, world

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 32, 8, 8, 10


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    group = world(backend="ring") if mode == "ring" else None
    if mode == "ring" and (group is None or group.size() != 2):
        raise SystemExit(f"expected a ring group of 2 processes, got {group and group.size()}")
    # Different seeds per rank, then rank 0's weights for all: checks sync_parameters.
    mx.random.seed(0 if group is None else group.rank())
    model = Transformer(num_tokens=VOCAB, max_seq_len=SEQ, attn_layers=Decoder(dim=16, depth=2, heads=2, ff_mult=2))
    if group is None:
        mx.random.seed(0)
        model = Transformer(num_tokens=VOCAB, max_seq_len=SEQ,
                            attn_layers=Decoder(dim=16, depth=2, heads=2, ff_mult=2))
    sync_parameters(model, group)
    optimizer = optim.AdamW(learning_rate=1e-2)

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")
    step_fn = nn.value_and_grad(model, loss_fn)
    losses = []
    for step in range(STEPS):
        tokens = mx.random.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), key=mx.random.key(step)).astype(mx.int32)
        x, y = shard_batch((tokens[:, :-1], tokens[:, 1:]), group)
        loss, grads = step_fn(model, x, y)
        grads = average_gradients(grads, group)
        if group is not None:
            loss = mx.distributed.all_sum(loss, group=group) / group.size()
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
    rank = 0 if group is None else group.rank()
    if group is not None:  # mixed dtypes in tiny buckets (one leaf or less each) average too
        r = float(rank)
        tree = {"a": mx.full((3,), r + 1), "b": [mx.full((5,), 2 * r, mx.float16)], "c": mx.ones((2, 2)) * r}
        avg = average_gradients(tree, group, bucket_bytes=8)
        mx.eval(avg)
        if not (avg["a"].tolist() == [1.5] * 3 and avg["b"][0].dtype == mx.float16
                and avg["b"][0].tolist() == [1.0] * 5 and avg["c"].tolist() == [[0.5, 0.5]] * 2):
            raise SystemExit(f"average_gradients gave {avg}")
    if is_main_process(group):
        (out / f"main-rank{rank}").write_text("")
        (out / "losses.json").write_text(json.dumps(losses))
        mx.save_safetensors(str(out / "weights.safetensors"), dict(tree_flatten(model.parameters())))


if __name__ == "__main__":
    main()
