"""GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``) as an mlx_zeta ``Transformer`` struct.

A Hugging Face GPT-2 block is a pre-norm residual block; in mlx_zeta terms a
:class:`~mlx_zeta.structs.Decoder` with LayerNorms ``nn.LayerNorm(dim, eps=layer_norm_epsilon)``,
biased q/k/v/out projections, a two-layer feed-forward
:math:`\\text{ff}(x) = W_2\\,\\phi(W_1 x + b_1) + b_2` of width ``n_inner`` (default
``4 * n_embd``) and a final norm (``ln_f``). The token embedding ``wte`` is tied to the
logits unless ``tie_word_embeddings`` is false. The learned position embedding ``wpe`` is
*added unscaled*: :math:`h_0 = E[x_t] + P[t]`. The ``Transformer``'s
:class:`~mlx_zeta.nn.AbsolutePositionalEmbedding` multiplies by :math:`d^{-1/2}`
(x-transformers' convention), so :func:`build` sets that module's ``scale`` to 1 — the
weights stay Hugging Face's as they are (exact in every dtype, and ``sanitize`` stays a pure
renaming).

Weight names (Hugging Face -> mlx_zeta; the ``transformer.`` prefix is optional):
``wte`` -> ``token_emb``, ``wpe`` -> ``pos_emb.emb``, ``h.i.ln_1`` -> ``attn_layers.layers.i.attn_norm``,
``h.i.attn.c_attn`` -> ``...attn.to_{q,k,v}`` (split in three), ``h.i.attn.c_proj`` -> ``...attn.to_out``,
``h.i.ln_2`` -> ``...ff_norm``, ``h.i.mlp.c_fc`` -> ``...ff.proj_in``, ``h.i.mlp.c_proj`` -> ``...ff.proj_out``,
``ln_f`` -> ``attn_layers.final_norm``, ``lm_head`` -> ``to_logits`` (untied only).
GPT-2's ``Conv1D`` stores its weight as ``(in, out)``; it is transposed to ``nn.Linear``'s
``(out, in)``. The causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` of old checkpoints
are dropped.

Dropout rates of the config (``attn_pdrop``, ``resid_pdrop``, ``embd_pdrop``) are not carried
over: the model is built for inference (``from_pretrained`` returns it in eval mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.structs import Decoder, Transformer

from .base import ACTIVATIONS, BaseModelArgs, LinearPart, activation, check_architectures, rename

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
TASK = "causal-lm"


@dataclass
class ModelArgs(BaseModelArgs):
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    n_positions: int = 1024
    n_inner: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    architectures: Optional[Sequence[str]] = None

    POSITIVE = ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions", "n_inner")

    def __post_init__(self):
        where = "gpt2 converter"
        activation(self.activation_function, where, "activation_function")
        check_architectures(self.architectures, ARCHITECTURES, where)
        if self.scale_attn_by_inverse_layer_idx:
            raise ValueError(f"[{where}] unsupported scale_attn_by_inverse_layer_idx=True (a per-layer attention "
                             "scale 1/(layer+1)); expected False")
        if self.add_cross_attention:
            raise ValueError(f"[{where}] unsupported add_cross_attention=True (GPT-2 as a seq2seq decoder); "
                             "expected False")
        if self.n_embd % self.n_head:
            raise ValueError(f"[{where}] expected n_head to divide n_embd, got n_embd={self.n_embd}, "
                             f"n_head={self.n_head}")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd


def build(args: ModelArgs) -> Transformer:
    """An mlx_zeta ``Transformer`` with the checkpoint's shapes (weights still random).

    ``reorder_and_upcast_attn`` only makes transformers' eager kernel compute the scores in
    float32 (its default SDPA path ignores it): the same math, so it is accepted as is.
    """
    eps = args.layer_norm_epsilon
    layers = Decoder(
        dim=args.n_embd, depth=args.n_layer, heads=args.n_head, attn_bias=True,
        attn_scale=None if args.scale_attn_weights else 1.0,
        ff_inner_dim=args.n_inner, ff_custom_act=ACTIVATIONS[args.activation_function],
        norm=lambda d: nn.LayerNorm(d, eps=eps),
    )
    model = Transformer(num_tokens=args.vocab_size, max_seq_len=args.n_positions, attn_layers=layers,
                        tie_embedding=args.tie_word_embeddings, use_abs_pos_emb=True)
    model.pos_emb.scale = 1.0  # GPT-2 adds wpe unscaled (see the module docstring)
    return model


_LAYER = r"^h\.(\d+)\."
_RENAMES = [
    (r"^wte\.", "token_emb."),
    (r"^wpe\.", "pos_emb.emb."),
    (r"^ln_f\.", "attn_layers.final_norm."),
    (r"^lm_head\.", "to_logits."),
    (_LAYER + r"ln_1\.", r"attn_layers.layers.\1.attn_norm."),
    (_LAYER + r"ln_2\.", r"attn_layers.layers.\1.ff_norm."),
    (_LAYER + r"attn\.c_proj\.", r"attn_layers.layers.\1.attn.to_out."),
    (_LAYER + r"mlp\.c_fc\.", r"attn_layers.layers.\1.ff.proj_in."),
    (_LAYER + r"mlp\.c_proj\.", r"attn_layers.layers.\1.ff.proj_out."),
]
_CONV1D_WEIGHT = re.compile(_LAYER + r"(attn|mlp)\.c_\w+\.weight$")
_C_ATTN = re.compile(_LAYER + r"attn\.c_attn\.(weight|bias)$")
_MASK_BUFFER = re.compile(_LAYER + r"attn\.(bias|masked_bias)$")


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Hugging Face names and layouts to the ``Transformer``'s: ``Conv1D`` weights ``(in, out)``
    transposed, ``c_attn`` split into ``to_q``/``to_k``/``to_v``, mask buffers and a tied
    ``lm_head`` dropped. Transposed and split weights are made row-contiguous, the layout
    ``save_pretrained`` writes, so the reloaded model runs the same matmuls (bit-identical logits).
    Pure and idempotent (mlx_zeta names pass through)."""
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        name = name[len("transformer."):] if name.startswith("transformer.") else name
        if _MASK_BUFFER.match(name) or (args.tie_word_embeddings and name.startswith("lm_head.")):
            continue
        m = _C_ATTN.match(name)
        if m:
            layer, kind = m.groups()
            fused = value.T if kind == "weight" else value  # (3 * dim, dim) or (3 * dim,)
            if fused.shape[0] != 3 * args.n_embd:
                raise ValueError(f"[gpt2 converter] expected h.{layer}.attn.c_attn.{kind} to hold 3 * n_embd = "
                                 f"{3 * args.n_embd} outputs (q, k, v), got shape {tuple(value.shape)}")
            for proj, part in zip("qkv", mx.split(fused, 3, axis=0)):
                out[f"attn_layers.layers.{layer}.attn.to_{proj}.{kind}"] = mx.contiguous(part)
            continue
        out[rename(name, _RENAMES)] = mx.contiguous(value.T) if _CONV1D_WEIGHT.match(name) else value
    return out


# --------------------------------------------------------------------------- adapters: Hugging Face modules


def hf_linear_parts(args: ModelArgs) -> List[LinearPart]:
    """The Hugging Face module (PEFT's name for it) behind each Linear an adapter may wrap; all
    are ``Conv1D`` (``transposed``: weight ``(in, out)``; PEFT's ``fan_in_fan_out``).

    Per layer ``i`` (``attn_layers.layers.i.`` -> ``transformer.h.i.``, no ``transformer.`` for a
    bare ``GPT2Model``): ``attn.to_q``, ``to_k``, ``to_v`` are rows ``0:d``, ``d:2d``, ``2d:3d`` of
    ``attn.c_attn`` (``d = n_embd``; :func:`sanitize` splits it so), ``attn.to_out`` is
    ``attn.c_proj``, ``ff.proj_in`` is ``mlp.c_fc`` and ``ff.proj_out`` is ``mlp.c_proj``. A LoRA on
    ``c_attn`` is one on each of ``to_q``/``to_k``/``to_v`` with the same ``A`` and ``B`` split by
    rows; LoRAs on those are one on ``c_attn`` with the ``A``'s stacked and the ``B``'s block-diagonal."""
    bare = bool(args.architectures) and "GPT2LMHeadModel" not in args.architectures
    d, inner = args.n_embd, args.n_inner
    parts = []
    for i in range(args.n_layer):
        ours, hf = f"attn_layers.layers.{i}.", f"{'' if bare else 'transformer.'}h.{i}."
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            parts.append(LinearPart(f"{ours}attn.{name}", (0, d), f"{hf}attn.c_attn", (j * d, (j + 1) * d), True))
        parts += [LinearPart(f"{ours}attn.to_out", (0, d), f"{hf}attn.c_proj", (0, d), True),
                  LinearPart(f"{ours}ff.proj_in", (0, inner), f"{hf}mlp.c_fc", (0, inner), True),
                  LinearPart(f"{ours}ff.proj_out", (0, d), f"{hf}mlp.c_proj", (0, d), True)]
    return parts
