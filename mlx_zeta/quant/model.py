"""Whole-model ternary conversion: swap a float model's ``nn.Linear`` layers for
:class:`~mlx_zeta.quant.BitLinear` (quantization-aware training), then freeze the trained
``BitLinear`` layers into packed :class:`~mlx_zeta.quant.TernaryLinear` layers for inference."""

from typing import Any, Callable, List, Optional, Tuple

import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_zeta.common import check_choice
from mlx_zeta.quant.affine import affine_quantize
from mlx_zeta.quant.bitlinear import BitLinear

__all__ = ["quantize_model", "freeze_model", "default_predicate", "HEAD_NAMES", "TIED_EMBEDDING_NAMES"]

HEAD_NAMES = ("to_logits", "lm_head")  # output projections kept in float by default
TIED_EMBEDDING_NAMES = ("token_emb", "embed_tokens", "wte")  # input embeddings that double as the head
HEAD_BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)  # the group sizes of MLX's affine quantization
_BITLINEAR_KWARGS = ("norm_eps", "quant_eps")

Predicate = Callable[[str, nn.Module], bool]


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _is_head(path: str) -> bool:
    return _last(path) in HEAD_NAMES


def default_predicate(path: str, module: nn.Module) -> bool:
    """Quantize every ``nn.Linear`` except the LM head (path ending in ``to_logits`` or ``lm_head``);
    embeddings are never ``nn.Linear`` and so stay float."""
    return isinstance(module, nn.Linear) and not _is_head(path)


def _swap(model: nn.Module, swaps: List[Tuple[str, nn.Module]]) -> None:
    """Replace the modules at the dotted paths (lists included) in place."""
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def quantize_model(model: nn.Module, predicate: Optional[Predicate] = None, norm: bool = True,
                   **bitlinear_kwargs: Any) -> nn.Module:
    r"""Swap a model's ``nn.Linear`` layers for :class:`~mlx_zeta.quant.BitLinear`, in place, for
    quantization-aware training (BitNet b1.58).

    Each selected ``y = x W^T + b`` becomes, with the same :math:`W` and :math:`b` as its starting point,

    .. math::

        y = \frac{Q_x}{s_x} \Big(\frac{Q_W}{s_w}\Big)^{\!T} + b, \qquad
        Q_W = \operatorname{clip}(\operatorname{round}(W s_w), -1, 1),\ s_w = 1/\operatorname{mean}|W|,

    with int8 per-token activations :math:`Q_x` of the (optionally RMS-normalised) input and
    straight-through gradients, so training keeps updating the float latent weights :math:`W`.

    Only ``nn.Linear`` layers are candidates (``nn.Embedding``, norms, already quantized layers are
    never touched, so a second call changes nothing). ``predicate(path, linear)`` picks among
    them; the default keeps the LM head in float (paths ending in ``to_logits`` or ``lm_head``),
    as BitNet does. The new layers inherit the old ones' dtype and train/eval mode.

    The input RMSNorm divides each token by its RMS, so a layer fed raw features whose scale carries
    information (the first layer of an MLP on coordinates, say) loses it: exclude that layer with
    ``predicate`` or pass ``norm=False``. Inside a Transformer the residual stream keeps the scale.

    Args:
        model (nn.Module): the float model, modified in place.
        predicate (callable, optional): ``(path, module) -> bool``, e.g.
            ``lambda p, m: ".ff." in p``. Default: every ``nn.Linear`` but the head.
        norm (bool): give each BitLinear its input RMSNorm (BitNet's SubLN). Default: ``True``.
        **bitlinear_kwargs: ``norm_eps``, ``quant_eps`` for :class:`~mlx_zeta.quant.BitLinear`.

    Returns:
        nn.Module: ``model`` itself.

    Example:
        >>> from mlx_zeta.quant import quantize_model
        >>> from mlx_zeta.structs import Transformer, Decoder
        >>> model = Transformer(num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=64, depth=2, heads=4))
        >>> model = quantize_model(model)  # attention and feed-forward projections are BitLinear
        >>> type(model.to_logits).__name__
        'Linear'

    Reference: Ma et al., "The Era of 1-bit LLMs", https://arxiv.org/abs/2402.17764.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"[quantize_model] expected model to be an mlx.nn.Module, got {type(model).__name__}")
    if predicate is not None and not callable(predicate):
        raise ValueError(f"[quantize_model] expected predicate to be callable (path, module) -> bool, "
                         f"got {type(predicate).__name__}")
    if not isinstance(norm, bool):
        raise ValueError(f"[quantize_model] expected norm to be a bool, got {norm!r}")
    unknown = sorted(set(bitlinear_kwargs) - set(_BITLINEAR_KWARGS))
    if unknown:
        raise ValueError(f"[quantize_model] unknown keyword argument(s): {', '.join(unknown)}; "
                         f"accepted: predicate, norm, {', '.join(_BITLINEAR_KWARGS)}")
    predicate = predicate or default_predicate
    swaps = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):  # BitLinear, QuantizedLinear, Embedding are not nn.Linear
            continue
        if path == "":
            raise ValueError("[quantize_model] expected a model containing nn.Linear layers, got an nn.Linear itself "
                             "(use BitLinear.from_linear)")
        if predicate(path, module):
            layer = BitLinear.from_linear(module, norm=norm, **bitlinear_kwargs)
            layer.train(module.training)
            swaps.append((path, layer))
    _swap(model, swaps)
    return model


def _head_predicate(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The float head to quantize: Linear layers named like a head, else a tied input embedding."""
    modules = model.named_modules()
    heads = [p for p, m in modules if type(m) is nn.Linear and _is_head(p)]
    if heads:
        names = set(heads)
        return lambda p, m: p in names and type(m) is nn.Linear
    tied = [p for p, m in modules if type(m) is nn.Embedding and _last(p) in TIED_EMBEDDING_NAMES]
    if tied:
        names = set(tied)
        return lambda p, m: p in names and type(m) is nn.Embedding
    raise ValueError(f"[freeze_model] head_bits was given but the model has no float head: no nn.Linear named "
                     f"{' or '.join(HEAD_NAMES)} and no nn.Embedding named {' or '.join(TIED_EMBEDDING_NAMES)}")


def freeze_model(model: nn.Module, activation: str = "int8", head_bits: Optional[int] = None,
                 group_size: int = 64) -> nn.Module:
    r"""Swap every :class:`~mlx_zeta.quant.BitLinear` for its packed
    :class:`~mlx_zeta.quant.TernaryLinear`, in place, for inference.

    Each layer keeps its ternary weights :math:`Q_W \in \{-1, 0, 1\}^{\text{out} \times \text{in}}`
    packed at 2 bits per weight and its scale :math:`s_w`, so the weights shrink 16x from float32
    (8x from bfloat16). With ``activation="int8"`` the frozen layer computes
    :math:`y = (Q_x Q_W^T) / (s_x s_w) + b` with an exact integer accumulation, which is the
    training forward of BitLinear; ``"float"`` keeps the activations in float (W1.58A16).

    With ``head_bits`` the remaining float head is quantized too, with MLX's affine
    quantization (``nn.quantize``: ``head_bits`` bits, one scale and bias per ``group_size``
    input weights; a Linear becomes :class:`~mlx_zeta.quant.affine.AffineLinear`): the ``nn.Linear`` named ``to_logits``/``lm_head`` or, when the head is tied
    to it, the ``nn.Embedding`` named ``token_emb`` (``embed_tokens``, ``wte``), which becomes a
    ``QuantizedEmbedding`` serving both lookups and ``as_linear``. Other float layers are left alone.

    Args:
        model (nn.Module): a model with BitLinear layers (e.g. after :func:`quantize_model` and
            training), modified in place.
        activation (str): ``"int8"`` or ``"float"``. Default: ``"int8"``.
        head_bits (int, optional): 2, 3, 4, 6 or 8 bits for the head. Default: ``None`` (float head).
        group_size (int): 32, 64 or 128; must divide the head's input width. Default: ``64``.

    Returns:
        nn.Module: ``model`` itself.

    Example:
        >>> from mlx_zeta.quant import quantize_model, freeze_model
        >>> from mlx_zeta.structs import Transformer, Decoder
        >>> model = quantize_model(Transformer(64, 32, attn_layers=Decoder(dim=64, depth=2, heads=4)))
        >>> # ... train ...
        >>> model = freeze_model(model, head_bits=4)
        >>> type(model.to_logits).__name__  # an mlx.nn.QuantizedLinear
        'AffineLinear'

    Reference: Ma et al., "The Era of 1-bit LLMs", https://arxiv.org/abs/2402.17764; Wang et al.,
    "BitNet b1.58 2B4T Technical Report", https://arxiv.org/abs/2504.12285.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"[freeze_model] expected model to be an mlx.nn.Module, got {type(model).__name__}")
    check_choice("freeze_model", "activation", activation, ("int8", "float"),
                 says="expected activation 'int8' or 'float'")
    check_choice("freeze_model", "head_bits", head_bits, HEAD_BITS, optional=True)
    check_choice("freeze_model", "group_size", group_size, GROUP_SIZES)
    if isinstance(model, BitLinear):
        raise ValueError("[freeze_model] expected a model containing BitLinear layers, got a BitLinear itself "
                         "(use BitLinear.to_ternary)")
    from mlx_zeta.quant.ternary import TernaryLinear

    swaps = []
    for path, module in model.named_modules():
        if isinstance(module, BitLinear):
            layer = TernaryLinear.from_bitlinear(module, activation=activation)
            layer.train(module.training)
            swaps.append((path, layer))
    _swap(model, swaps)

    if head_bits is not None:
        is_head = _head_predicate(model)
        for path, module in model.named_modules():
            if is_head(path, module):
                width = module.weight.shape[-1]
                if width % group_size:
                    raise ValueError(f"[freeze_model] expected the head {path!r} input width to be divisible by "
                                     f"group_size={group_size}, got width {width}")
        affine_quantize(model, group_size, head_bits, is_head)  # what from_pretrained rebuilds
    return model
