"""Hugging Face checkpoints to mlx_zeta models and back: ``from_pretrained``, ``save_pretrained``.

Each architecture is one module of this package (or one added at run time with
:func:`register_architecture`), found through :data:`ARCHITECTURES` by the checkpoint's
``model_type``. The model classes live in :mod:`mlx_zeta.models` (or are structs); a
converter module maps a checkpoint onto them and provides

- ``ModelArgs``: a :class:`BaseModelArgs` dataclass read from ``config.json``
  (:meth:`BaseModelArgs.from_dict` ignores keys it does not name);
- ``build(args) -> nn.Module``: the model, made of mlx_zeta blocks and structs;
- ``sanitize(weights, args) -> dict``: Hugging Face parameter names and layouts to
  the model's. It is pure (a new dict, the input untouched) and idempotent: names that
  are already the model's pass through, so a checkpoint written by :func:`save_pretrained`
  (the model's own names) loads through the same path;
- ``TASK`` (optional): what the model does, one of :data:`TASKS`
  (``"causal-lm"``, ``"seq2seq"``, ``"encoder"``, ``"vision"``); ``mlx-zeta export-coreml``
  picks its export from it;
- ``to_hf(weights, args) -> dict`` (optional): the inverse of ``sanitize``, the model's names and
  layouts back to the Hugging Face checkpoint's (pure; ``sanitize(to_hf(w, args), args) == w``
  exactly). :func:`save_pretrained` with ``format="hf"`` needs it and refuses an architecture
  without it;
- ``hf_config(config, args) -> dict`` (optional, with ``to_hf``): the ``config.json`` that
  transformers reads for the exported weights (e.g. ``architectures`` set), from the original
  ``config`` without our keys. Default: that ``config`` as it is.

Adding a Llama-like architecture is one such module plus one line in :data:`ARCHITECTURES`
(or a :func:`register_architecture` call). Helpers the modules share live in :mod:`.base`; the
types of ``config.json`` fields are checked from ``ModelArgs``' annotations (:mod:`.fields`), and
layers swapped after ``build`` are recorded and rebuilt by :mod:`.swaps`.

The model returned by :func:`from_pretrained` carries a :class:`PretrainedInfo` as
``model.pretrained`` (the ``model_type``, the original ``config.json`` and the source
folder), which :func:`save_pretrained` writes back.

Two formats are written. ``format="mlx_zeta"`` (the default): the model's own names and
layouts (packed, quantized), read back with no conversion; its ``config.json`` says
``"model_type": "mlx_zeta"`` (:data:`MARKER`) and keeps the architecture in
``"mlx_zeta_model_type"`` (:data:`ORIGINAL_TYPE_KEY`), so transformers refuses the folder ("model
type `mlx_zeta` but Transformers does not recognize this architecture") instead of loading random
weights for names it does not know. :func:`from_pretrained` reads the marked form and the plain one
(folders written before the marker; Hugging Face checkpoints); ``model.pretrained.model_type`` and
``.config["model_type"]`` are always the architecture's. ``format="hf"``: the Hugging Face
checkpoint that transformers loads (``to_hf``, ``hf_config``), every swapped layer (:mod:`.swaps`)
as the float layer the converter builds.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Dict, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_zeta.training.adapters import adapted_layers

from .base import ACTIVATIONS, BaseModelArgs, TransformerArgs, activation
from .fields import ConfigError, shown
from .io import CONFIG, resolve_dtype, check_keys, load_state_dict, materialize, save_state_dict
from .swaps import QUANTIZATION_KEY, TERNARY_KEY, dense_parameters, quantize, rebuild, record

__all__ = ["ACTIVATIONS", "activation", "ARCHITECTURES", "TASKS", "FORMATS", "MARKER", "ORIGINAL_TYPE_KEY",
           "BaseModelArgs", "TransformerArgs", "PretrainedInfo", "from_pretrained", "save_pretrained", "resolve",
           "get_architecture", "register_architecture",
           "unregister_architecture", "task_of", "quantize", "unmarked", "tokenizer_files", "ConfigError",
           "AUXILIARY_FILES", "AUXILIARY_FOLDERS", "TOKENIZER_FILES"]

# model_type -> the module that converts it (a module of this package, or one added by
# :func:`register_architecture`). Read-only view; it follows registrations.
_REGISTRY: Dict[str, Union[str, ModuleType]] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "vit": "vit",
    "t5": "t5",
    "bitnet": "bitnet",
}
#: ``model_type -> converter module`` (its name in this package, or a module added by
#: :func:`register_architecture`): a read-only view that follows registrations.
ARCHITECTURES: Mapping[str, Union[str, ModuleType]] = MappingProxyType(_REGISTRY)
_BUILT_IN = dict(_REGISTRY)

#: What a model does, declared as ``TASK`` by its converter module; the CLI picks its path from it.
TASKS = ("causal-lm", "seq2seq", "encoder", "vision")
_PROTOCOL = ("ModelArgs", "build", "sanitize")

# What save_pretrained writes: our own layout (marked) or the Hugging Face checkpoint.
FORMATS = ("mlx_zeta", "hf")
# config.json's model_type in our format (no transformers architecture), and the key keeping the real one.
MARKER = "mlx_zeta"
ORIGINAL_TYPE_KEY = "mlx_zeta_model_type"
# Keys of our config.json that a Hugging Face checkpoint does not have.
_OUR_KEYS = (QUANTIZATION_KEY, TERNARY_KEY, ORIGINAL_TYPE_KEY)

# Files besides the weights that travel with a converted model, copied byte for byte: the
# tokenizer, special-token and chat-template files transformers' tokenizers and processors read
# (tokenization_utils_base, processing_utils and utils/hub in transformers 5), and the
# generation and pre-processing settings.
AUXILIARY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "sentencepiece.model", "spm.model", "tekken.json", "tiktoken.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
# Folders of such files copied whole: further named chat templates (``<name>.jinja``) beside the default one.
AUXILIARY_FOLDERS = ("additional_chat_templates",)
# The auxiliary files that are a tokenizer (a folder with none of them has no tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model", "spm.model",
                   "tekken.json", "tiktoken.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.jinja"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
    """What :func:`from_pretrained` knew: ``model_type``, the ``config.json`` dict (``unmarked``: its
    ``model_type`` is the architecture's, also for a folder in our format), the source folder."""

    model_type: str
    config: Mapping[str, Any]
    source: Optional[Path] = None

    @property
    def tokenizer(self) -> tuple:
        """The tokenizer files of the source folder (empty when it has none, or there is no source)."""
        return tokenizer_files(self.source) if self.source is not None else ()


def tokenizer_files(folder: str | os.PathLike) -> tuple:
    """The names of :data:`TOKENIZER_FILES` present in ``folder`` (empty: the folder has no tokenizer)."""
    return tuple(name for name in TOKENIZER_FILES if (Path(folder) / name).is_file())


def get_architecture(model_type: Any) -> ModuleType:
    """The converter module for ``model_type``; a ``ValueError`` lists the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"[from_pretrained] unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    module = ARCHITECTURES[model_type]
    if isinstance(module, ModuleType):
        return module
    return importlib.import_module(f"{__package__}.{module}")  # a built-in: registrations hold modules


def _check_module(module: ModuleType) -> None:
    missing = [name for name in _PROTOCOL if not hasattr(module, name)]
    if missing:
        raise ValueError(f"[register_architecture] expected module {module.__name__} to define "
                         f"{', '.join(_PROTOCOL)}, got one without {', '.join(missing)}")
    task = getattr(module, "TASK", None)
    if task is not None and task not in TASKS:
        raise ValueError(f"[register_architecture] expected {module.__name__}.TASK in {TASKS} (or none), "
                         f"got {task!r}")


def register_architecture(model_type: str, module: Union[str, ModuleType], *, replace: bool = False) -> None:
    """Convert checkpoints whose ``config.json`` says ``model_type`` with ``module``.

    ``module`` (a module, or its dotted import path) defines ``ModelArgs`` (with ``from_dict``),
    ``build(args)`` and ``sanitize(weights, args)`` as this package's converters do, and may
    declare ``TASK`` (one of :data:`TASKS`) so that ``mlx-zeta export-coreml`` knows what the
    model does. It is imported and checked now; :data:`ARCHITECTURES` lists it from then on.

    Args:
        model_type: the ``model_type`` key of the checkpoints.
        module: the converter module or its dotted path (e.g. ``"my_package.my_arch"``).
        replace: allow replacing an already registered ``model_type`` (built-ins included).

    Example:
        A converter module of your own is registered the same way; here the built-in Llama
        converter also takes a made-up ``model_type``:

        >>> from mlx_zeta.converters import ARCHITECTURES, register_architecture, unregister_architecture
        >>> register_architecture("my_llama", "mlx_zeta.converters.llama")
        >>> ARCHITECTURES["my_llama"].__name__
        'mlx_zeta.converters.llama'
        >>> unregister_architecture("my_llama")
        >>> "my_llama" in ARCHITECTURES
        False
    """
    if not isinstance(model_type, str) or not model_type or model_type == MARKER:
        raise ValueError(f"[register_architecture] expected model_type to be a non-empty str other than "
                         f"{MARKER!r} (our format's marker), got {model_type!r}")
    if model_type in _REGISTRY and not replace:
        raise ValueError(f"[register_architecture] model_type {model_type!r} is already registered "
                         f"({_REGISTRY[model_type]}); pass replace=True to replace it")
    loaded = importlib.import_module(module) if isinstance(module, str) else module
    if not isinstance(loaded, ModuleType):
        raise ValueError(f"[register_architecture] expected a module or a dotted module path, got "
                         f"{type(module).__name__}")
    _check_module(loaded)
    _REGISTRY[model_type] = loaded


def unregister_architecture(model_type: str) -> None:
    """Undo :func:`register_architecture`: a built-in ``model_type`` gets its own converter back,
    any other is removed (``ValueError`` if it is not registered)."""
    if model_type not in _REGISTRY:
        raise ValueError(f"[unregister_architecture] model_type {model_type!r} is not registered")
    if model_type in _BUILT_IN:
        _REGISTRY[model_type] = _BUILT_IN[model_type]
    else:
        del _REGISTRY[model_type]


def task_of(model: nn.Module) -> Optional[str]:
    """The ``TASK`` declared by the converter of a model from :func:`from_pretrained` (None if it
    declares none, or the model did not come from :func:`from_pretrained`)."""
    info = getattr(model, "pretrained", None)
    if not isinstance(info, PretrainedInfo):
        return None
    return getattr(get_architecture(info.model_type), "TASK", None)


def resolve(path_or_repo_id: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A local folder as it is, or a Hub repo id through ``huggingface_hub.snapshot_download``
    (its cache and ``HF_HUB_OFFLINE`` honoured). Errors name what was looked for."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"[from_pretrained] expected a model folder (with {CONFIG}) or a Hub repo id, "
                         f"got the file {path}")
    name = str(path_or_repo_id)
    if not _REPO_ID.match(name):
        raise ValueError(f"[from_pretrained] {name!r} is neither an existing folder nor a Hub repo id "
                         "('owner/name')")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"[from_pretrained] {name!r} is no local folder and not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}) and offline mode is on (HF_HUB_OFFLINE=1): download "
                             f"it on a connected machine (`hf download {name}`) or pass a local folder") from e
        raise ValueError(f"[from_pretrained] {name!r} is no local folder and not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}), and the Hub could not be reached: {e}") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"[from_pretrained] no Hub repository {name!r} (or it is private): {e}") from e
    except HfHubHTTPError as e:
        raise ValueError(f"[from_pretrained] downloading {name!r} failed: {e}") from e


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise ValueError(f"[from_pretrained] no {CONFIG} in {folder}: expected a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"[from_pretrained] {path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got {shown(config)}")
    return unmarked(config, str(path))


def unmarked(config: Mapping[str, Any], source: str = CONFIG) -> dict:
    """``config`` with the architecture's own ``model_type``: our format's marked form
    (``"model_type": "mlx_zeta"``, the type in ``"mlx_zeta_model_type"``) undone, a plain one as it is.
    A ``ConfigError`` naming ``source`` when no model_type string is found."""
    config = dict(config)
    if config.get("model_type") == MARKER:
        original = config.pop(ORIGINAL_TYPE_KEY, None)
        if not isinstance(original, str) or original == MARKER:
            found = shown(original) if original is not None else "none"
            raise ConfigError(f"{source}: model_type {MARKER!r} (an mlx_zeta folder) expected field "
                              f"{ORIGINAL_TYPE_KEY!r} to name the architecture, got {found}")
        config["model_type"] = original
    if not isinstance(config.get("model_type"), str):
        found = shown(config["model_type"]) if "model_type" in config else "none"
        raise ConfigError(f"{source}: expected field 'model_type' to be a string naming the architecture (one of "
                          f"{', '.join(sorted(ARCHITECTURES))}), got {found}")
    return config


def _args(arch: ModuleType, config: Mapping[str, Any], source: Path) -> Any:
    """``arch.ModelArgs`` from ``config``; errors name the file (``source``) for our own ModelArgs."""
    if isinstance(arch.ModelArgs, type) and issubclass(arch.ModelArgs, BaseModelArgs):
        return arch.ModelArgs.from_dict(config, source=str(source))
    return arch.ModelArgs.from_dict(config)


def from_pretrained(path_or_repo_id: str | os.PathLike, dtype: str | mx.Dtype | None = None, *,
                    revision: Optional[str] = None, progress: bool = False, allow_nonfinite: bool = False) -> nn.Module:
    """Load a Hugging Face checkpoint (or one written by :func:`save_pretrained`) as an mlx_zeta model.

    Args:
        path_or_repo_id: a local folder with ``config.json`` and weights, or a Hub repo id.
        dtype: cast floating weights to ``"float32"``, ``"float16"``, ``"bfloat16"`` (or an mx
            dtype); packed integer weights stay as they are. Default: the checkpoint's dtypes.
        revision: Hub revision (branch, tag or commit) for a repo id.
        progress: show a progress bar while the weights are read.
        allow_nonfinite: load weights holding NaN or Inf with a warning instead of refusing them.

    Returns:
        The model in eval mode, with ``model.pretrained`` (:class:`PretrainedInfo`; its
        ``tokenizer`` lists the source's tokenizer files, empty when it has none).

    Raises:
        ValueError: unknown ``model_type`` (the supported ones listed), a config field of the
            wrong type (``ConfigError`` naming ``config.json``, the field, the expected type and
            the value), missing or unexpected parameters (by name), shape mismatches (the key and
            both shapes), unreadable files or NaN/Inf weights (``CheckpointFormatError`` naming the
            file and tensor), a repo id not cached while offline.

    Example:
        A tiny Llama saved by ``transformers`` (random weights) stands in for a real checkpoint:

        >>> import mlx.core as mx
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from mlx_zeta.converters import from_pretrained
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> LlamaForCausalLM(config).save_pretrained("tiny-llama")
        >>> model = from_pretrained("tiny-llama", dtype="float32")
        >>> model(mx.array([[1, 2, 3]])).shape
        (1, 3, 64)
    """
    folder = resolve(path_or_repo_id, revision)
    config = _read_config(folder)
    arch = get_architecture(config["model_type"])
    args = _args(arch, config, folder / CONFIG)
    model = arch.build(args)
    rebuild(model, config, str(folder / CONFIG))
    weights = arch.sanitize(load_state_dict(folder, dtype=dtype, allow_nonfinite=allow_nonfinite), args)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_keys(expected, weights, where=f"{folder} ({config['model_type']})")
    items = list(weights.items())
    if progress:
        from tqdm import tqdm

        for _, value in tqdm(items, desc=f"loading {folder.name}", unit="tensor"):
            mx.eval(value)
    model.load_weights(items)
    materialize(model)  # private buffers too: the model may run on another thread
    model.eval()
    model.pretrained = PretrainedInfo(config["model_type"], MappingProxyType(config), folder)
    return model


def _auxiliary(source: Optional[Path], path: Path) -> Dict[str, Path]:
    """``{name: source file or folder}`` of the :data:`AUXILIARY_FILES` and :data:`AUXILIARY_FOLDERS`
    to copy; JSON files must parse."""
    if source is None or Path(source).resolve() == path.resolve():
        return {}
    found = {name: Path(source) / name for name in AUXILIARY_FILES if (Path(source) / name).is_file()}
    found.update({name: Path(source) / name for name in AUXILIARY_FOLDERS if (Path(source) / name).is_dir()})
    for name, file in found.items():
        if name.endswith(".json"):
            try:
                json.loads(file.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"[save_pretrained] {file} is not valid JSON ({e}); fix or remove it") from e
    return found


def save_pretrained(model: nn.Module, path: str | os.PathLike, dtype: str | mx.Dtype | None = None, *,
                    format: str = "mlx_zeta", max_shard_bytes: int = 5 * 2**30,
                    config: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` as ``config.json`` plus (sharded) safetensors.

    ``format="mlx_zeta"`` (default): the parameters under the model's own names, which
    :func:`from_pretrained` loads with no conversion; layers swapped after the converter built the
    model (MLX quantization, ``quantize_model`` / ``freeze_model``) are recorded in ``config.json``
    (:mod:`.swaps`) so that it rebuilds them, and ``config.json`` is marked (``"model_type":
    "mlx_zeta"``, the architecture in ``"mlx_zeta_model_type"``) so that transformers refuses it.

    ``format="hf"``: the Hugging Face checkpoint of the architecture, which transformers'
    ``from_pretrained`` loads: the weights through the converter's ``to_hf``, ``config.json``
    through its ``hf_config`` (our keys removed, ``dtype`` the weights'), MLX affine-quantized
    layers de-quantized (``mx.dequantize``) and ternary swaps written as their dense float weight
    (:func:`.swaps.dense_parameters`: their int8 activation quantization is not kept). An
    architecture without ``to_hf`` is refused.

    Tokenizer and generation files of the source folder are copied beside them (a JSON one that
    does not parse is refused). Nothing half-written is left: weights, those files and
    ``config.json`` go through :func:`save_state_dict`'s temporary folder together, and every
    refusal comes before anything is written.

    Args:
        model: a model from :func:`from_pretrained` (or any model, with ``config``).
        path: destination folder.
        dtype: cast floating weights before writing.
        format: ``"mlx_zeta"`` or ``"hf"`` (``FORMATS``).
        max_shard_bytes: shard size limit (an index file is written for more than one shard).
        config: the ``config.json`` dict for a model that has no ``model.pretrained``.
    """
    if format not in FORMATS:
        raise ValueError(f"[save_pretrained] expected format in {FORMATS}, got {format!r}")
    adapted = [p for p, _ in adapted_layers(model)]
    if adapted:
        raise ValueError(f"[save_pretrained] the model has adapters ({adapted[0]} and {len(adapted) - 1} more): "
                         "fold them in first (mlx_zeta.training.fuse_adapters) or save them alone (save_adapters)")
    info = getattr(model, "pretrained", None)
    if config is None:
        if not isinstance(info, PretrainedInfo):
            raise ValueError(f"[save_pretrained] {type(model).__name__} has no model.pretrained (it did not come "
                             "from from_pretrained): pass config= with its model_type")
        config = info.config
    if not isinstance(config, Mapping):
        raise ValueError(f"[save_pretrained] expected config to be a dict of config.json fields, got "
                         f"{type(config).__name__}")
    if "model_type" not in config:
        raise ValueError("[save_pretrained] expected config to name its model_type")
    config = {k: v for k, v in unmarked(config, "[save_pretrained] config").items() if k not in _OUR_KEYS}
    arch = get_architecture(config["model_type"])
    args = _args(arch, config, Path(CONFIG))
    if format == "hf":
        weights, config = _hf_checkpoint(model, arch, args, config)
    else:
        config = {"model_type": MARKER, ORIGINAL_TYPE_KEY: config["model_type"],
                  **{k: v for k, v in config.items() if k != "model_type"},
                  **record(model, arch.build(args), config["model_type"])}
        weights = dict(tree_flatten(model.parameters()))
    dt = resolve_dtype(dtype)
    weights = {k: v.astype(dt) if dt is not None and mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}
    if format == "hf":
        config = {**{k: v for k, v in config.items() if k != "torch_dtype"}, "dtype": _dtype_name(weights)}
    path = Path(path)
    source = info.source if isinstance(info, PretrainedInfo) else None
    save_state_dict(weights, path, max_shard_bytes=max_shard_bytes, config=config, files=_auxiliary(source, path))
    return path


def _hf_checkpoint(model: nn.Module, arch: ModuleType, args: Any, config: dict) -> tuple:
    """``(weights, config)`` of the Hugging Face checkpoint of ``model`` (``format="hf"``)."""
    model_type = config["model_type"]
    if not callable(getattr(arch, "to_hf", None)):
        raise ValueError(f'[save_pretrained] format="hf" is not supported for model_type {model_type} '
                         f"(its converter {arch.__name__} has no to_hf)")
    dense = dense_parameters(model, arch.build(args), model_type)
    hf_config = getattr(arch, "hf_config", None)
    return arch.to_hf(dense, args), (hf_config(dict(config), args) if callable(hf_config) else config)


def _dtype_name(weights: Mapping[str, mx.array]) -> Optional[str]:
    """The floating dtype holding most of ``weights``' elements, as transformers names it (None: none)."""
    sizes: Dict[str, int] = {}
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            name = str(v.dtype).rsplit(".", 1)[-1]
            sizes[name] = sizes.get(name, 0) + v.size
    return max(sizes, key=sizes.get) if sizes else None
