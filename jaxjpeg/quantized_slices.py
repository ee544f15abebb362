"""Leaves quantized per channel, stored as their codes.

Weights quantized to 4 bits per output channel and kept as floats (QAT's
fake-quantized weights, dequantized QDQ exports) take at most 16 values in
each slice along one axis, whole multiples of that slice's own step. The
leaf as a whole takes hundreds of values, so it is not one of the few-value
leaves stored exactly (``jaxjpeg.checkpoint.FEW_VALUES``), and JPEG coded it
lossily: at 8x a third of the codes moved (a (512, 1024) kernel's 34.8%),
where its information is 4 bits a weight.

Here such a leaf is stored as its integer codes, Rice coded as one vector
(:mod:`jaxjpeg.quantized_vectors`, in the leaf's C order), after one float32
step a slice (``stored: "quantized_slices"``, ``slice_axis``): the blob is
the steps, little-endian, then, where a leaf holds -0.0 (``round(w / s) *
s`` gives it), the sign bits of its values coded 0 (``zero_sign_bytes`` of
them, packed most significant bit first, C order), then the codes' blob.
Every value restores bit for bit, in about the codes' entropy (3-4 bits a
value).

2-D leaves quantized in groups (GPTQ, AWQ: each run of 32-256 values of a
row or column on a step of its own) are stored alike with one step a group
(``stored: "quantized_groups"``, ``group_axis``, ``group_size``; float16
steps where they are float16 values, ``step_bytes``: 2). Slices on 8-bit
grids (WIDE_LEVELS) are stored so only where a byte target leaves their
codes the bytes (``jaxjpeg.checkpoint._sliced_fits``); a default save codes
them in about half their codes' bits.

A slice's step is its smallest nonzero magnitude over the code that is (1,
or in a pruned row without a ±1 code the k whose codes lie nearest), and
where the values round from a step no float of their dtype holds (weights
quantized in float32, then cast to half precision; smallest / k an ulp off
a float32 scale) the float32 step within every value's rounding interval
over its code; found by review, each of these was coded lossily, as were
leaves whose three probed slices were dead. Where no float32 step lies
there (weights quantized with float64 scales, numpy's default, then cast to
float32) the float64 middle of that interval, stored as float64 steps
(``stored: "quantized_slices_float64_steps"``).
"""

from __future__ import annotations

import hashlib
import math
import threading

import ml_dtypes
import numpy as np

from jaxjpeg import quantized_vectors

STORED = "quantized_slices"
STORED_GROUPS = "quantized_groups"
# Slices on float64 steps: their values round to the leaf's dtype from
# steps no float32 holds (weights quantized with numpy's float64 scales,
# then cast to float32: every value moved by JPEG before, found by review).
# A `stored` value of its own so that readers before it refuse the file.
STORED_FLOAT64 = "quantized_slices_float64_steps"
STORED_NAMES = (STORED, STORED_GROUPS, STORED_FLOAT64)
LEVELS = 16          # values a slice may take (4 bits)
WIDE_LEVELS = 256    # (8 bits): stored so only where a byte target leaves their bytes
_SMALLEST_CODES = 8  # a pruned row's smallest code tried up to this
MIN_REPEATS = 4      # values a slice holds per level at least (else nothing repeats)
# ... of an 8-bit grid, once a level: an int8 Linear's input channels are
# often fewer than 1,024 (found by review: BERT-base's 768 x 768 never found)
MIN_WIDE_REPEATS = 1
GROUPS = (256, 128, 64, 32)   # group sizes of GPTQ / AWQ exports, the largest (fewest steps) first
MIN_GROUPS = 64      # groups a leaf holds at least
_PROBE_VALUES = 4096  # values of each of three slices looked at first
_BLOCK_VALUES = 1 << 20   # (4 MiB of float32: the passes' temporaries stay small)


def find(array: np.ndarray, levels: int = LEVELS) -> tuple | None:
    """(axis, float32 step of each slice along it) where every slice of a
    float ``array`` along that axis takes at most ``levels`` values, whole
    multiples of the slice's step, restored equal by :func:`restore`; for a
    2-D leaf quantized in groups instead (GPTQ, AWQ: each run of ``group``
    values of a row or column on a step of its own), (axis the groups run
    along, the groups' steps in C order, group); else None. Three slices or
    groups decide first (unless they are one value: dead channels), then
    passes over the leaf a chunk of at most about _BLOCK_VALUES values at a
    time (:func:`_steps_along`)."""
    array = np.asarray(array)
    if array.ndim < 2:
        return None
    key = constant = sparse = None
    spread = {}   # axis: whether its smallest groups spread past any grid (the larger too)
    for axis, group in _candidates(array.shape, levels):
        if group is not None:
            if axis not in spread:
                spread[axis] = _spread_past(_probe(array, axis, GROUPS[-1]), levels)
            if spread[axis]:
                continue
        probe = _probe(array, axis, group)
        dead = np.all(probe == probe.flat[0])
        if not dead and (_spread_past(probe, levels) or _Grid(
                _smallest(probe), array.dtype, levels).fit(probe) is None):
            continue
        if dead and (constant := np.all(array == probe.flat[0]) if constant is None
                     else constant):
            return None   # a constant leaf is JPEG's (its blocks DC alone)
        if group is not None and (sparse := np.count_nonzero(array) < array.size / 4
                                  if sparse is None else sparse):
            continue   # (review: groups of one nonzero value each fit a grid, 3x larger)
        if key is None:   # a leaf a probe passes: found once per content a thread
            key = _content_key(array, levels)
            if key is not None and getattr(_last, "key", None) == key:
                return _last.found
        rows, along = (array, axis) if group is None else (_grouped(array, axis, group), 0)
        steps = _steps_along(rows, along, levels, every_slice_alike_refused=dead)
        if steps is not None:
            found = (axis, steps) if group is None else (axis, steps, group)
            return _remembered(key, found, array, levels)
    return _remembered(key, None, array, levels)


def _spread_past(probe: np.ndarray, levels: int, smallest: np.ndarray | None = None) -> bool:
    """Whether some row of ``probe`` spans ``levels`` or more of its smallest
    magnitude (``smallest``, where known): on no grid (any finer step spans
    more), told at once."""
    smallest = _smallest(probe) if smallest is None else smallest
    with np.errstate(all="ignore"):
        span = (probe.max(axis=1) - probe.min(axis=1)) / np.where(np.isfinite(smallest),
                                                                   smallest, 1)
    return bool(np.any(~(span < levels - 0.5)))


def _candidates(shape, levels: int):
    """(axis, None) of each axis whose slices are long enough to repeat
    their levels, then, for 4-bit grids, (axis, group) of each group size
    along each axis of a 2-D leaf (its columns' runs first: PyTorch's (O, I))."""
    repeats = MIN_REPEATS if levels <= LEVELS else MIN_WIDE_REPEATS
    for axis, n in enumerate(shape):
        if n >= 2 and math.prod(shape) // n >= repeats * levels:
            yield axis, None
    if len(shape) == 2 and levels <= LEVELS:
        for axis in (1, 0):
            for group in GROUPS:
                if (shape[axis] % group == 0 and shape[axis] > group
                        and math.prod(shape) // group >= MIN_GROUPS):
                    yield axis, group


def _probe(array: np.ndarray, axis: int, group: int | None) -> np.ndarray:
    """Three slices' first values (or three whole groups), as rows."""
    if group is None:
        slices = np.moveaxis(array, axis, 0)
        n = slices.shape[0]
        return np.stack([_head(slices[i], _PROBE_VALUES) for i in (0, n // 2, n - 1)])
    runs = _runs(array, axis, group)
    n = array.size // group
    return np.stack([runs[np.unravel_index(i, runs.shape[:-1])] for i in (0, n // 2, n - 1)])


def _split(shape, axis: int, group: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` split into (runs, group)."""
    return (*shape[:axis], shape[axis] // group, group, *shape[axis + 1:])


def _runs(array: np.ndarray, axis: int, group: int) -> np.ndarray:
    """``array`` with ``axis`` split in (runs, group), the group's values last."""
    return np.moveaxis(array.reshape(_split(array.shape, axis, group)), axis + 1, -1)


def _grouped(array: np.ndarray, axis: int, group: int) -> np.ndarray:
    """The groups of ``group`` values along ``axis`` as rows, in the C order
    of the leaf with that axis divided by ``group`` (a copy unless they are
    runs of its last axis)."""
    return np.ascontiguousarray(_runs(array, axis, group)).reshape(-1, group)


# The last leaf find() read past its probe in this thread, by its content:
# a save asks of one leaf up to 7 times (whether it is kept raw, its blob,
# its bytes, whether it fits a byte target's share), each a pass or more
# over it (a 32 MB bfloat16 leaf: 0.9 s).
_last = threading.local()


def _content_key(array: np.ndarray, levels: int) -> tuple | None:
    """Shape, dtype and a digest of a C-contiguous ``array``'s bytes (None
    for other layouts): equal only for equal contents, however the array
    changed in between."""
    if not array.flags.c_contiguous:
        return None
    digest = hashlib.blake2b(array.reshape(-1).view(np.uint8), digest_size=16).digest()
    return array.shape, array.dtype.str, digest, levels


def _remembered(key, found, array, levels: int):
    """``found``, remembered for ``key`` where the leaf's content is still
    that (review: changed in place during the search, it was remembered for
    the content it had before)."""
    if key is not None and _content_key(array, levels) == key:
        _last.key, _last.found = key, found
    return found


def _steps_along(array: np.ndarray, axis: int, levels: int, every_slice_alike_refused: bool):
    """The slices' steps along ``axis`` (:func:`find`), or None: their
    smallest magnitudes first, then each chunk's codes on them, the steps of
    the slices that miss refined (:class:`_Grid`), and the chunks read again
    where a step changed."""
    n = array.shape[axis]
    smallest = np.full(n, np.inf, np.float32)
    for chunk in _chunks(array, axis):
        # rows spanning ``levels`` of their part's smallest span more of their own
        part = _smallest(chunk)
        if not np.all(np.isfinite(chunk)) or _spread_past(chunk, levels, part):
            return None
        smallest = np.minimum(smallest, part)
    grid = _Grid(smallest, array.dtype, levels)
    for _ in range(_PASSES):
        grid.start()
        span = [np.full(n, np.inf), np.full(n, -np.inf)]
        for chunk in _chunks(array, axis):
            codes = grid.fit(chunk)
            if codes is None:
                return None
            span = [np.minimum(span[0], codes.min(axis=1)), np.maximum(span[1], codes.max(axis=1))]
        if not grid.finish():
            return None
        if grid.changed:   # read again on the steps it refined
            continue
        if np.any(span[1] - span[0] >= levels):
            return None
        # a constant leaf is JPEG's (its blocks DC alone: a bit a value here)
        if every_slice_alike_refused and np.all(span[0] == span[1]) and np.ptp(
                span[0] * grid.steps) == 0:
            return None
        return grid.found_steps()
    return None


_PASSES = 5   # over the chunks at most: a pruned row's k, its bounds kept, its step, the check


class _Grid:
    """Each row's step: its smallest nonzero magnitude, over the code its
    smallest magnitude is (1, but 2, 3, ... in a pruned row: the k whose
    codes lie nearest their values), and where its values round from a
    step that is no float of their own dtype (a leaf quantized in float32,
    then cast to half precision; smallest / k one float32 ulp off the scale)
    the float32 step every value's rounding interval over its code allows:
    their intersection over the leaf holds the scale. Intervals are kept
    for every row of a half-precision leaf, for a float32 one's rows that
    needed them (``watched``: a pass more)."""

    def __init__(self, smallest: np.ndarray, dtype, levels: int = LEVELS):
        self.smallest, self.levels = smallest, levels
        self.steps = np.where(np.isfinite(smallest), smallest, np.float32(1.0)).astype(np.float32)
        # a row's float64 step where no float32 one lies within its bounds (NaN: none)
        self.fine = np.full(len(smallest), np.nan)
        self.dtype = np.dtype(dtype)
        self.watched = np.full(len(smallest), self.dtype.itemsize < 4)
        self.start()

    def start(self) -> None:
        """A pass over the leaf begins: no row refined yet."""
        n = len(self.steps)
        self.bounds = [np.zeros(n), np.full(n, np.inf)]
        self.inexact = np.zeros(n, bool)   # rows whose values round from another step
        self.rekeyed = np.zeros(n, bool)   # rows whose smallest code moved this pass
        self.changed = False

    def fit(self, rows: np.ndarray) -> np.ndarray | None:
        """The codes of ``rows`` (every slice, some of its values) on the
        steps, a pruned row's step refined first; None where some row is on
        no grid."""
        x = rows.astype(np.float32)
        codes, miss = _codes(x, self.steps, self.dtype, self.levels, self.fine)
        if miss.any():
            with np.errstate(invalid="ignore"):   # a finer step only widens the codes
                if np.any(np.ptp(codes[miss], axis=1) >= self.levels):
                    return None
            off = miss.copy()
            off[miss] = ~_near(x[miss], codes[miss], self.steps[miss], self.levels)
            if off.any():
                steps = self._rekeyed(x[off], self.smallest[off])
                if steps is None:
                    return None
                self.steps[off], self.rekeyed[off] = steps, True
                self.fine[off] = np.nan
                codes, miss = _codes(x, self.steps, self.dtype, self.levels, self.fine)
            if miss.any() and not np.all(_near(x[miss], codes[miss], self.steps[miss],
                                               self.levels)):
                return None
            self.inexact |= miss
        if self.watched.any():
            self._bound(x, codes, self.watched)
        return codes

    def finish(self) -> bool:
        """The pass ends: rows off their steps whose bounds were kept take
        their middle (False where those leave no step); the others' are kept
        from the next pass on."""
        rows = self.inexact & ~self.rekeyed   # (a rekeyed row's bounds mix two codings)
        bounded = rows & self.watched
        low, high = self.bounds[0][bounded], self.bounds[1][bounded]
        if not np.all(low <= high):   # (equal: the scale itself, at two values' ties)
            return False
        middle = (low + high) / 2
        single = middle.astype(np.float32)
        # Where the float32 middle is the step the row missed on, its values
        # round from a step no float32 holds: the float64 middle (numpy's
        # float64 scales, then a cast to float32: found by review).
        stuck = single == self.steps[bounded]
        if np.any(stuck & (middle == self.fine[bounded])):   # off its grid on the step its
            return False   # bounds give (found by review: every pass again, 3.6 s for None)
        self.steps[bounded] = single
        self.fine[bounded] = np.where(stuck, middle, np.nan)
        self.watched |= rows | self.rekeyed
        self.changed = bool(self.inexact.any() or self.rekeyed.any())
        return True

    def found_steps(self) -> np.ndarray:
        """The rows' steps: float32, or float64 where some row needs one."""
        wide = ~np.isnan(self.fine)
        return np.where(wide, self.fine, self.steps) if wide.any() else self.steps

    def _rekeyed(self, x: np.ndarray, smallest: np.ndarray) -> np.ndarray | None:
        """Per row of ``x``, its smallest magnitude over the code k (1 to
        _SMALLEST_CODES) whose codes lie nearest its values (the smaller k
        of two as near), or None where a row is near no grid (found by
        review: the first k within _NEAR took 7 for 8, and a row at a time
        took seconds)."""
        best = np.full(len(x), np.nan, np.float32)
        nearest = np.full(len(x), np.inf)
        magnitude = np.where(x != 0, np.abs(x), np.inf)
        for k in range(1, _SMALLEST_CODES + 1):
            step = (smallest / np.float32(k)).astype(np.float32)
            with np.errstate(all="ignore"):
                codes = np.rint(x / step[:, None])
                off = np.max(np.abs(x - codes * step[:, None]) / magnitude, axis=1)
            better = (np.ptp(codes, axis=1) < self.levels) & (off <= _NEAR) & (off < nearest)
            best[better], nearest[better] = step[better], off[better]
        return None if np.isnan(best).any() else best

    def _bound(self, x: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> None:
        """Narrows ``rows``' step bounds by the rounding intervals of their
        values in ``x`` (``dtype`` values as float32) over their codes."""
        value = np.abs(x[rows])
        down, up = (v.astype(np.float64) for v in _neighbours(value, self.dtype))
        value = value.astype(np.float64)   # (float32 sums of neighbours round)
        count = 2 * np.abs(codes[rows]).astype(np.float64)
        with np.errstate(all="ignore"):   # code 0: no bound (inf below it, 0 above)
            low = np.max((value + down) / np.where(count > 0, count, np.inf), axis=1)
            high = np.min((value + up) / count, axis=1)
        self.bounds[0][rows] = np.maximum(self.bounds[0][rows], low)
        self.bounds[1][rows] = np.minimum(self.bounds[1][rows], high)


def _neighbours(value: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The ``dtype`` values next below and above positive ``value`` (float32
    holding ``dtype`` values), as float32; float32's and bfloat16's by their
    bits (bfloat16's nextafter is several times slower)."""
    if dtype == np.dtype(ml_dtypes.bfloat16) or dtype == np.float32:
        bits = value.view(np.uint32)
        unit = np.uint32(1 << 16 if dtype != np.float32 else 1)
        return (np.maximum(bits, unit) - unit).view(np.float32), (bits + unit).view(np.float32)
    half = value.astype(dtype)
    with np.errstate(over="ignore"):   # above float16's largest: inf (review: warned)
        return (np.nextafter(half, np.array(0, dtype)).astype(np.float32),
                np.nextafter(half, np.array(np.inf, dtype)).astype(np.float32))


_NEAR = 1 / 64   # a value off its code's multiple by more than this share of itself is off


def _near(x: np.ndarray, codes: np.ndarray, steps: np.ndarray, levels: int) -> np.ndarray:
    """Per row of ``x``, whether every value is within _NEAR of its code
    times its row's step, the codes spanning fewer than ``levels``."""
    with np.errstate(all="ignore"):
        off = np.abs(x - codes * steps.astype(np.float32)[:, None]) <= _NEAR * np.abs(x)
        return np.all(off, axis=1) & (np.ptp(codes, axis=1) < levels)


def _codes(x: np.ndarray, steps: np.ndarray, dtype, levels: int,
           fine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes of float32 rows ``x`` on ``steps``, the rows whose values are
    not their codes times their steps rounded to ``dtype`` (-0.0 as 0.0), or
    whose codes span ``levels`` or more); the rows ``fine`` gives a float64
    step (not NaN) on it, as :func:`restore` computes those."""
    steps = steps.astype(np.float32)[:, None]
    with np.errstate(all="ignore"):   # subnormal steps: huge codes, refused
        codes = np.rint(x / steps)
        restored = (codes * steps).astype(dtype).astype(np.float32)
    wide = None if fine is None else ~np.isnan(fine)
    if wide is not None and wide.any():
        step = fine[wide][:, None]
        with np.errstate(all="ignore"):
            codes[wide] = np.rint(x[wide] / step)
            restored[wide] = _values(codes[wide], step).astype(dtype).astype(np.float32)
    miss = (~np.all(np.isfinite(codes), axis=1) | (np.ptp(codes, axis=1) >= levels)
            | ~np.all(restored == x, axis=1))
    return codes, miss


def _values(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Codes times their steps as :func:`restore` computes them: in float32
    on float32 steps, in float64 then rounded to float32 on float64 ones."""
    if scale.dtype == np.float64:
        return (codes.astype(np.float64) * scale).astype(np.float32)
    return codes * scale


def _head(x: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` values of ``x`` in C order, copying about those only."""
    if x.ndim <= 1:
        return x.reshape(-1)[:count]
    rows = -(-count // max(1, x[0].size))
    return x[:rows].reshape(-1)[:count] if rows > 1 else _head(x[0], count)


def _chunks(array: np.ndarray, axis: int):
    """``array`` in float32 chunks along its longest other axis, each as
    (its slices along ``axis``, their values in the chunk)."""
    along = max((a for a in range(array.ndim) if a != axis), key=lambda a: array.shape[a])
    length = max(1, _BLOCK_VALUES * array.shape[along] // max(1, array.size))
    for start in range(0, array.shape[along], length):
        part = np.take(array, np.arange(start, min(start + length, array.shape[along])), along)
        yield np.moveaxis(part, axis, 0).reshape(array.shape[axis], -1).astype(np.float32)


def _smallest(rows: np.ndarray) -> np.ndarray:
    """Each row's smallest nonzero magnitude (inf where it holds none)."""
    magnitude = np.abs(rows.astype(np.float32))
    return np.min(magnitude, axis=1, where=magnitude > 0, initial=np.inf)


def encode(array: np.ndarray, axis: int, steps: np.ndarray,
           group: int | None = None) -> tuple[bytes, dict] | None:
    """(blob, record fields) of ``array`` on its slices' (or groups')
    ``steps`` (:func:`find`), or None where the codes cannot be coded."""
    x = np.asarray(array, np.float32)
    shape = tuple(array.shape)
    split = _split(shape, axis, group) if group else shape
    wide = np.asarray(steps).dtype == np.float64
    scale = _broadcast(np.asarray(steps, np.float64 if wide else np.float32), shape, axis, group)
    codes = _rounded_codes(x.reshape(split), scale)
    if not _restores(x.reshape(split), codes, scale, array.dtype):
        return None
    codes = codes.reshape(shape)
    coded = quantized_vectors.encode(codes, quantized_vectors.VectorStep(1.0))
    if coded is None:
        return None
    blob, record = coded
    record = ({**record, "stored": STORED_FLOAT64 if wide else STORED, "slice_axis": axis}
              if not group else
              {**record, "stored": STORED_GROUPS, "group_axis": axis, "group_size": group})
    signs = np.signbit(x[codes == 0])
    plane = np.packbits(signs).tobytes() if signs.any() else b""
    if plane:
        record["zero_sign_bytes"] = len(plane)
    stored_steps = np.asarray(steps, "<f8" if wide else "<f4")
    if wide and group:   # (older readers refuse 8-byte steps)
        record["step_bytes"] = 8
    with np.errstate(over="ignore"):
        half = stored_steps.astype("<f2")
    if (group and not wide and np.all(half.astype(np.float32) == stored_steps)
            and np.all(half > 0)):
        # GPTQ / AWQ scales are float16: a step in 2 bytes (2-16 values' codes share one)
        stored_steps, record["step_bytes"] = half, 2
    return stored_steps.tobytes() + plane + bytes(blob), record


def _rounded_codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """rint(x / scale) as float32, one leaf-sized copy (float64 steps: the
    division in float64, a block at a time)."""
    if scale.dtype != np.float64:
        codes = x / scale
        return np.rint(codes, out=codes)
    codes = np.empty(x.shape, np.float32)
    for rows, part in _row_blocks(x, scale):
        codes[rows] = np.rint(x[rows] / part)
    return codes


def _row_blocks(x: np.ndarray, scale: np.ndarray):
    """(slice of ``x``'s first axis, ``scale`` for it) over blocks of about
    _BLOCK_VALUES values (``scale`` broadcast against ``x``)."""
    block = max(1, _BLOCK_VALUES // max(1, x[0].size))
    for i in range(0, x.shape[0], block):
        yield slice(i, i + block), (scale[i:i + block] if scale.shape[0] > 1 else scale)


def check_record(record: dict, shape: tuple[int, ...], where: str) -> dict:
    """A leaf record's fields for :func:`restore` (the codes' fields of
    :func:`jaxjpeg.quantized_vectors.check_record`, ``slice_axis``: the axis
    the steps run along, or the groups', and ``group_size``: 0 for slices),
    or ValueError naming the bad one."""
    grouped = record.get("stored") == STORED_GROUPS
    axis = record.get("group_axis" if grouped else "slice_axis")
    if type(axis) is not int or not 0 <= axis < len(shape) or len(shape) != 2 and (
            grouped or len(shape) < 2):
        raise ValueError(f"{where}: bad {'group' if grouped else 'slice'} axis "
                         f"{axis!r:.40} for shape {shape}")
    group = record.get("group_size") if grouped else 0
    if grouped and (type(group) is not int or group < 2 or shape[axis] % group):
        raise ValueError(f"{where}: bad group size {group!r:.40} for axis {axis} of shape "
                         f"{shape}")
    if record.get("domain") != quantized_vectors.LINEAR:
        raise ValueError(f"{where}: per-slice codes on {record.get('domain')!r:.40} steps")
    if record.get("step") != 1.0:   # the slices' steps scale the codes (found by review:
        # a step of 2 doubled every value, silently)
        raise ValueError(f"{where}: per-slice codes on a step of {record.get('step')!r:.40}, "
                         "not 1")
    signs = record.get("zero_sign_bytes", 0)
    if type(signs) is not int or signs < 0:
        raise ValueError(f"{where}: bad zero sign size {signs!r:.40}")
    step_bytes = (record.get("step_bytes", 4) if grouped
                  else 8 if record.get("stored") == STORED_FLOAT64 else 4)
    if type(step_bytes) is not int or step_bytes not in (2, 4, 8):
        raise ValueError(f"{where}: bad step size {step_bytes!r:.40} (2, 4 or 8 bytes)")
    return {**quantized_vectors.check_record(record, where), "slice_axis": axis,
            "group_size": group, "zero_sign_bytes": signs, "step_bytes": step_bytes}


def restore(blob, shape: tuple[int, ...], fields: dict) -> np.ndarray:
    """The float32 values of a blob :func:`encode` wrote, from the leaf's
    checked record ``fields`` (:func:`check_record`); ValueError where the
    blob is not such a leaf's."""
    axis, group, sign_bytes = fields["slice_axis"], fields["group_size"], fields["zero_sign_bytes"]
    data = np.frombuffer(blob, np.uint8)
    count = math.prod(shape) // group if group else shape[axis]
    head = fields["step_bytes"] * count
    if data.size < head + sign_bytes:
        raise ValueError(f"holds {data.size} bytes, fewer than its {count} "
                         f"{'group' if group else 'slice'} steps"
                         + (f" and {sign_bytes} bytes of zero signs" if sign_bytes else ""))
    steps = data[:head].view(f"<f{fields['step_bytes']}")
    steps = steps.astype(np.float64 if fields["step_bytes"] == 8 else np.float32)
    if not np.all(np.isfinite(steps) & (steps > 0)):
        raise ValueError("holds a slice step that is not finite and positive")
    codes = quantized_vectors.decoded_values(data[head + sign_bytes:], math.prod(shape), fields)
    with np.errstate(over="ignore"):
        values = _values(codes.reshape(_split(shape, axis, group)) if group
                         else codes.reshape(shape),
                         _broadcast(steps, shape, axis, group)).reshape(shape)
    codes = codes.reshape(shape)
    if not np.all(np.isfinite(values)):
        raise ValueError("restores values beyond float32's range")
    if sign_bytes:
        zeros = codes == 0
        count = int(np.count_nonzero(zeros))
        if sign_bytes != -(-count // 8):
            raise ValueError(f"holds {sign_bytes} bytes of signs for {count} zero codes")
        signs = np.unpackbits(data[head:head + sign_bytes])
        if signs[count:].any():
            raise ValueError("holds zero sign padding bits set")
        values[zeros] = np.where(signs[:count].astype(bool), np.float32(-0.0), np.float32(0.0))
    return values


def _restores(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, dtype) -> bool:
    """Whether ``codes`` times ``scale`` (broadcast) give ``x`` back in
    ``dtype`` (-0.0 as 0.0: its sign is stored apart), a block of the first
    axis at a time: steps come from a search over the leaf as it was read,
    which a change in place during it could have moved (found by review)."""
    for rows, part in _row_blocks(x, scale):
        with np.errstate(over="ignore"):
            back = _values(codes[rows], part).astype(dtype).astype(np.float32)
        if not np.array_equal(back, x[rows]):
            return False
    return True


def _broadcast(steps: np.ndarray, shape, axis: int, group: int | None) -> np.ndarray:
    """``steps`` shaped to scale the codes: along ``axis`` (slices), or
    against the leaf with ``axis`` split in (runs, group) (groups)."""
    if not group:
        return steps.reshape(tuple(n if a == axis else 1 for a, n in enumerate(shape)))
    runs = list(_split(shape, axis, group))
    runs[axis + 1] = 1
    return steps.reshape(runs)
