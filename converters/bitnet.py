r"""BitNet b1.58 checkpoints (``model_type: "bitnet"``) as mlx_zeta ``Transformer`` structs whose
projections are packed :class:`~mlx_zeta.quant.TernaryLinear` layers, loaded without unpacking.

A Hugging Face BitNet layer is a Llama layer (see :mod:`.llama`: RMSNorm pre-norm residuals,
rotary positions, grouped-query attention, rope settings, tied or untied head) with

- ``self_attn.attn_sub_norm``: RMSNorm on the attention output before ``o_proj``;
- a squared-ReLU gated MLP with its own sub-norm:
  :math:`\mathrm{down}(\mathrm{RMSNorm}_{\mathrm{ffn}}(\mathrm{relu}(\mathrm{gate}(x))^2 \odot \mathrm{up}(x)))`;
- with ``quantization_config = {"quant_method": "bitnet", ...}``, every decoder ``nn.Linear``
  (never ``lm_head``) replaced by a ternary layer holding ``weight`` and ``weight_scale``
  :math:`\sigma` (shape ``(1,)``), whose input :math:`x` is quantized per token to int8,
  :math:`Q_x = \mathrm{round}(x s_x)`, :math:`s_x = 127/\max|x|`, and multiplied by the ternary
  :math:`T \in \{-1,0,1\}^{out \times in}` as exact integers, :math:`A = Q_x T^\top`.

``quantization_config`` variants (those transformers' ``BitNetQuantConfig`` accepts):

- ``linear_class="bitlinear"`` (the default; any ``quantization_mode``): ``weight`` packed uint8 ``(ceil(out/4), in)``,
  :math:`y = A/(s_x\sigma) + b`, ``scale_convention="divide"``, :math:`\sigma = 1/\mathrm{mean}|W|`;
- ``"autobitlinear"``, offline: ``weight`` packed uint8 or float holding {-1, 0, 1},
  :math:`y = (A/s_x + b)\,\sigma`, ``"multiply"``, :math:`\sigma = \mathrm{mean}|W|`;
- ``"autobitlinear"``, ``quantization_mode="online"``: float latent :math:`W` and no scale; packed
  at load as :math:`T, \sigma` = :func:`~mlx_zeta.quant.ternarize` (:math:`W`) with "divide" (the
  math of transformers' ``WeightQuant``). Loading makes an inference model; it does not train.

Packed uint8 weights are kept as they are: byte :math:`[r, j]` holds, in bits :math:`[2i, 2i+1]`,
the code :math:`T + 1` of row :math:`iR + r`, :math:`R = \lceil out/4 \rceil`
(:func:`~mlx_zeta.quant.pack_2bit`, transformers' ``pack_weights``), so each ternary weight costs
0.25 bytes plus one scalar scale per matrix. Float ternary weights (autobitlinear offline) and
latent float weights (online) are packed once while loading. ``use_rms_norm`` (an RMSNorm inside
each BitLinear, ``<proj>.rms_norm``) becomes the layer's ``norm``. ``modules_to_not_convert`` may
only name ``lm_head`` (which is float anyway); a checkpoint without a bitnet
``quantization_config`` has float projections and is refused.

Layout (mlx_zeta names under ``attn_layers.layers.i``):

- ``self_attn.{q,k,v}_proj`` -> ``attn.to_{q,k,v}`` (:class:`TernaryLinear`);
  ``self_attn.o_proj`` -> ``attn.to_out`` and ``self_attn.attn_sub_norm`` -> ``attn.to_out.sub_norm``
  (:class:`SubNormTernaryLinear`: the sub-norm, then the ternary layer);
- ``mlp.{up,gate}_proj`` -> ``ff.proj_in.{up,gate}``, two ternary layers whose outputs
  :class:`StackedProjection` concatenates as ``[up(x); gate(x)]``, the (value, gate) halves of
  FeedForward's GLU with ``relu_squared``: :math:`h = up(x) \odot \mathrm{relu}(gate(x))^2`. They
  are not merged into one packed matrix: the 2-bit layout interleaves rows in blocks of
  :math:`\lceil out/4 \rceil`, and each has its own :math:`\sigma`;
- ``mlp.down_proj`` -> ``ff.proj_out``, ``mlp.ffn_sub_norm`` -> ``ff.proj_out.sub_norm``;
- inside each ternary layer: ``weight`` -> ``packed``, ``weight_scale`` (1,) -> ``weight_scale``
  float32 scalar, ``rms_norm.weight`` -> ``norm.weight``, ``bias`` -> ``bias``;
- embeddings, layer norms, final norm, ``lm_head``: as :mod:`.llama`.

:func:`build` constructs the decoder's float ``nn.Linear`` layers lazily and swaps them for
ternary ones before anything is evaluated, so their float weights are never materialized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.quant import StackedProjection, SubNormTernaryLinear, TernaryLinear, pack_2bit, ternarize
from mlx_zeta.structs import Decoder, Transformer

from . import llama
from .base import rename, rename_rules
from .fields import check_entries

MODEL_TYPES = ("bitnet",)
TASK = "causal-lm"
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
QUANTIZATION_MODES = ("offline", "online")
# The quantization_config entries this converter reads, with their types.
QUANTIZATION_ENTRIES = {"quant_method": str, "linear_class": str, "quantization_mode": str,
                        "use_rms_norm": Optional[bool], "rms_norm_eps": Optional[float],
                        "modules_to_not_convert": Optional[List[str]]}


def _error(message: str) -> ValueError:
    return ValueError(f"[bitnet converter] {message}")


@dataclass
class ModelArgs(llama.ModelArgs):
    """``config.json`` fields: :class:`.llama.ModelArgs`' (BitNet defaults) plus ``quantization_config``."""

    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    hidden_act: str = "relu2"
    quantization_config: Optional[Dict[str, Any]] = None

    HIDDEN_ACT = "relu2"

    def __post_init__(self):
        super().__post_init__()  # hidden_act, KV heads and head_dim defaults
        q = self.quantization_config
        if not isinstance(q, dict) or q.get("quant_method") != "bitnet":
            found = q.get("quant_method") if isinstance(q, dict) else q
            raise _error(f"expected a quantization_config with quant_method 'bitnet' (packed ternary projections), "
                         f"got {found!r}: a bitnet checkpoint without it holds float projections, which this "
                         "converter does not load")
        check_entries(q, QUANTIZATION_ENTRIES, "config.json: field 'quantization_config'")
        if self.linear_class not in LINEAR_CLASSES:
            raise _error(f"unsupported quantization_config linear_class {self.linear_class!r}; "
                         f"supported: {', '.join(LINEAR_CLASSES)}")
        if self.quantization_mode not in QUANTIZATION_MODES:
            raise _error(f"unsupported quantization_config quantization_mode {self.quantization_mode!r}; "
                         f"supported: {', '.join(QUANTIZATION_MODES)}")
        kept = [m for m in q.get("modules_to_not_convert") or [] if not str(m).startswith("lm_head")]
        if kept:
            raise _error(f"modules_to_not_convert keeps {kept} in float; this converter makes every decoder "
                         "projection ternary and supports only lm_head there")

    @property
    def linear_class(self) -> str:
        return self.quantization_config.get("linear_class", "bitlinear")

    @property
    def quantization_mode(self) -> str:
        return self.quantization_config.get("quantization_mode", "offline")

    @property
    def online(self) -> bool:
        """Latent float weights ternarized at load: autobitlinear online. transformers' BitLinear
        ignores ``quantization_mode`` (its weights are always packed), and so does this converter."""
        return self.linear_class == "autobitlinear" and self.quantization_mode == "online"

    @property
    def scale_convention(self) -> str:
        """``"multiply"`` for offline AutoBitLinear (:math:`\\sigma = \\mathrm{mean}|W|`), else ``"divide"``."""
        return "multiply" if self.linear_class == "autobitlinear" and not self.online else "divide"

    def ternary(self, in_features: int, out_features: int, bias: bool, cls=TernaryLinear, **kwargs) -> TernaryLinear:
        """One projection as the checkpoint's ternary layer (zero weights until loaded)."""
        q = self.quantization_config
        return cls(in_features, out_features, bias=bias, norm=bool(q.get("use_rms_norm", False)),
                   norm_eps=float(q.get("rms_norm_eps") or 1e-6), activation="int8",
                   scale_convention=self.scale_convention, **kwargs)


def build(args: ModelArgs) -> Transformer:
    """An mlx_zeta ``Transformer`` with the checkpoint's shapes and ternary projections (zero weights)."""
    inv_freq, interpolation = llama.rope_inv_freq(args.head_dim, args.rope)
    dim, inner, bias = args.hidden_size, args.intermediate_size, args.attention_bias
    layers = Decoder(
        dim=dim, depth=args.num_hidden_layers, heads=args.num_attention_heads,
        attn_dim_head=args.head_dim, attn_kv_heads=args.num_key_value_heads,
        ff_glu=True, ff_relu_squared=True, ff_inner_dim=inner, ff_no_bias=True,
        rotary_pos_emb=True, rotary_emb_dim=args.head_dim, rotary_base=float(args.rope["rope_theta"]),
        rotary_inv_freq=inv_freq, rotary_interpolation_factor=interpolation,
        norm=lambda d: nn.RMSNorm(d, eps=args.rms_norm_eps), sliding_window=args.window,
    )
    q_out, kv_out = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    for layer in layers.layers:  # the float Linear layers built above are never evaluated
        attn, ff = layer.attn, layer.ff
        attn.to_q = args.ternary(dim, q_out, bias)
        attn.to_k = args.ternary(dim, kv_out, bias)
        attn.to_v = args.ternary(dim, kv_out, bias)
        attn.to_out = args.ternary(q_out, dim, bias, cls=SubNormTernaryLinear, sub_norm_eps=args.rms_norm_eps)
        ff.proj_in = StackedProjection(up=args.ternary(dim, inner, False), gate=args.ternary(dim, inner, False))
        ff.proj_out = args.ternary(inner, dim, False, cls=SubNormTernaryLinear, sub_norm_eps=args.rms_norm_eps)
    return Transformer(num_tokens=args.vocab_size, max_seq_len=args.max_position_embeddings, attn_layers=layers,
                       tie_embedding=args.tie_word_embeddings, use_abs_pos_emb=False)


# Renamed before llama's rules, which then map q/k/v/o/down, norms, embeddings and the head.
# (Hugging Face prefix, ours), both ways (base.rename_rules); {i}: a layer index, {g}: up/gate.
NAMES = [
    ("model.layers.{i}.self_attn.attn_sub_norm.", "attn_layers.layers.{i}.attn.to_out.sub_norm."),
    ("model.layers.{i}.mlp.ffn_sub_norm.", "attn_layers.layers.{i}.ff.proj_out.sub_norm."),
    ("model.layers.{i}.mlp.{g}_proj.", "attn_layers.layers.{i}.ff.proj_in.{g}."),
]
_RENAMES, _HF_RENAMES = rename_rules(NAMES, {"i": r"\d+", "g": "up|gate"})
# A ternary layer's own entries, Hugging Face -> ours (the weight's layout changes only when online).
_LEAVES = {"weight": "packed", "weight_scale": "weight_scale", "rms_norm.weight": "norm.weight"}
_TERNARY = re.compile(r"^(attn_layers\.layers\.\d+\.(?:attn\.to_(?:q|k|v|out)|ff\.proj_in\.(?:up|gate)|ff\.proj_out))"
                      r"\.(.+)$")


def _packed(label: str, w: mx.array, args: ModelArgs) -> Dict[str, mx.array]:
    """A checkpoint ``weight`` as ``{"packed": uint8}`` (plus ``weight_scale`` when online)."""
    floating = mx.issubdtype(w.dtype, mx.floating)
    if args.online:  # AutoBitLinear's WeightQuant: T = clip(round(W s_w), -1, 1), W ~ T / s_w
        if not floating:
            raise _error(f"{label}: quantization_mode 'online' holds float latent weights, got {w.dtype}")
        q, s_w = ternarize(w)
        return {"packed": pack_2bit(q), "weight_scale": s_w}
    if w.dtype == mx.uint8:
        if mx.any((w >> 1) & w & 0b01010101).item():  # a 2-bit code 3 packs no ternary value
            raise _error(f"{label}: packed uint8 weight holds the 2-bit code 3, which is not a ternary weight")
        return {"packed": w}
    if args.linear_class == "bitlinear" or not floating:
        also = " (or float -1/0/1 values)" if args.linear_class == "autobitlinear" else ""
        raise _error(f"{label}: linear_class {args.linear_class!r} holds packed uint8 weights{also}, got {w.dtype}")
    if not mx.all((w == 0) | (w == 1) | (w == -1)).item():
        raise _error(f"{label}: an offline autobitlinear float weight must hold only -1, 0, 1 "
                     "(the ternary values; the scale is weight_scale); found other values")
    return {"packed": pack_2bit(w.astype(mx.int8))}


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Hugging Face BitNet names and layouts to the ``Transformer``'s (module docstring).

    Packed uint8 weights pass through untouched (renamed ``packed``); ``weight_scale`` (1,)
    becomes a float32 scalar; float weights are packed as the ``quantization_config`` says.
    Pure and idempotent (mlx_zeta names, e.g. from ``save_pretrained``, pass through).
    """
    renamed = llama.sanitize({rename(k, _RENAMES): v for k, v in weights.items()}, args)
    source = {rename(rename(k, _RENAMES), llama.RENAMES): k for k in weights}  # for error messages
    out: Dict[str, mx.array] = {}
    for name, value in renamed.items():
        m = _TERNARY.match(name)
        leaf = m.group(2) if m else None
        if leaf == "rms_norm.weight":
            out[f"{m.group(1)}.{_LEAVES[leaf]}"] = value
        elif leaf == "weight":
            label = name if source.get(name, name) == name else f"{name} (checkpoint {source[name]})"
            found = _packed(label, value, args)
            if "weight_scale" in found and f"{m.group(1)}.weight_scale" in renamed:
                raise _error(f"{label}: quantization_mode 'online' computes weight_scale from the float weight, "
                             "but the checkpoint holds one too")
            out.update({f"{m.group(1)}.{k}": v for k, v in found.items()})
        elif leaf == "weight_scale" and value.size == 1 and (value.ndim or value.dtype != mx.float32):
            out[name] = value.reshape(()).astype(mx.float32)  # other sizes: check_keys names the mismatch
        else:
            out[name] = value
    return out


def to_hf(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """The inverse of :func:`sanitize`: the packed uint8 ``packed`` back as ``weight`` (the 2-bit layout
    is transformers' own), ``weight_scale`` as shape (1,) float32, ``norm`` as ``rms_norm``; other names
    as :func:`.llama.to_hf`. Pure; ``sanitize(to_hf(w, args), hf_args) == w`` with ``hf_args`` the
    :func:`hf_config`'s (an online checkpoint is written as the offline bitlinear one it computes)."""
    hf_leaf = {ours: theirs for theirs, ours in _LEAVES.items()}
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        m = _TERNARY.match(name)
        if m and m.group(2) in hf_leaf:
            name = f"{m.group(1)}.{hf_leaf[m.group(2)]}"
            value = value.reshape(1) if m.group(2) == "weight_scale" else value
        out[rename(name, _HF_RENAMES)] = value
    return llama.to_hf(out, args)


def hf_config(config: Dict[str, Any], args: ModelArgs) -> Dict[str, Any]:
    """``config.json`` for :func:`to_hf`'s weights: ``BitNetForCausalLM``; an online ``autobitlinear``
    config becomes ``bitlinear`` (packed weights, "divide" scales: the same math, weights ternarized once)."""
    quantization = dict(config["quantization_config"])
    if args.online:
        quantization.update(linear_class="bitlinear", quantization_mode="offline")
    return {**config, "architectures": ["BitNetForCausalLM"], "quantization_config": quantization}
