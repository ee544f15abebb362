"""An independent oracle for decoded weights: libjpeg-turbo's samples (through
Pillow for 8-bit tiles, imagecodecs for 12-bit ones) times each row's scale
plus its offset, in numpy: float32, two roundings (no fused multiply-add),
then round-to-nearest-even into the output dtype. Nothing of jaxjpeg's decoder
(not its IDCT, not its output stage) takes part, so a bug there cannot hide
by being on both sides of a comparison."""

import io

import imagecodecs
import numpy as np
from PIL import Image


def library_samples(data: bytes) -> np.ndarray:
    """A JPEG tile's samples as libjpeg-turbo decodes them."""
    if data[:2] == b"\xff\xd8" and b"\xff\xc1" in data[:400]:  # SOF1: 12-bit
        return np.asarray(imagecodecs.jpeg8_decode(data))
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def expected_weights(tiles, shape, scale, offset, dtype=np.float32) -> np.ndarray:
    """``tiles``: (data, row0, col0) of each tile of a 2-D view of ``shape``."""
    out = np.empty(shape, np.float32)
    scale = np.asarray(scale, np.float32)
    offset = np.asarray(offset, np.float32)
    for data, row0, col0 in tiles:
        s = library_samples(data).astype(np.float32)
        h, w = s.shape
        rows = slice(row0, row0 + h)
        product = (s * scale[rows, None]).astype(np.float32)   # rounded once
        out[rows, col0:col0 + w] = (product + offset[rows, None]).astype(np.float32)
    return out.astype(dtype)


def expected_tensor(enc, dtype=np.float32) -> np.ndarray:
    """The oracle for an EncodedTensor, reshaped to its shape."""
    tiles = [(t.data, t.row0, t.col0) for t in enc.tiles]
    return expected_weights(tiles, enc.matrix_shape, enc.row_scale, enc.row_offset,
                            dtype).reshape(enc.shape)
