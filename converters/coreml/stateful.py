r"""Stateful Core ML export of a decoder language model: one ``.mlpackage``, several functions.

:func:`export_decoder` traces steps of a causal :class:`~mlx_zeta.structs.Transformer` over a
:class:`~mlx_zeta.nn.StaticKVCache` (fixed capacity, position as an array) and lowers them with
:func:`~.lower.lower_graph`, the cache buffers becoming Core ML *state*. This docstring is the
home of the package's contract (the Swift sample in ``examples/ios/`` and
:mod:`.metadata`'s ``mlx_zeta.*`` keys follow it).

Functions (Core ML state cannot take flexible shapes, so each token count is its own function):

* ``prefill_{L}`` for each ``L`` in ``prefill_lens`` (deduplicated, sorted):
  ``input_ids`` (B, L) int32, ``position`` (1,) int32 -> ``logits`` (B, L, vocab) float32;
* ``decode`` (the default function): ``input_ids`` (B, 1) int32, ``position`` (1,) int32 ->
  ``logits`` (B, 1, vocab) float32.

All read and write the states ``k_cache_{i}`` / ``v_cache_{i}``, i = 0..depth-1 (fp16,
(B, kv_heads, capacity, head_dim)), so one ``MLState`` serves every function. A call of T tokens
writes their keys/values at positions ``position .. position + T - 1`` and query ``i`` attends
keys ``j <= position + i``: slots not yet written, or written by padding, are never seen.

Driving it (the contract):

* A prompt of ``n`` tokens is **right-padded** to the chosen ``L`` (any pad id); the next token
  comes from ``logits[:, n - 1]``, and the next call starts at ``position + n`` (it overwrites the
  padding's slots before anything attends to them).
* **Choice of function**: with ``t`` prompt tokens left, call the smallest ``prefill_L`` with
  ``L >= t``; if there is none, call the largest ``prefill_L`` on the next ``L`` tokens and choose
  again for the rest. Generated tokens go through ``decode``, one per call.
* The caller keeps ``position + T <= capacity``; nothing checks it at run time.

A step writes its keys/values with MIL ``slice_update`` + ``coreml_update_state`` and attends
over the *written* value (the output of ``coreml_update_state``; a second ``read_state`` would be
merged with the first by coremltools' passes and see the old cache). Each function is converted
separately and they are combined with coremltools' ``MultiFunctionDescriptor`` /
``save_multifunction``, which stores equal weights once (a package with three functions is about
the size of one with a single function); the package's metadata (:mod:`.metadata`) is written
into the staged package, which is then moved into place atomically.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.nn as nn

from mlx_zeta.common import check_int, is_int

from .compress import describe, policy
from .export import save_atomically, to_mil
from .metadata import check_metadata, exporter_metadata, write_metadata
from .runtime import quiet_coremltools

__all__ = ["export_decoder", "DecoderStep", "DECODE", "PREFILL_PREFIX", "function_names", "prefill_lengths",
           "check_decoder", "cache_shapes", "DESCRIPTIONS"]

DECODE = "decode"  # the one-token function, and the package's default function
PREFILL_PREFIX = "prefill_"  # + L: the L-token functions
STATE_TARGETS = ("iOS18", "macOS15")  # the deployment targets that have Core ML states
DESCRIPTIONS = {  # feature -> its description in the package (the same text in every function)
    "input_ids": "Token ids (B, L) int32, right-padded to L",
    "position": "(1,) int32: index in the cache of input_ids[:, 0]",
    "logits": "(B, L, vocab) float32 next-token logits for each input position",
}


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


def prefill_lengths(prefill_lens: Union[int, Sequence[int]], capacity: int,
                    owner: str = "export_decoder") -> Tuple[int, ...]:
    """``prefill_lens`` (an int or a sequence of ints, each in [1, capacity]) deduplicated and sorted.

    Raises ``ValueError("[owner] expected prefill_lens to be ..., got ...")`` for an empty
    sequence, a non-int (or bool) or a length outside [1, capacity]."""
    lens = (prefill_lens,) if is_int(prefill_lens) else prefill_lens
    ok = isinstance(lens, (tuple, list)) and len(lens) > 0 and all(is_int(n) and 1 <= n <= capacity for n in lens)
    if not ok:
        raise ValueError(f"[{owner}] expected prefill_lens to be an int in [1, capacity={capacity}] or a non-empty "
                         f"sequence of them, got {prefill_lens!r}")
    return tuple(sorted(set(lens)))


def function_names(prefill_lens: Sequence[int]) -> List[str]:
    """The package's functions, in its order: ``prefill_{L}`` for each (sorted) length, then ``decode``."""
    return [f"{PREFILL_PREFIX}{n}" for n in sorted(set(prefill_lens))] + [DECODE]


def check_decoder(model, capacity: int, batch: int, owner: str = "export_decoder") -> None:
    """``ValueError("[owner] ...")`` unless ``model`` is a causal Transformer a static cache of
    ``capacity`` positions and ``batch`` rows can serve (shared with the Core AI exporter)."""
    from mlx_zeta.structs import Transformer

    if not isinstance(model, Transformer):
        raise ValueError(f"[{owner}] expected a mlx_zeta.structs.Transformer decoder, "
                         f"got {type(model).__name__}")
    for name, v in (("capacity", capacity), ("batch", batch)):
        check_int(owner, name, v, 1)
    if "pos_emb" in model and capacity > model.max_seq_len:
        raise ValueError(f"[{owner}] capacity {capacity} exceeds the absolute position embedding's "
                         f"max_seq_len={model.max_seq_len}")
    if getattr(model.attn_layers, "cross_attend", False):
        raise ValueError(f"[{owner}] cross-attending decoders (encoder-decoder) are not supported")


def cache_shapes(model, capacity: int, batch: int) -> Tuple[List[tuple], List[tuple]]:
    """Shapes of each layer's key and value buffers, from one token through a static cache."""
    import mlx.core as mx

    cache = model.make_cache(capacity=capacity)  # raises for stacks a static cache cannot serve
    model(mx.zeros((batch, 1), mx.int32), cache=cache)
    return [tuple(c.keys.shape) for c in cache], [tuple(c.values.shape) for c in cache]


def export_decoder(model, path, *, capacity: int, prefill_lens: Union[int, Sequence[int]] = (64,), batch: int = 1,
                   precision: str = "float16", minimum_deployment_target: str = "iOS18", compress=None,
                   metadata: Optional[dict] = None, verbose: bool = False) -> Path:
    """Export ``model`` (a causal :class:`~mlx_zeta.structs.Transformer`, rotary or absolute
    positions, no ALiBi/relative positions/sliding window) to a stateful ``.mlpackage`` at
    ``path`` with functions ``prefill_{L}`` for each ``L`` and ``decode`` (the contract is in the
    module docstring); returns the path.

    Args:
        capacity: cache positions (prompt + generated tokens).
        prefill_lens: tokens per call of each prefill function: an int or a sequence of ints,
            each in [1, capacity] (deduplicated and sorted). Default: ``(64,)``.
        batch: rows per call (one position shared by all rows).
        precision: ``"float16"`` or ``"float32"`` activations (see :mod:`~mlx_zeta.converters.coreml.lower`); the cache
            state is fp16 either way (Core ML states are fp16).
        minimum_deployment_target: ``"iOS18"`` or ``"macOS15"`` (states need them).
        compress: the float weights' compression, as :func:`~.export.export_coreml` takes it (patterns
            name the model's module paths); ternary and MLX-quantized layers keep their exact forms.
        metadata: optional ``{"author", "license", "description", "version": str, "user": {str: str}}``
            written into the package (:mod:`.metadata`); ``user`` is merged over the exporter's own
            ``mlx_zeta.*`` keys (task, capacity, prefill_lengths, functions, vocab_size, batch,
            padding, precision, compression, version).
        verbose: let coremltools log, warn and draw its progress bars (:mod:`~mlx_zeta.converters.coreml.runtime`).

    Raises:
        ValueError: for a model or option the export does not support.

    Nothing is left at ``path`` on failure.
    """
    check_decoder(model, capacity, batch)
    lens = prefill_lengths(prefill_lens, capacity)
    policy(None if compress == "ternary-dense" else compress)  # a bad option fails before any trace
    metadata = check_metadata("export_decoder", metadata)
    if minimum_deployment_target not in STATE_TARGETS:
        raise ValueError(f"[export_decoder] expected minimum_deployment_target in {STATE_TARGETS} (Core ML states "
                         f"need them), got {minimum_deployment_target!r}")
    with quiet_coremltools(verbose) as ct:
        return _export_decoder(ct, model, path, capacity, lens, batch, precision, minimum_deployment_target,
                               compress, metadata)


def _own_metadata(vocab, capacity, lens, batch, precision, compress, depth) -> Tuple[Dict[str, str], dict]:
    """(the exporter's ``mlx_zeta.*`` user keys, feature descriptions) of a decoder package."""
    from mlx_zeta._version import __version__

    user = {"mlx_zeta.task": "causal-lm", "mlx_zeta.capacity": str(capacity),
            "mlx_zeta.prefill_lengths": json.dumps(list(lens)), "mlx_zeta.functions": json.dumps(function_names(lens)),
            "mlx_zeta.vocab_size": str(vocab), "mlx_zeta.batch": str(batch), "mlx_zeta.padding": "right",
            "mlx_zeta.precision": precision, "mlx_zeta.compression": describe(compress),
            "mlx_zeta.version": __version__}
    states = {f"{kv}_cache_{i}": f"fp16 (B, kv_heads, capacity, head_dim): layer {i} {what}"
              for kv, what in (("k", "keys"), ("v", "values")) for i in range(depth)}
    return user, {"inputs": {n: DESCRIPTIONS[n] for n in ("input_ids", "position")},
                  "outputs": {"logits": DESCRIPTIONS["logits"]}, "states": states}


def _export_decoder(ct, model, path, capacity, lens, batch, precision, minimum_deployment_target, compress,
                    metadata) -> Path:
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
    models, cache = {}, {}  # cache: each weight compressed once for every function
    for fname, length in zip(function_names(lens), lens + (1,)):
        example = [mx.zeros((batch, length), mx.int32), mx.zeros((1,), mx.int32)] + [mx.zeros(s) for s in shapes]
        prog = to_mil(step, example, input_names=names, output_names=["logits"], precision=precision,
                      minimum_deployment_target=minimum_deployment_target, states=states, compress=compress,
                      weights_root=model, weights_cache=cache)
        models[fname] = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                                   compute_precision=ct.precision.FLOAT32)  # fp16 already chosen op by op
    vocab = int(prog.functions["main"].outputs[0].shape[-1])  # logits (B, 1, vocab) of decode, the last
    user, features = _own_metadata(vocab, capacity, lens, batch, precision, compress, depth)

    def write(staged: Path) -> None:
        parts = staged.parent / "functions"
        parts.mkdir()
        desc = ct.utils.MultiFunctionDescriptor()
        for fname, m in models.items():
            m.save(str(parts / f"{fname}.mlpackage"))
            desc.add_function(str(parts / f"{fname}.mlpackage"), "main", fname)
        desc.default_function_name = DECODE
        ct.utils.save_multifunction(desc, str(staged))
        write_metadata(staged, **exporter_metadata(metadata, user, **features))

    return save_atomically(path, write)
