"""Small reference models for measuring how weight compression affects a network.

Two models, both trained deterministically from a seed on CPU:

* ``DigitsCNN``: a small CNN on scikit-learn's bundled 8x8 digits (a quick,
  forgiving accuracy check).
* ``SortingTransformer``: a 3-layer transformer encoder (d_model 128, 4 heads,
  MLP 512, about 0.61M parameters) that sorts sequences of 16 tokens drawn
  from a 64-token vocabulary. Errors compound through the layers, so its
  outputs degrade measurably under weight error, which makes quantizer
  comparisons meaningful.

Scripts in ``examples/`` and ``benchmarks/`` import this module with
``from models import ...`` (Python puts the running script's directory on
``sys.path``). ``cached`` stores trained parameters as ``.npz`` so benchmarks
do not retrain every time.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

DIGITS_EPOCHS = 30
SENSITIVE_STEPS = 2000
SORT_VOCAB = 64
SORT_LENGTH = 16


# ----------------------------------------------------------------------------
# Parameter cache
# ----------------------------------------------------------------------------

def cache_dir() -> Path:
    """Return the cache directory: ``$JAXJPEG_CACHE`` or ~/.cache/jaxjpeg-examples."""
    default = Path.home() / ".cache" / "jaxjpeg-examples"
    return Path(os.environ.get("JAXJPEG_CACHE", default))


def save_params(path: Path, params) -> None:
    """Write a params pytree (nested dicts of arrays) to ``path`` as .npz, atomically."""
    flat = traverse_util.flatten_dict(params, sep="/")
    arrays = {key: np.asarray(value) for key, value in flat.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def load_params(path: Path):
    """Read a params pytree written by ``save_params``."""
    with np.load(path) as data:
        flat = {key: np.asarray(data[key]) for key in data.files}
    return traverse_util.unflatten_dict(flat, sep="/")


def cached(name: str, fn: Callable[[], object]):
    """Return the params stored under ``name``, or compute them with ``fn()`` and store them.

    ``fn`` returns a params pytree (nested dicts of arrays). Leaves come back as numpy arrays.
    """
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        return load_params(path)
    params = jax.device_get(fn())
    save_params(path, params)
    return load_params(path)


# ----------------------------------------------------------------------------
# Digits CNN
# ----------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """conv3x3x32 -> conv3x3x64 -> avgpool 2 -> dense 128 -> dense 10 on 8x8x1 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def digits_data(seed: int = 0):
    """Return (x_train, y_train, x_test, y_test): digits scaled to [0, 1], NHWC, 25% stratified test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def digits_logits(model: nn.Module, params, x) -> np.ndarray:
    """Return the (N, 10) logits of the digits CNN for images ``x``."""
    return np.asarray(_apply(model, params, jnp.asarray(x)))


def digits_accuracy(model: nn.Module, params, x, y) -> float:
    """Return the fraction of images in ``x`` classified as ``y``."""
    return float(np.mean(digits_logits(model, params, x).argmax(-1) == np.asarray(y)))


def train_digits_cnn(seed: int = 0, epochs: int = DIGITS_EPOCHS, batch_size: int = 64):
    """Train the digits CNN with Adam; return (model, params). Deterministic given ``seed``."""
    x_train, y_train, _, _ = digits_data(seed)
    model = DigitsCNN()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))
    optimizer = optax.adam(1e-3)
    step = _make_classifier_step(model, optimizer)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(x_train) // batch_size
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            batch = order[i * batch_size:(i + 1) * batch_size]
            params, opt_state, _ = step(params, opt_state, x_train[batch], y_train[batch])
    return model, jax.device_get(params)


def pretrained_digits_cnn(seed: int = 0, epochs: int = DIGITS_EPOCHS):
    """Return (model, params) for the digits CNN, training it once and caching the params."""
    params = cached(f"digits_cnn_seed{seed}_epochs{epochs}",
                    lambda: train_digits_cnn(seed, epochs)[1])
    return DigitsCNN(), params


# ----------------------------------------------------------------------------
# Sensitive model: transformer encoder that sorts token sequences
# ----------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention then a GELU MLP, both residual."""

    d_model: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        x = x + self._attention(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(self.mlp, name="mlp_in")(nn.LayerNorm()(x)))
        return x + nn.Dense(self.d_model, name="mlp_out")(h)

    def _attention(self, x):
        """Multi-head self-attention with a fused (in, 3 * d_model) qkv kernel."""
        batch, length, _ = x.shape
        head_dim = self.d_model // self.heads
        qkv = nn.Dense(3 * self.d_model, name="qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(self.d_model, name="attn_out")(mixed.reshape(batch, length, -1))


class SortingTransformer(nn.Module):
    """Transformer encoder mapping a token sequence to per-position logits of its sorted version.

    All weight matrices are 2-D Dense kernels laid out (in, out).
    """

    vocab: int = SORT_VOCAB
    length: int = SORT_LENGTH
    d_model: int = 128
    heads: int = 4
    mlp: int = 512
    layers: int = 3

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model)(tokens)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (self.length, self.d_model))
        for i in range(self.layers):
            x = EncoderBlock(self.d_model, self.heads, self.mlp, name=f"block{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def sorting_batch(rng: np.random.Generator, count: int):
    """Return (tokens, sorted tokens), each int32 (count, SORT_LENGTH), drawn from ``rng``."""
    tokens = rng.integers(0, SORT_VOCAB, size=(count, SORT_LENGTH), dtype=np.int32)
    return tokens, np.sort(tokens, axis=-1)


def sensitive_data(seed: int = 0, train_size: int = SENSITIVE_STEPS * 128, test_size: int = 4096):
    """Return (x_train, y_train, x_test, y_test) for the sorting task (independent seeded draws)."""
    x_train, y_train = sorting_batch(np.random.default_rng([seed, 0]), train_size)
    x_test, y_test = sorting_batch(np.random.default_rng([seed, 1]), test_size)
    return x_train, y_train, x_test, y_test


def sensitive_outputs(model: nn.Module, params, x, batch_size: int = 1024) -> np.ndarray:
    """Return the (N, SORT_LENGTH, SORT_VOCAB) logits of the sorting transformer for tokens ``x``."""
    x = np.asarray(x)
    chunks = [_apply(model, params, jnp.asarray(x[i:i + batch_size]))
              for i in range(0, len(x), batch_size)]
    return np.concatenate([np.asarray(c) for c in chunks])


def train_sensitive_model(seed: int = 0, steps: int = SENSITIVE_STEPS, batch_size: int = 128):
    """Train the sorting transformer with AdamW and a cosine schedule; return (model, params)."""
    x_train, y_train, _, _ = sensitive_data(seed, train_size=steps * batch_size)
    model = SortingTransformer()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, SORT_LENGTH), jnp.int32))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, steps // 20, steps, 1e-5)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    step = _make_classifier_step(model, optimizer)
    opt_state = optimizer.init(params)
    for i in range(steps):
        batch = slice(i * batch_size, (i + 1) * batch_size)
        params, opt_state, _ = step(params, opt_state, x_train[batch], y_train[batch])
    return model, jax.device_get(params)


def pretrained_sensitive_model(seed: int = 0, steps: int = SENSITIVE_STEPS):
    """Return (model, params) for the sorting transformer, training it once and caching the params."""
    params = cached(f"sorting_transformer_seed{seed}_steps{steps}",
                    lambda: train_sensitive_model(seed, steps)[1])
    return SortingTransformer(), params


# ----------------------------------------------------------------------------
# Shared training helpers and fidelity metrics
# ----------------------------------------------------------------------------

_APPLY_CACHE: dict = {}


def _apply(model: nn.Module, params, x):
    """Run ``model.apply`` through one jitted function per (hashable) model."""
    if model not in _APPLY_CACHE:
        _APPLY_CACHE[model] = jax.jit(model.apply)
    return _APPLY_CACHE[model](params, x)


def _make_classifier_step(model: nn.Module, optimizer: optax.GradientTransformation):
    """Return a jitted (params, opt_state, x, labels) -> (params, opt_state, loss) cross-entropy step."""

    def loss_fn(params, x, labels):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def cross_entropy(logits, labels) -> float:
    """Return the mean softmax cross-entropy of integer ``labels`` under ``logits``."""
    logits = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])
    log_probs = _log_softmax(logits)
    return float(-np.mean(log_probs[np.arange(len(logits)), np.asarray(labels).reshape(-1)]))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Return log softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def output_fidelity(ref_logits, logits, labels=None) -> dict:
    """Compare outputs ``logits`` against reference outputs ``ref_logits`` (same shape, classes last).

    Returns a dict with ``kl`` (mean KL(softmax(ref) || softmax(logits)) in nats),
    ``cosine`` (mean cosine similarity of the output vectors), ``agreement`` (fraction of
    matching argmaxes) and, when ``labels`` are given, ``accuracy`` and ``ref_accuracy``.
    """
    classes = np.shape(ref_logits)[-1]
    ref = np.asarray(ref_logits, np.float64).reshape(-1, classes)
    out = np.asarray(logits, np.float64).reshape(-1, classes)
    ref_logp, out_logp = _log_softmax(ref), _log_softmax(out)
    kl = np.sum(np.exp(ref_logp) * (ref_logp - out_logp), axis=-1)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1)
    cosine = np.sum(ref * out, axis=-1) / np.maximum(norms, 1e-30)
    result = {
        "kl": float(kl.mean()),
        "cosine": float(cosine.mean()),
        "agreement": float(np.mean(ref.argmax(-1) == out.argmax(-1))),
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        result["accuracy"] = float(np.mean(out.argmax(-1) == labels))
        result["ref_accuracy"] = float(np.mean(ref.argmax(-1) == labels))
    return result


def timed(fn: Callable, *args, **kwargs):
    """Return (fn(*args, **kwargs), elapsed seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
