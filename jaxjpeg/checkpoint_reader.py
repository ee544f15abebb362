"""Reading checkpoint files: the metadata schema, validated, and blobs on demand.

Nothing in the file is trusted: every leaf record, tile layout, index and
blob size is checked before use (see docs/format.md).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxjpeg import (_native, format as fmt, layout, prng_keys, quantized_slices,
                     quantized_vectors, storage)
from jaxjpeg.dtypes import ML_DTYPE_NAMES, numpy_dtype, packed_nbytes, value_bits
from jaxjpeg.treepaths import path_string
from jaxjpeg.views import MatrixView, Outliers

CHECKPOINT_FORMAT = "jaxjpeg-checkpoint"
# Version 2 added the view, column scales and the side list of kept values;
# version 1 files (framework-order views, rows only) read as they always did.
# Version 3 (written only by files that hold one) added tied leaves.
CHECKPOINT_VERSION = 2
TIED_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# A leaf whose values are an earlier leaf's (tied weights): stored once, its
# record names that leaf (``tied_to``) and holds no blobs.
TIED = "tied"
JPEG_DTYPES = ("float32", "bfloat16", "float16", "float64")

@dataclasses.dataclass(frozen=True)
class SavedLeaf:
    """One leaf as the file describes it (validated)."""

    index: int
    records: list
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str
    bits: int = 0
    restart_interval: int = 0
    tiles: tuple[tuple[int, int, int, int, int], ...] = ()
    affine_dtype: np.dtype = np.dtype(np.float32)
    interval_encoding: str | None = None     # None: uint32 offsets
    affine_layout: str | None = None         # None: [2, rows] or [2, 1]
    view: MatrixView | None = None
    col_scale_dtype: np.dtype | None = None  # None: no column scales
    outliers: int = 0                         # values kept exactly
    stored_dtype: np.dtype | None = None      # raw leaves: the blob's dtype (None: the leaf's)
    deflated: bool = False                    # raw float16 leaves: as deflated byte planes
    pieces: layout.Pieces | None = None       # where a deflated leaf's plane pieces start
    packed_bits: int = 0                      # raw sub-byte leaves: bits a value (layout.PACKED)
    quantized: dict | None = None             # raw leaves on a step: quantized_vectors' fields
    prng_impl: str | None = None              # raw uint32 leaves: key data of typed PRNG keys
    square_of: int | None = None              # a centered second moment: its first's index
    exact: bool = False                       # restores bit for bit (layout.stored_exactly)
    tied_to: int | None = None                # a tied leaf: the leaf whose blobs it reads

    @property
    def blob_index(self) -> int:
        """The index its blobs are named by: its own, or a tied leaf's first's."""
        return self.index if self.tied_to is None else self.tied_to

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.view or MatrixView.default(len(self.shape))).matrix_shape(self.shape)


def parse_dtype(name: str) -> np.dtype:
    """A leaf's dtype from its recorded name: numeric, bool or an ml_dtypes
    float, in native byte order (the writer stores every leaf native)."""
    if name in ML_DTYPE_NAMES:
        return numpy_dtype(name)
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise fmt.FormatError(f"unknown dtype {name!r}") from None
    if dtype.kind not in "biufc":
        raise fmt.FormatError(f"unsupported dtype {name!r}")
    if not dtype.isnative:
        raise fmt.FormatError(f"dtype {name!r} is not in native byte order")
    if dtype.itemsize > (16 if dtype.kind == "c" else 8):
        # long double: no jax array holds it, and its bytes differ by platform
        raise fmt.FormatError(f"unsupported dtype {name!r}")
    return dtype


_PATH_KINDS = {"key": (int, str, bool), "attr": (str,), "index": (int,), "flat": (int,)}


def _check_path_records(index: int, records) -> None:
    """Paths are lists of [kind, key] pairs as key_record writes them, within
    the writer's depth and length caps."""
    if not isinstance(records, list) or not all(
            isinstance(r, list) and len(r) == 2 and r[0] in _PATH_KINDS
            and type(r[1]) in _PATH_KINDS[r[0]] for r in records):
        raise fmt.FormatError(f"leaf {index}: malformed path {records!r:.200}")
    problem = layout.path_size_problem(records)
    if problem:
        raise fmt.FormatError(f"leaf {index}: path is {problem}")


MAX_NDIM = 64   # numpy's limit: no save writes more


def _whole(value) -> int:
    """A record's whole number; TypeError for anything else (512.5 was read
    as 512, true as 1; found by review)."""
    if type(value) is not int:
        raise TypeError(f"{value!r:.40} is not a whole number")
    return value


# Half-precision dtypes a quantized leaf may have besides float32 (restored
# through float32): a sparse leaf's, and since session 29 a byte target's
# BatchNorm vectors and small kernels, optimizer moments and thin leaves.
QUANTIZED_HALF_DTYPES = ("bfloat16", "float16")


def quantizable(dtype) -> bool:
    """Whether a leaf of ``dtype`` may be stored quantized on a step (``stored:
    "quantized"``): float32, or half precision restored through float32
    (since session 29: a bfloat16 (3, 8192) leaf was JPEG-coded as padding,
    11.8 bits a weight where float32 takes 4.3)."""
    return str(np.dtype(dtype)) in ("float32", *QUANTIZED_HALF_DTYPES)


def _key_leaf(leaf: SavedLeaf, record: dict) -> SavedLeaf:
    """A typed PRNG key array's data: raw uint32 with at least one axis (the
    implementation's name is checked when the key is wrapped, where a
    process may have registered its own)."""
    impl = record[prng_keys.FIELD]
    if (not prng_keys.is_data(impl, leaf.shape, leaf.dtype) or leaf.kind != "raw"
            or "stored" in record):
        raise fmt.FormatError(f"leaf {leaf.index}: bad PRNG key record ({impl!r:.40} for "
                              f"{leaf.kind} {leaf.dtype}{list(leaf.shape)})")
    return dataclasses.replace(leaf, prng_impl=impl)


# A centered second moment (jaxjpeg.magnitudes.encode_centered): its variance
# on log2 steps, restored plus the square of the leaf ``square_of`` names.
STORED_ABOVE_SQUARE = "quantized_above_square"


def _centered_leaf(leaf: SavedLeaf, record: dict) -> SavedLeaf:
    square_of = record.get("square_of")
    if (leaf.dtype != np.float32 or not leaf.shape or type(square_of) is not int
            or record.get("domain") != quantized_vectors.LOG2):
        raise fmt.FormatError(f"leaf {leaf.index}: bad centered moment record "
                              f"(square_of {square_of!r:.40}, {leaf.dtype})")
    try:
        fields = quantized_vectors.check_record(record, f"leaf {leaf.index}")
    except ValueError as e:
        raise fmt.FormatError(str(e)) from None
    return dataclasses.replace(leaf, quantized=fields, square_of=square_of)


def _sliced_leaf(leaf: SavedLeaf, record: dict) -> SavedLeaf:
    """A leaf quantized per slice or in groups (jaxjpeg.quantized_slices):
    its codes' fields, the axis its steps run along and its group size."""
    if not quantizable(leaf.dtype):
        raise fmt.FormatError(f"leaf {leaf.index}: a {leaf.dtype} leaf cannot be stored as "
                              f"{record.get('stored')!r}")
    try:
        fields = quantized_slices.check_record(record, leaf.shape, f"leaf {leaf.index}")
    except ValueError as e:
        raise fmt.FormatError(str(e)) from None
    return dataclasses.replace(leaf, quantized=fields)


def _check_squares_of(leaves: list[SavedLeaf]) -> None:
    """A centered moment's first moment is another leaf of its shape, a
    float32 raw one that is not itself centered (no chains, no loops)."""
    for leaf in leaves:
        if leaf.square_of is None:
            continue
        first = leaves[leaf.square_of] if 0 <= leaf.square_of < len(leaves) else None
        if (first is None or first.index == leaf.index or first.shape != leaf.shape
                or first.kind != "raw" or first.dtype != np.float32
                or first.square_of is not None or first.prng_impl is not None):
            raise fmt.FormatError(f"leaf {leaf.index}: its first moment, leaf "
                                  f"{leaf.square_of}, is not a float32 raw leaf of its shape")


def _parse_leaf(index: int, record: dict, file_size: int,
                parsed: list[SavedLeaf]) -> SavedLeaf:
    """Leaf ``index`` of its ``record``, the leaves before it ``parsed``."""
    try:
        _check_path_records(index, record["path"])
        if not isinstance(record["shape"], list) or any(type(d) is not int
                                                         for d in record["shape"]):
            raise fmt.FormatError(f"leaf {index}: malformed shape {record['shape']!r:.100} "
                                  "(not a list of whole numbers)")   # 16.7 was read as 16
        shape = tuple(record["shape"])
        if len(shape) > MAX_NDIM:   # found by review: 71 axes failed deep in numpy
            raise fmt.FormatError(f"leaf {index}: {len(shape)} axes (at most {MAX_NDIM})")
        # A JPEG block takes at least 2 bits (a DC code and an EOB): no file
        # holds more than 256 weights per byte, whatever the shape claims.
        # The other sides of an empty leaf bounded too: a zero next to 2**70
        # made the product 0 and numpy fail later with its own errors (found
        # by review); numpy takes at most 2**62 elements.
        # A sparse quantized leaf's bitmap is deflated: at most 8 values a
        # bit and zlib's 1032 bytes a byte.
        # Deflated raw values, zlib's 1032 bytes a byte at most (packed: up to
        # 4 values a byte).
        # A tied leaf's shape is its first's (checked below), bounded so.
        per_byte = (8 * 1032 if record.get("kind") == "raw"
                    and record.get("stored") in ("quantized", *quantized_slices.STORED_NAMES)
                    and "nonzeros" in record
                    else 1032 * 4 if record.get("kind") == "raw" and record.get("deflated") is True
                    and record.get("stored") == layout.PACKED   # int2: 4 values a byte
                    else 1032 if record.get("kind") == "raw" and record.get("deflated") is True
                    else math.inf if record.get("kind") == TIED
                    else 256)
        if (any(d < 0 for d in shape) or math.prod(shape) > file_size * per_byte + 2**20
                or math.prod(d for d in shape if d) >= 2**62):
            raise fmt.FormatError(f"leaf {index}: implausible shape {shape}")
        leaf = SavedLeaf(index, record["path"], path_string(record["path"]), shape,
                         parse_dtype(record["dtype"]), record["kind"],
                         exact=layout.stored_exactly(record))
        if leaf.kind == TIED:
            return _tied_leaf(leaf, record, parsed)
        if prng_keys.FIELD in record:
            return _key_leaf(leaf, record)
        if leaf.kind == "raw":
            stored = record.get("stored")
            if stored is None:   # its own dtype; deflated byte planes since session 31
                return dataclasses.replace(leaf, **_deflated_fields(record, index))
            # any shape, 0-d too (found by review: a scalar a policy sent to a byte
            # target was written so, and the file was refused)
            if stored == "quantized" and quantizable(leaf.dtype):
                try:
                    fields = quantized_vectors.check_record(record, f"leaf {index}")
                except ValueError as e:
                    raise fmt.FormatError(str(e)) from None
                return dataclasses.replace(leaf, quantized=fields)
            if stored == layout.PACKED and value_bits(leaf.dtype) < 8:
                return dataclasses.replace(leaf, packed_bits=value_bits(leaf.dtype),
                                           **_deflated_fields(record, index))
            if stored == STORED_ABOVE_SQUARE:
                return _centered_leaf(leaf, record)
            if stored in quantized_slices.STORED_NAMES:
                return _sliced_leaf(leaf, record)
            if stored != "float16" or leaf.dtype != np.float32:
                raise fmt.FormatError(f"leaf {index}: a {leaf.dtype} leaf cannot be stored as "
                                      f"{stored!r:.40}")
            return dataclasses.replace(leaf, stored_dtype=np.dtype(np.float16),
                                       **_deflated_fields(record, index))
        if leaf.kind != "jpeg" or str(leaf.dtype) not in JPEG_DTYPES:
            raise fmt.FormatError(f"leaf {index}: bad kind {leaf.kind!r} for {leaf.dtype}")
        tiles = tuple(tuple(_whole(v) for v in t) for t in record["tiles"])
        if not tiles or any(len(t) != 5 for t in tiles):
            raise fmt.FormatError(f"leaf {index}: bad tile records")
        if type(record["bits"]) is not int or record["bits"] not in (8, 12):
            raise fmt.FormatError(f"leaf {index}: bad sample precision {record['bits']!r:.40} "
                                  "(8 or 12 bits)")
        restart_interval = _whole(record["restart_interval"])
        if not 0 <= restart_interval <= 65535:
            raise fmt.FormatError(f"leaf {index}: bad restart interval {restart_interval}")
        affine = record.get("affine", "float32")
        col_scale = record.get("col_scale")
        if affine not in ("float32", "float16") or col_scale not in (None, "float32", "float16"):
            raise fmt.FormatError(f"leaf {index}: bad affine or column scale dtype")
        view = (MatrixView.from_record(record["view"], len(shape)) if "view" in record
                else MatrixView.default(len(shape)))
        outliers = record.get("outliers", 0)
        if type(outliers) is not int or not 0 <= outliers <= math.prod(shape):
            raise fmt.FormatError(f"leaf {index}: bad outlier count {outliers!r:.40}")
        intervals = record.get("intervals")
        if intervals not in (None, layout.DELTA_INDEX):
            raise fmt.FormatError(f"leaf {index}: bad interval index encoding {intervals!r:.40}")
        affine_layout = record.get("affine_layout")
        if affine_layout not in (None, *layout.AFFINE_LAYOUTS):
            raise fmt.FormatError(f"leaf {index}: bad affine layout {affine_layout!r:.40}")
        return dataclasses.replace(leaf, bits=int(record["bits"]), tiles=tiles,
                                   restart_interval=restart_interval,
                                   affine_dtype=np.dtype(affine), interval_encoding=intervals,
                                   affine_layout=affine_layout,
                                   view=view,
                                   col_scale_dtype=None if col_scale is None else np.dtype(col_scale),
                                   outliers=outliers)
    # OverflowError: a JSON number like 1e400 parses as inf, and int(inf) overflows.
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, fmt.FormatError):
            raise
        raise fmt.FormatError(f"leaf {index}: malformed record ({e})") from None


def _deflated_fields(record: dict, index: int) -> dict:
    """A raw record's ``deflated`` and ``pieces`` (layout.Pieces), checked."""
    deflated = record.get("deflated", False)
    if type(deflated) is not bool:
        raise fmt.FormatError(f"leaf {index}: bad 'deflated' {deflated!r:.40}")
    if "pieces" not in record:
        return {"deflated": deflated}
    try:
        pieces = layout.Pieces.from_record(record["pieces"])
    except ValueError as e:
        raise fmt.FormatError(f"leaf {index}: {e}") from None
    if not deflated:
        raise fmt.FormatError(f"leaf {index}: 'pieces' of a leaf not deflated")
    return {"deflated": True, "pieces": pieces}


def _tied_leaf(leaf: SavedLeaf, record: dict, parsed: list[SavedLeaf]) -> SavedLeaf:
    """A tied leaf: the earlier leaf it names, under its own index and path."""
    to = record.get("tied_to")
    if type(to) is not int or not 0 <= to < leaf.index:
        raise fmt.FormatError(f"leaf {leaf.index}: bad 'tied_to' {to!r:.40} (the index of an "
                              "earlier leaf)")
    first = parsed[to]
    if record.get(prng_keys.FIELD) != first.prng_impl:   # keys only as keys (review)
        raise fmt.FormatError(f"leaf {leaf.index}: tied to leaf {to}, whose PRNG key "
                              f"implementation ({first.prng_impl!r:.40}) is not its own "
                              f"({record.get(prng_keys.FIELD)!r:.40})")
    if (first.shape, first.dtype) != (leaf.shape, leaf.dtype):
        raise fmt.FormatError(f"leaf {leaf.index}: tied to leaf {to} of another shape or dtype "
                              f"({leaf.dtype}{list(leaf.shape)}, {first.dtype}{list(first.shape)})")
    return dataclasses.replace(first, index=leaf.index, records=leaf.records, path=leaf.path,
                               tied_to=first.blob_index)


def _check_tiles_cover(leaf: SavedLeaf) -> None:
    problem = layout.tiling_problem(leaf.matrix_shape, leaf.tiles, leaf.restart_interval)
    if problem is not None:
        raise fmt.FormatError(f"{leaf.path}: {problem}")


class Checkpoint:
    """An open checkpoint file: metadata validated, blobs read on demand."""

    def __init__(self, path, *, verify: bool = True):
        self.path = storage.as_location(path)
        self.verify = verify
        self.reader = fmt.ContainerReader(self.path)
        meta = self.reader.metadata
        if meta.get("format") != CHECKPOINT_FORMAT:
            self.reader.close()
            found = meta.get("format")   # named, as docs/format.md says (found by review)
            raise fmt.FormatError(f"{self.path}: not a jaxjpeg checkpoint (its container holds "
                                  f"format {str(found)[:100]!r}, not {CHECKPOINT_FORMAT!r})")
        version = meta.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:   # true == 1
            self.reader.close()
            raise fmt.FormatError(f"{self.path}: checkpoint version {meta.get('version')!r} is "
                                  f"not supported (this jaxjpeg reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))})")
        try:
            if not isinstance(meta.get("leaves"), list):
                raise fmt.FormatError(f"{self.path}: metadata 'leaves' must be a list")
            self.leaves = []
            for i, record in enumerate(meta["leaves"]):
                self.leaves.append(_parse_leaf(i, record, self.reader.file_size, self.leaves))
            for leaf in self.leaves:
                if leaf.kind == "jpeg":
                    _check_tiles_cover(leaf)
            _check_squares_of(self.leaves)
            self._check_blobs_and_paths()
            self.user_metadata = meta.get(layout.USER_METADATA_KEY, {})
            if not isinstance(self.user_metadata, dict):
                raise fmt.FormatError(f"{self.path}: user metadata must be a JSON object")
        except BaseException:
            self.reader.close()
            raise

    def _check_blobs_and_paths(self) -> None:
        """Every blob a leaf needs exists (else read_blob would raise KeyError), and no
        path repeats or is a prefix of another (restore without target nests them)."""
        names = set(self.reader.blob_names)
        for leaf in self.leaves:
            missing = [n for n in layout.leaf_blobs(leaf.blob_index, leaf.kind, len(leaf.tiles),
                                                    col_scale=leaf.col_scale_dtype is not None,
                                                    outliers=leaf.outliers > 0)
                       if n not in names]
            if missing:
                raise fmt.FormatError(f"{self.path}: {leaf.path}: missing blob {missing[0]!r}")
        clash = layout.path_clash(leaf.records for leaf in self.leaves)
        if clash is not None:
            raise fmt.FormatError(f"{self.path}: leaf path {clash[:200]!r} repeats or nests "
                                  "inside another")

    @property
    def remote(self) -> bool:
        """Whether the file is read from a store (a URL), not a local file."""
        return storage.local_path(self.path) is None

    def close(self):
        self.reader.close()

    def blob_names(self, leaf: SavedLeaf, tiles=None) -> list[str]:
        """The names of a leaf's blobs: all, or its maps and only the tiles ``tiles``."""
        names = layout.leaf_blobs(leaf.blob_index, leaf.kind, len(leaf.tiles),
                                  col_scale=leaf.col_scale_dtype is not None,
                                  outliers=leaf.outliers > 0)
        if tiles is None:
            return list(names)
        keep = {layout.tile_blob(leaf.blob_index, k) for k in tiles}
        every_tile = {layout.tile_blob(leaf.blob_index, k) for k in range(len(leaf.tiles))}
        return [n for n in names if n not in every_tile or n in keep]

    def _read(self, leaf: SavedLeaf, name: str, what: str, out=None):
        """Blob ``name`` of ``leaf`` (its ``what``); damage names the leaf
        (found by review: "blob 'leaf3/tile5.jpg' checksum mismatch" named
        no leaf a user knows)."""
        try:
            return self.reader.read_blob(name, verify=self.verify, out=out)
        except fmt.FormatError as e:
            raise fmt.FormatError(f"{leaf.path} {what}: {e}") from None

    def stored_bytes(self, leaf: SavedLeaf) -> int:
        return sum(self.reader.blob_info(n).length for n in self.blob_names(leaf))

    def prefetch(self, leaves, tiles=None, *, with_tiles: bool = True):
        """Reads the blobs of ``leaves`` (for one leaf, optionally only the tile
        ids ``tiles``; without ``with_tiles``, no tile) at once, in parallel;
        see ContainerReader.prefetch."""
        if not with_tiles:
            return self.reader.prefetch([n for leaf in leaves for n in self.blob_names(leaf, ())])
        if tiles is not None:
            (leaf,) = leaves
            return self.reader.prefetch(self.blob_names(leaf, tiles))
        return self.reader.prefetch([n for leaf in leaves for n in self.blob_names(leaf)])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_raw(self, leaf: SavedLeaf) -> np.ndarray:
        data = self._read(leaf, layout.raw_blob(leaf.blob_index), "its values")
        if leaf.quantized is not None:
            kept = None   # values kept aside: set once the coded ones are checked
            try:
                if "slice_axis" in leaf.quantized:
                    values = quantized_slices.restore(data, leaf.shape, leaf.quantized)
                else:
                    values, kept = quantized_vectors.decoded_parts(data, math.prod(leaf.shape),
                                                                   leaf.quantized)
            except ValueError as e:
                raise fmt.FormatError(f"{self.path}: {leaf.path} {e}") from None
            if leaf.square_of is not None:
                from jaxjpeg import magnitudes

                values = magnitudes.above_square(values, self.read_raw(self.leaves[leaf.square_of])
                                                 .reshape(-1))
            with np.errstate(over="ignore"):
                values = values.reshape(leaf.shape).astype(leaf.dtype, copy=False)
            if leaf.dtype != np.float32 and not np.all(np.isfinite(values)):
                # (found by review: a float16 leaf's steps past its range restored inf)
                raise fmt.FormatError(f"{self.path}: {leaf.path} restores values beyond "
                                      f"{leaf.dtype}'s range")
            if kept is not None:
                held = quantized_vectors.narrowed(kept[1], leaf.dtype)
                if held is None:
                    raise fmt.FormatError(f"{self.path}: {leaf.path} keeps values beyond "
                                          f"{leaf.dtype}'s own")
                values.reshape(-1)[kept[0]] = held
            return values
        if leaf.packed_bits:
            return self._unpacked(leaf, data)
        stored = leaf.stored_dtype or leaf.dtype
        if leaf.deflated:
            try:
                data = layout.inflate_planes(data, stored.newbyteorder("<"),
                                             math.prod(leaf.shape), leaf.pieces).view(np.uint8)
            except ValueError as e:
                raise fmt.FormatError(f"{self.path}: {leaf.path} {e}") from None
        expected = math.prod(leaf.shape) * stored.itemsize
        if len(data) != expected:
            raise fmt.FormatError(f"{self.path}: {leaf.path} holds {len(data)} bytes, "
                                  f"expected {expected}")
        if leaf.dtype == np.bool_ and np.any(np.frombuffer(data, np.uint8) > 1):
            # numpy would hold the byte as is: True-ish values unequal to True
            raise fmt.FormatError(f"{self.path}: {leaf.path} is bool but holds bytes other "
                                  "than 0 and 1")
        return np.frombuffer(data, stored).reshape(leaf.shape).astype(leaf.dtype, copy=False)

    def _unpacked(self, leaf: SavedLeaf, data) -> np.ndarray:
        """A sub-byte leaf's values from their packed bits (layout.PACKED)."""
        count = math.prod(leaf.shape)
        expected = packed_nbytes(count, leaf.dtype)
        try:
            packed = (layout.inflate_planes(data, np.uint8, expected, leaf.pieces) if leaf.deflated
                      else np.frombuffer(data, np.uint8))
        except ValueError as e:
            raise fmt.FormatError(f"{self.path}: {leaf.path} {e}") from None
        if packed.size != expected:
            raise fmt.FormatError(f"{self.path}: {leaf.path} holds {packed.size} packed bytes, "
                                  f"expected {expected}")
        return (layout.unpack_low_bits(packed, leaf.packed_bits, count).view(leaf.dtype)
                .reshape(leaf.shape))

    def read_col_scale(self, leaf: SavedLeaf) -> np.ndarray | None:
        """float32 [cols] column scales, or None for a leaf without them."""
        if leaf.col_scale_dtype is None:
            return None
        cols = leaf.matrix_shape[1]
        data = self._read(leaf, layout.col_scale_blob(leaf.blob_index), "its column scales")
        if len(data) != cols * leaf.col_scale_dtype.itemsize:
            raise fmt.FormatError(f"{self.path}: {leaf.path} column scales have the wrong size")
        return np.frombuffer(data, leaf.col_scale_dtype).astype(np.float32)

    def read_outliers(self, leaf: SavedLeaf) -> Outliers | None:
        """The values the leaf keeps exactly, or None."""
        if not leaf.outliers:
            return None
        data = self._read(leaf, layout.outliers_blob(leaf.blob_index), "its kept values")
        try:
            return Outliers.from_bytes(data, leaf.outliers, math.prod(leaf.shape), leaf.dtype)
        except ValueError as e:
            raise fmt.FormatError(f"{self.path}: {leaf.path}: {e}") from None

    def read_affine(self, leaf: SavedLeaf) -> tuple[np.ndarray, np.ndarray]:
        data = self._read(leaf, layout.affine_blob(leaf.blob_index), "its row maps")
        try:
            affine = layout.unpack_affine(data, leaf.affine_layout, leaf.affine_dtype,
                                          leaf.matrix_shape[0])
        except ValueError as e:
            raise fmt.FormatError(f"{self.path}: {leaf.path} {e}") from None
        return affine[0], affine[1]

    def check_maps(self, leaf: SavedLeaf, scale, offset, col_scale) -> None:
        """FormatError where a leaf's maps would restore a value that is not
        finite in float32: a writer keeps such values in the side list (found
        by review: a NaN scale or a scale of 3e38, checksums intact, restored
        rows of NaN and inf without a word, and verify passed)."""
        offset = offset.astype(np.float64)
        product = scale.astype(np.float64) * ((1 << leaf.bits) - 1)
        # a row's values lie between its two ends; the decoder forms the
        # sample's product before adding the offset, in float32 (review)
        top = float(np.max(np.abs([offset, offset + product, product]), initial=0.0))
        if col_scale is not None:
            top *= float(np.max(np.abs(col_scale.astype(np.float64)), initial=0.0))
        # (a margin for the decoder's float32 roundings: review found a row
        # ending exactly at float32's largest value decode to inf)
        if not top <= np.finfo(np.float32).max * (1 - 2.0 ** -20):   # NaN too
            raise fmt.FormatError(f"{self.path}: {leaf.path} has row maps or column scales "
                                  "that restore values beyond float32 (or not numbers)")

    def read_interval_index(self, leaf: SavedLeaf) -> list[np.ndarray]:
        """Per tile: interval starts (relative to the tile, n + 1 values)."""
        data = self._read(leaf, layout.intervals_blob(leaf.blob_index), "its interval index")
        counts = [t[4] + 1 for t in leaf.tiles]
        try:
            pieces = layout.unpack_interval_index(data, leaf.interval_encoding, counts)
        except ValueError as e:
            raise fmt.FormatError(f"{self.path}: {leaf.path} {e}") from None
        for k, piece in enumerate(pieces):
            size = self.tile_size(leaf, k)
            if np.any(np.diff(piece) < 0) or piece[0] < 0 or piece[-1] > size:
                raise fmt.FormatError(f"{self.path}: {leaf.path} tile {k} index out of range")
        return pieces

    def tile_size(self, leaf: SavedLeaf, k: int) -> int:
        return self.reader.blob_info(layout.tile_blob(leaf.blob_index, k)).length

    def read_tile(self, leaf: SavedLeaf, k: int) -> memoryview:
        """Tile ``k`` of a JPEG-coded leaf: a complete JPEG file's bytes."""
        return self._read(leaf, layout.tile_blob(leaf.blob_index, k), f"tile {k}")

    def tile_filler(self, leaf: SavedLeaf, k: int, interval_starts=None):
        """A ``fill(view)`` that reads tile ``k`` into ``view``; given the tile's
        interval index (:meth:`read_interval_index`), it also checks that every
        recorded start lands exactly where the tile's own restart markers put
        it (an index shifted by a few bytes decodes to other weights silently)."""
        name = layout.tile_blob(leaf.blob_index, k)

        def fill(view):
            self._read(leaf, name, f"tile {k}", out=view)
            if interval_starts is not None:
                self.check_interval_index(leaf, k, view, interval_starts)
        return fill

    def check_interval_index(self, leaf: SavedLeaf, k: int, data, interval_starts) -> None:
        """Raises FormatError unless ``interval_starts`` (tile ``k``'s index) is
        where the tile's restart markers are; a tile that does not parse
        raises JpegError."""
        if not _native.check_interval_starts(data, interval_starts):
            raise fmt.FormatError(f"{self.path}: {leaf.path} tile {k}: the interval index does "
                                  "not match the tile's restart markers")
