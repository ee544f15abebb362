"""The decode primitive: JPEG tiles in, weight tensors out, inside jit.

``decode_p`` takes a decode plan's operands (see xla_ops/decode_plan.h) and
returns a status word, a small workspace, and the decoded tensors. Large data
(payload, index, tables, affine rows) are operands; the only parameters are
the output shapes and dtypes, which are what a compiled program must know.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from jaxjpeg import _native, codec, lowering

decode_p = Primitive("jaxjpeg_decode")
decode_p.multiple_results = True

_OPERAND_DTYPES = (np.uint8, np.int32, np.int32, np.uint8, np.float32, np.float32, np.float32,
                   np.int32, np.int32)
# The operands in order (xla_ops/ffi_decode.h); tests index them by name.
OPERAND_NAMES = ("payload", "interval_starts", "tiles", "tables", "row_scale", "row_offset",
                 "col_scale", "positions", "block_map")


def _abstract_eval(*operands, output_shapes, output_dtypes, whole_outputs):
    if len(operands) != len(OPERAND_NAMES):
        raise TypeError(f"jaxjpeg decode takes {len(OPERAND_NAMES)} operands "
                        f"({', '.join(OPERAND_NAMES)}), got {len(operands)}")
    for operand, dtype, name in zip(operands, _OPERAND_DTYPES, OPERAND_NAMES):
        if operand.ndim != 1 or operand.dtype != dtype:
            raise TypeError(f"jaxjpeg decode: {name} must be a 1-D {np.dtype(dtype).name} array, "
                            f"got {operand.dtype.name}{list(operand.shape)}")
    for dtype in output_dtypes:
        codec.output_type(dtype)  # raises TypeError for unsupported dtypes
    status = jax.core.ShapedArray((1,), np.int32)
    workspace = jax.core.ShapedArray((len(output_shapes) * _native.PLAN_OUTPUT_SIZE,), np.uint8)
    outputs = [jax.core.ShapedArray(tuple(s), np.dtype(d)) for s, d in zip(output_shapes, output_dtypes)]
    return [status, workspace, *outputs]


@functools.lru_cache(maxsize=None)
def _compiled_impl(output_shapes, output_dtypes, whole_outputs):
    return jax.jit(functools.partial(decode_p.bind, output_shapes=output_shapes,
                                     output_dtypes=output_dtypes, whole_outputs=whole_outputs))


def _impl(*operands, output_shapes, output_dtypes, whole_outputs):
    """Eager calls run the same compiled custom call as jit does; a corrupt
    stream is a JpegError here (waited for, so asynchronous dispatch cannot
    let it surface later as another error type)."""
    with jpeg_errors(), outside_mesh():
        return jax.block_until_ready(
            _compiled_impl(output_shapes, output_dtypes, whole_outputs)(*operands))


def _batch(args, dims, *, output_shapes, output_dtypes, whole_outputs):
    """vmap: one decode per batch element (each element is a full plan)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if size == 0:   # no element to decode: empty results of each output's shape
        elements = [a if d is None else jax.ShapeDtypeStruct(a.shape[:d] + a.shape[d + 1:], a.dtype)
                    for a, d in zip(args, dims)]
        avals = _abstract_eval(*elements, output_shapes=output_shapes, output_dtypes=output_dtypes,
                               whole_outputs=whole_outputs)
        return [jnp.zeros((0, *aval.shape), aval.dtype) for aval in avals], [0] * len(avals)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    per_element = [
        decode_p.bind(*[m if d is None else m[i] for m, d in zip(moved, dims)],
                      output_shapes=output_shapes, output_dtypes=output_dtypes,
                      whole_outputs=whole_outputs)
        for i in range(size)
    ]
    stacked = [jnp.stack(results) for results in zip(*per_element)]
    return stacked, [0] * len(stacked)


def _not_differentiable(primals, tangents, **params):
    raise TypeError("jaxjpeg decode is not differentiable: it reads compressed bytes. "
                    "Decode outside the differentiated function, or apply "
                    "jax.lax.stop_gradient to its inputs.")


decode_p.def_abstract_eval(_abstract_eval)
decode_p.def_impl(_impl)
batching.primitive_batchers[decode_p] = _batch
ad.primitive_jvps[decode_p] = _not_differentiable
lowering.register(decode_p)


def plan_operands(plan: codec.DecodePlan) -> tuple[np.ndarray, ...]:
    """A host plan as the primitive's operands (int64 tables as int32 pairs)."""
    return (plan.payload, plan.interval_starts.view(np.int32), plan.tiles.reshape(-1).view(np.int32),
            plan.tables, plan.row_scale, plan.row_offset, plan.col_scale,
            plan.positions.view(np.int32), plan.block_map.reshape(-1))


def decode(*operands, output_shapes, output_dtypes, whole_outputs: bool = True):
    """Binds the primitive; returns (status, [decoded 2-D tensors]).
    ``whole_outputs``: the plan's tiles write every element of each output
    exactly once, which the decode checks (xla_ops/plan_coverage.h); False
    for a region's box, whose tiles may leave parts of it unwritten (the
    restore's own plans, never a loaded tree's operands)."""
    shapes = tuple(tuple(int(d) for d in s) for s in output_shapes)
    dtypes = tuple(np.dtype(d).name for d in output_dtypes)
    status, _, *outputs = decode_p.bind(*operands, output_shapes=shapes, output_dtypes=dtypes,
                                        whole_outputs=bool(whole_outputs))
    return status, outputs


def decode_plan(plan: codec.DecodePlan, operands=None):
    """Decodes a plan with the primitive; ``operands`` may be device arrays."""
    operands = plan_operands(plan) if operands is None else operands
    return decode(*operands, output_shapes=plan.output_shapes, output_dtypes=plan.output_dtypes)


# The one reading of a decode's status: the status word (GPU, and every
# platform inside jit) and the CPU handler's error, which carries the same
# text (_native.plan_failure, shared with the FFI handlers).
_FAILURE_TEXT = _native.plan_failure(_native.pack_plan_status(0, 1)).split(" 0:")[0]
_REFUSED_TEXT = "decode plan refused: "   # a plan the handler refuses whole (ffi_decode.h)


_EAGER_ONLY = ("jaxjpeg.restore and jaxjpeg.open(...).get read and check the file eagerly "
               "and cannot run under jax.jit, vmap or grad: call jaxjpeg.load(path) outside "
               "and jaxjpeg.decode(loaded) inside")


def refuse_traced(value) -> None:
    """Raises check_status's TypeError where ``value`` (a decode's status, a
    shard placed) is a tracer (a restore traced by jax.jit): checked as soon
    as a decode returns or a raw leaf's shard is placed, since a sharded
    target failed first in jax's own assembly of the shards (found by review)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(_EAGER_ONLY)


def check_status(status, labels: codec.TileLabels | None = None) -> None:
    """Raises JpegError if a decode reported a corrupt interval (waits for it),
    naming the tile it lies in where the plan's ``labels`` are given.
    Under a trace (``jax.jit`` around ``restore`` or a lazy ``get``) there is
    no status to read yet: a TypeError says what to call instead (found by
    review: jax's TracerArrayConversionError from inside jaxjpeg)."""
    refuse_traced(status)
    value = int(np.asarray(status)[0])
    if value != _native.PLAN_OK:
        raise codec.JpegError(_naming_tile(_native.plan_failure(value), labels))


def _naming_tile(text: str, labels: codec.TileLabels | None) -> str:
    output = re.search(r"decoded tensor (\d+)(?!\d)(?! \()", text)   # a plan's output
    if output is not None and labels is not None:   # (found by review: named by number)
        label = labels.of_output(int(output[1]))
        if label is not None:
            return f"{text[:output.end()]} ({label}){text[output.end():]}"
    # not named yet (found by review: "interval 12 of ..." matched as "1")
    match = re.search(r"restart interval (\d+)(?!\d)(?! of )", text)
    found = None if labels is None or match is None else labels.of_interval(int(match[1]))
    if found is None:
        return text
    label, interval = found
    return f"{text[:match.start()]}restart interval {interval} of {label}{text[match.end():]}"


@contextlib.contextmanager
def outside_mesh():
    """Decodes of arrays committed to one device run outside a user's
    ``jax.set_mesh`` context, under which jit refuses them (found by review:
    a restore into the context mesh's own sharding failed); not inside a
    trace, where jax.set_mesh is refused."""
    if jax.sharding.get_abstract_mesh().empty:   # (get_mesh is refused under jit)
        yield
        return
    with jax.set_mesh(None):
        yield


@contextlib.contextmanager
def jpeg_errors(labels: codec.TileLabels | None = None):
    """Inside: a decode failure, however jax raises it, becomes a JpegError
    (naming the tile, as check_status does)."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        if isinstance(e, codec.JpegError):   # raised inside, perhaps without the tile named
            named = _naming_tile(str(e), labels)
            if named == str(e):
                raise
            raise codec.JpegError(named) from None
        text = str(e)
        marker = next((m for m in (_FAILURE_TEXT, _REFUSED_TEXT) if m in text), None)
        if marker is None:
            raise
        raise codec.JpegError(_naming_tile(text[text.index(marker):].splitlines()[0],
                                           labels)) from None


def run_checked(decode, operands):
    """Runs a jitted ``decode`` returning ``(status, outputs)``; returns the
    outputs once the status says every interval decoded, else raises
    JpegError. The status is read inside the error conversion, so a failure
    that asynchronous dispatch reports late is a JpegError too."""
    with jpeg_errors():
        status, outputs = decode(*operands)
        check_status(status)
    return outputs


@functools.lru_cache(maxsize=None)
def plan_decoder(output_shapes: tuple, output_dtypes: tuple, final_shapes: tuple,
                 whole_outputs: bool = True):
    """A jitted decode whose outputs are reshaped to ``final_shapes``; cached
    so restoring the same structure again reuses the compiled program."""

    def run(*operands):
        status, outputs = decode(*operands, output_shapes=output_shapes,
                                 output_dtypes=output_dtypes, whole_outputs=whole_outputs)
        return status, [o.reshape(s) for o, s in zip(outputs, final_shapes)]

    return jax.jit(run)
