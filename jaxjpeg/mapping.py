"""Mapping weights to JPEG samples and back.

Each row of a tensor's 2-D view gets an affine map ``w = s * scale + offset``
from samples ``s`` in ``[0, 2^bits - 1]``. The decoder applies it fused with
the inverse DCT, so the map costs 8 bytes per row and no extra pass.

The encoder receives continuous (unrounded) samples, so the only rounding of
samples happens in the decoder; what remains to choose is the range each row
is stretched over. Outliers stretch it and scale the coding noise of every
weight; clipping them trades that noise for their own clipping error.
``clip="mse"`` picks, per row, the range minimising the sum of both.
"""

from __future__ import annotations

import numpy as np

# Fractions of the distance from the row mean to its min / max to try.
CLIP_CANDIDATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def sample_max(bits: int) -> int:
    return (1 << bits) - 1


def row_affine(view: np.ndarray, bits: int, *, clip: str = "mse", step: float = 1.0):
    """Maps a float32 [rows, cols] view to samples.

    Returns ``(samples, scale, offset)``: continuous float32 samples clipped to
    ``[0, 2^bits - 1]`` and the float32 per-row affine map back to weights.
    ``step`` is the average quantization step in sample units, used by
    ``clip="mse"`` to predict the coding noise.
    """
    lo = view.min(axis=1).astype(np.float64)
    hi = view.max(axis=1).astype(np.float64)
    if clip == "mse":
        lo, hi = _mse_range(view, lo, hi, bits, step)
    elif clip != "minmax":
        raise ValueError(f"clip must be 'mse' or 'minmax', got {clip!r}")
    top = sample_max(bits)
    scale = ((hi - lo) / top).astype(np.float32)
    offset = lo.astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1))
    samples = (view - offset[:, None]) / divisor[:, None]
    np.clip(samples, 0, top, out=samples)
    return samples.astype(np.float32, copy=False), scale, offset


def _mse_range(view, lo, hi, bits, step):
    """Per-row clip range minimising clipping error plus predicted noise."""
    top = sample_max(bits)
    center = view.mean(axis=1, dtype=np.float64)
    # Coefficient quantization with a flat step Δ adds Δ²/12 per sample (the
    # DCT is orthonormal); the decoder's rounding to integers adds 1/12.
    noise_per_unit = (step * step + 1.0) / 12.0
    best_err = np.full(view.shape[0], np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    for ratio in CLIP_CANDIDATES:
        c_lo = center - ratio * (center - lo)
        c_hi = center + ratio * (hi - center)
        clipped = np.clip(view, c_lo[:, None], c_hi[:, None])
        clip_err = np.mean(np.square(clipped - view, dtype=np.float64), axis=1)
        noise = np.square((c_hi - c_lo) / top) * noise_per_unit
        err = clip_err + noise
        better = err < best_err
        best_err[better] = err[better]
        best_lo[better], best_hi[better] = c_lo[better], c_hi[better]
    return best_lo, best_hi
