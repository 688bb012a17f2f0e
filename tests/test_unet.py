"""U-Net and its parts: parity with a torch NCHW reference (train and eval batch norm), laws, errors."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten, tree_unflatten
from parity import TORCH_DEVICE, assert_close, check_parity, copy_params, to_numpy, to_torch

from mlx_zeta.nn.unet import DoubleConv, Down, OutConv, Unet, Up, _pad_to
from reference.vision import (DoubleConvRef, DownRef, OutConvRef, UnetRef, UpRef, conv_layout,
                              conv_transpose_layout, nhwc)

LOW = [mx.float16, mx.bfloat16]


def conv_param_map(module: nn.Module) -> dict:
    """Layouts for every 4-D weight: the ``up`` ones are transposed convolutions."""
    out = {}
    for name, value in tree_flatten(module.trainable_parameters()):
        if value.ndim == 4:
            transposed = name == "up.weight" or name.endswith(".up.weight")
            out[name] = (name, conv_transpose_layout if transposed else conv_layout)
    return out


def running_stats(module: nn.Module) -> dict:
    return {k: v for k, v in tree_flatten(module.parameters()) if k.endswith(("running_mean", "running_var"))}


def randomize_running_stats(module: nn.Module, torch_module: torch.nn.Module, rng) -> None:
    """Non-trivial running statistics, the same on both sides (for eval-mode parity)."""
    buffers = dict(torch_module.named_buffers())
    new = []
    for name, value in running_stats(module).items():
        r = rng.standard_normal(value.shape).astype(np.float32)
        arr = 0.5 * r if name.endswith("mean") else np.exp(0.5 * r)
        new.append((name, mx.array(arr).astype(value.dtype)))
        with torch.no_grad():
            buffers[name].copy_(to_torch(new[-1][1]))
    module.update(tree_unflatten(new))


def set_mode(train: bool, *modules) -> None:
    for m in modules:
        m.train(train)


def forward_parity(m: nn.Module, ref: torch.nn.Module, inputs, dtype, train: bool, rng, scale: float = 1.0) -> None:
    """Forward of ``m`` in ``dtype`` against ``ref`` in float32 on the same rounded weights and inputs."""
    set_mode(train, m, ref)
    m.set_dtype(dtype)
    copy_params(m, ref, conv_param_map(m))
    if not train:
        randomize_running_stats(m, ref, rng)
    xs = [mx.array(x).astype(dtype) for x in inputs]
    expected = ref(*(to_torch(x).permute(0, 3, 1, 2) for x in xs)).permute(0, 2, 3, 1)
    assert_close(m(*xs), expected, dtype, scale=scale)


def unet_case(size, bilinear: bool, train: bool, rng, batch: int = 2):
    m = Unet(n_channels=3, n_classes=2, bilinear=bilinear, base_channels=4)
    ref = UnetRef(3, 2, bilinear, 4)
    x = rng.standard_normal((batch, *size, 3)).astype(np.float32)
    return m, ref, x


SIZES = [(16, 16), (17, 19), (33, 31)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bilinear", [False, True], ids=["convT", "bilinear"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_unet_parity(size, bilinear, train, rng):
    """Whole U-Net, float32, forward and every gradient, batch norm on batch or running statistics."""
    # Train mode needs >= 4 values per channel at the bottleneck (batch * (H // 16) * (W // 16)): with 2,
    # batch norm maps them to +-1 whatever the input and its input gradient is pure rounding noise.
    batch = 4 if train and (size[0] // 16) * (size[1] // 16) < 2 else 2
    m, ref, x = unet_case(size, bilinear, train, rng, batch)
    set_mode(train, m, ref)
    if not train:
        randomize_running_stats(m, ref, rng)
    # Train-mode batch norm couples every position of a channel and divides by its standard deviation
    # over only 4-8 values at the bottleneck, which amplifies float32 rounding in the gradients of
    # everything below it: torch's own float32 gradients here differ from its float64 ones by up to 30x
    # the harness tolerance (measured), ours from torch's by up to 70x. The error stays below 1e-5 of the
    # largest gradient element (~300); any real mistake (layout, padding, statistics) is O(1) relative.
    check_parity(m, ref, [x], param_map=conv_param_map(m), torch_call=nhwc(lambda t, x: t(x)),
                 grad_scale=100.0 if train else 1.0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bilinear", [False, True], ids=["convT", "bilinear"])
@pytest.mark.parametrize("size", [(16, 16), (33, 31)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_unet_forward_low_precision(size, bilinear, train, dtype, rng):
    """Whole U-Net forward in float16/bfloat16 at the harness tolerance.

    Its gradients are not compared element by element in low precision (norm-wise: see
    test_unet_gradients_low_precision_normwise): rounding moves some of the ~10^4
    pre-activations across ReLU / max-pool kinks, each flip changes one gradient term by O(1), and batch
    norm spreads it over the channel (measured relative errors 0.1-1). Low-precision gradients are
    checked on each part instead (test_part_parity).
    """
    m, ref, x = unet_case(size, bilinear, train, rng, batch=4 if train and size == (16, 16) else 2)
    # bfloat16 in train mode: the bottleneck's batch norm (4 values per channel) amplifies its 8-bit
    # rounding; measured up to 1.4x the harness tolerance on a handful of output pixels.
    forward_parity(m, ref, [x], dtype, train, rng, scale=2.0 if train and dtype == mx.bfloat16 else 1.0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("bilinear", [False, True], ids=["convT", "bilinear"])
def test_unet_gradients_low_precision_normwise(bilinear, dtype, rng):
    """Whole U-Net gradients in float16/bfloat16 (eval mode), compared norm-wise over all of them.

    Element-wise comparison is meaningless here (see test_unet_forward_low_precision), and so is a
    per-tensor one: a small batch-norm gradient can be dominated by a few ReLU/max-pool flips (measured
    per-tensor relative errors up to 1.1). Over the input and every parameter together,
    sqrt(sum ||g - g_ref||^2 / sum ||g_ref||^2) <= 0.2, with g_ref from the float32 torch reference on
    the same rounded weights and inputs; measured at most 0.09 over 40 runs (sizes 16x16 and 33x31, both
    modes, both dtypes, 5 seeds). A dtype-handling bug (a cast lost, an upsample left in float32 for the
    next layer's weights) shifts whole layers and gives an error of order 1.
    """
    m, ref, x = unet_case((16, 16), bilinear, False, rng)
    set_mode(False, m, ref)
    m.set_dtype(dtype)
    mapping = copy_params(m, ref, conv_param_map(m))
    randomize_running_stats(m, ref, rng)
    xm = mx.array(x).astype(dtype)
    xt = to_torch(xm, requires_grad=True)
    out = nhwc(lambda t, x: t(x))(ref, xt)
    g = np.random.default_rng(1).standard_normal(tuple(out.shape)).astype(np.float32)
    (out * torch.from_numpy(g).to(out.device)).sum().backward()

    def loss(params, images):
        m.update(params)
        return (m(images).astype(mx.float32) * mx.array(g)).sum()

    grads, grad_x = mx.grad(loss, argnums=(0, 1))(m.trainable_parameters(), xm)
    torch_params = dict(ref.named_parameters())
    pairs = [("input", to_numpy(grad_x), xt.grad)]
    for name, value in tree_flatten(grads):
        tname, layout = mapping[name]
        pairs.append((name, layout(to_numpy(value)) if layout else to_numpy(value), torch_params[tname].grad))
    errors = {}
    for name, ours, theirs in pairs:
        theirs = theirs.detach().cpu().double().numpy()
        errors[name] = (np.linalg.norm(ours - theirs), np.linalg.norm(theirs))
    whole = np.sqrt(sum(e * e for e, _ in errors.values()) / sum(n * n for _, n in errors.values()))
    worst = max(errors, key=lambda k: errors[k][0] / errors[k][1])
    assert whole <= 0.2, (f"relative gradient error {whole:.3f} over all gradients ({dtype}); "
                          f"worst tensor {worst}: {errors[worst][0] / errors[worst][1]:.3f}")


PARTS = {
    "DoubleConv": (lambda: DoubleConv(3, 6), lambda: DoubleConvRef(3, 6), [(2, 9, 7, 3)]),
    "DoubleConv-mid": (lambda: DoubleConv(3, 6, 4), lambda: DoubleConvRef(3, 6, 4), [(2, 9, 7, 3)]),
    "Down": (lambda: Down(4, 6), lambda: DownRef(4, 6), [(2, 9, 8, 4)]),
    "OutConv": (lambda: OutConv(4, 3), lambda: OutConvRef(4, 3), [(2, 5, 6, 4)]),
    # x then the skip connection: sizes 2h or 2h + 1 (the Unet cases) and + 3 (uneven padding both sides)
    "Up-convT": (lambda: Up(8, 5, bilinear=False), lambda: UpRef(8, 5, False), [(2, 3, 4, 8), (2, 7, 11, 4)]),
    "Up-bilinear": (lambda: Up(8, 5), lambda: UpRef(8, 5, True), [(2, 3, 4, 4), (2, 6, 9, 4)]),
}


def nhwc_all(t, *xs):
    return t(*(x.permute(0, 3, 1, 2) for x in xs)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("part", sorted(PARTS))
def test_part_parity(part, train, dtype, rng):
    """Each part, forward and every gradient, in float32 and float16."""
    make, make_ref, shapes = PARTS[part]
    m, ref = make(), make_ref()
    set_mode(train, m, ref)
    m.set_dtype(dtype)
    if not train:
        randomize_running_stats(m, ref, rng)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    # float16 weight gradients sum a few hundred products and reach ~60 in magnitude; their rounding error
    # scales with that magnitude (measured <= 1.1e-3 relative, up to 1.6x the absolute 1e-2 atol).
    grad_scale = 2.0 if dtype == mx.float16 and train else 1.0
    check_parity(m, ref, inputs, dtype=dtype, param_map=conv_param_map(m), torch_call=nhwc_all,
                 grad_scale=grad_scale)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("part", sorted(PARTS))
def test_part_forward_bfloat16(part, train, rng):
    """bfloat16 forward of each part. (Its 8-bit mantissa moves pre-activations across ReLU kinks often
    enough that element-wise gradient comparisons measure the kinks, not the code: float16 covers those.)"""
    make, make_ref, shapes = PARTS[part]
    forward_parity(make(), make_ref(), [rng.standard_normal(s).astype(np.float32) for s in shapes],
                   mx.bfloat16, train, rng)


@pytest.mark.parametrize("bilinear", [False, True], ids=["convT", "bilinear"])
def test_running_stats_after_one_training_step(bilinear, rng):
    """One training forward updates every running_mean/var as torch does (unbiased variance, momentum 0.1)."""
    m = Unet(n_channels=2, n_classes=3, bilinear=bilinear, base_channels=4)
    ref = UnetRef(2, 3, bilinear, 4).to(TORCH_DEVICE)
    copy_params(m, ref, conv_param_map(m))
    x = rng.standard_normal((2, 17, 19, 2)).astype(np.float32)
    mx.eval(m(mx.array(x)))
    ref(to_torch(x).permute(0, 3, 1, 2))
    buffers = dict(ref.named_buffers())
    stats = running_stats(m)
    assert len(stats) == 2 * 2 * 9  # 9 DoubleConvs, 2 batch norms each, mean and var
    for name, value in stats.items():
        assert not np.allclose(to_numpy(value), 0.0 if name.endswith("mean") else 1.0), name
        assert_close(value, buffers[name], what=name)


def test_unet_572_matches_reference():
    """The paper's 572x572 tile gives a 572x572 map (zeta's docstring says 388: that is the unpadded
    original); the fixed-seed output matches torch. Forward only, batch 1, width 2 to stay fast."""
    mx.random.seed(572)
    m = Unet(n_channels=1, n_classes=2, base_channels=2)
    ref = UnetRef(1, 2, False, 2).to(TORCH_DEVICE)
    copy_params(m, ref, conv_param_map(m))
    x = np.random.default_rng(572).standard_normal((1, 572, 572, 1)).astype(np.float32)
    out = m(mx.array(x))
    assert out.shape == (1, 572, 572, 2)
    with torch.no_grad():
        expected = nhwc(lambda t, x: t(x))(ref, to_torch(x))
    # Batch statistics here average 327k pixels per channel; MLX's CPU reductions accumulate them in
    # sequence (mean off by ~1e-5 relative, variance ~1e-4, against torch's ~1e-7), which after 18 batch
    # norms gives output errors up to ~5x the harness tolerance (measured). 10x (1e-4) still fails any
    # layout, padding or statistics mistake, which are O(1). The gradient is not compared at this size:
    # among ~10^6 pre-activations some sit within rounding of a ReLU kink, so gradients differ there.
    assert_close(out, expected, scale=10)


def test_pad_to_hand_values():
    """(2, 3) -> (3, 6): rows 0 before / 1 after, columns 1 before / 2 after (diff // 2 first)."""
    x = mx.ones((1, 2, 3, 1))
    out = np.array(_pad_to(x, 3, 6))[0, :, :, 0]
    expected = np.array([[0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_bilinear_upsample_matches_torch_align_corners(rng):
    """mlx's Upsample(mode='linear', align_corners=True) is torch's bilinear align_corners=True."""
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    out = nn.Upsample(scale_factor=2, mode="linear", align_corners=True)(mx.array(x))
    expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear",
                             align_corners=True).permute(0, 2, 3, 1)
    assert_close(out, expected)
    # By hand: align_corners maps output j of 4 to input position j * (2 - 1) / (4 - 1) = j / 3, so a row
    # [a, b] becomes [a, (2a + b) / 3, (a + 2b) / 3, b]; with a = 0, b = 3 that is [0, 1, 2, 3].
    row = nn.Upsample(scale_factor=(1, 2), mode="linear", align_corners=True)(mx.array([[[[0.0], [3.0]]]]))
    np.testing.assert_allclose(np.array(row)[0, 0, :, 0], [0.0, 1.0, 2.0, 3.0], atol=1e-6)


def test_eval_double_conv_with_fresh_stats_is_conv_relu(rng):
    """Fresh batch norm (mean 0, var 1, weight 1, bias 0) in eval is x / sqrt(1 + eps)."""
    m = DoubleConv(3, 4)
    m.eval()
    x = mx.array(rng.standard_normal((1, 6, 6, 3)).astype(np.float32))
    k = float(1 / np.sqrt(1 + 1e-5))
    expected = nn.relu(k * m.conv2(nn.relu(k * m.conv1(x))))
    assert_close(m(x), expected)


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (31, 17), (47, 64)])
def test_unet_keeps_spatial_size(bilinear, size):
    m = Unet(n_channels=2, n_classes=5, bilinear=bilinear, base_channels=2)
    out = m(mx.zeros((2, *size, 2)))
    assert out.shape == (2, *size, 5)


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_widths(bilinear):
    """zeta's widths at base 64: 64..1024 (512 at the bottleneck with bilinear)."""
    m = Unet(n_channels=1, n_classes=2, bilinear=bilinear)
    assert m.inc.conv1.weight.shape == (64, 3, 3, 1)
    assert m.down4.conv.conv2.weight.shape[0] == (512 if bilinear else 1024)
    assert m.outc.conv.weight.shape == (2, 1, 1, 64)
    assert ("weight" in m.up1.up) == (not bilinear)


def test_unet_errors():
    m = Unet(n_channels=3, n_classes=2, base_channels=2)
    with pytest.raises(ValueError, match=r"\[Unet\] expected input of shape \(batch, height, width, 3\), got \(2, 16, 16, 1\)"):
        m(mx.zeros((2, 16, 16, 1)))
    with pytest.raises(ValueError, match=r"\[Unet\] expected input of shape \(batch, height, width, 3\), got \(16, 16, 3\)"):
        m(mx.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match=r"\[Unet\] expected height and width of at least 16 .* got \(2, 15, 32, 3\)"):
        m(mx.zeros((2, 15, 32, 3)))
    with pytest.raises(ValueError, match=r"\[Unet\] training-mode batch norm needs at least 2 values per channel"):
        m(mx.zeros((1, 16, 31, 3)))
    m.eval()
    assert m(mx.zeros((1, 16, 31, 3))).shape == (1, 16, 31, 2)  # running statistics: batch 1 is fine
    for kwargs, name in [(dict(n_channels=0, n_classes=2), "n_channels"), (dict(n_channels=1, n_classes=2.0), "n_classes"),
                         (dict(n_channels=1, n_classes=2, base_channels=0), "base_channels")]:
        with pytest.raises(ValueError, match=rf"\[Unet\] {name} must be a positive int"):
            Unet(**kwargs)


def test_part_errors():
    with pytest.raises(ValueError, match=r"\[DoubleConv\] expected input of shape \(batch, height, width, 3\), got \(1, 4, 4, 2\)"):
        DoubleConv(3, 4)(mx.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"\[DoubleConv\] mid_channels must be a positive int, got 0"):
        DoubleConv(3, 4, 0)
    with pytest.raises(ValueError, match=r"\[Down\] expected height and width of at least 2 to pool, got \(2, 1, 4, 3\)"):
        Down(3, 4)(mx.zeros((2, 1, 4, 3)))
    with pytest.raises(ValueError, match=r"\[OutConv\] expected input of shape \(batch, height, width, 4\)"):
        OutConv(4, 2)(mx.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"\[Up\] in_channels must be at least 2"):
        Up(1, 2)
    up = Up(8, 4, bilinear=False)
    with pytest.raises(ValueError, match=r"\[Up\] expected input of shape \(batch, height, width, 8\), got \(1, 2, 2, 4\)"):
        up(mx.zeros((1, 2, 2, 4)), mx.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"\[Up\] expected skip connection of shape \(batch, height, width, 4\), got \(1, 4, 4, 8\)"):
        up(mx.zeros((1, 2, 2, 8)), mx.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"\[Up\] expected a skip connection of shape \(batch=1, >= 4, >= 6, 4\), got \(1, 3, 6, 4\)"):
        up(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 3, 6, 4)))
    with pytest.raises(ValueError, match=r"\[Up\] expected input of shape \(batch, height, width, 4\)"):
        Up(8, 4)(mx.zeros((1, 2, 2, 8)), mx.zeros((1, 4, 4, 4)))  # bilinear: x has in_channels // 2
