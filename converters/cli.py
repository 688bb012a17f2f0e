"""The converter commands of the ``mlx-zeta`` command line (:mod:`mlx_zeta.cli`, which parses,
runs them and sets the exit status; also ``python -m mlx_zeta``).

    mlx-zeta convert SRC DST [--to mlx-zeta|hf] [--dtype bfloat16] [--quantize 4 [--group-size 64]]
                             [--revision REV] [--max-shard-size 5GB] [--overwrite] [--allow-nonfinite]

``convert`` reads a Hugging Face checkpoint (a folder or a Hub repo id) with
:func:`~mlx_zeta.converters.pretrained.from_pretrained`, optionally casts and quantizes it
(MLX affine, :func:`~mlx_zeta.converters.pretrained.quantize`), and writes it with
:func:`~mlx_zeta.converters.pretrained.save_pretrained`, which writes atomically: on any
error DST is left as it was. ``--to mlx-zeta`` (default) writes our format, ``--to hf`` the Hugging
Face checkpoint that transformers loads (e.g. an mlx_zeta folder back to transformers; float
weights, so not with ``--quantize``). Weights holding NaN/Inf are refused unless ``--allow-nonfinite``
(then a warning); a source without tokenizer files gets a ``note:`` line on stderr.

    mlx-zeta export-coreml SRC OUT.mlpackage [--task lm|encoder|vit|auto] [--capacity N]
                           [--prefill-len N] [--seq-len N] [--precision float16|float32]
                           [--target iOS18|macOS15|iOS17|macOS14] [--overwrite] [--verbose]

``export-coreml`` loads SRC with ``from_pretrained`` and writes a Core ML package (atomically;
an existing non-empty OUT is replaced only with ``--overwrite``, and stays as it was when the
export fails or is interrupted):
a decoder LM (``Transformer``) as a stateful package with ``prefill_{N}``/``decode`` functions and
the KV cache as state (:func:`~mlx_zeta.converters.coreml.export_decoder`); a BERT encoder as
``input_ids``/``attention_mask`` (B, seq-len) -> ``last_hidden_state``; a ViT as ``pixel_values``
(1, H, W, C) -> ``logits`` (or hidden states without a classifier). Which of these applies comes
from the ``TASK`` the model's converter module declares (``causal-lm``, ``encoder``, ``vision``;
``seq2seq`` has no export), looked up in ``_EXPORTS``. coremltools stays silent (no progress
bars, version warnings or "Failed to load" lines) unless ``--verbose``, and is imported without
its probes of torch, scikit-learn and other frameworks it does not need here
(:func:`~mlx_zeta.converters.coreml.import_coremltools` with ``lean=True``). Each subcommand
is one ``_add_*`` function that registers its parser and its handler.

A handler raises ``ValueError`` for bad input and ``OSError`` for a failed read or write;
:func:`mlx_zeta.cli.main` turns them into one line on stderr and exit status 2 or 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

PROG = "mlx-zeta"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``"1024"`` -> 1024 (Hugging Face's
    convention: KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _check_destination(command: str, dst: Path, overwrite: bool, replaces: str) -> None:
    """A destination folder that is absent, empty, or one ``--overwrite`` lets ``command`` replace
    (``replaces``: what of it is replaced, for the message); anything else is a one-line ``ValueError``."""
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir():
        raise ValueError(f"[{command}] destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"[{command}] destination {dst} exists and is not empty; pass --overwrite to replace "
                         f"{replaces}")


# --------------------------------------------------------------------------- convert

# --to -> save_pretrained's format.
_FORMATS = {"mlx-zeta": "mlx_zeta", "hf": "hf"}



def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to an mlx_zeta checkpoint",
                       description="Convert a Hugging Face checkpoint (folder or Hub repo id) into an mlx_zeta "
                                   "checkpoint folder (config.json + safetensors) that mlx_zeta.from_pretrained "
                                   "loads without conversion, or (--to hf) any folder from_pretrained reads into "
                                   "the Hugging Face checkpoint that transformers loads.")
    p.add_argument("src", help="source model folder, or a Hub repo id ('owner/name')")
    p.add_argument("dst", type=Path, help="destination folder (created; written atomically)")
    p.add_argument("--to", choices=list(_FORMATS), default="mlx-zeta",
                   help="mlx-zeta: our format, loaded by mlx_zeta.from_pretrained without conversion (default); "
                        "hf: the Hugging Face checkpoint that transformers loads")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="cast floating weights (default: keep the checkpoint's dtypes)")
    p.add_argument("--quantize", type=int, choices=[4, 8], metavar="{4,8}",
                   help="MLX affine quantization of every Linear/Embedding to this many bits")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128],
                   help="quantization group size (default: 64)")
    p.add_argument("--revision", metavar="REV", help="Hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace the weights in an existing non-empty DST")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN/Inf with a warning instead of refusing them")
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from mlx.utils import tree_flatten

    from .io import is_weight_file
    from .pretrained import from_pretrained, quantize, save_pretrained

    dst: Path = args.dst
    if Path(args.src).expanduser().resolve() == dst.resolve() and (dst.is_dir() or not dst.exists()):
        raise ValueError(f"[convert] destination {dst} is the source folder; pick another one")
    _check_destination("convert", dst, args.overwrite, replaces="its weights")
    if args.group_size is not None and args.quantize is None:
        raise ValueError("[convert] --group-size needs --quantize")
    if args.quantize is not None and args.to == "hf":
        raise ValueError("[convert] --quantize with --to hf: a Hugging Face checkpoint holds float weights, "
                         "it would be de-quantized again")
    group_size = args.group_size or 64

    start = time.perf_counter()
    terminal = sys.stderr.isatty()  # progress (a bar, "writing ...") on a terminal only: an error stays one line
    with warnings.catch_warnings(record=True) as caught:  # --allow-nonfinite: each warning as one line
        warnings.simplefilter("always", UserWarning)
        model = from_pretrained(args.src, dtype=args.dtype, revision=args.revision, progress=terminal,
                                allow_nonfinite=args.allow_nonfinite)
    for w in caught:
        print(f"{PROG} convert: warning: {w.message}", file=sys.stderr)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    loaded = time.perf_counter()
    if args.quantize is not None:
        layers = quantize(model, args.quantize, group_size)
        if not layers:
            raise ValueError(f"[convert] no layer's input width is a multiple of the group size {group_size}; "
                             "nothing would be quantized")
        print(f"quantized {layers} layers to {args.quantize} bits (group size {group_size})", file=sys.stderr)
    if terminal:
        print(f"writing {dst} ...", file=sys.stderr, flush=True)
    save_pretrained(model, dst, format=_FORMATS[args.to], max_shard_bytes=args.max_shard_size)
    end = time.perf_counter()

    files = [p for p in dst.iterdir() if p.is_file()]
    shards = sum(p.suffix == ".safetensors" for p in files if is_weight_file(p.name))
    written = sum(p.stat().st_size for p in files)
    kind = model.pretrained.model_type
    if not model.pretrained.tokenizer:
        print(f"note: no tokenizer files found in {args.src}; the converted folder has none", file=sys.stderr)
    print(f"converted {args.src} ({kind}, {n_params:,} parameters) -> {dst} ({args.to}): {_human(written)} in "
          f"{shards} shard(s) + {len(files) - shards} other file(s); {end - start:.1f} s "
          f"(load {loaded - start:.1f} s, write {end - loaded:.1f} s)")
    return 0


# --------------------------------------------------------------------------- export-coreml

def _add_export_coreml(sub: argparse._SubParsersAction) -> None:
    from .coreml.export import TARGETS

    about = ("Export an mlx_zeta / Hugging Face model folder to a Core ML ML Program (iOS 18 / macOS 15): decoder "
             "LMs as one stateful package with prefill and decode functions, BERT encoders, ViT image classifiers.")
    p = sub.add_parser("export-coreml", help="export a model folder to a Core ML .mlpackage", description=about)
    p.add_argument("src", help="model folder (or Hub repo id) that mlx_zeta.from_pretrained loads")
    p.add_argument("dst", type=Path, help="output .mlpackage (written atomically)")
    p.add_argument("--task", choices=[name for name, _, _ in _EXPORTS.values()] + ["auto"], default="auto",
                   help="what to export (default: auto, from the TASK its architecture declares)")
    p.add_argument("--capacity", type=int, metavar="N", help="lm: KV-cache positions (default: 512)")
    p.add_argument("--prefill-len", type=int, metavar="N", 
                   help="lm: tokens per prefill call (default: min(64, capacity))")
    p.add_argument("--seq-len", type=int, metavar="N", help="encoder: tokens per call (default: 128)")
    p.add_argument("--precision", choices=["float16", "float32"], default="float16",
                   help="activation precision (default: float16)")
    p.add_argument("--target", choices=TARGETS, default="iOS18",
                   help="minimum deployment target (default: iOS18; lm needs iOS18 or macOS15)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.add_argument("--verbose", action="store_true",
                   help="show coremltools' own log lines, warnings and progress bars")
    p.set_defaults(handler=_export_coreml)


def _export_of(model) -> tuple:
    """``(--task name, export, options it reads)`` for the ``TASK`` that the model's converter declares."""
    from .pretrained import task_of

    task = task_of(model)
    if task not in _EXPORTS:
        declared = f"its architecture's task is {task}" if task else "its architecture declares no task"
        raise ValueError(f"[export-coreml] no Core ML export for a {type(model).__name__} ({declared}); expected "
                         f"a decoder Transformer, a BertEncoder or a PretrainedViT (tasks {', '.join(_EXPORTS)})")
    return _EXPORTS[task]


def _export_lm(model, dst: Path, args: argparse.Namespace) -> None:
    from .coreml import export_decoder

    capacity = args.capacity or 512
    export_decoder(model, dst, capacity=capacity, prefill_lens=(args.prefill_len or min(64, capacity),),
                   precision=args.precision, minimum_deployment_target=args.target, verbose=args.verbose)


def _export_encoder(model, dst: Path, args: argparse.Namespace) -> None:
    import mlx.core as mx

    from .coreml import export_coreml

    n = args.seq_len or 128
    ids, mask = mx.zeros((1, n), mx.int32), mx.ones((1, n), mx.int32)
    export_coreml(lambda i, m: model(i, m), (ids, mask), dst, input_names=["input_ids", "attention_mask"],
                  output_names=["last_hidden_state"], precision=args.precision,
                  minimum_deployment_target=args.target, verbose=args.verbose)


def _export_vit(model, dst: Path, args: argparse.Namespace) -> None:
    import mlx.core as mx

    from .coreml import export_coreml

    size, channels = model.embeddings.img_size, model.embeddings.in_chans
    export_coreml(model, (mx.zeros((1, *size, channels)),), dst, input_names=["pixel_values"],
                  output_names=["logits" if "classifier" in model else "last_hidden_state"],
                  precision=args.precision, minimum_deployment_target=args.target, verbose=args.verbose)


# An architecture's TASK (declared by its converter module, see pretrained.TASKS) -> (the --task name of
# its Core ML export, the export, the options it reads). A task not listed (seq2seq) has no export.
_EXPORTS = {"causal-lm": ("lm", _export_lm, ("capacity", "prefill_len")),
            "encoder": ("encoder", _export_encoder, ("seq_len",)),
            "vision": ("vit", _export_vit, ())}


def _export_coreml(args: argparse.Namespace) -> int:
    from .coreml import import_coremltools, package_summary
    from .pretrained import from_pretrained

    dst: Path = args.dst
    if dst.suffix != ".mlpackage":
        raise ValueError(f"[export-coreml] expected an output path ending in .mlpackage, got {dst}")
    _check_destination("export-coreml", dst, args.overwrite, replaces="it")
    for flag in ("capacity", "prefill_len", "seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"[export-coreml] expected --{flag.replace('_', '-')} >= 1, got {value}")
    start = time.perf_counter()
    model = from_pretrained(args.src)
    task, export, reads = _export_of(model)
    if args.task not in ("auto", task):
        raise ValueError(f"[export-coreml] --task {args.task} does not fit a {type(model).__name__} "
                         f"(its task is {task})")
    unused = [f"--{f.replace('_', '-')}" for f in ("capacity", "prefill_len", "seq_len")
              if getattr(args, f) is not None and f not in reads]
    if unused:
        raise ValueError(f"[export-coreml] {', '.join(unused)}: not used by task {task}")
    try:
        import_coremltools(verbose=args.verbose, lean=True)  # interruptible, and fast: no torch/sklearn probes
    except ImportError as e:
        raise ValueError(f"[export-coreml] needs coremltools (pip install coremltools): {e}") from e
    export(model, dst, args)
    summary = package_summary(dst)
    funcs = "; ".join(f"{name}({', '.join(f'{k} {v}' for k, v in f['inputs'].items())}) -> {', '.join(f['outputs'])}"
                      for name, f in summary["functions"].items())
    states = f", {len(summary['states'])} state(s)" if summary["states"] else ""
    print(f"exported {args.src} ({type(model).__name__}, task {task}, {args.precision}) -> {dst}: {funcs}{states}; "
          f"{_human(summary['bytes'])} in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- commands

# The commands of this module, composed with the language-model ones by mlx_zeta.cli.
COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (_add_convert, _add_export_coreml)
