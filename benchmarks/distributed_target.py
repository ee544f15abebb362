"""A byte target saved by several processes against one: size miss and KL.

    python benchmarks/distributed_target.py --models lite0,lite1,lite2 [--processes 2]

Each EfficientNet-lite state dict (PyTorch layout, numpy leaves every
process holds) is saved with ``distributed=True`` and ``target_ratio`` by
``--processes`` processes joined by ``jax.distributed`` over loopback (each
with 2 host CPU devices), then by this process alone; both files are
restored and run on the benchmark's 96 crops against float32. Prints the
miss against the target and KL / top-1 of each. Needs the packages of
``benchmarks/real_models.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def child(work: str, process: int, processes: int, port: int, model: str, ratio: float) -> None:
    """One process of the distributed save (run by :func:`main`)."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               coordinator_bind_address=f"127.0.0.1:{port}",
                               num_processes=processes, process_id=process,
                               initialization_timeout=60)
    import jaxjpeg
    from real_models_lib import effnet
    case = effnet.EffNetCase(model, n_eval=8, n_calib=8, engine="ort", log=lambda *a: None)
    report = jaxjpeg.save(os.path.join(work, "distributed.jjpg"), dict(case.native),
                          distributed=True, target_ratio=ratio, progress=False)
    print(json.dumps({"process": process, "bytes": report.file_bytes}))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(case, ref, path: str, target: float) -> str:
    import numpy as np

    import jaxjpeg
    restored = jaxjpeg.restore(path)
    metrics = case.metrics(ref, case.run({k: np.asarray(restored[k], np.float32)
                                          for k in case.native}))
    miss = os.path.getsize(path) / target - 1
    return f"miss {100 * miss:+.2f}%  KL {metrics['kl']:.4f}  top-1 {metrics['top1']:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lite0,lite1,lite2")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        work, process, processes, port, model, ratio = args.child
        child(work, int(process), int(processes), int(port), model, float(ratio))
        return 0
    from real_models_lib import common, effnet
    missing = common.missing_modules(["numpy", "jax"] + effnet.required_modules("lite1"))
    if missing:
        print(common.MissingDependencies(missing), file=sys.stderr)
        return 2
    import jaxjpeg
    print(f"target_ratio={args.ratio:g}, {args.processes} processes against one, probe seed 0")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as work:
            port = _free_port()
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            procs = [subprocess.Popen([sys.executable, __file__, "--child", work, str(i),
                                       str(args.processes), str(port), model, str(args.ratio)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for i in range(args.processes)]
            outputs = [proc.communicate(timeout=1800) for proc in procs]
            if any(proc.returncode for proc in procs):
                print(next(err for proc, (_, err) in zip(procs, outputs) if proc.returncode),
                      file=sys.stderr)
                return 1
            case = effnet.EffNetCase(model, n_eval=96, n_calib=8, engine="ort",
                                     log=lambda *a: None)
            ref = case.reference()
            target = 4 * sum(v.size for v in case.native.values()) / args.ratio
            one = os.path.join(work, "one.jjpg")
            jaxjpeg.save(one, dict(case.native), target_ratio=args.ratio, progress=False)
            print(f"{model:6s} one process:  {_evaluate(case, ref, one, target)}")
            print(f"{model:6s} distributed:  "
                  f"{_evaluate(case, ref, os.path.join(work, 'distributed.jjpg'), target)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
