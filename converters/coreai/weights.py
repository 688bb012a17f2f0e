r"""Compressed weights as Core AI ops: :class:`~mlx_zeta.converters.coreml.compress.Compressed` -> a
value decoding to the float32 weight when the bundle loads.

Which weights are compressed, and the numpy math of each form, are decided once for both backends
(:mod:`mlx_zeta.converters.coreml.weights` and :mod:`~mlx_zeta.converters.coreml.compress`); this module only
spells the two forms in Core AI:

* ``"shift_scale"`` -> ``coreai.blockwise_shift_scale(q, s, z, b)``, :math:`w = s\,(q - z) + b` per block:
  int8 per channel (:math:`z = b = 0`); MLX-affine 4/8-bit layers exactly as MLX stores them
  (:math:`z = 0`, :math:`b` = MLX's bias, no re-quantization); the ``int4`` policy's blocks in Core ML's
  form, uint4 zero points :math:`z = -b/s` (4.625 bits per weight with float16 scales, where a float
  bias would take 5), a float offset (not a whole number) folded into :math:`b = -s z`;
* ``"lut"`` -> ``coreai.lut_to_dense(indices, table)``: ternary (2-bit, ``{-s, 0, s}``), palettized
  weights and MLX's 2/3/5/6-bit weights. Index widths Core AI has no packing for (3, 5, 6 bits) are
  widened to 4 or 8 bits with the table padded by zeros (exact; 1 or 2 more bits per weight).

Codes narrower than a byte are packed by :func:`packed_codes` (low bits first, as the runtime reads
them). Tables and scales are stored in the context's ``weights`` dtype (float16 or float32).
"""

import numpy as np

__all__ = ["emit_compressed", "emit_float16", "packed_codes", "pack_bits", "index_width"]

_WIDTHS = (1, 2, 4, 8)  # code widths stored natively (sub-byte ones packed)


def index_width(bits: int) -> int:
    """The stored width of ``bits``-bit codes: the next of 1, 2, 4, 8."""
    return next(w for w in _WIDTHS if w >= bits)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (any shape, values < 2**bits) as bytes, ``8 // bits`` codes per byte, the first code
    in the lowest bits; the last byte is zero-padded."""
    per = 8 // bits
    flat = np.asarray(codes, np.uint8).reshape(-1)
    flat = np.pad(flat, (0, (-flat.size) % per)).reshape(-1, per)
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def packed_codes(codes: np.ndarray, dtype: str):
    """A constant of ``codes`` with element type ``dtype`` (``"uint1"``/``"uint2"``/``"uint4"``: packed,
    ``"uint8"``/``"int8"``: plain bytes)."""
    from coreai._compiler.dialects._coreai_ops_gen import ConstantOp
    from coreai._compiler.ir import DenseResourceElementsAttr, IntegerType, RankedTensorType
    from coreai.authoring import Value
    from coreai.authoring.constant import constant

    if dtype in ("uint8", "int8"):
        return constant(np.ascontiguousarray(np.asarray(codes).astype(np.uint8 if dtype == "uint8" else np.int8)))
    bits = int(dtype[len("uint"):])
    tensor = RankedTensorType.get(list(codes.shape), IntegerType.get_unsigned(bits))
    attr = DenseResourceElementsAttr.get_from_buffer(pack_bits(codes, bits), "codes", tensor)
    return Value._from_mlir(ConstantOp(value=attr).result)


def _table(values: np.ndarray, weights: str):
    """A float table (scales, biases, LUTs) in the ``weights`` dtype."""
    from coreai.authoring.constant import constant

    npd = np.float16 if weights == "float16" else np.float32
    return constant(np.ascontiguousarray(np.asarray(values, np.float32).astype(npd)))


def emit_compressed(ca, c, weights: str = "float32") -> object:
    """The Core AI value (``ca``: ``coreai.authoring``) decoding to ``c`` (a ``Compressed``) in float32,
    its tables stored in ``weights`` (``"float16"``/``"float32"``; module docstring)."""
    def to_float32(value):
        return value if weights == "float32" else ca.cast(value, ca.float32)
    if c.kind == "lut":
        bits = int(c.dtype[len("uint"):])
        width = index_width(bits)
        lut = c.lut
        if width != bits:  # pad each table with zeros up to 2**width entries
            pad = np.zeros(lut.shape[:2] + (2 ** width - lut.shape[2], lut.shape[3]), lut.dtype)
            lut = np.concatenate([lut, pad], axis=2)
        dense = ca.lut_to_dense(packed_codes(c.data, f"uint{width}"), _table(lut, weights), np.array(1, np.int16))
        return to_float32(dense)
    scale = np.asarray(c.scale, np.float32)
    bias = np.zeros_like(scale) if c.bias is None else np.asarray(c.bias, np.float32)
    zero = np.zeros(scale.shape, np.uint8)
    if c.offset is not None and c.offset.dtype.kind in "iu":
        zero = c.offset.astype(np.uint8)
    elif c.offset is not None:  # a float offset: s (q - z) = s q - s z
        bias = bias - scale * np.asarray(c.offset, np.float32)
    if c.dtype == "int8":
        zero = zero.astype(np.int8)
    dense = ca.blockwise_shift_scale(packed_codes(c.data, c.dtype), _table(scale, weights),
                                     packed_codes(zero, c.dtype), _table(bias, weights))
    return to_float32(dense)


def emit_float16(ca, value: np.ndarray) -> object:
    """A float matrix stored in float16 and read as float32: ``blockwise_shift_scale`` with one block,
    scale 1 and zero offsets (exact). A plain ``cast`` of a float16 constant would be folded by
    ``coreai.authoring`` into a float32 constant, storing the weight at twice the bytes."""
    from coreai.authoring.constant import constant

    one = (1,) * value.ndim
    return ca.blockwise_shift_scale(constant(np.ascontiguousarray(np.asarray(value).astype(np.float16))),
                                    constant(np.ones(one, np.float32)), constant(np.zeros(one, np.float16)),
                                    constant(np.zeros(one, np.float32)))
