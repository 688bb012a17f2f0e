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

Export (:func:`to_hf`, ``save_pretrained(..., format="hf")``) is the exact inverse: the
renaming table :data:`NAMES` read backwards, ``to_{q,k,v}`` fused into ``c_attn``, ``Conv1D``
weights transposed back to ``(in, out)``, a tied head left for transformers to tie, names
prefixed ``transformer.`` (``GPT2LMHeadModel``) unless ``architectures`` names only ``GPT2Model``
(:func:`hf_config` writes the class it chose).

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

from .base import ACTIVATIONS, BaseModelArgs, LinearPart, activation, check_architectures, rename_rules, rename

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


# (Hugging Face, ours) name prefixes, "{i}" a layer index: read by sanitize, written by to_hf.
NAMES = [
    ("wte.", "token_emb."),
    ("wpe.", "pos_emb.emb."),
    ("ln_f.", "attn_layers.final_norm."),
    ("lm_head.", "to_logits."),
    ("h.{i}.ln_1.", "attn_layers.layers.{i}.attn_norm."),
    ("h.{i}.ln_2.", "attn_layers.layers.{i}.ff_norm."),
    ("h.{i}.attn.c_proj.", "attn_layers.layers.{i}.attn.to_out."),
    ("h.{i}.mlp.c_fc.", "attn_layers.layers.{i}.ff.proj_in."),
    ("h.{i}.mlp.c_proj.", "attn_layers.layers.{i}.ff.proj_out."),
]
_RENAMES, _TO_HF = rename_rules(NAMES, {"i": r"\d+"})
_LAYER = r"^h\.(\d+)\."
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


_OUR_QKV = re.compile(r"^attn_layers\.layers\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$")


def hf_prefix(args: ModelArgs) -> str:
    """``"transformer."`` for ``GPT2LMHeadModel`` (the default), ``""`` when ``architectures`` names
    only ``GPT2Model`` (a trunk saved without the head class's prefix)."""
    return "" if list(args.architectures or ()) == ["GPT2Model"] else "transformer."


def to_hf(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """The inverse of :func:`sanitize`: the ``Transformer``'s names and layouts to the checkpoint
    transformers writes (``transformer.`` prefixed unless :func:`hf_prefix` says otherwise):
    ``to_{q,k,v}`` fused into ``c_attn`` ``[q; k; v]``, ``Conv1D`` weights transposed to ``(in, out)``
    (row-contiguous), an untied ``to_logits`` as ``lm_head``; a tied head is not written (transformers
    ties ``lm_head`` to ``wte`` itself). Pure; ``sanitize(to_hf(w, args), args) == w``.

    Raises:
        ValueError: one of a layer's ``to_q``/``to_k``/``to_v`` without the others.
    """
    prefix, out = hf_prefix(args), {}
    fused: Dict[tuple, Dict[str, mx.array]] = {}
    for name, value in weights.items():
        m = _OUR_QKV.match(name)
        if m:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        hf = rename(name, _TO_HF)
        if hf.startswith("lm_head."):
            out[hf] = value
            continue
        out[prefix + hf] = mx.contiguous(value.T) if _CONV1D_WEIGHT.match(hf) else value
    for (layer, kind), parts in fused.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"[gpt2 converter] expected attn_layers.layers.{layer}.attn.to_{{q,k,v}}.{kind} "
                             f"together (fused into c_attn), got only to_{', to_'.join(sorted(parts))}")
        qkv = mx.concatenate([parts[p] for p in "qkv"], axis=0)  # (3 * dim, dim) or (3 * dim,)
        out[f"{prefix}h.{layer}.attn.c_attn.{kind}"] = mx.contiguous(qkv.T) if kind == "weight" else qkv
    return out


def hf_config(config: Dict, args: ModelArgs) -> Dict:
    """``config.json`` for :func:`to_hf`'s weights: ``architectures`` the class they are named for."""
    return {**config, "architectures": ["GPT2LMHeadModel" if hf_prefix(args) else "GPT2Model"]}

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
    d, inner = args.n_embd, args.n_inner
    parts = []
    for i in range(args.n_layer):
        ours, hf = f"attn_layers.layers.{i}.", f"{hf_prefix(args)}h.{i}."
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            parts.append(LinearPart(f"{ours}attn.{name}", (0, d), f"{hf}attn.c_attn", (j * d, (j + 1) * d), True))
        parts += [LinearPart(f"{ours}attn.to_out", (0, d), f"{hf}attn.c_proj", (0, d), True),
                  LinearPart(f"{ours}ff.proj_in", (0, inner), f"{hf}mlp.c_fc", (0, inner), True),
                  LinearPart(f"{ours}ff.proj_out", (0, d), f"{hf}mlp.c_proj", (0, d), True)]
    return parts
