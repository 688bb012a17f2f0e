"""Helpers every converter module shares: Hugging Face activation names, weight-name rules,
the ``architectures`` check, and the ``ModelArgs`` bases.

A converter module (``converters/<arch>.py``) imports what it needs from here and never from
a sibling converter (a mapping that *is* another one, as BitNet's is Llama's, may subclass it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .fields import ConfigError, check_fields, shown

__all__ = ["ACTIVATIONS", "activation", "rename", "rename_rules", "check_architectures", "BaseModelArgs",
           "TransformerArgs", "ConfigError", "LinearPart"]

# Hugging Face activation names (``hidden_act`` & co., transformers' ``ACT2FN``) -> MLX functions, same math.
ACTIVATIONS: Mapping[str, Callable[[mx.array], mx.array]] = MappingProxyType({
    "gelu": nn.gelu, "gelu_python": nn.gelu,  # exact, erf
    # tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_new": nn.gelu_approx, "gelu_fast": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_python_tanh": nn.gelu_approx, "gelu_accurate": nn.gelu_approx,
    "quick_gelu": nn.gelu_fast_approx,  # x sigmoid(1.702 x)
    "relu": nn.relu, "silu": nn.silu, "swish": nn.silu, "tanh": mx.tanh,
})


def activation(name: str, where: str, key: str) -> Callable[[mx.array], mx.array]:
    """The MLX function for a Hugging Face activation ``name`` read from config ``key``; a
    ``ValueError`` prefixed ``[where]`` lists the supported names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"[{where}] unsupported {key} {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def rename(name: str, rules: Sequence[Tuple[str, str]]) -> str:
    """Apply the first matching ``(pattern, replacement)`` rule (``re.subn``); other names pass through."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


_FIELD = re.compile(r"\{(\w+)\}")


def _rule(source: str, target: str, fields: Mapping[str, str]) -> Tuple[str, str]:
    """A ``(pattern, replacement)`` rule from two name-prefix templates sharing ``{field}`` names."""
    parts = _FIELD.split(source)  # literal, field, literal, field, ...
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{fields[p]})" for i, p in enumerate(parts))
    return "^" + pattern, _FIELD.sub(lambda m: f"\\g<{m.group(1)}>", target.replace("\\", "\\\\"))


def rename_rules(pairs: Sequence[Tuple[str, str]], fields: Mapping[str, str]) -> Tuple[list, list]:
    r"""``(to ours, to Hugging Face)``: :func:`rename` rules both ways from one table.

    Each pair is ``(Hugging Face prefix, our prefix)``, templates whose ``{name}`` fields stand for
    the regex ``fields[name]`` (e.g. ``{"i": r"\d+"}``) and are carried across, as in
    ``("model.layers.{i}.mlp.down_proj.", "attn_layers.layers.{i}.ff.proj_out.")``. Written once,
    so ``sanitize`` and ``to_hf`` cannot disagree on a name.
    """
    return ([_rule(hf, ours, fields) for hf, ours in pairs], [_rule(ours, hf, fields) for hf, ours in pairs])


def check_architectures(architectures: Optional[Sequence[str]], supported: Sequence[str], where: str) -> None:
    """A ``ValueError`` when config.json names a head class this converter does not build."""
    unknown = [a for a in architectures or () if a not in supported]
    if unknown:
        raise ValueError(f"[{where}] unsupported architectures {unknown}; supported: {', '.join(supported)}")


def _fields_checked_first(post_init: Callable) -> Callable:
    """``post_init`` preceded by the type check of every field (once, by the outermost call)."""

    @functools.wraps(post_init)
    def checked(self) -> None:
        if type(self).__post_init__ is checked:  # not when a subclass's __post_init__ calls super()
            check_fields(type(self), _values(self), _owner(type(self)))
        post_init(self)

    return checked


def _owner(cls: type) -> str:
    return f"[{cls.__module__.rsplit('.', 1)[-1]}.{cls.__qualname__}]"  # "[llama.ModelArgs]"


def _values(args: Any) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}


@dataclasses.dataclass
class BaseModelArgs:
    """Base of every architecture's ``ModelArgs``: a dataclass filled from a config dict.

    Every field is type-checked against its annotation when the dataclass is built, before any
    ``__post_init__`` of a subclass runs (:mod:`.fields` states the rules: a ``bool`` field takes
    only ``true``/``false``, an ``int`` field only integers, a ``float`` field finite numbers, an
    ``Optional`` one also ``null``, ...); a wrong value is a one-line
    :class:`~mlx_zeta.converters.fields.ConfigError` naming the field, the type and the value.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None:  # a subclass's own checks see only well-typed fields
            cls.__post_init__ = _fields_checked_first(own)

    def __post_init__(self) -> None:
        check_fields(type(self), _values(self), _owner(type(self)))

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], source: str = "config.json") -> "BaseModelArgs":
        """The dataclass from ``params``, ignoring keys that are not fields (configs carry many).

        A ``ConfigError`` ``"<source>: field 'x' expected ..., got ..."`` names a value of the wrong
        type or a required field that is absent (``source``: the file the dict was read from)."""
        if not isinstance(params, Mapping):
            raise ConfigError(f"{source}: expected a JSON object of config fields, got {shown(params)}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in params.items() if k in names}
        check_fields(cls, values, source)
        return cls(**values)


@dataclasses.dataclass
class TransformerArgs(BaseModelArgs):
    """The config fields Hugging Face's BERT- and Llama-style transformers name alike (the required ones)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int

    POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


class LinearPart(NamedTuple):
    """Rows ``ours_rows`` (``(start, stop)``) of the Linear at module path ``ours`` of the built
    model are rows ``hf_rows`` of the Hugging Face module ``hf`` (its path in the transformers
    model, as PEFT names it), computed from the same input. ``transposed``: the Hugging Face module
    stores its weight as ``(in, out)`` (GPT-2's ``Conv1D``) rather than ``nn.Linear``'s ``(out, in)``.

    A converter's ``hf_linear_parts(args)`` lists these for every Linear an adapter may wrap; the
    adapter interop (:mod:`mlx_zeta.lm.adapters_hf`) maps LoRA weights through them, so a fused
    layer of ours (Llama's ``[up; gate]``) or of Hugging Face's (GPT-2's ``c_attn``) maps exactly."""

    ours: str
    ours_rows: Tuple[int, int]
    hf: str
    hf_rows: Tuple[int, int]
    transposed: bool = False
