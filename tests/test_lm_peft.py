"""LoRA/DoRA adapters in PEFT's layout (``mlx_zeta.lm.adapters_hf``): the Hugging Face module map of
each converter (``hf_linear_parts``) against transformers' own modules and weights, our adapters
exported for ``peft.PeftModel`` and PEFT's adapters imported, logits compared with transformers +
peft 0.21.2 in float32."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mlx_zeta.converters import from_pretrained, get_architecture  # noqa: E402

TOL = 2e-5


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def model_args(model):
    arch = get_architecture(model.pretrained.model_type)
    return arch, arch.ModelArgs.from_dict(dict(model.pretrained.config))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_lm):
    """(name, folder, our float32 model, transformers model) of a tiny checkpoint."""
    folder = tiny_lm(request.param)
    return request.param, folder, from_pretrained(folder, dtype="float32"), hf_model(folder)


# --------------------------------------------------------------------------- the module map


def test_hf_linear_parts_name_every_hf_linear_and_the_rows_sanitize_puts_there(pair):
    """Law: for each part, rows ``ours_rows`` of our sanitized weight are rows ``hf_rows`` of the
    transformers module's weight (``(in, out)`` transposed for Conv1D); the parts name every Linear /
    Conv1D of the transformers model but the LM head, and cover each of our Linears' rows once."""
    from transformers.pytorch_utils import Conv1D

    name, _, ours, theirs = pair
    arch, args = model_args(ours)
    parts = arch.hf_linear_parts(args)
    modules = dict(theirs.named_modules())
    linear = {n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D)) and n != "lm_head"}
    assert {p.hf for p in parts} == linear
    flat = dict(ours.named_modules())
    covered = {}
    for p in parts:
        hf = modules[p.hf]
        assert p.transposed == isinstance(hf, Conv1D)
        w = hf.weight.detach().numpy()
        w = w.T if p.transposed else w
        (a, b), (c, d) = p.ours_rows, p.hf_rows
        np.testing.assert_array_equal(np.array(flat[p.ours].weight)[a:b], w[c:d])
        covered.setdefault(p.ours, []).append((a, b))
    for path, rows in covered.items():
        rows.sort()
        assert rows[0][0] == 0 and rows[-1][1] == flat[path].weight.shape[0], path
        assert all(x[1] == y[0] for x, y in zip(rows, rows[1:])), path


# --------------------------------------------------------------------------- helpers


def ids_for(model, seed=0):
    return np.random.default_rng(seed).integers(0, model.pretrained.config["vocab_size"], size=(2, 11))


def ours_logits(model, ids):
    return np.array(model(mx.array(ids)).astype(mx.float32))


def theirs_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def assert_close(a, b):
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    assert diff <= TOL * max(1.0, scale), (diff, scale)
    return diff


def randomize(model, seed=1):
    """Nonzero B (and a fresh A, a perturbed DoRA magnitude) in every adapter of ours."""
    from mlx_zeta.training.adapters import LoRALinear

    mx.random.seed(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_a = 0.3 * mx.random.normal(layer.lora_a.shape)
            layer.lora_b = 0.3 * mx.random.normal(layer.lora_b.shape)
            if "magnitude" in layer:
                layer.magnitude = layer.magnitude * (1 + 0.2 * mx.random.normal(layer.magnitude.shape))


def swap(model, path, layer):
    from mlx.utils import tree_unflatten

    model.update_modules(tree_unflatten([(path, layer)]))


# --------------------------------------------------------------------------- ours -> PEFT


def adapt_ours(name, folder, dora):
    """Our float32 model with adapters (nonzero B) whose ranks and scales differ between modules:
    Llama: every Linear, layer 0's ``ff.proj_in`` rank 2 scale 1.5 (-> rank_pattern, alpha_pattern);
    GPT-2: q/k/v in layer 0 (to_k scale 0.5: folded into c_attn's B), q/v only in layer 1."""
    from mlx_zeta.training.adapters import DoRALinear, LoRALinear, apply_adapters

    model = from_pretrained(folder, dtype="float32")
    if name == "llama":
        apply_adapters(model, rank=4, scale=2.0, dora=dora)
        path = "attn_layers.layers.0.ff.proj_in"
        base = dict(model.named_modules())[path].base
        swap(model, path, (DoRALinear if dora else LoRALinear)(base, rank=2, scale=1.5))
    else:
        apply_adapters(model, rank=4, scale=2.0, dora=dora, targets=["*.0.attn.to_[qkv]", "*.1.attn.to_[qv]"])
        dict(model.named_modules())["attn_layers.layers.0.attn.to_k"].scale = 0.5
    randomize(model)
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_save_peft_gives_peft_the_same_model(pair, dora, tmp_path):
    from mlx_zeta.lm.adapters_hf import load_peft, save_peft

    name, folder, base, _ = pair
    ours = adapt_ours(name, folder, dora)
    save_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is dora and config["fan_in_fan_out"] is (name == "gpt2")
    if name == "llama":
        assert config["rank_pattern"] == {"model.layers.0.mlp.up_proj": 2, "model.layers.0.mlp.gate_proj": 2}
        assert config["alpha_pattern"] == {"model.layers.0.mlp.up_proj": 3, "model.layers.0.mlp.gate_proj": 3}
        assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj",
                                                   "down_proj"])
    else:  # c_attn: rank 4 + 4 + 4 in layer 0, 4 + 4 in layer 1 (k's rows of B zero)
        assert config["target_modules"] == ["c_attn"]
        assert {config["r"], *config["rank_pattern"].values()} == {12, 8}
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path)).eval()
    ids = ids_for(ours)
    expected = ours_logits(ours, ids)
    assert_close(expected, theirs_logits(theirs, ids))
    assert np.abs(expected - ours_logits(base, ids)).max() > 0.1  # the adapters matter
    again = from_pretrained(folder, dtype="float32")  # and our reader reads our writer back
    load_peft(again, tmp_path)
    # float32 rounding: freshly loaded arrays may take other MKL kernels (1.05e-5 seen on an AVX2-only CPU)
    np.testing.assert_allclose(ours_logits(again, ids), expected, atol=5e-5, rtol=0)


# --------------------------------------------------------------------------- PEFT -> ours

PEFT_CONFIGS = {  # up_proj without gate_proj / k rows of c_attn: rows of ours no adapter covers
    "llama": [dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, lora_alpha=8,
                   rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 5}),
              dict(target_modules=["k_proj", "gate_proj", "up_proj"], r=4, lora_alpha=6,
                   rank_pattern={"gate_proj": 2}, alpha_pattern={"model.layers.1.mlp.up_proj": 3}),
              dict(target_modules=["q_proj", "gate_proj", "up_proj"], r=4, lora_alpha=8, use_rslora=True)],
    "gpt2": [dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, rank_pattern={"c_fc": 2}, fan_in_fan_out=True),
             dict(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=3, alpha_pattern={"h.1.attn.c_attn": 7},
                  fan_in_fan_out=True),
             dict(target_modules=["h.0.attn.c_attn", "h.1.mlp.c_fc"], r=3, lora_alpha=4, use_rslora=True,
                  fan_in_fan_out=True)],
}


def peft_adapter(folder, out, settings, dora, seed=0):
    """A PEFT adapter made by peft on the transformers model, random nonzero A, B (and magnitude),
    written by ``save_pretrained``; returns the PeftModel."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(**settings, use_dora=dora)
    model = peft.get_peft_model(hf_model(folder), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_load_peft_gives_ours_the_peft_model(pair, which, dora, tmp_path):
    from mlx_zeta.lm.adapters_hf import load_peft

    name, folder, base, _ = pair
    theirs = peft_adapter(folder, tmp_path, PEFT_CONFIGS[name][which], dora)
    ours = from_pretrained(folder, dtype="float32")
    paths = load_peft(ours, tmp_path)
    assert paths and all(".attn." in p or ".ff." in p for p in paths)
    ids = ids_for(ours)
    expected = theirs_logits(theirs, ids)
    assert_close(ours_logits(ours, ids), expected)
    assert np.abs(expected - ours_logits(base, ids)).max() > 0.1
    trainable = [k for k, _ in tree_flatten(ours.trainable_parameters())]
    assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "magnitude") for k in trainable)


# --------------------------------------------------------------------------- errors


def _edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _edit_weights(rename=None, drop=None):
    def edit(folder):
        path = folder / "adapter_model.safetensors"
        weights = mx.load(str(path))
        if drop:
            weights = {k: v for k, v in weights.items() if drop not in k}
        if rename:
            weights = {k.replace(*rename): v for k, v in weights.items()}
        mx.save_safetensors(str(path), weights)
    return edit


def _pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


@pytest.mark.parametrize("edit, message", [
    (_edit_config(peft_type="IA3"), "expected peft_type 'LORA', got 'IA3'"),
    (_edit_config(bias="all"), "unsupported bias='all'"),
    (_edit_config(modules_to_save=["lm_head"]), "unsupported modules_to_save=['lm_head']"),
    (_edit_config(r=5, rank_pattern={}), "expected rank 5 (adapter_config.json), got 4"),
    (_edit_config(lora_alpha="8"), "unexpected lora_alpha='8'"),
    (_edit_weights(rename=("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj")),
     "expected a module a Hugging Face llama model has"),
    (_edit_weights(drop="layers.0.self_attn.q_proj.lora_B"),
     "expected lora_A.weight, lora_B.weight, got lora_A.weight"),
    (_edit_weights(rename=("lora_B.weight", "lora_B.bias")), "unexpected key"),
    (_pickle_only, "found only adapter_model.bin (a pickle, never read here)"),
])
def test_load_peft_refuses_with_one_line_naming_the_file(tiny_lm, tmp_path, edit, message):
    from mlx_zeta.lm.adapters_hf import load_peft

    folder = tiny_lm("llama")
    peft_adapter(folder, tmp_path, PEFT_CONFIGS["llama"][0], dora=False)
    edit(tmp_path)
    model = from_pretrained(folder, dtype="float32")
    with pytest.raises(ValueError) as e:
        load_peft(model, tmp_path)
    text = str(e.value)
    assert message in text and str(tmp_path) in text and "\n" not in text, text
    assert not any(".lora_" in k for k, _ in tree_flatten(model.parameters()))  # the model is untouched


def test_save_and_load_peft_refuse_models_they_cannot_map(tiny_lm, tmp_path):
    from mlx_zeta.lm.adapters_hf import load_peft, save_peft
    from mlx_zeta.training.adapters import apply_adapters

    model = from_pretrained(tiny_lm("llama"), dtype="float32")
    with pytest.raises(ValueError, match=r"^\[save_peft\] expected a model with adapters"):
        save_peft(model, tmp_path / "a")
    apply_adapters(model, rank=2, targets=["*.to_q", "to_logits"])
    with pytest.raises(ValueError, match=r"^\[save_peft\] expected adapters on Linears a Hugging Face llama model "
                                         r"has, got one on 'to_logits'"):
        save_peft(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    peft_adapter(tiny_lm("llama"), tmp_path / "p", PEFT_CONFIGS["llama"][0], dora=False)
    with pytest.raises(ValueError, match=r"^\[load_peft\] expected a model without adapters"):
        load_peft(model, tmp_path / "p")
    t5 = from_pretrained(tiny_lm("t5"))
    with pytest.raises(ValueError, match=r"^\[load_peft\] expected a model_type whose converter maps .* got 't5'"):
        load_peft(t5, tmp_path / "p")
