"""coremltools in this process: imported once, quietly and interruptibly; quiet while it converts.

Three habits of coremltools 9 meet every export and every read of a package:

* its import probes optional frameworks (torch, scikit-learn, TensorFlow, transformers, scipy,
  ...), each inside a bare ``except:``, so a Ctrl-C that lands in one is swallowed and the import
  goes on (with the framework marked missing);
* the import logs version warnings about those frameworks and "Failed to load _MLModelProxy"
  lines (the Core ML runtime exists only on macOS) through the ``coremltools`` logger;
* ``ct.convert`` draws a tqdm progress bar for each of its pass pipelines.

:func:`import_coremltools` imports it under a SIGINT handler that remembers a Ctrl-C the import
swallowed and raises ``KeyboardInterrupt`` as soon as the import returns (a half-imported
coremltools is dropped from ``sys.modules`` first); ``lean=True``, for processes that convert
only MIL programs (the ``mlx-zeta`` command line), skips the framework probes for frameworks
not imported yet, which also makes the import several times faster. :func:`quiet_coremltools`
imports it and silences its logger, its warnings and its progress bars for the duration of a
block, then restores all three.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

__all__ = ["import_coremltools", "quiet_coremltools", "FRAMEWORK_PROBES"]

# The optional frameworks coremltools' import probes (coremltools/_deps); none is needed to convert a MIL program.
FRAMEWORK_PROBES = ("torch", "torchvision", "torchaudio", "torchao", "executorch", "sklearn", "tensorflow",
                    "xgboost", "libsvm", "transformers")
_LOGGER = "coremltools"


@contextmanager
def _quiet_logs(verbose: bool) -> Iterator[None]:
    """The ``coremltools`` logger at CRITICAL and coremltools' warnings ignored, unless ``verbose``."""
    if verbose:
        yield
        return
    logger = logging.getLogger(_LOGGER)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"coremltools(\.|$)")
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def _skipped(names: Sequence[str]) -> Iterator[None]:
    """``import name`` fails at once (ImportError) for each of ``names`` not imported yet."""
    added = [n for n in names if n not in sys.modules]
    for name in added:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in added:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextmanager
def _interrupt_survives() -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` when the block ends if a Ctrl-C arrived in it, even one that a
    bare ``except:`` inside the block swallowed. Only in the main thread with Python's default
    SIGINT handler (anything else is the application's business)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []

    def remember(signum, frame):
        caught.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    except Exception:
        if not caught:  # an error of its own; else one the interrupt caused, which the interrupt replaces
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def import_coremltools(*, verbose: bool = False, lean: bool = False):
    """Import coremltools (once per process) and return it.

    A Ctrl-C during the import raises ``KeyboardInterrupt`` (at the latest when the import
    returns); nothing of the interrupted import stays in ``sys.modules``.

    Args:
        verbose (bool): let the import log its warnings. Default: ``False``.
        lean (bool): skip coremltools' probes of torch, scikit-learn, TensorFlow, transformers and
            the like (``FRAMEWORK_PROBES``) that are not imported yet; coremltools then cannot
            convert models of those frameworks in this process. Default: ``False``.
    """
    if sys.modules.get("coremltools") is not None:
        return sys.modules["coremltools"]
    before = set(sys.modules)
    try:
        with _quiet_logs(verbose), _skipped(FRAMEWORK_PROBES if lean else ()), _interrupt_survives():
            import coremltools
    except BaseException:
        for name in set(sys.modules) - before:
            if name == "coremltools" or name.startswith("coremltools."):
                del sys.modules[name]
        raise
    return coremltools


def _progress_bars() -> list:
    """``(module, attribute, tqdm)`` for every tqdm class a loaded coremltools module holds."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    if tqdm is None:
        return []
    found = []
    for name, module in list(sys.modules.items()):
        if module is not None and (name == _LOGGER or name.startswith(_LOGGER + ".")):
            found += [(module, attr, tqdm) for attr in ("tqdm", "_tqdm") if getattr(module, attr, None) is tqdm]
    return found


@contextmanager
def quiet_coremltools(verbose: bool = False) -> Iterator:
    """Yield coremltools (imported by :func:`import_coremltools`); unless ``verbose``, its logger,
    its warnings and its tqdm progress bars are silenced until the block ends."""
    ct = import_coremltools(verbose=verbose)
    with _quiet_logs(verbose):
        bars = [] if verbose else _progress_bars()
        for module, attr, tqdm in bars:
            setattr(module, attr, functools.partial(tqdm, disable=True))
        try:
            yield ct
        finally:
            for module, attr, tqdm in bars:
                setattr(module, attr, tqdm)
