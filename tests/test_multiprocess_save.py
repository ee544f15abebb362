"""Distributed save under jax.distributed: 2 processes x 4 host CPU devices.

tests/scripts/multiprocess_save.py runs as NUM_PROCESSES processes joined
over loopback (coordinator on 127.0.0.1); every process saves the same tree
of global arrays with ``distributed=True`` (each codes and writes its share,
process 0 commits one file), then restores it on one local device and sharded
over the global mesh. Here, in this one-process pytest run (a different
topology: one process, its own devices), the file is restored again.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxjpeg
import jaxjpeg.cli

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_save.py"
NUM_PROCESSES = 2
TIMEOUT_S = 180

CHECKS = [
    "every_process_codes_some_leaves",
    "same_file_content_as_one_process_save",
    "sharded_restore_over_the_global_mesh",
    "report_and_metadata",
    "byte_targets_are_refused_in_every_process",
    "one_process_refusing_fails_every_process_quickly",
    "a_second_save_replaces_the_first",
]


def _launch(workdir: Path, port: int) -> list[tuple[int, str, str]]:
    """Runs the processes; a failing one takes the others down at once."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            logs.append((open(workdir / f"stdout{i}", "w+"), open(workdir / f"stderr{i}", "w+")))
            procs.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), str(workdir), str(i), str(NUM_PROCESSES),
                 str(port)], env=env, stdout=logs[-1][0], stderr=logs[-1][1],
                stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    out = []
    for p, (stdout, stderr) in zip(procs, logs):
        stdout.seek(0)
        stderr.seek(0)
        out.append((p.returncode, stdout.read(), stderr.read()))
        stdout.close()
        stderr.close()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_multiprocess_restore import _free_loopback_port
    for _ in range(3):
        workdir = tmp_path_factory.mktemp("multiprocess_save")
        runs = _launch(workdir, _free_loopback_port())
        if "Failed to start RPC server" not in runs[0][2]:
            break
    for i, (code, _, err) in enumerate(runs):
        assert code == 0, f"process {i} exited with {code}:\n{err[-5000:]}"
    reports = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in runs]
    for r in reports:
        assert sorted(r["checks"]) == sorted(CHECKS), "script and test disagree on the checks"
    return workdir, reports


@pytest.mark.parametrize("name", CHECKS)
def test_multiprocess_save(run, name):
    for r in run[1]:
        assert r["checks"][name] == "ok", f"process {r['process']}:\n{r['checks'][name]}"


def test_processes_agree_on_the_plan(run):
    reports = run[1]
    assert all(r["owners"] == reports[0]["owners"] for r in reports)
    assert all(r["gathered"] == reports[0]["gathered"] for r in reports)


def test_one_process_restores_the_distributed_file(run):
    """Another topology: this pytest process alone, with its own devices."""
    workdir, _ = run
    restored = jaxjpeg.restore(workdir / "distributed.jjpg")
    reference = jaxjpeg.restore(workdir / "one_process_0.jjpg")
    assert set(restored) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(reference[name]))
    assert not list(workdir.glob("*.tmp-*")), "a temporary file was left behind"
    assert jaxjpeg.cli.main(["verify", str(workdir / "distributed.jjpg")]) == 0
