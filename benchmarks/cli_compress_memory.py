"""Peak memory of ``jaxjpeg compress`` against the size of its source.

    python benchmarks/cli_compress_memory.py            # ~211 MB float32 tree
    python benchmarks/cli_compress_memory.py --quick    # ~20 MB

The same transformer-like tree is written as one safetensors file, as
sharded safetensors (an index and 50 MB shards) and as an Orbax
``StandardCheckpointer`` directory; each is compressed by the command line
from its local path, then from its URL on a local HTTP server with Range
support (tests/range_server.py, which counts the bytes it serves), in a
fresh child process, whose /proc status is read every 20 ms until it
exits. Printed, above a child that only imports what the conversion imports
and starts the CPU backend: the peak resident set (VmHWM; it counts the
source's pages that safetensors maps and reads, which the kernel may drop at
any time) and the largest anonymous resident set seen (RssAnon: the memory
the conversion itself allocated). Reading a whole source at once takes at
least the source's size; tensor by tensor, about the largest tensor plus the
coding window (``jaxjpeg.checkpoint.SAVE_WINDOW_BYTES``) and its temporaries.
Tests never depend on these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from checkpoint_vs_orbax import _leaves, transformer_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from range_server import RangeServer  # noqa: E402

# What a conversion imports and starts before it reads anything (Orbax only for
# Orbax sources, fsspec's HTTP client and tensorstore for URLs).
BASELINE = ("import jax, jaxjpeg, jaxjpeg.cli, jaxjpeg.checkpoint, safetensors{}; "
            "jax.numpy.zeros(1).block_until_ready()")


def _peak_rss(argv: list[str]) -> tuple[int, int]:
    """(VmHWM, largest RssAnon seen) in bytes of a child running ``argv``,
    polled until it exits. RssAnon leaves out file pages a reader maps
    (safe_open maps the source: touched pages count in VmHWM while mapped,
    though the kernel may drop them at any time)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    peak = anon = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
                    elif line.startswith("RssAnon:"):
                        anon = max(anon, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return peak, anon


def _write_sources(params: dict, root: str) -> dict[str, str]:
    import orbax.checkpoint as ocp
    import safetensors.numpy
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)
    walk(params, "")
    one = os.path.join(root, "model.safetensors")
    safetensors.numpy.save_file(flat, one, metadata={"format": "pt"})
    sharded = os.path.join(root, "sharded")
    os.makedirs(sharded)
    shards, size, weight_map = [{}], 0, {}
    for name, value in flat.items():
        if shards[-1] and size + value.nbytes > 50e6:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, os.path.join(sharded, file))
        weight_map.update({name: file for name in shard})
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    orbax_dir = os.path.join(root, "orbax")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(orbax_dir, params)
    return {"safetensors": one, "sharded safetensors": sharded, "orbax": orbax_dir}


def _measure(kind: str, src: str, root: str, raw: int) -> None:
    base, base_anon = _peak_rss([sys.executable, "-c", BASELINE.format(
        (", orbax.checkpoint" if kind.startswith("orbax") else "")
        + (", fsspec, aiohttp, tensorstore" if kind.endswith("HTTP") else ""))])
    dst = os.path.join(root, f"{kind.replace(' ', '_')}.jjpg")
    t0 = time.perf_counter()
    peak, anon = _peak_rss([sys.executable, "-m", "jaxjpeg.cli", "compress", src, dst])
    seconds = time.perf_counter() - t0
    print(f"  {kind:30s} peak +{(peak - base) / 2**20:6.1f} MiB "
          f"({(peak - base) / raw:.2f}x the source), anonymous "
          f"+{(anon - base_anon) / 2**20:6.1f} MiB ({(anon - base_anon) / raw:.2f}x), "
          f"{seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~20 MB of parameters")
    args = parser.parse_args()
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    from jaxjpeg import checkpoint

    shape = (dict(d_model=384, layers=2, vocab=4096) if args.quick
             else dict(d_model=768, layers=4, vocab=32000))
    params = transformer_params(**shape)
    raw = sum(x.nbytes for x in _leaves(params))
    largest = max(x.nbytes for x in _leaves(params))
    root = tempfile.mkdtemp(prefix="jj_cli_mem_")
    try:
        sources = _write_sources(params, root)
        del params
        print(f"source {raw / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB, coding window "
              f"{checkpoint.SAVE_WINDOW_BYTES / 2**20:.0f} MiB")
        with RangeServer(root) as server:
            for kind, src in sources.items():
                url = server.url(os.path.relpath(src, root) + (
                    "/model.safetensors.index.json" if kind == "sharded safetensors" else ""))
                for where, location in (("", src), (" over HTTP", url)):
                    server.reset()
                    _measure(kind + where, location, root, raw)
                    if where:
                        print(f"  {'':20s} served {server.bytes_served / 1e6:.1f} MB in "
                              f"{len(server.ranges)} ranged reads")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
