"""The ``mlx-zeta convert`` command line on a tiny random Llama checkpoint made with transformers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx_zeta  # noqa: E402
from mlx_zeta.cli import main  # noqa: E402
from cli_run import run  # noqa: E402
from mlx_zeta.converters.cli import parse_size  # noqa: E402
from mlx_zeta.converters.pretrained import quantize  # noqa: E402
from test_convert_llama import make, tokens  # noqa: E402

IDS = mx.array(tokens())


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """hidden 64, 2 layers, 4 heads / 2 kv heads, intermediate 96, vocabulary 120, float32."""
    return make("llama-gqa-untied", tmp_path_factory.mktemp("cli") / "hf")[1]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_convert_float16_reloads_exactly_the_in_memory_conversion(src, tmp_path, capsys):
    code, out, err = run(capsys, "convert", src, tmp_path / "f16", "--dtype", "float16", "--max-shard-size", "20KB")
    assert code == 0, err
    assert "llama" in out and "parameters" in out and " s " in out and "shard(s)" in out
    assert len(list((tmp_path / "f16").glob("model-*-of-*.safetensors"))) > 1  # --max-shard-size took effect
    ours = mlx_zeta.from_pretrained(tmp_path / "f16")
    ref = mlx_zeta.from_pretrained(src, dtype="float16")
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(ref.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == mx.float16 and mx.array_equal(a[k], b[k]), k
    assert mx.array_equal(ours(IDS), ref(IDS))
    assert f"{sum(v.size for v in b.values()):,} parameters" in out


def test_quantize_4_is_smaller_and_close_to_the_float_model(src, tmp_path, capsys):
    code, _, err = run(capsys, "convert", src, tmp_path / "q4", "--quantize", "4", "--group-size", "32")
    assert code == 0, err
    assert "quantized 14 layers to 4 bits (group size 32)" in err  # 2 x 6 Linears, embedding, head
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    spec = config["mlx_zeta_quantization"]
    assert (spec["bits"], spec["group_size"], len(spec["layers"])) == (4, 32, 14) and "to_logits" in spec["layers"]
    # 4-bit words + a float32 scale and bias per 32 weights: 0.75 bytes per weight against 4
    assert weight_bytes(tmp_path / "q4") > 0  # a folder without weights must not pass as 0 < 0.25 * x
    assert weight_bytes(tmp_path / "q4") < 0.25 * weight_bytes(src)
    reloaded = mlx_zeta.from_pretrained(tmp_path / "q4")
    in_memory = mlx_zeta.from_pretrained(src)
    quantize(in_memory, 4, 32)
    assert mx.array_equal(reloaded(IDS), in_memory(IDS))
    # Against the float model. Affine rounding puts a uniform error of step/sqrt(12) on each
    # weight, step = group range / (2**bits - 1): about 8% of the weights' std at 4 bits, group
    # 32. This random model (weights lifted x5 by make(), so attention is sharp) amplifies that
    # about 5x by the logits: measured relative RMS error 0.38 at 4 bits and 0.024 at 8 bits
    # (max |diff| 0.38 and 0.028 of max |logit|). Bounds: 0.5 and 0.04, and the 4-bit/8-bit
    # ratio near 255/15 = 17, which holds only when the error is the rounding's (a wrong layout
    # or group gives errors near 1 at both widths).
    ref = np.array(mlx_zeta.from_pretrained(src)(IDS))
    eight = mlx_zeta.from_pretrained(src)
    quantize(eight, 8, 32)
    err4, err8 = (np.linalg.norm(np.array(m(IDS)) - ref) / np.linalg.norm(ref) for m in (reloaded, eight))
    assert err4 < 0.5 and err8 < 0.04 and 10 < err4 / err8 < 30, (err4, err8)


def _unknown_type(tmp_path):
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    return tmp_path / "mamba"


def _missing_key(tmp_path, src):
    folder = tmp_path / "broken"
    folder.mkdir()
    weights = {k: v for k, v in mx.load(str(src / "model.safetensors")).items() if "layers.1.self_attn.k_proj" not in k}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text((src / "config.json").read_text())
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing", r"missing' is neither an existing folder nor a Hub repo id"),
    ("unknown", r"unsupported model_type 'mamba'; supported: .*llama"),
    ("broken", r"checkpoint does not match the model: missing keys 1: attn_layers\.layers\.1\.attn\.to_k\.weight"),
])
def test_bad_input_exits_2_with_one_line_and_no_dst(case, message, src, tmp_path, capsys):
    folder = {"missing": lambda: tmp_path / "missing", "unknown": lambda: _unknown_type(tmp_path),
              "broken": lambda: _missing_key(tmp_path, src)}[case]()
    code, out, err = run(capsys, "convert", folder, tmp_path / "out")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mlx-zeta convert: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_write_leaves_no_dst_and_existing_dst_needs_overwrite(src, tmp_path, capsys, monkeypatch):
    calls = []

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save(path, *args, **kwargs)

    save = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    code, _, err = run(capsys, "convert", src, tmp_path / "out", "--max-shard-size", "20KB")
    assert code == 1 and "No space left on device" in err and len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither out nor its temporary sibling
    monkeypatch.undo()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "is not empty; pass --overwrite" in err
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    assert run(capsys, "convert", src, tmp_path / "out", "--overwrite")[0] == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "notes.txt"]


def test_usage_errors_and_sizes(capsys):
    assert main(["convert", "a"]) == 2 and "required: dst" in capsys.readouterr().err
    assert main(["convert", "a", "b", "--quantize", "3"]) == 2
    assert main(["convert", "a", "b", "--group-size", "32"]) == 2
    assert "--group-size needs --quantize" in capsys.readouterr().err
    assert main([]) == 2
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024
    assert parse_size("1.5 mb") == 1_500_000


def test_installed_console_script_converts(src, tmp_path):
    script = Path(sys.executable).parent / "mlx-zeta"
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable}: pip install -e . installs it")
    proc = subprocess.run([str(script), "convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # progress (the tqdm bar, "writing ...") goes to a terminal only, not to this pipe
    assert proc.stdout.startswith(f"converted {src} (llama, ") and "loading hf" not in proc.stderr
    model = mlx_zeta.from_pretrained(tmp_path / "bf16")
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(model.parameters()))


def test_a_source_without_tokenizer_gets_a_note_and_one_with_it_is_copied(src, tmp_path, capsys):
    import shutil

    code, _, err = run(capsys, "convert", src, tmp_path / "bare")
    assert code == 0 and f"note: no tokenizer files found in {src}; the converted folder has none" in err, err
    assert mlx_zeta.from_pretrained(tmp_path / "bare").pretrained.tokenizer == ()
    with_tokenizer = Path(shutil.copytree(src, tmp_path / "with"))
    files = {"tokenizer.json": '{"model": {"type": "BPE"}}', "tokenizer_config.json": "{}", "merges.txt": "a b\n"}
    for name, text in files.items():
        (with_tokenizer / name).write_text(text)
    code, _, err = run(capsys, "convert", with_tokenizer, tmp_path / "out")
    assert code == 0 and "note:" not in err, err
    assert {name: (tmp_path / "out" / name).read_text() for name in files} == files
    assert mlx_zeta.from_pretrained(tmp_path / "out").pretrained.tokenizer == (
        "tokenizer.json", "tokenizer_config.json", "merges.txt")


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOOL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"


def _hf_tokenizer(folder: Path) -> None:
    """A ByteLevel BPE trained here with ``tokenizers``, saved by transformers with a chat template
    (as ``chat_template.jinja``) and a second, named one (``additional_chat_templates/tool_use.jinja``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, a tiny corpus for a tiny tokenizer"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    fast.chat_template = {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE}
    fast.save_pretrained(str(folder))


def test_every_tokenizer_and_template_file_is_copied_byte_for_byte(src, tmp_path, capsys):
    """Every file of AUXILIARY_FILES (and the additional_chat_templates folder) arrives byte-identical,
    and transformers' AutoTokenizer renders the same chat templates from the output as from the source."""
    import shutil

    from transformers import AutoTokenizer

    from mlx_zeta.converters.pretrained import AUXILIARY_FILES

    folder = Path(shutil.copytree(src, tmp_path / "src"))
    _hf_tokenizer(folder)
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"chat_template.jinja", "additional_chat_templates/tool_use.jinja"} <= written  # what transformers writes
    for name in AUXILIARY_FILES:  # the rest: placeholders (a JSON one must parse), odd bytes kept as they are
        if not (folder / name).exists():
            text = '{ }\r\n' if name.endswith(".json") else "x\r\ny\x00 \u00e9\n"
            (folder / name).write_bytes(text.encode())
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and not p.name.endswith(".safetensors") and p.name != "config.json"}
    code, _, err = run(capsys, "convert", folder, tmp_path / "out")
    assert code == 0 and "note:" not in err, err
    assert {name: (tmp_path / "out" / name).read_bytes() for name in files} == files
    assert set(files) == set(AUXILIARY_FILES) | {"additional_chat_templates/tool_use.jinja"}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ours, theirs = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(folder)
    for name in (None, "tool_use"):
        rendered = ours.apply_chat_template(messages, chat_template=name, tokenize=False, add_generation_prompt=True)
        assert rendered == theirs.apply_chat_template(messages, chat_template=name, tokenize=False,
                                                      add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|system|>be brief\n<|user|>hello\n<|assistant|>"
