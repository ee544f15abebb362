"""jaxjpeg.codec: tensors to JPEG tiles and back."""

import ml_dtypes
import numpy as np
import pytest
from PIL import Image
import io
import warnings
import zlib

import jaxjpeg
from jaxjpeg import _native, codec, mapping


def _gauss(shape, seed=0, scale=0.05):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_matrix_shape_rule():
    assert codec.matrix_shape(()) == (1, 1)
    assert codec.matrix_shape((7,)) == (1, 7)
    assert codec.matrix_shape((3, 3, 16, 32)) == (3 * 3 * 16, 32)


@pytest.mark.parametrize("shape", [(1,), (7, 9), (3, 3, 8, 16), (17, 1031), (65, 4096), (2, 3, 4, 5, 6)])
def test_round_trip_error_is_bounded(shape):
    x = _gauss(shape)
    enc = jaxjpeg.encode_tensor(x, quant_step=2, bits=12)
    y = jaxjpeg.decode_tensor(enc)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.linalg.norm(y - x) <= 0.003 * np.linalg.norm(x)  # measured <= 0.0015


def test_arrays_beyond_jpeg_limit_are_split_into_tiles():
    x = _gauss((2, 70_000))
    enc = jaxjpeg.encode_tensor(x, quant_step=4, tile_shape=(65535, 65535))
    assert len(enc.tiles) == 2
    assert max(t.width for t in enc.tiles) <= 65535
    y = jaxjpeg.decode_tensor(enc)
    assert np.linalg.norm(y - x) <= 0.05 * np.linalg.norm(x)


def test_every_tile_is_a_standard_jpeg_that_pillow_decodes_to_our_samples():
    enc = jaxjpeg.encode_tensor(_gauss((100, 300)), quant_step=3, tile_shape=(64, 128))
    for tile in enc.tiles:
        ours = _native.decode_samples(tile.data)
        theirs = np.asarray(Image.open(io.BytesIO(tile.data)))
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_output_dtypes_round_the_float32_result(dtype):
    enc = jaxjpeg.encode_tensor(_gauss((40, 50)), quant_step=3)
    f32 = jaxjpeg.decode_tensor(enc)
    out = jaxjpeg.decode_tensor(enc, dtype)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, f32.astype(dtype))


def test_bfloat16_and_float16_inputs_are_first_class():
    for dtype in (ml_dtypes.bfloat16, np.float16):
        x = _gauss((64, 64)).astype(dtype)
        enc = jaxjpeg.encode_tensor(x, quant_step=2, bits=12)
        assert enc.dtype == np.dtype(dtype).name
        y = jaxjpeg.decode_tensor(enc, dtype)
        err = np.linalg.norm(y.astype(np.float32) - x.astype(np.float32))
        assert err <= 0.003 * np.linalg.norm(x.astype(np.float32))  # measured 0.0011-0.0012


def test_non_negative_tensors_decode_non_negative():
    """Optimizer second moments must never come back negative."""
    x = np.abs(_gauss((64, 256))) ** 2
    x[:, :5] = 0.0
    enc = jaxjpeg.encode_tensor(x, quant_step=16)
    assert jaxjpeg.decode_tensor(enc).min() >= 0.0


def test_decode_uses_all_restart_intervals_and_matches_single_thread():
    enc = jaxjpeg.encode_tensor(_gauss((256, 512)), quant_step=4, restart_interval=3)
    assert sum(t.num_intervals for t in enc.tiles) > 100
    np.testing.assert_array_equal(jaxjpeg.decode_tensor(enc, threads=1),
                                  jaxjpeg.decode_tensor(enc, threads=0))


def test_rate_controls_are_exclusive_and_validated():
    x = _gauss((16, 16))
    with pytest.raises(ValueError, match="exactly one"):
        jaxjpeg.encode_tensor(x, quant_step=2, quality=50)
    with pytest.raises(ValueError, match="step"):
        jaxjpeg.encode_tensor(x, quant_step=300)
    with pytest.raises(ValueError, match="bits"):
        jaxjpeg.encode_tensor(x, quant_step=2, bits=10)
    with pytest.raises(TypeError):
        jaxjpeg.encode_tensor(np.arange(64).reshape(8, 8), quant_step=2)
    with pytest.raises(ValueError, match="NaN"):
        jaxjpeg.encode_tensor(np.full((8, 8), np.nan, np.float32), quant_step=2)


def test_flat_table_error_shrinks_with_step():
    x = _gauss((128, 128))
    errors = [np.linalg.norm(jaxjpeg.decode_tensor(jaxjpeg.encode_tensor(x, quant_step=s)) - x)
              for s in (16, 8, 4, 2)]
    assert errors == sorted(errors, reverse=True)


def test_plan_refuses_a_tile_whose_header_disagrees_with_its_record():
    enc = jaxjpeg.encode_tensor(_gauss((16, 32)), quant_step=4)
    tile = enc.tiles[0]
    builder = codec.PlanBuilder()
    out = builder.add_output((16, 64), np.float32, np.ones(16), np.zeros(16))
    builder.add_tile(out, (0, 0, 16, 64), bits=8, restart_interval=tile.restart_interval,
                     interval_starts=tile.interval_starts, size=len(tile.data),
                     fill=lambda view: view.__setitem__(slice(None), np.frombuffer(tile.data, np.uint8)))
    with pytest.raises(jaxjpeg.JpegError, match="tile header says 32x16"):
        builder.finish()


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("restart_interval", [0, 1, 3, 8])
def test_encoder_records_interval_starts_as_it_writes(bits, restart_interval):
    """Issue 9, defect 13: encode_tensor re-scanned every tile it had just
    written to find its restart offsets; the encoder now records them, and
    they are exactly what a scan of the stream finds."""
    samples = np.random.default_rng(restart_interval).uniform(
        0, (1 << bits) - 1, (37, 83)).astype(np.float32)
    data, starts = _native.encode(samples, np.full(64, 3, np.uint16), bits=bits,
                                  restart_interval=restart_interval, with_intervals=True)
    np.testing.assert_array_equal(starts, _native.inspect(data)["interval_starts"])
    assert _native.check_interval_starts(data, starts)
    enc = jaxjpeg.encode_tensor(_gauss((100, 300)), quant_step=3, tile_shape=(64, 128),
                                bits=bits, restart_interval=restart_interval)
    for tile in enc.tiles:
        np.testing.assert_array_equal(tile.interval_starts,
                                      _native.inspect(tile.data)["interval_starts"])


def test_tiny_weights_decode_to_float16_as_numpy_rounds_them():
    """Subnormal float16 outputs (below 6.1e-5) round to nearest even, as
    numpy's float32 -> float16 does, checked against the independent oracle."""
    from oracle import expected_tensor
    x = _gauss((48, 80)) * 2e-6
    enc = jaxjpeg.encode_tensor(x, quant_step=2, bits=12)
    want = expected_tensor(enc, np.float16)
    assert np.count_nonzero(np.abs(want) < 6.1e-5) > 1000
    got = jaxjpeg.decode_tensor(enc, np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(got, jaxjpeg.decode_tensor(enc).astype(np.float16))


def test_restart_markers_must_count_up():
    """RST markers out of order (the second and third swapped, or every one
    RST0) are refused by the interval index, so no decode can run them."""
    data = _native.encode(np.full((8, 64), 100.0, np.float32) + np.arange(64, dtype=np.float32),
                          np.full(64, 2, np.uint16), restart_interval=1)
    starts = _native.inspect(data)["interval_starts"]
    swapped = bytearray(data)
    a, b = int(starts[1]) - 1, int(starts[2]) - 1  # the RSTn code bytes
    swapped[a], swapped[b] = swapped[b], swapped[a]
    all_rst0 = bytearray(data)
    for s in starts[1:-1]:
        all_rst0[int(s) - 1] = 0xD0
    for bad in (bytes(swapped), bytes(all_rst0)):
        with pytest.raises(jaxjpeg.JpegError, match="restart"):
            _native.inspect(bad)
        with pytest.raises(jaxjpeg.JpegError):
            _native.decode_samples(bad)
        assert not _native.check_interval_starts(bad, starts)


def _rdo_pair(bits, step, seed=0, tile=512):
    """(SSE with RDO, SSE plain, bits with RDO, bits plain) of a 512 x 512
    Gaussian coded as tiles of tile x tile."""
    m = (1 << bits) - 1
    s = np.clip(np.random.default_rng(seed).normal(size=(512, 512)) * m / 10 + m / 2, 0, m)
    s = s.astype(np.float32)
    table = np.full(64, step, np.uint16)
    totals = np.zeros(4)
    for r in range(0, 512, tile):
        for c in range(0, 512, tile):
            part = np.ascontiguousarray(s[r:r + tile, c:c + tile])
            with_rdo = _native.encode(part, table, bits=bits, restart_interval=8)
            plain = _native.encode(part, table, bits=bits, restart_interval=8, rdo=False)

            def sse(d):
                return float(np.sum((_native.decode_samples(d).astype(np.float64) - part) ** 2))
            totals += (sse(with_rdo), sse(plain), 8 * len(with_rdo), 8 * len(plain))
    return tuple(totals)


@pytest.mark.parametrize("bits,step", [(8, 4), (8, 8), (12, 16)])
def test_rdo_trades_error_for_bits_at_its_lambda(bits, step):
    """RDO lowers a value when the error added, in step^2, is below lambda
    (0.12) times the bits saved; the decisions' errors then spread over
    [0, lambda) per bit, so the measured slope, added error / bits saved, is
    about lambda / 2 (0.055-0.059 measured at these settings)."""
    sse_rdo, sse_plain, bits_rdo, bits_plain = _rdo_pair(bits, step)
    assert sse_rdo > sse_plain and bits_rdo < bits_plain
    slope = (sse_rdo - sse_plain) / step ** 2 / (bits_plain - bits_rdo)
    assert 0.045 < slope < 0.075, slope


@pytest.mark.parametrize("tile", [32, 64])
def test_rdo_prices_symbols_well_in_small_tiles(tile):
    """RDO prices symbols from a sample of a tile's block rows; a small
    tile's sample must still see its common symbols (an unseen one is priced
    at 16 bits, and RDO then lowers values whose real price is a few bits:
    more error per bit saved). Tiles of 16 and 64 blocks keep about the
    slope of a large tile (0.056-0.059 measured; 0.074 when the sample was
    every 8th block row whatever the tile's size)."""
    sse_rdo, sse_plain, bits_rdo, bits_plain = _rdo_pair(8, 8, tile=tile)
    assert sse_rdo > sse_plain and bits_rdo < bits_plain
    slope = (sse_rdo - sse_plain) / 8 ** 2 / (bits_plain - bits_rdo)
    assert 0.045 < slope < 0.065, slope


def test_rdo_gain_at_four_bits_per_weight():
    """At 8-bit step 8 (about 3.9 bits/sample on this Gaussian): RDO saves
    1.2% of the bytes for 3.3% more squared error (measured)."""
    sse_rdo, sse_plain, bits_rdo, bits_plain = _rdo_pair(8, 8)
    assert 0.984 < bits_rdo / bits_plain < 0.992
    assert 1.022 < sse_rdo / sse_plain < 1.045


@pytest.mark.parametrize("bits", [8, 12])
def test_each_dct_basis_image_codes_to_its_one_coefficient(bits):
    """The encoder's forward DCT (butterflies, forward_dct.h) against the
    definition: a block that is one DCT basis image has one nonzero
    coefficient; at step 1 the decode gives the image back within the
    rounding of samples (< 1). A wrong frequency, sign or a 10% scale error
    misses by several samples (the image's peak is about A / 4)."""
    top = (1 << bits) - 1
    n = np.arange(8)
    c = np.where(n == 0, np.sqrt(0.5), 1.0)
    basis = c[:, None] / 2 * np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16)  # [u][x]
    amplitude = 0.4 * (top + 1)
    for v in range(8):
        for u in range(8):
            image = amplitude * np.outer(basis[v], basis[u]) * (1 if u + v else 0.5)
            samples = (image + (top + 1) / 2).astype(np.float32)
            table = np.ones(64, np.uint16)
            decoded = _native.decode_samples(_native.encode(samples, table, bits=bits, rdo=False))
            err = np.abs(decoded.astype(np.float64) - samples)
            assert err.max() < 1.0, (u, v, err.max())


@pytest.mark.parametrize("values", [[4.6e-5, 1e-9, 0.0], [4.6e-5, 0.3, 4e4, 1.0], [0.3, 2.5],
                                    [1e6, 0.5, 1e-30]])
def test_float16_rounding_up_of_scales_keeps_what_float16_cannot_hold(values):
    x = np.array(values)
    with np.errstate(all="ignore"):
        h = x.astype(np.float16)
        up = np.where(h.astype(np.float64) < x, np.nextafter(h, np.float16(np.inf)), h)
    in_range = (x >= np.finfo(np.float16).tiny) & (x <= np.finfo(np.float16).max / 2)
    # Values kept as they are are not converted (numpy's signal for each is slow).
    with np.errstate(under="raise", over="raise"):
        got = mapping._f16_up(x)
    np.testing.assert_array_equal(got, np.where(in_range, up, x))


def test_maps_are_stored_as_float16_exactly_when_every_value_round_trips():
    from jaxjpeg.codec import _half_if_exact
    halves = np.float16([0.0, -0.0, 2**-24, 3 * 2**-24, 1.5, -65504, np.inf]).astype(np.float32)
    assert _half_if_exact(halves).dtype == np.float16
    assert _half_if_exact(halves).astype(np.float32).tobytes() == halves.tobytes()
    for value in (2**-25, 1e-30, 65520.0, 1.0 + 2**-11, np.nan):
        kept = np.append(halves, np.float32(value))
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # nothing converted that float16 cannot hold
            out = _half_if_exact(kept)
        assert out.dtype == np.float32 and out.tobytes() == kept.tobytes()


def test_weights_past_float16s_range_save_without_numpy_warnings(tmp_path):
    """Defect: maps of weights around 1e6 printed numpy's 'overflow
    encountered in cast' while deciding float16 offsets (they stay float32)."""
    import warnings

    import jaxjpeg

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 200)) * 1e6).astype(np.float32)
    w[:, 0] += 5e6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxjpeg.save(tmp_path / "big.jjpg", {"w": w}, progress=False)
    restored = np.asarray(jaxjpeg.restore(tmp_path / "big.jjpg")["w"])
    assert np.sqrt(np.mean((restored - w) ** 2)) < 0.2e6


def test_a_0d_tensor_decodes_to_0d():
    """Found by review: encode_tensor of a 0-d array decoded with shape (1,)."""
    enc = codec.encode_tensor(np.array(2.5, np.float32), quality=90)
    out = codec.decode_tensor(enc)
    assert enc.shape == () and out.shape == () and abs(float(out) - 2.5) < 0.05


@pytest.mark.parametrize("bits, interval, match", [
    (10, 0, "bits must be 8 or 12, got 10"),
    (8, 100000, r"restart_interval must be in \[0, 65535\], got 100000"),
    (12, -1, r"restart_interval must be in \[0, 65535\], got -1")])
def test_native_codings_name_the_argument_they_refuse(bits, interval, match):
    """Found by review: the encoder's status said only "invalid argument"."""
    samples = np.full((16, 16), 100.0, np.float32)
    ones = np.ones(16, np.float32)
    with pytest.raises(ValueError, match=match):
        _native.encode(samples, np.ones(64), bits=bits, restart_interval=interval)
    with pytest.raises(ValueError, match=match):
        _native.encode_mapped(samples, ones, ones * 0, np.ones(64), bits=bits,
                              restart_interval=interval)
    with pytest.raises(ValueError, match=match):
        _native.measure_steps(samples, ones, ones * 0, np.array([1.0]), bits, interval)


@pytest.mark.parametrize("bad", [65537, 2.9, 0, -3, float("nan")])
def test_native_steps_are_checked_not_narrowed(bad):
    """A quantization step outside 1..65535 or not whole is refused by every
    native entry point: a uint16 forcecast had coded 65537 as 1 and 2.9 as 2."""
    samples = np.full((8, 8), 100.0, np.float32)
    table = np.full(64, 2.0)
    table[5] = bad
    with pytest.raises(ValueError, match="1..65535"):
        _native.encode(samples, table)
    ones = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="1..65535"):
        _native.encode_mapped(samples, ones, ones * 0, table)
    with pytest.raises(ValueError, match="1..65535"):
        _native.measure_steps(samples, ones, ones * 0, np.array([4.0, bad]), 8, 0)
    ok = _native.encode(samples, np.full(64, 2.0))
    assert ok == _native.encode(samples, np.full(64, 2, np.uint16))


def test_native_direct_callers_get_errors_not_silent_values():
    """Found by review: check_interval_starts truncated float offsets (1.9
    -> 1) and decode_workspace_bytes returned a negative size for a
    negative count. (encode clamps samples, a NaN to 0, as documented:
    encode_mapped's special values are clamped so and kept aside.)"""
    data, starts = _native.encode(np.full((8, 64), 100.0, np.float32),
                                  np.full(64, 2, np.uint16), restart_interval=1,
                                  with_intervals=True)
    assert _native.check_interval_starts(data, starts)
    assert _native.check_interval_starts(data, starts.astype(np.uint32))
    with pytest.raises(TypeError, match="integer array"):
        _native.check_interval_starts(data, starts.astype(np.float64) + 0.9)
    assert _native.decode_workspace_bytes(1, 100, 2, 1) > 0
    for bad in ((-1, 100, 2, 1), (1, -100, 2, 1), (1, 100, -2, 1), (1, 100, 2, -1)):
        with pytest.raises(ValueError, match=">= 0"):
            _native.decode_workspace_bytes(*bad)


def test_native_sizes_statuses_and_skips_past_their_ranges_are_refused():
    """Found by review (session 60): decode_workspace_bytes wrapped negative
    for 2^63 - 1 outputs or bytes; pack_plan_status packed code 16 as
    interval 1's "ok" and wrapped intervals past 2^27; bit_reader_trace
    narrowed skips of 2^32 + 1 and 1.5 to 1."""
    for huge in ((2**63 - 1, 0, 0, 0), (0, 2**63 - 1, 0, 0), (0, 0, 2**63 - 1, 0),
                 (0, 0, 0, 2**63 - 1)):
        with pytest.raises(ValueError, match="too large"):
            _native.decode_workspace_bytes(*huge)
    for interval, code in ((0, 16), (1, 0), (2**27, 1), (-1, 1), (0, -1)):
        with pytest.raises(ValueError, match="pack_plan_status"):
            _native.pack_plan_status(interval, code)
    assert "interval 7" in _native.plan_failure(_native.pack_plan_status(7, 11))
    for skips in ([2**32 + 1], [1.5], [0], [17]):
        with pytest.raises(ValueError, match="skips must be 1..16"):
            _native.bit_reader_trace(b"\xff\x00\x12", np.array(skips))
    assert _native.bit_reader_trace(b"\xff\x00\x12", [1, 16]).shape == (3, 3)


def _closes_refused(call, buffer):
    """(how many closes of ``buffer``, an mmap, were refused, tried from
    this thread until one is done while ``call()`` runs on another with the
    GIL released; what the call returned). Only the call's native work runs
    without the GIL: a close done was done after the call let go of the
    buffer, and one refused was tried while the call held it."""
    import threading

    started, refused, result = threading.Event(), 0, []
    worker = threading.Thread(target=lambda: (started.set(), result.append(call())))
    worker.start()
    started.wait()
    while worker.is_alive():
        try:
            buffer.close()
            break
        except BufferError:
            refused += 1
    worker.join()
    assert result, "the call failed"
    return refused, result[0]


def test_native_calls_hold_the_buffers_they_read_and_write():
    """Found by review: run_plan and inflate_piece_into let go of their
    buffers' exports before working on them with the GIL released, so
    another thread could close an mmap they were reading or writing (then
    a segfault). Held, each close during the call is refused."""
    import mmap

    x = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    plan = codec.build_plan([codec.encode_tensor(x, bits=8, quality=95, restart_interval=1)],
                            [np.float32])
    payload = mmap.mmap(-1, len(plan.payload))
    payload[:] = plan.payload.tobytes()
    out = np.empty(plan.output_shapes[0], np.float32)
    refused, _ = _closes_refused(lambda: _native.run_plan(
        payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
        plan.row_offset, [out], [0], threads=1, col_scale=plan.col_scale,
        positions=plan.positions, whole_outputs=True), payload)
    assert refused > 0
    np.testing.assert_array_equal(out, codec.run_plan(plan)[0])
    data = _native.run_deflate(bytes(64 << 20), True)
    target = mmap.mmap(-1, 64 << 20)
    refused, adler = _closes_refused(lambda: _native.inflate_piece_into(data, target, True),
                                     target)
    assert refused > 0 and adler == zlib.adler32(bytes(64 << 20))


def test_tilings_that_leave_gaps_or_mix_intervals_are_refused(tmp_path):
    """Found by review: decode_tensor of tiles leaving a quarter of the view
    uncovered returned uninitialized memory there, and a save with a user's
    encoder giving such tiles (or tiles of two restart intervals) wrote a
    file no restore reads."""
    import dataclasses

    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    enc = codec.encode_tensor(x, quality=90, tile_shape=(32, 32))
    other = codec.encode_tensor(x, quality=90, tile_shape=(32, 32), restart_interval=8)
    moved = dataclasses.replace(enc.tiles[3], row0=0, col0=0)
    bad = {"gap": dataclasses.replace(enc, tiles=enc.tiles[:3]),
           "overlap": dataclasses.replace(enc, tiles=enc.tiles[:3] + (moved,)),
           "mixed": dataclasses.replace(enc, tiles=enc.tiles[:2] + other.tiles[2:])}
    for name, coding in bad.items():
        with pytest.raises(ValueError, match="cover|restart intervals"):
            codec.decode_tensor(coding)
        with pytest.raises(ValueError, match="encoder's coding of 'w'"):
            jaxjpeg.save(tmp_path / f"{name}.jjpg", {"w": x}, encoder=lambda n, a, c=coding: c)
        assert not (tmp_path / f"{name}.jjpg").exists()
    np.testing.assert_array_equal(codec.decode_tensor(enc), codec.decode_tensor(
        dataclasses.replace(enc, tiles=enc.tiles[::-1])))


def test_an_irregular_tiling_is_not_called_a_gap():
    """Found by review: a staggered (brick) tiling that covers the view was
    refused as leaving a gap; it is refused as too irregular to check."""
    from jaxjpeg import layout

    splits = [8 * (1 + r % 15) for r in range(64)]   # each band split at its own column
    tiles = [(8 * r, 0, 8, c, 1) for r, c in enumerate(splits)]
    tiles += [(8 * r, c, 8, 128 - c, 1) for r, c in enumerate(splits)]
    problem = layout.tiling_problem((512, 128), tiles, 0)
    assert problem is not None and "irregular" in problem, problem
