"""Train a small Flax CNN on scikit-learn's bundled digits, save it as a
jaxjpeg checkpoint, restore it under jit and compare test accuracy.

    python examples/digits_checkpoint.py [--ratio 8 | --relative-step 0.28 | --error-bound 0.05]

Everything is bundled: no downloads. Runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

import jaxjpeg
from models import digits_accuracy, digits_data, train_digits_cnn


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--relative-step", type=float,
                      help="quantization step as a fraction of each tensor's RMS")
    rate.add_argument("--ratio", type=float,
                      help="target compression ratio for the whole file (default 8)")
    rate.add_argument("--error-bound", type=float, help="relative RMS error bound per leaf")
    parser.add_argument("--out", help="checkpoint path (default: a temporary file)")
    return parser.parse_args()


def rate_options(args) -> dict:
    """The rate control given (0 included: save refuses it), else 8x."""
    if args.relative_step is not None:
        return {"relative_step": args.relative_step}
    if args.error_bound is not None:
        return {"error_bound": args.error_bound}
    return {"target_ratio": 8.0 if args.ratio is None else args.ratio}


def main():
    args = parse_args()
    _, _, x_test, y_test = digits_data(seed=0)
    start = time.perf_counter()
    model, params = train_digits_cnn(seed=0)
    print(f"trained DigitsCNN in {time.perf_counter() - start:.1f} s")
    before = digits_accuracy(model, params, x_test, y_test)

    path = args.out or os.path.join(tempfile.mkdtemp(), "digits.jjpg")
    report = jaxjpeg.save(path, params, **rate_options(args))
    raw = report.raw_bytes
    print(f"saved {path}: {report.file_bytes:,} bytes for {raw:,} bytes of parameters "
          f"({report.ratio_vs_float32:.2f}x vs float32, {8 * report.file_bytes / (raw / 4):.2f} bits/weight all-in)")

    # Restore inside a jit-compiled load function: the compressed bytes go to
    # the device and the custom call decodes them there.
    compressed = jaxjpeg.load(path)
    load_fn = jax.jit(jaxjpeg.decode)
    start = time.perf_counter()
    restored = jax.block_until_ready(load_fn(compressed))
    print(f"restored under jit in {1e3 * (time.perf_counter() - start):.1f} ms "
          f"(compile included) on {jax.devices()[0].platform}")

    after = digits_accuracy(model, restored, x_test, y_test)
    errors = [np.linalg.norm(np.asarray(b) - np.asarray(a)) / max(np.linalg.norm(np.asarray(a)), 1e-30)
              for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored))]
    print(f"test accuracy: float32 {100 * before:.2f}%  jaxjpeg {100 * after:.2f}%  "
          f"(change {100 * (after - before):+.2f} points; worst leaf relative RMS error "
          f"{max(errors):.4f})")
    for leaf in report.leaves:
        print(f"  {leaf.path:32s} {str(leaf.shape):18s} {leaf.kind:4s} "
              f"{leaf.raw_bytes:>8,} -> {leaf.stored_bytes:>8,} bytes")


if __name__ == "__main__":
    main()
