"""Tiles cut along shards: bytes each device reads in a sharded restore, and the
file size, with the tile geometry jaxjpeg now chooses against the uniform
512 x 512 grid it used before (measured in the same run, same data, same rate).

Leaves are Gaussian float32, saved at the default rate from a ``jax.Array``
placed with the sharding shown (and from numpy, where no sharding is known),
then restored with that sharding on host CPU devices. "max/dev" is the largest
share of the leaf's tile bytes one device read (1/ways is the ideal). Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/shard_tiles.py
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxjpeg  # noqa: E402
from jaxjpeg import checkpoint as ck, checkpoint_reader as ckr, codec, rate  # noqa: E402

CASES = [  # shape, mesh shape, mesh axis names, partition spec, view
    ((4, 1024, 512), (4,), ("x",), P(None, None, "x"), "framework"),
    ((4, 1024, 512), (4,), ("x",), P(None, None, "x"), "auto"),
    ((4, 1024, 512), (4,), ("x",), P("x"), "auto"),
    ((4, 1024, 512), (8,), ("x",), P(None, None, "x"), "framework"),
    ((1024, 768), (8,), ("x",), P("x"), "auto"),
    ((768, 1536), (2, 4), ("a", "b"), P("a", "b"), "auto"),
    ((768, 3072), (8,), ("x",), P(None, "x"), "auto"),
    ((4096, 4096), (2, 4), ("a", "b"), P("a", "b"), "auto"),
]


def uniform_grid(view):
    """The default coding on the uniform grid (what save did before): the same
    view choice without shards, the same step, tiles from tile_grid alone."""
    return lambda name, array: _uniform(rate.prepare_leaf(array, view=view))


def _uniform(p):
    return rate.encode_at_step(p, ck.DEFAULT_RELATIVE_STEP * rate.tensor_rms(p),
                               restart_interval=codec.DEFAULT_RESTART_INTERVAL,
                               tile_shape=codec.DEFAULT_TILE_SHAPE, clip="common")


def measure(path, leaf, sharding, view, encoder=None):
    """(file bytes, tiles, largest share of tile bytes one device read)."""
    report = jaxjpeg.save(path, {"w": leaf}, view=view, encoder=encoder)
    stats = jaxjpeg.RestoreStats()
    target = {"w": jax.ShapeDtypeStruct(leaf.shape, np.float32, sharding=sharding)}
    jaxjpeg.restore(path, target=target, stats=stats)
    with ckr.Checkpoint(path) as c:
        (saved,) = c.leaves
        total = sum(c.tile_size(saved, k) for k in range(len(saved.tiles)))
    return report.file_bytes, len(saved.tiles), max(stats.payload_bytes_per_device.values()) / total


def main():
    rng = np.random.default_rng(0)
    devices = jax.devices()
    print(f"{'shape':>15} {'sharding':>24} {'view':>9} {'source':>6} | {'uniform grid':>26} | "
          f"{'now':>26} | size")
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "leaf.jjpg")
        for shape, mesh_shape, names, spec, view in CASES:
            mesh = jax.sharding.Mesh(np.array(devices[:int(np.prod(mesh_shape))])
                                     .reshape(mesh_shape), names)
            sharding = NamedSharding(mesh, spec)
            x = rng.normal(size=shape).astype(np.float32)
            for source, leaf in (("jax", jax.device_put(x, sharding)), ("numpy", x)):
                before = measure(path, leaf, sharding, view, uniform_grid(view))
                after = measure(path, leaf, sharding, view)
                cells = [f"{b:>9,d} B {t:>3} tiles {f:5.3f}" for b, t, f in (before, after)]
                print(f"{str(shape):>15} {str(spec) + ' ' + str(mesh_shape):>24} {view:>9} "
                      f"{source:>6} | "
                      f"{cells[0]} | {cells[1]} | {100 * (after[0] / before[0] - 1):+.2f}%")


if __name__ == "__main__":
    main()
