"""Core AI export, run by Apple's own runtime (``coreai-core`` on Linux x86_64): the driver, the
stateful decoder bundle and the options.

Every bundle is written to ``tmp_path``, loaded from disk with :class:`~mlx_zeta.converters.coreai.Bundle`
(``coreai.runtime``: Apple's executor, not ours) and compared with MLX in float32: compute is float32
in the bundle, so the bound is float32 rounding through a few layers (``REL_OF_MAX``).
"""

import json

import numpy as np
import pytest

from mlx_zeta.converters.coreai import available

OK, WHY = available()
needs_runtime = pytest.mark.skipif(not OK, reason=f"Core AI runtime unavailable: {WHY}")

import mlx_zeta  # noqa: E402,F401  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_zeta.converters.coreai import Bundle, export_coreai, export_decoder_coreai, read_bundle_metadata  # noqa: E402
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer  # noqa: E402
from test_coreml_stateful import prefill_plan  # noqa: E402  (the contract's choice of function, written once)

REL_OF_MAX = 1e-5  # max |error| / max |reference|, float32 compute
CAPACITY, LENS, STEPS, PAD = 64, (4, 8), 32, 1


def rel_error(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} vs MLX {ref.shape}"
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_without_coreai_the_exporter_says_how_to_install_in_one_line(monkeypatch, tmp_path):
    """Runs everywhere: ``coreai`` made unimportable, the package still imports and fails in one line."""
    import sys

    for name in [m for m in sys.modules if m == "coreai" or m.startswith("coreai.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "coreai", None)
    ok, why = available()
    assert not ok and "pip install 'mlx-zeta[coreai]'" in why and "\n" not in why
    with pytest.raises(ImportError, match=r"^\[export_coreai\] needs coreai-core==1.0.0b3"):
        export_coreai(nn.Linear(2, 2), (mx.zeros((1, 2)),), tmp_path / "a.aimodel")
    assert list(tmp_path.iterdir()) == []


@needs_runtime
def test_mlp_runs_in_apples_runtime_at_float32_rounding(tmp_path):
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8))
    x = mx.random.normal((3, 16))
    path = export_coreai(model, (x,), tmp_path / "mlp.aimodel", weights="float32", input_names=["x"],
                         output_names=["y"], metadata={"author": "me", "user": {"k": "v"}})
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.aimodel"]  # no staging folder left
    with Bundle(path) as bundle:
        assert bundle.functions == ["main"]
        assert bundle.signature("main") == (["x"], ["y"], [])
        got = bundle("main", {"x": np.array(x)})["y"]
    assert rel_error(got, model(x)) <= REL_OF_MAX
    meta = read_bundle_metadata(path)
    assert meta["author"] == "me" and meta["user"]["k"] == "v" and meta["user"]["mlx_zeta.weights"] == "float32"
    assert meta["inputs"] == {"x": "float32 (3, 16)"}


def tiny_decoder():
    mx.random.seed(0)
    return Transformer(num_tokens=64, max_seq_len=CAPACITY, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_kv_heads=2, rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True,
        ff_swish=True))


def run_decoder(path, prompt, ref_tokens, lens=LENS, calls=None):
    """The prompt through the bundle's prefill functions (right-padded), then one decode step per
    MLX greedy token, one state for every function; the logits of every real position. ``calls``:
    ``[(function, length, real tokens)]`` for the prompt (default: the contract's plan over ``lens``)."""
    meta = read_bundle_metadata(path)
    shapes = json.loads(meta["user"]["mlx_zeta.state_shapes"])
    ids, logits, pos = list(prompt), [], 0
    with Bundle(path) as bundle:
        states = bundle.signature("decode")[2]
        state = bundle.new_state({name: np.zeros(s, np.float32) for name, s in zip(states, sorted_shapes(states, shapes))})
        plan = calls or [(f"prefill_{length}", length, real) for length, real in prefill_plan(len(ids), lens)]
        for fname, length, real in plan:
            feeds = {"input_ids": np.array([ids[pos:pos + real] + [PAD] * (length - real)], np.int32),
                     "position": np.array([pos], np.int32)}
            logits.append(bundle(fname, feeds, state)["logits"][0][:real])
            pos += real
        for t, token in enumerate(ref_tokens):
            feeds = {"input_ids": np.array([[token]], np.int32), "position": np.array([len(ids) + t], np.int32)}
            logits.append(bundle("decode", feeds, state)["logits"][0])
    return np.concatenate(logits)


def sorted_shapes(names, shapes):
    """State shapes in ``names``' order (the metadata lists them k_cache_0.., v_cache_0..)."""
    depth = len(shapes) // 2
    order = [f"k_cache_{i}" for i in range(depth)] + [f"v_cache_{i}" for i in range(depth)]
    return [shapes[order.index(n)] for n in names]


def greedy_check(model, path, prompt=(3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12), steps=STEPS, lens=LENS, calls=None):
    """(greedy agreement out of steps, max rel error over every real position's logits)."""
    ref_tokens = np.array(AutoregressiveWrapper(model).generate(mx.array([list(prompt)]), steps,
                                                                temperature=0.0))[0].tolist()
    ref = np.array(model(mx.array([list(prompt) + ref_tokens])).astype(mx.float32))[0]
    got = run_decoder(path, prompt, ref_tokens, lens, calls)
    n = len(prompt)
    agree = int(np.sum(got[n - 1:n - 1 + steps].argmax(-1) == np.array(ref_tokens)))
    return agree, rel_error(got, ref)


@needs_runtime
def test_stateful_decoder_greedy_32_of_32(tmp_path):
    model = tiny_decoder()
    path = export_decoder_coreai(model, tmp_path / "lm.aimodel", capacity=CAPACITY, prefill_lens=(8, 4, 8),
                                 weights="float32")
    with Bundle(path) as bundle:
        assert bundle.functions == ["prefill_4", "prefill_8", "decode"]
        inputs, outputs, states = bundle.signature("prefill_8")
    assert inputs == ["input_ids", "position"] and outputs == ["logits"]
    assert sorted(states) == ["k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]
    agree, rel = greedy_check(model, path)
    print(f"\ncore ai decoder: greedy {agree}/{STEPS}, max rel logit error {rel:.2e}")
    assert agree == STEPS and rel <= REL_OF_MAX


@needs_runtime
def test_functions_share_one_copy_of_the_weights(tmp_path):
    model = tiny_decoder()
    one = export_decoder_coreai(model, tmp_path / "one.aimodel", capacity=CAPACITY, prefill_lens=8, weights="float32")
    three = export_decoder_coreai(model, tmp_path / "three.aimodel", capacity=CAPACITY, prefill_lens=(4, 8),
                                  weights="float32")
    size = lambda p: sum(f.stat().st_size for f in p.iterdir())  # noqa: E731
    weight_bytes = 4 * sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
    # a second copy of the weights would add weight_bytes; measured: +18 KB of program text for 142 KB of weights
    assert size(three) - size(one) < 0.25 * weight_bytes, (size(one), size(three), weight_bytes)


@needs_runtime
def test_bad_options_fail_in_one_line_and_leave_nothing(tmp_path):
    model = tiny_decoder()
    with pytest.raises(ValueError, match=r"\[export_decoder_coreai\] expected weights in"):
        export_decoder_coreai(model, tmp_path / "a.aimodel", capacity=8, prefill_lens=4, weights="int8")
    with pytest.raises(ValueError, match=r"\[export_decoder_coreai\] expected prefill_lens"):
        export_decoder_coreai(model, tmp_path / "a.aimodel", capacity=8, prefill_lens=9)
    with pytest.raises(ValueError, match=r"\[export_coreai\] expected a path ending in .aimodel"):
        export_coreai(nn.Linear(2, 2), (mx.zeros((1, 2)),), tmp_path / "a.mlpackage")
    with pytest.raises(ValueError, match=r"compress"):
        export_coreai(nn.Linear(2, 2), (mx.zeros((1, 2)),), tmp_path / "a.aimodel", compress="int3")
    assert list(tmp_path.iterdir()) == []
