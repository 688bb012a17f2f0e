"""``mlx-zeta export-coreai`` as a user runs it, every bundle run by Apple's own runtime (``coreai-core``).

A tiny Llama made by transformers (``test_convert_llama.make``) goes through the CLI as SRC, and its
float32-weight bundle must greedy-decode MLX's 32 tokens with the KV cache as state; its compressed
bundle (int4, the head int8) runs and is smaller than the float16 one. A ViT and a BERT encoder
(pooled and L2-normalised inside the bundle) built from tiny configs are exported and compared with
MLX (the pooling with numpy). Bad input exits 2 with one line and leaves nothing at OUT.
"""

import importlib
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from mlx_zeta.converters.coreai import available

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Core AI runtime unavailable: {WHY}")

import mlx_zeta  # noqa: E402  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from badinput import cli_error  # noqa: E402
from mlx_zeta.cli import main  # noqa: E402
from mlx_zeta.converters.coreai import Bundle, read_bundle_metadata  # noqa: E402
from mlx_zeta.converters.pretrained import save_pretrained  # noqa: E402
from test_coreai_export import REL_OF_MAX, greedy_check, rel_error, run_decoder  # noqa: E402

LM_ARGV = ["--capacity", "64", "--prefill-lens", "8,4"]
EXPORTS = {  # name -> the CLI options of that export of the tiny Llama
    "float32": [*LM_ARGV, "--weights", "float32", "--dynamic-prefill", "1,16"],
    "float16": LM_ARGV,
    "int4": [*LM_ARGV, "--weights", "float32", "--compress", "int4", "--compress-layer", "@head=int8",
             "--copy-tokenizer", "--author", "A", "--license", "L", "--description", "D"],
}
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 7]}  # generation_config.json written beside the weights


def cli(argv) -> tuple:
    """``(exit status, stdout, stderr)`` of ``mlx-zeta argv``, in-process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(checkpoint folder, {name: (status, stdout, stderr, bundle)}) of the EXPORTS of a tiny random Llama."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_convert_llama import make

    root = tmp_path_factory.mktemp("coreai_llama")
    folder = make("llama-gqa-untied", root / "hf")[1]
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    runs = {}
    for name, argv in EXPORTS.items():
        out = root / "out" / f"{name}.aimodel"
        runs[name] = (*cli(["export-coreai", folder, out, *argv]), out)
    return folder, runs


def test_cli_llama_float32_greedy_32_of_32(llama):
    folder, runs = llama
    code, stdout, stderr, path = runs["float32"]
    assert code == 0 and stderr == "", stderr
    assert stdout.count("\n") == 1 and "task lm, float32 weights, compression none" in stdout, stdout
    assert "function(s) prefill_4, prefill_8, prefill, decode: (input_ids, position) -> logits, 4 state(s)" \
        in stdout, stdout
    model = mlx_zeta.from_pretrained(folder)
    agree, rel = greedy_check(model, path)
    print(f"\nCLI tiny Llama, core ai float32 weights: greedy {agree}/32, max rel logit error {rel:.2e}")
    assert agree == 32 and rel <= REL_OF_MAX
    agree, rel = greedy_check(model, path, calls=[("prefill", 11, 11)])  # the 11-token prompt in one dynamic call
    assert agree == 32 and rel <= REL_OF_MAX, (agree, rel)


def test_cli_llama_compressed_runs_and_is_smaller(llama):
    """int4 with the head at int8: the bundle is well under the float16 one, and it runs as MLX does with
    each weight decoded from its mode (int4 everywhere, int8 for the head ``to_logits``), at float32
    rounding (float32 scales): the CLI's policy reached every layer as asked (the head at int4 too, or
    the embedding at int8, would be 0.09 / 0.13 away), and Apple's runtime decodes what we wrote."""
    folder, runs = llama
    size = {name: sum(p.stat().st_size for p in runs[name][3].rglob("*") if p.is_file()) for name in runs}
    assert runs["int4"][:3:2] == (0, ""), runs["int4"][2]
    assert "compression int4-block32; @head int8" in runs["int4"][1]
    prompt, tokens = [3, 5, 7, 9, 11], [4, 6, 8]
    model = mlx_zeta.from_pretrained(folder)
    ref = np.array(model(mx.array([prompt + tokens])))[0]
    decoded = decoded_model(folder, lambda path: "int8" if path == "to_logits" else "int4")
    ref_q = np.array(decoded(mx.array([prompt + tokens])))[0]
    got = {name: run_decoder(runs[name][3], prompt, tokens) for name in ("float16", "int4")}
    rel = {"float16": rel_error(got["float16"], ref), "int4": rel_error(got["int4"], ref_q),
           "int4 vs float": rel_error(got["int4"], ref)}
    print(f"\nCLI tiny Llama bundles: {size} bytes; rel logit error {rel}")
    # measured 125,642 / 213,373 / 364,502 bytes: ~60 KB of each is program text, not weights
    assert size["int4"] < 0.4 * size["float32"] and size["int4"] < 0.65 * size["float16"], size
    assert rel["float16"] < 1e-2 and rel["int4"] <= REL_OF_MAX, rel


def decoded_model(folder, mode_of):
    """The checkpoint with each float Linear / Embedding weight replaced by its compressed form decoded
    (``mode_of(module path)``), the reference of a compressed export."""
    import mlx.nn as nn

    from mlx_zeta.converters.coreml.compress import compress_weight

    model = mlx_zeta.from_pretrained(folder)
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight = mx.array(compress_weight(np.array(module.weight), mode_of(path)).decode())
    return model


def test_cli_metadata_keys_and_tokenizer_copy(llama):
    folder, runs = llama
    code, stdout, _, path = runs["int4"]
    meta = read_bundle_metadata(path)
    user = meta["user"]
    assert (meta["author"], meta["license"], meta["description"]) == ("A", "L", "D")
    assert user["mlx_zeta.source"] == str(folder) and user["mlx_zeta.model_type"] == "llama"
    assert json.loads(user["mlx_zeta.bos_token_id"]) == 1 and json.loads(user["mlx_zeta.pad_token_id"]) is None
    assert json.loads(user["mlx_zeta.eos_token_ids"])[:2] == [2, 7]
    files = ["generation_config.json", "tokenizer_config.json"]
    assert sorted(json.loads(user["mlx_zeta.tokenizer_files"])) == files
    assert (user["mlx_zeta.task"], json.loads(user["mlx_zeta.prefill_lengths"])) == ("causal-lm", [4, 8])
    assert user["mlx_zeta.compression"] == "int4-block32; @head int8" and user["mlx_zeta.capacity"] == "64"
    copied = path.with_name("int4.tokenizer")
    assert sorted(p.name for p in copied.iterdir()) == files and f"tokenizer (2 files) -> {copied}" in stdout
    for name in files:
        assert (copied / name).read_bytes() == (folder / name).read_bytes()


def test_cli_float16_weights_take_half_the_bytes(llama):
    """A plain cast of a float16 constant is folded to float32 by coreai.authoring (measured: equal sizes);
    the weights are stored through blockwise_shift_scale (converters/coreai/weights.py emit_float16)."""
    size = {name: sum(p.stat().st_size for p in runs[3].rglob("*") if p.is_file()) for name, runs in llama[1].items()}
    assert size["float16"] < 0.6 * size["float32"], size


TINY = {  # converter module -> config.json of a tiny random model of it (built without torch)
    "vit": dict(model_type="vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                image_size=8, patch_size=4, num_labels=3, architectures=["ViTForImageClassification"]),
    "bert": dict(model_type="bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                 vocab_size=40, max_position_embeddings=16, architectures=["BertModel"]),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``name -> (folder, model)`` of the TINY checkpoints."""
    root, out = tmp_path_factory.mktemp("coreai_tiny"), {}
    for name, config in TINY.items():
        module = importlib.import_module(f"mlx_zeta.converters.{name}")
        mx.random.seed(0)
        model = module.build(module.ModelArgs.from_dict(config))
        out[name] = (save_pretrained(model, root / name, config=config), model)
    return out


def test_cli_vit_runs_like_mlx(tiny, tmp_path):
    folder, model = tiny["vit"]
    code, stdout, stderr = cli(["export-coreai", folder, tmp_path / "vit.aimodel", "--weights", "float32"])
    assert code == 0 and stderr == "" and "task vit" in stdout, stderr
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    with Bundle(tmp_path / "vit.aimodel") as bundle:
        got = bundle("main", {"pixel_values": x})["logits"]
    assert rel_error(got, model(mx.array(x))) <= REL_OF_MAX


def test_cli_bert_pooled_normalised_runs(tiny, tmp_path):
    """--pooling mean --normalize: the bundle's 'embeddings' are the masked mean of MLX's hidden states,
    L2-normalised (computed here in numpy); padding positions do not count."""
    folder, model = tiny["bert"]
    path = tmp_path / "bert.aimodel"
    code, stdout, stderr = cli(["export-coreai", folder, path, "--seq-len", "8", "--pooling", "mean", "--normalize",
                                "--weights", "float32"])
    assert code == 0 and stderr == "" and "task encoder" in stdout, stderr
    ids, mask = np.array([[5, 7, 9, 11, 13, 2, 0, 0]], np.int32), np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    with Bundle(path) as bundle:
        got = bundle("main", {"input_ids": ids, "attention_mask": mask})["embeddings"]
    hidden = np.array(model(mx.array(ids), mx.array(mask)), np.float64)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert rel_error(got, mean / np.linalg.norm(mean, axis=-1, keepdims=True)) <= REL_OF_MAX
    user = read_bundle_metadata(path)["user"]
    assert (user["mlx_zeta.pooling"], user["mlx_zeta.normalize"], user["mlx_zeta.seq_len"]) == ("mean", "true", "8")


ERRORS = {  # id -> (argv after the command with placeholders, names in the line, pattern)
    "bad-compress": (["{vit}", "{out}", "--compress", "int3"], ("--compress", "int3"), "invalid choice"),
    "bad-compress-layer": (["{vit}", "{out}", "--compress-layer", "@head=int3"], ("int3",), "expected MODE"),
    "not-an-aimodel": (["{vit}", "{tmp}/vit.mlpackage"], (".aimodel", "vit.mlpackage"), "expected an output path"),
    "missing-src": (["{tmp}/no-such-model", "{out}"], ("no-such-model",), "neither an existing folder"),
    "option-of-another-task": (["{vit}", "{out}", "--capacity", "8"], ("--capacity", "vit"), "not used by task"),
    "dynamic-prefill-of-a-vit": (["{vit}", "{out}", "--dynamic-prefill", "1,8"], ("--dynamic-prefill", "vit"),
                                 "for decoder LMs"),
    "bad-dynamic-prefill": (["{vit}", "{out}", "--dynamic-prefill", "8"], ("MIN,MAX", "'8'"), "expected MIN,MAX"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_cli_errors_exit_2_with_one_line_and_nothing_written(tiny, tmp_path, capsys, case):
    argv, names, pattern = ERRORS[case]
    paths = {"vit": tiny["vit"][0], "out": tmp_path / "out.aimodel", "tmp": tmp_path}
    cli_error(capsys, ["export-coreai", *(a.format(**paths) for a in argv)], names=names, pattern=pattern,
              clean=[tmp_path], absent=[paths["out"], tmp_path / "vit.mlpackage"])
    assert list(tmp_path.iterdir()) == []


def test_cli_without_coreai_says_how_to_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "coreai", None)  # import coreai -> ImportError
    cli_error(capsys, ["export-coreai", tiny["vit"][0], tmp_path / "vit.aimodel"], names=("coreai-core",),
              pattern=r"pip install 'mlx-zeta\[coreai\]'", clean=[tmp_path], absent=[tmp_path / "vit.aimodel"])
