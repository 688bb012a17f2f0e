"""The ``mlx-zeta`` entry point (``mlx_zeta.cli``, ``python -m mlx_zeta``, the console script) and its
language-model commands ``generate``, ``chat`` and ``serve`` (``mlx_zeta.lm.cli``)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_zeta
from mlx_zeta.cli import main
from cli_run import one_line, run

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the entry point


def test_version_in_process_and_as_python_m(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"mlx-zeta {mlx_zeta.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "mlx_zeta", "--version"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"mlx-zeta {mlx_zeta.__version__}\n", "")
    # the version pyproject.toml ships is the one printed
    assert re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1) == \
        mlx_zeta.__version__


def test_console_script_runs_the_one_main(tmp_path):
    """pyproject's [project.scripts] entry, run as the script pip generates runs it (``from M import F;
    sys.exit(F())``), and the installed script itself where one lies beside this interpreter."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mlx-zeta"]
    assert entry == "mlx_zeta.cli:main"
    module, func = entry.split(":")
    script = tmp_path / "mlx-zeta"
    script.write_text(f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    commands = [[sys.executable, str(script)]]
    installed = Path(sys.executable).parent / "mlx-zeta"
    if installed.is_file() and module in installed.read_text():
        commands.append([str(installed)])
    for cmd in commands:
        proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (0, f"mlx-zeta {mlx_zeta.__version__}\n"), proc.stderr
        proc = subprocess.run([*cmd, "no-such-command"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "invalid choice: 'no-such-command'" in one_line(proc.stderr)


def test_help_lists_every_command_and_usage_errors_are_one_line(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("convert", "export-coreml", "export-coreai", "generate", "chat", "serve"):
        assert command in out
    code, _, err = run(capsys)
    assert code == 2 and one_line(err).startswith("mlx-zeta: error: the following arguments are required: COMMAND")
    code, _, err = run(capsys, "convert", "a", "b", "--bogus")
    assert code == 2 and one_line(err).startswith("mlx-zeta convert: error: unrecognized arguments: --bogus")


# --------------------------------------------------------------------------- a tiny chat model (tests/lm_tiny.py)


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    """Qwen3 with a byte-level BPE, a ChatML template and two end tokens (generation_config.json)."""
    return tiny_lm("qwen3")


@pytest.fixture(scope="module")
def loaded(tiny):
    from mlx_zeta.lm import load

    return load(tiny)


STATS = re.compile(r"prompt: (\d+) tokens(?: \((\d+) reused from the cache\))?, [\d.]+ tok/s; "
                   r"generation: (\d+) tokens(?:; (\d+) of them from the draft model)?, [\d.]+ tok/s; "
                   r"peak memory: [\d.]+ GB")


def reference(loaded, prompt, n):
    """(text, token ids, prompt ids) of mlx_zeta.lm's own streaming generation."""
    from mlx_zeta.lm import prompt_ids, stream_generate

    model, tok = loaded
    steps = list(stream_generate(model, tok, prompt, n))
    return "".join(r.text for r in steps), [r.token for r in steps], prompt_ids(tok, prompt)


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("argv, prompt", [
    ([], [{"role": "user", "content": "hello world"}]),  # a chat template: --chat by default
    (["--chat", "--system", "be brief"], [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hello world"}]),
    (["--no-chat"], "hello world"),
])
def test_generate_prints_the_text_of_stream_generate_and_stats_on_stderr(tiny, loaded, capsys, argv, prompt):
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", "hello world", "--max-tokens", 16, *argv)
    assert code == 0, err
    text, tokens, ids = reference(loaded, prompt, 16)
    assert out == text + "\n"
    stats = STATS.fullmatch(one_line(err))
    assert stats and (int(stats[1]), stats[2], int(stats[3])) == (len(ids), None, len(tokens)), err


def test_generate_flushes_each_piece_before_the_next_token_is_made(tiny, monkeypatch):
    """Streaming: when stream_generate makes step k, the text of steps < k has been written and flushed."""
    import mlx_zeta.lm as lm

    class Stdout:  # shows what was written only once it is flushed
        pending, shown = "", ""

        def write(self, text):
            self.pending += text

        def flush(self):
            self.shown, self.pending = self.shown + self.pending, ""

    real, seen, stdout = lm.stream_generate, [], Stdout()

    def watched(*args, **kwargs):
        pieces = []
        for r in real(*args, **kwargs):
            seen.append(stdout.shown == "".join(pieces))
            pieces.append(r.text)
            yield r
        assert len(pieces) == 12 and sum(map(bool, pieces)) >= 3  # several steps have text to show

    monkeypatch.setattr(lm, "stream_generate", watched)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "--model", str(tiny), "--prompt", "hello", "--no-chat", "--max-tokens", "12"]) == 0
    assert len(seen) == 12 and all(seen) and stdout.pending == ""


def test_generate_reads_the_prompt_from_stdin_and_passes_sampling_options(tiny, loaded, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("le café"))
    argv = ["--temp", "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.3",
            "--seed", "7", "--no-chat"]
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", "-", "--max-tokens", 20, *argv)
    assert code == 0, err
    from mlx_zeta.lm import generate

    model, tok = loaded
    expected = generate(model, tok, "le café", 20, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                        repetition_penalty=1.3, seed=7)
    assert out == expected + "\n"
    greedy = generate(model, tok, "le café", 20, temperature=0.0)
    assert expected != greedy  # the options took effect (not the checkpoint's greedy default)


def test_generate_stop_strings_and_max_kv_size(tiny, loaded, capsys):
    from mlx_zeta.lm import generate

    model, tok = loaded
    full = generate(model, tok, "hello world", 24)
    stop = full[5:8]  # a piece of the greedy text: the output ends just before its first occurrence
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", "hello world", "--no-chat",
                         "--max-tokens", 24, "--stop", stop, "never-there")
    assert code == 0, err
    assert out == full[:full.index(stop)] + "\n"
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", "hello world", "--no-chat",
                         "--max-tokens", 24, "--max-kv-size", 8)
    assert code == 0, err
    assert out == generate(model, tok, "hello world", 24, max_kv_size=8) + "\n"


def _transformers_greedy(folder: Path, prompt, n: int) -> str:
    """transformers' greedy ``generate`` + ``decode`` of ``prompt`` (text, or chat messages rendered with
    the checkpoint's template); the end tokens are generation_config.json's, as transformers reads them."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    seq2seq = json.loads((folder / "config.json").read_text())["model_type"] == "t5"
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(folder).eval()
    ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else \
        tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    new = out[0, 1 if seq2seq else len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    end = next((i for i, t in enumerate(new) if t in eos), len(new))
    return tok.decode(new[:end], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "t5"])
def test_generate_on_each_tiny_checkpoint_equals_transformers_greedy(name, request, capsys):
    """The issue's acceptance: greedy text of `mlx-zeta generate` on tiny Llama, Qwen3, GPT-2 (and T5)
    checkpoints with real tokenizers equals transformers' generate + decode, plain and chat-templated."""
    folder = request.getfixturevalue("tiny_lm")(name)
    runs = [(["--no-chat"], "le café est très bon, 你好 🚀")]
    if name != "t5":
        runs.append((["--system", "Sei kurz."], [{"role": "system", "content": "Sei kurz."},
                                                {"role": "user", "content": "le café est très bon, 你好 🚀"}]))
    for argv, prompt in runs:
        code, out, err = run(capsys, "generate", "--model", folder, "--prompt", "le café est très bon, 你好 🚀",
                             "--max-tokens", 20, *argv)
        assert code == 0 and out == _transformers_greedy(folder, prompt, 20) + "\n", (argv, err)
        assert STATS.fullmatch(one_line(err)), err


def test_a_closed_stdout_pipe_ends_quietly(tiny):
    """`mlx-zeta generate ... | head`: the reader goes away; exit status 1, nothing on stderr (no traceback,
    no "Exception ignored" from the interpreter's last flush)."""
    proc = subprocess.Popen([sys.executable, "-m", "mlx_zeta", "generate", "--model", str(tiny), "--prompt", "hi",
                             "--max-tokens", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.close()  # before the model has loaded: its first flush meets a closed pipe
    err = proc.stderr.read()
    assert (proc.wait(timeout=120), err) == (1, "")


# --------------------------------------------------------------------------- chat


def lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_keeps_the_history_and_prefills_only_new_tokens(tiny, loaded, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\nhow are you today?\n/quit\nnever read\n"))
    code, out, err = run(capsys, "chat", "--model", tiny, "--max-tokens", 10, "--system", "be brief")
    assert code == 0, err
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    reply1, tokens1, ids1 = reference(loaded, first, 10)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "how are you today?"}]
    reply2, tokens2, ids2 = reference(loaded, second, 10)  # a fresh run on the whole conversation
    assert out == reply1 + "\n" + reply2 + "\n"
    stats = [STATS.fullmatch(line) for line in err.splitlines()]
    assert len(stats) == 2 and all(stats), err
    # turn 1: the whole prompt runs; turn 2: only what the cache does not hold. The cache holds
    # the first prompt and the reply's tokens but the last (which was never fed back).
    assert (int(stats[0][1]), int(stats[0][2]), int(stats[0][3])) == (len(ids1), 0, len(tokens1))
    reused = lcp(ids1 + tokens1[:-1], ids2)
    assert reused >= len(ids1) and ids2[:len(ids1)] == ids1
    assert (int(stats[1][1]), int(stats[1][2]), int(stats[1][3])) == (len(ids2) - reused, reused, len(tokens2))


def test_chat_reset_forgets_the_history_and_end_of_input_ends(tiny, loaded, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n\n/reset\nhello world"))  # no /quit: EOF
    code, out, err = run(capsys, "chat", "--model", tiny, "--max-tokens", 8)
    assert code == 0, err
    reply, _, _ = reference(loaded, [{"role": "user", "content": "hello world"}], 8)
    assert out == reply + "\n" + reply + "\n"  # the blank line is skipped, the third starts over
    assert "(history cleared)" in err


def test_chat_piped_through_python_m(tiny, loaded):
    proc = subprocess.run([sys.executable, "-m", "mlx_zeta", "chat", "--model", str(tiny), "--max-tokens", "6"],
                          input="hello world\n/quit\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference(loaded, [{"role": "user", "content": "hello world"}], 6)[0] + "\n"
