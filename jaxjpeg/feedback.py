"""Error feedback against calibration inputs (in the manner of GPTQ).

A layer computes ``y = W x``; what matters is the error of ``y``, not of
``W``. Given the second moment ``H = E[x xᵀ]`` of the layer's inputs, the
coder quantizes the input features in order, eight at a time (one column of
8x8 blocks), and after each group moves the error it left onto the features
not yet coded, by the least-squares update that cancels as much of it in
``y`` as ``H`` allows (optimal brain surgeon; GPTQ's Cholesky form). The
tiles stay standard JPEG: only the samples handed to the encoder change.
Weight error grows a little, output error drops several-fold.

On EfficientNet-lite1 (numpy model of the quantizer, equal steps) the
output error fell 2.9x and the logits' KL 8x (1.1 -> 0.13).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jaxjpeg import _native
from jaxjpeg.views import MatrixView

# GPTQ's damping: H + DAMPING * mean(diag H) * I keeps the inverse stable
# where inputs are (nearly) collinear or dead. A modelled covariance (the
# BatchNorm prior's) is exact by construction and takes GPTQ's 0.01.
DAMPING = 0.01
# A covariance a user measures on calibration inputs is an estimate from few
# samples (32 crops for thousands of features): feedback fitted to it too
# closely fits the crops. EfficientNet-lite at 8x, 2 probe seeds, 0.01 / 0.1 /
# 1.0: lite1 KL 0.088 / 0.066 / 0.076; lite2 0.072 / 0.066 at 0.01 / 0.1
# (session 4, crops of two photos). On crops of seven photos normalised as
# the networks were trained (session 11, 4 seeds), 0.1 / 0.3 / 0.6 / 1.0:
# lite0 0.0287 / 0.0243 / 0.0256 / 0.0268, lite1 0.0288 / 0.0267 / 0.0283 /
# 0.0283, lite2 0.0261 / 0.0234 / 0.0229 / 0.0238; PP-OCR recognizer 6x / 8x
# KL 0.050 / 0.049 -> 0.013 / 0.038 at 0.3, detector IoU 0.996 / 0.987 ->
# 0.993 / 0.989.
CALIBRATION_DAMPING = 0.3
# A covariance measured on inputs synthesized from the network's own
# BatchNorm statistics (calibration.synthetic_inputs) carries the real
# inputs' correlations only in part: trusted less. EfficientNet-lite at 8x,
# 32 synthetic inputs of 128 x 128: one set for lite1, 2 probe seeds,
# damping 0.3 / 1.0 / 3.0: KL 0.0552 / 0.0391 / 0.0375; the library's sets,
# 4 seeds, 0.6 / 1.0 / 2.0: lite1 0.0462 / 0.0432 / 0.0425, lite2 0.0441 /
# 0.0464 / 0.0465 (the data-free prior alone: 0.0470, 0.0467). Other
# batches at 1.0 (session 19): lite1 0.0425-0.0491, lite2 0.0468-0.0520.
SYNTHETIC_DAMPING = 1.0
# Columns updated together (GPTQ's lazy batches): the same result with far
# less memory traffic than updating every remaining column after each group.
BATCH = 128


def _axes_as_tuple(cov) -> None:
    object.__setattr__(cov, "axes", tuple(int(a) for a in np.atleast_1d(cov.axes)))


@dataclasses.dataclass(frozen=True)
class InputCovariance:
    """Second moment of a layer's inputs, as the leaf contracts them.

    ``matrix``: ``(n, n)``, ``E[x xᵀ]`` (or the sum over samples: only its
    shape matters, not its scale) of the input features ``x``. ``axes``: the
    leaf axes the layer contracts with ``x``, in the order ``x``'s features are
    flattened (C order). E.g. a PyTorch ``Linear`` weight ``(O, I)``: ``(1,)``;
    a Flax ``Dense`` kernel ``(I, O)``: ``(0,)``; a PyTorch ``Conv2d`` weight
    ``(O, I, kh, kw)`` against ``unfold``'s patches: ``(1, 2, 3)``; a Flax
    ``Conv`` kernel ``(kh, kw, I, O)`` against patches flattened ``(kh, kw,
    I)``: ``(0, 1, 2)``.
    """

    matrix: np.ndarray
    axes: tuple[int, ...]
    # How little feedback trusts ``matrix``: it adds ``damping`` times the
    # mean of its diagonal to the diagonal before inverting (None:
    # CALIBRATION_DAMPING, for measured statistics).
    damping: float | None = None

    def __post_init__(self):
        _axes_as_tuple(self)
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"input covariance damping {self.damping!r} is not a finite "
                             "number >= 0")

    def axes_of(self, shape) -> tuple[int, ...]:
        """``axes`` with negative ones counted from the end of ``shape``."""
        return tuple(a + len(shape) if a < 0 else a for a in self.axes)

    def check(self, shape: tuple[int, ...]) -> np.ndarray:
        """The matrix (as given, not copied), or ValueError naming what is
        wrong. Checked by row blocks: a layer of n inputs has an n x n
        matrix, GBs for an LLM's widest, and a save holds few copies."""
        ndim = len(shape)
        axes = self.axes_of(shape)
        if not axes or len(set(axes)) != len(axes) or not all(0 <= a < ndim for a in axes):
            raise ValueError(f"input axes {self.axes} are not distinct axes of a "
                             f"{ndim}-d leaf")
        if len(axes) == ndim:
            raise ValueError("input axes cover every axis of the leaf: no output axis is left")
        n = math.prod(shape[a] for a in axes)
        h = np.asarray(self.matrix)
        if h.shape != (n, n):
            raise ValueError(f"input covariance has shape {h.shape}; the input axes {self.axes} "
                             f"of shape {tuple(shape)} need ({n}, {n})")
        if h.dtype.kind not in "fiu" and str(h.dtype) != "bfloat16":   # bfloat16: kind 'V'
            raise ValueError(f"input covariance has dtype {h.dtype}; it must be real")
        if not all(np.isfinite(h[r:r + BATCH]).all() for r in range(0, n, BATCH)):
            raise ValueError("input covariance has NaN or infinite entries")
        if np.any(np.diagonal(h) < 0):
            raise ValueError("input covariance has negative diagonal entries")
        return h

    def ordered(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray:
        """The checked matrix, symmetrized, as float64 with its features in
        the order ``index`` (one n x n copy)."""
        h = self.check(shape)[np.ix_(index, index)].astype(np.float64, copy=False)
        _symmetrize(h)
        return h


def _symmetrize(h: np.ndarray) -> None:
    """``h`` <- (h + hᵀ) / 2 in place, by row blocks (no n x n temporary)."""
    for r0 in range(0, len(h), BATCH):
        r1 = min(len(h), r0 + BATCH)
        mean = (h[r0:r1, r0:] + h[r0:, r0:r1].T) / 2
        h[r0:r1, r0:] = mean
        h[r0:, r0:r1] = mean.T


@dataclasses.dataclass(frozen=True)
class DiagonalPlusRankOne:
    """``diag(diagonal) + vector vectorᵀ`` as an :class:`InputCovariance`
    (same ``axes``), kept as its two vectors: inputs independent but for a
    common mean (the BatchNorm prior's model). Its feedback factor takes
    O(n²) work instead of a dense inverse's O(n³)."""

    diagonal: np.ndarray
    vector: np.ndarray
    axes: tuple[int, ...]
    # False: the diagonal is a stand-in for powers nobody measured (the
    # common-mean prior's ones), which loud input channels may contradict
    # (:func:`jaxjpeg.views.loud_column_scales`).
    known_power: bool = True

    __post_init__ = _axes_as_tuple
    axes_of = InputCovariance.axes_of

    def check(self, shape: tuple[int, ...]) -> np.ndarray:
        self._check_size(shape)
        return np.diag(self.diagonal) + np.outer(self.vector, self.vector)

    def ordered(self, shape: tuple[int, ...], index: np.ndarray) -> "DiagonalPlusRankOne":
        self._check_size(shape)
        return DiagonalPlusRankOne(axes=self.axes, diagonal=self.diagonal[index],
                                   vector=self.vector[index], known_power=self.known_power)

    def _check_size(self, shape) -> None:
        n = math.prod(shape[a] for a in self.axes_of(shape))
        if self.diagonal.shape != (n,) or self.vector.shape != (n,):
            raise ValueError(f"covariance vectors of {self.diagonal.shape} and "
                             f"{self.vector.shape}; the input axes need ({n},)")


@dataclasses.dataclass(frozen=True)
class Feedback:
    """``H`` in the order of the matrix view's rows or columns."""

    matrix: np.ndarray | DiagonalPlusRankOne    # float64 (n, n), or its two vectors
    along_rows: bool      # the inputs are the view's rows (else its columns)
    # GPTQ's "act order": groups of eight inputs coded loudest first, so the
    # errors of the inputs that matter most move onto quieter ones (measured
    # covariances; EfficientNet-lite at 8x with calibration, 4 probe seeds:
    # KL 0.0222 -> 0.0211, 0.0213 -> 0.0202). The prior's modelled one keeps
    # the inputs' order (lite1 worse, lite2 better: 0.0605 -> 0.071, 0.0695
    # -> 0.064, 2 seeds).
    by_power: bool = False
    damping: float | None = None   # InputCovariance.damping (None: CALIBRATION_DAMPING)
    # Inverse Cholesky factors by input units: a rate search codes a leaf
    # several times with the same units, and the factor is most of the cost.
    factors: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def order(self, unit: np.ndarray) -> np.ndarray:
        """The order inputs are coded in: groups of eight (the columns of a
        block, kept together) by falling power ``H_ii unit_i²`` when
        ``by_power``, a last, narrower group last; else their own order."""
        n = len(unit)
        if not self.by_power:
            return np.arange(n)
        full = n // 8
        power = np.diag(self.matrix)[:8 * full] * unit[:8 * full] ** 2
        groups = np.argsort(-power.reshape(full, 8).sum(axis=1), kind="stable")
        return np.concatenate([(8 * groups[:, None] + np.arange(8)).ravel(),
                               np.arange(8 * full, n)])

    def upper(self, unit: np.ndarray) -> np.ndarray:
        """The factor of ``H`` (times ``unit`` on both sides) with the inputs
        in :meth:`order`."""
        key = unit.tobytes()
        if key not in self.factors:
            self.factors.clear()   # one entry: a leaf's units rarely change
            if isinstance(self.matrix, DiagonalPlusRankOne):
                self.factors[key] = _rank_one_inverse_cholesky(
                    self.matrix.diagonal * unit * unit, self.matrix.vector * unit)
            else:
                self.factors[key] = _ordered_inverse_cholesky(
                    self.matrix, self.order(unit), unit, self.damping_fraction())
        return self.factors[key]

    def damping_fraction(self) -> float:
        """What feedback adds to a measured ``H``'s diagonal, as a fraction
        of its mean."""
        return CALIBRATION_DAMPING if self.damping is None else self.damping


def view_for(cov: InputCovariance, shape, view: MatrixView) -> MatrixView:
    """``view`` when the input axes are exactly its row or column axes (axes
    of size 1 aside); else the view with every other axis on rows and the
    inputs on columns."""
    given = cov.axes_of(shape)
    rows, cols = view.perm[:view.split], view.perm[view.split:]
    if _sized(given, shape) in (_sized(rows, shape), _sized(cols, shape)):
        return view
    others = tuple(a for a in range(len(shape)) if a not in given)
    return MatrixView(others + given, len(others))


def for_view(cov: InputCovariance, shape, view: MatrixView) -> Feedback:
    """``cov`` reordered to ``view``, which :func:`view_for` returned."""
    inputs = cov.axes_of(shape)
    rows = view.perm[:view.split]
    along_rows = _sized(inputs, shape) == _sized(rows, shape)
    side = rows if along_rows else view.perm[view.split:]
    # The view's order of the input axes (axes of size 1 may sit anywhere).
    order = [a for a in side if a in inputs] + [a for a in inputs if a not in side]
    index = np.arange(math.prod(shape[a] for a in inputs)).reshape([shape[a] for a in inputs])
    index = index.transpose([inputs.index(a) for a in order]).ravel()
    return Feedback(cov.ordered(tuple(shape), index), along_rows,
                    by_power=not isinstance(cov, DiagonalPlusRankOne),
                    damping=getattr(cov, "damping", None))


def _sized(axes, shape) -> set:
    return {a for a in axes if shape[a] > 1}


def shape_errors(samples: np.ndarray, table: np.ndarray, bits: int, fb: Feedback,
                 row_scale: np.ndarray, col_scale: np.ndarray | None) -> np.ndarray:
    """Samples whose quantization error the layer's inputs cancel best.

    ``samples``: float32 [rows, cols] as the encoder will receive them;
    ``row_scale`` (per row, or one for all) and ``col_scale`` map sample units
    to weights, so ``H`` is taken in sample units.
    """
    s = np.array(samples.T if fb.along_rows else samples, np.float64, order="C")
    q = np.asarray(table, np.float64).reshape(8, 8)
    if fb.along_rows:   # the inputs' weight units: per-row scales
        unit = np.broadcast_to(np.asarray(row_scale, np.float64).ravel(), (samples.shape[0],))
        q = q.T
    else:
        unit = np.ones(samples.shape[1]) if col_scale is None else np.asarray(col_scale, np.float64)
    unit = np.ascontiguousarray(unit, np.float64)
    order = fb.order(unit)
    upper = fb.upper(unit)
    if fb.by_power:   # else the inputs keep their order: no copies
        s = np.ascontiguousarray(s[:, order])
    if isinstance(upper, RankOneFactor):
        _shape_rank_one(s, q, bits, upper)
    else:
        _shape_dense(s, q, bits, upper)
    if fb.by_power:
        s = s[:, np.argsort(order)]
    s = s.astype(np.float32)   # both feedback loops leave every sample clamped
    return np.ascontiguousarray(s.T if fb.along_rows else s)


def _shape_dense(s: np.ndarray, q: np.ndarray, bits: int, upper: np.ndarray) -> None:
    """Feedback on samples ``s`` [rows, inputs] (in place) with a dense factor."""
    top = float((1 << bits) - 1)
    n = s.shape[1]
    for b0 in range(0, n, BATCH):
        b1 = min(n, b0 + BATCH)
        moved = np.zeros((s.shape[0], b1 - b0))   # scaled errors of this batch
        for g0 in range(b0, b1, 8):
            g, within = slice(g0, min(b1, g0 + 8)), slice(min(b1, g0 + 8), b1)
            error = s[:, g] - _quantized(np.clip(s[:, g], 0.0, top), q, bits)
            s[:, g] = np.clip(s[:, g], 0.0, top)
            # error @ inv(U[g, g]) @ U[g, rest]: the OBS update of what is left,
            # applied inside the batch now and to later batches at once.
            scaled = np.linalg.solve(upper[g, g].T, error.T).T
            moved[:, g0 - b0:g0 - b0 + scaled.shape[1]] = scaled
            s[:, within] -= scaled @ upper[g, within]
        s[:, b1:] -= moved @ upper[b0:b1, b1:]


def _shape_rank_one(s: np.ndarray, q: np.ndarray, bits: int, f: RankOneFactor) -> None:
    """:func:`_shape_dense` for a :class:`RankOneFactor`, in O(rows x inputs):
    the update ``scaled @ upper[g, j]`` of every later input j is
    ``(scaled @ coef[g]) * w[j]``, so one number per row carries it, and
    ``scaled @ coef[g]`` is ``error @ (inv(upper[g, g]) @ coef[g])``
    (native: ``_native.shape_rank_one``)."""
    _native.shape_rank_one(s, np.ascontiguousarray(q, np.float64), bits, f.w, f.carriers)


def _inverse_cholesky(h: np.ndarray, damping: float | None = None) -> np.ndarray:
    """Upper ``U`` with ``(H + damping)⁻¹ = Uᵀ U`` (``damping``: DAMPING
    unless given)."""
    return _ordered_inverse_cholesky(h, np.arange(len(h)), np.ones(len(h)), damping)


def _ordered_inverse_cholesky(h: np.ndarray, order: np.ndarray, unit: np.ndarray,
                              damping: float | None = None) -> np.ndarray:
    """:func:`_inverse_cholesky` of ``h`` (symmetric) with its inputs in
    ``order``, scaled by ``unit`` on both sides, in one n x n array (returned as a
    reversed view of it).

    With J the order reversal and J H J = L Lᵀ: H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J),
    and J L⁻¹ J is upper. One Cholesky and one triangular inverse (a third
    of the work of inverting H and factoring the inverse), both in place on
    the reversed copy of H that the reordering makes anyway.
    """
    reverse = order[::-1]
    # J H J; H is symmetric, so the C-ordered copy's transpose is it in
    # Fortran order (np.array(..., order="F") would copy it once more).
    a = np.asfortranarray(h[np.ix_(reverse, reverse)].astype(np.float64, copy=False).T)
    scale = unit[reverse]
    a *= scale[:, None]
    a *= scale[None, :]
    diagonal = np.diagonal(a).copy()
    np.fill_diagonal(a, _damped(diagonal, diagonal, damping))
    # LAPACK on the Fortran-ordered array works in place: no other n x n copy
    # (clean: the Cholesky zeroes the upper triangle, which dtrtri keeps).
    from scipy.linalg import lapack  # here: restoring never needs scipy (0.1 s to import)

    lower, info = lapack.dpotrf(a, lower=1, overwrite_a=1, clean=1)
    if info != 0:
        # (found by review: a matrix that is no covariance was told about damping alone)
        raise np.linalg.LinAlgError(f"input covariance is not positive definite "
                                    f"(LAPACK info {info}), even damped: a matrix of E[x xᵀ] "
                                    "over real inputs is (symmetrized, this one has a negative "
                                    "eigenvalue), and one estimated from fewer samples than "
                                    "features needs InputCovariance(..., damping=) > 0")
    inverse, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"input covariance factor is singular (LAPACK info {info})")
    return inverse[::-1, ::-1]


def _damped(power: np.ndarray, base: np.ndarray, damping: float | None = None) -> np.ndarray:
    """The diagonal ``base`` of H plus damping * mean(diag H) (``power``: diag
    H; ``damping``: DAMPING unless given, read when called); a dead input
    (zero power) gets the mean alone."""
    damping = DAMPING if damping is None else damping
    mean = float(power.mean()) if power.size and power.mean() > 0 else 1.0
    return np.where(power > 0, base + damping * mean, mean)


@dataclasses.dataclass(frozen=True)
class RankOneFactor:
    """The inverse Cholesky factor of ``diag + v vᵀ`` in O(n) numbers:
    ``pivot`` on the diagonal and ``coef[i] * w[j]`` above it (j > i). Every
    update feedback makes is then rank one: the errors of the inputs coded so
    far reach input j only through one number per row times ``w[j]``."""

    pivot: np.ndarray
    coef: np.ndarray
    w: np.ndarray

    def block(self, g: slice) -> np.ndarray:
        """The factor's diagonal block over the inputs ``g``."""
        return (np.diag(self.pivot[g])
                + np.triu(np.outer(self.coef[g], self.w[g]), 1))

    def dense(self) -> np.ndarray:
        return self.block(slice(0, len(self.pivot)))

    @functools.cached_property
    def carriers(self) -> np.ndarray:
        """``inv(block(g)) @ coef[g]`` for each group g of eight inputs (a
        last, narrower one), end to end: what the group's errors add to the
        number carried. Solved for all groups at once, once per factor (a
        leaf's codings at several steps share it)."""
        n = len(self.pivot)
        full = n // 8 * 8
        blocks = np.zeros((full // 8, 8, 8))
        blocks[:, np.arange(8), np.arange(8)] = self.pivot[:full].reshape(-1, 8)
        upper = np.triu(np.ones((8, 8), bool), 1)
        blocks += (self.coef[:full].reshape(-1, 8, 1) * self.w[:full].reshape(-1, 1, 8)) * upper
        out = np.empty(n)
        out[:full] = np.linalg.solve(blocks, self.coef[:full].reshape(-1, 8, 1)).ravel()
        if full < n:
            last = slice(full, n)
            out[last] = np.linalg.solve(self.block(last), self.coef[last])
        return out


def _rank_one_inverse_cholesky(diagonal: np.ndarray, vector: np.ndarray) -> RankOneFactor:
    """:func:`_inverse_cholesky` of ``diag(diagonal) + vector vectorᵀ`` in
    O(n): damped alike (:func:`_damped`), ``H = diag(e) + v vᵀ`` has the inverse
    ``diag(1/e) - s w wᵀ`` (``w = v / e``, Sherman-Morrison), whose Cholesky
    factor is a diagonal plus ``c_j w_i`` above it: eliminating input j
    leaves ``diag + a_j w wᵀ`` on the rest, with ``a_j`` by recurrence."""
    e = _damped(diagonal + vector * vector, diagonal)
    w = vector / e
    a = -1.0 / (1.0 + float(np.dot(vector, w)))
    pivot, coef = np.empty(len(e)), np.empty(len(e))
    for j, (inv_e, wj) in enumerate(zip((1.0 / e).tolist(), w.tolist())):
        d = inv_e + a * wj * wj
        pivot[j] = math.sqrt(d)
        coef[j] = a * wj / pivot[j]
        a *= inv_e / d
    return RankOneFactor(pivot, coef, w)


def _quantized(strip: np.ndarray, q: np.ndarray, bits: int) -> np.ndarray:
    """What the codec restores of a [rows, <= 8] strip of samples: the encoder's
    orthonormal DCT and round-half-away quantization (edge blocks padded by
    repeating the last row/column, as it does), the decoder's rounding and
    clamping to integer samples (``_native.restore_strip``)."""
    return _native.restore_strip(strip, np.ascontiguousarray(q, np.float64), bits)


# The allocation weighs a calibrated leaf's error by feedback's gain on it,
# measured at this step (x its RMS: ~3 bits/weight, where byte targets of 6-8x
# code kernels) on at most GAIN_ROWS output rows.
GAIN_STEP = 0.6
GAIN_ROWS = 256


def gain(p, mean: np.ndarray | None = None, seed: int = 0) -> float:
    """How much of a plain coding's output error error feedback leaves on
    ``p`` (a :class:`jaxjpeg.codec.Prepared` leaf with a measured covariance):
    ``tr(E H Eᵀ)`` of its rows coded with feedback over that of the same rows
    coded plainly, at the same step.

    ``H`` is the covariance as feedback sees it (damped as feedback damps
    it: what it cannot know is not counted as cancelled).
    ``mean`` (the inputs' mean, broadcastable to the leaf): its direction is
    left out of ``H``, as bias correction removes the shift the error adds
    through it. Measured on up to GAIN_ROWS random outputs (feedback codes
    each output independently), sharing the leaf's feedback factor.

    A byte target weighs each calibrated leaf's squared error by this gain:
    on EfficientNet-lite at 8x (calibration covariances and means, 4 probe
    seeds) KL 0.0238 -> 0.0224 (lite1), 0.0252 -> 0.0218 (lite2).
    """
    from jaxjpeg import codec, rate

    fb = p.feedback
    h = np.asarray(fb.matrix, np.float64)
    weights = p.matrix if p.col_scale is None else p.matrix * p.col_scale
    col_scale, factors = p.col_scale, fb.factors
    if fb.along_rows:   # outputs on columns: coded transposed, its own factor
        weights, col_scale, factors = weights.T, None, {}
    rows = np.arange(len(weights))
    if len(rows) > GAIN_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), GAIN_ROWS, replace=False))
    sub = np.ascontiguousarray(weights[rows], np.float32)
    # H seen: P H P + damping * I (P = I - u uᵀ, u the mean's unit vector),
    # applied to the errors without forming another n x n matrix.
    u, diagonal = None, np.diag(h)
    if mean is not None:
        u = p.view.to_matrix(np.broadcast_to(np.asarray(mean, np.float64), p.shape))
        u = np.array(u[:, 0] if fb.along_rows else u[0], np.float64)
        if np.linalg.norm(u) > 0:
            u /= np.linalg.norm(u)
            hu = h @ u
            diagonal = diagonal - 2 * hu * u + float(u @ hu) * u * u
        else:
            u = None
    damping = fb.damping_fraction() * max(float(np.mean(diagonal)), 0.0)
    plain = codec.prepare(sub, col_scale=col_scale)
    step = GAIN_STEP * rate.tensor_rms(plain)

    def output_error(q) -> float:
        e = codec.decode_tensor(rate.encode_at_step(q, step, bits=12)).astype(np.float64) - sub
        projected = e if u is None else e - np.outer(e @ u, u)
        return float(np.sum((projected @ h) * projected) + damping * np.sum(e * e))
    base = output_error(plain)
    if not base > 0:
        return 1.0
    shaped = codec.prepare(sub, col_scale=col_scale,
                           feedback=Feedback(h, False, fb.by_power, fb.damping,
                                             factors=factors))
    return output_error(shaped) / base
