"""Core AI export of MLX models and functions: trace, lower (:mod:`~mlx_zeta.converters.coreai.lower`), save an
``.aimodel`` atomically.

:func:`export_coreai` writes a single-function bundle (encoders, vision models, any function of
arrays); :func:`~.stateful.export_decoder_coreai` writes a decoder LM's stateful bundle. Both trace
with the Core ML backend's capture and stand-ins and take the same ``compress`` policy
(:mod:`mlx_zeta.converters.coreml.compress`); :func:`trace` is the shared step. The bundle is built
in a staging folder beside ``path`` and moved into place only once its program and metadata are
written (:func:`save_bundle`).

Metadata (:func:`write_bundle_metadata` / :func:`read_bundle_metadata`): ``author``, ``license``,
``description`` go to the bundle's own fields; ``version``, the ``user`` ``{str: str}`` entries
(the exporter's ``mlx_zeta.*`` keys, the same as a Core ML package's) and the feature descriptions go
to its custom metadata.
"""

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mlx_zeta.common import atomic_path

from ..coreml.compress import describe, policy
from ..coreml.export import example_arrays, model_name
from ..coreml.lower import capture
from ..coreml.metadata import FEATURES, check_metadata, exporter_metadata
from ..coreml.weights import compressed_constants, export_standins
from .lower import lower_function
from .runtime import import_coreai

__all__ = ["export_coreai", "trace", "save_bundle", "write_bundle_metadata", "read_bundle_metadata", "WEIGHTS"]

WEIGHTS = ("float16", "float32")  # storage of float matrices (compute is float32, see .lower)
_CUSTOM_FEATURES = "mlx_zeta.features"  # custom key holding {"inputs"|"outputs"|"states": {name: text}}


def check_options(owner: str, weights: str, compress) -> None:
    """Options every Core AI exporter takes, checked before anything is traced."""
    if weights not in WEIGHTS:
        raise ValueError(f"[{owner}] expected weights in {WEIGHTS}, got {weights!r}")
    policy(compress)


def trace(model_or_fn, args, *, compress=None, weights: str = "float16", weights_root=None,
          cache: Optional[dict] = None):
    """``(graph, {constant: Compressed}, stats)`` of ``model_or_fn(*args)``: captured through the layer
    stand-ins (ternary, MLX-affine in their exact forms) with the ``compress`` policy applied."""
    import mlx.core as mx
    import mlx.nn as nn

    if isinstance(model_or_fn, nn.Module):
        mx.eval(model_or_fn.parameters())  # lazy initialisers would otherwise be traced
    with export_standins(model_or_fn, affine_bias=True) as (fn, standin_weights):
        graph = capture(fn, *args)
    root = model_or_fn if weights_root is None else weights_root
    compressed, stats = compressed_constants(graph, root, standin_weights, compress,
                                             np.float16 if weights == "float16" else np.float32, cache)
    return graph, compressed, stats


def save_bundle(path, build: Callable[[], None], metadata: dict) -> Path:
    """Build a bundle at ``path``: ``build()`` emits its graphs into the active ``coreai.authoring.Module``;
    the program is saved in a staging folder beside ``path`` with ``metadata`` (:func:`write_bundle_metadata`
    keywords) and moved into place when complete. Returns ``Path(path)``."""
    coreai = import_coreai()
    path = Path(path)
    if path.suffix != ".aimodel":
        raise ValueError(f"[export_coreai] expected a path ending in .aimodel, got {str(path)!r}")
    module = coreai.authoring.Module.create()
    with module:
        build()
    with atomic_path(path) as staged:
        asset = coreai.authoring.AIProgram(module).save_asset(staged)
        write_bundle_metadata(asset, **metadata)
    return path


def write_bundle_metadata(asset, *, author=None, license=None, description=None, version=None, user=None,
                          inputs=None, outputs=None, states=None) -> None:
    """Write the exporter's metadata into a saved bundle (``coreai.authoring.AIModelAsset``)."""
    def update(m):
        m.author, m.license, m.model_description = author or "", license or "", description or ""
        for key, value in (user or {}).items():
            m.set_custom(key, value)
        if version:
            m.set_custom("version", version)
        m.set_custom(_CUSTOM_FEATURES, {"inputs": dict(inputs or {}), "outputs": dict(outputs or {}),
                                        "states": dict(states or {})})

    asset.update_metadata(updates=update)


def read_bundle_metadata(path) -> dict:
    """``{"author", "license", "description", "version", "user": {str: str}, "inputs", "outputs", "states"}``
    of a saved bundle (the keys ``write_bundle_metadata`` writes)."""
    coreai = import_coreai("read_bundle_metadata")
    m = coreai.authoring.AIModelAsset.load(Path(path)).metadata
    custom = dict(m.creator_defined_metadata)
    features = custom.pop(_CUSTOM_FEATURES, {}) or {}
    out = {"author": m.author, "license": m.license, "description": m.model_description,
           "version": custom.pop("version", ""), "user": {k: str(v) for k, v in custom.items()}}
    out.update({key: dict(features.get(key, {})) for key in FEATURES})
    return out


def export_coreai(model_or_fn, example_inputs, path, *, input_names: Optional[Sequence[str]] = None,
                  output_names: Optional[Sequence[str]] = None, weights: str = "float16", compress=None,
                  weights_root=None, metadata: Optional[dict] = None, function_name: str = "main") -> Path:
    """Export to a Core AI bundle ``path`` (``.aimodel``) with one function; return the path.

    Args:
        model_or_fn: an ``nn.Module`` or a function of arrays returning arrays.
        example_inputs: array or tuple of arrays; shapes are fixed to these.
        input_names, output_names: the function's feature names (default ``input_i`` / ``output_i``).
        weights: storage of float weight matrices, ``"float16"`` (default) or ``"float32"``; compute
            is float32 (:mod:`~mlx_zeta.converters.coreai.lower`).
        compress: the float weights' compression, as :func:`~mlx_zeta.converters.coreml.export_coreml`
            takes it (a mode of ``COMPRESS_MODES`` or ``{pattern or "@embedding"/"@head": mode}``);
            ternary layers are 2-bit tables and MLX-quantized layers MLX's own codes, scales and biases.
        weights_root: the ``nn.Module`` whose module paths ``compress`` names, when ``model_or_fn``
            is a function calling it.
        metadata: ``{"author", "license", "description", "version": str, "user": {str: str}}``.
        function_name: the bundle's function (default ``"main"``).

    Raises:
        ValueError: for an unknown primitive (named with the model) or bad options.
        ImportError: (one line) without ``coreai-core``.

    Nothing is left at ``path`` on failure.
    """
    from mlx_zeta._version import __version__

    check_options("export_coreai", weights, compress)
    metadata = check_metadata("export_coreai", metadata)
    import_coreai()
    args = example_arrays(example_inputs)
    graph, compressed, _ = trace(model_or_fn, args, compress=compress, weights=weights, weights_root=weights_root)
    names_in = list(input_names or [f"input_{i}" for i in range(len(graph.inputs))])
    names_out = list(output_names or [f"output_{k}" for k in range(len(graph.outputs))])
    user = {"mlx_zeta.task": "function", "mlx_zeta.precision": "float32", "mlx_zeta.weights": weights,
            "mlx_zeta.compression": describe(compress), "mlx_zeta.version": __version__}
    inputs = {n: f"{d} {tuple(s)}" for n, (_, s, d) in zip(names_in, graph.inputs)}
    outputs = {n: f"{d} {tuple(s)}" for n, (_, s, d) in zip(names_out, graph.outputs)}
    build = lambda: lower_function(graph, function_name, input_names=names_in, output_names=names_out,  # noqa: E731
                                   weights=weights, compressed=compressed, model_name=model_name(model_or_fn))
    return save_bundle(path, build, exporter_metadata(metadata, user, inputs=inputs, outputs=outputs))

