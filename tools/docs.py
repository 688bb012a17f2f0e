"""Build the documentation site (Sphinx, ``docs/``): the one home of the commands ``make docs`` and the tests run.

    python tools/docs.py html       # the site, into site/ (warnings are errors)
    python tools/docs.py doctest    # run every executed block of the guides and the docstrings' examples
    python tools/docs.py doctest --plant "guides/quickstart.md:TEXT"

Both builds start from a fresh environment (``-E``): an incremental build would not repeat the warnings of pages
it did not re-read. Doctrees and the doctest report go to ``build/docs/``. ``--plant PAGE:TEXT`` appends TEXT
(``\\n`` for a newline) to a copy of PAGE in a temporary copy of ``docs/`` and builds that copy into a temporary
folder: a planted broken cross-reference or failing block must make the build fail (``tests/test_docs.py``).
Exit status: Sphinx's (0 when the build has no warning and, for doctest, no failure).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SITE = ROOT / "site"
BUILD = ROOT / "build" / "docs"  # doctrees, the doctest report, the browser check's screenshots


def sphinx(builder: str, source: Path, out: Path, doctrees: Path, pages: list[str] = ()) -> subprocess.CompletedProcess:
    """``sphinx-build`` with warnings as errors (all reported, then exit 1); pages: only those (doctest)."""
    cmd = [sys.executable, "-m", "sphinx", "-b", builder, "-E", "-W", "--keep-going", "-q",
           "-d", str(doctrees), str(source), str(out), *[str(source / p) for p in pages]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def build(builder: str, plant: str | None = None, pages: list[str] = ()) -> subprocess.CompletedProcess:
    """Build ``docs/`` with ``builder`` ("html" into site/, "doctest" into build/docs/doctest/), or a planted copy."""
    if plant is None:
        out = SITE if builder == "html" else BUILD / builder
        return sphinx(builder, DOCS, out, BUILD / "doctrees", pages)
    page, _, text = plant.partition(":")
    if not (DOCS / page).is_file():
        raise SystemExit(f"tools/docs.py: --plant: expected PAGE:TEXT with PAGE a file under docs/, got {page!r}")
    with tempfile.TemporaryDirectory(prefix="mlx-zeta-docs-plant-") as tmp:
        source = Path(tmp) / "docs"
        shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("__pycache__", "_generated"))
        shutil.copy(ROOT / "BENCHMARKS.md", Path(tmp))  # rendered by docs/guides/benchmarks.md
        with open(source / page, "a") as f:
            f.write("\n" + text.replace("\\n", "\n") + "\n")
        return sphinx(builder, source, Path(tmp) / "out", Path(tmp) / "doctrees", pages)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builder", choices=["html", "doctest"])
    parser.add_argument("pages", nargs="*", help="only these pages, relative to docs/ (doctest)")
    parser.add_argument("--plant", help="PAGE:TEXT appended to a temporary copy of docs/PAGE first")
    args = parser.parse_args(argv)
    done = build(args.builder, args.plant, args.pages)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if args.builder == "doctest" and args.plant is None:
        report = BUILD / "doctest" / "output.txt"
        if report.exists():
            print("".join(report.read_text().partition("Doctest summary")[1:]).rstrip())
    elif args.builder == "html" and done.returncode == 0 and args.plant is None:
        print(f"site: {SITE / 'index.html'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
