"""The fine-tuning commands of the ``mlx-zeta`` command line (registered in :mod:`mlx_zeta.lm.cli`'s
``COMMANDS``; :mod:`mlx_zeta.cli` parses, runs them and sets the exit status).

    mlx-zeta lora --model M --data DIR [--fine-tune-type lora|dora|full] [--rank R] [--scale S | --alpha A]
                  [--dropout P] [--num-layers N] [--targets PATTERN ...] [--iters N] [--batch-size N]
                  [--learning-rate LR] [--mask-prompt] [--max-seq-len N] [--grad-checkpoint]
                  [--grad-accum N] [--adapter-path A] [--resume] [--quantize 4|8 [--group-size G]]
                  [--steps-per-eval N] [--val-batches N] [--save-every N] [--test] [--seed S] [--dtype D]

``lora`` loads M (:func:`mlx_zeta.lm.load`), optionally quantizes it on the fly (``--quantize``: MLX
affine, :func:`~mlx_zeta.converters.pretrained.quantize`, so the adapters train on a 4- or 8-bit
base: QLoRA) and fine-tunes it on ``DIR/train.jsonl`` (``valid.jsonl`` for the validation loss,
``test.jsonl`` with ``--test``) through :func:`mlx_zeta.lm.tuning.train`, which writes the adapters
(or, ``--fine-tune-type full``, the whole model) and its checkpoints to ``--adapter-path``
(default ``adapters``); ``--resume`` continues from the latest checkpoint there. The losses go to
stderr as training runs; one summary line ends the run.

    mlx-zeta fuse --model M --adapter-path A --save-path OUT [--de-quantize] [--to mlx-zeta|hf]
                  [--export-peft DIR] [--data DIR [--batch-size N] [--val-batches N]] [--dtype D]

``fuse`` loads M with the adapters in A (ours or PEFT's), optionally writes them in PEFT's layout
for transformers + peft (``--export-peft``, :func:`~mlx_zeta.lm.adapters_hf.save_peft`), folds them
into the weights (:func:`~mlx_zeta.training.adapters.fuse_adapters`: an affine-quantized base is
re-quantized unless ``--de-quantize``) and writes the model to OUT
(:func:`~mlx_zeta.converters.pretrained.save_pretrained`; ``--to hf``: a Hugging Face checkpoint
transformers loads). With ``--data`` it prints the validation loss of ``DIR/valid.jsonl`` before
and after fusing (read as ``lora`` read it: its ``--mask-prompt`` and ``--max-seq-len`` are kept in
our adapter_config.json): re-quantizing a fused weight rounds the adapter's update, and this says
how much that cost.

Handlers raise ``ValueError`` for bad input (exit status 2) and ``OSError`` for what the system
refused (exit status 1); the options are checked before the model loads.

    mlx-zeta generate --model M --adapter-path A ...

(:mod:`mlx_zeta.lm.cli`) generates with the adapters in A applied.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["COMMANDS", "check_adapter_path"]

_DTYPES = ("float32", "float16", "bfloat16")


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a ``kind`` (int or float) > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a{'n int' if kind is int else ' number'} > 0, got {text!r}")
        return value
    return parse


def check_adapter_path(command: str, path: Optional[Path]) -> None:
    """``--adapter-path`` (when given) is a folder with an ``adapter_config.json`` (before the model loads)."""
    if path is not None and not (path / "adapter_config.json").is_file():
        raise ValueError(f"[{command}] --adapter-path: expected a folder with adapter_config.json, got {str(path)!r}")


def _check_data(command: str, data: Path, *names: str) -> None:
    """``--data`` is a folder holding ``names`` (before the model loads)."""
    if not data.is_dir():
        raise ValueError(f"[{command}] --data: expected a folder of .jsonl files, got {str(data)!r}")
    for name in names:
        if not (data / name).is_file():
            raise ValueError(f"[{command}] --data: expected {data / name}, not found")


# --------------------------------------------------------------------------- lora


def _add_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="fine-tune a model with LoRA / DoRA adapters (or fully) on JSONL data",
                       description="Fine-tune a causal LM on DIR/train.jsonl (text, prompt/completion or chat "
                                   "messages per line) and save the adapters (or the model) to --adapter-path.")
    p.add_argument("--model", required=True, metavar="M", help="model folder or Hub repo id ('owner/name')")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder with train.jsonl "
                   "(valid.jsonl: validation loss; test.jsonl: --test)")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], default="lora",
                   help="adapters (LoRA, DoRA) or every parameter (default: lora)")
    p.add_argument("--rank", type=_positive(int), help="adapter rank (default: 8)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float,
                       help="adapter scale s in y = Wx + s BAx (default: 2.0)")
    scale.add_argument("--alpha", type=float, help="PEFT's lora_alpha: scale = alpha / rank")
    p.add_argument("--dropout", type=float, help="adapter dropout probability (default: 0)")
    p.add_argument("--num-layers", type=_positive(int), metavar="N", help="adapt only the last N blocks (default: all)")
    p.add_argument("--targets", nargs="+", metavar="PATTERN",
                   help="module paths to adapt (fnmatch, or 're:' + a regex; default: every Linear but the head)")
    p.add_argument("--iters", type=_positive(int), default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=_positive(int), default=4, help="rows per micro-batch (default: 4)")
    p.add_argument("--learning-rate", type=_positive(float), default=1e-5, metavar="LR", help="Adam's (default: 1e-5)")
    p.add_argument("--mask-prompt", action="store_true", help="train on the completions only")
    p.add_argument("--max-seq-len", type=_positive(int), default=2048, metavar="N",
                   help="longer examples are cut (default: 2048)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--grad-accum", type=_positive(int), default=1, metavar="N", help="micro-batches per step")
    p.add_argument("--adapter-path", type=Path, default=Path("adapters"), metavar="A",
                   help="output folder (default: adapters)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --adapter-path")
    p.add_argument("--quantize", type=int, choices=[4, 8], metavar="{4,8}",
                   help="quantize the model to this many bits first (QLoRA)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="quantization group size (default: 64)")
    p.add_argument("--steps-per-eval", type=_positive(int), default=200, metavar="N",
                   help="validation loss every N steps (default: 200)")
    p.add_argument("--val-batches", type=_positive(int), default=25, metavar="N",
                   help="validation batches per evaluation (default: 25)")
    p.add_argument("--save-every", type=_positive(int), default=100, metavar="N", help="checkpoint every N steps")
    p.add_argument("--test", action="store_true",
                   help="report the test loss and perplexity (test.jsonl) after training")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, dropout and batch order")
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating weights (default: the checkpoint's dtypes)")
    p.set_defaults(handler=_lora)


def _lora(args: argparse.Namespace) -> int:
    from mlx_zeta.converters.pretrained import quantize
    from mlx_zeta.lm import load
    from mlx_zeta.lm.tuning import CHECKPOINTS, train

    _check_data("lora", args.data, "train.jsonl", *(["test.jsonl"] if args.test else []))
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"[lora] --dropout: expected a probability in [0, 1), got {args.dropout}")
    if args.group_size is not None and args.quantize is None:
        raise ValueError("[lora] --group-size needs --quantize")
    if args.fine_tune_type == "full" and args.quantize is not None:
        raise ValueError("[lora] --quantize trains adapters on a quantized base; --fine-tune-type full needs a float "
                         "model")
    if args.resume and not (args.adapter_path / CHECKPOINTS).is_dir():
        raise ValueError(f"[lora] --resume: expected checkpoints in {args.adapter_path / CHECKPOINTS}, found none")
    model, tokenizer = load(args.model, dtype=args.dtype)
    if args.quantize is not None:
        layers = quantize(model, args.quantize, args.group_size or 64)
        print(f"quantized {layers} layers to {args.quantize} bits", file=sys.stderr)
    result = train(model, tokenizer, args.data, fine_tune_type=args.fine_tune_type, rank=args.rank,
                   scale=args.scale, alpha=args.alpha, dropout=args.dropout, num_layers=args.num_layers,
                   targets=args.targets, iters=args.iters,
                   batch_size=args.batch_size, learning_rate=args.learning_rate, mask_prompt=args.mask_prompt,
                   max_seq_len=args.max_seq_len, grad_checkpoint=args.grad_checkpoint, grad_accum=args.grad_accum,
                   adapter_path=args.adapter_path, resume=args.resume, steps_per_eval=args.steps_per_eval,
                   val_batches=args.val_batches, save_every=args.save_every, test=args.test, seed=args.seed,
                   stream=sys.stderr)
    print(_summary(result))
    return 0


def _summary(result: dict) -> str:
    """One line: what was saved where, and the losses."""
    what = "the model" if not result.get("modules") else f"{len(result['modules'])} adapters"
    line = f"saved {what} to {result['adapter_path']} after {result['steps']} steps"
    if result.get("train_losses"):
        line += f"; train loss {result['train_losses'][-1]:.4f}"
    if result.get("val_losses"):
        (_, first), (_, last) = result["val_losses"][0], result["val_losses"][-1]
        line += f"; validation loss {first:.4f} -> {last:.4f}"
    if result.get("test_loss") is not None:
        line += f"; test loss {result['test_loss']:.4f} (perplexity {result['test_perplexity']:.3f})"
    return line


# --------------------------------------------------------------------------- fuse


def _add_fuse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fold adapters into a model's weights and save it",
                       description="Load a model with adapters (ours or PEFT's), fold them into its weights and "
                                   "save the model; optionally export the adapters in PEFT's layout.")
    p.add_argument("--model", required=True, metavar="M", help="model folder or Hub repo id ('owner/name')")
    p.add_argument("--adapter-path", required=True, type=Path, metavar="A", help="folder of the adapters")
    p.add_argument("--save-path", required=True, type=Path, metavar="OUT", help="folder for the fused model")
    p.add_argument("--de-quantize", action="store_true", help="write quantized layers as float ones")
    p.add_argument("--to", choices=["mlx-zeta", "hf"], default="mlx-zeta",
                   help="our checkpoint format or a Hugging Face one (default: mlx-zeta)")
    p.add_argument("--export-peft", type=Path, metavar="DIR", help="also write the adapters in PEFT's layout to DIR")
    p.add_argument("--data", type=Path, metavar="DIR", help="print the loss on DIR/valid.jsonl before and after fusing")
    p.add_argument("--batch-size", type=_positive(int), default=4, help="rows per batch for --data (default: 4)")
    p.add_argument("--val-batches", type=_positive(int), metavar="N", help="batches of --data to score (default: all)")
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating weights (default: the checkpoint's dtypes)")
    p.set_defaults(handler=_fuse)


def _check_fuse(args: argparse.Namespace) -> None:
    check_adapter_path("fuse", args.adapter_path)
    for option, path in (("--save-path", args.save_path), ("--export-peft", args.export_peft)):
        if path is not None and (path.exists() and not path.is_dir() or path.is_dir() and any(path.iterdir())):
            raise ValueError(f"[fuse] {option}: expected a new or empty folder, got {str(path)!r}")
    if args.data is not None:
        _check_data("fuse", args.data, "valid.jsonl")
    elif args.val_batches is not None:
        raise ValueError("[fuse] --val-batches needs --data")


def _fuse(args: argparse.Namespace) -> int:
    from mlx_zeta.converters.pretrained import save_pretrained
    from mlx_zeta.lm import load
    from mlx_zeta.lm.adapters_hf import save_peft
    from mlx_zeta.training.adapters import fuse_adapters

    _check_fuse(args)
    model, tokenizer = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path)
    if args.export_peft is not None:
        save_peft(model, args.export_peft)
        print(f"wrote the adapters in PEFT's layout to {args.export_peft}", file=sys.stderr)
    score = None if args.data is None else _scorer(args, tokenizer)
    before = None if score is None else score(model)
    fused = fuse_adapters(model, de_quantize=args.de_quantize)
    after = None if score is None else score(model)
    save_pretrained(model, args.save_path, format="hf" if args.to == "hf" else "mlx_zeta")
    line = f"fused {len(fused)} adapters into {args.model} -> {args.save_path}"
    if score is not None:
        line += f"; validation loss {before:.4f} with adapters, {after:.4f} fused ({after - before:+.2e})"
    print(line)
    return 0


def _scorer(args: argparse.Namespace, tokenizer) -> Callable:
    """``model -> `` mean loss on ``--data``'s valid.jsonl (:func:`mlx_zeta.lm.tuning.evaluate`)."""
    from mlx_zeta.lm.datasets import load_datasets
    from mlx_zeta.lm.tuning import evaluate

    valid = load_datasets(args.data, tokenizer, **_data_settings(args.adapter_path))["valid"]
    return lambda model: evaluate(model, valid, args.batch_size, args.val_batches)


def _data_settings(adapter_path: Path) -> dict:
    """How ``lora`` read its data (``mask_prompt``, ``max_seq_len``, kept in our adapter_config.json), so
    that fuse's loss is the one training reported; none for adapters from elsewhere (PEFT's)."""
    from mlx_zeta.common import read_json_object
    from mlx_zeta.training.adapters import CONFIG_FILE

    config = read_json_object(adapter_path / CONFIG_FILE, "fuse")
    return {k: config[k] for k in ("mask_prompt", "max_seq_len") if k in config}


COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (_add_lora, _add_fuse)
