"""Competitor weight quantizers that jaxjpeg's fidelity is measured against.

Every quantizer is a function ``(w: np.ndarray) -> (w_hat, bits_used)``: ``w_hat`` is the
float32 reconstruction with ``w``'s shape and ``bits_used`` counts everything that would be
stored (codes, scales, zero points, headers) in its natural storage dtype.

Layout convention: a tensor is viewed as 2-D ``(prod(shape[:-1]), shape[-1])``, i.e.
(in, out) as in Flax Dense kernels (conv kernels ``(kh, kw, in, out)`` fold their spatial
axes into the input dimension). An *output channel* is a column of that view; *groups*
run along the input dimension (down a column).

Baselines:

* ``int8_per_channel``: symmetric int8, one float32 scale per output channel.
* ``int4_group(w, group)``: asymmetric 4-bit round-to-nearest with a float16 scale and a
  float16 minimum per group of ``group`` input rows (as common 4-bit LLM weight formats).
* ``naive_jpeg(w, quality)``: the recipe of "Compressing DNN Parameters for Model Loading
  Time Reduction" (2019): the tensor's global min/max mapped to 0..255, coded as 8-bit
  grayscale JPEG with the standard luminance table at ``quality`` (Pillow / libjpeg-turbo,
  standard Huffman tables), images at most 65500 pixels per side (libjpeg's
  JPEG_MAX_DIMENSION, a little under the format's 65535).

``apply_to_tree`` runs a quantizer over a params pytree and totals the bits.
"""

from __future__ import annotations

import io
from functools import partial
from typing import Callable

import jax
import numpy as np
from PIL import Image

Quantizer = Callable[[np.ndarray], "tuple[np.ndarray, int]"]

JPEG_MAX_SIDE = 65500
FLOAT16_MAX = float(np.finfo(np.float16).max)


def as_matrix(w: np.ndarray) -> np.ndarray:
    """View ``w`` as 2-D float32 (prod(shape[:-1]), shape[-1]); a scalar becomes (1, 1)."""
    w = np.asarray(w, np.float32)
    return w.reshape(-1, w.shape[-1] if w.ndim else 1)


# ----------------------------------------------------------------------------
# int8 per output channel
# ----------------------------------------------------------------------------

def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, int]:
    """Symmetric int8 with one float32 scale per output channel: scale = max|w| / 127.

    Codes lie in [-127, 127]; every error is at most scale / 2.
    Bits: 8 per weight + 32 per output channel.
    """
    m = as_matrix(w)
    scale = channel_scales(m)
    codes = np.clip(np.rint(m / scale), -127, 127).astype(np.int8)
    w_hat = codes.astype(np.float32) * scale
    bits = 8 * codes.size + 32 * scale.size
    return w_hat.reshape(np.shape(w)), bits


def channel_scales(m: np.ndarray) -> np.ndarray:
    """Return the (1, out) float32 int8 scales of a 2-D matrix (1.0 for all-zero columns)."""
    peak = np.abs(m).max(axis=0, keepdims=True)
    return np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------
# int4 with groups
# ----------------------------------------------------------------------------

def int4_group(w: np.ndarray, group: int = 128) -> tuple[np.ndarray, int]:
    """Asymmetric 4-bit round-to-nearest per group of ``group`` consecutive input rows.

    Each group stores a float16 minimum (rounded down) and a float16 scale (rounded up so
    that min + 15 * scale >= max); codes are round((w - min) / scale) in 0..15, so every
    error is at most scale / 2. A last partial group gets its own min and scale.
    Bits: 4 per weight + 32 (two float16) per group per output channel.
    Assumes |w| < 65504 (float16 range).
    """
    m = as_matrix(w)
    rows, cols = m.shape
    groups = -(-rows // group)
    padded = np.pad(m, ((0, groups * group - rows), (0, 0)), mode="edge")
    blocks = padded.reshape(groups, group, cols)
    low, scale = group_min_scale(blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True))
    codes = np.clip(np.rint((blocks - low) / scale), 0, 15)
    w_hat = (codes * scale + low).reshape(groups * group, cols)[:rows]
    bits = 4 * m.size + 32 * groups * cols
    return w_hat.astype(np.float32).reshape(np.shape(w)), bits


def group_min_scale(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return float16-representable (min, scale) covering [low, high] with 16 levels, as float32."""
    low16 = float16_down(low)
    scale16 = float16_up((high - low16) / 15.0)
    scale16 = np.where(scale16 > 0, scale16, np.float32(1.0))
    return low16.astype(np.float32), scale16.astype(np.float32)


def float16_down(x: np.ndarray) -> np.ndarray:
    """Round float32 values down to float16-representable values."""
    x = np.asarray(x, np.float32)
    h = x.astype(np.float16)
    too_big = h.astype(np.float32) > x
    return np.where(too_big, np.nextafter(h, np.float16(-np.inf)), h)


def float16_up(x: np.ndarray) -> np.ndarray:
    """Round float32 values up to float16-representable values."""
    x = np.asarray(x, np.float32)
    h = x.astype(np.float16)
    too_small = h.astype(np.float32) < x
    return np.where(too_small, np.nextafter(h, np.float16(np.inf)), h)


int4_g32 = partial(int4_group, group=32)
int4_g128 = partial(int4_group, group=128)


# ----------------------------------------------------------------------------
# Naive JPEG (2019 paper recipe)
# ----------------------------------------------------------------------------

def naive_jpeg(w: np.ndarray, quality: int = 75) -> tuple[np.ndarray, int]:
    """Global min/max to uint8, grayscale JPEG at ``quality``, decode, map back.

    The 2-D view is cut into images of at most 65500 x 65500 pixels.
    Bits: 8 * total JPEG file bytes (headers included) + 64 for the float32 min and max.
    """
    m = as_matrix(w)
    low, high = np.float32(m.min()), np.float32(m.max())
    step = (high - low) / np.float32(255) if high > low else np.float32(1)
    samples = np.clip(np.rint((m - low) / step), 0, 255).astype(np.uint8)
    decoded = np.empty_like(samples)
    total_bytes = 0
    for rows, cols in tile_slices(samples.shape):
        data = jpeg_encode(samples[rows, cols], quality)
        decoded[rows, cols] = jpeg_decode(data)
        total_bytes += len(data)
    w_hat = decoded.astype(np.float32) * step + low
    return w_hat.reshape(np.shape(w)), 8 * total_bytes + 64


def tile_slices(shape: tuple[int, int], side: int = JPEG_MAX_SIDE):
    """Yield (row slice, column slice) pairs covering ``shape`` with tiles of at most ``side``."""
    for r in range(0, shape[0], side):
        for c in range(0, shape[1], side):
            yield slice(r, r + side), slice(c, c + side)


def jpeg_encode(image: np.ndarray, quality: int) -> bytes:
    """Encode a 2-D uint8 array as baseline grayscale JPEG with Pillow's standard tables."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_decode(data: bytes) -> np.ndarray:
    """Decode a grayscale JPEG to a 2-D uint8 array."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def naive_jpeg_at(quality: int) -> Quantizer:
    """Return the naive JPEG quantizer at a fixed ``quality``."""
    return partial(naive_jpeg, quality=quality)


# ----------------------------------------------------------------------------
# Whole pytrees
# ----------------------------------------------------------------------------

def default_policy(path, leaf) -> bool:
    """Quantize float leaves with ndim >= 2 and at least 4096 elements."""
    leaf = np.asarray(leaf)
    return np.issubdtype(leaf.dtype, np.floating) and leaf.ndim >= 2 and leaf.size >= 4096


def apply_to_tree(params, quantizer: Quantizer, policy=default_policy):
    """Quantize every leaf of ``params`` that ``policy(path, leaf)`` selects.

    Returns (new_params, total_bits, total_weights). Leaves left alone are returned as
    float32 (floating leaves) or unchanged and counted at 32 bits (floats) or their
    itemsize (other dtypes) per element; bits / weights is the all-in bits per weight.
    """
    totals = {"bits": 0, "weights": 0}

    def visit(path, leaf):
        leaf = np.asarray(leaf)
        totals["weights"] += leaf.size
        if policy(path, leaf):
            w_hat, bits = quantizer(leaf.astype(np.float32))
            totals["bits"] += int(bits)
            return w_hat
        if np.issubdtype(leaf.dtype, np.floating):
            totals["bits"] += 32 * leaf.size
            return leaf.astype(np.float32)
        totals["bits"] += 8 * leaf.nbytes
        return leaf

    new_params = jax.tree_util.tree_map_with_path(visit, params)
    return new_params, totals["bits"], totals["weights"]


QUANTIZERS: dict[str, Quantizer] = {
    "int8": int8_per_channel,
    "int4-g32": int4_g32,
    "int4-g128": int4_g128,
    "naive-jpeg-q50": naive_jpeg_at(50),
    "naive-jpeg-q75": naive_jpeg_at(75),
    "naive-jpeg-q90": naive_jpeg_at(90),
}
