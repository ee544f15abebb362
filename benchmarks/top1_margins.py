"""Which crops change their top-1 class, against how close float32's top two were.

    python benchmarks/top1_margins.py [--models lite0,lite1,lite2] [--seeds 4] [--ratio 8]

Top-1 agreement on ``benchmarks/real_models.py``'s 96 crops moves in steps of
about 0.01 and, on crops whose float32 top-two probabilities nearly tie, by
any perturbation at all. For each EfficientNet-lite this prints how many
crops fall in each band of float32's margin p1 - p2, and for int8 per
channel, int4-g128 (``benchmarks/baselines.py``, measured in the same run)
and jaxjpeg at ``--ratio`` without data (``prior``) and with calibration
(``feedback``, as ``benchmarks/probe_seeds.py``; mean over ``--seeds`` probe
seeds): the KL, top-1 agreement, the crops that flip in each band, and
top-1 on the crops with a margin of at least 0.05. Needs the packages of
``benchmarks/real_models.py``.
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

BANDS = (0.0, 0.02, 0.05, 0.1, 0.2, 1.01)   # float32's p1 - p2
CONFIDENT = 0.05


def report(name: str, ref: np.ndarray, runs: dict) -> None:
    p = np.exp(common.log_softmax(ref))
    top2 = np.sort(p, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    counts = np.histogram(margin, BANDS)[0]
    bands = " ".join(f"[{lo:g},{min(hi, 1):g})" for lo, hi in zip(BANDS[:-1], BANDS[1:]))
    print(f"\n{name}: mean top probability {top2[:, 1].mean():.2f}; crops per float32 margin "
          f"band {bands}: {' '.join(str(c) for c in counts)}")
    print(f"{'method':10s} {'KL':>7s} {'top-1':>6s}  flips per band (mean over runs)"
          f"{'':8s} top-1, margin >= {CONFIDENT:g}")
    confident = margin >= CONFIDENT
    for label, outs in runs.items():
        flips = np.mean([o.argmax(1) != ref.argmax(1) for o in outs], axis=0)
        kl = np.mean([common.classification_metrics(ref, o)["kl"] for o in outs])
        per_band = [flips[(margin >= lo) & (margin < hi)].sum()
                    for lo, hi in zip(BANDS[:-1], BANDS[1:])]
        print(f"{label:10s} {kl:7.4f} {1 - flips.mean():6.3f}  "
              + " ".join(f"{f:5.2f}" for f in per_band)
              + f"{'':10s} {1 - flips[confident].mean():.3f}", flush=True)


def main(argv=None) -> int:
    import probe_seeds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lite0,lite1,lite2")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=8.0)
    args = ap.parse_args(argv)
    missing = common.missing_modules(["numpy", "jax"] + effnet.required_modules("lite1"))
    if missing:
        print(common.MissingDependencies(missing), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            case = effnet.EffNetCase(name, n_eval=96, n_calib=32, engine="ort",
                                     log=lambda *a: None)
            ref = case.reference()
            runs = {b: [case.run(M.run_baseline(case, b).weights)] for b in ("int8", "int4-g128")}
            for setting in ("prior", "feedback"):
                kwargs = probe_seeds.save_kwargs(case, setting, args.ratio)
                runs[setting] = [case.run(probe_seeds.restored_weights(case, kwargs, seed,
                                                                       Path(tmp)))
                                 for seed in range(args.seeds)]
            report(name, ref, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
