"""Restoring checkpoints onto devices: unsharded leaves in windows of bounded
size, one decode call per window and device; sharded leaves decoded by each
device from only the tiles its shard overlaps (a window per leaf).

The pipeline (``_restore_windows``): one thread reads window i + 1 (its blobs
as a few large ranged reads in flight at once, see ContainerReader.prefetch)
and builds its decode plan, while the caller's thread hands window i to the
device and dispatches its decode (asynchronous); at most ``_IN_FLIGHT``
decodes are unchecked at a time. Time-to-params thus tends to max(read,
decode) rather than their sum, and host memory holds a few windows, not the file.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxjpeg import codec, dtypes, ops, prng_keys, threads, views
from jaxjpeg.checkpoint import patterns
from jaxjpeg.checkpoint_reader import Checkpoint, SavedLeaf
from jaxjpeg.treepaths import glob_escape, key_record, matching, nest, path_string
from jaxjpeg.views import MatrixView

@dataclasses.dataclass
class RestoreStats:
    """Filled by restore: compressed bytes handed to each device."""

    payload_bytes_per_device: dict = dataclasses.field(default_factory=dict)

    def add(self, device, n: int) -> None:
        key = str(device if device is not None else default_device())
        self.payload_bytes_per_device[key] = self.payload_bytes_per_device.get(key, 0) + n


@dataclasses.dataclass(frozen=True)
class LeafRequest:
    """One saved leaf to restore or load: in which dtype, where."""

    leaf: SavedLeaf
    dtype: np.dtype
    sharding: Any = None  # a multi-device jax.sharding.Sharding, or None
    device: Any = None    # the one device of an unsharded leaf (None: the default)
    memory_kind: Any = None   # the target's memory, where not the device's (host offloading)
    # A one-device target sharding that is not a SingleDeviceSharding (a
    # NamedSharding over a mesh of one): the result takes it, not the device's.
    as_given: Any = None
    prng_impl: str | None = None   # key data restored as typed PRNG keys of this implementation

    def finish(self, value):
        """``value`` (restored and placed) as the request asks: key data wrapped."""
        return prng_keys.wrap(value, self.prng_impl, self.leaf.path)


def saved_request(leaf: SavedLeaf, dtype=None) -> LeafRequest:
    """Leaf ``leaf`` as saved (``dtype``: restore's override), keys as keys."""
    return LeafRequest(leaf, restored_dtype(leaf.dtype, dtype, name=leaf.path),
                       prng_impl=leaf.prng_impl)


def saved_struct(leaf: SavedLeaf) -> jax.ShapeDtypeStruct:
    """The shape and dtype leaf ``leaf`` restores as (a key array's for key data)."""
    if leaf.prng_impl is not None:
        return prng_keys.key_struct(leaf.path, leaf.prng_impl, leaf.shape)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def restored_dtype(saved: np.dtype, override=None, wanted=None, name: str = "") -> np.dtype:
    """The dtype a leaf comes back in: the target's (``wanted``) or the saved
    one, changed to ``override`` (``dtype=`` of restore and load) only when
    floating: a step counter or a mask keeps its integer or bool dtype.
    Floating values are not cast to bool, nor complex ones to a real
    dtype; to an integer dtype they must fit it (check_values_fit,
    check_decoded_range)."""
    base = np.dtype(saved if wanted is None else wanted)
    if override is not None and jnp.issubdtype(base, jnp.floating):
        base = np.dtype(override)
    if not _jax_holds(base):   # found by review: XLA's "Unknown NumPy dtype" after decoding
        raise ValueError(f"leaf {name!r}: jax arrays cannot hold {base.name}")
    saved = np.dtype(saved)
    if (_is_float(saved) and base.kind == "b") or (saved.kind == "c" and base.kind != "c"):
        raise ValueError(f"leaf {name!r}: its {saved.name} values cannot be restored "
                         f"as {base.name} (cast after restoring if that is meant)")
    return base


@functools.lru_cache(maxsize=None)
def _jax_holds(dtype: np.dtype) -> bool:
    """Whether a jax array may have ``dtype``: numpy's numeric kinds may
    (objects, strings and dates may not: found by review, jax's own error
    naming no leaf), of ml_dtypes' (kind 'V') XLA knows some (bfloat16,
    float8 ...) and not others (float6): one value placed on the default
    device tells."""
    if np.dtype(dtype).kind != "V":
        return np.dtype(dtype).kind in "biufc"
    try:   # eagerly even under a trace (found by review: a restore under jit
        with jax.ensure_compile_time_eval():   # cached False for bfloat16)
            jax.device_put(np.zeros(1, dtype)).block_until_ready()
    except Exception:   # jax raises TypeError, XLA its runtime error
        return False
    return True


def _boxed_hint(name: str, saved) -> str:
    """Where boxed values and plain ones meet: an NNX State's Variables and
    linen's nn.Partitioned boxes are saved with a ``/value`` key after their
    path, their pure dict (nnx.to_pure_dict) and unboxed variables
    (nn.unbox) without (found by review: a State's file restored into a pure
    dict said only that ``bias`` was missing; a linen file of boxes was
    said to hold an nnx.State)."""
    if name + "/value" in saved:
        return (f" (it holds {name + '/value'!r}: boxed values were saved, an nnx.State's "
                "Variables or linen's nn.Partitioned; restore into a target boxed alike, "
                "the abstract nnx.State or linen variables themselves, not nnx.to_pure_dict "
                "or nn.unbox of them)")
    if name.endswith("/value") and name[:-len("/value")] in saved:
        return (f" (it holds {name[:-len('/value')]!r}: plain values were saved; restore "
                "into nnx.to_pure_dict(abstract_state), then nnx.replace_by_pure_dict, or "
                "into nn.unbox of linen's boxed variables)")
    return ""


def _nested_hint(name: str, saved) -> str:
    """Where the file holds ``name`` under a prefix (a target of params for
    a saved ``{"params": ..., ...}``: found by review, the error named the
    leaf alone), those paths, and how to reach one; or boxed, or not
    (:func:`_boxed_hint`)."""
    boxed = _boxed_hint(name, saved)
    if boxed:
        return boxed
    under = [path for path in saved if path.endswith("/" + name)]
    if not under:
        return ""
    if len(under) > 1:
        return (f" (it holds {len(under)} leaves under prefixes, e.g. {under[0]!r} and "
                f"{under[1]!r}: give the target under the prefix meant)")
    prefix = under[0][:-len(name)]
    return (f" (it holds {under[0]!r}: give the target under {prefix!r}, or restore that "
            f"subtree with paths=[{(glob_escape(prefix) + '*')!r}])")


def target_requests(ckpt: Checkpoint, target, dtype) -> tuple[list[LeafRequest], Any]:
    from jaxjpeg.compressed import CompressedArray

    by_path = {leaf.path: leaf for leaf in ckpt.leaves}
    # jaxjpeg.load's leaves kept whole: flattened, a CompressedArray's coded
    # operands were asked of the file as leaves (found by review: "no leaf
    # 'params/qkv/0'")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        target, is_leaf=lambda x: isinstance(x, CompressedArray))
    requests = []
    for path, want in leaves:
        name = path_string([key_record(k) for k in path])
        if isinstance(want, CompressedArray):
            raise ValueError(f"{name!r}: the target holds a jaxjpeg.load result (a "
                             "CompressedArray); give its shapes, jax.eval_shape(jaxjpeg.decode, "
                             "loaded), or a restored tree")
        if name not in by_path:
            raise KeyError(f"{ckpt.path}: no leaf {name!r} in the checkpoint"
                           + _nested_hint(name, by_path))
        saved = by_path[name]
        want = _target_leaf(name, want, saved)
        impl = prng_keys.target_impl(name, saved.prng_impl, saved.shape, want)
        if impl is not None:   # a key array asked of its saved key data
            want = _Want(saved.shape, None, want.sharding)
        if want.shape != saved.shape:
            if saved.prng_impl is not None:   # found by review: "saved shape (2,)" for one key
                keys = prng_keys.key_struct(name, saved.prng_impl, saved.shape)
                raise ValueError(f"{name}: target shape {want.shape} != saved PRNG keys "
                                 f"{keys.dtype}{list(keys.shape)} (their data: uint32"
                                 f"{list(saved.shape)})")
            raise ValueError(f"{name}: target shape {want.shape} != saved shape {saved.shape}")
        want_dtype = restored_dtype(saved.dtype, dtype, want.dtype, name)
        sharding = want.sharding
        if sharding is not None and impl is not None:
            # laid out as keys: the words of a key stay together (found by
            # review: a spec over the key data's words restored keys jax
            # cannot use, "trailing dims of extended dtypes should be replicated")
            check_layout(name, sharding, prng_keys.key_struct(name, impl, saved.shape).shape)
        if sharding is not None:
            check_layout(name, sharding, saved.shape)
        memory_kind = other_memory_kind(sharding)
        device = None
        # One device of this process: decoded with the other unsharded leaves.
        # (One device of another process stays a sharding: this process holds
        # none of it, and _restore_sharded then decodes nothing here.)
        as_given = None
        if sharding is not None and own_device(sharding) is not None:
            device, as_given, sharding = own_device(sharding), given_sharding(sharding), None
        requests.append(LeafRequest(saved, want_dtype, sharding, device, memory_kind, as_given,
                                    impl))
    return requests, treedef


def check_layout(name: str, sharding, shape) -> None:
    """ValueError naming the leaf where ``sharding`` cannot lay out ``shape``
    (found by review: jax's IndivisibleError named no leaf; a spec longer
    than the leaf's rank was an IndexError from inside jax, or taken)."""
    try:
        if len(sharding.device_set) > 1:   # one device's: a leaf of lower rank takes its device
            sharding.check_compatible_aval(tuple(shape))
        sharding.addressable_devices_indices_map(tuple(shape))
    except (ValueError, IndexError) as e:
        raise ValueError(f"{name}: the sharding cannot lay out its shape {tuple(shape)}: "
                         f"{e}") from None


def own_device(sharding) -> jax.Device | None:
    """The one device of this process ``sharding`` places on, or None (it
    spans several devices, or its one is another process's)."""
    devices = sharding.device_set
    if len(devices) == 1 and next(iter(devices)).process_index == jax.process_index():
        return next(iter(devices))
    return None


def given_sharding(sharding):
    """A one-device ``sharding`` as the result placed there takes it: itself
    (a NamedSharding over a mesh of one keeps its mesh), or None for a
    SingleDeviceSharding, which the placement gives anyway."""
    return None if isinstance(sharding, jax.sharding.SingleDeviceSharding) else sharding


def other_memory_kind(sharding) -> str | None:
    """The memory ``sharding`` asks for where it is not its devices' own
    (``pinned_host`` to keep optimizer state off the accelerator), else None.
    Decoding runs in device memory; such leaves move there after."""
    kind = getattr(sharding, "memory_kind", None)
    if kind is None:
        return None
    try:
        default = next(iter(sharding.device_set)).default_memory().kind
    except (AttributeError, RuntimeError, ValueError):   # a runtime without memories
        return None
    return None if kind == default else kind


def with_device_memory(requests: list[LeafRequest], device) -> list[LeafRequest]:
    """The requests placed on restore's or load's ``device=`` take what a
    one-device sharding given there asks: its memory kind where not its
    device's own (found by review: ``pinned_host`` was dropped without a
    word), and itself as the result's sharding where it is not a
    SingleDeviceSharding (found by review: a NamedSharding over a mesh of
    one came back a SingleDeviceSharding, as a target's once did)."""
    if not isinstance(device, jax.sharding.Sharding):
        return requests
    kind, given = other_memory_kind(device), given_sharding(device)
    if kind is None and given is None:
        return requests
    return [dataclasses.replace(r, memory_kind=kind, as_given=given)
            if r.sharding is None and r.device is None and r.memory_kind is None else r
            for r in requests]


def _fits(sharding, shape) -> bool:
    """Whether ``sharding`` can lay out an array of ``shape`` (a one-device
    P("x") given as device= cannot hold a scalar: found by review, its
    leaves of lower rank then failed in jax; they take the device)."""
    spec = getattr(sharding, "spec", None)
    return spec is None or len(spec) <= len(shape)


def in_memory_kind(value, request: LeafRequest, device):
    """``value`` (placed on the request's device or sharding) moved to the
    memory its target asked for (found by review: host memory kinds were
    dropped, or failed deep in jax for JPEG leaves sharded over devices),
    with the one-device sharding it gave (found by review: a NamedSharding
    over a mesh of one came back a SingleDeviceSharding)."""
    if request.as_given is not None and _fits(request.as_given, value.shape):
        return jax.device_put(value, request.as_given)
    if request.memory_kind is None:
        return value
    where = (request.sharding if request.sharding is not None
             else jax.sharding.SingleDeviceSharding(request.device or device or default_device(),
                                                    memory_kind=request.memory_kind))
    return jax.device_put(value, where)


@dataclasses.dataclass(frozen=True)
class _Want:
    """What a target leaf asks for (dtype, sharding: None for the saved ones)."""
    shape: tuple
    dtype: Any
    sharding: Any


def _target_leaf(name: str, want, saved: SavedLeaf) -> _Want:
    """A target leaf as (shape, dtype or None, sharding or None): an array or
    ShapeDtypeStruct gives its own; a Sharding places the saved leaf; a
    Python or numpy number stands for the saved leaf (a step counter in a
    train state). Anything else is refused: it used to restore the saved
    leaf on the default device, silently."""
    if isinstance(want, jax.sharding.Sharding):
        return _Want(tuple(saved.shape), None, want)
    # before the test of shape and dtype, which numpy numbers have too (found
    # by review: np.float32(0) made an int32 step float32, refused a matrix)
    if isinstance(want, (bool, int, float, complex, np.generic)):
        return _Want(tuple(saved.shape), None, None)
    if hasattr(want, "shape") and hasattr(want, "dtype"):
        # An uncommitted array places nothing, as jax would not (found by
        # review: restore(path, target=model.init(...)) came back committed
        # to device 0 and a step over a mesh-sharded batch refused it).
        placed = not (isinstance(want, jax.Array) and not want.committed)
        return _Want(tuple(want.shape), want.dtype,
                     getattr(want, "sharding", None) if placed else None)
    raise TypeError(f"{name}: a target leaf must be an array, a jax.ShapeDtypeStruct or a "
                    f"jax.sharding.Sharding, got {type(want).__name__}")


def _decoded_in(request: LeafRequest):
    """The sharding a sharded leaf's decoded shards make: the target's, in
    device memory (in_memory_kind moves it to the target's after)."""
    if request.memory_kind is None:
        return request.sharding
    default = next(iter(request.sharding.device_set)).default_memory().kind
    return request.sharding.with_memory_kind(default)


def _shard_boxes(leaf: SavedLeaf, sharding) -> dict:
    """device -> the shard's (start, stop, step) per axis."""
    return {device: tuple(_slice_triple(sl, dim) for sl, dim in zip(index, leaf.shape))
            for device, index in sharding.addressable_devices_indices_map(leaf.shape).items()}


def _slice_triple(sl, dim: int) -> tuple[int, int, int]:
    return sl.indices(dim) if isinstance(sl, slice) else (int(sl), int(sl) + 1, 1)


def _view_positions(ranges, shape, axes) -> np.ndarray:
    """Positions, along one side of the view, of a shard's slices of ``axes``
    (C order over those axes, as MatrixView lays them out)."""
    if not axes:
        return np.zeros(1, np.int64)
    grids = np.meshgrid(*[np.arange(*ranges[a]) for a in axes], indexing="ij")
    return np.ravel_multi_index([g.ravel() for g in grids], [shape[a] for a in axes])


@dataclasses.dataclass(frozen=True)
class _LeafMaps:
    """What a leaf's tiles decode through, read once per leaf."""

    scale: np.ndarray
    offset: np.ndarray
    col_scale: np.ndarray | None
    index: list


def read_maps(ckpt: Checkpoint, leaf: SavedLeaf) -> _LeafMaps:
    scale, offset = ckpt.read_affine(leaf)
    col_scale = ckpt.read_col_scale(leaf)
    ckpt.check_maps(leaf, scale, offset, col_scale)
    return _LeafMaps(scale, offset, col_scale, ckpt.read_interval_index(leaf))


def add_leaf_tiles(builder: codec.PlanBuilder, ckpt: Checkpoint, leaf: SavedLeaf,
                   tile_ids: list[int], origin: tuple[int, int], out_shape, dtype,
                   maps: _LeafMaps, placement=None) -> int:
    rows = slice(origin[0], origin[0] + out_shape[0])
    cols = slice(origin[1], origin[1] + out_shape[1])
    out = builder.add_output(out_shape, dtype, maps.scale[rows], maps.offset[rows],
                             None if maps.col_scale is None else maps.col_scale[cols], placement)
    payload = 0
    for k in tile_ids:
        r0, c0, h, w, _ = leaf.tiles[k]
        size = ckpt.tile_size(leaf, k)
        builder.add_tile(out, (r0 - origin[0], c0 - origin[1], h, w), bits=leaf.bits,
                         restart_interval=leaf.restart_interval, interval_starts=maps.index[k],
                         size=size, fill=ckpt.tile_filler(leaf, k, maps.index[k]),
                         label=f"{leaf.path} tile {k} in {ckpt.path}")
        payload += size
    return payload


def add_whole_leaf(builder: codec.PlanBuilder, ckpt: Checkpoint, leaf: SavedLeaf,
                   dtype) -> int:
    """All of a leaf's tiles as one output of the plan, decoded to
    ``codec.written_dtype(dtype)`` in the layout ``views.written_view`` names
    (a view that moves data is placed by the decoder, not transposed after);
    returns the payload bytes added."""
    maps = read_maps(ckpt, leaf)
    check_decoded_range(leaf, maps, dtype)
    return add_leaf_tiles(builder, ckpt, leaf, list(range(len(leaf.tiles))), (0, 0),
                          leaf.matrix_shape, codec.written_dtype(dtype), maps,
                          views.placement(leaf.view, leaf.shape))


def finish_leaf(matrix, shape, view: MatrixView, kept=None):
    """A whole-leaf decode's output (numpy or jax; add_whole_leaf) as the
    tensor of ``shape`` whose coded view is ``view``, with the side list
    ``kept = (flat positions, values)`` written back."""
    out = views.written_view(view, shape).from_matrix(matrix, shape)
    return out if kept is None else _kept_written(out, *kept)


def _kept_written(out, index, values):
    """``out`` (a jax array) with ``values`` at its flat positions
    ``index``; a half-precision one scattered as its bits: XLA's CPU backend
    scatters it as float32 (found by review: a 151 MB bfloat16 leaf with 12
    kept values took 407 MB beyond itself to restore, now 254; float32 97)."""
    values = jnp.asarray(values).astype(out.dtype)
    if out.dtype.itemsize != 2:
        return out.reshape(-1).at[index].set(values).reshape(out.shape)
    flat = jax.lax.bitcast_convert_type(out.reshape(-1), jnp.uint16)
    flat = flat.at[index].set(jax.lax.bitcast_convert_type(values, jnp.uint16))
    return jax.lax.bitcast_convert_type(flat, out.dtype).reshape(out.shape)


def kept_values(ckpt: Checkpoint, leaf: SavedLeaf, dtype=None):
    """(flat positions, values) of the leaf's side list, or None; with the
    ``dtype`` the leaf is decoded to, its values must fit it (found by
    review: a kept 1e5 became inf as float16, silently, where a raw leaf's
    is refused)."""
    outliers = ckpt.read_outliers(leaf)
    if outliers is None:
        return None
    if dtype is not None:
        check_values_fit(np.asarray(outliers.values), dtype, leaf.path)
    index_dtype = np.int32 if math.prod(leaf.shape) < 2**31 else np.int64
    return outliers.index.astype(index_dtype), np.asarray(outliers.values)


def check_decoded_range(leaf: SavedLeaf, maps: "_LeafMaps", dtype) -> None:
    """Refuses a ``dtype`` narrower than float32 (float16, an integer dtype)
    that the leaf's coded values may not fit: its maps bound what the
    samples decode to (found by review: N(0, 1e5) weights read as float16
    came back with 33,500 of 65,536 values inf, and 300.2 as uint8 44,
    silently, where raw leaves' values are refused)."""
    dtype = jax.dtypes.canonicalize_dtype(np.dtype(dtype))
    if _is_float(dtype) and _largest(dtype) >= _largest(np.dtype(np.float32)):
        return
    top = float((1 << leaf.bits) - 1)
    scale, offset = (np.asarray(m, np.float64) for m in (maps.scale, maps.offset))
    ends = [offset.min(initial=0.0), offset.max(initial=0.0),
            (offset + top * scale).min(initial=0.0), (offset + top * scale).max(initial=0.0)]
    cols = ([1.0] if maps.col_scale is None
            else [float(np.min(maps.col_scale, initial=1.0)),
                  float(np.max(maps.col_scale, initial=1.0))])
    lo, hi = min(e * c for e in ends for c in cols), max(e * c for e in ends for c in cols)
    if _is_float(dtype):
        # (a dtype of no zero and no sign, float8_e8m0fnu, holds no value <= 0:
        # found by review, such values came back NaN)
        fits = max(-lo, hi) <= _largest(dtype) and (lo > 0 or ml_dtypes.finfo(dtype).min < 0)
        hint = "restore it as float32 or bfloat16"
    elif _int_limits(dtype) is not None:   # astype truncates towards zero
        limits = _int_limits(dtype)
        fits = limits.min - 1 < lo and hi < limits.max + 1
        hint = "restore it as a float dtype"
    else:
        fits, hint = False, "restore it as a float dtype"
    if not fits:
        raise ValueError(f"leaf {leaf.path!r}: its coded values may span [{lo:.3g}, "
                         f"{hi:.3g}], beyond {dtype.name}: {hint}")


def bucketed_kept(kept):
    """A side list for a jitted decode: padded to codec.bucketed_size by
    repeating its last entry (written twice, the same value), so that the
    next checkpoint of a model, whose side lists differ a little in length,
    runs the same compiled program."""
    if kept is None or kept[0].size == 0:
        return kept
    index, values = kept
    extra = codec.bucketed_size(index.size) - index.size
    return (np.concatenate([index, np.repeat(index[-1:], extra)]),
            np.concatenate([values, np.repeat(values[-1:], extra)]))


def _finishes(requests) -> tuple:
    return tuple((r.leaf.shape, r.leaf.view.perm, r.leaf.view.split, r.leaf.outliers > 0,
                  placed_dtype(r.dtype).name) for r in requests)


def placed_dtype(dtype) -> np.dtype:
    """The dtype jax holds ``dtype`` in (float64 as float32 while
    jax_enable_x64 is off): casting to it does not warn."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(dtype)))


@functools.lru_cache(maxsize=1024)
def _leaves_decoder(output_shapes, output_dtypes, finishes):
    """A jitted decode of whole leaves: views back to tensors, side lists
    written back, cast; cached so restoring the same structure reuses it."""

    def run(operands, kept):
        status, outputs = ops.decode(*operands, output_shapes=output_shapes,
                                     output_dtypes=output_dtypes)
        kept = iter(kept)
        leaves = [finish_leaf(o, shape, MatrixView(perm, split), next(kept) if has_kept else None)
                  .astype(dtype)
                  for o, (shape, perm, split, has_kept, dtype) in zip(outputs, finishes)]
        return status, leaves
    return jax.jit(run)




# Compressed bytes per window of the restore pipeline; memory holds about
# (2 + _IN_FLIGHT) windows (one read ahead, one being placed, the decodes in
# flight) however large the file. Large enough that a window's decode fills
# a GPU; a leaf larger than a window is a window of its own.
WINDOW_BYTES = 32 * 2**20
_IN_FLIGHT = 2


@dataclasses.dataclass
class _Prepared:
    """A window read and ready for the device."""

    indices: list             # request indices, in order
    device: Any               # None: raw leaves or one sharded leaf (placed as requested)
    plan: codec.DecodePlan | None = None
    kept: list | None = None
    payload: int = 0
    arrays: list | None = None    # raw leaves' host arrays
    regions: list | None = None   # sharded leaves' shards: one _DevicePlan per device


def _prepare_jpeg(ckpt, requests, indices, device) -> _Prepared:
    """Reads a window of unsharded JPEG leaves and builds their one decode plan."""
    leaves = [requests[i].leaf for i in indices]
    # Maps and indexes prefetched; from a local file tiles are read straight
    # into the plan's payload (in parallel), not into a buffer first and
    # copied: one copy of the window's compressed bytes in memory, not two.
    # From a remote store the tiles too are read as merged ranges, then
    # copied: a request per tile cost its latency each (found by review: 402
    # requests for 200 leaves, 2.6 s at 20 ms a request).
    with ckpt.prefetch(leaves, with_tiles=ckpt.remote):
        builder = codec.PlanBuilder()
        payload = sum(add_whole_leaf(builder, ckpt, r.leaf, r.dtype)
                      for r in (requests[i] for i in indices))
        kept = [bucketed_kept(kept_values(ckpt, r.leaf, r.dtype))
                for r in (requests[i] for i in indices) if r.leaf.outliers]
        plan = builder.finish(parallel_fills=True, bucketed=True)   # (the tiles' reads)
    return _Prepared(indices, device, plan, kept, payload)


# A window's raw leaves of this many stored bytes or more are decoded at once
# on this pool (Rice codes decode natively, their steps in numpy, both without
# the interpreter): one at a time, a training state's moments took one core.
# Smaller ones are decoded on the reader's thread meanwhile (handed to the
# pool, 20,000 leaves of a few values restored 17% slower).
_RAW_POOL = threads.SharedPool(threads.cores, "jaxjpeg-raw")
_POOLED_BYTES = 1 << 16


def _prepare_raw(ckpt, requests, indices) -> _Prepared:
    leaves = [requests[i].leaf for i in indices]
    with ckpt.prefetch(leaves):
        pooled = {i: _RAW_POOL.get().submit(ckpt.read_raw, leaf) for i, leaf in enumerate(leaves)
                  if len(leaves) > 1 and ckpt.stored_bytes(leaf) >= _POOLED_BYTES}
        arrays = [pooled[i].result() if i in pooled else ckpt.read_raw(leaf)
                  for i, leaf in enumerate(leaves)]
        return _Prepared(indices, None, arrays=arrays)


def _dispatch(prepared: _Prepared, requests, stats):
    """Hands a prepared JPEG window to its device and starts its decode;
    returns (status, outputs) without waiting for them."""
    plan = prepared.plan
    if stats is not None:
        stats.add(prepared.device, prepared.payload)
    decode = _leaves_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                             _finishes([requests[i] for i in prepared.indices]))
    with ops.jpeg_errors(plan.tile_labels), ops.outside_mesh():
        return decode(*jax.device_put((ops.plan_operands(plan), prepared.kept), prepared.device))


def _check(status, labels: codec.TileLabels) -> None:
    with ops.jpeg_errors(labels):
        ops.check_status(status, labels)


def _check_all(checks) -> None:
    """Each (status, its plan's tile labels) of ``checks``."""
    for status, labels in checks:
        _check(status, labels)


def _restore_unsharded(ckpt, requests, device, stats) -> list:
    """Unsharded JPEG leaves in one decode call on one device."""
    prepared = _prepare_jpeg(ckpt, requests, list(range(len(requests))), device)
    status, outputs = _dispatch(prepared, requests, stats)
    _check(status, prepared.plan.tile_labels)
    return outputs


def windows(ckpt, requests, indices, window_bytes, size_of=None) -> list[list[int]]:
    """``indices`` cut, in order, into runs of about ``window_bytes`` stored
    bytes (or of ``size_of(request)``)."""
    runs: list[list[int]] = []
    size = 0
    for i in indices:
        leaf_bytes = (size_of or (lambda r: ckpt.stored_bytes(r.leaf)))(requests[i])
        if not runs or size + leaf_bytes > window_bytes:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += leaf_bytes
    return runs


def _restore_windows(ckpt, requests, values, default_device, stats) -> None:
    """Every requested leaf, window by window: reading the next window
    overlaps placing and decoding this one (module docstring). Windows:
    unsharded JPEG leaves per device, raw leaves, sharded leaves (one decode
    call per device for all of a window's shards)."""
    jobs = [("jpeg", device, window)
            for device, group in _unsharded_groups(requests, default_device).items()
            for window in windows(ckpt, requests, group, WINDOW_BYTES)]
    raw = [i for i, r in enumerate(requests) if r.leaf.kind == "raw"]
    jobs += [("raw", None, window) for window in windows(ckpt, requests, raw, WINDOW_BYTES)]
    sharded = [i for i, r in enumerate(requests)
               if r.leaf.kind == "jpeg" and r.sharding is not None]
    # A tile goes to every device whose shard overlaps it: a window of sharded
    # leaves counts the bytes of all this process's devices' plans.
    jobs += [("sharded", None, window)
             for window in windows(ckpt, requests, sharded, WINDOW_BYTES,
                                    lambda r: _shards_bytes(ckpt, r))]

    def prepare(job):
        kind, device, indices = job
        if kind == "raw":
            return _prepare_raw(ckpt, requests, indices)
        if kind == "sharded":
            return _Prepared(indices, None, regions=_prepare_sharded(ckpt, requests, indices))
        return _prepare_jpeg(ckpt, requests, indices, device)

    if not jobs:
        return
    pending = iter(jobs)
    in_flight: collections.deque = collections.deque()
    with ThreadPoolExecutor(1, thread_name_prefix="jaxjpeg-prepare") as reader:
        ahead = collections.deque([reader.submit(prepare, next(pending))])
        try:
            while ahead:
                prepared = ahead.popleft().result()
                job = next(pending, None)
                if job is not None:  # read the next window while this one decodes
                    ahead.append(reader.submit(prepare, job))
                if prepared.arrays is not None:
                    for i, array in zip(prepared.indices, prepared.arrays):
                        values[i] = place_raw(array, requests[i], default_device)
                    continue
                if prepared.regions is not None:
                    statuses, arrays = _dispatch_sharded(requests, prepared.indices,
                                                         prepared.regions, stats)
                    for i, array in zip(prepared.indices, arrays):
                        values[i] = array
                    checks = list(zip(statuses, (r.plan.tile_labels for r in prepared.regions)))
                else:
                    status, outputs = _dispatch(prepared, requests, stats)
                    for i, array in zip(prepared.indices, outputs):
                        values[i] = array
                    checks = [(status, prepared.plan.tile_labels)]
                in_flight.append(checks)
                del prepared  # its host plan is the device's now
                while len(in_flight) > _IN_FLIGHT:
                    _check_all(in_flight.popleft())
            while in_flight:
                _check_all(in_flight.popleft())
        except BaseException:
            for future in ahead:
                future.cancel()
            raise


def _prepare_sharded(ckpt, requests, indices) -> list["_DevicePlan"]:
    """The shards this process's devices hold of the sharded leaves
    ``indices``, planned on the host: each device decodes only the tiles its
    shards overlap, all of the window's in one call (one program to compile
    per device and window, not per leaf and device)."""
    boxes = {i: _shard_boxes(requests[i].leaf, requests[i].sharding) for i in indices}
    needed = {i: sorted({k for ranges in b.values()
                         for k in region_tiles(requests[i].leaf, ranges)})
              for i, b in boxes.items()}
    names = [n for i in indices for n in ckpt.blob_names(requests[i].leaf, needed[i])]
    plans: dict = {}
    # each tile read once, however many devices use it
    with ckpt.reader.prefetch(names):
        for i in indices:
            if not boxes[i]:   # all of the sharding's devices are other processes'
                continue
            leaf = requests[i].leaf
            maps, kept = read_maps(ckpt, leaf), kept_values(ckpt, leaf, requests[i].dtype)
            for device, ranges in boxes[i].items():
                plan = plans.setdefault(device, _DevicePlan(device))
                cut, region_kept, payload = add_region(plan.builder, ckpt, leaf, ranges,
                                                       requests[i].dtype, maps, kept)
                plan.shards.append((i, cut, np.dtype(requests[i].dtype).name))
                plan.kept.append(bucketed_kept(region_kept))
                plan.payload += payload
        for plan in plans.values():
            plan.plan = plan.builder.finish(bucketed=True)
            plan.builder = None
    return list(plans.values())


def _shards_bytes(ckpt, request) -> int:
    """The tile bytes the decode plans of this process's shards of a sharded
    leaf hold together (a replicated leaf's, once per device)."""
    leaf = request.leaf
    return sum(ckpt.tile_size(leaf, k) for ranges in _shard_boxes(leaf, request.sharding).values()
               for k in region_tiles(leaf, ranges))


@dataclasses.dataclass
class _DevicePlan:
    """One device's decode of its shards of a window's sharded leaves."""

    device: Any
    builder: codec.PlanBuilder | None = dataclasses.field(default_factory=codec.PlanBuilder)
    plan: codec.DecodePlan | None = None
    # Per output of the plan: (request index, cut, dtype name), and the
    # region's side-list entries or None.
    shards: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    payload: int = 0


def _dispatch_sharded(requests, indices, plans: list[_DevicePlan], stats) -> tuple[list, list]:
    """(statuses to check, the global arrays of ``indices``) of planned shards."""
    shards: dict = {i: [] for i in indices}
    statuses = []
    for device_plan in plans:
        if stats is not None:
            stats.add(device_plan.device, device_plan.payload)
        plan = device_plan.plan
        decode = _shards_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                                 tuple(cut for _, cut, _ in device_plan.shards),
                                 tuple(dtype for _, _, dtype in device_plan.shards))
        with ops.jpeg_errors(plan.tile_labels), ops.outside_mesh():
            status, outputs = decode(*jax.device_put((ops.plan_operands(plan), device_plan.kept),
                                                     device_plan.device))
        ops.refuse_traced(status)
        statuses.append(status)
        for (i, _, _), shard in zip(device_plan.shards, outputs):
            shards[i].append(shard)
    # Under jax.distributed a sharding may hold nothing here (all its devices
    # are other processes'): no shards, and the dtype given, which jax cannot
    # take from an empty list.
    arrays = [jax.make_array_from_single_device_arrays(requests[i].leaf.shape,
                                                       _decoded_in(requests[i]), shards[i],
                                                       dtype=placed_dtype(requests[i].dtype))
              for i in indices]
    return statuses, arrays


def _restore_sharded(ckpt, request, stats) -> jax.Array:
    plans = _prepare_sharded(ckpt, [request], [0])
    statuses, (array,) = _dispatch_sharded([request], [0], plans, stats)
    _check_all(zip(statuses, (p.plan.tile_labels for p in plans)))
    return array


@dataclasses.dataclass
class _Region:
    """One region's decode, planned on the host (see plan_region)."""

    device: Any
    plan: codec.DecodePlan
    cut: tuple
    dtype: np.dtype
    kept: Any
    payload: int


def add_region(builder: codec.PlanBuilder, ckpt: Checkpoint, leaf: SavedLeaf, ranges, dtype,
               maps: _LeafMaps, kept) -> tuple[tuple, Any, int]:
    """The tiles of the region ``ranges`` as one output of ``builder``:
    (its cut, see _finish_shard; its side-list entries or None; payload bytes)."""
    check_decoded_range(leaf, maps, dtype)
    tile_ids = region_tiles(leaf, ranges)
    tr0 = min(leaf.tiles[k][0] for k in tile_ids)
    tc0 = min(leaf.tiles[k][1] for k in tile_ids)
    tr1 = max(leaf.tiles[k][0] + leaf.tiles[k][2] for k in tile_ids)
    tc1 = max(leaf.tiles[k][1] + leaf.tiles[k][3] for k in tile_ids)
    placement = _region_placement(leaf, ranges, (tr0, tr1), (tc0, tc1))
    payload = add_leaf_tiles(builder, ckpt, leaf, tile_ids, (tr0, tc0),
                             (tr1 - tr0, tc1 - tc0), codec.written_dtype(dtype), maps,
                             placement)
    region_kept = None if kept is None else _kept_in_shard(kept, leaf.shape, ranges)
    if region_kept is not None:   # the region's own (found by review: a get_slice was
        check_values_fit(region_kept[1], dtype, leaf.path)   # refused for another's)
    if placement is None:
        cut = ((tr1 - tr0, tc1 - tc0), tuple(leaf.shape), tuple(ranges), (tr0, tc0),
               leaf.view.perm, leaf.view.split, region_kept is not None, False)
    else:  # one program for every shard of this shape, wherever it lies
        shard_shape = tuple(len(range(*r)) for r in ranges)
        cut = ((tr1 - tr0, tc1 - tc0), shard_shape, tuple((0, n, 1) for n in shard_shape),
               (0, 0), leaf.view.perm, leaf.view.split, region_kept is not None, True)
    return cut, region_kept, payload


def plan_region(ckpt: Checkpoint, leaf: SavedLeaf, ranges, dtype, device, maps: _LeafMaps,
                kept) -> _Region:
    """The host half of decode_region: the region's tiles read into a plan."""
    builder = codec.PlanBuilder()
    cut, region_kept, payload = add_region(builder, ckpt, leaf, ranges, dtype, maps, kept)
    return _Region(device, builder.finish(bucketed=True), cut, np.dtype(dtype),
                   bucketed_kept(region_kept), payload)


def _region_placement(leaf: SavedLeaf, ranges, rows: tuple[int, int], cols: tuple[int, int]):
    """The decoder's placement of a region whose view moves data, when its
    tiles cover exactly the region (tile edges on its bounds, as a save from
    an array with the same sharding cuts them; its positions contiguous on
    both sides): the tiles then decode straight into the shard's own layout,
    with no cut or transpose after. Else None."""
    view = leaf.view
    if view is None or not view.moves_data(leaf.shape):
        return None
    for side, (start, stop) in zip((view.row_axes(), view.col_axes()), (rows, cols)):
        positions = _view_positions(ranges, leaf.shape, side)
        if len(positions) != stop - start or positions[0] != start or not _contiguous(positions):
            return None
    return view.positions([len(range(*r)) for r in ranges])


def _dispatch_region(region: _Region, stats):
    """Starts a planned region's decode on its device: (status, shard), not waited for."""
    if stats is not None:
        stats.add(region.device, region.payload)
    plan = region.plan
    # Decode, cut and cast in one compiled program. (Cutting eagerly with jnp
    # indexing compiled several small programs per device and leaf, which was
    # most of a sharded restore's time.)
    decode = _shards_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                             (region.cut,), (region.dtype.name,))
    with ops.jpeg_errors(plan.tile_labels), ops.outside_mesh():
        status, (shard,) = decode(*jax.device_put((ops.plan_operands(plan), [region.kept]),
                                                  region.device))
    ops.refuse_traced(status)
    return status, shard


def decode_region(ckpt: Checkpoint, leaf: SavedLeaf, ranges, dtype, device, maps: _LeafMaps,
                  kept, stats: RestoreStats | None = None) -> jax.Array:
    """The region ``ranges`` ((start, stop, step) per axis, steps positive,
    none empty) of a JPEG leaf, decoded on ``device`` from only the tiles its
    2-D box overlaps; ``maps`` from :func:`read_maps`, ``kept`` from
    :func:`kept_values` (the leaf's whole side list, or None)."""
    region = plan_region(ckpt, leaf, ranges, dtype, device, maps, kept)
    status, shard = _dispatch_region(region, stats)
    _check(status, region.plan.tile_labels)
    return shard


def region_tiles(leaf: SavedLeaf, ranges) -> list[int]:
    """Ids of the tiles holding an element of the region ``ranges`` (as for
    decode_region): not every tile of its box (found by review: a shard of
    an inner axis, strided along the view's rows, decoded 15 tiles of a
    scanned leaf where 8 hold its elements, 1.87x its bytes). The box the
    tiles decode into keeps the rest undecoded: nothing is read from it."""
    view = leaf.view or MatrixView.default(len(leaf.shape))
    rows = _view_positions(ranges, leaf.shape, view.row_axes())   # sorted: steps positive
    cols = _view_positions(ranges, leaf.shape, view.col_axes())

    def holds(positions, start: int, length: int) -> bool:
        return bool(np.searchsorted(positions, start) < np.searchsorted(positions, start + length))

    return [k for k, (r0, c0, h, w, _) in enumerate(leaf.tiles)
            if holds(rows, r0, h) and holds(cols, c0, w)]


def _kept_in_shard(kept, shape, ranges):
    """The side-list entries inside a shard as (flat positions in the shard,
    values), or None if it holds none."""
    index, values = kept
    coords = np.unravel_index(index.astype(np.int64), shape)
    inside = np.ones(index.size, bool)
    local = []
    for c, (start, stop, step) in zip(coords, ranges):
        inside &= (c >= start) & (c < stop) & ((c - start) % step == 0)
        local.append((c - start) // step)
    if not inside.any():
        return None
    shard_shape = [len(range(*r)) for r in ranges]
    positions = np.ravel_multi_index([axis[inside] for axis in local], shard_shape)
    return positions.astype(index.dtype), values[inside]


@functools.lru_cache(maxsize=1024)
def _shards_decoder(output_shapes, output_dtypes, cuts, dtypes):
    """A jitted decode of regions' boxes (one output each), every shard
    finished from its box (_finish_shard) and cast, in one program."""
    # a box's tiles may leave parts of it unwritten (region_tiles)
    decode = ops.plan_decoder(output_shapes, output_dtypes, output_shapes, whole_outputs=False)

    def run(operands, kept):
        status, boxes = decode(*operands)
        return status, [_finish_shard(box, cut, k).astype(placed_dtype(dtype))
                        for box, cut, k, dtype in zip(boxes, cuts, kept, dtypes)]
    return jax.jit(run)


def _finish_shard(box, cut, kept):
    """A region's shard from its decoded box: the box itself where the tiles
    were placed in the shard's layout (_region_placement), else cut from the
    2-D box; the side-list entries ``kept`` written back."""
    box_shape, shape, ranges, origin, perm, split, has_kept, placed = cut
    shard_shape = tuple(len(range(*r)) for r in ranges)
    shard = (box.reshape(shard_shape) if placed
             else _cut_shard(box, shape, ranges, origin, MatrixView(perm, split)))
    if has_kept:
        shard = _kept_written(shard, *kept)
    return shard


def _cut_shard(box, shape, ranges, origin, view: MatrixView):
    """The N-D shard ``ranges`` ((start, stop, step) per axis) of a tensor, from
    the decoded 2-D box whose top-left is at ``origin`` of the tensor's view."""
    rows = _view_positions(ranges, shape, view.row_axes()) - origin[0]
    cols = _view_positions(ranges, shape, view.col_axes()) - origin[1]
    if _contiguous(rows) and _contiguous(cols):  # a plain slice
        picked = box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    else:
        picked = box[rows[:, None], cols[None, :]]
    permuted = tuple(len(range(*ranges[a])) for a in view.perm)
    return picked.reshape(permuted).transpose(view.inverse())


def _contiguous(positions) -> bool:
    return len(positions) == 1 or bool(np.all(np.diff(positions) == 1))


def _unsharded_groups(requests, default_device) -> dict:
    """device -> indices of the unsharded JPEG requests it decodes (one call each)."""
    groups: dict = {}
    for i, r in enumerate(requests):
        if r.leaf.kind == "jpeg" and r.sharding is None:
            groups.setdefault(r.device or default_device, []).append(i)
    return groups


_X64_HINT = ("; jax makes 64-bit arrays 32-bit while jax_enable_x64 is off: "
             "jax.config.update('jax_enable_x64', True) keeps them")


def check_values_fit(array: np.ndarray, dtype, name: str) -> None:
    """A raw leaf restores its values or raises: integers outside the
    integer dtype they become (a narrower one asked for, or the 32-bit one
    jax gives 64-bit arrays while jax_enable_x64 is off) would wrap without
    a word (a step counter of 2**40 came back 0), and finite values beyond
    a narrower float dtype (asked for, or float32 where jax narrows float64
    or complex128) would become inf: 1e5 as float16."""
    wanted = np.dtype(dtype)
    placed = jax.dtypes.canonicalize_dtype(wanted)
    hint = "" if placed == wanted else _X64_HINT
    if array.size == 0:
        return
    placed_limits = _int_limits(placed)
    if placed.kind == "b" and array.dtype.kind != "b":
        # found by review: int labels 0, 1, 2, 255 came back False, True, True, True
        outside = (array != 0) & (array != 1)
        if outside.any():
            raise ValueError(f"leaf {name!r}: {int(outside.sum())} of its {array.dtype} values "
                             f"are neither 0 nor 1, which bool cannot hold (cast after "
                             f"restoring if that is meant)")
        return
    if array.dtype.kind == "f" or (array.dtype.kind == "V" and _is_float(array.dtype)):
        if placed_limits is not None:   # found by review: 300.2 came back 44 as uint8, silently
            _check_floats_fit_integers(array, placed, name, hint)
            return
    if _int_limits(array.dtype) is not None and placed_limits is not None:
        # int4 and uint4 too (ml_dtypes' kind 'V': found by review, 12 came back -4)
        lo, hi, limits = array.min(), array.max(), placed_limits
        if lo < limits.min or hi > limits.max:
            raise ValueError(f"leaf {name!r}: its {array.dtype} values span [{lo}, {hi}], beyond "
                             f"{placed.name} [{limits.min}, {limits.max}]{hint}")
    elif _is_float(placed) and _largest(placed) < _largest(array.dtype):
        # Beyond the top value by half a step: inf, or, in the formats without
        # inf (float4_e2m1fn, float8_e4m3fn: found by review), the largest
        # value or NaN without a word (1e30 came back 6.0).
        with np.errstate(over="ignore", invalid="ignore"):
            size, top, cast = np.abs(array), _overflow(placed), array.astype(placed)
            beyond = (size >= top) if _ties_round_up(placed) else (size > top)
            finite = np.isfinite(array)
            lost = finite & (~np.isfinite(cast) | beyond)
            # found by review: float4_e2m1fn (no NaN, no inf) gave NaN back
            # as -0.0 and inf as 6.0; float8_e4m3fn gave inf back as NaN
            changed = ~finite & ((np.isnan(array) != np.isnan(cast))
                                 | (np.isinf(array) & ~np.isinf(cast)))
        if lost.any():
            raise ValueError(f"leaf {name!r}: {int(lost.sum())} finite {array.dtype} value(s), "
                             f"largest magnitude {np.abs(array[lost]).max():.3g}, would become "
                             f"{'inf' if _has_inf(placed) else 'its largest value or NaN'} as "
                             f"{placed.name}{hint}")
        if changed.any():
            raise ValueError(f"leaf {name!r}: {int(changed.sum())} NaN or infinite value(s) "
                             f"would not stay so as {placed.name}, which holds "
                             f"{'NaN but no inf' if _has_nan(placed) else 'neither'}{hint}")
    if _int_limits(array.dtype) is not None and _is_float(placed):
        _check_integers_stay_whole(array, placed, name, hint)
    if _is_float(placed) and placed != array.dtype:
        _check_no_new_nan(array, placed, name, hint)


def _check_no_new_nan(array: np.ndarray, placed: np.dtype, name: str, hint: str):
    """Values a float dtype holds nothing near become NaN: refused (found by
    review: zeros and negatives as float8_e8m0fnu, which holds neither, and
    float8_e4m3's inf as float8_e4m3fn, which holds none, came back NaN
    without a word, whatever the dtypes' ranges)."""
    with np.errstate(invalid="ignore", over="ignore"):
        cast = np.isnan(array.astype(placed))
        if _is_float(array.dtype):
            cast &= ~np.isnan(array.astype(np.float32))
    if cast.any():
        example = array[cast].flat[0]
        raise ValueError(f"leaf {name!r}: {int(cast.sum())} of its {array.dtype} values, e.g. "
                         f"{example}, would become NaN as {placed.name}, which holds no value "
                         f"near them{hint}")


def _check_integers_stay_whole(array: np.ndarray, placed: np.dtype, name: str, hint: str):
    """Integers cast to a float dtype must come back as themselves (found by
    review: int32 16777217 restored as float32 16777216, ids and PRNG key
    data asked for as float32 rounded without a word): a float of p
    significand bits holds an integer exactly where its odd part (the
    integer over its largest power of 2) is below 2^p. Counted in integers
    (review: compared as float64, int64 above 2^53 rounded on both sides)."""
    bits = ml_dtypes.finfo(placed).nmant + 1
    if array.dtype.itemsize * 8 - (array.dtype.kind == "i") <= bits:
        return   # every value of the dtype is held
    signed = array.astype(np.int64) if array.dtype.kind == "i" else None
    magnitude = (array.astype(np.uint64) if signed is None
                 else np.where(signed < 0, (-(signed + 1)).astype(np.uint64) + np.uint64(1),
                               signed.astype(np.uint64)))
    wide = magnitude >= np.uint64(1 << bits)
    if not wide.any():
        return
    large = magnitude[wide]
    odd = large // (large & (~large + np.uint64(1)))   # over the lowest set bit
    moved = odd >= np.uint64(1 << bits)
    if moved.any():
        raise ValueError(f"leaf {name!r}: {int(moved.sum())} of its {array.dtype} values, e.g. "
                         f"{array[wide][moved].flat[0]}, would round as {placed.name} (integers "
                         f"above {1 << bits} are not all held); restore it as an integer "
                         f"dtype{hint}")


def _check_floats_fit_integers(array: np.ndarray, placed: np.dtype, name: str, hint: str):
    """Float values cast to integers (towards zero) must be finite and in range."""
    values = array.astype(np.float64)
    limits = _int_limits(placed)
    bad = ~np.isfinite(values) | (values <= limits.min - 1) | (values >= limits.max + 1)
    if bad.any():
        raise ValueError(f"leaf {name!r}: {int(bad.sum())} {array.dtype} value(s), e.g. "
                         f"{values[bad].flat[0]:.6g}, do not fit {placed.name} "
                         f"[{limits.min}, {limits.max}]{hint}")


def _is_float(dtype: np.dtype) -> bool:
    """Floating or complex, ml_dtypes' too (numpy calls bfloat16 kind 'V',
    and int4 too: found by review, uint4 passed a float's range check)."""
    return dtype.kind == "c" or dtypes.is_float(dtype)


def _int_limits(dtype: np.dtype):
    """iinfo of an integer dtype, ml_dtypes' int2/int4/uint4 too; else None."""
    if dtype.kind in "iu":
        return np.iinfo(dtype)
    if dtype.kind != "V":
        return None
    try:
        return ml_dtypes.iinfo(dtype)
    except (TypeError, ValueError):
        return None


def _largest(dtype: np.dtype) -> float:
    """The largest magnitude ``dtype`` holds (0 for bool and non-numbers)."""
    limits = _int_limits(dtype)
    if limits is not None:
        return float(max(-int(limits.min), int(limits.max)))
    try:
        return float(ml_dtypes.finfo(dtype).max)
    except (TypeError, ValueError):
        return 0.0


def _has_inf(dtype: np.dtype) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isinf(np.array(np.inf).astype(dtype)))


def _overflow(dtype: np.dtype) -> float:
    """The magnitude from which values round beyond a float dtype's largest:
    half its top step above it (float16: 65520)."""
    info = ml_dtypes.finfo(dtype)
    top = float(info.max)
    return top + 2.0 ** math.floor(math.log2(top)) * float(info.eps) / 2


def _has_nan(dtype: np.dtype) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(np.isnan(np.array(np.nan, np.float32).astype(dtype)))


def _ties_round_up(dtype: np.dtype) -> bool:
    """Whether a value half a step above ``dtype``'s largest rounds beyond
    it: round-half-to-even leaves it at the largest where that one's last
    significand bit is 0 (float8_e4m3fn's 448: 464 becomes 448, found by
    review refused), and takes it up where it is 1 (float16, float4_e2m1fn)."""
    largest = np.array(ml_dtypes.finfo(dtype).max, dtype)
    return bool(largest.view(f"u{largest.itemsize}") & 1)


def place_raw(array: np.ndarray, request: LeafRequest, device):
    check_values_fit(array, request.dtype, request.leaf.path)
    # in the dtype jax holds it in (float64 as float32 without x64: found by
    # review, a sharded placement warned where an unsharded one did not)
    array = array.astype(placed_dtype(request.dtype), copy=False)
    if request.sharding is not None:
        # Not jax.device_put(array, sharding): with a sharding spanning several
        # processes it checks the value is the same in every process with a
        # cross-process collective (fails where CPU collectives are off, and
        # needs every process in lockstep). Each process has read the whole
        # leaf anyway, so it places just the slices its own devices hold, each
        # by an explicit device_put (jax.make_array_from_callback's transfers
        # are implicit ones, which jax.transfer_guard("disallow") refuses).
        # (dtype given: jax needs it where no device of the sharding is ours.)
        sharding = request.sharding
        slices = sharding.addressable_devices_indices_map(array.shape)
        memory_kind = sharding.memory_kind
        shards = [jax.device_put(array[index],
                                 jax.sharding.SingleDeviceSharding(d, memory_kind=memory_kind))
                  for d, index in slices.items()]
        for shard in shards[:1]:   # traced by jit: said as a decode says it (found by review)
            ops.refuse_traced(shard)
        return jax.make_array_from_single_device_arrays(array.shape, sharding, shards,
                                                        dtype=array.dtype)
    return jax.device_put(array, request.device or device)


def default_device() -> jax.Device:
    """The device jax places uncommitted arrays on: jax.default_device's, else
    this process's first."""
    chosen = jax.config.jax_default_device
    if isinstance(chosen, jax.Device):
        return chosen
    return jax.local_devices(backend=chosen)[0] if chosen else jax.local_devices()[0]


def placement(device) -> jax.Device | None:
    """Where restore, load and get place leaves given ``device=``:
    :func:`one_device`, or, none given in a one-process run, None: uncommitted
    on jax's default device, as ``jax.device_put(x)`` leaves an array (found
    by review: committed to device 0, a jitted step over a batch sharded on
    a mesh refused them, and ``jax.default_device`` was not followed)."""
    if device is None and jax.process_count() == 1:
        return None
    return one_device(device)


def one_device(device) -> jax.Device:
    """The one device a restore places leaves on: ``device`` (a jax.Device, or
    a sharding of one device), or this process's first (jax.devices()[0]
    belongs to process 0 under jax.distributed, and other processes cannot
    place data on it). A sharding over several devices is refused: it was
    taken for a device, and ignored or failed on an internal buffer."""
    if device is None:
        return jax.local_devices()[0]
    if isinstance(device, jax.sharding.Sharding):
        if len(device.device_set) == 1:
            return next(iter(device.device_set))
        raise ValueError(f"device must be one device, got a sharding over "
                         f"{len(device.device_set)}; to restore sharded arrays give a target "
                         "whose leaves carry shardings (jax.ShapeDtypeStruct(shape, dtype, "
                         "sharding=...))")
    if not isinstance(device, jax.Device):
        raise TypeError(f"device must be a jax.Device, got {type(device).__name__}")
    return device


def _restore_once(ckpt, requests, default_device, stats) -> list:
    """Every request's value; tied leaves asked for alike (dtype, placement)
    are read and decoded once and copied on the device (a copy, not the same
    array: donating one leaf to a jitted step must not delete another)."""
    firsts: dict = {}
    first_of = [firsts.setdefault((r.leaf.blob_index, dataclasses.replace(r, leaf=None)), i)
                for i, r in enumerate(requests)]
    unique = sorted(firsts.values())
    decoded: list = [None] * len(unique)
    _restore_windows(ckpt, [requests[i] for i in unique], decoded, default_device, stats)
    values = dict(zip(unique, decoded))
    return [values[i] if first == i else _copied(values[first])
            for i, first in enumerate(first_of)]


def _copied(value: jax.Array) -> jax.Array:
    """A copy of ``value`` placed as it is: an array spanning other
    processes' devices is copied shard by shard (found by review:
    device_put(value) refuses one not fully addressable here, and a copy
    onto its sharding is a multi-process computation, which XLA's CPU
    backend has not); others stay uncommitted where they were."""
    if value.is_fully_addressable:
        return jax.device_put(value, may_alias=False)
    shards = [jax.device_put(s.data, s.device, may_alias=False) for s in value.addressable_shards]
    return jax.make_array_from_single_device_arrays(value.shape, value.sharding, shards)


def select_leaves(ckpt: Checkpoint, paths) -> list[SavedLeaf]:
    """The leaves any of ``paths`` selects (None: all): a leaf's exact name,
    or a glob (:func:`treepaths.matching`); every pattern must select at
    least one leaf (a typo is an error, not ``{}``)."""
    if paths is None:
        return list(ckpt.leaves)
    names = [leaf.path for leaf in ckpt.leaves]
    chosen = set()
    for pattern in patterns(paths, "paths"):
        selected = matching(pattern, names)
        if not selected:
            raise KeyError(f"{ckpt.path}: no leaf matches {pattern!r}")
        chosen.update(selected)
    return [leaf for leaf in ckpt.leaves if leaf.path in chosen]


def restore(path, target=None, *, paths: Sequence[str] | None = None, dtype=None,
            device=None, verify: bool = True, stats: RestoreStats | None = None):
    """Restores a checkpoint as a pytree of arrays decoded on the device.

    ``path`` is a local path, ``os.PathLike`` or URL (``https://``, ``gs://``,
    ``memory://`` ...; :mod:`jaxjpeg.storage`); only the byte ranges of the
    leaves restored are read, in windows pipelined with the decode.

    ``target`` (optional) is a pytree of arrays or ``jax.ShapeDtypeStruct``
    (possibly with shardings) whose structure, dtypes and placement the result
    takes, or of ``jax.sharding.Sharding`` (each leaf placed so, in its saved
    dtype); it may cover a subset of the saved leaves (partial restore).
    ``device`` (a jax.Device or a one-device sharding) places the leaves no
    target places (an uncommitted array places none); without it they come
    back uncommitted on jax's default device, as ``jax.device_put(x)``
    leaves an array (under jax.distributed: committed to this process's
    first device). Without a target, the saved structure comes back as
    nested dicts/lists of the saved leaves (a None or an empty container
    holds no leaf: only a target brings it back); ``paths`` (glob patterns
    over slash-separated leaf paths) then selects a
    subset (each pattern must match a leaf; one that spells a leaf's path,
    as ``"layers[0]/kernel"`` or ``"w*"`` may, takes that leaf alone; give
    ``target`` or ``paths``, not both). ``dtype`` changes the dtype of every
    floating-point leaf; integer and bool leaves keep theirs.
    """
    if target is not None and paths is not None:
        raise ValueError("give target or paths, not both: a target already names the leaves")
    if stats is not None and not isinstance(stats, RestoreStats):   # (review: an AttributeError)
        raise TypeError(f"stats must be a jaxjpeg.RestoreStats, got {type(stats).__name__}")
    given, device = device, placement(device)
    with Checkpoint(path, verify=verify) as ckpt:
        if target is not None:
            requests, treedef = target_requests(ckpt, target, dtype)
        else:
            requests = [saved_request(leaf, dtype) for leaf in select_leaves(ckpt, paths)]
            treedef = None
        requests = with_device_memory(requests, given)
        values = _restore_once(ckpt, requests, device, stats)
    values = [r.finish(in_memory_kind(v, r, device)) for v, r in zip(values, requests)]
    if treedef is not None:
        return jax.tree_util.tree_unflatten(treedef, values)
    return nest([(r.leaf.records, v) for r, v in zip(requests, values)])
