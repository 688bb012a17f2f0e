"""Compare ``mlx-zeta-coreml-run``'s output with ``expected.json`` from make_tiny_model.py.

    python examples/ios/compare_ids.py EXPECTED.json RUN_OUTPUT.txt [--near-tie G]

The Swift run's ``prompt ids:`` must equal the expected prompt ids (its tokenizer against the
``tokenizers`` library) and its ``ids:`` the ids MLX's greedy ``generate`` drew. With
``--near-tie G`` (for an fp16 package) the ids may part at the first step where MLX's top-1 minus
top-2 logit was below ``G`` (fp16 rounding may break such a near tie; the rest then differs too);
with the default ``0`` every id must match. When all ids match, the ``text:`` line (a JSON string)
must equal the expected text. Exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List


def parse_run(output: str) -> dict:
    """``{"prompt_ids": [...], "ids": [...], "text": str or None}`` from the runner's output lines."""
    found: dict = {"text": None}
    for line in output.splitlines():
        for label, key in (("prompt ids:", "prompt_ids"), ("ids:", "ids")):
            if line.startswith(label) and key not in found:
                items = line[len(label):].strip()
                found[key] = [int(x) for x in items.split(",")] if items else []
        if line.startswith("text:"):
            found["text"] = json.loads(line[len("text:"):].strip())
    for key in ("prompt_ids", "ids"):
        if key not in found:
            raise ValueError(f"[compare_ids] the run printed no '{key.replace('_', ' ')}:' line")
    return found


def compare(expected: dict, run: dict, near_tie: float = 0.0) -> List[str]:
    """The problems (empty: the run agrees with MLX); see the module docstring."""
    problems = []
    if run["prompt_ids"] != expected["prompt_ids"]:
        problems.append(f"prompt ids differ: Swift {run['prompt_ids']} vs tokenizers {expected['prompt_ids']}")
    want, got = expected["ids"], run["ids"]
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if first is None and len(want) != len(got):
        problems.append(f"{len(got)} ids generated, MLX generated {len(want)}: Swift {got} vs MLX {want}")
    elif first is not None:
        gap = expected["gaps"][first]
        if gap >= near_tie:
            problems.append(f"id {first} differs (Swift {got[first]}, MLX {want[first]}; MLX's top-2 gap there "
                            f"{gap} >= {near_tie}): Swift {got} vs MLX {want}")
        else:
            print(f"ids agree up to step {first}, a near tie (gap {gap} < {near_tie}): accepted")
    if first is None and not problems and run["text"] is not None and run["text"] != expected["text"]:
        problems.append(f"text differs: Swift {run['text']!r} vs MLX {expected['text']!r}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("expected", type=Path)
    p.add_argument("run_output", type=Path)
    p.add_argument("--near-tie", type=float, default=0.0, help="see the module docstring (default: 0, exact)")
    args = p.parse_args(argv)
    expected = json.loads(args.expected.read_text(encoding="utf-8"))
    problems = compare(expected, parse_run(args.run_output.read_text(encoding="utf-8")), args.near_tie)
    for problem in problems:
        print(f"compare_ids: {problem}")
    if not problems:
        print(f"compare_ids: {len(expected['ids'])} ids agree with MLX's greedy generate")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
