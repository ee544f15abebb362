"""A training state saved whole: how far Adam's next update and the resumed
training move, at what size, against the same state with its moments coded
as weights (JPEG, as before jaxjpeg.magnitudes) and against float32.

    python benchmarks/optimizer_state.py [--steps 300] [--resume 100]

A three-layer MLP on scikit-learn's digits (inputs rescaled per pixel over
two decades, so gradients and Adam's moments span decades) trained with
Adam; its {"params", "opt_state"} saved with the default rate, at
target_ratio 4 and 8, and with the moments forced through JPEG (a Policy
whose second-moment test is switched off: the coding every leaf got before).
Figures per save: file ratio vs float32, bits a moment value, Adam's next
update from the restored state vs from the exact one (relative norm of the
difference, exact weights), the share of the second moments' positive
values restored as 0, and the test loss after ``--resume`` more steps from
the restored state vs from the exact state (both from the restored
weights, which the weights' coding moves alike).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxjpeg
from jaxjpeg import magnitudes


def _data(seed=0):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    x = (x / 16.0) * np.exp(rng.uniform(-2.3, 2.3, x.shape[1]))   # two decades per pixel
    order = rng.permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _model(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 256), (256, 256), (256, 10)]
    return {f"l{i}": {"w": jnp.asarray(rng.normal(0, 1 / np.sqrt(a), (a, b)), jnp.float32),
                      "b": jnp.zeros(b, jnp.float32)} for i, (a, b) in enumerate(sizes)}


def _loss(params, x, y):
    h = x
    for i in range(3):
        h = h @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
        if i < 2:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


@contextlib.contextmanager
def _moments_as_weights():
    """The second-moment test switched off: every leaf JPEG-coded as before."""
    saved = magnitudes.is_second_moment
    magnitudes.is_second_moment = lambda array: False
    try:
        yield
    finally:
        magnitudes.is_second_moment = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--resume", type=int, default=100)
    args = p.parse_args()
    (xt, yt), (xv, yv) = _data()
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, state, i):
        lo = (i * 128) % (len(xt) - 128)
        batch = jax.lax.dynamic_slice_in_dim(xt, lo, 128), jax.lax.dynamic_slice_in_dim(yt, lo, 128)
        grads = jax.grad(_loss)(params, *batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = _model(), opt.init(_model())
    for i in range(args.steps):
        params, state = step(params, state, i)
    tree = {"params": params, "opt_state": state}
    n_moments = sum(np.size(x) for x in jax.tree.leaves(state)) - 1
    raw32 = 4 * sum(np.size(x) for x in jax.tree.leaves(tree))
    probe = jax.tree.map(lambda p_: jnp.asarray(np.random.default_rng(1).normal(
        0, 1e-2, p_.shape), jnp.float32), params)
    exact_update = opt.update(probe, state, params)[0]

    def resumed(p_, s_):
        for i in range(args.resume):
            p_, s_ = step(p_, s_, args.steps + i)
        return float(_loss(p_, xv, yv))

    print(f"MLP 64-256-256-10 on digits, Adam, {args.steps} steps; state {raw32 / 1e6:.2f} MB "
          f"float32 ({n_moments} moment values); test loss {_loss(params, xv, yv):.4f}")
    print(f"{'save':28s} {'ratio':>6s} {'moment b/v':>10s} {'update err':>10s} "
          f"{'nu -> 0':>8s} {'resumed loss':>12s} {'vs exact':>8s} {'save s':>6s}")
    settings = [("default", {}, False), ("default, moments as weights", {}, True),
                ("target_ratio=4", {"target_ratio": 4}, False),
                ("target_ratio=4, as weights", {"target_ratio": 4}, True),
                ("target_ratio=6", {"target_ratio": 6}, False),
                ("target_ratio=6, as weights", {"target_ratio": 6}, True),
                ("target_ratio=8", {"target_ratio": 8}, False),
                ("target_ratio=8, as weights", {"target_ratio": 8}, True)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.jjpg"
        for label, options, as_weights in settings:
            with _moments_as_weights() if as_weights else contextlib.nullcontext():
                t = time.perf_counter()
                try:
                    report = jaxjpeg.save(path, tree, progress=False, **options)
                except ValueError as e:   # a target the moments cannot fit
                    print(f"{label:28s} refused: {str(e)[:100]}")
                    continue
                seconds = time.perf_counter() - t
            got = jaxjpeg.restore(path, target=tree)
            moment_bytes = sum(leaf.stored_bytes for leaf in report.leaves
                               if leaf.path.startswith("opt_state/0/") and "count" not in leaf.path)
            update = opt.update(probe, got["opt_state"], params)[0]
            diff = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in
                                zip(jax.tree.leaves(update), jax.tree.leaves(exact_update))))
            norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(exact_update)))
            nu, nu_got = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(s[0].nu)])
                          for s in (state, got["opt_state"]))
            zeroed = float(np.mean(nu_got[nu > 0] == 0))
            loss = resumed(got["params"], got["opt_state"])
            reference = resumed(got["params"], state)
            print(f"{label:28s} {raw32 / report.file_bytes:6.2f} {8 * moment_bytes / n_moments:10.2f} "
                  f"{float(diff / norm):10.3g} {zeroed:8.1%} {loss:12.4f} "
                  f"{loss / reference:8.3f} {seconds:6.2f}")


if __name__ == "__main__":
    main()
