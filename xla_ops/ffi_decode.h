// The XLA FFI signature of the decode custom call, shared by the CPU and CUDA
// handlers so both targets take exactly the same operands and results.
#ifndef JAXJPEG_FFI_DECODE_H_
#define JAXJPEG_FFI_DECODE_H_

#include <cstdint>
#include <string>
#include <utility>

#include "decode_plan.h"
#include "xla/ffi/api/ffi.h"

namespace jaxjpeg {
namespace ffi = xla::ffi;

// Adds the decode call's operands and results to a binding that already has
// its platform context (thread pool or stream).
template <typename Binding>
auto BindDecodeOperands(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::U8>>()   // payload: concatenated tile JPEG files
      .template Arg<ffi::Buffer<ffi::S32>>()  // interval starts: int64 [n + 1] as int32 pairs
      .template Arg<ffi::Buffer<ffi::S32>>()  // tile table: int64 [tiles, kTileColumns] as int32 pairs
      .template Arg<ffi::Buffer<ffi::U8>>()   // PackedTables structs, back to back
      .template Arg<ffi::Buffer<ffi::F32>>()  // per-row scale of the affine output map
      .template Arg<ffi::Buffer<ffi::F32>>()  // per-row offset of the affine output map
      .template Arg<ffi::Buffer<ffi::F32>>()  // per-column scales, applied after the row map
      .template Arg<ffi::Buffer<ffi::S32>>()  // placement offsets: int64 as int32 pairs (kTilePositions0)
      .template Arg<ffi::Buffer<ffi::S32>>()  // block map: [blocks, kBlockMapColumns] (CUDA hint)
      .template Ret<ffi::Buffer<ffi::S32>>()  // status: kPlanOk or packed (interval, code)
      .template Ret<ffi::Buffer<ffi::U8>>()   // workspace: one PlanOutput per decoded tensor
      .RemainingRets();                       // the decoded tensors (f32 / bf16 / f16)
}

// int64 tables travel as int32 pairs so that jax needs no x64 mode.
inline const int64_t* AsInt64(const ffi::Buffer<ffi::S32>& b) {
  return reinterpret_cast<const int64_t*>(b.typed_data());
}

inline bool ToOutputType(ffi::DataType t, OutputType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = OutputType::kFloat32; return true;
    case ffi::DataType::BF16: *out = OutputType::kBFloat16; return true;
    case ffi::DataType::F16: *out = OutputType::kFloat16; return true;
    default: return false;
  }
}

// Fills the host-side parts of a plan from the operands and checks their
// sizes; output descriptors are filled by the caller.
inline ffi::Error PlanFromOperands(const ffi::Buffer<ffi::U8>& payload,
                                   const ffi::Buffer<ffi::S32>& starts,
                                   const ffi::Buffer<ffi::S32>& tiles,
                                   const ffi::Buffer<ffi::U8>& tables,
                                   const ffi::Buffer<ffi::F32>& row_scale,
                                   const ffi::Buffer<ffi::F32>& row_offset,
                                   const ffi::Buffer<ffi::F32>& col_scale,
                                   const ffi::Buffer<ffi::S32>& positions,
                                   const ffi::Buffer<ffi::S32>& block_map, DecodePlan* plan) {
  if (starts.element_count() < 2 || starts.element_count() % 2 != 0) {
    return ffi::Error::InvalidArgument("interval starts must hold n + 1 int64 values, n >= 0");
  }
  if (tiles.element_count() % (2 * kTileColumns) != 0) {
    return ffi::Error::InvalidArgument("tile table must be [tiles, " +
                                       std::to_string(kTileColumns) + "] int64");
  }
  if (tables.element_count() % sizeof(PackedTables) != 0) {
    return ffi::Error::InvalidArgument("table blob is not a whole number of PackedTables");
  }
  if (positions.element_count() % 2 != 0) {
    return ffi::Error::InvalidArgument("placement offsets must be int64 (int32 pairs)");
  }
  if (row_scale.element_count() != row_offset.element_count()) {
    return ffi::Error::InvalidArgument("row scale and offset differ in length");
  }
  plan->payload = payload.typed_data();
  plan->payload_size = static_cast<int64_t>(payload.element_count());
  plan->interval_starts = AsInt64(starts);
  plan->num_intervals = static_cast<int64_t>(starts.element_count() / 2) - 1;
  plan->tiles = AsInt64(tiles);
  plan->num_tiles = static_cast<int64_t>(tiles.element_count() / (2 * kTileColumns));
  plan->tables = reinterpret_cast<const PackedTables*>(tables.typed_data());
  plan->num_tables = static_cast<int64_t>(tables.element_count() / sizeof(PackedTables));
  plan->row_scale = row_scale.typed_data();
  plan->row_offset = row_offset.typed_data();
  plan->num_affine_rows = static_cast<int64_t>(row_scale.element_count());
  plan->col_scale = col_scale.typed_data();
  plan->num_col_scales = static_cast<int64_t>(col_scale.element_count());
  plan->positions = AsInt64(positions);
  plan->num_positions = static_cast<int64_t>(positions.element_count() / 2);
  plan->block_map = block_map.typed_data();
  plan->num_map_blocks = static_cast<int64_t>(block_map.element_count() / kBlockMapColumns);
  if (const char* error = PlanShapeError(*plan)) {
    return ffi::Error::InvalidArgument(std::string("decode plan refused: ") + error);
  }
  return ffi::Error::Success();
}

// Checks the status word and that the workspace holds one PlanOutput per
// decoded tensor.
inline ffi::Error CheckResults(ffi::ResultBuffer<ffi::S32>& status,
                               ffi::ResultBuffer<ffi::U8>& workspace, size_t num_outputs) {
  if (status->element_count() != 1) return ffi::Error::InvalidArgument("status must be int32[1]");
  if (workspace->element_count() < num_outputs * sizeof(PlanOutput)) {
    return ffi::Error::InvalidArgument("workspace too small for outputs");
  }
  return ffi::Error::Success();
}

// Describes variadic result i (a decoded tensor) for the executors.
inline ffi::Error DescribeOutput(ffi::RemainingRets& rets, size_t i, PlanOutput* out) {
  auto ret = rets.get<ffi::AnyBuffer>(i);
  if (ret.has_error()) return ret.error();
  ffi::AnyBuffer buffer = **ret;
  OutputType type;
  if (!ToOutputType(buffer.element_type(), &type)) {
    return ffi::Error::InvalidArgument("decoded tensors must be float32, bfloat16 or float16");
  }
  *out = PlanOutput{buffer.untyped_data(), static_cast<int64_t>(buffer.element_count()), type};
  return ffi::Error::Success();
}

inline std::string PlanFailure(int32_t status) {
  if ((status & 15) == static_cast<int32_t>(Status::kUncovered)) {
    return "decode plan refused: its tiles do not write every element of decoded tensor " +
           std::to_string(status >> 4) + " exactly once";
  }
  return "jaxjpeg decode failed in restart interval " + std::to_string(status >> 4) + ": " +
         StatusMessage(static_cast<Status>(status & 15));
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_FFI_DECODE_H_
