"""Rows a coding lost, restored as their means.

A row's map (``w = s * scale + offset``) is chosen before coding, from the
weights alone. Rows share one scale (:func:`jaxjpeg.mapping.common_scale`)
and a block's coding noise reaches all 64 of its samples, so a row far
quieter than the rows it shares blocks with took their noise: rows 1,000x
quieter than the loudest came back at up to 414 times their own RMS (4,461
in a narrow view whose rows share one map). Once a tile is coded the
encoder knows what each row's samples decode to
(``_native.encode_mapped_with_row_sums`` sums them from the coded
coefficients); a row whose squared error exceeds LOST times its spread is
then mapped to its mean (slope 0), so no row restores at more than twice
its RMS about its mean (in the dtype the decoder writes, whose rounding
counts). The decoders and the format are unchanged: only the maps'
numbers move.

Only rows a coding may lose are summed (:func:`candidates`); the rows it
did not lose keep the maps the rate control chose, so its predictions hold.
"""

from __future__ import annotations

import numpy as np

# _native.encode_mapped_with_row_sums' columns: weights less their row's
# center, and the squared error of what the decoder writes for them
SUMS = COUNT, SUM_W, SUM_WW, SUM_ERROR = range(4)
# A row is mapped to its mean where its coding's squared error exceeds this
# many times its spread (its squared deviation from its mean): at twice its
# RMS, the coding has left little of it. At 1 (every row worse than its
# mean), least-squares maps shrank 3,600-3,800 of PP-OCRv6's recognizer's
# classifier rows at 10x towards their means: none of its 24 lines read
# exactly (8 before).
LOST = 4.0
# Rows of fewer values are left as they are: less than a block wide, a row's
# mean is barely a statistic, and a map of its own costs about as much as
# its values (a (65536, 1) leaf's rows, one value each, all "lost", were
# stored as their maps, larger than raw).
MIN_ROW_VALUES = 8
# candidates(): a row may be lost below this RMS in samples, in coarsest
# steps plus samples (every row whose 8-row band of blocks holds one is
# inverse-transformed as it is coded: at one step plus one sample, 85% of a
# transformer-like tree's tiles, for one row lost, +20% save time).
NOISE_STEPS, NOISE_SAMPLES = 0.6, 0.5
# How much above its spread a row mapped to its mean as float16 may restore.
FIT_TOLERANCE = 1 + 1 / 64


def candidates(row_variance: np.ndarray, scale: np.ndarray, coarsest_step: float) -> np.ndarray:
    """Rows a coding may lose: their RMS about their mean (in samples)
    under NOISE_STEPS coarsest steps plus NOISE_SAMPLES samples. The noise
    a row takes stayed within 1.04 steps RMS (rounding included) over flat
    8- and 12-bit tables, rows spread over decades and loud columns, so a
    row past that bound restores within (1.04 / 0.6)² = 3 times its spread,
    short of LOST; a constant row (scale 0, restored exactly) is none."""
    limit = NOISE_STEPS * coarsest_step + NOISE_SAMPLES
    spread = np.sqrt(np.maximum(row_variance, 0.0))
    return (scale > 0) & (spread < limit * scale.astype(np.float64))


def centers(scale: np.ndarray, offset: np.ndarray, middle: float) -> np.ndarray:
    """The values the rows' weights are summed about (the native
    RowSumsCenter): what each map gives the middle sample, in float64."""
    return np.asarray(offset, np.float64) + np.asarray(scale, np.float64) * middle


def refitted(scale: np.ndarray, offset: np.ndarray, sums: np.ndarray, rows: np.ndarray,
             middle: float, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) with each of ``rows`` whose coding lost it (squared
    error above LOST times its spread) mapped to its mean: slope 0, offset
    the mean as float16 where every map is float16 and that restores the row
    within FIT_TOLERANCE of its spread, else as float32 (where that restores
    it better than its coding: a mean between two float32 values of a row of
    such values does not reach its spread). ``sums`` about :func:`centers`
    of ``(scale, offset, middle)``, errors in ``dtype``, the dtype the
    decoder writes (its rounding of a mean counts too)."""
    lost = rows & (sums[:, COUNT] >= MIN_ROW_VALUES)
    if not lost.any():
        return scale, offset
    n = np.maximum(sums[:, COUNT], 1.0)
    mean = sums[:, SUM_W] / n   # about the center
    spread = np.maximum(sums[:, SUM_WW] - n * mean * mean, 0.0)
    coded = sums[:, SUM_ERROR]
    lost &= coded > LOST * spread
    if not lost.any():
        return scale, offset
    center = centers(scale, offset, middle)
    scale, offset = scale.copy(), offset.copy()
    half = _all_half(scale) and _all_half(offset)
    for maps in (np.float16, np.float32) if half else (np.float32,):
        with np.errstate(over="ignore"):
            level = (center + mean).astype(maps).astype(np.float32)
            restored = level.astype(dtype).astype(np.float64)
        error = spread + n * (mean - (restored - center)) ** 2
        bound = spread * FIT_TOLERANCE if maps == np.float16 else coded
        near = lost & np.isfinite(restored) & (error <= bound) & (error < coded)
        scale[near], offset[near] = 0.0, level[near]
        lost &= ~near
    return scale, offset


def _all_half(values: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.all(values.astype(np.float16).astype(np.float32) == values))
