"""Reading checkpoints in other formats (for ``jaxjpeg compress`` and
``jaxjpeg inspect --source``): Orbax directories, Flax msgpack files,
safetensors files and sharded safetensors checkpoints (an index json, or a
folder of shards).

:func:`open_source` describes every tensor up front and reads each when
asked (safetensors: straight from its file, so a converter holds about one
tensor at a time); :func:`load_source` reads everything as a pytree.

Sources are not trusted either: every problem is a :class:`SourceError` (one
line, naming the file), every leaf must be a numeric array, and shapes out of
proportion to the bytes on disk are refused before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
import threading

import ml_dtypes
import numpy as np

__all__ = ["Source", "SourceError", "load_source", "open_source"]

# A source may declare at most this many bytes of arrays per byte on disk (plus
# a floor): compressed Orbax chunks of real weights stay far below; a shape
# declaring terabytes over a few hundred bytes is refused before allocation.
MAX_EXPANSION = 1024
EXPANSION_FLOOR = 64 * 2**20
_JAXJPEG_MAGIC = b"\x89JAXJPG\n"
_ML_DTYPE_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


class SourceError(ValueError):
    """A source checkpoint that cannot be read (message: one line, with the path)."""


class SourceChoiceError(SourceError):
    """An ``--item`` choice that does not fit the source: the user's choice to
    change (a usage error, not damage)."""


@dataclasses.dataclass
class Source:
    """A checkpoint in another format: its tensors described (shape, dtype,
    path) and read on demand, and its metadata (safetensors ``__metadata__``,
    merged over shards; None for formats without)."""

    path: str
    leaves: list            # jaxjpeg.checkpoint.SourceLeaf, in save order
    metadata: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    @classmethod
    def of_tree(cls, path: str, tree) -> "Source":
        from jaxjpeg.checkpoint import SourceLeaf
        from jaxjpeg.treepaths import leaves_with_paths

        tree = _check_leaves(path, tree)
        return cls(path, [SourceLeaf.of(records, leaf)
                          for records, leaf in leaves_with_paths(tree)])


def open_source(path: str, items=None) -> Source:
    """A checkpoint in another format, told apart by its layout and first
    bytes, not by its names alone.

    ``items``: names of the Orbax items to take (a step of a
    ``CheckpointManager`` may hold several); None takes every Orbax item.
    """
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or directory")
    shards = _safetensors_shards(path)
    if items is not None and (shards is not None or not os.path.isdir(path)):
        raise SourceChoiceError(f"{path}: items can be chosen in Orbax directories only")
    if shards is not None:
        return _safetensors_source(path, shards)
    if os.path.isdir(path):
        return _orbax_source(path, items)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_JAXJPEG_MAGIC):
        raise SourceError(f"{path}: is already a jaxjpeg checkpoint")
    if _looks_like_safetensors(path, head):
        return _safetensors_source(path, {path: None})
    return Source.of_tree(path, _load_msgpack(path))


def load_source(path: str, items=None):
    """A checkpoint in another format as a pytree of numpy arrays (safetensors:
    a flat dict by tensor name)."""
    from jaxjpeg.treepaths import nest

    source = open_source(path, items)
    return nest([(leaf.records, leaf.array()) for leaf in source.leaves])


def _check_leaves(path: str, tree):
    """Every leaf a numeric (or bool, bfloat16, float8) array; returns the tree
    with leaves as numpy arrays."""
    import jax
    from jaxjpeg.treepaths import leaves_with_paths, path_string

    try:
        leaves = leaves_with_paths(tree)
    except (RecursionError, SystemError):
        raise SourceError(f"{path}: the tree is nested too deeply") from None
    for records, leaf in leaves:
        if not isinstance(leaf, (np.ndarray, np.generic, int, float, bool, complex)):
            raise SourceError(f"{path}: leaf {path_string(records)[:200]!r} is a "
                              f"{type(leaf).__name__}, not an array")
        dtype = np.asarray(leaf).dtype
        if dtype.kind not in "biufc" and dtype.name not in _ML_DTYPE_NAMES:
            raise SourceError(f"{path}: leaf {path_string(records)[:200]!r} has dtype "
                              f"{dtype}, not a numeric one")
    return jax.tree_util.tree_map(np.asarray, tree)


# ---------------------------------------------------------------- safetensors


def _looks_like_safetensors(path: str, head: bytes) -> bool:
    if path.endswith(".safetensors"):
        return True
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= 100 * 2**20 and head[8:9] == b"{"


# safetensors dtype -> numpy dtype name (jaxjpeg.export writes the reverse).
SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Dtypes safetensors' numpy reader cannot build (numpy has no name for them).
_ML_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
INDEX_SUFFIX = ".safetensors.index.json"


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name) if name in _ML_DTYPE_NAMES else name)


def _safetensors_shards(path: str) -> dict[str, set | None] | None:
    """The safetensors files of a sharded checkpoint ``path`` (an index json,
    or a folder), each with the tensor names its index puts there (None: no
    index), or None when ``path`` is none. A folder with an index takes the
    shards it names; without, every ``*.safetensors`` file in it."""
    if os.path.isfile(path):
        return _index_shards(path) if path.endswith(".index.json") else None
    indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*" + INDEX_SUFFIX)))
    if len(indexes) > 1:
        raise SourceError(f"{path}: holds {len(indexes)} safetensors indexes "
                          f"({', '.join(os.path.basename(i) for i in indexes[:3])}); "
                          "give the one to read")
    if indexes:
        return _index_shards(indexes[0])
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    return {file: None for file in files} or None


def _index_shards(index_path: str) -> dict[str, set]:
    """The shard files an index json names (checked: plain file names inside
    the index's folder, every one present), with the tensors each must hold."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"{index_path}: not a readable safetensors index "
                          f"({_first_line(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SourceError(f"{index_path}: a safetensors index needs a 'weight_map' of "
                          "tensor names to shard file names")
    folder = os.path.dirname(index_path)
    shards = {}
    for name, shard in weight_map.items():
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise SourceError(f"{index_path}: shard {shard!r:.200} of {name!r:.200} is not a "
                              "file name in the index's folder")
        shards.setdefault(os.path.join(folder, shard), set()).add(name)
    for shard in shards:
        if not os.path.isfile(shard):
            raise SourceError(f"{index_path}: shard {os.path.basename(shard)!r} is missing")
    return dict(sorted(shards.items()))


def _safetensors_source(path: str, shards: dict[str, set | None]) -> Source:
    """Every tensor of the ``shards`` (described from their headers, read one
    at a time when the save reaches it), named as the files name them, sorted."""
    from jaxjpeg.checkpoint import SourceLeaf

    leaves, metadata, owner = {}, {}, {}
    for file, expected in shards.items():
        handle, names, shard_meta = _open_safetensors(file)
        if expected is not None and names != expected:
            odd = sorted(names ^ expected)[0]
            where = "missing from the shard" if odd in expected else "not in the index"
            raise SourceError(f"{file}: tensor {odd!r:.200} is {where}")
        for name in names:
            if name in owner:
                raise SourceError(f"{file}: tensor {name!r:.200} is in {owner[name]} too")
            owner[name] = os.path.basename(file)
            leaves[name] = _safetensors_leaf(SourceLeaf, file, handle, name)
        for key, value in (shard_meta or {}).items():
            metadata.setdefault(key, value)   # shards disagreeing: the first one's
    if not leaves:
        raise SourceError(f"{path}: holds no tensors")
    return Source(path, [leaves[name] for name in sorted(leaves)], metadata or None)


def _open_safetensors(file: str):
    """(open safe_open handle, tensor names, __metadata__) of one file."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise SourceError("reading safetensors files needs safetensors "
                          "(pip install safetensors)") from None
    try:
        handle = safe_open(file, framework="numpy")
        return handle, set(handle.keys()), handle.metadata()
    except SafetensorError as e:
        raise SourceError(f"{file}: not a valid safetensors file ({_first_line(e)})") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise SourceError(f"{file}: unsupported safetensors content ({_first_line(e)})") from None


def _safetensors_leaf(SourceLeaf, file: str, handle, name: str):
    """One tensor of an open file, described now, read by ``load()``."""
    try:
        info = handle.get_slice(name)
        kind, shape = info.get_dtype(), tuple(info.get_shape())
    except Exception as e:  # the binding raises its own types
        raise SourceError(f"{file}: tensor {name!r:.200}: {_first_line(e)}") from None
    if kind not in SAFETENSORS_DTYPES:
        raise SourceError(f"{file}: tensor {name!r:.200} has dtype {kind}, which jaxjpeg "
                          "does not store")

    def load():
        try:
            if kind in _ML_DTYPES:
                return _read_ml_dtype(file, name, _ML_DTYPES[kind])
            return handle.get_tensor(name)
        except Exception as e:
            raise SourceError(f"{file}: tensor {name!r:.200}: {_first_line(e)}") from None

    return SourceLeaf([["key", name]], shape, _numpy_dtype(SAFETENSORS_DTYPES[kind]), load)


def _read_ml_dtype(path: str, name: str, dtype) -> np.ndarray:
    """One float8 tensor's bytes, at the offsets safe_open has already
    validated (in range, size = shape x dtype)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        begin, end = info["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, dtype).reshape(info["shape"])


# ---------------------------------------------------------------- msgpack


def _load_msgpack(path: str):
    try:
        from flax import serialization
    except ImportError:
        raise SourceError("reading Flax msgpack files needs flax (pip install flax)") from None
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises its own types on garbage, RecursionError on depth
        raise SourceError(f"{path}: not a Flax msgpack, safetensors or jaxjpeg file, nor an "
                          f"Orbax directory ({type(e).__name__})") from None
    if not isinstance(tree, (dict, list)):
        raise SourceError(f"{path}: msgpack holds a {type(tree).__name__}, "
                          "not a pytree of arrays")
    return tree


# ---------------------------------------------------------------- Orbax


def _is_orbax_item(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_METADATA"))


# What jaxjpeg's Orbax handler (jaxjpeg.orbax.FILENAME) writes in its item directory.
_JAXJPEG_ITEM_FILE = "checkpoint.jjpg"


def _is_jaxjpeg_item(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _JAXJPEG_ITEM_FILE))


def _orbax_items(path: str) -> dict[str, str]:
    """Item name -> directory for an Orbax item, step directory or manager
    root (its latest step); jaxjpeg items (a step saved with jaxjpeg's Orbax
    handler) included."""
    if _is_orbax_item(path):
        return {"": path}
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    items = {d: os.path.join(path, d) for d in subdirs
             if _is_orbax_item(os.path.join(path, d)) or _is_jaxjpeg_item(os.path.join(path, d))}
    if items:
        return items
    steps = [d for d in subdirs if d.isdigit()]
    if steps:  # a CheckpointManager root: its latest step
        latest = os.path.join(path, max(steps, key=int))
        items = _orbax_items(latest)
        if items:
            return items
    raise SourceError(f"{path}: not an Orbax checkpoint directory (no _METADATA found in it, "
                      f"its items or its steps), nor a folder of safetensors files")


def _chosen_items(path: str, items) -> dict[str, str]:
    """The Orbax items to read: those named in ``items`` (None: all of them).
    A jaxjpeg item is never re-coded (its weights are already lossy): naming
    one, or leaving the choice open where a step holds one, is an error that
    lists the items, never a silent drop."""
    found = _orbax_items(path)
    names = ", ".join(repr(n) for n in found if n) or "one unnamed item"
    if items is not None:
        unknown = [n for n in items if n not in found]
        if unknown:
            raise SourceChoiceError(f"{path}: no Orbax item {unknown[0]!r} (items: {names})")
        found = {n: found[n] for n in items}
    jaxjpeg_items = [n for n, d in found.items() if _is_jaxjpeg_item(d)]
    if jaxjpeg_items:
        what = (f"item {jaxjpeg_items[0]!r} is already a jaxjpeg checkpoint "
                f"({os.path.join(found[jaxjpeg_items[0]], _JAXJPEG_ITEM_FILE)})")
        hint = "choose the others" if items is not None else "choose items"
        raise SourceChoiceError(f"{path}: {what}; {hint} with --item (items: {names})")
    return found


def _bytes_on_disk(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _declared_bytes(tree) -> int:
    import jax
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"bad shape {shape}")
        itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        total += math.prod(shape) * itemsize
    return total


def _orbax_source(path: str, items=None) -> Source:
    """The chosen items' leaves, each read alone when the save reaches it
    (an Orbax restore with every other leaf a placeholder): one item's leaves
    under their own paths (an unnamed or "default" item, or one chosen by
    name), several items' under the item names."""
    chosen = _chosen_items(path, items)
    try:
        import absl.logging
        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        raise SourceError("reading Orbax checkpoints needs orbax-checkpoint") from None
    prefixed = not (len(chosen) == 1 and (items is not None or next(iter(chosen)) in ("", "default")))
    leaves = []
    for name, directory in chosen.items():
        prefix = [["key", name]] if prefixed else []
        leaves += [dataclasses.replace(leaf, records=prefix + leaf.records)
                   for leaf in _orbax_item_leaves(directory)]
    return Source(path, leaves)


def _orbax_metadata(directory: str):
    import orbax.checkpoint as ocp
    from etils import epath
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
        tree = getattr(metadata, "tree", metadata)
        declared, on_disk = _declared_bytes(tree), _bytes_on_disk(directory)
    except Exception as e:  # orbax raises many types on a damaged directory
        raise SourceError(f"{directory}: cannot read the Orbax checkpoint's metadata "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    if declared > MAX_EXPANSION * on_disk + EXPANSION_FLOOR:
        raise SourceError(f"{directory}: declares {declared} bytes of arrays over "
                          f"{on_disk} bytes on disk (refused before reading)")
    return tree


_ORBAX_LOCK = threading.Lock()   # Orbax restores run one at a time (asyncio loops inside)


def _orbax_item_leaves(directory: str) -> list:
    """SourceLeaf of every array the item's metadata describes."""
    import jax
    from jaxjpeg.checkpoint import SourceLeaf
    from jaxjpeg.treepaths import key_record, path_string

    tree = _orbax_metadata(directory)
    described = jax.tree_util.tree_leaves_with_path(tree)
    leaves = []
    for keys, meta in described:
        records = [key_record(k) for k in keys]
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            dtype = None
        if shape is None or dtype is None or (dtype.kind not in "biufc"
                                              and dtype.name not in _ML_DTYPE_NAMES):
            raise SourceError(f"{directory}: leaf {path_string(records)[:200]!r} is not a "
                              "numeric array")
        leaves.append(SourceLeaf(records, tuple(shape), dtype,
                                 _orbax_loader(directory, tree, path_string(records))))
    return leaves


def _orbax_loader(directory: str, tree, name: str):
    def load():
        import jax
        import orbax.checkpoint as ocp
        from jaxjpeg.treepaths import key_record, path_string

        def named(keys):
            return path_string([key_record(k) for k in keys]) == name

        restore_args = jax.tree_util.tree_map_with_path(
            lambda k, _: ocp.RestoreArgs(restore_type=np.ndarray) if named(k)
            else ocp.PLACEHOLDER, tree)
        item = jax.tree_util.tree_map_with_path(
            lambda k, m: m if named(k) else ocp.PLACEHOLDER, tree)
        try:
            with _ORBAX_LOCK, ocp.PyTreeCheckpointer() as ckptr:
                restored = ckptr.restore(os.path.abspath(directory),
                                         args=ocp.args.PyTreeRestore(item=item,
                                                                     restore_args=restore_args))
        except Exception as e:
            raise SourceError(f"{directory}: cannot restore {name[:200]!r} from the Orbax "
                              f"checkpoint ({type(e).__name__}: {_first_line(e)})") from None
        (value,) = [v for k, v in jax.tree_util.tree_leaves_with_path(restored) if named(k)]
        return np.asarray(value)
    return load


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
