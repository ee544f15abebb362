"""The destuff pass (xla_ops/destuff.h, its warp logic run on the CPU) fuzzed
against the bit reader (xla_ops/bit_reader.h): on random, stuffing-heavy and
mutated real intervals, after every consumed bit count c, the bit reader's next
16 bits must be the destuffed bytes' bits at c (zeros past them: phantom bits),
its ReadPastEnd must be c > 8n and its HasUnusedBytes 8n - c >= 8, where n is
the destuffed byte count (truncation and trailing data are decided alike).
The reader of destuffed data (DestuffedBitReader: refills from 16 bytes
held in registers, one 8-byte load per 8 bytes) must show exactly the same trace, and whole tiles decoded through the
pass and that reader must give the same samples or the same error."""

import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import _native

STREAMS_PER_KIND = 1000  # 4 kinds: 4000 streams per run (BUILD.md)


def _expected_trace(destuffed, n, skips):
    """What the bit reader must show, from the destuffed bytes alone."""
    bits = np.unpackbits(np.asarray(destuffed[:n], np.uint8))
    consumed = np.concatenate([[0], np.cumsum(skips)])
    padded = np.concatenate([bits, np.zeros(int(consumed[-1]) + 16, np.uint8)])
    weights = 1 << np.arange(15, -1, -1)
    peek = np.array([int(padded[c:c + 16] @ weights) for c in consumed])
    return np.stack([peek, consumed > 8 * n, 8 * n - consumed >= 8], axis=1).astype(np.int64)


def _placed(data, rng):
    """``data`` at a random offset (0..7) of a bigger buffer among bytes that
    must not matter (0xFF, 0x00, RST): the pass reads aligned words and must
    never use a byte outside its range."""
    offset = int(rng.integers(0, 8))
    buf = np.array([0xFF, 0x00, 0xD0], np.uint8)[rng.integers(0, 3, offset + len(data) + 8)]
    buf[offset:offset + len(data)] = np.frombuffer(bytes(data), np.uint8)
    return buf[offset:offset + len(data)]


def _check(data, rng):
    data = np.frombuffer(bytes(data), np.uint8)
    destuffed, n = _native.destuff(_placed(data, rng))
    assert 0 <= n <= data.size
    assert destuffed.size % 16 == 0 and destuffed.size >= n + 16
    assert not destuffed[n:].any()
    total = 8 * data.size + int(rng.integers(0, 80))  # runs past the data into phantom bits
    skips = rng.integers(1, 17, size=total // 8 + 8).astype(np.int32)
    skips = skips[:max(1, int(np.searchsorted(np.cumsum(skips), total)))]
    got = _native.bit_reader_trace(data, skips)
    want = _expected_trace(destuffed, n, skips)
    assert np.array_equal(got, want), (data.tobytes().hex(), int(n))
    from_destuffed = _native.bit_reader_trace(data, skips, destuffed=True)
    assert np.array_equal(from_destuffed, got), (data.tobytes().hex(), int(n))


def _random_stream(rng):
    """Bytes drawn mostly from 0xFF, 0x00 and restart/other marker bytes."""
    size = int(rng.integers(0, 300))  # several 128-byte windows
    alphabet = np.array([0xFF, 0x00, 0xD0, 0xD7, 0xD9, 0x12, 0xFE, 0x01], np.uint8)
    return alphabet[rng.integers(0, alphabet.size, size)].tobytes()


@pytest.fixture(scope="module")
def real_intervals():
    """Entropy-coded intervals of real tiles (8- and 12-bit), each with the
    marker that follows it."""
    rng = np.random.default_rng(3)
    out = []
    for bits, step, restart in [(8, 2, 1), (8, 6, 3), (12, 3, 2), (8, 1, 0)]:
        x = (rng.standard_normal((40, 96)) * 0.05).astype(np.float32)
        enc = jaxjpeg.encode_tensor(x, bits=bits, quant_step=step, restart_interval=restart)
        for tile in enc.tiles:
            info = _native.inspect(np.frombuffer(tile.data, np.uint8))
            starts = info["interval_starts"]
            for a, b in zip(starts[:-1], starts[1:]):
                out.append(tile.data[a:b + 2])
    assert any(b"\xff\x00" in d for d in out)  # stuffing occurs
    return out


def test_destuff_known_cases():
    cases = {
        b"": b"",
        b"\x12\x34": b"\x12\x34",
        b"\xff\x00\x56": b"\xff\x56",
        b"\xff\x00\x00\x01": b"\xff\x00\x01",
        b"\x01\xff\xd0\x02": b"\x01",
        b"\x01\xff": b"\x01",  # a lone 0xFF at the range end ends the data
        b"\xff\xff\x00": b"",
        b"\x00" * 40 + b"\xff\x00" * 20 + b"\xff\xd9": b"\x00" * 40 + b"\xff" * 20,
    }
    for raw, want in cases.items():
        destuffed, n = _native.destuff(np.frombuffer(raw, np.uint8))
        assert bytes(destuffed[:n]) == want, raw.hex()


@pytest.mark.parametrize("kind", ["random", "uniform", "real", "mutated"])
def test_destuff_matches_bit_reader(kind, real_intervals):
    rng = np.random.default_rng(["random", "uniform", "real", "mutated"].index(kind))
    for k in range(STREAMS_PER_KIND):
        if kind == "random":
            data = _random_stream(rng)
        elif kind == "uniform":
            data = rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8).tobytes()
        else:
            data = bytearray(real_intervals[k % len(real_intervals)])
            if kind == "mutated":
                for _ in range(int(rng.integers(1, 4))):
                    at = int(rng.integers(0, len(data) + 1))
                    op = rng.integers(0, 4)
                    if op == 0:
                        data[at:at] = bytes([0xFF, int(rng.integers(0, 256))])
                    elif op == 1:
                        data[at:at] = b"\xff\x00"
                    elif op == 2 and data:
                        data[min(at, len(data) - 1)] = int(rng.integers(0, 256))
                    else:
                        del data[at:]
        _check(data, rng)


def _decode_both_ways(data):
    results = []
    for destuffed in (False, True):
        try:
            results.append(("ok", _native.decode_samples(data, threads=1, destuffed=destuffed)))
        except _native.JpegError as e:
            results.append(("error", str(e)))
    return results


@pytest.mark.parametrize("bits", [8, 12])
def test_tiles_decode_alike_through_the_destuff_pass(bits):
    """Whole tiles, intact and damaged (bytes changed, markers and stuffing
    inserted, cut short): the same samples, or the same first failure."""
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((64, 200)) * 0.05).astype(np.float32)
    tiles = [t.data for step, ri in [(1, 1), (3, 0), (6, 2)]
             for t in jaxjpeg.encode_tensor(x, bits=bits, quant_step=step,
                                           restart_interval=ri).tiles]
    failures = 0
    for k in range(300):
        data = bytearray(tiles[k % len(tiles)])
        scan = data.find(b"\xff\xda") + 20  # damage the entropy-coded data, not the header
        if k >= len(tiles):
            at = int(rng.integers(scan, len(data)))
            op = k % 4
            if op == 0:
                data[at] = int(rng.integers(0, 256))
            elif op == 1:
                data[at:at] = b"\xff\x00"
            elif op == 2:
                data[at:at] = bytes([0xFF, 0xD0 + int(rng.integers(0, 8))])
            else:
                del data[at:-2]
        (kind_a, a), (kind_b, b) = _decode_both_ways(np.frombuffer(bytes(data), np.uint8))
        assert kind_a == kind_b, (k, a if kind_a == "error" else b)
        if kind_a == "ok":
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
            failures += a.startswith("JPEG data")  # not refused by the header or scan index
    assert failures > 50  # the damage reached the decoder
