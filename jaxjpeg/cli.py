"""The ``jaxjpeg`` command: compress, export, inspect, verify and extract checkpoints.

    jaxjpeg compress SRC DST [--quant-step S | --quality Q | --target-ratio R |
                             --bits-per-weight B | --error-bound E] [--bits 8|12]
                             [--item NAME]
    jaxjpeg export CKPT OUT [--max-shard-size 5GB]
    jaxjpeg inspect CKPT [--source SRC [--item NAME ...]]
    jaxjpeg verify CKPT
    jaxjpeg extract CKPT OUTDIR [--leaf PATTERN]

SRC is an Orbax checkpoint directory (a ``StandardCheckpointer`` /
``PyTreeCheckpointer`` item, a ``CheckpointManager`` step directory, or a
``CheckpointManager`` root, whose latest step is taken; ``--item`` chooses
items), a Flax msgpack file (``flax.serialization.to_bytes``), a ``.npz``
file (``numpy.savez``), a ``.safetensors`` file, or a sharded safetensors
checkpoint (its ``*.safetensors.index.json``, or a folder of
``*.safetensors`` shards, with or without the index); safetensors
``__metadata__`` becomes the checkpoint's user metadata, and ``export``
writes it back. Paths may be relative; SRC, DST and CKPT may also be URLs
(``https://``, ``gs://``, ``memory://`` ..., with fsspec): safetensors and
npz sources are read one tensor at a time with ranged reads (over HTTP give
the index json's URL: web servers list no folders); Orbax sources from
local paths, ``gs://`` or ``s3://`` (what Orbax reads) or web servers (an
item's URL, or a step's with ``--item``; tensorstore's HTTP store), not
from other fsspec stores such as ``memory://``.

Exit status (errors are one line on stderr, without a traceback):
  0  success
  1  damaged input: ``verify`` found damage, or a checkpoint or source is
     truncated, corrupt or not what the command expects
  2  usage error: bad arguments or option values (checked before any input
     is read), DST exists without --force, nothing to do
  3  I/O error: an input is missing or unreadable, an output cannot be
     written, a remote store cannot be reached
  130 interrupted (Ctrl-C); 143 and 129 ended by SIGTERM and SIGHUP (the
      output left as before, temporary files removed, as for Ctrl-C)
  141 the reader of standard output closed it (``| head``), quietly

``jaxjpeg --help`` and ``jaxjpeg --version`` answer without importing jax.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib
import json
import math
import os
import re
import signal
import sys
import warnings
from typing import Any, Iterable

import numpy as np

from jaxjpeg import interrupts
from jaxjpeg.progress import progress

__all__ = ["EXIT_DAMAGED", "EXIT_IO", "EXIT_OK", "EXIT_USAGE", "main", "load_source"]

PROG = "jaxjpeg"
EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2
EXIT_IO = 3
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141   # as a shell reports a command SIGPIPE ended


def load_source(path: str):
    """jaxjpeg.sources.load_source, imported when a command needs it (it
    imports ml_dtypes, over a second on a slow machine: not for --help)."""
    from jaxjpeg.sources import load_source as load
    return load(path)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2 (usage)."""


# ---------------------------------------------------------------- helpers


def _use_cpu() -> None:
    """The CLI decodes on the host: keep jax off accelerators unless the user
    chose (JAX_PLATFORMS). main() calls this before anything starts a jax
    backend; once one has started the setting no longer matters."""
    with interrupts.held():
        import jax
        importlib.import_module("jaxjpeg.checkpoint")   # the rest of the heavy imports
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _require(path: str, *, kind: str = "path") -> None:
    """A missing input is an I/O error (exit 3); a directory given for a file, usage (2)."""
    from jaxjpeg import storage
    if not storage.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", path)
    if kind == "file" and storage.is_dir(path):
        raise CliError(f"{path}: is a directory, expected a jaxjpeg checkpoint file"
                       f"{storage.item_hint(path)}")


def _open_checkpoint(path: str, verify: bool = True):
    from jaxjpeg.checkpoint_reader import Checkpoint
    _require(path, kind="file")
    return Checkpoint(path, verify=verify)


def _flatten(tree) -> list[tuple[str, Any]]:
    """(slash-separated path, leaf) as jaxjpeg names leaves."""
    from jaxjpeg.treepaths import leaves_with_paths, path_string
    return [(path_string(records), leaf) for records, leaf in leaves_with_paths(tree)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


# ---------------------------------------------------------------- compress


RATE_OPTIONS = ("quant_step", "quality", "target_ratio", "bits_per_weight", "error_bound")


def _refuse_replacing_the_source(dst, read: list) -> None:
    """Refuses a DST that is a file the source reads (found by review:
    ``compress m.safetensors m.safetensors --force`` replaced the original
    with its lossy checkpoint; through a symlink too)."""
    from jaxjpeg import storage
    target = storage.local_path(storage.written_location(storage.as_location(dst)))
    if target is None:
        return _refuse_replacing_a_stored_source(storage.as_location(dst), read)
    if not os.path.exists(target):
        return
    for location in read:
        local = storage.local_path(storage.written_location(storage.as_location(location)))
        if local is not None and os.path.isfile(local) and storage.same_entry(local, target):
            raise CliError(f"{dst}: is the source's file {location} itself: compress writes "
                           "a new file beside it (choose another DST)")
        if (local is not None and os.path.isdir(local) and _inside(target, local)
                and not _is_checkpoint(target)):
            # found by review: --force into an Orbax item replaced its _METADATA
            # or a data file with the checkpoint, and the item no longer read;
            # a checkpoint compress wrote there before is no file of the source
            raise CliError(f"{dst}: is a file of the source directory {location}: compress "
                           "would replace it (choose a DST outside that directory)")


def _refuse_replacing_a_stored_source(dst: str, read: list) -> None:
    """The same refusals for a DST URL, on the store's paths (found by
    review: ``compress memory://m/s.npz memory://m/s.npz --force`` replaced
    the npz with its checkpoint and exited 0)."""
    from jaxjpeg import storage
    if storage.kind(dst) != "file":   # nothing there to replace
        return
    store, target = storage.stored_entry(storage.written_location(dst))
    for location in map(storage.as_location, read):
        written = storage.written_location(location)
        if storage.local_path(written) is not None:
            continue
        source_store, path = storage.stored_entry(written)
        if (source_store, path) == (store, target):
            raise CliError(f"{dst}: is the source's file {location} itself: compress writes "
                           "a new file beside it (choose another DST)")
        if (source_store == store and target.startswith(path + "/")
                and storage.is_dir(location) and not _is_checkpoint(dst)):
            raise CliError(f"{dst}: is a file of the source directory {location}: compress "
                           "would replace it (choose a DST outside that directory)")


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` (links resolved) lies under ``directory``."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _is_checkpoint(path: str) -> bool:
    """Whether the file at ``path`` (a local path or a URL) starts as a
    jaxjpeg container does."""
    from jaxjpeg import storage
    from jaxjpeg.format import MAGIC
    try:
        source = storage.open_source(path)
        try:
            head = bytearray(len(MAGIC))
            return source.readinto(0, memoryview(head)) == len(MAGIC) and head == MAGIC
        finally:
            source.close()
    except OSError:
        return False


def cmd_compress(args) -> int:
    from jaxjpeg import checkpoint, codec, layout, storage, treepaths
    if args.quant_step is not None:   # its range depends on --bits: before any input is read
        try:
            codec.quant_table(bits=args.bits or 8, quant_step=args.quant_step)
        except ValueError as e:
            raise CliError(f"--quant-step: {e}") from None
    if storage.scheme(args.src) not in ("http", "https"):  # a web server has no folders:
        _require(args.src)   # open_source looks for an Orbax item's _METADATA under it
    dst = storage.kind(args.dst)
    if dst == "directory":
        raise CliError(f"{args.dst}: is a directory")
    local = storage.local_path(storage.as_location(args.dst))
    if local is not None:   # --force would not help (as export and extract say: review)
        storage.refuse_special_file(local, args.dst)
    if dst is not None and not args.force:
        raise CliError(f"{args.dst}: exists (use --force to replace it)")
    # Tensors are described now and read one at a time as the save codes them.
    from jaxjpeg.sources import SourceError, open_source
    with open_source(args.src, args.item) as source:
        if not source.leaves:
            raise CliError(f"{args.src}: holds no arrays")
        read = source.files.locations() if source.files is not None else []
        _refuse_replacing_the_source(args.dst, [args.src, *read])
        policy = checkpoint.Policy(min_size=args.min_size, lossless=tuple(args.lossless or ()))
        for pattern in args.lossless or ():   # found by review: a typo kept nothing, silently
            if not treepaths.matching(pattern, (leaf.name for leaf in source.leaves)):
                warnings.warn(f"--lossless {pattern!r} matches no leaf")
        rate = {name: getattr(args, name) for name in RATE_OPTIONS
                if getattr(args, name) is not None}
        metadata = source.metadata
        try:
            layout.checked_user_metadata(metadata)
        except (layout.Unstorable, ValueError, TypeError) as e:   # found by review: the whole
            # source refused as damaged (over 1 MiB), a traceback (a lone surrogate)
            warnings.warn(f"{args.src}: its metadata is not kept: {_first_line(e)}")
            metadata = None
        try:
            report = checkpoint.save_leaves(args.dst, source.leaves, bits=args.bits,
                                            policy=policy, metadata=metadata, **rate)
        except SourceError:   # a tensor read as the save reached it: damaged, not usage
            raise
        except layout.Unstorable as e:   # what the source holds, not how it was asked for
            raise SourceError(f"{args.src}: {_first_line(e)}") from None
        except (ValueError, TypeError) as e:  # options save refuses
            raise CliError(_first_line(e)) from None
    tied = [leaf for leaf in report.leaves if leaf.tied_to is not None]   # stored once
    stored = [leaf for leaf in report.leaves if leaf.tied_to is None]
    jpeg = [leaf for leaf in stored if leaf.kind == "jpeg"]
    # raw leaves stored lossily are quantized (pruned, thin, moments, float16
    # vectors; found by review: two pruned leaves were printed as "0
    # JPEG-coded, 2 lossless"); exact ones deflated or as float16 are not
    # (review: a 0/1 mask was counted as quantized)
    quantized = [leaf for leaf in stored if leaf.kind != "jpeg" and not leaf.exact]
    coded = jpeg + quantized
    coded_raw = sum(leaf.raw_bytes for leaf in coded)
    coded_stored = sum(leaf.stored_bytes for leaf in coded)
    print(f"{args.src} -> {args.dst}")
    print(f"  leaves      {len(report.leaves)} ({len(jpeg)} JPEG-coded, {len(quantized)} "
          f"quantized, {len(stored) - len(coded)} exact"
          + (f", {len(tied)} tied to another" if tied else "") + ")")
    print(f"  raw         {_size(report.raw_bytes)} ({report.raw_bytes} bytes)")
    print(f"  compressed  {_size(report.file_bytes)} ({report.file_bytes} bytes)")
    on_coded = f", {coded_raw / max(1, coded_stored):.2f}x on coded leaves" if coded else ""
    print(f"  ratio       {report.ratio_vs_float32:.2f}x vs float32, {report.ratio:.2f}x vs "
          f"the stored dtypes{on_coded}")
    if report.weights:
        print(f"  bits/weight {report.bits_per_weight:.3f} (all-in)")
    return 0


# ---------------------------------------------------------------- export


def cmd_export(args) -> int:
    from jaxjpeg.codec import JpegError
    from jaxjpeg.export import export_safetensors, parse_size
    from jaxjpeg.format import FormatError
    try:
        max_shard_size = parse_size(args.max_shard_size)
    except ValueError as e:
        raise CliError(str(e)) from None
    _require(args.ckpt, kind="file")
    if os.path.isdir(args.out) and args.out.endswith(".safetensors"):
        raise CliError(f"{args.out}: is a directory")
    if (not args.out.endswith(".safetensors") and os.path.exists(args.out)
            and not os.path.isdir(args.out)):   # found by review: exit 3, an I/O error
        raise CliError(f"{args.out}: exists and is not a directory (name a .safetensors file, "
                       "or a directory)")
    try:
        files = export_safetensors(args.ckpt, args.out, max_shard_size=max_shard_size,
                                   force=args.force)
    except FileExistsError as e:
        raise CliError(str(e)) from None
    except (FormatError, JpegError):
        raise   # a damaged checkpoint: exit 1 (_classify), as verify and inspect say
    except ValueError as e:
        raise CliError(_first_line(e)) from None
    total = sum(os.path.getsize(f) for f in files)
    print(f"{args.ckpt} -> {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    print(f"  wrote {len(files)} file(s), {_size(total)} ({total} bytes)")
    return 0


# ---------------------------------------------------------------- inspect


def cmd_inspect(args) -> int:
    from jaxjpeg.dtypes import packed_nbytes

    with _open_checkpoint(args.ckpt, verify=False) as ckpt:
        rows = []
        for leaf in ckpt.leaves:
            raw = packed_nbytes(math.prod(leaf.shape), leaf.dtype)
            kind = f"jpeg{leaf.bits}" if leaf.kind == "jpeg" else "raw"
            # Checkpoint() has refused files missing any of these blobs.
            if leaf.stored_dtype is not None:
                kind = f"raw-{leaf.stored_dtype.name}"
            if leaf.quantized is not None:
                kind = ("raw-step-per-group" if leaf.quantized.get("group_size")
                        else "raw-step-per-slice" if "slice_axis" in leaf.quantized
                        else f"raw-{leaf.quantized['domain']}-step")
            if leaf.square_of is not None:   # a centered moment: + that leaf's square
                kind = f"raw-variance+sq({ckpt.leaves[leaf.square_of].path})"
            elif leaf.packed_bits:
                kind = f"raw-packed{leaf.packed_bits}" + ("-deflated" if leaf.deflated else "")
            elif leaf.deflated and leaf.stored_dtype is None and leaf.quantized is None:
                kind = "raw-deflated"
            if leaf.exact and kind != "raw" and kind != "raw-deflated" and not leaf.packed_bits:
                kind += "(exact)"   # a smaller form that holds every value
            if leaf.tied_to is not None:   # its bytes are counted once, at its first
                kind, stored = f"tied({ckpt.leaves[leaf.tied_to].path})", 0
            else:
                stored = ckpt.stored_bytes(leaf)
            dtype = str(leaf.dtype) if leaf.prng_impl is None else f"key:{leaf.prng_impl}"
            rows.append([leaf.path, "x".join(map(str, leaf.shape)) or "()", dtype,
                         kind, _view_text(leaf), raw, stored, math.prod(leaf.shape)])
        if args.item and not args.source:   # (review: taken without a word)
            raise CliError("--item chooses the items of --source: give --source too")
        errors = _source_errors(args, ckpt) if args.source else None
        file_bytes = ckpt.reader.file_size
        rate = ckpt.reader.metadata.get("rate")
        user = ckpt.user_metadata
    header = ["path", "shape", "dtype", "kind", "view", "raw", "stored", "bits/w", "ratio"]
    table = []
    for i, (path, shape, dtype, kind, view, raw, stored, size) in enumerate(rows):
        line = [path, shape, dtype, kind, view, str(raw), str(stored),
                f"{8 * stored / max(1, size):.3f}",
                f"{raw / stored:.2f}" if stored else "-" if raw else "0.00"]
        if errors is not None:
            line.append(errors[i])
        table.append(line)
    if errors is not None:
        header.append("rel_rms")
    _print_table(header, table, right={5, 6, 7, 8, 9})
    total_raw = sum(r[5] for r in rows)
    weights = sum(r[7] for r in rows)
    per_weight = f"{8 * file_bytes / weights:.3f} bits/weight" if weights else "no weights"
    print(f"{len(rows)} leaves, {_size(total_raw)} raw, {_size(file_bytes)} file: {per_weight}, "
          f"{4 * weights / max(1, file_bytes):.2f}x vs float32, "
          f"{total_raw / max(1, file_bytes):.2f}x vs the stored dtypes")
    if isinstance(rate, dict):
        print("rate: " + ", ".join(f"{k}={v}" for k, v in rate.items()))
    if user:
        print("metadata: " + _clipped(json.dumps(user, sort_keys=True), INSPECT_METADATA_CHARS))
    return 0


INSPECT_METADATA_CHARS = 2000   # user metadata may hold up to 1 MiB: inspect shows its start


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _view_text(leaf) -> str:
    """The leaf's coding view: row axes|column axes, then what rides along
    (+cols: column scales, +N kept: values in the side list)."""
    if leaf.kind != "jpeg":   # a thin leaf's values kept aside after its codes
        kept = (leaf.quantized or {}).get("outliers", 0)
        return f"-+{kept}kept" if kept else "-"
    rows = ",".join(map(str, leaf.view.row_axes())) or "-"
    cols = ",".join(map(str, leaf.view.col_axes())) or "-"
    extra = ("+cols" if leaf.col_scale_dtype is not None else "") + (
        f"+{leaf.outliers}kept" if leaf.outliers else "")
    return f"{rows}|{cols}{extra}"


def _print_table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(row):
        return "  ".join(str(v).rjust(w) if i in right else str(v).ljust(w)
                         for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    print(fmt(header))
    for row in rows:
        print(fmt(row))


def _source_errors(args, ckpt) -> list[str]:
    """Relative RMS error of every leaf vs the source, restored in bounded
    batches, each source tensor read when it is compared (found by review:
    the whole source was loaded first, 570 MB for a 200 MB file)."""
    from jaxjpeg.sources import open_source
    with open_source(args.source, args.item) as source:
        errors = _errors_against(ckpt, {leaf.name: leaf for leaf in source.leaves})
    if ckpt.leaves and all(e == "missing" for e in errors):
        # found by review: every leaf "missing", exit 0 (an Orbax step's leaves
        # are named under their items, a compressed --item's without)
        raise CliError(f"{args.source}: holds none of {args.ckpt}'s leaves (names differ: "
                       "an Orbax step's items are chosen with --item, as compress does)")
    return errors


def _errors_against(ckpt, source: dict) -> list[str]:
    import jax
    import jaxjpeg
    from jaxjpeg import treepaths
    from jaxjpeg.export import decode_on_host
    device = jax.devices("cpu")[0]
    out = ["missing"] * len(ckpt.leaves)
    batches, batch, batch_bytes = [], [], 0
    for i, leaf in enumerate(ckpt.leaves):
        if leaf.path not in source:
            continue
        if tuple(source[leaf.path].shape) != tuple(leaf.shape):
            out[i] = "shape!"
            continue
        if leaf.kind == "raw":   # read on the host: 64-bit values need no jax_enable_x64
            out[i] = _relative_rms(decode_on_host(ckpt, leaf), source[leaf.path].array())
            continue
        batch.append(i)
        batch_bytes += math.prod(leaf.shape) * 4
        if batch_bytes >= 256 * 2**20:
            batches.append(batch)
            batch, batch_bytes = [], 0
    if batch:
        batches.append(batch)
    bar = progress(total=sum(len(b) for b in batches), desc="decode", unit="leaf")
    try:
        for batch in batches:
            patterns = [treepaths.glob_escape(ckpt.leaves[i].path) for i in batch]
            restored = dict(_flatten(jaxjpeg.restore(ckpt.path, paths=patterns, device=device)))
            for i in batch:
                path = ckpt.leaves[i].path
                out[i] = _relative_rms(np.asarray(restored.pop(path)), source[path].array())
            bar.update(len(batch))
    finally:
        bar.close()
    return out


_RMS_CHUNK = 1 << 18


def _relative_rms(decoded: np.ndarray, reference: np.ndarray) -> str:
    """The relative RMS error of ``decoded`` over the reference's finite
    values; its NaN and infinities must come back as they were ("inf" if
    not). Found by review: one kept NaN printed "nan" for the whole leaf,
    lossless ones too, and complex leaves lost their imaginary parts."""
    if decoded.size == 0:
        return "0"
    wide = np.complex128 if np.iscomplexobj(reference) or np.iscomplexobj(decoded) else np.float64
    flat_d, flat_r = decoded.reshape(-1), reference.reshape(-1)
    chunks = range(0, flat_d.size, _RMS_CHUNK)   # float64 temporaries of a chunk, not a leaf
    # Scaled by the largest magnitude: float64 leaves of 1e300 square to inf.
    scale = max((float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0))
                 for r in (flat_r[i:i + _RMS_CHUNK].astype(wide) for i in chunks)),
                default=0.0) or 1.0
    err = sq = 0.0
    for start in chunks:
        d = flat_d[start:start + _RMS_CHUNK].astype(wide)
        r = flat_r[start:start + _RMS_CHUNK].astype(wide)
        finite = np.isfinite(r)
        if not np.array_equal(d[~finite], r[~finite], equal_nan=True):
            return "inf"
        d, r = d[finite] / scale, r[finite] / scale
        err += float(np.sum(np.abs(d - r) ** 2))
        sq += float(np.sum(np.abs(r) ** 2))
    if err == 0:
        return "0"
    if sq == 0 or not math.isfinite(err):
        return "inf"
    return f"{math.sqrt(err / sq):.3e}"


# ---------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    """Exit 0 only if every checksum matches and every leaf decodes: the same
    checks restore makes (container, metadata, interval index against the
    tiles' markers, affine and raw sizes), and every JPEG tile decoded. Each
    blob is read once (a remote file's bytes cross the network once)."""
    from jaxjpeg import checkpoint_reader, format as fmt
    _require(args.ckpt, kind="file")
    bad: list[str] = []
    names: tuple = ()
    tiles = 0
    try:
        ckpt = checkpoint_reader.Checkpoint(args.ckpt, verify=True)
    except fmt.FormatError as e:
        bad.append(f"metadata: {_first_line(e)}")
        ckpt = None
    if ckpt is not None:
        with ckpt:
            names = ckpt.reader.blob_names
            checked: set[str] = set()
            damaged_leaves: set[int] = set()
            for leaf in progress(ckpt.leaves, desc="verify", unit="leaf"):
                if leaf.tied_to is not None:   # its first's blobs, checked with it
                    if leaf.tied_to in damaged_leaves:
                        bad.append(f"{leaf.path}: tied to {ckpt.leaves[leaf.tied_to].path}, "
                                   "which is damaged")
                    continue
                found = len(bad)
                leaf_names = [n for n in ckpt.blob_names(leaf) if n not in checked]
                checked.update(leaf_names)
                # a leaf's blobs read once: checksummed, then decoded from memory
                with ckpt.reader.prefetch(leaf_names):
                    damaged = {n for n, ok in _checksums(ckpt.reader, leaf_names) if not ok}
                    # each damaged blob by the leaf it belongs to (found by review:
                    # "leaf1/tile2.jpg" named no leaf a user knows)
                    bad += [f"{leaf.path}: blob {n}: checksum mismatch" for n in leaf_names
                            if n in damaged]
                    bad += _verify_leaf(ckpt, leaf, damaged)
                if len(bad) > found:
                    damaged_leaves.add(leaf.index)
                tiles += len(leaf.tiles)
            rest = [n for n in names if n not in checked]
            bad += [f"{n}: checksum mismatch" for n, ok in _checksums(ckpt.reader, rest) if not ok]
    else:
        try:
            reader = fmt.ContainerReader(args.ckpt)
        except fmt.FormatError as e:  # truncated, not a container: damage, not a usage error
            bad[:] = [f"container: {_first_line(e)}"]
            reader = None
        if reader is not None:
            with reader:
                names = reader.blob_names
                checks = progress(_checksums(reader, names), total=len(names),
                                  desc="verify", unit="blob")
                bad += [f"{n}: checksum mismatch" for n, ok in checks if not ok]
    if bad:
        print(f"{args.ckpt}: {len(bad)} problem(s)")
        for line in bad:
            print(f"  BAD {line}")
        return 1
    print(f"{args.ckpt}: OK ({len(names)} blobs checksummed, {tiles} JPEG tiles decoded)")
    return 0


def _checksums(reader, names) -> Iterable[tuple[str, bool]]:
    """(name, whether its checksum matches) of each blob, one at a time (so a
    bar can follow them)."""
    for name in names:
        yield name, reader.checksum_matches(name)


def _verify_leaf(ckpt, leaf, damaged: set[str]) -> list[str]:
    """Reads a leaf as restore does and decodes every tile on the host; blobs
    already reported damaged are not read again. Memory: one leaf."""
    from jaxjpeg import codec
    from jaxjpeg.checkpoint_restore import add_whole_leaf
    from jaxjpeg.format import FormatError
    if damaged.intersection(ckpt.blob_names(leaf)):
        return []
    try:
        if leaf.kind == "raw":
            ckpt.read_raw(leaf)
        else:
            builder = codec.PlanBuilder()
            add_whole_leaf(builder, ckpt, leaf, np.float32)
            codec.run_plan(builder.finish())
            ckpt.read_outliers(leaf)   # its side list, as restore reads it (found by review)
    except (FormatError, codec.JpegError) as e:
        return [f"{leaf.path}: {_first_line(e)}"]
    return []


# ---------------------------------------------------------------- extract


_MAX_BASE = 160  # + ".tile<k>.jpg" stays far inside the usual 255-byte file name limit


def _safe_name(path: str) -> str:
    """A file-name stem for a leaf path: [A-Za-z0-9._-] only, at most
    _MAX_BASE characters (a long path keeps its start and a hash of the whole)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.replace("/", ".")).strip(".") or "leaf"
    if len(name) > _MAX_BASE:
        digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = f"{name[:_MAX_BASE - 17]}-{digest}"
    return name


def _tile_files(leaves) -> dict[tuple[int, int], str]:
    """(leaf index, tile) -> a file name, distinct from every other even on a
    case-insensitive file system (paths that sanitize alike get .leaf<i>)."""
    names: dict[tuple[int, int], str] = {}
    used: set[str] = set()
    for leaf in leaves:
        base = _safe_name(leaf.path)
        candidates = [base] + [f"{base}.leaf{leaf.index}" + ("" if n == 0 else f".{n}")
                               for n in range(len(used) + 1)]
        for candidate in candidates:
            files = [f"{candidate}.tile{k}.jpg" for k in range(len(leaf.tiles))]
            if not any(f.lower() in used for f in files):
                break
        used.update(f.lower() for f in files)
        names.update({(leaf.index, k): f for k, f in enumerate(files)})
    return names


def cmd_extract(args) -> int:
    from jaxjpeg import storage
    from jaxjpeg.treepaths import matching
    with _open_checkpoint(args.ckpt) as ckpt:
        chosen = (None if args.leaf is None
                  else set(matching(args.leaf, (leaf.path for leaf in ckpt.leaves))))
        leaves = [leaf for leaf in ckpt.leaves if leaf.kind == "jpeg"
                  and (chosen is None or leaf.path in chosen)]
        # a tied leaf's tiles are its first's: written once (found by review)
        firsts: dict = {}
        leaves = [leaf for leaf in leaves if firsts.setdefault(leaf.blob_index, leaf) is leaf]
        if not leaves:
            what = f"matching {args.leaf!r}" if args.leaf else "at all"
            raise CliError(f"{args.ckpt}: no JPEG-coded leaves {what}")
        if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):   # (review: "File exists")
            raise CliError(f"{args.outdir}: exists and is not a directory")
        created = not os.path.isdir(args.outdir)
        files = _tile_files(leaves)
        if not created and not args.force:
            # found by review: same-named files were replaced, and removed
            # with the rest if a later tile failed its checksum
            there = [f for f in files.values() if os.path.lexists(os.path.join(args.outdir, f))]
            if there:
                more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
                raise CliError(f"{os.path.join(args.outdir, there[0])}: exists{more} "
                               "(use --force to replace)")
        for name in files.values():   # with --force: opening a FIFO there waits for a reader
            storage.refuse_special_file(os.path.join(args.outdir, name))
        os.makedirs(args.outdir, exist_ok=True)
        total = sum(ckpt.tile_size(leaf, k) for leaf in leaves for k in range(len(leaf.tiles)))
        bar = progress(total=total, desc="extract", unit="B")
        written = []
        try:
            for leaf in leaves:
                for k in range(len(leaf.tiles)):
                    data = ckpt.read_tile(leaf, k)
                    _check_tile_file(ckpt, leaf, k, data)
                    written.append(os.path.join(args.outdir, files[leaf.index, k]))
                    with storage.naming_write_errors(written[-1]), open(written[-1], "wb") as f:
                        f.write(data)
                    bar.update(len(data))
        except BaseException:   # a damaged tile (or ^C): no half of an extraction left
            _remove_quietly(written, args.outdir if created else None)
            raise
        finally:
            bar.close()
    print(f"wrote {len(files)} JPEG file(s) from {len(leaves)} leaves to {args.outdir}")
    return 0


def _check_tile_file(ckpt, leaf, k: int, data) -> None:
    """A tile is a JPEG file of the size, depth and restart interval its leaf
    records (found by review: bytes that are no JPEG, or a header claiming
    65535 x 65535, were written as .jpg files and the command succeeded)."""
    from jaxjpeg import _native
    from jaxjpeg.codec import JpegError
    from jaxjpeg.format import FormatError

    try:
        _, width, height, bits, restart_interval = _native.tile_header(data)
    except JpegError as e:   # found by review: the native error alone named no tile
        raise FormatError(f"{ckpt.path}: {leaf.path} tile {k} is no JPEG file: {e}") from None
    _, _, rows, cols, _ = leaf.tiles[k]
    if (width, height, bits, restart_interval) != (cols, rows, leaf.bits, leaf.restart_interval):
        raise FormatError(f"{ckpt.path}: {leaf.path} tile {k} is a {width}x{height} "
                          f"{bits}-bit JPEG with restart interval {restart_interval}; its "
                          f"record says {cols}x{rows}, {leaf.bits}-bit, {leaf.restart_interval}")


def _remove_quietly(files, directory=None) -> None:
    """Removes ``files`` and then ``directory`` (if given and empty), ignoring
    what is already gone."""
    for path in files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if directory is not None:
        try:
            os.rmdir(directory)
        except OSError:
            pass


# ---------------------------------------------------------------- main


def _path(text: str) -> str:
    """A path argument: local paths made absolute (Orbax refuses relative
    ones), URLs as given."""
    from jaxjpeg import storage
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return storage.to_absolute(text)


def _destination(text: str) -> str:
    """Where compress writes: a local path or a URL of a store that outlives
    the command (found by review: memory:// said it wrote, then the store
    went with the process)."""
    if text.endswith(("/", os.sep)):   # abspath dropped it: a file "dir" was written (review)
        raise argparse.ArgumentTypeError(f"{text!r} names a directory; DST is the file to write")
    path = _path(text)
    # simplecache::memory:// too (review); main() called in a process stays
    if "memory://" in path and _AS_COMMAND:
        raise argparse.ArgumentTypeError(f"{text!r}: memory:// lives only as long as this "
                                         "command; write a file or a lasting store")
    return path


_AS_COMMAND = False   # console() runs: the process ends with the command


def _local_dir(text: str) -> str:
    """A directory argument the command writes files into: local only."""
    return _local(text, "directory")


def _local_path(text: str) -> str:
    """A path the command writes to: local only (found by review: export to
    memory://bucket/out made a local folder 'memory:' and said it wrote the
    store)."""
    return _local(text, "path")


def _local(text: str, what: str) -> str:
    from jaxjpeg import storage
    path = _path(text)
    if storage.local_path(path) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a local {what}, not a URL")
    return storage.local_path(path)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return value


def _fraction(text: str) -> float:
    """A relative error: in (0, 1), as jaxjpeg.save takes it (found by
    review: --error-bound 5 was refused only after the source was read)."""
    value = _positive(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be below 1 (a relative RMS error: "
                                         "0.05 is 5%)")
    return value


def _int_in(low: int, high: float):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            bound = f"is not in {low}..{high}" if math.isfinite(high) else f"is below {low}"
            raise argparse.ArgumentTypeError(f"{text!r} {bound}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, as every other error (found by review:
    argparse printed its usage block first)."""

    def error(self, message):
        command = "" if self.prog == PROG else f"{self.prog.split()[-1]}: "
        print(f"{PROG}: error: {command}{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    from jaxjpeg import __version__
    parser = _Parser(
        prog=PROG, description="Compress, export, inspect, verify and extract jaxjpeg "
                               "checkpoints.",
        epilog="exit status: 0 success, 1 damaged input, 2 usage error, 3 I/O error "
               "(missing or unreadable input, unwritable output), 130 interrupted, "
               "141 output pipe closed, 143/129 SIGTERM/SIGHUP")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="convert an Orbax / Flax msgpack / npz / safetensors "
                                        "checkpoint (path or URL) to jaxjpeg")
    p.add_argument("src", metavar="SRC", type=_path)
    p.add_argument("dst", metavar="DST", type=_destination)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--quant-step", type=_positive,
                      help="flat quantization step in sample units (default: jaxjpeg's rate)")
    rate.add_argument("--quality", type=_int_in(1, 100),
                      help="JPEG quality 1..100 (standard table)")
    rate.add_argument("--target-ratio", type=_positive,
                      help="file size as a ratio against float32 (e.g. 8)")
    rate.add_argument("--bits-per-weight", type=_positive,
                      help="file size in bits per weight, all-in (e.g. 4)")
    rate.add_argument("--error-bound", type=_fraction,
                      help="each leaf's relative RMS error at most this (e.g. 0.05)")
    p.add_argument("--bits", type=int, choices=(8, 12), default=None,
                   help="sample precision (default: chosen per tensor, as jaxjpeg.save does)")
    p.add_argument("--min-size", type=_int_in(0, math.inf), default=4096,
                   help="leaves with fewer elements are not JPEG-coded (default 4096): "
                        "stored exactly, or under a byte target quantized on a fine step")
    p.add_argument("--lossless", action="append", metavar="GLOB",
                   help="keep the leaf of this path, or whose path matches GLOB, "
                        "lossless (repeatable)")
    p.add_argument("--item", action="append", metavar="NAME",
                   help="Orbax item of the step to compress (repeatable; default: every "
                        "item), e.g. params without opt_state")
    p.add_argument("-f", "--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export", help="write decoded weights as safetensors (sharded with an "
                                      "index json when large)")
    p.add_argument("ckpt", metavar="CKPT", type=_path)
    p.add_argument("out", metavar="OUT", type=_local_path,
                   help="a local .safetensors file name, or a local directory (gets "
                        "model.safetensors)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("-f", "--force", action="store_true", help="replace files that exist")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="per-leaf table of a jaxjpeg checkpoint")
    p.add_argument("ckpt", metavar="CKPT", type=_path)
    p.add_argument("--source", metavar="SRC", type=_path,
                   help="original checkpoint: add each leaf's relative RMS error")
    p.add_argument("--item", action="append", metavar="NAME",
                   help="with --source: its Orbax items compared (as compress takes them)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum and that every JPEG tile parses")
    p.add_argument("ckpt", metavar="CKPT", type=_path)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("extract", help="write each JPEG tile as a standalone .jpg")
    p.add_argument("-f", "--force", action="store_true", help="replace files that exist")
    p.add_argument("ckpt", metavar="CKPT", type=_path)
    p.add_argument("outdir", metavar="OUTDIR", type=_local_dir)
    p.add_argument("--leaf", metavar="PATTERN", help="only leaves whose path matches this glob")
    p.set_defaults(func=cmd_extract)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
    except SystemExit as e:  # --help, --version (0); usage errors (argparse exits 2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        _use_cpu()   # imports jax: a Ctrl-C then is an interrupt too (found by review)
        with warnings.catch_warnings():   # a rate's warning as one line, as errors are
            warnings.showwarning = _show_warning
            return args.func(args)
    except interrupts.Terminated as e:
        print(f"{PROG}: terminated ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as e:
        if not _stdout_gone():
            code, message = _classify(e)
        else:   # `jaxjpeg inspect ... | head`: the reader had enough (found by review:
            _drop_stdout()   # "error: [Errno 32] Broken pipe", exit 3)
            return EXIT_PIPE_CLOSED
    except Exception as e:
        code, message = _classify(e)
    finally:
        # a signal dropped where nothing was put in place is dropped for good
        # (found by review: left pending, it made every later save raise)
        interrupts.taken()
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it."""
    import select
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):   # no file descriptor (captured)
        return False


def _drop_stdout() -> None:
    """Points standard output at /dev/null: the interpreter's last flush of
    what is left in its buffer would fail again on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``jaxjpeg: warning: ...`` on stderr (found by review: the save's
    warnings came out as Python's 'cli.py:605: UserWarning:' lines)."""
    text = _first_line(message)
    if text.startswith(f"{PROG}: "):
        text = text[len(PROG) + 2:]
    print(f"{PROG}: warning: {text}", file=sys.stderr)


def _classify(e: Exception) -> tuple[int, str]:
    """(exit status, one-line message) of an error a command raised; anything
    not recognised is re-raised (a bug shows its traceback)."""
    from jaxjpeg.codec import JpegError
    from jaxjpeg.format import FormatError
    from jaxjpeg.sources import SourceChoiceError, SourceError
    if isinstance(e, (CliError, SourceChoiceError)):
        return EXIT_USAGE, _first_line(e)
    if isinstance(e, ImportError):  # an optional dependency a URL or source needs
        return EXIT_USAGE, _first_line(e)
    if isinstance(e, (FormatError, JpegError, SourceError)):
        return EXIT_DAMAGED, _first_line(e)
    if isinstance(e, OSError):
        if e.filename and e.strerror:
            return EXIT_IO, f"{e.filename}: {e.strerror}"
        return EXIT_IO, _first_line(e) or type(e).__name__
    raise e


def console() -> None:
    """The ``jaxjpeg`` command: :func:`main`, exiting at once when
    interrupted (a thread stalled on a remote read would otherwise hold the
    interpreter's exit until its read timed out)."""
    global _AS_COMMAND
    _AS_COMMAND = True
    result: list[int] = []
    # Once the work is done, a signal while the interpreter shuts down ends
    # it with that result (found by review: the process died by SIGINT after
    # a complete summary, which a shell reads as interrupted).
    handle = interrupts.ending_handler(result)
    hook = sys.unraisablehook
    sys.unraisablehook = interrupts.quiet_when_dropped(hook)
    for signum in interrupts.ENDING_SIGNALS:   # not those inherited ignored (nohup, a
        if signal.getsignal(signum) is not signal.SIG_IGN:   # script's background job: review)
            signal.signal(signum, handle)
    try:
        code = main()
    except interrupts.Terminated as e:   # between main's own handling and its return
        code = 128 + e.signum
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    result.append(code)
    sys.unraisablehook = hook
    for signum in interrupts.ENDING_SIGNALS:   # the interpreter's shutdown puts back the
        signal.signal(signum, signal.SIG_IGN)   # default handlers, not ignored ones (review)
    sys.stdout.flush()
    sys.stderr.flush()
    if code > 128 and code != EXIT_PIPE_CLOSED:   # interrupted: nothing left to wait for
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
