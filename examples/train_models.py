"""Train the reference models, print their quality and training time, and cache their params.

Usage: python examples/train_models.py [--seed 0] [--epochs 30] [--steps 2000]

The params are written to the cache (``$JAXJPEG_CACHE`` or ~/.cache/jaxjpeg-examples)
under the names ``pretrained_digits_cnn`` / ``pretrained_sensitive_model`` read, so later
benchmarks reuse them instead of retraining.
"""

import argparse

import jax
import numpy as np

from models import (DIGITS_EPOCHS, SENSITIVE_STEPS, cache_dir, cross_entropy, digits_data,
                    digits_logits, save_params, sensitive_data, sensitive_outputs, timed,
                    train_digits_cnn, train_sensitive_model)


def parameter_count(params) -> int:
    """Return the number of scalars in a params pytree."""
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))


def report_digits(seed: int, epochs: int) -> None:
    """Train the digits CNN, print its figures and cache its params."""
    (model, params), seconds = timed(train_digits_cnn, seed, epochs)
    x_train, y_train, x_test, y_test = digits_data(seed)
    train_logits = digits_logits(model, params, x_train)
    test_logits = digits_logits(model, params, x_test)
    print(f"digits CNN: {parameter_count(params):,} params, {epochs} epochs, "
          f"trained in {seconds:.1f} s")
    print(f"  train accuracy {np.mean(train_logits.argmax(-1) == y_train):.4f}, "
          f"test accuracy {np.mean(test_logits.argmax(-1) == y_test):.4f} "
          f"({len(y_test)} images), test loss {cross_entropy(test_logits, y_test):.4f}")
    save_params(cache_dir() / f"digits_cnn_seed{seed}_epochs{epochs}.npz", params)


def report_sensitive(seed: int, steps: int) -> None:
    """Train the sorting transformer, print its figures and cache its params."""
    (model, params), seconds = timed(train_sensitive_model, seed, steps)
    _, _, x_test, y_test = sensitive_data(seed, train_size=1)
    logits = sensitive_outputs(model, params, x_test)
    predictions = logits.argmax(-1)
    print(f"sorting transformer: {parameter_count(params):,} params, {steps} steps, "
          f"trained in {seconds:.1f} s")
    print(f"  test token accuracy {np.mean(predictions == y_test):.4f}, "
          f"sequence accuracy {np.mean((predictions == y_test).all(-1)):.4f} "
          f"({len(y_test)} sequences), test loss {cross_entropy(logits, y_test):.4f}")
    save_params(cache_dir() / f"sorting_transformer_seed{seed}_steps{steps}.npz", params)


def main() -> None:
    """Parse arguments and train both models."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DIGITS_EPOCHS, help="digits CNN epochs")
    parser.add_argument("--steps", type=int, default=SENSITIVE_STEPS, help="transformer steps")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; cache {cache_dir()}")
    report_digits(args.seed, args.epochs)
    report_sensitive(args.seed, args.steps)


if __name__ == "__main__":
    main()
