"""The dtypes numpy spells only through ml_dtypes, by the names files record."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Every ml_dtypes type jax arrays hold: stored as raw leaves, exact (bfloat16
# may be coded). Quantized checkpoints carry the narrow ones (int4 weights,
# float8 activations' scales, MX formats' float8_e8m0fnu exponents).
_CANDIDATES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
               "float8_e4m3b11fnuz", "float8_e4m3", "float8_e3m4", "float8_e8m0fnu",
               "float4_e2m1fn", "int2", "uint2", "int4", "uint4")
# Not float6_e2m3fn / float6_e3m2fn: XLA holds no array of them, so no
# restore could give one back.
# Those this ml_dtypes provides (a file naming a newer one is refused as unknown).
ML_DTYPE_NAMES = tuple(name for name in _CANDIDATES if hasattr(ml_dtypes, name))


def spelled_here(name: str) -> bool:
    """Whether this install spells dtype ``name``: numpy's own, or one of
    ml_dtypes' that this ml_dtypes provides."""
    return name in ML_DTYPE_NAMES or name not in _CANDIDATES


def numpy_dtype(name: str) -> np.dtype:
    """np.dtype(name), ml_dtypes' names included."""
    return np.dtype(getattr(ml_dtypes, name) if name in ML_DTYPE_NAMES else name)


def value_bits(dtype) -> int:
    """Bits per value of ``dtype`` as a format holds it: 4 for int4 and
    float4_e2m1fn, which numpy keeps one per byte."""
    dtype = np.dtype(dtype)
    if dtype.name in ML_DTYPE_NAMES:
        info = ml_dtypes.finfo(dtype) if is_float(dtype) else ml_dtypes.iinfo(dtype)
        return info.bits
    return 8 * dtype.itemsize


def packed_nbytes(size: int, dtype) -> int:
    """Bytes of ``size`` values of ``dtype`` packed at :func:`value_bits` each: what
    reports count as a leaf's raw size."""
    return -(-size * value_bits(dtype) // 8)


def is_float(dtype) -> bool:
    """Floating point, ml_dtypes' floats included (numpy calls them and the
    narrow integers alike kind 'V')."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    return dtype.name in ML_DTYPE_NAMES and not dtype.name.startswith(("int", "uint"))
