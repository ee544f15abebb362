// Host-only JPEG encoder for single-component tiles: 8-bit baseline (SOF0)
// or 12-bit extended sequential Huffman (SOF1). Every output is a complete
// standard JPEG file that any decoder opens.
#ifndef JAXJPEG_ENCODER_H_
#define JAXJPEG_ENCODER_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "jpeg_defs.h"

namespace jaxjpeg {

struct EncodeOptions {
  // 8 -> SOF0 (baseline), 12 -> SOF1 (extended sequential Huffman).
  int bits = 8;
  // Quantization steps in natural (row-major) order; must be filled in
  // (quant_tables.h has helpers). 8-bit: 1..255. 12-bit: 1..65535, written
  // as a 16-bit DQT when any step exceeds 255.
  uint16_t qtable[64] = {};
  // Blocks per restart interval; 0 = no DRI and no RST markers. Max 65535.
  int restart_interval = 0;
  // true: two passes, Huffman tables optimized for this tile.
  // false: the Annex K luminance tables (8-bit only: they lack the larger
  // magnitude categories 12-bit needs, so 12-bit returns kUnsupported).
  bool optimize_huffman = true;
  // true: rate-distortion optimized quantization: AC values that rounding
  // carries up to a power of two (a longer magnitude category) are lowered by
  // one when the bits saved outweigh the added squared error (encoder.cc).
  // false: every coefficient is round-half-away-from-zero(coefficient/step).
  // Same decoders either way; about 0.03 bit/weight less at equal error near
  // 4 bits/weight on Gaussian weights. Symbols are priced from the plainly
  // rounded values of every 8th block row; each block is decided just
  // before its symbols are recorded.
  bool rdo = true;
  // true: on x86-64 CPUs with AVX2 and BMI2, the hot passes run as code
  // compiled for them (run-time dispatch); the output is the same either way
  // (false: the portable code, which tests compare with).
  bool allow_avx2 = true;
};

// samples: row-major float32 in [0, 2^bits - 1], continuous (not rounded:
// the DCT takes them as they are); values outside are clamped, NaN -> 0.
// width, height in 1..65535; stride (in elements) >= width.
// Appends SOI, DQT, SOF0/SOF1 (one component, id 1, 1x1 sampling, table 0),
// DHT (DC 0, AC 0), DRI if restart_interval > 0, SOS, entropy-coded data with
// RST0..RST7 between intervals, EOI. Partial edge blocks replicate the last
// column/row. Never throws; on failure *out is left as it was.
// Errors: kBadSize (dimensions), kBadArgument (null pointers, stride, bits,
// restart interval, out of memory), kBadQuantTable (a step out of range),
// kUnsupported (standard Huffman tables with 12-bit samples).
// interval_starts (optional): replaced by the offset in *out of each restart
// interval's entropy-coded data, then of the EOI marker (intervals + 1
// values), recorded while writing: what a decoder's scan for markers finds.
Status EncodeGrayscale(const float* samples, int width, int height, std::ptrdiff_t stride,
                       const EncodeOptions& options, std::vector<uint8_t>* out,
                       std::vector<int64_t>* interval_starts = nullptr);

// EncodeGrayscale of the samples of a tile of weights under per-row maps:
// sample(y, x) = (w(y, x) - row_offset[y]) / row_scale[y] in float32 (a
// row_scale <= 0, a constant row, divides by 1), clamped as above: what
// jaxjpeg.mapping.to_samples computes, without its copy. w(y, x) is
// weights[y * stride + x] (stride >= width), or with `transposed`
// weights[x * stride + y] (stride >= height): a transposed view of a C-order
// matrix is coded as its copy would be, without the copy.
// row_scale and row_offset hold `height` values (null: kBadArgument).
Status EncodeMappedGrayscale(const float* weights, int width, int height, std::ptrdiff_t stride,
                             const float* row_scale, const float* row_offset,
                             const EncodeOptions& options, std::vector<uint8_t>* out,
                             std::vector<int64_t>* interval_starts = nullptr,
                             bool transposed = false);

// The forward transforms of a tile's blocks (64 floats a block, blocks in
// raster order): they depend on the weights, the row maps and the sample
// depth, not on the quantization table, so codings of one tile at several
// steps (rate_probe.cc's MeasureSteps) compute them once. fill: the coding
// computes each block's transform and stores it in `data`; else it reads
// it from there (filled by a coding of the same weights, maps and depth).
struct TransformCache {
  float* data = nullptr;  // 64 * blocks floats
  bool fill = true;
};

// EncodeMappedGrayscale that also gives what a decoder of
// the file reads back before its IDCT: every block's quantized coefficients
// as coded (RDO's choices included), 64 per block in zig-zag order, blocks in
// raster order; `coefficients` is replaced. Kept as each block is coded, so
// rate control measures a coding's error without Huffman-decoding the file
// it just wrote (rate_probe.cc). Errors as EncodeMappedGrayscale
// (`coefficients` null: kBadArgument).
Status EncodeMappedGrayscaleWithCoefficients(const float* weights, int width, int height,
                                             std::ptrdiff_t stride, const float* row_scale,
                                             const float* row_offset,
                                             const EncodeOptions& options,
                                             std::vector<uint8_t>* out,
                                             std::vector<int64_t>* interval_starts,
                                             std::vector<int16_t>* coefficients,
                                             bool transposed = false,
                                             const TransformCache* cache = nullptr);

}  // namespace jaxjpeg

#endif  // JAXJPEG_ENCODER_H_
