"""Layers a model gained after its converter built it, recorded in ``config.json`` so that
:func:`~mlx_zeta.converters.pretrained.from_pretrained` builds the same model again.

Two kinds of swap are recorded by :func:`record` (called by ``save_pretrained``) and redone by
:func:`rebuild` (called by ``from_pretrained`` between ``build`` and loading the weights):

- MLX affine quantization (:func:`quantize`, or ``freeze_model(head_bits=...)``; the Linear
  layers become :class:`~mlx_zeta.quant.affine.AffineLinear`, MLX's layer with a CPU prefill path):
  ``"mlx_zeta_quantization": {"bits": 4, "group_size": 64, "layers": [paths]}``. A record
  without ``layers`` (written before they were listed) quantizes, as then, every Linear and
  Embedding whose input width ``group_size`` divides;
- ternary layers where the converter builds an ``nn.Linear`` (``quantize_model`` makes
  :class:`~mlx_zeta.quant.BitLinear`, ``freeze_model`` packs them into
  :class:`~mlx_zeta.quant.TernaryLinear`): ``"mlx_zeta_ternary": [{"class": "TernaryLinear",
  "options": {constructor keywords}, "layers": [paths]}, ...]``, one entry per class and options.

For a Hugging Face export (``save_pretrained(format="hf")``), :func:`dense_parameters` undoes both
kinds: the model's parameters with every swapped layer written as the float layer ``build`` makes.

Ternary layers that the converter builds itself (BitNet checkpoints) are not recorded: they are
what ``build`` makes. A layer of any other class where ``build`` makes something else cannot be
rebuilt, and ``save_pretrained`` refuses it by name rather than write a folder that does not load.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_zeta.quant import BitLinear, TernaryLinear, weight_quant
from mlx_zeta.quant.affine import affine_quantize

from .fields import ConfigError, check_value, problem

__all__ = ["QUANTIZATION_KEY", "TERNARY_KEY", "quantize", "quantized_layers", "record", "rebuild", "dense_parameters"]

QUANTIZATION_KEY = "mlx_zeta_quantization"
TERNARY_KEY = "mlx_zeta_ternary"
AFFINE_BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
_TERNARY = {"BitLinear": BitLinear, "TernaryLinear": TernaryLinear}
_AFFINE = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def quantized_layers(model: nn.Module) -> list:
    """``[(path, layer)]`` of the model's MLX affine-quantized Linear and Embedding layers."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, _AFFINE)]


def quantize(model: nn.Module, bits: int, group_size: int = 64) -> int:
    """MLX affine quantization (``nn.quantize``), in place, of every Linear and Embedding whose
    input width divides ``group_size``; returns how many layers were quantized.

    ``save_pretrained`` records ``{bits, group_size, layers}`` in ``config.json`` and
    ``from_pretrained`` quantizes the same layers of the fresh model before loading.
    A model that is already quantized is refused (``ValueError``)."""
    done = quantized_layers(model)
    if done:
        raise ValueError(f"[quantize] the model is already quantized ({done[0][1].bits}-bit, group size "
                         f"{done[0][1].group_size}); convert from the unquantized checkpoint instead")
    group_size, bits = int(group_size), int(bits)
    affine_quantize(model, group_size, bits,  # Linears as AffineLinear: a BLAS path for a prompt's rows on the CPU
                    lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    return len(quantized_layers(model))


def _options(layer: nn.Module) -> Dict[str, Any]:
    """The constructor keywords (besides the sizes) that rebuild ``layer``, a BitLinear or TernaryLinear."""
    norm = "norm" in layer
    options = {"bias": "bias" in layer, "norm": norm, "norm_eps": float(layer.norm.eps) if norm else 1e-6,
               "quant_eps": float(layer.quant_eps)}
    if isinstance(layer, TernaryLinear):
        options.update(activation=layer.activation, scale_convention=layer.scale_convention,
                       packing=layer.packing, kernel=layer.kernel)
    return options


def record(model: nn.Module, fresh: nn.Module, model_type: str) -> Dict[str, Any]:
    """The ``config.json`` entries that make ``build`` (which made ``fresh``) give ``model``'s layers."""
    built = dict(fresh.named_modules())
    ternary: List[Dict[str, Any]] = []
    for path, layer in model.named_modules():
        was = built.get(path)
        if was is None or type(was) is type(layer) or isinstance(layer, _AFFINE):
            continue
        if type(layer) not in _TERNARY.values() or type(was) is not nn.Linear:
            raise ValueError(f"[save_pretrained] {path} is a {type(layer).__name__} where the {model_type} converter "
                             f"builds a {type(was).__name__}; from_pretrained could not rebuild it")
        entry = {"class": type(layer).__name__, "options": _options(layer)}
        same = [e for e in ternary if e["class"] == entry["class"] and e["options"] == entry["options"]]
        (same[0] if same else entry).setdefault("layers", []).append(path)
        if not same:
            ternary.append(entry)
    out: Dict[str, Any] = {TERNARY_KEY: ternary} if ternary else {}
    affine = quantized_layers(model)
    kinds = {(m.bits, m.group_size) for _, m in affine}
    if len(kinds) > 1:
        raise ValueError(f"[save_pretrained] the quantized layers mix bits and group sizes {sorted(kinds)}; "
                         "config.json records one (bits, group_size)")
    if affine:
        bits, group_size = kinds.pop()
        out[QUANTIZATION_KEY] = {"bits": bits, "group_size": group_size, "layers": [p for p, _ in affine]}
    return out


def _rebuild_ternary(model: nn.Module, entries: list, source: str) -> None:
    modules = dict(model.named_modules())
    swaps = []
    for i, entry in enumerate(entries):
        where = f"{source}: field {TERNARY_KEY!r} entry {i}"
        if entry.get("class") not in _TERNARY or problem(entry.get("options"), Dict[str, Any]) \
                or problem(entry.get("layers"), List[str]):
            raise ConfigError(f"{where} expected {{'class': one of {sorted(_TERNARY)}, 'options': an object, "
                              f"'layers': an array of strings}}, got keys {sorted(entry)}")
        for path in entry["layers"]:
            linear = modules.get(path)
            if type(linear) is not nn.Linear:
                found = f"a {type(linear).__name__}" if linear is not None else "nothing"
                raise ConfigError(f"{where}: expected {path!r} to be a Linear layer of the model, found {found}")
            out_features, in_features = linear.weight.shape
            try:
                swaps.append((path, _TERNARY[entry["class"]](in_features, out_features, **entry["options"])))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: bad options for {entry['class']} {path!r}: {e}") from e
    if swaps:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swaps))


def _rebuild_affine(model: nn.Module, spec: Mapping[str, Any], source: str) -> None:
    where = f"{source}: field {QUANTIZATION_KEY!r}"
    bits, group_size = spec.get("bits"), spec.get("group_size", 64)
    if bits not in AFFINE_BITS or problem(bits, int) or group_size not in GROUP_SIZES or problem(group_size, int):
        raise ConfigError(f"{where} expected bits in {AFFINE_BITS} and group_size in {GROUP_SIZES}, got bits "
                          f"{bits!r}, group_size {group_size!r}")
    layers: Optional[list] = spec.get("layers")
    if layers is None:  # written before the layers were listed
        quantize(model, bits, group_size)
        return
    if problem(layers, List[str]):
        raise ConfigError(f"{where} expected 'layers' to be an array of strings, got {layers!r:.60}")
    modules = dict(model.named_modules())
    unknown = [p for p in layers if not hasattr(modules.get(p), "to_quantized")]
    if unknown:
        raise ConfigError(f"{where} lists {unknown[0]!r}, which is no Linear or Embedding layer of the model")
    chosen = set(layers)
    affine_quantize(model, group_size, bits, lambda p, m: p in chosen)


def rebuild(model: nn.Module, config: Mapping[str, Any], source: str = "config.json") -> None:
    """Redo, in place on a freshly built ``model``, the swaps that :func:`record` wrote into ``config``."""
    if TERNARY_KEY in config:
        entries = check_value(config[TERNARY_KEY], List[Dict[str, Any]], f"{source}: field {TERNARY_KEY!r}")
        _rebuild_ternary(model, entries, source)
    if QUANTIZATION_KEY in config:
        spec = check_value(config[QUANTIZATION_KEY], Dict[str, Any], f"{source}: field {QUANTIZATION_KEY!r}")
        _rebuild_affine(model, spec, source)


def _dense(path: str, layer: nn.Module, model_type: str) -> Dict[str, mx.array]:
    """``{"weight", "bias"?}`` of the float layer that computes what ``layer`` (a swap) holds."""
    if isinstance(layer, _AFFINE):
        weight = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
        return {"weight": weight, **({"bias": layer.bias} if "bias" in layer else {})}
    if "norm" in layer:
        raise ValueError(f'[save_pretrained] format="hf": {path} is a {type(layer).__name__} with an input RMSNorm, '
                         f"which the {model_type} checkpoint's Linear cannot hold (swap with norm=False to export)")
    if isinstance(layer, BitLinear):  # the weight its forward multiplies: Q_W / s_w
        return {"weight": weight_quant(layer.weight, layer.quant_eps),
                **({"bias": layer.bias} if "bias" in layer else {})}
    codes, scale, bias = layer.dense_weight()  # W = s T, the effective bias
    return {"weight": codes * scale, **({"bias": bias} if bias is not None else {})}


def dense_parameters(model: nn.Module, fresh: nn.Module, model_type: str) -> Dict[str, mx.array]:
    r"""The flat parameters of ``model`` as the float model ``build`` (which made ``fresh``) holds them.

    MLX affine layers are de-quantized (``mx.dequantize``: :math:`W = s\,q + b` per group);
    a ternary swap becomes its dense weight, :math:`Q_W / s_w` for :class:`BitLinear` (what its
    forward multiplies) and :math:`s\,T` with the effective bias for :class:`TernaryLinear`
    (:meth:`~mlx_zeta.quant.TernaryLinear.dense_weight`). The per-token int8 quantization of their
    inputs has no place in a float Linear and is dropped; a swap with an input RMSNorm is refused.
    Layers ``build`` makes itself (BitNet's packed ones) stay as they are.
    """
    built = dict(fresh.named_modules())
    swapped = {path: layer for path, layer in model.named_modules()
               if isinstance(layer, _AFFINE) or (type(layer) in _TERNARY.values() and path in built
                                                 and type(built[path]) is not type(layer))}
    out = {k: v for k, v in tree_flatten(model.parameters())
           if not any(k.startswith(f"{path}.") for path in swapped)}
    for path, layer in swapped.items():
        out.update({f"{path}.{k}": v for k, v in _dense(path, layer, model_type).items()})
    return out
