"""Data-parallel training helpers on ``mx.distributed``: the process group, rank-0 gating,
gradient averaging in a few large collectives, batch sharding and a parameter sync.

Every rank runs the same script on its slice of each global batch; after the backward
pass :func:`average_gradients` makes all ranks hold the mean gradient, so with the same
initial weights (:func:`sync_parameters`) and optimizer they stay identical, as one
process on the whole batch would be.

Launch two processes on this machine over TCP with MLX's ring backend::

    mlx.launch --backend ring -n 2 --starting-port 32323 --python python train.py --my-args

(``--python`` names the interpreter: without it ``mlx.launch`` executes the script file itself, which needs a
shebang and the execute bit; ``-n 2`` repeats the default host ``127.0.0.1`` twice; ranks listen on ports 32323 and
32324). Across machines list their IPs: ``mlx.launch --backend ring --hosts 10.0.0.1,10.0.0.2
--python python train.py`` (``mlx.launch`` reaches other hosts over ssh), or give a ``--hostfile``;
``mlx.distributed_config`` writes one. ``mlx.launch`` sets ``MLX_RANK`` and ``MLX_HOSTFILE``
(a JSON list of ``"ip:port"`` lists, one per rank) for each process. Run without a
launcher, :func:`world` returns ``None`` and every helper is a no-op.

    >>> import mlx.core as mx
    >>> import mlx.nn as nn
    >>> import mlx.optimizers as optim
    >>> from mlx_zeta.training import average_gradients, is_main_process, shard_batch, world
    >>> model, optimizer = nn.Linear(4, 1), optim.SGD(learning_rate=0.1)
    >>> loss_and_grad = nn.value_and_grad(model, lambda x, y: ((model(x) - y) ** 2).mean())
    >>> batch = (mx.ones((8, 4)), mx.zeros((8, 1)))
    >>> group = world()  # None here, without a launcher
    >>> loss, grads = loss_and_grad(*shard_batch(batch, group))
    >>> optimizer.update(model, average_gradients(grads, group))
    >>> is_main_process(group)  # e.g. the one rank that saves checkpoints
    True
"""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

__all__ = ["world", "is_main_process", "average_gradients", "shard_batch", "sync_parameters"]

Group = Any  # mx.distributed.Group


def world(backend: str = "any") -> Optional[Group]:
    """The global ``mx.distributed`` group when more than one process runs, else ``None``.

    Args:
        backend (str): ``"any"`` (the first available) or ``"ring"``, ``"mpi"``, ``"nccl"``,
            ``"jaccl"``. Default: ``"any"``.
    """
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init(backend=backend)
    return group if group.size() > 1 else None


def is_main_process(group: Optional[Group] = None) -> bool:
    """True on rank 0 (and in a single process): the one that logs and saves.

    Without ``group`` the global group of :func:`world` is asked.
    """
    group = world() if group is None else group
    return group is None or group.rank() == 0


def average_gradients(grads: Any, group: Optional[Group] = None, bucket_bytes: int = 64 << 20) -> Any:
    r"""The mean of ``grads`` over the ranks of ``group``: :math:`\frac{1}{R}\sum_r g_r`.

    Leaves are packed per dtype into flat buffers of at most ``bucket_bytes`` (one leaf
    larger than that gets its own), so a model costs a few ``all_sum`` calls rather than
    one per parameter.

    Args:
        grads: a tree of arrays (e.g. from ``nn.value_and_grad``).
        group: the group; ``None`` or a single rank returns ``grads`` unchanged.
        bucket_bytes (int): largest packed buffer. Default: 64 MiB.
    """
    if group is None or group.size() == 1:
        return grads
    size = group.size()
    flat = tree_flatten(grads)
    out = [None] * len(flat)
    by_dtype = {}
    for i, (_, g) in enumerate(flat):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        bucket, nbytes = [], 0
        for i in idx + [None]:
            g = flat[i][1] if i is not None else None
            if bucket and (i is None or nbytes + g.nbytes > bucket_bytes):
                total = mx.distributed.all_sum(mx.concatenate([flat[j][1].reshape(-1) for j in bucket]), group=group)
                total = total / size if mx.issubdtype(dtype, mx.inexact) else total // size
                offsets = [0]
                for j in bucket:
                    offsets.append(offsets[-1] + flat[j][1].size)
                for k, j in enumerate(bucket):
                    out[j] = total[offsets[k]:offsets[k + 1]].reshape(flat[j][1].shape).astype(dtype)
                bucket, nbytes = [], 0
            if i is not None:
                bucket.append(i)
                nbytes += g.nbytes
    return tree_unflatten([(k, v) for (k, _), v in zip(flat, out)])


def shard_batch(batch: Any, group: Optional[Group] = None) -> Any:
    """This rank's contiguous slice (axis 0) of every array in ``batch``, a global batch.

    Rank :math:`r` of :math:`R` gets rows :math:`[rN/R, (r+1)N/R)`; ``N`` must divide by ``R``.
    """
    if group is None or group.size() == 1:
        return batch
    rank, size = group.rank(), group.size()

    def one(x: mx.array) -> mx.array:
        if x.shape[0] % size:
            raise ValueError(f"[shard_batch] expected a batch size divisible by the {size} ranks, got {x.shape[0]}")
        n = x.shape[0] // size
        return x[rank * n:(rank + 1) * n]
    if isinstance(batch, mx.array):
        return one(batch)
    return tree_unflatten([(k, one(v)) for k, v in tree_flatten(batch)])


def sync_parameters(model: nn.Module, group: Optional[Group] = None) -> None:
    """Give every rank rank 0's parameters (a sum where the other ranks contribute zeros)."""
    if group is None or group.size() == 1:
        return
    main = group.rank() == 0
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, mx.distributed.all_sum(v if main else mx.zeros_like(v), group=group))
                                 for k, v in params]))
    mx.eval(model.parameters())
