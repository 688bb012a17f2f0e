"""LoRA / DoRA adapters (mlx_zeta/training/adapters.py): parity with PEFT 0.21.2, frozen and quantized
bases, fusing, our adapter files and bad input."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_zeta.structs import Decoder, Transformer
from mlx_zeta.training import (DoRALinear, LoRALinear, adapter_parameters, apply_adapters, dense_weight,
                               fuse_adapters, load_adapters, save_adapters)


def tiny(depth: int = 2) -> Transformer:
    return Transformer(num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=depth, heads=4))


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """Nonzero B (and a moved magnitude), so the adapters change the output."""
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = std * mx.random.normal(layer.lora_b.shape)
            if isinstance(layer, DoRALinear):
                layer.magnitude = layer.magnitude * (1 + 0.1 * mx.random.normal(layer.magnitude.shape))


def tokens(batch: int = 2, length: int = 8) -> mx.array:
    return mx.random.randint(0, 64, (batch, length))


# ------------------------------------------------------------------ what is trainable
@pytest.mark.parametrize("dora", [False, True])
def test_only_adapters_train_and_start_equal(dora):
    model, x = tiny(), tokens()
    before = model(x)
    paths = apply_adapters(model, rank=4, dora=dora)
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    wanted = {f"{p}.{n}" for p in paths for n in ("lora_a", "lora_b") + (("magnitude",) if dora else ())}
    assert names == wanted == set(adapter_parameters(model))
    assert len(paths) == 12 and not any(p.endswith("to_logits") for p in paths)  # 6 Linears per block, no head
    np.testing.assert_allclose(np.array(model(x)), np.array(before), atol=1e-6)  # B = 0: the base's output


def test_targets_and_num_layers():
    model = tiny()
    assert apply_adapters(model, targets=["*.attn.to_q", "*.ff.*"], num_layers=1) == [
        "attn_layers.layers.1.attn.to_q", "attn_layers.layers.1.ff.proj_in", "attn_layers.layers.1.ff.proj_out"]
    assert apply_adapters(tiny(), targets=[r"re:.*layers\.0\.attn\.to_[kv]"]) == [
        "attn_layers.layers.0.attn.to_k", "attn_layers.layers.0.attn.to_v"]
    assert apply_adapters(tiny(), targets=["to_logits"]) == ["to_logits"]  # the head only when named


def test_scale_alpha_and_math():
    """One layer by hand: y = x W^T + b + s (x A^T) B^T, s = alpha / r."""
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, scale=3.0)
    layer.lora_b = mx.random.normal((5, 2))
    x = mx.random.normal((4, 6))
    want = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), atol=1e-5)
    model = tiny()
    apply_adapters(model, rank=4, alpha=16)
    assert {m.scale for _, m in model.named_modules() if isinstance(m, LoRALinear)} == {4.0}


# ------------------------------------------------------------------ fuse
@pytest.mark.parametrize("dora", [False, True])
def test_fuse_float_equals_adapted(dora):
    model, x = tiny(), tokens()
    apply_adapters(model, rank=4, dora=dora)
    randomize_adapters(model)
    adapted = model(x)
    fused = fuse_adapters(model)
    assert len(fused) == 12 and not adapter_parameters(model)
    assert all(type(m) is nn.Linear for p, m in model.named_modules() if p in fused)
    np.testing.assert_allclose(np.array(model(x)), np.array(adapted), atol=1e-5)


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("dora", [False, True])
def test_save_load_round_trip(tmp_path, dora):
    model, x = tiny(), tokens()
    fresh = tiny()
    fresh.update(model.parameters())
    apply_adapters(model, rank=4, dora=dora, num_layers=1, dropout=0.1)
    randomize_adapters(model)
    model.eval()
    save_adapters(model, tmp_path / "a", {"learning_rate": 1e-4})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if dora else "lora") and config["learning_rate"] == 1e-4
    assert config["rank"] == 4 and config["dropout"] == 0.1 and len(config["modules"]) == 6
    assert load_adapters(fresh, tmp_path / "a") == config["modules"]
    fresh.eval()
    assert mx.array_equal(fresh(x), model(x))


def test_save_pretrained_refuses_adapters_and_keeps_a_fused_model(tmp_path):
    """An adapted model is refused in one line (nothing written); fused, it saves and loads back equal."""
    from mlx_zeta.converters import from_pretrained, save_pretrained
    from mlx_zeta.converters.llama import ModelArgs, build

    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 64}
    model, x = build(ModelArgs.from_dict(config)), tokens()
    apply_adapters(model, rank=4)
    randomize_adapters(model)
    with pytest.raises(ValueError, match=r"^\[save_pretrained\] the model has adapters .*fuse_adapters"):
        save_pretrained(model, tmp_path / "adapted", config=config)
    assert not (tmp_path / "adapted").exists()
    adapted = model(x)
    fuse_adapters(model)
    save_pretrained(model, tmp_path / "fused", config=config)
    np.testing.assert_allclose(np.array(from_pretrained(tmp_path / "fused")(x)), np.array(adapted), atol=1e-5)


# ------------------------------------------------------------------ bad input
def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"target '\*.nothing' expected to match Linear layers, matched no module"):
        apply_adapters(tiny(), targets=["*.nothing"])
    with pytest.raises(ValueError, match="matched only 'attn_layers.layers.0.attn_norm', a LayerNorm"):
        apply_adapters(tiny(), targets=["attn_layers.layers.0.attn_norm"])
    with pytest.raises(ValueError, match="rank"):
        apply_adapters(tiny(), rank=0)
    model = tiny()
    apply_adapters(model)
    with pytest.raises(ValueError, match="already adapted"):
        apply_adapters(model)
    with pytest.raises(FileNotFoundError, match="adapter_config.json, not found"):
        load_adapters(tiny(), tmp_path)
    save_adapters(model, tmp_path / "a")
    small = Transformer(num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=64, depth=2, heads=4))
    with pytest.raises(ValueError, match=r"adapters.safetensors\] checkpoint does not match the model: shape"):
        load_adapters(small, tmp_path / "a")
    (tmp_path / "a" / "adapters.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapters.safetensors, not found"):
        load_adapters(tiny(), tmp_path / "a")


# ------------------------------------------------------------------ parity with PEFT 0.21.2
# HF Llama module -> ours. gate_proj/up_proj live in our fused ff.proj_in = [up; gate]: one adapter of
# rank 2r there, A stacked [A_up; A_gate], B block-diagonal, magnitude [m_up; m_gate] (DoRA is row-wise,
# so this is exactly the two HF adapters).
HF_TO_OURS = {"self_attn.q_proj": "attn.to_q", "self_attn.k_proj": "attn.to_k", "self_attn.v_proj": "attn.to_v",
              "self_attn.o_proj": "attn.to_out", "mlp.down_proj": "ff.proj_out"}
FUSED = {"ff.proj_in": ("mlp.up_proj", "mlp.gate_proj")}
RANK, ALPHA = 4, 8


def peft_llama(tmp_path, dora: bool):
    """A tiny random Llama (hidden 64, 2 layers), PEFT-adapted on all seven projections with nonzero B
    (and moved magnitudes), and our model from the same folder with the same adapters copied in."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import mlx_zeta

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=120)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # lift the std-0.02 init so every layer matters
        for p in hf.parameters():
            p.mul_(5.0) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path / "llama"))
    targets = [k.split(".")[1] for k in HF_TO_OURS] + ["up_proj", "gate_proj"]
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, use_dora=dora, lora_dropout=0.0)
    hf = peft.get_peft_model(hf, lora).eval()
    ours = mlx_zeta.from_pretrained(tmp_path / "llama", dtype="float32")
    apply_adapters(ours, rank=RANK, alpha=ALPHA, dora=dora, targets=[f"*.{m}" for m in HF_TO_OURS.values()])
    kind = DoRALinear if dora else LoRALinear
    for block in ours.attn_layers.layers:
        block.ff.proj_in = kind(block.ff.proj_in, rank=2 * RANK, scale=ALPHA / RANK)
    with torch.no_grad():
        for module in hf.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_B["default"].weight.normal_(0, 0.3)
                if dora:
                    module.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(module.out_features))
    for i, block in enumerate(ours.attn_layers.layers):
        hf_block = hf.base_model.model.model.layers[i]
        parts = {ours_name: [hf_name] for hf_name, ours_name in HF_TO_OURS.items()} | {
            k: list(v) for k, v in FUSED.items()}
        for ours_name, hf_names in parts.items():
            layer = block[ours_name.split(".")[0]][ours_name.split(".")[1]]
            mods = [hf_block.get_submodule(n) for n in hf_names]
            a = [mx.array(m.lora_A["default"].weight.detach().numpy()) for m in mods]
            b = [mx.array(m.lora_B["default"].weight.detach().numpy()) for m in mods]
            layer.lora_a = mx.concatenate(a, axis=0)
            layer.lora_b = mx.zeros(layer.lora_b.shape)
            for j, bj in enumerate(b):  # block-diagonal
                layer.lora_b[j * bj.shape[0]:(j + 1) * bj.shape[0], j * RANK:(j + 1) * RANK] = bj
            if dora:
                layer.magnitude = mx.concatenate([mx.array(m.lora_magnitude_vector["default"].weight.detach().numpy())
                                                  for m in mods])
    return hf, ours


def hf_grads(hf, dora: bool) -> dict:
    """Our parameter name -> the torch gradient(s) matching it (a list for the fused proj_in)."""
    out = {}
    for i, hf_block in enumerate(hf.base_model.model.model.layers):
        parts = {o: [h] for h, o in HF_TO_OURS.items()} | {k: list(v) for k, v in FUSED.items()}
        for ours_name, hf_names in parts.items():
            mods = [hf_block.get_submodule(n) for n in hf_names]
            prefix = f"attn_layers.layers.{i}.{ours_name}"
            out[f"{prefix}.lora_a"] = [m.lora_A["default"].weight.grad.numpy() for m in mods]
            out[f"{prefix}.lora_b"] = [m.lora_B["default"].weight.grad.numpy() for m in mods]
            if dora:
                out[f"{prefix}.magnitude"] = [m.lora_magnitude_vector["default"].weight.grad.numpy() for m in mods]
    return out


def ours_part(name: str, grad: np.ndarray, j: int) -> np.ndarray:
    """Part ``j`` of our gradient for a (possibly fused) adapter: rows of A, diagonal block of B, rows of m."""
    if name.endswith("lora_a"):
        return grad[j * RANK:(j + 1) * RANK] if grad.shape[0] > RANK else grad
    if name.endswith("lora_b"):
        if grad.shape[1] == RANK:
            return grad
        rows = grad.shape[0] // 2
        return grad[j * rows:(j + 1) * rows, j * RANK:(j + 1) * RANK]
    rows = grad.shape[0] // 2
    return grad[j * rows:(j + 1) * rows] if name.endswith("proj_in.magnitude") else grad


@pytest.mark.parametrize("dora", [False, True])
def test_logits_and_gradients_equal_peft(tmp_path, dora):
    import torch

    hf, ours = peft_llama(tmp_path, dora)
    ids = np.random.default_rng(1).integers(0, 120, (2, 9))
    logits_ref = hf(input_ids=torch.tensor(ids)).logits
    logits = ours(mx.array(ids))
    err_logits = float(np.abs(np.array(logits) - logits_ref.detach().numpy()).max())
    assert err_logits < 1e-5, err_logits

    emb = hf.base_model.model.model.embed_tokens.weight
    emb.requires_grad_(True)  # the input's gradient: through every frozen base down to the embedding
    loss_ref = hf(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss_ref.backward()

    def loss_fn(params, emb_weight):
        ours.update(params)
        ours.token_emb.weight = emb_weight
        logits = ours(mx.array(ids[:, :-1]))
        return nn.losses.cross_entropy(logits, mx.array(ids[:, 1:]), reduction="mean")

    loss, (grads, g_emb) = mx.value_and_grad(loss_fn, argnums=(0, 1))(ours.trainable_parameters(),
                                                                       ours.token_emb.weight)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    grads, worst = dict(tree_flatten(grads)), 0.0
    pairs = [(name, ours_part(name, np.array(grads[name]), j), ref)
             for name, refs in hf_grads(hf, dora).items() for j, ref in enumerate(refs)]
    pairs.append(("token_emb.weight", np.array(g_emb), emb.grad.numpy()))
    assert len(pairs) == 2 * 7 * (3 if dora else 2) + 1  # 2 blocks x 7 HF projections x (A, B[, m]) + the input
    for name, got, ref in pairs:
        scale = float(np.abs(ref).max())
        assert scale > 0, name
        err = float(np.abs(got - ref).max())
        worst = max(worst, err / scale)
        assert err <= 1e-5 * max(scale, 1.0), f"{name}: max |diff| {err:.3g} (grad scale {scale:.3g})"
    print(f"peft parity dora={dora}: logits max |diff| {err_logits:.2g}, worst grad diff / scale {worst:.2g}")


# ------------------------------------------------------------------ quantized and ternary bases
def affine_model(bits: int = 4) -> Transformer:
    from mlx_zeta.converters.swaps import quantize

    model = tiny()
    assert quantize(model, bits=bits, group_size=32) == 15  # 12 block Linears, the head, both embeddings
    return model


def dense_grads(model: nn.Module, loss_fn):
    """(loss, adapter gradients) of ``model`` with each adapter's base replaced, for the call, by an
    nn.Linear holding dense_weight(base) (and its bias): the float reference for the adapters."""
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    bases = [layer.base for layer in layers]
    for layer in layers:
        linear = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.base)
        bias = {"bias": layer.base.bias} if "bias" in layer.base else {}
        linear.update({"weight": dense_weight(layer.base), **bias})
        linear.freeze()
        layer.base = linear
    try:
        return nn.value_and_grad(model, loss_fn)(model)
    finally:
        for layer, base in zip(layers, bases):
            layer.base = base


def loss_of(batch):
    def loss_fn(model):
        logits = model(batch[:, :-1])
        return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")
    return loss_fn


def frozen_arrays(model: nn.Module) -> dict:
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return {k: v for k, v in tree_flatten(model.parameters()) if k not in trainable}


def assert_grads_equal(grads, ref_grads, rel):
    ref, got = dict(tree_flatten(ref_grads)), dict(tree_flatten(grads))
    assert set(ref) == set(got) and ref
    for name, r in ref.items():
        scale = float(mx.abs(r).max())
        err = float(mx.abs(got[name] - r).max())
        assert scale > 0 and err <= rel * scale, f"{name}: max |diff| {err:.3g} vs grad scale {scale:.3g}"


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("shape", [(2, 9), (1, 4)])  # 16 rows: AffineLinear dequantizes; 3 rows: quantized_matmul
def test_affine_base_stays_quantized_and_matches_dense(dora, shape):
    import mlx.optimizers as optim

    from mlx_zeta.quant import AffineLinear

    model, batch = affine_model(), tokens(*shape)
    paths = apply_adapters(model, rank=4, dora=dora)
    assert all(type(m.base) is AffineLinear and m.base.bits == 4 for p, m in model.named_modules() if p in paths)
    randomize_adapters(model)
    loss_fn = loss_of(batch)
    _, grads = nn.value_and_grad(model, loss_fn)(model)
    _, ref = dense_grads(model, loss_fn)
    assert_grads_equal(grads, ref, rel=1e-4)
    before = frozen_arrays(model)
    optimizer = optim.Adam(learning_rate=1e-2)
    optimizer.update(model, grads)
    after = frozen_arrays(model)
    assert set(before) == set(after) and all(mx.array_equal(before[k], after[k]) for k in before)
    assert any(k.endswith(".base.weight") and after[k].dtype == mx.uint32 for k in after)  # still packed words
    assert not all(mx.array_equal(a, b) for a, b in zip(
        (v for _, v in tree_flatten(grads)), (v for _, v in tree_flatten(model.trainable_parameters()))))


@pytest.mark.parametrize("activation,norm", [("float", False), ("int8", True)])
@pytest.mark.parametrize("dora", [False, True])
def test_ternary_base_gradients(activation, norm, dora):
    """Float activations: the adapters' gradients equal a dense nn.Linear reference. int8 activations
    (with BitNet's input RMSNorm): they equal the same adapters on the BitLinear layers the ternary ones
    were frozen from (fake-quantized forward, straight-through gradient), which needs the input
    gradient of TernaryLinear to be the straight-through one."""
    from mlx_zeta.quant import TernaryLinear, freeze_model, quantize_model

    mx.random.seed(1)
    qat = quantize_model(tiny(), norm=norm)  # BitLinear layers (QAT), head float
    mx.random.seed(1)
    ternary = freeze_model(quantize_model(tiny(), norm=norm), activation=activation)  # the same, packed
    batch = tokens()
    apply_adapters(ternary, rank=4, dora=dora)
    assert sum(isinstance(m.base, TernaryLinear) for _, m in ternary.named_modules() if isinstance(m, LoRALinear)) == 12
    randomize_adapters(ternary)
    loss_fn = loss_of(batch)
    loss, grads = nn.value_and_grad(ternary, loss_fn)(ternary)
    if activation == "float":
        ref_loss, ref = dense_grads(ternary, loss_fn)
    else:
        apply_adapters(qat, rank=4, dora=dora)
        qat.update(ternary.trainable_parameters())
        ref_loss, ref = nn.value_and_grad(qat, loss_fn)(qat)
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    assert_grads_equal(grads, ref, rel=1e-3 if activation == "int8" else 1e-4)


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("dora", [False, True])
def test_dropout_law(dora):
    """Train mode with p > 0 changes the output, reproducibly for a seed; eval mode equals p = 0. The
    train-mode output is PEFT's formula with the mask drawn from the same seed: LoRA
    base(x) + s (x_d A^T) B^T; DoRA base(x) + (g - 1) (x_d W^T) + g s (x_d A^T) B^T."""
    base = nn.Linear(16, 8)
    kind = DoRALinear if dora else LoRALinear
    layer, plain = kind(base, rank=2, scale=2.0, dropout=0.5), kind(base, rank=2, scale=2.0)
    layer.lora_b = plain.lora_b = mx.random.normal((8, 2))
    plain.lora_a = layer.lora_a
    x = mx.random.normal((4, 16))
    layer.eval()
    assert mx.array_equal(layer(x), plain(x))
    layer.train()
    mx.random.seed(3)
    y = layer(x)
    mx.random.seed(3)
    assert mx.array_equal(layer(x), y) and not mx.allclose(y, plain(x))
    mx.random.seed(3)
    x_d = mx.where(mx.random.bernoulli(0.5, x.shape), 2 * x, 0)
    lora = 2.0 * (x_d @ layer.lora_a.T) @ layer.lora_b.T
    if dora:
        w = base.weight + 2.0 * layer.lora_b @ layer.lora_a
        g = layer.magnitude / mx.linalg.norm(w, axis=1)
        want = base(x) + (g - 1) * (x_d @ base.weight.T) + g * lora
    else:
        want = base(x) + lora
    np.testing.assert_allclose(np.array(y), np.array(want), atol=1e-5)


# ------------------------------------------------------------------ training machinery
def test_gradient_checkpointing_and_compiled_trainer_step():
    """AttentionLayers(checkpoint=True) takes layer.trainable_parameters(): the adapters' gradients are the
    same with it; a compiled Trainer step on a 4-bit DoRA model moves only the adapters."""
    import mlx.optimizers as optim

    from mlx_zeta.training import Trainer

    model, batch = affine_model(), tokens()
    apply_adapters(model, rank=4, dora=True)
    randomize_adapters(model)
    model.train()
    loss_fn = loss_of(batch)
    _, plain = nn.value_and_grad(model, loss_fn)(model)
    model.attn_layers.checkpoint = True
    _, checkpointed = nn.value_and_grad(model, loss_fn)(model)
    assert_grads_equal(checkpointed, plain, rel=1e-5)
    before = frozen_arrays(model)
    adapters = dict(adapter_parameters(model))
    trainer = Trainer(model, optim.Adam(learning_rate=1e-2), lambda i: batch, loss_fn=lambda m, b: loss_of(b)(m),
                      progress=False)
    trainer.train_step()
    after = frozen_arrays(model)
    assert all(mx.array_equal(before[k], after[k]) for k in before)
    assert all(not mx.array_equal(v, adapter_parameters(model)[k]) for k, v in adapters.items())


# ------------------------------------------------------------------ fusing quantized and ternary bases
def adapted_outputs(model, x, dora, **kwargs):
    apply_adapters(model, rank=4, dora=dora, **kwargs)
    randomize_adapters(model, std=0.3)
    model.eval()
    return model(x)


@pytest.mark.parametrize("dora", [False, True])
def test_fuse_affine_requantizes_within_quantization_error(dora):
    """Re-quantized (same bits, group size, class): the fused model differs from the adapted one by the
    4-bit error of the fused weights, measured against the 8-bit re-quantization (16x finer) and the
    de-quantized fuse (exact)."""
    from mlx_zeta.quant import AffineLinear

    x = tokens()
    errors = {}
    for how in ("4", "8", "float"):
        mx.random.seed(0)
        model = affine_model()
        want = adapted_outputs(model, x, dora)
        if how == "8":  # the same fused weights at 8 bits: swap the bases' bit width before fusing
            for _, layer in model.named_modules():
                if isinstance(layer, LoRALinear):
                    w = dense_weight(layer.base)
                    layer.base = AffineLinear.from_quantized(nn.QuantizedLinear.from_linear(
                        _linear(w), group_size=32, bits=8))
            want = model(x)
        paths = fuse_adapters(model, de_quantize=how == "float")
        kinds = {type(m) for p, m in model.named_modules() if p in paths}
        assert kinds == ({nn.Linear} if how == "float" else {AffineLinear})
        if how == "4":
            assert {m.bits for p, m in model.named_modules() if p in paths} == {4}
        errors[how] = float(mx.abs(model(x) - want).max())
    print(f"fuse dora={dora}: max |logit diff| 4-bit re-quantized {errors['4']:.3g}, 8-bit {errors['8']:.3g}, "
          f"de-quantized {errors['float']:.3g}")
    assert errors["float"] < 1e-5 < errors["8"] < errors["4"] < 1.0
    assert errors["4"] > 4 * errors["8"]


def _linear(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = weight
    return linear


@pytest.mark.parametrize("dora", [False, True])
def test_fuse_ternary_needs_de_quantize(dora):
    from mlx_zeta.quant import freeze_model, quantize_model

    x = tokens()
    model = freeze_model(quantize_model(tiny(), norm=False), activation="float")
    want = adapted_outputs(model, x, dora)
    with pytest.raises(ValueError, match=r"has a ternary base \(TernaryLinear\), which cannot hold the float update; "
                                         "pass de_quantize=True"):
        fuse_adapters(model)
    fuse_adapters(model, de_quantize=True)
    np.testing.assert_allclose(np.array(model(x)), np.array(want), atol=1e-5)  # float activations: exact
    normed = freeze_model(quantize_model(tiny()))  # BitNet's input RMSNorm cannot live in an nn.Linear
    adapted_outputs(normed, x, dora)
    with pytest.raises(ValueError, match="normalises its input"):
        fuse_adapters(normed, de_quantize=True)


def test_blocks_found_generically():
    """num_layers counts the last blocks of each outermost module list: T5's encoder and decoder stacks,
    a BERT encoder's layers; heads and poolers outside the blocks are left alone."""
    from mlx_zeta.models import BertEncoder, T5Model

    t5 = T5Model(vocab_size=50, dim=32, depth=2, heads=4, dim_head=8, ff_inner_dim=64)
    paths = apply_adapters(t5, num_layers=1)
    assert {p.rsplit(".", 1)[0] for p in paths} == {"encoder.layers.1.attn", "encoder.layers.1.ff",
                                                     "decoder.layers.1.attn", "decoder.layers.1.cross_attn",
                                                     "decoder.layers.1.ff"}
    bert = BertEncoder(vocab_size=50, dim=32, depth=3, heads=4, ff_inner_dim=64)
    assert all(p.startswith("encoder.layers.2.") for p in apply_adapters(bert, num_layers=1))


def test_more_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\[fuse_adapters\] expected a model with adapters"):
        fuse_adapters(tiny())
    with pytest.raises(ValueError, match=r"\[save_adapters\] expected a model with adapters"):
        save_adapters(tiny(), tmp_path / "x")
    with pytest.raises(ValueError, match=r"\[LoRALinear\] expected dropout in \[0, 1\), got 1.5"):
        apply_adapters(tiny(), dropout=1.5)
    with pytest.raises(ValueError, match=r"\[apply_adapters\] expected scale or alpha, got both"):
        apply_adapters(tiny(), scale=1.0, alpha=16)
    with pytest.raises(ValueError, match=r"\[LoRALinear\] expected base to be one of .*, got Embedding"):
        LoRALinear(nn.Embedding(4, 4))
    model = tiny()
    apply_adapters(model, rank=4)
    with pytest.raises(ValueError, match=r"config\['rank'\] = 8 contradicts the model's adapters \(4\)"):
        save_adapters(model, tmp_path / "a", {"rank": 8})
    assert not (tmp_path / "a").exists()
    save_adapters(model, tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps({**good, "modules": ["attn_layers.layers.0.attn"]}))
    with pytest.raises(ValueError, match=r"adapter_config.json: expected module 'attn_layers.layers.0.attn' to be a "
                                         r"Linear layer of the model, found Attention"):
        load_adapters(tiny(), tmp_path / "a")
    config.write_text(json.dumps({**good, "format": "peft"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: expected format 'mlx_zeta-adapters' version 1"):
        load_adapters(tiny(), tmp_path / "a")
    config.write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: expected JSON"):
        load_adapters(tiny(), tmp_path / "a")
    fresh = tiny()
    config.write_text(json.dumps({**good, "fine_tune_type": "dora"}))  # the file lacks the magnitudes
    with pytest.raises(ValueError, match=r"missing keys .*magnitude"):
        load_adapters(fresh, tmp_path / "a")
    assert not adapter_parameters(fresh)  # checked before the model changed


def test_mixed_ranks_round_trip(tmp_path):
    """Layers of different ranks (e.g. a fused gate/up adapter of rank 2r) are saved with module_options."""
    model, x = tiny(), tokens()
    fresh = tiny()
    fresh.update(model.parameters())
    apply_adapters(model, rank=4, targets=["*.attn.to_q"])
    model.attn_layers.layers[1].ff.proj_in = LoRALinear(model.attn_layers.layers[1].ff.proj_in, rank=8, scale=0.5)
    randomize_adapters(model)
    save_adapters(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["module_options"] == {"attn_layers.layers.1.ff.proj_in": {"rank": 8, "scale": 0.5, "dropout": 0.0}}
    load_adapters(fresh, tmp_path / "a")
    assert mx.array_equal(fresh(x), model(x))
