"""GPT-2 checkpoints through from_pretrained vs transformers (tiny, random, made here)."""

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx_zeta  # noqa: E402
from mlx_zeta.converters import gpt2 as gpt2_conv  # noqa: E402
from mlx_zeta.converters import load_state_dict  # noqa: E402
from mlx_zeta.structs import AutoregressiveWrapper, Transformer  # noqa: E402
from hf_tiny import assert_close, assert_grads_close, check_sanitize, lift_init, save_hf, seeded  # noqa: E402

BASE = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=64, bos_token_id=0, eos_token_id=0)
CASES = {
    "tied-gelu_new": dict(),
    "untied-relu-n_inner": dict(tie_word_embeddings=False, activation_function="relu", n_inner=96),
    "gelu-unscaled-upcast": dict(activation_function="gelu", scale_attn_weights=False, reorder_and_upcast_attn=True,
                                 layer_norm_epsilon=1e-3),
}


def make(folder, case="tied-gelu_new", model_cls="GPT2LMHeadModel", **overrides):
    seeded(0)
    config = transformers.GPT2Config(**{**BASE, **CASES[case], **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    lift_init(model, norm_markers=(".ln_",))
    return model, save_hf(model, folder)


def tokens(batch=2, length=13, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (batch, length))


def reference(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_float32(case, tmp_path):
    hf, path = make(tmp_path / case, case)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert isinstance(model, Transformer)
    ids = tokens()
    assert_close(model(mx.array(ids)), reference(hf, ids), what=f"{case} logits")


def test_position_embedding_is_added_unscaled(tmp_path):
    """wpe is loaded bit for bit and added as it is (the struct's d**-0.5 is switched off)."""
    hf, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert model.pos_emb.scale == 1.0
    np.testing.assert_array_equal(np.array(model.pos_emb.emb.weight), hf.transformer.wpe.weight.detach().numpy())


def test_gpt2model_without_prefix_or_head_and_legacy_mask_buffers(tmp_path):
    """GPT2Model saves names without ``transformer.``; old Hub files also carry attn.bias/masked_bias."""
    hf, path = make(tmp_path / "m", model_cls="GPT2Model")
    weights = load_state_dict(path)
    assert not any(k.startswith("transformer.") for k in weights)
    n = BASE["n_positions"]
    for i in range(BASE["n_layer"]):
        weights[f"h.{i}.attn.bias"] = mx.tril(mx.ones((n, n)))[None, None]
        weights[f"h.{i}.attn.masked_bias"] = mx.array(-1e4)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids = tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).last_hidden_state
    assert_close(model(mx.array(ids), return_embeddings=True), ref, what="GPT2Model hidden states")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_within_stated_tolerance(dtype, tmp_path):
    hf, path = make(tmp_path / "m", "untied-relu-n_inner")
    model = mlx_zeta.from_pretrained(path, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(model.parameters()))
    ids = tokens()
    assert_close(model(mx.array(ids)), reference(hf, ids), dtype=dtype, what=f"{dtype} logits")


def test_save_pretrained_reload_is_identical(tmp_path):
    hf, path = make(tmp_path / "hf", "untied-relu-n_inner")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours")
    assert {k: json.loads((out / "config.json").read_text())[k] for k in ("model_type", "mlx_zeta_model_type")} == \
        {"model_type": "mlx_zeta", "mlx_zeta_model_type": "gpt2"}  # marked: transformers refuses our format
    assert "attn_layers.layers.0.attn.to_q.weight" in load_state_dict(out)  # our names, no conversion
    again = mlx_zeta.from_pretrained(out)
    for (k, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(again.parameters())):
        assert mx.array_equal(a, b), k
    ids = mx.array(tokens())
    assert mx.array_equal(model(ids), again(ids))
    assert_close(again(ids), reference(hf, np.array(ids)), what="reloaded logits")


def test_sanitize_is_pure_idempotent_and_transposes_conv1d(tmp_path):
    hf, path = make(tmp_path / "m", "untied-relu-n_inner")
    once = check_sanitize(gpt2_conv, path)
    block = hf.transformer.h[1]
    c_attn = block.attn.c_attn.weight.detach().numpy()  # (in, 3 * dim)
    for i, proj in enumerate("qkv"):
        np.testing.assert_array_equal(np.array(once[f"attn_layers.layers.1.attn.to_{proj}.weight"]),
                                      c_attn[:, 64 * i:64 * (i + 1)].T)
    np.testing.assert_array_equal(np.array(once["attn_layers.layers.1.ff.proj_in.weight"]),
                                  block.mlp.c_fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(np.array(once["to_logits.weight"]), hf.lm_head.weight.detach().numpy())


def test_greedy_generation_equals_transformers_token_for_token(tmp_path):
    hf, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    prompt = tokens(batch=1, length=5, seed=3)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)[:, prompt.shape[1]:]
    ours = AutoregressiveWrapper(model).generate(mx.array(prompt), 32, temperature=0.0)
    np.testing.assert_array_equal(np.array(ours), ref.numpy())
    assert len(set(ref.numpy()[0].tolist())) > 3  # not a degenerate repetition


def test_loss_gradients_match_transformers(tmp_path):
    hf, path = make(tmp_path / "m")  # eval mode: GPT-2's dropouts off in both
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids = tokens(length=9)
    loss_ref = hf(torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss_ref.backward()

    def loss_fn(m):
        return nn.losses.cross_entropy(m(mx.array(ids[:, :-1])), mx.array(ids[:, 1:]), reduction="mean")

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    g = dict(tree_flatten(grads))
    block = hf.transformer.h[1]
    checks = [("attn_layers.layers.1.attn.to_k.weight", block.attn.c_attn.weight.grad[:, 64:128].T),
              ("attn_layers.layers.1.ff.proj_in.weight", block.mlp.c_fc.weight.grad.T),
              ("attn_layers.layers.1.attn_norm.weight", block.ln_1.weight.grad),
              ("pos_emb.emb.weight", hf.transformer.wpe.weight.grad),
              ("token_emb.weight", hf.transformer.wte.weight.grad)]  # tied: input and output paths summed
    assert_grads_close(g, checks)


# --------------------------------------------------------------------------- errors


def write_config(folder, **overrides):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", **BASE, **overrides}))
    return folder


@pytest.mark.parametrize("overrides, message", [
    (dict(scale_attn_by_inverse_layer_idx=True), r"unsupported scale_attn_by_inverse_layer_idx=True"),
    (dict(activation_function="mish"), r"unsupported activation_function 'mish'; supported: gelu, gelu_accurate, gelu_fast"),
    (dict(add_cross_attention=True), r"unsupported add_cross_attention=True"),
    (dict(architectures=["GPT2ForSequenceClassification"]),
     r"unsupported architectures \['GPT2ForSequenceClassification'\]; supported: GPT2LMHeadModel, GPT2Model"),
    (dict(n_head=5), r"expected n_head to divide n_embd, got n_embd=64, n_head=5"),
])
def test_unsupported_configs_are_named(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=r"\[gpt2 converter\] " + message):
        mlx_zeta.from_pretrained(write_config(tmp_path / "m", **overrides))


def test_bad_c_attn_and_missing_weights_are_named(tmp_path):
    _, path = make(tmp_path / "m")
    weights = load_state_dict(path)
    args = gpt2_conv.ModelArgs.from_dict(json.loads((path / "config.json").read_text()))
    bad = {**weights, "transformer.h.0.attn.c_attn.weight": mx.zeros((64, 128))}
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight to hold 3 \* n_embd = 192 .*\(64, 128\)"):
        gpt2_conv.sanitize(bad, args)
    del weights["transformer.h.1.mlp.c_proj.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=r"attn_layers\.layers\.1\.ff\.proj_out\.weight"):
        mlx_zeta.from_pretrained(path)


def test_generation_past_n_positions_is_refused(tmp_path):
    _, path = make(tmp_path / "m")
    wrapper = AutoregressiveWrapper(mlx_zeta.from_pretrained(path, dtype="float32"))
    with pytest.raises(ValueError, match=r"need 69 positions, but .* max_seq_len=64"):
        wrapper.generate(mx.array(tokens(batch=1, length=40)), 30, temperature=0.0)
