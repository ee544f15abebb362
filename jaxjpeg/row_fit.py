"""Row maps fitted to the samples a coding decodes to.

A row's map (``w = s * scale + offset``) is chosen before coding, from the
weights alone. Coding then adds noise to the samples, and a block's noise
reaches all 64 of them: a row far quieter than the rows it shares blocks
with (one scale for every row, :func:`jaxjpeg.mapping.common_scale`)
restored at up to 400 times its own RMS, worse than its mean alone. Once a
tile is coded the encoder knows what its samples decode to
(``_native.encode_mapped_with_row_sums``); the map that restores such a row
best is the least-squares fit of its weights on those samples, which
restores it no worse than its mean. The decoders are unchanged: only the
maps' numbers move.

Only rows that may come back worse than their mean are fitted: their spread
in samples is below what a coding at the table's coarsest step can add
(:func:`candidates`), and their coding did (:func:`refitted`). Other rows
keep the maps the rate control chose, so its predictions hold.
"""

from __future__ import annotations

import numpy as np

# _native.encode_mapped_with_row_sums' columns
COUNT, SUM_S, SUM_W, SUM_SS, SUM_SW, SUM_WW = range(6)
WEIGHT_SUMS = [SUM_W, SUM_SW]   # linear in the weights (SUM_WW: squared)
# A row is refitted where its coding's squared error exceeds this many times
# its spread (its squared deviation from its mean): restored at twice its
# RMS, the coding has left little of it. Below, the least-squares gain
# (shrinking a row towards its mean) cost more than it saved: PP-OCRv6's
# recognizer at 10x, 3,800 of its classifier's rows at 1-3 times their
# spread refitted, read no line of 24 exactly (8 before).
LOST = 4.0
# How much above its mean's error a refitted map may restore a row (float16
# rounding of the map).
FIT_TOLERANCE = 1 + 1 / 64


def candidates(row_variance: np.ndarray, scale: np.ndarray, coarsest_step: float) -> np.ndarray:
    """Rows a coding may lose (restore at more than twice their RMS about
    their mean): a row's coding noise stays within about half the coarsest
    step (sample units) a sample, plus the decoder's rounding (an RMS of
    at most 1.04 steps measured over flat tables of 8 and 12 bits, rows
    spread over decades and loud columns), so a row whose RMS about its
    mean reaches a step and a sample is not one; nor is a constant row
    (scale 0, restored exactly)."""
    limit = coarsest_step + 1.0
    spread = np.sqrt(np.maximum(row_variance, 0.0))
    return (scale > 0) & (spread < limit * scale.astype(np.float64))


def _errors(sums: np.ndarray, slope, offset) -> np.ndarray:
    """Σ (w - (s * slope + offset))² per row, from the sums (centered forms:
    a row's mean can dwarf its spread)."""
    n = np.maximum(sums[:, COUNT], 1.0)
    mean_s, mean_w = sums[:, SUM_S] / n, sums[:, SUM_W] / n
    var_s = np.maximum(sums[:, SUM_SS] - n * mean_s * mean_s, 0.0)
    cov = sums[:, SUM_SW] - n * mean_s * mean_w
    spread = np.maximum(sums[:, SUM_WW] - n * mean_w * mean_w, 0.0)
    slope = np.asarray(slope, np.float64)
    bias = mean_w - slope * mean_s - np.asarray(offset, np.float64)
    return np.maximum(spread - 2 * slope * cov + slope * slope * var_s, 0.0) + n * bias * bias


def refitted(scale: np.ndarray, offset: np.ndarray, sums: np.ndarray,
             rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) with each of ``rows`` whose coding lost it (squared
    error above LOST times its spread) refitted: by least squares on its
    samples, or (float16 maps, where every map is float16 and the fit's
    offset does not round well enough) to its mean at slope 0, whichever
    restores it better; float32 least squares where neither float16 map
    restores it about as well as its mean."""
    lost = rows & (sums[:, COUNT] > 0)
    if not lost.any():
        return scale, offset
    n = np.maximum(sums[:, COUNT], 1.0)
    mean_s, mean_w = sums[:, SUM_S] / n, sums[:, SUM_W] / n
    var_s = sums[:, SUM_SS] - n * mean_s * mean_s
    cov = sums[:, SUM_SW] - n * mean_s * mean_w
    spread = np.maximum(sums[:, SUM_WW] - n * mean_w * mean_w, 0.0)
    coded = _errors(sums, scale, offset)
    lost &= coded > LOST * spread
    if not lost.any():
        return scale, offset
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(var_s > 0, cov / var_s, 0.0)
    slope = np.where(np.isfinite(slope), slope, 0.0)
    fits = [(slope, mean_w - slope * mean_s)]
    if _all_half(scale) and _all_half(offset):
        # The offset is about the slope times the middle sample (2048 at 12
        # bits): float16's rounding of it can cost more than the fit gains.
        fits = [_rounded(slope, mean_w - slope * mean_s, np.float16),
                _rounded(np.zeros_like(slope), mean_w, np.float16)] + fits
    scale, offset = scale.copy(), offset.copy()
    for a, b in fits:
        a, b = _rounded(a, b, np.float32)
        error = _errors(sums, a, b)
        better = (lost & np.isfinite(a) & np.isfinite(b) & (error < coded)
                  & (error <= spread * FIT_TOLERANCE))
        scale[better], offset[better] = a[better], b[better]
        lost &= ~better
    return scale, offset


def _rounded(a, b, dtype):
    with np.errstate(over="ignore"):
        return a.astype(dtype).astype(np.float32), b.astype(dtype).astype(np.float32)


def _all_half(values: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.all(values.astype(np.float16).astype(np.float32) == values))
