"""Leaves quantized per channel, stored as their codes.

Weights quantized to 4 bits per output channel and kept as floats (QAT's
fake-quantized weights, dequantized QDQ exports) take at most 16 values in
each slice along one axis, whole multiples of that slice's own step. The
leaf as a whole takes hundreds of values, so it is not one of the few-value
leaves stored exactly (``jaxjpeg.checkpoint.FEW_VALUES``), and JPEG coded it
lossily: at 8x a third of the codes moved (a (512, 1024) kernel's 34.8%),
where its information is 4 bits a weight.

Here such a leaf is stored as its integer codes, Rice coded as one vector
(:mod:`jaxjpeg.quantized_vectors`, in the leaf's C order), after one float32
step a slice (``stored: "quantized_slices"``, ``slice_axis``): the blob is
the steps, little-endian, then, where a leaf holds -0.0 (``round(w / s) *
s`` gives it), the sign bits of its values coded 0 (``zero_sign_bytes`` of
them, packed most significant bit first, C order), then the codes' blob.
Every value restores bit for bit, in about the codes' entropy (3-4 bits a
value).
"""

from __future__ import annotations

import math

import numpy as np

from jaxjpeg import quantized_vectors

STORED = "quantized_slices"
LEVELS = 16          # values a slice may take (4 bits)
MIN_REPEATS = 4      # values a slice holds per level at least (else nothing repeats)
_PROBE_VALUES = 4096  # values of each of three slices looked at first
_BLOCK_VALUES = 1 << 20   # (4 MiB of float32: the passes' temporaries stay small)


def find(array: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(axis, float32 step of each slice along it) where every slice of a
    float ``array`` along that axis takes at most LEVELS values, whole
    multiples of the slice's step (its smallest nonzero magnitude; an
    all-zero slice's is 1), restored equal by :func:`restore`; else None.
    The first values of three slices decide first, then two passes over the
    leaf a chunk of at most about _BLOCK_VALUES values at a time."""
    array = np.asarray(array)
    if array.ndim < 2:
        return None
    for axis, n in enumerate(array.shape):
        if n < 2 or array.size // n < MIN_REPEATS * LEVELS:
            continue
        slices = np.moveaxis(array, axis, 0)
        probe = np.stack([_head(slices[i], _PROBE_VALUES) for i in (0, n // 2, n - 1)])
        # a constant leaf is JPEG's (its blocks DC alone: a bit a value here)
        constant = np.all(probe == probe.flat[0])
        if constant or _on_steps(probe, _smallest(probe), array.dtype) is None:
            continue
        steps = np.full(n, np.inf, np.float32)
        for chunk in _chunks(array, axis):
            if not np.all(np.isfinite(chunk)):
                break
            steps = np.minimum(steps, _smallest(chunk))
        else:
            steps[~np.isfinite(steps)] = 1.0
            span = [np.full(n, np.inf), np.full(n, -np.inf)]
            for chunk in _chunks(array, axis):
                codes = _on_steps(chunk, steps, array.dtype)
                if codes is None:
                    break
                span = [np.minimum(span[0], codes.min(axis=1)),
                        np.maximum(span[1], codes.max(axis=1))]
                if np.any(span[1] - span[0] >= LEVELS):
                    break
            else:
                return axis, steps
    return None


def _head(x: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` values of ``x`` in C order, copying about those only."""
    if x.ndim <= 1:
        return x.reshape(-1)[:count]
    rows = -(-count // max(1, x[0].size))
    return x[:rows].reshape(-1)[:count] if rows > 1 else _head(x[0], count)


def _chunks(array: np.ndarray, axis: int):
    """``array`` in float32 chunks along its longest other axis, each as
    (its slices along ``axis``, their values in the chunk)."""
    along = max((a for a in range(array.ndim) if a != axis), key=lambda a: array.shape[a])
    length = max(1, _BLOCK_VALUES * array.shape[along] // max(1, array.size))
    for start in range(0, array.shape[along], length):
        part = np.take(array, np.arange(start, min(start + length, array.shape[along])), along)
        yield np.moveaxis(part, axis, 0).reshape(array.shape[axis], -1).astype(np.float32)


def _smallest(rows: np.ndarray) -> np.ndarray:
    """Each row's smallest nonzero magnitude (inf where it holds none)."""
    magnitude = np.abs(rows.astype(np.float32))
    return np.min(magnitude, axis=1, where=magnitude > 0, initial=np.inf)


def _on_steps(rows: np.ndarray, steps: np.ndarray, dtype) -> np.ndarray | None:
    """The codes of ``rows`` on their ``steps`` (inf: 1), where every value
    is its code times its step, rounded to ``dtype`` (-0.0 as 0.0) and the
    codes span fewer than LEVELS; else None."""
    x = rows.astype(np.float32)
    steps = np.where(np.isfinite(steps), steps, np.float32(1.0)).astype(np.float32)[:, None]
    with np.errstate(all="ignore"):   # subnormal steps: huge codes, refused below
        codes = np.rint(x / steps)
        if not np.all(np.isfinite(codes)) or np.any(codes.max(axis=1) - codes.min(axis=1)
                                                     >= LEVELS):
            return None
        restored = (codes * steps).astype(dtype).astype(np.float32)
    return codes if np.array_equal(restored, x) else None


def encode(array: np.ndarray, axis: int, steps: np.ndarray) -> tuple[bytes, dict] | None:
    """(blob, record fields) of ``array`` on its slices' ``steps`` (:func:`find`),
    or None where the codes cannot be coded."""
    x = np.asarray(array, np.float32)
    codes = x / steps.reshape(_broadcast_shape(array.shape, axis))
    np.rint(codes, out=codes)   # one leaf-sized copy
    coded = quantized_vectors.encode(codes, quantized_vectors.VectorStep(1.0))
    if coded is None:
        return None
    blob, record = coded
    record = {**record, "stored": STORED, "slice_axis": axis}
    signs = np.signbit(x[codes == 0])
    plane = np.packbits(signs).tobytes() if signs.any() else b""
    if plane:
        record["zero_sign_bytes"] = len(plane)
    return np.asarray(steps, "<f4").tobytes() + plane + bytes(blob), record


def check_record(record: dict, shape: tuple[int, ...], where: str) -> dict:
    """A leaf record's fields for :func:`restore` (the codes' fields of
    :func:`jaxjpeg.quantized_vectors.check_record`, and ``slice_axis``), or
    ValueError naming the bad one."""
    axis = record.get("slice_axis")
    if type(axis) is not int or not 0 <= axis < len(shape) or len(shape) < 2:
        raise ValueError(f"{where}: bad slice axis {axis!r:.40} for shape {shape}")
    if record.get("domain") != quantized_vectors.LINEAR:
        raise ValueError(f"{where}: per-slice codes on {record.get('domain')!r:.40} steps")
    if record.get("step") != 1.0:   # the slices' steps scale the codes (found by review:
        # a step of 2 doubled every value, silently)
        raise ValueError(f"{where}: per-slice codes on a step of {record.get('step')!r:.40}, "
                         "not 1")
    signs = record.get("zero_sign_bytes", 0)
    if type(signs) is not int or signs < 0:
        raise ValueError(f"{where}: bad zero sign size {signs!r:.40}")
    return {**quantized_vectors.check_record(record, where), "slice_axis": axis,
            "zero_sign_bytes": signs}


def restore(blob, shape: tuple[int, ...], fields: dict) -> np.ndarray:
    """The float32 values of a blob :func:`encode` wrote, from the leaf's
    checked record ``fields`` (:func:`check_record`); ValueError where the
    blob is not such a leaf's."""
    axis, sign_bytes = fields["slice_axis"], fields["zero_sign_bytes"]
    data = np.frombuffer(blob, np.uint8)
    head = 4 * shape[axis]
    if data.size < head + sign_bytes:
        raise ValueError(f"holds {data.size} bytes, fewer than its {shape[axis]} slice steps"
                         + (f" and {sign_bytes} bytes of zero signs" if sign_bytes else ""))
    steps = data[:head].view("<f4").astype(np.float32)
    if not np.all(np.isfinite(steps) & (steps > 0)):
        raise ValueError("holds a slice step that is not finite and positive")
    codes = quantized_vectors.decoded_values(data[head + sign_bytes:], math.prod(shape), fields)
    codes = codes.reshape(shape)
    with np.errstate(over="ignore"):
        values = codes * steps.reshape(_broadcast_shape(shape, axis))
    if not np.all(np.isfinite(values)):
        raise ValueError("restores values beyond float32's range")
    if sign_bytes:
        zeros = codes == 0
        count = int(np.count_nonzero(zeros))
        if sign_bytes != -(-count // 8):
            raise ValueError(f"holds {sign_bytes} bytes of signs for {count} zero codes")
        signs = np.unpackbits(data[head:head + sign_bytes])
        if signs[count:].any():
            raise ValueError("holds zero sign padding bits set")
        values[zeros] = np.where(signs[:count].astype(bool), np.float32(-0.0), np.float32(0.0))
    return values


def _broadcast_shape(shape, axis: int) -> tuple[int, ...]:
    return tuple(n if a == axis else 1 for a, n in enumerate(shape))
