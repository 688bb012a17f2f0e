"""The MatMul-free language model (Zhu et al., 2024): token embedding, MatMul-free blocks
(:mod:`mlx_zeta.quant.matmulfree`: MLGRU token mixer, GLU channel mixer, ternary projections),
a final RMSNorm and the logits head."""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.quant.bitlinear import BitLinear
from mlx_zeta.quant.matmulfree import MatMulFreeBlock, MLGRUCache

__all__ = ["MatMulFreeLM"]


class MatMulFreeLM(nn.Module):
    r"""MatMul-free language model: token embedding, ``depth`` :class:`~mlx_zeta.quant.MatMulFreeBlock` layers,
    a final RMSNorm and the logits head.

    .. math:: \text{logits} = \text{RMSNorm}(\text{blocks}(E[x]))\, W_{\text{head}}

    The head is a float ``nn.Linear`` (``to_logits``; Keras-MatMulLess advises against a
    ternary last layer) or, with ``ternary_head=True``, a :class:`~mlx_zeta.quant.BitLinear`.
    There are no position embeddings: order comes from the recurrences alone, so
    ``max_seq_len`` is only the context length that wrappers crop to (cache-free generation
    re-runs the last ``max_seq_len`` tokens; recurrent generation carries the whole past).

    With ``cache`` (from :meth:`make_cache`: one :class:`~mlx_zeta.quant.MLGRUCache` per layer) the call
    continues from the cached states and updates them, so
    ``AutoregressiveWrapper(MatMulFreeLM(...)).generate(..., cache=True)`` decodes one token
    per step in :math:`O(1)` time and memory per token.

    Args:
        num_tokens (int): vocabulary size.
        dim (int): model width.
        depth (int): number of blocks.
        max_seq_len (int): context length for wrappers.
        hidden_dim (int, optional): MLGRU state size. Default: ``dim``.
        ff_hidden_dim (int, optional): GLU width. Default: :func:`glu_hidden_dim` ``(dim)``.
        ternary_head (bool): BitLinear logits head instead of a float one. Default: ``False``.
        norm_eps (float): RMSNorm epsilon. Default: ``1e-6``.

    Call ``(x, cache=None, mask=None)``; ``mask`` (True = keep) covers the tokens of ``x``
    or, with a cache, every position so far (``offset + L``; the last ``L`` columns are used).

    Shape:
        - x: :math:`(B, L)` integer tokens. Output: :math:`(B, L, \text{num\_tokens})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.models import MatMulFreeLM
        >>> model = MatMulFreeLM(num_tokens=256, dim=64, depth=2, max_seq_len=128)
        >>> model(mx.zeros((2, 10), dtype=mx.int32)).shape
        (2, 10, 256)

    Reference: Zhu et al., "Scalable MatMul-free Language Modeling", https://arxiv.org/abs/2406.02528.
    """

    def __init__(self, num_tokens: int, dim: int, depth: int, max_seq_len: int, hidden_dim: Optional[int] = None,
                 ff_hidden_dim: Optional[int] = None, ternary_head: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        for what, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth), ("max_seq_len", max_seq_len)):
            check_int("MatMulFreeLM", what, value, 1)
        self.num_tokens, self.dim, self.max_seq_len = num_tokens, dim, max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.layers = [MatMulFreeBlock(dim, hidden_dim, ff_hidden_dim, norm_eps) for _ in range(depth)]
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.to_logits = BitLinear(dim, num_tokens) if ternary_head else nn.Linear(dim, num_tokens, bias=False)

    def make_cache(self) -> List[MLGRUCache]:
        """One empty :class:`~mlx_zeta.quant.MLGRUCache` per layer."""
        return [MLGRUCache() for _ in self.layers]

    def __call__(self, x: mx.array, cache: Optional[List[MLGRUCache]] = None,
                 mask: Optional[mx.array] = None) -> mx.array:
        if x.ndim != 2 or not mx.issubdtype(x.dtype, mx.integer):
            raise ValueError(f"[MatMulFreeLM] expected integer tokens of shape (batch, seq), got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"[MatMulFreeLM] expected a cache with one entry per layer ({len(self.layers)}), "
                             f"got {len(cache)}; use make_cache()")
        n = x.shape[1]
        if mask is not None:
            offset = cache[0].offset if cache else 0
            if mask.ndim != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] not in (n, offset + n):
                raise ValueError(f"[MatMulFreeLM] expected mask of shape ({x.shape[0]}, {n}) or "
                                 f"({x.shape[0]}, {offset + n}), got {tuple(mask.shape)}")
            mask = mask[:, -n:]
        h = self.token_emb(x)  # (B, L, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache=None if cache is None else cache[i], mask=mask)
        return self.to_logits(self.norm(h))
