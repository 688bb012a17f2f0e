"""Sphinx configuration of the mlx-zeta documentation (``make docs`` builds it into ``site/``).

Sphinx rather than MkDocs: the docstrings are reStructuredText in MLX's style (``.. math::``, ``:class:``
roles, Google ``Args:`` sections), which autodoc + napoleon render as written; nitpicky mode turns every
unresolved cross-reference into a warning (and ``-W`` into an error); ``sphinx.ext.doctest`` executes the
guides' code blocks and the docstrings' examples. The guides are Markdown, read by MyST.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx_zeta  # noqa: E402  (routes BLAS before mlx.core is imported by autodoc)

project = "mlx-zeta"
author = "mlx-zeta developers"
copyright = "2026, mlx-zeta developers"
release = version = mlx_zeta.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "zeta_mathml",  # math as MathML, rendered at build time: no MathJax from a CDN (docs/_ext/zeta_mathml.py)
    "myst_parser",
    "zeta_xref",  # short and private names in docstrings (docs/_ext/zeta_xref.py)
    "zeta_api",  # the API pages: every public name of every subpackage (docs/_ext/zeta_api.py)
    "zeta_shell",  # {shell} blocks: shown as a console, run by the doctest builder (docs/_ext/zeta_shell.py)
    "zeta_plots",  # the benchmark plots, drawn from BENCHMARKS.md's tables (docs/_ext/zeta_plots.py)
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# Every cross-reference must resolve. Targets outside this project (MLX, numpy, torch, ...) have no
# inventory offline, so they are exempt by name; a reference to a mlx_zeta name that does not exist is not.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(mlx|mx|nn|np|numpy|torch|transformers|tokenizers|peft|coremltools|coreai|safetensors|jinja2"
               r"|starlette|uvicorn|openai|typing|collections|pathlib|os|enum|dataclasses|concurrent|threading"
               r"|json|io|abc|contextlib|inspect|functools|re|types|subprocess|array)(\..*)?"),
    (r"py:.*", r"(int|float|str|bool|bytes|dict|list|tuple|set|object|None|callable|Callable|Any|Optional|Union"
               r"|Iterable|Iterator|Sequence|Mapping|Path|type|optional|array|module|function|ndarray|Module"
               r"|Literal|Generator|Exception|ValueError|TypeError|RuntimeError|KeyError|OSError)"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shape", "Shapes", "Math"]  # headed sections, their lists kept as written

# The guides' {testcode} and {shell} blocks run in a scratch folder, one per page, on tiny models; hidden
# {testsetup} blocks may import the test suite's tiny-checkpoint makers (tests/lm_tiny.py, tests/hf_tiny.py).
doctest_global_setup = f"""
import os as _os, sys as _sys, tempfile as _tempfile
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_sys.path.insert(0, {str(Path(mlx_zeta.__file__).resolve().parents[1] / "tests")!r})
_docs_cwd = _os.getcwd()
_os.chdir(_tempfile.mkdtemp(prefix="mlx-zeta-docs-"))
import mlx_zeta
"""
doctest_global_cleanup = "_os.chdir(_docs_cwd)"
doctest_test_doctest_blocks = "default"  # the docstrings' >>> examples run too

html_theme = "furo"
html_title = f"mlx-zeta {release}"
html_static_path = ["_static"]
html_favicon = "_static/logo.svg"  # also spares the browser a request for /favicon.ico (a 404)
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}
