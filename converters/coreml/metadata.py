"""Metadata of a saved ``.mlpackage``: author, license, description, version, a description of each
input/output/state, and Core ML user-defined ``{str: str}`` entries. Works on Linux.

The spec protobuf (``Data/com.apple.CoreML/model.mlmodel``, the root item that ``Manifest.json``
names; see :mod:`.package`) holds them in ``description.metadata`` (``author``, ``license``,
``shortDescription``, ``versionString``, ``userDefined``) and in each feature's
``shortDescription``. A multifunction package lists its features per function
(``description.functions[k].input/output/state``); a single-function one at the top level.
:func:`write_metadata` edits them in place (a description applies to every function that has the
feature) and rewrites the spec file atomically; :func:`read_metadata` reads them back.

The exporters (:func:`~.export.export_coreml`, :func:`~.stateful.export_decoder`) take a
``metadata={"author", "license", "description", "version": str, "user": {str: str}}`` argument,
checked by :func:`check_metadata` before anything is converted, and write it on the staged package,
``user`` merged over their own ``mlx_zeta.*`` keys (:func:`exporter_metadata`), before it is moved
into place: a package is never left with half its metadata.

    >>> import mlx.core as mx
    >>> import mlx.nn as nn
    >>> from mlx_zeta.converters.coreml import export_coreml, read_metadata, write_metadata
    >>> path = export_coreml(nn.Linear(4, 2), (mx.zeros((1, 4)),), "tiny.mlpackage", input_names=["x"])
    >>> write_metadata(path, author="me", inputs={"x": "Features (1, 4) float32"},
    ...                user={"mlx_zeta.bos_token_id": "1"})
    >>> read_metadata(path)["user"]["mlx_zeta.bos_token_id"]
    '1'
"""

from typing import Dict, Mapping, Optional

from mlx_zeta.common import atomic_path

from .package import open_package

__all__ = ["write_metadata", "read_metadata", "check_metadata", "exporter_metadata", "describe_features",
           "FIELDS", "METADATA_KEYS"]

FIELDS = {"author": "author", "license": "license", "description": "shortDescription", "version": "versionString"}
FEATURES = {"inputs": "input", "outputs": "output", "states": "state"}  # our key -> the spec's repeated field
METADATA_KEYS = tuple(FIELDS) + ("user",) + tuple(FEATURES)  # accepted in the exporters' metadata=


def _check_map(owner: str, name: str, value) -> Dict[str, str]:
    """``value`` as a ``{str: str}`` dict, or ``ValueError("[owner] expected name to map str to str ...")``."""
    if not isinstance(value, Mapping):
        raise ValueError(f"[{owner}] expected {name} to be a dict of str to str, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"[{owner}] expected {name} to map str to str (write lists and numbers as JSON), "
                             f"got {k!r}: {v!r} ({type(v).__name__})")
    return dict(value)


def check_metadata(owner: str, metadata: Optional[Mapping]) -> dict:
    """The ``metadata=`` argument of the exporter ``owner``, checked: a dict whose keys are among
    :data:`METADATA_KEYS`, ``author``/``license``/``description``/``version`` strings, ``user``
    (and ``inputs``/``outputs``/``states``, feature descriptions) ``{str: str}``. ``None`` gives ``{}``."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"[{owner}] expected metadata to be a dict with keys among {METADATA_KEYS}, "
                         f"got {type(metadata).__name__}")
    unknown = [k for k in metadata if k not in METADATA_KEYS]
    if unknown:
        raise ValueError(f"[{owner}] unknown metadata key {unknown[0]!r}; expected keys among {METADATA_KEYS}")
    out = dict(metadata)
    for key in FIELDS:
        if out.get(key) is not None and not isinstance(out[key], str):
            raise ValueError(f"[{owner}] expected metadata[{key!r}] to be a str, got {out[key]!r}")
    for key in ("user",) + tuple(FEATURES):
        if out.get(key) is not None:
            out[key] = _check_map(owner, f"metadata[{key!r}]", out[key])
    return out


def exporter_metadata(metadata: Mapping, user: Mapping[str, str], *, inputs: Mapping[str, str] = None,
                      outputs: Mapping[str, str] = None, states: Mapping[str, str] = None) -> dict:
    """Keyword arguments of :func:`write_metadata` for an exporter: its own ``user`` keys and feature
    descriptions with the caller's checked ``metadata`` (:func:`check_metadata`) merged over them."""
    out = {key: metadata.get(key) for key in FIELDS}
    out["user"] = {**user, **(metadata.get("user") or {})}
    for key, own in (("inputs", inputs), ("outputs", outputs), ("states", states)):
        out[key] = {**(own or {}), **(metadata.get(key) or {})}
    return out


def _feature_lists(description, kind: str) -> list:
    """The repeated feature fields of ``kind`` (``input``/``output``/``state``): top level, then each function."""
    return [getattr(description, kind)] + [getattr(f, kind) for f in description.functions]


def write_metadata(package_path, *, author: Optional[str] = None, license: Optional[str] = None,
                   description: Optional[str] = None, version: Optional[str] = None,
                   inputs: Optional[Mapping[str, str]] = None, outputs: Optional[Mapping[str, str]] = None,
                   states: Optional[Mapping[str, str]] = None, user: Optional[Mapping[str, str]] = None) -> None:
    """Edit the metadata of the saved package at ``package_path`` in place.

    Args:
        author, license, description, version: the model's fields (``description`` is Core ML's
            ``shortDescription``, ``version`` its ``versionString``); ``None`` leaves one as it is.
        inputs, outputs, states: ``{feature name: description}``, applied to every function that
            has the feature.
        user: ``{str: str}`` Core ML user-defined metadata, added to (or replacing) the entries there.

    Raises:
        ValueError: for a value that is not a str, or a feature the package does not have (nothing is
            written then).
        PackageError: for a package that is not whole.
    """
    owner = "write_metadata"
    fields = {"author": author, "license": license, "description": description, "version": version}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"[{owner}] expected {key} to be a str, got {value!r}")
    features = {key: _check_map(owner, key, value) for key, value in
                (("inputs", inputs), ("outputs", outputs), ("states", states)) if value}
    user = _check_map(owner, "user", user) if user else {}
    package = open_package(package_path, owner)
    spec = package.spec
    meta = spec.description.metadata
    for key, value in fields.items():
        if value is not None:
            setattr(meta, FIELDS[key], value)
    for key, descriptions in features.items():
        seen = set()
        for feats in _feature_lists(spec.description, FEATURES[key]):
            for f in feats:
                if f.name in descriptions:
                    f.shortDescription = descriptions[f.name]
                    seen.add(f.name)
        missing = [n for n in descriptions if n not in seen]
        if missing:
            have = sorted({f.name for feats in _feature_lists(spec.description, FEATURES[key]) for f in feats})
            raise ValueError(f"[{owner}] {package_path}: no {FEATURES[key]} named {missing[0]!r} in the package "
                             f"(its {key}: {have})")
    meta.userDefined.update(user)
    with atomic_path(package.spec_file) as staged:
        staged.write_bytes(spec.SerializeToString())


def read_metadata(package_path) -> dict:
    """The metadata of the saved package at ``package_path``.

    Returns:
        dict: ``"author"``, ``"license"``, ``"description"`` and ``"version"`` map to a str (None where
        unset); ``"inputs"``, ``"outputs"`` and ``"states"`` to ``{feature name: description}`` (``""``
        where unset); ``"user"`` to ``{str: str}``. A feature's description is the first non-empty one
        among the functions that have it.

    Raises:
        PackageError: for a package that is not whole (:func:`~mlx_zeta.converters.coreml.open_package`).
    """
    desc = open_package(package_path, "read_metadata").spec.description
    out = {key: getattr(desc.metadata, field) or None for key, field in FIELDS.items()}
    for key, kind in FEATURES.items():
        found: Dict[str, str] = {}
        for feats in _feature_lists(desc, kind):
            for f in feats:
                if not found.get(f.name):
                    found[f.name] = f.shortDescription
        out[key] = found
    out["user"] = dict(desc.metadata.userDefined)
    return out


def _enum(message, field: str) -> str:
    """The name of the enum value in ``message.field`` (e.g. ``FLOAT32``)."""
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(message, field)].name


def _type_text(feature_type) -> str:
    """e.g. ``float32 (1, 8)``, ``int32 (1, 1)``, ``fp16 state (1, 2, 32, 8)``, ``image RGB 224x224``."""
    kind = feature_type.WhichOneof("Type")
    if kind == "multiArrayType":
        arr = feature_type.multiArrayType
        return f"{_enum(arr, 'dataType').lower()} {tuple(arr.shape)}"
    if kind == "stateType":
        arr = feature_type.stateType.arrayType
        return f"{_enum(arr, 'dataType').lower()} state {tuple(arr.shape)}"
    if kind == "imageType":
        img = feature_type.imageType
        return f"image {_enum(img, 'colorSpace')} {img.width}x{img.height}"
    return str(kind)


def describe_features(package_path) -> dict:
    """``{"inputs", "outputs", "states": {name: its type and shape as text}}`` of a saved package:
    the descriptions :func:`~.export.export_coreml` writes when the caller gives none."""
    desc = open_package(package_path, "describe_features").spec.description
    return {key: {f.name: _type_text(f.type) for feats in _feature_lists(desc, kind) for f in feats}
            for key, kind in FEATURES.items()}
