"""The Swift sample's byte-level BPE (examples/ios, Tokenizer.swift) against Hugging Face's
``tokenizers`` library: the same ids for every text and the same text for random id lists
(invalid UTF-8 included), on three byte-level tokenizers trained here: make_tiny_model.py's
(GPT-2 regex), lm_tiny's GPT-2 and lm_tiny's Qwen3 (NFC, Qwen's split regex, added tokens).

Needs a Swift compiler (``MLX_ZETA_SWIFTC``, else ``swiftc`` on PATH; the macOS workflow has
one): skipped without. The library's Core ML-free files are compiled with
``examples/ios/Tools/tokenizer_parity.swift`` into one command that encodes and decodes a batch.
"""

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

from lm_tiny import SAMPLES, corpus  # noqa: E402
from scripts import load_script  # noqa: E402

IOS = Path(__file__).resolve().parents[1] / "examples" / "ios"
SOURCES = IOS / "Sources" / "MLXZetaCoreML"
EXTRA = ["<|endoftext|>hello<|endoftext|> world", "a<|im_end|>b<|im_start|>", "  x  \n\n y\t\tz ", "e\u0301te\u0301",
         "don't I'll we've THEY'RE", "\uff11\uff12\uff13 \u2167 \u00bd", " ", "\n", "x" * 300]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The compiled tokenizer_parity command (see the module docstring)."""
    swiftc = os.environ.get("MLX_ZETA_SWIFTC") or shutil.which("swiftc")
    if not swiftc:
        pytest.skip("no Swift compiler (set MLX_ZETA_SWIFTC or put swiftc on PATH)")
    build = tmp_path_factory.mktemp("swift")
    shutil.copy(IOS / "Tools" / "tokenizer_parity.swift", build / "main.swift")  # top-level code lives in main.swift
    sources = sorted(p for p in SOURCES.glob("*.swift") if p.name != "Generator.swift")  # Generator needs Core ML
    exe = build / "tokenizer_parity"
    subprocess.run([swiftc, "-O", "-o", str(exe), *map(str, sources), str(build / "main.swift")],
                   check=True, timeout=600)
    return exe


def _check(exe, folder: Path, tmp_path: Path):
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    rng = random.Random(0)
    texts = list(SAMPLES) + EXTRA + corpus(150, seed=3)
    ids = [[rng.randrange(tok.get_vocab_size()) for _ in range(rng.randint(0, 12))] for _ in range(200)]
    cases = tmp_path / f"{folder.name}-cases.json"
    cases.write_text(json.dumps({"texts": texts, "ids": ids}))
    out = json.loads(subprocess.run([str(exe), str(folder), str(cases)], check=True, capture_output=True,
                                    timeout=120).stdout)
    for text, got in zip(texts, out["encode"]):
        assert got == tok.encode(text, add_special_tokens=False).ids, (folder.name, text)
    for row, got in zip(ids, out["decode"]):
        assert got == tok.decode(row, skip_special_tokens=True), (folder.name, row)


def test_tiny_model_tokenizer(parity, tmp_path):
    helper = load_script(IOS / "make_tiny_model.py", "make_tiny_model")
    folder = tmp_path / "tiny"
    folder.mkdir()
    helper.train_tokenizer(folder)
    _check(parity, folder, tmp_path)


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_lm_tiny_tokenizers(parity, tiny_lm, name, tmp_path):
    _check(parity, tiny_lm(name), tmp_path)
