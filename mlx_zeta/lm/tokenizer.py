"""A checkpoint's tokenizer: text to token ids and back, its special tokens, its chat template,
and a streaming detokenizer that never hands out half a character.

The tokenizer is Hugging Face's ``tokenizers`` library (the Rust core that transformers' "fast"
tokenizers wrap) reading the checkpoint's ``tokenizer.json``; chat templates are rendered with
``jinja2`` in a sandbox, with the same conventions as transformers (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII
text). Both are small, well kept and already what transformers itself runs on, so the
``mlx-zeta[lm]`` extra stays light and needs neither torch nor transformers.

Folders without ``tokenizer.json`` are read from ``vocab.json`` + ``merges.txt`` (byte-level
BPE, GPT-2 style) or ``vocab.txt`` (WordPiece, BERT style); a SentencePiece-only folder
(``tokenizer.model`` / ``spiece.model``) is converted through transformers when it is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from mlx_zeta.common import read_json_object

__all__ = ["Tokenizer", "StreamingDetokenizer", "check_tokenizer", "load_tokenizer", "require"]

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
_EXTRA = "lm"


def require(module: str, extra: str = _EXTRA):
    """Import ``module`` of an optional extra, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"[mlx_zeta.lm] {module} is not installed: pip install 'mlx-zeta[{extra}]'") from e


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json_or_empty(folder: Path, name: str) -> Dict[str, Any]:
    """The JSON object in ``folder / name``, or ``{}`` when the folder has no such file."""
    return read_json_object(folder / name, "Tokenizer") if (folder / name).is_file() else {}


def _chat_template(folder: Path, config: Mapping[str, Any]) -> Optional[str]:
    """The default chat template: ``chat_template.jinja``, ``chat_template.json`` or the
    ``chat_template`` field of tokenizer_config.json (a string, or a list of named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if (folder / "chat_template.json").is_file():
        template = read_json_object(folder / "chat_template.json", "Tokenizer").get("chat_template", template)
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _backend(folder: Path):
    """The ``tokenizers.Tokenizer`` of a folder (see the module docstring for the files read)."""
    tokenizers = require("tokenizers")
    if (folder / "tokenizer.json").is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own Exception subclass for a bad file
            raise ValueError(f"[Tokenizer] {folder / 'tokenizer.json'} could not be read: {e}") from e
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from tokenizers.implementations import ByteLevelBPETokenizer

        return ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))._tokenizer
    if (folder / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = _json_or_empty(folder, "tokenizer_config.json").get("do_lower_case", True)
        return BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=bool(lower))._tokenizer
    if any((folder / name).is_file() for name in ("tokenizer.model", "spiece.model")):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ValueError(f"[Tokenizer] {folder} has only a SentencePiece model: install transformers to convert "
                             "it, or save a tokenizer.json next to it") from e
        return AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
    raise ValueError(f"[Tokenizer] expected tokenizer files in {folder} (tokenizer.json, vocab.json + merges.txt, "
                     "vocab.txt or a SentencePiece model), found none")


class Tokenizer:
    r"""Text to token ids and back for one checkpoint, with its special tokens and chat template.

    Args:
        backend (tokenizers.Tokenizer): the tokenization pipeline (normaliser, pre-tokeniser,
            model, post-processor adding e.g. BOS, decoder). Its padding and truncation are switched off,
            as transformers does for ``encode``.
        special (dict): ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` as text (missing: none).
        chat_template (str, optional): a jinja2 chat template. Default: none.
        clean_up_spaces (bool): decode with transformers' ``clean_up_tokenization_spaces`` (``" ."`` -> ``"."``
            and the like; BERT-style checkpoints set it). Default: ``False``.

    Use :func:`load_tokenizer` to read one from a checkpoint folder.

    Example:
        A byte-level BPE trained here on two lines stands in for a checkpoint's ``tokenizer.json``:

        >>> import os
        >>> from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
        >>> from mlx_zeta.lm import load_tokenizer
        >>> backend = Backend(models.BPE())
        >>> backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> backend.decoder = decoders.ByteLevel()
        >>> trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        >>> backend.train_from_iterator(["héllo 世界", "hello world"], trainer)
        >>> os.makedirs("tiny", exist_ok=True)
        >>> backend.save("tiny/tokenizer.json")
        >>> tok = load_tokenizer("tiny")
        >>> tok.decode(tok.encode("héllo 世界", add_special_tokens=False))
        'héllo 世界'
    """

    def __init__(self, backend: Any, special: Optional[Mapping[str, Optional[str]]] = None,
                 chat_template: Optional[str] = None, clean_up_spaces: bool = False):
        backend.no_padding()  # a tokenizer.json may pad and truncate every encoding to a fixed length
        backend.no_truncation()  # (all-MiniLM-L6-v2's: 128); transformers' encode does neither
        self.backend = backend
        self.special = {k: v for k, v in (special or {}).items() if isinstance(v, str)}
        self.chat_template = chat_template
        self.clean_up_spaces = clean_up_spaces
        self._template = None

    def token_id(self, text: Optional[str]) -> Optional[int]:
        """The id of a token given as text (``None`` when absent)."""
        return None if text is None else self.backend.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.token_id(self.special.get("bos_token"))

    @property
    def eos_token_ids(self) -> tuple:
        """The tokenizer's own end token (the generation config may add more; see :mod:`mlx_zeta.lm.generate`)."""
        eos = self.token_id(self.special.get("eos_token"))
        return () if eos is None else (eos,)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.token_id(self.special.get("pad_token"))

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the post-processor (e.g. adds BOS)."""
        if not isinstance(text, str):
            raise ValueError(f"[Tokenizer] expected text as a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens left out unless ``skip_special_tokens=False``)."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_spaces else text

    def detokenizer(self, skip_special_tokens: bool = True) -> "StreamingDetokenizer":
        """A fresh :class:`StreamingDetokenizer` over this tokenizer."""
        return StreamingDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **variables: Any) -> Union[str, List[int]]:
        """Render ``messages`` (``[{"role": "user", "content": "..."}, ...]``) with the chat template.

        The template sees ``messages``, ``add_generation_prompt``, the special tokens as text
        (``bos_token``, ``eos_token``, ...) and ``variables``. ``tokenize=True`` returns token ids
        (encoded without adding special tokens again: the template writes them).
        """
        if self.chat_template is None:
            raise ValueError("[Tokenizer] this checkpoint has no chat template (chat_template.jinja or "
                             "tokenizer_config.json's chat_template): pass the prompt as plain text")
        _check_messages(messages)
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        context = {**self.special, **variables, "messages": [dict(m) for m in messages],
                   "add_generation_prompt": add_generation_prompt}
        text = self._template.render(**context)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def check_tokenizer(owner: str, tokenizer: Any) -> Tokenizer:
    """``tokenizer`` if it is a :class:`Tokenizer`, else a one-line ``ValueError`` naming ``owner``."""
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"[{owner}] expected a mlx_zeta.lm Tokenizer (from load), got {type(tokenizer).__name__}")
    return tokenizer


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"[Tokenizer] expected messages as a non-empty list of {{'role', 'content'}} dicts, "
                         f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"[Tokenizer] expected messages[{i}] to be a dict with a str 'role' and a 'content', "
                             f"got {m!r:.80}")


_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
              (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text


def _environment():
    """A sandboxed jinja2 environment with the helpers chat templates expect."""
    require("jinja2")
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"[Tokenizer] the chat template refused the messages: {message}")

    def tojson(value, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class StreamingDetokenizer:
    r"""Turn token ids into text one token at a time, handing out only finished text.

    Decoding a single token is wrong in two ways: a byte-level token may hold part of a UTF-8
    character (decoded alone it is U+FFFD), and a SentencePiece token's leading "▁" becomes a
    space only when something precedes it. So each :meth:`add` decodes a short window of
    recent tokens twice, without and with the new ones, and hands out the difference:

    .. math::

        \text{piece} = \text{decode}(t_{p:}) \setminus \text{decode}(t_{p:r})

    where :math:`r` is the number of tokens already handed out and :math:`p` where the window
    starts (the start of the last piece). When the decoded window ends in U+FFFD (a character
    still incomplete) nothing is handed out and the tokens wait for the next ones. So do
    byte-fallback pieces ``<0xNN>`` (SentencePiece-style vocabularies) until a piece of another
    kind ends their run: the ByteFallback decoder turns a run holding any invalid UTF-8 into one
    U+FFFD per byte, its valid characters included, so a byte yet to come may change them.
    :meth:`flush` hands out whatever is left. The concatenated pieces are at every step a prefix of
    ``decode(all tokens so far)`` and, after :meth:`flush`, equal to it.

    Attributes:
        tokens (list[int]): every token added.
        text (str): every piece handed out so far.

    Example:
        With a byte-level BPE that never saw the rocket, "🚀" is four byte tokens:

        >>> from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
        >>> from mlx_zeta.lm import Tokenizer
        >>> backend = Backend(models.BPE())
        >>> backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> backend.decoder = decoders.ByteLevel()
        >>> trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        >>> backend.train_from_iterator(["hello world"], trainer)
        >>> tokenizer = Tokenizer(backend)
        >>> ids = tokenizer.encode("hello 🚀")
        >>> detok = tokenizer.detokenizer()
        >>> [detok.add(t) for t in ids]  # nothing while the character is incomplete
        ['hello', ' ', '', '', '', '🚀']
        >>> detok.flush(), detok.text == tokenizer.decode(ids)
        ('', True)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._decode = lambda ids: tokenizer.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        self._bytes = _byte_fallback_ids(tokenizer.backend)
        added = tokenizer.backend.get_added_tokens_decoder() if self._bytes and skip_special_tokens else {}
        self._skipped = frozenset(i for i, t in added.items() if t.special)  # decode leaves these out
        self.reset()

    def reset(self) -> None:
        """Forget every token (start a new text)."""
        self.tokens: List[int] = []
        self.text = ""
        self._start = self._read = 0  # window start p, tokens handed out r

    def add(self, token: int) -> str:
        """Add one token id; returns the newly finished text (possibly ``""``)."""
        self.tokens.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """Hand out whatever is held back (an incomplete character included, as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.tokens[self._start:self._read])
        after = self._decode(self.tokens[self._start:])
        if len(after) <= len(before) or (not final and (after.endswith(REPLACEMENT) or self._open_byte_run())):
            return ""
        piece = after[len(before):]
        self._start, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def _open_byte_run(self) -> bool:
        """Whether the last token decode sees is a byte-fallback piece (its run may go on)."""
        for token in reversed(self.tokens[self._start:]):
            if token not in self._skipped:
                return token in self._bytes
        return False


def _byte_fallback_ids(backend: Any) -> frozenset:
    """Ids of the ``<0xNN>`` pieces when the decoder has a ByteFallback step, else none."""
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def load_tokenizer(folder: Union[str, os.PathLike]) -> Tokenizer:
    """The :class:`Tokenizer` of a checkpoint folder (see the module docstring for what is read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"[Tokenizer] expected a checkpoint folder, got {folder}")
    config = _json_or_empty(folder, "tokenizer_config.json")
    special_map = _json_or_empty(folder, "special_tokens_map.json")
    special = {name: _token_text(config.get(name, special_map.get(name)))
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return Tokenizer(_backend(folder), special, _chat_template(folder, config),
                     clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)))
