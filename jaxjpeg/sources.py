"""Reading checkpoints in other formats (for ``jaxjpeg compress`` and
``jaxjpeg inspect --source``): Orbax directories, Flax msgpack files and
safetensors files, as pytrees of numpy arrays.

Sources are not trusted either: every problem is a :class:`SourceError` (one
line, naming the file), every leaf must be a numeric array, and shapes out of
proportion to the bytes on disk are refused before anything is allocated.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

__all__ = ["SourceError", "load_source"]

# A source may declare at most this many bytes of arrays per byte on disk (plus
# a floor): compressed Orbax chunks of real weights stay far below; a shape
# declaring terabytes over a few hundred bytes is refused before allocation.
MAX_EXPANSION = 1024
EXPANSION_FLOOR = 64 * 2**20
_JAXJPEG_MAGIC = b"\x89JAXJPG\n"
_ML_DTYPE_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


class SourceError(ValueError):
    """A source checkpoint that cannot be read (message: one line, with the path)."""


def load_source(path: str):
    """Loads a checkpoint in another format as a pytree of numpy arrays.

    Orbax directories, Flax msgpack files and safetensors files are told apart
    by their layout and first bytes, not by their names alone.
    """
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        tree = _load_orbax(path)
    else:
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(_JAXJPEG_MAGIC):
            raise SourceError(f"{path}: is already a jaxjpeg checkpoint")
        tree = _load_safetensors(path) if _looks_like_safetensors(path, head) else _load_msgpack(path)
    return _check_leaves(path, tree)


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


# Dtypes safetensors' numpy reader cannot build (numpy has no name for them).
_ML_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _load_safetensors(path: str) -> dict:
    """Tensor by tensor through ``safetensors.safe_open`` (lazy: memory is one
    tensor at a time beyond the result), which validates the header, shapes
    and offsets."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise SourceError("reading safetensors files needs safetensors "
                          "(pip install safetensors)") from None
    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                out[name] = (_read_ml_dtype(path, name, _ML_DTYPES[dtype]) if dtype in _ML_DTYPES
                             else f.get_tensor(name))
    except SafetensorError as e:
        raise SourceError(f"{path}: not a valid safetensors file ({_first_line(e)})") from None
    except (ValueError, TypeError, AttributeError) as e:  # e.g. > 64 dims, unknown dtype
        raise SourceError(f"{path}: unsupported safetensors content ({_first_line(e)})") from None
    return out


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


def _orbax_items(path: str) -> dict[str, str]:
    """Item name -> directory for an Orbax item, step directory or manager root."""
    if _is_orbax_item(path):
        return {"": path}
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    items = {d: os.path.join(path, d) for d in subdirs if _is_orbax_item(os.path.join(path, d))}
    if items:
        return items
    steps = [d for d in subdirs if d.isdigit()]
    if steps:  # a CheckpointManager root: its latest step
        latest = os.path.join(path, max(steps, key=int))
        items = _orbax_items(latest)
        if items:
            return items
    raise SourceError(f"{path}: not an Orbax checkpoint directory (no _METADATA found in it, "
                      f"its items or its steps)")


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


def _load_orbax(path: str):
    items = _orbax_items(path)
    try:
        import absl.logging
        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    try:
        import jax
        import orbax.checkpoint as ocp
        from etils import epath
    except ImportError:
        raise SourceError("reading Orbax checkpoints needs orbax-checkpoint") from None
    trees = {}
    for name, directory in items.items():
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
        try:
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            with ocp.PyTreeCheckpointer() as ckptr:
                trees[name] = ckptr.restore(os.path.abspath(directory),
                                            args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:
            raise SourceError(f"{directory}: cannot restore the Orbax checkpoint "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    if len(trees) == 1 and next(iter(trees)) in ("", "default"):  # one (implicit) item
        return next(iter(trees.values()))
    return trees


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
