"""A distributed save whose other process exited before saving: process 1
joins jax.distributed and exits; process 0 saves with a short wait and
prints what the save raised (then exits at once: jax's own shutdown would
wait for the process that left)."""

import os
import sys

workdir, index, count, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

import jax  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=index)
import numpy as np  # noqa: E402

import jaxjpeg  # noqa: E402
from jaxjpeg import distributed_save  # noqa: E402

jax.devices()
if index == 1:
    os._exit(0)
distributed_save.TIMEOUT_S = 3.0
tree = {"w": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}
try:
    jaxjpeg.save(os.path.join(workdir, "d.jjpg"), tree, distributed=True)
    print("saved", flush=True)
except Exception as e:
    print(f"{type(e).__name__}: {e}", flush=True)
os._exit(0)
