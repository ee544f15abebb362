"""How much of a real-model result is the allocation's luck: the same save
with different rate-probe seeds.

A byte target measures each leaf's rate–distortion curve on a random probe;
another seed moves the curves a little and the allocation with them. On
EfficientNet-lite at 8x that alone moves the KL by up to ±40%, so a change to
the coder is judged here by its mean over seeds, not by one run of
``benchmarks/real_models.py``.

    python benchmarks/probe_seeds.py --models lite0,lite1,lite2 --seeds 4 \\
        --settings prior,no-prior,feedback,fisher-leaf

Settings (all ``target_ratio`` = ``--ratio``, PyTorch layout):
``prior`` (the default save), ``no-prior`` (``batchnorm_prior=False``),
``feedback`` (``input_covariance`` and ``input_mean`` from the 32 calibration crops),
``means`` (the default save plus ``input_mean`` alone),
``synthetic`` (``feedback`` on inputs synthesized from the BatchNorm statistics:
``EffNetCase.synthetic_inputs``, damped by ``feedback.SYNTHETIC_DAMPING``; ``--draws N``
repeats it on N batches from other noise seeds and pools them),
``fisher-leaf`` (one diagonal-Fisher mean per leaf as ``sensitivity``),
``nnx`` (the default save of the weights as a Flax NNX state holds them:
Flax layout, paths ending in ``value``, sorted; see ``common.to_nnx_state``),
``sorted`` (the state dict sorted by name, as a safetensors file lists it),
``keras`` (Flax layout named as Keras 2's ``model.weights``: ``gamma`` /
``moving_mean`` / ``kernel``, each ending in ``:0``; see ``common.to_keras_names``).
Needs the packages of ``benchmarks/real_models.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_models_lib import common, effnet, methods as M  # noqa: E402

SETTINGS = ("prior", "no-prior", "feedback", "means", "fisher-leaf", "nnx", "sorted",
            "keras", "synthetic")


def save_kwargs(case, setting: str, ratio: float, draw: int = 0) -> dict:
    kwargs = dict(target_ratio=ratio)
    if setting == "no-prior":
        kwargs["batchnorm_prior"] = False
    elif setting == "feedback":
        kwargs["input_covariance"] = M.layout_covariances(case.input_covariances(), case.kinds,
                                                          "torch")
        kwargs["input_mean"] = M.layout_means(case.input_means(), case.kinds, "torch")
    elif setting == "synthetic":
        covariances, means = M.synthetic_statistics(case, "torch", draw)
        kwargs.update(input_covariance=covariances, input_mean=means)
    elif setting == "means":
        kwargs["input_mean"] = M.layout_means(case.input_means(), case.kinds, "torch")
    elif setting in ("nnx", "sorted", "keras"):
        kwargs["listing"] = setting
    elif setting == "fisher-leaf":
        kwargs["sensitivity"] = {k: float(np.mean(v)) for k, v in case.sensitivity().items()}
    return kwargs


def run(case, ref, kwargs: dict, seed: int, workdir: Path) -> dict:
    return case.metrics(ref, case.run(restored_weights(case, kwargs, seed, workdir)))


def restored_weights(case, kwargs: dict, seed: int, workdir: Path) -> dict:
    """The case's native weights saved with ``kwargs`` (probe seed ``seed``)
    and restored."""
    import jaxjpeg
    from jaxjpeg import treepaths

    kwargs = dict(kwargs)   # the same settings serve every seed
    listing = kwargs.pop("listing", None)
    flax = listing in ("nnx", "keras")
    if flax:
        to_flax = common.to_nnx_state if listing == "nnx" else common.to_keras_names
        tree, names = to_flax(case.native, case.kinds)
    else:
        tree = dict(sorted(case.native.items())) if listing == "sorted" else case.native
        names = {k: k for k in case.native}
    path = workdir / "x.jjpg"
    with common.probe_seed(seed):
        jaxjpeg.save(path, tree, progress=False, **kwargs)
    restored = {treepaths.path_string(r): np.asarray(v, np.float32)
                for r, v in treepaths.leaves_with_paths(jaxjpeg.restore(path))}
    weights = {names[k]: v for k, v in restored.items()}
    if flax:
        weights = dict(case.native, **common.from_layout(weights, case.kinds, "flax"))
    return weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lite0,lite1,lite2")
    p.add_argument("--settings", default="prior,no-prior")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--calib", type=int, default=32, help="calibration crops (feedback, fisher-leaf)")
    p.add_argument("--draws", type=int, default=1,
                   help="synthetic batches (noise seeds) for the synthetic setting; batches "
                        "differ in KL by up to 17%%, so judge it over several")
    args = p.parse_args(argv)
    missing = common.missing_modules(["numpy", "jax"] + effnet.required_modules("lite1"))
    if missing:
        print(common.MissingDependencies(missing), file=sys.stderr)
        return 2
    settings = [s for s in args.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    print(f"target_ratio={args.ratio:g}, {args.seeds} probe seeds, {args.calib} calibration crops, "
          "PyTorch layout")
    print(f"{'model':6s} {'setting':12s} {'KL mean':>8s} {'sd':>7s} {'top-1':>6s}  KL per seed")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            case = effnet.EffNetCase(name, n_eval=96, n_calib=args.calib, engine="ort",
                                     log=lambda *a: None)
            ref = case.reference()
            for setting in settings:
                draws = range(args.draws if setting == "synthetic" else 1)
                pooled = []
                for draw in draws:
                    kwargs = save_kwargs(case, setting, args.ratio, draw)
                    got = [run(case, ref, kwargs, seed, Path(tmp)) for seed in range(args.seeds)]
                    pooled += got
                    label = f"{setting}#{draw}" if len(draws) > 1 else setting
                    _print_row(name, label, got)
                if len(draws) > 1:
                    _print_row(name, f"{setting} all", pooled)
    return 0


def _print_row(name: str, label: str, got: list) -> None:
    kl = np.array([m["kl"] for m in got])
    top1 = np.mean([m["top1"] for m in got])
    print(f"{name:6s} {label:12s} {kl.mean():8.4f} {kl.std():7.4f} {top1:6.3f}  "
          + " ".join(f"{v:.3f}" for v in kl), flush=True)


if __name__ == "__main__":
    sys.exit(main())
