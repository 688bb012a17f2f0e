"""The functional core: parameters by tracing, ``validate``, ``_`` holes, composition, module interop.

A functional net is a plain function ``f(params, x, **hyper)`` whose parameters are
read with :func:`validate`, which states each one's shape and initializer:

    >>> import mlx.core as mx
    >>> from mlx_zeta.functional import trace, validate, normal
    >>> def affine_net(params, x, dim_out):
    ...     w = validate(params["weight"], (dim_out, x.shape[-1]), init=normal(0.02))
    ...     return x @ w.T
    >>> params = trace(affine_net, mx.random.key(0), mx.zeros((2, 8)), dim_out=4)
    >>> params["weight"].shape
    (4, 8)

:func:`trace` runs ``f`` once with a recording params object that creates every
validated parameter; afterwards ``f`` is applied to the plain nested dict it
returned, and works under ``mx.grad``, ``mx.value_and_grad``, ``mx.compile`` and
``mx.vmap`` like any MLX function of a pytree.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

__all__ = [
    "_", "Params", "flexible", "trace", "validate", "check", "chain", "skip", "thread_key", "thread_params",
    "from_module", "to_module", "tree_shapes", "zeros", "ones", "uniform", "normal", "truncated_normal",
    "default_init", "Init",
]

Init = Callable[[mx.array, Tuple[int, ...]], mx.array]
"""An initializer: ``init(key, shape) -> array`` (float32)."""


# --------------------------------------------------------------------------- initializers

def zeros(key: mx.array, shape: Tuple[int, ...]) -> mx.array:
    """All zeros (the key is unused)."""
    return mx.zeros(shape)


def ones(key: mx.array, shape: Tuple[int, ...]) -> mx.array:
    """All ones (the key is unused)."""
    return mx.ones(shape)


def uniform(scale: float) -> Init:
    """:math:`U(-\\text{scale}, \\text{scale})`, the init of ``mlx.nn.Linear`` with scale :math:`1/\\sqrt{\\text{in}}`."""
    return lambda key, shape: mx.random.uniform(-scale, scale, shape, key=key)


def normal(std: float = 1.0) -> Init:
    """:math:`N(0, \\text{std}^2)`."""
    return lambda key, shape: std * mx.random.normal(shape, key=key)


def truncated_normal(std: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> Init:
    """:math:`\\text{std} \\cdot z` with :math:`z` a standard normal truncated to ``(lower, upper)``
    (as ``jax.nn.initializers.truncated_normal``: no variance correction, so for ``(-2, 2)`` the
    values have standard deviation :math:`0.8796\\,\\text{std}` and stay below :math:`2\\,\\text{std}`)."""
    return lambda key, shape: std * mx.random.truncated_normal(lower, upper, shape, key=key)


def default_init(key: mx.array, shape: Tuple[int, ...]) -> mx.array:
    r"""The initializer :func:`validate` uses when given none (zephyr's default).

    .. math::

        w = \frac{z}{\sqrt{\max(\text{shape}[0], 1)}},\quad z \sim \mathcal{N}(0, 1) \text{ truncated to } (-2, 2)
        \quad (\text{rank} \ge 2), \qquad w = 0 \quad (\text{rank} \le 1, \text{biases}),

    so a weight's values lie in :math:`\pm 2/\sqrt{\text{shape}[0]}` with standard deviation
    :math:`0.8796/\sqrt{\text{shape}[0]}` (the truncated standard normal's
    :math:`\sqrt{1 - 4\varphi(2)/(2\Phi(2) - 1)}`). ``shape[0]`` is the fan-in in zephyr's
    ``(in, out)`` layout, ``validate(params["weights"], (x.shape[-1], out))``; for this package's
    ``(out, in)`` layout (``mlx.nn.Linear``'s) pass an ``init`` explicitly, as :func:`linear` does.
    """
    if len(shape) <= 1:
        return mx.zeros(shape)
    return truncated_normal(1.0 / math.sqrt(max(shape[0], 1)))(key, shape)


# --------------------------------------------------------------------------- placeholders

class _Hole:
    """The placeholder ``_``: an argument left open by a :func:`flexible` call."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "_"


#: The placeholder for an argument left open in a call to a :func:`flexible` function.
_ = _Hole()


def flexible(fn: Callable) -> Callable:
    """Let ``fn`` be partially applied with ``_`` holes.

    A call with at least one ``_`` among its positional arguments returns a function
    of the holes, filled left to right: ``linear(_, _, 256)`` is ``lambda p, x:
    linear(p, x, 256)`` and ``linear(params, _, 256)`` is ``lambda x: linear(params, x, 256)``.
    Keyword arguments given at either call are merged (the later call wins).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        holes = [i for i, a in enumerate(args) if a is _]
        if not holes:
            return fn(*args, **kwargs)

        def filled(*fill: Any, **more: Any) -> Any:
            if len(fill) < len(holes):
                raise TypeError(f"[flexible] {fn.__name__} has {len(holes)} hole(s) '_', got {len(fill)} argument(s)")
            full = list(args)
            for i, value in zip(holes, fill):
                full[i] = value
            return wrapper(*full, *fill[len(holes):], **{**kwargs, **more})

        filled.__name__ = f"{fn.__name__}(partial)"
        return filled

    return wrapper


# --------------------------------------------------------------------------- tracing and validation

class _Recorder:
    """Shared state of one trace (the store and the key) or one check (the loaded tree)."""

    def __init__(self, key: Optional[mx.array] = None, loaded: Any = None):
        self.key = key
        self.loaded = loaded
        self.store: Dict[Tuple[Union[str, int], ...], mx.array] = {}


class _Missing:
    pass


_MISSING = _Missing()


class Params:
    """A path-carrying view on parameters, handed to a net by :func:`trace` and :func:`check`.

    Indexing (``params["attn"]["to_q"]``, ``params[0]``) extends the path; :func:`validate`
    on a leaf creates the parameter (trace) or checks the loaded one (check).
    """

    def __init__(self, recorder: _Recorder, path: Tuple[Union[str, int], ...] = (), value: Any = None):
        self._recorder = recorder
        self._path = path
        self._value = value  # the loaded subtree in check mode

    def __getitem__(self, key: Union[str, int]) -> "Params":
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise TypeError(f"[functional] parameter keys are str or int, got {key!r} at '{self.path or '<root>'}'")
        value = None
        if self._recorder.loaded is not None:
            value = _lookup(self._value, key)
        return Params(self._recorder, self._path + (key,), value)

    @property
    def path(self) -> str:
        return ".".join(str(k) for k in self._path)

    def __repr__(self) -> str:
        return f"Params('{self.path}')"


def _lookup(tree: Any, key: Union[str, int]) -> Any:
    if isinstance(tree, dict) and key in tree:
        return tree[key]
    if isinstance(tree, (list, tuple)) and isinstance(key, int) and 0 <= key < len(tree):
        return tree[key]
    return _MISSING


def validate(param: Union[mx.array, Params], shape: Sequence[int], init: Optional[Init] = None) -> mx.array:
    """Declare a parameter: its shape and initializer.

    Under :func:`trace` it creates the parameter with ``init(key, shape)`` (a fresh key
    each; without ``init``, :func:`default_init`, zephyr's truncated normal for weights
    and zeros for biases) and records it at its path; a path validated twice (shared weights) returns
    the same array. Applied to an array it is the identity after a shape check, and
    under :func:`check` the check names the parameter's path.

    Raises:
        ValueError: the declared shape is not a sequence of ints >= 0, ``init`` is not callable,
            the declared shape conflicts with the parameter's (naming the path where known and
            both shapes), or a checked parameter is missing.
    """
    where = f" of parameter '{param.path}'" if isinstance(param, Params) else ""
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, Integral) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise ValueError(f"[validate] expected the shape{where} as a tuple of ints >= 0, got {shape!r}")
    if init is not None and not callable(init):
        raise ValueError(f"[validate] expected init{where} to be a function init(key, shape), got {type(init).__name__}")
    shape = tuple(int(d) for d in shape)
    if isinstance(param, Params):
        rec, path = param._recorder, param.path
        if rec.loaded is not None:
            if param._value is _MISSING:
                raise ValueError(f"[validate] parameter '{path}' of declared shape {shape} is missing from the loaded parameters")
            param = param._value
            if not isinstance(param, mx.array):
                raise ValueError(f"[validate] parameter '{path}' should be an array of shape {shape}, got {type(param).__name__}")
            if tuple(param.shape) != shape:
                raise ValueError(f"[validate] parameter '{path}': loaded shape {tuple(param.shape)} conflicts with "
                                 f"declared shape {shape}")
            return param
        if param._path in rec.store:
            existing = rec.store[param._path]
            if tuple(existing.shape) != shape:
                raise ValueError(f"[validate] parameter '{path}' declared twice with shapes {tuple(existing.shape)} and {shape}")
            return existing
        rec.key, sub = mx.random.split(rec.key)
        value = (default_init if init is None else init)(sub, shape)
        if not isinstance(value, mx.array) or tuple(value.shape) != shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, mx.array) else type(value).__name__
            raise ValueError(f"[validate] init of parameter '{path}' returned {got}, declared shape {shape}")
        rec.store[param._path] = value
        return value
    if not isinstance(param, mx.array):
        raise ValueError(f"[validate] expected a parameter array of shape {shape}, got {type(param).__name__}")
    if tuple(param.shape) != shape:
        raise ValueError(f"[validate] parameter of shape {tuple(param.shape)} conflicts with declared shape {shape} "
                         f"(run functional.check(f, params, *inputs) to get its path)")
    return param


def _nest(store: Dict[Tuple[Union[str, int], ...], mx.array]) -> Any:
    """Flat {path tuple: array} -> nested dicts; a dict whose keys are exactly 0..n-1 becomes a list."""
    root: Dict[Any, Any] = {}
    for keys, value in store.items():
        if not keys:
            raise ValueError("[trace] validate was called on the root params object itself; index it first")
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
            return [node[i] for i in range(len(node))]
        return node

    return listify(root)


def trace(f: Callable, key: mx.array, *sample_inputs: Any, **hyper: Any) -> Dict[str, Any]:
    """Create the parameters of ``f(params, *inputs, **hyper)`` by running it once.

    Every :func:`validate` reached on the sample inputs creates its parameter, so the
    shapes may depend on the inputs' shapes and on ``hyper``. No compilation is
    involved. Integer keys (``params[0]``, ``params[1]``) give lists, as in a module's
    ``parameters()``.

    Args:
        f (Callable): the net, ``f(params, *inputs, **hyper)``.
        key (mx.array): a key from ``mx.random.key(seed)``, split once per parameter.
        *sample_inputs: inputs with the shapes the net will see.
        **hyper: hyper-parameters passed to ``f``.

    Returns:
        The nested dict (and lists) of initialized parameters, evaluated.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.functional import trace, linear, tree_shapes
        >>> params = trace(linear, mx.random.key(0), mx.zeros((2, 8)), 4)
        >>> tree_shapes(params)
        {'weight': (4, 8), 'bias': (4,)}
    """
    rec = _Recorder(key=key)
    f(Params(rec), *sample_inputs, **hyper)
    params = _nest(rec.store)
    mx.eval(params)
    return params


def check(f: Callable, params: Any, *inputs: Any, **hyper: Any) -> Any:
    """Apply ``f`` to loaded ``params`` while checking every validated parameter.

    Like ``f(params, *inputs, **hyper)`` but a parameter whose shape conflicts with its
    declaration raises ``ValueError`` naming its path and both shapes, and a missing
    one names its path. Use it once after loading weights.
    """
    rec = _Recorder(loaded=params)
    return f(Params(rec, (), params), *inputs, **hyper)


def tree_shapes(tree: Any) -> Any:
    """The same tree with every array replaced by its shape tuple."""
    return tree_map(lambda a: tuple(a.shape), tree)


# --------------------------------------------------------------------------- composition

def chain(fns: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """Compose one-argument functions left to right: ``chain([f, g])(x) == g(f(x))``."""
    fns = list(fns)

    def chained(x: Any) -> Any:
        for fn in fns:
            x = fn(x)
        return x

    return chained


def skip(fn: Callable[[Any], Any], x: Any = _) -> Any:
    """Residual connection: ``skip(f)(x) == x + f(x)``; ``skip(f, x)`` applies it at once."""
    if x is _:
        return lambda y: y + fn(y)
    return x + fn(x)


def thread_key(fns: Sequence[Callable], key: mx.array) -> List[Callable]:
    """Give each function its own key: ``fns[i]`` gets the i-th of ``len(fns)`` keys split
    from ``key`` as its first argument (``dropout(_, _, 0.1)`` becomes a function of ``x``)."""
    fns = list(fns)
    keys = mx.random.split(key, max(len(fns), 1))
    return [functools.partial(fn, keys[i]) for i, fn in enumerate(fns)]


def thread_params(fns: Sequence[Callable], params: Any) -> List[Callable]:
    """Give each function its parameter subtree: ``fns[i]`` gets ``params[i]`` as its first
    argument. ``params`` is a list or anything indexed by ``0..n-1`` (a dict or a traced
    :class:`Params`)."""
    return [functools.partial(fn, params[i]) for i, fn in enumerate(fns)]


# --------------------------------------------------------------------------- module interop

def from_module(module: nn.Module) -> Tuple[Dict[str, Any], Callable]:
    """Split an ``mlx.nn`` module into ``(params, apply_fn)``.

    ``params`` is ``module.parameters()`` (the same arrays, shared); ``apply_fn(params,
    *args, **kwargs)`` runs the module's ``__call__`` with ``params`` swapped in and
    restores the module's own parameters afterwards, so the module is left as it was.
    ``apply_fn`` is a pure function of ``params`` and works under ``mx.grad``,
    ``mx.compile`` and ``mx.vmap``. (Not safe to call from two threads at once.)
    """

    def apply_fn(params: Dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        own = module.parameters()
        module.update(params)
        try:
            return module(*args, **kwargs)
        finally:
            module.update(own)

    return module.parameters(), apply_fn


def to_module(params: Dict[str, Any], module: nn.Module) -> nn.Module:
    """Load functional ``params`` into ``module`` (sharing the arrays) and return it.

    The trees must match exactly: a path missing on either side or a shape conflict
    raises ``ValueError`` naming the path and both shapes.
    """
    mine = dict(tree_flatten(module.parameters()))
    theirs = dict(tree_flatten(params))
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or extra:
        raise ValueError(f"[to_module] {type(module).__name__} parameters do not match: missing {missing}, "
                         f"unexpected {extra}")
    for name, value in theirs.items():
        if tuple(value.shape) != tuple(mine[name].shape):
            raise ValueError(f"[to_module] parameter '{name}': given shape {tuple(value.shape)} conflicts with "
                             f"{type(module).__name__}'s {tuple(mine[name].shape)}")
    return module.update(params)
