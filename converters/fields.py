"""The one home of config.json type checking: each ``ModelArgs`` field's annotation is its rule.

:class:`~mlx_zeta.converters.base.BaseModelArgs` asks :func:`check_fields` before any converter
reads a value, so every architecture gets the same rules from its dataclass annotations:

==============================  ==========================================================
annotation                      accepted JSON values
==============================  ==========================================================
``bool``                        ``true`` / ``false`` only (never ``"false"``, ``0`` or ``1``)
``int``                         integers only: not ``true``, not ``2.5`` and not ``2.0``
                                (transformers writes counts without a fraction; a ``2.0``
                                is a hand edit that would fail later, e.g. in ``range``)
``float``                       finite numbers, integers included (``1``), not booleans,
                                strings (``"1e-6"``), ``NaN`` or ``Infinity``
``str``                         strings
``Optional[X]``                 ``null`` or what ``X`` accepts
``List[X]`` / ``Sequence[X]``   arrays whose every item ``X`` accepts
``Dict[str, X]`` / ``Mapping``  objects whose every value ``X`` accepts
``Union[A, B]``                 what any arm accepts; ``Any``: everything
==============================  ==========================================================

Fields a dataclass lists in its class attribute ``POSITIVE`` (sizes, counts) must also be >= 1.
A value is refused with one line naming the file, the field, the expected type and what was
given, e.g. ``config.json: field 'tie_word_embeddings' expected a JSON boolean, got the string
'false'``; a required field (no default) that is absent is named too.
"""

from __future__ import annotations

import collections.abc as abc
import dataclasses
import functools
import math
import typing
from numbers import Integral, Real
from typing import Any, Mapping, Optional

__all__ = ["ConfigError", "check_fields", "check_entries", "check_value", "missing_fields", "expected", "problem",
           "shown"]


class ConfigError(ValueError):
    """A config value of the wrong type, or a required field that is absent."""


def shown(value: Any) -> str:
    """What was given, in JSON words: ``null``, ``true``, ``the string 'false'``, ``the number 2.5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {text!r}"
    if isinstance(value, Real):
        return f"the number {value!r}"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def expected(hint: Any) -> str:
    """The words for what ``hint`` accepts: ``a JSON boolean``, ``a JSON integer or null``, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    if origin is typing.Union:
        arms = [a for a in args if a is not type(None)]
        words = " or ".join(expected(a) for a in arms)
        return words + " or null" if len(arms) < len(args) else words
    if hint is bool:
        return "a JSON boolean"
    if hint is int:
        return "a JSON integer"
    if hint is float:
        return "a finite JSON number"
    if hint is str:
        return "a string"
    if origin in (list, tuple, abc.Sequence) or hint in (list, tuple):
        item = args[:1]
        return f"an array of {_plural(item[0])}" if item and item[0] is not Any else "an array"
    if origin in (dict, abc.Mapping) or hint in (dict, Mapping):
        return "an object"
    return f"a {getattr(hint, '__name__', hint)}"


def _plural(hint: Any) -> str:
    words = expected(hint)
    return {"a JSON integer": "integers", "a string": "strings", "a finite JSON number": "numbers",
            "a JSON boolean": "booleans"}.get(words, f"items that are {words}")


def problem(value: Any, hint: Any) -> Optional[str]:
    """``None`` when ``hint`` accepts ``value``; else what was wrong (``"got the string 'false'"``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin is typing.Union:  # the arm of the value's own kind says more ("item 1 is ..."), if one does
        problems = [problem(value, a) for a in args]
        if None in problems:
            return None
        specific = [p for p in problems if p != f"got {shown(value)}"]
        return specific[0] if specific else f"got {shown(value)}"
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, Integral) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple, abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"got {shown(value)}"
        item = args[0] if args else Any
        for i, v in enumerate(value):
            if problem(v, item) is not None:
                return f"got an array whose item {i} is {shown(v)}"
        return None
    elif origin in (dict, abc.Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            return f"got {shown(value)}"
        key, item = args if args else (Any, Any)
        for k, v in value.items():
            if problem(k, key) is not None or problem(v, item) is not None:
                return f"got an object whose entry {k!r} is {shown(v)}"
        return None
    else:
        ok = isinstance(value, hint) if isinstance(hint, type) else True
    return None if ok else f"got {shown(value)}"


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    """``{field name: resolved annotation}`` of a dataclass (string annotations resolved)."""
    try:
        resolved = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve (a registered module's): unchecked
        resolved = {}
    return {f.name: resolved.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def missing_fields(cls: type, values: Mapping[str, Any]) -> list:
    """The required fields of dataclass ``cls`` (no default) absent from ``values``."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _check(values: Mapping[str, Any], hints: Mapping[str, Any], lead: str, noun: str, required: list) -> None:
    """The first of ``required`` absent from ``values``, else the first value its hint refuses, as a ConfigError."""
    absent = [name for name in required if name not in values]
    if absent:
        more = f" (and {', '.join(map(repr, absent[1:]))})" if absent[1:] else ""
        raise ConfigError(f"{lead} missing required {noun} {absent[0]!r} ({expected(hints[absent[0]])}){more}")
    for name, hint in hints.items():
        if name in values:
            check_value(values[name], hint, f"{lead} {noun} {name!r}")


def check_value(value: Any, hint: Any, what: str) -> Any:
    """``value`` if ``hint`` accepts it, else a ConfigError ``"<what> expected <type>, got <value>"``."""
    wrong = problem(value, hint)
    if wrong is not None:
        raise ConfigError(f"{what} expected {expected(hint)}, {wrong}")
    return value


def check_fields(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` (``"<where>: field 'x' expected ..., got ..."``, or ``"[Owner] field ..."``
    when ``where`` is bracketed) for the first required field of dataclass ``cls`` that ``values`` lacks,
    else the first it gives a value its annotation does not accept."""
    lead = where if where.startswith("[") else f"{where}:"  # "[Owner] ..." or "config.json: ..."
    _check(values, _hints(cls), lead, "field", missing_fields(cls, values))
    for name in getattr(cls, "POSITIVE", ()):  # sizes and counts: a 0 would divide by zero later
        if values.get(name) is not None and values[name] < 1:
            raise ConfigError(f"{lead} field {name!r} expected an integer >= 1, got {shown(values[name])}")


def check_entries(values: Mapping[str, Any], hints: Mapping[str, Any], where: str, required: tuple = ()) -> None:
    """The same rules for the entries of a nested config object (``rope_scaling``,
    ``quantization_config``): ``"<where> entry 'x' expected ..., got ..."``, or ``"<where> missing
    required entry 'x' (...)"`` for a ``required`` one. Entries not in ``hints`` are not checked."""
    _check(values, hints, where, "entry", list(required))
