"""The README's Python examples run as written (paths moved into tmp_path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_readme_python_blocks_run(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    source = "\n".join(blocks).replace("/tmp/zarrckpt-example", str(tmp_path))
    namespace: dict[str, object] = {}
    exec(compile(source, str(README), "exec"), namespace)  # the examples are ours
    assert (tmp_path / "run-1" / "_COMMIT").is_file()
    assert (tmp_path / "run-2" / "_COMMIT").is_file()
    assert "IOStats(" in capsys.readouterr().out
