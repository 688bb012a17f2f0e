"""The README's Python snippets run as written (zetascale's README examples do not)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python blocks"
    for i, code in enumerate(blocks):
        namespace: dict = {}
        exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)
        # The first block's trailing comments state the shapes it computes.
        if "y" in namespace and "tokens" in namespace:
            assert namespace["y"].shape == (1, 16, 64)
            assert namespace["tokens"].shape == (2, 32)
            assert namespace["loss"].size == 1 and float(namespace["loss"]) > 0
