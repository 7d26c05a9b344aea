"""Options of the command line: --storage-options after the command, --version, help."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import zarrckpt as zc
from tests.conftest import Model, run_cli
from zarrckpt.cli import _build_parser, main

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


def test_storage_options_after_the_command(capsys, s3_url, s3_storage_options):
    options = json.dumps(s3_storage_options)
    path = zc.Checkpoint(model=Model(seed=0)).write(
        f"{s3_url}/run/ckpt-1", storage_options=s3_storage_options
    )
    code, out, err = run_cli(capsys, "ls", f"{s3_url}/run", "--storage-options", options)
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split()[0] == "1" and "committed" in out
    for argv in (
        ["show", path, "--storage-options", options],
        ["verify", "--storage-options", options, path],
        ["diff", path, path, "--storage-options", options, "--values"],
        ["gc", f"{s3_url}/run", "--storage-options", options, "--dry-run"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert (code, err) == (0, ""), argv


def test_storage_options_after_the_command_win_over_those_before(
    capsys, s3_url, s3_storage_options
):
    zc.Checkpoint(model=Model(seed=0)).write(
        f"{s3_url}/run/ckpt-1", storage_options=s3_storage_options
    )
    wrong = json.dumps({**s3_storage_options, "secret": "wrong"})
    right = json.dumps(s3_storage_options)
    code, out, _ = run_cli(
        capsys, "--storage-options", wrong, "ls", f"{s3_url}/run", "--storage-options", right
    )
    assert code == 0 and "ckpt-1" in out
    # Given only before the command, they are used (not reset by the command's default).
    code, out, _ = run_cli(capsys, "--storage-options", right, "ls", f"{s3_url}/run")
    assert code == 0 and "ckpt-1" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"zarrckpt {zc.__version__}\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_argument_has_a_help_text():
    commands = _subparsers(_build_parser())
    assert set(commands) == {"ls", "show", "dot", "verify", "diff", "cp", "gc", "demo"}
    for name, sub in commands.items():
        positionals = [a for a in sub._actions if not a.option_strings]
        assert positionals or name == "demo", name
        for action in sub._actions:
            assert action.help, (name, action.dest)
            assert action.help != argparse.SUPPRESS, (name, action.dest)


def test_help_shows_positional_descriptions(capsys):
    with pytest.raises(SystemExit) as info:
        main(["cp", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # as one line, whatever the wrapping
    assert "the checkpoint to copy" in out and "under the source's name" in out
    assert "--storage-options JSON" in out


def test_json_options_given_twice_on_local_paths(capsys, tmp_path: Path):
    path = zc.Checkpoint(model=Model(seed=0)).write(tmp_path / "c")
    code, out, _ = run_cli(
        capsys, "--storage-options", "{}", "show", path, "--storage-options", "{}"
    )
    assert code == 0 and "model/embedding" in out
