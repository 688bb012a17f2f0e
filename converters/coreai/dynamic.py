r"""Functions over a dynamic token count: one MLX graph with symbolic dims, from traces at fixed lengths.

MLX captures a function at fixed shapes (:func:`~mlx_zeta.converters.coreml.lower.capture`). For a
``coreai.graph`` whose ``input_ids`` is ``(B, T)`` with ``T`` known only at run time,
:func:`symbolic_graph` takes the same step traced at three lengths ``T_0 < T_1 < T_2`` (after the
graph passes) and merges them:

* the traces must have the same inputs, outputs, constants (names, shapes and values) and nodes
  (primitive, inputs, outputs, dtypes) in the same order;
* every number that differs between them (a dim of a shape, a ``Slice`` bound, an ``Arange`` stop, a
  ``Reshape`` argument) must be **affine in T**: ``d(T) = a T + b`` with integers ``a, b`` fitted on
  ``T_0, T_1`` (``a = (d_1 - d_0) / (T_1 - T_0)``, ``b = d_0 - a T_0``) and checked on ``T_2``;
  it becomes a :class:`Sym` ``(a, b)``. Anything else is a :class:`~.graph.LoweringError` naming the node.

The merged graph is the first trace with :class:`Sym` entries in place of those numbers. Lowering it
(:func:`~.lower.lower_function` with ``symbolic=True``) gives the context a :class:`Dims`: a shape
operand holding a :class:`Sym` is built at run time, ``T`` being read from the first input with a dim
``T`` (``get_shape``), ``a T + b`` and the static dims concatenated in ``si32``; an ``Arange`` of
``n(T)`` elements is ``start + step * range_(0, n(T), 1)``; the value of every node gets its MLX
shape with ``?`` at the symbolic dims (Core AI's type inference makes every dim of a reshape or a
broadcast to a run-time shape dynamic). Only the primitives of :data:`DYNAMIC` lower with symbolic
dims (they read shapes only through ``ctx.ints`` / ``ctx.reshape`` / ``ctx.broadcast_to``); any
other one with a symbolic dim is a :class:`~.graph.LoweringError`.

Limits: a dim that is affine in ``T`` only over part of the range (``min(T, c)``) and agrees at
the three traced lengths is taken as affine; the traced lengths are spread over the range
(:func:`trace_lengths`) so that such a graph is at least traced on both sides of the range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..coreml.graph import Graph
from ..coreml.lower import run_passes
from .graph import INT, LoweringError, element_type

__all__ = ["Sym", "symbolic_graph", "trace_lengths", "Dims", "has_sym", "broadcast_shapes", "DYNAMIC"]

# primitives whose emitters read shapes only through ctx.ints / ctx.reshape / ctx.broadcast_to
DYNAMIC = frozenset(
    "Add Subtract Multiply Divide Maximum Minimum Power Equal NotEqual Greater Less LessEqual GreaterEqual "
    "LogicalAnd LogicalOr LogicalNot Remainder BitwiseBinary Exp Log Sin Cos Tanh Erf Abs Round Sigmoid Tan "
    "Sqrt Negative Square Floor Ceil Log1p Expm1 Select Softmax Reduce Matmul AddMM Broadcast Full Reshape "
    "Flatten Unflatten ExpandDims Squeeze Transpose Depends StopGradient Copy AsType Slice Split Concatenate "
    "Arange Gather DynamicSliceUpdate".split())


@dataclass(frozen=True)
class Sym:
    """A dim (or argument) ``a * T + b`` of the token count ``T``."""
    a: int
    b: int

    def at(self, t: int) -> int:
        return self.a * t + self.b

    def __repr__(self) -> str:
        return f"{self.a}*T{self.b:+d}" if self.b else f"{self.a}*T"


def has_sym(x) -> bool:
    """Whether ``x`` (a number, or nested lists/tuples of them) holds a :class:`Sym`."""
    return isinstance(x, Sym) or (isinstance(x, (list, tuple)) and any(has_sym(v) for v in x))


def trace_lengths(lo: int, hi: int, capacity: int) -> Tuple[int, int, int]:
    """Three lengths to trace a step of ``T`` in ``[lo, hi]`` at: ``max(lo, 2)``, the middle and ``hi``,
    completed from ``2 .. capacity`` when the range holds fewer (``T = 1`` is avoided: models may
    special-case one token)."""
    lo = max(lo, 2)
    picks = sorted({lo, (lo + hi) // 2, hi} & set(range(2, capacity + 1)))
    extra = [t for t in range(2, capacity + 1) if t not in picks]
    picks = sorted(picks + extra[: 3 - len(picks)])
    if len(picks) < 3:
        raise ValueError(f"[export_decoder_coreai] a dynamic length needs capacity >= 4, got {capacity}")
    return tuple(picks)


def _fit(values: Sequence, lengths: Sequence[int], where: str):
    """The common value of ``values`` (one per traced length), or the :class:`Sym` they follow."""
    first = values[0]
    if all(type(v) is type(first) and v == first for v in values):
        return first
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        raise LoweringError(f"[export_coreai] {where} differs between traced lengths: {values}")
    (t0, t1, t2), (d0, d1, d2) = lengths, values
    a = (d1 - d0) / (t1 - t0)
    b = d0 - a * t0
    if a != int(a) or b != int(b) or a * t2 + b != d2:
        raise LoweringError(f"[export_coreai] {where} is {list(values)} at T={list(lengths)}: not a*T+b with "
                            f"integers a, b; the graph cannot take a dynamic length")
    return Sym(int(a), int(b))


def _merge(items: Sequence, lengths, where: str):
    """``items`` (one per trace) merged: lists/tuples element by element, numbers by :func:`_fit`."""
    first = items[0]
    if isinstance(first, (list, tuple)):
        if any(not isinstance(x, (list, tuple)) or len(x) != len(first) for x in items):
            raise LoweringError(f"[export_coreai] {where} differs between traced lengths: {list(items)}")
        return type(first)(_merge([x[i] for x in items], lengths, where) for i in range(len(first)))
    return _fit(items, lengths, where)


def symbolic_graph(graphs: Sequence[Graph], lengths: Sequence[int], model_name: str = "model") -> Graph:
    """The traces ``graphs`` (of one step at ``lengths``) merged into the first, with :class:`Sym`
    dims and arguments (module docstring); runs the graph passes on each. Raises a
    :class:`~.graph.LoweringError` naming the first node, constant or feature that differs other than affinely."""
    for g in graphs:
        run_passes(g, fuse=False)
    first = graphs[0]
    for g, t in zip(graphs[1:], lengths[1:]):
        _same_structure(first, g, f"{model_name} at T={lengths[0]} and T={t}")
    where = f"in {model_name}"
    for kind in ("inputs", "outputs"):  # (name, shape, dtype): the names are the first graph's
        merged = _merge([[f[1:] for f in getattr(g, kind)] for g in graphs], lengths, f"{kind} {where}")
        setattr(first, kind, [(f[0],) + tuple(m) for f, m in zip(getattr(first, kind), merged)])
    for i, node in enumerate(first.nodes):
        nodes = [g.nodes[i] for g in graphs]
        at = f"node {i} ({node.name}) {where}"
        for attr in ("args", "in_shapes", "out_shapes"):
            setattr(node, attr, _merge([getattr(n, attr) for n in nodes], lengths, f"{attr} of {at}"))
    return first


def _same_structure(first: Graph, other: Graph, where: str) -> None:
    """A :class:`~.graph.LoweringError` unless ``other`` is ``first`` up to value names (MLX numbers
    values per trace) and lengths: the same primitives, wiring, dtypes and constant values."""
    def fail(what: str):
        raise LoweringError(f"[export_coreai] the graphs of {where} differ ({what}); they cannot take a dynamic "
                            f"length")

    if len(first.nodes) != len(other.nodes) or len(first.inputs) != len(other.inputs):
        fail(f"{len(first.nodes)} vs {len(other.nodes)} nodes")
    rename = {o[0]: f[0] for f, o in zip(first.inputs, other.inputs)}
    for i, (f, o) in enumerate(zip(first.nodes, other.nodes)):
        if (f.name, f.in_dtypes, f.out_dtypes, f.attrs, len(f.inputs), len(f.outputs)) != \
                (o.name, o.in_dtypes, o.out_dtypes, o.attrs, len(o.inputs), len(o.outputs)):
            fail(f"node {i}: {f.name} vs {o.name}")
        for fi, oi in zip(f.inputs, o.inputs):
            if oi not in rename and fi in first.constants and oi in other.constants:
                a, b = first.constants[fi], other.constants[oi]
                if a.shape != b.shape or not np.array_equal(a, b):
                    fail(f"constant {fi} {a.shape} of node {i} ({f.name}) depends on T")
                rename[oi] = fi
            if rename.get(oi) != fi:
                fail(f"input {fi} of node {i} ({f.name})")
        rename.update(zip(o.outputs, f.outputs))
    if [rename.get(o[0]) for o in other.outputs] != [f[0] for f in first.outputs]:
        fail("outputs")


def broadcast_shapes(*shapes) -> tuple:
    """``np.broadcast_shapes`` of shapes that may hold :class:`Sym` dims (a symbolic dim broadcasts
    only with 1 or itself)."""
    if not has_sym(shapes):
        return tuple(np.broadcast_shapes(*map(tuple, shapes)))
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        dims = {s[k - rank + len(s)] for s in shapes if k - rank + len(s) >= 0} - {1}
        if len(dims) > 1:
            raise LoweringError(f"[export_coreai] shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def mlir_dims(shape) -> List[int]:
    """``shape`` for an MLIR tensor type: a :class:`Sym` dim is dynamic (``?``)."""
    from coreai._compiler.ir import ShapedType

    return [ShapedType.get_dynamic_size() if isinstance(d, Sym) else int(d) for d in shape]


class Dims:
    """The run-time dims of one lowering with :class:`Sym` shapes (``ctx.dims``; module docstring).

    ``T`` is read once from the first graph input with a dim ``1*T+0``; each ``a T + b`` is emitted
    once, as ``si32`` of shape (1,)."""

    def __init__(self, ctx):
        self.ctx = ctx
        found = [(name, k) for name, shape, _ in ctx.graph.inputs for k, d in enumerate(shape) if d == Sym(1, 0)]
        if not found:
            raise LoweringError("[export_coreai] a symbolic graph needs an input with a dim T")
        self.source = found[0]
        self.cache: Dict[Sym, object] = {}

    def dim(self, sym: Sym):
        """``a T + b`` as a run-time ``si32`` tensor of shape (1,)."""
        ca = self.ctx.ca
        if sym not in self.cache:
            if sym == Sym(1, 0):
                name, k = self.source
                shape = ca.get_shape(self.ctx.get(name))
                self.cache[sym] = ca.cast(ca.slice_(shape, _i32([k]), _i32([k + 1]), _i32([1])), ca.int32)
            else:
                scaled = ca.broadcasting_mul(self.dim(Sym(1, 0)), _i32([sym.a])) if sym.a != 1 else self.dim(Sym(1, 0))
                self.cache[sym] = ca.broadcasting_add(scaled, _i32([sym.b])) if sym.b else scaled
        return self.cache[sym]

    def ints(self, values):
        """A 1-D ``si32`` operand: a constant array when ``values`` holds no :class:`Sym`, else the
        concatenation of its static runs and its run-time dims."""
        flat = list(values) if isinstance(values, (list, tuple)) else [values]
        if not has_sym(flat):
            return _i32(flat)
        parts: list = []
        for d in flat:
            if isinstance(d, Sym):
                parts.append(self.dim(d))
            elif parts and isinstance(parts[-1], list):
                parts[-1].append(d)
            else:
                parts.append([d])
        parts = [_i32(p) if isinstance(p, list) else p for p in parts]
        return self.ctx.ca.concat(np.int32(0), parts) if len(parts) > 1 else parts[0]

    def arange(self, node):
        """``Arange`` of ``n(T)`` elements: ``start + step * range_(0, n(T), 1)`` in its element type."""
        ca, ctx = self.ctx.ca, self.ctx
        start, _, step = node.args
        etype = element_type(node.out_dtypes[0])
        x = ca.range_(np.int32(0), ca.reshape(self.ints(node.out_shapes[0]), _i32([])), np.int32(1))
        x = ctx.cast(x, etype) if etype != INT else x
        if step != 1:
            x = ca.broadcasting_mul(x, ctx.scalar(step, etype))
        if isinstance(start, Sym):
            offset = ca.reshape(self.dim(start), _i32([]))
            return ca.broadcasting_add(x, ctx.cast(offset, etype) if etype != INT else offset)
        return ca.broadcasting_add(x, ctx.scalar(start, etype)) if start != 0 else x

    def check(self, node, model_name: str) -> None:
        """A :class:`~.graph.LoweringError` for a node with symbolic dims the lowering cannot take."""
        symbolic = has_sym([node.args, node.in_shapes, node.out_shapes])
        split_t = node.name == "Split" and isinstance(node.in_shapes[0][node.args[1]], Sym)
        step_t = node.name == "Arange" and isinstance(node.args[2], Sym)
        if (symbolic and node.name not in DYNAMIC) or split_t or step_t:
            raise LoweringError(f"[export_coreai] no dynamic-length lowering for {node.name} {node.args} with shapes "
                                f"{node.in_shapes} -> {node.out_shapes} in {model_name}")

    @staticmethod
    def refine(value, shape, where: str):
        """``value`` typed with the MLX ``shape`` (``?`` at :class:`Sym` dims); a static dim that
        disagrees is a :class:`~.graph.LoweringError`."""
        from coreai._compiler.ir import RankedTensorType, ShapedType

        raw = value._to_mlir()
        t = RankedTensorType(raw.type)
        got = [None if ShapedType.is_dynamic_size(d) else d for d in t.shape]
        wrong = any(g is not None and not isinstance(d, Sym) and g != d for g, d in zip(got, shape))
        if len(got) != len(shape) or wrong:
            raise LoweringError(f"[export_coreai] {where} lowered to shape {tuple(got)}, MLX has {tuple(shape)}")
        raw.set_type(RankedTensorType.get(mlir_dims(shape), t.element_type))
        return value


def _i32(values) -> np.ndarray:
    return np.asarray(values, np.int32).reshape(-1)
