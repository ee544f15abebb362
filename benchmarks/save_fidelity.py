"""Size and error of a default ``jaxjpeg.save``, to check that a change to the
save path (speed work) leaves its output where it was.

    python benchmarks/save_fidelity.py                 # the jaxjpeg on the path
    python benchmarks/save_fidelity.py --quick

Two trees: the Gaussian transformer of benchmarks/save_speed.py, and a
real-model-like one (Laplacian and Student-t weights, per-output-channel
scales spread over 8x, far outliers, convolutions in Flax and PyTorch
layouts, a depthwise kernel, a bfloat16 leaf, biases and norms). Prints the
file's bytes and, over the coded leaves, the relative RMS error of the whole
tree (sqrt(sum of squared errors / sum of squares)) and the mean of the
leaves' relative errors. Compare two versions' figures: the numbers are
deterministic for a given jaxjpeg.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import ml_dtypes
import numpy as np

from checkpoint_vs_orbax import transformer_params


def real_model_like(seed: int = 0, scale: int = 1) -> dict:
    """Heavy tails, channel scales, outliers and framework layouts."""
    rng = np.random.default_rng(seed)

    def channel_scaled(shape, out_axis, tails="laplace"):
        base = (rng.laplace(size=shape) if tails == "laplace"
                else rng.standard_t(4, size=shape))
        spread = np.exp(rng.normal(0, 0.7, shape[out_axis]))
        shape_b = [1] * len(shape)
        shape_b[out_axis] = shape[out_axis]
        return (0.02 * base * spread.reshape(shape_b)).astype(np.float32)

    dense = channel_scaled((768 * scale, 3072), 1, "t")
    far = rng.choice(dense.size, size=dense.size // 20000, replace=False)
    dense.reshape(-1)[far] *= 25
    return {
        "conv_flax": {"kernel": channel_scaled((3, 3, 64, 128), 3),
                      "bias": rng.normal(0, 0.01, 128).astype(np.float32)},
        "conv_torch": {"weight": channel_scaled((128, 64, 3, 3), 0)},
        "depthwise": {"kernel": channel_scaled((5, 5, 1, 512), 3)},
        "mlp": {"kernel": dense, "bias": np.zeros(3072, np.float32)},
        "mlp_out": {"kernel": channel_scaled((3072, 768 * scale), 1)},
        "attn_bf16": {"kernel": channel_scaled((768, 768), 1).astype(ml_dtypes.bfloat16)},
        "embed": {"embedding": (0.02 * rng.standard_normal((8000 * scale, 256)))
                  .astype(np.float32)},
        "norm": {"scale": (1 + 0.1 * rng.standard_normal(768)).astype(np.float32)},
    }


def measure(name: str, tree: dict) -> None:
    import jax
    import jaxjpeg

    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "t.jjpg")
        report = jaxjpeg.save(path, tree)
        restored = jaxjpeg.restore(path)
        size = os.path.getsize(path)
    originals = dict(jax.tree_util.tree_leaves_with_path(tree))
    decoded = dict(jax.tree_util.tree_leaves_with_path(restored))
    coded = {leaf.path for leaf in report.leaves if leaf.kind == "jpeg"}
    err2 = norm2 = 0.0
    relative = []
    for key, x in originals.items():
        if jax.tree_util.keystr(key, simple=True, separator="/") not in coded:
            continue
        x = np.asarray(x, np.float64)
        e2 = float(np.sum((np.asarray(decoded[key], np.float64) - x) ** 2))
        n2 = float(np.sum(x * x))
        err2, norm2 = err2 + e2, norm2 + n2
        relative.append(math.sqrt(e2 / n2))
    weights = sum(np.size(x) for x in originals.values())
    print(f"{name:16s} file {size:,} bytes ({8 * size / weights:.4f} bits/weight), "
          f"{len(coded)} coded leaves: tree relative RMS error {math.sqrt(err2 / norm2):.5f}, "
          f"mean leaf relative error {np.mean(relative):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shape = (dict(d_model=384, layers=2, vocab=4096) if args.quick
             else dict(d_model=768, layers=4, vocab=32000))
    measure("gaussian", transformer_params(**shape))
    measure("real-model-like", real_model_like(scale=1 if args.quick else 2))


if __name__ == "__main__":
    main()
