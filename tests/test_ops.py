"""The decode primitive on the CPU: the real XLA custom call, checked bit for
bit against the codec core, plus the CUDA kernel body run by the CPU harness."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import _native, codec, ops
from jaxjpeg.views import MatrixView

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def _tensor(rng, shape, scale=0.05):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _decode_checked(plan, operands=None):
    """The primitive under jit; a failure raises on any platform (the CPU
    handler raises itself, the CUDA handler reports through the status word)."""
    operands = ops.plan_operands(plan) if operands is None else operands
    status, outputs = jax.jit(lambda *a: ops.decode_plan(plan, a))(*operands)
    ops.check_status(status)
    return outputs


def _operands_padded_alike(plans):
    """Operands of plans of equal structure, payloads zero-padded to one size
    (so one compiled program, or one vmap, serves them all)."""
    operands = [list(ops.plan_operands(p)) for p in plans]
    width = max(o[0].size for o in operands)
    for o in operands:
        o[0] = np.pad(o[0], (0, width - o[0].size))
    return operands


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint8)


@pytest.fixture(scope="module")
def mixed():
    """Encoded tensors of several shapes, bit depths and rates."""
    rng = np.random.default_rng(0)
    shapes = [(1,), (7, 9), (3, 3, 8, 16), (65, 300), (17, 1031), (2, 8, 8)]
    encs = []
    for k, shape in enumerate(shapes):
        bits = 12 if k % 3 == 2 else 8
        encs.append(jaxjpeg.encode_tensor(_tensor(rng, shape), bits=bits, quant_step=2 + k,
                                          restart_interval=k % 4, tile_shape=(40, 512)))
    return encs


@pytest.mark.parametrize("dtype", DTYPES)
def test_jit_matches_core_bit_for_bit(mixed, dtype):
    plan = codec.build_plan(mixed, [dtype] * len(mixed))
    expected = codec.run_plan(plan)
    outputs = _decode_checked(plan)
    for want, got in zip(expected, outputs):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(_bits(want), _bits(got))


def test_kernel_harness_matches_core(mixed):
    """The CUDA kernel's (block, thread) body and table staging, run on the CPU."""
    plan = codec.build_plan(mixed, [np.float32] * len(mixed))
    assert plan.tables.size // _native.PACKED_TABLES_SIZE > 1  # staging hits and misses
    expected = codec.run_plan(plan)
    outputs = [np.full(s, np.nan, np.float32) for s in plan.output_shapes]
    _native.run_plan_kernel_harness(plan.payload, plan.interval_starts, plan.tiles, plan.tables,
                                    plan.row_scale, plan.row_offset, outputs, [0] * len(outputs),
                                    block_map=plan.block_map)
    for want, got in zip(expected, outputs):
        np.testing.assert_array_equal(_bits(want), _bits(got))


def test_one_call_decodes_over_100_tensors():
    rng = np.random.default_rng(1)
    tensors = [_tensor(rng, (int(rng.integers(1, 40)), int(rng.integers(1, 90)))) for _ in range(120)]
    encs = [jaxjpeg.encode_tensor(t, quant_step=3) for t in tensors]
    dtypes = [DTYPES[k % 3] for k in range(len(encs))]
    plan = codec.build_plan(encs, dtypes)
    expected = codec.run_plan(plan)
    outputs = _decode_checked(plan)
    assert len(outputs) == 120
    for want, got, dtype in zip(expected, outputs, dtypes):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(_bits(want), _bits(got))


def test_vmap_over_payloads_of_equal_structure():
    rng = np.random.default_rng(2)
    encs = [jaxjpeg.encode_tensor(_tensor(rng, (24, 40)), quant_step=4, restart_interval=2) for _ in range(3)]
    plans = [codec.build_plan([e], [np.float32]) for e in encs]
    operands = _operands_padded_alike(plans)
    stacked = [np.stack(column) for column in zip(*operands)]
    decode = lambda *a: ops.decode_plan(plans[0], a)[1][0]  # noqa: E731
    batched = jax.jit(jax.vmap(decode))(*stacked)
    assert batched.shape == (3, 24, 40)
    for k, enc in enumerate(encs):
        np.testing.assert_array_equal(np.asarray(batched[k]), jaxjpeg.decode_tensor(enc))


def test_vmap_over_no_payloads_gives_empty_outputs():
    """Found by review: an empty batch failed inside the batching rule with
    'not enough values to unpack'."""
    rng = np.random.default_rng(2)
    plan = codec.build_plan([jaxjpeg.encode_tensor(_tensor(rng, (24, 40)), quant_step=4)],
                            [np.float32])
    empty = [np.zeros((0, *o.shape), o.dtype) for o in ops.plan_operands(plan)]
    decode = lambda *a: ops.decode_plan(plan, a)[1][0]  # noqa: E731
    for fn in (jax.vmap(decode), jax.jit(jax.vmap(decode))):
        out = fn(*empty)
        assert out.shape == (0, 24, 40) and out.dtype == np.float32


def test_repeated_calls_reuse_the_compiled_program():
    rng = np.random.default_rng(3)
    encs = [jaxjpeg.encode_tensor(_tensor(rng, (16, 64)), quant_step=4) for _ in range(2)]
    plans = [codec.build_plan([e], [np.float32]) for e in encs]
    operands = _operands_padded_alike(plans)  # one operand shape: one program
    decode = jax.jit(lambda *a: ops.decode_plan(plans[0], a)[1][0])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    first = decode(*operands[0])
    after_first = len(compiles)
    second = decode(*operands[1])
    assert after_first >= 1
    assert len(compiles) == after_first  # no new backend compile
    np.testing.assert_array_equal(np.asarray(first), jaxjpeg.decode_tensor(encs[0]))
    np.testing.assert_array_equal(np.asarray(second), jaxjpeg.decode_tensor(encs[1]))


def test_corrupt_payload_raises_clear_error():
    rng = np.random.default_rng(4)
    enc = jaxjpeg.encode_tensor(_tensor(rng, (64, 256)), quant_step=2)
    plan = codec.build_plan([enc], [np.float32])
    operands = list(ops.plan_operands(plan))
    payload = operands[0].copy()
    first_data = int(plan.interval_starts[0])
    payload[first_data:first_data + 64] = 0xFF  # invalid Huffman codes / markers
    operands[0] = payload
    with pytest.raises(Exception, match="decode failed in restart interval"):
        _decode_checked(plan, operands)


def test_hostile_plan_is_refused_not_written():
    rng = np.random.default_rng(5)
    enc = jaxjpeg.encode_tensor(_tensor(rng, (16, 16)), quant_step=2)
    plan = codec.build_plan([enc], [np.float32])
    operands = list(ops.plan_operands(plan))
    tiles = plan.tiles.copy()
    tiles[0, 5] = 10_000  # row0 far outside the output
    operands[2] = tiles.reshape(-1).view(np.int32)
    with pytest.raises(Exception, match="invalid argument"):
        _decode_checked(plan, operands)


def test_grad_is_a_clear_error():
    rng = np.random.default_rng(6)
    enc = jaxjpeg.encode_tensor(_tensor(rng, (8, 8)), quant_step=2)
    plan = codec.build_plan([enc], [np.float32])
    operands = ops.plan_operands(plan)

    def loss(scale):
        ops_ = (*operands[:4], scale, operands[5])
        return jnp.sum(ops.decode_plan(plan, ops_)[1][0])

    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(loss)(jnp.asarray(operands[4]))


def test_cuda_module_built_where_nvcc_exists():
    """Wherever nvcc is on PATH (or CI sets JAXJPEG_REQUIRE_CUDA_BUILD) the CUDA
    module must have been built: a CUDA build break fails here. Without nvcc
    the module must be absent (nothing could have built it), and the "cuda"
    lowering is then not registered."""
    import os
    import shutil

    from jaxjpeg import lowering
    if shutil.which("nvcc") or os.environ.get("JAXJPEG_REQUIRE_CUDA_BUILD"):
        assert lowering.cuda_available(), "nvcc exists but jaxjpeg._native_cuda was not built"
        from jaxjpeg import _native_cuda
        assert "jaxjpeg_decode" in _native_cuda.ffi_targets()
    else:
        assert not lowering.cuda_available()
        with pytest.raises(ImportError):
            __import__("jaxjpeg._native_cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_corrupt_interval_decodes_to_nan_not_to_garbage(dtype):
    """Inside jit on a GPU nothing raises: the failing interval's weights must
    be NaN (and only its weights), while the status word names it."""
    rng = np.random.default_rng(7)
    enc = jaxjpeg.encode_tensor(_tensor(rng, (64, 256)), quant_step=4, restart_interval=8)
    plan = codec.build_plan([enc], [dtype])
    payload = plan.payload.copy()
    start = int(plan.interval_starts[3])
    payload[start:start + 40] = 0xFF
    out = np.zeros(plan.output_shapes[0], dtype)
    with pytest.raises(jaxjpeg.JpegError, match="restart interval 3"):
        _native.run_plan_kernel_harness(payload, plan.interval_starts, plan.tiles, plan.tables,
                                        plan.row_scale, plan.row_offset,
                                        [out.view(np.uint16) if out.itemsize == 2 else out],
                                        [codec.output_type(dtype)], block_map=plan.block_map)
    nan = np.isnan(out.astype(np.float32))
    assert nan.sum() == 8 * 64  # interval 3: blocks 24..31 of a 32-block-wide tile row
    assert nan[:8, 3 * 64:4 * 64].all()


def test_a_plans_payload_is_placed_on_the_cpu_without_a_copy():
    """XLA's CPU client aliases a host array only when it is 64-byte aligned
    (numpy aligns to 16): the payload, a plan's largest operand, is allocated
    so, or every restore on a CPU would hold the compressed bytes once more."""
    rng = np.random.default_rng(12)
    plans = [codec.build_plan([jaxjpeg.encode_tensor(_tensor(rng, (96, 200 + k)), quant_step=3)],
                              [np.float32]) for k in range(4)]
    assert all(p.payload.ctypes.data % codec.PAYLOAD_ALIGNMENT == 0 for p in plans)
    placed = jax.device_put(plans[0].payload, jax.devices("cpu")[0])
    assert placed.unsafe_buffer_pointer() == plans[0].payload.ctypes.data


def test_a_plans_tables_and_placement_offsets_are_placed_without_a_copy():
    """The next largest operands: a tile's packed tables (672 bytes; until
    they were packed, 19.5 KB of lookup tables a tile, 5 MB for a
    ResNet-50's 262 tiles, copied once more on every restore while 16-byte
    aligned), and a placed tensor's offsets."""
    rng = np.random.default_rng(13)
    encs = [jaxjpeg.encode_tensor(_tensor(rng, (64, 96 + 8 * k)), quant_step=3,
                                  view=MatrixView((1, 0), 1)) for k in range(5)]
    plan = codec.build_plan(encs, [np.float32] * 5, placed=True)
    operands = dict(zip(ops.OPERAND_NAMES, ops.plan_operands(plan)))
    cpu = jax.devices("cpu")[0]
    for name in ("tables", "positions"):
        operand = operands[name]
        assert operand.size and operand.ctypes.data % codec.PAYLOAD_ALIGNMENT == 0
        assert jax.device_put(operand, cpu).unsafe_buffer_pointer() == operand.ctypes.data


# ---------------------------------------------------------------- independent oracle
# The tests above compare the custom call with run_plan, the same C++ core:
# a bug in that core (the IDCT, the affine output stage) sits on both sides.
# These compare it with libjpeg-turbo's samples times scale plus offset.

from oracle import expected_tensor  # noqa: E402


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_call_matches_an_independent_oracle(bits, dtype):
    rng = np.random.default_rng(11 + bits)
    x = _tensor(rng, (70, 300)) + np.linspace(-0.3, 0.4, 70, dtype=np.float32)[:, None]
    enc = jaxjpeg.encode_tensor(x, bits=bits, quant_step=3, tile_shape=(40, 128),
                                restart_interval=3)
    plan = codec.build_plan([enc], [dtype])
    (out,) = _decode_checked(plan)
    np.testing.assert_array_equal(_bits(out), _bits(expected_tensor(enc, dtype).reshape(70, 300)))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_custom_call_rounds_tiny_weights_like_numpy(dtype):
    """Weights far below float16's smallest normal (6.1e-5): subnormal outputs
    must round as numpy rounds float32 to float16 (round to nearest even)."""
    rng = np.random.default_rng(5)
    x = _tensor(rng, (64, 96), scale=3e-6)
    enc = jaxjpeg.encode_tensor(x, bits=12, quant_step=2)
    expected = expected_tensor(enc, dtype)
    assert np.count_nonzero(np.abs(expected.astype(np.float32)) < 6.1e-5) > 1000
    (out,) = _decode_checked(codec.build_plan([enc], [dtype]))
    np.testing.assert_array_equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_call_keeps_float32_subnormals_as_the_kernel_does(dtype):
    """Found by review: XLA runs its CPU threads with flush-to-zero and
    denormals-are-zero set, so the custom call read subnormal row maps as 0
    and flushed subnormal results, where the CUDA kernel (and its CPU
    harness) keeps them: weights around 1e-39 decoded to 0 on the CPU."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 512)) * 1e-39).astype(np.float32)
    enc = jaxjpeg.encode_tensor(x, bits=8, quant_step=2, restart_interval=4,
                                tile_shape=(128, 256))
    plan = codec.build_plan([enc], [dtype])
    (out,) = _decode_checked(plan)
    harness = np.full(plan.output_shapes[0], np.nan, dtype)
    _native.run_plan_kernel_harness(plan.payload, plan.interval_starts, plan.tiles, plan.tables,
                                    plan.row_scale, plan.row_offset,
                                    [harness.view(np.uint16) if harness.itemsize == 2 else harness],
                                    [codec.output_type(dtype)],
                                    col_scale=plan.col_scale, positions=plan.positions,
                                    block_map=plan.block_map, whole_outputs=True)
    if dtype == np.float32:
        assert np.count_nonzero(np.asarray(out)) > 120_000
    np.testing.assert_array_equal(_bits(out), _bits(harness))


def test_plan_listing_more_intervals_than_a_tile_has_is_refused():
    """An interval index with one interval more than the last tile holds: the
    extra interval would decode nothing and leave no trace. Refused by the
    custom call, run_plan and the CUDA kernel body alike (since session 30
    at the tile's first interval: each checks its tile owns exactly the
    intervals its blocks make)."""
    rng = np.random.default_rng(8)
    enc = jaxjpeg.encode_tensor(_tensor(rng, (16, 64)), quant_step=2, restart_interval=4)
    plan = codec.build_plan([enc], [np.float32])
    starts = np.concatenate([plan.interval_starts, plan.interval_starts[-1:]])
    operands = list(ops.plan_operands(plan))
    operands[1] = starts.view(np.int32)
    with pytest.raises(jaxjpeg.JpegError, match="restart interval 0:"):
        ops.run_checked(jax.jit(lambda *a: ops.decode_plan(plan, a)), operands)
    out = np.zeros(plan.output_shapes[0], np.float32)
    for run in (_native.run_plan, _native.run_plan_kernel_harness):
        with pytest.raises(jaxjpeg.JpegError, match="restart interval 0:"):
            run(plan.payload, starts, plan.tiles, plan.tables, plan.row_scale, plan.row_offset,
                [out], [0])


def test_plan_whose_tiles_own_no_intervals_is_refused():
    """Found by review: an interval index ending before the tile table did
    (none at all, or only the first tile's) decoded the tiles it reached and
    left the others' outputs unwritten, and the call succeeded: memory's
    leftovers came back as weights. Every tile must own its intervals; the
    custom call, run_plan and the CUDA kernel body refuse it alike."""
    rng = np.random.default_rng(9)
    encs = [jaxjpeg.encode_tensor(_tensor(rng, (16, 64)), quant_step=2, restart_interval=4)
            for _ in range(3)]
    plan = codec.build_plan(encs, [np.float32] * 3)
    firsts = plan.tiles[:, 9]
    assert firsts.tolist()[0] == 0 and len(firsts) == 3
    cut = {"no intervals": (plan.interval_starts[-1:], "more tiles than restart intervals"),
           "the first tile's only": (np.r_[plan.interval_starts[:firsts[1]],
                                           plan.interval_starts[firsts[1]]],
                                     r"restart interval 1: invalid argument")}   # tile 1's check
    for name, (starts, match) in cut.items():
        starts = np.ascontiguousarray(starts, np.int64)
        operands = list(ops.plan_operands(plan))
        operands[1] = starts.view(np.int32)
        with pytest.raises(jaxjpeg.JpegError, match=match):
            ops.run_checked(jax.jit(lambda *a: ops.decode_plan(plan, a)), operands)
        outs = [np.zeros(s, np.float32) for s in plan.output_shapes]
        for run in (_native.run_plan, _native.run_plan_kernel_harness):
            with pytest.raises(jaxjpeg.JpegError, match=match):
                run(plan.payload, starts, plan.tiles, plan.tables, plan.row_scale,
                    plan.row_offset, outs, [0] * 3)
    shuffled = plan.tiles.copy()   # tiles out of their intervals' order
    shuffled[[1, 2]] = shuffled[[2, 1]]
    with pytest.raises(jaxjpeg.JpegError, match="invalid argument"):
        _native.run_plan(plan.payload, plan.interval_starts, shuffled, plan.tables,
                         plan.row_scale, plan.row_offset,
                         [np.zeros(s, np.float32) for s in plan.output_shapes], [0] * 3)


def test_plan_whose_tiles_miss_or_repeat_output_elements_is_refused():
    """Found by review: a plan whose tiles are each sound but do not write
    their output exactly once (a tile dropped with its intervals, or moved
    onto another) decoded "successfully" with memory's leftovers as weights.
    The custom call, run_plan and the CUDA kernel body refuse it alike; the
    kernel body (no exception inside a jitted program on the GPU) leaves the
    uncovered output NaN and the others decoded."""
    rng = np.random.default_rng(10)
    encs = [jaxjpeg.encode_tensor(_tensor(rng, (32, 128)), quant_step=2, restart_interval=2,
                                  tile_shape=(16, 64)) for _ in range(2)]
    plan = codec.build_plan(encs, [np.float32] * 2)
    tiles, starts = plan.tiles, plan.interval_starts
    assert len(tiles) == 8 and tiles[:4, 4].tolist() == [0] * 4   # output 0's tiles first
    moved = tiles.copy()
    moved[1, 5:7] = moved[0, 5:7]                # tile 1 onto tile 0: row0, col0
    dropped = tiles[:-1]                          # output 1's last tile, with its intervals
    edits = {"moved": (moved, starts, 0), "dropped": (dropped, starts[:tiles[-1, 9] + 1], 1)}
    for name, (edited_tiles, edited_starts, output) in edits.items():
        edited_tiles = np.ascontiguousarray(edited_tiles)
        edited_starts = np.ascontiguousarray(edited_starts)
        match = f"decode plan refused: its tiles do not write every element of decoded tensor {output} "
        operands = list(ops.plan_operands(plan))
        operands[1] = edited_starts.view(np.int32)
        operands[2] = edited_tiles.reshape(-1).view(np.int32)
        with pytest.raises(jaxjpeg.JpegError, match=match):
            ops.run_checked(jax.jit(lambda *a: ops.decode_plan(plan, a)), operands)
        args = (plan.payload, edited_starts, edited_tiles, plan.tables, plan.row_scale,
                plan.row_offset)
        for run in (_native.run_plan, _native.run_plan_kernel_harness):
            outs = [np.zeros(s, np.float32) for s in plan.output_shapes]
            with pytest.raises(jaxjpeg.JpegError, match=match):
                run(*args, outs, [0, 0], whole_outputs=True)
            assert np.isnan(outs[output]).all(), name
            assert np.isfinite(outs[1 - output]).all(), name
            run(*args, outs, [0, 0])              # parts of outputs: tools and tests
    whole = [np.zeros(s, np.float32) for s in plan.output_shapes]
    _native.run_plan(plan.payload, starts, tiles, plan.tables, plan.row_scale, plan.row_offset,
                     whole, [0, 0], whole_outputs=True)
    assert all(np.isfinite(o).all() for o in whole)


def test_an_edited_loaded_leaf_whose_tiles_miss_elements_is_named(tmp_path):
    """A loaded leaf's operands edited (a tile moved onto another): its eager
    decode is refused naming the leaf, not a plan's output number (found by
    review: "decoded tensor 0")."""
    rng = np.random.default_rng(11)
    jaxjpeg.save(tmp_path / "m.jjpg", {"w": _tensor(rng, (1024, 768))}, tile_shape=(256, 256))
    leaf = jaxjpeg.load(tmp_path / "m.jjpg")["w"]
    tiles = np.asarray(leaf.operands[2]).view(np.int64).reshape(-1, _native.TILE_COLUMNS).copy()
    assert len(tiles) > 1
    tiles[1, 5:7] = tiles[0, 5:7]
    operands = list(leaf.operands)
    operands[2] = jnp.asarray(tiles.reshape(-1).view(np.int32))
    edited = type(leaf)(operands, leaf.matrix_shape, leaf.shape, leaf.dtype, leaf.view, leaf.kept)
    edited.labels = leaf.labels
    with pytest.raises(jaxjpeg.JpegError, match=r"decoded tensor 0 \(w tile 0 in .*m\.jjpg\) "
                                                r"exactly once"):
        edited.decode()


def _custom_call_types(hlo_text):
    """(operand types, result types) of the decode custom call in StableHLO text."""
    line = next(l for l in hlo_text.splitlines() if "custom_call @jaxjpeg_decode" in l)
    operands, results = line.rsplit(" : ", 1)[1].split(" -> ")
    return operands, results


def test_cuda_lowering_sizes_the_workspace_for_the_destuff_pass(mixed):
    """The CUDA handler destuffs every interval into its workspace result, so
    the "cuda" lowering asks XLA for DecodeWorkspaceBytes there (an XLA
    buffer: fixed under CUDA graphs), the CPU lowering only for the output
    descriptors; the primitive's own results are the same on both."""
    from jaxjpeg import lowering
    if not lowering.cuda_available():
        pytest.skip("no CUDA module built")
    plan = codec.build_plan(mixed, [np.float32, ml_dtypes.bfloat16] * 3)
    operands = ops.plan_operands(plan)
    decode = ops.plan_decoder(plan.output_shapes, tuple(d.name for d in plan.output_dtypes),
                              plan.output_shapes)
    traced = decode.trace(*operands)
    n = len(plan.output_shapes)
    tables = plan.tables.size // _native.PACKED_TABLES_SIZE
    want = _native.decode_workspace_bytes(n, plan.payload.size, plan.interval_starts.size - 1,
                                          tables)
    assert want >= (n * _native.PLAN_OUTPUT_SIZE + plan.payload.size
                    + 48 * (plan.interval_starts.size - 1)
                    + tables * _native.DECODER_TABLES_SIZE)
    _, cuda_results = _custom_call_types(traced.lower(lowering_platforms=("cuda",)).as_text())
    _, cpu_results = _custom_call_types(traced.lower(lowering_platforms=("cpu",)).as_text())
    assert f"tensor<{want}xui8>" in cuda_results
    assert f"tensor<{n * _native.PLAN_OUTPUT_SIZE}xui8>" in cpu_results
    assert cuda_results.replace(str(want), "W") == cpu_results.replace(
        str(n * _native.PLAN_OUTPUT_SIZE), "W")


def test_a_decoding_function_exports_and_serializes(tmp_path):
    """Found by review: jax.export's serialize() refused the loaded tree's
    CompressedArray nodes; README says how to export such a function."""
    from jax import export

    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    jaxjpeg.save(tmp_path / "e.jjpg", {"w": x})
    loaded = jaxjpeg.load(tmp_path / "e.jjpg")
    f = jax.jit(lambda c, v: v @ jaxjpeg.decode(c)["w"])
    v = jnp.ones((2, 64))
    exported = export.export(f, disabled_checks=[
        export.DisabledSafetyCheck.custom_call("jaxjpeg_decode")])(loaded, v)
    again = export.deserialize(exported.serialize())
    np.testing.assert_array_equal(np.asarray(again.call(loaded, v)), np.asarray(f(loaded, v)))
