"""BitNet b1.58 checkpoints (model_type "bitnet", packed ternary projections) through
from_pretrained vs transformers' BitNetForCausalLM.

Every checkpoint is tiny, random and made here in the Hugging Face layout: the decoder
projections of a ``transformers.BitNetForCausalLM`` are ternarized
(:math:`T = \\mathrm{clip}(\\mathrm{round}(W s_w), -1, 1)`, :math:`s_w = 1/\\mathrm{mean}|W|`), packed
with transformers' own ``pack_weights`` (uint8, ``(out/4, in)``) and stored with ``weight_scale``
(shape (1,): :math:`s_w` for ``bitlinear``, :math:`1/s_w` for ``autobitlinear``), beside a
``config.json`` with ``quantization_config``.

The transformers reference: ``BitNetForCausalLM.from_pretrained(path)`` refuses a bitnet-quantized
checkpoint without ``accelerate`` (``BitNetHfQuantizer.validate_environment`` raises ImportError;
see the last test), which is not installed here. So the reference is built eagerly the way
from_pretrained does it: a ``BitNetForCausalLM(config)``, then transformers'
``replace_with_bitnet_linear(model, ["lm_head"], BitNetQuantConfig(...))`` (BitLinear /
AutoBitLinear layers; a ``use_rms_norm`` RMSNorm, made on the meta device there, is materialized
with ``to_empty``), then ``load_state_dict`` of the checkpoint (for offline AutoBitLinear with the
weights unpacked by transformers' ``unpack_weights``, as its ``BitNetDeserialize`` does). Their
``torch.compile``'d methods run eagerly under ``torch._dynamo.config.patch(disable=True)``.

Tolerance: both sides quantize with the same per-token :math:`s_x = 127/\\max|x|` and compute
:math:`A = Q_x T^\\top` as exact integers (AutoBitLinear sums the dequantized :math:`Q_x/s_x` in
float32 instead), so what remains is float32 rounding in norms, rotary, attention and those sums:
measured max |diff| 0.7e-6 to 1.2e-6 on logits of magnitude 3 (3.7e-6 for online AutoBitLinear),
checked against the converter tolerance 1e-4 (``hf_tiny.ATOL``). That holds while no int8
rounding step flips: an element of :math:`x s_x` within ~1e-6 of a half-integer could round differently on the two sides
and move one :math:`Q_x` entry by 1 (about 1% of that token's scale, then propagated); with these
fixed inputs none does (it would show as errors of 1e-2, not 1e-6). Online AutoBitLinear has a
second rounding: :math:`\\mathrm{round}(W s_w)` at load, where :math:`s_w` is a mean over every
weight, summed in a different order by torch and MLX. Unnudged, seed 0 puts one weight at
:math:`W s_w = -0.500001` (layer 1 up_proj [90, 58]) that torch and MLX round to different sides; the
logits of the batch row that reaches it differ by 0.086 (3% of their scale). The online case
therefore nudges weights within 1e-3 of the 0.5 boundary away from it, and a separate test asserts
that every disagreement of the unnudged ternarizations lies within 1e-5 of that boundary.
"""

import importlib.util
import json
import re

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_bitnet = pytest.importorskip("transformers.integrations.bitnet")
from safetensors.torch import save_file  # noqa: E402
from transformers.utils.quantization_config import BitNetQuantConfig  # noqa: E402

import mlx_zeta  # noqa: E402
from mlx_zeta.converters import bitnet as bitnet_conv  # noqa: E402
from mlx_zeta.converters import load_state_dict  # noqa: E402
from mlx_zeta.quant import TernaryLinear, pack_2bit, ternarize  # noqa: E402
from mlx_zeta.structs import AutoregressiveWrapper, Transformer  # noqa: E402
from hf_tiny import assert_close, check_sanitize, lift_init, seeded  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=120, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
PROJ = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
AUTO, ONLINE = {"linear_class": "autobitlinear"}, {"linear_class": "autobitlinear", "quantization_mode": "online"}

CASES = {  # name: (quantization_config without quant_method, BitNetConfig overrides)
    "bitlinear-gqa-untied": ({"linear_class": "bitlinear"}, {}),
    "autobitlinear-tied-bias": (AUTO, dict(tie_word_embeddings=True, attention_bias=True)),
    "bitlinear-rms-norm-bias": ({"use_rms_norm": True, "rms_norm_eps": 1e-6}, dict(attention_bias=True)),
    "autobitlinear-online": (ONLINE, {}),
}


def eager():
    """transformers' BitLinear methods are torch.compile'd; run them as plain PyTorch."""
    return torch._dynamo.config.patch(disable=True)


def _nudge(w: "torch.Tensor", margin: float = 1e-3) -> None:
    """Move weights with |W s_w| within ``margin`` of the 0.5 rounding boundary away from it."""
    for _ in range(10):
        r = (w * (1.0 / w.abs().mean())).abs()
        near = (r - 0.5).abs() < margin
        if not near.any():
            return
        w[near] *= 1 + 4 * margin * torch.sign(r[near] - 0.5 + 1e-12)
    raise AssertionError("could not move the weights off the rounding boundary")


def make(case, folder, unpacked=False, nudge=True, **overrides):
    """(transformers reference, checkpoint folder, the checkpoint's torch state dict)."""
    qc, extra = CASES[case]
    seeded(0)
    config = transformers.BitNetConfig(**{**BASE, **extra, **overrides})
    model = transformers.BitNetForCausalLM(config).eval()
    online = qc.get("quantization_mode") == "online"
    state = {}
    lift_init(model)
    with torch.no_grad():
        for name, w in model.state_dict().items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if not PROJ.match(name):
                state[name] = w.contiguous()
                continue
            base = name[:-len("weight")]
            if qc.get("use_rms_norm"):
                state[base + "rms_norm.weight"] = 1 + 0.1 * torch.randn(w.shape[1])
            if online:
                if nudge:
                    _nudge(w)
                state[name] = w.clone()
                continue
            s_w = 1.0 / w.abs().mean().clamp(min=1e-5)
            t = (w * s_w).round().clamp(-1, 1)
            state[name] = t.clone() if unpacked else hf_bitnet.pack_weights(t.to(torch.int8))
            state[base + "weight_scale"] = (s_w if qc.get("linear_class") == "bitlinear" else 1 / s_w).reshape(1)
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["quantization_config"] = {"quant_method": "bitnet", **qc}
    (folder / "config.json").write_text(json.dumps(config_dict))
    return reference(config, qc, state), folder, state


def reference(config, qc, state):
    """transformers' BitNetForCausalLM with its bitnet layers, loaded eagerly (module docstring)."""
    model = transformers.BitNetForCausalLM(config).eval()
    hf_bitnet.replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"],
                                         quantization_config=BitNetQuantConfig(**qc))
    for module in model.modules():
        if getattr(module, "rms_norm", None) is not None:
            module.rms_norm.to_empty(device="cpu")
    state = dict(state)
    if qc.get("linear_class") == "autobitlinear" and qc.get("quantization_mode", "offline") == "offline":
        with eager():
            state = {k: hf_bitnet.unpack_weights(v, torch.float32) if v.dtype == torch.uint8 else v
                     for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def tokens(batch=2, length=13, vocab=120, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_logits(hf, ids):
    with torch.no_grad(), eager():
        return hf(torch.tensor(ids)).logits


def ternary_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_float32(case, tmp_path):
    hf, path, _ = make(case, tmp_path / case)
    model = mlx_zeta.from_pretrained(path)
    assert isinstance(model, Transformer)
    layers = ternary_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, out, up, gate, down per layer; lm_head stays float
    convention = "multiply" if CASES[case][0] == AUTO else "divide"
    assert all(m.packed.dtype == mx.uint8 and m.scale_convention == convention for m in layers.values())
    ids = tokens()
    assert_close(model(mx.array(ids)), hf_logits(hf, ids), what=f"{case} logits")  # measured <= 3.7e-6


@pytest.mark.parametrize("case", ["bitlinear-gqa-untied", "autobitlinear-tied-bias"])
def test_greedy_generation_equals_transformers_token_for_token(case, tmp_path):
    hf, path, _ = make(case, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path)
    prompt = tokens(batch=1, length=5, seed=3)
    with torch.no_grad(), eager():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=0)[:, prompt.shape[1]:]
    ours = AutoregressiveWrapper(model).generate(mx.array(prompt), 24, temperature=0.0)
    np.testing.assert_array_equal(np.array(ours), ref.numpy())


def test_weights_stay_packed_bytes_and_load_peak(tmp_path):
    """The checkpoint's uint8 bytes are the model's, 0.25 B per ternary weight; loading never
    materializes float projections (peak MLX memory of the load = the parameters' bytes)."""
    _, path, state = make("bitlinear-gqa-untied", tmp_path / "m")
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = mlx_zeta.from_pretrained(path)
    peak = mx.get_peak_memory() - before
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in params.values())
    packed = {k: v for k, v in params.items() if k.endswith(".packed")}
    weights = sum(4 * v.size for v in packed.values())  # out_features are multiples of 4 here
    assert weights == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 3) == 61440
    assert sum(v.nbytes for v in packed.values()) == weights // 4  # 0.25 bytes per weight
    scales = [v for k, v in params.items() if k.endswith(".weight_scale")]
    assert len(scales) == 14 and all(s.shape == () and s.dtype == mx.float32 for s in scales)
    # the same model with float16 projections: 2 bytes per weight instead of packed + scale
    float16 = sum(2 * (4 * v.size if k.endswith(".packed") else v.size) for k, v in params.items()
                  if not k.endswith(".weight_scale"))
    assert total == weights // 4 + 14 * 4 + 2 * (120 * 64 * 4) + sum(
        v.nbytes for k, v in params.items() if k.endswith("norm.weight"))
    ternary = sum(v.nbytes for k, v in params.items() if k.endswith((".packed", ".weight_scale")))
    assert (ternary, 2 * weights) == (15416, 122880)  # projections: 0.2509 vs 2 bytes per weight
    assert (total, float16) == (79416, 154880)  # whole model (float32 embeddings, head, norms) vs float16
    # float32 projections would add 245760 bytes; a few KiB of slack for small buffers that earlier
    # tests' leftovers (freed during the load) make MLX allocate anew (measured: +1.8 KiB after the BERT tests)
    assert peak <= total + 16 * 1024, (peak, total)
    layer = model.attn_layers.layers[1]
    np.testing.assert_array_equal(np.array(layer.ff.proj_in.gate.packed),
                                  state["model.layers.1.mlp.gate_proj.weight"].numpy())
    assert layer.ff.proj_in.gate.packed.shape == (24, 64)


def test_save_pretrained_reload_is_identical(tmp_path):
    hf, path, _ = make("bitlinear-rms-norm-bias", tmp_path / "hf")
    model = mlx_zeta.from_pretrained(path)
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["mlx_zeta_model_type"]) == ("mlx_zeta", "bitnet")
    assert config["quantization_config"]["use_rms_norm"] is True
    saved = load_state_dict(out)
    assert saved["attn_layers.layers.0.attn.to_q.packed"].dtype == mx.uint8
    again = mlx_zeta.from_pretrained(out)
    for (k, a), (k2, b) in zip(tree_flatten(model.parameters()), tree_flatten(again.parameters())):
        assert k == k2 and a.dtype == b.dtype and mx.array_equal(a, b), k
    ids = mx.array(tokens())
    assert mx.array_equal(model(ids), again(ids))


@pytest.mark.parametrize("case", ["bitlinear-rms-norm-bias", "autobitlinear-online"])
def test_sanitize_is_pure_and_idempotent(case, tmp_path):
    _, path, _ = make(case, tmp_path / "m")
    once = check_sanitize(bitnet_conv, path)
    assert {"attn_layers.layers.0.attn.to_out.sub_norm.weight", "attn_layers.layers.1.ff.proj_out.sub_norm.weight",
            "attn_layers.layers.0.ff.proj_in.up.packed"} <= set(once)


def test_online_weights_are_ternarized_at_load(tmp_path):
    """Online AutoBitLinear: the latent float W becomes pack_2bit(ternarize(W)) with weight_scale s_w
    ("divide", transformers' BitLinear math). Unnudged, torch's and MLX's round(W s_w) disagree only
    on weights within 1e-5 of the 0.5 boundary (their s_w differ in the last bits)."""
    _, path, state = make("autobitlinear-online", tmp_path / "m", nudge=False)
    model = mlx_zeta.from_pretrained(path)
    layer = model.attn_layers.layers[1].ff.proj_in.up
    w = state["model.layers.1.mlp.up_proj.weight"]
    q, s_w = ternarize(mx.array(w.numpy()))
    assert layer.scale_convention == "divide" and layer.weight_scale.item() == s_w.item()
    assert mx.array_equal(layer.packed, pack_2bit(q))
    disagreements = 0
    for name, w in state.items():
        if PROJ.match(name):
            with eager():
                theirs = (hf_bitnet.WeightQuant.apply(w) * (1.0 / w.abs().mean())).round()
            ours, s = ternarize(mx.array(w.numpy()))
            differ = np.array(ours) != theirs.numpy()
            near = np.abs(np.abs(w.numpy() * s.item()) - 0.5) < 1e-5
            assert not (differ & ~near).any(), name
            disagreements += int(differ.sum())
    assert disagreements == 1  # seed 0: layer 1 up_proj [90, 58], |W s_w| = 0.500001


def test_float_ternary_autobitlinear_weights_are_packed_at_load(tmp_path):
    _, packed_path, _ = make("autobitlinear-tied-bias", tmp_path / "packed")
    hf, float_path, state = make("autobitlinear-tied-bias", tmp_path / "float", unpacked=True)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    a, b = mlx_zeta.from_pretrained(packed_path), mlx_zeta.from_pretrained(float_path)
    for (k, x), (_, y) in zip(tree_flatten(a.parameters()), tree_flatten(b.parameters())):
        assert mx.array_equal(x, y), k
    ids = tokens()
    assert_close(b(mx.array(ids)), hf_logits(hf, ids), what="float-ternary checkpoint logits")


def test_bfloat16_keeps_packed_bytes_and_float32_scales(tmp_path):
    """Half precision moves many int8 rounding steps (measured 3.4% of max |logit|), within
    hf_tiny's bfloat16 rule (8% of max |logit|)."""
    hf, path, _ = make("bitlinear-gqa-untied", tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="bfloat16")
    for k, v in tree_flatten(model.parameters()):
        expected = mx.uint8 if k.endswith(".packed") else mx.float32 if k.endswith(".weight_scale") else mx.bfloat16
        assert v.dtype == expected, k
    ids = tokens()
    assert_close(model(mx.array(ids)), hf_logits(hf, ids), dtype="bfloat16", what="bfloat16 logits")


def test_bitlinear_ignores_quantization_mode_as_transformers_does(tmp_path):
    """transformers' BitLinear always holds packed weights: "online" changes only AutoBitLinear."""
    _, path, _ = make("bitlinear-gqa-untied", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["quantization_mode"] = "online"
    online = mlx_zeta.from_pretrained(_rewrite(path, tmp_path / "online", config=config))
    for (k, a), (_, b) in zip(tree_flatten(mlx_zeta.from_pretrained(path).parameters()),
                              tree_flatten(online.parameters())):
        assert mx.array_equal(a, b), k


# --------------------------------------------------------------------------- errors


def _rewrite(path, folder, config=None, weights=None):
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), weights if weights is not None else load_state_dict(path))
    (folder / "config.json").write_text(json.dumps(config or json.loads((path / "config.json").read_text())))
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("quantization_config"), r"expected a quantization_config with quant_method 'bitnet'.*got None"),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), r"quant_method 'bitnet'.*got 'gptq'"),
    (lambda c: c["quantization_config"].update(linear_class="fancylinear"),
     r"unsupported quantization_config linear_class 'fancylinear'; supported: bitlinear, autobitlinear"),
    (lambda c: c["quantization_config"].update(quantization_mode="lazy"), r"quantization_mode 'lazy'"),
    (lambda c: c["quantization_config"].update(modules_to_not_convert=["lm_head", "model.layers.0.mlp"]),
     r"modules_to_not_convert keeps \['model.layers.0.mlp'\] in float"),
    (lambda c: c.update(hidden_act="silu"), r"expected hidden_act 'relu2', got 'silu'"),
])
def test_unsupported_configs_are_named(change, message, tmp_path):
    _, path, _ = make("bitlinear-gqa-untied", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    change(config)
    with pytest.raises(ValueError, match=r"\[bitnet converter\] .*" + message):
        mlx_zeta.from_pretrained(_rewrite(path, tmp_path / "bad", config=config))


def test_bad_weights_are_named(tmp_path):
    _, path, _ = make("bitlinear-gqa-untied", tmp_path / "m")
    weights = load_state_dict(path)
    q = "model.layers.0.self_attn.q_proj.weight"
    unpacked = {**weights, q: mx.zeros((64, 64))}
    with pytest.raises(ValueError, match=rf"\(checkpoint {re.escape(q)}\): linear_class 'bitlinear' holds packed"):
        mlx_zeta.from_pretrained(_rewrite(path, tmp_path / "float", weights=unpacked))
    short = {**weights, q: weights[q][:8]}
    with pytest.raises(ValueError, match=r"attn_layers\.layers\.0\.attn\.to_q\.packed.*\(16, 64\).*\(8, 64\)|"
                                         r"attn_layers\.layers\.0\.attn\.to_q\.packed.*\(8, 64\).*\(16, 64\)"):
        mlx_zeta.from_pretrained(_rewrite(path, tmp_path / "short", weights=short))
    threes = {**weights, q: weights[q] | 3}
    with pytest.raises(ValueError, match=rf"\(checkpoint {re.escape(q)}\): packed uint8 weight holds the 2-bit code 3"):
        mlx_zeta.from_pretrained(_rewrite(path, tmp_path / "threes", weights=threes))
    dropped = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.ffn_sub_norm.weight"}
    with pytest.raises(ValueError, match=r"attn_layers\.layers\.1\.ff\.proj_out\.sub_norm\.weight"):
        mlx_zeta.from_pretrained(_rewrite(path, tmp_path / "dropped", weights=dropped))

    _, auto, _ = make("autobitlinear-tied-bias", tmp_path / "auto", unpacked=True)
    weights = load_state_dict(auto)
    halves = {**weights, q: weights[q] * 0.5}
    with pytest.raises(ValueError, match=r"offline autobitlinear float weight must hold only -1, 0, 1"):
        mlx_zeta.from_pretrained(_rewrite(auto, tmp_path / "halves", weights=halves))

    _, online, _ = make("autobitlinear-online", tmp_path / "online")
    weights = load_state_dict(online)
    scaled = {**weights, "model.layers.0.self_attn.q_proj.weight_scale": mx.ones((1,))}
    with pytest.raises(ValueError, match=r"'online' computes weight_scale from the float weight"):
        mlx_zeta.from_pretrained(_rewrite(online, tmp_path / "scaled", weights=scaled))


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None, reason="accelerate is installed")
def test_transformers_from_pretrained_needs_accelerate(tmp_path):
    """Why the reference is built eagerly: transformers refuses the checkpoint without accelerate."""
    _, path, _ = make("bitlinear-gqa-untied", tmp_path / "m")
    with pytest.raises(ImportError, match="requires accelerate"):
        transformers.BitNetForCausalLM.from_pretrained(str(path))
