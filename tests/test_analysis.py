"""The save path's native kernels against numpy references: one-pass leaf
statistics (_native.matrix_stats, jaxjpeg.analysis) and the encoder that maps
weights to samples itself (_native.encode_mapped)."""

import math

import ml_dtypes
import numpy as np
import pytest

from jaxjpeg import _native, analysis, checkpoint, codec, mapping, rate, views


def _laplace(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=shape).astype(np.float32)
    if len(shape) >= 2:   # slices of different scales, as trained kernels have
        x *= np.exp(rng.normal(0, 0.7, shape[-1])).astype(np.float32)
    return x


def _check_stats(stats, x, axis):
    total, squares, low, high = stats
    np.testing.assert_allclose(total, x.sum(axis=axis, dtype=np.float64), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(squares, np.square(x, dtype=np.float64).sum(axis=axis),
                               rtol=1e-12)
    np.testing.assert_array_equal(low, x.min(axis=axis))
    np.testing.assert_array_equal(high, x.max(axis=axis))
    assert low.dtype == high.dtype == np.float32 and total.dtype == np.float64


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 4), (9, 1031), (256, 3)])
def test_matrix_stats_match_numpy(shape):
    x = _laplace(shape, seed=shape[1])
    special, rows, cols = _native.matrix_stats(x, 1e30)
    assert special == 0
    _check_stats(rows, x, 1)
    _check_stats(cols, x, 0)


@pytest.mark.parametrize("shape", [(1, 3), (2, 4), (7, 9), (64, 768), (33, 1030)])
def test_matrix_stats_give_the_same_bits_with_and_without_avx2(shape):
    x = _laplace(shape, seed=shape[0])
    x.reshape(-1)[::97] = np.nan
    x.reshape(-1)[5::89] = 3e30
    wide, portable = _native.matrix_stats(x, 1e30), _native.matrix_stats(x, 1e30, avx2=False)
    assert wide[0] == portable[0] > 0
    for got, want in zip(wide[1] + wide[2], portable[1] + portable[2]):
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13])
@pytest.mark.parametrize("avx2", [True, False])
def test_matrix_stats_sum_columns_row_after_row(rows, avx2):
    """Column sums (and sums of squares) in float64, bit for bit those of
    adding the rows one after another, however many rows the kernel takes at
    once: maps computed from them, and so the file's bytes, must not depend
    on it."""
    x = _laplace((rows, 37), seed=rows)
    _, _, (total, squares, _, _) = _native.matrix_stats(x, 1e30, avx2=avx2)
    want_total, want_squares = np.zeros(37), np.zeros(37)
    for row in x.astype(np.float64):
        want_total += row
        want_squares += row * row
    assert total.tobytes() == want_total.tobytes()
    assert squares.tobytes() == want_squares.tobytes()


def test_matrix_stats_read_rows_of_a_larger_matrix_and_count_special_values():
    big = _laplace((40, 50))
    big[3, 7], big[5, 2], big[9, 30], big[12, 12] = np.nan, np.inf, -3e4, 2e4
    big[30, 5] = np.nan   # outside the tile
    tile = big[2:20, 1:45]   # rows contiguous, a stride of 50
    special, rows, cols = _native.matrix_stats(tile, 1e4)
    assert special == 4
    clean = [r for r in range(tile.shape[0]) if np.all(np.abs(tile[r]) <= 1e4)]
    _check_stats([a[clean] for a in rows], tile[clean], 1)


@pytest.mark.parametrize("bad", [np.zeros(5, np.float32), np.zeros((4, 4)),
                                 np.zeros((4, 8), np.float32)[:, ::2],
                                 np.zeros((4, 8), np.float32)[::-1]])
def test_matrix_stats_refuse_what_they_cannot_read(bad):
    with pytest.raises(ValueError):
        _native.matrix_stats(bad, 1e30)


@pytest.mark.parametrize("bits,step", [(8, 8), (8, 30), (12, 119), (12, 3)])
@pytest.mark.parametrize("shape", [(64, 64), (37, 83), (1, 5), (512, 40)])
def test_encode_mapped_writes_the_bytes_of_encode_of_to_samples(bits, step, shape):
    matrix = _laplace((shape[0] + 3, shape[1] + 5), seed=bits + step)
    tile = matrix[2:2 + shape[0], 4:4 + shape[1]]   # a strided slice, as save passes it
    p = codec.prepare(np.ascontiguousarray(tile))
    _, scale, offset = mapping.row_affine(p.matrix, bits, clip="common",
                                          scale=p.common_scale(bits), stats=p.row_stats(),
                                          with_samples=False)
    scale[0] = 0.0   # a constant row's map divides by 1
    table = np.full(64, step, np.uint16)
    expected = _native.encode(mapping.to_samples(tile, scale, offset, bits), table, bits=bits,
                              restart_interval=8, with_intervals=True)
    got = _native.encode_mapped(tile, scale, offset, table, bits=bits, restart_interval=8,
                                with_intervals=True)
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("shape", [(64, 64), (37, 83), (1, 5), (5, 1), (512, 40)])
def test_encode_mapped_reads_a_transposed_tile_as_its_copy(shape):
    """A slice of a C-order matrix's transpose (columns contiguous: a leaf
    whose view puts its last axis on rows) codes to its copy's bytes."""
    source = _laplace((shape[1] + 5, shape[0] + 3), seed=shape[0])
    tile = source.T[2:2 + shape[0], 4:4 + shape[1]]
    assert min(shape) == 1 or not tile.flags.c_contiguous
    copy = np.ascontiguousarray(tile)
    p = codec.prepare(copy)
    _, scale, offset = mapping.row_affine(p.matrix, 12, clip="common", scale=p.common_scale(12),
                                          stats=p.row_stats(), with_samples=False)
    table = np.full(64, 100, np.uint16)
    expected = _native.encode_mapped(copy, scale, offset, table, bits=12, restart_interval=8,
                                     with_intervals=True)
    assert codec.encodable(tile) is tile   # no copy on the way
    got = _native.encode_mapped(tile, scale, offset, table, bits=12, restart_interval=8,
                                with_intervals=True)
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])


def test_encode_mapped_refuses_bad_arguments():
    w = np.zeros((16, 16), np.float32)
    ones, table = np.ones(16, np.float32), np.full(64, 4, np.uint16)
    with pytest.raises(ValueError, match="one value per row"):
        _native.encode_mapped(w, ones[:5], ones, table)
    with pytest.raises(ValueError, match="float32"):
        _native.encode_mapped(w.astype(np.float64), ones, ones, table)
    with pytest.raises(ValueError, match="contiguous"):
        _native.encode_mapped(np.zeros((16, 32), np.float32)[:, ::2], ones, ones, table)
    with pytest.raises(ValueError, match="bits must be 8 or 12, got 10"):
        _native.encode_mapped(w, ones, ones, table, bits=10)
    with pytest.raises(_native.JpegError):
        _native.encode_mapped(np.zeros((16, 0), np.float32), ones, ones, table)


def _full_analysis(x, view="auto"):
    """rate.prepare_leaf's numpy path (the one-pass path declining)."""
    plain = analysis.prepare_plain
    analysis.prepare_plain = lambda *args: None
    try:
        return rate.prepare_leaf(x, view=view)
    finally:
        analysis.prepare_plain = plain


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (3, 3, 16, 32), (32, 16, 3, 3),
                                   (5, 7, 9), (300,), (2, 3)])
@pytest.mark.parametrize("view", ["auto", "framework"])
def test_one_pass_analysis_chooses_what_the_full_one_does(shape, view):
    x = _laplace(shape, seed=len(shape))
    fast = analysis.prepare_plain(x, view)
    full = _full_analysis(x, view)
    assert fast is not None
    assert fast.view == full.view and fast.shared_map == full.shared_map
    assert fast.outliers is None and full.outliers is None
    np.testing.assert_array_equal(fast.matrix, full.matrix)
    for got, want in zip(fast.row_stats(), full.row_stats()):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    for bits in (8, 12):
        np.testing.assert_array_equal(fast.common_scale(bits), full.common_scale(bits))
    assert rate.tensor_rms(fast) == pytest.approx(rate.tensor_rms(full), rel=1e-12)


def test_one_pass_analysis_is_what_a_default_save_uses():
    x = _laplace((64, 48))   # its columns differ in scale: they become the view's rows
    flipped = np.ascontiguousarray(x.T)   # the same weights, the identity view
    for leaf, perm in ((x, (1, 0)), (flipped, (0, 1))):
        p = rate.prepare_leaf(leaf)
        assert "squares" in p.scales   # from analysis.prepare_plain
        assert p.view.perm == perm
        assert np.shares_memory(p.matrix, leaf)   # the view itself, not a copy


@pytest.mark.parametrize("shape", [(96, 40), (3, 3, 16, 32), (300,)])
def test_a_checked_view_prepares_the_same_leaf(shape):
    """A byte target's second prepare of a leaf the one pass took (its view
    given as checked): the same view, matrix and statistics, without the
    checks; a view whose rows the native pass does not read is declined."""
    x = _laplace(shape, seed=len(shape))
    first = analysis.prepare_plain(x, "auto")
    again = analysis.prepare_plain(x, "auto", checked=first.view)
    assert again.view == first.view and again.shared_map == first.shared_map
    np.testing.assert_array_equal(again.matrix, first.matrix)
    for got, want in zip(again.row_stats(), first.row_stats()):
        np.testing.assert_array_equal(got, want)
    assert again.scales["squares"] == first.scales["squares"]
    if x.ndim == 4:   # rows mixing axes otherwise than the flat rows
        odd = views.MatrixView((1, 3, 0, 2), 2)
        assert analysis.prepare_plain(x, "auto", checked=odd) is None


def test_one_pass_analysis_leaves_special_and_far_values_to_the_full_one():
    x = _laplace((400, 48))   # rows of 400 (a value can lie 12 RMS out only in rows of > 145)
    nan = x.copy()
    nan[3, 4] = np.nan
    assert analysis.prepare_plain(nan, "auto") is None
    huge = x.copy()
    huge[3, 4] = 1e31
    assert analysis.prepare_plain(huge, "auto") is None
    far = x.copy()
    far[3, 4] = 100 * np.abs(x).max()
    assert analysis.prepare_plain(far, "auto") is None
    p = rate.prepare_leaf(far)   # the full path keeps it in the side list
    assert p.outliers is not None and p.outliers.count == 1
    # a row of large mean and tiny spread: the sums cannot tell, the full path decides
    offset = x.copy()
    offset[:, 5] = 1000 + 1e-3 * x[:, 5]
    assert analysis.prepare_plain(offset, "auto") is None


def test_one_pass_analysis_of_bfloat16_and_non_contiguous_leaves():
    x = _laplace((64, 48))
    half = x.astype(ml_dtypes.bfloat16)
    fast = analysis.prepare_plain(half, "auto")
    assert fast is not None and fast.dtype == "bfloat16" and fast.original is half
    np.testing.assert_array_equal(fast.matrix, _full_analysis(half).matrix)
    strided = np.zeros((64, 96), np.float32)[:, ::2]
    strided[:] = x
    fast = analysis.prepare_plain(strided, "auto")   # astype leaves it strided: full path
    assert fast is None
    assert rate.prepare_leaf(strided).view == _full_analysis(strided).view


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_count_special_counts_what_views_counts(dtype):
    x = _laplace((40, 24)).astype(dtype)
    x[1, 2], x[3, 4], x[5, 6] = np.nan, np.inf, -np.inf
    x[7, 8] = 3e4 if dtype == np.float16 else 1e31 if dtype == np.float32 else 3e38
    for leaf in (x, x[:, ::2], x[0, 0], x.reshape(-1)):   # strided and 0-d: numpy path
        assert analysis.count_special(leaf) == views.count_special(leaf)


def test_preparing_a_leaf_just_counted_takes_the_counts_pass(monkeypatch):
    x = _laplace((64, 48))
    passes = []
    real = _native.matrix_stats
    monkeypatch.setattr(_native, "matrix_stats", lambda *a: passes.append(1) or real(*a))
    assert analysis.count_special(x) == 0
    p = analysis.prepare_plain(x, "auto")
    assert len(passes) == 1   # one pass over the leaf for both
    q = analysis.prepare_plain(x, "auto")   # taken once: a later call reads the leaf again
    assert len(passes) == 2
    assert p.view == q.view and p.scales["squares"] == q.scales["squares"]
    analysis.count_special(x)
    analysis.prepare_plain(x.copy(), "auto")   # another array: its own pass
    assert len(passes) == 4


def test_constant_leaves_take_the_one_pass_path():
    p = analysis.prepare_plain(np.full((32, 16), 0.5, np.float32), "auto")
    assert p is not None and p.outliers is None
    assert np.all(p.common_scale(8) == 0)


def test_native_kernels_take_float32_of_any_dtype_object_and_refuse_big_endian():
    x = _laplace((16, 24)).astype(">f4")
    native = x.astype(x.dtype.newbyteorder("="))   # equal to float32, not numpy's own object
    special, rows, _ = _native.matrix_stats(native, 1e30)
    np.testing.assert_array_equal(rows[3], native.max(axis=1))
    ones, table = np.ones(16, np.float32), np.full(64, 4, np.uint16)
    assert _native.encode_mapped(native, ones, 0 * ones, table) == \
        _native.encode_mapped(native.astype(np.float32), ones, 0 * ones, table)
    with pytest.raises(ValueError, match="float32"):
        _native.matrix_stats(x, 1e30)


def _numpy_peak(fn):
    """The most memory numpy held at once during ``fn()`` beyond what it held before."""
    import tracemalloc

    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_suspect_rows_are_read_a_block_at_a_time():
    """Found by review: the rows a far value may hide in (most rows of
    heavy-tailed weights) were read all at once, six leaf-sized temporaries,
    and a default save of a 1 GB CNN held 13 of its 38 MB leaves."""
    m = np.random.default_rng(0).laplace(0, 1, (2048, 2048)).astype(np.float32)
    suspect = np.arange(m.shape[0])
    assert not analysis.hide_far_values(m, suspect)
    assert _numpy_peak(lambda: analysis.hide_far_values(m, suspect)) < 0.25 * m.nbytes


def test_importance_broadcast_over_a_kernel_is_summed_in_place():
    """Found by review: the BatchNorm prior's input powers, broadcast over a
    kernel, became a leaf-sized float64 matrix and a second one divided by
    its row means (two of them per leaf coded at once)."""
    shape = (3, 3, 512, 512)
    importance = np.random.default_rng(1).uniform(0.5, 2, (1, 1, 512, 1))
    view = views.MatrixView((3, 0, 1, 2), 1)
    u, v = rate._separable_weights(view, shape, importance)
    full = view.to_matrix(np.broadcast_to(importance, shape)).astype(np.float64)
    want_u = rate._damped(full.mean(axis=1))
    np.testing.assert_allclose(u, want_u, rtol=1e-12)
    want_v = rate._damped((full / want_u[:, None]).mean(axis=0))
    if v is not None:
        np.testing.assert_allclose(v, want_v, rtol=1e-12)
    peak = _numpy_peak(lambda: rate._separable_weights(view, shape, importance))
    assert peak < 0.05 * math.prod(shape) * 8


def test_the_bulk_check_reads_a_leaf_a_block_at_a_time():
    """Measured: the check that a coded leaf's bulk was not lost read 2^20
    values at a time: a 4 MiB leaf whole, in five temporaries of its size or
    twice it, the peak of a 1 GB tree's default save (29 of 38 MiB)."""
    rng = np.random.default_rng(4)
    x = (0.05 * rng.standard_normal((2048, 1024))).astype(np.float32)
    x.reshape(-1)[rng.choice(x.size, x.size // 10, replace=False)] = 2.5   # gets it decoded
    decoded = np.zeros_like(x)
    assert checkpoint._bulk_lost_in("w", x, lambda: decoded) is not None   # zeros: lost
    assert _numpy_peak(lambda: checkpoint._bulk_lost_in("w", x, lambda: decoded)) < 0.35 * x.nbytes


@pytest.mark.parametrize("other_at", [0, -1])
def test_a_leaf_of_one_value_is_found_a_block_at_a_time(other_at):
    """Measured: the test for a quantized leaf of one value compared the
    whole leaf at once, a bool array of its size: 8 MiB of a 32 MiB leaf's
    save at target_ratio=2, a sixth of the save's peak."""
    from jaxjpeg import quantized_vectors as qv

    x = np.full(1 << 21, 0.25, np.float32)
    blob, record = qv.encode(x, qv.VectorStep(0.01))
    assert checkpoint._constant_restored(x, blob, record)
    x[other_at] = -0.5   # another value first (found at once) or last (every block read)
    blob, record = qv.encode(x, qv.VectorStep(0.01))
    assert not checkpoint._constant_restored(x, blob, record)
    assert _numpy_peak(lambda: checkpoint._constant_restored(x, blob, record)) < 0.05 * x.nbytes
    assert checkpoint._holds_one_value(np.array([0.0, -0.0]))   # as == compares them
    assert not checkpoint._holds_one_value(np.array([np.nan, np.nan]))
