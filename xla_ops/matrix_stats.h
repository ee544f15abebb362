// One pass of statistics over a float32 matrix (host only): what choosing a
// leaf's view, finding its outliers and mapping its rows to samples need
// (jaxjpeg/analysis.py), computed without a numpy pass per statistic.
#ifndef JAXJPEG_MATRIX_STATS_H_
#define JAXJPEG_MATRIX_STATS_H_

#include <cstdint>

#include "jpeg_defs.h"

namespace jaxjpeg {

// Caller-owned outputs: `rows` entries for the row_* arrays, `cols` for the
// col_* arrays. Sums are accumulated in double.
struct MatrixStats {
  double* row_sum;
  double* row_sum_squares;
  float* row_min;
  float* row_max;
  double* col_sum;
  double* col_sum_squares;
  float* col_min;
  float* col_max;
  int64_t special;  // values with !(|x| <= limit): NaN, infinities, beyond the limit
};

// data: rows x cols float32, row y at data + y * stride (stride >= cols).
// Every value enters every statistic (NaN makes sums NaN and is skipped by
// min and max); a caller that needs finite statistics checks `special`.
// Errors: kBadArgument (null pointers, negative sizes, stride < cols). Never
// throws. allow_avx2: on x86-64 CPUs with AVX2, four lanes of double sums
// per instruction instead of two (the same bits; false: the portable code,
// for tests).
Status ComputeMatrixStats(const float* data, int64_t rows, int64_t cols, int64_t stride,
                          float limit, MatrixStats* stats, bool allow_avx2 = true);

}  // namespace jaxjpeg

#endif  // JAXJPEG_MATRIX_STATS_H_
