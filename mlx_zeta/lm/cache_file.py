r"""Prompt-cache files: prefill a long prompt once, save its key/value caches, and reuse them
for many continuations, in this process or another (:func:`save_prompt_cache`,
:func:`load_prompt_cache` for a :class:`~mlx_zeta.lm.PromptCache`; :func:`save_caches`,
:func:`load_caches` for a list of caches and the token ids they hold).

:func:`save_caches` writes one safetensors file: each layer's filled keys and values
(``"{i}.keys"``, ``"{i}.values"``, shape :math:`(1, H_{kv}, S_i, D)` with :math:`S_i` the stored
positions) and JSON metadata strings:

- ``format`` (``"mlx-zeta-prompt-cache"``) and ``version`` (``"1"``);
- ``model``: ``model_type``, ``num_tokens``, ``depth``, ``kv_shape`` (:math:`[H_{kv}, D]`) of the
  model that filled the caches;
- ``max_kv_size``: the bounded option used (or ``null``);
- ``caches``: per layer ``kind`` (class name), ``max_size`` (or ``null``), ``offset``;
- ``tokens``: the token ids the caches hold (``offset`` of every layer);
- ``metadata``: the caller's own ``{str: str}``.

:func:`load_caches` checks all of it (the file is a complete safetensors file of this format and
version, every field has its type, the arrays are exactly the expected ones with the expected
shapes, and, given a model, the file was made by a model of the same shape with the same cache
layout) and raises a one-line ``ValueError`` naming the file and the field. Files are read with
``mx.load(..., format="safetensors")``: nothing is ever unpickled.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import atomic_path, is_int
from mlx_zeta.lm.cache import PromptCache, WindowedKVCache, make_caches
from mlx_zeta.nn.cache import Cache, KVCache, RotatingKVCache

__all__ = ["save_prompt_cache", "load_prompt_cache", "save_caches", "load_caches", "model_signature", "FORMAT",
           "VERSION"]

FORMAT = "mlx-zeta-prompt-cache"
VERSION = 1
PathLike = Union[str, Path]


KINDS = {cls.__name__: cls for cls in (KVCache, RotatingKVCache, WindowedKVCache)}


def model_signature(model: nn.Module, owner: str = "model_signature") -> Dict[str, Any]:
    """What a cache file records of the model that filled it: ``model_type`` (from
    ``model.pretrained``, ``None`` for a model built in code), ``num_tokens``, ``depth`` (caches)
    and ``kv_shape`` ``[kv_heads, head_dim]`` of its self-attention."""
    stack = getattr(model, "attn_layers", None)
    attns = [layer.attn for layer in getattr(stack, "layers", ()) if "attn" in layer]
    if not attns or not hasattr(model, "num_tokens"):
        raise ValueError(f"[{owner}] expected a decoder Transformer (num_tokens, attn_layers with self-attention), "
                         f"got {type(model).__name__}")
    info = getattr(model, "pretrained", None)
    return {"model_type": getattr(info, "model_type", None), "num_tokens": model.num_tokens, "depth": len(attns),
            "kv_shape": [attns[0].kv_heads, attns[0].dim_head]}


def _describe(cache: Cache) -> Dict[str, Any]:
    return {"kind": type(cache).__name__, "max_size": getattr(cache, "max_size", None)}


def save_caches(path: PathLike, caches: Sequence[Cache], tokens: Sequence[int], model: nn.Module,
                max_kv_size: Optional[int] = None, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``caches`` (batch 1, holding ``tokens``) of ``model`` to ``path`` (a ``.safetensors``
    file, written atomically: on an error nothing is left and an old file is untouched).
    Returns the path. See the module docstring for the format."""
    owner, path = "save_caches", Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"[{owner}] expected a path ending in .safetensors, got {str(path)!r}")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"[{owner}] expected metadata as a dict of str to str, got {metadata!r:.80}")
    tokens = list(tokens)
    if not all(is_int(t) for t in tokens):
        raise ValueError(f"[{owner}] expected tokens as a list of int, got {tokens!r:.80}")
    arrays, layers = {}, []
    for i, cache in enumerate(caches):
        if int(cache.offset) != len(tokens):
            raise ValueError(f"[{owner}] expected every cache to hold the {len(tokens)} tokens, "
                             f"got offset {int(cache.offset)} in layer {i}")
        keys, values = cache.state
        if keys is not None and keys.shape[2]:
            if keys.shape[0] != 1:
                raise ValueError(f"[{owner}] expected caches of batch 1, got keys of shape {tuple(keys.shape)} in layer {i}")
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = keys, values
        layers.append({**_describe(cache), "offset": len(tokens)})
    signature = model_signature(model, owner)
    if len(caches) != signature["depth"]:
        raise ValueError(f"[{owner}] expected {signature['depth']} caches (one per layer), got {len(caches)}")
    fields = {"format": FORMAT, "version": str(VERSION), "model": json.dumps(signature),
              "max_kv_size": json.dumps(max_kv_size), "caches": json.dumps(layers), "tokens": json.dumps(tokens),
              "metadata": json.dumps(metadata or {})}
    with atomic_path(path) as staged:
        mx.save_safetensors(str(staged), arrays, metadata=fields)
    return path


class _FileError(ValueError):
    pass


def _fail(path: Path, field: str, expected: str, got: Any) -> None:
    raise _FileError(f"[load_caches] {path}: field {field!r}: expected {expected}, got {got!r:.120}")


def _json(path: Path, meta: Dict[str, str], field: str) -> Any:
    if field not in meta:
        _fail(path, field, "the field (a prompt-cache file of version 1)", None)
    try:
        return json.loads(meta[field])
    except ValueError:
        _fail(path, field, "JSON text", meta[field])


def _nat(value: Any, low: int = 0) -> bool:
    return is_int(value) and value >= low


def _check_fields(path: Path, meta: Dict[str, str]) -> Tuple[Dict[str, Any], Any, List[Dict[str, Any]], List[int], Dict]:
    """The file's parsed JSON fields, each checked for type and range."""
    if meta.get("format") != FORMAT:
        _fail(path, "format", repr(FORMAT) + " (not a prompt-cache file)", meta.get("format"))
    if meta.get("version") != str(VERSION):
        _fail(path, "version", str(VERSION), meta.get("version"))
    sig, max_kv, layers, tokens, user = (_json(path, meta, f) for f in ("model", "max_kv_size", "caches", "tokens",
                                                                          "metadata"))
    if not isinstance(sig, dict) or set(sig) != {"model_type", "num_tokens", "depth", "kv_shape"}:
        _fail(path, "model", "an object with model_type, num_tokens, depth, kv_shape", sig)
    if not (sig["model_type"] is None or isinstance(sig["model_type"], str)) or not _nat(sig["num_tokens"], 1) \
            or not _nat(sig["depth"], 1) or not (isinstance(sig["kv_shape"], list) and len(sig["kv_shape"]) == 2
                                                 and all(_nat(d, 1) for d in sig["kv_shape"])):
        _fail(path, "model", "model_type str or null, num_tokens and depth int >= 1, kv_shape [int, int]", sig)
    if not (max_kv is None or _nat(max_kv, 1)):
        _fail(path, "max_kv_size", "null or an int >= 1", max_kv)
    if not isinstance(tokens, list) or not all(_nat(t) and t < sig["num_tokens"] for t in tokens):
        _fail(path, "tokens", f"a list of token ids in [0, {sig['num_tokens']})", tokens)
    if not isinstance(layers, list) or len(layers) != sig["depth"]:
        _fail(path, "caches", f"a list of {sig['depth']} entries (model.depth)", layers)
    for i, entry in enumerate(layers):
        ok = isinstance(entry, dict) and set(entry) == {"kind", "max_size", "offset"} and entry["kind"] in KINDS
        ok = ok and entry["offset"] == len(tokens) and is_int(entry["offset"])
        ok = ok and (entry["max_size"] is None if entry["kind"] == "KVCache" else _nat(entry["max_size"], 1))
        if not ok:
            _fail(path, f"caches[{i}]", f"kind in {sorted(KINDS)}, max_size (int >= 1 for rotating kinds, else null), "
                                        f"offset {len(tokens)} (the tokens)", entry)
    if not isinstance(user, dict) or not all(isinstance(v, str) for v in user.values()):
        _fail(path, "metadata", "an object of str to str", user)
    return sig, max_kv, layers, tokens, user


def _check_arrays(path: Path, arrays: Dict[str, mx.array], sig: Dict[str, Any], layers: List[Dict[str, Any]]) -> None:
    """Exactly the expected arrays, each of shape (1, kv_heads, stored, head_dim) and a floating dtype."""
    stored = [min(e["offset"], e["max_size"] or e["offset"]) for e in layers]
    want = {f"{i}.{part}" for i, s in enumerate(stored) if s for part in ("keys", "values")}
    if set(arrays) != want:
        extra, missing = sorted(set(arrays) - want), sorted(want - set(arrays))
        _fail(path, "arrays", f"exactly the layers' keys/values (missing {missing[:4]}, unexpected {extra[:4]})",
              sorted(arrays)[:8])
    h, d = sig["kv_shape"]
    for i, s in enumerate(stored):
        for part in ("keys", "values") if s else ():
            a = arrays[f"{i}.{part}"]
            if tuple(a.shape) != (1, h, s, d) or not mx.issubdtype(a.dtype, mx.floating):
                _fail(path, f"{i}.{part}", f"a floating array of shape {(1, h, s, d)}",
                      f"shape {tuple(a.shape)} and dtype {a.dtype}")


def _check_model(path: Path, sig: Dict[str, Any], max_kv: Optional[int], layers: List[Dict[str, Any]],
                 model: nn.Module) -> List[Cache]:
    """The model's signature and cache layout equal the file's; returns the model's fresh caches."""
    mine = model_signature(model, "load_caches")
    for field, value in mine.items():
        if sig[field] != value:
            raise _FileError(f"[load_caches] {path}: field 'model.{field}': the file was made by a model with "
                             f"{sig[field]!r}, this model has {value!r}")
    caches = make_caches(model, max_kv)
    for i, (cache, entry) in enumerate(zip(caches, layers)):
        if _describe(cache) != {k: entry[k] for k in ("kind", "max_size")}:
            raise _FileError(f"[load_caches] {path}: field 'caches[{i}]': the file has {entry['kind']}(max_size="
                             f"{entry['max_size']}), this model makes {_describe(cache)} with max_kv_size={max_kv}")
    return caches


def load_caches(path: PathLike, model: Optional[nn.Module] = None) -> Tuple[List[Cache], List[int], Dict[str, Any]]:
    """Read a file of :func:`save_caches`: ``(caches, tokens, info)``, ``info`` holding the file's
    ``model`` signature, ``max_kv_size`` and the caller's ``metadata``. With ``model``, the file
    must have been made by a model of the same signature and cache layout (else ``ValueError``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"[load_caches] expected a prompt-cache file, got no file at {path}")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        mx.eval(arrays)
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"[load_caches] {path}: expected a complete safetensors file, got: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        sig, max_kv, layers, tokens, user = _check_fields(path, meta)
        _check_arrays(path, arrays, sig, layers)
        caches = [KINDS[e["kind"]](*([e["max_size"]] if e["max_size"] else [])) for e in layers] if model is None \
            else _check_model(path, sig, max_kv, layers, model)
    except _FileError as err:
        raise ValueError(str(err)) from None
    for i, (cache, entry) in enumerate(zip(caches, layers)):
        if f"{i}.keys" in arrays:
            cache.update_and_fetch(arrays[f"{i}.keys"], arrays[f"{i}.values"])
        cache.offset = entry["offset"]  # a rotating cache has seen more positions than it keeps
    return caches, tokens, {"model": sig, "max_kv_size": max_kv, "metadata": user}


def save_prompt_cache(path: PathLike, prompt_cache: PromptCache, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``prompt_cache`` (its caches, the token ids they hold, its model's signature and
    ``max_kv_size``) to ``path``, a ``.safetensors`` file written atomically, with the caller's
    ``metadata`` (``{str: str}``). Returns the path.

    Example:
        This needs a trained checkpoint (random weights would print noise), so it is shown, not run:

        .. code-block:: python

            from mlx_zeta.lm import PromptCache, generate, load, save_prompt_cache

            model, tokenizer = load("path/to/model")
            pc = PromptCache(model)
            text = generate(model, tokenizer, document + "Summary:", prompt_cache=pc)
            save_prompt_cache("doc.safetensors", pc)
    """
    if not isinstance(prompt_cache, PromptCache):
        raise ValueError(f"[save_prompt_cache] expected a PromptCache, got {type(prompt_cache).__name__}")
    return save_caches(path, prompt_cache.caches, prompt_cache.tokens, prompt_cache.model,
                       prompt_cache.max_kv_size, metadata)


def load_prompt_cache(path: PathLike, model: nn.Module) -> PromptCache:
    """A :class:`~mlx_zeta.lm.PromptCache` of ``model`` holding what :func:`save_prompt_cache`
    wrote to ``path`` (checked: see ``load_caches`` in :mod:`mlx_zeta.lm.cache_file`). Pass it as ``prompt_cache=`` to
    :func:`~mlx_zeta.lm.stream_generate`: a prompt that starts with the saved tokens prefills
    only the rest. The caller's metadata is in ``.metadata``.

    Example:
        This needs a trained checkpoint (random weights would print noise), so it is shown, not run:

        .. code-block:: python

            from mlx_zeta.lm import generate, load, load_prompt_cache

            model, tokenizer = load("path/to/model")
            pc = load_prompt_cache("doc.safetensors", model)  # from save_prompt_cache
            generate(model, tokenizer, document + "Keywords:", prompt_cache=pc)
    """
    caches, tokens, info = load_caches(path, model)
    prompt_cache = PromptCache(model, info["max_kv_size"])
    prompt_cache.caches, prompt_cache.tokens, prompt_cache.metadata = caches, tokens, info["metadata"]
    return prompt_cache
