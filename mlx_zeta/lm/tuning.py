r"""Fine-tune a causal LM on a folder of JSON-lines data: LoRA, DoRA (also on a quantized base:
QLoRA) or every float parameter, on the :class:`~mlx_zeta.training.Trainer`.

The loss of a batch ``(inputs, targets, mask)`` (:mod:`mlx_zeta.lm.datasets`) is the mean
cross-entropy over the positions the mask keeps,

.. math::

    \mathcal{L} = \frac{\sum_{b,j} m_{bj}\,\big(-\log \operatorname{softmax}(z_{bj})_{y_{bj}}\big)}
                       {\max(1, \sum_{b,j} m_{bj})},

with :math:`z` the model's logits for ``inputs`` and :math:`y` the targets; a masked position
adds nothing to the loss or its gradient. With gradient accumulation the Trainer averages the
micro-batches' losses (each a mean over its own tokens). :func:`evaluate` weights every token
of the evaluated batches alike; perplexity is :math:`\exp` of that mean.

Fine-tuning needs a pretrained checkpoint and a data folder, so this is shown, not run:

.. code-block:: python

    from mlx_zeta.converters import quantize
    from mlx_zeta.lm import load, train

    model, tokenizer = load("path/to/model")
    quantize(model, 4, group_size=64)                       # QLoRA: a 4-bit frozen base
    result = train(model, tokenizer, "data/", iters=600, adapter_path="adapters/", mask_prompt=True)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, TextIO, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_zeta.common import check_choice, check_int, check_positive, check_sizes
from mlx_zeta.converters.pretrained import save_pretrained, task_of
from mlx_zeta.structs.attention_layers import AttentionLayers
from mlx_zeta.training import Trainer
from mlx_zeta.training.adapters import apply_adapters, save_adapters

from .datasets import Batch, Batches, TextDataset, load_datasets, trained_tokens
from .tokenizer import Tokenizer, check_tokenizer

__all__ = ["loss", "evaluate", "perplexity", "train", "set_grad_checkpoint", "FINE_TUNE_TYPES"]

FINE_TUNE_TYPES = ("lora", "dora", "full")
CHECKPOINTS = "checkpoints"


def _loss_terms(model: nn.Module, batch: Batch):
    """(sum of the kept positions' cross-entropy, their count), float32 scalars."""
    inputs, targets, mask = batch
    logits = model(inputs).astype(mx.float32)  # (batch, L, vocab)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")  # (batch, L)
    mask = mask.astype(mx.float32)
    return (ce * mask).sum(), mask.sum()


def loss(model: nn.Module, batch: Batch) -> mx.array:
    """Masked mean cross-entropy of ``batch = (inputs, targets, mask)`` (see the module docstring)."""
    total, count = _loss_terms(model, batch)
    return total / mx.maximum(count, 1.0)


def evaluate(model: nn.Module, dataset: TextDataset, batch_size: int, num_batches: Optional[int] = None) -> float:
    """Mean cross-entropy per kept token over the first ``num_batches`` batches (length order, not
    shuffled; ``None``: all) of ``dataset``, with the model in eval mode (its mode restored)."""
    check_int("evaluate", "num_batches", num_batches, 1, optional=True)
    data = Batches(dataset, batch_size, shuffle=False)
    n = len(data) if num_batches is None else min(num_batches, len(data))
    was_training = model.training
    model.eval()
    total = count = 0.0
    try:
        for i in range(n):
            s, c = _loss_terms(model, data(i))
            mx.eval(s, c)
            total, count = total + s.item(), count + c.item()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"[evaluate] expected tokens to score in {dataset.name}, got none (every position masked)")
    return total / count


def perplexity(model: nn.Module, dataset: TextDataset, batch_size: int, num_batches: Optional[int] = None) -> float:
    """:math:`\\exp` of :func:`evaluate`."""
    return math.exp(evaluate(model, dataset, batch_size, num_batches))


def set_grad_checkpoint(model: nn.Module, on: bool = True) -> int:
    """Switch gradient checkpointing (``AttentionLayers.checkpoint``: each block's activations
    recomputed in the backward pass) on or off in every stack of ``model``; returns how many stacks."""
    stacks = [m for _, m in model.named_modules() if isinstance(m, AttentionLayers)]
    for stack in stacks:
        stack.checkpoint = bool(on)
    return len(stacks)


def _prepare(model: nn.Module, fine_tune_type: str, adapter: Dict[str, Any]) -> list:
    """Make the right parameters trainable: adapters (their paths returned), or every float one."""
    if fine_tune_type != "full":
        return apply_adapters(model, dora=fine_tune_type == "dora", **adapter)
    if adapter:
        raise ValueError(f"[train] expected no adapter settings with fine_tune_type='full', got {sorted(adapter)}")
    fixed = sorted(k for k, v in tree_flatten(model.parameters()) if not mx.issubdtype(v.dtype, mx.floating))
    if fixed:
        raise ValueError(f"[train] fine_tune_type='full' trains every parameter, but {fixed[0]} ({len(fixed)} in "
                         "all) is not floating point (a quantized model): use 'lora' or 'dora' (QLoRA)")
    model.unfreeze()
    return []


def _check(model: nn.Module, tokenizer: Tokenizer, fine_tune_type: str, dropout: Optional[float],
           grad_checkpoint: bool) -> None:
    check_tokenizer("train", tokenizer)
    check_choice("train", "fine_tune_type", fine_tune_type, FINE_TUNE_TYPES)
    if task_of(model) not in (None, "causal-lm"):
        raise ValueError(f"[train] expected a causal language model, got one whose task is {task_of(model)!r}")
    if grad_checkpoint and (dropout or 0) > 0:  # the recomputation would draw other dropout masks than the forward pass
        raise ValueError(f"[train] expected dropout=0 with grad_checkpoint (recomputed blocks would draw new dropout "
                         f"masks), got dropout={dropout}")


def _split(datasets: Dict[str, TextDataset], name: str, data_dir: Any) -> TextDataset:
    if name not in datasets:
        raise ValueError(f"[train] expected {Path(data_dir) / (name + '.jsonl')}, not found")
    return datasets[name]


def _trainer(model, data, valid, *, learning_rate, batch_size, val_batches, steps_per_eval, adapter_path,
             save_every, resume, grad_accum, max_grad_norm, log_path, progress, stream, config) -> Trainer:
    eval_fn = None
    if valid is not None and steps_per_eval is not None:
        def eval_fn(m):
            return {"val_loss": evaluate(m, valid, batch_size, val_batches)}
    optimizer = optim.Adam(learning_rate=learning_rate, bias_correction=True)
    return Trainer(model, optimizer, data, loss_fn=loss, grad_accum_steps=grad_accum, max_grad_norm=max_grad_norm,
                   eval_fn=eval_fn, eval_every=steps_per_eval if eval_fn else None, log_path=log_path,
                   progress=progress, stream=stream, checkpoint_dir=str(Path(adapter_path) / CHECKPOINTS),
                   checkpoint_every=save_every, resume=resume, config=config, group=None, tokens_fn=trained_tokens,
                   checkpoint_trainable_only=config["fine_tune_type"] != "full")


def train(model: nn.Module, tokenizer: Tokenizer, data_dir: Union[str, os.PathLike], *,
          fine_tune_type: str = "lora", rank: Optional[int] = None, scale: Optional[float] = None,
          alpha: Optional[float] = None, dropout: Optional[float] = None, num_layers: Optional[int] = None,
          targets: Optional[Sequence[str]] = None, iters: int = 1000, batch_size: int = 4,
          learning_rate: Union[float, Callable[[mx.array], mx.array]] = 1e-5, mask_prompt: bool = False,
          max_seq_len: int = 2048, pack: bool = False, grad_checkpoint: bool = False, grad_accum: int = 1,
          max_grad_norm: Optional[float] = None, adapter_path: Union[str, os.PathLike] = "adapters",
          resume: bool = False, steps_per_eval: Optional[int] = 200, val_batches: Optional[int] = 25,
          save_every: Optional[int] = 100, test: bool = False, test_batches: Optional[int] = None, seed: int = 0,
          log_path: Optional[str] = None, progress: Optional[bool] = None, stream: Optional[TextIO] = None
          ) -> Dict[str, Any]:
    """Fine-tune ``model`` (in place) on ``data_dir`` and save the result to ``adapter_path``.

    Args:
        model (nn.Module): a causal LM (e.g. from :func:`~mlx_zeta.lm.load`), float or quantized (QLoRA).
        tokenizer (Tokenizer): its tokenizer (formats the data: :func:`~mlx_zeta.lm.datasets.load_datasets`).
        data_dir: folder with ``train.jsonl`` and optionally ``valid.jsonl``, ``test.jsonl``.
        fine_tune_type (str): ``"lora"``, ``"dora"`` (:func:`~mlx_zeta.training.adapters.apply_adapters`
            with ``rank``, ``scale`` or ``alpha``, ``dropout``, ``num_layers``, ``targets``; ``None``
            takes its default) or ``"full"`` (every parameter; a float model only). Default: ``"lora"``.
        iters (int): optimizer steps.
        batch_size (int): rows per micro-batch.
        learning_rate: Adam's (a float or a schedule).
        grad_accum (int): micro-batches per step.
        max_grad_norm: clipping.
        mask_prompt (bool): the data (see :mod:`mlx_zeta.lm.datasets`), as ``max_seq_len`` and ``pack``.
        max_seq_len (int): the data, capped at the model's own for learned absolute positions (GPT-2).
        pack (bool): the data (see :mod:`mlx_zeta.lm.datasets`).
        grad_checkpoint (bool): recompute each block in the backward pass (needs ``dropout=0``).
        adapter_path: the output folder; checkpoints go to ``<adapter_path>/checkpoints`` every
            ``save_every`` steps and at the end (trainable parameters and optimizer state only).
        resume (bool): continue from the latest checkpoint there; equals the uninterrupted run bit for bit.
        steps_per_eval (int, optional): the validation loss on the first ``val_batches`` batches of
            ``valid`` every ``steps_per_eval`` steps and before the first step.
        val_batches (int, optional): see ``steps_per_eval``.
        test (bool): the test loss and perplexity after training, on ``test_batches`` batches.
        test_batches (int, optional): see ``test``.
        seed (int): MLX's random state (adapter init, dropout) and the batch order.
        log_path, progress, stream: the Trainer's JSON-lines log, progress bar and output stream.

    Returns:
        dict: ``adapter_path``, ``modules`` (adapted paths), ``steps``, ``train_losses`` (this call's),
        ``val_losses`` (``[(step, loss)]``, step 0 before training), ``test_loss``/``test_perplexity``
        (with ``test``). The adapters (:func:`~mlx_zeta.training.adapters.save_adapters`) or, for
        ``"full"``, the model (:func:`~mlx_zeta.converters.save_pretrained`) are in ``adapter_path``.
    """
    _check(model, tokenizer, fine_tune_type, dropout, grad_checkpoint)
    check_int("train", "iters", iters, 0)
    check_int("train", "seed", seed, 0)
    check_sizes("train", batch_size=batch_size, grad_accum=grad_accum, steps_per_eval=steps_per_eval,
                val_batches=val_batches, save_every=save_every, test_batches=test_batches)
    check_positive("train", "learning_rate", None if callable(learning_rate) else learning_rate, optional=True)
    if "pos_emb" in model:  # learned absolute positions: no example may be longer than the table
        max_seq_len = min(max_seq_len, model.max_seq_len)
    datasets = load_datasets(data_dir, tokenizer, mask_prompt=mask_prompt, max_seq_len=max_seq_len)
    data = Batches(_split(datasets, "train", data_dir), batch_size, seed=seed, pack=pack)
    valid, tests = datasets.get("valid"), _split(datasets, "test", data_dir) if test else None
    mx.random.seed(seed)
    adapter = dict(rank=rank, scale=scale, alpha=alpha, dropout=dropout, num_layers=num_layers, targets=targets)
    modules = _prepare(model, fine_tune_type, {k: v for k, v in adapter.items() if v is not None})
    if grad_checkpoint:
        set_grad_checkpoint(model)
    config = {"fine_tune_type": fine_tune_type, "iters": iters, "batch_size": batch_size, "mask_prompt": mask_prompt,
              "max_seq_len": max_seq_len, "pack": pack, "grad_accum": grad_accum, "seed": seed,
              "learning_rate": None if callable(learning_rate) else learning_rate, "num_layers": num_layers,
              "targets": None if targets is None else list(targets)}
    trainer = _trainer(model, data, valid, learning_rate=learning_rate, batch_size=batch_size,
                       val_batches=val_batches, steps_per_eval=steps_per_eval, adapter_path=adapter_path,
                       save_every=save_every, resume=resume, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                       log_path=log_path, progress=progress, stream=stream, config=config)
    val_losses = []
    if trainer.eval_fn is not None and trainer.step == 0:
        val_losses.append((0, trainer.evaluate()["val_loss"]))
    losses = trainer.train(iters)
    val_losses += [(r["step"], r["eval"]["val_loss"]) for r in trainer.history if "eval" in r]
    model.eval()
    if fine_tune_type == "full":
        save_pretrained(model, adapter_path)
    else:
        save_adapters(model, adapter_path, config)
    result = {"adapter_path": Path(adapter_path), "modules": modules, "steps": trainer.step, "train_losses": losses,
              "val_losses": val_losses}
    if test:
        result["test_loss"] = evaluate(model, tests, batch_size, test_batches)
        result["test_perplexity"] = math.exp(result["test_loss"])
    return result
