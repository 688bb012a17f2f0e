r"""Stateful Core ML export of a decoder language model: one ``.mlpackage``, two functions.

:func:`export_decoder` traces two steps of a causal :class:`~mlx_zeta.structs.Transformer`
over a :class:`~mlx_zeta.nn.StaticKVCache` (fixed capacity, position as an array) and lowers
them with :func:`~.lower.lower_graph`, the cache buffers becoming Core ML *state*:

* ``prefill``: ``input_ids`` (B, prefill_len) int32, ``position`` (1,) int32 -> ``logits``
  (B, prefill_len, vocab) float32;
* ``decode``: ``input_ids`` (B, 1) int32, ``position`` (1,) int32 -> ``logits`` (B, 1, vocab).

Both read and write the states ``k_cache_{i}`` / ``v_cache_{i}`` (one pair per layer, fp16,
(B, kv_heads, capacity, head_dim)). A step writes its keys/values at ``position`` with MIL
``slice_update`` + ``coreml_update_state`` and attends over the *written* value (the output of
``coreml_update_state``; a second ``read_state`` would be merged with the first by
coremltools' passes and see the old cache). Queries mask keys by position (``j <= position + i``),
so unwritten or stale slots are never seen: a prompt shorter than ``prefill_len`` can be padded
on the right and decoding continues at its true length. The caller keeps
``position + tokens <= capacity``; nothing checks it at run time.

The two functions are converted separately and combined with coremltools'
``MultiFunctionDescriptor``/``save_multifunction`` (shared weights are deduplicated), then moved
into place atomically.
"""

from pathlib import Path
from typing import List, Tuple

import mlx.nn as nn

from mlx_zeta.common import check_int

from .export import save_atomically, to_mil
from .runtime import quiet_coremltools

__all__ = ["export_decoder", "DecoderStep", "FUNCTIONS"]

FUNCTIONS = ("prefill", "decode")
STATE_TARGETS = ("iOS18", "macOS15")  # the deployment targets that have Core ML states


class DecoderStep(nn.Module):
    """``(input_ids, position, *keys, *values) -> logits``: one call of ``model`` on a static KV
    cache rebuilt from the given buffers at ``position`` (shape (1,)); the traced function."""

    def __init__(self, model, capacity: int):
        super().__init__()
        self.model, self.capacity = model, capacity

    def __call__(self, input_ids, position, *buffers):
        from mlx_zeta.nn import StaticKVCache

        n = len(buffers) // 2
        offset = position.reshape(())
        cache = [StaticKVCache(self.capacity, k, v, offset) for k, v in zip(buffers[:n], buffers[n:])]
        return self.model(input_ids, cache=cache)


def _check(model, capacity: int, prefill_len: int, batch: int) -> None:
    from mlx_zeta.structs import Transformer

    if not isinstance(model, Transformer):
        raise ValueError(f"[export_decoder] expected a mlx_zeta.structs.Transformer decoder, "
                         f"got {type(model).__name__}")
    for name, v in (("capacity", capacity), ("prefill_len", prefill_len), ("batch", batch)):
        check_int("export_decoder", name, v, 1)
    if prefill_len > capacity:
        raise ValueError(f"[export_decoder] expected prefill_len <= capacity, got {prefill_len} > {capacity}")
    if "pos_emb" in model and capacity > model.max_seq_len:
        raise ValueError(f"[export_decoder] capacity {capacity} exceeds the absolute position embedding's "
                         f"max_seq_len={model.max_seq_len}")
    if getattr(model.attn_layers, "cross_attend", False):
        raise ValueError("[export_decoder] cross-attending decoders (encoder-decoder) are not supported")


def cache_shapes(model, capacity: int, batch: int) -> Tuple[List[tuple], List[tuple]]:
    """Shapes of each layer's key and value buffers, from one token through a static cache."""
    import mlx.core as mx

    cache = model.make_cache(capacity=capacity)  # raises for stacks a static cache cannot serve
    model(mx.zeros((batch, 1), mx.int32), cache=cache)
    return [tuple(c.keys.shape) for c in cache], [tuple(c.values.shape) for c in cache]


def export_decoder(model, path, *, capacity: int, prefill_len: int, batch: int = 1, precision: str = "float16",
                   minimum_deployment_target: str = "iOS18", verbose: bool = False) -> Path:
    """Export ``model`` (a causal :class:`~mlx_zeta.structs.Transformer`, rotary or absolute
    positions, no ALiBi/relative positions/sliding window) to a stateful ``.mlpackage`` at
    ``path`` with functions ``prefill`` and ``decode`` (module docstring); returns the path.

    Args:
        capacity: cache positions (prompt + generated tokens).
        prefill_len: tokens per ``prefill`` call (pad shorter prompts on the right).
        batch: rows per call (one position shared by all rows).
        precision: ``"float16"`` or ``"float32"`` activations (see :mod:`.lower`); the cache
            state is fp16 either way (Core ML states are fp16).
        minimum_deployment_target: ``"iOS18"`` or ``"macOS15"`` (states need them).
        verbose: let coremltools log, warn and draw its progress bars (:mod:`.runtime`).

    Raises:
        ValueError: a model or option the export does not support. Nothing is left at
        ``path`` on failure.
    """
    _check(model, capacity, prefill_len, batch)
    if minimum_deployment_target not in STATE_TARGETS:
        raise ValueError(f"[export_decoder] expected minimum_deployment_target in {STATE_TARGETS} (Core ML states "
                         f"need them), got {minimum_deployment_target!r}")
    with quiet_coremltools(verbose) as ct:
        return _export_decoder(ct, model, path, capacity, prefill_len, batch, precision, minimum_deployment_target)


def _export_decoder(ct, model, path, capacity, prefill_len, batch, precision, minimum_deployment_target) -> Path:
    """:func:`export_decoder` once its options are checked, with coremltools ``ct``."""
    import mlx.core as mx
    from coremltools.converters.mil.mil import Builder as mb, types

    mx.eval(model.parameters())
    kshapes, vshapes = cache_shapes(model, capacity, batch)
    depth = len(kshapes)
    names = ["input_ids", "position"] + [f"k_cache_{i}" for i in range(depth)] + [f"v_cache_{i}" for i in range(depth)]
    shapes = kshapes + vshapes
    states = {n: mb.StateTensorSpec(shape=s, dtype=types.fp16) for n, s in zip(names[2:], shapes)}
    step = DecoderStep(model, capacity)
    target = getattr(ct.target, minimum_deployment_target)
    models = {}
    for fname, length in zip(FUNCTIONS, (prefill_len, 1)):
        example = [mx.zeros((batch, length), mx.int32), mx.zeros((1,), mx.int32)] + [mx.zeros(s) for s in shapes]
        prog = to_mil(step, example, input_names=names, output_names=["logits"], precision=precision,
                      minimum_deployment_target=minimum_deployment_target, states=states)
        models[fname] = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                                   compute_precision=ct.precision.FLOAT32)  # fp16 already chosen op by op

    def write(staged: Path) -> None:
        parts = staged.parent / "functions"
        parts.mkdir()
        desc = ct.utils.MultiFunctionDescriptor()
        for fname, m in models.items():
            m.save(str(parts / f"{fname}.mlpackage"))
            desc.add_function(str(parts / f"{fname}.mlpackage"), "main", fname)
        desc.default_function_name = "decode"
        ct.utils.save_multifunction(desc, str(staged))

    return save_atomically(path, write)
