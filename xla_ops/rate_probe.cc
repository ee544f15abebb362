#include "rate_probe.h"

#include <vector>

#include "encoder.h"
#include "output_stage.h"
#include "stream_header.h"

namespace jaxjpeg {
namespace {

// Receives decoded rows and sums their squared error against the weights,
// each value mapped as the decoder's float32 output stage maps it.
struct SquaredErrorSink {
  const float* weights;
  std::ptrdiff_t stride;
  const float* row_scale;
  const float* row_offset;
  const float* col_weight;  // null: 1
  double* total;

  void PutRow(int y, int x0, const int32_t* samples, int count) const {
    const float* w = weights + y * stride + x0;
    const float* c = col_weight == nullptr ? nullptr : col_weight + y * stride + x0;
    double sum = 0.0;
    for (int i = 0; i < count; ++i) {
      double d = static_cast<double>(AffineSample(samples[i], row_scale[y], row_offset[y])) -
                 static_cast<double>(w[i]);
      if (c != nullptr) d *= static_cast<double>(c[i]);
      sum += d * d;
    }
    *total += sum;
  }
};

template <int kBits>
Status DecodeError(const std::vector<uint8_t>& data, const std::vector<int64_t>& starts,
                   const SquaredErrorSink& sink) {
  StreamInfo info;
  Status s = ParseStreamHeader(data.data(), static_cast<int64_t>(data.size()), &info);
  if (s != Status::kOk) return s;
  if (static_cast<int64_t>(starts.size()) != info.NumIntervals() + 1) return Status::kBadArgument;
  const int64_t per = info.restart_interval ? info.restart_interval : info.NumBlocks();
  for (int64_t i = 0; i < info.NumIntervals(); ++i) {
    const int64_t first = i * per;
    const int64_t n = per < info.NumBlocks() - first ? per : info.NumBlocks() - first;
    s = DecodeInterval<kBits>(data.data() + starts[i], data.data() + starts[i + 1], info.tables,
                              info.Grid(), first, n, sink);
    if (s != Status::kOk) return s;
  }
  return Status::kOk;
}

}  // namespace

Status MeasureSteps(const float* weights, int width, int height, std::ptrdiff_t stride,
                    const float* row_scale, const float* row_offset, const float* col_weight,
                    int bits, int restart_interval, const uint16_t* steps, int num_steps,
                    StepCost* costs) {
  if (steps == nullptr || costs == nullptr || num_steps < 0) return Status::kBadArgument;
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
    const SquaredErrorSink sink{weights, stride, row_scale, row_offset, col_weight, &error};
    s = bits == 12 ? DecodeError<12>(data, starts, sink) : DecodeError<8>(data, starts, sink);
    if (s != Status::kOk) return s;
    const int64_t entropy = starts.back() - starts.front();
    costs[i] = {entropy, static_cast<int64_t>(data.size()) - entropy, error};
  }
  return Status::kOk;
}

}  // namespace jaxjpeg
