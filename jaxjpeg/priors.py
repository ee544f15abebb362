"""Data-free importances: what a network's BatchNorm layers say about its inputs.

A weight's error costs ``ΔW[:, i]² · E[x_i²]``: it matters in proportion to
the power of the input channel it multiplies. Without calibration data that
power is unknown, but a layer fed by a BatchNorm (then, as in most CNNs, a
ReLU-family activation) receives ``x_i = act(γ_i z + β_i)`` with ``z`` about
standard normal, so ``E[x_i²] ≈ E[relu(N(β_i, γ_i²))²]``: channels the
activation almost always zeroes (the "dead" ones, common after ReLU6) barely
matter, and the step of those inputs' weights can grow.

Measured on EfficientNet-lite1 / -lite2 at 8x (``benchmarks/real_models.py``,
96 crops, mean of 4 probe seeds): KL to float32 0.366 → 0.205 and 0.408 →
0.269 with these per-input-channel importances at equal size; the diagonal
of the real input covariance does no better (0.183 on lite1, one seed).
Layers whose inputs are normalised but not activated (a residual stream)
get the same estimate, which is wrong for them: we cannot tell from the
weights. Leaving them out (by name) would give 0.173 / 0.261 (one seed);
over all layers the prior still helps, and on a Flax ResNet too
(``benchmarks/batchnorm_prior.py``). Depthwise kernels are left alone:
weighting their channels the same way made lite1 / lite2 much worse (KL
0.205 → 0.639, 0.269 → 0.513): the BatchNorm after them divides each
channel by its own spread, which input power does not see.

Pairing follows the tree's insertion order (a PyTorch ``state_dict``, Flax
variables as built): each weight takes the nearest BatchNorm before it whose
size is its input-channel count. Norm layers without running statistics
(LayerNorm, RMSNorm) are not used: their outputs usually feed linear layers
directly, where this estimate has not been measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxjpeg.treepaths import leaves_with_paths, path_string

# Leaf names of a BatchNorm's affine parameters and of its running variance:
# PyTorch, Keras, Flax ("scale"/"bias" in params, "var" in batch_stats).
_SCALE = ("weight", "gamma", "scale")
_SHIFT = ("bias", "beta")
_VARIANCE = ("running_var", "moving_variance", "var")
# Flax keeps a module's parameters and its running statistics in two
# collections with the same module paths below them.
_FLAX_PARAMS, _FLAX_STATS = "params", "batch_stats"
SEARCH_BACK = 16   # leaves looked back from a weight for its BatchNorm


def input_power(tree) -> dict[str, tuple[int, np.ndarray]]:
    """{weight leaf path: (its input-channel axis, estimated E[x²] per input
    channel)} for every weight fed by a BatchNorm in ``tree``."""
    ordered = _in_insertion_order(tree)
    arrays = dict(ordered)
    norms = _batchnorms(arrays)
    out = {}
    for k, (name, array) in enumerate(ordered):
        if np.ndim(array) < 2 or _leaf(name) not in ("weight", "kernel"):
            continue
        for before, _ in reversed(ordered[max(0, k - SEARCH_BACK):k]):
            norm = norms.get(before)
            if norm is None:
                continue
            axis = _input_axis(name, np.shape(array), len(norm))
            if axis is not None:
                out[name] = (axis, norm)
                break
    return out


def relu_power(shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """E[relu(y)²] for y ~ N(shift, scale²), elementwise (closed form)."""
    mu = np.asarray(shift, np.float64)
    sigma = np.abs(np.asarray(scale, np.float64))
    safe = np.where(sigma > 0, sigma, 1.0)
    t = mu / safe
    cdf = 0.5 * (1.0 + _erf(t / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    power = (mu * mu + sigma * sigma) * cdf + mu * sigma * pdf
    return np.where(sigma > 0, np.maximum(power, 0.0), np.square(np.maximum(mu, 0.0)))


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _batchnorms(arrays: dict) -> dict[str, np.ndarray]:
    """{path of a BatchNorm's shift leaf: its output power estimate}."""
    out = {}
    for name, array in arrays.items():
        parent, leaf = _split(name)
        if leaf not in _SHIFT or np.ndim(array) != 1:
            continue
        scale = next((arrays[_join(parent, s)] for s in _SCALE if _join(parent, s) in arrays),
                     None)
        if scale is None or np.shape(scale) != np.shape(array) or not _has_variance(arrays, parent):
            continue
        shift = np.asarray(array, np.float64)
        gamma = np.asarray(scale, np.float64)
        if np.all(np.isfinite(shift)) and np.all(np.isfinite(gamma)):
            out[name] = relu_power(shift, gamma)
    return out


def _has_variance(arrays: dict, parent: str) -> bool:
    """Running statistics beside the affine parameters (or, in Flax, in the
    batch_stats collection's mirror of the module): a BatchNorm, not a
    LayerNorm."""
    candidates = [parent]
    parts = parent.split("/")
    if _FLAX_PARAMS in parts:
        i = parts.index(_FLAX_PARAMS)
        candidates.append("/".join(parts[:i] + [_FLAX_STATS] + parts[i + 1:]))
    return any(_join(p, v) in arrays for p in candidates for v in _VARIANCE)


def _input_axis(name: str, shape: tuple, channels: int) -> int | None:
    """The axis of a weight's inputs: 1 in PyTorch's (O, I, ...) layouts, -2
    in Flax's (..., I, O); by size, the leaf's name deciding a tie."""
    torch_axis, flax_axis = 1, len(shape) - 2
    fits = [a for a in (torch_axis, flax_axis) if shape[a] == channels]
    if not fits:
        return None
    if len(set(fits)) == 1:
        return fits[0]
    return flax_axis if _leaf(name) == "kernel" else torch_axis


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
