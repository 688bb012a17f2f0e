"""Each functional net against the module it mirrors, given the same parameters.

Checked per net: ``trace`` gives the module's parameter tree (names and shapes);
outputs, parameter gradients and input gradients equal the module's. Where the
functional net runs the very same ops as the module (shared math over a mapping),
the results are bit-identical, so the comparison is exact (``array_equal``).
"""

import mlx_zeta  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_zeta import functional as F
from mlx_zeta.nn import Attention, FeedForward, RMSNorm


def _assert_same(a, b, what, exact=True):
    a, b = np.array(a), np.array(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if exact:
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=what)


def flat_shapes(tree):
    """{'a.b.weight': shape}: parameter names and shapes (a module's empty sub-dicts drop out)."""
    return {name: tuple(v.shape) for name, v in tree_flatten(tree)}


def check_against_module(module, net, inputs, exact=True, **hyper):
    """trace tree == module tree; forward, parameter and input gradients equal."""
    traced = F.trace(net, mx.random.key(1), *inputs, **hyper)
    assert flat_shapes(traced) == flat_shapes(module.parameters())
    params = module.parameters()

    out_m = module(*inputs)
    out_f = net(params, *inputs, **hyper)
    _assert_same(out_f, out_m, "forward", exact)
    g = mx.random.normal(out_m.shape, key=mx.random.key(7))

    def loss_m(p, *xs):
        module.update(p)
        return (module(*xs) * g).sum()

    def loss_f(p, *xs):
        return (net(p, *xs, **hyper) * g).sum()

    argnums = tuple(range(1 + len(inputs)))
    grads_m = mx.grad(loss_m, argnums=argnums)(params, *inputs)
    grads_f = mx.grad(loss_f, argnums=argnums)(params, *inputs)
    flat_m, flat_f = dict(tree_flatten(grads_m[0])), dict(tree_flatten(grads_f[0]))
    assert sorted(flat_m) == sorted(flat_f)
    for name in flat_m:
        _assert_same(flat_f[name], flat_m[name], f"grad of {name}", exact)
    for i in range(len(inputs)):
        _assert_same(grads_f[1 + i], grads_m[1 + i], f"grad of input {i}", exact)


X = mx.random.normal((2, 5, 12), key=mx.random.key(3))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_mlx_linear(bias):
    check_against_module(nn.Linear(12, 7, bias=bias), F.linear, [X], dim_out=7, bias=bias)


@pytest.mark.parametrize("kwargs,hyper", [
    ({}, {}),
    ({"dim_out": 6, "mult": 2}, {"dim_out": 6, "mult": 2}),
    ({"glu": True, "glu_mult_bias": True, "post_act_ln": True}, {"glu": True, "glu_mult_bias": True, "post_act_ln": True}),
    ({"swiglu": True, "no_bias": True}, {"glu": True, "activation": nn.silu, "bias": False}),
    ({"swish": True}, {"activation": nn.silu}),
])
def test_mlp_matches_feedforward(kwargs, hyper):
    check_against_module(FeedForward(12, **kwargs), F.mlp, [X], **hyper)


def test_mlp_zero_init_output_traces_zeros():
    params = F.trace(F.mlp, mx.random.key(0), X, zero_init_output=True)
    assert not params["proj_out"]["weight"].any().item() and not params["proj_out"]["bias"].any().item()
    assert mx.array_equal(F.mlp(params, X), mx.zeros_like(X)).item()


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"affine": False}, {"eps": 1e-3}])
def test_layer_norm_matches_mlx_layer_norm(kwargs):
    module = nn.LayerNorm(12, **kwargs)
    if kwargs.get("affine", True):
        module.update({k: mx.random.normal(v.shape) for k, v in module.parameters().items()})
    check_against_module(module, F.layer_norm, [X], **kwargs)


def test_rms_norm_matches_zeta_rms_norm():
    module = RMSNorm(12)
    module.gamma = mx.random.normal((12,))
    check_against_module(module, F.rms_norm, [X])


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "bias": False}, {"groups": 3}])
def test_conv_1d_matches_mlx_conv1d(kwargs):
    x = mx.random.normal((2, 9, 6))
    module = nn.Conv1d(6, 9, 3, **kwargs)
    if "bias" in module:
        module.bias = mx.random.normal(module.bias.shape)
    check_against_module(module, F.conv_1d, [x], dim_out=9, kernel_size=3, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": (1, 0)}, {"groups": 2, "bias": False}])
def test_conv_2d_matches_mlx_conv2d(kwargs):
    x = mx.random.normal((2, 7, 6, 4))
    module = nn.Conv2d(4, 6, (3, 2), **kwargs)
    if "bias" in module:
        module.bias = mx.random.normal(module.bias.shape)
    check_against_module(module, F.conv_2d, [x], dim_out=6, kernel_size=(3, 2), **kwargs)


@pytest.mark.parametrize("shape,module", [((2, 8, 3), nn.MaxPool1d(2)), ((2, 6, 6, 3), nn.MaxPool2d(3, stride=2, padding=1))])
def test_max_pool_matches_mlx_pooling(shape, module):
    x = mx.random.normal(shape)
    kwargs = {"kernel_size": 2} if len(shape) == 3 else {"kernel_size": 3, "stride": 2, "padding": 1}
    _assert_same(F.max_pool(x, **kwargs), module(x), "forward")
    g = mx.random.normal(module(x).shape)
    _assert_same(mx.grad(lambda x: (F.max_pool(x, **kwargs) * g).sum())(x),
                 mx.grad(lambda x: (module(x) * g).sum())(x), "grad of input")


def test_dropout_with_a_key():
    x = mx.random.normal((64, 64)) + 3.0
    key = mx.random.key(5)
    y = F.dropout(key, x, 0.25)
    assert mx.array_equal(y, F.dropout(key, x, 0.25)).item()  # same key, same mask
    assert not mx.array_equal(y, F.dropout(mx.random.key(6), x, 0.25)).item()
    kept = y != 0
    np.testing.assert_allclose(np.array(y)[np.array(kept)], np.array(x / 0.75)[np.array(kept)], rtol=1e-6)
    assert abs(kept.mean().item() - 0.75) < 0.03  # 4096 draws: std of the mean ~ 0.007
    assert F.dropout(key, x, 0.25, training=False) is x and F.dropout(key, x, 0.0) is x
    with pytest.raises(ValueError, match="rate"):
        F.dropout(key, x, 1.0)


@pytest.mark.parametrize("kwargs", [
    {"heads": 4},
    {"heads": 4, "kv_heads": 2, "causal": True},
    {"heads": 2, "dim_head": 5, "qk_norm": True, "bias": True},
    {"heads": 4, "flash": False, "causal": True},
])
def test_self_attention_matches_attention(kwargs):
    module = Attention(12, **kwargs)
    if "q_norm" in module:
        module.q_norm.weight = mx.random.normal((module.dim_head,))
    check_against_module(module, F.multi_head_self_attention, [X], **kwargs)


def test_cross_attention_matches_attention():
    module = Attention(12, heads=3, kv_heads=1)
    context = mx.random.normal((2, 4, 12))
    check_against_module(lambda_module(module), F.multi_head_attention, [X, context], heads=3, kv_heads=1)


def test_attention_mask_matches():
    module = Attention(12, heads=4)
    mask = mx.array([[True] * 5, [True, True, True, False, False]])
    params = module.parameters()
    _assert_same(F.multi_head_self_attention(params, X, heads=4, mask=mask), module(X, mask=mask), "masked forward")


class lambda_module(nn.Module):
    """Wrap a block so its call takes (x, context) positionally, like the functional net."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def __call__(self, x, context):
        return self.block(x, context)

    def parameters(self):
        return self.block.parameters()

    def update(self, params, strict=True):
        self.block.update(params, strict)
        return self


class Branches(nn.Module):
    def __init__(self, dim, n, dim_out):
        super().__init__()
        self.layers = [nn.Linear(dim, dim_out) for _ in range(n)]

    def __call__(self, x):
        return mx.stack([layer(x) for layer in self.layers])


def test_branch_linear_matches_list_of_linears():
    module = Branches(12, 3, 4)
    net = lambda p, x: mx.stack(F.branch_linear(p["layers"], x, 3, 4))  # noqa: E731
    check_against_module(module, net, [X])
    outs = F.branch_linear(module.parameters()["layers"], X, 3, 4)
    assert len(outs) == 3 and not mx.array_equal(outs[0], outs[1]).item()
