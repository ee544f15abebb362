"""Rate–distortion of jaxjpeg against baseline weight quantizers.

Usage: python benchmarks/rate_distortion.py [--quick] [--out docs]

Sizes are ALL-IN bits per weight: JPEG bytes + per-row affine parameters
(float32, as EncodedTensor.nbytes counts them) + leaves kept lossless
(float32), over every weight of the tensor or model.

* Synthetic Gaussian and Laplacian tensors: relative RMS error vs bits per
  weight for jaxjpeg (shared-scale mapping, 8/12-bit chosen by step, and the
  codec's per-row ``clip="mse"`` mapping at 8 bits), the baselines, and the
  entropy-coded uniform scalar quantizer (ECSQ: the empirical entropy of
  round(x/Δ), the rate of an ideal entropy coder) at the same error; the
  table reports jaxjpeg's gap to it.
* The example models (examples/models.py): output fidelity (accuracy, KL,
  cosine) vs all-in bits per weight; jaxjpeg budgets are split across leaves
  by :func:`jaxjpeg.rate.allocate_to_target`, with and without gradient
  sensitivities (per leaf and per row).

Writes ``<out>/rate_distortion.md`` and ``<out>/rate_distortion.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

import baselines  # noqa: E402
from jaxjpeg import codec, rate  # noqa: E402

BASELINES = ["int8", "int4-g32", "int4-g128", "naive-jpeg-q50", "naive-jpeg-q75", "naive-jpeg-q90"]


# ----------------------------------------------------------------------------
# Synthetic tensors
# ----------------------------------------------------------------------------

def ecsq_rate(x: np.ndarray, mse: float) -> float:
    """Empirical entropy (bits/weight) of round(x/Δ) with Δ bisected to give ``mse``."""
    x = x.astype(np.float64).ravel()

    def at(delta):
        k = np.rint(x / delta)
        _, counts = np.unique(k, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum()), float(np.mean((x - k * delta) ** 2))

    lo, hi = math.sqrt(mse) * 0.5, math.sqrt(mse) * 8
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        if at(mid)[1] < mse:
            lo = mid
        else:
            hi = mid
    return at(math.sqrt(lo * hi))[0]


def synthetic(quick: bool):
    side = 256 if quick else 1024
    rng = np.random.default_rng(0)
    tensors = {
        "gaussian": (rng.standard_normal((side, side)) * 0.02).astype(np.float32),
        "laplacian": (rng.laplace(size=(side, side)) * 0.02 / math.sqrt(2)).astype(np.float32),
    }
    results = {}
    ks = np.arange(0.0, 6.01, 1.0 if quick else 0.5)
    for name, x in tensors.items():
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        norm = float(np.linalg.norm(x.astype(np.float64)))
        rows = []
        for k in ks:
            enc = rate.encode_at_step(x, rms * 2.0 ** -k)
            sse = rate.squared_error(x, enc)
            jpeg_bits = 8 * sum(len(t.data) for t in enc.tiles) / x.size
            rows.append(dict(method="jaxjpeg", setting=f"q=rms/2^{k:g}, {enc.bits}-bit",
                             bpw=enc.bits_per_weight, rel=math.sqrt(sse) / norm,
                             jpeg_bpw=jpeg_bits, ecsq=ecsq_rate(x, sse / x.size)))
        for bits, steps in ((8, (1, 2, 4, 8, 16, 32)), (12, (16, 32, 64, 128, 256, 512))):
            for step in steps:
                enc = codec.encode_tensor(x, bits=bits, quant_step=step, clip="mse")
                rows.append(dict(method=f"jaxjpeg per-row mse {bits}-bit", setting=f"step {step}",
                                 bpw=enc.bits_per_weight,
                                 rel=math.sqrt(rate.squared_error(x, enc)) / norm))
        for method in BASELINES:
            w_hat, bits = baselines.QUANTIZERS[method](x)
            rows.append(dict(method=method, setting="", bpw=bits / x.size,
                             rel=float(np.linalg.norm(x - w_hat) / norm)))
        results[name] = rows
    return results


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

def flat(params):
    from flax import traverse_util
    return traverse_util.flatten_dict(params, sep="/")


def unflat(d):
    from flax import traverse_util
    return traverse_util.unflatten_dict(d, sep="/")


def model_cases(quick: bool, which=("digits", "sorting")):
    import models

    cases = []
    if "digits" not in which:
        return cases + _sorting_case(quick)
    model, params = models.pretrained_digits_cnn()
    _, _, x_test, y_test = models.digits_data()
    x_train, y_train, _, _ = models.digits_data()
    cases.append(dict(
        name="digits CNN", model=model, params=params, labels=y_test,
        outputs=lambda p, m=model, x=x_test: models.digits_logits(m, p, x),
        batches=[(x_train[i:i + 128], y_train[i:i + 128]) for i in range(0, 1280, 128)]))
    return cases + (_sorting_case(quick) if "sorting" in which else [])


def _sorting_case(quick: bool):
    import models

    cases = []
    model, params = models.pretrained_sensitive_model()
    x_tr, y_tr, x_te, y_te = models.sensitive_data(train_size=2048, test_size=1024 if quick else 4096)
    cases.append(dict(
        name="sorting transformer", model=model, params=params, labels=y_te,
        outputs=lambda p, m=model, x=x_te: models.sensitive_outputs(m, p, x),
        batches=[(x_tr[i:i + 256], y_tr[i:i + 256]) for i in range(0, 2048, 256)]))
    return cases


def run_model(case, targets):
    import jax
    import models
    import optax

    params = jax.tree_util.tree_map(np.asarray, case["params"])
    ref = case["outputs"](params)
    leaves = flat(params)
    chosen = {n: v for n, v in leaves.items() if baselines.default_policy(n, v)}
    lossless_bits = sum(32 * v.size if np.issubdtype(v.dtype, np.floating) else 8 * v.nbytes
                        for n, v in leaves.items() if n not in chosen)
    total_weights = sum(v.size for v in leaves.values())
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in chosen.values()))

    def evaluate(method, setting, new_leaves, bits):
        p = unflat({**leaves, **new_leaves})
        fid = models.output_fidelity(ref, case["outputs"](p), case["labels"])
        err = math.sqrt(sum(float(np.sum((chosen[n].astype(np.float64) - new_leaves[n]) ** 2))
                            for n in chosen)) / norm
        return dict(method=method, setting=setting, bpw=bits / total_weights, rel=err, **fid)

    model = case["model"]

    def loss_fn(p, batch):
        x, y = batch
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    sens = rate.sensitivity_from_gradients(loss_fn, params, case["batches"])
    row_sens = rate.sensitivity_from_gradients(loss_fn, params, case["batches"], per_row=True)
    rows = [evaluate("float32", "", {n: chosen[n] for n in chosen}, 32 * total_weights)]
    for method in BASELINES:
        new, bits, _ = baselines.apply_to_tree(params, baselines.QUANTIZERS[method])
        new = flat(jax.tree_util.tree_map(np.asarray, new))
        rows.append(evaluate(method, "", {n: new[n] for n in chosen}, bits))
    variants = {
        "jaxjpeg (MSE)": {},
        "jaxjpeg (grad-weighted)": dict(sensitivity={n: sens[n] for n in chosen}),
        "jaxjpeg (grad-weighted, rows)": dict(sensitivity={n: sens[n] for n in chosen},
                                              row_weights={n: row_sens[n] for n in chosen}),
    }
    for target in targets:
        budget = int((target * total_weights - lossless_bits) / 8)
        for method, kw in variants.items():
            alloc = rate.allocate_to_target(chosen, budget, **kw)
            new = {n: codec.decode_tensor(e) for n, e in alloc.encodings.items()}
            rows.append(evaluate(method, f"target {target:g} bpw (miss {100 * alloc.relative_miss:+.1f}%)",
                                 new, 8 * alloc.nbytes + lossless_bits))
    return rows


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def fmt(v, spec):
    return "" if v is None else format(v, spec)


def write_report(out: Path, synth, model_rows, quick, seconds):
    lines = ["# Rate–distortion of jaxjpeg", "",
             f"Generated by `python benchmarks/rate_distortion.py{' --quick' if quick else ''}` "
             f"in {seconds:.0f} s. Sizes are **all-in** bits per weight (JPEG bytes + float32 "
             "per-row affine + lossless leaves). `rel` = ||w - ŵ|| / ||w||.", "",
             "![rate-distortion](rate_distortion.png)", ""]
    for name, rows in synth.items():
        x_desc = "256x256" if quick else "1024x1024"
        lines += [f"## {name} {x_desc}", "",
                  "| method | setting | bits/weight | rel error | JPEG-only bpw | ECSQ bpw at same MSE | gap all-in | gap JPEG-only |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["method"], r["bpw"])):
            ec = r.get("ecsq")
            lines.append(f"| {r['method']} | {r['setting']} | {r['bpw']:.3f} | {r['rel']:.4f} | "
                         f"{fmt(r.get('jpeg_bpw'), '.3f')} | {fmt(ec, '.3f')} | "
                         f"{fmt(None if ec is None else r['bpw'] - ec, '+.3f')} | "
                         f"{fmt(None if ec is None else r['jpeg_bpw'] - ec, '+.3f')} |")
        gaps = [r["bpw"] - r["ecsq"] for r in rows if "ecsq" in r and 3 <= r["bpw"] <= 6]
        if gaps:
            lines += ["", f"Gap to ECSQ over 3–6 bits/weight (all-in): max {max(gaps):.3f}, "
                          f"mean {np.mean(gaps):.3f} bit/weight.", ""]
    for name, rows in model_rows.items():
        lines += [f"## {name}", "",
                  "| method | setting | bits/weight | rel error | accuracy | agreement | KL (nats) | cosine |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['setting']} | {r['bpw']:.3f} | {r['rel']:.4f} | "
                         f"{r['accuracy']:.4f} | {r['agreement']:.4f} | {r['kl']:.2e} | {r['cosine']:.5f} |")
        lines.append("")
    (out / "rate_distortion.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, synth, model_rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(synth) + len(model_rows)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    for ax, (name, rows) in zip(axes, synth.items()):
        by = {}
        for r in rows:
            by.setdefault(r["method"], []).append(r)
        for method, rs in by.items():
            rs = sorted(rs, key=lambda r: r["bpw"])
            ax.plot([r["bpw"] for r in rs], [r["rel"] for r in rs], "o-" if len(rs) > 1 else "s",
                    label=method, ms=4)
        ec = sorted((r["ecsq"], r["rel"]) for r in rows if "ecsq" in r)
        ax.plot([e[0] for e in ec], [e[1] for e in ec], "k--", label="ECSQ (ideal entropy)")
        ax.set(yscale="log", xlabel="all-in bits / weight", ylabel="relative RMS error",
               title=name, xlim=(0, 10))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, (name, rows) in zip(axes[len(synth):], model_rows.items()):
        by = {}
        for r in rows:
            if r["method"] != "float32":
                by.setdefault(r["method"], []).append(r)
        for method, rs in by.items():
            rs = sorted(rs, key=lambda r: r["bpw"])
            ax.plot([r["bpw"] for r in rs], [max(r["kl"], 1e-7) for r in rs],
                    "o-" if len(rs) > 1 else "s", label=method, ms=4)
        ax.set(yscale="log", xlabel="all-in bits / weight", ylabel="KL(ref || compressed), nats",
               title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rate_distortion.png", dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--models", default="digits,sorting",
                        help="comma-separated: digits, sorting (trained once and cached)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    synth = synthetic(args.quick)
    for name, rows in synth.items():
        for r in rows:
            if "ecsq" in r:
                print(f"{name}: {r['setting']:>22}  {r['bpw']:.3f} bpw  rel {r['rel']:.4f}  "
                      f"ECSQ {r['ecsq']:.3f}  gap {r['bpw'] - r['ecsq']:+.3f}", flush=True)
    model_rows = {}
    if not args.no_models:
        targets = (3.0, 4.0, 5.0) if args.quick else (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
        for case in model_cases(args.quick, args.models.split(",")):
            rows = run_model(case, targets)
            model_rows[case["name"]] = rows
            for r in rows:
                print(f"{case['name']}: {r['method']:>30} {r['setting']:>28} {r['bpw']:.3f} bpw "
                      f"rel {r['rel']:.4f} acc {r['accuracy']:.4f} KL {r['kl']:.2e} "
                      f"cos {r['cosine']:.5f}", flush=True)
    seconds = time.perf_counter() - start
    write_report(out, synth, model_rows, args.quick, seconds)
    plot(out, synth, model_rows)
    print(f"wrote {out / 'rate_distortion.md'} and {out / 'rate_distortion.png'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
