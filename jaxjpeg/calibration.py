"""Calibration statistics of Flax models for error feedback and bias correction.

    covs = jaxjpeg.calibration.input_covariances(model, variables, batches)
    means = jaxjpeg.calibration.input_means(model, variables, batches)
    jaxjpeg.save(path, variables, target_ratio=8, input_covariance=covs,
                 input_mean=means)

Runs the model on calibration batches and records, for every ``nn.Dense``
and ungrouped ``nn.Conv``, the second moment of the inputs its kernel
multiplies (for convolutions: of the patches it sees), keyed by the kernel's
leaf path. A Flax NNX model (saved as ``nnx.state(model)``) takes
:func:`nnx_input_covariances` and :func:`nnx_input_means`. For PyTorch or
ONNX weights, build
:class:`jaxjpeg.feedback.InputCovariance` from the same statistics yourself
(e.g. forward hooks and ``torch.nn.functional.unfold``).
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from jaxjpeg.bias_correction import InputMean
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
    return _covariances(_linen_run(module, variables, batches, method, apply_kwargs), nn,
                        _linen_leaf(prefix))


def input_means(module, variables, batches: Iterable, *, prefix: str = "params/",
                method=None, **apply_kwargs) -> dict[str, InputMean]:
    """``{leaf path: InputMean}`` of ``module``'s Dense and Conv kernels
    (grouped and depthwise ones too): each input channel's mean over the
    calibration ``batches`` (as :func:`input_covariances` takes them; a
    convolution's padding is not counted), for bias correction. Each takes
    the BatchNorm called right after its layer (its running mean in
    ``batch_stats``, when ``prefix`` ends in ``params/``), else its own bias:
    found from the calls, so sorted trees (what jax returns) work."""
    import flax.linen as nn
    stats = prefix[:-len("params/")] + "batch_stats/" if prefix.endswith("params/") else None
    return _means(_linen_run(module, variables, batches, method, apply_kwargs), nn,
                  _linen_leaf(prefix), None if stats is None else _linen_leaf(stats))


def nnx_input_covariances(model, batches: Iterable, *, prefix: str = "",
                          **call_kwargs) -> dict[str, InputCovariance]:
    """:func:`input_covariances` of a Flax NNX ``model`` (its ``nnx.Linear``
    and ungrouped ``nnx.Conv`` layers), keyed by the kernels' paths in
    ``nnx.state(model)`` (``conv1/kernel/value``); ``prefix`` goes before
    them when the state is saved inside a larger tree. Each batch is
    ``model(batch, **call_kwargs)`` (a tuple: positional arguments), run
    eagerly, the layers' calls recorded by patching their classes' calls
    meanwhile (so not from several threads at once)."""
    return _covariances(_nnx_run(model, batches, call_kwargs), _NnxKinds(), _nnx_leaf(prefix))


def nnx_input_means(model, batches: Iterable, *, prefix: str = "",
                    **call_kwargs) -> dict[str, InputMean]:
    """:func:`input_means` of a Flax NNX ``model``: each Linear and Conv
    kernel's input means, taken by the running mean of the ``nnx.BatchNorm``
    called right after its layer, else by its own bias (paths as in
    :func:`nnx_input_covariances`)."""
    leaf = _nnx_leaf(prefix)
    return _means(_nnx_run(model, batches, call_kwargs), _NnxKinds(), leaf, leaf)


def _covariances(run, nn, leaf) -> dict[str, InputCovariance]:
    """The second moments of what each kernel multiplies, over the calls
    ``run(record)`` reports (``nn``: the layer classes; ``leaf(path, key)``:
    a leaf's name)."""
    sums: dict[str, np.ndarray] = {}
    axes: dict[str, tuple[int, ...]] = {}

    def record(mod, path, x):
        features = None if x is None else _features(mod, x, nn)
        if features is not None:
            name = leaf(path, "kernel")
            f = np.asarray(features, np.float64)
            sums[name] = sums.get(name, 0) + f.T @ f
            axes[name] = _kernel_input_axes(mod, nn)

    run(record)
    return {name: InputCovariance(h, axes[name]) for name, h in sums.items()}


def _means(run, nn, leaf, stats_leaf) -> dict[str, InputMean]:
    """Each kernel's input means over the calls ``run(record)`` reports,
    taken by the running mean (``stats_leaf(path, "mean")``; None: there is
    none) of a BatchNorm called right after its layer, else by its bias."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    modules: dict = {}
    calls: list = []

    def record(mod, path, x):
        calls.append((mod, path))
        if x is not None and isinstance(mod, (nn.Dense, nn.Conv)):
            x = np.asarray(x, np.float64)
            x = x.reshape(-1, x.shape[-1])
            name = leaf(path, "kernel")
            sums[name] = sums.get(name, 0) + x.sum(axis=0)
            counts[name] = counts.get(name, 0) + len(x)
            modules[name] = mod

    run(record)
    takers = {}
    for k, (mod, path) in enumerate(calls):
        if not isinstance(mod, (nn.Dense, nn.Conv)):
            continue
        after = calls[k + 1] if k + 1 < len(calls) else None
        if stats_leaf and after is not None and isinstance(after[0], nn.BatchNorm):
            takers[leaf(path, "kernel")] = stats_leaf(after[1], "mean")
        elif mod.use_bias:
            takers[leaf(path, "kernel")] = leaf(path, "bias")
    return {name: InputMean(_kernel_mean(modules[name], total / counts[name], nn), -1,
                            takers.get(name))
            for name, total in sums.items()}


def _linen_leaf(prefix: str):
    return lambda path, key: prefix + "/".join((*path, key))


def _linen_run(module, variables, batches, method, apply_kwargs):
    """``run(record)`` of a linen module: ``record(module, its path, first
    argument or None)`` at every module's ``__call__``."""
    import flax.linen as nn

    def run(record):
        def intercept(next_fun, args, kwargs, context):
            if context.method_name == "__call__":
                record(context.module, context.module.path, args[0] if args else None)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(intercept):
            for batch in batches:
                args = batch if isinstance(batch, tuple) else (batch,)
                module.apply(variables, *args, method=method, **apply_kwargs)
    return run


class _NnxKinds:
    """flax.nnx's layers under the names the helpers below test for."""

    def __init__(self):
        from flax import nnx
        self.Dense, self.Conv, self.BatchNorm = nnx.Linear, nnx.Conv, nnx.BatchNorm


def _nnx_leaf(prefix: str):
    return lambda path, key: prefix + "/".join((*map(str, path), key, "value"))


def _nnx_run(model, batches, call_kwargs):
    """``run(record)`` of an NNX model: ``record(layer, its path, input)``
    before every Linear, Conv and BatchNorm call."""
    def run(record):
        from flax import nnx
        paths = {id(m): path for path, m in nnx.iter_modules(model)}
        kinds = _NnxKinds()
        originals = {cls: cls.__dict__["__call__"]
                     for cls in (kinds.Dense, kinds.Conv, kinds.BatchNorm)}

        def recording(call):
            def wrapped(self, x, *args, **kwargs):
                if id(self) in paths:
                    record(self, paths[id(self)], x)
                return call(self, x, *args, **kwargs)
            return wrapped

        try:
            for cls, call in originals.items():
                cls.__call__ = recording(call)
            for batch in batches:
                args = batch if isinstance(batch, tuple) else (batch,)
                model(*args, **call_kwargs)
        finally:
            for cls, call in originals.items():
                cls.__call__ = call
    return run


def _outputs(mod) -> int:
    """A layer's output channels (linen ``features``, NNX ``out_features``)."""
    return mod.features if hasattr(mod, "features") else mod.out_features


def _kernel_mean(mod, mean: np.ndarray, nn) -> np.ndarray:
    """Per-channel input means shaped to broadcast to the kernel: Dense
    ``(I, 1)``; Conv ``(1, ..., I, 1)``, grouped ``(1, ..., I / groups, O)``
    (each output channel takes the channels of its group)."""
    if isinstance(mod, nn.Dense):
        return mean[:, None]
    groups, outputs = mod.feature_group_count, _outputs(mod)
    if groups == 1:
        return mean.reshape((1,) * len(mod.kernel_size) + (len(mean), 1))
    per_group = mean.reshape(groups, -1)                        # (G, I / G)
    by_output = per_group[np.arange(outputs) // (outputs // groups)].T   # (I / G, O)
    return by_output.reshape((1,) * len(mod.kernel_size) + by_output.shape)


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
