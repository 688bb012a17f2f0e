"""mlx_zeta.kernels.packing: exact round trips of the 2-bit (Hugging Face BitNet) and base-3
(1.6-bit) formats over arbitrary shapes, hand-drawn layouts, storage cost, byte-for-byte
agreement with transformers' ``pack_weights``/``unpack_weights``, and the errors."""

import mlx_zeta  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_zeta.kernels.packing import bytes_per_weight, pack_2bit, pack_base3, unpack_2bit, unpack_base3

EDGE_SHAPES = [(1, 1), (1, 7), (5, 1), (3, 4), (4, 5), (7, 11), (9, 10), (6, 2)]


def _ternary(shape, seed=0):
    return np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 37), cols=st.integers(1, 37), seed=st.integers(0, 2**16), numpy_in=st.booleans())
def test_2bit_round_trip(out, cols, seed, numpy_in):
    q = _ternary((out, cols), seed)
    packed = pack_2bit(q if numpy_in else mx.array(q))
    assert packed.dtype == mx.uint8 and packed.shape == ((out + 3) // 4, cols)
    back = unpack_2bit(packed, out)
    assert back.dtype == mx.int8 and np.array_equal(np.array(back), q)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 37), cols=st.integers(1, 37), seed=st.integers(0, 2**16), numpy_in=st.booleans())
def test_base3_round_trip(out, cols, seed, numpy_in):
    q = _ternary((out, cols), seed)
    packed = pack_base3(q if numpy_in else mx.array(q))
    assert packed.dtype == mx.uint8 and packed.shape == (out, (cols + 4) // 5)
    assert int(mx.max(packed).item()) <= 242
    for spec in (cols, (out, cols)):
        back = unpack_base3(packed, spec)
        assert back.dtype == mx.int8 and np.array_equal(np.array(back), q)


@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_round_trip_edge_shapes_and_constant_matrices(shape):
    for q in (_ternary(shape), np.full(shape, -1, np.int8), np.zeros(shape, np.int8), np.ones(shape, np.int8)):
        assert np.array_equal(np.array(unpack_2bit(pack_2bit(q), shape[0])), q)
        assert np.array_equal(np.array(unpack_base3(pack_base3(q), shape[1])), q)


def test_2bit_hand_drawn_layout():
    # out = 5 -> R = ceil(5/4) = 2 packed rows; block i = original rows [2i, 2i+1] -> bits [2i, 2i+1].
    # codes c = w + 1:         col 0  col 1
    #   row 0 ( 1, -1) -> c   (2,    0)   packed row 0, bits 1-0
    #   row 1 ( 0,  0) -> c   (1,    1)   packed row 1, bits 1-0
    #   row 2 (-1,  1) -> c   (0,    2)   packed row 0, bits 3-2
    #   row 3 ( 1,  0) -> c   (2,    1)   packed row 1, bits 3-2
    #   row 4 ( 0,  1) -> c   (1,    2)   packed row 0, bits 5-4
    #   (rows 5, 6, 7 do not exist: bits 00, as transformers leaves them)
    # packed[0, 0] = 0b00_01_00_10 = 18   packed[0, 1] = 0b00_10_10_00 = 40
    # packed[1, 0] = 0b00_00_10_01 = 9    packed[1, 1] = 0b00_00_01_01 = 5
    q = np.array([[1, -1], [0, 0], [-1, 1], [1, 0], [0, 1]], np.int8)
    packed = pack_2bit(q)
    assert np.array_equal(np.array(packed), np.array([[18, 40], [9, 5]], np.uint8))
    assert np.array_equal(np.array(unpack_2bit(packed, 5)), q)


def test_base3_hand_drawn_layout():
    # row [1, -1, 0, 0, 1 | -1, 1] -> codes [2, 0, 1, 1, 2 | 0, 2, pad 1, 1, 1]
    # byte 0 = 2 + 0*3 + 1*9 + 1*27 + 2*81 = 200; byte 1 = 0 + 2*3 + 1*9 + 1*27 + 1*81 = 123
    # row of zeros: every code 1 -> 1 + 3 + 9 + 27 + 81 = 121 (the padded tail too)
    q = np.array([[1, -1, 0, 0, 1, -1, 1], [0] * 7], np.int8)
    packed = pack_base3(q)
    assert np.array_equal(np.array(packed), np.array([[200, 123], [121, 121]], np.uint8))
    assert np.array_equal(np.array(unpack_base3(packed, 7)), q)


@pytest.mark.parametrize("out, cols", [(64, 40), (8, 5), (4, 1000), (7, 11), (1, 1)])
def test_bytes_per_weight(out, cols):
    q = _ternary((out, cols))
    two, three = pack_2bit(q), pack_base3(q)
    # 2-bit: ceil(out / 4) bytes per column; base-3: ceil(in / 5) bytes per row
    assert bytes_per_weight(two, (out, cols)) == ((out + 3) // 4) / out
    assert bytes_per_weight(three, (out, cols)) == ((cols + 4) // 5) / cols
    if out % 4 == 0:
        assert bytes_per_weight(two, (out, cols)) == 0.25
    if cols % 5 == 0:
        assert bytes_per_weight(three, (out, cols)) == 0.2
    # one float32 scale per tensor on top of the codes
    assert bytes_per_weight(three, (out, cols), scale_bytes=4) == (three.nbytes + 4) / (out * cols)


def test_bytes_per_weight_at_model_size():
    q = _ternary((256, 640))
    assert bytes_per_weight(pack_2bit(q), q.shape, scale_bytes=4) == pytest.approx(0.25, abs=1e-4)
    assert bytes_per_weight(pack_base3(q), q.shape, scale_bytes=4) <= 0.2 + 1e-4


def _hf_bitnet():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers.integrations.bitnet")


@pytest.mark.parametrize("shape", [(8, 6), (12, 3), (5, 4), (9, 7), (2, 3), (6, 5), (1, 2)])
def test_2bit_matches_transformers_pack_weights(shape):
    import torch

    bitnet = _hf_bitnet()
    q = _ternary(shape, seed=sum(shape))
    theirs = bitnet.pack_weights(torch.from_numpy(q.copy()))  # pack_weights adds 1 to its input in place
    assert theirs.dtype == torch.uint8
    assert np.array_equal(np.array(pack_2bit(q)), theirs.numpy())
    assert np.array_equal(np.array(unpack_2bit(mx.array(theirs.numpy()), shape[0])), q)
    with torch._dynamo.config.patch(disable=True):  # unpack_weights is torch.compile'd: run it eagerly
        back = bitnet.unpack_weights(torch.from_numpy(np.array(pack_2bit(q))), dtype=torch.float32)
    # transformers returns all 4 * ceil(out / 4) rows; the padding rows decode to -1 (code 0)
    assert np.array_equal(back.numpy()[: shape[0]], q.astype(np.float32))
    assert np.all(back.numpy()[shape[0]:] == -1)


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.0, 1.0]]), "integer"),
    (mx.array([[0.0, 1.0]]), "integer"),
    (np.array([[0, 2]]), r"values in \{-1, 0, 1\}"),
    (mx.array([[-3, 0]], dtype=mx.int32), r"found values in \[-3, 0\]"),
    (np.array([1, 0, -1]), "2-D"),
    (np.zeros((2, 2, 2), np.int8), "2-D"),
    (np.zeros((0, 3), np.int8), "non-empty"),
])
def test_pack_errors(bad, match):
    for fn, name in ((pack_2bit, "pack_2bit"), (pack_base3, "pack_base3")):
        with pytest.raises(ValueError, match=rf"\[{name}\].*{match}"):
            fn(bad)


def test_unpack_errors():
    packed = pack_2bit(_ternary((8, 3)))
    with pytest.raises(ValueError, match=r"\[unpack_2bit\] expected a uint8"):
        unpack_2bit(packed.astype(mx.int32), 8)
    with pytest.raises(ValueError, match=r"out_features=9 packs into 3 rows, but the packed array has 2"):
        unpack_2bit(packed, 9)
    with pytest.raises(ValueError, match="out_features to be an int"):
        unpack_2bit(packed, 0)
    with pytest.raises(ValueError, match="code 3"):
        unpack_2bit(np.array([[0b11]], np.uint8), 1)
    b3 = pack_base3(_ternary((2, 7)))
    with pytest.raises(ValueError, match=r"in_features=11 packs into 3 bytes per row, but the packed array has 2"):
        unpack_base3(b3, 11)
    with pytest.raises(ValueError, match=r"shape \(3, 7\) does not match"):
        unpack_base3(b3, (3, 7))
    with pytest.raises(ValueError, match="above 242"):
        unpack_base3(np.array([[243]], np.uint8), 5)
    with pytest.raises(ValueError, match=r"\[unpack_base3\] expected a non-empty 2-D"):
        unpack_base3(np.array([1, 2], np.uint8), 5)
