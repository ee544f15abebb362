"""Shared fixtures for the codec-core tests.

`native_worker` runs jaxjpeg._native calls in a child process. Tests that feed
the decoder hostile input use it so that a memory-safety bug (a segfault, an
abort from a sanitizer) fails the one test with the offending input instead of
killing the whole pytest run; a clean JpegError comes back as a value.
"""

import os
import pickle
import select
import signal
import struct
import subprocess
import sys

import pytest

# A run started in the background by a shell inherits SIGINT ignored, which
# Python, and the commands the tests start, then keep: the tests of Ctrl-C
# need it as an interactive run has it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_WORKER_SOURCE = r"""
import os, pickle, resource, struct, sys
import numpy as np
from jaxjpeg import _native
if os.environ.get("JJ_WORKER_AS_LIMIT_MB"):
    limit = int(os.environ["JJ_WORKER_AS_LIMIT_MB"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def run_plan_guarded(payload, interval_starts, tiles, tables, row_scale, row_offset,
                     output_sizes, output_types, guard=4096, **kwargs):
    # run_plan into outputs carved from the middle of bigger arrays filled with
    # a sentinel; returns (error or None, the outputs, every guard untouched).
    bigs, outputs = [], []
    for size, t in zip(output_sizes, output_types):
        if t == 0:
            big = np.full(size + 2 * guard, -7.25e30, np.float32)
        else:
            big = np.full(size + 2 * guard, 0xABCD, np.uint16)
        bigs.append(big)
        outputs.append(big[guard:guard + size])
    try:
        _native.run_plan(payload, interval_starts, tiles, tables, row_scale, row_offset, outputs,
                         list(output_types), **kwargs)
        error = None
    except _native.JpegError as e:
        error = ("JpegError", str(e))
    except Exception as e:
        error = (type(e).__name__, str(e))
    intact = all(bool(np.all(big[:guard] == big[0]) and np.all(big[-guard:] == big[0]))
                 for big in bigs)
    return error, [o.copy() for o in outputs], intact

LOCAL = {"run_plan_guarded": run_plan_guarded}
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = stdin.read(8)
    if len(head) < 8:
        break
    name, args, kwargs = pickle.loads(stdin.read(struct.unpack("<Q", head)[0]))
    try:
        result = ("ok", (LOCAL.get(name) or getattr(_native, name))(*args, **kwargs))
    except _native.JpegError as e:
        result = ("JpegError", str(e))
    except Exception as e:  # reported to the test, which decides
        result = (type(e).__name__, str(e))
    blob = pickle.dumps((result, args, kwargs))
    stdout.write(struct.pack("<Q", len(blob)) + blob)
    stdout.flush()
"""


class WorkerCrashed(AssertionError):
    """The child process died inside a native call: a crash, not an error."""


class NativeWorker:
    timeout_s = 60.0

    def __init__(self, memory_limit_mb=None):
        self._proc = None
        self._env = dict(os.environ)
        if memory_limit_mb:
            self._env["JJ_WORKER_AS_LIMIT_MB"] = str(memory_limit_mb)

    def _start(self):
        self._proc = subprocess.Popen([sys.executable, "-c", _WORKER_SOURCE], env=self._env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, name, *args, **kwargs):
        """Returns (kind, value, args, kwargs): kind is "ok" (value = the result),
        "JpegError" or another exception's type name (value = its message).
        Array arguments come back as the call left them. `name` is a function
        of jaxjpeg._native, or "run_plan_guarded" (see the worker source)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        blob = pickle.dumps((name, args, kwargs))
        try:
            self._proc.stdin.write(struct.pack("<Q", len(blob)) + blob)
            self._proc.stdin.flush()
            ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout_s)
            if not ready:  # a hang is a failure too
                self._proc.kill()
            head = self._proc.stdout.read(8)
        except BrokenPipeError:
            head = b""
        if len(head) < 8:
            code = self._proc.wait()
            self._proc = None
            preview = args[0][:4096].hex() if args and isinstance(args[0], bytes) else ""
            raise WorkerCrashed(f"_native.{name} crashed or hung (exit {code}); "
                                f"first argument (hex): {preview}")
        (kind, value), args, kwargs = pickle.loads(self._proc.stdout.read(struct.unpack("<Q", head)[0]))
        return kind, value, args, kwargs

    def decode(self, data: bytes):
        """("ok", samples) or ("JpegError", message); anything else is returned as is."""
        kind, value, _, _ = self.call("decode_samples", bytes(data), threads=1)
        return kind, value

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)


@pytest.fixture(scope="session")
def native_worker():
    worker = NativeWorker()
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def small_memory_worker():
    """A worker whose address space is capped at 512 MiB: a small hostile file
    must fail cleanly, not allocate gigabytes."""
    worker = NativeWorker(memory_limit_mb=512)
    yield worker
    worker.close()


def _has_gpu() -> bool:
    try:
        import jax
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    """GPU tests are collected everywhere and skipped, visibly and with the
    reason, where no CUDA device exists (they used to vanish from CPU runs)."""
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA device: the GPU decode checks need one "
                                   "(benchmarks/gpu_check.sh runs them on a GPU machine)")
    for item in items:
        if "gpu" in item.path.parts[-2:-1]:
            item.add_marker(skip)


@pytest.fixture
def memory_fs():
    """(fsspec's in-memory filesystem, a fresh root on it), removed afterwards."""
    import uuid

    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/jj-{os.getpid()}-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)
