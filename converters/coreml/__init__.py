"""Core ML export (ML Program ``.mlpackage``, iOS 18 / macOS 15) by lowering the captured MLX graph.

``export_coreml(model, example_inputs, path)`` saves a package; ``to_mil`` returns the MIL
program; ``export_decoder(model, path, capacity=, prefill_lens=)`` saves a decoder LM as one
stateful package with ``prefill_{L}`` and ``decode`` functions (:mod:`~mlx_zeta.converters.coreml.stateful`);
``write_metadata`` / ``read_metadata`` edit and read a saved package's metadata (:mod:`.metadata`);
``EncoderPooling`` pools an encoder's output inside the package (:mod:`.heads`), and :mod:`.source` holds
what a package records of its source checkpoint (special token ids, tokenizer files).

Modules, each importing only those before it: :mod:`~mlx_zeta.converters.coreml.graph` (graph types, the emitter table
``EMITTERS``/``register_emitter``, the lowering context and precision policy), :mod:`.passes` (graph rewrites:
attention fusion, pooling, ...), :mod:`~mlx_zeta.converters.coreml.ops` (the emitters),
:mod:`~mlx_zeta.converters.coreml.lower` (the driver: ``capture``, ``lower_graph``), :mod:`.compress` (compressed
weights' math and the ``compress`` policy), :mod:`~mlx_zeta.converters.coreml.weights` (which weights are compressed,
layer stand-ins), :mod:`~mlx_zeta.converters.coreml.export`, :mod:`~mlx_zeta.converters.coreml.stateful`;
:mod:`.metadata`, :mod:`.evaluate` and :mod:`.lint` read saved programs, each opened and checked by :mod:`.package`.
coremltools is imported inside the functions, through :mod:`~mlx_zeta.converters.coreml.runtime` (quietly, and
interruptibly by Ctrl-C).
"""

from . import compress
from .evaluate import Evaluator, evaluate
from .export import export_coreml, to_mil
from .graph import EMITTERS, MASK_FILL, LoweringError, register_emitter
from .heads import EncoderPooling
from .lint import Finding, lint
from .lower import capture, lower_graph
from .metadata import read_metadata, write_metadata
from .package import PackageError, open_package, package_summary
from .runtime import import_coremltools, quiet_coremltools
from .stateful import export_decoder
from .weights import export_standins

#: The weight-compression modes ``export_coreml(compress=...)`` and ``export_decoder`` accept
#: (``"none"``, ``"int8"``, ``"int4-block32"``, ``"palettize4"``, ...; :mod:`mlx_zeta.converters.coreml.compress`).
COMPRESS_MODES = compress.MODES

__all__ = ["export_coreml", "export_decoder", "package_summary", "to_mil", "export_standins", "COMPRESS_MODES",
           "EMITTERS",
           "MASK_FILL", "LoweringError", "capture", "lower_graph", "register_emitter",
           "Evaluator", "evaluate", "Finding", "lint", "open_package", "PackageError", "import_coremltools",
           "quiet_coremltools", "read_metadata", "write_metadata", "EncoderPooling"]
