"""Core ML export of MLX models and functions: trace, lower (:mod:`~mlx_zeta.converters.coreml.lower`), convert, save
atomically.

:func:`to_mil` gives the lowered MIL program without saving (tests evaluate it in numpy);
:func:`export_coreml` converts it with ``coremltools.convert`` to an ML Program and writes the
``.mlpackage`` into a temporary folder beside ``path``, renamed into place only when complete.

Weights: ternary layers and MLX-affine quantized layers are traced through stand-ins and stored in their exact
compressed forms (ternary 2-bit tables, 4/8-bit shift-scale), float weights by the ``compress`` policy (int8, int4 per
block, palettized): :mod:`~mlx_zeta.converters.coreml.weights` decides which, :mod:`.compress` holds the math.
"""

import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mlx_zeta.common import atomic_path

from .compress import describe, policy
from .lower import capture, lower_graph
from .metadata import check_metadata, describe_features, exporter_metadata, write_metadata
from .runtime import import_coremltools, quiet_coremltools
from .weights import compressed_constants, export_standins

__all__ = ["export_coreml", "to_mil", "save_atomically", "example_arrays", "model_name", "TARGETS"]

TARGETS = ("iOS18", "macOS15", "iOS17", "macOS14")  # minimum_deployment_target values accepted
_BEFORE_18 = ("iOS17", "macOS14")  # no scaled_dot_product_attention, no iOS 18 constexpr_ ops (compressed weights)


def example_arrays(example_inputs) -> tuple:
    """An exporter's ``example_inputs`` (one array or a sequence of arrays / array-likes) as a tuple of
    ``mx.array`` (shared with the Core AI exporter)."""
    import mlx.core as mx
    if isinstance(example_inputs, mx.array):
        return (example_inputs,)
    return tuple(mx.array(np.asarray(a)) if not isinstance(a, mx.array) else a for a in example_inputs)


def model_name(model_or_fn) -> str:
    """What errors call an exported model: its class name, or a function's ``__name__``."""
    import mlx.nn as nn
    return type(model_or_fn).__name__ if isinstance(model_or_fn, nn.Module) else \
        getattr(model_or_fn, "__name__", "function")


def to_mil(model_or_fn, example_inputs, *, input_names: Optional[Sequence[str]] = None,
           output_names: Optional[Sequence[str]] = None, precision: str = "float16", compress=None,
           fuse_attention: bool = True, channels_first: Sequence[int] = (), minimum_deployment_target="iOS18",
           states=None, weights_root=None, weights_cache: Optional[dict] = None, return_stats: bool = False):
    """Trace ``model_or_fn(*example_inputs)`` and lower it: a coremltools MIL ``Program`` (not
    optimized by coremltools' passes; see :func:`export_coreml`, whose ``compress`` this takes; its
    patterns name module paths of ``weights_root``, by default ``model_or_fn``; ``weights_cache``, a dict
    kept across calls, compresses each weight once for several traces of one model).
    With ``return_stats`` also returns ``{"fused_attention": n, "nodes": n, "compressed": n,
    "affine": {...}, "modes": {...}}`` (:func:`~.weights.compressed_constants`)."""
    import mlx.core as mx
    import mlx.nn as nn

    if precision not in ("float16", "float32"):
        raise ValueError(f"[export_coreml] expected precision 'float16' or 'float32', got {precision!r}")
    if minimum_deployment_target not in TARGETS:
        raise ValueError(f"[export_coreml] expected minimum_deployment_target in {TARGETS} "
                         f"(iOS17/macOS14 without fused attention or compressed weights), "
                         f"got {minimum_deployment_target!r}")
    ternary_dense = compress == "ternary-dense"
    policy(None if ternary_dense else compress)  # a bad option fails before the trace
    ct = import_coremltools()
    args = example_arrays(example_inputs)
    name = model_name(model_or_fn)
    if isinstance(model_or_fn, nn.Module):
        mx.eval(model_or_fn.parameters())  # lazy initialisers would otherwise be traced
    with export_standins(model_or_fn) as (fn, standin_weights):
        graph = capture(fn, *args)
    standin_weights = [w for w in standin_weights if not (ternary_dense and w[2] == "ternary")]
    root = model_or_fn if weights_root is None else weights_root
    compressed, stats = compressed_constants(graph, root, standin_weights, None if ternary_dense else compress,
                                             np.float16 if precision == "float16" else np.float32, weights_cache)
    if minimum_deployment_target in _BEFORE_18:
        fuse_attention = False  # attention stays matmul / softmax / matmul
        if compressed:
            which = ", ".join(f"{n} {k}" for k, n in stats["counts"].items() if n)
            raise ValueError(f"[export_coreml] compressed weights ({which}) need iOS18/macOS15 (2-bit LUTs, "
                             f"shift-scale); got {minimum_deployment_target!r} (compress='ternary-dense' keeps "
                             f"ternary weights as plain fp16)")
    prog, lowered = lower_graph(graph, precision, compressed, input_names, output_names, name, fuse_attention,
                                getattr(ct.target, minimum_deployment_target), states, channels_first)
    stats.update(lowered, compressed=len(compressed))
    if compress not in (None, "ternary-dense") and not isinstance(root, nn.Module):
        warnings.warn(f"[export_coreml] compress={compress!r} compressed no weight: its patterns name module paths, "
                      f"and {name} is a function; pass weights_root=<the nn.Module it calls>", stacklevel=2)
    return (prog, stats) if return_stats else prog


def export_coreml(model_or_fn, example_inputs, path, *, input_names: Optional[Sequence[str]] = None,
                  output_names: Optional[Sequence[str]] = None, precision: str = "float16",
                  minimum_deployment_target: str = "iOS18", image_input: Optional[dict] = None,
                  compress=None, weights_root=None, metadata: Optional[dict] = None, verbose: bool = False) -> Path:
    """Export to a Core ML ML Program ``path`` (``.mlpackage``) and return the path.

    Args:
        model_or_fn: an ``nn.Module`` or a function of arrays returning arrays.
        example_inputs: array or tuple of arrays; shapes are fixed to these.
        input_names, output_names: Core ML feature names (default ``input_i`` / ``output_i``).
        precision: ``"float16"`` (fp16 weights and activations, fp32 statistics; see
            :mod:`~mlx_zeta.converters.coreml.graph`) or ``"float32"``.
        minimum_deployment_target: ``"iOS18"`` / ``"macOS15"`` (default), or ``"iOS17"`` /
            ``"macOS14"`` where the ops allow: attention is then not fused and ternary LUTs are
            refused (stateful decoders need iOS 18).
        image_input: for vision models, ``{"index": 0, "scale": float, "bias": [r, g, b],
            "color_layout": "RGB" | "BGR" | "G"}`` (all keys but ``index`` required): the NHWC
            input becomes a Core ML image (NCHW inside); Core ML computes ``scale * pixel + bias``.
        compress: the float weights' compression (:func:`~.compress.policy`): ``None`` (float, in
            ``precision``), a mode of :data:`~.compress.MODES` (``"int8"``, ``"int4"`` = ``"int4-block32"``,
            ``"int4-block64"``, ``"palettize2"`` ... ``"palettize8"``: every float Linear/Embedding weight), or
            ``{module-path pattern or "@embedding"/"@head": mode}``. Ternary layers are 2-bit tables
            and MLX-quantized layers 4/8-bit shift-scale weights whatever it says;
            ``"ternary-dense"`` keeps ternary weights as plain consts (for comparison).
        weights_root: the ``nn.Module`` whose module paths ``compress`` names, when ``model_or_fn``
            is a function calling it (default: ``model_or_fn``).
        metadata: optional ``{"author", "license", "description", "version": str, "user": {str: str}}``
            written into the package (:mod:`.metadata`); ``user`` is merged over the exporter's own
            ``mlx_zeta.*`` keys (``task``: ``"function"`` unless given, ``precision``,
            ``compression``, ``version``). Inputs and outputs are described by dtype and shape.
        verbose: let coremltools log, warn and draw its progress bars (:mod:`~mlx_zeta.converters.coreml.runtime`);
            by default it is silent.

    Raises:
        ValueError: for an unknown primitive (named with the model) or bad options.

    Nothing is left at ``path`` on failure.
    """
    if image_input is not None:
        missing = {"scale", "bias", "color_layout"} - set(image_input)
        if missing:
            raise ValueError(f"[export_coreml] image_input needs explicit {sorted(missing)}")
    from mlx_zeta._version import __version__

    metadata = check_metadata("export_coreml", metadata)
    user = {"mlx_zeta.task": "function", "mlx_zeta.precision": precision,
            "mlx_zeta.compression": describe(compress), "mlx_zeta.version": __version__}
    with quiet_coremltools(verbose) as ct:
        prog = to_mil(model_or_fn, example_inputs, input_names=input_names, output_names=output_names,
                      precision=precision, compress=compress, weights_root=weights_root,
                      channels_first=(image_input.get("index", 0),) if image_input is not None else (),
                      minimum_deployment_target=minimum_deployment_target)
        inputs = None if image_input is None else _image_inputs(ct, prog, image_input)
        model = ct.convert(prog, convert_to="mlprogram", inputs=inputs,
                           minimum_deployment_target=getattr(ct.target, minimum_deployment_target),
                           compute_precision=ct.precision.FLOAT32)  # fp16 already chosen op by op

        def write(staged: Path) -> None:
            model.save(str(staged))
            write_metadata(staged, **exporter_metadata(metadata, user, **describe_features(staged)))

        return save_atomically(path, write)


def _image_inputs(ct, prog, image_input: dict) -> list:
    """Core ML input types for ``prog``'s main function: the ``image_input["index"]`` one an image."""
    func = prog.functions["main"]
    index = image_input.get("index", 0)
    inputs = []
    for i, n in enumerate(func.inputs):
        shape = func.inputs[n].shape
        if i == index:
            inputs.append(ct.ImageType(name=n, shape=shape, scale=image_input["scale"], bias=image_input["bias"],
                                       color_layout=getattr(ct.colorlayout, image_input["color_layout"]),
                                       channel_first=True))
        else:
            inputs.append(ct.TensorType(name=n, shape=shape))
    return inputs


def save_atomically(path, write) -> Path:
    """``write(staged)`` a package at a path in a staging folder beside ``path``; move it to
    ``path`` (replacing what was there) only when ``write`` returned. Returns ``Path(path)``."""
    with atomic_path(path) as staged:
        write(staged)
    return Path(path)
