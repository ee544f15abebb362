#include "rate_probe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "encoder.h"
#include "forward_dct.h"
#include "output_stage.h"
#include "stream_header.h"

namespace jaxjpeg {
namespace {

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

// A float32 value as the decoder writes it in `type`, back in double.
double WrittenValue(float v, OutputType type) {
  if (type == OutputType::kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(FloatToBFloat16(v)) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  if (type == OutputType::kFloat16) {
    const uint16_t h = FloatToHalf(v);
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exponent == 0x1f) return mantissa ? std::nan("") : sign * HUGE_VAL;
    if (exponent == 0) return sign * std::ldexp(mantissa, -24);
    return sign * std::ldexp(mantissa + 1024, exponent - 25);
  }
  return v;
}

// Each row's RowSum values of the decoded samples (rate_probe.h).
template <bool kKept>
struct RowSumsSink {
  StridedTile<float> values;
  const float* row_scale;
  const float* row_offset;
  double middle;                      // the middle sample, 2^(bits - 1)
  OutputType written;
  const StridedTile<uint8_t>* kept;   // kKept only
  double* sums;                       // kRowSums a row

  void PutRow(int y, int x0, const int32_t* samples, int count) const {
    double* row = sums + kRowSums * static_cast<std::ptrdiff_t>(y);
    const float scale = row_scale[y], offset = row_offset[y];
    const double center = RowSumsCenter(scale, offset, middle);
    for (int i = 0; i < count; ++i) {
      if (kKept && kept->at(y, x0 + i) != 0) continue;
      const float v = values.at(y, x0 + i);
      const double w = v - center;
      const double d = v - WrittenValue(AffineSample(samples[i], scale, offset), written);
      row[kCount] += 1.0;
      row[kSumW] += w;
      row[kSumWW] += w * w;
      row[kSumError] += d * d;
    }
  }
};

// Two sinks fed the same rows.
template <typename First, typename Second>
struct BothSinks {
  First first;
  Second second;
  void PutRow(int y, int x0, const int32_t* samples, int count) const {
    first.PutRow(y, x0, samples, count);
    second.PutRow(y, x0, samples, count);
  }
};

// A sink that takes nothing.
struct NoSink {
  void PutRow(int, int, const int32_t*, int) const {}
};

// Decodes every restart interval of a coded tile into `sink`.
template <int kBits, typename Sink>
Status DecodeIntoSink(const uint8_t* data, const StreamInfo& info, const DecoderTables& tables,
                      const int64_t* starts, const Sink& sink) {
  const int64_t per = info.restart_interval ? info.restart_interval : info.NumBlocks();
  for (int64_t i = 0; i < info.NumIntervals(); ++i) {
    const int64_t first = i * per;
    const int64_t n = per < info.NumBlocks() - first ? per : info.NumBlocks() - first;
    const Status s = DecodeInterval<kBits>(data + starts[i], data + starts[i + 1], tables,
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
// bands (optional, one per row of blocks): only the rows of blocks set.
template <int kBits, typename Sink>
JJ_INLINE void PutCodedBlocks(const int16_t* coefficients, int width, int height,
                              const int32_t* quant, const Sink& sink,
                              const uint8_t* bands = nullptr) {
  int32_t coef[64], ws[64], samples[64];
  const BlockScratch<1, true> scratch{coef, ws, samples, ZigzagTable()};
  const int blocks_wide = (width + 7) / 8, blocks_high = (height + 7) / 8;
  for (int by = 0; by < blocks_high; ++by) {
    if (bands != nullptr && bands[by] == 0) continue;
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
    const int16_t* coefficients, int width, int height, const int32_t* quant, const Sink& sink,
    const uint8_t* bands) {
  PutCodedBlocks<kBits>(coefficients, width, height, quant, sink, bands);
}
#endif

// PutCodedBlocks with the IDCT's 32-bit multiplies as AVX2 instructions
// where the CPU has them (as the decoder dispatches: the same bits).
template <int kBits, typename Sink>
void SumCodedError(const int16_t* coefficients, int width, int height, const int32_t* quant,
                   const Sink& sink, const uint8_t* bands = nullptr) {
#if defined(JAXJPEG_AVX2_DISPATCH)
  if (detail::HostHasAvx2()) {
    PutCodedBlocksAvx2<kBits>(coefficients, width, height, quant, sink, bands);
    return;
  }
#endif
  PutCodedBlocks<kBits>(coefficients, width, height, quant, sink, bands);
}

// A coding's table as the decoder holds it: 32-bit steps, natural order.
void DecoderQuant(const EncodeOptions& options, int32_t quant[64]) {
  for (int n = 0; n < 64; ++n) quant[n] = options.qtable[n];
}

// How MeasureSteps sums a coding's squared error: from each block's error in
// the transform domain, (step * coded value - transform), instead of
// decoding the block. Each pixel's error is weighted as the output stage
// scales it, (row_scale[y] * col_weight(y, x))², pixels past the tile's edge
// (padding) by 0. A block whose pixels weigh alike takes the sum of its
// squared transform-domain errors (the orthonormal DCT keeps it: Parseval);
// any other is carried to its pixels by a float inverse DCT. The decoder's
// rounding of each sample to an integer adds noise of variance 1/12 (sample
// units), independent of the coding's, except in a block coded as all
// zeros (it decodes to the middle sample exactly); samples the encoder
// clamped to its range add what the clamp moved them, and a block near
// either end of the range is summed pixel by pixel with the decoder's clamp
// (it took 14% off the error of a PP-OCRv6 detector leaf whose
// non-negative weights sit at sample 0). Against decoding
// every block as the decoder does (islow fixed point, clamping) the sum is
// within 1% at 1 to 9 bits/weight on Gaussian, Laplacian, uniform,
// outlier-column and row-weighted tiles, within 8% at the ladder's ends
// (tests/test_rate.py), and a probe step took 24-31% less time (measured
// before the clamp path).
class CodedErrorModel {
 public:
  // Pixel weights and clamps (the arguments as MeasureSteps takes them);
  // may throw std::bad_alloc.
  CodedErrorModel(const float* weights, int width, int height, std::ptrdiff_t stride,
                  const float* row_scale, const float* row_offset, const float* col_weight,
                  int bits)
      : blocks_((static_cast<size_t>(width) + 7) / 8 * ((static_cast<size_t>(height) + 7) / 8)),
        lowest_(-static_cast<float>(1 << (bits - 1))),
        highest_(static_cast<float>((1 << bits) - 1) + lowest_),
        pixel_weights_(64 * blocks_, 0.0f),
        rounding_(blocks_, 0.0),
        uniform_(blocks_, 0) {
    const int blocks_wide = (width + 7) / 8;
    const float top = static_cast<float>((1 << bits) - 1);
    // The scales enter as scale * 2^shift_, and the sums leave times
    // 2^-2shift_ (ErrorOf): powers of two change no bit of the sums where
    // nothing underflows, and keep them where the squared scales of a leaf
    // of tiny values would (RMS 1e-20: steps ~1e-22, squares ~1e-44 in
    // float: a byte target then spent its bytes elsewhere).
    float largest = 0.0f;
    for (int y = 0; y < height; ++y) largest = std::max(largest, std::fabs(row_scale[y]));
    if (largest > 0.0f && std::isfinite(largest)) {
      int exponent;
      std::frexp(largest, &exponent);
      shift_ = -exponent;
    }
    for (int y = 0; y < height; ++y) {
      const float scaled = std::ldexp(row_scale[y], shift_);
      const float row = scaled * scaled;
      const float divisor = row_scale[y] > 0.0f ? row_scale[y] : 1.0f;  // as the encoder maps
      for (int x = 0; x < width; ++x) {
        float w = row;
        if (col_weight != nullptr) {
          const float c = col_weight[y * stride + x];
          w *= c * c;
        }
        const size_t block = static_cast<size_t>(y / 8) * blocks_wide + x / 8;
        pixel_weights_[64 * block + 8 * (y % 8) + x % 8] = w;
        rounding_[block] += w / 12.0;
        const float sample = (weights[y * stride + x] - row_offset[y]) / divisor;
        const float moved = sample < 0.0f ? -sample : sample > top ? sample - top : 0.0f;
        clamped_ += static_cast<double>(w) * moved * moved;
      }
    }
    for (size_t b = 0; b < blocks_; ++b) {
      const float* w = pixel_weights_.data() + 64 * b;
      bool alike = true;
      for (int i = 1; i < 64; ++i) alike &= w[i] == w[0];
      uniform_[b] = alike;
    }
  }

  // Keeps the blocks' transforms (TransformCache's, transposed order) in
  // zig-zag order, as the coded values are, and the (centered) samples they
  // transform, with each block's lowest and highest; may throw
  // std::bad_alloc.
  void SetTransforms(const std::vector<float>& transposed) {
    transforms_.resize(transposed.size());
    samples_.resize(transposed.size());
    low_.resize(blocks_);
    high_.resize(blocks_);
    for (size_t b = 0; b < blocks_; ++b) {
      float* t = transforms_.data() + 64 * b;
      for (int k = 0; k < 64; ++k) t[k] = transposed[64 * b + kZigzagToTransposed.index[k]];
      float* s = samples_.data() + 64 * b;
      InverseDct(t, s);
      low_[b] = high_[b] = s[0];
      for (int i = 1; i < 64; ++i) {
        low_[b] = s[i] < low_[b] ? s[i] : low_[b];
        high_[b] = s[i] > high_[b] ? s[i] : high_[b];
      }
    }
  }

  // The weighted squared error of a coding at flat step `step`, `coded`
  // holding its values (zig-zag, 64 a block).
  double Error(const int16_t* coded, float step) const {
    return std::ldexp(ScaledError(coded, step), -2 * shift_);
  }

 private:
  // Error's sum with the scales times 2^shift_.
  double ScaledError(const int16_t* coded, float step) const {
    double total = clamped_;
    for (size_t b = 0; b < blocks_; ++b) {
      const float* t = transforms_.data() + 64 * b;
      const int16_t* c = coded + 64 * b;
      const float* w = pixel_weights_.data() + 64 * b;
      alignas(32) float error[64];  // zig-zag order
      int nonzero = 0;
      for (int k = 0; k < 64; ++k) {
        error[k] = step * static_cast<float>(c[k]) - t[k];
        nonzero |= c[k];
      }
      float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight lanes: the loop vectorizes
      for (int k = 0; k < 64; ++k) sum[k & 7] += error[k] * error[k];
      float squares = 0.0f;
      for (float v : sum) squares += v;
      // Decoded samples past the range are clamped (less error, and no
      // rounding): a block within four RMS errors of either end is summed
      // pixel by pixel.
      const float reach = 4.0f * std::sqrt(squares / 64.0f);
      if (low_[b] - reach < lowest_ || high_[b] + reach > highest_) {
        total += ClampedPixelError(error, samples_.data() + 64 * b, w, lowest_, highest_,
                                   nonzero != 0);
        continue;
      }
      if (nonzero != 0) total += rounding_[b];
      if (uniform_[b]) {
        total += static_cast<double>(squares) * w[0];
      } else {
        total += PixelError(error, w);
      }
    }
    return total;
  }

  // Row-major pixels of the inverse DCT of zig-zag transform values
  // (pixels = Bᵀ E B, B the orthonormal basis).
  static void InverseDct(const float zigzag[64], float pixels[64]) {
    const DctBasis& basis = ForwardDctBasis();
    alignas(32) float e[8][8];  // [vertical frequency][horizontal frequency]
    for (int k = 0; k < 64; ++k) {
      const int n = kZigzagHost[k];
      e[n / 8][n % 8] = zigzag[k];
    }
    alignas(32) float rows[8][8] = {};  // [y][horizontal frequency]: Bᵀ E
    for (int y = 0; y < 8; ++y) {
      for (int v = 0; v < 8; ++v) {
        const float b = basis.basis[v][y];
        for (int u = 0; u < 8; ++u) rows[y][u] += b * e[v][u];
      }
    }
    for (int y = 0; y < 8; ++y) {
      float* out = pixels + 8 * y;
      for (int x = 0; x < 8; ++x) out[x] = 0.0f;
      for (int u = 0; u < 8; ++u) {
        const float r = rows[y][u];
        for (int x = 0; x < 8; ++x) out[x] += r * basis.basis[u][x];
      }
    }
  }

  // Σ w * e² over a block's pixels, e its transform-domain error carried
  // to the pixels.
  static double PixelError(const float zigzag_error[64], const float* weights) {
    alignas(32) float e[64];
    InverseDct(zigzag_error, e);
    float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < 64; ++i) sum[i & 7] += weights[i] * e[i] * e[i];
    double total = 0.0;
    for (float v : sum) total += v;
    return total;
  }

  // PixelError with each decoded sample (sample + e) clamped to [low, high]
  // as the decoder clamps it; `rounded`: the rounding noise of the samples
  // inside the range.
  static double ClampedPixelError(const float zigzag_error[64], const float* samples,
                                  const float* weights, float low, float high, bool rounded) {
    alignas(32) float e[64];
    InverseDct(zigzag_error, e);
    double total = 0.0;
    for (int i = 0; i < 64; ++i) {
      const float decoded = samples[i] + e[i];
      const bool inside = low < decoded && decoded < high;
      const float d = (decoded < low ? low : decoded > high ? high : decoded) - samples[i];
      total += static_cast<double>(weights[i]) * (d * d + (rounded && inside ? 1.0 / 12 : 0.0));
    }
    return total;
  }

  size_t blocks_;
  int shift_ = 0;           // the scales' power-of-two factor (see the constructor)
  float lowest_, highest_;  // the sample range, centered as the transforms are
  std::vector<float> pixel_weights_;  // 64 a block, row-major within the block
  std::vector<double> rounding_;      // the decoder's rounding noise in each block
  std::vector<uint8_t> uniform_;      // the block's pixels weigh alike
  std::vector<float> transforms_;
  std::vector<float> samples_;    // centered, 64 a block, row-major within it
  std::vector<float> low_, high_;  // each block's lowest and highest sample
  double clamped_ = 0.0;  // Σ w * (clamped - unclamped sample)²
};

}  // namespace

Status MeasureSteps(const float* weights, int width, int height, std::ptrdiff_t stride,
                    const float* row_scale, const float* row_offset, const float* col_weight,
                    int bits, int restart_interval, bool rdo, const uint16_t* steps,
                    int num_steps, StepCost* costs) {
  if (num_steps < 0 || (num_steps > 0 && (steps == nullptr || costs == nullptr))) {
    return Status::kBadArgument;
  }
  if (num_steps == 0) return Status::kOk;
  std::vector<uint8_t> data;
  std::vector<int64_t> starts;
  std::vector<int16_t> coefficients;
  // The blocks' transforms do not depend on the step: the first coding
  // computes and keeps them, the others quantize them as they are.
  const size_t blocks = static_cast<size_t>((width + 7) / 8) * ((height + 7) / 8);
  std::vector<float> transforms;
  std::optional<CodedErrorModel> model;
  try {
    transforms.resize(64 * blocks);
    model.emplace(weights, width, height, stride, row_scale, row_offset, col_weight, bits);
  } catch (const std::exception&) {
    return Status::kBadArgument;
  }
  TransformCache cache;
  cache.data = transforms.data();
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
        &coefficients, /*transposed=*/false, &cache);
    if (s != Status::kOk) return s;
    if (coefficients.size() != 64 * blocks) {
      return Status::kBadArgument;  // never expected: one block of values per block
    }
    if (i == 0) {
      try {
        model->SetTransforms(transforms);
      } catch (const std::exception&) {
        return Status::kBadArgument;
      }
    }
    const double error = model->Error(coefficients.data(), steps[i]);
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
                           double* squared_error, const RowSums* row_sums) {
  if ((squared_error == nullptr && row_sums == nullptr) ||
      (squared_error != nullptr && original.data == nullptr) ||
      (row_sums != nullptr && (row_sums->sums == nullptr || row_sums->values.data == nullptr ||
                               row_sums->row_scale == nullptr || row_sums->row_offset == nullptr))) {
    return Status::kBadArgument;
  }
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
  if (row_sums != nullptr) {
    std::fill(row_sums->sums, row_sums->sums + kRowSums * static_cast<size_t>(height), 0.0);
  }
  const double middle = static_cast<double>(1 << (options.bits - 1));
  double total = 0.0;
  const auto sum = [&](const auto& errors) {
    // every block for an error; for the row sums alone, the bands asked for
    const uint8_t* only =
        squared_error == nullptr && row_sums != nullptr ? row_sums->bands : nullptr;
    const auto with_sums = [&](const auto& sink) {
      if (options.bits == 12) {
        SumCodedError<12>(coefficients.data(), width, height, quant, sink, only);
      } else {
        SumCodedError<8>(coefficients.data(), width, height, quant, sink, only);
      }
    };
    using Errors = std::decay_t<decltype(errors)>;
    if (row_sums == nullptr) {
      with_sums(errors);
    } else if (kept != nullptr) {
      with_sums(BothSinks<Errors, RowSumsSink<true>>{
          errors, {row_sums->values, row_sums->row_scale, row_sums->row_offset, middle,
                   row_sums->written, kept, row_sums->sums}});
    } else {
      with_sums(BothSinks<Errors, RowSumsSink<false>>{
          errors, {row_sums->values, row_sums->row_scale, row_sums->row_offset, middle,
                   row_sums->written, nullptr, row_sums->sums}});
    }
  };
  // The sinks TileSquaredError decodes the file into: the same sums.
  if (squared_error == nullptr) {
    sum(NoSink{});
  } else if (kept != nullptr && col_scale != nullptr) {
    sum(TileErrorSink<true, true>{original, kept, row_scale, row_offset, col_scale, &total});
  } else if (kept != nullptr) {
    sum(TileErrorSink<true, false>{original, kept, row_scale, row_offset, nullptr, &total});
  } else if (col_scale != nullptr) {
    sum(TileErrorSink<false, true>{original, nullptr, row_scale, row_offset, col_scale, &total});
  } else {
    sum(TileErrorSink<false, false>{original, nullptr, row_scale, row_offset, nullptr, &total});
  }
  if (squared_error != nullptr) *squared_error = total;
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
  auto tables = std::make_unique<DecoderTables>();
  s = BuildDecoderTables(info.packed, tables.get());
  if (s != Status::kOk) return s;
  double total = 0.0;
  const auto decode = [&](const auto& sink) {
    return info.bits == 12 ? DecodeIntoSink<12>(data, info, *tables, starts.data(), sink)
                           : DecodeIntoSink<8>(data, info, *tables, starts.data(), sink);
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
