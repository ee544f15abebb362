"""Printing rows, per-leaf detail, Markdown tables, JSON and the plot."""

from __future__ import annotations

import json
import math

import numpy as np

# family -> [(row key, header, format)]
METRIC_COLUMNS = {
    "cls": [("top1", "top-1", ".4f"), ("top5", "top-5", ".4f"), ("kl", "KL", ".2e"),
            ("cosine", "cosine", ".5f")],
    "rec": [("exact_f32", "exact/f32", ".3f"), ("char_f32", "char/f32", ".4f"),
            ("exact_gt", "exact/gt", ".3f"), ("char_gt", "char/gt", ".4f"),
            ("kl", "KL/step", ".2e")],
    "det": [("iou", "mask IoU", ".4f"), ("agree", "pix agree", ".5f"),
            ("mean_abs", "mean|dp|", ".2e")],
}
FAMILY_TITLE = {"cls": "ImageNet classifiers (metrics vs the float32 model's logits)",
                "rec": "Text recognizer (CTC text vs float32 model / ground truth)",
                "det": "Text detector (probability map vs float32 model, mask = p > 0.3)"}
BASE_COLUMNS = [("model", "model", 8, "s"), ("layout", "layout", 6, "s"),
                ("method", "method", 17, "s"), ("setting", "setting", 16, "s"),
                ("ratio", "ratio", 7, ".2f"), ("bpw", "bits/w", 6, ".3f")]
TAIL_COLUMNS = [("seconds", "save s", 6, ".1f")]


def _cell(value, spec, width) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value) and spec != "s"):
        text = "-"
    elif spec == "s":
        text = str(value)
    else:
        text = format(value, spec)
    return text.rjust(width) if spec != "s" else text.ljust(width)


def header(family: str) -> str:
    cells = [h.ljust(w) if s == "s" else h.rjust(w) for _, h, w, s in BASE_COLUMNS]
    cells += [h.rjust(max(9, len(h))) for _, h, _ in METRIC_COLUMNS[family]]
    cells += [h.rjust(w) for _, h, w, _ in TAIL_COLUMNS] + ["note"]
    return " ".join(cells)


def format_row(row: dict) -> str:
    cells = [_cell(row.get(k), s, w) for k, _, w, s in BASE_COLUMNS]
    if row.get("error"):
        seconds = f" ({row['seconds']:.1f} s)" if row.get("seconds") else ""
        cells += [row["error"] + seconds]
        return " ".join(cells)
    cells += [_cell(row.get(k), s, max(9, len(h))) for k, h, s in METRIC_COLUMNS[row["family"]]]
    cells += [_cell(row.get(k), s, w) for k, _, w, s in TAIL_COLUMNS]
    cells.append(row.get("note", ""))
    return " ".join(cells)


def format_leaves(leaves: list[dict], top: int | None = None) -> str:
    """Coded leaves in tree order (or the ``top`` largest), then a line for raw leaves."""
    coded = [l for l in leaves if l["storage"] == "jpeg"]
    raw = [l for l in leaves if l["storage"] != "jpeg"]
    total_sse = sum(l["sse"] for l in coded) or 1.0
    if top:
        coded = sorted(coded, key=lambda l: -l["stored_bytes"])[:top]
    lines = [f"    {'leaf':<44} {'shape':<20} {'kind':<7} {'store':<5} {'bytes':>9} "
             f"{'bytes%':>6} {'bits/w':>6} {'rel RMS':>8} {'SSE%':>6}"]
    for l in coded:
        lines.append(f"    {l['name'][:44]:<44} {str(tuple(l['shape'])):<20} {l['kind']:<7} "
                     f"{l['storage']:<5} {l['stored_bytes']:>9} {100 * l['byte_share']:>6.2f} "
                     f"{l['bpw']:>6.3f} {l['rel_rms']:>8.4f} {100 * l['sse'] / total_sse:>6.2f}")
    raw_bytes = sum(l["stored_bytes"] for l in raw)
    share = sum(l["byte_share"] for l in raw)
    lines.append(f"    + {len(raw)} leaves stored raw: {raw_bytes} bytes ({100 * share:.2f}% of "
                 "the file); the rest of the file is container overhead")
    return "\n".join(lines)


def leaf_summary(leaves: list[dict], n: int = 3) -> str:
    """One line: the leaves with the most bytes and with the highest relative error."""
    coded = [l for l in leaves if l["storage"] == "jpeg"]
    if not coded:
        return ""
    big = sorted(coded, key=lambda l: -l["stored_bytes"])[:n]
    worst = sorted(coded, key=lambda l: -l["rel_rms"])[:n]
    return ("most bytes: " + ", ".join(f"{l['name']} {100 * l['byte_share']:.1f}%" for l in big)
            + "; worst rel RMS: " + ", ".join(f"{l['name']} {l['rel_rms']:.3f}" for l in worst))


# ----------------------------------------------------------------------------
# Markdown and JSON
# ----------------------------------------------------------------------------

def markdown_tables(rows: list[dict]) -> str:
    out = []
    for family in ("cls", "rec", "det"):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        metric_cols = METRIC_COLUMNS[family]
        out += [f"### {FAMILY_TITLE[family]}", "",
                "| model | layout | method | setting | ratio | bits/weight | "
                + " | ".join(h for _, h, _ in metric_cols) + " | save s | note |",
                "|---|---|---|---|---:|---:|" + "---:|" * len(metric_cols) + "---:|---|"]
        for r in fam:
            base = (f"| {r['model']} | {r['layout']} | {r['method']} | {r['setting']} | "
                    f"{_cell(r.get('ratio'), '.2f', 0)} | {_cell(r.get('bpw'), '.3f', 0)} | ")
            if r.get("error"):
                out.append(base + " | ".join("" for _ in metric_cols) + f" | | {r['error']} |")
            else:
                out.append(base + " | ".join(_cell(r.get(k), s, 0) for k, _, s in metric_cols)
                           + f" | {_cell(r.get('seconds'), '.1f', 0)} | {r.get('note', '')} |")
        out.append("")
    return "\n".join(out)


def write_json(path, meta: dict, rows: list[dict]) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        return v

    payload = {**meta, "rows": [{k: clean(v) if k != "leaves" else v for k, v in r.items()}
                                for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


# ----------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------

PLOT_METRICS = {  # family -> (upper metric, label), (lower metric, label)
    "cls": (("top1", "top-1 agreement"), ("kl", "KL(fp32 || q), nats")),
    "rec": (("char_f32", "char accuracy vs fp32 text"), ("kl", "KL per time step, nats")),
    "det": (("iou", "mask IoU vs fp32"), ("mean_abs", "mean |p - p_fp32|")),
}
STYLE = {"int8": ("tab:gray", "s"), "int4-g32": ("tab:brown", "v"), "int4-g128": ("tab:pink", "^"),
         "naive-jpeg-q75": ("tab:olive", "X"), "jaxjpeg-default": ("tab:purple", "D"),
         "jaxjpeg": ("tab:blue", "o"), "jaxjpeg-match": ("tab:cyan", "P"),
         "jaxjpeg-sens": ("tab:red", "*"), "jaxjpeg-sens-leaf": ("tab:orange", "h")}


def plot(path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.6), squeeze=False)
    for col, model in enumerate(models):
        mrows = [r for r in rows if r["model"] == model and not r.get("error")
                 and r["method"] != "float32" and r.get("ratio")]
        if not mrows:
            continue
        family = mrows[0]["family"]
        for ax, (key, label) in zip(axes[:, col], PLOT_METRICS[family]):
            series = {}
            for r in mrows:
                layout = "" if r["method"] in STYLE and r["method"] in (
                    "int8", "int4-g32", "int4-g128", "naive-jpeg-q75") else r["layout"]
                series.setdefault((r["method"], layout), []).append(r)
            for (method, layout), rs in series.items():
                if method in ("int8", "int4-g32", "int4-g128", "naive-jpeg-q75"):
                    rs = rs[:1]   # identical in both layouts
                rs = sorted(rs, key=lambda r: r["ratio"])
                color, marker = STYLE.get(method, ("k", "."))
                values = [r.get(key) for r in rs]
                if key in ("kl", "mean_abs"):
                    values = [max(v, 1e-7) if v is not None else None for v in values]
                dashed = layout in ("torch", "onnx")
                ax.plot([r["ratio"] for r in rs], values, marker=marker, color=color,
                        linestyle=("--" if dashed else "-") if len(rs) > 1 else "none",
                        mfc="none" if dashed else color, ms=6,
                        label=f"{method}{' (' + layout + ')' if layout else ''}")
            ax.set(xlabel="compression ratio vs float32 (all-in)", ylabel=label,
                   title=f"{model}")
            if key in ("kl", "mean_abs"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=6, loc="lower left")
    fig.suptitle("Fidelity vs all-in compression ratio (filled/solid: flax layout; "
                 "open/dashed: torch or onnx layout; baselines run on the flax view)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
