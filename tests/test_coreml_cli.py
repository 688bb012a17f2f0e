"""``mlx-zeta export-coreml`` as a user runs it: silent unless ``--verbose``, Ctrl-C honoured at every
point (exit 130, one line, nothing half-written), an existing package replaced only with ``--overwrite``.

The Ctrl-C cases run the real command in a child process that sends itself a real SIGINT when a
chosen function is first called (``sys.setprofile``), so each lands at a known moment: as ``main``
starts, while the checkpoint loads, inside coremltools' import where its probe of scipy sits in a
bare ``except:`` (the interrupt used to be swallowed there and the export went on), during
coremltools' pass pipeline, and while the finished package is flushed to disk before it is moved
into place. The children run side by side to keep the wall time small.
"""

import importlib
import io
import json
import logging
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import mlx.core as mx  # noqa: E402

from badinput import assert_no_partial  # noqa: E402
from mlx_zeta.cli import main  # noqa: E402
from mlx_zeta.converters.coreml.metadata import read_metadata  # noqa: E402
from mlx_zeta.converters.pretrained import save_pretrained  # noqa: E402
from test_bad_coreml import CONVERTED, converted  # noqa: E402,F401  (the fixture)

DRIVER = r"""
import os, signal, sys
name, path_part = sys.argv[1].split("@")

def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_name == name and path_part in frame.f_code.co_filename:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)

from mlx_zeta.cli import main
sys.setprofile(profile)
code = main(sys.argv[2:])
sys.setprofile(None)
sys.exit(code)
"""
# moment -> the first call that triggers the SIGINT (function name @ part of its file's path)
MOMENTS = {"start": "build_parser@cli.py", "load": "from_pretrained@pretrained.py",
           "import": "<module>@scipy/__init__.py", "convert": "apply_pipeline@pass_pipeline.py",
           "write": "fsync_tree@common/files.py"}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    module = importlib.import_module("mlx_zeta.converters.vit")
    mx.random.seed(0)
    return save_pretrained(module.build(module.ModelArgs.from_dict(CONVERTED["vit"])),
                           tmp_path_factory.mktemp("vit") / "vit", config=CONVERTED["vit"])


@pytest.fixture(scope="module")
def runs(vit, tmp_path_factory):
    """moment -> (process, its output folder) for each interrupted child and a plain export ("quiet")."""
    root = tmp_path_factory.mktemp("runs")
    procs = {}
    for moment in [*MOMENTS, "quiet"]:
        out = root / moment
        out.mkdir()
        argv = [str(vit), str(out / "vit.mlpackage")]
        cmd = [sys.executable, "-c", DRIVER, MOMENTS[moment], "export-coreml", *argv] if moment in MOMENTS else \
            [sys.executable, "-m", "mlx_zeta", "export-coreml", *argv]
        procs[moment] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for moment, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[moment] = (proc.returncode, stdout, stderr, out)
    return results


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(runs, moment):
    code, stdout, stderr, out = runs[moment]
    expected = "mlx-zeta: interrupted" if moment == "start" else "mlx-zeta export-coreml: interrupted"
    assert (code, stdout, stderr) == (130, "", expected + "\n"), (code, stdout, stderr)
    assert list(out.iterdir()) == []


def test_export_prints_only_its_own_line(runs):
    """No progress bars, framework version warnings or "Failed to load _MLModelProxy" lines: stderr is
    empty and stdout is the one summary line."""
    code, stdout, stderr, out = runs["quiet"]
    assert code == 0 and stderr == "", stderr
    lines = stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported ") and "task vit" in lines[0], lines
    assert (out / "vit.mlpackage" / "Manifest.json").is_file()


def _global_state():
    from coremltools.converters.mil.mil.passes import pass_pipeline

    return logging.getLogger("coremltools").level, list(warnings.filters), pass_pipeline.tqdm


def test_overwrite_and_verbose(vit, tmp_path, capsys):
    """An existing package is replaced only with --overwrite (an empty folder needs no flag); the quiet
    export prints one stdout line and nothing on stderr, --verbose lets coremltools' progress bars
    through; either way coremltools' logger level, the warning filters and its tqdm are as before."""
    before = _global_state()
    dst = tmp_path / "a.mlpackage"
    dst.mkdir()
    (dst / "stale.txt").write_text("old export")
    assert main(["export-coreml", str(vit), str(dst)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (dst / "stale.txt").exists()
    assert main(["export-coreml", str(vit), str(dst), "--overwrite"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("exported ") and out.count("\n") == 1
    assert not (dst / "stale.txt").exists() and (dst / "Manifest.json").is_file()
    assert _global_state() == before
    (tmp_path / "empty.mlpackage").mkdir()
    assert main(["export-coreml", str(vit), str(tmp_path / "empty.mlpackage"), "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert "Running MIL default pipeline" in err and out.startswith("exported ")
    assert _global_state() == before
    assert_no_partial(tmp_path)


# ----------------------------------------------------------------------------- issue 18: the package's companions
# A tiny Llama checkpoint (transformers + a tiny trained tokenizer, tests/lm_tiny.py) exported as a user would,
# with its Hub repo id as SRC (resolved to the local folder): prefill lengths, the tokenizer copied beside the
# package, author / license / description and the special token ids in the package's metadata.
REPO_ID = "mlx-zeta-tests/tiny-llama"
LLAMA_ARGV = ["--capacity", "16", "--prefill-lens", "8,4,8", "--compress", "int8", "--copy-tokenizer", "--author", "A",
              "--license", "L", "--description", "D"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(checkpoint folder, package, exit status, stdout, stderr) of ``export-coreml REPO_ID`` with LLAMA_ARGV."""
    pytest.importorskip("transformers")
    from lm_tiny import make_llama

    from mlx_zeta.converters import pretrained

    root = tmp_path_factory.mktemp("tiny_llama")
    folder = make_llama(root / "hf")
    out = root / "out" / "model.mlpackage"
    real_resolve = pretrained.resolve
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(stdout), redirect_stderr(stderr):
        mp.setattr(pretrained, "resolve", lambda src, revision=None: folder if src == REPO_ID else real_resolve(src))
        code = main(["export-coreml", REPO_ID, str(out), *LLAMA_ARGV])
    return folder, out, code, stdout.getvalue(), stderr.getvalue()


def test_tokenizer_copied_byte_for_byte_beside_the_package(tiny_llama):
    folder, out, code, stdout, stderr = tiny_llama
    assert code == 0 and stderr == "", stderr
    copied = out.parent / "model.tokenizer"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.mlpackage", "model.tokenizer"]
    expected = sorted(p.name for p in folder.iterdir() if p.name not in ("config.json", "model.safetensors"))
    assert expected == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"], expected
    assert sorted(p.name for p in copied.iterdir()) == expected
    for name in expected:
        assert (copied / name).read_bytes() == (folder / name).read_bytes(), name
    line = stdout.strip()
    assert stdout.count("\n") == 1 and "compression int8)" in line and " KB in " in line, line
    assert "prefill_4(input_ids (1, 4), " in line and "prefill_8(" in line and "decode(" in line, line
    assert f"tokenizer (3 files) -> {copied}" in line, line


def test_cli_package_has_every_key_the_swift_sample_reads(tiny_llama):
    """The Swift sample's Contract.swift against a package the CLI exported: every metadata key it reads is
    in the package, and the tokenizer folder it looks for is the one --copy-tokenizer wrote."""
    from test_swift_contract import CONTRACT, swift_constants

    _, out, code, _, _ = tiny_llama
    assert code == 0
    c = swift_constants(CONTRACT)
    keys = sorted(v for k, v in c.items() if k.startswith("MetadataKey."))
    user = read_metadata(out)["user"]
    assert len(keys) >= 10 and [k for k in keys if k not in user] == []
    folder = out.with_name(out.stem + c["Contract.tokenizerFolderSuffix"])
    assert (folder / c["Contract.tokenizerFile"]).is_file()


def test_metadata_round_trip(tiny_llama):
    """Everything the CLI put in the package reads back: author, license, description, the source as given,
    and bos/eos/pad ids equal to what transformers reads from the checkpoint (its tokenizer and generation
    config), the tokenizer files' names, the prefill lengths."""
    import transformers

    folder, out, code, _, _ = tiny_llama
    assert code == 0
    meta = read_metadata(out)
    assert (meta["author"], meta["license"], meta["description"]) == ("A", "L", "D")
    json_keys = ("bos_token_id", "eos_token_ids", "pad_token_id", "tokenizer_files", "prefill_lengths", "capacity")
    user = {k: json.loads(meta["user"][f"mlx_zeta.{k}"]) for k in json_keys}
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    gen = transformers.GenerationConfig.from_pretrained(str(folder))
    assert (meta["user"]["mlx_zeta.source"], meta["user"]["mlx_zeta.model_type"]) == (REPO_ID, "llama")
    assert user["bos_token_id"] == gen.bos_token_id == tok.bos_token_id
    assert user["eos_token_ids"] == [gen.eos_token_id] == [tok.eos_token_id]
    assert user["pad_token_id"] == tok.pad_token_id == 0
    assert user["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert user["prefill_lengths"] == [4, 8] and user["capacity"] == 16
    assert (meta["user"]["mlx_zeta.task"], meta["user"]["mlx_zeta.compression"]) == ("causal-lm", "int8")


BERT = dict(model_type="bert", vocab_size=200, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=16)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BertEncoder checkpoint in our format (no tokenizer files)."""
    module = importlib.import_module("mlx_zeta.converters.bert")
    mx.random.seed(0)
    return save_pretrained(module.build(module.ModelArgs.from_dict(BERT)), tmp_path_factory.mktemp("bert") / "bert",
                           config=BERT)


# id -> (source, extra argv, what the one error line must contain). Each runs against an empty output folder.
BAD_FLAGS = {
    "pooling-on-an-lm": ("llama", ["--pooling", "mean"], "--pooling: not used by task lm"),
    "normalize-on-an-lm": ("llama", ["--normalize"], "--normalize: not used by task lm"),
    "pooling-on-a-vit": ("vit", ["--pooling", "cls", "--normalize"], "--pooling, --normalize: not used by task vit"),
    "normalize-without-pooling": ("bert", ["--normalize"], "--normalize needs --pooling mean or cls"),
    "pooling-unknown": ("bert", ["--pooling", "max"], "argument --pooling: invalid choice: 'max'"),
    "prefill-lens-zero": ("llama", ["--prefill-lens", "0"], "argument --prefill-lens: expected each length >= 1"),
    "prefill-lens-not-a-list": ("llama", ["--prefill-lens", "4;8"], "argument --prefill-lens: expected comma-sep"),
    "prefill-lens-over-capacity": ("llama", ["--capacity", "16", "--prefill-lens", "4,32"],
                                   "expected each --prefill-lens length <= --capacity 16, got 32"),
    "prefill-lens-on-an-encoder": ("bert", ["--prefill-lens", "4"], "--prefill-lens: not used by task encoder"),
    "compress-bogus": ("llama", ["--compress", "bogus"], "argument --compress: invalid choice: 'bogus'"),
    "compress-layer-without-equals": ("llama", ["--compress-layer", "layers.0"],
                                      "argument --compress-layer: expected PATTERN=MODE"),
    "compress-layer-without-pattern": ("llama", ["--compress-layer", "=int8"],
                                       "argument --compress-layer: expected PATTERN=MODE"),
    "compress-layer-bogus-mode": ("llama", ["--compress-layer", "layers.*=int3"],
                                  "argument --compress-layer: expected MODE one of"),
    "copy-tokenizer-without-tokenizer": ("vit", ["--copy-tokenizer"], "--copy-tokenizer: {src} has no tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_one_line_nothing_on_disk(case, converted, bert, tmp_path, capsys):
    from badinput import cli_error

    name, argv, message = BAD_FLAGS[case]
    src = bert if name == "bert" else converted[name]
    out = tmp_path / "out" / "model.mlpackage"
    cli_error(capsys, ["export-coreml", src, out, *argv], names=(message.format(src=src),), clean=[tmp_path])
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_existing_tokenizer_folder_needs_overwrite(converted, tmp_path, capsys):
    """An existing non-empty model.tokenizer/ is refused before anything is written (and kept as it was)."""
    from badinput import cli_error

    folder = tmp_path / "model.tokenizer"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    cli_error(capsys, ["export-coreml", converted["llama"], tmp_path / "model.mlpackage", "--copy-tokenizer"],
              names=(str(folder), "--overwrite"), pattern="exists and is not empty", clean=[tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tokenizer"]
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]


def test_failed_export_leaves_no_tokenizer_folder(tiny_llama, tmp_path, capsys, monkeypatch):
    """The package's final write fails: exit 1, one line, and neither the package nor the tokenizer folder
    (which is copied first) is left, nor any staging folder."""
    from badinput import cli_error

    folder = tiny_llama[0]

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ct.models.MLModel, "save", fail)
    monkeypatch.setattr(ct.utils, "save_multifunction", fail)
    cli_error(capsys, ["export-coreml", folder, tmp_path / "model.mlpackage", "--capacity", "8", "--prefill-lens", "4",
                       "--copy-tokenizer"], names=("No space left on device",), code=1, clean=[tmp_path])
    assert list(tmp_path.iterdir()) == []


def test_encoder_pooling_flags_export_embeddings(bert, tmp_path, capsys):
    """--pooling mean --normalize: the package's one output is 'embeddings' (1, hidden), the normalised masked
    mean of the model's hidden states (as the MLX model computes it), padding included in the input."""
    from cli_run import run
    from mlx_zeta.converters.coreml import Evaluator, package_summary
    from mlx_zeta.converters.pretrained import from_pretrained
    from mlx_zeta.models.bert import mean_pool

    out = tmp_path / "bert.mlpackage"
    code, stdout, err = run(capsys, "export-coreml", bert, out, "--seq-len", "8", "--pooling", "mean", "--normalize")
    assert code == 0 and err == "", err
    assert package_summary(out)["functions"]["main"] == {"inputs": {"input_ids": (1, 8), "attention_mask": (1, 8)},
                                                         "outputs": ["embeddings"]}
    ids, mask = np.array([[5, 7, 9, 11, 13, 2, 0, 0]], np.int32), np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    got = Evaluator(out)({"input_ids": ids, "attention_mask": mask})["embeddings"]
    model = from_pretrained(bert)
    ref = np.array(mean_pool(model(mx.array(ids), mx.array(mask)), mx.array(mask), normalize=True))
    assert got.shape == (1, BERT["hidden_size"]) and np.abs(got - ref).max() < 2e-3, np.abs(got - ref).max()
    meta = read_metadata(out)
    user = meta["user"]
    assert (user["mlx_zeta.pooling"], user["mlx_zeta.normalize"], user["mlx_zeta.seq_len"]) == ("mean", "true", "8")
    assert meta["outputs"] == {"embeddings": "(B, hidden) float32: the mean over the tokens of attention_mask, "
                                             "L2-normalised"}
    assert set(meta["inputs"]) == {"input_ids", "attention_mask"} and "padding" in meta["inputs"]["attention_mask"]
    assert (user["mlx_zeta.task"], user["mlx_zeta.tokenizer_files"]) == ("encoder", "[]")


# ----------------------------------------------------------------------------- special token ids of a checkpoint
@pytest.mark.parametrize("maker", ["llama", "qwen3"])
@pytest.mark.parametrize("where", ["all", "tokenizer-only"])
def test_special_token_ids_match_transformers(maker, where, tmp_path):
    """bos / eos / pad as transformers reads them: from generation_config.json and config.json, or (with those
    ids removed) from the tokenizer's own special tokens."""
    transformers = pytest.importorskip("transformers")
    from lm_tiny import MAKERS

    from mlx_zeta.converters.coreml.source import special_token_ids

    folder = MAKERS[maker](tmp_path / maker)
    config = json.loads((folder / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if where == "all":
        gen = transformers.GenerationConfig.from_pretrained(str(folder))
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        expected = {"bos_token_id": gen.bos_token_id, "eos_token_ids": eos, "pad_token_id": config["pad_token_id"]}
    else:
        (folder / "generation_config.json").unlink()
        config = {k: v for k, v in config.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        expected = {"bos_token_id": tok.bos_token_id, "eos_token_ids": [tok.eos_token_id],
                    "pad_token_id": tok.pad_token_id}
    assert special_token_ids(folder, config) == expected
    assert expected["eos_token_ids"] and expected["pad_token_id"] is not None  # the check is not vacuous


# ----------------------------------------------------------------------------- --compress and --compress-layer
def test_compress_flags_compose_into_one_policy():
    """--compress MODE applies to every weight; each --compress-layer PATTERN=MODE wins for the modules it
    matches (the longest pattern first), role keys included; without --compress the rest stays float."""
    from mlx_zeta.cli import build_parser
    from mlx_zeta.converters.cli import _compression
    from mlx_zeta.converters.coreml.compress import policy

    def modes(*flags):
        mode_of = policy(_compression(build_parser().parse_args(["export-coreml", "src", "o.mlpackage", *flags])))
        return [mode_of(path, role) for path, role in (("layers.0.attn.wq", None), ("layers.1.attn.wq", None),
                                                      ("token_emb", "embedding"), ("to_logits", "head"))]

    assert modes() == ["none"] * 4
    assert modes("--compress", "int4") == ["int4-block32"] * 4
    assert modes("--compress", "int4", "--compress-layer", "@embedding=int8", "--compress-layer", "@head=int8") == \
        ["int4-block32", "int4-block32", "int8", "int8"]
    assert modes("--compress", "none") == ["none"] * 4
    assert modes("--compress", "palettize4", "--compress-layer", "layers.0.*=int8", "--compress-layer",
                 "@head=palettize6") == ["int8", "palettize4", "palettize4", "palettize6"]
    assert modes("--compress-layer", "layers.*=int8", "--compress-layer", "layers.1.*=none") == \
        ["int8", "none", "none", "none"]
    assert _compression(build_parser().parse_args(["export-coreml", "s", "o.mlpackage", "--compress",
                                                   "ternary-dense"])) == "ternary-dense"


def test_compress_int8_encoder_package_is_smaller_and_close(bert, tmp_path, capsys):
    """--compress int8 on an encoder: the summary names it, weight.bin shrinks to under 0.6x of fp16's, and the
    package still evaluates near MLX (int8 per-channel weights)."""
    from cli_run import run
    from mlx_zeta.converters.coreml import Evaluator
    from mlx_zeta.converters.pretrained import from_pretrained

    sizes = {}
    for flags in ([], ["--compress", "int8"]):
        out = tmp_path / f"bert{len(flags)}.mlpackage"
        code, stdout, err = run(capsys, "export-coreml", bert, out, "--seq-len", "8", *flags)
        assert code == 0 and err == "" and f"compression {'int8' if flags else 'none'})" in stdout, (stdout, err)
        sizes[len(flags)] = (out / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert sizes[2] < 0.6 * sizes[0], sizes
    ids, mask = np.array([[5, 7, 9, 11, 13, 2, 0, 0]], np.int32), np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    got = Evaluator(tmp_path / "bert2.mlpackage")({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    ref = np.array(from_pretrained(bert)(mx.array(ids), mx.array(mask)))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max(), np.abs(got - ref).max()


@pytest.mark.parametrize("pooling", [[], ["--pooling", "cls"]], ids=["hidden-states", "pooled"])
def test_compress_layer_patterns_name_the_models_own_modules(pooling, bert, tmp_path, capsys, monkeypatch):
    """PATTERNs are module paths of the model as loaded (model.named_modules()), with or without the pooling
    head around it: 'embeddings.*=none' keeps exactly the embeddings float, every other matrix is int8."""
    from cli_run import run
    from mlx_zeta.converters.coreml import export, weights
    from mlx_zeta.converters.pretrained import from_pretrained

    seen = {}
    real = weights.compressed_constants

    def spy(graph, model, *args):
        compressed, stats = real(graph, model, *args)
        seen.update(stats["modes"])
        return compressed, stats

    monkeypatch.setattr(export, "compressed_constants", spy)
    code, _, err = run(capsys, "export-coreml", bert, tmp_path / "b.mlpackage", "--seq-len", "8", *pooling,
                       "--compress", "int8", "--compress-layer", "embeddings.*=none")
    assert code == 0, err
    prefix = "encoder." if pooling else ""
    matrices = [path for path, m in from_pretrained(bert).named_modules()
                if type(m).__name__ in ("Linear", "Embedding")]
    expected = {prefix + path: "int8" for path in matrices if not path.startswith("embeddings.") and path != "pooler"}
    assert len(expected) == 6 and seen == expected  # q, k, v, out, ff in, ff out (the pooler is not traced)


def test_mlx_quantized_source_summary_and_one_line_warning(tiny_llama, tmp_path, capsys):
    """A checkpoint converted with --quantize 4 (bfloat16, so its fp16 decode is a few ulps off MLX's): the
    summary says its quantized layers are exported as stored, and core's warning about the measured error
    comes once, as one 'mlx-zeta export-coreml: warning:' line (not once per prefill/decode function)."""
    from cli_run import run

    q4 = tmp_path / "q4"
    code, _, err = run(capsys, "convert", tiny_llama[0], q4, "--quantize", "4", "--group-size", "32",
                       "--dtype", "bfloat16")
    assert code == 0, err
    code, out, err = run(capsys, "export-coreml", q4, tmp_path / "q4.mlpackage", "--capacity", "16",
                         "--prefill-lens", "4,8")
    assert code == 0 and "compression none; 14 MLX-quantized layers as stored)" in out, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-zeta export-coreml: warning: [export_coreml] MLX-affine"), lines
