"""Tiny text-generation checkpoints made in the tests: random ``transformers`` weights (seeded,
float32, safetensors) beside a real tokenizer trained here, offline, with the ``tokenizers`` library
on a small multilingual corpus (English, accented French and German, CJK, emoji).

Each ``make_*(folder)`` writes one complete Hugging Face folder and returns it:

========  ===========================================  ===================================
model     tokenizer                                    chat template
========  ===========================================  ===================================
llama     SentencePiece-style BPE: Metaspace, byte      ``[INST]`` turns, in
          fallback ``<0xNN>``, bos ``<s>`` added        tokenizer_config.json
qwen3     byte-level BPE, NFC, Qwen's split regex,      ChatML (``<|im_start|>``), in
          ``<|im_end|>`` / ``<|endoftext|>``            chat_template.jinja; eos a LIST
gpt2      byte-level BPE (GPT-2's)                      ``role: content`` lines, in
                                                        tokenizer_config.json
t5        Unigram with Metaspace (pad, eos, unk)        none (seq2seq)
========  ===========================================  ===================================

Each tokenizer is trained with the ``tokenizers`` trainers and handed, as vocabulary (and merges),
to the very ``transformers`` tokenizer class a real checkpoint names, whose ``save_pretrained``
writes tokenizer.json and tokenizer_config.json as transformers 5 does; so the file a loader reads
and the tokenizer transformers rebuilds from it agree by construction. Each folder builds in well
under a second. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

# ----------------------------------------------------------------------------------- the corpus
_EN = ("the quick brown fox jumps over the lazy dog while a small model learns to speak "
       "hello world this is a test of streaming text with many words and numbers 42 and 1999").split()
_FR = "le café est très bon à côté de la forêt où l'élève a déjà mangé une crème brûlée française".split()
_DE = "die Größe der Straße über dem Fluss ist schön und das Mädchen hört Musik für ältere Bäume".split()
_CJK = ["你好", "世界", "我们", "学习", "语言", "模型", "東京", "こんにちは", "ありがとう", "日本語", "안녕하세요", "한국어"]
_EMOJI = ["😀", "🚀", "👍🏽", "❤️", "🇫🇷", "🎉", "🤖", "👨‍👩‍👧"]
_PUNCT = [".", ",", "!", "?", ":", ";", " -", "…", "«", "»", "\"", "(", ")"]


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """``lines`` pseudo-sentences mixing the five scripts, deterministic in ``seed``."""
    rng = random.Random(seed)
    pools = [_EN, _EN, _FR, _DE, _CJK, _EMOJI]
    out = []
    for _ in range(lines):
        words = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.5:
            words.append(rng.choice(_PUNCT))
        line = " ".join(words)
        out.append(line[0].upper() + line[1:] if rng.random() < 0.3 else line)
    return out


# Sentences the tests encode, decode and stream: every script, spaces in odd places, marks
# the tokenizers never saw in training (byte fallback / unknown paths).
SAMPLES = [
    "Hello world",
    " leading space and  double  spaces ",
    "Le café est très bon à côté de la forêt.",
    "Die Größe der Straße über dem Fluss ist schön!",
    "你好，世界！我们学习语言模型。",
    "東京でこんにちは、ありがとう",
    "안녕하세요 한국어",
    "Rockets 🚀 and thumbs 👍🏽 and a family 👨‍👩‍👧 ❤️",
    "Flags 🇫🇷🇩🇪 mixed with café and 你好 🎉",
    "Numbers 42, 1999 and 3.14159; punctuation… «quotes» (parens) \"double\"",
    "line one\nline two\n\ttabbed",
    "Ωμέγα αλφα βήτα — Greek the corpus never saw",
    "Ж Кириллица тоже",
    "e\u0301 combining accent vs é",
    "🤖🤖🤖",
    "a",
    "",
]

CHATS = [
    [{"role": "user", "content": "Hello 👋 how are you?"}],
    [{"role": "system", "content": "You are a terse bot."}, {"role": "user", "content": "Dis-moi où est la forêt."}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！🎉"},
     {"role": "user", "content": "Die Größe?"}],
    [{"role": "system", "content": "Sei kurz."}, {"role": "user", "content": "one"},
     {"role": "assistant", "content": "two"}, {"role": "user", "content": "three 🚀"}],
]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GPT2_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# ------------------------------------------------------------------------------- the tokenizers
def _bpe_vocab(pre_tokenizer, vocab_size: int, special: list[str], **trainer) -> tuple[dict, list]:
    """Train a BPE on the corpus behind ``pre_tokenizer``; its (vocab, merges)."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                          show_progress=False, **trainer))
    state = json.loads(tok.to_str())["model"]
    return state["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]


# The characters Llama's vocabulary spells directly (no capital H, no Greek, few CJK, no emoji):
# everything else falls back to <0xNN> bytes. A fixed list keeps the trained vocabulary the same
# from run to run (the trainer breaks ties between equally rare characters arbitrarily).
LLAMA_ALPHABET = "▁abcdefghijklmnopqrstuvwxyzDLT0123456789.,!?'-éèàâçôöüäßÜ你好世界我们"


def llama_tokenizer():
    """Llama-2's shape: ids 0-2 ``<unk> <s> </s>``, the 256 byte tokens ``<0x00>..<0xFF>``, then
    ~200 pieces with the ``▁`` space marker; characters outside the vocab fall back to bytes."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    special = ["<unk>", "<s>", "</s>"]
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learned, merges = _bpe_vocab(pre, 230, special, initial_alphabet=list(LLAMA_ALPHABET),
                                 limit_alphabet=len(LLAMA_ALPHABET))
    vocab = {t: i for i, t in enumerate(special + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned, key=learned.get):
        vocab.setdefault(piece, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges, chat_template=LLAMA_TEMPLATE, pad_token="<unk>",
                          add_bos_token=True, add_eos_token=False)


def qwen3_tokenizer():
    """Qwen2/3's shape: byte-level BPE behind Qwen's split regex, ``<|endoftext|>`` then
    ``<|im_start|>``, ``<|im_end|>`` as special tokens after the learned pieces."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _bpe_vocab(pre, 420, [], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=CHATML_TEMPLATE,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def gpt2_tokenizer():
    """GPT-2's shape: byte-level BPE (all 256 byte symbols first), ``<|endoftext|>`` last, which
    is bos, eos and unk; no bos added."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab, merges = _bpe_vocab(pre_tokenizers.ByteLevel(add_prefix_space=False), 400, [],
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=merges, chat_template=GPT2_TEMPLATE)


def t5_tokenizer():
    """T5's shape: a Unigram model with ids 0-2 ``<pad> </s> <unk>``, Metaspace (``▁``) words,
    two ``<extra_id_N>`` sentinels at the end; ``</s>`` appended to every encoding. The pieces are
    the UnigramTrainer's; their scores the log-frequency of each piece in the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(prepend_scheme="always")])
    special = ["<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=300, special_tokens=special,
                                                              unk_token="<unk>", show_progress=False))
    learned = [p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in special]
    text = "".join("▁" + line.replace(" ", "▁") for line in corpus())
    count = {p: max(text.count(p), 1) for p in learned}  # the EM's own scores vary from run to run
    total = sum(count.values())
    pieces = [(p, 0.0) for p in special] + sorted(((p, math.log(c / total)) for p, c in count.items()),
                                                  key=lambda ps: (-ps[1], ps[0]))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in (1, 0)]
    return T5Tokenizer(vocab=pieces, extra_ids=2)


# ----------------------------------------------------------------------------------- the models
def _lift(model, factor: float = 4.0) -> None:
    """Spread the random logits (std-0.02 init gives near-ties, so greedy argmax would hinge on
    rounding): every matrix times ``factor``, norm weights get N(0, 0.1^2) noise."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(factor)


def _save(model, tok, folder: Path, generation: dict, template_in_config: bool) -> Path:
    """Weights, tokenizer files and generation_config.json into ``folder``. transformers 5 writes
    the chat template to chat_template.jinja; ``template_in_config`` moves it back into
    tokenizer_config.json, where older checkpoints keep it."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    jinja = folder / "chat_template.jinja"
    if template_in_config and jinja.exists():
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = jinja.read_text()
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        jinja.unlink()
    return folder


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def save_peaked_llama(folder: Path, vocab: int, layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM (hidden 32, GQA 4/2 heads, ``vocab`` ids), every parameter times 8
    (peaked distributions, so greedy choices are far from ties), saved to ``folder`` (no tokenizer)
    and returned."""
    import torch
    import transformers

    _seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(str(folder))
    return model


def make_llama(folder: Path, seed: int = 0) -> Path:
    """Tiny LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads) with :func:`llama_tokenizer`."""
    import transformers

    tok = llama_tokenizer()
    _seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    _lift(model)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False}
    return _save(model, tok, folder, gen, template_in_config=True)


def make_qwen3(folder: Path, seed: int = 0) -> Path:
    """Tiny Qwen3ForCausalLM (hidden 64, 2 layers, head_dim 16, tied) with :func:`qwen3_tokenizer`;
    generation_config.json lists two eos ids, ``<|im_end|>`` and ``<|endoftext|>``."""
    import transformers

    tok = qwen3_tokenizer()
    _seed(seed)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    config = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                                      bos_token_id=None, eos_token_id=eos[0], pad_token_id=eos[1])
    model = transformers.Qwen3ForCausalLM(config).eval()
    _lift(model)
    gen = {"eos_token_id": eos, "pad_token_id": eos[1], "do_sample": False}
    return _save(model, tok, folder, gen, template_in_config=False)


def make_gpt2(folder: Path, seed: int = 0) -> Path:
    """Tiny GPT2LMHeadModel (n_embd 64, 2 layers, 4 heads) with :func:`gpt2_tokenizer`."""
    import transformers

    tok = gpt2_tokenizer()
    _seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.GPT2LMHeadModel(config).eval()
    _lift(model, 3.0)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return _save(model, tok, folder, gen, template_in_config=True)


def make_t5(folder: Path, seed: int = 0) -> Path:
    """Tiny T5ForConditionalGeneration (d_model 64, 2+2 layers, tied, relu) with :func:`t5_tokenizer`;
    the decoder starts from ``<pad>`` (id 0) and stops at ``</s>`` (id 1)."""
    import transformers

    tok = t5_tokenizer()
    _seed(seed)
    config = transformers.T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   feed_forward_proj="relu", decoder_start_token_id=tok.pad_token_id,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.T5ForConditionalGeneration(config).eval()
    _lift(model, 2.0)
    gen = {"decoder_start_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return _save(model, tok, folder, gen, template_in_config=False)


MAKERS = {"llama": make_llama, "qwen3": make_qwen3, "gpt2": make_gpt2, "t5": make_t5}
CAUSAL = ("llama", "qwen3", "gpt2")
