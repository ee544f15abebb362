"""GPU decode throughput: GB/s of decoded float32 output on 1-4 GB of weights at
several rates and restart intervals, beside, in the same run,

* a device-to-device copy of the same output size (read + write: the ceiling
  a decoder that writes its output once cannot beat by much);
* nvJPEG (through nvImageCodec, ``nvidia-nvimgcodec-cu13``) decoding the very
  same 8-bit tiles to uint8 samples, when importable;
* nvCOMP (``nvidia-nvcomp-cu13``: ANS and Bitcomp) decompressing the same
  float32 weights (lossless), when importable.

    python benchmarks/gpu_decode.py [--quick] [--platform gpu|cpu] [--gb 1,4]
        [--repeats N] [--sweep-rows R] [--single]

Big outputs are made by repeating one encoded 256 MB matrix in one plan (each
copy is its own output tensor), so encoding stays cheap; the sweep over
restart intervals and rates repeats a smaller matrix (--sweep-rows rows of
4096, 64 MB by default) to the first size, so that each configuration costs
one small encode. --single decodes the default rate once, nothing else (for
a profiler: benchmarks/gpu_check.sh runs Nsight Compute on it). Target on an H200:
>= 400 GB/s of float32 output at the default rate. Timings are best of N,
blocked on the result; the competitors are synchronised with
cudaDeviceSynchronize.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxjpeg
from jaxjpeg import codec, ops
from _timing import best_of

BASE_ROWS, BASE_COLS = 16384, 4096  # 256 MB of float32


def _cudart():
    """libcudart from the CUDA wheels JAX installs (for a device-wide sync)."""
    import nvidia
    for root in nvidia.__path__:
        for lib in sorted(glob.glob(os.path.join(root, "**", "libcudart.so*"), recursive=True)):
            return ctypes.CDLL(lib)
    return ctypes.CDLL("libcudart.so")


def _timed_synced(fn, repeats, sync):
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def default_rate(x, **options):
    """``x`` coded as ``jaxjpeg.save`` codes a leaf by default (relative step)."""
    from jaxjpeg import checkpoint, rate
    p = rate.prepare_leaf(x)
    return rate.encode_at_step(p, checkpoint.DEFAULT_RELATIVE_STEP * rate.tensor_rms(p), **options)


def _plan_of(enc, copies):
    return codec.build_plan([enc] * copies, [np.float32] * copies)


def _decoder(plan, device):
    operands = jax.device_put(ops.plan_operands(plan), device)
    decode = ops.plan_decoder(plan.output_shapes, ("float32",) * len(plan.output_shapes),
                              plan.output_shapes)
    status, _ = decode(*operands)
    ops.check_status(status)
    return lambda: decode(*operands)


def _copy_gbps(nbytes, device, repeats):
    with jax.default_device(device):  # made on the device: no host copy of GBs
        src = jnp.zeros(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 0.0)
    copy(src)
    return nbytes / 1e9 / best_of(lambda: copy(src), repeats)


def nvjpeg_line(enc, device, repeats, sync):
    """nvJPEG decoding ``enc``'s tiles (8-bit: nvJPEG has no 12-bit decode)
    to uint8, beside jaxjpeg decoding the very same tiles to float32."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return "nvJPEG (nvImageCodec): not importable here, not measured"
    weights = int(np.prod(enc.shape))
    try:
        tiles = [t.data for t in enc.tiles]
        decoder = nvimgcodec.Decoder()
        gray = getattr(nvimgcodec.ColorSpec, "GRAY", None)
        params = nvimgcodec.DecodeParams(color_spec=gray) if gray is not None else None
        run = (lambda: decoder.decode(tiles, params=params)) if params else (lambda: decoder.decode(tiles))
        failed = sum(image is None for image in run())
        if failed:
            return f"nvJPEG (nvImageCodec): {failed} of {len(tiles)} tiles failed to decode, not timed"
        seconds = _timed_synced(run, repeats, sync)
        ours = best_of(_decoder(_plan_of(enc, 1), device), repeats)
        return (f"nvJPEG (nvImageCodec) same {len(tiles)} 8-bit tiles ({enc.bits_per_weight:.2f} bits/w) "
                f"-> uint8: {weights / seconds / 1e9:.2f} Gweights/s; jaxjpeg -> float32 "
                f"{weights / ours / 1e9:.2f} Gweights/s: {seconds / ours:.2f}x nvJPEG")
    except Exception as e:  # noqa: BLE001 - a competitor's failure is reported, not fatal
        return f"nvJPEG (nvImageCodec): failed: {type(e).__name__}: {e}"


def nvcomp_lines(x, ours_gbps, repeats, sync):
    """nvCOMP's lossless codecs on the same weights, their bytes as nvCOMP
    types (it has no float32): each round trip is checked before timing."""
    try:
        import cupy as cp
        from nvidia import nvcomp
    except ImportError:
        return ["nvCOMP: nvidia-nvcomp or cupy not importable here, not measured"]
    lines = []
    for algorithm, view in (("ANS", np.uint8), ("Bitcomp", np.uint32), ("Cascaded", np.uint32)):
        try:
            source = cp.asarray(x.view(view).reshape(-1))
            codec_ = nvcomp.Codec(algorithm=algorithm)
            compressed = codec_.encode(nvcomp.as_array(source))
            sync()
            ratio = x.nbytes / compressed.buffer_size
            restored = cp.asarray(codec_.decode(compressed)).view(view).reshape(-1)
            if not bool(cp.array_equal(restored, source)):
                lines.append(f"nvCOMP {algorithm}: round trip differs, not timed")
                continue
            seconds = _timed_synced(lambda: codec_.decode(compressed), repeats, sync)
            gbps = x.nbytes / seconds / 1e9
            lines.append(f"nvCOMP {algorithm} (lossless, as {np.dtype(view).name}) same weights: "
                         f"ratio {ratio:.2f}x, decompress {gbps:.1f} GB/s of float32; "
                         f"jaxjpeg / nvCOMP: {ours_gbps / gbps:.2f}x")
        except Exception as e:  # noqa: BLE001
            lines.append(f"nvCOMP {algorithm}: failed: {type(e).__name__}: {e}")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="64 MB base, 1 copy, few repeats")
    parser.add_argument("--platform", default="gpu")
    parser.add_argument("--gb", default="1,4", help="output sizes of the default-rate sweep")
    parser.add_argument("--repeats", type=int, default=None, help="best of N (10; --quick: 3)")
    parser.add_argument("--sweep-rows", type=int, default=BASE_ROWS // 4,
                        help="rows of the matrix of the restart-interval and rate sweep")
    parser.add_argument("--single", action="store_true",
                        help="one decode of the default rate at the first size, for a profiler")
    args = parser.parse_args()
    device = jax.devices(args.platform)[0]
    rows = BASE_ROWS // 4 if args.quick else BASE_ROWS
    repeats = args.repeats or (3 if args.quick else 10)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, BASE_COLS)) * 0.02).astype(np.float32)
    sizes = [1] if args.quick else [max(1, round(float(g) * 1e9 / x.nbytes)) for g in args.gb.split(",")]
    if args.single:  # the first size, decoded once, the status checked
        _decoder(_plan_of(default_rate(x), sizes[0]), device)
        print(f"decoded {sizes[0] * x.nbytes / 1e6:.0f} MB of float32 once on {device.device_kind}")
        return
    sync = _cudart().cudaDeviceSynchronize if args.platform == "gpu" else (lambda: None)
    print(f"device: {device.device_kind}; base matrix {x.nbytes / 1e6:.0f} MB float32")

    default = default_rate(x)
    print(f"{'config':>22} {'bits/w':>7} {'out GB':>7} {'intervals':>9} {'decode GB/s':>12} "
          f"{'copy GB/s':>10} {'vs copy':>8}")

    def row(label, enc, copies):
        plan = _plan_of(enc, copies)
        out_bytes = 4 * int(np.prod(enc.shape)) * copies
        seconds = best_of(_decoder(plan, device), repeats)
        copy = _copy_gbps(out_bytes, device, repeats)
        gbps = out_bytes / 1e9 / seconds
        print(f"{label:>22} {enc.bits_per_weight:>7.2f} {out_bytes / 1e9:>7.2f} "
              f"{len(plan.interval_starts) - 1:>9} {gbps:>12.1f} {copy:>10.1f} {gbps / copy:>8.3f}",
              flush=True)
        return gbps

    ours_gbps = [row("default rate", default, copies) for copies in sizes][0]
    small = x[:min(args.sweep_rows, rows)]
    small_copies = max(1, round(sizes[0] * x.nbytes / small.nbytes))
    for ri in (1, 2, 4, 8, 16):
        row(f"default, restart {ri}", default_rate(small, restart_interval=ri), small_copies)
    for step in (2, 8):
        row(f"quant step {step}", jaxjpeg.encode_tensor(small, quant_step=step), small_copies)
    row("12-bit, step 4", jaxjpeg.encode_tensor(small, bits=12, quant_step=4), small_copies)

    if args.platform == "gpu":
        eight_bit = jaxjpeg.encode_tensor(x, bits=8, quant_step=4)
        print(nvjpeg_line(eight_bit, device, repeats, sync), flush=True)
        for line in nvcomp_lines(x, ours_gbps, repeats, sync):
            print(line, flush=True)


if __name__ == "__main__":
    main()
