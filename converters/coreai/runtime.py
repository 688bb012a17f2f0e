"""Apple's ``coreai-core`` in this process: imported lazily, and the one home of what we use of it.

Core AI (iOS/macOS 27) runs ``.aimodel`` bundles: MLIR bytecode of ``coreai`` dialect graphs plus a
``metadata.json``. The ``coreai-core`` wheel builds them (``coreai.authoring``) and, on Linux x86_64
and macOS, *executes* them on the CPU (``coreai.runtime``), which is how every export of
:mod:`mlx_zeta.converters.coreai` is checked against MLX.

What is used beyond ``coreai.authoring``'s versioned surface, all of it named here and nowhere else:

* ``GraphOp`` (``coreai.authoring.graph_builder``): a graph with argument types given explicitly
  (the ``@graph`` decorator takes tensor annotations only);
* the MLIR attributes ``DictAttr``/``StringAttr``/``ArrayAttr`` and ``RankedTensorType`` of
  ``coreai._compiler.ir`` (documented as unstable): a state (KV cache) is declared the way
  ``coreai-torch`` declares a mutated buffer, an argument whose attributes carry
  ``MutableBuffers.buffer_mutation = <output name>``; the pre-compilation rewrite turns it into a
  ``!coreai.handle`` with ``read_handle``/``write_handle``;
* ``ShapedType.get_dynamic_size`` and ``Value.set_type`` of ``coreai._compiler.ir``: a dynamic dim
  (``?``) of a function's input, and a value typed with its MLX shape where type inference made
  every dim of a run-time shape dynamic (:mod:`.dynamic`);
* ``DenseResourceElementsAttr`` + ``ConstantOp``: sub-byte constants (uint1/2/4 codes) packed two
  or four per byte, low bits first; ``constant(..., dtype=uint4)`` would store one byte per element,
  which the runtime misreads.

:class:`Bundle` wraps the asynchronous runtime in a synchronous, context-managed object.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np

__all__ = ["import_coreai", "available", "Bundle", "PIN", "STATE_ATTR"]

PIN = "coreai-core==1.0.0b3"
STATE_ATTR = "MutableBuffers.buffer_mutation"  # argument attribute naming the output that is its new value
_INSTALL = ("pip install 'mlx-zeta[coreai]' (coreai-core wheels: Linux x86_64 and macOS 26 arm64, "
            "Python 3.11-3.14)")


def available() -> tuple:
    """``(True, "")`` when ``coreai`` imports, else ``(False, why)`` (for skips and the CLI)."""
    try:
        import_coreai()
    except ImportError as e:
        return False, str(e)
    return True, ""


def import_coreai(owner: str = "export_coreai"):
    """The ``coreai`` package; ``ImportError("[owner] needs coreai-core ...")`` in one line when it is missing."""
    if sys.version_info < (3, 11):
        raise ImportError(f"[{owner}] needs coreai-core, which needs Python >= 3.11; this is "
                          f"{sys.version_info.major}.{sys.version_info.minor}")
    try:
        import coreai
        import coreai.authoring  # noqa: F401
        import coreai.runtime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"[{owner}] needs {PIN}: {_INSTALL}; import failed: {e}") from None
    return coreai


class Bundle:
    """A saved ``.aimodel`` loaded by Apple's runtime, called synchronously.

    ``with Bundle(path) as b: out = b("decode", {"input_ids": ids}, state)`` returns
    ``{output name: np.ndarray}``; ``state`` (from :meth:`new_state`) is updated in place by the
    runtime, across calls and functions. ``b.functions`` lists the functions;
    ``b.signature(fn)`` gives ``(input names, output names, state names)``.
    """

    def __init__(self, path):
        import_coreai("Bundle")
        from coreai.authoring import AIModelAsset

        self.path = Path(path)
        if not AIModelAsset.is_valid(self.path):
            raise ValueError(f"[Bundle] {self.path} is not a Core AI .aimodel bundle")
        self.asset = AIModelAsset.load(self.path)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._cm = self._model = None
        self._functions: Dict[str, object] = {}

    def __enter__(self) -> "Bundle":
        self._loop = asyncio.new_event_loop()
        self._cm = self.asset.executable()
        self._model = self._loop.run_until_complete(self._cm.__aenter__())
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._loop.run_until_complete(self._cm.__aexit__(*exc))
        finally:
            self._loop.close()
            self._functions.clear()

    @property
    def functions(self) -> list:
        return list(self._model.function_names)

    def _function(self, name: str):
        if name not in self._functions:
            if name not in self.functions:
                raise KeyError(f"[Bundle] {self.path.name} has no function {name!r}; it has {self.functions}")
            self._functions[name] = self._model.load_function(name)
        return self._functions[name]

    def signature(self, name: str) -> tuple:
        d = self._function(name).desc
        return list(d.input_names), list(d.output_names), list(d.state_names)

    @staticmethod
    def new_state(arrays: Dict[str, np.ndarray]) -> dict:
        """Runtime state buffers holding copies of ``arrays`` (e.g. zeros of each cache's shape)."""
        from coreai.runtime import NDArray

        return {k: NDArray(np.ascontiguousarray(v)) for k, v in arrays.items()}

    def __call__(self, name: str, inputs: Dict[str, np.ndarray], state: Optional[dict] = None) -> Dict[str, np.ndarray]:
        """Run the bundle's function ``name`` once (inside the ``with`` block).

        Args:
            name (str): one of :attr:`functions` (``"main"``, ``"decode"``, ``"prefill_16"``, ...).
            inputs (dict): ``{input name: np.ndarray}``, each of the shape the function declares
                (:meth:`signature` lists the names).
            state (dict, optional): runtime state buffers from :meth:`new_state`, updated in place;
                ``None`` for a function without state.

        Returns:
            dict: ``{output name: np.ndarray}``.
        """
        from coreai.runtime import NDArray

        feeds = {k: NDArray(np.ascontiguousarray(v)) for k, v in inputs.items()}
        out = self._loop.run_until_complete(self._function(name)(feeds, state=state or None))
        return {k: v.numpy() for k, v in out.items()}
