"""Registration of the decode custom call and its per-platform lowerings.

The CPU handler lives in ``jaxjpeg._native``; the CUDA handler in
``jaxjpeg._native_cuda``, built only where CMake found a CUDA compiler. A
missing CUDA module only means no "cuda" lowering is registered.
"""

from __future__ import annotations

import jax
from jax.interpreters import mlir

from jaxjpeg import _native

TARGET_NAME = "jaxjpeg_decode"

try:
    from jaxjpeg import _native_cuda
except ImportError:  # built without CUDA
    _native_cuda = None

_registered = False


def cuda_available() -> bool:
    """Whether this build has the CUDA decoder."""
    return _native_cuda is not None


def _rule_without_params(rule):
    """Primitive params (output shapes and dtypes) shape the results, not the
    handler: they are dropped rather than sent as FFI attributes."""

    def lower(ctx, *operands, **params):
        del params
        return rule(ctx, *operands)

    return lower


def register(primitive) -> None:
    """Registers FFI targets and lowerings for ``primitive`` (idempotent)."""
    global _registered
    if _registered:
        return
    for name, capsule in _native.ffi_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    mlir.register_lowering(primitive, _rule_without_params(jax.ffi.ffi_lowering(TARGET_NAME)),
                           platform="cpu")
    if _native_cuda is not None:
        for name, capsule in _native_cuda.ffi_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        mlir.register_lowering(primitive,
                               _rule_without_params(jax.ffi.ffi_lowering(TARGET_NAME)),
                               platform="cuda")
    _registered = True
