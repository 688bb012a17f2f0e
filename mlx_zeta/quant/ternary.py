r"""Inference layer on packed ternary weights: BitNet b1.58 W1.58A8 (int8 activations)
and W1.58A16 (float activations), in Hugging Face's two scale conventions.

Compute paths (``kernel=``); whether a device kernel is live is asked of
:mod:`mlx_zeta.kernels.dispatch`, the one place that decides it:

* ``"unpack"``: decode the packed codes to float32 in slabs of ``SLAB_ELEMENTS``
  weights and multiply each slab with BLAS (``x @ slab.T``), each slab chained behind the
  previous product with ``mx.depends`` so only a slab or two is alive at once. Nothing is
  cached. Small slabs matter: float32 buffers of 32 MiB and more are not reused by the
  allocator and page-fault on every call (a 64 MiB add took 64 ms, a 16 MiB one 2 ms), and
  without the chain MLX decodes every slab before the first product (80 MiB transient at
  4096 x 4096). Measured at 4096 x 4096 on 2 cores: 19 ms for one row (float32 GEMV: 3.4 ms),
  85 ms for 256 rows (float32 GEMM: 79 ms), 19 MiB transient.
* ``"affine"``: MLX's 2-bit affine ``mx.quantized_matmul`` with code :math:`c = w + 1`,
  scale 1 and bias -1 per group, so the dequantized weight is exactly :math:`w`. The packed
  words are built once from the codes and cached (0.25 + 0.0625 bytes per weight beside
  ``packed``). Its time grows linearly with the rows of ``x``: it ties with ``"unpack"``
  for one row (18.6 vs 18.7 ms) and loses from two rows on (36 vs 24 ms; 50-100x at 256).
* ``"fused"``: :func:`mlx_zeta.kernels.ternary_matmul` on the 2-bit packed bytes as they are
  (no decoded copy), on the path the dispatcher resolves: the Metal/CUDA kernels where a GPU
  backend is present, the native CPU kernels (:mod:`mlx_zeta.kernels.cpu`) where they are built,
  the CPU emulation of the Metal text under ``use_kernels("emulate")`` /
  ``MLX_ZETA_KERNELS=emulate``, else its reference (unpack + matmul); exact int32
  accumulation for int8 activations. 2-bit only.
* ``"auto"`` (default): ``"fused"`` when the dispatcher has a kernel path live for
  ``ternary_matmul`` (:func:`~mlx_zeta.kernels.kernels_active`: the native CPU kernels where
  built, Metal, CUDA) and the packing is 2-bit; otherwise ``"unpack"`` (``"affine"`` only ties
  with it for one row, and caches a second copy of the weights).

See BENCHMARKS.md ("Packed ternary layers") for the measurements behind these choices.
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_zeta.common import check_choice, check_int, check_positive
from mlx_zeta.kernels.dispatch import kernels_active, with_reference_vjp
from mlx_zeta.kernels.packing import TRITS_PER_BYTE, base3_codes, pack_2bit, pack_base3
from mlx_zeta.kernels.ternary import ternary_matmul
from mlx_zeta.quant.quantizers import quantize_activations, ternarize

__all__ = ["TernaryLinear"]

SLAB_ELEMENTS = 1 << 19  # weights decoded at once by the "unpack" path (2 MiB of float32)
# float32 holds every integer up to 2^24, so a sum of int8 x ternary products is exact while
# 128 * in_features <= 2^24 (|q_x| <= 128, |w| <= 1); the affine path multiplies codes
# c = w + 1 <= 2 and subtracts sum(q_x), so it stays exact up to half of that.
EXACT_IN_FEATURES = (1 << 24) // 128  # 131072: "unpack" splits longer inputs into exact chunks
EXACT_IN_FEATURES_AFFINE = (1 << 24) // 256  # 65536: beyond it int8 mode uses "unpack"

_ACTIVATIONS = ("int8", "float")
_CONVENTIONS = ("divide", "multiply")
_PACKINGS = ("2bit", "base3")
_KERNELS = ("auto", "unpack", "affine", "fused")
_ZERO_BYTE = {"2bit": 0b01010101, "base3": 121}  # every code 1 (weight 0): 1+3+9+27+81 = 121


class TernaryLinear(nn.Module):
    r"""Linear layer on packed ternary weights :math:`T \in \{-1, 0, 1\}^{out \times in}` with one scale.

    With ``activation="int8"`` (W1.58A8, BitNet b1.58 inference) the input, after the
    optional RMSNorm, is quantized per token to :math:`Q_x = \operatorname{round}(x s_x)`,
    :math:`s_x = 127 / \max|x|`, and multiplied with :math:`T` as exact integers:

    .. math::

        A = Q_x T^{\top} \in \mathbb{Z}, \qquad
        y = \begin{cases} A / (s_x \, \sigma) + b & \text{scale\_convention="divide"} \\
                          (A / s_x + b)\, \sigma  & \text{scale\_convention="multiply"} \end{cases}

    where :math:`\sigma` is ``weight_scale``. "divide" is transformers' ``BitLinear``
    (``linear_class="bitlinear"``, :math:`\sigma = s_w = 1/\operatorname{mean}|W|`); "multiply" is
    its ``AutoBitLinear`` in offline mode (:math:`\sigma = \operatorname{mean}|W|`), which scales the
    bias too. With ``activation="float"`` (W1.58A16) :math:`A = x T^{\top}` and :math:`s_x = 1`.

    The integer products run as float32 matmuls, exact while :math:`128 \cdot in \le 2^{24}`
    (``in_features <= 131072``); longer inputs are split into exact chunks summed in int32.
    Computation is in float32; the output has the input's dtype.

    Parameters (all frozen): ``packed`` (uint8, :func:`~mlx_zeta.quant.pack_2bit` layout
    ``(ceil(out/4), in)`` or :func:`~mlx_zeta.quant.pack_base3` layout ``(out, ceil(in/5))``),
    ``weight_scale`` (float32 scalar), optional ``bias`` (out,), optional ``norm.weight``.
    A new layer holds zero weights; build one with :meth:`from_bitlinear` or :meth:`from_packed`.

    Args:
        in_features (int): input size.
        out_features (int): output size.
        bias (bool): add a float bias. Default: ``False``.
        norm (bool): RMSNorm (``mlx.nn.RMSNorm``) on the input first, as in BitLinear. Default: ``False``.
        norm_eps (float): RMSNorm epsilon. Default: ``1e-6``.
        activation (str): ``"int8"`` or ``"float"``. Default: ``"int8"``.
        scale_convention (str): ``"divide"`` or ``"multiply"`` (see above). Default: ``"divide"``.
        packing (str): ``"2bit"`` (0.25 bytes/weight, transformers' layout) or ``"base3"`` (0.2). Default: ``"2bit"``.
        kernel (str): ``"unpack"``, ``"affine"``, ``"fused"`` (2-bit only) or ``"auto"`` (module docstring).
            Default: ``"unpack"``.
        quant_eps (float): floor on :math:`\max|x|` of the activation quantizer. Default: ``1e-5``.

    Shape:
        - Input: :math:`(*, \text{in\_features})`. Output: :math:`(*, \text{out\_features})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.quant import BitLinear
        >>> layer = BitLinear(64, 32).to_ternary()
        >>> layer(mx.random.normal((2, 5, 64))).shape
        (2, 5, 32)

    Reference: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
    https://arxiv.org/abs/2402.17764; Wang et al., "BitNet a4.8", https://arxiv.org/abs/2411.04965.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: bool = False,
                 norm_eps: float = 1e-6, activation: str = "int8", scale_convention: str = "divide",
                 packing: str = "2bit", kernel: str = "auto", quant_eps: float = 1e-5):
        super().__init__()
        for what, value in (("in_features", in_features), ("out_features", out_features)):
            check_int("TernaryLinear", what, value, 1)
        check_positive("TernaryLinear", "quant_eps", quant_eps)
        self.in_features, self.out_features, self.quant_eps = in_features, out_features, quant_eps
        self.activation = check_choice("TernaryLinear", "activation", activation, _ACTIVATIONS)
        self.scale_convention = check_choice("TernaryLinear", "scale_convention", scale_convention, _CONVENTIONS)
        self.packing = check_choice("TernaryLinear", "packing", packing, _PACKINGS)
        self.kernel = check_choice("TernaryLinear", "kernel", kernel, _KERNELS)
        self.packed = mx.full(self.packed_shape(in_features, out_features, packing), _ZERO_BYTE[packing], mx.uint8)
        self.weight_scale = mx.array(1.0, dtype=mx.float32)
        if bias:
            self.bias = mx.zeros((out_features,))
        if norm:
            self.norm = nn.RMSNorm(in_features, eps=norm_eps)
        # not a parameter: (the packed array it was built from, words, scales, biases, group size)
        object.__setattr__(self, "_affine_cache", None)
        self.freeze()

    @staticmethod
    def packed_shape(in_features: int, out_features: int, packing: str = "2bit") -> Tuple[int, int]:
        """Shape of ``packed`` for a layer of this size."""
        if packing == "2bit":
            return (-(-out_features // 4), in_features)
        return (out_features, -(-in_features // TRITS_PER_BYTE))

    def _extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self}, "
                f"norm={'norm' in self}, activation={self.activation!r}, scale_convention={self.scale_convention!r}, "
                f"packing={self.packing!r}, kernel={self.kernel!r}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_bitlinear(cls, layer: nn.Module, activation: str = "int8", scale_convention: str = "divide",
                       **kwargs) -> "TernaryLinear":
        """Pack a trained :class:`~mlx_zeta.quant.BitLinear`; with ``activation="int8"`` the output
        equals BitLinear's training forward up to float32 rounding. ``kwargs``: ``packing``, ``kernel``."""
        out_features, in_features = layer.weight.shape
        norm = "norm" in layer
        new = cls(in_features, out_features, bias="bias" in layer, norm=norm,
                  norm_eps=layer.norm.eps if norm else 1e-6, activation=activation,
                  scale_convention=scale_convention, quant_eps=layer.quant_eps, **kwargs)
        q, s_w = ternarize(layer.weight, layer.quant_eps)
        new.packed = pack_2bit(q) if new.packing == "2bit" else pack_base3(q)
        # "multiply" keeps sigma = mean|W| and a bias pre-divided by it, as AutoBitLinear stores them
        new.weight_scale = s_w if scale_convention == "divide" else 1.0 / s_w
        if "bias" in layer:
            new.bias = layer.bias if scale_convention == "divide" else layer.bias * s_w
        if norm:
            new.norm.weight = layer.norm.weight
        return new

    @classmethod
    def from_packed(cls, packed, weight_scale, in_features: Optional[int] = None,
                    out_features: Optional[int] = None, bias=None, **kwargs) -> "TernaryLinear":
        """A layer from checkpoint tensors: ``packed`` uint8 codes, ``weight_scale`` (scalar or
        1-element array, e.g. transformers' ``weight_scale`` of shape (1,)), optional ``bias``.

        For ``packing="2bit"``, ``in_features`` is ``packed.shape[1]`` and ``out_features``
        defaults to ``4 * packed.shape[0]`` (what transformers' BitLinear assumes); for
        ``"base3"``, ``out_features`` is ``packed.shape[0]`` and ``in_features`` is required.
        ``kwargs`` go to the constructor (``scale_convention``, ``activation``, ``norm``, ...).
        The codes are checked but not unpacked.
        """
        packed = packed if isinstance(packed, mx.array) else mx.array(np.asarray(packed))
        if packed.dtype != mx.uint8 or packed.ndim != 2:
            raise ValueError(f"[TernaryLinear] expected packed to be a 2-D uint8 array, "
                             f"got {packed.dtype} of shape {tuple(packed.shape)}")
        packing = kwargs.get("packing", "2bit")
        if packing == "2bit":
            in_features = packed.shape[1] if in_features is None else in_features
            out_features = 4 * packed.shape[0] if out_features is None else out_features
        else:
            out_features = packed.shape[0] if out_features is None else out_features
            if in_features is None:
                raise ValueError("[TernaryLinear] from_packed with packing='base3' needs in_features")
        layer = cls(in_features, out_features, bias=bias is not None, **kwargs)
        if tuple(packed.shape) != tuple(layer.packed.shape):
            raise ValueError(f"[TernaryLinear] packed has shape {tuple(packed.shape)}, expected "
                             f"{tuple(layer.packed.shape)} for in_features={in_features}, out_features={out_features}")
        bad = (mx.any((packed >> 1) & packed & 0b01010101) if packing == "2bit" else mx.max(packed) > 242).item()
        if bad:
            raise ValueError(f"[TernaryLinear] packed holds codes that are not ternary ({packing} layout)")
        scale = mx.array(np.asarray(weight_scale, dtype=np.float32)) if not isinstance(weight_scale, mx.array) \
            else weight_scale.astype(mx.float32)
        if scale.size != 1 or not (np.isfinite(scale.item()) and scale.item() > 0):
            raise ValueError(f"[TernaryLinear] expected weight_scale to be one positive finite number, "
                             f"got shape {tuple(scale.shape)}" + (f" value {scale.item()}" if scale.size == 1 else ""))
        layer.packed, layer.weight_scale = packed, scale.reshape(())
        if bias is not None:
            bias = bias if isinstance(bias, mx.array) else mx.array(np.asarray(bias, dtype=np.float32))
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"[TernaryLinear] expected bias of shape ({out_features},), got {tuple(bias.shape)}")
            layer.bias = bias
        return layer

    # ---------------------------------------------------------------- compute paths
    def _codes(self, previous: Optional[list] = None):
        """Yield uint8 codes (w + 1) in slabs of rows, in output order (4-row padding of 2-bit included).

        With ``previous`` (the list of slab results the caller appends to), each slab's packed
        bytes are made to depend on the last result (``mx.depends``), so MLX decodes a slab only
        after the previous one is consumed and at most a slab or two is alive at a time.
        """
        packed = self._checked_packed()

        def chained(part: mx.array) -> mx.array:
            return mx.depends(part, previous[-1]) if previous else part

        step = max(1, SLAB_ELEMENTS // self.in_features)
        if self.packing == "2bit":
            rows = packed.shape[0]
            for slot in range(-(-self.out_features // rows)):  # slots holding at least one row
                for r in range(0, rows, step):
                    yield (chained(packed[r:r + step]) >> (2 * slot)) & 3
        else:
            for r in range(0, self.out_features, step):
                yield base3_codes(chained(packed[r:r + step]), self.in_features)

    def _unpack_matmul(self, x: mx.array, exact: bool) -> mx.array:
        """x (M, in) float32 -> x @ T^T (M, out) float32, slab by slab; ``exact`` chunks long inputs."""
        chunk = EXACT_IN_FEATURES if exact else self.in_features
        ys = []
        for codes in self._codes(previous=ys):
            w = codes.astype(mx.float32) - 1  # (rows, in) in {-1, 0, 1}
            if chunk >= self.in_features:
                ys.append(x @ w.T)
            else:  # each chunk is exact in float32; sum the chunks as int32
                acc = sum((x[:, k:k + chunk] @ w[:, k:k + chunk].T).astype(mx.int32)
                          for k in range(0, self.in_features, chunk))
                ys.append(acc.astype(mx.float32))
        return mx.concatenate(ys, axis=-1)[:, :self.out_features]

    def _affine_weights(self) -> Tuple[mx.array, mx.array, mx.array, int]:
        """MLX 2-bit affine words for the codes (built once per ``packed`` array, then cached).

        ``mx.quantize``'s layout: 16 codes per uint32, element j in bits [2j, 2j+1]; group g of
        ``group_size`` inputs dequantizes as ``scales[:, g] * code + biases[:, g]`` = code - 1.
        The input axis is padded to a multiple of 32 with code 1 (weight 0).
        """
        cache = self._affine_cache
        if cache is not None and cache[0] is self.packed:
            return cache[1:]
        padded = -(-self.in_features // 32) * 32
        group = next(g for g in (128, 64, 32) if padded % g == 0)
        shifts = (2 * mx.arange(16, dtype=mx.uint32)).reshape(1, 1, 16)
        words = []
        for codes in self._codes():
            codes = codes.astype(mx.uint32)
            if padded > self.in_features:
                codes = mx.pad(codes, [(0, 0), (0, padded - self.in_features)], constant_values=1)
            words.append(mx.sum(codes.reshape(codes.shape[0], padded // 16, 16) << shifts, axis=-1))  # disjoint bits
        w = mx.concatenate(words, axis=0)[:self.out_features].astype(mx.uint32)
        scales = mx.ones((self.out_features, padded // group), dtype=mx.float32)
        biases = -scales
        mx.eval(w, scales, biases)
        object.__setattr__(self, "_affine_cache", (self.packed, w, scales, biases, group))
        return w, scales, biases, group

    def _affine_matmul(self, x: mx.array) -> mx.array:
        w, scales, biases, group = self._affine_weights()
        padded = scales.shape[1] * group
        if padded > self.in_features:
            x = mx.pad(x, [(0, 0), (0, padded - self.in_features)])
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group, bits=2)

    def _fused_matmul(self, x: mx.array, exact: bool) -> mx.array:
        """The packed-byte kernels: int8 codes (``exact``: x holds the int8 values) or float32 x."""
        if self.packing != "2bit":
            raise ValueError("[TernaryLinear] kernel='fused' reads the 2-bit layout; this layer packs 'base3'")
        x = x.astype(mx.int8) if exact else x
        return ternary_matmul(x, self.packed, self.out_features).astype(mx.float32)

    def _checked_packed(self) -> mx.array:
        """``packed``, after checking it still has the dtype and shape this layer reads (every path)."""
        packed = self.packed
        expected = self.packed_shape(self.in_features, self.out_features, self.packing)
        if packed.dtype != mx.uint8 or tuple(packed.shape) != expected:
            raise ValueError(f"[TernaryLinear] packed must be uint8 of shape {expected}, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        return packed

    def _matmul(self, x: mx.array, exact: bool) -> mx.array:
        """x (M, in) float32 -> x @ T^T (M, out) float32 on the chosen path."""
        self._checked_packed()
        kernel = check_choice("TernaryLinear", "kernel", self.kernel, _KERNELS)
        if kernel == "auto" and self.packing == "2bit" and kernels_active(kernel="ternary_matmul"):
            kernel = "fused"
        elif kernel == "auto":
            kernel = "unpack"
        if kernel == "fused":
            return self._fused_matmul(x, exact)
        if kernel == "affine" and not (exact and self.in_features > EXACT_IN_FEATURES_AFFINE):
            return self._affine_matmul(x)
        return self._unpack_matmul(x, exact)

    def prepare_input(self, x: mx.array) -> mx.array:
        """The input every path multiplies: shape-checked ``(*, in_features)``, after the layer's
        norm (if any). Subclasses that put more in front (BitNet's sub-norm) override this."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"[TernaryLinear] expected input of shape (..., {self.in_features}), got {tuple(x.shape)}")
        return self.norm(x) if "norm" in self else x

    def integer_matmul(self, x: mx.array) -> Tuple[mx.array, mx.array]:
        """The integer core of the int8 forward: returns ``(A int32 (*, out), s_x float32 (*, 1))``
        with :math:`A = Q_x T^\\top`, after the norm (if any) and per-token int8 quantization."""
        x = self.prepare_input(x)
        lead = x.shape[:-1]
        q_x, s_x = quantize_activations(x, self.quant_eps)
        acc = self._matmul(q_x.reshape(-1, self.in_features).astype(mx.float32), exact=True)
        return acc.astype(mx.int32).reshape(*lead, self.out_features), s_x

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype  # before the norm, whose float32 gain would promote float16 inputs
        x = self.prepare_input(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        bias = (self.bias,) if "bias" in self else ()
        if self.activation == "int8":  # exact integers forward, straight-through gradient (that of x W^T + b)
            y = with_reference_vjp(self._int8_forward, self._straight_through)(x, *bias)
        else:
            y = self._output(self._matmul(x.astype(mx.float32), exact=False), None, *bias)
        return y.astype(dtype).reshape(*lead, self.out_features)

    def _output(self, acc: mx.array, s_x: Optional[mx.array], *bias: mx.array) -> mx.array:
        """The layer's output from the product ``acc`` (M, out) and the activation scales (M, 1) or None."""
        if self.scale_convention == "divide":  # transformers BitLinear: y / (s_w * s_x), then + b
            y = acc / (s_x * self.weight_scale if s_x is not None else self.weight_scale)
            return y + bias[0] if bias else y
        y = acc / s_x if s_x is not None else acc  # transformers AutoBitLinear: (x_q @ T^T + b) * weight_scale
        return (y + bias[0] if bias else y) * self.weight_scale

    def _int8_forward(self, x: mx.array, *bias: mx.array) -> mx.array:
        """x (M, in) -> y (M, out) float32 through per-token int8 activations and exact integer products."""
        q_x, s_x = quantize_activations(x, self.quant_eps)
        return self._output(self._matmul(q_x.astype(mx.float32), exact=True), s_x, *bias)

    def _straight_through(self, x: mx.array, *bias: mx.array) -> mx.array:
        r"""The int8 forward's gradient reference: :math:`x W^T + b` (:meth:`weight_matrix`), i.e.
        :math:`Q_x / s_x \approx x` passed straight through, as :class:`~mlx_zeta.quant.BitLinear` trains.
        Without it the rounding would leave ``x`` only the gradient through :math:`s_x`."""
        y = x.astype(mx.float32) @ self.weight_matrix().T
        if not bias:
            return y
        return y + (bias[0] if self.scale_convention == "divide" else bias[0] * self.weight_scale)

    def nbytes(self, cache: bool = True) -> int:
        """Resident bytes of the parameters, plus the affine path's cached words when ``cache``."""
        total = sum(v.nbytes for _, v in tree_flatten(self.parameters()))
        if cache and self._affine_cache is not None:
            total += sum(a.nbytes for a in self._affine_cache[1:4])
        return total


    # ---------------------------------------------------------------- dense form (Core ML export)
    def dense_weight(self) -> Tuple[mx.array, float, Optional[mx.array]]:
        r"""The layer as a dense ternary matrix: ``(T, s, b)`` such that :math:`W = s\,T` and
        :math:`y = Q_x W^{\top} / s_x + b` (int8) or :math:`x W^{\top} + b` (float) is the forward.

        ``T``: float32 (out, in) in {-1, 0, 1}, decoded from ``packed``. ``s`` (Python float):
        :math:`1/\sigma` for "divide", :math:`\sigma` for "multiply". ``b``: ``bias`` ("divide"),
        :math:`\sigma \cdot` ``bias`` ("multiply"), or None without a bias.
        """
        codes = self._dense_codes()
        sigma = float(self.weight_scale.item())
        divide = self.scale_convention == "divide"
        bias = None
        if "bias" in self:
            bias = self.bias if divide else self.bias * self.weight_scale
        return codes.astype(mx.float32) - 1, (1.0 / sigma if divide else sigma), bias

    def _dense_codes(self) -> mx.array:
        """The codes :math:`T + 1` (out, in) uint8, decoded from ``packed``."""
        return mx.concatenate(list(self._codes()), axis=0)[:self.out_features]

    def weight_matrix(self) -> mx.array:
        r"""The effective float32 weight :math:`W` (out, in) of :math:`y \approx x W^{\top} + b`:
        :math:`T/\sigma` ("divide") or :math:`T\sigma` ("multiply"), :math:`s\,T` of :meth:`dense_weight`
        as one array, with no host synchronisation (usable inside ``mx.compile``)."""
        codes = self._dense_codes().astype(mx.float32) - 1
        sigma = self.weight_scale.astype(mx.float32)
        return codes / sigma if self.scale_convention == "divide" else codes * sigma

    def dense_forward(self, x: mx.array, weight: mx.array, bias: Optional[mx.array] = None) -> mx.array:
        r"""The forward in plain MLX ops on a dense ``weight`` :math:`W = s\,T` (out, in) and the
        effective ``bias`` of :meth:`dense_weight`: :math:`Q_x W^{\top} / s_x + b` (int8) or
        :math:`x W^{\top} + b` (float), after the input norm(s). Equals ``self(x)`` up to float32
        rounding. Core ML export traces it with ``W`` computed once, so the traced graph holds
        ``W`` as one constant (stored as a 2-bit LUT) instead of the unpacking ops.

        Shape: ``x`` :math:`(*, in)` -> :math:`(*, out)`, in ``x``'s dtype.
        """
        dtype = x.dtype
        x = self.prepare_input(x)
        if self.activation == "int8":
            q_x, s_x = quantize_activations(x, self.quant_eps)
            y = (q_x.astype(mx.float32) @ weight.T) / s_x
        else:
            y = x.astype(mx.float32) @ weight.T
        return (y + bias if bias is not None else y).astype(dtype)
