"""The demo's announcements and directory, and the progress bar it draws."""

from __future__ import annotations

import io
import re
import sys
import tempfile

import pytest

from zarrckpt.cli import Progress, _demo_nbytes, main
from zarrckpt.directory import format_size

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")

_SIZE = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: ``\\r`` goes back to column 0 and overwrites."""
    lines: list[str] = []
    line: list[str] = []
    column = 0
    for part in re.split(r"(\r|\n)", text):
        if part == "\r":
            column = 0
        elif part == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        else:
            line[column : column + len(part)] = part
            column += len(part)
    if line:
        lines.append("".join(line).rstrip())
    return lines


def _bytes(text: str) -> float:
    number, unit = text.replace(",", "").split()
    return float(number) * _SIZE[unit]


_BAR = re.compile(
    r"(?P<label>.*) \[(?P<bar>[#.]{30})\] (?P<done>[\d.,]+ \w+) / (?P<total>[\d.,]+ \w+), "
    r"(?P<rate>[\d.,]+ \w+)/s"
)


def _parse(line: str) -> re.Match[str]:
    match = _BAR.fullmatch(line)
    assert match is not None, line
    return match


def test_a_shorter_line_hides_the_longer_one_before_it():
    stream, clock = FakeTTY(), Clock()
    bar = Progress("saving", 4 << 20, stream, clock=clock)
    clock.now += 0.005
    bar(1536 << 10)  # 1.5 MiB in 5 ms: "300.0 MiB/s"
    first = screen(stream.getvalue())[0]
    assert _parse(first)["rate"] == "300.0 MiB"
    clock.now += 1000
    bar(1)  # now "1.5 KiB/s": two characters shorter
    (line,) = screen(stream.getvalue())
    assert "/s/s" not in line and line.count("/s") == 1
    match = _parse(line)
    assert match["rate"] == format_size((1536 * 1024 + 1) / 1000.005) == "1.5 KiB"
    assert match["done"] == "1.5 MiB" and match["total"] == "4.0 MiB"


def test_done_never_exceeds_the_total_and_finish_shows_the_summary_rate():
    stream, clock = FakeTTY(), Clock()
    bar = Progress("saving", 100 << 20, stream, clock=clock)  # an estimate, short by 20 MiB
    for _ in range(12):
        clock.now += 0.25
        bar(10 << 20)
        match = _parse(screen(stream.getvalue())[-1])
        assert _bytes(match["done"]) <= _bytes(match["total"])
    clock.now += 0.5  # the save's last step (fsync, commit) before it returns
    bar.finish()
    bar(5 << 20)  # after the measurement: not counted
    bar.close()
    (final,) = screen(stream.getvalue())
    match = _parse(final)
    assert match["bar"] == "#" * 30
    assert match["done"] == match["total"] == "120.0 MiB"
    assert bar.done == 120 << 20 and bar.seconds == pytest.approx(3.5)
    assert bar.summary() == f"120.0 MiB in 3.50 s, {match['rate']}/s"
    assert match["rate"] == "34.3 MiB"
    assert stream.getvalue().endswith("\n")


def test_an_estimate_too_large_ends_at_what_was_done():
    stream, clock = FakeTTY(), Clock()
    bar = Progress("restoring", 1 << 30, stream, clock=clock)
    clock.now += 1
    bar(256 << 20)
    bar.finish()
    bar.close()
    match = _parse(screen(stream.getvalue())[0])
    assert match["done"] == match["total"] == "256.0 MiB" and match["bar"] == "#" * 30
    assert match["rate"] == "256.0 MiB"


def test_nothing_is_drawn_off_a_terminal_but_everything_is_measured():
    stream, clock = io.StringIO(), Clock()
    bar = Progress("copying", 10, stream, clock=clock)
    clock.now += 2
    bar(2048)
    bar.finish()
    bar.close()
    assert stream.getvalue() == ""
    assert bar.summary() == "2.0 KiB in 2.00 s, 1.0 KiB/s"


def test_the_demo_states_what_it_needs_and_reports_the_bar_rate(tmp_path, capsys, monkeypatch):
    stderr = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stderr)
    code = main(["demo", "--size", "2MiB", "--steps", "3", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, stderr.getvalue()
    nbytes = _demo_nbytes(2 << 20)
    lines = out.splitlines()
    assert lines[1] == (
        f"  memory: about {format_size(4 * nbytes)}: the model and its slots, twice (the "
        "restore fills a second model), plus working space"
    )
    assert lines[2] == (
        f"  disk:   up to about {format_size(6 * nbytes)} (3 checkpoints of the model + slots, "
        f"{format_size(2 * nbytes)} each: max_to_keep=2, and the newest is written before the "
        "oldest is deleted)"
    )
    assert lines[3] == f"  in:     {tmp_path}"
    bars = {_parse(line)["label"].strip(): _parse(line) for line in screen(stderr.getvalue())}
    assert set(bars) == {"saving step 1", "saving step 2", "saving step 3", "restoring"}
    for label, match in bars.items():
        assert match["done"] == match["total"] and match["bar"] == "#" * 30, label
    for step in (1, 2, 3):
        saved = next(line for line in lines if line.startswith(f"  step {step}: saved"))
        summary = re.search(r"model \+ slots, (.*) in [\d.]+ s, (.*)/s, fsync'ed\)$", saved)
        assert summary is not None, saved
        bar = bars[f"saving step {step}"]
        assert (summary[1], summary[2]) == (bar["done"], bar["rate"])
    restored = next(line for line in lines if line.startswith("  restored "))
    summary = re.search(r"new model \((.*) in [\d.]+ s, (.*)/s", restored)
    assert summary is not None, restored
    assert (summary[1], summary[2]) == (bars["restoring"]["done"], bars["restoring"]["rate"])
    assert f"$ zarrckpt ls {tmp_path}" in out
    assert out.rstrip().endswith(
        f"The checkpoints stay in {tmp_path}; `rm -r {tmp_path}` deletes them."
    )


def test_the_demo_without_dir_says_its_directory_is_temporary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = main(["demo", "--size", "1MiB", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    where = re.search(r"^  in:     (\S+), a temporary directory deleted when the demo ends "
                      r"\(pass --dir DIR to keep the checkpoints\)$", out, flags=re.M)  # fmt: skip
    assert where is not None, out
    directory = where[1]
    assert directory.startswith(str(tmp_path / "zarrckpt-demo-"))
    assert "disk:   up to about" in out and "(1 checkpoint of the model + slots" in out
    assert "$ zarrckpt" not in out  # no command shown that could not be run again
    assert "# zarrckpt ls DIR" in out and "run the demo with --dir DIR to keep them" in out
    assert f"{directory}/ckpt-1" in out  # the listing itself is shown
    assert out.rstrip().endswith(f"The temporary directory {directory} is deleted now.")
    assert list(tmp_path.iterdir()) == []
