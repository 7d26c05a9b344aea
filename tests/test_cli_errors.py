"""The command line never ends in a traceback: every error is one line and an exit code.

Ctrl-C and a closed pipe are tested on real subprocesses: a SIGINT sent to a
running demo, and a reader of stdout that goes away early.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import zarrckpt as zc
from tests.conftest import Model, run_cli
from zarrckpt.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")

ROOT = Path(zc.__file__).resolve().parents[1]


def _usage(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return int(info.value.code or 0), capsys.readouterr().err


def _env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m zarrckpt`` child importing this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _zarrckpt(*argv: str) -> list[str]:
    return [sys.executable, "-m", "zarrckpt", *argv]


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zarrckpt: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return Path(zc.Checkpoint(model=Model(seed=0)).write(tmp_path / "ckpt"))


# Any other exception -----------------------------------------------------------


def test_an_unexpected_exception_is_one_line_naming_its_type(checkpoint, capsys, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(zc, "list_checkpoints", broken)
    code, out, err = run_cli(capsys, "ls", str(checkpoint.parent))
    assert code == 5 and out == ""
    assert _one_error_line(err) == "zarrckpt: error: RuntimeError: disk on fire\\nsecond line"


def test_an_unknown_s3_option_is_one_line(capsys):
    # s3fs hands unknown options to aiobotocore, which raises TypeError.
    code, _, err = run_cli(capsys, "ls", "s3://bucket/run", "--storage-options", '{"bogus": 1}')
    assert code == 5
    line = _one_error_line(err)
    assert line.startswith("zarrckpt: error: TypeError: ") and "bogus" in line


def test_an_unknown_protocol_is_one_line(capsys):
    code, out, err = run_cli(capsys, "ls", "nosuchprotocol://bucket/run")
    assert code == 5 and out == ""
    assert "nosuchprotocol" in _one_error_line(err)


def test_s3_without_s3fs_names_the_extra(tmp_path):
    # fsspec imports s3fs on first use of s3://: make that import fail.
    script = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from zarrckpt.cli import main\n"
        "sys.exit(main(['ls', 's3://bucket/run']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 5, result.stderr
    assert "zarrckpt[s3]" in _one_error_line(result.stderr)


def test_missing_s3_credentials_say_how_to_pass_them(s3_server, tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",  # no instance metadata lookup
    )
    options = json.dumps({"endpoint_url": s3_server})
    result = subprocess.run(
        _zarrckpt("ls", "s3://bucket/run", "--storage-options", options),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 5, result.stderr
    line = _one_error_line(result.stderr)
    assert "no S3 credentials" in line and "NoCredentialsError" in line
    assert '--storage-options \'{"key": ' in line and '"secret": ' in line
    assert "AWS_ACCESS_KEY_ID" in line and "AWS_PROFILE" in line and '"profile"' in line


# Usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["demo", "--steps", "0"], "--steps: must be 1 or more, got 0"),
        (["demo", "--steps", "-3"], "--steps: must be 1 or more, got -3"),
        (["demo", "--size", "0"], "--size: must be at least 1 byte"),
        (["demo", "--size", "0MiB"], "--size: must be at least 1 byte"),
        (["gc", "dir", "--older-than", "-1"], "--older-than: must be 0 or more seconds"),
        (["gc", "dir", "--older-than", "nan"], "--older-than: must be 0 or more seconds"),
        (["ls"], "the following arguments are required: directory"),
        (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
        (["--storage-options", "{x", "ls", "d"], "--storage-options: not JSON"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, said):
    code, err = _usage(capsys, *argv)
    assert code == 2
    assert said in _one_error_line(err)


def test_dot_without_graphviz_is_one_line(checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda _name: None)
    code, _, err = run_cli(capsys, "dot", str(checkpoint), "--png", str(tmp_path / "g.png"))
    assert code == 5
    assert _one_error_line(err) == ("zarrckpt: error: --png needs Graphviz's 'dot' program on PATH")


# Ctrl-C ------------------------------------------------------------------------


def test_ctrl_c_during_a_demo_exits_130_with_one_line(tmp_path):
    process = subprocess.Popen(
        _zarrckpt("demo", "--size", "16MiB", "--steps", "100000", "--dir", str(tmp_path)),
        env=_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:  # saving in a loop from here on
            seen.append(line)
            if "step 2: saved" in line:
                break
        assert seen and "step 2: saved" in seen[-1], seen
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert err == "zarrckpt: interrupted\n"
    # Whatever was being saved did not become a checkpoint: every one there is whole.
    infos = zc.list_checkpoints(tmp_path)
    assert infos and all(info.committed for info in infos), infos
    for info in infos:
        zc.verify(info.path)
    # Nor is anything left for gc: the workers ended before the save was aborted.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# A closed pipe -----------------------------------------------------------------


def test_a_reader_gone_before_any_output_exits_141_quietly(checkpoint):
    process = subprocess.Popen(
        _zarrckpt("show", str(checkpoint)),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the only reader goes away before the child writes
    err = process.stderr.read()
    process.wait(timeout=120)
    process.stderr.close()
    assert err == b""
    assert process.returncode == 141


def test_head_dash_1_takes_the_first_line_and_zarrckpt_exits_quietly(tmp_path):
    # ~300 KB of `ls` output: far more than a pipe holds once `head` has gone.
    for number in range(1, 4001):
        (tmp_path / f"ckpt-{number}").mkdir()
    producer = subprocess.Popen(
        _zarrckpt("ls", str(tmp_path)),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert producer.stdout is not None and producer.stderr is not None
    head = subprocess.run(
        ["head", "-1"], stdin=producer.stdout, capture_output=True, timeout=120, check=False
    )
    producer.stdout.close()
    err = producer.stderr.read()
    producer.wait(timeout=120)
    producer.stderr.close()
    assert head.stdout.decode().split()[:2] == ["number", "created"]
    assert b"Traceback" not in err and err == b""
    assert producer.returncode == 141


def test_a_broken_pipe_that_is_not_stdout_is_an_error(checkpoint, capsys, monkeypatch):
    def broken(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(zc, "verify", broken)
    monkeypatch.setattr("zarrckpt.cli._stdout_closed", lambda: False)
    code, _, err = run_cli(capsys, "verify", str(checkpoint))
    assert code == 5
    assert _one_error_line(err) == "zarrckpt: error: [Errno 32] Broken pipe"
