"""Stateful Core ML decoder export (export_decoder, ``mlx-zeta export-coreml``) checked without a Mac:
the saved package's ``prefill_{L}``/``decode`` functions run under the numpy Evaluator, driven as the
contract in ``coreml/stateful.py`` says (right padding, smallest fitting ``prefill_L``, longer prompts
in chunks of the largest), the KV cache kept as state across calls, and must greedy-decode the same
tokens as MLX's own KV-cache decode."""

from pathlib import Path

import numpy as np
import pytest

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters.coreml import MASK_FILL, export_decoder, lower, open_package, package_summary  # noqa: E402
from mlx_zeta.converters.coreml.evaluate import Evaluator, load_program  # noqa: E402
from mlx_zeta.converters.coreml.lint import lint  # noqa: E402
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer  # noqa: E402

CAPACITY, PREFILL, STEPS = 32, 8, 16
LENS = (4, 8)  # the multifunction package's prefill lengths
PAD = 1  # right padding: any id; a nonzero one writes real keys/values into the padded slots
FP16_RTOL_OF_MAX = 1e-2  # max |error| / max |reference logit|, per step


def prefill_plan(n, lens):
    """[(L, real tokens)] for a prompt of n tokens, as the contract reads (written here, not imported):
    the smallest L >= the tokens left, else the largest L on the next L tokens, again."""
    calls = []
    while n > 0:
        length = min([m for m in lens if m >= n] or [max(lens)])
        calls.append((length, min(length, n)))
        n -= calls[-1][1]
    return calls


def greedy_parity(package, model, prompt, lens=(PREFILL,), steps=STEPS):
    """The prompt through the package's prefill functions (prefill_plan, right-padded with PAD), then
    ``steps`` decode steps, under the Evaluator (one state dict for every function), fed MLX's greedy
    tokens; returns (coreml greedy tokens, MLX greedy tokens, max abs error, max rel error) over the
    logits of every real position."""
    ids = np.array(prompt)[0].tolist()
    n = len(ids)
    ref_tokens = np.array(AutoregressiveWrapper(model).generate(prompt, steps, temperature=0.0))[0].tolist()
    ref = np.array(model(mx.array([ids + ref_tokens])).astype(mx.float32))[0]  # (n + steps, vocab)
    prog, state, funcs = load_program(package), {}, {}  # the package read once, for every function

    def call(name, tokens, position):
        if name not in funcs:
            funcs[name] = Evaluator(prog, function=name, state=state)
        f = funcs[name]
        out = f({"input_ids": np.array([tokens], np.int32), "position": np.array([position], np.int32)})
        assert not f.nonfinite_ops, f.nonfinite_ops
        return out["logits"][0]

    logits, pos = [], 0
    for length, real in prefill_plan(n, lens):
        logits.append(call(f"prefill_{length}", ids[pos:pos + real] + [PAD] * (length - real), pos)[:real])
        pos += real
    for t in range(steps):
        logits.append(call("decode", [ref_tokens[t]], n + t))
    got = np.concatenate(logits).astype(np.float64)  # (n + steps, vocab)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max(axis=-1)
    rel = err / np.abs(ref).max(axis=-1)
    tokens = got[n - 1:n - 1 + steps].argmax(axis=-1).tolist()  # greedy from each step's last logits
    return tokens, ref_tokens, float(err.max()), float(rel.max())


def check_package(package, depth, lens=(PREFILL,)):
    summary = package_summary(package)
    assert list(summary["functions"]) == [f"prefill_{n}" for n in lens] + ["decode"]
    for n in lens:
        assert summary["functions"][f"prefill_{n}"]["inputs"] == {"input_ids": (1, n), "position": (1,)}
        assert summary["functions"][f"prefill_{n}"]["outputs"] == ["logits"]
    assert summary["functions"]["decode"]["inputs"] == {"input_ids": (1, 1), "position": (1,)}
    assert sorted(summary["states"]) == sorted([f"k_cache_{i}" for i in range(depth)] +
                                               [f"v_cache_{i}" for i in range(depth)])
    assert all(s[2] == CAPACITY for s in summary["states"].values())
    prog = load_program(package)
    for name, func in prog.functions.items():
        ops = list(func.operations)
        kinds = [op.op_type for op in ops]
        # one read and one write per state; attention reads the written value, never a second read
        assert kinds.count("read_state") == kinds.count("coreml_update_state") == 2 * depth, name
        for op in ops:
            if op.op_type == "coreml_update_state":
                assert op.outputs[0].child_ops, f"{name}: the updated cache is not what attention reads"
        assert kinds.count("scaled_dot_product_attention") == depth and "softmax" not in kinds
        for op in ops:  # fp16-safe mask: no fill at or below -MASK_CLAMP (-inf, float32 lowest) anywhere
            val = op.outputs[0].val if op.op_type == "const" else None
            if val is not None and np.asarray(val).dtype.kind == "f":
                assert np.isfinite(val).all() and not (np.asarray(val) <= -lower.MASK_CLAMP).any()
    findings = lint(package)
    assert not findings, [str(f) for f in findings]
    return summary


def tiny_rotary_gqa():
    mx.random.seed(0)
    return Transformer(num_tokens=64, max_seq_len=64, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_kv_heads=2, rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True,
        ff_swish=True))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(model, its package with prefill_lens=PREFILL: functions prefill_8, decode)."""
    model, root = tiny_rotary_gqa(), tmp_path_factory.mktemp("coreml_single")
    package = export_decoder(model, root / "lm.mlpackage", capacity=CAPACITY, prefill_lens=PREFILL)
    assert [p.name for p in root.iterdir()] == ["lm.mlpackage"]  # no temp folder left
    return model, package


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """(the same model, its package with prefill_lens=(8, 4, 8): functions prefill_4, prefill_8, decode)."""
    model, root = tiny_rotary_gqa(), tmp_path_factory.mktemp("coreml_multi")
    return model, export_decoder(model, root / "lm.mlpackage", capacity=CAPACITY, prefill_lens=(8, 4, 8))


def test_tiny_rotary_gqa_decoder_greedy_parity(single):
    model, package = single
    check_package(package, depth=2)
    prompt = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    tokens, ref, err, rel = greedy_parity(package, model, prompt)
    print(f"rotary GQA decoder: fp16 logits max abs {err:.2e}, max rel-of-max {rel:.2e}")
    assert tokens == ref and rel < FP16_RTOL_OF_MAX


def test_multifunction_package_has_each_prefill_length_and_decode_by_default(multi):
    _, package = multi
    check_package(package, depth=2, lens=LENS)  # deduplicated and sorted: prefill_4, prefill_8, decode
    assert open_package(package).spec.description.defaultFunctionName == "decode"


@pytest.mark.parametrize("n, plan", [(4, [(4, 4)]), (6, [(8, 6)]), (11, [(8, 8), (4, 3)])])
def test_multifunction_greedy_parity_with_padding_and_chunks(multi, n, plan):
    """4 tokens fill prefill_4; 6 are right-padded into prefill_8; 11 (more than the largest L) go
    as 8 through prefill_8, then 3 right-padded into prefill_4; decode continues after each."""
    model, package = multi
    assert prefill_plan(n, LENS) == plan
    prompt = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5][:n]])
    tokens, ref, err, rel = greedy_parity(package, model, prompt, LENS, steps=4)
    print(f"{n}-token prompt through {plan}: fp16 logits max abs {err:.2e}, max rel-of-max {rel:.2e}")
    assert tokens == ref and rel < FP16_RTOL_OF_MAX


def test_multifunction_package_stores_the_weights_once(single, multi):
    """One more prefill function adds its program, not another copy of the weights (save_multifunction
    deduplicates equal blobs; no constant may depend on the sequence length: unbroadcast_constants)."""
    def weight_bytes(package):
        return (Path(package) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size

    one, two = weight_bytes(single[1]), weight_bytes(multi[1])
    print(f"weight.bin: {one} B with prefill_8 + decode, {two} B with prefill_4 + prefill_8 + decode")
    assert one > 10_000 and two < 1.01 * one


def test_mask_fill_is_fp16_safe_before_fusion():
    """Unfused, the causal fill of the traced decode step is a mask fill lowered to MASK_FILL."""
    from mlx_zeta.converters.coreml.export import to_mil
    from mlx_zeta.converters.coreml.stateful import DecoderStep, cache_shapes

    mx.random.seed(0)
    model = Transformer(num_tokens=64, max_seq_len=64, attn_layers=Decoder(dim=32, depth=1, heads=4,
                                                                          rotary_pos_emb=True))
    k, v = cache_shapes(model, CAPACITY, 1)
    args = [mx.zeros((1, 1), mx.int32), mx.zeros((1,), mx.int32), mx.zeros(k[0]), mx.zeros(v[0])]
    prog = to_mil(DecoderStep(model, CAPACITY), args, fuse_attention=False)
    consts = [np.asarray(op.outputs[0].val) for op in prog.functions["main"].operations
              if op.op_type == "const" and np.asarray(op.outputs[0].val).dtype.kind == "f"]
    assert any((c == MASK_FILL).any() for c in consts)
    assert all(np.isfinite(c).all() and (c >= MASK_FILL).all() for c in consts)


def test_export_decoder_rejects_bad_options(tmp_path):
    from mlx_zeta.structs import Encoder

    mx.random.seed(0)
    model = Transformer(num_tokens=64, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=4))
    for lens in (9, (), 0, (4, 9), "8", (4, 8.0), True, [4, None]):
        with pytest.raises(ValueError) as e:
            export_decoder(model, tmp_path / "a.mlpackage", capacity=8, prefill_lens=lens)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("[export_decoder] expected prefill_lens to be an int in [1, capacity=8]")
        assert msg.endswith(f"got {lens!r}"), msg
    with pytest.raises(ValueError, match="max_seq_len=16"):
        export_decoder(model, tmp_path / "a.mlpackage", capacity=32, prefill_lens=8)
    encoder = Transformer(num_tokens=64, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=4))
    with pytest.raises(ValueError, match="causal"):
        export_decoder(encoder, tmp_path / "a.mlpackage", capacity=8, prefill_lens=4)
    with pytest.raises(ValueError, match=r"\[export_decoder\] unknown metadata key 'authors'"):
        export_decoder(model, tmp_path / "a.mlpackage", capacity=8, prefill_lens=4, metadata={"authors": "me"})
    with pytest.raises(ValueError, match=r"\[export_decoder\] expected metadata\['user'\] to map str to str.*'n': 3"):
        export_decoder(model, tmp_path / "a.mlpackage", capacity=8, prefill_lens=4, metadata={"user": {"n": 3}})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI on a converted tiny Llama
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF folder, exported package, CLI stdout) for a tiny random Llama (GQA, untied)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_convert_llama import make

    from mlx_zeta.cli import main

    root = tmp_path_factory.mktemp("coreml_llama")
    folder = make("llama-gqa-untied", root / "hf")[1]
    out = root / "llama.mlpackage"
    code = main(["export-coreml", str(folder), str(out), "--capacity", str(CAPACITY), "--prefill-lens", str(PREFILL)])
    assert code == 0
    return folder, out


def test_cli_export_coreml_llama_greedy_parity(llama, capsys):
    folder, package = llama
    check_package(package, depth=2)
    model = mlx_zeta.from_pretrained(folder)
    prompt = mx.array([[7, 3, 99, 42, 5, 18, 64, 2]])
    tokens, ref, err, rel = greedy_parity(package, model, prompt)
    print(f"tiny Llama: fp16 logits max abs {err:.2e}, max rel-of-max {rel:.2e}")
    assert tokens == ref and rel < FP16_RTOL_OF_MAX


def test_cli_export_coreml_errors_exit_2_with_one_line(llama, tmp_path, capsys):
    from mlx_zeta.cli import main

    folder, _ = llama
    for argv, match in ((["--task", "vit"], "does not fit"), (["--seq-len", "8"], "not used by task lm"),
                        (["--capacity", "4", "--prefill-lens", "8"], "length <= --capacity 4, got 8")):
        code = main(["export-coreml", str(folder), str(tmp_path / "x.mlpackage"), *argv])
        out, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and match in err, err
    assert main(["export-coreml", str(folder), str(tmp_path / "x.zip")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_export_coreml_vit_and_bert(tmp_path, capsys):
    """--task auto picks the image classifier for a ViT and the encoder export for a BERT; the
    packages evaluate to MLX's outputs."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from hf_tiny import lift_init, save_hf, seeded
    from test_convert_vit import make as make_vit

    from mlx_zeta.cli import main

    vit_folder = make_vit(tmp_path / "vit")[1]
    seeded(0)
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=50,
        max_position_embeddings=16, type_vocab_size=2)).eval()
    lift_init(bert)
    bert_folder = save_hf(bert, tmp_path / "bert")
    assert main(["export-coreml", str(vit_folder), str(tmp_path / "vit.mlpackage")]) == 0
    assert main(["export-coreml", str(bert_folder), str(tmp_path / "bert.mlpackage"), "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "task vit" in out and "task encoder" in out

    vit = mlx_zeta.from_pretrained(vit_folder)
    (h, w), c = vit.embeddings.img_size, vit.embeddings.in_chans
    x = np.random.default_rng(0).normal(size=(1, h, w, c)).astype(np.float32)
    got = Evaluator(tmp_path / "vit.mlpackage")({"pixel_values": x})["logits"]
    ref = np.array(vit(mx.array(x)))
    assert np.abs(got - ref).max() < FP16_RTOL_OF_MAX * np.abs(ref).max()

    model = mlx_zeta.from_pretrained(bert_folder)
    ids, mask = np.array([[5, 7, 9, 11, 13, 2, 0, 0]], np.int32), np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    got = Evaluator(tmp_path / "bert.mlpackage")({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    ref = np.array(model(mx.array(ids), mx.array(mask)))
    assert np.abs(got - ref).max() < FP16_RTOL_OF_MAX * np.abs(ref).max()
