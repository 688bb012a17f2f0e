r"""The data of a Core AI lowering: the emitter table, the lowering context, the element types.

Everything the emitters (:mod:`~mlx_zeta.converters.coreai.ops`) and the driver
(:mod:`~mlx_zeta.converters.coreai.lower`) share lives here: :data:`EMITTERS` and :func:`register_emitter` (``MLX
primitive name -> emitter(ctx, node)``), :class:`Context` (Core AI values by MLX name, constants, compressed weights,
state writes) and :func:`element_type`.

Precision: every value is computed in float32 (``f32``), integers in ``si32``, booleans in ``i1``. Float matrices
(constants of rank >= 2) are stored in ``weights`` (``"float16"`` or ``"float32"``) and cast to float32 where read;
vectors and scalars (norm scales, biases, rotary frequencies) stay float32. Compressed weights
(:class:`~mlx_zeta.converters.coreml.compress.Compressed`) are emitted by :mod:`~mlx_zeta.converters.coreai.weights`
and decode to float32. Core AI's CPU runtime on Linux accumulates fp16 matmuls in fp16, so fp32 compute is what the
checks run; a device may still choose its own precision.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from ..coreml.graph import Graph, LoweringError, registrar
from .weights import emit_compressed, emit_float16

__all__ = ["EMITTERS", "register_emitter", "Context", "LoweringError", "element_type", "FLOAT", "INT", "BOOL"]

FLOAT, INT, BOOL = "f32", "si32", "i1"  # the three element types values are computed in
NUMPY = {FLOAT: np.float32, INT: np.int32, BOOL: np.bool_}  # their numpy dtypes (constants, scalar operands)
#: The emitter table ``MLX primitive name -> emitter(ctx, node)``, filled by :func:`register_emitter`.
EMITTERS: Dict[str, Callable] = {}
register_emitter = registrar(EMITTERS)
register_emitter.__doc__ = "Decorator: ``fn(ctx, node) -> Value | list[Value]`` lowers the MLX primitives ``names``."


def element_type(mlx_dtype: str) -> str:
    """The element type an MLX dtype string is computed in: floats ``f32``, ``bool`` ``i1``, integers ``si32``."""
    if mlx_dtype.startswith(("float", "bfloat")):
        return FLOAT
    return BOOL if mlx_dtype == "bool" else INT


class Context:
    """State of one lowering: Core AI values by MLX name, constants, compressed weights, state writes.

    Args:
        graph (Graph): the graph being lowered.
        weights (str): storage of float matrices, ``"float16"`` or ``"float32"``.
        compressed (dict): ``{constant name: Compressed}``, emitted by :mod:`~mlx_zeta.converters.coreai.weights`.
    """

    def __init__(self, graph: Graph, weights: str = "float32", compressed: Optional[dict] = None):
        import coreai.authoring as ca

        self.ca, self.graph = ca, graph
        self.weights = weights
        self.compressed = dict(compressed or {})
        self.vars: Dict[str, object] = {}
        self.types: Dict[str, str] = {}
        self.state_writes: Dict[str, object] = {}
        self.graph_inputs = {name for name, _, _ in graph.inputs}
        self.dims = None  # a dynamic.Dims when the graph has symbolic dims (set by the driver)

    def const(self, value, etype: Optional[str] = None):
        """A ``coreai.constant`` of ``value`` in ``etype`` (default: from its numpy dtype)."""
        from coreai.authoring.constant import constant

        value = np.asarray(value)
        etype = etype or element_type(str(value.dtype))
        return constant(np.array(value, NUMPY[etype], order="C"))  # not np.ascontiguousarray: it makes a scalar (1,)

    def ints(self, values):
        """A 1-D int32 operand (shapes, axes, starts), passed as an array so that ops whose result
        shape depends on it (reshape, broadcast_to, slice) get a static result type; built at run
        time when it holds a symbolic dim (:mod:`.dynamic`)."""
        if self.dims is not None:
            return self.dims.ints(values)
        return np.asarray(values, np.int32).reshape(-1)

    def reshape(self, x, shape):
        """``x`` reshaped to ``shape`` (typed with ``?`` at symbolic dims, :mod:`.dynamic`)."""
        return self._typed(self.ca.reshape(x, self.ints(shape)), shape)

    def broadcast_to(self, x, shape):
        """``x`` broadcast to ``shape`` (typed with ``?`` at symbolic dims, :mod:`.dynamic`)."""
        return self._typed(self.ca.broadcast_to(x, self.ints(shape)), shape)

    def _typed(self, value, shape):
        return value if self.dims is None else self.dims.refine(value, shape, "an intermediate value")

    @staticmethod
    def scalar(value, etype: str = INT) -> np.ndarray:
        return np.asarray(value, NUMPY[etype]).reshape(())

    def is_const(self, name: str) -> bool:
        return name in self.graph.constants and name not in self.vars

    def get(self, name: str):
        """The Core AI value of the MLX value ``name`` (a graph constant is emitted on first use)."""
        if name not in self.vars:
            self.vars[name], self.types[name] = self._constant(name)
        return self.vars[name]

    def etype(self, name: str) -> str:
        self.get(name)
        return self.types[name]

    def _constant(self, name: str):
        value = self.graph.constants[name]
        if name in self.compressed:
            return emit_compressed(self.ca, self.compressed[name], self.weights), FLOAT
        etype = element_type(str(value.dtype))
        if etype == FLOAT and value.ndim >= 2 and self.weights == "float16":
            return emit_float16(self.ca, value), FLOAT
        return self.const(value, etype), etype

    def cast(self, value, etype: str):
        dtype = {FLOAT: self.ca.float32, INT: self.ca.int32, BOOL: self.ca.bool_}[etype]
        return self.ca.cast(value, dtype)

    def get_as(self, name: str, etype: str):
        """``name`` in element type ``etype`` (cast when it is computed in another)."""
        v = self.get(name)
        return v if self.types[name] == etype else self.cast(v, etype)


