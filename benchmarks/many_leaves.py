"""Save and open time against the number of leaves and the length of a path.

    python benchmarks/many_leaves.py [--counts 2000 20000] [--repeats 3]

Trees of N small lossless leaves (``layer{i}/bias``, 8 float32 each): the
time of jaxjpeg.save, of opening the file (Checkpoint: every record, blob and
path checked) and of restore. Linear costs give a 20k/2k ratio near 10;
issue 9 measured 21 s to save 20k leaves before the path checks became
linear. Opening is also timed with Python's garbage collector off: its full
collections scan every live object (jax's included) and start only past a
threshold of allocations, so with it on the cost per leaf rises from 2k to
20k leaves and levels off beyond (not a quadratic term of jaxjpeg's). Then a hostile file whose one leaf has a 32,000-key path (384 KB):
the time to refuse it (27 s and 4 GB before).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jaxjpeg  # noqa: E402
from jaxjpeg import checkpoint_reader, format as fmt  # noqa: E402
from _timing import best_of  # noqa: E402


def _tree(n: int) -> dict:
    return {f"layer{i}": {"bias": np.full(8, i, np.float32)} for i in range(n)}


def _deep_path_file(path: str, keys: int) -> None:
    leaf = {"path": [["key", "k"]] * keys, "shape": [], "dtype": "int8", "kind": "raw"}
    with fmt.ContainerWriter(path) as w:
        w.add_blob("leaf0/raw", b"\x01")
        w.set_metadata({"format": "jaxjpeg-checkpoint", "version": 1, "leaves": [leaf]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}")
    print(f"{'leaves':>8} {'save s':>8} {'open s':>8} {'open, no GC':>12} {'restore s':>10} "
          f"{'file MB':>8}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            tree, path = _tree(n), os.path.join(tmp, f"t{n}.jjpg")
            save = best_of(lambda: jaxjpeg.save(path, tree, progress=False) and None, args.repeats)

            def open_file():
                with checkpoint_reader.Checkpoint(path) as c:
                    assert len(c.leaves) == n
            opened = best_of(open_file, args.repeats)
            gc.disable()
            try:
                opened_no_gc = best_of(open_file, args.repeats)
            finally:
                gc.enable()
            restored = best_of(lambda: jaxjpeg.restore(path), args.repeats)
            rows[n] = (save, opened, opened_no_gc, restored)
            print(f"{n:>8} {save:>8.2f} {opened:>8.3f} {opened_no_gc:>12.3f} {restored:>10.2f} "
                  f"{os.path.getsize(path) / 1e6:>8.2f}")
        if len(args.counts) >= 2:
            lo, hi = min(args.counts), max(args.counts)
            ratios = [b / a for a, b in zip(rows[lo], rows[hi])]
            print(f"{hi}/{lo} leaves = {hi / lo:.0f}x: save {ratios[0]:.1f}x, open "
                  f"{ratios[1]:.1f}x ({ratios[2]:.1f}x without GC), restore {ratios[3]:.1f}x")
        deep = os.path.join(tmp, "deep.jjpg")
        _deep_path_file(deep, 32000)
        t0 = time.perf_counter()
        try:
            checkpoint_reader.Checkpoint(deep)
            outcome = "opened (!)"
        except jaxjpeg.FormatError as e:
            outcome = f"refused: {str(e).split(': ', 1)[1]}"
        print(f"one 32,000-key path ({os.path.getsize(deep) / 1e3:.0f} KB): "
              f"{time.perf_counter() - t0:.3f} s, {outcome}")


if __name__ == "__main__":
    main()
