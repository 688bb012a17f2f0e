"""Acceptance: greedy text from mlx_zeta.lm equals transformers' on the tiny checkpoints of
lm_tiny.py (random float32 weights, real tokenizers trained offline, chat templates).

Reference: ``model.generate(do_sample=False, max_new_tokens=N)`` of transformers on the same folder,
its prompt ids from transformers' own tokenizer (``tokenizer(text)`` or ``apply_chat_template``),
its text ``tokenizer.decode(new ids, skip_special_tokens=True)``. Compared: every token id, the
text (``generate``, and the streamed pieces joined), and each step's log-probability against
``log_softmax`` of transformers' raw logits (float64).

Measured (float32, 20 tokens, 5 text + 4 chat prompts per model, T5 text only): log-probability
max |diff| 1.8e-6 (Llama), 1.5e-6 (Qwen3), 3.5e-6 (GPT-2), 3.7e-6 (T5); the smallest top-1 / top-2
logit gap on the greedy paths is 1.0e-4 (Llama; Qwen3 3.5e-3, GPT-2 4.5e-3, T5 7.9e-2), 25x the
largest error, so argmax ties are not a risk. (The random models babble, mostly lone bytes: the
texts compared are full of U+FFFD, which exercises the streaming detokenizer hard.) Also: end tokens
from generation_config.json (a list) stop with ``finish_reason="stop"``, ``max_tokens`` ends with
``"length"``, the prompt speed times the prompt's pass, and bad prompts, max_tokens and folders are
refused in one line.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from lm_tiny import CAUSAL, CHATS, MAKERS, SAMPLES  # noqa: E402
from mlx_zeta.lm import generate, load, stream_generate  # noqa: E402

N = 20
TEXTS = [SAMPLES[0], SAMPLES[2], SAMPLES[4], SAMPLES[7], SAMPLES[9]]
LOGPROB_ATOL = 2e-5  # float32 through two layers; measured <= 3.7e-6 (module docstring)
MIN_GAP = 2e-5  # 5x the logprob error: a greedy step nearer a tie would make the comparison luck


@pytest.fixture(scope="module")
def models(tiny_lm):
    """``models(name)`` -> (ours: (model, tokenizer), transformers: (model, tokenizer), folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tiny_lm(name)
            auto = transformers.AutoModelForSeq2SeqLM if name == "t5" else transformers.AutoModelForCausalLM
            cache[name] = (load(str(path), dtype="float32"),
                           (auto.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)), path)
        return cache[name]

    return get


def hf_prompt(tok, prompt) -> list:
    if isinstance(prompt, str):
        return tok(prompt)["input_ids"]
    out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


def hf_greedy(model, ids, n, seq2seq=False, **kw):
    """transformers' greedy new ids, the log-probability of each, and the smallest top-1/top-2 gap."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, output_logits=True, return_dict_in_generate=True,
                             **kw)
    new = out.sequences[0, 1 if seq2seq else len(ids):].tolist()
    logits = torch.stack(out.logits)[:, 0].double()
    logprobs = torch.log_softmax(logits, -1)[torch.arange(len(new)), torch.tensor(new)].numpy()
    top2 = logits.topk(2, -1).values
    return new, logprobs, float((top2[:, 0] - top2[:, 1]).min())


def assert_generates_like_transformers(models, name, prompt, n=N) -> dict:
    (model, tok), (hf, hf_tok), _ = models(name)
    ids = hf_prompt(hf_tok, prompt)
    want, want_lp, gap = hf_greedy(hf, ids, n, seq2seq=name == "t5")
    steps = list(stream_generate(model, tok, prompt, n, temperature=0.0))
    assert [r.token for r in steps] == want, (name, prompt)
    text = hf_tok.decode(want, skip_special_tokens=True)
    assert "".join(r.text for r in steps) == text
    assert generate(model, tok, prompt, n, temperature=0.0) == text
    err = float(np.abs(np.array([r.logprob for r in steps]) - want_lp).max())
    assert err <= LOGPROB_ATOL, f"{name}: logprob max |diff| {err:.3g}"
    assert gap >= MIN_GAP, f"{name}: greedy path within {gap:.3g} of a tie"
    assert steps[0].prompt_tokens == len(ids)
    return {"logprob_err": err, "gap": gap, "finish": steps[-1].finish_reason}


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(MAKERS))
def test_raw_text_prompt_equals_transformers(models, name):
    for text in TEXTS:
        assert_generates_like_transformers(models, name, text)


@pytest.mark.parametrize("name", CAUSAL)
def test_chat_prompt_equals_transformers(models, name):
    for messages in CHATS:
        assert_generates_like_transformers(models, name, messages)


@pytest.mark.parametrize("name", CAUSAL)
def test_prompt_as_ids_equals_prompt_as_text(models, name):
    (model, tok), _, _ = models(name)
    ids = tok.encode(TEXTS[3])
    assert generate(model, tok, ids, 8, temperature=0.0) == generate(model, tok, TEXTS[3], 8, temperature=0.0)


# ------------------------------------------------------------------------------- finish reasons
def test_every_end_token_of_the_generation_config_list_stops(models):
    """Qwen3's generation_config.json lists <|im_end|> and <|endoftext|>; config.json and the
    tokenizer know only <|im_end|>. Pushing either one to the top ends the text at once."""
    (model, tok), _, path = models("qwen3")
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert len(eos) == 2 and eos[1] not in tok.eos_token_ids
    for end in eos:
        steps = list(stream_generate(model, tok, TEXTS[0], 10, temperature=0.0, logit_bias={end: 1e4}))
        assert [(r.token, r.text, r.finish_reason) for r in steps] == [(end, "", "stop")]
    other = tok.encode("a", add_special_tokens=False)[0]
    steps = list(stream_generate(model, tok, TEXTS[0], 5, temperature=0.0, logit_bias={other: 1e4}))
    assert [r.token for r in steps] == [other] * 5 and steps[-1].finish_reason == "length"


@pytest.mark.parametrize("name", CAUSAL)
def test_a_listed_end_token_stops_where_transformers_stops(models, name, tmp_path):
    """A copy of the checkpoint whose generation_config.json lists the 6th greedy token as a second
    end token: both libraries stop right after it, ours with finish_reason "stop"."""
    (model, tok), (hf, hf_tok), path = models(name)
    free = [r.token for r in stream_generate(model, tok, TEXTS[1], N, temperature=0.0, eos_token_ids=[])]
    end = free[5]
    stop_at = free.index(end)
    folder = tmp_path / name
    shutil.copytree(path, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    first = gen["eos_token_id"][0] if isinstance(gen["eos_token_id"], list) else gen["eos_token_id"]
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [first, end]}))
    model2, tok2 = load(str(folder), dtype="float32")
    steps = list(stream_generate(model2, tok2, TEXTS[1], N, temperature=0.0))
    assert [r.token for r in steps] == free[:stop_at + 1]
    assert [r.finish_reason for r in steps] == [None] * stop_at + ["stop"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf_greedy(ref, hf_prompt(hf_tok, TEXTS[1]), N)[0] == free[:stop_at + 1]
    assert "".join(r.text for r in steps) == hf_tok.decode(free[:stop_at], skip_special_tokens=True)


@pytest.mark.parametrize("name", list(MAKERS))
def test_max_tokens_ends_with_length(models, name):
    (model, tok), _, _ = models(name)
    for n in (1, 7):
        steps = list(stream_generate(model, tok, TEXTS[2], n, temperature=0.0, eos_token_ids=[]))
        assert len(steps) == n and [r.generation_tokens for r in steps] == list(range(1, n + 1))
        assert [r.finish_reason for r in steps] == [None] * (n - 1) + ["length"]


# ----------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("prompt, message", [
    (3.5, r"expected prompt as text, a list of token ids or a list of chat messages, got float"),
    ({"role": "user", "content": "hi"}, r"expected prompt as text, .* got dict"),
    ([1, "two"], r"expected prompt as text, .* got list"),
    ([1.0, 2.0], r"expected prompt as text, .* got list"),
    ([], r"expected a prompt of at least one token, got an empty one"),
    ("", r"expected a prompt of at least one token, got an empty one"),  # GPT-2 adds no BOS
    ([10 ** 6], r"expected prompt token ids in \[0, 401\), got 1000000"),
])
def test_bad_prompt_is_refused_in_one_line(models, prompt, message):
    (model, tok), _, _ = models("gpt2")
    with pytest.raises(ValueError, match=r"^\[generate\] " + message) as e:
        generate(model, tok, prompt, 4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("max_tokens", [0, -1, 2.5, "8", True])
def test_bad_max_tokens_is_refused(models, max_tokens):
    (model, tok), _, _ = models("llama")
    with pytest.raises(ValueError, match=r"^\[generate\] expected max_tokens to be an int >= 1") as e:
        generate(model, tok, "Hello", max_tokens)
    assert "\n" not in str(e.value)


def test_folder_without_tokenizer_files_is_named(tiny_lm, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for file in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_lm("gpt2") / file, folder / file)
    with pytest.raises(ValueError, match=r"^\[Tokenizer\] expected tokenizer files in .*weights-only") as e:
        load(str(folder))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_prompt_time_covers_the_prompt_pass(models, name):
    """``prompt_tps`` times the prompt's pass through the model: the reported prompt time is at least
    a fifth of that pass run alone (T5: its encoder). MLX is lazy, so a clock read before the first
    token is drawn timed only the building of the graph (T5 once reported 1 ms for a 2.6 s encoder)."""
    import time

    import mlx.core as mx

    (model, tok), _, _ = models(name)
    text = "hello world " * 150
    ids = mx.array([tok.encode(text)])
    alone, reported = [], []
    for _ in range(2):
        start = time.perf_counter()
        mx.eval(model.encode(ids) if name == "t5" else model(ids, cache=model.make_cache()))
        alone.append(time.perf_counter() - start)
        last = list(stream_generate(model, tok, text, 2, temperature=0.0))[-1]
        reported.append(last.prompt_tokens / last.prompt_tps)
    assert min(reported) >= 0.2 * min(alone), \
        f"{name}: prompt time {min(reported):.3g} s, the pass alone {min(alone):.3g} s"


def test_top_level_names_and_lazy_extras():
    """``mlx_zeta.load/generate/stream_generate`` are mlx_zeta.lm's; importing mlx_zeta loads neither
    tokenizers nor jinja2 (the ``lm`` extra is imported when a tokenizer is first loaded)."""
    import subprocess
    import sys

    import mlx_zeta
    import mlx_zeta.lm as lm

    assert (mlx_zeta.load, mlx_zeta.generate, mlx_zeta.stream_generate) == (lm.load, lm.generate, lm.stream_generate)
    code = "import sys, mlx_zeta; print(sorted({'tokenizers', 'jinja2', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("name, chat", [("llama", False), ("qwen3", True), ("gpt2", True), ("t5", False)])
def test_command_line_generate_equals_transformers(models, name, chat):
    """``python -m mlx_zeta generate --model M --prompt TEXT --temp 0`` in a fresh process prints
    transformers' greedy text (stdout: the text and a newline; the statistics go to stderr)."""
    import subprocess
    import sys

    _, (hf, hf_tok), path = models(name)
    text = TEXTS[3]
    prompt = [{"role": "user", "content": text}] if chat else text
    want, _, _ = hf_greedy(hf, hf_prompt(hf_tok, prompt), N, seq2seq=name == "t5")
    ends = set(hf.generation_config.eos_token_id if isinstance(hf.generation_config.eos_token_id, list)
               else [hf.generation_config.eos_token_id])
    want = want[:next((i for i, t in enumerate(want) if t in ends), len(want))]
    argv = [sys.executable, "-m", "mlx_zeta", "generate", "--model", str(path), "--prompt", text, "--temp", "0",
            "--max-tokens", str(N), "--chat" if chat else "--no-chat"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == hf_tok.decode(want, skip_special_tokens=True) + "\n"
    assert "tok/s" in done.stderr
