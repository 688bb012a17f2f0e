"""mlx_zeta.functional core: trace, validate, placeholders, composition, transforms, module interop."""

import math
from pathlib import Path

import mlx_zeta  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_zeta import functional as F
from mlx_zeta.functional import _
from mlx_zeta.nn import FeedForward
from scripts import load_script

X = mx.random.normal((3, 4, 8), key=mx.random.key(2))


def flat_shapes(tree):
    return {name: tuple(v.shape) for name, v in tree_flatten(tree)}


def two_layer(params, x, hidden=16):
    h = nn.relu(F.linear(params["fc1"], x, hidden))
    return F.linear(params["fc2"], h, 2)


# ---------------------------------------------------------------- trace and validate

def test_trace_infers_shapes_from_inputs_and_hyper():
    params = F.trace(two_layer, mx.random.key(0), X, hidden=5)
    assert F.tree_shapes(params) == {"fc1": {"weight": (5, 8), "bias": (5,)}, "fc2": {"weight": (2, 5), "bias": (2,)}}
    bound = 1 / np.sqrt(8)  # nn.Linear's U(-1/sqrt(in), 1/sqrt(in))
    assert mx.abs(params["fc1"]["weight"]).max().item() <= bound


def test_trace_is_deterministic_in_the_key_and_draws_fresh_keys():
    a = F.trace(two_layer, mx.random.key(0), X)
    b = F.trace(two_layer, mx.random.key(0), X)
    c = F.trace(two_layer, mx.random.key(1), X)
    assert all(mx.array_equal(u, v).item() for (__, u), (___, v) in zip(tree_flatten(a), tree_flatten(b)))
    assert not mx.array_equal(a["fc1"]["weight"], c["fc1"]["weight"]).item()
    assert not mx.array_equal(a["fc1"]["bias"], a["fc2"]["bias"][:2]).item()


def test_trace_integer_keys_give_lists_and_shared_paths_share_arrays():
    def net(params, x):
        x = F.linear(params["layers"][0], x, 8)
        x = F.linear(params["layers"][1], x, 8)
        return F.linear(params["layers"][0], x, 8)  # weight tying: same path, same array

    params = F.trace(net, mx.random.key(0), X)
    assert isinstance(params["layers"], list) and len(params["layers"]) == 2


def test_validate_custom_init_and_errors():
    def net(params, x):
        scale = F.validate(params["scale"], (x.shape[-1],), init=F.ones)
        shift = F.validate(params["shift"], (x.shape[-1],), init=lambda key, shape: mx.full(shape, 0.5))
        return x * scale + shift

    params = F.trace(net, mx.random.key(0), X)
    assert mx.array_equal(net(params, X), X + 0.5).item()
    assert F.validate(params["scale"], (8,)) is params["scale"]  # identity at apply time
    with pytest.raises(ValueError, match=r"conflicts with declared shape \(9,\)"):
        F.validate(params["scale"], (9,))
    with pytest.raises(ValueError, match=r"^\[validate\] init of parameter 'w' returned shape \(3,\), declared shape \(2,\)$"):
        F.trace(lambda p, x: F.validate(p["w"], (2,), init=lambda key, shape: mx.zeros((3,))), mx.random.key(0), X)


def test_validate_without_init_traces_zephyrs_readme_pattern():
    """zephyr's README: ``x @ validate(params["weights"], (x.shape[-1], out_target))`` with no initializer
    (before: "needs an init to be traced"). The default is zephyr's: weights (rank >= 2) are
    z / sqrt(shape[0]) with z a standard normal truncated to (-2, 2); biases (rank <= 1) are zeros."""
    def model(params, x, out_target):
        return x @ F.validate(params["weights"], (x.shape[-1], out_target)) + F.validate(params["bias"], (out_target,))

    x, key = mx.ones((2, 256)), mx.random.key(5)
    params = F.trace(model, key, x, out_target=64)
    w = params["weights"]
    assert F.tree_shapes(params) == {"weights": (256, 64), "bias": (64,)}
    assert mx.array_equal(params["bias"], mx.zeros((64,))).item()
    # determinism under the key, by hand: the first parameter draws with the second half of split(key)
    want = mx.random.truncated_normal(-2.0, 2.0, (256, 64), key=mx.random.split(key)[1]) / 16
    assert mx.array_equal(w, want).item()
    assert not mx.array_equal(w, F.trace(model, mx.random.key(6), x, out_target=64)["weights"]).item()
    # statistics: a standard normal truncated to (-2, 2) has variance 1 - 4 phi(2) / (2 Phi(2) - 1), scaled by 1/16
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    std = math.sqrt(1 - 4 * phi2 / math.erf(math.sqrt(2.0))) / 16  # 0.8796 / 16
    values = np.array(w, dtype=np.float64).ravel()  # 16384 draws: the std's relative error is ~0.5%
    assert abs(values.std() / std - 1) < 0.03
    assert abs(values.mean()) < 4 * std / math.sqrt(values.size)
    assert np.abs(values).max() < 2 / 16  # truncated: a plain normal exceeds 2 sigma ~750 times in 16384 draws
    assert model(params, x, 64).shape == (2, 64)


def test_loaded_parameter_with_wrong_shape_names_path_and_both_shapes():
    params = F.trace(two_layer, mx.random.key(0), X)
    params["fc2"]["weight"] = mx.zeros((2, 7))
    with pytest.raises(ValueError) as err:
        F.check(two_layer, params, X)
    message = str(err.value)
    assert "'fc2.weight'" in message and "(2, 7)" in message and "(2, 16)" in message
    del params["fc2"]["bias"]
    params["fc2"]["weight"] = mx.zeros((2, 16))
    with pytest.raises(ValueError, match=r"'fc2.bias'.*missing"):
        F.check(two_layer, params, X)


def test_check_applies_the_net_when_parameters_fit():
    params = F.trace(two_layer, mx.random.key(0), X)
    assert mx.array_equal(F.check(two_layer, params, X), two_layer(params, X)).item()


# ---------------------------------------------------------------- placeholders and composition

def test_placeholders_fill_holes_left_to_right():
    params = F.trace(two_layer, mx.random.key(0), X)
    fc1 = params["fc1"]
    expected = F.linear(fc1, X, 16)
    assert mx.array_equal(F.linear(_, _, 16)(fc1, X), expected).item()
    assert mx.array_equal(F.linear(fc1, _, 16)(X), expected).item()
    assert mx.array_equal(F.linear(_, X, _)(fc1, 16), expected).item()
    traced = F.trace(F.linear(_, _, 16), mx.random.key(0), X)  # a partially applied net traces too
    assert F.tree_shapes(traced) == {"weight": (16, 8), "bias": (16,)}
    with pytest.raises(TypeError, match="hole"):
        F.linear(_, _, 16)(fc1)


def test_chain_and_skip_equal_manual_composition():
    params = F.trace(lambda p, x: F.mlp(p["ff"], F.layer_norm(p["norm"], x)), mx.random.key(0), X)
    manual = X + F.mlp(params["ff"], F.layer_norm(params["norm"], X))
    block = F.skip(F.chain([F.layer_norm(params["norm"], _), F.mlp(params["ff"], _)]))
    assert mx.array_equal(block(X), manual).item()
    assert mx.array_equal(F.skip(F.chain([F.layer_norm(params["norm"], _), F.mlp(params["ff"], _)]), X), manual).item()
    assert F.chain([])(X) is X


def test_thread_params_and_thread_key():
    def net(params, x, key):
        layers = F.thread_params([F.linear(_, _, 8), F.linear(_, _, 8)], params["layers"])
        drops = F.thread_key([F.dropout(_, _, 0.5), F.dropout(_, _, 0.5)], key)
        return F.chain([layers[0], drops[0], layers[1], drops[1]])(x)

    key = mx.random.key(3)
    params = F.trace(net, mx.random.key(0), X, key)
    assert flat_shapes(params) == {f"layers.{i}.{n}": s for i in (0, 1) for n, s in (("weight", (8, 8)), ("bias", (8,)))}
    k0, k1 = mx.random.split(key, 2)
    manual = F.dropout(k1, F.linear(params["layers"][1], F.dropout(k0, F.linear(params["layers"][0], X, 8), 0.5), 8), 0.5)
    assert mx.array_equal(net(params, X, key), manual).item()


# ---------------------------------------------------------------- transforms

def test_grad_and_value_and_grad_agree_with_finite_differences():
    params = F.trace(two_layer, mx.random.key(0), X)
    loss = lambda p: mx.sum(two_layer(p, X) ** 2)  # noqa: E731
    value, grads = mx.value_and_grad(loss)(params)
    assert mx.allclose(value, loss(params)).item()
    g = mx.grad(loss)(params)
    assert all(mx.array_equal(a, b).item() for (__, a), (___, b) in zip(tree_flatten(grads), tree_flatten(g)))
    # d loss / d fc2.bias[0] = sum over rows of 2 * out[..., 0]
    expected = 2 * two_layer(params, X)[..., 0].sum()
    np.testing.assert_allclose(grads["fc2"]["bias"][0].item(), expected.item(), rtol=1e-5)


def test_compile_equals_uncompiled():
    net = lambda p, x: F.multi_head_self_attention(p["attn"], F.mlp(p["ff"], x, glu=True), heads=2, causal=True)  # noqa: E731
    params = F.trace(net, mx.random.key(0), X)
    eager = net(params, X)
    compiled = mx.compile(net)
    np.testing.assert_allclose(np.array(compiled(params, X)), np.array(eager), rtol=1e-5, atol=1e-6)
    loss = lambda p, x: net(p, x).sum()  # noqa: E731
    g_eager = mx.grad(loss)(params, X)
    g_comp = mx.compile(mx.grad(loss))(params, X)
    for (name, a), (__, b) in zip(tree_flatten(g_comp), tree_flatten(g_eager)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_vmap_over_inputs_and_over_params_equals_a_loop():
    params = F.trace(two_layer, mx.random.key(0), X[0])
    batched = mx.vmap(two_layer, in_axes=(None, 0))(params, X)
    looped = mx.stack([two_layer(params, X[i]) for i in range(X.shape[0])])
    np.testing.assert_allclose(np.array(batched), np.array(looped), rtol=1e-6, atol=1e-6)
    ensemble = [F.trace(two_layer, mx.random.key(s), X[0]) for s in range(3)]  # 3 models, stacked
    stacked = {k: {n: mx.stack([e[k][n] for e in ensemble]) for n in ("weight", "bias")} for k in ("fc1", "fc2")}
    out = mx.vmap(two_layer, in_axes=(0, None))(stacked, X[0])
    for i, e in enumerate(ensemble):
        np.testing.assert_allclose(np.array(out[i]), np.array(two_layer(e, X[0])), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- module interop

def test_from_module_gives_params_and_a_pure_apply_fn():
    module = FeedForward(8, glu=True)
    params, apply_fn = F.from_module(module)
    before = module.proj_in.weight
    assert mx.array_equal(apply_fn(params, X), module(X)).item()
    zeros = {k: mx.zeros_like(v) for k, v in tree_flatten(params)}
    from mlx.utils import tree_unflatten
    assert not apply_fn(tree_unflatten(list(zeros.items())), X).any().item()
    assert module.proj_in.weight is before  # the module itself is untouched
    # the functional mlp shares the module's parameters exactly
    assert mx.array_equal(F.mlp(params, X, glu=True), apply_fn(params, X)).item()
    g = mx.grad(lambda p: apply_fn(p, X).sum())(params)
    assert mx.compile(apply_fn)(params, X).shape == X.shape and flat_shapes(g) == flat_shapes(params)


def test_to_module_loads_traced_params_and_rejects_mismatches():
    params = F.trace(F.mlp, mx.random.key(0), X, post_act_ln=True)
    module = F.to_module(params, FeedForward(8, post_act_ln=True))
    assert module.proj_in.weight is params["proj_in"]["weight"]
    assert mx.array_equal(module(X), F.mlp(params, X, post_act_ln=True)).item()
    with pytest.raises(ValueError, match="missing.*norm"):
        F.to_module(F.trace(F.mlp, mx.random.key(0), X), FeedForward(8, post_act_ln=True))
    with pytest.raises(ValueError, match=r"'proj_in.weight'.*\(64, 8\).*\(32, 8\)"):
        F.to_module(F.trace(F.mlp, mx.random.key(0), X, mult=8), FeedForward(8))


# ---------------------------------------------------------------- the example model

def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "functional_encoder_decoder.py"
    return load_script(path, "functional_encoder_decoder")


def test_example_trace_tree_equals_module_tree_and_outputs_match():
    ex = _example()
    src, tgt_in, target = ex.make_batch(mx.random.key(0), 2)
    params = F.trace(ex.seq2seq, mx.random.key(1), src, tgt_in)
    model = ex.Seq2Seq()
    assert flat_shapes(params) == flat_shapes(model.parameters())
    F.to_module(params, model)
    out = ex.seq2seq(params, src, tgt_in)
    assert mx.array_equal(out, model(src, tgt_in)).item()
    np.testing.assert_allclose(np.array(mx.compile(ex.seq2seq)(params, src, tgt_in)), np.array(out), rtol=1e-5, atol=1e-5)
    grads_f = mx.grad(ex.loss_fn)(params, src, tgt_in, target)
    grads_m = nn.value_and_grad(model, lambda m: mx.mean(mx.square(m(src, tgt_in) - target)))(model)[1]
    flat_m = dict(tree_flatten(grads_m))
    for name, g in tree_flatten(grads_f):
        assert mx.array_equal(g, flat_m[name]).item(), name
