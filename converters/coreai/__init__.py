"""Core AI export (``.aimodel`` bundles for iOS/macOS 27) by lowering the captured MLX graph, checked by
Apple's own runtime on Linux.

``export_coreai(model, example_inputs, path)`` saves a single-function bundle; ``export_decoder_coreai(model, path,
capacity=, prefill_lens=)`` a decoder LM's stateful bundle with ``prefill_{L}`` and ``decode`` functions sharing one
copy of the weights (:mod:`~mlx_zeta.converters.coreai.stateful`); ``Bundle(path)`` runs a saved bundle with
``coreai-core``'s runtime (:mod:`~mlx_zeta.converters.coreai.runtime`).

Modules, each importing only those before it: :mod:`~mlx_zeta.converters.coreai.runtime` (the lazy import of
``coreai`` and every use of its unstable parts), :mod:`~mlx_zeta.converters.coreai.weights` (compressed weights as
Core AI ops), :mod:`~mlx_zeta.converters.coreai.graph` (the emitter table, the lowering context, the precision
policy), :mod:`.dynamic` (a graph over a dynamic token count, from traces at fixed lengths),
:mod:`~mlx_zeta.converters.coreai.ops` (the emitters), :mod:`~mlx_zeta.converters.coreai.lower` (the driver),
:mod:`~mlx_zeta.converters.coreai.export`, :mod:`~mlx_zeta.converters.coreai.stateful`. The captured graph, the graph
passes, the compression policy and math, the layer stand-ins and the metadata keys are the Core ML backend's
(:mod:`mlx_zeta.converters.coreml`), shared rather than copied. ``coreai`` is imported inside the functions: this
package imports without it.
"""

from .export import export_coreai, read_bundle_metadata
from .graph import EMITTERS, LoweringError, register_emitter
from .runtime import Bundle, available, import_coreai
from .stateful import export_decoder_coreai, state_names

__all__ = ["export_coreai", "read_bundle_metadata", "EMITTERS", "LoweringError", "register_emitter", "Bundle",
           "available", "import_coreai", "export_decoder_coreai", "state_names"]
