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
