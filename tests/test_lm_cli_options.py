"""The options and failures of ``mlx-zeta generate``, ``chat`` and ``serve``: one-line usage errors
checked before the model loads, prompt-cache files, speculative decoding with a draft model, and
the server started from the command line. The tiny model and helpers are test_lm_cli.py's."""

import re
import subprocess
import sys

import pytest

from lm_tiny import make_qwen3
from test_lm_cli import ROOT, STATS, lcp, loaded, one_line, reference, run, tiny  # noqa: F401


# --------------------------------------------------------------------------- bad usage


@pytest.fixture(scope="module")
def no_template(tiny, tmp_path_factory):
    """The tiny checkpoint without its chat template."""
    import shutil

    folder = shutil.copytree(tiny, tmp_path_factory.mktemp("lmcli") / "plain")
    (folder / "chat_template.jinja").unlink()
    return folder


def test_bad_usage_exits_2_with_one_line_before_loading_the_model(capsys, tmp_path):
    """Options are checked first: with a model path that does not exist, the option is still the error."""
    missing = tmp_path / "no-model"
    cases = [
        (["generate", "--prompt", "hi"], "the following arguments are required: --model"),
        (["generate", "--model", missing], "the following arguments are required: --prompt"),
        (["generate", "--model", missing, "--prompt", "hi", "--max-tokens", "0"], "expected an int >= 1, got '0'"),
        (["generate", "--model", missing, "--prompt", "hi", "--temp", "-1"], "expected temperature"),
        (["generate", "--model", missing, "--prompt", "hi", "--top-p", "2"], "top_p"),
        (["generate", "--model", missing, "--prompt", "hi", "--top-k", "0"], "top_k"),
        (["generate", "--model", missing, "--prompt", "hi", "--min-p", "1.5"], "min_p"),
        (["generate", "--model", missing, "--prompt", "hi", "--repetition-penalty", "0"], "repetition_penalty"),
        (["generate", "--model", missing, "--prompt", "hi", "--seed", "-3"], "seed"),
        (["generate", "--model", missing, "--prompt", "hi", "--temp", "hot"], "invalid float value: 'hot'"),
        (["generate", "--model", missing, "--prompt", "hi", "--num-draft-tokens", "2"], "needs --draft-model"),
        (["generate", "--model", missing, "--prompt", "hi", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["generate", "--model", missing, "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus"),
        (["chat", "--model", missing, "--max-tokens", "-2"], "expected an int >= 1, got '-2'"),
        (["chat", "--model", missing, "--temp", "-0.5"], "expected temperature"),
        (["serve", "--model", missing, "--port", "70000"], "expected a port number from 0 to 65535, got '70000'"),
        (["serve", "--model", missing, "--port", "http"], "expected a port number"),
        (["serve", "--port", "8000"], "the following arguments are required: --model"),
        (["serve", "--model", missing, "--max-queue", "0"], "expected an int >= 1"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and out == "" and line.startswith(f"mlx-zeta {argv[0]}: error: ") and message in line, \
            (argv, line)
        assert str(missing) not in line, line  # the option, not the model, was the error


def test_bad_model_and_chat_settings_exit_2_with_one_line(tiny, no_template, capsys, tmp_path):
    cases = [
        (["generate", "--model", tmp_path / "no-model", "--prompt", "hi"], str(tmp_path / "no-model")),
        (["chat", "--model", tmp_path / "no-model"], str(tmp_path / "no-model")),
        (["generate", "--model", tiny, "--prompt", "hi", "--no-chat", "--system", "s"], "--system needs a chat"),
        (["generate", "--model", no_template, "--prompt", "hi", "--chat"], "has no chat template; pass --no-chat"),
        (["generate", "--model", no_template, "--prompt", "hi", "--system", "s"], "--system needs a chat"),
        (["chat", "--model", no_template], "has no chat template; use mlx-zeta generate --no-chat"),
        (["generate", "--model", tiny, "--prompt", "", "--no-chat"], "expected a prompt of at least one token"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and out == "" and line.startswith(f"mlx-zeta {argv[0]}: error: ") and message in line, \
            (argv, line)


def test_generate_without_a_template_feeds_the_text_as_it_is(no_template, capsys):
    from mlx_zeta.lm import generate, load

    code, out, err = run(capsys, "generate", "--model", no_template, "--prompt", "hello world", "--max-tokens", 8)
    assert code == 0, err
    assert out == generate(*load(no_template), "hello world", 8) + "\n"


# --------------------------------------------------------------------------- serve


def test_serve_passes_its_options_to_the_server(capsys, monkeypatch):
    import inspect
    import types

    from mlx_zeta.lm.server import serve

    calls = []
    monkeypatch.setitem(sys.modules, "mlx_zeta.lm.server",
                        types.SimpleNamespace(serve=lambda *args, **kwargs: calls.append((args, kwargs))))
    code, _, err = run(capsys, "serve", "--model", "m", "--port", "0", "--max-queue", "4", "--max-tokens", "64",
                       "--max-prompt-tokens", "100", "--model-id", "tiny", "--dtype", "float16", "--no-prompt-cache")
    assert code == 0, err
    assert calls[-1] == (("m", "127.0.0.1", 0), dict(max_queue=4, max_tokens_default=64, max_prompt_tokens=100,
                                                     model_id="tiny", dtype="float16", prompt_cache=False,
                                                     log_level="warning"))
    inspect.signature(serve).bind(*calls[-1][0], **calls[-1][1])  # the real server takes exactly these
    assert run(capsys, "serve", "--model", "m", "--host", "0.0.0.0")[0] == 0
    assert calls[-1][0] == ("m", "0.0.0.0", 8080)


def test_serve_on_a_busy_port_exits_1_with_one_line(tiny, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "serve", "--model", tiny, "--port", port)
    assert code == 1 and out == "", err
    assert one_line(err).startswith(f"mlx-zeta serve: error: [serve] expected to listen on 127.0.0.1:{port}, got ")


# --------------------------------------------------------------------------- prompt-cache files


def test_prompt_cache_file_is_made_once_and_reused(tiny, loaded, capsys, tmp_path):
    file = tmp_path / "doc.safetensors"
    first, second = "hello world", "hello world, how are you today?"
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", first, "--no-chat", "--max-tokens", 8,
                         "--prompt-cache", file)
    text1, tokens1, ids1 = reference(loaded, first, 8)
    assert code == 0 and out == text1 + "\n" and file.is_file(), err
    lines = err.splitlines()
    assert lines[0] == f"saved the prompt cache ({len(ids1) + len(tokens1) - 1} tokens) to {file}", lines
    assert STATS.fullmatch(lines[1])[2] == "0"
    saved = file.read_bytes()
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", second, "--no-chat", "--max-tokens", 8,
                         "--prompt-cache", file)
    text2, tokens2, ids2 = reference(loaded, second, 8)  # without any cache
    assert code == 0 and out == text2 + "\n", err
    reused = lcp(ids1 + tokens1[:-1], ids2)
    stats = STATS.fullmatch(one_line(err))  # nothing saved this time: the file was there
    assert reused >= len(ids1) and (int(stats[1]), int(stats[2])) == (len(ids2) - reused, reused)
    assert file.read_bytes() == saved


def test_a_corrupt_prompt_cache_file_exits_2_with_one_line_and_stays(tiny, capsys, tmp_path):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", "hi", "--prompt-cache", file)
    assert code == 2 and out == "" and str(file) in one_line(err), err
    assert file.read_bytes() == b"\x08\x00\x00\x00\x00\x00\x00\x00{}"


def test_prompt_cache_bad_settings_exit_2_before_loading(capsys, tmp_path):
    missing = tmp_path / "no-model"
    (tmp_path / "there.safetensors").write_bytes(b"x")
    for argv, message in [(["--prompt-cache", tmp_path / "c.bin"], "expected --prompt-cache to be a .safetensors file"),
                          (["--prompt-cache", tmp_path / "there.safetensors", "--max-kv-size", "8"],
                           "keeps the size it was made with")]:
        code, _, err = run(capsys, "generate", "--model", missing, "--prompt", "hi", *argv)
        assert code == 2 and message in one_line(err) and str(missing) not in err, err


# --------------------------------------------------------------------------- speculative decoding


def test_draft_model_gives_the_target_text_at_temperature_0(tiny, loaded, capsys, tmp_path):
    """Other weights (drafts refused) and the target itself (drafts accepted): the target's text either way,
    and the stats line counts the draft's tokens as stream_generate's from_draft does."""
    from mlx_zeta.lm import load, stream_generate

    prompt = [{"role": "user", "content": "hello world"}]
    text, tokens, _ = reference(loaded, prompt, 16)
    for draft in (make_qwen3(tmp_path / "draft", seed=1), tiny):
        code, out, err = run(capsys, "generate", "--model", tiny, "--prompt", "hello world", "--max-tokens", 16,
                             "--temp", 0, "--draft-model", draft, "--num-draft-tokens", 2)
        if code == 2 and "not available yet" in err:
            pytest.skip("speculative decoding is not in this build yet")
        assert code == 0 and out == text + "\n", err
        stats = STATS.fullmatch(one_line(err))
        drafted = sum(r.from_draft for r in stream_generate(*loaded, prompt, 16, temperature=0,
                                                            draft_model=load(draft)[0], num_draft_tokens=2))
        assert stats and (int(stats[3]), int(stats[4])) == (len(tokens), drafted), err
    assert drafted > len(tokens) // 2  # the target drafting for itself: its proposals are accepted


def test_serve_runs_the_real_server_until_ctrl_c(tiny):
    """`python -m mlx_zeta serve` on a free port answers /v1/models and ends with status 0 on SIGINT."""
    import json
    import signal
    import time
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mlx_zeta", "serve", "--model", str(tiny), "--port", "0",
                             "--model-id", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stderr.readline()
        url = re.search(r"serving tiny on (http://127\.0\.0\.1:\d+)", line)
        assert url, line + proc.stderr.read() if proc.poll() is not None else line
        for _ in range(100):  # the line may come just before uvicorn listens
            try:
                with urllib.request.urlopen(url[1] + "/v1/models", timeout=30) as response:
                    models = json.load(response)
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        else:
            pytest.fail(f"{url[1]} did not answer within 10 s")
        assert [m["id"] for m in models["data"]] == ["tiny"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
