"""Which tiles a shard overlaps, computed independently of jaxjpeg's restore
(from the shard's index and the tile records), for the sharded-restore scripts."""

import numpy as np


def overlaps(shape, index, box) -> bool:
    """Whether tile ``box = (row0, col0, h, w)`` of the 2-D view of a tensor of
    ``shape`` holds any element of the shard ``index`` (a tuple of slices)."""
    # rows of the 2-D view = row-major positions of the leading indices
    lead = [np.arange(d)[sl] for sl, d in zip(index[:-1], shape[:-1])]
    rows = (np.ravel_multi_index(np.meshgrid(*lead, indexing="ij"), shape[:-1]).ravel()
            if lead else np.zeros(1, int))
    cols = np.arange(shape[-1])[index[-1]]
    r0, c0, h, w = box
    return bool(np.any((rows >= r0) & (rows < r0 + h)) and np.any((cols >= c0) & (cols < c0 + w)))
