"""Math rendered to MathML at build time (latex2mathml), which browsers display natively: the site needs
no MathJax script from a CDN, so it works offline and its pages load without console errors."""

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.util import logging

logger = logging.getLogger(__name__)


def mathml(self, node: nodes.Element, display: str) -> str:
    latex = node.astext()
    try:
        return convert(latex, display=display)
    except Exception as exc:  # noqa: BLE001  (a formula latex2mathml cannot read: a warning, -W fails the build)
        logger.warning(f"[zeta-mathml] cannot render {latex!r}: {exc}", location=node)
        return f"<code>{self.encode(latex)}</code>"


def visit_inline(self, node: nodes.Element) -> None:
    self.body.append(mathml(self, node, "inline"))
    raise nodes.SkipNode


def visit_block(self, node: nodes.Element) -> None:
    if node.get("number"):
        self.body.append(f'<span class="eqno">({node["number"]})</span>')
    self.body.append(f'<div class="math">{mathml(self, node, "block")}</div>')
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathml", (visit_inline, None), (visit_block, None))
    app.config.html_math_renderer = "mathml"
    return {"version": "1", "parallel_read_safe": True}
