"""Stacked layers: one leaf holding many layers' weights along an axis.

``nn.scan`` / ``nnx.scan`` over layers, ``vmap``-ed experts and MaxText's
scanned decoders store layer ``l``'s kernel as slice ``l`` of one leaf
(``(L, D, F)``, or ``(D, L, F)`` with ``param_scan_axis=1``). Saved
unstacked, each layer is its own leaf and gets a step relative to its own
RMS (the default) or its own share of a byte target; stacked, the layers
shared one step, so a layer of small weights came back with a large
relative error (scales 0.01 ... 0.08 stacked: relative error 0.39 ... 0.06
at the default rate where each layer unstacked had 0.09, and the file
was 29% larger).

A stacked leaf is coded as its layers would be: the stack axis leads the
rows of its view, each slice's rows get steps in proportion to the slice's
RMS, and the slice's size is what its error is weighed by
(:func:`jaxjpeg.checkpoint._data_free_weight`).

Found from shapes alone, where a scan leaves them: under one path prefix,
two or more leaves share the length of axis 0 (or, under a path part that
names a stack: ``layers``, ``scan``, ``experts``, ..., of axis 1), every
one of them has at least two axes and one has three, and either their
numbers of axes differ (a layer's norm scales stacked beside its kernels)
or they are 3-D under a part naming a stack. A module's unstacked parameters fail this: its biases
and norm scales are 1-D, and kernels alone (no bias) are 2-D or, as
convolutions, 4-D.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

_STACK_NAME = re.compile(r"scan|layers|experts|stack|repeat|blocks", re.IGNORECASE)
AXES = (0, 1)   # linen/NNX scans stack on axis 0; MaxText's param_scan_axis is 1
_BLOCK_ELEMENTS = 1 << 20


def path_parts(name: str) -> tuple[str, ...]:
    """A leaf path's parts (keys joined with '/', or '.' in flat state dicts)."""
    return tuple(re.split(r"[/.]", name))


def stack_axes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The stack axis of each stacked leaf among ``shapes`` (every leaf of
    the tree, path -> shape); leaves not stacked are left out.

    Prefixes are tried deepest first; a shallower one that passes extends
    the stack to every leaf under it (a scanned layer's norm scales beside
    its attention and MLP modules), unless it would give a leaf found
    stacked another axis: found by a test, a tree of one stacked run of
    convolution blocks and a head of the blocks' width passed as stacked
    along the channel axis."""
    parts = {name: path_parts(name) for name in shapes}
    found: dict[str, int] = {}
    depth = max((len(p) for p in parts.values()), default=0)
    for level in reversed(range(depth)):
        groups: dict[tuple, list[str]] = {}
        for name, p in parts.items():
            if len(p) > level:   # the leaf lies under the prefix p[:level]
                groups.setdefault(p[:level], []).append(name)
        for prefix, names in groups.items():
            axis = _group_axis(prefix, [tuple(shapes[n]) for n in names])
            if axis is not None and all(found.get(n, axis) == axis for n in names):
                found.update((n, axis) for n in names)
    return found


def _group_axis(prefix: tuple, shapes: list[tuple]) -> int | None:
    """The axis the leaves of ``shapes`` under ``prefix`` stack layers
    along, or None: two or more leaves, none 1-D, one at least 3-D, sharing
    the length of axis 0 (or, under a part naming a stack, of axis 1);
    their numbers of axes differ, or they are all 3-D under a part naming a
    stack (convolution kernels alone share their taps' length, and are 4-D)."""
    if len(shapes) < 2 or any(len(s) < 2 for s in shapes):
        return None
    ndims = {len(s) for s in shapes}
    named = any(_STACK_NAME.search(part) for part in prefix)
    if max(ndims) < 3 or not (len(ndims) > 1 or (ndims == {3} and named)):
        return None
    # Axis 1 needs the name too: a channel axis is often shared (found by a
    # test: a (256, 128) matrix beside a (64, 128, 3, 3) kernel).
    for axis in AXES[:2 if named else 1]:
        lengths = {s[axis] for s in shapes}
        if len(lengths) == 1 and lengths.pop() >= 2:
            return axis
    return None


def slice_weights(matrix: np.ndarray, slices: int, interleaved: bool = False) -> np.ndarray | None:
    """Per-row weights of a view whose rows are ``slices`` equal runs (the
    stack axis leads the rows; ``interleaved``: it ends them, row ``r``
    then in slice ``r % slices``): 1 / (the slice's RMS about its rows'
    means)^2, so each slice's step follows its own scale. None when no
    slice varies (nothing to weigh)."""
    rows, cols = matrix.shape
    sums, squares = np.zeros(rows), np.zeros(rows)
    block = max(1, _BLOCK_ELEMENTS // max(1, cols))   # no float64 copy of the leaf
    for r in range(0, rows, block):
        part = matrix[r:r + block]
        sums[r:r + block] = part.sum(axis=1, dtype=np.float64)
        squares[r:r + block] = np.einsum("ij,ij->i", part, part, dtype=np.float64)
    mean = sums / cols
    var = np.maximum(squares / cols - mean * mean, 0.0)
    var = var.reshape(-1, slices).mean(axis=0) if interleaved else var.reshape(slices, -1).mean(axis=1)
    if not np.any(var > 0):
        return None
    # a constant slice costs nothing at any step: the coarsest allowed (weight 0)
    weight = np.where(var > 0, 1.0 / np.where(var > 0, var, 1.0), 0.0)
    return np.tile(weight, rows // slices) if interleaved else np.repeat(weight, rows // slices)


def slice_rms(row_weight: np.ndarray) -> float:
    """The geometric mean of the slices' RMS, from :func:`slice_weights`:
    the scale a stacked leaf's step is relative to (so that each slice's
    step is the one it would get as a leaf of its own)."""
    w = row_weight[row_weight > 0]
    return float(np.exp(-0.5 * np.mean(np.log(w)))) if w.size else 0.0
