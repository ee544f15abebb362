"""Runs a test script as several jax.distributed processes on one machine.

Each process gets (workdir, process index, process count, coordinator port)
on its command line and 4 host CPU devices, and reports its checks as one
JSON line, the last of its stdout.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, workdir: Path, port: int, processes: int,
           timeout_s: float) -> list[tuple[int, str, str]]:
    """Runs the processes to the end; [(returncode, stdout, stderr)] by process.
    A process that fails takes the others down at once (they would only wait
    for it); past ``timeout_s`` all are killed."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    logs, procs = [], []
    try:
        for i in range(processes):
            out = open(workdir / f"stdout{i}", "w+")
            err = open(workdir / f"stderr{i}", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen(
                [sys.executable, str(script), str(workdir), str(i), str(processes), str(port)],
                env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def run_reports(tmp_path_factory, script: Path, processes: int, timeout_s: float,
                checks: list[str]) -> tuple[Path, list[dict]]:
    """(workdir, each process's JSON report) of a run in which every process
    exited 0 and reported exactly ``checks``; retried when another program
    took the port between choosing and binding it."""
    for _ in range(3):
        workdir = tmp_path_factory.mktemp(script.stem)
        runs = launch(script, workdir, free_loopback_port(), processes, timeout_s)
        if "Failed to start RPC server" not in runs[0][2]:
            break
    for i, (code, _, err) in enumerate(runs):
        assert code == 0, f"process {i} exited with {code}:\n{err[-5000:]}"
    reports = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in runs]
    assert [r["process"] for r in reports] == list(range(processes))
    for r in reports:
        assert sorted(r["checks"]) == sorted(checks), "script and test disagree on the checks"
    return workdir, reports
