"""The layer set of Keras-MatMulLess on :class:`~mlx_zeta.quant.BitLinear`: GLU variants,
the MatMul-free GRU, the linear recurrent unit, an attention-free transformer block, and
token / patch embeddings.

Keras-MatMulLess's ``DenseMML`` is :class:`~mlx_zeta.quant.BitLinear` itself (BitNet b1.58
quantizers with an input RMSNorm; an activation is a call after it), so no ``BitDense`` is defined.
"""

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_positive, check_sizes
from mlx_zeta.quant.bitlinear import BitLinear
from mlx_zeta.quant.matmulfree import MLGRU, GLUChannelMixer, complex_linear_scan, glu_hidden_dim

__all__ = ["GLU", "GeGLU", "ReGLU", "SeGLU", "SwiGLU", "BilinearGLU", "BitGRU", "BitLRU", "AFTBlock",
           "TokenEmbedding", "PatchEmbedding"]


def _identity(x: mx.array) -> mx.array:
    return x


class GLU(GLUChannelMixer):
    r"""Gated linear unit with ternary projections (Keras-MatMulLess ``GLUMML``).

    .. math:: y = \big(\phi(x W_g) \odot x W_u\big) W_d

    with :math:`\phi` the sigmoid here (Dauphin et al.'s GLU); the subclasses fix
    :math:`\phi` to GELU (:class:`GeGLU`), ReLU (:class:`ReGLU`), SELU (:class:`SeGLU`),
    SiLU (:class:`SwiGLU`) or the identity (:class:`BilinearGLU`). It is a
    :class:`~mlx_zeta.quant.GLUChannelMixer` (parameters ``gate_proj``, ``up_proj``,
    ``down_proj``, separate BitLinear layers where Keras fuses :math:`W_g, W_u`).

    Args:
        dim (int): input size.
        hidden_dim (int, optional): width of the gate. Default: :math:`\frac{2}{3}` ``hidden_ratio * dim``
            rounded up to a multiple of 8 (Keras rounds to a multiple of 256).
        dim_out (int, optional): output size. Default: ``dim``.
        hidden_ratio (float): see ``hidden_dim``. Default: ``4``.
        bias (bool): biases on the three projections. Default: ``False``.

    Shape:
        - Input: :math:`(*, \text{dim})`. Output: :math:`(*, \text{dim\_out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.quant import SwiGLU
        >>> SwiGLU(64, 128)(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: Shazeer, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202;
    Zhu et al., https://arxiv.org/abs/2406.02528 (section 3.3.2).
    """

    #: The gate nonlinearity :math:`\phi` (here ``mx.sigmoid``); each subclass sets its own.
    gate_activation: Callable[[mx.array], mx.array] = staticmethod(mx.sigmoid)

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, dim_out: Optional[int] = None,
                 hidden_ratio: float = 4.0, bias: bool = False):
        check_positive(type(self).__name__, "hidden_ratio", hidden_ratio)
        check_sizes(type(self).__name__, dim=dim)
        super().__init__(dim, hidden_dim or glu_hidden_dim(dim, hidden_ratio), dim_out,
                         activation=type(self).gate_activation, bias=bias)


class GeGLU(GLU):
    """:class:`GLU` with the (exact, erf) GELU gate."""
    #: The gate nonlinearity :math:`\phi`: ``nn.gelu``.
    gate_activation = staticmethod(nn.gelu)


class ReGLU(GLU):
    """:class:`GLU` with the ReLU gate."""
    #: The gate nonlinearity :math:`\phi`: ``nn.relu``.
    gate_activation = staticmethod(nn.relu)


class SeGLU(GLU):
    """:class:`GLU` with the SELU gate."""
    #: The gate nonlinearity :math:`\phi`: ``nn.selu``.
    gate_activation = staticmethod(nn.selu)


class SwiGLU(GLU):
    """:class:`GLU` with the SiLU (swish) gate: the MatMul-free LM's channel mixer."""
    #: The gate nonlinearity :math:`\phi`: ``nn.silu``.
    gate_activation = staticmethod(nn.silu)


class BilinearGLU(GLU):
    """:class:`GLU` without a gate nonlinearity: :math:`y = (x W_g \\odot x W_u) W_d`."""
    #: The gate nonlinearity :math:`\phi`: the identity.
    gate_activation = staticmethod(_identity)


class BitGRU(MLGRU):
    r"""MatMul-free GRU (Keras-MatMulLess ``GRUMML``): :class:`~mlx_zeta.quant.MLGRU` with biases,

    .. math::

        f_t = \sigma(x_t W_f + b_f),\ c_t = \tau(x_t W_c + b_c),\
        h_t = f_t \odot h_{t-1} + (1 - f_t) \odot c_t,\
        o_t = (\sigma(x_t W_g + b_g) \odot h_t) W_o + b_o.

    As in Keras-MatMulLess, only :math:`W_f, W_c` are ternary by default and :math:`W_g, W_o`
    are float ``nn.Linear`` layers; ``fully_mml=True`` makes all four BitLinear (= MLGRU with
    biases). The output is every step's :math:`o_t` (Keras returns the last one unless
    ``return_sequences``: take ``y[:, -1]``).

    Args:
        input_dim (int): input size.
        units (int): state and output size.
        fully_mml (bool): ternary :math:`W_g, W_o` too. Default: ``False``.
        activation (callable): :math:`\tau`. Default: ``nn.silu``.

    Shape:
        - x: :math:`(B, L, \text{input\_dim})`. Output: :math:`(B, L, \text{units})`.
    """

    def __init__(self, input_dim: int, units: int, fully_mml: bool = False,
                 activation: Callable[[mx.array], mx.array] = nn.silu):
        check_sizes("BitGRU", input_dim=input_dim, units=units)
        super().__init__(input_dim, hidden_dim=units, dim_out=units, bias=True, activation=activation)
        self.fully_mml = fully_mml
        if not fully_mml:
            self.g_proj = nn.Linear(input_dim, units)
            self.o_proj = nn.Linear(units, units)


class BitLRU(nn.Module):
    r"""Linear recurrent unit with ternary input projections (Keras-MatMulLess ``LRUMML``).

    .. math::

        \lambda = \exp(-e^{\nu} + i e^{\theta}),\qquad
        x_k = \lambda \odot x_{k-1} + e^{\gamma^{\log}} \odot (B_{re} u_k + i B_{im} u_k),

        y_k = C_{re}\,\Re(x_k) - C_{im}\,\Im(x_k) + D u_k

    with a complex diagonal state :math:`x_k \in \mathbb{C}^N`, :math:`x_0 = 0`, exponential
    parametrization :math:`\nu, \theta` (``nu_log``, ``theta_log``) and the normalization
    :math:`\gamma^{\log}` initialised to :math:`\log\sqrt{1 - |\lambda|^2}` and trained (LRU
    paper, appendix A). :math:`|\lambda|` starts uniform on the ring
    :math:`[r_{\min}, r_{\max}]` and :math:`\arg\lambda` uniform on :math:`[0, \text{max\_phase}]`.
    The complex recurrence is one :func:`~mlx_zeta.quant.complex_linear_scan` over real pairs.
    :math:`B_{re}, B_{im}` are BitLinear (init :math:`\mathcal{N}(0, 1/(2n))`); :math:`C_{re},
    C_{im}` (init :math:`\mathcal{N}(0, 1/N)`) and :math:`D` are float unless ``fully_mml``, as in
    Keras-MatMulLess. The output is every step (Keras returns the last one by default).

    Args:
        input_dim (int): :math:`n`.
        units (int): output size.
        state_dim (int): :math:`N`.
        fully_mml (bool): ternary :math:`C, D` too. Default: ``False``.
        r_min, r_max (float): ring of :math:`|\lambda|` at init. Default: ``0``, ``1`` (Keras;
            the LRU paper uses e.g. ``0.9``-``0.999`` for long-range tasks).
        max_phase (float): largest initial phase. Default: :math:`2\pi`.
        bias (bool): biases on the projections. Default: ``False``.

    Shape:
        - u: :math:`(B, L, n)`. Output: :math:`(B, L, \text{units})`.

    Reference: Orvieto et al., "Resurrecting Recurrent Neural Networks for Long Sequences",
    https://arxiv.org/abs/2303.06349.
    """

    def __init__(self, input_dim: int, units: int, state_dim: int, fully_mml: bool = False, r_min: float = 0.0,
                 r_max: float = 1.0, max_phase: float = 2 * math.pi, bias: bool = False):
        super().__init__()
        check_sizes("BitLRU", input_dim=input_dim, units=units, state_dim=state_dim)
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"[BitLRU] expected 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        check_positive("BitLRU", "max_phase", max_phase)
        self.input_dim, self.units, self.state_dim = input_dim, units, state_dim
        tiny = 1e-7  # keeps both logarithms finite when a uniform draw is 0
        u1, u2 = mx.random.uniform(tiny, 1.0, (state_dim,)), mx.random.uniform(tiny, 1.0, (state_dim,))
        self.nu_log = mx.log(-0.5 * mx.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
        self.theta_log = mx.log(max_phase * u2)
        self.gamma_log = mx.log(mx.sqrt(1 - mx.exp(-mx.exp(self.nu_log)) ** 2))
        out_layer = BitLinear if fully_mml else nn.Linear
        self.B_re, self.B_im = BitLinear(input_dim, state_dim, bias=bias), BitLinear(input_dim, state_dim, bias=bias)
        self.C_re, self.C_im = out_layer(state_dim, units, bias=bias), out_layer(state_dim, units, bias=bias)
        self.D = out_layer(input_dim, units, bias=bias)
        for layer, std in ((self.B_re, (2 * input_dim) ** -0.5), (self.B_im, (2 * input_dim) ** -0.5),
                           (self.C_re, state_dim ** -0.5), (self.C_im, state_dim ** -0.5)):
            layer.weight = std * mx.random.normal(layer.weight.shape)

    def eigenvalues(self):
        """:math:`(\\Re\\lambda, \\Im\\lambda)`, each of shape :math:`(N,)`."""
        modulus, phase = mx.exp(-mx.exp(self.nu_log)), mx.exp(self.theta_log)
        return modulus * mx.cos(phase), modulus * mx.sin(phase)

    def __call__(self, u: mx.array) -> mx.array:
        if u.ndim != 3 or u.shape[-1] != self.input_dim:
            raise ValueError(f"[BitLRU] expected input of shape (batch, seq, {self.input_dim}), got {tuple(u.shape)}")
        gamma = mx.exp(self.gamma_log)
        x_re, x_im = complex_linear_scan(self.eigenvalues(), (gamma * self.B_re(u), gamma * self.B_im(u)))
        return self.C_re(x_re.astype(u.dtype)) - self.C_im(x_im.astype(u.dtype)) + self.D(u)


class AFTBlock(nn.Module):
    r"""Attention-free transformer block with ternary projections.

    The token mixer is AFT (Zhai et al., eq. 2): with :math:`Q, K, V = xW_q, xW_k, xW_v`,

    .. math::

        Y_t = \sigma(Q_t) \odot \frac{\sum_{t'} \exp(K_{t'} + w_{t,t'}) \odot V_{t'}}
                                   {\sum_{t'} \exp(K_{t'} + w_{t,t'})}

    over :math:`t' \le t` when ``causal``, else over all :math:`t'`. With ``max_seq_len`` the
    learned pairwise position biases :math:`w` (``pos_bias``, initialised to 0) make it
    AFT-full; without, :math:`w = 0` (AFT-simple, :math:`O(Ld)`). The block is
    :math:`x \leftarrow x + \text{AFT}(\text{RMSNorm}(x)) W_o`, then
    :math:`x \leftarrow x + \text{SwiGLU}(\text{RMSNorm}(x))`. The exponentials are shifted by
    the maxima of :math:`K` (over positions) and of each row of :math:`w`, which cancel in the
    ratio; with ``causal`` a prefix whose keys all lie ~87 below the later maximum would
    underflow in float32. AFT-full sums over :math:`w` with a float :math:`(L \times L)` product.

    Args:
        dim (int): model width.
        hidden_dim (int, optional): SwiGLU width. Default: :func:`~mlx_zeta.quant.glu_hidden_dim` ``(dim)``.
        max_seq_len (int, optional): enables AFT-full with this many positions. Default: ``None``.
        causal (bool): position :math:`t` sees only :math:`t' \le t`. Default: ``True``.
        norm_eps (float): RMSNorm epsilon. Default: ``1e-6``.

    Shape:
        - x: :math:`(B, L, \text{dim})`, :math:`L \le` ``max_seq_len`` when set. Output: same.

    Reference: Zhai et al., "An Attention Free Transformer", https://arxiv.org/abs/2105.14103.
    """

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, max_seq_len: Optional[int] = None,
                 causal: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        check_sizes("AFTBlock", dim=dim, hidden_dim=hidden_dim, max_seq_len=max_seq_len)
        self.dim, self.causal, self.max_seq_len = dim, causal, max_seq_len
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.to_q, self.to_k, self.to_v = BitLinear(dim, dim), BitLinear(dim, dim), BitLinear(dim, dim)
        self.to_out = BitLinear(dim, dim)
        if max_seq_len is not None:
            self.pos_bias = mx.zeros((max_seq_len, max_seq_len))
        self.ff_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ff = SwiGLU(dim, hidden_dim)

    def aft(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """The AFT mixing of :math:`(B, L, d)` queries, keys and values (computed in float32)."""
        n, dtype = k.shape[1], q.dtype
        q, k, v = (t.astype(mx.float32) for t in (q, k, v))
        e = mx.exp(k - mx.stop_gradient(mx.max(k, axis=1, keepdims=True)))  # (B, L, d)
        if "pos_bias" not in self:
            if self.causal:
                num, den = mx.cumsum(e * v, axis=1), mx.cumsum(e, axis=1)
            else:
                num, den = mx.sum(e * v, axis=1, keepdims=True), mx.sum(e, axis=1, keepdims=True)
        else:
            w = self.pos_bias[:n, :n].astype(mx.float32)
            if self.causal:
                w = mx.where(mx.tril(mx.ones((n, n), mx.bool_)), w, -mx.inf)
            ew = mx.exp(w - mx.stop_gradient(mx.max(w, axis=1, keepdims=True)))  # (L, L)
            num, den = ew @ (e * v), ew @ e
        return (mx.sigmoid(q) * num / den).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"[AFTBlock] expected input of shape (batch, seq, {self.dim}), got {tuple(x.shape)}")
        if self.max_seq_len is not None and x.shape[1] > self.max_seq_len:
            raise ValueError(f"[AFTBlock] expected at most max_seq_len={self.max_seq_len} positions, got {x.shape[1]}")
        h = self.attn_norm(x)
        x = x + self.to_out(self.aft(self.to_q(h), self.to_k(h), self.to_v(h)))
        return x + self.ff(self.ff_norm(x))


class TokenEmbedding(nn.Module):
    r"""Token embedding with optional learned absolute positions (Keras-MatMulLess ``TokenEmbedding``).

    .. math:: e_t = E[x_t] + P[t]\quad(P \text{ only with } \text{max\_len})

    Float tables (an embedding is a lookup, not a matmul).

    Args:
        vocab_size (int): number of tokens.
        dim (int): embedding size.
        max_len (int, optional): positions of the table ``pos_emb``; ``None`` adds none. Default: ``None``.

    Shape:
        - x: :math:`(B, L)` integers, :math:`L \le` ``max_len``. Output: :math:`(B, L, \text{dim})`.
    """

    def __init__(self, vocab_size: int, dim: int, max_len: Optional[int] = None):
        super().__init__()
        check_sizes("TokenEmbedding", vocab_size=vocab_size, dim=dim, max_len=max_len)
        self.max_len = max_len
        self.token_emb = nn.Embedding(vocab_size, dim)
        if max_len is not None:
            self.pos_emb = nn.Embedding(max_len, dim)

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim != 2 or not mx.issubdtype(x.dtype, mx.integer):
            raise ValueError(f"[TokenEmbedding] expected integer tokens of shape (batch, seq), got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        h = self.token_emb(x)
        if "pos_emb" not in self:
            return h
        if x.shape[1] > self.max_len:
            raise ValueError(f"[TokenEmbedding] expected at most max_len={self.max_len} tokens, got {x.shape[1]}")
        return h + self.pos_emb(mx.arange(x.shape[1]))


class PatchEmbedding(nn.Module):
    r"""Image patches to tokens with a ternary projection (ViT patchify; Keras-MatMulLess ``Patches``
    followed by a ``DenseMML``).

    A channels-last image :math:`(N, H, W, C)` is cut into non-overlapping :math:`p \times p`
    patches in row-major order, each flattened in :math:`(p_y, p_x, c)` order and projected
    with a BitLinear; with ``num_patches`` a learned position embedding ``pos_emb`` is added.

    Args:
        patch_size (int): :math:`p`.
        in_channels (int): :math:`C`.
        dim (int): token size.
        num_patches (int, optional): :math:`HW / p^2` for the position table. Default: ``None``.

    Shape:
        - x: :math:`(N, H, W, C)`, :math:`p` dividing :math:`H` and :math:`W`.
          Output: :math:`(N, HW/p^2, \text{dim})`.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, num_patches: Optional[int] = None):
        super().__init__()
        check_sizes("PatchEmbedding", patch_size=patch_size, in_channels=in_channels, dim=dim,
                      num_patches=num_patches)
        self.patch_size, self.in_channels, self.num_patches = patch_size, in_channels, num_patches
        self.proj = BitLinear(patch_size * patch_size * in_channels, dim)
        if num_patches is not None:
            self.pos_emb = 0.02 * mx.random.normal((num_patches, dim))

    def patchify(self, x: mx.array) -> mx.array:
        """:math:`(N, H, W, C) \\to (N, HW/p^2, p^2 C)`."""
        n, h, w, c = x.shape
        p = self.patch_size
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def __call__(self, x: mx.array) -> mx.array:
        p = self.patch_size
        if x.ndim != 4 or x.shape[3] != self.in_channels or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"[PatchEmbedding] expected channels-last images (N, H, W, {self.in_channels}) with H and "
                             f"W multiples of patch_size={p}, got {tuple(x.shape)}")
        tokens = self.proj(self.patchify(x))
        if "pos_emb" in self:
            if tokens.shape[1] != self.num_patches:
                raise ValueError(f"[PatchEmbedding] expected {self.num_patches} patches (num_patches), got "
                                 f"{tokens.shape[1]} from an image of shape {tuple(x.shape)}")
            tokens = tokens + self.pos_emb.astype(tokens.dtype)
        return tokens
