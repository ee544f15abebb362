"""The compression methods compared, each turning a model's native weights into
(restored native weights, all-in bits) plus details.

* ``float32``: the weights as they are (32 bits per weight).
* ``int8``, ``int4-g32``, ``int4-g128``, ``naive-jpeg-q75``: ``benchmarks/baselines.py``.
  Those assume the output channel is the last axis, so they always run on the Flax view
  of the weights (true per-output-channel scales, groups along the input dimension) and
  the result is transposed back: their rows are the same for both layouts.
* ``jaxjpeg-default``: ``jaxjpeg.save(path, tree)``.
* ``jaxjpeg``: ``jaxjpeg.save(path, tree, target_ratio=r)`` for each ``--ratios`` r.
* ``jaxjpeg-match``: ``target_bytes`` = each baseline's size (bits_used / 8).
* ``jaxjpeg-sens``: ``target_ratio=r`` (``--sens-ratios``) with ``sensitivity=`` the
  per-element diagonal Fisher (arrays with the leaves' shapes, in the saved layout).
* ``jaxjpeg-sens-leaf``: the same with one number per leaf (the Fisher's mean).
* ``jaxjpeg-fb``: ``target_ratio=r`` (``--sens-ratios``) with ``input_covariance=`` the
  calibration crops' input second moments of every ungrouped conv and linear layer
  (error feedback, :mod:`jaxjpeg.feedback`) and, where the model gives them,
  ``input_mean=`` their input means (bias correction, :mod:`jaxjpeg.bias_correction`);
  ``jaxjpeg-sens-fb``: that plus the per-leaf Fisher means of ``jaxjpeg-sens-leaf``.
* ``jaxjpeg-synth``: ``jaxjpeg-fb`` without data: the statistics of inputs synthesized
  from the network's BatchNorm running statistics (``jaxjpeg.calibration.synthetic_inputs``
  on a Flax port of the network), covariances damped by ``feedback.SYNTHETIC_DAMPING``.

jaxjpeg sizes are the checkpoint file's bytes; every jaxjpeg result is restored with
``jaxjpeg.restore`` (the decoder the user gets), not decoded in Python.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from pathlib import Path

import numpy as np

from . import common

BASELINES = ("int8", "int4-g32", "int4-g128", "naive-jpeg-q75")
JAXJPEG = ("jaxjpeg-default", "jaxjpeg", "jaxjpeg-match", "jaxjpeg-sens", "jaxjpeg-sens-leaf",
           "jaxjpeg-fb", "jaxjpeg-sens-fb", "jaxjpeg-synth")
ALL_METHODS = ("float32",) + BASELINES + JAXJPEG
ALIASES = {"all": ALL_METHODS, "baselines": BASELINES, "jaxjpeg-all": JAXJPEG,
           "jaxjpeg-ratio": ("jaxjpeg",)}


def expand_methods(spec: str) -> list[str]:
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        names = ALIASES.get(item, (item,))
        for name in names:
            if name not in ALL_METHODS:
                raise SystemExit(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)} "
                                 f"or {', '.join(ALIASES)}")
            if name not in out:
                out.append(name)
    return out


@dataclasses.dataclass
class Result:
    method: str
    setting: str = ""
    weights: dict | None = None      # restored weights, native layout
    bits: int | None = None          # all-in bits
    seconds: float | None = None     # save (jaxjpeg) or quantize (baselines) time
    restore_seconds: float | None = None
    leaves: list | None = None       # per-leaf detail (jaxjpeg)
    error: str | None = None
    note: str = ""


def _quantizer(name: str):
    import baselines

    return {"int8": baselines.int8_per_channel, "int4-g32": baselines.int4_g32,
            "int4-g128": baselines.int4_g128, "naive-jpeg-q75": baselines.naive_jpeg_at(75)}[name]


def run_baseline(case, name: str) -> Result:
    """A baseline on the Flax view of ``case.native``; weights come back native."""
    import baselines

    flax = common.to_layout(case.native, case.kinds, "flax")
    t = time.perf_counter()
    new, bits, _ = baselines.apply_to_tree(flax, _quantizer(name))
    seconds = time.perf_counter() - t
    new = {k: np.asarray(v, np.float32) for k, v in new.items()}
    return Result(name, weights=common.from_layout(new, case.kinds, "flax"), bits=int(bits),
                  seconds=seconds, note="on the flax view")


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def run_jaxjpeg(case, layout: str, method: str, setting: str, kwargs: dict, workdir: Path,
                *, debug: bool = False) -> Result:
    """Saves ``case.native`` in ``layout`` with ``kwargs``, restores it, returns native weights."""
    import jaxjpeg

    tree = common.to_layout(case.native, case.kinds, layout)
    dtype = getattr(case, "save_dtype", "float32")
    if dtype != "float32":   # --dtype: a half-precision copy of the network is what is saved
        import ml_dtypes
        tree = {k: v.astype(getattr(ml_dtypes, dtype, dtype)) for k, v in tree.items()}
    slug = "".join(c if c.isalnum() else "_" for c in f"{case.name}-{layout}-{method}-{setting}")
    path = workdir / f"{slug}.jjpg"
    t = time.perf_counter()
    try:
        report = jaxjpeg.save(path, tree, progress=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a failing setting is a result, not a crash
        if debug:
            traceback.print_exc()
        return Result(method, setting, error=_short_error(exc), seconds=time.perf_counter() - t)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    try:
        restored = jaxjpeg.restore(path)
        restored = {k: np.asarray(restored[k], np.float32) for k in tree}
    except Exception as exc:  # noqa: BLE001
        if debug:
            traceback.print_exc()
        return Result(method, setting, error="restore: " + _short_error(exc), seconds=seconds)
    restore_seconds = time.perf_counter() - t
    bits = 8 * report.file_bytes
    leaves = leaf_detail(report, tree, restored, case.kinds)
    path.unlink(missing_ok=True)
    return Result(method, setting, weights=common.from_layout(restored, case.kinds, layout),
                  bits=bits, seconds=seconds, restore_seconds=restore_seconds, leaves=leaves)


def leaf_detail(report, tree: dict, restored: dict, kinds: dict) -> list[dict]:
    """Per leaf: name, shape (as saved), layer kind, storage, stored bytes, bits/weight and
    relative RMS error of the restored leaf."""
    total = max(1, report.file_bytes)
    out = []
    for leaf in report.leaves:
        w = tree[leaf.path].astype(np.float64)
        err = restored[leaf.path].astype(np.float64) - w
        norm = float(np.linalg.norm(w))
        rel = float(np.linalg.norm(err)) / norm if norm > 0 else float(np.linalg.norm(err))
        out.append(dict(name=leaf.path, shape=list(leaf.shape), kind=kinds.get(leaf.path, "other"),
                        storage=leaf.kind, stored_bytes=int(leaf.stored_bytes),
                        bpw=8 * leaf.stored_bytes / max(1, w.size),
                        byte_share=leaf.stored_bytes / total, rel_rms=rel,
                        sse=float(np.sum(err * err))))
    return out


def jaxjpeg_tasks(method: str, ratios, sens_ratios, baseline_bits: dict, sensitivity,
                  covariances=None, means=None, synthetic=None):
    """(setting label, save kwargs) pairs of one jaxjpeg method; kwargs None = skip with note."""
    if method == "jaxjpeg-default":
        return [("default", {})]
    if method == "jaxjpeg":
        return [(f"r{r:g}", dict(target_ratio=r)) for r in ratios]
    if method == "jaxjpeg-match":
        return [(f"={b} size", dict(target_bytes=int(bits // 8)))
                for b, bits in baseline_bits.items()]
    if method == "jaxjpeg-synth":
        if synthetic is None:
            return [(f"r{r:g}+synth", None) for r in sens_ratios]
        return [(f"r{r:g}+synth", dict(target_ratio=r, input_covariance=synthetic[0],
                                       input_mean=synthetic[1])) for r in sens_ratios]
    extra, label = {}, ""
    if method in ("jaxjpeg-fb", "jaxjpeg-sens-fb"):
        if covariances is None:
            return [(f"r{r:g}+fb", None) for r in sens_ratios]
        extra, label = dict(input_covariance=covariances), "+fb"
        if means:
            extra["input_mean"] = means
        if method == "jaxjpeg-fb":
            return [(f"r{r:g}{label}", dict(target_ratio=r, **extra)) for r in sens_ratios]
    if method in ("jaxjpeg-sens", "jaxjpeg-sens-leaf", "jaxjpeg-sens-fb"):
        if sensitivity is None:
            return [(f"r{r:g}+sens{label}", None) for r in sens_ratios]
        if method == "jaxjpeg-sens":
            sens = sensitivity
        else:
            sens = {k: float(np.mean(v)) for k, v in sensitivity.items()}
        return [(f"r{r:g}+sens{label}", dict(target_ratio=r, sensitivity=sens, **extra))
                for r in sens_ratios]
    raise ValueError(method)


def layout_covariances(covariances: dict, kinds: dict, layout: str, damping=None) -> dict:
    """{name: jaxjpeg.InputCovariance} of native-layout input covariances (features
    (I, kh, kw) of conv (O, I, kh, kw), I of linear (O, I) and of matmul (I, O)) for
    ``layout`` (flax: conv (kh, kw, I, O), linear (I, O), matmul as it is), each with
    ``damping`` (InputCovariance.damping)."""
    import jaxjpeg

    axes = {"torch": {"conv": (1, 2, 3), "linear": (1,), "matmul": (0,)},
            "flax": {"conv": (2, 0, 1), "linear": (0,), "matmul": (0,)}}[layout]
    return {name: jaxjpeg.InputCovariance(h, axes[kinds[name]], damping)
            for name, h in covariances.items() if kinds.get(name) in axes}


def synthetic_statistics(case, layout: str, draw: int = 0):
    """(covariances, means) for ``layout`` of the case's synthetic inputs
    (``case.synthetic_inputs(draw)``), the covariances damped by
    ``feedback.SYNTHETIC_DAMPING``."""
    from jaxjpeg.feedback import SYNTHETIC_DAMPING

    images = case.synthetic_inputs(draw)
    return (layout_covariances(case.input_covariances(images), case.kinds, layout,
                               SYNTHETIC_DAMPING),
            layout_means(case.input_means(images), case.kinds, layout))


def layout_means(means: dict, kinds: dict, layout: str) -> dict:
    """{name: jaxjpeg.InputMean} of native-layout input means (broadcastable to the
    native weight, output axis 0) for ``layout``."""
    import jaxjpeg

    out = {}
    for name, values in common.to_layout(means, kinds, layout).items():
        perm = common.FLAX_PERMUTATION.get(kinds.get(name)) if layout == "flax" else None
        out[name] = jaxjpeg.InputMean(values, perm.index(0) if perm else 0)
    return out


def bits_per_weight(case, bits: int) -> float:
    return bits / sum(v.size for v in case.native.values())


def ratio_of(case, bits: int) -> float:
    return 32 * sum(v.size for v in case.native.values()) / bits if bits else math.nan
