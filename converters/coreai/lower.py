r"""Lower a captured MLX graph to a Core AI graph, primitive by primitive: the driver.

The graph is the one the Core ML backend captures (:func:`~mlx_zeta.converters.coreml.lower.capture`,
``mx.export_function``: one :class:`~mlx_zeta.converters.coreml.graph.Node` per MLX primitive) after
the same backend-neutral passes (transposes absorbed into matmuls, pooling windows folded, gathers
squeezed, broadcast constants unbroadcast, dead nodes pruned); attention is *not* fused, it stays
``Matmul``/``Softmax``/``Matmul`` (the SDPA composite of Core AI is reachable only through a raw MLIR
attribute, outside the versioned authoring API).

:func:`lower_function` emits one ``coreai.graph`` into the active ``coreai.authoring.Module`` through
:data:`~.graph.EMITTERS` (``MLX primitive name -> emitter(ctx, node)``, filled by
:mod:`~mlx_zeta.converters.coreai.ops` with :func:`~.graph.register_emitter`); an unknown primitive is a
:class:`LoweringError` naming it and the model before anything is emitted (the op-coverage guard). The table, the
context and the precision policy live in :mod:`~mlx_zeta.converters.coreai.graph`.

States: ``states={input name: output name}`` marks inputs as mutable buffers (KV caches); an
emitter that writes one (``DynamicSliceUpdate``) stores the new value in ``ctx.state_writes`` and
the driver returns it as that output, which the runtime writes back into the state.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from ..coreml.graph import Graph
from ..coreml.lower import run_passes
from . import ops  # noqa: F401  (importing it registers the emitters)
from .dynamic import Dims, mlir_dims
from .graph import BOOL, EMITTERS, FLOAT, INT, Context, LoweringError, element_type
from .runtime import STATE_ATTR

__all__ = ["lower_function"]


def lower_function(graph: Graph, fn_name: str, *, input_names: Sequence[str], output_names: Sequence[str],
                   states: Optional[Dict[str, str]] = None, weights: str = "float32",
                   compressed: Optional[dict] = None, model_name: str = "model", symbolic: bool = False) -> dict:
    """Emit ``graph`` as the ``coreai.graph`` ``fn_name`` into the active ``coreai.authoring.Module``.

    ``input_names``/``output_names``: the bundle's names for the graph's inputs/outputs.
    ``states``: ``{input name: state name}`` of inputs that are mutable buffers (the state name must
    equal the input name; the function then also returns the buffer's new value under it).
    ``symbolic``: ``graph`` comes from :func:`~.dynamic.symbolic_graph` (passes already run; its
    :class:`~.dynamic.Sym` dims become dynamic, ``?``). Returns ``{"nodes": n, "states": n}``.
    """
    from coreai._compiler.ir import ArrayAttr, DictAttr, RankedTensorType, StringAttr
    from coreai.authoring import Value
    from coreai.authoring.graph_builder import GraphOp

    if not symbolic:
        run_passes(graph, fuse=False)
    unknown = sorted({n.name for n in graph.nodes if n.name not in EMITTERS})
    if unknown:
        raise LoweringError(f"[export_coreai] no Core AI lowering for MLX primitive(s) {', '.join(unknown)} in "
                            f"{model_name}; add one with mlx_zeta.converters.coreai.register_emitter")
    states = dict(states or {})
    ctx = Context(graph, weights, compressed)
    types = [RankedTensorType.get(mlir_dims(shape), _mlir_element(element_type(dtype)))
             for _, shape, dtype in graph.inputs]
    g = GraphOp(fn_name, types, [], input_names=list(input_names))
    with g.block:
        for (name, _, dtype), arg in zip(graph.inputs, g.arguments):
            ctx.vars[name], ctx.types[name] = Value._from_mlir(arg), element_type(dtype)
        ctx.dims = Dims(ctx) if symbolic else None
        _emit(ctx, model_name)
        outputs = {out: _output(ctx, name) for (name, _, _), out in zip(graph.outputs, output_names)}
        by_input = dict(zip(input_names, (n for n, _, _ in graph.inputs)))
        for input_name, state_name in states.items():
            written = ctx.state_writes.get(by_input[input_name])
            if written is None:
                raise LoweringError(f"[export_coreai] state {input_name!r} of {model_name} is never written")
            outputs[state_name] = written._to_mlir()
        g.set_outputs_spec_from_dict(outputs)
    attrs = []
    for name, attr in zip(input_names, list(g.arg_attrs)):
        entries = {a.name: a.attr for a in attr}
        if name in states:
            entries[STATE_ATTR] = StringAttr.get(states[name])
        attrs.append(DictAttr.get(entries))
    g.arg_attrs = ArrayAttr.get(attrs)
    return {"nodes": len(graph.nodes), "states": len(states)}


def _mlir_element(etype: str):
    from coreai._compiler.ir import F32Type, IntegerType

    return {FLOAT: F32Type.get, INT: lambda: IntegerType.get_signed(32), BOOL: lambda: IntegerType.get_signless(1)}[etype]()


def _emit(ctx: Context, model_name: str) -> None:
    """Every node through its emitter; an output of the wrong shape is a :class:`LoweringError`."""
    for node in ctx.graph.nodes:
        if ctx.dims is not None:
            ctx.dims.check(node, model_name)
        outs = EMITTERS[node.name](ctx, node)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for name, value, shape, dtype in zip(node.outputs, outs, node.out_shapes, node.out_dtypes):
            got = getattr(value.type, "shape", None)
            if ctx.dims is not None:
                value = ctx.dims.refine(value, shape, f"{node.name} in {model_name}")
            elif got is not None and tuple(got) != tuple(shape):
                raise LoweringError(f"[export_coreai] {node.name} in {model_name} lowered to shape {tuple(got)}, "
                                    f"MLX has {tuple(shape)}")
            ctx.vars[name], ctx.types[name] = value, element_type(dtype)


def _output(ctx: Context, name: str):
    """A graph output: floats as f32, integers as si32 (booleans as i1)."""
    return ctx.get(name)._to_mlir()
