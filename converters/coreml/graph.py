r"""The data of a Core ML lowering: the captured graph, the emitter table, the lowering context.

Everything the graph passes (:mod:`.passes`), the emitters (:mod:`~mlx_zeta.converters.coreml.ops`) and the driver
(:mod:`~mlx_zeta.converters.coreml.lower`) share lives here, and this module imports none of them:

* :class:`Node` and :class:`Graph`: a captured MLX function (one node per primitive);
* :data:`EMITTERS` and :func:`register_emitter`: the table ``MLX primitive name -> emitter(ctx, node)``;
* :class:`Context`: the state of one lowering (MIL vars by MLX name, constants, precision);
* helpers: :func:`mil_dtype` (MLX dtype string -> MIL dtype), :func:`scalar_const`;
* constants: :data:`MASK_FILL`, :data:`MASK_CLAMP`, :data:`FP16_MAX`, :data:`SHAPE_OPS`, :data:`REDUCE`.

Precision policy (``precision="float16"``), what :class:`Context` and the emitters guarantee:

* Float inputs arrive as fp32 and are cast to fp16 once; float outputs leave as fp32.
* Weights become fp16 consts, or the ``constexpr_`` ops of :mod:`.compress` (ternary 2-bit tables,
  MLX-affine weights, the ``compress`` policy's int8/int4/palettized weights).
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

coremltools is imported inside the methods that build MIL.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["Node", "Graph", "Context", "EMITTERS", "register_emitter", "registrar", "LoweringError", "mil_dtype",
           "scalar_const", "MASK_FILL", "MASK_CLAMP", "FP16_MAX", "SHAPE_OPS", "REDUCE", "FLOAT_DTYPES"]

#: What mask fills (``-inf``, the float32 lowest) become in fp16 programs.
MASK_FILL = -1.0e4
MASK_CLAMP = 3.0e4  # float consts <= -MASK_CLAMP are treated as mask fills
FP16_MAX = 65504.0
SHAPE_OPS = ("Reshape", "Unflatten", "Flatten", "ExpandDims", "Squeeze")
REDUCE = {0: "and", 1: "or", 2: "sum", 3: "prod", 4: "min", 5: "max"}  # mlx Reduce::ReduceType
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # MLX dtype strings computed as MIL floats
_MIL = {"float32": "fp32", "float16": "fp16", "bfloat16": "fp32", "bool": "bool"}


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


def mil_dtype(dtype: str) -> str:
    """MIL dtype (``"fp32"``, ``"fp16"``, ``"bool"``, ``"int32"``) of an MLX dtype string; every
    integer type computes as int32 and bfloat16 as fp32."""
    return _MIL.get(dtype, "int32")


def scalar_const(graph: Graph, name: str, prod: Dict[str, Node]) -> Optional[float]:
    """The value of ``name`` if it is a constant with a single distinct value (through Broadcast),
    else None. ``prod``: ``graph.producers()``."""
    while name in prod and prod[name].name == "Broadcast":
        name = prod[name].inputs[0]
    v = graph.constants.get(name)
    if v is None or v.size == 0 or not np.all(v == v.flat[0]):
        return None
    return float(v.flat[0])


# ----------------------------------------------------------------------------- emitter table
def registrar(table: Dict[str, Callable]) -> Callable:
    """The ``register_emitter(*names)`` decorator of an emitter ``table`` (one per backend: Core ML
    here, Core AI in :mod:`mlx_zeta.converters.coreai.graph`): it stores ``fn`` under each name."""
    def register_emitter(*names: str):
        def deco(fn):
            for n in names:
                table[n] = fn
            return fn
        return deco
    return register_emitter


#: The emitter table ``MLX primitive name -> emitter(ctx, node)``, filled by :func:`register_emitter`.
EMITTERS: Dict[str, Callable] = {}
register_emitter = registrar(EMITTERS)
register_emitter.__doc__ = "Decorator: ``fn(ctx, node) -> Var | list[Var]`` lowers the MLX primitives ``names``."


# ----------------------------------------------------------------------------- lowering context
class Context:
    """State of one lowering: MIL vars by MLX name, constants, precision, ternary weights.

    Args:
        graph (Graph): the graph being lowered (its constants are read lazily, once per dtype).
        precision (str): ``"float16"`` or ``"float32"`` (module docstring).
        compressed (dict): ``{constant name: Compressed}`` (:mod:`.compress`): those constants are
            emitted as the ``constexpr_`` op decoding to them, once per dtype.

    ``state_vars``/``state_dtypes`` map an MLX input name to its MIL state var and that state's
    dtype (set by the driver for state inputs; an emitter writing a cache reads them).
    """

    def __init__(self, graph: Graph, precision: str, compressed: Optional[dict] = None):
        from coremltools.converters.mil.mil import Builder as mb
        self.mb, self.graph = mb, graph
        self.float = {"float16": "fp16", "float32": "fp32"}[precision]
        self.vars: Dict[str, object] = {}
        self.const_derived: set = set()
        self.cache: Dict[Tuple[str, str], object] = {}
        self.compressed = dict(compressed or {})
        self.state_vars: Dict[str, object] = {}
        self.state_dtypes: Dict[str, str] = {}

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
            want = dtype or (self.float if value.dtype.kind == "f" else mil_dtype(str(value.dtype)))
            if (name, want) not in self.cache:
                self.cache[(name, want)] = self.compressed[name].emit(self.mb, want, f"{name}_{want}") \
                    if name in self.compressed and want in ("fp16", "fp32") else self.const(value, want)
            return self.cache[(name, want)]
        var = self.vars[name]
        if dtype is None or self.mb_dtype(var) == dtype:
            return var
        if (name, dtype) not in self.cache:
            val = var.val if name in self.const_derived else None
            self.cache[(name, dtype)] = self.const(val, dtype) if val is not None else \
                self.mb.cast(x=var, dtype=dtype)
        return self.cache[(name, dtype)]

    def floats(self, node: Node, stats: bool = False):
        """Float inputs of ``node`` in one compute dtype (non-float inputs as they are); returns
        ``(vars, compute_dtype, output_dtype)`` per the precision policy in the module docstring."""
        fl = [i for i, d in zip(node.inputs, node.in_dtypes) if d in FLOAT_DTYPES]
        dyn = {self.dtype(i) for i in fl if not self.is_const(i)}
        if not dyn:
            out = compute = "fp32" if all(self.is_const(i) for i in node.inputs) else self.float
        elif stats or "fp32" in dyn:
            compute, out = "fp32", ("fp32" if stats or dyn == {"fp32"} else "fp16")
        else:
            compute = out = "fp16"
        return [self.get(i, compute if i in fl else None) for i in node.inputs], compute, out
