"""The README's Python examples run as written (paths moved into tmp_path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import zarrckpt as zc

README = Path(__file__).resolve().parents[1] / "README.md"


def run_readme(directory: Path) -> None:
    """The README's Python blocks in one fresh namespace, as one new session."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    source = "\n".join(blocks).replace("/tmp/zarrckpt-example", str(directory))
    namespace: dict[str, object] = {}
    exec(compile(source, str(README), "exec"), namespace)  # the examples are ours


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
@pytest.mark.filterwarnings("error::zarrckpt.errors.UnsavedValueWarning")
def test_readme_python_blocks_run(tmp_path, capsys):
    run_readme(tmp_path)
    assert (tmp_path / "run-1" / "_COMMIT").is_file()
    assert (tmp_path / "run-2" / "_COMMIT").is_file()
    out = capsys.readouterr().out
    assert "IOStats(" in out
    remote = sorted(p.name for p in (tmp_path / "remote").iterdir())
    assert remote[0].startswith("ckpt-") and remote[-1] == "zarrckpt_state.ckpt.json"
    assert f"['{tmp_path}/remote/{remote[0]}']" in out  # async save committed, then copied


@pytest.mark.filterwarnings("error::zarrckpt.errors.UnsavedValueWarning")
def test_readme_runs_twice_in_the_same_place(tmp_path):
    """Run again, the example continues from its latest checkpoint instead of failing."""
    run_readme(tmp_path)
    run_readme(tmp_path)
    runs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run-"))
    assert runs == ["run-1", "run-2", "run-3", "run-4"]
    assert all((tmp_path / name / "_COMMIT").is_file() for name in runs)
    assert zc.load_variable(tmp_path / "run-4", "save_counter") == 4
