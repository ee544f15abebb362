"""Sharded restore across processes (run by tests/test_multiprocess_restore.py).

One of NUM_PROCESSES processes joined by ``jax.distributed`` over loopback,
each with 4 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4
must be in the environment before jax initialises), so the global mesh has
4 * NUM_PROCESSES devices. Usage:

    python tests/scripts/multiprocess_restore.py WORKDIR PROCESS_ID NUM_PROCESSES PORT

Process 0 saves the checkpoint; the others wait for it to appear (save writes
the file atomically, so its existence is the barrier). Then every process
restores with shardings over the global mesh and checks only what it holds:
its addressable shards, the payload bytes its own devices got, and the tile
blobs it read from the file.

CPU collectives are switched off (no gloo): restore must need no cross-process
communication, and nothing here listens anywhere but the coordinator on
127.0.0.1.

Prints one JSON line last: {"process", "checks": {name: "ok" or the failure's
traceback}, "tile_bytes_read": {name: bytes}, "leaf_tile_bytes": {leaf: bytes},
"reference_sha256": {leaf: hex}}.
"""

import hashlib
import json
import os
import time
import traceback

from process_group import LOCAL_DEVICES, join  # sets XLA_FLAGS before jax loads

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", None)
WORK, PROCESS, NUM_PROCESSES = join()

import jaxjpeg  # noqa: E402
from jaxjpeg import checkpoint_reader as ckr, format as fmt  # noqa: E402
from shard_tiles import overlaps  # noqa: E402

CHECKS = {}
TILE_BYTES_READ = {}   # check name -> bytes of tile blobs this process read


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# Every tile blob this process reads from the file, (blob name, bytes), in order.
BLOBS_READ = []
_read_blob = fmt.ContainerReader.read_blob


def _logged_read_blob(self, name, **kwargs):
    view = _read_blob(self, name, **kwargs)
    if name.endswith(".jpg"):
        BLOBS_READ.append((name, len(view)))
    return view


fmt.ContainerReader.read_blob = _logged_read_blob


def mesh(shape, names):
    # jax.devices() is ordered by process: the first axis of a (2, 4) mesh
    # crosses processes, the second stays inside one.
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)


N = NUM_PROCESSES * LOCAL_DEVICES   # devices in the global mesh
rng = np.random.default_rng(0)   # same seed everywhere: every process knows TREE
TREE = {
    # tiles of 512 cut at the 8-way splits of the largest axis (numpy leaves)
    "rows": rng.normal(size=(2048, 1024)).astype(np.float32),        # 8 x 2 tiles
    "cols": rng.normal(size=(1024, 2048)).astype(np.float32),        # 2 x 8 tiles
    "conv": rng.normal(size=(16, 2, 64, 512)).astype(np.float32),    # 2-D view (2048, 512)
    "half": rng.normal(size=(1024, 1024)).astype(jax.numpy.bfloat16),
    "bias": rng.normal(size=(1024,)).astype(np.float32),             # raw
}
PATH = os.path.join(WORK, "tree.jjpg")
if PROCESS == 0:
    # The framework's views, so the tile grid below is the one these checks
    # describe (test_sharded_restore covers views the coder chose itself).
    jaxjpeg.save(PATH, TREE, view="framework")
deadline = time.monotonic() + 60
while not os.path.exists(PATH):   # save is atomic: the file appears complete
    if time.monotonic() > deadline:
        raise SystemExit(f"process {PROCESS}: no checkpoint from process 0 after 60 s")
    time.sleep(0.05)

# The unsharded restore, decoded in this process on its own first device.
REFERENCE = {k: np.asarray(v) for k, v in jaxjpeg.restore(PATH).items()}


def tile_records(name):
    """[(blob name, row0, col0, h, w, size)] of leaf `name`'s tiles, from the file."""
    with ckr.Checkpoint(PATH) as c:
        (leaf,) = [l for l in c.leaves if l.path == name]
        view = (leaf.view.perm, leaf.view.split)
        return [(f"leaf{leaf.index}/tile{k}.jpg", r0, c0, h, w, c.tile_size(leaf, k), view)
                for k, (r0, c0, h, w, _) in enumerate(leaf.tiles)]


def local_expected(name, sharding):
    """device -> the tile blobs overlapping its shard's 2-D box, for this process's
    devices only (from the global devices_indices_map and the tile records,
    independently of restore)."""
    shape = TREE[name].shape
    tiles = tile_records(name)
    out = {}
    for device, index in sharding.devices_indices_map(shape).items():
        if device.process_index != jax.process_index():
            continue
        out[str(device)] = [(blob, size) for blob, r0, c0, h, w, size, view in tiles
                            if overlaps(shape, index, (r0, c0, h, w), view)]
    return out


def check_local_shards(name, value, sharding):
    assert value.sharding.is_equivalent_to(sharding, value.ndim), (value.sharding, sharding)
    local = {d for d in sharding.device_set if d.process_index == jax.process_index()}
    assert {s.device for s in value.addressable_shards} == local
    original = np.asarray(TREE[name], np.float32)
    for shard in value.addressable_shards:
        data = np.asarray(shard.data)
        np.testing.assert_array_equal(data, REFERENCE[name][shard.index],
                                      err_msg=f"{name} shard on {shard.device}")
        rel = np.sqrt(np.mean((data.astype(np.float32) - original[shard.index]) ** 2))
        assert rel < 0.15, (name, shard.device, rel)   # the slice of the original, lossy


def restore_checked(name, sharding, check_name):
    """Restores one leaf with `sharding`, checks the shards held here, the payload
    bytes per local device and the tile blobs this process read."""
    stats = jaxjpeg.RestoreStats()
    target = {name: jax.ShapeDtypeStruct(TREE[name].shape, TREE[name].dtype, sharding=sharding)}
    start = len(BLOBS_READ)
    value = jaxjpeg.restore(PATH, target=target, stats=stats)[name]
    read = BLOBS_READ[start:]
    check_local_shards(name, value, sharding)
    want = local_expected(name, sharding)
    per_device = stats.payload_bytes_per_device
    local_names = {str(d) for d in jax.local_devices()}
    assert set(per_device) <= local_names, per_device   # no other process's device
    assert per_device == {d: sum(s for _, s in tiles) for d, tiles in want.items()}, \
        (per_device, want)
    # What was read from the file: exactly the tiles overlapping some local
    # shard, each once per local device whose shard overlaps it.
    assert sorted(read) == sorted(t for tiles in want.values() for t in tiles), (read, want)
    assert sum(size for _, size in read) == sum(per_device.values())
    TILE_BYTES_READ[check_name] = sum(size for _, size in read)
    return value, read


@check
def global_mesh_spans_processes():
    assert jax.process_count() == NUM_PROCESSES and jax.process_index() == PROCESS
    assert len(jax.devices()) == NUM_PROCESSES * LOCAL_DEVICES, jax.devices()
    assert len(jax.local_devices()) == LOCAL_DEVICES
    assert all(d.process_index == PROCESS for d in jax.local_devices())


@check
def unsharded_reference_on_local_device():
    value = jaxjpeg.restore(PATH, paths=["rows"])["rows"]
    assert value.devices() == {jax.local_devices()[0]}, value.devices()
    np.testing.assert_array_equal(np.asarray(value), REFERENCE["rows"])
    for name, ref in REFERENCE.items():
        assert ref.dtype == TREE[name].dtype and ref.shape == TREE[name].shape
    np.testing.assert_array_equal(REFERENCE["bias"], TREE["bias"])


@check
def rows_sharded_across_processes():
    restore_checked("rows", NamedSharding(mesh((N,), ("x",)), P("x", None)),
                    "rows_sharded_across_processes")


@check
def cols_sharded_across_processes():
    restore_checked("cols", NamedSharding(mesh((N,), ("x",)), P(None, "x")),
                    "cols_sharded_across_processes")


@check
def mesh_2d_one_tile_per_device():
    # "cols" is 2 x 8 tiles of 512 x 256: on a (2, 4) mesh each device gets two.
    assert NUM_PROCESSES == 2
    _, read = restore_checked("cols", NamedSharding(mesh((2, 4), ("a", "b")), P("a", "b")),
                              "mesh_2d_one_tile_per_device")
    mine = [t[0] for t in tile_records("cols") if t[1] == 512 * PROCESS]  # my tile row
    assert sorted(b for b, _ in read) == sorted(mine), read


@check
def mesh_2d_processes_split_columns():
    # the process axis on the columns: each process reads its half of the columns
    _, read = restore_checked("rows", NamedSharding(mesh((2, 4), ("a", "b")), P("b", "a")),
                              "mesh_2d_processes_split_columns")
    mine = [t[0] for t in tile_records("rows") if t[2] == 512 * PROCESS]  # my tile column
    assert sorted(b for b, _ in read) == sorted(mine), read


@check
def four_d_leaf_sharded_on_leading_dim():
    restore_checked("conv", NamedSharding(mesh((N,), ("x",)), P("x")),
                    "four_d_leaf_sharded_on_leading_dim")


@check
def four_d_leaf_sharded_on_inner_dims():
    # shards whose rows in the 2-D view are not contiguous
    for k, spec in enumerate((P(None, "a", "b"), P("b", None, "a"))):
        restore_checked("conv", NamedSharding(mesh((2, 4), ("a", "b")), spec),
                        f"four_d_leaf_sharded_on_inner_dims[{k}]")


@check
def bfloat16_sharded():
    value, _ = restore_checked("half", NamedSharding(mesh((2, 4), ("a", "b")), P("a", "b")),
                               "bfloat16_sharded")
    assert value.dtype == jax.numpy.bfloat16


@check
def replicated_each_process_reads_everything():
    sharding = NamedSharding(mesh((N,), ("x",)), P())
    value, read = restore_checked("cols", sharding, "replicated_each_process_reads_everything")
    total = sum(t[5] for t in tile_records("cols"))
    assert sum(s for _, s in read) == LOCAL_DEVICES * total  # every local device, all tiles


@check
def raw_leaf_sharded():
    sharding = NamedSharding(mesh((N,), ("x",)), P("x"))
    stats = jaxjpeg.RestoreStats()
    start = len(BLOBS_READ)
    value = jaxjpeg.restore(PATH, target={"bias": jax.ShapeDtypeStruct(
        (1024,), np.float32, sharding=sharding)}, stats=stats)["bias"]
    assert stats.payload_bytes_per_device == {} and BLOBS_READ[start:] == []
    check_local_shards("bias", value, sharding)


@check
def whole_tree_mixed_targets():
    m = mesh((N,), ("x",))
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(m, P("x")))
              for k, v in TREE.items()}
    # one leaf whole on one device of this process, one on a device of another
    mine = jax.local_devices()[1]
    theirs = [d for d in jax.devices() if d.process_index != PROCESS][2]
    target["rows"] = jax.ShapeDtypeStruct((2048, 1024), np.float32,
                                          sharding=SingleDeviceSharding(mine))
    target["half"] = jax.ShapeDtypeStruct((1024, 1024), jax.numpy.bfloat16,
                                          sharding=SingleDeviceSharding(theirs))
    target["bias"] = jax.ShapeDtypeStruct((1024,), np.float32,
                                          sharding=SingleDeviceSharding(theirs))
    stats = jaxjpeg.RestoreStats()
    start = len(BLOBS_READ)
    restored = jaxjpeg.restore(PATH, target=target, stats=stats)
    for name, value in restored.items():
        check_local_shards(name, value, target[name].sharding)
    assert set(stats.payload_bytes_per_device) <= {str(d) for d in jax.local_devices()}
    np.testing.assert_array_equal(np.asarray(restored["rows"]), REFERENCE["rows"])
    assert restored["half"].addressable_shards == restored["bias"].addressable_shards == []
    assert restored["half"].dtype == jax.numpy.bfloat16 and restored["bias"].dtype == np.float32
    with ckr.Checkpoint(PATH) as c:   # nothing of "half" was read here
        (half,) = [l for l in c.leaves if l.path == "half"]
    assert not [b for b, _ in BLOBS_READ[start:] if b.startswith(f"leaf{half.index}/")]


@check
def tied_leaves_on_one_global_sharding():
    """Found by review: tied leaves asked for alike were copied with
    device_put(value), which a global array not fully addressable here
    refuses: every such restore failed."""
    path = os.path.join(WORK, "tied.jjpg")
    if PROCESS == 0:
        jaxjpeg.save(path + ".part.jjpg", {"embed": TREE["rows"], "head": TREE["rows"]})
        os.replace(path + ".part.jjpg", path)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "no tied checkpoint from process 0"
        time.sleep(0.05)
    for spec in (P(), P("x", None)):
        sharding = NamedSharding(mesh((N,), ("x",)), spec)
        target = {k: jax.ShapeDtypeStruct((2048, 1024), np.float32, sharding=sharding)
                  for k in ("embed", "head")}
        got = jaxjpeg.restore(path, target=target)
        assert got["head"] is not got["embed"]
        for a, b in zip(got["embed"].addressable_shards, got["head"].addressable_shards):
            assert a.index == b.index and a.device == b.device
            np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


@check
def compressed_load_on_local_device():
    loaded = jaxjpeg.load(PATH)
    assert loaded["cols"].operands[0].devices() == {jax.local_devices()[0]}
    decoded = jaxjpeg.decode(loaded)
    for name, value in decoded.items():
        np.testing.assert_array_equal(np.asarray(value), REFERENCE[name])


results = {}
for name, fn in CHECKS.items():
    try:
        fn()
        results[name] = "ok"
    except BaseException:  # reported per check to the test
        results[name] = traceback.format_exc()
print(json.dumps({
    "process": PROCESS,
    "checks": results,
    "tile_bytes_read": TILE_BYTES_READ,
    "leaf_tile_bytes": {k: sum(t[5] for t in tile_records(k)) for k in TREE if k != "bias"},
    "reference_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in REFERENCE.items()},
}), flush=True)
