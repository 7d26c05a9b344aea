"""Starting real processes for the tests: free ports, hard time limits, nothing left running.

Shared by the tests that launch ranks (test_distributed_procs.py,
test_torch_dist.py) and example programs (test_distributed_docs.py,
test_torch_docs.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def run_launcher(command: list[str], *, cwd: Path, timeout: float) -> str:
    """Run a launcher (torchrun, mpiexec, a script); its stdout.

    Fails the test on a non-zero exit, or after ``timeout`` seconds, once
    every process the launch started is killed.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:  # only what this launch started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", "(output lost)"
        pytest.fail(f"{command} hung for {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{command} exited with {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}")
    return out


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int] | None:
    """Every process's exit status, or None after killing them all at ``timeout``.

    Each process must lead a session of its own (``start_new_session=True``):
    its children are killed with it.
    """
    deadline = time.monotonic() + timeout
    codes: list[int] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            for other in procs:
                other.wait()
            return None
    return codes
