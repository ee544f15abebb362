"""Registration of the decode custom call and its per-platform lowerings.

The CPU handler lives in ``jaxjpeg._native``; the CUDA handler in
``jaxjpeg._native_cuda``, built only where CMake found a CUDA compiler. A
missing CUDA module only means no "cuda" lowering is registered.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.interpreters import mlir

from jaxjpeg import _native

TARGET_NAME = "jaxjpeg_decode"
# The same decode of outputs its tiles may write in part (a region's box):
# no check that every element is written (xla_ops/plan_coverage.h).
PARTS_TARGET_NAME = "jaxjpeg_decode_parts"


def _target(whole_outputs: bool) -> str:
    return TARGET_NAME if whole_outputs else PARTS_TARGET_NAME

try:
    from jaxjpeg import _native_cuda
except ImportError:  # built without CUDA
    _native_cuda = None

_registered = False


def cuda_available() -> bool:
    """Whether this build has the CUDA decoder."""
    return _native_cuda is not None


def _cpu_rule(ctx, *operands, output_shapes, output_dtypes, whole_outputs):
    """Output shapes and dtypes shape the results, not the handler: they are
    not sent as FFI attributes; ``whole_outputs`` chooses the target."""
    del output_shapes, output_dtypes
    return jax.ffi.ffi_lowering(_target(whole_outputs))(ctx, *operands)


def cuda_workspace_bytes(avals_in, num_outputs: int) -> int:
    """Bytes of the CUDA handler's workspace: the output descriptors, the
    tables it builds from the packed ones and the destuffed intervals
    (xla_ops/decode_plan.h, DecodeWorkspaceBytes). Operands in the order of
    ops.OPERAND_NAMES: payload, interval starts, tiles, tables, ..."""
    payload, starts, tables = avals_in[0], avals_in[1], avals_in[3]
    return _native.decode_workspace_bytes(num_outputs, payload.shape[0],
                                          max(0, starts.shape[0] // 2 - 1),
                                          tables.shape[0] // _native.PACKED_TABLES_SIZE)


def _cuda_rule(ctx, *operands, output_shapes, output_dtypes, whole_outputs):
    """The CUDA handler destuffs every interval into its workspace before
    decoding, so that result is larger there than the primitive's (whose
    first bytes it returns). A result buffer, not scratch memory the handler
    allocates: XLA owns it, so a captured CUDA graph keeps a valid address."""
    del output_shapes, output_dtypes
    status, workspace, *outputs = ctx.avals_out
    size = cuda_workspace_bytes(ctx.avals_in, len(outputs))
    results = [jax.ShapeDtypeStruct(a.shape, a.dtype)
               for a in (status, jax.core.ShapedArray((size,), np.uint8), *outputs)]

    def run(*args):
        got_status, got_workspace, *got = jax.ffi.ffi_call(_target(whole_outputs),
                                                           results)(*args)
        return [got_status, got_workspace[:workspace.shape[0]], *got]

    return mlir.lower_fun(run, multiple_results=True)(ctx, *operands)


def register(primitive) -> None:
    """Registers FFI targets and lowerings for ``primitive`` (idempotent)."""
    global _registered
    if _registered:
        return
    for name, capsule in _native.ffi_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    mlir.register_lowering(primitive, _cpu_rule, platform="cpu")
    if _native_cuda is not None:
        for name, capsule in _native_cuda.ffi_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        mlir.register_lowering(primitive, _cuda_rule, platform="cuda")
    _registered = True
