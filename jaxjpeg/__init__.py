"""jaxjpeg: JPEG-coded JAX/Flax checkpoints, decoded on the device."""

from jaxjpeg.codec import (EncodedTensor, JpegError, Tile, decode_tensor, decode_tensors,
                           encode_tensor)

__version__ = "0.1.0"

__all__ = ["EncodedTensor", "JpegError", "Tile", "decode_tensor", "decode_tensors",
           "encode_tensor", "__version__"]
