"""Hostile input to the codec core: every malformed stream or plan must end in a
clear error (JpegError for streams), never a crash, a hang, a huge allocation,
or a read or write outside the buffers it was given.

Decoding of hostile bytes runs in the `native_worker` child process (see
conftest.py), so a memory-safety bug fails the test that found it, with the
offending input, instead of taking the whole test run down.
"""

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from PIL import Image

from jaxjpeg import _native

SOF0, SOF1, DHT, DQT, DRI, SOS, EOI, SOI = 0xC0, 0xC1, 0xC4, 0xDB, 0xDD, 0xDA, 0xD9, 0xD8


# ---------------------------------------------------------------------------
# Stream surgery


def stream(bits=8, shape=(16, 24), restart=0, quality=75, optimize=True, seed=0):
    rng = np.random.default_rng(seed)
    samples = rng.uniform(0, (1 << bits) - 1, shape).astype(np.float32)
    return _native.encode(samples, _native.quality_table(quality, bits), bits=bits,
                          restart_interval=restart, optimize=optimize)


def segments(data):
    """[(marker, start, end)] for every marker segment from SOI to SOS
    (start at the 0xFF, end after the segment), then ("scan", begin, end-of-data)."""
    out = [(SOI, 0, 2)]
    pos = 2
    while True:
        marker = data[pos + 1]
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((marker, pos, end))
        pos = end
        if marker == SOS:
            out.append(("scan", pos, len(data)))
            return out


def segment(marker, body):
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def find(data, marker):
    """(start, end) of the first segment with this marker."""
    return next((s, e) for m, s, e in segments(data) if m == marker)


def without(data, marker):
    """data with every segment of this marker removed."""
    return b"".join(data[s:e] for m, s, e in segments(data) if m != marker)


def insert_before(data, marker, blob):
    s, _ = find(data, marker)
    return data[:s] + blob + data[s:]


def replace(data, marker, blob):
    s, e = find(data, marker)
    return data[:s] + blob + data[e:]


def rst_positions(data):
    """Offsets of the 0xFF of every RSTn marker in the scan."""
    begin = segments(data)[-1][1]
    return [i for i in range(begin, len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]


def dht(table_class, slot, counts, symbols):
    return segment(DHT, bytes([table_class << 4 | slot]) + bytes(counts) + bytes(symbols))


def standard_dc_table(symbols=range(12)):
    counts = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # Annex K.3.3.1 luminance DC
    return dht(0, 0, counts, list(symbols))


def assert_jpeg_error(worker, data, match=None):
    kind, value = worker.decode(data)
    assert kind == "JpegError", f"expected JpegError, got {kind}: {str(value)[:200]}"
    if match is not None:
        assert match in value, value
    return value


def assert_error_or_ok(worker, data):
    kind, value = worker.decode(data)
    assert kind in ("ok", "JpegError"), f"{kind}: {value}; input (hex): {bytes(data).hex()}"
    if kind == "ok":
        assert value.ndim == 2 and value.dtype in (np.uint8, np.uint16)
    return kind


SMALL_8BIT = stream(8, (16, 24), restart=2)
SMALL_12BIT = stream(12, (9, 17), restart=1)
SMALL_PLAIN = stream(8, (8, 16), restart=0, optimize=False)


# ---------------------------------------------------------------------------
# Truncation and bit flips


@pytest.mark.parametrize("data", [SMALL_8BIT, SMALL_12BIT, SMALL_PLAIN], ids=["8bit", "12bit", "plain"])
def test_every_truncation_is_a_jpeg_error(native_worker, data):
    assert native_worker.decode(data)[0] == "ok"
    for length in range(len(data)):
        kind, value = native_worker.decode(data[:length])
        assert kind == "JpegError", f"length {length}: {kind} {value}"


@pytest.mark.parametrize("data", [SMALL_8BIT, SMALL_12BIT, SMALL_PLAIN], ids=["8bit", "12bit", "plain"])
def test_every_single_bit_flip_decodes_or_is_a_jpeg_error(native_worker, data):
    outcomes = {"ok": 0, "JpegError": 0}
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            outcomes[assert_error_or_ok(native_worker, flipped)] += 1
    assert outcomes["JpegError"] > 0 and outcomes["ok"] > 0  # both paths were exercised


# ---------------------------------------------------------------------------
# Marker structure


def test_missing_soi(native_worker):
    assert_jpeg_error(native_worker, SMALL_8BIT[2:], "marker")


def test_sos_before_sof(native_worker):
    sof = SMALL_8BIT[slice(*find(SMALL_8BIT, SOF0))]
    moved = without(SMALL_8BIT, SOF0)
    s, e = find(moved, SOS)
    assert_jpeg_error(native_worker, moved[:e] + sof + moved[e:], "marker")


def test_eoi_right_after_soi(native_worker):
    assert_jpeg_error(native_worker, b"\xff\xd8\xff\xd9" + SMALL_8BIT[2:])


def test_eoi_before_scan(native_worker):
    assert_jpeg_error(native_worker, insert_before(SMALL_8BIT, SOS, b"\xff\xd9"))


def test_eoi_inside_scan_is_an_error(native_worker):
    begin = segments(SMALL_PLAIN)[-1][1]
    cut = SMALL_PLAIN[:begin + 3] + b"\xff\xd9"
    assert_jpeg_error(native_worker, cut)


def test_missing_dqt(native_worker):
    assert_jpeg_error(native_worker, without(SMALL_8BIT, DQT), "undefined table")


def test_missing_dht(native_worker):
    assert_jpeg_error(native_worker, without(SMALL_8BIT, DHT), "undefined table")


def test_two_frames(native_worker):
    sof = SMALL_8BIT[slice(*find(SMALL_8BIT, SOF0))]
    assert_jpeg_error(native_worker, insert_before(SMALL_8BIT, SOS, sof), "marker")


def test_unknown_marker_in_header(native_worker):
    assert_jpeg_error(native_worker, insert_before(SMALL_8BIT, SOS, segment(0x02, b"")), "marker")


def test_segment_length_below_two(native_worker):
    assert_jpeg_error(native_worker, insert_before(SMALL_8BIT, SOS, b"\xff\xfe\x00\x01"))


def test_segment_length_past_end(native_worker):
    assert_jpeg_error(native_worker, SMALL_8BIT[:2] + b"\xff\xfe\xff\xff" + SMALL_8BIT[2:40], "truncated")


def test_unused_bytes_in_scan(native_worker):
    data = SMALL_PLAIN[:-2] + b"\x12\x34\x56" + SMALL_PLAIN[-2:]
    assert_jpeg_error(native_worker, data, "unused bytes")


def test_second_scan_is_unsupported(native_worker):
    s, e = find(SMALL_PLAIN, SOS)
    data = SMALL_PLAIN[:-2] + SMALL_PLAIN[s:]
    assert_jpeg_error(native_worker, data, "unsupported")


# ---------------------------------------------------------------------------
# Declared sizes


def with_size(data, height, width):
    s = next(s for m, s, _ in segments(data) if m in (SOF0, SOF1))
    out = bytearray(data)
    out[s + 5:s + 9] = struct.pack(">HH", height, width)
    return bytes(out)


@pytest.mark.parametrize("height,width", [(0, 24), (16, 0), (0, 0)])
def test_zero_dimensions(native_worker, height, width):
    assert_jpeg_error(native_worker, with_size(SMALL_8BIT, height, width), "dimensions")


@pytest.mark.parametrize("restart", [0, 1])
@pytest.mark.parametrize("height,width", [(65535, 65535), (65535, 8), (8, 65535)])
def test_huge_dimensions_with_tiny_data_fail_without_huge_allocations(small_memory_worker, height,
                                                                     width, restart):
    """A few hundred bytes declaring 65535 x 65535 samples (and, with restart=1,
    67 million restart intervals) must be refused before gigabytes are
    allocated: the worker's address space is capped at 512 MiB."""
    data = with_size(stream(8, (8, 8), restart=restart), height, width)
    assert len(data) < 1000
    kind, value, _, _ = small_memory_worker.call("decode_samples", data, threads=1)
    assert kind == "JpegError", f"{kind}: {value}"
    kind, value, _, _ = small_memory_worker.call("inspect", data)
    assert kind in ("ok", "JpegError"), f"inspect: {kind}: {value}"


def test_larger_declared_size_than_data_is_truncated(native_worker):
    assert_jpeg_error(native_worker, with_size(SMALL_8BIT, 64, 64))


def test_smaller_declared_size_than_data_leaves_unused_bytes(native_worker):
    assert_jpeg_error(native_worker, with_size(stream(8, (64, 64)), 8, 8), "unused bytes")


# ---------------------------------------------------------------------------
# Tables


def test_dqt_with_zero_step(native_worker):
    s, _ = find(SMALL_8BIT, DQT)
    data = bytearray(SMALL_8BIT)
    data[s + 5 + 10] = 0
    assert_jpeg_error(native_worker, bytes(data), "quantization")


@pytest.mark.parametrize("header", [0x20, 0x04], ids=["precision2", "slot4"])
def test_dqt_with_bad_precision_or_slot(native_worker, header):
    s, _ = find(SMALL_8BIT, DQT)
    data = bytearray(SMALL_8BIT)
    data[s + 4] = header
    assert_jpeg_error(native_worker, bytes(data))


def test_dqt_shorter_than_its_table(native_worker):
    s, e = find(SMALL_8BIT, DQT)
    short = segment(DQT, SMALL_8BIT[s + 4:e - 10])
    assert_jpeg_error(native_worker, SMALL_8BIT[:s] + short + SMALL_8BIT[e:], "quantization")


def huffman_table_cases():
    """(name, DC table replacing the stream's) for malformed Huffman tables."""
    return [
        ("three_1bit_codes", dht(0, 0, [3] + [0] * 15, [0, 1, 2])),
        ("two_1bit_codes_all_ones", dht(0, 0, [2] + [0] * 15, [0, 1])),
        ("oversubscribed_len3", dht(0, 0, [0, 0, 9] + [0] * 13, range(9))),
        ("oversubscribed_len9", dht(0, 0, [0, 3] + [0] * 6 + [200] + [0] * 7, [i % 12 for i in range(203)])),
        ("oversubscribed_len12", dht(0, 0, [1] * 11 + [3] + [0] * 4, range(14))),
        ("200_1bit_codes", dht(0, 0, [200] + [0] * 15, [0] * 200)),
        ("255_2bit_codes", dht(0, 0, [0, 255] + [0] * 14, [0] * 255)),
        ("no_codes", dht(0, 0, [0] * 16, [])),
        ("dc_symbol_16", standard_dc_table([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16])),
        ("dc_symbol_255", standard_dc_table([255] + list(range(11)))),
        ("class_2", dht(2, 0, [0, 1] + [0] * 14, [0])),
        ("slot_4", dht(0, 4, [0, 1] + [0] * 14, [0])),
    ]


@pytest.mark.parametrize("name,table", huffman_table_cases(), ids=[c[0] for c in huffman_table_cases()])
def test_malformed_huffman_tables(native_worker, name, table):
    data = insert_before(SMALL_8BIT, SOS, table)  # redefines DC table 0 (or fails to parse)
    assert_jpeg_error(native_worker, data, "Huffman")
    kind, value, _, _ = native_worker.call("inspect", data)
    assert kind == "JpegError", f"inspect: {kind}"


def test_oversubscribed_ac_table(native_worker):
    data = insert_before(SMALL_8BIT, SOS, dht(1, 0, [4] + [0] * 15, [0, 1, 2, 3]))
    assert_jpeg_error(native_worker, data, "Huffman")


def test_dht_counts_longer_than_segment(native_worker):
    table = dht(0, 0, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100], range(12))
    assert_jpeg_error(native_worker, insert_before(SMALL_8BIT, SOS, table), "Huffman")


def test_unused_malformed_table_in_another_slot_is_harmless(native_worker):
    """libjpeg builds tables when a scan uses them; an unused slot may hold
    anything: the stream decodes exactly as without the extra table."""
    table = dht(0, 3, [0] * 16, [])
    kind, value = native_worker.decode(insert_before(SMALL_8BIT, SOS, table))
    assert kind == "ok", value
    np.testing.assert_array_equal(value, _native.decode_samples(SMALL_8BIT))


def test_scan_selects_undefined_table(native_worker):
    s, _ = find(SMALL_8BIT, SOS)
    data = bytearray(SMALL_8BIT)
    data[s + 6] = 0x22  # DC table 2, AC table 2
    assert_jpeg_error(native_worker, bytes(data), "undefined table")


# ---------------------------------------------------------------------------
# Restart markers


def test_restart_markers_out_of_sequence(native_worker):
    data = bytearray(SMALL_8BIT)
    first, second = rst_positions(SMALL_8BIT)[:2]
    data[first + 1], data[second + 1] = data[second + 1], data[first + 1]
    assert_jpeg_error(native_worker, bytes(data), "restart")


def test_restart_marker_missing(native_worker):
    p = rst_positions(SMALL_8BIT)[1]
    assert_jpeg_error(native_worker, SMALL_8BIT[:p] + SMALL_8BIT[p + 2:])


def test_restart_marker_extra(native_worker):
    n = len(rst_positions(SMALL_8BIT))
    data = SMALL_8BIT[:-2] + bytes([0xFF, 0xD0 + (n & 7)]) + SMALL_8BIT[-2:]
    assert_jpeg_error(native_worker, data, "restart")


def test_restart_markers_without_dri(native_worker):
    data = without(SMALL_8BIT, DRI)
    assert_jpeg_error(native_worker, data, "restart")


def test_dri_without_restart_markers(native_worker):
    data = insert_before(SMALL_PLAIN, SOS, segment(DRI, struct.pack(">H", 1)))
    assert_jpeg_error(native_worker, data, "restart")


def test_dri_with_bad_length(native_worker):
    data = insert_before(SMALL_PLAIN, SOS, segment(DRI, b"\x00\x01\x00"))
    assert_jpeg_error(native_worker, data, "marker")


def test_restart_interval_decodes_from_its_own_bytes(native_worker):
    """Corrupting one interval's bytes changes at most that interval's samples.
    Every byte of interval 3 is flipped in turn; flips that still decode must
    change block 3 only, and some must decode (or nothing was tested)."""
    data = stream(8, (8, 64), restart=1, quality=95)  # eight one-block intervals
    starts = _native.inspect(data)["interval_starts"]
    clean = _native.decode_samples(data)
    decoded_and_changed = 0
    for position in range(int(starts[3]), int(starts[4]) - 2):  # not the RST marker
        corrupt = bytearray(data)
        corrupt[position] ^= 0x10
        kind, value = native_worker.decode(bytes(corrupt))
        assert kind in ("ok", "JpegError"), value
        if kind == "ok":
            changed = set((np.flatnonzero(np.any(value != clean, axis=0)) // 8).tolist())
            assert changed <= {3}, (position, changed)
            decoded_and_changed += changed == {3}
    assert decoded_and_changed > 0


# ---------------------------------------------------------------------------
# Unsupported variants


@pytest.mark.parametrize("sof", [0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF],
                         ids=lambda m: f"SOF{m - 0xC0}")
def test_progressive_lossless_hierarchical_and_arithmetic_frames_are_unsupported(native_worker, sof):
    s, _ = find(SMALL_8BIT, SOF0)
    data = bytearray(SMALL_8BIT)
    data[s + 1] = sof
    assert_jpeg_error(native_worker, bytes(data), "unsupported")


def test_arithmetic_conditioning_segment_is_unsupported(native_worker):
    data = insert_before(SMALL_8BIT, SOS, segment(0xCC, b"\x00\x01"))  # DAC
    assert_jpeg_error(native_worker, data, "unsupported")


def test_three_component_image_is_unsupported(native_worker):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8), "RGB").save(buf, "JPEG")
    assert_jpeg_error(native_worker, buf.getvalue(), "unsupported")


@pytest.mark.parametrize("precision", [12, 16, 2])
def test_sof0_with_precision_other_than_8_is_unsupported(native_worker, precision):
    s, _ = find(SMALL_8BIT, SOF0)
    data = bytearray(SMALL_8BIT)
    data[s + 4] = precision
    assert_jpeg_error(native_worker, bytes(data), "unsupported")


def test_sos_with_spectral_selection_is_unsupported(native_worker):
    s, e = find(SMALL_8BIT, SOS)
    data = bytearray(SMALL_8BIT)
    data[e - 2] = 5  # Se = 5
    assert_jpeg_error(native_worker, bytes(data), "unsupported")


# ---------------------------------------------------------------------------
# run_plan with hostile plans

(T_TABLES, T_BITS, T_W, T_H, T_OUT, T_ROW0, T_COL0, T_STRIDE, T_AFF0, T_FIRST, T_RESTART,
 T_COLSCALE0, T_POSITIONS0) = range(13)
assert _native.TILE_COLUMNS == 13
COL_SCALE = np.array([0.25, 1.0, 2.0, 3.0] * 5 + [0.5], np.float32)  # 21 columns


def valid_plan():
    """One 13 x 21 8-bit tile with restart interval 2, decoded into output 0
    (a 20 x 32 float32 array) at row 3, column 5, with a per-column scale."""
    data = stream(8, (13, 21), restart=2, quality=90, seed=5)
    info = _native.inspect(data)
    tiles = np.array([[0, 8, 21, 13, 0, 3, 5, 32, 0, 0, 2, 0, -1]], np.int64)
    return dict(payload=np.frombuffer(data, np.uint8),
                interval_starts=np.asarray(info["interval_starts"], np.int64),
                tiles=tiles, tables=np.asarray(info["tables"]),
                row_scale=np.full(13, 0.5, np.float32), row_offset=np.full(13, -1.0, np.float32),
                col_scale=COL_SCALE,
                output_sizes=[20 * 32], output_types=[0]), _native.decode_samples(data)


def run_guarded(worker, plan):
    kind, value, _, _ = worker.call("run_plan_guarded", **plan)
    assert kind == "ok", f"{kind}: {value}"
    return value  # (error, outputs, guards intact)


def assert_refused_inside_outputs(worker, plan):
    """run_plan refuses ``plan`` with a clear error, writing nothing outside its outputs."""
    error, _, intact = run_guarded(worker, plan)
    assert error is not None, "hostile plan accepted"
    assert error[0] in ("JpegError", "ValueError"), error
    assert intact, "run_plan wrote outside its output"


def assert_writes_exactly(worker, plan, shape, box, expected):
    """run_plan writes ``expected`` at ``box`` of its one output read as
    ``shape``, and nothing else of it."""
    error, (out,), intact = run_guarded(worker, plan)
    assert error is None and intact
    view = out.reshape(shape)
    assert np.array_equal(view[box], expected)
    view[box] = -7.25e30
    assert np.all(view == np.float32(-7.25e30))  # nothing else in the output written


def test_valid_plan_writes_exactly_its_tile(native_worker):
    plan, samples = valid_plan()
    expected = (samples.astype(np.float32) * 0.5 - 1.0) * COL_SCALE
    assert_writes_exactly(native_worker, plan, (20, 32), np.s_[3:16, 5:26], expected)


def placed_plan():
    """valid_plan's tile placed by table, transposed: element (y, x) lands at
    (5 + x, 3 + y) of the output read as a 32 x 20 array."""
    plan, samples = valid_plan()
    plan["tiles"] = plan["tiles"].copy()
    plan["tiles"][0, T_POSITIONS0] = 0
    plan["tiles"][0, T_STRIDE] = 13   # column offsets after the 13 row offsets
    rows, cols = 3 + np.arange(13), (5 + np.arange(21)) * 20
    plan["positions"] = np.concatenate([rows, cols]).astype(np.int64)
    return plan, samples


def test_placed_plan_writes_exactly_its_tile_transposed(native_worker):
    plan, samples = placed_plan()
    expected = (samples.astype(np.float32) * 0.5 - 1.0) * COL_SCALE
    assert_writes_exactly(native_worker, plan, (32, 20), np.s_[5:26, 3:16], expected.T)


def tile_edit(column, value):
    def edit(plan):
        plan["tiles"] = plan["tiles"].copy()
        plan["tiles"][0, column] = value
    return edit


def field(name, value):
    def edit(plan):
        plan[name] = value
    return edit


def starts_edit(index, value):
    def edit(plan):
        plan["interval_starts"] = plan["interval_starts"].copy()
        plan["interval_starts"][index] = value
    return edit


def one_interval_more(plan):
    """The index lists one interval more than the tile has (an empty one at the
    end): it would decode nothing and leave no trace."""
    starts = plan["interval_starts"]
    plan["interval_starts"] = np.concatenate([starts, starts[-1:]])


BIG = np.iinfo(np.int64).max
HOSTILE_PLANS = {
    "one_interval_more_than_the_tile_has": one_interval_more,
    "start_past_payload": starts_edit(-1, 10 ** 9),
    "start_negative": starts_edit(0, -1),
    "start_after_end": starts_edit(1, 0),
    "start_int64_max": starts_edit(-1, BIG),
    "table_index_negative": tile_edit(T_TABLES, -1),
    "table_index_past_end": tile_edit(T_TABLES, 1),
    "output_index_past_end": tile_edit(T_OUT, 1),
    "output_index_negative": tile_edit(T_OUT, -1),
    "bits_10": tile_edit(T_BITS, 10),
    "width_zero": tile_edit(T_W, 0),
    "width_over_65535": tile_edit(T_W, 70000),
    "height_negative": tile_edit(T_H, -13),
    "row0_below_output": tile_edit(T_ROW0, 8),
    "row0_negative": tile_edit(T_ROW0, -1),
    "row0_huge": tile_edit(T_ROW0, BIG - 4),
    "col0_past_stride": tile_edit(T_COL0, 12),
    "col0_negative": tile_edit(T_COL0, -1),
    "col0_huge": tile_edit(T_COL0, BIG - 4),
    "stride_zero": tile_edit(T_STRIDE, 0),
    "stride_narrower_than_tile": tile_edit(T_STRIDE, 20),
    "stride_huge": tile_edit(T_STRIDE, BIG),
    "affine_row0_past_rows": tile_edit(T_AFF0, 1),
    "affine_row0_negative": tile_edit(T_AFF0, -1),
    "affine_row0_huge": tile_edit(T_AFF0, BIG - 4),
    "first_interval_wrong": tile_edit(T_FIRST, 2),
    "col_scale0_past_scales": tile_edit(T_COLSCALE0, 1),
    "col_scale0_below_minus_one": tile_edit(T_COLSCALE0, -2),
    "col_scale0_huge": tile_edit(T_COLSCALE0, BIG - 4),
    "col_scale_shorter": field("col_scale", np.ones(20, np.float32)),
    "col_scale_missing": field("col_scale", None),
    "col_scale_wrong_dtype": field("col_scale", np.ones(21, np.float64)),
    "restart_interval_larger_than_tile": tile_edit(T_RESTART, 10 ** 6),
    "restart_interval_wrong": tile_edit(T_RESTART, 1),
    "tables_size_not_multiple": field("tables", np.zeros(_native.PACKED_TABLES_SIZE - 1, np.uint8)),
    "tables_empty": field("tables", np.zeros(0, np.uint8)),
    "tiles_wrong_columns": field("tiles", np.zeros((1, 12), np.int64)),
    "tiles_wrong_dtype": field("tiles", np.zeros((1, 13), np.int32)),
    "tiles_empty": field("tiles", np.zeros((0, 13), np.int64)),
    "positions0_below_minus_one": tile_edit(T_POSITIONS0, -2),
    "positions0_without_positions": tile_edit(T_POSITIONS0, 0),
    "starts_empty": field("interval_starts", np.zeros(0, np.int64)),
    "starts_wrong_dtype": field("interval_starts", np.zeros(5, np.int32)),
    "row_offset_shorter": field("row_offset", np.zeros(12, np.float32)),
    "row_scale_wrong_dtype": field("row_scale", np.ones(13, np.float64)),
    "output_type_3": field("output_types", [3]),
    "output_type_negative": field("output_types", [-1]),
    "output_smaller_than_tile": field("output_sizes", [32 * 15]),
}


def positions_edit(index, value):
    def edit(plan):
        plan["positions"] = plan["positions"].copy()
        plan["positions"][index] = value
    return edit


HOSTILE_PLACEMENTS = {
    "positions0_past_table": tile_edit(T_POSITIONS0, 1),
    "positions0_huge": tile_edit(T_POSITIONS0, BIG - 4),
    "col_offsets_past_table": tile_edit(T_STRIDE, 14),
    "col_offsets_before_table": tile_edit(T_STRIDE, -1),
    "col_distance_huge": tile_edit(T_STRIDE, BIG),
    "col_distance_most_negative": tile_edit(T_STRIDE, -BIG - 1),
    "positions_shorter": field("positions", np.zeros(33, np.int64)),
    "positions_wrong_dtype": field("positions", np.zeros(34, np.int32)),
    "row_offset_negative": positions_edit(4, -1),
    "row_offset_past_output": positions_edit(12, 640),
    "col_offset_negative": positions_edit(13, -20),
    "col_offset_past_output": positions_edit(33, 640),
    "col_offset_huge": positions_edit(20, BIG),
    "row_and_col_offsets_sum_past_output": positions_edit(0, 639),  # 639 + 100 >= 640
    "last_row_plus_col_is_the_output_size": positions_edit(33, 640 - 15),  # row 15
}


@pytest.mark.parametrize("name", list(HOSTILE_PLACEMENTS))
def test_hostile_placement_is_refused_without_writing_outside_outputs(native_worker, name):
    plan, _ = placed_plan()
    HOSTILE_PLACEMENTS[name](plan)
    assert_refused_inside_outputs(native_worker, plan)


@pytest.mark.parametrize("name", list(HOSTILE_PLANS))
def test_hostile_plan_is_refused_without_writing_outside_outputs(native_worker, name):
    plan, _ = valid_plan()
    HOSTILE_PLANS[name](plan)
    assert_refused_inside_outputs(native_worker, plan)


def test_plan_output_type_must_match_array(native_worker):
    """A float32 output declared bfloat16 (2-byte elements) is refused."""
    plan, _ = valid_plan()
    kind, value, _, _ = native_worker.call(
        "run_plan", plan["payload"], plan["interval_starts"], plan["tiles"], plan["tables"],
        plan["row_scale"], plan["row_offset"], [np.zeros(640, np.float32)], [1])
    assert kind == "ValueError", f"{kind}: {value}"


def test_plan_with_corrupt_payload_names_the_interval(native_worker):
    plan, _ = valid_plan()
    payload = plan["payload"].copy()
    starts = plan["interval_starts"]
    payload[starts[2]:starts[3] - 2] = 0xFF  # interval 2 becomes fill bytes / markers
    plan["payload"] = payload
    error, _, intact = run_guarded(native_worker, plan)
    assert intact
    assert error is not None and error[0] == "JpegError" and "interval 2" in error[1], error


# ---------------------------------------------------------------------------
# Property test: thousands of mutated streams

BASES = [SMALL_8BIT, SMALL_12BIT, SMALL_PLAIN, stream(8, (9, 40), restart=3, optimize=False, seed=3)]


@st.composite
def mutated_streams(draw):
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "ff", "swap", "dup"]))
        i = draw(st.integers(0, len(data) - 1)) if data else 0
        if not data:
            break
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        elif op == "ff":  # a marker byte pair, often RSTn or EOI
            data[i:i] = bytes([0xFF, draw(st.sampled_from([0x00, 0xD0, 0xD3, 0xD9, 0xDA, 0xC4, 0xFF]))])
        elif op in ("swap", "dup"):
            try:
                segs = [s for s in segments(bytes(data)) if s[0] != "scan" and s[0] != SOI]
            except (IndexError, struct.error):
                continue
            if len(segs) < 2:
                continue
            a, b = sorted(draw(st.lists(st.sampled_from(segs), min_size=2, max_size=2, unique=True)),
                          key=lambda s: s[1])
            chunk_a, chunk_b = bytes(data[a[1]:a[2]]), bytes(data[b[1]:b[2]])
            if op == "swap":
                data[b[1]:b[2]] = chunk_a
                data[a[1]:a[2]] = chunk_b
            else:
                data[b[2]:b[2]] = chunk_a
    return bytes(data)


@settings(max_examples=5000, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing input is printed
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutated_streams())
def test_mutated_streams_decode_or_raise_jpeg_error(native_worker, data):
    """No crash, and more: decoding succeeds only where the header and index
    parse (inspect), with the size the header declares, and a stream that
    decodes carries an interval index the checkpoint check accepts."""
    decoded = assert_error_or_ok(native_worker, data)
    kind, info, _, _ = native_worker.call("inspect", data)
    assert kind in ("ok", "JpegError"), f"inspect: {kind}: {info}"
    if decoded == "ok":
        assert kind == "ok", "decoded a stream whose index does not parse"
        _, samples = native_worker.decode(data)
        assert samples.shape == (info["height"], info["width"])
        assert samples.dtype == (np.uint8 if info["bits"] == 8 else np.uint16)
        assert _native.check_interval_starts(data, info["interval_starts"])


# ---------------------------------------------------------------------------
# Fuzzer findings, replayed under AddressSanitizer and UBSan

FUZZ_DIR = __import__("pathlib").Path(__file__).resolve().parent / "fuzz"
REPO_ROOT = FUZZ_DIR.parents[1]


def test_fuzz_regressions_under_sanitizers(tmp_path):
    """Every input in tests/fuzz/regressions/ runs through the fuzz harness
    (parse, index, decode, decode-plan strided and placed by table, the
    kernels' harness) built with ASan + UBSan: a memory error in the core
    fails here deterministically, whatever the heap layout. Valid streams go
    with them, so the plan paths decode (and must agree) on real data too.
    Built without -fwrapv, as the CUDA device code is: a signed overflow (a
    16-bit quantization table of 65535s overflows the 8-bit IDCT's 32-bit
    sums) is undefined behaviour there and fails here."""
    import shutil
    import subprocess

    compiler = shutil.which("clang++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    inputs = sorted(str(p) for p in (FUZZ_DIR / "regressions").iterdir())
    assert inputs
    for k, data in enumerate([SMALL_8BIT, SMALL_12BIT, stream(8, (40, 67), restart=3, seed=2),
                              stream(12, (33, 20), restart=0, seed=3)]):
        valid = tmp_path / f"valid{k}.jpg"
        valid.write_bytes(data)
        inputs.append(str(valid))
    binary = tmp_path / "replay"
    build = subprocess.run(
        [compiler, "-std=c++17", "-g", "-O1", "-ffp-contract=off",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-I", str(REPO_ROOT / "xla_ops"), str(FUZZ_DIR / "fuzz_decode.cc"),
         str(FUZZ_DIR / "replay_main.cc"), str(REPO_ROOT / "xla_ops" / "stream_header.cc"),
         "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary), *inputs], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"replayed {len(inputs)} inputs" in run.stderr


def _sanitized_run(tmp_path, harness: str, *sources: str, libraries: tuple = ()) -> str:
    """stdout of tests/fuzz/``harness`` built beside xla_ops/``sources``
    with ASan + UBSan (without -fwrapv: signed overflow is reported),
    linked with ``libraries``, and run; the test fails on a failed build or
    run."""
    import shutil
    import subprocess

    compiler = shutil.which("clang++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / harness.removesuffix(".cc")
    build = subprocess.run(
        [compiler, "-std=c++17", "-g", "-O1", "-ffp-contract=off",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-I", str(REPO_ROOT / "xla_ops"), str(FUZZ_DIR / harness),
         *(str(REPO_ROOT / "xla_ops" / source) for source in sources), "-o", str(binary),
         *(f"-l{library}" for library in libraries)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run.stdout


def test_inflater_under_sanitizers(tmp_path):
    """The plane pieces' inflater (xla_ops/inflate.cc) on 500 streams the
    run writer and zlib wrote (every strategy, levels 1, 6 and 9, ended by
    the final block or a sync flush) and 20,000 mutations of them
    (tests/fuzz/inflate_checks.cc): no read or write past a buffer; every
    stream inflates back; it takes exactly the streams zlib's inflate takes
    as such a piece, with zlib's bytes; Adler-32s (xla_ops/adler32.h) are
    zlib's, alone and written out a stride apart."""
    out = _sanitized_run(tmp_path, "inflate_checks.cc", "inflate.cc", "deflate_runs.cc",
                         "code_lengths.cc", libraries=("z",))
    assert "inflate checks: 500 streams, 20000 mutations, 0 failures" in out


def test_rice_code_under_sanitizers(tmp_path):
    """The quantized vectors' native Rice code (xla_ops/rice_code.cc: counts
    two values at a time or one, the parameter walk, packing, decoding and
    streams cut short) on 4,000 random vectors (tests/fuzz/rice_checks.cc):
    no read or write past a buffer, no signed overflow (found so: the
    two-at-a-time pass summed a failed block's lanes in signed arithmetic),
    the counts a plain reference's."""
    out = _sanitized_run(tmp_path, "rice_checks.cc", "rice_code.cc")
    assert "rice checks: 4000 vectors, 0 failures" in out


def test_repeat_counter_under_sanitizers(tmp_path):
    """The byte planes' repeat counter (xla_ops/repeats.cc, which decides
    whether deflate's string matching is tried) on 400 random buffers with
    repeats at distances up to 40,000 (tests/fuzz/repeats_checks.cc): no
    read past a buffer, the counts a plain reference's."""
    out = _sanitized_run(tmp_path, "repeats_checks.cc", "repeats.cc")
    assert "repeat checks: 400 buffers, 0 failures" in out


def test_run_deflater_under_sanitizers(tmp_path):
    """The byte planes' run deflater (xla_ops/deflate_runs.cc) on 600 random
    buffers of noise, few values, runs and pieces of each, sizes about its
    chunks and stored blocks (tests/fuzz/deflate_runs_checks.cc): no read or
    write past a buffer, the size counted the size written, zlib's inflate
    gives every buffer back; 3,000 count vectors' leaves sorted as a stable
    sort sorts them, their code lengths complete and within their limit."""
    out = _sanitized_run(tmp_path, "deflate_runs_checks.cc", "deflate_runs.cc",
                         "code_lengths.cc", libraries=("z",))
    assert "deflate checks: 600 buffers, 0 failures" in out
