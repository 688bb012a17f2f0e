r"""T5 encoder-decoders (T5 v1 and v1.1 / Flan-T5) on mlx_zeta :class:`~mlx_zeta.structs.Encoder`
and :class:`~mlx_zeta.structs.Decoder` stacks: :class:`T5Model`.

Decoding (:meth:`T5Model.generate`, :meth:`T5Model.stream`) runs through
:func:`~mlx_zeta.structs.decoding.decode_steps`, the loop :class:`~mlx_zeta.structs.AutoregressiveWrapper`
uses, so the same samplers and end-token handling apply. Hugging Face checkpoints load through
:mod:`mlx_zeta.converters.t5`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.structs import Decoder, Encoder
from mlx_zeta.structs.decoding import check_token_ids, decode_steps, global_key
from mlx_zeta.structs.sampling import check_sampling_args

__all__ = ["T5Model"]

_WHO = "[T5Model]"


def _tokens(name: str, x: mx.array) -> None:
    if x.ndim != 2 or not mx.issubdtype(x.dtype, mx.integer):
        raise ValueError(f"{_WHO} expected {name} as integer tokens of shape (batch, seq), got shape "
                         f"{tuple(x.shape)} and dtype {x.dtype}")


class T5Model(nn.Module):
    r"""T5 encoder-decoder with a language-model head (Hugging Face ``T5ForConditionalGeneration``).

    .. math::

        c = \text{Enc}(E[x]), \qquad
        h = \text{Dec}(E[y], c), \qquad
        \text{logits} = \begin{cases} (d_{model}^{-1/2}\, h)\, E^T & \text{tied (T5 v1)} \\
                                      h\, W_{lm}^T & \text{untied (T5 v1.1)} \end{cases}

    with :math:`E` the shared token table (``shared``), ``Enc`` an :class:`~mlx_zeta.structs.Encoder`
    and ``Dec`` a cross-attending :class:`~mlx_zeta.structs.Decoder` (each ending in its final RMSNorm).
    The ``attention_mask`` (1/True = real token) masks padded source positions in the encoder's
    self-attention and in every decoder cross-attention; the decoder's self-attention is causal.

    Args:
        vocab_size (int): shared token table rows.
        dim (int): model width (``d_model``).
        depth (int): encoder blocks.
        heads (int): attention heads.
        dim_head (int): features per head (``heads * dim_head`` need not equal ``dim``).
        ff_inner_dim (int): feed-forward width.
        decoder_depth (int, optional): decoder blocks. Default: ``depth``.
        ff_glu (bool): gated feed-forward ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1). Default: ``False``.
        activation (callable): feed-forward activation. Default: ``nn.relu``.
        num_buckets, max_distance (int): relative-position buckets. Default: ``32``, ``128``.
        norm_eps (float): RMSNorm epsilon. Default: ``1e-6``.
        tied (bool): logits through ``shared`` scaled by :math:`d^{-1/2}` (else an own ``lm_head``).
            Default: ``True``.
        pad_token_id (int, optional): pads finished rows and ignored labels. Default: ``0``.
        eos_token_id (int or list, optional): end tokens for :meth:`generate`. Default: ``1``.
        decoder_start_token_id (int, optional): first decoder token. Default: ``pad_token_id``.

    Calls:
        - ``model(input_ids, decoder_input_ids, attention_mask=None)`` -> logits :math:`(B, L_t, V)`.
        - ``model.encode(input_ids, attention_mask=None)`` -> :math:`(B, L_s, d_{model})`.
        - ``model.decode(decoder_input_ids, encoder_hidden_states, attention_mask=None, cache=None)`` ->
          logits :math:`(B, L_t, V)`; with ``cache`` (:meth:`make_cache`, the decoder's self-attention
          keys/values, updated in place) ``decoder_input_ids`` are the tokens after the cached ones.
        - ``model.generate(input_ids, max_new_tokens, attention_mask=None, eos_token_id=None, temperature=0)``
          -> greedy decoding (or sampled, with ``temperature`` > 0 and the filters of
          :func:`~mlx_zeta.structs.sample`), :math:`(B, 1 + T)` starting with ``decoder_start_token_id``
          (as transformers); ``model.stream(...)`` yields the new tokens one step at a time.
        - ``model.shift_right(labels)`` -> decoder inputs for teacher forcing (transformers' ``_shift_right``).

    Shape:
        - input_ids, attention_mask: :math:`(B, L_s)`; decoder_input_ids: :math:`(B, L_t)`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.models import T5Model
        >>> model = T5Model(vocab_size=100, dim=32, depth=2, heads=4, dim_head=8, ff_inner_dim=64)
        >>> model(mx.zeros((2, 7), mx.int32), mx.zeros((2, 3), mx.int32)).shape
        (2, 3, 100)

    Reference: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", https://arxiv.org/abs/1910.10683.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, dim_head: int, ff_inner_dim: int, *,
                 decoder_depth: Optional[int] = None, ff_glu: bool = False,
                 activation: Callable[[mx.array], mx.array] = nn.relu, num_buckets: int = 32,
                 max_distance: int = 128, norm_eps: float = 1e-6, tied: bool = True,
                 pad_token_id: Optional[int] = 0, eos_token_id: Union[int, Sequence[int], None] = 1,
                 decoder_start_token_id: Optional[int] = None):
        super().__init__()
        stack = dict(dim=dim, heads=heads, attn_dim_head=dim_head, attn_scale=1.0, ff_inner_dim=ff_inner_dim,
                     ff_no_bias=True, ff_glu=ff_glu, ff_custom_act=activation, rel_pos_bias=True,
                     rel_pos_num_buckets=num_buckets, rel_pos_max_distance=max_distance,
                     norm=lambda d: nn.RMSNorm(d, eps=norm_eps))
        self.dim = dim
        self.shared = nn.Embedding(vocab_size, dim)
        self.encoder = Encoder(depth=depth, **stack)
        self.decoder = Decoder(depth=depth if decoder_depth is None else decoder_depth, cross_attend=True, **stack)
        if not tied:
            self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        eos = eos_token_id
        self.pad_token_id = pad_token_id
        self.eos_ids: List[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.decoder_start_token_id = pad_token_id if decoder_start_token_id is None else decoder_start_token_id

    @property
    def start_token(self) -> int:
        """The first decoder token (``decoder_start_token_id``, else ``pad_token_id``)."""
        if self.decoder_start_token_id is None:
            raise ValueError(f"{_WHO} expected decoder_start_token_id (or pad_token_id) to start decoding, got None")
        return self.decoder_start_token_id

    @staticmethod
    def _mask(attention_mask: Optional[mx.array], input_shape) -> Optional[mx.array]:
        if attention_mask is None:
            return None
        if attention_mask.shape != tuple(input_shape):
            raise ValueError(f"{_WHO} expected attention_mask of shape {tuple(input_shape)} (the source tokens), "
                             f"got shape {tuple(attention_mask.shape)}")
        return attention_mask.astype(mx.bool_)

    def make_cache(self) -> list:
        """One key/value cache per decoder self-attention layer."""
        return self.decoder.make_cache()

    def encode(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None) -> mx.array:
        """The encoder's last hidden states (after its final norm), shape ``(B, L_s, d_model)``."""
        _tokens("input_ids", input_ids)
        return self.encoder(self.shared(input_ids), mask=self._mask(attention_mask, input_ids.shape))

    def decode(self, decoder_input_ids: mx.array, encoder_hidden_states: mx.array,
               attention_mask: Optional[mx.array] = None, cache: Optional[list] = None) -> mx.array:
        """Logits of the decoder over ``encoder_hidden_states``, shape ``(B, L_t, vocab_size)``."""
        _tokens("decoder_input_ids", decoder_input_ids)
        mask = self._mask(attention_mask, encoder_hidden_states.shape[:2])
        h = self.decoder(self.shared(decoder_input_ids), context=encoder_hidden_states, context_mask=mask,
                         cache=cache)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.shared.as_linear(h * self.dim**-0.5)

    def __call__(self, input_ids: mx.array, decoder_input_ids: mx.array,
                 attention_mask: Optional[mx.array] = None) -> mx.array:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def shift_right(self, labels: mx.array) -> mx.array:
        """``decoder_start_token_id`` followed by ``labels[:, :-1]``, with -100 replaced by ``pad_token_id``."""
        _tokens("labels", labels)
        start = mx.full((labels.shape[0], 1), self.start_token, labels.dtype)
        shifted = mx.concatenate([start, labels[:, :-1]], axis=1)
        return mx.where(shifted == -100, self.pad_token_id, shifted)

    def generate(self, input_ids: mx.array, max_new_tokens: int = 20, attention_mask: Optional[mx.array] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, stop_at_eos: bool = True,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, key: Optional[mx.array] = None) -> mx.array:
        """Decode after encoding ``input_ids`` once: greedy by default (transformers'
        ``generate(do_sample=False)``), sampled with ``temperature`` > 0 and the filters of
        :func:`~mlx_zeta.structs.sample`. The decoder's self-attention keys/values are cached (its
        cross-attention ones are recomputed each step).

        A sequence that emits ``eos_token_id`` (default: the config's) is finished: later positions get
        ``pad_token_id``, and decoding stops once every sequence is finished or after ``max_new_tokens``.
        ``stop_at_eos=False`` always produces ``max_new_tokens`` tokens. ``key``: ``mx.random.key`` for
        the draws (``None``: MLX's global random state). Returns ``(B, 1 + T)`` int32, starting with
        ``decoder_start_token_id``.
        """
        steps = self.stream(input_ids, max_new_tokens, attention_mask, eos_token_id, stop_at_eos,
                            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, key=key)
        start = mx.full((input_ids.shape[0], 1), self.start_token, mx.int32)
        return mx.concatenate([start, *(t[:, None] for t in steps)], axis=1)

    def stream(self, input_ids: mx.array, max_new_tokens: int = 20, attention_mask: Optional[mx.array] = None,
               eos_token_id: Union[int, Sequence[int], None] = None, stop_at_eos: bool = True,
               temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
               min_p: Optional[float] = None, key: Optional[mx.array] = None,
               **loop_options: Any) -> Iterator[mx.array]:
        """Like :meth:`generate` without the start token: yield each step's tokens, shape ``(B,)`` int32.
        Arguments are checked when ``stream`` is called: ``input_ids`` and ``decoder_start_token_id``
        must be ids in ``[0, vocab_size)`` (:func:`~mlx_zeta.structs.decoding.check_token_ids`).
        ``loop_options`` (``processor``, ``counts``, ``logprobs``) go to
        :func:`~mlx_zeta.structs.decoding.decode_steps`."""
        vocab = self.shared.weight.shape[0]
        check_token_ids("T5Model", "input_ids", input_ids, vocab)
        check_int("T5Model", "decoder_start_token_id", self.start_token, 0, vocab - 1,
                  says=f"expected decoder_start_token_id to be a token id in [0, {vocab})")
        check_int("T5Model", "max_new_tokens", max_new_tokens, 1)
        check_sampling_args("T5Model", temperature, top_k, top_p, min_p, key)
        if not stop_at_eos:
            eos = []
        elif eos_token_id is None:
            eos = self.eos_ids
        else:
            eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
            for end in eos:
                check_int("T5Model", "eos_token_id", end, says="expected eos_token_id to be an int or a list of ints")
        if eos and self.pad_token_id is None:
            raise ValueError(f"{_WHO} expected pad_token_id in the config to pad finished sequences, got None")
        if key is None:
            key = mx.random.key(0) if temperature == 0 else global_key()  # greedy leaves the global state alone
        context = self.encode(input_ids, attention_mask)
        cache = self.make_cache()
        start = mx.full((input_ids.shape[0], 1), self.start_token, mx.int32)
        logits = self.decode(start, context, attention_mask, cache)[:, -1]

        def step(tok: mx.array) -> mx.array:  # (B,) -> (B, vocab)
            return self.decode(tok[:, None], context, attention_mask, cache)[:, -1]

        return decode_steps(step, logits, max_new_tokens, key, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, eos=eos, pad_value=0 if self.pad_token_id is None else self.pad_token_id,
                            **loop_options)
