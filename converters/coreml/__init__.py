"""Core ML export (ML Program ``.mlpackage``, iOS 18 / macOS 15) by lowering the captured MLX graph.

``export_coreml(model, example_inputs, path)`` saves a package; ``to_mil`` returns the MIL
program; ``export_decoder(model, path, capacity=, prefill_len=)`` saves a decoder LM as one
stateful package with ``prefill`` and ``decode`` functions (:mod:`.stateful`). :mod:`.lower`
holds the graph passes (attention fusion, fp16 safety) and :mod:`.ops` the emitters registered
in its table (``EMITTERS``, ``register_emitter``). coremltools is imported inside the functions.
"""

from .export import export_coreml, ternary_standins, to_mil
from .stateful import export_decoder, package_summary
from .lower import EMITTERS, MASK_FILL, LoweringError, capture, lower_graph, register_emitter
from .evaluate import Evaluator, evaluate  # noqa: E402
from .lint import Finding, lint  # noqa: E402

__all__ = ["export_coreml", "export_decoder", "package_summary", "to_mil", "ternary_standins", "EMITTERS",
           "MASK_FILL", "LoweringError", "capture", "lower_graph", "register_emitter",
           "Evaluator", "evaluate", "Finding", "lint"]
