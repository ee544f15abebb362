"""The jaxjpeg container: a checksummed, versioned file of named, aligned blobs.

Layout (docs/format.md has the full spec)::

    [preamble, 64 bytes][blob][pad][blob][pad]...[header: canonical UTF-8 JSON, deflated]

The header sits at the end so blobs stream to disk in one pass (no copy, no size known in
advance); the fixed-size preamble, rewritten last, points to it. Readers trust nothing: every
size, offset and checksum is checked before it is used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import operator
import os
import re
import secrets
import struct
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from jaxjpeg import interrupts, storage
from jaxjpeg.threads import SharedPool
from jaxjpeg._native import crc32c as _native_crc32c  # xla_ops/crc32c.h

__all__ = [
    "ALIGNMENT",
    "FORMAT_VERSION",
    "SMALL_BLOB_ALIGNMENT",
    "MAGIC",
    "BlobInfo",
    "ContainerReader",
    "ContainerWriter",
    "FormatError",
    "blob_offset",
    "crc32c",
    "inflate_at_most",
]

MAGIC = b"\x89JAXJPG\n"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# Version 2's one flag: the header bytes are a zlib stream of the JSON. A header
# is mostly names and numbers that repeat from leaf to leaf; deflated it is
# ~8x smaller, which on a model of a few hundred small leaves is 2-3% of a
# file at 8x (bytes a byte target then gives to the weights).
FLAG_DEFLATED_HEADER = 0x1
_VERSION_FLAGS = {1: 0, 2: FLAG_DEFLATED_HEADER, 3: FLAG_DEFLATED_HEADER}
# Where blobs start. Versions 1 and 2 put every blob at a multiple of
# ALIGNMENT. Version 3 does so for blobs of LARGE_BLOB bytes or more (tiles,
# raw tensors: what is memory-mapped or handed to a device) and puts smaller
# ones at a multiple of SMALL_BLOB_ALIGNMENT (any dtype stays aligned). A
# network of a few hundred leaves has hundreds of blobs of a few hundred
# bytes (BatchNorm vectors, row maps, interval indexes): 64-byte padding was
# 0.6% of EfficientNet-lite1 at 8x, bytes a byte target now gives the weights.
ALIGNMENT = 64
SMALL_BLOB_ALIGNMENT = 8
LARGE_BLOB = 4096
# Parsing a header of n bytes takes ~3-4n of host memory (its bytes, their
# text, the objects): a 217 KB file whose deflated header inflates to 212 MB
# (one metadata string) takes 0.94 GB to open (found by review). Neither a
# cap on the inflation ratio (files earlier writers wrote, 12,000 leaves of
# 4,000-character paths, deflate 180x) nor a lower limit (40,000 leaves of
# 3,640-character paths exceed 128 MiB) keeps every file they wrote readable:
# the limit stays.
DEFAULT_MAX_HEADER_BYTES = 256 * 2**20
# Parsing JSON builds a Python object per value (a dict of "{}" costs ~30x its
# two bytes). Headers may hold at most this many containers and separators
# ("{", "[", ","; counted before parsing, strings included, so an over-count)
# or one per 16 bytes of the file, whichever is more: parsing then takes at
# most ~0.5 GB, or ~4x the file's size for very large files.
MIN_HEADER_TOKENS = 2**23

# magic, version, flags, header_offset, header_length, header_crc32c, reserved; then preamble_crc32c.
_PREAMBLE_BODY = struct.Struct("<8sIIQQI24s")
_PREAMBLE_CRC = struct.Struct("<I")
PREAMBLE_SIZE = _PREAMBLE_BODY.size + _PREAMBLE_CRC.size
assert PREAMBLE_SIZE == ALIGNMENT
_RESERVED = bytes(24)

_IO_CHUNK = 16 * 2**20  # bounds the memory verify() and writes use per step
# Prefetching: blobs closer than _MERGE_GAP are read as one range (fewer
# requests to a remote store, little waste), and ranges are cut into pieces of
# at most _READ_PIECE so many requests are in flight at once, up to
# READ_CONCURRENCY (a remote store's throughput grows with requests in flight).
_MERGE_GAP = 4096
_READ_PIECE = 4 * 2**20
READ_CONCURRENCY = 16
_BLOB_KEYS = frozenset({"offset", "length", "crc32c"})
_HEADER_KEYS = frozenset({"blobs", "metadata"})


class FormatError(ValueError):
    """A container file is malformed, damaged, truncated or of an unsupported version."""


class BlobInfo(NamedTuple):
    offset: int
    length: int
    crc32c: int


# ----------------------------------------------------------------------------- checksums

def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of a bytes-like object, continuing from `crc`."""
    return _native_crc32c(data, crc)


# ----------------------------------------------------------------------------- helpers


def _align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def blob_offset(position: int, length: int) -> int:
    """Where a writer puts a blob of ``length`` bytes when the payload so far
    ends at ``position`` (version 3's rule, see LARGE_BLOB)."""
    return _align_up(position, ALIGNMENT if length >= LARGE_BLOB else SMALL_BLOB_ALIGNMENT)


def blob_alignment(version: int) -> int:
    """What every blob offset of a file of ``version`` must be a multiple of."""
    return ALIGNMENT if version < 3 else SMALL_BLOB_ALIGNMENT


def _check_keys(value, where: str) -> None:
    """TypeError naming a dict key that is not a str, at any depth (found by
    review: json turned 1 into "1", and mixed keys failed its sort)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; keys must be str")
            _check_keys(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_keys(item, f"{where}[{i}]")


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _pack_preamble(header_offset: int, header_length: int, header_crc: int,
                   flags: int = 0) -> bytes:
    body = _PREAMBLE_BODY.pack(
        MAGIC, FORMAT_VERSION, flags, header_offset, header_length, header_crc, _RESERVED
    )
    return body + _PREAMBLE_CRC.pack(crc32c(body))


def _encode_header(blobs: dict, metadata: dict) -> tuple[bytes, int]:
    """(header bytes as stored, preamble flags): the canonical JSON, deflated."""
    header = _canonical_json({"blobs": blobs, "metadata": metadata})
    if len(header) > DEFAULT_MAX_HEADER_BYTES:
        raise ValueError(
            f"header of {len(header)} bytes exceeds the {DEFAULT_MAX_HEADER_BYTES} readers accept"
        )
    return zlib.compress(header, 6), FLAG_DEFLATED_HEADER


def inflate_at_most(data, limit: int) -> tuple[bytes, bool]:
    """(at most ``limit + 1`` bytes of the zlib stream ``data`` inflated,
    whether the stream ended there with nothing after it): a small stream
    can inflate to gigabytes, so no more is ever produced. ValueError when
    ``data`` is not a zlib stream."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, min(limit, 2**62) + 1)   # zlib takes a C size
    except zlib.error as e:
        raise ValueError(f"does not inflate ({e})") from None
    return text, inflater.eof and not inflater.unused_data


class BlobParts:
    """A blob given as its parts (bytes-like), written back to back: a coder's
    parts are never joined. A join holds every part beside the whole, a
    second copy of each save thread's coding (16 MB for a 32 MiB leaf Rice
    coded at 2x). ``len`` is the blob's bytes; ``bytes`` joins it, for a
    reader that needs one buffer."""

    __slots__ = ("views", "nbytes")

    def __init__(self, parts):
        self.views = tuple(_as_byte_view(part) for part in parts)
        self.nbytes = sum(v.nbytes for v in self.views)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.views)

    def __add__(self, tail) -> "BlobParts":
        return BlobParts((*self.views, tail))


def byte_views(data) -> tuple[memoryview, ...]:
    """Flat uint8 views of a blob's data: a :class:`BlobParts`' own, or
    :func:`_as_byte_view` of anything else."""
    return data.views if isinstance(data, BlobParts) else (_as_byte_view(data),)


def contiguous(data):
    """``data`` as one buffer: a :class:`BlobParts` joined, anything else as it is."""
    return bytes(data) if isinstance(data, BlobParts) else data


def _as_byte_view(data) -> memoryview:
    """A flat uint8 view of bytes-like objects and C-contiguous arrays, without copying."""
    if not isinstance(data, np.ndarray):
        try:
            view = memoryview(data)
        except TypeError:
            data = np.asarray(data)
        else:
            if not view.c_contiguous:
                raise ValueError("blob data must be C-contiguous")
            return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if data.dtype.hasobject:
        raise TypeError(f"cannot store an array of dtype {data.dtype} as raw bytes")
    if not data.flags.c_contiguous:
        raise ValueError("blob arrays must be C-contiguous (use np.ascontiguousarray)")
    return memoryview(data.reshape(-1).view(np.uint8))


def _open_directory(directory: str) -> int | None:
    """A descriptor to fsync the directory with, or None where the directory
    cannot be opened for reading (write and search permission are enough to
    save into it; the rename is then not forced to disk)."""
    try:
        return os.open(directory, os.O_RDONLY)
    except PermissionError:
        return None


_TEMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{16}")
_TEMP_STEM_BYTES = 200      # + ".tmp-" + 16 hex digits stays within NAME_MAX (255)
_STALE_AFTER_S = 10.0       # younger temp files are left alone (their writer may not hold its lock yet)


def _temp_stem(path: str) -> str:
    """The destination's file name, cut to _TEMP_STEM_BYTES of UTF-8."""
    name = os.path.basename(path).encode("utf-8", "surrogateescape")[:_TEMP_STEM_BYTES]
    return name.decode("utf-8", "ignore")


def replaced_file(path: str) -> str:
    """The file a save to local ``path`` replaces: through a symlink, the file
    it points to (the link stays), whose directory the temporary file must
    be made in (a rename cannot cross file systems)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _refuse_remote_directory(location: str) -> None:
    """Refuses, before any coding, a URL naming a "directory" of its store
    (a prefix of other objects), which the move would copy into."""
    fs, inner = storage.filesystem(location)
    # A web server has no directories (fsspec's isdir there GETs the whole
    # file to look for links in it: found by review, 8 MiB read before a save).
    on_web = storage.scheme(location) in ("http", "https")
    if inner.endswith("/") or (not on_web and fs.isdir(inner)):
        raise IsADirectoryError(errno.EISDIR, "cannot save: the URL names a directory", location)


def create_temp_file(target: str, shown=None) -> tuple[str, int]:
    """(path, fd) of a new temporary file beside ``target``, to be renamed
    over it: named so that a dead writer's is found (stale ones removed
    first), locked while its writer lives, with the permission bits of the
    file it replaces (a 0600 file stays 0600). ``shown``: the path errors name."""
    shown = target if shown is None else shown
    if not target:   # found by review: coded whole, then a rename onto '' failed
        raise FileNotFoundError(errno.ENOENT, "cannot save: the path is empty", shown)
    if os.path.isdir(target) or target.endswith(os.sep):
        # found by review: refused only at the rename, after all the coding,
        # naming the temporary file (one in the parent, for "dir/")
        raise IsADirectoryError(errno.EISDIR, "cannot save: the path names a directory", shown)
    storage.refuse_special_file(target, shown)
    directory = os.path.dirname(storage.absolute(target))
    if not os.path.isdir(directory):
        if os.path.exists(directory):   # found by review: said "does not exist"
            raise NotADirectoryError(errno.ENOTDIR, f"cannot save: {directory!r} is not a "
                                     "directory", shown)
        raise FileNotFoundError(errno.ENOENT, f"cannot save: directory {directory!r} does "
                                "not exist", shown)
    stem = _temp_stem(target)
    _remove_stale_temp_files(directory, stem)
    while True:
        temp_path = os.path.join(directory, f"{stem}.tmp-{secrets.token_hex(8)}")
        try:  # O_EXCL: never clobber; mode 0o666 lets the umask decide, like open()
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except FileNotFoundError as e:   # it was there a moment ago, or takes no files (/proc)
            raise FileNotFoundError(errno.ENOENT, f"cannot save: no file can be created in "
                                    f"{directory!r} ({e.strerror})", shown) from None
        except OSError as e:   # the error names the file saved, not the temporary one
            raise type(e)(e.errno, f"cannot save: {e.strerror} (creating a file in "
                          f"{directory!r})", shown) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "alive" for stale cleanup
            _keep_mode(target, fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp_path)
            raise
        return temp_path, fd


def _keep_mode(target: str, fd: int) -> None:
    """A replaced file keeps its permission bits (a 0600 file stays 0600)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    os.fchmod(fd, mode & 0o7777)


def _remove_stale_temp_files(directory: str, stem: str) -> None:
    """Deletes temp files of this destination whose writer died (SIGKILL, power
    loss): a live writer holds an exclusive lock on its temp file, a dead one
    holds nothing. Best effort: any error leaves a file alone."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(stem) and _TEMP_SUFFIX.fullmatch(entry.name, len(stem))):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < _STALE_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
        except OSError:  # locked by a live writer, or gone already
            pass
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- writer


class ContainerWriter:
    """Writes a container atomically: the file at `path` is replaced only on a clean close.

    `path` is a local path, os.PathLike or a URL (see jaxjpeg.storage).

    Local files: blobs stream to "<path>.tmp-<random>" in the same directory; close() writes
    the header, fills in the preamble, fsyncs file and directory and renames over `path`.

    URLs (object stores, fsspec): the preamble is rewritten last, which object stores cannot
    do in place, so blobs stream to a local temporary file (in the system temp directory; it
    needs the file's size in free space). close() uploads it as "<path>.tmp-<random>" and then
    moves that object to `path` (on GCS and S3 a server-side copy and a delete). Guaranteed:
    `path` is never a partial file: it is the old object until the copy completes, then the
    whole new one (object writes are atomic on these stores). Not guaranteed: a process killed
    between upload and move leaves the temporary object behind (nothing cleans it up), and
    durability is the store's own.

    Leaving the `with` block by an exception (or calling abort()) removes the temporary file.
    """

    def __init__(self, path, metadata: dict | None = None):
        self.path = storage.as_location(path)
        local = storage.local_path(self.path)
        self._remote = None if local is not None else self.path
        self._target = None if local is None else replaced_file(local)
        self._metadata: dict = {}
        self._blobs: dict[str, BlobInfo] = {}
        self._position = PREAMBLE_SIZE
        if metadata is not None:
            self.set_metadata(metadata)
        if self._remote is not None:
            _refuse_remote_directory(self._remote)
        self._file = None
        try:
            # A signal between the file's creation and this object's knowing
            # it would leave it (a flaky test: SIGHUP just as it appeared).
            with interrupts.held():
                if self._remote is not None:
                    fd, self._temp_path = tempfile.mkstemp(prefix="jaxjpeg-", suffix=".part")
                else:
                    self._temp_path, fd = self._create_temp_file()
                self._file = os.fdopen(fd, "wb")
            self._file.write(bytes(PREAMBLE_SIZE))  # placeholder until close()
        except BaseException:
            self.abort()
            raise

    def _create_temp_file(self) -> tuple[str, int]:
        return create_temp_file(self._target, self.path)

    def set_metadata(self, metadata: dict) -> None:
        """Sets the user metadata (any JSON-able dict); it is copied now, written at close."""
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        _check_keys(metadata, "metadata")
        self._metadata = json.loads(_canonical_json(metadata))

    def add_blob(self, name: str, data) -> None:
        """Appends `data` (bytes-like, C-contiguous array or :class:`BlobParts`, written raw)
        as blob `name`."""
        self._check_open()
        if not isinstance(name, str):
            raise TypeError(f"blob names must be str, got {type(name).__name__}")
        name.encode("utf-8")  # lone surrogates cannot go in a UTF-8 header: fail now
        if name in self._blobs:
            raise ValueError(f"duplicate blob name {name!r}")
        views = byte_views(data)
        length = sum(view.nbytes for view in views)
        offset = blob_offset(self._position, length)
        try:
            crc = self._write_padded(offset, views)
        except OSError as e:
            self.abort()
            raise self._writing_error(e) from e
        except BaseException:  # a partial write would shift every later offset: give up
            self.abort()
            raise
        self._blobs[name] = BlobInfo(offset, length, crc)
        self._position = offset + length

    def _write_padded(self, offset: int, views) -> int:
        self._file.write(bytes(offset - self._position))
        crc = 0
        for view in views:
            for start in range(0, len(view), _IO_CHUNK):
                piece = view[start : start + _IO_CHUNK]
                self._file.write(piece)
                crc = crc32c(piece, crc)
        return crc

    def close(self) -> None:
        """Finishes the file and atomically moves it to `path`."""
        self._check_open()
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._file = None

    def _writing_error(self, e: OSError) -> OSError:
        """``e`` naming the file being written where it names none (found by
        review: a full disk was only "[Errno 28] No space left on device")."""
        if e.filename is not None:
            return e
        why = e.strerror or str(e)
        if self._remote is not None:   # a disk the user never named
            return OSError(e.errno, f"{why} (writing the local temporary copy of "
                           f"{self._remote}, which needs the file's size free in the "
                           "system's temporary directory)", self._temp_path)
        return OSError(e.errno, f"{why} (writing its temporary file {self._temp_path})",
                       str(self.path))

    def _finish(self) -> None:
        header, flags = _encode_header(
            {name: info._asdict() for name, info in self._blobs.items()}, self._metadata)
        header_offset = _align_up(self._position)
        try:
            self._file.write(bytes(header_offset - self._position))
            self._file.write(header)
            self._file.seek(0)
            self._file.write(_pack_preamble(header_offset, len(header), crc32c(header), flags))
            self._file.flush()
            if self._remote is None:
                os.fsync(self._file.fileno())
        except OSError as e:
            raise self._writing_error(e) from e
        interrupts.raise_pending()   # not put in place after a dropped signal
        if self._remote is not None:
            self._upload()
            return
        # Opened before the rename: nothing may fail once the file is in place.
        dir_fd = _open_directory(os.path.dirname(storage.absolute(self._target)))
        try:
            os.replace(self._temp_path, self._target)
            self._file.close()  # releases the lock only now: never unlocked before in place
            if dir_fd is not None:
                os.fsync(dir_fd)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)

    def _upload(self) -> None:
        """Remote targets: the finished local file becomes a temporary object,
        then is moved over `path` (see the class docstring)."""
        fs, inner = storage.filesystem(self._remote)
        temp = f"{inner}.tmp-{secrets.token_hex(8)}"
        try:
            fs.put_file(self._temp_path, temp)
            # One object each: fs.mv and fs.rm expand glob characters and copy
            # into a "directory" (found by review: "run*1.jjpg" saved nothing
            # readable, reported 0 bytes and left the temporary object).
            try:
                fs.cp_file(temp, inner)
            except NotImplementedError:   # FTP, DBFS: no copy, a rename (no globs there)
                fs.mv(temp, inner)
            else:
                fs.rm_file(temp)
        except BaseException as e:
            with contextlib.suppress(Exception):
                fs.rm_file(temp)
            if isinstance(e, Exception) and (not isinstance(e, OSError)
                                             or self._remote not in str(e)):
                # a store's own error type (an HTTP status from aiohttp, say), or
                # an OSError without the name (a server closing mid-body: a bare
                # "Broken pipe"): an OSError naming the file (found by review)
                raise OSError(f"{self._remote}: uploading it: {type(e).__name__}: {e}") from e
            raise
        self._file.close()
        os.unlink(self._temp_path)

    def abort(self) -> None:
        """Discards everything written; the file at `path` is left as it was."""
        # a second signal (a double Ctrl-C) waits for the file to go (review)
        with interrupts.held():
            if self._file is None:
                return
            try:
                self._file.close()
            except OSError:
                pass
            finally:
                self._file = None
                try:
                    os.unlink(self._temp_path)
                except FileNotFoundError:
                    pass

    def _check_open(self) -> None:
        if self._file is None:
            raise ValueError(f"container writer for {self.path} is already closed")

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- reader


class DuplicateKey(ValueError):
    """A JSON object naming ``key`` twice (json.loads would keep the last)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


# A JSON escape of a UTF-16 surrogate (half of a pair, or alone).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for json.loads: DuplicateKey on a repeated name."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    """A JSON number as float; one that overflows (1e999) is refused as the
    writer refuses inf (found by review: read back as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to {value}")
    return value


def _is_uint(value: Any, bits: int = 64) -> bool:
    return type(value) is int and 0 <= value < 2**bits  # type() excludes bool


class ContainerReader:
    """Opens a container and validates its preamble, header and blob table.

    `path` is a local path, os.PathLike or a URL (see jaxjpeg.storage); only byte ranges
    are read (the preamble, the header, then the blobs asked for). Every problem with the
    file raises FormatError; problems reaching it (missing file, permissions, network)
    raise OSError. Blob bytes are read, and checked, only when asked for;
    :meth:`prefetch` reads many at once.
    """

    def __init__(self, path, *, verify_header: bool = True,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.path = storage.as_location(path)
        # A remote file is read again at each range, so a new save there
        # would be read through the old index: its blobs are always checked
        # (found by review: verify=False returned the new file's bytes as the
        # old leaf's values). A local file keeps its descriptor.
        self._remote = storage.local_path(self.path) is None
        self._file = storage.open_source(self.path)
        self._prefetched: dict[str, memoryview] = {}
        try:
            self.file_size = self._file.size
            header_offset, header_length, header_crc = self._read_preamble()
            self._check_header_bounds(header_offset, header_length, max_header_bytes)
            header = self._load_header(header_offset, header_length, header_crc, verify_header,
                                       max_header_bytes)
            self.metadata: dict = header["metadata"]
            self._blobs = self._validate_blob_table(header["blobs"], header_offset)
        except BaseException:
            self._file.close()
            raise

    def _error(self, message: str) -> FormatError:
        return FormatError(f"{self.path}: {message}")

    def _read_preamble(self) -> tuple[int, int, int]:
        if self.file_size < PREAMBLE_SIZE:
            raise self._error(
                f"file has {self.file_size} bytes, less than the {PREAMBLE_SIZE}-byte preamble "
                "(truncated, or not a jaxjpeg container)"
            )
        raw = bytes(self._pread(0, PREAMBLE_SIZE))
        magic, version, flags, header_offset, header_length, header_crc, reserved = (
            _PREAMBLE_BODY.unpack_from(raw)
        )
        if magic != MAGIC:
            raise self._error(f"bad magic {magic!r}, not a jaxjpeg container")
        if version not in READABLE_VERSIONS:
            raise self._error(
                f"unsupported container format version {version}; this jaxjpeg reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (the file is newer than this jaxjpeg, "
                "or damaged)"
            )
        (stored_crc,) = _PREAMBLE_CRC.unpack_from(raw, _PREAMBLE_BODY.size)
        if crc32c(raw[: _PREAMBLE_BODY.size]) != stored_crc:
            raise self._error("preamble checksum mismatch (file damaged)")
        if flags & ~_VERSION_FLAGS[version]:
            raise self._error(f"unknown flags 0x{flags:08x} (version {version} defines "
                              f"0x{_VERSION_FLAGS[version]:x})")
        if reserved != _RESERVED:
            raise self._error("reserved preamble bytes are not zero")
        self._deflated = bool(flags & FLAG_DEFLATED_HEADER)
        self.version = version
        return header_offset, header_length, header_crc

    def _check_header_bounds(self, offset: int, length: int, max_header_bytes: int) -> None:
        if length > max_header_bytes:
            raise self._error(f"header length {length} exceeds the limit of {max_header_bytes}")
        if offset < PREAMBLE_SIZE or offset % ALIGNMENT:
            raise self._error(f"header offset {offset} is not a multiple of {ALIGNMENT} >= 64")
        end = offset + length
        if end > self.file_size:
            raise self._error(
                f"truncated: header ends at byte {end} but the file has {self.file_size} bytes"
            )
        if end < self.file_size:
            raise self._error(f"{self.file_size - end} unexpected bytes after the header")

    def _inflate_header(self, raw: memoryview, max_header_bytes: int) -> memoryview:
        """The JSON of a deflated header, never more than ``max_header_bytes``
        of it (a small stream can inflate to gigabytes)."""
        try:
            text, complete = inflate_at_most(raw, max_header_bytes)
        except ValueError as e:
            raise self._error(f"deflated header {e}") from None
        if len(text) > max_header_bytes:
            raise self._error(f"header inflates past the limit of {max_header_bytes} bytes")
        if not complete:
            raise self._error("deflated header is truncated or has bytes after its end")
        return memoryview(text)

    def _load_header(self, offset: int, length: int, expected_crc: int, verify: bool,
                     max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict:
        raw = self._pread(offset, length)
        if verify and crc32c(raw) != expected_crc:
            # a remote file is read in several requests (found by review: one
            # replaced between them was called damaged)
            raise self._error("header checksum mismatch (file damaged" + (
                ", or replaced while it was opened)" if self._remote else ")"))
        if self._deflated:
            raw = self._inflate_header(raw, max_header_bytes)
        tokens = sum(raw.obj.count(c) for c in (b"{", b"[", b","))
        limit = max(MIN_HEADER_TOKENS, self.file_size // 16)
        if tokens > limit:
            raise self._error(f"header holds {tokens} JSON values, more than the {limit} a "
                              "file of this size may (refused before parsing)")
        try:
            header = json.loads(
                str(raw, "utf-8"),
                object_pairs_hook=reject_duplicate_keys,
                parse_constant=_reject_constant,
                parse_float=_finite_float,
            )
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise self._error(f"header is not valid JSON: {e}") from None
        if _SURROGATE_ESCAPE.search(raw.obj):
            try:   # a pair is one character; a lone half no text holds (found by review:
                json.dumps(header, ensure_ascii=False).encode("utf-8")   # inspect's traceback)
            except UnicodeEncodeError:
                raise self._error("header holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                  "escape): names and metadata must be text") from None
        if not isinstance(header, dict) or header.keys() != _HEADER_KEYS:
            keys = sorted(header) if isinstance(header, dict) else type(header).__name__
            raise self._error(f"header must be an object with keys {sorted(_HEADER_KEYS)}, got {keys}")
        if not isinstance(header["metadata"], dict):
            raise self._error("header 'metadata' must be an object")
        if not isinstance(header["blobs"], dict):
            raise self._error("header 'blobs' must be an object")
        return header

    def _validate_blob_table(self, table: dict, payload_end: int) -> dict[str, BlobInfo]:
        blobs = {}
        alignment = blob_alignment(self.version)
        for name, entry in table.items():
            if not isinstance(entry, dict) or entry.keys() != _BLOB_KEYS:
                raise self._error(f"blob {name!r}: entry must be an object with keys "
                                  f"{sorted(_BLOB_KEYS)}")
            info = BlobInfo(entry["offset"], entry["length"], entry["crc32c"])
            if not (_is_uint(info.offset) and _is_uint(info.length) and _is_uint(info.crc32c, 32)):
                raise self._error(f"blob {name!r}: offset, length and crc32c must be unsigned "
                                  f"integers, got {tuple(info)!r}")
            if info.offset % alignment or info.offset < PREAMBLE_SIZE:
                raise self._error(f"blob {name!r}: offset {info.offset} is not a multiple of "
                                  f"{alignment} >= {PREAMBLE_SIZE} (version {self.version})")
            if info.offset + info.length > payload_end:
                raise self._error(f"blob {name!r}: bytes [{info.offset}, "
                                  f"{info.offset + info.length}) run past the payload end {payload_end}")
            blobs[name] = info
        by_offset = sorted(blobs.items(), key=lambda item: (item[1].offset, item[1].length))
        for (name_a, a), (name_b, b) in zip(by_offset, by_offset[1:]):
            if a.offset + a.length > b.offset:
                raise self._error(f"blobs {name_a!r} and {name_b!r} overlap")
        return dict(by_offset)

    def _pread(self, offset: int, length: int, out=None) -> memoryview:
        """Reads exactly [offset, offset + length) into `out` (or a new buffer)."""
        view = memoryview(bytearray(length) if out is None else out).cast("B")
        if len(view) != length:
            raise ValueError(f"out has {len(view)} bytes, expected {length}")
        if self._file.readinto(offset, view) != length:
            raise self._error(f"file shrank while reading bytes [{offset}, {offset + length})")
        return view

    @contextlib.contextmanager
    def prefetch(self, names):
        """Inside the block, the blobs `names` are in memory: read at once, as
        few ranges (neighbours merged) cut in pieces read in parallel, so a
        remote store has many requests in flight. read_blob serves them from
        memory (still checking checksums); memory: the blobs' bytes, freed on exit."""
        self._check_open()
        names = [n for n in dict.fromkeys(names) if n not in self._prefetched]
        views = self._read_many([self._blobs[n] for n in names])
        self._prefetched.update(zip(names, views))
        try:
            yield
        finally:
            for name in names:
                self._prefetched.pop(name, None)

    def _read_many(self, infos: list[BlobInfo]) -> list[memoryview]:
        """The bytes of every blob in `infos`, read concurrently (see prefetch)."""
        order = sorted(range(len(infos)), key=lambda i: infos[i].offset)
        spans: list[list[int]] = []  # [start, end) of each merged range
        for i in order:
            start, end = infos[i].offset, infos[i].offset + infos[i].length
            if spans and start - spans[-1][1] <= _MERGE_GAP:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        buffers = [np.empty(end - start, np.uint8) for start, end in spans]
        pieces = [(start + at, buffer[at:at + _READ_PIECE])
                  for (start, _), buffer in zip(spans, buffers)
                  for at in range(0, len(buffer), _READ_PIECE)]
        list(_io_pool().map(lambda piece: self._pread(piece[0], len(piece[1]), piece[1]),
                            pieces))
        starts = [start for start, _ in spans]
        views = []
        for info in infos:
            k = int(np.searchsorted(starts, info.offset, side="right")) - 1
            at = info.offset - starts[k]
            views.append(memoryview(buffers[k][at:at + info.length]).toreadonly())
        return views

    @property
    def blob_names(self) -> tuple[str, ...]:
        """Blob names in file order (the order they were added)."""
        return tuple(self._blobs)

    def blob_info(self, name: str) -> BlobInfo:
        return self._blobs[name]

    def read_blob(self, name: str, *, verify: bool = True, out=None) -> memoryview:
        """Reads one blob's bytes (only its range); `out`, if given, is a writable buffer of
        exactly the blob's length to read into (e.g. an aligned or pinned array)."""
        self._check_open()
        info = self._blobs[name]
        view = self._prefetched.get(name)
        if view is None and out is not None and info.length > _READ_PIECE:
            # straight into `out`, a large blob in pieces read in parallel
            view = memoryview(out).cast("B")
            if len(view) != info.length:
                raise ValueError(f"out has {len(view)} bytes, expected {info.length}")
            if read_in_pieces(self._file.readinto, info.offset, view) != info.length:
                raise self._error(f"file shrank while reading blob {name!r}")
        elif view is None:
            view = self._pread(info.offset, info.length, out)
        elif out is not None:
            view = _copy_into(out, view)
        if (verify or self._remote) and crc32c(view) != info.crc32c:
            # found by review: said "damaged", while verify, opening the new
            # file, said OK
            why = ("damaged, or the file was replaced since it was opened" if self._remote
                   else "damaged")
            raise self._error(f"blob {name!r} checksum mismatch (bytes [{info.offset}, "
                              f"{info.offset + info.length}) {why})")
        return view.toreadonly() if out is None else view

    def read_range(self, offset: int, length: int) -> bytes:
        """Reads raw bytes [offset, offset + length), which must lie inside the file."""
        self._check_open()
        offset, length = operator.index(offset), operator.index(length)
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise ValueError(f"range ({offset!r}, {length!r}) is outside {self.path} "
                             f"({self.file_size} bytes)")
        return bytes(self._pread(offset, length))

    def verify(self) -> list[tuple[str, bool]]:
        """Checks every blob's checksum, reading in bounded chunks; never raises on a mismatch."""
        return [(name, self.checksum_matches(name)) for name in self._blobs]

    def checksum_matches(self, name: str) -> bool:
        """Whether blob `name`'s bytes match its checksum: a prefetched blob
        checked in memory, others read in bounded chunks. Never raises on a mismatch."""
        self._check_open()
        info = self._blobs[name]
        view = self._prefetched.get(name)
        if view is not None:
            return crc32c(view) == info.crc32c
        crc = 0
        for start in range(0, info.length, _IO_CHUNK):
            size = min(_IO_CHUNK, info.length - start)
            crc = crc32c(self._pread(info.offset + start, size), crc)
        return crc == info.crc32c

    def close(self) -> None:
        self._file.close()

    def _check_open(self) -> None:
        if self._file.closed:
            raise ValueError(f"container reader for {self.path} is closed")

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _copy_into(out, data: memoryview) -> memoryview:
    view = memoryview(out).cast("B")
    if len(view) != len(data):
        raise ValueError(f"out has {len(view)} bytes, expected {len(data)}")
    view[:] = data
    return view


_IO_POOL = SharedPool(lambda: READ_CONCURRENCY, "jaxjpeg-read")


def _io_pool() -> ThreadPoolExecutor:
    """The threads every reader shares for concurrent reads (made on first use)."""
    return _IO_POOL.get()


def read_in_pieces(read_into, offset: int, buffer) -> int:
    """Fills ``buffer`` from ``offset`` through ``read_into(offset, view) ->
    bytes read``, in pieces of at most _READ_PIECE read concurrently on the
    shared I/O threads (one call when it fits in one piece); the bytes read."""
    view = memoryview(buffer)
    if len(view) <= _READ_PIECE:
        return read_into(offset, view)
    return sum(_io_pool().map(lambda at: read_into(offset + at, view[at:at + _READ_PIECE]),
                              range(0, len(view), _READ_PIECE)))
