r"""Packed storage for ternary weights :math:`W \in \{-1, 0, 1\}^{out \times in}`.

Two formats, both storing the code :math:`c = w + 1 \in \{0, 1, 2\}`:

* **2-bit** (:func:`pack_2bit`), Hugging Face's BitNet layout
  (``transformers.integrations.bitnet.pack_weights``): 4 weights per byte along
  the *output* axis, 0.25 bytes per weight. Byte for byte what transformers writes,
  so BitNet checkpoints load without conversion.
* **base-3** (:func:`pack_base3`): 5 weights per byte along the *input* axis as the
  digits of a base-3 number (:math:`3^5 = 243 \le 256`), 0.2 bytes = 1.6 bits per
  weight, close to the :math:`\log_2 3 \approx 1.585` bits of information.

All functions take an ``mx.array`` or a numpy array, are vectorised MLX ops, and
return ``mx.array``. A per-tensor scale (:func:`~mlx_zeta.quant.ternarize`) is
stored beside the codes by the layers that use them.

The layout lives in the kernel layer because :func:`~mlx_zeta.kernels.ternary_matmul` reads
it; :mod:`mlx_zeta.quant` re-exports these functions for users.
"""

from typing import Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from mlx_zeta.common import check_int

__all__ = ["pack_2bit", "unpack_2bit", "pack_base3", "unpack_base3", "base3_codes", "bytes_per_weight", "TRITS_PER_BYTE"]

ArrayLike = Union[mx.array, np.ndarray]

VALUES_PER_BYTE_2BIT = 4
TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)
_MAX_BASE3_BYTE = 3**TRITS_PER_BYTE - 1  # 242 = "22222" in base 3


def _ternary_matrix(fn: str, q: ArrayLike) -> mx.array:
    """``q`` as a 2-D int8 mx.array after checking its dtype and values."""
    if not isinstance(q, mx.array):
        q = np.asarray(q)
        if q.dtype.kind not in "iu":
            raise ValueError(f"[{fn}] expected an integer array of ternary values, got numpy dtype {q.dtype} "
                             "(use mlx_zeta.quant.ternarize to quantize float weights)")
        q = mx.array(q)
    if not mx.issubdtype(q.dtype, mx.integer):
        raise ValueError(f"[{fn}] expected an integer array of ternary values, got dtype {q.dtype} "
                         "(use mlx_zeta.quant.ternarize to quantize float weights)")
    if q.ndim != 2 or q.size == 0:
        raise ValueError(f"[{fn}] expected a non-empty 2-D (out_features, in_features) array, "
                         f"got shape {tuple(q.shape)}")
    lo, hi = mx.min(q).item(), mx.max(q).item()
    if lo < -1 or hi > 1:
        raise ValueError(f"[{fn}] expected values in {{-1, 0, 1}}, found values in [{lo}, {hi}]")
    return q.astype(mx.int8)


def _packed_matrix(fn: str, packed: ArrayLike) -> mx.array:
    packed = packed if isinstance(packed, mx.array) else mx.array(np.asarray(packed))
    if packed.dtype != mx.uint8:
        raise ValueError(f"[{fn}] expected a uint8 packed array, got dtype {packed.dtype}")
    if packed.ndim != 2 or packed.size == 0:
        raise ValueError(f"[{fn}] expected a non-empty 2-D packed array, got shape {tuple(packed.shape)}")
    return packed


def pack_2bit(q: ArrayLike) -> mx.array:
    r"""Pack ternary ``q`` of shape ``(out, in)`` into uint8 ``(ceil(out / 4), in)``, HF BitNet layout.

    With :math:`R = \lceil out / 4 \rceil` packed rows, the original rows are cut into
    four consecutive blocks of :math:`R` rows; block :math:`i` goes to bits
    :math:`[2i, 2i+1]`, so bits :math:`[2i, 2i+1]` of packed row :math:`r` hold the code
    :math:`w + 1` of original row :math:`iR + r`. For ``out = 8`` (:math:`R = 2`)::

        packed row 0:  bits 7 6 | 5 4 | 3 2 | 1 0
                            row 6 | row 4 | row 2 | row 0     (same column)
        packed row 1:       row 7 | row 5 | row 3 | row 1

    Slots past the last row (``out`` not a multiple of 4, e.g. ``out = 5``: :math:`R = 2`,
    rows 5, 6, 7 do not exist) hold bits ``00``, as transformers' ``pack_weights``
    leaves them; :func:`unpack_2bit` drops them.

    Args:
        q (array): int8 (any integer dtype) values in {-1, 0, 1}, shape ``(out, in)``.

    Returns:
        uint8 array of shape ``(ceil(out / 4), in)``.
    """
    q = _ternary_matrix("pack_2bit", q)
    out, cols = q.shape
    rows = -(-out // VALUES_PER_BYTE_2BIT)
    codes = (q + 1).astype(mx.uint8)
    pad = VALUES_PER_BYTE_2BIT * rows - out
    if pad:  # empty slots: code 0, as in transformers
        codes = mx.concatenate([codes, mx.zeros((pad, cols), dtype=mx.uint8)], axis=0)
    codes = codes.reshape(VALUES_PER_BYTE_2BIT, rows, cols)  # (slot, R, in)
    packed = codes[0]
    for slot in range(1, VALUES_PER_BYTE_2BIT):  # 3 whole-array ops, not a loop over elements
        packed = packed | (codes[slot] << (2 * slot))
    return packed


def unpack_2bit(packed: ArrayLike, out_features: int) -> mx.array:
    r"""Inverse of :func:`pack_2bit`: uint8 ``(ceil(out / 4), in)`` -> int8 ``(out, in)`` in {-1, 0, 1}.

    ``out_features`` is needed because the packed shape only gives :math:`\lceil out / 4 \rceil`.
    Raises ``ValueError`` on a 2-bit code of 3, which no ternary value packs to.
    """
    packed = _packed_matrix("unpack_2bit", packed)
    rows, cols = packed.shape
    check_int("unpack_2bit", "out_features", out_features, 1)
    if -(-out_features // VALUES_PER_BYTE_2BIT) != rows:
        raise ValueError(f"[unpack_2bit] out_features={out_features} packs into {-(-out_features // 4)} rows, "
                         f"but the packed array has {rows} rows (shape {tuple(packed.shape)})")
    shifts = mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(VALUES_PER_BYTE_2BIT, 1, 1)
    codes = ((packed[None] >> shifts) & 3).reshape(VALUES_PER_BYTE_2BIT * rows, cols)[:out_features]
    if mx.any(codes == 3).item():
        raise ValueError("[unpack_2bit] found the 2-bit code 3 (value 2), which is not a packed ternary weight")
    return codes.astype(mx.int8) - 1


def pack_base3(q: ArrayLike) -> mx.array:
    r"""Pack ternary ``q`` of shape ``(out, in)`` into uint8 ``(out, ceil(in / 5))``, 5 trits per byte.

    Each row is cut into groups of 5 consecutive weights along the input axis; a group
    :math:`(w_0, \dots, w_4)` becomes the little-endian base-3 number

    .. math:: b = \sum_{k=0}^{4} (w_k + 1)\, 3^k \in [0, 242].

    Example: weights ``[1, -1, 0, 0, 1]`` -> codes ``[2, 0, 1, 1, 2]`` ->
    :math:`2 + 0 \cdot 3 + 1 \cdot 9 + 1 \cdot 27 + 2 \cdot 81 = 200`::

        byte j of row r:  digit  k=4   k=3   k=2   k=1   k=0   (base 3)
                          weight 5j+4  5j+3  5j+2  5j+1  5j

    The input axis is padded to a multiple of 5 with zero weights (code 1).

    Args:
        q (array): int8 (any integer dtype) values in {-1, 0, 1}, shape ``(out, in)``.

    Returns:
        uint8 array of shape ``(out, ceil(in / 5))``.
    """
    q = _ternary_matrix("pack_base3", q)
    out, cols = q.shape
    groups = -(-cols // TRITS_PER_BYTE)
    codes = (q + 1).astype(mx.uint8)
    pad = TRITS_PER_BYTE * groups - cols
    if pad:
        codes = mx.concatenate([codes, mx.ones((out, pad), dtype=mx.uint8)], axis=1)
    digits = codes.reshape(out, groups, TRITS_PER_BYTE)
    return mx.sum(digits * mx.array(_POW3, dtype=mx.uint8), axis=-1).astype(mx.uint8)  # max 242 fits


def unpack_base3(packed: ArrayLike, in_features: Union[int, Sequence[int]]) -> mx.array:
    r"""Inverse of :func:`pack_base3`: uint8 ``(out, ceil(in / 5))`` -> int8 ``(out, in)``.

    ``in_features`` is the unpadded input size, or the full ``(out, in)`` shape.
    Raises ``ValueError`` on a byte above 242, which 5 trits cannot produce.
    """
    packed = _packed_matrix("unpack_base3", packed)
    out, groups = packed.shape
    if isinstance(in_features, (tuple, list)):
        if len(in_features) != 2 or in_features[0] != out:
            raise ValueError(f"[unpack_base3] shape {tuple(in_features)} does not match a packed array of "
                             f"shape {tuple(packed.shape)} (expected ({out}, in))")
        in_features = in_features[1]
    check_int("unpack_base3", "in_features", in_features, 1)
    if -(-in_features // TRITS_PER_BYTE) != groups:
        raise ValueError(f"[unpack_base3] in_features={in_features} packs into {-(-in_features // 5)} bytes per "
                         f"row, but the packed array has {groups} (shape {tuple(packed.shape)})")
    if mx.max(packed).item() > _MAX_BASE3_BYTE:
        raise ValueError(f"[unpack_base3] found a byte above {_MAX_BASE3_BYTE}, which 5 trits cannot encode")
    return base3_codes(packed, in_features).astype(mx.int8) - 1


def base3_codes(packed: mx.array, in_features: int) -> mx.array:
    """uint8 codes (w + 1) of shape (rows, in_features) from base-3 bytes (rows, ceil(in / 5))."""
    rows = packed.shape[0]
    digits = (packed[..., None] // mx.array(_POW3, dtype=mx.uint8)) % 3  # (rows, groups, 5)
    return digits.reshape(rows, -1)[:, :in_features]


def bytes_per_weight(packed: ArrayLike, shape: Tuple[int, int], scale_bytes: int = 0) -> float:
    """Storage cost of a packed ternary tensor: ``(packed.nbytes + scale_bytes) / (out * in)``.

    Pass ``scale_bytes=4`` to count one float32 scale per tensor. 2-bit gives 0.25
    (for ``out`` a multiple of 4), base-3 gives 0.2 (for ``in`` a multiple of 5).
    """
    nbytes = packed.nbytes if isinstance(packed, mx.array) else np.asarray(packed).nbytes
    out, cols = shape
    return (nbytes + scale_bytes) / (out * cols)
