"""Decoder bundles with a ``prefill`` function over a dynamic range of token counts
(``export_decoder_coreai(..., dynamic_prefill=(min, max))``, :mod:`mlx_zeta.converters.coreai.dynamic`),
run by Apple's Core AI runtime and compared with MLX in float32.

One bundle holds ``prefill_4`` (fixed), ``prefill`` (``T`` in ``RANGE``) and ``decode``: prompts of
several lengths go through ``prefill`` in one call (or two, the second at ``position > 0``), then 32
greedy ``decode`` steps on the same state; the bound is ``REL_OF_MAX`` and 32/32 tokens, as for the
fixed functions (``test_coreai_export``). A planted wrong run-time length is caught, and graphs that
do not follow ``a*T + b`` fail in one line.
"""

import json

import numpy as np
import pytest

from mlx_zeta.converters.coreai import available

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Core AI runtime unavailable: {WHY}")

import mlx_zeta  # noqa: E402,F401  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from mlx_zeta.converters.coreai import Bundle, export_decoder_coreai, read_bundle_metadata  # noqa: E402
from mlx_zeta.converters.coreai import dynamic, stateful  # noqa: E402
from test_coreai_export import CAPACITY, REL_OF_MAX, STEPS, greedy_check, tiny_decoder  # noqa: E402

RANGE = (1, 24)
LENGTHS = (1, 5, 11, 16, 23)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_decoder()
    path = export_decoder_coreai(model, tmp_path_factory.mktemp("dyn") / "lm.aimodel", capacity=CAPACITY,
                                 prefill_lens=(4,), dynamic_prefill=RANGE, weights="float32")
    return model, path


def prompt_of(n: int) -> tuple:
    return tuple(int(t) for t in np.random.RandomState(n).randint(0, 64, n))


@pytest.mark.parametrize("n", LENGTHS)
def test_dynamic_prefill_of_any_length_then_32_greedy_steps(exported, n):
    model, path = exported
    agree, rel = greedy_check(model, path, prompt_of(n), calls=[("prefill", n, n)])
    print(f"\ncore ai dynamic prefill T={n}: greedy {agree}/{STEPS}, max rel logit error {rel:.2e}")
    assert agree == STEPS and rel <= REL_OF_MAX, (agree, rel)


def test_dynamic_prefill_in_two_calls_and_the_fixed_function_share_the_state(exported):
    model, path = exported
    agree, rel = greedy_check(model, path, prompt_of(23), calls=[("prefill", 16, 16), ("prefill", 7, 7)])
    assert agree == STEPS and rel <= REL_OF_MAX, (agree, rel)
    mixed = [("prefill_4", 4, 4), ("prefill", 6, 6), ("prefill_4", 4, 1)]  # 11 tokens, the last call padded
    agree, rel = greedy_check(model, path, prompt_of(11), calls=mixed)
    assert agree == STEPS and rel <= REL_OF_MAX, (agree, rel)


def test_signature_and_metadata(exported):
    _, path = exported
    with Bundle(path) as bundle:
        assert bundle.functions == ["prefill_4", "prefill", "decode"]
        assert bundle.signature("prefill") == bundle.signature("prefill_4")
    user = read_bundle_metadata(path)["user"]
    assert json.loads(user["mlx_zeta.dynamic_prefill"]) == list(RANGE)
    assert json.loads(user["mlx_zeta.functions"]) == ["prefill_4", "prefill", "decode"]


def test_a_planted_wrong_runtime_length_is_caught(tmp_path, monkeypatch):
    """Positions one too far (``Arange`` of the dynamic graph started at 1): the runtime's logits show it."""
    model = tiny_decoder()
    arange = dynamic.Dims.arange
    monkeypatch.setattr(dynamic.Dims, "arange", lambda self, node: self.ctx.ca.broadcasting_add(
        arange(self, node), self.ctx.scalar(1, dynamic.element_type(node.out_dtypes[0]))))
    path = export_decoder_coreai(model, tmp_path / "lm.aimodel", capacity=CAPACITY, prefill_lens=(4,),
                                 dynamic_prefill=RANGE, weights="float32")
    agree, rel = greedy_check(model, path, prompt_of(11), calls=[("prefill", 11, 11)])
    assert agree < STEPS or rel > REL_OF_MAX, (agree, rel)


class Quadratic(stateful.DecoderStep):
    """Logits scaled by a sum over ``T*T`` ones: a shape no ``a*T + b`` gives."""
    def __call__(self, input_ids, *rest):
        t = input_ids.shape[1]
        return super().__call__(input_ids, *rest) * mx.ones((t * t,)).sum()


class LengthConstant(stateful.DecoderStep):
    """Logits plus a constant computed from ``T``: it differs between the traces."""
    def __call__(self, input_ids, *rest):
        t = input_ids.shape[1]
        return super().__call__(input_ids, *rest) + mx.array(np.linspace(0, 1, t, dtype=np.float32))[None, :, None]


@pytest.mark.parametrize("step, match", [(Quadratic, r"not a\*T\+b"), (LengthConstant, r"depends on T")])
def test_graphs_that_do_not_follow_the_length_fail_in_one_line(tmp_path, monkeypatch, step, match):
    monkeypatch.setattr(stateful, "DecoderStep", step)
    with pytest.raises(ValueError, match=r"^\[export_coreai\] .*" + match) as err:
        export_decoder_coreai(tiny_decoder(), tmp_path / "lm.aimodel", capacity=CAPACITY, prefill_lens=(4,),
                              dynamic_prefill=RANGE, weights="float32")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("span", [(0, 8), (8, 4), (1, CAPACITY + 1), (1,), "1-8", (1.0, 8)])
def test_bad_ranges_fail_in_one_line(tmp_path, span):
    with pytest.raises(ValueError, match=r"^\[export_decoder_coreai\] expected dynamic_prefill=\(min_len, max_len\)"):
        export_decoder_coreai(tiny_decoder(), tmp_path / "lm.aimodel", capacity=CAPACITY, dynamic_prefill=span)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_converted_decoders_with_dynamic_prefill(tmp_path, family):
    """A converted Llama (rotary) and GPT-2 (absolute positions: a gather at ``position + arange(T)``)."""
    from test_coreai_families import DECODERS

    model = DECODERS[family](tmp_path / "checkpoint")
    path = export_decoder_coreai(model, tmp_path / "lm.aimodel", capacity=CAPACITY, prefill_lens=(4,),
                                 dynamic_prefill=(1, 16), weights="float32")
    for n in (3, 13):
        agree, rel = greedy_check(model, path, prompt_of(n), calls=[("prefill", n, n)])
        print(f"\ncore ai {family} dynamic prefill T={n}: greedy {agree}/{STEPS}, max rel err {rel:.2e}")
        assert agree == STEPS and rel <= REL_OF_MAX, (agree, rel)
