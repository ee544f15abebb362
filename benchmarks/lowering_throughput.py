"""CPU: the decode custom call (XLA's thread pool) against the raw codec core
(jaxjpeg._native.run_plan, its own threads) on the same plan, all cores.

    python benchmarks/lowering_throughput.py [--quick]

Target: the lowering within 10% of the raw core.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jaxjpeg
from jaxjpeg import codec, ops
from _timing import best_of


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = 1024 if args.quick else 4096
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, 4096)) * 0.02).astype(np.float32)
    repeats = 3 if args.quick else 7
    print(f"{rows}x4096 float32 output ({x.nbytes / 2**20:.0f} MiB), best of {repeats}")
    print(f"{'step':>5} {'bits/w':>7} {'core Msamp/s':>13} {'lowering Msamp/s':>17} {'ratio':>6}")
    for step in (2, 4, 8, 16):
        enc = jaxjpeg.encode_tensor(x, quant_step=step)
        plan = codec.build_plan([enc], [np.float32])
        operands = jax.device_put(ops.plan_operands(plan))
        decode = ops.plan_decoder(plan.output_shapes, ("float32",), plan.output_shapes)
        decode(*operands)  # compile
        core = best_of(lambda: codec.run_plan(plan), repeats)
        lowering = best_of(lambda: decode(*operands), repeats)
        msamp = x.size / 1e6
        print(f"{step:>5} {enc.bits_per_weight:>7.2f} {msamp / core:>13.1f} "
              f"{msamp / lowering:>17.1f} {core / lowering:>6.2f}")


if __name__ == "__main__":
    main()
