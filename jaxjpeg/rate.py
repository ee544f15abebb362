"""Rate control: how many bytes each tensor gets, and at what error.

Every control here works in the weight domain. With ``clip="common"`` (see
:mod:`jaxjpeg.mapping`) a tensor's rows share one scale ``c`` (or scales
``c * rel[r]`` with row weights), and a flat table of integer step ``Δ``
quantizes every weight's DCT coefficients with step ``q = Δ * c``: plain
uniform quantization plus JPEG's entropy coding. ``q`` is the one knob; the
sample depth follows from it: 8-bit samples while ``Δ8 = q / c8 >= 8`` (the
decoder's rounding to integers then adds at most 1/64 of the coding noise),
12-bit samples (16x finer rounding, steps up to 65535) below that.

* :func:`encode_at_step` codes a tensor at a weight-domain step ``q``.
* :func:`encode_for_error` finds the smallest coding whose decoded relative
  RMS error is within a bound (measured by decoding, not predicted).
* :func:`allocate_to_target` splits a byte budget across tensors at equal
  sensitivity-weighted rate–distortion slope (a common Lagrange multiplier).
* :func:`sensitivity_from_gradients` measures per-leaf (or per-row) mean
  squared gradients to weight that allocation.

Sizes are ``EncodedTensor.nbytes``: JPEG bytes plus the per-row affine map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping

import numpy as np

from jaxjpeg import codec, mapping
from jaxjpeg.treepaths import key_record, path_string

STEP_LIMIT = {8: 255, 12: 65535}
MIN_STEP_8BIT = 8          # below this 8-bit rounding noise exceeds 1/64 of the coding noise
LADDER_STEP = 0.25         # log2 spacing of allocate_to_target's step candidates
LADDER_RANGE = (-3.0, 11.0)  # candidates q = rms * 2^-k for k in this range


# ----------------------------------------------------------------------------
# One tensor at one step
# ----------------------------------------------------------------------------

def _view(x) -> np.ndarray:
    arr = np.asarray(x)
    return arr.reshape(codec.matrix_shape(arr.shape)).astype(np.float32)


def base_scale(x, bits: int, row_weight=None) -> float:
    """The weight-domain step of ``Δ = 1`` at ``bits`` (geometric mean over rows)."""
    scale = mapping.common_scale(_view(x), bits, row_weight).astype(np.float64)
    if not np.all(scale > 0):  # constant rows: any step codes them exactly
        return 1.0
    return float(np.exp(np.mean(np.log(scale))))


def step_for(x, q: float, bits: int | None = None, row_weight=None) -> tuple[int, int]:
    """``(bits, Δ)`` that code ``x`` at (about) weight-domain step ``q``."""
    if q <= 0 or not math.isfinite(q):
        raise ValueError(f"step q must be positive and finite, got {q}")
    if bits is None:
        delta8 = q / base_scale(x, 8, row_weight)
        if delta8 >= MIN_STEP_8BIT:
            return 8, min(STEP_LIMIT[8], round(delta8))
        bits = 12
    if bits not in STEP_LIMIT:
        raise ValueError(f"bits must be 8, 12 or None, got {bits}")
    delta = round(q / base_scale(x, bits, row_weight))
    return bits, int(min(STEP_LIMIT[bits], max(1, delta)))


def encode_with_step(x, bits: int, delta: int, row_weight=None, *, clip: str = "common",
                     **options) -> codec.EncodedTensor:
    """Codes ``x`` at integer step ``delta`` (sample units), by default with ``clip="common"``."""
    return codec.encode_tensor(x, bits=bits, quant_step=delta, clip=clip, row_weight=row_weight,
                               **options)


def encode_at_step(x, q: float, *, bits: int | None = None, row_weight=None,
                   **options) -> codec.EncodedTensor:
    """Codes ``x`` at weight-domain step ``q`` (``bits=None``: 8 or 12, see module doc).

    ``row_weight``: per-row importance of the 2-D view; row ``r``'s step
    becomes ``q * rel[r]`` with ``rel ∝ row_weight^-½`` (geometric mean 1).
    ``options`` go to :func:`jaxjpeg.codec.encode_tensor` (restart_interval, ...).
    """
    b, delta = step_for(x, q, bits, row_weight)
    return encode_with_step(x, b, delta, row_weight, **options)


def squared_error(x, enc: codec.EncodedTensor) -> float:
    """Sum of squared errors of ``enc`` decoded against ``x`` (float64)."""
    diff = np.asarray(x, np.float64) - codec.decode_tensor(enc).astype(np.float64)
    return float(np.sum(diff * diff))


def relative_error(x, enc: codec.EncodedTensor) -> float:
    """``||x - decode(enc)|| / ||x||`` (0 when both are zero)."""
    norm = float(np.linalg.norm(np.asarray(x, np.float64)))
    err = math.sqrt(squared_error(x, enc))
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)


# ----------------------------------------------------------------------------
# Error bound
# ----------------------------------------------------------------------------

def encode_for_error(x, rel_rms: float, *, bits: int | None = None, row_weight=None,
                     **options) -> codec.EncodedTensor:
    """The smallest coding of ``x`` with ``||x - x̂|| / ||x|| <= rel_rms``, x̂ decoded.

    Binary-searches the integer step (errors are measured by decoding). With
    ``bits=None`` 8-bit samples are tried first and 12-bit ones as well when
    8-bit needs steps under 8 (rounding-dominated) or cannot meet the bound;
    the smaller coding wins. Bounds too tight for one shared scale (12-bit
    rounding of a tensor with far outliers) fall back to per-row ranges
    (``clip="minmax"``, at ``bits`` when given). Raises ValueError if no step
    meets the bound.
    """
    if not rel_rms > 0:
        raise ValueError(f"rel_rms must be positive, got {rel_rms}")
    x = np.asarray(x)
    norm2 = float(np.sum(np.square(x, dtype=np.float64)))
    budget = rel_rms * rel_rms * norm2
    rms = math.sqrt(norm2 / x.size)
    found = []
    for b in ((8, 12) if bits is None else (bits,)):
        best = _largest_step_within(x, b, budget, rel_rms * rms, row_weight, options)
        if best is not None:
            found.append(best)
            if b == 8 and best[0] >= MIN_STEP_8BIT:
                break
    if not found:  # per-row ranges, at the bits asked for (12 when free to choose)
        best = _largest_step_within(x, 12 if bits is None else bits, budget, rel_rms * rms, None,
                                    dict(options, clip="minmax"))
        if best is not None:
            return best[1]
    if not found:
        raise ValueError(f"no step meets relative error {rel_rms} (bits={bits})")
    return min(found, key=lambda item: item[1].nbytes)[1]


def _largest_step_within(x, bits, budget, target_rms, row_weight, options):
    """(Δ, encoding) with the largest Δ whose squared error <= budget, or None."""
    limit = STEP_LIMIT[bits]
    if options.get("clip", "common") == "common":
        base = base_scale(x, bits, row_weight)
    else:  # per-row ranges: a typical row's scale
        view = _view(x)
        base = float(np.median(view.max(axis=1) - view.min(axis=1))) / mapping.sample_max(bits) or 1.0
    cache = {}

    def trial(delta):
        if delta not in cache:
            enc = encode_with_step(x, bits, delta, row_weight, **options)
            cache[delta] = (squared_error(x, enc) <= budget, enc)
        return cache[delta][0]

    # Uniform quantization: rms error ≈ q / sqrt(12); start there, then bracket.
    guess = int(min(limit, max(1, math.floor(target_rms * math.sqrt(12) / base))))
    if trial(guess):
        good, bad = guess, None
        while good < limit:
            nxt = min(limit, good * 2)
            if trial(nxt):
                good = nxt
            else:
                bad = nxt
                break
        if bad is None:
            return good, cache[good][1]
    else:
        good, bad = None, guess
        while bad > 1:
            nxt = max(1, bad // 2)
            if trial(nxt):
                good = nxt
                break
            bad = nxt
        if good is None:
            return None
    while bad - good > 1:
        mid = (good + bad) // 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    return good, cache[good][1]


# ----------------------------------------------------------------------------
# Budget allocation
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Allocation:
    """Result of :func:`allocate_to_target`."""

    encodings: dict            # name -> EncodedTensor
    nbytes: int                # achieved total (sum of EncodedTensor.nbytes)
    target_bytes: int
    steps: dict                # name -> weight-domain step q
    squared_errors: dict       # name -> sum of squared errors
    slope: float               # the Lagrange multiplier λ (weighted SSE per byte)

    @property
    def relative_miss(self) -> float:
        return self.nbytes / self.target_bytes - 1.0


@dataclasses.dataclass
class _Candidate:
    q: float
    nbytes: int
    sse: float
    enc: codec.EncodedTensor


def _ladder(x, bits, row_weight, options, lo=LADDER_RANGE[0], hi=LADDER_RANGE[1],
            spacing=LADDER_STEP) -> list[_Candidate]:
    """Codings of ``x`` at steps ``rms * 2^-k``, deduplicated, sorted by size."""
    arr = np.asarray(x)
    rms = math.sqrt(float(np.mean(np.square(arr, dtype=np.float64))))
    if rms == 0:
        rms = 1.0
    seen, out = set(), []
    for k in np.arange(lo, hi + 1e-9, spacing):
        q = rms * 2.0 ** -k
        b, delta = step_for(arr, q, bits, row_weight)
        if (b, delta) in seen:
            continue
        seen.add((b, delta))
        enc = encode_with_step(arr, b, delta, row_weight, **options)
        out.append(_Candidate(q, enc.nbytes, squared_error(arr, enc), enc))
    out.sort(key=lambda c: (c.nbytes, c.sse))
    # Keep the lower convex hull of (bytes, sse): only those can be Lagrange-optimal.
    hull: list[_Candidate] = []
    for c in out:
        if hull and c.sse >= hull[-1].sse:
            continue
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], c) <= 0:
            hull.pop()
        hull.append(c)
    return hull


def _cross(a, b, c) -> float:
    return (b.nbytes - a.nbytes) * (c.sse - a.sse) - (b.sse - a.sse) * (c.nbytes - a.nbytes)


def allocate_to_target(tensors: Mapping[str, np.ndarray], target_bytes: int | None = None, *,
                       ratio: float | None = None, sensitivity: Mapping[str, float] | None = None,
                       row_weights: Mapping[str, np.ndarray] | None = None,
                       bits: int | None = None, tolerance: float = 0.02,
                       **options) -> Allocation:
    """Codes every tensor so the total size is within ``tolerance`` of the target.

    Exactly one of ``target_bytes`` or ``ratio`` (target = original bytes /
    ratio). Minimises ``Σ sensitivity[name] * SSE[name]`` (SSE measured by
    decoding; sensitivity defaults to 1, e.g. mean squared gradients from
    :func:`sensitivity_from_gradients`) by one Lagrange multiplier λ: each
    tensor takes the candidate step minimising ``sensitivity * SSE + λ *
    bytes``; λ is bisected to the largest total within the target, leftover
    budget goes greedily to the steepest refinements, then one tensor's step
    is refined continuously to close the gap. ``row_weights`` optionally gives
    per-row importances (see :func:`encode_at_step`). Raises ValueError when
    even the coarsest steps exceed the target.
    """
    if (target_bytes is None) == (ratio is None):
        raise ValueError("give exactly one of target_bytes or ratio")
    names = list(tensors)
    if not names:
        raise ValueError("no tensors to allocate")
    if target_bytes is None:
        target_bytes = int(sum(np.asarray(tensors[n]).nbytes for n in names) / ratio)
    sens = {n: float((sensitivity or {}).get(n, 1.0)) for n in names}
    if any(not (s >= 0 and math.isfinite(s)) for s in sens.values()):
        raise ValueError("sensitivities must be finite and non-negative")
    rw = {n: (row_weights or {}).get(n) for n in names}
    ladders = {n: _ladder(tensors[n], bits, rw[n], options) for n in names}

    def pick(lam):
        return {n: min(range(len(ladders[n])),
                       key=lambda k: sens[n] * ladders[n][k].sse + lam * ladders[n][k].nbytes)
                for n in names}

    def total(choice):
        return sum(ladders[n][k].nbytes for n, k in choice.items())

    coarsest = {n: 0 for n in names}
    if total(coarsest) > target_bytes:
        raise ValueError(f"target {target_bytes} bytes is below the smallest coding "
                         f"({total(coarsest)} bytes)")
    finest = {n: len(ladders[n]) - 1 for n in names}
    if total(finest) <= target_bytes:
        choice, lam = finest, 0.0
    else:
        # Slopes span many decades: bisect log λ between bounds that bracket the target.
        slopes = [sens[n] * (a.sse - b.sse) / max(1, b.nbytes - a.nbytes)
                  for n in names for a, b in zip(ladders[n], ladders[n][1:])]
        positive = [s for s in slopes if s > 0] or [1.0]
        lo, hi = math.log(min(positive)) - 1, math.log(max(positive)) + 1
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if total(pick(math.exp(mid))) > target_bytes:
                lo = mid
            else:
                hi = mid
        lam = math.exp(hi)
        choice = pick(lam)
    choice = _greedy_fill(ladders, sens, choice, target_bytes)
    encodings = {n: ladders[n][k].enc for n, k in choice.items()}
    sse = {n: ladders[n][k].sse for n, k in choice.items()}
    steps = {n: ladders[n][k].q for n, k in choice.items()}
    _refine(tensors, ladders, choice, encodings, sse, steps, target_bytes, tolerance, bits, rw,
            options)
    achieved = sum(e.nbytes for e in encodings.values())
    return Allocation(encodings, achieved, int(target_bytes), steps, sse, lam)


def _greedy_fill(ladders, sens, choice, target):
    """Spends leftover bytes on the refinements with the best error drop per byte."""
    choice = dict(choice)
    spare = target - sum(ladders[n][k].nbytes for n, k in choice.items())
    while True:
        best, best_gain = None, 0.0
        for n, k in choice.items():
            if k + 1 < len(ladders[n]):
                a, b = ladders[n][k], ladders[n][k + 1]
                cost = b.nbytes - a.nbytes
                if cost <= spare:
                    gain = sens[n] * (a.sse - b.sse) / max(cost, 1)
                    if gain > best_gain:
                        best, best_gain = n, gain
        if best is None:
            return choice
        k = choice[best]
        spare -= ladders[best][k + 1].nbytes - ladders[best][k].nbytes
        choice[best] = k + 1


def _refine(tensors, ladders, choice, encodings, sse, steps, target, tolerance, bits, rw, options):
    """Closes the remaining gap by a continuous step between two ladder rungs of one tensor."""
    def achieved():
        return sum(e.nbytes for e in encodings.values())

    order = sorted(choice, key=lambda n: -encodings[n].nbytes)
    for n in order:
        if achieved() >= (1 - tolerance / 2) * target:
            return
        k = choice[n]
        if k + 1 >= len(ladders[n]):
            continue
        others = achieved() - encodings[n].nbytes
        lo_q, hi_q = ladders[n][k + 1].q, ladders[n][k].q   # fine (bigger), coarse (smaller)
        x = np.asarray(tensors[n])
        for _ in range(12):
            q = math.sqrt(lo_q * hi_q)
            enc = encode_at_step(x, q, bits=bits, row_weight=rw[n], **options)
            if others + enc.nbytes <= target:
                hi_q = q
                encodings[n], steps[n], sse[n] = enc, q, squared_error(x, enc)
                if others + enc.nbytes >= (1 - tolerance / 2) * target:
                    break
            else:
                lo_q = q
            if hi_q / lo_q < 1.0005:
                break


# ----------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------

def leaf_name(path) -> str:
    """A jax key path as the checkpoint names leaves (slash-joined, as
    ``paths=`` patterns, targets and ``sensitivity`` keys match them)."""
    return path_string([key_record(k) for k in path])


def sensitivity_from_gradients(loss_fn: Callable, params, batches: Iterable, *,
                               per_row: bool = False) -> dict:
    """Mean squared gradient of ``loss_fn(params, batch)`` per leaf, over ``batches``.

    Returns ``{leaf name: float}`` (names as :func:`leaf_name`), or with
    ``per_row=True`` ``{leaf name: float64 [rows]}``, the mean over each row of
    the leaf's 2-D coding view (usable as ``row_weights``). The squared
    gradient approximates the diagonal Fisher information, so
    ``sensitivity * squared error`` estimates the loss increase.
    """
    import jax
    import jax.numpy as jnp

    grad_fn = jax.jit(jax.grad(loss_fn))

    def reduce(g):
        g2 = jnp.square(g.astype(jnp.float32))
        if per_row:
            rows, cols = codec.matrix_shape(g.shape)
            return jnp.mean(g2.reshape(rows, cols), axis=1)
        return jnp.mean(g2)

    reduce_tree = jax.jit(lambda g: jax.tree_util.tree_map(reduce, g))
    acc, count = None, 0
    for batch in batches:
        r = reduce_tree(grad_fn(params, batch))
        acc = r if acc is None else jax.tree_util.tree_map(jnp.add, acc, r)
        count += 1
    if count == 0:
        raise ValueError("no batches")
    flat, _ = jax.tree_util.tree_flatten_with_path(acc)
    out = {}
    for path, value in flat:
        value = np.asarray(value, np.float64) / count
        out[leaf_name(path)] = value if per_row else float(value)
    return out
