r"""Low-rank adapters on a whole model: :func:`apply_adapters` freezes a model and wraps chosen Linear
layers in :class:`~mlx_zeta.training.lora.LoRALinear` or :class:`~mlx_zeta.training.lora.DoRALinear`
(whose ``lora_a``, ``lora_b`` and ``magnitude`` are then the only trainable parameters; the bases keep
their kind, so a 4-bit ``AffineLinear`` stays 4-bit: QLoRA), :func:`fuse_adapters` folds them back
into plain layers, :func:`save_adapters` / :func:`load_adapters` write and read our adapter folder
(``adapters.safetensors`` + ``adapter_config.json``). The layers live in :mod:`mlx_zeta.training.lora`
and are re-exported here.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_zeta.common import atomic_path, check_int, check_keys, read_json_object
from mlx_zeta.quant.affine import AffineLinear
from mlx_zeta.quant.bitlinear import BitLinear
from mlx_zeta.quant.ternary import TernaryLinear
from mlx_zeta.training.lora import BASES, DoRALinear, LoRALinear, base_features, dense_bias, dense_weight

__all__ = ["LoRALinear", "DoRALinear", "dense_weight", "apply_adapters", "adapter_parameters", "fuse_adapters",
           "save_adapters", "load_adapters", "build_layers", "wrap_layers", "adapted_layers", "check_unadapted",
           "ADAPTER_FILE", "CONFIG_FILE", "FORMAT", "HEAD_NAMES"]

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT, VERSION = "mlx_zeta-adapters", 1
HEAD_NAMES = ("to_logits", "lm_head")  # output heads, not adapted unless a target names them
_PARAMS = ("lora_a", "lora_b", "magnitude")


# ------------------------------------------------------------------ choosing layers
def _block_lists(model: nn.Module) -> Dict[str, List[int]]:
    """``{path: block indices}`` of the model's outermost lists of modules (its block stacks):
    ``attn_layers.layers`` for a Transformer, ``encoder.layers`` and ``decoder.layers`` for T5,
    ``layers`` for a BERT encoder."""
    parents: Dict[str, set] = {}
    for path in (p for p, _ in model.named_modules()):
        head, _, last = path.rpartition(".")
        if last.isdigit():
            parents.setdefault(head, set()).add(int(last))
    return {p: sorted(items) for p, items in parents.items()
            if not any(p.startswith(q + ".") for q in parents if q != p)}


def _in_last_blocks(model: nn.Module, num_layers: Optional[int]):
    """A predicate on module paths: inside the last ``num_layers`` blocks of every block list."""
    if num_layers is None:
        return lambda path: True
    lists = _block_lists(model)
    if not lists:
        raise ValueError("[apply_adapters] num_layers was given but the model has no list of blocks "
                         "(a module list such as attn_layers.layers)")
    prefixes = [f"{stack}.{i}." for stack, items in lists.items() for i in items[max(len(items) - num_layers, 0):]]
    return lambda path: any(path.startswith(p) for p in prefixes)


def _matches(pattern: str, path: str) -> bool:
    """fnmatch on the dotted path, or a full regular expression for a pattern written ``re:...``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def _select(model: nn.Module, targets: Optional[Sequence[str]], num_layers: Optional[int]) -> List[str]:
    """The paths to adapt (sorted as ``named_modules`` lists them, reversed to model order)."""
    inside = _in_last_blocks(model, num_layers)
    modules = [(p, m) for p, m in reversed(model.named_modules()) if p and inside(p)]
    if targets is None:
        return [p for p, m in modules if isinstance(m, BASES) and p.rsplit(".", 1)[-1] not in HEAD_NAMES]
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"[apply_adapters] expected targets to be a list of patterns (str), got {targets!r}")
    chosen = []
    for pattern in targets:
        hits = [(p, m) for p, m in modules if _matches(pattern, p)]
        linear = [p for p, m in hits if isinstance(m, BASES)]
        if not linear:
            found = (f"only {hits[0][0]!r}, a {type(hits[0][1]).__name__}" if hits else "no module")
            where = "" if num_layers is None else f" in the last {num_layers} blocks"
            raise ValueError(f"[apply_adapters] target {pattern!r} expected to match Linear layers{where}, "
                             f"matched {found}")
        chosen += [p for p in linear if p not in chosen]
    order = [p for p, _ in modules]
    return sorted(chosen, key=order.index)


def adapted_layers(model: nn.Module) -> List[Tuple[str, LoRALinear]]:
    """``[(path, layer)]`` of the model's adapter layers (LoRA and DoRA), in model order."""
    return [(p, m) for p, m in reversed(model.named_modules()) if isinstance(m, LoRALinear)]


def check_unadapted(model: nn.Module, owner: str) -> None:
    """A one-line ``ValueError`` prefixed ``[owner]`` when ``model`` already has adapters."""
    done = adapted_layers(model)
    if done:
        raise ValueError(f"[{owner}] expected a model without adapters, got one already adapted "
                         f"({done[0][0]}); fuse_adapters or reload the model first")


def apply_adapters(model: nn.Module, *, rank: int = 8, scale: Optional[float] = None, alpha: Optional[float] = None,
                   dropout: float = 0.0, dora: bool = False, targets: Optional[Sequence[str]] = None,
                   num_layers: Optional[int] = None) -> List[str]:
    r"""Freeze ``model`` and wrap Linear layers in :class:`LoRALinear` (or :class:`DoRALinear`), in place.

    Afterwards ``model.trainable_parameters()`` holds only the adapters' ``lora_a``, ``lora_b``
    (and ``magnitude``); quantized and ternary bases stay as they are.

    Which layers: ``targets`` are patterns on module paths, ``fnmatch`` style (``"*.attn.to_q"``,
    ``"*.ff.*"``) or a full regular expression written ``"re:..."``; each must match at least one
    Linear layer (non-Linear modules it also matches are skipped). Default: every supported Linear
    (``nn.Linear``, ``nn.QuantizedLinear``/``AffineLinear``, ``TernaryLinear``, ``BitLinear``) except
    the LM head (a path ending in ``to_logits`` or ``lm_head``); embeddings are never adapted.
    ``num_layers`` keeps only layers inside the last ``num_layers`` blocks of each block list; the
    block lists are found generically as the model's outermost lists of modules (paths ``X.0``,
    ``X.1``, ...): ``attn_layers.layers`` of a ``Transformer``, ``encoder.layers`` and
    ``decoder.layers`` of a ``T5Model`` (the last blocks of each), ``layers`` of a ``BertEncoder``.

    Args:
        model (nn.Module): the model, modified in place.
        rank (int): adapter rank :math:`r`. Default: ``8``.
        scale (float, optional): :math:`s`. Default: ``2.0``, or ``alpha / rank`` when ``alpha`` is given.
        alpha (float, optional): PEFT's ``lora_alpha``; give ``scale`` or ``alpha``, not both.
        dropout (float): adapter dropout probability. Default: ``0.0``.
        dora (bool): DoRA instead of LoRA. Default: ``False``.
        targets (list of str, optional): path patterns (see above). Default: ``None``.
        num_layers (int, optional): only the last ``num_layers`` blocks. Default: ``None`` (all).

    Returns:
        list of str: the adapted module paths, in model order.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"[apply_adapters] expected model to be an mlx.nn.Module, got {type(model).__name__}")
    check_int("apply_adapters", "rank", rank, 1)
    check_int("apply_adapters", "num_layers", num_layers, 1, optional=True)
    if scale is not None and alpha is not None:
        raise ValueError(f"[apply_adapters] expected scale or alpha, got both (scale={scale}, alpha={alpha})")
    scale = 2.0 if scale is None and alpha is None else (alpha / rank if alpha is not None else scale)
    if not isinstance(dora, bool):
        raise ValueError(f"[apply_adapters] expected dora to be a bool, got {dora!r}")
    check_unadapted(model, "apply_adapters")
    paths = _select(model, targets, num_layers)
    if not paths:
        raise ValueError("[apply_adapters] expected the model to hold Linear layers to adapt, found none")
    options = {"rank": rank, "scale": scale, "dropout": dropout}
    wrap_layers(model, build_layers(model, DoRALinear if dora else LoRALinear, {p: options for p in paths}))
    return paths


def build_layers(model: nn.Module, kind: type, options: Dict[str, Dict[str, Any]]) -> Dict[str, LoRALinear]:
    """``{path: kind(base, **options[path])}`` for layers of ``model`` (not swapped in yet: see
    :func:`wrap_layers`), each in its base's train/eval mode."""
    modules = dict(model.named_modules())
    layers = {}
    for path, kwargs in options.items():
        layers[path] = kind(modules[path], **kwargs)
        layers[path].train(modules[path].training)
    return layers


def wrap_layers(model: nn.Module, layers: Dict[str, LoRALinear]) -> None:
    """Freeze ``model`` and swap in ``layers`` (``{path: adapter layer around that path's base}``, from
    :func:`build_layers`); build and fill them all first, so a bad option leaves the model untouched."""
    model.freeze()
    for layer in layers.values():
        layer.base.freeze()
    model.update_modules(tree_unflatten(list(layers.items())))


def adapter_parameters(model: nn.Module) -> Dict[str, mx.array]:
    """``{path: array}`` of every adapter parameter (``<module>.lora_a``, ``.lora_b``, ``.magnitude``)."""
    out = {}
    for path, layer in adapted_layers(model):
        for name in _PARAMS:
            if name in layer:
                out[f"{path}.{name}"] = layer[name]
    return out


# ------------------------------------------------------------------ fusing
def _fused_layer(path: str, layer: LoRALinear, de_quantize: bool) -> nn.Module:
    """The plain layer holding ``layer``'s fused weight (see :func:`fuse_adapters`)."""
    base = layer.base
    weight, bias = layer.fused_weight(), dense_bias(base)
    if isinstance(base, (TernaryLinear, BitLinear)):
        if not de_quantize:
            raise ValueError(f"[fuse_adapters] {path} has a ternary base ({type(base).__name__}), which cannot hold "
                             "the float update; pass de_quantize=True to fuse it into an nn.Linear")
        if "norm" in base:
            raise ValueError(f"[fuse_adapters] {path}: its {type(base).__name__} normalises its input (RMSNorm), "
                             "which an nn.Linear cannot hold; keep the adapter unfused")
    dtype = (base.scales.dtype if isinstance(base, nn.QuantizedLinear)
             else mx.float32 if isinstance(base, TernaryLinear) else base.weight.dtype)
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None)
    linear.weight = weight.astype(dtype)
    if bias is not None:
        linear.bias = bias.astype(dtype)
    if isinstance(base, nn.QuantizedLinear) and not de_quantize:
        quantized = nn.QuantizedLinear.from_linear(linear, base.group_size, base.bits, mode=base.mode)
        return AffineLinear.from_quantized(quantized) if isinstance(base, AffineLinear) else quantized
    return linear


def fuse_adapters(model: nn.Module, *, de_quantize: bool = False) -> List[str]:
    r"""Replace each adapter layer of ``model`` by a plain layer holding its fused weight, in place.

    The fused weight is :math:`W + s B A` (LoRA) or :math:`m \odot W' / \lVert W' \rVert_{row}`,
    :math:`W' = W + sBA` (DoRA), with :math:`W` = :func:`dense_weight` of the base; the bias stays.

    - float base (``nn.Linear``): an ``nn.Linear`` in the base's dtype; equal to the adapted layer up
      to float rounding.
    - affine base (``nn.QuantizedLinear`` / ``AffineLinear``): re-quantized with the same bits, group
      size and mode into the same class, which adds the quantization error of the fused weight (of the
      order of the base's own); ``de_quantize=True`` gives a float ``nn.Linear`` (the scales' dtype) instead.
    - ternary base (``TernaryLinear``, ``BitLinear``): a ternary layer cannot hold a float update, so
      these are refused unless ``de_quantize=True``, which gives an ``nn.Linear`` holding the dense
      weight plus the update (and the effective bias). It multiplies float activations: a base with
      int8 activations differed from that by its per-token activation rounding, which the fused layer
      no longer applies. A base with an input RMSNorm is refused (an ``nn.Linear`` has none).

    The new layers are frozen, like the rest of the adapted model, and keep its train/eval mode.

    Returns:
        list of str: the fused module paths.
    """
    adapted = adapted_layers(model)
    if not adapted:
        raise ValueError("[fuse_adapters] expected a model with adapters (apply_adapters / load_adapters), found none")
    swaps = []
    for path, layer in adapted:
        fused = _fused_layer(path, layer, de_quantize)
        fused.freeze()
        fused.train(layer.training)
        swaps.append((path, fused))
    model.update_modules(tree_unflatten(swaps))
    return [p for p, _ in swaps]


# ------------------------------------------------------------------ our adapter files
def _module_options(layer: LoRALinear) -> Dict[str, Any]:
    return {"rank": layer.rank, "scale": layer.scale, "dropout": layer.dropout}


def save_adapters(model: nn.Module, folder: Union[str, Path], config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model``'s adapters to ``folder``: ``adapters.safetensors`` (:func:`adapter_parameters`,
    our module paths) and ``adapter_config.json``, atomically (other files in ``folder`` stay).

    The config holds ``{"format": "mlx_zeta-adapters", "version": 1, "fine_tune_type": "lora" | "dora",
    "rank", "scale", "dropout", "modules": [paths]}`` (the first layer's rank, scale and dropout;
    ``"module_options": {path: {...}}`` for layers that differ) plus the entries of ``config``
    (training settings, say); a ``config`` entry that contradicts these is refused.

    Returns:
        Path: ``folder``.
    """
    adapted = adapted_layers(model)
    if not adapted:
        raise ValueError("[save_adapters] expected a model with adapters (apply_adapters / load_adapters), found none")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"[save_adapters] expected config to be a dict, got {type(config).__name__}")
    kinds = {type(m) for _, m in adapted}
    if len(kinds) > 1:
        raise ValueError("[save_adapters] expected all adapters to be LoRA or all DoRA, got both")
    first = _module_options(adapted[0][1])
    ours = {"format": FORMAT, "version": VERSION, "fine_tune_type": "dora" if DoRALinear in kinds else "lora",
            **first, "modules": [p for p, _ in adapted]}
    differ = {p: _module_options(m) for p, m in adapted if _module_options(m) != first}
    if differ:
        ours["module_options"] = differ
    for key, value in (config or {}).items():
        if key in ours and ours[key] != value:
            raise ValueError(f"[save_adapters] config[{key!r}] = {value!r} contradicts the model's adapters "
                             f"({ours[key]!r})")
    text = json.dumps({**(config or {}), **ours}, indent=2)
    folder = Path(folder)
    with atomic_path(folder, folder=True, merge=True, order=[ADAPTER_FILE, CONFIG_FILE]) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter_parameters(model), metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(text + "\n")
    return folder


def _read_config(folder: Path) -> Dict[str, Any]:
    """``adapter_config.json`` of ``folder``, its fields checked (one-line errors naming the file)."""
    path = folder / CONFIG_FILE
    config = read_json_object(path, "load_adapters")
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        got = {k: config.get(k) for k in ("format", "version")}
        raise ValueError(f"[load_adapters] {path}: expected format {FORMAT!r} version {VERSION}, got {got}")
    if config.get("fine_tune_type") not in ("lora", "dora"):
        raise ValueError(f"[load_adapters] {path}: expected fine_tune_type 'lora' or 'dora', "
                         f"got {config.get('fine_tune_type')!r}")
    modules = config.get("modules")
    if not (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
        raise ValueError(f"[load_adapters] {path}: expected 'modules' to be a non-empty list of module paths, "
                         f"got {modules!r:.80}")
    extra = config.get("module_options", {})
    if not isinstance(extra, dict):
        raise ValueError(f"[load_adapters] {path}: expected 'module_options' to be an object, got {extra!r:.80}")
    return config


def _options(config: Dict[str, Any], where: Path) -> Dict[str, Dict[str, Any]]:
    """``{path: {rank, scale, dropout}}`` for every module of the config."""
    out = {}
    for path in config["modules"]:
        found = config.get("module_options", {}).get(path, config)
        kwargs = {k: found.get(k) for k in ("rank", "scale", "dropout")}
        bad = [k for k, v in kwargs.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad or not isinstance(kwargs["rank"], int):
            raise ValueError(f"[load_adapters] {where}: expected numbers rank (int), scale, dropout for {path}, "
                             f"got {kwargs}")
        out[path] = kwargs
    return out


def load_adapters(model: nn.Module, folder: Union[str, Path]) -> List[str]:
    """Apply the adapters saved by :func:`save_adapters` in ``folder`` to ``model`` (freezing it) and
    load their weights; returns the adapted module paths.

    Everything is checked before the model changes: the config (format, version, fields), that each
    listed module is a supported Linear layer of the model, and that ``adapters.safetensors`` holds
    exactly the expected arrays and shapes (missing, unexpected, mismatched keys are named). Only
    safetensors is read, never a pickle.
    """
    folder = Path(folder)
    config = _read_config(folder)
    where = folder / CONFIG_FILE
    options = _options(config, where)
    check_unadapted(model, "load_adapters")
    modules = dict(model.named_modules())
    for path in options:
        if not isinstance(modules.get(path), BASES):
            found = type(modules[path]).__name__ if path in modules else "nothing"
            raise ValueError(f"[load_adapters] {where}: expected module {path!r} to be a Linear layer of the model, "
                             f"found {found}")
    dora = config["fine_tune_type"] == "dora"
    expected = {}
    for path, kwargs in options.items():
        out_features, in_features = base_features(modules[path])
        expected[f"{path}.lora_a"] = (kwargs["rank"], in_features)
        expected[f"{path}.lora_b"] = (out_features, kwargs["rank"])
        if dora:
            expected[f"{path}.magnitude"] = (out_features,)
    weights_file = folder / ADAPTER_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"[load_adapters] expected {weights_file}, not found")
    weights = mx.load(str(weights_file), format="safetensors")
    check_keys(expected, weights, f"load_adapters {weights_file}")
    wrap_layers(model, build_layers(model, DoRALinear if dora else LoRALinear, options))
    model.update(tree_unflatten(list(weights.items())))
    return list(options)
