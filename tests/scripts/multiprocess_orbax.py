"""The Orbax handler under jax.distributed (run by tests/test_multiprocess_orbax.py).

One of NUM_PROCESSES processes joined over loopback, each with 4 host CPU
devices. Every process saves the same tree of global arrays (one leaf split
across processes, one each process holds whole over its own devices, one
replicated, a numpy leaf) through Orbax with jaxjpeg's handler: a
``CheckpointManager`` saving asynchronously (the caller's arrays deleted as
soon as ``save`` returns), and a synchronous ``Checkpointer``. Each save is
distributed (every process codes the leaves it holds, process 0 commits),
and decodes to the bits a one-process save of the same values gives.

    python tests/scripts/multiprocess_orbax.py WORKDIR PROCESS_ID NUM_PROCESSES PORT

Prints one JSON line last: {"process", "checks": {name: "ok" or the traceback}}.
"""

import json
import os
import sys
import time
import traceback

from process_group import LOCAL_DEVICES, join  # sets XLA_FLAGS before jax loads

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

WORK, PROCESS, NUM_PROCESSES = join()

import orbax.checkpoint as ocp  # noqa: E402

import jaxjpeg  # noqa: E402
from jaxjpeg import checkpoint, distributed_save, treepaths  # noqa: E402
from jaxjpeg.orbax import JaxjpegCheckpointHandler, JaxjpegRestore, JaxjpegSave  # noqa: E402

rng = np.random.default_rng(0)   # same seed everywhere: every process knows VALUES
VALUES = {
    "split": rng.normal(size=(2048, 512)).astype(np.float32),        # rows across processes
    "local": rng.normal(size=(512, 1024)).astype(np.float32),        # whole in each process
    "replicated": rng.normal(size=(256, 512)).astype(jax.numpy.bfloat16),
    "bias": rng.normal(size=(512,)).astype(np.float32),              # numpy, raw
}
GLOBAL = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
GRID = jax.sharding.Mesh(np.array(jax.devices()).reshape(NUM_PROCESSES, LOCAL_DEVICES),
                         ("proc", "dev"))
SHARDINGS = {"split": NamedSharding(GLOBAL, P("x")),
             "local": NamedSharding(GRID, P(None, "dev")),
             "replicated": NamedSharding(GLOBAL, P())}


def make_tree():
    tree = {name: jax.make_array_from_callback(VALUES[name].shape, sharding,
                                               lambda index, v=VALUES[name]: v[index])
            for name, sharding in SHARDINGS.items()}
    return dict(tree, bias=VALUES["bias"].copy())


REFERENCE_PATH = os.path.join(WORK, f"one_process_{PROCESS}.jjpg")
checkpoint.save_leaves(REFERENCE_PATH, [
    checkpoint.SourceLeaf.of(records, VALUES[records[0][1]], checkpoint.shard_regions(leaf))
    for records, leaf in treepaths.leaves_with_paths(make_tree())])
REFERENCE = {k: np.asarray(v) for k, v in jaxjpeg.restore(REFERENCE_PATH).items()}
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def assert_reference(restored):
    assert set(restored) == set(REFERENCE), sorted(restored)
    for name, want in REFERENCE.items():
        for shard in getattr(restored[name], "addressable_shards", None) or []:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index],
                                          err_msg=name)
        if not isinstance(restored[name], jax.Array) or restored[name].is_fully_addressable:
            np.testing.assert_array_equal(np.asarray(restored[name]), want, err_msg=name)


@check
def manager_async_save_is_distributed():
    """A CheckpointManager (asynchronous by default) saves the split leaf too;
    the caller's arrays are deleted as soon as save returns (the commit
    thread works on its own host copies)."""
    before = distributed_save._saves_started
    manager = ocp.CheckpointManager(os.path.join(WORK, "manager"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    for step in (1, 2):
        tree = make_tree()
        manager.save(step, args=ocp.args.Composite(params=JaxjpegSave(tree)))
        for name in SHARDINGS:
            tree[name].delete()
    manager.wait_until_finished()
    assert distributed_save._saves_started == before + 2   # this process took part in both
    assert manager.all_steps() == [1, 2]
    file = os.path.join(WORK, "manager", "2", "params", "checkpoint.jjpg")
    assert os.path.isfile(file), os.listdir(os.path.join(WORK, "manager", "2"))
    # Restored here over the global mesh, the split leaf sharded another way.
    target = {name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
        GLOBAL, P(None, "x") if name == "split" else P())) for name, v in VALUES.items()
        if name != "bias"}
    restored = manager.restore(2, args=ocp.args.Composite(params=JaxjpegRestore(
        dict(target, bias=jax.ShapeDtypeStruct((512,), np.float32)))))["params"]
    assert restored["split"].sharding.spec == P(None, "x")
    assert_reference(restored)
    manager.close()


@check
def two_items_of_one_step_save_asynchronously():
    """Found by review: with two jaxjpeg items in one asynchronous step, the
    second item's save deleted the first's keys while it was committing;
    every process waited for them until the timeout and the step was lost."""
    timeout = distributed_save.TIMEOUT_S
    distributed_save.TIMEOUT_S = 60   # a hang fails this check, not the whole run
    try:
        directory = os.path.join(WORK, "two_items")
        manager = ocp.CheckpointManager(directory,
                                        options=ocp.CheckpointManagerOptions(max_to_keep=3))
        for step in (1, 2, 3):
            manager.save(step, args=ocp.args.Composite(
                params=JaxjpegSave(make_tree()), ema=JaxjpegSave(make_tree(), quality=90)))
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2, 3], manager.all_steps()
        for item in ("params", "ema"):
            assert os.path.isfile(os.path.join(directory, "3", item, "checkpoint.jjpg"))
        assert_reference(manager.restore(3, args=ocp.args.Composite(
            params=JaxjpegRestore()))["params"])
        manager.close()
    finally:
        distributed_save.TIMEOUT_S = timeout


@check
def checkpointer_sync_save_is_distributed():
    before = distributed_save._saves_started
    with ocp.Checkpointer(JaxjpegCheckpointHandler()) as ckptr:
        ckptr.save(os.path.join(WORK, "sync"), args=JaxjpegSave(make_tree(), quality=90))
        assert distributed_save._saves_started == before + 1
        restored = ckptr.restore(os.path.join(WORK, "sync"),
                                   args=JaxjpegRestore())
    assert set(restored) == set(VALUES)
    with jaxjpeg.open(os.path.join(WORK, "sync", "checkpoint.jjpg")) as f:
        assert f.info("split").kind == "jpeg"


@check
def one_process_refusing_fails_every_process():
    """Process 1 alone saves a leaf no checkpoint holds: Orbax's save raises in
    every process, at once (no process waits for the others), and no
    checkpoint appears."""
    tree = dict(make_tree(), names=np.array(["a", "b"]) if PROCESS == 1 else np.zeros(2))
    directory = os.path.join(WORK, "refused")
    start = time.monotonic()
    try:
        with ocp.Checkpointer(JaxjpegCheckpointHandler()) as ckptr:
            ckptr.save(directory, args=JaxjpegSave(tree))
    except (TypeError, ValueError) as e:
        assert ("process 1" in str(e)) if PROCESS != 1 else ("dtype <U1" in str(e)), str(e)
    else:
        raise AssertionError("the save did not fail")
    assert time.monotonic() - start < 60
    assert not os.path.exists(os.path.join(directory, "checkpoint.jjpg"))


results = {}
for name, fn in CHECKS.items():
    try:
        fn()
        results[name] = "ok"
    except Exception:
        results[name] = traceback.format_exc()
print(json.dumps({"process": PROCESS, "checks": results}))
sys.stdout.flush()
jax.distributed.shutdown()
