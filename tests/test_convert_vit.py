"""ViT checkpoints (ViTForImageClassification, ViTModel) through from_pretrained vs transformers.

Tiny, random, made here. Our model takes channels-last images: ``pixel_values.transpose(0, 2, 3, 1)``.
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
from mlx_zeta.converters import load_state_dict  # noqa: E402
from mlx_zeta.converters import vit as vit_conv  # noqa: E402
from hf_tiny import assert_close, assert_grads_close, check_sanitize, lift_init, save_hf, seeded  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
            patch_size=8, num_labels=5)
CASES = {
    "square-gelu": dict(),
    "rect-no-qkv-bias-gelu_new": dict(image_size=[32, 24], patch_size=[8, 4], qkv_bias=False, hidden_act="gelu_new",
                                      num_channels=2, layer_norm_eps=1e-6),
}


def make(folder, case="square-gelu", model_cls="ViTForImageClassification", **kwargs):
    seeded(0)
    config = transformers.ViTConfig(**{**BASE, **CASES[case]})
    model = getattr(transformers, model_cls)(config, **kwargs).eval()
    lift_init(model)
    return model, save_hf(model, folder)


def images(config, batch=2, seed=1):
    """NCHW for transformers, NHWC for us."""
    h, w = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    x = np.random.default_rng(seed).standard_normal((batch, config.num_channels, h, w)).astype(np.float32)
    return torch.tensor(x), mx.array(x.transpose(0, 2, 3, 1))


def run_hf(hf, x):
    with torch.no_grad():
        return hf(x)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_hidden_states_match_transformers_float32(case, tmp_path):
    hf, path = make(tmp_path / case, case)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert isinstance(model, vit_conv.PretrainedViT) and "pooler" not in model
    x_hf, x = images(hf.config)
    assert_close(model(x), run_hf(hf, x_hf).logits, what=f"{case} logits")
    assert_close(model(x, return_embeddings=True), run_hf(hf.vit, x_hf).last_hidden_state,
                 what=f"{case} hidden states")


def test_vitmodel_with_pooler(tmp_path):
    hf, path = make(tmp_path / "m", model_cls="ViTModel")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    x_hf, x = images(hf.config)
    ref = run_hf(hf, x_hf)
    hidden = model(x)
    assert_close(hidden, ref.last_hidden_state, what="ViTModel hidden states")
    assert_close(model.pool(hidden), ref.pooler_output, what="ViTModel pooler output")


def test_vitmodel_without_pooler_needs_the_config_key(tmp_path):
    hf, path = make(tmp_path / "m", model_cls="ViTModel", add_pooling_layer=False)
    with pytest.raises(ValueError, match=r"\[vit converter\] .*no pooler\.dense weights; add \"add_pooling_layer\": "
                                         r"false to its config.json"):
        mlx_zeta.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "add_pooling_layer": False}))
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert "pooler" not in model
    x_hf, x = images(hf.config)
    assert_close(model(x), run_hf(hf, x_hf).last_hidden_state, what="pooler-less ViTModel hidden states")
    with pytest.raises(ValueError, match=r"\[PretrainedViT\] this model has no pooler"):
        model.pool(model(x))


def test_transformers5_in_memory_names_load_too(tmp_path):
    """transformers >= 5 renames to layers.i.attention.{q,k,v,o}_proj / mlp.fc1,2 in memory (a raw state_dict)."""
    hf, path = make(tmp_path / "m", "rect-no-qkv-bias-gelu_new")
    state = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    assert "vit.layers.0.attention.q_proj.weight" in state and "vit.layers.0.mlp.fc2.weight" in state
    mx.save_safetensors(str(path / "model.safetensors"), state)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    x_hf, x = images(hf.config)
    assert_close(model(x), run_hf(hf, x_hf).logits, what="logits from in-memory names")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_within_stated_tolerance(dtype, tmp_path):
    hf, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(model.parameters()))
    x_hf, x = images(hf.config)
    out = model(x)  # float32 images are cast to the weights' dtype
    assert out.dtype == getattr(mx, dtype)
    assert_close(out, run_hf(hf, x_hf).logits, dtype=dtype, what=f"{dtype} logits")


def test_save_pretrained_reload_is_identical(tmp_path):
    hf, path = make(tmp_path / "hf", "rect-no-qkv-bias-gelu_new")
    (path / "preprocessor_config.json").write_text(json.dumps({"do_resize": True}))
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours")
    assert (out / "preprocessor_config.json").is_file()
    assert "embeddings.proj.weight" in load_state_dict(out)  # our names and layout, no conversion
    again = mlx_zeta.from_pretrained(out)
    x_hf, x = images(hf.config)
    assert mx.array_equal(model(x), again(x))
    assert_close(again(x), run_hf(hf, x_hf).logits, what="reloaded logits")


def test_sanitize_is_pure_idempotent_and_makes_the_conv_channels_last(tmp_path):
    hf, path = make(tmp_path / "m", model_cls="ViTModel")
    once = check_sanitize(vit_conv, path)
    conv = hf.embeddings.patch_embeddings.projection.weight.detach().numpy()  # (out, in, kh, kw)
    np.testing.assert_array_equal(np.array(once["embeddings.proj.weight"]), conv.transpose(0, 2, 3, 1))


def test_loss_gradients_match_transformers(tmp_path):
    hf, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    x_hf, x = images(hf.config, batch=3)
    labels = np.array([0, 3, 4])
    loss_ref = hf(x_hf, labels=torch.tensor(labels)).loss
    loss_ref.backward()

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), mx.array(labels), reduction="mean")

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    g = dict(tree_flatten(grads))
    emb, layer = hf.vit.embeddings, hf.vit.layers[0]
    checks = [("embeddings.proj.weight", emb.patch_embeddings.projection.weight.grad.permute(0, 2, 3, 1)),
              ("embeddings.cls_token", emb.cls_token.grad),
              ("embeddings.position_embeddings", emb.position_embeddings.grad),
              ("encoder.layers.0.attn.to_v.weight", layer.attention.v_proj.weight.grad),
              ("encoder.layers.0.ff_norm.bias", layer.layernorm_after.bias.grad),
              ("classifier.weight", hf.classifier.weight.grad)]
    assert_grads_close(g, checks)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, message", [
    (dict(architectures=["ViTForMaskedImageModeling"]),
     r"unsupported architectures \['ViTForMaskedImageModeling'\]; supported: ViTForImageClassification, ViTModel"),
    (dict(hidden_act="mish"), r"unsupported hidden_act 'mish'; supported: gelu, "),
    (dict(pooler_act="mish"), r"unsupported pooler_act 'mish'"),
    (dict(num_attention_heads=5), r"expected num_attention_heads to divide hidden_size, got hidden_size=64"),
])
def test_unsupported_configs_are_named(overrides, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", **BASE, **overrides}))
    with pytest.raises(ValueError, match=r"\[vit converter\] " + message):
        mlx_zeta.from_pretrained(tmp_path)


def test_wrong_image_shape_is_named(tmp_path):
    _, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 32, 32, 3\), got \(1, 3, 32, 32\)"):
        model(mx.zeros((1, 3, 32, 32)))  # channels-first by mistake
