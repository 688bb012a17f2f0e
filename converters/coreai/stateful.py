r"""Stateful Core AI export of a decoder language model: one ``.aimodel``, several functions, one copy of the weights.

:func:`export_decoder_coreai` traces the same steps the Core ML exporter does
(:class:`~mlx_zeta.converters.coreml.stateful.DecoderStep`: a causal
:class:`~mlx_zeta.structs.Transformer` over a :class:`~mlx_zeta.nn.StaticKVCache`) and lowers each
into one ``coreai.graph`` of the bundle. The contract is the Core ML package's
(:mod:`mlx_zeta.converters.coreml.stateful` is its home: right padding, the choice of function,
``position + T <= capacity``), with these differences:

* functions ``prefill_{L}`` for each ``L`` and ``decode``; inputs ``input_ids`` (B, T) int32 and
  ``position`` (1,) int32, output ``logits`` (B, T, vocab) float32;
* states ``k_cache_{i}`` / ``v_cache_{i}`` are **float32** (B, kv_heads, capacity, head_dim) buffers,
  declared as mutable buffers (:mod:`.runtime`); the runtime updates the caller's state arrays in
  place, and one set of arrays serves every function;
* the functions hold the same weight constants, which the bundle stores once (MLIR uniques equal
  constants: a bundle with three functions is a few KB larger than one with a single function).
"""

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from ..coreml.compress import describe
from ..coreml.metadata import check_metadata, exporter_metadata
from ..coreml.stateful import DESCRIPTIONS, DecoderStep, cache_shapes, check_decoder, function_names, prefill_lengths
from .export import check_options, save_bundle, trace
from .lower import lower_function
from .runtime import import_coreai

__all__ = ["export_decoder_coreai", "state_names"]

OWNER = "export_decoder_coreai"


def state_names(depth: int) -> list:
    """The bundle's states, in input order: ``k_cache_0 .. k_cache_{depth-1}``, then the ``v_cache_*``."""
    return [f"k_cache_{i}" for i in range(depth)] + [f"v_cache_{i}" for i in range(depth)]


def export_decoder_coreai(model, path, *, capacity: int, prefill_lens: Union[int, Sequence[int]] = (64,),
                          batch: int = 1, weights: str = "float16", compress=None,
                          metadata: Optional[dict] = None) -> Path:
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

    Raises:
        ValueError: a model or option the export does not support. Nothing is left at ``path``
        on failure.
    """
    import mlx.core as mx

    check_decoder(model, capacity, batch, OWNER)
    lens = prefill_lengths(prefill_lens, capacity, OWNER)
    check_options(OWNER, weights, compress)
    metadata = check_metadata(OWNER, metadata)
    import_coreai(OWNER)
    mx.eval(model.parameters())
    kshapes, vshapes = cache_shapes(model, capacity, batch)
    shapes, states = kshapes + vshapes, state_names(len(kshapes))
    names = ["input_ids", "position"] + states
    step, cache, graphs = DecoderStep(model, capacity), {}, []
    for fname, length in zip(function_names(lens), lens + (1,)):
        example = [mx.zeros((batch, length), mx.int32), mx.zeros((1,), mx.int32)] + [mx.zeros(s) for s in shapes]
        graph, compressed, _ = trace(step, example, compress=compress, weights=weights, weights_root=model, cache=cache)
        graphs.append((fname, graph, compressed))
    vocab = int(graphs[-1][1].outputs[0][1][-1])

    def build() -> None:
        for fname, graph, compressed in graphs:
            lower_function(graph, fname, input_names=names, output_names=["logits"], states={s: s for s in states},
                           weights=weights, compressed=compressed, model_name=type(model).__name__)

    user, features = _own_metadata(vocab, capacity, lens, batch, weights, compress, kshapes, vshapes)
    return save_bundle(path, build, exporter_metadata(metadata, user, **features))


def _own_metadata(vocab, capacity, lens, batch, weights, compress, kshapes, vshapes):
    """(the exporter's ``mlx_zeta.*`` keys, feature descriptions) of a decoder bundle."""
    from mlx_zeta._version import __version__

    user = {"mlx_zeta.task": "causal-lm", "mlx_zeta.capacity": str(capacity),
            "mlx_zeta.prefill_lengths": json.dumps(list(lens)), "mlx_zeta.functions": json.dumps(function_names(lens)),
            "mlx_zeta.vocab_size": str(vocab), "mlx_zeta.batch": str(batch), "mlx_zeta.padding": "right",
            "mlx_zeta.precision": "float32", "mlx_zeta.weights": weights, "mlx_zeta.compression": describe(compress),
            "mlx_zeta.state_shapes": json.dumps([list(s) for s in kshapes + vshapes]),
            "mlx_zeta.version": __version__}
    depth = len(kshapes)
    states = {name: f"float32 (B, kv_heads, capacity, head_dim): layer {i % depth} {'keys' if i < depth else 'values'}"
              for i, name in enumerate(state_names(depth))}
    return user, {"inputs": {n: DESCRIPTIONS[n] for n in ("input_ids", "position")},
                  "outputs": {"logits": DESCRIPTIONS["logits"]}, "states": states}
