r"""Fine-tuning data: JSON-lines files tokenized into :class:`TextDataset` s, and batches of
right-padded token arrays with a loss mask.

A data folder holds ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (each optional here;
:func:`~mlx_zeta.lm.tuning.train` needs ``train``). Every line is one JSON object in one of
three formats (an optional ``"tools"`` list is handed to the chat template, other keys are ignored):

==========================================  ===============================================================
line                                        tokens (prompt part | completion part)
==========================================  ===============================================================
``{"text": t}``                             | ``encode(t)`` (+ eos unless it ends with one)
``{"prompt": p, "completion": c}``          the chat template of ``[user p]`` with the generation prompt |
                                            the rest of the template of ``[user p, assistant c]``;
                                            without a chat template ``p`` | ``c`` (+ eos)
``{"messages": [...]}``                     the template of the messages before the last assistant turn,
                                            with the generation prompt | the rest of the whole chat
==========================================  ===============================================================

The whole text is tokenized at once (as transformers' ``apply_chat_template(tokenize=True)``);
the prompt part is the longest run of leading ids it shares with the prompt's own encoding, so a
token that straddles the boundary (Llama's ``"▁quick"`` after a template's trailing space)
counts as completion. ``mask_prompt=True`` keeps only the completion's targets in the loss;
the ids themselves never depend on it. A template that rewrites the earlier turns when the
chat grows (the prompt's text not a prefix of the whole) is refused.

Batches (:class:`Batches`, a callable ``data(i)`` for the :class:`~mlx_zeta.training.Trainer`,
and :func:`iterate_batches`): ``(inputs, targets, mask)``, each ``(batch, L)``, for examples
:math:`t_0 \dots t_{n-1}` with prompt length :math:`p`

.. math::

    \text{inputs}_j = t_j,\quad \text{targets}_j = t_{j+1},\quad
    \text{mask}_j = [\, j + 1 \ge p \,],\qquad 0 \le j < n - 1,

right-padded with zeros (mask 0) to ``L``, the longest row rounded up to a multiple of ``pad_to``
(but not past the dataset's ``max_seq_len``).
Examples are sorted by length and cut into batches of neighbours (little padding); the order of
the batches is shuffled with ``seed`` anew each epoch. ``pack=True`` instead concatenates whole
examples into rows of at most ``max_seq_len`` positions: targets never cross an example's end,
but attention does (a plain causal mask over the row, positions continuing), so a packed
example after the first sees the ones before it. That is an approximation, hence opt-in.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from mlx_zeta.common import check_int

from .tokenizer import Tokenizer, check_tokenizer

__all__ = ["TextDataset", "Batches", "load_datasets", "iterate_batches", "trained_tokens", "SPLITS"]

SPLITS = ("train", "valid", "test")
Batch = Tuple[mx.array, mx.array, mx.array]
Example = Tuple[List[int], int]  # (token ids, prompt length)


class TextDataset:
    """Tokenized examples: each ``(ids, prompt_len)``; the first ``prompt_len`` ids are the prompt.

    Args:
        examples (list): ``[(ids, prompt_len), ...]``, ``0 <= prompt_len <= len(ids)``, at least 2 ids each.
        max_seq_len (int): the row length ``Batches`` packs to. Default: ``2048``.
        name (str): where the examples came from (errors and ``repr``). Default: ``"dataset"``.
    """

    def __init__(self, examples: Sequence[Example], max_seq_len: int = 2048, name: str = "dataset"):
        check_int("TextDataset", "max_seq_len", max_seq_len, 1)
        self.examples = [(list(ids), int(p)) for ids, p in examples]
        self.max_seq_len, self.name = max_seq_len, name
        for i, (ids, p) in enumerate(self.examples):
            if len(ids) < 2 or not 0 <= p <= len(ids):
                raise ValueError(f"[TextDataset] expected examples of at least 2 ids with 0 <= prompt_len <= len, got "
                                 f"{len(ids)} ids and prompt_len {p} at example {i} of {name}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def __repr__(self) -> str:
        return f"TextDataset({self.name}, {len(self)} examples)"


# ------------------------------------------------------------------------------------ reading
class _LineError(ValueError):
    """What is wrong with one line (the caller adds the file and line number)."""


def _chat_texts(tokenizer: Tokenizer, messages: list, tools: Any, last: int) -> Tuple[str, str]:
    """(whole chat, prompt): the template of ``messages``, and of ``messages[:last]`` with the
    generation prompt, which must be a prefix of the whole (``""`` when ``last`` is 0)."""
    extra = {} if tools is None else {"tools": tools}
    whole = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **extra)
    if last == 0:
        return whole, ""
    prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, **extra)
    if not whole.startswith(prompt):
        raise _LineError("the chat template's rendering of the turns before the last assistant turn (with the "
                         "generation prompt) to be a prefix of the whole chat's, got a template that rewrites them")
    return whole, prompt


def _tokens(tokenizer: Tokenizer, whole: str, prompt: str, special: bool) -> Example:
    """(ids of ``whole``, how many leading ids it shares with ``prompt``'s own encoding)."""
    ids = tokenizer.encode(whole, add_special_tokens=special)
    head = tokenizer.encode(prompt, add_special_tokens=special)
    shared = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
    return ids, shared if prompt else 0


def _example(tokenizer: Tokenizer, record: Any, mask_prompt: bool) -> Example:
    """(ids, prompt length) of one JSON line."""
    if not isinstance(record, dict):
        raise _LineError(f"a JSON object, got {type(record).__name__}")
    eos = list(tokenizer.eos_token_ids[:1])
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages) or not messages:
            raise _LineError(f"'messages' as a non-empty list of {{'role', 'content'}} objects, got {messages!r:.60}")
        roles = [m.get("role") for m in messages]
        last = max((i for i, r in enumerate(roles) if r == "assistant"), default=None)
        if last is None and mask_prompt:
            raise _LineError(f"an assistant message to train on with mask_prompt, got roles "
                             f"{', '.join(map(str, roles))}")
        return _tokens(tokenizer, *_chat_texts(tokenizer, messages, record.get("tools"), last or 0), special=False)
    if "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not (isinstance(p, str) and isinstance(c, str)):
            raise _LineError(f"'prompt' and 'completion' as strings, got {type(p).__name__} and {type(c).__name__}")
        if tokenizer.has_chat_template:
            chat = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            return _tokens(tokenizer, *_chat_texts(tokenizer, chat, record.get("tools"), 1), special=False)
        ids, shared = _tokens(tokenizer, p + c, p, special=True)
        return ids + eos, shared
    if "text" in record:
        if not isinstance(record["text"], str):
            raise _LineError(f"'text' as a string, got {type(record['text']).__name__}")
        ids = tokenizer.encode(record["text"])
        return (ids + eos if ids[-1:] != eos else ids), 0
    raise _LineError(f"one of the keys 'text', 'prompt' + 'completion' or 'messages', got keys {sorted(record)}")


def _read(file: Path, tokenizer: Tokenizer, mask_prompt: bool, max_seq_len: int) -> TextDataset:
    """The :class:`TextDataset` of one JSON-lines file (blank lines skipped; errors name file:line)."""
    examples, cut = [], 0
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids, prompt_len = _example(tokenizer, json.loads(line), mask_prompt)
            except json.JSONDecodeError as e:
                raise ValueError(f"[load_datasets] {file}:{number}: expected a JSON object, got invalid JSON ({e})") \
                    from None
            except _LineError as e:
                raise ValueError(f"[load_datasets] {file}:{number}: expected {e}") from None
            if len(ids) < 2:
                raise ValueError(f"[load_datasets] {file}:{number}: expected at least 2 tokens, got {len(ids)}")
            if len(ids) > max_seq_len + 1:  # inputs are ids[:-1]: at most max_seq_len positions
                ids, cut = ids[:max_seq_len + 1], cut + 1
            examples.append((ids, min(prompt_len, len(ids)) if mask_prompt else 0))
    if not examples:
        raise ValueError(f"[load_datasets] {file}: expected at least one example, got an empty file")
    if cut:
        warnings.warn(f"[load_datasets] {file}: {cut} examples longer than max_seq_len={max_seq_len} were truncated",
                      stacklevel=3)
    return TextDataset(examples, max_seq_len, str(file))


def load_datasets(data_dir: Union[str, os.PathLike], tokenizer: Tokenizer, *, mask_prompt: bool = False,
                  max_seq_len: int = 2048) -> Dict[str, TextDataset]:
    """``{"train", "valid", "test"}`` -> :class:`TextDataset` of the folder's ``<split>.jsonl`` files
    (a missing file is left out; see the module docstring for the line formats).

    Args:
        data_dir (str or os.PathLike): the folder.
        tokenizer (Tokenizer): the checkpoint's (its chat template formats prompts and chats).
        mask_prompt (bool): train on the completions only (the prompt part's loss mask is 0). Default: ``False``.
        max_seq_len (int): longer examples are cut to ``max_seq_len`` input positions (a warning
            counts them); also the row length of packing. Default: ``2048``.

    Raises ``ValueError`` naming the file and line of a malformed example.
    """
    check_tokenizer("load_datasets", tokenizer)
    check_int("load_datasets", "max_seq_len", max_seq_len, 1)
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"[load_datasets] expected a folder of train/valid/test .jsonl files, got {folder}")
    return {split: _read(folder / f"{split}.jsonl", tokenizer, bool(mask_prompt), max_seq_len)
            for split in SPLITS if (folder / f"{split}.jsonl").is_file()}


# ------------------------------------------------------------------------------------ batching
def _rows(dataset: TextDataset, pack: bool) -> List[List[int]]:
    """Example indices per row: one each, sorted by length; or packed greedily (in length order,
    first fit into the current row) up to ``dataset.max_seq_len`` positions."""
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset[i][0]), i))
    if not pack:
        return [[i] for i in order]
    rows, width = [[]], 0
    for i in order:
        n = len(dataset[i][0]) - 1  # positions it takes
        if rows[-1] and width + n > dataset.max_seq_len:
            rows.append([])
            width = 0
        rows[-1].append(i)
        width += n
    return rows


def _row_arrays(dataset: TextDataset, row: List[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask) of one row: its examples' shifted pairs, back to back."""
    inputs, targets, mask = [], [], []
    for i in row:
        ids, p = dataset[i]
        inputs += ids[:-1]
        targets += ids[1:]
        mask += [j + 1 >= p for j in range(len(ids) - 1)]
    return np.array(inputs, np.int32), np.array(targets, np.int32), np.array(mask, bool)


class Batches:
    """``data(i)`` -> micro-batch ``i`` (see the module docstring): deterministic in ``i`` and
    ``seed``, so a resumed :class:`~mlx_zeta.training.Trainer` asks for the very batches it missed.

    Args:
        dataset (TextDataset): the examples.
        batch_size (int): rows per batch (the last batch of an epoch may have fewer).
        seed (int): shuffles the batch order, anew for each epoch ``i // len(self)``. Default: ``0``.
        pack (bool): pack examples into rows of ``dataset.max_seq_len`` (an approximation, see above).
            Default: ``False``.
        shuffle (bool): ``False`` keeps the batches in length order (evaluation). Default: ``True``.
        pad_to (int): round each batch's length up to a multiple of this (fewer compiled shapes). Default: ``8``.
    """

    def __init__(self, dataset: TextDataset, batch_size: int, *, seed: int = 0, pack: bool = False,
                 shuffle: bool = True, pad_to: int = 8):
        if not isinstance(dataset, TextDataset):
            raise ValueError(f"[Batches] expected a TextDataset (from load_datasets), got {type(dataset).__name__}")
        check_int("Batches", "batch_size", batch_size, 1)
        check_int("Batches", "seed", seed, 0)
        check_int("Batches", "pad_to", pad_to, 1)
        rows = _rows(dataset, pack)
        self.dataset, self.seed, self.shuffle, self.pad_to = dataset, seed, shuffle, pad_to
        self.batches = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.batches)

    def __call__(self, i: int) -> Batch:
        check_int("Batches", "i", i, 0)
        epoch, k = divmod(i, len(self))
        if self.shuffle:
            k = int(np.random.default_rng([self.seed, epoch]).permutation(len(self))[k])
        arrays = [_row_arrays(self.dataset, row) for row in self.batches[k]]
        longest = max(len(a[0]) for a in arrays)
        width = max(min(self.pad_to * math.ceil(longest / self.pad_to), self.dataset.max_seq_len), longest)
        out = [np.zeros((len(arrays), width), dtype) for dtype in (np.int32, np.int32, bool)]
        for r, row in enumerate(arrays):
            for o, a in zip(out, row):
                o[r, :len(a)] = a
        return tuple(mx.array(o) for o in out)


def iterate_batches(dataset: TextDataset, batch_size: int, *, seed: int = 0, pack: bool = False,
                    shuffle: bool = True, epochs: Optional[int] = None) -> Iterator[Batch]:
    """The batches ``data(0), data(1), ...`` of :class:`Batches` for ``epochs`` epochs (``None``: forever)."""
    data = Batches(dataset, batch_size, seed=seed, pack=pack, shuffle=shuffle)
    i = 0
    while epochs is None or i < epochs * len(data):
        yield data(i)
        i += 1


def trained_tokens(batch: Batch) -> int:
    """Positions of a batch in the loss (its mask's count): the Trainer's tokens per second."""
    return int(batch[2].sum().item())
