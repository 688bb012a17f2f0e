"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) as mlx_zeta ``Transformer`` structs.

A Hugging Face Llama layer is a pre-norm residual block; in mlx_zeta terms a
:class:`~mlx_zeta.structs.Decoder` with

- norms ``nn.RMSNorm(dim, eps=rms_norm_eps)`` (Hugging Face's
  :math:`x / \\sqrt{\\overline{x^2} + \\epsilon} \\odot \\gamma`);
- rotary positions on the whole head (rotate-half layout, as Hugging Face), with the
  frequencies of ``rope_scaling`` / ``rope_parameters`` (default, linear, llama3);
- grouped-query attention; Qwen2's q/k/v biases (``attn_bias`` with ``attn_out_bias=False``);
  Qwen3's per-head RMSNorm on queries and keys (``attn_qk_norm``) before the rotation;
- a SwiGLU feed-forward whose input projection is ``[up; gate]`` stacked on the output axis
  (FeedForward's value half first, gate half second);
- Mistral's sliding window (``sliding_window``), tied or untied embeddings.

Weight names (Hugging Face -> mlx_zeta): ``model.embed_tokens`` -> ``token_emb``,
``model.layers.i.self_attn.{q,k,v,o}_proj`` -> ``attn_layers.layers.i.attn.to_{q,k,v,out}``,
``...self_attn.{q,k}_norm`` -> ``...attn.{q,k}_norm``, ``mlp.{up,gate}_proj`` ->
``ff.proj_in`` (stacked), ``mlp.down_proj`` -> ``ff.proj_out``, ``input_layernorm`` ->
``attn_norm``, ``post_attention_layernorm`` -> ``ff_norm``, ``model.norm`` ->
``attn_layers.final_norm``, ``lm_head`` -> ``to_logits``; one table (``NAMES``) gives both
directions: :func:`sanitize` reads a checkpoint, :func:`to_hf` writes one back (``ff.proj_in`` split
into ``up_proj``, ``gate_proj``) and :func:`hf_config` sets its ``architectures``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.structs import Decoder, Transformer

from .base import LinearPart, TransformerArgs, rename, rename_rules
from .fields import check_entries

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TASK = "causal-lm"
ROPE_TYPES = ("default", "linear", "llama3")
# The numbers each rope_type reads (all finite JSON numbers).
ROPE_NUMBERS = {"default": ("rope_theta",), "linear": ("rope_theta", "factor"),
                "llama3": ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}


@dataclass
class ModelArgs(TransformerArgs):
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None  # transformers >= 5 puts rope_theta and scaling here
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    use_sliding_window: bool = False
    hidden_act: str = "silu"

    HIDDEN_ACT = "silu"  # the one activation the converter builds (subclasses set theirs)
    POSITIVE = TransformerArgs.POSITIVE + ("num_key_value_heads", "head_dim", "max_position_embeddings")

    def __post_init__(self):
        if self.hidden_act != self.HIDDEN_ACT:
            raise ValueError(f"[{self.model_type} converter] expected hidden_act {self.HIDDEN_ACT!r}, "
                             f"got {self.hidden_act!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def rope(self) -> Dict[str, Any]:
        """The rope settings wherever the config keeps them, with ``rope_type`` and ``rope_theta``."""
        rope = dict(self.rope_parameters or {})
        rope.update(self.rope_scaling or {})
        rope.setdefault("rope_theta", self.rope_theta)
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        return rope

    @property
    def window(self) -> Optional[int]:
        """The sliding window in force: Mistral's, or Qwen2/Qwen3's when ``use_sliding_window``."""
        if self.model_type == "mistral" or self.use_sliding_window:
            return self.sliding_window
        return None


def rope_inv_freq(dim: int, rope: Dict[str, Any]) -> tuple[Optional[mx.array], float]:
    """Rotary frequencies and interpolation factor for a Hugging Face rope config.

    ``default``: :math:`\\theta_i = b^{-2i/d}`. ``linear``: positions divided by ``factor``.
    ``llama3``: wavelengths :math:`\\lambda_i = 2\\pi/\\theta_i` longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those
    shorter than ``original / high_freq_factor`` are kept, and in between
    :math:`\\theta_i' = (1 - s)\\,\\theta_i/\\text{factor} + s\\,\\theta_i` with
    :math:`s = (\\text{original}/\\lambda_i - \\text{low}) / (\\text{high} - \\text{low})`.
    Returns ``(inv_freq or None, interpolation_factor)``.
    """
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"[llama converter] unsupported rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    numbers = ROPE_NUMBERS[kind]
    check_entries(rope, dict.fromkeys(numbers, float), f"config.json: rope_scaling (rope_type {kind!r})", numbers)
    if kind == "default":
        return None, 1.0
    factor = float(rope["factor"])
    if kind == "linear":
        return None, factor
    base = float(rope["rope_theta"])
    inv = [base ** (-i / dim) for i in range(0, dim, 2)]
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    out = []
    for theta in inv:
        wavelength = 2 * math.pi / theta
        if wavelength < original / high:
            out.append(theta)
        elif wavelength > original / low:
            out.append(theta / factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append((1 - s) * theta / factor + s * theta)
    return mx.array(out, dtype=mx.float32), 1.0


def build(args: ModelArgs) -> Transformer:
    """An mlx_zeta ``Transformer`` with the checkpoint's shapes (weights still random)."""
    inv_freq, interpolation = rope_inv_freq(args.head_dim, args.rope)
    qwen2 = args.model_type == "qwen2"
    layers = Decoder(
        dim=args.hidden_size, depth=args.num_hidden_layers, heads=args.num_attention_heads,
        attn_dim_head=args.head_dim, attn_kv_heads=args.num_key_value_heads,
        attn_bias=qwen2 or args.attention_bias, attn_out_bias=args.attention_bias,
        attn_qk_norm=args.model_type == "qwen3", attn_qk_norm_eps=args.rms_norm_eps,
        ff_swiglu=True, ff_inner_dim=args.intermediate_size, ff_no_bias=not args.mlp_bias,
        rotary_pos_emb=True, rotary_emb_dim=args.head_dim, rotary_base=float(args.rope["rope_theta"]),
        rotary_inv_freq=inv_freq, rotary_interpolation_factor=interpolation,
        norm=lambda d: nn.RMSNorm(d, eps=args.rms_norm_eps), sliding_window=args.window,
    )
    return Transformer(num_tokens=args.vocab_size, max_seq_len=args.max_position_embeddings, attn_layers=layers,
                       tie_embedding=args.tie_word_embeddings, use_abs_pos_emb=False)


# (Hugging Face prefix, ours); {i}: a layer index, {p}: q/k/v, {n}: q/k.
NAMES = [
    ("model.embed_tokens.", "token_emb."),
    ("model.norm.", "attn_layers.final_norm."),
    ("lm_head.", "to_logits."),
    ("model.layers.{i}.self_attn.{p}_proj.", "attn_layers.layers.{i}.attn.to_{p}."),
    ("model.layers.{i}.self_attn.o_proj.", "attn_layers.layers.{i}.attn.to_out."),
    ("model.layers.{i}.self_attn.{n}_norm.", "attn_layers.layers.{i}.attn.{n}_norm."),
    ("model.layers.{i}.mlp.down_proj.", "attn_layers.layers.{i}.ff.proj_out."),
    ("model.layers.{i}.input_layernorm.", "attn_layers.layers.{i}.attn_norm."),
    ("model.layers.{i}.post_attention_layernorm.", "attn_layers.layers.{i}.ff_norm."),
]
FIELDS = {"i": r"\d+", "p": "[qkv]", "n": "[qk]"}
RENAMES, HF_RENAMES = rename_rules(NAMES, FIELDS)
_GATE_UP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$")
_PROJ_IN = re.compile(r"^attn_layers\.layers\.(\d+)\.ff\.proj_in\.(weight|bias)$")
# model_type -> the transformers class of the checkpoint (config.json's architectures).
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Hugging Face names to the ``Transformer``'s; ``gate_proj``/``up_proj`` stacked into
    ``ff.proj_in`` as ``[up; gate]``; rotary buffers and a tied ``lm_head`` dropped.
    Pure and idempotent (mlx_zeta names pass through)."""
    out: Dict[str, mx.array] = {}
    halves: Dict[tuple, Dict[str, mx.array]] = {}
    for name, value in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if args.tie_word_embeddings and name.startswith("lm_head."):
            continue
        m = _GATE_UP.match(name)
        if m:
            halves.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        out[rename(name, RENAMES)] = value
    for (layer, kind), pair in halves.items():
        target = f"attn_layers.layers.{layer}.ff.proj_in.{kind}"
        if set(pair) != {"gate", "up"}:
            missing = ({"gate", "up"} - set(pair)).pop()
            raise ValueError(f"[{args.model_type} converter] model.layers.{layer}.mlp.{missing}_proj.{kind} is "
                             f"missing (its partner is present; both are needed for {target})")
        out[target] = mx.concatenate([pair["up"], pair["gate"]], axis=0)
    return out


def to_hf(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """The inverse of :func:`sanitize`: the ``Transformer``'s names to Hugging Face's, ``ff.proj_in``
    split back into ``up_proj`` (first half) and ``gate_proj``; a tied model has no ``lm_head``
    (transformers ties it). Pure; ``sanitize(to_hf(w, args), args) == w``."""
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        m = _PROJ_IN.match(name)
        if m:
            up, gate = mx.split(value, 2, axis=0)
            out[f"model.layers.{m.group(1)}.mlp.up_proj.{m.group(2)}"] = up
            out[f"model.layers.{m.group(1)}.mlp.gate_proj.{m.group(2)}"] = gate
        else:
            out[rename(name, HF_RENAMES)] = value
    return out


def hf_config(config: Dict[str, Any], args: ModelArgs) -> Dict[str, Any]:
    """``config.json`` for :func:`to_hf`'s weights: ``architectures`` the model_type's causal LM."""
    return {**config, "architectures": [HF_ARCHITECTURES[args.model_type]]}


# --------------------------------------------------------------------------- adapters: Hugging Face modules


def hf_linear_parts(args: ModelArgs) -> List[LinearPart]:
    """The Hugging Face module (PEFT's name for it) behind each Linear an adapter may wrap.

    Per layer ``i`` (``attn_layers.layers.i.`` -> ``model.layers.i.``): ``attn.to_{q,k,v,out}`` is
    ``self_attn.{q,k,v,o}_proj`` and ``ff.proj_out`` is ``mlp.down_proj``, whole; ``ff.proj_in``
    holds ``[up; gate]`` (:func:`sanitize`), so its rows ``0:I`` are ``mlp.up_proj`` and rows
    ``I:2I`` ``mlp.gate_proj`` (``I = intermediate_size``). A LoRA on ``proj_in`` is therefore one on
    each half with the same ``A`` and ``B`` split by rows; LoRAs on both halves are one on
    ``proj_in`` with the ``A``'s stacked and the ``B``'s block-diagonal."""
    q = args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    inner, dim = args.intermediate_size, args.hidden_size
    parts = []
    for i in range(args.num_hidden_layers):
        ours, hf = f"attn_layers.layers.{i}.", f"model.layers.{i}."
        for name, proj, rows in (("to_q", "q", q), ("to_k", "k", kv), ("to_v", "v", kv), ("to_out", "o", dim)):
            parts.append(LinearPart(f"{ours}attn.{name}", (0, rows), f"{hf}self_attn.{proj}_proj", (0, rows)))
        parts += [LinearPart(f"{ours}ff.proj_in", (0, inner), f"{hf}mlp.up_proj", (0, inner)),
                  LinearPart(f"{ours}ff.proj_in", (inner, 2 * inner), f"{hf}mlp.gate_proj", (0, inner)),
                  LinearPart(f"{ours}ff.proj_out", (0, dim), f"{hf}mlp.down_proj", (0, dim))]
    return parts
