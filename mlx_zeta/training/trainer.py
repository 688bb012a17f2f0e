"""A small training loop for MLX modules: compiled steps, gradient accumulation and
clipping, learning-rate schedules, mixed precision, evaluation, logging, checkpoints
and data-parallel gradient averaging."""

import json
import math
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, TextIO, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_reduce

from mlx_zeta.common import check_choice, check_int, check_positive
from mlx_zeta.training.mixed_precision import COMPUTE_DTYPES, DynamicLossScaler, all_finite, cast_floating

__all__ = ["Trainer"]

Batch = Any
LossFn = Callable[[nn.Module, Batch], mx.array]


def default_loss(model: nn.Module, batch: Batch) -> mx.array:
    """``model(batch)`` (e.g. an AutoregressiveWrapper's loss); tuples are unpacked, dicts passed as keywords."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def count_tokens(batch: Batch) -> int:
    """Elements of the batch's first array (tokens for a (batch, seq) token array).

    Raises ``ValueError`` naming the Trainer when the batch is not an array, or a non-empty
    tuple, list or dict whose first entry is one (an array: anything with ``shape`` and ``size``)."""
    first = batch
    if isinstance(batch, dict):
        first = next(iter(batch.values()), None)
    elif isinstance(batch, (tuple, list)):
        first = batch[0] if batch else None
    if not (hasattr(first, "shape") and isinstance(getattr(first, "size", None), int)):
        kind = type(batch).__name__
        got = (kind if first is batch else f"an empty {kind}" if not batch
               else f"{kind} whose first entry is {type(first).__name__}")
        raise ValueError(f"[Trainer] expected each batch to be an array, or a tuple, list or dict whose first entry is "
                         f"an array (model(batch) with the default loss_fn), got {got}")
    return int(first.size)


def _copy_tree(tree: Any) -> Any:
    """New dicts and lists around the same leaves (arrays are immutable, so this is a snapshot)."""
    if isinstance(tree, dict):
        return {k: _copy_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy_tree(v) for v in tree)
    return tree


def _restore_tree(live: Any, saved: Any) -> None:
    """Put ``saved`` (from :func:`_copy_tree`) back into the dict or list ``live`` in place: compiled
    functions hold the live containers themselves, so they are refilled, not replaced (a tuple,
    which cannot be refilled, is replaced by its saved copy in its parent)."""
    if isinstance(live, dict):
        for k in [k for k in live if k not in saved]:
            del live[k]
        items = saved.items()
    else:
        del live[len(saved):]
        live.extend(saved[len(live):])
        items = enumerate(saved)
    for k, v in items:
        if isinstance(v, (dict, list)) and type(live[k]) is type(v):
            _restore_tree(live[k], v)
        else:
            live[k] = v


def _global_norm(grads: Any) -> mx.array:
    return mx.sqrt(tree_reduce(lambda acc, g: acc + g.astype(mx.float32).square().sum(), grads, mx.array(0.0)))


class Trainer:
    r"""Train ``model`` with ``optimizer`` on batches from ``data``.

    One optimizer step averages the gradients of ``grad_accum_steps`` micro-batches,

    .. math::

        g = \frac{1}{N}\sum_{k=1}^{N} \nabla_\theta \mathcal{L}(\theta; b_k),\qquad
        g \leftarrow g \cdot \min\!\Big(1, \frac{c}{\lVert g \rVert_2 + 10^{-6}}\Big),

    then (across ranks, when a distributed group of size > 1 is present) averages
    :math:`g` over the ranks, clips it to global norm :math:`c` = ``max_grad_norm``
    (``mlx.optimizers.clip_grad_norm``) and calls ``optimizer.update``. With equal-size
    micro-batches and a mean loss this equals one step on their concatenation. The
    learning rate is the optimizer's (a float or a schedule such as :func:`warmup_cosine`).

    The micro-batch gradient and the update are each an ``mx.compile`` d function
    (``compile=False`` runs them eagerly, e.g. for debugging or models with
    data-dependent Python control flow).

    Mixed precision (``precision="bfloat16"`` or ``"float16"``): the forward and backward
    passes run on a copy of the trainable weights in that dtype; the gradients are cast
    back to float32 and the float32 master weights and optimizer state are updated (see
    :mod:`mlx_zeta.training.mixed_precision` for the trade-offs). ``"float16"`` adds
    dynamic loss scaling: a step whose gradients are not finite is skipped.

    Data and resuming: ``data`` is either an iterable of micro-batches or a callable
    ``data(i)`` returning micro-batch ``i`` (``i = step * grad_accum_steps + k``). With
    ``resume=True`` the latest checkpoint in ``checkpoint_dir`` restores the weights,
    optimizer state, MLX's global random state and the step, then the Trainer
    re-positions the data: a callable is simply asked for the next index; an iterable
    (which must be a fresh one that yields the same sequence, e.g. from the same seed)
    is fast-forwarded by the ``step * grad_accum_steps`` micro-batches already consumed.
    Either way, training 100 steps equals training 50, stopping and resuming for 50.

    A step that fails (a bad batch, a loss or gradient norm that is NaN or infinite, Ctrl-C
    during the forward and backward passes) leaves the model's parameters, the optimizer
    state, the loss scaler, MLX's global random state and the step as they were before it,
    under ``compile=True`` too, so training can go on: a good step after a failed one equals
    that good step alone. The loss and gradient norm are read back once per step, before the
    update is built, so a non-finite one never reaches the weights (float16 loss scaling skips
    such a step instead, by design); the snapshot is dropped before the update runs, so MLX
    may still reuse the old weights' buffers for the new ones. Micro-batches drawn from an
    iterator are gone (it cannot be rewound); a callable ``data`` is asked for the same
    indices again. A batch the default ``tokens_fn`` cannot count, or an iterator that runs
    out, raises a one-line ``ValueError`` naming the Trainer.

    Logging (rank 0 only): every ``log_every`` steps a record ``{"step", "loss", "lr",
    "grad_norm", "tokens_per_s", "time"}`` (plus ``"loss_scale"`` for float16) is
    appended as a JSON line to ``log_path`` when given; on a terminal a tqdm progress bar
    shows loss, tokens/s and learning rate, otherwise the records are written as JSON
    lines to ``stream`` (default stdout). Every ``eval_every`` steps ``eval_fn(model)``
    runs with the model in eval mode and its metrics are logged as ``{"step", "eval"}``.

    Args:
        model (nn.Module): the model; its trainable float32 parameters are the masters.
        optimizer (mlx.optimizers.Optimizer): any MLX optimizer.
        data (Iterable or Callable): micro-batches, see above.
        loss_fn (callable, optional): ``loss_fn(model, batch) -> scalar``. Default:
            ``model(batch)`` (tuples unpacked, dicts as keywords).
        grad_accum_steps (int): micro-batches per optimizer step. Default: ``1``.
        max_grad_norm (float, optional): clip the global gradient norm. Default: off.
        precision (str): ``"float32"``, ``"bfloat16"`` or ``"float16"``. Default: ``"float32"``.
        compile (bool): compile the gradient and update functions. Default: ``True``.
        eval_fn (callable, optional): ``eval_fn(model) -> dict`` of metrics.
        eval_every (int): the period of ``eval_fn`` in steps.
        log_every (int): steps between log records. Default: ``1``.
        log_path (str, optional): JSON-lines log file (appended).
        progress (bool, optional): force the progress bar on/off (default: when ``stream`` is a terminal).
        checkpoint_dir (str, optional): checkpoints through :func:`~mlx_zeta.training.save_checkpoint`
            every ``checkpoint_every`` steps and at the end of :meth:`train`, in this folder.
        checkpoint_every (int, optional): the checkpoint period in steps.
        resume (bool): continue from the latest checkpoint in ``checkpoint_dir``.
        config (dict): stored with the checkpoints.
        checkpoint_trainable_only (bool): checkpoints hold the trainable parameters only (adapters
            on a frozen base; the base is the caller's to rebuild before resuming). Default: ``False``.
        group (optional): an ``mx.distributed`` group; default :func:`~mlx_zeta.training.world`.
        tokens_fn (callable): tokens in a micro-batch, for tokens/s. Default: elements of its first array.

    Example:
        A tiny causal LM learns one random batch by heart in 20 steps:

        >>> import io
        >>> import mlx.core as mx
        >>> import mlx.optimizers
        >>> from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer
        >>> from mlx_zeta.training import Trainer, warmup_cosine
        >>> mx.random.seed(0)
        >>> model = AutoregressiveWrapper(Transformer(num_tokens=64, max_seq_len=32,
        ...                               attn_layers=Decoder(dim=32, depth=2, heads=4)))
        >>> opt = mlx.optimizers.AdamW(learning_rate=warmup_cosine(1e-2, 5, 20), bias_correction=True)
        >>> batch = mx.random.randint(0, 64, (2, 17))
        >>> log = io.StringIO()  # the JSON-lines records, here kept off the screen
        >>> losses = Trainer(model, opt, data=lambda i: batch, max_grad_norm=1.0, stream=log).train(20)
        >>> len(losses), losses[-1] < losses[0] / 2
        (20, True)
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, data: Union[Iterable[Batch], Callable[[int], Batch]],
                 loss_fn: Optional[LossFn] = None, grad_accum_steps: int = 1, max_grad_norm: Optional[float] = None,
                 precision: str = "float32", compile: bool = True,
                 eval_fn: Optional[Callable[[nn.Module], Dict[str, Any]]] = None, eval_every: Optional[int] = None,
                 log_every: int = 1, log_path: Optional[str] = None, progress: Optional[bool] = None,
                 stream: Optional[TextIO] = None, checkpoint_dir: Optional[str] = None,
                 checkpoint_every: Optional[int] = None, resume: bool = False, config: Optional[dict] = None,
                 group: Any = "auto", tokens_fn: Callable[[Batch], int] = count_tokens,
                 checkpoint_trainable_only: bool = False):
        for what, value in (("grad_accum_steps", grad_accum_steps), ("log_every", log_every),
                            ("eval_every", eval_every or 1), ("checkpoint_every", checkpoint_every or 1)):
            check_int("Trainer", what, value, 1)
        check_choice("Trainer", "precision", precision, sorted(COMPUTE_DTYPES))
        check_positive("Trainer", "max_grad_norm", max_grad_norm, optional=True)
        if (eval_fn is None) != (eval_every is None):
            raise ValueError("[Trainer] expected eval_fn and eval_every together (or neither)")
        if (checkpoint_every is not None or resume) and checkpoint_dir is None:
            raise ValueError("[Trainer] expected checkpoint_dir with checkpoint_every or resume=True")
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or default_loss
        self.grad_accum_steps, self.max_grad_norm = grad_accum_steps, max_grad_norm
        self.compute_dtype = COMPUTE_DTYPES[precision]
        self.scaler = DynamicLossScaler() if precision == "float16" else None
        self.eval_fn, self.eval_every = eval_fn, eval_every
        self.log_every, self.log_path, self.tokens_fn = log_every, log_path, tokens_fn
        self.stream = stream or sys.stdout
        self.progress = progress
        self.checkpoint_dir, self.checkpoint_every, self.config = checkpoint_dir, checkpoint_every, dict(config or {})
        self.checkpoint_trainable_only = bool(checkpoint_trainable_only)
        if group == "auto":
            from mlx_zeta.training.distributed import world
            group = world()
        self.group = group if group is not None and group.size() > 1 else None
        self.is_main = self.group is None or self.group.rank() == 0
        self.step = 0
        self._saved_step = -1
        self.history: List[Dict[str, Any]] = []  # every logged record, training and eval
        self._data_fn = data if callable(data) and not hasattr(data, "__iter__") else None
        self._data_iter = None if self._data_fn is not None else iter(data)
        self._consumed = 0  # micro-batches taken from the data so far
        self._goal = 0  # the steps train() was asked for (named when the data runs out)

        self.model.train()
        self.optimizer.init(self.model.trainable_parameters())
        if resume:
            from mlx_zeta.training.checkpoint import load_checkpoint
            info = load_checkpoint(checkpoint_dir, self.model, self.optimizer)
            self.step = self._saved_step = int(info["step"])
            self.optimizer.init(self.model.trainable_parameters())  # marks the loaded state initialised
            extra = info.get("extra") or {}
            if self.scaler is not None and "loss_scaler" in extra:
                self.scaler.load_state_dict(extra["loss_scaler"])
            if self._data_iter is not None:  # fast-forward past the consumed micro-batches
                for _ in range(self.step * grad_accum_steps):
                    self._next_batch()
            self._consumed = self.step * grad_accum_steps

        self._grad_fn, self._apply_fn = self._micro_grads, self._apply
        if compile:
            self._grad_fn = mx.compile(self._micro_grads, inputs=[mx.random.state], outputs=[mx.random.state])
            state = [self.model.state, self.optimizer.state]
            self._apply_fn = mx.compile(self._apply, inputs=state, outputs=state)

    # ------------------------------------------------------------------ one step

    def _micro_grads(self, params: dict, batch: Batch, scale: mx.array):
        """(loss, float32 gradients) of one micro-batch at the master ``params``."""
        def scaled_loss(p):
            self.model.update(p)
            return self.loss_fn(self.model, batch).astype(mx.float32) * scale

        if self.compute_dtype != mx.float32:
            params = cast_floating(params, self.compute_dtype)  # the low-precision working copy
        loss, grads = mx.value_and_grad(scaled_loss)(params)
        grads = tree_map(lambda g: g.astype(mx.float32) / scale, grads)
        return loss / scale, grads

    def _apply(self, grads: dict):
        """Clip (when asked) and apply the averaged float32 gradients; returns their global norm."""
        if self.max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, self.max_grad_norm)
        else:
            norm = _global_norm(grads)
        self.optimizer.update(self.model, grads)
        return norm

    def _next_batch(self) -> Batch:
        """The next micro-batch (an iterator that runs out is named with the steps asked for)."""
        if self._data_fn is not None:
            batch = self._data_fn(self._consumed)
        else:
            try:
                batch = next(self._data_iter)
            except StopIteration:
                steps = max(self._goal, self.step + 1)
                raise ValueError(f"[Trainer] the data iterator ran out after {self._consumed} micro-batches; expected "
                                 f"at least {steps * self.grad_accum_steps} (steps={steps} x grad_accum_steps="
                                 f"{self.grad_accum_steps})") from None
        self._consumed += 1
        return batch

    def _snapshot(self) -> tuple:
        """Everything a step changes, to put back if it fails."""
        scaler = None if self.scaler is None else self.scaler.state_dict()
        return (_copy_tree(self.model.parameters()), _copy_tree(self.optimizer.state), mx.random.state[0], scaler,
                self._consumed)

    def _restore(self, saved: tuple) -> None:
        params, opt_state, rng, scaler, consumed = saved
        self.model.update(params)
        _restore_tree(self.optimizer.state, opt_state)
        high, low = (int(v) for v in rng.tolist())
        mx.random.seed((high << 32) | low)  # seed(s) sets the key (s >> 32, s & 0xFFFFFFFF): the saved key back
        if scaler is not None:
            self.scaler.load_state_dict(scaler)
        if self._data_fn is not None:  # a callable is asked for the same micro-batches again
            self._consumed = consumed

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its log record.

        If it raises, the model, optimizer, loss scaler, random state and step are left as before it."""
        start = time.perf_counter()
        saved = self._snapshot()
        try:
            loss, grads, tokens = self._gradients()
            applied, norm = self._update(loss, grads)  # builds the update; nothing is computed yet
        except BaseException:
            self._restore(saved)
            raise
        del saved, grads  # the old weights and moments are now held by the update's graph alone: MLX may reuse them
        mx.eval(loss, norm, self.model.state, self.optimizer.state)
        self.step += 1
        elapsed = time.perf_counter() - start
        record = dict(step=self.step, loss=loss.item(), lr=float(self.optimizer.learning_rate.item()),
                      grad_norm=norm.item(), tokens_per_s=tokens / elapsed, time=elapsed)
        if self.scaler is not None:
            record.update(loss_scale=self.scaler.scale, skipped=not applied)
        return record

    def _micro_batch(self, params: dict, batch: Batch, scale: mx.array, k: int):
        """:meth:`_micro_grads` (compiled or not) of micro-batch ``k``; a ValueError or TypeError
        of the loss is raised again with the Trainer, the step and the micro-batch named."""
        try:
            return self._grad_fn(params, batch, scale)
        except (ValueError, TypeError) as error:
            if type(error) not in (ValueError, TypeError) or str(error).startswith("[Trainer]"):
                raise
            where = f"micro-batch {k + 1} of {self.grad_accum_steps} in step {self.step + 1}"
            raise type(error)(f"[Trainer] the loss failed on {where}: {error}") from error

    def _gradients(self):
        """(mean loss, mean float32 gradients, tokens) of one step's micro-batches, averaged over ranks."""
        params = self.model.trainable_parameters()  # the float32 masters
        scale = mx.array(1.0 if self.scaler is None else self.scaler.scale)
        loss_sum, grads, tokens = None, None, 0
        n = self.grad_accum_steps
        for k in range(n):
            batch = self._next_batch()
            tokens += self.tokens_fn(batch)
            loss, g = self._micro_batch(params, batch, scale, k)
            self.model.update(params)  # the gradient function left its working copy in the model
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            if n > 1:
                mx.eval(grads, loss_sum)  # keep one micro-batch's activations alive at a time
        if n > 1:
            grads = tree_map(lambda g: g / n, grads)
        loss = loss_sum / n
        if self.group is not None:
            from mlx_zeta.training.distributed import average_gradients
            grads = average_gradients(grads, self.group)
            loss = mx.distributed.all_sum(loss, group=self.group) / self.group.size()
            tokens *= self.group.size()
        return loss, grads, tokens

    def _update(self, loss: mx.array, grads: dict):
        """(applied, gradient norm): the update built from ``grads``, once they are known to be finite.

        Float16 loss scaling skips a step with non-finite gradients; otherwise a NaN or infinite
        loss or gradient norm raises before the update exists (one read-back per step)."""
        if self.scaler is not None:
            applied = self.scaler.update(bool(all_finite(grads).item()))
            return applied, self._apply_fn(grads) if applied else _global_norm(grads)
        norm = _global_norm(grads)
        mx.eval(loss, norm)
        if not (math.isfinite(loss.item()) and math.isfinite(norm.item())):
            raise ValueError(f"[Trainer] expected a finite loss and gradient norm at step {self.step + 1}, got loss "
                             f"{loss.item()} and gradient norm {norm.item()}; the step was not applied")
        return True, self._apply_fn(grads)

    # ------------------------------------------------------------------ the loop

    def train(self, steps: int) -> List[float]:
        """Train until the global step reaches ``steps`` (a resumed run continues from its
        checkpoint's step); returns the losses of the steps run by this call."""
        check_int("Trainer", "steps", steps, 0)
        self._goal = steps
        show_bar = self.is_main and (self.progress if self.progress is not None else self.stream.isatty())
        bar = None
        if show_bar:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=self.step, file=self.stream, dynamic_ncols=True)
        losses = []
        try:
            while self.step < steps:
                record = self.train_step()
                losses.append(record["loss"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    lr=f"{record['lr']:.2e}")
                if self.step % self.log_every == 0:
                    self._log(record, bar is None)
                if self.eval_every is not None and self.step % self.eval_every == 0:
                    self._log(dict(step=self.step, eval=self.evaluate()), bar is None)
                if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        if self.checkpoint_dir is not None and self._saved_step != self.step:
            self.save()
        return losses

    def evaluate(self) -> Dict[str, Any]:
        """Run ``eval_fn(model)`` with the model in eval mode (its mode restored afterwards)."""
        was_training = self.model.training
        self.model.eval()
        try:
            metrics = self.eval_fn(self.model)
        finally:
            self.model.train(was_training)
        return {k: (v.item() if isinstance(v, mx.array) else v) for k, v in dict(metrics).items()}

    def save(self) -> None:
        """Write a checkpoint of the current step to ``checkpoint_dir`` (rank 0 only)."""
        if not self.is_main or self.checkpoint_dir is None:
            return
        from mlx_zeta.training.checkpoint import save_checkpoint
        extra = {"consumed_batches": self._consumed}
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.step, self.config, extra,
                        trainable_only=self.checkpoint_trainable_only)
        self._saved_step = self.step

    def _log(self, record: Dict[str, Any], to_stream: bool) -> None:
        if not self.is_main:
            return
        self.history.append(record)
        line = json.dumps(record)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")
        if to_stream:
            self.stream.write(line + "\n")
            self.stream.flush()
