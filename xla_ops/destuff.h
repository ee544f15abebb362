// The destuff pass: one restart interval's entropy-coded bytes with the
// byte stuffing removed (0xFF 0x00 -> 0xFF) and cut at the marker that ends
// them, so that a decoder can refill from whole words, with no byte loop and
// no 0xFF test. A warp handles one interval: its 32 lanes read 32
// consecutive bytes (one coalesced load), classify each on its own, and a
// ballot and a population count give every kept byte its output position.
//
// The contract is BitReader's (bit_reader.h): the destuffed bytes are
// exactly the data bytes it reads, in order, and past them it reads zero
// bits. So after consuming c bits of an interval of n destuffed bytes,
// ReadPastEnd is c > 8n and HasUnusedBytes is 8n - c >= 8.
// tests/test_destuff.py fuzzes the two against each other.
//
// Written as (lane, chunk) functions so the CPU harness (DestuffOnHost)
// runs the warp's logic with a loop over lanes standing for the ballot.
#ifndef JAXJPEG_DESTUFF_H_
#define JAXJPEG_DESTUFF_H_

#include <cstring>

#include "jpeg_defs.h"

namespace jaxjpeg {

constexpr int kDestuffLanes = 32;
constexpr int kDestuffAlign = 16;  // each interval's output starts 16-byte aligned

// One lane's byte: whether the destuffed data keep it, and whether the data
// end at it (a marker, a lone 0xFF at the range end, or the range end).
struct DestuffByte {
  uint8_t value;
  bool keep;
  bool stop;
};

// Classifies byte p of [begin, end). A byte is decided by itself and its two
// neighbours, so lanes need nothing from each other: 0xFF followed by 0x00
// is a stuffed 0xFF (kept), the 0x00 after it is dropped, and 0xFF followed
// by anything else (or by nothing) is where the data end. A 0x00 that
// follows a dropped 0x00 is data: dropped bytes are never 0xFF.
JJ_HD JJ_INLINE DestuffByte ClassifyByte(const uint8_t* begin, const uint8_t* end,
                                         const uint8_t* p) {
  if (p >= end) return DestuffByte{0, false, true};
  const uint8_t b = *p;
  const bool marker = b == 0xFF && (p + 1 >= end || p[1] != 0x00);
  const bool stuffing = b == 0x00 && p > begin && p[-1] == 0xFF;
  return DestuffByte{b, !marker && !stuffing, marker};
}

// The warp's combine step for one 32-byte chunk, from the ballots of
// `keep` and `stop`: where lane `lane`'s byte goes in the output (-1: not
// written), and (for every lane alike) how many bytes the chunk adds and
// whether the data ended in it.
struct DestuffChunk {
  int out_index;  // relative to the chunk's first output byte
  int added;
  bool done;
};

JJ_HD JJ_INLINE DestuffChunk CombineChunk(uint32_t keep_mask, uint32_t stop_mask, int lane) {
  // Lanes before the first stop; all 32 if none stops.
  const uint32_t before_stop = stop_mask ? (stop_mask & (0u - stop_mask)) - 1u : 0xFFFFFFFFu;
  const uint32_t kept = keep_mask & before_stop;
  const uint32_t below = lane == 0 ? 0u : (0xFFFFFFFFu >> (32 - lane));
  const bool mine = (kept >> lane) & 1u;
  return DestuffChunk{mine ? PopCount(kept & below) : -1, PopCount(kept), stop_mask != 0};
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

// Whether the host may take a whole chunk as it is: all 32 bytes inside the
// range, none of them 0xFF and the byte before it not 0xFF, so every lane
// would keep its byte and none would stop (what the ballots would say).
inline bool ChunkIsPlainData(const uint8_t* begin, const uint8_t* end, const uint8_t* chunk) {
  if (end - chunk < kDestuffLanes || (chunk > begin && chunk[-1] == 0xFF)) return false;
  uint64_t any_ff = 0;
  for (int k = 0; k < kDestuffLanes; k += 8) {
    uint64_t v;
    memcpy(&v, chunk + k, sizeof v);
    const uint64_t inverted = ~v;  // a 0xFF byte becomes a zero byte
    any_ff |= (inverted - 0x0101010101010101ull) & ~inverted & 0x8080808080808080ull;
  }
  return any_ff == 0;
}

// The warp's pass over one interval, on the host: each chunk's lanes
// classify (a loop stands for the lanes), the ballots are formed, every lane
// stores its byte, and the output is zero-filled to its capacity; a chunk of
// plain data is copied whole, as the lanes would store it. Returns the
// number of destuffed bytes (the interval's data are 8 * that bits).
inline int64_t DestuffOnHost(const uint8_t* begin, const uint8_t* end, uint8_t* out) {
  int64_t written = 0;
  for (const uint8_t* chunk = begin;; chunk += kDestuffLanes) {
    if (ChunkIsPlainData(begin, end, chunk)) {
      memcpy(out + written, chunk, kDestuffLanes);
      written += kDestuffLanes;
      continue;
    }
    DestuffByte bytes[kDestuffLanes];
    uint32_t keep = 0, stop = 0;
    for (int lane = 0; lane < kDestuffLanes; ++lane) {
      bytes[lane] = ClassifyByte(begin, end, chunk + lane);
      keep |= uint32_t(bytes[lane].keep) << lane;
      stop |= uint32_t(bytes[lane].stop) << lane;
    }
    DestuffChunk c{};
    for (int lane = 0; lane < kDestuffLanes; ++lane) {
      c = CombineChunk(keep, stop, lane);
      if (c.out_index >= 0) out[written + c.out_index] = bytes[lane].value;
    }
    written += c.added;
    if (c.done) break;
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
  int64_t written = 0;
  for (const uint8_t* chunk = begin;; chunk += kDestuffLanes) {
    const DestuffByte b = ClassifyByte(begin, end, chunk + lane);
    const uint32_t keep = __ballot_sync(0xFFFFFFFFu, b.keep);
    const uint32_t stop = __ballot_sync(0xFFFFFFFFu, b.stop);
    const DestuffChunk c = CombineChunk(keep, stop, lane);
    if (c.out_index >= 0) out[written + c.out_index] = b.value;
    written += c.added;
    if (c.done) break;
  }
  for (int64_t i = written + lane; i < DestuffCapacity(end - begin); i += kDestuffLanes) out[i] = 0;
  return written;
}
#endif

}  // namespace jaxjpeg

#endif  // JAXJPEG_DESTUFF_H_
