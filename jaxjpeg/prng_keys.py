"""Typed PRNG key arrays (``jax.random.key``; an NNX model's ``nnx.Rngs`` and
``Dropout`` hold them) in a checkpoint.

A key array is stored as its key data (uint32, lossless) with the name of its
implementation in the leaf record (``prng_impl``); restore wraps the data
again, so a training state comes back with its keys as Orbax gives them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpeg import layout

FIELD = "prng_impl"
MAX_NAME = 64


def is_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def split(leaf, name: str = ""):
    """(leaf, None) for anything but a key array; (its key data, impl name) for
    one, whose implementation a reader can find by that name (found by
    review: a jax.extend.random.define_prng_impl key saved under its tag,
    which no reader resolves)."""
    if not is_key(leaf):
        return leaf, None
    data, impl = jax.random.key_data(leaf), str(jax.random.key_impl(leaf))
    try:
        same = key_struct(name, impl, data.shape).dtype == leaf.dtype
    except ValueError:
        same = False
    if not same:
        raise layout.Unstorable(
            f"leaf {name!r}: its PRNG keys' implementation ({impl!r}) is not registered with "
            "jax by that name, so no reader could wrap them again: save "
            "jax.random.key_data(key) instead")
    return data, impl


def check_data(name: str, impl, shape: tuple, dtype) -> None:
    """Refuses key data a reader would refuse (layout.Unstorable): a name
    that is no string, data not uint32 of at least one axis, or not what a
    key of ``impl`` holds (found by review: a damaged Orbax checkpoint's
    name on a float leaf made a file nothing could open)."""
    if not is_data(impl, shape, dtype):
        raise layout.Unstorable(f"leaf {name!r}: {np.dtype(dtype).name}{list(shape)} is not "
                                f"PRNG key data (named {impl!r:.80})")
    try:
        key_struct(name, impl, shape)
    except ValueError as e:
        raise layout.Unstorable(str(e)) from None


def is_data(impl, shape: tuple, dtype) -> bool:
    """Whether a leaf of ``shape`` and ``dtype`` named for implementation
    ``impl`` may be key data: a name of 1..MAX_NAME characters, uint32 data
    of at least one axis (whether ``impl`` makes keys of it is checked where
    they are wrapped: a process may register its own implementations)."""
    return (isinstance(impl, str) and 0 < len(impl) <= MAX_NAME
            and np.dtype(dtype) == np.uint32 and len(shape) > 0)


def key_struct(name: str, impl: str, data_shape: tuple) -> jax.ShapeDtypeStruct:
    """The key array ``impl`` makes of uint32 data of ``data_shape``, as a
    shape and dtype; ValueError naming leaf ``name`` if it makes none."""
    try:
        return jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=impl),
                              jax.ShapeDtypeStruct(tuple(data_shape), jnp.uint32))
    except (TypeError, ValueError):
        pass
    try:
        one = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
        why = f"its keys hold {list(one.shape)} words"
    except (TypeError, ValueError):
        why = "no implementation of that name is registered with jax here"
    raise ValueError(f"leaf {name!r}: its saved PRNG key data {list(data_shape)} is not a key "
                     f"array of implementation {impl!r} ({why}); restore the other leaves "
                     "with paths=, or this one as uint32 data with a jax.ShapeDtypeStruct "
                     "target") from None


def target_impl(name: str, saved_impl: str | None, saved_shape: tuple, want) -> str | None:
    """The implementation a target leaf (its shape and dtype; dtype None: as
    saved) asks the saved leaf back in, None for plain data; a key asked of
    data saved as anything but keys of that dtype and shape is refused."""
    if want.dtype is None:
        return saved_impl
    if not jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
        return None
    if saved_impl is None:
        raise ValueError(f"{name}: the target asks for a PRNG key array ({want.dtype}), the "
                         "saved leaf is not one")
    have = key_struct(name, saved_impl, saved_shape)
    if have.dtype != want.dtype or tuple(have.shape) != tuple(want.shape):
        raise ValueError(f"{name}: target {want.dtype}{list(want.shape)} != saved "
                         f"{have.dtype}{list(have.shape)}")
    return saved_impl


def wrap(value, impl: str | None, name: str):
    """``value`` (restored key data) as the key array it was saved from."""
    if impl is None:
        return value
    key_struct(name, impl, np.shape(value))   # a clear error for data that makes no key
    return jax.random.wrap_key_data(value, impl=impl)
