"""Numpy-level JPEG coding of float tensors.

A tensor is coded as a 2-D view (:class:`jaxjpeg.views.MatrixView`): by
default ``rows = prod(shape[:-1])``, ``cols = shape[-1]``; the rate controls
let :func:`jaxjpeg.views.choose_view` pick the axes instead. Each row gets
its own affine map from samples to weights and each column optionally a
scale, ``w = (s * row_scale + row_offset) * col_scale`` (see
:mod:`jaxjpeg.mapping`), which the decoder applies fused with the inverse
DCT. Values in the side list (:class:`jaxjpeg.views.Outliers`) are kept
exactly and written back after decoding. The view is cut into tiles of at
most ``tile_shape`` (JPEG's limit is 65,535 per side); every tile is a
complete grayscale JPEG file with restart markers, so its restart intervals
decode independently on all cores (or GPU threads).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import ml_dtypes
import numpy as np

from jaxjpeg import _native, layout, mapping, row_fit, threads, views
from jaxjpeg.feedback import Feedback, shape_errors
from jaxjpeg.views import MatrixView, Outliers, fill_outliers

JpegError = _native.JpegError

SHARED_MAP_COLS = 64               # views narrower than this share one row map
# Blocks per restart interval. Each interval costs its RST marker, the bits
# that pad it to a byte and an index entry, about 2.5 bytes: at 8 blocks
# (~230 bytes of data at 4 bits/weight) that was 1.1% of a file, at 32 it is
# 0.3%, and a 512 x 512 tile still has 128 intervals to decode in parallel.
# EfficientNet-lite0 / 1 / 2 at 8x with calibration (4 probe seeds), 8 -> 32
# blocks: KL 0.0212 / 0.0251 / 0.0200 -> 0.0191 / 0.0213 / 0.0181.
DEFAULT_RESTART_INTERVAL = 32
# Rows, cols of one tile, for encode_tensor and save alike: small enough that
# 8-way row or column shards of a checkpoint read no extra tiles.
DEFAULT_TILE_SHAPE = (512, 512)
MAX_TILE_SIDE = 65528              # largest multiple of 8 within JPEG's 65,535
# Prepared.with_even_splits: a tile costs about TILE_COST_BYTES beyond its
# coded data (JPEG header and tables, container record, padding and index:
# 280-450 measured), and a leaf codes to about SPLIT_ESTIMATE_BITS per weight at
# the default rate; extra tiles may cost SPLIT_COST_FRACTION of that.
TILE_COST_BYTES = 450
MIN_CUT_PIECE = views.MIN_CUT_PIECE
SPLIT_ESTIMATE_BITS = 4
SPLIT_COST_FRACTION = 0.01

OUTPUT_TYPES = {
    np.dtype(np.float32): 0,
    np.dtype(ml_dtypes.bfloat16): 1,
    np.dtype(np.float16): 2,
}


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view a tensor of ``shape`` is coded as."""
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


@dataclasses.dataclass(frozen=True)
class Tile:
    """One JPEG file covering ``[row0, row0+height) x [col0, col0+width)``."""

    data: bytes
    row0: int
    col0: int
    height: int
    width: int
    bits: int
    restart_interval: int
    interval_starts: np.ndarray  # int64, offsets into data, one per interval + end
    # float64 [height, len(row_fit.SUMS)]: each row's sums of its weights and
    # of what it decodes to (row_fit's columns), where they were taken
    row_sums: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def num_intervals(self) -> int:
        return len(self.interval_starts) - 1


@dataclasses.dataclass(frozen=True)
class EncodedTensor:
    """A tensor as JPEG tiles of its 2-D view, the view's maps and a side list."""

    shape: tuple[int, ...]
    dtype: str
    bits: int
    tiles: tuple[Tile, ...]
    row_scale: np.ndarray   # float32 [rows]
    row_offset: np.ndarray  # float32 [rows]
    view: MatrixView = None                # None: MatrixView.default
    col_scale: np.ndarray | None = None    # float32 [cols], float16-representable
    outliers: Outliers | None = None       # values kept exactly
    # (scale, offset) as chosen before coding, where fit_rows moved some rows'
    base_maps: tuple | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.view is None:
            object.__setattr__(self, "view", MatrixView.default(len(self.shape)))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.view.matrix_shape(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Compressed size: tile bytes, maps and side list as stored."""
        return (sum(len(t.data) for t in self.tiles) + memoryview(self.stored_affine[1]).nbytes
                + (0 if self.col_scale is None else self.stored_col_scale().nbytes)
                + (0 if self.outliers is None else self.outliers.nbytes(self.size)))

    def affine(self) -> np.ndarray:
        """[2, rows] scale and offset -- [2, 1] when every row has the same map
        -- float16 when that is exact (the mappings pick float16-representable
        values where they can), else float32."""
        affine = np.stack([self.row_scale, self.row_offset])
        if np.all(affine == affine[:, :1]):
            affine = np.ascontiguousarray(affine[:, :1])
        return _half_if_exact(affine)

    @functools.cached_property
    def stored_affine(self) -> tuple[str | None, bytes | np.ndarray]:
        """(layout name for the record, blob) of the maps as a checkpoint
        stores them (:func:`jaxjpeg.layout.pack_affine`); deflated once, for
        ``nbytes`` (asked several times per coding) and the writer alike."""
        return layout.pack_affine(self.affine())

    def stored_col_scale(self) -> np.ndarray | None:
        """The column scales as stored: float16 when exact, else float32."""
        return None if self.col_scale is None else _half_if_exact(self.col_scale)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(1, self.size)


def _half_if_exact(values) -> np.ndarray:
    values = np.asarray(values, np.float32)
    # A float16 value has at most 10 mantissa bits: as float32 its low 13
    # bits are zero. Checked first, so maps that float16 cannot hold are not
    # converted (numpy signals underflow for each tiny value, slowly).
    if np.any(values.view(np.uint32) & 0x1FFF):
        return values
    # Past float16's range the cast gives inf (the maps then stay float32),
    # which numpy warns of (found by review: balanced rows' maps of 1e6).
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), values) else values


def quant_table(*, bits: int, quality: int | None = None, quant_step: float | None = None,
                qtable: Sequence[int] | None = None) -> np.ndarray:
    """The 64-entry table (natural order) for exactly one of the three controls."""
    given = [v is not None for v in (quality, quant_step, qtable)]
    if sum(given) != 1:
        raise ValueError("give exactly one of quality, quant_step or qtable")
    limit = 255 if bits == 8 else 65535
    if quality is not None:
        return _native.quality_table(int(quality), bits)
    if quant_step is not None:
        if not 1 <= round(quant_step) <= limit:
            raise ValueError(f"quant_step must be in 1..{limit} for {bits}-bit samples, "
                             f"got {quant_step}")
        return np.full(64, round(quant_step), np.uint16)
    table = np.asarray(qtable)
    # whole numbers only (found by review: 2.9 was coded as 2, NaN as 0)
    if (table.shape != (64,) or table.dtype.kind not in "iuf"
            or not np.all((table >= 1) & (table <= limit) & (table == np.floor(table)))):
        raise ValueError(f"qtable must have 64 whole numbers in 1..{limit}")
    return table.astype(np.uint16)


def tile_grid(rows: int, cols: int, tile_shape: tuple[int, int], row_cuts: Sequence[int] = (),
              col_cuts: Sequence[int] = ()) -> list[tuple[int, int, int, int]]:
    """(row0, col0, height, width) of every tile, row-major.

    Tiles are ``tile_shape`` (rounded down to multiples of 8) from each side's
    start, except that every position in ``row_cuts`` / ``col_cuts`` is a tile
    edge too (e.g. shard boundaries, see MatrixView.shard_cuts): the cut
    pieces are tiled from their own starts, so tiles only get smaller where a
    cut falls inside one. Without cuts: the uniform grid.
    """
    th, tw = (min(MAX_TILE_SIDE, max(8, s // 8 * 8)) for s in tile_shape)
    return [(r, c, h, w) for r, h in _side_tiles(rows, th, row_cuts)
            for c, w in _side_tiles(cols, tw, col_cuts)]


def _side_tiles(length: int, side: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one side of ``length``."""
    edges = sorted({0, length, *(int(c) for c in cuts if 0 < c < length)})
    return [(start, min(side, stop - start))
            for begin, stop in zip(edges, edges[1:]) for start in range(begin, stop, side)]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A tensor ready to code at any step: its view as float32 with columns
    divided by their scales and kept values replaced by their row's mean."""

    shape: tuple[int, ...]
    dtype: str
    view: MatrixView
    matrix: np.ndarray               # float32 [rows, cols]
    row_weight: np.ndarray | None    # per-row importance (see mapping.row_affine)
    col_scale: np.ndarray | None     # float32 [cols]
    outliers: Outliers | None
    original: np.ndarray             # the tensor itself (not a copy)
    shared_map: bool = False         # one row map for all rows (see mapping.row_affine)
    # bits -> row scales, "stats" -> row statistics, "squares" -> the sum of
    # the squared coded values in weight units (caches)
    scales: dict = dataclasses.field(default_factory=dict, compare=False)
    feedback: Feedback | None = None  # shape the error against the layer's inputs
    # (row cuts, col cuts) of the view that must be tile edges (see tile_grid):
    # the shard boundaries of the array saved, so each shard reads its own tiles.
    tile_cuts: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    # How far row_weight may spread the rows' steps (mapping.relative_steps;
    # None: exact weights, uncapped).
    row_spread: float | None = mapping.ROW_SPREAD
    # True: the steps row_weight sets are relative to the lightest row's, not
    # their geometric mean: weights only make rows finer (the prior's
    # quiet channels; mapping.relative_steps).
    row_lightest: bool = False
    # True: col_scale balances loud inputs (views.loud_column_scales), or
    # row_factor loud outputs (views.loud_row_factors), and the divided
    # matrix is coded as if it were the weights: steps, error feedback and
    # the rate model's errors are in its units; only restoring (and errors
    # measured against the leaf itself) multiplies back.
    balanced: bool = False
    # float32 [rows], powers of two: the matrix's rows are divided by them,
    # and each row's map is multiplied back by its factor when coded (so the
    # file holds maps in weight units, and restoring needs nothing else).
    row_factor: np.ndarray | None = None

    def tiles(self, tile_shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """The tiles this tensor is coded in (:func:`tile_grid`)."""
        return tile_grid(*self.matrix.shape, tile_shape, *self.tile_cuts)

    def with_even_splits(self, tile_shape: tuple[int, int]) -> "Prepared":
        """For a leaf saved without a sharding: tile edges at the 8-, 4- or
        2-way even splits of its largest axis (where that axis leads a side
        of the view), the most ways whose extra tiles cost at most about
        SPLIT_COST_FRACTION of the leaf's coded size (data-free estimate).
        Tensor-parallel layouts shard the largest axis of MLP and fused
        attention kernels; measured cost: docs/format.md."""
        axis = int(np.argmax(self.shape)) if self.shape else 0
        uniform = len(self.tiles(tile_shape))
        allowed = SPLIT_COST_FRACTION * self.size * SPLIT_ESTIMATE_BITS / 8 / TILE_COST_BYTES
        for ways in (8, 4, 2):
            if not self.shape or self.shape[axis] % (8 * ways):
                continue
            step = self.shape[axis] // ways
            regions = [tuple((i * step, (i + 1) * step, 1) if a == axis else (0, n, 1)
                             for a, n in enumerate(self.shape)) for i in range(ways)]
            split = self.with_shards(regions)
            if len(split.tiles(tile_shape)) - uniform <= allowed:
                return split
        return self

    def with_shards(self, regions) -> "Prepared":
        """This tensor with tile edges at the boundaries of ``regions`` (the
        shards of the array saved, (start, stop, step) per axis), or as it is.
        A side whose pieces would be narrower than MIN_CUT_PIECE keeps the
        uniform grid: such slivers' headers would cost more than 5% of them."""
        if not regions:
            return self
        cuts = self.view.shard_cuts(self.shape, regions)
        if self.feedback is not None:
            # Error feedback models the coder's 8 x 8 blocks from the view's
            # origin: an edge off that grid (a shard of 300 rows) shifted
            # every later tile's blocks, whose errors came out 2.6x what
            # feedback aimed at (found by review). Its edges go to the
            # nearest multiple of 8; a shard then reads a tile more.
            cuts = tuple(tuple(sorted({8 * round(c / 8) for c in side} - {0, length}))
                         for side, length in zip(cuts, self.matrix.shape))
        cuts = tuple(side if np.diff([0, *side, length]).min() >= MIN_CUT_PIECE else ()
                     for side, length in zip(cuts, self.matrix.shape))
        return dataclasses.replace(self, tile_cuts=cuts)

    def common_scale(self, bits: int) -> np.ndarray:
        """Row scales of clip="common" at ``bits`` (cached: a rate search asks often)."""
        if bits not in self.scales:
            self.scales[bits] = mapping.common_scale(self.matrix, bits, self.row_weight,
                                                     shared=self.shared_map,
                                                     stats=self.row_stats(),
                                                     max_ratio=self.row_spread,
                                                     lightest=self.row_lightest)
        return self.scales[bits]

    def row_stats(self):
        """:func:`jaxjpeg.mapping.row_stats` of the matrix (cached: every
        sample depth and the coding itself use them)."""
        if "stats" not in self.scales:
            self.scales["stats"] = mapping.row_stats(self.matrix, self.shared_map)
        return self.scales["stats"]

    def row_variance(self) -> np.ndarray:
        """float64 [rows]: each row's mean square about its mean (cached),
        read ROW_BLOCK_ELEMENTS at a time."""
        if "row_variance" not in self.scales:
            rows, cols = self.matrix.shape
            step = max(1, views.ROW_BLOCK_ELEMENTS // max(1, cols))
            variance = np.empty(rows)
            for r in range(0, rows, step):
                variance[r:r + step] = self.matrix[r:r + step].var(axis=1, dtype=np.float64)
            self.scales["row_variance"] = variance
        return self.scales["row_variance"]

    def kept_in_view(self) -> np.ndarray | None:
        """Bool [rows, cols]: the side list's positions in the view (None: none)."""
        kept = index_mask(None if self.outliers is None else self.outliers.index, self.shape)
        return None if kept is None else self.view.to_matrix(kept)

    @property
    def size(self) -> int:
        return self.matrix.size

    def side_bytes(self) -> int:
        """Bytes stored besides the tiles whatever the step: maps and side list."""
        rows, cols = self.matrix.shape
        # Maps: one float16 scale and offset when shared, else about one
        # byte a row (offsets deflated: layout.pack_affine).
        return ((4 if self.shared_map else 4 + rows) + (0 if self.col_scale is None else 2 * cols)
                + (0 if self.outliers is None else self.outliers.nbytes(self.size)))

    def weight_domain(self, matrix: np.ndarray) -> np.ndarray:
        """Values of the (column-normalised) view back in the units it is
        coded in: weight units, or a balanced leaf's own."""
        units = self.coded_units()
        return matrix if units is None else matrix * units

    def coded_units(self) -> np.ndarray | None:
        """The column scales that take the matrix to the units its steps,
        error feedback and rate curves are in: its column scales, or none for
        a balanced leaf (coded in its own units)."""
        return None if self.balanced else self.col_scale


def prepare(x, *, view: MatrixView | None = None, row_weight=None, col_weight=None,
            outliers: Outliers | None = None, col_scale: np.ndarray | None = None,
            feedback: Feedback | None = None, copy: bool = True,
            row_spread: float | None = mapping.ROW_SPREAD, balanced: bool = False,
            row_factor: np.ndarray | None = None, row_lightest: bool = False) -> Prepared:
    """Puts ``x`` in ``view`` (default: the framework's order) for coding.

    ``col_scale`` gives column scales directly (another Prepared's, to redo
    its preparation without its analysis); ``col_weight`` (per-column
    importance of the view) becomes column scales
    ``∝ col_weight^-½`` (geometric mean 1): column ``c``'s quantization step is
    then that much finer or coarser. ``row_spread`` caps how far ``row_weight``
    spreads the rows' steps (None: exact weights, uncapped); ``row_lightest``: relative to the
    lightest row's step, not their geometric mean. ``outliers`` are kept exactly; without
    them every value must be finite. ``feedback`` (see :mod:`jaxjpeg.feedback`)
    shapes the quantization error against the layer's inputs.
    ``balanced``: ``col_scale`` balances loud inputs, or ``row_factor`` (per
    row, powers of two) loud outputs (:attr:`Prepared.balanced`). ``copy=False``:
    the matrix is a view of ``x`` where nothing needs changing (float32, no
    side list or column scales; the caller keeps ``x`` unchanged while it
    codes).
    """
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
        raise TypeError(f"encode_tensor codes floating-point tensors, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError("cannot JPEG-code an empty tensor")
    view = view or MatrixView.default(arr.ndim)
    in_place = (not copy and arr.dtype == np.float32 and col_weight is None
                and col_scale is None and row_factor is None
                and not (outliers is not None and outliers.count))
    matrix = view.to_matrix(arr)
    if not in_place:   # a private float32 copy: one (a moving view's reshape copies already)
        matrix = np.asarray(matrix, np.float32)
        matrix = matrix.copy() if np.may_share_memory(matrix, arr) else matrix
    if col_weight is not None:   # else col_scale as given (a Prepared's, reused)
        col_scale = mapping.column_scales(col_weight, matrix.shape[1])
    if col_scale is not None:
        # before the kept values' fill, so that they take their rows' means in
        # coded units (found by review: a NaN kept in a balanced leaf took a
        # mean of its loud columns, 156x the rest of its row, and zeroed it)
        with np.errstate(invalid="ignore", over="ignore"):
            matrix /= col_scale
    if row_factor is not None:
        row_factor = np.asarray(row_factor, np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            matrix /= row_factor[:, None]
    if outliers is not None and outliers.count:
        matrix = fill_outliers(matrix, outliers, view, arr.shape)
    else:
        outliers = None
    if not np.all(np.isfinite(matrix)):
        raise ValueError("tensor has NaN or infinite values; store it losslessly instead")
    shared = row_weight is None and row_factor is None and matrix.shape[1] < SHARED_MAP_COLS
    return Prepared(tuple(arr.shape), str(arr.dtype), view, matrix,
                    None if row_weight is None else np.asarray(row_weight), col_scale, outliers,
                    arr, shared, feedback=feedback, row_spread=row_spread,
                    balanced=balanced and (col_scale is not None or row_factor is not None),
                    row_factor=row_factor, row_lightest=row_lightest)


def encode_tensor(x, *, bits: int = 8, quality: int | None = None,
                  quant_step: float | None = None, qtable: Sequence[int] | None = None, clip: str = "common",
                  row_weight: np.ndarray | None = None, col_weight: np.ndarray | None = None,
                  view: MatrixView | None = None, outliers: Outliers | None = None,
                  restart_interval: int = DEFAULT_RESTART_INTERVAL,
                  tile_shape: tuple[int, int] = DEFAULT_TILE_SHAPE,
                  threads: int | None = None, squared_error_of=None, widen: float = 1.0):
    """Encodes a float tensor (or a :class:`Prepared` one) as JPEG tiles.

    Exactly one of ``quality`` (the standard table scaled, 1..100), ``quant_step``
    (a flat table: uniform quantization of every DCT coefficient) or
    ``qtable`` (64 steps, natural order) sets the rate. ``clip`` chooses the
    per-row sample range and ``row_weight`` per-row importances (see
    :func:`jaxjpeg.mapping.row_affine`); ``view``, ``col_weight`` and
    ``outliers`` as in :func:`prepare`. ``widen`` (``clip="common"`` only,
    >= 1): the rows' scales times this, so an integer ``quant_step`` codes a
    weight-domain step between it and the next (integer steps 1-4 are
    33-100% apart; see rate._densify).

    ``squared_error_of`` (optional): (the tensor's float32 view, read in
    place; the bool mask of its side list's positions in that view, or None).
    Each tile's squared error against it is then summed as the tile is coded
    (``_native.encode_mapped_with_error``: what decoding the tile would give,
    to the last bit) and ``(EncodedTensor, error)`` is returned.
    """
    if bits not in (8, 12):
        raise ValueError(f"bits must be 8 or 12, got {bits}")
    if not 0 <= restart_interval <= 65535:
        raise ValueError("restart_interval must be in 0..65535 blocks")
    if isinstance(x, Prepared):
        p = x
    else:
        p = prepare(x, view=view, row_weight=row_weight, col_weight=col_weight,
                    outliers=outliers)
    if not (widen >= 1 and math.isfinite(widen)) or (widen != 1 and clip != "common"):
        raise ValueError(f"widen must be finite and >= 1, with clip='common'; got {widen}")
    table = quant_table(bits=bits, quality=quality, quant_step=quant_step, qtable=qtable)
    common = None
    if clip == "common":
        common = p.common_scale(bits) if widen == 1 else mapping.widened(p.common_scale(bits), widen)
    _, scale, offset = mapping.row_affine(
        p.matrix, bits, clip=clip, step=float(table.mean()), row_weight=p.row_weight,
        scale=common,
        shared=p.shared_map and clip == "common", with_samples=False,
        stats=p.row_stats() if clip == "common" else None)
    # Error feedback runs across the whole leaf, so it needs all its samples.
    if squared_error_of is not None and (p.feedback is not None or p.row_factor is not None):
        raise ValueError("squared_error_of measures codings of the weights' own samples "
                         "on their own maps, not error feedback's or balanced rows'")
    shaped = None if p.feedback is None else shape_errors(
        mapping.to_samples(p.matrix, scale, offset, bits), table, bits, p.feedback, scale,
        p.coded_units())
    # Rows a coding may lose are summed as it codes them, to be mapped to
    # their means where it did (row_fit). Not under error feedback, which
    # puts each row's error where the layer's inputs cancel it: mapping its
    # lost rows (near-constant channels of EfficientNet-lite) to their means
    # moved the 4-seed KL at 8x by -6% / -1% / +9% on lite0 / 1 / 2, lite2's
    # top-1 0.878 -> 0.839; nor balanced rows (their maps scale back after).
    fitted = None
    if (clip == "common" and shaped is None and p.row_factor is None
            and p.matrix.shape[1] >= row_fit.MIN_ROW_VALUES):
        fitted = row_fit.candidates(p.row_variance(), scale, float(table.max()))
        fitted = fitted if fitted.any() else None
    kept_view = None
    if fitted is not None:
        kept_view = squared_error_of[1] if squared_error_of is not None else p.kept_in_view()
    # the rows' errors in the dtype the decoder writes (in coded units, as
    # float32, where column scales multiply it after)
    written = output_type(written_dtype(p.dtype) if p.col_scale is None else np.float32)

    errors = []

    def summed_tile(cell):
        """A tile coded as below, with its rows' sums (row_fit)."""
        r, c, h, w = cell
        box = (slice(r, r + h), slice(c, c + w))
        original = None if squared_error_of is None else squared_error_of[0][box]
        # the rows of 8 x 8 blocks holding rows it may lose (all, for an error)
        bands = None if original is not None else np.pad(
            fitted[box[0]], (0, -h % 8)).reshape(-1, 8).any(axis=1).astype(np.uint8)
        kept = None if kept_view is None else kept_view[box]
        data, starts, error, sums = _native.encode_mapped_with_row_sums(
            encodable(p.matrix[box]), scale[box[0]], offset[box[0]], table, bits,
            restart_interval, original,
            None if p.col_scale is None or original is None else p.col_scale[box[1]],
            kept, bands, written)
        if bands is not None:   # rows not summed
            sums[~np.repeat(bands.astype(bool), 8)[:h]] = np.nan
        if original is not None:
            errors.append((r, c, error))
        return Tile(data, r, c, h, w, bits, restart_interval, starts, sums)

    def encode_one(cell):
        r, c, h, w = cell
        # The encoder records where each interval starts as it writes them.
        if fitted is not None and fitted[r:r + h].any():
            return summed_tile(cell)
        elif shaped is None and squared_error_of is not None:
            original, kept = squared_error_of
            data, starts, error = _native.encode_mapped_with_error(
                encodable(p.matrix[r:r + h, c:c + w]), scale[r:r + h], offset[r:r + h], table,
                bits, restart_interval, original[r:r + h, c:c + w],
                None if p.col_scale is None else p.col_scale[c:c + w],
                None if kept is None else kept[r:r + h, c:c + w])
            errors.append((r, c, error))
        elif shaped is None:
            # It maps each block's weights to samples as it codes them
            # (mapping.to_samples): no copy of the tile.
            data, starts = _native.encode_mapped(
                encodable(p.matrix[r:r + h, c:c + w]), scale[r:r + h], offset[r:r + h],
                table, bits=bits, restart_interval=restart_interval, with_intervals=True)
        else:
            # Plain rounding, as feedback assumed when it moved each group's
            # error onto the inputs after it: RDO would round again, leaving
            # errors nothing cancels (output error 5-10x higher at equal bytes).
            data, starts = _native.encode(np.ascontiguousarray(shaped[r:r + h, c:c + w]), table,
                                          bits=bits, restart_interval=restart_interval,
                                          rdo=False, with_intervals=True)
        return Tile(data, r, c, h, w, bits, restart_interval, starts)

    cells = p.tiles(tile_shape)
    if len(cells) == 1 or threads == 1:   # in this thread (it may be a pool's)
        tiles = tuple(map(encode_one, cells))
    elif threads is None:   # the shared pool: no threads started per tensor
        tiles = tuple(tile_pool().map(encode_one, cells))
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            tiles = tuple(pool.map(encode_one, cells))
    if p.row_factor is not None:   # the balanced rows' maps back in weight units
        scale, offset = scale * p.row_factor, offset * p.row_factor
    enc = fit_rows(EncodedTensor(p.shape, p.dtype, bits, tiles, scale, offset, p.view,
                                 p.col_scale, p.outliers))
    if squared_error_of is None:
        return enc
    if enc.base_maps is not None:   # measured on the maps before the fit
        errors = _errors_again(enc, errors, squared_error_of)
    by_tile = dict(((r, c), e) for r, c, e in errors)
    return enc, sum(by_tile[t.row0, t.col0] for t in tiles)   # in tile order, as decoded


def fit_rows(enc: EncodedTensor) -> EncodedTensor:
    """``enc`` with the rows its coding lost mapped to their means
    (:func:`jaxjpeg.row_fit.refitted`), from the row sums of its tiles (a
    row some tile of which has none, or NaN, keeps its map); from the maps
    ``enc.base_maps`` where set (a coding whose tiles were mixed with
    another's is fitted again)."""
    if enc.base_maps is None and all(t.row_sums is None for t in enc.tiles):
        return enc
    scale, offset = enc.base_maps or (enc.row_scale, enc.row_offset)
    rows = enc.matrix_shape[0]
    sums, covered = np.zeros((rows, len(row_fit.SUMS))), np.zeros(rows, np.int64)
    width = enc.matrix_shape[1]
    for t in enc.tiles:
        if t.row_sums is not None:
            sums[t.row0:t.row0 + t.height] += t.row_sums
            covered[t.row0:t.row0 + t.height] += t.width
    complete = (covered == width) & np.isfinite(sums).all(axis=1)
    if not complete.any():
        return dataclasses.replace(enc, row_scale=scale, row_offset=offset, base_maps=None)
    dtype = written_dtype(enc.dtype) if enc.col_scale is None else np.dtype(np.float32)
    new_scale, new_offset = row_fit.refitted(scale, offset, sums, complete,
                                             float(1 << (enc.bits - 1)), dtype)
    moved = bool(np.any((new_scale != scale) | (new_offset != offset)))
    return dataclasses.replace(enc, row_scale=new_scale, row_offset=new_offset,
                               base_maps=(scale, offset) if moved else None)


def _errors_again(enc: EncodedTensor, errors, squared_error_of) -> list:
    """The measured tiles' ``(row0, col0, error)`` with the error of each
    tile a row of which fit_rows moved summed again on the fitted maps."""
    original, kept = squared_error_of
    scale, offset = enc.base_maps
    moved = (enc.row_scale != scale) | (enc.row_offset != offset)
    tiles = {(t.row0, t.col0): t for t in enc.tiles}
    again = []
    for r, c, error in errors:
        t = tiles[r, c]
        if moved[r:r + t.height].any():
            box = (slice(r, r + t.height), slice(c, c + t.width))
            error = tile_error(enc, t, original[box], None if kept is None else kept[box])
        again.append((r, c, error))
    return again


def tile_error(enc: EncodedTensor, tile: Tile, original: np.ndarray, kept) -> float:
    """Σ (original - decoded)² over one tile of float32 weights (``original``,
    the tile's values, read in place), ``kept`` positions excluded: decoded
    and summed natively on the tile's maps and column scales."""
    rows = slice(tile.row0, tile.row0 + tile.height)
    cols = None if enc.col_scale is None else enc.col_scale[tile.col0:tile.col0 + tile.width]
    return _native.tile_squared_error(tile.data, original, enc.row_scale[rows],
                                      enc.row_offset[rows], cols, kept)


def index_mask(index, shape) -> np.ndarray | None:
    """Bool ``shape``, True at the flat positions ``index`` (e.g. those the
    side list keeps exactly); None when there are none."""
    if index is None or not len(index):
        return None
    mask = np.zeros(math.prod(shape), bool)
    mask[index] = True
    return mask.reshape(shape)


def encodable(tile: np.ndarray) -> np.ndarray:
    """A float32 tile whose rows or columns are contiguous (what the encoder
    reads), as it is when it already is (a slice of a C-order matrix or of
    its transpose)."""
    if tile.dtype == np.float32 and (_contiguous_lines(tile.shape, tile.strides)
                                     or _contiguous_lines(tile.shape[::-1], tile.strides[::-1])):
        return tile
    return np.ascontiguousarray(tile, np.float32)


def _contiguous_lines(shape, strides) -> bool:
    """Whether a 2-D float32 layout has contiguous, non-overlapping rows."""
    return (shape[1] <= 1 or strides[1] == 4) and (shape[0] <= 1 or strides[0] >= 4 * shape[1])


_TILE_POOL = threads.SharedPool(threads.cores, "jaxjpeg-encode")


def tile_pool() -> ThreadPoolExecutor:
    """One process-wide pool encoding tiles (the native encoder releases the
    GIL), started once: starting threads per tensor cost a save of many
    leaves more than a tenth of its time on a busy machine."""
    return _TILE_POOL.get()


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Operands of one decode call (see xla_ops/decode_plan.h)."""

    payload: np.ndarray          # uint8
    interval_starts: np.ndarray  # int64 [intervals + 1]
    tiles: np.ndarray            # int64 [tiles, TILE_COLUMNS]
    tables: np.ndarray           # uint8 [tables * PACKED_TABLES_SIZE]: DHT and DQT contents
    row_scale: np.ndarray        # float32
    row_offset: np.ndarray       # float32
    col_scale: np.ndarray        # float32
    positions: np.ndarray        # int64: placed tiles' element offsets (MatrixView.positions)
    output_shapes: tuple[tuple[int, int], ...]
    output_dtypes: tuple[np.dtype, ...]
    block_map: np.ndarray        # int32 [CUDA decode blocks, 2]: a hint (see decode_plan.h)
    labels: tuple = ()           # per tile: what an error names (a leaf's path and tile)

    @property
    def tile_labels(self) -> "TileLabels":
        return TileLabels(self.tiles[:len(self.labels), _FIRST_INTERVAL].copy(), self.labels,
                          self.tiles[:len(self.labels), _OUTPUT].copy())


class PlanBuilder:
    """Collects tensors' tiles into one decode plan.

    Tile bytes are copied once, straight into the plan's payload, by a
    ``fill(view)`` callback per tile (a container read, or a bytes copy).
    Tables are parsed from each tile's own header and deduplicated.
    """

    def __init__(self):
        self._labels: list[str | None] = []
        self._tiles: list[list[int]] = []
        self._starts: list[np.ndarray] = []
        self._fills: list = []
        self._sizes: list[int] = []
        self._scales: list[np.ndarray] = []
        self._affine_bases: list[int] = []   # each output's first row in the affine arrays
        self._offsets: list[np.ndarray] = []
        self._col_scales: list[np.ndarray] = []
        self._col_bases: list[int] = []      # each output's first column scale, or -1
        self._placements: list = []          # each output's first row offset, or -1
        self._positions: list[np.ndarray] = []
        self._position_count = 0
        self._shapes: list[tuple[int, int]] = []
        self._dtypes: list[np.dtype] = []
        self._payload_size = 0
        self._intervals = 0
        self._affine_rows = 0
        self._col_scale_count = 0

    def add_output(self, shape: tuple[int, int], dtype, row_scale, row_offset,
                   col_scale=None, placement=None) -> int:
        """A 2-D output with its affine rows (and column scales); returns its index.

        ``placement = (row_at, col_at)`` (:meth:`MatrixView.positions`) writes
        element (r, c) of the 2-D view at flat offset ``row_at[r] + col_at[c]``
        of the output instead: the output then holds the tensor in its own
        layout, and only a reshape remains."""
        output_type(dtype)
        self._placements.append(-1 if placement is None else self._position_count)
        if placement is not None:   # row offsets, then column offsets
            row_at, col_at = (np.asarray(a, np.int64) for a in placement)
            if (len(row_at), len(col_at)) != tuple(shape):
                raise ValueError(f"placement tables of {len(row_at)} x {len(col_at)} for a "
                                 f"{shape[0]} x {shape[1]} output")
            self._positions += [row_at, col_at]
            self._position_count += row_at.size + col_at.size
        if col_scale is None:
            self._col_bases.append(-1)
        else:
            self._col_scales.append(np.asarray(col_scale, np.float32))
            self._col_bases.append(self._col_scale_count)
            self._col_scale_count += self._col_scales[-1].size
        self._shapes.append((int(shape[0]), int(shape[1])))
        self._dtypes.append(np.dtype(dtype))
        self._scales.append(np.asarray(row_scale, np.float32))
        self._affine_bases.append(self._affine_rows)
        self._affine_rows += len(self._scales[-1])
        self._offsets.append(np.asarray(row_offset, np.float32))
        return len(self._shapes) - 1

    def add_tile(self, output: int, tile_box: tuple[int, int, int, int], *, bits: int,
                 restart_interval: int, interval_starts: np.ndarray, size: int, fill,
                 affine_row0: int | None = None, col_scale0: int | None = None,
                 label: str | None = None) -> None:
        """A tile at ``tile_box = (row0, col0, height, width)`` of ``output``.

        ``affine_row0`` / ``col_scale0`` are the tile's first row in the
        output's affine arrays and first column in its column scales (default:
        its row and column in the output). ``label`` is what a decode error
        in the tile names (:class:`TileLabels`).
        """
        self._labels.append(label)
        row0, col0, height, width = tile_box
        affine_base, col_base = self._affine_bases[output], self._col_bases[output]
        rows, cols = self._shapes[output]
        placed = self._placements[output]
        # Placed by table: the row stride column holds the distance from the
        # tile's row offsets to its column offsets (decode_plan.h).
        self._tiles.append([-1, bits, width, height, output, row0, col0,
                            cols if placed < 0 else rows - row0 + col0,
                            affine_base + (row0 if affine_row0 is None else affine_row0),
                            self._intervals, restart_interval,
                            -1 if col_base < 0 else
                            col_base + (col0 if col_scale0 is None else col_scale0),
                            -1 if placed < 0 else placed + row0])
        self._starts.append(np.asarray(interval_starts[:-1], np.int64) + self._payload_size)
        self._fills.append(fill)
        self._sizes.append(size)
        self._payload_size += size
        self._intervals += len(interval_starts) - 1

    def finish(self, *, parallel_fills: bool = False, bucketed: bool = False) -> DecodePlan:
        """The plan; ``parallel_fills`` runs the tiles' fills concurrently
        (reads straight into the payload, e.g. from a remote store).
        ``bucketed``: the operands whose sizes depend on the data (payload,
        tables, maps) padded to :func:`bucketed_size`, so that a jitted decode
        compiled for one checkpoint serves the next of the same model (the
        padding is never read: intervals, tiles and maps index below it)."""
        size = bucketed_size if bucketed else (lambda n: n)
        payload = _aligned_empty(size(self._payload_size))
        payload[self._payload_size:] = 0
        bounds = np.cumsum([0] + self._sizes)
        tile_bytes = [payload[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if parallel_fills and len(tile_bytes) > 1:
            list(_FILL_POOL.get().map(lambda fill, view: fill(view), self._fills, tile_bytes))
        else:
            for fill, view in zip(self._fills, tile_bytes):
                fill(view)
        tables: dict[bytes, int] = {}
        for row, view, label in zip(self._tiles, tile_bytes, self._labels):
            try:
                tile_tables, *geometry = _native.tile_header(view)
                _check_tile_geometry(row, geometry)
            except JpegError as e:   # named (found by review: "JPEG header: ..." alone)
                raise JpegError(f"{label}: {e}" if label else str(e)) from None
            row[0] = tables.setdefault(tile_tables.tobytes(), len(tables))
        starts = np.concatenate(self._starts + [np.array([self._payload_size], np.int64)])
        tiles = np.array(self._tiles, np.int64).reshape(-1, _native.TILE_COLUMNS)
        tables = list(tables)
        tables += tables[-1:] * (size(len(tables)) - len(tables))   # valid, never used
        return DecodePlan(
            payload=payload,
            interval_starts=starts,
            tiles=tiles,
            tables=_aligned_concatenation(tables),
            row_scale=_padded(self._scales, size),
            row_offset=_padded(self._offsets, size),
            col_scale=_padded(self._col_scales, size),
            positions=_aligned_concatenation(self._positions, np.int64),
            output_shapes=tuple(self._shapes),
            output_dtypes=tuple(self._dtypes),
            block_map=_native.block_map(starts, tiles, [output_type(d) for d in self._dtypes]),
            labels=tuple(self._labels),
        )


_FIRST_INTERVAL = 9   # the plan's tiles column holding a tile's first interval
_OUTPUT = 4           # and the output it lands in


@dataclasses.dataclass(frozen=True)
class TileLabels:
    """What a decode error names: each tile's label and first interval of a
    plan (small: kept until a decode's status is checked, the plan is not)."""

    first_interval: np.ndarray
    labels: tuple
    outputs: np.ndarray | None = None   # per tile: the output it lands in

    def of_output(self, output: int) -> str | None:
        """The label of output ``output``'s first tile, or None."""
        if self.outputs is None:
            return None
        found = np.flatnonzero(self.outputs == output)
        return self.labels[found[0]] if found.size else None

    def of_interval(self, interval: int) -> tuple[str, int] | None:
        """(the label of the tile holding ``interval`` (a failure's), the
        interval's number in that tile), or None (found by review: errors
        named an interval of the plan, 12 from restore and 0 from get for
        one damaged tile, and not the leaf)."""
        if not self.labels or interval < 0:
            return None
        k = int(np.searchsorted(self.first_interval, interval, side="right")) - 1
        if not 0 <= k < len(self.labels) or self.labels[k] is None:
            return None
        return self.labels[k], interval - int(self.first_interval[k])


def bucketed_size(n: int) -> int:
    """``n`` rounded up to one of 16 sizes per octave (m * 2^e, m in 16..31;
    a power of two up to 16): at most 1/16 more beyond 16, and few distinct
    sizes for the sizes that vary a little from one checkpoint of a model to
    the next."""
    if n <= 16:
        return 0 if n == 0 else 1 << (n - 1).bit_length()
    shift = n.bit_length() - 5
    return -(-n >> shift) << shift


def _padded(parts: list, size) -> np.ndarray:
    """``parts`` (float32 maps) concatenated and zero-padded to ``size(n)``."""
    values = np.concatenate(parts or [np.zeros(0, np.float32)])
    return np.pad(values, (0, size(values.size) - values.size))


FILL_CONCURRENCY = 16
# PlanBuilder's parallel fills have threads of their own: a fill may read a
# large blob in pieces on the readers' shared threads.
_FILL_POOL = threads.SharedPool(lambda: FILL_CONCURRENCY, "jaxjpeg-fill")


# XLA's CPU client places a host array without copying it only when it is
# 64-byte aligned, and numpy aligns to 16: the payload, a plan's largest
# operand, is allocated aligned so restoring on a CPU does not copy it again.
PAYLOAD_ALIGNMENT = 64


def _aligned_concatenation(parts, dtype=np.uint8) -> np.ndarray:
    """``parts`` (arrays or bytes) back to back in an aligned array: the
    operands after the payload (tables, placement offsets) are placed
    without a copy too."""
    parts = [np.frombuffer(p, dtype) if isinstance(p, bytes) else np.asarray(p, dtype)
             for p in parts]
    itemsize = np.dtype(dtype).itemsize
    out = _aligned_empty(itemsize * sum(p.size for p in parts)).view(dtype)
    at = 0
    for part in parts:
        out[at:at + part.size] = part
        at += part.size
    return out


def _aligned_empty(size: int) -> np.ndarray:
    raw = np.empty(size + PAYLOAD_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % PAYLOAD_ALIGNMENT
    return raw[start:start + size]


def _check_tile_geometry(row: list[int], header: list[int]) -> None:
    """The tile's own header must describe the tile the plan expects: a
    mismatch (a hostile or mixed-up file) would decode to wrong weights."""
    width, height, bits, restart_interval = header
    expected = (row[2], row[3], row[1], row[10])
    if (width, height, bits, restart_interval) != expected:
        raise JpegError(f"tile header says {width}x{height}, {bits}-bit, restart interval "
                        f"{restart_interval}; expected {expected[0]}x{expected[1]}, "
                        f"{expected[2]}-bit, restart interval {expected[3]}")


def _copy_into(data: bytes):
    def fill(view):
        view[:] = np.frombuffer(data, np.uint8)
    return fill


def build_plan(tensors: Sequence[EncodedTensor], dtypes: Sequence,
               placed: bool = False, bucketed: bool = False) -> DecodePlan:
    """One plan decoding every tile of every tensor into outputs of ``dtypes``:
    their 2-D views, or with ``placed`` each tensor in its own layout
    (:func:`views.placement`; :func:`views.written_view` says which);
    ``bucketed``: see :meth:`PlanBuilder.finish`."""
    builder = PlanBuilder()
    for enc, dtype in zip(tensors, dtypes):
        check_tiling(enc)
        out = builder.add_output(enc.matrix_shape, dtype, enc.row_scale, enc.row_offset,
                                 enc.col_scale,
                                 views.placement(enc.view, enc.shape) if placed else None)
        for tile in enc.tiles:
            builder.add_tile(out, (tile.row0, tile.col0, tile.height, tile.width), bits=tile.bits,
                             restart_interval=tile.restart_interval,
                             interval_starts=tile.interval_starts, size=len(tile.data),
                             fill=_copy_into(tile.data))
    return builder.finish(bucketed=bucketed)


def check_tiling(enc: EncodedTensor) -> None:
    """ValueError unless ``enc``'s tiles cover its 2-D view exactly once, all
    of one sample depth and restart interval, as a checkpoint records them
    (found by review: a save with a user's encoder wrote files no restore
    reads, and decode_tensor returned uninitialized memory for a gap)."""
    kinds = {(tile.bits, tile.restart_interval) for tile in enc.tiles}
    if len(kinds) > 1 or any(bits != enc.bits for bits, _ in kinds):
        raise ValueError(f"tiles of {len(kinds)} sample depths or restart intervals; a "
                         "tensor's tiles share its bits and one restart interval")
    problem = layout.tiling_problem(
        enc.matrix_shape, [(t.row0, t.col0, t.height, t.width, t.num_intervals)
                           for t in enc.tiles],
        enc.tiles[0].restart_interval if enc.tiles else 0)
    if problem is not None:
        raise ValueError(f"bad tiling of the {enc.matrix_shape} view: {problem}")


def decode_tile(enc: EncodedTensor, tile: Tile, threads: int = 0) -> np.ndarray:
    """One tile of ``enc`` decoded alone, float32 [height, width] of its 2-D
    view (what a whole decode writes there): comparing a coding with its
    tensor tile by tile needs no decoded copy of the whole tensor."""
    builder = PlanBuilder()
    rows = slice(tile.row0, tile.row0 + tile.height)
    out = builder.add_output((tile.height, tile.width), np.float32, enc.row_scale[rows],
                             enc.row_offset[rows], None if enc.col_scale is None
                             else enc.col_scale[tile.col0:tile.col0 + tile.width])
    builder.add_tile(out, (0, 0, tile.height, tile.width), bits=tile.bits,
                     restart_interval=tile.restart_interval, interval_starts=tile.interval_starts,
                     size=len(tile.data), fill=_copy_into(tile.data))
    return run_plan(builder.finish(), threads)[0]


def run_plan(plan: DecodePlan, threads: int = 0) -> list[np.ndarray]:
    """Executes a plan on the host; returns the 2-D outputs."""
    outputs = [np.empty(shape, dtype) for shape, dtype in zip(plan.output_shapes, plan.output_dtypes)]
    types = [output_type(d) for d in plan.output_dtypes]
    _native.run_plan(plan.payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
                     plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in outputs],
                     types, threads, plan.col_scale, plan.positions, whole_outputs=True)
    return outputs


def written_dtype(dtype) -> np.dtype:
    """The dtype the decoder writes for a requested one: float32, bfloat16 and
    float16 directly; anything else (float64, integers) as float32, cast after."""
    dtype = np.dtype(dtype)
    return dtype if dtype in OUTPUT_TYPES else np.dtype(np.float32)


def output_type(dtype) -> int:
    try:
        return OUTPUT_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"decode writes float32, bfloat16 or float16, not {np.dtype(dtype)}") from None


def decode_tensors(tensors: Sequence[EncodedTensor], dtypes=None, threads: int = 0) -> list[np.ndarray]:
    """Decodes tensors in one parallel pass (all restart intervals on all cores)."""
    if dtypes is None:
        dtypes = [np.float32] * len(tensors)
    outputs = run_plan(build_plan(tensors, dtypes, placed=True), threads)
    return [restore_view(o, t.shape, t.view, t.outliers) for o, t in zip(outputs, tensors)]


def restore_view(matrix: np.ndarray, shape, view: MatrixView, outliers: Outliers | None):
    """A whole-tensor decode's output (placed where ``view`` moves data, see
    build_plan) back in the tensor's shape, kept values written back."""
    out = np.ascontiguousarray(views.written_view(view, shape).from_matrix(matrix, shape))
    out = out.reshape(shape)   # a 0-d tensor is coded as one value of a 1-D view
    if outliers is not None and outliers.count:
        outliers.apply(out.reshape(-1))
    return out


def decode_tensor(enc: EncodedTensor, dtype=np.float32, threads: int = 0) -> np.ndarray:
    """Decodes one tensor to ``dtype`` (float32, bfloat16 or float16)."""
    return decode_tensors([enc], [dtype], threads)[0]
