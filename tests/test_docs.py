"""The examples of docs/python.md run as they are, in order, in one namespace."""
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.integration
def test_python_guide_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "docs_python"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/python.md, example {i} failed: {type(e).__name__}: {e}\n{block}") from e
    out = capsys.readouterr().out
    assert "learner.inner_steps must be a whole number from 0 to 10000" in out
    assert "5-way 1-shot" in out
    assert "return_1 ['return_0', 'return_2', 'return_3']" in out       # the meta-RL example
