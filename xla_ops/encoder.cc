#include "encoder.h"

#include <cstring>
#include <exception>
#include <memory>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "forward_dct.h"
#include "huffman_encode.h"

namespace jaxjpeg {
namespace {

// Worst case for one coded block: DC (16+15 bits), 63 AC (16+14 bits each),
// ZRLs and EOB stay under 250 bytes; every byte may be stuffed.
constexpr size_t kMaxCodedBlockBytes = 512;

// ---------------------------------------------------------------------------
// Arguments

Status ValidateArguments(const float* samples, int width, int height, std::ptrdiff_t stride,
                         const EncodeOptions& options, const std::vector<uint8_t>* out) {
  if (samples == nullptr || out == nullptr) return Status::kBadArgument;
  if (width < 1 || height < 1 || width > kMaxDimension || height > kMaxDimension) {
    return Status::kBadSize;
  }
  if (stride < width) return Status::kBadArgument;
  if (options.bits != 8 && options.bits != 12) return Status::kBadArgument;
  if (options.restart_interval < 0 || options.restart_interval > 65535) return Status::kBadArgument;
  const int max_step = options.bits == 8 ? 255 : 65535;
  for (uint16_t step : options.qtable) {
    if (step < 1 || step > max_step) return Status::kBadQuantTable;
  }
  if (!options.optimize_huffman && options.bits != 8) return Status::kUnsupported;
  return Status::kOk;
}

// ---------------------------------------------------------------------------
// Samples -> quantized coefficients

struct BlockGrid {
  int blocks_x;
  int blocks_y;
  int64_t count;
};

BlockGrid MakeBlockGrid(int width, int height) {
  const int bx = (width + 7) / 8;
  const int by = (height + 7) / 8;
  return {bx, by, static_cast<int64_t>(bx) * by};
}

// Copies the 8x8 block with top-left sample (x0, y0); outside the image the
// last column/row is repeated.
void GatherBlock(const float* samples, std::ptrdiff_t stride, int width, int height, int x0, int y0,
                 float block[64]) {
  const bool full_width = x0 + 8 <= width;
  for (int r = 0; r < 8; ++r) {
    const int y = y0 + r < height ? y0 + r : height - 1;
    const float* row = samples + y * stride;
    if (full_width) {
      std::memcpy(block + r * 8, row + x0, 8 * sizeof(float));
    } else {
      for (int c = 0; c < 8; ++c) block[r * 8 + c] = row[x0 + c < width ? x0 + c : width - 1];
    }
  }
}

// Clamps to [0, max_sample] and level-shifts to a signed range around zero.
// NaN compares false, so it takes the 0 branch.
void CenterBlock(const float block[64], float max_sample, double center, double centered[64]) {
  for (int i = 0; i < 64; ++i) {
    float v = block[i] > 0.0f ? block[i] : 0.0f;
    v = v < max_sample ? v : max_sample;
    centered[i] = static_cast<double>(v) - center;
  }
}

// Per-coefficient step and the clamp that keeps magnitude categories within
// T.81's limits (F.1.2.1, F.1.2.2): DC differences need at most 11 bits
// (15 for 12-bit), AC values at most 10 (14).
struct Quantizer {
  double step[64];
  double lower[64];
  double upper[64];
};

Quantizer MakeQuantizer(const EncodeOptions& options) {
  const int dc_category = options.bits == 12 ? 15 : 11;
  const int ac_category = options.bits == 12 ? 14 : 10;
  Quantizer q;
  for (int i = 0; i < 64; ++i) {
    q.step[i] = options.qtable[i];
    q.upper[i] = i == 0 ? (1 << (dc_category - 1)) - 1 : (1 << ac_category) - 1;
    q.lower[i] = i == 0 ? -(1 << (dc_category - 1)) : -q.upper[i];
  }
  return q;
}

// Rounds half away from zero; written with truncation so it vectorizes
// without SSE4.1 rounding instructions and stays exact (x - trunc(x) is exact).
void QuantizeToZigzag(const double coefficients[64], const Quantizer& q, int16_t zigzag[64],
                      float* scaled_zigzag) {
  int16_t natural[64];
  float scaled[64];
  for (int i = 0; i < 64; ++i) {
    double x = coefficients[i] / q.step[i];
    x = x > q.lower[i] ? x : q.lower[i];
    x = x < q.upper[i] ? x : q.upper[i];
    scaled[i] = static_cast<float>(x);
    int rounded = static_cast<int>(x);
    const double fraction = x - rounded;
    rounded += (fraction >= 0.5) - (fraction <= -0.5);
    natural[i] = static_cast<int16_t>(rounded);
  }
  for (int k = 0; k < 64; ++k) zigzag[k] = natural[ZigzagToNatural(k)];
  if (scaled_zigzag != nullptr) {
    for (int k = 0; k < 64; ++k) scaled_zigzag[k] = scaled[ZigzagToNatural(k)];
  }
}

// ---------------------------------------------------------------------------
// Coefficients -> symbols (T.81 F.1.2)

inline int MagnitudeCategory(int value) {
  const int magnitude = value < 0 ? -value : value;
  return magnitude == 0 ? 0 : 32 - __builtin_clz(static_cast<unsigned>(magnitude));
}

// The `category` low bits that follow a symbol: the value itself when
// positive, value - 1 (two's complement, truncated) when negative.
inline uint32_t ExtraBits(int value, int category) {
  return static_cast<uint32_t>(value + (value >> 31)) & ((1u << category) - 1);
}

// Bit k set when AC coefficient k (zig-zag index, 1..63) is nonzero.
inline uint64_t NonzeroAcMask(const int16_t zigzag[64]) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  uint64_t zero_mask = 0;
  for (int i = 0; i < 4; ++i) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zigzag + 16 * i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zigzag + 16 * i + 8));
    const __m128i is_zero = _mm_packs_epi16(_mm_cmpeq_epi16(a, zero), _mm_cmpeq_epi16(b, zero));
    zero_mask |= static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(is_zero))) << (16 * i);
  }
  return ~zero_mask & ~uint64_t{1};
#else
  uint64_t mask = 0;
  for (int k = 1; k < 64; ++k) mask |= static_cast<uint64_t>(zigzag[k] != 0) << k;
  return mask;
#endif
}

constexpr uint8_t kEndOfBlock = 0x00;
constexpr uint8_t kZeroRun16 = 0xF0;

// Emits the symbols of one block to `sink` (a histogram or a bit writer), so
// counting and writing share one definition of the symbol stream.
template <class Sink>
inline void CodeBlock(const int16_t zigzag[64], int dc_difference, Sink& sink) {
  const int dc_category = MagnitudeCategory(dc_difference);
  sink.Dc(dc_category, ExtraBits(dc_difference, dc_category), dc_category);
  uint64_t nonzero = NonzeroAcMask(zigzag);
  int last = 0;
  while (nonzero != 0) {
    const int k = __builtin_ctzll(nonzero);
    nonzero &= nonzero - 1;
    int run = k - last - 1;
    for (; run >= 16; run -= 16) sink.Ac(kZeroRun16, 0, 0);
    const int category = MagnitudeCategory(zigzag[k]);
    sink.Ac(static_cast<uint8_t>((run << 4) | category), ExtraBits(zigzag[k], category), category);
    last = k;
  }
  if (last != 63) sink.Ac(kEndOfBlock, 0, 0);
}

struct HistogramSink {
  SymbolHistogram dc;
  SymbolHistogram ac;
  void Dc(int symbol, uint32_t, int) { ++dc.count[symbol]; }
  void Ac(int symbol, uint32_t, int) { ++ac.count[symbol]; }
};

struct WriterSink {
  BitWriter* writer;
  HuffmanCodeTable dc;
  HuffmanCodeTable ac;
  void Dc(int symbol, uint32_t bits, int count) { Put(dc, symbol, bits, count); }
  void Ac(int symbol, uint32_t bits, int count) { Put(ac, symbol, bits, count); }
  void Put(const HuffmanCodeTable& table, int symbol, uint32_t bits, int count) {
    writer->Put((static_cast<uint32_t>(table.code[symbol]) << count) | bits,
                table.length[symbol] + count);
  }
};

// DC prediction restarts at zero with every restart interval (T.81 F.1.1.5.1).
inline bool StartsInterval(int64_t block, int restart_interval) {
  return restart_interval > 0 && block % restart_interval == 0;
}

// Pass 1: forward DCT and quantization of every block into `zigzag`
// (64 int16 per block, zig-zag order); coefficient/step into `scaled` (64
// floats per block, zig-zag order) when not null; symbol statistics when
// `histogram`.
void ComputeCoefficients(const float* samples, int width, int height, std::ptrdiff_t stride,
                         const EncodeOptions& options, const BlockGrid& grid, int16_t* zigzag,
                         float* scaled, HistogramSink* histogram) {
  const DctBasis& basis = ForwardDctBasis();
  const Quantizer quantizer = MakeQuantizer(options);
  const float max_sample = static_cast<float>((1 << options.bits) - 1);
  const double center = static_cast<double>(1 << (options.bits - 1));
  float block[64];
  double centered[64];
  double coefficients[64];
  int previous_dc = 0;
  int64_t index = 0;
  for (int by = 0; by < grid.blocks_y; ++by) {
    for (int bx = 0; bx < grid.blocks_x; ++bx, ++index) {
      int16_t* out = zigzag + index * 64;
      GatherBlock(samples, stride, width, height, bx * 8, by * 8, block);
      CenterBlock(block, max_sample, center, centered);
      ForwardDct8x8(basis, centered, coefficients);
      QuantizeToZigzag(coefficients, quantizer, out, scaled ? scaled + index * 64 : nullptr);
      if (histogram == nullptr) continue;
      if (StartsInterval(index, options.restart_interval)) previous_dc = 0;
      CodeBlock(out, out[0] - previous_dc, *histogram);
      previous_dc = out[0];
    }
  }
}

// ---------------------------------------------------------------------------
// Rate-distortion optimized quantization (EncodeOptions::rdo)
//
// The decoder reconstructs v * step whatever the encoder does, so the encoder
// is free to pick v. Within a magnitude category every value costs the same
// bits; one category up costs the extra magnitude bit plus the difference of
// the two (run, size) code lengths. So only a value that plain rounding moved
// UP to a power of two (1, 2, 4, ...) can be worth lowering by one: it is
// lowered when the squared error it adds, (1 - d)^2 - d^2 step^2 with d the
// rounding distance, is below lambda step^2 times the bits saved. Going from
// 1 to 0 also lengthens the next nonzero value's run, which is counted (the
// block's later values are taken as plain rounding left them). DC is left
// alone (coded differentially, 1/64 of the values).
//
// lambda = ln 2 / 6 ~ 0.1155 is the slope -dD/dR of uniform quantization at
// high rate (D = step^2 / 12, dD/dR = -2 ln 2 D), in step^2 per bit; 0.10 to
// 0.14 measured alike on Gaussian and Laplacian weights.
constexpr float kRdoLambda = 0.12f;

// Bits of the AC symbol(s) for `run` zeros then a value of `category`.
inline int CostOf(const uint8_t cost[256], int run, int category) {
  return (run >> 4) * cost[kZeroRun16] + cost[((run & 15) << 4) | category];
}

// Requantizes the AC values of one block in place. scaled: coefficient/step
// (clamped, zig-zag), zigzag: its plain rounding on entry; cost: code length
// of each AC symbol (unused symbols: 16).
void RdoQuantizeBlock(const float scaled[64], int16_t zigzag[64], const uint8_t cost[256],
                      float lambda) {
  uint64_t candidates = 0;
  for (int k = 1; k < 64; ++k) {
    const int v = zigzag[k] < 0 ? -zigzag[k] : zigzag[k];
    const float a = scaled[k] < 0 ? -scaled[k] : scaled[k];
    const bool power_of_two = (v & (v - 1)) == 0;  // v == 0 excluded below: a >= 0
    candidates |= static_cast<uint64_t>(power_of_two && static_cast<float>(v) > a) << k;
  }
  if (candidates == 0) return;
  uint64_t nonzero = NonzeroAcMask(zigzag) | 1;  // bit 0: runs start after DC
  while (candidates != 0) {
    const int k = __builtin_ctzll(candidates);
    candidates &= candidates - 1;
    const int hi = zigzag[k] < 0 ? -zigzag[k] : zigzag[k];
    const float a = scaled[k] < 0 ? -scaled[k] : scaled[k];
    const uint64_t below = nonzero & ((uint64_t{1} << k) - 1);
    const int run = k - (63 - __builtin_clzll(below)) - 1;
    const int category = MagnitudeCategory(hi);
    int delta;
    if (hi > 1) {
      delta = CostOf(cost, run, category) - CostOf(cost, run, category - 1) + 1;
    } else {
      const uint64_t above = k == 63 ? 0 : nonzero >> (k + 1);
      if (above != 0) {
        const int next = k + 1 + __builtin_ctzll(above);
        const int next_category = MagnitudeCategory(zigzag[next]);
        const int r2 = next - k - 1;
        delta = CostOf(cost, run, 1) + 1 + CostOf(cost, r2, next_category) -
                CostOf(cost, run + 1 + r2, next_category);
      } else {
        delta = CostOf(cost, run, 1) + 1 - (k == 63 ? cost[kEndOfBlock] : 0);
      }
    }
    const float d = hi - a;  // rounding distance, in (0, 0.5]
    if ((1.0f - d) * (1.0f - d) - d * d < lambda * delta) {
      const int lo = hi - 1;
      zigzag[k] = static_cast<int16_t>(scaled[k] < 0 ? -lo : lo);
      if (lo == 0) nonzero &= ~(uint64_t{1} << k);
    }
  }
}

// Pass 2: the entropy-coded segment, with RSTn markers between intervals;
// the offset where each interval's data starts is appended to `starts`.
void WriteEntropyCodedData(const int16_t* zigzag, int64_t block_count, int restart_interval,
                           WriterSink* sink, std::vector<int64_t>* starts) {
  BitWriter& writer = *sink->writer;
  int previous_dc = 0;
  int marker_index = 0;
  starts->push_back(static_cast<int64_t>(writer.Position()));
  for (int64_t index = 0; index < block_count; ++index) {
    if (index > 0 && StartsInterval(index, restart_interval)) {
      writer.FlushWithPadding();
      writer.PutMarker(static_cast<uint8_t>(marker::kRST0 + marker_index));
      marker_index = (marker_index + 1) & 7;
      starts->push_back(static_cast<int64_t>(writer.Position()));
    }
    if (StartsInterval(index, restart_interval)) previous_dc = 0;
    writer.Reserve(kMaxCodedBlockBytes);
    const int16_t* block = zigzag + index * 64;
    CodeBlock(block, block[0] - previous_dc, *sink);
    previous_dc = block[0];
  }
  writer.FlushWithPadding();
  writer.Finish();
}

// ---------------------------------------------------------------------------
// Marker segments

void PutByte(std::vector<uint8_t>* out, int value) { out->push_back(static_cast<uint8_t>(value)); }

void PutWord(std::vector<uint8_t>* out, int value) {
  PutByte(out, value >> 8);
  PutByte(out, value & 0xFF);
}

void PutMarker(std::vector<uint8_t>* out, uint8_t code) {
  PutByte(out, 0xFF);
  PutByte(out, code);
}

// 8-bit entries whenever they fit; 16-bit (Pq = 1, 12-bit only) otherwise.
void PutQuantTable(std::vector<uint8_t>* out, const uint16_t qtable[64]) {
  bool wide = false;
  for (int i = 0; i < 64; ++i) wide = wide || qtable[i] > 255;
  PutMarker(out, marker::kDQT);
  PutWord(out, 2 + 1 + 64 * (wide ? 2 : 1));
  PutByte(out, wide ? 0x10 : 0x00);  // Pq, Tq = 0
  for (int k = 0; k < 64; ++k) {
    const int step = qtable[ZigzagToNatural(k)];
    if (wide) PutByte(out, step >> 8);
    PutByte(out, step & 0xFF);
  }
}

void PutFrameHeader(std::vector<uint8_t>* out, int bits, int width, int height) {
  PutMarker(out, bits == 8 ? marker::kSOF0 : marker::kSOF1);
  PutWord(out, 8 + 3);
  PutByte(out, bits);
  PutWord(out, height);
  PutWord(out, width);
  PutByte(out, 1);     // one component
  PutByte(out, 1);     // component id
  PutByte(out, 0x11);  // 1x1 sampling
  PutByte(out, 0);     // quantization table 0
}

void PutHuffmanTable(std::vector<uint8_t>* out, int table_class, const HuffmanSpec& spec) {
  PutByte(out, table_class << 4);  // Tc, Th = 0
  for (int length = 1; length <= kMaxHuffmanCodeLength; ++length) PutByte(out, spec.counts[length]);
  for (int i = 0; i < spec.num_symbols; ++i) PutByte(out, spec.symbols[i]);
}

void PutHuffmanTables(std::vector<uint8_t>* out, const HuffmanSpec& dc, const HuffmanSpec& ac) {
  PutMarker(out, marker::kDHT);
  PutWord(out, 2 + (1 + 16 + dc.num_symbols) + (1 + 16 + ac.num_symbols));
  PutHuffmanTable(out, 0, dc);
  PutHuffmanTable(out, 1, ac);
}

void PutRestartInterval(std::vector<uint8_t>* out, int restart_interval) {
  PutMarker(out, marker::kDRI);
  PutWord(out, 4);
  PutWord(out, restart_interval);
}

void PutScanHeader(std::vector<uint8_t>* out) {
  PutMarker(out, marker::kSOS);
  PutWord(out, 6 + 2);
  PutByte(out, 1);     // one component
  PutByte(out, 1);     // component id
  PutByte(out, 0x00);  // DC table 0, AC table 0
  PutByte(out, 0);     // Ss
  PutByte(out, 63);    // Se
  PutByte(out, 0);     // Ah, Al
}

// ---------------------------------------------------------------------------

void Encode(const float* samples, int width, int height, std::ptrdiff_t stride,
            const EncodeOptions& options, std::vector<uint8_t>* out,
            std::vector<int64_t>* starts) {
  const BlockGrid grid = MakeBlockGrid(width, height);
  // Not value-initialized: pass 1 writes every element.
  std::unique_ptr<int16_t[]> zigzag(new int16_t[grid.count * 64]);
  // Pass 1 statistics: for the optimized tables, and for RDO quantization,
  // which always prices symbols with the optimal code lengths of plainly
  // rounded values, so the values coded do not depend on optimize_huffman.
  std::unique_ptr<HistogramSink> histogram;
  if (options.optimize_huffman || options.rdo) histogram.reset(new HistogramSink());
  std::unique_ptr<float[]> scaled;
  if (options.rdo) scaled.reset(new float[grid.count * 64]);
  ComputeCoefficients(samples, width, height, stride, options, grid, zigzag.get(), scaled.get(),
                      histogram.get());
  if (options.rdo) {
    const HuffmanCodeTable ac_table = BuildCodeTable(BuildOptimalSpec(histogram->ac));
    uint8_t cost[256];
    for (int i = 0; i < 256; ++i) cost[i] = ac_table.length[i] ? ac_table.length[i] : 16;
    if (options.optimize_huffman) {
      *histogram = HistogramSink();
    } else {
      histogram.reset();
    }
    int previous_dc = 0;
    for (int64_t index = 0; index < grid.count; ++index) {
      int16_t* block = zigzag.get() + index * 64;
      RdoQuantizeBlock(scaled.get() + index * 64, block, cost, kRdoLambda);
      if (histogram == nullptr) continue;
      if (StartsInterval(index, options.restart_interval)) previous_dc = 0;
      CodeBlock(block, block[0] - previous_dc, *histogram);
      previous_dc = block[0];
    }
    scaled.reset();
  }

  const HuffmanSpec dc_spec =
      histogram ? BuildOptimalSpec(histogram->dc) : StandardLuminanceDcSpec();
  const HuffmanSpec ac_spec =
      histogram ? BuildOptimalSpec(histogram->ac) : StandardLuminanceAcSpec();

  PutMarker(out, marker::kSOI);
  PutQuantTable(out, options.qtable);
  PutFrameHeader(out, options.bits, width, height);
  PutHuffmanTables(out, dc_spec, ac_spec);
  if (options.restart_interval > 0) PutRestartInterval(out, options.restart_interval);
  PutScanHeader(out);

  BitWriter writer(out);
  WriterSink sink{&writer, BuildCodeTable(dc_spec), BuildCodeTable(ac_spec)};
  WriteEntropyCodedData(zigzag.get(), grid.count, options.restart_interval, &sink, starts);
  starts->push_back(static_cast<int64_t>(out->size()));  // the EOI marker
  PutMarker(out, marker::kEOI);
}

}  // namespace

Status EncodeGrayscale(const float* samples, int width, int height, std::ptrdiff_t stride,
                       const EncodeOptions& options, std::vector<uint8_t>* out,
                       std::vector<int64_t>* interval_starts) {
  const Status status = ValidateArguments(samples, width, height, stride, options, out);
  if (status != Status::kOk) return status;
  const size_t original_size = out->size();
  std::vector<int64_t> starts;
  try {
    Encode(samples, width, height, stride, options, out, &starts);
  } catch (const std::exception&) {  // std::bad_alloc, std::length_error
    out->resize(original_size);
    return Status::kBadArgument;
  }
  if (interval_starts != nullptr) {
    for (int64_t& s : starts) s -= static_cast<int64_t>(original_size);  // relative to the file
    interval_starts->swap(starts);
  }
  return Status::kOk;
}

}  // namespace jaxjpeg
