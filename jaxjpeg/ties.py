"""Tied leaves: leaves of one tree that hold the same values, stored once.

A PyTorch state dict names a tied tensor once per module that uses it (a
language model's ``embed_tokens.weight`` and ``lm_head.weight``), and
``tensor.numpy()`` of each is the same memory: saved as two leaves, the file
held the embedding twice and a byte target coded the copies apart, so the
restored model's "tied" weights differed. The save stores such a leaf once
and records the others as ``tied`` to it (docs/format.md).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from jaxjpeg import quantized_vectors

# Smaller leaves are not looked at: a tie saves fewer bytes than comparing costs.
MIN_VALUES = 1024
_FINGERPRINT_VALUES = 64   # a spread sample tells most different leaves apart
_CHUNK = 1 << 22


def tied_leaves(leaves: Sequence, treatment: Callable[[object], Hashable | None]) -> dict[int, int]:
    """{index: index of the first leaf of the same values} among ``leaves``
    (SourceLeaf) held in memory, of one shape and dtype (whatever their
    shardings: a tied leaf restores into any), whose ``treatment(leaf)`` is
    the same (what the save does by a leaf's name: None where a leaf must
    keep its own coding)."""
    groups: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if not leaf.resident or leaf.prng_impl is not None or leaf.size < MIN_VALUES:
            continue
        key = treatment(leaf)
        if key is not None:
            groups.setdefault((leaf.shape, leaf.dtype, key), []).append(i)
    tied = {}
    for members in groups.values():
        firsts: list[tuple[int, np.ndarray, bytes]] = []
        for i in members:
            values = leaves[i].array()
            mark = _fingerprint(values)
            for j, first, first_mark in firsts:
                if mark == first_mark and _same_bits(values, first):
                    tied[i] = j
                    break
            else:
                firsts.append((i, values, mark))
    return tied


def _fingerprint(values: np.ndarray) -> bytes:
    flat = values.reshape(-1)
    return np.ascontiguousarray(quantized_vectors.sampled(flat, _FINGERPRINT_VALUES)).tobytes()


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one shape and dtype hold the same bits (NaN
    payloads and -0.0 included), compared a chunk at a time."""
    if _same_memory(a, b):
        return True
    fa, fb = a.reshape(-1), b.reshape(-1)
    for start in range(0, fa.size, _CHUNK):
        x = np.ascontiguousarray(fa[start:start + _CHUNK]).view(np.uint8)
        y = np.ascontiguousarray(fb[start:start + _CHUNK]).view(np.uint8)
        if not np.array_equal(x, y):
            return False
    return True
