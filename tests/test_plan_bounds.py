"""Plan checks that ResolveInterval (xla_ops/decode_plan.h) makes without a
64-bit division (on the GPU one is a subroutine call that costs registers):
the output-rows bound as a 128-bit product, the restart interval clamped to
the tile. Hostile values that a 64-bit product or sum would wrap must still
be refused, by the host executor and by the CPU harness of the CUDA kernel
(both run the same ResolveInterval), without writing outside the output."""

import pytest

from test_robustness import BIG, T_RESTART, T_STRIDE, run_guarded, tile_edit, valid_plan

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
    error, _, intact = run_guarded(native_worker, plan)
    assert error is not None, "hostile plan accepted"
    assert error[0] in ("JpegError", "ValueError"), error
    assert intact, "run_plan wrote outside its output"

