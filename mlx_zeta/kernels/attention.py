r"""Fused scaled-dot-product attention with causal / sliding-window masking, logit soft-capping
and position biases computed inside the kernel from :math:`O(L)` data (ALiBi slopes, a T5
bucket table), so no :math:`(L_q, L_k)` bias is ever built on the kernel path.

For query :math:`i`, key :math:`j`, head :math:`h` and :math:`i' = i + L_k - L_q` (bottom-right
alignment, as after a KV-cache prefill):

.. math::

    s_{ij} = c \tanh\!\big(\tfrac{\sigma\, q_i \cdot k_j}{c}\big) - m_h\,|j - i'|
             + T_{\beta(j - i),\,h} + M_{bhij}, \qquad
    o_i = \frac{\sum_{j \in V_i} e^{s_{ij}} v_j}{\sum_{j \in V_i} e^{s_{ij}}}

with scale :math:`\sigma`, soft-cap :math:`c` (the tanh is skipped without ``softcap``), ALiBi
slopes :math:`m_h`, T5 table :math:`T` and buckets :math:`\beta`, an additive mask :math:`M`,
and visible keys :math:`V_i = \{j : j \le i' \text{ (causal)},\ |i' - j| < w \text{ (window)},
\text{keep-mask}_{bhij}\}`. A row with no visible key (:math:`V_i` empty, or every logit
:math:`-\infty`) outputs **0**, not NaN, with zero gradient.

:func:`_reference` is the definition of correctness (pure MLX, float32, materialises the bias).
The kernels (``metal/attention.metal``, CUDA twins in ``metal/attention.cu``) run for
:math:`L_q \le 8` as a split-K decode kernel (per-chunk max / sum / partial output, then a
combine pass) and otherwise as a tiled prefill kernel; gradients on every path come from the
reference through :func:`mlx.core.custom_function`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from mlx_zeta.common import check_int, check_positive
from mlx_zeta.kernels.dispatch import resolve, with_reference_vjp
from mlx_zeta.kernels.positions import PositionBias
from mlx_zeta.kernels.launch import Kernel

__all__ = ["fused_attention", "kernel_supports", "HEAD_DIMS", "DTYPES", "DECODE_MAX_QUERIES"]

HEAD_DIMS = (64, 80, 96, 128, 192, 256)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
DECODE_MAX_QUERIES = 8
_THREADS = 128  # per threadgroup, as the kernels assume
_INPUTS = ("q", "k", "v", "params", "fparams", "slopes", "t5_table", "t5_buckets", "mask")
_PREFILL = Kernel("attention", "attention_prefill", _INPUTS, ("out",))
_DECODE = Kernel("attention", "attention_decode", _INPUTS, ("part_m", "part_l", "part_o"))
_COMBINE = Kernel("attention", "attention_decode_combine", ("part_m", "part_l", "part_o", "params", "fparams"), ("out",))
_EXTRAS = ("alibi_slopes", "t5_table", "t5_buckets", "mask")


class _Config(NamedTuple):
    scale: float
    causal: bool
    window: int  # 0: none
    softcap: float  # 0: none
    extras: Tuple[str, ...]  # which of _EXTRAS are passed, in that order
    mode: str
    num_splits: Optional[int]


def kernel_supports(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """True when the kernels take these shapes and dtypes (head dim in :data:`HEAD_DIMS`, one dtype
    of :data:`DTYPES`, value dim equal to the key dim)."""
    return q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES and k.dtype == v.dtype == q.dtype and v.shape == k.shape


def _mask_layout(mask: mx.array) -> Tuple[mx.array, int, Tuple[int, int, int, int]]:
    """(data, mode 1 keep / 2 additive, element strides with 0 on broadcast axes) for the kernels."""
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    strides, step = [], 1
    for size in reversed(m.shape):
        strides.append(0 if size == 1 else step)
        step *= size
    data = m if m.dtype == mx.bool_ else m.astype(mx.float32)
    return data, 1 if m.dtype == mx.bool_ else 2, tuple(reversed(strides))


def _reference(q, k, v, alibi_slopes=None, t5_table=None, t5_buckets=None, mask=None, *, scale: float,
               causal: bool = False, window: int = 0, softcap: float = 0.0) -> mx.array:
    """Pure-MLX attention in float32 (the definition of correctness); output in q's dtype."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    qf = q.astype(mx.float32).reshape(b, hkv, hq // hkv, lq, d)
    s = (qf @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)) * scale  # (b, hkv, g, lq, lk)
    if softcap:
        s = softcap * mx.tanh(s / softcap)
    s = s.reshape(b, hq, lq, lk)
    qpos = mx.arange(lq)[:, None] + (lk - lq)
    kpos = mx.arange(lk)[None, :]
    visible = mx.ones((lq, lk), dtype=mx.bool_)
    if causal:
        visible = visible & (kpos <= qpos)
    if window:
        visible = visible & (mx.abs(qpos - kpos) < window)
    bias = PositionBias(alibi_slopes, t5_table, t5_buckets).materialize(lq, lk)  # (hq, lq, lk) or None
    if bias is not None:
        s = s + bias
    if mask is not None:
        if mask.dtype == mx.bool_:
            visible = visible & mask
        else:
            s = s + mask.astype(mx.float32)
    s = mx.where(visible, s, -mx.inf)
    top = mx.stop_gradient(s.max(axis=-1, keepdims=True))
    p = mx.exp(s - mx.where(top == -mx.inf, 0.0, top))
    total = p.sum(axis=-1, keepdims=True)
    o = (p.reshape(b, hkv, hq // hkv, lq, lk) @ v.astype(mx.float32)[:, :, None]).reshape(b, hq, lq, v.shape[-1])
    return (o / mx.where(total > 0, total, 1.0)).astype(q.dtype)


def _num_chunks(span: int, bh: int, num_splits: Optional[int]) -> Tuple[int, int]:
    """(keys per chunk, chunks) of the decode kernel: enough threadgroups to fill a GPU, >= 64 keys each."""
    splits = num_splits if num_splits is not None else max(1, min(-(-256 // bh), -(-span // 64)))
    chunk = -(-span // min(splits, span))
    return chunk, -(-span // chunk)


def _tiles(d: int) -> Tuple[int, int]:
    """(queries per threadgroup, keys per tile) of the prefill kernel; K, V and Q tiles fit 32 KiB in float32."""
    return (16 if d <= 128 else 8), (32 if d <= 64 else 16 if d <= 128 else 8)


def _kernel_forward(q, k, v, ops: dict, cfg: _Config) -> mx.array:
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    mask = ops.get("mask")
    mode, strides = 0, (0, 0, 0, 0)
    if mask is not None:
        if mask.size >= 2**31:
            raise ValueError(f"[fused_attention] the kernels index masks with int32: expected fewer than 2**31 "
                             f"elements, got shape {tuple(mask.shape)} (broadcast axes of size 1 are free)")
        mask, mode, strides = _mask_layout(mask)
    slopes, table, buckets = (ops.get(n) for n in ("alibi_slopes", "t5_table", "t5_buckets"))
    k_begin = max(0, lk - lq - cfg.window + 1) if cfg.window else 0  # the decode kernel's first key
    chunk, nchunks = _num_chunks(lk - k_begin, b * hq, cfg.num_splits)
    params = mx.array([b, hq, hkv, lq, lk, int(cfg.causal), cfg.window, mode, *strides, int(slopes is not None),
                       int(table is not None), k_begin, chunk, nchunks], dtype=mx.int32)
    fparams = mx.array([cfg.scale, cfg.softcap], dtype=mx.float32)

    def operand(x, dtype):  # absent operands are 1-element placeholders
        return mx.zeros((1,), dtype) if x is None else x.astype(dtype)

    inputs = [q, k, v, params, fparams, operand(slopes, mx.float32), operand(table, mx.float32),
              operand(buckets, mx.int32), operand(mask, mx.bool_ if mask is None else mask.dtype)]
    template = [("T", q.dtype), ("D", d)]
    if lq > DECODE_MAX_QUERIES:
        bq, bk = _tiles(d)
        return _PREFILL(inputs, template=template + [("BQ", bq), ("BK", bk)], grid=(_THREADS, -(-lq // bq), b * hq),
                        threadgroup=(_THREADS, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype],
                        mode=cfg.mode)[0]
    part = _DECODE(inputs, template=template, grid=(_THREADS, nchunks, b * hq), threadgroup=(_THREADS, 1, 1),
                   output_shapes=[(b * hq, nchunks, lq)] * 2 + [(b * hq, nchunks, lq, d)],
                   output_dtypes=[mx.float32] * 3, mode=cfg.mode)
    return _COMBINE([*part, params, fparams], template=template, grid=(32 * -(-d // 32), lq, b * hq),
                    threadgroup=(32, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype], mode=cfg.mode)[0]


@functools.lru_cache(maxsize=128)
def _fused(cfg: _Config):
    """The kernel as a custom function of (q, k, v, *extras) whose VJP runs through the reference."""
    opts = dict(scale=cfg.scale, causal=cfg.causal, window=cfg.window, softcap=cfg.softcap)

    def reference(q, k, v, *extras):
        return _reference(q, k, v, **dict(zip(cfg.extras, extras)), **opts)

    def forward(q, k, v, *extras):
        return _kernel_forward(q, k, v, dict(zip(cfg.extras, extras)), cfg)

    return with_reference_vjp(forward, reference)


def _check(q, k, v, window, softcap, alibi_slopes, t5_table, t5_buckets, mask, num_splits) -> None:
    name = "fused_attention"
    for what, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"[{name}] expected {what} of shape (batch, heads, seq, dim), got shape {tuple(t.shape)}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3] or hq % k.shape[1]:
        raise ValueError(f"[{name}] expected k of shape ({b}, kv_heads, k_len, {d}) with kv_heads dividing {hq} and v of "
                         f"shape k.shape[:3] + (dim_v,), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not (mx.issubdtype(q.dtype, mx.floating) and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"[{name}] expected q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    lk = k.shape[2]
    check_int(name, "window", window, 1, optional=True, says="expected window to be an int >= 1 or None")
    check_positive(name, "softcap", softcap, optional=True)
    check_int(name, "num_splits", num_splits, 1, optional=True, says="expected num_splits to be an int >= 1 or None")
    if alibi_slopes is not None and (alibi_slopes.shape != (hq,) or not mx.issubdtype(alibi_slopes.dtype, mx.floating)):
        raise ValueError(f"[{name}] expected floating alibi_slopes of shape ({hq},), got shape "
                         f"{tuple(alibi_slopes.shape)} and dtype {alibi_slopes.dtype}")
    if (t5_table is None) != (t5_buckets is None):
        raise ValueError(f"[{name}] expected t5_table and t5_buckets together (see t5_relative_buckets), got only one")
    if t5_table is not None:
        if t5_table.ndim != 2 or t5_table.shape[1] != hq or not mx.issubdtype(t5_table.dtype, mx.floating):
            raise ValueError(f"[{name}] expected a floating t5_table of shape (num_buckets, {hq}), got shape "
                             f"{tuple(t5_table.shape)} and dtype {t5_table.dtype}")
        if t5_buckets.shape != (lq + lk - 1,) or not mx.issubdtype(t5_buckets.dtype, mx.integer):
            raise ValueError(f"[{name}] expected integer t5_buckets of shape ({lq + lk - 1},) (q_len + k_len - 1), got "
                             f"shape {tuple(t5_buckets.shape)} and dtype {t5_buckets.dtype}")
    if mask is not None:
        target = (b, hq, lq, lk)
        fits = 2 <= mask.ndim <= 4 and all(s in (1, t) for s, t in zip(reversed(mask.shape), reversed(target)))
        if not fits or not (mask.dtype == mx.bool_ or mx.issubdtype(mask.dtype, mx.floating)):
            raise ValueError(f"[{name}] expected a boolean (keep) or floating (additive) mask broadcastable to {target}, "
                             f"got shape {tuple(mask.shape)} and dtype {mask.dtype}")


def fused_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: Optional[float] = None, causal: bool = False,
                    window: Optional[int] = None, softcap: Optional[float] = None,
                    alibi_slopes: Optional[mx.array] = None, t5_table: Optional[mx.array] = None,
                    t5_buckets: Optional[mx.array] = None, mask: Optional[mx.array] = None,
                    num_splits: Optional[int] = None, use_kernel=None) -> mx.array:
    r"""Attention with masks and position biases fused into one kernel (see the module docstring).

    Args:
        q (array): queries :math:`(B, H_q, L_q, D)`.
        k, v (array): keys and values :math:`(B, H_{kv}, L_k, D)`, :math:`H_{kv}` dividing :math:`H_q`
            (query head :math:`h` reads key/value head :math:`\lfloor h H_{kv} / H_q \rfloor`).
        scale (float, optional): :math:`\sigma`. Default: :math:`1/\sqrt{D}`.
        causal (bool): query :math:`i` sees keys :math:`j \le i + L_k - L_q`. Default: ``False``.
        window (int, optional): sliding window :math:`w`: :math:`|i + L_k - L_q - j| < w`
            (with ``causal``, the :math:`w` latest keys up to the query). Default: ``None``.
        softcap (float, optional): logit soft-cap :math:`c`, applied before the biases. Default: ``None``.
        alibi_slopes (array, optional): :math:`(H_q,)` slopes, bias :math:`-m_h |j - (i + L_k - L_q)|`
            (:class:`~mlx_zeta.nn.positional.AlibiPositionalBias`'s convention). Default: ``None``.
        t5_table (array, optional): :math:`(N_{buckets}, H_q)` learned T5 biases (the
            ``relative_attention_bias.weight`` of :class:`~mlx_zeta.nn.positional.RelativePositionBias`).
        t5_buckets (array, optional): int :math:`(L_q + L_k - 1,)`, the bucket of offset
            :math:`j - i = n - (L_q - 1)`, each in ``[0, N_buckets)`` (the kernels do not check); build it
            with :func:`t5_relative_buckets`. Given with ``t5_table``.
        mask (array, optional): boolean keep-mask (True = attend) or additive float mask, shape
            broadcastable to :math:`(B, H_q, L_q, L_k)` (2-D to 4-D); broadcast axes cost no memory.
        num_splits (int, optional): key chunks of the decode kernel (:math:`L_q \le 8`). Default: by size.
        use_kernel: ``None`` (follow the process-wide mode: kernel on Metal / CUDA, reference on the
            CPU), ``True``, ``False`` (reference), or a mode such as ``"emulate"`` / ``"emulate-cuda"``
            (the shipped Metal / CUDA text on the CPU); see :mod:`mlx_zeta.kernels.dispatch`.

    Returns:
        array: :math:`(B, H_q, L_q, D)` in q's dtype; rows with no visible key are 0.

    Raises:
        ValueError: on inconsistent shapes or dtypes; with ``use_kernel`` set to a kernel, also for a
            head dim outside ``mlx_zeta.kernels.attention.HEAD_DIMS``, a dtype outside
            ``mlx_zeta.kernels.attention.DTYPES`` or a value dim unequal to D (``use_kernel=None`` falls
            back to the reference there).
    """
    _check(q, k, v, window, softcap, alibi_slopes, t5_table, t5_buckets, mask, num_splits)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    opts = dict(scale=scale, causal=bool(causal), window=window or 0, softcap=float(softcap or 0.0))
    given = dict(zip(_EXTRAS, (alibi_slopes, t5_table, t5_buckets, mask)))
    mode = resolve(use_kernel)
    if mode != "reference" and not kernel_supports(q, k, v):
        if use_kernel is None:
            mode = "reference"
        else:
            raise ValueError(f"[fused_attention] the kernels expect head dim in {HEAD_DIMS}, dtype in "
                             f"{tuple(str(t) for t in DTYPES)} for q, k, v alike and v.shape == k.shape; got q "
                             f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}")
    if mode == "reference":
        return _reference(q, k, v, **given, **opts)
    extras = tuple(n for n in _EXTRAS if given[n] is not None)
    fn = _fused(_Config(**opts, extras=extras, mode=mode, num_splits=num_splits))
    return fn(q, k, v, *(given[n] for n in extras))
