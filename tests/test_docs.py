"""The quickstart's snippets run, in order, as written (paths moved into tmp_path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def run_quickstart(directory: Path) -> None:
    """Every snippet in order in one namespace, as a new Python session would."""
    blocks = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text(), flags=re.S)
    assert len(blocks) >= 8
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks):
        source = block.replace("/tmp/zarrckpt-quickstart", str(directory))
        exec(compile(source, f"{QUICKSTART}:block{number}", "exec"), namespace)  # our own docs


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_quickstart_runs(tmp_path, capsys):
    run_quickstart(tmp_path)
    out = capsys.readouterr().out
    # The one warning the page shows on purpose, naming the plain array only.
    assert "not saved: data.histogram (numpy array float64[10])." in out
    assert "scratch" not in out
    # The manager's numbers go on from the counter of the earlier save (run-1).
    assert "managed/ckpt-5" in out and "OK" in out and "IOStats(" in out
    assert sorted(p.name for p in (tmp_path / "managed").iterdir()) == [
        "ckpt-4",
        "ckpt-5",
        "zarrckpt_state.ckpt.json",
    ]


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_quickstart_runs_again_on_its_own_checkpoints(tmp_path, capsys):
    """A second session continues the first one's runs instead of failing on run-1."""
    run_quickstart(tmp_path)
    run_quickstart(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run-")) == [
        "run-1",
        "run-2",
    ]
    # The manager restored ckpt-5 (and the counter in it), then saved four more.
    assert sorted(p.name for p in (tmp_path / "managed").iterdir()) == [
        "ckpt-8",
        "ckpt-9",
        "zarrckpt_state.ckpt.json",
    ]
    assert "managed/ckpt-9: OK" in capsys.readouterr().out
