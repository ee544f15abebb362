"""Small float vectors quantized on uniform steps and Rice coded.

Under a byte target the leaves the policy keeps out of JPEG are stored as
float16 (8 significand bits, deflated: about 12.5 bits a value). A
BatchNorm's vectors need less: what they do is ``γ (x - μ) / σ + β`` with
``x ≈ μ ± σ``, so each one's error matters in units of the layer's output,
not of its own values (:func:`jaxjpeg.priors.batchnorm_vector_steps` picks
the steps). Here a vector is coded on the step it is given, ``linear``
(``value ≈ code * step``), ``log2`` (``value ≈ 2 ** (code * step) -
offset``, values >= 0: a relative error of ``value + offset``) or
``signed_log2`` (``log2`` of the magnitudes, and a sign bit a value), its
codes less their median, zigzagged and Rice coded. Rice codes need no table,
which a vector of 32 values cannot afford: EfficientNet-lite's BatchNorm
values take 9.5-9.8 bits each (float16: 12.5). Kernels too small for JPEG
are coded the same way, flattened in C order, on 2^-8 of their RMS
(``jaxjpeg.checkpoint.SMALL_KERNEL_STEP``).

The blob is the codes' unary parts (``q`` ones then a zero each, padded
with ones to a byte), then their ``k``-bit remainders (most significant
bit first, padded with zeros), then, in ``signed_log2``, one bit a value (1:
negative, padded with zeros): all code and decode a chunk of values at a
time, and every count is checked against the blob's size before it is used.
Values kept aside (record field ``outliers``: a thin leaf's NaN or far
values) follow: their positions (little-endian uint32, uint64 past 2^32
values), then their float32 values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import ml_dtypes
import numpy as np

from jaxjpeg import _native
from jaxjpeg.format import BlobParts, contiguous, inflate_at_most

LINEAR, LOG2, SIGNED_LOG2 = "linear", "log2", "signed_log2"
DOMAINS = (LINEAR, LOG2, SIGNED_LOG2)
LOG_DOMAINS = (LOG2, SIGNED_LOG2)
MAX_RICE = 40           # remainder bits at most
MAX_QUOTIENT = 1 << 20  # a decoded unary part longer than this is refused
MAX_CODE = 1 << 52      # |code| and |center| (exact in float64)
# A linear vector with at least this share of exact zeros (a pruned kernel)
# stores where its nonzero values are, a deflated bitmap, and codes only
# them: a 90%-sparse 512 x 512 kernel took 3.9 bits a weight as JPEG (its
# zeros restored as noise); see encode.
SPARSE_ZEROS = 0.5
SPARSE_MIN_SIZE = 256   # below, the bitmap's zlib header costs about what it saves
_MASK_LEVEL = 6   # zlib's level for the bitmap (jaxjpeg.layout.DEFLATE_LEVEL)


@dataclasses.dataclass(frozen=True)
class VectorStep:
    """The step a vector is quantized on, and in which domain."""

    step: float
    domain: str = LINEAR
    offset: float = 0.0   # log2: the domain is log2(value + offset), values >= 0;
                          # signed_log2: log2(|value| + offset)

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, not {self.domain!r}")
        if not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step must be finite and positive, not {self.step!r}")
        if not (math.isfinite(self.offset) and self.offset >= 0):
            raise ValueError(f"offset must be finite and not negative, not {self.offset!r}")


@dataclasses.dataclass(frozen=True)
class StepLimits:
    """The coarsest step each value of a vector may be quantized on
    (``limits``, broadcastable to it), and the domain."""

    limits: np.ndarray
    domain: str = LINEAR
    offset: float = 0.0

    def step_for(self, values: np.ndarray) -> VectorStep | None:
        """The coarsest uniform step within every value's limit, or None.
        In the linear domain a value within half its limit of zero meets it
        on any step (it rounds to zero, or within half a finer step), so it
        does not bind."""
        limits = np.broadcast_to(np.asarray(self.limits, np.float64), np.shape(values))
        binding = limits
        if self.domain == LINEAR:
            binding = limits[np.abs(np.asarray(values, np.float64)) > limits / 2]
        step = float(np.min(binding)) if binding.size else float(np.max(limits, initial=0.0))
        if not (math.isfinite(step) and step > 0):
            return None
        return VectorStep(step, self.domain, self.offset)


# Codes a step: encode and decode hold a chunk's temporaries, not a leaf's
# (a 64 MB leaf took 1.9 GB to code whole). A multiple of 8, so a chunk's
# signs and k-bit remainders end on a byte. At 2^18 the temporaries of two
# chunks a thread (float64 values, int64 codes) were 14 MiB of a 1 GB
# tree's peak at target_ratio=3.
_CHUNK = 1 << 16
# A Ladder's chunks: all held at once, counted at each of its steps.
_LADDER_CHUNK = 1 << 18
_SAMPLE = 1 << 16   # codes a large leaf's center and Rice parameter come from
_DECODE_CHUNK = 1 << 16   # codes a decoding step holds


def _transformed(values: np.ndarray, how: VectorStep) -> tuple | None:
    """What codes of ``values`` take before a step: (float64 values, their
    log2 plus ``how``'s offset in log2 domains; negative mask or None; zero
    flags as uint8, what the native count reads, or None), or None when
    they cannot be coded (a value not finite; in log2 domains a negative
    one, or a zero without an offset)."""
    x = np.array(values, np.float64)   # a copy: worked on in place
    if not np.all(np.isfinite(x)):
        return None
    negative = zero = None
    if how.domain == SIGNED_LOG2:
        negative = x < 0
        np.abs(x, out=x)
    if how.domain in LOG_DOMAINS:
        # x + offset > 0 at every value: x >= 0, and no zero without an offset
        if x.size and (x.min() < 0 or (how.offset <= 0 and x.min() == 0)):
            return None
        zero = (x == 0).view(np.uint8) if how.offset > 0 else None
        np.add(x, how.offset, out=x)
        np.log2(x, out=x)
    return x, negative, zero


def is_sparse(values: np.ndarray, how: VectorStep | None = None) -> bool:
    """Whether ``values`` are coded with a bitmap of their nonzeros (linear
    steps, SPARSE_ZEROS of them exactly zero)."""
    flat = np.asarray(values).reshape(-1)
    return ((how is None or how.domain == LINEAR) and flat.size >= SPARSE_MIN_SIZE
            and flat.size - count_nonzero(flat) >= SPARSE_ZEROS * flat.size)


def count_nonzero(values: np.ndarray) -> int:
    """``np.count_nonzero(values)``, 3x faster on floats: numpy counts a
    bool array's ones faster than it tests floats one by one (-0.0 and NaN
    alike: equal to 0 and not); a chunk's bools at a time, not a leaf's (a
    quarter of a float32 leaf, 2 MiB of a 1 GB tree's peak at 8x)."""
    flat = np.asarray(values).reshape(-1)
    return sum(int(np.count_nonzero(flat[start:start + _CHUNK] != 0))
               for start in range(0, flat.size, _CHUNK))


class Counted:
    """A blob counted, not packed: its size (``len``) as :func:`encode`
    would pack it, for callers that only measure (a byte target's ladder
    of log2 steps: packing was half its coding). No bytes: anything that
    reads it as a blob fails."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes


def encode(values: np.ndarray, how: VectorStep, kept=None,
           counted: bool = False) -> tuple[BlobParts, dict] | None:
    """(blob, record fields) of a float32 vector quantized as ``how`` says,
    or None when it cannot be (a non-finite value, a negative value in the
    log2 domain, a zero without an offset, codes out of range, more than
    float16's 16 bits a value before signs) or restores non-finite. A chunk
    at a time: the codes' median and Rice parameter come from a sample of a
    large vector (all of a small one); a value the sample missed that needs
    a wider Rice parameter has the vector coded again with it. A sparse
    vector (:func:`is_sparse`) stores its bitmap, then its nonzero values
    so coded (record fields ``nonzeros`` and ``mask_bytes``): its zeros
    restore exactly, at about the bitmap's entropy. Values beyond 1e30
    (views.extreme_limit) take their step like the rest: on log2 steps
    within its relative bound (a BatchNorm variance's 1e38 came back
    1.00077e38); kept exactly instead, a moment of 200,000 values holding
    one 1e31 went raw and a byte target of 8x was refused (both found by
    review). A side list for stepped leaves would keep them: not built.

    ``kept`` (optional, sorted distinct flat positions; linear steps only):
    values kept aside exactly, whatever they are (a thin leaf's NaN,
    infinities, or values too far for one step: found by review, one NaN in
    a 300,000-value vector sent it to JPEG, the rest restored at relative
    error 0.70 at 8x where its thin coding gave 0.08). They are coded as a
    filler value, and follow the codes (:func:`kept_bytes`); record field
    ``outliers``: how many.

    ``counted``: the blob of a dense vector is a :class:`Counted`, its
    size, every check made as for the bytes."""
    if kept is not None and len(kept):
        return _encode_with_kept(values, how, np.asarray(kept, np.int64))
    if is_sparse(values, how):
        return _encode_sparse(np.asarray(values).reshape(-1), how)
    return _encode_dense(values, how, counted)


def kept_bytes(count: int, size: int) -> int:
    """The bytes ``count`` values kept aside take in a vector of ``size``:
    their positions (4 bytes each, 8 past 2^32 values), then their float32
    values (each of a float32, bfloat16 or float16 leaf exactly)."""
    return count * (_kept_index_dtype(size).itemsize + 4)


def narrowed(values: np.ndarray, dtype) -> np.ndarray | None:
    """float32 ``values`` kept aside as ``dtype`` (float32, bfloat16 or
    float16) bit for bit, NaN payloads too, or None where a value is not one
    of ``dtype``'s: bfloat16 as the top half of float32's bits (found by
    review: ml_dtypes' cast made every NaN the default one)."""
    dtype = np.dtype(dtype)
    wide = np.asarray(values, "<f4")
    if dtype == np.float32:
        return wide.astype(np.float32)
    if dtype.itemsize == 2 and dtype.name == "bfloat16":
        bits = wide.view(np.uint32)
        held = (bits >> 16).astype(np.uint16).view(dtype)
        return held if np.all(bits & 0xFFFF == 0) else None
    with np.errstate(invalid="ignore", over="ignore"):
        held = wide.astype(dtype)
    back = held.astype(np.float32)
    return held if np.array_equal(back.view(np.uint32), wide.view(np.uint32)) else None


def _kept_index_dtype(size: int) -> np.dtype:
    return np.dtype("<u4") if size <= 2**32 else np.dtype("<u8")


def _encode_with_kept(values: np.ndarray, how: VectorStep, kept: np.ndarray):
    """:func:`encode` of ``values`` with the values at ``kept`` aside: coded
    as 0 where the rest is sparse with them so (they join its zeros), else
    as the median of a sample of the rest (a code near the others')."""
    flat = np.asarray(values).reshape(-1)
    if (how.domain != LINEAR or kept.size * 8 > flat.size or kept[0] < 0
            or kept[-1] >= flat.size or np.any(np.diff(kept) <= 0)):
        return None
    filled = flat.copy()
    filled[kept] = 0
    if not is_sparse(filled, how):
        rest = np.ones(flat.size, bool)
        rest[kept] = False
        filled[kept] = np.median(sampled(flat[rest]))
    coded = encode(filled, how)
    if coded is None:
        return None
    blob, record = coded
    side = (kept.astype(_kept_index_dtype(flat.size)).tobytes()
            + flat[kept].astype("<f4").tobytes())
    return blob + side, {**record, "outliers": int(kept.size)}


def restores_finite(array: np.ndarray, blob, record: dict) -> bool:
    """Whether the quantized ``array`` (blob, record fields) restores every
    finite value finite in ``array``'s own dtype: a step past float16's
    largest rounds to inf there (review: 65504 in a float16 kernel came
    back inf); float32 always does (the decoder refuses codings past it).
    Decoded only where a value may restore within 2x of the dtype's largest
    (decoding every bfloat16 thin leaf to check was a fifth of a 3x save)."""
    if array.dtype == np.float32 or _far_below_largest(array, record):
        return True
    return restored_in_dtype(array, blob, record) is not None


def _far_below_largest(array: np.ndarray, record: dict) -> bool:
    """Whether every finite value of ``array`` restores below half its
    dtype's largest: its largest magnitude moved at most half a step (linear
    steps) or 2^(step / 2) times, past its offset (log2 steps), as restore
    does (rounding to float32 and the dtype is within that margin)."""
    step, domain, offset = record.get("step"), record.get("domain"), record.get("offset", 0.0)
    if not (isinstance(step, float) and domain in DOMAINS and isinstance(offset, (int, float))):
        return False
    try:
        top = float(ml_dtypes.finfo(array.dtype).max)
    except (TypeError, ValueError):   # not a float dtype
        return False
    largest, flat = 0.0, array.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        part = np.abs(flat[start:start + _CHUNK].astype(np.float32))
        largest = max(largest, float(np.max(part, where=np.isfinite(part), initial=0.0)))
    reach = (largest + step if domain == LINEAR
             else (largest + offset) * 2.0 ** (step / 2))
    return reach < top / 2


def restored_in_dtype(array: np.ndarray, blob, record: dict) -> np.ndarray | None:
    """:func:`restored_values`, or None where a finite value would not stay finite."""
    restored = restored_values(array, blob, record)
    if not np.all(np.isfinite(restored) | ~np.isfinite(array.reshape(-1))):
        return None
    return restored


def restored_values(array: np.ndarray, blob, record: dict) -> np.ndarray:
    """The quantized ``array``'s values (blob, record fields), flat, as
    restored in its own dtype (through float32)."""
    restored = decoded_values(blob, array.size, check_record(record, "quantized leaf"))
    with np.errstate(over="ignore"):
        return restored.reshape(-1).astype(array.dtype, copy=False)


def nonzero_mask(flat: np.ndarray) -> bytes:
    """The deflated bitmap of ``flat``'s nonzero values (bit i, most
    significant first, set where value i is nonzero)."""
    return zlib.compress(np.packbits(flat != 0).tobytes(), _MASK_LEVEL)


def _chunk_codes(values: np.ndarray, step: float) -> np.ndarray | None:
    """int64 codes of a chunk on a linear ``step``; None when a value is not
    finite or its code out of range."""
    codes = np.round(values.astype(np.float64) / step)
    if not np.all(np.isfinite(codes)) or (codes.size and np.max(np.abs(codes)) >= MAX_CODE):
        return None
    return codes.astype(np.int64)


def _sparse_bitmap(flat: np.ndarray, step: float) -> tuple[bytes, int, int] | None:
    """(deflated bitmap of ``flat``'s nonzero codes on ``step``, how many,
    their smallest magnitude), a chunk at a time; None when a value cannot
    be coded. A value that rounds to 0 is left out like a zero (it restores
    as 0 either way)."""
    bits, count, smallest = [], 0, MAX_CODE
    for start in range(0, flat.size, _CHUNK):   # _CHUNK is a multiple of 8: bytes join
        codes = _chunk_codes(flat[start:start + _CHUNK], step)
        if codes is None:
            return None
        kept = codes != 0
        bits.append(np.packbits(kept))
        if kept.any():
            count += int(np.count_nonzero(kept))
            smallest = min(smallest, int(np.abs(codes[kept]).min()))
    packed = np.concatenate(bits).tobytes() if bits else b""
    return zlib.compress(packed, _MASK_LEVEL), count, smallest if count else 0


def _nonzero_codes(flat: np.ndarray, step: float):
    """``flat``'s nonzero codes in order, in blocks of _CHUNK (the last
    shorter): a block's signs and remainders then end on a byte. At most
    two chunks' codes are held."""
    pending, held = [], 0
    for start in range(0, flat.size, _CHUNK):
        codes = _chunk_codes(flat[start:start + _CHUNK], step)
        pending.append(codes[codes != 0])
        held += pending[-1].size
        while held >= _CHUNK:
            joined = np.concatenate(pending)
            yield joined[:_CHUNK]
            pending, held = [joined[_CHUNK:]], held - _CHUNK
    if held:
        yield np.concatenate(pending)


def _encode_sparse(flat: np.ndarray, how: VectorStep) -> tuple[BlobParts, dict] | None:
    """A sparse vector: the bitmap of its nonzero codes, then their
    magnitudes less the smallest (``center``), Rice coded, then their signs
    (a bit each, 1: negative). Pruned values start at their cut: codes
    about their median spend a bit or two more a value on the gap between
    the two clusters. Two passes over the vector, a chunk at a time."""
    mapped = _sparse_bitmap(flat, how.step)
    if mapped is None:
        return None
    mask, count, gap = mapped
    sample = flat[sample_positions(flat.size, _SAMPLE)]
    codes = _chunk_codes(sample, how.step)
    magnitudes = np.abs(codes[codes != 0]) - gap
    k = _rice_parameter(magnitudes) if magnitudes.size else 0
    while True:   # widened where a magnitude the sample missed needs it
        try:
            coded = _sparse_rice(flat, how.step, gap, k, count, mask)
            break
        except _Wider as wider:
            k = wider.k
    if coded is None:
        return None
    (blob, unary_bytes), largest = coded
    if not np.isfinite(restore(np.array([gap + largest]), 0, how.step, LINEAR)).all():
        return None
    record = {"stored": "quantized", "step": float(how.step), "domain": LINEAR,
              "center": gap, "rice": k, "unary_bytes": unary_bytes,
              "nonzeros": count, "mask_bytes": len(mask)}
    return blob, record


def _sparse_rice(flat, step: float, gap: int, k: int, count: int, mask: bytes):
    """((``mask``, then the unary parts, remainders and sign plane; the
    unary parts' bytes), largest magnitude less ``gap``) of ``flat``'s
    nonzero codes on Rice parameter ``k``, or None (see :class:`_RiceStreams`)."""
    streams, largest = _RiceStreams(k, count), 0
    for codes in _nonzero_codes(flat, step):
        folded = np.abs(codes) - gap
        if not streams.add(folded, codes < 0):
            return None
        largest = max(largest, int(folded.max()))
    return streams.finish(mask), largest


def _encode_dense(values: np.ndarray, how: VectorStep,
                  counted: bool = False) -> tuple[BlobParts, dict] | None:
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        return None
    return _dense_coded(flat.size, how, counted, _transformed(sampled(flat), how),
                        lambda: (_transformed(flat[start:start + _CHUNK], how)
                                 for start in range(0, flat.size, _CHUNK)))


def _dense_coded(size: int, how: VectorStep, counted: bool, sample, chunks, middle=None):
    """:func:`_encode_dense` of ``size`` values given a sample's
    :func:`_transformed` values (the center and Rice parameter
    come from them; None: they cannot be coded) and ``chunks()``, every
    _CHUNK's in order. A step's codes are counted natively in one pass
    (xla_ops/rice_code.h CountStepCodes), the center from the sample's
    middle order statistics (``middle``: :func:`_middle_order` of it, where
    the caller keeps it)."""
    if sample is None:
        return None
    x, _, zero = sample
    center = _center(*(middle or _middle_order(x, zero)), how.step)
    folded = np.empty(x.size, np.int64)
    if center is None or _native.step_counts(x, zero, how.step, center, 0, folded) is None:
        return None
    k = _native.rice_parameter(folded, MAX_RICE)
    while True:
        try:
            return _rice_coded(size, how, center, k, counted, chunks)
        except _Wider as wider:   # for a quotient too long (found by review: MemoryError)
            k = wider.k


class Ladder:
    """A nonempty vector's dense codings counted (:class:`Counted`) on many
    steps of one domain and offset, the part of its codes no step changes
    (its values' log2, the sample's middle order statistics) taken once: a
    byte target's ladder of log2 steps took each step's log2, codes and
    median over again."""

    def __init__(self, values: np.ndarray, domain: str, offset: float = 0.0):
        flat = np.asarray(values).reshape(-1)
        how = VectorStep(1.0, domain, offset)
        self.size, self.domain, self.offset = flat.size, domain, offset
        self.sample = _transformed(sampled(flat), how)
        self.chunks = [_transformed(flat[start:start + _LADDER_CHUNK], how)
                       for start in range(0, flat.size, _LADDER_CHUNK)]
        self.middle = None if self.sample is None else _middle_order(*self.sample[::2])

    def counted(self, step: float) -> tuple[Counted, dict] | None:
        """:func:`encode` of the values on ``step``, counted."""
        return _dense_coded(self.size, VectorStep(step, self.domain, self.offset), True,
                            self.sample, lambda: iter(self.chunks), self.middle)


def _middle_order(x: np.ndarray, zero: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(:func:`middle_values` of ``x``, how many of them, the first, are
    zeros': floored) of a sample's transformed values. Codes keep the order
    of x, a zero's (floored) first among equal x (zeros are the smallest x)."""
    zeros = 0 if zero is None else int(np.count_nonzero(zero))
    floored = sum(at < zeros for at in sorted({(x.size - 1) // 2, x.size // 2}))
    return middle_values(x), floored


def _center(middle: np.ndarray, floored: int, step: float) -> int | None:
    """``int(np.median(codes))`` of values' codes on ``step`` from their
    middle values (:func:`middle_values`; the first ``floored`` of them
    zeros', floored: :func:`_middle_order`); None out of range."""
    codes = np.round(middle / step)
    codes[:floored] = np.floor(middle[:floored] / step)
    center = _median_of_middle(codes)
    return int(center) if abs(center) < MAX_CODE else None


def _median_of_middle(codes: np.ndarray) -> float:
    """``np.median`` of one or two middle codes, the same float without its
    partition (a byte target's ladders ask it at every step of every probe:
    np.median's overhead was 5% of a 2x target's time)."""
    return float(codes[0]) if codes.size == 1 else (float(codes[0]) + float(codes[1])) / 2


def sample_positions(size: int, count: int, seed: int = 0, distinct: bool = False):
    """``count`` positions of ``size`` drawn at random from a fixed seed
    (strides may follow rows; with ``distinct``, each once), or every
    position (a slice) where there are no more than ``count``; read-only,
    drawn once for the last few sizes asked (a byte target's ladder samples
    each moment at every step, and a layer's shapes repeat)."""
    if size <= count:
        return slice(None)
    return _drawn_positions(size, count, seed, distinct)


@functools.lru_cache(maxsize=16)
def _drawn_positions(size: int, count: int, seed: int, distinct: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    positions = (rng.choice(size, count, replace=False) if distinct
                 else rng.integers(0, size, count))
    positions.flags.writeable = False
    return positions


def sampled(flat: np.ndarray, count: int = _SAMPLE) -> np.ndarray:
    """The values of a 1-D array at :func:`sample_positions`."""
    return flat[sample_positions(flat.size, count)]


def _rice_coded(size: int, how: VectorStep, center: int, k: int, counted: bool, chunks):
    """(blob, record) of ``size`` values (their transformed chunks
    ``chunks()``, see :func:`_dense_coded`) on Rice parameter ``k``, or
    None when they cannot be coded (see :class:`_RiceStreams`;
    ``counted``: the blob a :class:`Counted`)."""
    streams = (_CountedStreams if counted else _RiceStreams)(k, size)
    lo, hi = math.inf, -math.inf
    for chunk in chunks():
        if chunk is None:
            return None
        x, negative, zero = chunk
        folded = None if counted else np.empty(x.size, np.int64)
        counts = _native.step_counts(x, zero, how.step, center, k, folded)
        if counts is None:
            return None
        lo, hi = min(lo, counts[0]), max(hi, counts[1])
        if not streams.add_counted(x.size, counts[2], counts[3], folded, negative):
            return None
    return _finished(streams, how, center, k, lo, hi)


def _finished(streams, how: VectorStep, center: int, k: int, lo, hi) -> tuple | None:
    """(blob, record) of dense Rice ``streams`` whose codes span ``lo`` to
    ``hi``, or None where those restore non-finite."""
    # restore is monotonic in the codes: the extremes bound every value
    if not np.all(np.isfinite(restore(np.array([lo, hi]), 0, how.step, how.domain, how.offset))):
        return None
    blob, unary_bytes = streams.finish()
    record = {"stored": "quantized", "step": float(how.step), "domain": how.domain,
              "center": center, "rice": k, "unary_bytes": unary_bytes,
              **({"offset": how.offset} if how.domain in LOG_DOMAINS else {})}
    return blob, record


class _Wider(Exception):
    """A quotient too long for Rice parameter ``k``; this wider one codes it."""

    def __init__(self, k: int):
        super().__init__(k)
        self.k = k


class _RiceStreams:
    """Values folded to >= 0 Rice coded on parameter ``k``, a block at a time
    (every block but the last a multiple of 8 values: its remainders and
    signs end on a byte), with a sign plane where signs are given. Every
    check runs before a block's unary bits are built: a quotient the decoder
    would refuse raises :class:`_Wider` (or, past MAX_RICE, ``add`` returns
    False), and so do more than float16's 16 bits a value of ``count``."""

    def __init__(self, k: int, count: int):
        self.k, self.limit, self.bits = k, 16 * count, 0
        self.unary, self.remainders, self.signs = _UnaryWriter(), [], []

    def add(self, folded: np.ndarray, negative: np.ndarray | None = None) -> bool:
        """A block of folded codes (counted by numpy) and their signs."""
        return self.add_counted(folded.size, int(folded.max()), int((folded >> self.k).sum()),
                                folded, negative)

    def add_counted(self, size: int, largest: int, quotient_sum: int,
                    folded: np.ndarray | None, negative: np.ndarray | None) -> bool:
        """:meth:`add` of a block given its counts: ``size`` folded codes
        ``folded`` (unread where only counted), the largest ``largest``,
        their quotients summing to ``quotient_sum``; signs ``negative``."""
        if largest >> self.k >= MAX_QUOTIENT:
            wider = largest.bit_length() - (MAX_QUOTIENT.bit_length() - 2)
            if self.k < wider <= MAX_RICE:
                raise _Wider(wider)
            return False
        self.bits += quotient_sum + size * (self.k + 1)
        if self.bits > self.limit:   # more than float16 would take
            return False
        self._put(size, quotient_sum, folded, negative)
        return True

    def _put(self, size: int, quotient_sum: int, folded: np.ndarray, negative) -> None:
        self.unary.add(folded >> self.k)
        self.remainders.append(_remainder_bytes(folded, self.k))
        if negative is not None:
            self.signs.append(np.packbits(negative).tobytes())

    def finish(self, prefix: bytes = b"") -> tuple[BlobParts, int]:
        """(``prefix``, the unary parts, then the remainders and the sign
        plane, as :class:`BlobParts`: never joined, see there; the unary
        parts' bytes)."""
        unary = self.unary.parts()
        blob = BlobParts([prefix, *unary, *self.remainders, *self.signs])
        return blob, sum(len(part) for part in unary)


class _CountedStreams(_RiceStreams):
    """:class:`_RiceStreams` counted: the same checks, the bytes they would
    pack (unary parts run on across blocks; a block's remainders and signs
    end on a byte) summed instead of packed."""

    def __init__(self, k: int, count: int):
        super().__init__(k, count)
        self.unary_bits = self.side_bytes = 0

    def _put(self, size: int, quotient_sum: int, folded, negative) -> None:
        self.unary_bits += quotient_sum + size   # q ones, then a zero
        self.side_bytes += -(-size * self.k // 8)
        if negative is not None:
            self.side_bytes += -(-size // 8)

    def finish(self, prefix: bytes = b"") -> tuple[Counted, int]:
        unary = -(-self.unary_bits // 8)
        return Counted(len(prefix) + unary + self.side_bytes), unary


class _UnaryWriter:
    """Unary parts (``q`` ones then a zero each) packed a chunk of codes at a
    time (xla_ops/rice_code.h: 4x numpy's bit arrays, whose packing was most
    of a byte target's coding of fine steps), the bits past a chunk's last
    whole byte carried to the next."""

    def __init__(self):
        self.parts_done, self.carry, self.carry_count = [], 0, 0

    def add(self, quotients: np.ndarray) -> None:
        data, self.carry, self.carry_count = _native.rice_unary(quotients, self.carry,
                                                                self.carry_count)
        self.parts_done.append(data)

    def parts(self) -> list[bytes]:
        """The unary stream's pieces, the last padded with ones to a byte."""
        if not self.carry_count:
            return list(self.parts_done)
        pad = 8 - self.carry_count
        return [*self.parts_done, bytes([(self.carry << pad) | ((1 << pad) - 1)])]


def coded_bytes(values: np.ndarray, step: float, middle: np.ndarray | None = None) -> int:
    """The bytes :func:`encode` takes for ``values`` on a linear ``step``
    (counted, not coded; a sparse vector coded, its bitmap deflated).
    ``middle``: :func:`middle_values` of ``values``, for a caller counting
    one vector on many steps (the codes' median, a partition of them each
    time, was half the time)."""
    flat = np.asarray(values).reshape(-1)
    if is_sparse(flat):
        blob = _encode_sparse(flat, VectorStep(step))
        return len(blob[0]) if blob is not None else 0
    codes = np.round(flat.astype(np.float64) / step).astype(np.int64)
    # rounding keeps the values' order: the middle codes are the middle values'
    center = (np.median(codes) if middle is None
              else _median_of_middle(np.round(middle / step)))
    return _rice_bytes(_zigzag(codes - int(center)))


def step_rates(values: np.ndarray, steps, middle: np.ndarray,
               weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, squared rounding error) of float64 ``values`` on each of
    ``steps``: :func:`coded_bytes` (``middle``: :func:`middle_values` of
    them) of a dense vector and the sum of its squared errors (each times
    ``weight``, if given), every step natively in one call
    (xla_ops/rice_code.h: numpy's passes over the codes, then a call and a
    numpy sum a step, were most of a byte target's thin curves)."""
    values = np.ascontiguousarray(values, np.float64)
    weight = None if weight is None else np.ascontiguousarray(weight, np.float64)
    steps = np.ascontiguousarray(steps, np.float64).reshape(-1)
    nbytes, sse = _native.rice_step_rates(values, steps, _centers(middle, steps), weight,
                                          MAX_RICE)
    for i in np.flatnonzero(nbytes < 0):   # a code too far to count natively
        nbytes[i] = coded_bytes(values, steps[i], middle)
        sse[i] = rounding_sse(values, steps[i], weight)
    return nbytes, sse


def _centers(middle: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """:func:`_center` of unfloored ``middle`` values on each of ``steps``
    (int64; one of MAX_CODE or more where it is None)."""
    codes = np.round(middle[None, :] / steps[:, None])
    center = codes[:, 0] if middle.size == 1 else (codes[:, 0] + codes[:, 1]) / 2
    far = ~(np.abs(center) < MAX_CODE)
    return np.where(far, MAX_CODE, np.trunc(np.where(far, 0.0, center))).astype(np.int64)


def rounding_sse(values: np.ndarray, step: float, weight=None) -> float:
    """Squared error of float64 ``values`` rounded to multiples of ``step``
    (each value's times ``weight``, if given)."""
    squares = np.square(np.round(values / step) * step - values)
    return float(np.sum(squares if weight is None else squares * weight))


def middle_values(values: np.ndarray) -> np.ndarray:
    """The one or two middle values of float64 ``values`` in sorted order
    (whose mean is their median)."""
    flat = np.asarray(values, np.float64).reshape(-1)
    at = sorted({(flat.size - 1) // 2, flat.size // 2})
    return np.partition(flat, at)[at]


def sparse_value_bytes(codes: np.ndarray) -> int:
    """The bytes of a sparse vector's nonzero ``codes`` (int64) after its
    bitmap: magnitudes less the smallest, Rice coded, and signs."""
    if not codes.size:
        return 0
    magnitudes = np.abs(codes)
    return _rice_bytes(magnitudes - magnitudes.min()) + -(-codes.size // 8)


def _rice_bytes(folded: np.ndarray) -> int:
    """The bytes of ``folded`` (>= 0) Rice coded on its best parameter:
    unary parts and remainders, each padded to a byte."""
    k = _rice_parameter(folded)
    return -(-(int(np.sum(folded >> k)) + folded.size) // 8) + -(-folded.size * k // 8)


def decoded_values(codes_blob, count: int, record: dict) -> np.ndarray:
    """The float32 values of a blob :func:`encode` wrote, from the leaf's
    checked ``record`` fields (:func:`check_record`); ValueError when the
    blob does not hold exactly ``count`` codes or they restore non-finite.
    The codes are read natively, _DECODE_CHUNK at a time."""
    values, kept = decoded_parts(codes_blob, count, record)
    if kept is not None:
        values[kept[0]] = kept[1]
    return values


def decoded_parts(codes_blob, count: int, record: dict) -> tuple:
    """(the coded values as :func:`decoded_values` gives them, the values
    kept aside coded as fillers, or None: (positions, float32 values)), for
    a caller that checks the coded values alone in the leaf's dtype."""
    kept = record.get("outliers", 0)
    blob = memoryview(contiguous(codes_blob)).cast("B")
    side = kept_bytes(kept, count)
    if kept > count or side > blob.nbytes:
        raise ValueError(f"holds {blob.nbytes} bytes, fewer than its {kept} kept values take")
    coded = blob[:blob.nbytes - side]
    values = (_decoded_sparse(coded, count, record) if record.get("nonzeros") is not None
              else _decoded_codes(coded, count, record, magnitudes=False))
    if not kept:
        return values, None
    index_dtype = _kept_index_dtype(count)
    tail = blob[blob.nbytes - side:]
    index = np.frombuffer(tail, index_dtype, kept).astype(np.int64)
    if index[-1] >= count or np.any(np.diff(index) <= 0):
        raise ValueError("holds kept positions not sorted, distinct and inside the leaf")
    return values, (index, np.frombuffer(tail, "<f4", kept, offset=kept * index_dtype.itemsize))


def _decoded_codes(codes_blob, count: int, record: dict, magnitudes: bool) -> np.ndarray:
    """:func:`decoded_values` of ``count`` Rice-coded values: zigzagged codes
    (a sign plane after them in signed_log2), or with ``magnitudes`` (a
    sparse vector's) magnitudes and a sign plane."""
    data = np.frombuffer(codes_blob, np.uint8)
    k, split = record["rice"], record["unary_bytes"]
    remainder_bytes = (count * k + 7) // 8
    signed = magnitudes or record["domain"] == SIGNED_LOG2
    sign_bytes = (count + 7) // 8 if signed else 0
    if split + remainder_bytes + sign_bytes != data.size:
        raise ValueError(f"holds {data.size} bytes, expected {split} + {remainder_bytes}"
                         + (f" + {sign_bytes}" if sign_bytes else ""))
    if 8 * split > count * (MAX_QUOTIENT + 1) + 7:   # longer than any valid unary part
        raise ValueError(f"holds a unary part of {split} bytes for {count} codes")
    zeros = _zero_bits(data[:split])
    if zeros != count:   # counted before anything grows with the blob's size
        raise ValueError(f"holds {zeros} unary codes, expected {count}")
    unary, remainders = data[:split], data[split:split + remainder_bytes]
    signs = data[split + remainder_bytes:]
    out = np.empty(count, np.float32)
    unary_bit = remainder_bit = 0
    for done in range(0, count, _DECODE_CHUNK):   # natively (xla_ops/rice_code.h)
        n = min(_DECODE_CHUNK, count - done)
        scaled, unary_bit, remainder_bit = _native.rice_decode_steps(
            unary, unary_bit, remainders, remainder_bit, k, MAX_QUOTIENT, n,
            not magnitudes, record["center"], record["step"])
        values = out[done:done + n]
        _from_scaled(scaled, record["domain"], record["offset"], values)
        if sign_bytes:
            np.negative(values, out=values, where=_bits(signs, done, n).view(bool))
    if count and 8 * split - unary_bit >= 8:   # (the bits past the last code are ones)
        raise ValueError("holds a unary part padded by more than a byte")
    if sign_bytes and _padding_set(signs, count):
        raise ValueError("holds sign padding bits set")   # found by review
    if remainder_bytes and _padding_set(remainders, count * k):
        raise ValueError("holds remainder padding bits set")
    if not np.all(np.isfinite(out)):
        raise ValueError("restores values beyond float32's range")
    return out


def _decoded_sparse(codes_blob, count: int, record: dict) -> np.ndarray:
    """:func:`decoded_values` of a sparse vector: its bitmap inflated (never
    past ``count`` bits), checked to hold ``nonzeros`` ones, then the
    nonzero values decoded into place."""
    data = np.frombuffer(codes_blob, np.uint8)
    split, nonzeros = record["mask_bytes"], record["nonzeros"]
    if split > data.size or nonzeros > count:
        raise ValueError(f"holds {data.size} bytes, a bitmap of {split} and "
                         f"{nonzeros} of {count} values nonzero")
    raw, complete = inflate_at_most(data[:split].tobytes(), (count + 7) // 8)
    if len(raw) != (count + 7) // 8 or not complete:
        raise ValueError("holds a bitmap of the wrong size")
    bits = np.frombuffer(raw, np.uint8)
    if bits.size and _padding_set(bits, count):
        raise ValueError("holds bitmap padding bits set")
    nonzero = np.unpackbits(bits, count=count).view(bool)
    if int(np.count_nonzero(nonzero)) != nonzeros:
        raise ValueError(f"holds a bitmap of {int(np.count_nonzero(nonzero))} nonzeros, "
                         f"expected {nonzeros}")
    out = np.zeros(count, np.float32)
    out[nonzero] = _decoded_codes(data[split:].tobytes(), nonzeros, record, magnitudes=True)
    return out


def _padding_set(packed: np.ndarray, used: int) -> bool:
    """Whether a bit past the first ``used`` of ``packed`` (its last byte's
    padding, most significant bits first) is set."""
    return bool(used % 8 and packed[-1] & ((1 << (8 - used % 8)) - 1))


_ZEROS_IN_BYTE = np.array([8 - bin(b).count("1") for b in range(256)], np.uint8)
_ZERO_CHUNK = 1 << 20     # bytes a step


def _zero_bits(data: np.ndarray) -> int:
    """Zero bits in ``data``, a chunk at a time (found by review: a hostile
    blob of 20 MB of zeros unpacked to 160 M bits and their int64 positions,
    1.5 GB, before its count of codes was checked)."""
    return sum(int(_ZEROS_IN_BYTE[data[i:i + _ZERO_CHUNK]].sum(dtype=np.int64))
               for i in range(0, data.size, _ZERO_CHUNK))


def _bits(data: np.ndarray, start: int, count: int) -> np.ndarray:
    """Bits ``start`` .. ``start + count`` of ``data`` (most significant first)."""
    first = start // 8
    bits = np.unpackbits(data[first:(start + count + 7) // 8])
    return bits[start - 8 * first:start - 8 * first + count]


def _remainder_bytes(folded: np.ndarray, k: int) -> bytes:
    """The ``k``-bit remainders of ``folded`` packed, most significant bit
    first (xla_ops/rice_code.h; no bit matrix: found by review, numpy's took
    64 bytes a value at k = 8, 979 MB to code a 32 MB leaf)."""
    return _native.rice_remainders(folded, k) if k else b""


def restore(codes: np.ndarray, center: int, step: float, domain: str,
            offset: float = 0.0) -> np.ndarray:
    """float32 values of integer ``codes`` (less ``center``) on ``step``."""
    out = np.empty(np.shape(codes), np.float32)
    _from_scaled((codes.astype(np.float64) + center) * step, domain, offset, out)
    return out


def _from_scaled(x: np.ndarray, domain: str, offset: float, out: np.ndarray) -> None:
    """float32 values into ``out`` of codes scaled to their step (float64
    ``x``, changed in place): in a log2 domain 2^x less ``offset``, at
    least 0 (signed_log2: the magnitudes)."""
    with np.errstate(over="ignore"):
        if domain in LOG_DOMAINS:
            np.minimum(x, 1024.0, out=x)
            np.exp2(x, out=x)
            x -= offset
            np.maximum(x, 0.0, out=x)
        np.copyto(out, x, casting="same_kind")


def check_record(record: dict, where: str) -> dict:
    """A leaf record's quantization fields, or ValueError naming the bad one."""
    fields = {name: record.get(name) for name in ("step", "domain", "center", "rice",
                                                  "unary_bytes")}
    fields["offset"] = record.get("offset", 0.0)
    step, center, offset = fields["step"], fields["center"], fields["offset"]
    if type(offset) not in (int, float) or not (math.isfinite(offset) and offset >= 0):
        raise ValueError(f"{where}: bad quantization offset {offset!r:.40}")
    if type(step) is not float or not (math.isfinite(step) and step > 0):
        raise ValueError(f"{where}: bad quantization step {step!r:.40}")
    if fields["domain"] not in DOMAINS:
        raise ValueError(f"{where}: bad quantization domain {fields['domain']!r:.40}")
    if type(center) is not int or abs(center) >= MAX_CODE:
        raise ValueError(f"{where}: bad quantization center {center!r:.40}")
    if type(fields["rice"]) is not int or not 0 <= fields["rice"] <= MAX_RICE:
        raise ValueError(f"{where}: bad Rice parameter {fields['rice']!r:.40}")
    if type(fields["unary_bytes"]) is not int or fields["unary_bytes"] < 0:
        raise ValueError(f"{where}: bad unary size {fields['unary_bytes']!r:.40}")
    if "nonzeros" in record or "mask_bytes" in record:   # a sparse vector
        for name in ("nonzeros", "mask_bytes"):
            value = record.get(name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{where}: bad {name} {value!r:.40}")
            fields[name] = value
        if fields["domain"] != LINEAR:
            raise ValueError(f"{where}: a sparse vector on {fields['domain']} steps")
        if fields["center"] < 0:   # a sparse vector's smallest magnitude
            raise ValueError(f"{where}: bad quantization center {fields['center']!r:.40}")
    if "outliers" in record:   # values kept aside (encode's kept)
        kept = record["outliers"]
        if type(kept) is not int or kept < 0:
            raise ValueError(f"{where}: bad kept value count {kept!r:.40}")
        if fields["domain"] != LINEAR:
            raise ValueError(f"{where}: values kept aside on {fields['domain']} steps")
        fields["outliers"] = kept
    return fields


def _zigzag(c: np.ndarray) -> np.ndarray:
    """0, -1, 1, -2, ... -> 0, 1, 2, 3, ... (int64, |c| < 2^62)"""
    folded = c << 1
    folded ^= c >> 63
    return folded


def _rice_parameter(folded: np.ndarray) -> int:
    """The remainder width that codes ``folded`` in the fewest bits: the
    cost is convex in it, so a walk from the mean's width finds it (each
    width tried is a pass over the codes; all 41 took a third of a large
    leaf's coding)."""
    def cost(k):
        return int(np.sum(folded >> k)) + folded.size * (k + 1)
    k = min(MAX_RICE, max(0, int(np.log2(max(float(np.mean(folded)), 1.0)))))
    known = {k: cost(k)}
    for direction in (-1, 1):
        while 0 <= k + direction <= MAX_RICE:
            known.setdefault(k + direction, cost(k + direction))
            if known[k + direction] >= known[k]:
                break
            k += direction
    return k
