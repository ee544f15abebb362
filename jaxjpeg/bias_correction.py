"""Bias correction: the mean shift a coded weight adds to its layer's output,
taken back out by the leaf after it (as in Nagel et al. 2019, DFQ).

A layer computes ``y = W x``; coded, ``W`` gains an error ``ΔW`` and every
output channel's mean moves by ``ΔW·E[x]``. The running mean of the
BatchNorm after the layer takes that shift (the normalised output is then
centred as before), or, with no BatchNorm after it (a classifier), the
layer's own bias gives it back. ``E[x]`` comes from the BatchNorm prior
(:mod:`jaxjpeg.priors`, data-free) or, measured on calibration inputs, from
the user (:class:`InputMean`), which replaces the prior's for its leaf.

Measured on EfficientNet-lite at 8x (``benchmarks/probe_seeds.py``, KL to
float32, mean of probe seeds): the prior's means lowered the KL 0.096 ->
0.066 (lite1) and 0.107 -> 0.090 (lite2); with error feedback against
calibration covariances, means measured on the same 32 crops instead of the
prior's took lite1 0.064 -> 0.035 and lite2 0.064 -> 0.046 (2 seeds); over 4
seeds, with feedback, 0.070 -> 0.038 and 0.068 -> 0.047, and measured means
alone on the data-free coding 0.0635 -> 0.049 and 0.092 -> 0.061.

Not a sure gain: on the small Flax ResNet of ``benchmarks/batchnorm_prior.py``
(digits, 4x4 to 16x16 maps) measured means made the KL worse (3 seeds, prior
/ prior + means: 8x 0.0037 / 0.0097, 10x 0.015 / 0.064), and so did shifts
measured exactly on the calibration inputs: correcting its first three
blocks helped (10x, one seed: 0.034 -> 0.024), its last three undid that.
Correcting a layer's weight-error shift ignores how the noise of the layers
before it moves the means (through each ReLU); check on held-out data.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import ml_dtypes
import numpy as np

from jaxjpeg.priors import is_running_mean


@dataclasses.dataclass(frozen=True)
class InputMean:
    """The mean of a layer's inputs, as the leaf multiplies them.

    ``values``: ``E[x]`` broadcastable to the leaf's shape, so that output
    channel ``o`` shifts by ``Σ error[..o..] * values`` over every other
    axis; ``out_axis``: the leaf's output axis. E.g. per input channel of a
    PyTorch ``Conv2d`` weight ``(O, I, kh, kw)``: ``values`` of shape
    ``(1, I, 1, 1)``, ``out_axis=0``; of a depthwise one ``(C, 1, kh, kw)``:
    ``(C, 1, 1, 1)`` (each output channel sees its own input channel); a
    PyTorch ``Linear`` ``(O, I)``: ``(1, I)``; a Flax ``Conv`` kernel ``(kh,
    kw, I, O)``: ``(1, 1, I, 1)``, ``out_axis=-1``; a Flax ``Dense`` kernel
    ``(I, O)``: ``(I, 1)``, ``out_axis=-1``.

    ``taker``: the leaf path that takes the shift, the running mean of the
    BatchNorm after the layer (the shift is added to it) or the layer's own
    bias (subtracted from it); None: found in the tree's order (the first
    BatchNorm after the weight before any other weight, else a sibling bias),
    which needs the tree in the network's order (a PyTorch state dict; jax
    sorts dict keys, so Flax trees are not: give ``taker``, as
    :func:`jaxjpeg.calibration.input_means` does).
    """

    values: np.ndarray
    out_axis: int = 0
    taker: str | None = None

    def __post_init__(self):
        values = np.asarray(self.values)
        if values.dtype.kind not in "fiu" and str(values.dtype) != "bfloat16":
            # (found by review: complex means lost their imaginary parts)
            raise ValueError(f"input mean has dtype {values.dtype}; it must be real")
        object.__setattr__(self, "values", values.astype(np.float64))
        object.__setattr__(self, "out_axis", int(self.out_axis))

    def check(self, shape: tuple[int, ...]) -> None:
        """ValueError naming what does not fit a leaf of ``shape``."""
        if len(shape) < 2:
            raise ValueError(f"a {len(shape)}-d leaf has no input axis to take a mean over")
        if not -len(shape) <= self.out_axis < len(shape):
            raise ValueError(f"out_axis {self.out_axis} is not an axis of a {len(shape)}-d leaf")
        if not np.all(np.isfinite(self.values)):
            raise ValueError("input mean has NaN or infinite values")
        if np.any(np.abs(self.values) > np.finfo(np.float32).max):
            # no float32 activation averages that (found by review: 1e300 took
            # the bias it corrected to float32's largest, silently)
            raise ValueError("input mean has values beyond float32's range")
        try:
            fits = np.broadcast_shapes(self.values.shape, tuple(shape)) == tuple(shape)
        except ValueError:
            fits = False
        if not fits or self.values.ndim > len(shape):
            raise ValueError(f"input mean of shape {self.values.shape} does not broadcast to "
                             f"the leaf's shape {tuple(shape)}")

    def output_shift(self, error: np.ndarray) -> np.ndarray:
        """The shift ``error`` adds to each output channel's mean."""
        others = tuple(a for a in range(error.ndim) if a != self.out_axis % error.ndim)
        return np.sum(np.asarray(error, np.float64) * self.values, axis=others)


class BiasCorrection:
    """The shifts of one save: each coded weight with a taker adds its shift
    (:meth:`add`); each taker, stored after every weight, takes them
    (:meth:`apply`): a running mean as it is (it is subtracted from the
    output), a bias negated. ``targets``: {weight: (taker leaf, shift of an
    error)}."""

    def __init__(self, targets: dict):
        self.targets = targets
        self.takers = {leaf for leaf, _ in targets.values()}
        self.shifts: dict[str, dict[str, np.ndarray]] = {}   # taker -> {weight: shift}
        self.positions: dict[str, int] = {}
        self.lock = threading.Lock()

    @classmethod
    def of(cls, prior=None, input_means: dict | None = None,
           exact=lambda taker: False) -> "BiasCorrection":
        """The prior's weights (data-free means) and the user's
        ``{weight: (InputMean, taker)}``, which replace them; none whose
        taker is to be stored ``exact`` (a policy's lossless leaf)."""
        targets = {}
        if prior is not None:
            for weight, taker in {**prior.output_means, **prior.output_biases}.items():
                targets[weight] = (taker, functools.partial(prior.output_shift, weight))
        for weight, (mean, taker) in (input_means or {}).items():
            targets[weight] = (taker, mean.output_shift)
        return cls({weight: (taker, shift) for weight, (taker, shift) in targets.items()
                    if not exact(taker)})

    def order(self, names) -> None:
        """The order weights are stored in: a taker sums its shifts in it,
        whichever thread coded them first (the same sum as a save coding one
        leaf at a time)."""
        self.positions = {name: i for i, name in enumerate(names)}

    def waits(self, name: str) -> bool:
        """Whether leaf ``name`` takes shifts (and is stored after the others)."""
        return name in self.takers

    def add(self, name: str, error) -> None:
        """Weight ``name`` was coded; ``error()`` gives its coding error."""
        if name not in self.targets:
            return
        taker, shift_of = self.targets[name]
        # Non-finite weights are kept exactly: their NaN - NaN or inf - inf is
        # no error (found by review: it made a finite running mean NaN).
        with np.errstate(invalid="ignore"):
            e = np.asarray(error(), np.float64)
        bad = ~np.isfinite(e)
        if bad.any():
            e = np.where(bad, 0.0, e)
        del bad
        shift = np.asarray(shift_of(e), np.float64)
        if not np.all(np.isfinite(shift)):   # weights near float's limits
            return
        if not is_running_mean(taker):   # a bias gives the shift back
            shift = -shift
        with self.lock:
            self.shifts.setdefault(taker, {})[name] = shift

    def export(self) -> dict:
        """The shifts added so far, as JSON values: {taker: {weight: [floats]}}
        (a distributed save hands them to the takers' owners; floats print
        exactly)."""
        with self.lock:
            return {taker: {w: np.asarray(s, np.float64).tolist() for w, s in given.items()}
                    for taker, given in self.shifts.items()}

    def merge(self, exported: dict) -> None:
        """Adds another process's :meth:`export`."""
        with self.lock:
            for taker, given in exported.items():
                for weight, shift in given.items():
                    self.shifts.setdefault(taker, {})[weight] = np.asarray(shift, np.float64)

    def apply(self, name: str, array: np.ndarray) -> np.ndarray:
        with self.lock:
            given = dict(self.shifts.get(name, {}))
        # bfloat16 (ml_dtypes' kind 'V') too: found in session 29, a bfloat16
        # network's running means never took their corrections
        if not given or not takes_shifts(array.dtype):
            return array
        shift = 0.0
        for weight in sorted(given, key=lambda w: self.positions.get(w, -1)):
            shift = shift + given[weight]
        values = array.astype(np.float64)
        top = float(ml_dtypes.finfo(array.dtype).max)
        # a finite value the shift would take past the dtype's range stops at
        # its limit (found by review: a float16 bias of 65400 restored as inf);
        # a non-finite one stays as it is
        shifted = np.where(np.isfinite(values), np.clip(values + shift, -top, top), values)
        return shifted.astype(array.dtype)


def takes_shifts(dtype: np.dtype) -> bool:
    """Whether a leaf of ``dtype`` can take a shift: a real floating-point one."""
    if dtype.kind == "c":
        return False
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True
