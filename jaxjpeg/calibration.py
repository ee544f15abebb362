"""Calibration statistics of Flax models for error feedback and bias correction.

    covs = jaxjpeg.calibration.input_covariances(model, variables, batches)
    means = jaxjpeg.calibration.input_means(model, variables, batches)
    jaxjpeg.save(path, variables, target_ratio=8, input_covariance=covs,
                 input_mean=means)

Runs the model on calibration batches and records, for every ``nn.Dense``
and ungrouped ``nn.Conv``, the second moment of the inputs its kernel
multiplies (for convolutions: of the patches it sees), keyed by the kernel's
leaf path. A Flax NNX model (saved as ``nnx.state(model)``) takes
:func:`nnx_input_covariances` and :func:`nnx_input_means`. Without data, a
network with BatchNorm layers can calibrate on inputs synthesized from its
running statistics (:func:`synthetic_inputs`, :func:`nnx_synthetic_inputs`).
For PyTorch or
ONNX weights, build
:class:`jaxjpeg.feedback.InputCovariance` from the same statistics yourself
(e.g. forward hooks and ``torch.nn.functional.unfold``).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import jax
import numpy as np

from jaxjpeg.bias_correction import InputMean
from jaxjpeg.feedback import InputCovariance

# synthetic_inputs' Adam steps and first learning rate: EfficientNet-lite1's
# BatchNorm gap falls 14x in 150 steps (870 -> 63); 300 steps (-> 41) gave
# data that calibrates no better (KL 0.0392 against 0.0391).
SYNTHESIS_STEPS = 150
SYNTHESIS_RATE = 0.2


def input_covariances(module, variables, batches: Iterable, *, prefix: str = "params/",
                      method=None, damping: float | None = None,
                      **apply_kwargs) -> dict[str, InputCovariance]:
    """``{leaf path: InputCovariance}`` of ``module``'s Dense and Conv kernels.

    ``batches``: each an array (``module.apply(variables, batch)``) or a
    tuple of positional arguments. ``prefix`` joins module paths to leaf
    paths as :func:`jaxjpeg.save` names them: ``"params/"`` when saving
    ``variables``, ``""`` when saving ``variables["params"]``. Grouped
    convolutions and paddings other than SAME, VALID or explicit pairs are
    skipped (their leaves are coded without feedback). ``damping``: each
    covariance's :attr:`InputCovariance.damping` (None: measured data's).
    """
    import flax.linen as nn
    return _covariances(_linen_run(module, variables, batches, method, apply_kwargs), nn,
                        _linen_leaf(prefix), damping)


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
                          damping: float | None = None,
                          **call_kwargs) -> dict[str, InputCovariance]:
    """:func:`input_covariances` of a Flax NNX ``model`` (its ``nnx.Linear``
    and ungrouped ``nnx.Conv`` layers), keyed by the kernels' paths in
    ``nnx.state(model)`` (``conv1/kernel/value``); ``prefix`` goes before
    them when the state is saved inside a larger tree. Each batch is
    ``model(batch, **call_kwargs)`` (a tuple: positional arguments), run
    eagerly, the layers' calls recorded by patching their classes' calls
    meanwhile (so not from several threads at once)."""
    return _covariances(_nnx_run(model, batches, call_kwargs), _NnxKinds(), _nnx_leaf(prefix),
                        damping)


def nnx_input_means(model, batches: Iterable, *, prefix: str = "",
                    **call_kwargs) -> dict[str, InputMean]:
    """:func:`input_means` of a Flax NNX ``model``: each Linear and Conv
    kernel's input means, taken by the running mean of the ``nnx.BatchNorm``
    called right after its layer, else by its own bias (paths as in
    :func:`nnx_input_covariances`)."""
    leaf = _nnx_leaf(prefix)
    return _means(_nnx_run(model, batches, call_kwargs), _NnxKinds(), leaf, leaf)


def synthetic_inputs(module, variables, shape, *, steps: int = SYNTHESIS_STEPS,
                     learning_rate: float = SYNTHESIS_RATE, scale: float = 1.0, seed: int = 0,
                     method=None, **apply_kwargs) -> np.ndarray:
    """Calibration inputs for a linen ``module`` with BatchNorm layers when
    there is no data: a batch of ``shape`` (e.g. ``(32, 128, 128, 3)``)
    optimized from normal noise of deviation ``scale`` (best: the spread of
    the model's real inputs) until each ``nn.BatchNorm`` sees batch means
    and deviations close to its running ones (ZeroQ's distilled data), by
    ``steps`` of Adam. Run in inference mode (pass ``apply_kwargs`` such as
    ``train=False``). Their statistics go to :func:`input_covariances`
    (``damping=feedback.SYNTHETIC_DAMPING``) and :func:`input_means`::

        x = calibration.synthetic_inputs(model, variables, (32, 128, 128, 3), train=False)
        covs = calibration.input_covariances(model, variables, [x], train=False,
                                             damping=feedback.SYNTHETIC_DAMPING)
        means = calibration.input_means(model, variables, [x], train=False)

    Raises ValueError when no BatchNorm is called: nothing to match.
    EfficientNet-lite0 / -lite1 / -lite2 at 8x (32 inputs of 128 px,
    ``scale`` 0.5, 4 probe seeds): KL 0.042-0.050 / 0.043-0.049 /
    0.046-0.052 over 4-6 batches (means -16% / -4% / +4%) against the
    data-free prior's 0.054 / 0.047 / 0.047; 32 real crops give about 0.02
    (``docs/real_models.md``, sessions 18 and 19). The batch is a chaotic
    function of its start: the same seed can give another batch on another
    build of the program around it. Minutes on a CPU: 150 forward and
    backward passes of the network on the batch.
    """
    import flax.linen as nn

    def gap(x, variables):
        return _statistics_gap(_linen_run(module, variables, [x], method, apply_kwargs), nn,
                               lambda mod: (mod.variables["batch_stats"]["mean"],
                                            mod.variables["batch_stats"]["var"]))
    return _synthesize(gap, variables, shape, steps, learning_rate, scale, seed)


def nnx_synthetic_inputs(model, shape, *, steps: int = SYNTHESIS_STEPS,
                         learning_rate: float = SYNTHESIS_RATE, scale: float = 1.0,
                         seed: int = 0, **call_kwargs) -> np.ndarray:
    """:func:`synthetic_inputs` of a Flax NNX ``model`` (in eval mode), for
    :func:`nnx_input_covariances` and :func:`nnx_input_means`."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def gap(x, state):
        return _statistics_gap(_nnx_run(nnx.merge(graphdef, state), [x], call_kwargs),
                               _NnxKinds(), lambda mod: (mod.mean[...], mod.var[...]))
    return _synthesize(gap, state, shape, steps, learning_rate, scale, seed)


def _synthesize(gap, operands, shape, steps, learning_rate, scale, seed) -> np.ndarray:
    """Adam with a cosine-decayed rate on ``gap(x, operands)`` from normal noise."""
    import optax

    if steps < 1 or not learning_rate > 0 or not scale > 0:
        raise ValueError(f"synthesis needs steps >= 1, learning_rate > 0 and scale > 0; got "
                         f"{steps}, {learning_rate}, {scale}")
    x = scale * jax.random.normal(jax.random.PRNGKey(seed), tuple(shape), jax.numpy.float32)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    @jax.jit
    def step(x, state, operands):
        grad = jax.grad(gap)(x, operands)
        updates, state = optimizer.update(grad, state, x)
        return optax.apply_updates(x, updates), state

    state = optimizer.init(x)
    for _ in range(steps):
        x, state = step(x, state, operands)
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("synthetic inputs diverged to NaN or infinity: check the BatchNorm "
                         "running statistics (finite, variances >= 0) and the learning rate")
    return x


def _statistics_gap(run, nn, running):
    """Over the BatchNorm calls ``run(record)`` reports, the mean squared
    distance of each input's batch means and deviations per feature from
    the layer's running ones (``running(layer)``: mean, variance)."""
    gaps = []

    def record(mod, path, x):
        if isinstance(mod, nn.BatchNorm) and x is not None:
            gaps.append(_moment_gap(x, *running(mod), mod.axis, mod.epsilon))

    run(record)
    if not gaps:
        raise ValueError("the model calls no BatchNorm layer: synthetic inputs match "
                         "BatchNorm running statistics, and there are none")
    return sum(gaps)


def _moment_gap(x, mean, var, axis, epsilon):
    jnp = jax.numpy
    features = {a % x.ndim for a in np.atleast_1d(axis)}
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    batch_mean, batch_var = jnp.mean(x, reduce), jnp.var(x, reduce)
    mean, var = jnp.reshape(mean, batch_mean.shape), jnp.reshape(var, batch_var.shape)
    deviation = jnp.sqrt(batch_var + epsilon) - jnp.sqrt(jnp.maximum(var, 0) + epsilon)
    return jnp.mean((batch_mean - mean) ** 2) + jnp.mean(deviation ** 2)


def _covariances(run, nn, leaf, damping=None) -> dict[str, InputCovariance]:
    """The second moments of what each kernel multiplies, over the calls
    ``run(record)`` reports (``nn``: the layer classes; ``leaf(path, key)``:
    a leaf's name)."""
    sums: dict[str, np.ndarray] = {}
    axes: dict[str, tuple[int, ...]] = {}

    def record(mod, path, x):
        _check_eager(mod, path, x, nn)
        features = None if x is None else _features(mod, x, nn)
        if features is not None:
            name = leaf(path, "kernel")
            f = np.asarray(features, np.float64)
            sums[name] = sums.get(name, 0) + f.T @ f
            axes[name] = _kernel_input_axes(mod, nn)

    run(record)
    return {name: InputCovariance(h, axes[name], damping) for name, h in sums.items()}


def _means(run, nn, leaf, stats_leaf) -> dict[str, InputMean]:
    """Each kernel's input means over the calls ``run(record)`` reports,
    taken by the running mean (``stats_leaf(path, "mean")``; None: there is
    none) of a BatchNorm called right after its layer, else by its bias."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    modules: dict = {}
    calls: list = []

    def record(mod, path, x):
        _check_eager(mod, path, x, nn)
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


def _check_eager(mod, path, x, nn) -> None:
    """Refuses a Dense or Conv called on traced inputs (inside nn.scan,
    nn.remat, jax.jit): its statistics need the values (found by review: a
    TracerArrayConversionError naming no layer)."""
    if isinstance(x, jax.core.Tracer) and isinstance(mod, (nn.Dense, nn.Conv)):
        raise ValueError(f"calibration records layers' inputs as they run: "
                         f"{'/'.join(map(str, path)) or 'the model'} runs under a jax "
                         "transform (scan, remat, jit), which hides them; calibrate a copy "
                         "of the model without it")


def _linen_leaf(prefix: str):
    return lambda path, key: prefix + "/".join((*path, key))


def _linen_run(module, variables, batches, method, apply_kwargs):
    """``run(record)`` of a linen module: ``record(module, its path, first
    argument or None)`` at every module's ``__call__``."""
    import flax.linen as nn

    def run(record):
        def intercept(next_fun, args, kwargs, context):
            if context.method_name == "__call__":
                record(context.module, context.module.path, _first_input(args, kwargs))
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


def _first_input(args: tuple, kwargs: dict):
    """A layer call's input, positional or by keyword (Dense and Conv name it
    ``inputs``, BatchNorm ``x``; found by review: ``Dense(4)(inputs=x)`` was
    left out, ``self.out(inputs=x)`` failed), or None."""
    return args[0] if args else kwargs.get("inputs", kwargs.get("x"))


_UNSET = object()


def _nnx_run(model, batches, call_kwargs):
    """``run(record)`` of an NNX model: ``record(layer, its path, input)``
    before every Linear, Conv and BatchNorm call."""
    def run(record):
        from flax import nnx
        modules = list(nnx.iter_modules(model))
        paths = {id(m): path for path, m in modules}
        kinds = _NnxKinds()
        originals = {cls: cls.__dict__["__call__"]
                     for cls in (kinds.Dense, kinds.Conv, kinds.BatchNorm)}
        unseen = []   # layers a transform re-created (nnx.scan, nnx.remat, nnx.jit)

        def recording(call):
            def wrapped(self, *args, **kwargs):
                x = _first_input(args, kwargs)
                if id(self) in paths:
                    record(self, paths[id(self)], x)
                elif not isinstance(self, kinds.BatchNorm):
                    unseen.append(type(self).__name__)
                return call(self, *args, **kwargs)
            return wrapped

        # In inference mode, as a restored model runs, and left as it was
        # (found by review: a model in training mode, nnx's default, had its
        # running statistics moved and dropout applied while recording),
        # where a module's flags can be set (a property may not be).
        modes = []
        try:
            for _, m in modules:
                for attribute in ("deterministic", "use_running_average"):
                    if hasattr(m, attribute):
                        # (an attribute __getattr__ gives is removed after, not
                        # frozen: found by review)
                        own = attribute in vars(m) or isinstance(
                            getattr(type(m), attribute, None), property)
                        was = getattr(m, attribute) if own else _UNSET
                        try:
                            setattr(m, attribute, True)
                        except (AttributeError, TypeError):
                            continue
                        modes.append((m, attribute, was))
            for cls, call in originals.items():
                cls.__call__ = recording(call)
            for batch in batches:
                args = batch if isinstance(batch, tuple) else (batch,)
                model(*args, **call_kwargs)
        finally:
            for cls, call in originals.items():
                cls.__call__ = call
            for module, attribute, value in modes:
                if value is _UNSET:
                    delattr(module, attribute)
                else:
                    setattr(module, attribute, value)
        if unseen:
            warnings.warn(f"{len(unseen)} calls of {unseen[0]} layers ran outside the model's "
                          "own modules (under nnx.scan, nnx.remat or nnx.jit?): they have no "
                          "statistics; calibrate a copy of the model without the transform",
                          stacklevel=4)
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
        return mean.reshape((1,) * len(_window(mod)) + (len(mean), 1))
    per_group = mean.reshape(groups, -1)                        # (G, I / G)
    by_output = per_group[np.arange(outputs) // (outputs // groups)].T   # (I / G, O)
    return by_output.reshape((1,) * len(_window(mod)) + by_output.shape)


def _features(mod, x, nn):
    """[samples, features] the kernel multiplies, or None for other modules."""
    if isinstance(mod, nn.Dense):
        return jax.numpy.reshape(x, (-1, x.shape[-1]))
    if not isinstance(mod, nn.Conv) or mod.feature_group_count != 1:
        return None
    padding = _lax_padding(mod.padding, len(_window(mod)))
    if padding is None:
        return None
    nd = len(_window(mod))
    # Flax takes any number of batch axes (found by review: two crashed in
    # lax, no layer named): folded into one, or one added where there is none
    batched = (x[None] if x.ndim == nd + 1
               else jax.numpy.reshape(x, (-1,) + tuple(x.shape[-nd - 1:])))
    spatial = "DHW"[-nd:]
    patches = jax.lax.conv_general_dilated_patches(
        batched, _window(mod), _tuple(mod.strides, nd), padding,
        lhs_dilation=_tuple(mod.input_dilation, nd), rhs_dilation=_tuple(mod.kernel_dilation, nd),
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    # Patch features come channel-major, (C, *window): see _kernel_input_axes.
    return jax.numpy.reshape(patches, (-1, patches.shape[-1]))


def _kernel_input_axes(mod, nn) -> tuple[int, ...]:
    """Dense (I, O): (0,); Conv (*window, I, O): (nd, 0, ..., nd - 1), the
    order of conv_general_dilated_patches' features."""
    if isinstance(mod, nn.Dense):
        return (0,)
    nd = len(_window(mod))
    return (nd,) + tuple(range(nd))


def _window(mod) -> tuple[int, ...]:
    """A Conv's kernel size as a tuple (linen takes an int for a 1-D
    convolution: found by review, len() of it failed)."""
    size = mod.kernel_size
    return (int(size),) if isinstance(size, int) else tuple(int(k) for k in size)


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
