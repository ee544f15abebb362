"""jaxjpeg: JPEG-coded JAX/Flax checkpoints, decoded on the device.

    jaxjpeg.save("model.jjpg", params)        # atomic, ~8x smaller than float32
    params = jaxjpeg.restore("model.jjpg")    # decoded on the device by an XLA custom call
    with jaxjpeg.open("model.jjpg") as f:     # one leaf, or one slice, at a time
        kernel = f.get("params/Dense_0/kernel")
"""

from jaxjpeg import calibration, feedback  # noqa: F401  (jaxjpeg.calibration.input_covariances)
from jaxjpeg.checkpoint import Policy, SaveReport, save
from jaxjpeg.checkpoint_restore import RestoreStats, restore
from jaxjpeg.compressed import CompressedArray, decode, load
from jaxjpeg.codec import (EncodedTensor, JpegError, Tile, decode_tensor, decode_tensors,
                           encode_tensor)
from jaxjpeg.feedback import InputCovariance
from jaxjpeg.format import FormatError
from jaxjpeg.lazy import LazyReader, LeafInfo, open

__version__ = "0.1.0"

__all__ = ["CompressedArray", "decode", "load", "EncodedTensor", "FormatError", "InputCovariance", "JpegError", "LazyReader", "LeafInfo", "Policy", "RestoreStats", "SaveReport",
           "Tile", "decode_tensor", "decode_tensors", "encode_tensor", "open", "restore", "save",
           "__version__"]
