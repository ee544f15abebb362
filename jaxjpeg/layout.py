"""The checkpoint layer's layout, in one place: blob names, restart intervals
per tile, the rule that makes leaf paths unique, and what user metadata may hold.

Writer (:mod:`jaxjpeg.checkpoint`), reader (:mod:`jaxjpeg.checkpoint_reader`)
and the command line all name blobs and count intervals through this module,
and the writer and the reader apply the same path rule (docs/format.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Iterable, Sequence

import numpy as np

from jaxjpeg import _native, threads
from jaxjpeg.treepaths import path_string


class Unstorable(ValueError, TypeError):
    """A tree a checkpoint cannot hold as it is: paths that clash, too deep or
    too long, a dtype no reader restores, metadata over its limit. What the
    data is, not how the save was asked for (the CLI says exit 1, not 2)."""

# Longest leaf path accepted, in keys and in characters of its slash-joined
# form. Real models stay far below (tens of keys, a few hundred characters);
# the caps keep every path operation cheap and recursion-free (nest()).
MAX_PATH_DEPTH = 256
MAX_PATH_CHARS = 4096


# ---------------------------------------------------------------- blob names


def raw_blob(index: int) -> str:
    """A lossless leaf's C-order bytes."""
    return f"leaf{index}/raw"


def stored_exactly(record: dict) -> bool:
    """Whether a leaf's record says it restores bit for bit: raw in its own
    dtype, or marked ``exact`` where a smaller form (or a JPEG coding of
    constant rows) holds every value."""
    if record.get("exact") is True:
        return record.get("kind") in ("raw", "jpeg")
    return record.get("kind") == "raw" and "stored" not in record


def tile_blob(index: int, k: int) -> str:
    """Tile ``k`` of a JPEG-coded leaf: a complete JPEG file."""
    return f"leaf{index}/tile{k}.jpg"


def intervals_blob(index: int) -> str:
    """A JPEG-coded leaf's restart-interval index (``intervals + 1`` values per
    tile: see :func:`pack_interval_index`)."""
    return f"leaf{index}/intervals"


# The record's "intervals" value for an index of uint16 differences stored as
# deflated byte planes; absent: uint32 offsets (what every file before it holds).
DELTA_INDEX = "deflated-uint16-deltas"
# The record's "affine_layout" for maps whose rows share one scale: the scale,
# then every row's offset, as deflated byte planes. Absent: [2, rows] or [2, 1].
SHARED_SCALE = "deflated-shared-scale"
# ... for maps whose scales differ: every row's scale, then every row's
# offset, as deflated byte planes (rows that share a scale a run at a time,
# e.g. a stacked leaf's layers, jaxjpeg.stacks, deflate to little).
DEFLATED_MAPS = "deflated-planes"
AFFINE_LAYOUTS = (SHARED_SCALE, DEFLATED_MAPS)


# zlib's level for side data: on a 211 MB tree level 9 took 0.068 s of a
# save's CPU (10%, mostly an embedding's maps) and level 6 0.023 s, for
# 1.3 kB more in a 27.3 MB file; EfficientNet-lite1's vectors: 7 bytes.
DEFLATE_LEVEL = 6


def deflate_planes(values: np.ndarray, level: int = DEFLATE_LEVEL) -> bytes:
    """``values`` (1-D, little-endian) with their bytes grouped by significance
    (every value's first byte, then every second byte, ...), deflated. Side
    data is smooth or repetitive in its high bytes: an interval index
    shrinks 2.5x, a map's offsets 2.6x. Over _TINY_BYTES, one zlib stream
    of a deflate stream a plane (:func:`_plane_stream`: string matching at
    ``level`` only where it may pay), up to _ONE_STREAM_BYTES the smaller of
    that and one such stream of all the planes in order."""
    return _planes_deflated(values, level, sized=False)


def deflate_planes_in_pieces(values: np.ndarray,
                             level: int = DEFLATE_LEVEL) -> tuple[bytes, Pieces | None]:
    """:func:`deflate_planes`' bytes, and where each plane's pieces of
    PIECE_BYTES start in them (None where no plane is that long): restore
    inflates the pieces at once (:func:`inflate_planes`)."""
    starts: list[int] = []
    packed = _planes_deflated(values, level, sized=False, starts=starts)
    return packed, Pieces(PIECE_BYTES, tuple(starts)) if starts else None


def deflated_planes_size(values: np.ndarray, level: int = DEFLATE_LEVEL) -> int:
    """``len(deflate_planes(values, level))``, the planes' runs and Huffman
    codes counted, not written (xla_ops/deflate_runs.h)."""
    return _planes_deflated(values, level, sized=True)


def _planes_deflated(values: np.ndarray, level: int, sized: bool,
                     starts: list[int] | None = None) -> bytes | int:
    """deflate_planes' bytes, or (``sized``) their length; the pieces'
    starts appended to ``starts`` where planes are split."""
    planes = np.ascontiguousarray(values).view(np.uint8).reshape(-1, values.dtype.itemsize).T
    if planes.size <= _TINY_BYTES:   # side data: its planes matched into each other
        packed = zlib.compress(np.ascontiguousarray(planes), level)
        return len(packed) if sized else packed
    if planes.size > _ONE_STREAM_BYTES:
        return _zlib_stream(planes, level, sized, starts)
    one = np.ascontiguousarray(planes).reshape(1, -1)
    streams = [one] if len(planes) == 1 else [one, planes]
    return min((_zlib_stream(each, level, sized) for each in streams), key=_size)


def _size(coded: bytes | int) -> int:
    """The length of a coding or of a coding counted."""
    return coded if isinstance(coded, int) else len(coded)


def _zlib_stream(planes: np.ndarray, level: int, sized: bool = False,
                 starts: list[int] | None = None) -> bytes | int:
    """One zlib stream of a deflate stream each of ``planes``' pieces (rows
    of uint8, split where longer than PIECE_BYTES); ``sized``: its length.
    Where planes are split, their pieces are written at once and every
    piece's start is appended to ``starts``. (Planes apart are coded one
    after another, as sizes are counted: a save codes leaves on every core,
    and a pool's hand-offs took 10-15% more CPU time.)"""
    pieces = [plane[at:at + PIECE_BYTES] for plane in planes
              for at in range(0, max(1, len(plane)), PIECE_BYTES)]
    split = len(pieces) > len(planes)

    def code(k: int) -> tuple[bytes | int, int]:
        piece = np.ascontiguousarray(pieces[k])
        coded = _plane_stream(piece, level, k == len(pieces) - 1, sized)
        return coded, 0 if sized else zlib.adler32(piece)

    streams = (_at_once(code, len(pieces)) if split and not sized
               else [code(k) for k in range(len(pieces))])
    if sized:
        return len(_ZLIB_HEADER) + sum(coded for coded, _ in streams) + _ADLER32_BYTES
    checksum, at = zlib.adler32(b""), len(_ZLIB_HEADER)
    for piece, (coded, piece_checksum) in zip(pieces, streams):
        if starts is not None and split:
            starts.append(at)
        at += len(coded)
        checksum = adler32_combine(checksum, piece_checksum, len(piece))
    return b"".join([_ZLIB_HEADER, *(coded for coded, _ in streams),
                     checksum.to_bytes(_ADLER32_BYTES, "big")])


# Deflate's string matching pays on repeats (masks, counts, tables of equal
# rows), not on the noise of float weights' planes: there runs of a byte
# (the only matches Z_RLE looks for: zero low bytes of float16 values held as
# float32) and Huffman codes took 0.836 of an 8 MB embedding's planes in 49
# ms, zlib's level 6 0.853 in 350 ms (its matches cost more bits than the
# bytes they replace).
_SMALL_BYTES = 1 << 16   # a plane this small is matched at its level too
# Data this small is also coded as one stream, its planes in order (the
# smaller kept): one plane may copy another (found by review: grey RGBA
# pixels of 16,385-32,500 values took 2.9x their bytes coded a plane at a
# time). Up to _TINY_BYTES, zlib's one call at ``level`` (a save of 5,000
# small leaves took 18% longer with two codings of each).
_ONE_STREAM_BYTES = 1 << 17
_TINY_BYTES = 1 << 14
_MATCH_CODE_BYTES = 3   # a match's length and distance codes, about
# Where matches of 4-7 bytes cover this share of a plane or more, their
# codes' cost is not known well enough (deflate's Huffman codes make the
# frequent ones short): zlib's fastest level is tried on a piece of the
# plane (found by review: smooth int8 rows, level 6 0.22 of their bytes,
# run-coded 0.33, saved nothing at 3 bytes a match).
_SHORT_MATCHES_SHARE = 1 / 4
_TRIAL_BYTES = 1 << 16   # twice the farthest back a match reaches
# Skewed bytes (a float's exponent plane, 4-bit codes held in int8) repeat
# 4-7 bytes by chance all over (92% of an Adam moment's exponent plane): the
# matcher meets one every 4-5 bytes, at a tenth of its pace on noise. Planes
# run-coded under _CHANCE_SHARE of their bytes, from _SHORTS_SAMPLED_FROM
# bytes on, have their short matches counted on the trial's piece (where
# the trial reads whether they pay) and their long ones over the whole
# plane, short ones passed over as misses (copied stretches anywhere): 2
# MiB of 4-bit codes 14 -> 0.3 ms, an Adam state's 60 exponent planes 77 ->
# 44 ms. Whether a byte depends on the one before cannot stand in for the
# short count: short motifs can pay while no byte tells the next (200
# motifs of 5 codes of 12 values: level 6 0.37 of the bytes, run-coded 0.46).
_CHANCE_SHARE = 3 / 4
_SHORTS_SAMPLED_FROM = 4 * _TRIAL_BYTES
# Huffman codes take a bit a byte at least: where a plane took under this
# share, level 6's short matches may win (a 0 / -1e9 mask's planes; a table
# of sines' exponents: 0.20 run-coded, 0.10 at level 6: review); zlib's
# fastest level's seldom do (a 100 M-value 0/1 mask: 0.145 at level 1, 0.103
# run-coded, the two taking 1.7x level 1's time: review).
_HUFFMAN_FLOOR_SHARE = 1 / 4
# The share of a plane's run-coded bytes matching must save to be tried at
# the plane's level.
_MATCHING_PAYS = 1 / 64
# A zlib stream's header (deflate, 32 KiB window, no dictionary); the planes'
# raw deflate streams follow it, then the Adler-32 of all their bytes.
_ZLIB_HEADER = bytes([0x78, 0x9C])
_ADLER32_BYTES = 4
# A byte plane longer than this is deflated a piece of this many bytes at a
# time, each piece a deflate stream of its own ended on a byte boundary (a
# few hundred bytes more a piece, for its codes): restore inflates the
# pieces at once where the record says where they start (one core's zlib
# inflates 170-350 MB/s). Longer than _ONE_STREAM_BYTES: data coded as one
# stream is never split.
PIECE_BYTES = 1 << 21


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Where a deflated leaf's pieces start in its stream, plane after plane,
    each covering ``bytes`` of its plane (the last of a plane fewer); a
    record's ``"pieces"``."""

    bytes: int
    starts: tuple[int, ...]

    def to_record(self) -> dict:
        return {"bytes": self.bytes, "starts": list(self.starts)}

    @staticmethod
    def from_record(value) -> Pieces:
        """The record's ``"pieces"``; ValueError unless it is one."""
        if not isinstance(value, dict) or set(value) != {"bytes", "starts"}:
            raise ValueError(f"bad 'pieces' {value!r:.60}")
        size, starts = value["bytes"], value["starts"]
        if (type(size) is not int or size < 1 or not isinstance(starts, list) or not starts
                or any(type(s) is not int for s in starts)
                or any(b <= a for a, b in zip(starts, starts[1:]))):
            raise ValueError(f"bad 'pieces' {value!r:.60}")
        return Pieces(size, tuple(starts))


def _plane_stream(plane: np.ndarray, level: int, last: bool, sized: bool = False) -> bytes | int:
    """One byte plane as raw deflate blocks: its runs and Huffman codes
    (xla_ops/deflate_runs.h: what zlib's Z_RLE writes, 2-4x faster, counted
    4-6x faster), or matched by zlib at ``level`` where that may pay and is
    smaller; ended on a byte boundary (a sync flush) unless ``last``, so the
    next plane's follow it. ``sized``: its length, the runs' blocks counted,
    not written."""
    coded = (_native.run_deflated_size if sized else _native.run_deflate)(plane, last)
    near_floor = level > 1 and _size(coded) < _HUFFMAN_FLOOR_SHARE * plane.size
    if plane.size <= _SMALL_BYTES or near_floor or _repeats_pay(plane, _size(coded)):
        end = zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
        matched = _raw_deflate(plane, zlib.Z_DEFAULT_STRATEGY, level, end)
        coded = min(coded, len(matched) if sized else matched, key=_size)
    return coded


def _raw_deflate(data: np.ndarray, strategy: int, level: int = DEFLATE_LEVEL,
                 end: int = zlib.Z_FINISH) -> bytes:
    """``data`` (uint8) as raw deflate blocks (no zlib header or checksum)."""
    packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
    return packer.compress(data) + packer.flush(end)


def _repeats_pay(plane: np.ndarray, run_coded_bytes: int) -> bool:
    """Whether string matching may shorten ``plane`` by over _MATCHING_PAYS
    of its run coding (``run_coded_bytes``): the bytes inside the repeats a
    fast matcher meets (xla_ops/repeats.h: runs aside, 5 GB/s on noise,
    where zlib's fastest level took 70 MB/s) at their share of that coding,
    less about 3 bytes a match, short matches and long ones apart (found by
    review: counting 8 bytes or more, it missed smooth int8 rows' 3-7 byte
    repeats, 1.7x level 6's bytes); where short ones are many, zlib's
    fastest level on a piece decides (_SHORT_MATCHES_SHARE). On skewed
    planes (_CHANCE_SHARE) short matches are counted on that piece."""
    share = run_coded_bytes / max(1, plane.size)
    middle = max(0, (plane.size - _TRIAL_BYTES) // 2)
    piece = plane[middle:middle + _TRIAL_BYTES]
    if share < _CHANCE_SHARE and plane.size >= _SHORTS_SAMPLED_FROM:
        (short, shorts), _ = _native.repeats(piece)
        scale = plane.size / piece.size
        counts = ((short * scale, shorts * scale), _native.repeats(plane, long_only=True)[1])
    else:
        counts = _native.repeats(plane)   # (short matches, long ones)
    saving = sum(max(0.0, matched * share - _MATCH_CODE_BYTES * matches)
                 for matched, matches in counts)
    if saving > _MATCHING_PAYS * run_coded_bytes:
        return True
    if counts[0][0] < _SHORT_MATCHES_SHARE * plane.size:
        return False
    return (len(_raw_deflate(piece, zlib.Z_DEFAULT_STRATEGY, 1))
            < (1 - _MATCHING_PAYS) * _native.run_deflated_size(piece, True))


# The record's "stored" value for a leaf of a sub-byte dtype (int4, uint4,
# int2, uint2, float4_e2m1fn: numpy keeps one value per byte) as its values'
# low bits, 8 // bits to a byte, the first value in the lowest bits; its
# "deflated" says whether those bytes are deflated. Deflating one byte per
# value instead took 4.10 bits a value on int4 weights, packed 3.48.
PACKED = "packed"


def pack_low_bits(values: np.ndarray, width: int) -> np.ndarray:
    """The low ``width`` bits (1, 2 or 4) of every byte of ``values``
    (one-byte items), 8 // width to a uint8, first in the lowest bits."""
    per = 8 // width
    codes = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    whole = codes.size // per * per
    packed = np.zeros(-(-codes.size // per), np.uint8)
    groups = codes[:whole].reshape(-1, per)
    tail = codes[whole:]
    for k in range(per):
        packed[:groups.shape[0]] |= (groups[:, k] & ((1 << width) - 1)) << (k * width)
        if k < tail.size:
            packed[-1] |= (tail[k] & ((1 << width) - 1)) << (k * width)
    return packed


def unpack_low_bits(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """The ``count`` bytes :func:`pack_low_bits` packed (uint8, each its
    value's low ``width`` bits)."""
    per = 8 // width
    out = np.empty((packed.size, per), np.uint8)
    for k in range(per):
        np.bitwise_and(packed >> (k * width), (1 << width) - 1, out=out[:, k])
    return out.reshape(-1)[:count]


def inflate_planes(data, dtype, count: int, pieces: Pieces | None = None) -> np.ndarray:
    """The ``count`` values of ``dtype`` :func:`deflate_planes` stored in
    ``data``; ValueError unless it inflates to exactly that many (never more
    is inflated). Inflated a piece at a time straight into the values' bytes,
    the input fed a piece at a time (zlib copies what a call leaves unread:
    fed whole, restoring a 512 MB leaf took 24 s where inflating it whole
    took 4: review): a raw leaf of 320 MB peaked at ~3.3x its size inflated
    whole, then transposed (found by review). ``pieces``: where the planes'
    pieces start (:func:`deflate_planes_in_pieces`), inflated at once."""
    dtype = np.dtype(dtype)
    values = np.empty((count, dtype.itemsize), np.uint8)
    stream = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else \
        memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    if pieces is not None:
        _inflate_pieces(stream, values, pieces)
    else:
        _inflate_whole(stream, values)
    return values.view(dtype).reshape(count)


def _inflate_whole(stream: memoryview, values: np.ndarray) -> None:
    """inflate_planes' one zlib stream, inflated into ``values``' bytes."""
    size = values.size
    inflater = zlib.decompressobj()
    fed, pending, done = 0, b"", 0
    while not inflater.eof:
        if not pending:
            if fed == len(stream):
                break   # the input ended before the stream did
            pending, fed = stream[fed:fed + INFLATE_PIECE], min(fed + INFLATE_PIECE, len(stream))
        try:
            piece = inflater.decompress(pending, min(INFLATE_PIECE, size - done + 1))
        except zlib.error as e:
            raise ValueError(f"does not inflate ({e})") from None
        pending = inflater.unconsumed_tail
        if done + len(piece) > size:
            raise ValueError("inflates to the wrong size")
        _fill_planes(values, done, np.frombuffer(piece, np.uint8))
        done += len(piece)
    if done != size or not inflater.eof or inflater.unused_data or fed != len(stream):
        raise ValueError("inflates to the wrong size")


# Pieces are deflated and inflated on it (the run coder, zlib and the
# inflater let go of the interpreter); its tasks never wait on it.
_PIECES_POOL = threads.SharedPool(threads.cores, "jaxjpeg-pieces")


def _at_once(task, count: int) -> list:
    """[task(k) for k in range(count)], on _PIECES_POOL where there are
    pieces and cores for it."""
    if count > 1 and threads.cores() > 1:
        return list(_PIECES_POOL.get().map(task, range(count)))
    return [task(k) for k in range(count)]


def _inflate_pieces(stream: memoryview, values: np.ndarray, pieces: Pieces) -> None:
    """inflate_planes' stream of planes in ``pieces``, every piece inflated
    on its own (at once where there are cores for it), its Adler-32 combined
    into the stream's and checked."""
    count, planes = values.shape
    per_plane = -(-count // pieces.bytes)
    starts, end = pieces.starts, len(stream) - _ADLER32_BYTES
    if len(starts) != per_plane * planes:
        raise ValueError(f"holds {len(starts)} pieces, expected {per_plane * planes}")
    if (len(stream) < len(_ZLIB_HEADER) + _ADLER32_BYTES or stream[0] & 0x0F != 8
            or stream[1] & 0x20 or (stream[0] << 8 | stream[1]) % 31
            or starts[0] != len(_ZLIB_HEADER) or starts[-1] >= end):
        raise ValueError("does not inflate (a bad header or piece start)")
    bounds = list(zip(starts, [*starts[1:], end]))

    def rows(k: int) -> range:   # the rows of values piece k fills
        first = k % per_plane * pieces.bytes
        return range(first, min(count, first + pieces.bytes))

    def inflate(k: int) -> int:
        # jaxjpeg's own inflater (xla_ops/inflate.h; 1.3-1.7x zlib's speed
        # on the planes' runs and literals): the piece must end where the
        # next starts, on a byte boundary past a block that is not final, or
        # with the final block (found by review: zlib's streaming inflate
        # took a piece cut inside a block, which a reader of the whole
        # stream refuses).
        # It returns the piece's Adler-32. One-byte values take the piece in
        # place; wider ones through a buffer of the piece's size, written
        # out a value apart in the pass that sums it (xla_ops/adler32.h).
        into = values[rows(k).start:rows(k).stop, k // per_plane]
        return _native.inflate_piece_into(stream[slice(*bounds[k])], into, k == len(bounds) - 1)

    checksums = _at_once(inflate, len(bounds))
    checksum = zlib.adler32(b"")
    for k, piece_checksum in enumerate(checksums):
        checksum = adler32_combine(checksum, piece_checksum, len(rows(k)))
    if checksum != int.from_bytes(stream[end:], "big"):
        raise ValueError("does not inflate (a bad checksum)")


_ADLER_BASE = 65521


def adler32_combine(first: int, second: int, second_size: int) -> int:
    """The Adler-32 of two byte strings one after the other, from the
    Adler-32 of each and the second's length (zlib's adler32_combine, which
    Python lacks)."""
    rem = second_size % _ADLER_BASE
    low = ((first & 0xFFFF) + (second & 0xFFFF) - 1) % _ADLER_BASE
    high = ((first >> 16) + (second >> 16) + rem * (first & 0xFFFF) - rem) % _ADLER_BASE
    return low | high << 16


# Bytes inflated at a time, and bytes of the stream fed at a time (each
# costs ~3x that while it lands).
INFLATE_PIECE = 1 << 20


def _fill_planes(values: np.ndarray, start: int, piece: np.ndarray) -> None:
    """Writes ``piece``, bytes ``start``... of the planes (every value's first
    byte, then every second byte, ...), into ``values`` (count x itemsize)."""
    count = values.shape[0]
    while piece.size:
        plane, at = divmod(start, count)
        take = min(piece.size, count - at)
        values[at:at + take, plane] = piece[:take]
        piece, start = piece[take:], start + take


def pack_interval_index(starts: Sequence[np.ndarray]) -> tuple[str | None, bytes | np.ndarray]:
    """(record value, blob) of every tile's interval starts, in tile order.

    Each tile's first start, then the differences of consecutive starts, as
    uint16 when all of them fit (an interval at the default 32 blocks is about a
    kilobyte), deflated: 1/5 of uint32 offsets, which were 1.6% of a
    CNN's file at 8x. Else the offsets themselves as uint32 (record value None)."""
    deltas = np.concatenate([np.diff(s, prepend=0) for s in starts])
    if deltas.size and deltas.max() <= np.iinfo(np.uint16).max and deltas.min() >= 0:
        return DELTA_INDEX, deflate_planes(deltas.astype("<u2"))
    return None, np.concatenate(starts).astype(np.uint32)


def unpack_interval_index(data, encoding: str | None, counts: Sequence[int]) -> list[np.ndarray]:
    """Every tile's interval starts (int64, ``counts[k]`` values for tile k,
    at least 2: its intervals' starts and its end) from an index blob;
    ValueError when it does not hold that many."""
    if any(c < 2 for c in counts):
        raise ValueError("interval index has the wrong size")
    if encoding == DELTA_INDEX:
        try:
            values = inflate_planes(data, "<u2", sum(counts)).astype(np.int64)
        except ValueError as e:
            raise ValueError(f"interval index {e}") from None
    elif len(data) % 4 or len(data) // 4 != sum(counts):
        raise ValueError("interval index has the wrong size")
    else:
        values = np.frombuffer(data, np.uint32).astype(np.int64)
    pieces = np.split(values, np.cumsum(counts)[:-1])
    return [np.cumsum(p) for p in pieces] if encoding == DELTA_INDEX else pieces


def pack_affine(affine: np.ndarray) -> tuple[str | None, bytes | np.ndarray]:
    """(record "affine_layout", blob) of a leaf's [2, rows] or [2, 1] maps.

    Maps whose rows share one scale (every map the "common" clip makes) keep
    it once and their offsets as deflated planes: 0.2x of [2, rows] float16
    on EfficientNet-lite1, 3% of its file at 8x. Other maps of several rows
    are deflated whole where that is smaller (a stacked leaf's per-layer
    scales: 98 kB of float32 maps became 2.3 kB)."""
    if affine.shape[1] <= 1:
        return None, affine
    little = affine.astype(affine.dtype.newbyteorder("<"))
    if np.all(affine[0] == affine[0, 0]):
        return SHARED_SCALE, deflate_planes(np.concatenate([little[0, :1], little[1]]))
    packed = deflate_planes(little.reshape(-1))
    return (DEFLATED_MAPS, packed) if len(packed) < affine.nbytes else (None, affine)


def unpack_affine(data, layout_name: str | None, dtype, rows: int) -> np.ndarray:
    """[2, rows] float32 scale and offset from an affine blob; ValueError when
    its size does not fit ``rows``."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if layout_name == SHARED_SCALE:
        try:
            values = inflate_planes(data, dtype, rows + 1).astype(np.float32)
        except ValueError as e:
            raise ValueError(f"affine map {e}") from None
        return np.stack([np.full(rows, values[0], np.float32), values[1:]])
    if layout_name == DEFLATED_MAPS:
        try:
            return inflate_planes(data, dtype, 2 * rows).astype(np.float32).reshape(2, rows)
        except ValueError as e:
            raise ValueError(f"affine map {e}") from None
    stored, extra = divmod(len(data), 2 * dtype.itemsize)
    if extra or stored not in (rows, 1):
        raise ValueError("affine map has the wrong size")
    affine = np.frombuffer(data, dtype).reshape(2, stored).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(affine, (2, rows)))


def affine_blob(index: int) -> str:
    """A JPEG-coded leaf's per-row scale and offset (``[2, rows]``, or ``[2, 1]``
    when every row shares one map)."""
    return f"leaf{index}/affine"


def col_scale_blob(index: int) -> str:
    """A JPEG-coded leaf's per-column scales (``[cols]``), when it has them."""
    return f"leaf{index}/col_scale"


def outliers_blob(index: int) -> str:
    """A JPEG-coded leaf's side list: positions, then the values kept exactly."""
    return f"leaf{index}/outliers"


def leaf_blobs(index: int, kind: str, num_tiles: int = 0, *, col_scale: bool = False,
               outliers: bool = False) -> list[str]:
    """Every blob a leaf owns, tiles first."""
    if kind == "raw":
        return [raw_blob(index)]
    return ([tile_blob(index, k) for k in range(num_tiles)]
            + [intervals_blob(index), affine_blob(index)]
            + ([col_scale_blob(index)] if col_scale else [])
            + ([outliers_blob(index)] if outliers else []))


def intervals_per_tile(height: int, width: int, restart_interval: int) -> int:
    """Restart intervals of a ``height x width`` tile (0: one interval per tile)."""
    blocks = -(-height // 8) * -(-width // 8)
    return -(-blocks // restart_interval) if restart_interval else 1


def tiling_problem(matrix_shape: tuple[int, int], tiles, restart_interval: int) -> str | None:
    """Why tiles ``(row0, col0, height, width, intervals)`` do not cover a
    ``matrix_shape`` view exactly once, each with the restart intervals its
    size needs, or None. A decode writes only what the tiles' intervals
    cover: a gap or an overlap would leave part of the output unwritten
    (uninitialized memory)."""
    rows, cols = matrix_shape
    if not tiles:
        return "no tiles"
    area = 0
    for row0, col0, height, width, intervals in tiles:
        if not (0 <= row0 and 0 <= col0 and 1 <= height <= 65535 and 1 <= width <= 65535
                and row0 + height <= rows and col0 + width <= cols):
            return "tile outside the tensor"
        needed = intervals_per_tile(height, width, restart_interval)
        if intervals != needed:
            return (f"tile at ({row0}, {col0}) records {intervals} restart intervals, its size "
                    f"needs {needed}")
        area += height * width
    if area != rows * cols:
        return "tiles do not cover the tensor"
    disjoint = _tiles_disjoint(tiles)
    if disjoint is None:   # (found by review: said as a gap)
        return "tiles are laid out too irregularly to check (not a grid of tiles)"
    # Equal area alone is not enough: overlapping tiles leave a gap elsewhere.
    return None if disjoint else "tiles do not cover the tensor"


def _tiles_disjoint(tiles) -> bool | None:
    """Whether in-bounds tiles overlap nowhere, on the grid compressed to their
    edges; None where that grid is too large to check.

    The writer's tiles form a grid (one compressed cell per tile); a layout
    needing many more cells than tiles is refused, which bounds the memory.
    """
    t = np.array(tiles, np.int64)[:, :4]
    row_edges = np.unique(np.concatenate([t[:, 0], t[:, 0] + t[:, 2]]))
    col_edges = np.unique(np.concatenate([t[:, 1], t[:, 1] + t[:, 3]]))
    if (len(row_edges) - 1) * (len(col_edges) - 1) > 4 * len(t) + 64:
        return None
    r0, r1 = np.searchsorted(row_edges, t[:, 0]), np.searchsorted(row_edges, t[:, 0] + t[:, 2])
    c0, c1 = np.searchsorted(col_edges, t[:, 1]), np.searchsorted(col_edges, t[:, 1] + t[:, 3])
    diff = np.zeros((len(row_edges), len(col_edges)), np.int64)  # 2-D difference array
    np.add.at(diff, (r0, c0), 1)
    np.add.at(diff, (r0, c1), -1)
    np.add.at(diff, (r1, c0), -1)
    np.add.at(diff, (r1, c1), 1)
    return bool(np.all(diff.cumsum(0).cumsum(1)[:-1, :-1] <= 1))


# ---------------------------------------------------------------- leaf paths


def path_size_problem(records: Sequence[Sequence]) -> str | None:
    """Why a path is too deep or too long to store, or None."""
    if len(records) > MAX_PATH_DEPTH:
        return f"{len(records)} keys deep (at most {MAX_PATH_DEPTH})"
    length = sum(len(str(value)) + 1 for _, value in records)
    if length > MAX_PATH_CHARS + 1:
        return f"{length - 1} characters long (at most {MAX_PATH_CHARS})"
    for _, value in records:   # found by review: refused only when the header was written
        if isinstance(value, str) and not _encodable(value):
            return "not text UTF-8 can encode (a lone UTF-16 surrogate)"
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Node:
    __slots__ = ("children", "kind", "leaf", "keys", "key_types")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        self.kind = None   # the record kind of the keys ending here (None: a part of a key)
        self.leaf = False
        self.keys: dict = {}   # (kind, key as a Python dict sees it) -> its string, below here
        self.key_types: set = set()   # "int" / "str" of the dict keys below here


def _python_key_clash(parent: _Node, kind: str, key) -> bool:
    """Keys a nested restore cannot keep apart under one parent (found by
    review: ``True`` and ``1`` are one Python dict key, so one leaf of a
    file vanished on restore), or that jax cannot sort (int and str dict
    keys together, which no save writes: jax cannot flatten such a dict)."""
    python_key = int(key) if isinstance(key, bool) else key
    spelled = parent.keys.setdefault((kind, python_key), str(key))
    if spelled != str(key):
        return True
    # Whatever their kinds (a "flat" -1 beside "key" "b", found by review),
    # siblings nest into one dict or list: their keys all str or all int.
    parent.key_types.add("str" if isinstance(key, str) else "int")
    return len(parent.key_types) > 1


def path_clash(paths: Iterable[Sequence[Sequence]]) -> str | None:
    """The first leaf path breaking the uniqueness rule, or None.

    Leaves are found by their slash-joined paths (targets and ``paths=``
    patterns match those) and come back nested (restore without target), so:
    no joined path repeats or continues another past a ``/``
    (``{"a/b": x}`` and ``{"a": {"b": y}}`` collide), the empty path stands
    alone, and keys spelled alike under one parent are of one kind
    (``["key", 0]`` and ``["index", 0]`` would nest into one slot).

    Linear in the total length of the paths: one walk of a trie whose edges
    are the ``/``-separated parts.
    """
    root = _Node()
    for records in paths:
        node = root
        for kind, key in records:
            if _python_key_clash(node, kind, key):
                return path_string(records)
            parts = str(key).split("/")
            for i, part in enumerate(parts):
                if node.leaf:
                    return path_string(records)
                node = node.children.setdefault(part, _Node())
            if node.kind is not None and node.kind != kind:
                return path_string(records)
            node.kind = kind
        if node.leaf or node.children:
            return path_string(records)
        node.leaf = True
    return None


# ---------------------------------------------------------------- user metadata

# The checkpoint metadata key holding what save(..., metadata=) stored.
USER_METADATA_KEY = "user"
# Caps on user metadata: it lives in the header, which every open reads and
# parses whole, so it stays small (safetensors' __metadata__ is a few kB).
MAX_USER_METADATA_BYTES = 1 << 20   # of canonical JSON
MAX_USER_METADATA_DEPTH = 32        # nested lists and dicts


def checked_user_metadata(metadata) -> dict:
    """``metadata`` (a dict with str keys and JSON values, or None) as stored:
    a JSON round trip of it (tuples become lists). TypeError for a value JSON
    cannot hold as is, ValueError for non-finite floats, too deep nesting or
    more than MAX_USER_METADATA_BYTES."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    _check_json_value(metadata, "metadata", 0)
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:   # a lone surrogate (found by review: a bare codec error)
        raise ValueError(f"metadata: {text[e.start:e.end]!r} in {text[max(0, e.start - 40):e.end]!r} "
                         "cannot be stored (not UTF-8: a lone surrogate)") from None
    if size > MAX_USER_METADATA_BYTES:
        raise Unstorable(f"metadata takes {size} bytes of JSON, more than the "
                         f"{MAX_USER_METADATA_BYTES} allowed (it is read whole on every open; "
                         "store large data as a leaf)")
    return json.loads(text)


def _check_json_value(value, where: str, depth: int) -> None:
    if depth > MAX_USER_METADATA_DEPTH:
        raise ValueError(f"{where}: nested more than {MAX_USER_METADATA_DEPTH} levels deep")
    if value is None or type(value) in (bool, int, str):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not finite (JSON holds finite numbers only)")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where}: key {key!r:.80} is a {type(key).__name__}; "
                                "metadata keys must be str")
            _check_json_value(item, f"{where}[{key!r:.80}]", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]", depth + 1)
        return
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON (use str, int, float, bool, "
                    "None, lists and dicts; e.g. .item() or .tolist() for numpy values)")
