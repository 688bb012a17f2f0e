"""``{shell}``: a shell command shown as a console block and run by the doctest builder, in the page's
scratch folder, in order with the page's ``{testcode}`` blocks (group ``default``).

The command runs with ``bash -e`` and the documentation's Python first on ``PATH`` (so ``mlx-zeta`` is the
installed entry point); a non-zero exit fails the page's doctest, with the command's output in the report.
"""

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

RUNNER = '''
def _zeta_shell(script: str) -> None:
    """Run ``script`` as the docs' {shell} blocks do (see docs/_ext/zeta_shell.py)."""
    import os, subprocess, sys
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["bash", "-e", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{script!r} exited {done.returncode}:\\n{done.stdout}{done.stderr}")
'''


class Shell(SphinxDirective):
    has_content = True

    def run(self) -> list[nodes.Node]:
        script = "\n".join(self.content)
        shown = "\n".join(f"$ {line}" if line and not line.startswith(" ") else line for line in self.content)
        block = nodes.literal_block(shown, shown, language="console")
        code = f"_zeta_shell({script!r})"
        test = nodes.comment(code, code, testnodetype="testcode", groups=["default"], options={})
        self.set_source_info(block)
        self.set_source_info(test)
        return [block, test]


def setup(app):
    app.add_directive("shell", Shell)
    app.config.doctest_global_setup = (app.config.doctest_global_setup or "") + RUNNER
    return {"version": "1", "parallel_read_safe": True}
