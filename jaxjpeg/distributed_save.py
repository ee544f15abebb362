"""Saving one checkpoint from every process of ``jax.distributed`` at once.

``jaxjpeg.save(path, tree, distributed=True)``, called by every process with
the same tree (global ``jax.Array`` leaves, or numpy leaves every process
holds alike), writes the same single file a one-process save writes, so any
topology restores it (another device count, one process). The work is split:

1. Every leaf gets one *owner*, a process holding all of it in its own
   devices' shards (a replicated leaf: any process; numpy leaves: any),
   chosen to balance the bytes each process codes (largest leaves first, to
   the least loaded candidate; every process computes the same plan). A leaf
   no process holds whole (split across processes) is gathered first
   (``multihost_utils.process_allgather``, a collective every process joins,
   in leaf order) and coded by the least loaded process.
2. Each process codes its leaves (on all its cores, as a one-process save
   does) into a *region*: its blobs laid out back to back, aligned as
   ContainerWriter aligns them (64 bytes for large blobs, 8 for small ones).
3. Through the coordination service's key-value store each process publishes
   its region's size, blob table and leaf records; process 0 publishes the
   temporary file it created. Region ``i`` starts where region ``i - 1``
   ends (aligned), after the 64-byte preamble: every process then knows its
   offsets and writes its blobs there with ``pwrite``, in parallel, and
   fsyncs.
4. When every process has reported its write, process 0 writes the header
   (all blob tables and leaf records, in leaf order) and the preamble,
   fsyncs, renames the file into place and fsyncs the directory: the commit.
   Every process returns only after the commit, or raises if any process
   failed (process 0 then removes the temporary file; ``path`` keeps any
   previous checkpoint).

Under the BatchNorm prior (the default rate, :mod:`jaxjpeg.priors`) every
process computes the prior from the whole tree, and the leaves a bias
correction moves (running means, biases) are coded after the processes have
exchanged the shifts their weights add, so the file is still a one-process
save's.

The save runs in two halves: :func:`prepare` (checks agreed on, gathers,
this process's leaves copied to the host; on the caller's thread, since
collectives must run in the same order everywhere) and :func:`finish` (the
rest, from any thread: the Orbax handler runs it in Orbax's commit thread).

The destination must be a file system every process sees (one machine, or a
shared mount). A custom ``encoder`` is refused (it may not be safe to run in
every process). Under a byte target (``target_ratio``...) each process
measures the rate-distortion curves of its own leaves and publishes them
(:func:`_analysed_everywhere`); every process then allocates the same
budget, and codes its own leaves to their share of it (their predicted
bytes at the whole tree's allocation), correcting by their misses and
landing the share with its last leaf as a one-process save lands the
budget: the file is not a one-process save's, but its size is about as
close to the target (12 leaves at 2 bits a weight: -0.05% / -0.17% /
-0.12% at 2 / 3 / 4 processes, one process -0.00%; a warning past 2%).
Coded regions are held in memory until the offsets are agreed: about each
process's share of the compressed file.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import itertools
import json
import os
import warnings
import zlib
from typing import Any

import numpy as np

from jaxjpeg import dtypes, format as fmt, storage

__all__ = ["Prepared", "finish", "plan_owners", "prepare", "save_distributed", "TIMEOUT_S"]

TIMEOUT_S = 600.0        # waiting for another process's part, writes or commit
PIECE_CHARS = 1 << 20    # characters per key-value entry of a large value
# A byte target's analysis rounds at most (checkpoint._target_encoder: up to
# 3 plans of up to 3 measures each): a failing process answers them all.
ANALYSIS_ROUNDS = 16
_KEY = "jaxjpeg_save"
_saves_started = 0       # every process saves in the same order: the nth save's keys
_earlier: list = []      # this process's exchanges of earlier saves, keys not deleted yet


def _client():
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise ValueError("distributed=True needs jax.distributed.initialize() first")
    return client


def _boxes(leaf, shape) -> dict[int, set]:
    """process -> the distinct index boxes its devices hold of ``leaf``."""
    boxes: dict[int, set] = {}
    for device, index in leaf.sharding.devices_indices_map(tuple(shape)).items():
        box = tuple((s.start or 0, shape[d] if s.stop is None else s.stop)
                    for d, s in enumerate(index))
        boxes.setdefault(device.process_index, set()).add(box)
    return boxes


def _holders(leaf, processes: int) -> list[int]:
    """Processes holding every element of ``leaf`` in their own shards. An
    array this process holds whole (a numpy array, or a jax array on its own
    devices, as jnp.asarray makes in each process) counts as every
    process's, as a numpy leaf does: each process has its own copy (a global
    array on one process's devices is seen so there only: prepare refuses
    trees the processes see differently)."""
    import jax
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return list(range(processes))
    shape = leaf.shape
    size = int(np.prod(shape, dtype=np.int64))
    out = []
    for process, boxes in sorted(_boxes(leaf, shape).items()):
        # A sharding's boxes tile the array (replicas repeat a box): distinct
        # boxes covering `size` elements cover all of it.
        if sum(int(np.prod([b - a for a, b in box], dtype=np.int64)) for box in boxes) >= size:
            out.append(process)
    return out


def plan_owners(leaves: list, processes: int, together: dict | None = None
                ) -> tuple[list[int], list[bool]]:
    """(owner process of each leaf, whether it must be gathered first): the
    bytes each process codes balanced, largest leaves first. ``together``
    ({leaf: leaf}) pairs leaves one process codes (a first moment and its
    second moment, checked on both their values)."""
    load = [0] * processes
    owners = [0] * len(leaves)
    gather = [False] * len(leaves)
    units = _units(len(leaves), together or {})
    holders = [_holders(leaf, processes) for leaf in leaves]
    for unit in sorted(units, key=lambda u: (-sum(_nbytes(leaves[i]) for i in u), u)):
        candidates = sorted(set.intersection(*(set(holders[i]) for i in unit)))
        owner = min(candidates or range(processes), key=lambda p: (load[p], p))
        for i in unit:
            owners[i], gather[i] = owner, owner not in holders[i]
            load[owner] += _nbytes(leaves[i])
    return owners, gather


def _units(count: int, together: dict) -> list[list[int]]:
    """The leaves ``0 .. count-1`` as groups one process codes: the connected
    pieces of ``together``'s pairs, each leaf in one (found by review: a leaf
    in two pairs, ``nu/m`` beside ``mu/m`` and ``nu/v``, was given two
    owners, the last splitting a pair)."""
    root = list(range(count))

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i
    for i, j in together.items():
        root[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _dtype(leaf) -> np.dtype:
    """A leaf's dtype without reading it (a global array may not be readable here)."""
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _nbytes(leaf) -> int:
    return int(np.prod(np.shape(leaf), dtype=np.int64)) * _dtype(leaf).itemsize


def _allgather(leaf) -> np.ndarray:
    """A global array's values, gathered from every process (a collective).
    2-bit integers travel as 8-bit ones: XLA's CPU all-gather of int2 /
    uint2 crashes the process (SIGSEGV; found by review)."""
    from jax.experimental import multihost_utils

    if dtypes.value_bits(leaf.dtype) < 4 and not dtypes.is_float(leaf.dtype):
        wide = np.int8 if np.dtype(leaf.dtype).name.startswith("int") else np.uint8
        return np.asarray(multihost_utils.process_allgather(leaf.astype(wide), tiled=True)
                          ).astype(leaf.dtype)
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def _local_copy(leaf, copy: bool = False) -> np.ndarray:
    """A leaf this process holds whole, as numpy, from its own shards
    (``copy``: never a view of the caller's array or a device buffer)."""
    import jax
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return np.array(leaf, copy=True) if copy else np.asarray(leaf)
    out = np.empty(leaf.shape, leaf.dtype)
    for shard in leaf.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def _region(stored: list) -> tuple[list, dict, int]:
    """(blobs with their offsets in the region, blob table, region size) of
    the coded leaves: blobs back to back, each where ContainerWriter puts it
    (fmt.blob_offset)."""
    placed, table, position = [], {}, 0
    for blobs, _, _, _ in stored:
        for name, data in blobs:
            views = fmt.byte_views(data)
            offset = fmt.blob_offset(position, sum(view.nbytes for view in views))
            position, crc = offset, 0
            for view in views:
                placed.append((position, view))
                crc = fmt.crc32c(view, crc)
                position += view.nbytes
            table[name] = [offset, position - offset, crc]
    return placed, table, position


class _Exchange:
    """This save's keys in the coordination service's key-value store."""

    def __init__(self, client, prefix: str, number: int = 0):
        self.client, self.prefix, self.number = client, prefix, number
        self.finished = False   # this process is done with the save (finish ended or failed)
        self.written: set[str] = set()
        self.large: dict[str, int] = {}   # key -> pieces, of put_large

    def put(self, key: str, value: Any) -> None:
        self.client.key_value_set(f"{self.prefix}/{key}", json.dumps(value))
        self.written.add(key)

    def put_once(self, key: str, value: Any) -> None:
        """:meth:`put` unless this process has put ``key`` already."""
        if key not in self.written:
            self.put(key, value)

    def get(self, key: str) -> Any:
        return json.loads(self._wait(key))

    def _wait(self, key: str) -> str:
        """The value another process puts at ``key``; TimeoutError naming it
        after TIMEOUT_S (found by review: a process that had exited before
        its save left the others a bare DEADLINE_EXCEEDED of a store key)."""
        try:
            return self.client.blocking_key_value_get(f"{self.prefix}/{key}",
                                                      int(TIMEOUT_S * 1000))
        except Exception as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            raise TimeoutError(
                f"distributed save: waited {TIMEOUT_S:g} s for {key!r} from another process "
                "(one that exited or stalls before this point of the save; "
                "jaxjpeg.distributed_save.TIMEOUT_S sets the wait)") from None

    def put_large(self, key: str, value: Any) -> None:
        """:meth:`put` of a value of any size, in pieces of at most
        PIECE_CHARS characters (one entry of the store stays small)."""
        text = json.dumps(value)
        pieces = [text[i:i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
        for j, piece in enumerate(pieces):
            self.client.key_value_set(f"{self.prefix}/{key}/{j}", piece)
        self.put(key, {"pieces": len(pieces)})
        self.large[key] = len(pieces)

    def forget(self) -> None:
        """Deletes every key this process put (the coordination service keeps
        every key until the job ends: a few KB per million weights a save;
        found by review). Only once no process may read them."""
        self.delete_large()
        for key in self.written:
            self.client.key_value_delete(f"{self.prefix}/{key}")
        self.written.clear()

    def delete_large(self) -> None:
        """Deletes the pieces of what this process put with :meth:`put_large`
        (the coordination service keeps every key until the job ends; a
        training job saves often). Only once every process has read them."""
        for key, pieces in self.large.items():
            for j in range(pieces):
                self.client.key_value_delete(f"{self.prefix}/{key}/{j}")
        self.large.clear()

    def get_large(self, key: str) -> Any:
        """What :meth:`put_large` put (ValueError with its error when the
        process put one instead)."""
        head = self.get(key)
        if "error" in head:
            raise ValueError(head["error"])
        return json.loads("".join(self._wait(f"{key}/{j}") for j in range(head["pieces"])))


def _failed(parts: list) -> str | None:
    for i, part in enumerate(parts):
        if "error" in part:
            return f"process {i}: {part['error']}"
    return None


def save_distributed(path, tree, saver_options: dict):
    """See the module doc; ``saver_options`` are :func:`jaxjpeg.save`'s."""
    return finish(prepare(path, tree, saver_options))


@dataclasses.dataclass
class Prepared:
    """A distributed save between its two halves: what :func:`prepare` took
    from the tree (this process's leaves, on the host) and agreed on."""

    path: str
    saver: Any                # jaxjpeg.checkpoint._Save: the checked options
    exchange: _Exchange
    me: int
    processes: int
    own: list                 # (leaf index, SourceLeaf) this process codes
    count: int                # leaves in the tree


def prepare(path, tree, saver_options: dict, *, copy: bool = False) -> Prepared:
    """The first half, in every process at once, on the caller's thread: the
    options and the tree checked (and agreed on: any process refusing makes
    every process raise), leaves split across processes gathered (a
    collective, in leaf order), and this process's leaves read to the host
    (``copy``: always copied, never a view of a device buffer, so that the
    caller may reuse its arrays at once, as an asynchronous save needs).
    Nothing is written yet."""
    import jax
    from jaxjpeg import checkpoint as ck

    global _saves_started
    saver_options = dict(saver_options)
    batchnorm_prior = saver_options.pop("batchnorm_prior", True)
    saver_options["defer_budget"] = True   # a byte target's analysis needs the leaves: finish
    if jax.process_count() == 1:   # no other process to agree with (see _prepare)
        _check_distributable(saver_options)
    client = _client()
    me, processes = jax.process_index(), jax.process_count()
    _saves_started += 1
    exchange = _Exchange(client, f"{_KEY}/{_saves_started}", _saves_started)
    earlier = list(_earlier)
    _earlier.append(exchange)
    try:
        return _prepare(path, tree, saver_options, copy, batchnorm_prior, client, me,
                        processes, exchange, earlier)
    except BaseException:
        exchange.finished = True   # no finish will run
        raise


def _prepare(path, tree, saver_options, copy, batchnorm_prior, client, me, processes,
             exchange, earlier) -> Prepared:
    from jaxjpeg import checkpoint as ck

    # Everything a process may refuse on its own (its path, its tree, the
    # options) is checked and agreed on before the first collective: a
    # process that raised alone would leave the others waiting in a gather,
    # or (found by review: a sensitivity one process alone passed) answering
    # its next save.
    try:
        _check_distributable(saver_options)
        path = _shared_file(path)
        flat = ck._leaves(tree)
        leaves = [ck.SourceLeaf(records, tuple(np.shape(leaf)), _dtype(leaf), lambda: None,
                                ck.shard_regions(leaf), prng_impl=impl)
                  for records, leaf, impl in flat]
        with_prior = batchnorm_prior and ck._prior_applies(leaves, saver_options)
        saver = ck._Save(path, leaves, **saver_options)
        owners, gather = plan_owners([leaf for _, leaf, _ in flat], processes,
                                     saver.log_coding.named_pairs(leaves))
        ready, error = {"owners": owners, "gather": gather, "path": storage.as_typed(path),
                        "real": storage.absolute(path), "leaves": _leaf_digests(flat),
                        "options": _options_digest(saver_options)}, None
    except Exception as e:
        ready, error = f"{type(e).__name__}: {e}", e
    exchange.put(f"ready/{me}", {"state": ready,
                                 "finished": [old.number for old in earlier if old.finished]})
    answers = [exchange.get(f"ready/{i}") for i in range(processes)]
    states = [answer["state"] for answer in answers]
    # An earlier save's keys go once every process has finished it: an
    # asynchronous save may still be committing (found by review: two items
    # saved in one Orbax step lost their keys mid-save; the step hung and was lost).
    done = set.intersection(*(set(answer["finished"]) for answer in answers))
    for old in earlier:
        if old.number in done:
            old.forget()
            _earlier.remove(old)
    failed = [f"process {i}: {state}" for i, state in enumerate(states)
              if not isinstance(state, dict)]
    if failed:
        if error is not None:
            raise error
        raise ValueError(f"distributed save of {path} refused in {failed[0]}")
    _check_same_plan(path, states, [records for records, _, _ in flat])
    if with_prior:   # every process computes the same prior (its gathers are collectives)
        saver = ck._Save(path, leaves, prior=_batchnorm_prior(tree, processes),
                         **saver_options)
    gathered = {}
    for i, (_, leaf, _) in enumerate(flat):
        if gather[i]:   # every process joins, in leaf order
            array = _allgather(leaf)
            if owners[i] == me:
                gathered[i] = array
    # Past the last collective, a process failing alone (reading its leaves
    # to the host) tells the others, who would wait for its part until
    # TIMEOUT_S otherwise.
    try:
        own = [(i, ck.SourceLeaf.of(records, gathered[i] if gather[i]
                                    else _local_copy(leaf, copy), prng_impl=impl))
               for i, (records, leaf, impl) in enumerate(flat) if owners[i] == me]
        saver.log_coding.pair([leaf for _, leaf in own])   # moments its owner holds both of
    except BaseException as e:
        why = f"{type(e).__name__}: {e}"
        _publish_failure(exchange, me, why)
        _abandon(None, exchange, me, f"process {me} failed: {why}")   # no temporary file yet
        raise
    return Prepared(path, saver, exchange, me, processes, own, len(flat))


def _check_distributable(options: dict) -> None:
    """ValueError for the options a distributed save does not take."""
    from jaxjpeg import checkpoint as ck
    if options.get("encoder") is not None:
        raise ValueError("distributed=True codes each leaf in one process: a custom encoder "
                         "is not supported (it may not be safe to run in every process)")
    if options.get("sensitivity") and ck._uses_relative_step(options):
        raise ValueError("distributed=True: sensitivity steers a byte target's allocation here "
                         "(target_ratio, target_bytes or bits_per_weight); with the default "
                         "relative_step its steps would need every steered leaf's values in "
                         "one process")


def _check_same_plan(path: str, plans: list, records: list) -> None:
    """Every process must have planned the same owners: a leaf the processes
    see differently (a global array on one process's devices) would be
    coded by none or by two, and the file lose leaves (found by review: a
    step that every process reported saved held one leaf of three)."""
    from jaxjpeg.treepaths import path_string
    # one file: process 0's (found by review: a process naming another path,
    # a relative one from another directory, was told its save had succeeded)
    # Either spelling agreeing will do: the text as typed, joined to the
    # working folder (hosts that mount a shared folder through different
    # symlinks), or the real folders (processes in different folders; one
    # through a symlink's ".."). Not os.path.abspath's: it cancels "lnk/.."
    # as text, which names another file (found by review: lnk/../ck.jjpg
    # and ck.jjpg were taken for one).
    named = [plan["path"] for plan in plans]
    if len(set(named)) > 1 and len({plan["real"] for plan in plans}) > 1:
        differ = next(i for i, p in enumerate(named) if p != named[0])
        raise ValueError(f"distributed save: the processes name different files (process 0 "
                         f"{named[0]!r}, process {differ} {named[differ]!r}): every process "
                         "must name the same file, on a file system they share")
    _check_same_leaves(path, plans)
    for i in range(len(records)):
        seen = {(plan["owners"][i], plan["gather"][i]) for plan in plans}
        if len(seen) > 1:
            raise ValueError(f"distributed save of {path}: the processes disagree on which of "
                             f"them holds leaf {path_string(records[i])!r} whole (a jax array "
                             "on one process's devices only?); give every process the same "
                             "global array, or the same numpy array")


def _check_same_leaves(path: str, plans: list) -> None:
    """Every process must save the same tree with the same options (found by
    review: a process renaming a leaf, holding other numpy values or asking
    for target_ratio=4 where process 0 asked for 8 had its save reported
    done, the file holding process 0's tree, or leaves at either rate)."""
    first = plans[0]
    for k, plan in enumerate(plans[1:], 1):
        if plan["options"] != first["options"]:
            names = sorted(n for n in set(plan["options"]) | set(first["options"])
                           if plan["options"].get(n) != first["options"].get(n))
            raise ValueError(f"distributed save of {path}: process {k} was given other save "
                             f"options than process 0 ({', '.join(names)}): every process must "
                             "call save with the same options")
        if plan["leaves"] != first["leaves"]:
            ours = {leaf[0]: leaf for leaf in first["leaves"]}
            theirs = {leaf[0]: leaf for leaf in plan["leaves"]}
            name = next((n for n in list(ours) + list(theirs)
                         if ours.get(n) != theirs.get(n)), None)
            if name not in ours or name not in theirs:
                what = f"leaf {name!r} is only in process {0 if name in ours else k}'s tree"
            elif ours[name][1:3] != theirs[name][1:3]:
                what = (f"leaf {name!r} is {ours[name][2]} {tuple(ours[name][1])} in process 0, "
                        f"{theirs[name][2]} {tuple(theirs[name][1])} in process {k}")
            elif (ours[name][3] is None) != (theirs[name][3] is None):
                what = (f"they disagree on which of them holds leaf {name!r} whole (a jax "
                        "array on one process's devices only?); give every process the same "
                        "global array, or the same numpy array")
            elif ours[name][3] != theirs[name][3]:
                what = (f"leaf {name!r} holds other values in process {k} than in process 0 "
                        "(leaves every process holds whole, numpy or on its own devices, "
                        "must be held alike: one process codes each)")
            else:
                what = "the leaves come in another order"
            raise ValueError(f"distributed save of {path}: the processes' trees differ: {what}")


def _leaf_digests(flat) -> list:
    """[path, shape, dtype, checksum of the values or None] of each leaf:
    the leaves every process holds whole (numpy, Python numbers, a jax array
    on this process's devices) are checksummed, global jax arrays not (each
    process holds its shards; found by review: a Python number or a
    process-local jax array differing between processes was saved silently)."""
    from jaxjpeg.treepaths import path_string
    out = []
    for records, leaf, _ in flat:
        values = None
        if getattr(leaf, "is_fully_addressable", True):
            values = _checksum(leaf)
        out.append([path_string(records), list(np.shape(leaf)), str(_dtype(leaf)), values])
    return out


def _checksum(array) -> int | None:
    """crc32c of an array's bytes, any dtype (bfloat16, bool, 0-d); None
    for what has no bytes to compare (object arrays, refused later)."""
    data = np.ascontiguousarray(np.asarray(array)).reshape(-1)
    if data.dtype.hasobject:
        return None
    return fmt.crc32c(data.view(np.uint8)) if data.size else 0


def _options_digest(options: dict) -> dict:
    """Each save option as a string the processes compare (arrays by shape,
    dtype and checksum; a progress callback not at all)."""
    def text(value) -> str:
        if isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype")):
            array = np.asarray(value)
            return f"array{array.shape}{array.dtype}:{_checksum(array)}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {text(v)}" for k, v in sorted(
                value.items(), key=lambda kv: repr(kv[0]))) + "}"
        if isinstance(value, (list, tuple)):
            return "(" + ", ".join(text(v) for v in value) + ")"
        if isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, str):
            return repr(value)
        if isinstance(value, (int, float, np.number)):   # 8, 8.0 and np.float64(8) alike
            return repr(float(value))
        if dataclasses.is_dataclass(value):
            return type(value).__name__ + text({f.name: getattr(value, f.name)
                                                for f in dataclasses.fields(value)})
        return type(value).__name__
    return {name: text(value) for name, value in options.items() if name != "progress"}


def _publish_failure(exchange: "_Exchange", me: int, why: str) -> None:
    """What this process failing tells the others, who may wait for its
    bias-correction shifts, a byte target's analyses (each round it did not
    answer: found by review, a process failing before them left the others
    waiting TIMEOUT_S) or its part."""
    exchange.put_once(f"shifts/{me}", {"error": why})
    for round_ in range(ANALYSIS_ROUNDS):
        exchange.put_once(f"analysis/{round_}/{me}", {"error": f"process {me}: {why}"})
    exchange.put(f"part/{me}", {"error": why})


def _batchnorm_prior(tree, processes: int):
    """The prior a one-process save of ``tree`` codes with
    (:func:`jaxjpeg.priors.batchnorm_prior`), from the tree in its own order:
    the vectors a BatchNorm may hold, and the weights its residual-stream
    test loads, read as every process reads them (a leaf not every process
    holds whole is gathered, a collective every process joins: the prior
    reads the same leaves in the same order everywhere)."""
    from jaxjpeg import checkpoint as ck, priors, prng_keys

    def read(leaf) -> np.ndarray:
        if len(_holders(leaf, processes)) == processes:
            return _local_copy(leaf)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    leaves = [(name, prng_keys.split(leaf)[0])   # typed keys as their data
              for name, leaf in priors._in_insertion_order(tree)]
    return ck.prior_of_unloaded([(name, np.shape(leaf), _dtype(leaf), functools.partial(read, leaf))
                                 for name, leaf in leaves])


def finish(prepared: Prepared):
    """The second half, in every process (it may run on any thread: no
    collectives, only the coordination service's key-value store): process
    0 creates the temporary file, each process codes its leaves and writes
    its region, process 0 commits. Returns the SaveReport."""
    try:
        return _finish(prepared)
    finally:
        prepared.exchange.finished = True


def _finish(prepared: Prepared):
    from jaxjpeg import checkpoint as ck

    path, saver, exchange, me = prepared.path, prepared.saver, prepared.exchange, prepared.me
    processes = prepared.processes
    temp = None
    try:
        temp = _create_temp(path, exchange) if me == 0 else None
        if saver.target is not None:
            saver.allocate(_analysed_everywhere(prepared),
                           own={leaf.name for _, leaf in prepared.own})
        part = _code(saver, prepared.own, exchange, me, processes)
    except BaseException as e:   # an interrupt too: the others would wait TIMEOUT_S
        _publish_failure(exchange, me, f"{type(e).__name__}: {e}")
        _abandon(temp, exchange, me, f"process {me} failed")
        raise
    exchange.put(f"part/{me}", part["public"])
    try:
        parts = [exchange.get(f"part/{i}") for i in range(processes)]
    except Exception:   # a process that never answered (TIMEOUT_S): no temporary file left
        if me == 0:
            _abandon(temp, exchange, me, "a process did not publish its part")
        raise
    exchange.delete_large()   # every process is past its analysis
    problem = _failed(parts)
    if problem:
        _abandon(temp, exchange, me, problem)
        raise ValueError(f"distributed save of {path} failed in {problem}")
    bases = [fmt.PREAMBLE_SIZE]
    for p in parts[:-1]:
        bases.append(fmt._align_up(bases[-1] + p["size"]))
    temp_path = exchange.get("temp")
    try:
        _write_region(temp_path, bases[me], part["placed"])
        exchange.put(f"done/{me}", "ok")
    except BaseException as e:
        why = f"process {me}: {type(e).__name__}: {e}"
        exchange.put(f"done/{me}", why)
        _abandon(temp, exchange, me, why)   # process 0 tells the others at once
        raise
    if me == 0:
        file_bytes = _commit(temp, path, parts, bases, saver, exchange, processes)
    else:
        outcome = exchange.get("commit")
        if not isinstance(outcome, int):
            raise ValueError(f"distributed save of {path} failed: {outcome}")
        file_bytes = outcome
    miss = ck._target_miss(saver.target, file_bytes, saver.rate,
                           records=[r for p in parts for r in p["records"].values()],
                           distributed=True)
    if miss:   # finish <- save_distributed <- save <- the caller
        warnings.warn(miss, stacklevel=4)
    reports = [None] * prepared.count
    for p in parts:
        for index, report in p["reports"].items():
            reports[int(index)] = ck.LeafReport(report[0], tuple(report[1]), *report[2:])
    return ck.SaveReport(path, reports, file_bytes)


def _code(saver, own: list, exchange: _Exchange, me: int, processes: int) -> dict:
    """This process's leaves coded: its region and what it publishes. As in
    a one-process save, the leaves a bias correction moves are coded last,
    once every process has published the shifts its weights add to them."""
    from jaxjpeg import checkpoint as ck
    correction = saver.bias_correction
    phases = saver.storing_phases(own)
    budgeted = isinstance(saver.encode, ck._BudgetEncoder)
    stored = []
    for late, phase in enumerate(phases):
        if late and correction.takers:
            exchange.put_once(f"shifts/{me}", {"shifts": correction.export()})
            for i in range(processes):
                if i != me:
                    correction.merge(_shifts_of(exchange, i))
        stored += ck.in_order(saver.store, phase, saver.workers, ck.SAVE_WINDOW_BYTES,
                              lambda item: item[1].nbytes, largest_first=not budgeted)
    own = phases[0] + phases[1]
    placed, table, size = _region(stored)
    records = {str(i): record for (i, _), (_, record, _, _) in zip(own, stored)}
    reports = {str(i): [r.path, list(r.shape), r.dtype, r.kind, r.raw_bytes, r.stored_bytes,
                        r.note, r.exact]
               for (i, _), (_, _, r, _) in zip(own, stored)}
    return {"placed": placed,
            "public": {"size": size, "blobs": table, "records": records, "reports": reports}}


def _analysed_everywhere(prepared: Prepared):
    """A byte target's ``analysed_by`` (see ``checkpoint._target_encoder``):
    each process analyses the leaves it codes and publishes the results;
    every process then holds all of them, in leaf order, and allocates the
    same budget. Each round of analysis (the allocation may ask for a
    second) has its own keys."""
    from jaxjpeg import checkpoint as ck
    exchange, me = prepared.exchange, prepared.me
    own = {leaf.name: leaf for _, leaf in prepared.own}
    rounds = itertools.count()

    def analysed_by(analyse, entries, floor):
        round_ = next(rounds)
        if round_ >= ANALYSIS_ROUNDS:   # every process alike: a failure could not be told
            raise RuntimeError(f"distributed save: more than {ANALYSIS_ROUNDS} analysis rounds")
        key = f"analysis/{round_}"
        try:
            mine = ck.analyse_here(analyse, [own[e.name] for e in entries if e.name in own],
                                   floor)
        except Exception as e:
            exchange.put(f"{key}/{me}", {"error": f"process {me}: {type(e).__name__}: {e}"})
            raise
        exchange.put_large(f"{key}/{me}", [_packed(result) for result in mine])
        results = {result[0]: result for result in mine}
        for i in range(prepared.processes):
            if i != me:
                results.update((r[0], r) for r in map(_unpacked, exchange.get_large(f"{key}/{i}")))
        return [results[e.name] for e in entries]
    return analysed_by


def _packed(result) -> list:
    """A leaf's analysis (name, (Curve, sensitivity, overhead, tile count) or
    None, raw bytes) as JSON values: the curve's arrays as base64 of their
    deflated bytes (exact)."""
    name, analysis, raw = result
    if analysis is None:
        return [name, None, int(raw)]
    curve, sensitivity, overhead, tiles = analysis
    arrays = {f.name: _array_text(getattr(curve, f.name)) for f in dataclasses.fields(curve)
              if getattr(curve, f.name) is not None}
    return [name, [arrays, float(sensitivity), int(overhead), int(tiles)], int(raw)]


def _unpacked(packed: list):
    from jaxjpeg import rate
    name, analysis, raw = packed
    if analysis is None:
        return name, None, raw
    arrays, sensitivity, overhead, tiles = analysis
    curve = rate.Curve(**{k: _text_array(v) for k, v in arrays.items()})
    return name, (curve, sensitivity, overhead, tiles), raw


def _array_text(a: np.ndarray) -> list:
    a = np.ascontiguousarray(a)
    return [a.dtype.str, list(a.shape), base64.b64encode(zlib.compress(a.tobytes())).decode()]


def _text_array(text: list) -> np.ndarray:
    dtype, shape, data = text
    return np.frombuffer(zlib.decompress(base64.b64decode(data)), np.dtype(dtype)).reshape(shape)


def _shifts_of(exchange: _Exchange, process: int) -> dict:
    """The bias-correction shifts ``process`` published (ValueError if it failed first)."""
    got = exchange.get(f"shifts/{process}")
    if "error" in got:
        raise ValueError(f"process {process} failed: {got['error']}")
    return got["shifts"]


def _shared_file(path) -> str:
    """``path`` as a local path (bytes, os.PathLike and file:// URLs alike);
    other URLs are refused: every process writes its part into one file in
    place (found by review: bytes paths crashed, URLs were taken as local
    names and refused as missing directories)."""
    location = storage.as_location(path)
    local = storage.local_path(location)
    if local is None:
        raise ValueError(f"{location}: a save from several processes writes its parts into "
                         "one file in place: it needs a path on a file system every process "
                         "shares, not a URL (save from one process to reach object stores)")
    return local


def _create_temp(path: str, exchange: _Exchange):
    """Process 0: the temporary file in the destination's directory, made as
    ContainerWriter makes its own (fmt.create_temp_file: a stale one is
    cleaned up the same way, a replaced file's permissions kept), beside the
    file a symlink names (found by review: made beside the link, its rename
    across file systems failed after all the coding)."""
    temp_path, fd = fmt.create_temp_file(fmt.replaced_file(path), path)
    exchange.put("temp", temp_path)
    return temp_path, fd


def _write_region(temp_path: str, base: int, placed: list) -> None:
    fd = os.open(temp_path, os.O_WRONLY)
    try:
        for offset, view in placed:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], base + offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def _abandon(temp, exchange: _Exchange, me: int, why: str) -> None:
    """Process 0 removes the temporary file (nothing is renamed, so the
    others' bytes go nowhere) and tells the others; they wait for that, so
    that every process raises only once nothing of the save is left."""
    if me != 0:
        exchange.get("commit")
        return
    if temp is not None:
        temp_path, fd = temp
        try:
            os.close(fd)
        except OSError:   # closed already
            pass
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
    exchange.put("commit", why)


def _commit(temp, path: str, parts: list, bases: list, saver, exchange: _Exchange,
            processes: int) -> int:
    """Process 0, once every region is written: header, preamble, rename."""
    temp_path, fd = temp
    try:
        done = [exchange.get(f"done/{i}") for i in range(processes)]
        bad = [f"process {i}: {d}" for i, d in enumerate(done) if d != "ok"]
        if bad:
            raise ValueError(f"distributed save of {path} failed in {bad[0]}")
        blobs, records = {}, {}
        for base, part in zip(bases, parts):
            for name, (offset, length, crc) in part["blobs"].items():
                blobs[name] = {"offset": base + offset, "length": length, "crc32c": crc}
            records.update({int(i): r for i, r in part["records"].items()})
        metadata = saver.metadata([records[i] for i in range(len(records))])
        header, flags = fmt._encode_header(blobs, metadata)
        header_offset = fmt._align_up(bases[-1] + parts[-1]["size"])
        os.pwrite(fd, header, header_offset)
        os.pwrite(fd, fmt._pack_preamble(header_offset, len(header), fmt.crc32c(header), flags), 0)
        os.fsync(fd)
        target = fmt.replaced_file(path)
        dir_fd = fmt._open_directory(os.path.dirname(storage.absolute(target)))
        try:
            os.replace(temp_path, target)
            if dir_fd is not None:
                os.fsync(dir_fd)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        os.close(fd)
    except BaseException as e:
        _abandon(temp, exchange, 0, f"{type(e).__name__}: {e}")
        raise
    file_bytes = header_offset + len(header)
    exchange.put("commit", file_bytes)
    return file_bytes
