"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_usage_example() -> None:
    assert python_blocks(), "README lost its Python usage example"


def test_readme_usage_example_runs() -> None:
    for block in python_blocks():
        namespace: dict[str, object] = {}
        exec(compile(block, str(README), "exec"), namespace)
        assert "optimizer" in namespace
