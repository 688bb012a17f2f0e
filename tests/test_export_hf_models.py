"""``to_hf`` of the GPT-2, BERT, ViT and T5 converters: the inverse of ``sanitize``.

Two tiers. The law ``sanitize(to_hf(w)) == w`` (exact: names, shapes, dtypes, values) on tiny
random models built here (no transformers needed); and, against transformers, the export of a
checkpoint transformers itself wrote: ``save_pretrained(model, out, format="hf")`` read by
transformers' ``from_pretrained`` with no missing, unexpected or mis-shaped keys, weights equal to
the original model's bit for bit, and float32 outputs equal to ours (GPT-2 logits, BERT hidden
states and pooled output, ViT logits / hidden states / pooled output, T5 logits with decoder inputs).
The law alone cannot tell an identity ``to_hf`` from a real one (``sanitize`` passes our names
through), so the names and shapes are checked against transformers' own state dict too.
"""

import json

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten
from safetensors import safe_open

from mlx_zeta.converters import bert, gpt2, t5, vit

GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)
BERT = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            vocab_size=50, max_position_embeddings=16)
VIT = dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           image_size=16, patch_size=8)
T5 = dict(model_type="t5", vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20)
# case -> (converter, config.json); each case a different head, tying or layout branch of to_hf
CASES = {
    "gpt2-tied": (gpt2, GPT2),
    "gpt2-untied-relu": (gpt2, {**GPT2, "tie_word_embeddings": False, "activation_function": "relu", "n_inner": 40}),
    "gpt2-GPT2Model": (gpt2, {**GPT2, "architectures": ["GPT2Model"]}),
    "bert-pooler": (bert, BERT),
    "bert-MaskedLM-no-pooler": (bert, {**BERT, "architectures": ["BertForMaskedLM"]}),
    "vit-classifier": (vit, {**VIT, "architectures": ["ViTForImageClassification"],
                             "id2label": {"0": "a", "1": "b", "2": "c"}}),
    "vit-ViTModel-pooler-rect": (vit, {**VIT, "architectures": ["ViTModel"], "image_size": [16, 24],
                                       "patch_size": [8, 4], "num_channels": 2, "qkv_bias": False}),
    "vit-ViTModel-no-pooler": (vit, {**VIT, "architectures": ["ViTModel"], "add_pooling_layer": False}),
    "t5-relu-tied": (t5, T5),
    "t5-gated-untied": (t5, {**T5, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
}


def random_weights(conv, config, seed=0):
    """``conv.build``'s parameters, every one (norms and biases too) drawn afresh from N(0, 1)."""
    args = conv.ModelArgs.from_dict(config)
    params = tree_flatten(conv.build(args).parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    return args, {k: mx.random.normal(v.shape, key=key).astype(v.dtype) for (k, v), key in zip(params, keys)}


@pytest.mark.parametrize("case", list(CASES))
def test_sanitize_inverts_to_hf_exactly(case):
    conv, config = CASES[case]
    args, weights = random_weights(conv, config)
    before = dict(weights)
    hf = conv.to_hf(weights, args)
    assert weights.keys() == before.keys() and all(weights[k] is before[k] for k in weights), "to_hf changed its input"
    assert set(hf) != set(weights)  # Hugging Face names, not ours
    back = conv.sanitize(hf, args)
    assert back.keys() == weights.keys()
    for k, v in weights.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert mx.array_equal(back[k], v).item(), k


def test_to_hf_keeps_half_precision():
    """Transposed, fused and split tensors keep the input dtype (the law in bfloat16)."""
    for case in ("gpt2-untied-relu", "vit-classifier", "t5-gated-untied"):
        conv, config = CASES[case]
        args, weights = random_weights(conv, config)
        half = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
        hf = conv.to_hf(half, args)
        assert all(v.dtype == mx.bfloat16 for v in hf.values()), case
        back = conv.sanitize(hf, args)
        assert all(mx.array_equal(back[k], half[k]).item() for k in half), case


def test_gpt2_to_hf_refuses_a_partial_qkv():
    args, weights = random_weights(gpt2, GPT2)
    del weights["attn_layers.layers.1.attn.to_k.bias"]
    with pytest.raises(ValueError, match=r"\[gpt2 converter\] expected attn_layers\.layers\.1\.attn\.to_\{q,k,v\}"
                                         r"\.bias together \(fused into c_attn\), got only to_q, to_v"):
        gpt2.to_hf(weights, args)


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_names_and_shapes_are_transformers(case, tmp_path):
    """The exported names and shapes are exactly those transformers writes for the same config (its
    ``save_pretrained``: checkpoint names, not transformers 5's in-memory ViT names; no tied copies)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    conv, config = CASES[case]
    args, weights = random_weights(conv, config)
    model = hf_model(transformers, conv.hf_config(dict(config), args))
    if conv is t5 and not args.tied:  # transformers 5 always ties T5's head in memory; an own one is written
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in conv.to_hf(weights, args).items()} == expected


def hf_model(transformers, config):
    """transformers' model for an exported ``config.json`` dict (its ``architectures[0]`` class);
    ``add_pooling_layer``, a constructor argument there, passed as one."""
    kwargs = {"add_pooling_layer": False} if config.get("add_pooling_layer") is False else {}
    return getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config), **kwargs)


# --------------------------------------------------------------------------- end to end vs transformers
# A tiny random checkpoint written by transformers -> our from_pretrained -> save_pretrained(format="hf")
# -> transformers' from_pretrained: nothing missing, unexpected or mis-shaped, every tensor equal to the
# original's bit for bit, and its float32 outputs equal ours within TOL of the largest output magnitude
# (at least 1): float32 summation order only, as the weights are identical (measured: <= 1e-6 absolute for
# GPT-2, BERT, ViT; T5 relu 3.8e-6, gated-gelu 2.2e-5 of logits up to 6.5, i.e. 3.3e-6 relative).

TOL = 1e-5


def export(tmp_path, hf, reference=None, **load_kwargs):
    """``hf`` saved by transformers, loaded by us, written back with ``format="hf"`` and read by
    transformers (the ``architectures`` class of the exported config, which must be the class of
    ``reference``, by default ``hf``, whose tensors it must hold). Returns ``(ours, reloaded)``."""
    import mlx_zeta

    transformers = pytest.importorskip("transformers")
    reference = hf if reference is None else reference
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = mlx_zeta.from_pretrained(tmp_path / "hf", dtype="float32")
    out = mlx_zeta.save_pretrained(ours, tmp_path / "out", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ours.pretrained.model_type and "mlx_zeta_model_type" not in config
    cls = getattr(transformers, config["architectures"][0])
    assert cls is type(reference)
    # a config object passed in: the other keyword arguments go to the model's constructor
    again, info = cls.from_pretrained(str(out), config=transformers.AutoConfig.from_pretrained(str(out)),
                                      output_loading_info=True, **load_kwargs)
    assert {k: v for k, v in info.items() if v} == {}, info  # missing, unexpected, mismatched keys, errors
    expected, found = reference.state_dict(), again.state_dict()
    assert found.keys() == expected.keys()
    for k, v in expected.items():
        assert found[k].dtype == v.dtype and bool((found[k] == v).all()), f"{k} differs after the round trip"
    return ours, again.eval()


def close(ours, ref, what):
    """max |ours - ref| <= TOL * max(1, max |ref|); returns it (printed for the report)."""
    ref = ref.detach().numpy()
    err, scale = float(np.abs(np.array(ours) - ref).max()), max(1.0, float(np.abs(ref).max()))
    print(f"{what}: max |diff| {err:.2e} (max |output| {scale:.2f})")
    assert err <= TOL * scale, f"{what}: max |diff| {err:.3g} > {TOL} * {scale:.3g}"
    return err


def lifted(model, norm_markers=("norm",)):
    from hf_tiny import lift_init

    lift_init(model.eval(), norm_markers)
    return model


@pytest.mark.parametrize("untied", [False, True])
def test_gpt2_export_loads_in_transformers(untied, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
                                     eos_token_id=0, tie_word_embeddings=not untied)
    ours, again = export(tmp_path, lifted(transformers.GPT2LMHeadModel(config), (".ln_",)))
    ids = np.random.default_rng(1).integers(0, 50, (2, 11))
    with torch.no_grad():
        ref = again(torch.tensor(ids)).logits
    close(ours(mx.array(ids)), ref, f"gpt2 {'untied' if untied else 'tied'} logits")


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_bert_export_loads_in_transformers(head, tmp_path):
    """A BertForMaskedLM checkpoint loads as the encoder without a pooler (its head dropped, warned)
    and is exported as that: transformers reads it as ``BertModel(add_pooling_layer=False)``."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, vocab_size=50, max_position_embeddings=16)
    hf = lifted(getattr(transformers, head)(config))
    if head == "BertModel":
        ours, again = export(tmp_path, hf)
    else:
        with pytest.warns(UserWarning, match=r"cls\.predictions"):
            ours, again = export(tmp_path, hf, hf.bert, add_pooling_layer=False)
    ids = np.random.default_rng(1).integers(1, 50, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = mask[2, 3:] = 0
    with torch.no_grad():
        ref = again(torch.tensor(ids), attention_mask=torch.tensor(mask))
    hidden = ours(mx.array(ids), mx.array(mask))
    close(hidden, ref.last_hidden_state, f"bert {head} hidden states")
    if head == "BertModel":
        close(ours.pool(hidden), ref.pooler_output, "bert pooled")


@pytest.mark.parametrize("head", ["ViTForImageClassification", "ViTModel"])
def test_vit_export_loads_in_transformers(head, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=[16, 24], patch_size=[8, 4], num_channels=2, num_labels=3)
    ours, again = export(tmp_path, lifted(getattr(transformers, head)(config)))
    x = np.random.default_rng(1).standard_normal((2, 2, 16, 24)).astype(np.float32)
    with torch.no_grad():
        ref = again(torch.tensor(x))
        trunk = again.vit(torch.tensor(x)) if head != "ViTModel" else ref
    x = mx.array(x.transpose(0, 2, 3, 1))  # channels-last for us
    if head == "ViTModel":
        hidden = ours(x)
        close(ours.pool(hidden), ref.pooler_output, "vit pooled")
    else:
        close(ours(x), ref.logits, "vit logits")
        hidden = ours(x, return_embeddings=True)
    close(hidden, trunk.last_hidden_state, f"vit {head} hidden states")


@pytest.mark.parametrize("case", ["relu-tied", "gated-gelu-untied"])
def test_t5_export_loads_in_transformers(case, tmp_path):
    """The untied head is written as ``lm_head``; transformers >= 5 ties T5's head in memory but keeps a
    checkpoint's own, different one (it warns that it does not tie them)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    untied = case.endswith("untied")
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   decoder_start_token_id=0, feed_forward_proj="gated-gelu" if untied else "relu",
                                   tie_word_embeddings=not untied)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if untied:
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(50, 32) * 32**-0.5)
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "layer_norm" in name else p.mul_(2.0)
    ours, again = export(tmp_path, hf)
    assert ("lm_head" in ours) == untied and (again.lm_head.weight is again.shared.weight) != untied
    rng = np.random.default_rng(1)
    ids, dec = rng.integers(2, 50, (2, 11)), rng.integers(2, 50, (2, 7))
    dec[:, 0] = 0
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = again(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec),
                    attention_mask=torch.tensor(mask)).logits
    close(ours(mx.array(ids), mx.array(dec), mx.array(mask)), ref, f"t5 {case} logits")
