"""What a Core ML package (or Core AI bundle) records of its source checkpoint, and the tokenizer files
that travel beside it.

A package holds the network only; an app also needs the checkpoint's tokenizer and its special
token ids. ``mlx-zeta export-coreml`` (and ``export-coreai``) writes them as user-defined metadata
(:func:`source_metadata`) and, with ``--copy-tokenizer``, copies the tokenizer files byte for byte into a
folder beside the package (:func:`tokenizer_folder`: ``model.mlpackage`` -> ``model.tokenizer/``;
:func:`copy_tokenizer`). ``owner`` (default ``export-coreml``) is the command their errors name.

Special token ids (:func:`special_token_ids`) come from, in this order, ``generation_config.json``,
``config.json`` and the tokenizer's own special tokens (``tokenizer_config.json``, else
``special_tokens_map.json``, their text looked up in ``tokenizer_config.json``'s
``added_tokens_decoder``, then ``tokenizer.json``'s added tokens and vocabulary): bos and pad are the
first id found, eos the ids of all three merged in that order (as :mod:`mlx_zeta.lm.generate`'s
``generation_defaults`` merges them; ``lm`` sits above ``converters``, so the files are read here,
minimally, with :func:`~mlx_zeta.common.read_json_object`). Only JSON integers count as ids.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from mlx_zeta.common import atomic_path, read_json_object

from ..pretrained import AUXILIARY_FILES, AUXILIARY_FOLDERS, TOKENIZER_FILES, tokenizer_files

__all__ = ["special_token_ids", "travelling_files", "tokenizer_folder", "copy_tokenizer", "source_metadata",
           "TOKENIZER_SUFFIX"]

TOKENIZER_SUFFIX = ".tokenizer"  # model.mlpackage -> model.tokenizer/
_OWNER = "export-coreml"


def _json(folder: Path, name: str, owner: str = _OWNER) -> Dict[str, Any]:
    """The JSON object in ``folder/name``, ``{}`` when the file is absent (``owner`` names the command in errors)."""
    path = folder / name
    return read_json_object(path, owner) if path.is_file() else {}


def _ids(value: Any) -> List[int]:
    """The integer ids of a JSON id field (an int, a list of ints, or anything else: none)."""
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, int) and not isinstance(v, bool)]


def _token_text(value: Any) -> Optional[str]:
    """A special token as text: a string, or an AddedToken dict's ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_ids(folder: Path, owner: str) -> Dict[str, List[int]]:
    """``{"bos": [...], "eos": [...], "pad": [...]}``: the ids of the tokenizer's own special tokens."""
    config = _json(folder, "tokenizer_config.json", owner)
    special_map = _json(folder, "special_tokens_map.json", owner)
    texts = {k: _token_text(config.get(f"{k}_token", special_map.get(f"{k}_token"))) for k in ("bos", "eos", "pad")}
    if not any(texts.values()):
        return {k: [] for k in texts}
    table: Dict[str, int] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit():
            table.setdefault(entry["content"], int(key))
    backend = _json(folder, "tokenizer.json", owner)
    for entry in backend.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and _ids(entry.get("id")):
            table.setdefault(entry["content"], entry["id"])
    vocab = (backend.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for text, i in vocab.items():
            table.setdefault(text, i)
    return {k: _ids(table.get(text)) if text is not None else [] for k, text in texts.items()}


def special_token_ids(folder: Path, config: Mapping[str, Any], owner: str = _OWNER) -> Dict[str, Any]:
    """``{"bos_token_id": int | None, "eos_token_ids": [int, ...], "pad_token_id": int | None}`` of the
    checkpoint ``folder`` whose ``config.json`` is ``config`` (module docstring: where each comes from);
    ``owner``: the command named in the error about a malformed file."""
    sources = [_json(Path(folder), "generation_config.json", owner), dict(config)]
    tok = _tokenizer_ids(Path(folder), owner)

    def found(key: str) -> List[int]:
        return [i for s in sources for i in _ids(s.get(f"{key}_token_id"))] + tok[key]

    bos, pad = found("bos"), found("pad")
    return {"bos_token_id": bos[0] if bos else None, "eos_token_ids": list(dict.fromkeys(found("eos"))),
            "pad_token_id": pad[0] if pad else None}


def travelling_files(folder: Path) -> List[str]:
    """Names of the files (and folders) that travel with a model, present in ``folder``: the tokenizer,
    chat-template, generation and pre-processing files of
    :data:`~mlx_zeta.converters.pretrained.AUXILIARY_FILES` / ``AUXILIARY_FOLDERS``."""
    folder = Path(folder)
    return [n for n in AUXILIARY_FILES if (folder / n).is_file()] + \
        [n for n in AUXILIARY_FOLDERS if (folder / n).is_dir()]


def tokenizer_folder(package: Path) -> Path:
    """Where ``--copy-tokenizer`` puts the tokenizer of ``package``: ``model.mlpackage`` (or ``model.aimodel``)
    -> ``model.tokenizer``."""
    package = Path(package)
    return package.with_name(package.stem + TOKENIZER_SUFFIX)


@contextmanager
def copy_tokenizer(folder: Path, package: Path, owner: str = _OWNER) -> Iterator[List[str]]:
    """Copy :func:`travelling_files` of checkpoint ``folder`` byte for byte into a staged
    :func:`tokenizer_folder` of ``package``; yields their names; the folder is moved into place (replacing
    an existing one) when the block returns, and nothing is left of it when the block raises (so an
    export inside the block that fails leaves no tokenizer folder either).

    Raises:
        ValueError: ``folder`` holds no tokenizer file (none of
            :data:`~mlx_zeta.converters.pretrained.TOKENIZER_FILES`), named as ``owner``'s error.
    """
    folder = Path(folder)
    if not tokenizer_files(folder):
        raise ValueError(f"[{owner}] --copy-tokenizer: {folder} has no tokenizer files (expected one of "
                         f"{', '.join(TOKENIZER_FILES)})")
    names = travelling_files(folder)
    with atomic_path(tokenizer_folder(package), folder=True) as staged:
        for name in names:
            if (folder / name).is_dir():
                shutil.copytree(folder / name, staged / name)
            else:
                shutil.copyfile(folder / name, staged / name)
        yield names


def source_metadata(src: str, model_type: str, folder: Path, config: Mapping[str, Any],
                    files: List[str], owner: str = _OWNER) -> Dict[str, str]:
    """The user-defined metadata keys the CLI writes about the source (JSON-encoded strings):
    ``mlx_zeta.source`` (``src`` as given), ``mlx_zeta.model_type``, ``mlx_zeta.bos_token_id``,
    ``mlx_zeta.eos_token_ids`` (a list), ``mlx_zeta.pad_token_id`` (an int or null) and
    ``mlx_zeta.tokenizer_files`` (``files``: the names copied beside the package, or present in the source);
    ``owner``: the command named in errors."""
    ids = special_token_ids(folder, config, owner)
    return {"mlx_zeta.source": str(src), "mlx_zeta.model_type": str(model_type),
            "mlx_zeta.bos_token_id": json.dumps(ids["bos_token_id"]),
            "mlx_zeta.eos_token_ids": json.dumps(ids["eos_token_ids"]),
            "mlx_zeta.pad_token_id": json.dumps(ids["pad_token_id"]),
            "mlx_zeta.tokenizer_files": json.dumps(list(files))}
