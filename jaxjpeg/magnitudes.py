"""Leaves whose magnitudes matter value by value: coded on log2 steps.

An optimizer's second moments (Adam's ``nu``, Adagrad's sums, PyTorch's
``exp_avg_sq``) are >= 0, spread over many decades, and training divides by
their square roots. JPEG's step follows a leaf's spread, so it restores most
of such a leaf as zero: a default save of Adam's state for a 512 x 512
kernel gave back 80% of ``nu`` as 0, and the next update 2.7e5 times its
norm off. Such a leaf is quantized on a log2 step instead
(:mod:`jaxjpeg.quantized_vectors`, ``log2``): every value within
:data:`LOG_STEP`'s relative error, zeros exact.

The first moments beside them (Adam's ``mu``) are divided by those roots
value by value, so an error small against the leaf's spread is large where
the second moment is small: with ``nu`` exact, a JPEG-coded ``mu`` moved
that update by 66% of its norm. A leaf of a second moment's shape whose path
differs from its path in one component (``opt_state/0/mu/w`` beside
``opt_state/0/nu/w``, ``state/3/exp_avg`` beside ``state/3/exp_avg_sq``) and
whose magnitudes stay within a few of its roots (:func:`bounded_by`) is
coded on log2 steps of its magnitudes, with its signs (``signed_log2``).

bfloat16 and float16 moments are coded so too and restored, in their dtype,
through float32 (stored exactly before session 29, at twice float32's bits).

A centered RMSprop (optax's ``rmsprop(centered=True)``, PyTorch's
``RMSprop(centered=True)``) divides by ``sqrt(nu - mu^2)``, a variance that
steady gradients make a ten-thousandth of ``nu`` and less: under either
moment's 2.2% it restored negative, and the next update was NaN at a
quarter of its values (found in session 31). Where a float32 pair holds
``nu >= mu^2`` at every value, as only moments of one decay do, the second
is stored as that variance on log2 steps (:func:`encode_centered`) and
restored as it plus the restored first moment's square.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import ml_dtypes
import numpy as np

from jaxjpeg import quantized_vectors as qv
from jaxjpeg.checkpoint_reader import STORED_ABOVE_SQUARE, quantizable
from jaxjpeg.dtypes import is_float

# The log2 step: values restore within 2^(1/32) - 1 = 2.2% (1.25% RMS), at
# about 7-9 bits a value on Adam's moments (float32: 32).
LOG_STEP = 1 / 16

# A second moment: values >= 0 with zeros (1/64 of them or more: a pruned
# or masked network's, never updated) or with a hundredth of the nonzero
# ones below a quarter of the leaf's RMS, where JPEG's error (5-8% of the
# RMS at the default step) is 20-30% of them or more (found by review: a
# trained MLP's nu with its 25% quantile at 0.56 of the RMS and its
# smallest at 0.05 came back with a 0). Weights have signs; leaves >= 0
# such as stacked LayerNorm scales sit near 1 (0.88 at the 1% quantile).
SPAN_QUANTILE = 0.01
SPAN_RATIO = 0.25
ZERO_FRACTION = 1 / 64
_SAMPLE = 1 << 16   # values a leaf's quantile is estimated from


def is_second_moment(array) -> bool:
    """True for a leaf of values >= 0 (NaN and infinities aside: such a leaf
    is then stored exactly) with zeros or small values a relative precision must keep
    (SPAN_QUANTILE, SPAN_RATIO, ZERO_FRACTION): a second moment, an
    accumulator, a mask, a leaf of such values."""
    a = np.asarray(array)
    # (floats only: a uint4 leaf, kind 'V' as bfloat16 is, overflowed below, found by review)
    if a.size == 0 or not is_float(a.dtype) or a.dtype.itemsize > 8:
        return False
    flat = a.reshape(-1)
    # Samples decide first: a weight's signs end it in a thousand values
    # (every resident leaf is looked at, for the pairing), a full pass only
    # confirms a leaf the samples call a second moment.
    if np.any(qv.sampled(flat, 1024) < 0):
        return False
    with np.errstate(invalid="ignore"):   # a signalling NaN's cast (found by review)
        sample = qv.sampled(flat, _SAMPLE).astype(np.float64)
    sample = sample[np.isfinite(sample)]
    nonzero = sample[sample > 0]
    if nonzero.size == 0 or np.any(sample < 0):
        return False
    if nonzero.size > (1 - ZERO_FRACTION) * sample.size:
        top = float(np.max(nonzero))   # squares of float64 values may overflow
        rms = top * math.sqrt(float(np.mean(np.square(sample / top))))
        if _quantile(nonzero, SPAN_QUANTILE) >= SPAN_RATIO * rms:
            return False
    with np.errstate(invalid="ignore"):   # then no negative value anywhere
        return float(np.min(a, where=np.isfinite(a), initial=np.inf)) >= 0


def _quantile(values: np.ndarray, q: float) -> float:
    """np.quantile(values, q) (linear interpolation), by a partition: a
    tenth of its time on small leaves (a save of 20,000 biases spent 1.3 s
    in np.quantile)."""
    position = q * (values.size - 1)
    lo = math.floor(position)
    hi = min(lo + 1, values.size - 1)
    part = np.partition(values, (lo, hi))
    return float(part[lo] + (part[hi] - part[lo]) * (position - lo))


# Under a byte target the small leaves the policy keeps out of JPEG are
# stored as float16 or on a linear step, which flush small values: a second
# moment, or a paired first one, is quantized on log2 steps as fine (2^-8:
# within 0.14%) instead.
HALF_LIKE_STEP = 2.0 ** -8


# The names optimizers give a first moment and its second moment (optax's
# ScaleByAdamState, PyTorch's Adam, Keras' and generic ones): leaves read
# from a file are paired by them before any is read, and a pair they make
# takes a looser bound (NAMED_MOMENT_BOUND).
# PyTorch's Adamax keeps exp_avg beside exp_inf, its centered RMSprop
# grad_avg beside square_avg (found by review: unpaired in a flat state dict,
# their first moments were JPEG-coded, the next update 9000x off or NaN).
MOMENT_NAMES = {"mu": ("nu",), "exp_avg": ("exp_avg_sq", "exp_inf"), "m": ("v",),
                "momentum": ("velocity",), "first_moment": ("second_moment",), "m1": ("m2",),
                "grad_avg": ("square_avg",)}


# Second moments that are magnitudes, not squares (PyTorch's Adamax: a
# decayed max of |g|), whose values may span too little to look like one.
MAGNITUDE_NAMES = frozenset({"exp_inf"})


def _names(key) -> list[str]:
    """A path component's names: the key, or its parts between "." and "/"
    (a flat PyTorch state dict's ``state.0.exp_avg``), less TensorFlow's
    output index (Keras 2's ``Adam/dense/kernel/m:0``, found unpaired)."""
    return re.split(r"[./]", re.sub(r":\d+$", "", str(key)))


def is_magnitude_name(path: tuple) -> bool:
    """Whether a leaf's path (kind, key components) ends in MAGNITUDE_NAMES."""
    if not path or not isinstance(path[-1][1], str):
        return False
    return _names(path[-1][1])[-1] in MAGNITUDE_NAMES


# Names only optimizers give (optax's, PyTorch's): a pair of leaves read
# from a file is taken on them without reading the two once more to check
# their values (review: that second read took an Orbax state's compress
# from 2.8 s to 4.0 s; a remote source pays it in transfers). Whatever the
# check would have said, the first moment then restores within 2.2% a value.
TRUSTED_MOMENT_NAMES = frozenset({"mu", "exp_avg", "first_moment"})


# "mu" names other things too (a VAE head's): trusted under an optimizer's
# state only (review: weights at head/mu and head/nu were log2-coded, +44%):
# opt_state, optimizer, optim, g_opt_state, optimizer_state_dict, opt_state_1,
# opt_state_gen, opt_g, optimizer_G, optimizerD, optimizers; not options,
# optical_flow, img_optics, opt_head, opt_layer, OPTICS (review: their mu / nu
# weights took log2 steps, the file 52-61% larger; review of a narrower rule:
# GANs' opt_state_g, optimizer_G were missed).
_OPTIMIZER_PART = re.compile(
    r"(\w+_)?(opt|optax|optim|optimi[sz]ers?)"
    r"(_?states?(_\w+)?|_state_dict|_?\d+|_[a-z]|(?-i:[A-Z]))?", re.IGNORECASE)


# A second moment's running maximum beside it, which the update divides by
# (optax's amsgrad: nu_max; PyTorch's Adam(amsgrad=True): max_exp_avg_sq; found
# by review JPEG-coded, the next update 3.9% off where nu's pair gave 1.3%).
SECOND_MAXIMA = {"nu": ("nu_max",), "exp_avg_sq": ("max_exp_avg_sq",)}


def maximum_paths(second: tuple):
    """``second``'s path with one second moment's name swapped for its running
    maximum's (SECOND_MAXIMA), each way it holds one."""
    return _swapped(second, SECOND_MAXIMA)


def is_lone_first_moment(path: tuple) -> bool:
    """Whether a leaf's path names a first moment an optimizer keeps without
    a second (optax's Lion: ``opt_state/.../mu/...``): "mu" under a part
    naming an optimizer (found by review: Lion's mu was JPEG-coded and 12%
    of its next update's signs flipped; on log2 steps 0.07%)."""
    return "mu" in (name for _, key in path for name in _names(key)) and under_optimizer(path)


def under_optimizer(path: tuple) -> bool:
    """Whether one of a path's names names an optimizer's state."""
    return any(_OPTIMIZER_PART.fullmatch(name) for _, key in path for name in _names(key))


def in_optimizer_state(first: tuple) -> bool:
    """Whether a trusted pair's first moment (is_trusted_pair) lies in an
    optimizer's state: under a part naming one, or PyTorch's exp_avg as
    ``optimizer.state_dict()`` lays it out, ``state`` then the parameter's
    index (found by review: such a dict in memory kept the value checks, nu
    of i.i.d. gradients JPEG-coded; review of that fix: a model's
    state/0/mu taken for Lion's, +45%)."""
    names = [name for _, key in first for name in _names(key)]
    return under_optimizer(first) or ("exp_avg" in names and any(
        a == "state" and b.isdigit() for a, b in zip(names, names[1:])))


def is_trusted_pair(first: tuple, second: tuple) -> bool:
    """Whether named_first_moments paired ``first`` with ``second`` by a
    name of TRUSTED_MOMENT_NAMES (``mu`` under a part naming an optimizer)."""
    for (_, a), (_, b) in zip(first, second):
        if a != b:
            names = [x for x, y in zip(_names(a), _names(b)) if x != y]
            if len(names) != 1 or names[0] not in TRUSTED_MOMENT_NAMES:
                return False
            return names[0] != "mu" or under_optimizer(first)
    return False


def _worst_relative_error(values: np.ndarray, restored: np.ndarray) -> float:
    """The largest |restored - value| / |value| over the finite nonzero
    values (review: float16's subnormal grid took a nu 3.3% off where the
    note said 2.2%)."""
    ok = np.isfinite(values) & (values != 0)
    if not ok.any():
        return 0.0
    v = values[ok].astype(np.float64)
    return float(np.max(np.abs(restored[ok].astype(np.float64) - v) / np.abs(v)))


def has_magnitudes(array) -> bool:
    """Whether ``array`` holds a finite nonzero value (log2 steps code them)."""
    a = np.asarray(array)
    return bool(np.any(np.isfinite(a) & (a != 0)))


def named_first_moments(leaves: Iterable[tuple[tuple, tuple]]) -> dict[tuple, tuple]:
    """{path: its second moment's path} among ``leaves`` (paths of (kind,
    key) components, shapes): paths of one shape that differ in one name,
    the first's a first moment's and the other's its second moment's
    (:data:`MOMENT_NAMES`); a name is a key or a part of one between "."
    and "/" (a flat PyTorch state dict's ``state.0.exp_avg``, found by
    review unpaired)."""
    described = list(leaves)
    shapes = {path: shape for path, shape in described}
    out = {}
    for path, shape in described:
        partner = next((p for p in _second_moment_paths(path) if shapes.get(p) == shape), None)
        if partner is not None:
            out[path] = partner
    return out


def _second_moment_paths(path: tuple):
    """``path`` with one first moment's name swapped for its second's, each
    way it holds one."""
    return _swapped(path, MOMENT_NAMES)


def _swapped(path: tuple, names: dict):
    """``path`` with one name swapped for each of the names ``names`` gives
    it, each way it holds one."""
    for i, (kind, key) in enumerate(path):
        if not isinstance(key, str):
            continue
        parts = re.split(r"([./]|:\d+$)", key)   # TensorFlow's ":0" too, as _names
        for j in range(0, len(parts), 2):   # names; the odd places hold separators
            for other in names.get(parts[j], ()):
                swapped = "".join(parts[:j] + [other] + parts[j + 1:])
                yield (*path[:i], (kind, swapped), *path[i + 1:])


def first_moments(leaves: Iterable[tuple[tuple, tuple]], second: Iterable[tuple[tuple, tuple]]
                  ) -> dict[tuple, tuple]:
    """{path: its second moment's path} for the ``leaves`` (path components,
    shape) of a second moment's shape whose path differs from its path in
    exactly one component, paths of two or more (in a flat dict every two
    leaves of a shape would pair)."""
    siblings = {}
    for path, shape in second:
        if len(path) < 2:
            continue
        for i in range(len(path)):
            siblings.setdefault((shape, i, path[:i], path[i + 1:]), path)
    out = {}
    for path, shape in leaves:
        for i in range(len(path)):
            partner = siblings.get((shape, i, path[:i], path[i + 1:]))
            if partner is not None and partner != path:
                out[path] = partner
                break
    return out


# Under a byte target too tight for LOG_STEP (a training state at 8x:
# moments are two thirds of it) the step doubles up to 1 (within 41%).
BYTE_TARGET_DOUBLINGS = 4
# Under one too generous for it (2-3x: the parameters stored whole, bytes
# left over) it halves down to 1/1024 (a bit a value more each time; 13-15
# bits, short of the 16 at which a coding is refused), then the values are
# kept exactly (step 0.0 on the ladder). Found by review: the moments stayed
# at 1/16, targets of 1.5-3x landed 5-38% under, the next update 1.3% off.
BYTE_TARGET_HALVINGS = 6


def byte_target_steps(step: float = LOG_STEP, finer: bool = False) -> tuple[float, ...]:
    """The steps a byte target moves log2-coded leaves along, from ``step``
    (``finer``: from exact, 0.0, and the halvings first)."""
    first = -BYTE_TARGET_HALVINGS if finer else 0
    return (0.0,) * finer + tuple(step * 2.0 ** i
                                  for i in range(first, BYTE_TARGET_DOUBLINGS + 1))


FINEST_STEP = LOG_STEP * 2.0 ** -BYTE_TARGET_HALVINGS   # the ladder's finest but exact


def dtype_step(dtype) -> float:
    """The log2 step a float dtype's own values lie about apart (2^-mantissa
    bits): finer steps hold a value no better than the value itself."""
    return 2.0 ** -int(ml_dtypes.finfo(dtype).nmant)


def ladder_base(finer: bool) -> int:
    """The index of the save's own step in :func:`byte_target_steps`."""
    return (BYTE_TARGET_HALVINGS + 1) if finer else 0


# A first moment's magnitudes stay within a few roots of its second moment:
# by Cauchy-Schwarz over the gradients' history, Adam's
# |m| <= (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) sqrt(v) before bias
# correction, 7.27 at the defaults (b1 0.9, b2 0.999). The bound was 4 from
# a one-step figure (3.2), and an MLP's state after 50 steps (|m| / sqrt(v)
# up to 7.2, 6.1 at the 99th percentile) kept its mu JPEG-coded: the next
# update 19% off (found in session 29; 1.3% paired). The partner's nonzero
# values must spread, as a second moment's do. Found by review: a pruned
# network's kernels paired with its 0/1 masks, and every nu of a shape with
# the others, took the kernels to 2.7x their JPEG size.
FIRST_MOMENT_BOUND = 8.0
# Pairs an optimizer's names make (MOMENT_NAMES) take a looser bound: the
# formula reaches 1 / sqrt(1 - b2) at small b1, 100 at b2 = 0.9999 (review:
# 5 steps in, |m| / sqrt(v) 17.8 at its 99th percentile; b1 0.5 and b2
# 0.999, DCGAN's, 16.4: mu was JPEG-coded, the next update 54-91% off).
NAMED_MOMENT_BOUND = 128.0
_BOUND_SHARE = 0.99


def bounded_by(first: np.ndarray, second: np.ndarray,
               bound: float = FIRST_MOMENT_BOUND) -> bool:
    """Whether ``first`` looks like the first moment of ``second``: its
    magnitudes within ``bound`` roots of it at 99% of positions (a sample),
    and ``second``'s nonzero values spread (not a mask)."""
    at = qv.sample_positions(first.size, _SAMPLE, seed=1)
    m = np.abs(np.asarray(first).reshape(-1)[at].astype(np.float64))
    v = np.asarray(second).reshape(-1)[at].astype(np.float64)
    ok = np.isfinite(m) & np.isfinite(v)
    m, v = m[ok], v[ok]
    nonzero = v[v > 0]
    if nonzero.size == 0 or np.quantile(nonzero, SPAN_QUANTILE) >= SPAN_RATIO * np.max(nonzero):
        return False
    return bool(np.mean(m <= bound * np.sqrt(v)) >= _BOUND_SHARE)


def step_for(error_bound: float | None = None) -> float:
    """The log2 step: LOG_STEP, finer where an error bound (relative RMS)
    asks (uniform rounding of log2 by ``s`` leaves ln(2) s / sqrt(12))."""
    if error_bound is None:
        return LOG_STEP
    return min(LOG_STEP, 0.9 * error_bound * math.sqrt(12) / math.log(2))


def _smallest_nonzero(array: np.ndarray) -> tuple[float, bool]:
    """(the smallest nonzero magnitude (inf: none), whether there are zeros),
    a chunk at a time."""
    flat, smallest, zeros = array.reshape(-1), math.inf, False
    for start in range(0, flat.size, 1 << 20):
        magnitude = np.abs(flat[start:start + (1 << 20)])
        nonzero = magnitude[magnitude > 0]
        zeros = zeros or nonzero.size < magnitude.size
        smallest = min(smallest, float(np.min(nonzero, initial=np.inf)))
    return smallest, zeros


# nu >= mu^2 (1 - this) at every value: float32's rounding of two moving
# averages of one decay (the identity holds exactly in real numbers) stays
# within a few ulps; Adam's moments (b1 0.9, b2 0.999) break it early on.
CENTERED_TOLERANCE = 2.0 ** -16


def is_centered(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether float32 ``second`` >= ``first``² at every value (within
    CENTERED_TOLERANCE), all finite: a centered second moment of ``first``."""
    if not (first.dtype == second.dtype == np.float32 and first.shape == second.shape):
        return False
    m, n = first.reshape(-1), second.reshape(-1)
    for start in range(0, n.size, 1 << 20):
        part = slice(start, start + (1 << 20))
        mm = m[part].astype(np.float64) ** 2
        nn = n[part].astype(np.float64)
        if not (np.all(np.isfinite(nn)) and np.all(np.isfinite(mm))
                and np.all(nn >= mm * (1 - CENTERED_TOLERANCE))):
            return False
    return True


def centered_variance(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``second - first²`` (float32, at least 0) of a centered pair."""
    m = first.astype(np.float64)
    return np.maximum(second.astype(np.float64) - m * m, 0.0).astype(np.float32)


def above_square(variance: np.ndarray, first: np.ndarray) -> np.ndarray:
    """A centered second moment restored: its variance plus the restored
    first moment's square, as the optimizer squares it (float32)."""
    first = np.asarray(first, np.float32)
    return (np.asarray(variance, np.float32) + first * first).astype(np.float32)


def encode_centered(first: np.ndarray, second: np.ndarray,
                    step: float = LOG_STEP, counted: bool = False) -> tuple | None:
    """(blob, record fields, note) of a centered second moment stored as its
    variance on log2 steps (the record's ``square_of``, the first moment's
    leaf, is the saver's to add), or None, also where a value could restore
    past float32's largest: restored as its variance plus the square of the
    first moment as stored, each up to 2^(1/2) over on the ladder's
    coarsest step (found by review: a second moment of 3.4e38 beside a first
    of 1e19 restored inf; checked against the first moment's exact values,
    1.84e19 beside 3.4e38 still did; refused for any value within 4x of the
    largest, ten values of 1e38 sent a whole leaf exact)."""
    variance = centered_variance(first, second)
    largest = float(np.finfo(np.float32).max)
    if float(np.max(second, initial=0.0)) > largest / 4:   # rare: checked value by value
        worst = (2.0 * np.square(np.asarray(first, np.float64))
                 + math.sqrt(2.0) * variance.astype(np.float64))
        if float(np.max(worst, initial=0.0)) > largest:
            return None
    coded = encode(variance, False, step, counted)
    if coded is None:
        return None
    blob, record, note = coded
    return blob, {**record, "stored": STORED_ABOVE_SQUARE}, (
        "centered: " + note.replace("values", "its variance over the first moment's square", 1))


def encode(array: np.ndarray, signed: bool, step: float = LOG_STEP,
           counted: bool = False) -> tuple | None:
    """(blob, record fields, note) of a float32, bfloat16 or float16 leaf on
    log2 steps of its magnitudes (``signed``: with a sign bit a value),
    restored through float32, or None (another dtype, a non-finite value,
    more bits than float16's, or a value restoring past a half dtype's
    range). Half-precision moments were stored exactly, at twice float32's
    bits (found by review in session 29: optax's ``mu_dtype=bfloat16``).
    ``counted``: the blob of a float32 leaf a quantized_vectors.Counted
    (a half one's is restored to check it)."""
    if not quantizable(array.dtype) or array.size == 0:
        return None
    original, array = array, np.asarray(array, np.float32)
    how = _log2_domain(array, signed)
    if how is None:
        return None
    coded = qv.encode(array, qv.VectorStep(step, *how),
                      counted=counted and original.dtype == np.float32)
    if coded is None:
        return None
    blob, record = coded
    bound = _step_bound(step, how[1])
    if original.dtype != np.float32:   # the half dtype's own rounding on top
        restored = qv.restored_in_dtype(original, blob, record)
        if restored is None:
            return None
        bound = max(bound, _worst_relative_error(array.reshape(-1), restored))
    return _described(blob, record, signed, step, bound)


def _log2_domain(array: np.ndarray, signed: bool) -> tuple[str, float] | None:
    """(domain, offset) of float32 ``array``'s log2 coding, or None (no
    nonzero finite magnitude). An offset of a quarter of the smallest value
    keeps zeros exact (they restore at or below it, clamped to 0) and costs
    that value 25% more absolute error, within 2.7% of it."""
    smallest, zeros = _smallest_nonzero(array)
    if not math.isfinite(smallest):
        return None
    return (qv.SIGNED_LOG2 if signed else qv.LOG2), (smallest / 4 if zeros else 0.0)


def _step_bound(step: float, offset: float) -> float:
    """The relative error a value on log2 ``step`` keeps within (its offset
    adds 25%: see _log2_domain)."""
    return (2.0 ** (step / 2) - 1) * (1.25 if offset else 1.0)


def _described(blob, record: dict, signed: bool, step: float, bound: float) -> tuple:
    """:func:`encode`'s (blob, record fields, note)."""
    what = "magnitudes" if signed else "values"
    return blob, {"kind": "raw", **record}, (f"{what} on log2 steps of {step:.3g} (within "
                                             f"{bound:.1%} each)")


def counted_ladder(array: np.ndarray, signed: bool):
    """``step -> encode(array, signed, step, counted=True)``, the log2 of a
    float32 leaf's magnitudes taken once for every step (qv.Ladder: a byte
    target's ladder took it again at each)."""
    if array.dtype != np.float32 or array.size == 0:
        return lambda step: encode(array, signed, step, counted=True)
    how = _log2_domain(array, signed)
    if how is None:
        return lambda step: None
    ladder = qv.Ladder(array, *how)

    def at(step):
        coded = ladder.counted(step)
        return None if coded is None else _described(*coded, signed, step,
                                                     _step_bound(step, how[1]))
    return at
