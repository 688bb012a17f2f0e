"""The documentation site (docs/, built by tools/docs.py): it builds with no warning (every cross-reference
resolves, every public name has a page and a docstring), every executed block of the guides and every docstring
example runs, a planted broken reference or failing block fails the build, and the built site works in a real
browser (Debian's Chromium through Playwright; skipped, with the reason, where either is missing)."""

import functools
import http.server
import importlib
import inspect
import re
import shutil
import threading
from pathlib import Path

import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
site_builder = load_script(ROOT / "tools" / "docs.py", "mlx_zeta_tools_docs")

GUIDES = sorted(p.stem for p in (ROOT / "docs" / "guides").glob("*.md"))
NOT_EXECUTED = {"benchmarks": "rendered from BENCHMARKS.md; its commands are timing runs, not examples"}


@pytest.fixture(scope="module")
def site():
    """The site, built once into site/ as ``make docs`` builds it."""
    done = site_builder.build("html")
    assert done.returncode == 0, f"make docs failed:\n{done.stdout}{done.stderr}"
    return site_builder.SITE


def test_site_builds_with_no_warning_and_documents_every_public_name(site):
    zeta_api = load_script(ROOT / "docs" / "_ext" / "zeta_api.py", "mlx_zeta_docs_api")
    api_pages = sorted((site / "api").glob("*.html"))
    packages = zeta_api.public_packages()
    assert len(api_pages) == len(packages) + 1, [p.name for p in api_pages]  # + the index of the reference
    html = "".join(p.read_text() for p in api_pages)
    for package in packages:
        for name in importlib.import_module(package).__all__:
            obj = getattr(importlib.import_module(package), name)
            if inspect.ismodule(obj):  # a subpackage's page, or a module's section with its own __all__
                assert f'id="module-{obj.__name__}"' in html, f"{obj.__name__} has no page or section"
                names = [] if hasattr(obj, "__path__") else [f"{obj.__name__}.{n}" for n in obj.__all__]
            else:
                names = [f"{package}.{name}"]
            for full in names:
                assert f'id="{full}"' in html, f"{full} has no entry in the API reference"
    # a layer's __call__ is documented with its signature, not object's "Call self as a function."
    nn_page = (site / "api" / "nn.html").read_text()
    assert 'id="mlx_zeta.nn.FlashAttention.__call__"' in nn_page and "Call self as a function" not in html
    for guide in GUIDES:
        assert (site / "guides" / f"{guide}.html").exists(), guide


def doctest_counts(report: str) -> dict:
    """``{document: executed blocks and examples}`` from a passing doctest builder's output.txt (its groups'
    "N tests in GROUP" lines; the set-up and clean-up code's lines are not counted)."""
    counts, document = {}, None
    for line in report.splitlines():
        if line.startswith("Document: "):
            document = line.split(": ", 1)[1]
        found = re.fullmatch(r"\s+(\d+) tests? in \S+", line)
        if found and document:
            counts[document] = counts.get(document, 0) + int(found.group(1))
    return counts


def test_every_guide_block_and_docstring_example_runs():
    done = site_builder.build("doctest")
    report = (site_builder.BUILD / "doctest" / "output.txt").read_text()
    failed = [part for part in report.split("\nDocument: ") if "Failed example" in part or "Test Failed" in part]
    assert done.returncode == 0, "doctest failed in:\n" + "\n".join(failed)[-6000:] + done.stderr[-2000:]
    counts = doctest_counts(report)
    for guide in set(GUIDES) - set(NOT_EXECUTED):
        assert counts.get(f"guides/{guide}", 0) >= 1, f"docs/guides/{guide}.md executes no block: {counts}"
    assert sum(n for d, n in counts.items() if d.startswith("api/")) >= 50, counts


def test_a_planted_broken_cross_reference_fails_the_build():
    planted = site_builder.build("html", plant="guides/quickstart.md:See {py:class}`mlx_zeta.nn.NoSuchBlock`.")
    assert planted.returncode != 0 and "mlx_zeta.nn.NoSuchBlock" in planted.stderr, planted.stderr[-2000:]


def test_a_planted_failing_block_fails_the_doctest():
    block = "```{testcode}\\nprint(1 + 1)\\n```\\n\\n```{testoutput}\\n3\\n```"
    planted = site_builder.build("doctest", plant=f"guides/quickstart.md:{block}", pages=["guides/quickstart.md"])
    assert planted.returncode != 0, planted.stdout[-2000:]


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
# As root in a container with no network: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture()
def served(site):
    """The site over HTTP on a free loopback port (its search loads its index by script, as on a real host)."""
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_site_renders_and_searches_in_chromium(served):
    if CHROMIUM is None:
        pytest.skip("no Chromium (Debian package 'chromium'; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    shots = site_builder.BUILD / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)

        page.goto(f"{served}/index.html")
        assert "mlx-zeta" in page.title() and page.locator("article h1").first.is_visible()
        page.screenshot(path=str(shots / "home.png"), full_page=True)

        page.goto(f"{served}/api/nn.html")
        entry = page.locator('[id="mlx_zeta.nn.FlashAttention"]')
        assert entry.is_visible() and "FlashAttention" in entry.inner_text()
        assert page.locator("math").count() > 0  # the docstrings' formulas, as MathML

        page.goto(f"{served}/index.html")
        page.fill("input[name=q]", "FlashAttention")
        page.press("input[name=q]", "Enter")
        page.wait_for_selector("#search-results ul.search li a", timeout=20_000)
        hits = page.locator("#search-results ul.search li a").evaluate_all("links => links.map(a => a.href)")
        page.screenshot(path=str(shots / "search.png"))
        browser.close()
    assert any("api/nn.html#mlx_zeta.nn.FlashAttention" in h for h in hits), hits[:10]
    assert problems == [], problems
