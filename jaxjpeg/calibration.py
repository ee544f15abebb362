"""Calibration statistics of Flax models for error feedback.

    covs = jaxjpeg.calibration.input_covariances(model, variables, batches)
    jaxjpeg.save(path, variables, target_ratio=8, input_covariance=covs)

Runs the model on calibration batches and records, for every ``nn.Dense``
and ungrouped ``nn.Conv``, the second moment of the inputs its kernel
multiplies (for convolutions: of the patches it sees), keyed by the kernel's
leaf path. For PyTorch or ONNX weights, build
:class:`jaxjpeg.feedback.InputCovariance` from the same statistics yourself
(e.g. forward hooks and ``torch.nn.functional.unfold``).
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from jaxjpeg.feedback import InputCovariance


def input_covariances(module, variables, batches: Iterable, *, prefix: str = "params/",
                      method=None, **apply_kwargs) -> dict[str, InputCovariance]:
    """``{leaf path: InputCovariance}`` of ``module``'s Dense and Conv kernels.

    ``batches``: each an array (``module.apply(variables, batch)``) or a
    tuple of positional arguments. ``prefix`` joins module paths to leaf
    paths as :func:`jaxjpeg.save` names them: ``"params/"`` when saving
    ``variables``, ``""`` when saving ``variables["params"]``. Grouped
    convolutions and paddings other than SAME, VALID or explicit pairs are
    skipped (their leaves are coded without feedback).
    """
    import flax.linen as nn

    sums: dict[str, np.ndarray] = {}
    axes: dict[str, tuple[int, ...]] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and args:
            features = _features(mod, args[0], nn)
            if features is not None:
                name = prefix + "/".join((*mod.path, "kernel"))
                f = np.asarray(features, np.float64)
                sums[name] = sums.get(name, 0) + f.T @ f
                axes[name] = _kernel_input_axes(mod, nn)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            module.apply(variables, *args, method=method, **apply_kwargs)
    return {name: InputCovariance(h, axes[name]) for name, h in sums.items()}


def _features(mod, x, nn):
    """[samples, features] the kernel multiplies, or None for other modules."""
    if isinstance(mod, nn.Dense):
        return jax.numpy.reshape(x, (-1, x.shape[-1]))
    if not isinstance(mod, nn.Conv) or mod.feature_group_count != 1:
        return None
    padding = _lax_padding(mod.padding, len(mod.kernel_size))
    if padding is None:
        return None
    nd = len(mod.kernel_size)
    batched = x if x.ndim == nd + 2 else x[None]
    spatial = "DHW"[-nd:]
    patches = jax.lax.conv_general_dilated_patches(
        batched, tuple(mod.kernel_size), _tuple(mod.strides, nd), padding,
        lhs_dilation=_tuple(mod.input_dilation, nd), rhs_dilation=_tuple(mod.kernel_dilation, nd),
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    # Patch features come channel-major, (C, *window): see _kernel_input_axes.
    return jax.numpy.reshape(patches, (-1, patches.shape[-1]))


def _kernel_input_axes(mod, nn) -> tuple[int, ...]:
    """Dense (I, O): (0,); Conv (*window, I, O): (nd, 0, ..., nd - 1), the
    order of conv_general_dilated_patches' features."""
    if isinstance(mod, nn.Dense):
        return (0,)
    nd = len(mod.kernel_size)
    return (nd,) + tuple(range(nd))


def _tuple(value, nd: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * nd
    return (int(value),) * nd if isinstance(value, int) else tuple(int(v) for v in value)


def _lax_padding(padding, nd: int):
    """Flax's padding as lax takes it, or None where they differ (CIRCULAR, CAUSAL)."""
    if isinstance(padding, str):
        return padding if padding in ("SAME", "VALID") else None
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return pairs if len(pairs) == nd else None
