"""VisionEmbedding: parity with a patchify + linear torch reference, hand values, errors."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from parity import assert_close, check_parity

from mlx_zeta.nn.vision import VisionEmbedding
from reference.vision import VisionEmbeddingRef, conv_layout

PARAM_MAP = {"proj.weight": ("proj.weight", conv_layout)}
# (img_size, patch_size, in_chans, embed_dim)
CONFIGS = [(8, 4, 3, 16), ((12, 8), (4, 2), 2, 8), ((6, 10), 2, 1, 5)]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=["square", "rect-img-patch", "rect-img"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("cls", [False, True], ids=["nocls", "cls"])
def test_parity(dtype, config, mask, cls, rng):
    img, patch, cin, dim = config
    m = VisionEmbedding(img_size=img, patch_size=patch, in_chans=cin, embed_dim=dim,
                        contain_mask_token=mask, prepend_cls_token=cls)
    ref = VisionEmbeddingRef(_pair(img), _pair(patch), cin, dim, mask, cls)
    h, w = _pair(img)
    x = rng.standard_normal((2, h, w, cin)).astype(np.float32)
    inputs = [x]
    if mask:  # masked_position: bool (batch, num_patches), about half masked
        inputs.append(rng.random((2, m.num_patches)) < 0.5)
    check_parity(m, ref, inputs, dtype=dtype, param_map=PARAM_MAP, grad_inputs=[0],
                 torch_call=lambda t, x, *mp: t(x.permute(0, 3, 1, 2), *mp))


def test_mask_token_ignored_without_masked_position(rng):
    """contain_mask_token with masked_position=None is the plain embedding (and mask_token gets no gradient)."""
    m = VisionEmbedding(img_size=8, patch_size=4, in_chans=3, embed_dim=6, contain_mask_token=True)
    plain = VisionEmbedding(img_size=8, patch_size=4, in_chans=3, embed_dim=6)
    plain.proj.update(m.proj.parameters())
    x = mx.array(rng.standard_normal((2, 8, 8, 3)).astype(np.float32))
    assert_close(m(x), plain(x))

    def loss(params):
        m.update(params)
        return m(x).sum()

    g = mx.grad(loss)(m.trainable_parameters())
    assert_close(g["mask_token"], np.zeros((1, 1, 6)), what="grad of mask_token")


def test_hand_values():
    """One patch covering the whole image, weight 1, bias 0.5: the token is sum(pixels) + 0.5."""
    m = VisionEmbedding(img_size=(2, 3), patch_size=(2, 3), in_chans=2, embed_dim=2,
                        contain_mask_token=True, prepend_cls_token=True)
    m.proj.weight = mx.ones_like(m.proj.weight)
    m.proj.bias = mx.full((2,), 0.5)
    m.cls_token = mx.array([[[7.0, -7.0]]])
    m.mask_token = mx.array([[[3.0, 4.0]]])
    x = mx.arange(12, dtype=mx.float32).reshape(1, 2, 3, 2)  # sum 0 + ... + 11 = 66
    out = m(mx.concatenate([x, x]), masked_position=mx.array([[False], [True]]))
    expected = [[[7, -7], [66.5, 66.5]],  # cls, unmasked patch
                [[7, -7], [3, 4]]]  # cls, masked patch -> mask_token exactly
    assert_close(out, np.array(expected, dtype=np.float64))


def test_patch_order_row_by_row():
    """A single bright pixel at (r, c) lights only token (r // ph) * (W // pw) + c // pw."""
    m = VisionEmbedding(img_size=(6, 8), patch_size=(3, 2), in_chans=1, embed_dim=4)
    m.proj.bias = mx.zeros_like(m.proj.bias)
    for r, c in [(0, 0), (4, 1), (5, 7), (2, 6)]:
        x = np.zeros((1, 6, 8, 1), np.float32)
        x[0, r, c, 0] = 1.0
        norms = np.abs(np.array(m(mx.array(x))[0])).sum(-1)
        assert np.flatnonzero(norms).tolist() == [(r // 3) * 4 + c // 2]


def test_masked_positions_take_mask_token(rng):
    """Masked rows equal mask_token; unmasked rows equal the plain embedding; 0/1 ints work like bools."""
    m = VisionEmbedding(img_size=8, patch_size=2, in_chans=3, embed_dim=8, contain_mask_token=True)
    x = mx.array(rng.standard_normal((3, 8, 8, 3)).astype(np.float32))
    mp = rng.random((3, 16)) < 0.3
    out, plain = np.array(m(x, mx.array(mp))), np.array(m(x))
    np.testing.assert_array_equal(out[mp], np.broadcast_to(np.array(m.mask_token)[0], (mp.sum(), 8)))
    np.testing.assert_array_equal(out[~mp], plain[~mp])
    np.testing.assert_array_equal(np.array(m(x, mx.array(mp.astype(np.int32)))), out)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("cls", [False, True])
def test_parameters_and_lengths(mask, cls):
    m = VisionEmbedding(img_size=(32, 16), patch_size=(8, 4), in_chans=3, embed_dim=12,
                        contain_mask_token=mask, prepend_cls_token=cls)
    assert m.patch_shape == (4, 4) and m.num_patches == 16
    assert m.num_position_embeddings() == 16 + cls
    assert ("mask_token" in m) == mask and ("cls_token" in m) == cls
    assert m(mx.zeros((2, 32, 16, 3))).shape == (2, 16 + cls, 12)
    for name in ("mask_token", "cls_token"):  # std-0.02 normal truncated at 2 std
        if name in m:
            t = np.array(m[name])
            assert t.shape == (1, 1, 12) and np.all(np.abs(t) <= 0.04) and np.any(t != 0)


def test_default_is_vit_base():
    m = VisionEmbedding(prepend_cls_token=True)
    assert m.proj.weight.shape == (768, 16, 16, 3)
    assert m.num_position_embeddings() == 197


@pytest.mark.parametrize("kwargs, match", [
    (dict(img_size=224, patch_size=15), r"\[VisionEmbedding\] img_size \(224, 224\) must be divisible by patch_size \(15, 15\)"),
    (dict(img_size=(32, 30), patch_size=(8, 4)), r"\[VisionEmbedding\] img_size \(32, 30\) must be divisible"),
    (dict(img_size=(32, 32, 3)), r"\[VisionEmbedding\] img_size must be a positive int or a pair"),
    (dict(img_size=32.0), r"\[VisionEmbedding\] img_size must be a positive int or a pair"),
    (dict(patch_size=0), r"\[VisionEmbedding\] patch_size must be a positive int or a pair"),
    (dict(in_chans=0), r"\[VisionEmbedding\] in_chans must be a positive int, got 0"),
    (dict(embed_dim=7.5), r"\[VisionEmbedding\] embed_dim must be a positive int, got 7.5"),
])
def test_init_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionEmbedding(**kwargs)


def test_call_errors():
    m = VisionEmbedding(img_size=16, patch_size=8, in_chans=3, embed_dim=4)
    msg = r"\[VisionEmbedding\] expected images of shape \(batch, 16, 16, 3\), got "
    with pytest.raises(ValueError, match=msg + r"\(2, 12, 16, 3\)"):
        m(mx.zeros((2, 12, 16, 3)))
    with pytest.raises(ValueError, match=msg + r"\(2, 3, 16, 16\)"):  # channels-first by mistake
        m(mx.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match=msg + r"\(16, 16, 3\)"):
        m(mx.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match=r"masked_position was given but the module has no mask_token"):
        m(mx.zeros((2, 16, 16, 3)), mx.zeros((2, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"\[VisionEmbedding\] unknown keyword argument\(s\) \['mask'\]"):
        m(mx.zeros((2, 16, 16, 3)), mask=None)
    masked = VisionEmbedding(img_size=16, patch_size=8, in_chans=3, embed_dim=4, contain_mask_token=True)
    with pytest.raises(ValueError, match=r"expected masked_position of shape \(batch, num_patches\) = \(2, 4\), got \(2, 5\)"):
        masked(mx.zeros((2, 16, 16, 3)), mx.zeros((2, 5), dtype=mx.bool_))

