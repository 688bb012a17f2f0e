r"""T5 encoder-decoders (T5 v1 and v1.1 / Flan-T5) on mlx_zeta :class:`~mlx_zeta.structs.Encoder`
and :class:`~mlx_zeta.structs.Decoder` stacks.

A Hugging Face T5 block is a pre-norm residual block; in mlx_zeta terms

- norms ``nn.RMSNorm(d_model, eps=layer_norm_epsilon)`` (T5LayerNorm:
  :math:`x / \sqrt{\overline{x^2} + \epsilon} \odot \gamma`, no mean, no bias), and a final norm;
- attention without the :math:`1/\sqrt{d}` score scale (``attn_scale=1.0``), ``num_heads`` heads of
  ``d_kv`` features (``num_heads * d_kv`` need not equal ``d_model``), no biases;
- one relative position bias table per stack (T5 keeps it in block 0 and shares it), bidirectional
  buckets in the encoder, causal ones in the decoder (``rel_pos_bias=True``); cross-attention has none;
- a feed-forward ``wo(act(wi x))`` (``feed_forward_proj="relu"``) or gated
  ``wo(act(wi_0 x) * wi_1 x)`` (``"gated-gelu"``, with tanh-approximate GELU), whose gated input
  projection is stored ``[wi_1; wi_0]`` (FeedForward's value half first, gate half second).

Weight names (Hugging Face -> mlx_zeta), ``S`` = ``encoder`` or ``decoder``, ``F`` = 1 (encoder) or 2
(decoder): ``shared`` -> ``shared`` (``S.embed_tokens`` are copies of it, dropped),
``S.block.i.layer.0.SelfAttention.{q,k,v,o}`` -> ``S.layers.i.attn.to_{q,k,v,out}``,
``S.block.0.layer.0.SelfAttention.relative_attention_bias`` -> ``S.rel_pos.relative_attention_bias``
(both ``(num_buckets, heads)``), ``S.block.i.layer.0.layer_norm`` -> ``S.layers.i.attn_norm``,
``decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}`` -> ``decoder.layers.i.cross_attn.to_{...}``,
``decoder.block.i.layer.1.layer_norm`` -> ``decoder.layers.i.cross_attn_norm``,
``S.block.i.layer.F.DenseReluDense.{wi,wo}`` -> ``S.layers.i.ff.{proj_in,proj_out}``,
``S.block.i.layer.F.layer_norm`` -> ``S.layers.i.ff_norm``, ``S.final_layer_norm`` -> ``S.final_norm``,
``lm_head`` -> ``lm_head`` (untied checkpoints only).

Tying: Hugging Face scales the decoder output by :math:`d_{model}^{-1/2}` when the head is tied to
``shared`` (T5 v1). transformers >= 5 writes ``scale_decoder_outputs`` for that and always says
``tie_word_embeddings: true``; older configs say ``tie_word_embeddings: false`` for v1.1. Here the
head is tied (and scaled) when ``scale_decoder_outputs`` says so, else when ``tie_word_embeddings``
does (default true); an untied checkpoint without ``lm_head`` gets ``shared`` as its head, as
transformers does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.structs import Decoder, Encoder

from .llama import rename
from .pretrained import ACTIVATIONS, BaseModelArgs

MODEL_TYPES = ("t5",)
ARCHITECTURES = ("T5ForConditionalGeneration", "T5Model", "T5WithLMHeadModel")
_WHO = "[t5 converter]"


@dataclass
class ModelArgs(BaseModelArgs):
    """``config.json`` of a T5 checkpoint (defaults: transformers' ``T5Config``)."""

    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: Optional[bool] = None
    pad_token_id: Optional[int] = 0
    eos_token_id: Union[int, List[int], None] = 1
    decoder_start_token_id: Optional[int] = None
    architectures: Optional[List[str]] = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{_WHO} expected model_type in {MODEL_TYPES}, got {self.model_type!r}")
        if self.architectures and not set(self.architectures) & set(ARCHITECTURES):
            raise ValueError(f"{_WHO} expected a checkpoint of {', '.join(ARCHITECTURES)} (encoder, decoder and "
                             f"language-model head), got architectures {self.architectures}")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.decoder_start_token_id is None:  # T5 starts decoding from the pad token
            self.decoder_start_token_id = self.pad_token_id
        _ = self.activation  # validates feed_forward_proj

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        """The feed-forward activation of ``feed_forward_proj`` (``"[gated-]ACT"``; "gated-gelu" means gelu_new)."""
        parts = self.feed_forward_proj.split("-")
        name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or name not in ACTIVATIONS:
            raise ValueError(f"{_WHO} unsupported feed_forward_proj {self.feed_forward_proj!r}; expected 'relu' "
                             f"(T5 v1), 'gated-gelu' (T5 v1.1) or [gated-]ACT with ACT in {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[name]

    @property
    def tied(self) -> bool:
        """Logits through ``shared`` after scaling by ``d_model ** -0.5`` (else an own ``lm_head``)."""
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else bool(self.scale_decoder_outputs)

    @property
    def start_token(self) -> int:
        """The first decoder token (``decoder_start_token_id``, else ``pad_token_id``)."""
        if self.decoder_start_token_id is None:
            raise ValueError(f"{_WHO} expected decoder_start_token_id (or pad_token_id) in the config to start "
                             "decoding, got None")
        return self.decoder_start_token_id

    @property
    def eos_ids(self) -> List[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _tokens(name: str, x: mx.array) -> None:
    if x.ndim != 2 or not mx.issubdtype(x.dtype, mx.integer):
        raise ValueError(f"[T5Model] expected {name} as integer tokens of shape (batch, seq), got shape "
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

    Calls:
        - ``model(input_ids, decoder_input_ids, attention_mask=None)`` -> logits :math:`(B, L_t, V)`.
        - ``model.encode(input_ids, attention_mask=None)`` -> :math:`(B, L_s, d_{model})`.
        - ``model.decode(decoder_input_ids, encoder_hidden_states, attention_mask=None, cache=None)`` ->
          logits :math:`(B, L_t, V)`; with ``cache`` (:meth:`make_cache`, the decoder's self-attention
          keys/values, updated in place) ``decoder_input_ids`` are the tokens after the cached ones.
        - ``model.generate(input_ids, max_new_tokens, attention_mask=None, eos_token_id=None)`` -> greedy
          decoding, :math:`(B, 1 + T)` starting with ``decoder_start_token_id`` (as transformers).
        - ``model.shift_right(labels)`` -> decoder inputs for teacher forcing (transformers' ``_shift_right``).

    Shape:
        - input_ids, attention_mask: :math:`(B, L_s)`; decoder_input_ids: :math:`(B, L_t)`.

    Example:
        >>> model = build(ModelArgs(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
        >>> model(mx.zeros((2, 7), mx.int32), mx.zeros((2, 3), mx.int32)).shape
        (2, 3, 100)

    Reference: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", https://arxiv.org/abs/1910.10683.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        stack = dict(dim=args.d_model, heads=args.num_heads, attn_dim_head=args.d_kv, attn_scale=1.0,
                     ff_inner_dim=args.d_ff, ff_no_bias=True, ff_glu=args.gated, ff_custom_act=args.activation,
                     rel_pos_bias=True, rel_pos_num_buckets=args.relative_attention_num_buckets,
                     rel_pos_max_distance=args.relative_attention_max_distance,
                     norm=lambda d: nn.RMSNorm(d, eps=args.layer_norm_epsilon))
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = Encoder(depth=args.num_layers, **stack)
        self.decoder = Decoder(depth=args.num_decoder_layers, cross_attend=True, **stack)
        if not args.tied:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)

    @staticmethod
    def _mask(attention_mask: Optional[mx.array], input_shape) -> Optional[mx.array]:
        if attention_mask is None:
            return None
        if attention_mask.shape != tuple(input_shape):
            raise ValueError(f"[T5Model] expected attention_mask of shape {tuple(input_shape)} (the source tokens), "
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
        return self.shared.as_linear(h * self.args.d_model**-0.5)

    def __call__(self, input_ids: mx.array, decoder_input_ids: mx.array,
                 attention_mask: Optional[mx.array] = None) -> mx.array:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def shift_right(self, labels: mx.array) -> mx.array:
        """``decoder_start_token_id`` followed by ``labels[:, :-1]``, with -100 replaced by ``pad_token_id``."""
        _tokens("labels", labels)
        start = mx.full((labels.shape[0], 1), self.args.start_token, labels.dtype)
        shifted = mx.concatenate([start, labels[:, :-1]], axis=1)
        return mx.where(shifted == -100, self.args.pad_token_id, shifted)

    def generate(self, input_ids: mx.array, max_new_tokens: int = 20, attention_mask: Optional[mx.array] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, stop_at_eos: bool = True) -> mx.array:
        """Greedy decoding (transformers' ``generate(do_sample=False)``): the encoding is computed once, the
        decoder's self-attention keys/values are cached (its cross-attention ones are recomputed each step).

        A sequence that emits ``eos_token_id`` (default: the config's) is finished: later positions get
        ``pad_token_id``, and decoding stops once every sequence is finished or after ``max_new_tokens``.
        ``stop_at_eos=False`` always produces ``max_new_tokens`` tokens. Returns ``(B, 1 + T)`` int32,
        starting with ``decoder_start_token_id``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"[T5Model] expected max_new_tokens to be an int >= 1, got {max_new_tokens!r}")
        if not stop_at_eos:
            eos = []
        elif eos_token_id is None:
            eos = self.args.eos_ids
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if eos and self.args.pad_token_id is None:
            raise ValueError("[T5Model] expected pad_token_id in the config to pad finished sequences, got None")
        context = self.encode(input_ids, attention_mask)
        cache = self.make_cache()
        token = mx.full((input_ids.shape[0], 1), self.args.start_token, mx.int32)
        done = mx.zeros((input_ids.shape[0], 1), mx.bool_)
        out = [token]
        for _ in range(max_new_tokens):
            token = mx.argmax(self.decode(token, context, attention_mask, cache)[:, -1:], axis=-1).astype(mx.int32)
            if eos:
                token = mx.where(done, self.args.pad_token_id, token)
                done = done | (token[..., None] == mx.array(eos, mx.int32)).any(axis=-1)
            out.append(token)
            mx.eval(token, done)
            if eos and done.all().item():
                break
        return mx.concatenate(out, axis=1)


def build(args: ModelArgs) -> T5Model:
    """A :class:`T5Model` with the checkpoint's shapes (weights still random)."""
    return T5Model(args)


def _stack_rules(stack: str, ff: int) -> list:
    p, q = rf"^{stack}\.block\.(\d+)\.layer\.", rf"{stack}.layers.\1."
    rules = [
        (rf"^{stack}\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.",
         f"{stack}.rel_pos.relative_attention_bias."),
        (p + r"0\.SelfAttention\.([qkv])\.", q + r"attn.to_\2."),
        (p + r"0\.SelfAttention\.o\.", q + "attn.to_out."),
        (p + r"0\.layer_norm\.", q + "attn_norm."),
        (p + rf"{ff}\.DenseReluDense\.wi\.", q + "ff.proj_in."),
        (p + rf"{ff}\.DenseReluDense\.wo\.", q + "ff.proj_out."),
        (p + rf"{ff}\.layer_norm\.", q + "ff_norm."),
        (rf"^{stack}\.final_layer_norm\.", f"{stack}.final_norm."),
    ]
    if stack == "decoder":
        rules += [(p + r"1\.EncDecAttention\.([qkv])\.", q + r"cross_attn.to_\2."),
                  (p + r"1\.EncDecAttention\.o\.", q + "cross_attn.to_out."),
                  (p + r"1\.layer_norm\.", q + "cross_attn_norm.")]
    return rules


_RENAMES = _stack_rules("encoder", 1) + _stack_rules("decoder", 2)
_FF_OF = {"encoder": "1", "decoder": "2"}
_GATED = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.DenseReluDense\.wi_([01])\.weight$")
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in some old checkpoints and unused (transformers ignores it on load).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Hugging Face names to :class:`T5Model`'s; ``wi_0``/``wi_1`` stacked into ``ff.proj_in`` as
    ``[wi_1; wi_0]``; ``embed_tokens`` copies of ``shared`` dropped (one stands in for a missing
    ``shared``); a tied ``lm_head`` dropped (it must equal ``shared``), a missing untied one set to
    ``shared``. Pure and idempotent (mlx_zeta names pass through)."""
    out: Dict[str, mx.array] = {}
    halves: Dict[tuple, Dict[str, mx.array]] = {}
    for name, value in weights.items():
        if name in _IGNORED or name in _EMBED_COPIES:
            continue
        m = _GATED.match(name)
        if m and m.group(3) == _FF_OF[m.group(1)]:
            halves.setdefault((m.group(1), m.group(2)), {})[m.group(4)] = value
            continue
        out[rename(name, _RENAMES)] = value
    for (stack, layer), pair in halves.items():
        ff = _FF_OF[stack]
        if set(pair) != {"0", "1"}:
            missing = ({"0", "1"} - set(pair)).pop()
            raise ValueError(f"{_WHO} {stack}.block.{layer}.layer.{ff}.DenseReluDense.wi_{missing}.weight is missing "
                             f"(its partner is present; both are needed for {stack}.layers.{layer}.ff.proj_in.weight)")
        out[f"{stack}.layers.{layer}.ff.proj_in.weight"] = mx.concatenate([pair["1"], pair["0"]], axis=0)
    if "shared.weight" not in out:
        copy = next((weights[k] for k in _EMBED_COPIES if k in weights), None)
        if copy is not None:
            out["shared.weight"] = copy
    shared = out.get("shared.weight")
    if args.tied and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        if shared is not None and (head.shape != shared.shape or not mx.array_equal(head, shared).item()):
            raise ValueError(f"{_WHO} lm_head.weight differs from shared.weight, but the config ties them "
                             "(scale_decoder_outputs / tie_word_embeddings true); an untied head needs "
                             "scale_decoder_outputs=false (or tie_word_embeddings=false)")
    elif not args.tied and "lm_head.weight" not in out and shared is not None:
        out["lm_head.weight"] = shared
    return out
