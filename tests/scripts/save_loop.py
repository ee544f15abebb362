"""Saves a large tree to one path over and over (tests/test_checkpoint_corruption.py
kills it with SIGKILL in the middle of a save).

    python tests/scripts/save_loop.py PATH

Before save n it prints "begin n", after it "saved n". Save n stores leaf
"step" = n, so a reader can tell which save a file came from.
"""

import sys

import numpy as np

import jaxjpeg

path = sys.argv[1]
rng = np.random.default_rng(0)
tree = {f"layer{i}": {"kernel": rng.normal(size=(1024, 1024)).astype(np.float32),
                      "bias": rng.normal(size=(1024,)).astype(np.float32)}
        for i in range(6)}
tree["embedding"] = rng.normal(size=(4096, 2048)).astype(np.float32)  # 32 MiB, kept lossless
policy = jaxjpeg.Policy(lossless=("embedding",))
n = 0
while True:
    tree["step"] = np.int64(n)
    print(f"begin {n}", flush=True)
    jaxjpeg.save(path, tree, policy=policy)
    print(f"saved {n}", flush=True)
    n += 1
