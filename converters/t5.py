r"""T5 checkpoints (T5 v1 and v1.1 / Flan-T5) onto :class:`~mlx_zeta.models.t5.T5Model` (re-exported
here), an encoder-decoder of mlx_zeta :class:`~mlx_zeta.structs.Encoder` and
:class:`~mlx_zeta.structs.Decoder` stacks.

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

Export (:func:`to_hf`, ``save_pretrained(..., format="hf")``) is the exact inverse: :data:`NAMES`
read backwards, ``ff.proj_in`` split back into ``wi_0``/``wi_1``, ``shared`` once, ``lm_head`` only
when untied (transformers >= 5 then keeps the checkpoint's own head: it ties only equal tensors).

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
from typing import Dict, List, Optional, Union

import mlx.core as mx

from mlx_zeta.models.t5 import T5Model

from .base import ACTIVATIONS, BaseModelArgs, rename_rules, rename

MODEL_TYPES = ("t5",)
TASK = "seq2seq"
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

    POSITIVE = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance")

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


def build(args: ModelArgs) -> T5Model:
    """A :class:`~mlx_zeta.models.t5.T5Model` with the checkpoint's shapes (weights still random)."""
    return T5Model(
        vocab_size=args.vocab_size, dim=args.d_model, depth=args.num_layers, heads=args.num_heads,
        dim_head=args.d_kv, ff_inner_dim=args.d_ff, decoder_depth=args.num_decoder_layers, ff_glu=args.gated,
        activation=args.activation, num_buckets=args.relative_attention_num_buckets,
        max_distance=args.relative_attention_max_distance, norm_eps=args.layer_norm_epsilon, tied=args.tied,
        pad_token_id=args.pad_token_id, eos_token_id=args.eos_token_id,
        decoder_start_token_id=args.decoder_start_token_id)


def _stack_names(stack: str, ff: int) -> list:
    """(Hugging Face, ours) name prefixes of one stack, ``ff`` its feed-forward's sub-layer index."""
    hf, ours = f"{stack}.block.{{i}}.layer.", f"{stack}.layers.{{i}}."
    names = [(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.",
              f"{stack}.rel_pos.relative_attention_bias.")]
    names += [(f"{hf}0.SelfAttention.{p}.", f"{ours}attn.to_{p}.") for p in "qkv"]
    names += [(f"{hf}0.SelfAttention.o.", f"{ours}attn.to_out."), (f"{hf}0.layer_norm.", f"{ours}attn_norm."),
              (f"{hf}{ff}.DenseReluDense.wi.", f"{ours}ff.proj_in."),
              (f"{hf}{ff}.DenseReluDense.wo.", f"{ours}ff.proj_out."),
              (f"{hf}{ff}.layer_norm.", f"{ours}ff_norm."), (f"{stack}.final_layer_norm.", f"{stack}.final_norm.")]
    if stack == "decoder":
        names += [(f"{hf}1.EncDecAttention.{p}.", f"{ours}cross_attn.to_{p}.") for p in "qkv"]
        names += [(f"{hf}1.EncDecAttention.o.", f"{ours}cross_attn.to_out."),
                  (f"{hf}1.layer_norm.", f"{ours}cross_attn_norm.")]
    return names


# (Hugging Face, ours) name prefixes, "{i}" a layer index: read by sanitize, written by to_hf.
NAMES = _stack_names("encoder", 1) + _stack_names("decoder", 2)
_RENAMES, _TO_HF = rename_rules(NAMES, {"i": r"\d+"})
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


_OUR_PROJ_IN = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.ff\.proj_in\.weight$")


def to_hf(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """The inverse of :func:`sanitize`: :class:`T5Model`'s names to ``T5ForConditionalGeneration``'s;
    a gated ``ff.proj_in`` ``[wi_1; wi_0]`` split back into ``wi_0`` and ``wi_1`` (row-contiguous).
    ``shared`` is written once (transformers ties ``embed_tokens`` to it), an untied ``lm_head`` as
    it is, a tied one not at all. Pure; ``sanitize(to_hf(w, args), args) == w``."""
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        m = _OUR_PROJ_IN.match(name) if args.gated else None
        if m:
            stack, layer = m.groups()
            value_half, gate_half = mx.split(value, 2, axis=0)  # (2 * d_ff, d_model) -> two (d_ff, d_model)
            wi = f"{stack}.block.{layer}.layer.{_FF_OF[stack]}.DenseReluDense.wi_"
            out[wi + "0.weight"], out[wi + "1.weight"] = mx.contiguous(gate_half), mx.contiguous(value_half)
            continue
        out[rename(name, _TO_HF)] = value
    return out


def hf_config(config: Dict, args: ModelArgs) -> Dict:
    """``config.json`` for :func:`to_hf`'s weights: ``architectures`` ``["T5ForConditionalGeneration"]``."""
    return {**config, "architectures": ["T5ForConditionalGeneration"]}
