"""Tiny decoder-only language models built from our blocks (random weights, float32) and the
reference decoding the lm tests compare against: greedy full recomputation without any cache."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_zeta.structs import Decoder, Transformer

VOCAB = 97
# rotary with grouped key/value heads (a Llama shape), and learned absolute positions (a GPT-2 shape)
SHAPES = {
    "rotary": dict(position="rotary", attn_kv_heads=2),
    "absolute": dict(),
}


def tiny_lm(shape: str = "rotary", sliding_window: Optional[int] = None, seed: int = 0, depth: int = 2,
            vocab: int = VOCAB, dtype=mx.float32) -> Transformer:
    """A 2-layer Transformer (dim 32, 4 heads) with weights scaled up 3x so the greedy choice is
    decided by clear margins and every layer matters."""
    mx.random.seed(seed)
    model = Transformer(num_tokens=vocab, max_seq_len=96,
                        attn_layers=Decoder(dim=32, depth=depth, heads=4, sliding_window=sliding_window,
                                            **SHAPES[shape]))
    model.update(tree_map(lambda p: (3 * p).astype(dtype), model.parameters()))
    model.eval()
    mx.eval(model.parameters())
    return model


def same_weights(src: Transformer, dst: Transformer) -> Transformer:
    """``dst`` with the parameters of ``src`` (the same names and shapes)."""
    dst.update(src.parameters())
    assert [k for k, _ in tree_flatten(src.parameters())] == [k for k, _ in tree_flatten(dst.parameters())]
    return dst


def log_softmax(logits: mx.array) -> mx.array:
    wide = logits.astype(mx.float32)
    return wide - mx.logsumexp(wide, axis=-1, keepdims=True)


def greedy_reference(model: Transformer, prompt: Sequence[int], steps: int) -> Tuple[List[int], List[float]]:
    """Greedy tokens and their log-probabilities, each step a full forward pass over the whole
    sequence so far, with no cache at all."""
    ids, toks, lps = list(prompt), [], []
    for _ in range(steps):
        lp = log_softmax(model(mx.array([ids]))[0, -1])
        tok = int(mx.argmax(lp).item())
        toks.append(tok)
        lps.append(float(lp[tok].item()))
        ids.append(tok)
    return toks, lps


def greedy_cached(model: Transformer, caches: list, suffix: Sequence[int], steps: int) -> Tuple[List[int], List[float]]:
    """Greedy tokens and log-probabilities continuing ``caches`` (already holding a prefix) with
    ``suffix`` (at least one token) then one token per step."""
    logits = model(mx.array([list(suffix)]), cache=caches)[0, -1]
    toks, lps = [], []
    for _ in range(steps):
        lp = log_softmax(logits)
        tok = int(mx.argmax(lp).item())
        toks.append(tok)
        lps.append(float(lp[tok].item()))
        logits = model(mx.array([[tok]]), cache=caches)[0, -1]
    return toks, lps


CORPUS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat and looked at the fox",
          "héllo wörld, ça va? 世界 你好", "numbers 0123456789 and symbols !?.,;:", "the end of the story"] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE of about 300 tokens trained here on a few lines (end token ``<|end|>``),
    with a small chat template, as a :class:`mlx_zeta.lm.Tokenizer`."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from mlx_zeta.lm import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, {"eos_token": "<|end|>"}, chat_template=CHAT_TEMPLATE)


# transformers configs of tiny causal LMs (random weights): learned absolute positions, rotary with
# qk-norm, a model with its own sliding window, and a Llama of Qwen3's shapes (another model_type)
_ATTN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=96)
HF = {"gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                                      eos_token_id=0)),
      "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _ATTN),
      "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(_ATTN, sliding_window=4)),
      "llama": ("LlamaConfig", "LlamaForCausalLM", _ATTN)}


def hf_checkpoint(case: str, folder, vocab: int):
    """A tiny transformers checkpoint of ``HF[case]`` saved to ``folder`` (init lifted so every
    weight matters) and loaded back through ``mlx_zeta.from_pretrained`` in float32."""
    import transformers
    from hf_tiny import lift_init, save_hf, seeded

    config_cls, model_cls, extra = HF[case]
    seeded(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=vocab, **extra)).eval()
    lift_init(hf, norm_markers=(".ln_", "norm"))
    return mlx_zeta.from_pretrained(save_hf(hf, folder), dtype="float32")
