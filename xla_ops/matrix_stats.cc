#include "matrix_stats.h"

#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// The four lanes of x in double: lanes 0, 1 and lanes 2, 3.
inline void Widen(Float4 x, Double2* low, Double2* high) {
#if defined(__SSE2__)
  const __m128 v = reinterpret_cast<__m128>(x);
  *low = reinterpret_cast<Double2>(_mm_cvtps_pd(v));
  *high = reinterpret_cast<Double2>(_mm_cvtps_pd(_mm_movehl_ps(v, v)));
#else
  *low = Double2{x[0], x[1]};
  *high = Double2{x[2], x[3]};
#endif
}

// One row's running statistics: column c goes to lane c % 4 of each
// accumulator, four columns at a time, then the columns left one by one.
class RowStats {
 public:
  // bound: the limit in every lane.
  void Add4(Float4 x, Double2 wide_low, Double2 wide_high, Float4 bound) {
    const Float4 sign = {-0.0f, -0.0f, -0.0f, -0.0f};
    sum_low_ += wide_low;
    sum_high_ += wide_high;
    squares_low_ += wide_low * wide_low;
    squares_high_ += wide_high * wide_high;
    low_ = Min(low_, x);
    high_ = Max(high_, x);
    const Float4 magnitude = reinterpret_cast<Float4>(reinterpret_cast<Int4>(x) &
                                                      ~reinterpret_cast<Int4>(sign));
    special_ += (magnitude <= bound) + 1;  // a comparison gives -1 (true) or 0
  }

  // The lanes combined, then the columns from c on one at a time (each also
  // added to the column statistics); the row's statistics stored at y.
  void Finish(const float* row, int64_t c, int64_t cols, float limit, MatrixStats* s,
              int64_t y) const {
    const Double2 sum = sum_low_ + sum_high_, squares = squares_low_ + squares_high_;
    double row_sum = sum[0] + sum[1];
    double row_squares = squares[0] + squares[1];
    float row_low = low_[0], row_high = high_[0];
    for (int i = 1; i < 4; ++i) row_high = high_[i] > row_high ? high_[i] : row_high;
    for (int i = 1; i < 4; ++i) row_low = low_[i] < row_low ? low_[i] : row_low;
    int64_t row_special = static_cast<int64_t>(special_[0]) + special_[1] + special_[2] + special_[3];
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

 private:
  static constexpr float kInf = std::numeric_limits<float>::infinity();
  Double2 sum_low_ = {0, 0}, sum_high_ = {0, 0}, squares_low_ = {0, 0}, squares_high_ = {0, 0};
  Float4 low_ = {kInf, kInf, kInf, kInf}, high_ = -low_;
  Int4 special_ = {0, 0, 0, 0};
};

// kRows consecutive rows (1 or 2) from row y: their statistics, and the
// columns' accumulated row after row (the order a row at a time gives).
// Two rows at once keep twice as many independent sums in flight and load
// and store the columns' once for both.
template <int kRows>
void AddRows(const float* data, int64_t stride, int64_t cols, float limit, MatrixStats* s,
             int64_t y) {
  const float* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = data + (y + r) * stride;
  RowStats stats[kRows];
  const Float4 bound = {limit, limit, limit, limit};
  double* const col_sum = s->col_sum;
  double* const col_squares = s->col_sum_squares;
  float* const col_min = s->col_min;
  float* const col_max = s->col_max;
  int64_t c = 0;
  for (; c + 4 <= cols; c += 4) {
    Double2 sum_low = Load<Double2>(col_sum + c), sum_high = Load<Double2>(col_sum + c + 2);
    Double2 squares_low = Load<Double2>(col_squares + c);
    Double2 squares_high = Load<Double2>(col_squares + c + 2);
    Float4 low = Load<Float4>(col_min + c), high = Load<Float4>(col_max + c);
    for (int r = 0; r < kRows; ++r) {
      const Float4 x = Load<Float4>(rows[r] + c);
      Double2 wide_low, wide_high;
      Widen(x, &wide_low, &wide_high);
      stats[r].Add4(x, wide_low, wide_high, bound);
      sum_low += wide_low;
      sum_high += wide_high;
      squares_low += wide_low * wide_low;
      squares_high += wide_high * wide_high;
      low = Min(low, x);
      high = Max(high, x);
    }
    Store(col_sum + c, sum_low);
    Store(col_sum + c + 2, sum_high);
    Store(col_squares + c, squares_low);
    Store(col_squares + c + 2, squares_high);
    Store(col_min + c, low);
    Store(col_max + c, high);
  }
  for (int r = 0; r < kRows; ++r) stats[r].Finish(rows[r], c, cols, limit, s, y + r);
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
  int64_t y = 0;
  for (; y + 2 <= rows; y += 2) AddRows<2>(data, stride, cols, limit, &s, y);
  if (y < rows) AddRows<1>(data, stride, cols, limit, &s, y);
  return Status::kOk;
}

}  // namespace jaxjpeg
