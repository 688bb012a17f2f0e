"""converters/swaps.py: a model whose layers were swapped after its converter built it
(quantize_model's BitLinear, freeze_model's packed TernaryLinear, MLX affine heads) is written by
save_pretrained so that from_pretrained builds the same model: parameters equal and logits
bit-identical after the round trip (the issue's "missing keys 12" for a frozen BitNet model).

The models are built from a Llama config by the converter itself (random weights), so no
transformers checkpoint is needed; the reference is the in-memory model before saving.
"""

import json

import pytest

import mlx_zeta
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_zeta.converters import llama
from mlx_zeta.quant import AffineEmbedding, BitLinear, TernaryLinear, freeze_model, quantize_model
from badinput import api_error

CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
IDS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]])
PROJECTIONS = 2 * 6  # q, k, v, out, proj_in, proj_out per layer


def float_model(**overrides):
    """The converter's Llama with random weights (norm gains perturbed so they matter)."""
    mx.random.seed(0)
    model = llama.build(llama.ModelArgs.from_dict({**CONFIG, **overrides}))
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


def round_trip(model, folder, **overrides):
    out = mlx_zeta.save_pretrained(model, folder, config={**CONFIG, **overrides})
    again = mlx_zeta.from_pretrained(out)
    a, b = tree_flatten(model.parameters()), tree_flatten(again.parameters())
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and mx.array_equal(x, y).item(), k
    assert mx.array_equal(model(IDS), again(IDS)).item()
    return again, json.loads((out / "config.json").read_text())


def layers_of(model, cls):
    return sorted(p for p, m in model.named_modules() if type(m) is cls)


@pytest.mark.parametrize("stage", ["qat", "frozen-int8", "frozen-float", "qat-ff-only-no-norm"])
def test_ternary_models_load_back_exactly(stage, tmp_path):
    model = float_model()
    if stage == "qat-ff-only-no-norm":
        quantize_model(model, predicate=lambda p, m: ".ff." in p, norm=False, quant_eps=1e-3)
    else:
        quantize_model(model)
    if stage.startswith("frozen"):
        freeze_model(model, activation=stage.split("-")[1])
    cls = TernaryLinear if stage.startswith("frozen") else BitLinear
    again, config = round_trip(model, tmp_path / "out")
    assert layers_of(again, cls) == layers_of(model, cls) and len(layers_of(model, cls)) == (
        4 if stage == "qat-ff-only-no-norm" else PROJECTIONS)
    [entry] = config["mlx_zeta_ternary"]
    assert entry["class"] == cls.__name__ and len(entry["layers"]) == len(layers_of(model, cls))
    if cls is TernaryLinear:
        assert all(m.activation == stage.split("-")[1] for _, m in again.named_modules() if type(m) is TernaryLinear)
    if stage == "qat-ff-only-no-norm":
        assert entry["options"]["norm"] is False and entry["options"]["quant_eps"] == 1e-3
    # a second round trip writes the same record (the loaded config's own record is replaced, not kept)
    _, config2 = round_trip(again, tmp_path / "again")
    assert config2["mlx_zeta_ternary"] == config["mlx_zeta_ternary"]


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_with_an_affine_head_loads_back_exactly(tied, tmp_path):
    """freeze_model(head_bits=4) quantizes only the head (or, tied, the embedding): the record names
    those layers, so the reload does not quantize every other eligible layer as well."""
    model = float_model(tie_word_embeddings=tied)
    freeze_model(quantize_model(model), head_bits=4, group_size=32)
    again, config = round_trip(model, tmp_path / "out", tie_word_embeddings=tied)
    head = "token_emb" if tied else "to_logits"
    assert config["mlx_zeta_quantization"] == {"bits": 4, "group_size": 32, "layers": [head]}
    assert type(again.token_emb) is (AffineEmbedding if tied else nn.Embedding)


def test_mixed_ternary_options_get_one_entry_each(tmp_path):
    model = float_model()
    quantize_model(model, predicate=lambda p, m: ".attn." in p)
    quantize_model(model, predicate=lambda p, m: ".ff." in p, norm=False)
    _, config = round_trip(model, tmp_path / "out")
    assert sorted(len(e["layers"]) for e in config["mlx_zeta_ternary"]) == [4, 8]


def test_a_swap_it_cannot_rebuild_is_refused_before_writing(tmp_path):
    class Doubled(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.inner = linear

        def __call__(self, x):
            return 2 * self.inner(x)

    model = float_model()
    model.attn_layers.layers[0].attn.to_q = Doubled(model.attn_layers.layers[0].attn.to_q)
    api_error(ValueError, mlx_zeta.save_pretrained, model, tmp_path / "out", config=CONFIG,
              names=("attn_layers.layers.0.attn.to_q", "Doubled", "Linear"), clean=(tmp_path,))
    assert not (tmp_path / "out").exists()


def test_affine_record_without_layers_keeps_the_old_meaning(tmp_path):
    """Folders written before the layers were listed quantize every eligible layer, as they did."""
    model = float_model()
    mlx_zeta.converters.pretrained.quantize(model, 4, 64)
    out = mlx_zeta.save_pretrained(model, tmp_path / "out", config=CONFIG)
    config = json.loads((out / "config.json").read_text())
    del config["mlx_zeta_quantization"]["layers"]
    (out / "config.json").write_text(json.dumps(config))
    assert mx.array_equal(mlx_zeta.from_pretrained(out)(IDS), model(IDS)).item()


def test_a_bitnet_checkpoint_with_a_quantized_head_loads_back_exactly(tmp_path):
    """The converter's own packed layers are not recorded (build makes them); freeze_model(head_bits=4)
    on it quantizes the head alone, and only the head is quantized again on the reload."""
    from mlx_zeta.converters import bitnet
    from mlx_zeta.quant import pack_2bit

    config = {**CONFIG, "model_type": "bitnet", "quantization_config": {"quant_method": "bitnet"}}
    mx.random.seed(1)
    model = bitnet.build(bitnet.ModelArgs.from_dict(config))
    for path, layer in model.named_modules():
        if type(layer) in (TernaryLinear, bitnet.SubNormTernaryLinear):
            codes = mx.random.randint(-1, 2, (layer.out_features, layer.in_features)).astype(mx.int8)
            layer.packed, layer.weight_scale = pack_2bit(codes), mx.array(3.0)
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape) if p.dtype == mx.float32 and p.ndim else p,
                          model.parameters()))
    freeze_model(model, head_bits=4)
    out = mlx_zeta.save_pretrained(model, tmp_path / "out", config=config)
    again = mlx_zeta.from_pretrained(out)
    assert type(again.token_emb) is nn.Embedding
    assert mx.array_equal(model(IDS), again(IDS)).item()
    saved = json.loads((out / "config.json").read_text())
    assert "mlx_zeta_ternary" not in saved and saved["mlx_zeta_quantization"]["layers"] == ["to_logits"]
