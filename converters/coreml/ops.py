"""The emitters: one function per MLX primitive (or family), registered into :data:`~.graph.EMITTERS` with
:func:`~.graph.register_emitter` when this module is imported (the driver, :mod:`~mlx_zeta.converters.coreml.lower`,
imports it). Each takes ``(ctx, node)`` and returns one MIL var per MLX output; float inputs go through ``ctx.floats``
so the precision policy of :mod:`~mlx_zeta.converters.coreml.graph` holds.

``BINARY`` and ``UNARY`` map the elementwise MLX primitives to the MIL ops they become."""

import numpy as np

from .graph import REDUCE, Context, LoweringError, Node, mil_dtype, register_emitter, scalar_const

__all__ = ["BINARY", "UNARY"]


def _finish(ctx: Context, var, out: str):
    """``var`` cast to the node's output float dtype ``out`` (non-float vars as they are)."""
    keep = ctx.mb_dtype(var) == out or ctx.mb_dtype(var) not in ("fp16", "fp32")
    return var if keep else ctx.mb.cast(x=var, dtype=out)


BINARY = {"Add": "add", "Subtract": "sub", "Multiply": "mul", "Divide": "real_div", "Maximum": "maximum",
          "Minimum": "minimum", "Power": "pow", "Remainder": "mod", "Equal": "equal", "NotEqual": "not_equal",
          "Less": "less", "LessEqual": "less_equal", "Greater": "greater", "GreaterEqual": "greater_equal",
          "LogicalAnd": "logical_and", "LogicalOr": "logical_or"}
UNARY = {"Exp": "exp", "Log": "log", "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Erf": "erf", "Abs": "abs",
         "Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign", "Sigmoid": "sigmoid", "Tan": "tan",
         "LogicalNot": "logical_not"}


@register_emitter(*BINARY)
def _binary(ctx, node):
    (a, b), compute, out = ctx.floats(node)
    if node.in_dtypes[0] == "bool" and node.name in ("Equal", "NotEqual"):
        a, b = ctx.mb.cast(x=a, dtype="int32"), ctx.mb.cast(x=b, dtype="int32")
    return _finish(ctx, getattr(ctx.mb, BINARY[node.name])(x=a, y=b), out)


@register_emitter("BitwiseBinary")
def _bitwise(ctx, node):
    op = {0: "logical_and", 1: "logical_or", 2: "logical_xor"}.get(node.args[0])
    if op is None or node.in_dtypes != ["bool", "bool"]:
        raise LoweringError(f"BitwiseBinary {node.args} on {node.in_dtypes} (only and/or/xor of bools)")
    return getattr(ctx.mb, op)(x=ctx.get(node.inputs[0]), y=ctx.get(node.inputs[1]))


@register_emitter(*UNARY, "Negative", "Square", "Sqrt", "Log1p", "Expm1")
def _unary(ctx, node):
    mb = ctx.mb
    (x,), compute, out = ctx.floats(node, stats=node.name == "Square")
    if node.name == "Square":
        y = mb.mul(x=x, y=x)
    elif node.name == "Negative":
        y = mb.mul(x=x, y=ctx.const(np.array(-1), ctx.mb_dtype(x)))
    elif node.name == "Sqrt":
        y = mb.rsqrt(x=x, epsilon=ctx.const(np.array(0.0), compute)) if node.args and node.args[0] else mb.sqrt(x=x)
    elif node.name == "Log1p":
        y = mb.log(x=mb.add(x=x, y=ctx.const(np.array(1.0), compute)))
    elif node.name == "Expm1":
        y = mb.sub(x=mb.exp(x=x), y=ctx.const(np.array(1.0), compute))
    else:
        y = getattr(mb, UNARY[node.name])(x=x)
    return _finish(ctx, y, out)


@register_emitter("Select")
def _select(ctx, node):
    (c, a, b), compute, out = ctx.floats(node)
    return _finish(ctx, ctx.mb.select(cond=c, a=a, b=b), out)


@register_emitter("Softmax")
def _softmax(ctx, node):
    (x,), compute, out = ctx.floats(node)
    return _finish(ctx, ctx.mb.softmax(x=x, axis=-1), out)


@register_emitter("Reduce")
def _reduce(ctx, node):
    mb, kind, axes = ctx.mb, REDUCE[node.args[0]], list(node.args[1])
    if node.in_dtypes[0] == "bool":
        x = mb.cast(x=ctx.get(node.inputs[0]), dtype="int32")
        y = (mb.reduce_min if kind == "and" else mb.reduce_max)(x=x, axes=axes, keep_dims=True)
        return mb.cast(x=y, dtype="bool")
    (x,), compute, out = ctx.floats(node, stats=kind in ("sum", "prod"))
    op = {"sum": mb.reduce_sum, "prod": mb.reduce_prod, "min": mb.reduce_min, "max": mb.reduce_max}[kind]
    return _finish(ctx, op(x=x, axes=axes, keep_dims=True), out)


def _mm(ctx, node, a: str, b: str):
    """matmul of MLX values a @ b (``transpose_y`` from :func:`absorb_transposes`)."""
    compute, out = ctx.floats(Node("Matmul", [], [a, b], [], [], [], node.in_dtypes[:2], []))[1:]
    y = ctx.mb.matmul(x=ctx.get(a, compute), y=ctx.get(b, compute), transpose_y=node.attrs.get("transpose_y", False))
    return y, compute, out


@register_emitter("Matmul")
def _matmul(ctx, node):
    y, compute, out = _mm(ctx, node, *node.inputs)
    return _finish(ctx, y, out)


@register_emitter("AddMM")
def _addmm(ctx, node):
    alpha, beta = node.args
    y, compute, out = _mm(ctx, node, node.inputs[0], node.inputs[1])
    if alpha != 1.0:
        y = ctx.mb.mul(x=y, y=ctx.const(np.array(alpha), compute))
    c = ctx.get(node.inputs[2], compute)
    if beta != 1.0:
        c = ctx.mb.mul(x=c, y=ctx.const(np.array(beta), compute))
    return _finish(ctx, ctx.mb.add(x=y, y=c), out)


@register_emitter("SDPA")
def _sdpa(ctx, node):
    """Fused attention (see :func:`fuse_attention`): q (*Bq, L, D), k (*Bk, S, D), v (*Bk, S, Dv);
    grouped-query k/v (Bk = Bq with the last batch axis 1) fold the group into L."""
    mb = ctx.mb
    vals, compute, out = ctx.floats(node)
    q, k, v = vals[:3]
    qs, ks, vs = node.in_shapes[:3]
    d = qs[-1]
    if abs(node.attrs["scale"] * np.sqrt(d) - 1.0) > 1e-6:
        q = mb.mul(x=q, y=ctx.const(np.array(node.attrs["scale"] * np.sqrt(d)), compute))
    mask = None
    if len(vals) > 3:
        mask = vals[3] if node.attrs["mask"] == "bool" else ctx.get(node.inputs[3], compute)
    bq, bk = qs[:-2], ks[:-2]
    grouped = bq != bk and bk == vs[:-2] and bk[:-1] == bq[:-1] and bk[-1] == 1 and len(bq) >= 2
    if grouped:
        g, L, S = bq[-1], qs[-2], ks[-2]
        q = mb.reshape(x=q, shape=list(bq[:-1]) + [g * L, d])
        k, v = mb.squeeze(x=k, axes=[-3]), mb.squeeze(x=v, axes=[-3])
        if mask is not None:
            mshape = list(bq) + [L, S]
            mask = mb.reshape(x=_broadcast(ctx, mask, mshape), shape=list(bq[:-1]) + [g * L, S])
    elif bq != bk or bq != vs[:-2]:
        k, v = _broadcast(ctx, k, list(bq) + list(ks[-2:])), _broadcast(ctx, v, list(bq) + list(vs[-2:]))
    y = mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)
    if grouped:
        y = mb.reshape(x=y, shape=list(node.out_shapes[0]))
    return _finish(ctx, y, out)


def _broadcast(ctx, x, shape):
    """numpy broadcast of a MIL var to ``shape`` (reshape to the rank, then tile)."""
    src = list(x.shape)
    src = [1] * (len(shape) - len(src)) + src
    if len(src) != len(x.shape):
        x = ctx.mb.reshape(x=x, shape=src)
    reps = [t // s if s == 1 else 1 for s, t in zip(src, shape)]
    return x if all(r == 1 for r in reps) else ctx.mb.tile(x=x, reps=reps)


@register_emitter("Broadcast")
def _broadcast_node(ctx, node):
    return _broadcast(ctx, ctx.get(node.inputs[0]), list(node.out_shapes[0]))


@register_emitter("Reshape", "Flatten", "Unflatten", "ExpandDims", "Squeeze")
def _reshape(ctx, node):
    return ctx.mb.reshape(x=ctx.get(node.inputs[0]), shape=np.array(node.out_shapes[0], dtype=np.int32))


@register_emitter("Transpose")
def _transpose(ctx, node):
    return ctx.mb.transpose(x=ctx.get(node.inputs[0]), perm=list(node.args[0]))


@register_emitter("Depends", "StopGradient", "Copy")
def _identity(ctx, node):
    return ctx.get(node.inputs[0])


@register_emitter("AsType")
def _astype(ctx, node):
    x = ctx.get(node.inputs[0])
    want = mil_dtype(node.out_dtypes[0])
    if want in ("fp16", "fp32"):  # compile-time values stay fp32 (precision policy, :mod:`.graph`)
        want = "fp32" if ctx.is_const(node.inputs[0]) else ctx.float
    return x if ctx.mb_dtype(x) == want else ctx.mb.cast(x=x, dtype=want)


@register_emitter("Slice")
def _slice(ctx, node):
    start, stop, strides = (list(a) for a in node.args)
    return ctx.mb.slice_by_index(x=ctx.get(node.inputs[0]), begin=start, end=stop, stride=strides)


@register_emitter("Split")
def _split(ctx, node):
    x, axis = ctx.get(node.inputs[0]), node.args[1]
    sizes = [s[axis] for s in node.out_shapes]
    return list(ctx.mb.split(x=x, split_sizes=sizes, axis=axis)) if len(sizes) > 1 else [x]


@register_emitter("Concatenate")
def _concat(ctx, node):
    vals, compute, out = ctx.floats(node)
    if len({ctx.mb_dtype(v) for v in vals}) > 1:
        vals = [ctx.mb.cast(x=v, dtype=out) for v in vals]
    return _finish(ctx, ctx.mb.concat(values=vals, axis=node.args[0]), out)


@register_emitter("Arange")
def _arange(ctx, node):
    start, stop, step = node.args
    value = np.arange(start, stop, step)[: node.out_shapes[0][0]]
    return ctx.const(value, "fp32" if node.out_dtypes[0].startswith(("float", "bfloat")) else "int32")


@register_emitter("Full")
def _full(ctx, node):
    return _broadcast(ctx, ctx.get(node.inputs[0]), list(node.out_shapes[0]))


@register_emitter("Gather")
def _gather(ctx, node):
    """``a[idx_0, ..., idx_k]`` on ``axes`` with slice size 1 there and full elsewhere:
    move the axes first, gather (``gather_nd`` for several), reshape to MLX's (*idx, *slice)."""
    mb = ctx.mb
    axes, sizes = list(node.args[0]), list(node.args[1])
    shape = node.in_shapes[0]
    if any(sizes[a] != 1 for a in axes) or any(sizes[i] != shape[i] for i in range(len(shape)) if i not in axes):
        raise LoweringError(f"Gather with slice sizes {sizes} on {shape} (only single-element slices)")
    x = ctx.get(node.inputs[0])
    rest = [i for i in range(len(shape)) if i not in axes]
    if axes + rest != list(range(len(shape))):
        x = mb.transpose(x=x, perm=axes + rest)
    idx = [ctx.get(i, "int32") for i in node.inputs[1:]]
    if len(idx) == 1:
        y = mb.gather(x=x, indices=idx[0], axis=0)
    else:
        y = mb.gather_nd(x=x, indices=mb.stack(values=[_broadcast(ctx, i, list(np.broadcast_shapes(
            *node.in_shapes[1:]))) for i in idx], axis=-1))
    return mb.reshape(x=y, shape=list(node.out_shapes[0]))


@register_emitter("Pad")
def _pad(ctx, node):
    axes, low, high = (list(a) for a in node.args[:3])
    pad = [0] * (2 * len(node.in_shapes[0]))
    for a, lo, hi in zip(axes, low, high):
        pad[2 * a], pad[2 * a + 1] = lo, hi
    value = scalar_const(ctx.graph, node.inputs[1], ctx.graph.producers())
    (x, _), compute, out = ctx.floats(node)
    fill = np.float16(value or 0.0) if compute == "fp16" else np.float32(value or 0.0)  # MIL: same dtype as x
    return _finish(ctx, ctx.mb.pad(x=x, pad=pad, mode="constant", constant_val=fill), out)


@register_emitter("Convolution")
def _conv(ctx, node):
    """Channels-last MLX convolution (x (N, *S, C), w (O, *K, C/g)) as MIL ``conv`` on NC*S;
    input dilation (transposed convolutions) is made explicit by interleaving zeros."""
    mb = ctx.mb
    strides, pad_lo, pad_hi, kdil, idil, groups, flip = node.args
    (x, w), compute, out = ctx.floats(node)
    n = len(node.in_shapes[0]) - 2
    if any(d != 1 for d in idil):  # zero-interleave: (N, H, W, C) -> (N, (H-1)*s+1, ...)
        shape = list(node.in_shapes[0])
        for ax, s in enumerate(idil, start=1):
            if s == 1:
                continue
            size = shape[ax]
            x = mb.expand_dims(x=x, axes=[ax + 1])
            zeros_shape = list(x.shape)
            zeros_shape[ax + 1] = s - 1
            x = mb.concat(values=[x, ctx.const(np.zeros(zeros_shape), compute)], axis=ax + 1)
            shape[ax] = size * s
            x = mb.reshape(x=x, shape=shape)
            end = list(shape)
            end[ax] = (size - 1) * s + 1
            x = mb.slice_by_index(x=x, begin=[0] * len(shape), end=end)
            shape = end
    if flip:
        w = mb.reverse(x=w, axes=list(range(1, n + 1)))
    to_first = [0, n + 1] + list(range(1, n + 1))
    y = mb.conv(x=mb.transpose(x=x, perm=to_first), weight=mb.transpose(x=w, perm=to_first),
                strides=list(strides), pad_type="custom", pad=[p for lh in zip(pad_lo, pad_hi) for p in lh],
                dilations=list(kdil), groups=groups)
    return _finish(ctx, mb.transpose(x=y, perm=[0] + list(range(2, n + 2)) + [1]), out)


@register_emitter("MaxPool2d")
def _max_pool(ctx, node):
    """Non-overlapping ``k x k`` max pooling of an NHWC image (from
    :func:`~mlx_zeta.converters.coreml.passes.fold_pooling_windows`) as MIL ``max_pool`` on NCHW."""
    mb, (kh, kw) = ctx.mb, node.args
    (x,), compute, out = ctx.floats(node)
    y = mb.max_pool(x=mb.transpose(x=x, perm=[0, 3, 1, 2]), kernel_sizes=[kh, kw], strides=[kh, kw], pad_type="valid")
    return _finish(ctx, mb.transpose(x=y, perm=[0, 2, 3, 1]), out)


@register_emitter("DynamicSliceUpdate")
def _dynamic_slice_update(ctx, node):
    """``mx.slice_update(x, update, start, axes)`` with an array ``start`` (a KV-cache write at the
    current position) as MIL ``slice_update`` with ``begin`` built at run time. When ``x`` is a
    state input (see :func:`~.lower.lower_graph`), the result is also written to the state with
    ``coreml_update_state`` and its output is what later ops read: never a second ``read_state``,
    which coremltools' passes would merge with the first (reading the old cache)."""
    mb = ctx.mb
    axes, rank = [a % len(node.in_shapes[0]) for a in node.args[0]], len(node.in_shapes[0])
    (x, update, _), compute, out = ctx.floats(node)
    start = ctx.get(node.inputs[2], "int32")
    parts = [mb.slice_by_index(x=start, begin=[axes.index(d)], end=[axes.index(d) + 1]) if d in axes
             else ctx.const(np.zeros(1), "int32") for d in range(rank)]
    begin = mb.concat(values=parts, axis=0)
    end = mb.add(x=begin, y=ctx.const(np.array(node.in_shapes[1]), "int32"))
    state = ctx.state_vars.get(node.inputs[0])
    y = mb.slice_update(x=x, update=update, begin=begin, end=end)
    if state is None:
        return _finish(ctx, y, out)
    want = ctx.state_dtypes[node.inputs[0]]  # write in the state's dtype, read back the written value
    y = mb.coreml_update_state(state=state, value=y if ctx.mb_dtype(y) == want else mb.cast(x=y, dtype=want))
    return _finish(ctx, y if ctx.mb_dtype(y) == compute else mb.cast(x=y, dtype=compute), out)
