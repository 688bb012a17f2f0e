r"""Which weights a Core ML lowering stores compressed, and as what (:class:`~.compress.Compressed`).

Two sources, both ending as ``{graph constant name: Compressed}`` for :func:`~.lower.lower_graph`:

* **Stand-ins** (:func:`export_standins`): layers whose MLX forward does not trace into ops Core ML
  has are swapped, while tracing, for a module computing the same function from one dense float
  matrix, and that matrix is registered with its exact compressed form:

  - :class:`~mlx_zeta.quant.TernaryLinear`: ``W = s T`` through the layer's own
    :meth:`~mlx_zeta.quant.TernaryLinear.dense_forward`; a 2-bit table ``{-s, 0, s}``;
  - MLX-affine ``QuantizedLinear`` (and :class:`~mlx_zeta.quant.affine.AffineLinear`) and
    ``QuantizedEmbedding`` (lookups and ``as_linear``, one matrix for both): MLX's own dequantized
    weight ``mx.dequantize(w, scales, biases)``, in the layer's dtype; stored as
    :func:`~.compress.from_mlx_affine` gives it.

* **The compress policy** (:func:`~.compress.policy`): the ``weight`` of every float ``nn.Linear`` and
  ``nn.Embedding``, by module path and role (``embedding`` for embeddings, ``head`` for the Linears named
  in :data:`~mlx_zeta.quant.model.HEAD_NAMES`), compressed by :func:`~.compress.compress_weight`.

Constants are matched to weights by content (shape and a digest of the float32 values): a traced
constant is the very array the model holds.
"""

import hashlib
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import numpy as np

from .compress import Compressed, affine_error, compress_weight, from_mlx_affine, from_ternary, policy

__all__ = ["export_standins", "compressed_constants", "AFFINE_ULPS"]

AFFINE_ULPS = 2.0  # a decoded MLX-affine weight further than this many ulps (of its row's largest weight) warns


def _key(a) -> Tuple:
    a = np.ascontiguousarray(np.asarray(a, np.float32))
    return a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def _ternary_standin(layer):
    """(stand-in, dense float32 W, Compressed) for one TernaryLinear (``W = s T``)."""
    import mlx.core as mx
    import mlx.nn as nn

    t, s, bias = layer.dense_weight()
    dense = np.array(t) * np.float32(s)
    weight = mx.array(dense)

    class TernaryStandIn(nn.Module):
        """Traces as ``x_q @ W.T / s_x + b`` (int8 activations) or ``x @ W.T + b`` (float)."""

        def __call__(self, x):
            return layer.dense_forward(x, weight, bias)

    return TernaryStandIn(), (dense, from_ternary((np.array(t) + 1).astype(np.uint8), float(np.float32(s))), "ternary")


def _affine_standin(layer, with_bias: bool = False):
    """(stand-in, MLX's dequantized weight as float32, Compressed) for a QuantizedLinear/QuantizedEmbedding."""
    import mlx.core as mx
    import mlx.nn as nn

    if getattr(layer, "mode", "affine") != "affine":
        raise ValueError(f"[export_coreml] a {type(layer).__name__} in mode {layer.mode!r} has no Core ML form; "
                         f"expected MLX's affine quantization")
    scales, biases = layer["scales"], layer["biases"]
    weight = mx.dequantize(layer["weight"], scales, biases, layer.group_size, layer.bits)  # in the scales' dtype
    dense = np.array(weight.astype(mx.float32))
    packed = from_mlx_affine(np.array(layer["weight"]), np.array(scales.astype(mx.float32)),
                             np.array(biases.astype(mx.float32)), layer.group_size, layer.bits,
                             with_bias=with_bias)
    bias = layer.get("bias")

    class AffineStandIn(nn.Module):
        """Traces as ``x @ W.T + b`` (a Linear), ``W[ids]`` and ``as_linear`` (an Embedding) over MLX's
        dequantized ``W``."""

        def __call__(self, x):
            if isinstance(layer, nn.QuantizedEmbedding):
                return weight[x]
            return x @ weight.T + bias if bias is not None else x @ weight.T

        def as_linear(self, x):
            return x @ weight.T

    return AffineStandIn(), (dense, packed, "affine")


@contextmanager
def export_standins(model, affine_bias: bool = False):
    """Swap every TernaryLinear, QuantizedLinear and QuantizedEmbedding of ``model`` (or ``model`` itself)
    for its stand-in (module docstring); yields ``(model or its stand-in, [(dense float32, Compressed, kind)])``
    (kind ``"ternary"`` or ``"affine"``)
    and restores the layers on exit. ``affine_bias``: MLX-affine 4/8-bit weights keep MLX's bias
    (Core AI's exact form, :func:`~.compress.from_mlx_affine`)."""
    import mlx.nn as nn
    from mlx_zeta.quant import TernaryLinear

    def standin(layer):
        if isinstance(layer, TernaryLinear):
            return _ternary_standin(layer)
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return _affine_standin(layer, affine_bias)
        return None

    own = standin(model) if isinstance(model, nn.Module) else None
    if own is not None:
        yield own[0], [own[1]]
        return
    swapped, weights = [], []

    def walk(container, keys):
        for k in keys:
            child = container[k]
            made = standin(child) if isinstance(child, nn.Module) else None
            if made is not None:
                swapped.append((container, k, child))
                weights.append(made[1])
                container[k] = made[0]
            elif isinstance(child, nn.Module):
                walk(child, list(child.keys()))
            elif isinstance(child, list):
                walk(child, range(len(child)))

    if isinstance(model, nn.Module):
        walk(model, list(model.keys()))
    try:
        yield model, weights
    finally:
        for container, k, child in reversed(swapped):
            container[k] = child


def _float_weights(model) -> Dict[Tuple, Tuple[str, str]]:
    """``{content key: (module path, role or None)}`` for the weight of every float nn.Linear / nn.Embedding."""
    import mlx.nn as nn
    from mlx_zeta.quant.model import HEAD_NAMES

    out = {}
    if not isinstance(model, nn.Module):
        return out
    for path, module in model.named_modules():
        if type(module) is nn.Embedding:
            role = "embedding"
        elif type(module) is nn.Linear:
            role = "head" if path.rsplit(".", 1)[-1] in HEAD_NAMES else None
        else:
            continue
        out.setdefault(_key(module.weight), (path, role))
    return out


def compressed_constants(graph, model, standin_weights: List, compress, dtype,
                         cache: Optional[dict] = None) -> Tuple[Dict[str, Compressed], dict]:
    """``({constant name: Compressed}, stats)`` for a captured ``graph`` of ``model``: stand-in weights
    (``standin_weights`` from :func:`export_standins`) and, by the ``compress`` policy, float weights.
    ``dtype`` (np.float16/np.float32) is the package's; MLX-affine weights decoded in it are checked
    against MLX's dequantized weights (``stats["affine"]``) and a warning names any beyond
    :data:`AFFINE_ULPS` ulps. ``stats["modes"]``: ``{module path: mode}`` of the policy's weights;
    ``stats["counts"]``: compressed weights by source (``ternary``, ``affine``, ``policy``). ``cache``
    (``{(content key, mode): Compressed}``), when given, is read and filled."""
    registered = {_key(dense): entry for entry in standin_weights for dense in entry[:1]}
    mode_of = policy(compress)
    floats = _float_weights(model) if compress is not None else {}
    out, modes, worst = {}, {}, {"max_abs": 0.0, "max_ulps": 0.0, "exact": 1.0, "weights": 0}
    counts = {"ternary": 0, "affine": 0, "policy": 0}
    for name, value in graph.constants.items():
        if value.ndim != 2 or value.dtype.kind != "f":
            continue
        key = _key(value)
        if key in registered:
            dense, c, kind = registered[key]
            out[name] = c
            counts[kind] += 1
            if kind == "affine":
                err = affine_error(c, dense, dtype)
                worst = {"max_abs": max(worst["max_abs"], err["max_abs"]),
                         "max_ulps": max(worst["max_ulps"], err["max_ulps"]),
                         "exact": min(worst["exact"], err["exact"]), "weights": worst["weights"] + 1}
        elif key in floats:
            path, role = floats[key]
            mode = mode_of(path, role)
            c = cache[key, mode] if cache is not None and (key, mode) in cache else compress_weight(value, mode)
            if cache is not None:
                cache[key, mode] = c
            if c is not None:
                out[name], modes[path] = c, mode_of(path, role)
                counts["policy"] += 1
    if worst["max_ulps"] > AFFINE_ULPS:
        warnings.warn(f"[export_coreml] MLX-affine weights decode {worst['max_ulps']:.1f} ulps "
                      f"(max abs {worst['max_abs']:.3g}) from MLX's dequantized weights in "
                      f"{np.dtype(dtype).name}: Core ML stores scale * (q - offset), MLX scale * q + bias",
                      stacklevel=3)
    return out, {"affine": worst, "modes": modes, "counts": counts}
