#include "matrix_stats.h"

#include <cstring>
#include <limits>

namespace jaxjpeg {
namespace {

// Four lanes at a time (GCC/Clang vector extension: SIMD where the target has
// it); sums in double.
typedef float Float4 __attribute__((vector_size(16)));
typedef double Double2 __attribute__((vector_size(16)));
typedef int32_t Int4 __attribute__((vector_size(16)));

template <class V, class T>
inline V Load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V, class T>
inline void Store(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

inline Float4 Min(Float4 a, Float4 b) { return b < a ? b : a; }
inline Float4 Max(Float4 a, Float4 b) { return b > a ? b : a; }

// One row: its statistics returned, the columns' accumulated.
void AddRow(const float* row, int64_t cols, float limit, MatrixStats* s, int64_t y) {
  const float inf = std::numeric_limits<float>::infinity();
  Double2 sum_low = {0, 0}, sum_high = sum_low, squares_low = sum_low, squares_high = sum_low;
  Float4 low = {inf, inf, inf, inf}, high = -low;
  Int4 special = {0, 0, 0, 0};
  const Float4 bound = {limit, limit, limit, limit};
  const Float4 sign = {-0.0f, -0.0f, -0.0f, -0.0f};
  int64_t c = 0;
  for (; c + 4 <= cols; c += 4) {
    const Float4 x = Load<Float4>(row + c);
    const Double2 wide_low = {x[0], x[1]}, wide_high = {x[2], x[3]};
    sum_low += wide_low;
    sum_high += wide_high;
    squares_low += wide_low * wide_low;
    squares_high += wide_high * wide_high;
    low = Min(low, x);
    high = Max(high, x);
    const Float4 magnitude = reinterpret_cast<Float4>(reinterpret_cast<Int4>(x) &
                                                      ~reinterpret_cast<Int4>(sign));
    special += (magnitude <= bound) + 1;  // a comparison gives -1 (true) or 0
    Store(s->col_sum + c, Load<Double2>(s->col_sum + c) + wide_low);
    Store(s->col_sum + c + 2, Load<Double2>(s->col_sum + c + 2) + wide_high);
    Store(s->col_sum_squares + c, Load<Double2>(s->col_sum_squares + c) + wide_low * wide_low);
    Store(s->col_sum_squares + c + 2,
          Load<Double2>(s->col_sum_squares + c + 2) + wide_high * wide_high);
    Store(s->col_min + c, Min(Load<Float4>(s->col_min + c), x));
    Store(s->col_max + c, Max(Load<Float4>(s->col_max + c), x));
  }
  const Double2 sum = sum_low + sum_high, squares = squares_low + squares_high;
  double row_sum = sum[0] + sum[1];
  double row_squares = squares[0] + squares[1];
  float row_low = low[0], row_high = high[0];
  for (int i = 1; i < 4; ++i) row_high = high[i] > row_high ? high[i] : row_high;
  for (int i = 1; i < 4; ++i) row_low = low[i] < row_low ? low[i] : row_low;
  int64_t row_special = static_cast<int64_t>(special[0]) + special[1] + special[2] + special[3];
  for (; c < cols; ++c) {
    const float x = row[c];
    const double wide = x;
    row_sum += wide;
    row_squares += wide * wide;
    row_low = x < row_low ? x : row_low;
    row_high = x > row_high ? x : row_high;
    row_special += !((x < 0 ? -x : x) <= limit);
    s->col_sum[c] += wide;
    s->col_sum_squares[c] += wide * wide;
    s->col_min[c] = x < s->col_min[c] ? x : s->col_min[c];
    s->col_max[c] = x > s->col_max[c] ? x : s->col_max[c];
  }
  s->row_sum[y] = row_sum;
  s->row_sum_squares[y] = row_squares;
  s->row_min[y] = row_low;
  s->row_max[y] = row_high;
  s->special += row_special;
}

}  // namespace

Status ComputeMatrixStats(const float* data, int64_t rows, int64_t cols, int64_t stride,
                          float limit, MatrixStats* stats) {
  if (stats == nullptr || rows < 0 || cols < 0 || stride < cols) return Status::kBadArgument;
  if (rows > 0 && cols > 0 && data == nullptr) return Status::kBadArgument;
  MatrixStats& s = *stats;
  if ((rows > 0 && (!s.row_sum || !s.row_sum_squares || !s.row_min || !s.row_max)) ||
      (cols > 0 && (!s.col_sum || !s.col_sum_squares || !s.col_min || !s.col_max))) {
    return Status::kBadArgument;
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < cols; ++c) {
    s.col_sum[c] = s.col_sum_squares[c] = 0.0;
    s.col_min[c] = inf;
    s.col_max[c] = -inf;
  }
  s.special = 0;
  for (int64_t y = 0; y < rows; ++y) AddRow(data + y * stride, cols, limit, &s, y);
  return Status::kOk;
}

}  // namespace jaxjpeg
