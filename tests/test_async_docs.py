"""docs/async.md's snippets run, in order, as written (paths moved into tmp_path)."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "async.md"


def test_async_page_runs(tmp_path: Path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks):
        source = block.replace("/tmp/zarrckpt-async", str(tmp_path))
        exec(compile(source, f"{PAGE}:block{number}", "exec"), namespace)  # our own docs
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"{tmp_path}/run/ckpt-1: blocked \d\.\d+ s, staged 4 MiB", lines[0])
    assert lines[1].startswith(f"{tmp_path}/run/ckpt-2: blocked")
    assert lines[2] == repr([f"{tmp_path}/run/ckpt-1", f"{tmp_path}/run/ckpt-2"])
    assert lines[3] == "True 64"  # 4 MiB do not fit a 1 MiB pool: written before returning
    local, remote = f"{tmp_path}/local", f"{tmp_path}/remote"
    assert (
        lines[4]
        == repr(
            [[f"{local}/ckpt-4", f"{local}/ckpt-5"], [f"{remote}/ckpt-{n}" for n in (3, 4, 5)]]
        ).replace("], [", "] [")[1:-1]
    )
    weights = namespace["weights"]
    assert (weights.numpy() == 13).all()  # type: ignore[attr-defined]
