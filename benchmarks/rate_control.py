"""Rate control cost: byte targets and error bounds against a default save.

    python benchmarks/rate_control.py              # ~256 MB float32 transformer-like tree
    python benchmarks/rate_control.py --mb 1024    # the 1 GB tree of issue 8
    python benchmarks/rate_control.py --quick      # ~32 MB
    python benchmarks/rate_control.py --rounds 3   # 3 interleaved runs, least time each
    python benchmarks/rate_control.py --state      # the parameters beside Adam's moments
    python benchmarks/rate_control.py --generous   # target_ratio=2 and 3 too

Each mode saves the same tree in a fresh child process and reports:

- wall time and CPU time (user + system, all threads) of ``jaxjpeg.save``
  (jax and jaxjpeg imported before: a program saving a model has them) and
  their ratios to the default save's (target: at most 2x for
  ``target_ratio`` / ``bits_per_weight`` / ``error_bound``);
- peak RSS growth during the save (the peak RSS since the save began, minus
  the RSS before it; the tree is built before and the heap pages its
  construction freed are returned to the OS first) and its excess over the default save's, in units of
  the largest leaf (target: at most one leaf more);
- the achieved ratio against float32 / bits per weight and the miss against
  the target (target: within 2%).

With ``--live`` (glibc only) each save's peak of live heap (bytes malloc'd
and not freed, glibc's ``mallinfo2`` read every millisecond by a thread
beside the save) is printed too: what a save holds, apart from the freed
pages the allocator keeps (per-thread arenas, fragments) that RSS counts.
The reading thread slows the save a little: time ``--live`` runs apart.

The tree: ``--layers`` transformer blocks of width ``d`` (attention q/k/v/o
``d x d``, MLP ``d x 4d`` and ``4d x d``, two norm scales), an embedding
``(8d, d)``, with per-output-channel scale spread and a few outlier columns,
so views, the side list and the allocation all have work to do. With
``--state`` the tree is a training state: the parameters (half the bytes)
beside Adam's first and second moments after three steps of gradients
whose rows differ in scale, under optax's names (``mu`` / ``nu``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

MODES = {
    "default": {},
    "target_ratio=8": {"target_ratio": 8},
    "bits_per_weight=3": {"bits_per_weight": 3},
    "error_bound=0.08": {"error_bound": 0.08},
}


GENEROUS = {"target_ratio=3": {"target_ratio": 3}, "target_ratio=2": {"target_ratio": 2}}


def make_state(mb: float, seed: int = 0) -> dict:
    """A training state of about ``mb`` MB: parameters and Adam's moments."""
    params = make_tree(mb / 2, seed)
    rng = np.random.default_rng(seed + 1)
    mu, nu = {}, {}

    def moments(w):
        scale = 0.01 * np.exp(0.7 * rng.standard_normal((w.shape[0],) + (1,) * (w.ndim - 1)))
        m = v = 0.0
        for _ in range(3):
            g = scale * rng.standard_normal(w.shape)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        return m.astype(np.float32), v.astype(np.float32)

    for name, value in params.items():
        if isinstance(value, dict):
            pairs = {k: moments(w) for k, w in value.items()}
            mu[name] = {k: m for k, (m, _) in pairs.items()}
            nu[name] = {k: v for k, (_, v) in pairs.items()}
        else:
            mu[name], nu[name] = moments(value)
    return {"params": params, "opt_state": {"mu": mu, "nu": nu}}


def make_tree(mb: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = 512
    per_layer = 12 * d * d * 4
    layers = max(1, int(mb * 2**20 // per_layer))
    tree = {"embed": (0.02 * rng.standard_normal((8 * d, d))).astype(np.float32)}
    for i in range(layers):
        layer = {}
        for name, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)),
                            ("up", (d, 4 * d)), ("down", (4 * d, d))):
            w = rng.standard_normal(shape) * np.exp(0.5 * rng.standard_normal(shape[-1]))
            w[:, rng.choice(shape[-1], 2, replace=False)] *= 20   # outlier features
            layer[name] = (w / np.sqrt(shape[0])).astype(np.float32)
        layer["norm1"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        layer["norm2"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        tree[f"layer{i}"] = layer
    return tree


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_heap() -> None:
    """Returns the heap pages the tree's construction freed to the OS (glibc),
    so that no mode starts with free heap to grow into unseen."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):   # not glibc: nothing to release
        pass


def _reset_peak_rss() -> bool:
    """Starts the peak RSS (VmHWM) afresh from the current RSS (Linux 4.0+),
    so that the tree's construction is not part of the save's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    """The peak RSS since :func:`_reset_peak_rss` (else since the start)."""
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


class _LiveHeapPeak:
    """The most bytes malloc'd at once (glibc's mallinfo2: heap chunks in use
    plus mmapped ones), read every millisecond on a thread of its own."""

    def __init__(self):
        try:
            self._info = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
        except (OSError, AttributeError, TypeError):
            raise SystemExit("--live reads glibc's mallinfo2 (glibc 2.33 or later), "
                             "which this C library lacks") from None
        self._info.restype = _Mallinfo2
        self.start, self.peak, self._stop = self._live(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _live(self) -> int:
        info = self._info()
        return info.uordblks + info.hblkhd

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._live() - self.start)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._live() - self.start)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _leaves(tree) -> list:
    return [leaf for value in tree.values()
            for leaf in (_leaves(value) if isinstance(value, dict) else [value])]


def child(mode: str, mb: float, path: str, state: bool, live: bool) -> None:
    import jaxjpeg
    import jaxjpeg.checkpoint  # noqa: F401  (imports jax: not part of any save's time)

    tree = make_state(mb) if state else make_tree(mb)
    leaves = _leaves(tree)
    _release_freed_heap()
    before = _rss_bytes()
    reset = _reset_peak_rss()
    heap = _LiveHeapPeak() if live else None
    cpu = _cpu_seconds()
    start = time.perf_counter()
    report = jaxjpeg.save(path, tree, **{**MODES, **GENEROUS}[mode])
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    peak = _peak_rss_bytes(reset)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_growth": max(0, peak - before),
                      "live_peak": heap.stop() if heap is not None else None,
                      "largest_leaf": max(v.nbytes for v in leaves),
                      "tree_bytes": sum(v.nbytes for v in leaves),
                      "ratio": report.ratio_vs_float32, "bits": report.bits_per_weight}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256)
    parser.add_argument("--quick", action="store_true", help="a ~32 MB tree")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every mode, interleaved (a shared machine's load varies); "
                             "each mode's least wall and CPU time are reported")
    parser.add_argument("--state", action="store_true",
                        help="a training state: the parameters beside Adam's moments")
    parser.add_argument("--generous", action="store_true", help="target_ratio=3 and 2 too")
    parser.add_argument("--live", action="store_true",
                        help="also the peak of live heap (glibc mallinfo2, read every ms)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MB", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), args.child[2], args.state, args.live)
        return
    mb = 32 if args.quick else args.mb
    modes = {**MODES, **(GENEROUS if args.generous else {})}
    print(f"tree: ~{mb:.0f} MB float32{' training state' if args.state else ''}; "
          f"{os.cpu_count()} CPUs; each mode in a fresh process; "
          f"load average {os.getloadavg()[0]:.2f}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(mb),
                                      os.path.join(tmp, "c.jjpg")]
                                     + (["--state"] if args.state else [])
                                     + (["--live"] if args.live else []),
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if mode in results:
                    r["seconds"] = min(r["seconds"], results[mode]["seconds"])
                    r["cpu"] = min(r["cpu"], results[mode]["cpu"])
                results[mode] = r
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    base = results["default"]
    leaf = base["largest_leaf"]
    print(f"tree {base['tree_bytes'] / 2**20:.1f} MiB, largest leaf {leaf / 2**20:.1f} MiB")
    print(f"{'mode':<20}{'wall s':>8}{'x def':>7}{'CPU s':>8}{'x def':>7}{'peak MiB':>10}"
          f"{'excess/leaf':>13}{'ratio':>8}{'bits/w':>8}{'miss':>8}"
          + (f"{'live MiB':>10}{'excess/leaf':>13}" if args.live else ""))
    for mode, r in results.items():
        excess = (r["peak_growth"] - base["peak_growth"]) / leaf
        target = modes[mode]
        miss = ""
        if "target_ratio" in target:
            miss = f"{r['ratio'] / target['target_ratio'] - 1:+.1%}"
        elif "bits_per_weight" in target:
            miss = f"{r['bits'] / target['bits_per_weight'] - 1:+.1%}"
        print(f"{mode:<20}{r['seconds']:>8.2f}{r['seconds'] / base['seconds']:>7.2f}"
              f"{r['cpu']:>8.2f}{r['cpu'] / base['cpu']:>7.2f}{r['peak_growth'] / 2**20:>10.1f}"
              f"{excess:>13.2f}{r['ratio']:>8.2f}{r['bits']:>8.3f}{miss:>8}"
              + (f"{r['live_peak'] / 2**20:>10.1f}"
                 f"{(r['live_peak'] - base['live_peak']) / leaf:>13.2f}" if args.live else ""))


if __name__ == "__main__":
    main()
