"""The repository's scripts (tools/, examples/, docs/_ext/: files, not packages) loaded as modules by the tests."""

import importlib.util
import sys
from pathlib import Path


def load_script(path: Path, name: str):
    """``path`` executed as the module ``name``, registered in ``sys.modules`` first (dataclasses and pickling look
    their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
