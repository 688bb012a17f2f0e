"""Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3) through from_pretrained vs transformers.

Every checkpoint is tiny, random and made here with transformers' ``save_pretrained``.
"""

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx_zeta  # noqa: E402
from mlx_zeta.converters import llama as llama_conv  # noqa: E402
from mlx_zeta.converters import load_state_dict  # noqa: E402
from mlx_zeta.structs import AutoregressiveWrapper, Transformer  # noqa: E402
from hf_tiny import assert_close, assert_grads_close, check_sanitize, lift_init, save_hf, seeded  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=120, max_position_embeddings=256)

CASES = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict()),
    "llama-tied-mha-bias": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM",
                          dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16})),
    "llama-head-dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=24)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}


def make(case, folder, **overrides):
    config_cls, model_cls, extra = CASES[case]
    seeded(0)
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    lift_init(model)
    return model, save_hf(model, folder)


def tokens(batch=2, length=13, vocab=120, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_float32(case, tmp_path):
    hf, path = make(case, tmp_path / case)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert isinstance(model, Transformer)
    ids = tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    assert_close(model(mx.array(ids)), ref, what=f"{case} logits")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_within_stated_tolerance(dtype, tmp_path):
    hf, path = make("qwen3-qk-norm", tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(model.parameters()))
    ids = tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    assert_close(model(mx.array(ids)), ref, dtype=dtype, what=f"{dtype} logits")


def test_save_pretrained_reload_is_identical_and_sharded(tmp_path):
    hf, path = make("qwen2-qkv-bias", tmp_path / "hf")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert (out / "tokenizer_config.json").is_file()  # tokenizer files travel along
    assert {k: json.loads((out / "config.json").read_text())[k] for k in ("model_type", "mlx_zeta_model_type")} == \
        {"model_type": "mlx_zeta", "mlx_zeta_model_type": "qwen2"}  # marked: transformers refuses our format
    again = mlx_zeta.from_pretrained(out)
    ids = mx.array(tokens())
    assert mx.array_equal(model(ids), again(ids))
    with torch.no_grad():
        ref = hf(torch.tensor(np.array(ids))).logits
    assert_close(again(ids), ref, what="reloaded logits")


def test_save_pretrained_in_bfloat16_round_trips(tmp_path):
    _, path = make("llama-gqa-untied", tmp_path / "hf")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    again = mlx_zeta.from_pretrained(out)
    for (k, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(again.parameters())):
        assert b.dtype == mx.bfloat16, k
        assert mx.array_equal(a.astype(mx.bfloat16), b), k


def test_sanitize_is_pure_and_idempotent(tmp_path):
    _, path = make("qwen3-qk-norm", tmp_path / "m")
    check_sanitize(llama_conv, path)


def test_gate_and_up_are_stacked_value_first(tmp_path):
    """FeedForward's GLU takes the value half first: proj_in = [up; gate], so h = up(x) * silu(gate(x))."""
    hf, path = make("llama-gqa-untied", tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    mlp = hf.model.layers[0].mlp
    w = np.array(model.attn_layers.layers[0].ff.proj_in.weight)
    np.testing.assert_array_equal(w[:96], mlp.up_proj.weight.detach().numpy())
    np.testing.assert_array_equal(w[96:], mlp.gate_proj.weight.detach().numpy())


def test_llama3_frequencies_hand_checked():
    """Wavelength 2*pi/theta: short ones kept, long ones divided by factor, the band in between blended."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    inv, interp = llama_conv.rope_inv_freq(8, rope)
    theta = [10000.0 ** (-i / 8) for i in (0, 2, 4, 6)]  # 1, 0.1, 0.01, 0.001
    # wavelengths 6.28 (< 16/4 = 4? no: 6.28 > 4, < 16 -> blended), 62.8, 628, 6283 (> 16 -> divided)
    s0 = (16 / (2 * np.pi / theta[0]) - 1.0) / (4.0 - 1.0)
    expected = [(1 - s0) * theta[0] / 8 + s0 * theta[0], theta[1] / 8, theta[2] / 8, theta[3] / 8]
    np.testing.assert_allclose(np.array(inv), expected, rtol=1e-6)
    assert interp == 1.0


def test_greedy_generation_equals_transformers_token_for_token(tmp_path):
    hf, path = make("llama-gqa-untied", tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    prompt = tokens(batch=1, length=5, seed=3)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          pad_token_id=0)[:, prompt.shape[1]:]
    ours = AutoregressiveWrapper(model).generate(mx.array(prompt), 24, temperature=0.0)
    np.testing.assert_array_equal(np.array(ours), ref.numpy())


def test_loss_gradients_match_transformers(tmp_path):
    hf, path = make("qwen3-qk-norm", tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids = tokens(length=9)
    hf.train()
    loss_ref = hf(torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss_ref.backward()

    def loss_fn(m):
        logits = m(mx.array(ids[:, :-1]))
        return nn.losses.cross_entropy(logits, mx.array(ids[:, 1:]), reduction="mean")

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    g = dict(tree_flatten(grads))
    layer = hf.model.layers[1]
    assert_grads_close(g, [("attn_layers.layers.1.attn.to_q.weight", layer.self_attn.q_proj.weight.grad),
                           ("attn_layers.layers.1.attn.q_norm.weight", layer.self_attn.q_norm.weight.grad),
                           ("attn_layers.layers.1.ff.proj_out.weight", layer.mlp.down_proj.weight.grad),
                           ("token_emb.weight", hf.model.embed_tokens.weight.grad)])
    name, ref = "attn_layers.layers.1.attn.q_norm.weight", layer.self_attn.q_norm.weight.grad
    with pytest.raises(AssertionError, match="q_norm.weight: max |diff|"):  # a 0.5% error in one tensor fails
        assert_grads_close({name: g[name] * 1.005}, [(name, ref)])


# --------------------------------------------------------------------------- errors


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'mamba'; supported: .*bert.*llama.*qwen3"):
        mlx_zeta.from_pretrained(tmp_path)


def test_missing_config_and_unsupported_rope_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"no config.json in"):
        mlx_zeta.from_pretrained(tmp_path)
    _, path = make("llama-gqa-untied", tmp_path / "m", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"unsupported rope_type 'yarn'; supported: default, linear, llama3"):
        mlx_zeta.from_pretrained(path)


def test_missing_unexpected_and_misshapen_weights_are_named(tmp_path):
    _, path = make("llama-gqa-untied", tmp_path / "m")
    weights = load_state_dict(path)
    config = json.loads((path / "config.json").read_text())

    def write(ws, name):
        folder = tmp_path / name
        folder.mkdir()
        mx.save_safetensors(str(folder / "model.safetensors"), ws)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    dropped = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"attn_layers\.layers\.1\.attn\.to_k\.weight"):
        mlx_zeta.from_pretrained(write(dropped, "missing"))
    extra = {**weights, "model.layers.0.mystery.weight": mx.zeros((3,))}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mystery\.weight"):
        mlx_zeta.from_pretrained(write(extra, "unexpected"))
    bad = {**weights, "model.norm.weight": mx.zeros((65,))}
    with pytest.raises(ValueError, match=r"attn_layers\.final_norm\.weight.*\(64,\).*\(65,\)|"
                                         r"attn_layers\.final_norm\.weight.*\(65,\).*\(64,\)"):
        mlx_zeta.from_pretrained(write(bad, "shape"))
    half = {k: v for k, v in weights.items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is missing"):
        mlx_zeta.from_pretrained(write(half, "half"))


def test_save_without_provenance_needs_config(tmp_path):
    with pytest.raises(ValueError, match=r"has no model.pretrained.*pass config="):
        mlx_zeta.save_pretrained(nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_repo_id_offline_and_cached(tmp_path, monkeypatch):
    """A repo id resolves through the Hugging Face cache layout; uncached + offline says so."""
    import huggingface_hub.constants as hf_constants

    _, path = make("llama-gqa-untied", tmp_path / "m")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in path.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--tiny--llama" / "refs").mkdir()
    (cache / "models--tiny--llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = mlx_zeta.from_pretrained("tiny/llama", dtype="float32")
    assert model.pretrained.model_type == "llama"
    with pytest.raises(ValueError, match=r"'tiny/absent' is no local folder and not in the Hugging Face cache .*offline mode is on"):
        mlx_zeta.from_pretrained("tiny/absent")
    with pytest.raises(ValueError, match=r"neither an existing folder nor a Hub repo id"):
        mlx_zeta.from_pretrained("no/such/folder")
