"""Hostile checkpoints: fuzzing ``_COMMIT``, the record and an array's ``zarr.json``.

A small committed checkpoint is copied for every case, one of its files is
damaged (random byte flips, truncations, insertions; hostile values put into
the decoded document; files replaced by directories, FIFOs, symlinks to
``/dev/zero``, ...), and every reader is run on it:

    zc.verify(path); zc.list_checkpoints(parent) + zc.latest_checkpoint(parent)
    (and str() of every CheckpointInfo); restore into Checkpoint(model=Model())
    and into a root that also has a PythonState and an empty NumpyState;
    zc.load_variable(path, key) for every key; zc.list_variables(path); and
    the command line: ls, show, show --tree, verify.

The contract, for every case and every reader:

1. only subclasses of ``ZarrckptError`` escape (anything else, ``MemoryError``
   included, is a failure of the library); the command line returns 0, 3 or 4;
2. memory is bounded: readers run in a worker process whose address space is
   limited (``RLIMIT_AS``) to its size after warm-up plus
   ``ZARRCKPT_FUZZ_MEMORY_MIB`` (default 1024), and whose peak RSS may grow by
   at most ``ZARRCKPT_FUZZ_RSS_MIB`` (default 512) during one reader call
   (``VmHWM``, reset before each call);
3. nothing hangs: every reader call answers within ``ZARRCKPT_FUZZ_TIMEOUT``
   seconds (default 5), or the worker is killed and the case fails.

Hostile byte mutations of ``_COMMIT`` or the record are most often caught by a
checksum; so the fuzz tests also "re-seal" the checkpoint (recompute the
record's SHA-256, every listed file's size and CRC32C, and ``_COMMIT``'s own
CRC32C trailer if the library writes one) so that the parsers behind the
checksums see the hostile bytes.

Short run (the default suite: 15 examples per fuzz test with ``CI`` set, 40
without; a case stops at its first hang or slow failure; cases with inputs of
tens of MB run four readers; well under a minute once the library passes)::

    CI=true python -m pytest tests/test_hostile.py -q

Long run (``ZARRCKPT_FUZZ_EXAMPLES`` >= 1000 switches on: that many examples
per fuzz test, shrinking, every bit of ``_COMMIT`` flipped however long it
is, every reader of every case run even after a hang; add ``-x`` to stop at
the first failing test)::

    ZARRCKPT_FUZZ_EXAMPLES=100000 python -m pytest tests/test_hostile.py -q

``ZARRCKPT_FUZZ_REPORT=/some/file.jsonl`` appends every failure found (case,
reader, exception type, message, zarrckpt frames) as one JSON line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import io
import json
import math
import os
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import zarrckpt as zc
from tests.conftest import Model
from zarrckpt import _commit
from zarrckpt.errors import ZarrckptError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(zc.__file__).resolve().parent

EXAMPLES = int(os.environ.get("ZARRCKPT_FUZZ_EXAMPLES") or (15 if os.environ.get("CI") else 40))
LONG = EXAMPLES >= 1000
TIMEOUT = float(os.environ.get("ZARRCKPT_FUZZ_TIMEOUT") or 5.0)
MEMORY_MIB = int(os.environ.get("ZARRCKPT_FUZZ_MEMORY_MIB") or 1024)
RSS_MIB = int(os.environ.get("ZARRCKPT_FUZZ_RSS_MIB") or 512)
REPORT = os.environ.get("ZARRCKPT_FUZZ_REPORT")
MAX_FLIPS = 4096  # below this, every bit of _COMMIT is flipped; above, a sample (all if LONG)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="needs /proc, RLIMIT_AS and FIFOs (Linux)"
)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=(
        (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
        if LONG
        else (Phase.explicit, Phase.reuse, Phase.generate)
    ),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

RAW = "numpy/mean/.ATTRIBUTES/VARIABLE_VALUE"  # float32[12], NumpyState, 1 chunk, raw
ZSTD = "model/embedding/.ATTRIBUTES/VARIABLE_VALUE"  # float32[10, 6], Variable, zstd, 5 chunks
PY_STATE = "state/.ATTRIBUTES/py_state"  # uint8[n], PythonState
RECORD = "object_graph.msgpack"
COMMIT = "_COMMIT"

READERS: tuple[str, ...] = (
    "verify",
    "list_checkpoints",
    "restore",
    "restore_all",
    "load_variable",
    "list_variables",
    "cli_ls",
    "cli_show",
    "cli_show_tree",
    "cli_verify",
)
# Cases whose input is large (tens of MB) run these readers only, unless LONG.
HEAVY_READERS = ("verify", "list_checkpoints", "restore_all", "cli_show")


class Blob(zc.PythonState):
    """Python state saved as raw bytes."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data

    def deserialize(self, data: bytes) -> None:
        self.data = bytes(data)


def _full_root() -> zc.Checkpoint:
    """What is restored into: the model, a PythonState and an empty NumpyState."""
    return zc.Checkpoint(model=Model(seed=1), state=Blob(), numpy=zc.NumpyState())


# The worker: every reader runs in it, under a memory limit, killed if it hangs -------------


class _CliExit(Exception):
    """The command line returned an exit code outside {0, 3, 4}."""


def _cli(*argv: str) -> str:
    from zarrckpt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(argv))
    if code not in (0, 3, 4):
        raise _CliExit(f"exit code {code}: {err.getvalue().strip()[:600]}")
    return f"exit code {code}"


def _load_every_key(path: str, keys: list[str]) -> str:
    outcomes = []
    for key in keys:
        try:
            zc.load_variable(path, key)
            outcomes.append("ok")
        except ZarrckptError as exc:
            outcomes.append(type(exc).__name__)
        except BaseException as exc:
            exc.add_note(f"(load_variable of key {key!r})")
            raise
    return ", ".join(outcomes)


def _list(parent: str) -> dict[str, Any]:
    infos = zc.list_checkpoints(parent)
    for info in infos:
        str(info)  # CheckpointInfo.__str__ is public too
    latest = zc.latest_checkpoint(parent)
    return {"committed": [i.name for i in infos if i.committed], "latest": latest}


def _reader(name: str, path: str, parent: str, keys: list[str]) -> Any:
    if name == "verify":
        return str(zc.verify(path))
    if name == "list_checkpoints":
        return _list(parent)
    if name == "restore":
        zc.Checkpoint(model=Model()).restore(path).expect_partial()
        return "restored"
    if name == "restore_all":
        _full_root().restore(path).expect_partial()
        return "restored"
    if name == "load_variable":
        return _load_every_key(path, keys)
    if name == "list_variables":
        return len(zc.list_variables(path))
    if name == "cli_ls":
        return _cli("ls", parent)
    if name == "cli_show":
        return _cli("show", path)
    if name == "cli_show_tree":
        return _cli("show", "--tree", path)
    if name == "cli_verify":
        return _cli("verify", path)
    raise ValueError(name)


def _frame(frame: traceback.FrameSummary) -> str:
    try:
        name = str(Path(frame.filename).resolve().relative_to(PACKAGE.parent))
    except ValueError:
        name = frame.filename
    return f"{name}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _describe(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(PACKAGE)]
    chain: list[str] = []
    for f in ours:  # outermost first; a recursion shows once
        text = _frame(f)
        if text not in chain:
            chain.append(text)
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    message = str(exc)
    for note in getattr(exc, "__notes__", ()):
        message += f" {note}"
    return {
        "exc_type": "CLI" if isinstance(exc, _CliExit) else name,
        "message": message[:800],
        "where": (
            "zarrckpt.cli.main"
            if isinstance(exc, _CliExit)
            else _frame(ours[-1])
            if ours
            else (_frame(frames[-1]) if frames else "?")
        ),
        "first": _frame(ours[0]) if ours else "",
        "chain": chain[-8:],
    }


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _guarded(run: Callable[[], Any], measure: bool = True) -> dict[str, Any]:
    """Run one reader; report its outcome, time and peak RSS growth."""
    peak_known = measure and _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result: dict[str, Any] = {"ok": True, "detail": run()}
    except ZarrckptError as exc:
        result = {"ok": True, "detail": f"{type(exc).__name__}: {exc}"[:300], "raised": True}
    except BaseException as exc:  # everything else is what this test looks for
        result = {"ok": False, **_describe(exc)}
        gc.collect()  # what the failure left in reference cycles (tracebacks)
    result["seconds"] = time.perf_counter() - start
    result["rss_growth"] = _status("VmHWM") - before if peak_known else 0
    return result


def _bit_flips(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Flip each bit of ``_COMMIT`` in turn; return those some reader did not detect."""
    path, parent = request["path"], request["parent"]
    commit = Path(path) / COMMIT
    original = bytes.fromhex(request["original"])
    name = Path(path).name
    problems = []
    try:
        for bit in request["bits"]:
            flipped = bytearray(original)
            flipped[bit // 8] ^= 1 << (bit % 8)
            commit.write_bytes(bytes(flipped))
            found: dict[str, str] = {}
            for reader in ("verify", "list_checkpoints", "restore"):
                if reader == "verify":
                    outcome = _guarded(lambda: zc.verify(path) and "verified", measure=False)
                elif reader == "list_checkpoints":
                    outcome = _guarded(lambda: _list(parent), measure=False)
                else:
                    outcome = _guarded(
                        lambda: (
                            zc.Checkpoint(v=zc.Variable(np.zeros(3, np.float32)))
                            .restore(path)
                            .expect_partial()
                            and "restored"
                        ),
                        measure=False,
                    )
                if not outcome["ok"]:
                    found[reader] = (
                        f"{outcome['exc_type']}: {outcome['message']} at {outcome['where']}"
                    )
                elif reader == "list_checkpoints":
                    if name in outcome["detail"]["committed"]:
                        found[reader] = "still listed as committed"
                elif not outcome.get("raised"):
                    found[reader] = f"undetected ({outcome['detail']})"
            if found:
                problems.append({"bit": bit, "found": found})
    finally:
        commit.write_bytes(original)
    return problems


def serve() -> None:
    """The worker's main loop: one JSON request per line on stdin, one answer on stdout."""
    with contextlib.suppress(Exception):  # die with the test process, even when stuck
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    answers = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing but answers on the answer pipe
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the worker's lifetime
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "call":
            answer = _guarded(
                partial_reader(
                    request["reader"], request["path"], request["parent"], request["keys"]
                )
            )
        elif op == "bitflips":
            answer = {"ok": True, "problems": _bit_flips(request)}
        elif op == "setup":
            answer = _setup(request)
        else:
            answer = {"ok": False, "exc_type": "protocol", "message": op}
        answers.write(json.dumps(answer, default=str) + "\n")


def partial_reader(name: str, path: str, parent: str, keys: list[str]) -> Callable[[], Any]:
    return lambda: _reader(name, path, parent, keys)


def _setup(request: dict[str, Any]) -> dict[str, Any]:
    """Warm up on the intact template (every reader must pass), then limit the address space."""
    import resource

    failures = []
    for _ in range(2):
        for name in READERS:
            outcome = _guarded(
                partial_reader(name, request["path"], request["parent"], request["keys"])
            )
            if not outcome["ok"] or outcome.get("raised"):
                failures.append(f"{name}: {outcome}")
    base = _status("VmPeak")
    limit = base + request["memory_mib"] * (1 << 20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return {"ok": not failures, "failures": failures, "vm_base": base, "limit": limit}


class Worker:
    """A worker process this test started; restarted after a hang or a crash."""

    def __init__(self, template: Template, log_dir: Path) -> None:
        self.template = template
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.buffer = b""
        self.starts = 0

    def _start(self) -> None:
        self.starts += 1
        self.log = self.log_dir / f"worker-{self.starts}.log"
        env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONFAULTHANDLER="1")
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from tests.test_hostile import serve; serve()"
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        self.buffer = b""
        answer = self._ask(
            {
                "op": "setup",
                "path": str(self.template.path),
                "parent": str(self.template.parent),
                "keys": self.template.keys,
                "memory_mib": MEMORY_MIB,
            },
            timeout=120,
        )
        if answer is None or not answer.get("ok"):
            log_text = self.log.read_text(errors="replace")[-3000:]
            self.stop()
            raise RuntimeError(f"the fuzz worker did not start: {answer}\n{log_text}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self.proc = None

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The answer, or None after a hang (worker killed) or a crash (worker gone)."""
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._gone("died before the request")
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.stop()
                self.last_error = f"no answer within {timeout:g} s: hangs (worker killed)"
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return self._gone("died")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return dict(json.loads(line))

    def _gone(self, what: str) -> None:
        assert self.proc is not None
        code = self.proc.wait()
        reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        tail = self.log.read_text(errors="replace")[-1500:]
        self.stop()
        self.last_error = f"worker {what} ({reason}): {tail}"
        return None

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        if self.proc is None:
            self._start()
        return self._ask(request, timeout)


# The template checkpoint, and building damaged copies of it ---------------------------------


@dataclasses.dataclass
class Sealing:
    """How ``_COMMIT`` is sealed: its msgpack body, then nothing or a CRC32C trailer.

    Learnt from a ``_COMMIT`` the library wrote, so this works with and
    without a trailer; ``zarrckpt._commit.seal(body)`` is used if it exists
    and reproduces that ``_COMMIT``.
    """

    trailer: str  # "none", "crc32c-le", "crc32c-be" or "library"

    @classmethod
    def detect(cls, data: bytes) -> Sealing:
        body, trailer = split_commit(data)
        custom = getattr(_commit, "seal", None)
        with contextlib.suppress(Exception):
            if callable(custom) and bytes(custom(body)) == data:
                return cls("library")
        if not trailer:
            return cls("none")
        for name, order in (("crc32c-le", "little"), ("crc32c-be", "big")):
            if trailer == crc32c.crc32c(body).to_bytes(4, order):
                return cls(name)
        raise AssertionError(
            f"unknown _COMMIT trailer {trailer.hex()} after the msgpack body: teach "
            "tests/test_hostile.py's Sealing how the library seals _COMMIT"
        )

    def seal(self, body: bytes) -> bytes:
        if self.trailer == "library":
            return bytes(_commit.seal(body))  # type: ignore[attr-defined]
        if self.trailer == "none":
            return body
        order = "little" if self.trailer == "crc32c-le" else "big"
        return body + crc32c.crc32c(body).to_bytes(4, order)


def split_commit(data: bytes) -> tuple[bytes, bytes]:
    """The msgpack document of a ``_COMMIT`` and what follows it."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    unpacker.unpack()
    end = unpacker.tell()
    return data[:end], data[end:]


@dataclasses.dataclass
class Template:
    parent: Path  # the directory holding the checkpoint (what list_checkpoints reads)
    path: Path  # the checkpoint
    keys: list[str]
    sealing: Sealing
    manifest: Any  # zarrckpt._commit.Manifest

    @classmethod
    def open(cls, path: Path) -> Template:
        data = (path / COMMIT).read_bytes()
        manifest = _commit.Manifest.decode(data, where=str(path))
        sealing = Sealing.detect(data)
        assert sealing.seal(split_commit(data)[0]) == data, "cannot re-seal _COMMIT"
        keys = sorted(key for key, _, _ in zc.list_variables(path))
        return cls(path.parent, path, keys, sealing, manifest)


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _checksum(key: str, data: bytes) -> int:
    """What the manifest records: the chunk's own CRC32C, else the whole file's."""
    if key.rsplit("/", 1)[-1] != "zarr.json" and key != RECORD and len(data) >= 4:
        return int.from_bytes(data[-4:], "little")
    return int(crc32c.crc32c(data))


@dataclasses.dataclass
class Case:
    """A damaged copy of the template; ``reseal()`` makes the manifest agree with it."""

    template: Template
    parent: Path
    path: Path
    description: str = ""

    def file(self, key: str) -> Path:
        return self.path / key

    def read(self, key: str) -> bytes:
        return self.file(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        self.file(key).write_bytes(data)

    def json(self, array: str) -> Any:
        return json.loads(self.read(f"{array}/zarr.json"))

    def write_json(self, array: str, doc: Any, raw: dict[str, str] | None = None) -> None:
        text = json.dumps(doc, indent=2)
        for placeholder, token in (raw or {}).items():
            text = text.replace(json.dumps(placeholder), token)
        self.write(f"{array}/zarr.json", text.encode())

    def record(self) -> Any:
        return msgpack.unpackb(self.read(RECORD), raw=False, strict_map_key=False)

    def write_record(self, doc: Any) -> None:
        self.write(RECORD, msgpack.packb(doc, use_bin_type=True))

    def set_shape(self, array: str, shape: list[Any]) -> None:
        """Give ``array`` this shape in the record."""
        doc = self.record()
        for node in doc["nodes"]:
            for attribute in node["attributes"]:
                if attribute[1] == array:
                    attribute[2] = list(shape)
        self.write_record(doc)

    def manifest(self, **changes: Any) -> None:
        """Write a ``_COMMIT`` built from the template's Manifest with ``changes``."""
        manifest = dataclasses.replace(self.template.manifest, **changes)
        self.write(COMMIT, manifest.encode())

    def commit_doc(self) -> Any:
        body, _ = split_commit(self.template.manifest.encode())
        return msgpack.unpackb(body, raw=False)

    def write_commit_doc(self, doc: Any) -> None:
        self.write_commit_body(msgpack.packb(doc, use_bin_type=True))

    def write_commit_body(self, body: bytes) -> None:
        self.write(COMMIT, self.template.sealing.seal(body))

    def reseal(self) -> None:
        """Record SHA-256, sizes and CRC32Cs in ``_COMMIT`` as the files are now."""
        manifest = self.template.manifest
        files = []
        for entry in manifest.files:
            file = self.file(entry.key)
            if _is_file(file):
                data = file.read_bytes()
                entry = type(entry)(entry.key, len(data), _checksum(entry.key, data))
            files.append(entry)
        changes: dict[str, Any] = {"files": tuple(files)}
        if _is_file(self.file(RECORD)):
            changes["record_sha256"] = hashlib.sha256(self.read(RECORD)).hexdigest()
        self.manifest(**changes)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def template(base: Path) -> Template:
    numpy_state = zc.NumpyState()
    numpy_state.mean = np.arange(12, dtype=np.float32)
    numpy_state.step = np.int64(7)
    root = zc.Checkpoint(model=Model(), state=Blob(b'{"step": 7}'), numpy=numpy_state)
    options = zc.CheckpointOptions(chunk_bytes=64, compression={"*embedding*": zc.Zstd(3)})
    path = Path(root.save(base / "template" / "ckpt", options=options))
    return Template.open(path)


@pytest.fixture(scope="module")
def worker(template: Template, base: Path) -> Iterator[Worker]:
    logs = base / "logs"
    logs.mkdir()
    worker = Worker(template, logs)
    try:
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def damaged(template: Template, base: Path, description: str) -> Iterator[Case]:
    cases = base / "cases"
    cases.mkdir(exist_ok=True)
    where = Path(tempfile.mkdtemp(dir=cases))
    shutil.copytree(template.parent, where / "run", symlinks=True)
    try:
        yield Case(template, where / "run", where / "run" / template.path.name, description)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_readers(
    worker: Worker, case: Case, timeout: float = TIMEOUT, readers: tuple[str, ...] = READERS
) -> list[str]:
    """Every reader on the case; one line per broken promise."""
    failures = []
    for reader in readers:
        request = {
            "op": "call",
            "reader": reader,
            "path": str(case.path),
            "parent": str(case.parent),
            "keys": case.template.keys,
        }
        answer = worker.ask(request, timeout)
        record: dict[str, Any] = {"case": case.description, "reader": reader}
        if answer is None:
            record.update(exc_type="hang or crash", message=worker.last_error, where="")
            failures.append(f"{reader}: {worker.last_error}")
        elif not answer["ok"]:
            record.update(answer)
            failures.append(
                f"{reader}: {answer['exc_type']}: {answer['message'][:300]} "
                f"[raised at {answer['where']}] ({answer['seconds']:.1f} s)"
            )
        elif answer["rss_growth"] > RSS_MIB << 20:
            record.update(exc_type="memory", message=f"RSS grew {answer['rss_growth'] >> 20} MiB")
            failures.append(
                f"{reader}: peak RSS grew by {answer['rss_growth'] >> 20} MiB, over the "
                f"{RSS_MIB} MiB allowed ({answer['seconds']:.1f} s; it returned "
                f"{str(answer['detail'])[:200]})"
            )
        else:
            continue
        if REPORT:
            with open(REPORT, "a") as report:
                report.write(json.dumps(record, default=str) + "\n")
        slow = answer is None or answer["seconds"] > 2
        if slow and not LONG:  # a hang, or a slow failure: the others would take as long
            skipped = readers[readers.index(reader) + 1 :]
            if skipped:
                failures.append(f"(not run after this slow failure: {', '.join(skipped)})")
            break
    return failures


def check(
    worker: Worker, case: Case, timeout: float = TIMEOUT, readers: tuple[str, ...] = READERS
) -> None:
    failures = run_readers(worker, case, timeout, readers)
    if failures:
        pytest.fail(f"{case.description}:\n  " + "\n  ".join(failures), pytrace=False)


# Byte-level mutations ---------------------------------------------------------------------

INTERESTING = [
    b"\x00",
    b"\xff",
    b"\xc0",  # msgpack nil
    b"\xc1",  # msgpack: never used
    b"\xdd\xff\xff\xff\xff",  # msgpack array32 of 2**32-1 items
    b"\xdf\xff\xff\xff\xff",  # msgpack map32 of 2**32-1 entries
    b"\xdb\xff\xff\xff\xff",  # msgpack str32 of 4 GiB
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # msgpack float64 NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # msgpack float64 inf
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # msgpack uint64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # msgpack int64 min
    b"\x91" * 64,  # msgpack: nested arrays
    b"1e400",
    b"-1",
    b"NaN",
    b"Infinity",
    b"[" * 64,
    b"{" * 64,
    b'"',
    b"9" * 40,
    b"\\ud800",
]

POSITION = st.integers(0, 1 << 16)
BYTE_OP = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("set"), POSITION, st.integers(0, 255)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), POSITION, st.sampled_from(INTERESTING)),
    st.tuples(st.just("overwrite"), POSITION, st.sampled_from(INTERESTING)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 64)),
    st.tuples(st.just("duplicate"), POSITION, st.integers(1, 64), POSITION),
)


def mutate_bytes(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for op in ops:
        kind, at = op[0], op[1] % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << op[2]
        elif kind == "set" and at < len(out):
            out[at] = op[2]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = op[2]
        elif kind == "overwrite":
            out[at : at + len(op[2])] = op[2]
        elif kind == "delete":
            del out[at : at + op[2]]
        elif kind == "duplicate":
            piece = bytes(out[at : at + op[2]])
            target = op[3] % (len(out) + 1)
            out[target:target] = piece
    return bytes(out)


@FUZZ
@given(ops=st.lists(BYTE_OP, min_size=1, max_size=4), reseal=st.booleans())
def test_fuzz_commit_bytes(template: Template, worker: Worker, base: Path, ops, reseal) -> None:
    """Random byte damage to ``_COMMIT``; with ``reseal``, to its msgpack body, then re-sealed."""
    with damaged(template, base, f"_COMMIT bytes {ops} reseal={reseal}") as case:
        data = case.read(COMMIT)
        if reseal:
            case.write_commit_body(mutate_bytes(split_commit(data)[0], ops))
        else:
            case.write(COMMIT, mutate_bytes(data, ops))
        check(worker, case)


@FUZZ
@given(ops=st.lists(BYTE_OP, min_size=1, max_size=4), reseal=st.booleans())
def test_fuzz_record_bytes(template: Template, worker: Worker, base: Path, ops, reseal) -> None:
    """Random byte damage to the record; re-sealed, the record parser sees it."""
    with damaged(template, base, f"record bytes {ops} reseal={reseal}") as case:
        case.write(RECORD, mutate_bytes(case.read(RECORD), ops))
        if reseal:
            case.reseal()
        check(worker, case)


@FUZZ
@given(
    array=st.sampled_from([RAW, ZSTD]),
    ops=st.lists(BYTE_OP, min_size=1, max_size=4),
    reseal=st.booleans(),
)
def test_fuzz_zarr_json_bytes(
    template: Template, worker: Worker, base: Path, array, ops, reseal
) -> None:
    """Random byte damage to an array's ``zarr.json``."""
    with damaged(template, base, f"{array}/zarr.json bytes {ops} reseal={reseal}") as case:
        key = f"{array}/zarr.json"
        case.write(key, mutate_bytes(case.read(key), ops))
        if reseal:
            case.reseal()
        check(worker, case)


# Structured mutations: hostile values in the decoded documents ----------------------------


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _edit(doc: Any, path: tuple[Any, ...], how: str, value: Any) -> Any:
    """``doc`` with the node at ``path`` replaced, deleted, or given an extra entry."""
    if not path:
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if how == "replace":
        node[last] = value
    elif how == "delete":
        del node[last]
    elif isinstance(node[last], list):
        node[last].append(value)
    elif isinstance(node[last], dict):
        node[last][str(value)[:20]] = value
    else:
        node[last] = [node[last], value]
    return doc


class Raw(str):
    """A JSON token written as is (``1e400``, ``[[[[...``)."""


RAW_JSON = [
    "1e400",
    "-1e400",
    "1e-400",
    "NaN",
    "-Infinity",
    "1" * 5000,
    "-0",
    "4611686018427387904",
    "18446744073709551616",
    "12.5",
    "[" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000 + "0" + "}" * 50_000,
    '"\\ud800"',
]
JSON_WORDS = [
    "12",
    "float32",
    "bytes",
    "zstd",
    "blosc",
    "crc32c",
    "high",
    "1e400",
    "<f4",
    "|O",
    "object",
    "float128",
    "V8",
    "S4",
    "regular",
    "default",
    "/",
    "little",
    "big",
]
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([-1, 0, 1, 2, 12, 1 << 31, 1 << 40, 1 << 62, 1 << 63, 1 << 64]),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(JSON_WORDS),
    st.sampled_from(RAW_JSON).map(Raw),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "configuration", "level", "x"]), inner, max_size=3
        )
    ),
    max_leaves=6,
)


def _dump_json(doc: Any) -> tuple[Any, dict[str, str]]:
    """``doc`` with every Raw token replaced by a placeholder, and the placeholders."""
    raw: dict[str, str] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, Raw):
            placeholder = f"@@raw{len(raw)}@@"
            raw[placeholder] = str(value)
            return placeholder
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(doc), raw


def _plain_shape(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= 64
        and all(type(d) is int and 0 <= d < 1 << 64 for d in value)
    )


@FUZZ
@given(data=st.data())
def test_fuzz_zarr_json_values(template: Template, worker: Worker, base: Path, data) -> None:
    """Hostile JSON values anywhere in an array's ``zarr.json``; the manifest re-sealed.

    When the new ``shape`` is a list of ints, the record may be given it too,
    so that the hostile shape gets past the comparison with the record.
    """
    array = data.draw(st.sampled_from([RAW, ZSTD]), label="array")
    with damaged(template, base, "") as case:
        doc = case.json(array)
        path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
        how = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="how")
        if how == "delete" and not path:
            how = "replace"
        value = data.draw(JSON_VALUES, label="value")
        doc = _edit(doc, path, how, value)
        sync = data.draw(st.booleans(), label="record gets the shape too")
        case.description = f"{array}/zarr.json: {how} {list(path)} with {value!r:.200}, sync={sync}"
        plain, raw = _dump_json(doc)
        case.write_json(array, plain, raw)
        if sync and isinstance(doc, dict) and _plain_shape(doc.get("shape")):
            case.set_shape(array, doc["shape"])
        case.reseal()
        check(worker, case)


MSGPACK_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.sampled_from(
        [-1, 0, 1, 1 << 31, 1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1, -(1 << 63)]
    ),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 1e20, -0.0]),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "float32",
            "bfloat16",
            "object",
            "../x",
            "/etc/passwd",
            "a\\b",
            "a\x00b",
            ".ATTRIBUTES",
            "attempt-" + "0" * 32,
            "0" * 64,
            "model/embedding/.ATTRIBUTES/VARIABLE_VALUE",
            "zarrckpt.commit",
            "zarrckpt.object_graph",
        ]
    ),
    st.binary(max_size=8),
    st.just(msgpack.ExtType(5, b"x")),
)
MSGPACK_VALUES = st.recursive(
    MSGPACK_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _draw_msgpack_edit(data: st.DataObject, doc: Any) -> tuple[Any, str]:
    path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
    how = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="how")
    if how == "delete" and not path:
        how = "replace"
    value = data.draw(MSGPACK_VALUES, label="value")
    return _edit(doc, path, how, value), f"{how} {list(path)} with {value!r:.200}"


@FUZZ
@given(data=st.data())
def test_fuzz_record_values(template: Template, worker: Worker, base: Path, data) -> None:
    """Hostile msgpack values anywhere in the record; the manifest re-sealed."""
    with damaged(template, base, "") as case:
        doc, what = _draw_msgpack_edit(data, case.record())
        case.description = f"record: {what}"
        case.write_record(doc)
        case.reseal()
        check(worker, case)


@FUZZ
@given(data=st.data())
def test_fuzz_commit_values(template: Template, worker: Worker, base: Path, data) -> None:
    """Hostile msgpack values anywhere in ``_COMMIT``, re-sealed."""
    with damaged(template, base, "") as case:
        doc, what = _draw_msgpack_edit(data, case.commit_doc())
        case.description = f"_COMMIT: {what}"
        case.write_commit_doc(doc)
        check(worker, case)


# Named hostile cases ---------------------------------------------------------------------


def _edit_json(array: str, change: Callable[[Any], Any], raw: dict[str, str] | None = None):
    def build(case: Case) -> None:
        doc = change(case.json(array))
        case.write_json(array, doc, raw)
        case.reseal()

    return build


def _set(doc: Any, *path_and_value: Any) -> Any:
    *path, value = path_and_value
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def _json_field(array: str, *path_and_value: Any, raw: dict[str, str] | None = None):
    return _edit_json(array, lambda doc: _set(doc, *path_and_value), raw)


def _json_text(array: str, text: str | bytes):
    def build(case: Case) -> None:
        case.write(f"{array}/zarr.json", text.encode() if isinstance(text, str) else text)
        case.reseal()

    return build


def _shape_everywhere(array: str, shape: list[int], chunk_shape: list[int]):
    """Record and zarr.json agree on a hostile shape; the chunk files stay as they are."""

    def build(case: Case) -> None:
        doc = case.json(array)
        doc["shape"] = shape
        doc["chunk_grid"]["configuration"]["chunk_shape"] = chunk_shape
        case.write_json(array, doc)
        case.set_shape(array, shape)
        case.reseal()

    return build


def _record_shape(array: str, shape: list[Any]):
    def build(case: Case) -> None:
        case.set_shape(array, shape)
        case.reseal()

    return build


def _record_edit(change: Callable[[Any], None]):
    def build(case: Case) -> None:
        doc = case.record()
        change(doc)
        case.write_record(doc)
        case.reseal()

    return build


def _record_bytes(data: bytes):
    def build(case: Case) -> None:
        case.write(RECORD, data)
        case.reseal()

    return build


def _attribute(doc: Any, key: str) -> list[Any]:
    for node in doc["nodes"]:
        for attribute in node["attributes"]:
            if attribute[1] == key:
                return list(attribute)
    raise KeyError(key)


def _node_of(doc: Any, key: str) -> dict[str, Any]:
    for node in doc["nodes"]:
        if any(a[1] == key for a in node["attributes"]):
            return dict(node)
    raise KeyError(key)


def _chain(doc: Any, length: int, name: str = "next") -> None:
    """Node 0 gets a chain of ``length`` more nodes, each the only child of the one before."""
    start = len(doc["nodes"])
    doc["nodes"][0]["children"].append(["chain", start])
    for i in range(length):
        children = [[name, start + i + 1]] if i + 1 < length else []
        doc["nodes"].append(
            {"type": "x", "children": children, "attributes": [], "slot_variables": []}
        )


def _many_nodes(doc: Any, count: int) -> None:
    empty = {"type": "", "children": [], "attributes": [], "slot_variables": []}
    doc["nodes"].extend([empty] * count)


def _self_cycle(doc: Any) -> None:
    model = next(c[1] for c in doc["nodes"][0]["children"] if c[0] == "model")
    doc["nodes"][model]["children"].append(["loop", model])
    doc["nodes"][model]["children"].append(["root", 0])


def _commit_fields(**changes: Any):
    def build(case: Case) -> None:
        case.manifest(**changes)

    return build


def _commit_doc(change: Callable[[Any], None]):
    def build(case: Case) -> None:
        doc = case.commit_doc()
        change(doc)
        case.write_commit_doc(doc)

    return build


def _commit_body(body: bytes):
    def build(case: Case) -> None:
        case.write_commit_body(body)

    return build


def _many_files(count: int, entry: bytes = b"\x93\xa1a\x00\x00") -> Callable[[Case], None]:
    """``files`` of the template's manifest replaced by ``count`` entries (``["a", 0, 0]``)."""

    def build(case: Case) -> None:
        doc = case.commit_doc()
        doc["files"] = "@@files@@"
        entries = b"\xdd" + struct.pack(">I", count) + entry * count
        body = msgpack.packb(doc, use_bin_type=True).replace(msgpack.packb("@@files@@"), entries)
        case.write_commit_body(body)

    return build


def _many_empty_nodes(count: int) -> Callable[[Case], None]:
    """A record whose ``nodes`` are ``count`` empty msgpack arrays: one byte each."""

    def build(case: Case) -> None:
        doc = case.record()
        doc["nodes"] = "@@nodes@@"
        nodes = b"\xdd" + struct.pack(">I", count) + b"\x90" * count
        case.write(RECORD, msgpack.packb(doc).replace(msgpack.packb("@@nodes@@"), nodes))
        case.reseal()

    return build


def _file_entry(doc: Any, entry: list[Any]) -> None:
    doc["files"][0] = entry


def _set_key(key: str, value: Any) -> Callable[[Any], None]:
    return lambda doc: doc.__setitem__(key, value)


NESTED_MSGPACK = b"\x91" * 100_000 + b"\xc0"

HOSTILE: dict[str, tuple[Callable[[Case], None], float, tuple[str, ...]]] = {}


def _case(
    name: str, build: Callable[[Case], None], timeout: float = TIMEOUT, heavy: bool = False
) -> None:
    HOSTILE[name] = (build, timeout, HEAVY_READERS if heavy and not LONG else READERS)


# zarr.json: shapes and chunk shapes
_case(
    "zarr.json shape and chunk_shape as strings",
    _edit_json(
        RAW,
        lambda d: _set(
            _set(d, "shape", ["12"]), "chunk_grid", "configuration", "chunk_shape", ["12"]
        ),
    ),
)
_case(
    "zarr.json shape as floats",
    _edit_json(
        RAW,
        lambda d: _set(
            _set(d, "shape", [12.0]), "chunk_grid", "configuration", "chunk_shape", [12.5]
        ),
    ),
)
_case("zarr.json shape 1e400", _json_field(RAW, "shape", ["@@x@@"], raw={"@@x@@": "1e400"}))
_case(
    "zarr.json chunk_shape 1e400",
    _json_field(
        RAW, "chunk_grid", "configuration", "chunk_shape", ["@@x@@"], raw={"@@x@@": "1e400"}
    ),
)
_case("zarr.json shape NaN", _json_field(RAW, "shape", [math.nan]))
_case("zarr.json shape negative", _json_field(RAW, "shape", [-12]))
_case("zarr.json shape 2**62", _json_field(RAW, "shape", [1 << 62]))
_case(
    "zarr.json shape 5000-digit int",
    _json_field(RAW, "shape", ["@@x@@"], raw={"@@x@@": "9" * 5000}),
)
_case("zarr.json shape with 100000 dimensions", _json_field(RAW, "shape", [1] * 100_000))
_case("zarr.json shape a string", _json_field(RAW, "shape", "12"))
_case("zarr.json shape null", _json_field(RAW, "shape", None))
_case(
    "zarr.json chunk_shape [0]", _json_field(RAW, "chunk_grid", "configuration", "chunk_shape", [0])
)
_case(
    "zarr.json chunk_grid configuration a list",
    _json_field(RAW, "chunk_grid", "configuration", [12]),
)
# ... the same hostile shapes in the record too, so they get past the comparison
_case("record + zarr.json shape [2**62] (NumpyState)", _shape_everywhere(RAW, [1 << 62], [1 << 62]))
_case("record + zarr.json shape [2**40] (NumpyState)", _shape_everywhere(RAW, [1 << 40], [1 << 40]))
_case(
    "record + zarr.json shape [2**40] (Variable, zstd)",
    _shape_everywhere(ZSTD, [1 << 40, 6], [1 << 40, 6]),
)
_case(
    "record + zarr.json chunk_shape [1] on 2**24 elements", _shape_everywhere(RAW, [1 << 24], [1])
)
_case(
    "record + zarr.json chunk_shape [1] on 2**40 elements", _shape_everywhere(RAW, [1 << 40], [1])
)
_case(
    "record + zarr.json chunk_shape [1, 6] on [2**24, 6] (zstd)",
    _shape_everywhere(ZSTD, [1 << 24, 6], [1, 6]),
)
_case(
    "record + zarr.json 64 axes of 2**62",
    _shape_everywhere(RAW, [1 << 62] * 64, [1] * 63 + [1 << 62]),
)
_case(
    "record + zarr.json chunk_shape [1]*64 on 64 axes of 2",
    _shape_everywhere(RAW, [2] * 64, [1] * 64),
)
# zarr.json: codecs
_case(
    "zarr.json zstd configuration a list",
    _json_field(ZSTD, "codecs", 1, "configuration", [3, False]),
)
_case(
    "zarr.json zstd configuration a string",
    _json_field(ZSTD, "codecs", 1, "configuration", "level=3"),
)
_case(
    "zarr.json bytes configuration a list",
    _json_field(ZSTD, "codecs", 0, "configuration", ["little"]),
)
_case(
    "zarr.json zstd level 'high'", _json_field(ZSTD, "codecs", 1, "configuration", "level", "high")
)
_case(
    "zarr.json zstd level 1e400",
    _json_field(ZSTD, "codecs", 1, "configuration", "level", "@@x@@", raw={"@@x@@": "1e400"}),
)
_case(
    "zarr.json zstd level NaN", _json_field(ZSTD, "codecs", 1, "configuration", "level", math.nan)
)
_case(
    "zarr.json zstd level 2**64", _json_field(ZSTD, "codecs", 1, "configuration", "level", 1 << 64)
)
_case("zarr.json zstd level a list", _json_field(ZSTD, "codecs", 1, "configuration", "level", [3]))
_case(
    "zarr.json blosc clevel 'x'",
    _json_field(
        ZSTD,
        "codecs",
        1,
        {"name": "blosc", "configuration": {"cname": "lz4", "clevel": "x", "shuffle": "shuffle"}},
    ),
)
_case(
    "zarr.json blosc configuration a list",
    _json_field(ZSTD, "codecs", 1, {"name": "blosc", "configuration": ["lz4", 5]}),
)
_case("zarr.json codec a string", _json_field(ZSTD, "codecs", 1, "zstd"))
_case("zarr.json codecs a map", _json_field(ZSTD, "codecs", {"name": "bytes"}))
_case("zarr.json codec name a list", _json_field(ZSTD, "codecs", 1, "name", ["zstd"]))
# zarr.json: the document itself
_case("zarr.json 100000 nested open brackets", _json_text(RAW, "[" * 100_000))
_case("zarr.json 100000 nested arrays (valid JSON)", _json_text(RAW, "[" * 100_000 + "]" * 100_000))
_case("zarr.json 50000 nested objects", _json_text(RAW, '{"a":' * 50_000 + "0" + "}" * 50_000))
_case("zarr.json null", _json_text(RAW, "null"))
_case("zarr.json a list", _json_text(RAW, "[1, 2]"))
_case("zarr.json not UTF-8", _json_text(RAW, b"\xff\xfe\x00{"))
_case("zarr.json lone surrogate", _json_text(RAW, '{"shape": "\\ud800"}'))
_case("zarr.json over 1 MiB", _json_text(RAW, " " * (1 << 20) + "{}"))
_case("zarr.json empty", _json_text(RAW, b""))
for _name in ["float128", "object", "|O", "<f4", "", "int4", "float8_e4m3", "V8", "bfloat16 "]:
    _case(f"zarr.json data_type {_name!r}", _json_field(RAW, "data_type", _name))
_case("zarr.json data_type a map", _json_field(RAW, "data_type", {"name": "float32"}))
_case("zarr.json data_type null", _json_field(RAW, "data_type", None))
_case("zarr.json data_type int64 (record says float32)", _json_field(RAW, "data_type", "int64"))
_case(
    "zarr.json data_type float64 over float32 chunks",
    _edit_json(RAW, lambda d: _set(d, "data_type", "float64")),
)
# record: hostile shapes on values whose memory restore allocates
for _shape in ([1 << 40], [1 << 62], [(1 << 64) - 1], [1 << 20] * 4, [1 << 62] * 64):
    _label = f"[{_shape[0]}]" + (f"*{len(_shape)}" if len(_shape) > 1 else "")
    _case(f"record: NumpyState value shape {_label}", _record_shape(RAW, _shape))
    _case(f"record: PythonState value shape {_label}", _record_shape(PY_STATE, _shape))
_case("record: Variable shape [2**40, 6]", _record_shape(ZSTD, [1 << 40, 6]))
_case("record: shape with NaN", _record_shape(RAW, [math.nan]))
_case("record: shape 1e300", _record_shape(RAW, [1e300]))
_case("record: shape with 65 axes", _record_shape(RAW, [1] * 65))
_case("record: shape with 2**20 axes", _record_shape(RAW, [1] * (1 << 20)))
_case("record: version NaN", _record_edit(lambda d: d.__setitem__("version", math.nan)))
_case("record: version 2**64-1", _record_edit(lambda d: d.__setitem__("version", (1 << 64) - 1)))
_case(
    "record: child node id NaN",
    _record_edit(lambda d: d["nodes"][0]["children"][0].__setitem__(1, math.nan)),
)
_case(
    "record: child node id 2**64-1",
    _record_edit(lambda d: d["nodes"][0]["children"][0].__setitem__(1, (1 << 64) - 1)),
)
_case(
    "record: dtype NaN",
    _record_edit(lambda d: _node_of(d, RAW)["attributes"][0].__setitem__(3, math.nan)),
)
_case("record: a node refers to itself and to the root", _record_edit(_self_cycle))
_case(
    "record: a chain of 20000 nodes (100000 if LONG)",
    _record_edit(lambda d: _chain(d, 100_000 if LONG else 20_000)),
    120 if LONG else 30,
)
_case(
    "record: a chain of 2000 nodes named with 1000 characters",
    _record_edit(lambda d: _chain(d, 2000, "n" * 1000)),
    30,
)
_case(
    "record: 2**17 more empty nodes (6 MiB)",
    _record_edit(lambda d: _many_nodes(d, 1 << 17)),
    60,
    heavy=True,
)
_case(
    "record: slot variable of itself",
    _record_edit(lambda d: d["nodes"][1]["slot_variables"].append([1, "m", 1])),
)
_case(
    "record: 2**24 nodes that are empty arrays (16 MiB)", _many_empty_nodes(1 << 24), 60, heavy=True
)
_case("record: 100000 nested msgpack arrays", _record_bytes(NESTED_MSGPACK))
_case(
    "record: array32 header of 2**32-1 nodes",
    _record_bytes(
        b"\x83\xa6format\xb5zarrckpt.object_graph\xa7version\x01\xa5nodes\xdd\xff\xff\xff\xff"
    ),
)
_case("record: str32 header of 4 GiB", _record_bytes(b"\xdb\xff\xff\xff\xff"))
_case("record: empty", _record_bytes(b""))
# _COMMIT: commit times
for _created in (math.nan, math.inf, -math.inf, 1e300, -1e300, 1e20, -1.0):
    _case(f"_COMMIT created {_created!r}", _commit_fields(created=_created))
_case("_COMMIT created 2**64-1 (an int)", _commit_doc(_set_key("created", (1 << 64) - 1)))
_case("_COMMIT created -2**63 (an int)", _commit_doc(_set_key("created", -(1 << 63))))
_case("_COMMIT created 'now'", _commit_doc(_set_key("created", "now")))
# _COMMIT: files
_case("_COMMIT files: 2**24 entries", _many_files(1 << 24), 60, heavy=True)
_case("_COMMIT files: 2**24 empty arrays (16 MiB)", _many_files(1 << 24, b"\x90"), 60, heavy=True)
_case(
    "_COMMIT files: a size of 2**64-1",
    _commit_doc(lambda d: d["files"][0].__setitem__(1, (1 << 64) - 1)),
)
_case("_COMMIT files: a size of -1", _commit_doc(lambda d: d["files"][0].__setitem__(1, -1)))
_case(
    "_COMMIT files: a CRC of 2**64-1",
    _commit_doc(lambda d: d["files"][0].__setitem__(2, (1 << 64) - 1)),
)
_case("_COMMIT files: a size NaN", _commit_doc(lambda d: d["files"][0].__setitem__(1, math.nan)))
for _key in ["../../etc/passwd", "/etc/passwd", "a\x00b", "a\\b", "", "."]:
    _case(
        f"_COMMIT files: key {_key!r}",
        _commit_doc(lambda d, k=_key: d["files"][0].__setitem__(0, k)),
    )
_case("_COMMIT files: an entry of 2 items", _commit_doc(lambda d: _file_entry(d, ["zarr.json", 1])))
_case(
    "_COMMIT files: an entry of 4 items",
    _commit_doc(lambda d: _file_entry(d, ["zarr.json", 1, 2, 3])),
)
_case(
    "_COMMIT files: an entry a map", _commit_doc(lambda d: _file_entry(d, {"a": 1, "b": 2, "c": 3}))
)
_case("_COMMIT files: a map", _commit_doc(_set_key("files", {"zarr.json": [1, 2]})))
_case("_COMMIT files: every file twice", _commit_doc(lambda d: d["files"].extend(d["files"])))
# _COMMIT: other fields
_case("_COMMIT attempt missing on disk", _commit_fields(attempt="attempt-" + "0" * 32))
_case("_COMMIT attempt '..'", _commit_doc(_set_key("attempt", "..")))
_case("_COMMIT format 2**64-1", _commit_doc(_set_key("format", (1 << 64) - 1)))
_case("_COMMIT format 1.0", _commit_doc(_set_key("format", 1.0)))
_case("_COMMIT format NaN", _commit_doc(_set_key("format", math.nan)))
_case("_COMMIT metadata NaN", _commit_doc(_set_key("metadata", {"loss": math.nan})))
_case("_COMMIT metadata nested", _commit_doc(_set_key("metadata", {"a": [[[]]]})))
_case("_COMMIT record_sha256 an int", _commit_doc(_set_key("record_sha256", 5)))
_case("_COMMIT a list", _commit_body(msgpack.packb([1, 2, 3])))
_case("_COMMIT 100000 nested msgpack arrays", _commit_body(NESTED_MSGPACK))
_case("_COMMIT map32 header of 2**32-1 entries", _commit_body(b"\xdf\xff\xff\xff\xff"))
_case("_COMMIT empty", lambda case: case.write(COMMIT, b""))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_case(template: Template, worker: Worker, base: Path, name: str) -> None:
    build, timeout, readers = HOSTILE[name]
    with damaged(template, base, name) as case:
        build(case)
        check(worker, case, timeout, readers)


# Files that are not regular files -------------------------------------------------------

TARGETS = {
    "_COMMIT": COMMIT,
    "record": RECORD,
    "zarr.json": f"{RAW}/zarr.json",
    "raw chunk": f"{RAW}/c.0",
    "zstd chunk": f"{ZSTD}/c.0.0",
}


def _replace_file(file: Path, kind: str) -> None:
    file.unlink()
    if kind == "directory":
        file.mkdir()
        (file / "x").write_bytes(b"x")
    elif kind == "symlink to /dev/zero":
        file.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(file)
    elif kind == "symlink loop":
        file.symlink_to(file.name)
    elif kind == "sparse 4 GiB file":
        with open(file, "wb") as sparse:
            sparse.truncate(4 << 30)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["directory", "symlink to /dev/zero", "fifo", "symlink loop", "sparse 4 GiB file"]
)
@pytest.mark.parametrize("target", list(TARGETS))
def test_not_a_regular_file(
    template: Template, worker: Worker, base: Path, target: str, kind: str
) -> None:
    """A file replaced by a directory, a FIFO, ...: a ZarrckptError, quickly; never a hang."""
    with damaged(template, base, f"{target} replaced by a {kind}") as case:
        _replace_file(case.file(TARGETS[target]), kind)
        check(worker, case)


# Every bit of _COMMIT --------------------------------------------------------------------


@pytest.fixture(scope="module")
def flip_checkpoint(base: Path) -> Path:
    root = zc.Checkpoint(v=zc.Variable(np.arange(3, dtype=np.float32)))
    return Path(root.write(base / "flips" / "ckpt-1"))


def bits_to_flip(data: bytes, created_at: int | None) -> list[int]:
    """Every bit if there are few; else every bit of the first and last 64 bytes, of the
    commit time, and of a fixed sample of the other bytes."""
    if LONG or 8 * len(data) <= MAX_FLIPS:
        return list(range(8 * len(data)))
    chosen = set(range(min(64, len(data)))) | set(range(max(0, len(data) - 64), len(data)))
    if created_at is not None:
        chosen |= set(range(created_at, created_at + 9))
    others = [i for i in range(len(data)) if i not in chosen]
    room = max(0, MAX_FLIPS // 8 - len(chosen))
    chosen |= set(random.Random(0).sample(others, min(room, len(others))))
    return [8 * i + b for i in sorted(chosen) for b in range(8)]


def test_every_commit_bit_flip_is_detected(flip_checkpoint: Path, worker: Worker) -> None:
    """Any one flipped bit of ``_COMMIT`` is found by verify, list_checkpoints and restore.

    verify and restore must raise a ZarrckptError, and list_checkpoints must not
    list the checkpoint as committed. Only a checksum over ``_COMMIT`` itself
    can catch a flip in, say, the commit time or a listed CRC32C.
    """
    data = (flip_checkpoint / COMMIT).read_bytes()
    manifest = _commit.Manifest.decode(data, where="flip")
    created = b"\xcb" + struct.pack(">d", manifest.created)
    created_at = data.find(created) if created in data else None
    bits = bits_to_flip(data, created_at)
    problems: list[dict[str, Any]] = []
    batch = 256
    for start in range(0, len(bits), batch):
        chunk = bits[start : start + batch]
        request = {
            "op": "bitflips",
            "path": str(flip_checkpoint),
            "parent": str(flip_checkpoint.parent),
            "original": data.hex(),
            "bits": chunk,
        }
        answer = worker.ask(request, timeout=max(60.0, 0.25 * len(chunk)))
        if answer is None:
            problems.append({"bit": chunk, "found": {"batch": worker.last_error}})
            (flip_checkpoint / COMMIT).write_bytes(data)
        else:
            problems.extend(answer["problems"])
    if not problems:
        return
    by_reader: dict[str, list[int]] = {}
    for problem in problems:
        for reader in problem["found"]:
            by_reader.setdefault(reader, []).append(problem["bit"])
    lines = [
        f"{len(problems)} of {len(bits)} single-bit flips of a {len(data)}-byte _COMMIT "
        f"were not detected by every reader (commit time at byte {created_at}):"
    ]
    for reader, found in by_reader.items():
        where = sorted({b // 8 for b in found if isinstance(b, int)})
        lines.append(f"  {reader}: {len(found)} flips, in bytes {where[:40]}")
    for problem in problems[:10]:
        lines.append(f"  bit {problem['bit']}: {problem['found']}")
    pytest.fail("\n".join(lines), pytrace=False)
