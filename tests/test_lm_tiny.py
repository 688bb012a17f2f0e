"""The tiny text-generation checkpoints of lm_tiny.py are what they claim to be, so the tokenizer
and generation tests that use them compare against a faithful transformers reference:

- transformers loads every folder (tokenizer and model) with no missing or unexpected weight;
- the tokenizer.json a loader reads, run by the ``tokenizers`` library alone, encodes and decodes
  every sample exactly as transformers' tokenizer class (which rebuilds parts of it) does;
- each tokenizer has the traits it stands for (byte fallback, bos/eos added, special tokens, the
  chat template and where it is stored, a list of eos ids).
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lm_tiny  # noqa: E402
from lm_tiny import CAUSAL, MAKERS, SAMPLES  # noqa: E402


@pytest.mark.parametrize("name", list(MAKERS))
def test_transformers_loads_every_weight(tiny_lm, name, capfd):
    path = tiny_lm(name)
    capfd.readouterr()
    auto = transformers.AutoModelForSeq2SeqLM if name == "t5" else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(path, output_loading_info=True)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert not any(info.values()), info
    report = "".join(capfd.readouterr())  # transformers prints its load report, not to the root logger
    assert "MISSING" not in report and "UNEXPECTED" not in report and "newly initialized" not in report, report
    assert model.dtype.__str__() == "torch.float32"
    assert model.config.vocab_size == len(tok), "every model output is a token the tokenizer can decode"
    assert 200 <= len(tok) <= 500


@pytest.mark.parametrize("name", list(MAKERS))
def test_tokenizer_json_alone_equals_transformers(tiny_lm, name):
    path = tiny_lm(name)
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert raw.encode(text, add_special_tokens=special).ids == ids, (text, special)
            for skip in (True, False):
                assert raw.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_tokenizer_traits(tiny_lm):
    tok = {n: transformers.AutoTokenizer.from_pretrained(tiny_lm(n)) for n in MAKERS}
    # Llama: bos first; a letter the corpus never had falls back to its UTF-8 bytes (Ω = CE A9)
    ids = tok["llama"].encode("Ω")
    assert ids[0] == tok["llama"].bos_token_id == 1
    assert tok["llama"].convert_ids_to_tokens(ids[-2:]) == ["<0xCE>", "<0xA9>"]
    # Qwen3 and GPT-2: byte-level, nothing added; ChatML markers are single special tokens
    assert tok["gpt2"].encode("hi") == tok["gpt2"].encode("hi", add_special_tokens=False)
    assert len(tok["qwen3"].encode("<|im_start|>", add_special_tokens=False)) == 1
    # T5: </s> closes every encoding; no bos
    assert tok["t5"].encode("hello")[-1] == tok["t5"].eos_token_id == 1 and tok["t5"].bos_token_id is None
    # where each chat template lives; the list of eos ids
    assert (tiny_lm("qwen3") / "chat_template.jinja").exists()
    for name in ("llama", "gpt2"):
        assert "chat_template" in json.loads((tiny_lm(name) / "tokenizer_config.json").read_text())
    gen = json.loads((tiny_lm("qwen3") / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok["qwen3"].convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    for name in CAUSAL:
        assert tok[name].chat_template


def test_each_checkpoint_builds_fast(tmp_path):
    MAKERS["gpt2"](tmp_path / "warm")  # imports and first-call costs once
    for name, make in MAKERS.items():
        start = time.perf_counter()
        make(tmp_path / name)
        assert time.perf_counter() - start < 1.0, name


_DIGEST = "import lm_tiny, hashlib; print(' '.join(hashlib.md5(getattr(lm_tiny, n + '_tokenizer')()" \
          ".backend_tokenizer.to_str().encode()).hexdigest() for n in {names!r}))"


def test_tokenizers_are_the_same_in_every_process():
    """The trainers break ties by hash order, which Python and Rust seed per process; the files
    must not depend on it."""
    names = list(MAKERS)
    here = [hashlib.md5(getattr(lm_tiny, n + "_tokenizer")().backend_tokenizer.to_str().encode()).hexdigest()
            for n in names]
    code = _DIGEST.format(names=names)
    there = subprocess.run([sys.executable, "-c", code], cwd=Path(lm_tiny.__file__).parent, capture_output=True,
                           text=True, check=True).stdout.split()
    assert there == here
