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

// Where the encoder reads its samples: a tile of samples, or a tile of
// weights with each row's map to samples (EncodeMappedGrayscale).
struct SampleSource {
  const float* data;
  std::ptrdiff_t stride;
  int width;
  int height;
  const float* row_scale;   // null: data holds samples
  const float* row_offset;
};

Status ValidateArguments(const SampleSource& source, const EncodeOptions& options,
                         const std::vector<uint8_t>* out) {
  if (source.data == nullptr || out == nullptr) return Status::kBadArgument;
  if ((source.row_scale == nullptr) != (source.row_offset == nullptr)) {
    return Status::kBadArgument;
  }
  if (source.width < 1 || source.height < 1 || source.width > kMaxDimension ||
      source.height > kMaxDimension) {
    return Status::kBadSize;
  }
  if (source.stride < source.width) return Status::kBadArgument;
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

// The 8x8 block with top-left sample (x0, y0), clamped to [0, max_sample]
// (NaN compares false and becomes 0) and level-shifted by `center`; outside
// the image the last column/row is repeated. Weights are mapped to samples
// first, as mapping.to_samples does: (w - offset) / scale in float32, a
// scale <= 0 (a constant row) taken as 1.
void GatherCenteredBlock(const SampleSource& source, int x0, int y0, float max_sample,
                         float center, float block[64]) {
  const bool full_width = x0 + 8 <= source.width;
  for (int r = 0; r < 8; ++r) {
    const int y = y0 + r < source.height ? y0 + r : source.height - 1;
    const float* row = source.data + y * source.stride;
    float values[8];
    if (full_width) {
      std::memcpy(values, row + x0, sizeof(values));
    } else {
      for (int c = 0; c < 8; ++c) values[c] = row[x0 + c < source.width ? x0 + c : source.width - 1];
    }
    if (source.row_scale != nullptr) {
      const float offset = source.row_offset[y];
      const float divisor = source.row_scale[y] > 0.0f ? source.row_scale[y] : 1.0f;
      for (int c = 0; c < 8; ++c) values[c] = (values[c] - offset) / divisor;
    }
    for (int c = 0; c < 8; ++c) {
      float v = values[c] > 0.0f ? values[c] : 0.0f;
      v = v < max_sample ? v : max_sample;
      block[r * 8 + c] = v - center;
    }
  }
}

// Per-coefficient reciprocal step and the clamp that keeps magnitude
// categories within T.81's limits (F.1.2.1, F.1.2.2): DC differences need at
// most 11 bits (15 for 12-bit), AC values at most 10 (14).
struct Quantizer {
  float inverse_step[64];
  float lower[64];
  float upper[64];
};

Quantizer MakeQuantizer(const EncodeOptions& options) {
  const int dc_category = options.bits == 12 ? 15 : 11;
  const int ac_category = options.bits == 12 ? 14 : 10;
  Quantizer q;
  for (int i = 0; i < 64; ++i) {
    q.inverse_step[i] = static_cast<float>(1.0 / options.qtable[i]);
    q.upper[i] = static_cast<float>(i == 0 ? (1 << (dc_category - 1)) - 1 : (1 << ac_category) - 1);
    q.lower[i] = i == 0 ? static_cast<float>(-(1 << (dc_category - 1))) : -q.upper[i];
  }
  return q;
}

// Rounds half away from zero; written with truncation so it vectorizes
// without SSE4.1 rounding instructions and stays exact (x - trunc(x) is exact).
// Four values at a time in natural order; the results are then placed in
// zig-zag order.
void QuantizeToZigzag(const float coefficients[64], const Quantizer& q, int16_t zigzag[64],
                      float* scaled_zigzag) {
  typedef int32_t Int4 __attribute__((vector_size(16)));
  alignas(16) int32_t natural[64];
  alignas(16) float scaled[64];
  for (int i = 0; i < 64; i += 4) {
    Float4 x = LoadFloat4(coefficients + i) * LoadFloat4(q.inverse_step + i);
    const Float4 lower = LoadFloat4(q.lower + i), upper = LoadFloat4(q.upper + i);
    x = x > lower ? x : lower;
    x = x < upper ? x : upper;
    StoreFloat4(scaled + i, x);
    const Int4 truncated = __builtin_convertvector(x, Int4);
    const Float4 fraction = x - __builtin_convertvector(truncated, Float4);
    // Comparisons give -1 (true) or 0 per lane.
    const Int4 rounded = truncated - (fraction >= 0.5f) + (fraction <= -0.5f);
    std::memcpy(natural + i, &rounded, sizeof(rounded));
  }
  for (int k = 0; k < 64; ++k) zigzag[k] = static_cast<int16_t>(natural[ZigzagToNatural(k)]);
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

// MagnitudeCategory of a value known to be nonzero (no branch on zero).
inline int NonzeroCategory(int value) {
  const unsigned magnitude = static_cast<unsigned>(value < 0 ? -value : value);
  return 32 - __builtin_clz(magnitude);
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
// counting and writing share one definition of the symbol stream. nonzero:
// NonzeroAcMask(zigzag).
template <class Sink>
inline void CodeBlock(const int16_t zigzag[64], uint64_t nonzero, int dc_difference, Sink& sink) {
  const int dc_category = MagnitudeCategory(dc_difference);
  sink.Dc(dc_category, ExtraBits(dc_difference, dc_category), dc_category);
  int last = 0;
  while (nonzero != 0) {
    const int k = __builtin_ctzll(nonzero);
    nonzero &= nonzero - 1;
    int run = k - last - 1;
    for (; run >= 16; run -= 16) sink.Ac(kZeroRun16, 0, 0);
    const int value = zigzag[k];
    const int category = NonzeroCategory(value);
    sink.Ac(static_cast<uint8_t>((run << 4) | category), ExtraBits(value, category), category);
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

// Bit k set when AC value k (zig-zag) is an RDO candidate: plain rounding
// moved it up (away from zero) to a nonzero power of two.
inline uint64_t RdoCandidates(const int16_t zigzag[64], const float scaled[64]) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  const __m128i one = _mm_set1_epi16(1);
  const __m128 sign = _mm_set1_ps(-0.0f);
  uint64_t mask = 0;
  for (int i = 0; i < 8; ++i) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zigzag + 8 * i));
    const __m128i magnitude = _mm_max_epi16(v, _mm_sub_epi16(zero, v));
    const __m128i power_of_two =
        _mm_cmpeq_epi16(_mm_and_si128(magnitude, _mm_sub_epi16(magnitude, one)), zero);
    const __m128 low = _mm_cvtepi32_ps(_mm_unpacklo_epi16(magnitude, zero));
    const __m128 high = _mm_cvtepi32_ps(_mm_unpackhi_epi16(magnitude, zero));
    const __m128 a_low = _mm_andnot_ps(sign, _mm_loadu_ps(scaled + 8 * i));
    const __m128 a_high = _mm_andnot_ps(sign, _mm_loadu_ps(scaled + 8 * i + 4));
    const __m128i rounded_up = _mm_packs_epi32(_mm_castps_si128(_mm_cmpgt_ps(low, a_low)),
                                               _mm_castps_si128(_mm_cmpgt_ps(high, a_high)));
    const __m128i candidate = _mm_and_si128(power_of_two, rounded_up);
    const int bits = _mm_movemask_epi8(_mm_packs_epi16(candidate, zero)) & 0xFF;
    mask |= static_cast<uint64_t>(bits) << (8 * i);
  }
  return mask & ~uint64_t{1};
#else
  uint64_t mask = 0;
  for (int k = 1; k < 64; ++k) {
    const int v = zigzag[k] < 0 ? -zigzag[k] : zigzag[k];
    const float a = scaled[k] < 0 ? -scaled[k] : scaled[k];
    const bool power_of_two = (v & (v - 1)) == 0;  // v == 0 excluded below: a >= 0
    mask |= static_cast<uint64_t>(power_of_two && static_cast<float>(v) > a) << k;
  }
  return mask;
#endif
}

// Bits of the AC symbol(s) for `run` zeros then a value of `category`.
inline int CostOf(const uint8_t cost[256], int run, int category) {
  return (run >> 4) * cost[kZeroRun16] + cost[((run & 15) << 4) | category];
}

// Adds (sign 1) or removes (sign ~0: minus one, modulo 2^64) the AC symbols
// of `run` zeros then a value of `category` in a histogram.
inline void CountRun(uint64_t count[256], int run, int category, uint64_t sign) {
  count[kZeroRun16] += sign * static_cast<uint64_t>(run >> 4);
  count[((run & 15) << 4) | category] += sign;
}

// Requantizes the AC values of one block in place. scaled: coefficient/step
// (clamped, zig-zag), zigzag: its plain rounding on entry; nonzero: its
// NonzeroAcMask, kept up to date; candidates: RdoCandidates; cost: code
// length of each AC symbol (unused symbols: 16). ac_count (optional): the
// AC histogram the block was counted in, updated for every value changed.
void RdoQuantizeBlock(const float scaled[64], int16_t zigzag[64], uint64_t* nonzero_mask,
                      uint64_t candidates, const uint8_t cost[256], float lambda,
                      uint64_t* ac_count) {
  constexpr uint64_t kAdd = 1, kRemove = ~uint64_t{0};
  uint64_t nonzero = *nonzero_mask | 1;  // bit 0: runs start after DC
  while (candidates != 0) {
    const int k = __builtin_ctzll(candidates);
    candidates &= candidates - 1;
    const int hi = zigzag[k] < 0 ? -zigzag[k] : zigzag[k];
    const float a = scaled[k] < 0 ? -scaled[k] : scaled[k];
    const uint64_t below = nonzero & ((uint64_t{1} << k) - 1);
    const int run = k - (63 - __builtin_clzll(below)) - 1;
    const int category = NonzeroCategory(hi);
    uint64_t above = 0;
    int r2 = 0, next_category = 0;
    int delta;
    if (hi > 1) {
      delta = CostOf(cost, run, category) - CostOf(cost, run, category - 1) + 1;
    } else if (k < 63 && (above = nonzero >> (k + 1)) != 0) {
      const int next = k + 1 + __builtin_ctzll(above);
      next_category = NonzeroCategory(zigzag[next]);
      r2 = next - k - 1;
      delta = CostOf(cost, run, 1) + 1 + CostOf(cost, r2, next_category) -
              CostOf(cost, run + 1 + r2, next_category);
    } else {
      delta = CostOf(cost, run, 1) + 1 - (k == 63 ? cost[kEndOfBlock] : 0);
    }
    const float d = hi - a;  // rounding distance, in (0, 0.5]
    if (!((1.0f - d) * (1.0f - d) - d * d < lambda * delta)) continue;
    const int lo = hi - 1;
    zigzag[k] = static_cast<int16_t>(scaled[k] < 0 ? -lo : lo);
    if (lo == 0) nonzero &= ~(uint64_t{1} << k);
    if (ac_count == nullptr) continue;
    CountRun(ac_count, run, category, kRemove);
    if (lo > 0) {
      CountRun(ac_count, run, category - 1, kAdd);
    } else if (above != 0) {  // the next value's run absorbs this one's
      CountRun(ac_count, r2, next_category, kRemove);
      CountRun(ac_count, run + 1 + r2, next_category, kAdd);
    } else if (k == 63) {     // the block now ends before coefficient 63
      ++ac_count[kEndOfBlock];
    }
  }
  *nonzero_mask = nonzero & ~uint64_t{1};
}

// Pass 1 of the encoder: every block's quantized values (zig-zag order) and
// its masks, and the symbol statistics of plain rounding.
struct QuantizedBlocks {
  std::unique_ptr<int16_t[]> zigzag;    // 64 per block
  std::unique_ptr<float[]> scaled;      // 64 per block (RDO only): coefficient / step
  std::unique_ptr<uint64_t[]> nonzero;  // NonzeroAcMask of each block
  std::unique_ptr<uint64_t[]> candidates;  // RdoCandidates of each block (RDO only)
};

void ComputeCoefficients(const SampleSource& source, const EncodeOptions& options,
                         const BlockGrid& grid, QuantizedBlocks* blocks,
                         HistogramSink* histogram) {
  const DctBasis& basis = ForwardDctBasis();
  const Quantizer quantizer = MakeQuantizer(options);
  const float max_sample = static_cast<float>((1 << options.bits) - 1);
  const float center = static_cast<float>(1 << (options.bits - 1));
  alignas(32) float block[64];
  alignas(32) float coefficients[64];
  int previous_dc = 0;
  int64_t index = 0;
  for (int by = 0; by < grid.blocks_y; ++by) {
    for (int bx = 0; bx < grid.blocks_x; ++bx, ++index) {
      int16_t* out = blocks->zigzag.get() + index * 64;
      float* scaled = blocks->scaled ? blocks->scaled.get() + index * 64 : nullptr;
      GatherCenteredBlock(source, bx * 8, by * 8, max_sample, center, block);
      ForwardDct8x8(basis, block, coefficients);
      QuantizeToZigzag(coefficients, quantizer, out, scaled);
      const uint64_t nonzero = NonzeroAcMask(out);
      blocks->nonzero[index] = nonzero;
      if (scaled != nullptr) blocks->candidates[index] = RdoCandidates(out, scaled);
      if (histogram == nullptr) continue;
      if (StartsInterval(index, options.restart_interval)) previous_dc = 0;
      CodeBlock(out, nonzero, out[0] - previous_dc, *histogram);
      previous_dc = out[0];
    }
  }
}

// Pass 2: the entropy-coded segment, with RSTn markers between intervals;
// the offset where each interval's data starts is appended to `starts`.
void WriteEntropyCodedData(const QuantizedBlocks& blocks, int64_t block_count,
                           int restart_interval, WriterSink* sink, std::vector<int64_t>* starts) {
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
    const int16_t* block = blocks.zigzag.get() + index * 64;
    CodeBlock(block, blocks.nonzero[index], block[0] - previous_dc, *sink);
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

void Encode(const SampleSource& source, const EncodeOptions& options, std::vector<uint8_t>* out,
            std::vector<int64_t>* starts) {
  const BlockGrid grid = MakeBlockGrid(source.width, source.height);
  // Not value-initialized: pass 1 writes every element.
  QuantizedBlocks blocks;
  blocks.zigzag.reset(new int16_t[grid.count * 64]);
  blocks.nonzero.reset(new uint64_t[grid.count]);
  if (options.rdo) {
    blocks.scaled.reset(new float[grid.count * 64]);
    blocks.candidates.reset(new uint64_t[grid.count]);
  }
  // Pass 1 statistics: for the optimized tables, and for RDO quantization,
  // which always prices symbols with the optimal code lengths of plainly
  // rounded values, so the values coded do not depend on optimize_huffman.
  std::unique_ptr<HistogramSink> histogram;
  if (options.optimize_huffman || options.rdo) histogram.reset(new HistogramSink());
  ComputeCoefficients(source, options, grid, &blocks, histogram.get());
  if (options.rdo) {
    const HuffmanCodeTable ac_table = BuildCodeTable(BuildOptimalSpec(histogram->ac));
    uint8_t cost[256];
    for (int i = 0; i < 256; ++i) cost[i] = ac_table.length[i] ? ac_table.length[i] : 16;
    // RDO changes AC values only: the histogram follows each change (the DC
    // statistics stay as counted).
    uint64_t* ac_count = options.optimize_huffman ? histogram->ac.count : nullptr;
    for (int64_t index = 0; index < grid.count; ++index) {
      if (blocks.candidates[index] == 0) continue;
      RdoQuantizeBlock(blocks.scaled.get() + index * 64, blocks.zigzag.get() + index * 64,
                       &blocks.nonzero[index], blocks.candidates[index], cost, kRdoLambda,
                       ac_count);
    }
    blocks.scaled.reset();
    if (!options.optimize_huffman) histogram.reset();
  }

  const HuffmanSpec dc_spec =
      histogram ? BuildOptimalSpec(histogram->dc) : StandardLuminanceDcSpec();
  const HuffmanSpec ac_spec =
      histogram ? BuildOptimalSpec(histogram->ac) : StandardLuminanceAcSpec();

  PutMarker(out, marker::kSOI);
  PutQuantTable(out, options.qtable);
  PutFrameHeader(out, options.bits, source.width, source.height);
  PutHuffmanTables(out, dc_spec, ac_spec);
  if (options.restart_interval > 0) PutRestartInterval(out, options.restart_interval);
  PutScanHeader(out);

  BitWriter writer(out);
  WriterSink sink{&writer, BuildCodeTable(dc_spec), BuildCodeTable(ac_spec)};
  WriteEntropyCodedData(blocks, grid.count, options.restart_interval, &sink, starts);
  starts->push_back(static_cast<int64_t>(out->size()));  // the EOI marker
  PutMarker(out, marker::kEOI);
}

Status EncodeSource(const SampleSource& source, const EncodeOptions& options,
                    std::vector<uint8_t>* out, std::vector<int64_t>* interval_starts) {
  const Status status = ValidateArguments(source, options, out);
  if (status != Status::kOk) return status;
  const size_t original_size = out->size();
  std::vector<int64_t> starts;
  try {
    Encode(source, options, out, &starts);
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

}  // namespace

Status EncodeGrayscale(const float* samples, int width, int height, std::ptrdiff_t stride,
                       const EncodeOptions& options, std::vector<uint8_t>* out,
                       std::vector<int64_t>* interval_starts) {
  return EncodeSource({samples, stride, width, height, nullptr, nullptr}, options, out,
                      interval_starts);
}

Status EncodeMappedGrayscale(const float* weights, int width, int height, std::ptrdiff_t stride,
                             const float* row_scale, const float* row_offset,
                             const EncodeOptions& options, std::vector<uint8_t>* out,
                             std::vector<int64_t>* interval_starts) {
  if (row_scale == nullptr || row_offset == nullptr) return Status::kBadArgument;
  return EncodeSource({weights, stride, width, height, row_scale, row_offset}, options, out,
                      interval_starts);
}

}  // namespace jaxjpeg
