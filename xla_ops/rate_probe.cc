#include "rate_probe.h"

#include <exception>
#include <vector>

#include "encoder.h"
#include "output_stage.h"
#include "stream_header.h"

namespace jaxjpeg {
namespace {

// Receives decoded rows and sums their squared error against the weights,
// each value mapped as the decoder's float32 output stage maps it; kWeighted:
// each difference times col_weight(y, x). Two partial sums per row: one
// running sum would make every row a chain of dependent additions.
template <bool kWeighted>
struct SquaredErrorSink {
  const float* weights;
  std::ptrdiff_t stride;
  const float* row_scale;
  const float* row_offset;
  const float* col_weight;  // kWeighted only
  double* total;

  void PutRow(int y, int x0, const int32_t* samples, int count) const {
    const float scale = row_scale[y], offset = row_offset[y];
    const float* w = weights + y * stride + x0;
    double sum[2] = {0.0, 0.0};
    for (int i = 0; i < count; ++i) {
      double d = static_cast<double>(AffineSample(samples[i], scale, offset)) -
                 static_cast<double>(w[i]);
      if (kWeighted) d *= static_cast<double>(col_weight[y * stride + x0 + i]);
      sum[i & 1] += d * d;
    }
    *total += sum[0] + sum[1];
  }
};

// Receives decoded rows and sums (w - decoded)² against a strided tile,
// decoded values as the float32 output stage writes them (kColumns: times
// the column scales), kKept: positions kept in the side list skipped.
template <bool kKept, bool kColumns>
struct TileErrorSink {
  StridedTile<float> weights;
  const StridedTile<uint8_t>* kept;  // kKept only
  const float* row_scale;
  const float* row_offset;
  const float* col_scale;  // kColumns only
  double* total;

  void PutRow(int y, int x0, const int32_t* samples, int count) const {
    const float scale = row_scale[y], offset = row_offset[y];
    const float* w = &weights.at(y, x0);
    double sum[2] = {0.0, 0.0};
    for (int i = 0; i < count; ++i) {
      if (kKept && kept->at(y, x0 + i) != 0) continue;
      float v = AffineSample(samples[i], scale, offset);
      if (kColumns) v = ScaleColumn(v, col_scale[x0 + i]);
      const double d = static_cast<double>(w[i * weights.col_step]) - static_cast<double>(v);
      sum[i & 1] += d * d;
    }
    *total += sum[0] + sum[1];
  }
};

// Decodes every restart interval of a coded tile into `sink`.
template <int kBits, typename Sink>
Status DecodeIntoSink(const uint8_t* data, const StreamInfo& info, const int64_t* starts,
                      const Sink& sink) {
  const int64_t per = info.restart_interval ? info.restart_interval : info.NumBlocks();
  for (int64_t i = 0; i < info.NumIntervals(); ++i) {
    const int64_t first = i * per;
    const int64_t n = per < info.NumBlocks() - first ? per : info.NumBlocks() - first;
    const Status s = DecodeInterval<kBits>(data + starts[i], data + starts[i + 1], info.tables,
                                           info.Grid(), first, n, sink);
    if (s != Status::kOk) return s;
  }
  return Status::kOk;
}

// What decoding a tile whose blocks hold `coefficients` (quantized, zig-zag
// order, 64 a block in raster order: EncodeMappedGrayscaleWithCoefficients)
// under the table `quant` (natural order) gives `sink`: each block dequantized as the
// decoder stores it, its islow IDCT (a constant block: its one sample), then
// its rows: the same values and the same calls, in the same order, as
// DecodeInterval over the file, without reading its Huffman codes back.
template <int kBits, typename Sink>
JJ_INLINE void PutCodedBlocks(const int16_t* coefficients, int width, int height,
                              const int32_t* quant, const Sink& sink) {
  int32_t coef[64], ws[64], samples[64];
  const BlockScratch<1, true> scratch{coef, ws, samples, ZigzagTable()};
  const int blocks_wide = (width + 7) / 8, blocks_high = (height + 7) / 8;
  for (int by = 0; by < blocks_high; ++by) {
    for (int bx = 0; bx < blocks_wide; ++bx) {
      const int16_t* block = coefficients + 64 * (static_cast<int64_t>(by) * blocks_wide + bx);
      int ac = 0;  // nonzero when any AC value is (a loop the compiler vectorizes)
      for (int k = 1; k < 64; ++k) ac |= block[k];
      const bool dc_only = ac == 0;
      for (int k = 0; k < 64; ++k) {
        const int n = scratch.zigzag[k];
        coef[n] = static_cast<int32_t>(static_cast<uint32_t>(block[k]) *
                                       static_cast<uint32_t>(quant[n]));
      }
      int32_t dc_sample = 0;
      if (dc_only) {
        dc_sample = DcOnlySample<kBits>(coef[0]);
      } else {
        IdctColumns<kBits, 1, false>(coef, quant, ws);
        IdctRows<kBits, 1>(ws, samples);
      }
      const int y0 = 8 * by, x0 = 8 * bx;
      detail::PutBlock(sink, scratch, dc_only, dc_sample, y0, x0, height - y0 < 8 ? height - y0 : 8,
                       width - x0 < 8 ? width - x0 : 8);
    }
  }
}

#if defined(JAXJPEG_AVX2_DISPATCH)
template <int kBits, typename Sink>
__attribute__((target("avx2,bmi2"), noinline)) void PutCodedBlocksAvx2(
    const int16_t* coefficients, int width, int height, const int32_t* quant, const Sink& sink) {
  PutCodedBlocks<kBits>(coefficients, width, height, quant, sink);
}
#endif

// PutCodedBlocks with the IDCT's 32-bit multiplies as AVX2 instructions
// where the CPU has them (as the decoder dispatches: the same bits).
template <int kBits, typename Sink>
void SumCodedError(const int16_t* coefficients, int width, int height, const int32_t* quant,
                   const Sink& sink) {
#if defined(JAXJPEG_AVX2_DISPATCH)
  if (detail::HostHasAvx2()) {
    PutCodedBlocksAvx2<kBits>(coefficients, width, height, quant, sink);
    return;
  }
#endif
  PutCodedBlocks<kBits>(coefficients, width, height, quant, sink);
}

// A coding's table as the decoder holds it: 32-bit steps, natural order.
void DecoderQuant(const EncodeOptions& options, int32_t quant[64]) {
  for (int n = 0; n < 64; ++n) quant[n] = options.qtable[n];
}

}  // namespace

Status MeasureSteps(const float* weights, int width, int height, std::ptrdiff_t stride,
                    const float* row_scale, const float* row_offset, const float* col_weight,
                    int bits, int restart_interval, bool rdo, const uint16_t* steps,
                    int num_steps, StepCost* costs) {
  if (num_steps < 0 || (num_steps > 0 && (steps == nullptr || costs == nullptr))) {
    return Status::kBadArgument;
  }
  std::vector<uint8_t> data;
  std::vector<int64_t> starts;
  std::vector<int16_t> coefficients;
  // The blocks' transforms do not depend on the step: the first coding
  // computes and keeps them, the others quantize them as they are.
  std::vector<float> transforms;
  TransformCache cache;
  if (num_steps > 1) {
    try {
      transforms.resize(64 * static_cast<size_t>((width + 7) / 8) * ((height + 7) / 8));
    } catch (const std::exception&) {
      return Status::kBadArgument;
    }
    cache.data = transforms.data();
  }
  for (int i = 0; i < num_steps; ++i) {
    cache.fill = i == 0;
    EncodeOptions options;
    options.bits = bits;
    options.restart_interval = restart_interval;
    options.rdo = rdo;
    for (uint16_t& q : options.qtable) q = steps[i];
    data.clear();
    const Status s = EncodeMappedGrayscaleWithCoefficients(
        weights, width, height, stride, row_scale, row_offset, options, &data, &starts,
        &coefficients, /*transposed=*/false, cache.data != nullptr ? &cache : nullptr);
    if (s != Status::kOk) return s;
    if (coefficients.size() != 64 * static_cast<size_t>((width + 7) / 8) * ((height + 7) / 8)) {
      return Status::kBadArgument;  // never expected: one block of values per block
    }
    double error = 0.0;
    int32_t quant[64];
    DecoderQuant(options, quant);
    const auto sum = [&](const auto& sink) {
      if (bits == 12) {
        SumCodedError<12>(coefficients.data(), width, height, quant, sink);
      } else {
        SumCodedError<8>(coefficients.data(), width, height, quant, sink);
      }
    };
    if (col_weight != nullptr) {
      sum(SquaredErrorSink<true>{weights, stride, row_scale, row_offset, col_weight, &error});
    } else {
      sum(SquaredErrorSink<false>{weights, stride, row_scale, row_offset, nullptr, &error});
    }
    const int64_t entropy = starts.back() - starts.front();
    costs[i] = {entropy, static_cast<int64_t>(data.size()) - entropy, error};
  }
  return Status::kOk;
}

Status EncodeTileWithError(const float* weights, int width, int height, std::ptrdiff_t stride,
                           bool transposed, const float* row_scale, const float* row_offset,
                           const EncodeOptions& options, StridedTile<float> original,
                           const StridedTile<uint8_t>* kept, const float* col_scale,
                           std::vector<uint8_t>* out, std::vector<int64_t>* interval_starts,
                           double* squared_error) {
  if (original.data == nullptr || squared_error == nullptr) return Status::kBadArgument;
  std::vector<int16_t> coefficients;
  const size_t size = out->size();
  Status s = EncodeMappedGrayscaleWithCoefficients(weights, width, height, stride, row_scale,
                                                   row_offset, options, out, interval_starts,
                                                   &coefficients, transposed);
  if (s != Status::kOk) return s;
  if (coefficients.size() != 64 * static_cast<size_t>((width + 7) / 8) * ((height + 7) / 8)) {
    out->resize(size);
    return Status::kBadArgument;  // never expected: one block of values per block
  }
  int32_t quant[64];
  DecoderQuant(options, quant);
  double total = 0.0;
  const auto sum = [&](const auto& sink) {
    if (options.bits == 12) {
      SumCodedError<12>(coefficients.data(), width, height, quant, sink);
    } else {
      SumCodedError<8>(coefficients.data(), width, height, quant, sink);
    }
  };
  // The sinks TileSquaredError decodes the file into: the same sums.
  if (kept != nullptr && col_scale != nullptr) {
    sum(TileErrorSink<true, true>{original, kept, row_scale, row_offset, col_scale, &total});
  } else if (kept != nullptr) {
    sum(TileErrorSink<true, false>{original, kept, row_scale, row_offset, nullptr, &total});
  } else if (col_scale != nullptr) {
    sum(TileErrorSink<false, true>{original, nullptr, row_scale, row_offset, col_scale, &total});
  } else {
    sum(TileErrorSink<false, false>{original, nullptr, row_scale, row_offset, nullptr, &total});
  }
  *squared_error = total;
  return Status::kOk;
}

Status TileSquaredError(const uint8_t* data, int64_t size, StridedTile<float> weights,
                        const StridedTile<uint8_t>* kept, int width, int height,
                        const float* row_scale, const float* row_offset, const float* col_scale,
                        double* squared_error) {
  if (data == nullptr || weights.data == nullptr || row_scale == nullptr ||
      row_offset == nullptr || squared_error == nullptr) {
    return Status::kBadArgument;
  }
  StreamInfo info;
  Status s = ParseStreamHeader(data, size, &info);
  if (s != Status::kOk) return s;
  if (info.width != width || info.height != height) return Status::kBadSize;
  std::vector<int64_t> starts(static_cast<size_t>(info.NumIntervals() + 1));
  s = IndexRestartIntervals(data, size, info, starts.data());
  if (s != Status::kOk) return s;
  double total = 0.0;
  const auto decode = [&](const auto& sink) {
    return info.bits == 12 ? DecodeIntoSink<12>(data, info, starts.data(), sink)
                           : DecodeIntoSink<8>(data, info, starts.data(), sink);
  };
  if (kept != nullptr && col_scale != nullptr) {
    s = decode(TileErrorSink<true, true>{weights, kept, row_scale, row_offset, col_scale, &total});
  } else if (kept != nullptr) {
    s = decode(TileErrorSink<true, false>{weights, kept, row_scale, row_offset, nullptr, &total});
  } else if (col_scale != nullptr) {
    s = decode(TileErrorSink<false, true>{weights, nullptr, row_scale, row_offset, col_scale, &total});
  } else {
    s = decode(TileErrorSink<false, false>{weights, nullptr, row_scale, row_offset, nullptr, &total});
  }
  if (s != Status::kOk) return s;
  *squared_error = total;
  return Status::kOk;
}

}  // namespace jaxjpeg
