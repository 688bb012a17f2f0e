"""Reading a saved ``.mlpackage``: the one place that checks a package is whole.

An ML Program package is a folder::

    model.mlpackage/
        Manifest.json                         names the root item (the model spec)
        Data/com.apple.CoreML/model.mlmodel   the spec: a CoreML.Specification.Model protobuf
        Data/com.apple.CoreML/weights/weight.bin

``weight.bin`` (MIL blob storage, version 2) starts with a 64-byte header (blob count, version)
and holds one 64-byte metadata record per blob (the marker ``0xDEADBEEF``, the data type, the
data's size and offset) followed by the data. The spec's constants point at those records by
offset (``BlobFileValue``). :func:`open_package` checks the folder layout, the manifest, the
spec and every blob the spec references (header inside the file and sane, data inside the file)
and raises one :class:`PackageError` naming the package, the file and what is wrong; every
reader (:func:`~.evaluate.evaluate`, :class:`~.evaluate.Evaluator`, :func:`~.lint.lint`,
:func:`package_summary`) opens packages through it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from .runtime import import_coremltools

__all__ = ["open_package", "package_summary", "Package", "PackageError"]

_HEADER = 64  # bytes of the storage header and of each blob's metadata record
_MARKER = 0xDEADBEEF
_MODEL_PATH = "@model_path/"


class PackageError(ValueError):
    """A saved ``.mlpackage`` that is not whole; the message names the package and the file at fault."""


@dataclass(frozen=True)
class Package:
    """A checked package: its ``path``, the parsed ``spec`` protobuf, its ``weights_dir`` and the
    ``spec_file`` the spec was read from."""

    path: Path
    spec: Any
    weights_dir: str
    spec_file: Path


def _manifest_root(path: Path, fail) -> Path:
    """The spec file that ``Manifest.json`` names as the root item."""
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        fail("has no Manifest.json (an .mlpackage is a folder with Manifest.json and Data/)")
    try:
        data = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"Manifest.json is not valid JSON ({e})")
    entries = data.get("itemInfoEntries") if isinstance(data, dict) else None
    root = data.get("rootModelIdentifier") if isinstance(data, dict) else None
    item = entries.get(root) if isinstance(entries, dict) and isinstance(root, str) else None
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        fail("Manifest.json names no root model (expected rootModelIdentifier to be a key of itemInfoEntries "
             "with a path)")
    return path / "Data" / item["path"]


def _parse_spec(spec_file: Path, where: str, fail):
    from google.protobuf.message import DecodeError

    proto = import_coremltools().proto.Model_pb2
    if not spec_file.is_file():
        fail(f"{where} is missing (Manifest.json names it as the model spec)")
    spec = proto.Model()
    try:
        spec.ParseFromString(spec_file.read_bytes())
    except DecodeError as e:
        fail(f"{where} is not a Core ML model spec ({e})")
    if spec.WhichOneof("Type") is None or spec.specificationVersion < 1:
        fail(f"{where} is not a Core ML model spec (it parses but holds no model; garbled?)")
    return spec


def _blob_refs(message) -> Iterator[Tuple[str, int]]:
    """``(fileName, offset)`` of every ``BlobFileValue`` anywhere in a protobuf message."""
    from google.protobuf.message import Message

    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if isinstance(value, Message):
            items = [value]
        else:
            items = list(value.values()) if hasattr(value, "values") else list(value)
        for item in items:
            if not isinstance(item, Message):
                continue
            if item.DESCRIPTOR.name == "BlobFileValue":
                yield item.fileName, int(item.offset)
            else:
                yield from _blob_refs(item)


def _check_blobs(weights: Path, where: str, offsets: List[int], fail) -> None:
    """Each blob's metadata record and data lie inside ``weights`` and the record is sane."""
    if not weights.is_file():
        fail(f"{where} is missing (the spec references {len(offsets)} blob(s) in it)")
    size = weights.stat().st_size
    if size < _HEADER:
        fail(f"{where} is truncated: its storage header needs {_HEADER} bytes, the file has {size}")
    with open(weights, "rb") as f:
        for offset in sorted(set(offsets)):
            if offset < _HEADER:
                fail(f"the spec references a blob at offset {offset} of {where}, inside its {_HEADER}-byte header")
            if offset + _HEADER > size:
                fail(f"{where} is truncated: blob header at offset {offset} needs {_HEADER} bytes, "
                     f"the file has {size}")
            f.seek(offset)
            marker, _, nbytes, data = struct.unpack("<IIQQ", f.read(24))
            if marker != _MARKER:
                fail(f"{where} has a garbled blob header at offset {offset} (expected the marker 0x{_MARKER:X}, "
                     f"found 0x{marker:X})")
            if data < offset + _HEADER:
                fail(f"{where} has a garbled blob header at offset {offset} (its data offset {data} points "
                     f"into the header)")
            if data + nbytes > size:
                fail(f"{where} is truncated: blob at offset {data} needs {nbytes} bytes, the file has {size}")


def open_package(path, owner: str = "open_package") -> Package:
    """Check that ``path`` is a whole ``.mlpackage`` and return it parsed.

    Args:
        path (str or os.PathLike): the package folder.
        owner (str): the public function on whose behalf the package is read, for the message.

    Raises:
        FileNotFoundError: nothing at ``path``.
        PackageError: ``path`` is not a folder, lacks or has a broken ``Manifest.json``, its spec
            is missing or not a model, or a weight file the spec references is missing, truncated
            or holds a garbled blob header. One line naming the package and the file.
    """
    path = Path(path)

    def fail(what: str):
        raise PackageError(f"[{owner}] {path}: {what}")

    if not path.exists():
        raise FileNotFoundError(f"[{owner}] {path}: no such Core ML package")
    if not path.is_dir():
        fail("is not a folder (an .mlpackage is a folder with Manifest.json and Data/)")
    spec_file = _manifest_root(path, fail)
    spec = _parse_spec(spec_file, os.path.relpath(spec_file, path), fail)
    model_dir = spec_file.parent
    refs: Dict[str, List[int]] = {}
    if spec.WhichOneof("Type") == "mlProgram":
        for name, offset in _blob_refs(spec.mlProgram):
            refs.setdefault(name, []).append(offset)
    for name, offsets in refs.items():
        if not name.startswith(_MODEL_PATH):
            fail(f"the spec references blobs in {name!r}, outside the package")
        weights = model_dir / name[len(_MODEL_PATH):]
        _check_blobs(weights, os.path.relpath(weights, path), offsets, fail)
    return Package(path, spec, str(model_dir / "weights"), spec_file)


def package_summary(path) -> dict:
    """``{"functions": {name: {"inputs": {n: shape}, "outputs": [...]}}, "states": {n: shape}, "bytes": n}``
    of a saved ``.mlpackage`` (read from its spec; works on Linux). Raises :class:`PackageError` for
    a package that is not whole (:func:`open_package`)."""
    desc = open_package(path, "package_summary").spec.description
    funcs = list(desc.functions) or [desc]
    out: dict = {"functions": {}, "states": {}}
    for f in funcs:
        name = getattr(f, "name", "") or "main"
        out["functions"][name] = {"inputs": {i.name: tuple(i.type.multiArrayType.shape) for i in f.input},
                                  "outputs": [o.name for o in f.output]}
        for s in f.state:
            out["states"][s.name] = tuple(s.type.stateType.arrayType.shape)
    out["bytes"] = int(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
    return out
