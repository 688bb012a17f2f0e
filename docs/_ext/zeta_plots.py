"""The benchmark plots of ``docs/guides/benchmarks.md``, drawn at build time from BENCHMARKS.md's own tables.

BENCHMARKS.md stays the one home of the numbers: each plot names the section heading and the columns it reads,
and a section or column that is no longer there is a build warning (``-W``: an error), so a plot cannot show
numbers the tables no longer hold. The figures are written as SVG into ``docs/_generated/plots/`` (ignored by git).
"""

from __future__ import annotations

import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)
BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
OUT = Path(__file__).resolve().parents[1] / "_generated" / "plots"


class TableMissing(Exception):
    pass


def table(text: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table after the heading that starts with ``heading``, as one dict per row."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"#+ " + re.escape(heading), line)]
    if not starts:
        raise TableMissing(f"no section {heading!r} in BENCHMARKS.md")
    rows, i = [], starts[0] + 1
    while i < len(lines) and not lines[i].startswith("|"):
        if lines[i].startswith("#"):
            raise TableMissing(f"section {heading!r} of BENCHMARKS.md has no table")
        i += 1
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    header, body = rows[0], [r for r in rows[2:]]
    return [dict(zip(header, r)) for r in body]


def number(cell: str) -> float:
    """The first number in a cell (``**32.6%**`` -> 32.6, ``3.87x`` -> 3.87)."""
    found = re.search(r"-?\d+(?:\.\d+)?", cell.replace(",", ""))
    if found is None:
        raise TableMissing(f"no number in cell {cell!r}")
    return float(found.group())


def column(rows: list[dict[str, str]], name: str) -> list[str]:
    if rows and name not in rows[0]:
        raise TableMissing(f"no column {name!r} (columns: {list(rows[0])})")
    return [r[name] for r in rows]


def decode_vs_context(text: str, ax) -> str:
    rows = table(text, "Decoding with and without the KV cache")
    context = [number(c) for c in column(rows, "context")]
    for name, label in (("cached ms/token", "KV cache"), ("uncached ms/token", "no cache (re-run the sequence)")):
        ax.plot(context, [1000 / number(c) for c in column(rows, name)], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
           title="Decoding a 12-layer decoder, batch 1 (CPU)")
    ax.set_xticks(context, [str(int(c)) for c in context])
    return "decode_context"


def ternary_vs_float(text: str, ax) -> str:
    rows = table(text, "Decoding a BitNet-2B-shaped and a 1B Llama-shaped model")
    models = [m.split("-shaped")[0] for m in column(rows, "model")]
    series = (("float32 tok/s", "float32 weights"), ("low-bit native tok/s", "low-bit, native kernels"),
              ("low-bit off tok/s", "low-bit, pure MLX"))
    width = 0.8 / len(series)
    for k, (name, label) in enumerate(series):
        bars = ax.bar([i + (k - 1) * width for i in range(len(models))], [number(c) for c in column(rows, name)],
                      width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(models)), models)
    ax.set(ylabel="decode tokens/s", title="Ternary (BitNet) and 4-bit (Llama) vs float32 (CPU)")
    return "ternary_float"


def finetune_memory(text: str, ax) -> str:
    rows = table(text, "Fine-tuning: full vs LoRA vs QLoRA")
    modes = column(rows, "mode")
    resident = [number(c) for c in column(rows, "model + optimizer MiB")]
    peak = [number(c) for c in column(rows, "peak memory MiB")]
    ax.bar_label(ax.bar(range(len(modes)), peak, 0.6, label="peak (weights, optimizer, gradients, activations)"),
                 fmt="%d", fontsize=8)
    ax.bar_label(ax.bar(range(len(modes)), resident, 0.6, label="model + optimizer state"), fmt="%d", fontsize=8,
                 label_type="center")
    ax.set_xticks(range(len(modes)), modes)
    ax.set(ylabel="MiB", title="Fine-tuning a 246M Llama-shaped model: memory")
    return "finetune_memory"


PLOTS = (decode_vs_context, ternary_vs_float, finetune_memory)


def draw(app) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = BENCHMARKS.read_text()
    OUT.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"svg.hashsalt": "mlx-zeta", "font.size": 10})  # the same SVG bytes at every build
    for plot in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
        try:
            name = plot(text, ax)
        except TableMissing as exc:
            logger.warning(f"[zeta-plots] {plot.__name__}: {exc}")
            plt.close(fig)
            continue
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(OUT / f"{name}.svg", metadata={"Date": None})
        plt.close(fig)


def setup(app):
    app.connect("builder-inited", draw)
    return {"version": "1", "parallel_read_safe": True}
