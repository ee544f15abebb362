"""Checkpoints of pytrees: save, restore, load and decode.

A checkpoint is one container file (:mod:`jaxjpeg.format`). Leaves worth
compressing are stored as JPEG tiles (each tile its own blob, a standalone
.jpg) with their restart-interval index and per-row affine map; the others
are stored losslessly in their own dtype. Restoring sends only compressed
bytes to the device and decodes them there with the custom call.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import ml_dtypes
import numpy as np

from jaxjpeg import codec, format as fmt, ops

CHECKPOINT_FORMAT = "jaxjpeg-checkpoint"
CHECKPOINT_VERSION = 1
# Default rate: uniform quantization of DCT coefficients with a step of this
# fraction of each tensor's RMS: ~8% relative RMS error and ~4 bits/weight
# (8x against float32) on Gaussian weights, whatever the tensor's tails.
DEFAULT_RELATIVE_STEP = 0.28
DEFAULT_TILE_SHAPE = (512, 512)   # small enough that 8-way row or column shards read no extra tiles
JPEG_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which leaves are JPEG-coded; the rest are stored losslessly.

    A leaf is coded when it is a float32/bfloat16/float16 array with at least
    ``min_ndim`` dimensions and ``min_size`` elements, unless its path (slash
    separated, e.g. ``params/Dense_0/kernel``) matches a ``lossless`` glob
    pattern; a path matching a ``compress`` pattern is coded whatever its size.
    """

    min_size: int = 4096
    min_ndim: int = 2
    lossless: tuple[str, ...] = ()
    compress: tuple[str, ...] = ()

    def should_compress(self, path: str, leaf: np.ndarray) -> bool:
        if str(leaf.dtype) not in JPEG_DTYPES or leaf.size == 0:
            return False
        if any(fnmatch.fnmatchcase(path, p) for p in self.lossless):
            return False
        if any(fnmatch.fnmatchcase(path, p) for p in self.compress):
            return True
        return leaf.ndim >= self.min_ndim and leaf.size >= self.min_size


# ---------------------------------------------------------------- paths


def _key_record(key) -> list:
    if isinstance(key, jax.tree_util.DictKey):
        return ["key", key.key if isinstance(key.key, (int, str)) else str(key.key)]
    if isinstance(key, jax.tree_util.SequenceKey):
        return ["index", key.idx]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return ["attr", key.name]
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return ["flat", key.key]
    return ["key", str(key)]


def path_string(records: Sequence[Sequence]) -> str:
    """The slash-separated form users match patterns against."""
    return "/".join(str(value) for _, value in records)


def _leaves_with_paths(tree) -> list[tuple[list, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [([_key_record(k) for k in path], leaf) for path, leaf in leaves]


def _nest(entries: list[tuple[list, Any]]):
    """Rebuilds nested dicts/lists from recorded paths (restore without target)."""
    if len(entries) == 1 and not entries[0][0]:
        return entries[0][1]
    root: dict = {}
    for records, value in entries:
        node = root
        for kind, key in records[:-1]:
            node = node.setdefault((kind, key), {})
        node[tuple(records[-1])] = value
    return _materialize(root)


def _materialize(node):
    if not isinstance(node, dict):
        return node
    if node and all(kind == "index" for kind, _ in node):
        return [_materialize(node[k]) for k in sorted(node, key=lambda k: k[1])]
    return {key: _materialize(value) for (_, key), value in node.items()}


# ---------------------------------------------------------------- save


@dataclasses.dataclass
class LeafReport:
    path: str
    shape: tuple[int, ...]
    dtype: str
    kind: str           # "jpeg" or "raw"
    raw_bytes: int
    stored_bytes: int


@dataclasses.dataclass
class SaveReport:
    path: str
    leaves: list[LeafReport]
    file_bytes: int

    @property
    def raw_bytes(self) -> int:
        return sum(leaf.raw_bytes for leaf in self.leaves)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(1, self.file_bytes)


def _progress(total: int, desc: str, enabled: bool | None):
    """A tqdm bar on interactive terminals of process 0, else a no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty() and jax.process_index() == 0
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        enabled = False
    if not enabled:
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


def _to_numpy(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError("saving arrays not fully addressable from this process is not supported; "
                         "gather them first (jax.experimental.multihost_utils)")
    return np.asarray(leaf)


def _write_jpeg_leaf(writer, index: int, enc: codec.EncodedTensor) -> tuple[dict, int]:
    tiles, starts = [], []
    stored = 0
    for k, tile in enumerate(enc.tiles):
        writer.add_blob(f"leaf{index}/tile{k}.jpg", tile.data)
        tiles.append([tile.row0, tile.col0, tile.height, tile.width, tile.num_intervals])
        starts.append(tile.interval_starts.astype(np.uint32))
        stored += len(tile.data)
    index_blob = np.concatenate(starts)
    affine = enc.affine()
    writer.add_blob(f"leaf{index}/intervals", index_blob)
    writer.add_blob(f"leaf{index}/affine", affine)
    stored += index_blob.nbytes + affine.nbytes
    record = {"kind": "jpeg", "bits": enc.bits, "tiles": tiles,
              "restart_interval": enc.tiles[0].restart_interval, "affine": affine.dtype.name}
    return record, stored


def _relative_step_encoder(relative_step, restart_interval, tile_shape):
    from jaxjpeg import rate

    if not 0 < relative_step < 16:
        raise ValueError(f"relative_step must be in (0, 16), got {relative_step}")

    def encode(_, array):
        x = np.asarray(array, np.float32)
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
        return rate.encode_at_step(x, relative_step * rms if rms > 0 else 1.0,
                                   restart_interval=restart_interval, tile_shape=tile_shape)
    return encode


def _error_bound_encoder(bound, restart_interval, tile_shape):
    from jaxjpeg import rate

    def encode(_, array):
        return rate.encode_for_error(array, bound, restart_interval=restart_interval,
                                     tile_shape=tile_shape)
    return encode


# Bytes the container adds per blob and per leaf beyond the coded data:
# alignment padding (32 on average) and the JSON header's records.
_BLOB_OVERHEAD = 32 + 80
_LEAF_OVERHEAD = 200


def _container_overhead(entries, coded, restart_interval, tile_shape) -> int:
    """Bytes of the file that do not depend on the steps chosen: preamble,
    header, padding and the restart-interval index of every coded tile."""
    overhead = fmt.PREAMBLE_SIZE + _LEAF_OVERHEAD * len(entries)
    for records, array in entries:
        if path_string(records) not in coded:
            overhead += _BLOB_OVERHEAD
            continue
        tiles = codec.tile_grid(*codec.matrix_shape(array.shape), tile_shape)
        overhead += _BLOB_OVERHEAD * (len(tiles) + 2)
        for _, _, h, w in tiles:
            blocks = -(-h // 8) * -(-w // 8)
            intervals = -(-blocks // restart_interval) if restart_interval else 1
            overhead += 4 * (intervals + 1)
    return overhead


def _target_encoder(entries, policy, ratio, nbytes, sensitivity, restart_interval, tile_shape):
    """Allocates the file's byte budget over the leaves that will be coded."""
    from jaxjpeg import rate

    coded = {path_string(r): a for r, a in entries if policy.should_compress(path_string(r), a)}
    kept = sum(a.nbytes for r, a in entries if path_string(r) not in coded)
    total = sum(a.nbytes for _, a in entries)
    overhead = _container_overhead(entries, coded, restart_interval, tile_shape)
    budget = (nbytes if nbytes is not None else int(total / ratio)) - kept - overhead
    if not coded:
        return lambda name, array: None
    if budget <= 0:
        raise ValueError(f"target size is below the {kept} bytes of leaves stored losslessly")
    allocation = rate.allocate_to_target(coded, budget, sensitivity=sensitivity,
                                         restart_interval=restart_interval, tile_shape=tile_shape)
    return lambda name, array: allocation.encodings[name]


def save(path, tree, *, relative_step: float | None = None, step: float | None = None,
         quality: int | None = None,
         qtable: Sequence[int] | None = None, error_bound: float | None = None,
         target_ratio: float | None = None, target_bytes: int | None = None,
         sensitivity: dict | None = None, bits: int = 8, clip: str = "common",
         restart_interval: int = codec.DEFAULT_RESTART_INTERVAL,
         tile_shape: tuple[int, int] = DEFAULT_TILE_SHAPE, policy: Policy | None = None,
         encoder: Callable[[str, np.ndarray], codec.EncodedTensor] | None = None,
         progress: bool | None = None) -> SaveReport:
    """Saves a pytree of arrays to ``path`` atomically.

    The rate is set by one of:

    * ``relative_step`` (the default, ``DEFAULT_RELATIVE_STEP``): uniform
      quantization of every DCT coefficient with a step of this fraction of
      the tensor's RMS (8 or 12-bit samples chosen per tensor);
    * ``step``: a flat quantization table, in sample units of ``bits``;
    * ``quality``: the standard JPEG table scaled to 1..100; ``qtable``: any
      64-entry table;
    * ``error_bound``: each leaf's relative RMS error at most this (the
      step is searched per leaf, 8 or 12-bit samples);
    * ``target_ratio`` / ``target_bytes``: the whole file's size, shared
      across leaves by marginal rate-distortion, weighted by ``sensitivity``
      (leaf path -> weight, e.g. from :func:`jaxjpeg.rate.sensitivity_from_gradients`);
    * ``encoder(path, array) -> EncodedTensor`` for full per-leaf control.

    The file appears at ``path`` only when complete: a
    crash mid-save leaves any previous checkpoint there intact.
    """
    policy = policy or Policy()
    entries = [(records, _to_numpy(leaf)) for records, leaf in _leaves_with_paths(tree)]
    rates_given = [v is not None for v in (relative_step, step, quality, qtable, error_bound,
                                           target_ratio, target_bytes, encoder)]
    if sum(rates_given) > 1:
        raise ValueError("give at most one rate control")
    if not any(rates_given):
        relative_step = DEFAULT_RELATIVE_STEP

    def table_encoder(_, array):
        return codec.encode_tensor(array, bits=bits, step=step, quality=quality, qtable=qtable,
                                   clip=clip, restart_interval=restart_interval,
                                   tile_shape=tile_shape)

    encode = encoder or table_encoder
    if relative_step is not None:
        encode = _relative_step_encoder(relative_step, restart_interval, tile_shape)
    if error_bound is not None:
        encode = _error_bound_encoder(error_bound, restart_interval, tile_shape)
    if target_ratio is not None or target_bytes is not None:
        encode = _target_encoder(entries, policy, target_ratio, target_bytes, sensitivity,
                                 restart_interval, tile_shape)
    bar = _progress(sum(a.nbytes for _, a in entries), "jaxjpeg save", progress)
    records_out, reports = [], []
    try:
        with fmt.ContainerWriter(os.fspath(path)) as writer:
            for index, (records, array) in enumerate(entries):
                name = path_string(records)
                record = {"path": records, "shape": list(array.shape), "dtype": str(array.dtype)}
                # Non-finite values (e.g. a -inf attention mask) cannot be JPEG-coded
                # (encode_tensor refuses them): store such leaves losslessly instead of
                # failing the whole save.
                if policy.should_compress(name, array) and np.all(np.isfinite(array)):
                    extra, stored = _write_jpeg_leaf(writer, index, encode(name, array))
                else:
                    writer.add_blob(f"leaf{index}/raw", np.ascontiguousarray(array))
                    extra, stored = {"kind": "raw"}, array.nbytes
                record.update(extra)
                records_out.append(record)
                reports.append(LeafReport(name, array.shape, str(array.dtype), record["kind"],
                                          array.nbytes, stored))
                bar.update(array.nbytes)
            writer.set_metadata({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                 "leaves": records_out})
    finally:
        bar.close()
    return SaveReport(os.fspath(path), reports, os.path.getsize(path))


# ---------------------------------------------------------------- reading


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


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise fmt.FormatError(f"unknown dtype {name!r}") from None
    if dtype.kind not in "biufc":
        raise fmt.FormatError(f"unsupported dtype {name!r}")
    return dtype


_PATH_KINDS = {"key": (int, str, bool), "attr": (str,), "index": (int,), "flat": (int,)}


def _check_path_records(index: int, records) -> None:
    """Paths are lists of [kind, key] pairs as _key_record writes them."""
    if not isinstance(records, list) or not all(
            isinstance(r, list) and len(r) == 2 and r[0] in _PATH_KINDS
            and type(r[1]) in _PATH_KINDS[r[0]] for r in records):
        raise fmt.FormatError(f"leaf {index}: malformed path {records!r:.200}")


def _intervals_per_tile(height: int, width: int, restart_interval: int) -> int:
    blocks = -(-height // 8) * -(-width // 8)
    return -(-blocks // restart_interval) if restart_interval else 1


def _parse_leaf(index: int, record: dict, file_size: int) -> SavedLeaf:
    try:
        _check_path_records(index, record["path"])
        shape = tuple(int(d) for d in record["shape"])
        if any(d < 0 for d in shape) or math.prod(shape) > file_size * 64 + 2**20:
            raise fmt.FormatError(f"leaf {index}: implausible shape {shape}")
        leaf = SavedLeaf(index, record["path"], path_string(record["path"]), shape,
                         _dtype(record["dtype"]), record["kind"])
        if leaf.kind == "raw":
            return leaf
        if leaf.kind != "jpeg" or str(leaf.dtype) not in JPEG_DTYPES:
            raise fmt.FormatError(f"leaf {index}: bad kind {leaf.kind!r} for {leaf.dtype}")
        tiles = tuple(tuple(int(v) for v in t) for t in record["tiles"])
        if not tiles or any(len(t) != 5 for t in tiles) or record["bits"] not in (8, 12):
            raise fmt.FormatError(f"leaf {index}: bad tile records")
        restart_interval = int(record["restart_interval"])
        if not 0 <= restart_interval <= 65535:
            raise fmt.FormatError(f"leaf {index}: bad restart interval {restart_interval}")
        affine = record.get("affine", "float32")
        if affine not in ("float32", "float16"):
            raise fmt.FormatError(f"leaf {index}: bad affine dtype {affine!r}")
        return dataclasses.replace(leaf, bits=int(record["bits"]), tiles=tiles,
                                   restart_interval=restart_interval,
                                   affine_dtype=np.dtype(affine))
    # OverflowError: a JSON number like 1e400 parses as inf, and int(inf) overflows.
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, fmt.FormatError):
            raise
        raise fmt.FormatError(f"leaf {index}: malformed record ({e})") from None


def _check_tiles_cover(leaf: SavedLeaf) -> None:
    rows, cols = codec.matrix_shape(leaf.shape)
    area = 0
    for row0, col0, height, width, intervals in leaf.tiles:
        if not (0 <= row0 and 0 <= col0 and 1 <= height <= 65535 and 1 <= width <= 65535
                and row0 + height <= rows and col0 + width <= cols):
            raise fmt.FormatError(f"{leaf.path}: tile outside the tensor")
        # The decoder decodes only the intervals the index lists: fewer than the
        # tile has would leave part of the output unwritten (uninitialized memory).
        if intervals != _intervals_per_tile(height, width, leaf.restart_interval):
            raise fmt.FormatError(f"{leaf.path}: tile at ({row0}, {col0}) records {intervals} "
                                  f"restart intervals, its size needs "
                                  f"{_intervals_per_tile(height, width, leaf.restart_interval)}")
        area += height * width
    if area != rows * cols or not _tiles_disjoint(leaf.tiles):
        # Equal area alone is not enough: overlapping tiles leave a gap elsewhere,
        # and a gap would come back as uninitialized memory.
        raise fmt.FormatError(f"{leaf.path}: tiles do not cover the tensor")


def _tiles_disjoint(tiles) -> bool:
    """Whether in-bounds tiles overlap nowhere, on the grid compressed to their edges.

    The writer's tiles form a grid (one compressed cell per tile); a layout
    needing many more cells than tiles is refused, which bounds the memory.
    """
    t = np.array(tiles, np.int64)[:, :4]
    row_edges = np.unique(np.concatenate([t[:, 0], t[:, 0] + t[:, 2]]))
    col_edges = np.unique(np.concatenate([t[:, 1], t[:, 1] + t[:, 3]]))
    if (len(row_edges) - 1) * (len(col_edges) - 1) > 4 * len(t) + 64:
        return False
    r0, r1 = np.searchsorted(row_edges, t[:, 0]), np.searchsorted(row_edges, t[:, 0] + t[:, 2])
    c0, c1 = np.searchsorted(col_edges, t[:, 1]), np.searchsorted(col_edges, t[:, 1] + t[:, 3])
    diff = np.zeros((len(row_edges), len(col_edges)), np.int64)  # 2-D difference array
    np.add.at(diff, (r0, c0), 1)
    np.add.at(diff, (r0, c1), -1)
    np.add.at(diff, (r1, c0), -1)
    np.add.at(diff, (r1, c1), 1)
    return bool(np.all(diff.cumsum(0).cumsum(1)[:-1, :-1] <= 1))


class Checkpoint:
    """An open checkpoint file: metadata validated, blobs read on demand."""

    def __init__(self, path, *, verify: bool = True):
        self.path = os.fspath(path)
        self.verify = verify
        self.reader = fmt.ContainerReader(self.path)
        meta = self.reader.metadata
        if meta.get("format") != CHECKPOINT_FORMAT:
            self.reader.close()
            raise fmt.FormatError(f"{self.path}: not a jaxjpeg checkpoint")
        if meta.get("version") != CHECKPOINT_VERSION:
            self.reader.close()
            raise fmt.FormatError(f"{self.path}: checkpoint version {meta.get('version')!r} is "
                                  f"not supported (this jaxjpeg reads {CHECKPOINT_VERSION})")
        try:
            if not isinstance(meta.get("leaves"), list):
                raise fmt.FormatError(f"{self.path}: metadata 'leaves' must be a list")
            self.leaves = [_parse_leaf(i, r, self.reader.file_size)
                           for i, r in enumerate(meta["leaves"])]
            for leaf in self.leaves:
                if leaf.kind == "jpeg":
                    _check_tiles_cover(leaf)
            self._check_blobs_and_paths()
        except BaseException:
            self.reader.close()
            raise

    def _check_blobs_and_paths(self) -> None:
        """Every blob a leaf needs exists (else read_blob would raise KeyError), and no
        path repeats or is a prefix of another (restore without target nests them)."""
        names = set(self.reader.blob_names)
        for leaf in self.leaves:
            needed = ([f"leaf{leaf.index}/raw"] if leaf.kind == "raw" else
                      [f"leaf{leaf.index}/intervals", f"leaf{leaf.index}/affine"]
                      + [f"leaf{leaf.index}/tile{k}.jpg" for k in range(len(leaf.tiles))])
            missing = [n for n in needed if n not in names]
            if missing:
                raise fmt.FormatError(f"{self.path}: {leaf.path}: missing blob {missing[0]!r}")
        full = [tuple(map(tuple, leaf.records)) for leaf in self.leaves]
        prefixes = {p[:n] for p in full for n in range(len(p))}
        if len(set(full)) != len(full) or prefixes & set(full):
            raise fmt.FormatError(f"{self.path}: leaf paths repeat or nest inside each other")

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_raw(self, leaf: SavedLeaf) -> np.ndarray:
        data = self.reader.read_blob(f"leaf{leaf.index}/raw", verify=self.verify)
        expected = math.prod(leaf.shape) * leaf.dtype.itemsize
        if len(data) != expected:
            raise fmt.FormatError(f"{self.path}: {leaf.path} holds {len(data)} bytes, "
                                  f"expected {expected}")
        return np.frombuffer(data, leaf.dtype).reshape(leaf.shape)

    def read_affine(self, leaf: SavedLeaf) -> tuple[np.ndarray, np.ndarray]:
        rows = codec.matrix_shape(leaf.shape)[0]
        data = self.reader.read_blob(f"leaf{leaf.index}/affine", verify=self.verify)
        if len(data) != 2 * rows * leaf.affine_dtype.itemsize:
            raise fmt.FormatError(f"{self.path}: {leaf.path} affine map has the wrong size")
        affine = np.frombuffer(data, leaf.affine_dtype).reshape(2, rows).astype(np.float32)
        return affine[0], affine[1]

    def read_interval_index(self, leaf: SavedLeaf) -> list[np.ndarray]:
        """Per tile: interval starts (relative to the tile, n + 1 values)."""
        data = self.reader.read_blob(f"leaf{leaf.index}/intervals", verify=self.verify)
        starts = np.frombuffer(data, np.uint32).astype(np.int64)
        counts = [t[4] + 1 for t in leaf.tiles]
        if any(c < 2 for c in counts) or sum(counts) != len(starts):
            raise fmt.FormatError(f"{self.path}: {leaf.path} interval index has the wrong size")
        pieces = np.split(starts, np.cumsum(counts)[:-1])
        for k, piece in enumerate(pieces):
            size = self.reader.blob_info(f"leaf{leaf.index}/tile{k}.jpg").length
            if np.any(np.diff(piece) < 0) or piece[0] < 0 or piece[-1] > size:
                raise fmt.FormatError(f"{self.path}: {leaf.path} tile {k} index out of range")
        return pieces

    def tile_size(self, leaf: SavedLeaf, k: int) -> int:
        return self.reader.blob_info(f"leaf{leaf.index}/tile{k}.jpg").length

    def tile_filler(self, leaf: SavedLeaf, k: int):
        name = f"leaf{leaf.index}/tile{k}.jpg"

        def fill(view):
            self.reader.read_blob(name, verify=self.verify, out=view)
        return fill


# ---------------------------------------------------------------- restore


@dataclasses.dataclass
class RestoreStats:
    """Filled by restore: compressed bytes handed to each device."""

    payload_bytes_per_device: dict = dataclasses.field(default_factory=dict)

    def add(self, device, n: int) -> None:
        key = str(device)
        self.payload_bytes_per_device[key] = self.payload_bytes_per_device.get(key, 0) + n


@dataclasses.dataclass(frozen=True)
class _Request:
    leaf: SavedLeaf
    dtype: np.dtype
    sharding: Any = None  # a multi-device jax.sharding.Sharding, or None
    device: Any = None    # the one device of an unsharded leaf (None: the default)


def _target_requests(ckpt: Checkpoint, target, dtype) -> tuple[list[_Request], Any]:
    by_path = {leaf.path: leaf for leaf in ckpt.leaves}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    requests = []
    for path, want in leaves:
        name = path_string([_key_record(k) for k in path])
        if name not in by_path:
            raise KeyError(f"{ckpt.path}: no leaf {name!r} in the checkpoint")
        saved = by_path[name]
        shape = tuple(getattr(want, "shape", saved.shape))
        if shape != saved.shape:
            raise ValueError(f"{name}: target shape {shape} != saved shape {saved.shape}")
        want_dtype = np.dtype(dtype or getattr(want, "dtype", saved.dtype))
        sharding = getattr(want, "sharding", None)
        device = None
        # One device of this process: decoded with the other unsharded leaves.
        # (One device of another process stays a sharding: this process holds
        # none of it, and _restore_sharded then decodes nothing here.)
        if (sharding is not None and len(sharding.device_set) == 1
                and next(iter(sharding.device_set)).process_index == jax.process_index()):
            (device,), sharding = tuple(sharding.device_set), None
        requests.append(_Request(saved, want_dtype, sharding, device))
    return requests, treedef


def _decode_dtype(request: _Request) -> np.dtype:
    """JPEG leaves decode straight to a float output type; others are cast after."""
    if request.dtype in codec.OUTPUT_TYPES:
        return request.dtype
    return np.dtype(np.float32)


def _shard_boxes(shape, sharding) -> dict:
    """device -> (row range, col range) of the 2-D view its shard lies in."""
    rows, cols = codec.matrix_shape(shape)
    boxes = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        slices = [s if isinstance(s, slice) else slice(s, s + 1) for s in index]
        bounds = [sl.indices(dim) for sl, dim in zip(slices, shape)]
        if len(shape) == 0:
            boxes[device] = ((0, 1), (0, 1), index)
            continue
        lead_first = [b[0] for b in bounds[:-1]]
        lead_last = [max(b[0], b[1] - 1) for b in bounds[:-1]]
        r0 = int(np.ravel_multi_index(lead_first, shape[:-1])) if lead_first else 0
        r1 = (int(np.ravel_multi_index(lead_last, shape[:-1])) + 1) if lead_last else 1
        c0, c1 = bounds[-1][0], bounds[-1][1]
        boxes[device] = ((r0, r1), (c0, c1), index)
    del rows, cols
    return boxes


def _tiles_in_box(leaf: SavedLeaf, rows: tuple[int, int], cols: tuple[int, int]) -> list[int]:
    return [k for k, (r0, c0, h, w, _) in enumerate(leaf.tiles)
            if r0 < rows[1] and r0 + h > rows[0] and c0 < cols[1] and c0 + w > cols[0]]


def _add_leaf_tiles(builder: codec.PlanBuilder, ckpt: Checkpoint, leaf: SavedLeaf,
                    tile_ids: list[int], origin: tuple[int, int], out_shape, dtype,
                    scale, offset, index) -> int:
    out = builder.add_output(out_shape, dtype, scale[origin[0]:origin[0] + out_shape[0]],
                             offset[origin[0]:origin[0] + out_shape[0]])
    payload = 0
    for k in tile_ids:
        r0, c0, h, w, _ = leaf.tiles[k]
        size = ckpt.tile_size(leaf, k)
        builder.add_tile(out, (r0 - origin[0], c0 - origin[1], h, w), bits=leaf.bits,
                         restart_interval=leaf.restart_interval, interval_starts=index[k],
                         size=size, fill=ckpt.tile_filler(leaf, k))
        payload += size
    return payload


def _run_plan_on(plan: codec.DecodePlan, device, final_shapes) -> list[jax.Array]:
    operands = jax.device_put(ops.plan_operands(plan), device)
    decode = ops.plan_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                              tuple(final_shapes))
    status, outputs = _call_decoder(decode, operands)
    ops.check_status(status)
    return outputs


def _call_decoder(decode, operands):
    """Runs a jitted decode; a corrupt stream is a JpegError however it surfaces.

    The CPU FFI handler reports a failed interval as an XLA error (DATA_LOSS),
    which jax raises as ValueError/JaxRuntimeError rather than through the status
    word that ops.check_status reads.
    """
    try:
        return decode(*operands)
    except (RuntimeError, ValueError) as e:
        if "jaxjpeg decode failed" in str(e):
            raise codec.JpegError(str(e).split("jaxjpeg ", 1)[1]) from None
        raise


def _restore_unsharded(ckpt, requests, device, stats) -> list:
    """All unsharded JPEG leaves in one decode call on one device."""
    builder = codec.PlanBuilder()
    payload = 0
    for r in requests:
        scale, offset = ckpt.read_affine(r.leaf)
        index = ckpt.read_interval_index(r.leaf)
        payload += _add_leaf_tiles(builder, ckpt, r.leaf, list(range(len(r.leaf.tiles))), (0, 0),
                                   codec.matrix_shape(r.leaf.shape), _decode_dtype(r), scale,
                                   offset, index)
    plan = builder.finish()
    if stats is not None:
        stats.add(device, payload)
    return _run_plan_on(plan, device, [r.leaf.shape for r in requests])


def _restore_sharded(ckpt, request, stats) -> jax.Array:
    """Each device decodes only the tiles its shard overlaps, from only their bytes."""
    leaf, sharding = request.leaf, request.sharding
    boxes = _shard_boxes(leaf.shape, sharding)  # this process's devices only
    # Under jax.distributed a sharding may hold nothing here (all its devices are
    # other processes'): read nothing, and give the dtype, which jax cannot
    # take from an empty list of shards.
    if not boxes:
        return jax.make_array_from_single_device_arrays(leaf.shape, sharding, [],
                                                        dtype=np.dtype(request.dtype))
    scale, offset = ckpt.read_affine(leaf)
    index = ckpt.read_interval_index(leaf)
    shards = []
    for device, ((r0, r1), (c0, c1), nd_index) in boxes.items():
        tile_ids = _tiles_in_box(leaf, (r0, r1), (c0, c1))
        tr0 = min(leaf.tiles[k][0] for k in tile_ids)
        tc0 = min(leaf.tiles[k][1] for k in tile_ids)
        tr1 = max(leaf.tiles[k][0] + leaf.tiles[k][2] for k in tile_ids)
        tc1 = max(leaf.tiles[k][1] + leaf.tiles[k][3] for k in tile_ids)
        builder = codec.PlanBuilder()
        payload = _add_leaf_tiles(builder, ckpt, leaf, tile_ids, (tr0, tc0), (tr1 - tr0, tc1 - tc0),
                                  _decode_dtype(request), scale, offset, index)
        if stats is not None:
            stats.add(device, payload)
        plan = builder.finish()
        # Decode, cut and cast in one compiled program. (Cutting eagerly with jnp
        # indexing compiled several small programs per device and leaf, which was
        # most of a sharded restore's time.)
        cut = ((tr1 - tr0, tc1 - tc0), tuple(leaf.shape),
               tuple(_slice_triple(sl, d) for sl, d in zip(nd_index, leaf.shape)), (tr0, tc0))
        decode = _shard_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                                cut, np.dtype(request.dtype))
        status, shard = _call_decoder(decode, jax.device_put(ops.plan_operands(plan), device))
        ops.check_status(status)
        shards.append(shard)
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)


def _slice_triple(sl, dim: int) -> tuple[int, int, int]:
    return sl.indices(dim) if isinstance(sl, slice) else (int(sl), int(sl) + 1, 1)


@functools.lru_cache(maxsize=1024)
def _shard_decoder(output_shapes, output_dtypes, cut, dtype):
    """A jitted decode of one 2-D box followed by the cut of the shard from it."""
    box_shape, shape, index, origin = cut
    decode = ops.plan_decoder(output_shapes, output_dtypes, (box_shape,))

    def run(*operands):
        status, (box,) = decode(*operands)
        return status, _cut_shard(box, shape, index, origin).astype(dtype)
    return jax.jit(run)


def _cut_shard(box, shape, index, origin):
    """The N-D shard ``index`` ((start, stop, step) per dim) of a tensor, from the
    decoded 2-D box whose top-left is at ``origin`` of the tensor's 2-D view."""
    if len(shape) == 0:
        return box.reshape(())
    ranges = [np.arange(*t) for t in index]
    grids = np.meshgrid(*ranges[:-1], indexing="ij")
    rows = (np.ravel_multi_index([g.ravel() for g in grids], shape[:-1]) if len(shape) > 1
            else np.zeros(1, np.int64)) - origin[0]
    cols = ranges[-1] - origin[1]
    shard_shape = tuple(len(r) for r in ranges)
    if len(rows) == 1 or np.all(np.diff(rows) == 1):  # contiguous rows: a plain slice
        picked = box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1:index[-1][2]]
    else:
        picked = box[rows[:, None], cols[None, :]]
    return picked.reshape(shard_shape)


def _unsharded_groups(requests, default_device) -> dict:
    """device -> indices of the unsharded JPEG requests it decodes (one call each)."""
    groups: dict = {}
    for i, r in enumerate(requests):
        if r.leaf.kind == "jpeg" and r.sharding is None:
            groups.setdefault(r.device or default_device, []).append(i)
    return groups


def _place_raw(array: np.ndarray, request: _Request, device):
    array = array.astype(request.dtype, copy=False)
    if request.sharding is not None:
        # Not jax.device_put(array, sharding): with a sharding spanning several
        # processes it checks the value is the same in every process with a
        # cross-process collective (fails where CPU collectives are off, and
        # needs every process in lockstep). Each process has read the whole
        # leaf anyway, so it places just the slices its own devices hold.
        # (dtype given: jax needs it where no device of the sharding is ours.)
        return jax.make_array_from_callback(array.shape, request.sharding,
                                            lambda index: array[index], dtype=array.dtype)
    return jax.device_put(array, request.device or device)


def restore(path, target=None, *, paths: Sequence[str] | None = None, dtype=None,
            device=None, verify: bool = True, stats: RestoreStats | None = None):
    """Restores a checkpoint as a pytree of arrays decoded on the device.

    ``target`` (optional) is a pytree of arrays or ``jax.ShapeDtypeStruct``
    (possibly with shardings) whose structure, dtypes and placement the result
    takes; it may cover a subset of the saved leaves (partial restore).
    Without a target, the saved structure comes back as nested dicts/lists;
    ``paths`` (glob patterns over slash-separated leaf paths) then selects a
    subset. ``dtype`` overrides every leaf's dtype.
    """
    # This process's first device: jax.devices()[0] belongs to process 0 under
    # jax.distributed, and other processes cannot place data on it.
    device = device or jax.local_devices()[0]
    with Checkpoint(path, verify=verify) as ckpt:
        if target is not None:
            requests, treedef = _target_requests(ckpt, target, dtype)
        else:
            chosen = [leaf for leaf in ckpt.leaves
                      if paths is None or any(fnmatch.fnmatchcase(leaf.path, p) for p in paths)]
            requests = [_Request(leaf, np.dtype(dtype or leaf.dtype), None) for leaf in chosen]
            treedef = None
        values: list = [None] * len(requests)
        for target_device, group in _unsharded_groups(requests, device).items():
            decoded = _restore_unsharded(ckpt, [requests[i] for i in group], target_device, stats)
            for i, array in zip(group, decoded):
                values[i] = array.astype(requests[i].dtype)
        for i, r in enumerate(requests):
            if r.leaf.kind == "jpeg" and r.sharding is not None:
                values[i] = _restore_sharded(ckpt, r, stats)
            elif r.leaf.kind == "raw":
                values[i] = _place_raw(ckpt.read_raw(r.leaf), r, device)
    if treedef is not None:
        return jax.tree_util.tree_unflatten(treedef, values)
    return _nest([(r.leaf.records, v) for r, v in zip(requests, values)])
