"""A decode call carries each tile's Huffman and quantization tables packed
(the DHT and DQT contents, 672 bytes) and every executor builds the lookup
tables it decodes with (19.5 KB) where it decodes: the host's workers, the
CUDA table kernel (run here by its CPU harness) and the XLA custom call."""

import jax
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import _native, codec, ops

OK, BAD_HUFFMAN_TABLE, BAD_QUANT_TABLE = 0, 3, 5
# PackedTables: DC counts[16] symbols[256], AC counts[16] symbols[256], quant uint16[64].
DC_COUNTS, DC_SYMBOLS, AC_COUNTS, AC_SYMBOLS, QUANT = 0, 16, 272, 288, 544


@pytest.fixture(scope="module")
def plan():
    rng = np.random.default_rng(3)
    encs = [jaxjpeg.encode_tensor((rng.standard_normal(shape) * 0.05).astype(np.float32),
                                  bits=bits, quant_step=step, restart_interval=2,
                                  tile_shape=(40, 256))
            for shape, bits, step in [((90, 300), 8, 2), ((50, 70), 12, 5), ((8, 600), 8, 9)]]
    return codec.build_plan(encs, [np.float32] * len(encs))


def _packed(plan):
    return plan.tables.reshape(-1, _native.PACKED_TABLES_SIZE)


def test_a_plan_carries_each_tables_dht_and_dqt_not_its_lookup_tables(plan):
    """The table operand had been the built lookup tables, 19.5 KB a tile: 38%
    of a CNN checkpoint's compressed bytes more to hold on the host and move
    to the device."""
    assert _native.PACKED_TABLES_SIZE == 672 < _native.DECODER_TABLES_SIZE
    packed = _packed(plan)
    assert len(packed) == len({row.tobytes() for row in packed}) > 3
    assert plan.tables.size == len(packed) * 672
    assert plan.tables.size <= 1024 * len(plan.tiles)


def test_the_table_kernels_phases_build_the_hosts_tables(plan):
    for row in _packed(plan):
        host, host_status = _native.build_tables(row.tobytes())
        kernel, kernel_status = _native.build_tables(row.tobytes(), kernel_phases=True)
        assert host_status == kernel_status == OK
        assert host == kernel


def _hostile(plan, edit):
    packed = _packed(plan).copy()
    edit(packed[0])
    return packed


def _set(offset, values):
    def edit(row):
        row[offset:offset + len(values)] = values
    return edit


def _set_quant_zero(row):
    row[QUANT + 2:QUANT + 4] = 0  # natural-order step 1


HOSTILE_TABLES = {
    # Two codes of one bit leave none for the reserved all-ones code.
    "dc_over_subscribed": (_set(DC_COUNTS, [2] + [0] * 15), BAD_HUFFMAN_TABLE),
    "ac_without_codes": (_set(AC_COUNTS, [0] * 16), BAD_HUFFMAN_TABLE),
    "ac_more_than_256_symbols": (_set(AC_COUNTS, [0] * 8 + [255] * 8), BAD_HUFFMAN_TABLE),
    "dc_symbol_above_15": (_set(DC_SYMBOLS, [16]), BAD_HUFFMAN_TABLE),
    "zero_quant_step": (_set_quant_zero, BAD_QUANT_TABLE),
}


@pytest.mark.parametrize("name", list(HOSTILE_TABLES))
def test_tables_the_file_could_not_define_decode_nothing_on_every_executor(plan, name):
    """The operands are untrusted: a table that fails to build decodes none of
    its intervals (NaN, and the first of them named), on the host's workers,
    the CUDA kernels' harness and the XLA custom call alike."""
    edit, status = HOSTILE_TABLES[name]
    packed = _hostile(plan, edit)
    host, host_status = _native.build_tables(packed[0].tobytes())
    kernel, kernel_status = _native.build_tables(packed[0].tobytes(), kernel_phases=True)
    assert host_status == kernel_status == status
    assert host == kernel
    tables = packed.reshape(-1)
    bad = plan.tiles[:, 0] == 0
    first = int(plan.tiles[bad][0, 9])
    expected = codec.run_plan(plan)
    for run in (_native.run_plan, _native.run_plan_kernel_harness):
        outputs = [np.zeros(s, np.float32) for s in plan.output_shapes]
        with pytest.raises(jaxjpeg.JpegError,
                           match=f"interval {first}: invalid Huffman code"):
            run(plan.payload, plan.interval_starts, plan.tiles, tables, plan.row_scale,
                plan.row_offset, outputs, [0] * len(outputs), col_scale=plan.col_scale)
        _check_only_bad_tiles_are_nan(plan, bad, outputs, expected)
    operands = dict(zip(ops.OPERAND_NAMES, ops.plan_operands(plan)))
    operands["tables"] = tables
    with pytest.raises(jaxjpeg.JpegError, match=f"interval {first}: invalid Huffman code"):
        ops.run_checked(jax.jit(lambda *a: ops.decode_plan(plan, a)), list(operands.values()))


def _check_only_bad_tiles_are_nan(plan, bad, outputs, expected):
    for t, tile in enumerate(plan.tiles):
        _, _, width, height, out, row0, col0 = tile[:7]
        got = outputs[out][row0:row0 + height, col0:col0 + width]
        if bad[t]:
            assert np.isnan(got).all()
        else:
            np.testing.assert_array_equal(got, expected[out][row0:row0 + height, col0:col0 + width])
