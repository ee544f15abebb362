"""Rows a coding lost, restored as their means (jaxjpeg.row_fit), and the row sums
the encoder takes to find them (_native.encode_mapped_with_row_sums)."""

import io

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

import jaxjpeg
from jaxjpeg import _native, codec, mapping, rate, row_fit


def _spread_rows(seed=0, shape=(512, 512), sigma=3.0):
    """Rows whose scales spread over decades (log2 scale ~ N(0, sigma))."""
    rng = np.random.default_rng(seed)
    scales = np.exp2(rng.normal(0, sigma, (shape[0], 1)))
    return (rng.standard_normal(shape) * scales).astype(np.float32)


def _worst_row(x, y) -> float:
    """The largest of each row's error RMS over its RMS about its mean."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    error = ((x - y) ** 2).sum(axis=1)
    spread = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return float(np.sqrt(error / spread).max())


def _pillow_samples(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), np.float64)


@pytest.mark.parametrize("output", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_row_sums_are_those_of_the_samples_libjpeg_decodes(transposed, output):
    x = _spread_rows(1, (40, 70)) + 3.0
    _, scale, offset = mapping.row_affine(x, 8, clip="common", with_samples=False)
    table = codec.quant_table(bits=8, quant_step=6)
    weights = np.ascontiguousarray(x.T).T if transposed else x
    kept = np.zeros(x.shape, bool)
    kept[3, 5] = kept[10, :] = True
    data, starts, error, sums = _native.encode_mapped_with_row_sums(
        weights, scale, offset, table, 8, 4, x, None, kept, None, codec.output_type(output))
    plain = _native.encode_mapped_with_error(x, scale, offset, table, 8, 4, x, None, kept)
    assert bytes(data) == bytes(plain[0]) and error == plain[2]
    s = _pillow_samples(bytes(data)).astype(np.float32)
    written = (s * scale[:, None] + offset[:, None]).astype(output).astype(np.float64)
    centered = x.astype(np.float64) - row_fit.centers(scale, offset, 128)[:, None]
    w = np.where(kept, 0.0, centered)
    e = np.where(kept, 0.0, x - written)
    expected = np.stack([(~kept).sum(1), w.sum(1), (w ** 2).sum(1), (e ** 2).sum(1)], axis=1)
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=1e-12)
    assert not sums[10].any()


def test_row_sums_of_the_bands_asked_for_only():
    x = _spread_rows(7, (40, 30))
    _, scale, offset = mapping.row_affine(x, 8, clip="common", with_samples=False)
    table = codec.quant_table(bits=8, quant_step=5)
    every = _native.encode_mapped_with_row_sums(x, scale, offset, table, 8, 2)
    bands = np.array([0, 1, 0, 0, 1], np.uint8)   # rows 8-15 and 32-39
    some = _native.encode_mapped_with_row_sums(x, scale, offset, table, 8, 2, bands=bands)
    assert bytes(some[0]) == bytes(every[0])
    asked = np.repeat(bands.astype(bool), 8)
    np.testing.assert_array_equal(some[3][asked], every[3][asked])
    assert not some[3][~asked].any()
    with pytest.raises(ValueError, match="one value per row of 8 x 8 blocks"):
        _native.encode_mapped_with_row_sums(x, scale, offset, table, 8, 2, bands=bands[:4])
    with pytest.raises(TypeError):   # found by review: -1 and 300 had wrapped to 255 and 44
        _native.encode_mapped_with_row_sums(x, scale, offset, table, 8, 2,
                                            bands=np.array([-1, 300, 0, 0, 1]))


def test_row_sums_without_an_original_give_no_error():
    x = _spread_rows(2, (16, 24))
    _, scale, offset = mapping.row_affine(x, 8, clip="common", with_samples=False)
    data, _, error, sums = _native.encode_mapped_with_row_sums(
        x, scale, offset, codec.quant_table(bits=8, quant_step=4), 8, 0)
    assert error is None and sums.shape == (16, len(row_fit.SUMS))
    s = _pillow_samples(bytes(data)).astype(np.float32)
    written = (s * scale[:, None] + offset[:, None]).astype(np.float64)
    np.testing.assert_allclose(sums[:, row_fit.SUM_ERROR], ((x - written) ** 2).sum(1),
                               rtol=1e-12)


@pytest.mark.parametrize("shape", [(512, 512), (2048, 16)])   # the second: one shared map
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("rate_options", [{}, {"target_ratio": 8}, {"error_bound": 0.08}])
def test_quiet_rows_among_loud_ones_restore_within_twice_their_spread(tmp_path, shape, dtype,
                                                                      rate_options):
    # Found by review: rows 1,000x quieter than the loudest shared its blocks
    # and its coding noise, restored at up to 414 times their own RMS (4,461
    # in a narrow view).
    x = _spread_rows(0, shape).astype(dtype)
    path = tmp_path / "w.jjpg"
    jaxjpeg.save(path, {"w": x}, **rate_options)
    y = np.asarray(jaxjpeg.restore(path)["w"], np.float32)
    assert _worst_row(x.astype(np.float32), y) <= row_fit.LOST ** 0.5 * 1.001


def test_quiet_rows_beside_values_kept_exactly(tmp_path):
    x = _spread_rows(3)
    x[7, 11], x[300, 2] = 1e30, -np.inf   # a side list
    path = tmp_path / "w.jjpg"
    jaxjpeg.save(path, {"w": x})
    y = np.asarray(jaxjpeg.restore(path)["w"])
    assert y[7, 11] == x[7, 11] and y[300, 2] == x[300, 2]
    live = np.isfinite(x) & (np.abs(x) < 1e29)
    rows = live.all(axis=1)
    assert _worst_row(x[rows], y[rows]) <= row_fit.LOST ** 0.5 * 1.001


@pytest.mark.parametrize("rate_options", [{}, {"target_ratio": 8}])
def test_rows_of_neighbouring_float32_values_around_a_large_mean(tmp_path, rate_options):
    # Found by review: rows equal to 4096 but for some values one float32
    # step above (0.00049) kept their lost maps (161-664 times their RMS):
    # the spread cancelled in raw sums of squares, and no float16 mean, nor
    # the best float32 one, comes within 1/64 of the spread.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    rows = [10, 50, 100, 200]
    for r, fraction in zip(rows, (0.02, 0.1, 0.3, 0.5)):
        x[r] = 4096.0
        x[r, rng.random(256) < fraction] = np.nextafter(np.float32(4096), np.float32(5000))
    path = tmp_path / "w.jjpg"
    jaxjpeg.save(path, {"w": x}, **rate_options)
    y = np.asarray(jaxjpeg.restore(path)["w"])
    assert _worst_row(x[rows], y[rows]) < 1.5   # the best float32 constants: 1.01-1.40


@pytest.mark.parametrize("dtype,seed,mean_scale,log2_rms,rate_options", [
    (ml_dtypes.bfloat16, 1, 300, -2, {"target_ratio": 8}),
    (np.float16, 2, 300, -2, {}),
    (np.float32, 2, 1e6, -4, {"target_ratio": 8})])
def test_rows_spread_by_a_few_steps_of_their_dtype(tmp_path, dtype, seed, mean_scale, log2_rms,
                                                   rate_options):
    # Found by review: rows whose spread is an ulp or two at their mean came
    # back at 2.2-3.1 times it: the decoder's rounding to the leaf's dtype
    # (and float32's own) was left out of the rows' errors.
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 1, (512, 1)) * mean_scale
    rms = np.exp2(rng.normal(log2_rms, 3, (512, 1)))
    x = (mean + rng.standard_normal((512, 512)) * rms).astype(dtype)
    path = tmp_path / "w.jjpg"
    jaxjpeg.save(path, {"w": x}, **rate_options)
    y = np.asarray(jaxjpeg.restore(path)["w"])
    assert y.dtype == x.dtype
    x, y = x.astype(np.float64), y.astype(np.float64)
    varies = x.max(axis=1) > x.min(axis=1)
    assert _worst_row(x[varies], y[varies]) <= row_fit.LOST ** 0.5 * 1.001


def test_rows_of_one_value_keep_the_shared_map(tmp_path):
    # A (65536, 1) leaf's rows, each "lost" against its spread of 0, were
    # mapped to their means one by one: larger than raw.
    x = (0.02 * np.random.default_rng(5).standard_normal((65536, 1))).astype(np.float32)
    report = jaxjpeg.save(tmp_path / "t.jjpg", {"thin": x})
    assert report.leaves[0].stored_bytes < x.nbytes / 4


def test_a_measured_coding_reports_its_refitted_error():
    x = _spread_rows(4, (256, 256))
    p = rate.prepare_leaf(x)
    enc, error = rate.encode_measured(p, 8, 24)
    assert not np.all(enc.row_scale == enc.row_scale[0])   # some rows refitted
    assert error == pytest.approx(rate.squared_error(p, enc), rel=1e-12)


def test_codings_mixed_tile_by_tile_are_fitted_again():
    # A byte target lands between two steps by taking some tiles of the
    # finer coding: the rows' maps are fitted again to the tiles they end with.
    x = _spread_rows(8, (64, 2048))
    p = rate.prepare_leaf(x)
    coarse, fine = rate.encode_with_step(p, 12, 96), rate.encode_with_step(p, 12, 24)
    assert coarse.base_maps is not None and len(coarse.tiles) == 4
    left = (coarse.nbytes + fine.nbytes) // 2
    mixed = rate._mixed_tiles(coarse, fine, left, p)
    sources = {id(t) for t in fine.tiles}
    assert 0 < sum(id(t) in sources for t in mixed.tiles) < 4
    assert mixed.nbytes <= left
    y = codec.decode_tensor(mixed)
    assert _worst_row(x, y) <= row_fit.LOST ** 0.5 * 1.001


def test_rows_coded_well_keep_the_common_scale():
    x = (np.random.default_rng(5).standard_normal((256, 512)) * 0.02).astype(np.float32)
    enc = rate.encode_at_step(x, 0.004)
    assert np.all(enc.row_scale == enc.row_scale[0])
    np.testing.assert_array_equal(
        enc.row_scale, mapping.row_affine(x, enc.bits, clip="common", with_samples=False)[1])


def _sums(s, w, scale, offset, middle):
    """row_fit's sums of weights ``w`` decoded from samples ``s`` (float32)."""
    written = (np.float32(s) * scale[:, None] + offset[:, None]).astype(np.float64)
    c = np.asarray(w, np.float64) - row_fit.centers(scale, offset, middle)[:, None]
    return np.stack([np.full(len(c), c.shape[1]), c.sum(1), (c * c).sum(1),
                     ((np.asarray(w, np.float64) - written) ** 2).sum(1)], axis=1)


def test_rows_lost_map_to_their_means_and_others_keep_their_maps():
    rng = np.random.default_rng(6)
    samples = np.round(128 + 40 * rng.standard_normal((3, 64)))
    weights = np.stack([0.01 * (samples[0] - 128),              # coded well
                        1e-4 * rng.standard_normal(64),         # lost in noise
                        1e-4 * rng.standard_normal(64) + 3.0])  # lost, far from zero
    scale = np.full(3, 0.01, np.float32)
    offset = np.array([-1.28, -1.28, 1.72], np.float32)
    rows = np.ones(3, bool)
    sums = _sums(samples, weights, scale, offset, 128)
    new_scale, new_offset = row_fit.refitted(scale, offset, sums, rows, 128)
    assert new_scale[0] == scale[0] and new_offset[0] == offset[0]
    assert list(new_scale[1:]) == [0, 0]
    np.testing.assert_allclose(new_offset[1:], weights[1:].mean(axis=1), rtol=1e-6)
    untouched = row_fit.refitted(scale, offset, sums, np.zeros(3, bool), 128)
    assert untouched[0] is scale and untouched[1] is offset


def test_float16_maps_stay_float16_where_the_mean_rounds_well():
    rng = np.random.default_rng(9)
    samples = np.round(2048 + 600 * rng.standard_normal((2, 64)))
    weights = np.stack([1e-3 * rng.standard_normal(64),           # mean ~0: float16 is fine
                        1e-3 * rng.standard_normal(64) + 100.03])  # float16: 100.0 or 100.0625
    scale = np.full(2, 0.125, np.float32)
    offset = np.array([-256.0, -156.0], np.float32)   # float16 values
    new_scale, new_offset = row_fit.refitted(
        scale, offset, _sums(samples, weights, scale, offset, 2048), np.ones(2, bool), 2048)
    assert list(new_scale) == [0, 0]
    assert np.float16(new_offset[0]) == new_offset[0]
    assert np.float16(new_offset[1]) != new_offset[1]   # float32: its mean to float32 precision
    assert abs(new_offset[1] - weights[1].mean()) < 1e-5
