"""Package metadata (coreml/metadata.py, and what export_decoder / export_coreml write): every field
written is read back from the saved package, by read_metadata and independently (coremltools'
MLModel for the model fields and user keys, the raw spec protobuf for each function's feature
descriptions); the edited package still loads and evaluates; bad metadata gives one-line errors
and leaves nothing (or the package unchanged)."""

import json
from pathlib import Path

import numpy as np
import pytest

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters.coreml import (  # noqa: E402
    Evaluator, PackageError, export_coreml, export_decoder, lint, open_package, package_summary, read_metadata,
    write_metadata)
from mlx_zeta.converters.coreml.evaluate import load_program  # noqa: E402
from mlx_zeta.structs import Decoder, Transformer  # noqa: E402

CAPACITY, LENS, DEPTH, VOCAB = 16, (4, 8), 2, 48
GIVEN = {"author": "A. Author", "license": "Apache-2.0", "description": "a tiny decoder", "version": "1.2.3",
         "user": {"mlx_zeta.bos_token_id": "1", "mlx_zeta.eos_token_ids": "[2]", "mlx_zeta.padding": "right (ours)"}}
# the spec's descriptions, written out here (not imported from the exporter)
DECODER_FEATURES = {
    "input": {"input_ids": "Token ids (B, L) int32, right-padded to L",
              "position": "(1,) int32: index in the cache of input_ids[:, 0]"},
    "output": {"logits": "(B, L, vocab) float32 next-token logits for each input position"},
    "state": {f"{kv}_cache_{i}": f"fp16 (B, kv_heads, capacity, head_dim): layer {i} {what}"
              for kv, what in (("k", "keys"), ("v", "values")) for i in range(DEPTH)},
}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    mx.random.seed(0)
    model = Transformer(num_tokens=VOCAB, max_seq_len=CAPACITY, attn_layers=Decoder(
        dim=16, depth=DEPTH, heads=2, rotary_pos_emb=True))
    root = tmp_path_factory.mktemp("coreml_meta")
    return export_decoder(model, root / "lm.mlpackage", capacity=CAPACITY, prefill_lens=LENS, metadata=GIVEN)


def test_decoder_metadata_round_trip(decoder):
    functions = ["prefill_4", "prefill_8", "decode"]
    user = {"mlx_zeta.task": "causal-lm", "mlx_zeta.capacity": str(CAPACITY), "mlx_zeta.prefill_lengths": "[4, 8]",
            "mlx_zeta.functions": json.dumps(functions), "mlx_zeta.vocab_size": str(VOCAB), "mlx_zeta.batch": "1",
            "mlx_zeta.padding": "right", "mlx_zeta.precision": "float16", "mlx_zeta.compression": "none",
            "mlx_zeta.version": mlx_zeta.__version__}
    user.update(GIVEN["user"])  # the caller's keys merged over the exporter's
    meta = read_metadata(decoder)
    assert {k: meta[k] for k in ("author", "license", "description", "version")} == \
        {k: GIVEN[k] for k in ("author", "license", "description", "version")}
    assert meta["user"] == user
    assert (meta["inputs"], meta["outputs"], meta["states"]) == tuple(DECODER_FEATURES.values())
    assert json.loads(meta["user"]["mlx_zeta.functions"]) == list(package_summary(decoder)["functions"])

    desc = open_package(decoder).spec.description  # each function's own features, from the protobuf
    assert [f.name for f in desc.functions] == functions
    for f in desc.functions:
        for kind, want in DECODER_FEATURES.items():
            assert {x.name: x.shortDescription for x in getattr(f, kind)} == want, (f.name, kind)
        assert f.output[0].type.multiArrayType.shape[-1] == VOCAB
    for name in functions:  # coremltools' own reader
        m = ct.models.MLModel(str(decoder), skip_model_load=True, function_name=name)
        assert (m.author, m.license, m.short_description, m.version) == \
            (GIVEN["author"], GIVEN["license"], GIVEN["description"], GIVEN["version"])
        assert dict(m.user_defined_metadata) == user


def test_package_with_metadata_still_loads_and_runs(decoder):
    prog = load_program(decoder)
    assert sorted(prog.functions) == ["decode", "prefill_4", "prefill_8"]
    state = {}
    out = Evaluator(prog, function="prefill_4", state=state)({"input_ids": np.array([[3, 1, 4, 1]], np.int32),
                                                               "position": np.array([0], np.int32)})
    out2 = Evaluator(prog, function="decode", state=state)({"input_ids": np.array([[5]], np.int32),
                                                             "position": np.array([4], np.int32)})
    assert out["logits"].shape == (1, 4, VOCAB) and out2["logits"].shape == (1, 1, VOCAB)
    assert np.isfinite(out2["logits"]).all()
    assert lint(decoder) == []


def test_export_coreml_metadata(tmp_path):
    def fn(x):  # (2, 8) -> (2, 8)
        return mx.tanh(x) * 2

    x = mx.random.normal((2, 8))
    plain = read_metadata(export_coreml(fn, (x,), tmp_path / "a.mlpackage", input_names=["x"], output_names=["y"]))
    assert plain["user"]["mlx_zeta.task"] == "function" and plain["author"] is None
    path = export_coreml(fn, (x,), tmp_path / "b.mlpackage", input_names=["x"], output_names=["y"],
                         metadata={"author": "B", "license": "MIT", "user": {"mlx_zeta.task": "encoder", "k": "v"}})
    meta = read_metadata(path)
    assert (meta["author"], meta["license"], meta["description"], meta["version"]) == ("B", "MIT", None, None)
    assert meta["inputs"] == {"x": "float32 (2, 8)"} and meta["outputs"] == {"y": "float32 (2, 8)"}
    assert meta["states"] == {}
    mine = {k: v for k, v in meta["user"].items() if not k.startswith("com.github.apple.coremltools")}
    assert mine == {"mlx_zeta.task": "encoder", "k": "v", "mlx_zeta.precision": "float16",
                    "mlx_zeta.compression": "none", "mlx_zeta.version": mlx_zeta.__version__}
    assert "com.github.apple.coremltools.version" in meta["user"]  # coremltools' own keys stay
    m = ct.models.MLModel(str(path), skip_model_load=True)
    assert (m.author, m.license, m.input_description["x"]) == ("B", "MIT", "float32 (2, 8)")
    np.testing.assert_allclose(Evaluator(path)({"x": np.array(x)})["y"], np.array(fn(x)), atol=1e-2)


def test_write_metadata_edits_in_place_and_refuses_unknown_features(tmp_path):
    path = export_coreml(lambda x: x * 3, (mx.ones((1, 4)),), tmp_path / "m.mlpackage", input_names=["x"],
                         output_names=["y"], metadata={"author": "first", "license": "MIT"})
    write_metadata(path, author="second", inputs={"x": "the input"}, user={"a": "1"})
    write_metadata(path, user={"b": "2"})
    meta = read_metadata(path)
    assert (meta["author"], meta["license"], meta["inputs"], meta["outputs"]) == \
        ("second", "MIT", {"x": "the input"}, {"y": "float32 (1, 4)"})  # None leaves a field as it was
    assert meta["user"]["a"] == "1" and meta["user"]["b"] == "2" and meta["user"]["mlx_zeta.task"] == "function"
    spec_file = open_package(path).spec_file
    before = spec_file.read_bytes()
    bad = [(dict(inputs={"z": "no such input"}), r"\[write_metadata\] .*no input named 'z' in the package"),
           (dict(states={"k_cache_0": "x"}), "no state named 'k_cache_0'"),
           (dict(author=3), r"\[write_metadata\] expected author to be a str, got 3"),
           (dict(user={"n": 3}), r"\[write_metadata\] expected user to map str to str")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match) as e:
            write_metadata(path, **kwargs)
        assert "\n" not in str(e.value)
    assert spec_file.read_bytes() == before  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]
    assert sorted(p.name for p in spec_file.parent.iterdir()) == ["model.mlmodel", "weights"]  # no temp left
    with pytest.raises(FileNotFoundError, match=r"\[read_metadata\]"):
        read_metadata(tmp_path / "none.mlpackage")
    (path / "Manifest.json").write_text("{")
    with pytest.raises(PackageError, match=r"\[write_metadata\] .*Manifest.json is not valid JSON"):
        write_metadata(path, author="x")


@pytest.mark.parametrize("metadata, match", [
    ({"authors": "x"}, r"unknown metadata key 'authors'"),
    ({"user": {"n": 3}}, r"expected metadata\['user'\] to map str to str .*'n': 3 \(int\)"),
    ({"user": ["a"]}, r"expected metadata\['user'\] to be a dict of str to str, got list"),
    ({"license": 2}, r"expected metadata\['license'\] to be a str, got 2"),
    ("me", r"expected metadata to be a dict"),
])
def test_exporters_refuse_bad_metadata_and_leave_nothing(tmp_path, metadata, match):
    mx.random.seed(0)
    model = Transformer(num_tokens=16, max_seq_len=8, attn_layers=Decoder(dim=8, depth=1, heads=2))
    exports = {"export_decoder": lambda p: export_decoder(model, p, capacity=8, prefill_lens=4, metadata=metadata),
               "export_coreml": lambda p: export_coreml(lambda x: x + 1, (mx.ones((1, 2)),), p, metadata=metadata)}
    for owner, export in exports.items():
        with pytest.raises(ValueError, match=rf"^\[{owner}\] {match}") as e:
            export(tmp_path / "x.mlpackage")
        assert "\n" not in str(e.value)
    assert list(Path(tmp_path).iterdir()) == []
