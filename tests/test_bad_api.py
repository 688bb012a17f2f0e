"""Malformed-input corpus, Python API: token ids and prompts for every generate entry point
(AutoregressiveWrapper, XTransformer, T5Model, PalmE), sampling arguments, training data given
to the Trainer, and the functional API's ``validate``. One case per distinct bad input; each
must raise one line that names the class (or function) at fault and what it expected
(``tests/badinput.py``). Before issue 15, out-of-range ids segfaulted or returned garbage, a
failed compiled step broke the model, an exhausted iterator surfaced as a bare StopIteration
and a string batch as an AttributeError."""

import io
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from badinput import api_error

from mlx_zeta import functional as F
from mlx_zeta.models import PalmE, T5Model
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer, XTransformer
from mlx_zeta.training import Trainer

V = 40  # every model's vocabulary


@pytest.fixture(scope="module")
def models() -> dict:
    mx.random.seed(0)
    lm = Transformer(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=16, depth=1, heads=2, rotary_pos_emb=True))
    t5 = T5Model(vocab_size=V, dim=16, depth=1, heads=2, dim_head=8, ff_inner_dim=32)
    t5_bad_start = T5Model(vocab_size=V, dim=16, depth=1, heads=2, dim_head=8, ff_inner_dim=32,
                           decoder_start_token_id=V)
    xt = XTransformer(dim=16, enc_num_tokens=V, enc_depth=1, enc_heads=2, enc_max_seq_len=16, dec_num_tokens=V,
                      dec_depth=1, dec_heads=2, dec_max_seq_len=16)
    palme = PalmE(image_size=16, patch_size=8, encoder_dim=16, encoder_depth=1, encoder_heads=2, num_tokens=V,
                  max_seq_len=16, decoder_dim=16, decoder_depth=1, decoder_heads=2, alibi_num_heads=1,
                  attn_kv_heads=1)
    return dict(ar=AutoregressiveWrapper(lm), t5=t5, t5_bad_start=t5_bad_start, xt=xt, palme=palme)


def ids(*rows) -> mx.array:
    return mx.array(list(rows), mx.int32)


GOOD = ids([1, 2, 3], [4, 5, 6])
IMG = mx.zeros((2, 16, 16, 3))


@dataclass
class Case:
    call: Callable[[dict], Any]  # models -> the failing call
    names: Tuple[str, ...]  # what the message must name
    pattern: str = None


AR_MSG = rf"expected prompt token ids in \[0, {V}\), got"
SHAPE_MSG = r"as integer token ids of shape \(batch, n\) with batch, n >= 1, got"

GENERATION = {
    # token ids, every generate entry point
    "ar-id-far-above-vocab": Case(lambda m: m["ar"].generate(ids([1, 2, 100_000]), 3), ("AutoregressiveWrapper",),
                                  AR_MSG + r" 100000 at \(0, 2\)$"),
    "ar-id-just-above-vocab": Case(lambda m: m["ar"].generate(ids([1, V], [0, 0]), 3), ("AutoregressiveWrapper",),
                                   AR_MSG + rf" {V} at \(0, 1\)$"),
    "ar-negative-id": Case(lambda m: m["ar"].stream(ids([1, 2], [3, -7]), 3), ("AutoregressiveWrapper",),
                           AR_MSG + r" -7 at \(1, 1\)$"),
    "ar-float-ids": Case(lambda m: m["ar"].generate(GOOD.astype(mx.float32), 3), ("AutoregressiveWrapper", "prompt"),
                         SHAPE_MSG + " shape .* and dtype mlx.core.float32$"),
    "ar-rank-1-prompt": Case(lambda m: m["ar"].generate(GOOD[0], 3), ("AutoregressiveWrapper", "prompt"),
                             SHAPE_MSG + r" shape \(3,\)"),
    "ar-empty-prompt": Case(lambda m: m["ar"].generate(mx.zeros((2, 0), mx.int32), 3), ("AutoregressiveWrapper",),
                            SHAPE_MSG + r" shape \(2, 0\)"),
    "ar-empty-batch": Case(lambda m: m["ar"].generate(mx.zeros((0, 3), mx.int32), 3), ("AutoregressiveWrapper",),
                           SHAPE_MSG + r" shape \(0, 3\)"),
    "ar-prompt-as-list": Case(lambda m: m["ar"].generate([[1, 2, 3]], 3), ("AutoregressiveWrapper", "prompt"),
                              SHAPE_MSG + " list$"),
    "xt-src-id-above-vocab": Case(lambda m: m["xt"].generate(ids([1, 99]), ids([0]), 3), ("XTransformer", "src"),
                                  rf"expected src token ids in \[0, {V}\), got 99 at \(0, 1\)$"),
    "xt-negative-start-token": Case(lambda m: m["xt"].generate(GOOD, ids([-1], [0]), 3), ("XTransformer",),
                                    rf"expected start_tokens token ids in \[0, {V}\), got -1 at \(0, 0\)$"),
    "t5-input-id-above-vocab": Case(lambda m: m["t5"].generate(ids([1, 2, 3], [4, 5, 600]), 3), ("T5Model",),
                                    rf"expected input_ids token ids in \[0, {V}\), got 600 at \(1, 2\)$"),
    "t5-float-input-ids": Case(lambda m: m["t5"].stream(GOOD.astype(mx.float16), 3), ("T5Model", "input_ids"),
                               SHAPE_MSG + " .*float16$"),
    "t5-start-token-above-vocab": Case(lambda m: m["t5_bad_start"].generate(GOOD, 3), ("T5Model",),
                                       rf"expected decoder_start_token_id to be a token id in \[0, {V}\), got {V}$"),
    "palme-prompt-id-above-vocab": Case(lambda m: m["palme"].generate(IMG, ids([1, 2], [3, 4000]), 3), ("PalmE",),
                                        rf"expected prompt token ids in \[0, {V}\), got 4000 at \(1, 1\)$"),
    "palme-rank-3-prompt": Case(lambda m: m["palme"].generate(IMG, GOOD[None], 3), ("PalmE", "prompt"),
                                SHAPE_MSG + r" shape \(1, 2, 3\)"),
    # lengths and sampling arguments
    "ar-negative-seq-len": Case(lambda m: m["ar"].generate(GOOD, -1), ("AutoregressiveWrapper", "seq_len"),
                                r"expected seq_len to be an int >= 1, got -1$"),
    "t5-zero-max-new-tokens": Case(lambda m: m["t5"].generate(GOOD, 0), ("T5Model", "max_new_tokens"),
                                   r"expected max_new_tokens to be an int >= 1, got 0$"),
    "ar-nan-temperature": Case(lambda m: m["ar"].generate(GOOD, 3, temperature=float("nan")),
                               ("AutoregressiveWrapper", "temperature"), r"expected temperature to be a number >= 0"),
    "ar-zero-top-p": Case(lambda m: m["ar"].generate(GOOD, 3, top_p=0.0), ("AutoregressiveWrapper", "top_p"),
                          r"0 < top_p <= 1, got 0.0$"),
    "t5-string-top-k": Case(lambda m: m["t5"].generate(GOOD, 3, top_k="5"), ("T5Model", "top_k"),
                            r"expected top_k to be an int >= 1, got '5'$"),
    "t5-string-eos": Case(lambda m: m["t5"].generate(GOOD, 3, eos_token_id="</s>"), ("T5Model", "eos_token_id"),
                          r"expected eos_token_id to be an int or a list of ints, got '</s>'$"),
    "ar-seed-as-key": Case(lambda m: m["ar"].generate(GOOD, 3, key=mx.array([1, 2])), ("AutoregressiveWrapper", "key"),
                           r"expected key to be None or a key from mx.random.key"),
}


@pytest.mark.parametrize("case", sorted(GENERATION))
def test_bad_generation_input(models, case):
    c = GENERATION[case]
    api_error(ValueError, c.call, models, names=c.names, pattern=c.pattern)


# ------------------------------------------------------------------ training data


def lm_trainer(data, **kw) -> Trainer:
    mx.random.seed(0)
    net = Transformer(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2))
    return Trainer(AutoregressiveWrapper(net), optim.SGD(learning_rate=0.1), data, group=None, progress=False,
                   stream=io.StringIO(), **kw)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def regression_trainer(data) -> Trainer:
    return Trainer(nn.Linear(3, 2), optim.SGD(learning_rate=0.1), data, loss_fn=mse, group=None, progress=False,
                   stream=io.StringIO())


TOKENS = mx.zeros((2, 9), mx.int32)
BATCH_MSG = r"^\[Trainer\] expected each batch to be an array, or a tuple, list or dict whose first entry is an array"

TRAINING = {
    "string-batch": Case(lambda: lm_trainer(iter(["a string"])).train(1), ("Trainer", "batch"), BATCH_MSG + ".*got str$"),
    "empty-tuple-batch": Case(lambda: lm_trainer(iter([()])).train(1), ("Trainer",), BATCH_MSG + ".*got an empty tuple$"),
    "dict-of-lists-batch": Case(lambda: lm_trainer(iter([{"tokens": [[1, 2]]}])).train(1), ("Trainer",),
                                BATCH_MSG + ".*got dict whose first entry is list$"),
    "rank-1-token-batch": Case(lambda: lm_trainer(iter([TOKENS[0]])).train(1), ("Trainer", "AutoregressiveWrapper"),
                               r"^\[Trainer\] the loss failed on micro-batch 1 of 1 in step 1: \[AutoregressiveWrapper\] "
                               r"expected integer tokens of shape \(batch, seq\)"),
    "float-token-batch": Case(lambda: lm_trainer(iter([TOKENS.astype(mx.float32)]), compile=False).train(1),
                              ("Trainer", "AutoregressiveWrapper"), r"dtype mlx.core.float32$"),
    "mismatched-inputs-and-targets": Case(lambda: regression_trainer(iter([(mx.zeros((4, 3)), mx.zeros((5, 2)))]))
                                          .train(1), ("Trainer", "broadcast"), r"^\[Trainer\] the loss failed on "),
    "exhausted-iterator": Case(lambda: lm_trainer(iter([TOKENS] * 3), grad_accum_steps=2).train(3), ("Trainer",),
                               r"^\[Trainer\] the data iterator ran out after 3 micro-batches; expected at least 6 "
                               r"\(steps=3 x grad_accum_steps=2\)$"),
    "empty-data": Case(lambda: lm_trainer([]).train_step(), ("Trainer",), r"ran out after 0 micro-batches"),
    "nan-targets": Case(lambda: regression_trainer(iter([(mx.zeros((4, 3)), mx.full((4, 2), float("nan")))])).train(1),
                        ("Trainer", "finite"), r"got loss nan and gradient norm nan; the step was not applied$"),
}


@pytest.mark.parametrize("case", sorted(TRAINING))
def test_bad_training_data(case):
    c = TRAINING[case]
    api_error(ValueError, c.call, names=c.names, pattern=c.pattern)


# ------------------------------------------------------------------ functional validate


def trace_one(shape, init=None, value=None):
    """Trace a net that validates one parameter 'w'."""
    return F.trace(lambda p, x: F.validate(p["w"] if value is None else value, shape, init), mx.random.key(0),
                   mx.zeros((2, 3)))


FUNCTIONAL = {
    "shape-with-a-string": Case(lambda: trace_one(("3", 2)), ("validate", "'w'"),
                                r"expected the shape of parameter 'w' as a tuple of ints >= 0, got \('3', 2\)$"),
    "negative-dimension": Case(lambda: trace_one((3, -2)), ("validate", "shape"), r"got \(3, -2\)$"),
    "shape-as-an-int": Case(lambda: F.validate(mx.zeros((3,)), 3), ("validate", "shape"), r"got 3$"),
    "init-not-callable": Case(lambda: trace_one((3, 2), init=0.02), ("validate", "init", "'w'"),
                              r"expected init of parameter 'w' to be a function init\(key, shape\), got float$"),
    "init-returns-a-list": Case(lambda: trace_one((3,), init=lambda key, shape: [0.0] * 3), ("validate", "'w'"),
                                r"returned list, declared shape \(3,\)$"),
    "parameter-not-an-array": Case(lambda: F.validate([[1.0, 2.0]], (1, 2)), ("validate",),
                                   r"expected a parameter array of shape \(1, 2\), got list$"),
}


@pytest.mark.parametrize("case", sorted(FUNCTIONAL))
def test_bad_functional_input(case):
    c = FUNCTIONAL[case]
    api_error(ValueError, c.call, names=c.names, pattern=c.pattern)
