"""docs/s3.md runs as written against the moto server, and its claims about S3 hold.

The page's ```python blocks are exec'd in order in one namespace and its
```bash blocks are interpreted (``export`` sets the environment, ``zarrckpt``
lines run the CLI in-process; installing and starting the server are the
suite's job), all in document order, with the page's endpoint, bucket and
local directory replaced by the test's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import uuid
from pathlib import Path
from unittest import mock

import fsspec
import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt._commit import open_committed
from zarrckpt.cli import main
from zarrckpt.errors import CheckpointNotFoundError

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "s3.md"
DOC_ENDPOINT = "http://127.0.0.1:5555"
DOC_BUCKET = "zarrckpt-guide"
DOC_LOCAL = "/tmp/zarrckpt-s3-guide"
SETUP_COMMANDS = {"pip", "moto_server"}  # the test extra installs moto; conftest starts it
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)


def guide_blocks() -> list[tuple[str, str]]:
    """(language, code) of every python and bash block of the page, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def fresh_s3fs_instances() -> None:
    """Forget cached s3fs filesystems: one made from the environment must not outlive it."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def clean_aws_environment():
    """No AWS_* variables while the page runs (it sets its own); all restored after."""
    with mock.patch.dict(os.environ):
        for name in AWS_VARIABLES:
            os.environ.pop(name, None)
        fresh_s3fs_instances()
        try:
            yield
        finally:
            fresh_s3fs_instances()


@pytest.fixture
def guide_bucket(s3_storage_options):
    """A bucket name nobody created yet (the page creates it); removed after the test."""
    bucket = f"zc-guide-{uuid.uuid4().hex[:16]}"
    fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}", **s3_storage_options)
    assert not fs.exists(bucket)
    yield bucket
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        fs.rm(bucket, recursive=True)


def close_zarr_s3_session(group) -> None:
    """Close the client of zarr's own s3fs filesystem (asynchronous: s3fs never closes it)."""
    from zarr.core.sync import sync

    client = getattr(group.store.fs, "_s3", None)
    if client is not None:
        sync(client.close())


def run_shell(block: str, where: str) -> list[list[str]]:
    """Interpret a bash block: ``export`` and ``zarrckpt`` lines; return the CLI lines run."""
    ran: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] in SETUP_COMMANDS:
            continue
        if words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                os.environ[name] = value
            pass  # fresh_s3fs_instances()  # s3fs reads the environment when it makes a filesystem
        elif words[0] == "zarrckpt":
            assert main(words[1:]) == 0, f"{where}: {line}"
            ran.append(words[1:])
        else:
            raise AssertionError(f"{where}: a command this test does not know: {line}")
    return ran


def test_s3_guide_runs(
    s3_server, guide_bucket, s3_storage_options, clean_aws_environment, tmp_path, capsys
):
    blocks = guide_blocks()
    assert sum(lang == "python" for lang, _ in blocks) >= 7
    first_python = next(code for lang, code in blocks if lang == "python")
    assert f'ENDPOINT = "{DOC_ENDPOINT}"' in first_python  # the one place to point elsewhere
    namespace: dict[str, object] = {}
    commands: list[list[str]] = []
    for number, (lang, code) in enumerate(blocks):
        source = (
            code.replace(DOC_ENDPOINT, s3_server)
            .replace(DOC_BUCKET, guide_bucket)
            .replace(DOC_LOCAL, str(tmp_path))
        )
        where = f"{GUIDE}:block{number}"
        if lang == "python":
            exec(compile(source, where, "exec"), namespace)  # our own docs
        else:
            commands += run_shell(source, where)
    close_zarr_s3_session(namespace["group"])
    out = capsys.readouterr().out
    run = f"s3://{guide_bucket}/run"

    # The manager kept the two newest; retention removed every object of ckpt-1.
    assert f"['{run}/ckpt-2', '{run}/ckpt-3']" in out
    assert "ckpt-2 committed {'loss': 0.5}" in out
    assert "ckpt-3 committed {'loss': 0.3333333333333333}" in out
    assert namespace["latest"] == f"{run}/ckpt-3"
    fs, _ = fsspec.core.url_to_fs(run, **s3_storage_options)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{guide_bucket}/run")) == [
        "ckpt-2",
        "ckpt-3",
        "zarrckpt_state.ckpt.json",
    ]
    infos = zc.list_checkpoints(run, storage_options=s3_storage_options)
    assert [(i.name, i.committed, i.metadata.get("loss")) for i in infos] == [
        ("ckpt-2", True, 0.5),
        ("ckpt-3", True, 1 / 3),
    ]

    # Restored values are the saved ones (the page asserts them too).
    fresh, model = namespace["fresh"], namespace["model"]
    for restored, saved in zip(zc.list_objects(fresh), zc.list_objects(model), strict=True):
        if isinstance(saved, zc.Variable):
            assert np.array_equal(restored.numpy(), saved.numpy())
    assert np.array_equal(namespace["rows"], model.layers[1].kernel.numpy()[:8])

    # The verified local copy.
    assert (tmp_path / "ckpt-3" / "_COMMIT").is_file()
    assert zc.verify(tmp_path / "ckpt-3").arrays == 5
    assert out.count(": OK, 5 arrays") >= 2  # verify of the S3 checkpoint and of the copy

    # The group URL read from _COMMIT is the one zarrckpt opens and `show` prints.
    group_url = namespace["group_url"]
    assert group_url == open_committed(f"{run}/ckpt-3", s3_storage_options).storage.url
    assert re.fullmatch(rf"{run}/ckpt-3/attempt-[0-9a-f]{{32}}", group_url)
    assert f"zarr group: {group_url}" in out
    assert np.array_equal(np.asarray(namespace["kernel"]), model.layers[1].kernel.numpy())

    # Every CLI line of the page ran, those without --storage-options on the
    # environment the page exported.
    assert [c[0] if c[0] != "--storage-options" else c[2] for c in commands] == [
        "ls",
        "show",
        "verify",
        "gc",
    ]
    listed = [line for line in out.splitlines() if line.rstrip().endswith(f"{run}/ckpt-3")]
    assert any(" committed " in line for line in listed), out  # `zarrckpt ls`


def test_saving_into_a_missing_bucket_names_it(s3_storage_options):
    """The page: a save into a bucket that does not exist is CheckpointNotFoundError naming it."""
    bucket = f"zc-missing-{uuid.uuid4().hex[:16]}"
    fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}", **s3_storage_options)

    class Model(zc.AutoTrackable):
        def __init__(self) -> None:
            self.w = zc.Variable(np.arange(6, dtype=np.float32))

    ckpt = zc.Checkpoint(model=Model())
    with pytest.raises(CheckpointNotFoundError) as raised:
        ckpt.save(f"s3://{bucket}/run", storage_options=s3_storage_options)
    assert isinstance(raised.value, FileNotFoundError)
    assert bucket in str(raised.value)
    assert int(ckpt.save_counter.numpy()) == 0  # nothing was saved

    with pytest.raises(CheckpointNotFoundError) as raised:  # at start or at the first save
        manager = zc.CheckpointManager(
            zc.Checkpoint(model=Model()), f"s3://{bucket}/run", storage_options=s3_storage_options
        )
        manager.save()
    assert bucket in str(raised.value)
    fs.invalidate_cache()
    assert not fs.exists(bucket)  # zarrckpt never creates buckets


def test_gc_removes_dead_attempts_and_uploads_never_the_checkpoint(s3_url, s3_storage_options):
    """The page: gc removes attempt prefixes _COMMIT does not name and aborts stale uploads."""
    so = s3_storage_options
    bucket = s3_url.removeprefix("s3://")

    class Model(zc.AutoTrackable):
        def __init__(self) -> None:
            self.w = zc.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))

    path = zc.Checkpoint(model=Model()).save(f"{s3_url}/run/ckpt", storage_options=so)
    fs, _ = fsspec.core.url_to_fs(s3_url, **so)
    committed = open_committed(path, so).manifest.attempt
    dead = f"{path}/attempt-{'0' * 32}"  # a writer killed mid-save
    fs.pipe_file(f"{dead}/model/w/.ATTRIBUTES/VARIABLE_VALUE/c.0.0", b"x" * 52)
    assert zc.gc(f"{s3_url}/run", storage_options=so) == []  # younger than an hour
    # A dead writer's unfinished multipart upload (moto lists every upload as
    # started in 2010, so only the removal can be tested here, not the age).
    key = f"run/ckpt-2/attempt-{'1' * 32}/model/w/.ATTRIBUTES/VARIABLE_VALUE/c.0.0"
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]

    removed = zc.gc(f"{s3_url}/run", older_than=0, storage_options=so)

    assert sorted(removed) == sorted([dead, f"{s3_url}/{key} (multipart upload)"])
    fs.invalidate_cache()
    assert not fs.exists(dead)
    assert fs.exists(f"{path}/{committed}/zarr.json")
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert upload not in [u["UploadId"] for u in uploads]
    zc.verify(path, storage_options=so)
    restored = Model()
    restored.w.assign(np.zeros((3, 4), np.float32))
    zc.Checkpoint(model=restored).restore(path, storage_options=so).assert_consumed()
    assert np.array_equal(restored.w.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
