"""save_pretrained(format="hf") / mlx-zeta convert --to hf: our models back to Hugging Face checkpoints
that transformers loads, and our own format marked so that transformers refuses it.

Every checkpoint is tiny and random, made here with transformers (test_convert_llama.make,
test_convert_bitnet.make). The references are independent of the code under test: transformers'
``from_pretrained`` of the exported folder (``output_loading_info``: no missing, unexpected or
mismatched keys) and its float32 logits, the original checkpoint's own tensors (a float32 round trip
Hugging Face -> ours -> Hugging Face gives them back bit for bit), and the law
``sanitize(to_hf(w)) == w`` exactly. Measured max |logits diff| vs transformers (float32): llama
1.3e-6, mistral 2.3e-6, qwen2 1.8e-6, qwen3 2.1e-6, bitnet 0.7e-6 to 1.2e-6; asserted <= 1e-5.
"""

import json
import types

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx_zeta  # noqa: E402
from mlx_zeta.cli import main  # noqa: E402
from mlx_zeta.converters import bitnet as bitnet_conv  # noqa: E402
from mlx_zeta.converters import llama as llama_conv  # noqa: E402
from mlx_zeta.converters import load_state_dict  # noqa: E402
from mlx_zeta.converters.fields import ConfigError  # noqa: E402
from mlx_zeta.converters.pretrained import quantize, register_architecture, unregister_architecture  # noqa: E402
from mlx_zeta.quant import freeze_model, quantize_model, ternarize  # noqa: E402
from hf_tiny import to_numpy  # noqa: E402
import test_convert_bitnet as bitnet_tests  # noqa: E402
import test_convert_llama as llama_tests  # noqa: E402

ATOL = 1e-5  # float32 logits vs transformers (measured <= 2.3e-6)
LLAMA_CASES = ["llama-gqa-untied", "llama-tied-mha-bias", "mistral-window", "qwen2-qkv-bias", "qwen3-qk-norm"]
REFUSED = r"model type `mlx_zeta` but Transformers does not recognize this architecture"


def hf_load(folder, model_cls=None):
    """transformers' from_pretrained of ``folder``; asserts it found every key and no stray one."""
    with bitnet_tests.eager():
        hf, info = (model_cls or transformers.AutoModelForCausalLM).from_pretrained(str(folder),
                                                                                   output_loading_info=True)
    assert not any(info.values()), info  # missing_keys, unexpected_keys, mismatched_keys, error_msgs
    return hf.eval()


def max_diff(ours, hf, ids) -> float:
    with torch.no_grad(), bitnet_tests.eager():
        ref = hf(torch.tensor(ids)).logits
    return float(np.abs(to_numpy(ours(mx.array(ids))) - ref.numpy()).max())


def check_law(conv, model, args, hf_args=None):
    """``sanitize(to_hf(w)) == w`` exactly (names, dtypes, values), ``to_hf`` pure."""
    ours = dict(tree_flatten(model.parameters()))
    before = dict(ours)
    exported = conv.to_hf(ours, args)
    assert ours.keys() == before.keys() and all(ours[k] is before[k] for k in ours), "to_hf changed its input"
    back = conv.sanitize(exported, hf_args or args)
    assert back.keys() == ours.keys()
    for k in ours:
        assert back[k].dtype == ours[k].dtype and back[k].shape == ours[k].shape and mx.array_equal(back[k], ours[k]), k
    return exported


# --------------------------------------------------------------------------- llama family


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_family_export_loads_in_transformers_with_equal_logits(case, tmp_path):
    hf_src, path = llama_tests.make(case, tmp_path / "src")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model.pretrained.model_type and "mlx_zeta_model_type" not in config
    assert config["architectures"] == [llama_conv.HF_ARCHITECTURES[config["model_type"]]]
    assert config["dtype"] == "float32"
    hf = hf_load(out)
    assert type(hf).__name__ == config["architectures"][0]
    assert max_diff(model, hf, llama_tests.tokens()) <= ATOL
    # Hugging Face -> ours -> Hugging Face in float32 gives the checkpoint's tensors back bit for bit
    original, exported = hf_src.state_dict(), hf.state_dict()
    assert original.keys() == exported.keys()
    for k in original:
        assert torch.equal(original[k], exported[k]), k


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_family_sanitize_of_to_hf_is_identity(case, tmp_path):
    _, path = llama_tests.make(case, tmp_path / "src")
    model = mlx_zeta.from_pretrained(path)
    exported = check_law(llama_conv, model, llama_conv.ModelArgs.from_dict(dict(model.pretrained.config)))
    raw = {k: v for k, v in load_state_dict(path).items() if not k.endswith("rotary_emb.inv_freq")}
    assert exported.keys() == raw.keys()  # and the checkpoint's own names, nothing more
    assert all(mx.array_equal(exported[k], raw[k]) for k in raw)


def test_up_and_gate_go_back_to_their_own_projections(tmp_path):
    """proj_in = [up; gate]: the first half is up_proj (h = up(x) * silu(gate(x)))."""
    hf_src, path = llama_tests.make("llama-gqa-untied", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path)
    w = model.attn_layers.layers[1].ff.proj_in.weight
    exported = llama_conv.to_hf({"attn_layers.layers.1.ff.proj_in.weight": w}, None)
    mlp = hf_src.model.layers[1].mlp
    np.testing.assert_array_equal(np.array(exported["model.layers.1.mlp.up_proj.weight"]), mlp.up_proj.weight.detach())
    np.testing.assert_array_equal(np.array(exported["model.layers.1.mlp.gate_proj.weight"]),
                                  mlp.gate_proj.weight.detach())


def test_bfloat16_export_says_its_dtype(tmp_path):
    _, path = llama_tests.make("qwen3-qk-norm", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "hf", dtype="bfloat16", format="hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_load(out)
    ours = dict(tree_flatten(model.parameters()))
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16
    np.testing.assert_array_equal(q.detach().float().numpy(), to_numpy(ours["attn_layers.layers.0.attn.to_q.weight"]
                                                              .astype(mx.bfloat16)))


# --------------------------------------------------------------------------- bitnet


@pytest.mark.parametrize("case", list(bitnet_tests.CASES))
def test_bitnet_export_loads_in_transformers_with_equal_logits(case, tmp_path):
    """transformers' own BitNetForCausalLM.from_pretrained (accelerate installed; BitLinear unpacks
    the weights on the CPU) reads the packed export; online autobitlinear is written as the offline
    bitlinear checkpoint it computes (packed T, "divide" scale s_w)."""
    _, path, state = bitnet_tests.make(case, tmp_path / "src")
    model = mlx_zeta.from_pretrained(path)
    out = mlx_zeta.save_pretrained(model, tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["architectures"] == ["BitNetForCausalLM"]
    online = case == "autobitlinear-online"
    expected = {"linear_class": "bitlinear", "quantization_mode": "offline"} if online else bitnet_tests.CASES[case][0]
    assert config["quantization_config"] == {"quant_method": "bitnet", **expected}
    hf = hf_load(out, transformers.BitNetForCausalLM)
    assert max_diff(model, hf, bitnet_tests.tokens()) <= ATOL
    exported = load_state_dict(out)
    q = "model.layers.1.mlp.gate_proj.weight"
    assert exported[q].dtype == mx.uint8 and exported[q.replace("weight", "weight_scale")].shape == (1,)
    if not online:  # the checkpoint's packed bytes and scales, untouched
        for k, v in state.items():
            np.testing.assert_array_equal(np.array(exported[k]), v.numpy(), err_msg=k)


@pytest.mark.parametrize("case", list(bitnet_tests.CASES))
def test_bitnet_sanitize_of_to_hf_is_identity(case, tmp_path):
    _, path, _ = bitnet_tests.make(case, tmp_path / "src")
    model = mlx_zeta.from_pretrained(path)
    config = dict(model.pretrained.config)
    args = bitnet_conv.ModelArgs.from_dict(config)
    hf_args = bitnet_conv.ModelArgs.from_dict(bitnet_conv.hf_config(config, args))
    exported = check_law(bitnet_conv, model, args, hf_args)
    assert {"model.layers.0.self_attn.attn_sub_norm.weight", "model.layers.0.mlp.ffn_sub_norm.weight",
            "model.layers.0.mlp.up_proj.weight_scale"} <= set(exported)


# --------------------------------------------------------------------------- quantized models


def test_affine_quantized_model_exports_de_quantized(tmp_path):
    """4-bit affine layers (and the quantized embedding) written as mx.dequantize'd float weights:
    transformers' logits equal our quantized model's (the same W = s q + b, summed in another order)."""
    _, path = llama_tests.make("qwen2-qkv-bias", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert quantize(model, 4, 32) == 13  # 2 x 6 Linears (proj_in = up + gate) + the embedding, the tied head
    out = mlx_zeta.save_pretrained(model, tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert not any(k.startswith("mlx_zeta") for k in config)
    hf = hf_load(out)
    assert max_diff(model, hf, llama_tests.tokens()) <= ATOL
    q = model.attn_layers.layers[0].attn.to_k
    expected = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    np.testing.assert_array_equal(hf.model.layers[0].self_attn.k_proj.weight.detach().numpy(), np.array(expected))


def test_ternary_swaps_export_as_their_dense_weights(tmp_path):
    """quantize_model(norm=False) + freeze_model(activation="float", head_bits=4): TernaryLinear
    layers written as s T, the affine head de-quantized; with float activations our forward is that
    dense model, so transformers' logits equal ours. A BitLinear's weight is its forward's Q_W / s_w."""
    _, path = llama_tests.make("llama-gqa-untied", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    quantize_model(model, norm=False)
    latent = model.attn_layers.layers[0].ff.proj_out.weight
    bit = mlx_zeta.save_pretrained(model, tmp_path / "bitlinear", format="hf")
    q, s_w = ternarize(latent)
    np.testing.assert_array_equal(hf_load(bit).model.layers[0].mlp.down_proj.weight.detach().numpy(),
                                  np.array(q.astype(mx.float32) / s_w))
    freeze_model(model, activation="float", head_bits=4, group_size=32)
    out = mlx_zeta.save_pretrained(model, tmp_path / "hf", format="hf")
    assert max_diff(model, hf_load(out), llama_tests.tokens()) <= ATOL


def test_a_ternary_swap_with_an_input_norm_is_refused_and_nothing_written(tmp_path):
    _, path = llama_tests.make("llama-gqa-untied", tmp_path / "src")
    model = quantize_model(mlx_zeta.from_pretrained(path), norm=True)
    with pytest.raises(ValueError, match=r'^\[save_pretrained\] format="hf": attn_layers\.layers\.\d\.\S+ '
                                         r"is a BitLinear with an input RMSNorm"):
        mlx_zeta.save_pretrained(model, tmp_path / "hf", format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------- our format, marked


def test_our_format_is_marked_and_refused_by_transformers(tmp_path):
    _, path = llama_tests.make("qwen3-qk-norm", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["mlx_zeta_model_type"]) == ("mlx_zeta", "qwen3")
    with pytest.raises(ValueError, match=REFUSED):
        transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with pytest.raises(ValueError, match=REFUSED):
        transformers.AutoConfig.from_pretrained(str(out))
    again = mlx_zeta.from_pretrained(out)
    assert again.pretrained.model_type == "qwen3" and again.pretrained.config["model_type"] == "qwen3"
    assert "mlx_zeta_model_type" not in again.pretrained.config
    ids = mx.array(llama_tests.tokens())
    assert mx.array_equal(model(ids), again(ids))
    twice = json.loads((mlx_zeta.save_pretrained(again, tmp_path / "twice") / "config.json").read_text())
    assert twice == config  # marked once, not twice


def test_folders_with_a_plain_model_type_still_load(tmp_path):
    """Folders written before the marker say model_type "qwen3" themselves, and load as they did."""
    _, path = llama_tests.make("qwen3-qk-norm", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "old")
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = config.pop("mlx_zeta_model_type")
    (out / "config.json").write_text(json.dumps(config))
    again = mlx_zeta.from_pretrained(out)
    assert again.pretrained.model_type == "qwen3"
    ids = mx.array(llama_tests.tokens())
    assert mx.array_equal(model(ids), again(ids))


def test_a_marked_config_without_the_original_type_is_named(tmp_path):
    _, path = llama_tests.make("llama-gqa-untied", tmp_path / "src")
    out = mlx_zeta.save_pretrained(mlx_zeta.from_pretrained(path), tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    for value, found in ((None, "none"), (3, "the number 3")):
        config["mlx_zeta_model_type"] = value
        (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        with pytest.raises(ConfigError, match=rf"config\.json: model_type 'mlx_zeta' \(an mlx_zeta folder\) "
                                              rf"expected field 'mlx_zeta_model_type' to name the architecture, "
                                              rf"got {found}$"):
            mlx_zeta.from_pretrained(out)
    with pytest.raises(ValueError, match=r"other than 'mlx_zeta'"):
        register_architecture("mlx_zeta", llama_conv)


# --------------------------------------------------------------------------- errors and atomicity


def test_unknown_format_and_architecture_without_to_hf_are_refused(tmp_path):
    _, path = llama_tests.make("llama-gqa-untied", tmp_path / "src")
    model = mlx_zeta.from_pretrained(path)
    with pytest.raises(ValueError, match=r"^\[save_pretrained\] expected format in \('mlx_zeta', 'hf'\), "
                                         r"got 'safetensors'$"):
        mlx_zeta.save_pretrained(model, tmp_path / "x", format="safetensors")
    toy = types.ModuleType("toy_no_hf")  # a converter with the protocol but no to_hf
    toy.ModelArgs, toy.build, toy.sanitize = llama_conv.ModelArgs, llama_conv.build, llama_conv.sanitize
    register_architecture("toy_no_hf", toy)
    try:
        config = {**model.pretrained.config, "model_type": "toy_no_hf"}
        with pytest.raises(ValueError, match=r'^\[save_pretrained\] format="hf" is not supported for model_type '
                                             r"toy_no_hf \(its converter toy_no_hf has no to_hf\)$"):
            mlx_zeta.save_pretrained(model, tmp_path / "x", format="hf", config=config)
    finally:
        unregister_architecture("toy_no_hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_failed_export_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    """The copy of the tokenizer fails after the weights were written to the staging folder: the
    existing destination keeps its files and bytes, and no staging folder is left beside it."""
    import mlx_zeta.converters.io as io

    _, path = llama_tests.make("llama-gqa-untied", tmp_path / "src")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    model = mlx_zeta.from_pretrained(path)
    out = mlx_zeta.save_pretrained(model, tmp_path / "dst")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(io.shutil, "copyfile", fail)
    with pytest.raises(OSError, match="disk full"):
        mlx_zeta.save_pretrained(model, out, format="hf")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_cli_convert_to_hf_and_back(tmp_path, capsys):
    """HF -> ours (default) -> --to hf: transformers loads the last one and finds the first's tensors."""
    hf_src, path = llama_tests.make("llama-tied-mha-bias", tmp_path / "src")
    assert main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert f"-> {tmp_path / 'hf'} (hf):" in capsys.readouterr().out
    hf = hf_load(tmp_path / "hf")
    for k, v in hf_src.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k
    capsys.readouterr()  # transformers' progress bars
    code = main(["convert", str(path), str(tmp_path / "q"), "--to", "hf", "--quantize", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "[convert] --quantize with --to hf" in err and len(err.strip().splitlines()) == 1
