"""GPU decode checks, skipped (with the reason shown) on machines without a
CUDA device (tests/conftest.py): the CUDA handler must produce the same bits
as the CPU handler from the same bytes."""

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import codec, ops
from placed_views import placed_encodings
from stream_damage import STREAM_DAMAGE, damage_interval_end, interval_markers


def _gpu():
    return jax.devices("gpu")[0]


def _encodings(count, seed=0):
    rng = np.random.default_rng(seed)
    encs = []
    for k in range(count):
        shape = (int(rng.integers(1, 300)), int(rng.integers(1, 700)))
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        encs.append(jaxjpeg.encode_tensor(x, bits=12 if k % 4 == 3 else 8, quant_step=2 + k % 9,
                                          restart_interval=k % 5, tile_shape=(128, 256)))
    return encs


def _decode_on(device, plan):
    operands = jax.device_put(ops.plan_operands(plan), device)
    decode = ops.plan_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                              plan.output_shapes)
    status, outputs = decode(*operands)
    return np.asarray(status), [np.asarray(o) for o in outputs]


def _assert_gpu_equals_cpu(plan):
    """The CUDA handler's status and bits are the CPU handler's."""
    cpu_status, cpu = _decode_on(jax.devices("cpu")[0], plan)
    gpu_status, gpu = _decode_on(_gpu(), plan)
    ops.check_status(cpu_status)
    ops.check_status(gpu_status)
    for a, b in zip(cpu, gpu):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_gpu_equals_cpu_bit_for_bit(dtype):
    _assert_gpu_equals_cpu(codec.build_plan(_encodings(40), [dtype] * 40))


def test_gpu_writes_placed_views_like_the_cpu_and_the_harness():
    """Tensors whose views move data, written in their own layout by the
    kernels (one store per element, or a column of 8 where rows are
    consecutive): the CPU handler's and the harness's bits."""
    specs = [((3, 3, 64, 96), (3, 2, 0, 1), 1), ((256, 384), (1, 0), 1),
             ((5, 12, 20), (2, 0, 1), 2)]
    plan = codec.build_plan(*placed_encodings(specs, seed=4, tile_shape=(64, 96), steps=5),
                            placed=True)
    assert (plan.tiles[:, -1] >= 0).all()
    _assert_gpu_equals_cpu(plan)
    assert _gpu_equals_harness(plan) is None


def test_gpu_one_call_many_tensors_mixed_dtypes():
    encs = _encodings(150, seed=1)
    dtypes = [[np.float32, ml_dtypes.bfloat16, np.float16][k % 3] for k in range(150)]
    plan = codec.build_plan(encs, dtypes)
    expected = codec.run_plan(plan)
    status, gpu = _decode_on(_gpu(), plan)
    ops.check_status(status)
    for a, b in zip(expected, gpu):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_gpu_reports_corrupt_interval_in_status():
    plan = codec.build_plan(_encodings(3, seed=2), [np.float32] * 3)
    payload = plan.payload.copy()
    start = int(plan.interval_starts[0])
    payload[start:start + 32] = 0xFF
    operands = list(ops.plan_operands(plan))
    operands[0] = payload
    decode = ops.plan_decoder(plan.output_shapes, ("float32",) * 3, plan.output_shapes)
    status, _ = decode(*jax.device_put(tuple(operands), _gpu()))
    with pytest.raises(jaxjpeg.JpegError, match="restart interval"):
        ops.check_status(status)


def test_gpu_restore_matches_cpu_restore(tmp_path):
    rng = np.random.default_rng(3)
    tree = {"w": (rng.standard_normal((1024, 768)) * 0.02).astype(np.float32),
            "b": np.zeros(768, np.float32)}
    path = tmp_path / "m.jjpg"
    jaxjpeg.save(path, tree)
    on_gpu = jaxjpeg.restore(path, device=_gpu())
    on_cpu = jaxjpeg.restore(path, device=jax.devices("cpu")[0])
    assert on_gpu["w"].devices() == {_gpu()}
    np.testing.assert_array_equal(np.asarray(on_gpu["w"]), np.asarray(on_cpu["w"]))


def test_decode_inside_jit_on_gpu(tmp_path):
    rng = np.random.default_rng(4)
    tree = {"w": (rng.standard_normal((512, 512)) * 0.02).astype(np.float32)}
    path = tmp_path / "m.jjpg"
    jaxjpeg.save(path, tree)
    compressed = jaxjpeg.load(path, device=_gpu())
    # An exact op after the decode: a float32 matmul on the GPU may run in
    # TF32, which would test XLA's precision rather than the decoder.
    out = jax.jit(lambda t: 2.0 * jaxjpeg.decode(t)["w"])(compressed)
    reference = 2.0 * np.asarray(jaxjpeg.restore(path, device=jax.devices("cpu")[0])["w"])
    np.testing.assert_array_equal(np.asarray(out), reference)


def _plan_outputs(plan):
    return [np.zeros(s, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]


def _many_kinds(seed=21):
    """Small tiles (a 128-interval block spans many tiles and tables: several
    staging rounds), 8- and 12-bit, every output type."""
    rng = np.random.default_rng(seed)
    encs, dtypes = [], []
    for k in range(30):
        shape = (int(rng.integers(5, 90)), int(rng.integers(9, 200)))
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        encs.append(jaxjpeg.encode_tensor(x, bits=12 if k % 3 == 1 else 8, quant_step=2 + k % 5,
                                          restart_interval=k % 5, tile_shape=(24, 64)))
        dtypes.append([np.float32, ml_dtypes.bfloat16, np.float16][k % 3])
    return codec.build_plan(encs, dtypes)


def test_gpu_kernels_per_kind_equal_cpu_and_harness():
    plan = _many_kinds()
    cpu_status, cpu = _decode_on(jax.devices("cpu")[0], plan)
    gpu_status, gpu = _decode_on(_gpu(), plan)
    ops.check_status(cpu_status)
    ops.check_status(gpu_status)
    harness = _plan_outputs(plan)
    from jaxjpeg import _native
    _native.run_plan_kernel_harness(
        plan.payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
        plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in harness],
        [codec.output_type(d) for d in plan.output_dtypes], col_scale=plan.col_scale,
        block_map=plan.block_map)
    for a, b, c in zip(cpu, gpu, harness):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
        np.testing.assert_array_equal(b.view(np.uint8), c.view(np.uint8))


@pytest.mark.parametrize("bits", [8, 12])
def test_gpu_staged_warps_equal_cpu_and_harness(bits):
    """Tiles 2,048 wide at restart intervals 1, 2 and 8 (warps whose 32 blocks
    of a step are whole blocks of one tile: the staged output of
    decode_kernel.h), beside partial edge blocks, a column scale, damaged
    intervals inside staged warps, every output type: GPU, host decoder and
    the kernels' CPU harness give the same bits and status, and the harness
    counts staged steps."""
    from jaxjpeg import _native
    rng = np.random.default_rng(bits)
    encs = [jaxjpeg.encode_tensor((rng.standard_normal(shape) * 0.05).astype(np.float32),
                                  bits=bits, quant_step=3 if bits == 8 else 40,
                                  restart_interval=restart, tile_shape=(32, 2048), col_weight=cw)
            for shape, restart, cw in (((64, 2048), 1, None), ((48, 2048), 2, None),
                                       ((32, 2048), 8, np.exp(rng.standard_normal(2048))),
                                       ((36, 2000), 1, None))]
    for dtype in (np.float32, ml_dtypes.bfloat16, np.float16):
        plan = codec.build_plan(encs, [dtype] * len(encs))
        payload = plan.payload.copy()
        for i in (40, 700):
            payload[plan.interval_starts[i] + 1:plan.interval_starts[i] + 3] = [0xFF, 0xD3]
        types = [codec.output_type(d) for d in plan.output_dtypes]
        host, harness, counts = _plan_outputs(plan), _plan_outputs(plan), np.zeros(2, np.int64)
        with pytest.raises(jaxjpeg.JpegError, match="restart interval 40:") as raised:
            _native.run_plan(payload, plan.interval_starts, plan.tiles, plan.tables,
                             plan.row_scale, plan.row_offset,
                             [o.view(np.uint16) if o.itemsize == 2 else o for o in host], types,
                             threads=1, col_scale=plan.col_scale)
        with pytest.raises(jaxjpeg.JpegError, match="restart interval 40:"):
            _native.run_plan_kernel_harness(
                payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
                plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in harness],
                types, col_scale=plan.col_scale, block_map=plan.block_map, step_counts=counts)
        assert counts[0] > 0 and counts[1] > 0, counts
        operands = list(ops.plan_operands(plan))
        operands[0] = payload
        decode = ops.plan_decoder(plan.output_shapes, (np.dtype(dtype).name,) * len(encs),
                                  plan.output_shapes)
        status, gpu = decode(*jax.device_put(tuple(operands), _gpu()))
        assert _native.plan_failure(int(np.asarray(status).reshape(-1)[0])) == str(raised.value)
        for a, b, c in zip(host, gpu, harness):
            np.testing.assert_array_equal(a.view(np.uint8), np.asarray(b).view(np.uint8))
            np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))


@pytest.mark.parametrize("seed", range(3))
def test_gpu_corrupt_payload_same_status_and_nan_as_cpu(seed):
    """Random byte damage: the GPU's status word names the failure the host
    decoder raises, and the outputs (NaN where intervals failed) are the same bits."""
    from jaxjpeg import _native
    plan = _many_kinds(seed)
    rng = np.random.default_rng(seed)
    payload = plan.payload.copy()
    where = rng.integers(0, payload.size, 16)
    payload[where] = rng.integers(0, 256, 16).astype(np.uint8)
    host = _plan_outputs(plan)
    with pytest.raises(jaxjpeg.JpegError) as raised:
        _native.run_plan(payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
                         plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in host],
                         [codec.output_type(d) for d in plan.output_dtypes], threads=1,
                         col_scale=plan.col_scale)
    operands = list(ops.plan_operands(plan))
    operands[0] = payload
    decode = ops.plan_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                              plan.output_shapes)
    status, gpu = decode(*jax.device_put(tuple(operands), _gpu()))
    assert _native.plan_failure(int(np.asarray(status).reshape(-1)[0])) == str(raised.value)
    for a, b in zip(host, gpu):
        np.testing.assert_array_equal(a.view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("poisoned", [None, 3])
def test_gpu_table_kernel_builds_the_hosts_tables(poisoned):
    """The table kernel builds each tile's lookup tables from the plan's
    packed ones: with every table sound the GPU's bits are the host's; with
    one over-subscribed (two 1-bit DC codes), its intervals fail with the
    host's status and NaN, the others decode alike."""
    from jaxjpeg import _native
    plan = _many_kinds(5)
    tables = plan.tables.reshape(-1, _native.PACKED_TABLES_SIZE).copy()
    if poisoned is not None:
        tables[poisoned, :16] = [2] + [0] * 15
    host = _plan_outputs(plan)
    raised = None
    try:
        _native.run_plan(plan.payload, plan.interval_starts, plan.tiles, tables.reshape(-1),
                         plan.row_scale, plan.row_offset,
                         [o.view(np.uint16) if o.itemsize == 2 else o for o in host],
                         [codec.output_type(d) for d in plan.output_dtypes], threads=1,
                         col_scale=plan.col_scale)
    except jaxjpeg.JpegError as e:
        raised = str(e)
    assert (raised is None) == (poisoned is None)
    operands = list(ops.plan_operands(plan))
    operands[ops.OPERAND_NAMES.index("tables")] = tables.reshape(-1)
    decode = ops.plan_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                              plan.output_shapes)
    status, gpu = decode(*jax.device_put(tuple(operands), _gpu()))
    code = int(np.asarray(status).reshape(-1)[0])
    assert (code == _native.PLAN_OK) if raised is None else _native.plan_failure(code) == raised
    for a, b in zip(host, gpu):
        np.testing.assert_array_equal(a.view(np.uint8), np.asarray(b).view(np.uint8))


def test_gpu_decode_under_cuda_graphs(tmp_path):
    """The handler is marked command-buffer compatible: with XLA capturing
    custom calls into CUDA graphs, the bits must not change."""
    import os
    import subprocess
    import sys
    script = tmp_path / "graph.py"
    script.write_text(
        "import jax, numpy as np, jaxjpeg\n"
        "from jaxjpeg import codec, ops\n"
        "rng = np.random.default_rng(0)\n"
        "x = (rng.standard_normal((300, 700)) * 0.05).astype(np.float32)\n"
        "plan = codec.build_plan([jaxjpeg.encode_tensor(x, quant_step=3)], [np.float32])\n"
        "decode = ops.plan_decoder(plan.output_shapes, ('float32',), plan.output_shapes)\n"
        "ops_gpu = jax.device_put(ops.plan_operands(plan), jax.devices('gpu')[0])\n"
        "outs = [np.asarray(decode(*ops_gpu)[1][0]) for _ in range(3)]\n"
        "ref = codec.run_plan(plan)[0]\n"
        "assert all(np.array_equal(o.view(np.uint8), ref.view(np.uint8)) for o in outs)\n"
        "print('graph ok')\n")
    env = dict(os.environ, XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL "
               "--xla_gpu_graph_min_graph_size=1")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "graph ok" in run.stdout, run.stderr[-3000:]


def _gpu_decode_operands(plan, operands):
    decode = ops.plan_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                              plan.output_shapes)
    status, outputs = decode(*jax.device_put(tuple(operands), _gpu()))
    return int(np.asarray(status).reshape(-1)[0]), [np.asarray(o) for o in outputs]


def _harness_run(plan, payload, starts, block_map):
    """(packed status or PLAN_OK, outputs) of the kernels' CPU harness."""
    from jaxjpeg import _native
    outs = _plan_outputs(plan)
    try:
        _native.run_plan_kernel_harness(
            payload, starts, plan.tiles, plan.tables, plan.row_scale, plan.row_offset,
            [o.view(np.uint16) if o.itemsize == 2 else o for o in outs],
            [codec.output_type(d) for d in plan.output_dtypes], col_scale=plan.col_scale,
            block_map=block_map, positions=plan.positions)
        error = None
    except jaxjpeg.JpegError as e:
        error = str(e)
    return error, outs


def _gpu_equals_harness(plan, payload=None, starts=None, block_map=None):
    """The destuff kernel, the decode kernels and the check kernel on the GPU
    give the harness's status and bits (NaN included); returns the error."""
    from jaxjpeg import _native
    payload = plan.payload if payload is None else payload
    starts = plan.interval_starts if starts is None else starts
    block_map = plan.block_map if block_map is None else block_map
    operands = list(ops.plan_operands(plan))
    operands[0], operands[1] = payload, starts.view(np.int32)
    operands[ops.OPERAND_NAMES.index("block_map")] = block_map.reshape(-1)
    status, gpu = _gpu_decode_operands(plan, operands)
    error, harness = _harness_run(plan, payload, starts, block_map)
    assert (None if status == _native.PLAN_OK else _native.plan_failure(status)) == error
    for a, b in zip(harness, gpu):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    return error


@pytest.mark.parametrize("kind", STREAM_DAMAGE)
def test_gpu_destuffed_intervals_follow_the_host_on_stream_damage(kind):
    """Trailing bytes, a lone 0xFF, early markers (phantom bits), fill bytes
    and extra stuffing at interval ends: the destuff kernel and the
    destuffed reader give the host's status and bits."""
    plan = _many_kinds(5)
    payload = plan.payload.copy()
    for marker in interval_markers(payload, plan.interval_starts)[::3]:
        damage_interval_end(kind, payload, marker)
    error = _gpu_equals_harness(plan, payload=payload)
    assert error == _harness_run(plan, payload, plan.interval_starts, None)[0]


def test_gpu_unusable_starts_decode_nothing():
    from jaxjpeg import _native
    plan = _many_kinds(6)
    starts = plan.interval_starts.copy()
    starts[7] = starts[8] + 1
    error = _gpu_equals_harness(plan, starts=starts)
    assert error == _native.plan_failure(_native.pack_plan_status(7, 11))


def test_gpu_block_map_hints_and_skipped_kinds():
    """Tile hints of any value change nothing; a map that skips a block's
    kinds is reported by the check kernel (interval 256)."""
    plan = _many_kinds(7)
    rng = np.random.default_rng(7)
    hinted = plan.block_map.copy()
    hinted[:, 0] = rng.integers(-5, len(plan.tiles) + 5, len(hinted))
    assert _gpu_equals_harness(plan, block_map=hinted) is None
    skipped = plan.block_map.copy()
    skipped[1, 1] = 0
    assert "restart interval 256:" in _gpu_equals_harness(plan, block_map=skipped)
