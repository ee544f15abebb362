"""Reading checkpoints in other formats (for ``jaxjpeg compress`` and
``jaxjpeg inspect --source``): Orbax directories, Flax msgpack files,
``.npz`` files, safetensors files and sharded safetensors checkpoints (an
index json, or a folder of shards).

Sources may be local paths or URLs (:mod:`jaxjpeg.storage`: ``file://``,
``memory://``, ``https://``, ``gs://``...). :func:`open_source` describes
every tensor up front from the files' headers and reads each when asked:
safetensors and npz with one ranged read of exactly its bytes, so a converter
holds about one tensor at a time and never downloads the whole source.
Orbax checkpoints are read by Orbax itself (local, ``gs://``, ``s3://``: the
stores it reads) or, on a web server, with tensorstore's HTTP store (an
item's arrays named by its ``_METADATA``); other fsspec stores cannot hold
a source Orbax or tensorstore reads. A Flax msgpack file has no index and is
read whole.
:func:`load_source` reads everything as a pytree.

Sources are not trusted either: every problem is a :class:`SourceError` (one
line, naming the file), every leaf must be a numeric array, and shapes out of
proportion to the bytes on disk are refused before anything is allocated.
Problems reaching a file (missing, a web server refusing ranges) are
``OSError``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import struct
import threading
import urllib.parse
import zlib

import numpy as np

from jaxjpeg import format as fmt
from jaxjpeg import storage
from jaxjpeg.dtypes import ML_DTYPE_NAMES, numpy_dtype, packed_nbytes, spelled_here, value_bits
from jaxjpeg.layout import unpack_low_bits

__all__ = ["Source", "SourceError", "load_source", "open_source"]

# A source may declare at most this many bytes of arrays per byte on disk (plus
# a floor): compressed Orbax chunks of real weights stay far below; a shape
# declaring terabytes over a few hundred bytes is refused before allocation.
MAX_EXPANSION = 1024
EXPANSION_FLOOR = 64 * 2**20
MAX_MSGPACK_BYTES = 64 * 2**30
_JAXJPEG_MAGIC = b"\x89JAXJPG\n"
# The stores Orbax (tensorstore) reads checkpoints from, besides local paths.
_ORBAX_SCHEMES = ("gs", "s3")


class SourceError(ValueError):
    """A source checkpoint that cannot be read (message: one line, with the path)."""


class SourceChoiceError(SourceError):
    """A choice of the user's that does not fit the source (an ``--item``, a
    store the format cannot be read from): theirs to change, a usage error,
    not damage."""


@dataclasses.dataclass
class Source:
    """A checkpoint in another format: its tensors described (shape, dtype,
    path) and read on demand, and its metadata (safetensors ``__metadata__``,
    merged over shards; None for formats without). ``close()`` (or ``with``)
    closes the files its leaves read from."""

    path: str
    leaves: list            # jaxjpeg.checkpoint.SourceLeaf, in save order
    metadata: dict | None = None
    files: "_Files | None" = None

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    def close(self) -> None:
        if self.files is not None:
            self.files.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def of_tree(cls, path: str, tree) -> "Source":
        from jaxjpeg.checkpoint import SourceLeaf
        from jaxjpeg.treepaths import leaves_with_paths

        tree = _check_leaves(path, tree)
        return cls(path, [SourceLeaf.of(records, leaf)
                          for records, leaf in leaves_with_paths(tree)])


class _Files:
    """The files a source reads, each opened once (a web server is asked for
    its size once) and shared by every leaf's reads, from any thread."""

    def __init__(self):
        self._open: dict[str, storage.RangeSource] = {}
        self._lock = threading.Lock()

    def get(self, location: str) -> storage.RangeSource:
        with self._lock:
            if location not in self._open:
                self._open[location] = storage.open_source(location)
            return self._open[location]

    def read(self, location: str, offset: int, length: int) -> bytearray:
        """Bytes [offset, offset + length) (fewer only past the end); a large
        remote range in pieces read in parallel, as restore reads blobs."""
        from jaxjpeg.format import read_in_pieces

        source = self.get(location)
        length = max(0, min(length, source.size - offset))
        data = bytearray(length)
        if storage.local_path(location) is not None:
            done = source.readinto(offset, memoryview(data))
        else:
            done = read_in_pieces(source.readinto, offset, data)
        if done != length:
            raise OSError(f"{location}: the file shrank while reading it")
        return data

    def locations(self) -> list[str]:
        """Every file opened so far."""
        with self._lock:
            return list(self._open)

    def close(self) -> None:
        with self._lock:
            for source in self._open.values():
                source.close()
            self._open.clear()


def open_source(path, items=None) -> Source:
    """A checkpoint in another format, told apart by its layout and first
    bytes, not by its names alone. ``path``: a local path or URL.

    ``items``: names of the Orbax items to take (a step of a
    ``CheckpointManager`` may hold several); None takes every Orbax item.
    """
    path = storage.as_location(path)
    local = storage.local_path(path)
    if local is not None and storage.scheme(path) == "file":
        path = local
    if _is_web(path):   # a web server lists no folders: Orbax items are asked for by name
        chosen = _web_orbax_items(path, items)
        if chosen is not None:
            return _shapes_checked(path, _web_orbax_source(path, chosen, items))
    kind = storage.kind(path)
    if kind is None:
        raise FileNotFoundError(2, "no such file or directory", path)
    files = _Files()
    try:
        source = _shapes_checked(path, _open_kind(path, kind, items, files))
    except BaseException:
        files.close()
        raise
    source.files = files
    return source


def _shapes_checked(path: str, source: Source) -> Source:
    """``source``, its shapes ones numpy can hold, an empty one's other sides
    too (found by review: [0, 2**62] failed inside numpy, as a usage error)."""
    for leaf in source.leaves:
        if math.prod(d for d in leaf.shape if d) * max(1, leaf.dtype.itemsize) >= 2**62:
            raise SourceError(f"{path}: {leaf.name[:200]!r} has an impossible shape "
                              f"{list(leaf.shape)}")
    return source


def _open_kind(path: str, kind: str, items, files: _Files) -> Source:
    shards = _safetensors_shards(path, kind, files)
    if items is not None and (shards is not None or kind != "directory"):
        raise SourceChoiceError(f"{path}: items can be chosen in Orbax directories only")
    if shards is not None:
        return _safetensors_source(path, shards, files)
    if kind == "directory":
        return _orbax_source(path, items)
    head = files.read(path, 0, 16)
    if head.startswith(_JAXJPEG_MAGIC):
        raise SourceError(f"{path}: is already a jaxjpeg checkpoint")
    if _looks_like_safetensors(path, head):
        return _safetensors_source(path, {path: None}, files)
    if head.startswith(_ZIP_MAGIC) or path.endswith(".npz"):
        return _npz_source(path, files)
    _refuse_formats_not_read(path, head)
    return Source.of_tree(path, _load_msgpack(path, files))


_SAVE_AS_SAFETENSORS = ("save its state_dict with safetensors.torch.save_file and compress "
                        "that")


def _refuse_formats_not_read(path: str, head: bytes) -> None:
    """A usage error (exit 2, as for torch.save's zip) for a file of a format
    jaxjpeg does not read, told by its first bytes (ONNX's by its name where
    it is no msgpack: :func:`_refuse_onnx`; found by review: a legacy
    torch.save, a .npy or an .onnx file were "not a Flax msgpack ...
    (ExtraData)", exit 1, as if damaged)."""
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:   # pickle protocols 2-5
        raise SourceChoiceError(f"{path}: a Python pickle (a legacy torch.save?), which jaxjpeg "
                                "does not read: " + _SAVE_AS_SAFETENSORS)
    if head.startswith(b"\x93NUMPY"):
        raise SourceChoiceError(f"{path}: one .npy array: save it in an .npz (np.savez) and "
                                "compress that")


def _named(path: str) -> str:
    """``path``'s name, not a URL's query (found by review: an index named
    "...index.json?download=true")."""
    return urllib.parse.urlsplit(path).path if _is_web(path) else path


def _refuse_onnx(path: str) -> None:
    """ONNX's protobuf has no magic: a file named so that is no msgpack
    (review: a msgpack named .onnx was refused by its name alone)."""
    if _named(path).endswith(".onnx"):
        raise SourceChoiceError(f"{path}: an ONNX model, which jaxjpeg does not read: save its "
                                "initializers (onnx.numpy_helper.to_array) with np.savez or "
                                "safetensors and compress that")


def load_source(path, items=None):
    """A checkpoint in another format as a pytree of numpy arrays (safetensors:
    a flat dict by tensor name)."""
    from jaxjpeg.treepaths import nest

    with open_source(path, items) as source:
        try:
            return nest([(leaf.records, leaf.array()) for leaf in source.leaves])
        except ValueError as e:
            raise SourceError(f"{path}: {e}") from None


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
        if dtype.kind not in "biufc" and dtype.name not in ML_DTYPE_NAMES:
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
    return 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{"


# safetensors dtype -> numpy dtype name (jaxjpeg.export writes the reverse),
# as safetensors 0.8 spells them: F8_E8M0 is MX formats' scales, F4 holds two
# float4_e2m1fn values a byte, the first in the low bits (as PyTorch's
# float4_e2m1fn_x2 saves them). Not F6_E2M3 / F6_E3M2 (jaxjpeg.dtypes: no
# XLA array holds them). Only the ml_dtypes this install has.
SAFETENSORS_DTYPES = {kind: name for kind, name in {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "C64": "complex64", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F4": "float4_e2m1fn",
}.items() if spelled_here(name)}
INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20   # the safetensors format's own cap on its JSON header
MAX_INDEX_BYTES = 64 * 2**20
MAX_ORBAX_PROCESSES = 4096   # array_metadatas/process_<i> files read at most
MAX_DIMS = 64


def _safetensors_shards(path: str, kind: str, files: _Files) -> dict[str, set | None] | None:
    """The safetensors files of a sharded checkpoint ``path`` (an index json,
    or a folder), each with the tensor names its index puts there (None: no
    index), or None when ``path`` is none. A folder with an index takes the
    shards it names; without, every ``*.safetensors`` file in it."""
    if kind == "file":
        return _index_shards(path, files) if _named(path).endswith(".index.json") else None
    names = storage.listdir(path)
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise SourceError(f"{path}: holds {len(indexes)} safetensors indexes "
                          f"({', '.join(indexes[:3])}); give the one to read")
    if indexes:
        return _index_shards(storage.join(path, indexes[0]), files)
    files = [storage.join(path, n) for n in names if n.endswith(".safetensors")]
    for file in files:
        if storage.kind(file) != "file":   # (review: an I/O error, "Is a directory")
            raise SourceError(f"{file}: not a file, in a folder of safetensors shards")
    return {file: None for file in files} or None


def _read_whole(path: str, limit: int, files: _Files) -> bytearray:
    """A whole file without an index (an index json, a msgpack), refused past
    ``limit`` bytes."""
    size = files.get(path).size
    if size > limit:
        raise SourceError(f"{path}: {size} bytes, more than the {limit} this kind of "
                          "file may have")
    return files.read(path, 0, size)


def _index_shards(index_path: str, files: _Files) -> dict[str, set]:
    """The shard files an index json names (checked: plain file names inside
    the index's folder, every one present), with the tensors each must hold."""
    try:
        # a tensor named twice refused: json.loads kept the last shard, and the
        # first was never read (found by review)
        index = json.loads(_read_whole(index_path, MAX_INDEX_BYTES, files),
                           object_pairs_hook=fmt.reject_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{index_path}: not a readable safetensors index "
                          f"({_first_line(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SourceError(f"{index_path}: a safetensors index needs a 'weight_map' of "
                          "tensor names to shard file names")
    if _is_web(index_path):   # shards beside the index, without its query
        parts = urllib.parse.urlsplit(index_path)
        folder = urllib.parse.urlunsplit(parts._replace(path=parts.path[:parts.path.rfind("/") + 1],
                                                        query="", fragment=""))
    else:
        folder = index_path[:max(index_path.rfind("/"), index_path.rfind(os.sep)) + 1]
    shards = {}
    for name, shard in weight_map.items():
        if shard.endswith((".bin", ".pt", ".pth", ".ckpt")):   # transformers' PyTorch shards
            raise SourceChoiceError(f"{index_path}: indexes PyTorch files ({shard!r:.200}), "
                                    "which jaxjpeg does not read: " + _SAVE_AS_SAFETENSORS)
        if "/" in shard or os.sep in shard or shard in ("", ".", ".."):
            raise SourceError(f"{index_path}: shard {shard!r:.200} of {name!r:.200} is not a "
                              "file name in the index's folder")
        shards.setdefault(folder + shard, set()).add(name)
    for shard in shards:
        if storage.kind(shard) != "file":
            raise SourceError(f"{index_path}: shard {shard.rsplit('/', 1)[-1]!r} is missing")
    return dict(sorted(shards.items()))


def _safetensors_source(path: str, shards: dict[str, set | None], files: _Files) -> Source:
    """Every tensor of the ``shards`` (described from their headers, each read
    with one ranged read when the save reaches it), named as the files name
    them, sorted."""
    leaves, metadata, owner = {}, {}, {}
    for file, expected in shards.items():
        tensors, shard_meta = _safetensors_header(file, files)
        names = {leaf.records[0][1] for leaf in tensors}
        if expected is not None and names != expected:
            odd = sorted(names ^ expected)[0]
            where = "missing from the shard" if odd in expected else "not in the index"
            raise SourceError(f"{file}: tensor {odd!r:.200} is {where}")
        for leaf in tensors:
            name = leaf.records[0][1]
            if name in owner:
                raise SourceError(f"{file}: tensor {name!r:.200} is in {owner[name]} too")
            owner[name] = file.rsplit("/", 1)[-1]
            leaves[name] = leaf
        for key, value in (shard_meta or {}).items():
            metadata.setdefault(key, value)   # shards disagreeing: the first one's
    if not leaves:
        raise SourceError(f"{path}: holds no tensors")
    return Source(path, [leaves[name] for name in sorted(leaves)], metadata or None)


def _safetensors_header(file: str, files: _Files) -> tuple[list, dict | None]:
    """(SourceLeaf per tensor, ``__metadata__``) of one safetensors file, from
    its header alone (two ranged reads), every entry checked against the
    file's size as the format requires."""
    size = files.get(file).size
    head = files.read(file, 0, 8)
    (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
    if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
        if head == _JAXJPEG_MAGIC:   # one saved into a folder of shards (found by review)
            raise SourceChoiceError(f"{file}: a jaxjpeg checkpoint, not a safetensors file: "
                                    "move it out of the folder, or give the shards' index")
        raise SourceError(f"{file}: not a valid safetensors file (header length {n} "
                          f"for {size} bytes)")
    text = files.read(file, 8, n)
    data_start, data_size = 8 + n, size - 8 - n
    try:
        # a repeated name refused: json.loads kept the last, and a header naming
        # a tensor twice lost the first (found by review)
        header = json.loads(text, object_pairs_hook=fmt.reject_duplicate_keys)
    except fmt.DuplicateKey as e:
        raise SourceError(f"{file}: not a valid safetensors file (its header names "
                          f"{e.key!r:.200} twice)") from None
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{file}: not a valid safetensors file (header: "
                          f"{type(e).__name__})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{file}: not a valid safetensors file (its header is a "
                          f"{type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise SourceError(f"{file}: __metadata__ must map names to strings")
    leaves, spans = [], []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _safetensors_entry(file, name, entry, data_size)
        spans.append((begin, end, name))
        leaves.append(_ranged_leaf(files, file, [["key", name]], shape, dtype,
                                   data_start + begin))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SourceError(f"{file}: tensors {first!r:.100} and {second!r:.100} overlap")
    return leaves, metadata


def _safetensors_entry(file: str, name: str, entry, data_size: int):
    """(numpy dtype, shape, (begin, end)) of one header entry, checked."""
    def bad(what: str):
        return SourceError(f"{file}: tensor {name!r:.200}: {what}")
    if not isinstance(entry, dict):
        raise bad("its header entry is not an object")
    kind, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(kind, str) or kind not in SAFETENSORS_DTYPES:   # (review: a list
        raise bad(f"has dtype {str(kind)[:20]}, which jaxjpeg does not store")   # was a TypeError)
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(
            type(d) is int and d >= 0 for d in shape)):
        raise bad(f"shape must be at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"data_offsets must be [begin, end] inside the {data_size} data bytes")
    dtype = numpy_dtype(SAFETENSORS_DTYPES[kind])
    if dtype.kind in "biufc":
        dtype = dtype.newbyteorder("<")   # the format is little-endian
    count = math.prod(shape)
    if count * value_bits(dtype) % 8:
        # the format ends every tensor on a byte (review: 3 float4 values in 2
        # bytes were compressed, and the checkpoint could not be exported)
        raise bad(f"{count} {kind} values do not fill whole bytes")
    if packed_nbytes(count, dtype) != offsets[1] - offsets[0]:
        raise bad(f"shape {shape} of {kind} needs {packed_nbytes(count, dtype)} "
                  f"bytes, its offsets span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), tuple(offsets)


def _ranged_leaf(files: _Files, file: str, records: list, shape: tuple, dtype: np.dtype,
                 offset: int, fortran: bool = False):
    """A SourceLeaf whose bytes (``dtype``, in its byte order; sub-byte
    values packed, the first in the low bits) lie at ``offset`` in ``file``:
    ``load()`` is one ranged read of exactly them."""
    from jaxjpeg.checkpoint import SourceLeaf

    def load():
        nbytes = packed_nbytes(math.prod(shape), dtype)
        data = files.read(file, offset, nbytes)
        if len(data) != nbytes:
            raise SourceError(f"{file}: {records[-1][1]!r:.200} is cut short")
        bits = value_bits(dtype)
        values = (np.frombuffer(data, dtype) if bits % 8 == 0 else unpack_low_bits(
            np.frombuffer(data, np.uint8), bits, math.prod(shape)).view(dtype))
        return values.reshape(shape, order="F" if fortran else "C")
    return SourceLeaf(records, shape, dtype, load)


# ---------------------------------------------------------------- npz


_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")   # zipfile's own layout of it
_NPY_HEADER_READ = 512      # a .npy header (magic, length, dict) fits in this, mostly
_ZIP_EXTRA_GUESS = 64       # a member's local extra field (zip64 sizes), mostly
_STORED, _DEFLATED = 0, 8   # the zip methods numpy's savez and savez_compressed use


def _npz_source(path: str, files: _Files) -> Source:
    """Every array of a ``.npz`` file (``np.savez`` / ``savez_compressed``),
    in the file's order, named by its member name (``.npy`` dropped; ``/``
    nests), described from
    the zip's directory and each member's .npy header, and read with one
    ranged read of that member when the save reaches it."""
    import zipfile

    ranged = _RangeFile(files.get(path))
    try:
        # Small buffered reads: the zip's end record, then its directory in one read.
        directory = io.BufferedReader(ranged, buffer_size=1024)
        with zipfile.ZipFile(directory) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as e:
        # (NotImplementedError: a "version needed to extract" zipfile does not
        # know, found by review as a traceback)
        if ranged.failure is not None:   # zipfile says BadZipFile for a read that failed
            raise ranged.failure from None
        raise SourceError(f"{path}: not a valid npz file ({_first_line(e)})") from None
    if any(info.filename.endswith("/data.pkl") for info in members):
        # found by review: "member 'model/data.pkl' is not a .npy array";
        # a format not read, not a damaged file (exit 2, not 1)
        raise SourceChoiceError(f"{path}: a PyTorch checkpoint (torch.save's zip of pickles), "
                                "which jaxjpeg does not read: save its state_dict with "
                                "safetensors.torch.save_file and compress that")
    # In the zip's order: np.savez writes a dict's arrays in its order, a
    # PyTorch state dict's being the network's (the BatchNorm prior pairs by it).
    placed = [_npz_leaf(path, info, files) for info in members]
    if not placed:
        raise SourceError(f"{path}: holds no arrays")
    _refuse_shared_bytes(path, [(span, info.filename) for (_, span), info in zip(placed, members)])
    return Source(path, [leaf for leaf, _ in placed])


def _refuse_shared_bytes(path: str, spans: list) -> None:
    """Members whose local headers and data (``((start, end), name)``) share
    bytes are refused: a zip's directory may point many members at one
    deflated member, each bounded alone (found by review: a 174 KB file
    declared 125 GiB of arrays, every one inflating the same 64 MiB)."""
    spans = sorted(spans)
    for ((_, end), first), ((start, _), second) in zip(spans, spans[1:]):
        if start < end:
            raise SourceError(f"{path}: members {first!r:.100} and {second!r:.100} "
                              "share bytes")


def _npz_leaf(path: str, info, files: _Files):
    """(SourceLeaf of a member, the bytes its local header and data span)."""
    from jaxjpeg.checkpoint import SourceLeaf

    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    records = [["key", part] for part in name.split("/")]
    if info.compress_type not in (_STORED, _DEFLATED) or info.flag_bits & 1:
        raise SourceError(f"{path}: member {info.filename!r:.200} is encrypted or compressed "
                          "with a method other than deflate")
    start, head = _member_head(path, info, files, _NPY_HEADER_READ)
    try:
        shape, fortran, dtype, header_bytes = _npy_header(path, info.filename, head)
    except SourceError:   # perhaps a header longer than the first read: once more, whole
        start, head = _member_head(path, info, files, 2**16 + 16)
        shape, fortran, dtype, header_bytes = _npy_header(path, info.filename, head)
    nbytes = math.prod(shape) * dtype.itemsize
    if info.compress_type == _STORED and header_bytes + nbytes != info.compress_size:
        raise SourceError(f"{path}: member {info.filename!r:.200} holds "
                          f"{info.compress_size} bytes, its header declares "
                          f"{header_bytes + nbytes}")
    if nbytes > MAX_EXPANSION * info.compress_size + EXPANSION_FLOOR:
        raise SourceError(f"{path}: member {info.filename!r:.200} declares {nbytes} bytes "
                          f"over {info.compress_size} compressed (refused before reading)")

    def load():
        # Stored members' CRC is checked too (found by review: a damaged
        # np.savez member was compressed without a word).
        packed = files.read(path, start, info.compress_size)   # a fresh bytearray
        data = (packed if info.compress_type == _STORED   # not copied (review: 2 copies held)
                else _inflated(path, info.filename, packed, header_bytes + nbytes))
        if len(data) != header_bytes + nbytes or zlib.crc32(data) != info.CRC:
            raise SourceError(f"{path}: member {info.filename!r:.200} is damaged "
                              "(size or CRC does not match)")
        array = np.frombuffer(data, dtype, offset=header_bytes)
        return array.reshape(shape, order="F" if fortran else "C")
    return SourceLeaf(records, shape, dtype, load), (info.header_offset, start + info.compress_size)


def _inflated(path: str, member: str, packed: bytes, limit: int) -> bytearray:
    """A deflated member's first ``limit`` bytes; damage that the inflater
    itself finds is a SourceError (it came out as a zlib.error traceback)."""
    try:
        return bytearray(zlib.decompressobj(-15).decompress(packed, limit))
    except zlib.error as e:
        raise SourceError(f"{path}: member {member!r:.200} is damaged ({e})") from None


def _member_head(path: str, info, files: _Files, length: int) -> tuple[int, bytes]:
    """(where the member's data starts, its first ``length`` bytes, inflated
    if deflated), from one ranged read of its local header and data start."""
    name = len(info.filename.encode("utf-8"))   # the local name's length, mostly
    guess = _ZIP_LOCAL_HEADER.size + name + _ZIP_EXTRA_GUESS
    if not 0 <= info.header_offset < files.get(path).size:
        # (found by review: a damaged directory's offset of -1 was asked of
        # a server as a range, an I/O error where a local file's was damage)
        raise SourceError(f"{path}: member {info.filename!r:.200} has no local header")
    local = files.read(path, info.header_offset, guess + length)
    if len(local) < _ZIP_LOCAL_HEADER.size or local[:4] != _ZIP_MAGIC:
        raise SourceError(f"{path}: member {info.filename!r:.200} has no local header")
    fields = _ZIP_LOCAL_HEADER.unpack(local[:_ZIP_LOCAL_HEADER.size])
    skip = _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
    start = info.header_offset + skip
    if start + info.compress_size > files.get(path).size:
        raise SourceError(f"{path}: member {info.filename!r:.200} runs past the end")
    head = bytes(local[skip:skip + min(length, info.compress_size)])
    if len(head) < min(length, info.compress_size):   # a longer extra field than guessed
        head = bytes(files.read(path, start, min(length, info.compress_size)))
    if info.compress_type == _DEFLATED:
        head = bytes(_inflated(path, info.filename, head, length))
    return start, head


def _npy_header(path: str, member: str, head: bytes):
    """(shape, fortran order, dtype, header length) of a .npy file's start."""
    import tokenize

    from numpy.lib import format as npy

    stream = io.BytesIO(head)
    try:
        version = npy.read_magic(stream)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except (ValueError, SyntaxError, TypeError, tokenize.TokenError) as e:
        raise SourceError(f"{path}: member {member!r:.200} is not a .npy array "
                          f"({_first_line(e)})") from None
    if dtype.hasobject or (dtype.kind not in "biufc" and dtype.name not in ML_DTYPE_NAMES):
        raise SourceError(f"{path}: member {member!r:.200} has dtype {dtype}, not a numeric one")
    if len(shape) > MAX_DIMS:
        raise SourceError(f"{path}: member {member!r:.200} has more than {MAX_DIMS} axes")
    if not all(type(d) is int and d >= 0 for d in shape):   # found by review: (-4,), (True, 4)
        raise SourceError(f"{path}: member {member!r:.200} has an invalid shape {shape!r:.200}")
    return tuple(shape), fortran, dtype, stream.tell()


class _RangeFile(io.RawIOBase):
    """A read-only file object over ranged reads (what zipfile needs to read
    a zip's directory; it reads a few small pieces near the end)."""

    def __init__(self, source):
        self._source, self._position = source, 0
        self.failure: OSError | None = None   # the last read's, which zipfile hides

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self._source.size)[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        try:
            n = self._source.readinto(self._position, memoryview(buffer).cast("B"))
        except OSError as e:
            self.failure = e
            raise
        self._position += n
        return n


# ---------------------------------------------------------------- msgpack


def _load_msgpack(path: str, files: _Files):
    try:
        from flax import serialization
    except ImportError:
        raise SourceError("reading Flax msgpack files needs flax (pip install flax)") from None
    data = _read_whole(path, MAX_MSGPACK_BYTES, files)
    try:
        tree = serialization.msgpack_restore(data)
    except Exception:  # msgpack raises its own types on garbage, RecursionError on depth
        _refuse_onnx(path)
        raise SourceError(f"{path}: not a Flax msgpack, safetensors, npz or jaxjpeg file, nor "
                          f"an Orbax directory") from None
    if not isinstance(tree, (dict, list)):
        raise SourceError(f"{path}: msgpack holds a {type(tree).__name__}, "
                          "not a pytree of arrays")
    _check_msgpack_maps(path, data)
    return tree


class _OddMap(Exception):
    """A msgpack map :func:`_check_msgpack_maps` refuses, and why."""


def _check_msgpack_maps(path: str, data) -> None:
    """Refuses a msgpack whose maps repeat a key (unpacking kept the last
    value: the first leaf was lost) or mix kinds of keys (they do not sort
    into a pytree: a traceback), both found by review; a second pass over
    the bytes, arrays not decoded."""
    import msgpack

    def checked(pairs):
        keys = [key for key, _ in pairs]
        if len({type(key) for key in keys}) > 1:
            kinds = ", ".join(sorted({type(key).__name__ for key in keys}))
            raise _OddMap(f"keys of mixed kinds ({kinds})")
        if len(set(keys)) < len(keys):
            raise _OddMap(f"the key {next(k for k in keys if keys.count(k) > 1)!r:.200} twice")

    try:
        msgpack.unpackb(data, raw=False, strict_map_key=False, object_pairs_hook=checked,
                        ext_hook=lambda code, payload: None)
    except _OddMap as e:
        raise SourceError(f"{path}: a map of the msgpack holds {e}") from None


# ---------------------------------------------------------------- Orbax


def _is_orbax_item(path: str) -> bool:
    try:
        return storage.kind(storage.join(path, "_METADATA")) == "file"
    except PermissionError:
        if storage.local_path(storage.as_location(path)) is not None:
            raise
        # An object store answers 403 for a missing object to whom may not
        # list the bucket (found by review: every such URL failed to open)
        return False
    except OSError:
        # a server that is down fails every name: say so of the source the user
        # named (found by review: a .safetensors URL's error named its "_METADATA")
        storage.kind(path)
        raise


# What jaxjpeg's Orbax handler (jaxjpeg.orbax.FILENAME) writes in its item directory.
JAXJPEG_ITEM_FILE = "checkpoint.jjpg"


def _is_jaxjpeg_item(path: str) -> bool:
    return storage.kind(storage.join(path, JAXJPEG_ITEM_FILE)) == "file"


def _items_in(path: str, subdirs=None) -> dict[str, str]:
    """Item name -> directory of the Orbax items, jaxjpeg's too, that
    ``path`` is ({"": path}) or holds (its ``subdirs``, listed if not
    given); empty where none."""
    if _is_orbax_item(path):
        return {"": path}
    if subdirs is None:
        subdirs = _subdirs(path)
    return {d: storage.join(path, d) for d in subdirs
            if _is_orbax_item(storage.join(path, d)) or _is_jaxjpeg_item(storage.join(path, d))}


def _subdirs(path: str) -> list[str]:
    return [d for d in storage.listdir(path) if storage.is_dir(storage.join(path, d))]


_STEP_NAME = re.compile(r"(?:(.*)_)?([0-9]+)")


def _not_an_item(found: dict[str, str], name: str) -> str:
    """Why ``name`` is not among the ``found`` items: absent, or a folder
    beside them that holds no arrays (found by review: a JsonSave item was
    called missing)."""
    steps = {d.rstrip("/").rpartition("/")[0] for n, d in found.items() if n}
    if any(storage.is_dir(storage.join(step, name)) for step in steps):
        return f"Orbax item {name!r} holds no arrays (no _METADATA: JSON or another non-PyTree item)"
    return f"no Orbax item {name!r}"


def _orbax_items(path: str) -> dict[str, str]:
    """Item name -> directory for an Orbax item, step directory or manager
    root (its latest step); jaxjpeg items (a step saved with jaxjpeg's Orbax
    handler) included."""
    if _is_orbax_item(path) or _is_jaxjpeg_item(path):   # (a jaxjpeg item: refused by
        return {"": path}                                 # _chosen_items, found by review)
    subdirs = _subdirs(path)
    items = _items_in(path, subdirs)
    if items:
        return items
    # a CheckpointManager root: its latest step holding items ("12", or
    # "step_12" with a step_prefix: found by review, such roots were not
    # recognised), of the main naming (plain numbers first, else the one of
    # most steps); another naming ("eval_9", "backup_5") only where no step
    # of the main one holds items (review: one unfinished step switched to it)
    groups: dict[str, dict[str, int]] = {}
    for d in subdirs:
        if m := _STEP_NAME.fullmatch(d):
            groups.setdefault(m.group(1) or "", {})[d] = int(m.group(2))
    for prefix in sorted(groups, key=lambda p: (p != "", -len(groups[p]), p)):
        for step in sorted(groups[prefix], key=groups[prefix].get, reverse=True):
            items = _items_in(storage.join(path, step))
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
            raise SourceChoiceError(f"{path}: {_not_an_item(found, unknown[0])} "
                                    f"(items: {names})")
        found = {n: found[n] for n in items}
    jaxjpeg_items = [n for n, d in found.items() if _is_jaxjpeg_item(d)]
    if jaxjpeg_items and len(jaxjpeg_items) == len(found):   # nothing else to choose (review)
        file = storage.join(found[jaxjpeg_items[0]], JAXJPEG_ITEM_FILE)
        which = "" if jaxjpeg_items == [""] else f" (items: {names})"
        raise SourceChoiceError(f"{path}: already a jaxjpeg checkpoint{which}: nothing to "
                                f"compress (inspect, restore or export {file})")
    if jaxjpeg_items:
        what = (f"item {jaxjpeg_items[0]!r} is already a jaxjpeg checkpoint "
                f"({storage.join(found[jaxjpeg_items[0]], JAXJPEG_ITEM_FILE)})")
        hint = "choose the others" if items is not None else "choose items"
        raise SourceChoiceError(f"{path}: {what}; {hint} with --item (items: {names})")
    return found


def _bytes_on_disk(directory: str) -> int:
    if storage.local_path(directory) is None:
        fs, inner = storage.filesystem(directory)
        return int(fs.du(inner, total=True))
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _memory_bytes() -> int:
    """This machine's physical memory (2^62 where it cannot tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


def _declared_bytes(tree) -> tuple[int, int]:
    """(bytes of every array the metadata describes, of the largest)."""
    import jax
    total = largest = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"bad shape {shape}")
        nbytes = math.prod(shape) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        total, largest = total + nbytes, max(largest, nbytes)
    return total, largest


def _orbax_source(path: str, items=None) -> Source:
    """The chosen items' leaves, each read alone when the save reaches it
    (an Orbax restore with every other leaf a placeholder): one item's leaves
    under their own paths (an unnamed or "default" item, or one chosen by
    name), several items' under the item names."""
    if storage.local_path(path) is None and storage.scheme(path) not in _ORBAX_SCHEMES:
        raise SourceChoiceError(f"{path}: Orbax checkpoints are read from local paths, "
                                f"gs://, s3:// and web servers only, not "
                                f"{storage.scheme(path)}://; copy the checkpoint to one of "
                                "those, or export it as safetensors")
    chosen = _chosen_items(path, items)
    return _item_sources(path, chosen, items, _orbax_item_leaves)


def _item_sources(path: str, chosen: dict, items, item_leaves) -> Source:
    """The leaves of the ``chosen`` items (name -> directory) as one source."""
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
                   for leaf in item_leaves(directory)]
    return Source(path, leaves)


# ---------------------------------------------------------------- Orbax on a web server


_WEB_ORBAX_CACHE_BYTES = 8 * 2**20
# A web server's failed reads are tried 4 times over about 8 s, then the
# compress fails naming the file (tensorstore's default retries a server
# answering 500 for 9 minutes and more; found by review).
_WEB_ORBAX_RETRIES = {"max_retries": 4, "initial_delay": "500ms", "max_delay": "4s"}


def _is_web(path: str) -> bool:
    return storage.scheme(path) in ("http", "https")


def _web_orbax_items(path: str, items) -> dict[str, str] | None:
    """Item name -> URL of the Orbax items at a web URL (which lists no
    folders: the URL of an item, or of a step with ``items`` named), or None
    when ``path`` holds no Orbax item."""
    if items is None:
        return {"": path} if _is_orbax_item(path) else None
    chosen = {name: storage.join(path, name) for name in items}
    for name, url in chosen.items():
        if not _is_orbax_item(url):
            raise SourceChoiceError(f"{path}: no Orbax item {name!r} (no {url}/_METADATA)")
    return chosen


def _web_orbax_source(path: str, chosen: dict, items) -> Source:
    """Orbax items on a web server, read with tensorstore's own HTTP store
    (Orbax opens only local paths and object stores): the item's _METADATA
    names the arrays, each opened (its zarr metadata read) now and read, by
    ranges of its chunks, when the save reaches it."""
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        raise SourceError("reading Orbax checkpoints needs tensorstore "
                          "(pip install orbax-checkpoint)") from None
    return _item_sources(path, chosen, items, _web_orbax_leaves)


def _web_orbax_leaves(directory: str) -> list:
    files = _Files()
    try:
        metadata = json.loads(_read_whole(storage.join(directory, "_METADATA"),
                                          MAX_INDEX_BYTES, files))
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{directory}: unreadable Orbax _METADATA ({_first_line(e)})") from None
    finally:
        files.close()
    entries = metadata.get("tree_metadata") if isinstance(metadata, dict) else None
    if not isinstance(entries, dict):
        raise SourceError(f"{directory}: Orbax _METADATA has no tree_metadata")
    import tensorstore as ts
    # One context for the item's arrays: the database's manifest and index
    # nodes are fetched once, not once per array (a small cache: no chunks kept).
    context = ts.Context({"cache_pool": {"total_bytes_limit": _WEB_ORBAX_CACHE_BYTES},
                          "http_request_retries": _WEB_ORBAX_RETRIES})
    key_impls = _orbax_key_impls(directory)
    leaves = []
    for entry in entries.values():
        records = _web_orbax_records(directory, entry)
        store = _web_orbax_array(directory, metadata, records, context)
        dtype = np.dtype(store.dtype.numpy_dtype)
        leaves.append(_orbax_leaf(directory, records, tuple(store.shape), dtype,
                                  _web_orbax_loader(directory, store, records),
                                  key_impls.get(_orbax_array_name(records))))
    return sorted(leaves, key=lambda leaf: [(0, v) if k == "index" else (1, str(v))
                                            for k, v in leaf.records])


def _web_orbax_records(directory: str, entry) -> list:
    """A leaf's key path from its _METADATA entry (Orbax's key types: 1, a
    sequence index; 2, a dict key)."""
    keys = entry.get("key_metadata") if isinstance(entry, dict) else None
    value = entry.get("value_metadata") if isinstance(entry, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) and "key" in k for k in keys):
        raise SourceError(f"{directory}: Orbax _METADATA entry without key_metadata")
    try:
        records = [["index", int(k["key"])] if k.get("key_type") == 1 else ["key", str(k["key"])]
                   for k in keys]
    except (TypeError, ValueError):   # found by review: a traceback
        raise SourceError(f"{directory}: Orbax _METADATA has a sequence index that is not "
                          "a whole number") from None
    if not isinstance(value, dict) or value.get("value_type") not in (
            "np.ndarray", "jax.Array", "scalar"):
        raise SourceError(f"{directory}: leaf {'/'.join(str(r[1]) for r in records)[:200]!r} "
                          "is not a numeric array")
    return records


def _orbax_array_name(records: list) -> str:
    return ".".join(str(value) for _, value in records)


def _web_orbax_array(directory: str, metadata: dict, records: list, context):
    """The tensorstore of one array (Orbax names it by its keys joined with '.')."""
    import tensorstore as ts

    name = _orbax_array_name(records)
    base = directory.rstrip("/") + "/"
    driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    kvstore = ({"driver": "ocdbt", "base": base, "path": name} if metadata.get("use_ocdbt")
               else base + name)
    try:
        return ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True,
                       context=context).result()
    except Exception as e:  # tensorstore raises ValueError & co. with its status text
        raise OSError(f"{directory}: cannot open {name[:200]!r} ({_first_line(e)[:300]})") from None


def _web_orbax_loader(directory: str, store, records: list):
    def load():
        try:
            return np.asarray(store.read().result())
        except Exception as e:
            raise OSError(f"{directory}: cannot read {records[-1][1]!r:.200} "
                          f"({_first_line(e)[:300]})") from None
    return load


def _orbax_metadata(directory: str):
    import orbax.checkpoint as ocp
    from etils import epath
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
        tree = getattr(metadata, "tree", metadata)
        (declared, largest), on_disk = _declared_bytes(tree), _bytes_on_disk(directory)
    except Exception as e:  # orbax raises many types on a damaged directory
        raise SourceError(f"{directory}: cannot read the Orbax checkpoint's metadata "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    # Arrays equal to their fill value take no chunks on disk (a fresh
    # optimizer state's zeros, LoRA's B): out of proportion only where a leaf,
    # read one at a time, would not fit in memory (found by review: a step-0
    # state of zeros was refused as damaged).
    if declared > MAX_EXPANSION * on_disk + EXPANSION_FLOOR and largest > _memory_bytes() // 4:
        raise SourceError(f"{directory}: declares {declared} bytes of arrays over "
                          f"{on_disk} bytes on disk (refused before reading)")
    return tree


_ORBAX_LOCK = threading.Lock()   # Orbax restores run one at a time (asyncio loops inside)


def _orbax_item_leaves(directory: str) -> list:
    """SourceLeaf of every array the item's metadata describes."""
    import jax
    from jaxjpeg.treepaths import key_record, path_string

    tree = _orbax_metadata(directory)
    described = jax.tree_util.tree_leaves_with_path(tree)
    key_impls = _orbax_key_impls(directory)
    leaves = []
    for keys, meta in described:
        records = [key_record(k) for k in keys]
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            dtype = None
        if shape is None or dtype is None or (dtype.kind not in "biufc"
                                              and dtype.name not in ML_DTYPE_NAMES):
            raise SourceError(f"{directory}: leaf {path_string(records)[:200]!r} is not a "
                              "numeric array")
        leaves.append(_orbax_leaf(directory, records, tuple(shape), dtype,
                                  _orbax_loader(directory, tree, path_string(records)),
                                  key_impls.get(getattr(meta, "name", None))))
    return leaves


def _orbax_leaf(directory: str, records, shape, dtype, load, prng_impl):
    """A SourceLeaf of an Orbax item; a damaged key record is the item's error."""
    from jaxjpeg import layout
    from jaxjpeg.checkpoint import SourceLeaf

    try:
        return SourceLeaf(records, shape, dtype, load, prng_impl=prng_impl)
    except layout.Unstorable as e:
        raise SourceError(f"{directory}: {e}") from None


def _orbax_key_impls(directory: str) -> dict[str, str]:
    """{Orbax array name: PRNG implementation} of the item's typed key arrays,
    which Orbax stores as their key data and names in its per-process array
    metadata (``array_metadatas/process_<i>``, ``random_key_impl``); {} where
    there is none."""
    impls, files = {}, _Files()
    try:
        for process in range(MAX_ORBAX_PROCESSES):
            try:
                listed = json.loads(_read_whole(
                    storage.join(directory, f"array_metadatas/process_{process}"),
                    MAX_INDEX_BYTES, files))
            except (OSError, ValueError, RecursionError):   # no such file, or not JSON
                break
            entries = listed.get("array_metadatas") if isinstance(listed, dict) else None
            for entry in entries if isinstance(entries, list) else ():
                meta = entry.get("array_metadata") if isinstance(entry, dict) else None
                ext = meta.get("ext_metadata") if isinstance(meta, dict) else None
                impl = ext.get("random_key_impl") if isinstance(ext, dict) else None
                if isinstance(impl, str) and isinstance(meta.get("param_name"), str):
                    impls[meta["param_name"]] = impl
    finally:
        files.close()
    return impls


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
                restored = ckptr.restore(storage.to_absolute(directory),
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
