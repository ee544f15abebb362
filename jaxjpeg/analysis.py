"""A leaf's analysis from one native pass over it.

:func:`jaxjpeg.rate.prepare_leaf` chooses a leaf's view, looks for values to
keep exactly and computes each row's mean, minimum and maximum for its
sample map: in numpy that reads the leaf about ten times. In the common case
(every value finite and within range, no value far from its row's mean, no
importance or input covariance) all of it follows from per-axis sums, sums of
squares, minima and maxima, which ``_native.matrix_stats`` computes in one
pass (GIL released, so leaves are analysed on all cores). :func:`prepare_plain`
makes the same choices from them, and returns None -- the caller then runs
the full analysis -- whenever a leaf falls outside that case.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref

import numpy as np

from jaxjpeg import _native, codec, views

# A row whose sum of squares loses more than this fraction of its variance to
# cancellation (|mean| >> spread) is analysed by the full path instead.
MIN_VARIANCE_FRACTION = 1e-8
# The outlier test here is float64 and the full path's float32: a row within
# this relative margin of its threshold goes to the full path.
OUTLIER_MARGIN = 1e-3


@dataclasses.dataclass(frozen=True)
class SliceStats:
    """Statistics of the slices of a tensor along one axis (sums in float64)."""

    sum: np.ndarray
    squares: np.ndarray
    min: np.ndarray       # float32
    max: np.ndarray       # float32
    count: int            # elements per slice

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(1, self.count)

    @property
    def variance(self) -> np.ndarray:
        """Each slice's mean square about its mean (float64; rounding can
        leave it below 0 where the mean dwarfs the spread)."""
        return self.squares / max(1, self.count) - self.mean * self.mean

    @property
    def rms(self) -> np.ndarray:
        """Root mean square of each slice (as :func:`jaxjpeg.views.axis_rms`)."""
        return np.sqrt(self.squares / max(1, self.count))


@dataclasses.dataclass(frozen=True)
class LeafStats:
    """One pass over a float32 tensor: per-axis slice statistics, the flat
    rows (every axis but the last) and how many values are special."""

    shape: tuple[int, ...]
    axes: tuple[SliceStats, ...]
    rows: SliceStats          # the (prod(shape[:-1]), shape[-1]) matrix's rows
    special: int              # values with !(|x| <= limit)

    @property
    def total_squares(self) -> float:
        return float(self.rows.squares.sum())


def leaf_stats(x32: np.ndarray, limit: float) -> LeafStats | None:
    """:class:`LeafStats` of a C-contiguous float32 array of at least one
    axis and one element; None for anything else."""
    if (x32.dtype != np.float32 or x32.ndim == 0 or x32.size == 0
            or not x32.flags.c_contiguous):
        return None
    shape = tuple(x32.shape)
    cols = shape[-1]
    special, rows, columns = _native.matrix_stats(x32.reshape(-1, cols), limit)
    row_stats = SliceStats(*rows, count=cols)
    axes = [_reduced(rows, shape[:-1], a, x32.size) for a in range(len(shape) - 1)]
    axes.append(SliceStats(*columns, count=x32.size // cols))
    return LeafStats(shape, tuple(axes), row_stats, int(special))


# The statistics count_special computed last in this thread, for the
# prepare_plain of the same array that follows it in a save.
_last = threading.local()


def count_special(x) -> int:
    """:func:`jaxjpeg.views.count_special` of ``x``, from the native pass when
    it can read ``x``: a save counts a leaf's special values before coding it,
    and :func:`prepare_plain` of the same array object then takes that pass's
    statistics instead of reading the leaf again."""
    x = np.asarray(x)
    stats = _native_stats(x)
    if stats is None:
        return views.count_special(x)
    _last.entry = (weakref.ref(x), stats)
    return stats.special


def last_rms(x) -> float | None:
    """RMS of ``x`` from the statistics :func:`count_special` has just
    computed for it in this thread, without taking them from the prepare
    that follows; None where it has not, or where ``x`` holds non-finite
    values."""
    entry = getattr(_last, "entry", None)
    if entry is None or entry[0]() is not x:
        return None
    squares = entry[1].total_squares
    return math.sqrt(squares / x.size) if math.isfinite(squares) else None


def _native_stats(x: np.ndarray) -> LeafStats | None:
    return leaf_stats(x.astype(np.float32, copy=False), views.extreme_limit(x.dtype))


def _stats_for_prepare(x: np.ndarray) -> LeafStats | None:
    """count_special's statistics of ``x`` if it has just counted ``x`` in this
    thread (taken once: a caller may change the array afterwards), else a new pass."""
    entry = getattr(_last, "entry", None)
    _last.entry = None
    if entry is not None and entry[0]() is x:
        return entry[1]
    return _native_stats(x)


def _reduced(rows, lead_shape, axis: int, size: int) -> SliceStats:
    """Slice statistics along ``axis`` of the leading axes from the flat rows'."""
    others = tuple(a for a in range(len(lead_shape)) if a != axis)
    total, squares, low, high = (np.asarray(v).reshape(lead_shape) for v in rows)
    return SliceStats(total.sum(axis=others), squares.sum(axis=others), low.min(axis=others),
                      high.max(axis=others), count=size // lead_shape[axis])


def view_rows(stats: LeafStats, view: views.MatrixView) -> SliceStats | None:
    """Statistics of the rows of ``view`` (None for a view whose rows mix axes
    in another way than the leaf's flat rows)."""
    ndim = len(stats.shape)
    if view.split == 1:
        return stats.axes[view.perm[0]]
    if view.split == ndim - 1 and view.perm == tuple(range(ndim)):
        return stats.rows
    if view.split == 0:   # one row: the whole tensor
        last = stats.axes[-1]
        return SliceStats(np.array([last.sum.sum()]), np.array([last.squares.sum()]),
                          np.array([last.min.min()], np.float32),
                          np.array([last.max.max()], np.float32),
                          count=math.prod(stats.shape))
    return None


def may_have_far_values(rows: SliceStats, sigmas: float = views.OUTLIER_SIGMAS) -> bool:
    """Whether some row might hold a value that :func:`jaxjpeg.views.find_outliers`
    keeps by its first look (more than ``sigmas`` row RMS from the row
    mean), or the statistics cannot tell (cancellation). Its second look, at
    rows reaching ``sigmas / 2`` RMS, is :func:`suspect_rows` and
    :func:`hide_far_values`."""
    mean = rows.mean
    variance = rows.variance
    varies = rows.max > rows.min   # a constant row has no far values (its RMS is 0)
    if np.any(varies & (variance < MIN_VARIANCE_FRACTION * mean * mean)):
        return True
    rms = np.sqrt(np.maximum(variance, 0.0))
    reach = np.maximum(rows.max - mean, mean - rows.min)
    return bool(np.any(varies & (reach > (1 - OUTLIER_MARGIN) * sigmas * rms)))


def suspect_rows(rows: SliceStats, sigmas: float = views.OUTLIER_SIGMAS) -> np.ndarray:
    """The rows reaching ``sigmas / 2`` RMS from their mean (a few rows of
    heavy-tailed weights): where far values may inflate the RMS enough to
    hide (two in a row of 256 stand only 11 RMS out), and find_outliers
    takes a second look."""
    mean = rows.mean
    rms = np.sqrt(np.maximum(rows.variance, 0.0))
    reach = np.maximum(rows.max - mean, mean - rows.min)
    return np.flatnonzero(reach > (1 - OUTLIER_MARGIN) * (sigmas / 2) * rms)


def hide_far_values(matrix: np.ndarray, suspect: np.ndarray,
                    sigmas: float = views.OUTLIER_SIGMAS) -> bool:
    """Whether the ``suspect`` rows of ``matrix`` (see :func:`suspect_rows`)
    hold values find_outliers' second look keeps; a block of rows at a time
    (found by review: all at once, the rows of heavy-tailed leaves, most of
    them suspect, took six leaf-sized temporaries, and a default save of a
    1 GB CNN held 13 of its 38 MB leaves)."""
    step = views.rows_per_block(matrix)
    for start in range(0, suspect.size, step):
        rows = np.asarray(matrix[suspect[start:start + step]], np.float32)
        if views.far_from_row_mean(rows, None, (1 - OUTLIER_MARGIN) * sigmas).any():
            return True
    return False


def has_gross_values(rows: SliceStats, matrix: np.ndarray) -> bool:
    """Whether some loud row of ``matrix`` (the view of the leaf whose row
    statistics are ``rows``) might hold gross values, which find_outliers
    keeps (:func:`jaxjpeg.views.gross_values`): its bounds OUTLIER_MARGIN
    either way (found by review: lowered only, the count of far values
    could pass the rule's limit and the gate missed a block gross at the
    rule's own bound); only loud rows are read. Where there is no quiet
    median row (none, or gross values in every row:
    :func:`jaxjpeg.views.rows_hide_gross_values`) or a row may hold more
    than its share, find_outliers reads the leaf as one population, and so
    does this, with the same functions (:func:`jaxjpeg.views.gross_in_leaf`)."""
    # a constant row's RMS is 0 exactly, as find_outliers finds it (rows
    # whose variance cancels never reach here: may_have_far_values)
    rms = np.where(rows.max > rows.min, np.sqrt(np.maximum(rows.variance, 0.0)), 0.0)
    bound = views.quiet_bound(rms, matrix.shape[1])
    crowded = False
    if bound is not None:
        loud = np.flatnonzero(rms > (1 - OUTLIER_MARGIN) * bound)
        step = views.rows_per_block(matrix)
        for i in range(0, loud.size, step):
            gross, past_share = views.gross_prospects(matrix[loud[i:i + step]], bound,
                                                      OUTLIER_MARGIN)
            if gross:
                return True
            crowded = crowded or past_share
    return ((bound is None or crowded or views.rows_hide_gross_values(matrix))
            and views.gross_in_leaf(matrix)[0].size > 0)


def no_far_values(x: np.ndarray, view: views.MatrixView) -> views.Outliers | None:
    """An empty side list when one native pass over ``x`` (float32,
    C-contiguous, finite) shows that :func:`views.find_outliers` would keep
    nothing in ``view``, else None (find_outliers must look): saves its
    passes over the leaf, most of a BatchNorm network's preparation."""
    stats = _stats_for_prepare(x)
    if stats is None or stats.special:
        return None
    rows = view_rows(stats, view)
    if rows is None or may_have_far_values(rows):
        return None
    suspect = suspect_rows(rows)
    matrix = views.read_matrix(x, view)
    if hide_far_values(matrix, suspect) or has_gross_values(rows, matrix):
        return None
    return views.Outliers(np.zeros(0, np.int64), x.reshape(-1)[:0].copy())


def prepare_plain(x, view: str, shards=None,
                  checked: views.MatrixView | None = None) -> codec.Prepared | None:
    """:func:`jaxjpeg.rate.prepare_leaf` of a leaf without importance or input
    covariance, from :func:`leaf_stats`; None when the leaf needs the full
    analysis (special or far values, or a layout the native pass does not read).
    ``checked``: the view a prepare_plain of these same values chose (a byte
    target prepares each leaf twice): its checks for loud slices and far
    values, which passed then, are not taken again.
    """
    x = np.asarray(x)
    stats = _stats_for_prepare(x)
    if stats is None or stats.special:
        return None
    x32 = x.astype(np.float32, copy=False)
    if checked is not None:
        rows = view_rows(stats, checked)
        return None if rows is None else _plain_prepared(
            x, stats, checked, rows, codec.encodable(checked.to_matrix(x32)), shards)
    rms = [a.rms for a in stats.axes]
    lead = views.sharded_axes(shards)
    if view == "auto" and views.loud_slices(stats.shape, rms, shards,
                                            views.merged_rms(x32, rms)) is not None:
        return None   # loud slices, balanced by the full analysis (rate.prepare_leaf)
    if view == "auto":
        chosen = views.view_from_rms(stats.shape, rms, lead, views.narrow_axes(shards))
    else:
        chosen = views.MatrixView.default(x.ndim)
    rows = view_rows(stats, chosen)
    if rows is None or may_have_far_values(rows):
        return None
    # The identity view of a C-contiguous leaf is a reshape, and a view whose
    # rows are the leaf's last axis is its transpose: the encoder reads both
    # without a copy (codec.encodable).
    matrix = codec.encodable(chosen.to_matrix(x32))
    suspect = suspect_rows(rows)
    if hide_far_values(matrix, suspect) or has_gross_values(rows, matrix):
        return None
    return _plain_prepared(x, stats, chosen, rows, matrix, shards)


def _plain_prepared(x: np.ndarray, stats: LeafStats, view: views.MatrixView,
                    rows: SliceStats, matrix: np.ndarray, shards) -> codec.Prepared:
    """prepare_plain's leaf once its checks have passed."""
    shared = matrix.shape[1] < codec.SHARED_MAP_COLS
    centers = (np.full(matrix.shape[0], rows.sum.sum() / max(1, matrix.size)) if shared
               else rows.mean)
    caches = {"stats": (centers, rows.min, rows.max), "squares": stats.total_squares,
              "row_variance": rows.variance}
    p = codec.Prepared(tuple(x.shape), str(x.dtype), view, matrix, None, None, None, x,
                       shared, scales=caches)
    return p.with_shards(shards)
