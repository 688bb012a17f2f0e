"""Numpy evaluator for saved Core ML ML Programs (``.mlpackage``).

``MLModel.predict`` only runs on macOS, so exports are checked on Linux by
loading the package's MIL program back (``milproto.load`` on the spec and
``weights/weight.bin``) and interpreting it op by op in numpy:

* Every op is re-created with the MIL builder on *constant* inputs holding the
  current values. That runs coremltools' own type inference on concrete shapes
  (flexible/symbolic dims are specialized per call, shape errors surface with
  the op named) and, for the ~113 core ops that implement ``value_inference``,
  computes the value. The ops listed in ``IMPLEMENTED_OPS`` (conv, pooling,
  resampling, norms, SiLU, ``gather_nd``, state and ``constexpr_`` ops) have no
  ``value_inference`` in coremltools 9.0 and are computed here; their result
  shape is checked against the inferred one.
* Every result is cast to the dtype the program declares for it, so fp16 ops
  produce fp16 arrays and overflow to ``inf`` like fp16 does.

Accumulation semantics: where coremltools' ``value_inference`` computes in
the input dtype, fp16 ops run in numpy fp16 (elementwise ops round once per
op; numpy's fp16 ``sum``/``matmul`` use numpy's own accumulation order). Ops
implemented here compute in float32 and round once to the output dtype. Neither
is what the GPU/ANE does (fp16 multiply-accumulate with partial fp32
accumulation, other reduction orders, approximate transcendentals), so results
are a semantics + overflow check to be compared with fp16 tolerances, not a
bit-exact emulation. ``Evaluator.nonfinite_ops`` lists the ops that turned
finite inputs into ``inf``/``nan`` during the last call (the fp16 overflow
check).

Stateful programs: state inputs (``mb.StateTensorSpec``) are kept in
``Evaluator.state`` (zero-initialized unless given) across calls;
``read_state`` returns a copy and ``coreml_update_state`` writes the value, so
successive decode steps share the cache.

Limitations: control flow (``cond``/``while_loop``), list ops, ``resize``/
``resize_bilinear`` sampling modes, random ops and the sparse ``constexpr_``
ops are not implemented and raise ``NotImplementedError`` naming the op.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, MutableMapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .package import PackageError, open_package
from .runtime import import_coremltools, quiet_coremltools

__all__ = ["Evaluator", "evaluate", "load_program", "IMPLEMENTED_OPS"]


# ---------------------------------------------------------------------------
# Loading


def load_program(package_or_program: Any, owner: str = "load_program"):
    """Return the MIL ``Program`` of a saved ``.mlpackage`` path, an ``MLModel``
    or a MIL ``Program`` (returned as is).

    A path is checked and parsed by :func:`~.package.open_package` (a package that is not
    whole raises one :class:`~.package.PackageError` naming ``owner``, the package and the
    file); its program is then read with ``milproto.load`` (the same bytes
    ``MLModel.predict`` would use, weights from ``weight.bin``)."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import Program

    if isinstance(package_or_program, Program):
        return package_or_program
    if isinstance(package_or_program, (str, os.PathLike)):
        package = open_package(package_or_program, owner)
        spec, weights_dir = package.spec, package.weights_dir
    elif isinstance(package_or_program, ct.models.MLModel):
        package = None
        spec, weights_dir = package_or_program.get_spec(), package_or_program.weights_dir or ""
    else:
        raise TypeError(
            f"[{owner}] expected an .mlpackage path, a coremltools MLModel or a MIL Program, "
            f"got {type(package_or_program).__name__}"
        )
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"[{owner}] only ML Program (.mlpackage) models can be read, got a {spec.WhichOneof('Type')}")
    try:
        return load(spec, spec.specificationVersion, weights_dir)
    except Exception as e:  # a package that passed open_package but that coremltools cannot read back
        if package is None:
            raise
        message = " ".join(str(e).split())
        raise PackageError(f"[{owner}] {package.path}: coremltools cannot read its program "
                           f"({type(e).__name__}: {message})") from e


# ---------------------------------------------------------------------------
# Helpers for the ops implemented here (all compute in float32).


def _f32(a):
    return None if a is None else np.asarray(a, dtype=np.float32)


def _windows(xp, k_eff, strides, dilations):
    """Sliding windows over the trailing ``len(k_eff)`` axes of ``xp``
    ``[N, C, *Dp]`` -> ``[N, C, *O, *K]`` (stride and dilation applied)."""
    nsp = len(k_eff)
    axes = tuple(range(xp.ndim - nsp, xp.ndim))
    win = sliding_window_view(xp, tuple(k_eff), axis=axes)
    lead = (slice(None),) * (xp.ndim - nsp)
    return win[lead + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)]


def _explicit_pads(pad_type, pad, in_sizes, k_eff, strides):
    """(begin, end) padding per spatial axis for Core ML's ``pad_type``."""
    if pad_type == "valid":
        return [(0, 0)] * len(in_sizes)
    if pad_type == "custom":
        p = [int(v) for v in np.asarray(pad).reshape(-1)]
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(in_sizes))]
    if pad_type in ("same", "same_lower"):
        out = []
        for n, k, s in zip(in_sizes, k_eff, strides):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            small = total // 2
            out.append((small, total - small) if pad_type == "same" else (total - small, small))
        return out
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _conv_core(x, w, b, strides, dilations, pads, groups):
    """Grouped N-d cross-correlation. x ``[N, C_in, *D]``, w ``[C_out, C_in/groups, *K]``."""
    nsp = w.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads])
    k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    win = _windows(xp, k_eff, strides, dilations)  # [N, C_in, *O, *K]
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    kax = list(range(2 + nsp, 2 + 2 * nsp))
    parts = [
        np.tensordot(win[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og], axes=([1] + kax, list(range(1, 2 + nsp))))
        for g in range(groups)
    ]  # each [N, *O, og]
    y = np.moveaxis(np.concatenate(parts, axis=-1), -1, 1)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nsp)
    return y


def _conv(v, outs):
    x, w = _f32(v["x"]), _f32(v["weight"])
    nsp = w.ndim - 2
    strides = [int(s) for s in v.get("strides", [1] * nsp)]
    dilations = [int(d) for d in v.get("dilations", [1] * nsp)]
    k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    pads = _explicit_pads(str(v["pad_type"]), v.get("pad"), x.shape[2:], k_eff, strides)
    return _conv_core(x, w, _f32(v.get("bias")), strides, dilations, pads, int(v.get("groups", 1)))


def _conv_transpose(v, outs):
    """Transposed conv = stride-dilated input, full padding, flipped kernel with
    in/out channels swapped per group; then cropped by ``pad``/``pad_type`` (or
    from the beginning pad to ``output_shape``). w ``[C_in, C_out/groups, *K]``."""
    x, w = _f32(v["x"]), _f32(v["weight"])
    nsp, groups = w.ndim - 2, int(v.get("groups", 1))
    strides = [int(s) for s in v.get("strides", [1] * nsp)]
    dilations = [int(d) for d in v.get("dilations", [1] * nsp)]
    k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    up = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)), np.float32)
    up[(slice(None),) * 2 + tuple(slice(None, None, s) for s in strides)] = x
    cg = w.shape[0] // groups
    wc = np.concatenate(
        [np.swapaxes(w[g * cg:(g + 1) * cg], 0, 1) for g in range(groups)], axis=0
    )[(slice(None),) * 2 + (slice(None, None, -1),) * nsp]
    full = _conv_core(up, wc, None, [1] * nsp, dilations, [(k - 1, k - 1) for k in k_eff], groups)
    pad_type = str(v["pad_type"])
    if pad_type == "custom":
        pads = _explicit_pads("custom", v["pad"], x.shape[2:], k_eff, strides)
    elif pad_type == "same":
        pads = [(max(k - s, 0) // 2, max(k - s, 0) - max(k - s, 0) // 2) for k, s in zip(k_eff, strides)]
    else:
        pads = [(0, 0)] * nsp
    target = list(outs[0].shape[2:])
    sl = tuple(slice(b, b + t) for (b, _), t in zip(pads, target))
    y = full[(slice(None),) * 2 + sl]
    if tuple(y.shape[2:]) != tuple(target):  # output_shape larger than computed: zero-extend
        y = np.pad(y, [(0, 0), (0, 0)] + [(0, t - n) for n, t in zip(y.shape[2:], target)])
    b = _f32(v.get("bias"))
    return y if b is None else y + b.reshape((1, -1) + (1,) * nsp)


def _pool(v, outs, kind):
    """max/avg pool over the trailing ``len(kernel_sizes)`` axes. Padding beyond
    the explicit pads (``ceil_mode``) never counts toward an average."""
    x = _f32(v["x"])
    ks = [int(k) for k in v["kernel_sizes"]]
    nsp = len(ks)
    strides = [int(s) for s in v.get("strides", [1] * nsp)]
    pads = _explicit_pads(str(v["pad_type"]), v.get("pad"), x.shape[-nsp:], ks, strides)
    out_sp = outs[0].shape[-nsp:]
    widths = [(0, 0)] * (x.ndim - nsp)
    for i, ((b, e), n, k, s, o) in enumerate(zip(pads, x.shape[-nsp:], ks, strides, out_sp)):
        widths.append((b, e + max((o - 1) * s + k - (n + b + e), 0)))
    win_axes = tuple(range(-nsp, 0))
    crop = (Ellipsis,) + tuple(slice(0, o) for o in out_sp)
    if kind == "max":
        xp = np.pad(x, widths, constant_values=-np.inf)
        return _windows(xp, ks, strides, [1] * nsp).max(axis=win_axes)[crop]
    total = _windows(np.pad(x, widths), ks, strides, [1] * nsp).sum(axis=win_axes)[crop]
    mask = np.pad(np.ones(x.shape[-nsp:], np.float32), [(b, e) for b, e in pads])
    if not bool(v.get("exclude_padding_from_average", False)):
        mask = np.ones_like(mask)
    mask = np.pad(mask, [(0, w[1] - p[1]) for w, p in zip(widths[-nsp:], pads)])
    count = _windows(mask, ks, strides, [1] * nsp).sum(axis=win_axes)[tuple(slice(0, o) for o in out_sp)]
    return total / count


def _interp_axis(x, axis, n_out, align_corners):
    """Linear interpolation along ``axis`` with MIL's grid (see upsample_bilinear)."""
    n_in = x.shape[axis]
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        pos = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    else:
        sp = n_in / n_out
        pos = i * sp + 0.5 * sp - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    t = (pos - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = n_out
    t = t.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - t) + np.take(x, hi, axis=axis) * t


def _upsample_bilinear(v, outs):
    x = _f32(v["x"])
    h, w = outs[0].shape[-2:]
    ac = bool(v.get("align_corners", True))
    return _interp_axis(_interp_axis(x, -2, h, ac), -1, w, ac)


def _upsample_nearest(v, outs):
    """Nearest neighbour: source index ``floor(i * in / out)``."""
    x = np.asarray(v["x"])
    for axis, n_out in ((-2, outs[0].shape[-2]), (-1, outs[0].shape[-1])):
        n_in = x.shape[axis]
        x = np.take(x, np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1), axis=axis)
    return x


def _channel_bcast(a, nd):
    return None if a is None else _f32(a).reshape((1, -1) + (1,) * (nd - 2))


def _batch_norm(v, outs):
    """(x - mean) / sqrt(variance + epsilon) * gamma + beta, per channel (axis 1)."""
    x = _f32(v["x"])
    y = (x - _channel_bcast(v["mean"], x.ndim)) / np.sqrt(_channel_bcast(v["variance"], x.ndim) + np.float32(v.get("epsilon", 1e-5)))
    return _affine(y, v)


def _affine(y, v):
    g, b = _channel_bcast(v.get("gamma"), y.ndim), _channel_bcast(v.get("beta"), y.ndim)
    if g is not None:
        y = y * g
    return y if b is None else y + b


def _instance_norm(v, outs):
    """Normalize each (n, c) over the spatial axes 2..: biased variance, eps inside sqrt."""
    x = _f32(v["x"])
    axes = tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return _affine((x - mu) / np.sqrt(var + np.float32(v.get("epsilon", 1e-5))), v)


def _silu(v, outs):
    x = _f32(v["x"])
    return x / (1.0 + np.exp(-x))


def _block_expand(small, shape):
    """Repeat each entry of ``small`` over its block so it matches ``shape``
    (block size ``shape[i] // small.shape[i]`` per axis)."""
    for ax, (n, m) in enumerate(zip(shape, small.shape)):
        if n % m:
            raise ValueError(f"dimension {n} is not a multiple of the {m} blocks on axis {ax}")
        small = np.repeat(small, n // m, axis=ax)
    return small


def _blockwise_shift_scale(v, outs):
    """scale * (data - offset), scale/offset blockwise: data[i] uses scale[i // block]."""
    data = np.asarray(v["data"], np.float32)
    scale = _block_expand(_f32(v["scale"]), data.shape)
    if v.get("offset") is not None:
        data = data - _block_expand(_f32(v["offset"]), data.shape)
    return scale * data


def _lut_to_dense(v, outs):
    """Palettized weights: indices ``[*S]`` (uintN), lut ``[*P, 2**N, V]`` with
    ``S[i] % P[i] == 0``; element at index position p takes
    ``lut[p // (S / P), indices[p], :]``; a vector (V > 1) fills V consecutive
    positions along ``vector_axis``."""
    idx = np.asarray(v["indices"]).astype(np.int64)
    lut = np.asarray(v["lut"])
    k = idx.ndim
    pal = [np.arange(n) // (n // p) for n, p in zip(idx.shape, lut.shape[:k])]
    grid = np.ix_(*pal)
    vals = lut[grid + (idx,)]  # [*S, V]
    vs = lut.shape[-1]
    if vs == 1:
        return vals[..., 0]
    axis = int(v["vector_axis"]) % k
    vals = np.moveaxis(vals, -1, axis + 1)  # [..., S_axis, V, ...]
    return vals.reshape(idx.shape[:axis] + (idx.shape[axis] * vs,) + idx.shape[axis + 1:])


def _affine_dequantize(v, outs):
    """iOS16 scale * (quantized_data - zero_point); vector params lie along ``axis``."""
    q = np.asarray(v["quantized_data"], np.float32)
    shape = [1] * q.ndim
    axis = int(v["axis"]) % q.ndim

    def bc(a):
        a = _f32(a)
        if a.ndim == 0 or a.size == 1:
            return a.reshape(())
        shape[axis] = a.size
        return a.reshape(shape)

    return bc(v["scale"]) * (q - bc(v["zero_point"]))


def _gather_nd(v, outs):
    """``x[idx[..., 0], ..., idx[..., k-1]]`` (the leading ``batch_dims`` axes of x and indices
    paired one to one)."""
    x, idx, b = np.asarray(v["x"]), np.asarray(v["indices"]).astype(np.int64), int(v.get("batch_dims", 0))
    if b:
        return np.stack([_gather_nd({"x": xi, "indices": ii, "batch_dims": b - 1}, outs) for xi, ii in zip(x, idx)])
    return x[tuple(idx[..., i] for i in range(idx.shape[-1]))]


def _constexpr_cast(v, outs):
    return np.asarray(v["source_val"])


# op type -> fn(values: dict[str, Any], outs: list[Var with concrete type]) -> array
IMPLEMENTED_OPS: dict[str, Callable] = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "max_pool": lambda v, o: _pool(v, o, "max"),
    "avg_pool": lambda v, o: _pool(v, o, "avg"),
    "silu": _silu,
    "gather_nd": _gather_nd,
    "upsample_bilinear": _upsample_bilinear,
    "upsample_nearest_neighbor": _upsample_nearest,
    "batch_norm": _batch_norm,
    "instance_norm": _instance_norm,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_cast": _constexpr_cast,
}
_STATE_OPS = ("read_state", "coreml_update_state")


# ---------------------------------------------------------------------------
# Evaluator


def _np_dtype(var):
    from coremltools.converters.mil.mil import types

    dt = types.nptype_from_builtin(var.dtype)
    return np.dtype(dt if dt is not bool else np.bool_)


def _check_shape(kind, name, declared, got):
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    ok = len(declared) == len(got) and all(is_symbolic(d) or int(d) == g for d, g in zip(declared, got))
    if not ok:
        shown = tuple(str(d) if is_symbolic(d) else int(d) for d in declared)
        raise ValueError(f"{kind} {name!r}: expected shape {shown} (strings are flexible dims), got {tuple(got)}")


def _kind(dt):
    return "float" if dt.kind in "fc" else "bool" if dt.kind == "b" else "int"


def _coerce(kind, name, var, value):
    """Cast an input/state value to the declared dtype (same kind only) and check its shape."""
    value = np.asarray(value)
    want = _np_dtype(var)
    if value.dtype != want:
        if _kind(value.dtype) != _kind(want):
            raise TypeError(f"{kind} {name!r}: expected {want}, got {value.dtype}")
        value = value.astype(want)
    _check_shape(kind, name, var.shape, value.shape)
    return value


class Evaluator:
    """A loaded ML Program function plus its state, evaluated in numpy.

    ``Evaluator(path_or_program, function="main", state=None)``; call it with a
    dict of input arrays to get a dict of output arrays (keyed by the
    function's output names). ``state`` maps state-input names to arrays and
    persists across calls (zeros if not given), so successive decode steps of
    a stateful model see each other's writes. ``reset_state()`` zeroes it.
    """

    def __init__(self, package_or_program: Any, *, function: str = "main",
                 state: MutableMapping[str, np.ndarray] | None = None):
        self.program = load_program(package_or_program, "Evaluator")
        from coremltools.converters.mil.mil import types

        funcs = self.program.functions
        if function not in funcs:
            raise KeyError(f"function {function!r} not in the program; available: {sorted(funcs)}")
        self.function_name = function
        self.function = funcs[function]
        self.opset = self.function.opset_version
        self.input_vars = {n: v for n, v in self.function.inputs.items() if not types.is_state(v.sym_type)}
        self.state_vars = {n: v for n, v in self.function.inputs.items() if types.is_state(v.sym_type)}
        self.output_names = [v.name for v in self.function.outputs]
        self.state: MutableMapping[str, np.ndarray] = state if state is not None else {}
        unknown = set(self.state) - set(self.state_vars)
        if unknown:
            raise KeyError(f"unknown state name(s) {sorted(unknown)}; states: {sorted(self.state_vars)}")
        for n, v in self.state_vars.items():
            if n in self.state:
                self.state[n] = _coerce("state", n, _StateView(v), self.state[n])
        self.reset_state(only_missing=True)
        self.nonfinite_ops: list[tuple[str, str]] = []
        self._decoded: dict[str, Any] = {}  # constexpr_ op name -> its value, decoded once per Evaluator

    def reset_state(self, only_missing: bool = False) -> None:
        """Zero every state buffer (or only the ones not set yet)."""
        for n, v in self.state_vars.items():
            if not (only_missing and n in self.state):
                sv = _StateView(v)
                self.state[n] = np.zeros(sv.shape, _np_dtype(sv))

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluate the function once on ``inputs``, reading and updating ``state``.

        Args:
            inputs (Mapping[str, np.ndarray]): every input of the function by name, each of its declared
                shape (flexible dimensions take any size) and dtype kind (cast to the declared dtype).

        Returns:
            dict[str, np.ndarray]: the outputs, keyed by the function's output names. Ops that produced
            non-finite values are listed in ``nonfinite_ops`` afterwards.

        Raises:
            KeyError: when an input is missing or unexpected.
            ValueError: when an input's shape does not match its declaration.
            TypeError: when an input's dtype kind (float, int, bool) does not.
        """
        missing = [n for n in self.input_vars if n not in inputs]
        extra = [n for n in inputs if n not in self.input_vars]
        if missing or extra:
            raise KeyError(
                f"function {self.function_name!r}: missing inputs {missing}, unexpected inputs {extra}; "
                f"expected {list(self.input_vars)}"
            )
        env: dict[str, Any] = {n: _coerce("input", n, v, inputs[n]) for n, v in self.input_vars.items()}
        self.nonfinite_ops = []
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"), quiet_coremltools():  # recorded in nonfinite_ops
            for op in self.function.operations:
                self._run_op(op, env)
        return {n: env[n] for n in self.output_names}

    def _value(self, var, env):
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return var.val
        raise KeyError(f"value of {var.name!r} is not available (op order?)")

    def _run_op(self, op, env) -> None:
        if op.op_type == "const":
            env[op.outputs[0].name] = op.outputs[0].val
            return
        if op.op_type.startswith("constexpr_") and op.name in self._decoded:
            env[op.outputs[0].name] = self._decoded[op.name]
            return
        if op.blocks:
            raise NotImplementedError(f"op {op.name!r} of type {op.op_type!r}: control flow is not supported")
        if op.op_type == "read_state":
            env[op.outputs[0].name] = self.state[op.inputs["input"].name].copy()
            return
        if op.op_type == "coreml_update_state":
            sname = op.inputs["state"].name
            value = np.asarray(self._value(op.inputs["value"], env))
            _check_shape("state update", sname, self.state[sname].shape, value.shape)
            self.state[sname] = value.astype(self.state[sname].dtype, copy=True)
            env[op.outputs[0].name] = value
            return
        vals = {}
        for name, var in op.inputs.items():
            vals[name] = [self._value(x, env) for x in var] if isinstance(var, (list, tuple)) else self._value(var, env)
        if op.op_type.startswith("constexpr_"):
            outs = op.outputs  # static shapes by construction
        else:
            outs = self._infer(op, vals)
        impl = IMPLEMENTED_OPS.get(op.op_type)
        if impl is not None:
            results = impl(vals, outs)
            results = results if isinstance(results, tuple) else (results,)
        else:
            results = tuple(o.val for o in outs)
            if any(r is None for r in results):
                raise NotImplementedError(
                    f"op {op.name!r} of type {op.op_type!r} has no numpy implementation "
                    "(coremltools has no value_inference for it and the evaluator does not implement it)"
                )
        finite_in = all(
            np.all(np.isfinite(np.asarray(a))) for a in _flat(vals.values())
            if isinstance(a, (np.ndarray, np.generic, float)) and np.asarray(a).dtype.kind == "f"
        )
        for ov, tv, r in zip(op.outputs, outs, results):
            arr = np.asarray(r)
            _check_shape(f"op {op.name!r} ({op.op_type}) output", ov.name, tv.shape, arr.shape)
            arr = arr.astype(_np_dtype(ov), copy=False)
            if finite_in and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                self.nonfinite_ops.append((op.name, op.op_type))
            env[ov.name] = arr[()] if arr.ndim == 0 else arr
        if op.op_type.startswith("constexpr_"):
            self._decoded[op.name] = env[op.outputs[0].name]

    def _infer(self, op, vals):
        """Re-create ``op`` on constant inputs: concrete type inference and, where
        coremltools has it, value inference. Returns the new output Vars."""
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import Function

        kwargs = {k: tuple(_scalar(a) for a in val) if isinstance(val, list) else _scalar(val) for k, val in vals.items()}
        try:
            with Function({}, opset_version=self.opset):
                res = getattr(mb, op.op_type)(**kwargs, name=op.name)
        except (ValueError, TypeError, AssertionError, IndexError) as e:
            shapes = {k: np.shape(v) for k, v in vals.items() if not isinstance(v, (str, list))}
            raise ValueError(f"op {op.name!r} ({op.op_type}) rejected its inputs {shapes}: {e}") from e
        return list(res) if isinstance(res, (list, tuple)) else [res]


class _StateView:
    """The tensor type wrapped by a state input (shape/dtype of its buffer)."""

    def __init__(self, var):
        t = var.sym_type.wrapped_type()
        self.dtype, self.shape = t.get_primitive(), t.get_shape()


def _scalar(a):
    """0-d arrays -> numpy scalars (dtype kept); bools/strings -> Python objects (the builder wants those)."""
    if isinstance(a, np.ndarray) and a.ndim == 0:
        a = a[()]
    return a.item() if isinstance(a, (np.bool_, np.str_)) else a


def _flat(values):
    for v in values:
        if isinstance(v, list):
            yield from v
        else:
            yield v


def evaluate(package_or_program: Any, inputs: Mapping[str, np.ndarray], *, function: str = "main",
             state: MutableMapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Evaluate one call of ``function`` of a saved ``.mlpackage`` (or MIL
    ``Program``/``MLModel``) on ``inputs`` (name -> array; shapes checked,
    floats cast to the declared float dtype). ``state`` (name -> array) is
    updated in place by ``coreml_update_state``; pass the same dict to the next
    call to continue decoding. Returns output name -> array in program dtypes.
    For repeated calls prefer ``Evaluator`` (loads once). A package that is not whole raises
    :class:`~.package.PackageError` (:func:`~.package.open_package`)."""
    program = load_program(package_or_program, "evaluate")
    return Evaluator(program, function=function, state=state)(inputs)
