"""Where checkpoint files live: local paths, and fsspec URLs for everything else.

A *location* is what every entry point accepts: a ``str`` or ``bytes`` path,
an ``os.PathLike`` (``pathlib.Path``, a local ``etils.epath.Path``), or a URL
(``memory://``, ``gs://``, ``s3://``, ``https://`` ..., or an ``epath.Path``
naming one). Local paths (and ``file://`` URLs) go through ``os`` calls, as
they always did; URLs go through fsspec, an optional dependency (``pip install
jaxjpeg[remote]``, plus the store's backend such as gcsfs or s3fs). Nothing
here imports fsspec until a URL is used, so the core works without it.

Reads are ranged: :class:`RangeSource` reads byte ranges of a file, local
(``os.preadv``) or remote (one ranged request per read), and is safe to use
from several threads at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import urllib.parse
import re

__all__ = ["RangeSource", "as_location", "exists", "filesystem", "is_dir", "join", "kind",
           "listdir", "local_path", "open_source", "scheme", "size", "to_absolute"]

# "gs://...", or fsspec's chained URLs, "simplecache::gs://..." (found by
# review: taken for local paths), whose scheme is the first protocol's
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)(?:::[A-Za-z][A-Za-z0-9+.-]*)*://")


def as_location(path) -> str:
    """``path`` as a string: a local path (``os.fspath``) or a URL.

    ``etils.epath.Path`` objects naming ``gs://`` and the like are accepted
    through ``str()``, which gives their URL.
    """
    if isinstance(path, str):
        return path
    if isinstance(path, bytes):
        return os.fsdecode(path)
    text = str(path)
    if _SCHEME.match(text):  # epath.Path("gs://b/x"): its str() is the URL
        return text
    try:
        location = os.fspath(path)
    except TypeError:
        raise TypeError(f"expected a path or URL, got {type(path).__name__}") from None
    return location if isinstance(location, str) else os.fsdecode(location)


def scheme(location: str) -> str | None:
    """A URL's scheme in lower case (``"gs"``, ``"https"``...), None for a plain path."""
    match = _SCHEME.match(location)
    return None if match is None else match.group(1).lower()


@contextlib.contextmanager
def naming_write_errors(path: str, temp: str | None = None):
    """An OSError of a write that names no file (a full disk: "[Errno 28] No
    space left on device", found by review), or names ``temp``, the
    temporary file written for ``path`` (review: "model.safetensors.tmp-e626f30a:
    Permission denied", a name the user never gave), names ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and temp is not None and e.filename == temp:
            raise type(e)(e.errno, f"cannot write: {e.strerror} (creating a file in "
                          f"{os.path.dirname(temp) or '.'!r})", path) from None
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from None
        raise


def refuse_special_file(path: str, shown=None) -> None:
    """OSError for a local ``path`` that is there and is neither a regular
    file nor a directory (a device, a FIFO, a socket; through symlinks):
    a save or an export would replace it by a file, and opening a FIFO waits
    for a writer (found by review: a save replaced a device node, and
    inspect of a FIFO never returned)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISDIR(mode):
        _refuse_special_mode(mode, path if shown is None else shown)


def _refuse_special_mode(mode: int, shown: str) -> None:
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket)", shown)


def item_hint(directory: str) -> str:
    """Where a directory given for a checkpoint file holds one: an Orbax
    item's, or a step's items' (found by review: a bare IsADirectoryError
    where the command line named the file)."""
    from jaxjpeg.sources import JAXJPEG_ITEM_FILE

    try:
        if exists(join(directory, JAXJPEG_ITEM_FILE)):
            return f" (an Orbax item: give {join(directory, JAXJPEG_ITEM_FILE)})"
        items = [name for name in sorted(listdir(directory))[:16]   # a request each, remote
                 if exists(join(join(directory, name), JAXJPEG_ITEM_FILE))]
    except OSError:
        return ""
    if items:
        return (f" (an Orbax step: give one of its items' files, e.g. "
                f"{join(join(directory, items[0]), JAXJPEG_ITEM_FILE)})")
    return ""


def _open_regular(path: str):
    """``path`` opened for reading, unbuffered, refused unless a regular
    file (without waiting for a FIFO's writer: opened non-blocking first)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR) + item_hint(path),
                                    path)
        _refuse_special_mode(mode, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def same_entry(a: str, b: str) -> bool:
    """Whether local paths ``a`` and ``b`` name one directory entry (symlinks
    followed; a bind mount or another path to the same directory too): the
    entry a write to ``b`` replaces. A hard link elsewhere is another entry
    (found by review: refused, though the source survives its replacing)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return (os.path.basename(a) == os.path.basename(b)
            and os.path.samefile(os.path.dirname(a), os.path.dirname(b)))


def written_location(location: str) -> str:
    """Where a write to ``location`` lands: a chained URL's last
    (``simplecache::gs://b/o`` writes ``gs://b/o``), a ``local://`` URL's
    path (found by review: a source compress refused to replace as
    ``memory://m/s.npz`` or ``/d/s.npz`` it replaced as
    ``simplecache::memory://m/s.npz`` or ``local:///d/s.npz``)."""
    last = location.rsplit("::", 1)[-1]
    return last[len("local://"):] if scheme(last) == "local" else last


def stored_entry(location: str) -> tuple[str, str]:
    """A URL's store and path in it, as one key: ``memory://m/a`` and
    ``memory:///m/a`` (or ``gs://`` and ``gcs://`` of one object) name one
    entry. The store is its file system's kind (options aside: two sets of
    credentials for one bucket are taken as one store)."""
    fs, inner = filesystem(location)
    return type(fs).__qualname__, fs._strip_protocol(inner).rstrip("/")


def local_path(location: str) -> str | None:
    """The local file-system path of a location, or None for a remote URL."""
    match = _SCHEME.match(location)
    if match is None:
        return location
    if match.group(1).lower() == "file" and "::" not in match.group(0):
        rest = location[len("file://"):]
        # file://localhost/PATH names the local /PATH (RFC 8089; found by review)
        rest = rest[len("localhost"):] if rest.lower().startswith("localhost/") else rest
        # percent-decoded as pathlib's as_uri() encodes: "a%20b" names "a b"
        return urllib.parse.unquote(rest)
    return None


def to_absolute(path) -> str:
    """A local path made absolute (what Orbax insists on); URLs as they are."""
    location = as_location(path)
    local = local_path(location)
    return location if local is None else absolute(local)


def absolute(path: str) -> str:
    """``path`` absolute, as the system reads it: after a symlink, ``..`` is
    the parent of the link's target, where ``os.path.abspath`` cancels the
    two and names another file (found by review: ``compress src
    lnk/../o.jjpg`` wrote where ``open()`` does not look). Where its folder
    is there, that folder's real path (every reader, Orbax's text-normalised
    paths too, then names one place) and the last name as given (a link
    there is what a save replaces the target of); else joined to the working
    directory as given, to fail where the system fails (``missing/..`` is no
    folder, though ``os.path.realpath`` reads it as one)."""
    joined = as_typed(path)
    head, tail = os.path.split(joined)
    if tail in ("", ".", ".."):
        return os.path.realpath(joined) if os.path.isdir(joined) else joined
    return os.path.join(os.path.realpath(head), tail) if os.path.isdir(head) else joined


def as_typed(path: str) -> str:
    """``path`` joined to the working directory, its ".." and "." as typed."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


# A web server that sends no byte of an answer for this long fails the read
# (found by review: a stalled server held a restore 300 s, aiohttp's whole-
# request limit, which also failed answers still arriving after 300 s).
HTTP_READ_TIMEOUT = 60.0


def filesystem(location: str):
    """(fsspec file system, path inside it) for a URL; a clear ImportError
    naming the extra to install when fsspec (or the store's backend) is missing."""
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{location}: reading or writing URLs needs fsspec "
                          "(pip install 'jaxjpeg[remote]')") from None
    try:
        return fsspec.core.url_to_fs(location, **_http_options(location))
    except ImportError as e:  # e.g. gcsfs, s3fs, aiohttp not installed
        raise ImportError(f"{location}: {e}") from None


def _http_options(location: str) -> dict:
    """fsspec's HTTP options: each read fails after HTTP_READ_TIMEOUT without
    a byte, however long the whole answer takes."""
    if not location.lower().startswith(("http://", "https://")):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(
        total=None, sock_connect=HTTP_READ_TIMEOUT, sock_read=HTTP_READ_TIMEOUT)}}


def _ask(path, on_local, on_store):
    """``on_local(local path)`` for a local path, else ``on_store(fs, path in fs)``."""
    location = as_location(path)
    local = local_path(location)
    if local is not None:
        return on_local(local)
    return on_store(*filesystem(location))


def kind(path) -> str | None:
    """``"file"``, ``"directory"`` or None (nothing there). Remote stores are
    asked for the entry's info (an HTTP HEAD): never a listing or a GET,
    which on a web server would download the file."""
    def local(p):
        return "directory" if os.path.isdir(p) else "file" if os.path.exists(p) else None

    def remote(fs, inner):
        try:
            info = fs.info(inner)
        except FileNotFoundError as e:
            cause = not_found_for_its_cause(e, as_location(path), "asking for it")
            if isinstance(cause, FileNotFoundError):
                return None
            raise cause from e   # a 403 or a server down read "no such file" (review)
        return "directory" if info.get("type") == "directory" else "file"
    return _ask(path, local, remote)


def exists(path) -> bool:
    return kind(path) is not None


def is_dir(path) -> bool:
    return kind(path) == "directory"


def listdir(path) -> list[str]:
    """The names in a directory (sorted); web servers have no listing to give."""
    def remote(fs, inner):
        if scheme(as_location(path)) in ("http", "https"):
            raise OSError(f"{as_location(path)}: a web server has no directory listing; "
                          "give a file's URL")
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(inner, detail=False)]
    return sorted(_ask(path, os.listdir, remote))


def size(path) -> int:
    return _ask(path, os.path.getsize, lambda fs, inner: int(fs.size(inner)))


def join(directory, name: str) -> str:
    """``directory/name`` for local paths and URLs alike."""
    location = as_location(directory)
    if _SCHEME.match(location):  # URLs, file:// included, join with "/"
        if local_path(location) is not None:   # a file URL's path is percent-decoded
            name = urllib.parse.quote(name)
        parts = urllib.parse.urlsplit(location)
        if parts.query or parts.fragment:   # into the path, not the query (review: ?download=1)
            return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/"
                                                          + name))
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


class RangeSource:
    """A file read by byte ranges: ``size``, ``readinto(offset, view)``, ``close()``.

    ``readinto`` returns the number of bytes read, fewer than asked only at
    the end of the file. Several threads may read at once.
    """

    def __init__(self, location: str):
        self.name = location
        local = local_path(location)
        if local is not None:
            self._file = _open_regular(local)
            self._fs = None
            self.size = os.fstat(self._file.fileno()).st_size
        else:
            self._fs, self._inner = filesystem(location)
            self._file = None
            self._closed = False
            info = self._remote_call("reading its size", self._fs.info, self._inner)
            if info.get("type") == "directory":
                raise IsADirectoryError(f"{location}: is a directory{item_hint(location)}")
            if info.get("size") is None:
                raise OSError(f"{location}: the server does not report the file's size "
                              "(ranged reads need it)")
            self.size = int(info["size"])
            self._fetch = self._range_fetcher()

    @property
    def closed(self) -> bool:
        return self._file.closed if self._fs is None else self._closed

    def readinto(self, offset: int, view: memoryview) -> int:
        if self._fs is None:
            done = 0
            while done < len(view):
                n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
            return done
        if not len(view):
            return 0
        done = 0
        while done < len(view):   # a server may answer part of a range (review: 64 KiB a time)
            start, end = offset + done, offset + len(view)
            data = self._remote_call(f"reading bytes [{start}, {end})", self._fetch, start, end)
            if len(data) > end - start:  # e.g. an HTTP server answering 200 with the whole file
                raise OSError(f"{self.name}: the store answered a request for {end - start} "
                              f"bytes with {len(data)} (it ignores ranged reads, which jaxjpeg "
                              "needs)")
            if not data:
                break
            view[done:done + len(data)] = data
            done += len(data)
        return done

    def _range_fetcher(self):
        """fetch(start, end) -> bytes, safe from several threads. On a web
        server, fsspec's file object fetches a range and refuses an answer
        that is not one without reading it (its file system's ``cat_file``
        would read a whole file a server sends instead of the range)."""
        if "http" not in self._fs.protocol:
            return lambda start, end: self._fs.cat_file(self._inner, start=start, end=end)
        file = self._remote_call("opening it", self._fs.open, self._inner, "rb",
                                 cache_type="none", size=self.size)

        def fetch(start: int, end: int) -> bytes:
            try:   # _fetch_range is stateless: no seek position shared between threads
                return file._fetch_range(start, end)
            except ValueError as e:   # a whole-file answer to a ranged request, unread
                raise OSError(f"{self.name}: the server ignores ranged reads, which jaxjpeg "
                              f"needs ({e})") from None
        return fetch

    def _remote_call(self, what: str, fn, *args, **kwargs):
        """fn(...), with any failure of the store (HTTP status, connection,
        backend errors of every kind) as an OSError naming the file."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:
            raise not_found_for_its_cause(e, self.name, what) from e
        except OSError as e:
            if self.name in str(e):
                raise
            # found by review: a stalled server's FSTimeoutError printed as its
            # bare name, without the file or what was being read
            raise OSError(e.errno or errno.EIO, f"{what}: {type(e).__name__}"
                          + (f": {e}" if str(e) else ""), self.name) from e
        except Exception as e:
            raise OSError(f"{self.name}: {what}: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        if self._fs is None:
            self._file.close()
        else:
            self._closed = True


def not_found_for_its_cause(e: FileNotFoundError, name: str, what: str) -> OSError:
    """fsspec's HTTP store reports every failure to find a file's size as
    FileNotFoundError(url): a 403 and a server that is down read as "no
    such file". The cause it chains says which."""
    cause = e.__cause__ or e.__context__
    if cause is None or isinstance(cause, FileNotFoundError):
        # naming the file as the user wrote it (found by review: memory://'s
        # was the store's bare inner path, filename None)
        return e if e.filename == name else FileNotFoundError(
            errno.ENOENT, f"{what}: no such file", name)
    detail = f"{what}: {type(cause).__name__}: {cause}"
    status = getattr(cause, "status", None)
    if status == 404:
        return FileNotFoundError(errno.ENOENT, detail, name)
    if status in (401, 403):
        return PermissionError(errno.EACCES, detail, name)
    return OSError(errno.EIO, detail, name)


def open_source(path) -> RangeSource:
    return RangeSource(as_location(path))
