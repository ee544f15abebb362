// The CUDA decode kernels' bodies, written as functions of (block, thread)
// and phase so the CPU harness in the tests runs exactly the GPU indexing
// and staging logic on machines without a GPU.
//
// A first kernel destuffs every interval (a warp per interval, see
// destuff.h) into the call's workspace, a second builds each tile's
// DecoderTables there from the plan's PackedTables (a block per table, the
// phases of table_build.h); then one thread decodes one restart
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
#include "plan_coverage.h"

namespace jaxjpeg {

// 128 threads: 4 blocks of 53 KiB shared memory and 128 registers per thread
// fill an H200 SM's 16 warps, as 2 blocks of 256 threads would; but a warp
// that has decoded waits at the round barrier (DecodeKernel) for 3 others,
// not 7, and a finished block frees its place sooner. Measured on an H200
// (benchmarks/gpu_decode.py, default rate): 391 / 435 GB/s of float32 on
// 1 / 4 GB against 335 / 355 with 256. JAXJPEG_DECODE_THREADS builds
// another size for measuring.
#ifndef JAXJPEG_DECODE_THREADS
#define JAXJPEG_DECODE_THREADS 128
#endif
constexpr int kDecodeThreadsPerBlock = JAXJPEG_DECODE_THREADS;
// Blocks per SM the register limit is set for (__launch_bounds__).
constexpr int kDecodeBlocksPerSM = 512 / kDecodeThreadsPerBlock;
static_assert(kMapBlockIntervals % kDecodeThreadsPerBlock == 0,
              "a CUDA block's intervals lie in one block map row");
constexpr int32_t kNoTable = 0x7FFFFFFF;
// Threads of a table-building block: 2,048 fast AC entries, 16 each.
constexpr int kBuildTablesThreads = 128;

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

// The block map row of CUDA block `block`.
JJ_HD JJ_INLINE const int32_t* KernelBlockMapRow(const DecodePlan& p, int64_t block) {
  return BlockMapRow(p, block / (kMapBlockIntervals / kDecodeThreadsPerBlock));
}

// Whether the (kBits, kType) kernel has work in `block`: the block map's
// kinds, or every kernel where the plan has no map row.
template <int kBits, OutputType kType>
JJ_HD JJ_INLINE bool BlockHasKind(const DecodePlan& p, int64_t block) {
  const int32_t* row = KernelBlockMapRow(p, block);
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
  const int32_t* row = KernelBlockMapRow(p, block);
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

// Phase "stage", each round: copies built table `index` (the table
// kernel's, in the workspace) word by word, each thread a strided share.
JJ_HD inline void StageTablesPart(const DecodePlan& p, int32_t index, int thread,
                                  DecoderTables* staged) {
  constexpr int kWords = sizeof(DecoderTables) / sizeof(uint32_t);
  static_assert(sizeof(DecoderTables) % sizeof(uint32_t) == 0, "tables are whole words");
  const auto* __restrict__ src = reinterpret_cast<const uint32_t*>(p.built_tables + index);
  auto* __restrict__ dst = reinterpret_cast<uint32_t*>(staged);
  for (int w = thread; w < kWords; w += kDecodeThreadsPerBlock) dst[w] = src[w];
}

// The decode of a warp's claimed intervals runs in lock step, a block per
// step, so that a warp whose 32 blocks of a step are all whole blocks of
// one tile writes them together ("staged"): each block's samples are
// already in shared memory (its thread's column), which serves as the
// staging buffer, and the warp writes the 256 block rows (32 blocks x 8
// rows) as 16-byte chunks in the order (row, block, part of the row), each
// lane learning a block's place from its lane (a shuffle), the affine map
// applied on the way out. So for float32 the two lanes of a pair fill one
// 32-byte sector of a block row and every vector store writes 16 whole
// sectors (a lane alone writes its row as two half-sector stores), and
// blocks adjacent in a row (restart interval 1) leave as 512 contiguous
// bytes per store; for 16-bit types a block row is 16 bytes, so a store
// covers half sectors unless the blocks are adjacent. Any other step (a
// lane without a block, failed or done, a partial block at a tile edge,
// mixed tiles, rows not 16-byte aligned, a warp not all decoding) takes the
// simple path: each lane writes its own block (PutBlock). Failed intervals
// become NaN after the last step, by their own lane, as on the host. Lanes
// that are done or failed still take part in the steps (the votes need
// every member).
constexpr int kWarpLanes = 32;
constexpr uint32_t kFullWarp = 0xFFFFFFFFu;
static_assert(kDecodeThreadsPerBlock % kWarpLanes == 0, "whole warps");

// One lane's interval during the lock-step decode: registers on the device,
// an array element in the harness.
template <OutputType kType>
struct LaneDecode {
  AffineSink<kType> sink;
  BlockGrid grid;
  detail::IntervalCursor<DestuffedBitReader> cursor;
  int32_t blocks_left;
  Status status;
  bool has_block;  // whether this step decoded a block, described by `block`
  detail::DecodedBlock block;
};

// Phase "start" of claimed interval i.
template <OutputType kType>
JJ_HD JJ_INLINE LaneDecode<kType> StartLane(const DecodePlan& p, const IntervalWork& w, int64_t i,
                                            const LaneScratch& s) {
  const BlockGrid grid = TileGrid(w.tile);
  return LaneDecode<kType>{TileSink<kType>(p, w.tile), grid,
                           detail::StartInterval(DestuffedReaderOf(p, i), grid, w.first_block, s),
                           w.num_blocks, Status::kOk, false, detail::DecodedBlock{}};
}

// The lane's part of "the warp may stage", voted once per interval: its
// tile is strided (not placed by table) and its rows 16-byte aligned (so is
// every chunk then: block columns are multiples of 8 elements, 16 bytes or
// more). The other condition is that every lane has the same tile.
template <OutputType kType>
JJ_HD JJ_INLINE bool LaneRowsAligned(const LaneDecode<kType>& d) {
  using Element = typename OutputElement<kType>::Type;
  return d.sink.row_at == nullptr && (reinterpret_cast<uintptr_t>(d.sink.base) & 15) == 0 &&
         (d.sink.row_stride * static_cast<int64_t>(sizeof(Element))) % 16 == 0;
}

// Phase "block": the lane's next block into its column, where it has one
// left and nothing failed.
template <int kBits, OutputType kType>
JJ_HD JJ_INLINE void DecodeLaneBlock(LaneDecode<kType>& d, const DecoderTables& t,
                                     const LaneScratch& s) {
  d.has_block = false;
  if (d.status != Status::kOk || d.blocks_left == 0) return;
  --d.blocks_left;
  d.status = detail::DecodeNextBlock<kBits>(d.cursor, t, d.grid, s, &d.block);
  d.has_block = d.status == Status::kOk;
}

// What the lanes of a warp that may stage vote on each step: all have a
// whole block (the step is regular).
template <OutputType kType>
JJ_HD JJ_INLINE bool LaneHasWholeBlock(const LaneDecode<kType>& d) {
  return d.has_block && d.block.rows == 8 && d.block.cols == 8;
}

// A block's place as one word for a shuffle: top-left row and column
// (< 2^16: a tile is at most 65,535 wide and high).
template <OutputType kType>
JJ_HD JJ_INLINE uint32_t PackedBlockPlace(const LaneDecode<kType>& d) {
  return (static_cast<uint32_t>(d.block.y0) << 16) | static_cast<uint32_t>(d.block.x0);
}

// Phase "fill", regular steps only: a constant block's samples into its
// column (the simple path keeps the one value in a register).
JJ_HD JJ_INLINE void FillConstantColumn(const LaneScratch& s, const detail::DecodedBlock& b) {
  if (!b.dc_only) return;
  JJ_UNROLL
  for (int i = 0; i < 64; ++i) s.samples[i * LaneScratch::kElementStride] = b.dc_sample;
}

// Vector stores per lane of a regular step: 32 blocks of 64 elements in
// 16-byte chunks.
template <OutputType kType>
JJ_HD constexpr int StagedChunksPerLane() {
  return 64 * static_cast<int>(sizeof(typename OutputElement<kType>::Type)) * kWarpLanes / 16 /
         kWarpLanes;
}

// Chunk q = 32 k + lane of a regular step, in the order (block row y, block
// j of the warp, part of the row).
template <OutputType kType>
struct StagedChunk {
  static constexpr int kPerChunk = AffineSink<kType>::kChunkElements;
  static constexpr int kChunksPerRow = 8 / kPerChunk;
  int y, j, part;

  JJ_HD JJ_INLINE StagedChunk(int lane, int k) {
    const int q = k * kWarpLanes + lane;
    const int row_block = q / kChunksPerRow;
    part = q % kChunksPerRow;
    y = row_block / kWarpLanes;
    j = row_block % kWarpLanes;
  }
};

// Phase "staged write", store k (< StagedChunksPerLane) of `lane`, after
// the warp's columns are filled: chunk c's block j has its samples in
// column j of the warp (`warp_columns` is lane 0's) and lies at `place`
// (PackedBlockPlace of lane j); `d` is the writing lane's own interval,
// whose tile is the warp's.
template <OutputType kType>
JJ_HD JJ_INLINE void WriteStagedChunk(const LaneDecode<kType>& d, const StagedChunk<kType>& c,
                                      uint32_t place, const int32_t* warp_columns) {
  constexpr int kPerChunk = StagedChunk<kType>::kPerChunk;
  constexpr int kStride = LaneScratch::kElementStride;
  const int y0 = static_cast<int>(place >> 16), x0 = static_cast<int>(place & 0xFFFF);
  d.sink.template PutChunk<kStride>(y0 + c.y, x0 + c.part * kPerChunk,
                                    warp_columns + (8 * c.y + c.part * kPerChunk) * kStride + c.j);
}

// Phase "simple write": the lane's own block, when the step is not regular.
template <OutputType kType>
JJ_HD JJ_INLINE void PutLaneBlock(const LaneDecode<kType>& d, const LaneScratch& s) {
  if (!d.has_block) return;
  const detail::DecodedBlock& b = d.block;
  detail::PutBlock(d.sink, s, b.dc_only, b.dc_sample, b.y0, b.x0, b.rows, b.cols);
}

// Phase "clear", after either write: the column ready for the next block
// (a constant block's column was filled when its step was staged).
template <OutputType kType>
JJ_HD JJ_INLINE void ClearLaneColumn(const LaneDecode<kType>& d, const LaneScratch& s,
                                     bool staged) {
  if (d.has_block) detail::ClearCoefficients(s, d.block.dc_only && !staged);
}

// Phase "finish", after the warp's last step: the trailing-data check, a
// failed interval to NaN, its status recorded, the interval marked decoded
// (see CheckIntervalDecoded).
template <OutputType kType>
JJ_HD JJ_INLINE void FinishLane(const DecodePlan& p, const LaneDecode<kType>& d,
                                const IntervalWork& w, int64_t i, int32_t* status) {
  Status result = d.status;
  if (result == Status::kOk && HasUnusedBytes(d.cursor.r)) result = Status::kTrailingData;
  if (result != Status::kOk) {
    FillIntervalWithNaN(d.sink, d.grid, w.first_block, w.num_blocks);
    RecordFirstError(status, PackPlanStatus(i, result));
  }
  p.destuffed.lengths[i] = -1;
}

// Phase "check", after every decode kernel: an interval no kernel decoded
// becomes NaN (FillUndecodedIntervalWithNaN). With usable starts that is one
// a block map left out, reported here; those no kernel could resolve were
// reported already, with the same word. Unusable starts decode nothing.
JJ_HD JJ_INLINE void CheckIntervalDecoded(const DecodePlan& p, int64_t i, int32_t* status) {
  const bool starts_usable = *p.destuffed.starts_status == kPlanOk;
  if (starts_usable && p.destuffed.lengths[i] < 0) return;
  if (starts_usable) RecordFirstError(status, PackPlanStatus(i, Status::kBadArgument));
  FillUndecodedIntervalWithNaN(p, i);
}

// Phase "coverage", after the check: an output its tiles do not write exactly
// once (`sums` from AddTileCoverage over every tile, plan_coverage.h) is
// reported and becomes NaN, elements first, first + step, ... by this thread.
JJ_HD inline void CheckOutputCoverage(const DecodePlan& p, int64_t output, const uint64_t* sums,
                                      int32_t* status, int64_t first, int64_t step) {
  if (OutputCovered(p, output, sums)) return;
  if (first == 0) RecordFirstError(status, UncoveredStatus(output));
  FillOutputWithNaN(p.outputs[output], first, step);
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
