// Bit reader over one restart interval of entropy-coded data (T.81 F.2.2.5).
// Removes byte stuffing (0xFF 0x00 -> 0xFF), stops at the first marker, and
// never reads outside [begin, end). Past the data it supplies zero bits and
// counts them, so the caller can tell a truncated interval from a complete one.
#ifndef JAXJPEG_BIT_READER_H_
#define JAXJPEG_BIT_READER_H_

#include <cstring>

#include "jpeg_defs.h"

namespace jaxjpeg {

struct BitReader {
  const uint8_t* pos;
  const uint8_t* end;    // first byte not to read (end of range or a marker)
  uint64_t buffer;       // unread bits, left-aligned
  int count;             // number of valid bits in buffer
  int phantom;           // zero bits appended after the data ran out
};

JJ_HD JJ_INLINE BitReader MakeBitReader(const uint8_t* begin, const uint8_t* end) {
  return BitReader{begin, end, 0, 0, 0};
}

// Next data byte, or -1 at the end of the data (range end or a marker).
JJ_HD JJ_INLINE int NextDataByte(BitReader& r) {
  if (r.pos >= r.end) return -1;
  const uint8_t byte = *r.pos;
  if (byte != 0xFF) {
    ++r.pos;
    return byte;
  }
  if (r.pos + 1 < r.end && r.pos[1] == 0x00) {
    r.pos += 2;
    return 0xFF;
  }
  r.end = r.pos;  // a marker (or a lone 0xFF at the range end) ends the data
  return -1;
}

// Takes as many whole bytes as fit into the buffer (at least 56 valid bits
// after it, at most 63) when the next 8 bytes lie inside the range and none
// of them is 0xFF (no stuffing, no marker): they are loaded as one big-endian
// word. The word may also carry the first bits of a byte that is not taken
// yet; they sit exactly where that byte lands when it is taken later, so
// OR-ing it in again changes nothing. Returns false (and does nothing) when
// the bytes need the careful path. Needs count <= 63. No branch on count, so
// a decoder can call it before every symbol.
JJ_HD JJ_INLINE bool RefillFast(BitReader& r) {
  if (r.end - r.pos < 8) return false;
  const uint8_t* p = r.pos;
  const uint64_t word = (uint64_t(p[0]) << 56) | (uint64_t(p[1]) << 48) |
                        (uint64_t(p[2]) << 40) | (uint64_t(p[3]) << 32) |
                        (uint64_t(p[4]) << 24) | (uint64_t(p[5]) << 16) |
                        (uint64_t(p[6]) << 8) | uint64_t(p[7]);
  const uint64_t inverted = ~word;  // a 0xFF byte becomes a zero byte
  if ((inverted - 0x0101010101010101ull) & ~inverted & 0x8080808080808080ull) return false;
  r.buffer |= word >> r.count;
  const int bytes = (63 - r.count) >> 3;
  r.pos += bytes;
  r.count += bytes << 3;
  return true;
}

// Tops the buffer up to at least 56 bits (at most 63): the fast path above,
// or bytes one at a time with stuffing and markers handled.
JJ_HD JJ_INLINE void Refill(BitReader& r) {
  if (r.count >= 56) return;
  if (RefillFast(r)) return;
  while (r.count < 56) {
    int byte = NextDataByte(r);
    if (byte < 0) {
      byte = 0;
      r.phantom += 8;
    }
    r.buffer |= static_cast<uint64_t>(byte) << (56 - r.count);
    r.count += 8;
  }
}

// The next n (1..16) bits without consuming them; needs count >= n.
JJ_HD JJ_INLINE uint32_t PeekBits(const BitReader& r, int n) {
  return static_cast<uint32_t>(r.buffer >> (64 - n));
}

JJ_HD JJ_INLINE void SkipBits(BitReader& r, int n) {
  r.buffer <<= n;
  r.count -= n;
}

// True when decoding consumed bits that were not in the data.
JJ_HD JJ_INLINE bool ReadPastEnd(const BitReader& r) { return r.count < r.phantom; }

// Whole bytes of data left unread (padding to a byte boundary is allowed).
JJ_HD inline bool HasUnusedBytes(BitReader r) {
  if (r.count - r.phantom >= 8) return true;
  return NextDataByte(r) >= 0;
}

// A bit reader over destuffed data (destuff.h): [pos, end) are data bytes,
// with no stuffing and no marker, and zero bytes follow them up to 16 bytes
// past end at least. The 16 bytes around pos stay in registers (`lo`, `hi`:
// the words at next_word - 16 and next_word - 8, as loaded): a refill
// shifts them into the buffer with no memory access, and the load of the
// following word is issued when pos enters `hi`, about 8 bytes (a dozen
// coefficients) before it is needed, so its latency hides behind decoding.
// Words at or past end + 16 are not loaded (they are zeros). The zero bytes
// taken past the data are BitReader's phantom bits; they need no counting
// here: the data bits not consumed yet are count + 8 * (end - pos), so
// ReadPastEnd, HasUnusedBytes and the bits read are BitReader's
// (tests/test_destuff.py). `phantom` stays 0. The decoder picks the refill
// by overload: DecodeBlock and DecodeAc are templates on the reader.
struct DestuffedBitReader : BitReader {
  const uint8_t* next_word;  // the next 8 bytes to load (8-byte aligned on the device)
  uint64_t lo, hi;           // bytes [next_word - 16, next_word), little-endian
};

// The 8 bytes at p (8-byte aligned on the device) as loaded, byte k at bits
// 8k, or zeros for a word that starts at or past `zeros_from`. On the device
// through the read-only data cache: destuffed bytes are written by an earlier
// kernel and only read while decoding.
JJ_HD JJ_INLINE uint64_t LoadDestuffedWord(const uint8_t* p, const uint8_t* zeros_from) {
  if (p >= zeros_from) return 0;
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned long long*>(p));
#else
  uint64_t v;
  memcpy(&v, p, sizeof v);
  return v;  // little-endian hosts: byte k at bits 8k, as on the device
#endif
}

JJ_HD JJ_INLINE uint64_t ByteSwap64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return (uint64_t(__byte_perm(static_cast<uint32_t>(v), 0, 0x0123)) << 32) |
         __byte_perm(static_cast<uint32_t>(v >> 32), 0, 0x0123);
#else
  return __builtin_bswap64(v);
#endif
}

// The first word a reader over data ending at `end` leaves as zeros: the
// bytes from end + 16 on may belong to another interval.
JJ_HD JJ_INLINE const uint8_t* ZerosFrom(const uint8_t* end) { return end + 16 - 7; }

JJ_HD JJ_INLINE DestuffedBitReader MakeDestuffedBitReader(const uint8_t* data, int64_t n) {
  DestuffedBitReader r;
  r.pos = data;
  r.end = data + n;
  r.buffer = 0;
  r.count = 0;
  r.phantom = 0;
  r.lo = LoadDestuffedWord(data, ZerosFrom(r.end));
  r.hi = LoadDestuffedWord(data + 8, ZerosFrom(r.end));
  r.next_word = data + 16;
  return r;
}

// Takes as many whole bytes as fit (at least 56 valid bits after it), the
// data's or, past them, the zeros that follow, from the registers. Needs
// count <= 63. Always succeeds.
JJ_HD JJ_INLINE bool RefillFast(DestuffedBitReader& r) {
  const int shift = static_cast<int>(r.pos - (r.next_word - 16)) * 8;  // 0..56
  const uint64_t bytes_at_pos = (r.lo >> shift) | ((r.hi << 1) << (63 - shift));
  r.buffer |= ByteSwap64(bytes_at_pos) >> r.count;
  const int bytes = (63 - r.count) >> 3;
  r.pos += bytes;
  if (r.pos >= r.next_word - 8) {  // at most 7 bytes a refill: one word at most
    r.lo = r.hi;
    r.hi = LoadDestuffedWord(r.next_word, ZerosFrom(r.end));
    r.next_word += 8;
  }
  r.count += bytes << 3;
  return true;
}

// Data bits not consumed yet; negative once bits past the data were read.
JJ_HD JJ_INLINE int64_t UnreadDataBits(const DestuffedBitReader& r) {
  return r.count + 8 * (r.end - r.pos);
}

JJ_HD JJ_INLINE void Refill(DestuffedBitReader& r) {
  if (r.count < 56) RefillFast(r);
}

JJ_HD JJ_INLINE bool ReadPastEnd(const DestuffedBitReader& r) { return UnreadDataBits(r) < 0; }

JJ_HD JJ_INLINE bool HasUnusedBytes(const DestuffedBitReader& r) { return UnreadDataBits(r) >= 8; }

}  // namespace jaxjpeg

#endif  // JAXJPEG_BIT_READER_H_
