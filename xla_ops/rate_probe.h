// Rate-distortion measurements for rate control (jaxjpeg.rate): a tile of
// weights coded at several flat quantization steps, each step's bytes and
// squared error, in one native call instead of one encode and one decode
// from Python per step (rd_curve's probe ladder); a
// tile coded with its squared error (an error bound's step search); a coded
// tile's squared error against its weights, decoded in place without a
// decoded copy (squared_error).
#ifndef JAXJPEG_RATE_PROBE_H_
#define JAXJPEG_RATE_PROBE_H_

#include <cstddef>
#include <cstdint>

#include <vector>

#include "encoder.h"
#include "jpeg_defs.h"
#include "output_stage.h"

namespace jaxjpeg {

// What one step's coding of a tile costs: the bytes of its entropy-coded
// data (restart markers included: from the first interval's start to the
// EOI marker), the bytes around them (markers, tables, headers) and the
// squared error of the decoded weights, in double.
struct StepCost {
  int64_t entropy_bytes;
  int64_t header_bytes;
  double squared_error;
};

// The tile of weights w(y, x) = weights[y * stride + x] (width, height,
// stride and the per-row maps as EncodeMappedGrayscale takes them) coded by
// EncodeMappedGrayscale at each flat step steps[i] (every table entry
// steps[i]; `bits`, `restart_interval`, optimized Huffman tables and, with
// `rdo`, rate-distortion optimized quantization, as jaxjpeg.codec.encode_tensor
// codes: it leaves RDO out of error feedback's tiles): costs[i] gets the
// file's sizes, to the byte, and Σ ((decoded - w) * col_weight)²,
// col_weight(y, x) = col_weight[y * stride + x] (null: 1), the decoded
// value being what the decoder's float32 output stage writes (AffineSample,
// no column scales). The error is summed from each block's transform-domain
// error (rate_probe.cc's CodedErrorModel: within 1% of decoding the file at
// the rates rate control picks) and the step-independent forward DCT is
// computed once for all steps. Errors as EncodeMappedGrayscale.
Status MeasureSteps(const float* weights, int width, int height, std::ptrdiff_t stride,
                    const float* row_scale, const float* row_offset, const float* col_weight,
                    int bits, int restart_interval, bool rdo, const uint16_t* steps,
                    int num_steps, StepCost* costs);

// A tile's values, value (y, x) at data[y * row_step + x * col_step] (steps
// in elements: a row-major tile, its transpose or any strided view).
template <typename T>
struct StridedTile {
  const T* data;
  std::ptrdiff_t row_step;
  std::ptrdiff_t col_step;
  const T& at(int y, int x) const { return data[y * row_step + x * col_step]; }
};

// Sums per row of a coded tile, over the row's positions the side list does
// not keep: the count, the sum of the weights w (in the row map's units)
// less the row's center (RowSumsCenter: about a value near the mean, so that
// a mean that dwarfs the spread keeps it), the sum of their squares, and the
// squared error of the values the decoder writes for them (in the output
// dtype): what mapping a lost row to its mean needs (jaxjpeg/row_fit.py).
enum RowSum { kCount, kSumW, kSumWW, kSumError, kRowSums };

// The value a row's weights are summed about: what its map gives the middle
// sample, in double (jaxjpeg/row_fit.py computes it the same way).
inline double RowSumsCenter(float scale, float offset, double middle) {
  return static_cast<double>(offset) + static_cast<double>(scale) * middle;
}

// What EncodeTileWithError sums per row.
struct RowSums {
  double* sums;                  // kRowSums * height, overwritten
  StridedTile<float> values;     // the weights w, in the maps' units
  const float* row_scale;        // the maps their centers come from
  const float* row_offset;
  const uint8_t* bands = nullptr;  // optional, one a row of blocks: only those set
  OutputType written = OutputType::kFloat32;  // the dtype the decoder writes
};

// EncodeMappedGrayscale (its arguments; transposed as there) that also sets
// *squared_error to what TileSquaredError gives for the file it appends to
// *out, against `original`, `kept` and `col_scale` as TileSquaredError takes
// them: the same sum to the last bit, from the values the encoder coded
// instead of Huffman-decoding the file (an error-bound search measures each
// coding it tries). row_sums (optional): each row's RowSum values, `kept`
// positions left out. squared_error null: no error summed (original
// unused), and where row_sums' bands are given, only the rows of the blocks
// set are decoded and summed (the others' sums stay 0). Errors as
// EncodeMappedGrayscale (squared_error and row_sums both null, squared_error
// without original, row_sums with a null pointer but bands: kBadArgument).
Status EncodeTileWithError(const float* weights, int width, int height, std::ptrdiff_t stride,
                           bool transposed, const float* row_scale, const float* row_offset,
                           const EncodeOptions& options, StridedTile<float> original,
                           const StridedTile<uint8_t>* kept, const float* col_scale,
                           std::vector<uint8_t>* out, std::vector<int64_t>* interval_starts,
                           double* squared_error, const RowSums* row_sums = nullptr);

// Σ (w - decoded)² in double over a coded tile (a complete JPEG file of
// `size` bytes) against the float32 weights it codes, the decoded value being
// what the decoder's float32 output stage writes: AffineSample with the
// row's scale and offset, then times col_scale[x] (null: no column scales).
// Positions where kept (optional, nonzero) is set count 0 (the side list
// holds them exactly). The file's size must match width x height.
Status TileSquaredError(const uint8_t* data, int64_t size, StridedTile<float> weights,
                        const StridedTile<uint8_t>* kept, int width, int height,
                        const float* row_scale, const float* row_offset, const float* col_scale,
                        double* squared_error);

}  // namespace jaxjpeg

#endif  // JAXJPEG_RATE_PROBE_H_
