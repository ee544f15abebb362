"""Mapping weights to JPEG samples and back.

Each row of a tensor's 2-D view gets an affine map ``w = s * scale + offset``
from samples ``s`` in ``[0, 2^bits - 1]``. The decoder applies it fused with
the inverse DCT, so the map costs two numbers per row and no extra pass.

The encoder receives continuous (unrounded) samples, so the only rounding of
samples happens in the decoder. A flat quantization table of step ``Δ`` is
uniform quantization of orthonormal DCT coefficients: it adds ``Δ²/12`` of
noise per sample, and the decoder's rounding to integers adds ``1/12``; row
``r``'s weights see that noise times ``scale[r]²``. What is left to choose is
each row's scale (and offset). Three strategies (``clip=``):

``"common"`` (recommended with :mod:`jaxjpeg.rate`)
    One scale for every row, the smallest at which every row fits around its
    own mean (row means map to the middle sample, so the DC coefficients are
    near zero and cost almost nothing), and no clipping at all. The weight-
    domain step is then ``Δ * scale`` for every weight: for a fixed bit budget
    an equal step minimises the squared error (by AM-GM, unequal row steps
    ``q_r`` cost ``½·log2(mean q_r² / geomean(q_r)²)`` bits per weight at the
    same error), and outliers cost a few extra bits in the entropy coder
    instead of stretching everyone's step. ``row_weight`` (e.g. a per-row
    mean squared gradient or input-activation power) makes the step of row
    ``r`` proportional to ``row_weight[r] ** -0.5``, the allocation that
    minimises the weighted error.
``"mse"``
    Per row, stretch the row's (possibly clipped) range over all samples,
    choosing the clip that minimises clipping error plus predicted noise.
    Useful at 8 bits with few rows of very different spread; it needs only
    one pass over the data plus work on the tails.
``"minmax"``
    Per row, the row's min..max over all samples.

Scales and offsets are rounded to float16-representable values wherever that
keeps every sample in range (samples are computed from the rounded map, so
the rounding costs no accuracy), so a container may store them as float16.
"""

from __future__ import annotations

import numpy as np

# Fractions of the distance from the row mean to its min / max tried by clip="mse".
CLIP_CANDIDATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
CLIP_MODES = ("mse", "minmax", "common")
_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)


def sample_max(bits: int) -> int:
    return (1 << bits) - 1


def row_affine(view: np.ndarray, bits: int, *, clip: str = "mse", step: float = 1.0,
               row_weight: np.ndarray | None = None, scale: np.ndarray | None = None,
               shared: bool = False, with_samples: bool = True, stats=None):
    """Maps a float32 [rows, cols] view to samples.

    Returns ``(samples, scale, offset)``: continuous float32 samples clipped to
    ``[0, 2^bits - 1]`` and the float32 per-row affine map back to weights.
    ``step`` is the average quantization step in sample units, used by
    ``clip="mse"`` to predict the coding noise (the other modes ignore it).
    ``row_weight`` (``clip="common"`` only): per-row importance, non-negative.
    ``scale`` (``clip="common"`` only): the rows' scales, given instead of
    computed (a sample of rows coded with the scales of its whole tensor).
    ``shared`` (``clip="common"`` only): one offset for every row, centred on
    the whole view's mean; with equal row scales the map is then two numbers
    in all (rows of a few columns would otherwise pay more for their maps
    than for their weights).
    ``stats`` (``clip="common"`` only): :func:`row_stats` of ``view``, given
    instead of computed. ``with_samples=False``: the maps only (samples None), for a coder that
    computes each tile's samples when it codes it (:func:`to_samples`).
    """
    view = np.asarray(view, np.float32)
    top = sample_max(bits)
    if clip == "common":
        if stats is None:
            stats = row_stats(view, shared)
        if scale is None:
            scale = common_scale(view, bits, row_weight, shared=shared, stats=stats)
        center, row_low, _ = stats
        offset = center - 0.5 * (top + 1) * scale.astype(np.float64)
        # Non-negative rows (second moments, variances) must stay non-negative:
        # sample 0 then decodes to exactly 0. Raising a negative offset to 0
        # keeps the row's max within range: max - 0 <= (max - center) +
        # (center - offset) <= top * scale.
        low = np.full(view.shape[0], row_low.min()) if shared else row_low
        offset = np.where((low >= 0) & (offset < 0), 0.0, offset)
        if not shared:
            # A row of one value is its offset, exactly, at scale 0: on the
            # tensor's scale its samples sat at one end of the range, where
            # JPEG's error is not clipped away (found by review: a stacked
            # leaf's all-zero layer came back as 5 samples' worth, 2.3e-4).
            constant = row_low == stats[2]
            if constant.any():
                scale = np.where(constant, 0.0, scale)
                offset = np.where(constant, row_low, offset)
    else:
        if row_weight is not None:
            raise ValueError("row_weight needs clip='common'")
        lo = view.min(axis=1).astype(np.float64)
        hi = view.max(axis=1).astype(np.float64)
        if clip == "mse":
            lo, hi = _mse_range(view, lo, hi, bits, step)
        elif clip != "minmax":
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
        scale = _f16_up((hi - lo) / top)
        offset = lo
    offset = _f16_offset(view, scale, offset, top, clip_ok=clip == "mse",
                         low_high=stats[1:] if clip == "common" else None)
    scale = scale.astype(np.float32)
    if not with_samples:
        return None, scale, offset
    return to_samples(view, scale, offset, bits), scale, offset


def to_samples(view: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    """float32 samples of the rows of ``view`` under their maps (``scale``,
    ``offset``: those rows' entries of :func:`row_affine`'s), clipped to
    ``[0, 2^bits - 1]``; elementwise, so a tile's samples may be computed
    from the tile alone. A constant row (scale 0, restored as its offset
    whatever its samples) is the middle sample, the level the rows around
    it average (the encoder's ConstantLine, xla_ops/encoder.cc)."""
    divisor = np.where(scale > 0, scale, np.float32(1))
    samples = (np.asarray(view, np.float32) - offset[:, None]) / divisor[:, None]
    np.clip(samples, 0, sample_max(bits), out=samples)
    samples[~(np.asarray(scale) > 0)] = 0.5 * (sample_max(bits) + 1)
    return samples.astype(np.float32, copy=False)


def row_stats(view: np.ndarray, shared: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centers as :func:`_centers`, row minima, row maxima) of a float32 view:
    what :func:`common_scale` and :func:`row_affine` need from the data,
    whatever the sample depth (a caller may compute them once for both)."""
    view = np.asarray(view, np.float32)
    return _centers(view, shared), view.min(axis=1), view.max(axis=1)


def _centers(view: np.ndarray, shared: bool) -> np.ndarray:
    """float64 [rows]: each row's mean, or the whole view's for every row."""
    if shared:
        return np.full(view.shape[0], view.mean(dtype=np.float64))
    return view.mean(axis=1, dtype=np.float64)


# How far a row's step may stray from the rest's (either side of their
# geometric mean) under importance weights, which are noisy estimates.
ROW_SPREAD = 16.0


def common_scale(view: np.ndarray, bits: int, row_weight: np.ndarray | None = None, *,
                 shared: bool = False, stats=None, max_ratio: float | None = ROW_SPREAD,
                 lightest: bool = False) -> np.ndarray:
    """Per-row scales of ``clip="common"``: equal (or ∝ row_weight^-½), every row fitting.

    Row ``r`` fits when its values lie within ``(2^bits)/2 - 1`` samples of its
    mean on either side (one sample of slack absorbs float16 rounding of the
    offset and the float32 arithmetic). float32 [rows], float16-representable
    where possible.
    """
    view = np.asarray(view, np.float32)
    rows = view.shape[0]
    center, low, high = stats if stats is not None else row_stats(view, shared)
    half = np.maximum(high - center, center - low)
    room = 0.5 * (sample_max(bits) + 1) - 1.0
    if row_weight is None:
        rel = np.ones(rows)
    else:
        rel = relative_steps(row_weight, rows, max_ratio, lightest)
    c = float(np.max(half / (rel * room))) if rows else 0.0
    if not np.isfinite(c) or c <= 0:  # every row constant: offsets alone are exact
        c = 0.0
    return _f16_up(c * rel).astype(np.float32)


def relative_steps(row_weight, rows: int, max_ratio: float | None = ROW_SPREAD,
                   lightest: bool = False) -> np.ndarray:
    """Per-row step multipliers ∝ row_weight^-½, geometric mean 1, spread capped
    (``lightest``: the lightest row's 1 instead, the rest finer, within
    ``max_ratio`` of it: found by review, the prior's quiet channels at their
    geometric mean made the default save's other rows coarser, 3.8x the error
    where half the channels were quiet).

    Rows with zero (or missing) weight get the coarsest step; the spread is
    capped at ``max_ratio`` either side of the geometric mean, since
    gradient-based weights are noisy estimates (None: weights that are exact,
    such as stacked layers' own scales, uncapped).
    """
    w = np.asarray(row_weight, np.float64).reshape(-1)
    if w.shape[0] != rows:
        raise ValueError(f"row_weight has {w.shape[0]} entries for {rows} rows")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("row_weight must be finite and non-negative")
    positive = w[w > 0]
    if positive.size == 0:
        return np.ones(rows)
    logw = np.log(np.where(w > 0, w, positive.min()))
    if lightest:
        rel = np.exp(-0.5 * (logw - logw.min()))
        return rel if max_ratio is None else np.maximum(rel, 1 / max_ratio)
    rel = np.exp(-0.5 * (logw - logw.mean()))
    if max_ratio is not None:
        rel = np.clip(rel, 1 / max_ratio, max_ratio)
    return rel / np.exp(np.log(rel).mean())


def column_scales(col_weight, cols: int, max_ratio: float = ROW_SPREAD) -> np.ndarray:
    """Per-column scales ∝ col_weight^-½ (geometric mean 1, spread capped), float16-exact.

    The coder divides column ``c`` by its scale before the row map and the
    decoder multiplies it back, so the column's quantization step scales by it.
    """
    rel = relative_steps(col_weight, cols, max_ratio)
    return rel.astype(np.float16).astype(np.float32)


def widened(scale: np.ndarray, factor: float) -> np.ndarray:
    """Row scales times ``factor`` (>= 1: every row still fits), rounded up
    to float16-representable values where float16 holds them (as
    :func:`common_scale`'s, so the maps cost as many bytes)."""
    return _f16_up(np.asarray(scale, np.float64) * factor).astype(np.float32)


def _f16_up(x) -> np.ndarray:
    """float64 values rounded up to float16-representable ones where float16 holds them."""
    x = np.asarray(x, np.float64)
    ok = (x >= _F16_MIN_NORMAL) & (x <= _F16_MAX / 2)
    if not ok.any():   # e.g. the tiny scales of small weights: numpy would signal
        return x       # underflow for every one it converts, only to keep x
    # Only the values kept are converted (1.0 stands in for the others):
    # numpy signals underflow or overflow for each of those, slowly.
    fits = np.where(ok, x, 1.0)
    h = fits.astype(np.float16).astype(np.float64)
    h = np.where(h < fits, np.nextafter(h.astype(np.float16), np.float16(np.inf)).astype(np.float64), h)
    return np.where(ok, h, x)


def _f16_offset(view, scale, offset, top, clip_ok, low_high=None) -> np.ndarray:
    """float32 offsets, float16-rounded for each row where every sample stays in range.

    Rows of clip="mse" may have been clipped on purpose: for them a rounding
    may move the window by at most half a sample. ``low_high``: the rows'
    minima and maxima, when known (else read from ``view``).
    """
    offset = np.asarray(offset, np.float64)
    scale = np.asarray(scale, np.float64)
    with np.errstate(over="ignore"):   # offsets past float16's range: kept float32 below
        o16 = offset.astype(np.float16).astype(np.float64)
    finite = np.isfinite(o16)
    safe_scale = np.where(scale > 0, scale, 1.0)
    if clip_ok:
        ok = np.abs(o16 - offset) <= 0.5 * safe_scale
    else:
        low, high = low_high if low_high is not None else (view.min(axis=1), view.max(axis=1))
        lo = (low - o16) / safe_scale
        hi = (high - o16) / safe_scale
        ok = (lo >= 0) & (hi <= top)
    # A constant row (scale 0) is its offset alone: round it only if exact.
    ok = np.where(scale > 0, ok, o16 == offset)
    return np.where(finite & ok, o16, offset).astype(np.float32)


def _mse_range(view, lo, hi, bits, step):
    """Per-row clip range minimising clipping error plus predicted noise.

    Only values beyond the tightest candidate clip contribute clipping error,
    so one pass over the view finds them and the candidates are scored on
    those tails alone.
    """
    top = sample_max(bits)
    rows = view.shape[0]
    center = view.mean(axis=1, dtype=np.float64)
    # Coefficient quantization with a flat step Δ adds Δ²/12 per sample (the
    # DCT is orthonormal); the decoder's rounding to integers adds 1/12.
    noise_per_unit = (step * step + 1.0) / 12.0
    tight = min(CLIP_CANDIDATES)
    t_lo = (center - tight * (center - lo)).astype(np.float32)
    t_hi = (center + tight * (hi - center)).astype(np.float32)
    r_idx, c_idx = np.nonzero((view < t_lo[:, None]) | (view > t_hi[:, None]))
    tail = view[r_idx, c_idx].astype(np.float64)
    cols = view.shape[1]
    best_err = np.full(rows, np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    for ratio in CLIP_CANDIDATES:
        c_lo = center - ratio * (center - lo)
        c_hi = center + ratio * (hi - center)
        excess = np.maximum(c_lo[r_idx] - tail, 0) + np.maximum(tail - c_hi[r_idx], 0)
        clip_err = np.bincount(r_idx, weights=excess * excess, minlength=rows) / cols
        noise = np.square((c_hi - c_lo) / top) * noise_per_unit
        err = clip_err + noise
        better = err < best_err
        best_err[better] = err[better]
        best_lo[better], best_hi[better] = c_lo[better], c_hi[better]
    return best_lo, best_hi
