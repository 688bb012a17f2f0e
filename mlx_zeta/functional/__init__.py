"""Functional API: networks as pure functions ``f(params, x, **hyper)`` with shape-inferred parameters.

    >>> import mlx.core as mx
    >>> from mlx_zeta import functional as F
    >>> net = lambda params, x: F.linear(params["out"], F.rms_norm(params["norm"], x), 4)
    >>> params = F.trace(net, mx.random.key(0), mx.zeros((2, 8)))
    >>> F.tree_shapes(params)
    {'norm': {'gamma': (8,)}, 'out': {'weight': (4, 8), 'bias': (4,)}}
    >>> loss, grads = mx.value_and_grad(lambda p, x: net(p, x).sum())(params, mx.ones((2, 8)))

``trace`` creates the parameters by running the net once; ``validate`` declares each
one (identity at apply time, a shape check after loading); ``_`` and ``flexible``
make partially applied nets; ``chain``, ``skip``, ``thread_key``, ``thread_params``
compose them; ``from_module``/``to_module`` move between this style and
``mlx.nn`` modules, which share parameter names and layouts with the nets here.
"""

from mlx_zeta.functional.core import (
    Init,
    Params,
    _,
    chain,
    check,
    default_init,
    flexible,
    from_module,
    normal,
    ones,
    skip,
    thread_key,
    thread_params,
    to_module,
    trace,
    tree_shapes,
    truncated_normal,
    uniform,
    validate,
    zeros,
)
from mlx_zeta.functional.nets import (
    branch_linear,
    conv_1d,
    conv_2d,
    dropout,
    layer_norm,
    linear,
    max_pool,
    mlp,
    multi_head_attention,
    multi_head_self_attention,
    rms_norm,
)

__all__ = [
    "Init", "Params", "_", "branch_linear", "chain", "check", "conv_1d", "conv_2d", "default_init", "dropout", "flexible",
    "from_module", "layer_norm", "linear", "max_pool", "mlp", "multi_head_attention", "multi_head_self_attention",
    "normal", "ones", "rms_norm", "skip", "thread_key", "thread_params", "to_module", "trace", "tree_shapes",
    "truncated_normal", "uniform", "validate", "zeros",
]
