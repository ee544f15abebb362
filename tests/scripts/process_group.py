"""Joins a multi-process test script to its ``jax.distributed`` group.

Every script is run as ``python tests/scripts/NAME.py WORKDIR PROCESS_ID
NUM_PROCESSES PORT`` and gets LOCAL_DEVICES host CPU devices: the XLA flag
must be in the environment before jax initialises, so this module sets it
and must be imported before jax is.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

LOCAL_DEVICES = 4


def join(argv=None) -> tuple[str, int, int]:
    """(WORKDIR, PROCESS_ID, NUM_PROCESSES) of this process, once joined over loopback."""
    work, process, num_processes, port = (argv or sys.argv)[1:5]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               coordinator_bind_address=f"127.0.0.1:{port}",
                               num_processes=int(num_processes), process_id=int(process),
                               initialization_timeout=60, shutdown_timeout_seconds=60)
    return work, int(process), int(num_processes)
