// The CUDA decode kernel's body, written as functions of (block, thread)
// indices so the CPU harness in the tests runs exactly the GPU indexing and
// staging logic on machines without a GPU. One thread decodes one restart
// interval; a block of threads shares one staged copy of the tables of its
// first interval's tile (consecutive intervals almost always share a tile).
#ifndef JAXJPEG_DECODE_KERNEL_H_
#define JAXJPEG_DECODE_KERNEL_H_

#include "decode_plan.h"

namespace jaxjpeg {

constexpr int kDecodeThreadsPerBlock = 128;

JJ_HD inline int64_t KernelBlockCount(int64_t num_intervals) {
  return (num_intervals + kDecodeThreadsPerBlock - 1) / kDecodeThreadsPerBlock;
}

// Which DecoderTables block `block` stages: those of its first interval's
// tile, or -1 if that index is unusable (the interval then fails on its own).
JJ_HD inline int64_t StagedTablesIndex(const DecodePlan& p, int64_t block) {
  const int64_t first = block * kDecodeThreadsPerBlock;
  if (first >= p.num_intervals || p.num_tiles < 1) return -1;
  const int64_t index = p.tiles[FindTile(p, first) * kTileColumns + kTileTables];
  return (index >= 0 && index < p.num_tables) ? index : -1;
}

// Copies tables[index] word by word, each thread a strided share.
JJ_HD inline void StageTablesPart(const DecodePlan& p, int64_t index, int thread,
                                  DecoderTables* staged) {
  constexpr int kWords = sizeof(DecoderTables) / sizeof(uint32_t);
  static_assert(sizeof(DecoderTables) % sizeof(uint32_t) == 0, "tables are whole words");
  const auto* src = reinterpret_cast<const uint32_t*>(p.tables + index);
  auto* dst = reinterpret_cast<uint32_t*>(staged);
  for (int w = thread; w < kWords; w += kDecodeThreadsPerBlock) dst[w] = src[w];
}

JJ_HD JJ_INLINE void RecordFirstError(int32_t* status, int32_t value) {
#if defined(__CUDA_ARCH__)
  atomicMin(status, value);
#else
  if (value < *status) *status = value;
#endif
}

// Decodes the interval of (block, thread), recording failures in *status.
JJ_HD inline void DecodeKernelThread(const DecodePlan& p, int64_t block, int thread,
                                     const DecoderTables* staged, int64_t staged_index,
                                     int32_t* status) {
  const int64_t i = block * kDecodeThreadsPerBlock + thread;
  if (i >= p.num_intervals) return;
  const int32_t result = DecodePlanInterval(p, i, staged, staged_index);
  if (result != kPlanOk) RecordFirstError(status, result);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_DECODE_KERNEL_H_
