"""converters/fields.py: config.json fields are type-checked from the ModelArgs annotations.

The oracle below is written from the rules as stated (a bool field takes only JSON booleans, an
int field only integers, a float field finite numbers, Optional also null, containers their own
kind), not from fields.py; hypothesis draws JSON values for fields of every kind and checks that
``from_dict`` accepts a value exactly when the oracle does, and that a refusal is one line naming
config.json, the field and what was given.
"""

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mlx_zeta  # noqa: F401  (BLAS routing before mlx.core)
from mlx_zeta.converters import bert, gpt2, llama, t5
from mlx_zeta.converters.fields import ConfigError

LLAMA = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, vocab_size=10)
GPT2 = dict(model_type="gpt2", n_embd=8, n_layer=1, n_head=2, vocab_size=4)
BERT = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8,
            vocab_size=10)


def is_bool(v):
    return type(v) is bool


def is_int(v):
    return type(v) is int


def is_number(v):
    return type(v) in (int, float) and math.isfinite(v)


def positive(rule):
    return lambda v: rule(v) and v >= 1


def optional(rule):
    return lambda v: v is None or rule(v)


def list_of(rule):
    return lambda v: type(v) is list and all(rule(x) for x in v)


# (converter, base config, field, the oracle for that field's annotation)
FIELDS = [
    (llama, LLAMA, "tie_word_embeddings", is_bool),
    (llama, LLAMA, "attention_bias", is_bool),
    (llama, LLAMA, "rms_norm_eps", is_number),
    (llama, LLAMA, "rope_theta", is_number),
    (llama, LLAMA, "num_hidden_layers", positive(is_int)),
    (llama, LLAMA, "vocab_size", positive(is_int)),
    (llama, LLAMA, "sliding_window", optional(is_int)),
    (llama, LLAMA, "head_dim", optional(positive(is_int))),
    (llama, LLAMA, "rope_scaling", optional(lambda v: type(v) is dict)),
    (gpt2, GPT2, "layer_norm_epsilon", is_number),
    (bert, BERT, "architectures", optional(list_of(lambda v: type(v) is str))),
    (t5, {}, "eos_token_id", lambda v: v is None or is_int(v) or list_of(is_int)(v)),
    (t5, {}, "scale_decoder_outputs", optional(is_bool)),
    (bert, BERT, "add_pooling_layer", optional(is_bool)),
]

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=6) | st.sampled_from(["false", "true", "1e-6", "2", "GPT2Model"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@pytest.mark.parametrize("conv,base,field,oracle", FIELDS, ids=[f"{c.__name__.rsplit('.', 1)[-1]}.{f}"
                                                                 for c, _, f, _ in FIELDS])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON_VALUES)
@example(value="false")
@example(value=2.0)
@example(value=True)
@example(value=None)
@example(value=0)
@example(value=["GPT2Model", 3])
def test_a_field_takes_exactly_the_values_its_type_allows(conv, base, field, oracle, value):
    config = json.loads(json.dumps({**base, field: value}))  # as read from config.json
    if oracle(value):
        args = conv.ModelArgs.from_dict(config)
        # (a null may be filled in: head_dim); compared as JSON text, where NaN equals itself
        assert value is None or json.dumps(getattr(args, field)) == json.dumps(config[field])
        return
    with pytest.raises(ConfigError) as info:
        conv.ModelArgs.from_dict(config)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config.json: field '{field}' expected "), message
    assert ", got " in message, message


def test_the_issue_examples_word_for_word():
    cases = {
        "tie_word_embeddings": ("false", "config.json: field 'tie_word_embeddings' expected a JSON boolean, "
                                         "got the string 'false'"),
        "rms_norm_eps": ("1e-6", "config.json: field 'rms_norm_eps' expected a finite JSON number, got the string "
                                 "'1e-6'"),
        "num_hidden_layers": (2.0, "config.json: field 'num_hidden_layers' expected a JSON integer, got the number 2.0"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(ConfigError) as info:
            llama.ModelArgs.from_dict({**LLAMA, field: value})
        assert str(info.value) == message
    with pytest.raises(ConfigError, match=r"^config.json: field 'rms_norm_eps' expected a finite JSON number, "
                                          r"got null$"):
        llama.ModelArgs.from_dict({**LLAMA, "rms_norm_eps": None})
    without = {k: v for k, v in LLAMA.items() if k != "num_hidden_layers"}
    with pytest.raises(ConfigError, match=r"^config.json: missing required field 'num_hidden_layers' "
                                          r"\(a JSON integer\)$"):
        llama.ModelArgs.from_dict(without)


def test_direct_construction_is_checked_before_the_subclass_post_init(monkeypatch):
    """llama's __post_init__ divides hidden_size by num_attention_heads: it must see an int, so the
    type check runs first, named after the dataclass; BitNet's (which calls llama's) checks once."""
    with pytest.raises(ConfigError, match=r"^\[llama.ModelArgs\] field 'hidden_size' expected a JSON integer, "
                                          r"got the string '32'$"):
        llama.ModelArgs(**{**LLAMA, "hidden_size": "32"})
    with pytest.raises(ConfigError, match=r"^\[gpt2.ModelArgs\] field 'n_head' expected an integer >= 1, "):
        gpt2.ModelArgs(**{k: v for k, v in {**GPT2, "n_head": 0}.items() if k != "model_type"})
    assert llama.ModelArgs(**LLAMA).head_dim == 8
    from mlx_zeta.converters import base, bitnet

    calls = []
    monkeypatch.setattr(base, "check_fields", lambda cls, values, where: calls.append(cls))
    bitnet.ModelArgs(**{**LLAMA, "model_type": "bitnet", "quantization_config": {"quant_method": "bitnet"}})
    assert calls == [bitnet.ModelArgs]


def test_nested_entries_are_checked_too():
    args = llama.ModelArgs.from_dict({**LLAMA, "rope_scaling": {"rope_type": "linear"}})
    with pytest.raises(ConfigError, match=r"^config.json: rope_scaling \(rope_type 'linear'\) missing required entry "
                                          r"'factor' \(a finite JSON number\)$"):
        llama.build(args)
    args = llama.ModelArgs.from_dict({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": "2"}})
    with pytest.raises(ConfigError, match=r"entry 'factor' expected a finite JSON number, got the string '2'$"):
        llama.build(args)
    from mlx_zeta.converters import bitnet

    q = {"quant_method": "bitnet", "use_rms_norm": "false"}
    with pytest.raises(ConfigError, match=r"^config.json: field 'quantization_config' entry 'use_rms_norm' "
                                          r"expected a JSON boolean or null, got the string 'false'$"):
        bitnet.ModelArgs.from_dict({**LLAMA, "model_type": "bitnet", "quantization_config": q})
    with pytest.raises(ConfigError, match=r"'eos_token_id' expected a JSON integer or an array of integers or "
                                          r"null, got an array whose item 1 is the string '2'$"):
        t5.ModelArgs.from_dict({"eos_token_id": [1, "2"]})
