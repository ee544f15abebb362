// libFuzzer harness for the jaxjpeg decoder core: parses the header, indexes
// the restart intervals and decodes every interval of an arbitrary input, the
// same path jaxjpeg._native.decode_samples takes (single-threaded here).
//
// Build and run (see docs/fuzzing.md):
//   clang++ -std=c++17 -g -O1 -ffp-contract=off \
//     -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
//     -I xla_ops tests/fuzz/fuzz_decode.cc xla_ops/stream_header.cc -o /tmp/fuzz_decode
//   /tmp/fuzz_decode -max_total_time=600 -max_len=65536 /tmp/jj_corpus
//
// The input is copied into an exactly-sized heap buffer (libFuzzer already does
// this) so AddressSanitizer flags any read past its end.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_executor.h"
#include "decode_plan.h"
#include "interval_decode.h"
#include "kernel_harness.h"
#include "output_stage.h"
#include "stream_header.h"

namespace {

// Images above this many samples are skipped so a 20-byte header cannot make
// the harness allocate gigabytes (libFuzzer's -rss_limit_mb would fire).
constexpr int64_t kMaxSamples = int64_t(4) << 20;

template <int kBits>
void DecodeAll(const uint8_t* data, const jaxjpeg::StreamInfo& info,
               const jaxjpeg::DecoderTables& tables, const int64_t* starts, uint16_t* out) {
  const jaxjpeg::SampleSink sink{out, info.width};
  const int64_t blocks = info.NumBlocks();
  const int64_t per = info.restart_interval ? info.restart_interval : blocks;
  for (int64_t i = 0; i < info.NumIntervals(); ++i) {
    const int64_t first = i * per;
    const int64_t n = per < blocks - first ? per : blocks - first;
    jaxjpeg::DecodeInterval<kBits>(data + starts[i], data + starts[i + 1], tables,
                                   info.Grid(), first, n, sink);
  }
}

// The plan's tile placed by table, transposed (element (y, x) at
// x * height + y): the host body and the kernels' harness give the strided
// decode's status and its bits transposed, NaN included.
void DecodePlacedTransposed(const jaxjpeg::DecodePlan& strided, const int64_t* tile, int32_t host,
                            const std::vector<float>& out) {
  const int64_t height = tile[jaxjpeg::kTileHeight], width = tile[jaxjpeg::kTileWidth];
  std::vector<int64_t> positions(static_cast<size_t>(height + width));
  for (int64_t y = 0; y < height; ++y) positions[y] = y;
  for (int64_t x = 0; x < width; ++x) positions[height + x] = x * height;
  int64_t placed_tile[jaxjpeg::kTileColumns];
  std::memcpy(placed_tile, tile, sizeof placed_tile);
  placed_tile[jaxjpeg::kTilePositions0] = 0;
  placed_tile[jaxjpeg::kTileRowStride] = height;  // column offsets after the row offsets
  for (int executor = 0; executor < 2; ++executor) {
    std::vector<float> placed_out(out.size());
    jaxjpeg::PlanOutput output{placed_out.data(), static_cast<int64_t>(placed_out.size()),
                               jaxjpeg::OutputType::kFloat32};
    jaxjpeg::DecodePlan placed = strided;
    placed.tiles = placed_tile;
    placed.positions = positions.data();
    placed.num_positions = static_cast<int64_t>(positions.size());
    placed.outputs = &output;
    int32_t status = jaxjpeg::kPlanOk;
    if (executor == 0) {
      jaxjpeg::WorkerTables tables;
      for (int64_t i = 0; i < placed.num_intervals; ++i) {
        const int32_t s = jaxjpeg::DecodePlanInterval(placed, i, tables);
        if (s < status) status = s;
      }
    } else {
      status = jaxjpeg::RunKernelHarness(placed);
    }
    if (status != host) std::abort();
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t x = 0; x < width; ++x) {
        if (std::memcmp(&placed_out[x * height + y], &out[y * width + x], sizeof(float)) != 0) {
          std::abort();
        }
      }
    }
  }
}

// A tile table of the stream's tile plus tiles whose first intervals are
// extreme (INT64_MIN; -1 then INT64_MAX): every executor refuses the plan,
// and computing an interval's place in such a tile must not overflow (found
// by review: i - first and next - first were signed overflow, undefined on
// the GPU, which reads tile tables the host never checked).
void RefuseExtremeTileFirsts(const jaxjpeg::DecodePlan& plan, const int64_t* tile) {
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  const std::vector<std::vector<int64_t>> cases = {{kMin}, {-1, kMax}};
  for (const std::vector<int64_t>& firsts : cases) {
    const int64_t num_tiles = 1 + static_cast<int64_t>(firsts.size());
    if (num_tiles > plan.num_intervals) continue;  // PlanShapeError refuses it first
    std::vector<int64_t> tiles(tile, tile + jaxjpeg::kTileColumns);
    for (int64_t first : firsts) {
      tiles.insert(tiles.end(), tile, tile + jaxjpeg::kTileColumns);
      tiles[tiles.size() - jaxjpeg::kTileColumns + jaxjpeg::kTileFirstInterval] = first;
    }
    jaxjpeg::DecodePlan hostile = plan;
    hostile.tiles = tiles.data();
    hostile.num_tiles = num_tiles;
    int32_t host = jaxjpeg::kPlanOk;
    jaxjpeg::WorkerTables tables;
    for (int64_t i = 0; i < hostile.num_intervals; ++i) {
      const int32_t s = jaxjpeg::DecodePlanInterval(hostile, i, tables);
      if (s < host) host = s;
    }
    if (host == jaxjpeg::kPlanOk || jaxjpeg::RunKernelHarness(hostile) == jaxjpeg::kPlanOk) {
      std::abort();
    }
  }
}

// The same interval again through the decode-plan executor body with a
// float32 affine output, as run_plan and the custom call do; then through
// the CUDA decode's CPU harness (destuff pass, destuffed reader, block map),
// which must give the same first error and the same bits.
void DecodeAsPlan(const uint8_t* data, int64_t size, const jaxjpeg::StreamInfo& info,
                  const int64_t* starts, std::vector<float>& out) {
  std::vector<float> scale(info.height, 1.0f), offset(info.height, 0.0f), cols(info.width, 1.0f);
  int64_t tile[jaxjpeg::kTileColumns] = {};
  tile[jaxjpeg::kTileTables] = 0;
  tile[jaxjpeg::kTileBits] = info.bits;
  tile[jaxjpeg::kTileWidth] = info.width;
  tile[jaxjpeg::kTileHeight] = info.height;
  tile[jaxjpeg::kTileRowStride] = info.width;
  tile[jaxjpeg::kTileRestartInterval] = info.restart_interval;
  tile[jaxjpeg::kTileColScale0] = 0;
  tile[jaxjpeg::kTilePositions0] = -1;  // strided
  jaxjpeg::PlanOutput output{out.data(), static_cast<int64_t>(out.size()),
                             jaxjpeg::OutputType::kFloat32};
  jaxjpeg::DecodePlan plan{};
  plan.payload = data;
  plan.payload_size = size;
  plan.interval_starts = starts;
  plan.num_intervals = info.NumIntervals();
  plan.tiles = tile;
  plan.num_tiles = 1;
  plan.tables = &info.packed;
  plan.num_tables = 1;
  plan.row_scale = scale.data();
  plan.row_offset = offset.data();
  plan.num_affine_rows = info.height;
  plan.col_scale = cols.data();
  plan.num_col_scales = info.width;
  plan.outputs = &output;
  plan.num_outputs = 1;
  int32_t host = jaxjpeg::kPlanOk;
  jaxjpeg::WorkerTables tables;
  for (int64_t i = 0; i < plan.num_intervals; ++i) {
    const int32_t s = jaxjpeg::DecodePlanInterval(plan, i, tables);
    if (s < host) host = s;
  }
  std::vector<int32_t> map;
  const int32_t types[1] = {0};
  if (!jaxjpeg::BuildBlockMap(plan.num_intervals, tile, 1, types, 1, &map).empty()) std::abort();
  std::vector<float> kernel_out(out.size());
  jaxjpeg::PlanOutput kernel_output{kernel_out.data(), static_cast<int64_t>(kernel_out.size()),
                                    jaxjpeg::OutputType::kFloat32};
  jaxjpeg::DecodePlan kernels = plan;
  kernels.outputs = &kernel_output;
  kernels.block_map = map.data();
  kernels.num_map_blocks = static_cast<int64_t>(map.size()) / jaxjpeg::kBlockMapColumns;
  if (jaxjpeg::RunKernelHarness(kernels) != host ||
      std::memcmp(out.data(), kernel_out.data(), out.size() * sizeof(float)) != 0) {
    std::abort();
  }
  DecodePlacedTransposed(plan, tile, host, out);
  RefuseExtremeTileFirsts(plan, tile);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  jaxjpeg::StreamInfo info;
  if (jaxjpeg::ParseStreamHeader(data, static_cast<int64_t>(size), &info) != jaxjpeg::Status::kOk) {
    return 0;
  }
  static jaxjpeg::DecoderTables tables;  // 19.5 KB: off the stack
  if (jaxjpeg::BuildDecoderTables(info.packed, &tables) != jaxjpeg::Status::kOk) std::abort();
  const int64_t samples = static_cast<int64_t>(info.width) * info.height;
  if (samples > kMaxSamples) return 0;
  std::vector<int64_t> starts(info.NumIntervals() + 1);
  if (jaxjpeg::IndexRestartIntervals(data, static_cast<int64_t>(size), info, starts.data()) !=
      jaxjpeg::Status::kOk) {
    return 0;
  }
  // The check restore makes of a recorded index (CheckRestartIndex) accepts
  // the index the scan found, and refuses it shifted by one byte.
  const int64_t count = info.NumIntervals() + 1;
  if (jaxjpeg::CheckRestartIndex(data, static_cast<int64_t>(size), info, starts.data(), count) !=
      jaxjpeg::Status::kOk) {
    std::abort();
  }
  std::vector<int64_t> shifted(starts);
  shifted[count - 1] += 1;
  if (jaxjpeg::CheckRestartIndex(data, static_cast<int64_t>(size), info, shifted.data(), count) ==
      jaxjpeg::Status::kOk) {
    std::abort();
  }
  std::vector<uint16_t> out(static_cast<size_t>(samples));
  if (info.bits == 12) {
    DecodeAll<12>(data, info, tables, starts.data(), out.data());
  } else {
    DecodeAll<8>(data, info, tables, starts.data(), out.data());
  }
  std::vector<float> weights(static_cast<size_t>(samples));
  DecodeAsPlan(data, static_cast<int64_t>(size), info, starts.data(), weights);
  return 0;
}
