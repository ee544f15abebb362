#include "encoder.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // AVX2 code, compiled with target attributes
#endif

#include "cpu_features.h"
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
// weights with each row's map to samples (EncodeMappedGrayscale), stored
// row by row (value (y, x) at data[y * stride + x]) or, transposed, column by
// column (at data[x * stride + y]: a transposed view of a C-order matrix).
struct SampleSource {
  const float* data;
  std::ptrdiff_t stride;
  int width;
  int height;
  const float* row_scale;   // null: data holds samples
  const float* row_offset;
  bool transposed = false;
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
  if (source.stride < (source.transposed ? source.height : source.width)) {
    return Status::kBadArgument;
  }
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

// Four weights mapped to samples as mapping.to_samples does, (w - offset) /
// divisor in float32 (one lane at a time would round the same), clamped to
// [0, top] (NaN compares false and becomes 0), then level-shifted by middle.
JJ_INLINE Float4 CenteredSamples(Float4 v, Float4 offset, Float4 divisor, Float4 top,
                              Float4 middle, bool mapped) {
  const Float4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
  if (mapped) v = (v - offset) / divisor;
  v = v > zero ? v : zero;
  v = v < top ? v : top;
  return v - middle;
}

// A row's map: its offset and divisor (a scale <= 0, a constant row, taken
// as 1).
JJ_INLINE void RowMap(const SampleSource& source, int y, float* offset, float* divisor) {
  *offset = source.row_offset[y];
  *divisor = source.row_scale[y] > 0.0f ? source.row_scale[y] : 1.0f;
}

// Whether line r of the block whose top row is y0 is a constant row (scale
// <= 0): the decoder restores it as its offset whatever its samples, which
// are then the middle sample (centered 0), as the rows around it average.
// Sample 0, where (w - offset) put them, was a step of half the range in
// every block beside them, coded at many bits (found by review: a Dense
// kernel's dead outputs as rows cost 8% more than as columns).
JJ_INLINE bool ConstantLine(const SampleSource& source, int y0, int r) {
  if (source.row_scale == nullptr) return false;
  const int y = y0 + r < source.height ? y0 + r : source.height - 1;
  return !(source.row_scale[y] > 0.0f);
}

// Eight values of a line from ``start``; from ``limit`` on, the last one
// repeats (a block past the image edge).
JJ_INLINE void LoadEdgeClamped(const float* line, int start, int limit, float values[8]) {
  if (start + 8 <= limit) {
    std::memcpy(values, line + start, 8 * sizeof(float));
    return;
  }
  for (int i = 0; i < 8; ++i) values[i] = line[start + i < limit ? start + i : limit - 1];
}

// The 8x8 block with top-left sample (x0, y0), centered samples (as
// CenteredSamples) in row-major order; outside the image the last column/row
// is repeated.
JJ_INLINE void GatherCenteredBlock(const SampleSource& source, int x0, int y0, float max_sample,
                         float center, float block[64]) {
  const Float4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
  const Float4 top = zero + max_sample, middle = zero + center;
  const bool mapped = source.row_scale != nullptr;
  if (!source.transposed) {
    for (int r = 0; r < 8; ++r) {
      const int y = y0 + r < source.height ? y0 + r : source.height - 1;
      alignas(16) float values[8];
      LoadEdgeClamped(source.data + y * source.stride, x0, source.width, values);
      float offset = 0.0f, divisor = 1.0f;
      if (mapped) RowMap(source, y, &offset, &divisor);
      for (int half = 0; half < 8; half += 4) {
        StoreFloat4(block + r * 8 + half, ConstantLine(source, y0, r)
                                              ? zero
                                              : CenteredSamples(LoadFloat4(values + half),
                                                                zero + offset, zero + divisor,
                                                                top, middle, mapped));
      }
    }
    return;
  }
  // Transposed: each of the block's columns is 8 contiguous values, mapped
  // lane by lane with its rows' maps, then the block is transposed.
  alignas(16) float offsets[8] = {}, divisors[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  if (mapped) {
    for (int r = 0; r < 8; ++r) {
      RowMap(source, y0 + r < source.height ? y0 + r : source.height - 1, offsets + r, divisors + r);
    }
  }
  // The columns of the block two to the right: each is a line of its own in
  // memory (a stride apart: out of reach of the hardware's prefetchers), so
  // they are fetched ahead, while this block is coded.
  for (int x = x0 + 16; x < x0 + 24 && x < source.width; ++x) {
    __builtin_prefetch(source.data + x * source.stride + y0);
  }
  Float4 half[2][8];  // half[h][c]: rows 4h..4h+3 of column c
  for (int c = 0; c < 8; ++c) {
    const int x = x0 + c < source.width ? x0 + c : source.width - 1;
    alignas(16) float values[8];
    LoadEdgeClamped(source.data + x * source.stride, y0, source.height, values);
    for (int h = 0; h < 2; ++h) {
      half[h][c] = CenteredSamples(LoadFloat4(values + 4 * h), LoadFloat4(offsets + 4 * h),
                                   LoadFloat4(divisors + 4 * h), top, middle, mapped);
    }
  }
  Transpose8x8(half);  // half[h][r]: columns 4h..4h+3 of row r
  for (int h = 0; h < 2; ++h) {
    for (int r = 0; r < 8; ++r) {
      StoreFloat4(block + r * 8 + 4 * h, ConstantLine(source, y0, r) ? zero : half[h][r]);
    }
  }
}

#if defined(JAXJPEG_X86_DISPATCH)
// GatherCenteredBlock eight lanes at a time, the rows left in registers for
// the transform: the same operations per lane (v > 0 ? v : 0 is
// max_ps(v, 0), NaN included; min_ps alike).
__attribute__((target("avx2"))) inline __m256 CenteredSamplesAvx2(__m256 v, __m256 offset,
                                                                  __m256 divisor, __m256 top,
                                                                  __m256 middle, bool mapped) {
  if (mapped) v = _mm256_div_ps(_mm256_sub_ps(v, offset), divisor);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), top);
  return _mm256_sub_ps(v, middle);
}

// LoadEdgeClamped into a register: straight from the line when the eight
// values are inside it (an 8-float copy through the stack would be two
// 16-byte stores read back as one 32-byte load, which store forwarding cannot
// serve).
__attribute__((target("avx2"))) inline __m256 LoadEdgeClampedAvx2(const float* line, int start,
                                                                  int limit) {
  if (start + 8 <= limit) return _mm256_loadu_ps(line + start);
  alignas(32) float values[8];
  for (int i = 0; i < 8; ++i) values[i] = line[start + i < limit ? start + i : limit - 1];
  return _mm256_load_ps(values);
}

__attribute__((target("avx2"))) inline void GatherCenteredRowsAvx2(const SampleSource& source,
                                                                   int x0, int y0,
                                                                   float max_sample, float center,
                                                                   __m256 rows[8]) {
  const __m256 top = _mm256_set1_ps(max_sample), middle = _mm256_set1_ps(center);
  const bool mapped = source.row_scale != nullptr;
  if (!source.transposed) {
    for (int r = 0; r < 8; ++r) {
      const int y = y0 + r < source.height ? y0 + r : source.height - 1;
      const __m256 values = LoadEdgeClampedAvx2(source.data + y * source.stride, x0, source.width);
      float offset = 0.0f, divisor = 1.0f;
      if (mapped) RowMap(source, y, &offset, &divisor);
      rows[r] = ConstantLine(source, y0, r)
                    ? _mm256_setzero_ps()
                    : CenteredSamplesAvx2(values, _mm256_set1_ps(offset),
                                          _mm256_set1_ps(divisor), top, middle, mapped);
    }
    return;
  }
  // Transposed: as GatherCenteredBlock, columns first, then a transpose.
  alignas(32) float offsets[8] = {}, divisors[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  if (mapped) {
    for (int r = 0; r < 8; ++r) {
      RowMap(source, y0 + r < source.height ? y0 + r : source.height - 1, offsets + r, divisors + r);
    }
  }
  for (int x = x0 + 16; x < x0 + 24 && x < source.width; ++x) {  // see GatherCenteredBlock
    __builtin_prefetch(source.data + x * source.stride + y0);
  }
  const __m256 offset = _mm256_load_ps(offsets), divisor = _mm256_load_ps(divisors);
  for (int c = 0; c < 8; ++c) {
    const int x = x0 + c < source.width ? x0 + c : source.width - 1;
    const __m256 values = LoadEdgeClampedAvx2(source.data + x * source.stride, y0, source.height);
    rows[c] = CenteredSamplesAvx2(values, offset, divisor, top, middle, mapped);
  }
  Transpose8x8Avx2(rows);
  for (int r = 0; r < 8; ++r) {
    if (ConstantLine(source, y0, r)) rows[r] = _mm256_setzero_ps();
  }
}
#endif

// Per-coefficient reciprocal step and the clamp that keeps magnitude
// categories within T.81's limits (F.1.2.1, F.1.2.2): DC differences need at
// most 11 bits (15 for 12-bit), AC values at most 10 (14). Zig-zag order.
struct Quantizer {
  float inverse_step[64];
  float lower[64];
  float upper[64];
};

Quantizer MakeQuantizer(const EncodeOptions& options) {
  const int dc_category = options.bits == 12 ? 15 : 11;
  const int ac_category = options.bits == 12 ? 14 : 10;
  Quantizer q;
  for (int k = 0; k < 64; ++k) {
    q.inverse_step[k] = static_cast<float>(1.0 / options.qtable[ZigzagToNatural(k)]);
    q.upper[k] = static_cast<float>(k == 0 ? (1 << (dc_category - 1)) - 1 : (1 << ac_category) - 1);
    q.lower[k] = k == 0 ? static_cast<float>(-(1 << (dc_category - 1))) : -q.upper[k];
  }
  return q;
}

// What RDO needs of one block's plain rounding: the candidates (bit k: AC
// value k, zig-zag, that rounding moved up, away from zero, to a nonzero
// power of two), those of them of magnitude 1 (lowering one to zero changes
// the runs every later value sees), and the squared error, in step^2, that
// lowering each value would add: (1 - d)^2 - d^2 with d its rounding distance.
struct RdoCandidates {
  uint64_t all;
  uint64_t units;
  alignas(16) float penalty[64];
};

// Rounds half away from zero; written with truncation so it vectorizes
// without SSE4.1 rounding instructions and stays exact (x - trunc(x) is exact).
// The coefficients are put in zig-zag order first (one permutation), then
// quantized four at a time. transposed: ForwardDct8x8Transposed's
// coefficients. scaled: coefficient / step, clamped.
JJ_INLINE void QuantizeToZigzag(const float transposed[64], const Quantizer& q, int16_t zigzag[64],
                                float scaled[64]) {
  typedef int32_t Int4 __attribute__((vector_size(16)));
  alignas(16) int32_t rounded[64];
  for (int i = 0; i < 64; i += 4) {
    // Four coefficients in zig-zag order straight into a register (copied one
    // by one to memory, a 16-byte load of them would defeat store forwarding).
    const uint8_t* index = kZigzagToTransposed.index + i;
    const Float4 ordered = {transposed[index[0]], transposed[index[1]], transposed[index[2]],
                            transposed[index[3]]};
    Float4 x = ordered * LoadFloat4(q.inverse_step + i);
    const Float4 lower = LoadFloat4(q.lower + i), upper = LoadFloat4(q.upper + i);
    x = x > lower ? x : lower;
    x = x < upper ? x : upper;
    StoreFloat4(scaled + i, x);
    const Int4 truncated = __builtin_convertvector(x, Int4);
    const Float4 fraction = x - __builtin_convertvector(truncated, Float4);
    // Comparisons give -1 (true) or 0 per lane.
    const Int4 value = truncated - (fraction >= 0.5f) + (fraction <= -0.5f);
    std::memcpy(rounded + i, &value, sizeof(value));
  }
#if defined(__SSE2__)
  for (int i = 0; i < 64; i += 8) {  // |values| < 2^15: packing saturates nothing
    const __m128i low = _mm_load_si128(reinterpret_cast<const __m128i*>(rounded + i));
    const __m128i high = _mm_load_si128(reinterpret_cast<const __m128i*>(rounded + i + 4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(zigzag + i), _mm_packs_epi32(low, high));
  }
#else
  for (int k = 0; k < 64; ++k) zigzag[k] = static_cast<int16_t>(rounded[k]);
#endif
}

#if defined(JAXJPEG_X86_DISPATCH)
// FindRdoCandidates of the eight lanes from zig-zag index `at`, from what
// QuantizeToZigzagAvx2 holds in registers: the rounded values (int32) and the
// scaled ones. The same operations per lane (magnitudes below 2^15 are the
// same in 32-bit lanes as in 16-bit ones; x > a is false for NaN either way).
__attribute__((target("avx2"))) inline void RdoLanesAvx2(__m256i rounded, __m256 scaled, int at,
                                                         RdoCandidates* out, uint64_t* all,
                                                         uint64_t* units) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i magnitude = _mm256_abs_epi32(rounded);
  const __m256i power_of_two = _mm256_cmpeq_epi32(
      _mm256_and_si256(magnitude, _mm256_sub_epi32(magnitude, one)), _mm256_setzero_si256());
  const __m256 m = _mm256_cvtepi32_ps(magnitude);
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), scaled);
  const __m256 candidate =
      _mm256_and_ps(_mm256_castsi256_ps(power_of_two), _mm256_cmp_ps(m, a, _CMP_GT_OQ));
  const __m256 unit =
      _mm256_and_ps(candidate, _mm256_castsi256_ps(_mm256_cmpeq_epi32(magnitude, one)));
  *all |= static_cast<uint64_t>(_mm256_movemask_ps(candidate)) << at;
  *units |= static_cast<uint64_t>(_mm256_movemask_ps(unit)) << at;
  const __m256 d = _mm256_sub_ps(m, a);
  const __m256 e = _mm256_sub_ps(_mm256_set1_ps(1.0f), d);
  _mm256_storeu_ps(out->penalty + at, _mm256_sub_ps(_mm256_mul_ps(e, e), _mm256_mul_ps(d, d)));
}

// QuantizeToZigzag, NonzeroAcMask and (rdo not null) FindRdoCandidates in one
// pass, eight lanes at a time: the same operations per lane (x > lower ? x :
// lower is max_ps(x, lower), NaN included; min_ps alike), on values still in
// registers. Returns the NonzeroAcMask.
__attribute__((target("avx2"))) inline uint64_t QuantizeToZigzagAvx2(const float transposed[64],
                                                                     const Quantizer& q,
                                                                     int16_t zigzag[64],
                                                                     RdoCandidates* rdo) {
  const __m256 half = _mm256_set1_ps(0.5f), minus_half = _mm256_set1_ps(-0.5f);
  uint64_t zero = 0;
  // The masks gather in locals, stored once: ORed into *rdo, each would
  // wait on the store before it (the penalties stored there may alias them).
  uint64_t all = 0, units = 0;
  for (int i = 0; i < 64; i += 16) {
    __m256i rounded[2];
    for (int j = 0; j < 2; ++j) {
      const int at = i + 8 * j;
      // Eight coefficients in zig-zag order straight into a register (copied
      // one by one to memory, a 32-byte load of them would defeat store
      // forwarding; a gather instruction is slow on CPUs with the GDS
      // microcode mitigation).
      const uint8_t* index = kZigzagToTransposed.index + at;
      const __m256 ordered = _mm256_setr_ps(
          transposed[index[0]], transposed[index[1]], transposed[index[2]], transposed[index[3]],
          transposed[index[4]], transposed[index[5]], transposed[index[6]], transposed[index[7]]);
      __m256 x = _mm256_mul_ps(ordered, _mm256_loadu_ps(q.inverse_step + at));
      x = _mm256_max_ps(x, _mm256_loadu_ps(q.lower + at));
      x = _mm256_min_ps(x, _mm256_loadu_ps(q.upper + at));
      const __m256i truncated = _mm256_cvttps_epi32(x);
      const __m256 fraction = _mm256_sub_ps(x, _mm256_cvtepi32_ps(truncated));
      // Comparisons give -1 (true) or 0 per lane.
      const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(fraction, half, _CMP_GE_OQ));
      const __m256i down = _mm256_castps_si256(_mm256_cmp_ps(fraction, minus_half, _CMP_LE_OQ));
      rounded[j] = _mm256_add_epi32(_mm256_sub_epi32(truncated, up), down);
      const __m256i is_zero = _mm256_cmpeq_epi32(rounded[j], _mm256_setzero_si256());
      zero |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(is_zero))) << at;
      if (rdo != nullptr) RdoLanesAvx2(rounded[j], x, at, rdo, &all, &units);
    }
    // |values| < 2^15: packing saturates nothing; packs works within 128-bit
    // halves, so the 64-bit quarters are put back in order.
    const __m256i packed = _mm256_packs_epi32(rounded[0], rounded[1]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(zigzag + i),
                        _mm256_permute4x64_epi64(packed, 0xD8));
  }
  if (rdo != nullptr) {  // DC is never a candidate
    rdo->all = all & ~uint64_t{1};
    rdo->units = units & ~uint64_t{1};
  }
  return ~zero & ~uint64_t{1};
}
#endif

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
JJ_INLINE uint64_t NonzeroAcMask(const int16_t zigzag[64]) {
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

// Each AC value's magnitude category and its extra bits before truncation
// to that category (value + (value >> 15): the value itself when positive,
// value - 1 when negative; the writer keeps the low `category` bits), for
// all 64 values at once instead of one symbol at a time.
struct CoefficientCodes {
  alignas(16) uint16_t extra[64];
  alignas(16) uint8_t category[64];
  alignas(16) uint32_t packed[64];  // (category << 16) | extra, by PackCodes
};

// Each value's category and extra bits in one word, as a symbol recorder
// stores them (the run goes in above the category), with RDO's lowering
// applied: each value in `lowered` (bit k: zig-zag k) moves down one
// category, its extra bits (the value when positive, value - 1 when
// negative) down by the same one. Applied here, lanes at once, rather than
// value by value in memory (small stores read back by 16-byte loads would
// defeat store forwarding).
JJ_INLINE void PackCodes(const int16_t zigzag[64], uint64_t lowered, CoefficientCodes* codes) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  const __m128i one = _mm_set1_epi16(1);
  const __m128i lane_bits = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
  for (int i = 0; i < 64; i += 16) {
    const __m128i categories = _mm_load_si128(reinterpret_cast<const __m128i*>(codes->category + i));
    for (int half = 0; half < 2; ++half) {
      const int at = i + 8 * half;
      // -1 in the lanes lowered, 0 elsewhere.
      const __m128i lower = _mm_cmpeq_epi16(
          _mm_and_si128(_mm_set1_epi16(static_cast<int16_t>((lowered >> at) & 0xFF)), lane_bits),
          lane_bits);
      const __m128i value = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zigzag + at));
      const __m128i sign = _mm_or_si128(_mm_srai_epi16(value, 15), one);  // +1 or -1
      const __m128i category = _mm_add_epi16(
          half == 0 ? _mm_unpacklo_epi8(categories, zero) : _mm_unpackhi_epi8(categories, zero),
          lower);
      const __m128i extra = _mm_sub_epi16(
          _mm_load_si128(reinterpret_cast<const __m128i*>(codes->extra + at)),
          _mm_and_si128(sign, lower));
      __m128i* out = reinterpret_cast<__m128i*>(codes->packed + at);
      _mm_store_si128(out, _mm_unpacklo_epi16(extra, category));
      _mm_store_si128(out + 1, _mm_unpackhi_epi16(extra, category));
    }
  }
#else
  for (int k = 0; k < 64; ++k) {
    const uint32_t lower = static_cast<uint32_t>(lowered >> k) & 1;
    const uint32_t sign = zigzag[k] < 0 ? ~0u : 1u;
    const uint32_t extra = static_cast<uint16_t>(codes->extra[k] - (sign & (0u - lower)));
    codes->packed[k] = ((codes->category[k] - lower) << 16) | extra;
  }
#endif
}

JJ_INLINE void ComputeCoefficientCodes(const int16_t zigzag[64], CoefficientCodes* out) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  for (int i = 0; i < 64; i += 16) {
    __m128i categories[2];
    for (int half = 0; half < 2; ++half) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zigzag + i + 8 * half));
      const __m128i sign = _mm_srai_epi16(v, 15);
      _mm_store_si128(reinterpret_cast<__m128i*>(out->extra + i + 8 * half), _mm_add_epi16(v, sign));
      const __m128i magnitude = _mm_sub_epi16(_mm_xor_si128(v, sign), sign);
      // A magnitude m >= 1 is exact in float32 with exponent field
      // 126 + category; m = 0 gives a negative number, clamped to 0.
      const __m128i low = _mm_castps_si128(_mm_cvtepi32_ps(_mm_unpacklo_epi16(magnitude, zero)));
      const __m128i high = _mm_castps_si128(_mm_cvtepi32_ps(_mm_unpackhi_epi16(magnitude, zero)));
      const __m128i exponents = _mm_packs_epi32(_mm_srli_epi32(low, 23), _mm_srli_epi32(high, 23));
      categories[half] = _mm_max_epi16(_mm_sub_epi16(exponents, _mm_set1_epi16(126)), zero);
    }
    _mm_store_si128(reinterpret_cast<__m128i*>(out->category + i),
                    _mm_packus_epi16(categories[0], categories[1]));
  }
#else
  for (int k = 0; k < 64; ++k) {
    out->extra[k] = static_cast<uint16_t>(zigzag[k] + (zigzag[k] < 0 ? -1 : 0));
    out->category[k] = static_cast<uint8_t>(MagnitudeCategory(zigzag[k]));
  }
#endif
}

constexpr uint8_t kEndOfBlock = 0x00;
constexpr uint8_t kZeroRun16 = 0xF0;

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
// alone (coded differentially, 1/64 of the values). Symbols are priced with
// the optimal code lengths of plainly rounded values in a sample of the
// tile's block rows (SampleRdoPrices).
//
// lambda = ln 2 / 6 ~ 0.1155 is the slope -dD/dR of uniform quantization at
// high rate (D = step^2 / 12, dD/dR = -2 ln 2 D), in step^2 per bit; 0.10 to
// 0.14 measured alike on Gaussian and Laplacian weights.
constexpr float kRdoLambda = 0.12f;

JJ_INLINE void FindRdoCandidates(const int16_t zigzag[64], const float scaled[64],
                              RdoCandidates* out) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  const __m128i one = _mm_set1_epi16(1);
  const __m128 sign = _mm_set1_ps(-0.0f);
  const __m128 unit = _mm_set1_ps(1.0f);
  uint64_t all = 0, units = 0;
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
    const __m128i unit_candidate = _mm_and_si128(candidate, _mm_cmpeq_epi16(magnitude, one));
    all |= static_cast<uint64_t>(_mm_movemask_epi8(_mm_packs_epi16(candidate, zero)) & 0xFF)
           << (8 * i);
    units |= static_cast<uint64_t>(_mm_movemask_epi8(_mm_packs_epi16(unit_candidate, zero)) &
                                   0xFF)
             << (8 * i);
    const __m128 d_low = _mm_sub_ps(low, a_low), d_high = _mm_sub_ps(high, a_high);
    const __m128 e_low = _mm_sub_ps(unit, d_low), e_high = _mm_sub_ps(unit, d_high);
    _mm_store_ps(out->penalty + 8 * i,
                 _mm_sub_ps(_mm_mul_ps(e_low, e_low), _mm_mul_ps(d_low, d_low)));
    _mm_store_ps(out->penalty + 8 * i + 4,
                 _mm_sub_ps(_mm_mul_ps(e_high, e_high), _mm_mul_ps(d_high, d_high)));
  }
  out->all = all & ~uint64_t{1};
  out->units = units & ~uint64_t{1};
#else
  out->all = out->units = 0;
  for (int k = 1; k < 64; ++k) {
    const int v = zigzag[k] < 0 ? -zigzag[k] : zigzag[k];
    const float a = scaled[k] < 0 ? -scaled[k] : scaled[k];
    const bool power_of_two = (v & (v - 1)) == 0;  // v == 0 excluded below: a >= 0
    const bool candidate = power_of_two && static_cast<float>(v) > a;
    out->all |= static_cast<uint64_t>(candidate) << k;
    out->units |= static_cast<uint64_t>(candidate && v == 1) << k;
    const float d = static_cast<float>(v) - a;
    out->penalty[k] = (1.0f - d) * (1.0f - d) - d * d;
  }
#endif
}

// RDO's prices in one tile: the code length of each AC symbol (unused ones:
// 16), and for a value of category c >= 2 after r zeros (the symbol
// (r & 15) << 4 | c), lambda times the bits that lowering it one category
// saves: the most squared error that lowering may add (the ZRLs of a long
// run cost the same either way).
struct RdoPrices {
  uint8_t cost[256];
  float lowering_gain[256];
  // The bits of the AC symbol(s) for `run` zeros (0..63) then a value of
  // `category` (0..15), at (run << 4) | category: the ZRLs of a run of 16 or
  // more, then its symbol (at most 3 * 16 + 16 bits).
  uint8_t run_cost[64 * 16];

  explicit RdoPrices(const HuffmanCodeTable& table) {
    for (int i = 0; i < 256; ++i) cost[i] = table.length[i] ? table.length[i] : 16;
    for (int i = 0; i < 256; ++i) {
      const int delta = (i & 15) >= 2 ? cost[i] - cost[i - 1] + 1 : 0;
      lowering_gain[i] = kRdoLambda * delta;
    }
    for (int run = 0; run < 64; ++run) {
      for (int category = 0; category < 16; ++category) {
        run_cost[(run << 4) | category] = static_cast<uint8_t>(
            (run >> 4) * cost[kZeroRun16] + cost[((run & 15) << 4) | category]);
      }
    }
  }

  int CostOf(int run, int category) const { return run_cost[(run << 4) | category]; }
};

// Whether RDO lowers the unit candidate at k to zero, `run` zeros after the
// previous nonzero value; `later`: the nonzero values after k (as plain
// rounding left them: decided after this one). Lowering a 1 to 0 saves its
// symbol and extra bit but lengthens the next value's run, or at the end of
// the block costs the EOB it had no need of at k == 63.
JJ_INLINE bool UnitLowers(const RdoCandidates& rdo, int k, int run, uint64_t later,
                       const uint8_t category[64], const RdoPrices& prices) {
  int delta;
  if (later != 0) {  // the next value's run absorbs this one's
    const int r2 = __builtin_ctzll(later);
    const int next_category = category[k + 1 + r2];
    delta = prices.CostOf(run, 1) + 1 + prices.CostOf(r2, next_category) -
            prices.CostOf(run + 1 + r2, next_category);
  } else {
    delta = prices.CostOf(run, 1) + 1 - (k == 63 ? prices.cost[kEndOfBlock] : 0);
  }
  return rdo.penalty[k] < kRdoLambda * delta;
}

// Run of zeros before k in `nonzero` (bit 0 set: runs start after DC).
JJ_INLINE int RunBefore(uint64_t nonzero, int k) {
  return k - (63 - __builtin_clzll(nonzero & ((uint64_t{1} << k) - 1))) - 1;
}

// The nonzero AC values left once RDO has decided the unit candidates, in
// zig-zag order: each sees the runs that earlier decisions left. A decision
// is first taken with the run plain rounding left, so decisions do not wait
// on each other, and taken again in the rare case that the value before it
// was lowered to zero (about 8% of unit candidates are).
JJ_INLINE uint64_t DropUnits(uint64_t nonzero, const RdoCandidates& rdo,
                          const uint8_t category[64], const RdoPrices& prices) {
  const uint64_t plain = nonzero | 1;
  nonzero = plain;
  uint64_t units = rdo.units;
  while (units != 0) {
    const int k = __builtin_ctzll(units);
    units &= units - 1;
    const uint64_t later = k < 63 ? plain >> (k + 1) : 0;
    const int run = RunBefore(plain, k);
    bool lower = UnitLowers(rdo, k, run, later, category, prices);
    if (!((nonzero >> (k - run - 1)) & 1)) {  // the value before was lowered to zero
      lower = UnitLowers(rdo, k, RunBefore(nonzero, k), later, category, prices);
    }
    nonzero &= ~(static_cast<uint64_t>(lower) << k);
  }
  return nonzero & ~uint64_t{1};
}

// One block's quantized values (zig-zag order), their NonzeroAcMask and, with
// RDO, its candidates.
struct QuantizedBlock {
  alignas(16) int16_t zigzag[64];
  uint64_t nonzero;
  RdoCandidates rdo;
};

// RDO's decisions on the candidates larger than 1 (lowering one changes no
// run, so the runs left by DropUnits are final): bit k set when the value at
// k moves down one category (PackCodes applies them). Decided candidate by
// candidate (about one nonzero value in six) rather than in the symbol loop.
JJ_INLINE uint64_t LoweredCandidates(const QuantizedBlock& block, uint64_t nonzero,
                                     const float lowering_gain[256], const uint8_t category[64]) {
  const uint64_t runs_end = nonzero | 1;  // DC ends the run before the first AC value
  uint64_t candidates = block.rdo.all & ~block.rdo.units;
  uint64_t lowered = 0;
  while (candidates != 0) {
    const int k = __builtin_ctzll(candidates);
    candidates &= candidates - 1;
    const int run = RunBefore(runs_end, k);
    // Without branches: the decisions are unpredictable.
    const uint64_t lower = block.rdo.penalty[k] < lowering_gain[((run & 15) << 4) | category[k]];
    lowered |= lower << k;
  }
  return lowered;
}

// Calls emit(entry) for each AC symbol of a block, in order: ZRLs, each
// nonzero value's (run << 4 | category) << 16 | its extra bits (the
// receiver keeps the low `category` bits), then EOB unless the last value is
// nonzero. packed: PackCodes'; nonzero: the AC values coded (bit k: zig-zag k).
template <class Emit>
JJ_INLINE void ForEachAcSymbol(const uint32_t packed[64], uint64_t nonzero, Emit&& emit) {
  int last = 0;
  while (nonzero != 0) {
    const int k = __builtin_ctzll(nonzero);
    nonzero &= nonzero - 1;
    uint32_t run = static_cast<uint32_t>(k - last - 1);
    last = k;
    if (__builtin_expect(run >= 16, 0)) {
      for (; run >= 16; run -= 16) emit(uint32_t{kZeroRun16} << 16);
    }
    emit(packed[k] + (run << 20));
  }
  if (last != 63) emit(uint32_t{kEndOfBlock} << 16);
}

// The values a decoder reads back for a block (zig-zag order): its DC, the
// AC values in `nonzero` (what RDO's drops left), each in `lowered` one
// closer to zero (as PackCodes codes it), the others 0.
JJ_INLINE void StoreCodedValues(const int16_t zigzag[64], uint64_t nonzero, uint64_t lowered,
                                int16_t coded[64]) {
#if defined(__SSE2__)
  // Eight lanes at a time, as PackCodes: -1 in the lanes whose bit is set.
  const __m128i one = _mm_set1_epi16(1);
  const __m128i lane_bits = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
  const auto lanes = [&](uint64_t bits, int at) {
    return _mm_cmpeq_epi16(
        _mm_and_si128(_mm_set1_epi16(static_cast<int16_t>((bits >> at) & 0xFF)), lane_bits),
        lane_bits);
  };
  for (int at = 0; at < 64; at += 8) {
    const __m128i value = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zigzag + at));
    const __m128i sign = _mm_or_si128(_mm_srai_epi16(value, 15), one);  // +1 or -1
    const __m128i moved = _mm_sub_epi16(value, _mm_and_si128(sign, lanes(lowered, at)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(coded + at),
                     _mm_and_si128(moved, lanes(nonzero, at)));
  }
#else
  for (int k = 1; k < 64; ++k) {
    const int value = zigzag[k];
    const int keep = static_cast<int>((nonzero >> k) & 1);
    const int lower = static_cast<int>((lowered >> k) & 1);
    coded[k] = static_cast<int16_t>(keep * (value - lower * (value < 0 ? -1 : 1)));
  }
#endif
  coded[0] = zigzag[0];  // bit 0 of the masks is never set: DC is not an AC value
}

// Emits the symbols of one block to `sink` (a histogram or a symbol
// recorder), so every pass shares one definition of the symbol stream.
// kRdo: RDO decides the block's candidates first, those of magnitude 1
// (DropUnits), then the larger ones (LoweredCandidates, applied by
// PackCodes). kAvx2: the sink may
// use code compiled for AVX2 (only from RecordTileAvx2). Returns the block's
// DC value. `coded` (optional): receives the values as coded (StoreCodedValues).
template <bool kRdo, bool kAvx2, class Sink>
JJ_INLINE int CodeBlock(const QuantizedBlock& block, int previous_dc, const RdoPrices* prices,
                        Sink& sink, int16_t* coded = nullptr) {
  const int dc = block.zigzag[0];
  const int dc_difference = dc - previous_dc;
  const int dc_category = MagnitudeCategory(dc_difference);
  sink.Dc(dc_category, ExtraBits(dc_difference, dc_category));
  CoefficientCodes codes;
  ComputeCoefficientCodes(block.zigzag, &codes);
  uint64_t nonzero = block.nonzero;
  uint64_t lowered = 0;
  if (kRdo) {
    if (block.rdo.units != 0) nonzero = DropUnits(nonzero, block.rdo, codes.category, *prices);
    lowered = LoweredCandidates(block, nonzero, prices->lowering_gain, codes.category);
  }
  PackCodes(block.zigzag, lowered, &codes);
  sink.template AcSymbols<kAvx2>(codes.packed, nonzero);
  if (coded != nullptr) StoreCodedValues(block.zigzag, nonzero, lowered, coded);
  return dc;
}

struct HistogramSink {
  SymbolHistogram dc;
  SymbolHistogram ac;
  void Dc(int symbol, uint32_t) { ++dc.count[symbol]; }
  template <bool kAvx2>
  JJ_INLINE void AcSymbols(const uint32_t packed[64], uint64_t nonzero) {
    ForEachAcSymbol(packed, nonzero, [this](uint32_t entry) { ++ac.count[entry >> 16]; });
  }
};

// Whether coding `nonzero` takes a ZRL: a run of 16 or more zeros before a
// nonzero AC value (runs after the last one end in EOB).
JJ_INLINE bool HasLongRun(uint64_t nonzero) {
  const uint64_t coded = nonzero | 1;  // runs start after DC
  const int last = 63 - __builtin_clzll(coded);
  if (last < 16) return false;
  uint64_t zeros = ~coded;  // bit i: i..i+15 all zero, after the shifts
  zeros &= zeros >> 1;
  zeros &= zeros >> 2;
  zeros &= zeros >> 4;
  zeros &= zeros >> 8;
  return (zeros & ((uint64_t{1} << (last - 15)) - 1)) != 0;
}

#if defined(JAXJPEG_X86_DISPATCH)
// For each 8-bit mask, the indices of its set bits in increasing order, one
// per byte (the rest 0): the lanes a compress by that mask keeps.
struct CompressIndices {
  uint64_t lanes[256];
  CompressIndices() {
    for (int mask = 0; mask < 256; ++mask) {
      uint64_t packed = 0;
      for (int bit = 0, n = 0; bit < 8; ++bit) {
        if (mask & (1 << bit)) packed |= static_cast<uint64_t>(bit) << (8 * n++);
      }
      lanes[mask] = packed;
    }
  }
};

const CompressIndices& CompressTable() {
  static const CompressIndices table;
  return table;
}

// ForEachAcSymbol's entries for a block without ZRLs (!HasLongRun), eight
// positions at a time: the nonzero values' packed codes and positions are
// compressed into the first lanes, each run is the distance to the lane
// before (lane 0: to the last position of the groups before) minus one. All
// eight lanes are stored and `out` advances past the valid ones: the stores
// reach at most 64 entries past `out` (8 groups of up to 8), within a
// block's kMaxSymbolsPerBlock. Returns the new end.
__attribute__((target("avx2,bmi,bmi2"))) uint32_t* ShortRunSymbolsAvx2(
    const uint32_t packed[64], uint64_t nonzero, uint32_t* out) {
  const CompressIndices& table = CompressTable();
  const __m256i rotate = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i previous = _mm256_setzero_si256();  // lane 0: the last position so far (DC: 0)
  for (int group = 0; group < 8; ++group) {
    const unsigned mask = static_cast<unsigned>(nonzero >> (8 * group)) & 0xFF;
    if (mask == 0) continue;
    const __m256i lanes =
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(table.lanes[mask])));
    // Two 16-byte loads, as PackCodes stored them (store forwarding).
    const __m128i* halves = reinterpret_cast<const __m128i*>(packed + 8 * group);
    const __m256i group_codes = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(halves)), _mm_loadu_si128(halves + 1), 1);
    const __m256i codes = _mm256_permutevar8x32_epi32(group_codes, lanes);
    const __m256i positions = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * group));
    const __m256i before =
        _mm256_blend_epi32(_mm256_permutevar8x32_epi32(positions, rotate), previous, 1);
    const __m256i runs = _mm256_sub_epi32(_mm256_sub_epi32(positions, before), one);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_add_epi32(codes, _mm256_slli_epi32(runs, 20)));
    const int count = __builtin_popcount(mask);
    out += count;
    previous = _mm256_permutevar8x32_epi32(positions, _mm256_set1_epi32(count - 1));
  }
  return out;
}
#endif

// One coded symbol: (table index << 16) | its extra bits (AC: before
// truncation to the symbol's category; the writer masks them), the table
// index being the AC symbol (0..255) or 256 + the DC symbol.
constexpr int kDcIndex = 256;
constexpr int kMaxSymbolsPerBlock = 68;  // DC, 63 AC values, 3 ZRLs, EOB

// The symbols of every block in coding order, counted (CountNew) a block row
// at a time: the tables are optimal for exactly what is written. Counted
// right after they were stored, each entry's count waited on its store (the
// loads, of stores just made by vector code, were a twelfth of the coding
// time); a row later they are plain L1 hits.
class SymbolRecorder {
 public:
  // Room for the most symbols `blocks` blocks can have (may throw
  // std::bad_alloc); pages never written are never touched.
  explicit SymbolRecorder(int64_t blocks)
      : entries_(new uint32_t[static_cast<size_t>(blocks) * kMaxSymbolsPerBlock]),
        end_(entries_.get()), counted_(entries_.get()) {}

  void Dc(int symbol, uint32_t bits) { Record((static_cast<uint32_t>(kDcIndex + symbol) << 16) | bits); }

  // A block's AC symbols (ForEachAcSymbol's entries); kAvx2: without ZRLs,
  // eight positions at a time.
  template <bool kAvx2>
  JJ_INLINE void AcSymbols(const uint32_t packed[64], uint64_t nonzero) {
#if defined(JAXJPEG_X86_DISPATCH)
    if constexpr (kAvx2) {
      if (!HasLongRun(nonzero)) {
        end_ = ShortRunSymbolsAvx2(packed, nonzero, end_);
        if ((nonzero >> 63) == 0) *end_++ = uint32_t{kEndOfBlock} << 16;
        return;
      }
    }
#endif
    ForEachAcSymbol(packed, nonzero, [this](uint32_t entry) { Record(entry); });
  }

  // Counts the entries recorded since the last call, kLanes at a time, each
  // into its own table: the same symbol again soon (frequent) then
  // increments another counter, not the one still being updated.
  JJ_INLINE void CountNew() {
    const uint32_t* begin = counted_;
    for (; end_ - begin >= kLanes; begin += kLanes) {
      for (int lane = 0; lane < kLanes; ++lane) ++count_[lane][begin[lane] >> 16];
    }
    for (; begin < end_; ++begin) ++count_[0][*begin >> 16];
    counted_ = end_;
  }

  size_t size() const { return static_cast<size_t>(end_ - entries_.get()); }
  const uint32_t* entries() const { return entries_.get(); }
  // After CountNew of every entry.
  SymbolHistogram Histogram(int first) const {
    SymbolHistogram h;
    for (int i = 0; i < 256; ++i) {
      h.count[i] = 0;
      for (int lane = 0; lane < kLanes; ++lane) h.count[i] += count_[lane][first + i];
    }
    return h;
  }

 private:
  void Record(uint32_t entry) { *end_++ = entry; }

  std::unique_ptr<uint32_t[]> entries_;
  // Where the next symbol goes: a pointer, not a size_t count, so the
  // compiler may keep it in a register (a uint64_t count_ store could alias
  // a size_t, which would be reloaded after each one).
  uint32_t* end_;
  const uint32_t* counted_;  // entries before it are counted
  // Summed by Histogram. A lane counts at most one in kLanes of a tile's
  // entries, (65535 / 8)^2 * 68 / 8 < 2^30 at most: 32 bits suffice.
  static constexpr int kLanes = 8;
  uint32_t count_[kLanes][512] = {};
};

// DC prediction restarts at zero with every restart interval (T.81 F.1.1.5.1).
JJ_INLINE bool StartsInterval(int64_t block, int restart_interval) {
  return restart_interval > 0 && block % restart_interval == 0;
}

class BlockQuantizer {
 public:
  BlockQuantizer(const SampleSource& source, const EncodeOptions& options,
                 const TransformCache* cache = nullptr, int blocks_x = 0)
      : source_(source), basis_(ForwardDctBasis()), quantizer_(MakeQuantizer(options)),
        max_sample_(static_cast<float>((1 << options.bits) - 1)),
        center_(static_cast<float>(1 << (options.bits - 1))), cache_(cache),
        blocks_x_(blocks_x) {}

  // with_rdo: out->rdo filled in too. kAvx2: the transform compiled for
  // AVX2 (only from RecordTileAvx2). With a cache, the block's transform is
  // stored there (cache_->fill) or read from it instead of computed: the
  // same floats either way, so the same quantized values.
  template <bool kAvx2>
  JJ_INLINE void Quantize(int bx, int by, bool with_rdo, QuantizedBlock* out) const {
    alignas(32) float coefficients[64];  // transposed
    float* const cached =
        cache_ == nullptr ? nullptr
                          : cache_->data + 64 * (static_cast<int64_t>(by) * blocks_x_ + bx);
    const bool read = cached != nullptr && !cache_->fill;
    if (read) std::memcpy(coefficients, cached, sizeof(coefficients));
#if defined(JAXJPEG_X86_DISPATCH)
    if constexpr (kAvx2) {
      if (!read) {
        __m256 rows[8];
        GatherCenteredRowsAvx2(source_, bx * 8, by * 8, max_sample_, center_, rows);
        ForwardDct8x8TransposedAvx2(basis_, rows, coefficients);
        if (cached != nullptr) std::memcpy(cached, coefficients, sizeof(coefficients));
      }
      out->nonzero = QuantizeToZigzagAvx2(coefficients, quantizer_, out->zigzag,
                                          with_rdo ? &out->rdo : nullptr);
      return;
    }
#endif
    alignas(16) float scaled[64];
    if (!read) {
      alignas(32) float block[64];
      GatherCenteredBlock(source_, bx * 8, by * 8, max_sample_, center_, block);
      ForwardDct8x8Transposed(basis_, block, coefficients);
      if (cached != nullptr) std::memcpy(cached, coefficients, sizeof(coefficients));
    }
    QuantizeToZigzag(coefficients, quantizer_, out->zigzag, scaled);
    out->nonzero = NonzeroAcMask(out->zigzag);
    if (with_rdo) FindRdoCandidates(out->zigzag, scaled, &out->rdo);
  }

 private:
  const SampleSource& source_;
  const DctBasis& basis_;
  const Quantizer quantizer_;
  const float max_sample_;
  const float center_;
  const TransformCache* cache_;
  const int blocks_x_;
};

// The code length of each AC symbol (unused ones: 16) under the optimal
// table of plainly rounded values in a sample of block rows (RDO's prices):
// every 8th row of a large tile keeps this pass an eighth of the work, while
// a small tile's sample keeps at least kMinCostSampleBlocks blocks (all rows
// of a tile with fewer): a few blocks leave common symbols unseen, priced at
// 16 bits, and RDO then lowers far too many values.
constexpr int64_t kMaxCostSampleRowStep = 8;
constexpr int64_t kMinCostSampleBlocks = 256;

int CostSampleRowStep(const BlockGrid& grid) {
  const int64_t step = grid.count / kMinCostSampleBlocks;
  return static_cast<int>(step < 1 ? 1 : step > kMaxCostSampleRowStep ? kMaxCostSampleRowStep : step);
}

// The blocks of the sampled rows, with their RDO candidates, kept for
// RecordSymbols (they are quantized once), up to kMaxKeptSampleBlocks
// (~3.4 MB): a larger tile's are quantized again.
constexpr size_t kMaxKeptSampleBlocks = 8192;

class SampledBlocks {
 public:
  SampledBlocks(const BlockGrid& grid, int row_step)
      : row_step_(row_step), blocks_x_(grid.blocks_x) {
    const int64_t rows = (grid.blocks_y + row_step - 1) / row_step;
    if (static_cast<uint64_t>(rows * grid.blocks_x) <= kMaxKeptSampleBlocks) {
      blocks_.resize(static_cast<size_t>(rows * grid.blocks_x));
    }
  }
  // Where the blocks of row `by` are kept (block bx at [bx]); null where
  // they are not.
  JJ_INLINE QuantizedBlock* Row(int by) {
    if (blocks_.empty() || by % row_step_ != 0) return nullptr;
    return &blocks_[static_cast<size_t>(by / row_step_) * blocks_x_];
  }

 private:
  int row_step_;
  int blocks_x_;
  std::vector<QuantizedBlock> blocks_;
};

template <bool kAvx2>
JJ_INLINE RdoPrices SampleRdoPrices(const BlockQuantizer& quantizer, const BlockGrid& grid,
                          int restart_interval, SampledBlocks* kept) {
  HistogramSink histogram;
  QuantizedBlock scratch;
  for (int by = 0; by < grid.blocks_y; by += CostSampleRowStep(grid)) {
    int previous_dc = 0;
    QuantizedBlock* const kept_row = kept->Row(by);
    for (int bx = 0; bx < grid.blocks_x; ++bx) {
      const int64_t index = static_cast<int64_t>(by) * grid.blocks_x + bx;
      if (StartsInterval(index, restart_interval)) previous_dc = 0;
      QuantizedBlock* const block = kept_row != nullptr ? kept_row + bx : &scratch;
      quantizer.template Quantize<kAvx2>(bx, by, block != &scratch, block);
      previous_dc = CodeBlock<false, false>(*block, previous_dc, nullptr, histogram);
    }
  }
  return RdoPrices(BuildCodeTable(BuildOptimalSpec(histogram.ac)));
}

// Quantizes every block (RDO included; with it, blocks kept by
// SampleRdoPrices are taken as they are) and records its symbols; the index
// of the first symbol of each restart interval is appended to
// interval_symbols. prices: RDO's (null: no RDO).
template <bool kRdo, bool kAvx2>
JJ_INLINE void RecordSymbols(const BlockQuantizer& quantizer, const BlockGrid& grid, int restart_interval,
                   const RdoPrices* prices, SampledBlocks* kept, SymbolRecorder* recorder,
                   std::vector<size_t>* interval_symbols, int16_t* coefficients) {
  QuantizedBlock scratch;
  int previous_dc = 0;
  // Blocks left before the next restart interval (the first one starts at
  // block 0): a countdown, not a division per block.
  int64_t interval_left = 0;
  for (int by = 0; by < grid.blocks_y; ++by) {
    const QuantizedBlock* const kept_row = kRdo ? kept->Row(by) : nullptr;
    for (int bx = 0; bx < grid.blocks_x; ++bx) {
      if (interval_left == 0) {
        previous_dc = 0;
        interval_symbols->push_back(recorder->size());
        interval_left = restart_interval > 0 ? restart_interval : INT64_MAX;
      }
      --interval_left;
      const QuantizedBlock* block = kept_row != nullptr ? kept_row + bx : nullptr;
      if (block == nullptr) {
        quantizer.template Quantize<kAvx2>(bx, by, kRdo, &scratch);
        block = &scratch;
      }
      int16_t* const coded =
          coefficients == nullptr
              ? nullptr
              : coefficients + 64 * (static_cast<int64_t>(by) * grid.blocks_x + bx);
      previous_dc = CodeBlock<kRdo, kAvx2>(*block, previous_dc, prices, *recorder, coded);
    }
    recorder->CountNew();
  }
}

// Each table index's code followed by room for its extra bits, and the total
// length: a recorded symbol is written with one lookup.
struct SymbolCodes {
  uint32_t prefix[512];
  uint16_t extra_mask[512];  // the extra bits a symbol carries
  uint8_t length[512];

  // A recorded symbol's code and extra bits (length[entry >> 16] of them).
  uint32_t Bits(uint32_t entry) const {
    const uint32_t index = entry >> 16;
    return prefix[index] | (entry & extra_mask[index]);
  }
};

SymbolCodes MakeSymbolCodes(const HuffmanCodeTable& dc, const HuffmanCodeTable& ac) {
  SymbolCodes codes;
  for (int i = 0; i < 512; ++i) {
    const bool is_dc = i >= kDcIndex;
    const int symbol = is_dc ? i - kDcIndex : i;
    // DC symbols past 16 never occur: their extra bits capped keep the
    // shifts below defined (found by review, UBSan: a shift of up to 255)
    const int extra = is_dc ? std::min(symbol, 16) : symbol & 15;
    const HuffmanCodeTable& table = is_dc ? dc : ac;
    codes.prefix[i] = static_cast<uint32_t>(table.code[symbol]) << extra;
    codes.extra_mask[i] = static_cast<uint16_t>((1u << extra) - 1);
    codes.length[i] = static_cast<uint8_t>(table.length[symbol] + extra);
  }
  return codes;
}

// The entropy-coded segment, with RSTn markers between intervals; the offset
// where each interval's data starts is appended to `starts`.
JJ_INLINE void WriteEntropyCodedData(const SymbolRecorder& recorder,
                           const std::vector<size_t>& interval_symbols, const SymbolCodes& codes,
                           BitWriter* out, std::vector<int64_t>* starts) {
  BitWriter local = *out;  // in registers (see BitWriter)
  BitWriter* const writer = &local;
  // A chunk of this many symbols (31 bits at most each) fits the reserve.
  constexpr size_t kChunk = 64;
  static_assert(kChunk * 31 / 8 * 2 + 16 <= kMaxCodedBlockBytes, "reserve too small");
  const uint32_t* entries = recorder.entries();
  for (size_t interval = 0; interval < interval_symbols.size(); ++interval) {
    if (interval > 0) {
      writer->FlushWithPadding();
      writer->PutMarker(static_cast<uint8_t>(marker::kRST0 + ((interval - 1) & 7)));
    }
    starts->push_back(static_cast<int64_t>(writer->Position()));
    const size_t end = interval + 1 < interval_symbols.size() ? interval_symbols[interval + 1]
                                                               : recorder.size();
    for (size_t i = interval_symbols[interval]; i < end;) {
      writer->Reserve(kMaxCodedBlockBytes);
      const size_t chunk_end = end - i > kChunk ? i + kChunk : end;
      // Two symbols (31 bits at most each) per Put: half the accumulator
      // checks.
      for (; chunk_end - i >= 2; i += 2) {
        const uint32_t second_length = codes.length[entries[i + 1] >> 16];
        writer->Put((uint64_t{codes.Bits(entries[i])} << second_length) | codes.Bits(entries[i + 1]),
                    codes.length[entries[i] >> 16] + second_length);
      }
      if (i < chunk_end) {
        writer->Put(codes.Bits(entries[i]), codes.length[entries[i] >> 16]);
        ++i;
      }
    }
  }
  writer->FlushWithPadding();
  writer->Finish();
  *out = local;
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

// The hot passes: every block quantized and its symbols recorded (RDO
// included), then the entropy-coded data written. Everything they call is
// inlined into them, so each entry point below is compiled whole for its
// target; the CPU picks one at run time.
template <bool kAvx2>
JJ_INLINE void RecordTile(const SampleSource& source, const EncodeOptions& options,
                          const BlockGrid& grid, SymbolRecorder* recorder,
                          std::vector<size_t>* interval_symbols, int16_t* coefficients,
                          const TransformCache* cache) {
  const BlockQuantizer quantizer(source, options, cache, grid.blocks_x);
  // RDO prices symbols with optimal code lengths whatever optimize_huffman
  // says, so the values coded do not depend on it.
  if (options.rdo) {
    SampledBlocks kept(grid, CostSampleRowStep(grid));
    const RdoPrices prices = SampleRdoPrices<kAvx2>(quantizer, grid, options.restart_interval, &kept);
    RecordSymbols<true, kAvx2>(quantizer, grid, options.restart_interval, &prices, &kept, recorder,
                        interval_symbols, coefficients);
  } else {
    RecordSymbols<false, kAvx2>(quantizer, grid, options.restart_interval, nullptr, nullptr, recorder,
                         interval_symbols, coefficients);
  }
}

void RecordTilePortable(const SampleSource& source, const EncodeOptions& options,
                        const BlockGrid& grid, SymbolRecorder* recorder,
                        std::vector<size_t>* interval_symbols, int16_t* coefficients,
                        const TransformCache* cache) {
  RecordTile<false>(source, options, grid, recorder, interval_symbols, coefficients, cache);
}

void WriteEntropyCodedDataPortable(const SymbolRecorder& recorder,
                                   const std::vector<size_t>& interval_symbols,
                                   const SymbolCodes& codes, BitWriter* writer,
                                   std::vector<int64_t>* starts) {
  WriteEntropyCodedData(recorder, interval_symbols, codes, writer, starts);
}

#if defined(JAXJPEG_X86_DISPATCH)
// The same code with 256-bit vectors, three-operand (VEX) encodings and
// BMI2's shifts: the same operations in the same order, so the same bytes.
__attribute__((target("avx2,bmi,bmi2"))) void RecordTileAvx2(
    const SampleSource& source, const EncodeOptions& options, const BlockGrid& grid,
    SymbolRecorder* recorder, std::vector<size_t>* interval_symbols, int16_t* coefficients,
    const TransformCache* cache) {
  RecordTile<true>(source, options, grid, recorder, interval_symbols, coefficients, cache);
}

__attribute__((target("avx2,bmi,bmi2"))) void WriteEntropyCodedDataAvx2(
    const SymbolRecorder& recorder, const std::vector<size_t>& interval_symbols,
    const SymbolCodes& codes, BitWriter* writer, std::vector<int64_t>* starts) {
  WriteEntropyCodedData(recorder, interval_symbols, codes, writer, starts);
}
#endif

// Encodes into *out (interval starts into *starts); with `coefficients`, also
// every block's values as coded (StoreCodedValues), 64 a block in raster order.
void Encode(const SampleSource& source, const EncodeOptions& options, std::vector<uint8_t>* out,
            std::vector<int64_t>* starts, std::vector<int16_t>* coefficients,
            const TransformCache* cache) {
  const BlockGrid grid = MakeBlockGrid(source.width, source.height);
  const bool avx2 = options.allow_avx2 && CpuHasAvx2Bmi2();
  SymbolRecorder recorder(grid.count);
  std::vector<size_t> interval_symbols;
  int16_t* coded = nullptr;
  if (coefficients != nullptr) {
    coefficients->resize(static_cast<size_t>(grid.count) * 64);
    coded = coefficients->data();
  }
#if defined(JAXJPEG_X86_DISPATCH)
  if (avx2) {
    RecordTileAvx2(source, options, grid, &recorder, &interval_symbols, coded, cache);
  } else {
    RecordTilePortable(source, options, grid, &recorder, &interval_symbols, coded, cache);
  }
#else
  RecordTilePortable(source, options, grid, &recorder, &interval_symbols, coded, cache);
#endif

  const SymbolHistogram dc_counts = recorder.Histogram(kDcIndex);
  const SymbolHistogram ac_counts = recorder.Histogram(0);
  const HuffmanSpec dc_spec =
      options.optimize_huffman ? BuildOptimalSpec(dc_counts) : StandardLuminanceDcSpec();
  const HuffmanSpec ac_spec =
      options.optimize_huffman ? BuildOptimalSpec(ac_counts) : StandardLuminanceAcSpec();

  PutMarker(out, marker::kSOI);
  PutQuantTable(out, options.qtable);
  PutFrameHeader(out, options.bits, source.width, source.height);
  PutHuffmanTables(out, dc_spec, ac_spec);
  if (options.restart_interval > 0) PutRestartInterval(out, options.restart_interval);
  PutScanHeader(out);

  BitWriter writer(out);
  const SymbolCodes codes = MakeSymbolCodes(BuildCodeTable(dc_spec), BuildCodeTable(ac_spec));
  // The output grows once, to about its final size: the coded bits are known
  // from the counts (stuffed bytes, RST markers and padding take a little more).
  uint64_t coded_bits = 0;
  for (int i = 0; i < 256; ++i) {
    coded_bits += ac_counts.count[i] * codes.length[i] + dc_counts.count[i] * codes.length[kDcIndex + i];
  }
  const uint64_t coded_bytes = coded_bits / 8;
  writer.Reserve(static_cast<size_t>(coded_bytes + coded_bytes / 128 + 3 * interval_symbols.size() +
                                     2 * kMaxCodedBlockBytes));
#if defined(JAXJPEG_X86_DISPATCH)
  if (avx2) {
    WriteEntropyCodedDataAvx2(recorder, interval_symbols, codes, &writer, starts);
  } else {
    WriteEntropyCodedDataPortable(recorder, interval_symbols, codes, &writer, starts);
  }
#else
  (void)avx2;
  WriteEntropyCodedDataPortable(recorder, interval_symbols, codes, &writer, starts);
#endif
  starts->push_back(static_cast<int64_t>(out->size()));  // the EOI marker
  PutMarker(out, marker::kEOI);
}

Status EncodeSource(const SampleSource& source, const EncodeOptions& options,
                    std::vector<uint8_t>* out, std::vector<int64_t>* interval_starts,
                    std::vector<int16_t>* coefficients = nullptr,
                    const TransformCache* cache = nullptr) {
  const Status status = ValidateArguments(source, options, out);
  if (status != Status::kOk) return status;
  const size_t original_size = out->size();
  std::vector<int64_t> starts;
  try {
    Encode(source, options, out, &starts, coefficients, cache);
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

Status EncodeMappedGrayscaleWithCoefficients(const float* weights, int width, int height,
                                             std::ptrdiff_t stride, const float* row_scale,
                                             const float* row_offset,
                                             const EncodeOptions& options,
                                             std::vector<uint8_t>* out,
                                             std::vector<int64_t>* interval_starts,
                                             std::vector<int16_t>* coefficients,
                                             bool transposed, const TransformCache* cache) {
  if (row_scale == nullptr || row_offset == nullptr || coefficients == nullptr ||
      (cache != nullptr && cache->data == nullptr)) {
    return Status::kBadArgument;
  }
  return EncodeSource({weights, stride, width, height, row_scale, row_offset, transposed},
                      options, out, interval_starts, coefficients, cache);
}

Status EncodeGrayscale(const float* samples, int width, int height, std::ptrdiff_t stride,
                       const EncodeOptions& options, std::vector<uint8_t>* out,
                       std::vector<int64_t>* interval_starts) {
  return EncodeSource({samples, stride, width, height, nullptr, nullptr}, options, out,
                      interval_starts);
}

Status EncodeMappedGrayscale(const float* weights, int width, int height, std::ptrdiff_t stride,
                             const float* row_scale, const float* row_offset,
                             const EncodeOptions& options, std::vector<uint8_t>* out,
                             std::vector<int64_t>* interval_starts, bool transposed) {
  if (row_scale == nullptr || row_offset == nullptr) return Status::kBadArgument;
  return EncodeSource({weights, stride, width, height, row_scale, row_offset, transposed},
                      options, out, interval_starts);
}

}  // namespace jaxjpeg
