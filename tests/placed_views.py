"""Tensors whose coded views move their data (the decoder writes them in
their own layout, placement by table): shared by the kernel-harness tests
and the GPU tests."""

import ml_dtypes
import numpy as np

import jaxjpeg
from jaxjpeg.views import MatrixView

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def placed_encodings(specs, *, seed, tile_shape, steps):
    """``specs`` ((shape, view perm, split) each) three times over, in every
    output type and both bit depths, restart intervals 0-3 and quantization
    steps 2 .. 1 + ``steps``: (encodings, dtypes)."""
    rng = np.random.default_rng(seed)
    encs, dtypes = [], []
    for k, (shape, perm, split) in enumerate(specs * 3):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        encs.append(jaxjpeg.encode_tensor(x, bits=12 if k % 2 else 8, quant_step=2 + k % steps,
                                          view=MatrixView(perm, split), restart_interval=k % 4,
                                          tile_shape=tile_shape))
        dtypes.append(DTYPES[k % 3])
    return encs, dtypes
