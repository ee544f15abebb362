// The decoder's output stage: decoded sample -> weight through a per-row affine
// map and an optional per-column scale, cast to float32 / bfloat16 / float16
// and stored into a strided view.
// The arithmetic is written so host and device round identically (no fused
// multiply-add, round-to-nearest-even conversions done in integer code).
#ifndef JAXJPEG_OUTPUT_STAGE_H_
#define JAXJPEG_OUTPUT_STAGE_H_

#include <cstring>

#include "jpeg_defs.h"

namespace jaxjpeg {

// Element types the decoder writes. Values cross the FFI boundary.
enum class OutputType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

JJ_HD JJ_INLINE uint32_t FloatBits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
}

// s * scale + offset with two roundings on every platform: nvcc would
// otherwise fuse it into one FMA and the GPU would disagree with the CPU
// (host code is built with -ffp-contract=off for the same reason).
JJ_HD JJ_INLINE float AffineSample(int sample, float scale, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(static_cast<float>(sample), scale), offset);
#else
  return static_cast<float>(sample) * scale + offset;
#endif
}

// v * column scale, rounded once on every platform (see AffineSample).
JJ_HD JJ_INLINE float ScaleColumn(float v, float col_scale) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(v, col_scale);
#else
  return v * col_scale;
#endif
}

JJ_HD JJ_INLINE uint16_t FloatToBFloat16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// Rounds `value >> shift` to nearest, ties to even (shift >= 1).
JJ_HD JJ_INLINE uint32_t ShiftRoundEven(uint32_t value, int shift) {
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

JJ_HD JJ_INLINE uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (magnitude >= 0x38800000u) {  // normal half: rebias exponent, round mantissa
    const uint32_t rebased = magnitude - (112u << 23);
    return static_cast<uint16_t>(sign | ShiftRoundEven(rebased, 13));
  }
  if (magnitude < 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: zero
  const uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
  const int shift = 126 - static_cast<int>(magnitude >> 23);  // subnormal half
  return static_cast<uint16_t>(sign | ShiftRoundEven(mantissa, shift));
}

template <OutputType kType>
struct OutputElement;
template <>
struct OutputElement<OutputType::kFloat32> {
  using Type = float;
  JJ_HD static JJ_INLINE float From(float v) { return v; }
};
template <>
struct OutputElement<OutputType::kBFloat16> {
  using Type = uint16_t;
  JJ_HD static JJ_INLINE uint16_t From(float v) { return FloatToBFloat16(v); }
};
template <>
struct OutputElement<OutputType::kFloat16> {
  using Type = uint16_t;
  JJ_HD static JJ_INLINE uint16_t From(float v) { return FloatToHalf(v); }
};

// Stores 16 bytes at a 16-byte aligned address: one vector store on the device.
JJ_HD JJ_INLINE void Store16Aligned(void* out, const void* bytes) {
#if defined(__CUDA_ARCH__)
  uint4 word;
  memcpy(&word, bytes, sizeof word);
  *reinterpret_cast<uint4*>(out) = word;
#else
  memcpy(out, bytes, 16);
#endif
}

// Stores one whole block row of 8 elements. On the device, when the address
// allows, as 16-byte vector stores (two for float32, one for 16-bit types)
// instead of 8 scalar ones: each lane of a warp fills its 32-byte sector in
// one or two instructions. The host compiler vectorizes the loop itself.
template <typename Element>
JJ_HD JJ_INLINE void StoreRow8(Element* out, const Element v[8]) {
#if defined(__CUDA_ARCH__)
  if ((reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    constexpr int kVectors = 8 * sizeof(Element) / 16;
    uint4 words[kVectors];
    memcpy(words, v, sizeof words);
    for (int k = 0; k < kVectors; ++k) reinterpret_cast<uint4*>(out)[k] = words[k];
    return;
  }
#endif
  for (int i = 0; i < 8; ++i) out[i] = v[i];
}

// Writes weights: tile row y of the image lands at base + y * row_stride, as
// (sample * row_scale[y] + row_offset[y]) * col_scale[x]. Trained networks
// carry scale both per input and per output channel; the column factor lets
// the coder normalise the axis the rows do not cover.
//
// A tensor whose matrix view permutes its axes is written in its own layout
// instead (no transpose pass afterwards): element (y, x) lands at
// base + row_at[y] + row_at[row_stride + x], offsets the plan's tables give
// (checked against the output by ResolveIntervalBlocks). The column offsets
// lie row_stride entries after the row offsets: one pointer fewer to carry
// through the GPU decode loop.
template <OutputType kType>
struct AffineSink {
  using Element = typename OutputElement<kType>::Type;
  Element* base;
  int64_t row_stride;       // in elements; placed by table: where column offsets start
  const float* row_scale;   // one per tile row
  const float* row_offset;  // one per tile row
  const float* col_scale;   // one per tile column, or nullptr: all 1
  const int64_t* row_at;    // row then column offsets, or nullptr: rows row_stride apart

  template <bool kScaleColumns>
  JJ_HD static JJ_INLINE Element Weight(int32_t sample, float scale, float offset,
                                        const float* cols, int i) {
    const float v = AffineSample(sample, scale, offset);
    return OutputElement<kType>::From(kScaleColumns ? ScaleColumn(v, cols[i]) : v);
  }

  template <bool kScaleColumns>
  JJ_HD static JJ_INLINE void PutRowScaled(Element* out, const int32_t* samples, int count,
                                           float scale, float offset, const float* cols) {
    if (count == 8) {  // a whole block row (a constant after inlining)
      Element v[8];
      for (int i = 0; i < 8; ++i) v[i] = Weight<kScaleColumns>(samples[i], scale, offset, cols, i);
      StoreRow8(out, v);
      return;
    }
    // Unrolled with constant indices: `samples` may be a register array.
    JJ_UNROLL
    for (int i = 0; i < 8; ++i) {
      if (i >= count) break;
      out[i] = Weight<kScaleColumns>(samples[i], scale, offset, cols, i);
    }
  }

  // A row segment placed by the tables: one store per element.
  JJ_HD JJ_INLINE void PutPlacedRow(int y, int x0, const int32_t* samples, int count) const {
    const float scale = row_scale[y], offset = row_offset[y];
    Element* out = base + row_at[y];
    const int64_t* at = row_at + row_stride + x0;
    JJ_UNROLL
    for (int i = 0; i < 8; ++i) {
      if (i >= count) break;
      const float v = AffineSample(samples[i], scale, offset);
      out[at[i]] = OutputElement<kType>::From(col_scale == nullptr ? v
                                                                   : ScaleColumn(v, col_scale[x0 + i]));
    }
  }

  // Whether rows [y0, y0 + 8) of a placed tile are 8 consecutive elements
  // (output channels as the rows of a Flax kernel): then a whole block is
  // written column by column (PutColumn), 8 contiguous values at a time,
  // instead of one scattered store per element.
  JJ_HD JJ_INLINE bool RowsContiguous(int y0) const {
    if (row_at == nullptr) return false;
    JJ_UNROLL
    for (int k = 1; k < 8; ++k) {
      if (row_at[y0 + k] != row_at[y0] + k) return false;
    }
    return true;
  }

  // Column x of rows [y0, y0 + 8) (RowsContiguous), samples[k] of row y0 + k.
  JJ_HD JJ_INLINE void PutColumn(int y0, int x, const int32_t* samples) const {
    Element v[8];
    JJ_UNROLL
    for (int k = 0; k < 8; ++k) {
      const float w = AffineSample(samples[k], row_scale[y0 + k], row_offset[y0 + k]);
      v[k] = OutputElement<kType>::From(col_scale == nullptr ? w : ScaleColumn(w, col_scale[x]));
    }
    StoreRow8(base + row_at[y0] + row_at[row_stride + x], v);
  }

  JJ_HD JJ_INLINE void PutRow(int y, int x0, const int32_t* samples, int count) const {
    if (row_at != nullptr) {
      PutPlacedRow(y, x0, samples, count);
      return;
    }
    const float scale = row_scale[y], offset = row_offset[y];
    Element* out = base + y * row_stride + x0;
    if (col_scale == nullptr) {
      PutRowScaled<false>(out, samples, count, scale, offset, nullptr);
    } else {
      PutRowScaled<true>(out, samples, count, scale, offset, col_scale + x0);
    }
  }

  // Elements per 16-byte chunk (see PutChunk).
  static constexpr int kChunkElements = 16 / static_cast<int>(sizeof(Element));

  // Writes the kChunkElements weights of row y from column x on, whose
  // samples are samples[i * kStride]; the address must be 16-byte aligned
  // (one vector store on the device) and the sink strided.
  template <int kStride>
  JJ_HD JJ_INLINE void PutChunk(int y, int x, const int32_t* samples) const {
    const float scale = row_scale[y], offset = row_offset[y];
    Element v[kChunkElements];
    if (col_scale == nullptr) {
      JJ_UNROLL
      for (int i = 0; i < kChunkElements; ++i) {
        v[i] = Weight<false>(samples[i * kStride], scale, offset, nullptr, i);
      }
    } else {
      JJ_UNROLL
      for (int i = 0; i < kChunkElements; ++i) {
        v[i] = Weight<true>(samples[i * kStride], scale, offset, col_scale + x, i);
      }
    }
    Store16Aligned(base + y * row_stride + x, v);
  }

  // Marks a row segment as not decoded (quiet NaN in the output type).
  JJ_HD JJ_INLINE void PutNaNRow(int y, int x0, int count) const {
    const Element nan = OutputElement<kType>::From(__builtin_nanf(""));
    if (row_at != nullptr) {
      for (int i = 0; i < count; ++i) base[row_at[y] + row_at[row_stride + x0 + i]] = nan;
      return;
    }
    Element* out = base + y * row_stride + x0;
    for (int i = 0; i < count; ++i) out[i] = nan;
  }
};

// Writes raw samples (the view libjpeg gives), for tests and tools.
struct SampleSink {
  uint16_t* base;
  int64_t row_stride;

  JJ_HD JJ_INLINE void PutRow(int y, int x0, const int32_t* samples, int count) const {
    uint16_t* out = base + y * row_stride + x0;
    for (int i = 0; i < count; ++i) out[i] = static_cast<uint16_t>(samples[i]);
  }
};

}  // namespace jaxjpeg

#endif  // JAXJPEG_OUTPUT_STAGE_H_
