"""Calibration without data: inputs synthesized from a network's BatchNorm
running statistics (calibration.synthetic_inputs), and the damping their
covariances carry into error feedback."""

import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import calibration, feedback
from jaxjpeg.views import MatrixView

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(not train, momentum=0.0, name=name)
        x = nn.relu(bn("bn1")(nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)))
        x = nn.relu(bn("bn2")(nn.Conv(32, (3, 3), strides=2, use_bias=False, name="conv2")(x)))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def _smooth_images(rng, n, size=16):
    """Images with spatial and colour correlation, offset from zero."""
    noise = rng.standard_normal((n, size + 4, size + 4, 3))
    kernel = np.ones(5) / 5
    for axis in (1, 2):
        noise = np.apply_along_axis(np.convolve, axis, noise, kernel, "valid")
    return (0.4 + noise @ np.array([[1, 0.6, 0.3], [0.6, 1, 0.6], [0.3, 0.6, 1]])).astype(
        np.float32)


@pytest.fixture(scope="module")
def trained():
    """Net with running statistics of the smooth images (momentum 0: the
    statistics of the one batch it saw)."""
    rng = np.random.default_rng(3)
    images = _smooth_images(rng, 64)
    net = Net()
    variables = net.init(jax.random.PRNGKey(1), images[:1])
    _, updated = net.apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
    return net, jax.tree.map(np.asarray, variables), images


def _gaps(net, variables, x):
    """Per BatchNorm: mean |batch mean - running mean| and |log(batch sd / running sd)|."""
    seen = {}

    def grab(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            seen[context.module.name] = np.asarray(args[0]).reshape(-1, args[0].shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        net.apply(variables, x)
    out = {}
    for name, h in seen.items():
        stats = variables["batch_stats"][name]
        sd = np.sqrt(stats["var"] + 1e-5)
        out[name] = (np.mean(np.abs(h.mean(0) - stats["mean"]) / sd),
                     np.mean(np.abs(np.log(np.sqrt(h.var(0) + 1e-5) / sd))))
    return out


def test_synthetic_inputs_match_the_running_statistics(trained):
    """Noise misses each BatchNorm's running moments by a lot; the synthetic
    batch meets them about as closely as the data they came from would."""
    net, variables, _ = trained
    shape = (16, 16, 16, 3)
    x = calibration.synthetic_inputs(net, variables, shape, steps=120)
    assert x.shape == shape and x.dtype == np.float32 and np.isfinite(x).all()
    noise = _gaps(net, variables, np.random.default_rng(0).standard_normal(shape))
    got = _gaps(net, variables, x)
    for name in ("bn1", "bn2"):
        assert got[name][0] < 0.1 and got[name][1] < 0.1, (name, got, noise)
        assert sum(noise[name]) > 5 * sum(got[name]), (name, got, noise)


def test_synthetic_inputs_are_deterministic_per_seed(trained):
    net, variables, _ = trained
    a = calibration.synthetic_inputs(net, variables, (4, 8, 8, 3), steps=5, seed=2)
    b = calibration.synthetic_inputs(net, variables, (4, 8, 8, 3), steps=5, seed=2)
    c = calibration.synthetic_inputs(net, variables, (4, 8, 8, 3), steps=5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_network_without_batchnorm_is_refused():
    dense = nn.Dense(4)
    variables = dense.init(jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="no BatchNorm"):
        calibration.synthetic_inputs(dense, variables, (8, 3), steps=2)


def test_non_finite_running_statistics_are_an_error_not_nan_inputs(trained):
    net, variables, _ = trained
    broken = jax.tree.map(np.array, variables)
    broken["batch_stats"]["bn2"]["var"][3] = np.nan
    with pytest.raises(ValueError, match="diverged"):
        calibration.synthetic_inputs(net, broken, (2, 8, 8, 3), steps=3)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(learning_rate=0.0),
                                    dict(scale=-1.0), dict(learning_rate=float("nan"))])
def test_bad_synthesis_settings_are_refused(trained, kwargs):
    net, variables, _ = trained
    with pytest.raises(ValueError, match="synthesis needs"):
        calibration.synthetic_inputs(net, variables, (2, 8, 8, 3), **kwargs)


def test_nnx_synthetic_inputs_match_the_running_statistics(trained):
    """The same network as an NNX model, its weights copied: the synthetic
    batch meets the linen network's running moments."""
    from flax import nnx

    net, variables, _ = trained

    class NnxNet(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))
            return self.head(x.mean((1, 2)))

    model = NnxNet(nnx.Rngs(0))
    params, stats = variables["params"], variables["batch_stats"]
    for name in ("conv1", "conv2", "head"):
        for key, value in params[name].items():
            getattr(model, name).__getattribute__(key)[...] = value
    for name in ("bn1", "bn2"):
        bn = getattr(model, name)
        bn.scale[...], bn.bias[...] = params[name]["scale"], params[name]["bias"]
        bn.mean[...], bn.var[...] = stats[name]["mean"], stats[name]["var"]
    x = calibration.nnx_synthetic_inputs(model, (16, 16, 16, 3), steps=120)
    got = _gaps(net, variables, x)
    for name in ("bn1", "bn2"):
        assert got[name][0] < 0.1 and got[name][1] < 0.1, (name, got)


def test_synthetic_covariances_carry_their_damping_into_feedback(trained):
    """input_covariances(damping=) marks each covariance; feedback's factor
    inverts H plus that fraction of its mean diagonal, not the measured
    data's CALIBRATION_DAMPING."""
    net, variables, _ = trained
    x = calibration.synthetic_inputs(net, variables, (8, 16, 16, 3), steps=20)
    covs = calibration.input_covariances(net, variables, [x], damping=feedback.SYNTHETIC_DAMPING)
    assert {c.damping for c in covs.values()} == {feedback.SYNTHETIC_DAMPING}
    measured = calibration.input_covariances(net, variables, [x])
    assert {c.damping for c in measured.values()} == {None}
    cov = covs["params/conv2/kernel"]
    kernel = variables["params"]["conv2"]["kernel"]
    fb = feedback.for_view(cov, kernel.shape, MatrixView((3, 0, 1, 2), 1))
    h = fb.matrix   # in the view's order of the inputs
    unit = np.ones(len(h))
    upper, order = fb.upper(unit), fb.order(unit)
    for damping, expect_identity in ((feedback.SYNTHETIC_DAMPING, True),
                                     (feedback.CALIBRATION_DAMPING, False)):
        damped = (h + damping * np.mean(np.diag(h)) * np.eye(len(h)))[np.ix_(order, order)]
        product = upper.T @ upper @ damped
        assert np.allclose(product, np.eye(len(h)), atol=1e-8) == expect_identity


@pytest.mark.parametrize("damping", [-0.5, float("inf"), float("nan")])
def test_a_bad_damping_is_refused(damping):
    with pytest.raises(ValueError, match="damping"):
        feedback.InputCovariance(np.eye(3), (1,), damping)


def test_a_synthetically_calibrated_save_restores(trained, tmp_path):
    """Synthetic covariances and means go through a byte-targeted save."""
    net, variables, _ = trained
    x = calibration.synthetic_inputs(net, variables, (16, 16, 16, 3), steps=60)
    covs = calibration.input_covariances(net, variables, [x], damping=feedback.SYNTHETIC_DAMPING)
    means = calibration.input_means(net, variables, [x])
    report = jaxjpeg.save(tmp_path / "s.jjpg", variables, target_ratio=6, progress=False,
                          policy=jaxjpeg.Policy(min_size=256), input_covariance=covs,
                          input_mean=means)
    assert 5 < report.ratio_vs_float32 < 6.5   # a 23 KB tree: headers weigh
    restored = jaxjpeg.restore(tmp_path / "s.jjpg")
    kernel = variables["params"]["conv2"]["kernel"]
    got = np.asarray(restored["params"]["conv2"]["kernel"])
    assert got.shape == kernel.shape
    assert 0 < np.sqrt(np.mean((got - kernel) ** 2) / np.mean(kernel ** 2)) < 0.5


def test_calibration_helpers_on_1d_convs_keyword_inputs_and_transforms():
    """Found by review: a linen Conv with an int kernel_size (1-D) failed
    (len() of an int); a Dense called as Dense(4)(inputs=x) was left out
    silently; a layer under nn.scan / nn.remat failed with jax's
    TracerArrayConversionError naming no layer."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class OneD(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, kernel_size=3)(x)
            return nn.Dense(4)(inputs=x.mean(1))

    x = np.random.default_rng(0).standard_normal((2, 16, 4)).astype(np.float32)
    variables = OneD().init(jax.random.PRNGKey(0), x)
    covs = calibration.input_covariances(OneD(), variables, [x])
    means = calibration.input_means(OneD(), variables, [x])
    assert set(covs) == set(means) == {"params/Conv_0/kernel", "params/Dense_0/kernel"}
    assert covs["params/Conv_0/kernel"].matrix.shape == (12, 12)   # 3 taps x 4 channels

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(nn.Dense)(4)(x)

    variables = Remat().init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="runs under a jax transform"):
        calibration.input_covariances(Remat(), variables, [np.ones((2, 3), np.float32)])


def test_nnx_calibration_runs_in_inference_mode_and_leaves_the_model_as_it_was():
    """Found by review: an NNX model in training mode (nnx's default) had
    its running statistics moved and dropout applied while recording; layers
    under nnx.remat were left out without a word."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 16, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):   # a keyword input (found by review: it failed)
            return self.out(inputs=self.drop(nnx.relu(self.bn(self.fc(x)))))

    model = Net(nnx.Rngs(0))
    assert model.bn.use_running_average is False   # training mode
    before = np.asarray(model.bn.mean[...]).copy()
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32) + 3
    first = calibration.nnx_input_covariances(model, [x])["out/kernel/value"].matrix
    again = calibration.nnx_input_covariances(model, [x])["out/kernel/value"].matrix
    np.testing.assert_array_equal(first, again)            # no dropout drawn
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), before)
    assert model.bn.use_running_average is False and model.drop.deterministic is False

    class Flagged(nnx.Module):   # a read-only flag and an eval() of its own (review)
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 4, rngs=rngs)

        @property
        def deterministic(self):
            return True

        def eval(self, x):
            return self(x)

        def __call__(self, x):
            return self.fc(x)

    assert list(calibration.nnx_input_covariances(Flagged(nnx.Rngs(0)), [np.ones((2, 3))])) == [
        "fc/kernel/value"]

    class Remat(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            return nnx.remat(lambda m, x: m(x))(self.fc, x)

    with pytest.warns(UserWarning, match="ran outside the model's own modules"):
        assert calibration.nnx_input_covariances(Remat(nnx.Rngs(0)), [np.ones((2, 3))]) == {}


def test_nnx_flags_from_getattr_are_left_to_it():
    """Found by review: a flag __getattr__ gave (from a config) was set on
    the module and left there frozen at its old value after calibration."""
    from flax import nnx

    class Config:
        deterministic = False

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 4, rngs=rngs)

        def __getattr__(self, name):
            if name == "deterministic":
                return Config.deterministic
            raise AttributeError(name)

        def __call__(self, x):
            return self.fc(x)

    model = Net(nnx.Rngs(0))
    calibration.nnx_input_covariances(model, [np.ones((2, 3), np.float32)])
    assert "deterministic" not in vars(model)
    Config.deterministic = True
    assert model.deterministic is True
