"""Tests for the competitor quantizers in benchmarks/baselines.py."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BASELINES_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"


def load_baselines():
    """Import benchmarks/baselines.py by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("jaxjpeg_bench_baselines", BASELINES_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bl = load_baselines()


def weights(shape, seed=0, scale=0.05):
    """Return float32 Gaussian weights with a few outliers, like trained layers."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, scale, size=shape).astype(np.float32)
    w.reshape(-1)[rng.choice(w.size, size=max(1, w.size // 500), replace=False)] *= 8
    return w


def slack(x):
    """Float32 rounding allowance for bounds derived in exact arithmetic."""
    return 1e-6 * np.abs(x).max() + 1e-12


@pytest.mark.parametrize("shape", [(256, 64), (3, 3, 16, 32), (100, 7)])
def test_int8_error_within_half_step(shape):
    w = weights(shape)
    w_hat, bits = bl.int8_per_channel(w)
    m = bl.as_matrix(w)
    scale = np.abs(m).max(axis=0) / 127.0
    err = np.abs(bl.as_matrix(w_hat) - m)
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    assert np.all(err <= scale / 2 + slack(m))
    assert bits == 8 * w.size + 32 * m.shape[1]


def test_int8_exact_on_grid_and_zero_columns():
    w = np.zeros((8, 4), np.float32)
    w[:, 1] = np.arange(-127, 127, 32)[:8] * 0.01
    w[0, 1] = 1.27
    w_hat, _ = bl.int8_per_channel(w)
    np.testing.assert_allclose(w_hat, w, atol=1e-6)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("shape", [(512, 48), (300, 10), (3, 3, 16, 8)])
def test_int4_error_within_half_step(group, shape):
    w = weights(shape, seed=group)
    w_hat, bits = bl.int4_group(w, group)
    m = bl.as_matrix(w)
    rows, cols = m.shape
    groups = -(-rows // group)
    err = np.abs(bl.as_matrix(w_hat) - m)
    for g in range(groups):
        block = m[g * group:(g + 1) * group]
        low = bl.float16_down(block.min(axis=0))
        scale = bl.float16_up((block.max(axis=0) - low) / 15)
        assert np.all(err[g * group:(g + 1) * group] <= scale / 2 + slack(block))
    assert bits == 4 * w.size + 32 * groups * cols


def test_int4_levels_and_stored_values_are_float16():
    w = weights((64, 16))
    m = bl.as_matrix(w)
    low, scale = bl.group_min_scale(m[:32].min(0), m[:32].max(0))
    assert np.all(low.astype(np.float16).astype(np.float32) == low)
    assert np.all(scale.astype(np.float16).astype(np.float32) == scale)
    assert np.all(low <= m[:32].min(0)) and np.all(low + 15 * scale >= m[:32].max(0) * (1 - 1e-6))
    w_hat, _ = bl.int4_g32(w)
    assert all(len(np.unique(w_hat[:32, c])) <= 16 for c in range(16))


def test_int4_constant_group_is_exact_for_float16_values():
    w = np.full((64, 4), 0.25, np.float32)
    w_hat, _ = bl.int4_g32(w)
    np.testing.assert_array_equal(w_hat, w)


def test_naive_jpeg_error_decreases_with_quality():
    w = weights((256, 256))
    errors = []
    for quality in (25, 50, 75, 90, 100):
        w_hat, bits = bl.naive_jpeg(w, quality)
        assert w_hat.shape == w.shape and w_hat.dtype == np.float32
        assert bits % 8 == 0 and bits > 64
        errors.append(float(np.sqrt(np.mean((w_hat - w) ** 2))))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0] / 3


def test_naive_jpeg_bits_count_file_bytes_and_range():
    """Checked without recomputing naive_jpeg: values lie on the 256-level grid
    of the tensor's own min..max, bits are whole bytes plus the 64 bits of min
    and max, and two copies side by side (one image, its rows twice as long)
    cost more than one copy and less than two files' worth."""
    w = weights((64, 64))
    w_hat, bits = bl.naive_jpeg(w, 75)
    low, high = np.float32(w.min()), np.float32(w.max())
    levels = (w_hat.astype(np.float64) - low) / ((float(high) - float(low)) / 255)
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
    assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3
    assert (bits - 64) % 8 == 0 and bits > 64
    _, bits_two = bl.naive_jpeg(np.concatenate([w, w], axis=1), 75)
    assert bits - 64 < bits_two - 64 < 2 * (bits - 64)  # one header, not two


def test_naive_jpeg_stays_within_range_and_streams_are_jpeg():
    w = weights((40, 24))
    w_hat, _ = bl.naive_jpeg(w, 50)
    assert w_hat.min() >= w.min() - slack(w) and w_hat.max() <= w.max() + slack(w)
    data = bl.jpeg_encode(np.zeros((8, 8), np.uint8), 50)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def test_tile_slices_cover_with_bounded_tiles():
    tiles = list(bl.tile_slices((130000, 5), side=65500))
    assert [(r.start, min(r.stop, 130000)) for r, _ in tiles] == [(0, 65500), (65500, 130000)]


def test_apply_to_tree_counts():
    params = {
        "dense": {"kernel": weights((128, 64)), "bias": np.zeros(64, np.float32)},
        "small": {"kernel": weights((16, 16))},
        "conv": {"kernel": weights((3, 3, 32, 64))},
        "step": np.zeros((), np.int32),
    }
    new, bits, count = bl.apply_to_tree(params, bl.int8_per_channel)
    assert count == 128 * 64 + 64 + 256 + 3 * 3 * 32 * 64 + 1
    expected = (8 * 128 * 64 + 32 * 64) + 32 * 64 + 32 * 256 + (8 * 18432 + 32 * 64) + 32
    assert bits == expected
    np.testing.assert_array_equal(new["small"]["kernel"], params["small"]["kernel"])
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    assert new["conv"]["kernel"].shape == (3, 3, 32, 64)
    assert not np.array_equal(new["dense"]["kernel"], params["dense"]["kernel"])
    assert new["step"].dtype == np.int32


def test_apply_to_tree_custom_policy_keeps_everything():
    params = {"w": weights((128, 64))}
    new, bits, count = bl.apply_to_tree(params, bl.int4_g32, policy=lambda path, leaf: False)
    np.testing.assert_array_equal(new["w"], params["w"])
    assert bits == 32 * count


@pytest.mark.parametrize("name", sorted(bl.QUANTIZERS))
def test_every_registered_quantizer_runs(name):
    w = weights((96, 40))
    w_hat, bits = bl.QUANTIZERS[name](w)
    assert w_hat.shape == w.shape and 0 < bits < 32 * w.size
    assert np.sqrt(np.mean((w_hat - w) ** 2)) < w.std()
