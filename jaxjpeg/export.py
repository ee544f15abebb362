"""Writing a checkpoint's decoded weights back as safetensors (``jaxjpeg export``).

The safetensors layout is small and fixed: an 8-byte little-endian header
length, a JSON header (``{name: {"dtype", "shape", "data_offsets"}, ...,
"__metadata__": {str: str}}``, padded with spaces to a multiple of 8 bytes),
then the tensors' bytes back to back. Every shape and dtype is known from the
checkpoint's header before anything is decoded, so the header is written
first and each leaf is decoded and written in turn: memory stays at about one
decoded leaf, whatever the model's size.

Larger than ``max_shard_size``, the weights go to shards named as Hugging
Face names them (``model-00001-of-00003.safetensors``) next to an index
(``model.safetensors.index.json``: ``{"metadata": {"total_size": N},
"weight_map": {name: shard}}``), which ``transformers`` and
``safetensors`` users read as is.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import secrets
from typing import Callable

import numpy as np

from jaxjpeg import sources
from jaxjpeg.dtypes import packed_nbytes, value_bits
from jaxjpeg.layout import pack_low_bits

__all__ = ["export_safetensors", "parse_size", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9   # bytes; transformers' default shard size

# numpy dtype name -> safetensors dtype (and back, in sources).
SAFETENSORS_DTYPES = {name: kind for kind, name in sources.SAFETENSORS_DTYPES.items()}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000``
    (KB, MB, GB, TB: powers of 1000, as transformers counts; KiB...: of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    size = int(number * scale)
    if size < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return size


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Its bytes in the file: sub-byte values packed (safetensors' F4)."""
        return packed_nbytes(math.prod(self.shape), self.dtype)


def safetensors_metadata(user: dict) -> dict[str, str]:
    """A checkpoint's user metadata as safetensors' ``__metadata__`` (str to str):
    string values as they are, others as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in user.items()}


def decode_on_host(ckpt, leaf) -> np.ndarray:
    """One leaf as numpy, in its dtype: a raw leaf as stored, a coded one
    decoded by the native decoder on the host's cores (the same bits as
    restore gives on any device)."""
    from jaxjpeg import codec
    from jaxjpeg.checkpoint_restore import add_whole_leaf

    if leaf.kind == "raw":
        return ckpt.read_raw(leaf)
    builder = codec.PlanBuilder()
    add_whole_leaf(builder, ckpt, leaf, leaf.dtype)
    (matrix,) = codec.run_plan(builder.finish())
    # a float64 leaf decodes as float32 (codec.written_dtype): back in its
    # dtype before its kept values go in (found by review: export refused it)
    matrix = matrix.astype(leaf.dtype, copy=False)
    return codec.restore_view(matrix, leaf.shape, leaf.view, ckpt.read_outliers(leaf))


def _shards(tensors: list[_Tensor], max_shard_size: int) -> list[list[_Tensor]]:
    """Tensors in order, cut into shards of at most ``max_shard_size`` bytes (a
    larger tensor gets a shard of its own)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[_Tensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype.name], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def _write_shard(path: str, tensors: list[_Tensor], metadata: dict[str, str],
                 decode: Callable[[str], np.ndarray], progress) -> None:
    header = _header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for t in tensors:
            array = np.asarray(decode(t.name), order="C")  # 0-d stays 0-d (ascontiguousarray: 1-d)
            if array.shape != t.shape or array.dtype != t.dtype:
                raise ValueError(f"{t.name}: decoded {array.dtype}{list(array.shape)}, "
                                 f"expected {t.dtype}{list(t.shape)}")
            bits = value_bits(array.dtype)
            f.write(memoryview(array.reshape(-1).view(np.uint8)) if bits % 8 == 0
                    else pack_low_bits(array, bits))
            progress.update(t.nbytes)
        f.flush()
        os.fsync(f.fileno())


def _outputs(out: str, count: int) -> tuple[list[str], str | None]:
    """(shard paths, index path or None) for ``out``: a ``.safetensors`` file
    name, or a directory receiving ``model.safetensors``."""
    directory, stem = _directory_and_stem(out)
    if count == 1:
        return [os.path.join(directory, f"{stem}.safetensors")], None
    names = [f"{stem}-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    return ([os.path.join(directory, n) for n in names],
            os.path.join(directory, f"{stem}.safetensors.index.json"))


def _directory_and_stem(out: str) -> tuple[str, str]:
    if out.endswith(".safetensors"):
        return os.path.dirname(out) or ".", os.path.basename(out)[:-len(".safetensors")]
    return out, "model"


def _refuse_replacing_the_checkpoint(checkpoint_path, written: list[str]) -> None:
    """Refuses an export that would write over or remove the checkpoint it
    reads (found by review: ``export c.safetensors c.safetensors --force``
    replaced the checkpoint with its export, and a checkpoint named
    ``model.safetensors`` in the output directory was removed as an earlier
    export)."""
    from jaxjpeg import storage

    local = storage.local_path(storage.as_location(checkpoint_path))
    if local is None:
        return
    for path in written:
        if os.path.exists(path) and storage.same_entry(local, path):
            raise ValueError(f"{path}: is the checkpoint being exported: the export would "
                             "replace or remove it (choose another output)")


def _check_destination(out: str) -> None:
    """Clear errors for a destination that cannot be written (found by
    review: the messages named the internal temporary file, or were a bare
    'File exists')."""
    if out.endswith(".safetensors"):
        directory = os.path.dirname(out) or "."
        if os.path.exists(directory) and not os.path.isdir(directory):   # (review)
            raise NotADirectoryError(errno.ENOTDIR, f"{directory} is a file, not a directory", out)
        if not os.path.isdir(directory):
            raise FileNotFoundError(errno.ENOENT, "its directory does not exist", out)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory (name a "
                                 ".safetensors file, or a directory)", out)


def _earlier_export(out: str) -> list[str]:
    """The files of an export to ``out`` already there, with any number of
    shards: ``STEM.safetensors``, its index and ``STEM-NNNNN-of-NNNNN``
    shards. A new export replaces all of them: an index left behind would
    name shards of the old weights."""
    directory, stem = _directory_and_stem(out)
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(directory, n) for n in names
                  if n in (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
                  or shard.fullmatch(n))


def _put_in_place(temps: list[str], finals: list[str], stale: list[str]) -> None:
    """Renames each temp to its final name, the index (last of ``finals``)
    last, and removes the earlier export's other files: its entry points (an
    index, or a single file, which readers take before an index) before the
    new files appear, its shards after."""
    shards = [p for p in stale if not p.endswith(".index.json")
              and re.search(r"-\d{5}-of-\d{5}\.safetensors$", p)]
    for path in stale:
        if path not in shards:
            os.unlink(path)
    for temp, final in zip(temps, finals):
        os.replace(temp, final)
    for path in shards:
        os.unlink(path)


def _first_missing(directory: str) -> str | None:
    """The outermost of ``directory`` and its parents that does not exist."""
    missing, path = None, os.path.abspath(directory)
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_made(directory: str, made: str | None) -> None:
    """Removes ``directory`` and its parents up to ``made``, those left empty."""
    if made is None:
        return
    path = os.path.abspath(directory)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == made:
            return
        path = os.path.dirname(path)


def export_safetensors(checkpoint_path, out: str, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                       force: bool = False, progress=None) -> list[str]:
    """Writes the decoded leaves of ``checkpoint_path`` as safetensors; returns
    the files written (shards first, then the index, if any).

    ``out`` is a ``.safetensors`` file name or a directory (created; it gets
    ``model.safetensors``). Tensors are named by their leaf paths
    (``params/Dense_0/kernel``; a safetensors file compressed by ``jaxjpeg
    compress`` keeps its own names) and keep their dtypes; the checkpoint's
    user metadata becomes ``__metadata__``. Each file is written under a
    temporary name and renamed when complete, the index last: a reader sees
    the index only once every shard it names is in place. With ``force``,
    an earlier export there (any number of shards) is replaced whole.
    """
    from jaxjpeg import interrupts, storage
    from jaxjpeg.checkpoint_reader import Checkpoint
    from jaxjpeg.progress import progress as progress_bar

    with Checkpoint(os.fspath(checkpoint_path)) as ckpt:
        leaves = {leaf.path: leaf for leaf in ckpt.leaves}
        tensors = [_Tensor(leaf.path, leaf.shape, leaf.dtype) for leaf in ckpt.leaves]
        unsupported = [t for t in tensors if t.dtype.name not in SAFETENSORS_DTYPES]
        if unsupported:
            raise ValueError(f"{unsupported[0].name}: safetensors has no dtype "
                             f"{unsupported[0].dtype}")
        # safetensors reads sub-byte tensors whole bytes at a time (review: a (7,)
        # float4 leaf was written, and the file refused by safetensors 0.8)
        odd = [t for t in tensors if packed_nbytes(math.prod(t.shape), t.dtype) * 8
               != math.prod(t.shape) * value_bits(t.dtype)]
        if odd:
            raise ValueError(f"{odd[0].name}: {math.prod(odd[0].shape)} {odd[0].dtype} values do "
                             f"not fill whole bytes, which safetensors' "
                             f"{SAFETENSORS_DTYPES[odd[0].dtype.name]} needs")
        if "__metadata__" in leaves:   # found by review: written over the metadata's key
            raise ValueError("__metadata__: a leaf of this name cannot be a safetensors "
                             "tensor (the name holds the file's metadata)")
        metadata = safetensors_metadata(ckpt.user_metadata)
        shards = _shards(tensors, max_shard_size)
        paths, index_path = _outputs(out, len(shards))
        _check_destination(out)
        made = None   # the outermost directory this export creates
        if not out.endswith(".safetensors"):
            made = _first_missing(out)
            os.makedirs(out, exist_ok=True)
        existing = _earlier_export(out)
        finals = paths + ([index_path] if index_path else [])
        _refuse_replacing_the_checkpoint(checkpoint_path, finals + existing)
        for path in finals + existing:   # a device or FIFO would become a file
            storage.refuse_special_file(path)
        if existing and not force:
            written = [p for p in existing if p in finals]
            if written:
                raise FileExistsError(f"{written[0]}: exists (use --force to replace it)")
            # (found by review: named as if written over)
            raise FileExistsError(f"{existing[0]}: exists, a file of an earlier export this one "
                                  "would remove (use --force to replace that export)")

        def decode(name):
            return decode_on_host(ckpt, leaves[name])

        bar = progress_bar(total=sum(t.nbytes for t in tensors), desc="export", unit="B",
                           enabled=progress)
        temps = []
        try:
            for path, shard in zip(paths, shards):
                temps.append(f"{path}.tmp-{secrets.token_hex(8)}")
                with storage.naming_write_errors(path, temps[-1]):
                    _write_shard(temps[-1], shard, metadata, decode, bar)
            if index_path is not None:
                temps.append(f"{index_path}.tmp-{secrets.token_hex(8)}")
                index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                         "weight_map": {t.name: os.path.basename(p)
                                        for p, shard in zip(paths, shards) for t in shard}}
                with storage.naming_write_errors(index_path, temps[-1]), \
                        open(temps[-1], "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=2, ensure_ascii=False)
            interrupts.raise_pending()   # not put in place after a dropped signal
            with interrupts.held():   # all renamed or none (review: shards mixed)
                _put_in_place(temps, finals, [p for p in existing if p not in finals])
        except BaseException:
            for temp in temps:
                if os.path.exists(temp):
                    os.unlink(temp)
            _remove_made(out, made)   # found by review: left behind, empty
            raise
        finally:
            bar.close()
    return paths + ([index_path] if index_path else [])
