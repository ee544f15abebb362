"""The Orbax handler's multi-host save: 2 processes x 4 host CPU devices.

tests/scripts/multiprocess_orbax.py runs as NUM_PROCESSES processes joined
over loopback; each saves the same global arrays (one split across the
processes, which a primary-host-only save refused) through an Orbax
``CheckpointManager`` (asynchronous) and a ``Checkpointer`` (synchronous)
with jaxjpeg's handler: every process codes the leaves it holds, process 0
commits. Here, in this one-process pytest run (a different device count),
the manager's latest step is restored through Orbax again.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

import jaxjpeg
import jaxjpeg.cli
from multiprocess_launch import run_reports

ocp = pytest.importorskip("orbax.checkpoint")

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_orbax.py"
NUM_PROCESSES = 2
TIMEOUT_S = 240
CHECKS = ["manager_async_save_is_distributed", "two_items_of_one_step_save_asynchronously",
          "checkpointer_sync_save_is_distributed", "one_process_refusing_fails_every_process"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_reports(tmp_path_factory, SCRIPT, NUM_PROCESSES, TIMEOUT_S, CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_multiprocess_orbax_save(run, name):
    for r in run[1]:
        assert r["checks"][name] == "ok", f"process {r['process']}:\n{r['checks'][name]}"


def test_one_process_restores_the_manager_step(run):
    from jaxjpeg.orbax import JaxjpegRestore
    workdir, _ = run
    reference = jaxjpeg.restore(workdir / "one_process_0.jjpg")
    device = jax.devices()[0]
    target = {name: jax.ShapeDtypeStruct(np.shape(v), v.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(device))
              for name, v in reference.items()}
    with ocp.CheckpointManager(workdir / "manager") as manager:
        assert manager.latest_step() == 2
        restored = manager.restore(2, args=ocp.args.Composite(
            params=JaxjpegRestore(target)))["params"]
    assert set(restored) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(reference[name]))
    file = workdir / "manager" / "2" / "params" / "checkpoint.jjpg"
    assert jaxjpeg.cli.main(["verify", str(file)]) == 0
    assert not list(workdir.rglob("*.tmp-*")), "a temporary file was left behind"
