"""Encode throughput: jaxjpeg vs libjpeg-turbo on the same weight-like data, per core.

One Gaussian float32 matrix (64 MB by default) per configuration, coded on one thread:

* ``jaxjpeg full``   -- ``jaxjpeg.encode_tensor(..., threads=1)``: the per-row weight->sample
  mapping (``jaxjpeg.mapping.row_affine``, including the MSE clip search), tiling, the native
  encoder (forward DCT, quantization, optimized Huffman tables, restart markers) and indexing;
* ``jaxjpeg mapping`` -- ``mapping.row_affine`` alone, with ``encode_tensor``'s default clip;
* ``jaxjpeg native`` -- ``jaxjpeg._native.encode`` per tile on the already-mapped float samples
  (rate-distortion optimized rounding, as encode_tensor always codes);
* ``native no RDO`` -- the same with plain rounding (``rdo=False``);
* ``turbo Pillow``   -- libjpeg-turbo via Pillow on the same samples rounded to uint8, same
  quantization table, same restart interval, optimized Huffman tables (as jaxjpeg);
* ``turbo imagecodecs`` -- ``imagecodecs.jpeg8_encode`` (standard tables at the quality, default
  Huffman tables, no restart markers; quality configurations only).

Figures are MB/s of float32 input (4 bytes per weight) on one core and Msamples/s, best of N.
For libjpeg-turbo, whose input is uint8, the same number of weights is counted, so the columns
compare weights coded per second. Usage::

    python benchmarks/encode_throughput.py            # ~64 MB per configuration
    python benchmarks/encode_throughput.py --quick    # a short smoke run
"""

from __future__ import annotations

import argparse
import inspect
import io
import time

import numpy as np

import jaxjpeg
from jaxjpeg import _native, codec, mapping

try:
    import imagecodecs
except ImportError:  # pragma: no cover
    imagecodecs = None
try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

CONFIGS = {"q50": dict(quality=50), "q75": dict(quality=75), "q90": dict(quality=90),
           "q95": dict(quality=95), "step2": dict(quant_step=2), "step4": dict(quant_step=4),
           "step8": dict(quant_step=8), "q90/12bit": dict(quality=90, bits=12)}
DEFAULT_CONFIGS = "q50,q90,q95,step2,step8,q90/12bit"


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--mb", type=float, default=64.0, help="float32 MB per configuration")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cols", type=int, default=4096)
    args = p.parse_args()
    mb, repeats = (4.0, 1) if args.quick else (args.mb, args.repeats)
    cols = args.cols
    rows = max(8, int(mb * 2**20 / 4 / cols) // 8 * 8)
    n = rows * cols
    rst = codec.DEFAULT_RESTART_INTERVAL
    tile_shape = codec.DEFAULT_TILE_SHAPE
    clip = inspect.signature(jaxjpeg.encode_tensor).parameters["clip"].default
    print(f"encode throughput on ONE core, best of {repeats}: {rows}x{cols} float32 Gaussian "
          f"({n * 4 / 2**20:.0f} MB); tiles {tile_shape[0]}x{tile_shape[1]}, restart interval "
          f"{rst} blocks; mapping clip={clip!r}")
    cols_order = ["jaxjpeg full", "jaxjpeg mapping", "jaxjpeg native", "native no RDO",
                  "turbo Pillow", "turbo imagecodecs"]
    head = f"{'config':<12}{'bits/w':>7}  " + "".join(f"{c:>19}" for c in cols_order) + \
        f"{'native/turbo':>14}"
    print(head + "\n" + " " * 21 + "".join(f"{'MB/s (Msmp/s)':>19}" for _ in cols_order))
    print("-" * len(head))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    for name in args.configs.split(","):
        kw = dict(CONFIGS[name])
        bits = kw.pop("bits", 8)
        table = codec.quant_table(bits=bits, **kw)
        r = {}
        enc = None

        def full():
            nonlocal enc
            enc = jaxjpeg.encode_tensor(w, bits=bits, threads=1, **kw)
        r["jaxjpeg full"] = best_of(full, repeats)
        r["jaxjpeg mapping"] = best_of(
            lambda: mapping.row_affine(w, bits, clip=clip, step=float(table.mean())), repeats)
        samples = mapping.row_affine(w, bits, clip=clip, step=float(table.mean()))[0]
        cells = codec.tile_grid(rows, cols, tile_shape)
        views = [np.ascontiguousarray(samples[r0:r0 + h, c0:c0 + wd]) for r0, c0, h, wd in cells]
        r["jaxjpeg native"] = best_of(
            lambda: [_native.encode(v, table, bits=bits, restart_interval=rst) for v in views],
            repeats)
        r["native no RDO"] = best_of(
            lambda: [_native.encode(v, table, bits=bits, restart_interval=rst, rdo=False)
                     for v in views], repeats)
        if bits == 8:
            u8 = [np.clip(np.rint(v), 0, 255).astype(np.uint8) for v in views]
            if Image is not None:
                # Pillow's qtables are in natural order like ours.
                qt = [table.astype(int).tolist()]

                def pil():
                    for v in u8:
                        Image.fromarray(v, "L").save(io.BytesIO(), "JPEG", qtables=qt,
                                                     optimize=True, restart_marker_blocks=rst)
                r["turbo Pillow"] = best_of(pil, repeats)
            if imagecodecs is not None and "quality" in kw:
                r["turbo imagecodecs"] = best_of(
                    lambda: [imagecodecs.jpeg8_encode(v, level=kw["quality"]) for v in u8], repeats)
        cells_txt = "".join(
            f"{n * 4 / r[c] / 2**20:>10.1f} ({n / r[c] / 1e6:>5.1f})" if c in r else f"{'-':>19}"
            for c in cols_order)
        ratio = (f"{r['turbo Pillow'] / r['jaxjpeg native']:>13.2f}x"
                 if "turbo Pillow" in r else f"{'-':>14}")
        print(f"{name:<12}{enc.bits_per_weight:>7.3f}  {cells_txt}{ratio}")
    print("\nnative/turbo: jaxjpeg native encoder speed / libjpeg-turbo (Pillow, same table, "
          "optimized Huffman, same restart interval); > 1 means jaxjpeg is faster")


if __name__ == "__main__":
    main()
