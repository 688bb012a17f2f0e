"""Fine-tuning data (mlx_zeta.lm.datasets) on the tiny chat checkpoints of lm_tiny.py: the three
line formats through each checkpoint's own chat template (checked against transformers'
``apply_chat_template`` on the same folder), the prompt mask (the masked-out targets decode to
exactly the prompt, the kept ones to the completion), batches (shifted, right-padded, sorted
by length, shuffled per epoch and deterministic in the index), packing (no target crosses an
example's end; the first example of a row scores as alone) and one-line errors naming file:line."""

import json

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from mlx_zeta.lm import load_tokenizer  # noqa: E402
from mlx_zeta.lm.datasets import Batches, TextDataset, iterate_batches, load_datasets  # noqa: E402

CHAT = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "where is the fox?"},
        {"role": "assistant", "content": "over the dog"}, {"role": "user", "content": "and the cafe?"},
        {"role": "assistant", "content": "near the forest"}]
LINES = [{"text": "the quick brown fox"},
         {"prompt": "what is the fox?", "completion": "quick brown"},
         {"messages": CHAT, "tools": [{"name": "unused"}]}]


def write(folder, split, lines):
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return folder


def hf_tokenizer(folder):
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_formats_follow_the_chat_template_and_mask_only_the_prompt(tiny_lm, tmp_path, name):
    """Each example's ids are the prompt part then the completion part; transformers' rendering of
    the same chat decodes to the same text, and the mask keeps exactly the completion."""
    folder = tiny_lm(name)
    tok, ref = load_tokenizer(folder), hf_tokenizer(folder)
    data = write(tmp_path / "d", "train", LINES)
    masked = load_datasets(data, tok, mask_prompt=True)["train"]
    plain = load_datasets(data, tok)["train"]
    assert [ids for ids, _ in masked.examples] == [ids for ids, _ in plain.examples]  # the mask alone differs
    assert all(p == 0 for _, p in plain.examples)

    eos = tok.eos_token_ids[0]
    text_ids, p = masked[0]
    assert p == 0 and text_ids == ref("the quick brown fox")["input_ids"] + [eos]
    chats = [[{"role": "user", "content": "what is the fox?"}, {"role": "assistant", "content": "quick brown"}], CHAT]
    for (ids, p), chat in zip(masked.examples[1:], chats):
        whole = ref.apply_chat_template(chat, tokenize=False)
        prompt = ref.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        assert ids == ref(whole, add_special_tokens=False)["input_ids"]
        kept_prompt = tok.decode(ids[:p], skip_special_tokens=False)
        assert prompt.startswith(kept_prompt) and not prompt[len(kept_prompt):].strip()  # at most a straddling space
        check_mask(tok, ids, p, whole[len(prompt):])


def check_mask(tok, ids, p, completion):
    """The batch of one example: shifted ids, and the kept targets decode to ``completion``."""
    inputs, targets, mask = (np.array(a[0]) for a in Batches(TextDataset([(ids, p)]), 1, shuffle=False)(0))
    n = len(ids) - 1
    assert mask[n:].sum() == 0 and inputs[:n].tolist() == ids[:-1] and targets[:n].tolist() == ids[1:]
    assert tok.decode(targets[:n][mask[:n]].tolist(), skip_special_tokens=False).strip() == completion.strip()


def test_without_a_chat_template_prompt_and_completion_are_concatenated(tiny_lm, tmp_path):
    tok = load_tokenizer(tiny_lm("llama"))
    tok.chat_template = None
    line = {"prompt": "what is the fox?", "completion": " quick brown"}
    ids, p = load_datasets(write(tmp_path / "d", "train", [line]), tok, mask_prompt=True)["train"][0]
    assert ids == tok.encode("what is the fox? quick brown") + [tok.eos_token_ids[0]]
    assert tok.decode(ids[:p]) == "what is the fox?"
    check_mask(tok, ids, p, "quick brown</s>")


def test_splits_and_truncation(tiny_lm, tmp_path):
    tok = load_tokenizer(tiny_lm("qwen3"))
    data = write(tmp_path / "d", "train", LINES)
    write(data, "test", [LINES[0]])
    with pytest.warns(UserWarning, match=r"train.jsonl: 2 examples longer than max_seq_len=12"):
        sets = load_datasets(data, tok, max_seq_len=12)
    assert sorted(sets) == ["test", "train"]
    assert [len(ids) for ids, _ in sets["train"].examples][1:] == [13, 13]


def dataset(lengths, prompt=0):
    return TextDataset([(list(range(1, n + 1)), prompt) for n in lengths], max_seq_len=16)


def test_batches_are_bucketed_shuffled_per_epoch_and_deterministic():
    ds = dataset([9, 3, 5, 17, 4, 6, 12, 2])
    data = Batches(ds, 3, seed=1, pad_to=4)
    assert len(data) == 3 and [len(b) for b in data.batches] == [3, 3, 2]
    lengths = [[len(ds[r[0]][0]) for r in b] for b in data.batches]
    assert lengths == [[2, 3, 4], [5, 6, 9], [12, 17]]  # neighbours by length
    epoch0 = [int(data(i)[0].shape[1]) for i in range(3)]
    assert sorted(epoch0) == [4, 8, 16]  # longest row - 1 rounded up to pad_to
    orders = {tuple(int(data(e * 3 + k)[0].shape[1]) for k in range(3)) for e in range(6)}
    assert len(orders) > 1  # reshuffled per epoch
    again = Batches(ds, 3, seed=1, pad_to=4)
    for i in (0, 4, 11):  # the same index gives the same batch (exact resume)
        assert all(mx.array_equal(a, b) for a, b in zip(data(i), again(i)))
    inputs, targets, mask = Batches(ds, 3, seed=1, shuffle=False, pad_to=4)(0)
    assert inputs.dtype == mx.int32 and mask.dtype == mx.bool_
    np.testing.assert_array_equal(np.array(mask).sum(1), [1, 2, 3])
    np.testing.assert_array_equal(np.array(inputs)[2], [1, 2, 3, 0])
    np.testing.assert_array_equal(np.array(targets)[2], [2, 3, 4, 0])
    assert len(list(iterate_batches(ds, 3, epochs=2))) == 6
    capped = TextDataset([(list(range(1, 12)), 0)], max_seq_len=10)
    assert Batches(capped, 1, pad_to=8)(0)[0].shape == (1, 10)  # not 16: never past max_seq_len


def test_prompt_mask_starts_at_the_first_completion_target():
    inputs, targets, mask = Batches(TextDataset([([5, 6, 7, 8, 9], 3)]), 1, pad_to=1)(0)
    # ids 5 6 7 | 8 9: the targets 8 and 9 (positions 2 and 3) are the completion's
    assert np.array(mask).tolist() == [[False, False, True, True]] and np.array(targets).tolist() == [[6, 7, 8, 9]]


def test_packing_keeps_targets_inside_each_example():
    ds = dataset([5, 4, 9, 3, 7], prompt=2)
    inputs, targets, mask = (np.array(a) for a in Batches(ds, 8, pack=True, shuffle=False, pad_to=1)(0))
    # length order 3 4 5 7 9 -> positions 2 3 4 6 8; first fit into 16: [2+3+4+6 = 15], [8]
    assert inputs.shape == (2, 15)
    for k, order in enumerate([[3, 1, 0, 4], [2]]):
        segments = [ds[i][0] for i in order]
        want_in, want_tg = sum((ids[:-1] for ids in segments), []), sum((ids[1:] for ids in segments), [])
        want_mask = sum(([j + 1 >= 2 for j in range(len(ids) - 1)] for ids in segments), [])
        n = len(want_in)
        assert inputs[k, :n].tolist() == want_in
        assert targets[k, :n].tolist() == want_tg  # an example's last input never targets the next one's first id
        assert mask[k].tolist() == want_mask + [False] * (15 - n)


@pytest.mark.parametrize("line, expected", [
    ("{not json", r"train.jsonl:2: expected a JSON object, got invalid JSON"),
    ("[1, 2]", r"train.jsonl:2: expected a JSON object, got list"),
    ({"txt": "a"}, r"train.jsonl:2: expected one of the keys 'text', 'prompt' \+ 'completion' or 'messages', got "
                   r"keys \['txt'\]"),
    ({"text": 3}, r"train.jsonl:2: expected 'text' as a string, got int"),
    ({"prompt": "a"}, r"train.jsonl:2: expected 'prompt' and 'completion' as strings, got str and NoneType"),
    ({"messages": []}, r"train.jsonl:2: expected 'messages' as a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"train.jsonl:2: expected an assistant message to train on "
                                                        r"with mask_prompt, got roles user"),
])
def test_bad_lines_are_named_by_file_and_line(tiny_lm, tmp_path, line, expected):
    tok = load_tokenizer(tiny_lm("llama"))
    data = write(tmp_path / "d", "train", [LINES[0], line])
    with pytest.raises(ValueError, match=r"^\[load_datasets\] .*" + expected) as info:
        load_datasets(data, tok, mask_prompt=True)
    assert "\n" not in str(info.value)


def test_bad_folders_and_arguments(tiny_lm, tmp_path):
    tok = load_tokenizer(tiny_lm("llama"))
    with pytest.raises(ValueError, match=r"expected a folder of train/valid/test .jsonl files"):
        load_datasets(tmp_path / "nowhere", tok)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "valid.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"valid.jsonl: expected at least one example, got an empty file"):
        load_datasets(tmp_path / "e", tok)
    with pytest.raises(ValueError, match=r"\[load_datasets\] expected a mlx_zeta.lm Tokenizer"):
        load_datasets(tmp_path / "e", "tok")
    with pytest.raises(ValueError, match=r"\[Batches\] expected a TextDataset"):
        Batches([([1, 2], 0)], 2)
    with pytest.raises(ValueError, match=r"\[Batches\] expected batch_size"):
        Batches(dataset([3]), 0)
    with pytest.raises(ValueError, match=r"\[TextDataset\] expected examples of at least 2 ids"):
        TextDataset([([1], 0)])


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_lm, tmp_path):
    """The generation prompt here is not what the template writes before an answer: no honest mask."""
    tok = load_tokenizer(tiny_lm("llama"))
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}ANSWER:{% endif %}")
    with pytest.raises(ValueError, match=r"train.jsonl:1: expected the chat template's rendering of the turns before "
                                         r"the last assistant turn .* to be a prefix of the whole chat's"):
        load_datasets(write(tmp_path / "d", "train", [LINES[1]]), tok, mask_prompt=True)
