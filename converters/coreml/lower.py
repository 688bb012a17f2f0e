r"""Lower a captured MLX graph to a Core ML MIL program, primitive by primitive.

:func:`capture` runs ``mx.export_function`` with a callback and returns a :class:`Graph`
(inputs, outputs, constants, and one :class:`Node` per primitive in topological order).
:func:`lower_graph` rewrites it (:func:`fuse_attention`, dead-node removal) and emits every
live node through :data:`EMITTERS`, a table ``MLX primitive name -> emitter(ctx, node)`` whose
entries live in :mod:`.ops` (imported at the end of this module).

Extending: ``register_emitter("Name")`` decorates ``fn(ctx, node) -> Var | list[Var]``; read
inputs with ``ctx.get(name, dtype)`` or ``ctx.floats(node)`` (which applies the precision
policy below), and return one MIL var per MLX output, of the MLX output's shape. State inputs
(a KV cache) can be passed to :func:`lower_graph` as ``states={input_name: mb.StateTensorSpec(...)}``
(``input_name`` as in ``input_names``): those inputs become state placeholders, are read once with
``mb.read_state``, and an emitter (e.g. for a cache-update primitive) writes them with
``mb.coreml_update_state(state=ctx.state_vars[mlx_name], value=...)`` (in ``ctx.state_dtypes[mlx_name]``)
and later ops read that op's output; ``DynamicSliceUpdate`` (``mx.slice_update`` at an array
position, :class:`~mlx_zeta.nn.StaticKVCache`) does so.

Precision policy (``precision="float16"``), what each pass guarantees:

* Float inputs arrive as fp32 and are cast to fp16 once; float outputs leave as fp32.
* Weights become fp16 consts (``constexpr_lut_to_dense`` for registered ternary weights).
* Compile-time subgraphs (every input a constant: rotary tables, causal masks, ``W.T``) are
  computed in fp32 and turned into fp16 consts where a fp16 op reads them, so e.g.
  ``cos(4095 * f)`` is not evaluated in fp16.
* Statistics stay in fp32: ``Square`` and ``Reduce`` sum/prod cast their input up, so the
  sums of RMSNorm/LayerNorm cannot overflow; an op mixing fp32 and fp16 operands computes in
  fp32 and casts its result to fp16 (so ``x * rsqrt(var)`` does not round ``rsqrt`` first).
* No fp16 const is ``-inf`` or float32's lowest: float consts at or below ``-MASK_CLAMP``
  (``-inf``, ``finfo.min`` mask fills) become ``MASK_FILL = -1e4`` and ``+inf``/values above
  fp16's max become 65504 (fills only; ``-1e4`` + any score stays finite and ``exp`` of it is 0).
* Softmax is MIL ``softmax`` (max-subtracted) or the fused ``scaled_dot_product_attention``.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Node", "Graph", "EMITTERS", "register_emitter", "capture", "fuse_attention", "lower_graph",
           "MASK_FILL", "LoweringError"]

MASK_FILL = -1.0e4  # what mask fills (-inf, float32 lowest) become in fp16 programs
MASK_CLAMP = 3.0e4  # float consts <= -MASK_CLAMP are treated as mask fills
FP16_MAX = 65504.0
SHAPE_OPS = ("Reshape", "Unflatten", "Flatten", "ExpandDims", "Squeeze")
REDUCE = {0: "and", 1: "or", 2: "sum", 3: "prod", 4: "min", 5: "max"}  # mlx Reduce::ReduceType


class LoweringError(ValueError):
    """A graph the lowering cannot express (unknown primitive, unsupported arguments)."""


@dataclass
class Node:
    """One MLX primitive: ``name`` ("Matmul"), ``args`` (its arguments), input/output names,
    shapes and dtypes (dtype strings such as ``"float32"``)."""
    name: str
    args: list
    inputs: List[str]
    outputs: List[str]
    in_shapes: List[tuple]
    out_shapes: List[tuple]
    in_dtypes: List[str]
    out_dtypes: List[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    """A captured function: ``inputs``/``outputs`` as ``(name, shape, dtype)``, ``constants``
    ``{name: np.ndarray}`` (weights and scalars the function closes over), ``nodes``."""
    inputs: list
    outputs: list
    constants: Dict[str, np.ndarray]
    nodes: List[Node]

    def producers(self) -> Dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> Dict[str, int]:
        count: Dict[str, int] = {}
        for n in self.nodes:
            for i in n.inputs:
                count[i] = count.get(i, 0) + 1
        for o in self.outputs:
            count[o[0]] = count.get(o[0], 0) + 1
        return count


def _dt(d) -> str:
    return str(d).rsplit(".", 1)[-1]


def capture(fn: Callable, *args) -> Graph:
    """Trace ``fn(*args)`` with ``mx.export_function`` into a :class:`Graph` (arrays only)."""
    import mlx.core as mx

    ev: dict = {"nodes": [], "constants": {}}

    def callback(e):
        kind = e["type"]
        if kind == "primitive":
            ins, outs = e["inputs"], e["outputs"]
            ev["nodes"].append(Node(e["name"], list(e["arguments"]), [i[0] for i in ins], [o[0] for o in outs],
                                    [tuple(i[1]) for i in ins], [tuple(o[1]) for o in outs],
                                    [_dt(i[2]) for i in ins], [_dt(o[2]) for o in outs]))
        elif kind == "constants":
            for name, a in e["constants"]:
                a = a.astype(mx.float32) if a.dtype == mx.bfloat16 else a
                ev["constants"][name] = np.array(a)
        elif kind in ("inputs", "outputs"):
            ev[kind] = [(n, tuple(s), _dt(d)) for n, s, d in e[kind]]
        elif kind == "keyword_inputs" and e.get("keywords"):
            raise LoweringError("keyword inputs are not supported; pass the arrays positionally")

    mx.export_function(callback, fn, *args)
    return Graph(ev["inputs"], ev["outputs"], ev["constants"], ev["nodes"])


# ----------------------------------------------------------------------------- lowering context
_MIL = {"float32": "fp32", "float16": "fp16", "bfloat16": "fp32", "bool": "bool"}


def _mil_dtype(dtype: str) -> str:
    return _MIL.get(dtype, "int32")  # every integer type computes as int32


class Context:
    """State of one lowering: MIL vars by MLX name, constants, precision, ternary weights."""

    def __init__(self, graph: Graph, precision: str, lut_weights: Sequence = ()):
        from coremltools.converters.mil.mil import Builder as mb
        self.mb, self.graph = mb, graph
        self.float = {"float16": "fp16", "float32": "fp32"}[precision]
        self.vars: Dict[str, object] = {}
        self.const_derived: set = set()
        self.cache: Dict[Tuple[str, str], object] = {}
        self.lut = {}  # constant name -> (codes uint8 (out, in) in {0,1,2}, scale)
        self.state_vars: Dict[str, object] = {}  # MLX input name -> MIL state var (see module docstring)
        self.state_dtypes: Dict[str, str] = {}  # MLX input name -> MIL dtype of its state
        for name, value in graph.constants.items():
            for w, codes, s in lut_weights:
                if w.shape == value.shape and np.array_equal(w, value):
                    self.lut[name] = (codes, s)

    # -------------------------------------------------------------- reading values
    def is_const(self, name: str) -> bool:
        return name in self.graph.constants or name in self.const_derived

    def dtype(self, name: str) -> Optional[str]:
        """MIL dtype of a value; None for a graph constant (it adapts to its reader)."""
        if name in self.graph.constants and name not in self.vars:
            return None
        return self.mb_dtype(self.vars[name])

    @staticmethod
    def mb_dtype(var) -> str:
        from coremltools.converters.mil.mil import types
        return types.builtin_to_string(var.dtype)

    def const(self, value: np.ndarray, dtype: str):
        """A MIL const of ``value`` in ``dtype``; fp16 consts are clamped (module docstring)."""
        value = np.asarray(value)
        if value.dtype.kind == "f" and (dtype == "fp16" or self.float == "fp16"):
            value = np.where(value <= -MASK_CLAMP, MASK_FILL, value)  # mask fills, in fp32 islands too
            value = np.minimum(value, FP16_MAX) if dtype == "fp16" else value
        npd = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}[dtype]
        return self.mb.const(val=value.astype(npd))

    def get(self, name: str, dtype: Optional[str] = None):
        """The MIL var of ``name``, cast to ``dtype`` (fp16 from a compile-time value: a clamped const)."""
        if name in self.graph.constants and name not in self.vars:
            value = self.graph.constants[name]
            want = dtype or (self.float if value.dtype.kind == "f" else _mil_dtype(str(value.dtype)))
            if (name, want) not in self.cache:
                self.cache[(name, want)] = self._lut(name, want) if name in self.lut else self.const(value, want)
            return self.cache[(name, want)]
        var = self.vars[name]
        if dtype is None or self.mb_dtype(var) == dtype:
            return var
        if (name, dtype) not in self.cache:
            val = var.val if name in self.const_derived else None
            self.cache[(name, dtype)] = self.const(val, dtype) if val is not None else \
                self.mb.cast(x=var, dtype=dtype)
        return self.cache[(name, dtype)]

    def _lut(self, name: str, dtype: str):
        from coremltools.converters.mil.mil import types
        codes, s = self.lut[name]
        lut = np.array([-s, 0.0, s, 0.0], dtype={"fp16": np.float16, "fp32": np.float32}[dtype])
        return self.mb.constexpr_lut_to_dense(indices=codes.astype(types.np_uint2_dtype),
                                              lut=lut.reshape(1, 1, 4, 1), name=f"ternary_{name}")

    def floats(self, node: Node, stats: bool = False):
        """Float inputs of ``node`` in one compute dtype (non-float inputs as they are); returns
        ``(vars, compute_dtype, output_dtype)`` per the precision policy in the module docstring."""
        fl = [i for i, d in zip(node.inputs, node.in_dtypes) if d in _MIL and d != "bool"]
        dyn = {self.dtype(i) for i in fl if not self.is_const(i)}
        if not dyn:
            out = compute = "fp32" if all(self.is_const(i) for i in node.inputs) else self.float
        elif stats or "fp32" in dyn:
            compute, out = "fp32", ("fp32" if stats or dyn == {"fp32"} else "fp16")
        else:
            compute = out = "fp16"
        return [self.get(i, compute if i in fl else None) for i in node.inputs], compute, out


# ----------------------------------------------------------------------------- emitters
EMITTERS: Dict[str, Callable] = {}


def register_emitter(*names: str):
    """Decorator: ``fn(ctx, node) -> Var | list[Var]`` lowers the MLX primitives ``names``."""
    def deco(fn):
        for n in names:
            EMITTERS[n] = fn
        return fn
    return deco


# ----------------------------------------------------------------------------- driver
def lower_graph(graph: Graph, precision: str = "float16", lut_weights: Sequence = (), input_names=None,
                output_names=None, model_name: str = "model", fuse: bool = True, opset=None, states=None,
                channels_first: Sequence[int] = ()):
    """:class:`Graph` -> (coremltools ``Program`` with function ``main``, stats dict).

    ``lut_weights``: ``(dense float32 (out, in), codes uint8 (out, in), scale)`` triples; a graph
    constant equal to a dense matrix becomes ``constexpr_lut_to_dense``. ``channels_first``:
    indices of 4-D NHWC inputs given to Core ML as NCHW (image inputs), transposed inside.
    Raises :class:`LoweringError` naming the primitive and ``model_name`` for unknown primitives.
    """
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, Function, Program, types

    stats = {"fused_attention": fuse_attention(graph) if fuse else 0}
    absorb_transposes(graph)
    stats["max_pools"] = fold_pooling_windows(graph)
    squeeze_gathers(graph)
    unbroadcast_constants(graph)
    prune(graph)
    unknown = sorted({n.name for n in graph.nodes if n.name not in EMITTERS})
    if unknown:
        raise LoweringError(f"[export_coreml] no Core ML lowering for MLX primitive(s) {', '.join(unknown)} in "
                            f"{model_name}; add one with mlx_zeta.converters.coreml.register_emitter")
    names = list(input_names or [f"input_{i}" for i in range(len(graph.inputs))])
    specs = {}
    for i, (name, shape, dtype) in enumerate(graph.inputs):
        shape = [shape[0], shape[3], shape[1], shape[2]] if i in channels_first else list(shape)
        if names[i] in (states or {}):
            specs[names[i]] = states[names[i]]
            continue
        specs[names[i]] = mb.TensorSpec(shape=shape, dtype=types.fp32 if _mil_dtype(dtype).startswith("fp")
                                        else types.int32)  # Core ML has no bool inputs
    with Function(specs, opset_version=opset or ct.target.iOS18) as func:
        ctx = Context(graph, precision, lut_weights)
        for i, (name, shape, dtype) in enumerate(graph.inputs):
            var = func.inputs[names[i]]
            if names[i] in (states or {}):
                ctx.state_vars[name] = var
                var = mb.read_state(input=var)
                ctx.state_dtypes[name] = ctx.mb_dtype(var)
            if i in channels_first:
                var = mb.transpose(x=var, perm=[0, 2, 3, 1])
            want = _mil_dtype(dtype)
            want = ctx.float if want in ("fp16", "fp32") else want
            ctx.vars[name] = var if ctx.mb_dtype(var) == want else mb.cast(x=var, dtype=want)
        for node in graph.nodes:
            outs = EMITTERS[node.name](ctx, node)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for name, var, shape in zip(node.outputs, outs, node.out_shapes):
                if tuple(var.shape) != tuple(shape):
                    raise LoweringError(f"[export_coreml] {node.name} in {model_name} lowered to shape "
                                        f"{tuple(var.shape)}, MLX has {tuple(shape)}")
                ctx.vars[name] = var
            if all(ctx.is_const(i) for i in node.inputs):
                ctx.const_derived.update(node.outputs)
        results = []
        for j, (name, shape, dtype) in enumerate(graph.outputs):
            var = ctx.get(name)
            want = "fp32" if ctx.mb_dtype(var) in ("fp16", "fp32") else "int32"
            oname = (output_names or [f"output_{k}" for k in range(len(graph.outputs))])[j]
            results.append(mb.cast(x=var, dtype=want, name=oname) if ctx.mb_dtype(var) != want
                           else mb.identity(x=var, name=oname))
        func.set_outputs(results)
    prog = Program()
    prog.add_function("main", func)
    stats["nodes"] = len(graph.nodes)
    return prog, stats


from .passes import absorb_transposes, fold_pooling_windows, fuse_attention, prune, squeeze_gathers  # noqa: E402
from .passes import unbroadcast_constants  # noqa: E402
from . import ops  # noqa: E402,F401  (registers the emitters into EMITTERS)
