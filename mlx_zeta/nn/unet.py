"""U-Net (Ronneberger et al. 2015) for channels-last images, with its parts.

The layout follows the widely used padded variant (3x3 convolutions with
padding 1, batch normalization): the output has the input's spatial size for
any input of at least 16x16 pixels, odd sizes included.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int

__all__ = ["DoubleConv", "Down", "Up", "OutConv", "Unet"]

_MIN_SIZE = 16  # four 2x2 poolings need at least 16 pixels per side


def _check_image(cls: str, x: mx.array, channels: int, what: str = "input") -> None:
    """Raise ``[cls]`` ValueError unless ``x`` is (N, H, W, channels)."""
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"[{cls}] expected {what} of shape (batch, height, width, {channels}), got {tuple(x.shape)}"
        )


def _check_positive(cls: str, **values: int) -> None:
    for name, value in values.items():
        check_int(cls, name, value, 1, says=f"{name} must be a positive int")


def _pad_to(x: mx.array, height: int, width: int) -> mx.array:
    """Zero-pad (N, h, w, C) to (N, height, width, C): diff // 2 before, the rest after."""
    dy, dx = height - x.shape[1], width - x.shape[2]
    if dy == 0 and dx == 0:
        return x
    return mx.pad(x, [(0, 0), (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2), (0, 0)])


class DoubleConv(nn.Module):
    r"""Two rounds of 3x3 convolution, batch normalization and ReLU.

    .. math::

        y = \mathrm{ReLU}(\mathrm{BN}_2(W_2 * \mathrm{ReLU}(\mathrm{BN}_1(W_1 * x))))

    The convolutions have padding 1 and no bias (the batch norm supplies it),
    so the spatial size is kept.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        mid_channels (int, optional): Channels between the two convolutions.
            Default: ``out_channels``.

    Shape:
        - Input: :math:`(N, H, W, C_{in})`.
        - Output: :math:`(N, H, W, C_{out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn.unet import DoubleConv
        >>> block = DoubleConv(3, 8)
        >>> block(mx.zeros((2, 16, 16, 3))).shape
        (2, 16, 16, 8)

    Reference: Ronneberger et al., "U-Net", MICCAI 2015, https://arxiv.org/abs/1505.04597.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: Optional[int] = None):
        super().__init__()
        mid_channels = out_channels if mid_channels is None else mid_channels
        _check_positive("DoubleConv", in_channels=in_channels, out_channels=out_channels, mid_channels=mid_channels)
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm(out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        _check_image("DoubleConv", x, self.in_channels)
        x = nn.relu(self.bn1(self.conv1(x)))
        return nn.relu(self.bn2(self.conv2(x)))


class Down(nn.Module):
    r"""Downscaling step: 2x2 max pooling, then :class:`DoubleConv`.

    .. math::

        y = \mathrm{DoubleConv}(\mathrm{MaxPool}_{2 \times 2}(x))

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.

    Shape:
        - Input: :math:`(N, H, W, C_{in})` with :math:`H, W \ge 2`.
        - Output: :math:`(N, \lfloor H/2 \rfloor, \lfloor W/2 \rfloor, C_{out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn.unet import Down
        >>> Down(8, 16)(mx.zeros((2, 17, 16, 8))).shape
        (2, 8, 8, 16)

    Reference: Ronneberger et al., "U-Net", MICCAI 2015, https://arxiv.org/abs/1505.04597.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        _check_positive("Down", in_channels=in_channels, out_channels=out_channels)
        self.in_channels = in_channels
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        _check_image("Down", x, self.in_channels)
        if x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(f"[Down] expected height and width of at least 2 to pool, got {tuple(x.shape)}")
        return self.conv(self.pool(x))


class Up(nn.Module):
    r"""Upscaling step: upsample, pad to the skip connection, concatenate, :class:`DoubleConv`.

    .. math::

        y = \mathrm{DoubleConv}([\,s,\ \mathrm{pad}(\mathrm{up}(x))\,])

    where :math:`s` is the skip connection, :math:`[\cdot,\cdot]` concatenates
    channels (skip first), ``pad`` zero-pads :math:`\lfloor d/2 \rfloor` rows
    (columns) before and :math:`d - \lfloor d/2 \rfloor` after for a size
    difference :math:`d`, and ``up`` is either bilinear interpolation by 2
    with aligned corners (no parameters; then ``x`` has :math:`C_{in}/2`
    channels and the :class:`DoubleConv` has :math:`C_{in}/2` middle channels)
    or a 2x2 stride-2 transposed convolution from :math:`C_{in}` to
    :math:`\lfloor C_{in}/2 \rfloor` channels.

    Args:
        in_channels (int): Channels after concatenation.
        out_channels (int): Output channels.
        bilinear (bool): Bilinear interpolation instead of a transposed
            convolution. Default: ``True``.

    Shape:
        - Input: ``x`` :math:`(N, h, w, C_x)` and skip ``s``
          :math:`(N, H, W, C_{in} - C_x)` with :math:`H \ge 2h, W \ge 2w`;
          :math:`C_x = \lfloor C_{in}/2 \rfloor` if ``bilinear`` else :math:`C_{in}`.
        - Output: :math:`(N, H, W, C_{out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn.unet import Up
        >>> up = Up(16, 4, bilinear=False)
        >>> up(mx.zeros((2, 4, 4, 16)), mx.zeros((2, 9, 8, 8))).shape
        (2, 9, 8, 4)

    Reference: Ronneberger et al., "U-Net", MICCAI 2015, https://arxiv.org/abs/1505.04597.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True):
        super().__init__()
        _check_positive("Up", in_channels=in_channels, out_channels=out_channels)
        if in_channels < 2:
            raise ValueError(f"[Up] in_channels must be at least 2 (it is halved), got {in_channels}")
        self.in_channels = in_channels
        self.bilinear = bilinear
        half = in_channels // 2
        if bilinear:
            self.x_channels = half
            self.up = nn.Upsample(scale_factor=2, mode="linear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, half)
        else:
            self.x_channels = in_channels
            self.up = nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)
        self.skip_channels = in_channels - half

    def __call__(self, x: mx.array, skip: mx.array) -> mx.array:
        _check_image("Up", x, self.x_channels)
        _check_image("Up", skip, self.skip_channels, "skip connection")
        if skip.shape[0] != x.shape[0] or skip.shape[1] < 2 * x.shape[1] or skip.shape[2] < 2 * x.shape[2]:
            raise ValueError(
                f"[Up] expected a skip connection of shape (batch={x.shape[0]}, >= {2 * x.shape[1]}, "
                f">= {2 * x.shape[2]}, {self.skip_channels}), got {tuple(skip.shape)}"
            )
        x = self.up(x).astype(skip.dtype)  # (N, 2h, 2w, C); interpolation computes in float32
        x = _pad_to(x, skip.shape[1], skip.shape[2])
        return self.conv(mx.concatenate([skip, x], axis=-1))


class OutConv(nn.Module):
    r"""Final 1x1 convolution mapping features to class scores.

    .. math::

        y_{hw} = W x_{hw} + b

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels (classes).

    Shape:
        - Input: :math:`(N, H, W, C_{in})`.
        - Output: :math:`(N, H, W, C_{out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn.unet import OutConv
        >>> OutConv(8, 2)(mx.zeros((1, 5, 5, 8))).shape
        (1, 5, 5, 2)

    Reference: Ronneberger et al., "U-Net", MICCAI 2015, https://arxiv.org/abs/1505.04597.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        _check_positive("OutConv", in_channels=in_channels, out_channels=out_channels)
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def __call__(self, x: mx.array) -> mx.array:
        _check_image("OutConv", x, self.in_channels)
        return self.conv(x)


class Unet(nn.Module):
    r"""U-Net: a four-level convolutional encoder-decoder with skip connections.

    With width :math:`c` = ``base_channels`` and :math:`f = 2` when
    ``bilinear`` (else 1):

    .. math::

        x_1 &= \mathrm{DoubleConv}(x) &&(c) \\
        x_{k+1} &= \mathrm{Down}(x_k), \quad k = 1, 2, 3, 4 &&(2c, 4c, 8c, 16c/f) \\
        u_4 &= x_5, \quad u_{k} = \mathrm{Up}(u_{k+1}, x_{k}), \quad k = 4, 3, 2, 1
            &&(8c/f, 4c/f, 2c/f, c) \\
        y &= \mathrm{OutConv}(u_1) &&(\text{n\_classes})

    Every ``Up`` pads its upsampled input to the skip connection's size, so the
    output has the input's height and width (e.g. 572x572 in, 572x572 out;
    the unpadded original of the paper gives 388x388).

    Batch normalization uses batch statistics in training mode (the default)
    and running statistics after ``model.eval()``.

    Args:
        n_channels (int): Input channels.
        n_classes (int): Output channels (one score per class).
        bilinear (bool): Upsample by bilinear interpolation (aligned corners)
            instead of transposed convolutions. Default: ``False``.
        base_channels (int): Width of the first level; each level down
            doubles it. Default: ``64`` (the paper's width).

    Shape:
        - Input: :math:`(N, H, W, \text{n\_channels})` with :math:`H, W \ge 16`.
        - Output: :math:`(N, H, W, \text{n\_classes})`.

    Example:
        >>> import mlx_zeta
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn.unet import Unet
        >>> model = Unet(n_channels=1, n_classes=2, base_channels=8)
        >>> model(mx.random.normal((1, 64, 64, 1))).shape
        (1, 64, 64, 2)

    Reference: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks
    for Biomedical Image Segmentation", MICCAI 2015, https://arxiv.org/abs/1505.04597.
    """

    def __init__(self, n_channels: int, n_classes: int, bilinear: bool = False, base_channels: int = 64):
        super().__init__()
        _check_positive("Unet", n_channels=n_channels, n_classes=n_classes, base_channels=base_channels)
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.base_channels = c = base_channels
        factor = 2 if bilinear else 1

        self.inc = DoubleConv(n_channels, c)
        self.down1 = Down(c, 2 * c)
        self.down2 = Down(2 * c, 4 * c)
        self.down3 = Down(4 * c, 8 * c)
        self.down4 = Down(8 * c, 16 * c // factor)
        self.up1 = Up(16 * c, 8 * c // factor, bilinear)
        self.up2 = Up(8 * c, 4 * c // factor, bilinear)
        self.up3 = Up(4 * c, 2 * c // factor, bilinear)
        self.up4 = Up(2 * c, c, bilinear)
        self.outc = OutConv(c, n_classes)

    def __call__(self, x: mx.array) -> mx.array:
        _check_image("Unet", x, self.n_channels)
        n, h, w = x.shape[:3]
        if h < _MIN_SIZE or w < _MIN_SIZE:
            raise ValueError(
                f"[Unet] expected height and width of at least {_MIN_SIZE} (four 2x2 poolings), got {tuple(x.shape)}"
            )
        if self.training and n * (h // 16) * (w // 16) < 2:
            raise ValueError(
                f"[Unet] training-mode batch norm needs at least 2 values per channel at the bottleneck "
                f"(batch * (H // 16) * (W // 16)), got {tuple(x.shape)}; use a larger batch or image, or model.eval()"
            )
        x1 = self.inc(x)  # (N, H, W, c)
        x2 = self.down1(x1)  # (N, H/2, W/2, 2c)
        x3 = self.down2(x2)  # (N, H/4, W/4, 4c)
        x4 = self.down3(x3)  # (N, H/8, W/8, 8c)
        x5 = self.down4(x4)  # (N, H/16, W/16, 16c/f)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)  # (N, H, W, c)
        return self.outc(x)
