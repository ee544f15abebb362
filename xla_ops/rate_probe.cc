#include "rate_probe.h"

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

template <int kBits, typename Sink>
Status DecodeError(const std::vector<uint8_t>& data, const std::vector<int64_t>& starts,
                   const Sink& sink) {
  StreamInfo info;
  Status s = ParseStreamHeader(data.data(), static_cast<int64_t>(data.size()), &info);
  if (s != Status::kOk) return s;
  if (static_cast<int64_t>(starts.size()) != info.NumIntervals() + 1) return Status::kBadArgument;
  return DecodeIntoSink<kBits>(data.data(), info, starts.data(), sink);
}

}  // namespace

Status MeasureSteps(const float* weights, int width, int height, std::ptrdiff_t stride,
                    const float* row_scale, const float* row_offset, const float* col_weight,
                    int bits, int restart_interval, const uint16_t* steps, int num_steps,
                    StepCost* costs) {
  if (num_steps < 0 || (num_steps > 0 && (steps == nullptr || costs == nullptr))) {
    return Status::kBadArgument;
  }
  std::vector<uint8_t> data;
  std::vector<int64_t> starts;
  for (int i = 0; i < num_steps; ++i) {
    EncodeOptions options;
    options.bits = bits;
    options.restart_interval = restart_interval;
    for (uint16_t& q : options.qtable) q = steps[i];
    data.clear();
    Status s = EncodeMappedGrayscale(weights, width, height, stride, row_scale, row_offset,
                                     options, &data, &starts);
    if (s != Status::kOk) return s;
    double error = 0.0;
    if (col_weight != nullptr) {
      const SquaredErrorSink<true> sink{weights, stride, row_scale, row_offset, col_weight, &error};
      s = bits == 12 ? DecodeError<12>(data, starts, sink) : DecodeError<8>(data, starts, sink);
    } else {
      const SquaredErrorSink<false> sink{weights, stride, row_scale, row_offset, nullptr, &error};
      s = bits == 12 ? DecodeError<12>(data, starts, sink) : DecodeError<8>(data, starts, sink);
    }
    if (s != Status::kOk) return s;
    const int64_t entropy = starts.back() - starts.front();
    costs[i] = {entropy, static_cast<int64_t>(data.size()) - entropy, error};
  }
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
