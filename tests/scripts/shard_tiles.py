"""Which tiles a shard overlaps, computed independently of jaxjpeg's restore
(from the shard's index, the leaf's view and the tile records), for the
sharded-restore scripts."""

import math

import numpy as np


def overlaps(shape, index, box, view=None) -> bool:
    """Whether tile ``box = (row0, col0, h, w)`` of the 2-D view of a tensor of
    ``shape`` holds any element of the shard ``index`` (a tuple of slices).

    ``view`` is the leaf's (perm, split): axes ``perm[:split]`` are the rows;
    None means the framework's order (every axis but the last to rows)."""
    perm, split = view if view is not None else (tuple(range(len(shape))), len(shape) - 1)
    mask = np.zeros(shape, bool)
    mask[index] = True
    permuted = mask.transpose(perm)
    rows = math.prod(permuted.shape[:split])
    matrix = permuted.reshape(rows, -1)
    r0, c0, h, w = box
    return bool(matrix[r0:r0 + h, c0:c0 + w].any())
