"""``mlx-zeta lora``, ``mlx-zeta fuse`` and ``mlx-zeta generate --adapter-path`` (``mlx_zeta.lm.tune_cli``,
``mlx_zeta.lm.cli``) end to end on a tiny Llama chat model (tests/lm_tiny.py) and a tiny dataset: the
adapters they write are the ones the Python API applies, the fused model computes what the model
with its adapters computes, and PEFT's export loads in transformers + peft."""

import json
import re

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

from mlx_zeta.cli import main
from cli_run import one_line, run

QA = [("what colour is the sky?", "blue, always blue."), ("what colour is grass?", "green, always green."),
      ("what colour is snow?", "white, always white."), ("what colour is coal?", "black, always black.")]


def write_data(folder):
    folder.mkdir()
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    (folder / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats * 2))
    (folder / "valid.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:2]))
    return folder


def logits(model, ids=((1, 5, 9, 30, 44, 7, 100),)):
    return np.array(model(mx.array(ids)).astype(mx.float32))


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory):
    """(model folder, data folder, adapter folder) after ``mlx-zeta lora`` ran a few steps."""
    root = tmp_path_factory.mktemp("tune-cli")
    folder, data, adapters = tiny_lm("llama"), write_data(root / "data"), root / "adapters"
    code = main([str(a) for a in ("lora", "--model", folder, "--data", data, "--iters", 4, "--batch-size", 2,
                                  "--rank", 4, "--alpha", 8, "--learning-rate", 1e-2, "--steps-per-eval", 4,
                                  "--val-batches", 1, "--save-every", 4, "--adapter-path", adapters, "--seed", 3)])
    assert code == 0
    return folder, data, adapters


def test_lora_writes_adapters_that_generate_applies(trained, capsys):
    from mlx_zeta.lm import load, prompt_ids, stream_generate

    folder, _, adapters = trained
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["format"] == "mlx_zeta-adapters" and config["rank"] == 4 and config["scale"] == 2.0
    assert (adapters / "adapters.safetensors").is_file()
    argv = ("generate", "--model", folder, "--prompt", QA[0][0], "--max-tokens", 12)
    code, base_text, _ = run(capsys, *argv)
    assert code == 0
    code, text, err = run(capsys, *argv, "--adapter-path", adapters)
    assert code == 0, err
    model, tok = load(folder, adapter_path=adapters)  # the Python API, same adapters
    ids = prompt_ids(tok, [{"role": "user", "content": QA[0][0]}])
    assert text == "".join(r.text for r in stream_generate(model, tok, ids, 12)) + "\n"
    assert text != base_text


def test_fuse_writes_the_model_with_its_adapters(trained, tmp_path, capsys):
    from mlx_zeta.converters import from_pretrained
    from mlx_zeta.lm import load

    folder, data, adapters = trained
    code, out, err = run(capsys, "fuse", "--model", folder, "--adapter-path", adapters,
                         "--save-path", tmp_path / "fused", "--data", data)
    assert code == 0, err
    modules = json.loads((adapters / "adapter_config.json").read_text())["modules"]
    m = re.fullmatch(rf"fused {len(modules)} adapters into {re.escape(str(folder))} -> "
                     rf"{re.escape(str(tmp_path / 'fused'))}; validation loss ([\d.]+) with adapters, ([\d.]+) fused "
                     r"\([-+]\d\.\d\de[-+]\d+\)", one_line(out))
    assert m, out
    before, after = float(m.group(1)), float(m.group(2))
    assert abs(before - after) < 1e-4  # a float model: fusing changes nothing but rounding
    adapted, _ = load(folder, adapter_path=adapters)
    expected = logits(adapted)
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "fused")), expected,
                               atol=2e-5 * np.abs(expected).max())
    base = logits(from_pretrained(folder))
    assert np.abs(base - expected).max() > 1e-2


def test_fuse_to_hf_and_export_peft_load_in_transformers(trained, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mlx_zeta.lm import load

    folder, _, adapters = trained
    code, _, err = run(capsys, "fuse", "--model", folder, "--adapter-path", adapters, "--save-path", tmp_path / "hf",
                       "--to", "hf", "--export-peft", tmp_path / "peft")
    assert code == 0, err
    adapted, _ = load(folder, adapter_path=adapters)
    expected = logits(adapted)
    ids = torch.tensor([[1, 5, 9, 30, 44, 7, 100]])
    with torch.no_grad():
        fused = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
        base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        for model in (fused, with_peft):
            np.testing.assert_allclose(model(ids).logits.numpy(), expected, atol=2e-5 * np.abs(expected).max())


def test_generate_applies_a_peft_folder_as_load_does(trained, tmp_path, capsys):
    from mlx_zeta.lm import load
    from mlx_zeta.lm.adapters_hf import save_peft

    folder, _, adapters = trained
    ours, _ = load(folder, adapter_path=adapters)
    save_peft(ours, tmp_path)
    theirs, _ = load(folder, adapter_path=tmp_path)  # detected as PEFT's by adapter_config.json
    np.testing.assert_allclose(logits(theirs), logits(ours), atol=1e-5 * np.abs(logits(ours)).max())
    argv = ("generate", "--model", folder, "--prompt", QA[1][0], "--max-tokens", 8)
    assert run(capsys, *argv, "--adapter-path", adapters)[1] == run(capsys, *argv, "--adapter-path", tmp_path)[1]


def test_full_fine_tuning_saves_a_model_that_scores_what_it_reported(trained, tmp_path, capsys):
    """``--fine-tune-type full`` (no adapter options) trains every weight and saves the model; adapter
    options with it are refused in one line."""
    from mlx_zeta.converters import from_pretrained
    from mlx_zeta.lm import load
    from mlx_zeta.lm.datasets import load_datasets
    from mlx_zeta.lm.tuning import evaluate

    folder, data, _ = trained
    code, out, err = run(capsys, "lora", "--model", folder, "--data", data, "--fine-tune-type", "full", "--iters", 2,
                         "--batch-size", 2, "--learning-rate", 1e-3, "--adapter-path", tmp_path / "full",
                         "--steps-per-eval", 2)
    assert code == 0, err
    reported = float(re.search(r"validation loss [\d.]+ -> ([\d.]+)", out).group(1))
    tuned, tok = load(tmp_path / "full")
    assert abs(evaluate(tuned, load_datasets(data, tok)["valid"], 4) - reported) <= 5e-5  # printed to 4 decimals
    base = dict(tree_flatten(from_pretrained(folder).parameters()))
    assert all(not mx.array_equal(v, base[k]) for k, v in tree_flatten(tuned.parameters()) if "weight" in k)
    code, _, err = run(capsys, "lora", "--model", folder, "--data", data, "--fine-tune-type", "full", "--rank", 4,
                       "--adapter-path", tmp_path / "bad")
    assert code == 2 and "[train] expected no adapter settings with fine_tune_type='full'" in one_line(err)


def _fuse_losses(out: str) -> tuple:
    m = re.search(r"validation loss ([\d.]+) with adapters, ([\d.]+) fused", out)
    return float(m.group(1)), float(m.group(2))


def test_qlora_then_fuse_requantizes_and_reports_the_loss_change(trained, tmp_path, capsys):
    """``lora --quantize 4`` trains on the 4-bit base ``convert --quantize 4`` writes; ``fuse`` into that
    checkpoint re-quantizes W + sBA (the loss moves, and the saved model scores what fuse reported),
    ``--de-quantize`` keeps the update exactly (the loss stays)."""
    import mlx.nn as nn

    from mlx_zeta.converters import from_pretrained
    from mlx_zeta.lm import load
    from mlx_zeta.lm.datasets import load_datasets
    from mlx_zeta.lm.tuning import evaluate

    folder, data, _ = trained
    q4, adapters = tmp_path / "q4", tmp_path / "qlora"
    assert run(capsys, "convert", folder, q4, "--quantize", 4, "--group-size", 32)[0] == 0
    code, out, err = run(capsys, "lora", "--model", folder, "--data", data, "--quantize", 4, "--group-size", 32,
                         "--iters", 3, "--batch-size", 2, "--learning-rate", 1e-2, "--adapter-path", adapters,
                         "--steps-per-eval", 3, "--mask-prompt")
    assert code == 0 and "quantized 14 layers to 4 bits" in err, err
    trained_loss = float(re.search(r"validation loss [\d.]+ -> ([\d.]+)", out).group(1))
    code, out, err = run(capsys, "fuse", "--model", q4, "--adapter-path", adapters, "--save-path", tmp_path / "f4",
                         "--data", data)
    assert code == 0, err
    before, after = _fuse_losses(out)
    assert before == trained_loss  # the data read as lora read it (--mask-prompt), the same 4-bit base
    assert before != after
    fused, tok = load(tmp_path / "f4")
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    valid = load_datasets(data, tok, mask_prompt=True)["valid"]
    assert abs(evaluate(fused, valid, 4) - after) <= 5e-5  # printed to 4 decimals
    code, out, err = run(capsys, "fuse", "--model", q4, "--adapter-path", adapters, "--save-path", tmp_path / "f32",
                         "--data", data, "--de-quantize")
    assert code == 0, err
    before_dq, after_dq = _fuse_losses(out)
    assert before_dq == before and abs(after_dq - before) < 1e-4 < abs(after - before)
    dense = from_pretrained(tmp_path / "f32")
    assert not any(isinstance(m, nn.QuantizedLinear) for n, m in dense.named_modules() if ".layers." in n)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["lora", "--data", "{missing}"], "[lora] --data: expected a folder of .jsonl files, got '{missing}'"),
    (["lora", "--data", "{data}", "--quantize", "4", "--fine-tune-type", "full"],
     "[lora] --quantize trains adapters on a quantized base; --fine-tune-type full needs a float model"),
    (["lora", "--data", "{data}", "--group-size", "32"], "[lora] --group-size needs --quantize"),
    (["lora", "--data", "{data}", "--dropout", "1.5"], "[lora] --dropout: expected a probability in [0, 1), got 1.5"),
    (["lora", "--data", "{data}", "--resume", "--adapter-path", "{missing}"], "[lora] --resume: expected checkpoints"),
    (["lora", "--data", "{data}", "--test"], "[lora] --data: expected {data}/test.jsonl, not found"),
    (["lora", "--data", "{data}", "--scale", "1", "--alpha", "2"],
     "argument --alpha: not allowed with argument --scale"),
    (["lora", "--data", "{data}", "--rank", "0"], "argument --rank: expected an int > 0, got '0'"),
    (["fuse", "--adapter-path", "{missing}", "--save-path", "{out}"],
     "[fuse] --adapter-path: expected a folder with adapter_config.json, got '{missing}'"),
    (["fuse", "--adapter-path", "{adapters}", "--save-path", "{data}"],
     "[fuse] --save-path: expected a new or empty folder, got '{data}'"),
    (["fuse", "--adapter-path", "{adapters}", "--save-path", "{out}", "--val-batches", "2"],
     "[fuse] --val-batches needs --data"),
    (["generate", "--prompt", "hi", "--adapter-path", "{data}"],
     "[generate] --adapter-path: expected a folder with adapter_config.json, got '{data}'"),
])
def test_bad_options_are_one_line_with_exit_status_2_before_the_model_loads(tmp_path, capsys, argv, message):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    paths = {"missing": tmp_path / "missing", "data": data, "adapters": adapters, "out": tmp_path / "out"}
    fill = [a.format(**paths) for a in argv]
    code, _, err = run(capsys, fill[0], "--model", tmp_path / "no-model", *fill[1:])  # a model that would not load
    assert code == 2 and message.format(**paths) in one_line(err), err
