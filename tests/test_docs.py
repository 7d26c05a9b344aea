"""The quickstart's snippets run, in order, as written (paths moved into tmp_path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_quickstart_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks):
        source = block.replace("/tmp/zarrckpt-quickstart", str(tmp_path))
        exec(compile(source, f"{QUICKSTART}:block{number}", "exec"), namespace)  # our own docs
    out = capsys.readouterr().out
    # The manager's numbers go on from the counter of the earlier save (run-1).
    assert "managed/ckpt-5" in out and "OK" in out and "IOStats(" in out
    assert sorted(p.name for p in (tmp_path / "managed").iterdir()) == [
        "ckpt-4",
        "ckpt-5",
        "zarrckpt_state.ckpt.json",
    ]
