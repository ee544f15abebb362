"""How far a raw leaf a byte target stored lossily may restore from the
values it was given: float16 with 8 significand bits, or a BatchNorm vector
quantized on the step its record gives (jaxjpeg.quantized_vectors)."""

import numpy as np

from jaxjpeg.checkpoint_reader import Checkpoint


def rounding_bound(path, name: str, values) -> np.ndarray:
    """Per element, the most leaf ``name`` of the file at ``path`` may differ
    from ``values``, the values it was saved with."""
    values = np.abs(np.asarray(values, np.float64))
    with Checkpoint(path) as ckpt:
        leaf = next(leaf for leaf in ckpt.leaves if leaf.path == name)
    if leaf.quantized is not None and leaf.quantized["domain"] == "linear":
        return leaf.quantized["step"] / 2 + 2 ** -20 * values   # and float32's rounding
    return 2 ** -8 * values + 1e-7
