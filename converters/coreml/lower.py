r"""Lower a captured MLX graph to a Core ML MIL program, primitive by primitive: the driver.

:func:`capture` runs ``mx.export_function`` with a callback and returns a :class:`~.graph.Graph` (inputs, outputs,
constants, and one :class:`~.graph.Node` per primitive in topological order). :func:`lower_graph` rewrites it with the
passes of :mod:`.passes` (attention fusion, pooling, dead-node removal) and emits every live node through
:data:`~.graph.EMITTERS`, a table ``MLX primitive name -> emitter(ctx, node)`` whose entries live in
:mod:`~mlx_zeta.converters.coreml.ops` (imported here, which registers them). The module layout has no cycle:
:mod:`~mlx_zeta.converters.coreml.graph` (types, table, context) <- :mod:`.passes`,
:mod:`~mlx_zeta.converters.coreml.ops` <- this driver.

Extending: ``register_emitter("Name")`` decorates ``fn(ctx, node) -> Var | list[Var]``; read inputs with
``ctx.get(name, dtype)`` or ``ctx.floats(node)`` (which applies the precision policy of
:mod:`~mlx_zeta.converters.coreml.graph`), and return one MIL var per MLX output, of the MLX output's shape. State
inputs (a KV cache) can be passed to :func:`lower_graph` as ``states={input_name: mb.StateTensorSpec(...)}``
(``input_name`` as in ``input_names``): those inputs become state placeholders, are read once with ``mb.read_state``,
and an emitter (e.g. for a cache-update primitive) writes them with
``mb.coreml_update_state(state=ctx.state_vars[mlx_name], value=...)`` (in ``ctx.state_dtypes[mlx_name]``) and later
ops read that op's output; ``DynamicSliceUpdate`` (``mx.slice_update`` at an array position,
:class:`~mlx_zeta.nn.StaticKVCache`) does so.

The graph types, :data:`~.graph.EMITTERS`, :func:`~.graph.register_emitter` and the constants
(``MASK_FILL``, ...) are re-exported here for ``from ...coreml.lower import ...`` users.
"""

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from . import ops  # noqa: F401  (importing it registers the emitters into EMITTERS)
from .graph import (EMITTERS, FP16_MAX, MASK_CLAMP, MASK_FILL, REDUCE, SHAPE_OPS, Context, Graph, LoweringError,
                    Node, mil_dtype, register_emitter)
from .passes import (absorb_transposes, fold_pooling_windows, fuse_attention, prune, squeeze_gathers,
                     unbroadcast_constants)

__all__ = ["Node", "Graph", "Context", "EMITTERS", "register_emitter", "capture", "fuse_attention", "lower_graph",
           "run_passes", "MASK_FILL", "MASK_CLAMP", "FP16_MAX", "SHAPE_OPS", "REDUCE", "LoweringError"]


def _dt(d) -> str:
    return str(d).rsplit(".", 1)[-1]


def capture(fn: Callable, *args) -> Graph:
    """Trace ``fn(*args)`` with ``mx.export_function`` into a :class:`~.graph.Graph` (arrays only)."""
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


def run_passes(graph: Graph, fuse: bool = True) -> Dict[str, int]:
    """The graph rewrites of :mod:`.passes`, in order, in place; returns
    ``{"fused_attention": n, "max_pools": n}``."""
    stats = {"fused_attention": fuse_attention(graph) if fuse else 0}
    absorb_transposes(graph)
    stats["max_pools"] = fold_pooling_windows(graph)
    squeeze_gathers(graph)
    unbroadcast_constants(graph)
    prune(graph)
    return stats


def lower_graph(graph: Graph, precision: str = "float16", compressed: Optional[dict] = None, input_names=None,
                output_names=None, model_name: str = "model", fuse: bool = True, opset=None, states=None,
                channels_first: Sequence[int] = ()):
    """:class:`~.graph.Graph` -> (coremltools ``Program`` with function ``main``, stats dict).

    ``compressed``: ``{constant name: Compressed}`` (:mod:`.compress`), constants emitted as the
    ``constexpr_`` op decoding to them. ``channels_first``:
    indices of 4-D NHWC inputs given to Core ML as NCHW (image inputs), transposed inside.
    Raises :class:`~.graph.LoweringError` naming the primitive and ``model_name`` for unknown primitives.
    """
    import coremltools as ct
    from coremltools.converters.mil.mil import Function, Program

    stats = run_passes(graph, fuse)
    unknown = sorted({n.name for n in graph.nodes if n.name not in EMITTERS})
    if unknown:
        raise LoweringError(f"[export_coreml] no Core ML lowering for MLX primitive(s) {', '.join(unknown)} in "
                            f"{model_name}; add one with mlx_zeta.converters.coreml.register_emitter")
    names = list(input_names or [f"input_{i}" for i in range(len(graph.inputs))])
    states = states or {}
    specs = _input_specs(graph, names, states, channels_first)
    with Function(specs, opset_version=opset or ct.target.iOS18) as func:
        ctx = Context(graph, precision, compressed)
        _bind_inputs(ctx, func, names, states, channels_first)
        _emit(ctx, model_name)
        oname = list(output_names or [f"output_{k}" for k in range(len(graph.outputs))])
        func.set_outputs(_outputs(ctx, oname))
    prog = Program()
    prog.add_function("main", func)
    stats["nodes"] = len(graph.nodes)
    return prog, stats


def _input_specs(graph: Graph, names: list, states: dict, channels_first: Sequence[int]) -> dict:
    """MIL input specs by Core ML name: states as given, floats as fp32, the rest int32."""
    from coremltools.converters.mil.mil import Builder as mb, types

    specs = {}
    for i, (name, shape, dtype) in enumerate(graph.inputs):
        shape = [shape[0], shape[3], shape[1], shape[2]] if i in channels_first else list(shape)
        if names[i] in states:
            specs[names[i]] = states[names[i]]
            continue
        specs[names[i]] = mb.TensorSpec(shape=shape, dtype=types.fp32 if mil_dtype(dtype).startswith("fp")
                                        else types.int32)  # Core ML has no bool inputs
    return specs


def _bind_inputs(ctx: Context, func, names: list, states: dict, channels_first: Sequence[int]) -> None:
    """Give each MLX input its MIL var: states read once, NCHW images transposed, casts to the
    compute dtype."""
    mb = ctx.mb
    for i, (name, shape, dtype) in enumerate(ctx.graph.inputs):
        var = func.inputs[names[i]]
        if names[i] in states:
            ctx.state_vars[name] = var
            var = mb.read_state(input=var)
            ctx.state_dtypes[name] = ctx.mb_dtype(var)
        if i in channels_first:
            var = mb.transpose(x=var, perm=[0, 2, 3, 1])
        want = mil_dtype(dtype)
        want = ctx.float if want in ("fp16", "fp32") else want
        ctx.vars[name] = var if ctx.mb_dtype(var) == want else mb.cast(x=var, dtype=want)


def _emit(ctx: Context, model_name: str) -> None:
    """Every node through its emitter; an output of the wrong shape is a :class:`~.graph.LoweringError`."""
    for node in ctx.graph.nodes:
        outs = EMITTERS[node.name](ctx, node)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for name, var, shape in zip(node.outputs, outs, node.out_shapes):
            if tuple(var.shape) != tuple(shape):
                raise LoweringError(f"[export_coreml] {node.name} in {model_name} lowered to shape "
                                    f"{tuple(var.shape)}, MLX has {tuple(shape)}")
            ctx.vars[name] = var
        if all(ctx.is_const(i) for i in node.inputs):
            ctx.const_derived.update(node.outputs)


def _outputs(ctx: Context, names: list) -> list:
    """The graph outputs named ``names``: floats as fp32, the rest int32."""
    results = []
    for j, (name, shape, dtype) in enumerate(ctx.graph.outputs):
        var = ctx.get(name)
        want = "fp32" if ctx.mb_dtype(var) in ("fp16", "fp32") else "int32"
        results.append(ctx.mb.cast(x=var, dtype=want, name=names[j]) if ctx.mb_dtype(var) != want
                       else ctx.mb.identity(x=var, name=names[j]))
    return results
