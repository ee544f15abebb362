"""jaxjpeg: JPEG-coded JAX/Flax checkpoints, decoded on the device.

    jaxjpeg.save("model.jjpg", params)        # atomic, ~8x smaller than float32
    params = jaxjpeg.restore("model.jjpg")    # decoded on the device by an XLA custom call
    with jaxjpeg.open("model.jjpg") as f:     # one leaf, or one slice, at a time
        kernel = f.get("params/Dense_0/kernel")

Paths may be local paths, ``os.PathLike`` objects or URLs (``gs://``,
``s3://``, ``https://``, ``memory://`` ...; see :mod:`jaxjpeg.storage`).

The names below are imported on first use (PEP 562), so ``import jaxjpeg``,
and the ``jaxjpeg --help`` command, do not import jax.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Policy": "checkpoint", "SaveReport": "checkpoint", "save": "checkpoint",
    "RestoreStats": "checkpoint_restore", "restore": "checkpoint_restore",
    "CompressedArray": "compressed", "decode": "compressed", "load": "compressed",
    "EncodedTensor": "codec", "JpegError": "codec", "Tile": "codec",
    "decode_tensor": "codec", "decode_tensors": "codec", "encode_tensor": "codec",
    "FormatError": "format", "InputCovariance": "feedback", "InputMean": "bias_correction",
    "LazyReader": "lazy", "LeafInfo": "lazy", "open": "lazy",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"jaxjpeg.{module}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # jaxjpeg.checkpoint and friends, as after an eager import
        return importlib.import_module(f"jaxjpeg.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"jaxjpeg.{name}":
            raise
    raise AttributeError(f"module 'jaxjpeg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
