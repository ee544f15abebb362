"""Save throughput and peak memory: jaxjpeg.save vs Orbax's StandardCheckpointer.

    python benchmarks/save_speed.py            # ~211 MB float32 transformer-like tree
    python benchmarks/save_speed.py --quick    # ~20 MB

Both save the same tree of jax arrays (on the default device, CPU here) into
the same directory, alternately, ``--repeats`` times each; the figures are
the best of those runs:

- MB/s: bytes of the tree's arrays / wall time of the save (jaxjpeg: the
  default rate; Orbax: until ``wait_until_finished`` returns, so both
  include writing every byte; jaxjpeg also fsyncs its file);
- CPU seconds: the process's user + system time during the save (every
  thread, Orbax's TensorStore threads included): on a machine shared with
  other work, MB per CPU-second is the steadier figure, and wall time on an
  idle machine with C cores is about CPU seconds / C for a save that keeps
  all cores busy;
- peak memory: RSS sampled every 0.5 ms during one more save of each, minus
  the RSS just before it (the tree itself is already resident and not
  counted). The sampling thread (a /proc read every 0.5 ms, holding the GIL
  each time) runs only then: in the timed saves it took CPU time of its own
  and slowed the savers' Python threads.

The ratio jaxjpeg / Orbax > 1 means jaxjpeg saved faster. On a machine
shared with other work the figures move from run to run: the script prints
every run, and the CPU count it saw. Tests never depend on these numbers.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

from checkpoint_vs_orbax import _PeakRss, _leaves, _rss_bytes, transformer_params


def _timed(save) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one save."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    save()
    return time.perf_counter() - t0, time.process_time() - c0


def _peak_memory(save) -> int:
    """Peak RSS above the start during one save."""
    gc.collect()
    before = _rss_bytes()
    with _PeakRss() as sampler:
        save()
    return sampler.peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~20 MB of parameters")
    parser.add_argument("--repeats", type=int, default=3, help="saves of each (best of N)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    import jax
    import orbax.checkpoint as ocp
    import jaxjpeg
    from jaxjpeg.checkpoint import save_workers

    shape = (dict(d_model=384, layers=2, vocab=4096) if args.quick
             else dict(d_model=768, layers=4, vocab=32000))
    params = jax.tree.map(jax.numpy.asarray, transformer_params(**shape))
    jax.block_until_ready(params)
    raw = sum(x.nbytes for x in _leaves(params))
    print(f"tree: {len(_leaves(params))} leaves, {raw / 1e6:.1f} MB float32 {shape}")
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, jaxjpeg coding threads "
          f"{save_workers()}, load average {os.getloadavg()[0]:.2f} at start")

    root = args.dir or tempfile.mkdtemp(prefix="jj_save_")
    jj_path, ob_path = os.path.join(root, "params.jjpg"), os.path.join(root, "orbax")

    def save_jaxjpeg():
        jaxjpeg.save(jj_path, params)

    def save_orbax():
        if os.path.exists(ob_path):
            shutil.rmtree(ob_path)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(ob_path, params)
            ckptr.wait_until_finished()

    savers = (("jaxjpeg", save_jaxjpeg), ("orbax", save_orbax))
    runs = {"jaxjpeg": [], "orbax": []}
    try:
        for i in range(args.repeats):
            for name, save in savers:
                seconds, cpu = _timed(save)
                runs[name].append((seconds, cpu))
                print(f"  run {i + 1} {name:8s} {seconds:6.2f} s  {raw / 1e6 / seconds:7.1f} MB/s"
                      f"  CPU {cpu:6.2f} s  (load {os.getloadavg()[0]:.1f})")
        peak = {name: _peak_memory(save) for name, save in savers}
        size = os.path.getsize(jj_path)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    best = {name: min(s for s, _ in r) for name, r in runs.items()}
    cpu = {name: min(c for _, c in r) for name, r in runs.items()}
    for name in runs:
        print(f"{name:8s} best {raw / 1e6 / best[name]:7.1f} MB/s ({best[name]:.2f} s), "
              f"{raw / 1e6 / cpu[name]:7.1f} MB per CPU-second, "
              f"peak memory +{peak[name] / 2**20:.1f} MiB")
    print(f"jaxjpeg file {size / 1e6:.1f} MB ({raw / size:.2f}x smaller than the tree)")
    print(f"save speed ratio jaxjpeg / orbax: {best['orbax'] / best['jaxjpeg']:.2f} "
          f"(>= 1: jaxjpeg at least as fast); per CPU-second: "
          f"{cpu['orbax'] / cpu['jaxjpeg']:.2f}")


if __name__ == "__main__":
    main()
