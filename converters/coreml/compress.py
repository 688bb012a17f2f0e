r"""Compressed weights for Core ML export: what each weight matrix becomes, and the numpy math of it.

A :class:`Compressed` weight is one of the two iOS 18 ``constexpr_`` forms a package stores and the
runtime decodes at load time:

* ``"shift_scale"`` (``constexpr_blockwise_shift_scale``): integer codes :math:`q` (int8, uint8 or
  uint4), a scale :math:`s` and an optional offset :math:`z` per block of ``block`` consecutive
  input weights of a row, :math:`w = s\,(q - z)`;
* ``"lut"`` (``constexpr_lut_to_dense``): :math:`n`-bit indices into a table of :math:`2^n` values
  shared by a group of rows (palettization) or by one block of a row (MLX affine 2/3/6-bit).

Where they come from:

* float weights, by the export's ``compress`` policy (:func:`policy`, :data:`MODES`):
  ``int8`` per output channel (symmetric, :math:`z = 0`, :math:`s = \max_j |w_{ij}| / 127`),
  ``int4-block32``/``int4-block64`` (MLX's own affine quantizer, ``mx.quantize``, exported as below),
  ``palettize{2,3,4,6,8}`` (1-D k-means over each group of :data:`PALETTE_ROWS` rows);
* MLX-affine layers (``QuantizedLinear``/``QuantizedEmbedding`` of ``convert --quantize``), always,
  by :func:`from_mlx_affine`: MLX stores :math:`w = s\,q + b` per group, which is :math:`s\,(q - z)` with
  the offset :math:`z = -b / s` (whole numbers for MLX's own quantizer on float32 weights, stored as
  codes; else floats). Decoded in float32 this equals MLX's dequantized weight to
  float32 rounding, and in float16 (scales stored as float16) to float16 rounding
  (:func:`affine_error` measures it; ``export`` warns when it is larger). 2/3/5/6-bit MLX weights,
  which Core ML has no integer type for, become one exact table per block, :math:`\{s j + b\}_j`.

:meth:`Compressed.decode` is the numpy decode the tests hold Core ML's ops to (the evaluator runs
coremltools' own op definitions); :meth:`Compressed.emit` builds the MIL op.
"""

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Dict, Optional

import numpy as np

__all__ = ["Compressed", "MODES", "ROLE_KEYS", "PALETTE_ROWS", "policy", "describe", "compress_weight",
           "from_mlx_affine", "from_ternary", "unpack_mlx", "affine_error"]

MODES = ("none", "int8", "int4", "int4-block32", "int4-block64", "palettize2", "palettize3", "palettize4",
         "palettize6", "palettize8")
ROLE_KEYS = ("@embedding", "@head")  # policy keys for the input embeddings and the output head
PALETTE_ROWS = 16  # rows sharing one palette (Core ML's per-grouped-channel palettization)
SKETCH = 2048  # k-means fits each palette on this many evenly spaced order statistics of its values
_ALIASES = {"int4": "int4-block32"}
_LUT_BITS = (1, 2, 3, 4, 6, 8)  # index widths constexpr_lut_to_dense takes
INTEGER_OFFSET = 1e-4  # -bias/scale this close to whole numbers in every block: integer offsets (MLX's own
#                        quantizer makes zero a code, so float32 sources are within ~1e-5)


@dataclass
class Compressed:
    """A weight ``(rows, cols)`` as a Core ML ``constexpr_`` op (module docstring).

    ``kind="shift_scale"``: ``data`` integer codes (rows, cols) of ``dtype`` ("int8", "uint8", "uint4"),
    ``scale`` float32 (rows, cols // block) and ``offset`` (or None) of the same shape, float32 or, when
    whole numbers, uint8 codes stored in ``dtype``; ``bias`` (or None), float32 of the same shape, is added
    after scaling, ``w = s (q - z) + bias`` (Core AI's two-offset form; Core ML's op has no bias, so
    only :func:`from_mlx_affine` with ``with_bias`` makes one). ``kind="lut"``: ``data`` indices
    (rows, cols) of ``dtype`` ("uint1".."uint8"), ``lut`` float32 (P0, P1, 2**bits, 1) (one table per
    ``rows // P0`` rows and ``cols // P1`` columns).
    """
    kind: str
    data: np.ndarray
    dtype: str
    scale: Optional[np.ndarray] = None
    offset: Optional[np.ndarray] = None
    lut: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    def decode(self, dtype=np.float32) -> np.ndarray:
        """The dense weight, computed in float32 from the tables as stored in ``dtype``
        (float16 packages keep scales, offsets and tables in float16) and rounded once to ``dtype``."""
        if self.kind == "lut":
            lut = self.lut.astype(dtype).astype(np.float32)[..., 0]
            rows, cols = self.data.shape
            r = np.arange(rows)[:, None] // (rows // lut.shape[0])
            c = np.arange(cols)[None, :] // (cols // lut.shape[1])
            return lut[r, c, self.data.astype(np.int64)].astype(dtype)
        block = self.data.shape[1] // self.scale.shape[1]
        q = self.data.astype(np.float32)
        if self.offset is not None:
            offset = self.offset if self.offset.dtype.kind in "iu" else self.offset.astype(dtype)
            q = q - np.repeat(offset.astype(np.float32), block, axis=1)
        w = np.repeat(self.scale.astype(dtype).astype(np.float32), block, axis=1) * q
        if self.bias is not None:
            w = w + np.repeat(self.bias.astype(dtype).astype(np.float32), block, axis=1)
        return w.astype(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the package stores for this weight (codes packed, tables in float16)."""
        bits = int(self.dtype.lstrip("uint"))
        codes = self.data.size + (self.offset.size if self.offset is not None and self.offset.dtype.kind in "iu" else 0)
        tables = sum(a.size for a in (self.scale, self.offset, self.lut) if a is not None and a.dtype.kind == "f")
        return (codes * bits + 7) // 8 + 2 * tables

    def emit(self, mb, dtype: str, name: str):
        """The MIL ``constexpr_`` op decoding to this weight in ``dtype`` ("fp16" or "fp32")."""
        from coremltools.converters.mil.mil import types

        if self.bias is not None:
            raise ValueError("[export_coreml] a shift-scale weight with a bias has no Core ML op (iOS 18 has one offset)")
        npd = {"fp16": np.float16, "fp32": np.float32}[dtype]
        codes = self.data.astype(_np_code_dtype(self.dtype, types))
        if self.kind == "lut":
            return mb.constexpr_lut_to_dense(indices=codes, lut=self.lut.astype(npd), name=name)
        offset = self.offset
        if offset is not None:
            offset = offset.astype(codes.dtype if offset.dtype.kind in "iu" else npd)
        return mb.constexpr_blockwise_shift_scale(data=codes, scale=self.scale.astype(npd), offset=offset, name=name)


def _np_code_dtype(dtype: str, types):
    if dtype == "int8":
        return np.int8
    if dtype == "uint8":
        return np.uint8
    return getattr(types, f"np_{dtype}_dtype")


# ----------------------------------------------------------------------------- the policy
def _check_mode(mode, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"[export_coreml] expected compress{where} to be one of {', '.join(MODES)}, got {mode!r}")
    return _ALIASES.get(mode, mode)


def _expand(compress) -> Dict[str, str]:
    """``compress`` as ``{pattern or role key: mode}`` (a plain mode: ``{"*": mode}``)."""
    if compress is None:
        return {}
    if isinstance(compress, str):
        return {"*": _check_mode(compress, "")}
    if not isinstance(compress, dict):
        raise ValueError(f"[export_coreml] expected compress to be None, a mode or a {{pattern: mode}} dict, "
                         f"got {type(compress).__name__}")
    out = {}
    for key, mode in compress.items():
        if not isinstance(key, str) or not key or (key.startswith("@") and key not in ROLE_KEYS):
            raise ValueError(f"[export_coreml] expected compress keys to be module-path patterns or "
                             f"{' / '.join(ROLE_KEYS)}, got {key!r}")
        out[key] = _check_mode(mode, f"[{key!r}]")
    return out


def policy(compress) -> Callable[[str, Optional[str]], str]:
    """``mode_of(module_path, role)`` for a ``compress`` option: ``None`` (nothing compressed), a mode of
    :data:`MODES` (that mode for every float weight matrix), or ``{pattern: mode}``: fnmatch patterns
    over module paths (e.g. ``"layers.*.ff.*"``) and the role keys ``"@embedding"``/``"@head"``, e.g.
    ``{"*": "int4", "@embedding": "int8", "@head": "int8"}``. A path takes the mode of its longest
    matching pattern other than ``"*"``, else of its role key, else of ``"*"``, else ``"none"``."""
    table = _expand(compress)
    patterns = sorted((k for k in table if k != "*" and k not in ROLE_KEYS), key=len, reverse=True)

    def mode_of(path: str, role: Optional[str] = None) -> str:
        for p in patterns:
            if fnmatchcase(path, p):
                return table[p]
        if role is not None and f"@{role}" in table:
            return table[f"@{role}"]
        return table.get("*", "none")

    return mode_of


def describe(compress) -> str:
    """One line naming the policy, for package metadata: ``"int4-block32; @embedding int8; @head int8"``."""
    if compress == "ternary-dense":
        return compress
    table = _expand(compress)
    if not table:
        return "none"
    first = table.pop("*", "none")
    return "; ".join([first] + [f"{k} {v}" for k, v in table.items()])


# ----------------------------------------------------------------------------- float weights
def compress_weight(w: np.ndarray, mode: str) -> Optional[Compressed]:
    """``w`` (rows, cols) float as ``mode`` (:data:`MODES`, aliases resolved), or None when the mode is
    ``"none"`` or the shape does not fit it (a row not a whole number of blocks, fewer rows than a palette
    group): that weight stays float."""
    mode = _ALIASES.get(mode, mode)
    w = np.asarray(w, np.float32)
    if mode == "none" or w.ndim != 2:
        return None
    if mode == "int8":
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return Compressed("shift_scale", q, "int8", scale=scale)
    if mode.startswith("int4-block"):
        block = int(mode[len("int4-block"):])
        if w.shape[1] % block:
            return None
        import mlx.core as mx

        wq, scales, biases = mx.quantize(mx.array(w), group_size=block, bits=4)
        return from_mlx_affine(np.array(wq), np.array(scales), np.array(biases), block, 4)
    bits = int(mode[len("palettize"):])
    rows = PALETTE_ROWS if w.shape[0] % PALETTE_ROWS == 0 else 1
    groups = w.reshape(w.shape[0] // rows, -1)  # each palette's values (rows x cols)
    lut, idx = _kmeans_1d(groups, 2 ** bits)
    return Compressed("lut", idx.reshape(w.shape), f"uint{bits}", lut=lut[:, None, :, None])


def _kmeans_1d(values: np.ndarray, k: int, iterations: int = 16):
    """Lloyd's k-means of each row of ``values`` (G, n) in one dimension: centroids (G, k) sorted, started
    halfway between the row's quantiles and an even grid over its range (lower error than either start:
    quantiles leave the tails to far centroids), and each value's index (G, n) uint8. Rows of more than
    :data:`SKETCH` values are fitted on that many of their order statistics. All rows at once: row g is
    shifted by ``g * span`` so one ``searchsorted`` over the concatenated midpoints assigns every value."""
    g, n = values.shape
    v = np.sort(values, axis=1).astype(np.float64)
    if n > SKETCH:  # fit on evenly spaced order statistics (a quantile sketch); assign every value at the end
        v = v[:, np.linspace(0, n - 1, SKETCH).round().astype(np.int64)]
    full, n = values.astype(np.float64), v.shape[1]
    ranks = (np.arange(k) + 0.5) / k
    lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
    c = (np.quantile(v, ranks, axis=1).T + lo + (hi - lo) * ranks) / 2  # (G, k): quantiles pulled to the tails
    span = 2.0 * (np.abs(full).max() + 1.0)
    shift = (np.arange(g) * span)[:, None]
    flat = (v + shift).ravel()
    rows = np.repeat(np.arange(g), n)
    idx = None
    for _ in range(iterations):
        mids = ((c[:, 1:] + c[:, :-1]) / 2 + shift).ravel()
        new = np.searchsorted(mids, flat) - rows * (k - 1)
        if idx is not None and np.array_equal(new, idx):
            break
        idx = new
        cell = rows * k + idx
        sums = np.bincount(cell, weights=v.ravel(), minlength=g * k).reshape(g, k)
        counts = np.bincount(cell, minlength=g * k).reshape(g, k)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        c = np.sort(c, axis=1)
    mids = ((c[:, 1:] + c[:, :-1]) / 2 + shift).ravel()
    idx = np.searchsorted(mids, (full + shift).ravel()) - np.repeat(np.arange(g), full.shape[1]) * (k - 1)
    return c.astype(np.float32), idx.reshape(full.shape).astype(np.uint8)


# ----------------------------------------------------------------------------- MLX-quantized and ternary
def unpack_mlx(words: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packed codes (rows, cols * bits / 32) uint32 -> (rows, cols) uint8: each 32-bit word holds
    ``32 / bits`` codes, lowest bits first (3-, 5- and 6-bit codes run across words, little-endian)."""
    words = np.ascontiguousarray(words, dtype="<u4")
    if 32 % bits == 0:  # whole codes per word: shift them out
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        return ((words[..., None] >> shifts) & np.uint32(2 ** bits - 1)).reshape(words.shape[0], -1).astype(np.uint8)
    bitstream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    codes = bitstream.reshape(words.shape[0], -1, bits)
    return (codes.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=-1).astype(np.uint8)


def from_mlx_affine(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                    bits: int, with_bias: bool = False) -> Compressed:
    """MLX's affine quantization (``mx.quantize``: ``w = scales * q + biases`` per ``group_size`` inputs)
    as Core ML weights: 4/8 bits as shift-scale with ``offset = -biases / scales`` (module docstring),
    or, ``with_bias`` (Core AI), MLX's own ``scales * q + biases`` exactly; other widths as one exact
    table per block."""
    q = unpack_mlx(words, bits)
    s, b = np.asarray(scales, np.float32), np.asarray(biases, np.float32)
    if bits in (4, 8) and with_bias:
        return Compressed("shift_scale", q, f"uint{bits}", scale=s, bias=b)
    if bits in (4, 8):
        zero = s == 0  # a group of equal weights b: codes 0, scale 1, offset -b
        q = np.where(np.repeat(zero, group_size, axis=1), 0, q).astype(np.uint8)
        scale = np.where(zero, 1.0, s).astype(np.float32)
        offset = np.where(zero, -b, -b.astype(np.float64) / scale)
        whole = np.round(offset)
        if np.all(np.abs(offset - whole) <= INTEGER_OFFSET) and whole.min() >= 0 and whole.max() < 2 ** bits:
            offset = whole.astype(np.uint8)  # stored as codes: 4 bits, not 16, per block
        return Compressed("shift_scale", q, f"uint{bits}", scale=scale, offset=offset.astype(offset.dtype))
    lut = s[..., None] * np.arange(2 ** bits, dtype=np.float32) + b[..., None]  # (rows, groups, 2**bits)
    width = next(n for n in _LUT_BITS if n >= bits)
    lut = np.concatenate([lut, np.zeros(lut.shape[:2] + (2 ** width - 2 ** bits,), np.float32)], axis=-1)
    return Compressed("lut", q, f"uint{width}", lut=lut[..., None])


def from_ternary(codes: np.ndarray, scale: float) -> Compressed:
    """A ternary weight ``s T`` (``codes = T + 1`` in {0, 1, 2}) as a 2-bit table ``{-s, 0, s, 0}``."""
    lut = np.array([-scale, 0.0, scale, 0.0], np.float32).reshape(1, 1, 4, 1)
    return Compressed("lut", np.asarray(codes, np.uint8), "uint2", lut=lut)


def affine_error(c: Compressed, reference: np.ndarray, dtype=np.float16) -> Dict[str, float]:
    """How far ``c`` decoded in ``dtype`` is from ``reference`` (MLX's dequantized weight) rounded to
    ``dtype``: ``{"max_abs": ..., "max_ulps": ..., "exact": fraction of equal weights}``, ulps of ``dtype``
    at the largest weight of each row (so a weight that is 0 in MLX and 1e-9 here is not a huge relative error)."""
    ref = np.asarray(reference, np.float32).astype(dtype)
    got = c.decode(dtype)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    ulp = np.spacing(np.abs(ref).max(axis=-1, keepdims=True)).astype(np.float64)
    return {"max_abs": float(diff.max()), "max_ulps": float((diff / ulp).max()), "exact": float(np.mean(got == ref))}

