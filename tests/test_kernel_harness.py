"""The CUDA decode kernels' phases (claim, stage, rounds of table staging,
decode into a thread's column of the shared block array) run on the CPU by
``run_plan_kernel_harness``, checked bit for bit against libjpeg-turbo (the
independent oracle) and against the host decoder, on plans whose 128-interval
blocks mix tiles, tables, bit depths and output types."""

import dataclasses

import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import _native, codec
from placed_views import DTYPES, placed_encodings
from oracle import expected_tensor
from stream_damage import STREAM_DAMAGE, damage_interval_end, interval_markers



def _harness(plan, payload=None):
    outputs = [np.full(s, np.nan, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
    _native.run_plan_kernel_harness(
        plan.payload if payload is None else payload, plan.interval_starts, plan.tiles,
        plan.tables, plan.row_scale, plan.row_offset,
        [o.view(np.uint16) if o.itemsize == 2 else o for o in outputs],
        [codec.output_type(d) for d in plan.output_dtypes], col_scale=plan.col_scale, positions=plan.positions,
        block_map=plan.block_map, whole_outputs=True)
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
    assert plan.tables.size // _native.PACKED_TABLES_SIZE > 12  # several rounds per block
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
               types, col_scale=plan.col_scale, positions=plan.positions, **kw)
            error = None
        except jaxjpeg.JpegError as e:
            error = str(e)
        return error, outs

    host_error, host = run(_native.run_plan, threads=1)
    harness_error, harness = run(_native.run_plan_kernel_harness, block_map=plan.block_map)
    assert host_error is not None and harness_error == host_error
    for want, got in zip(host, harness):
        np.testing.assert_array_equal(_bits(got), _bits(want))


def _run_both(plan, payload, starts=None):
    """(error, outputs) of the host decoder and of the kernel harness, both
    into outputs prefilled with a sentinel."""
    types = [codec.output_type(d) for d in plan.output_dtypes]
    starts = plan.interval_starts if starts is None else starts
    results = []
    for fn, kw in ((_native.run_plan, dict(threads=1)),
                   (_native.run_plan_kernel_harness, dict(block_map=plan.block_map))):
        outs = [np.full(s, 7, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
        try:
            fn(payload, starts, plan.tiles, plan.tables, plan.row_scale, plan.row_offset,
               [o.view(np.uint16) if o.itemsize == 2 else o for o in outs], types,
               col_scale=plan.col_scale, positions=plan.positions, **kw)
            error = None
        except jaxjpeg.JpegError as e:
            error = str(e)
        results.append((error, outs))
    return results


@pytest.mark.parametrize("kind", STREAM_DAMAGE)
def test_destuffed_kernels_and_host_agree_on_stream_damage(many_kinds, kind):
    """The kernels read each interval through the destuff pass; every third
    interval damaged at its end (trailing bytes, a lone 0xFF, an early marker
    and so phantom bits, a fill byte, extra stuffing) must give the host
    decoder's status and bits, NaN included."""
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    payload = plan.payload.copy()
    markers = interval_markers(payload, plan.interval_starts)[::3]
    assert len(markers) > 10
    for marker in markers:
        damage_interval_end(kind, payload, marker)
    (host_error, host), (harness_error, harness) = _run_both(plan, payload)
    assert harness_error == host_error
    nan_blocks = 0
    for want, got in zip(host, harness):
        np.testing.assert_array_equal(_bits(got), _bits(want))
        nan_blocks += int(np.isnan(np.asarray(want, np.float32)).sum())
    if kind != "stuffing_inserted":  # may still decode: the extra byte is just data
        assert host_error is not None and nan_blocks > 0


def test_unusable_starts_decode_nothing_on_host_and_harness(many_kinds):
    """Starts out of order would let destuffed intervals overlap, so a plan
    with any unusable start is refused as a whole: both executors name the
    first such interval (not an earlier corrupt one) and decode nothing; every
    output becomes NaN, never what it held (inside jit nothing raises)."""
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    payload = plan.payload.copy()
    starts = plan.interval_starts.copy()
    payload[starts[1]:starts[2] - 2] = 0xFF  # interval 1 is corrupt
    starts[7] = starts[8] + 1  # interval 7 starts after its end
    for error, outs in _run_both(plan, payload, starts):
        assert error == _native.plan_failure(_native.pack_plan_status(7, 11)), error
        assert all(np.all(np.isnan(np.asarray(o, np.float32))) for o in outs)


def test_block_map_is_a_hint_for_the_tile_search(many_kinds):
    """Any tile hints (wrong, negative, past the tiles) give the same bits:
    a thread checks the tile it finds from its block's hint and falls back to
    the full search, so only the work changes."""
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    assert plan.block_map.shape[0] >= 3  # several CUDA blocks
    want = _harness(plan)
    rng = np.random.default_rng(3)
    for hints in (np.full(plan.block_map.shape[0], -1),
                  rng.integers(0, len(plan.tiles), plan.block_map.shape[0]),
                  np.full(plan.block_map.shape[0], 2 ** 31 - 1)):
        block_map = plan.block_map.copy()
        block_map[:, 0] = hints
        got = _harness(dataclasses.replace(plan, block_map=block_map))
        for a, b in zip(want, got):
            np.testing.assert_array_equal(_bits(b), _bits(a))


def test_intervals_a_block_map_leaves_out_are_reported(many_kinds):
    """A map whose kinds skip a block's intervals (only a hand-made one can)
    must not leave them silently undecoded: the check phase reports the first
    and makes them NaN, never what the output held; the rest decode."""
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    want = _harness(plan)
    block_map = plan.block_map.copy()
    block_map[1, 1] = 0  # block 1 (intervals 256..511): no kernel's kind
    outs = [np.full(s, 7, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
    with pytest.raises(jaxjpeg.JpegError, match="restart interval 256:"):
        _native.run_plan_kernel_harness(
            plan.payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
            plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in outs],
            [codec.output_type(d) for d in plan.output_dtypes], col_scale=plan.col_scale, positions=plan.positions,
            block_map=block_map)
    left_out = 0
    for w, o in zip(want, outs):
        nan = np.isnan(np.asarray(o, np.float32))
        left_out += int(nan.sum())
        np.testing.assert_array_equal(_bits(o[~nan]), _bits(w[~nan]))
    assert left_out >= 256  # each of the 256 intervals has at least one element


def test_harness_without_a_block_map_decodes_alike(many_kinds):
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    empty = dataclasses.replace(plan, block_map=np.zeros((0, 2), np.int32))
    for a, b in zip(_harness(plan), _harness(empty)):
        np.testing.assert_array_equal(_bits(b), _bits(a))


# The lock-step decode and its staged output (decode_kernel.h): a warp whose
# 32 blocks of a step are whole blocks of one tile, all decoded, writes them
# together as 16-byte chunks from the shared columns; every other step
# writes block by block. Both must give the host decoder's bits.

def _harness_counted(plan, payload=None):
    """(error or None, outputs, [staged steps, simple steps])."""
    outputs = [np.full(s, 7, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
    counts = np.zeros(2, np.int64)
    try:
        _native.run_plan_kernel_harness(
            plan.payload if payload is None else payload, plan.interval_starts, plan.tiles,
            plan.tables, plan.row_scale, plan.row_offset,
            [o.view(np.uint16) if o.itemsize == 2 else o for o in outputs],
            [codec.output_type(d) for d in plan.output_dtypes], col_scale=plan.col_scale, positions=plan.positions,
            block_map=plan.block_map, step_counts=counts)
        error = None
    except jaxjpeg.JpegError as e:
        error = str(e)
    return error, outputs, counts


def _host(plan, payload):
    outs = [np.full(s, 7, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
    try:
        _native.run_plan(payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
                         plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in outs],
                         [codec.output_type(d) for d in plan.output_dtypes], threads=1,
                         col_scale=plan.col_scale, positions=plan.positions)
        return None, outs
    except jaxjpeg.JpegError as e:
        return str(e), outs


def _wide(shape, bits, restart, seed, **kw):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    x[:, 24:40] = 0.01  # constant blocks (DC only) among the staged ones
    return jaxjpeg.encode_tensor(x, bits=bits, quant_step=3 if bits == 8 else 40,
                                 restart_interval=restart, tile_shape=(32, 2048), **kw)


def _assert_harness_is_host(plan, payload=None):
    payload = plan.payload if payload is None else payload
    error, got, counts = _harness_counted(plan, payload)
    host_error, want = _host(plan, payload)
    assert error == host_error
    for a, b in zip(want, got):
        np.testing.assert_array_equal(_bits(b), _bits(a))
    return error, counts


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("restart", [1, 2, 8])
def test_staged_output_matches_host_for_every_type(bits, restart):
    """Tiles 2048 wide (R = 1: a warp's blocks adjacent in a row; R = 2 and
    8: spaced), every output type, the column scale on one tensor, constant
    blocks; partial blocks at the bottom and right edges and the tiles'
    ends make some steps irregular."""
    encs = [_wide((64, 2048), bits, restart, seed=restart + bits),
            _wide((32, 2048), bits, restart, seed=7,
                  col_weight=np.exp(np.random.default_rng(1).standard_normal(2048))),
            _wide((36, 2000), bits, restart, seed=8)]
    assert encs[1].col_scale is not None
    for dtype in DTYPES:
        plan = codec.build_plan(encs, [dtype] * len(encs))
        error, (staged, simple) = _assert_harness_is_host(plan)
        assert error is None
        assert staged > 0 and simple > 0, (staged, simple)


@pytest.mark.parametrize("dtype", DTYPES)
def test_irregular_warps_take_the_simple_path(dtype):
    """Rows of 40 blocks (a warp of R = 1 wraps to the next row every
    other time: staged all the same), partial blocks at the right and
    bottom edges, a tile smaller than a warp's blocks, and 12-bit: the same
    bits as the host, through both paths."""
    rng = np.random.default_rng(5)
    encs = [jaxjpeg.encode_tensor((rng.standard_normal(shape) * 0.05).astype(np.float32),
                                  bits=bits, quant_step=step, restart_interval=1,
                                  tile_shape=(24, 2048))
            for shape, bits, step in (((37, 320), 8, 3), ((20, 2043), 12, 40), ((9, 100), 8, 2))]
    plan = codec.build_plan(encs, [dtype] * 3)
    error, (staged, simple) = _assert_harness_is_host(plan)
    assert error is None and staged > 0 and simple > 0


def test_default_tiles_and_restart_interval_stage_their_warps():
    """Default tiles (512 x 512: 64 blocks a row) at the default restart
    interval (32 blocks): a warp's 32 blocks of a step lie in 16 block rows,
    two to a row 32 blocks apart, and are staged."""
    rng = np.random.default_rng(9)
    enc = jaxjpeg.encode_tensor((rng.standard_normal((512, 1024)) * 0.05).astype(np.float32),
                                quant_step=3)
    assert enc.tiles[0].restart_interval == codec.DEFAULT_RESTART_INTERVAL == 32
    for dtype in DTYPES:
        error, (staged, simple) = _assert_harness_is_host(codec.build_plan([enc], [dtype]))
        assert error is None and staged > 0 and simple == 0, (staged, simple)


def test_rows_not_16_byte_aligned_are_never_staged():
    """A 16-bit output 2,052 wide: rows 4,104 bytes apart, so no warp stages;
    the float32 output of the same tiles does."""
    enc = _wide((32, 2052), 8, 1, seed=3)
    for dtype, stages in ((np.float16, False), (np.float32, True)):
        error, (staged, simple) = _assert_harness_is_host(codec.build_plan([enc], [dtype]))
        assert error is None and (staged > 0) == stages and simple > 0


@pytest.mark.parametrize("bits", [8, 12])
def test_failed_lanes_write_nan_beside_staged_warps(bits):
    """Damaged intervals inside otherwise regular warps: their warps' later
    steps go the simple path, the damaged intervals become NaN and the first
    failure is reported, as on the host."""
    enc = _wide((64, 2048), bits, 2, seed=11)
    for dtype in DTYPES:
        plan = codec.build_plan([enc], [dtype])
        payload = plan.payload.copy()
        starts = plan.interval_starts
        for i in (40, 41, 300, 517):  # the middle of intervals in several warps
            payload[(starts[i] + starts[i + 1]) // 2] ^= 0x5A
        for i in (100, 390):  # data cut after a byte: the first block fails
            payload[starts[i] + 1:starts[i] + 3] = [0xFF, 0xD3]
        error, (staged, simple) = _assert_harness_is_host(plan, payload)
        assert error is not None and staged > 0 and simple > 0
        got = _harness_counted(plan, payload)[1][0]
        assert np.isnan(np.asarray(got, np.float32)).any()


def test_step_counts_must_be_written_in_place(many_kinds):
    encs, dtypes = many_kinds
    plan = codec.build_plan(encs, dtypes)
    outputs = [np.zeros(s, d) for s, d in zip(plan.output_shapes, plan.output_dtypes)]
    with pytest.raises(ValueError, match="step_counts"):
        _native.run_plan_kernel_harness(
            plan.payload, plan.interval_starts, plan.tiles, plan.tables, plan.row_scale,
            plan.row_offset, [o.view(np.uint16) if o.itemsize == 2 else o for o in outputs],
            [codec.output_type(d) for d in dtypes], step_counts=np.zeros(2, np.int32))


# Tensors whose views move data, decoded in their own layout (placement by
# table, xla_ops/output_stage.h): (shape, view perm, split).
PLACED_VIEWS = [((3, 3, 16, 40), (3, 2, 0, 1), 1),   # Flax conv, rows = output channels
                ((24, 56), (1, 0), 1),                # Dense kernel, transposed
                ((5, 12, 20), (2, 0, 1), 2),          # rows over two axes
                ((7, 1, 30), (2, 1, 0), 1)]           # a length-1 axis among them


@pytest.fixture(scope="module")
def placed_kinds():
    """PLACED_VIEWS with tiles small enough that intervals wrap block rows."""
    return placed_encodings(PLACED_VIEWS, seed=8, tile_shape=(16, 24), steps=4)


def test_placed_tensors_decode_as_their_views_transposed(placed_kinds):
    """Host decoder and kernel harness write each tensor in its own layout,
    bit for bit what the 2-D view's decode gives once transposed."""
    encs, dtypes = placed_kinds
    views = codec.run_plan(codec.build_plan(encs, dtypes))
    plan = codec.build_plan(encs, dtypes, placed=True)
    assert (plan.tiles[:, -1] >= 0).all() and plan.positions.size
    for got in (codec.run_plan(plan), _harness(plan)):
        for enc, view, out in zip(encs, views, got):
            want = np.ascontiguousarray(enc.view.from_matrix(view, enc.shape))
            np.testing.assert_array_equal(_bits(out.reshape(enc.shape)), _bits(want))


def test_placed_tensors_agree_on_corrupt_payloads(placed_kinds):
    """A damaged interval's NaN lands on the same elements on both executors."""
    encs, dtypes = placed_kinds
    plan = codec.build_plan(encs, dtypes, placed=True)
    payload = plan.payload.copy()
    rng = np.random.default_rng(3)
    payload[rng.integers(0, payload.size, 10)] = 0xFF
    (host_error, host), (harness_error, harness) = _run_both(plan, payload)
    assert host_error is not None and harness_error == host_error
    assert any(np.isnan(o.astype(np.float32)).any() for o in host)
    for want, got in zip(host, harness):
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_a_tile_given_fewer_intervals_than_its_blocks_make_is_refused():
    """Found by review: a plan giving a tile 4 of the 6 restart intervals its
    blocks make decoded 4 and reported success, on the host, in the kernel
    harness and through the custom call (whose output held stale memory
    there). Each interval now checks its tile owns exactly its count."""
    rng = np.random.default_rng(0)
    q8 = _native.quality_table(75, 8)
    a = np.frombuffer(_native.encode((rng.random((16, 24)) * 255).astype(np.float32), q8,
                                     restart_interval=1), np.uint8)
    b = np.frombuffer(_native.encode((rng.random((8, 8)) * 255).astype(np.float32), q8), np.uint8)
    ia, ib = _native.inspect(a), _native.inspect(b)
    assert ia["num_intervals"] == 6
    for owned in (4, 6):   # too few, then the tile's own count
        starts = np.concatenate([ia["interval_starts"][:owned],
                                 ib["interval_starts"] + len(a)]).astype(np.int64)
        tiles = np.array([[0, 8, 24, 16, 0, 0, 0, 24, 0, 0, 1, -1, -1],
                          [1, 8, 8, 8, 1, 0, 0, 8, 16, owned, 0, -1, -1]], np.int64)
        args = (np.concatenate([a, b]), starts, tiles, np.concatenate([ia["tables"], ib["tables"]]),
                np.ones(24, np.float32), np.zeros(24, np.float32))
        for run in (_native.run_plan, _native.run_plan_kernel_harness):
            outs = [np.full((16, 24), np.nan, np.float32), np.full((8, 8), np.nan, np.float32)]
            kwargs = {"threads": 1} if run is _native.run_plan else {}
            if owned == 4:
                with pytest.raises(_native.JpegError):
                    run(*args, outs, [0, 0], **kwargs)
            else:
                run(*args, outs, [0, 0], **kwargs)
                assert not np.isnan(outs[0]).any()


def test_tile_squared_error_refuses_a_weights_view_beyond_a_tile():
    """Found by review: the weights' shape was narrowed to int before any
    check, so a (2^32 + 16, 24) view passed as the 16 x 24 tile."""
    x = (np.random.default_rng(0).random((16, 24)) * 255).astype(np.float32)
    jpg = np.frombuffer(_native.encode(x, _native.quality_table(50, 8)), np.uint8)
    w = np.broadcast_to(np.zeros((1, 24), np.float32), (2**32 + 16, 24))
    with pytest.raises(ValueError, match="larger than a JPEG tile"):
        _native.tile_squared_error(jpg, w, np.ones(16, np.float32), np.zeros(16, np.float32))
