"""The API reference: ``.. zeta-api:: mlx_zeta.nn`` documents every name in that package's ``__all__``.

Names are grouped by the module that defines them (a section per module, with its docstring), classes with
their documented members and ``__call__`` (signature and docstring), functions and data with theirs. Each
object is described once, on the page of the deepest public package that exports it; shallower packages that
re-export it (``mlx_zeta.generate``) get a short entry pointing there, so both spellings resolve as
cross-references. A plain module in a package's ``__all__`` (``kernels.cpu``, ``lm.server``) is a namespace: its
own ``__all__`` is documented in its section. An undocumented ``__call__`` points at the class's ``Shape:``
section rather than inheriting Python's "Call self as a function."

The build warns (``-W``: fails) when a public name has no docstring of its own, when a package with an
``__all__`` has no API page, or when a class's ``__call__`` has no docstring and its class docstring no
``Shape:`` section (nothing would say what it takes and returns).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)
ROOT = "mlx_zeta"
ROOTS = [ROOT, "mlx_zeta.converters"]  # converters ships inside mlx_zeta from another folder (package-dir)
DOCUMENTED = "zeta_api_packages"  # env attribute: the packages that have a page


def public_packages() -> list[str]:
    """Every package under ``mlx_zeta`` with an ``__all__`` (``converters`` too, which lives in another folder)."""
    found, todo = list(ROOTS), [importlib.import_module(root) for root in ROOTS]
    while todo:
        pkg = todo.pop()
        for name in submodules(pkg.__name__, packages=True):
            sub = importlib.import_module(name)
            todo.append(sub)
            if hasattr(sub, "__all__") and name not in found:
                found.append(name)
    return sorted(set(found))


def submodules(package: str, packages: bool = False) -> list[str]:
    """The package's public submodules (``packages=False``) or subpackages (``True``), never imported here."""
    pkg = importlib.import_module(package)
    return sorted(info.name for info in pkgutil.iter_modules(pkg.__path__, package + ".")
                  if info.ispkg == packages and not info.name.rsplit(".", 1)[-1].startswith("_"))


def home_package(obj: object, packages: list[str]) -> str | None:
    """The deepest public package that exports ``obj`` (by identity), where it is described."""
    homes = [p for p in packages if any(getattr(importlib.import_module(p), n, None) is obj
                                        for n in importlib.import_module(p).__all__)]
    module = getattr(obj, "__module__", "") or ""
    inside = [p for p in homes if module == p or module.startswith(p + ".")]
    return max(inside or homes, key=len) if homes else None


def data_doc(package: str, name: str) -> str | None:
    """The ``#:`` comment documenting a module-level constant, searched in the package and in its loaded
    modules that hold the same object (never importing one: ``__main__`` modules run on import)."""
    obj = getattr(importlib.import_module(package), name)
    modules = [package] + sorted(m for m, mod in list(sys.modules.items())
                                 if m.startswith(package + ".") and getattr(mod, name, None) is obj)
    for module in modules:
        try:
            docs = ModuleAnalyzer.for_module(module).find_attr_docs()
        except Exception:  # noqa: BLE001  (a module without source: nothing to find)
            continue
        if ("", name) in docs:
            return "\n".join(docs[("", name)])
    return None


def own_doc(obj: object) -> str | None:
    """The object's own docstring: a class's is never inherited; a dataclass's generated signature is not one."""
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    if not doc or (inspect.isclass(obj) and doc.startswith(obj.__name__ + "(")):
        return None
    return doc


def kind(obj: object) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj) or hasattr(obj, "__wrapped__"):
        return "function"
    return "data"  # constants, type aliases, sentinel objects: documented by a '#:' comment


class ZetaApi(SphinxDirective):
    """``.. zeta-api:: PACKAGE``: the package's public names, described (or pointed at) as set out above."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        self.env.__dict__.setdefault(DOCUMENTED, set()).add(package)
        self.env.note_dependency(__file__)
        lines = self.rst(package)
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=f"<zeta-api {package}>"), container)
        return container.children

    def rst(self, package: str) -> list[str]:
        mod = importlib.import_module(package)
        packages = public_packages()
        groups: dict[str, list[str]] = {}
        pointers = []
        for name in mod.__all__:
            obj = getattr(mod, name)
            if kind(obj) == "module":
                if hasattr(obj, "__path__"):  # a subpackage: its own page
                    pointers.append(f"* :mod:`{obj.__name__}`: {self.summary(obj)}")
                else:  # a module used as a namespace (kernels.cpu, lm.server): its __all__ in its section
                    for attr in obj.__all__:
                        groups.setdefault(obj.__name__, []).extend(self.describe(obj.__name__, attr,
                                                                                 getattr(obj, attr)))
                continue
            home = home_package(obj, packages) if kind(obj) != "data" else package
            if home != package:  # described on its home's page; an entry here so both names resolve
                groups.setdefault("", []).extend(self.alias(package, name, obj, home))
                continue
            module = getattr(obj, "__module__", None) if kind(obj) != "data" else None
            parent, _, last = (module or "").rpartition(".")
            if parent != package or last.startswith("_"):
                module = package  # defined in the package itself, a private module or deeper: with the package
            groups.setdefault(module, []).extend(self.describe(package, name, obj))
        return self.assemble(package, groups, pointers)

    def assemble(self, package: str, groups: dict[str, list[str]], pointers: list[str]) -> list[str]:
        lines = [f".. py:module:: {package}", "", *self.docstring_lines(importlib.import_module(package)), ""]
        if pointers:
            lines += [".. rubric:: Subpackages", "", *pointers, ""]
        lines += groups.pop(package, [])
        if "" in groups:
            lines += [".. rubric:: Re-exported here", "", *groups.pop("")]
        for module in submodules(package):
            groups.setdefault(module, [])
        for module in sorted(groups):
            title = f"``{module}``"
            attr = getattr(importlib.import_module(package), module.rsplit(".", 1)[-1], None)
            clash = attr is not None and attr is not sys.modules.get(module)
            lines += [title, "-" * len(title), "", f".. automodule:: {module}"]
            lines += ["   :no-index:", ""] if clash else [""]  # lm.generate: the function owns the name
            lines += [f".. py:currentmodule:: {package}", "", *groups[module]]
        return lines

    def describe(self, package: str, name: str, obj: object) -> list[str]:
        target = f"{package}.{name}"
        what = kind(obj)
        if what == "data":
            doc = data_doc(package, name)
            if doc is None:
                logger.warning(f"[zeta-api] {target} is public but has no '#:' doc comment",
                               location=self.get_location())
            body = [f"   {line}" for line in (doc or "").splitlines()]
            return [f".. py:data:: {name}", f"   :module: {package}", "", *body, ""]
        if own_doc(obj) is None:
            logger.warning(f"[zeta-api] {target} is public but has no docstring", location=self.get_location())
        if what in ("class", "exception"):
            self.check_call(target, obj)
            options = ["   :members:", "   :special-members: __call__"]
            if "__call__" in vars(obj):
                options.append("   :undoc-members:")
            return [f".. auto{what}:: {target}", *options, ""]
        return [f".. autofunction:: {target}", ""]

    def check_call(self, target: str, cls: type) -> None:
        call = vars(cls).get("__call__")
        if call is not None and not call.__doc__ and "Shape" not in (cls.__doc__ or ""):
            logger.warning(f"[zeta-api] {target}.__call__ has no docstring and {target} no 'Shape:' section",
                           location=self.get_location())

    def alias(self, package: str, name: str, obj: object, home: str) -> list[str]:
        directive = {"class": "py:class", "exception": "py:exception", "function": "py:function"}[kind(obj)]
        return [f".. {directive}:: {name}", f"   :module: {package}", "   :no-contents-entry:", "",
                f"   The same object as :{self.role(obj)}:`{home}.{name}`.", ""]

    @staticmethod
    def role(obj: object) -> str:
        return {"class": "class", "exception": "exc", "function": "func"}[kind(obj)]

    @staticmethod
    def summary(module: object) -> str:
        return ((module.__doc__ or "").strip().splitlines() or [""])[0]

    @staticmethod
    def docstring_lines(module: object) -> list[str]:
        return inspect.cleandoc(module.__doc__ or "").splitlines()


def call_docstring(app, what, name, obj, options, lines) -> None:
    """An undocumented ``__call__`` would inherit Python's "Call self as a function.": point at the class's
    **Shape** section instead (``check_call`` makes sure there is one)."""
    if name.endswith(".__call__") and " ".join(lines).strip() == "Call self as a function.":
        lines[:] = ["Apply the layer to the arguments above: the class's **Shape** section gives their shapes and "
                    "the output's."]


def check_every_package(app, env) -> None:
    """After reading: every public package has a page."""
    have = getattr(env, DOCUMENTED, set())
    for package in public_packages():
        if package not in have:
            logger.warning(f"[zeta-api] {package} has an __all__ but no API page (add '.. zeta-api:: {package}')")


def merge(app, env, docnames, other) -> None:
    env.__dict__.setdefault(DOCUMENTED, set()).update(getattr(other, DOCUMENTED, set()))


def setup(app):
    app.add_directive("zeta-api", ZetaApi)
    app.connect("env-check-consistency", check_every_package)
    app.connect("autodoc-process-docstring", call_docstring)
    app.connect("env-merge-info", merge)
    return {"version": "1", "parallel_read_safe": True, "env_version": 1}
