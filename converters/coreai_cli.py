"""The ``export-coreai`` command of the ``mlx-zeta`` command line (:mod:`mlx_zeta.cli` parses, runs it
and sets the exit status): a model folder to a Core AI bundle for iOS/macOS 27.

    mlx-zeta export-coreai SRC OUT.aimodel [--task lm|encoder|vit|auto] [--capacity N]
                           [--prefill-lens N[,N...]] [--seq-len N] [--pooling none|mean|cls] [--normalize]
                           [--weights float16|float32] [--compress MODE] [--compress-layer PATTERN=MODE ...]
                           [--dynamic-prefill MIN,MAX] [--copy-tokenizer] [--author S] [--license S]
                           [--description S] [--overwrite]

``export-coreml``'s twin: the same loading (``from_pretrained``), tasks, options, checks, metadata keys,
tokenizer copy and summary line, all of it :mod:`mlx_zeta.converters.cli`'s (``add_export_arguments``,
``prepare_export``, ``run_export``, ``export_summary``), so the two commands cannot drift apart. A decoder
LM becomes a stateful bundle with ``prefill_{N}`` functions and ``decode``, the KV cache as states
(:func:`~mlx_zeta.converters.coreai.export_decoder_coreai`); a BERT encoder (optionally pooled inside the
model) and a ViT become single-function bundles (:func:`~mlx_zeta.converters.coreai.export_coreai`).

What differs from ``export-coreml``: ``--weights float16|float32`` is the storage of the float weight
matrices (compute in the bundle is always float32), in place of ``--precision`` / ``--target``; ternary
layers are always 2-bit tables (no ``ternary-dense``); ``coreai-core`` prints nothing, so there is no
``--verbose``. The bundle is written atomically (an existing non-empty OUT is replaced only with
``--overwrite``). Without ``coreai-core`` the command exits 2 with one line saying how to install it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

from .cli import COMPRESS_HELP, add_export_arguments, export_summary, prepare_export, run_export

__all__ = ["COMMANDS"]

SUFFIX = ".aimodel"


def _add_export_coreai(sub: argparse._SubParsersAction) -> None:
    from .coreai.export import WEIGHTS
    from .coreml.compress import MODES

    about = ("Export an mlx_zeta / Hugging Face model folder to a Core AI bundle (iOS/macOS 27): decoder LMs as "
             "one stateful bundle with prefill and decode functions, BERT encoders, ViT image classifiers. "
             "Needs coreai-core (pip install 'mlx-zeta[coreai]').")
    p = sub.add_parser("export-coreai", help="export a model folder to a Core AI .aimodel bundle", description=about)
    add_export_arguments(p, SUFFIX, MODES, COMPRESS_HELP.format(modes=", ".join(MODES), default="--weights",
                                                                 extra="Ternary layers are 2-bit tables. "))
    p.add_argument("--weights", choices=WEIGHTS, default="float16",
                   help="storage of the float weight matrices; compute is float32 either way (default: float16)")
    p.add_argument("--dynamic-prefill", type=_parse_range, metavar="MIN,MAX",
                   help="decoder LMs: also a function 'prefill' taking any number of tokens in [MIN, MAX]")
    p.set_defaults(handler=_export_coreai)


def _parse_range(text: str) -> tuple:
    """``"1,256"`` -> ``(1, 256)``: the token counts a dynamic prefill function takes (checked against
    ``--capacity`` by :func:`~mlx_zeta.converters.coreai.export_decoder_coreai`)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX token counts such as 1,256, got {text!r}")
    return int(parts[0]), int(parts[1])


def _contents(path: Path) -> tuple:
    """``(what the bundle holds, in words; its bytes)``: its functions, (inputs) -> outputs, states, read
    from its metadata (names sorted: the bundle keeps them in no order, and they are passed by name)."""
    from .coreai import read_bundle_metadata

    meta = read_bundle_metadata(path)
    functions = json.loads(meta["user"].get("mlx_zeta.functions", '["main"]'))
    states = f", {len(meta['states'])} state(s)" if meta["states"] else ""
    words = (f"function(s) {', '.join(functions)}: ({', '.join(sorted(meta['inputs']))}) -> "
             f"{', '.join(sorted(meta['outputs']))}{states}")
    return words, sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _export_coreai(args: argparse.Namespace) -> int:
    from functools import partial

    from .coreai import export_coreai, export_decoder_coreai, import_coreai
    from .coreml.compress import describe

    start = time.perf_counter()
    model, task, job, compress = prepare_export(args, SUFFIX, "Core AI")
    if args.dynamic_prefill is not None and task != "lm":
        raise ValueError(f"[{args.command}] --dynamic-prefill is for decoder LMs; {args.src} is a {task} model")
    try:
        import_coreai(args.command)
    except ImportError as e:  # one line: what is missing and how to install it
        raise ValueError(str(e)) from None
    files = run_export(args, model, job, compress, {"decoder": partial(export_decoder_coreai, weights=args.weights,
                                                                       dynamic_prefill=args.dynamic_prefill),
                                                    "single": partial(export_coreai, weights=args.weights)})
    contents, nbytes = _contents(args.dst)
    print(export_summary(args, model, task, f"{args.weights} weights", describe(compress), contents, nbytes, start,
                         files))
    return 0


# The command of this module, composed with the others by mlx_zeta.cli.
COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (_add_export_coreai,)
