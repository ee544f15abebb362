// A decode plan: many restart intervals of many tiles of many tensors, decoded
// by one call. The plan is plain arrays (the custom call's operands), and
// the functions here are what every executor runs for an interval: the CPU
// thread pool (DecodePlanInterval, cpu_executor.h), the CUDA kernels and the
// CPU harness that runs the kernels' logic in tests.
#ifndef JAXJPEG_DECODE_PLAN_H_
#define JAXJPEG_DECODE_PLAN_H_

#include <string>
#include <type_traits>
#include <vector>

#include "destuff.h"
#include "interval_decode.h"
#include "jpeg_defs.h"
#include "output_stage.h"
#include "table_build.h"

namespace jaxjpeg {

// Columns of the int64 tile table, one row per tile (one JPEG image).
enum TileColumn : int {
  kTileTables = 0,         // index into the PackedTables array
  kTileBits,               // 8 or 12
  kTileWidth,
  kTileHeight,
  kTileOutput,             // which output tensor the tile lands in
  kTileRow0,               // top-left of the tile in the output's 2-D view
  kTileCol0,
  kTileRowStride,          // elements per row of the output's 2-D view; placed by table:
                           // where the tile's column offsets start, from its row offsets
  kTileAffineRow0,         // first of the tile's rows in the affine arrays
  kTileFirstInterval,      // the tile's first interval; tiles are sorted by it
  kTileRestartInterval,    // blocks per interval (0: the whole tile is one)
  kTileColScale0,          // first of the tile's columns in col_scale, or -1: no column scale
  kTilePositions0,         // -1: rows kTileRowStride apart from (kTileRow0, kTileCol0); else
                           // the first of the tile's row offsets in `positions`
                           // (AffineSink's placement by table)
  kTileColumns
};

// One output tensor as the executor sees it.
struct PlanOutput {
  void* data;
  int64_t elements;
  OutputType type;

  int64_t bytes() const { return elements * (type == OutputType::kFloat32 ? 4 : 2); }
};

// The destuff pass's results (destuff.h), for executors that run it before
// decoding (the CUDA handler and its CPU harness): interval i's data are
// lengths[i] bytes at area + DestuffedOffset(interval_starts[i], i).
// starts_status is kPlanOk while every interval's starts are usable (see
// PlanStartsStatus).
struct DestuffedIntervals {
  int32_t* starts_status;
  int64_t* lengths;
  uint8_t* area;
};

struct DecodePlan {
  const uint8_t* payload;
  int64_t payload_size;
  // interval_starts[i] is the payload offset of interval i's entropy-coded
  // data, which runs to the next start: the decoder stops at the first marker.
  const int64_t* interval_starts;  // [num_intervals + 1]
  int64_t num_intervals;
  const int64_t* tiles;      // [num_tiles, kTileColumns]
  int64_t num_tiles;
  const PackedTables* tables;
  int64_t num_tables;
  // The DecoderTables built from `tables`, one each, where an executor
  // builds them all before decoding (the CUDA handler, in its workspace;
  // its CPU harness). Host workers build theirs as they go (WorkerTables).
  const DecoderTables* built_tables;
  const float* row_scale;    // [num_affine_rows]
  const float* row_offset;   // [num_affine_rows]
  int64_t num_affine_rows;
  const float* col_scale;    // [num_col_scales]
  int64_t num_col_scales;
  const int64_t* positions;  // [num_positions]: element offsets (kTilePositions0)
  int64_t num_positions;
  const PlanOutput* outputs;
  int64_t num_outputs;
  // The host's map of the CUDA kernels' blocks (see BuildBlockMap); a hint
  // only: an executor decodes the same without it. Unused by the host decoder.
  const int32_t* block_map;  // [num_map_blocks, kBlockMapColumns]
  int64_t num_map_blocks;
  DestuffedIntervals destuffed;  // unused by the host decoder
};

// Status packed as (interval << 4) | code so that an atomic min over all
// failing intervals keeps the first one, deterministically.
constexpr int32_t kPlanOk = 0x7FFFFFFF;
constexpr int64_t kMaxPlanIntervals = int64_t(1) << 27;

JJ_HD inline int32_t PackPlanStatus(int64_t interval, Status s) {
  return static_cast<int32_t>((interval << 4) | static_cast<int32_t>(s));
}

// Interval i's bytes lie inside the payload, its start before its end.
JJ_HD JJ_INLINE bool IntervalStartsValid(const DecodePlan& p, int64_t i) {
  const int64_t begin = p.interval_starts[i], end = p.interval_starts[i + 1];
  return 0 <= begin && begin <= end && end <= p.payload_size;
}

// kPlanOk when every interval's starts are usable, else the packed status of
// the first that is not. A plan that fails this decodes nothing, on every
// executor: the destuff pass lays intervals out from their starts, which is
// sound only when all of them are in order (destuff.h).
inline int32_t PlanStartsStatus(const DecodePlan& p) {
  for (int64_t i = 0; i < p.num_intervals; ++i) {
    if (!IntervalStartsValid(p, i)) return PackPlanStatus(i, Status::kBadArgument);
  }
  return kPlanOk;
}

// The device workspace of a decode call: the output descriptors, the
// coverage sums, the built tables, then the destuff pass's starts status,
// lengths and area (DestuffedIntervals), each part 16-byte aligned. 15 bytes
// of slack align the parts whatever the workspace's own alignment.
JJ_HD JJ_INLINE int64_t AlignUp16(int64_t n) { return (n + 15) / 16 * 16; }

// The per-output sums of the coverage check (plan_coverage.h), 64-bit words.
constexpr int kCoverageWords = 3;

inline int64_t DecodeWorkspaceBytes(int64_t num_outputs, int64_t payload_size,
                                    int64_t num_intervals, int64_t num_tables) {
  return 15 + AlignUp16(num_outputs * static_cast<int64_t>(sizeof(PlanOutput))) +
         AlignUp16(num_outputs * kCoverageWords * 8) +
         AlignUp16(num_tables * static_cast<int64_t>(sizeof(DecoderTables))) + 16 +
         AlignUp16(8 * num_intervals) + DestuffAreaSize(payload_size, num_intervals);
}

struct DecodeWorkspace {
  PlanOutput* outputs;
  uint64_t* coverage;  // kCoverageWords per output
  DecoderTables* built_tables;
  DestuffedIntervals destuffed;
};

inline DecodeWorkspace LayOutDecodeWorkspace(void* base, int64_t num_outputs,
                                             int64_t num_intervals, int64_t num_tables) {
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + 15) & ~uintptr_t(15);
  auto* bytes = reinterpret_cast<uint8_t*>(aligned);
  DecodeWorkspace w;
  w.outputs = reinterpret_cast<PlanOutput*>(bytes);
  bytes += AlignUp16(num_outputs * static_cast<int64_t>(sizeof(PlanOutput)));
  w.coverage = reinterpret_cast<uint64_t*>(bytes);
  bytes += AlignUp16(num_outputs * kCoverageWords * 8);
  w.built_tables = reinterpret_cast<DecoderTables*>(bytes);
  bytes += AlignUp16(num_tables * static_cast<int64_t>(sizeof(DecoderTables)));
  w.destuffed.starts_status = reinterpret_cast<int32_t*>(bytes);
  bytes += 16;
  w.destuffed.lengths = reinterpret_cast<int64_t*>(bytes);
  w.destuffed.area = bytes + AlignUp16(8 * num_intervals);
  return w;
}

JJ_HD JJ_INLINE int64_t TileFirstInterval(const DecodePlan& p, int64_t tile) {
  return p.tiles[tile * kTileColumns + kTileFirstInterval];
}

// The last tile of [lo, hi] whose first interval is <= i (lo if none).
JJ_HD inline int64_t LastTileStartingBy(const DecodePlan& p, int64_t i, int64_t lo, int64_t hi) {
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (TileFirstInterval(p, mid) <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Tile t's intervals [first, next) are non-empty, in order and inside the
// plan, the first tile's from interval 0. Checked by interval t of every
// executor (ResolveIntervalBlocks) with PlanShapeError's tiles <= intervals:
// every tile is then checked, so none is left undecoded (found by review:
// a tile table longer than its intervals left outputs unwritten, and the
// plan succeeded).
JJ_HD inline bool TileIntervalsValid(const DecodePlan& p, int64_t t) {
  const int64_t first = TileFirstInterval(p, t);
  const int64_t next = t + 1 < p.num_tiles ? TileFirstInterval(p, t + 1) : p.num_intervals;
  return (t > 0 || first == 0) && 0 <= first && first < next && next <= p.num_intervals;
}

// Why a plan's sizes are refused before any interval runs, or nullptr: each
// tile owns at least one interval (TileIntervalsValid), so a plan of more
// tiles than intervals, or of none (found by review: zero intervals decoded
// nothing and succeeded), cannot be whole.
inline const char* PlanShapeError(const DecodePlan& p) {
  if (p.num_intervals > kMaxPlanIntervals) return "too many restart intervals in one plan";
  if (p.num_tiles > p.num_intervals) return "more tiles than restart intervals";
  return nullptr;
}

// The tile holding interval i: the last tile whose first interval is <= i.
JJ_HD inline int64_t FindTile(const DecodePlan& p, int64_t i) {
  return LastTileStartingBy(p, i, 0, p.num_tiles - 1);
}

// The block map (BuildBlockMap): a CUDA decode block covers kMapBlockIntervals
// consecutive intervals; its row holds the tile of its first interval and a
// bit (KindBit) for each decode kernel kind among its intervals, so a thread
// searches for its tile from there and a kernel skips blocks without its kind.
constexpr int kMapBlockIntervals = 256;
enum BlockMapColumn : int { kMapTile = 0, kMapKinds, kBlockMapColumns };
constexpr int32_t kAllKinds = 0x3F;

JJ_HD JJ_INLINE int32_t KindBit(int64_t bits, OutputType type) {
  return int32_t(1) << ((bits == 12 ? 3 : 0) + static_cast<int>(type));
}

// The map's row of block b, or null where the plan has none.
JJ_HD JJ_INLINE const int32_t* BlockMapRow(const DecodePlan& p, int64_t block) {
  return block < p.num_map_blocks ? p.block_map + block * kBlockMapColumns : nullptr;
}

// FindTile's answer, searched from `hint`: a window of kMapBlockIntervals
// tiles (a tile has at least one interval), its first tile tried first. The
// answer is checked (i lies between its first interval and the next tile's),
// so where tiles are in order any hint gives FindTile's tile; an unusable
// hint falls back to FindTile.
JJ_HD inline int64_t FindTileFrom(const DecodePlan& p, int64_t i, int64_t hint) {
  if (hint >= 0 && hint < p.num_tiles && TileFirstInterval(p, hint) <= i) {
    const bool last = hint + 1 == p.num_tiles;
    if (last || TileFirstInterval(p, hint + 1) > i) return hint;
    const int64_t hi = p.num_tiles - 1 - hint < kMapBlockIntervals ? p.num_tiles - 1
                                                                  : hint + kMapBlockIntervals;
    const int64_t t = LastTileStartingBy(p, i, hint + 1, hi);
    if (TileFirstInterval(p, t) <= i && (t + 1 == p.num_tiles || TileFirstInterval(p, t + 1) > i)) {
      return t;
    }
  }
  return FindTile(p, i);
}

// Builds a plan's block map (see kMapBlockIntervals) from its interval
// count, tiles and output types, checking what the map relies on: tiles
// in order of their first intervals, each with at least one interval, the
// first at interval 0, the last ending at the plan's end, and each of a
// known kind. Returns "" or why the plan is refused.
inline std::string BuildBlockMap(int64_t num_intervals, const int64_t* tiles, int64_t num_tiles,
                                 const int32_t* output_types, int64_t num_outputs,
                                 std::vector<int32_t>* map) {
  const int64_t blocks = (num_intervals + kMapBlockIntervals - 1) / kMapBlockIntervals;
  map->assign(static_cast<size_t>(blocks * kBlockMapColumns), 0);
  if (num_intervals > kMaxPlanIntervals) return "too many restart intervals in one plan";
  if (num_intervals > 0 && (num_tiles < 1 || tiles[kTileFirstInterval] != 0)) {
    return "the first tile must start at interval 0";
  }
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int64_t* tile = tiles + t * kTileColumns;
    const std::string name = "tile " + std::to_string(t);
    const int64_t first = tile[kTileFirstInterval];
    const int64_t next =
        t + 1 < num_tiles ? tiles[(t + 1) * kTileColumns + kTileFirstInterval] : num_intervals;
    if (first < 0 || next <= first || next > num_intervals) {
      return name + ": its intervals [" + std::to_string(first) + ", " + std::to_string(next) +
             ") are empty, out of order or past the plan's " + std::to_string(num_intervals);
    }
    if (tile[kTileBits] != 8 && tile[kTileBits] != 12) return name + ": bits must be 8 or 12";
    if (tile[kTileOutput] < 0 || tile[kTileOutput] >= num_outputs) {
      return name + ": output index out of range";
    }
    const int32_t type = output_types[tile[kTileOutput]];
    if (type < 0 || type > 2) return name + ": unknown output type";
    const int32_t kind = KindBit(tile[kTileBits], static_cast<OutputType>(type));
    for (int64_t b = first / kMapBlockIntervals; b <= (next - 1) / kMapBlockIntervals; ++b) {
      int32_t* row = map->data() + b * kBlockMapColumns;
      // Tiles are contiguous from interval 0: the first to reach block b
      // holds its first interval.
      if (row[kMapKinds] == 0) row[kMapTile] = static_cast<int32_t>(t);
      row[kMapKinds] |= kind;
    }
  }
  return "";
}

// What one interval decodes, resolved from the plan and checked against it.
struct IntervalWork {
  const int64_t* tile;
  int64_t begin, end;
  int32_t first_block, num_blocks;  // a tile has fewer than 2^31 blocks
};

// a * b <= limit, exactly, for any 64-bit a and b.
JJ_HD JJ_INLINE bool ProductAtMost(uint64_t a, uint64_t b, uint64_t limit) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b) == 0 && a * b <= limit;
#else
  return static_cast<unsigned __int128>(a) * b <= limit;
#endif
}

// Whether every element (y, x) of rows [y0, y1) and columns [x0, x1) of a
// tile placed by table lands inside an output of `elements`: each offset in
// [0, elements), and the largest row's plus the largest column's below it.
JJ_HD inline bool PlacedSpanFits(const int64_t* row_at, int32_t y0, int32_t y1,
                                 const int64_t* col_at, int32_t x0, int32_t x1, int64_t elements) {
  int64_t last_row = 0, last_col = 0;
  for (int32_t y = y0; y < y1; ++y) {
    if (row_at[y] < 0 || row_at[y] >= elements) return false;
    last_row = row_at[y] > last_row ? row_at[y] : last_row;
  }
  for (int32_t x = x0; x < x1; ++x) {
    if (col_at[x] < 0 || col_at[x] >= elements) return false;
    last_col = col_at[x] > last_col ? col_at[x] : last_col;
  }
  return last_row < elements - last_col;
}

// The placement check of an interval of a tile placed by table: its row and
// column offsets (`height` from positions0, `width` from positions0 +
// col_distance) lie inside `positions`, and every element it writes inside
// its output. The tables are untrusted, so the offsets the interval uses are
// read: block row by block row, the rows and columns of its blocks there
// (about one entry per 8 elements decoded).
JJ_HD inline bool PlacedIntervalFits(const DecodePlan& p, const IntervalWork& w,
                                     int64_t positions0, int64_t col_distance, int32_t width,
                                     int32_t height, int64_t elements) {
  // By subtraction: the operands are hostile; positions0 >= 0 here.
  if (positions0 > p.num_positions - height || col_distance < -positions0 ||
      col_distance > p.num_positions - width - positions0) {
    return false;
  }
  const int64_t* row_at = p.positions + positions0;
  const int64_t* col_at = row_at + col_distance;
  const int32_t blocks_wide = (width + 7) / 8;
  const int32_t first_row = w.first_block / blocks_wide;
  const int32_t last = w.first_block + w.num_blocks - 1;
  const int32_t last_row = last / blocks_wide;
  for (int32_t by = first_row; by <= last_row; ++by) {
    const int32_t bx0 = by == first_row ? w.first_block % blocks_wide : 0;
    const int32_t bx1 = by == last_row ? last % blocks_wide : blocks_wide - 1;
    const int32_t y1 = by * 8 + 8 < height ? by * 8 + 8 : height;
    const int32_t x1 = bx1 * 8 + 8 < width ? bx1 * 8 + 8 : width;
    if (!PlacedSpanFits(row_at, by * 8, y1, col_at, bx0 * 8, x1, elements)) return false;
  }
  return true;
}

// Resolves where interval i writes (its tile searched from `tile_hint`, see
// FindTileFrom) and checks that it writes only inside its output and affine
// rows: the plan is untrusted input. Its bytes are not looked at (see
// ResolveInterval).
JJ_HD inline bool ResolveIntervalBlocks(const DecodePlan& p, int64_t i, IntervalWork* w,
                                        int64_t tile_hint = -1) {
  if (p.num_tiles < 1) return false;
  if (i < p.num_tiles && !TileIntervalsValid(p, i)) return false;
  const int64_t t = FindTileFrom(p, i, tile_hint);
  const int64_t* tile = p.tiles + t * kTileColumns;
  w->tile = tile;
  const int64_t width = tile[kTileWidth], height = tile[kTileHeight];
  if (width < 1 || height < 1 || width > kMaxDimension || height > kMaxDimension) return false;
  if (tile[kTileBits] != 8 && tile[kTileBits] != 12) return false;
  if (tile[kTileTables] < 0 || tile[kTileTables] >= p.num_tables) return false;
  if (tile[kTileOutput] < 0 || tile[kTileOutput] >= p.num_outputs) return false;
  // Block counts fit 32 bits (at most 8,192 x 8,192 blocks), and divisions
  // are 32-bit: a 64-bit one is a subroutine call on the GPU, and values
  // live across such calls cost registers (spills below ~100 per thread). A
  // restart interval longer than the tile means one interval, as `blocks`.
  const int32_t blocks = static_cast<int32_t>(((width + 7) / 8) * ((height + 7) / 8));
  const int64_t restart = tile[kTileRestartInterval];
  const int32_t per = restart > 0 && restart < blocks ? static_cast<int32_t>(restart) : blocks;
  // Differences of interval numbers wrap (unsigned): another tile's first
  // interval may be anything (INT64_MIN), signed overflow is undefined on the
  // GPU, which reads tile tables the host never checked, and a negative
  // difference wraps to one no tile's interval count reaches.
  const uint64_t first = static_cast<uint64_t>(tile[kTileFirstInterval]);
  const uint64_t k = static_cast<uint64_t>(i) - first;
  const int32_t intervals = (blocks + per - 1) / per;
  if (k >= static_cast<uint64_t>(intervals)) return false;
  // The tile owns exactly the intervals its blocks make: with fewer, blocks
  // past them were never decoded and the plan still succeeded (found by
  // review: uninitialised output through the custom call).
  const int64_t next = t + 1 < p.num_tiles ? TileFirstInterval(p, t + 1) : p.num_intervals;
  if (static_cast<uint64_t>(next) - first != static_cast<uint64_t>(intervals)) return false;
  w->first_block = static_cast<int32_t>(k) * per;
  w->num_blocks = blocks - w->first_block < per ? blocks - w->first_block : per;
  // Comparisons by subtraction: the operands are hostile and a sum could
  // overflow; width and height are already known to be small.
  if (tile[kTileAffineRow0] < 0 || tile[kTileAffineRow0] > p.num_affine_rows - height) {
    return false;
  }
  const int64_t col_scale0 = tile[kTileColScale0];
  if (col_scale0 < -1 || (col_scale0 >= 0 && col_scale0 > p.num_col_scales - width)) return false;
  const int64_t elements = p.outputs[tile[kTileOutput]].elements;
  const int64_t positions0 = tile[kTilePositions0];
  if (positions0 >= 0) {
    return PlacedIntervalFits(p, *w, positions0, tile[kTileRowStride],
                              static_cast<int32_t>(width), static_cast<int32_t>(height),
                              elements);
  }
  if (positions0 != -1) return false;
  const int64_t stride = tile[kTileRowStride], row0 = tile[kTileRow0], col0 = tile[kTileCol0];
  if (stride < 1 || row0 < 0 || col0 < 0 || col0 > stride - width) return false;
  // (row0 + height) * stride <= elements, without a division: elements is
  // trusted (an output's size), so past the first test the sum cannot
  // overflow, and the product is taken in 128 bits.
  if (row0 > elements) return false;
  return ProductAtMost(static_cast<uint64_t>(row0 + height), static_cast<uint64_t>(stride),
                       static_cast<uint64_t>(elements));
}

// ResolveIntervalBlocks, and the interval reads only inside the payload.
JJ_HD inline bool ResolveInterval(const DecodePlan& p, int64_t i, IntervalWork* w,
                                  int64_t tile_hint = -1) {
  if (!ResolveIntervalBlocks(p, i, w, tile_hint) || !IntervalStartsValid(p, i)) return false;
  w->begin = p.interval_starts[i];
  w->end = p.interval_starts[i + 1];
  return true;
}

// A corrupt interval's blocks become NaN, never half-decoded values: inside a
// jitted program on the GPU nothing raises, and NaN is what cannot pass for
// weights. (The status word still names the first failing interval.)
template <typename Sink>
JJ_HD inline void FillIntervalWithNaN(const Sink& sink, const BlockGrid& grid,
                                      int64_t first_block, int64_t num_blocks) {
  const int32_t first = static_cast<int32_t>(first_block);  // see ResolveInterval
  for (int32_t b = first; b < first + static_cast<int32_t>(num_blocks); ++b) {
    const int y0 = b / grid.blocks_wide * 8;
    const int x0 = b % grid.blocks_wide * 8;
    const int rows = grid.height - y0 < 8 ? grid.height - y0 : 8;
    const int cols = grid.width - x0 < 8 ? grid.width - x0 : 8;
    for (int y = 0; y < rows; ++y) sink.PutNaNRow(y0 + y, x0, cols);
  }
}

// The sink and block grid of a resolved interval's tile.
template <OutputType kType>
JJ_HD JJ_INLINE AffineSink<kType> TileSink(const DecodePlan& p, const int64_t* tile) {
  using Element = typename OutputElement<kType>::Type;
  const PlanOutput& out = p.outputs[tile[kTileOutput]];
  const float* col_scale = tile[kTileColScale0] >= 0 ? p.col_scale + tile[kTileColScale0] : nullptr;
  const int64_t positions0 = tile[kTilePositions0];
  if (positions0 >= 0) {
    return AffineSink<kType>{static_cast<Element*>(out.data), tile[kTileRowStride],
                             p.row_scale + tile[kTileAffineRow0],
                             p.row_offset + tile[kTileAffineRow0], col_scale,
                             p.positions + positions0};
  }
  return AffineSink<kType>{
      static_cast<Element*>(out.data) + tile[kTileRow0] * tile[kTileRowStride] + tile[kTileCol0],
      tile[kTileRowStride], p.row_scale + tile[kTileAffineRow0],
      p.row_offset + tile[kTileAffineRow0], col_scale, nullptr};
}

JJ_HD JJ_INLINE BlockGrid TileGrid(const int64_t* tile) {
  const int32_t width = static_cast<int32_t>(tile[kTileWidth]);
  return BlockGrid{width, static_cast<int32_t>(tile[kTileHeight]), (width + 7) / 8};
}

// A reader over interval i's destuffed bytes (see DestuffedIntervals).
JJ_HD JJ_INLINE DestuffedBitReader DestuffedReaderOf(const DecodePlan& p, int64_t i) {
  return MakeDestuffedBitReader(p.destuffed.area + DestuffedOffset(p.interval_starts[i], i),
                                p.destuffed.lengths[i]);
}

// Decodes a resolved interval on the host's stack scratch (and its AVX2
// build, see DecodeInterval); a failed interval becomes NaN.
template <OutputType kType>
JJ_HD inline Status DecodeIntervalAs(const DecodePlan& p, const IntervalWork& w,
                                     const DecoderTables& tables) {
  const AffineSink<kType> sink = TileSink<kType>(p, w.tile);
  const BlockGrid grid = TileGrid(w.tile);
  const uint8_t* begin = p.payload + w.begin;
  const uint8_t* end = p.payload + w.end;
  const Status status =
      w.tile[kTileBits] == 12
          ? DecodeInterval<12>(begin, end, tables, grid, w.first_block, w.num_blocks, sink)
          : DecodeInterval<8>(begin, end, tables, grid, w.first_block, w.num_blocks, sink);
  if (status != Status::kOk) FillIntervalWithNaN(sink, grid, w.first_block, w.num_blocks);
  return status;
}

// Calls f(std::integral_constant<OutputType, type>{}): code typed by its
// output (a sink) is written once for the three types.
template <typename F>
JJ_HD JJ_INLINE void WithOutputType(OutputType type, const F& f) {
  switch (type) {
    case OutputType::kFloat32: f(std::integral_constant<OutputType, OutputType::kFloat32>{}); break;
    case OutputType::kBFloat16: f(std::integral_constant<OutputType, OutputType::kBFloat16>{}); break;
    case OutputType::kFloat16: f(std::integral_constant<OutputType, OutputType::kFloat16>{}); break;
  }
}

// An interval no decoder wrote (the plan's starts were unusable, or a block
// map left it out) becomes NaN as a corrupt one does, never whatever its
// output held: inside a jitted program nothing raises. An interval whose
// tile does not resolve has no place of its own to fill.
JJ_HD inline void FillUndecodedIntervalWithNaN(const DecodePlan& p, int64_t i) {
  IntervalWork w;
  if (!ResolveIntervalBlocks(p, i, &w)) return;
  WithOutputType(p.outputs[w.tile[kTileOutput]].type, [&](auto type) {
    FillIntervalWithNaN(TileSink<decltype(type)::value>(p, w.tile), TileGrid(w.tile),
                        w.first_block, w.num_blocks);
  });
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_DECODE_PLAN_H_
