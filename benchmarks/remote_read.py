"""Time-to-params from throttled storage: jaxjpeg vs Orbax, measured in one run.

    python benchmarks/remote_read.py              # ~300 MB float32 tree
    python benchmarks/remote_read.py --quick      # ~40 MB

Both formats read their files from the same throttled store: an LD_PRELOAD
library (compiled here with cc) that makes every read of a file under the
benchmark's directory wait its turn on one link of the given bandwidth
(0.5 and 2 GB/s), shared by all threads, as a network link or a disk would.
It wraps open/read/pread/preadv in libc, which both Python (jaxjpeg's
reader) and TensorStore (Orbax's) call; the bytes it throttled are printed,
so a reader that bypassed it would show.

For each format and bandwidth, in a fresh child process (page cache warm):

- first: the process's first restore, throttled (jaxjpeg's includes compiling
  its decode programs), and its peak host memory: sampled RSS minus RSS before;
  on CPU the restored arrays live in host memory too, so "extra" = peak -
  restored bytes, what the restore needed beyond its result;
- time-to-params: later restores, throttled, until block_until_ready (median
  of --repeats);

For jaxjpeg it also prints the read alone (every blob through the throttle,
nothing decoded) and the unthrottled restore (decode alone), so the pipeline
shows as time-to-params close to max(read, decode) rather than their sum.
Tests never depend on these numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint_vs_orbax import _PeakRss, _dir_bytes, _rss_bytes, transformer_params  # noqa: E402

BANDWIDTHS_GBPS = (0.5, 2.0)

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536
static char tracked[MAX_FD];
static const char *prefix;
static size_t prefix_len;
static double rate;  /* bytes per second; 0: unthrottled */
static double next_free;
static unsigned long long throttled_bytes;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
__attribute__((constructor)) static void init(void) {
  prefix = getenv("THROTTLE_DIR");
  prefix_len = prefix ? strlen(prefix) : 0;
  const char *r = getenv("THROTTLE_BPS");
  rate = r ? atof(r) : 0;
}
void throttle_set_rate(double bps) { pthread_mutex_lock(&mu); rate = bps; pthread_mutex_unlock(&mu); }
unsigned long long throttle_bytes(void) { return throttled_bytes; }

/* One link: each read takes n / rate seconds of it, in arrival order. */
static void throttle(int fd, ssize_t n) {
  if (n <= 0 || fd < 0 || fd >= MAX_FD || !tracked[fd]) return;
  pthread_mutex_lock(&mu);
  throttled_bytes += n;
  double until = 0;
  if (rate > 0) {
    double t = now(), start = next_free > t ? next_free : t;
    next_free = start + n / rate;
    until = next_free;
  }
  pthread_mutex_unlock(&mu);
  if (until > 0) {
    double wait = until - now();
    if (wait > 0) {
      struct timespec s = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
      nanosleep(&s, NULL);
    }
  }
}
static void track(int fd, const char *path) {
  if (fd >= 0 && fd < MAX_FD)
    tracked[fd] = prefix && path && strncmp(path, prefix, prefix_len) == 0;
}
#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)
#define OPEN_WRAPPER(name)                                        \
  int name(const char *path, int flags, ...) {                    \
    REAL(name); mode_t mode = 0;                                  \
    if (flags & (O_CREAT | O_TMPFILE)) {                          \
      va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); } \
    int fd = real(path, flags, mode); track(fd, path); return fd; }
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)
#define OPENAT_WRAPPER(name)                                      \
  int name(int dir, const char *path, int flags, ...) {           \
    REAL(name); mode_t mode = 0;                                  \
    if (flags & (O_CREAT | O_TMPFILE)) {                          \
      va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); } \
    int fd = real(dir, path, flags, mode);                        \
    track(fd, path[0] == '/' ? path : NULL); return fd; }
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)
int close(int fd) { REAL(close); if (fd >= 0 && fd < MAX_FD) tracked[fd] = 0; return real(fd); }
ssize_t read(int fd, void *b, size_t n) { REAL(read); ssize_t r = real(fd, b, n); throttle(fd, r); return r; }
ssize_t pread(int fd, void *b, size_t n, off_t o) { REAL(pread); ssize_t r = real(fd, b, n, o); throttle(fd, r); return r; }
ssize_t pread64(int fd, void *b, size_t n, off_t o) { REAL(pread64); ssize_t r = real(fd, b, n, o); throttle(fd, r); return r; }
ssize_t readv(int fd, const struct iovec *v, int c) { REAL(readv); ssize_t r = real(fd, v, c); throttle(fd, r); return r; }
ssize_t preadv(int fd, const struct iovec *v, int c, off_t o) { REAL(preadv); ssize_t r = real(fd, v, c, o); throttle(fd, r); return r; }
ssize_t preadv64(int fd, const struct iovec *v, int c, off_t o) { REAL(preadv64); ssize_t r = real(fd, v, c, o); throttle(fd, r); return r; }
ssize_t preadv2(int fd, const struct iovec *v, int c, off_t o, int f) { REAL(preadv2); ssize_t r = real(fd, v, c, o, f); throttle(fd, r); return r; }
ssize_t preadv64v2(int fd, const struct iovec *v, int c, off_t o, int f) { REAL(preadv64v2); ssize_t r = real(fd, v, c, o, f); throttle(fd, r); return r; }
"""


def build_shim(directory: str) -> str:
    source = os.path.join(directory, "throttle.c")
    library = os.path.join(directory, "libthrottle.so")
    with open(source, "w") as f:
        f.write(_SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", source, "-o", library, "-ldl", "-lpthread"],
                   check=True)
    return library


# ---------------------------------------------------------------- child


def child(kind: str, path: str, bps: float, repeats: int) -> dict:
    import jax

    shim = ctypes.CDLL(os.environ["LD_PRELOAD"])
    shim.throttle_set_rate.argtypes = [ctypes.c_double]
    shim.throttle_bytes.restype = ctypes.c_ulonglong
    if kind == "jaxjpeg":
        import jaxjpeg

        def restore():
            return jaxjpeg.restore(path)
    else:
        import orbax.checkpoint as ocp
        ckptr = ocp.StandardCheckpointer()
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        meta = ckptr.metadata(path)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None) or meta
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                               sharding=device), tree)

        def restore():
            return ckptr.restore(path, abstract)

    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # start the backend before measuring
    shim.throttle_set_rate(bps)
    gc.collect()
    before = shim.throttle_bytes()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    with _PeakRss() as sampler:  # the first restore of this process (jaxjpeg: with compiling)
        tree = jax.block_until_ready(restore())
    result = {"first_s": time.perf_counter() - t0,
              "throttled_bytes": shim.throttle_bytes() - before,
              "peak_delta": sampler.peak - rss_before,
              "output_bytes": sum(x.nbytes for x in jax.tree.leaves(tree))}
    del tree
    shim.throttle_set_rate(0.0)
    result["decode_only_s"] = _median_time(restore, repeats)  # no throttle: from memory
    if kind == "jaxjpeg":
        result["read_only_s"] = float(np.median([_read_only(path, shim, bps)
                                                 for _ in range(repeats)]))
    shim.throttle_set_rate(bps)
    result["time_s"] = _median_time(restore, repeats)
    return result


def _median_time(fn, repeats: int) -> float:
    import jax
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _read_only(path: str, shim, bps: float) -> float:
    """Every blob read through the throttle as restore reads them, nothing decoded."""
    from jaxjpeg import checkpoint_restore, format as fmt
    shim.throttle_set_rate(bps)
    t0 = time.perf_counter()
    with fmt.ContainerReader(path) as reader:
        names, window, size = [], [], 0
        for name in reader.blob_names:
            window.append(name)
            size += reader.blob_info(name).length
            if size >= checkpoint_restore.WINDOW_BYTES:
                names.append(window)
                window, size = [], 0
        for group in names + [window]:
            with reader.prefetch(group):
                pass
    return time.perf_counter() - t0


def _run_child(library: str, directory: str, kind: str, path: str, bps: float,
               repeats: int) -> dict:
    env = dict(os.environ, LD_PRELOAD=library, THROTTLE_DIR=directory, THROTTLE_BPS="0",
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind,
                           "--path", path, "--bps", str(bps), "--repeats", str(repeats)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~40 MB of parameters")
    parser.add_argument("--gbps", type=float, nargs="+", default=list(BANDWIDTHS_GBPS),
                        help="link bandwidths in GB/s (default: 0.5 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed restores per figure (the median is printed)")
    parser.add_argument("--child", choices=("jaxjpeg", "orbax"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--bps", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.bps, args.repeats)))
        return

    import jax
    import jaxjpeg
    import orbax.checkpoint as ocp

    d_model, layers, vocab = (512, 4, 8192) if args.quick else (1024, 6, 32768)
    params = transformer_params(d_model, layers, vocab)
    raw = sum(x.nbytes for x in jax.tree.leaves(params))
    work = tempfile.mkdtemp(prefix="jj-remote-")
    try:
        library = build_shim(work)
        store = os.path.join(work, "store")
        os.makedirs(store)
        jj_path = os.path.join(store, "params.jjpg")
        orbax_path = os.path.join(store, "orbax")
        jaxjpeg.save(jj_path, params, progress=False)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(orbax_path, params)
        sizes = {"jaxjpeg": os.path.getsize(jj_path), "orbax": _dir_bytes(orbax_path)}
        print(f"tree: {raw / 1e6:.1f} MB float32 ({len(jax.tree.leaves(params))} leaves); "
              f"jaxjpeg file {sizes['jaxjpeg'] / 1e6:.1f} MB, Orbax {sizes['orbax'] / 1e6:.1f} MB; "
              f"jax backend: {os.environ.get('JAX_PLATFORMS', 'cpu')}")
        print(f"{'GB/s':>5} {'format':>8} {'time-to-params':>15} {'first':>8} {'throttled':>10} "
              f"{'read only':>10} {'decode only':>12} {'peak RSS':>10} {'extra':>9}")
        for gbps in args.gbps:
            times = {}
            for kind, path in (("jaxjpeg", jj_path), ("orbax", orbax_path)):
                r = _run_child(library, store, kind, path, gbps * 1e9, args.repeats)
                times[kind] = r["time_s"]
                read_only = f"{r['read_only_s']:.3f} s" if "read_only_s" in r else "-"
                print(f"{gbps:>5} {kind:>8} {r['time_s']:>13.3f} s {r['first_s']:>6.2f} s "
                      f"{r['throttled_bytes'] / 1e6:>7.1f} MB {read_only:>10} "
                      f"{r['decode_only_s']:>10.3f} s {r['peak_delta'] / 1e6:>7.1f} MB "
                      f"{(r['peak_delta'] - r['output_bytes']) / 1e6:>6.1f} MB")
                if kind == "jaxjpeg":
                    read, decode = r["read_only_s"], r["decode_only_s"]
                    print(f"      jaxjpeg pipeline: read + decode = {read + decode:.3f} s, "
                          f"max(read, decode) = {max(read, decode):.3f} s, "
                          f"measured {r['time_s']:.3f} s")
            print(f"      Orbax / jaxjpeg time-to-params at {gbps} GB/s: "
                  f"{times['orbax'] / times['jaxjpeg']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
