"""The CUDA decode kernels' phases (claim, stage, rounds of table staging,
decode into a thread's column of the shared block array) run on the CPU by
``run_plan_kernel_harness``, checked bit for bit against libjpeg-turbo (the
independent oracle) and against the host decoder, on plans whose 128-interval
blocks mix tiles, tables, bit depths and output types."""

import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import _native, codec
from oracle import expected_tensor

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def _harness(plan, payload=None):
    outputs = [np.full(s, np.nan, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
    _native.run_plan_kernel_harness(
        plan.payload if payload is None else payload, plan.interval_starts, plan.tiles,
        plan.tables, plan.row_scale, plan.row_offset,
        [o.view(np.uint16) if o.itemsize == 2 else o for o in outputs],
        [codec.output_type(d) for d in plan.output_dtypes], col_scale=plan.col_scale)
    return outputs


def _bits(a):
    return np.asarray(a).view(np.uint8)


@pytest.fixture(scope="module")
def many_kinds():
    """Small tiles (so a 128-interval block spans several tiles and tables),
    8- and 12-bit, every output type, restart intervals 0..4."""
    rng = np.random.default_rng(21)
    encs, dtypes = [], []
    for k in range(12):
        shape = (int(rng.integers(5, 90)), int(rng.integers(9, 200)))
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        encs.append(jaxjpeg.encode_tensor(x, bits=12 if k % 3 == 1 else 8, quant_step=2 + k % 5,
                                          restart_interval=k % 5, tile_shape=(24, 64)))
        dtypes.append(DTYPES[k % 3])
    return encs, dtypes


def test_harness_matches_libjpeg_turbo(many_kinds):
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    assert plan.tables.size // _native.DECODER_TABLES_SIZE > 12  # several rounds per block
    for enc, dtype, got in zip(encs, dtypes, _harness(plan)):
        want = expected_tensor(enc, dtype).reshape(got.shape)
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_harness_matches_host_decoder(many_kinds):
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    for want, got in zip(codec.run_plan(plan), _harness(plan)):
        np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("seed", range(4))
def test_harness_and_host_agree_on_corrupt_payloads(many_kinds, seed):
    """Random byte damage: the same status word and the same output bits
    (NaN exactly where the host decoder puts it)."""
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    rng = np.random.default_rng(seed)
    payload = plan.payload.copy()
    where = rng.integers(0, payload.size, 12)
    payload[where] = rng.integers(0, 256, 12).astype(np.uint8)
    types = [codec.output_type(d) for d in dtypes]

    def run(fn, **kw):
        outs = [np.zeros(s, d) for s, d in zip(plan.output_shapes, dtypes)]
        try:
            fn(payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
               plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in outs],
               types, col_scale=plan.col_scale, **kw)
            error = None
        except jaxjpeg.JpegError as e:
            error = str(e)
        return error, outs

    host_error, host = run(_native.run_plan, threads=1)
    harness_error, harness = run(_native.run_plan_kernel_harness)
    assert host_error is not None and harness_error == host_error
    for want, got in zip(host, harness):
        np.testing.assert_array_equal(_bits(got), _bits(want))
