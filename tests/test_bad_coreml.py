"""Malformed-input corpus for Core ML: corrupted packages for every reader, bad exports from the CLI.

Every reader of a saved ``.mlpackage`` (``evaluate``, ``Evaluator``, ``lint``, ``package_summary``)
opens it through ``open_package``, which must give one line naming the reader, the package and the
file at fault (not coremltools' IndexError or protobuf DecodeError). The expected offsets and sizes
below are read from the package's bytes by hand (the MIL blob layout: a 64-byte storage header,
then per blob a 64-byte record ``<marker u32, dtype u32, size u64, data offset u64, ...>``).
"""

import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import mlx.core as mx  # noqa: E402

from badinput import api_error, assert_no_partial, cli_error  # noqa: E402
from mlx_zeta.converters.coreml import (Evaluator, PackageError, evaluate, export_coreml, lint,  # noqa: E402
                                        open_package, package_summary)
from mlx_zeta.converters.pretrained import save_pretrained  # noqa: E402

MARKER = 0xDEADBEEF
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
SPEC = Path("Data/com.apple.CoreML/model.mlmodel")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A whole package with two weight blobs: ``y = (x @ A) @ B``."""
    rng = np.random.default_rng(0)
    a, b = mx.array(rng.normal(size=(8, 16)).astype(np.float32)), mx.array(rng.normal(size=(16, 4)).astype(np.float32))
    path = tmp_path_factory.mktemp("good") / "good.mlpackage"
    return export_coreml(lambda x: (x @ a) @ b, (mx.zeros((2, 8)),), path, input_names=["x"])


def blob_records(weights: Path) -> list:
    """``(record offset, size, data offset)`` of every blob record in ``weights``, by scanning for the marker."""
    data = weights.read_bytes()
    out, at = [], 64
    while at + 64 <= len(data):
        marker, _, size, offset = struct.unpack_from("<IIQQ", data, at)
        assert marker == MARKER, f"no blob record at {at}"
        out.append((at, size, offset))
        at = offset + size + (-(offset + size)) % 64  # records start 64-byte aligned
    return out


CONVERTED = {  # converter module name -> config.json of a tiny random model of it (built without torch)
    "vit": dict(model_type="vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                image_size=8, patch_size=4, num_labels=3, architectures=["ViTForImageClassification"]),
    "t5": dict(model_type="t5", vocab_size=32, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2),
    "llama": dict(model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=32),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``name -> folder`` of tiny converted checkpoints (config.json + safetensors)."""
    import importlib

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, config in CONVERTED.items():
        module = importlib.import_module(f"mlx_zeta.converters.{name}")
        mx.random.seed(0)
        out[name] = save_pretrained(module.build(module.ModelArgs.from_dict(config)), root / name, config=config)
    return out


# ----------------------------------------------------------------------------- corrupted packages
def _truncate(path: Path, cut: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - cut)


def corrupt(case: str, pkg: Path) -> tuple:
    """Break the copy ``pkg`` as ``case`` says; returns (exception type, names, pattern) expected."""
    weights = pkg / WEIGHTS
    if case == "missing":
        shutil.rmtree(pkg)
        return FileNotFoundError, (), "no such Core ML package"
    if case == "not-a-folder":
        shutil.rmtree(pkg)
        pkg.write_bytes(b"PK\x03\x04 a zip, not a package")
        return PackageError, (), "is not a folder"
    if case == "no-manifest":
        (pkg / "Manifest.json").unlink()
        return PackageError, ("Manifest.json",), "has no Manifest.json"
    if case == "corrupt-manifest":
        (pkg / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", "itemInfoEntries": {')
        return PackageError, ("Manifest.json",), "is not valid JSON"
    if case == "manifest-without-root":
        (pkg / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", "itemInfoEntries": {}}')
        return PackageError, ("Manifest.json", "rootModelIdentifier"), "names no root model"
    if case == "no-spec":
        (pkg / SPEC).unlink()
        return PackageError, (str(SPEC),), "is missing"
    if case == "garbled-spec":
        _truncate(pkg / SPEC, (pkg / SPEC).stat().st_size // 2)
        return PackageError, (str(SPEC),), "is not a Core ML model spec"
    if case == "no-weights":
        weights.unlink()
        return PackageError, (str(WEIGHTS),), r"is missing \(the spec references 2 blob\(s\) in it\)"
    records = blob_records(weights)
    if case == "truncated-weights":
        _, size, offset = records[-1]
        _truncate(weights, weights.stat().st_size - offset - size + 10)  # the last blob loses 10 bytes
        have = offset + size - 10
        pattern = rf"is truncated: blob at offset {offset} needs {size} bytes, the file has {have}$"
        return PackageError, (str(WEIGHTS),), pattern
    if case == "truncated-record":
        at = records[-1][0]
        _truncate(weights, weights.stat().st_size - at - 20)  # the last blob's record is cut
        return PackageError, (str(WEIGHTS),), rf"blob header at offset {at} needs 64 bytes, the file has {at + 20}$"
    if case == "garbled-blob-header":
        at = records[0][0]
        with open(weights, "r+b") as f:
            f.seek(at)
            f.write(b"\x00" * 16)
        return PackageError, (str(WEIGHTS),), rf"garbled blob header at offset {at} \(expected the marker 0xDEADBEEF"
    raise AssertionError(case)


CASES = ["missing", "not-a-folder", "no-manifest", "corrupt-manifest", "manifest-without-root", "no-spec",
         "garbled-spec", "no-weights", "truncated-weights", "truncated-record", "garbled-blob-header"]
READERS = {
    "evaluate": lambda p: evaluate(p, {"x": np.zeros((2, 8), np.float32)}),
    "Evaluator": lambda p: Evaluator(p),
    "lint": lint,
    "package_summary": package_summary,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", CASES)
def test_corrupted_package_gives_one_line_naming_reader_package_and_file(package, tmp_path, case, reader):
    pkg = tmp_path / "model.mlpackage"
    shutil.copytree(package, pkg)
    exc_type, names, pattern = corrupt(case, pkg)
    api_error(exc_type, READERS[reader], pkg, names=(f"[{reader}] {pkg}", *names), pattern=pattern)


@pytest.mark.parametrize("reader", ["evaluate", "Evaluator", "lint"])
def test_blob_of_the_wrong_type_gives_one_line(package, tmp_path, reader):
    """A record that is sane but declares fp32 data for an fp16 constant passes open_package's checks;
    coremltools' own RuntimeError while reading the program comes back as one PackageError line."""
    pkg = tmp_path / "model.mlpackage"
    shutil.copytree(package, pkg)
    at = blob_records(pkg / WEIGHTS)[0][0]
    with open(pkg / WEIGHTS, "r+b") as f:
        f.seek(at + 4)
        f.write(struct.pack("<I", 2))  # MIL blob data type 2 (fp32) where the spec wants fp16 (1)
    api_error(PackageError, READERS[reader], pkg, names=(f"[{reader}] {pkg}",),
              pattern=r"coremltools cannot read its program \(RuntimeError: .*data type")


def test_whole_package_opens_and_every_blob_is_checked(package):
    """The good package passes; the spec references exactly the blobs the file holds (both weights)."""
    opened = open_package(package)
    assert opened.spec.WhichOneof("Type") == "mlProgram"
    records = blob_records(package / WEIGHTS)
    assert [size for _, size, _ in records] == [8 * 16 * 2, 16 * 4 * 2]  # fp16 A and B
    assert package_summary(package)["functions"]["main"]["inputs"] == {"x": (2, 8)}


# ----------------------------------------------------------------------------- the export-coreml command line
def _args(converted, tmp_path):
    return {"vit": converted["vit"], "t5": converted["t5"], "llama": converted["llama"],
            "out": tmp_path / "out.mlpackage", "file": tmp_path / "file.mlpackage", "empty": tmp_path / "not-a-model"}


CLI_CASES = {  # id -> (argv with placeholders, names, pattern, exit code)
    "not-a-converted-model": (["{empty}", "{out}"], ("config.json", "not-a-model"), "expected a Hugging Face model", 2),
    "seq2seq-cannot-export": (["{t5}", "{out}"], ("T5Model", "seq2seq"), "no Core ML export", 2),
    "task-does-not-fit": (["{vit}", "{out}", "--task", "lm"], ("--task lm", "PretrainedViT"), "does not fit", 2),
    "bad-precision": (["{vit}", "{out}", "--precision", "float8"], ("--precision", "float8"), "invalid choice", 2),
    "bad-target": (["{vit}", "{out}", "--target", "iOS16"], ("--target", "iOS16"), "invalid choice", 2),
    "lm-target-without-states": (["{llama}", "{out}", "--target", "iOS17"], ("iOS17", "iOS18"), "states", 2),
    "capacity-zero": (["{llama}", "{out}", "--capacity", "0"], ("--capacity",), ">= 1, got 0", 2),
    "capacity-not-int": (["{llama}", "{out}", "--capacity", "many"], ("--capacity", "many"), "invalid int", 2),
    "flag-not-used-by-task": (["{vit}", "{out}", "--seq-len", "8"], ("--seq-len", "vit"), "not used by task", 2),
    "unknown-flag": (["{vit}", "{out}", "--fp8"], ("--fp8",), "unrecognized arguments", 2),
    "not-an-mlpackage-path": (["{vit}", "{empty}.zip"], (".mlpackage", ".zip"), "expected an output path", 2),
    "destination-is-a-file": (["{vit}", "{file}", "--overwrite"], ("file.mlpackage",), "is not a folder", 2),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_export_cli_bad_input_one_line_nothing_written(converted, tmp_path, capsys, case):
    argv, names, pattern, code = CLI_CASES[case]
    paths = _args(converted, tmp_path)
    paths["empty"].mkdir()
    paths["file"].write_text("mine")
    cli_error(capsys, ["export-coreml", *(a.format(**paths) for a in argv)], names=names, pattern=pattern,
              code=code, clean=[tmp_path], absent=[paths["out"]])
    assert paths["file"].read_text() == "mine"


def test_export_without_coremltools_says_so(converted, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    cli_error(capsys, ["export-coreml", converted["vit"], tmp_path / "out.mlpackage"], names=("coremltools",),
              pattern=r"needs coremltools \(pip install coremltools\)", clean=[tmp_path],
              absent=[tmp_path / "out.mlpackage"])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_to_an_existing_package_needs_overwrite(converted, package, tmp_path, capsys):
    dst = tmp_path / "model.mlpackage"
    shutil.copytree(package, dst)
    before = snapshot(dst)
    cli_error(capsys, ["export-coreml", converted["vit"], dst], names=(str(dst), "--overwrite"),
              pattern="exists and is not empty; pass --overwrite to replace it", clean=[tmp_path])
    assert snapshot(dst) == before


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_failed_export_leaves_nothing_and_an_existing_package_intact(converted, package, tmp_path, capsys,
                                                                     monkeypatch, existing):
    """The package's writer fails half-way (after writing part of the package): exit 1, one line, no staging
    folder, and the package that was there is byte for byte as before."""
    dst = tmp_path / "model.mlpackage"
    if existing:
        shutil.copytree(package, dst)
    before = snapshot(dst) if existing else None
    real_save = ct.models.MLModel.save

    def save_then_fail(self, path):
        real_save(self, path)
        _truncate(Path(path) / WEIGHTS, 100)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ct.models.MLModel, "save", save_then_fail)
    argv = ["export-coreml", converted["vit"], dst] + (["--overwrite"] if existing else [])
    cli_error(capsys, argv, names=("No space left on device",), code=1, clean=[tmp_path],
              absent=[] if existing else [dst])
    assert sorted(os.listdir(tmp_path)) == (["model.mlpackage"] if existing else [])
    if existing:
        assert snapshot(dst) == before
    assert_no_partial(tmp_path)
