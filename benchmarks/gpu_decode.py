"""GPU decode throughput: GB/s of decoded output for weight-like tiles at
several rates, beside a device-to-device copy of the same output size (the
memory-bandwidth ceiling), measured in the same run.

    python benchmarks/gpu_decode.py [--quick] [--platform gpu|cpu]

Target on an H200: at least 400 GB/s of float32 output. nvJPEG is reported
only if a Python binding for it is importable (none is bundled with JAX).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jaxjpeg
from jaxjpeg import codec, ops
from _timing import best_of


def nvjpeg_note() -> str:
    try:
        import nvidia.nvjpeg  # noqa: F401
    except ImportError:
        return "nvJPEG: no Python binding importable here; not measured"
    return "nvJPEG: binding found, but a batched grayscale comparison is not implemented"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--platform", default="gpu")
    args = parser.parse_args()
    device = jax.devices(args.platform)[0]
    rows = 1024 if args.quick else 4096
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, 4096)) * 0.02).astype(np.float32)
    repeats = 5 if args.quick else 20
    out_gb = x.nbytes / 1e9
    copy_src = jax.device_put(x, device)
    copy = jax.jit(lambda a: a + 0.0)
    copy(copy_src)
    copy_s = best_of(lambda: copy(copy_src), repeats)
    print(f"device: {device.device_kind}; output {x.nbytes / 2**20:.0f} MiB float32 per decode")
    print(f"device copy (read + write): {out_gb / copy_s:8.1f} GB/s of output")
    print(f"{'rate':>14} {'bits/w':>7} {'intervals':>9} {'decode GB/s':>12} {'vs copy':>8}")
    configs = [("step 2", {"quant_step": 2}), ("step 4", {"quant_step": 4}), ("step 8", {"quant_step": 8}),
               ("step 16", {"quant_step": 16}), ("quality 90", {"quality": 90})]
    # Parallelism is one thread per restart interval: sweep the interval length.
    configs += [(f"step 4 ri {ri}", {"quant_step": 4, "restart_interval": ri}) for ri in (2, 4, 16, 32)]
    for label, kwargs in configs:
        enc = jaxjpeg.encode_tensor(x, **kwargs)
        plan = codec.build_plan([enc], [np.float32])
        operands = jax.device_put(ops.plan_operands(plan), device)
        decode = ops.plan_decoder(plan.output_shapes, ("float32",), plan.output_shapes)
        status, _ = decode(*operands)
        ops.check_status(status)
        seconds = best_of(lambda: decode(*operands), repeats)
        print(f"{label:>14} {enc.bits_per_weight:>7.2f} {len(plan.interval_starts) - 1:>9} "
              f"{out_gb / seconds:>12.1f} {copy_s / seconds:>8.3f}")
    print(nvjpeg_note())


if __name__ == "__main__":
    main()
