"""The Core AI emitters: one function per MLX primitive (or family), registered into
:data:`~.graph.EMITTERS` when this module is imported (by :func:`~.lower.lower_function`).

Each takes ``(ctx, node)`` and returns one ``coreai.authoring`` value per MLX output, computed in the element types of
:mod:`~mlx_zeta.converters.coreai.graph` (float32, si32, i1). ``BINARY``/``UNARY`` map the elementwise MLX primitives
to the ``coreai`` ops they become; the rest are written out below. Images are NHWC in MLX and NCHW in Core AI's
convolution and pooling: emitters transpose around them.
"""

import numpy as np

from .dynamic import broadcast_shapes, has_sym
from .graph import FLOAT, INT, LoweringError, element_type, register_emitter

__all__ = ["BINARY", "UNARY"]

BINARY = {"Add": "broadcasting_add", "Subtract": "broadcasting_sub", "Multiply": "broadcasting_mul",
          "Divide": "broadcasting_divide", "Maximum": "broadcasting_maximum", "Minimum": "broadcasting_minimum",
          "Power": "broadcasting_pow", "Equal": "broadcasting_equal", "NotEqual": "broadcasting_not_equal",
          "Greater": "broadcasting_greater", "LogicalAnd": "broadcasting_and", "LogicalOr": "broadcasting_or"}
SWAPPED = {"Less": "Greater"}  # a < b is b > a
NEGATED = {"LessEqual": "Greater", "GreaterEqual": "Less"}  # a <= b is not (a > b)
UNARY = {"Exp": "exp", "Log": "log", "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Erf": "erf", "Abs": "abs_",
         "Round": "round_", "Sigmoid": "sigmoid", "Tan": "tan", "LogicalNot": "not_", "Sqrt": "sqrt"}


def _operands(ctx, node):
    """The node's inputs, floats in f32 and the rest in the type MLX gives them."""
    return [ctx.get_as(i, element_type(d)) for i, d in zip(node.inputs, node.in_dtypes)]


def _binary_op(ctx, name: str, a, b):
    if name in SWAPPED:
        return _binary_op(ctx, SWAPPED[name], b, a)
    if name in NEGATED:
        return ctx.ca.not_(_binary_op(ctx, NEGATED[name], a, b))
    return getattr(ctx.ca, BINARY[name])(a, b)


@register_emitter(*BINARY, *SWAPPED, *NEGATED)
def _binary(ctx, node):
    a, b = _operands(ctx, node)
    return _binary_op(ctx, node.name, a, b)


@register_emitter("Remainder")
def _remainder(ctx, node):
    """Python's ``a % b`` (the sign of ``b``): ``a - floor(a / b) * b``."""
    ca = ctx.ca
    a, b = _operands(ctx, node)
    return ca.broadcasting_sub(a, ca.broadcasting_mul(ca.broadcasting_floor_divide(a, b), b))


@register_emitter("BitwiseBinary")
def _bitwise(ctx, node):
    op = {0: "broadcasting_and", 1: "broadcasting_or", 2: "broadcasting_xor"}.get(node.args[0])
    if op is None or node.in_dtypes != ["bool", "bool"]:
        raise LoweringError(f"BitwiseBinary {node.args} on {node.in_dtypes} (only and/or/xor of bools)")
    return getattr(ctx.ca, op)(*_operands(ctx, node))


@register_emitter(*UNARY, "Negative", "Square", "Floor", "Ceil", "Log1p", "Expm1")
def _unary(ctx, node):
    ca = ctx.ca
    (x,) = _operands(ctx, node)
    one = ctx.scalar(1.0, FLOAT)
    if node.name == "Square":
        return ca.broadcasting_mul(x, x)
    if node.name == "Negative":
        return ca.broadcasting_mul(x, ctx.scalar(-1, ctx.types[node.inputs[0]]))
    if node.name == "Sqrt" and node.args and node.args[0]:
        return ca.rsqrt(x)
    if node.name == "Floor":
        return ca.broadcasting_floor_divide(x, one)
    if node.name == "Ceil":  # ceil(x) = -floor(-x)
        neg = ctx.scalar(-1.0, FLOAT)
        return ca.broadcasting_mul(ca.broadcasting_floor_divide(ca.broadcasting_mul(x, neg), one), neg)
    if node.name == "Log1p":
        return ca.log(ca.broadcasting_add(x, one))
    if node.name == "Expm1":
        return ca.broadcasting_sub(ca.exp(x), one)
    return getattr(ca, UNARY[node.name])(x)


@register_emitter("Select")
def _select(ctx, node):
    return ctx.ca.broadcasting_where(*_operands(ctx, node))


@register_emitter("Softmax")
def _softmax(ctx, node):
    (x,) = _operands(ctx, node)
    return ctx.ca.softmax(x, ctx.scalar(-1))


@register_emitter("Reduce")
def _reduce(ctx, node):
    ca, kind, axes = ctx.ca, node.args[0], ctx.ints(node.args[1])
    (x,) = _operands(ctx, node)
    if node.in_dtypes[0] == "bool":
        if kind not in (0, 1):
            raise LoweringError(f"Reduce {kind} of booleans (only and/or)")
        return (ca.all_ if kind == 0 else ca.any_)(x, axes)
    op = {2: ca.reduce_sum, 3: ca.reduce_product, 4: ca.reduce_min, 5: ca.reduce_max}.get(kind)
    if op is None:
        raise LoweringError(f"Reduce {kind} of {node.in_dtypes[0]}")
    return op(x, axes)


def _matmul(ctx, node, a: str, b: str):
    """``a @ b`` (``b`` transposed when :func:`absorb_transposes` set ``transpose_y``), numpy batching."""
    x, y = ctx.get_as(a, FLOAT), ctx.get_as(b, FLOAT)
    if node.attrs.get("transpose_y"):
        rank = len(node.in_shapes[1])
        y = ctx.ca.transpose(y, np.array(list(range(rank - 2)) + [rank - 1, rank - 2], np.uint32))
    return ctx.ca.broadcasting_batch_matmul(x, y)


@register_emitter("Matmul")
def _matmul_node(ctx, node):
    return _matmul(ctx, node, *node.inputs[:2])


@register_emitter("AddMM")
def _addmm(ctx, node):
    ca, (alpha, beta) = ctx.ca, node.args
    y = _matmul(ctx, node, node.inputs[0], node.inputs[1])
    if alpha != 1.0:
        y = ca.broadcasting_mul(y, ctx.scalar(alpha, FLOAT))
    c = ctx.get_as(node.inputs[2], FLOAT)
    if beta != 1.0:
        c = ca.broadcasting_mul(c, ctx.scalar(beta, FLOAT))
    return ca.broadcasting_add(y, c)


@register_emitter("Broadcast", "Full")
def _broadcast(ctx, node):
    return ctx.broadcast_to(ctx.get(node.inputs[0]), node.out_shapes[0])


@register_emitter("Reshape", "Flatten", "Unflatten", "ExpandDims", "Squeeze")
def _reshape(ctx, node):
    return ctx.reshape(ctx.get(node.inputs[0]), node.out_shapes[0])


@register_emitter("Transpose")
def _transpose(ctx, node):
    return ctx.ca.transpose(ctx.get(node.inputs[0]), np.asarray(node.args[0], np.uint32))


@register_emitter("Depends", "StopGradient", "Copy")
def _identity(ctx, node):
    return ctx.get(node.inputs[0])


@register_emitter("AsType")
def _astype(ctx, node):
    """A cast; float -> integer truncates explicitly first (``x - fmod(x, 1)``): coreai-core 1.0.0b3's
    rewrites fold ``cast(cast(x, si32), f32)`` into ``x``, dropping the truncation."""
    want = element_type(node.out_dtypes[0])
    if want == INT and ctx.etype(node.inputs[0]) == FLOAT:
        x = ctx.get(node.inputs[0])
        return ctx.cast(ctx.ca.broadcasting_sub(x, ctx.ca.broadcasting_modulo(x, ctx.scalar(1.0, FLOAT))), INT)
    return ctx.get_as(node.inputs[0], want)


@register_emitter("Slice")
def _slice(ctx, node):
    start, stop, strides = (ctx.ints(a) for a in node.args)
    return ctx.ca.slice_(ctx.get(node.inputs[0]), start, stop, strides)


@register_emitter("Split")
def _split(ctx, node):
    axis = node.args[1]
    sizes = [s[axis] for s in node.out_shapes]
    x = ctx.get(node.inputs[0])
    return list(ctx.ca.split(x, np.asarray(sizes, np.uint32), ctx.scalar(axis))) if len(sizes) > 1 else [x]


@register_emitter("Concatenate")
def _concat(ctx, node):
    values = _operands(ctx, node)
    return ctx.ca.concat(ctx.scalar(node.args[0]), values) if len(values) > 1 else values[0]


@register_emitter("Arange")
def _arange(ctx, node):
    if ctx.dims is not None and has_sym(node.out_shapes):
        return ctx.dims.arange(node)
    start, stop, step = node.args
    value = np.arange(start, stop, step)[: node.out_shapes[0][0]]
    return ctx.const(value, element_type(node.out_dtypes[0]))


@register_emitter("Gather")
def _gather(ctx, node):
    """``a[idx_0, ..., idx_k]`` on ``axes`` with slice size 1 there and full elsewhere: the axes
    moved first, the indices broadcast and stacked last, ``gather_nd``, reshaped to MLX's (*idx, *slice)."""
    ca = ctx.ca
    axes, sizes, shape = list(node.args[0]), list(node.args[1]), node.in_shapes[0]
    if any(sizes[a] != 1 for a in axes) or any(sizes[i] != shape[i] for i in range(len(shape)) if i not in axes):
        raise LoweringError(f"Gather with slice sizes {sizes} on {shape} (only single-element slices)")
    x = ctx.get(node.inputs[0])
    rest = [i for i in range(len(shape)) if i not in axes]
    if axes + rest != list(range(len(shape))):
        x = ca.transpose(x, np.asarray(axes + rest, np.uint32))
    index_shape = list(broadcast_shapes(*node.in_shapes[1:]))
    parts = []
    for name in node.inputs[1:]:
        idx = ctx.broadcast_to(ctx.get_as(name, INT), index_shape) if index_shape else ctx.get_as(name, INT)
        parts.append(ctx.reshape(idx, index_shape + [1]))
    index = ca.concat(ctx.scalar(-1), parts) if len(parts) > 1 else parts[0]
    return ctx.reshape(ca.gather_nd(x, index), node.out_shapes[0])


@register_emitter("Pad")
def _pad(ctx, node):
    axes, low, high = (list(a) for a in node.args[:3])
    padding = [0] * (2 * len(node.in_shapes[0]))
    for a, lo, hi in zip(axes, low, high):
        padding[2 * a], padding[2 * a + 1] = lo, hi
    x, value = _operands(ctx, node)
    return ctx.ca.pad(x, np.asarray(padding, np.uint32), ctx.ca.reshape(value, ctx.ints([])), "constant")


def _interleave_zeros(ctx, x, shape: list, dilation) -> tuple:
    """Input dilation made explicit: ``s - 1`` zeros after each element along each spatial axis
    (NHWC ``x`` of ``shape``), the trailing ones cut. Returns ``(x, new shape)``."""
    ca = ctx.ca
    for ax, s in enumerate(dilation, start=1):
        if s == 1:
            continue
        size = shape[ax]
        x = ca.expand_dims(x, ctx.ints([ax + 1]))
        zeros_shape = shape[: ax + 1] + [s - 1] + shape[ax + 1:]
        x = ca.concat(ctx.scalar(ax + 1), [x, ctx.const(np.zeros(zeros_shape), FLOAT)])
        full = shape[:ax] + [size * s] + shape[ax + 1:]
        end = shape[:ax] + [(size - 1) * s + 1] + shape[ax + 1:]
        x = ca.slice_(ca.reshape(x, ctx.ints(full)), ctx.ints([0] * len(shape)), ctx.ints(end),
                      ctx.ints([1] * len(shape)))
        shape = end
    return x, shape


@register_emitter("Convolution")
def _conv(ctx, node):
    """Channels-last MLX convolution (x (N, *S, C), w (O, *K, C/g)), 1-D or 2-D, as ``coreai.conv2d``
    on NCHW after an explicit ``pad``; input dilation (transposed convolutions) interleaves zeros."""
    ca = ctx.ca
    strides, pad_lo, pad_hi, kdil, idil, groups, flip = node.args
    x, w = _operands(ctx, node)
    n = len(node.in_shapes[0]) - 2
    if n not in (1, 2):
        raise LoweringError(f"Convolution over {n} spatial axes (only 1-D and 2-D)")
    x, shape = _interleave_zeros(ctx, x, list(node.in_shapes[0]), idil)
    wshape = list(node.in_shapes[1])
    if n == 1:  # (N, L, C) -> (N, 1, L, C)
        x = ca.reshape(x, ctx.ints([shape[0], 1] + shape[1:]))
        w = ca.reshape(w, ctx.ints([wshape[0], 1] + wshape[1:]))
        strides, pad_lo, pad_hi, kdil = ([1] + list(strides), [0] + list(pad_lo), [0] + list(pad_hi),
                                         [1] + list(kdil))
    if flip:
        w = ca.reverse(w, ctx.ints([1, 2]))
    x = ca.transpose(x, np.array([0, 3, 1, 2], np.uint32))
    if any(pad_lo) or any(pad_hi):
        padding = [0, 0, 0, 0, pad_lo[0], pad_hi[0], pad_lo[1], pad_hi[1]]
        x = ca.pad(x, np.asarray(padding, np.uint32), ctx.scalar(0.0, FLOAT), "constant")
    w = ca.transpose(w, np.array([0, 3, 1, 2], np.uint32))
    y = ca.conv2d(x, w, ctx.ints(strides), ctx.ints(kdil), ctx.scalar(groups))
    y = ca.transpose(y, np.array([0, 2, 3, 1], np.uint32))
    return ca.reshape(y, ctx.ints(node.out_shapes[0])) if n == 1 else y


@register_emitter("MaxPool2d")
def _max_pool(ctx, node):
    """Non-overlapping ``k x k`` max pooling of an NHWC image (folded by the passes) on NCHW."""
    from coreai.authoring import TensorType

    ca, (kh, kw) = ctx.ca, node.args
    (x,) = _operands(ctx, node)
    n, ho, wo, c = node.out_shapes[0]
    y = ca.maxpool2d(TensorType((n, c, ho, wo), np.float32), ca.transpose(x, np.array([0, 3, 1, 2], np.uint32)),
                     np.array([kh, kw], np.uint32), np.array([kh, kw], np.uint32), np.array([1, 1], np.uint32),
                     np.array(False))
    return ca.transpose(y, np.array([0, 2, 3, 1], np.uint32))


@register_emitter("DynamicSliceUpdate")
def _dynamic_slice_update(ctx, node):
    """``mx.slice_update(x, update, start, axes)`` with an array ``start`` (a KV-cache write at the
    current position) as ``coreai.slice_update`` with ``start``/``end`` built at run time. When ``x``
    is a state input, the result is also recorded as the state's new value (:mod:`.lower`)."""
    ca = ctx.ca
    rank = len(node.in_shapes[0])
    axes = [a % rank for a in node.args[0]]
    x, update = ctx.get_as(node.inputs[0], FLOAT), ctx.get_as(node.inputs[1], FLOAT)
    start = ca.reshape(ctx.get_as(node.inputs[2], INT), ctx.ints([len(axes)]))
    parts = [ca.slice_(start, ctx.ints([axes.index(d)]), ctx.ints([axes.index(d) + 1]), ctx.ints([1]))
             if d in axes else ctx.ints([0]) for d in range(rank)]
    begin = ca.concat(ctx.scalar(0), parts)
    end = ca.broadcasting_add(begin, ctx.ints(node.in_shapes[1]))
    y = ca.slice_update(x, begin, end, ctx.ints([1] * rank), update)
    if node.inputs[0] in ctx.graph_inputs:
        ctx.state_writes[node.inputs[0]] = y
    return y

