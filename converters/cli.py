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
                           [--prefill-lens N[,N...]] [--seq-len N] [--pooling none|mean|cls] [--normalize]
                           [--precision float16|float32] [--target iOS18|macOS15|iOS17|macOS14]
                           [--compress MODE] [--compress-layer PATTERN=MODE ...] [--copy-tokenizer]
                           [--author S] [--license S] [--description S] [--overwrite] [--verbose]

``export-coreml`` loads SRC with ``from_pretrained`` and writes a Core ML package (atomically;
an existing non-empty OUT is replaced only with ``--overwrite``, and stays as it was when the
export fails or is interrupted):
a decoder LM (``Transformer``) as a stateful package with one ``prefill_{N}`` function per
``--prefill-lens`` length and ``decode``, the KV cache as state
(:func:`~mlx_zeta.converters.coreml.export_decoder`); a BERT encoder as ``input_ids``/``attention_mask``
(B, seq-len) -> ``last_hidden_state``, or with ``--pooling mean|cls`` [``--normalize``] -> ``embeddings``
(B, hidden) pooled inside the model (:class:`~mlx_zeta.converters.coreml.heads.EncoderPooling`); a ViT as
``pixel_values`` (1, H, W, C) -> ``logits`` (or hidden states without a classifier). Which of these applies
comes from the ``TASK`` the model's converter module declares (``causal-lm``, ``encoder``, ``vision``;
``seq2seq`` has no export), looked up in ``_EXPORTS``. ``--compress`` / ``--compress-layer`` choose the
weight compression (``compress=`` of the exporters). The package's metadata holds ``--author``,
``--license``, ``--description`` and user-defined keys naming the source, its special token ids and
tokenizer files (:mod:`~mlx_zeta.converters.coreml.source`); ``--copy-tokenizer`` copies those files
byte for byte into ``OUT.tokenizer/`` beside the package (moved into place after the package, so a
failed export leaves neither). The exporters' warnings (e.g. the measured error of MLX-quantized weights) come
as one ``warning:`` line each. coremltools stays silent (no progress
bars, version warnings or "Failed to load" lines) unless ``--verbose``, and is imported without
its probes of torch, scikit-learn and other frameworks it does not need here
(:func:`~mlx_zeta.converters.coreml.import_coremltools` with ``lean=True``). Each subcommand
is one ``_add_*`` function that registers its parser and its handler.

What an export command shares with ``export-coreai`` (:mod:`mlx_zeta.converters.coreai_cli`) is here,
once: its arguments (:func:`add_export_arguments`), the checks before anything is written
(:func:`prepare_export`), the task's *job* (what to trace: ``("decoder" | "single", keywords)``, the
same for both backends), the run with the tokenizer copy and the warnings (:func:`run_export`), and
the summary line (:func:`export_summary`); each error names the command (``args.command``).

A handler raises ``ValueError`` for bad input and ``OSError`` for a failed read or write;
:func:`mlx_zeta.cli.main` turns them into one line on stderr and exit status 2 or 1.
"""

from __future__ import annotations

import argparse
import json
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

def parse_lengths(text: str) -> tuple:
    """``"64,256"`` -> ``(64, 256)``: token counts, each >= 1, sorted, duplicates dropped."""
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 64,256, got {text!r}") \
            from None
    if min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected each length >= 1, got {min(lengths)} in {text!r}")
    return tuple(sorted(set(lengths)))


def _parse_layer_mode(text: str) -> tuple:
    """``"PATTERN=MODE"`` -> ``(PATTERN, MODE)``, MODE one of the compression modes."""
    from .coreml.compress import MODES

    pattern, eq, mode = text.rpartition("=")
    if not eq or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=MODE (e.g. '*.layers.0.*=int8'), got {text!r}")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected MODE one of {', '.join(MODES)} in {text!r}, got {mode!r}")
    return pattern, mode


COMPRESS_HELP = (
    "weight compression of the float weight matrices (Linear and Embedding weights): {modes}. int4 = "
    "int4-block32: 4-bit codes with a scale and offset per 32 weights; palettizeN: a 2^N-entry table per 16 "
    "rows; keep the embeddings and head at int8 with --compress-layer @embedding=int8 "
    "--compress-layer @head=int8. {extra}MLX-quantized layers (convert --quantize) "
    "export exactly whatever it says (default: float weights in {default})")
_LAYER_HELP = (
    "the weights of the modules whose path (as in the loaded model's named_modules()) matches the fnmatch "
    "PATTERN (e.g. 'attn_layers.layers.0.*', '*.ff.*', or @embedding / @head for those roles) get MODE instead; "
    "repeatable: a module takes its longest matching PATTERN, else --compress's choice for it (float without "
    "--compress)")


def add_export_arguments(p: argparse.ArgumentParser, suffix: str, compress_modes: Sequence[str],
                         compress_help: str) -> None:
    """The arguments every export command takes (``export-coreml``, ``export-coreai``): SRC, DST ending in
    ``suffix``, the task and its options, the compression, the tokenizer copy, metadata, ``--overwrite``."""
    from .coreml.heads import POOLINGS

    p.add_argument("src", help="model folder (or Hub repo id) that mlx_zeta.from_pretrained loads")
    p.add_argument("dst", type=Path, help=f"output {suffix} (written atomically)")
    p.add_argument("--task", choices=[name for name, _, _ in _EXPORTS.values()] + ["auto"], default="auto",
                   help="what to export (default: auto, from the TASK its architecture declares)")
    p.add_argument("--capacity", type=int, metavar="N", help="lm: KV-cache positions (default: 512)")
    p.add_argument("--prefill-lens", type=parse_lengths, metavar="N[,N...]",
                   help="lm: tokens per prefill call, one prefill_N function each, e.g. 64,256 (each <= capacity; "
                        "default: min(64, capacity))")
    p.add_argument("--seq-len", type=int, metavar="N", help="encoder: tokens per call (default: 128)")
    p.add_argument("--pooling", choices=("none", *POOLINGS),
                   help="encoder: output 'embeddings' (B, hidden) pooled inside the model: the mean over the "
                        "attention mask's tokens, or the first token (default: none, 'last_hidden_state')")
    p.add_argument("--normalize", action="store_true", help="encoder, with --pooling: L2-normalise the embeddings")
    p.add_argument("--compress", choices=compress_modes, metavar="MODE", help=compress_help)
    p.add_argument("--compress-layer", type=_parse_layer_mode, action="append", metavar="PATTERN=MODE",
                   help=_LAYER_HELP)
    p.add_argument("--copy-tokenizer", action="store_true",
                   help="copy SRC's tokenizer, chat-template and generation files byte for byte into "
                        f"<DST without {suffix}>.tokenizer/ beside it")
    p.add_argument("--author", metavar="TEXT", help="metadata: author")
    p.add_argument("--license", metavar="TEXT", help="metadata: license")
    p.add_argument("--description", metavar="TEXT", help="metadata: short description")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST (and tokenizer folder)")


def _add_export_coreml(sub: argparse._SubParsersAction) -> None:
    from .coreml.compress import MODES
    from .coreml.export import TARGETS

    about = ("Export an mlx_zeta / Hugging Face model folder to a Core ML ML Program (iOS 18 / macOS 15): decoder "
             "LMs as one stateful package with prefill and decode functions, BERT encoders, ViT image classifiers.")
    p = sub.add_parser("export-coreml", help="export a model folder to a Core ML .mlpackage", description=about)
    modes = (*MODES, "ternary-dense")
    add_export_arguments(p, ".mlpackage", modes, COMPRESS_HELP.format(
        modes=", ".join(modes), default="--precision",
        extra="ternary-dense stores ternary layers as plain weights instead of 2-bit tables. "))
    p.add_argument("--precision", choices=["float16", "float32"], default="float16",
                   help="activation precision (default: float16)")
    p.add_argument("--target", choices=TARGETS, default="iOS18",
                   help="minimum deployment target (default: iOS18; lm needs iOS18 or macOS15)")
    p.add_argument("--verbose", action="store_true",
                   help="show coremltools' own log lines, warnings and progress bars")
    p.set_defaults(handler=_export_coreml)


def _export_of(model, command: str, backend: str) -> tuple:
    """``(--task name, job, options it reads)`` for the ``TASK`` that the model's converter declares."""
    from .pretrained import task_of

    task = task_of(model)
    if task not in _EXPORTS:
        declared = f"its architecture's task is {task}" if task else "its architecture declares no task"
        raise ValueError(f"[{command}] no {backend} export for a {type(model).__name__} ({declared}); expected "
                         f"a decoder Transformer, a BertEncoder or a PretrainedViT (tasks {', '.join(_EXPORTS)})")
    return _EXPORTS[task]


def _compression(args: argparse.Namespace):
    """The ``compress=`` of the exporters (:func:`.coreml.compress.policy`): None, ``"ternary-dense"``, or
    ``{"*": MODE}`` for ``--compress MODE``, each ``--compress-layer PATTERN=MODE`` added (a later one for
    the same PATTERN wins)."""
    if args.compress == "ternary-dense":
        if args.compress_layer:
            raise ValueError(f"[{args.command}] --compress-layer with --compress ternary-dense: ternary-dense is "
                             "about ternary layers only; pick a weight compression MODE for --compress")
        return args.compress
    table = {}
    if args.compress is not None:
        table = {"*": args.compress}
    table.update(args.compress_layer or ())
    return table or None


def _lm_options(args: argparse.Namespace) -> tuple:
    """``(capacity, prefill lengths)`` of an lm export, the lengths checked against the capacity."""
    capacity = args.capacity or 512
    lengths = args.prefill_lens or (min(64, capacity),)
    if max(lengths) > capacity:
        raise ValueError(f"[{args.command}] expected each --prefill-lens length <= --capacity {capacity}, "
                         f"got {max(lengths)}")
    return capacity, lengths


# A job says what to export, for every backend: ("decoder", keywords of export_decoder / export_decoder_coreai)
# or ("single", keywords of export_coreml / export_coreai), without the path and the backend's own options.
def _lm_job(model, args: argparse.Namespace, metadata: dict, compress) -> tuple:
    capacity, lengths = _lm_options(args)
    return "decoder", dict(model=model, capacity=capacity, prefill_lens=lengths, compress=compress, metadata=metadata)


def _encoder_job(model, args: argparse.Namespace, metadata: dict, compress) -> tuple:
    import mlx.core as mx

    from .coreml.heads import EncoderPooling

    n = args.seq_len or 128
    pooling = args.pooling or "none"
    ids, mask = mx.zeros((1, n), mx.int32), mx.ones((1, n), mx.int32)
    fn = model  # traced as model(input_ids, attention_mask); a module, so --compress finds its weights by path
    if pooling != "none":
        fn = EncoderPooling(model, pooling, args.normalize)
        compress = _under("encoder.", compress)  # the model is fn.encoder: patterns stay relative to the model
    pooled = {"none": "", "mean": "the mean over the tokens of attention_mask", "cls": "the first token's state"}
    output = ("last_hidden_state", f"(B, {n}, hidden) float32: the last hidden state") if pooling == "none" else \
        ("embeddings", f"(B, hidden) float32: {pooled[pooling]}{', L2-normalised' if args.normalize else ''}")
    metadata["user"].update({"mlx_zeta.pooling": pooling, "mlx_zeta.normalize": json.dumps(args.normalize),
                             "mlx_zeta.seq_len": str(n)})
    metadata.update(inputs={"input_ids": f"Token ids (B, {n}) int32, right-padded to {n}",
                            "attention_mask": f"(B, {n}) int32: 1 for a token, 0 for padding"},
                    outputs=dict([output]))
    return "single", dict(model_or_fn=fn, example_inputs=(ids, mask), input_names=["input_ids", "attention_mask"],
                          output_names=[output[0]], compress=compress, metadata=metadata)


def _under(prefix: str, compress):
    """``compress`` with each module-path pattern prefixed by ``prefix`` ("*" and role keys as they are)."""
    if not isinstance(compress, dict):
        return compress
    return {k if k == "*" or k.startswith("@") else prefix + k: v for k, v in compress.items()}


def _vit_job(model, args: argparse.Namespace, metadata: dict, compress) -> tuple:
    import mlx.core as mx

    size, channels = model.embeddings.img_size, model.embeddings.in_chans
    return "single", dict(model_or_fn=model, example_inputs=(mx.zeros((1, *size, channels)),),
                          input_names=["pixel_values"],
                          output_names=["logits" if "classifier" in model else "last_hidden_state"],
                          compress=compress, metadata=metadata)


# An architecture's TASK (declared by its converter module, see pretrained.TASKS) -> (the --task name of
# its export, its job, the options it reads). A task not listed (seq2seq) has no export.
_EXPORTS = {"causal-lm": ("lm", _lm_job, ("capacity", "prefill_lens")),
            "encoder": ("encoder", _encoder_job, ("seq_len", "pooling", "normalize")),
            "vision": ("vit", _vit_job, ())}
_TASK_OPTIONS = ("capacity", "prefill_lens", "seq_len", "pooling", "normalize")


def _check_options(args: argparse.Namespace, task: str, reads: tuple) -> None:
    """The task-specific options given are the task's own; ``--normalize`` comes with a pooling."""
    unused = [f"--{f.replace('_', '-')}" for f in _TASK_OPTIONS if getattr(args, f) not in (None, False)
              and f not in reads]
    if unused:
        raise ValueError(f"[{args.command}] {', '.join(unused)}: not used by task {task}")
    if args.normalize and args.pooling in (None, "none"):
        raise ValueError(f"[{args.command}] --normalize needs --pooling mean or cls (it normalises the pooled "
                         "embeddings)")


def _metadata(args: argparse.Namespace, model, files: list) -> dict:
    """The ``metadata=`` of the exporters: author, license, description as given, and the user-defined keys
    about the source (:func:`.coreml.source.source_metadata`) and its task (the converter's ``TASK``)."""
    from .coreml.source import source_metadata
    from .pretrained import task_of

    info = model.pretrained
    user = source_metadata(args.src, info.model_type, info.source, info.config, files, owner=args.command)
    meta = {k: getattr(args, k) for k in ("author", "license", "description") if getattr(args, k) is not None}
    return {**meta, "user": {**user, "mlx_zeta.task": task_of(model)}}


def _stored_as_is(model) -> str:
    """``"; N MLX-quantized layers as stored"`` for a model with MLX-affine layers (they export exactly,
    whatever --compress says), else ``""``."""
    import mlx.nn as nn

    n = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    return f"; {n} MLX-quantized layers as stored" if n else ""


def prepare_export(args: argparse.Namespace, suffix: str, backend: str) -> tuple:
    """``(model, task name, job, compress)`` of an export command (``args.command``), every option checked
    before anything is written: DST ends in ``suffix`` and may be written, the options fit the model's task;
    ``backend`` names the format in messages."""
    from .coreml.source import tokenizer_folder
    from .pretrained import from_pretrained

    dst, command = args.dst, args.command
    if dst.suffix != suffix:
        raise ValueError(f"[{command}] expected an output path ending in {suffix}, got {dst}")
    _check_destination(command, dst, args.overwrite, replaces="it")
    if args.copy_tokenizer:
        _check_destination(command, tokenizer_folder(dst), args.overwrite, replaces="it")
    for flag in ("capacity", "seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"[{command}] expected --{flag.replace('_', '-')} >= 1, got {value}")
    compress = _compression(args)
    model = from_pretrained(args.src)
    task, job, reads = _export_of(model, command, backend)
    if args.task not in ("auto", task):
        raise ValueError(f"[{command}] --task {args.task} does not fit a {type(model).__name__} (its task is {task})")
    _check_options(args, task, reads)
    if task == "lm":
        _lm_options(args)
    return model, task, job, compress


def run_export(args: argparse.Namespace, model, job: Callable, compress, exporters: dict) -> list:
    """Run ``job``'s export with ``exporters[kind]`` (``path=DST`` and the job's keywords); returns the
    tokenizer files named in the metadata. With ``--copy-tokenizer`` the tokenizer folder is staged first and
    moved into place only after the export: a failed export leaves neither. Each warning is one line."""
    from contextlib import nullcontext

    from .coreml.source import copy_tokenizer, travelling_files

    folder = model.pretrained.source
    staged = copy_tokenizer(folder, args.dst, owner=args.command) if args.copy_tokenizer else \
        nullcontext(travelling_files(folder))
    with staged as files, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        kind, keywords = job(model, args, _metadata(args, model, files), compress)
        exporters[kind](path=args.dst, **keywords)
    for message in dict.fromkeys(str(w.message) for w in caught):  # once, not once per traced function
        print(f"{PROG} {args.command}: warning: {message}", file=sys.stderr)
    return files


def export_summary(args: argparse.Namespace, model, task: str, storage: str, weights: str, contents: str,
                   nbytes: int, start: float, files: list) -> str:
    """The one line an export command prints: source, model, task, storage, compression, what DST holds
    (``contents``), its size and the time taken, the tokenizer copy."""
    from .coreml.source import tokenizer_folder

    copied = f"; tokenizer ({len(files)} files) -> {tokenizer_folder(args.dst)}" if args.copy_tokenizer else ""
    return (f"exported {args.src} ({type(model).__name__}, task {task}, {storage}, compression {weights}"
            f"{_stored_as_is(model)}) -> {args.dst}: {contents}; {_human(nbytes)} in "
            f"{time.perf_counter() - start:.1f} s{copied}")


def _export_coreml(args: argparse.Namespace) -> int:
    from functools import partial

    from .coreml import export_coreml, export_decoder, import_coremltools, package_summary
    from .coreml.compress import describe

    start = time.perf_counter()
    model, task, job, compress = prepare_export(args, ".mlpackage", "Core ML")
    try:
        import_coremltools(verbose=args.verbose, lean=True)  # interruptible, and fast: no torch/sklearn probes
    except ImportError as e:
        raise ValueError(f"[export-coreml] needs coremltools (pip install coremltools): {e}") from e
    options = dict(precision=args.precision, minimum_deployment_target=args.target, verbose=args.verbose)
    files = run_export(args, model, job, compress, {"decoder": partial(export_decoder, **options),
                                                    "single": partial(export_coreml, **options)})
    summary = package_summary(args.dst)
    funcs = "; ".join(f"{name}({', '.join(f'{k} {v}' for k, v in f['inputs'].items())}) -> {', '.join(f['outputs'])}"
                      for name, f in summary["functions"].items())
    states = f", {len(summary['states'])} state(s)" if summary["states"] else ""
    weights = compress if compress == "ternary-dense" else describe(compress)
    print(export_summary(args, model, task, args.precision, weights, funcs + states, summary["bytes"], start, files))
    return 0


# --------------------------------------------------------------------------- commands

# The commands of this module, composed with the language-model ones by mlx_zeta.cli.
COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (_add_convert, _add_export_coreml)
