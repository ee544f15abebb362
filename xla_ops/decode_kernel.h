// The CUDA decode kernels' bodies, written as functions of (block, thread)
// and phase so the CPU harness in the tests runs exactly the GPU indexing
// and staging logic on machines without a GPU.
//
// A first kernel destuffs every interval (a warp per interval, see
// destuff.h) into the call's workspace; then one thread decodes one restart
// interval from its destuffed bytes. There is one kernel per (sample
// bits, output type): each is specialised and small, and a thread whose
// interval is of another kind leaves at once. A block of threads works in
// rounds: the lowest table index any of its pending threads needs is staged
// into shared memory, the threads that need it decode, and so on
// (consecutive intervals almost always share a tile, so one round is the
// rule). Tables are therefore always read from shared memory. Each thread's
// block of coefficients, IDCT workspace and samples is one column of a
// shared array (see BlockScratch): no per-thread arrays in local memory.
#ifndef JAXJPEG_DECODE_KERNEL_H_
#define JAXJPEG_DECODE_KERNEL_H_

#include "decode_plan.h"

namespace jaxjpeg {

static_assert(kMapBlockIntervals == 256, "a block map row per CUDA block");
// 256 threads: 2 blocks of 92 KiB shared memory and 128 registers per thread
// fill an H200 SM's 16 warps (128 threads would stop at 12: 3 blocks of 60 KiB).
constexpr int kDecodeThreadsPerBlock = 256;
constexpr int32_t kNoTable = 0x7FFFFFFF;

// A block's shared memory (dynamic: more than the 48 KiB of static shared
// memory a kernel may declare).
struct KernelShared {
  DecoderTables tables;
  // Thread t's block: element i at blocks[i * kDecodeThreadsPerBlock + t].
  int32_t blocks[64 * kDecodeThreadsPerBlock];
  uint8_t zigzag[80];
  int32_t next_table;  // the table index of the current round
};

using LaneScratch = BlockScratch<kDecodeThreadsPerBlock, false>;

JJ_HD JJ_INLINE LaneScratch ThreadScratch(KernelShared& s, int thread) {
  int32_t* column = s.blocks + thread;
  return LaneScratch{column, column, column, s.zigzag};
}

// Whether the (kBits, kType) kernel has work in `block`: the block map's
// kinds, or every kernel where the plan has no map row.
template <int kBits, OutputType kType>
JJ_HD JJ_INLINE bool BlockHasKind(const DecodePlan& p, int64_t block) {
  const int32_t* row = BlockMapRow(p, block);
  return row == nullptr || (row[kMapKinds] & KindBit(kBits, kType)) != 0;
}

JJ_HD inline int64_t KernelBlockCount(int64_t num_intervals) {
  return (num_intervals + kDecodeThreadsPerBlock - 1) / kDecodeThreadsPerBlock;
}

JJ_HD JJ_INLINE void RecordFirstError(int32_t* status, int32_t value) {
#if defined(__CUDA_ARCH__)
  atomicMin(status, value);
#else
  if (value < *status) *status = value;
#endif
}

// Phase "destuff" of interval i, before any decoding (a warp on the device,
// one call on the host): `pass(begin, end, out)` destuffs [begin, end) into
// out and returns the count; the `leader` writes the results. Unusable
// starts are reported, and then no interval is decoded (PlanStartsStatus).
template <typename Pass>
JJ_HD JJ_INLINE void DestuffPlanInterval(const DecodePlan& p, int64_t i, bool leader,
                                         int32_t* status, const Pass& pass) {
  if (!IntervalStartsValid(p, i)) {
    if (leader) {
      const int32_t bad = PackPlanStatus(i, Status::kBadArgument);
      RecordFirstError(status, bad);
      RecordFirstError(p.destuffed.starts_status, bad);
    }
    return;
  }
  const int64_t begin = p.interval_starts[i];
  const int64_t n = pass(p.payload + begin, p.payload + p.interval_starts[i + 1],
                         p.destuffed.area + DestuffedOffset(begin, i));
  if (leader) p.destuffed.lengths[i] = n;
}

// Phase "claim": resolves the interval of (block, thread); returns whether
// the (kBits, kType) kernel decodes it. An unusable interval is reported by
// every kernel that meets it: the same packed word, so the minimum is one.
// Nothing is claimed when the destuff phase found unusable starts.
template <int kBits, OutputType kType>
JJ_HD inline bool ClaimInterval(const DecodePlan& p, int64_t block, int thread, IntervalWork* w,
                                int32_t* status) {
  const int64_t i = block * kDecodeThreadsPerBlock + thread;
  if (i >= p.num_intervals || *p.destuffed.starts_status != kPlanOk) return false;
  const int32_t* row = BlockMapRow(p, block);
  if (!ResolveInterval(p, i, w, row == nullptr ? -1 : row[kMapTile])) {
    RecordFirstError(status, PackPlanStatus(i, Status::kBadArgument));
    return false;
  }
  return w->tile[kTileBits] == kBits && p.outputs[w->tile[kTileOutput]].type == kType;
}

JJ_HD JJ_INLINE int32_t TableOf(const IntervalWork& w) {
  return static_cast<int32_t>(w.tile[kTileTables]);  // < num_tables: checked by ResolveInterval
}

// Phase "stage", once per block: the zig-zag table, each thread a share.
JJ_HD inline void StageZigzagPart(int thread, KernelShared* s) {
  for (int k = thread; k < 80; k += kDecodeThreadsPerBlock) s->zigzag[k] = ZigzagTable()[k];
}

// Phase "stage", each round: copies tables[index] word by word, each thread
// a strided share.
JJ_HD inline void StageTablesPart(const DecodePlan& p, int32_t index, int thread,
                                  DecoderTables* staged) {
  constexpr int kWords = sizeof(DecoderTables) / sizeof(uint32_t);
  static_assert(sizeof(DecoderTables) % sizeof(uint32_t) == 0, "tables are whole words");
  const auto* __restrict__ src = reinterpret_cast<const uint32_t*>(p.tables + index);
  auto* __restrict__ dst = reinterpret_cast<uint32_t*>(staged);
  for (int w = thread; w < kWords; w += kDecodeThreadsPerBlock) dst[w] = src[w];
}

// Phase "decode": a claimed interval whose tables are staged, from its
// destuffed bytes.
template <int kBits, OutputType kType>
JJ_HD inline void DecodeClaimed(const DecodePlan& p, const IntervalWork& w, KernelShared& s,
                                int64_t block, int thread, int32_t* status) {
  const int64_t i = block * kDecodeThreadsPerBlock + thread;
  const Status result = DecodeIntervalWith<kBits, kType>(p, w, DestuffedReaderOf(p, i), s.tables,
                                                         ThreadScratch(s, thread));
  if (result != Status::kOk) RecordFirstError(status, PackPlanStatus(i, result));
  p.destuffed.lengths[i] = -1;  // decoded (see CheckIntervalDecoded)
}

// Phase "check", after every decode kernel: an interval with usable starts
// that no kernel decoded (a block map that left it out) is reported, never
// left as whatever the output held. Those no kernel could resolve were
// reported already, with the same word.
JJ_HD JJ_INLINE void CheckIntervalDecoded(const DecodePlan& p, int64_t i, int32_t* status) {
  if (*p.destuffed.starts_status == kPlanOk && p.destuffed.lengths[i] >= 0) {
    RecordFirstError(status, PackPlanStatus(i, Status::kBadArgument));
  }
}

// Calls visit.template operator()<kBits, kType>() for every decode kernel.
template <typename Visit>
inline void ForEachDecodeKernel(Visit&& visit) {
  visit.template operator()<8, OutputType::kFloat32>();
  visit.template operator()<12, OutputType::kFloat32>();
  visit.template operator()<8, OutputType::kBFloat16>();
  visit.template operator()<12, OutputType::kBFloat16>();
  visit.template operator()<8, OutputType::kFloat16>();
  visit.template operator()<12, OutputType::kFloat16>();
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_DECODE_KERNEL_H_
