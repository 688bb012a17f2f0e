"""The Swift sample (``examples/ios``) and the decoder package contract cannot drift apart.

The sample keeps every name it relies on as a ``static let`` in one file,
``Sources/MLXZetaCoreML/Contract.swift``; this test parses those lines and checks each value
against the spec of a tiny package exported here with :func:`export_decoder` (function names,
input/output/state names, shapes and Core ML data types, read from the saved protobuf), and the
metadata keys the sample reads against those the exporters write. It also runs the sample's
Python helper (``examples/ios/make_tiny_model.py``, which the macOS workflow uses for its
reference ids) and drives the exported package the way the sample's ``Generator`` does (the choice
of prefill function, right padding, one state for every function) under the numpy Evaluator: the
greedy ids must be the ones MLX's ``generate`` wrote into ``expected.json``.

No Swift compiler is needed (the workflow ``.github/workflows/ios-sample.yml`` builds and runs the
sample on macOS).
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import mlx_zeta

ct = pytest.importorskip("coremltools")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from mlx_zeta.converters.coreml import export_decoder  # noqa: E402
from mlx_zeta.converters.coreml.evaluate import Evaluator  # noqa: E402
from mlx_zeta.converters.coreml.metadata import read_metadata  # noqa: E402
from mlx_zeta.converters.coreml.package import open_package  # noqa: E402
from mlx_zeta.converters.coreml.source import TOKENIZER_SUFFIX  # noqa: E402
from scripts import load_script  # noqa: E402

IOS = Path(__file__).resolve().parents[1] / "examples" / "ios"
CONTRACT = IOS / "Sources" / "MLXZetaCoreML" / "Contract.swift"
PREFILL_LENS, CAPACITY, MAX_TOKENS = (4, 8), 32, 8  # the default prompt (23 tokens) takes three prefill calls

# User-defined metadata keys the exporters write (the shared spec of issue 18): export_decoder's own
# and those the CLI adds. The keys export_decoder writes are read from the package (read_metadata) below;
# tests/test_coreml_cli.py reads every key Contract.swift names from a package exported by
# `mlx-zeta export-coreml --copy-tokenizer` (test_cli_package_has_every_key_the_swift_sample_reads).
EXPORT_DECODER_KEYS = {"mlx_zeta.task", "mlx_zeta.capacity", "mlx_zeta.prefill_lengths", "mlx_zeta.functions",
                       "mlx_zeta.vocab_size", "mlx_zeta.batch", "mlx_zeta.padding", "mlx_zeta.precision",
                       "mlx_zeta.compression", "mlx_zeta.version"}
CLI_KEYS = {"mlx_zeta.source", "mlx_zeta.model_type", "mlx_zeta.bos_token_id", "mlx_zeta.eos_token_ids",
            "mlx_zeta.pad_token_id", "mlx_zeta.tokenizer_files"}

_LET = re.compile(r"^\s*(?:public\s+)?static\s+let\s+(\w+)\s*(?::\s*[\w.]+\s*)?=\s*(.+?)\s*(?://.*)?$")
_ENUM = re.compile(r"^(?:public\s+)?enum\s+(\w+)")


def swift_constants(path: Path) -> dict:
    """``{"Enum.name": value}`` of every ``static let NAME = LITERAL`` line of a Swift file (a string
    or integer literal); any ``static let`` this cannot read is an error, so none goes unchecked."""
    out, scope = {}, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if m := _ENUM.match(line):
            scope = m.group(1)
        if "static let" not in line or line.lstrip().startswith("//"):
            continue
        m = _LET.match(line)
        value = m.group(2) if m else ""
        if re.fullmatch(r'"[^"\\]*"', value):
            parsed = value[1:-1]
        elif re.fullmatch(r"-?\d+", value):
            parsed = int(value)
        else:
            raise AssertionError(f"{path.name}:{number}: expected `static let NAME = \"string\"` or an integer "
                                 f"literal on one line, got: {line.strip()}")
        key = f"{scope}.{m.group(1)}"
        assert key not in out, f"{path.name}:{number}: {key} defined twice"
        out[key] = parsed
    return out


class _Read(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _dtype(array_type) -> str:
    """Core ML array data type of a spec ``ArrayFeatureType`` by name, as Contract.swift spells it."""
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array_type.dataType).lower()


def _export(model, path: Path) -> Path:
    """``export_decoder`` with prefill lengths PREFILL_LENS in one package."""
    return export_decoder(model, path, capacity=CAPACITY, prefill_lens=PREFILL_LENS)


def _helper(name: str):
    """One of the sample's Python scripts (examples/ios/NAME.py) as a module."""
    return load_script(IOS / f"{name}.py", name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, expected, package)``: make_tiny_model's checkpoint and expected.json, and the
    checkpoint exported as a decoder package."""
    helper = _helper("make_tiny_model")
    out = tmp_path_factory.mktemp("ios")
    assert helper.main([str(out), "--max-tokens", str(MAX_TOKENS)]) == 0
    expected = json.loads((out / "expected.json").read_text(encoding="utf-8"))
    model = mlx_zeta.from_pretrained(str(out / "model"))
    return out / "model", expected, _export(model, out / "model.mlpackage")


def test_contract_swift_matches_the_exported_package(tiny):
    folder, _, package = tiny
    c = _Read(swift_constants(CONTRACT))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    spec = open_package(package).spec
    funcs = {f.name: f for f in spec.description.functions}
    prefill = {c["Contract.prefillFunctionPrefix"] + str(n): n for n in PREFILL_LENS}
    assert set(funcs) == {c["Contract.decodeFunction"], *prefill}
    assert spec.description.defaultFunctionName == c["Contract.decodeFunction"]
    assert c["Contract.batch"] == 1  # export_decoder's default batch, the one the sample drives
    batch = c["Contract.batch"]
    depth = None
    for name, f in funcs.items():
        length = prefill.get(name, 1)
        inputs = {i.name: i.type.multiArrayType for i in f.input}
        assert set(inputs) == {c["Contract.inputIDs"], c["Contract.position"]}, name
        ids, pos = inputs[c["Contract.inputIDs"]], inputs[c["Contract.position"]]
        assert (tuple(ids.shape), _dtype(ids)) == ((batch, length), c["Contract.inputIDsDataType"]), name
        assert (tuple(pos.shape), _dtype(pos)) == ((1,), c["Contract.positionDataType"]), name
        assert [o.name for o in f.output] == [c["Contract.logits"]], name
        logits = f.output[0].type.multiArrayType
        assert _dtype(logits) == c["Contract.logitsDataType"], name
        assert tuple(logits.shape) in ((), (batch, length, vocab)), name  # () where a spec leaves it out
        states = {s.name: s.type.stateType.arrayType for s in f.state}
        depth = len(states) // 2
        assert set(states) == {f"{c['Contract.keyCachePrefix']}{i}" for i in range(depth)} | \
                              {f"{c['Contract.valueCachePrefix']}{i}" for i in range(depth)}, name
        for s, array in states.items():
            assert _dtype(array) == c["Contract.stateDataType"], (name, s)
            assert array.shape[c["Contract.stateCapacityAxis"]] == CAPACITY, (name, s)
    assert depth == 2
    # files beside the package: the tokenizer file the sample reads is the one checkpoints carry
    assert (folder / c["Contract.tokenizerFile"]).is_file()
    assert c["Contract.tokenizerFolderSuffix"] == TOKENIZER_SUFFIX  # where --copy-tokenizer puts them
    unchecked = sorted(k for k in c if k.startswith("Contract.") and k not in c.read)
    assert not unchecked, f"Contract.swift constants this test does not check yet: {unchecked}"


def test_metadata_keys_the_sample_reads_are_written_by_the_exporters(tiny):
    keys = {k: v for k, v in swift_constants(CONTRACT).items() if k.startswith("MetadataKey.")}
    assert len(keys) >= 10
    unknown = sorted(v for v in keys.values() if v not in EXPORT_DECODER_KEYS | CLI_KEYS)
    assert not unknown, f"Contract.swift reads metadata keys no exporter writes: {unknown}"
    user = read_metadata(tiny[2])["user"]
    missing = sorted(v for v in keys.values() if v in EXPORT_DECODER_KEYS and v not in user)
    assert not missing, f"export_decoder wrote no {missing} (Contract.swift reads them)"
    assert json.loads(user["mlx_zeta.prefill_lengths"]) == list(PREFILL_LENS)
    assert int(user["mlx_zeta.capacity"]) == CAPACITY


def test_contract_parser_refuses_what_it_cannot_read(tmp_path):
    bad = tmp_path / "Bad.swift"
    bad.write_text('enum Contract {\n    /// static let in a comment\n    static let a = "x"\n    static let b = "y" + "z"\n}\n')
    with pytest.raises(AssertionError, match="Bad.swift:4"):
        swift_constants(bad)


def plan(tokens: int, start: int, lengths, capacity: int):
    """``(length, count, position)`` of each prefill call: the spec's choice of function, as
    ``prefillPlan`` in the sample's PackageInfo.swift."""
    calls, left, position = [], tokens, start
    while left:
        length = min((n for n in lengths if n >= left), default=max(lengths))
        assert position + length <= capacity
        calls.append((length, min(left, length), position))
        left -= calls[-1][1]
        position += calls[-1][1]
    return calls


def test_package_driven_like_the_sample_gives_mlx_greedy_ids(tiny):
    folder, expected, package = tiny
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert expected["prompt_ids"] == tok.encode(expected["prompt"], add_special_tokens=False).ids
    assert 1 <= len(expected["ids"]) <= MAX_TOKENS and len(expected["gaps"]) == len(expected["ids"])
    prompt = expected["prompt_ids"]
    calls = plan(len(prompt), 0, PREFILL_LENS, CAPACITY)
    assert [(n, k) for n, k, _ in calls] == [(8, 8), (8, 8), (8, 7)]  # longer than any length: chunks, last padded
    state = {}  # one state for every function, as the sample's one MLState
    run = {f"prefill_{n}": Evaluator(package, function=f"prefill_{n}", state=state) for n in PREFILL_LENS}
    run["decode"] = Evaluator(package, function="decode", state=state)
    for length, count, position in calls:
        chunk = np.zeros((1, length), np.int32)  # right padding (pad id 0)
        chunk[0, :count] = prompt[position:position + count]
        logits = run[f"prefill_{length}"]({"input_ids": chunk, "position": np.array([position], np.int32)})["logits"]
        row = logits[0, count - 1]
    ids, position = [], len(prompt)
    while True:
        ids.append(int(np.argmax(row)))
        if ids[-1] in expected["eos_token_ids"] or len(ids) == MAX_TOKENS:
            break
        out = run["decode"]({"input_ids": np.array([[ids[-1]]], np.int32), "position": np.array([position], np.int32)})
        row, position = out["logits"][0, 0], position + 1
    assert ids == expected["ids"]


def test_compare_ids_judges_a_run_as_the_workflow_needs():
    cmp = _helper("compare_ids")
    expected = {"prompt_ids": [1, 2], "ids": [5, 6, 0], "gaps": [3.0, 0.1, 2.0], "text": "ab"}
    run = cmp.parse_run('loading\nprompt ids: 1,2\nids: 5,6,0\ntext: "ab"\n')
    assert run == {"prompt_ids": [1, 2], "ids": [5, 6, 0], "text": "ab"}
    assert cmp.compare(expected, run) == []
    assert cmp.compare(expected, cmp.parse_run("prompt ids: 1,3\nids: 5,6,0\n"))  # the tokenizers differ
    parts_at_near_tie = cmp.parse_run("prompt ids: 1,2\nids: 5,7,9\n")  # step 1: MLX's gap 0.1
    assert cmp.compare(expected, parts_at_near_tie)  # exact (fp32): refused
    assert cmp.compare(expected, parts_at_near_tie, near_tie=0.25) == []  # fp16: a near tie, accepted
    assert cmp.compare(expected, cmp.parse_run("prompt ids: 1,2\nids: 4,6,0\n"), near_tie=0.25)  # gap 3.0
    assert cmp.compare(expected, cmp.parse_run("prompt ids: 1,2\nids: 5,6\n"))  # stopped early
    assert cmp.compare(expected, cmp.parse_run('prompt ids: 1,2\nids: 5,6,0\ntext: "x"\n'))
    with pytest.raises(ValueError, match="ids"):
        cmp.parse_run("prompt ids: 1,2\n")
