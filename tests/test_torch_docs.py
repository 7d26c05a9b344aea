"""The PyTorch examples run for real, and docs/torch.md says true.

examples/torch_training.py runs twice in one directory (the second run goes
on from the first one's latest checkpoint), then ``--check`` compares it bit
for bit with an uninterrupted run. examples/torch_fsdp.py runs under torchrun
with two ranks, then three on the same directory, then ``--check`` in one
plain process. Those launches (and the page's torchrun program) start
together, in two threads, when the module's first test runs: most of a
launch is imports, and the in-process tests run meanwhile. Every launch has
a hard timeout after which its whole process tree is killed.

In docs/torch.md: every line the examples printed is quoted there; a block
after ``<!-- excerpt: FILE -->`` is made of FILE's lines, in order; a block
after ``<!-- torchrun: N -->`` is a program run here with N ranks; every other
Python block runs, in order, in one namespace, and prints exactly the
``text`` block that follows it (error messages included).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from launching import free_port, run_launcher

torch = pytest.importorskip("torch")

import zarrckpt as zc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TORCH_MD = ROOT / "docs" / "torch.md"
LAUNCH_TIMEOUT = 60.0  # seconds; then every process of the launch is killed


# Launching -----------------------------------------------------------------------------------


def launch(command: list[str]) -> str:
    """Run a launcher; its stdout. Fails the test on a non-zero exit or after LAUNCH_TIMEOUT."""
    return run_launcher(command, cwd=ROOT, timeout=LAUNCH_TIMEOUT)


def python(script: str, *args: str) -> str:
    return launch([sys.executable, str(EXAMPLES / script), *args])


def torchrun(ranks: int, script: str | Path, *args: str) -> str:
    pytest.importorskip("torch.distributed")
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    return launch([*runner, "--master-port", str(free_port()), str(script), *args])


def result(out: str) -> dict[str, Any]:
    """The one ``RESULT {json}`` line a run prints."""
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out
    found: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))
    return found


# The page ------------------------------------------------------------------------------------


def blocks() -> list[tuple[str, str, str]]:
    """(marker, language, text) of every fenced block; marker is the comment just before it."""
    found = re.findall(
        r"(?:<!-- (.*?) -->\n)?```([a-z]*)\n(.*?)```", TORCH_MD.read_text(), flags=re.S
    )
    return [(marker, language, text) for marker, language, text in found]


def quoted(out: str, directory: Path, shown: str) -> None:
    """Every line the example printed (but RESULT) is in the page, its path moved to ``shown``.

    The differences between FSDP and one process depend on rounding: their digits
    are not compared.
    """

    def rounding(text: str) -> str:
        text = re.sub(r"difference \S+ \([^)]*\)", "difference ...", text)
        return re.sub(r"within \S+$", "within ...", text, flags=re.M)

    text = rounding(TORCH_MD.read_text())
    for line in out.replace(str(directory), shown).splitlines():
        line = rounding(line)
        if line and not line.startswith("RESULT "):
            assert line in text, f"{line!r} is not in docs/torch.md"


def chunk_files(path: Path, key: str) -> list[str]:
    """The chunk files of the array at ``key``: ``c.<i>.<j>`` beside its zarr.json."""
    return sorted(p.name for p in (path / key).glob("c.*") if p.is_file())


# The launches: started together, in two threads (two cores; most of a launch is imports) ----


def training_runs(directory: Path) -> tuple[str, str, str]:
    """torch_training.py twice on ``directory``, then --check."""
    args = ("--dir", str(directory), "--every", "2")
    first = python("torch_training.py", *args, "--steps", "6")
    second = python("torch_training.py", *args, "--steps", "4")
    return first, second, python("torch_training.py", "--dir", str(directory), "--check")


def fsdp_runs(directory: Path) -> tuple[str, str, str]:
    """torch_fsdp.py with two ranks, then three, then --check in one plain process."""
    script = EXAMPLES / "torch_fsdp.py"
    args = ("--dir", str(directory), "--steps", "4", "--every", "2")
    two = torchrun(2, script, *args)
    three = torchrun(3, script, *args)
    return two, three, python("torch_fsdp.py", "--dir", str(directory), "--check")


def placement_run(directory: Path) -> tuple[str, str]:
    """The page's torchrun program, with two ranks; (its output, the block after it)."""
    found = blocks()
    programs = [(n, t) for n, (m, _, t) in enumerate(found) if m == "torchrun: 2"]
    assert len(programs) == 1
    number, program = programs[0]
    assert found[number + 1][1] == "text", "the program's output is not shown"
    script = directory / "partial.py"
    script.write_text(program.replace("/tmp/zc-partial", str(directory / "partial")))
    return torchrun(2, script), found[number + 1][2]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every launch of this module, started at once; each test waits for its own."""
    pytest.importorskip("torch.distributed")
    base = tmp_path_factory.mktemp("launches")
    start = time.monotonic()
    timed: dict[str, float] = {}

    def timing(name: str, job: Any, *args: Any) -> Any:
        found = job(*args)
        timed[name] = time.monotonic() - start
        return found

    with ThreadPoolExecutor(2) as pool:  # a failed launch fails the test that waits for it
        yield {
            "dirs": {"training": base / "zc-torch", "fsdp": base / "zc-fsdp", "partial": base},
            "fsdp": pool.submit(timing, "fsdp", fsdp_runs, base / "zc-fsdp"),
            "training": pool.submit(timing, "training", training_runs, base / "zc-torch"),
            "partial": pool.submit(timing, "partial", placement_run, base),
        }
    print(f"launches done after (s): {timed}")


@pytest.fixture(scope="module", autouse=True)
def _launch_first(request):
    """Start the launches before the tests that run here, if a selected test needs them."""
    items = request.session.items
    if any(i.module is request.module and "launched" in i.fixturenames for i in items):
        request.getfixturevalue("launched")


# What docs/torch.md shows ----------------------------------------------------------------


def test_the_excerpts_are_the_examples_lines_in_order():
    excerpts = [(m, t) for m, _, t in blocks() if m.startswith("excerpt:")]
    assert {m for m, _ in excerpts} == {
        "excerpt: examples/torch_training.py",
        "excerpt: examples/torch_fsdp.py",
    }
    for marker, text in excerpts:
        source = (ROOT / marker.removeprefix("excerpt:").strip()).read_text()
        lines = [line.strip() for line in source.splitlines()]
        position = 0
        for line in text.splitlines():
            if not line.strip() or line.strip() == "...":
                continue
            try:
                position = lines.index(line.strip(), position) + 1
            except ValueError:
                pytest.fail(f"{marker}: {line!r} is not in the file (after line {position})")


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_the_snippets_run_in_order_and_print_what_the_page_shows(tmp_path, capsys, monkeypatch):
    shown = "/tmp/zc-torch-guide"
    monkeypatch.chdir(ROOT)  # the page puts "examples" on sys.path
    monkeypatch.setattr(sys, "path", list(sys.path))
    found = blocks()
    namespace: dict[str, Any] = {"__name__": "torch_md"}
    ran = 0
    for number, (marker, language, text) in enumerate(found):
        if language != "python" or marker:
            continue
        source = text.replace(shown, str(tmp_path))
        exec(compile(source, f"{TORCH_MD}:block{number}", "exec"), namespace)  # our own page
        ran += 1
        printed = capsys.readouterr().out.replace(str(tmp_path), shown)
        following = found[number + 1] if number + 1 < len(found) else ("", "", "")
        expected = following[2] if following[1] == "text" else ""
        assert printed == expected, f"block {number} printed:\n{printed}"
    assert ran >= 9
    # What the snippets claim beyond their asserts.
    for refused in ("bad", "sparse"):  # the refused saves wrote nothing
        assert not [p for p in tmp_path.iterdir() if refused in p.name]


def test_without_torch_the_adapter_says_how_to_install_it():
    code = "import sys; sys.modules['torch'] = None\nimport zarrckpt\nimport zarrckpt.torch"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zarrckpt.errors.MissingDependencyError: zarrckpt.torch needs PyTorch")
    assert last.endswith("install it with: pip install 'zarrckpt[torch]'")
    assert "pip install 'zarrckpt[torch]'" in TORCH_MD.read_text()


def test_the_page_links_only_files_that_exist_and_names_the_benchmark_section():
    text = TORCH_MD.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (TORCH_MD.parent / target).exists(), target
    assert '[bench/RESULTS.md](../bench/RESULTS.md), section "PyTorch adapter"' in text


def test_the_dtypes_the_page_names_are_the_adapters():
    import zarrckpt.torch as zt

    for name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        assert str(zt.numpy_dtype(getattr(torch, name))) == name
        assert zt.torch_dtype(zt.numpy_dtype(getattr(torch, name))) == getattr(torch, name)
    for name in ("complex32", "float8_e8m0fnu", "float4_e2m1fn_x2", "qint8", "uint4"):
        if not hasattr(torch, name):  # newer than this torch
            continue
        with pytest.raises(zc.errors.UnsupportedDTypeError, match=f"torch dtype torch.{name} "):
            zt.numpy_dtype(getattr(torch, name))
    assert np.dtype(zt.numpy_dtype(torch.float32)) == np.float32


# The examples --------------------------------------------------------------------------------


def test_the_training_example_resumes_and_equals_an_uninterrupted_run(launched, capsys):
    directory = launched["dirs"]["training"]
    first, second, check = launched["training"].result()
    assert result(first) == {
        "restored": None,
        "step": 6,
        "checkpoints": [str(directory / f"ckpt-{n}") for n in (1, 2, 3)],
    }
    assert result(second) == {
        "restored": str(directory / "ckpt-3"),
        "step": 10,  # went on from step 6
        "checkpoints": [str(directory / f"ckpt-{n}") for n in (3, 4, 5)],  # max_to_keep=3
    }
    assert result(check)["equal"] is True and result(check)["step"] == 10
    assert sorted(result(check)["losses"]) == ["10", "6", "8"]
    assert " equals an uninterrupted run of 10 steps bit for bit" in check
    for out in (first, second, check):
        quoted(out, directory, "/tmp/zc-torch")

    # The key layout the page shows is what `zarrckpt ls` lists for ckpt-5.
    from zarrckpt.cli import main

    capsys.readouterr()
    assert main(["ls", str(directory / "ckpt-5")]) == 0
    listed = capsys.readouterr().out.replace(str(directory), "/tmp/zc-torch").splitlines()
    shown = next(t for _, _, t in blocks() if "$ zarrckpt ls /tmp/zc-torch/ckpt-5" in t)
    shown_lines = shown.splitlines()[1:]
    assert len(listed) == len(shown_lines) > 20
    for printed, doc in zip(listed, shown_lines, strict=True):
        if printed.startswith("committed:"):  # the commit time differs; files and size do not
            assert doc.startswith("committed:"), doc
            assert printed.split(", ", 1)[1] == doc.split(", ", 1)[1]
        else:
            assert printed == doc


def test_the_fsdp_example_goes_from_two_ranks_to_three_and_to_one_process(launched):
    directory = launched["dirs"]["fsdp"]
    two, three, alone = launched["fsdp"].result()
    assert result(two) == {
        "world_size": 2,
        "restored": None,
        "step": 4,
        "checkpoints": [str(directory / f"ckpt-{n}") for n in (1, 2)],
    }
    assert result(three) == {
        "world_size": 3,
        "restored": str(directory / "ckpt-2"),  # written by two ranks
        "step": 8,
        "checkpoints": [str(directory / f"ckpt-{n}") for n in (2, 3, 4)],
    }
    checked = result(alone)  # one plain process: no torchrun, no FSDP
    assert checked["world_size"] == 1 and checked["step"] == 8
    assert checked["checked"] == str(directory / "ckpt-4")
    assert checked["writers"] == {"4": 2, "6": 3, "8": 3}
    assert checked["largest_difference"] < 1e-5  # rounding in the gradient reduction only
    assert checked["loss_difference"] < 1e-6

    # Three ranks wrote fc1.weight (32 rows: 11, 11, 10) in one chunk a block; two
    # ranks wrote it in two (16, 16).
    key = "model/fc1.weight/.ATTRIBUTES/VARIABLE_VALUE"
    assert chunk_files(directory / "ckpt-4", key) == ["c.0.0", "c.1.0", "c.2.0"]
    assert chunk_files(directory / "ckpt-2", key) == ["c.0.0", "c.1.0"]
    zc.verify(str(directory / "ckpt-4"))
    for out in (two, three, alone):
        quoted(out, directory, "/tmp/zc-fsdp")


def test_the_placement_error_is_the_one_every_rank_raises(launched):
    out, shown = launched["partial"].result()
    assert out == shown
    partial = launched["dirs"]["partial"] / "partial"
    assert not partial.exists() or not any(partial.iterdir())  # nothing was written
