"""Cross-references the Python domain cannot resolve by itself, resolved by one rule so that only a name
that does not exist is an error (nitpicky + ``-W``: a build failure).

* A short or partial name (``save_pretrained``, ``graph.EMITTERS``) names the documented object that ends with
  it, the one nearest the referring module when several do (a tie is shown as code, as below).
* A name that exists in the code but is not public (a helper in ``mlx_zeta.structs.decoding``) is shown as code,
  without a link: the API reference documents public names only.
* Anything else is left unresolved, and Sphinx warns.
"""

from __future__ import annotations

import importlib
import sys

from sphinx.util.nodes import make_refnode

ROOT = "mlx_zeta"


def nearest(candidates: list[str], module: str) -> str | None:
    """The candidate sharing the longest dotted prefix with ``module``; None when that is a tie."""
    def shared(name: str) -> int:
        a, b = name.split("."), module.split(".")
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    ranked = sorted(candidates, key=shared, reverse=True)
    if len(ranked) > 1 and shared(ranked[0]) == shared(ranked[1]):
        return None
    return ranked[0] if ranked else None


def exists(dotted: str) -> bool:
    """Whether ``dotted`` names an attribute of an importable mlx_zeta module (``__main__`` never imported)."""
    parts = dotted.split(".")
    if parts[0] != ROOT or "__main__" in parts:
        return False
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = sys.modules.get(module) or importlib.import_module(module)
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    module = node.get("py:module") or ""
    klass = node.get("py:class") or ""
    domain = env.get_domain("py")
    found = [name for name in domain.objects if name == target or name.endswith("." + target)]
    best = nearest(found, f"{module}.{klass}".strip(".")) if found else None
    if best is not None:
        entry = domain.objects[best]
        return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, best)
    scopes = [f"{module}.{klass}", module, *[module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)], ""]
    if any(exists(f"{scope}.{target}".strip(".")) for scope in scopes if scope.strip(".") or target.startswith(ROOT)):
        return contnode  # a real but private name: code, no link
    return None


def setup(app):
    app.connect("missing-reference", resolve)
    return {"version": "1", "parallel_read_safe": True}
