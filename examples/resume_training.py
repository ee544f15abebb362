"""A training script that checkpoints with jaxjpeg and resumes from it.

    python examples/resume_training.py [--epochs 6] [--ckpt /tmp/digits_train.jjpg]

It trains the digits CNN for half the epochs, saves params, optimizer state
and step to one jaxjpeg checkpoint, then (as a restarted job would) loads the
checkpoint compressed onto the device and expands it inside a jit-compiled
load function, and finishes training from there.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxjpeg
from models import DigitsCNN, digits_accuracy, digits_data


def make_train_step(model, optimizer):
    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    return train_step


def run_epochs(state, train_step, x, y, epochs, seed):
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - 63, 64):
            batch = order[start:start + 64]
            state, loss = train_step(state, x[batch], y[batch])
    return state, float(loss)


@jax.jit
def load_fn(compressed):
    """The jit-compiled load function: compressed bytes in, training state out."""
    return jaxjpeg.decode(compressed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ckpt", default=os.path.join(tempfile.mkdtemp(), "digits_train.jjpg"))
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits_data(seed=0)
    model, optimizer = DigitsCNN(), optax.adam(1e-3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    train_step = make_train_step(model, optimizer)

    half = args.epochs // 2
    state, loss = run_epochs(state, train_step, x_train, y_train, half, seed=1)
    report = jaxjpeg.save(args.ckpt, state, error_bound=0.01)
    print(f"epoch {half}: loss {loss:.4f}, accuracy "
          f"{100 * digits_accuracy(model, {'params': state['params']}, x_test, y_test):.2f}%; "
          f"checkpoint {report.file_bytes:,} bytes ({report.ratio_vs_float32:.1f}x vs float32)")

    # --- a restarted job: only the checkpoint survives --------------------
    abstract = jax.eval_shape(lambda: state)
    compressed = jaxjpeg.load(args.ckpt, target=abstract)
    resumed = load_fn(compressed)
    print(f"resumed at step {int(resumed['step'])} from {args.ckpt}")
    resumed, loss = run_epochs(resumed, train_step, x_train, y_train, args.epochs - half, seed=2)
    print(f"epoch {args.epochs}: loss {loss:.4f}, accuracy "
          f"{100 * digits_accuracy(model, {'params': resumed['params']}, x_test, y_test):.2f}%")


if __name__ == "__main__":
    main()
