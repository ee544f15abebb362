// A decode plan: many restart intervals of many tiles of many tensors, decoded
// by one call. The plan is plain arrays (the custom call's operands), and
// DecodePlanInterval is the body every executor runs for interval i: the CPU
// thread pool, the CUDA kernel (one thread per interval) and the CPU harness
// that runs the CUDA indexing logic in tests.
#ifndef JAXJPEG_DECODE_PLAN_H_
#define JAXJPEG_DECODE_PLAN_H_

#include "interval_decode.h"
#include "jpeg_defs.h"
#include "output_stage.h"

namespace jaxjpeg {

// Columns of the int64 interval table, one row per restart interval.
enum IntervalColumn : int {
  kIntervalBegin = 0,       // first payload byte of the interval's entropy-coded data
  kIntervalEnd,             // one past its last byte (may include the next marker)
  kIntervalTile,            // row of the tile table
  kIntervalFirstBlock,      // first 8x8 block, row-major within the tile
  kIntervalNumBlocks,       // blocks in this interval
  kIntervalColumns
};

// Columns of the int64 tile table, one row per tile (one JPEG image).
enum TileColumn : int {
  kTileTables = 0,    // index into the DecoderTables array
  kTileBits,          // 8 or 12
  kTileWidth,
  kTileHeight,
  kTileOutput,        // which output tensor the tile lands in
  kTileRow0,          // top-left of the tile in the output's 2-D view
  kTileCol0,
  kTileRowStride,     // elements per row of the output's 2-D view
  kTileAffineRow0,    // first of the tile's rows in the affine arrays
  kTileColumns
};

// One output tensor as the executor sees it.
struct PlanOutput {
  void* data;
  int64_t elements;
  OutputType type;
};

struct DecodePlan {
  const uint8_t* payload;
  int64_t payload_size;
  const int64_t* intervals;  // [num_intervals, kIntervalColumns]
  int64_t num_intervals;
  const int64_t* tiles;      // [num_tiles, kTileColumns]
  int64_t num_tiles;
  const DecoderTables* tables;
  int64_t num_tables;
  const float* row_scale;    // [num_affine_rows]
  const float* row_offset;   // [num_affine_rows]
  int64_t num_affine_rows;
  const PlanOutput* outputs;
  int64_t num_outputs;
};

// Status packed as (interval << 4) | code so that an atomic min over all
// failing intervals keeps the first one, deterministically.
constexpr int32_t kPlanOk = 0x7FFFFFFF;
constexpr int64_t kMaxPlanIntervals = int64_t(1) << 27;

JJ_HD inline int32_t PackPlanStatus(int64_t interval, Status s) {
  return static_cast<int32_t>((interval << 4) | static_cast<int32_t>(s));
}

// Checks that interval i reads only inside the payload and its tile writes
// only inside its output and affine rows. The plan is untrusted input.
JJ_HD inline bool PlanIntervalInBounds(const DecodePlan& p, int64_t i) {
  const int64_t* iv = p.intervals + i * kIntervalColumns;
  if (iv[kIntervalBegin] < 0 || iv[kIntervalBegin] > iv[kIntervalEnd] ||
      iv[kIntervalEnd] > p.payload_size || iv[kIntervalTile] < 0 ||
      iv[kIntervalTile] >= p.num_tiles) {
    return false;
  }
  const int64_t* tile = p.tiles + iv[kIntervalTile] * kTileColumns;
  const int64_t width = tile[kTileWidth], height = tile[kTileHeight];
  if (width < 1 || height < 1 || width > kMaxDimension || height > kMaxDimension) return false;
  if (tile[kTileBits] != 8 && tile[kTileBits] != 12) return false;
  if (tile[kTileTables] < 0 || tile[kTileTables] >= p.num_tables) return false;
  if (tile[kTileOutput] < 0 || tile[kTileOutput] >= p.num_outputs) return false;
  const int64_t blocks = ((width + 7) / 8) * ((height + 7) / 8);
  if (iv[kIntervalFirstBlock] < 0 || iv[kIntervalNumBlocks] < 1 ||
      iv[kIntervalFirstBlock] + iv[kIntervalNumBlocks] > blocks) {
    return false;
  }
  if (tile[kTileAffineRow0] < 0 || tile[kTileAffineRow0] + height > p.num_affine_rows) return false;
  const int64_t stride = tile[kTileRowStride], row0 = tile[kTileRow0], col0 = tile[kTileCol0];
  const int64_t elements = p.outputs[tile[kTileOutput]].elements;
  if (stride < 1 || row0 < 0 || col0 < 0 || col0 + width > stride) return false;
  return row0 + height <= elements / stride;
}

template <OutputType kType>
JJ_HD inline Status DecodePlanIntervalAs(const DecodePlan& p, const int64_t* iv,
                                         const int64_t* tile) {
  using Element = typename OutputElement<kType>::Type;
  const PlanOutput& out = p.outputs[tile[kTileOutput]];
  AffineSink<kType> sink{
      static_cast<Element*>(out.data) + tile[kTileRow0] * tile[kTileRowStride] + tile[kTileCol0],
      tile[kTileRowStride], p.row_scale + tile[kTileAffineRow0],
      p.row_offset + tile[kTileAffineRow0]};
  const int32_t width = static_cast<int32_t>(tile[kTileWidth]);
  const BlockGrid grid{width, static_cast<int32_t>(tile[kTileHeight]), (width + 7) / 8};
  const DecoderTables& tables = p.tables[tile[kTileTables]];
  const uint8_t* begin = p.payload + iv[kIntervalBegin];
  const uint8_t* end = p.payload + iv[kIntervalEnd];
  if (tile[kTileBits] == 12) {
    return DecodeInterval<12>(begin, end, tables, grid, iv[kIntervalFirstBlock],
                              iv[kIntervalNumBlocks], sink);
  }
  return DecodeInterval<8>(begin, end, tables, grid, iv[kIntervalFirstBlock],
                           iv[kIntervalNumBlocks], sink);
}

// Decodes interval i of the plan; returns kPlanOk or the packed status.
JJ_HD inline int32_t DecodePlanInterval(const DecodePlan& p, int64_t i) {
  if (!PlanIntervalInBounds(p, i)) return PackPlanStatus(i, Status::kBadArgument);
  const int64_t* iv = p.intervals + i * kIntervalColumns;
  const int64_t* tile = p.tiles + iv[kIntervalTile] * kTileColumns;
  Status s = Status::kBadArgument;
  switch (p.outputs[tile[kTileOutput]].type) {
    case OutputType::kFloat32: s = DecodePlanIntervalAs<OutputType::kFloat32>(p, iv, tile); break;
    case OutputType::kBFloat16: s = DecodePlanIntervalAs<OutputType::kBFloat16>(p, iv, tile); break;
    case OutputType::kFloat16: s = DecodePlanIntervalAs<OutputType::kFloat16>(p, iv, tile); break;
  }
  return s == Status::kOk ? kPlanOk : PackPlanStatus(i, s);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_DECODE_PLAN_H_
