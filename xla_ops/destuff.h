// The destuff pass: one restart interval's entropy-coded bytes with the
// byte stuffing removed (0xFF 0x00 -> 0xFF) and cut at the marker that ends
// them, so that a decoder can refill from whole words, with no byte loop and
// no 0xFF test. A warp handles one interval: its 32 lanes read a window of
// 128 consecutive bytes as aligned words (one coalesced load), classify
// their bytes with the neighbouring lanes' bytes, and ballots and
// population counts give every kept byte its output position.
//
// The contract is BitReader's (bit_reader.h): the destuffed bytes are
// exactly the data bytes it reads, in order, and past them it reads zero
// bits. So after consuming c bits of an interval of n destuffed bytes,
// ReadPastEnd is c > 8n and HasUnusedBytes is 8n - c >= 8.
// tests/test_destuff.py fuzzes the two against each other.
//
// Written as (lane, window) functions so the CPU harness (DestuffOnHost)
// runs the warp's logic with a loop over lanes standing for the ballot.
#ifndef JAXJPEG_DESTUFF_H_
#define JAXJPEG_DESTUFF_H_

#include <cstring>

#include "jpeg_defs.h"

namespace jaxjpeg {

constexpr int kDestuffLanes = 32;
constexpr int kDestuffAlign = 16;  // each interval's output starts 16-byte aligned

// A warp reads an interval in windows of 128 bytes from the 4-byte aligned
// address at or before its start: lane l loads the window's aligned word l,
// one 4-byte load where the word lies inside the interval's range, byte
// loads of the bytes inside it at the range's two ends (never a byte
// outside the range). So a window is one coalesced 128-byte load.
constexpr int kDestuffWordBytes = 4;
constexpr int kDestuffWindow = kDestuffLanes * kDestuffWordBytes;

JJ_HD JJ_INLINE const uint8_t* AlignDownToWord(const uint8_t* p) {
  return reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(p) &
                                          ~uintptr_t(kDestuffWordBytes - 1));
}

// The aligned word at q as bytes (byte k at bits 8k), its bytes outside
// [begin, end) zero and not read.
JJ_HD JJ_INLINE uint32_t LoadDestuffWord(const uint8_t* begin, const uint8_t* end,
                                         const uint8_t* q) {
  if (q >= begin && end - q >= kDestuffWordBytes) {
#if defined(__CUDA_ARCH__)
    return __ldg(reinterpret_cast<const unsigned int*>(q));
#else
    uint32_t word;
    memcpy(&word, q, sizeof word);
    return word;  // little-endian hosts: byte k at bits 8k, as on the device
#endif
  }
  uint32_t word = 0;
  for (int k = 0; k < kDestuffWordBytes; ++k) {
    if (q + k >= begin && q + k < end) word |= uint32_t(q[k]) << (8 * k);
  }
  return word;
}

// The byte at p if it lies in [begin, end), else 0 (not read).
JJ_HD JJ_INLINE uint32_t LoadDestuffByte(const uint8_t* begin, const uint8_t* end,
                                         const uint8_t* p) {
  return p >= begin && p < end ? *p : 0u;
}

// The byte after the last lane's word q (the next window's first), read
// only where it matters: when the word's last byte is 0xFF.
JJ_HD JJ_INLINE uint32_t ByteAfterWindow(const uint8_t* begin, const uint8_t* end,
                                         const uint8_t* q, uint32_t word) {
  return (word >> 24) == 0xFF ? LoadDestuffByte(begin, end, q + kDestuffWordBytes) : 0u;
}

// One lane's word of a window, classified: bit k of `keep` where byte k
// is data, of `stop` where the data end at it (a marker, a lone 0xFF at the
// range end, or the range end). A byte is decided by itself and its two
// neighbours, `prev` the byte before the word and `next` the one after it
// (the neighbouring lanes' bytes, each ignored outside [begin, end)): 0xFF
// followed by 0x00 is a stuffed 0xFF (kept), the 0x00 after it is dropped,
// and 0xFF followed by anything else (or by nothing) is where the data end.
// A 0x00 that follows a dropped 0x00 is data: dropped bytes are never 0xFF.
// Bytes before begin (only in the first window) are neither.
struct DestuffLaneBits {
  uint32_t keep;
  uint32_t stop;
};

// 0x80 in each byte of x that is zero, 0 in the others (exact: no borrow
// crosses bytes).
JJ_HD JJ_INLINE uint32_t ZeroBytes(uint32_t x) {
  const uint32_t low7 = 0x7F7F7F7Fu;
  return ~(((x & low7) + low7) | x | low7);
}

// Bits 7, 15, 23, 31 of a ZeroBytes-style mask as bits 0..3 (byte k to bit
// k; the multiplier's partial products never meet).
JJ_HD JJ_INLINE uint32_t ByteFlags(uint32_t high_bits) {
  return (((high_bits >> 7) * 0x01020408u) >> 24) & 0xFu;
}

// Bits k of 0..3 at or past `n` (clamped to 0..4).
JJ_HD JJ_INLINE uint32_t FlagsFrom(int64_t n) {
  const int from = n < 0 ? 0 : (n > 4 ? 4 : static_cast<int>(n));
  return 0xFu & ~((1u << from) - 1u);
}

// All four bytes at once, as bit masks: the bytes outside [begin, end) are
// zeros as loaded (never 0xFF), so only the last data byte's neighbour
// needs the range (a 0xFF there ends the data whatever follows it).
JJ_HD JJ_INLINE DestuffLaneBits ClassifyWord(const uint8_t* begin, const uint8_t* end,
                                             const uint8_t* q, uint32_t word, uint32_t prev,
                                             uint32_t next) {
  const uint32_t before = (word << 8) | (prev & 0xFF);  // byte k: the byte before q + k
  const uint32_t after = (word >> 8) | (next << 24);    // byte k: the byte after q + k
  const uint32_t is_ff = ByteFlags(ZeroBytes(~word));
  const uint32_t is_zero = ByteFlags(ZeroBytes(word));
  const uint32_t ff_before = ByteFlags(ZeroBytes(~before));
  const uint32_t zero_after = ByteFlags(ZeroBytes(after));
  const uint32_t past_end = FlagsFrom(end - q);
  const uint32_t last_or_past = FlagsFrom(end - q - 1);
  const uint32_t in_range = FlagsFrom(begin - q) & ~past_end;
  const uint32_t marker = is_ff & (last_or_past | ~zero_after) & in_range;
  const uint32_t stuffing = is_zero & ff_before & in_range;
  return DestuffLaneBits{in_range & ~marker & ~stuffing, marker | past_end};
}

// The lane's bits of a window once the data end is known: `stop_lanes`
// (the ballot of stop != 0) gives the first lane with a stop; bytes from
// the first stop on are not kept. Returns the lane's kept bits.
JJ_HD JJ_INLINE uint32_t KeptBeforeStop(DestuffLaneBits bits, uint32_t stop_lanes, int lane) {
  if (stop_lanes == 0) return bits.keep;
  const int first = CountTrailingZeros(stop_lanes);
  if (lane < first) return bits.keep;
  if (lane > first) return 0;
  return bits.keep & ((bits.stop & (0u - bits.stop)) - 1u);
}

// Where the lane's kept bytes go, from the ballots of its kept count's
// three bits (count_bits[b]: lanes whose count has bit b): the first at
// `out_index` (relative to the window's first output byte); `added`: the
// window's total, the same for every lane.
struct DestuffPlace {
  int out_index;
  int added;
};

JJ_HD JJ_INLINE DestuffPlace PlaceKept(const uint32_t count_bits[3], int lane) {
  const uint32_t below = lane == 0 ? 0u : (0xFFFFFFFFu >> (32 - lane));
  DestuffPlace place{0, 0};
  for (int b = 0; b < 3; ++b) {
    place.out_index += PopCount(count_bits[b] & below) << b;
    place.added += PopCount(count_bits[b]) << b;
  }
  return place;
}

// Stores the lane's kept bytes from out[out_index] on.
JJ_HD JJ_INLINE void StoreKept(uint32_t word, uint32_t kept, uint8_t* out) {
  int n = 0;
  JJ_UNROLL
  for (int k = 0; k < kDestuffWordBytes; ++k) {
    if ((kept >> k) & 1u) out[n++] = static_cast<uint8_t>(word >> (8 * k));
  }
}

// Bytes of output space an interval of `raw` bytes may need: the destuffed
// data are never longer, and a whole 16-byte word of zeros follows them so
// that a reader can load a full word past the data.
JJ_HD JJ_INLINE int64_t DestuffCapacity(int64_t raw) {
  return (raw + 2 * kDestuffAlign - 1) / kDestuffAlign * kDestuffAlign;
}

// Where interval i's destuffed bytes go in a decode call's destuffed area:
// laid out from its payload offset, with no prefix sum over the intervals.
// For non-decreasing starts the regions are disjoint: interval i's ends at
// most 16 + (raw + 31) - 1 bytes past align16(start), below where interval
// i + 1's begins (its start is start + raw, plus kDestuffSlack).
constexpr int64_t kDestuffSlack = 48;

JJ_HD JJ_INLINE int64_t DestuffedOffset(int64_t start, int64_t i) {
  return (start + kDestuffAlign - 1) / kDestuffAlign * kDestuffAlign + kDestuffSlack * i;
}

// Bytes of the destuffed area of a call over a payload of `payload_size`
// bytes and `num_intervals` intervals (starts in [0, payload_size]).
JJ_HD JJ_INLINE int64_t DestuffAreaSize(int64_t payload_size, int64_t num_intervals) {
  return DestuffedOffset(payload_size, num_intervals);
}

// Whether the host may take window bytes [from, to) as they are: all
// inside the range, none of them 0xFF and the byte before them not 0xFF
// inside the range, so every lane would keep its bytes and none would stop
// (what the ballots would say).
inline bool WindowIsPlainData(const uint8_t* begin, const uint8_t* end, const uint8_t* from,
                              const uint8_t* to) {
  if (to > end || (from > begin && from[-1] == 0xFF)) return false;
  for (const uint8_t* p = from; p < to; ++p) {
    if (*p == 0xFF) return false;
  }
  return true;
}

// The warp's pass over one interval, on the host: each window's lanes load
// and classify their words (a loop stands for the lanes, the neighbours'
// bytes and the ballots), every lane stores its kept bytes, and the output
// is zero-filled to its capacity; plain data are copied whole, as the lanes
// would store them. Returns the number of destuffed bytes (the interval's
// data are 8 * that bits).
inline int64_t DestuffOnHost(const uint8_t* begin, const uint8_t* end, uint8_t* out) {
  int64_t written = 0;
  uint32_t carry = 0;  // the byte before the window (ignored before begin)
  for (const uint8_t* window = AlignDownToWord(begin);; window += kDestuffWindow) {
    const uint8_t* from = window < begin ? begin : window;
    if (WindowIsPlainData(begin, end, from, window + kDestuffWindow)) {
      memcpy(out + written, from, window + kDestuffWindow - from);
      written += window + kDestuffWindow - from;
      carry = window[kDestuffWindow - 1];
      continue;
    }
    uint32_t words[kDestuffLanes];
    for (int lane = 0; lane < kDestuffLanes; ++lane) {
      words[lane] = LoadDestuffWord(begin, end, window + kDestuffWordBytes * lane);
    }
    DestuffLaneBits bits[kDestuffLanes];
    uint32_t stop_lanes = 0;
    for (int lane = 0; lane < kDestuffLanes; ++lane) {
      const uint8_t* q = window + kDestuffWordBytes * lane;
      const uint32_t prev = lane == 0 ? carry : words[lane - 1] >> 24;
      const uint32_t next = lane == kDestuffLanes - 1 ? ByteAfterWindow(begin, end, q, words[lane])
                                                      : words[lane + 1];
      bits[lane] = ClassifyWord(begin, end, q, words[lane], prev, next);
      stop_lanes |= uint32_t(bits[lane].stop != 0) << lane;
    }
    uint32_t kept[kDestuffLanes], count_bits[3] = {0, 0, 0};
    for (int lane = 0; lane < kDestuffLanes; ++lane) {
      kept[lane] = KeptBeforeStop(bits[lane], stop_lanes, lane);
      for (int b = 0; b < 3; ++b) count_bits[b] |= ((PopCount(kept[lane]) >> b) & 1u) << lane;
    }
    DestuffPlace place{};
    for (int lane = 0; lane < kDestuffLanes; ++lane) {
      place = PlaceKept(count_bits, lane);
      StoreKept(words[lane], kept[lane], out + written + place.out_index);
    }
    written += place.added;
    if (stop_lanes != 0) break;
    carry = words[kDestuffLanes - 1] >> 24;
  }
  for (int64_t i = written; i < DestuffCapacity(end - begin); ++i) out[i] = 0;
  return written;
}

#if defined(__CUDACC__)
// The same pass by one warp on the device (all 32 lanes call it with the
// same interval); `out` has DestuffCapacity(end - begin) bytes.
__device__ inline int64_t DestuffWarp(const uint8_t* __restrict__ begin,
                                      const uint8_t* __restrict__ end, uint8_t* __restrict__ out,
                                      int lane) {
  constexpr uint32_t kAll = 0xFFFFFFFFu;
  int64_t written = 0;
  uint32_t carry = 0;
  for (const uint8_t* window = AlignDownToWord(begin);; window += kDestuffWindow) {
    const uint8_t* q = window + kDestuffWordBytes * lane;
    const uint32_t word = LoadDestuffWord(begin, end, q);
    const uint32_t from_before = __shfl_up_sync(kAll, word, 1) >> 24;
    const uint32_t from_after = __shfl_down_sync(kAll, word, 1);
    const uint32_t prev = lane == 0 ? carry : from_before;
    const uint32_t next =
        lane == kDestuffLanes - 1 ? ByteAfterWindow(begin, end, q, word) : from_after;
    const DestuffLaneBits bits = ClassifyWord(begin, end, q, word, prev, next);
    const uint32_t stop_lanes = __ballot_sync(kAll, bits.stop != 0);
    const uint32_t kept = KeptBeforeStop(bits, stop_lanes, lane);
    const int count = PopCount(kept);
    const uint32_t count_bits[3] = {__ballot_sync(kAll, count & 1), __ballot_sync(kAll, count & 2),
                                    __ballot_sync(kAll, count & 4)};
    const DestuffPlace place = PlaceKept(count_bits, lane);
    StoreKept(word, kept, out + written + place.out_index);
    written += place.added;
    if (stop_lanes != 0) break;
    carry = __shfl_sync(kAll, word, kDestuffLanes - 1) >> 24;
  }
  for (int64_t i = written + lane; i < DestuffCapacity(end - begin); i += kDestuffLanes) out[i] = 0;
  return written;
}
#endif

}  // namespace jaxjpeg

#endif  // JAXJPEG_DESTUFF_H_
