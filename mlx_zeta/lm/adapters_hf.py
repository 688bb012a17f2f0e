r"""LoRA / DoRA adapters in PEFT's file layout: :func:`save_peft` writes ours for
``peft.PeftModel.from_pretrained`` on the Hugging Face model, :func:`load_peft` applies PEFT's to ours.

The folder (PEFT 0.21.2's ``save_pretrained``): ``adapter_model.safetensors`` with, per Hugging
Face module ``M`` (``model.layers.0.self_attn.q_proj``), ``base_model.model.M.lora_A.weight``
:math:`A` (r, in), ``...lora_B.weight`` :math:`B` (out, r) and, for DoRA,
``...lora_magnitude_vector`` :math:`m` (out,); ``adapter_config.json`` with ``peft_type: "LORA"``,
``r``, ``lora_alpha`` (the scale is :math:`s = \alpha / r`, or :math:`\alpha/\sqrt r` with
``use_rslora``), ``rank_pattern`` / ``alpha_pattern`` for modules that differ, ``target_modules``,
``use_dora`` and ``fan_in_fan_out`` (GPT-2's ``Conv1D``; :math:`A` and :math:`B` keep the layout
above either way).

Which module of ours is which of Hugging Face's comes from the converter
(``hf_linear_parts(args)``, a list of :class:`~mlx_zeta.converters.base.LinearPart`: rows of one of
our Linears = rows of one Hugging Face module, same input). A module on one side is made of the
parts the other side's modules hold; its adapter, with the same input :math:`x`, is exactly

.. math::

    A = \begin{bmatrix} A_1 \\ \vdots \\ A_k \end{bmatrix}, \qquad
    B[\text{rows}_j,\ \text{cols}_i] = \frac{s_i}{s}\, B_i[\text{rows}'_j]

for the distinct adapters :math:`i` behind its parts :math:`j` (``cols_i``: the columns of
:math:`A_i` in the stack, :math:`s` the first adapter's scale, rank :math:`\sum_i r_i`), and
:math:`m[\text{rows}_j] = m_i[\text{rows}'_j]`. So Llama's ``ff.proj_in`` (``[up; gate]``) exports
as ``up_proj`` and ``gate_proj`` with the same :math:`A` and :math:`B` split by rows, and imports
from them as :math:`A` stacked and :math:`B` block-diagonal; GPT-2's ``to_q``/``to_k``/``to_v``
export as one ``c_attn`` the same way. Rows no adapter covers get zero rows of :math:`B` and, for
DoRA, the row norms of the base weight as :math:`m` (the identity there). Since DoRA normalises
each output row on its own, it maps exactly too.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import atomic_path, read_json_object
from mlx_zeta.converters.base import LinearPart
from mlx_zeta.converters.pretrained import PretrainedInfo, get_architecture
from mlx_zeta.training.adapters import (DoRALinear, LoRALinear, adapted_layers, build_layers, check_unadapted,
                                       dense_weight, load_adapters, wrap_layers)

__all__ = ["save_peft", "load_peft", "load_any_adapters", "PEFT_CONFIG", "PEFT_WEIGHTS"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_FIELDS = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "magnitude"}
# adapter_config.json settings this reader cannot honour, with the value that is fine
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "modules_to_save": None, "target_parameters": None,
                "layer_replication": None, "use_qalora": False, "trainable_token_indices": None,
                "alora_invocation_tokens": None}



def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# adapter_config.json fields this reader uses: (check, LoraConfig's default)
_CHECKS = {"r": (_is_int, 8), "lora_alpha": (_is_number, 8),
           "rank_pattern": (lambda v: isinstance(v, dict) and all(map(_is_int, v.values())), {}),
           "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(_is_number, v.values())), {}),
           "use_dora": (lambda v: isinstance(v, bool), False), "use_rslora": (lambda v: isinstance(v, bool), False),
           "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, 0.0)}


@dataclass
class _Lora:
    """One adapter: ``a`` (r, in), ``b`` (out, r), ``scale``, DoRA ``magnitude`` (out,) or None."""

    a: mx.array
    b: mx.array
    scale: float
    magnitude: Optional[mx.array] = None


def _parts(model: nn.Module, where: str) -> Tuple[List[LinearPart], PretrainedInfo]:
    """The converter's ``hf_linear_parts`` for ``model`` (one from ``from_pretrained``)."""
    info = getattr(model, "pretrained", None)
    if not isinstance(info, PretrainedInfo):
        raise ValueError(f"[{where}] expected a model from from_pretrained (it knows its Hugging Face "
                         f"architecture), got a {type(model).__name__} without model.pretrained")
    arch = get_architecture(info.model_type)
    if not hasattr(arch, "hf_linear_parts"):
        raise ValueError(f"[{where}] expected a model_type whose converter maps its modules to Hugging Face's "
                         f"(hf_linear_parts: llama, mistral, qwen2, qwen3, gpt2), got {info.model_type!r}")
    args = arch.ModelArgs.from_dict({**info.config, "model_type": info.model_type})
    return arch.hf_linear_parts(args), info


def _combine(links: List[Tuple[LinearPart, Tuple[int, int], str, Tuple[int, int]]], sources: Dict[str, _Lora],
             base_rows: Callable[[LinearPart], mx.array]) -> Optional[_Lora]:
    """The adapter of one module from those of the modules it shares rows with (module docstring).

    ``links``: ``(part, rows here, source module, its rows)`` covering this module's rows once;
    ``base_rows(part)``: the dense base weight of a part's rows (for DoRA rows no adapter covers).
    None when no source module has an adapter."""
    used = list(dict.fromkeys(key for _, _, key, _ in links if key in sources))
    if not used:
        return None
    first = sources[used[0]]
    rank = sum(sources[k].a.shape[0] for k in used)
    cols, start = {}, 0
    for key in used:
        cols[key] = start
        start += sources[key].a.shape[0]
    blocks, magnitudes = [], []
    for part, (t0, t1), key, (s0, s1) in sorted(links, key=lambda link: link[1]):
        src = sources.get(key)
        if src is None:
            blocks.append(mx.zeros((t1 - t0, rank), first.b.dtype))
            if first.magnitude is not None:
                magnitudes.append(mx.linalg.norm(base_rows(part).astype(mx.float32), axis=1))
            continue
        b = src.b[s0:s1] if src.scale == first.scale else src.b[s0:s1] * (src.scale / first.scale)
        c0, c1 = cols[key], cols[key] + src.a.shape[0]
        blocks.append(mx.pad(b, [(0, 0), (c0, rank - c1)]))
        if first.magnitude is not None:
            magnitudes.append(src.magnitude[s0:s1])
    a = mx.concatenate([sources[k].a for k in used], axis=0)
    magnitude = mx.concatenate(magnitudes) if magnitudes else None
    return _Lora(a, mx.concatenate(blocks, axis=0), first.scale, magnitude)


def _number(x: float) -> Union[int, float]:
    """``16.0`` -> ``16`` (PEFT's configs hold integer alphas), other values as they are."""
    return int(x) if float(x).is_integer() else float(x)


def _by(parts: List[LinearPart], key: Callable[[LinearPart], str]) -> Dict[str, List[LinearPart]]:
    groups: Dict[str, List[LinearPart]] = {}
    for p in parts:
        groups.setdefault(key(p), []).append(p)
    return groups


def _base_rows(model: nn.Module) -> Callable[[LinearPart], mx.array]:
    """``part -> `` the dense base weight of the part's rows of our Linear (:func:`dense_weight`)."""
    modules = dict(model.named_modules())
    return lambda p: dense_weight(modules[p.ours])[p.ours_rows[0]:p.ours_rows[1]]


# --------------------------------------------------------------------------- export


def save_peft(model: nn.Module, folder: Union[str, Path]) -> Path:
    """Write ``model``'s adapters as a PEFT 0.21.2 LoRA adapter of its Hugging Face architecture.

    ``folder`` gets ``adapter_model.safetensors`` and ``adapter_config.json`` (atomically; other
    files stay), which ``peft.PeftModel.from_pretrained(transformers_model, folder)`` loads: same
    outputs as ours (module docstring for the mapping). ``r`` / ``lora_alpha`` are the most common
    ones, ``rank_pattern`` / ``alpha_pattern`` name the Hugging Face modules that differ,
    ``target_modules`` the modules' short names when those name exactly the adapted ones, else
    their full names; ``lora_dropout`` is the most common dropout.

    Raises:
        ValueError: a model without adapters, not from ``from_pretrained`` or of an architecture
            without a Hugging Face module map, adapters on modules Hugging Face's model lacks, LoRA
            and DoRA mixed.
    """
    parts, info = _parts(model, "save_peft")
    ours = dict(adapted_layers(model))
    if not ours:
        raise ValueError("[save_peft] expected a model with adapters (apply_adapters / load_adapters), found none")
    unknown = sorted(set(ours) - {p.ours for p in parts})
    if unknown:
        raise ValueError(f"[save_peft] expected adapters on Linears a Hugging Face {info.model_type} model has, "
                         f"got one on {unknown[0]!r}")
    dora = {isinstance(m, DoRALinear) for m in ours.values()}
    if len(dora) > 1:
        raise ValueError("[save_peft] expected all adapters LoRA or all DoRA (PEFT's use_dora is one setting), "
                         "got both")
    sources = {path: _Lora(m.lora_a, m.lora_b, m.scale, m.get("magnitude")) for path, m in ours.items()}
    base_rows = _base_rows(model)
    hf = {}
    for name, group in _by(parts, lambda p: p.hf).items():
        lora = _combine([(p, p.hf_rows, p.ours, p.ours_rows) for p in group], sources, base_rows)
        if lora is not None:
            hf[name] = lora
    weights = {}
    for name, lora in hf.items():
        weights[f"{PREFIX}{name}.lora_A.weight"] = lora.a
        weights[f"{PREFIX}{name}.lora_B.weight"] = lora.b
        if lora.magnitude is not None:
            weights[f"{PREFIX}{name}.lora_magnitude_vector"] = lora.magnitude
    dropout = Counter(m.dropout for m in ours.values()).most_common(1)[0][0]
    config = _peft_config(hf, parts, info, dora.pop(), dropout)
    folder = Path(folder)
    with atomic_path(folder, folder=True, merge=True, order=[PEFT_WEIGHTS, PEFT_CONFIG]) as tmp:
        mx.save_safetensors(str(tmp / PEFT_WEIGHTS), weights, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _peft_config(hf: Dict[str, _Lora], parts: List[LinearPart], info: PretrainedInfo, dora: bool,
                 dropout: float) -> Dict[str, Any]:
    """``adapter_config.json`` for the Hugging Face modules' adapters ``hf``."""
    ranks = {name: lora.a.shape[0] for name, lora in hf.items()}
    alphas = {name: _number(lora.scale * ranks[name]) for name, lora in hf.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    short = {name.rsplit(".", 1)[-1] for name in hf}
    exact = {p.hf for p in parts if p.hf.rsplit(".", 1)[-1] in short} == set(hf)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if info.source is None else str(info.source),
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(short if exact else hf),
        "rank_pattern": {name: k for name, k in ranks.items() if k != r},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "use_dora": dora, "use_rslora": False,
        "fan_in_fan_out": any(p.transposed for p in parts if p.hf in hf),
        "bias": "none", "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


# --------------------------------------------------------------------------- import


def _read_config(folder: Path) -> Dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter, the fields this reader uses checked."""
    path = folder / PEFT_CONFIG
    config = read_json_object(path, "load_peft")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"[load_peft] {path}: expected peft_type 'LORA', got {config.get('peft_type')!r}")
    for key, fine in _UNSUPPORTED.items():
        value = config.get(key, fine)
        if value != fine and not (fine is None and value in ([], {})):
            raise ValueError(f"[load_peft] {path}: unsupported {key}={value!r:.80} (expected {fine!r})")
    for key, (ok, default) in _CHECKS.items():  # absent or null: LoraConfig's default
        config[key] = default if config.get(key) is None else config[key]
        if not ok(config[key]):
            raise ValueError(f"[load_peft] {path}: unexpected {key}={config[key]!r:.80}")
    return config




def _pattern(patterns: Dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``K`` with
    ``re.match(rf"(.*\\.)?({K})$", name)``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_weights(folder: Path, config: Dict[str, Any], parts: List[LinearPart],
                  model_type: str) -> Dict[str, _Lora]:
    """``{Hugging Face module: its adapter}`` from ``adapter_model.safetensors``, keys, shapes and ranks
    checked against ``parts`` and the config."""
    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"[load_peft] {folder}: expected {PEFT_WEIGHTS}, found only adapter_model.bin (a pickle, "
                             "never read here); save it with safe_serialization=True")
        raise FileNotFoundError(f"[load_peft] expected {path}, not found")
    found: Dict[str, Dict[str, mx.array]] = {}
    for key, value in mx.load(str(path), format="safetensors").items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"[load_peft] {path}: unexpected key {key!r}; expected {PREFIX}<module>.lora_A.weight, "
                             ".lora_B.weight or .lora_magnitude_vector")
        found.setdefault(m.group(1), {})[_FIELDS[m.group(2)]] = value.astype(mx.float32)
    rows = {name: max(p.hf_rows[1] for p in group) for name, group in _by(parts, lambda p: p.hf).items()}
    want = {"a", "b", "magnitude"} if config["use_dora"] else {"a", "b"}
    out = {}
    for name, arrays in found.items():
        where = f"[load_peft] {path}: {PREFIX}{name}"
        if name not in rows:
            raise ValueError(f"{where}: expected a module a Hugging Face {model_type} model has (and an adapter of "
                             f"ours can map), got {name!r}")
        if set(arrays) != want:
            names = {"a": "lora_A.weight", "b": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
            raise ValueError(f"{where}: expected {', '.join(names[k] for k in sorted(want))}, got "
                             f"{', '.join(names[k] for k in sorted(arrays))} (use_dora={config['use_dora']})")
        a, b, magnitude = arrays["a"], arrays["b"], arrays.get("magnitude")
        rank = a.shape[0] if a.ndim == 2 else -1
        if rank < 1 or b.shape != (rows[name], rank) or (magnitude is not None and magnitude.shape != (rows[name],)):
            raise ValueError(f"{where}: expected lora_A (r, in), lora_B ({rows[name]}, r)"
                             f"{f', lora_magnitude_vector ({rows[name]},)' if magnitude is not None else ''}, got "
                             f"{', '.join(str(tuple(arrays[k].shape)) for k in sorted(arrays))}")
        r = _pattern(config["rank_pattern"], name, config["r"])
        if r != rank:
            raise ValueError(f"{where}.lora_A.weight: expected rank {r} (adapter_config.json), got {rank}")
        alpha = _pattern(config["alpha_pattern"], name, config["lora_alpha"])
        out[name] = _Lora(a, b, alpha / (math.sqrt(r) if config["use_rslora"] else r), magnitude)
    if not out:
        raise ValueError(f"[load_peft] {path}: expected LoRA weights, found none")
    return out


def load_peft(model: nn.Module, folder: Union[str, Path]) -> List[str]:
    """Apply the PEFT LoRA / DoRA adapter saved in ``folder`` (PEFT's ``save_pretrained``) to ``model``
    (from ``from_pretrained``, of the adapter's base architecture), freezing it; returns our adapted
    module paths. The model then computes what transformers + peft compute (module docstring for
    the mapping; PEFT's scales ``alpha / r`` per module, rsLoRA's ``alpha / sqrt(r)``, folded into
    ``B`` where one of ours joins several).

    Only ``adapter_model.safetensors`` is read (never a pickle). Refused with one line naming the
    file: a non-LoRA ``peft_type``, settings this mapping cannot carry (trained biases, ``modules_to_save``,
    ...), keys naming modules the model lacks, shapes or ranks that disagree, an adapted model.
    """
    folder = Path(folder)
    parts, info = _parts(model, "load_peft")
    config = _read_config(folder)
    hf = _read_weights(folder, config, parts, info.model_type)
    check_unadapted(model, "load_peft")
    base_rows = _base_rows(model)
    kind = DoRALinear if config["use_dora"] else LoRALinear
    layers = {}
    for path, group in _by(parts, lambda p: p.ours).items():
        lora = _combine([(p, p.ours_rows, p.hf, p.hf_rows) for p in group], hf, base_rows)
        if lora is None:
            continue
        options = {"rank": lora.a.shape[0], "scale": lora.scale, "dropout": config["lora_dropout"]}
        layer = layers[path] = build_layers(model, kind, {path: options})[path]
        if layer.lora_a.shape != lora.a.shape:
            names = sorted({p.hf for p in group if p.hf in hf})
            raise ValueError(f"[load_peft] {folder / PEFT_WEIGHTS}: expected lora_A of {', '.join(names)} to take "
                             f"{layer.in_features} inputs ({path}), got {lora.a.shape[1]}")
        layer.lora_a, layer.lora_b = lora.a, lora.b
        if lora.magnitude is not None:
            layer.magnitude = lora.magnitude
    wrap_layers(model, layers)
    return list(layers)


def load_any_adapters(model: nn.Module, folder: Union[str, Path]) -> List[str]:
    """Apply the adapters in ``folder`` to ``model``: PEFT's (:func:`load_peft`) when its
    ``adapter_config.json`` names a ``peft_type``, else ours
    (:func:`~mlx_zeta.training.adapters.load_adapters`, which checks its own format); returns the
    adapted module paths."""
    path = Path(folder) / PEFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        config = None  # load_adapters names what is wrong with it
    if isinstance(config, dict) and "peft_type" in config:
        return load_peft(model, folder)
    return load_adapters(model, folder)
