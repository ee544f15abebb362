"""Plan checks that ResolveInterval (xla_ops/decode_plan.h) makes without a
64-bit division (on the GPU one is a subroutine call that costs registers):
the output-rows bound as a 128-bit product, the restart interval clamped to
the tile. Hostile values that a 64-bit product or sum would wrap must still
be refused, by the host executor and by the CPU harness of the CUDA kernel
(both run the same ResolveInterval), without writing outside the output."""

import re

import numpy as np
import pytest

from jaxjpeg import _native

from test_robustness import (BIG, T_BITS, T_FIRST, T_OUT, T_RESTART, T_STRIDE,
                             assert_refused_inside_outputs, tile_edit, valid_plan)

HOSTILE = {
    # The valid plan's tile sits at row 3 with 13 rows: (3 + 13) * 2^60 = 2^64,
    # 0 in 64 bits, and col0 = 5 <= stride - width.
    "rows_times_stride_wraps_64_bits": tile_edit(T_STRIDE, 2 ** 60),
    # blocks + restart - 1 would overflow int64.
    "restart_interval_int64_max": tile_edit(T_RESTART, BIG),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_plan_is_refused(native_worker, name):
    plan, _ = valid_plan()
    HOSTILE[name](plan)
    assert_refused_inside_outputs(native_worker, plan)



# ---------------------------------------------------------------------------
# The block map of the CUDA decode blocks (decode_plan.h, BuildBlockMap) is
# built on the host from the plan; plans it cannot map are refused there.

def _tiles_plan(firsts, intervals, bits=8):
    """Tiles of one 8-bit float32 output starting at intervals ``firsts``."""
    tiles = np.zeros((len(firsts), _native.TILE_COLUMNS), np.int64)
    tiles[:, T_BITS] = bits
    tiles[:, T_FIRST] = firsts
    return np.zeros(intervals + 1, np.int64), tiles


def _edited(firsts, intervals, column=None, value=None):
    starts, tiles = _tiles_plan(firsts, intervals)
    if column is not None:
        tiles[-1, column] = value
    return starts, tiles


HOSTILE_MAPS = {
    "first_tile_not_at_interval_0": (_edited([1, 5], 10), "first tile must start at interval 0"),
    "tiles_out_of_order": (_edited([0, 7, 5], 10), "tile 1: its intervals [7, 5)"),
    "tile_without_intervals": (_edited([0, 4, 4], 10), "tile 1: its intervals [4, 4)"),
    "tile_past_the_plan": (_edited([0, 11], 10), "tile 0: its intervals [0, 11)"),
    "no_tiles": ((np.zeros(4, np.int64), np.zeros((0, _native.TILE_COLUMNS), np.int64)),
                 "first tile must start at interval 0"),
    "bits_10": (_edited([0, 3], 10, T_BITS, 10), "tile 1: bits must be 8 or 12"),
    "output_past_end": (_edited([0, 3], 10, T_OUT, 1), "tile 1: output index out of range"),
    "output_negative": (_edited([0, 3], 10, T_OUT, -1), "tile 1: output index out of range"),
    "first_int64_max": (_edited([0, 2 ** 63 - 1], 10), "tile 0: its intervals [0, 922"),
}


@pytest.mark.parametrize("name", list(HOSTILE_MAPS))
def test_block_map_refuses_plans_it_cannot_map(name):
    (starts, tiles), message = HOSTILE_MAPS[name]
    with pytest.raises(ValueError, match="^decode plan refused: .*" + re.escape(message)):
        _native.block_map(starts, tiles, [0])


def test_block_map_refuses_unknown_output_types():
    starts, tiles = _tiles_plan([0, 3], 10)
    with pytest.raises(ValueError, match="unknown output type"):
        _native.block_map(starts, tiles, [3])


def test_block_map_rows():
    """Row b: the tile of interval 256 b and the kinds among its 256 intervals
    (bit 3 * (bits == 12) + output type)."""
    firsts = [0, 100, 300, 301, 700]
    starts, tiles = _tiles_plan(firsts, 900)
    tiles[2, T_BITS] = 12
    tiles[3, T_OUT] = 1
    got = _native.block_map(starts, tiles, [0, 2])
    want_tiles = [0, 1, 3, 4]                  # intervals 0, 256, 512, 768
    want_kinds = [1, 1 | 8 | 4, 4 | 1, 1]      # 8-bit f32, 12-bit f32, 8-bit f16
    np.testing.assert_array_equal(got, np.array([want_tiles, want_kinds]).T)


def test_the_bindings_refuse_buffers_that_are_not_c_contiguous():
    """Found by review: only the last axis's stride was checked, so a
    reversed or broadcast view read past its memory (crc32c of a broadcast
    16-byte buffer read 1 GiB; a segfault)."""
    from jaxjpeg import _native
    base = np.arange(64, dtype=np.uint8)
    for view in (base[::-1], base[::2], np.broadcast_to(base[:16], (1 << 20, 16)),
                 base.reshape(8, 8)[:, ::-1]):
        with pytest.raises(ValueError, match="C-contiguous"):
            _native.crc32c(view)
    assert _native.crc32c(base.reshape(8, 8)) == _native.crc32c(base.tobytes())


def test_run_plan_refuses_an_output_sharing_memory_with_an_operand():
    """Found by review: an output viewing the positions array let the
    decode rewrite placement offsets as it wrote and then write anywhere."""
    from jaxjpeg import _native
    data = _native.encode(np.full((16, 8), 100, np.float32), _native.quality_table(90, 8), bits=8)
    info = _native.inspect(data)
    positions = np.array([17] * 8 + [0] * 8 + [0] * 8, np.int64)
    tiles = np.array([[0, 8, 8, 16, 0, 0, 0, 16, 0, 0, 0, -1, 0]], np.int64)
    args = (np.frombuffer(data, np.uint8), np.asarray(info["interval_starts"], np.int64), tiles,
            np.asarray(info["tables"]), np.zeros(16, np.float32), np.ones(16, np.float32))
    with pytest.raises(ValueError, match="shares memory"):
        _native.run_plan(*args, [positions.view(np.float32)], [0], 1, None, positions)
    out = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _native.run_plan(*args, [out, out[8:]], [0, 0], 1, None, positions)
