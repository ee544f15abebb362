"""The encoder's AVX2 code (chosen at run time) against its portable code:
the forward DCT bit for bit, and whole encodings byte for byte. On a CPU
without AVX2 both calls run the portable code and the comparisons hold
trivially; the DCT is also checked against a float64 reference."""

import numpy as np
import pytest

from jaxjpeg import _native


def _dct_basis() -> np.ndarray:
    """Orthonormal 8-point DCT-II basis in float64, basis[u, x]."""
    u, x = np.arange(8)[:, None], np.arange(8)[None, :]
    scale = np.where(u == 0, 0.5 / np.sqrt(2.0), 0.5)
    return scale * np.cos((2 * x + 1) * u * np.pi / 16)


def _edge_blocks() -> np.ndarray:
    """Blocks where rounding, overflow and special values show."""
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).smallest_subnormal
    checker = np.indices((8, 8)).sum(axis=0) % 2 * 2.0 - 1.0
    blocks = [np.zeros(64), np.full(64, 2047.5), np.full(64, -2048.0), checker.ravel() * 2048,
              np.full(64, big), checker.ravel() * big, np.full(64, tiny),
              checker.ravel() * tiny, np.arange(64) - 31.5]
    for value in (np.inf, -np.inf, np.nan):
        one = np.zeros(64)
        one[37] = value
        blocks.append(one)
    for position in (0, 7, 56, 63):   # one sample set: every basis product once
        one = np.zeros(64)
        one[position] = 1e-3
        blocks.append(one)
    return np.array(blocks, np.float32)


def _random_blocks(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-12, 12, (2000, 1)))
    return (rng.normal(size=(2000, 64)) * scales).astype(np.float32)


@pytest.mark.parametrize("blocks", [_edge_blocks(), _random_blocks(0), _random_blocks(1)],
                         ids=["edge", "random0", "random1"])
def test_forward_dct_gives_the_same_bits_with_and_without_avx2(blocks):
    wide = _native.forward_dct(blocks)
    portable = _native.forward_dct(blocks, avx2=False)
    assert wide.dtype == portable.dtype == np.float32 and wide.shape == blocks.shape
    assert wide.tobytes() == portable.tobytes()


def test_forward_dct_matches_a_float64_reference():
    blocks = _random_blocks(2)[:200] / 1e3
    basis = _dct_basis()
    want = np.einsum("vy,nyx,ux->nvu", basis, blocks.reshape(-1, 8, 8).astype(np.float64),
                     basis).reshape(-1, 64)
    for avx2 in (True, False):
        got = _native.forward_dct(blocks, avx2=avx2)
        scale = np.abs(blocks).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - want) <= 1e-5 * scale)


def test_forward_dct_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        _native.forward_dct(np.zeros((3, 63), np.float32))


def _tiles():
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (8, 8), (13, 7), (64, 72), (130, 41)]:
        gauss = rng.normal(size=shape)
        sparse = gauss * (rng.random(shape) < 0.04)   # long zero runs: ZRLs
        special = gauss.copy()
        special.flat[::11] = np.nan
        special.flat[3::17] = np.inf
        yield from (gauss, sparse, special, np.full(shape, 0.25))


@pytest.mark.parametrize("bits", [8, 12])
def test_encoder_writes_the_same_bytes_with_and_without_avx2(bits):
    top = (1 << bits) - 1
    compared = 0
    for x in _tiles():
        x = x.astype(np.float32)
        finite = np.where(np.isfinite(x), x, 0)
        samples = ((x - finite.min()) / (np.ptp(finite) + 1e-6) * top).astype(np.float32)
        scale = (np.abs(finite).max(axis=1) / top * 2 + 1e-4).astype(np.float32)
        offset = (finite.min(axis=1) - 1e-3).astype(np.float32)
        for step in (1, 5, 60):
            table = np.full(64, step, np.uint16)
            for rdo in (True, False):
                for restart_interval in (0, 3):
                    options = dict(bits=bits, rdo=rdo, restart_interval=restart_interval,
                                   with_intervals=True)
                    calls = [lambda avx2: _native.encode(samples, table, avx2=avx2, **options)]
                    for weights in (x, np.ascontiguousarray(x.T).T):   # rows or columns contiguous
                        calls.append(lambda avx2, w=weights: _native.encode_mapped(
                            w, scale, offset, table, avx2=avx2, **options))
                    for call in calls:
                        (wide, wide_starts), (portable, portable_starts) = call(True), call(False)
                        assert wide == portable
                        assert np.array_equal(wide_starts, portable_starts)
                        compared += 1
    assert compared == 20 * 3 * 2 * 2 * 3


def _pseudo_gaussian(shape, seed: int) -> np.ndarray:
    """Weights from integer hashing alone (no RNG stream, no libm): the same
    float32 values on every platform and numpy version."""
    i = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(seed * 1_000_003)
    total = np.zeros(i.size)
    for k in range(4):   # a sum of four uniforms: near-Gaussian, bounded
        h = (i * np.uint64(2654435761 + 2 * k) + np.uint64(12345 + k)) % np.uint64(2**32)
        h = (h ^ (h >> np.uint64(13))) * np.uint64(1274126177) % np.uint64(2**32)
        total += (h >> np.uint64(8)).astype(np.float64) / 2.0**24
    return ((total - 2.0) * 1.7320508).reshape(shape)


# SHA-256 of every encoding below, recorded before the encoder's speed work
# of issue 10 item 7, third session (fused AVX2 quantizer, BitWriter in
# registers, deferred symbol counts): any change to the bytes the encoder
# writes, on either path, shows here.
_PINNED_ENCODINGS = {
    8: "dec2042a65bfc80d73d9dba95ddd89924e3a74fdb591ca9b2cc90b902e3ee5cd",
    12: "9af7f56840c469c2470caff93947aa50ec4bfee48966373fc15d3c5b31363b94",
}


@pytest.mark.parametrize("bits", [8, 12])
def test_encoder_bytes_are_pinned(bits):
    """Whole encodings (samples, and weights mapped from rows or columns;
    RDO on and off; with and without restart intervals; AVX2 and portable;
    Gaussian and sparse tiles, edge blocks included) against their recorded
    hash: speed work must not change a byte."""
    import hashlib
    top = (1 << bits) - 1
    digest = hashlib.sha256()
    for shape in [(8, 8), (13, 7), (64, 72), (130, 41), (256, 264)]:
        gauss = _pseudo_gaussian(shape, shape[0])
        for x in (gauss, np.where(np.abs(gauss) > 1.9, gauss, 0.0)):
            x = x.astype(np.float32)
            scale = np.full(shape[0], 8.0 / top, np.float32)
            offset = np.full(shape[0], -4.0, np.float32)
            samples = np.clip((x + 4.0) * (top / 8.0), 0, top).astype(np.float32)
            for step in ((1, 3, 12, 40) if bits == 8 else (4, 16, 48, 160)):
                table = np.full(64, step, np.uint16)
                for rdo in (True, False):
                    for restart_interval in (0, 5):
                        for avx2 in (True, False):
                            options = dict(bits=bits, rdo=rdo, restart_interval=restart_interval,
                                           with_intervals=True, avx2=avx2)
                            for data, starts in (
                                    _native.encode(samples, table, **options),
                                    _native.encode_mapped(x, scale, offset, table, **options),
                                    _native.encode_mapped(np.ascontiguousarray(x.T).T, scale,
                                                          offset, table, **options)):
                                digest.update(bytes(data))
                                digest.update(np.asarray(starts, np.int64).tobytes())
    assert digest.hexdigest() == _PINNED_ENCODINGS[bits]
