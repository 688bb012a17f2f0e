"""Core AI op coverage: every MLX primitive with a Core AI emitter is exported alone and run by Apple's runtime.

``CASES`` holds one small MLX function per case; each is exported with ``export_coreai`` (float32
weights), run by :class:`~mlx_zeta.converters.coreai.Bundle` (Apple's ``coreai.runtime``) and compared
with MLX on the same inputs: exactly for integer and boolean results, within float32 rounding for
floats. The guard: every name in :data:`~mlx_zeta.converters.coreai.EMITTERS` must appear in the
captured graph of some case (``IDENTITY`` names share the identity emitter of ``StopGradient``), so a
new emitter without a case fails here.
"""

from typing import Callable, NamedTuple, Sequence

import numpy as np
import pytest

from mlx_zeta.converters.coreai import available

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Core AI runtime unavailable: {WHY}")

import mlx_zeta  # noqa: E402,F401  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_zeta.converters.coreai import EMITTERS, Bundle, export_coreai  # noqa: E402
from mlx_zeta.converters.coreml.lower import capture, run_passes  # noqa: E402

RNG = np.random.default_rng(0)
REL = 1e-5
IDENTITY = {"Depends", "Copy", "StopGradient"}  # identities MLX's tracer drops from user code (checked by a stub)


def f(*shape, lo=-2.0, hi=2.0):
    return mx.array(RNG.uniform(lo, hi, shape).astype(np.float32))


class Case(NamedTuple):
    primitive: str
    fn: Callable
    args: Sequence


def _pool(x):
    return nn.MaxPool2d(2, 2)(x)


CASES = [Case(p, fn, args) for p, fn, args in [
    ("Add", lambda a, b: a + b, (f(2, 3, 4), f(3, 1))),
    ("Subtract", lambda a, b: a - b, (f(2, 3), f(3))),
    ("Multiply", lambda a, b: a * b, (f(2, 3), f(2, 1))),
    ("Divide", lambda a, b: a / b, (f(2, 3), f(2, 3, lo=0.5, hi=2.0))),
    ("Maximum", mx.maximum, (f(4, 5), f(5))),
    ("Minimum", mx.minimum, (f(4, 5), f(4, 1))),
    ("Power", mx.power, (f(3, 4, lo=0.1, hi=3.0), f(3, 4))),
    ("Remainder", lambda a, b: a % b, (f(3, 5, lo=-5, hi=5), f(3, 5, lo=0.5, hi=2.0) * mx.array([1, -1, 1, -1, 1.0]))),
    ("Equal", lambda a, b: (mx.round(a) == mx.round(b)), (f(3, 4), f(3, 4))),
    ("NotEqual", lambda a, b: (mx.round(a) != mx.round(b)), (f(3, 4), f(3, 4))),
    ("Greater", lambda a, b: a > b, (f(3, 4), f(4))),
    ("Less", lambda a, b: a < b, (f(3, 4), f(4))),
    ("LessEqual", lambda a, b: mx.round(a) <= mx.round(b), (f(3, 4), f(4))),
    ("GreaterEqual", lambda a, b: mx.round(a) >= mx.round(b), (f(3, 4), f(4))),
    ("LogicalAnd", lambda a, b: mx.logical_and(a > 0, b > 0), (f(3, 4), f(3, 4))),
    ("LogicalOr", lambda a, b: mx.logical_or(a > 0, b > 0), (f(3, 4), f(3, 4))),
    ("BitwiseBinary", lambda a, b: (a > 0) & (b > 0), (f(3, 4), f(3, 4))),
    ("Exp", mx.exp, (f(3, 4),)), ("Log", mx.log, (f(3, 4, lo=0.1, hi=3),)), ("Sin", mx.sin, (f(3, 4),)),
    ("Cos", mx.cos, (f(3, 4),)), ("Tanh", mx.tanh, (f(3, 4),)), ("Erf", mx.erf, (f(3, 4),)),
    ("Abs", mx.abs, (f(3, 4),)), ("Round", mx.round, (mx.array([[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6]]),)),
    ("Sigmoid", mx.sigmoid, (f(3, 4),)), ("Tan", mx.tan, (f(3, 4, lo=-1, hi=1),)),
    ("LogicalNot", lambda a: mx.logical_not(a > 0), (f(3, 4),)), ("Sqrt", mx.sqrt, (f(3, 4, lo=0.1, hi=3),)),
    ("Sqrt", mx.rsqrt, (f(3, 4, lo=0.1, hi=3),)), ("Negative", lambda a: -a, (f(3, 4),)),
    ("Square", mx.square, (f(3, 4),)), ("Floor", mx.floor, (f(3, 4, lo=-3, hi=3),)),
    ("Ceil", mx.ceil, (f(3, 4, lo=-3, hi=3),)), ("Log1p", mx.log1p, (f(3, 4, lo=0, hi=2),)),
    ("Expm1", mx.expm1, (f(3, 4),)),
    ("Select", lambda c, a, b: mx.where(c > 0, a, b), (f(3, 4), f(3, 4), f(4))),
    ("Softmax", lambda a: mx.softmax(a, axis=-1), (f(2, 3, 5),)),
    ("Reduce", lambda a: mx.sum(a, axis=1, keepdims=True) + mx.max(a, axis=1, keepdims=True), (f(3, 4, 5),)),
    ("Reduce", lambda a: mx.prod(a, axis=(0, 2)) - mx.min(a, axis=0).sum(), (f(3, 4, 5, lo=0.5, hi=1.5),)),
    ("Reduce", lambda a: mx.logical_and(mx.all(a > -1, axis=1), mx.any(a > 1.5, axis=1)), (f(3, 4),)),
    ("Matmul", lambda a, b: a @ b, (f(2, 3, 4), f(4, 5))),
    ("Matmul", lambda a, b: a @ b.T, (f(3, 4), f(5, 4))),
    ("AddMM", lambda c, a, b: mx.addmm(c, a, b, alpha=0.5, beta=2.0), (f(5), f(3, 4), f(4, 5))),
    ("Broadcast", lambda a: mx.broadcast_to(a, (2, 3, 4)) * 1.0, (f(3, 1),)),
    ("Full", lambda a: mx.full((2, 3), a) + 0.0, (f(1),)),
    ("Reshape", lambda a: a.reshape(4, 6) * 2, (f(2, 3, 4),)),
    ("Flatten", lambda a: mx.flatten(a, 1, 2) * 2, (f(2, 3, 4),)),
    ("Unflatten", lambda a: mx.unflatten(a, 1, (2, 3)) * 2, (f(2, 6),)),
    ("ExpandDims", lambda a: mx.expand_dims(a, 1) * 2, (f(2, 3),)),
    ("Squeeze", lambda a: mx.squeeze(a, 1) * 2, (f(2, 1, 3),)),
    ("Transpose", lambda a: mx.transpose(a, (2, 0, 1)) * 2, (f(2, 3, 4),)),
    ("AsType", lambda a: (a * 3).astype(mx.int32), (f(3, 4, lo=-3, hi=3),)),
    ("AsType", lambda a: (a > 0).astype(mx.float32) + a.astype(mx.int32).astype(mx.float32), (f(3, 4, lo=-3, hi=3),)),
    ("Slice", lambda a: a[1:, ::2, -3:] * 2, (f(3, 5, 4),)),
    ("Split", lambda a: mx.split(a, [1, 3], axis=1)[1] * 2, (f(2, 5),)),
    ("Concatenate", lambda a, b: mx.concatenate([a, b, a], axis=1), (f(2, 3), f(2, 2))),
    ("Arange", lambda a: a + mx.arange(2, 14, 3).astype(mx.float32), (f(4),)),
    ("Gather", lambda a, i: a[i], (f(6, 3), mx.array([[0, 5], [2, 2]], mx.int32))),
    ("Gather", lambda a, i, j: a[i, :, j], (f(4, 3, 5), mx.array([0, 3, 1], mx.int32), mx.array([4, 0, 2], mx.int32))),
    ("Pad", lambda a: mx.pad(a, ((1, 0), (0, 2)), constant_values=0.5), (f(2, 3),)),
    ("Convolution", lambda x, w: mx.conv2d(x, w, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (f(1, 7, 8, 4), f(6, 3, 3, 4))),
    ("Convolution", lambda x, w: mx.conv2d(x, w, groups=2), (f(1, 5, 5, 4), f(6, 3, 3, 2))),
    ("Convolution", lambda x, w: mx.conv1d(x, w, stride=2, padding=1), (f(2, 9, 3), f(4, 3, 3))),
    ("Convolution", lambda x, w: mx.conv_transpose2d(x, w, stride=2, padding=1), (f(1, 4, 4, 3), f(5, 3, 3, 3))),
    ("MaxPool2d", _pool, (f(1, 8, 6, 3),)),
    ("DynamicSliceUpdate", lambda x, u, p: mx.slice_update(x, u, p, axes=(1,)), (f(2, 8, 3), f(2, 2, 3),
                                                                                 mx.array([5], mx.int32))),
]]


def case_id(case: Case) -> str:
    return f"{case.primitive}-{CASES.index(case)}"


def primitives(case: Case) -> set:
    """The primitives the lowering sees: the captured graph after the shared passes (pooling folded)."""
    graph = capture(case.fn, *case.args)
    run_passes(graph, fuse=False)
    return {n.name for n in graph.nodes}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_op_runs_like_mlx(case, tmp_path):
    assert case.primitive in primitives(case), f"{case.primitive} is not traced by its case"
    ref = case.fn(*case.args)
    path = export_coreai(case.fn, case.args, tmp_path / "op.aimodel", weights="float32")
    with Bundle(path) as bundle:
        got = bundle("main", {f"input_{i}": np.array(a) for i, a in enumerate(case.args)})["output_0"]
    ref = np.array(ref)
    assert got.shape == ref.shape
    if ref.dtype.kind in "biu":
        np.testing.assert_array_equal(got, ref)
    else:
        scale = max(float(np.abs(ref).max()), 1e-30)
        assert float(np.abs(got - ref).max()) <= REL * scale, (got, ref)


def test_identity_emitters_return_their_first_input():
    from mlx_zeta.converters.coreml.graph import Node

    class Stub:
        def get(self, name):
            return f"value of {name}"

    for name in IDENTITY:
        node = Node(name, [], ["x", "y"], ["z"], [(2,), (2,)], [(2,)], ["float32"] * 2, ["float32"])
        assert EMITTERS[name](Stub(), node) == "value of x", name


def test_every_emitter_has_a_case():
    covered = {c.primitive for c in CASES}
    missing = sorted(set(EMITTERS) - covered - IDENTITY)
    assert not missing, f"Core AI emitters without a case in CASES: {missing}"
