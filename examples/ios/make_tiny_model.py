"""A tiny checkpoint for the Swift sample, and the token ids MLX's greedy ``generate`` makes with it.

    python examples/ios/make_tiny_model.py OUT_DIR [--prompt TEXT] [--max-tokens N] [--seed S]

writes

* ``OUT_DIR/model/``: a Hugging Face folder: a random ``transformers`` LlamaForCausalLM (hidden 32,
  2 layers, GQA 4/2 heads; every parameter scaled so its next-token distributions are peaked and
  greedy choices sit far from ties, so an fp16 Core ML run picks the same tokens as MLX's float32)
  and a byte-level BPE tokenizer trained here with the ``tokenizers`` library (GPT-2's byte map and
  split regex, ``<|endoftext|>`` as bos/eos): tokenizer.json, tokenizer_config.json,
  generation_config.json. Nothing is downloaded.
* ``OUT_DIR/expected.json``: ``{"prompt": TEXT, "prompt_ids": [...], "ids": [...], "text": ...,
  "eos_token_ids": [...], "max_tokens": N, "gaps": [...]}``: the prompt's ids (the tokenizer, no special tokens
  added) and the tokens ``mlx_zeta.stream_generate`` draws greedily after them (an end token, when
  drawn, is the last id and is left out of ``text``), the reference the Swift sample is compared with;
  ``gaps``: MLX's top-1 minus top-2 logit at each generated step (:func:`top2_gaps`).

The macOS workflow (``.github/workflows/ios-sample.yml``) then exports ``OUT_DIR/model`` with
``mlx-zeta export-coreml ... --copy-tokenizer`` and runs ``mlx-zeta-coreml-run`` on the same prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import List

EOS = "<|endoftext|>"
# A prompt that tokenizes to more than the largest prefill length the workflow exports (16), so the
# Swift sample runs two prefill calls (prefill_16, then a padded prefill_8) before decoding.
PROMPT = "The quick brown fox jumps over the lazy dog while a small model learns to speak: café, 你好 🚀!"
_WORDS = ("the quick brown fox jumps over the lazy dog while a small model learns to speak hello world "
          "café crème brûlée naïve Größe straße 你好 世界 🚀 👋 numbers 42 1999 3.14 , . ! ? ' \" ( )").split()


def corpus(lines: int = 300, seed: int = 0) -> List[str]:
    """Pseudo-sentences over a small mixed-script word list, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines)]


def train_tokenizer(folder: Path, vocab_size: int = 600) -> int:
    """Train a byte-level BPE on :func:`corpus`, save tokenizer.json and tokenizer_config.json in
    ``folder``; the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
              "model_max_length": 128, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return tok.get_vocab_size()


def save_llama(folder: Path, vocab: int, eos: int, seed: int) -> None:
    """A random LlamaForCausalLM over ``vocab`` ids, parameters scaled by 8, saved (float32) in ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(str(folder))
    generation = {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def expected_ids(folder: Path, prompt: str, max_tokens: int) -> dict:
    """The prompt's ids and MLX's greedy continuation of them (see the module docstring)."""
    import mlx_zeta

    model, tokenizer = mlx_zeta.load(str(folder))
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = [r.token for r in mlx_zeta.stream_generate(model, tokenizer, prompt_ids, max_tokens, temperature=0.0)]
    eos = sorted(set(tokenizer.eos_token_ids))
    text = tokenizer.decode([t for t in ids if t not in eos])
    return {"prompt": prompt, "prompt_ids": prompt_ids, "ids": ids, "text": text, "eos_token_ids": eos,
            "max_tokens": max_tokens, "gaps": top2_gaps(model, prompt_ids, ids)}


def top2_gaps(model, prompt_ids: List[int], ids: List[int]) -> List[float]:
    """For each generated token, MLX's top-1 minus top-2 logit at that step (one forward pass over
    prompt + ids): how far each greedy choice is from a tie. A runtime whose logits differ by less
    than a gap (fp16 rounding) picks the same token there."""
    import mlx.core as mx

    logits = model(mx.array([prompt_ids + ids])).astype(mx.float32)[0, len(prompt_ids) - 1:-1]  # (len(ids), vocab)
    top2 = mx.topk(logits, 2, axis=-1)
    return [round(float(g), 4) for g in (top2.max(axis=-1) - top2.min(axis=-1)).tolist()]


def make(out: Path, prompt: str = PROMPT, max_tokens: int = 24, seed: int = 4) -> dict:
    """Write ``out/model`` and ``out/expected.json`` (module docstring); returns the expected record."""
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(model_dir)
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(EOS)
    save_llama(model_dir, vocab, eos, seed)
    record = expected_ids(model_dir, prompt, max_tokens)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".expected-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, out / "expected.json")  # atomically: no half-written reference is ever read
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (model/ and expected.json are written in it)")
    p.add_argument("--prompt", default=PROMPT, help="prompt text (default: a sentence of ~25 tokens)")
    p.add_argument("--max-tokens", type=int, default=24, help="most tokens to generate (default: 24)")
    p.add_argument("--seed", type=int, default=4, help="seed of the random weights (default: 4)")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"expected --max-tokens >= 1, got {args.max_tokens}")
    record = make(args.out, args.prompt, args.max_tokens, args.seed)
    print(f"prompt ids ({len(record['prompt_ids'])}): {','.join(map(str, record['prompt_ids']))}")
    print(f"ids: {','.join(map(str, record['ids']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
