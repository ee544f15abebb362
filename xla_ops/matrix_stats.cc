#include "matrix_stats.h"

#include <cstring>
#include <limits>

#include "cpu_features.h"

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

#define JAXJPEG_INLINE inline __attribute__((always_inline))

// Four doubles, one per lane of a Float4: two SSE registers (Double2 pairs,
// lanes 0, 1 and 2, 3), or one AVX register (Double4, where the CPU has
// AVX2). Each lane's arithmetic is the same either way, so both give the
// same bits.
struct DoublePair {
  Double2 low, high;
};
JAXJPEG_INLINE DoublePair operator+(DoublePair a, DoublePair b) { return {a.low + b.low, a.high + b.high}; }
JAXJPEG_INLINE DoublePair operator*(DoublePair a, DoublePair b) { return {a.low * b.low, a.high * b.high}; }

JAXJPEG_INLINE void Widen(Float4 x, DoublePair* out) {
#if defined(__SSE2__)
  const __m128 v = reinterpret_cast<__m128>(x);
  out->low = reinterpret_cast<Double2>(_mm_cvtps_pd(v));
  out->high = reinterpret_cast<Double2>(_mm_cvtps_pd(_mm_movehl_ps(v, v)));
#else
  out->low = Double2{x[0], x[1]};
  out->high = Double2{x[2], x[3]};
#endif
}
JAXJPEG_INLINE DoublePair LoadWide(const double* p, DoublePair*) {
  return {Load<Double2>(p), Load<Double2>(p + 2)};
}
JAXJPEG_INLINE void StoreWide(double* p, DoublePair v) {
  Store(p, v.low);
  Store(p + 2, v.high);
}
JAXJPEG_INLINE double Lane(DoublePair v, int i) { return i < 2 ? v.low[i] : v.high[i - 2]; }

#if defined(JAXJPEG_X86_DISPATCH)
#define JAXJPEG_AVX2_STATS 1
// The Double4 code is always inlined, in the end into AddAllRowsAvx2
// (compiled for AVX2): GCC's warnings that passing a Double4 by value would
// change the ABI without AVX do not apply (up to the pop below).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef double Double4 __attribute__((vector_size(32)));
JAXJPEG_INLINE void Widen(Float4 x, Double4* out) { *out = __builtin_convertvector(x, Double4); }
JAXJPEG_INLINE Double4 LoadWide(const double* p, Double4*) {
  Double4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
JAXJPEG_INLINE void StoreWide(double* p, Double4 v) { std::memcpy(p, &v, sizeof(v)); }
JAXJPEG_INLINE double Lane(Double4 v, int i) { return v[i]; }
#endif

// One row's running statistics: column c goes to lane c % 4 of each
// accumulator, four columns at a time, then the columns left one by one.
template <class Wide>
class RowStats {
 public:
  // bound: the limit in every lane.
  JAXJPEG_INLINE void Add4(Float4 x, Wide wide, Float4 bound) {
    const Float4 sign = {-0.0f, -0.0f, -0.0f, -0.0f};
    sum_ = sum_ + wide;
    squares_ = squares_ + wide * wide;
    low_ = Min(low_, x);
    high_ = Max(high_, x);
    const Float4 magnitude = reinterpret_cast<Float4>(reinterpret_cast<Int4>(x) &
                                                      ~reinterpret_cast<Int4>(sign));
    special_ += (magnitude <= bound) + 1;  // a comparison gives -1 (true) or 0
  }

  // The lanes combined ((0 + 2) + (1 + 3)), then the columns from c on one
  // at a time (each also added to the column statistics); the row's
  // statistics stored at y.
  JAXJPEG_INLINE void Finish(const float* row, int64_t c, int64_t cols, float limit,
                             MatrixStats* s, int64_t y) const {
    double row_sum = (Lane(sum_, 0) + Lane(sum_, 2)) + (Lane(sum_, 1) + Lane(sum_, 3));
    double row_squares =
        (Lane(squares_, 0) + Lane(squares_, 2)) + (Lane(squares_, 1) + Lane(squares_, 3));
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
  Wide sum_ = {}, squares_ = {};
  Float4 low_ = {kInf, kInf, kInf, kInf}, high_ = -low_;
  Int4 special_ = {0, 0, 0, 0};
};

// kRows consecutive rows (1, 2 or 4) from row y: their statistics, and the
// columns' accumulated row after row (the order a row at a time gives).
// Several rows at once keep more independent sums in flight and load and
// store the columns' once for all of them (four: 5-9% faster than two on
// 768- and 3072-wide matrices, whose column sums live in L2; eight: no
// faster).
template <int kRows, class Wide>
JAXJPEG_INLINE void AddRows(const float* data, int64_t stride, int64_t cols, float limit,
                            MatrixStats* s, int64_t y) {
  const float* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = data + (y + r) * stride;
  RowStats<Wide> stats[kRows];
  const Float4 bound = {limit, limit, limit, limit};
  double* const col_sum = s->col_sum;
  double* const col_squares = s->col_sum_squares;
  float* const col_min = s->col_min;
  float* const col_max = s->col_max;
  int64_t c = 0;
  for (; c + 4 <= cols; c += 4) {
    Wide sum = LoadWide(col_sum + c, &sum), squares = LoadWide(col_squares + c, &squares);
    Float4 low = Load<Float4>(col_min + c), high = Load<Float4>(col_max + c);
    for (int r = 0; r < kRows; ++r) {
      const Float4 x = Load<Float4>(rows[r] + c);
      Wide wide;
      Widen(x, &wide);
      stats[r].Add4(x, wide, bound);
      sum = sum + wide;
      squares = squares + wide * wide;
      low = Min(low, x);
      high = Max(high, x);
    }
    StoreWide(col_sum + c, sum);
    StoreWide(col_squares + c, squares);
    Store(col_min + c, low);
    Store(col_max + c, high);
  }
  for (int r = 0; r < kRows; ++r) stats[r].Finish(rows[r], c, cols, limit, s, y + r);
}

template <class Wide>
JAXJPEG_INLINE void AddAllRows(const float* data, int64_t rows, int64_t cols, int64_t stride,
                               float limit, MatrixStats* s) {
  int64_t y = 0;
  for (; y + 4 <= rows; y += 4) AddRows<4, Wide>(data, stride, cols, limit, s, y);
  for (; y + 2 <= rows; y += 2) AddRows<2, Wide>(data, stride, cols, limit, s, y);
  if (y < rows) AddRows<1, Wide>(data, stride, cols, limit, s, y);
}

void AddAllRowsPortable(const float* data, int64_t rows, int64_t cols, int64_t stride,
                        float limit, MatrixStats* s) {
  AddAllRows<DoublePair>(data, rows, cols, stride, limit, s);
}

#if defined(JAXJPEG_AVX2_STATS)
__attribute__((target("avx2"))) void AddAllRowsAvx2(const float* data, int64_t rows,
                                                    int64_t cols, int64_t stride, float limit,
                                                    MatrixStats* s) {
  AddAllRows<Double4>(data, rows, cols, stride, limit, s);
}
#endif
#if defined(JAXJPEG_AVX2_STATS) && defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace

Status ComputeMatrixStats(const float* data, int64_t rows, int64_t cols, int64_t stride,
                          float limit, MatrixStats* stats, bool allow_avx2) {
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
#if defined(JAXJPEG_AVX2_STATS)
  if (allow_avx2 && CpuHasAvx2()) {
    AddAllRowsAvx2(data, rows, cols, stride, limit, &s);
    return Status::kOk;
  }
#endif
  (void)allow_avx2;
  AddAllRowsPortable(data, rows, cols, stride, limit, &s);
  return Status::kOk;
}

}  // namespace jaxjpeg
