r"""Stateful Core AI export of a decoder language model: one ``.aimodel``, several functions, one copy of the weights.

:func:`export_decoder_coreai` traces the same steps the Core ML exporter does
(:class:`~mlx_zeta.converters.coreml.stateful.DecoderStep`: a causal
:class:`~mlx_zeta.structs.Transformer` over a :class:`~mlx_zeta.nn.StaticKVCache`) and lowers each
into one ``coreai.graph`` of the bundle. The contract is the Core ML package's
(:mod:`mlx_zeta.converters.coreml.stateful` is its home: right padding, the choice of function,
``position + T <= capacity``), with these differences:

* functions ``prefill_{L}`` for each ``L`` and ``decode``; inputs ``input_ids`` (B, T) int32 and
  ``position`` (1,) int32, output ``logits`` (B, T, vocab) float32;
* with ``dynamic_prefill=(min_len, max_len)``, also ``prefill`` (between the ``prefill_{L}`` and
  ``decode``): the same inputs, outputs and states with ``T`` any length in ``[min_len, max_len]``,
  known at run time (no padding: a prompt of ``t <= max_len`` tokens is one call, a longer one
  chunks of ``max_len``). The step is traced at three lengths and merged into one graph whose
  shapes are affine in ``T`` (:mod:`.dynamic`); the range is recorded in the metadata
  (``mlx_zeta.dynamic_prefill``), nothing checks it at run time (as ``position + T <= capacity``);
* states ``k_cache_{i}`` / ``v_cache_{i}`` are **float32** (B, kv_heads, capacity, head_dim) buffers, declared as
  mutable buffers (:mod:`~mlx_zeta.converters.coreai.runtime`); the runtime updates the caller's state arrays in
  place, and one set of arrays serves every function;
* the functions hold the same weight constants, which the bundle stores once (MLIR uniques equal
  constants: a bundle with three functions is a few KB larger than one with a single function).
"""

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from ..coreml.compress import describe
from ..coreml.metadata import check_metadata, exporter_metadata
from mlx_zeta.common import is_int

from ..coreml.stateful import (DECODE, DESCRIPTIONS, DecoderStep, cache_shapes, check_decoder, function_names,
                               prefill_lengths)
from .dynamic import symbolic_graph, trace_lengths
from .export import check_options, save_bundle, trace
from .lower import lower_function
from .runtime import import_coreai

__all__ = ["export_decoder_coreai", "state_names"]

OWNER = "export_decoder_coreai"
DYNAMIC = "prefill"  # the function over a dynamic range of token counts


def state_names(depth: int) -> list:
    """The bundle's states, in input order: ``k_cache_0 .. k_cache_{depth-1}``, then the ``v_cache_*``."""
    return [f"k_cache_{i}" for i in range(depth)] + [f"v_cache_{i}" for i in range(depth)]


def export_decoder_coreai(model, path, *, capacity: int, prefill_lens: Union[int, Sequence[int]] = (64,),
                          batch: int = 1, weights: str = "float16", compress=None,
                          metadata: Optional[dict] = None, dynamic_prefill: Optional[Sequence[int]] = None) -> Path:
    """Export ``model`` (a causal :class:`~mlx_zeta.structs.Transformer`, rotary or absolute
    positions) to a stateful ``.aimodel`` at ``path`` with functions ``prefill_{L}`` for each ``L`` and
    ``decode`` (module docstring); returns the path.

    Args:
        capacity: cache positions (prompt + generated tokens).
        prefill_lens: tokens per call of each prefill function: an int or a sequence of ints in
            [1, capacity] (deduplicated, sorted). Default ``(64,)``.
        batch: rows per call (one position shared by all rows).
        weights: storage of float weight matrices, ``"float16"`` (default) or ``"float32"``.
        compress: the float weights' compression policy (as :func:`~.export.export_coreai`).
        metadata: ``{"author", "license", "description", "version": str, "user": {str: str}}``.
        dynamic_prefill: ``(min_len, max_len)`` with ``1 <= min_len <= max_len <= capacity``: also
            write the function ``prefill`` taking ``T`` tokens for any ``T`` in that range
            (:mod:`.dynamic`). Default: none.

    Raises:
        ValueError: for a model or option the export does not support.

    Nothing is left at ``path`` on failure.
    """
    import mlx.core as mx

    check_decoder(model, capacity, batch, OWNER)
    lens = prefill_lengths(prefill_lens, capacity, OWNER)
    span = dynamic_range(dynamic_prefill, capacity)
    check_options(OWNER, weights, compress)
    metadata = check_metadata(OWNER, metadata)
    import_coreai(OWNER)
    mx.eval(model.parameters())
    kshapes, vshapes = cache_shapes(model, capacity, batch)
    shapes, states = kshapes + vshapes, state_names(len(kshapes))
    names = ["input_ids", "position"] + states
    step, cache, graphs = DecoderStep(model, capacity), {}, {}

    def traced(length: int):
        example = [mx.zeros((batch, length), mx.int32), mx.zeros((1,), mx.int32)] + [mx.zeros(s) for s in shapes]
        return trace(step, example, compress=compress, weights=weights, weights_root=model, cache=cache)[:2]

    for fname, length in zip(function_names(lens), lens + (1,)):
        graphs[fname] = traced(length) + (False,)
    if span:
        lengths = trace_lengths(*span, capacity)
        steps = [traced(t) for t in lengths]
        graphs[DYNAMIC] = (symbolic_graph([g for g, _ in steps], lengths, type(model).__name__), steps[0][1], True)
    vocab = int(graphs[DECODE][0].outputs[0][1][-1])

    def build() -> None:
        for fname in bundle_functions(lens, span):
            graph, compressed, symbolic = graphs[fname]
            lower_function(graph, fname, input_names=names, output_names=["logits"], states={s: s for s in states},
                           weights=weights, compressed=compressed, model_name=type(model).__name__, symbolic=symbolic)

    user, features = _own_metadata(vocab, capacity, lens, span, batch, weights, compress, kshapes, vshapes)
    return save_bundle(path, build, exporter_metadata(metadata, user, **features))


def dynamic_range(span, capacity: int) -> Optional[tuple]:
    """``(min_len, max_len)`` of ``dynamic_prefill`` checked (``1 <= min_len <= max_len <= capacity``), or None."""
    if span is None:
        return None
    ok = isinstance(span, (tuple, list)) and len(span) == 2 and all(is_int(n) for n in span)
    if not ok or not 1 <= span[0] <= span[1] <= capacity:
        raise ValueError(f"[{OWNER}] expected dynamic_prefill=(min_len, max_len) with 1 <= min_len <= max_len <= "
                         f"capacity={capacity}, got {span!r}")
    return int(span[0]), int(span[1])


def bundle_functions(lens, span) -> list:
    """The bundle's functions, in its order: ``prefill_{L}``..., ``prefill`` (with a dynamic range), ``decode``."""
    names = function_names(lens)
    return names[:-1] + [DYNAMIC] + names[-1:] if span else names


def _own_metadata(vocab, capacity, lens, span, batch, weights, compress, kshapes, vshapes):
    """(the exporter's ``mlx_zeta.*`` keys, feature descriptions) of a decoder bundle."""
    from mlx_zeta._version import __version__

    user = {"mlx_zeta.task": "causal-lm", "mlx_zeta.capacity": str(capacity),
            "mlx_zeta.prefill_lengths": json.dumps(list(lens)),
            "mlx_zeta.functions": json.dumps(bundle_functions(lens, span)),
            "mlx_zeta.vocab_size": str(vocab), "mlx_zeta.batch": str(batch), "mlx_zeta.padding": "right",
            "mlx_zeta.precision": "float32", "mlx_zeta.weights": weights, "mlx_zeta.compression": describe(compress),
            "mlx_zeta.state_shapes": json.dumps([list(s) for s in kshapes + vshapes]),
            "mlx_zeta.version": __version__}
    if span:
        user["mlx_zeta.dynamic_prefill"] = json.dumps(list(span))
    depth = len(kshapes)
    states = {name: f"float32 (B, kv_heads, capacity, head_dim): layer {i % depth} {'keys' if i < depth else 'values'}"
              for i, name in enumerate(state_names(depth))}
    return user, {"inputs": {n: DESCRIPTIONS[n] for n in ("input_ids", "position")},
                  "outputs": {"logits": DESCRIPTIONS["logits"]}, "states": states}
