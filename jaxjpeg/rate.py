"""Rate control: how many bytes each tensor gets, and at what error.

Every control here works in the weight domain. With ``clip="common"`` (see
:mod:`jaxjpeg.mapping`) a tensor's rows share one scale ``c`` (or scales
``c * rel[r]`` with row weights, times column scales), and a flat table of
integer step ``Δ`` quantizes every weight's DCT coefficients with step
``q = Δ * c``: plain uniform quantization plus JPEG's entropy coding. ``q``
is the one knob; the sample depth follows from it: 8-bit samples while
``Δ8 = q / c8 >= 8`` (the decoder's rounding to integers then adds at most
1/64 of the coding noise), 12-bit samples (16x finer rounding, steps up to
65535) below that.

* :func:`prepare_leaf` decides how a tensor is coded whatever its rate: its
  view (:func:`jaxjpeg.views.choose_view`), the values kept exactly, and how
  the step varies over rows and columns (data-free: one step for all rows,
  ``ROW_POWER = 0``, the least squared error for the leaf's size, so a
  channel of small weights has a larger relative error than the others;
  with calibration importances, the step follows ``(importance + mean)^-½``
  (IMPORTANCE_DAMPING), and
  column scales are kept where their bytes pay for themselves).
* :func:`encode_at_step` codes a tensor at a weight-domain step ``q``.
* :func:`encode_for_error` finds the smallest coding whose decoded relative
  RMS error is within a bound (measured by decoding, not predicted).
* :class:`BudgetAllocator` / :func:`allocate_to_target` split a byte budget
  across tensors at equal sensitivity-weighted rate–distortion slope (a
  common Lagrange multiplier), from rate–distortion curves measured on a
  sample of each tensor, then code each tensor once.
* :func:`sensitivity_from_gradients` measures mean squared gradients to
  weight that allocation.

Sizes are ``EncodedTensor.nbytes``: JPEG bytes plus maps and side list.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from typing import Callable, Iterable, Mapping

import numpy as np

from jaxjpeg import (_native, analysis, codec, feedback, mapping, priors, quantized_vectors,
                     stacks, views)
from jaxjpeg.feedback import InputCovariance  # noqa: F401  (jaxjpeg.rate.InputCovariance)
from jaxjpeg.checkpoint_reader import quantizable
from jaxjpeg.treepaths import first_names, key_record, path_string

STEP_LIMIT = {8: 255, 12: 65535}
MIN_STEP_8BIT = 8          # below this 8-bit rounding noise exceeds 1/64 of the coding noise
ROW_POWER = 0.0          # data-free row importance ∝ row RMS^(-2 * ROW_POWER)
LADDER = np.arange(-4.0, 13.0)   # probe steps q = rms * 2^-k (interpolated between)
PROBE_ELEMENTS = 1 << 15   # weights coded per probe of a large tensor
# A curve measured on n weights errs by about 1/√n, and what that costs the
# allocation grows with the leaf's share of the weights allocated: a leaf
# holding less than PROBE_FULL_SHARE of them gets a probe ∝ √share (the
# sizes that minimise Σ share / n at a given total), at least
# MIN_PROBE_ELEMENTS. In benchmarks/rate_control.py's 1 GiB tree the
# 0.26M-weight leaves get 0.44x the probe (the whole tree 0.6x the probe
# codings); EfficientNet-lite's and PP-OCRv6's leaves keep theirs (every
# leaf it would shrink there is small enough to probe whole).
PROBE_FULL_SHARE = 0.005
MIN_PROBE_ELEMENTS = 1 << 13
MIN_PROBE_WIDTH = 32       # narrowest probe patch (8 rows each)
COLUMN_SCALE_BITS = 16     # stored cost of one column scale (float16)
# A shared scale steps no finer than 1/4095 of the widest row's range at 12
# bits. Where one row's (or column's) range is this many times the median
# one's (folded BatchNorms: silero-vad's kernels spread up to 80x in RMS),
# byte targets also try per-row ranges (clip="minmax") below that step.
ROW_RANGE_SPREAD = 8.0
ROW_RANGE_DELTAS = (256, 128, 64, 32, 16, 8, 4, 2, 1)   # 12-bit steps tried there
# A last leaf landing past its shared scale's finest step mixes in per-row
# ranges whose steps d err at most about as much: d under this many times
# the widest row's range over the rows' RMS range (at 1, a kernel whose rows
# spread 300x had only step 2, 45% more bytes, and landed 2.2% under)
ROW_RANGE_LANDING = 1.25
SPREAD_SAMPLE_ROWS = 256   # rows whose column ranges stand for the columns'
# Per-row ranges cost a copy of the leaf and nine more probe codings, so a
# curve measures them only when its shared scale's finest coding is under
# this many times the file's average bits/weight: a target that near a
# leaf's floor (Silero VAD at 4x and 6x; at 8x its floors are 1.5x the
# average) and not a transformer-like tree whose outlier columns put floors
# at 1.6-2x (benchmarks/rate_control.py; EfficientNet-lite's leaves get
# 0.65-1.75x the average at 8x, none of them spread).
REACH = 1.5
# Under a byte target the ladder is coded coarse to fine, LADDER_FIRST steps
# then LADDER_BATCH at a time, until a step's probe costs LADDER_HEADROOM
# times the reach (bits/weight): finer steps are the dearest to code.
LADDER_FIRST = 8
LADDER_BATCH = 2
LADDER_HEADROOM = 1.5
# The coarse end is left out too: the steps whose probe costs under
# LADDER_FLOOR times the reach, all but the finest of them (still a
# candidate under the floor). On the benchmark tree and EfficientNet-lite
# those are the ladder's 2-3 coarsest steps (0.07-0.3 bits/weight, mostly
# tile headers), which no allocation within the reach picked (the same
# files). Where they end is predicted from each step's q (a Gaussian's bits
# at high rate, log2(rms / q) + GAUSSIAN_BITS, fewer than that at low rates
# on every leaf measured) and checked: a step predicted under the floor that
# costs more than it extends the ladder coarser, LADDER_BATCH steps at a time.
# Not under a user's sensitivities: they spread leaves' shares widely (a
# leaf its user calls insensitive may want next to nothing), and a floor
# there moved bytes between leaves on small test trees.
LADDER_FLOOR = 0.25
GAUSSIAN_BITS = 0.5 * math.log2(2 * math.pi * math.e)   # 2.05: bits/weight at q = rms


# ----------------------------------------------------------------------------
# How a tensor is coded
# ----------------------------------------------------------------------------

VIEWS = ("auto", "framework")


def prepare_leaf(x, importance=None, view: str = "auto",
                 input_covariance: feedback.InputCovariance | None = None,
                 shards=None, stack: int | None = None,
                 layer_steps: bool = True, row_steps: bool = True,
                 balance: bool = True, output_weights=None) -> codec.Prepared:
    """Chooses ``x``'s view, side list and per-row / per-column steps.

    ``view``: "auto" lets :func:`jaxjpeg.views.choose_view` pick the axes;
    "framework" keeps the array's own order (every axis but the last to
    rows), e.g. for tiles that other tools read as images of the tensor.

    ``importance`` (optional): non-negative, broadcastable to ``x.shape``
    (per element, e.g. squared gradients; per output channel, e.g. shape
    ``(O, 1, 1, 1)``; or a scalar), in ``x``'s own layout. It is reduced to a
    per-row times per-column model of the chosen view; column scales are kept
    only when their bytes pay for themselves.

    ``input_covariance``: the layer's inputs (see :mod:`jaxjpeg.feedback`);
    the view then keeps the input axes together on rows or columns.

    ``shards`` (optional): the regions of the array's shards ((start, stop,
    step) per axis, see ``jaxjpeg.checkpoint.shard_regions``); the sharded
    axes then lead the columns of an "auto" view and tiles are cut along the
    shards' boundaries (:meth:`jaxjpeg.codec.Prepared.with_shards`).

    ``stack`` (optional): the axis along which ``x`` stacks layers
    (:mod:`jaxjpeg.stacks`); without an input covariance, an "auto" view
    then puts it among its rows (:func:`jaxjpeg.views.stacked_view`: first,
    so a layer's rows are a run of rows, or after a sharded row axis), and
    where
    ``layer_steps`` and no ``importance`` each layer's rows get steps in
    proportion to the layer's RMS (:func:`jaxjpeg.stacks.slice_weights`).

    ``row_steps=False``: no per-row steps (a ``clip`` other than "common"
    sets each row's range from its own values: found by review, the row
    weights of stacks and importance arrays failed its mapping mid-save).

    ``output_weights`` (optional, with ``input_covariance`` and no
    ``importance``): weights broadcastable to ``x.shape`` along its output
    axes, which the tree states exactly (the BatchNorm prior's quiet
    channels, :meth:`jaxjpeg.priors.Prior.output_importance`): each row's
    step ∝ its weight^-½, neither damped nor capped as an estimate's are,
    and relative to the lightest row's (the rest keep their step; within
    priors.OUTPUT_SPREAD of it).

    ``balance``: loud columns may be balanced (:func:`jaxjpeg.views.loud_column_scales`;
    without ``importance``: a few loud slices of an "auto" view, or the loud
    inputs of a kernel under the common-mean prior), and that kernel's loud
    outputs (:func:`jaxjpeg.views.loud_row_factors`); False keeps the leaf
    in weight units throughout.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if view != "auto" or input_covariance is not None:
        stack = None
    plain = (importance is None and input_covariance is None and ROW_POWER == 0
             and stack is None)
    if plain:
        p = analysis.prepare_plain(x, view, shards)   # one native pass, when it can decide
        if p is not None:
            return p
    x = np.asarray(x)
    # float32 (every coded dtype fits it; NaN compares False); a float32 leaf
    # with nothing to keep aside is used as it is, without a copy.
    x32 = x.astype(np.float32, copy=False)
    finite = views.within_limit(x32, x.dtype)
    probe = x32 if finite.all() else np.where(finite, x32, np.float32(0))
    lead, narrow = views.sharded_axes(shards), views.narrow_axes(shards)
    # a view free to put a loud axis on the columns, to balance them
    may_balance = (balance and view == "auto" and x.ndim >= 2 and importance is None
                   and input_covariance is None and (stack is None or layer_steps))
    if stack is not None:
        view = views.stacked_view(probe, stack, lead, narrow)
    elif view == "auto":
        view = views.choose_view(probe, lead, narrow)
    else:
        view = views.MatrixView.default(x.ndim)
    fb = None
    if input_covariance is not None:
        view = feedback.view_for(input_covariance, x.shape, view)
        fb = feedback.for_view(input_covariance, x.shape, view)
    # The native pass spares find_outliers where it would keep nothing; a
    # leaf prepare_plain declined is one where it would not (no second pass).
    outliers = ((None if plain else analysis.no_far_values(x, view))
                or views.find_outliers(x, view, finite=finite, as_float32=x32))
    scales = None   # column scales balancing loud slices or inputs (views.loud_column_scales)
    loud = _loud_slices(probe, outliers, shards, stack, view) if may_balance else None
    if loud is not None and quantized_vectors.is_sparse(x):   # a pruned leaf: its exact zeros
        loud = None
    if loud is not None:
        view, scales = loud
        # their values are not far once balanced (found by review: looked at
        # unbalanced, the side list took most of them and nothing was balanced)
        outliers = views.find_outliers(x, view, finite=finite, col_scale=scales, as_float32=x32)
    del finite
    m = view.to_matrix(probe)
    del probe, x32   # only m is needed, and only until the weights are known
    if outliers.count:   # zeros there, in m's own copy (found by review: masks and
        # masked copies of the leaf held three times its size beyond it)
        m = np.array(m) if np.may_share_memory(m, x) else m
        m[view.cells(x.shape, outliers.index)] = 0
    row_spread, lightest = mapping.ROW_SPREAD, False
    if stack is not None and importance is None and layer_steps and loud is None:
        row_weight = stacks.slice_weights(m, x.shape[stack], interleaved=view.perm[0] != stack)
        col_weight, row_spread = None, None   # the layers' own scales: exact, whatever their spread
    elif importance is None:
        row_weight, col_weight = _data_free_weights(m)
    else:
        row_weight, col_weight = _separable_weights(view, x.shape, importance)
    if output_weights is not None and importance is None and fb is not None and not fb.along_rows:
        row_weight = view.to_matrix(np.broadcast_to(output_weights, x.shape)).mean(axis=1)
        row_spread, lightest = priors.OUTPUT_SPREAD, True
    if not row_steps:
        row_weight = None
    factors = None   # row factors balancing loud outputs (views.loud_row_factors)
    prior = (balance and col_weight is None and _power_unknown(fb, input_covariance, x.shape)
             and not quantized_vectors.is_sparse(x))
    if prior:
        scales = views.loud_column_scales(m)
    if scales is not None:
        outliers, m = _constant_rows_kept(x, view, m, scales, outliers)
    if prior and row_weight is None:
        kept = (None if not outliers.count else np.bincount(
            view.cells(x.shape, outliers.index)[0], minlength=m.shape[0]))
        factors = views.loud_row_factors(m, scales, kept)
    del m
    return codec.prepare(x, view=view, row_weight=row_weight, col_weight=col_weight,
                         col_scale=scales, row_factor=factors,
                         balanced=scales is not None or factors is not None, outliers=outliers,
                         feedback=fb, row_spread=row_spread, row_lightest=lightest,
                         copy=False).with_shards(shards)   # as analysis.prepare_plain


# Values of constant rows kept for their exactness beside balanced columns,
# at most this share of a leaf's (8 bytes each: 1/32 bit a weight).
CONSTANT_KEPT_SHARE = 1 / 256


def _constant_rows_kept(x, view: views.MatrixView, m: np.ndarray, scales: np.ndarray,
                        outliers: views.Outliers):
    """(``outliers`` with the values that the constant rows of ``m``, other
    than zero rows, hold in its balanced columns; ``m`` with zeros there).
    Divided by their columns' scales, those values would make the row
    uneven, and its offset could no longer code it exactly (found by review:
    an output channel of 0.03 beside an input channel 1000x the others came
    back with errors up to 1.06). Unchanged where they would be more than
    CONSTANT_KEPT_SHARE of the leaf's values."""
    low, high = m.min(axis=1), m.max(axis=1)
    rows, cols = np.flatnonzero((low == high) & (low != 0)), np.flatnonzero(scales > 1)
    if not rows.size or rows.size * cols.size > CONSTANT_KEPT_SHARE * m.size:
        return outliers, m
    index = np.union1d(outliers.index, view.flat_index(
        x.shape, np.repeat(rows, cols.size), np.tile(cols, rows.size)))
    m = np.array(m) if np.may_share_memory(m, x) else m
    m[np.ix_(rows, cols)] = 0
    return views.Outliers(index, x[np.unravel_index(index, x.shape)]), m


def _loud_slices(probe: np.ndarray, outliers: views.Outliers, shards=None, stack=None,
                 unbalanced: views.MatrixView | None = None):
    """(view, column scales) balancing loud slices (:func:`views.loud_slices`,
    or a stacked leaf's layers' own, :func:`views.stacked_loud_slices`) of
    the values coded: without the side list (values it keeps exactly, found
    in one view, would make their slices loud in another and move the view
    for nothing); None where a loud slice's mean is larger than its spread
    about it. Balanced, the loud slices become columns, which have no
    offsets: a constant sentinel row (1e30), exact by its row's offset, came
    back within 5%, and rows of 50 +- 1.5 coded their spread 125x coarser
    than the rest (found by review)."""
    lead = views.sharded_axes(shards)
    if stack is None:
        rms = views.axis_rms(probe, outliers.index)
        found = views.loud_slices(probe.shape, rms, shards,
                                  views.merged_rms(probe, rms, outliers.index))
        if found is None:
            return None
        (axis, scales), loud = found, found[1] > 1
        view = views.loud_view(probe.shape, axis, lead)
    else:
        found = views.stacked_loud_slices(probe, stack, outliers.index, shards, unbalanced)
        if found is None:
            return None
        view, scales, loud = found
    if _means_exceed_spreads(probe, view, np.flatnonzero(loud), outliers):
        return None
    return view, scales


def _means_exceed_spreads(probe: np.ndarray, view: views.MatrixView, columns: np.ndarray,
                          outliers: views.Outliers) -> bool:
    """Whether any of ``columns`` of ``probe``'s ``view`` has a mean larger
    than its spread about it, over its values the side list does not keep."""
    row_at, col_at = view.positions(probe.shape)
    values = probe.flat[row_at[:, None] + col_at[columns][None, :]].astype(np.float64).T
    coded = np.ones(values.shape, bool)
    if outliers.count:   # the side list's values in these columns are not coded
        rows, cols = view.cells(probe.shape, outliers.index)
        inside = np.isin(cols, columns)
        coded[np.searchsorted(columns, cols[inside]), rows[inside]] = False
    count = np.maximum(coded.sum(axis=1), 1)
    values = np.where(coded, values, 0.0)
    mean = values.sum(axis=1) / count
    spread = np.sqrt(np.square(np.where(coded, values - mean[:, None], 0.0)).sum(axis=1) / count)
    return bool(np.any(np.abs(mean) > spread))


def _power_unknown(fb: feedback.Feedback | None, cov, shape) -> bool:
    """Whether ``fb``'s inputs are on the view's columns with powers nobody
    measured (the common-mean prior's), over several input channels (not a
    depthwise kernel's taps of one channel, which see one input: found by
    review, a loud centre tap balanced held the wrong tap sum)."""
    return (fb is not None and not fb.along_rows
            and isinstance(fb.matrix, feedback.DiagonalPlusRankOne) and not fb.matrix.known_power
            and any(shape[a] >= views.MIN_CHANNEL for a in cov.axes_of(shape)))


def _data_free_weights(m: np.ndarray):
    """(row weights, column weights) without calibration data: rows ∝ RMS^(-2
    * ROW_POWER). At 0 (the default) the step is uniform inside a tensor, the
    squared-error optimum: on EfficientNet-lite1 at 8x, equal relative error
    per channel (ROW_POWER = 1) measured the same (KL 0.35 vs 0.36 over 96
    crops), and on networks without normalisation layers it is worse."""
    if ROW_POWER == 0 or m.shape[0] < 2:
        return None, None
    rms = np.sqrt(np.mean(np.square(m, dtype=np.float64), axis=1))
    if not np.any(rms > 0):
        return None, None
    return np.where(rms > 0, np.where(rms > 0, rms, 1.0) ** (-2 * ROW_POWER), 0.0), None


def _separable_weights(view: views.MatrixView, shape, importance):
    """(row weights, column weights or None) of the view from an importance array."""
    imp = np.asarray(importance, np.float64)
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError("importance must be finite and non-negative")
    try:
        imp = np.broadcast_to(imp, shape)
    except ValueError:
        raise ValueError(f"importance of shape {imp.shape} does not broadcast to the "
                         f"leaf's shape {tuple(shape)}") from None
    rows, cols = view.matrix_shape(shape)
    # the view's row and column means, summed over the broadcast array in
    # place (found by review: as a matrix, the prior's input powers were a
    # leaf-sized float64 array, and dividing it by the row means another)
    row_axes, col_axes = list(view.row_axes()), list(view.col_axes())
    u = _damped(np.einsum(imp, list(range(len(shape))), row_axes).reshape(-1) / cols)
    if u is None:
        return None, None
    inverse = (1.0 / u).reshape([shape[a] for a in row_axes])
    v = _damped(np.einsum(imp, list(range(len(shape))), inverse, row_axes, col_axes)
                .reshape(-1) / rows)
    if cols < 2 or v is None:
        return u, None
    gamma2 = mapping.relative_steps(v, cols) ** 2
    # Unequal column steps at equal weighted error save ½·log2(AM/GM of γ²)
    # bits per weight; the scales cost 16 bits per column.
    gain = rows * cols * 0.5 * math.log2(gamma2.mean() / math.exp(np.log(gamma2).mean()))
    return u, (v if gain > COLUMN_SCALE_BITS * cols else None)


IMPORTANCE_DAMPING = 1.0    # added to importances, times their mean: estimates are noisy


def _damped(weights: np.ndarray) -> np.ndarray | None:
    """Importances with a floor (a calibration set leaves many near zero), or
    None if all are zero."""
    mean = float(weights.mean())
    return weights + IMPORTANCE_DAMPING * mean if mean > 0 else None


def _as_prepared(x, row_weight=None) -> codec.Prepared:
    """``x`` as given (a Prepared tensor), or in the framework's view."""
    if isinstance(x, codec.Prepared):
        return x
    return codec.prepare(x, row_weight=row_weight)


def reference_rms(p: codec.Prepared) -> float:
    """The scale a leaf's steps are relative to, the default save's and a
    byte target's ladder alike: :func:`spread_rms`, or for stacked layers
    coded on their own scales (exact row weights) the geometric mean of the
    layers' (found by review: a ladder from the RMS of the whole leaf, mean
    and largest layers included, erased leaves of values about a large mean
    and stacked layers far smaller than the rest under byte targets)."""
    if p.row_spread is None and p.row_weight is not None:
        return stacks.slice_rms(p.row_weight) or spread_rms(p)
    return spread_rms(p)


def tensor_rms(p: codec.Prepared) -> float:
    """RMS of the coded values in weight units (a balanced leaf's: its own;
    the side list excluded)."""
    rms = math.sqrt(_squares(p) / max(1, p.size))
    return rms if rms > 0 else 1.0


def _squares(p: codec.Prepared) -> float:
    squares = p.scales.get("squares")   # analysis.prepare_plain counted them
    if squares is None:
        w = p.weight_domain(p.matrix).reshape(-1)
        # float64 accumulation without a float64 copy of the leaf
        squares = p.scales["squares"] = float(np.einsum("i,i->", w, w, dtype=np.float64))
    return squares


def spread_norm2(p: codec.Prepared) -> float:
    """Squared norm of the coded values about their rows' centers (spread_rms)."""
    return spread_rms(p) ** 2 * p.size


def spread_rms(p: codec.Prepared) -> float:
    """RMS of the coded values about their rows' centers (what the row maps'
    offsets leave to the samples), in weight units (a balanced leaf's: its
    own): the scale a step must be relative to. About the tensor_rms of
    trained weights, whose means are small; far less for values around a
    large mean (found by review: scanned LayerNorm scales, 1 +- 0.05 in
    (12, 768), took a default step of 0.28 and came back constant, 0.36
    bits a weight). With column scales (not balanced ones), tensor_rms;
    with error feedback too, unless the spread is under a
    FEEDBACK_SPREAD_SHARE of it (found by review: a conv kernel coded with
    feedback and one output channel held at 10 took a step from those 10s
    and restored its other weights as 0)."""
    if p.col_scale is not None and not p.balanced:
        return tensor_rms(p)
    if p.feedback is not None:
        spread = _spread_about_centers(p)
        return spread if 0 < spread < FEEDBACK_SPREAD_SHARE * tensor_rms(p) else tensor_rms(p)
    return _spread_about_centers(p) or tensor_rms(p)


FEEDBACK_SPREAD_SHARE = 0.25


def _spread_about_centers(p: codec.Prepared) -> float:
    """RMS of ``p``'s coded values about their rows' centers (0 if none)."""
    centers = np.asarray(p.row_stats()[0], np.float64)
    squares = _squares(p)
    about = squares - p.matrix.shape[1] * float(np.dot(centers, centers))
    if about < CANCELLATION_SHARE * squares:
        # the difference of two sums this far apart is rounding (found by
        # review: an embedding with a constant row of 1e30 got a spread of
        # 1e23, and every other row came back as 0): summed about the centers
        about = _squares_about(p, centers)
    return math.sqrt(max(about, 0.0) / max(1, p.size))


CANCELLATION_SHARE = 1e-6   # spread under this share of the squares: summed directly


def _squares_about(p: codec.Prepared, centers: np.ndarray) -> float:
    """Sum of squares of ``p``'s coded values about their rows' ``centers``
    (weight units), in blocks of rows."""
    rows = max(1, ERROR_CHUNK // max(1, p.matrix.shape[1]))
    total = 0.0
    for r in range(0, p.matrix.shape[0], rows):
        w = p.weight_domain(p.matrix[r:r + rows]).astype(np.float64)
        total += _sum_of_squares((w - centers[r:r + rows, None]).reshape(-1))
    return total


# ----------------------------------------------------------------------------
# One tensor at one step
# ----------------------------------------------------------------------------

def base_scale(x, bits: int, row_weight=None) -> float:
    """The weight-domain step of ``Δ = 1`` at ``bits`` (geometric mean over
    rows, or the lightest row's where the steps are relative to it:
    codec.Prepared.row_lightest; cached with the row scales: a probe ladder
    asks dozens of times)."""
    p = _as_prepared(x, row_weight)
    key = ("base", bits)
    if key not in p.scales:
        scale = p.common_scale(bits).astype(np.float64)
        if p.row_lightest and np.any(scale > 0):   # the rows row_weight leaves at 1
            p.scales[key] = float(scale.max())
        else:   # constant rows: any step codes them exactly
            p.scales[key] = float(np.exp(np.mean(np.log(scale)))) if np.all(scale > 0) else 1.0
    return p.scales[key]


def step_for(x, q: float, bits: int | None = None, row_weight=None) -> tuple[int, int]:
    """``(bits, Δ)`` that code ``x`` at (about) weight-domain step ``q``."""
    if q <= 0 or not math.isfinite(q):
        raise ValueError(f"step q must be positive and finite, got {q}")
    p = _as_prepared(x, row_weight)
    if bits is None and p.feedback is not None:
        # 8-bit samples' rounding in the decoder is noise error feedback
        # cannot shape; at 12 bits it is negligible (6x less output error
        # measured instead of 2x at equal bytes).
        bits = 12
    if bits is None:
        delta8 = q / base_scale(p, 8)
        if MIN_STEP_8BIT <= delta8 <= STEP_LIMIT[8]:
            return 8, round(delta8)
        bits = 12  # finer than 8-bit rounding allows, or coarser than its steps reach
    if bits not in STEP_LIMIT:
        raise ValueError(f"bits must be 8, 12 or None, got {bits}")
    delta = round(q / base_scale(p, bits))
    return bits, int(min(STEP_LIMIT[bits], max(1, delta)))


def encode_with_step(x, bits: int, delta: int, row_weight=None, *, clip: str = "common",
                     **options) -> codec.EncodedTensor:
    """Codes ``x`` at integer step ``delta`` (sample units), by default with ``clip="common"``."""
    return codec.encode_tensor(_as_prepared(x, row_weight), bits=bits, quant_step=delta, clip=clip,
                               **options)


def encode_at_step(x, q: float, *, bits: int | None = None, row_weight=None,
                   **options) -> codec.EncodedTensor:
    """Codes ``x`` (an array or :func:`prepare_leaf`'s result) at weight-domain
    step ``q`` (``bits=None``: 8 or 12, see module doc).

    ``row_weight``: per-row importance of the 2-D view; row ``r``'s step
    becomes ``q * rel[r]`` with ``rel ∝ row_weight^-½`` (geometric mean 1).
    ``options`` go to :func:`jaxjpeg.codec.encode_tensor` (restart_interval, ...).
    """
    p = _as_prepared(x, row_weight)
    b, delta = step_for(p, q, bits)
    return encode_with_step(p, b, delta, **options)


ERROR_CHUNK = 1 << 18   # elements per float64 block of the error sums (2 MiB)


def squared_error(x, enc: codec.EncodedTensor) -> float:
    """Sum of squared errors of ``enc`` decoded against ``x`` (float64); the
    values its side list keeps exactly (NaN and infinities included) count 0.

    Summed in float64 blocks, tile by tile where the tensor is its view
    without a copy, else against the decoded view seen in the tensor's
    shape: a restored copy of the leaf, or a float64 one, would cost more
    memory than the coding itself."""
    original = np.asarray(x.original if isinstance(x, codec.Prepared) else x)
    if tuple(enc.shape) != original.shape:
        raise ValueError(f"encoding of shape {tuple(enc.shape)} compared with an array of "
                         f"shape {original.shape}")
    in_place = _in_place_operands(original, enc.view, enc.outliers)
    if in_place is not None:
        matrix, kept = in_place

        def tile_error(tile):
            box = (slice(tile.row0, tile.row0 + tile.height),
                   slice(tile.col0, tile.col0 + tile.width))
            return _tile_error(enc, tile, matrix[box], None if kept is None else kept[box])
        if matrix.dtype == np.float32 and len(enc.tiles) > 1:   # decoded natively, one tile a core
            return sum(codec.tile_pool().map(tile_error, enc.tiles))
        return sum(map(tile_error, enc.tiles))
    kept = codec.index_mask(None if enc.outliers is None else enc.outliers.index, original.shape)
    decoded = codec.run_plan(codec.build_plan([enc], [np.float32]))[0]
    return _block_error(original, _as_restored(enc.view.from_matrix(decoded, enc.shape),
                                               original.dtype), kept)


def _as_restored(decoded: np.ndarray, dtype) -> np.ndarray:
    """The float32 decode as restore gives a leaf of ``dtype``: a float16 or
    bfloat16 leaf is decoded to its own dtype, whose rounding is part of its
    error (an error bound met in float32 was missed by up to 5.5%)."""
    return decoded.astype(dtype) if np.dtype(dtype).itemsize < 4 else decoded


def _in_place_operands(original: np.ndarray, view: views.MatrixView, outliers):
    """(``original`` in ``view``, the side list's positions in it or None),
    both read in place, when the view is one without a copy; else None."""
    matrix = view.to_matrix(original)
    if not np.shares_memory(matrix, original):
        return None
    kept = codec.index_mask(None if outliers is None else outliers.index, original.shape)
    return matrix, None if kept is None else view.to_matrix(kept)


def encode_measured(p: codec.Prepared, bits: int, delta: int, **options):
    """(:func:`encode_with_step`, :func:`squared_error` of it): where that
    error is summed natively tile by tile, it is summed as each tile is
    coded, from the values coded (the same sum, to the last bit), instead of
    decoding the tiles again."""
    original = np.asarray(p.original)
    in_place = None
    if original.dtype == np.float32 and p.feedback is None and p.row_factor is None:
        in_place = _in_place_operands(original, p.view, p.outliers)
    if in_place is None:
        enc = encode_with_step(p, bits, delta, **options)
        return enc, squared_error(p, enc)
    return encode_with_step(p, bits, delta, squared_error_of=in_place, **options)


def _tile_error(enc: codec.EncodedTensor, tile: codec.Tile, original: np.ndarray, kept) -> float:
    """Σ (original - decoded)² over one tile, ``kept`` positions excluded:
    float32 weights are decoded and summed natively, read in place (no
    decoded copy, no float64 blocks); other dtypes through decode_tile."""
    if original.dtype != np.float32:
        return _block_error(original, _as_restored(codec.decode_tile(enc, tile), original.dtype),
                            kept)
    return codec.tile_error(enc, tile, original, kept)


def _block_error(original: np.ndarray, decoded: np.ndarray, kept) -> float:
    """Σ (original - decoded)² in float64 blocks of ERROR_CHUNK, ``kept`` positions excluded."""
    total = 0.0
    for block in _blocks(original.shape, ERROR_CHUNK):
        diff = original[block].astype(np.float64).reshape(-1)
        with np.errstate(invalid="ignore"):   # inf - inf at kept positions, zeroed below
            np.subtract(diff, decoded[block].astype(np.float64).reshape(-1), out=diff)
        if kept is not None:
            diff[kept[block].reshape(-1)] = 0.0
        total += _sum_of_squares(diff)
    return total


def _sum_of_squares(v: np.ndarray) -> float:
    """Σ v² of a 1-D float64 block by numpy's own loop, not BLAS's dot: with
    BLAS threads on a busy machine the dot was 20x slower (0.12 s against
    6 ms for 16 MiB on 2 shared cores) and its sum depended on the thread count."""
    return float(np.einsum("i,i->", v, v))


def _blocks(shape, size: int):
    """Indices cutting an array of ``shape`` into C-order blocks of at most
    ``size`` elements (whole trailing axes where they fit)."""
    inner, axis = 1, len(shape)
    while axis > 0 and inner * shape[axis - 1] <= size:
        axis -= 1
        inner *= shape[axis]
    if axis == 0:
        yield ...
        return
    step = max(1, size // inner)
    for lead in np.ndindex(*shape[:axis - 1]):
        for start in range(0, shape[axis - 1], step):
            yield (*lead, slice(start, start + step))


def finite_norm2(x, excluded=None) -> float:
    """Squared norm of the finite values of ``x`` (NaN and infinities, kept
    exactly in the side list, would make any relative error meaningless),
    without the flat positions ``excluded`` (optional) either."""
    values = np.asarray(x).reshape(-1)
    skip = codec.index_mask(excluded, values.shape)
    total = 0.0
    for start in range(0, values.size, ERROR_CHUNK):
        block = values[start:start + ERROR_CHUNK].astype(np.float64)
        if skip is not None:
            block[skip[start:start + ERROR_CHUNK]] = 0.0
        square = _sum_of_squares(block)
        if not math.isfinite(square):   # rare: mask only the blocks that need it
            block[~np.isfinite(block)] = 0.0
            square = _sum_of_squares(block)
        total += square
    return total


def prepared_norm2(p: codec.Prepared) -> float:
    """:func:`finite_norm2` of ``p.original`` without its side list's
    positions: the squares the native statistics pass counted when it
    prepared ``p`` (a leaf without special values or a side list), else a
    float64 pass over the leaf."""
    squares = p.scales.get("squares")   # in weight units unless balanced
    if squares is not None and p.outliers is None and not p.balanced:
        return float(squares)
    return finite_norm2(p.original, None if p.outliers is None else p.outliers.index)


def relative_error(x, enc: codec.EncodedTensor) -> float:
    """``||x - decode(enc)|| / ||x||`` over the finite values (0 when both are zero)."""
    original = x.original if isinstance(x, codec.Prepared) else x
    norm = math.sqrt(finite_norm2(original))
    err = math.sqrt(squared_error(x, enc))
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)


# ----------------------------------------------------------------------------
# Error bound
# ----------------------------------------------------------------------------

class BoundUnreachable(ValueError):
    """No coding of a tensor meets the error bound asked for."""


def encode_for_error(x, rel_rms: float, *, bits: int | None = None, row_weight=None,
                     layer_axis: int | None = None, **options) -> codec.EncodedTensor:
    """The smallest coding of ``x`` with ``||x - x̂|| / ||x|| <= rel_rms``, x̂ decoded;
    ``layer_axis``: that of each layer along it instead (a stacked leaf,
    :mod:`jaxjpeg.stacks`, bounded as its layers would be one by one).

    ``x``: an array or :func:`prepare_leaf`'s result. Binary-searches the
    integer step (errors are measured by decoding), starting where a probe
    of the tensor predicts. With ``bits=None`` 8-bit samples are tried first
    and 12-bit ones as well when 8-bit needs steps under 8 (rounding-
    dominated) or cannot meet the bound; the smaller coding wins. Bounds too
    tight for one shared scale (12-bit rounding of a tensor with far
    outliers) fall back to per-row ranges (``clip="minmax"``), at 12 bits
    unless ``bits=8`` was asked for. Raises ValueError if no step meets it.
    """
    if not rel_rms > 0:
        raise ValueError(f"rel_rms must be positive, got {rel_rms}")
    p = _as_prepared(x, row_weight)
    original = np.asarray(p.original)
    # Relative to the values coded, not to those kept exactly (found by review:
    # one kept 1e4 in a leaf of N(0, 1) let the rest restore at error 0.998,
    # within 0.05 of the whole leaf's norm). A bound on the coded values
    # bounds the whole leaf's error too.
    budget = rel_rms * rel_rms * prepared_norm2(p)
    measure = encode_measured if layer_axis is None else _layers_measure(p, layer_axis)
    found = []
    for b in ((8, 12) if bits is None else (bits,)):
        if bits is None and b == 8 and _first_step(p, 8, budget, options) < MIN_STEP_8BIT:
            continue   # rounding-dominated at 8 bits: 12-bit samples code it (step_for)
        best = _largest_step_within(p, b, budget, options, measure)
        if best is not None:
            found.append(best)
            if b == 8 and best[0] >= MIN_STEP_8BIT:
                break
    if not found:
        fallback = dataclasses.replace(codec.prepare(original, view=p.view, outliers=p.outliers),
                                       tile_cuts=p.tile_cuts)
        best = _largest_step_within(fallback, bits or 12, budget, dict(options, clip="minmax"),
                                    measure)
        if best is not None:
            return best[1]
        raise BoundUnreachable(f"no step meets relative error {rel_rms} (bits={bits})")
    return min(found, key=lambda item: item[1].nbytes)[1]


def _layers_measure(p: codec.Prepared, axis: int):
    """An :func:`encode_measured` whose error is the largest of the layers'
    along ``axis`` relative to their own squared norms, times the leaf's:
    within a budget of bound² times the leaf's squared norm, every layer is
    within the bound (found by review: bounded as a whole, a layer holding
    most of the energy in a few loud rows let the others restore at 2-3x
    the bound). Summed tile by tile from each tile decoded alone (a decoded
    copy of a large stack was a leaf beyond the save); layers too small to
    code (RMS under 2^-90, which a leaf of their own would store raw) are
    not held to it (review: one such layer sent the whole stack raw, 5.8x)."""
    from jaxjpeg.checkpoint import MIN_CODED_RMS

    original = np.asarray(p.original)
    matrix = views.read_matrix(original, p.view)
    side = 0 if axis in p.view.row_axes() else 1
    axes = (p.view.row_axes(), p.view.col_axes())[side]
    layer_of = np.unravel_index(np.arange(p.view.matrix_shape(original.shape)[side]),
                                [original.shape[a] for a in axes])[axes.index(axis)]
    layers = original.shape[axis]
    kept = views.layer_positions(original.shape, axis,
                                 None if p.outliers is None else p.outliers.index)
    norms = np.array([finite_norm2(np.take(original, layer, axis=axis), kept.get(layer))
                      for layer in range(layers)])
    held = norms > MIN_CODED_RMS ** 2 * (original.size // max(1, layers))
    total = float(norms.sum())

    def measure(prepared, bits, delta, **options):
        enc = encode_with_step(prepared, bits, delta, **options)
        cells = (None if enc.outliers is None or not enc.outliers.count
                 else enc.view.cells(original.shape, enc.outliers.index))

        def tile_errors(tile):
            rows = slice(tile.row0, tile.row0 + tile.height)
            cols = slice(tile.col0, tile.col0 + tile.width)
            decoded = _as_restored(codec.decode_tile(enc, tile), original.dtype)
            with np.errstate(invalid="ignore"):
                diff = np.asarray(matrix[rows, cols], np.float64) - decoded.astype(np.float64)
            if cells is not None:   # the side list's values count 0
                inside = ((cells[0] >= tile.row0) & (cells[0] < rows.stop)
                          & (cells[1] >= tile.col0) & (cells[1] < cols.stop))
                diff[cells[0][inside] - tile.row0, cells[1][inside] - tile.col0] = 0.0
            diff[~np.isfinite(diff)] = 0.0
            squares = diff * diff
            at = layer_of[rows] if side == 0 else layer_of[cols]
            return np.bincount(at, squares.sum(axis=1 - side), minlength=layers)
        errors = sum(codec.tile_pool().map(tile_errors, enc.tiles))
        relative = np.where(norms > 0, errors / np.where(norms > 0, norms, 1.0),
                            np.where(errors > 0, math.inf, 0.0))
        worst = float(relative[held].max()) if held.any() else 0.0
        return enc, worst * total
    return measure


def _largest_step_within(p: codec.Prepared, bits, budget, options, measure=None):
    """(Δ, encoding) with the largest Δ whose squared error <= budget, or
    None; ``measure``: (encoding, error) of a step, :func:`encode_measured`
    by default."""
    limit = STEP_LIMIT[bits]
    kept = {}       # the coding of the largest delta within the budget, alone (memory)
    measure = measure or encode_measured

    def error_at(delta) -> float:
        enc, error = measure(p, bits, delta, **options)
        if error <= budget and delta > max(kept, default=0):
            kept.clear()
            kept[delta] = enc
        return error

    # Uniform quantization: squared error ≈ n q² / 12; start there. Then each
    # measured error predicts the step that meets the budget (error ∝ Δ² near
    # it): two or three codings instead of a bracket-and-bisect's five to
    # eight. Steps stay inside (largest good, smallest bad), so it ends; past
    # SECANT_TRIALS it bisects, in case the error is far from ∝ Δ².
    delta = _first_step(p, bits, budget, options)
    good, bad = 0, limit + 1
    for trial in itertools.count():
        error = error_at(delta)
        if error <= budget:
            good = delta
        else:
            bad = delta
        if bad - good <= 1 or (good == delta and (error >= (1 - BOUND_SLACK) * budget
                                                  or _next_step_misses(delta, error, budget))):
            break
        if trial < SECANT_TRIALS:
            aim = (1 - BOUND_SLACK / 2) * budget   # inside the slack: usually the last trial
            predicted = delta * math.sqrt(aim / error) if error > 0 else math.inf
            delta = int(max(good + 1, math.floor(min(predicted, bad - 1))))
            if delta == good:   # predicted at the largest good: try the next one up
                delta = good + 1
        else:
            delta = (good + bad) // 2
    return (good, kept[good]) if good else None


def _next_step_misses(delta: int, error: float, budget: float) -> bool:
    """Whether step ``delta + 1`` surely exceeds the budget that ``delta``
    (squared error ``error``) meets, so it need not be coded. The error per
    sample is about (Δ² + 1) / 12 in sample units (coding noise plus the
    decoder's rounding): from Δ to Δ + 1 this predicted the measured error
    within 3.5% on the benchmark tree's and EfficientNet-lite1's leaves
    (12-bit Δ 3..40, 8-bit Δ 8..20), except 8-bit codings of leaves whose
    range outlier columns set (up to 19% too high: a step coded finer than
    it might be, never a bound missed)."""
    predicted = error * ((delta + 1) ** 2 + 1) / (delta * delta + 1)
    return predicted > (1 + NEXT_STEP_MARGIN) * budget


def _first_step(p: codec.Prepared, bits, budget, options) -> int:
    """The step uniform quantization predicts for the budget (squared error ≈
    n q² / 12), aimed inside BOUND_SLACK."""
    if options.get("clip", "common") == "common":
        base = base_scale(p, bits)
    else:  # per-row ranges: a typical row's scale
        m = p.matrix
        base = float(np.median(m.max(axis=1) - m.min(axis=1))) / mapping.sample_max(bits) or 1.0
    target_rms = math.sqrt((1 - BOUND_SLACK / 2) * budget / max(1, p.size))
    return int(min(STEP_LIMIT[bits], max(1, math.floor(target_rms * math.sqrt(12) / base))))


SECANT_TRIALS = 4
# A step whose error is this close under the budget is taken without closing
# the bracket: the largest step within it is at most ~2.5% larger (error ∝
# Δ²), about 1% of the bytes, and the search saves one or two codings.
BOUND_SLACK = 0.05
NEXT_STEP_MARGIN = 0.06


# ----------------------------------------------------------------------------
# Rate–distortion curves from a probe
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Curve:
    """Predicted (bytes, squared error) of one tensor at each candidate step."""

    bits: np.ndarray    # int [k]
    delta: np.ndarray   # int [k]
    q: np.ndarray       # float [k], weight-domain step
    nbytes: np.ndarray  # float [k], whole tensor, side bytes included
    sse: np.ndarray     # float [k], whole tensor
    # bool [k]: coded with per-row ranges (:func:`row_range_fallback`); None: none is
    row_ranges: np.ndarray | None = None
    # float [1]: the coded values' squared norm about their rows' means
    # (spread_rms; see capped_curves); None: unknown
    norm2: np.ndarray | None = None
    # bool [k]: quantized on step q and Rice coded (see thin_curve); None: none is
    thin: np.ndarray | None = None

    def from_candidate(self, k: int) -> "Curve":
        """The curve without its candidates coarser than ``k``."""
        return self.taken(slice(k, None))

    def taken(self, index) -> "Curve":
        """The curve's candidates at ``index`` (a slice or a mask)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
            if f.name != "norm2" and getattr(self, f.name) is not None})


def merged_curve(a: Curve, b: Curve) -> Curve:
    """The candidates of two codings of one tensor (e.g. JPEG's and a
    sparse leaf's thin coding) as one curve: by bytes, each kept only where
    it errs less than every smaller one (the allocator then picks either
    coding at every size; found by review: a pruned leaf given only its
    sparse coding's curve made targets JPEG met fail, and worse at 16x)."""
    def flags(c: Curve, name: str) -> np.ndarray:
        value = getattr(c, name)
        return np.zeros(len(c.nbytes), bool) if value is None else value

    joined = {f.name: np.concatenate([flags(a, f.name), flags(b, f.name)])
              if f.name in ("row_ranges", "thin") else
              np.concatenate([getattr(a, f.name), getattr(b, f.name)])
              for f in dataclasses.fields(Curve) if f.name != "norm2"}
    order = np.argsort(joined["nbytes"], kind="stable")
    best, keep = math.inf, []
    for k in order:
        if joined["sse"][k] < best:
            best = joined["sse"][k]
            keep.append(k)
    return Curve(**{name: values[keep] for name, values in joined.items()}, norm2=a.norm2)


# A data-free byte target gives no leaf a relative RMS error above the first
# of these that the budget allows every leaf: weighted by size^0.3, the
# largest leaf of a tree was let go to ~1 (found by review: one 2048x2048
# leaf beside 1000 of 64x64, at 12x / 16x: 0.86 / 0.98, the others 0.12 /
# 0.14). No leaf of EfficientNet-lite1 or PP-OCRv6 comes near 0.5 at 4-10x
# (the largest, lite1's classifier at 10x: 0.37).
LEAF_ERROR_CAPS = (0.5, 0.7, 0.9)
# A cap is taken where its coarsest candidates fit this fraction of the budget:
# probes predict the coarsest steps' bytes up to ~10% low (found by review: a
# cap whose predicted floor just fit could not be met, 24x landed at 21.9x).
CAP_MARGIN = 0.9


def capped_curves(curves: Mapping[str, Curve], budget: float) -> dict:
    """``curves`` without the candidates erring beyond the first of
    LEAF_ERROR_CAPS whose remaining coarsest candidates fit ``budget`` (each
    curve keeps at least its finest; see CAP_MARGIN); ``curves`` as they are
    if none does."""
    for cap in LEAF_ERROR_CAPS:
        capped = {name: _capped(c, cap) for name, c in curves.items()}
        if sum(float(c.nbytes.min()) for c in capped.values()) <= CAP_MARGIN * budget:
            return capped
    return dict(curves)


def _capped(c: Curve, cap: float) -> Curve:
    if c.norm2 is None:
        return c
    within = c.sse <= cap * cap * float(c.norm2[0])
    return c.from_candidate(int(np.argmax(within)) if within.any() else len(c.sse) - 1)


@dataclasses.dataclass
class _Probe:
    """Patches of a tensor's view (8 rows each), stacked, with what decodes them."""

    matrix: np.ndarray       # float32 [8 * patches, width]
    rows: np.ndarray         # the view row of each probe row
    col_scale: np.ndarray | None   # float32, probe-shaped (None: no column scales)
    fraction: float          # probe elements / tensor elements
    stats: tuple             # mapping.row_stats of the matrix, once for every step


def probe_elements(size: int, total: int) -> int:
    """Weights in the probe of a leaf of ``size`` among ``total`` allocated
    (see PROBE_FULL_SHARE)."""
    share = size / max(1, total)
    if share >= PROBE_FULL_SHARE:
        return PROBE_ELEMENTS
    return max(MIN_PROBE_ELEMENTS, int(PROBE_ELEMENTS * math.sqrt(share / PROBE_FULL_SHARE)))


def _probe(p: codec.Prepared, rng: np.random.Generator, elements: int = PROBE_ELEMENTS) -> _Probe:
    """Stratified over rows: one patch of 8 rows at a random column offset per
    8-row band (bands sampled when there are too many), so rows of every
    scale are represented; patch width fills about ``elements``. Its errors
    are in weight units (a balanced leaf's: its own)."""
    rows, cols = p.matrix.shape
    units = p.coded_units()
    if p.size <= 2 * elements:
        col = None if units is None else np.broadcast_to(units, p.matrix.shape)
        return _Probe(p.matrix, np.arange(rows), col, 1.0, p.row_stats())
    bands = -(-rows // 8)
    width = int(min(cols, max(MIN_PROBE_WIDTH, elements // (8 * bands) // 8 * 8)))
    count = min(bands, max(1, elements // (8 * width)))
    chosen = np.sort(rng.choice(bands, size=count, replace=False))
    # One column offset drawn per band, in band order; the patches are then
    # gathered at once (a slice and a copy per band cost more than coding them).
    offsets = 8 * rng.integers(0, (cols - width) // 8 + 1, size=len(chosen))   # as drawn one by one
    row_ids = (8 * chosen[:, None] + np.arange(8)).reshape(-1)
    starts = np.repeat(offsets, 8)
    inside = row_ids < rows   # the last band may have fewer than 8 rows
    row_ids, starts = row_ids[inside], starts[inside]
    col_ids = starts[:, None] + np.arange(width)
    matrix = _patches(p.matrix, chosen, offsets, row_ids, starts, width)
    return _Probe(matrix, row_ids, None if units is None else units[col_ids],
                  matrix.size / p.size, mapping.row_stats(matrix, p.shared_map))


def _patches(m: np.ndarray, bands, offsets, row_ids, starts, width: int) -> np.ndarray:
    """``m[row_ids[i], starts[i]:starts[i] + width]`` stacked (8-row band
    ``bands[j]`` from column ``offsets[j]``), read through windows of ``m``
    (4-7x faster than an index per element): row windows of a row-major
    view; (width x 8) blocks of a transposed one's rows, 8 values apart."""
    windows = np.lib.stride_tricks.sliding_window_view
    if m.flags.c_contiguous:
        return windows(m, width, axis=1)[row_ids, starts]
    if m.T.flags.c_contiguous and 8 * len(bands) == len(row_ids):   # every band whole
        blocks = windows(m.T, (width, 8))[offsets, 8 * bands]   # [band, column, row]
        return np.ascontiguousarray(blocks.transpose(0, 2, 1)).reshape(-1, width)
    return m[row_ids[:, None], starts[:, None] + np.arange(width)]


def reach_of(target_bytes: int, weights: int) -> float:
    """The ``reach`` of :func:`rd_curve` under a byte target: REACH times the
    file's average bits/weight."""
    return REACH * 8 * target_bytes / max(1, weights)


def rd_curve(p: codec.Prepared, bits: int | None = None, *, seed: int = 0,
             reach: float | None = None, floor: bool = True,
             probe_size: int = PROBE_ELEMENTS, row_ranges: bool = True, **options) -> Curve:
    """Measures bytes and squared error of ``p`` on a probe at each ladder step.

    Large tensors are probed on random 8-row patches (about ``probe_size``
    weights, see :func:`probe_elements`), coded with the whole tensor's row
    scales; small ones whole.

    ``reach`` (bits/weight, optional): the most a byte target may give the
    tensor; the ladder's finest steps beyond it are left out (see
    LADDER_HEADROOM), and with ``floor`` its coarsest ones under a fraction
    of it (see LADDER_FLOOR); with ``row_ranges``, per-row ranges too
    (:func:`with_row_ranges`).
    """
    probe = _probe(p, np.random.default_rng(seed), probe_size)
    steps = _ladder_steps(p, reference_rms(p), bits)
    first, costs = _ladder_costs(p, probe, steps, reach, floor, options)
    least = LADDER_FLOOR * reach if floor and reach is not None else 0.0
    steps, costs = _bends_measured(p, probe, steps[first:first + len(costs)], costs, bits,
                                   least, options)
    points = [(b, delta, delta * base_scale(p, b), nbytes, sse)
              for (b, delta), (nbytes, sse) in zip(steps, costs)]
    # With error feedback step 1 is not widened: the decoder's rounding of
    # samples, which feedback cannot shape, is then as large as the step
    # (found by review: widened, output error +13-21% at 3x for 3.5% more
    # bytes than step 2).
    b, delta, q, nbytes, sse = _densify(points, {8: base_scale(p, 8), 12: base_scale(p, 12)},
                                        widen_from=1 if p.feedback is None else 2)
    curve = Curve(b, delta, q, nbytes + p.side_bytes(), sse / probe.fraction)
    return (with_row_ranges(p, curve, seed=seed, reach=reach, probe_size=probe_size, **options)
            if row_ranges else curve)


def with_row_ranges(p: codec.Prepared, curve: Curve, *, seed: int = 0,
                    reach: float | None = None, probe_size: int = PROBE_ELEMENTS,
                    **options) -> Curve:
    """``curve`` (:func:`rd_curve`'s without row ranges, the same arguments)
    followed by per-row-range codings (:func:`row_range_fallback`) where it
    reached the shared scale's finest step, under ``reach``."""
    finest = 8 * float(curve.nbytes[-1]) / max(1, p.size)   # bits/weight
    if ((int(curve.bits[-1]), int(curve.delta[-1])) != (12, 1)
            or (reach is not None and finest >= reach)):
        return curve
    fallback = row_range_fallback(p)
    return curve if fallback is None else _with_row_ranges(curve, fallback, seed, probe_size,
                                                           options)


def under_row_range_mix(thin: Curve, curve: Curve) -> Curve | None:
    """``thin`` without its candidates between ``curve``'s shared scale's
    finest and its first per-row-range candidate (:func:`with_row_ranges`)
    that err more than those two mixed by row bands would at their bytes
    (on the chord between them); None where none is left. Found by
    review: taken there instead of the mix, a kernel whose rows spread
    1000x alone in its tree erred 35% more at 3.9x (now as before); at
    3.8x in the framework's view, its step under the chord, still 22%
    more than the mix, which takes the bands that gain most first."""
    ranges = np.flatnonzero(curve.row_ranges) if curve.row_ranges is not None else []
    if not len(ranges) or ranges[0] == 0:
        return thin
    b0, b1 = curve.nbytes[ranges[0] - 1], curve.nbytes[ranges[0]]
    e0, e1 = curve.sse[ranges[0] - 1], curve.sse[ranges[0]]
    if b1 <= b0:
        return thin
    # (a leaf coded before the last reaches the chord, the allocator taking
    # either end; the last mixes the bands that gain most first, under it)
    chord = e0 + (thin.nbytes - b0) / (b1 - b0) * (e1 - e0)
    keep = (thin.nbytes <= b0) | (thin.nbytes >= b1) | (thin.sse < chord)
    return thin.taken(keep) if keep.any() else None


def errs_less_at_finest(thin: Curve, curve: Curve) -> bool:
    """Whether a ``thin`` curve has a candidate that errs less than
    ``curve``'s finest in as many bytes or fewer."""
    within = thin.nbytes <= curve.nbytes[-1]
    return bool(within.any() and thin.sse[within].min() < curve.sse[-1])


def _ladder_costs(p: codec.Prepared, probe: _Probe, steps: list, reach: float | None,
                  floor: bool, options) -> tuple[int, list]:
    """(first, :func:`_probe_costs` of ``steps[first:first + len(costs)]``):
    the ladder's steps, coarse to fine; with a ``reach``, the steps finer
    than the first whose probe costs more than LADDER_HEADROOM times it are
    left out (the finest steps cost the most to code, and no allocation
    within the reach picks them), and those coarser than the finest one
    under LADDER_FLOOR times it (with ``floor``, see LADDER_FLOOR)."""
    if reach is None or len(steps) <= LADDER_FIRST:
        return 0, _probe_costs(p, probe, steps, options)

    def bits(cost) -> float:   # whole-tensor bytes -> bits/weight
        return 8 * cost[0] / max(1, p.size)

    least = LADDER_FLOOR * reach if floor else 0.0
    first = _predicted_floor(p, steps, least) if floor else 0
    costs = _probe_costs(p, probe, steps[first:LADDER_FIRST], options)
    while first > 0 and bits(costs[0]) >= least:   # predicted too fine: extend
        start = max(0, first - LADDER_BATCH)
        costs = _probe_costs(p, probe, steps[start:first], options) + costs
        first = start
    for k in range(LADDER_FIRST, len(steps), LADDER_BATCH):
        if bits(costs[-1]) > LADDER_HEADROOM * reach:
            break
        costs += _probe_costs(p, probe, steps[k:k + LADDER_BATCH], options)
    return first, costs


# Between two ladder steps (an octave apart) whose probes' bytes differ more
# than this, the curve bends (coefficients stop rounding to zero), which no
# interpolation between the two follows: steps a quarter octave apart are
# measured there too. Found by review: a 512 x 512 Gaussian leaf at 0.5-1
# bits/weight cost up to 1.47x the bytes interpolated (and erred more), so
# byte targets of 24-64x missed by 9-23%. Measured steps an octave apart
# differ by 1.3-2x in bytes at 2-8 bits/weight: only the coarsest steps bend.
# A bend wholly under the ladder's floor (see LADDER_FLOOR) is left as it is:
# the budget gives the leaf more than that (at 8x, most of the bends of
# benchmarks/rate_control.py's tree: 22% more probe codings measured them).
BEND_BYTES_RATIO = 3.0
BEND_POINTS = 3


def _bends_measured(p: codec.Prepared, probe: _Probe, steps: list, costs: list,
                    bits: int | None, least: float, options) -> tuple[list, list]:
    """``steps`` and their ``costs`` (coarse to fine) with BEND_POINTS steps
    measured between each two whose bytes differ more than BEND_BYTES_RATIO,
    where the finer reaches ``least`` bits/weight."""
    out_steps, out_costs = steps[:1], costs[:1]
    for step, cost in zip(steps[1:], costs[1:]):
        before = out_costs[-1][0]
        if (0 < before and cost[0] > BEND_BYTES_RATIO * before
                and 8 * cost[0] >= least * p.size):
            coarse, fine = (d * base_scale(p, b) for b, d in (out_steps[-1], step))
            between = [step_for(p, q, bits) for q in
                       np.geomspace(coarse, fine, BEND_POINTS + 2)[1:-1]]
            between = [s for s in dict.fromkeys(between) if s not in (out_steps[-1], step)]
            if between:
                out_steps += between
                out_costs += _probe_costs(p, probe, between, options)
        out_steps.append(step)
        out_costs.append(cost)
    return out_steps, out_costs


def floors_exceed(curves: Mapping[str, Curve], budget: float) -> bool:
    """Whether curves measured with LADDER_FLOOR cannot meet ``budget`` bytes
    even at their coarsest candidates (small leaves: their headers and maps):
    they are then measured again down to the ladder's coarsest steps."""
    return sum(float(c.nbytes.min()) for c in curves.values()) > budget


def _predicted_floor(p: codec.Prepared, steps: list, floor: float) -> int:
    """The finest of the ladder's first LADDER_FIRST - LADDER_BATCH + 1 steps
    whose bits/weight log2(rms / q) + GAUSSIAN_BITS is under ``floor`` (0
    when none is): where the ladder's coding starts."""
    rms = reference_rms(p)
    first = 0
    for i, (b, delta) in enumerate(steps[:LADDER_FIRST - LADDER_BATCH + 1]):
        q = delta * base_scale(p, b)
        if q > 0 and math.log2(rms / q) + GAUSSIAN_BITS < floor:
            first = i
    return first


def row_range_fallback(p: codec.Prepared) -> codec.Prepared | None:
    """``p`` prepared again for per-row ranges (``clip="minmax"``: its side
    list, without row weights or column scales) when the ranges of its rows,
    or of its columns, spread more than ROW_RANGE_SPREAD; else None. Columns
    that spread become the rows (the view transposed). Error feedback and
    row weights keep their shared scale."""
    if p.feedback is not None or p.row_weight is not None or p.shared_map:
        return None
    _, low, high = p.row_stats()
    rows = _spread(np.asarray(high, np.float64) - low)
    sample = p.matrix[::max(1, p.matrix.shape[0] // SPREAD_SAMPLE_ROWS)]   # columns' ranges
    cols = _spread(np.ptp(p.weight_domain(sample), axis=0))
    if max(rows, cols) < ROW_RANGE_SPREAD:
        return None
    view, cuts = p.view, p.tile_cuts
    if cols > rows:   # the transposed matrix: rows and cuts swap places
        k = p.view.split
        view = views.MatrixView(p.view.perm[k:] + p.view.perm[:k], len(p.view.perm) - k)
        cuts = None if cuts is None else (cuts[1], cuts[0])
    # A view of the weights, not a copy: the tensor's own prepared copy is
    # held meanwhile, and a second one is what made a byte target's peak.
    return dataclasses.replace(codec.prepare(p.original, view=view, outliers=p.outliers,
                                             copy=False), tile_cuts=cuts)


def _spread(spans: np.ndarray) -> float:
    """Widest over median of the positive ``spans`` (0 with fewer than two)."""
    spans = np.asarray(spans, np.float64)
    spans = spans[spans > 0]
    return float(spans.max() / np.median(spans)) if spans.size >= 2 else 0.0


def _with_row_ranges(curve: Curve, fallback: codec.Prepared, seed: int, elements: int,
                     options) -> Curve:
    """``curve`` followed by the per-row-range codings that err less than its
    finest candidate (the shared scale's finest step)."""
    probe = _probe(fallback, np.random.default_rng(seed), elements)
    _, scale, offset = mapping.row_affine(fallback.matrix, 12, clip="minmax", with_samples=False)
    maps = {12: (scale[probe.rows], offset[probe.rows])}
    steps = [(12, d) for d in ROW_RANGE_DELTAS]
    costs = _probe_costs(fallback, probe, steps, options, maps=maps)
    base = float(np.exp(np.mean(np.log(np.where(scale > 0, scale, 1.0)))))
    points = [(12, d, d * base, nbytes, sse / probe.fraction) for d, (nbytes, sse)
              in zip(ROW_RANGE_DELTAS, costs) if sse / probe.fraction < curve.sse[-1]]
    if not points:
        return curve
    # integer steps: clip="minmax" codings take no widening (found by review:
    # every widened candidate coded as its integer step, 24.5% under at 3.2x)
    b, delta, q, nbytes, sse = _densify(points, {12: base}, widen_from=None)
    finer = np.ones(len(b), bool)
    return Curve(np.concatenate([curve.bits, b]), np.concatenate([curve.delta, delta]),
                 np.concatenate([curve.q, q]),
                 np.concatenate([curve.nbytes, nbytes + fallback.side_bytes()]),
                 np.concatenate([curve.sse, sse]),
                 np.concatenate([np.zeros(len(curve.bits), bool), finer]))


def _mixed_tiles(fits: codec.EncodedTensor, over: codec.EncodedTensor, left: int,
                 p: codec.Prepared | None = None, overshoot: int = 0) -> codec.EncodedTensor:
    """``fits`` with as many of its tiles replaced by ``over``'s (the same
    tensor at a finer step) as come nearest to ``left`` bytes, at most
    ``overshoot`` over (_taken_groups).
    Each tile is a JPEG stream with its own tables, so the last tensor of a
    byte target can land between two adjacent steps: at 12-bit steps 3 and 4
    a 1152 x 256 kernel's codings are 5% apart, and with it coded last a
    small network's file came out 3.6% under its target. Both codings must
    share their view, tile grid, column scales and side list (_mixable).
    They mix tile by tile on the same row maps; on different ones (a per-row
    range coding and a shared scale's) by whole row bands, each band with
    its own coding's maps. Error-feedback codings (``p``'s feedback) mix by
    whole output bands (_output_band): a tile's errors were shaped against
    the rounding of the tiles before it along its inputs, not of others."""
    fits, over = _unfitted(fits), _unfitted(over)   # fitted again once mixed
    same_maps = (np.array_equal(fits.row_scale, over.row_scale)
                 and np.array_equal(fits.row_offset, over.row_offset))
    feedback = p is not None and p.feedback is not None
    if not _mixable(fits, over) or (feedback and p.feedback.along_rows and not same_maps):
        return codec.fit_rows(fits)
    groups: dict = {}
    for i, t in enumerate(fits.tiles):
        cell = (t.row0, t.col0, t.height, t.width)
        key = _output_band(p, cell) if feedback else i if same_maps else (t.row0, t.height)
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    gains = [sum(len(over.tiles[i].data) - len(fits.tiles[i].data) for i in m) for m in members]
    room = left - fits.nbytes
    for _ in range(4):
        taken = _taken_groups(gains, room, overshoot)
        mixed = codec.fit_rows(_with_groups(fits, over, [members[g] for g in taken]))
        if mixed.nbytes <= left + overshoot:
            return mixed
        # the maps' stored bytes, which the gains leave out, taken from the
        # room (found by review: per-row maps took 6 KB more than a shared
        # scale's, and a mix of every band, over by them, was dropped for
        # no mix at all, where three bands landed within 0.02%)
        room = left - fits.nbytes - (mixed.nbytes - fits.nbytes - sum(gains[g] for g in taken))
    return codec.fit_rows(fits)


def _unfitted(enc: codec.EncodedTensor) -> codec.EncodedTensor:
    """``enc`` on the maps chosen before its coding (codec.fit_rows)."""
    if enc.base_maps is None:
        return enc
    return dataclasses.replace(enc, row_scale=enc.base_maps[0], row_offset=enc.base_maps[1],
                               base_maps=None)


def _with_groups(fits: codec.EncodedTensor, over: codec.EncodedTensor,
                 taken) -> codec.EncodedTensor:
    """``fits`` with the tiles (and their rows' maps) of the groups of tile
    indices ``taken`` from ``over``."""
    tiles = list(fits.tiles)
    scale, offset = np.array(fits.row_scale), np.array(fits.row_offset)
    for group in taken:
        for i in group:
            tiles[i] = t = over.tiles[i]
            rows = slice(t.row0, t.row0 + t.height)
            scale[rows], offset[rows] = over.row_scale[rows], over.row_offset[rows]
    return dataclasses.replace(fits, tiles=tuple(tiles), row_scale=scale, row_offset=offset)


def _mixable(a: codec.EncodedTensor, b: codec.EncodedTensor) -> bool:
    """Whether two codings of a tensor share what their tiles are decoded
    with but the row maps: bits, view, tile grid, column scales, side list."""
    return (a.bits == b.bits and a.view == b.view and len(a.tiles) == len(b.tiles)
            and all((s.row0, s.col0, s.height, s.width) == (t.row0, t.col0, t.height, t.width)
                    for s, t in zip(a.tiles, b.tiles))
            and np.shape(a.row_scale) == np.shape(b.row_scale)
            and np.array_equal(a.col_scale, b.col_scale)   # both None too
            and (a.outliers is None) == (b.outliers is None)
            and (a.outliers is None or (np.array_equal(a.outliers.index, b.outliers.index)
                                        and np.array_equal(a.outliers.values, b.outliers.values,
                                                           equal_nan=True))))


EXACT_GROUPS = 12   # up to this many groups every subset is tried


def _taken_groups(gains: list, room: int, overshoot: int = 0) -> list:
    """Indices of ``gains`` whose sum comes nearest to ``room`` (at most
    ``overshoot`` over it; the smaller at equal distance): of every subset
    for a few groups (a kernel cut into 4 output bands of 34, 32, 14 and 20%
    landed 2.1% under by taking the largest first), else the largest first
    within ``room``."""
    if len(gains) <= EXACT_GROUPS:
        sums = np.zeros(1, np.int64)
        for gain in gains:   # bit g of a subset's index: group g taken
            sums = np.concatenate([sums, sums + gain])
        miss = np.where(sums > room + overshoot, np.inf, np.abs(sums - room) + (sums > room) * 0.5)
        best = int(np.argmin(miss))
        return [g for g in range(len(gains)) if best >> g & 1]
    taken = []
    for gain, g in sorted(zip(gains, range(len(gains))), reverse=True):
        if 0 < gain <= room:
            taken.append(g)
            room -= gain
    return taken


def _output_band(p: codec.Prepared, cell) -> tuple[int, int]:
    """The outputs (start, count) of the tile ``cell`` (row0, col0, height,
    width) of ``p``'s feedback coding: feedback moves an output's rounding
    errors onto its own later inputs only, so the tiles of one band depend
    on no other band's coding."""
    row0, col0, height, width = cell
    return (col0, width) if _output_side(p) else (row0, height)


MIXING_BANDS = 6           # bands a tensor settled between two steps may be cut into
BAND_COST_SHARE = 0.01     # ... when their extra tiles cost at most this share of its bytes


def _output_side(p: codec.Prepared) -> int:
    """The side of ``p``'s view (0: rows, 1: columns) along which its
    feedback coding's outputs lie."""
    return 1 if p.feedback.along_rows else 0


def _in_bands(p: codec.Prepared, side: int, enc: codec.EncodedTensor, tile_shape,
              gains: np.ndarray | None = None) -> codec.Prepared:
    """``p`` with tile edges cutting its ``side`` (0: rows, 1: columns) into
    up to MIXING_BANDS bands holding 1/2, 1/4, ..., 1/2^(n-1), 1/2^(n-1) of
    it, as many as cost at most BAND_COST_SHARE of its coding ``enc``'s bytes
    in extra tiles (_tile_cost), so a byte target can mix its codings at two
    steps band by band (_mixed_tiles) in steps of the smallest band; as it
    is when no cut pays. ``gains`` (per 8 lines of the side, e.g.
    _block_row_gains) share the bands out instead of the lines' count."""
    length = p.matrix.shape[side]
    blocks = -(-length // 8)
    weight = np.ones(blocks) if gains is None else np.maximum(np.asarray(gains, np.float64), 0)
    if not weight.sum() > 0:
        return p
    share = np.cumsum(weight) / weight.sum()
    uniform = len(p.tiles(tile_shape))
    for bands in range(MIXING_BANDS, 1, -1):
        at = np.searchsorted(share, [1 - 0.5 ** i for i in range(1, bands)], side="left")
        cuts = {min(length, 8 * (int(i) + 1)) for i in at} - {0, length}   # after block i
        tile_cuts = list(p.tile_cuts)
        tile_cuts[side] = tuple(sorted({*tile_cuts[side], *cuts}))
        if min(np.diff([0, *tile_cuts[side], length])) < codec.MIN_CUT_PIECE:
            continue
        banded = dataclasses.replace(p, tile_cuts=tuple(tile_cuts))
        if (len(banded.tiles(tile_shape)) - uniform) * _tile_cost(enc) \
                <= BAND_COST_SHARE * enc.nbytes:
            return banded
    return p


TILE_RECORD_BYTES = 40   # a tile's entry in the container's header and index (measured 180-210
                         # bytes a tile in all, its JPEG header ~170 of them)


def _tile_cost(enc: codec.EncodedTensor) -> float:
    """Bytes one more tile of ``enc``'s costs: its JPEG header (up to its
    first interval) and its record."""
    return max(t.interval_starts[0] for t in enc.tiles) + TILE_RECORD_BYTES


def _block_row_gains(fits: codec.EncodedTensor, over: codec.EncodedTensor) -> np.ndarray:
    """Bytes ``over``'s tiles spend more than ``fits``'s on each 8 rows (from
    their restart intervals' sizes, which the coder records; headers left out)."""
    def per_block_row(enc):
        total = np.zeros(-(-enc.matrix_shape[0] // 8))
        for t in enc.tiles:
            across = -(-t.width // 8)
            count = -(-t.height // 8) * across
            run = t.restart_interval or count
            sizes = np.diff(np.asarray(t.interval_starts, np.float64))
            spans = np.minimum(run, count - run * np.arange(len(sizes)))   # the last may be short
            per_block = np.repeat(sizes / spans, spans)
            np.add.at(total, t.row0 // 8 + np.arange(len(per_block)) // across, per_block)
        return total
    return per_block_row(over) - per_block_row(fits)


def _widening(p: codec.Prepared, c: Curve, k: int) -> float:
    """How far candidate ``k`` (of the rows' common scale) widens the rows'
    scales: 1 at an integer step, more between two (see _densify)."""
    return float(c.q[k]) / (int(c.delta[k]) * base_scale(p, int(c.bits[k])))


def _own_scale(c: Curve, k: int) -> bool:
    """Candidate ``k`` codes on its own scales: thin, or per-row ranges."""
    return any(flags is not None and flags[k] for flags in (c.thin, c.row_ranges))


def _unwidened(p: codec.Prepared, c: Curve) -> np.ndarray:
    """Which candidates of ``c`` code on the rows' own scales (bool mask)."""
    return np.array([_own_scale(c, k) or _widening(p, c, k) <= 1 + 1e-9
                     for k in range(len(c.q))])


def encode_candidate(p: codec.Prepared, c: Curve, k: int, options,
                     fallback=None) -> "codec.EncodedTensor | ThinCoding":
    """Codes ``p`` as candidate ``k`` of its curve ``c``; ``fallback`` (a
    function, e.g. cached) gives ``row_range_fallback(p)`` to retries."""
    if c.thin is not None and c.thin[k]:   # (a wide leaf's one fine step codes every value)
        return thin_coding(p.original, float(c.q[k]), kept_aside(p))
    if c.row_ranges is not None and c.row_ranges[k]:
        prepared = fallback() if fallback is not None else row_range_fallback(p)
        return encode_with_step(prepared, int(c.bits[k]), int(c.delta[k]),
                                **dict(options, clip="minmax"))
    widen = _widening(p, c, k)
    if widen > 1 + 1e-9:
        options = dict(options, widen=widen)
    return encode_with_step(p, int(c.bits[k]), int(c.delta[k]), **options)


def _ladder_steps(p: codec.Prepared, rms: float, bits: int | None) -> list:
    """The distinct ``step_for(p, rms * 2^-k, bits)`` over the LADDER, in its
    order (the same steps, computed at once)."""
    q = rms * 2.0 ** -LADDER
    if not np.all((q > 0) & np.isfinite(q)) or bits not in (None, *STEP_LIMIT):
        return list(dict.fromkeys(step_for(p, v, bits) for v in q))   # its errors
    if bits is None and p.feedback is not None:
        bits = 12   # as step_for
    depth = np.full(len(q), 12 if bits is None else bits)
    delta = np.zeros(len(q))
    if bits is None:
        delta8 = q / base_scale(p, 8)
        eight = (MIN_STEP_8BIT <= delta8) & (delta8 <= STEP_LIMIT[8])
        depth[eight], delta[eight] = 8, np.round(delta8[eight])
    for b in (8, 12):
        at = (depth == b) & (delta == 0)
        if at.any():
            delta[at] = np.clip(np.round(q[at] / base_scale(p, b)), 1, STEP_LIMIT[b])
    return list(dict.fromkeys(zip(depth.tolist(), delta.astype(np.int64).tolist())))


LAST_TENSOR_RETRIES = 5
# The allocator scales the pending tensors' predicted sizes by actual / predicted
# bytes so far, shrunk towards 1 as if this fraction of the budget had been
# coded exactly as predicted: a small first tensor that misses its prediction
# 2x (a leaf of identical rows: 844 bytes for 449) moved every later choice by
# that factor, which spent 2.7 bits/weight on a larger kernel and 9.2 on the
# next, and left the file 8% under its target.
CORRECTION_PRIOR = 0.1
LOG_SLOPE_LIMIT = 60.0   # the allocator's multiplier λ lies in exp(±60)
DENSE_SPACING = 2.0 ** (1 / 32)   # finest step ratio between interpolated candidates


def _densify(points, base: dict, widen_from: int | None = 1):
    """Adds candidates between measured steps, bytes and error interpolated
    linearly in log step (both are smooth there), so a budget is met closely
    even by one tensor. Between an 8-bit and a 12-bit step the candidates are
    12-bit (the two code alike at equal step). Between two integer steps
    under WIDEN_BELOW (33-100% apart, the finest rates), the candidates
    are the smaller with its rows' scales widened
    (``q > Δ · base``, see :func:`encode_candidate`): 12-bit steps 2 and 3
    are 0.58 bit a weight apart, and a file of one large kernel at 3.4x
    landed 3.5% under its target. A widened step's error is its integer
    step's times the widening squared (everything in sample units scales;
    measured), and it is left out where a coarser candidate errs less
    (widening step 1 towards 2: the decoder's rounding of samples then grows
    as much as the step). Sorted coarse to fine."""
    out = []
    for (b0, d0, q0, n0, e0), (b1, d1, q1, n1, e1) in zip(points, points[1:]):
        out.append((b0, d0, q0, n0, e0, False))
        if min(n0, n1, e0, e1) <= 0:
            continue
        # the coarse end in the finer point's units, within what they can code
        top = min(int(q0 / base[b1]), STEP_LIMIT[int(b1)] + 1)
        span, log_n0, log_n1 = math.log(q0 / q1), math.log(n0), math.log(n1)
        log_e0, log_e1 = math.log(e0), math.log(e1)

        def at(q, log_0, log_1):
            t = math.log(q0 / q) / span
            return math.exp((1 - t) * log_0 + t * log_1)

        for d, q in _steps_between(d1, top, q1, q0, base[b1], widen_from):
            step = d * base[b1]
            out.append((b1, d, q, at(q, log_n0, log_n1),
                        at(step, log_e0, log_e1) * (q / step) ** 2, q > step))
    out.append((*points[-1], False))
    least, kept = math.inf, []
    for point in out:
        if not (point[5] and point[4] >= least):
            kept.append(point[:5])
            least = min(least, point[4])
    return (np.array(v) for v in zip(*kept))


# Integer steps under this are widened towards the next (33-100% apart);
# from it on, with many leaves the allocation mixes steps finely enough.
# Widening steps 4-31 too (3-25% apart) moved EfficientNet-lite's and
# PP-OCRv6's 5.5-8x files as any change of their coding does, KL +-10%
# either way per network, and PP-OCRv6's detector at 5.5x worse over 4
# probe seeds (mean |dp| 0.00051 -> 0.00079 with steps 4-7 widened).
WIDEN_BELOW = 4


def _steps_between(lo: int, hi: int, q_lo: float, q_hi: float, base: float,
                   widen_from: int | None = 1) -> list:
    """``(Δ, q)`` strictly between steps ``q_lo`` (``Δ = lo``) and ``q_hi``,
    coarse to fine: the integers between lo and hi at most DENSE_SPACING
    apart in ratio, and between two under WIDEN_BELOW, the smaller widened
    (``q`` above ``Δ · base``) DENSE_SPACING apart where it is at least
    ``widen_from`` (None: none)."""
    out = []
    coarser = q_hi
    for d in [*_between(lo, hi), lo]:
        step = d * base
        q, widened = step * DENSE_SPACING, []
        widened_ok = widen_from is not None and widen_from <= d < WIDEN_BELOW
        while widened_ok and q * math.sqrt(DENSE_SPACING) < coarser:
            widened.append((d, q))
            q *= DENSE_SPACING
        out += widened[::-1]
        if d != lo and q_lo < step < q_hi:
            out.append((d, step))
        coarser = min(coarser, step)
    return out


def _between(lo: int, hi: int) -> list[int]:
    """Integers strictly between lo and hi, descending, at most DENSE_SPACING apart in ratio."""
    out, d = [], hi
    while True:
        d = min(d - 1, int(d / DENSE_SPACING))
        if d <= lo:
            return out
        out.append(d)


def _probe_costs(p: codec.Prepared, probe: _Probe, steps, options, maps=None) -> list:
    """(tile bytes, squared error in weight units) of the probe at each
    ``(bits, Δ)`` of ``steps``: coded as :func:`encode_with_step` codes it,
    by the native encoder in one call per tile and sample depth (the
    samples do not depend on Δ), in this thread: a save analyses leaves on
    all cores, and handing a probe's steps to other threads cost more CPU
    than it saved. ``maps`` ({bits: (scale, offset)} of the probe rows): maps
    other than the tensor's shared-scale ones."""
    restart = options.get("restart_interval", codec.DEFAULT_RESTART_INTERVAL)
    tile_shape = options.get("tile_shape", codec.DEFAULT_TILE_SHAPE)
    matrix = np.ascontiguousarray(probe.matrix, np.float32)
    rdo = p.feedback is None   # as encode_tensor codes the tensor
    weight = None if probe.col_scale is None else np.ascontiguousarray(probe.col_scale, np.float32)
    cells = codec.tile_grid(*matrix.shape, tile_shape)
    entropy, header, error = {}, {}, {}
    for b in sorted({b for b, _ in steps}):
        scale, offset = maps[b] if maps else _probe_map(p, probe, b)
        deltas = [d for bb, d in steps if bb == b]
        for r, c, h, w in cells:
            box = (slice(r, r + h), slice(c, c + w))
            e, hd, sse = _native.measure_steps(
                matrix[box], scale[r:r + h], offset[r:r + h], np.array(deltas, np.uint16), b,
                restart, None if weight is None else weight[box], rdo)
            for i, d in enumerate(deltas):
                entropy[b, d] = entropy.get((b, d), 0) + int(e[i])
                header[b, d] = header.get((b, d), 0) + int(hd[i])
                error[b, d] = error.get((b, d), 0.0) + float(sse[i])
    # Entropy-coded data scales with the weights, and with the blocks that
    # shard cuts pad (found by review: 8 shards of 50 rows padded each to 56,
    # a file 11.5% larger than predicted, which byte targets took from the
    # leaves coded after it); headers (tables, markers) with the tile count.
    tiles = p.tiles(tile_shape)
    padded = _block_area(tiles) / _block_area(codec.tile_grid(*p.matrix.shape, tile_shape))
    return [(entropy[s] * padded / probe.fraction + len(tiles) * header[s] / len(cells),
             error[s]) for s in steps]


def _block_area(tiles) -> int:
    """The elements of ``tiles`` ((row, col, height, width) each) padded to
    whole 8 x 8 blocks."""
    return sum(-(-h // 8) * 8 * (-(-w // 8) * 8) for _, _, h, w in tiles)


def _probe_map(p: codec.Prepared, probe: _Probe, bits: int):
    """The probe rows' maps to ``bits``-bit samples: the tensor's own row
    scales (its steps), whatever range the probe alone would have."""
    _, scale, offset = mapping.row_affine(
        probe.matrix, bits, clip="common", scale=p.common_scale(bits)[probe.rows],
        shared=p.shared_map, with_samples=False, stats=probe.stats)
    return scale, offset


# ----------------------------------------------------------------------------
# Thin leaves
# ----------------------------------------------------------------------------

# A view whose short side is under JPEG's 8-pixel block (a (N, 1) or (N, 2)
# leaf, a vector) pads every block: 11 / 15 bits a weight at the default
# rate where a square leaf takes 4. Such float32 leaves are quantized on one
# uniform step and Rice coded instead (jaxjpeg.quantized_vectors): 5.5 / 3.9
# bits a weight at the same error.
THIN_SIDE = views.THIN_SIDE
THIN_PROBE = 1 << 16            # values a thin leaf's curve is measured on
# values a fine step's curve beside JPEG's is measured on (min_bits), as
# many as JPEG's probe: THIN_PROBE's measuring was a third of a 2x or 3x
# target's time. A quarter of THIN_PROBE counted t(1.5), mixture and N(0, 1)
# values' bytes past 8 bits a value within 1% of the whole leaf's, but a
# kernel with an input channel 1000x the others 10% off, landing 11% under
FINE_PROBE = 1 << 15
THIN_LADDER = np.arange(-8, 64) / 4   # steps q = spread * 2^-k, a quarter octave apart
THIN_MAX_BITS = 15.5            # the Rice coder refuses more than 16 bits a value


def is_thin(p: codec.Prepared) -> bool:
    """Whether ``p`` (float32, bfloat16 or float16, at least one axis, not
    balanced: a thin leaf's steps and errors are in weight units, at most an
    eighth of its values kept aside) has a view too thin for JPEG's blocks.
    What its side list keeps, the thin coding keeps aside too where one
    step would not hold it (:func:`kept_aside`; found by review: one 1e3,
    NaN or infinity among 300,000 N(0, 1) values sent the leaf to JPEG, 1.9x
    the bytes, 0.62-0.70 relative error at 8x where the thin coding had 0.08)."""
    return (quantizable(p.dtype) and len(p.shape) >= 1 and p.size > 0
            and min(p.matrix.shape) < THIN_SIDE and not p.balanced
            and (p.outliers is None or 8 * p.outliers.count <= p.size))


def kept_aside(p: codec.Prepared) -> np.ndarray | None:
    """The flat positions a thin coding of ``p`` keeps aside exactly: a thin
    leaf's side list (:func:`is_thin`; a wide leaf's one fine step, or a
    small kernel's, codes every value), unless one step holds it at little
    cost (it is then coded with the rest: views.Outliers.steppable); else None."""
    if (p.outliers is None or not p.outliers.count or not is_thin(p)
            or p.outliers.steppable(p.original)):
        return None
    return p.outliers.index


def is_sparse(p: codec.Prepared) -> bool:
    """:func:`is_sparse_leaf` of a prepared leaf (never a balanced one:
    prepare_leaf does not balance sparse leaves)."""
    return is_sparse_leaf(p.original)


def is_sparse_leaf(x) -> bool:
    """Whether ``x`` (float32, bfloat16 or float16, every value finite) is
    sparse enough to be quantized on one step with a bitmap of its nonzeros
    (quantized_vectors.SPARSE_ZEROS): JPEG would code its zeros as values,
    and restore them as noise (zero rows too, unless a whole 8-row block
    is zero)."""
    x = np.asarray(x)
    return (quantizable(x.dtype) and quantized_vectors.is_sparse(x)
            and analysis.count_special(x) == 0)


@dataclasses.dataclass(frozen=True)
class ThinCoding:
    """A thin leaf quantized on step ``record["step"]`` and Rice coded."""

    blob: bytes
    record: dict          # the raw leaf's quantization fields
    outliers = None       # as EncodedTensor's: nothing kept aside

    @property
    def nbytes(self) -> int:
        return len(self.blob)


def thin_coding(x, q: float, kept=None) -> ThinCoding | None:
    """``x`` (float32, finite but at ``kept``) quantized on step ``q``, or on
    coarser steps where the coder refuses ``q`` (more than 16 bits a value);
    None if it cannot be coded at all. ``kept``: flat positions kept aside
    exactly (quantized_vectors.encode)."""
    for _ in range(8):
        coded = quantized_vectors.encode(x, quantized_vectors.VectorStep(q), kept)
        if coded is not None:
            return ThinCoding(*coded)
        q *= 2
    return None


def thin_within_error(x, error: float, max_bytes: int, kept=None) -> ThinCoding | None:
    """``x`` (float32, finite but at ``kept``) quantized on one step with a
    mean squared error of at most ``error`` (0: a step that codes it
    exactly), the values at ``kept`` kept aside exactly, when that takes
    fewer than ``max_bytes``; else None."""
    flat = np.asarray(x).reshape(-1)
    # Zeros round to themselves on any step: the step is found on the
    # nonzero values, at their share of the error (a sparse leaf's first
    # guess was its share of nonzeros^½ too fine, and float64 copies of
    # every value took 3x a large pruned leaf's memory: review).
    coded_here = flat != 0
    if kept is not None:
        coded_here[kept] = False
    values = flat[coded_here].astype(np.float64)
    if error == 0:
        step = _exact_step(values) if values.size else 1.0
    elif math.isfinite(error):   # a uniform step's squared error is step^2 / 12
        per_value = error * flat.size / max(1, values.size)
        step = _step_within_error(values, math.sqrt(12 * per_value), per_value)
    else:
        step = None
    coded = None if step is None else thin_coding(x, step, kept)
    if coded is None or coded.record["step"] != step or coded.nbytes >= max_bytes:
        return None
    return coded


def _exact_step(values: np.ndarray) -> float | None:
    """A step that codes float64 ``values`` exactly, the first's magnitude
    (1 for zero; any constant's), or None where it does not."""
    if not values.size:
        return None
    step = abs(float(values[0])) or 1.0
    return step if np.all(np.round(values / step) * step == values) else None


def balanced_error_weight(p: codec.Prepared):
    """For :func:`thin_curve`: a balanced leaf's errors in its own units
    (each value's divided by its column's scale and its row's factor,
    squared), or None."""
    if not p.balanced:
        return None
    by_row, by_col = (None if f is None else 1.0 / np.square(f.astype(np.float64))
                      for f in (p.row_factor, p.col_scale))

    def weight(flat_index):
        rows, cols = p.view.cells(p.shape, flat_index)
        return ((1.0 if by_row is None else by_row[rows])
                * (1.0 if by_col is None else by_col[cols]))
    return weight


def _step_within_error(values: np.ndarray, step: float, error: float) -> float | None:
    """``step``, shrunk where rounding on it errs by more than ``error`` (a
    mean squared error). Sixteen tries: a pruned leaf's values start at its
    cut, so a step above twice the cut rounds many to 0 and errs far more
    than step^2 / 12 (four tries left EfficientNet-lite1's largest kernels,
    pruned to 75%, without a step and coded as JPEG)."""
    for _ in range(16):
        measured = quantized_vectors.rounding_sse(values, step) / max(1, values.size)
        if measured <= error:
            return step
        step *= 0.999 * math.sqrt(error / measured)
    return None


MASK_DEFLATE_OVERHEAD = 1.15   # zlib's bytes on random bits over their entropy (measured 1.1-1.3)


def _entropy_bits(p: float) -> float:
    """Binary entropy of ``p``, in bits."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


ONE_STEP_RANGE = 2.0 ** 10   # values kept aside one step still codes: within this many RMS


def one_step_holds(p: codec.Prepared) -> bool:
    """Whether one step (thin_coding) can code every value of ``p``, those
    kept aside included: they are finite and within ONE_STEP_RANGE of the
    coded values' RMS (found by review: offered beside JPEG, a NaN made the
    steps NaN and crashed the analysis, and a 1e30 row left no coding at
    all; a heavy-tailed kernel's kept values are within it). The one step
    is in weight units, a balanced leaf's too: so is its range (found by
    review: against the balanced units' RMS, a tree of two kernels with an
    input channel 1000x the others lost it, and landed 32.6% / 19.1% under
    its target at 2.5x / 3x)."""
    if p.outliers is None:
        return True
    kept = np.abs(np.asarray(p.outliers.values, np.float64))
    rms = math.sqrt(prepared_norm2(p) / max(1, p.size)) if p.balanced else reference_rms(p)
    return bool(np.isfinite(kept).all() and (not kept.size or kept.max() <= ONE_STEP_RANGE * rms))


# A fine step beside JPEG (FINE_MARGIN) is measured only where it may take
# about JPEG's finest bits a value or more: a step q of a spread s takes
# about log2(s / q) + 2 bits (a Gaussian's 2.05, a Laplacian's 1.94), and
# steps this many bits coarser are left out (found by review: all 72 steps
# of every coded leaf took a third of a 2x target's time).
FINE_BITS_MARGIN = 3.0


def thin_curve(x, seed: int = 0, dense: bool = False, error_weight=None,
               kept=None, min_bits: float | None = None, probe_size: int = THIN_PROBE) -> Curve:
    """Bytes and squared error of ``x`` (float32, finite but at ``kept``)
    quantized on each step of THIN_LADDER, measured on up to ``probe_size``
    of its values; with ``dense``, steps DENSE_SPACING apart between them,
    bytes and error interpolated in log step (beside a JPEG curve, as long:
    found by review, a kernel on its fine step landed a file 2.4% under its
    target, the ladder's steps a quarter octave apart). ``error_weight``
    (optional): C-order flat positions -> each one's weight in the squared
    error (:func:`balanced_error_weight`; ``x`` not sparse, nothing kept).
    ``kept`` (optional): flat positions kept aside exactly (their bytes
    counted, no error). ``min_bits`` (optional): steps predicted to take
    fewer bits a value than this less FINE_BITS_MARGIN are not measured
    (the coarsest measured always is)."""
    values = np.asarray(x).reshape(-1)   # in its own dtype: only the probe is widened
    side = 0
    if kept is not None:
        side = quantized_vectors.kept_bytes(len(kept), values.size)
        values = np.delete(values, kept)
    if values.size and not np.any(values[:1024] != values[0]) and np.all(values == values[0]):
        # a constant: one exact step
        step = _exact_step(values.astype(np.float64))
        coded = quantized_vectors.coded_bytes(values, step) + side
        return Curve(np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([step]),
                     np.array([float(coded)]), np.zeros(1), thin=np.ones(1, bool))
    mask = 0
    if quantized_vectors.is_sparse(values):
        # the bitmap does not depend on the step: its bytes counted on the
        # whole leaf (a sample lost pruned rows' and blocks' structure:
        # review, 3x too many), the nonzero values' on a sample of them
        mask = len(quantized_vectors.nonzero_mask(values))
        values = values[values != 0]
    count = values.size
    at = None   # the positions probed: all, or probe_size distinct ones drawn
    if values.size > probe_size:
        at = quantized_vectors.sample_positions(count, probe_size, seed, distinct=True)
        values = values[at]
    probe = values.astype(np.float64)
    weight = None
    if error_weight is not None and not mask:
        weight = error_weight(np.arange(count) if at is None else at)
    scale = count / max(1, probe.size)
    # The codes are Rice coded about their median: steps relative to the
    # spread (found by review: 1000 + 0.01 N(0, 1) got no step finer than
    # its spread from a ladder on its RMS)
    spread = float(np.std(probe)) or 1.0
    ladder = THIN_LADDER
    if min_bits is not None:   # and none predicted a bit past what the coder takes
        end = int(np.searchsorted(ladder + 2, THIN_MAX_BITS + 1, "right"))
        start = int(np.searchsorted(ladder + 2, min_bits - FINE_BITS_MARGIN)) - 1
        ladder = ladder[min(max(0, start), end - 8):end]   # two octaves at least
    steps = spread * np.exp2(-ladder)
    if mask:
        # The nonzero values' codes, magnitudes and signs; those rounding to
        # 0 leave the bitmap too, which then also says which did: about
        # their entropy, as deflated bits a little above it.
        def values_bytes(q):
            codes = np.round(probe / q).astype(np.int64)
            kept = codes[codes != 0]
            share = kept.size / max(1, codes.size)
            return (quantized_vectors.sparse_value_bytes(kept)
                    + MASK_DEFLATE_OVERHEAD * _entropy_bits(share) * codes.size / 8)
        nbytes = mask + side + np.array([values_bytes(q) * scale for q in steps])
        sse = np.array([quantized_vectors.rounding_sse(probe, q, weight) * scale for q in steps])
    else:
        middle = quantized_vectors.middle_values(probe)
        counted, rounding = quantized_vectors.step_rates(probe, steps, middle, weight)
        nbytes = mask + side + counted * scale
        sse = rounding * scale
    keep = 8 * (nbytes - mask - side) <= THIN_MAX_BITS * max(1, count)
    keep[0] = True   # the coarsest always
    steps, nbytes, sse = steps[keep], nbytes[keep], sse[keep]
    if dense:
        steps, nbytes, sse = _log_interpolated(steps, nbytes, sse)
    k = len(steps)
    return Curve(np.zeros(k, np.int64), np.zeros(k, np.int64), steps, nbytes, sse,
                 thin=np.ones(k, bool))


def _log_interpolated(steps, nbytes, sse):
    """Points DENSE_SPACING apart between each two of ``steps`` (falling),
    bytes and error linear in log step between them (where both are positive)."""
    steps, nbytes, sse = (np.asarray(v, np.float64) for v in (steps, nbytes, sse))
    parts = np.maximum(1, np.round(np.log(steps[:-1] / steps[1:]) / math.log(DENSE_SPACING)))
    # Python's min, as the points were chosen before (a NaN past the first
    # of the four does not stop the gap's points; review)
    positive = np.array([min(quad) > 0 for quad in zip(
        nbytes[:-1].tolist(), nbytes[1:].tolist(), sse[:-1].tolist(), sse[1:].tolist())], bool)
    between = np.where(positive, parts - 1, 0).astype(np.intp)   # points inside each gap
    gap = np.repeat(np.arange(len(between)), between)
    first = np.cumsum(between) - between   # each gap's first point among them all
    t = (np.arange(gap.size) - first[gap] + 1) / parts[gap]
    order = np.argsort(np.concatenate([np.arange(len(steps)), gap + t]), kind="stable")
    at = t.tolist()

    def between_points(v):
        # libm's pow, a value at a time: numpy's vectorized power differs in
        # the last bit where the CPU has AVX-512 (a save then differs by machine)
        ratios = (v[gap + 1] / v[gap]).tolist()
        return v[gap] * np.array([math.pow(r, x) for r, x in zip(ratios, at)])
    return (np.concatenate([v, between_points(v)])[order] for v in (steps, nbytes, sse))


# ----------------------------------------------------------------------------
# Budget allocation
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Allocation:
    """Result of :func:`allocate_to_target`."""

    encodings: dict            # name -> EncodedTensor
    nbytes: int                # achieved total (sum of EncodedTensor.nbytes)
    target_bytes: int
    steps: dict                # name -> weight-domain step q
    squared_errors: dict       # name -> sum of squared errors (measured by decoding)
    slope: float               # the Lagrange multiplier λ (weighted SSE per byte)

    @property
    def relative_miss(self) -> float:
        return self.nbytes / self.target_bytes - 1.0


class _Picker:
    """Each tensor's candidate at a multiplier λ: the least ``dist + λ * nbytes``
    over its finite candidates (rows of the allocator's tables). ``dist`` is
    inf wherever ``nbytes`` is not finite; when ``nbytes`` holds no NaN or
    -inf, the sum is then inf exactly there (λ > 0), without a mask."""

    def __init__(self, nbytes, dist, finite, plain: bool):
        self.nbytes, self.dist, self.finite, self.plain = nbytes, dist, finite, plain

    def pick(self, lam) -> np.ndarray:
        if self.plain:
            return np.argmin(self.dist + lam * self.nbytes, axis=1)
        return np.argmin(np.where(self.finite, self.dist + lam * self.nbytes, np.inf), axis=1)

    def sizes(self, choice) -> np.ndarray:
        """The bytes of each row's ``choice``."""
        return self.nbytes[np.arange(len(choice)), choice]

    def rows(self, index) -> "_Picker":
        return _Picker(self.nbytes[index], self.dist[index], self.finite[index], self.plain)


class _RowsOf:
    """Rows ``rows`` of a table, times ``scale``, indexed as the table taken
    at those rows and scaled would be (the same values), without the copy."""

    def __init__(self, table: np.ndarray, rows: np.ndarray, scale: float = 1.0):
        self.table, self.rows, self.scale = table, rows, scale
        self.shape = (len(rows), table.shape[1])

    def __getitem__(self, index):
        row, col = index
        return self.table[self.rows[row], col] * self.scale


@dataclasses.dataclass
class _Breakpoints:
    """Where each tensor's choice moves as the multiplier grows: the lower
    convex hull of its candidates' (bytes, distortion), whose vertices are the
    only candidates ``argmin(dist + λ * nbytes)`` picks (λ > 0), and the
    multipliers between them, all tensors' sorted together."""

    vertices: np.ndarray   # int [rows, most vertices]: candidates, coarsest first
    counts: np.ndarray     # int [rows]: vertices of each row
    mu: np.ndarray         # float [breaks]: multipliers where a row moves one vertex coarser
    row: np.ndarray        # int [breaks]: whose
    drop: np.ndarray       # float [breaks]: the bytes that move saves

    @classmethod
    def of(cls, nbytes: np.ndarray, dist: np.ndarray) -> "_Breakpoints | None":
        """From the allocator's tables (``dist`` inf where ``nbytes`` is not
        finite); None where a finite candidate's distortion is not finite or
        a tensor has no finite candidate (the bisection handles those)."""
        finite = np.isfinite(nbytes)
        if not np.all(np.isfinite(dist[finite])):
            return None
        hulls = [_lower_hull(nb[ok], d[ok], np.flatnonzero(ok))
                 for nb, d, ok in zip(nbytes, dist, finite)]
        counts = np.array([len(h) for h in hulls], np.intp)
        if not np.all(counts):   # a tensor without a finite candidate
            return None
        vertices = np.zeros((len(hulls), max(1, counts.max(initial=1))), np.int32)
        mu, row, drop = [], [], []
        for r, hull in enumerate(hulls):
            vertices[r, :len(hull)] = hull
            nb, d = nbytes[r, hull], dist[r, hull]
            mu.append((d[:-1] - d[1:]) / (nb[1:] - nb[:-1]))
            drop.append(nb[1:] - nb[:-1])
            row.append(np.full(len(hull) - 1, r, np.intp))
        mu, row, drop = (np.concatenate(v) if v else np.zeros(0) for v in (mu, row, drop))
        order = np.argsort(mu, kind="stable")
        return cls(vertices, counts, mu[order], row[order].astype(np.int32), drop[order])

    def __post_init__(self):
        # Breakpoints passed so far, and how many of them each row's: choices
        # move little from one tensor to the next, so each crossing moves
        # from the last one through the breakpoints between them.
        self.at = 0
        self.passed = np.zeros(len(self.counts), np.intp)

    def picks(self, rows: np.ndarray, end: int) -> np.ndarray:
        """Each of ``rows``' candidate once the first ``end`` breakpoints have
        been passed."""
        if end > self.at:
            self.passed += np.bincount(self.row[self.at:end], minlength=len(self.counts))
        elif end < self.at:
            self.passed -= np.bincount(self.row[end:self.at], minlength=len(self.counts))
        self.at = end
        return self.vertices[rows, self.counts[rows] - 1 - self.passed[rows]]

    def crossing(self, rows, correction: float, left: float, total):
        """(μ = λ * correction, choices of ``rows``) at the least multiplier λ
        in exp(±LOG_SLOPE_LIMIT) whose choices' ``total`` fits ``left`` (or
        the largest, when none does). Bytes are ``nbytes * correction``, so
        a choice at λ is the uncorrected one at μ. Found from the drops
        summed from the last crossing, then checked with ``total`` itself
        (the allocator's sums: a float's rounding cannot move the crossing)."""
        pending = np.zeros(len(self.counts), bool)
        pending[rows] = True
        low = correction * math.exp(-LOG_SLOPE_LIMIT)
        high = correction * math.exp(LOG_SLOPE_LIMIT)
        first = int(np.searchsorted(self.mu, low, "right"))   # passed at the start
        last = int(np.searchsorted(self.mu, high, "right"))   # never passed
        end = self._group_end(min(max(self.at, first), last), first)
        now = total(self.picks(rows, end))
        end = self._group_end(self._estimate(end, now - left, first, last, pending, correction),
                              first)
        choice = self.picks(rows, end)
        moved = False
        while total(choice) > left:   # rounding: one more
            if end >= last:           # nothing fits: the largest multiplier's choices
                return high, choice
            end, moved = self._group_end(end + 1, first), True
            choice = self.picks(rows, end)
        while end > first and not moved:              # rounding: one fewer
            back = max(first, int(np.searchsorted(self.mu, self.mu[end - 1], "left")))
            earlier = self.picks(rows, back)
            if total(earlier) > left:
                break
            end, choice = back, earlier
        return (low if end == first else float(self.mu[end - 1])), choice

    WINDOW = 4096   # breakpoints summed at a time from the last crossing

    def _estimate(self, end, excess, first, last, pending, correction) -> int:
        """The breakpoints to pass for the total to drop ``excess`` bytes
        (to rise ``-excess`` when negative: passing fewer) from ``end``,
        by the drops of the pending rows' breakpoints summed window by
        window from there (an estimate: floats round)."""
        def drops(lo, hi):
            return self.drop[lo:hi] * pending[self.row[lo:hi]] * correction

        if excess > 0:   # pass more
            while end < last:
                hi = min(last, end + self.WINDOW)
                saved = np.cumsum(drops(end, hi))
                i = int(np.searchsorted(saved, excess, "left"))
                if i < len(saved):
                    return end + i + 1
                excess -= saved[-1]
                end = hi
            return last
        slack = -excess   # pass fewer while the total stays within the slack
        while end > first:
            lo = max(first, end - self.WINDOW)
            regained = np.cumsum(drops(lo, end)[::-1])
            j = int(np.searchsorted(regained, slack, "right"))
            if j < len(regained):   # un-passing breakpoint end - 1 - j overshoots
                return end - j
            slack -= regained[-1]
            end = lo
        return first

    def _group_end(self, end: int, first: int) -> int:
        """``end`` moved past every breakpoint at the same multiplier as the
        last one passed (they pass at once)."""
        if end <= first:
            return first
        return int(np.searchsorted(self.mu, self.mu[end - 1], "right"))


def _lower_hull(nbytes: np.ndarray, dist: np.ndarray, index: np.ndarray) -> list:
    """The candidates (``index``) that ``argmin(dist + λ * nbytes)`` picks for
    some λ > 0, fewest bytes first: the lower convex hull from the fewest
    bytes to the least distortion (ties: the first candidate, as argmin)."""
    order = np.lexsort((index, dist, nbytes))
    nb, d, idx = nbytes[order].tolist(), dist[order].tolist(), index[order].tolist()
    hull: list = []   # positions in the sorted lists
    for i in range(len(nb)):
        if hull and nb[i] == nb[hull[-1]]:
            continue   # as many bytes and no less distortion: never picked first
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            if (nb[a] - nb[o]) * (d[i] - d[o]) - (d[a] - d[o]) * (nb[i] - nb[o]) > 0:
                break
            hull.pop()
        hull.append(i)
    best = min(range(len(hull)), key=lambda j: (d[hull[j]], j)) if hull else -1
    return [idx[j] for j in hull[:best + 1]]


# A tensor coded before others settles its coding with real ones (as the
# last does) where its miss would take more than this share of their bytes.
STARVING_SHARE = 0.25

COARSER_BISECTIONS = 5   # see BudgetAllocator._coarser_than_curve

# The last tensor, where its codings cannot be mixed (thin and sparse ones,
# one step for the whole tensor), may take the nearer of the two codings
# around what is left when it is over by at most this share of the budget
# (found in session 31: a thin last leaf landed its file 2.3% under).
LAST_OVERSHOOT = 0.01
UNSPENT_SLACK = 0.005   # of the budget a tensor may leave that the rest cannot take


class BudgetAllocator:
    """Codes tensors one at a time so that their total meets a byte budget.

    Each tensor's rate–distortion curve (:func:`rd_curve`) is measured up front; the
    budget goes where ``sensitivity * SSE`` drops most per byte (one Lagrange
    multiplier). Tensors are then coded one by one, in any order, each once:
    before each, the multiplier is solved again over the tensors still to
    come with the bytes still left, their predictions corrected by how far
    the actual sizes so far missed theirs. Memory: the prepared tensor being
    coded and the curves, never all encodings.
    """

    def __init__(self, curves: Mapping[str, Curve], budget: int, *,
                 sensitivity: Mapping[str, float] | None = None, **options):
        if not curves:
            raise ValueError("no tensors to allocate")
        self.names = list(curves)
        self.options = options
        self._tile_shape = options.get("tile_shape") or codec.DEFAULT_TILE_SHAPE
        self.sens = {n: float((sensitivity or {}).get(n, 1.0)) for n in self.names}
        if any(not (s >= 0 and math.isfinite(s)) for s in self.sens.values()):
            raise ValueError("sensitivities must be finite and non-negative")
        self.curves = dict(curves)
        self.budget = int(budget)
        coarsest = sum(float(c.nbytes.min()) for c in self.curves.values())
        if coarsest > budget:
            raise ValueError(f"target {budget} bytes is below the smallest coding "
                             f"({int(coarsest)} bytes)")
        # Every curve in one padded table, built once: each choice takes the
        # pending rows (rebuilding it per tensor grew as tensors²).
        self._rows = {n: i for i, n in enumerate(sorted(self.names))}
        width = max(len(c.nbytes) for c in self.curves.values())
        self._nbytes = np.full((len(self.names), width), np.inf)
        self._dist = np.full((len(self.names), width), np.inf)
        for n, i in self._rows.items():
            c = self.curves[n]
            self._nbytes[i, :len(c.nbytes)] = c.nbytes
            self._dist[i, :len(c.sse)] = self.sens[n] * c.sse
        self._finite = np.isfinite(self._nbytes)
        # see _Picker; the same table unless a curve has finite errors at
        # non-finite bytes (one table less held through the save: 0.5 MiB at 1 GiB)
        stray = ~self._finite & np.isfinite(self._dist)
        self._pick_dist = (np.where(self._finite, self._dist, np.inf) if stray.any()
                           else self._dist)
        self._plain = not np.any(np.isnan(self._nbytes) | (self._nbytes == -np.inf))
        self._finest = np.array([len(self.curves[n].nbytes) - 1 for n in sorted(self.names)])
        self._breaks = _Breakpoints.of(self._nbytes, self._pick_dist) if self._plain else None
        self._pending_names: list = []   # the rows of _pending (see _pending_tables)
        self._pending_rows = np.zeros(0, np.intp)
        self._pending = None
        self.spent = 0
        self.predicted_spent = 0.0
        self.pending = set(self.names)
        self._most = {n: float(np.max(c.nbytes)) for n, c in curves.items()}
        self._most_pending = sum(self._most.values())
        self.steps: dict = {}
        self.squared_errors: dict = {}
        self.slope = 0.0
        self._log_slope = None   # log λ of the last choice (where the next bisection starts)
        self._planned_total = 0.0   # the last choice's predicted bytes, corrected
        self.all_finest = True   # every tensor coded so far at its finest candidate
        # every pending tensor's candidate at the last tensor's choice (a dict
        # replaced whole: threads coding ahead read it, see coded_ahead)
        self._last_choices: dict = {}

    def planned_bytes(self, names) -> float:
        """The share of the budget of ``names``: their predicted bytes at the
        allocation of the whole budget (before any tensor is coded), with
        what that allocation leaves between its candidates shared out in
        proportion (found by review: a process coding one kernel was given
        its candidate's 796 K bytes of an 872 K budget; the distributed
        file landed 9.1% under, where one process mixes to the budget)."""
        choices = self._choices()
        predicted = {n: float(c.nbytes[choices[n]]) for n, c in self.curves.items()}
        total = sum(predicted.values())
        scale = self.budget / total if total > 0 else 1.0
        return scale * sum(predicted[name] for name in names)

    def _correction(self) -> float:
        """Actual / predicted bytes of the tensors coded so far, shrunk towards
        1 by CORRECTION_PRIOR of the budget."""
        prior = CORRECTION_PRIOR * self.budget
        if not self.predicted_spent + prior > 0:
            return 1.0
        return (self.spent + prior) / (self.predicted_spent + prior)

    def _choose(self, name: str) -> int:
        """The candidate of ``name`` at the multiplier that spends what is left."""
        return self._choices()[name]

    def _choices(self) -> dict:
        """Every pending tensor's candidate at the multiplier that spends
        what is left."""
        correction = self._correction()
        if self._breaks is not None and 0 < correction < math.inf:
            return self._choices_by_breakpoints(correction)
        names, nbytes, dist, finite, pick_dist = self._pending_tables()
        if 0 < correction < math.inf:   # inf * correction stays inf: no mask needed
            nbytes = nbytes * correction
        else:
            nbytes = nbytes.copy()
            nbytes[finite] *= correction
        left = self.budget - self.spent
        rows = np.arange(len(names))
        picker = _Picker(nbytes, pick_dist, finite, self._plain)

        def total(choice):
            return float(nbytes[rows, choice].sum())

        finest = self._finest[self._pending_rows]
        if total(finest) <= left:
            choice, self.slope = finest, 0.0
        else:
            hi, at_hi = self._crossing(picker, total, left)
            self.slope = math.exp(hi)
            self._log_slope = hi
            choice = self._fill(nbytes, dist, at_hi, left)
        self._planned_total = total(choice)
        return {n: int(k) for n, k in zip(names, choice)}

    def _choices_by_breakpoints(self, correction: float) -> dict:
        """_choices from the tensors' convex hulls: the multiplier's crossing
        is where the pending tensors' hull breakpoints, taken in order, drop
        the total to what is left (one pass over them, not a bisection of
        argmins over every pending tensor's candidates: tensors² work per
        save). The totals compared are summed as _choices sums them, so the
        choices are the ones its bisection finds."""
        names = sorted(self.pending, key=self._rows.__getitem__)
        rows = np.fromiter((self._rows[n] for n in names), np.intp, len(names))
        left = self.budget - self.spent

        def total(choice) -> float:
            return float((self._nbytes[rows, choice] * correction).sum())

        finest = self._finest[rows]
        if total(finest) <= left:
            choice, self.slope = finest, 0.0
        else:
            mu, at_hi = self._breaks.crossing(rows, correction, left, total)
            self.slope = mu / correction
            choice = self._fill(_RowsOf(self._nbytes, rows, correction),
                                _RowsOf(self._dist, rows), at_hi, left)
        self._planned_total = total(choice)
        return {n: int(k) for n, k in zip(names, choice)}

    def _pending_tables(self):
        """(names sorted, bytes, distortions, finite) of the pending tensors'
        rows; kept between choices and narrowed as tensors are coded (taking
        every pending row of the full tables anew each time cost O(tensors)
        copies of the table per save)."""
        names = sorted(self.pending)
        if names != self._pending_names:
            keep = np.array([self._rows[n] for n in names], np.intp)
            self._pending_names, self._pending_rows = names, keep
            self._pending = (self._nbytes[keep], self._dist[keep], self._finite[keep],
                             self._pick_dist[keep])
        return (names, *self._pending)

    def _crossing(self, picker: "_Picker", total, left):
        """(log λ, choices) where the choices' total bytes ``total(pick(λ))``
        first fit ``left``, by bisection on log λ to where no float lies
        between its ends. A tensor's choice only moves to fewer bytes as λ
        grows, so one that both ends choose alike chooses so in between:
        each round re-chooses only the tensors that differ (soon one or two),
        not every pending one (tensors² work per save); their rows are taken
        out once and narrowed as the bracket closes, and each round's total
        sums the chosen sizes with only those rows changed. The bracket starts
        around the last tensor's λ (the next one's is close) and widens until
        it holds the crossing; bisection finds the same crossing from any
        bracket."""
        pick = picker.pick
        lo, hi = self._bracket()
        at_lo, at_hi = pick(math.exp(lo)), pick(math.exp(hi))
        while total(at_lo) <= left and lo > -LOG_SLOPE_LIMIT:
            hi, at_hi = lo, at_lo
            lo = max(-LOG_SLOPE_LIMIT, lo - 4 * (hi - lo) - 1)
            at_lo = pick(math.exp(lo))
        while total(at_hi) > left and hi < LOG_SLOPE_LIMIT:
            lo, at_lo = hi, at_hi
            hi = min(LOG_SLOPE_LIMIT, hi + 4 * (hi - lo) + 1)
            at_hi = pick(math.exp(hi))
        moving = np.flatnonzero(at_lo != at_hi)
        some = picker.rows(moving)
        sizes_hi = picker.sizes(at_hi)
        for done in range(80):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):   # no float between: further rounds change nothing
                break
            if len(moving) == 1:   # soon the rule: one tensor's choice decides the rest
                return self._bisect_one(lo, hi, at_lo, at_hi, sizes_hi, int(moving[0]), some,
                                        left, 80 - done)
            at_mid, sizes_mid = at_hi.copy(), sizes_hi.copy()
            at_mid[moving] = some.pick(math.exp(mid))
            sizes_mid[moving] = some.sizes(at_mid[moving])
            # the same sum as total(at_mid): the same values in the same order
            if float(sizes_mid.sum()) > left:
                lo, at_lo = mid, at_mid
            else:
                hi, at_hi, sizes_hi = mid, at_mid, sizes_mid
            still = at_lo[moving] != at_hi[moving]
            if not still.all():   # choices that now agree at both ends stay put
                moving, some = moving[still], some.rows(still)
        return hi, at_hi

    @staticmethod
    def _bisect_one(lo, hi, at_lo, at_hi, sizes_hi, row, some: "_Picker", left, rounds):
        """_crossing's last ``rounds`` rounds once only ``row`` differs between
        the ends: each round is its choice at the middle multiplier and the
        total that choice makes (the same sum, taken once per choice)."""
        totals: dict[int, float] = {}

        def total(k) -> float:
            if k not in totals:
                sizes = sizes_hi.copy()
                sizes[row] = some.nbytes[0, k]
                totals[k] = float(sizes.sum())
            return totals[k]

        k_lo, k_hi = int(at_lo[row]), int(at_hi[row])
        for _ in range(rounds):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            k = int(some.pick(math.exp(mid))[0]) if k_lo != k_hi else k_hi
            if total(k) > left:
                lo, k_lo = mid, k
            else:
                hi, k_hi = mid, k
        at_hi = at_hi.copy()
        at_hi[row] = k_hi
        return hi, at_hi

    def _bracket(self) -> tuple[float, float]:
        """(low, high) log λ to start the bisection from: around the last
        tensor's multiplier, else the whole range."""
        last = self._log_slope
        if last is None:
            return -LOG_SLOPE_LIMIT, LOG_SLOPE_LIMIT
        return max(-LOG_SLOPE_LIMIT, last - 0.25), min(LOG_SLOPE_LIMIT, last + 0.25)

    @staticmethod
    def _fill(nbytes, dist, choice, left):
        """Spends what the multiplier's choice leaves on the steepest refinements."""
        choice = choice.copy()
        rows = np.arange(len(choice))
        # Each step refines one tensor: only its row of these changes.
        sizes = nbytes[rows, choice]
        nxt = np.minimum(choice + 1, nbytes.shape[1] - 1)
        cost = nbytes[rows, nxt] - sizes
        drop = dist[rows, choice] - dist[rows, nxt]
        while True:
            spare = left - float(sizes.sum())
            ok = (nxt > choice) & np.isfinite(cost) & (cost <= spare)
            gain = np.where(ok, drop, 0) / np.maximum(cost, 1)
            ok &= gain > 0
            if not ok.any():
                return choice
            best = int(np.argmax(np.where(ok, gain, -np.inf)))
            choice[best] += 1
            k = choice[best]
            sizes[best] = nbytes[best, k]
            nxt[best] = min(k + 1, nbytes.shape[1] - 1)
            cost[best] = nbytes[best, nxt[best]] - sizes[best]
            drop[best] = dist[best, k] - dist[best, nxt[best]]

    def _settle_last(self, p, c: Curve, k: int, enc, fallback, left=None):
        """The last tensor has nothing after it to absorb a miss: bisect its
        candidates with real codings (at most LAST_TENSOR_RETRIES) for the
        largest that fits what is left (or ``left``, a starving tensor's
        share: then nothing over it), mixing the two nearest where they can."""
        overshoot = int(LAST_OVERSHOOT * self.budget) if left is None else 0
        left = self.budget - self.spent if left is None else left
        # Tiles of two codings mix only on one map: a tensor that can mix
        # them settles among its integer steps (found by review: settled
        # between widened candidates, a file of one kernel landed 2% under
        # where mixing its steps 2 and 1 had landed it within 1%).
        allowed = (_unwidened(p, c) if p.feedback is None and isinstance(enc, codec.EncodedTensor)
                   and len(enc.tiles) > 1 else None)
        if allowed is not None and not allowed[k]:
            k = int(np.flatnonzero(allowed[:k + 1])[-1]) if allowed[:k + 1].any() else k
            enc = encode_candidate(p, c, k, self.options, fallback)
        fits, over = (k, enc), None
        if enc.nbytes > left:
            fits, over = None, (k, enc)
        lo = k if fits else 0
        hi = k if over else len(c.nbytes)
        for _ in range(LAST_TENSOR_RETRIES):
            if fits and left - fits[1].nbytes <= 0.005 * self.budget:
                break
            if hi - lo <= 1:
                break
            mid = self._guess_between(c, lo, hi, fits, over, left, allowed)
            if mid is None:
                break
            trial = encode_candidate(p, c, mid, self.options, fallback)
            if trial.nbytes <= left:
                fits, lo = (mid, trial), mid
            else:
                # the smaller over-budget coding is kept, the earlier at equal
                # bytes (found by review: a constant thin leaf, as many bytes at
                # every step, came back off by the coarsest step tried)
                hi = mid
                if over is None or trial.nbytes < over[1].nbytes:
                    over = (mid, trial)
        if fits is None and over[0] > 0:   # the bisection stopped short of the coarsest
            trial = encode_candidate(p, c, 0, self.options, fallback)
            if trial.nbytes <= left:
                fits = (0, trial)
            elif trial.nbytes < over[1].nbytes:
                over = (0, trial)
        if fits is None and over[0] == 0 and isinstance(over[1], codec.EncodedTensor):
            fits = self._coarser_than_curve(p, c, left)
        if (fits and over and isinstance(fits[1], codec.EncodedTensor)
                and not isinstance(over[1], codec.EncodedTensor)
                and left - fits[1].nbytes > 0.005 * self.budget):
            # a JPEG coding short of what is left beside a thin one, whose tiles cannot mix
            fits, over = self._finest_jpeg_between(p, c, fits, over, left, allowed, fallback)
            if not isinstance(over[1], codec.EncodedTensor) and (
                    left - fits[1].nbytes > 0.005 * self.budget):
                landed = self._row_range_landing(p, c, fits, left, overshoot, fallback)
                if landed is not None:
                    return fits[0], landed
        if not (fits and over and isinstance(fits[1], codec.EncodedTensor)
                and isinstance(over[1], codec.EncodedTensor)):
            if fits and over and (over[1].nbytes - left < left - fits[1].nbytes
                                  and over[1].nbytes - left <= overshoot):
                return over   # a coding that cannot be mixed: the nearer, a little over
            return fits if fits is not None else over
        mixed = _mixed_tiles(fits[1], over[1], left, p, overshoot)
        if left - mixed.nbytes > 0.005 * self.budget:
            mixed = self._mixed_in_bands(p, c, fits, over, left, overshoot, mixed)
        return fits[0], mixed

    def _finest_jpeg_between(self, p, c: Curve, fits, over, left: int, allowed, fallback):
        """(fits, over) with the finest JPEG candidate of ``c`` between them
        (of ``allowed``) coded and taken as the one it is: the bisection may
        stop at a thin coding past JPEG's finest, which cannot mix its tiles
        (found by review: a kernel whose rows spread 300x, alone in its tree,
        settled 18% under 4x on its shared scale's step 2, step 1 untried)."""
        between = [j for j in range(fits[0] + 1, over[0])
                   if not (c.thin is not None and c.thin[j]) and (allowed is None or allowed[j])]
        if not between:
            return fits, over
        j = between[-1]
        trial = encode_candidate(p, c, j, self.options, fallback)
        return ((j, trial), over) if trial.nbytes <= left else (fits, (j, trial))

    def _row_range_landing(self, p, c: Curve, fits, left: int, overshoot: int, fallback):
        """``fits`` (a candidate of ``c`` and its coding), the shared scale's
        finest step, mixed by row bands with the coarsest per-row-range
        coding over ``left`` that errs about as much or less (its rows'
        steps, d times their range / 4095, err less while d is under the
        widest row's range over the rows' RMS range; see
        ROW_RANGE_LANDING), for a last leaf whose next candidate is a thin
        coding, which has no tiles to mix: a kernel whose rows spread 300x,
        its curve's row ranges passed over by one fine step that errs less,
        landed 2% under its target. None where that comes no nearer
        ``left`` than ``fits``."""
        k, enc = fits
        if (int(c.bits[k]), int(c.delta[k])) != (12, 1) or (c.row_ranges is not None
                                                            and c.row_ranges[k]):
            return None
        prepared = fallback()
        if prepared is None:
            return None
        _, low, high = prepared.row_stats()
        ranges = np.asarray(high, np.float64) - low
        within = float(ranges.max()) / max(float(np.sqrt(np.mean(ranges ** 2))), 1e-300)
        over = None
        for d in ROW_RANGE_DELTAS:   # coarse to fine
            if d < ROW_RANGE_LANDING * within:
                over = encode_with_step(prepared, 12, d, **dict(self.options, clip="minmax"))
                if over.nbytes > left:
                    break
        if over is None or over.nbytes <= left:
            return None
        pair = Curve(np.array([12, 12]), np.array([1, d]), np.array([c.q[k], c.q[k] * d]),
                     np.array([enc.nbytes, over.nbytes], np.float64), np.zeros(2),
                     row_ranges=np.array([False, True]))
        mixed = _mixed_tiles(enc, over, left, p, overshoot)
        mixed = self._mixed_in_bands(p, pair, (0, enc), (1, over), left, overshoot, mixed)
        return mixed if abs(left - mixed.nbytes) < left - enc.nbytes and (
            mixed.nbytes <= left + overshoot) else None

    def _coarser_than_curve(self, p, c: Curve, left: int):
        """(0, a coding of ``p`` on a step coarser than its curve's coarsest
        candidate, 2^(1/4) apart up to 4x, the first within ``left``), or
        None: a last tensor over what is left at its coarsest candidate
        (found by review: EfficientNet-lite1's classifier coded last at
        13.7x took 10.8% more than its coarsest's prediction, and the file
        came out 1.6% over, warned of nowhere). Where the first within
        ``left`` lands more than 1% of the budget under it, the step is
        bisected (in log) towards the last over it, COARSER_BISECTIONS times
        at most (found by review: at 0.6 bits a weight a quarter octave
        coarser took 39% fewer bytes, and a file of a stack and one matrix
        landed 10% under its target)."""
        if _own_scale(c, 0):
            return None
        smallest, over = math.inf, float(c.q[0])
        for i in range(1, 9):
            q = float(c.q[0]) * 2 ** (i / 4)
            enc = encode_at_step(p, q, bits=int(c.bits[0]), **self.options)
            if enc.nbytes <= left:
                return 0, self._bisected_step(p, c, over, q, enc, left)
            if enc.nbytes >= smallest:   # the coarsest step the samples take
                return None
            smallest, over = enc.nbytes, q
        return None

    def _bisected_step(self, p, c: Curve, over: float, fits: float,
                       enc: codec.EncodedTensor, left: int) -> codec.EncodedTensor:
        """The coding within ``left`` nearest to it found between steps
        ``over`` (whose coding is over it) and ``fits`` (``enc``'s)."""
        for _ in range(COARSER_BISECTIONS):
            if left - enc.nbytes <= 0.01 * self.budget:
                break
            mid = math.sqrt(over * fits)
            trial = encode_at_step(p, mid, bits=int(c.bits[0]), **self.options)
            if trial.nbytes <= left:
                fits, enc = mid, trial
            else:
                over = mid
        return enc

    def _mixed_in_bands(self, p, c: Curve, fits, over, left: int, overshoot: int,
                        best: codec.EncodedTensor) -> codec.EncodedTensor:
        """Where ``fits`` and ``over`` (candidates of ``c``) left ``best``
        short: ``p`` cut into bands (_in_bands), its two codings around
        ``left`` coded again there and mixed band by band; the nearest to
        ``left`` of those and ``best``.

        A kernel coded with error feedback mixes by output bands, between
        its integer steps (found by review: its codings at steps 1 and 2 are
        17% apart, not widened, and were not mixed: a file of one calibrated
        kernel landed 14% under its target). Two codings on different row
        maps (a shared scale's and per-row ranges') mix by row bands, cut
        where their restart intervals put the bytes they differ by
        (_block_row_gains), twice: cutting changes each tile's Huffman
        tables, so the second cut follows the first's codings (found by
        review: a kernel whose rows' ranges spread 300x had no coding
        between the two, 20% apart, and landed up to 16.6% under)."""
        a, b = fits[1], over[1]

        def miss(enc):
            return abs(left - enc.nbytes) if enc.nbytes <= left + overshoot else math.inf
        if p.feedback is not None:
            unwidened = np.flatnonzero(_unwidened(p, c))
            lower, upper = unwidened[unwidened <= fits[0]], unwidened[unwidened >= over[0]]
            if not (len(lower) and len(upper)):
                return best
            banded = _in_bands(p, _output_side(p), a, self._tile_shape)
            if banded is not p:
                a, b = (encode_candidate(banded, c, int(k), self.options)
                        for k in (lower[-1], upper[0]))
                if isinstance(a, codec.EncodedTensor) and isinstance(b, codec.EncodedTensor):
                    mixed = _mixed_tiles(a, b, left, banded, overshoot)
                    best = mixed if miss(mixed) < miss(best) else best
            return best
        if a.view != b.view:
            return best
        lo, hi = fits[0], over[0]
        for _ in range(2):
            banded = _in_bands(p, 0, a, self._tile_shape, _block_row_gains(a, b))
            if banded is p:
                break
            fallback = functools.cache(lambda: row_range_fallback(banded))
            a, b = (encode_candidate(banded, c, k, self.options, fallback) for k in (lo, hi))
            # cut, both may come out under what is left (or over): the next pair
            # (found by review: a row-spread kernel's steps 2 and 1 both shrank 8%)
            if b.nbytes < left and hi + 1 < len(c.nbytes):
                lo, hi = hi, hi + 1
                a, b = b, encode_candidate(banded, c, hi, self.options, fallback)
            elif a.nbytes > left and lo > 0:
                lo, hi = lo - 1, lo
                a, b = encode_candidate(banded, c, lo, self.options, fallback), a
            if not isinstance(b, codec.EncodedTensor):
                # the next candidate a thin coding (no tiles): per-row ranges past ``a``
                landed = self._row_range_landing(banded, c, (lo, a), left, overshoot, fallback)
                if landed is not None and miss(landed) < miss(best):
                    best = landed
                break
            if not isinstance(a, codec.EncodedTensor):
                break
            mixed = _mixed_tiles(a, b, left, banded, overshoot)
            best = mixed if miss(mixed) < miss(best) else best
        return best

    def _settle_starving(self, name, p, c: Curve, k: int, enc, fallback, choices):
        """A tensor whose miss would take more than STARVING_SHARE of the
        bytes the tensors after it are to get is settled as the last one is,
        to leave them those bytes (found by review: a 418 K-value kernel 3.5%
        over its prediction left the 16 K-value kernel coded after it 43% of
        its bytes, relative error 0.46 against 0.02 when coded first); so is
        one that leaves more than those tensors can take at their finest
        codings (found by review: a 655 K-value kernel coded before three
        64 x 64 ones left 2.4% of a file unspent)."""
        correction = self._correction()
        # the pending tensors' predicted total (_choices), less this one's
        rest = self._planned_total - correction * float(
            self._nbytes[self._rows[name], choices[name]])
        share = self.budget - self.spent - rest
        most = correction * (self._most_pending - self._most[name])   # the rest at their finest
        if (enc.nbytes - share <= STARVING_SHARE * rest
                and share - enc.nbytes <= most - rest + UNSPENT_SLACK * self.budget):
            return k, enc
        return self._settle_last(p, c, k, enc, fallback, left=share)

    @staticmethod
    def _guess_between(c: Curve, lo: int, hi: int, fits, over, left,
                       allowed=None) -> int | None:
        """A candidate strictly between lo and hi (of ``allowed``, a mask;
        None if there is none): where the curve, rescaled by the nearest real
        coding, predicts ``left`` bytes, else the one next to the end it
        points past (found by review: two adjacent candidates a few bytes
        over, the middle of 0..180 was taken, a step 8x coarser than either
        and 24x the error)."""
        k, enc = fits or over
        scaled = c.nbytes * (enc.nbytes / c.nbytes[k])
        guess = min(max(int(np.searchsorted(scaled, left)) - 1, lo + 1), hi - 1)
        if allowed is None:
            return guess
        between = np.flatnonzero(allowed[lo + 1:hi]) + lo + 1
        if not len(between):
            return None
        coarser = between[between <= guess]
        return int(coarser[-1]) if len(coarser) else int(between[0])

    def coded_ahead(self, name: str, p: codec.Prepared,
                    room: Callable[[float], bool] = lambda nbytes: True) -> tuple | None:
        """Tensor ``name`` coded before its turn as the last tensor's choice
        chose it (candidate, coding, its row-range fallback), for
        :meth:`encode` to keep where its own choice is the same (choices
        seldom move from one tensor to the next: on a 256 MB tree 93% of
        them stayed): tensors are coded in order, each choice depending on
        the bytes the tensors before it took, and a save codes the next
        ones meanwhile on its other threads, the files the same. None where
        no choice was made yet, ``room(predicted bytes)`` refuses to hold
        the coding, or the coding failed (its turn codes it)."""
        k = self._last_choices.get(name)
        c = self.curves.get(name)
        if k is None or c is None or not room(float(c.nbytes[k])):
            return None
        fallback = functools.cache(lambda: row_range_fallback(p))
        try:
            return k, encode_candidate(p, c, k, self.options, fallback), fallback
        except Exception:   # (its turn codes it again, and says what failed)
            return None

    def encode(self, name: str, p: codec.Prepared,
               ahead: tuple | None = None) -> codec.EncodedTensor:
        """Codes tensor ``name`` (prepared as when the curves were measured);
        ``ahead``: what :meth:`coded_ahead` gave, kept where this choice is
        its candidate."""
        if name not in self.pending:
            raise KeyError(f"{name!r} is not waiting to be coded")
        c = self.curves[name]
        choices = self._choices()
        self._last_choices = choices
        k = choices[name]
        if ahead is not None and ahead[0] == k:
            enc, fallback = ahead[1], ahead[2]
        else:   # (a row-range fallback coding ahead prepared is p's as well)
            fallback = (ahead[2] if ahead is not None   # prepared once, if at all
                        else functools.cache(lambda: row_range_fallback(p)))
            enc = encode_candidate(p, c, k, self.options, fallback)
        if self.pending == {name}:
            k, enc = self._settle_last(p, c, k, enc, fallback)
        else:
            k, enc = self._settle_starving(name, p, c, k, enc, fallback, choices)
        self.pending.discard(name)
        self._most_pending -= self._most[name]
        self.all_finest = self.all_finest and k == len(c.nbytes) - 1
        self.spent += enc.nbytes
        self.predicted_spent += float(c.nbytes[k])
        self.steps[name] = float(c.q[k])
        self.squared_errors[name] = float(c.sse[k])
        del self.curves[name]   # the tables hold what later choices need
        if not self.pending:    # a save holds the allocator until its header is written
            self._nbytes = self._dist = self._pick_dist = self._finite = None
            self._breaks = self._pending = None
        return enc


def allocate_to_target(tensors: Mapping[str, np.ndarray], target_bytes: int | None = None, *,
                       ratio: float | None = None, sensitivity: Mapping[str, float] | None = None,
                       row_weights: Mapping[str, np.ndarray] | None = None,
                       bits: int | None = None, tolerance: float = 0.02,
                       **options) -> Allocation:
    """Codes every tensor so the total size is within ``tolerance`` of the target.

    Exactly one of ``target_bytes`` or ``ratio`` (target = original bytes /
    ratio). Minimises ``Σ sensitivity[name] * SSE[name]`` (sensitivity
    defaults to 1, e.g. mean squared gradients from
    :func:`sensitivity_from_gradients`) with :class:`BudgetAllocator`.
    ``tensors`` may hold arrays (coded in the framework's view, with
    ``row_weights`` if given) or :func:`prepare_leaf` results. Raises
    ValueError when even the coarsest steps exceed the target.
    """
    del tolerance  # the allocator corrects as it goes; kept for callers
    if (target_bytes is None) == (ratio is None):
        raise ValueError("give exactly one of target_bytes or ratio")
    names = list(tensors)
    if not names:
        raise ValueError("no tensors to allocate")
    prepared = {n: _as_prepared(tensors[n], (row_weights or {}).get(n)) for n in names}
    if target_bytes is None:
        target_bytes = int(sum(np.asarray(p.original).nbytes for p in prepared.values()) / ratio)
    total = sum(p.size for p in prepared.values())
    reach = reach_of(target_bytes, total)

    def measure(floor):   # a tensor's curve in one thread, tensors on the tile pool's
        def curve(n):
            return rd_curve(prepared[n], bits, reach=reach, floor=floor,
                            probe_size=probe_elements(prepared[n].size, total), **options)
        return dict(zip(names, codec.tile_pool().map(curve, names)))

    curves = measure(sensitivity is None)
    if sensitivity is None and floors_exceed(curves, target_bytes):
        curves = measure(False)
    allocator = BudgetAllocator(curves, target_bytes, sensitivity=sensitivity, **options)
    # Largest first: the small tensors coded last absorb what the large ones missed.
    order = sorted(names, key=lambda n: -prepared[n].size)
    encodings = {n: allocator.encode(n, prepared[n]) for n in order}
    encodings = {n: encodings[n] for n in names}
    achieved = sum(e.nbytes for e in encodings.values())
    errors = {n: squared_error(prepared[n], e) for n, e in encodings.items()}
    return Allocation(encodings, achieved, int(target_bytes), allocator.steps, errors,
                      allocator.slope)


# ----------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------

def leaf_name(path) -> str:
    """A jax key path as the checkpoint names leaves (slash-joined, as
    ``paths=`` patterns, targets and ``sensitivity`` keys match them)."""
    return path_string([key_record(k) for k in path])


def sensitivity_from_gradients(loss_fn: Callable, params, batches: Iterable, *,
                               per_row: bool = False, per_element: bool = False,
                               prefix: str = "") -> dict:
    """Mean squared gradient of ``loss_fn(params, batch)`` per leaf, over ``batches``.

    Returns ``{leaf name: float}`` (names as :func:`leaf_name`), usable as
    ``jaxjpeg.save(..., sensitivity=)``; with ``per_element=True`` ``{leaf
    name: float64 array of the leaf's shape}``, which save also takes (the
    coder reduces it to per-row and per-column steps of the view it chooses);
    with ``per_row=True`` ``{leaf name: float64 of the leaf's shape but its
    last axis, 1}``, the mean over each row of the framework-order view
    (``row_weights`` of :func:`allocate_to_target`; save broadcasts it over
    the last axis: found by review, a flat [rows] array went onto the
    columns of a square leaf). The squared gradient approximates the
    diagonal Fisher information, so ``sensitivity * squared error`` estimates
    the loss increase, for small errors: at 8x and beyond, review measured a
    well-fitted digits MLP's KL 2.5x (per element) and 1.1x (per leaf) the
    data-free save's, and EfficientNet-lite's per-leaf Fisher allocates
    worse than the data-free weighting (docs/real_models.md, session 21):
    check it on held-out data. ``prefix`` goes before every name: "params/"
    where ``params`` is ``variables["params"]`` and the whole ``variables``
    are saved (as :func:`jaxjpeg.calibration.input_covariances` names them;
    found by review: without it such a save was refused).
    """
    import jax
    import jax.numpy as jnp

    if per_row and per_element:
        raise ValueError("give per_row or per_element, not both")
    grad_fn = jax.jit(jax.grad(loss_fn))

    def unit_of(g):
        """The largest magnitude of ``g`` (1 where 0 or not finite): squared
        as they are, float32 gradients under 1e-23 were 0 and their leaves
        counted unreached (found by review); squared over it, they are not."""
        top = jnp.max(jnp.abs(g.astype(jnp.float32)), initial=0.0)
        return jnp.where((top > 0) & jnp.isfinite(top), top, 1.0)

    def reduce(g):
        g2 = jnp.square(g.astype(jnp.float32) / unit_of(g))
        if per_element:
            return g2
        if not g.size:   # nothing to weigh (found by review: the mean of none, NaN)
            return jnp.zeros(g.shape[:-1] + (1,) if per_row and g.ndim else ())
        if per_row:   # shaped to broadcast over the last axis, as save takes it
            rows, cols = codec.matrix_shape(g.shape)
            means = jnp.mean(g2.reshape(rows, cols), axis=1)
            # a scalar leaf's one number has its shape () (found by review:
            # shape (1,), which save refused)
            return means.reshape(g.shape[:-1] + (1,)) if g.ndim else means.reshape(())
        return jnp.mean(g2)

    tree_map, leaves = jax.tree_util.tree_map, jax.tree_util.tree_leaves
    reduce_tree = jax.jit(lambda g: (tree_map(reduce, g), tree_map(unit_of, g)))
    acc, count = None, 0
    for batch in batches:
        squares, units = reduce_tree(grad_fn(params, batch))
        # on the host in float64: each leaf's reduced squares times its unit squared
        sums = [np.asarray(r, np.float64) * float(u) ** 2
                for r, u in zip(leaves(squares), leaves(units))]
        acc = sums if acc is None else [a + b for a, b in zip(acc, sums)]
        count += 1
    if count == 0:
        raise ValueError("no batches")
    flat = [(prefix + leaf_name(path), leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0]]
    out = {name: value / count for (name, _), value in zip(flat, acc)}

    leaves_by_name = dict(flat)

    def mean_square(name: str) -> float:
        """A leaf's mean square of its finite values, in float64 on the host:
        over its largest magnitude in float32 (found by review: squared as
        they are, 1e20 overflowed to inf and 1e-21 to 0), on its device."""
        x = jnp.asarray(leaves_by_name[name]).astype(jnp.float32)
        x = jnp.where(jnp.isfinite(x), x, 0.0)   # found by review: one inf, weight 0
        if not x.size:
            return 0.0
        top = float(unit_of(x))
        return float(jnp.mean(jnp.square(x / top))) * top * top
    out = _unreached_as_least(out, {name: np.size(leaf) for name, leaf in flat}, mean_square)
    return out if (per_row or per_element) else {name: float(v) for name, v in out.items()}


def _unreached_as_least(sensitivity: dict, sizes: dict, mean_square) -> dict:
    """``sensitivity`` with the leaves whose squared gradients were 0 on
    every batch weighed as the least of the others, per unit of relative
    squared error: the reached leaf of least sensitivity (its mean over the
    leaf) lends its weight times its mean square (``mean_square(name)``),
    shared out over each unreached leaf's own. The batches did not reach
    them (an expert never routed to, a frozen or stopped branch), which says
    nothing of what they do at inference, and a weight of 0 would give them
    no bytes (found by review: an unrouted expert restored at relative error
    0.998). Per unit of squared error instead, an unused kernel 16x the RMS
    of the reached ones took their bytes: at 16x a hidden layer restored at
    0.998 (review). Only the few leaves that need it are squared (once per
    leaf of a tree of 300 distinct shapes took 15 s more: review). Warns,
    naming them. Empty leaves (``sizes``: each leaf's values) have nothing
    to weigh; a leaf whose gradients were not finite is left for save to
    refuse, and weighs nothing here."""
    unreached = sorted(name for name, v in sensitivity.items()
                       if sizes[name] and not np.any(v))
    if not unreached:
        return sensitivity
    means = {name: float(np.mean(v)) for name, v in sensitivity.items()
             if sizes[name] and np.any(v)}
    reached = {name: m for name, m in means.items() if math.isfinite(m) and m > 0}
    if not reached:
        raise ValueError("the gradients were 0 for every leaf on every batch: "
                         "the loss does not depend on the parameters")
    lender = min(reached, key=reached.get)
    least = reached[lender] * mean_square(lender)
    warnings.warn(f"the gradients were 0 on every batch for {len(unreached)} leaves "
                  f"({first_names([repr(name) for name in unreached])}): "
                  f"they are weighed as the least of the others ({lender!r}), relative to "
                  f"each leaf's mean square", stacklevel=3)

    def weight(name):   # an all-zero leaf (or an all-zero lender): per unit of squared error
        square = mean_square(name)
        return least / square if least > 0 and square > 0 else reached[lender]
    return {name: np.full_like(v, weight(name)) if name in unreached else v
            for name, v in sensitivity.items()}
