"""Saving pytrees as checkpoints (restoring: :mod:`jaxjpeg.checkpoint_restore`).

A checkpoint is one container file (:mod:`jaxjpeg.format`). Leaves worth
compressing are stored as JPEG tiles (each tile its own blob, a standalone
.jpg) with their restart-interval index and per-row affine map; the others
are stored losslessly in their own dtype. Restoring sends only compressed
bytes to the device and decodes them there with the custom call.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jaxjpeg import codec, format as fmt, layout
from jaxjpeg.progress import progress as progress_bar
from jaxjpeg.checkpoint_reader import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, JPEG_DTYPES,
                                        parse_dtype)
from jaxjpeg.treepaths import leaves_with_paths, path_string


# Default rate: uniform quantization of DCT coefficients with a step of this
# fraction of each tensor's RMS: ~8% relative RMS error and ~4 bits/weight
# (8x against float32) on Gaussian weights, whatever the tensor's tails.
DEFAULT_RELATIVE_STEP = 0.28

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

    def __post_init__(self):
        # A lone string is one pattern (iterating it would give one pattern
        # per character, and "*" matches everything).
        for name in ("lossless", "compress"):
            object.__setattr__(self, name, patterns(getattr(self, name), f"Policy.{name}"))

    def should_compress(self, path: str, leaf: np.ndarray) -> bool:
        if str(leaf.dtype) not in JPEG_DTYPES or leaf.size == 0:
            return False
        if any(fnmatch.fnmatchcase(path, p) for p in self.lossless):
            return False
        if any(fnmatch.fnmatchcase(path, p) for p in self.compress):
            return True
        return leaf.ndim >= self.min_ndim and leaf.size >= self.min_size



def patterns(value, what: str) -> tuple[str, ...]:
    """Glob patterns given as one string or a sequence of strings."""
    if isinstance(value, str):
        return (value,)
    value = tuple(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{what} must be a glob pattern or a sequence of them, got {value!r:.200}")
    return value


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


def _to_numpy(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError("saving arrays not fully addressable from this process is not supported; "
                         "gather them first (jax.experimental.multihost_utils)")
    array = np.asarray(leaf)
    if not array.dtype.isnative:  # big-endian input: stored (and restored) in native order
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _check_paths(entries) -> None:
    """Refuses paths a reader would refuse: too deep or long, or breaking the
    uniqueness rule of :func:`jaxjpeg.layout.path_clash` (linear time)."""
    for records, _ in entries:
        problem = layout.path_size_problem(records)
        if problem:
            raise ValueError(f"leaf path {path_string(records)[:200]!r} is {problem}")
    clash = layout.path_clash(records for records, _ in entries)
    if clash is not None:
        raise ValueError(f"leaf path {clash[:200]!r} collides with another once joined "
                         "with '/' (paths must not repeat or nest inside each other)")


def _leaves(tree) -> list:
    try:
        return leaves_with_paths(tree)
    except (RecursionError, SystemError) as e:  # jax's flatten hits the recursion limit
        if isinstance(e, SystemError) and not isinstance(e.__cause__, RecursionError):
            raise
        raise ValueError(f"tree is nested too deeply to save (leaf paths may have at most "
                         f"{layout.MAX_PATH_DEPTH} keys)") from None


def _is_coded(policy: "Policy", name: str, array: np.ndarray) -> bool:
    """JPEG-coded: the policy says so and every value is finite (a -inf mask
    or a NaN cannot be JPEG-coded and is stored losslessly instead)."""
    return policy.should_compress(name, array) and bool(np.all(np.isfinite(array)))


def _check_storable(name: str, array: np.ndarray) -> None:
    """Refuses, before anything is written, leaves a reader could not restore."""
    try:
        parse_dtype(str(array.dtype))
    except fmt.FormatError:
        raise TypeError(f"leaf {name!r} has dtype {array.dtype}: checkpoints hold numeric, "
                        "bool, bfloat16 and float8 arrays only") from None


def _write_jpeg_leaf(writer, index: int, enc: codec.EncodedTensor) -> tuple[dict, int]:
    tiles, starts = [], []
    stored = 0
    for k, tile in enumerate(enc.tiles):
        writer.add_blob(layout.tile_blob(index, k), tile.data)
        tiles.append([tile.row0, tile.col0, tile.height, tile.width, tile.num_intervals])
        starts.append(tile.interval_starts.astype(np.uint32))
        stored += len(tile.data)
    index_blob = np.concatenate(starts)
    affine = enc.affine()
    writer.add_blob(layout.intervals_blob(index), index_blob)
    writer.add_blob(layout.affine_blob(index), affine)
    stored += index_blob.nbytes + affine.nbytes
    record = {"kind": "jpeg", "bits": enc.bits, "tiles": tiles,
              "restart_interval": enc.tiles[0].restart_interval, "affine": affine.dtype.name}
    return record, stored


def _relative_step_encoder(relative_step, bits, coding):
    from jaxjpeg import rate

    if not 0 < relative_step < 16:
        raise ValueError(f"relative_step must be in (0, 16), got {relative_step}")

    def encode(_, array):
        x = np.asarray(array, np.float32)
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
        return rate.encode_at_step(x, relative_step * rms if rms > 0 else 1.0, bits=bits,
                                   **coding)
    return encode


def _error_bound_encoder(bound, bits, coding):
    from jaxjpeg import rate

    def encode(_, array):
        return rate.encode_for_error(array, bound, bits=bits, **coding)
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
            overhead += 4 * (layout.intervals_per_tile(h, w, restart_interval) + 1)
    return overhead


def _target_encoder(entries, policy, ratio, nbytes, sensitivity, bits, coding):
    """Allocates the file's byte budget over the leaves that will be coded."""
    from jaxjpeg import rate

    coded = {path_string(r): a for r, a in entries if _is_coded(policy, path_string(r), a)}
    kept = sum(a.nbytes for r, a in entries if path_string(r) not in coded)
    total = sum(a.nbytes for _, a in entries)
    overhead = _container_overhead(entries, coded, coding["restart_interval"],
                                   coding["tile_shape"])
    budget = (nbytes if nbytes is not None else int(total / ratio)) - kept - overhead
    if not coded:
        return lambda name, array: None
    if budget <= 0:
        raise ValueError(f"target size is below the {kept} bytes of leaves stored losslessly")
    allocation = rate.allocate_to_target(coded, budget, sensitivity=sensitivity, bits=bits,
                                         **coding)
    return lambda name, array: allocation.encodings[name]


def save(path, tree, *, relative_step: float | None = None, quant_step: float | None = None,
         quality: int | None = None,
         qtable: Sequence[int] | None = None, error_bound: float | None = None,
         target_ratio: float | None = None, target_bytes: int | None = None,
         sensitivity: dict | None = None, bits: int | None = None, clip: str = "common",
         restart_interval: int = codec.DEFAULT_RESTART_INTERVAL,
         tile_shape: tuple[int, int] = codec.DEFAULT_TILE_SHAPE, policy: Policy | None = None,
         encoder: Callable[[str, np.ndarray], codec.EncodedTensor] | None = None,
         progress: bool | None = None) -> SaveReport:
    """Saves a pytree of arrays to ``path`` atomically.

    The rate is set by one of:

    * ``relative_step`` (the default, ``DEFAULT_RELATIVE_STEP``): uniform
      quantization of every DCT coefficient with a step of this fraction of
      the tensor's RMS (8 or 12-bit samples chosen per tensor);
    * ``quant_step``: a flat quantization table, in sample units of ``bits``
      (named so that it is never mistaken for a training step);
    * ``quality``: the standard JPEG table scaled to 1..100; ``qtable``: any
      64-entry table;
    * ``error_bound``: each leaf's relative RMS error at most this (the
      step is searched per leaf, 8 or 12-bit samples);
    * ``target_ratio`` / ``target_bytes``: the whole file's size, shared
      across leaves by marginal rate-distortion, weighted by ``sensitivity``
      (leaf path -> weight, e.g. from :func:`jaxjpeg.rate.sensitivity_from_gradients`);
    * ``encoder(path, array) -> EncodedTensor`` for full per-leaf control.

    ``bits`` (8 or 12) fixes the sample precision; by default it is 8 for
    ``quant_step``/``quality``/``qtable`` and chosen per tensor by the other rate
    controls. ``clip`` selects the weight-to-sample mapping
    (:func:`jaxjpeg.mapping.row_affine`).

    The file appears at ``path`` only when complete: a
    crash mid-save leaves any previous checkpoint there intact.
    """
    policy = policy or Policy()
    entries = [(records, _to_numpy(leaf)) for records, leaf in _leaves(tree)]
    for records, array in entries:
        _check_storable(path_string(records), array)
    _check_paths(entries)
    rates_given = [v is not None for v in (relative_step, quant_step, quality, qtable, error_bound,
                                           target_ratio, target_bytes, encoder)]
    if sum(rates_given) > 1:
        raise ValueError("give at most one rate control")
    if not any(rates_given):
        relative_step = DEFAULT_RELATIVE_STEP

    coding = dict(restart_interval=restart_interval, tile_shape=tile_shape, clip=clip)

    def table_encoder(_, array):
        return codec.encode_tensor(array, bits=bits or 8, quant_step=quant_step, quality=quality,
                                   qtable=qtable, **coding)

    encode = encoder or table_encoder
    if relative_step is not None:
        encode = _relative_step_encoder(relative_step, bits, coding)
    if error_bound is not None:
        encode = _error_bound_encoder(error_bound, bits, coding)
    if target_ratio is not None or target_bytes is not None:
        encode = _target_encoder(entries, policy, target_ratio, target_bytes, sensitivity,
                                 bits, coding)
    bar = progress_bar(total=sum(a.nbytes for _, a in entries), desc="jaxjpeg save", unit="B",
                       enabled=progress)
    records_out, reports = [], []
    try:
        with fmt.ContainerWriter(os.fspath(path)) as writer:
            for index, (records, array) in enumerate(entries):
                name = path_string(records)
                record = {"path": records, "shape": list(array.shape), "dtype": str(array.dtype)}
                if _is_coded(policy, name, array):
                    extra, stored = _write_jpeg_leaf(writer, index, encode(name, array))
                else:
                    writer.add_blob(layout.raw_blob(index), np.ascontiguousarray(array))
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


