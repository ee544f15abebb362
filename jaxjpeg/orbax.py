"""An Orbax ``CheckpointHandler`` that stores a pytree as one jaxjpeg file.

Use it like any Orbax item, e.g. inside a ``CheckpointManager``::

    import orbax.checkpoint as ocp
    from jaxjpeg.orbax import JaxjpegSave, JaxjpegRestore

    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    mngr.save(step, args=ocp.args.Composite(params=JaxjpegSave(params, quant_step=4.0),
                                            opt_state=ocp.args.StandardSave(opt_state)))
    mngr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    restored = mngr.restore(mngr.latest_step(),
                            args=ocp.args.Composite(params=JaxjpegRestore(abstract)))

The item directory Orbax gives the handler holds one file, ``checkpoint.jjpg``
(:func:`jaxjpeg.save` format). Importing :mod:`jaxjpeg` never imports Orbax;
importing this module does, and registers the args classes with the handler
(``ocp.args.register_with_handler``), so ``ocp.args.Composite`` and
``CheckpointManager`` find the handler from the args alone.

Asynchronous saving (the ``CheckpointManager`` default) is supported:
``async_save`` copies every leaf to host memory while the caller waits (so
the training loop may donate or overwrite its buffers right after ``save``
returns), then encodes and writes in Orbax's background commit thread, after
Orbax has created the item directory. Orbax renames the step directory only
when the commit has finished; jaxjpeg's own writer is atomic too.

The item directory may be local or remote (``gs://``, ``s3://`` ...: the
file is read and written through :mod:`jaxjpeg.storage`, with fsspec and the
store's backend installed). Restoring honours target shardings, on any
topology.

Several processes (``jax.distributed``): on a file system every process
sees (one machine, or a shared mount), the save is distributed
(:mod:`jaxjpeg.distributed_save`): each process codes and writes the leaves
it holds (a leaf split across processes is gathered first), and process 0
commits the one file once every process has written its part; only then
does each process's commit future finish, so Orbax's barrier and its
rename of the step directory come after the file is complete. With
``async_save`` the gathers and host copies happen while the caller waits
(collectives must run in the same order everywhere), the coding and
writing in Orbax's commit thread. To a remote store only the primary host
writes, and every leaf must be fully addressable from it (gather
multi-host sharded arrays first).
"""

from __future__ import annotations

import asyncio
import copy as copy_module
import dataclasses
from typing import Any, List, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxjpeg import checkpoint as _ckpt
from jaxjpeg import checkpoint_reader as _reader
from jaxjpeg import checkpoint_restore as _restore
from jaxjpeg import distributed_save as _distributed
from jaxjpeg import storage as _storage
from jaxjpeg.treepaths import nest as _nest

__all__ = ["FILENAME", "JaxjpegCheckpointHandler", "JaxjpegRestore", "JaxjpegSave"]

FILENAME = "checkpoint.jjpg"


def _host_copy(tree) -> list:
    """Every leaf copied to host memory (a real copy, not a view of a device
    buffer), as the leaves :func:`jaxjpeg.checkpoint.save_leaves` takes, with
    the shards of an array split over devices (its tiles end at their edges,
    as :func:`jaxjpeg.save` cuts them)."""
    def copy(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError("JaxjpegCheckpointHandler saves arrays split across processes "
                             "only to a file system every process writes (a local path or a "
                             "shared mount); for a remote store gather them first")
        return np.array(leaf, copy=True)
    return [_ckpt.SourceLeaf.of(records, copy(leaf), _ckpt.shard_regions(leaf), impl)
            for records, leaf, impl in _ckpt._leaves(tree)]


class JaxjpegCheckpointHandler(ocp.handlers.AsyncCheckpointHandler):
    """Saves and restores a pytree as one jaxjpeg file in the item directory.

    Args:
      filename: the file's name inside the item directory.
      primary_host: the process that writes to a remote store (``None``:
        every process writes, which is right only on a single host).
        Defaults to process 0. A distributed save (several processes, a
        file system they share) is written by every process and committed
        by process 0.
    """

    def __init__(self, filename: str = FILENAME, *, primary_host: Optional[int] = 0):
        # one name inside the step's item directory (found by review:
        # "../../shared.jjpg" made every step write one file outside its own,
        # and restoring step 0 gave step 1's values)
        if (not isinstance(filename, str) or filename in ("", ".", "..")
                or "/" in filename or "\\" in filename):
            raise ValueError(f"filename must be one file name inside the item directory, "
                             f"got {filename!r}")
        self._filename = filename
        self._primary_host = primary_host

    def _path(self, directory) -> str:
        return _storage.join(directory, self._filename)

    def _is_writer(self) -> bool:
        return self._primary_host is None or jax.process_index() == self._primary_host

    def _is_distributed(self, directory) -> bool:
        """Several processes, and a directory they all write with ranged
        writes (a local path: one machine or a shared mount)."""
        return (jax.process_count() > 1
                and _storage.local_path(_storage.as_location(directory)) is not None)

    def _snapshot(self, directory, args: "JaxjpegSave", *, copy: bool):
        """What the save writes, taken from the caller's arrays now: this
        process's part of a distributed save, or every leaf on the host
        (None where this process writes nothing)."""
        if not isinstance(args, JaxjpegSave):
            raise TypeError(f"expected JaxjpegSave args, got {type(args).__name__}")
        if self._is_distributed(directory):
            options = _options(args)
            if "input_mean" in options:
                raise ValueError("input_mean is not supported by a distributed save")
            return _distributed.prepare(self._path(directory), args.item, options, copy=copy)
        if not self._is_writer():
            return None
        leaves = _host_copy(args.item)
        options = _options(args)
        if options.get("input_mean"):
            options["input_means"] = _ckpt._input_mean_takers(options["input_mean"], leaves,
                                                              args.item)
        options.pop("input_mean", None)
        # Checked now (in async_save, before it returns), written in the commit thread.
        return _ckpt.prepared_save(self._path(directory), leaves, **options)

    def _write(self, directory, snapshot) -> None:
        if isinstance(snapshot, _distributed.Prepared):
            _distributed.finish(snapshot)
        elif snapshot is not None:
            snapshot.run()

    async def async_save(self, directory, args: "JaxjpegSave") -> Optional[List[Any]]:
        """Snapshots the leaves to host now; encodes and writes in the commit thread."""
        snapshot = self._snapshot(directory, args, copy=True)
        if snapshot is None:
            return []

        async def commit():
            await asyncio.to_thread(self._write, directory, snapshot)

        return [ocp.future.CommitFutureAwaitingContractedSignals(commit(),
                                                                 name="jaxjpeg_save")]

    def save(self, directory, args: "JaxjpegSave") -> None:
        """Saves synchronously."""
        self._write(directory, self._snapshot(directory, args, copy=False))

    def restore(self, directory, args: Optional["JaxjpegRestore"] = None):
        """Restores the pytree, decoded on the device (see :func:`jaxjpeg.restore`)."""
        args = args or JaxjpegRestore()
        path = self._path(directory)
        if not _storage.exists(path):
            raise FileNotFoundError(f"no jaxjpeg checkpoint at {path}")
        return _restore.restore(path, target=args.target, paths=args.paths, dtype=args.dtype,
                             verify=args.verify)

    def metadata(self, directory):
        """The saved tree as nested dicts/lists of ``jax.ShapeDtypeStruct``; cheap (header only)."""
        path = self._path(directory)
        if not _storage.exists(path):
            return None
        with _reader.Checkpoint(path, verify=False) as ckpt:
            entries = [(leaf.records, _saved_struct(leaf)) for leaf in ckpt.leaves]
        return _nest(entries) if entries else {}

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


# jaxjpeg.save's options a handler passes on; it chooses distribution itself.
_PASSED_OPTIONS = frozenset(_ckpt._SAVE_OPTIONS) | {"batchnorm_prior", "input_mean"}


def _saved_struct(leaf) -> jax.ShapeDtypeStruct:
    """What the leaf restores as; key data whose implementation this process
    cannot find as the data it is (found by review: the whole item's
    metadata failed)."""
    try:
        return _restore.saved_struct(leaf)
    except ValueError:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def _options(args: "JaxjpegSave") -> dict:
    """jaxjpeg.save's keyword options from the save args, their arrays copied."""
    kwargs = _kwargs(args)
    # Arrays among the options (importances, covariances, means) copied now,
    # as the leaves are: the commit thread reads them after save returns,
    # when the loop may have donated or changed them (found by review: a
    # donated sensitivity array lost the step, "Array has been deleted").
    for name in ("sensitivity", "input_covariance", "input_mean"):
        if kwargs.get(name) is not None:
            kwargs[name] = _copied(kwargs[name])
    return kwargs


def _kwargs(args: "JaxjpegSave") -> dict:
    """jaxjpeg.save's keyword options from the save args, as given."""
    kwargs = dict(args.save_kwargs or {})
    unknown = sorted(set(kwargs) - _PASSED_OPTIONS)
    if unknown:
        why = ("the handler distributes a save itself (several processes, a shared file "
               "system)" if unknown == ["distributed"] else "not an option of jaxjpeg.save")
        raise TypeError(f"JaxjpegSave.save_kwargs: {', '.join(map(repr, unknown))}: {why}")
    for name in ("quant_step", "quality", "bits", "policy"):
        if getattr(args, name) is not None:
            if name in kwargs:   # (found by review: the field won silently)
                raise TypeError(f"JaxjpegSave: {name!r} given both as a field and in "
                                "save_kwargs: give it once")
            kwargs[name] = getattr(args, name)
    kwargs["progress"] = False
    return kwargs


def _copied(value):
    """``value`` with every array in it copied to the host (dicts walked;
    other objects, e.g. InputCovariance, deep-copied)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.array(value, copy=True)
    return copy_module.deepcopy(value)


@ocp.args.register_with_handler(JaxjpegCheckpointHandler, for_save=True)
@dataclasses.dataclass
class JaxjpegSave(ocp.args.CheckpointArgs):
    """Save args: the pytree and the rate controls of :func:`jaxjpeg.save`.

    Give at most one rate control: ``quant_step`` (flat quantization step;
    not the training step, which Orbax's ``CheckpointManager.save`` takes),
    ``quality`` (standard table), or another of :func:`jaxjpeg.save`'s
    (``qtable``, ``error_bound``, ``target_ratio``, ...) through
    ``save_kwargs``, which is passed to it as is; none means jaxjpeg's
    default rate. ``bits`` (8 or 12) fixes the sample precision; None lets
    jaxjpeg choose.
    """

    item: Any
    quant_step: Optional[float] = None
    quality: Optional[int] = None
    bits: Optional[int] = None
    policy: Optional[_ckpt.Policy] = None
    save_kwargs: Optional[dict] = None

    def __post_init__(self):
        # What save refuses of any tree, and leaves no checkpoint holds,
        # refused here, before a manager's save starts: refused inside it,
        # Orbax's signalling thread kept the interpreter from exiting until
        # its timeout (found in session 29: more than 120 s after a bad policy).
        # Not with several processes: one refusing alone here would leave the
        # others waiting in the save, where they refuse together.
        if jax.process_count() == 1:
            kwargs = _kwargs(self)
            _ckpt.check_save_options(**kwargs)
            _ckpt.check_leaves(self.item)
            _ckpt.check_tree_options(self.item, **kwargs)


@ocp.args.register_with_handler(JaxjpegCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class JaxjpegRestore(ocp.args.CheckpointArgs):
    """Restore args: ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct``
    (with shardings, optionally) giving structure, dtypes and placement; it may
    cover a subset of the saved leaves. Without it the saved structure comes
    back as nested dicts/lists (``paths`` globs then select leaves)."""

    target: Any = None
    paths: Optional[Sequence[str]] = None
    dtype: Any = None
    verify: bool = True
