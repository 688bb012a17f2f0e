"""fp16 hazard lint for Core ML ML Programs.

``lint(package_or_program)`` walks every function of a saved ``.mlpackage``
(or MIL ``Program``/``MLModel``) and returns :class:`Finding` records for patterns that
are harmless in float32 but break when the GPU/ANE runs them in fp16
(largest finite fp16 value: 65504):

``nonfinite-constant``
    a float constant (``const`` or a materialized ``constexpr_`` op) holding
    NaN or ±inf; an ``-inf`` additive mask turns a fully masked softmax row
    into NaN and ``inf * 0`` into NaN.
``fp16-range-constant``
    a float32 constant beyond fp16's range (for example ``float32.min`` as a
    mask) that feeds fp16 ops or a cast to fp16: it becomes ±inf; or an fp16
    constant at or near ±65504 used as a mask: adding any further negative
    value overflows to -inf.
``inf-fill``
    ``fill``/``fill_like`` with an infinite value.
``fp16-square-unscaled``
    ``reduce_sum_square`` on fp16, or ``square``/``pow(x, 2)``/``mul(x, x)``
    in fp16 feeding a reduction (the RMSNorm/LayerNorm variance) where ``x``
    is neither scaled by a constant first nor cast to fp32: activations above
    ~256 square past 65504.
``fp16-exp-unshifted``
    ``exp`` in fp16 feeding a ``reduce_sum`` (a hand-written softmax) whose
    input is not ``x - max(x)``: logits above ~11.1 overflow.

Each finding names the function, the op, its type and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .evaluate import IMPLEMENTED_OPS, load_program

__all__ = ["Finding", "lint", "FP16_MAX"]

FP16_MAX = 65504.0
_NEAR_FP16_MAX = 0.5 * FP16_MAX
_SHAPE_ONLY = {"squeeze", "expand_dims", "reshape", "identity", "transpose", "cast", "tile"}
_REDUCE = {"reduce_sum", "reduce_mean", "reduce_l2_norm", "reduce_sum_square"}


@dataclass(frozen=True)
class Finding:
    """One hazard: ``code`` (rule id), the op's ``op_name``/``op_type``, the
    ``function`` it lies in, a human-readable ``message`` and ``severity``
    (``"error"`` for NaN constants, ``"warning"`` otherwise)."""

    code: str
    op_name: str
    op_type: str
    function: str
    message: str
    severity: str = "warning"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code}: {self.function}/{self.op_name} ({self.op_type}): {self.message}"


def _ops(block) -> Iterator:
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _ops(b)


def _is_fp16(var) -> bool:
    from coremltools.converters.mil.mil import types

    return getattr(var, "dtype", None) == types.fp16


def _const_value(op):
    """Float value of a ``const``/``constexpr_`` op, else None."""
    if op.op_type == "const":
        val = op.outputs[0].val
    elif op.op_type in IMPLEMENTED_OPS and op.op_type.startswith("constexpr_"):
        try:
            val = IMPLEMENTED_OPS[op.op_type]({k: v.val for k, v in op.inputs.items()}, op.outputs)
        except Exception:  # malformed constexpr: not this lint's business
            return None
    else:
        return None
    if isinstance(val, (np.ndarray, np.generic, float)) and np.asarray(val).dtype.kind == "f":
        return np.asarray(val)
    return None


def _producer(var, skip_shape_ops=True):
    op = var.op
    while skip_shape_ops and op is not None and op.op_type in _SHAPE_ONLY and op.op_type != "cast":
        first = next(iter(op.inputs.values()))
        op = first.op if not isinstance(first, (list, tuple)) else None
    return op


def _feeds_fp16(var) -> bool:
    for child in var.child_ops:
        if child.op_type == "cast" and child.inputs["dtype"].val == "fp16":
            return True
        if any(_is_fp16(o) for o in child.outputs):
            return True
    return False


def _is_scaled(var) -> bool:
    """True if ``var`` comes from a multiplication/division by a constant."""
    op = _producer(var)
    if op is None or op.op_type not in ("mul", "real_div"):
        return False
    return any(v.val is not None for v in op.inputs.values())


def _is_max_shifted(var) -> bool:
    """True if ``var`` is ``x - m`` with ``m`` from a max reduction, or clipped from above."""
    op = _producer(var)
    if op is None:
        return False
    if op.op_type in ("clip", "minimum"):
        return True
    if op.op_type != "sub":
        return False
    m = _producer(op.inputs["y"])
    return m is not None and m.op_type in ("reduce_max", "maximum")


def _check_const(fn, op, val) -> list[Finding]:
    out = []
    args = (op.name, op.op_type, fn)
    if np.isnan(val).any():
        out.append(Finding("nonfinite-constant", *args, "constant holds NaN", "error"))
    if np.isinf(val).any():
        sign = "-inf" if (val == -np.inf).any() else "inf"
        users = sorted({c.op_type for c in op.outputs[0].child_ops})
        out.append(Finding(
            "nonfinite-constant", *args,
            f"constant holds {sign} (used by {users}); as an additive mask a fully masked row "
            "gives NaN in softmax and inf*0 gives NaN - use a large finite value (e.g. -1e4 in fp16)",
        ))
    finite = np.abs(val[np.isfinite(val)]) if val.size else val
    peak = float(finite.max()) if finite.size else 0.0
    var = op.outputs[0]
    if not _is_fp16(var) and peak > FP16_MAX and (_feeds_fp16(var) or peak >= 1e38):
        out.append(Finding(
            "fp16-range-constant", *args,
            f"float32 constant with |value| up to {peak:.3g} (fp16 max {FP16_MAX:g}); it becomes ±inf "
            "when cast to fp16 (compute_precision=fp16 or a cast op)",
        ))
    elif _is_fp16(var) and peak >= _NEAR_FP16_MAX and var.child_ops:
        out.append(Finding(
            "fp16-range-constant", *args,
            f"fp16 constant with |value| {peak:g} near the fp16 limit {FP16_MAX:g}; used as a mask, "
            "adding any further negative value overflows to -inf",
        ))
    return out


def _check_op(fn, op) -> list[Finding]:
    args = (op.name, op.op_type, fn)
    t = op.op_type
    if t in ("fill", "fill_like"):
        value = op.inputs["value"].val if "value" in op.inputs else None
        if value is not None and np.isinf(np.asarray(value, dtype=np.float64)).any():
            return [Finding("inf-fill", *args, f"fills with {float(value)}; in fp16 attention masks prefer a finite value")]
        return []
    if t == "reduce_sum_square" and _is_fp16(op.inputs["x"]) and not _is_scaled(op.inputs["x"]):
        return [Finding("fp16-square-unscaled", *args,
                        "sum of squares of un-scaled fp16 activations overflows once |x| > ~256; scale first or cast to fp32")]
    if t in ("square", "pow", "mul") and _is_fp16(op.outputs[0]):
        x = op.inputs["x"]
        if t == "pow" and not (op.inputs["y"].val is not None and np.all(np.asarray(op.inputs["y"].val) == 2)):
            return []
        if t == "mul" and op.inputs["y"] is not x:
            return []
        if any(c.op_type in _REDUCE for c in op.outputs[0].child_ops) and not _is_scaled(x):
            return [Finding("fp16-square-unscaled", *args,
                            "fp16 square feeds a reduction (norm variance) without prior scaling or cast to fp32; "
                            "|x| > ~256 overflows to inf")]
        return []
    if t == "exp" and _is_fp16(op.outputs[0]):
        if any(c.op_type == "reduce_sum" for c in op.outputs[0].child_ops) and not _is_max_shifted(op.inputs["x"]):
            return [Finding("fp16-exp-unshifted", *args,
                            "manual softmax: exp of un-shifted fp16 logits overflows for logits > ~11.1; "
                            "subtract reduce_max first or use the softmax op")]
    return []


def lint(package_or_program: Any) -> list[Finding]:
    """Return the fp16 hazards of every function in the program (see module doc). A package that
    is not whole raises :class:`~.package.PackageError` (:func:`~.package.open_package`)."""
    program = load_program(package_or_program, "lint")
    findings: list[Finding] = []
    for fn_name, fn in program.functions.items():
        for op in _ops(fn):
            val = _const_value(op)
            if val is not None:
                findings.extend(_check_const(fn_name, op, val))
            else:
                findings.extend(_check_op(fn_name, op))
    return findings
