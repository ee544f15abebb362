"""The AC fast table (xla_ops/huffman_decode.h: one 8-byte entry per 11-bit
lookup, the first value's bias taken modulo 2^16) on streams built by hand so
that its hard cases are the rule: short codes for the largest categories (a
bias of code << category far beyond 16 bits, value bits past the index),
two codes per entry, an EOB right after a value, ZRLs and blocks that fill up
to coefficient 63. Samples must equal libjpeg-turbo's."""

import numpy as np
import pytest

from jaxjpeg import _native
from oracle import library_samples

# Code lengths of the AC table, short ones first: 53 codes, Kraft sum < 1.
AC_LENGTHS = [2] + [3] * 2 + [4] * 2 + [5] * 4 + [6] * 4 + [7] * 8 + [8] * 8 + [9] * 8 + \
    [10] * 8 + [12] * 8
DC_CATEGORIES = 12


class BitWriter:
    def __init__(self):
        self.bits = []

    def put(self, value, n):
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]

    def data(self):
        bits = self.bits + [1] * (-len(self.bits) % 8)  # pad with ones (T.81 F.1.2.3)
        out = bytearray()
        for i in range(0, len(bits), 8):
            byte = int("".join(map(str, bits[i:i + 8])), 2)
            out += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
        return bytes(out)


def canonical_codes(lengths):
    """Codes of a canonical Huffman table whose symbols have these lengths (sorted)."""
    codes, code, length = [], 0, lengths[0]
    for n in lengths:
        code <<= n - length
        length = n
        codes.append(code)
        code += 1
    return codes


def segment(marker, payload):
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def dht(table_class, lengths, symbols):
    counts = [lengths.count(n) for n in range(1, 17)]
    return segment(0xC4, bytes([table_class << 4]) + bytes(counts) + bytes(symbols))


def magnitude_bits(value, category):
    """T.81 F.1.2.1: a negative value is sent as value + 2^category - 1."""
    return value if value >= 0 else value + (1 << category) - 1


def random_value(rng, category):
    magnitude = int(rng.integers(1 << (category - 1), 1 << category))
    return magnitude if rng.random() < 0.5 else -magnitude


def hand_made_stream(rng, bits, blocks_wide=8, blocks_high=6):
    """A baseline/extended grayscale JPEG with one quantization step of 1 and
    an AC table that gives its shortest codes to random symbols, among them
    the largest categories of the bit depth."""
    # 8-bit stops at category 9: blocks full of category-10 values (at step
    # 1) leave the range where libjpeg-turbo's SIMD IDCT and ours agree, a
    # matter of the IDCT, not of the tables (the decoder before the compact
    # table differed there in the same way). The bias still reaches 21 bits.
    max_category = 9 if bits == 8 else 14
    pool = [(run << 4) | size for run in range(16) for size in range(1, max_category + 1)]
    large = [s for s in pool if (s & 15) >= max_category - 2]
    chosen = list(rng.choice(large, 3, replace=False))
    rest = [s for s in pool if s not in chosen]
    chosen += list(rng.choice(rest, len(AC_LENGTHS) - 5, replace=False))
    ac_symbols = [int(s) for s in chosen]
    ac_symbols.insert(int(rng.integers(0, 4)), 0x00)  # EOB among the short codes
    ac_symbols.insert(int(rng.integers(0, len(ac_symbols))), 0xF0)  # ZRL
    ac = dict(zip(ac_symbols, zip(canonical_codes(AC_LENGTHS), AC_LENGTHS)))
    dc_lengths = [4] * DC_CATEGORIES
    dc = dict(zip(range(DC_CATEGORIES), zip(canonical_codes(dc_lengths), dc_lengths)))

    w = BitWriter()
    for _ in range(blocks_wide * blocks_high):
        category = int(rng.integers(0, 4))  # small DC differences
        w.put(*dc[category])
        if category:
            w.put(magnitude_bits(random_value(rng, category), category), category)
        k = 1
        while k < 64:
            fits = [s for s in ac_symbols if s not in (0x00, 0xF0) and k + (s >> 4) <= 63]
            if not fits or rng.random() < 0.15:
                w.put(*ac[0x00])
                break
            if k + 16 <= 63 and rng.random() < 0.05:
                w.put(*ac[0xF0])
                k += 16
                continue
            symbol = int(rng.choice(fits))
            run, size = symbol >> 4, symbol & 15
            w.put(*ac[symbol])
            w.put(magnitude_bits(random_value(rng, size), size), size)
            k += run + 1

    sof = 0xC0 if bits == 8 else 0xC1
    header = (b"\xff\xd8" + segment(0xDB, bytes([0]) + bytes([1] * 64))
              + segment(sof, bytes([bits]) + (blocks_high * 8).to_bytes(2, "big")
                        + (blocks_wide * 8).to_bytes(2, "big") + bytes([1, 1, 0x11, 0]))
              + dht(0, dc_lengths, list(range(DC_CATEGORIES)))
              + dht(1, AC_LENGTHS, ac_symbols)
              + segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])))
    return header + w.data() + b"\xff\xd9"


@pytest.mark.parametrize("bits", [8, 12])
def test_large_categories_on_short_codes_decode_like_libjpeg_turbo(bits):
    rng = np.random.default_rng(bits)
    for _ in range(40):
        data = hand_made_stream(rng, bits)
        np.testing.assert_array_equal(_native.decode_samples(data, 1), library_samples(data))
