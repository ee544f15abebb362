"""How a tensor becomes the 2-D matrix the coder sees, and what it may leave out.

The coder, not the framework's axis order, decides the view: which axes
become rows and which columns (a PyTorch ``(O, I, kh, kw)`` kernel and its
Flax ``(kh, kw, I, O)`` transpose get the same matrix), how much each row and
column matters, and which values are kept exactly in a sparse side list
(non-finite values, values near the dtype's limits, far outliers).

* :class:`MatrixView` -- a permutation of the axes and the split between row
  and column axes, recorded in the file so restore is exact.
* :func:`choose_view` -- the row axis is the channel-like axis (size >= 8)
  whose slices differ most in scale: in trained networks that is the output
  channel (BatchNorm renormalises each output channel, so its weights' scale
  is free and varies widely). Column axes follow in a canonical order
  (larger first), so every layout of the same weights gives one matrix;
  the slices of an axis whose scales spread share no 8 x 8 block
  (``_slices_apart``).
* :func:`find_outliers` -- the side list.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import numpy as np

MIN_CHANNEL = 8            # axes shorter than this (kernel taps) never become rows alone
# Slice scales that spread less (std of log2 RMS, beyond sampling noise) are
# alike: what Gaussian noise leaves after the correction is ~0.005-0.016
# (768 to 64 slices); trained layers measured here spread 0.047 and more.
MIN_SPREAD = 0.03
# Slices of an axis that spread this much (std of log2 RMS, beyond
# sampling) share no 8 x 8 block (_slices_apart): a block's coding
# noise reaches all its 64 values, so a quiet slice beside a loud one took
# the loud one's noise (an unnamed stack of layers at 1 / 0.1 / 0.01 /
# 0.001, its layers interleaved among the columns: the quietest at relative
# error 41; 8 layers from 1 to 0.01 as 8 rows, each block one row of each:
# 3.4). A quiet slice apart costs what its own values need. Where a short
# axis only led the columns, each row's offset, the loud slices' mean, set
# the quiet slice's level: 13.8.
APART_SPREAD = 1.0
APART_MAX_ROWS = 64
BLOCK = 8   # a JPEG block's rows
APART_MIN_COLUMNS = 64   # rows' maps (4 bytes each) at most 1/2 bit a value
OUTLIER_SIGMAS = 12.0      # |w - row mean| beyond this many row RMS: kept exactly
STEPPED_FAR = 1024.0   # Outliers.steppable: how far a kept value may lie on a thin coding
# More far values than this: code them instead. A far value costs ~6 bytes
# kept; coded, it stretches its row's range over every other weight (found
# by review: at 1/256, spikes 1000x the weights at 0.42% of a leaf were
# coded and the rest restored at relative error 3.4). Values found only by
# the second look (see MASKED_SIGMAS_FACTOR) keep the old 1/256: many of
# them are a loud channel across the rows (one value of each row), which
# the row maps code better. No leaf of EfficientNet-lite1/-lite2 or PP-OCRv6
# has more than 13 far values.
MAX_OUTLIER_FRACTION = 1 / 32
MAX_MASKED_FRACTION = 1 / 256


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """Axes ``perm[:split]`` become rows, ``perm[split:]`` columns (C order each)."""

    perm: tuple[int, ...]
    split: int

    @classmethod
    def default(cls, ndim: int) -> "MatrixView":
        """The framework's order: every axis but the last to rows (a 0-d/1-D tensor is one row)."""
        return cls(tuple(range(ndim)), max(0, ndim - 1))

    @classmethod
    def from_record(cls, record, ndim: int) -> "MatrixView":
        """Parses ``{"perm": [...], "split": k}``; ValueError if it is not a view of ``ndim`` axes."""
        if not isinstance(record, dict):
            raise ValueError(f"view must be an object, got {record!r:.80}")
        perm, split = record.get("perm"), record.get("split")
        if (not isinstance(perm, list) or not all(type(a) is int for a in perm)
                or sorted(perm) != list(range(ndim)) or type(split) is not int
                or not 0 <= split <= ndim):
            raise ValueError(f"view {record!r:.80} is not a view of a {ndim}-d tensor")
        return cls(tuple(perm), split)

    def record(self) -> dict:
        return {"perm": list(self.perm), "split": self.split}

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        rows = math.prod(shape[a] for a in self.perm[:self.split])
        cols = math.prod(shape[a] for a in self.perm[self.split:])
        return int(rows), int(cols)

    def permuted_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(shape[a]) for a in self.perm)

    def inverse(self) -> tuple[int, ...]:
        return tuple(int(a) for a in np.argsort(self.perm))

    def to_matrix(self, x):
        """``x`` (numpy or jax) as its 2-D view."""
        return x.transpose(self.perm).reshape(self.matrix_shape(x.shape))

    def from_matrix(self, m, shape: Sequence[int]):
        """The tensor of ``shape`` whose view is ``m`` (numpy or jax)."""
        return m.reshape(self.permuted_shape(shape)).transpose(self.inverse())

    def moves_data(self, shape: Sequence[int]) -> bool:
        """Whether the view reorders the tensor's elements (a transpose, not
        a reshape): axes of length 1 may move freely."""
        kept = [a for a in self.perm if shape[a] != 1]
        return kept != sorted(kept)

    def positions(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(row_at, col_at), int64: element (r, c) of the view is element
        ``row_at[r] + col_at[c]`` of the C-ordered tensor of ``shape`` (the
        decoder's placement by table, xla_ops/output_stage.h)."""
        strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
        return tuple(_offsets([int(shape[a]) for a in axes], [int(strides[a]) for a in axes])
                     for axes in (self.row_axes(), self.col_axes()))

    def cells(self, shape: Sequence[int], flat_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) in the view of the C-order flat positions
        ``flat_index`` of a tensor of ``shape``: memory by their count, not
        the tensor's."""
        shape = tuple(int(n) for n in shape)
        at = np.unravel_index(np.asarray(flat_index, np.int64), shape) if shape else ()

        def flat(axes):
            if not axes:
                return np.zeros(np.shape(flat_index), np.int64)
            return np.ravel_multi_index([at[a] for a in axes], [shape[a] for a in axes])
        return flat(self.row_axes()), flat(self.col_axes())

    def flat_index(self, shape: Sequence[int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The C-order flat positions in a tensor of ``shape`` of the view's
        cells (``rows``, ``cols``): the inverse of :meth:`cells`."""
        shape = tuple(int(n) for n in shape)
        at = [None] * len(shape)
        for axes, index in ((self.row_axes(), rows), (self.col_axes(), cols)):
            if axes:
                for a, i in zip(axes, np.unravel_index(np.asarray(index, np.int64),
                                                       [shape[a] for a in axes])):
                    at[a] = i
        if not shape:
            return np.zeros(np.shape(rows), np.int64)
        return np.ravel_multi_index(at, shape).astype(np.int64)

    def row_axes(self) -> tuple[int, ...]:
        return self.perm[:self.split]

    def col_axes(self) -> tuple[int, ...]:
        return self.perm[self.split:]

    def shard_cuts(self, shape: Sequence[int], regions) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(row cuts, col cuts): where tile edges must fall so that each of
        ``regions`` (shards, as for :meth:`box`) reads only tiles of its own.

        On each side, a region whose positions form one contiguous range
        (e.g. a shard of the side's leading axis, or of a side that is one
        axis) gives that range's ends; a region strided along a side (a shard
        of an inner axis) gives nothing there: no tile edges keep its reads
        to its own elements, and cutting for it would only add tiles."""
        cuts: tuple[set, set] = (set(), set())
        for ranges in regions:
            for side, axes in enumerate((self.row_axes(), self.col_axes())):
                start, stop = _side_range(shape, ranges, axes)
                if stop - start == math.prod(len(range(*ranges[a])) for a in axes):
                    cuts[side].update((start, stop))
        rows, cols = self.matrix_shape(shape)
        return (tuple(sorted(c for c in cuts[0] if 0 < c < rows)),
                tuple(sorted(c for c in cuts[1] if 0 < c < cols)))


def placement(view: MatrixView, shape: Sequence[int]):
    """The decoder's placement by table for a whole tensor whose view moves
    its data (``(row_at, col_at)``), or None: written as the view, strided."""
    return view.positions(shape) if view.moves_data(shape) else None


def written_view(view: MatrixView, shape: Sequence[int]) -> MatrixView:
    """The view a whole-tensor decode leaves its output in: the tensor's own
    order (a reshape) where :func:`placement` placed it, else ``view``."""
    return MatrixView(tuple(range(len(shape))), view.split) if view.moves_data(shape) else view


def _offsets(sizes, strides) -> np.ndarray:
    """Element offsets of the C-ordered positions over axes of ``sizes``."""
    out = np.zeros(1, np.int64)
    for size, stride in zip(sizes, strides):
        out = (out[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
    return out


def sharded_axes(regions) -> tuple[int, ...]:
    """The axes along which ``regions`` (shards, (start, stop, step) per axis) differ."""
    if not regions:
        return ()
    return tuple(a for a in range(len(regions[0])) if len({r[a] for r in regions}) > 1)


# Shards cut tiles no narrower than this (a 512 x 32 tile's header: ~5% of it).
MIN_CUT_PIECE = 32


def narrow_axes(regions) -> dict[int, int]:
    """{axis: its narrowest shard} of the sharded axes whose shards are
    narrower than MIN_CUT_PIECE (a tensor-parallel (heads, head_dim,
    features) kernel split on its 16 heads): as the view's rows, no tile
    edges could follow their shards."""
    pieces = {a: min(len(range(*r[a])) for r in regions) for a in sharded_axes(regions)}
    return {a: piece for a, piece in pieces.items() if piece < MIN_CUT_PIECE}


def _side_range(shape, ranges, axes) -> tuple[int, int]:
    """[first, last + 1) of a region's positions along one side of a view
    (C order over ``axes``): the positions grow with every index, so the
    first is at the region's starts and the last at its last indices."""
    first = last = 0
    for a in axes:
        start, stop, step = ranges[a]
        first = first * shape[a] + start
        last = last * shape[a] + start + (len(range(start, stop, step)) - 1) * step
    return first, last + 1


def axis_rms(x: np.ndarray, without: np.ndarray | None = None) -> list[np.ndarray]:
    """Per axis, the RMS of each slice along it (float64), squares summed a
    block of the first axis at a time (no float64 copy of the whole tensor);
    the values at the sorted C-order flat positions ``without`` count as 0."""
    x = np.asarray(x)
    sums = [np.zeros(n) for n in x.shape]
    inner = math.prod(x.shape[1:])
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, inner))
    for i in range(0, x.shape[0], step):
        sq = np.square(x[i:i + step], dtype=np.float64)
        if without is not None and len(without):
            lo, hi = np.searchsorted(without, [i * inner, (i + step) * inner])
            sq.reshape(-1)[without[lo:hi] - i * inner] = 0.0
        for a in range(x.ndim):
            part = sq.sum(axis=tuple(b for b in range(x.ndim) if b != a))
            if a == 0:
                sums[0][i:i + step] = part
            else:
                sums[a] += part
    size = max(1, x.size)
    return [np.sqrt(s / (size // max(1, n))) if n else s for s, n in zip(sums, x.shape)]


def scale_spread(rms: np.ndarray) -> float:
    """How much slices differ in scale: the std of log2 RMS over non-zero slices."""
    positive = rms[rms > 0]
    return float(np.std(np.log2(positive))) if positive.size > 1 else 0.0


def excess_spread(rms: np.ndarray, slice_size: int) -> float:
    """:func:`scale_spread` beyond what sampling alone gives: the RMS of
    ``slice_size`` Gaussian values scatters by 1 / sqrt(2 n) in log (so the
    axis with shorter slices looked wider, and a structureless (O, I) matrix
    was transposed by the noise); that part is taken out in quadrature, and
    what is left under MIN_SPREAD counts as none."""
    noise = 1.0 / (math.log(2) * math.sqrt(2 * max(1, slice_size)))
    excess = math.sqrt(max(0.0, scale_spread(rms) ** 2 - noise ** 2))
    return excess if excess >= MIN_SPREAD else 0.0


def choose_view(x: np.ndarray, lead: Sequence[int] = (),
                narrow: Mapping[int, int] | None = None) -> MatrixView:
    """The view of ``x``: the channel axis with the widest scale spread to
    rows (the earliest channel axis when none spreads beyond sampling noise,
    :func:`excess_spread`), the other axes to columns, larger axes first
    (ties: original order).

    ``lead``: axes the array is sharded along; they go first among the
    columns, so that their shards are contiguous ranges of columns (tiles
    can then be cut along them, see :meth:`MatrixView.shard_cuts`); of them,
    ``narrow`` ones (:func:`narrow_axes`) are not the rows where no axis
    spreads."""
    x = np.asarray(x)
    if x.ndim < 2:
        return MatrixView.default(x.ndim)
    return view_from_rms(x.shape, axis_rms(x), lead, narrow)


def stacked_view(x: np.ndarray, stack: int, lead: Sequence[int] = (),
                 narrow: Mapping[int, int] | None = None) -> MatrixView:
    """The view of a leaf stacking layers along axis ``stack``
    (:mod:`jaxjpeg.stacks`): the stack axis, then the rows of the view
    :func:`choose_view` gives one layer, to rows; that view's columns to
    columns. Each slice's rows are then a run of the view's rows; where
    ``lead`` (sharded axes) holds the layer's row axis, the stack axis
    follows it instead, so that a shard of it is a range of rows (each
    slice's rows then every ``x.shape[stack]``-th row)."""
    x = np.asarray(x)
    rms = axis_rms(x)
    inner = [a for a in range(x.ndim) if a != stack]
    one = view_from_rms([x.shape[a] for a in inner], [rms[a] for a in inner],
                        [inner.index(a) for a in lead if a != stack],
                        {inner.index(a): piece for a, piece in (narrow or {}).items()
                         if a != stack})
    rows = [inner[a] for a in one.perm[:one.split]]
    rows = [*rows, stack] if set(rows) & set(lead) else [stack, *rows]
    return MatrixView((*rows, *(inner[a] for a in one.perm[one.split:])), one.split + 1)


def view_from_rms(shape: Sequence[int], rms: Sequence[np.ndarray],
                  lead: Sequence[int] = (), narrow: Mapping[int, int] | None = None) -> MatrixView:
    """:func:`choose_view`'s rule from each axis's slice RMS (:func:`axis_rms`)."""
    ndim = len(shape)
    if ndim < 2:
        return MatrixView.default(ndim)
    channels = [a for a in range(ndim) if shape[a] >= MIN_CHANNEL]
    if not channels:
        channels = [int(np.argmax(shape))]
    size = math.prod(shape)
    # all-zero slices (dead units, pruned channels): each axis's slices hold
    # that many fewer values, whose RMS scatters more by sampling
    zero = [int(np.count_nonzero(np.asarray(r) == 0)) for r in rms]
    live = [1 - z / max(1, n) for z, n in zip(zero, shape)]

    def sampled_values(a):
        return size // max(1, shape[a]) * math.prod(live[b] for b in range(ndim) if b != a)
    if all(excess_spread(rms[a], round(sampled_values(a))) == 0 for a in channels):
        # No axis has scales worth a map (noise, or a constant tensor): the
        # one with the most values in all-zero slices, whose row offsets
        # restore them as zeros (found by review: a Flax Dense kernel's dead
        # outputs, columns, came back as the coding's noise); else the
        # earliest, which makes 2-D and (O, I, ...) leaves their own view, so
        # restoring them needs no transpose (see _default_row).
        dead = [a for a in channels if a not in (narrow or {}) and 0 < zero[a] < shape[a]]
        row = (max(dead, key=lambda a: (zero[a] * (size // shape[a]), -a)) if dead
               else _default_row(shape, channels, narrow or {}))
    else:  # ties go to the larger axis, then the earlier one
        row = max(channels, key=lambda a: (round(scale_spread(rms[a]), 6), shape[a], -a))
    cols = [a for a in range(ndim) if a != row]
    # Among two or more channel-like columns, a short axis (planes of a
    # feature grid) goes first: last, it interleaved the long axes' columns
    # (found by review: a smooth (3, 32, 128, 128) triplane took 3.6 bits a
    # weight at the default rate instead of 0.57). A kernel's taps beside
    # one long axis stay last, as before.
    short_first = sum(shape[a] >= MIN_CHANNEL for a in cols) >= 2
    cols.sort(key=lambda a: (a not in lead, not (short_first and shape[a] < MIN_CHANNEL),
                             -shape[a], a))
    if lead:
        return MatrixView((row, *cols), 1)
    return _slices_apart(shape, row, cols, lambda a: excess_spread(
        rms[a], round(sampled_values(a))) >= APART_SPREAD)


def _slices_apart(shape, row: int, cols: list, spreads) -> MatrixView:
    """The view of rows ``row`` and columns ``cols``, changed so that the
    slices of an axis that ``spreads`` and has fewer than APART_MAX_ROWS of
    them share no 8 x 8 block (``row`` only in a 3-D leaf): such axes lead
    the rows, ``row`` after them, and the columns keep the other axes, or,
    where those are fewer than APART_MIN_COLUMNS (or ``row`` is itself such
    an axis), the largest axis left alone, the rest joining the rows.
    Unchanged where no axis left is APART_MIN_COLUMNS long, where a slice
    would be under a block's 8 rows, and where the one such axis leads the
    columns already, each slice whole blocks of them (found by review:
    moved to the rows, a stack of layers whose heads spread took 2-4% more
    bytes, or 7-11% more error at 8x)."""
    def apart(a):
        return shape[a] < APART_MAX_ROWS and spreads(a)
    # the row axis only of a stack of matrices (L, A, B): in a kernel's
    # (O, I, kh, kw) its taps would join the rows, 4 bytes of map a row
    leading = [a for a in cols if apart(a)] + ([row] if len(shape) == 3 and apart(row) else [])
    if not leading or (leading == cols[:1]
                       and math.prod(shape[a] for a in cols[1:]) % BLOCK == 0):
        return MatrixView((row, *cols), 1)
    rest = [a for a in cols if a not in leading]
    if (row not in leading and shape[row] >= BLOCK
            and math.prod(shape[a] for a in rest) >= APART_MIN_COLUMNS):
        return MatrixView((*leading, row, *rest), len(leading) + 1)
    left = [a for a in (row, *rest) if a not in leading]
    widest = max(left, key=lambda a: (shape[a], -a), default=None)
    runs = [a for a in left if a != widest]   # each leading slice's rows
    if (widest is None or shape[widest] < APART_MIN_COLUMNS
            or math.prod(shape[a] for a in runs) < BLOCK):
        return MatrixView((row, *cols), 1)
    return MatrixView((*leading, *runs, widest), len(leading) + len(runs))


def _default_row(shape, channels: list, narrow: Mapping[int, int]) -> int:
    """The earliest channel axis, unless it is a sharded axis too narrow for
    its shards' tiles (:func:`narrow_axes`) that, leading the columns of the
    next channel axis's view, would give cuts MIN_CUT_PIECE wide (found by
    review: a (16, 64, 1024) kernel sharded 8 ways on its heads had 2 rows
    a shard and no cuts, every device decoding the whole leaf; and a (64,
    8192) one on 16-row shards gains nothing by moving)."""
    row = min(channels)
    others = [a for a in channels if a != row]
    if row not in narrow or not others:
        return row
    alternative = min(others)
    width = narrow[row] * math.prod(n for a, n in enumerate(shape) if a not in (row, alternative))
    return alternative if width >= MIN_CUT_PIECE else row


# One step for a whole leaf is the least squared error were its inputs
# alike; slices (rows, columns) whose RMS is LOUD_COLUMN times the median
# slice's or more say otherwise, where they hold most of the leaf's energy
# (its RMS at least LOUD_SHARE_RMS times the other slices'): see
# loud_column_scales and loud_slices.
LOUD_COLUMN = 8.0
LOUD_SHARE_RMS = 2.0
# An axis's loud slices, to be balanced, are at most this share of its
# slices (outlier features, a folded gain): a spread of scales over decades
# (BatchNorm-trained output channels, an embedding's rows) is coded on one
# step, the squared-error optimum the data-free design keeps.
LOUD_FEW = 1 / 32
# Up to this share where they stand apart from the rest, not the top of a
# spread of scales: at most LOUD_GAP_FEW times as many slices within
# LOUD_GAP of the loud bound (a (1024, 1024) leaf with 51 columns 100x, 5%,
# had them set one step for all and restored the other 95% at relative
# error 1.30, worse than zeros, where 30 columns gave 0.14: found by review).
LOUD_APART = 1 / 8
LOUD_GAP = 4.0
LOUD_GAP_FEW = 1 / 4
# ... and at most this many times the loud bound (their median): beyond, the
# rest reads as near-dead slices beside a live minority, which balancing
# would code as finely as the live ones (found by review: 5% of columns live
# beside ones at 1e-3, balanced, came back 19x worse under a byte target,
# and a default save was 2.3x the size).
LOUD_APART_EXCESS = 32.0
# Balanced columns are at most this share of a leaf's (found by review: with
# 40 of a kernel's 64 input channels near dead, the median column was a dead
# one and every live column read as loud; Silero VAD's most: 20%).
LOUD_MOST = 1 / 4
# A column scale costs 2 bytes: balanced columns are at least this many
# values long, at most 1/4 bit a value (found by review: (4096, 16) with 64
# loud rows paid 1 bit a weight for its scales, and erred more than unbalanced).
LOUD_MIN_ROWS = 64
MAX_EXCESS = 2.0 ** 100   # a balanced slice's largest scale (float32 holds up to 2^128)
# Outputs above half the loud bound are at most this many times the loud
# ones: a few outliers, not the tail of a spread of scales (found by
# review: Student-t(2) output scales, 12 of 512 rows loud, made a default
# save 24% larger).
LOUD_TAIL = 2
CANCELLATION = 1e-6   # spreads under this share of their rows' mean squares: summed again


def loud_column_scales(m: np.ndarray) -> np.ndarray | None:
    """Column scales that balance ``m``'s loud columns, or None where it
    has none (see :func:`_loud`). One column of a kernel coded with the
    common-mean prior's feedback is an input channel at one tap; of a leaf
    viewed by :func:`loud_view`, a slice of its loud axis.

    A trained layer's weights on an input scale inversely to that input (a
    reparametrised branch folded into one tap, an unnormalised feature, a
    normalisation's gain folded in), so a column more than LOUD_COLUMN times
    the median column's RMS is read as a quieter input carrying as much
    signal as the others: it is divided by its excess over that bound, and
    the leaf is coded as if those were its weights
    (:attr:`jaxjpeg.codec.Prepared.balanced`). Only where such columns hold
    most of the leaf's energy: there one step for the whole leaf, set by
    their RMS, restored every other weight as 0 (found by review: a (3, 3,
    64, 128) kernel with one input channel held at 10 came back at relative
    error 1.09 outside it, 423 at 1e4; a (512, 256) matrix with 8 input rows
    x100, 0.97). Silero VAD, whose reparametrised 1-D convolutions have taps
    20-126x the median column, mean |Δ speech probability| (16 / 8 kHz
    models): default save 0.087 / 0.036 -> 0.051 / 0.028; at 4 / 6 / 8 /
    10x 0.016 / 0.035 / 0.080 / 0.085 -> 0.005 / 0.016 / 0.043 / 0.103 (16
    kHz) and 0.015 / 0.020 / 0.037 / 0.152 -> 0.006 / 0.019 / 0.043 / 0.048
    (8 kHz). No leaf of EfficientNet-lite0/1/2, Magika or PP-OCRv6
    qualifies (the most: a leaf's RMS 1.56 times its other columns')."""
    if m.shape[0] < LOUD_MIN_ROWS:
        return None
    power = np.einsum("ij,ij->j", m, m, dtype=np.float64) / max(1, m.shape[0])
    excess = _loud(power, LOUD_MOST)
    return None if excess is None else _stored_exactly(excess)


def loud_row_factors(m: np.ndarray, col_scale: np.ndarray | None = None,
                     kept: np.ndarray | None = None) -> np.ndarray | None:
    """Powers of two that balance ``m``'s loud rows (divided by its column
    scales ``col_scale``, if given), or None where it has none: the rows of a
    kernel coded with the common-mean prior's feedback are its outputs.
    ``kept``: how many values of each row the side list keeps (zeros in
    ``m``, left out of its spread). As :func:`loud_column_scales` reads
    loud inputs, a row whose spread about its mean is LOUD_COLUMN times the
    median row's or more, where such rows (at most LOUD_FEW of them, as a
    plain leaf's loud slices) hold most of the spread and are not the tail
    of a spread of scales (LOUD_TAIL), is read as a quieter output carrying
    as much signal (one step set by three random outputs
    100x / 1000x the others restored the rest at relative error 0.98 /
    2.78). Up to a quarter of them (as loud inputs), review found spreads
    over decades balanced (lognormal output scales: default saves 5-29%
    larger) and a live quarter beside near-dead outputs (its error 20x at
    8x). The row's map absorbs its factor
    (:attr:`jaxjpeg.codec.Prepared.row_factor`), so it costs nothing
    stored; a power of two keeps a float16 map exact. By spread, not RMS:
    the map's offset codes a row's mean exactly (a constant or dead output,
    which the spread never calls loud, stays exact; a row of 50 +- 1.5 is
    balanced by its 1.5). Rows under LOUD_MIN_ROWS values are not balanced:
    factors give each row a map of its own, which views that narrow share
    (``codec.SHARED_MAP_COLS``)."""
    cols = m.shape[1]
    if cols < LOUD_MIN_ROWS:
        return None
    inverse = np.ones(cols) if col_scale is None else 1.0 / np.asarray(col_scale, np.float64)
    # over the coded values only (found by review: the zeros standing in
    # for a row's kept NaNs made a row of 50 +- 0.05 loud, its spread coded
    # 16x coarser)
    kept = np.zeros(m.shape[0]) if kept is None else kept
    coded = np.maximum(cols - kept, 1)
    mean = np.einsum("ij,j->i", m, inverse, dtype=np.float64) / coded
    power = np.einsum("ij,ij,j->i", m, m, inverse * inverse, dtype=np.float64) / coded
    spread = power - mean * mean
    # Where that difference is mostly rounding, summed about the mean (found
    # by review: a constant row of 1e30 read as loud; a threshold instead
    # took rows of 1e6 +- 5 for constant), a block of rows at a time.
    suspect = np.flatnonzero(spread < CANCELLATION * power)
    block = max(1, ROW_BLOCK_ELEMENTS // cols)
    for start in range(0, suspect.size, block):
        rows = suspect[start:start + block]
        about = m[rows] * inverse - mean[rows, None]
        squares = np.einsum("ij,ij->i", about, about) - kept[rows] * mean[rows] ** 2
        spread[rows] = np.maximum(squares, 0.0) / coded[rows]
    excess = _loud(spread, LOUD_FEW)
    if excess is None:
        return None
    rms = np.sqrt(spread)
    if np.sum(rms > 0.5 * LOUD_COLUMN * np.median(rms)) > LOUD_TAIL * np.sum(excess > 1):
        return None   # the tail of a spread of scales
    factor = np.exp2(np.round(np.log2(excess)))
    return factor.astype(np.float32) if np.any(factor > 1) else None


def _loud(power: np.ndarray, most: float) -> np.ndarray | None:
    """Each slice's excess over LOUD_COLUMN times the median slice's RMS
    (1 where none), from the slices' mean squares ``power``; None unless
    some slice has one, at most ``most`` of them, and those hold most of
    the energy (the mean power at least LOUD_SHARE_RMS² times the other
    slices'). At most MAX_EXCESS: a balanced slice's scale must stay finite
    in float32 (found in session 40: a row of 1e29 beside weights of 1e-37
    took an infinite scale, and restored as inf and NaN)."""
    rms = np.sqrt(power)
    median = float(np.median(rms)) if rms.size else 0.0
    if not (median > 0 and np.all(np.isfinite(rms))):
        return None
    excess = np.clip(rms / (LOUD_COLUMN * median), 1.0, MAX_EXCESS)
    loud = excess > 1
    if (not loud.any() or loud.sum() > most * loud.size
            or power.mean() < LOUD_SHARE_RMS ** 2 * power[~loud].mean()):
        return None
    return excess


def _loud_apart(power: np.ndarray) -> np.ndarray | None:
    """:func:`_loud` of at most LOUD_FEW of the slices, or of up to
    LOUD_APART where those stand apart (under LOUD_GAP_FEW times as many
    slices within LOUD_GAP of the loud bound, under it: a lognormal spread
    of scales has many there) and are not a live minority beside near-dead
    slices (LOUD_APART_EXCESS)."""
    excess = _loud(power, LOUD_FEW)
    if excess is not None:
        return excess
    excess = _loud(power, LOUD_APART)
    if excess is None:
        return None
    rms = np.sqrt(power)
    bound = LOUD_COLUMN * np.median(rms)
    near = np.sum((rms > bound / LOUD_GAP) & (excess == 1))
    if near > LOUD_GAP_FEW * np.sum(excess > 1):
        return None
    return excess if np.median(excess[excess > 1]) <= LOUD_APART_EXCESS else None


def loud_slices(shape: Sequence[int], rms: Sequence[np.ndarray], regions=None,
                merged: Mapping[tuple, np.ndarray] | None = None
                ) -> tuple[int | tuple, np.ndarray] | None:
    """(axis, column scales of :func:`loud_view`) where an axis's few loud
    slices (:func:`_loud_apart`, at most LOUD_FEW of them or LOUD_APART
    standing apart, from each axis's slice
    RMS, :func:`axis_rms`) hold most of a leaf's energy, or None; its
    slices are MIN_CHANNEL or more, of LOUD_MIN_ROWS values or more. Of
    two, the one whose quiet slices are quieter. ``merged`` ({axes: RMS of
    each slice of those two axes taken as one}, :func:`merged_rms`) adds
    them as candidates (the axis returned is then that tuple).

    ``regions`` (the shards of a sharded array): where the view coded
    without balancing (:func:`view_from_rms`) lets each shard decode tiles
    of its own (:func:`reads_own_tiles`), only an axis whose loud view does
    too (found by review: sharded saves were never balanced, their quiet
    weights 3x worse than an unsharded save's)."""
    size = math.prod(shape)
    found = {}
    candidates = [*enumerate(rms), *(merged or {}).items()]
    for a, r in candidates:
        count = np.asarray(r).size
        if count < MIN_CHANNEL or size // max(1, count) < LOUD_MIN_ROWS:
            continue
        power = np.square(np.asarray(r, np.float64))
        excess = _loud_apart(power)
        if excess is not None:
            found[a] = (power[excess == 1].mean() / power.mean(), excess)
    # two axes as one only where they hold the loudness in at most
    # MERGED_FEWER of the values one of them alone does (a few dimensions of
    # one head, not the head), which then gives way (found by review: 2%
    # fewer, a (4096, 64, 16) leaf's loud rows took 65,536 column scales
    # instead of 4,096, its file 2.6% larger and 7% worse at 8x)
    def loud_values(a):
        return np.sum(found[a][1] > 1) * (size // found[a][1].size)
    for group in [a for a in found if isinstance(a, tuple)]:
        alone = [a for a in group if a in found]
        if any(loud_values(group) > MERGED_FEWER * loud_values(a) for a in alone):
            del found[group]
        else:
            for a in alone:
                del found[a]
    if found and regions:
        lead = sharded_axes(regions)
        # merged axes only where their shards read their own tiles (found by
        # review: beside a view that read none of its own, one read the
        # whole leaf on every device where a single axis's read half)
        own = reads_own_tiles(view_from_rms(shape, rms, lead, narrow_axes(regions)), shape,
                              regions)
        found = {a: v for a, v in found.items()
                 if not (own or isinstance(a, tuple))
                 or reads_own_tiles(loud_view(shape, a, lead), shape, regions)}
    if not found:
        return None
    axis = min(found, key=lambda a: found[a][0])
    return axis, _stored_exactly(found[axis][1])


# A 3-D leaf's pairs of axes are looked at as one (merged_rms) only where
# one of them has slices whose RMS over all is this many times the median
# slice's: loud cells holding most of the energy (LOUD_SHARE_RMS) make the
# mean power of the slices of each axis they lie along (in under half of
# them) 4x the median's (heads' scales spread lognormally, sigma 0.5: 1.3x).
MERGED_PROSPECT = 2.0
MERGED_FEWER = 0.5


def merged_rms(x: np.ndarray, rms: Sequence[np.ndarray],
               without: np.ndarray | None = None) -> dict[tuple, np.ndarray]:
    """{(a, b): the RMS of each slice of axes a and b taken as one, in C
    order} of a 3-D ``x`` (:func:`axis_rms` without the values at the sorted
    flat positions ``without``), for each pair of its axes one of which
    (their slices' RMS ``rms``) may hold loud cells (MERGED_PROSPECT); empty
    for other leaves. A DenseGeneral kernel (D, H, K) whose loud outputs are
    a few dimensions of one head (found by review: balanced as whole slices
    of K, every head's, the rest restored at 0.33 by default where the same
    weights as a (D, H * K) matrix gave 0.14); a stack nobody named, each
    layer with loud columns of its own (axes 0 and 2: review, a (4, 256,
    1024) leaf with each layer's own 6% of columns 50x restored the rest at
    0.98 by default, 0.75 at 8x without a word)."""
    if x.ndim != 3:
        return {}

    def prospect(a):
        r = np.asarray(rms[a], np.float64)
        median = float(np.median(r)) if r.size else 0.0
        return median > 0 and math.sqrt(float(np.mean(r * r))) >= MERGED_PROSPECT * median
    out = {}
    for a, b in ((0, 1), (1, 2), (0, 2)):
        count = x.shape[a] * x.shape[b]
        if count < MIN_CHANNEL or x.size // max(1, count) < LOUD_MIN_ROWS:
            continue   # no loud_slices candidate
        if not (prospect(a) or prospect(b)):
            continue
        if b == a + 1:   # a reshape
            shape = (x.shape[0], x.shape[1] * x.shape[2]) if a else (x.shape[0] * x.shape[1],
                                                                      x.shape[2])
            out[(a, b)] = axis_rms(x.reshape(shape), without)[a]
        else:   # the first and last: each first-axis slice's columns (a stack's layers' own)
            out[(a, b)] = np.concatenate([rms[1] for _, _, rms in layers_rms(x, 0, without)])
    return out


# A stack's balanced columns span at most this (layers' RMS times their loud
# excess): beyond, one row's map spans values too far apart in float32
# (found by review: layers at 1e-18 ... 1e18 restored at relative error
# 8,000, 1e-15 ... 1e15 at 0.065 where their own steps gave 0.040).
MAX_LAYER_SPREAD = 2.0 ** 40


def stacked_loud_slices(x: np.ndarray, stack: int, without: np.ndarray | None = None,
                        regions=None, unbalanced: MatrixView | None = None
                        ) -> tuple[MatrixView, np.ndarray, np.ndarray] | None:
    """(:func:`stacked_loud_view`, its column scales, which of its columns
    are loud) where some layer of a leaf stacking layers along ``stack`` has
    loud slices along one of its axes (:func:`_loud_apart`, each layer's
    own, from its slices' RMS without the values at the sorted flat
    positions ``without``), or None. Each column is
    one layer's slice: its scale is its excess over the layer's loud bound
    times the layer's balanced RMS over the quietest layer's, so that every
    layer, its loud slices balanced, is coded at one relative step (what
    :func:`jaxjpeg.stacks.slice_weights` gives a stack's layers otherwise).
    Found by review: a stack under ``layers`` was never balanced, and with
    6% of its columns 50x (the same in every layer, or each layer's own)
    restored the rest at relative error 0.98 by default, 0.36-0.39 at 8x
    (0.16 unstacked). ``regions`` (shards): as :func:`loud_slices`, where
    the view coded without balancing, ``unbalanced``, reads tiles of its own."""
    shape = x.shape
    inner = [a for a in range(x.ndim) if a != stack]
    layer_size = math.prod(shape[a] for a in inner)
    axes = [a for a in inner
            if shape[a] >= MIN_CHANNEL and layer_size // max(1, shape[a]) >= LOUD_MIN_ROWS]
    if not axes or shape[stack] < 1:
        return None
    power = {a: np.zeros((shape[stack], shape[a])) for a in axes}
    for layer, coded, rms in layers_rms(x, stack, without):
        if coded.size and coded.min() == coded.max():
            return None   # a constant layer: exact only on its own rows' offsets
        for a in axes:
            power[a][layer] = np.square(rms[inner.index(a)])
    found = {}
    for a in axes:
        excess = np.ones_like(power[a])
        for layer, p in enumerate(power[a]):
            loud = _loud_apart(p)
            if loud is not None:
                excess[layer] = loud
        if np.any(excess > 1):
            found[a] = (power[a][excess == 1].mean() / power[a].mean(), excess)
    lead = sharded_axes(regions)
    if found and regions and reads_own_tiles(unbalanced, shape, regions):
        found = {a: v for a, v in found.items()
                 if reads_own_tiles(stacked_loud_view(shape, stack, a, lead), shape, regions)}
    if not found:
        return None
    axis = min(found, key=lambda a: found[a][0])
    excess = found[axis][1]
    balanced = np.mean(power[axis] / np.square(excess), axis=1)
    quietest = balanced[balanced > 0].min() if np.any(balanced > 0) else 1.0
    layer_scale = np.sqrt(np.where(balanced > 0, balanced, quietest) / quietest)
    scale = np.maximum(layer_scale[:, None] * excess, 1.0)
    if scale.max() > MAX_LAYER_SPREAD:
        return None   # layers too far apart for one row's map: their own steps
    scale = np.minimum(scale, MAX_EXCESS)
    view = stacked_loud_view(shape, stack, axis, lead)
    if view.perm[-1] == stack:   # columns by slice, then layer
        scale, excess = scale.T, excess.T
    return view, _stored_exactly(scale.reshape(-1)), excess.reshape(-1) > 1


def layers_rms(x: np.ndarray, stack: int, without: np.ndarray | None = None):
    """Yields (layer, its values but those at the sorted flat positions
    ``without``, :func:`axis_rms` of the layer without them) for each layer
    of ``x`` along axis ``stack``."""
    kept = layer_positions(x.shape, stack, without)
    for layer in range(x.shape[stack]):
        values = np.take(x, layer, axis=stack)
        coded = values if layer not in kept else np.delete(values.reshape(-1), kept[layer])
        yield layer, coded, axis_rms(values, kept.get(layer))


def layer_positions(shape, stack: int, flat_index: np.ndarray | None) -> dict[int, np.ndarray]:
    """{layer: sorted flat positions within the layer} of the C-order flat
    positions ``flat_index`` of a tensor of ``shape`` stacking layers along ``stack``."""
    if flat_index is None or not len(flat_index):
        return {}
    at = np.unravel_index(np.asarray(flat_index, np.int64), shape)
    inner = [a for a in range(len(shape)) if a != stack]
    within = np.ravel_multi_index([at[a] for a in inner], [shape[a] for a in inner])
    return {int(layer): np.sort(within[at[stack] == layer]) for layer in np.unique(at[stack])}


def stacked_loud_view(shape: Sequence[int], stack: int, axis: int,
                      lead: Sequence[int] = ()) -> MatrixView:
    """:func:`loud_view` of a stacked leaf: each layer's slices along
    ``axis`` are columns of their own (the stack axis, then ``axis``; the
    other way where ``lead``, the sharded axes, holds ``axis`` and not the
    stack, so that a shard is a range of columns), the other axes rows,
    larger first (``lead`` first among them)."""
    rows = sorted((a for a in range(len(shape)) if a not in (stack, axis)),
                  key=lambda a: (a not in lead, -shape[a], a))
    cols = (axis, stack) if axis in lead and stack not in lead else (stack, axis)
    return MatrixView((*rows, *cols), len(rows))


def loud_view(shape: Sequence[int], axis: int | tuple, lead: Sequence[int] = ()) -> MatrixView:
    """The view with ``axis`` (or two axes, a tuple, as one) alone on
    the columns (its loud slices become columns to balance), the other
    axes on rows, larger first (ties: their order), so every layout of the
    same weights gives one matrix; ``lead`` (sharded axes) first among the
    rows, so that a shard of one is a range of rows."""
    cols = tuple(axis) if isinstance(axis, tuple) else (axis,)
    rows = sorted((a for a in range(len(shape)) if a not in cols),
                  key=lambda a: (a not in lead, -shape[a], a))
    return MatrixView((*rows, *cols), len(rows))


def reads_own_tiles(view: MatrixView, shape: Sequence[int], regions) -> bool:
    """Whether, with tile edges at ``regions``' boundaries (the cuts of
    :meth:`MatrixView.shard_cuts`, kept where no piece is narrower than
    MIN_CUT_PIECE, as :meth:`jaxjpeg.codec.Prepared.with_shards` keeps
    them), each region (shard) spans whole tiles of ``view``: on each side,
    the whole side or a contiguous range between two edges."""
    for axes, length, cuts in zip((view.row_axes(), view.col_axes()),
                                  view.matrix_shape(shape), view.shard_cuts(shape, regions)):
        if cuts and np.diff([0, *cuts, length]).min() < MIN_CUT_PIECE:
            cuts = ()
        edges = {0, *cuts, length}
        for ranges in regions:
            start, stop = _side_range(shape, ranges, axes)
            count = math.prod(len(range(*ranges[a])) for a in axes)
            if stop - start != count or start not in edges or stop not in edges:
                return False
    return True


def _stored_exactly(scale: np.ndarray) -> np.ndarray:
    """float32 ``scale`` (>= 1), rounded to float16 where float16 holds it,
    so that it is stored at 2 bytes a column."""
    fits = scale <= float(np.finfo(np.float16).max)
    half = np.where(fits, scale, 1.0).astype(np.float16).astype(np.float32)
    return np.where(fits, half, scale.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Outliers:
    """Values kept exactly: flat C-order positions in the tensor, and their values."""

    index: np.ndarray   # int64, sorted
    values: np.ndarray  # the tensor's dtype

    @property
    def count(self) -> int:
        return int(self.index.size)

    def steppable(self, original) -> bool:
        """Whether one uniform step on the rest of the leaf ``original``
        (its values but these, their mean and RMS about it, in float64: the
        allocation and the default save's thin alternative read the same;
        found by review, zeros in these places read 1000 +- 0.01 as spread
        by 2.2, and a byte target landed 56% under) holds these values too
        at little cost: each finite, within extreme_limit and STEPPED_FAR
        spreads of the rest's mean, their distances summing to under a
        quarter spread a value (a thin coding's Rice codes grow with the
        distance: found by review, one value 10^6 spreads off took a
        50,000-value leaf's whole budget at 8x, every other value restored
        as 0)."""
        values = self.values.astype(np.float64)
        if not np.all(np.abs(values) <= extreme_limit(self.values.dtype)):   # NaN: False
            return False
        flat = np.asarray(original).reshape(-1)
        mean, spread = _rest_mean_and_std(flat, self.index)
        if not spread > 0:
            return False
        far = np.abs(values - mean) / spread
        return bool(far.max(initial=0.0) <= STEPPED_FAR and far.sum() <= flat.size / 4)

    @staticmethod
    def index_dtype(size: int) -> np.dtype:
        """How positions in a tensor of ``size`` elements are stored."""
        return np.dtype(np.uint32) if size <= 2**32 else np.dtype(np.uint64)

    def nbytes(self, size: int) -> int:
        return self.count * (self.index_dtype(size).itemsize + self.values.dtype.itemsize)

    def to_bytes(self, size: int) -> bytes:
        return (self.index.astype(self.index_dtype(size)).tobytes()
                + np.ascontiguousarray(self.values).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes, count: int, size: int, dtype: np.dtype) -> "Outliers":
        """Parses a side list; ValueError if it does not hold ``count`` sorted,
        distinct, in-range positions and their values."""
        index_dtype = cls.index_dtype(size)
        split = count * index_dtype.itemsize
        if len(data) != split + count * dtype.itemsize:
            raise ValueError(f"outlier list holds {len(data)} bytes, expected "
                             f"{split + count * dtype.itemsize}")
        index = np.frombuffer(data, index_dtype, count).astype(np.int64)
        if count and (index[0] < 0 or index[-1] >= size or np.any(np.diff(index) <= 0)):
            raise ValueError("outlier positions are not sorted, distinct and inside the tensor")
        return cls(index, np.frombuffer(data, dtype, count, offset=split))

    def apply(self, flat):
        """``flat`` (1-D numpy) with the kept values written back."""
        flat[self.index] = self.values.astype(flat.dtype)
        return flat


def _rest_mean_and_std(flat: np.ndarray, index: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (float64) of ``flat`` but its positions
    ``index`` (sorted), two passes a block at a time (a float64 copy of the
    rest took 12 bytes a value: 144 MB for a 12 M-value leaf's thin coding)."""
    count = flat.size - index.size
    if count <= 0:
        return 0.0, 0.0
    step = 4 * ROW_BLOCK_ELEMENTS

    def blocks():
        for start in range(0, flat.size, step):
            block = flat[start:start + step].astype(np.float64)
            lo, hi = np.searchsorted(index, [start, start + block.size])
            yield np.delete(block, index[lo:hi] - start)
    mean = sum(float(np.sum(b)) for b in blocks()) / count
    variance = sum(float(np.sum(np.square(b - mean))) for b in blocks()) / count
    return mean, math.sqrt(variance)


def extreme_limit(dtype) -> float:
    """Magnitudes beyond this are kept exactly: coding noise near a format's
    largest finite value could round to infinity."""
    return float(np.finfo(np.float16).max) / 4 if np.dtype(dtype) == np.float16 else 1e30


def within_limit(x32: np.ndarray, dtype) -> np.ndarray:
    """``|x32| <= extreme_limit(dtype)`` (False for NaN), without a
    leaf-sized float temporary."""
    limit = np.float32(extreme_limit(dtype))
    return np.less_equal(x32, limit) & np.greater_equal(x32, -limit)


def count_special(x: np.ndarray) -> int:
    """How many values of ``x`` are non-finite or extreme (beyond
    :func:`extreme_limit`), counted a block at a time in float32 (no
    leaf-sized temporaries)."""
    x = np.asarray(x)
    flat = x.reshape(-1)
    limit = np.float32(extreme_limit(x.dtype))
    count = 0
    for start in range(0, flat.size, 4 * ROW_BLOCK_ELEMENTS):
        block = flat[start:start + 4 * ROW_BLOCK_ELEMENTS].astype(np.float32, copy=False)
        count += block.size - int(np.count_nonzero(np.abs(block) <= limit))
    return count


def find_outliers(x: np.ndarray, view: MatrixView, sigmas: float = OUTLIER_SIGMAS, *,
                  finite: np.ndarray | None = None, col_scale: np.ndarray | None = None,
                  as_float32: np.ndarray | None = None) -> Outliers:
    """The side list of ``x``: every non-finite or extreme value, and values more
    than ``sigmas`` row RMS (about the row mean, in ``view``) from the mean, as
    long as those are few (far outliers cost more bits in a DCT block than the
    ~6 bytes a side-list entry takes, and stretch the sample range), and gross
    values (:func:`gross_values`, :func:`gross_in_leaf`: up to LOUD_VALUES_FEW
    of the leaf, since coded they lose the rest).
    ``finite`` (optional): ``|x| <= extreme_limit`` already computed.
    ``col_scale`` (optional): the view's columns are looked at divided by
    these (a balanced leaf's: its loud columns' values are not far).
    ``as_float32`` (optional): ``x`` as float32, where the caller has it."""
    x = np.asarray(x)
    flat = x.reshape(-1)
    # float32 throughout (every value kept here is within float32's range):
    # a float64 copy of a large leaf would cost twice its size again. A
    # float32 leaf is not copied, nor a half-precision one whose float32
    # copy the caller has (found by review: a bfloat16 leaf's save held
    # three float32 copies of it at once, 8x its size)
    x32 = (flat.astype(np.float32, copy=False) if as_float32 is None
           else as_float32.reshape(-1))
    # `finite`: the caller's mask of values within the limit, if it has one
    counted = within_limit(x32, x.dtype) if finite is None else finite.reshape(-1)
    special = not counted.all()   # values kept whatever else is found
    m = read_matrix(x32.reshape(x.shape), view)
    ok = read_matrix(counted.reshape(x.shape), view) if special else None
    # Row statistics block by block: the temporaries stay in cache (a whole
    # leaf's deviations would be another leaf-sized pass through memory),
    # and only the far values' cells are kept (found by review: leaf-sized
    # masks of them took more memory than the leaf).
    none = np.zeros(0, np.int64)
    cells = tuple(([none], [none]) for _ in range(3))   # first look, second, gross values
    balanced = (lambda rows: m[rows]) if col_scale is None else (lambda rows: m[rows] / col_scale)
    step = rows_per_block(m)
    row_rms = []
    for r in range(0, m.shape[0], step):
        rows = slice(r, r + step)
        first, masked, rms = _far_masks(balanced(rows), None if ok is None else ok[rows], sigmas)
        row_rms.append(rms)
        _add_cells(cells[0], first, r)
        _add_cells(cells[1], masked, r)
    row_rms = np.concatenate(row_rms)
    bound = quiet_bound(row_rms, m.shape[1])
    crowded = []
    if bound is not None:   # the rows louder than their median one
        loud = np.flatnonzero(row_rms > bound)
        for start in range(0, loud.size, step):
            rows = loud[start:start + step]
            gross = gross_values(balanced(rows), None if ok is None else ok[rows], bound,
                                 crowded)
            at_rows, at_cols = np.nonzero(gross)
            cells[2][0].append(rows[at_rows])
            cells[2][1].append(at_cols)
    # and the leaf as one population: where no quiet median row reads loud
    # rows, or some row holds more than its share (found by review: rows 15%
    # gross restored the rest at 571)
    if bound is None or crowded or rows_hide_gross_values(m, ok, col_scale):
        at_rows, at_cols = gross_in_leaf(m, ok, col_scale)
        cells[2][0].append(at_rows)
        cells[2][1].append(at_cols)
    # (distinct: a gross value may be found by both readings)
    kept = [np.unique(view.flat_index(x.shape, np.concatenate(at_rows), np.concatenate(at_cols)))
            for at_rows, at_cols in cells]
    for k, limit in enumerate((MAX_OUTLIER_FRACTION, MAX_MASKED_FRACTION, LOUD_VALUES_FEW)):
        if kept[k].size > limit * flat.size:
            kept[k] = np.zeros(0, np.int64)
    must = np.flatnonzero(~counted) if special else np.zeros(0, np.int64)
    index = np.union1d(must, np.concatenate(kept)).astype(np.int64)
    return Outliers(index, flat[index].copy())


# Rows read at once from a view whose rows are adjacent in memory (a
# transposed leaf: each row's values lie a row of the leaf apart, and a
# cache line holds 16 rows' values): fewer, a block of 3 rows of 18,432
# read each line for 3 values, and a balanced stack's side list took 3.3 s
# where blocks of 16 rows or more take 1.4.
TRANSPOSED_BLOCK_ROWS = 16


def rows_per_block(m) -> int:
    """Rows of the view matrix ``m`` to read at once: ROW_BLOCK_ELEMENTS
    values, or TRANSPOSED_BLOCK_ROWS where its rows are adjacent in memory."""
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, m.shape[1]))
    strides = getattr(m, "strides", None)
    if strides is not None and m.ndim == 2 and abs(strides[0]) == m.itemsize:
        rows = max(rows, TRANSPOSED_BLOCK_ROWS)
    return rows


class GatheredMatrix:
    """The view matrix of a C-contiguous tensor whose view moves its data,
    its elements gathered where they are read (``m[rows]``, ``m[rows, cols]``
    with slices or index arrays, as numpy reads them): the statistics passes
    read it a block at a time, and a transposed copy of the whole leaf was
    a leaf's size beyond it (found by review: a bfloat16 leaf's save held
    its float32 copy and this one at once)."""

    def __init__(self, x: np.ndarray, view: MatrixView):
        self._flat = x.reshape(-1)
        self._row_at, self._col_at = view.positions(x.shape)
        self.shape = view.matrix_shape(x.shape)
        self.size = self.shape[0] * self.shape[1]
        self.dtype = x.dtype
        self.ndim = 2

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        at_rows, at_cols = self._row_at[rows], self._col_at[cols]
        if isinstance(rows, slice) or isinstance(cols, slice):
            return self._flat[np.add.outer(at_rows, at_cols)]
        return self._flat[at_rows + at_cols]   # index arrays pair up


def read_matrix(x: np.ndarray, view: MatrixView):
    """``view.to_matrix(x)`` for reading by blocks of rows (or cells): a
    :class:`GatheredMatrix` where that would copy a C-contiguous tensor."""
    if view.moves_data(x.shape) and x.flags.c_contiguous and x.size and not _strided(view, x.shape):
        return GatheredMatrix(x, view)
    return view.to_matrix(x)


def _strided(view: MatrixView, shape) -> bool:
    """Whether ``view``'s matrix of a C-contiguous tensor of ``shape`` is a
    strided view of it (each side's axes, but those of length 1, a run in
    memory order: a transposed 2-D leaf), not a copy."""
    return all(all(b == a + 1 for a, b in zip(kept, kept[1:]))
               for kept in ([a for a in side if shape[a] != 1]
                            for side in (view.row_axes(), view.col_axes())))


def _add_cells(cells, mask: np.ndarray, first_row: int) -> None:
    """Appends ``mask``'s (row, column) cells, its rows from ``first_row`` on."""
    rows, cols = np.nonzero(mask)
    cells[0].append(rows + first_row)
    cells[1].append(cols)


# Gross values: in a loud row (beyond the quiet bound, quiet_bound), values
# more than LOUD_COLUMN times that bound from the row's median -- 64x the
# median row's RMS -- are kept exactly where they are at most this share of
# the row's values. Found by review: a block of them (3 outputs x 5 inputs of
# 1e10 in a (128, 64, 3, 3) kernel, 7.8% of those rows) set its rows'
# spread, and balanced or not, the step it took gave the other weights
# errors of 1e8 (blocks of 100x / 500x the others' RMS: relative error 0.62 /
# 0.29-0.33 outside them, 0.081 kept). One value past 1/8 of the row and the
# block is coded again (review: errors of 5e7); a quarter made PP-OCRv6's
# detector take 20% of the values of 170 rows of a kernel for gross.
# Only where they stand apart: their RMS about the median at least
# LOUD_COLUMN times the other values' (a loud row of Gaussian values 30x the
# median row's has 3% beyond that bound, its tails, at 2.8x the others' RMS:
# they are coded with it).
LOUD_VALUES_FEW = 1 / 8
CROWDED_MOST = 1 / 2   # a row's gross values past its share, up to this (gross_values)


def quiet_bound(rms: np.ndarray, cols: int) -> float | None:
    """LOUD_COLUMN times the median row's RMS (``rms``: each row's, about
    its mean): rows beyond it are loud (as :func:`loud_row_factors` reads
    them). None where rows are under LOUD_MIN_ROWS values, fewer than
    MIN_CHANNEL, or the median row is constant."""
    if cols < LOUD_MIN_ROWS or rms.size < MIN_CHANNEL:
        return None
    bound = LOUD_COLUMN * float(np.median(rms))
    return bound if bound > 0 and math.isfinite(bound) else None


# Rows at fixed positions that tell whether gross values lie in every row
# (rows_hide_gross_values).
HIDING_ROWS = 8
HIDING_COLUMNS = 1024   # of each, at most


def rows_hide_gross_values(m: np.ndarray, ok: np.ndarray | None = None,
                           col_scale: np.ndarray | None = None) -> bool:
    """Whether gross values lie in every row of ``m`` (over its column
    scales; ``ok``: the values that count, zeros and subnormal ones never),
    so that no row is quiet to read the loud ones by (:func:`quiet_bound`): at
    HIDING_ROWS rows spread evenly over ``m``, the median of each row's RMS
    about its median over 1.4826 times its median absolute deviation (a
    Gaussian's sigma) is LOUD_COLUMN or more (a Gaussian row's is 1, a
    Laplace row's 1.4, Student-t(3)'s about 2.5), columns far in most of
    those rows left out (loud columns). Found by review: 1% of a
    (1024, 1024) leaf's values at 1e4, scattered, made every row loud alike,
    and the rest restored at relative error 1092, without a word; such a
    leaf is read as one population (:func:`gross_in_leaf`)."""
    rows, cols = m.shape
    if cols < LOUD_MIN_ROWS or rows < MIN_CHANNEL:
        return False
    at, cols_at = _hiding_cells(rows, cols)
    block = _balanced_block(m, ok, col_scale, at, cols_at)
    # nor subnormal values: weights decayed to nothing (PP-OCRv6's detector
    # holds rows of them around a few live ones), zeros in all but name
    block[np.abs(block) < np.finfo(np.float32).tiny] = np.nan
    counted = np.count_nonzero(~np.isnan(block), axis=1)
    usable = counted >= LOUD_MIN_ROWS
    if not usable.any():
        return False
    block = block[usable]
    with np.errstate(invalid="ignore"):
        dev = np.abs(block - _row_medians(block))
        sigma = 1.4826 * _row_medians(dev)
        # Columns far in most of these rows are loud columns (an input
        # channel held at 10), which balancing scales, not gross values
        # (found by test: read as gross, 1,152 values of such a kernel were
        # kept at 8 bytes each where one column scale each does)
        far = dev > LOUD_COLUMN * sigma
        dev[:, 2 * far.sum(axis=0) > far.shape[0]] = np.nan
        counted = ~np.isnan(dev)
        rms = np.sqrt(np.where(counted, dev * dev, 0.0).sum(axis=1)
                      / np.maximum(counted.sum(axis=1), 1))
        sigma = sigma[:, 0]
        ratio = np.where(sigma > 0, rms / np.where(sigma > 0, sigma, 1.0), np.inf)
    return bool(np.median(ratio) >= LOUD_COLUMN)


@functools.lru_cache(maxsize=256)
def _hiding_cells(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows as a column, columns as a row) that rows_hide_gross_values
    reads: HIDING_ROWS rows spread evenly, a wide row's values at most
    HIDING_COLUMNS fixed columns (read-only: shared between calls)."""
    at = np.unique(np.linspace(0, rows - 1, HIDING_ROWS).round().astype(np.int64))
    cols_at = np.unique(np.linspace(0, cols - 1, min(cols, HIDING_COLUMNS)).round()
                        .astype(np.int64))
    at.flags.writeable = cols_at.flags.writeable = False
    return at[:, None], cols_at[None, :]


def _row_medians(block: np.ndarray) -> np.ndarray:
    """Each row's median over its values that are not NaN, as a column
    (np.nanmedian's, by one sort: a save asks of every leaf)."""
    ordered = np.sort(block, axis=1)   # NaN last
    counted = np.count_nonzero(~np.isnan(block), axis=1)
    rows = np.arange(block.shape[0])
    middle = (ordered[rows, np.maximum(counted - 1, 0) // 2]
              + ordered[rows, np.minimum(counted // 2, block.shape[1] - 1)]) / 2
    return np.where(counted > 0, middle, np.nan)[:, None]


def gross_values(rows: np.ndarray, ok: np.ndarray | None, bound: float,
                 crowded: list | None = None) -> np.ndarray:
    """Where ``rows`` (loud ones, beyond the quiet ``bound``; ``ok``: the
    values that count) hold gross values (LOUD_VALUES_FEW): more than
    LOUD_COLUMN times ``bound`` from the row's median, in rows where they
    are at most LOUD_VALUES_FEW of its values and their RMS about the median
    is LOUD_COLUMN times the other values' or more. Exact zeros do not count
    (found by review: in pruned rows the median and the other values' RMS
    were the zeros', and every surviving weight of a loud row read as gross:
    a default save 44-50% larger). The side list's share limit
    (LOUD_VALUES_FEW of a leaf, beside the other entries' MAX_OUTLIER_FRACTION)
    holds. ``crowded`` (a list): True is appended where some row holds
    values that stand apart but are more than its share (the leaf is then
    read whole too, :func:`find_outliers`)."""
    dev = _median_deviations(rows, ok)
    with np.errstate(invalid="ignore"):
        far = dev > np.float32(LOUD_COLUMN * bound)     # NaN (not counted): False
    some = np.flatnonzero(far.any(axis=1))             # the rows to weigh, few
    dev, far_some = dev[some].astype(np.float64), far[some]
    near = ~far_some & ~np.isnan(dev)
    squares = np.where(far_some | near, dev * dev, 0.0)
    count_far = far_some.sum(axis=1)
    apart = _masked_mean(squares, far_some) >= LOUD_COLUMN ** 2 * _masked_mean(squares, near)
    counted = count_far + near.sum(axis=1)
    few = count_far <= LOUD_VALUES_FEW * counted
    # (at most half: in a row hundreds of times the median one, most of its
    # Gaussian values lie that far, and they stand apart from its middle)
    if crowded is not None and np.any(apart & ~few & (count_far <= CROWDED_MOST * counted)):
        crowded.append(True)
    far[some[~(few & apart)]] = False
    return far


def may_hold_gross_values(rows: np.ndarray, bound: float, margin: float,
                          crowded: bool = False) -> bool:
    """Whether :func:`gross_values` of ``rows`` (every value counted) might
    find some with a quiet bound within ``margin`` (relative) of ``bound``
    (``crowded``: might find values standing apart past a row's share).
    Each of its tests is taken at the end of that range that passes it most
    easily: a value beyond the lowest far bound; few enough beyond the
    highest; standing apart, the far values' power bounded above by those
    beyond the highest bound (values between lower a mean), the others'
    bounded below by those within the lowest (found by review: without that
    test, the Gaussian tails of loud rows sent leaves whose row scales
    spread (lognormal, sigma 1-3) to the full analysis: saves 3x slower, for
    nothing kept)."""
    return _prospect(_median_deviations(rows, None), bound, margin, crowded)


def gross_prospects(rows: np.ndarray, bound: float, margin: float) -> tuple[bool, bool]:
    """(:func:`may_hold_gross_values` of ``rows``, and with ``crowded``),
    from one pass of their deviations."""
    dev = _median_deviations(rows, None)
    return _prospect(dev, bound, margin, False), _prospect(dev, bound, margin, True)


def _prospect(dev: np.ndarray, bound: float, margin: float, crowded: bool) -> bool:
    """:func:`may_hold_gross_values` from the rows' deviations from their medians."""
    low, high = (np.float32(LOUD_COLUMN * bound * (1 + e)) for e in (-margin, margin))
    with np.errstate(invalid="ignore"):
        some = (dev > low).any(axis=1)
        beyond, within = dev > high, dev <= low
    counted = np.count_nonzero(~np.isnan(dev), axis=1)
    share = ((np.count_nonzero(~within & ~np.isnan(dev), axis=1) > LOUD_VALUES_FEW * counted)
             & (beyond.sum(axis=1) <= CROWDED_MOST * counted)
             if crowded else beyond.sum(axis=1) <= LOUD_VALUES_FEW * counted)
    rows_ = np.flatnonzero(some & share)
    if not rows_.size:
        return False
    dev = dev[rows_].astype(np.float64)
    squares = np.where(np.isnan(dev), 0.0, dev * dev)
    beyond, within = beyond[rows_], within[rows_]
    far_most = np.where(beyond.any(axis=1), _masked_mean(squares, beyond), float(high) ** 2)
    return bool(np.any(far_most >= LOUD_COLUMN ** 2 * _masked_mean(squares, within)))


def _masked_mean(squares: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's mean of ``squares`` over ``mask`` (0 where it holds none)."""
    return np.einsum("ij,ij->i", squares, mask) / np.maximum(mask.sum(axis=1), 1)


GROSS_SAMPLE = 1 << 16   # values a leaf's median and spread are read from (gross_in_leaf)
THIN_SIDE = 8            # views thinner than JPEG's blocks: coded on one step (rate.is_thin)
MAX_OCTAVES = 256        # float64 spans 2^2098: octaves past this are one


def median_and_sigma(sample: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 times the median absolute deviation: a Gaussian's
    sigma) of a non-empty sample."""
    center = float(np.median(sample))
    return center, 1.4826 * float(np.median(np.abs(sample - center)))


def gross_in_leaf(m: np.ndarray, ok: np.ndarray | None = None,
                  col_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the gross values of ``m`` (divided by its column
    scales ``col_scale``, if given; ``ok``: the values that count) taken as
    one population, where its rows cannot be read against a median row
    (:func:`quiet_bound`: a 1-D leaf's one row, the narrow rows of a (4096,
    2) leaf, a leaf whose rows are mostly zero; found by review: a block of
    6% of such a leaf at 1e4 restored the rest at relative error 160-560).
    As :func:`gross_values` with the leaf as the row and the median row's
    RMS read as 1.4826 times the median absolute deviation (a Gaussian's
    sigma), from GROSS_SAMPLE values drawn at fixed positions: values
    more than LOUD_COLUMN² such sigmas from the median, where they are at
    most LOUD_VALUES_FEW of its counted values and stand apart (in a view
    of rows LOUD_MIN_ROWS wide or more whatever the leaf's RMS: narrow rows
    share one map, whose range a few such values stretch; review: 8 values
    at 100 sigmas of a (8192, 8) leaf, the rest at 0.131; a view under
    THIN_SIDE on a side alike: its thin coding holds the values it kept as
    long codes on its step, within the error of a JPEG coding whose range
    they no longer stretch. Until session 45 they were kept only where the
    leaf's RMS was LOUD_COLUMN sigmas or more, as a side list cost a leaf its
    thin coding, and one value of 1e3 among 32,768 N(0, 1) values of a
    (16384, 2) leaf set a step that restored the rest at relative error 0.65
    (0.09 clean; found by review)); and
    only those above a gap: the first octave of
    LOUD_COLUMN sigmas (8-16 sigmas, 16-32, ...) that holds no value. Found
    by review: without a gap, the loud channels of narrow leaves whose
    channel scales spread -- depthwise kernels, 16-wide embeddings, log2
    scales of std 2-3.6 -- read as gross, default files 17-777% larger for
    nothing; a gap counted in values let the tails of rows spread by a log2
    std of 0.75-2 veto blocks of 0.01-2% of a (30000, 16) leaf, the rest
    lost; octaves from 64 sigmas up never kept a block at 64-128 sigmas or
    one filling neighbouring octaves (10% of a (8192, 8) leaf at 100x: the
    rest at 1.21). A spread tail fills its octaves; a block far above the
    rest leaves empty ones below it. Blocks of at most ROW_BLOCK_ELEMENTS values: no leaf-sized
    temporaries."""
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    rows, cols = m.shape
    if not m.size:
        return none
    at = (np.arange(m.size) if m.size <= GROSS_SAMPLE
          else np.random.default_rng(0).integers(0, m.size, GROSS_SAMPLE))
    sample = _balanced_block(m, ok, col_scale, at // cols, at % cols)
    sample = sample[~np.isnan(sample)]
    if sample.size < LOUD_MIN_ROWS:
        return none
    center, sigma = median_and_sigma(sample)
    if not (sigma > 0 and math.isfinite(sigma)):
        return none
    # First how the values beyond LOUD_COLUMN sigmas lie, by octaves, in
    # float32 (most leaves have none far): the gross ones lie above the
    # first empty octave, and LOUD_COLUMN² sigmas or more from the median.
    gap_bound = LOUD_COLUMN * sigma
    octaves = np.zeros(0, np.int64)
    for _, _, block in _blocks(m, ok, col_scale, np.float32):
        dev = np.abs(block - np.float32(center))
        with np.errstate(invalid="ignore"):
            beyond = dev[dev > np.float32(gap_bound)].astype(np.float64)
        if beyond.size:
            octave = np.minimum(np.log2(beyond / gap_bound), MAX_OCTAVES).astype(np.int64)
            octaves = np.bincount(octave, minlength=octaves.size) + np.pad(
                octaves, (0, max(0, octave.max() + 1 - octaves.size)))
        if octaves.sum() > 2 * LOUD_VALUES_FEW * m.size:
            return none   # too many, whatever the rest holds
    empty = np.flatnonzero(octaves == 0)
    if not empty.size:
        return none   # none far, or a tail reaching up without a gap
    far_bound = max(LOUD_COLUMN * gap_bound, gap_bound * 2.0 ** (empty[0] + 1))
    found = []
    counts = np.zeros(2)   # far, near
    sums = np.zeros(2)     # their squared deviations
    for r, c, block in _blocks(m, ok, col_scale, np.float64):
        dev = np.abs(block - center)
        with np.errstate(invalid="ignore"):
            far, near = dev > far_bound, dev <= far_bound
        counts += far.sum(), near.sum()
        sums += np.sum(np.where(far, dev * dev, 0.0)), np.sum(np.where(near, dev * dev, 0.0))
        if far.any():
            block_rows, block_cols = np.nonzero(far)
            found.append((block_rows + r, block_cols + c))
    n = counts.sum()
    apart = sums[0] / max(counts[0], 1) >= LOUD_COLUMN ** 2 * sums[1] / max(counts[1], 1)
    if not (found and apart and counts[0] <= LOUD_VALUES_FEW * n):
        return none
    return tuple(np.concatenate(part) for part in zip(*found))


def _blocks(m, ok, col_scale, dtype):
    """(first row, first column, block) of ``m`` over its column scales in
    ``dtype``, NaN where not counted (:func:`_balanced_block`), blocks of at
    most ROW_BLOCK_ELEMENTS values."""
    rows, cols = m.shape
    row_step = max(1, ROW_BLOCK_ELEMENTS // cols)
    col_step = min(cols, ROW_BLOCK_ELEMENTS)
    for r in range(0, rows, row_step):
        for c in range(0, cols, col_step):
            yield r, c, _balanced_block(m, ok, col_scale, slice(r, r + row_step),
                                        slice(c, c + col_step), dtype)


def _balanced_block(m, ok, col_scale, rows, cols, dtype=np.float64) -> np.ndarray:
    """``m[rows, cols]`` over its column scales in ``dtype``, NaN where not
    counted (outside ``ok``, exact zeros)."""
    block = m[rows, cols].astype(dtype)
    if col_scale is not None:
        block = block / np.asarray(col_scale, dtype)[cols]
    counted = block != 0 if ok is None else ok[rows, cols] & (block != 0)
    return np.where(counted, block, np.nan)


def _median_deviations(rows: np.ndarray, ok: np.ndarray | None) -> np.ndarray:
    """|value - its row's median| (float32) over the counted values: those
    in ``ok`` (None: all) but exact zeros; NaN elsewhere."""
    rows = np.asarray(rows, np.float32)
    counted = rows != 0 if ok is None else ok & (rows != 0)
    every = bool(counted.all())
    ordered = np.sort(rows if every else np.where(counted, rows, np.float32(np.inf)), axis=1)
    n = counted.sum(axis=1)   # the counted values come first in each ordered row
    at = np.arange(rows.shape[0])
    low, high = np.maximum(n - 1, 0) // 2, np.minimum(n // 2, rows.shape[1] - 1)
    center = np.where(n > 0, 0.5 * (ordered[at, low].astype(np.float64) + ordered[at, high]), 0.0)
    dev = np.abs(rows - center[:, None].astype(np.float32))
    return dev if every else np.where(counted, dev, np.float32(np.nan))


ROW_BLOCK_ELEMENTS = 1 << 16   # elements per block of rows in find_outliers
# Values that stood within the limit only because they inflated their row's
# RMS are kept when this many times the limit from the rest of the row: gross
# outliers (found: two 800-sigma values in a row of 256; one 1000-sigma value
# in a row of 128, where no value can stand 12 RMS out at all, left the other
# weights at relative error 0.90). Keeping the heavy tails of trained rows
# too changed the PP-OCR models at 8x (all-in, the side list's bytes
# counted): at 1x the recognizer's KL went 0.201 -> 0.166 but the detector's
# IoU 0.977 -> 0.963; at 2x the Flax-layout recognizer's exact matches 0.958
# -> 0.917. At 4x: EfficientNet and the recognizer unchanged, the detector's
# IoU at 8x 0.974 / 0.977 -> 0.973 / 0.976 (Flax / ONNX layout).
MASKED_SIGMAS_FACTOR = 4.0


def far_from_row_mean(m: np.ndarray, ok: np.ndarray | None, sigmas: float) -> np.ndarray:
    """Where ``m``'s values lie more than ``sigmas`` row RMS from their row's
    mean; ``ok`` (optional) marks the values the statistics count.

    Outliers inflate the RMS they are measured against: k values of size A
    in a row of n make the RMS about A sqrt(k / n), so two in a row of 256
    stood only 11 RMS out and stayed in the coded values, stretching the
    whole leaf's range. Rows with values beyond ``sigmas / 2`` RMS have
    their statistics taken again without those values, and values
    MASKED_SIGMAS_FACTOR times ``sigmas`` from those are far too (in a row
    of n values none can stand more than sqrt(n - 1) RMS out: in rows of
    up to 145 only this look can find one)."""
    first, masked, _ = _far_masks(m, ok, sigmas)
    return first | masked


def _far_masks(m: np.ndarray, ok: np.ndarray | None, sigmas: float):
    """(far at the first look, far only at the second, the rows' RMS about
    their means) of :func:`far_from_row_mean`."""
    dev, rms = _row_deviations(m, ok, ok)
    row_rms = rms
    first = (np.abs(dev) > sigmas * rms[:, None]) & (rms[:, None] > 0)
    suspect = np.abs(dev) > np.float32(sigmas / 2) * rms[:, None]
    masked = np.zeros_like(first)
    if suspect.any():
        dev, rms = _row_deviations(m, ~suspect if ok is None else ok & ~suspect, ok)
        masked = ((np.abs(dev) > MASKED_SIGMAS_FACTOR * sigmas * rms[:, None])
                  & (rms[:, None] > 0) & ~first)
    return first, masked, row_rms


def _row_deviations(m: np.ndarray, counted: np.ndarray | None,
                    ok: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(each value's deviation from its row's mean, the rows' RMS about it),
    the statistics over the ``counted`` values (None: all); deviations
    outside ``ok`` (None: none) are 0."""
    if counted is not None:
        values = np.where(counted, m, np.float32(0))
        count = np.maximum(counted.sum(axis=1), 1)
    else:
        values, count = m, m.shape[1]
    mean = (values.sum(axis=1, dtype=np.float64) / count).astype(np.float32)
    dev = m - mean[:, None]
    spread = dev if counted is None else np.where(counted, dev, np.float32(0))
    rms = np.sqrt(np.einsum("ij,ij->i", spread, spread, dtype=np.float64) / count).astype(np.float32)
    if ok is not None:
        dev = np.where(ok, dev, np.float32(0))
    return dev, rms


def fill_outliers(m: np.ndarray, outliers: Outliers, view: MatrixView, shape) -> np.ndarray:
    """The view ``m`` (float32, modified in place) with each kept value replaced
    by the mean of the coded values of its row, so the coder sees a smooth row."""
    if outliers.count == 0:
        return m
    # by the kept values' cells alone (found by review: masks and a masked
    # copy of the view took three times the leaf's size beyond it)
    rows, cols = view.cells(shape, outliers.index)
    m[rows, cols] = 0
    sums = m.sum(axis=1, dtype=np.float64)
    counts = m.shape[1] - np.bincount(rows, minlength=m.shape[0])
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    m[rows, cols] = means[rows]
    return m
