"""Adding an architecture is one converter module plus one registry line: this file *is* that module.

It defines a toy Llama-like architecture, ``toy_llama``, whose checkpoints use Meta's original
names and config keys (``tok_embeddings``, ``layers.i.attention.wq``, ``feed_forward.w1/w2/w3``,
``dim``, ``n_layers`` ...), with its own ``ModelArgs``, ``build``, ``sanitize`` and ``TASK`` and nothing
from the converters package but the ``BaseModelArgs`` base. The tests register it with
``register_architecture``, convert a checkpoint made from a random transformers ``LlamaForCausalLM``
(its weights renamed) with ``mlx-zeta convert``, load it with ``from_pretrained``, check the logits
against transformers and against the built-in ``llama`` converter on the original checkpoint, and
export it with ``mlx-zeta export-coreml``, checking the package with the numpy evaluator against MLX.
"""

import json
import re
import sys
import types
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import pytest

import mlx_zeta
import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.converters import BaseModelArgs, register_architecture, unregister_architecture
from mlx_zeta.cli import main
from mlx_zeta.structs import Decoder, Transformer

# ----------------------------------------------------------------------------- the toy converter module

TASK = "causal-lm"


@dataclass
class ModelArgs(BaseModelArgs):
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int
    n_kv_heads: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads


def build(args: ModelArgs) -> Transformer:
    head_dim = args.dim // args.n_heads
    layers = Decoder(dim=args.dim, depth=args.n_layers, heads=args.n_heads, attn_dim_head=head_dim,
                     attn_kv_heads=args.n_kv_heads, ff_swiglu=True, ff_inner_dim=args.hidden_dim, ff_no_bias=True,
                     rotary_pos_emb=True, rotary_emb_dim=head_dim, rotary_base=args.rope_theta,
                     norm=lambda d: nn.RMSNorm(d, eps=args.norm_eps))
    return Transformer(num_tokens=args.vocab_size, max_seq_len=args.max_seq_len, attn_layers=layers,
                       tie_embedding=False, use_abs_pos_emb=False)


_L, _OURS = r"^layers\.(\d+)\.", r"attn_layers.layers.\1."
_RULES = [(r"^tok_embeddings\.", "token_emb."), (r"^norm\.", "attn_layers.final_norm."), (r"^output\.", "to_logits."),
          (_L + r"attention\.w([qkv])\.", _OURS + r"attn.to_\2."), (_L + r"attention\.wo\.", _OURS + "attn.to_out."),
          (_L + r"feed_forward\.w2\.", _OURS + "ff.proj_out."), (_L + r"attention_norm\.", _OURS + "attn_norm."),
          (_L + r"ffn_norm\.", _OURS + "ff_norm.")]
_GATE_UP = re.compile(_L + r"feed_forward\.w([13])\.weight$")


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    out, halves = {}, {}
    for name, value in weights.items():
        m = _GATE_UP.match(name)
        if m:  # w1 = gate, w3 = up; FeedForward's GLU input is [up; gate]
            halves.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        for pattern, repl in _RULES:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        out[name] = value
    for layer, pair in halves.items():
        out[f"attn_layers.layers.{layer}.ff.proj_in.weight"] = mx.concatenate([pair["3"], pair["1"]], axis=0)
    return out


THIS = sys.modules[__name__]

# ----------------------------------------------------------------------------- the tests

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_tiny import assert_close, lift_init, save_hf, seeded  # noqa: E402

CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=120, hidden_dim=96, norm_eps=1e-5,
              rope_theta=10000.0, max_seq_len=256)
# transformers' names -> Meta's, the toy checkpoint's
_HF_TO_TOY = [(r"^model\.embed_tokens\.", "tok_embeddings."), (r"^model\.norm\.", "norm."), (r"^lm_head\.", "output."),
              (r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"layers.\1.attention.w\2."),
              (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
              (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
              (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
              (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
              (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
              (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm.")]


@pytest.fixture
def toy_registered():
    register_architecture("toy_llama", THIS)
    yield
    unregister_architecture("toy_llama")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(transformers model, its own folder, the same weights as a toy_llama folder)."""
    root = tmp_path_factory.mktemp("toy_llama")
    seeded(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=CONFIG["dim"], num_hidden_layers=CONFIG["n_layers"], num_attention_heads=CONFIG["n_heads"],
        num_key_value_heads=CONFIG["n_kv_heads"], intermediate_size=CONFIG["hidden_dim"],
        vocab_size=CONFIG["vocab_size"], max_position_embeddings=CONFIG["max_seq_len"], rms_norm_eps=1e-5,
        tie_word_embeddings=False)).eval()
    lift_init(hf)
    hf_folder = save_hf(hf, root / "hf")
    toy = {}
    for name, p in hf.state_dict().items():
        for pattern, repl in _HF_TO_TOY:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        toy[name] = mx.array(p.detach().numpy())
    assert not any(k.startswith("model.") for k in toy), sorted(toy)
    toy_folder = root / "toy"
    toy_folder.mkdir()
    mx.save_safetensors(str(toy_folder / "model.safetensors"), toy)
    (toy_folder / "config.json").write_text(json.dumps({"model_type": "toy_llama", **CONFIG}))
    return hf, hf_folder, toy_folder


def _tokens():
    return np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 13))


def test_toy_architecture_converts_loads_and_matches_transformers(toy_registered, checkpoints, tmp_path, capsys):
    hf, hf_folder, toy_folder = checkpoints
    dst = tmp_path / "converted"
    assert main(["convert", str(toy_folder), str(dst)]) == 0
    assert "(toy_llama," in capsys.readouterr().out
    assert {k: json.loads((dst / "config.json").read_text())[k] for k in ("model_type", "mlx_zeta_model_type")} == \
        {"model_type": "mlx_zeta", "mlx_zeta_model_type": "toy_llama"}  # marked: transformers refuses our format
    model = mlx_zeta.from_pretrained(dst, dtype="float32")
    assert isinstance(model, Transformer) and model.pretrained.model_type == "toy_llama"
    ids = _tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    assert_close(model(mx.array(ids)), ref, what="toy_llama logits vs transformers")
    # the same weights through the built-in llama converter (HF names) give the same logits
    llama = mlx_zeta.from_pretrained(hf_folder, dtype="float32")
    np.testing.assert_allclose(np.array(model(mx.array(ids))), np.array(llama(mx.array(ids))), rtol=0, atol=1e-5)


def test_toy_architecture_exports_to_core_ml(toy_registered, checkpoints, tmp_path, capsys):
    pytest.importorskip("coremltools")
    from test_coreml_stateful import CAPACITY, FP16_RTOL_OF_MAX, PREFILL, check_package, greedy_parity

    _, _, toy_folder = checkpoints
    out = tmp_path / "toy.mlpackage"
    code = main(["export-coreml", str(toy_folder), str(out), "--capacity", str(CAPACITY),
                 "--prefill-lens", str(PREFILL)])
    assert code == 0 and "task lm" in capsys.readouterr().out  # picked from TASK = "causal-lm"
    check_package(out, depth=CONFIG["n_layers"])
    model = mlx_zeta.from_pretrained(toy_folder)
    prompt = mx.array([[7, 3, 99, 42, 5, 18, 64, 2]])
    tokens, ref, err, rel = greedy_parity(out, model, prompt)
    assert tokens == ref and rel < FP16_RTOL_OF_MAX, (tokens, ref, err, rel)


def test_the_declared_task_picks_the_export(checkpoints, tmp_path, capsys):
    """The same module without TASK, or declaring seq2seq: no export, named; nothing written."""
    _, _, toy_folder = checkpoints
    without = types.ModuleType("toy_without_task")
    without.ModelArgs, without.build, without.sanitize = ModelArgs, build, sanitize
    seq2seq = types.ModuleType("toy_seq2seq")
    seq2seq.ModelArgs, seq2seq.build, seq2seq.sanitize, seq2seq.TASK = ModelArgs, build, sanitize, "seq2seq"
    for module, said in ((without, "declares no task"), (seq2seq, "task is seq2seq")):
        register_architecture("toy_llama", module)
        try:
            code = main(["export-coreml", str(toy_folder), str(tmp_path / "x.mlpackage")])
        finally:
            unregister_architecture("toy_llama")
        err = capsys.readouterr().err
        assert code == 2 and "no Core ML export for a Transformer" in err and said in err, err
    assert list(tmp_path.iterdir()) == []


def test_registry_errors_and_unregistering(checkpoints):
    _, _, toy_folder = checkpoints
    with pytest.raises(ValueError, match=r"unsupported model_type 'toy_llama'"):
        mlx_zeta.from_pretrained(toy_folder)
    register_architecture("toy_llama", __name__)  # a dotted path works too
    try:
        assert mlx_zeta.converters.ARCHITECTURES["toy_llama"] is THIS
        with pytest.raises(ValueError, match=r"model_type 'toy_llama' is already registered"):
            register_architecture("toy_llama", THIS)
    finally:
        unregister_architecture("toy_llama")
    assert "toy_llama" not in mlx_zeta.converters.ARCHITECTURES
    with pytest.raises(ValueError, match=r"not registered"):
        unregister_architecture("toy_llama")
    incomplete = types.ModuleType("incomplete")
    incomplete.ModelArgs = ModelArgs
    with pytest.raises(ValueError, match=r"to define ModelArgs, build, sanitize, got one without build, sanitize"):
        register_architecture("toy_llama", incomplete)
    bad_task = types.ModuleType("bad_task")
    bad_task.ModelArgs, bad_task.build, bad_task.sanitize, bad_task.TASK = ModelArgs, build, sanitize, "lm"
    with pytest.raises(ValueError, match=r"expected bad_task.TASK in \('causal-lm'"):
        register_architecture("toy_llama", bad_task)
    # a built-in replaced, then restored
    from mlx_zeta.converters import get_architecture, llama

    register_architecture("llama", THIS, replace=True)
    try:
        assert get_architecture("llama") is THIS
    finally:
        unregister_architecture("llama")
    assert get_architecture("llama") is llama


def test_each_model_has_one_home_and_old_paths_still_resolve():
    """Model classes are defined in mlx_zeta.models; the converter modules (and quant, for the
    MatMul-free LM) only re-export them, and importing the models imports no converter module."""
    import subprocess

    from mlx_zeta import models
    from mlx_zeta.converters import bert, t5, vit

    assert bert.BertEncoder is models.BertEncoder and bert.mean_pool is models.mean_pool
    assert t5.T5Model is models.T5Model and vit.PretrainedViT is models.PretrainedViT
    assert {c.__module__ for c in (models.BertEncoder, models.T5Model, models.PretrainedViT, models.MatMulFreeLM)} == {
        "mlx_zeta.models.bert", "mlx_zeta.models.t5", "mlx_zeta.models.vit", "mlx_zeta.models.matmulfree"}
    with pytest.raises(ImportError, match="MatMulFreeLM moved: import it from mlx_zeta.models"):
        from mlx_zeta.quant import MatMulFreeLM  # noqa: F401  (the quant layer does not reach up for it)
    code = ("import sys, mlx_zeta.models; print(sorted(m for m in sys.modules if m.startswith('mlx_zeta.converters.')"
            " and m.split('.')[-1] not in ('pretrained', 'io', 'base', 'fields', 'swaps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out  # (mlx_zeta/__init__ itself loads pretrained, io, base, fields, swaps)
