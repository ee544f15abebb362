"""Saving pytrees as checkpoints (restoring: :mod:`jaxjpeg.checkpoint_restore`).

A checkpoint is one container file (:mod:`jaxjpeg.format`). Leaves worth
compressing are stored as JPEG tiles (each tile its own blob, a standalone
.jpg) with their restart-interval index and per-row affine map; the others
are stored losslessly in their own dtype. Restoring sends only compressed
bytes to the device and decodes them there with the custom call.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import json
import math
import os
import threading
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import jax
import numpy as np

from jaxjpeg import (analysis, bias_correction, buffers, codec, embeddings, format as fmt,
                     layout, magnitudes, prng_keys, quantized_slices, quantized_vectors, stacks,
                     storage, ties, views)
from jaxjpeg.bias_correction import BiasCorrection, InputMean
from jaxjpeg.feedback import InputCovariance
from jaxjpeg.dtypes import packed_nbytes, value_bits
from jaxjpeg.progress import progress as progress_bar
from jaxjpeg.recurrent import RECURRENT_STEP_FACTOR, recurrent_leaves
from jaxjpeg.checkpoint_reader import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, JPEG_DTYPES,
                                       TIED, TIED_VERSION, parse_dtype, quantizable)
from jaxjpeg.treepaths import first_names, glob_escape, leaves_with_paths, path_string


# Default rate: uniform quantization of DCT coefficients with a step of this
# fraction of the RMS of a tree's typical leaf (others balanced by size, see
# STEP_SIZE_POWER): ~8% relative RMS error and ~4 bits/weight (8x against
# float32) on Gaussian weights, whatever the tensor's tails.
DEFAULT_RELATIVE_STEP = 0.28

# ---------------------------------------------------------------- policy


# Vectors holding this share of a tree's floating-point values are its
# weights (found by review: SevenNet's, 1.57x by default, every byte target
# refused; coded, 8x erred less than int4 g32 at 5.6x). A CNN's or a
# transformer's vectors hold under 1%.
FLAT_WEIGHTS_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which leaves are JPEG-coded; the rest are stored losslessly.

    A leaf is coded when it is a float32/bfloat16/float16 array with at least
    ``min_ndim`` dimensions and ``min_size`` elements, unless its path (slash
    separated, e.g. ``params/Dense_0/kernel``) matches a ``lossless`` glob
    pattern; a path matching a ``compress`` pattern is coded whatever its
    size. float64 leaves are coded only where a ``compress`` pattern names
    them (their precision was chosen; they decode through float32, and one
    with values beyond float32's range stays raw).

    ``min_ndim`` None (the default) is 2, or 1 where the tree stores its
    weights flattened: where vectors of at least ``min_size`` values hold
    most of its floating-point values (FLAT_WEIGHTS_SHARE; e3nn's linear
    weights, SevenNet's and MACE's). Elsewhere such vectors are norms and
    biases, kept exact.

    ``stacked`` (path -> axis) names the leaves that stack layers along an
    axis (``nn.scan``; :mod:`jaxjpeg.stacks`): each is coded as its layers
    would be one by one, and ``min_ndim`` / ``min_size`` count per layer.
    None (the default) finds them in the tree; ``{}`` codes every leaf as
    one tensor. Kept as sorted (path, axis) pairs (the policy stays
    hashable); a save refuses a path that is not a leaf or an axis it lacks.
    """

    min_size: int = 4096
    min_ndim: int | None = None
    lossless: tuple[str, ...] = ()
    compress: tuple[str, ...] = ()
    stacked: Mapping[str, int] | tuple | None = None

    def __post_init__(self):
        # A lone string is one pattern (iterating it would give one pattern
        # per character, and "*" matches everything).
        for name in ("lossless", "compress"):
            object.__setattr__(self, name, patterns(getattr(self, name), f"Policy.{name}"))
        # whole numbers >= 0 (found by review: -5, 1.5 and True were taken
        # silently, min_ndim=2.5 kept 2-D leaves raw, "4" failed late unnamed)
        for name in ("min_size", "min_ndim"):
            value = getattr(self, name)
            if not (value is None and name == "min_ndim") and not (
                    isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                    and value >= 0):
                raise ValueError(f"Policy.{name} must be a whole number >= 0, got {value!r:.40}")
        if self.stacked is not None:
            pairs = tuple(sorted(_stack_pairs(self.stacked)))
            object.__setattr__(self, "stacked", pairs)
            object.__setattr__(self, "_stack_axes", dict(pairs))

    def stack_axis(self, path: str) -> int | None:
        """The axis leaf ``path`` stacks layers along (``stacked``), or None."""
        return getattr(self, "_stack_axes", {}).get(path)

    def should_compress(self, path: str, leaf: np.ndarray) -> bool:
        if not _jpeg_dtype(leaf.dtype) or leaf.size == 0:
            return False
        if self.names_lossless(path):
            return False
        if path_matches(path, self.compress):
            return True
        axis = self.stack_axis(path)
        stacked = axis is not None and leaf.ndim > axis
        layers = max(1, leaf.shape[axis]) if stacked else 1
        min_ndim = 2 if self.min_ndim is None else self.min_ndim
        return (leaf.dtype != np.float64 and leaf.ndim - stacked >= min_ndim
                and leaf.size // layers >= self.min_size)

    def resolved(self, leaves) -> "Policy":
        """This policy with ``min_ndim`` chosen from ``leaves`` (shapes and
        dtypes only: every process of a distributed save chooses alike)."""
        if self.min_ndim is not None:
            return self
        floats = [leaf for leaf in leaves if _jpeg_dtype(leaf.dtype)]
        flat = sum(leaf.size for leaf in floats if len(leaf.shape) == 1
                   and leaf.size >= self.min_size)
        total = sum(leaf.size for leaf in floats)
        return dataclasses.replace(
            self, min_ndim=1 if total and flat >= FLAT_WEIGHTS_SHARE * total else 2)

    def names_lossless(self, path: str) -> bool:
        """A ``lossless`` pattern matches, or the path names a buffer computed
        by a formula or an optimizer's hyperparameter (jaxjpeg.buffers) that
        no ``compress`` pattern names:
        stored exactly under every rate control (byte targets store the
        other small leaves as float16 or quantized) and left as it is by
        bias correction."""
        return path_matches(path, self.lossless) or (
            (buffers.is_constant_buffer(path) or buffers.is_hyperparameter(path))
            and not path_matches(path, self.compress))

    def for_leaves(self, names) -> "Policy":
        """This policy with each ``compress`` and ``lossless`` pattern that
        spells a leaf's name taking that leaf alone, as ``restore``'s paths
        do (treepaths.matching; found by review: "layers[0]/kernel" named
        "layers0/kernel" too)."""
        names = set(names)

        def exact(patterns):
            return tuple(glob_escape(p) if p in names else p for p in patterns)
        return dataclasses.replace(self, compress=exact(self.compress),
                                   lossless=exact(self.lossless))


def path_matches(path: str, patterns) -> bool:
    """Whether one of ``patterns`` is ``path`` itself or matches it as a glob
    (found by review: "layers[0]/kernel" named no leaf of that name, [...]
    being a glob class; Policy.for_leaves keeps such a name from matching
    others in a save)."""
    return path in patterns or any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _stack_pairs(stacked) -> list[tuple[str, int]]:
    """``Policy.stacked`` as (path, axis) pairs; TypeError unless a mapping
    (or pairs) of paths to whole numbers."""
    try:
        pairs = list(stacked.items() if isinstance(stacked, Mapping) else stacked)
        if not all(len(pair) == 2 for pair in pairs):
            raise TypeError
    except TypeError:
        raise TypeError(f"Policy.stacked must map leaf paths to axes, got {stacked!r:.200}") from None
    for path, axis in pairs:
        if (not isinstance(path, str) or isinstance(axis, (bool, np.bool_))
                or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"Policy.stacked: {path!r} -> {axis!r} is not a leaf path and an "
                            "axis (a whole number)")
    return [(path, int(axis)) for path, axis in pairs]


def _checked_stacks(policy: "Policy", leaves) -> "Policy":
    """``policy`` with its stacked leaves' axes made non-negative; ValueError
    for a path that is no leaf of the tree or an axis the leaf lacks."""
    shapes = {leaf.name: leaf.shape for leaf in leaves}
    checked = {}
    for path, axis in policy.stacked:
        if path not in shapes:
            raise ValueError(f"Policy.stacked names {path!r}, which is not a leaf of the tree")
        ndim = len(shapes[path])
        if not -ndim <= axis < ndim or ndim < 2:
            raise ValueError(f"Policy.stacked: {path!r} of shape {tuple(shapes[path])} has no "
                             f"axis {axis} to stack layers along (a stack has 2 or more axes)")
        checked[path] = axis % ndim
    return dataclasses.replace(policy, stacked=checked)


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
    note: str = ""      # e.g. values kept exactly, or why a coded leaf was stored raw
    exact: bool = False  # restores bit for bit (raw, or exactly in a smaller form)
    tied_to: str | None = None   # stored once with this leaf, of the same values (jaxjpeg.ties)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / max(1, self.size)


@dataclasses.dataclass
class SaveReport:
    path: str
    leaves: list[LeafReport]
    file_bytes: int

    @property
    def raw_bytes(self) -> int:
        return sum(leaf.raw_bytes for leaf in self.leaves)

    @property
    def weights(self) -> int:
        return sum(leaf.size for leaf in self.leaves)

    @property
    def ratio(self) -> float:
        """Against the leaves as they were (their own dtypes): a bfloat16 tree
        saved at ``target_ratio=8``, which counts against float32, shows 4
        here (review); see :attr:`ratio_vs_float32`."""
        return self.raw_bytes / max(1, self.file_bytes)

    @property
    def ratio_vs_float32(self) -> float:
        """Against the weights as float32: what ``target_ratio`` asks for."""
        return 4 * self.weights / max(1, self.file_bytes)

    @property
    def bits_per_weight(self) -> float:
        """All-in: every byte of the file over every weight (NaN without
        weights: found by review, an empty tree's 178 bytes were "1424 bits/weight")."""
        return 8 * self.file_bytes / self.weights if self.weights else math.nan

    def summary(self) -> str:
        return (f"{self.path}: {self.file_bytes:,} bytes, {_per_weight(self.bits_per_weight)}, "
                f"{self.ratio_vs_float32:.2f}x vs float32, {self.ratio:.2f}x vs stored dtypes")


def _per_weight(bits: float) -> str:
    """``"4.14 bits/weight"``; ``"no weights"`` for NaN (an empty tree)."""
    return "no weights" if math.isnan(bits) else f"{bits:.2f} bits/weight"


def _to_numpy(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError("an array not fully addressable from this process: call save in every "
                         "process with distributed=True (or gather it first)")
    array = np.asarray(leaf)
    if not array.dtype.isnative:  # big-endian input: stored (and restored) in native order
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def shard_regions(leaf) -> tuple | None:
    """The distinct shards of a ``jax.Array`` split over devices, as
    (start, stop, step) per axis; None for anything else (numpy leaves, one
    device, replicated). Saving cuts tiles along them, so restoring with the
    same sharding reads each device's own tiles only."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(leaf, jax.Array) or sharding is None or len(sharding.device_set) < 2:
        return None
    shape = tuple(leaf.shape)
    regions = {tuple(sl.indices(dim) for sl, dim in zip(index, shape))
               for index in sharding.devices_indices_map(shape).values()}
    return tuple(sorted(regions)) if len(regions) > 1 else None


# The fewest header bytes a leaf's record takes besides its path: its dtype,
# kind and shape, and one blob's offset, length and checksum.
LEAST_HEADER_BYTES_PER_LEAF = 64


def _check_paths(entries) -> None:
    """Refuses paths a reader would refuse: too deep or long, or breaking the
    uniqueness rule of :func:`jaxjpeg.layout.path_clash` (linear time)."""
    for records, _ in entries:
        problem = layout.path_size_problem(records)
        if problem:
            raise layout.Unstorable(f"leaf path {path_string(records)[:200]!r} is {problem}")
    least = sum(len(json.dumps(records, separators=(",", ":"), ensure_ascii=False).encode())
                for records, _ in entries)
    least += LEAST_HEADER_BYTES_PER_LEAF * len(entries)
    if least > fmt.DEFAULT_MAX_HEADER_BYTES:
        # refused before any leaf is coded (a tree of 200,000 long paths
        # took 55 s of coding to be refused by the writer: review)
        raise layout.Unstorable(
            f"the {len(entries)} leaves' paths alone take {least} bytes of header, beyond the "
            f"{fmt.DEFAULT_MAX_HEADER_BYTES} readers accept")
    clash = layout.path_clash(records for records, _ in entries)
    if clash is not None:
        raise layout.Unstorable(f"leaf path {clash[:200]!r} collides with another once "
                                "joined with '/' (paths must not repeat or nest inside each "
                                "other)")


def _leaves(tree) -> list:
    """``tree``'s leaves as (key path records, leaf, PRNG implementation or
    None): a typed key array becomes its key data (:mod:`jaxjpeg.prng_keys`)."""
    try:
        leaves = leaves_with_paths(tree)
    except (RecursionError, SystemError) as e:  # jax's flatten hits the recursion limit
        if isinstance(e, SystemError) and not isinstance(e.__cause__, RecursionError):
            raise
        raise ValueError(f"tree is nested too deeply to save (leaf paths may have at most "
                         f"{layout.MAX_PATH_DEPTH} keys)") from None
    for records, leaf in leaves:
        _check_has_values(path_string(records), leaf)
    return [(records, *prng_keys.split(leaf, path_string(records))) for records, leaf in leaves]


def _check_has_values(name: str, leaf) -> None:
    """Refuses a leaf with no values to save: abstract (jax.eval_shape's),
    or a deleted array (a donated buffer), before a save reads any (found
    by review: "has dtype object" said of a float32 ShapeDtypeStruct, and
    Orbax's manager, refusing a deleted array inside its save, kept the
    interpreter from exiting)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise layout.Unstorable(f"leaf {name!r} is a jax.ShapeDtypeStruct: it has a shape and "
                                "a dtype but no values to save (pass the arrays themselves)")
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
        raise layout.Unstorable(f"leaf {name!r} is a deleted array (its buffer was donated or "
                                "deleted): nothing to save")


LEAF_SIZE_POWER = 0.3
# relative_step (the default) weighs leaves as a data-free byte target does:
# at high rate that target's equal-slope allocation gives each leaf a step
# of its RMS times size^((1 - LEAF_SIZE_POWER) / 2), relative_step applying
# at the tree's typical leaf size (see _step_reference_size). EfficientNet-
# lite1 / -lite2, default save: KL 0.086 / 0.099 with one step per RMS,
# 0.040 / 0.042 so balanced, at the same size (6.56x).
STEP_SIZE_POWER = (1 - LEAF_SIZE_POWER) / 2
MAX_KEPT_FRACTION = 1 / 16  # leaves with more non-finite or extreme values are stored raw
# Leaves of a smaller RMS are stored raw: their float32 maps would be
# subnormal, which XLA's CPU code flushes to zero (a leaf of RMS 1e-37
# restored as its offsets, 4x its own norm off). 2**-90 leaves 2**36 of room.
MIN_CODED_RMS = 2.0 ** -90


def _is_coded(policy: "Policy", name: str, array: np.ndarray,
              per_slice: int = quantized_slices.LEVELS) -> bool:
    """JPEG-coded: the policy says so, few enough values are non-finite or
    extreme (those are kept exactly in the leaf's side list) and the values
    are not vanishingly small (nor, with ``per_slice``, quantized per
    channel: see :func:`_why_raw`)."""
    return policy.should_compress(name, array) and _why_raw(array, per_slice) is None


def _jpeg_coded(policy: "Policy", coded: "set | None", name: str, array: np.ndarray,
                signed: bool | None) -> bool:
    """Whether a save JPEG-codes leaf ``name``: not on log2 steps (``signed``
    None) and among ``coded`` (a byte target's choice), or, where that is not
    known yet, :func:`_is_coded`."""
    return signed is None and (name in coded if coded is not None
                               else _is_coded(policy, name, array))


def _why_raw(array: np.ndarray, per_slice: int = quantized_slices.LEVELS) -> str | None:
    """Why a leaf the policy codes is stored raw, or None. ``per_slice``:
    a leaf quantized per channel on at most that many levels (0: none) is
    stored exactly as its codes (a byte target says where: _sliced_fits)."""
    array = np.asarray(array)
    if array.dtype == np.float64 and array.size:
        finite = np.isfinite(array)
        top = float(np.max(np.abs(array), where=finite, initial=0.0))
        if top > np.finfo(np.float32).max:   # tiles and side lists decode in float32
            return "stored raw: float64 values beyond float32's range"
        if top > 0:   # the RMS in float64 (found by review: 1e-60 was 0 in float32, all lost)
            scaled = np.where(finite, array / top, 0.0)
            if top * math.sqrt(float(np.mean(np.square(scaled)))) < MIN_CODED_RMS:
                return "stored raw: its values are too small to code (RMS below 2^-90)"
    if _few_values(array):
        return f"stored exactly: it takes at most {FEW_VALUES} distinct values (a mask?)"
    sliced = _sliced_grid(array, per_slice) if per_slice else None
    if sliced is not None:
        if len(sliced) == 3:
            return (f"stored exactly: each run of {sliced[2]} values along axis {sliced[0]} takes "
                    f"at most {per_slice} values on a step of its own (quantized in groups?)")
        return (f"stored exactly: each slice along axis {sliced[0]} takes at most "
                f"{per_slice} values on a step of its own (quantized per channel?)")
    if analysis.count_special(array) > MAX_KEPT_FRACTION * array.size:
        return (f"stored raw: more than 1/{round(1 / MAX_KEPT_FRACTION)} of its values are "
                "NaN, infinite or extreme")
    sentinel = _sentinel(array)
    if sentinel is not None:
        return (f"stored raw: more than 1/{round(1 / views.LOUD_VALUES_FEW)} of its values lie "
                f"about {sentinel:g}, over {SENTINEL_SPAN:g}x the RMS of the rest away (a mask?)")
    rms = analysis.last_rms(array)
    if rms is not None and 0 < rms < MIN_CODED_RMS:
        return "stored raw: its values are too small to code (RMS below 2^-90)"
    return None


# A leaf more than the side list keeps of which (views.LOUD_VALUES_FEW) lies
# in one tight cluster at its end, over SENTINEL_SPAN times the RMS of the
# rest and 1 / MASK_SPREAD times the cluster's own spread away from zero, is
# a mask added to logits (-1e4, -1e9 where attention may not look; added to
# a bias, -1e4 + b): coded, the rest takes the cluster's error (a causal bias
# of RMS 13 masked with -1e4 restored up to 859 off by default, with -1e9
# 8.4e7; -1e4 added to N(0, 0.5) values, 993 off without a word). Stored
# raw. Masks are 1e4x their biases and more; a gate of 1.0 over N(0, 0.05)
# is coded (found by review: at 8x its rest is not kept, 4x met before), and
# so are tight clusters JPEG codes well by rows or columns (found by review:
# a conditional BatchNorm's gamma N(1, 0.01) beside its beta N(0, 0.005), a
# fused LayerNorm's scale and bias, columns of 3 +- 0.01, raw at 5-6x the
# bytes with a spread of 1/150-1/450 of the cluster's value).
SENTINEL_SPAN = 64.0
MASK_SPREAD = 2.0 ** -10


def _sentinel(array: np.ndarray) -> float | None:
    """The center of the mask (see SENTINEL_SPAN) of ``array``, found on a
    sample of its values, or None. The cluster is the values beyond half
    the value an eighth in from an end (values further out, a column of
    finfo.min or a second mask value, do not hide it: found by review), which
    holds more than an eighth of them with room for a sample's noise either
    side; a leaf without one among a few thousand values (a sixteenth of
    them, read a sixteenth in too, at 4x looser spans) is told at once (the
    whole sample's look took 7% of a 2x target's save; found by review, read
    an eighth in only, the few thousand missed masks of 13% of a leaf)."""
    values = np.asarray(array)
    flat = values.reshape(-1) if values.flags.c_contiguous else values.flat   # (no copy)
    few = np.asarray(flat[quantized_vectors.sample_positions(values.size, 1 << 12)], np.float64)
    if _mask_center(few, 1 / 16, 4, (1 / 16, 1 / 8)) is None:
        return None
    sample = flat[quantized_vectors.sample_positions(values.size, 1 << 16)]
    return _mask_center(np.asarray(sample, np.float64), views.LOUD_VALUES_FEW)


def _mask_center(sample: np.ndarray, share: float, loose: float = 1,
                 inners: tuple[float, ...] = (1 / 8,)) -> float | None:
    """The median of the values of ``sample`` (float64) beyond half its
    value ``inners`` in from an end, that value negative at the low end or
    positive at the high one, where more than ``share`` of them are and that
    value is over SENTINEL_SPAN times the others' RMS and 1 / MASK_SPREAD
    times their median distance from their median (each ``loose`` times
    less); or None. One sort, the others' sums of squares taken from their
    side (clear of a huge mask's)."""
    s = np.sort(sample[np.isfinite(sample)])
    n = s.size
    if n < 16:
        return None
    squares = s * s
    below, above = np.cumsum(squares), np.cumsum(squares[::-1])
    for at in (int(n * inner) for inner in inners):
        for end, outward in ((s[at], -1.0), (s[n - 1 - at], 1.0)):
            if end * outward <= 0:
                continue
            if outward < 0:   # the cluster s[:k], the others after it
                k = int(np.searchsorted(s, end / 2, "right"))
                cluster, others, others_squares = s[:k], n - k, above[n - k - 1] if k < n else 0
            else:
                k = int(np.searchsorted(s, end / 2, "left"))
                cluster, others, others_squares = s[k:], k, below[k - 1] if k else 0
            if (cluster.size <= share * n or not others   # (a constant: found by review)
                    or loose * abs(end) <= SENTINEL_SPAN * math.sqrt(others_squares / others)):
                continue
            center = float(np.median(cluster))
            if float(np.median(np.abs(cluster - center))) < loose * MASK_SPREAD * abs(end):
                return center
    return None


@functools.lru_cache(maxsize=None)
def _jpeg_dtype(dtype: np.dtype) -> bool:
    """Whether JPEG may code leaves of ``dtype`` (str(dtype) takes
    microseconds: a save of many small leaves asks for each several times)."""
    return str(dtype) in JPEG_DTYPES


def check_leaves(tree) -> None:
    """Refuses the leaves of ``tree`` no checkpoint holds (their dtypes and
    paths), without reading their values."""
    entries = [(records, leaf if hasattr(leaf, "dtype") else np.asarray(leaf))
               for records, leaf, _ in _leaves(tree)]
    for records, leaf in entries:
        _check_storable(path_string(records), leaf)
    _check_paths(entries)


def _check_storable(name: str, array: np.ndarray) -> None:
    """Refuses, before anything is written, leaves a reader could not restore."""
    try:
        parse_dtype(str(array.dtype))
    except fmt.FormatError:
        raise layout.Unstorable(f"leaf {name!r} has dtype {array.dtype}: checkpoints hold "
                                "numeric (up to float64 and complex128), bool and ml_dtypes' "
                                "(bfloat16, float8, float4_e2m1fn, int4, uint4, int2, uint2; "
                                "no float6, which XLA holds no array of) arrays only") from None


def _jpeg_blobs(index: int, enc: codec.EncodedTensor) -> tuple[list, dict, int]:
    """(blobs as (name, data), record fields, stored bytes) of a coded leaf."""
    blobs, tiles = [], []
    for k, tile in enumerate(enc.tiles):
        blobs.append((layout.tile_blob(index, k), tile.data))
        tiles.append([tile.row0, tile.col0, tile.height, tile.width, tile.num_intervals])
    index_dtype, interval_index = layout.pack_interval_index(
        [tile.interval_starts for tile in enc.tiles])
    blobs.append((layout.intervals_blob(index), interval_index))
    affine_layout, affine = enc.stored_affine
    blobs.append((layout.affine_blob(index), affine))
    record = {"kind": "jpeg", "bits": enc.bits, "tiles": tiles,
              "restart_interval": enc.tiles[0].restart_interval,
              "affine": enc.affine().dtype.name, "view": enc.view.record()}
    if index_dtype is not None:
        record["intervals"] = index_dtype
    if affine_layout is not None:
        record["affine_layout"] = affine_layout
    if enc.col_scale is not None:
        col_scale = enc.stored_col_scale()
        blobs.append((layout.col_scale_blob(index), col_scale))
        record["col_scale"] = col_scale.dtype.name
    if enc.outliers is not None and enc.outliers.count:
        blobs.append((layout.outliers_blob(index), enc.outliers.to_bytes(enc.size)))
        record["outliers"] = enc.outliers.count
    return blobs, record, sum(memoryview(data).nbytes for _, data in blobs)


def _user_weight(sensitivity, name, shape) -> float | None:
    """What one unit of squared error in leaf ``name`` costs by the user's
    ``sensitivity``: the factor, or the mean of the importance array; None
    when it does not name the leaf."""
    factor, importance = _leaf_importance(sensitivity, name)
    if factor is None and importance is not None:
        factor = float(np.mean(np.broadcast_to(importance, shape)))
    return factor


def _data_free_weight(size: int, norm2: float, weighing: int | None = None) -> float:
    """The data-free cost of squared error in a leaf of ``size`` values
    whose coded values' squared norm is ``norm2``: its relative error
    weighted by size^LEAF_SIZE_POWER; ``weighing``: the size it counts as
    (jaxjpeg.embeddings), its values as important as such a leaf's."""
    if not norm2 > 0:
        return 1.0
    weighing = weighing or size
    return weighing ** LEAF_SIZE_POWER * (size / weighing) / norm2


def _leaf_importance(sensitivity, name):
    """(leaf-level factor or None, per-element importance array or None) of ``name``."""
    value = (sensitivity or {}).get(name)
    if value is None:
        return None, None
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
        raise TypeError(f"sensitivity of {name!r}: a number or an array of numbers, not a bool")
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError) as e:   # found by review: numpy's message, no leaf named
        raise TypeError(f"sensitivity of {name!r}: a number or an array of numbers, not "
                        f"{type(value).__name__} ({e})") from None
    if arr.ndim == 0:
        return float(arr), None
    return None, arr


class _LeafCoder:
    """Prepares leaves the same way for every rate control (view, side list,
    row and column steps), so curves measured once match the final coding."""

    def __init__(self, sensitivity, view, coding, input_covariance=None, shards=None,
                 prior=None, input_means=None):
        self.sensitivity = sensitivity
        self.view = view
        self.coding = coding
        self.input_covariance = input_covariance or {}
        self.input_means = input_means or {}   # {weight: (InputMean, taker)}
        # The BatchNorm prior (jaxjpeg.priors) codes every leaf but those a
        # user's input covariance steers: a sensitivity only weighs the leaf
        # (a number) or sets its steps (an array, in place of the prior's
        # input powers), and the prior keeps its feedback and bias correction.
        # EfficientNet-lite0 / -lite1 / -lite2 at 8x, KL: one Fisher mean per
        # leaf 0.077 / 0.080 / 0.140 (4 probe seeds) without the prior on the
        # steered leaves, 0.058 / 0.063 / 0.082 with it; per-element Fisher
        # arrays 0.104 / 0.101 / 0.126 -> 0.078 / 0.072 / 0.079 (2 seeds).
        # (Session 3, before bias correction, had measured the prior worse
        # with Fisher means.)
        self.prior = prior.without(self.input_covariance) if prior is not None else None
        self.shards = shards or {}  # name -> the shards of the array saved (SourceLeaf.shards)
        self.weighing: dict = {}    # name -> the size its error is weighed by (jaxjpeg.embeddings)
        self.stacked = lambda name: None   # a leaf's stack axis (Policy.stack_axis)
        self.numbers_weigh = True   # a sensitivity's numbers move steps (default, byte targets)
        self._choices: dict = {}   # name -> what the analysis chose (small arrays only)

    def prepare(self, name, array) -> codec.Prepared:
        """The leaf ready to code, its tiles cut along its shards' boundaries.
        A leaf prepared before (byte targets prepare each twice: for its
        curve, then to code it) reuses the choices of its view, side list and
        steps instead of analysing it again."""
        from jaxjpeg import rate

        shards = self.shards.get(name)
        plain = None
        if name in self._choices:   # its tile edges as well (the same shape, view and shards)
            choices = self._choices.pop(name)
            plain = choices.pop("plain", None)
            if plain is None:
                cuts = choices.pop("tile_cuts")
                return dataclasses.replace(codec.prepare(array, **choices), tile_cuts=cuts)
            # its view and checks as before (they were half a second prepare's time)
            p = analysis.prepare_plain(array, self.view, checked=plain[0])
            if p is not None and p.matrix.shape == plain[1]:
                return dataclasses.replace(p, tile_cuts=plain[2])
        factor, importance = _leaf_importance(self.sensitivity, name)
        covariance = self.input_covariance.get(name)
        outputs = None   # the prior's weights of quiet output channels
        if self.prior is not None and self.prior.models(name):
            covariance = self.prior.covariance(name, array.shape)
            if importance is None:   # a user's array takes the place of the input powers
                importance = self.prior.importance(name, array.shape)
                outputs = self.prior.output_importance(name, array)
        try:
            # not balanced: a leaf a user's factor weighs (its squared error in
            # weight units), nor per-row ranges, which fit loud rows already
            # (found by review: balanced, both erred more)
            common = self.coding.get("clip", "common") == "common"
            p = rate.prepare_leaf(array, importance, self.view, covariance, shards,
                                  self.stack_axis(name), layer_steps=self.by_layer(name),
                                  row_steps=common, balance=factor is None and common,
                                  output_weights=outputs)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if shards:
            return p
        if plain is not None and plain[:2] == (p.view, p.matrix.shape):
            # with_even_splits of the same shape, view and tile shape, as before
            return dataclasses.replace(p, tile_cuts=plain[2])
        return p.with_even_splits(self.coding["tile_shape"])

    def weighing_size(self, name: str, size: int) -> int:
        return self.weighing.get(name, size)

    def stack_axis(self, name: str) -> int | None:
        """The axis leaf ``name`` stacks layers along (jaxjpeg.stacks), which
        its view puts among its rows (views.stacked_view), or None: not
        stacked, or an input covariance or the BatchNorm prior shapes its
        view, or the framework's view is asked for."""
        axis = self.stacked(name)
        if (axis is None or self.view != "auto" or name in self.input_covariance
                or (self.prior is not None and self.prior.models(name))):
            return None
        return axis

    def by_layer(self, name: str) -> bool:
        """Whether leaf ``name``'s layers get steps by their own RMS: a
        stacked leaf the user's ``sensitivity`` leaves data-free (a number
        weighs the whole leaf's squared error where numbers weigh leaves, as
        it weighs each layer's when each is its own leaf; an array sets the
        steps). Where the rate control fixes each leaf's step or error, a
        number does nothing (found by review: under quality=90 it took a
        stack's layers from 0.149 each to 0.14-0.60)."""
        if self.stack_axis(name) is None:
            return False
        factor, importance = _leaf_importance(self.sensitivity, name)
        return importance is None and (factor is None or not self.numbers_weigh)

    def thin(self, name, p: codec.Prepared) -> bool:
        """Whether leaf ``name`` (prepared as ``p``) is quantized as a thin
        leaf (rate.is_thin) under a byte target."""
        from jaxjpeg import rate

        return rate.is_thin(p) and self.one_step_fits(name)

    def sparse(self, name, p: codec.Prepared) -> bool:
        """Whether leaf ``name`` may be quantized with its zeros kept
        (rate.is_sparse) under a byte target, beside its JPEG coding."""
        from jaxjpeg import rate

        return rate.is_sparse(p) and self.one_step_fits(name)

    def one_step_fits(self, name: str) -> bool:
        """Whether one step may code leaf ``name`` (a thin coding): not where
        a user's importance array or input covariance shapes its steps, or
        its layers' own scales do (found by review: a pruned stack coded on
        one step gave its smallest layer 6x the largest's relative error)."""
        return (_leaf_importance(self.sensitivity, name)[1] is None
                and name not in self.input_covariance and not self.by_layer(name))

    def remember(self, name, p: codec.Prepared) -> None:
        """Keeps ``p``'s choices for the next prepare of ``name``; for a leaf
        the native statistics pass prepared alone only its tile edges (it is
        prepared again as fast as a default save, without the copy and the
        numpy statistics passes that redoing its choices took; its statistics
        kept for every leaf would cost most of a leaf's memory at 1 GiB)."""
        if "squares" in p.scales:   # analysis.prepare_plain's: nothing analysed beyond it,
            if not self.shards.get(name):   # but its even splits' tile edges (Python work)
                self._choices[name] = {"plain": (p.view, p.matrix.shape, p.tile_cuts)}
            return
        self._choices[name] = dict(view=p.view, row_weight=p.row_weight, outliers=p.outliers,
                                   col_scale=p.col_scale, balanced=p.balanced,
                                   row_factor=p.row_factor,
                                   feedback=p.feedback, tile_cuts=p.tile_cuts,
                                   row_spread=p.row_spread, row_lightest=p.row_lightest,
                                   copy=False)

    def leaf_sensitivity(self, name, p: codec.Prepared) -> float:
        """How much one unit of squared error in this leaf costs: the user's
        factor, or the mean of the user's importance array. Data-free:
        size^LEAF_SIZE_POWER / ||coded values||², the leaf's relative error
        weighted by its size^LEAF_SIZE_POWER (0.3 measured best of
        -0.6..1 on EfficientNet-lite1 at 8x), times error feedback's gain
        where a user's input covariance steers the leaf."""
        from jaxjpeg import rate

        user = _user_weight(self.sensitivity, name, p.shape)
        if user is not None:
            return user
        return (_data_free_weight(p.size, rate.spread_norm2(p), self.weighing_size(name, p.size))
                * self.feedback_gain(name, p))

    def feedback_gain(self, name, p: codec.Prepared) -> float:
        """Feedback's gain on a leaf a user's input covariance steers (its
        error costs that much less), else 1."""
        from jaxjpeg import feedback

        if name not in self.input_covariance or p.feedback is None:
            return 1.0
        mean = self.input_means.get(name)
        return feedback.gain(p, None if mean is None else mean[0].values)


def _custom_encoder(encoder, shards: dict):
    """A user's ``encoder``, given ``shards=`` (the leaf's shard regions, or
    None) when its signature takes that keyword."""
    call = encoder
    try:
        params = inspect.signature(encoder).parameters.values()
    except (TypeError, ValueError):   # builtins without a signature: as given
        params = ()
    if any(p.name == "shards" or p.kind == p.VAR_KEYWORD for p in params):
        call = lambda name, array: encoder(name, array, shards=shards.get(name))  # noqa: E731

    def checked(name, array):
        """The coding, its tiling checked as a restore checks it (found by
        review: a save wrote tiles leaving a gap, and no restore read it)."""
        enc = call(name, array)
        if isinstance(enc, codec.EncodedTensor):
            # another shape's coding (found by review: saved, and the file refused)
            if tuple(enc.shape) != tuple(np.shape(array)):
                raise ValueError(f"encoder's coding of {name!r} has shape {tuple(enc.shape)}, "
                                 f"the leaf {tuple(np.shape(array))}")
            try:
                codec.check_tiling(enc)
            except ValueError as e:
                raise ValueError(f"encoder's coding of {name!r}: {e}") from None
        elif enc is not None:   # (found by review: an AttributeError from deep inside)
            raise TypeError(f"encoder returned {type(enc).__name__} for {name!r}: an "
                            "EncodedTensor, or None to store the leaf raw")
        return enc
    return checked


def _relative_step_encoder(relative_step, bits, leaf_coder, reference_size: float,
                           steering: "_StepSteering | None" = None,
                           recurrent: frozenset = frozenset()):
    """Each leaf at ``relative_step`` times its RMS about its rows' means
    (rate.spread_rms), balanced by size, moved by ``steering``; the
    ``recurrent`` cells' weights finer (jaxjpeg.recurrent)."""
    from jaxjpeg import rate

    if not 0 < relative_step < 16:
        raise ValueError(f"relative_step must be in (0, 16), got {relative_step}")

    def encode(name, array):
        p = leaf_coder.prepare(name, array)
        step = relative_step * rate.reference_rms(p) * balanced_step_factor(
            leaf_coder.weighing_size(name, array.size), reference_size)
        if steering is not None:
            step *= steering.factor(name)
        if name in recurrent:
            step *= RECURRENT_STEP_FACTOR
        return rate.encode_at_step(p, step, bits=bits, **leaf_coder.coding)
    return encode


# The most a sensitivity coarsens a leaf's step under relative_step: a leaf
# whose sensitivity is 0 takes it (every coefficient rounds to 0, as a byte
# target codes such a leaf).
MAX_STEERED_STEP = 2.0 ** 16


@dataclasses.dataclass(frozen=True)
class _StepSteering:
    """How ``sensitivity`` moves the default's steps: each steered leaf's
    step by ``(data-free sensitivity / its sensitivity)^½`` -- the
    proportions a byte target's equal-slope allocation gives the leaves
    (:meth:`_LeafCoder.leaf_sensitivity`) -- and every leaf's by ``common``,
    which keeps the size-weighted mean log step, and with it about the
    file's size, the default's."""

    steered: dict   # leaf name -> step multiplier before ``common``
    common: float

    def factor(self, name: str) -> float:
        return min(self.steered.get(name, 1.0) * self.common, MAX_STEERED_STEP)

    @classmethod
    def of(cls, coded, sensitivity, policy: "Policy",
           weighing: dict | None = None) -> "_StepSteering | None":
        """The steering of the JPEG-coded leaves (``coded``:
        _jpeg_candidates) that ``sensitivity`` names, or None when it names
        none; ``weighing``: the sizes leaves are weighed by
        (_LeafCoder.weighing)."""
        from jaxjpeg import rate

        steered, logs = {}, {}   # logs: the log multiplier each leaf's size counts with
        for leaf in coded:
            factor = _user_weight(sensitivity, leaf.name, leaf.shape)
            if factor is None:
                continue
            if not (math.isfinite(factor) and factor >= 0):
                raise ValueError(f"sensitivity of {leaf.name!r} must be finite and "
                                 f"non-negative, got {factor}")
            array = leaf.array()
            data_free = _data_free_weight(leaf.size, rate.finite_norm2(array),
                                          (weighing or {}).get(leaf.name))
            steered[leaf.name] = math.sqrt(data_free / factor) if factor > 0 else math.inf
            axis = policy.stack_axis(leaf.name)
            if axis is not None and factor > 0:
                logs[leaf.name] = _layers_log_multiplier(array, axis, factor,
                                                         (weighing or {}).get(leaf.name))
        if not steered:
            return None
        weighed = [(leaf.size, logs.get(leaf.name, math.log(steered.get(leaf.name, 1.0))))
                   for leaf in coded]
        weighed = [(size, m) for size, m in weighed if math.isfinite(m)]
        total = sum(size for size, _ in weighed)
        log_mean = sum(size * m for size, m in weighed) / total if total else 0.0
        return cls(steered, math.exp(-log_mean))


# A partial sensitivity whose numbers are this far from the data-free weights
# of the leaves it names (median over them) warns: the leaves it leaves out
# keep those weights, against which the numbers count.
PARTIAL_SENSITIVITY_SPREAD = 100.0


def _jpeg_candidates(leaves, policy: "Policy", log_coding: "_LogCoding | None") -> list:
    """The leaves the policy codes that are not on log2 steps (optimizer
    moments: a sensitivity weighs none of them; found by review: counted
    among the leaves steps were balanced over, Adam's moments kept the
    default's size while a state's parameters, named with their squared
    gradients, came back as noise)."""
    return [leaf for leaf in leaves
            if leaf.size > 0 and policy.should_compress(leaf.name, leaf.stand_in())
            and (log_coding is None or log_coding.signed(leaf.name, leaf.array()) is None)]


def _warn_partial_sensitivity(coded, sensitivity, weighing: dict) -> None:
    """Warns where ``sensitivity`` names some coded leaves, not all, with
    numbers far from their data-free weights (found by review: {"b": 1.0}
    weighed b 3000x the data-free weights of the others, coded at relative
    errors 0.62 / 0.92 where they had 0.05 / 0.07, without a word);
    ``coded``: _jpeg_candidates."""
    from jaxjpeg import rate

    named = [leaf for leaf in coded if (sensitivity or {}).get(leaf.name) is not None]
    if not named or len(named) == len(coded):
        return
    ratios = []
    for leaf in named:
        factor = _user_weight(sensitivity, leaf.name, leaf.shape)
        data_free = _data_free_weight(leaf.size, rate.finite_norm2(leaf.array()),
                                      weighing.get(leaf.name))
        if factor and factor > 0 and math.isfinite(factor):
            ratios.append(factor / data_free)
    if not ratios:
        return
    ratio = float(np.median(ratios))
    if 1 / PARTIAL_SENSITIVITY_SPREAD <= ratio <= PARTIAL_SENSITIVITY_SPREAD:
        return
    warnings.warn(
        f"jaxjpeg: sensitivity names {len(named)} of the {len(coded)} coded leaves, weighing "
        f"them {ratio:.3g}x their data-free weights (size^{LEAF_SIZE_POWER} / ||w||^2); the "
        f"other {len(coded) - len(named)} keep those weights, so they will be coded "
        f"{'far coarser' if ratio > 1 else 'far finer'}: give every coded leaf a number, or "
        "scale these", stacklevel=6)   # save()'s caller


def _layers_log_multiplier(array, axis: int, factor: float, weighing) -> float:
    """The mean over a stacked leaf's layers of the log multiplier each
    would get as a leaf of its own: what the common factor must see for the
    stack to be steered as its unstacked twin (the stack's one multiplier,
    from its layers' summed norms, is their arithmetic mean, not the
    geometric one the twin's logs average to)."""
    from jaxjpeg import rate

    x = np.moveaxis(np.asarray(array), axis, 0)
    norm2 = [rate.finite_norm2(layer) for layer in x]   # values kept aside left out
    size = x[0].size
    logs = [0.5 * math.log(_data_free_weight(size, n2, weighing) / factor)
            for n2 in norm2 if n2 > 0]
    return float(np.mean(logs)) if logs else 0.0


def balanced_step_factor(size: int, reference_size: float) -> float:
    """How much coarser than ``relative_step`` times its RMS a leaf of
    ``size`` values is coded, in a tree whose typical leaf has
    ``reference_size`` (see STEP_SIZE_POWER)."""
    return (size / reference_size) ** STEP_SIZE_POWER if reference_size > 0 else 1.0


def _step_reference_size(leaves, policy: "Policy") -> float:
    """The typical size of the leaves ``policy`` codes, exp of their
    log-sizes' mean weighted by size: the step each leaf's values get
    averages (in log) to relative_step times RMS, so the default's rate
    stays about 4 bits/weight on Gaussian weights, as with one step per RMS.
    A stacked leaf counts as its layers (``Policy.stacked``)."""
    coded = [leaf for leaf in leaves
             if leaf.size > 0 and policy.should_compress(leaf.name, leaf.stand_in())]
    if not coded:
        return 0.0
    sizes = np.array([leaf.size for leaf in coded], np.float64)
    slices = np.array([_slice_size(leaf, policy) for leaf in coded], np.float64)
    return float(np.exp(np.sum(sizes * np.log(slices)) / sizes.sum()))


def _slice_size(leaf, policy: "Policy") -> int:
    """A leaf's size, or a layer's where it stacks layers (``Policy.stacked``)."""
    axis = policy.stack_axis(leaf.name)
    return leaf.size if axis is None else leaf.size // leaf.shape[axis]


def _error_bound_encoder(bound, bits, leaf_coder):
    from jaxjpeg import rate

    def encode(name, array):
        layers = leaf_coder.stack_axis(name) if leaf_coder.by_layer(name) else None
        try:
            return rate.encode_for_error(leaf_coder.prepare(name, array), bound, bits=bits,
                                         layer_axis=layers, **leaf_coder.coding)
        except rate.BoundUnreachable:
            return None   # stored raw: exact, so within any bound
    return encode


# Bytes the container adds per blob beyond the coded data: alignment
# padding (on average 32 before a blob of fmt.LARGE_BLOB bytes or more, 4
# before a smaller one: fmt.blob_offset); the blobs' records and the leaves'
# are in the deflated header (_header_estimate). A raw blob's padding and
# record, where a leaf moves between JPEG and raw (_exact_instead): 4 + 16.
_BLOB_PADDING = 4
_SMALL_BLOB_OVERHEAD = _BLOB_PADDING + 16


def _header_estimate(entries, coded: dict, kept: dict, rounded_fields: dict, target_bytes: int,
                     tile_shape, user_metadata=None) -> int:
    """The deflated header's bytes, measured on a header of the same shape:
    each leaf's record with its kind's fields (``coded``: name -> its tile
    count, 0 for one raw blob, a quantized one; ``rounded_fields``: name ->
    the fields of a leaf kept out of JPEG but rounded), JPEG-coded leaves' tile
    lists, and the blob table with offsets spread over the target's bytes
    and checksums of random bits; ``user_metadata`` as given; encoded as the
    writer encodes its header. Found by review: counted as 256 + 8 a leaf +
    16 a blob (measured within 4% on EfficientNet-lite1, 20 long
    names and 600 leaves), a tree of 102 small ONNX leaves was counted 18%
    over its header, 3% of its file: its targets landed 2.5-3.4% under."""
    rng = np.random.default_rng(0)
    records, blob_sizes = [], []
    total = max(1, sum(leaf.size for leaf in entries))
    height, width = tile_shape or codec.DEFAULT_TILE_SHAPE
    # in the leaves' names' order: a tree and the same leaves given in another
    # order (save_leaves) get the same estimate, so the same allocation
    for i, leaf in enumerate(sorted(entries, key=lambda leaf: json.dumps(leaf.records,
                                                                         default=str))):
        record = {"dtype": str(leaf.dtype), "kind": "raw", "path": leaf.records,
                  "shape": list(leaf.shape)}
        tiles = coded.get(leaf.name, 0)
        share = target_bytes * leaf.size / total
        if leaf.name in coded and tiles:
            record.update(kind="jpeg", affine="float16", affine_layout="deflated-shared-scale",
                          bits=8, intervals="deflated-uint16-deltas", restart_interval=32,
                          view={"perm": list(range(len(leaf.shape))), "split": 1},
                          tiles=[[k * height, 0, height, width, 64] for k in range(tiles)])
            blob_sizes += [(f"leaf{i}/affine", share / 50), (f"leaf{i}/intervals", tiles * 8)]
            blob_sizes += [(f"leaf{i}/tile{k}.jpg", share / tiles) for k in range(tiles)]
            records.append(record)
            continue
        if leaf.name in rounded_fields:
            record.update(rounded_fields[leaf.name])
        elif leaf.name in coded:   # one raw blob, quantized
            record.update(center=int(rng.integers(0, 300)), domain="linear", rice=7,
                          step=float(rng.random()), stored="quantized",
                          unary_bytes=int(rng.integers(1, 400)))
        elif kept.get(leaf.name, 0) < leaf.nbytes:
            record["deflated"] = True
        records.append(record)
        blob_sizes.append((f"leaf{i}/raw", kept.get(leaf.name, share)))
    offsets = fmt.PREAMBLE_SIZE + np.cumsum([0] + [size for _, size in blob_sizes])
    crcs = rng.integers(0, 2**32, len(blob_sizes))
    blobs = {key: {"crc32c": int(crc), "length": int(size), "offset": int(offset)}
             for (key, size), offset, crc in zip(blob_sizes, offsets, crcs)}
    metadata = {"format": CHECKPOINT_FORMAT, "leaves": records, "rate": {"target_ratio": 8.0},
                "version": 2}
    if user_metadata is not None:   # (found by review: uncounted, 17% over with 3000 floats)
        metadata[layout.USER_METADATA_KEY] = user_metadata
    return len(fmt._encode_header(blobs, metadata)[0])


def _coded_overhead(p: codec.Prepared, restart_interval, tile_shape,
                    bytes_per_value: float) -> tuple[int, int]:
    """(container bytes of a coded leaf that do not depend on its step, its
    tile count): blob padding and the restart-interval index of every tile;
    a tile's padding by its size at the target's ``bytes_per_value`` (found
    by review: every tile counted 32, small tiles pad 4, and a target of
    301 leaves at 64x landed 6.6% under). The blobs' records are the
    header's (_header_estimate)."""
    tiles = p.tiles(tile_shape)
    side_blobs = 2 + (p.col_scale is not None) + (p.outliers is not None)  # + intervals, affine
    overhead = _BLOB_PADDING * side_blobs
    for _, _, h, w in tiles:
        overhead += 32 if h * w * bytes_per_value >= fmt.LARGE_BLOB else _BLOB_PADDING
        overhead += layout.intervals_per_tile(h, w, restart_interval) + 1  # ~1 byte deflated
    return overhead, len(tiles)


def analyse_here(analyse, entries, floor: bool) -> list:
    """Every leaf's analysis (see :func:`_target_encoder`), in this process:
    on the save's threads, one leaf's Python work overlapping another's
    probe coding, with at most the largest leaf's bytes in flight (their
    prepared copies are what a byte target holds beyond a default save)."""
    return list(in_order(functools.partial(analyse, floor=floor), entries, save_workers(),
                         max((leaf.nbytes for leaf in entries), default=0),
                         lambda leaf: leaf.nbytes))


# A byte target measures curves again, further, where its coded leaves may
# take this many times the file's average bits a value (see plan()).
WIDER_REACH = 1.5
# Small kernels (and small leaves' moments) leave their fine steps for the
# allocation's where, beside them, the coded leaves would get less than this
# share of the file's average bits a value, squeezed below their finest
# coding, and fewer bytes than the small kernels take. Found by review:
# PP-OCR's 134 K-value direction classifier, a third of it in small
# kernels, had its large kernels at 1.1 bits a value and relative error up
# to 0.9 at 6x while the small ones kept 10 bits, and agreed with float32
# on 43% of crops at 6x, 85% at 8x; now 97% at 6x, its weights' error
# rising with the ratio. At 0.5, 5x on its PyTorch-named copy still starved
# (0.51 of the average). The bytes test, beside optimizer moments only: a
# training state's moments, not its small kernels, may be what squeezes the
# coded leaves (30 small kernels beside two large ones and Adam's moments
# keep their steps at 6x, the large ones' error 0.04 against 0.11
# allocated). Without moments it made a cliff (found by review: fer's
# Keras mini-Xception, a quarter of its 58 K values in small kernels, had
# KL 0.054 at 33 KB, where they took the allocation's step, and 0.217 /
# 0.201 at 35 / 37 KB, where their 13.4 KB on fine steps were under the
# coded leaves' budget: its large kernels at 0.18-0.34 relative error; now
# 0.031 / 0.084, against int4 g32's 0.137 at 37 KB; over nine targets from
# 27 to 46 KB, geometric mean 0.100 -> 0.043). The benchmarks' networks,
# whose small kernels are a few percent of them, code as before.
SMALL_STEP_SHARE = 0.75


def _coded_leaves_starve(entries, coded, curves, budget: float, target_bytes: int,
                         small_kernel_bytes: float, moments: bool) -> bool:
    """Whether the coded leaves' ``budget`` gives them less than
    SMALL_STEP_SHARE of the file's average bits a value, below what their
    finest codings take, and, beside optimizer ``moments``, the small
    kernels on their fine steps take more (``small_kernel_bytes``; see
    SMALL_STEP_SHARE)."""
    coded_values = sum(leaf.size for leaf in entries if leaf.name in coded)
    if (not coded_values or (moments and small_kernel_bytes <= budget)
            or sum(float(c.nbytes.max()) for c in curves.values()) <= budget):
        return False
    average = 8 * target_bytes / max(1, sum(leaf.size for leaf in entries))
    return 8 * budget / coded_values < SMALL_STEP_SHARE * average


# Where every coded leaf's finest JPEG coding (12-bit samples under the rows'
# maps: about 10-11 bits a value) leaves bytes of the target unspent, a byte
# target offers each one fine step's thin coding too (rate.thin_curve, up to
# 15.5 bits a value): between JPEG's finest and raw (32) nothing was offered,
# and a tree of few large leaves landed under its target (found by review:
# Magika at 2.4 / 3.0x -17.9 / -1.5%, Whisper tiny.en in float16 at 2.2x
# -8.6%). Within FINE_MARGIN of the budget, as probes measure the finest
# codings a few percent over what they take (Magika at 3.2x: -4.2%).
FINE_MARGIN = 1.05
# Targets of this many bits a value or more offer the fine step from their
# first plan: JPEG's finest codings take about as many (10-12 under 12-bit
# samples), and a plan that found them short measured every leaf again.
FINE_FROM_BITS = 10.0


def _optimizer_moments(entries) -> bool:
    """Whether the leaves include an optimizer's moments by their names
    (magnitudes.MOMENT_NAMES; Lion's lone mu): not a BatchNorm's mean and
    var, which log2 steps may code alike (found by review: a Flax CNN's
    non-negative running means made it a training state here)."""
    records = [tuple(map(tuple, leaf.records)) for leaf in entries]
    return (bool(magnitudes.named_first_moments(
                (path, leaf.shape) for path, leaf in zip(records, entries)))
            or any(magnitudes.is_lone_first_moment(path) for path in records))


def _target_encoder(entries, policy, target_bytes, bits, leaf_coder, analysed_by=analyse_here,
                    takers=frozenset(), own=None, log_coding=None, user_metadata=None):
    """Allocates the file's byte budget over the leaves that will be coded.

    Curves are measured on each leaf's probe first and the prepared copies
    dropped; each leaf is then prepared again and coded once, as save
    reaches it, so memory stays at about one leaf beyond a default save.
    Returns (the encoder, the names of the leaves it codes): the save stores
    the others raw without counting their special values again.
    ``analysed_by(analyse, entries, floor)``: every entry's ``analyse(leaf,
    floor)``, in order (a distributed save gathers them from its processes).
    ``takers``: the leaves bias correction will change (see _taker_bytes).
    ``own`` (a distributed save): the names this process codes; it codes
    them to their share of the budget at the whole tree's allocation, its
    last leaf landing that share as a one-process save's lands the budget.
    ``log_coding`` (a _LogCoding): leaves on log2 steps, of fixed size.
    ``user_metadata``: the caller's, in the header too.
    """
    from jaxjpeg import rate

    coding = leaf_coder.coding
    total = sum(leaf.size for leaf in entries)
    reach = rate.reach_of(target_bytes, total)
    floor = not leaf_coder.sensitivity   # see rate.LADDER_FLOOR
    # Kernels too small for JPEG take one fine step (SMALL_KERNEL_STEP), and
    # their optimizer moments log2 steps of HALF_LIKE_STEP; where the target
    # has no room for these, the kernels take the allocation's step, as thin
    # leaves do, and the moments move along the moments' ladder (found by
    # review: 1200 kernels of 32 x 64 made every target of 4x and more a
    # refusal); where the large moments had to coarsen for them, the small
    # moments move (review: 30 small kernels' Adam state beside two large
    # kernels left these 0.66 bits a value, 78% off at 8x). The kernels keep
    # their step otherwise: data-free weights undervalue them (with them
    # allocated EfficientNet-lite1 at 8x fell to KL 0.079 from 0.042, at 12x
    # top-1 0.49 from 0.63). Decided on the whole tree's figures: every
    # process of a distributed save decides alike.
    small_stepped = small_moments = False
    # every coded leaf offered a thin coding too (see FINE_MARGIN), from the
    # first plan where the target is as fine as JPEG's finest codings
    fine_target = 8 * target_bytes >= FINE_FROM_BITS * max(1, total)
    if log_coding is not None:
        # finer log2 steps measured once a plan wants them (refine), from the
        # first where the target is this fine (its plans wanted them: a second
        # pass over every moment, its probe and ladder again, was a fifth of
        # a training state's 3x); the plans choose alike either way
        log_coding.finer = fine_target and own is None
    fine_thin = set()   # the leaves offered one for that alone (their reports say so)
    grid_codes = {}   # name -> bytes of the codes of a coded leaf quantized per slice

    # Each plan measures every leaf again (fine_target, small_stepped and
    # small_moments plan once more): what a leaf's own figures give, the
    # same each time, is measured once (found by review: a 2-3x target took
    # 3-5x a default save's time, half of it measuring the same curves twice).
    measured = {}

    def once(key, measure_it):
        if key not in measured:
            measured[key] = measure_it()
        return measured[key]

    def analyse(leaf, floor):
        """(name, (curve, sensitivity, tile overhead) or None when kept raw, raw bytes)."""
        array = leaf.array()
        if leaf.prng_impl is not None:   # key data: raw, as it is (the reader's rule)
            return leaf.name, None, array.nbytes
        if policy.names_lossless(leaf.name) or (log_coding is not None
                                                and log_coding.keeps_exact(leaf.name, array)):
            return leaf.name, None, once(("exact", leaf.name), lambda: _exact_bytes(array))
        signed = log_coding.signed(leaf.name, array) if log_coding is not None else None
        # (a resident leaf's exact rung measured only when a plan reaches it)
        values_of = leaf.array if leaf.resident else None
        if signed is not None:
            return leaf.name, None, log_coding.stored_bytes(leaf.name, array, signed,
                                                            values_of=values_of)
        small_kernel = False   # a kernel too small for JPEG on the allocation's step
        # a leaf quantized per channel stays exact where its codes fit its
        # share of the target (found by review: exact on short slices, 4.3-4.6
        # bits a weight, such leaves made targets that had been met refused)
        per_slice, codes = once(("sliced", leaf.name), lambda: _sliced_fits(
            array, target_bytes * array.size / max(1, total)))
        if codes is not None and not per_slice:
            grid_codes[leaf.name] = codes
        if not once(("coded", leaf.name),
                    lambda: _is_coded(policy, leaf.name, array, per_slice=per_slice)):
            prior = leaf_coder.prior   # may model no weight (all steered): still its vectors
            limits = prior.vectors.get(leaf.name) if prior is not None else None
            small_moment = (log_coding.small_signed(leaf.name, array)
                            if small_moments and log_coding is not None and limits is None
                            and leaf.name not in takers else None)
            if small_moment is not None:   # on the moments' ladder, from a finer step
                return leaf.name, None, log_coding.stored_bytes(leaf.name, array, small_moment,
                                                                small=True, values_of=values_of)
            centered = (log_coding.centered_first(leaf.name, array)
                        if log_coding is not None and limits is None else None)
            if centered is not None:   # stored as its variance (_Save._store), so counted
                coded = magnitudes.encode_centered(centered[1], array, magnitudes.HALF_LIKE_STEP)
                return leaf.name, None, (_nbytes(coded) if coded is not None
                                         else _exact_bytes(array))
            small_kernel = (small_stepped and limits is None and leaf.name not in takers
                            and not (log_coding is not None
                                     and log_coding.names_a_moment(leaf.name))
                            and _small_kernel_stepped(leaf.name, array, policy, leaf_coder))
            if not small_kernel:
                first = log_coding is not None and log_coding.is_first(leaf.name)
                stored, lossy = once(("raw", leaf.name, first),
                                     lambda: _stored_raw_bytes(array, limits, first))
                if leaf.name in takers:
                    return leaf.name, None, _taker_bytes(array, stored)
                if lossy is not None:   # see _header_estimate
                    rounded_fields[leaf.name] = lossy
                moment = log_coding is not None and log_coding.names_a_moment(leaf.name)
                if lossy is not None and not moment:
                    rounded[leaf.name] = array.nbytes - stored   # see _room_for_exact
                if limits is None and np.ndim(array) >= 2 and not moment:
                    fine_kernels[leaf.name] = stored   # see _coded_leaves_starve
                return leaf.name, None, stored
        p = leaf_coder.prepare(leaf.name, array)
        leaf_coder.remember(leaf.name, p)
        if small_kernel or leaf_coder.thin(leaf.name, p):   # one raw blob, quantized
            # a large one's steps as close as JPEG's (found by review: a 400 K
            # flattened weight vector, a file's bulk, landed 2.2-4.2% under);
            # small ones' measured steps only (every curve is padded to the
            # longest: a tree of many small leaves would hold 8x the table)
            dense = p.size >= rate.THIN_PROBE
            curve = once(("thin", leaf.name), lambda: rate.thin_curve(
                p.original, dense=dense, kept=rate.kept_aside(p)))
            overhead, tile_count = _BLOB_PADDING, 0
        else:
            # a leaf whose quiet rows take finer steps (the prior's quiet
            # channels) is probed whole: on a probe, 16-48x targets of trees
            # with 10% such channels landed 3-8% under in 11 of 80 (review)
            probe_size = p.size if p.row_lightest else rate.probe_elements(p.size, total)
            curve = once(("jpeg", leaf.name, reach, floor, probe_size), lambda: rate.rd_curve(
                p, bits, reach=reach, floor=floor, probe_size=probe_size, row_ranges=False,
                **coding))
            overhead, tile_count = _coded_overhead(p, coding["restart_interval"],
                                                   coding["tile_shape"],
                                                   target_bytes / max(1, total))
            sparse = leaf_coder.sparse(leaf.name, p)
            fine = None
            if sparse or (fine_target and rate.one_step_holds(p)
                          and leaf_coder.one_step_fits(leaf.name)):
                # JPEG, or its zeros kept / one fine step (FINE_MARGIN), at each size
                # the fine step's steps as close as JPEG's (a sparse leaf's
                # measured steps only: with them dense, PP-OCRv6's detector
                # at 8x erred more over 4 probe seeds, mean |dp| 0.0021 -> 0.0023)
                finest = None if sparse else 8 * float(curve.nbytes.max()) / max(1, p.size)
                fine = once(("fine", leaf.name, finest), lambda: rate.thin_curve(
                    p.original, dense=not sparse, error_weight=rate.balanced_error_weight(p),
                    min_bits=finest, probe_size=rate.THIN_PROBE if sparse else rate.FINE_PROBE))
            # JPEG's per-row ranges, past its shared scale's finest step, where
            # a fine target needs codings past it and one step does not err
            # less there already: on transformer kernels a step's squared
            # error was 0.15-0.65 of theirs at equal bytes (7.5-11.5 bits a
            # value), and measuring them was half of a 2x target's JPEG curves
            if fine_target and (fine is None or not rate.errs_less_at_finest(fine, curve)):
                curve = once(("ranges", leaf.name, reach, floor, probe_size),
                             lambda: rate.with_row_ranges(p, curve, reach=reach,
                                                          probe_size=probe_size, **coding))
                if fine is not None and not sparse:
                    fine = rate.under_row_range_mix(fine, curve)
            if fine is not None:
                curve = rate.merged_curve(curve, fine)
                if not sparse:
                    fine_thin.add(leaf.name)
        if not leaf_coder.sensitivity:   # data-free: see rate.capped_curves
            curve = dataclasses.replace(curve, norm2=np.array([rate.spread_norm2(p)]))
        return leaf.name, (curve, leaf_coder.leaf_sensitivity(leaf.name, p), overhead,
                           tile_count), 0

    rounded = {}   # leaves kept out of JPEG but rounded: their bytes short of exact
    fine_kernels = {}   # bytes of the kernels kept out of JPEG, on their own steps
    rounded_fields = {}   # the record fields of those (moments too) stored rounded

    kept_moments = {}   # bytes of the moments kept out of the ladder (small leaves')

    def measure(floor):
        coded, kept, overhead, curves, sens, tiles = set(), 0, 0, {}, {}, {}
        kept_by, tile_counts = {}, {}
        rounded.clear()
        rounded_fields.clear()
        fine_kernels.clear()
        for name, measured, raw in analysed_by(analyse, entries, floor):
            kept += raw
            if log_coding is not None and log_coding.names_a_moment(name):
                kept_moments[name] = raw
            if measured is not None:
                coded.add(name)   # tile count 0: one raw blob (thin)
                curves[name], sens[name], tiles[name], tile_counts[name] = measured
                overhead += tiles[name]
            else:
                kept_by[name] = raw
        # each process alike: its own leaves' rounding is not known of the others'
        header = _header_estimate(entries, tile_counts, kept_by,
                                  rounded_fields if own is None else {}, target_bytes,
                                  coding.get("tile_shape"), user_metadata)
        overhead += (fmt.PREAMBLE_SIZE + header + fmt.ALIGNMENT // 2   # the header's alignment
                     + _BLOB_PADDING * (len(entries) - len(coded)))
        return coded, kept, overhead, curves, sens, tiles

    settled_from = (log_coding.step, log_coding.rung) if log_coding is not None else None

    def plan(floor):
        if log_coding is not None:   # its ladder from the first rung again (settle moves it)
            log_coding.step, log_coding.rung = settled_from
            log_coding.small.clear()
            log_coding.tight = None
        nonlocal reach
        coded, kept, overhead, curves, sens, tiles = measure(floor)
        budget = target_bytes - kept - overhead
        # Leaves stored apart for little (a mask) or coded for fewer bits a
        # value than the file's average at their finest step (a constant or
        # smooth leaf: review) leave the others more: their curves are
        # measured again that far (found by review: beside a 512 x 512 zero
        # leaf a kernel's curve stopped short, the file 45% under its target).
        average = 8 * target_bytes / max(1, sum(leaf.size for leaf in entries))
        taking = [leaf for leaf in entries if leaf.name in coded
                  and 8 * curves[leaf.name].nbytes.max() > average * leaf.size]
        # only where some stopped at the reach (review: re-measuring where
        # none did cost 1.6x the time for the same file)
        stopped = any(8 * curves[leaf.name].nbytes.max()
                      > 0.9 * rate.LADDER_HEADROOM * reach * leaf.size for leaf in taking)
        wider = rate.reach_of(budget, sum(leaf.size for leaf in taking)) if taking else 0.0
        if stopped and wider > WIDER_REACH * reach:
            reach = wider
            coded, kept, overhead, curves, sens, tiles = measure(floor)
            budget = target_bytes - kept - overhead
        if log_coding is not None and own is None:   # coarser log2 steps where it is tight
            largest = sum(float(c.nbytes.max()) for c in curves.values())
            if budget > largest and not log_coding.finer:
                # finer steps may take the rest: measured only now (found by
                # review: measured under every target, 1.7-2x the CPU)
                log_coding.refine([leaf for leaf in entries if leaf.name in log_coding.ladder])
            raw_extras = [grid_codes.get(leaf.name, leaf.nbytes) + _SMALL_BLOB_OVERHEAD
                          - float(curves[leaf.name].nbytes[-1]) - tiles[leaf.name]
                          for leaf in entries if leaf.name in coded]
            freed = log_coding.settle(budget, sum(leaf.size for leaf in entries
                                                  if leaf.name in coded), largest, raw_extras,
                                      TARGET_TOLERANCE / 2 * target_bytes)
            kept, budget = kept - freed, budget + freed
        if floor and budget > 0 and rate.floors_exceed(curves, budget):
            coded, kept, overhead, curves, sens, tiles = measure(False)   # the same budget
        return coded, kept, overhead, curves, sens, tiles, budget

    coded, kept, overhead, curves, sens, tiles, budget = plan(floor)
    if (not fine_target and curves
            and 0 < sum(float(c.nbytes.max()) for c in curves.values()) < FINE_MARGIN * budget):
        fine_target = True   # JPEG's finest codings leave bytes unspent (see FINE_MARGIN)
        coded, kept, overhead, curves, sens, tiles, budget = plan(floor)
    if (budget <= 0 or sum(float(c.nbytes.min()) for c in curves.values()) > budget
            or _coded_leaves_starve(entries, coded, curves, budget, target_bytes,
                                    sum(fine_kernels.values()), _optimizer_moments(entries))):
        small_stepped = small_moments = True
        coded, kept, overhead, curves, sens, tiles, budget = plan(floor)
    elif log_coding is not None and log_coding.rung > 0:
        small_moments = True
        coded, kept, overhead, curves, sens, tiles, budget = plan(floor)
    if log_coding is not None and log_coding.tight:   # the plan kept's
        warnings.warn(log_coding.tight, stacklevel=7)   # save()'s caller, through _Save

    def refusal(stored_apart: float, coarsest: float | None = None) -> ValueError:
        """The target refused, in the user's terms (found by review: "target
        565.0 bytes"; small leaves' moments went uncounted as moments)."""
        large = small = 0
        if log_coding is not None:
            large, small = log_coding.settled_bytes(small=False), log_coding.settled_bytes(True)
            small += sum(b for name, b in kept_moments.items() if name not in log_coding.ladder)
        return ValueError(
            f"target size {target_bytes} is below the {int(stored_apart)} bytes of leaves stored "
            "without JPEG and container overhead"
            + ("" if coarsest is None else f" plus the {int(coarsest)} of the coded leaves' "
               "smallest coding")
            + (f" ({large + small} bytes of them leaves on log2 steps (jaxjpeg.magnitudes: "
               "optimizer moments, scales, small vectors)"
               + (f", coded on log2 steps of {log_coding.step:g} at most" if large else "")
               + (f", {small} of small leaves' on log2 steps of "
                  f"{log_coding.small_step_at_most():g} at most" if small else "")
               # (found by review: said of 7 bytes of positive parameters
               # among 900 KB of vectors the policy kept)
               + (": save the parameters alone, or ask for less)"
                  if large + small >= MOMENTS_MAIN_SHARE * stored_apart else ")")
               if large + small else "")
            + ("" if coded else " (none of the leaves is JPEG-coded: see jaxjpeg.Policy for "
               "which leaves it codes, and the notes of a default save's report for why "
               "others are stored raw)"))

    # Within the promise's tolerance of the target, the smallest file is
    # given, not refused (found by review: a quantized graph whose default
    # file lay 0.45% over its 8x was refused).
    slack = TARGET_TOLERANCE * target_bytes
    if budget + slack <= 0:
        raise refusal(kept + overhead)
    coarsest = sum(float(c.nbytes.min()) for c in curves.values())
    if coarsest > NEAR_SMALLEST * budget:   # near the smallest file: the smallest
        # codings coded too, where every leaf is here, and the larger of the two
        # taken (found by review: measured on probes they were 3-23% off either
        # way; trusted within the tolerance, files landed 4-12% over targets,
        # and raising the budget to coded figures below the probes' left a
        # pruned tree's file 5x over)
        smallest = coarsest if own is not None else max(
            coarsest, _coarsest_coded_bytes(entries, curves, leaf_coder))
        if smallest > budget + slack:
            raise refusal(target_bytes - budget, smallest)
        budget = max(budget, coarsest)
    curves = rate.capped_curves(curves, budget)
    if own is not None:   # (each process knows its own leaves' codes only)
        grid_codes.clear()
    raw_bytes = {leaf.name: grid_codes.get(leaf.name, leaf.nbytes) for leaf in entries}
    exact = _exact_instead(curves, sens, tiles, raw_bytes, budget + EXACT_SLACK * target_bytes)
    for name in exact:
        coded.discard(name)
        kept += raw_bytes[name]
        budget -= raw_bytes[name] + _SMALL_BLOB_OVERHEAD - tiles[name]
        del curves[name], sens[name]
    # then rounded vectors, with what the coded leaves leave at their finest
    # (found by review: taken first, at 2x they left no room for a kernel
    # exact, the file 18% under where it had been 10%)
    room = budget - sum(float(c.nbytes[-1]) for c in curves.values())
    vectors = (_room_for_exact({n: b for n, b in rounded.items() if n not in coded}, room)
               if own is None else set())
    budget -= sum(rounded[name] for name in vectors)
    exact |= vectors
    if not coded:
        return (lambda name, array: None), coded, _as_stored(exact, grid_codes)
    # the plans are done: their measurements go before the allocator's tables
    # come (a fine target's JPEG, fine-step and row-range curves of every
    # leaf, 10 of a 1 GB tree's 37 MiB peak at target_ratio=3)
    measured.clear()
    allocator = rate.BudgetAllocator(curves, budget, sensitivity=sens, **leaf_coder.coding)
    if own is not None:
        # Found by review: each process corrected only by its own leaves'
        # misses and none settled the total (+1.8% / +3.4% at 2 / 4 processes).
        mine = [name for name in curves if name in own]
        if mine:
            allocator = rate.BudgetAllocator({name: curves[name] for name in mine},
                                             allocator.planned_bytes(mine),
                                             sensitivity={name: sens[name] for name in mine},
                                             **leaf_coder.coding)
    largest = max((leaf.nbytes for leaf in entries if leaf.name in coded), default=0)
    return (_BudgetEncoder(allocator, leaf_coder, fine_thin, ahead_bytes=largest), coded,
            _as_stored(exact, grid_codes))


def _as_stored(exact: set, grid_codes: dict) -> dict:
    """A byte target's exact leaves, each True where stored as its codes on
    a grid (counted at their bytes), False where raw (counted at the raw
    size, as stored: see _Save._store)."""
    return {name: name in grid_codes for name in exact}


def _taker_bytes(array: np.ndarray, stored: int) -> int:
    """What a leaf that takes bias correction's shifts (a bias, a running
    mean) is budgeted: a constant one (all zeros, as initialised) packs to a
    few bytes, but not once shifted (found by review: a classifier's zero
    bias of 4000 values took 28 B counted and 6.6 KB stored, the file 4.7%
    over its target); float16's two bytes a value bound both ways a byte
    target stores it."""
    flat = np.asarray(array).reshape(-1)
    if flat.dtype != np.float32 or flat.size == 0 or np.any(flat != flat[0]):
        return stored
    return max(stored, min(2 * flat.size, flat.nbytes))


# Exact leaves may take a byte target this much over (a share of it): at
# target_ratio=1 the raw file is over by its container's bytes (+0.09% on
# one 256 x 256 leaf), and a lossy file 65% under was given (found by review).
EXACT_SLACK = 0.005


def _unfilled(room: float, extras: Sequence[float]) -> float:
    """The bytes of ``room`` left once the ``extras`` that fit are taken,
    the largest first."""
    for extra in sorted(extras, reverse=True):
        if 0 < extra <= room:
            room -= extra
    return room


def _room_for_exact(rounded: dict, room: float) -> set:
    """The leaves kept out of JPEG but rounded (float16, a quantized
    vector) that a byte target stores exactly instead, smallest first, as far
    as ``room`` (bytes left with every coded leaf at its finest coding) holds
    their extra bytes (``rounded``: name -> bytes short of exact). Found by
    review: at 6x a quantized graph's float vectors were rounded with a
    quarter of the file unspent, its output 15x further off than at its
    default save. A single-process save only (each process analyses its own
    leaves)."""
    chosen = set()
    for extra, name in sorted((extra, name) for name, extra in rounded.items()):
        if extra > room:
            break
        chosen.add(name)
        room -= extra
    return chosen


def _exact_instead(curves: dict, sens: dict, tiles: dict, raw_bytes: dict, budget: float) -> set:
    """The coded leaves a byte target stores exactly (raw) instead, when even
    every leaf's finest coding leaves bytes of ``budget`` unused (a target
    under about 3x): the leaves whose weighted squared error is most, as far
    as their extra bytes fit (a knapsack: the better of filling by error per
    extra byte and by error). Found by review: such targets gave the finest
    codings' file, far under the target, and no leaf exact."""
    room = budget - sum(float(c.nbytes[-1]) for c in curves.values())
    candidates = []   # (weighted squared error removed, extra bytes, name)
    for name, c in curves.items():
        extra = raw_bytes[name] + _SMALL_BLOB_OVERHEAD - float(c.nbytes[-1]) - tiles[name]
        removed = sens[name] * float(c.sse[-1])
        if removed > 0 and extra <= room:
            candidates.append((removed, max(extra, 1.0), name))

    def fill(order):
        left, chosen = room, []
        for removed, extra, name in order:
            if extra <= left:
                chosen.append((removed, name))
                left -= extra
        return sum(r for r, _ in chosen), {name for _, name in chosen}

    by_density = sorted(candidates, key=lambda c: (c[0] / c[1], c[2]), reverse=True)
    by_error = sorted(candidates, key=lambda c: (c[0], c[2]), reverse=True)
    return max(fill(by_density), fill(by_error), key=lambda f: f[0])[1]


class _Turns:
    """Lets threads through a section one at a time, in a fixed order of
    names; a name marked done (its section run, or skipped after an error)
    lets the next one through."""

    def __init__(self, names: Sequence[str]):
        self.position = {name: i for i, name in enumerate(names)}
        self.finished: set = set()
        self.next = 0
        self.changed = threading.Condition()

    def reached(self, name: str) -> bool:
        """Whether ``name``'s turn has come (it need not wait)."""
        return self.next >= self.position[name]

    def wait(self, name: str) -> None:
        position = self.position[name]
        with self.changed:
            self.changed.wait_for(lambda: self.next >= position)

    def done(self, name: str) -> None:
        with self.changed:
            self.finished.add(self.position.get(name))
            while self.next in self.finished:
                self.next += 1
            self.changed.notify_all()


class _BudgetEncoder:
    """Codes leaves under a byte budget: each leaf is prepared on the save's
    threads, coded ahead at the last choice's candidate while it waits,
    then chosen in its turn (the allocator's choice for a leaf depends on
    the bytes the leaves before it took), the coding ahead kept where the
    choice is the same: the files are those of a save coding one leaf at a
    time while the loading, preparing, coding and packing of other leaves
    overlap the turns."""

    def __init__(self, allocator, leaf_coder: "_LeafCoder", fine: Collection[str] = (),
                 ahead_bytes: float = 0.0):
        self.allocator = allocator
        self.leaf_coder = leaf_coder
        self.fine = frozenset(fine)   # offered one fine step beside JPEG (FINE_MARGIN)
        self.turns = _Turns([])
        # Codings held ahead of their turns (BudgetAllocator.coded_ahead) take
        # at most this many bytes, as their candidates predict them: about a
        # leaf beyond what coding one leaf at a time holds (found by review:
        # 8 threads held 44 MB more of a 232 MB tree's leaves of 16-64 MB).
        self.ahead_bytes = ahead_bytes
        self._held: dict = {}   # name -> the bytes its coding ahead holds
        self._holding = threading.Lock()

    def order(self, names: Sequence[str]) -> None:
        """The order leaves are coded in (the save's storing order)."""
        self.turns = _Turns(names)

    def __call__(self, name, array):
        p = self.leaf_coder.prepare(name, array)
        try:
            # coded meanwhile where it must wait (the coding its turn keeps,
            # if it chooses alike: BudgetAllocator.coded_ahead)
            ahead = None if self.turns.reached(name) else self.allocator.coded_ahead(
                name, p, lambda nbytes: self._hold(name, nbytes))
            self.turns.wait(name)
            try:
                return self.allocator.encode(name, p, ahead)
            finally:
                self.turns.done(name)
        finally:
            with self._holding:
                self._held.pop(name, None)

    def _hold(self, name: str, nbytes: float) -> bool:
        """Whether leaf ``name`` may hold a coding of ``nbytes`` ahead of its turn."""
        with self._holding:
            if sum(self._held.values()) + nbytes > self.ahead_bytes:
                return False
            self._held[name] = nbytes
            return True

    def release(self, name) -> None:
        """Leaf ``name`` will not be coded (stored raw, or its save failed)."""
        if name in self.turns.position:
            self.turns.done(name)


TARGET_TOLERANCE = 0.02   # byte targets promise the file's size within 2%
# Where the coded leaves' smallest codings, as their probes measure them,
# take more than this share of their budget, they are coded to be sure.
NEAR_SMALLEST = 0.9


# A refused target's moments are named as the remedy from this share of
# the bytes stored apart.
MOMENTS_MAIN_SHARE = 0.25


def _coarsest_coded_bytes(entries, curves: dict, leaf_coder: "_LeafCoder") -> int:
    """The bytes of the coded leaves' smallest codings, each leaf coded so."""
    from jaxjpeg import rate

    arrays = {leaf.name: leaf for leaf in entries}
    total = 0
    for name, c in curves.items():
        p = leaf_coder.prepare(name, arrays[name].array())
        leaf_coder.remember(name, p)   # coded again, as prepared, if it is saved
        total += rate.encode_candidate(p, c, int(np.argmin(c.nbytes)), leaf_coder.coding).nbytes
    return total


def _asked(rate: dict) -> str:
    """The byte target a save was given, as the user wrote it ("target_ratio=8")."""
    return ", ".join(f"{k}={v:g}" for k, v in rate.items()
                     if k in ("target_ratio", "target_bytes", "bits_per_weight"))


def _target_miss(target: int | None, file_bytes: int, rate: dict,
                 all_exact: bool = False, all_finest: bool = False,
                 records: Iterable[dict] = (), distributed: bool = False) -> str | None:
    """A warning when the file's size missed a byte target by more than
    TARGET_TOLERANCE (every leaf at its finest coding, or no coding the
    allocation tried between two candidates lies closer; found by review:
    "no coding lies closer" was said where an untried one did, at 3x
    targets above the leaves' finest codings), else None."""
    if target is None or abs(file_bytes - target) <= TARGET_TOLERANCE * target:
        return None
    asked = _asked(rate)
    under = file_bytes < target
    # (found by review: "the closest coding" was said where every coded leaf
    # was at its finest)
    why = ("every leaf is stored exactly" if all_exact and under
           else "every coded leaf at its finest coding" if all_finest and under
           else "the closest coding of its leaves the allocation found")
    # the steps the leaves on log2 steps are on (found by review: "finest"
    # where moments could be exact; then steps they were not on)
    log2_steps = [r["step"] for r in records if r.get("domain") in quantized_vectors.LOG_DOMAINS]
    if under and log2_steps:
        steps = "-".join(f"{s:g}" for s in sorted({min(log2_steps), max(log2_steps)}))
        why += ("; leaves on log2 steps (jaxjpeg.magnitudes: optimizer moments, values "
                f">= 0 of a wide spread) are on steps of {steps} "
                + ("(a distributed save keeps them there: each process codes its own leaves)"
                   if distributed else f"(at the finest {magnitudes.FINEST_STEP:g}, then exact)"))
    return (f"jaxjpeg: {asked} asks for {target:,} bytes; the file has {file_bytes:,} "
            f"({file_bytes / target - 1:+.1%}), {why}")


# A byte target warns where the values kept exactly (side lists) take more
# than this share of the file: the rest of those leaves is coded in what is
# left (found by review: 5% of a leaf's values at 1e4, kept at 8 bytes
# each, took 80% of an 8x file, and its other weights restored at relative
# error 0.71 without a word).
SIDE_LIST_SHARE = 0.25


def _side_list_warning(target: int | None, rate: dict, records: list,
                       file_bytes: int) -> str | None:
    """The warning of SIDE_LIST_SHARE under a byte target, or None."""
    if target is None:
        return None
    kept = {}
    for record in records:
        count = record.get("outliers", 0) if record.get("kind") == "jpeg" else 0
        if count:
            size = math.prod(record["shape"])
            each = views.Outliers.index_dtype(size).itemsize + np.dtype(
                parse_dtype(record["dtype"])).itemsize
            kept[path_string(record["path"])] = (count, count * each)
    total = sum(b for _, b in kept.values())
    if total <= SIDE_LIST_SHARE * file_bytes:
        return None
    asked = _asked(rate)
    largest = sorted(kept, key=lambda name: -kept[name][1])
    leaves = first_names([f"{name} ({kept[name][0]:,} values)" for name in largest])
    return (f"jaxjpeg: {asked}: values kept exactly (far from the rest of their leaves, or "
            f"not finite) take {total:,} of the file's {file_bytes:,} bytes "
            f"({total / file_bytes:.0%}): {leaves}; the rest of those leaves is coded in what "
            "is left (a larger file codes it better: a lower target_ratio, more bits_per_weight)")


def _check_positive(name: str, value) -> None:
    """A rate option's number: positive and finite, not a bool (found by
    review: bits_per_weight=inf overflowed, target_ratio="8" failed in a
    comparison, target_ratio=True was taken as 1)."""
    if not (isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
            and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _target_size(entries, target_ratio, target_bytes, bits_per_weight) -> int | None:
    """The file size asked for, in bytes: ratios are against float32."""
    elements = sum(leaf.size for leaf in entries)
    for name, value in (("target_ratio", target_ratio), ("target_bytes", target_bytes),
                        ("bits_per_weight", bits_per_weight)):
        if value is not None:
            _check_positive(name, value)
    if target_ratio is not None:
        return int(4 * elements / target_ratio)
    if bits_per_weight is not None:
        return int(bits_per_weight * elements / 8)
    return None if target_bytes is None else int(target_bytes)


def save(path, tree, *, relative_step: float | None = None, quant_step: float | None = None,
         quality: int | None = None,
         qtable: Sequence[int] | None = None, error_bound: float | None = None,
         target_ratio: float | None = None, target_bytes: int | None = None,
         bits_per_weight: float | None = None,
         sensitivity: dict | None = None, bits: int | None = None, clip: str = "common",
         view: str = "auto",
         restart_interval: int = codec.DEFAULT_RESTART_INTERVAL,
         tile_shape: tuple[int, int] = codec.DEFAULT_TILE_SHAPE, policy: Policy | None = None,
         encoder: Callable[[str, np.ndarray], codec.EncodedTensor] | None = None,
         progress: bool | None = None, metadata: dict | None = None,
         input_covariance: dict | None = None, batchnorm_prior: bool = True,
         input_mean: dict | None = None, distributed: bool = False) -> SaveReport:
    """Saves a pytree of arrays to ``path`` atomically.

    The rate is set by one of:

    * ``relative_step`` (the default, ``DEFAULT_RELATIVE_STEP``): uniform
      quantization of every DCT coefficient with a step of this fraction of
      the tensor's RMS (about its rows' means, which the maps carry) for a
      leaf of the tree's typical size, coarser for
      larger leaves and finer for smaller ones, by (size / typical
      size)^``STEP_SIZE_POWER``, as a data-free byte target would share the
      bytes (8 or 12-bit samples chosen per tensor);
    * ``quant_step``: a flat quantization table, in sample units of ``bits``
      (named so that it is never mistaken for a training step);
    * ``quality``: the standard JPEG table scaled to 1..100; ``qtable``: any
      64-entry table;
    * ``error_bound``: each leaf's relative RMS error at most this, over
      the values it codes (those kept exactly count in neither the error
      nor the norm; the step is searched per leaf, 8 or 12-bit samples);
    * ``target_ratio`` (against float32, whatever the leaves' dtypes),
      ``bits_per_weight`` (all-in: file bytes * 8 / weights) or
      ``target_bytes``: the whole file's size, shared across leaves by
      marginal rate-distortion (a size beyond every leaf's finest coding,
      about 3x, stores the leaves whose error weighs most raw, exactly, as
      far as the bytes allow);
    * ``encoder(path, array) -> EncodedTensor`` for full per-leaf control
      (None stores the leaf raw; ``bits``, ``clip``, ``view``, ``tile_shape``
      and ``restart_interval`` are then the encoder's to choose, refused here);
      an encoder that takes a ``shards`` keyword gets the leaf's shards
      ((start, stop, step) per axis of each; None when none are known) to
      cut its tiles along, as the built-in coding does:
      ``encode_tensor(codec.prepare(array).with_shards(shards), ...)``.

    ``sensitivity`` (leaf path -> importance) steers where the error goes: a
    number weighs the whole leaf's squared error (e.g. mean squared gradients
    from :func:`jaxjpeg.rate.sensitivity_from_gradients`); an array
    broadcastable to the leaf's shape, in the leaf's own layout (per element,
    or e.g. ``(O, 1, 1, 1)`` per output channel of a PyTorch conv), also sets
    how the step varies inside the leaf. Without it every leaf's relative
    error counts alike and, inside a leaf, every value's error alike: one
    step for the whole leaf, so a channel whose weights are far smaller than
    the others' gets a larger relative error and may come back constant; an
    importance array per channel gives such channels finer steps, as
    ``(importance + its mean)^-½`` (rate.IMPORTANCE_DAMPING: steps inside a
    leaf differ by at most ``(1 + max / mean)^½``, so a channel 1000x
    smaller than the others is still coarse; ``Policy(lossless=...)`` keeps it).
    Under a byte target it weighs the allocation; under ``relative_step``
    (the default) it shares the default's bytes the same way: each steered
    leaf's step scales as ``(data-free weight / sensitivity)^½``, and every
    leaf's by one factor that keeps the size-weighted mean log step, so the
    file stays about the default's size (a sensitivity of 0 leaves only
    each row's mean, which the maps keep). A leaf without one keeps its data-free weight (its relative
    error times size^``LEAF_SIZE_POWER``), against which a partial mapping's
    numbers count, as under a byte target; when every coded leaf has one,
    only their ratios matter. ``quant_step``, ``quality``, ``qtable`` and
    ``error_bound`` fix each leaf's step or error themselves: there an array
    only shapes the steps inside the leaf. A path that is not a leaf of the
    tree is refused (ValueError).

    Every rate control lets the coder choose each leaf's matrix view
    (``view="framework"`` keeps the arrays' own axis order instead), keeps
    NaN, infinite and extreme values exactly in a side list, and stores a
    leaf raw when coding would not make it smaller.

    ``input_covariance`` (leaf path -> :class:`jaxjpeg.feedback.InputCovariance`,
    the second moment of the layer's inputs over calibration data) makes
    those leaves' coding error feedback (GPTQ-style): the error lands where
    the layer's inputs cancel it, so the layer's outputs, not its weights,
    stay close. Not with ``error_bound``, which bounds the weights' error.

    ``batchnorm_prior`` (byte targets and ``relative_step``, the default): a
    weight fed by a BatchNorm layer (found in the tree's insertion order,
    e.g. a PyTorch state dict or Flax variables with their batch_stats) is
    coded for the inputs the BatchNorm and a ReLU-family activation give it
    (:mod:`jaxjpeg.priors`): a convolution with error feedback against their
    modelled covariance, a matrix weighing each input channel by its power;
    an ``input_covariance`` for the leaf takes its place; a ``sensitivity``
    does not (a number weighs the leaf, an array replaces only a matrix's
    input powers: feedback and bias correction stay). The running mean of
    the BatchNorm after such a weight is moved by the mean shift the coded
    weight adds, or, with no BatchNorm after it (a classifier), its own bias
    is (data-free bias correction): restored, it differs from the saved one
    by that shift. A convolution kernel no
    BatchNorm feeds (BatchNorm folded into it, a depthwise kernel) is coded
    with error feedback against a mean common to its input channels and
    taps. A ``distributed=True`` save codes with the same prior (its shifts
    pass between the processes).

    ``input_mean`` (leaf path -> :class:`jaxjpeg.InputMean`, under any lossy
    coding): the mean of a layer's inputs measured on calibration data. The
    mean shift the coded weight adds, ``ΔW·E[x]`` per output channel, goes
    into the running mean of the BatchNorm after it or, with none, out of
    the weight's own bias (:mod:`jaxjpeg.bias_correction`); it replaces the
    prior's modelled mean. A mean with no such leaf to take it is reported
    by a warning.

    ``bits`` (8 or 12) fixes the sample precision; by default it is 8 for
    ``quant_step``/``quality``/``qtable`` and chosen per tensor by the other rate
    controls. ``clip`` selects the weight-to-sample mapping
    (:func:`jaxjpeg.mapping.row_affine`); other than "common" only with
    ``quant_step``, ``quality``, ``qtable`` or ``error_bound``, and then
    each row's range is its own: stacked layers and importance arrays shape
    column steps only.

    ``metadata``: a dict of your own (str keys; str, int, float, bool, None,
    lists and dicts as values; at most 1 MiB of JSON) stored in the header
    and returned by ``jaxjpeg.open(path).metadata``; checked before anything
    is coded (TypeError or ValueError).

    The file appears at ``path`` only when complete: a
    crash mid-save leaves any previous checkpoint there intact.

    A leaf with the same bits as an earlier one (tied weights: one tensor
    under two names) is stored once (:mod:`jaxjpeg.ties`).

    ``distributed=True``: every process of ``jax.distributed`` calls save
    with the same tree (global arrays, sharded any way); each codes and
    writes its share of the leaves in parallel and process 0 commits the one
    file (:mod:`jaxjpeg.distributed_save`), which any topology restores.
    Byte targets allocate one budget over every process's leaves.
    """
    if distributed:
        if input_mean:
            raise ValueError("input_mean is not supported with distributed=True")
        from jaxjpeg.distributed_save import save_distributed
        return save_distributed(path, tree,
                                dict(_options(locals()), batchnorm_prior=batchnorm_prior))
    entries = [SourceLeaf.of(records, _to_numpy(leaf), shard_regions(leaf), impl)
               for records, leaf, impl in _leaves(tree)]
    options = _options(locals())
    if batchnorm_prior and _prior_applies(entries, options):
        from jaxjpeg import priors
        options["prior"] = priors.batchnorm_prior(tree)
    if input_mean:
        options["input_means"] = _input_mean_takers(input_mean, entries, tree)
    return save_leaves(path, entries, batchnorm_prior=batchnorm_prior, **options)


def _input_mean_takers(input_mean: dict, leaves, tree) -> dict:
    """{weight: (InputMean, taker leaf)} of a user's ``input_mean``,
    checked (unknown leaves, wrong types, shapes that do not fit: errors);
    takers not given are found in the tree's order, and a mean with none
    to take its shift is reported by a warning."""
    from jaxjpeg import priors

    shapes = {leaf.name: leaf.shape for leaf in leaves}
    dtypes = {leaf.name: leaf.dtype for leaf in leaves}

    def check(mean, shape):
        mean.check(shape)
        _check_taker(mean, shape, shapes, dtypes)
    _check_per_leaf("input_mean", input_mean, InputMean, shapes, check)
    # A taker not saved (found by review: README's NNX recipe saves
    # nnx.state(model, nnx.Param), whose BatchNorms' running means the
    # takers nnx_input_means gives are not; the save failed): the shift goes
    # to what the tree's order finds (the layer's own bias), else nowhere.
    unsaved = sorted(name for name, mean in input_mean.items()
                     if mean.taker and mean.taker not in shapes)
    if unsaved:
        warnings.warn(f"input_mean of {len(unsaved)} leaves names takers the tree does not hold "
                      f"({input_mean[unsaved[0]].taker!r} for {unsaved[0]!r}, ...): their "
                      "shift goes to the layer's own bias where it has one", stacklevel=3)
        input_mean = {name: dataclasses.replace(mean, taker=None) if name in unsaved else mean
                      for name, mean in input_mean.items()}
    given = {name: mean.taker for name, mean in input_mean.items() if mean.taker}
    found = priors.shift_targets(tree, {name: mean.out_axis % len(shapes[name])
                                        for name, mean in input_mean.items()
                                        if not mean.taker})
    # an integer bias found in the tree's order cannot take a shift (found by
    # review: the correction was dropped without a word)
    takers = {name: taker for name, taker in {**found, **given}.items()
              if bias_correction.takes_shifts(dtypes[taker])}
    unused = sorted(set(input_mean) - set(takers))
    if unused:
        warnings.warn(f"input_mean of {len(unused)} leaves unused: no BatchNorm after the "
                      f"layer and no floating-point bias of its output size to take its shift "
                      f"({first_names(unused)})",
                      stacklevel=3)
    return {name: (input_mean[name], taker) for name, taker in takers.items()}


def _check_taker(mean: InputMean, shape: tuple, shapes: dict, dtypes: dict) -> None:
    if mean.taker is None:
        return
    channels = shape[mean.out_axis]
    if mean.taker not in shapes:   # not saved: _input_mean_takers finds another
        return
    if shapes[mean.taker] != (channels,):
        raise ValueError(f"taker {mean.taker!r} has shape {shapes[mean.taker]}; the layer's "
                         f"{channels} output channels need ({channels},)")
    if not bias_correction.takes_shifts(dtypes[mean.taker]):
        raise ValueError(f"taker {mean.taker!r} holds {dtypes[mean.taker]} values, which cannot "
                         "take the layer's shift: name a floating-point bias or running mean")


def _options(values: dict) -> dict:
    """save()'s keyword options from its locals (passed on unchanged, but a
    rate given as a 0-d array, jnp.float32(8) or jnp.array(8.0), is taken as
    its number: found by review, refused as "not a positive finite number")."""
    return {k: _as_number(values[k]) if k in _RATE_NUMBERS else values[k]
            for k in _SAVE_OPTIONS}


_RATE_NUMBERS = ("relative_step", "quant_step", "quality", "error_bound", "target_ratio",
                 "target_bytes", "bits_per_weight")


def _as_number(value):
    """A 0-d integer or floating array as a Python number; anything else as given."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape == () and dtype is not None and np.dtype(dtype).kind in "iuf" \
            and not isinstance(value, (int, float)):
        return np.asarray(value).item()
    return value


_SAVE_OPTIONS = ("relative_step", "quant_step", "quality", "qtable", "error_bound",
                 "target_ratio", "target_bytes", "bits_per_weight", "sensitivity", "bits",
                 "clip", "view", "restart_interval", "tile_shape", "policy", "encoder",
                 "progress", "metadata", "input_covariance")


@dataclasses.dataclass(frozen=True)
class SourceLeaf:
    """A leaf to save, described up front and loaded only when the save
    reaches it (:func:`save_leaves`): a converter reading a file tensor by
    tensor then holds about one tensor at a time, not the whole tree."""

    records: list                       # key path, as jaxjpeg.treepaths records it
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]      # the array (any byte order), read when called
    # The array's shards as (start, stop, step) per axis (shard_regions): a
    # coded leaf's tiles get edges at their boundaries. None: no sharding known.
    shards: tuple | None = None
    resident: bool = False   # load() returns an array held in memory (read at no cost)
    prng_impl: str | None = None   # the key data of a typed PRNG key array of this implementation

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype).newbyteorder("="))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.prng_impl is not None:
            prng_keys.check_data(self.name, self.prng_impl, self.shape, self.dtype)

    @classmethod
    def of(cls, records, array: np.ndarray, shards: tuple | None = None,
           prng_impl: str | None = None) -> "SourceLeaf":
        return cls(records, tuple(array.shape), array.dtype, lambda: array, shards, True,
                   prng_impl)

    @functools.cached_property
    def name(self) -> str:   # (asked for often: 16 times a leaf by a save of 20,000)
        return path_string(self.records)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def stand_in(self) -> np.ndarray:
        """A zero-stride array of the leaf's shape and dtype, not loaded (what
        a policy or the BatchNorm prior may look at before the save)."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def array(self) -> np.ndarray:
        array = np.asarray(self.load())
        if array.shape != self.shape or array.dtype.newbyteorder("=") != self.dtype:
            raise ValueError(f"leaf {self.name!r}: loaded {array.dtype}{list(array.shape)}, "
                             f"described as {self.dtype}{list(self.shape)}")
        if not array.dtype.isnative:  # big-endian input: stored (and restored) in native order
            array = array.astype(array.dtype.newbyteorder("="))
        if array.dtype == np.bool_ and array.size and np.any(array.view(np.uint8) > 1):
            # True as another byte than 1 (a safetensors or npz file may hold
            # one): stored as 1, which readers check (found by review: such a
            # save succeeded and no reader could open the file)
            array = array.view(np.uint8) != 0
        return array


# Leaves coded at once (each on its own thread; the native encoder releases
# the GIL) and source bytes loaded ahead of the writer at most: the window
# bounds memory to about this much beyond the largest leaf, for leaves
# under it. Each leaf coded takes a working copy or two of itself (its
# float32 matrix, where its view transposes it; statistics block by block),
# and the largest leaf and the next in order are coded at once whatever
# their size: two 302 MB leaves took about 1 GB (found by review).
SAVE_WINDOW_BYTES = 128 * 2**20


def save_workers() -> int:
    """Threads coding leaves: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def save_leaves(path, leaves: Sequence[SourceLeaf], *, batchnorm_prior: bool = True,
                **options) -> SaveReport:
    """:func:`save` of leaves given as :class:`SourceLeaf` (same options).

    Leaves are loaded, coded and written in a pipeline: up to
    :func:`save_workers` leaves are coded at once (about
    ``SAVE_WINDOW_BYTES`` of them at most, the largest leaf started first),
    and each is written, in order, as soon as it and the ones before it are
    done. Under a byte target the BatchNorm prior pairs the leaves in the
    order given (see :func:`save`).
    """
    return prepared_save(path, leaves, batchnorm_prior=batchnorm_prior, **options).run()


def prepared_save(path, leaves: Sequence[SourceLeaf], *, batchnorm_prior: bool = True,
                  **options) -> "_Save":
    """:func:`save_leaves` up to writing: the options checked and the prior
    made; ``run()`` codes and writes (an asynchronous save raises what it
    refuses before it returns, and writes later)."""
    leaves = list(leaves)
    if batchnorm_prior and options.get("prior") is None and _prior_applies(leaves, options):
        options["prior"] = _prior_of_leaves(leaves)
    return _Save(path, leaves, **options)


# The save options that choose a rate control other than relative_step.
_OTHER_RATE_CONTROLS = ("quant_step", "quality", "qtable", "error_bound", "encoder",
                        "target_ratio", "target_bytes", "bits_per_weight")


def _uses_relative_step(options: dict) -> bool:
    """Whether save ``options`` code at relative_step (given or the default)."""
    return all(options.get(k) is None for k in _OTHER_RATE_CONTROLS)


def _prior_applies(leaves, options: dict) -> bool:
    """Whether the rate control codes with the BatchNorm prior: byte targets
    and relative_step (the default). The tables and ``error_bound`` set each
    leaf's weight error, not what the network computes with it."""
    if _target_size(leaves, options.get("target_ratio"), options.get("target_bytes"),
                    options.get("bits_per_weight")) is not None:
        return True
    return _uses_relative_step(options)


def _prior_of_leaves(leaves: Sequence[SourceLeaf]):
    """The BatchNorm prior of leaves not loaded yet: the vectors a BatchNorm
    may hold (small) are loaded, every other leaf stands in as a zero-stride
    array of its shape; the prior loads the weights whose input it tests
    against the running mean after them, one at a time."""
    return prior_of_unloaded([(leaf.name, leaf.shape, leaf.dtype, leaf.array)
                              for leaf in leaves])


def prior_of_unloaded(described: Sequence[tuple]):
    """:func:`_prior_of_leaves` of leaves described as ``(name, shape,
    dtype, read)`` in the tree's order, ``read()`` giving the array."""
    from jaxjpeg import priors

    stand_ins = {name: read() if priors.may_be_batchnorm_vector(name, shape)
                 else np.broadcast_to(np.zeros((), dtype), shape)
                 for name, shape, dtype, read in described}
    reads = {name: read for name, _, _, read in described}
    return priors.batchnorm_prior(stand_ins, load=lambda name: reads[name]())


def check_save_options(*, relative_step=None, quant_step=None, quality=None, qtable=None,
                       error_bound=None, target_ratio=None, target_bytes=None,
                       bits_per_weight=None, bits=None, clip="common", view="auto",
                       restart_interval=codec.DEFAULT_RESTART_INTERVAL,
                       tile_shape=codec.DEFAULT_TILE_SHAPE, policy=None, encoder=None,
                       metadata=None, **tree_options) -> dict:
    """Refuses what :func:`save`'s options ask of any tree (the rest is
    checked against the leaves); returns the rate control given, or the
    default's. An Orbax manager checks them before its save starts."""
    layout.checked_user_metadata(metadata)
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a jaxjpeg.Policy, got {type(policy).__name__}")
    _check_tile_shape(tile_shape)
    rates = dict(relative_step=relative_step, quant_step=quant_step, quality=quality,
                 qtable=qtable, error_bound=error_bound, target_ratio=target_ratio,
                 target_bytes=target_bytes, bits_per_weight=bits_per_weight, encoder=encoder)
    given = {k: v for k, v in rates.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one rate control, got {sorted(given)}")
    for name in ("error_bound", "quant_step", "target_ratio", "target_bytes",
                 "bits_per_weight", "relative_step"):
        if given.get(name) is not None:
            _check_positive(name, given[name])
    if error_bound is not None and error_bound >= 1:
        # found by review: error_bound=2 was taken (a file of zeros meets it)
        raise ValueError(f"error_bound is a relative RMS error (0.05 is 5%), below 1; "
                         f"got {error_bound!r}")
    if quality is not None and (isinstance(quality, (bool, np.bool_))
                                or not isinstance(quality, (int, float, np.number))
                                or not 1 <= quality <= 100 or quality != int(quality)):
        raise ValueError(f"quality must be in 1..100 (a whole number), got {quality!r}")
    given = given or {"relative_step": DEFAULT_RELATIVE_STEP}
    _check_coding_options(bits, view, clip, restart_interval, encoder)
    _check_encoder_options(encoder, bits, view, clip, restart_interval, tile_shape)
    planned = sorted(set(given) & {"relative_step", "target_ratio", "target_bytes",
                                   "bits_per_weight"})
    if clip != "common" and planned:
        # Found by review: their steps and curves are the shared scale's,
        # so other maps missed byte targets by +37..105% and the default's
        # step (3.9 bits a weight became 6.7).
        raise ValueError(f"clip={clip!r} goes with quant_step, quality, qtable or "
                         f"error_bound: {planned[0]} plans each leaf's steps on the shared "
                         "scale of clip='common'")
    if quality is not None or quant_step is not None or qtable is not None:
        # a bad table refused now, not by the first leaf's coding (which an
        # asynchronous save, Orbax's, runs after save() has returned)
        codec.quant_table(bits=bits or 8, quality=quality, quant_step=quant_step,
                          qtable=qtable)
    return given


class _Save:
    """One save: the options checked, the encoder chosen, then the pipeline."""

    def __init__(self, path, leaves, *, relative_step=None, quant_step=None, quality=None,
                 qtable=None, error_bound=None, target_ratio=None, target_bytes=None,
                 bits_per_weight=None, sensitivity=None, bits=None, clip="common",
                 view="auto", restart_interval=codec.DEFAULT_RESTART_INTERVAL,
                 tile_shape=codec.DEFAULT_TILE_SHAPE, policy=None, encoder=None,
                 progress=None, metadata=None, input_covariance=None, prior=None,
                 input_means=None, defer_budget=False):
        self.path = path
        self.x64 = bool(jax.config.jax_enable_x64)   # this thread's (the workers' may differ)
        self.user_metadata = layout.checked_user_metadata(metadata)   # checked once, kept
        given = check_save_options(
            relative_step=relative_step, quant_step=quant_step, quality=quality, qtable=qtable,
            error_bound=error_bound, target_ratio=target_ratio, target_bytes=target_bytes,
            bits_per_weight=bits_per_weight, bits=bits, clip=clip, view=view,
            restart_interval=restart_interval, tile_shape=tile_shape, policy=policy,
            encoder=encoder)
        # Python ints from here (found by review: numpy integers passed the
        # checks, then failed writing the header, after every leaf was coded)
        bits = None if bits is None else int(bits)
        restart_interval, tile_shape = int(restart_interval), tuple(map(int, tile_shape))
        self.has_metadata = metadata is not None
        self.policy = (policy or Policy()).resolved(leaves)
        if self.policy.stacked is None:
            self.policy = dataclasses.replace(
                self.policy, stacked=stacks.stack_axes({leaf.name: leaf.shape for leaf in leaves}))
        self.policy = _checked_stacks(self.policy, leaves).for_leaves(leaf.name for leaf in leaves)
        if prior is not None:
            # A stack no BatchNorm feeds is coded as its layers, each on its
            # own scale (jaxjpeg.stacks), not as a convolution with a common
            # input mean its shape may pass for (found by review: a scanned
            # attention output (L, H, head_dim, D), its smallest layer 4x
            # worse; a Policy(stacked=...) was overridden so). A scanned
            # convolution a BatchNorm feeds keeps the prior, which models it
            # (review of the first version, which took it away: a scanned
            # CNN's 8x output error 0.070 -> 0.096).
            prior = prior.without(
                leaf.name for leaf in leaves if self.policy.stack_axis(leaf.name) is not None
                and leaf.name in prior.common_means and leaf.name not in prior.moments)
        self.leaves = leaves
        for leaf in leaves:
            _check_storable(leaf.name, leaf)
        _check_paths([(leaf.records, leaf) for leaf in leaves])
        relative_step = given.get("relative_step")
        self.rate = _rate_record(given)
        # (a distributed save's leaves are stand-ins, read by their owners later)
        self.log_coding = _LogCoding(leaves, self.policy, error_bound, read=not defer_budget)
        self.leaf_index = {leaf.name: i for i, leaf in enumerate(leaves)}
        # Every kernel the prior models, also one a user's sensitivity or
        # covariance steers: the shift its coding leaves is the same kind.
        # A user's input means correct their weights under any lossy coding.
        self.bias_correction = BiasCorrection.of(prior, input_means,
                                                 exact=self.policy.names_lossless)
        # (a distributed save's leaves, not held, are never tied; nor under a
        # user's encoder, which may code each name its own way: review)
        self.tied = ({} if encoder is not None else ties.tied_leaves(
            leaves, self._tie_treatment(sensitivity, input_covariance, prior)))
        tied_to = {leaves[first].name for first in self.tied.values()}
        # every leaf but the tied ones is coded (and weighs in the rate's choices)
        leaves = [leaf for i, leaf in enumerate(leaves) if i not in self.tied]
        # the leaves a sensitivity may weigh, found once (each read and tested)
        candidates = functools.cache(
            lambda: _jpeg_candidates(leaves, self.policy, self.log_coding))
        self.error_bound = error_bound
        _check_covariances(input_covariance, self.leaves, error_bound)
        fixed_by = next((name for name, value in (
            ("quant_step", quant_step), ("quality", quality), ("qtable", qtable),
            ("error_bound", error_bound)) if value is not None), None)
        _check_sensitivity_names(sensitivity, self.leaves, fixed_by=fixed_by)
        leaf_coder = _LeafCoder(sensitivity, view, dict(restart_interval=restart_interval,
                                                        tile_shape=tile_shape, clip=clip),
                                input_covariance,
                                {leaf.name: leaf.shards for leaf in leaves if leaf.shards},
                                prior, input_means)
        self.leaf_coder = leaf_coder
        leaf_coder.stacked = self.policy.stack_axis
        leaf_coder.weighing = embeddings.weighing_sizes(
            {leaf.name: _slice_size(leaf, self.policy) for leaf in leaves
             if leaf.size > 0 and self.policy.should_compress(leaf.name, leaf.stand_in())},
            tied_to, [leaf.name for leaf in leaves])
        if leaf_coder.prior:   # the leaves the prior weighs
            self.rate.update(leaf_coder.prior.record())

        def table_encoder(name, array):
            return codec.encode_tensor(leaf_coder.prepare(name, array), bits=bits or 8,
                                       quant_step=quant_step, quality=quality, qtable=qtable,
                                       **leaf_coder.coding)

        self.encode = _custom_encoder(encoder, leaf_coder.shards) if encoder else table_encoder
        self.user_encoder = encoder is not None   # its codings are stored as they are
        # A user's encoder and the byte budget (each leaf's share depends on
        # the ones coded before it) code one leaf at a time, in order.
        self.workers = 1 if encoder is not None else save_workers()
        self.window = SAVE_WINDOW_BYTES
        if relative_step is not None:
            reference = _step_reference_size(leaves, self.policy)
            self.rate["reference_size"] = round(reference)
            steering = (_StepSteering.of(candidates(), sensitivity, self.policy,
                                         leaf_coder.weighing) if sensitivity else None)
            if steering is not None:
                self.rate["steered_leaves"] = len(steering.steered)
            # A sensitivity a user gives a recurrent leaf replaces the rule.
            recurrent = frozenset(self.recurrent - set(sensitivity or ()))
            if recurrent:
                self.rate["recurrent_leaves"] = len(recurrent)
            self.encode = _relative_step_encoder(relative_step, bits, leaf_coder, reference,
                                                 steering, recurrent)
        if error_bound is not None:
            self.encode = _error_bound_encoder(error_bound, bits, leaf_coder)
            # A step search holds trial codings (and a decoded copy of a leaf
            # whose view permutes its axes; others are checked tile by tile):
            # the largest leaf's bytes in flight, not a window (a large leaf
            # then codes alone, its tiles on every core).
            self.window = max((leaf.nbytes for leaf in leaves), default=0)
        # against the whole tree: its tied leaves' bytes go to the others
        target = _target_size(self.leaves, target_ratio, target_bytes, bits_per_weight)
        self.target = target
        leaf_coder.numbers_weigh = relative_step is not None or target is not None
        # (not in a distributed save, whose leaves here are shapes only: found by
        # review, every such save with a sensitivity and a byte target failed)
        if sensitivity and leaf_coder.numbers_weigh and not defer_budget:
            _warn_partial_sensitivity(candidates(), sensitivity, leaf_coder.weighing)
        self.lossy_rate = target is not None
        self.coded = None   # the names of the leaves to code, when the analysis knows them
        self.exact = {}   # leaves a byte target stores exactly though the policy codes them
        # (name -> True: as its codes on a grid, False: raw)
        self._budget = None
        if target is not None:
            self._budget = functools.partial(
                _target_encoder, leaves, self.policy, target, bits, leaf_coder,
                takers=self.bias_correction.takers, log_coding=self.log_coding,
                user_metadata=self.user_metadata if self.has_metadata else None)
            if not defer_budget:
                self.allocate()
        self.vector_limits = prior.vectors if prior is not None else {}
        self.progress = progress

    @functools.cached_property
    def recurrent(self) -> frozenset:
        """The leaves of recurrent cells (jaxjpeg.recurrent), found once."""
        return frozenset(recurrent_leaves((leaf.name for leaf in self.leaves),
                                          {leaf.name: leaf.shape for leaf in self.leaves}))

    def _tie_treatment(self, sensitivity, input_covariance, prior):
        """What the save does with a leaf by its name (ties.tied_leaves): None
        where a name gives it a coding of its own (a sensitivity, an input
        covariance, the BatchNorm prior, a bias correction, an optimizer
        moment's pairing), else what a policy's patterns choose."""
        recurrent = self.recurrent
        correction = self.bias_correction

        def treatment(leaf):
            name = leaf.name
            if (name in (sensitivity or {}) or name in (input_covariance or {})
                    or (prior is not None and prior.involves(name))
                    or name in correction.targets or name in correction.takers
                    or self.log_coding.names_a_moment(name)):
                return None
            return (self.policy.should_compress(name, leaf.stand_in()),
                    self.policy.names_lossless(name), self.policy.stack_axis(name),
                    name in recurrent)
        return treatment

    def allocate(self, analysed_by=analyse_here, own=None) -> None:
        """A byte target's analysis and allocation (``defer_budget``: left
        until now; ``analysed_by`` and ``own`` as :func:`_target_encoder`
        takes them)."""
        self.encode, self.coded, self.exact = self._budget(analysed_by=analysed_by, own=own)
        self._budget = None

    def run(self) -> SaveReport:
        bar = progress_bar(total=sum(leaf.nbytes for leaf in self.leaves), desc="jaxjpeg save",
                           unit="B", enabled=self.progress)
        records, reports = [None] * len(self.leaves), [None] * len(self.leaves)
        phases = self.storing_phases([(i, leaf) for i, leaf in enumerate(self.leaves)
                                      if i not in self.tied])
        budgeted = isinstance(self.encode, _BudgetEncoder)

        def coded():
            for phase in phases:   # (yield from closes in_order when closed)
                yield from in_order(self.store, phase, self.workers, self.window,
                                    lambda item: item[1].nbytes, largest_first=not budgeted)

        try:
            # closed here, whatever ends the save: left to the garbage
            # collector (a failed upload's traceback kept it), its threads
            # were joined in whichever thread collected it, which hung a
            # later save starting a thread (found in CI)
            with fmt.ContainerWriter(storage.as_location(self.path)) as writer, \
                    contextlib.closing(coded()) as stored:
                for (index, _), (blobs, record, report, warning) in zip(
                        phases[0] + phases[1], stored):
                    if warning:   # run <- save_leaves <- save <- the caller
                        warnings.warn(warning, stacklevel=4)
                    for name, data in blobs:
                        writer.add_blob(name, data)
                    records[index], reports[index] = record, report
                    bar.update(report.raw_bytes)
                for index, first in self.tied.items():
                    records[index], reports[index] = self._tied(index, first, reports[first])
                    bar.update(reports[index].raw_bytes)
                writer.set_metadata(self.metadata(records))
        finally:
            bar.close()
        report = SaveReport(storage.as_location(self.path), reports, storage.size(self.path))
        allocator = getattr(self.encode, "allocator", None)
        miss = _target_miss(self.target, report.file_bytes, self.rate,
                            all(leaf.exact for leaf in reports),
                            allocator is not None and allocator.all_finest, records)
        if miss:
            warnings.warn(miss, stacklevel=4)
        side = _side_list_warning(self.target, self.rate, records, report.file_bytes)
        if side:
            warnings.warn(side, stacklevel=4)
        return report

    def _tied(self, index: int, first: int, first_report: LeafReport) -> tuple[dict, LeafReport]:
        """(record, report) of leaf ``index``, tied to leaf ``first``."""
        leaf = self.leaves[index]
        record = {"path": leaf.records, "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                  "kind": TIED, "tied_to": first}
        return record, LeafReport(leaf.name, leaf.shape, str(leaf.dtype), first_report.kind,
                                  packed_nbytes(leaf.size, leaf.dtype), 0,
                                  f"stored once with {first_report.path} (the same values)",
                                  first_report.exact, first_report.path)

    def storing_phases(self, items: list) -> list:
        """``items`` ((index, leaf) this process stores) in two phases: the
        leaves a bias correction moves after every other leaf (the weights
        whose shifts they take may come later in the tree, and leaves code
        in parallel). Every taker sums its shifts in that order of the whole
        tree's leaves, and a byte target's leaves are coded in it (the
        largest not first)."""
        waits = self.bias_correction.waits
        names = [leaf.name for leaf in self.leaves]
        self.bias_correction.order([n for n in names if not waits(n)]
                                   + [n for n in names if waits(n)])
        phases = [[item for item in items if waits(item[1].name) == late]
                  for late in (False, True)]
        if isinstance(self.encode, _BudgetEncoder):
            self.encode.order([leaf.name for _, leaf in phases[0] + phases[1]
                               if leaf.name in self.coded])
        return phases

    def _may_be_thin(self, name: str, enc: codec.EncodedTensor, sparse: bool) -> bool:
        """Whether a JPEG coding of a thin view or of a ``sparse`` leaf
        (rate.is_sparse_leaf) may be replaced by a thin coding within its
        error (not a user's encoder's choice, nor a balanced leaf's: one step
        within its error in weight units, which its loud columns set, was
        what balancing refuses; found by review: byte targets then landed
        8-28% under). An encoding keeps no balanced flag: its column scales
        tell balanced columns; balanced rows leave no trace, but such a leaf
        is never thin (32 rows or more of 64 values or more) nor sparse."""
        from jaxjpeg import rate

        return (not self.user_encoder and self.leaf_coder.one_step_fits(name)
                and enc.col_scale is None
                and (min(enc.matrix_shape) < rate.THIN_SIDE or sparse))

    def metadata(self, records: list) -> dict:
        # files without tied leaves keep the version every reader since 2 reads
        version = TIED_VERSION if self.tied else CHECKPOINT_VERSION
        return {"format": CHECKPOINT_FORMAT, "version": version, "rate": self.rate,
                "leaves": records,
                **({layout.USER_METADATA_KEY: self.user_metadata} if self.has_metadata else {})}

    def _jpeg_coded(self, name: str, array: np.ndarray, signed: bool | None) -> bool:
        return _jpeg_coded(self.policy, self.coded, name, array, signed)

    def _centered_first(self, name: str, values: np.ndarray) -> "tuple | None":
        """(leaf, values) of the first moment of centered second moment
        ``name`` (of ``values``), where it is stored as a raw leaf (a JPEG
        one cannot be squared back), else None."""
        return self.log_coding.stored_pair_first(name, values, self.coded)

    def _square_of(self, first: "SourceLeaf | None", lossy: tuple | None) -> tuple | None:
        """``lossy`` with its record naming the leaf of ``first`` where that
        is a centered moment's first moment."""
        if (first is None or lossy is None
                or lossy[1].get("stored") != magnitudes.STORED_ABOVE_SQUARE):
            return lossy   # (a few-valued second moment is stored exactly, alone)
        return lossy[0], {**lossy[1], "square_of": self.leaf_index[first.name]}, lossy[2]

    def store(self, item) -> tuple[list, dict, LeafReport, str | None]:
        """Leaf ``index`` as (blobs, record, report, warning or None): loaded and
        coded (or kept raw)."""
        try:
            return self._store(*item)
        finally:   # a budget's later leaves wait for this one's turn to pass
            if isinstance(self.encode, _BudgetEncoder):
                self.encode.release(item[1].name)

    def _small_layers(self, name: str, array: np.ndarray) -> str | None:
        """Why a stacked leaf large enough to code is stored raw: each of its
        layers is under Policy.min_size values, as a leaf of its own would
        be (found by review: said nothing)."""
        axis = self.policy.stack_axis(name)
        if (axis is None or array.ndim <= axis or str(array.dtype) not in JPEG_DTYPES
                or array.size < self.policy.min_size or self.policy.names_lossless(name)):
            return None
        layers = max(1, array.shape[axis])
        if array.size // layers >= self.policy.min_size:
            return None
        return (f"stored raw: it stacks {layers} layers along axis {axis} (jaxjpeg.stacks), "
                f"each under Policy.min_size ({self.policy.min_size:,} values), as each "
                "stored alone would be")

    def _layer_axis(self, name: str) -> int | None:
        """The axis of leaf ``name``'s layers where each is coded on its own scale."""
        return self.leaf_coder.stack_axis(name) if self.leaf_coder.by_layer(name) else None

    def _store(self, index, leaf) -> tuple[list, dict, LeafReport, str | None]:
        name = leaf.name
        given = leaf.array()
        array = self.bias_correction.apply(name, given)
        moved = array is not given   # bias correction shifted it (apply returns it otherwise)
        record = {"path": leaf.records, "shape": list(array.shape), "dtype": str(array.dtype)}
        if leaf.prng_impl is not None:
            record[prng_keys.FIELD] = leaf.prng_impl
        paired_exact = self.log_coding.keeps_exact(name, array)   # (centered pairs)
        signed = None if paired_exact else self.log_coding.signed(name, array)
        coded = not paired_exact and self._jpeg_coded(name, array, signed)
        enc = self.encode(name, array) if coded else None
        note, warning = _coding_note(name, array, enc)
        # each said (found by review: a NaN's warning, given first, hid a lost bulk's)
        warning = ("\n".join(filter(None, [warning, _wide_integer_warning(name, array, self.x64),
                                           _bulk_lost(name, array, enc, self._layer_axis(name))]))
                   or None)
        if not coded and signed is None and self.policy.should_compress(name, array):
            note = (_why_raw(array) or _why_raw(array, quantized_slices.WIDE_LEVELS)
                    or note)   # found by review: no word said why
        elif not coded and signed is None and (small := self._small_layers(name, array)):
            note = small
        elif (not coded and signed is None and array.dtype == np.float64
              and self.policy.should_compress(name, np.broadcast_to(np.float32(0), array.shape))):
            note = ("stored raw: float64 leaves are coded only where Policy(compress=...) "
                    "names them")
        elif (not coded and signed is None and str(array.dtype) not in JPEG_DTYPES
              and path_matches(name, self.policy.compress)):
            note = (f"stored raw: {array.dtype} leaves are not coded (Policy(compress=...) "
                    f"names it; JPEG codes {', '.join(JPEG_DTYPES)})")
        if coded and enc is None:
            note = ("stored raw: the encoder returned None" if self.user_encoder
                    else "stored raw: no coding meets the error bound")
        lossy = None
        if signed is not None:
            first, first_values = self._centered_first(name, array) or (None, None)
            lossy = self._square_of(first, self.log_coding.stored(
                array, signed, self.log_coding.step_of(name), first=first_values,
                first_step=None if first is None else self.log_coding.step_of(first.name)))
            note = "" if lossy is not None else self.log_coding.exact_note(array)
        elif paired_exact:
            note = ("stored exactly with the other moment of its centered pair "
                    "(jaxjpeg.magnitudes)")
        elif (self.lossy_rate and not coded and name not in self.exact
              and leaf.prng_impl is None   # key data raw (review: deflated, unreadable)
              and not self.policy.names_lossless(name)):   # found by review: float16
            found = self._centered_first(name, array)
            small_step = self.log_coding.small_step(name)   # a small moment on the ladder
            if found is not None:   # a small centered moment (found by review: coded
                first, first_values = found   # apart, NaN next updates at a fifth)
                lossy = self._square_of(first, magnitudes.encode_centered(
                    first_values, array, small_step or magnitudes.HALF_LIKE_STEP))
            elif small_step is not None:
                lossy = self.log_coding.stored(array, self.log_coding.small_signed(name, array),
                                               small_step)
            else:
                lossy = _lossy_raw(array, self.vector_limits.get(name),
                                   self.log_coding.is_first(name))
        # Every blob counts, the interval index too: a coding within a few
        # bytes of the raw size was stored larger than raw, and lossy.
        from jaxjpeg import rate
        if isinstance(enc, rate.ThinCoding):   # a byte target's choice (rate.thin_curve)
            # a kernel the policy keeps out of JPEG (_small_kernel_stepped), or a thin view
            small = not self.policy.should_compress(name, array)
            fine = name in getattr(self.encode, "fine", ())
            thin, enc, jpeg = _thin_stored(enc, small, fine), None, None
        else:
            jpeg = _jpeg_blobs(index, enc) if enc is not None else None
            sparse = jpeg is not None and not self.user_encoder and rate.is_sparse_leaf(array)
            thin = (_thin_alternative(array, enc, jpeg[2], sparse, self.error_bound,
                                      keep_aside=not (sparse and self.target is not None))
                    if jpeg is not None and self._may_be_thin(name, enc, sparse) else None)
            if (coded and enc is None and self.error_bound is not None
                    and not self.user_encoder and _thin_shaped(array)):
                # JPEG meets no such bound (review: 90% pruned at 1e-4, raw
                # where 5% of it holds the leaf within the bound)
                bounded = _bounded_thin(array, self.error_bound, array.nbytes)
                thin = None if bounded is None else _thin_stored(bounded)
        if thin is not None and not _restores_finite(array, thin):
            thin = None   # JPEG's coding, or raw
        if thin is not None:
            lossy, jpeg = thin, None
            self.bias_correction.add(name, lambda: _quantized_error(array, thin))
        if jpeg is not None and jpeg[2] < array.nbytes:
            self.bias_correction.add(   # one float64 array, not three (found by review)
                name, lambda: np.subtract(codec.decode_tensor(enc), array, dtype=np.float64))
            blobs, extra, stored = jpeg
            if _constant_rows_restored(array, enc):
                extra = {**extra, "exact": True}
        elif lossy is not None:
            blob, extra, lossy_note = lossy
            note = lossy_note or note
            if extra.get("stored") == "quantized" and _constant_restored(array, blob, extra):
                extra = {**extra, "exact": True}
            blobs = [(layout.raw_blob(index), blob)]
            stored = _blob_bytes(blob)
        else:
            # A byte target's exact leaves are counted at their raw size (their
            # deflated one is not known where the allocation is made, in every
            # process of a distributed save alike): stored so (found by
            # review: deflated, they left the file 5-16% under its target).
            blob, extra = ((np.ascontiguousarray(array), {"kind": "raw"})
                           if leaf.prng_impl is not None or self.exact.get(name) is False
                           else _exact_blob(array))
            blobs = [(layout.raw_blob(index), blob)]
            stored = _blob_bytes(blob)
            if enc is not None:
                note = "stored raw: coding would not make it smaller"
            elif name in self.exact:
                note = ("stored exactly as its codes on a grid per slice: the byte target has "
                        "room for them" if self.exact[name] else
                        "stored raw, exactly: the byte target has room for it")
        record.update(extra)
        if moved:   # found by review: reported exact, restoring the shifted values
            note = "; ".join(filter(None, [note, "moved by bias correction (the mean shift "
                                                 "its weights' coding adds to the outputs)"]))
        return blobs, record, LeafReport(name, array.shape, str(array.dtype), record["kind"],
                                         packed_nbytes(array.size, array.dtype), stored, note,
                                         layout.stored_exactly(record) and not moved), warning


# The names of the threads in_order codes leaves on.
SAVE_THREAD_PREFIX = "jaxjpeg-save"


def in_order(fn, items: Sequence, workers: int, window_bytes: int, size_of,
             largest_first: bool = True):
    """Yields ``fn(item)`` for every item, in order, computing up to
    ``workers`` at once and starting an item only while the items started and
    not yet yielded hold at most ``window_bytes`` (the next item to yield
    always starts).

    ``largest_first``: the largest item starts before the others (then the
    rest in order). A leaf's serial parts (its statistics pass, deflating its
    side data) then overlap the other leaves' coding; started in tree order,
    a large last leaf (an embedding) ended the save on one core. Only the
    order of the work changes, not what each item gives."""
    items = list(items)
    if workers <= 1:
        yield from map(fn, items)
        return
    sizes = [size_of(item) for item in items]
    order = list(range(len(items)))
    if largest_first and items:
        largest = max(order, key=sizes.__getitem__)
        order = [largest] + [i for i in order if i != largest]
    futures: dict = {}
    in_flight = started = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=SAVE_THREAD_PREFIX)
    wait = True
    try:
        for index in range(len(items)):
            # Items before `index` in `order` have all started, so it is
            # the next to start if it has not: the loop always starts it.
            while started < len(order):
                nxt = order[started]
                full = len(futures) >= 2 * workers or in_flight + sizes[nxt] > window_bytes
                if full and futures and nxt != index:
                    break
                futures[nxt] = pool.submit(fn, items[nxt])
                in_flight += sizes[nxt]
                started += 1
            result = futures.pop(index).result()
            in_flight -= sizes[index]
            yield result
    except (KeyboardInterrupt, SystemExit):
        # not waiting for the items in flight (found by review: a Ctrl-C
        # waited out a stalled remote read, 300 s, and became its error)
        wait = False
        raise
    finally:  # an error (or the consumer stopping): start nothing more
        for future in futures.values():
            future.cancel()
        pool.shutdown(wait=wait, cancel_futures=True)


def _check_covariances(covariances, leaves, error_bound) -> None:
    """Refuses what would otherwise be silently ignored: unknown leaves, wrong
    types, shapes that do not fit, and error bounds (on weights) with them."""
    if not covariances:
        return
    if error_bound is not None:
        raise ValueError("input_covariance trades weight error for output error; "
                         "it cannot be combined with error_bound")
    _check_per_leaf("input_covariance", covariances, InputCovariance,
                    {leaf.name: leaf.shape for leaf in leaves},
                    lambda cov, shape: cov.check(shape))


def check_tree_options(tree, *, sensitivity=None, input_covariance=None, error_bound=None,
                       **options) -> None:
    """Refuses a ``sensitivity`` or ``input_covariance`` that does not fit
    ``tree``'s leaves (shapes and paths only, nothing warned: save warns).
    An Orbax manager checks them before its save starts (found by review:
    refused inside it, a temporary directory was left and the interpreter
    waited 300 s at exit)."""
    leaves = [types.SimpleNamespace(name=path_string(records), shape=tuple(np.shape(leaf)))
              for records, leaf, _ in _leaves(tree)]
    _check_covariances(input_covariance, leaves, error_bound)
    _check_sensitivity_names(sensitivity, leaves, warn=False)


def _check_sensitivity_names(sensitivity, leaves, warn: bool = True,
                             fixed_by: str | None = None) -> None:
    """Refuses a ``sensitivity`` naming a leaf the tree does not have (a
    misspelt path would otherwise steer nothing, silently), a factor that
    is negative or not finite, and an importance array that does not
    broadcast to its leaf, under every rate control (before anything is
    coded); ``warn``: of the leaves it weighs at 0 (``fixed_by``: the
    option that fixes each leaf's step, where numbers steer nothing)."""
    shapes = {leaf.name: leaf.shape for leaf in leaves}
    if sensitivity is not None:
        _check_mapping("sensitivity", sensitivity, "a number or an array")
    for name in sensitivity or {}:
        if name not in shapes:
            raise ValueError(f"sensitivity names {name!r}, which is not a leaf of the tree")
        factor, importance = _leaf_importance(sensitivity, name)
        if factor is not None and not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f"sensitivity of {name!r} must be finite and non-negative, "
                             f"got {factor}")
        if importance is not None and not _broadcasts_to(importance.shape, shapes[name]):
            raise ValueError(f"{name}: importance of shape {importance.shape} does not "
                             f"broadcast to the leaf's shape {shapes[name]}")
        # every leaf's array, coded or not (found by review: a NaN array for a
        # bias kept exact was accepted; coded leaves' were refused)
        if importance is not None and not np.all(np.isfinite(importance) & (importance >= 0)):
            raise ValueError(f"{name}: importance must be finite and non-negative")
    if warn:
        _warn_weightless(sensitivity, shapes, fixed_by)


def _warn_weightless(sensitivity, shapes, fixed_by: str | None = None) -> None:
    """Warns of the leaves ``sensitivity`` weighs at 0 (empty ones aside):
    coded, the default save gives them no bytes, byte targets only those no
    other leaf takes (found by review: an expert the calibration batches
    never routed to, its squared gradients 0, came back at relative error
    0.998 without a word; and the warning said byte targets gave none where
    the other leaves, at their finest, left a leaf of weight 0 21 KB)."""
    weightless = sorted(name for name in sensitivity or {}
                        if math.prod(shapes[name])
                        and _user_weight(sensitivity, name, shapes[name]) == 0)
    if weightless and fixed_by is not None:   # (found by review: said "no bytes")
        warnings.warn(f"sensitivity is 0 for {len(weightless)} leaves "
                      f"({first_names([repr(name) for name in weightless])}), but {fixed_by} "
                      "fixes each leaf's step or error: a number steers nothing there (an "
                      "array only shapes the steps inside its leaf)", stacklevel=7)
    elif weightless:
        warnings.warn(f"sensitivity is 0 for {len(weightless)} leaves "
                      f"({first_names([repr(name) for name in weightless])}): "
                      "coded, the default save gives them no bytes and they restore at about "
                      "their mean, and byte targets only the bytes no other leaf takes; give "
                      "them a positive weight to keep them",
                      stacklevel=7)   # save()'s caller


def _broadcasts_to(shape, target) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def _check_coding_options(bits, view, clip, restart_interval, encoder) -> None:
    """The options a leaf's coding would refuse, refused before anything is
    coded (found by review: an asynchronous Orbax save returned True and the
    first leaf's coding failed in its commit thread, losing that step and,
    raised from the next save, the next one too)."""
    from jaxjpeg import mapping, rate
    if bits is not None and (isinstance(bits, (bool, np.bool_))
                             or not isinstance(bits, (int, np.integer)) or bits not in (8, 12)):
        raise ValueError(f"bits must be 8, 12 or None, got {bits!r}")
    if view not in rate.VIEWS:
        raise ValueError(f"view must be one of {rate.VIEWS}, got {view!r}")
    if clip not in mapping.CLIP_MODES:
        raise ValueError(f"clip must be one of {mapping.CLIP_MODES}, got {clip!r}")
    if (isinstance(restart_interval, bool) or not isinstance(restart_interval, (int, np.integer))
            or not 0 <= restart_interval <= 65535):
        raise ValueError(f"restart_interval must be a whole number of blocks in 0..65535, "
                         f"got {restart_interval!r}")
    if encoder is not None and not callable(encoder):
        raise TypeError(f"encoder must be callable, got {type(encoder).__name__}")


def _check_encoder_options(encoder, bits, view, clip, restart_interval, tile_shape) -> None:
    """Refuses the coding options a user's encoder makes moot (found by
    review: bits=12, tile_shape, restart_interval, clip and view beside
    ``encoder=`` were taken and ignored without a word)."""
    if encoder is None:
        return
    moot = [name for name, value, default in (
        ("bits", bits, None), ("view", view, "auto"), ("clip", clip, "common"),
        ("restart_interval", restart_interval, codec.DEFAULT_RESTART_INTERVAL),
        ("tile_shape", tuple(tile_shape), tuple(codec.DEFAULT_TILE_SHAPE)))
        if value != default]
    if moot:
        raise ValueError(f"{', '.join(moot)} cannot go with encoder=: the encoder codes each "
                         "leaf as it chooses (pass them to the codec calls it makes)")


def _check_tile_shape(tile_shape) -> None:
    """Two whole numbers of rows and columns a JPEG image can have, whole
    blocks (smaller or non-positive shapes had coded 8x8 tiles, 6x larger;
    (9, 9) became 8x8 tiles without a word: review)."""
    try:
        rows, cols = tile_shape
    except (TypeError, ValueError):
        raise TypeError(f"tile_shape must be (rows, cols), got {tile_shape!r}") from None
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))
               and 8 <= n <= 65535 and n % 8 == 0 for n in (rows, cols)):
        raise ValueError(f"tile_shape must be two multiples of 8 in 8..65535, got "
                         f"{tile_shape!r}")


def _check_mapping(option: str, given, values: str) -> None:
    """TypeError unless a per-leaf option is a mapping (found by review: a
    list of covariances failed on a missing ``items``)."""
    if not isinstance(given, collections.abc.Mapping):
        raise TypeError(f"{option} must be a dict of leaf path -> {values}, "
                        f"got {type(given).__name__}")


def _check_per_leaf(option: str, given: dict, kind: type, shapes: dict, check) -> None:
    """Refuses a per-leaf option's unknown leaves, values not of ``kind``, and
    values ``check(value, shape)`` finds do not fit (ValueError)."""
    _check_mapping(option, given, f"jaxjpeg.{kind.__name__}")
    for name, value in given.items():
        if name not in shapes:
            raise ValueError(f"{option} names {name!r}, which is not a leaf of the tree")
        if not isinstance(value, kind):
            raise TypeError(f"{option}[{name!r}] must be a jaxjpeg.{kind.__name__}, "
                            f"got {type(value).__name__}")
        try:
            check(value, shapes[name])
        except ValueError as e:
            raise ValueError(f"{option}[{name!r}]: {e}") from None


HALF_MAX_ERROR = 2.0 ** -9   # relative RMS error allowed for float16 storage
# Significand bits kept of float16's 10 (rounded to nearest). EfficientNet-lite
# with exact weights and its BatchNorm vectors so rounded: KL 0.0002 at 8 bits,
# 0.0006 at 7, 0.003 at 6 (x4 per bit); at 8 the deflated vectors are 12%
# smaller than at 10, bytes a byte target gives the kernels.
HALF_SIGNIFICAND_BITS = 8


def _round_significand(array: np.ndarray, bits: int) -> np.ndarray:
    """float32 values rounded to ``bits`` significand bits (to nearest, ties
    away from zero, one rounding: then exact in float16 wherever float16 is
    normal); infinities and NaN stay as they are, and the largest values
    round down rather than up to infinity."""
    drop = 23 - bits
    word = np.ascontiguousarray(array, np.float32).view(np.uint32)
    magnitude = word & np.uint32(0x7FFFFFFF)
    up = ((magnitude + np.uint32(1 << (drop - 1))) >> drop) << drop
    down = (magnitude >> drop) << drop
    special = magnitude >= 0x7F800000
    rounded = np.where(special, magnitude, np.where(up >= 0x7F800000, down, up))
    return ((word & np.uint32(0x80000000)) | rounded).astype(np.uint32).view(np.float32)


def _half_copy(array: np.ndarray) -> np.ndarray | None:
    """A float32 leaf as float16, its significands rounded to
    HALF_SIGNIFICAND_BITS, when that is close (within HALF_MAX_ERROR, every
    value finite) -- under a byte target, the leaves the policy keeps out of
    JPEG (biases, norms) would otherwise take a large share of it."""
    if array.dtype != np.float32 or array.size == 0:
        return None
    with np.errstate(over="ignore"):
        half = _round_significand(array, HALF_SIGNIFICAND_BITS).astype(np.float16)
    wide = array.astype(np.float64)
    if not np.all(np.isfinite(half) == np.isfinite(array)):
        return None
    nan = np.isnan(array)
    if nan.any() and not np.array_equal(half[nan].astype(np.float32).view(np.uint32),
                                        array[nan].view(np.uint32)):
        return None   # NaN payloads float16 drops (found by review: 0x7fc0abcd -> 0x7fc0a000)
    finite = np.isfinite(wide)
    wide = np.where(finite, wide, 0.0)
    err = np.linalg.norm(np.where(finite, half.astype(np.float64), 0.0) - wide)
    norm = np.linalg.norm(wide)
    return half if err <= HALF_MAX_ERROR * norm else None


# float16 copies up to this size are stored as deflated byte planes: 8% less
# on BatchNorm vectors (their high bytes repeat), too slow for large leaves.
DEFLATE_HALF_MAX_BYTES = 4 * 2**20
# Larger ones are deflated where a sample deflates to at most this share:
# inflating them on restore (170-350 MB/s a core here, raw leaves at memory
# speed) buys a tenth of their bytes at least. Shares on 32 MB leaves: int8
# codes of N(0, 20) 0.80, 4-bit codes held in int8 0.51, bfloat16 weights
# 0.67, float32 ones 0.84. At 0.5 (chosen when zlib deflated them, 3-7x
# slower) leaves over 4 MiB of the first three were stored raw, those
# under it deflated.
DEFLATE_PAYS = 0.9
FAST_DEFLATE_BYTES = 64 * 2**20


def _deflated(array: np.ndarray, counted: bool = False) -> tuple | None:
    """(blob, record fields) of ``array``'s values as deflated byte planes
    (layout.deflate_planes_in_pieces) where that is smaller, else None; the
    fields say so and where its pieces start. One over DEFLATE_HALF_MAX_BYTES only
    where a sample deflates to DEFLATE_PAYS of its size at the level it is
    stored at (one sample decides and counts it); one over
    FAST_DEFLATE_BYTES at zlib's fastest level (found by review: 100 M int8
    values of 0..3 took 10 s to deflate at level 6, 2 s at 1 for 13% more
    bytes; a 0/1 mask's planes take 40% more at 1). ``counted``: its size (a
    quantized_vectors.Counted), a smaller one's planes counted, not written
    (layout.deflated_planes_size), one over DEFLATE_HALF_MAX_BYTES's from
    the sample at the level it is stored at (found by review: estimated at
    the fastest, a quantized graph's 8 MB uint8 leaf was counted 9% over;
    pieces smaller than the sample's 64 KiB of a float32 byte plane missed
    repeats zlib's 32 KiB window finds, tables of repeating rows 26-340% over)."""
    flat = _little_endian(array)
    if flat.nbytes > DEFLATE_HALF_MAX_BYTES:
        share = _sampled_deflate_share(flat, _deflate_level(flat))
        if share > DEFLATE_PAYS:
            return None
        if counted:
            return _counted_deflated(int(share * flat.nbytes), flat.nbytes)
    if counted:
        return _counted_deflated(layout.deflated_planes_size(flat, _deflate_level(flat)),
                                 flat.nbytes)
    packed, pieces = layout.deflate_planes_in_pieces(flat, _deflate_level(flat))
    if len(packed) >= flat.nbytes:
        return None
    return packed, {"deflated": True, **({"pieces": pieces.to_record()} if pieces else {})}


def _counted_deflated(size: int, raw_bytes: int) -> tuple | None:
    """_deflated's answer where only its size is wanted."""
    return (quantized_vectors.Counted(size), {"deflated": True}) if size < raw_bytes else None


def _little_endian(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    return flat.astype(flat.dtype.newbyteorder("<")) if flat.dtype.byteorder == ">" else flat


# A large leaf's deflated share is estimated on this many pieces of 256 KiB
# spread over it (found by review: its first 4 MiB alone were zeros, and a
# random leaf was deflated whole for 8%).
_DEFLATE_SAMPLE_PIECES = 16


def _sampled_deflate_share(flat: np.ndarray, level: int) -> float:
    """The share of its size a large 1-D ``flat`` deflates to at zlib's
    ``level``, estimated on pieces spread over it."""
    piece = max(1, (1 << 18) // flat.itemsize)
    starts = np.linspace(0, max(0, flat.size - piece), _DEFLATE_SAMPLE_PIECES).astype(np.int64)
    sample = np.concatenate([flat[s:s + piece] for s in starts])
    return layout.deflated_planes_size(sample, level) / max(1, sample.nbytes)


def _deflate_level(flat: np.ndarray) -> int:
    """The zlib level _deflated packs ``flat`` at."""
    return 1 if flat.nbytes > FAST_DEFLATE_BYTES else layout.DEFLATE_LEVEL


def _exact_bytes(array: np.ndarray) -> int:
    """The bytes of a leaf stored exactly (_exact_blob), a large one's
    deflated planes counted from a sample (_deflated)."""
    return _nbytes(_exact_blob(array, counted=True))


def _half_blob(half: np.ndarray, counted: bool = False) -> tuple[bytes | np.ndarray, dict]:
    """(blob, record fields) of a leaf stored as float16 (``counted``: see _deflated)."""
    record = {"kind": "raw", "stored": "float16"}
    deflated = _deflated(half, counted)
    if deflated is not None:
        return deflated[0], {**record, **deflated[1]}
    return np.ascontiguousarray(half), record


def _exactly(blob_and_record: tuple) -> tuple:
    """(blob, record fields) of an exact coding, its record marked so where
    it is not the leaf's own dtype (inspect and the CLI's summary tell it
    from a lossy one: found by review, a 0/1 mask counted as "quantized")."""
    blob, record = blob_and_record
    return blob, ({**record, "exact": True} if "stored" in record else record)


def _exact_blob(array: np.ndarray, few: bool | None = None,
                counted: bool = False) -> tuple[bytes | np.ndarray, dict]:
    """(blob, record fields) of a leaf stored exactly in its own dtype,
    deflated where that is smaller (found by review: a (1024, 1024) causal
    mask of finfo.min took 4 MB a layer, a bool one 1 MB; byte targets then
    coded the first on a linear step, its finfo.min no longer exact); as
    float16 where that holds a float32 leaf bit for bit and is smaller (a 0/1
    mask: 1.3 bits a value, 2.6 as float32's planes); a leaf of few values
    on a uniform grid as its codes on it (_grid_exactly: ternary weights,
    1.6 bits a value where deflated planes took 5.8, found by review).
    ``few``: _few_values(array), where the caller knows it. A leaf quantized
    per slice (_sliced_grid_exactly) as its codes, among the options where it
    takes few values, else at once: a third of its deflated planes or less,
    which are not tried. ``counted``: a large leaf's deflated planes as
    their size (see _deflated), where only the size is wanted."""
    few = _few_values(array) if few is None else few
    sliced = _sliced_grid_exactly(array)
    if sliced is not None and not few:
        return _exactly(sliced)
    deflated = _deflated(array, counted)
    options = [(deflated[0], {"kind": "raw", **deflated[1]}) if deflated is not None
               else (np.ascontiguousarray(array), {"kind": "raw"})]
    low_bits = _packed_blob(array, counted)
    if low_bits is not None:
        options.append(low_bits)
    half = _half_exactly(array)
    if half is not None:
        options.append(_half_blob(half, counted))
    grid = _grid_exactly(array, few)
    if grid is not None:
        options.append(grid)
    if sliced is not None:   # few values, but on steps of their slices' own (found by
        options.append(sliced)   # review: ternary rows deflated 2.65x larger)
    elif not few and (wide := _sliced_grid_exactly(array, quantized_slices.WIDE_LEVELS)):
        options.append(wide)   # 8-bit codes, where a byte target keeps such a leaf exact
    return _exactly(min(options, key=_nbytes))


def _packed_codes(array: np.ndarray) -> np.ndarray | None:
    """A sub-byte leaf's (int4, float4_e2m1fn, ...) values' bits packed
    (layout.pack_low_bits); None for other dtypes, or where bytes with bits
    above their value's (a view of other bytes) do not hold the values their
    low bits do. (int8 codes viewed as int4 are sign-extended: the same
    values, packed; found by review, 15% larger unpacked.)"""
    width = value_bits(array.dtype)
    if width >= 8:
        return None
    codes = array.reshape(-1).view(np.uint8)
    packed = layout.pack_low_bits(codes, width)
    if np.any(codes >> width):
        back = layout.unpack_low_bits(packed, width, codes.size).view(array.dtype)
        as_float = [a.astype(np.float32).view(np.uint32) for a in (back, array.reshape(-1))]
        if not np.array_equal(*as_float):
            return None
    return packed


def _packed_blob(array: np.ndarray, counted: bool = False) -> tuple | None:
    """(blob, record fields) of a sub-byte leaf as its packed bits
    (layout.PACKED), deflated where that is smaller (``counted``: see
    _deflated); None where _packed_codes is."""
    packed = _packed_codes(array)
    if packed is None:
        return None
    deflated = _deflated(packed, counted)
    if deflated is not None:
        return deflated[0], {"kind": "raw", "stored": layout.PACKED, **deflated[1]}
    return packed, {"kind": "raw", "stored": layout.PACKED}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one itemsize hold the same bits (NaN payloads
    and -0.0 included; found by review: equal_nan let float16 rewrite NaNs)."""
    kind = f"u{a.dtype.itemsize}"
    return a.shape == b.shape and np.array_equal(a.view(kind), b.view(kind))


def _half_exactly(array: np.ndarray) -> np.ndarray | None:
    """A float32 leaf as float16 where every value is one, bit for bit, else
    None (a spread sample refuses most leaves before a full copy: found by
    review, a leaf whose first values were zeros took a 100 M-value copy)."""
    if array.dtype != np.float32 or array.size == 0:
        return None
    flat = array.reshape(-1)
    sample = np.ascontiguousarray(quantized_vectors.sampled(flat, 4096))
    with np.errstate(over="ignore"):   # beyond float16's range: refused
        if not _same_bits(sample.astype(np.float16).astype(np.float32), sample):
            return None
        half = flat.astype(np.float16)
    if not _same_bits(half.astype(np.float32), flat):
        return None
    return half.reshape(array.shape)


def _grid_exactly(array: np.ndarray, few: bool) -> tuple | None:
    """(blob, record fields) of a leaf of ``few`` values (_few_values), all
    whole multiples of the smallest nonzero magnitude, as its codes on that
    step (quantized_vectors, linear; restored bit for bit, else None)."""
    if not (few and quantizable(array.dtype)):
        return None
    values = np.unique(quantized_vectors.sampled(array.reshape(-1), 4096)).astype(np.float64)
    nonzero = np.abs(values[values != 0])
    if not nonzero.size or not np.all(np.isfinite(values)):
        return None
    step = float(nonzero.min())
    if not np.array_equal(np.round(values / step) * step, values):
        return None
    coded = quantized_vectors.encode(array, quantized_vectors.VectorStep(step))
    if coded is None:
        return None
    restored = quantized_vectors.restored_values(array, coded[0], coded[1])
    if not _same_bits(np.asarray(restored, array.dtype).reshape(array.shape), array):
        return None
    return coded[0], {"kind": "raw", **coded[1]}


def _sliced_grid(array: np.ndarray, levels: int = quantized_slices.LEVELS) -> tuple | None:
    """:func:`jaxjpeg.quantized_slices.find` of a leaf that may be stored
    quantized (float32 or half precision)."""
    if not quantizable(array.dtype) or array.ndim < 2:
        return None
    return quantized_slices.find(array, levels)


def _on_a_grid(array: np.ndarray) -> bool:
    """Whether ``array`` is quantized per slice on 4 or 8 bits (_sliced_grid;
    a 4-bit grid of short slices is too short for an 8-bit one's search)."""
    return any(_sliced_grid(array, levels) is not None
               for levels in (quantized_slices.LEVELS, quantized_slices.WIDE_LEVELS))


# 8-bit grids' codes take 5-7.5 bits a value: not looked for under less
WIDE_GRID_BITS = 5.0


def _sliced_fits(array: np.ndarray, share: float) -> tuple[int, int | None]:
    """(the levels of the grid ``array`` is quantized on per slice where its
    codes take at most ``share`` bytes, else 0; the codes' bytes, None where
    it is on no grid): 4-bit, or 8-bit where ``share`` gives WIDE_GRID_BITS a
    value (_sliced_grid_exactly; found by review: int8 per-channel leaves at
    4x were JPEG-coded, 13% of their codes moved, where their codes took 7.4
    bits a value)."""
    for levels in (quantized_slices.LEVELS, quantized_slices.WIDE_LEVELS):
        if levels > quantized_slices.LEVELS and 8 * share < WIDE_GRID_BITS * array.size:
            break
        sliced = _sliced_grid_exactly(array, levels)
        if sliced is not None:
            return (levels if _nbytes(sliced) <= share else 0), _nbytes(sliced)
    return 0, None


def _sliced_grid_exactly(array: np.ndarray, levels: int = quantized_slices.LEVELS) -> tuple | None:
    """(blob, record fields) of a leaf quantized per slice (_sliced_grid), as
    its codes and its slices' steps: bit for bit (its zeros' signs kept)."""
    found = _sliced_grid(array, levels)   # which checked every value against its code and step
    coded = None if found is None else quantized_slices.encode(array, *found)
    return None if coded is None else (coded[0], {"kind": "raw", **coded[1]})


# Under a byte target a float32 kernel too small for JPEG (ndim >= 2, kept
# raw by the policy) is quantized on one step of SMALL_KERNEL_STEP times its
# RMS when that is smaller than float16. EfficientNet-lite1 / lite2, the 15
# such kernels (the stem and first blocks, 32 K values) coded alone, the
# rest exact: float16 with 8 significand bits 13.3 bits a value, KL 0.0016 /
# 0.00029; steps of 2^-7 / 2^-8 / 2^-9 RMS 9 / 10 / 11 bits, KL 0.00066 /
# 0.00028 / 0.00030 (lite1) and 0.00088 / 0.00023 / 0.00008 (lite2):
# uniform steps spend fewer bits where float16 spends them on small values.
SMALL_KERNEL_STEP = 2.0 ** -8


def _small_kernel_stepped(name: str, array: np.ndarray, policy: "Policy",
                          leaf_coder: "_LeafCoder") -> bool:
    """Whether a byte target may quantize a kernel the policy keeps out of
    JPEG on a step its allocation chooses (when SMALL_KERNEL_STEP does not
    fit): a float kernel the policy does not name lossless, nothing would
    keep raw (_why_raw: few values, special or vanishing ones), no second
    moment (a linear step flushes its small values; review: nu of a small
    kernel took one, 100% off), whose one step nothing else shapes."""
    return (quantizable(array.dtype) and not policy.names_lossless(name)
            and _small_kernel_limits(array) is not None and _why_raw(array) is None
            and bool(np.all(np.isfinite(array))) and not magnitudes.is_second_moment(array)
            and leaf_coder.one_step_fits(name))


def _small_kernel_limits(array: np.ndarray):
    """The step limits of a raw kernel (see SMALL_KERNEL_STEP), or None (a
    vector, an empty or constant-zero kernel, or one with non-finite values,
    whose RMS is not finite). The step is on its bulk's RMS where a few
    values dwarf the rest (_bulk_rms): on the whole RMS one value 50,000
    times the rest set a step that restored all 2,303 others as 0 (found by
    review); the few then take long codes, or the kernel float16. Where the
    target has no room for such steps the allocation's step codes the
    kernel, gross values and all (kept off it, a lone (768, 2) head with one
    made an 8x target a refusal: review); heavy-tailed kernels (Student-t of
    1-2 degrees of freedom) take about 10 bits a value here, 4 on the whole
    RMS."""
    if array.ndim < 2 or array.size == 0:
        return None
    rms = _bulk_rms(array) or math.sqrt(float(np.mean(np.square(array, dtype=np.float64))))
    if not (math.isfinite(rms) and rms > 0):
        return None
    return quantized_vectors.StepLimits(np.float64(SMALL_KERNEL_STEP * rms))


# A kernel kept out of JPEG whose largest values exceed this many times the
# RMS of the rest (all but its largest 1 / GROSS_SHARE) is stepped on the rest
# (_bulk_rms). In the leaves of at least two axes of EfficientNet-lite0-2 the
# largest is at most 18 times that RMS, Magika's 9, PP-OCRv6's 55 and 82 (in
# leaves JPEG codes, which keep such values in their side lists).
GROSS_RATIO, GROSS_SHARE = 64.0, 256


def _bulk_rms(array: np.ndarray) -> float | None:
    """The RMS of all but the largest magnitudes of a finite ``array`` (the
    largest 1 / GROSS_SHARE of them, at least one) where its largest exceeds
    GROSS_RATIO times that; else None."""
    magnitude = np.abs(array.astype(np.float64, copy=False)).reshape(-1)
    if magnitude.size < 2 or not np.all(np.isfinite(magnitude)):
        return None
    bulk = magnitude.size - max(1, magnitude.size // GROSS_SHARE)
    rest = np.partition(magnitude, bulk)[:bulk]
    rms = math.sqrt(float(np.mean(np.square(rest))))
    return rms if rms > 0 and float(magnitude.max()) > GROSS_RATIO * rms else None


def _lossy_raw(array: np.ndarray, limits=None, first_moment: bool = False,
               exact_option: bool = True) -> tuple | None:
    """(blob, record fields, note) of a leaf kept out of JPEG under a byte
    target: quantized within the step ``limits`` allow (a BatchNorm vector,
    see jaxjpeg.priors.batchnorm_vector_steps; a small kernel, see
    SMALL_KERNEL_STEP) or as float16, whichever is smaller; None when
    neither applies. A second moment, or a ``first_moment``, of any float
    dtype takes only codings that keep each value (_keeps_each_value), fine
    log2 steps among them: float16 flushes values below 2^-14 and a linear
    step all those far under its RMS (found by review: a bfloat16 Adam
    state at 4-8x restored 220 of a small kernel's 1270 nu values as 0, its
    next update 540x off; and 0/1 masks, which float16 keeps exactly, must
    not take log2 steps 3-7x their size)."""
    if array.size <= 1:   # a step counter, a learning rate: exact (found by review:
        return None       # PyTorch's step 3001 came back 3000, optax's b2 0.998)
    flat = array.reshape(-1)
    if limits is None and _holds_one_value(flat):   # a constant (a vmapped
        return None   # population's b2, found by review: 0.999 came back 0.998): exact
    if _few_values(array):   # a mask, a code book: exact (review: a linear step moved -1e9)
        blob, extra = _exact_blob(array, few=True)
        return (blob, extra, "") if exact_option and extra.get("deflated") else None
    if _on_a_grid(array):   # quantized per channel: exact, as its codes
        return None
    half = _half_exactly(array)
    if half is not None:   # float16 holds every value: no rounding (a vector of counts)
        return _exact_alternative(array, False, half) if exact_option else None
    moment = limits is None and (first_moment or magnitudes.is_second_moment(array))
    # a moment's float16 copy is refused first where a value lies where
    # float16 holds none of its kind (a 16 M-value leaf's copy took seconds)
    half = _half_copy(array) if not moment or _within_half_range(array) else None
    options = []
    if half is not None and (not moment or _keeps_each_value(array, half)):
        blob, extra = _half_blob(half)
        options.append((blob, extra, "stored as float16"))
    how = None
    # Half-precision leaves too, restored through float32 (found in session
    # 29: EfficientNet-lite1 in bfloat16 kept its vectors and small kernels
    # raw, 100 kB more than float32's at 8x, KL 0.069 against 0.045).
    # not a mask: a linear step set by it loses the rest (found by review: a
    # -1e9 mask added to a bias, its rest restored as 0 at 4x and 8x)
    if quantizable(array.dtype) and _sentinel(array) is None:
        limits = limits if limits is not None else _small_kernel_limits(array)
        how = limits.step_for(array) if limits is not None else None
    if how is not None:
        coded = quantized_vectors.encode(array, how)
        if coded is not None and len(coded[0]) < array.nbytes:
            option = (coded[0], {"kind": "raw", **coded[1]},
                      f"quantized ({coded[1]['domain']} step {how.step:.3g})")
            if _restores_finite(array, option) and (not moment or _keeps_each_value(
                    array, quantized_vectors.restored_values(array, coded[0], option[1]))):
                options.append(option)
    if moment:
        logged = magnitudes.encode(array, signed=first_moment, step=magnitudes.HALF_LIKE_STEP)
        if logged is not None:
            options.append(logged)
    blob, extra = _exact_blob(array, few=False) if exact_option else (None, {})
    if extra.get("deflated"):   # counts, buffers: exact and smaller than any of these
        options.append((blob, extra, ""))   # (its note: why it is not coded)
    return min(options, key=lambda o: _nbytes(o), default=None)


def _within_half_range(array: np.ndarray) -> bool:
    """False where a finite nonzero value would round to 0 (at or below
    2^-25) or to infinity (2^16 and above) in float16; True need not mean
    _keeps_each_value."""
    a = np.abs(array.reshape(-1)).astype(np.float32)
    nonzero = a[(a != 0) & np.isfinite(a)]
    return not nonzero.size or (float(nonzero.min()) > 2.0 ** -25
                                and float(nonzero.max()) < 2.0 ** 16)


def _nbytes(stored: tuple) -> int:
    """The bytes of a coding (blob, ...)."""
    return _blob_bytes(stored[0])


def _blob_bytes(blob) -> int:
    """A blob's bytes: an array's (bfloat16's has no buffer protocol), a
    bytes', a format.BlobParts' or a quantized_vectors.Counted's."""
    return blob.nbytes if isinstance(blob, np.ndarray) else len(blob)


# A leaf of at most this many distinct values (a mask, a code book, a
# quantized layer's levels) is stored exactly, deflated: JPEG and log2 steps
# move the values it holds (found by review: a {0, -1e9} attention mask
# came back 7.6e7 off where it attends, a float16 0/1 mask as 0 / 0.992).
FEW_VALUES = 16


def _few_values(array: np.ndarray) -> bool:
    """Whether a float ``array`` takes 2 to FEW_VALUES distinct values, each
    four times on average, NaN, infinities and finite values among them
    however rare (found by review: a NaN, equal to nothing, or an -inf the
    sample missed had a {0, -1e9} mask JPEG-coded; so did one float32 lowest
    as a sentinel in a 0/1 mask, its 0s and 1s restored up to 0.18 off); a
    sample decides first, then the values it missed join its own while they
    stay few."""
    flat = array.reshape(-1)
    if flat.size < 2 or array.dtype.kind not in "fV":
        return False
    sample = quantized_vectors.sampled(flat, 4096)
    values = np.unique(sample[np.isfinite(sample)])
    specials = set()   # which of NaN, inf and -inf the leaf holds
    # not a constant leaf (JPEG's blocks are DC alone), and values that repeat
    most = min(FEW_VALUES, flat.size // 4)
    if not values.size <= most:
        return False
    for start in range(0, flat.size, 1 << 22):
        chunk = flat[start:start + (1 << 22)]
        finite = np.isfinite(chunk)
        held = chunk[finite]
        missed = held[~np.isin(held, values)]
        if missed.size:
            values = np.union1d(values, missed[:most + 1])
            if values.size > most or not np.isin(missed, values).all():
                return False
        if not finite.all():
            odd = chunk[~finite]
            specials.update(kind for kind, seen in (("nan", np.isnan(odd).any()),
                                                    ("inf", (odd > 0).any()),
                                                    ("-inf", (odd < 0).any())) if seen)
    return 2 <= values.size + len(specials) <= most


def _stored_exactly(array: np.ndarray) -> bool:
    """Whether a moment on log2 steps is stored exactly (_LogCoding.stored):
    a leaf of few values with an exact coding."""
    few = _few_values(array)
    return few and _exact_alternative(array, few) is not None


def _alternative(array: np.ndarray) -> tuple[bool, tuple | None]:
    """(_few_values, _exact_alternative) of ``array``."""
    few = _few_values(array)
    return few, _exact_alternative(array, few)


def _exact_alternative(array: np.ndarray, few: bool, half=None) -> tuple | None:
    """(blob, record fields, note) of a leaf stored exactly: one of ``few``
    values (_few_values) in its own dtype, deflated; a float32 one every
    value of which float16 holds as float16 (``half``, where the caller
    has it), deflated where that pays; else None."""
    if array.size == 0:
        return None
    if few:
        blob, extra = _exact_blob(array, few=True)
        return blob, extra, "stored exactly: a leaf of few values, deflated"
    half = _half_exactly(array) if half is None else half
    if half is None:
        return None
    blob, record = _exactly(_half_blob(half))
    return blob, record, "stored exactly as float16 (every value is one)"


def _stored_values(array: np.ndarray, stored: tuple | None) -> np.ndarray:
    """The values a leaf stored as ``stored`` (blob, record fields, note; None:
    exactly) restores to; exact codings give the leaf itself."""
    if stored is None or stored[1].get("stored") != "quantized":
        return array
    return quantized_vectors.restored_values(array, stored[0], stored[1])


def _keeps_each_value(array: np.ndarray, restored) -> bool:
    """Whether ``restored`` holds each of ``array``'s values within
    magnitudes.HALF_LIKE_STEP of it, relatively (zeros as zeros, non-finite
    ones as they were); in float32 pieces, stopping at the first miss (found
    by review: float64 copies of whole leaves took a 16 M-value moment's
    choice from 0.6 s to 6 s)."""
    from jaxjpeg import rate

    a_all, r_all = np.asarray(array).reshape(-1), np.asarray(restored).reshape(-1)
    for start in range(0, a_all.size, rate.ERROR_CHUNK):
        a = a_all[start:start + rate.ERROR_CHUNK].astype(np.float32)
        r = r_all[start:start + rate.ERROR_CHUNK].astype(np.float32)
        finite = np.isfinite(a)
        if not finite.all() and not np.array_equal(a[~finite], r[~finite], equal_nan=True):
            return False
        with np.errstate(invalid="ignore", over="ignore"):
            if not np.all(np.abs(r - a) <= np.float32(magnitudes.HALF_LIKE_STEP) * np.abs(a),
                          where=finite):
                return False
    return True


def _constant_rows_restored(array: np.ndarray, enc: codec.EncodedTensor) -> bool:
    """Whether a JPEG-coded leaf every row of whose view is mapped to a
    constant (slope 0: constant leaves, rows of one value) restores bit for
    bit (found by review: a constant leaf restored exactly, reported lossy).
    Decoded only where every slope is 0; other codings are taken as lossy."""
    if enc.row_scale.size == 0 or np.any(enc.row_scale != 0):
        return False
    restored = codec.decode_tensor(enc, codec.written_dtype(enc.dtype))
    return _same_bits(restored.astype(array.dtype, copy=False), array)   # as a restore casts it


def _holds_one_value(flat: np.ndarray) -> bool:
    """``np.all(flat == flat[0])`` of a nonempty 1-D array, _BULK_CHUNK
    values at a time, stopping at the first block holding another value: the
    whole leaf's comparison was a bool array of its size (8 MiB of a 32 MiB
    leaf's save at target_ratio=2, a sixth of its peak)."""
    first = flat[0]
    return all(bool(np.all(flat[start:start + _BULK_CHUNK] == first))
               for start in range(0, flat.size, _BULK_CHUNK))


def _constant_restored(array: np.ndarray, blob, record: dict) -> bool:
    """Whether a quantized leaf of one value (all zeros, a constant) restores
    bit for bit; other quantized leaves are taken as lossy."""
    flat = array.reshape(-1)
    if flat.size == 0 or not _holds_one_value(flat):
        return False
    return _same_bits(quantized_vectors.restored_values(array, blob, record).reshape(array.shape),
                      array)


def _restores_finite(array: np.ndarray, lossy: tuple) -> bool:
    """quantized_vectors.restores_finite of a quantized leaf (blob, record fields, note)."""
    blob, record, _ = lossy
    return quantized_vectors.restores_finite(array, blob, record)


def _thin_alternative(array: np.ndarray, enc: codec.EncodedTensor, jpeg_bytes: int,
                      sparse: bool, error_bound: float | None = None,
                      keep_aside: bool = True) -> tuple | None:
    """(blob, record fields, note) of a leaf (quantizable) whose JPEG coding pads
    its thin view (rate.THIN_SIDE) quantized on one step within that
    coding's squared error, when that is smaller; else None. A ``sparse``
    leaf (rate.is_sparse_leaf) keeps its zeros exact and its nonzero values
    within the error JPEG gave them (its zeros took noise). Under an
    ``error_bound`` the step takes the bound's whole error instead
    (:func:`_bounded_thin`): JPEG's coding is under it, and a sparse one
    spent some of it on the zeros (found in session 29: 90% pruned, bound
    0.1, error 0.032), against the norm of the values JPEG does not keep
    aside, which the bound leaves out (review: one 1e4 among N(0, 1) values
    took the whole norm and zeroed the rest)."""
    from jaxjpeg import rate

    if not sparse and (not quantizable(array.dtype) or array.ndim == 0):
        return None
    # JPEG's side list, kept aside where one step would not hold it (a NaN:
    # found by review, a thin leaf with one took JPEG's 12-bit view, 2x
    # the bytes of its thin coding); not by a sparse leaf under a byte
    # target (``keep_aside``), whose plan measured its thin coding with them
    # on the step (review: planned as JPEG, replaced by the smaller coding,
    # 4x landed at 7.3x; measured so, trees where JPEG and raw leaves had
    # met 4x landed at 6.3x, every leaf at its finest)
    kept = None
    if enc.outliers is not None and enc.outliers.count and not enc.outliers.steppable(array):
        if not keep_aside or 8 * enc.outliers.count > array.size:
            return None
        kept = enc.outliers.index
    if error_bound is not None:
        norm2 = rate.finite_norm2(array, None if enc.outliers is None else enc.outliers.index)
        coded = _bounded_thin(array, error_bound, min(jpeg_bytes, array.nbytes), norm2, kept)
        if coded is not None:
            return _thin_stored(coded)
    flat = array.reshape(-1)
    decoded = codec.decode_tensor(enc).reshape(-1)
    if sparse:   # the nonzero values' errors (over every value, as thin_within_error takes it)
        nonzero = flat != 0
        diff = decoded[nonzero].astype(np.float64) - flat[nonzero]
    else:
        diff = decoded.astype(np.float64) - flat
        if kept is not None:
            diff[kept] = 0   # restored exactly (NaN - NaN is NaN)
    jpeg_error = float(np.dot(diff, diff)) / flat.size
    coded = rate.thin_within_error(array, jpeg_error, min(jpeg_bytes, array.nbytes), kept)
    return None if coded is None else _thin_stored(coded)


def _bounded_thin(array: np.ndarray, bound: float, max_bytes: int, norm2: float | None = None,
                  kept=None):
    """``array`` quantized on one step within relative RMS error ``bound``
    (of ``norm2``, the squared norm the bound is relative to: the finite
    values' by default), checked in its own dtype (review: a bfloat16 leaf's
    rounding took it 14% over), exactly where a step codes it exactly in as
    few bytes (a leaf of one value or of a few levels); a rate.ThinCoding of
    fewer than ``max_bytes``, or None. ``kept``: flat positions kept aside
    exactly."""
    from jaxjpeg import rate

    norm2 = rate.finite_norm2(array) if norm2 is None else norm2
    exact = rate.thin_within_error(array, 0.0, max_bytes, kept)
    allowed = bound ** 2 * norm2 / max(1, array.size)   # mean squared error
    budget = (1 - 1e-3) * allowed   # a margin for float32's rounding
    for _ in range(2):   # the second time less what the dtype's rounding added
        coded = rate.thin_within_error(array, budget, exact.nbytes if exact else max_bytes,
                                       kept)
        if coded is None:
            return exact
        measured = _quantized_sse(array, _thin_stored(coded)) / max(1, array.size)
        if measured <= allowed:
            return coded
        budget -= 1.1 * (measured - budget)
        if budget <= 0:
            break
    return exact


def _thin_stored(coded, small: bool = False, fine: bool = False) -> tuple:
    """(blob, record fields, note) of a rate.ThinCoding (``small``: of a
    kernel the policy keeps out of JPEG; ``fine``: finer than JPEG codes)."""
    record = coded.record
    why = ("too small for JPEG, on the byte target's step" if small
           # (as +0.0: found by review, "exactly" said of -0.0 restored +0.0)
           else f"sparse, its zeros kept as zeros ({record['nonzeros']} values nonzero)"
           if record.get("nonzeros") is not None else
           "one fine step: JPEG's finest codings left the byte target unspent" if fine
           else "a view too thin for JPEG's 8x8 blocks")
    kept = record.get("outliers", 0)
    return (coded.blob, {"kind": "raw", **record},
            f"quantized (linear step {record['step']:.3g}): {why}"
            + (f"; {kept} values kept exactly" if kept else ""))


def _quantized_sse(array: np.ndarray, lossy: tuple) -> float:
    """Σ (restored - saved)² of a quantized leaf (blob, record fields, note),
    restored in the leaf's dtype; a block at a time (no float64 copy)."""
    blob, record, _ = lossy
    return _restored_sse(quantized_vectors.restored_values(array, blob, record), array)


def _restored_sse(restored: np.ndarray, array: np.ndarray) -> float:
    """Σ (restored - saved)² of ``restored`` (flat) against ``array``, a
    block at a time (no float64 copy of either)."""
    from jaxjpeg import rate

    restored, flat, total = restored.reshape(-1), array.reshape(-1), 0.0
    for start in range(0, flat.size, rate.ERROR_CHUNK):
        part = slice(start, start + rate.ERROR_CHUNK)
        diff = restored[part].astype(np.float64) - flat[part].astype(np.float64)
        np.copyto(diff, 0.0, where=np.isnan(diff))   # values kept aside: NaN - NaN
        total += float(np.einsum("i,i->", diff, diff))
    return total


def _quantized_error(array: np.ndarray, lossy: tuple) -> np.ndarray:
    """Restored minus saved values (float64) of a quantized leaf (blob,
    record fields, note), restored in the leaf's dtype."""
    blob, record, _ = lossy
    restored = quantized_vectors.restored_values(array, blob, record)
    return restored.reshape(array.shape).astype(np.float64) - array


# Values a large moment's bytes at each log2 step are measured on (the finer
# steps a generous target adds too: measured on a quarter of it, the sample
# of a moment of mostly zero rows put 2-3x targets 43-83% over; review).
_LADDER_PROBE = 1 << 18
_EXACT_RUNG = object()   # a ladder's size: the leaf stored exactly (_LogCoding.rung_bytes)
# A ladder's size coarser than a fine target's own step, measured when a plan
# reaches it (_LogCoding.rung_bytes): such a target's plans go finer.
_UNMEASURED = object()


class _LogCoding:
    """The leaves the policy codes that are stored on log2 steps of their
    magnitudes instead (:mod:`jaxjpeg.magnitudes`): second moments, and the
    first moments paired with them (vectors the policy keeps out of JPEG
    too: a byte target would store a bias's first moment as float16,
    flushing its small values): among leaves held in memory by their paths
    and values, and by the optimizers' names among these and (``read``)
    leaves read from a file, each such pair read once more to check it."""

    def __init__(self, leaves: Sequence[SourceLeaf], policy: Policy, error_bound=None,
                 read: bool = True):
        self.policy, self.error_bound = policy, error_bound
        self.step = magnitudes.step_for(error_bound)
        self.ladder: dict[str, tuple] = {}   # leaf -> (values, bytes at each LADDER step)
        # small leaves' moments a byte target moves along the ladder too, from
        # HALF_LIKE_STEP (where their own step did not fit: _target_encoder)
        self.small: set[str] = set()
        self.tight: str | None = None   # settle's warning: the coded leaves are left little
        self.rung = 0   # the ladder's step settled on, in doublings of the save's own
        self.finer = False   # whether the ladder goes finer too (see _target_encoder)
        self.one_finer: set[str] = set()   # leaves settled a rung finer than the rest
        self.measured: dict[str, tuple] = {}   # ladder leaf -> stored_bytes' (signed, small)
        # (leaf, step, signed, alone) -> bytes measured (_EXACT_RUNG: stored
        # exactly); (leaf, None): stored exactly
        self.sizes_at: dict[tuple, int] = {}
        self._values_of: dict[str, Callable[[], np.ndarray]] = {}   # ladder leaf -> its values
        self.centered: dict[str, str] = {}   # ladder's centered second moment -> its first
        held = {path_string(leaf.records): leaf for leaf in leaves
                if leaf.resident and _may_be_moment(leaf, policy)}
        second = {name for name, leaf in held.items()
                  if magnitudes.is_second_moment(leaf.array())}

        def described(names):
            return [(tuple(map(tuple, held[name].records)), held[name].shape) for name in names]
        pairs = magnitudes.first_moments(described(held.keys() - second), described(second))
        self.first = frozenset(
            path_string(first) for first, partner in pairs.items()
            if magnitudes.bounded_by(held[path_string(first)].array(),
                                     held[path_string(partner)].array()))
        first, self.magnitude_seconds, self.named_seconds = _named_first_moments(
            leaves, policy, read, self.first)
        self.first |= first
        # Centered pairs (magnitudes.is_centered), found where a leaf is
        # stored (found by review: looked for among leaves held in memory
        # only, `jaxjpeg compress` of a centered RMSprop state restored NaN
        # updates): the pairs by name among every leaf, lossless ones too,
        # and by value among those held.
        by_name = {path_string(leaf.records): leaf for leaf in leaves
                   if leaf.size > 0 and leaf.dtype == np.float32}
        named = magnitudes.named_first_moments(
            (tuple(map(tuple, leaf.records)), leaf.shape) for leaf in by_name.values())
        self._pairs = {path_string(f): path_string(p) for f, p in named.items()}
        # pairs by value where the names pair none, one first moment a second
        # (found by review: an EMA of the weights beside mu took nu, whose
        # centered pair was then missed: NaN next updates at 22%)
        by_value = [(path_string(f), path_string(p)) for f, p in pairs.items()
                    if path_string(f) in self.first and path_string(f) in by_name
                    and path_string(p) in by_name]
        named_seconds = set(self._pairs.values())
        seconds = collections.Counter(p for _, p in by_value)
        self._pairs.update((f, p) for f, p in by_value
                           if p not in named_seconds and f not in self._pairs
                           and seconds[p] == 1)
        self._leaves = by_name
        self._partner = {**{s: f for f, s in self._pairs.items()}, **self._pairs}
        self._centered: dict[str, bool] = {}   # a pair's first moment -> centered
        self._bound_misses: dict[str, bool] = {}   # ... -> its coding misses error_bound

    def _is_centered_pair(self, first: str, first_values=None, second_values=None) -> bool:
        """Whether the pair of first moment ``first`` is centered, from the
        values given or read (once: the answer is kept)."""
        if first not in self._centered:
            if first_values is None:
                first_values = self._leaves[first].array()
            if second_values is None:
                second_values = self._leaves[self._pairs[first]].array()
            self._centered[first] = magnitudes.is_centered(first_values, second_values)
        return self._centered[first]

    def centered_first(self, name: str, values: np.ndarray) -> "tuple | None":
        """(the first moment's leaf, its values) of second moment ``name``
        (of ``values``) where the pair is centered, else None."""
        first = self._partner.get(name)
        if first is None or self._pairs.get(first) != name or self._centered.get(first) is False:
            return None   # (known not centered: its first moment not read again)
        first_values = self._leaves[first].array()
        if not self._is_centered_pair(first, first_values, values):
            return None
        return self._leaves[first], first_values

    def stored_pair_first(self, name: str, values: np.ndarray,
                          coded: "set | None" = None) -> "tuple | None":
        """:meth:`centered_first`, where the first moment is not JPEG-coded
        (a JPEG one cannot be squared back; ``coded``: the names the save
        codes, where known, else the policy's): the pair the store codes as
        one, and the count counts so (found by review: counted apart, files
        33x off a leaf's bytes or 13-27% over their targets)."""
        found = self.centered_first(name, values)
        if found is None:
            return None
        first, array = found
        signed = self.signed(first.name, array)
        return None if _jpeg_coded(self.policy, coded, first.name, array, signed) else found

    def is_first(self, name: str) -> bool:
        """Whether leaf ``name`` is a first moment, by its values or by an
        optimizer's names (found by review: mu of steady gradients, whose nu
        spans too little to pass as a second moment, took a linear step)."""
        return name in self.first or self._trusted_first(name) == name

    def names_a_moment(self, name: str) -> bool:
        """Whether leaf ``name`` is a moment known by its name or its pair."""
        return name in self.first or name in self.magnitude_seconds or name in self._partner

    def keeps_exact(self, name: str, values: np.ndarray) -> bool:
        """Whether leaf ``name`` (of ``values``) of a centered pair is stored
        exactly with its partner: a ``lossless`` pattern names the partner,
        or the pair's coding misses an error bound; coded alone, its error
        swamps the pair's variance (found by review: NaN next updates at half
        the values)."""
        partner = self._partner.get(name)
        if partner is None or (self.error_bound is None
                               and not self.policy.names_lossless(partner)):
            return False   # (nothing to read: a pair is only checked where it may be)
        first = partner if self._pairs.get(partner) == name else name
        if first not in self._pairs:
            return False
        as_first = values if first == name else None
        as_second = values if first != name else None
        if not self._is_centered_pair(first, as_first, as_second):
            return False
        return self.policy.names_lossless(partner) or self._misses_bound(first)

    def _misses_bound(self, first: str) -> bool:
        """Whether, under an error bound, the variance coding of ``first``'s
        centered pair misses it: both are then stored exactly (found by
        review: the second alone was, and the first's error made the next
        update NaN at a third of its values)."""
        if self.error_bound is None:
            return False
        if first not in self._bound_misses:
            self._bound_misses[first] = self._stored_centered(
                self._leaves[first].array(), self._leaves[self._pairs[first]].array(),
                self.step) is None
        return self._bound_misses[first]

    def named_pairs(self, leaves: Sequence[SourceLeaf]) -> dict[int, int]:
        """{first moment: its second moment, and a running maximum beside it:
        that second moment} as positions in ``leaves``, as the optimizers'
        names pair them (a distributed save has one process code them all,
        which then checks them: :meth:`pair`; review: amsgrad's nu_max on
        another process than nu stayed JPEG-coded)."""
        paths = {tuple(map(tuple, leaf.records)): i for i, leaf in enumerate(leaves)}
        # lossless ones too: a centered pair is checked by the process coding
        # either (found by review: a lossless mu went to another process)
        pairs = magnitudes.named_first_moments(
            (path, leaves[i].shape) for path, i in paths.items()
            if leaves[i].size > 0 and _jpeg_dtype(leaves[i].dtype))
        together = {paths[first]: paths[second] for first, second in pairs.items()}
        together.update((paths[m], paths[second]) for second in pairs.values()
                        for m in magnitudes.maximum_paths(second)
                        if m in paths and leaves[paths[m]].shape == leaves[paths[second]].shape)
        return together

    def pair(self, leaves: Sequence[SourceLeaf]) -> None:
        """Pairs the named first moments among ``leaves`` (held in memory)."""
        first, seconds, named = _named_first_moments(leaves, self.policy, False, self.first)
        self.first |= first
        self.magnitude_seconds |= seconds
        self.named_seconds |= named
        # its own leaves, held, stand in for the stand-ins (centered pairs)
        self._leaves.update((path_string(leaf.records), leaf) for leaf in leaves
                            if path_string(leaf.records) in self._leaves)

    def signed(self, name: str, array: np.ndarray) -> bool | None:
        """True: coded with signs; False: values >= 0; None: not on log2 steps."""
        if not self.policy.should_compress(name, array):
            return None
        if name in self.first:
            # a first moment of no magnitude (step 0, a frozen weight's)
            # takes the ordinary path: log2 steps code none (found by review:
            # a zero mu from a file stored raw, 1 MB where sparse takes 52 B)
            return True if magnitudes.has_magnitudes(array) else None
        if name in self.magnitude_seconds:   # Adamax's exp_inf: its values span little
            return False
        if (name in self.named_seconds and bool(np.all(array >= 0))
                and not bool(np.all(array == array.flat[0])) and not _few_values(array)):
            # the second moment of a first one on log2 steps, as optimizers' names
            # pair them (found by review: a trained LM's Adam nu, no small values,
            # was JPEG-coded beside its mu on log2 steps, the next update 3.4% off;
            # review of that fix: bfloat16 / float16 ones too; a constant or few-valued
            # one keeps its exact coding)
            return False if magnitudes.has_magnitudes(array) else None
        if magnitudes.is_second_moment(array):
            # unless on a grid per slice and no optimizer's moment by its names:
            # stored exactly as its codes (found by review: unsigned 4-bit
            # groups on log2 steps, 7 bits a value lossy)
            return (None if not self.names_a_moment(name) and _sliced_grid(array) is not None
                    else False)
        # A centered pair an optimizer's names make, whatever its spread (found
        # by review: steady gradients' nu passed as no moment, the pair was
        # JPEG-coded apart and the next update NaN at 12x)
        first = self._trusted_first(name)
        if first is None or not magnitudes.has_magnitudes(array):   # zeros at step 0: ordinary
            return None
        if first == name:
            return True if self._is_centered_pair(name, array) else None
        return False if self.centered_first(name, array) is not None else None

    def _trusted(self, first: str) -> bool:
        """Whether the pair of first moment ``first`` is one only an
        optimizer's names make (magnitudes.is_trusted_pair)."""
        records = [tuple(map(tuple, self._leaves[n].records)) for n in (first, self._pairs[first])]
        return magnitudes.is_trusted_pair(*records)

    def _trusted_first(self, name: str) -> str | None:
        """The first moment of the pair leaf ``name`` is in (itself, or its
        partner), where only an optimizer's names make that pair (found by
        review: a model's own weights "mu" / "nu" were taken out of JPEG,
        nu 18x worse); else None."""
        first = name if name in self._pairs else self._partner.get(name)
        if first is None or (first != name and self._pairs.get(first) != name):
            return None
        return first if self._trusted(first) else None

    def stored(self, array: np.ndarray, signed: bool, step: float | None = None,
               first: np.ndarray | None = None, first_step: float | None = None,
               counted: bool = False, ladder=None, alternative=None) -> tuple | None:
        """(blob, record fields, note), or None: stored exactly. A leaf of
        few values or float16 holds exactly (a 0/1 mask, counts) is stored
        exactly where that is smaller (found in session 31: a float32 0/1
        mask restored as 0 / 0.992 by default, 0 / 1.164 at 8x; review: a
        float16 one too); a centered second moment of ``first`` (the first
        moment's values, on ``first_step``) as its variance. Step 0.0: the
        ladder's exact rung. ``counted``: a log2 coding's blob counted
        (quantized_vectors.Counted), where no error bound is checked on it;
        ``ladder``: magnitudes.counted_ladder(array, signed), for those;
        ``alternative``: (_few_values, _exact_alternative) of ``array``,
        where the caller has them (a ladder's steps of one probe)."""
        step = self.step if step is None else step
        few, exact = alternative or _alternative(array)
        # A mask: exact at any step (review: a bfloat16 one came back 0 / 0.75);
        # a centered second moment only beside an exact first one (review: a
        # two-valued nu took 24x its bytes, lossy), whose error its variance
        # coding otherwise follows (review of that fix: nu exact beside a lossy
        # mu made nu - mu^2 negative, the next update NaN), on the ladder's
        # finest step at most
        if exact is not None and few and (first is None or _stored_exactly(first)):
            return exact
        if first is not None:   # exact beside an exact first moment only (review: never)
            if step == 0.0 and first_step == 0.0:
                return exact
            return self._stored_centered(first, array, step or magnitudes.FINEST_STEP, counted)
        # the exact rung, or finer than the dtype holds (found by review:
        # bfloat16 moments at 2^-10 took more than exact)
        if step < magnitudes.dtype_step(array.dtype):
            return exact
        counted = counted and self.error_bound is None
        coded = (ladder(step) if counted and ladder is not None
                 else magnitudes.encode(array, signed, step, counted))
        if exact is not None and (coded is None or _nbytes(exact) <= _nbytes(coded)):
            return exact
        if coded is None or self.error_bound is None:
            return coded
        # a block at a time (found by review: float64 copies of the leaf and
        # its error took an error bound on a training state 2.3 leaves of
        # memory past a default save)
        return coded if self._within_bound(_quantized_sse(array, coded), array) else None

    def _within_bound(self, sse: float, array: np.ndarray) -> bool:
        """Whether a coding of ``array`` erring by ``sse`` meets the error bound."""
        from jaxjpeg import rate

        return math.sqrt(sse) <= self.error_bound * math.sqrt(rate.finite_norm2(array))

    def _stored_centered(self, first: np.ndarray, second: np.ndarray, step: float,
                         counted: bool = False) -> tuple | None:
        """The variance coding, its error under an error bound measured as
        restore gives it: over the first moment as it is stored (found by
        review: checked against its exact values, the bound was missed 2x)."""
        coded = magnitudes.encode_centered(first, second, step,
                                           counted and self.error_bound is None)
        if coded is None or self.error_bound is None:
            return coded
        variance = quantized_vectors.restored_values(
            second, coded[0], {**coded[1], "stored": "quantized"})
        restored = magnitudes.above_square(np.reshape(variance, -1), np.reshape(_stored_values(
            first, self.stored(first, True, step)), -1))
        return coded if self._within_bound(_restored_sse(restored, second), second) else None

    def stored_bytes(self, name: str, array: np.ndarray, signed: bool,
                     small: bool = False, values_of: Callable[[], np.ndarray] | None = None
                     ) -> int:
        """Its bytes at this step; for a byte target, at every step of the
        ladder it may move to (:meth:`settle`): a large leaf's from a sample
        of it (five codings of every moment took as long as the save).
        ``small``: a moment of a leaf the policy keeps out of JPEG, whose
        ladder starts at HALF_LIKE_STEP (see :meth:`small_step`).
        ``values_of``: gives ``array`` again, where its exact rung and a fine
        target's steps coarser than its own (``finer``: its plans go finer)
        may be measured later, when a plan reaches them (:meth:`rung_bytes`)."""
        if small:
            self.small.add(name)
        self.measured[name] = (signed, small)
        if values_of is not None:
            self._values_of[name] = values_of
        base = magnitudes.HALF_LIKE_STEP if small else self.step
        steps = (magnitudes.byte_target_steps(base, self.finer) if self.error_bound is None
                 else (self.step,))
        # a centered second moment is stored as its variance (found by review:
        # counted as itself, small leaves' files landed 3-5% over)
        found = None if signed else self.stored_pair_first(name, array)
        first = None if found is None else found[1]
        if found is not None:
            self.centered[name] = found[0].name
        few = _few_values(array) and (first is None or _stored_exactly(first))
        exact = _exact_alternative(array, few) if few else None
        if exact is not None:   # a mask, stored exact at every step (stored()): counted whole
            self.ladder[name] = (array.size, [_nbytes(exact)] * len(steps))   # (review: its
            return _nbytes(exact)   # sample, deflated alone, was counted 22-33x its bytes)
        probe, scale = array, 1.0
        if len(steps) > 1 and array.size > _LADDER_PROBE:
            probe = quantized_vectors.sampled(array.reshape(-1), _LADDER_PROBE)
            scale = array.size / _LADDER_PROBE
            if first is not None:   # the same positions
                first = quantized_vectors.sampled(first.reshape(-1), _LADDER_PROBE)
        # a fine target's coarser steps later, where the values can be read again
        later = (magnitudes.ladder_base(self.finer) + 1 if self.finer and values_of is not None
                 else len(steps))
        sizes, ladder, alternative = [], None, None
        for i, step in enumerate(steps):   # each plan of a save measures again: its
            key = (name, step, signed, first is None)   # leaves are the same
            if key not in self.sizes_at and i >= later:
                sizes.append(_UNMEASURED)
                continue
            if key not in self.sizes_at:
                if ladder is None and first is None and len(steps) > 1:   # (a probe's)
                    ladder = magnitudes.counted_ladder(probe, signed)
                alternative = alternative or _alternative(probe)
                coded = self.stored(probe, signed, step, first=first, first_step=step,
                                    counted=True, ladder=ladder, alternative=alternative)
                # None: stored exactly, deflated (found by review: counted raw,
                # a bfloat16 state's 2.5x landed 25% under)
                self.sizes_at[key] = (_EXACT_RUNG if coded is None
                                      else round(scale * _nbytes(coded)))
            sizes.append(self.sizes_at[key])
        self.ladder[name] = (array.size, sizes)
        if name not in self._values_of:   # measured now, its values not kept
            for i, size in enumerate(sizes):
                if size is _EXACT_RUNG:
                    self.rung_bytes(name, i, array)
        return self.rung_bytes(name, magnitudes.ladder_base(self.finer) if len(sizes) > 1 else 0,
                               array)

    def rung_bytes(self, name: str, i: int, array: np.ndarray | None = None) -> int:
        """Ladder leaf ``name``'s bytes at the ladder's index ``i``; stored
        exactly there, its values deflated (one reading of ``array``, or of
        its values as stored_bytes was given them) the first time a plan
        asks: deflating every moment for its exact rung, which only a 2x
        target reaches, was a third of a 3x target's time on a training
        state."""
        size = self.ladder[name][1][i]
        if size is _UNMEASURED:
            self._measure_coarser([n for n, (_, sizes) in self.ladder.items()
                                   if sizes[i] is _UNMEASURED])
            size = self.ladder[name][1][i]
        if size is not _EXACT_RUNG:
            return size
        if (name, None) not in self.sizes_at:
            if array is not None:
                self.sizes_at[name, None] = _exact_bytes(array)
            else:   # every leaf's exact rung here, as a plan sums them: on the save's threads
                self._measure_exact([n for n, (_, sizes) in self.ladder.items()
                                     if sizes[i] is _EXACT_RUNG and (n, None) not in self.sizes_at
                                     and n in self._values_of])
        return self.sizes_at[name, None]

    def _measure_exact(self, names: list[str]) -> None:
        """The exact bytes of ladder leaves ``names`` (their planes counted
        without the interpreter: a training state's 2x target had deflated
        its moments one at a time)."""
        def measured(name):
            return name, _exact_bytes(self._values_of[name]())
        for name, nbytes in self._read_again(measured, names):
            self.sizes_at[name, None] = nbytes

    def _measure_coarser(self, names: list[str]) -> None:
        """Every step of ladder leaves ``names`` (their values read again)."""
        for _ in self._read_again(lambda name: self.stored_bytes(
                name, self._values_of[name](), *self.measured[name]), names):
            pass

    def _read_again(self, measure: Callable[[str], Any], names: list[str]):
        """``measure(name)`` of ladder leaves ``names``, each reading its
        values again, on the save's threads (a leaf's float32 bytes in
        flight at most), in order."""
        size = {name: self.ladder[name][0] for name in names}
        return in_order(measure, names, save_workers(), max(size.values()) * 4,
                        lambda name: 4 * size[name], largest_first=False)

    def refine(self, leaves: Sequence[SourceLeaf]) -> None:
        """The ladder of these leaves (the ladder's) measured at finer steps
        too, from now on (a plan that leaves bytes beyond the coded leaves'
        largest codings)."""
        self.finer = True

        def measure(leaf):   # a leaf read from a file measured now (review: read again)
            self.stored_bytes(leaf.name, leaf.array(), *self.measured[leaf.name],
                              values_of=leaf.array if leaf.resident else None)
        for _ in in_order(measure, leaves, save_workers(),   # on the save's threads, as
                          max((leaf.nbytes for leaf in leaves), default=0),   # analysed
                          lambda leaf: leaf.nbytes):
            pass

    def settle(self, budget: float, coded_values: int, coded_bytes: float = 0.0,
               raw_extras: Sequence[float] = (), slack: float = 0.0) -> float:
        """The bytes a byte target frees by coarser log2 steps (negative: takes
        by finer ones). Where the coded leaves' largest codings
        (``coded_bytes``) leave bytes of ``budget`` unspent, finer steps
        (:meth:`_finer`), before coded leaves stored raw instead
        (``raw_extras``: the bytes each would add; _exact_instead) where
        that leaves no more than ``slack`` unspent, else as leaves the
        fewer (found by review: moments first, a training state's 2x landed
        10.7% under where raw kernels beside moments at 1/16 had landed it
        1.2% under); otherwise the finest step at which the JPEG-coded leaves
        keep at least half the bits a value of these leaves (else the
        coarsest). A single-process save (others' leaves are not measured
        here)."""
        self.one_finer = set()
        if not self.ladder:
            return 0.0
        base = magnitudes.ladder_base(self.finer)
        steps = magnitudes.byte_target_steps(self.step, self.finer)

        def used(i):
            return sum(self.rung_bytes(name, i) for name in self.ladder)
        if base and budget > coded_bytes:
            first = self._finer(budget - coded_bytes, used)
            if _unfilled(first[3], raw_extras) > slack:
                raw = budget - coded_bytes - _unfilled(budget - coded_bytes, raw_extras)
                after = self._finer(budget - coded_bytes - raw, used)
                first = min((first, after), key=lambda f: _unfilled(f[3], raw_extras))
            i, self.one_finer, taken, _ = first
        else:
            i, taken = self._coarser_rung(budget, coded_values, used, steps), 0
        self.step, self.rung = steps[i], i - base
        return used(base) - used(i) - taken

    def _finer(self, spare: float, used) -> tuple[int, set, float, float]:
        """(ladder index, leaves a step finer still, their extra bytes, bytes
        left) of the finest step whose extra bytes ``spare`` holds, and the
        leaves moved one finer again, the largest steps first, while it
        holds them."""
        base = i = magnitudes.ladder_base(self.finer)
        while i > 0 and used(i - 1) - used(base) <= spare:
            i -= 1
        spare -= used(i) - used(base)
        names, taken = set(), 0
        if i > 0:
            def extra(unit):
                return sum(self.rung_bytes(n, i - 1) - self.rung_bytes(n, i) for n in unit)
            for unit in sorted(self._moving_units(), key=extra, reverse=True):
                if 0 < extra(unit) <= spare - taken:
                    names.update(unit)
                    taken += extra(unit)
        return i, names, taken, spare - taken

    def _moving_units(self) -> list[tuple[str, ...]]:
        """The ladder's leaves as they move a step finer: a centered second
        moment with its first (its exact rung is counted beside an exact
        first, the only place it is exact: found by review, a nu moved
        alone kept its step, the bytes counted for it unspent, a 1.5x file
        10.9% under), the others alone."""
        units = {name: (name,) for name in self.ladder}
        for second, first in self.centered.items():
            if second in units and first in units:
                del units[first]
                units[second] = (first, second)
        return list(units.values())

    def _settled_index(self, name: str | None = None) -> int:
        """The ladder's index of the step settled on (of leaf ``name``'s:
        one lower where it moved a step finer)."""
        return self.rung + magnitudes.ladder_base(self.finer) - (name in self.one_finer)

    def step_of(self, name: str) -> float:
        """The step leaf ``name`` settled on (see :meth:`settle`)."""
        if name not in self.one_finer:
            return self.step
        return 0.0 if self._settled_index(name) == 0 else self.step / 2

    def _coarser_rung(self, budget: float, coded_values: int, used, steps) -> int:
        """The ladder's index of the finest step, the save's own or coarser,
        that leaves the JPEG-coded leaves at least half these leaves' bits a
        value (else the coarsest, said in ``tight``)."""
        base = magnitudes.ladder_base(self.finer)
        values = sum(n for n, _ in self.ladder.values())
        for i in range(base, len(steps)):
            left = budget + used(base) - used(i)
            # found by review: with no JPEG-coded leaf the first step was kept
            if left > 0 and (not coded_values or 8 * left / coded_values >= 4 * used(i) / values):
                return i
        if left > 0 and coded_values:   # said (found by review: the weights were left 0.34
            small = (f" (small leaves' {magnitudes.HALF_LIKE_STEP * 2 ** (i - base):g})"   # bits)
                     if self.small else "")
            self.tight = (
                f"jaxjpeg: the byte target leaves the coded leaves "
                f"{8 * left / coded_values:.2f} bits a value, under half the "
                f"{8 * used(i) / values:.2f} of the leaves on log2 steps (jaxjpeg.magnitudes: "
                f"optimizer moments, scales, small vectors) at "
                f"their coarsest steps, {steps[i]:g}{small}: ask for less, or save those "
                "leaves apart")
        return i

    def small_signed(self, name: str, array: np.ndarray) -> bool | None:
        """For a leaf the policy keeps out of JPEG: whether a byte target
        codes it as a first moment (True: with signs) or a second one
        (False) on log2 steps, or None (neither; a constant or few values,
        which are kept exact)."""
        if array.size <= 1 or not quantizable(array.dtype) or _few_values(array):
            return None
        if _holds_one_value(array.reshape(-1)):
            return None
        if self.is_first(name):
            return True if magnitudes.has_magnitudes(array) else None
        named_second = (name in self.magnitude_seconds or name in self.named_seconds
                        or self._trusted_first(name) not in (None, name))
        if named_second and bool(np.all(array >= 0)):   # by an optimizer's names
            return False
        # (on a grid per slice: its codes, as signed() says; review: under a byte
        # target beside Adam's state, an unsigned 4-bit leaf on log2 steps at 9 bits)
        return False if magnitudes.is_second_moment(array) and _sliced_grid(array) is None else None

    def small_step(self, name: str) -> float | None:
        """The settled step of a small leaf's moment on the ladder, or None."""
        return self.small_step_at_most(name) if name in self.small else None

    def settled_bytes(self, small: bool | None = None) -> int:
        """The measured leaves' bytes at the step settled on (``small``: only
        small leaves' moments, or only the others)."""
        return sum(self.rung_bytes(name, self._settled_index(name)) for name in self.ladder
                   if small is None or (name in self.small) == small)

    def small_step_at_most(self, name: str | None = None) -> float:
        """The step small leaves' moments take at the rung settled on (leaf
        ``name``'s)."""
        return magnitudes.byte_target_steps(magnitudes.HALF_LIKE_STEP, self.finer)[
            self._settled_index(name)]

    def exact_note(self, array: np.ndarray) -> str:
        return (f"stored exactly: a {array.dtype} leaf whose values matter one by one "
                "(jaxjpeg.magnitudes)")


def _named_first_moments(leaves: Sequence[SourceLeaf], policy: Policy, read: bool,
                         paired: frozenset = frozenset()
                         ) -> tuple[frozenset, frozenset, frozenset]:
    """The first moments an optimizer's names pair (magnitudes.named_first_moments),
    each pair checked on its values: held in memory, or (``read``) read from
    a file once more, but for the names only optimizers give
    (magnitudes.is_trusted_pair), taken as they are (from a file, unread; in
    memory, where the second is >= 0) (found in session 29: ``jaxjpeg compress``
    of an Orbax training state JPEG-coded its mu, the next update 19% off;
    review: flat trees, ``{"mu", "nu"}``, were not paired in memory either);
    those ``paired`` already are not checked again. Also returns the
    partners that are magnitudes, not squares (magnitudes.MAGNITUDE_NAMES:
    Adamax's exp_inf, whose values span too little to pass as second
    moments; found by review: in memory neither was paired, the next update
    564x off at one value): coded on log2 steps by their name; and the
    second moments of the pairs only an optimizer's names make
    (magnitudes.is_trusted_pair), coded on log2 steps where >= 0."""
    named = {tuple(map(tuple, leaf.records)): leaf for leaf in leaves
             if (leaf.resident or read) and _may_be_moment(leaf, policy)}
    pairs = magnitudes.named_first_moments((path, leaf.shape) for path, leaf in named.items())
    first, seconds, trusted_seconds = set(), set(), set()
    for path, partner in pairs.items():
        magnitude = magnitudes.is_magnitude_name(partner)
        trusted = magnitudes.is_trusted_pair(path, partner)
        if named[path].name in paired:
            if trusted and not magnitude:
                trusted_seconds.add(named[partner].name)
            continue
        if trusted and not named[path].resident and not named[partner].resident:
            first.add(named[path].name)
            (seconds if magnitude else trusted_seconds).add(named[partner].name)
            continue
        second = named[partner].array()
        if trusted and not magnitude and magnitudes.in_optimizer_state(path):
            # in memory as from a file, whatever nu's spread or mu's size against it
            # (found by review: a trained LM's Adam nu, no small values, passed as no
            # second moment, and mu and nu were JPEG-coded: the next update 7.6% off,
            # 1.4% from the CLI; review of that fix: nu of i.i.d. gradients,
            # AdaBelief's steady mu at 191 roots). Only under an optimizer's part:
            # a statistics module's exp_avg / exp_avg_sq took log2 steps (+25%).
            if bool(np.all(np.asarray(second) >= 0)) and magnitudes.has_magnitudes(second):
                first.add(named[path].name)
                trusted_seconds.add(named[partner].name)
            continue
        if magnitude:   # |m| within the bound of u itself: squared, as bounded_by roots it
            u = np.asarray(second, np.float32)
            if np.all(u >= 0) and magnitudes.bounded_by(named[path].array(), np.square(u),
                                                        magnitudes.NAMED_MOMENT_BOUND):
                first.add(named[path].name)
                seconds.add(named[partner].name)
        elif (magnitudes.is_second_moment(second)
                and magnitudes.bounded_by(named[path].array(), second,
                                          magnitudes.NAMED_MOMENT_BOUND)):
            first.add(named[path].name)
    for path, partner in pairs.items():   # amsgrad's running maxima beside the pairs taken
        if named[partner].name in trusted_seconds:
            trusted_seconds.update(named[m].name for m in magnitudes.maximum_paths(partner)
                                   if m in named and named[m].shape == named[partner].shape)
    partners = set(pairs.values())
    first |= {leaf.name for path, leaf in named.items()
              if path not in pairs and path not in partners and leaf.name not in paired
              and magnitudes.is_lone_first_moment(path)}
    return frozenset(first), frozenset(seconds), frozenset(trusted_seconds)


def _may_be_moment(leaf: SourceLeaf, policy: Policy) -> bool:
    return (leaf.size > 0 and _jpeg_dtype(leaf.dtype)
            and not policy.names_lossless(leaf.name))


def _thin_shaped(array: np.ndarray) -> bool:
    """Whether a leaf JPEG leaves raw under an error bound may be quantized
    on one step within it: a sparse leaf (rate.is_sparse_leaf), or one whose
    axes but the longest hold fewer than rate.THIN_SIDE values."""
    from jaxjpeg import rate

    if array.ndim == 0 or not array.size:
        return False
    return (rate.is_sparse_leaf(array)
            or (quantizable(array.dtype)
                and array.size // max(array.shape) < rate.THIN_SIDE
                and bool(np.isfinite(array).all())))


def _stored_raw_bytes(array: np.ndarray, limits=None, first_moment: bool = False) -> tuple:
    """A byte target's estimate of the bytes of a leaf kept out of JPEG:
    (stored, its record's fields where rounded, else None), stored the
    smaller of _lossy_raw's and the exact ones'."""
    exact = _exact_bytes(array)
    if _few_values(array) or _on_a_grid(array):
        return exact, None
    lossy = _lossy_raw(array, limits, first_moment, exact_option=False)
    if lossy is None or _nbytes(lossy) >= exact:
        return exact, None
    return _nbytes(lossy), lossy[1]


def _wide_integer_warning(name, array, x64: bool) -> str | None:
    """A warning where a 64-bit integer leaf holds values its 32-bit dtype
    does not and jax_enable_x64 is off (``x64``: as the caller's thread has
    it; review: jax.enable_x64() sets it for one thread, and the save's
    workers read it off): restore would refuse it (found by review: an ONNX
    Slice end of int64's max saved without a word, every restore failed)."""
    if array.dtype not in (np.int64, np.uint64) or not array.size or x64:
        return None
    narrow = np.iinfo(np.int32 if array.dtype == np.int64 else np.uint32)
    low, high = array.min(), array.max()
    if narrow.min <= low and high <= narrow.max:
        return None
    return (f"jaxjpeg: {name} holds {array.dtype} values beyond {narrow.dtype} "
            f"([{low}, {high}]); jax restores it only with jax_enable_x64 on "
            "(jax.config.update('jax_enable_x64', True)); jaxjpeg export reads it as saved")


def _coding_note(name, array, enc) -> tuple[str, str | None]:
    """(what a user should know about how a leaf was stored, a warning to give
    or None); the save warns from its own thread, where the caller's frame is."""
    if enc is None or enc.outliers is None:
        return "", None
    values = np.asarray(enc.outliers.values, np.float64)
    special = int(np.count_nonzero(~np.isfinite(values)))
    note = f"{enc.outliers.count} values kept exactly"
    if not special:
        return note, None
    return (note + f" ({special} NaN or infinite)",
            f"jaxjpeg: {name} holds {special} NaN or infinite values; they are kept "
            "exactly and the rest of the leaf is coded")


# A coded leaf whose bulk -- its values within BULK_SIGMAS of its median, in
# sigmas of 1.4826 times the median absolute deviation of BULK_SAMPLE
# values at fixed positions -- restores at a relative error over BULK_ERROR
# (about as bad as zeros, or worse) is warned of: values far from it, too many or too
# spread to be kept aside, or rows at scales decades apart, set the coding's
# step. Found by review: 10% of a leaf at 50 sigmas, magnitudes spread from
# 10 to 1e6 sigmas, 13% of a leaf gross left the rest at relative error
# 1.3-5700, row scales of log2 std 3 their quiet rows at 1.1-2.4, without a
# word. Only leaves whose RMS about the median is BULK_CHECK sigmas or more
# are decoded to check (ordinary weights: 1-2.5), and only where at most
# BULK_FAR_MOST of the leaf lies far: where more does, the "bulk" is what
# weight decay left of dead units (PP-OCRv6's detector: 38-57% of four
# kernels' values within 1e-7 of 0), or the quiet channels of a leaf whose
# channel scales spread further (its 7 x 7 depthwise kernel's, 43% far).
# Over 0.8, not 1 (found by review: a (4, 256, 1024) leaf whose layers had
# 6% of columns 50x, each its own, restored the rest at 1.004 and its bulk,
# which holds the loud columns' small values too, at 0.90: no word).
BULK_SIGMAS = 8.0
BULK_CHECK = 4.0
BULK_ERROR = 0.8
BULK_SAMPLE = 1024
BULK_FAR_MOST = 1 / 4
# Values read at once: 512 KiB as float64. A chunk of 2^20 was a whole 4 MiB
# leaf, five temporaries of its size or twice it (29 MiB), the peak of a
# 1 GB tree's default save.
_BULK_CHUNK = 1 << 16


def _bulk_lost(name: str, array: np.ndarray, enc, layer_axis: int | None = None) -> str | None:
    """The warning of BULK_ERROR for a JPEG-coded leaf, or None; of each
    layer apart for a stack whose layers are coded on their own scales
    (``layer_axis``: found by review, a loud layer's few small values, in
    the bulk of the whole leaf, made a stack restoring every layer at 0.08
    read as lost, 7.59)."""
    if not isinstance(enc, codec.EncodedTensor):
        return None
    decoded = []

    def decoded_leaf():
        if not decoded:
            decoded.append(codec.decode_tensor(enc).reshape(array.shape))
        return decoded[0]
    if layer_axis is None:
        return _bulk_lost_in(name, array, decoded_leaf)
    for i in range(array.shape[layer_axis]):
        found = _bulk_lost_in(f"{name} (layer {i} of axis {layer_axis})",
                              np.take(array, i, axis=layer_axis),
                              lambda: np.take(decoded_leaf(), i, axis=layer_axis))
        if found is not None:
            return found
    return None


def _bulk_lost_in(name: str, array: np.ndarray, decode) -> str | None:
    """_bulk_lost of ``array``, ``decode()`` its restored values."""
    if array.size < BULK_SAMPLE:
        return None
    flat = array.reshape(-1)
    # at golden-ratio strides: no row or column of a view read alone (found by
    # review: every k-th value read one column of an odd-width matrix)
    at = (np.arange(BULK_SAMPLE) * 0.6180339887498949 * flat.size).astype(np.int64) % flat.size
    sample = np.asarray(flat[at], np.float64)
    sample = sample[np.isfinite(sample)]
    # the spread of the values that are not exact zeros where they are many:
    # a leaf pruned at random by 41-49% had a collapsed deviation, its weights
    # read as far values and its zeros as a bulk lost (found by review)
    nonzero = sample[sample != 0]
    center, sigma = (views.median_and_sigma(nonzero if nonzero.size >= BULK_SAMPLE // 4
                                            else sample) if sample.size else (0.0, 0.0))
    if not (sigma > 0 and np.sqrt(np.mean((sample - center) ** 2)) >= BULK_CHECK * sigma):
        return None
    chunks = range(0, flat.size, _BULK_CHUNK)   # (no leaf-sized float64 copies)

    def bulk_of(start):
        x = flat[start:start + _BULK_CHUNK].astype(np.float64)
        with np.errstate(invalid="ignore"):
            return x, np.abs(x - center) <= BULK_SIGMAS * sigma
    far_count = sum(int(np.count_nonzero(~bulk & np.isfinite(x)))
                    for x, bulk in map(bulk_of, chunks))
    if far_count > BULK_FAR_MOST * flat.size:
        return None
    decoded = np.asarray(decode()).reshape(-1)
    sums = np.zeros(4)   # the bulk's squared errors, squares and count; far values kept
    for start in chunks:
        x, bulk = bulk_of(start)
        restored = decoded[start:start + _BULK_CHUNK]
        kept_here = np.count_nonzero(~bulk & (restored == x))
        x = x[bulk]
        error = restored[bulk] - x
        sums += (error @ error, x @ x, x.size, kept_here)
    bulk_count, kept = int(sums[2]), int(sums[3])
    relative = float(np.sqrt(sums[0] / max(sums[1], np.finfo(float).tiny)))
    if not relative > BULK_ERROR:
        return None
    than = "worse than" if relative > 1 else "about as bad as"
    return (f"jaxjpeg: {name}: the bulk of its values (within {BULK_SIGMAS:g} sigmas of its "
            f"median, {bulk_count:,} of {flat.size:,}) restores at relative error "
            f"{relative:.3g}, {than} zeros: {far_count:,} values far from it ({kept:,} "
            "of them kept exactly) set its coding's step; Policy(lossless=[...]) stores the "
            "leaf exactly")


def _rate_record(given: dict) -> dict:
    """The rate setting as stored in the file (JSON-safe)."""
    name, value = next(iter(given.items()))
    if name == "encoder":
        return {"encoder": getattr(value, "__name__", "custom")}
    if name == "qtable":
        return {"qtable": [int(v) for v in value]}
    return {name: float(value)}
