"""Interoperability of the codec core with libjpeg-turbo, in both directions.

libjpeg-turbo is the independent reference: reached through Pillow (8-bit) and
imagecodecs.jpeg8_encode / jpeg8_decode (8 and 12 bit; both decode with the
default accurate integer IDCT, the one jaxjpeg reproduces bit for bit).

- Streams written by jaxjpeg (`encode`) must decode in libjpeg-turbo to exactly
  the samples `decode_samples` returns.
- Streams written by libjpeg-turbo must decode in jaxjpeg to exactly
  libjpeg-turbo's samples.
"""

import io

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from jaxjpeg import _native

SIZES = [(1, 1), (7, 9), (8, 8), (9, 8), (8, 15), (23, 41), (17, 1031), (65, 4096)]
DATA_KINDS = ["gaussian", "uniform", "constant", "checkerboard"]


def make_samples(shape, bits, kind="gaussian", seed=0):
    """float32 samples in [0, 2^bits - 1] (what `encode` takes)."""
    top = (1 << bits) - 1
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.normal(top / 2, top / 6, shape)
    elif kind == "uniform":
        x = rng.uniform(0, top, shape)
    elif kind == "constant":
        x = np.full(shape, 0.37 * top)
    elif kind == "checkerboard":
        yy, xx = np.indices(shape)
        x = np.where((yy + xx) % 2 == 0, 0.0, float(top))
    else:
        raise ValueError(kind)
    return np.clip(x, 0, top).astype(np.float32)


def smooth_image(shape, seed=0):
    """A uint8 image with both smooth and busy regions, for libjpeg-turbo to encode."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    x = 128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 12, shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def pillow_encode(img_u8, **options):
    buf = io.BytesIO()
    Image.fromarray(img_u8, mode="L").save(buf, "JPEG", **options)
    return buf.getvalue()


def pillow_decode(data):
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def turbo_decode(data):
    """libjpeg-turbo through imagecodecs: uint8 for 8-bit, uint16 for 12-bit."""
    return imagecodecs.jpeg8_decode(data)


def assert_same_samples(ours, reference):
    assert ours.shape == reference.shape
    assert ours.dtype == reference.dtype
    diff = np.flatnonzero(ours != reference)
    assert diff.size == 0, (
        f"{diff.size} samples differ; first at flat index {diff[0]}: "
        f"jaxjpeg {ours.flat[diff[0]]} vs libjpeg-turbo {reference.flat[diff[0]]}")


def check_decodes_like_turbo(data):
    """jaxjpeg's samples == libjpeg-turbo's for `data`; returns the samples."""
    ours = _native.decode_samples(data)
    assert_same_samples(ours, turbo_decode(data))
    if ours.dtype == np.uint8:
        assert_same_samples(ours, pillow_decode(data))
    return ours


def check_interval_index(data):
    """inspect(): one start per interval plus the end; every start after the
    first follows RSTn in sequence; the end is the EOI marker."""
    info = _native.inspect(data)
    starts = np.asarray(info["interval_starts"])
    n = info["num_intervals"]
    assert len(starts) == n + 1
    assert starts[0] == info["scan_begin"]
    assert np.all(np.diff(starts) > 0)
    for i in range(1, n):
        assert data[starts[i] - 2] == 0xFF and data[starts[i] - 1] == 0xD0 + ((i - 1) & 7), i
    assert data[starts[n]:starts[n] + 2] == b"\xff\xd9"
    if info["restart_interval"]:
        blocks = info["blocks_wide"] * info["blocks_high"]
        assert n == -(-blocks // info["restart_interval"])
    else:
        assert n == 1
    return info


# ---------------------------------------------------------------------------
# jaxjpeg writes, libjpeg-turbo reads


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("restart", [0, 3])
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_our_streams_decode_in_turbo_awkward_sizes(shape, restart, bits):
    data = _native.encode(make_samples(shape, bits), _native.quality_table(80, bits), bits=bits,
                          restart_interval=restart)
    ours = check_decodes_like_turbo(data)
    assert ours.shape == shape
    info = check_interval_index(data)
    assert (info["height"], info["width"], info["bits"]) == (shape[0], shape[1], bits)


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("restart", [0, 1, 64])
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_our_streams_decode_in_turbo_data_kinds(kind, restart, bits):
    data = _native.encode(make_samples((37, 59), bits, kind, seed=1),
                          _native.quality_table(60, bits), bits=bits, restart_interval=restart)
    check_decodes_like_turbo(data)
    check_interval_index(data)


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("quality", range(1, 101))
def test_our_streams_decode_in_turbo_every_quality(quality, bits):
    samples = make_samples((13, 22), bits, "gaussian", seed=quality)
    data = _native.encode(samples, _native.quality_table(quality, bits), bits=bits,
                          restart_interval=quality % 4)
    check_decodes_like_turbo(data)
    assert np.array_equal(_native.inspect(data)["quant_table"], _native.quality_table(quality, bits))


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("restart", [0, 1])
@pytest.mark.parametrize("step", [1, 7, 255])
def test_our_streams_decode_in_turbo_flat_tables(step, restart, bits):
    data = _native.encode(make_samples((19, 45), bits, "uniform", seed=step), np.full(64, step, np.uint16),
                          bits=bits, restart_interval=restart)
    check_decodes_like_turbo(data)
    assert np.all(_native.inspect(data)["quant_table"] == step)


@pytest.mark.parametrize("bits,top_step", [(8, 255), (12, 255), (12, 4095), (12, 65535)])
def test_our_streams_decode_in_turbo_random_tables(bits, top_step):
    rng = np.random.default_rng(top_step)
    table = rng.integers(1, top_step + 1, 64).astype(np.uint16)
    data = _native.encode(make_samples((40, 24), bits, "gaussian"), table, bits=bits, restart_interval=2)
    check_decodes_like_turbo(data)
    assert np.array_equal(_native.inspect(data)["quant_table"], table)


@pytest.mark.parametrize("restart", [0, 5])
def test_our_standard_huffman_tables_decode_in_turbo(restart):
    samples = make_samples((31, 50), 8, "uniform")
    plain = _native.encode(samples, _native.quality_table(90, 8), restart_interval=restart, optimize=False)
    tuned = _native.encode(samples, _native.quality_table(90, 8), restart_interval=restart, optimize=True)
    assert len(tuned) < len(plain)
    assert np.array_equal(check_decodes_like_turbo(plain), check_decodes_like_turbo(tuned))


def test_decode_threads_do_not_change_samples():
    data = _native.encode(make_samples((65, 4096), 12), _native.quality_table(70, 12), bits=12,
                          restart_interval=7)
    assert np.array_equal(_native.decode_samples(data, threads=1), _native.decode_samples(data, threads=4))


# ---------------------------------------------------------------------------
# libjpeg-turbo writes, jaxjpeg reads


@pytest.mark.parametrize("quality", range(1, 101))
def test_turbo_streams_decode_in_jaxjpeg_every_quality(quality):
    data = pillow_encode(smooth_image((21, 34), seed=quality), quality=quality)
    check_decodes_like_turbo(data)


@pytest.mark.parametrize("quality", [3, 50, 97])
@pytest.mark.parametrize("shape", [(65, 4096), (333, 517)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_turbo_streams_decode_in_jaxjpeg_large(shape, quality):
    check_decodes_like_turbo(pillow_encode(smooth_image(shape), quality=quality))


@pytest.mark.parametrize("option", [{"restart_marker_blocks": n} for n in (1, 3, 7, 100)]
                         + [{"restart_marker_rows": n} for n in (1, 2)], ids=str)
@pytest.mark.parametrize("shape", [(37, 83), (8, 8), (1, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_turbo_restart_markers_decode_in_jaxjpeg(shape, option):
    data = pillow_encode(smooth_image(shape), quality=85, **option)
    check_decodes_like_turbo(data)
    info = check_interval_index(data)
    blocks = info["blocks_wide"] * info["blocks_high"]
    expected = option.get("restart_marker_blocks", info["blocks_wide"] * option.get("restart_marker_rows", 0))
    assert info["restart_interval"] == expected
    if expected < blocks:
        assert info["num_intervals"] > 1


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("quality", [10, 75, 100])
def test_turbo_optimized_huffman_decodes_in_jaxjpeg(quality, optimize):
    check_decodes_like_turbo(pillow_encode(smooth_image((48, 70)), quality=quality, optimize=optimize))


def test_turbo_flat_custom_table_decodes_in_jaxjpeg():
    data = pillow_encode(smooth_image((40, 40)), qtables=[[1] * 64])
    check_decodes_like_turbo(data)
    assert np.all(_native.inspect(data)["quant_table"] == 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_turbo_random_custom_table_decodes_in_jaxjpeg(seed):
    table = np.random.default_rng(seed).integers(1, 256, 64)
    data = pillow_encode(smooth_image((40, 56)), qtables=[table.tolist()], restart_marker_blocks=5)
    check_decodes_like_turbo(data)
    # The same 64 steps, whatever order Pillow takes them in.
    assert sorted(_native.inspect(data)["quant_table"]) == sorted(table)


# imagecodecs' jpeg8_encode is the only 12-bit libjpeg-turbo writer reachable from
# Python, and it has no restart-interval option: 12-bit restart markers are
# covered by our own streams above (decoded by libjpeg-turbo).
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("quality", [1, 10, 50, 75, 90, 100])
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (33, 65)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_turbo_12bit_streams_decode_in_jaxjpeg(shape, quality, optimize):
    img = np.random.default_rng(quality).integers(0, 4096, shape).astype(np.uint16)
    data = imagecodecs.jpeg8_encode(img, level=quality, bitspersample=12, optimize=optimize)
    assert _native.inspect(data)["bits"] == 12
    assert check_decodes_like_turbo(data).dtype == np.uint16


@pytest.mark.parametrize("quality", [5, 95])
def test_turbo_8bit_streams_from_imagecodecs_decode_in_jaxjpeg(quality):
    data = imagecodecs.jpeg8_encode(smooth_image((29, 61)), level=quality)
    check_decodes_like_turbo(data)


# Progressive streams (mozjpeg's default, Pillow's progressive=True): jaxjpeg
# decodes sequential streams only and must say so.
@pytest.mark.parametrize("optimize", [False, True])
def test_progressive_streams_are_refused_as_unsupported(optimize):
    data = pillow_encode(smooth_image((32, 32)), quality=80, progressive=True, optimize=optimize)
    assert pillow_decode(data).shape == (32, 32)  # a valid stream
    with pytest.raises(_native.JpegError, match="unsupported"):
        _native.decode_samples(data)
    with pytest.raises(_native.JpegError, match="unsupported"):
        _native.inspect(data)


def test_lossless_streams_are_refused_as_unsupported():
    data = imagecodecs.jpeg8_encode(smooth_image((16, 16)), lossless=True)
    with pytest.raises(_native.JpegError, match="unsupported"):
        _native.decode_samples(data)
