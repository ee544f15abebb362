"""Leaves stored exactly: file size, save and restore time against numpy's own files.

    python benchmarks/exact_leaves.py [--mb 32] [--repeats 3]

One leaf per file, each of the kinds a checkpoint keeps bit for bit
(quantized weights' int8 codes, 4-bit codes held in int8, bfloat16 and
float32 weights under ``Policy(lossless=...)``, a uint8 image-like buffer, a
0/1 mask), saved with jaxjpeg and, in the same run, with ``numpy.save``
(raw) and ``numpy.savez_compressed`` (zip's deflate, the usual lossless
competitor). Restore is to host memory (numpy arrays) from the page cache:
jaxjpeg inflates a large leaf's plane pieces at once on every core
(docs/format.md, `pieces`), numpy's zip one stream on one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jaxjpeg  # noqa: E402
from _timing import best_of  # noqa: E402


def _leaves(nbytes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "int8 codes, N(0, 25)": np.clip(np.round(rng.normal(0, 25, nbytes)), -127, 127)
                                .astype(np.int8),
        "4-bit codes in int8": rng.integers(-8, 8, nbytes).astype(np.int8),
        "bfloat16 weights": rng.normal(0, 0.02, nbytes // 2).astype(ml_dtypes.bfloat16),
        "float32 weights": rng.normal(0, 0.02, nbytes // 4).astype(np.float32),
        "uint8 random walk": (np.cumsum(rng.integers(-2, 3, nbytes)) % 256).astype(np.uint8),
        "0/1 mask, int32": (rng.random(nbytes // 4) < 0.1).astype(np.int32),
    }


def _as_numpy_can_save(values: np.ndarray) -> np.ndarray:
    """bfloat16 as its bits: numpy's files hold no ml_dtypes."""
    return values.view(np.uint16) if values.dtype == ml_dtypes.bfloat16 else values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=32, help="size of each leaf in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, "
          f"leaves of {args.mb} MiB, best of {args.repeats}")
    print(f"{'leaf':22} {'jaxjpeg':>8} {'npz':>6} {'save s':>7} {'npz s':>6} {'restore s':>9} "
          f"{'npz s':>6} {'npy s':>6} {'restore vs npz':>14}")
    policy = jaxjpeg.Policy(lossless=("*",))
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in _leaves(args.mb << 20).items():
            ours, npz, npy = (os.path.join(tmp, f) for f in ("l.jjpg", "l.npz", "l.npy"))
            plain = _as_numpy_can_save(values)
            save = best_of(lambda: jaxjpeg.save(ours, {"x": values}, policy=policy,
                                                progress=False) and None, args.repeats)
            save_npz = best_of(lambda: np.savez_compressed(npz, x=plain), args.repeats)
            np.save(npy, plain)
            restore = best_of(lambda: jaxjpeg.restore(ours)["x"], args.repeats)
            restore_npz = best_of(lambda: np.load(npz)["x"], args.repeats)
            restore_npy = best_of(lambda: np.load(npy), args.repeats)
            back = np.asarray(jaxjpeg.restore(ours)["x"])
            assert np.array_equal(back.view(np.uint8), values.view(np.uint8)), name
            share, share_npz = (os.path.getsize(p) / values.nbytes for p in (ours, npz))
            print(f"{name:22} {share:8.3f} {share_npz:6.3f} {save:7.3f} {save_npz:6.3f} "
                  f"{restore:9.3f} {restore_npz:6.3f} {restore_npy:6.3f} "
                  f"{restore_npz / restore:13.2f}x")


if __name__ == "__main__":
    main()
