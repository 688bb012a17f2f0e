"""PaLM-E-style vision-language model: ViT patch embeddings prepended to a decoder LM."""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.structs.attention_layers import Decoder, Encoder
from mlx_zeta.structs.autoregressive import AutoregressiveWrapper
from mlx_zeta.structs.decoding import check_token_ids
from mlx_zeta.structs.transformer import Transformer
from mlx_zeta.structs.vit import IntPair, ViTransformerWrapper

__all__ = ["PalmE"]


class PalmE(nn.Module):
    r"""A vision encoder whose patch embeddings, projected into the language model's
    embedding space, are prepended to the text tokens of a decoder-only LM (PaLM-E).

    .. math::

        v = \text{ViT}(\text{img}) \in \mathbb{R}^{N \times d_e}, \qquad
        u = v W_p + b_p \in \mathbb{R}^{N \times d}, \qquad
        \text{logits} = \text{LM}\big([u;\ E[\text{text}]]\big)_{N:},

    i.e. the image occupies the first :math:`N` positions of the decoder's sequence and
    the logits of the text positions are returned (:math:`N` = ``num_patches``). The
    decoder is causal, so text attends to every patch and to earlier text.

    Defaults and names follow zeta's ``PalmE``, with these differences:

    - zeta's decoder cross-attends to the image (``cross_attend=True``); here the image is
      prepended as in the PaLM-E paper (``prepend_embeds``), so there is no ``cross_attend``
      option and encoder and decoder widths may differ (``image_proj`` maps between them).
    - zeta's ``forward`` returns the AutoregressiveWrapper's loss; here ``model(img, text)``
      returns logits and :meth:`loss` the shifted cross-entropy.
    - ``rotary_xpos=True`` turns on rotary embeddings with xPos scaling (xPos needs rotary);
      with ``alibi_pos_bias`` too, ALiBi biases the first ``alibi_num_heads`` heads only and
      the rest rely on rotary positions (x-transformers' ``alibi_num_heads``).
    - ``qk_norm`` and ``attn_kv_heads`` are the decoder's query/key RMSNorm and key/value
      heads (GQA).
    - The decoder's position budget is ``max_seq_len`` text tokens *plus* the ``num_patches``
      image positions (relevant with ``use_abs_pos_emb=True`` and no rotary: the table then
      has ``max_seq_len + num_patches`` rows).

    Args:
        image_size (int or tuple(int, int)): image height and width. Default: ``256``.
        patch_size (int or tuple(int, int)): ViT patch size. Default: ``32``.
        encoder_dim, encoder_depth, encoder_heads (int): ViT width, layers, heads. Default: ``512, 6, 8``.
        num_tokens (int): vocabulary size. Default: ``20000``.
        max_seq_len (int): text positions. Default: ``1024``.
        decoder_dim, decoder_depth, decoder_heads (int): LM width, layers, heads. Default: ``512, 6, 8``.
        alibi_num_heads (int): heads with an ALiBi bias (``<= decoder_heads``). Default: ``4``.
        attn_kv_heads (int, optional): decoder key/value heads. Default: ``2``.
        use_abs_pos_emb (bool): learned absolute positions (ignored with rotary). Default: ``False``.
        alibi_pos_bias (bool): ALiBi in the decoder. Default: ``True``.
        rotary_xpos (bool): rotary embeddings with xPos in the decoder. Default: ``True``.
        attn_flash (bool): fused attention kernel. Default: ``True``.
        qk_norm (bool): query/key RMSNorm in the decoder. Default: ``True``.
        channels (int): image channels. Default: ``3``.

    Calls:
        - ``model(img, text, mask=None)`` -> logits :math:`(B, L, \text{num\_tokens})`;
          ``mask`` (True = keep) pads ``text``.
        - ``model.loss(img, text, ignore_index=-100)`` -> scalar next-token cross-entropy over the text.
        - ``model.generate(img, prompt, seq_len, **sampling)`` -> :math:`(B, \text{seq\_len})` new
          tokens (``AutoregressiveWrapper.generate`` options: ``temperature``, ``top_k``, ...).
        - ``model.embed_image(img)`` -> :math:`(B, N, \text{decoder\_dim})`, the prepended embeddings.

    Shape:
        - img: :math:`(B, H, W, C)` channels-last; text: :math:`(B, L)` integer tokens.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.models import PalmE
        >>> model = PalmE()
        >>> img = mx.random.normal((1, 256, 256, 3))
        >>> text = mx.random.randint(0, 20000, (1, 1024))
        >>> model(img, text).shape
        (1, 1024, 20000)

    Reference: Driess et al., "PaLM-E: An Embodied Multimodal Language Model",
    https://arxiv.org/abs/2303.03378; kyegomez/zeta (``PalmE``).
    """

    def __init__(self, image_size: IntPair = 256, patch_size: IntPair = 32, encoder_dim: int = 512,
                 encoder_depth: int = 6, encoder_heads: int = 8, num_tokens: int = 20000, max_seq_len: int = 1024,
                 decoder_dim: int = 512, decoder_depth: int = 6, decoder_heads: int = 8, alibi_num_heads: int = 4,
                 attn_kv_heads: Optional[int] = 2, use_abs_pos_emb: bool = False, alibi_pos_bias: bool = True,
                 rotary_xpos: bool = True, attn_flash: bool = True, qk_norm: bool = True, channels: int = 3):
        super().__init__()
        check_int("PalmE", "max_seq_len", max_seq_len, 1)
        self.encoder = ViTransformerWrapper(image_size=image_size, patch_size=patch_size, channels=channels,
                                            attn_layers=Encoder(dim=encoder_dim, depth=encoder_depth,
                                                                heads=encoder_heads))
        self.num_patches = self.encoder.num_patches
        self.image_proj = nn.Linear(encoder_dim, decoder_dim)
        layers = Decoder(dim=decoder_dim, depth=decoder_depth, heads=decoder_heads, attn_kv_heads=attn_kv_heads,
                         attn_qk_norm=qk_norm, attn_flash=attn_flash, alibi_pos_bias=alibi_pos_bias,
                         alibi_num_heads=alibi_num_heads if alibi_pos_bias else None,
                         rotary_pos_emb=rotary_xpos, rotary_xpos=rotary_xpos)
        self.decoder = Transformer(num_tokens=num_tokens, max_seq_len=max_seq_len + self.num_patches,
                                   attn_layers=layers, use_abs_pos_emb=use_abs_pos_emb)
        self.max_seq_len = max_seq_len

    def embed_image(self, img: mx.array) -> mx.array:
        """ViT patch embeddings projected to the decoder width, ``(batch, num_patches, decoder_dim)``."""
        return self.image_proj(self.encoder(img, return_embeddings=True))

    def __call__(self, img: mx.array, text: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        if text.ndim != 2 or img.ndim != 4 or img.shape[0] != text.shape[0]:
            raise ValueError(f"[PalmE] expected img (batch, H, W, C) and text (batch, seq) with the same batch, "
                             f"got img shape {tuple(img.shape)} and text shape {tuple(text.shape)}")
        logits = self.decoder(text, mask=mask, prepend_embeds=self.embed_image(img))  # (B, N + L, vocab)
        return logits[:, self.num_patches:]

    def loss(self, img: mx.array, text: mx.array, ignore_index: int = -100) -> mx.array:
        r"""Mean next-token cross-entropy over the text, :math:`-\frac{1}{|T|}\sum_{t\in T}
        \log p(x_{t+1} \mid \text{img}, x_{\le t})`, with :math:`T` the positions whose target
        is not ``ignore_index``."""
        wrapper = AutoregressiveWrapper(self.decoder, ignore_index=ignore_index)
        return wrapper(text, prepend_embeds=self.embed_image(img))

    def generate(self, img: mx.array, prompt: mx.array, seq_len: int, **sampling: Any) -> mx.array:
        """``seq_len`` new tokens after ``prompt``, conditioned on the image (prepended on the
        prefill call; later steps reuse the decoder's KV cache). ``prompt`` must hold token ids in
        ``[0, num_tokens)`` (:func:`~mlx_zeta.structs.decoding.check_token_ids`)."""
        check_token_ids("PalmE", "prompt", prompt, self.decoder.num_tokens)
        return AutoregressiveWrapper(self.decoder).generate(prompt, seq_len, prepend_embeds=self.embed_image(img),
                                                            **sampling)
