r"""Heads that finish a model inside the exported Core ML package, so an app gets the final answer.

:class:`EncoderPooling` turns an encoder's last hidden state into one sentence embedding per row
(sentence-transformers' ``Pooling`` + ``Normalize`` modules): ``mlx-zeta export-coreml --pooling
mean|cls [--normalize]`` exports it, with the output ``embeddings`` (B, hidden) float32 in place of
``last_hidden_state``. It is an ordinary MLX module built from MLX ops the emitters already lower
(masked sum, division, ``maximum``, the L2 norm); under ``precision="float16"`` the pooling runs in
fp32 (its input is cast up first), so neither the token count nor the norm is rounded to fp16.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_choice
from mlx_zeta.models.bert import l2_normalize, mean_pool

__all__ = ["EncoderPooling", "POOLINGS"]

POOLINGS = ("mean", "cls")


class EncoderPooling(nn.Module):
    r"""``(input_ids, attention_mask) -> embeddings``: an encoder's last hidden state pooled to one
    vector per row, optionally L2-normalised.

    With :math:`h = \text{encoder}(x, m)` of shape :math:`(B, L, D)` and the mask :math:`m \in \{0, 1\}`
    (nonzero counts as 1):

    .. math::

        \text{mean:}\quad u_b = \frac{\sum_t m_{b,t}\, h_{b,t}}{\max(\sum_t m_{b,t},\, 1)}, \qquad
        \text{cls:}\quad u_b = h_{b,0}, \qquad
        \text{normalize:}\quad \hat u_b = \frac{u_b}{\max(\lVert u_b \rVert_2,\, 10^{-12})}

    (mean is :func:`~mlx_zeta.models.bert.mean_pool`, whose count clamp :math:`10^{-9}` is the same as
    :math:`\max(\cdot, 1)` for integer counts: a row without tokens gives zeros either way; normalize is
    :func:`~mlx_zeta.models.bert.l2_normalize`, sentence-transformers' ``Normalize``). Padded positions
    (:math:`m = 0`) change nothing: the encoder masks them as keys and the mean leaves them out; with
    ``cls`` the first token must be a real one (BERT's ``[CLS]``). Computed in float32.

    Args:
        encoder (callable): ``encoder(input_ids, attention_mask)`` -> the last hidden state (B, L, D),
            e.g. a :class:`~mlx_zeta.models.BertEncoder`.
        pooling (str): ``"mean"`` (masked mean over tokens) or ``"cls"`` (the first token). Default: ``"mean"``.
        normalize (bool): L2-normalise each embedding. Default: ``False``.

    Shape:
        - input_ids, attention_mask: :math:`(B, L)` int32 (attention_mask: 1 = token, 0 = padding).
        - output: :math:`(B, D)` float32.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.converters.coreml import EncoderPooling
        >>> from mlx_zeta.models import BertEncoder
        >>> model = BertEncoder(vocab_size=100, dim=32, depth=2, heads=4, ff_inner_dim=64)
        >>> head = EncoderPooling(model, "mean", normalize=True)
        >>> head(mx.array([[1, 7, 2, 0]]), mx.array([[1, 1, 1, 0]])).shape
        (1, 32)
    """

    def __init__(self, encoder: Callable[[mx.array, mx.array], mx.array], pooling: str = "mean",
                 normalize: bool = False):
        super().__init__()
        check_choice("EncoderPooling", "pooling", pooling, POOLINGS)
        check_choice("EncoderPooling", "normalize", normalize, (False, True))
        self.encoder = encoder
        self.pooling, self.normalize = pooling, normalize

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        hidden = self.encoder(input_ids, attention_mask)
        if self.pooling == "mean":
            return mean_pool(hidden, attention_mask, self.normalize)
        u = hidden[:, 0].astype(mx.float32)
        return l2_normalize(u) if self.normalize else u
