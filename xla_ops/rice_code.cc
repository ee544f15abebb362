#include "rice_code.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "cpu_features.h"


namespace jaxjpeg {
namespace {

// Bits written most significant first into a buffer sized for them, 32 at
// a time through a 64-bit accumulator (a byte at a time into a growing
// vector was most of a Rice coding's time).
class BitWriter {
 public:
  BitWriter(uint8_t* out, PendingBits start) : out_(out), acc_(start.bits), count_(start.count) {}

  // The `n` (<= 32) low bits of `bits`.
  void Put(uint64_t bits, int n) {
    acc_ = (acc_ << n) | (bits & ((uint64_t{1} << n) - 1));
    count_ += n;
    if (count_ >= 32) {   // (count_ < 32 before: the accumulator held < 64 bits)
      count_ -= 32;
      const uint32_t word = static_cast<uint32_t>(acc_ >> count_);
      out_[0] = static_cast<uint8_t>(word >> 24);
      out_[1] = static_cast<uint8_t>(word >> 16);
      out_[2] = static_cast<uint8_t>(word >> 8);
      out_[3] = static_cast<uint8_t>(word);
      out_ += 4;
      acc_ &= (uint64_t{1} << count_) - 1;
    }
  }

  // Writes the whole bytes put; the bits past them are left pending.
  PendingBits Finish() {
    while (count_ >= 8) {
      count_ -= 8;
      *out_++ = static_cast<uint8_t>(acc_ >> count_);
    }
    acc_ &= (uint64_t{1} << count_) - 1;
    return {static_cast<uint32_t>(acc_), count_};
  }

 private:
  uint8_t* out_;
  uint64_t acc_;
  int count_;
};

// Grows `out` by `bits` / 8 bytes: where a BitWriter puts that many bits.
uint8_t* Grown(std::vector<uint8_t>& out, int64_t bits) {
  const size_t before = out.size();
  out.resize(before + static_cast<size_t>(bits / 8));
  return out.data() + before;
}

}  // namespace

void AppendUnary(const int64_t* quotients, int64_t n, PendingBits& pending,
                 std::vector<uint8_t>& out) {
  int64_t bits = pending.count;
  for (int64_t i = 0; i < n; ++i) bits += quotients[i] + 1;
  BitWriter writer(Grown(out, bits), pending);
  for (int64_t i = 0; i < n; ++i) {
    int64_t ones = quotients[i];
    for (; ones >= 32; ones -= 32) writer.Put(~uint64_t{0}, 32);
    writer.Put(((uint64_t{1} << ones) - 1) << 1, static_cast<int>(ones) + 1);   // then a 0
  }
  pending = writer.Finish();
}

void AppendRemainders(const int64_t* values, int64_t n, int k, std::vector<uint8_t>& out) {
  BitWriter writer(Grown(out, n * k + 7), PendingBits{});
  const int high = k > 32 ? k - 32 : 0;   // Put takes 32 bits at most
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = static_cast<uint64_t>(values[i]);
    if (high) writer.Put(v >> 32, high);
    writer.Put(v, k - high);
  }
  const PendingBits rest = writer.Finish();
  if (rest.count) writer.Put(0, 8 - rest.count);
  writer.Finish();
}

namespace {

// x rounded half to even (the default rounding mode): the 2^52 + 2^51
// trick inline where it is exact, else nearbyint (a call: most of a pass).
constexpr double kShift = 6755399441055744.0;  // 2^52 + 2^51
inline double RoundHalfEven(double x) {
  if (std::fabs(x) < 2251799813685248.0) return (x + kShift) - kShift;  // |x| < 2^51
  return std::nearbyint(x);
}

constexpr double kLargestCode = 4503599627370496.0;  // 2^52

// Values counted a block at a time: four at a time in doubles where every
// scaled value and the center lie under 2^49 (codes, their folding about
// the center and their quotients are then exact in doubles), else one at
// a time in integers (the same answers; any block the fast pass doubts).
constexpr int64_t kBlock = 512;
constexpr double kFastLimit = 562949953421312.0;  // 2^49

inline int64_t Zigzag(int64_t d) {
  return static_cast<int64_t>(static_cast<uint64_t>(d) << 1) ^ (d >> 63);
}

inline int64_t Unzigzag(int64_t f) { return (f >> 1) ^ -(f & 1); }

// A step's bytes: one block of RiceStepBytes' values one at a time, their
// squared errors summed into `sse`; false where a code reaches 2^52 or the
// folded codes' sum passes 2^63.
bool StepBlockExact(const double* values, const double* weights, int64_t m, double step,
                    int64_t center, int64_t* folded, int64_t& sum, double& sse) {
  sum = 0;
  sse = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    const double code = RoundHalfEven(values[i] / step);
    if (!(std::fabs(code) < kLargestCode)) return false;
    const double error = code * step - values[i];
    sse += weights ? error * error * weights[i] : error * error;
    folded[i] = Zigzag(static_cast<int64_t>(code) - center);
    if (__builtin_add_overflow(sum, folded[i], &sum)) return false;
  }
  return true;
}

// One block of CountStepCodes' values one at a time; false where a code
// reaches 2^52.
bool CountBlockExact(const double* x, const uint8_t* zero, int64_t m, double step,
                     int64_t center, int k, StepCounts& counts, int64_t* folded) {
  uint64_t quotients = 0;
  for (int64_t i = 0; i < m; ++i) {
    const double scaled = x[i] / step;
    const double code = zero && zero[i] ? std::floor(scaled) : RoundHalfEven(scaled);
    if (!(std::fabs(code) < kLargestCode)) return false;
    const int64_t c = static_cast<int64_t>(code);
    counts.lo = std::min(counts.lo, c);
    counts.hi = std::max(counts.hi, c);
    const int64_t f = Zigzag(c - center);   // |center| < 2^52: no overflow
    counts.largest = std::max(counts.largest, f);
    quotients += static_cast<uint64_t>(f) >> k;
    if (folded) folded[i] = f;
  }
  counts.quotients = static_cast<int64_t>(static_cast<uint64_t>(counts.quotients) + quotients);
  return true;
}

// 1 / step where that is exact (a power of two whose inverse is finite and
// nonzero), else 0.
double ExactInverse(double step) {
  int exponent;
  if (std::frexp(step, &exponent) != 0.5) return 0.0;
  const double inverse = std::ldexp(1.0, 1 - exponent);
  return std::isfinite(inverse) && inverse != 0.0 ? inverse : 0.0;
}

}  // namespace

namespace {

#define JAXJPEG_INLINE inline __attribute__((always_inline))

// The step passes are written once, always inlined into a portable function
// and into one built for AVX2 (StepBytes): four values at a time, in two
// vectors of two lanes (SSE2) or one of four (AVX2; GCC/Clang vector
// extensions). Each lane does the same arithmetic either way, and the sums
// keep the same order, so both give the same bits.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"   // (inlined: no call passes these)
#endif
typedef double Lanes2 __attribute__((vector_size(16)));
typedef int64_t IntLanes2 __attribute__((vector_size(16)));
typedef uint64_t SumLanes2 __attribute__((vector_size(16)));
typedef double Lanes4 __attribute__((vector_size(32)));
typedef int64_t IntLanes4 __attribute__((vector_size(32)));
typedef uint64_t SumLanes4 __attribute__((vector_size(32)));

template <class L>
JAXJPEG_INLINE L LoadLanes(const double* p) {
  L v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Zigzag of integral lanes d (|d| < 2^50): 2d, or -2d - 1 below 0, in doubles.
template <class L, class IL>
JAXJPEG_INLINE L ZigzagLanes(L d) {
  const L none = {}, one = none + 1.0;
  const L twice = reinterpret_cast<L>(reinterpret_cast<IL>(d + d) & ~(IL{} + INT64_MIN));
  return twice - reinterpret_cast<L>((d < none) & reinterpret_cast<IL>(one));
}

// Integral lanes z in [0, 2^52) as int64s: their bits once 2^52 is added.
template <class L, class IL>
JAXJPEG_INLINE IL Int64Lanes(L z) {
  const L two52 = L{} + kLargestCode;
  return reinterpret_cast<IL>(z + two52) - reinterpret_cast<IL>(two52);
}

// One value of StepBlockLanes past its last four.
JAXJPEG_INLINE bool StepOne(double v, double s, double w, double step, double center,
                            double& square, int64_t& folded) {
  if (!(std::fabs(s) < kFastLimit)) return false;
  const double code = (s + kShift) - kShift;
  const double error = code * step - v;
  square = error * error * w;
  folded = Zigzag(static_cast<int64_t>(code - center));
  return true;
}

// StepBlockExact four values at a time (the last m % 4 one at a time), in
// vectors L of doubles, IL of int64s and UL of uint64s (sums that wrap: a
// failed block sums garbage); false (nothing trusted) where a
// scaled value or the center is not under 2^49 (codes, their folding and
// sums are then exact in doubles; the sum stays under 2^61). `quotients`
// (or null): the values divided by a step of this one's mantissa, this
// step `factor` (a power of two) times finer: their products are the
// values' quotients by this step exactly (those under 2^-1022, which may
// differ in their last bits, round to 0 either way).
template <class L, class IL, class UL>
JAXJPEG_INLINE bool StepBlockLanes(const double* values, const double* weights, int64_t m,
                                   double step, const double* quotients, double factor,
                                   int64_t center, int64_t* folded, int64_t& sum, double& sse) {
  constexpr int kLanes = sizeof(L) / sizeof(double), kVectors = 4 / kLanes;
  const double c = static_cast<double>(center);
  if (!(std::fabs(c) < kFastLimit)) return false;
  IL ok = IL{} - 1;
  UL total = {};
  L squares[kVectors] = {};
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    for (int j = 0; j < kVectors; ++j) {
      const int64_t at = i + j * kLanes;
      const L v = LoadLanes<L>(values + at);
      const L s = quotients ? LoadLanes<L>(quotients + at) * factor : v / step;
      ok &= (s < kFastLimit) & (s > -kFastLimit);   // (NaN: false)
      const L code = (s + kShift) - kShift;          // half to even
      const L error = code * step - v;
      L square = error * error;
      if (weights) square *= LoadLanes<L>(weights + at);
      squares[j] += square;
      const IL f = Int64Lanes<L, IL>(ZigzagLanes<L, IL>(code - c));
      std::memcpy(folded + at, &f, sizeof(f));
      total += reinterpret_cast<UL>(f);
    }
  }
  double partial[4];   // the squares' sums of positions i % 4 == 0, 1, 2, 3
  uint64_t whole = 0;
  for (int lane = 0; lane < kLanes; ++lane) {
    if (!ok[lane]) return false;
    whole += total[lane];
    for (int j = 0; j < kVectors; ++j) partial[j * kLanes + lane] = squares[j][lane];
  }
  double rest = 0.0;
  for (; i < m; ++i) {
    double square;
    if (!StepOne(values[i], quotients ? quotients[i] * factor : values[i] / step,
                 weights ? weights[i] : 1.0, step, c, square, folded[i])) {
      return false;
    }
    rest += square;
    whole += static_cast<uint64_t>(folded[i]);
  }
  sum = static_cast<int64_t>(whole);
  sse = ((partial[0] + partial[2]) + (partial[1] + partial[3])) + rest;
  return true;
}

// CountBlockExact four values at a time (the last m % 4 one at a time),
// in vectors as StepBlockLanes (x / step as x times `inverse` where that is
// 1 / step exactly: the same correctly rounded quotient); false (`counts`
// untouched) where a scaled value or the center is not under 2^49.
template <class L, class IL, class UL>
JAXJPEG_INLINE bool CountBlockLanes(const double* x, const uint8_t* zero, int64_t m, double step,
                                    double inverse, int64_t center, int k, StepCounts& counts,
                                    int64_t* folded) {
  constexpr int kLanes = sizeof(L) / sizeof(double), kVectors = 4 / kLanes;
  const double c = static_cast<double>(center);
  if (!(std::fabs(c) < kFastLimit)) return false;
  const L none = {}, one = none + 1.0;
  IL ok = IL{} - 1;
  UL quotients = {};
  L lo = none + INFINITY, hi = none - INFINITY, largest = none;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    for (int j = 0; j < kVectors; ++j) {
      const int64_t at = i + j * kLanes;
      const L v = LoadLanes<L>(x + at);
      const L s = inverse ? v * inverse : v / step;
      ok &= (s < kFastLimit) & (s > -kFastLimit);   // (NaN: false)
      L code = (s + kShift) - kShift;                // half to even
      if (zero) {   // floored: one less where rounding went up
        IL flagged;
        for (int lane = 0; lane < kLanes; ++lane) flagged[lane] = zero[at + lane] ? -1 : 0;
        code -= reinterpret_cast<L>(flagged & (code > s) & reinterpret_cast<IL>(one));
      }
      lo = code < lo ? code : lo;
      hi = code > hi ? code : hi;
      const L z = ZigzagLanes<L, IL>(code - c);
      largest = z > largest ? z : largest;
      const IL f = Int64Lanes<L, IL>(z);
      quotients += reinterpret_cast<UL>(f) >> k;
      if (folded) std::memcpy(folded + at, &f, sizeof(f));
    }
  }
  StepCounts block = counts;
  uint64_t sum = static_cast<uint64_t>(block.quotients);
  for (int lane = 0; lane < kLanes && i > 0; ++lane) {   // (i > 0: every lane holds values)
    if (!ok[lane]) return false;
    block.lo = std::min(block.lo, static_cast<int64_t>(lo[lane]));
    block.hi = std::max(block.hi, static_cast<int64_t>(hi[lane]));
    block.largest = std::max(block.largest, static_cast<int64_t>(largest[lane]));
    sum += quotients[lane];
  }
  block.quotients = static_cast<int64_t>(sum);
  const bool rest_ok = i == m || CountBlockExact(x + i, zero ? zero + i : nullptr, m - i, step,
                                                 center, k, block, folded ? folded + i : nullptr);
  if (rest_ok) counts = block;
  return rest_ok;
}

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// Sums of folded[i] >> j (each >= 0) for the three widths j from `k`
// (those past 63 taken at 63), in one pass, wrapping past 2^63 as numpy's
// int64 sums do.
JAXJPEG_INLINE void QuotientSums(const int64_t* folded, int64_t n, int k, uint64_t sums[3]) {
  uint64_t a = 0, b = 0, c = 0;
  const int kb = std::min(k + 1, 63), kc = std::min(k + 2, 63);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t f = static_cast<uint64_t>(folded[i]);
    a += f >> k;
    b += f >> kb;
    c += f >> kc;
  }
  sums[0] = a;
  sums[1] = b;
  sums[2] = c;
}

// The Rice costs (bits) of `folded` (n) on width k and its neighbours in
// 0..max_rice into `cost`, unless `known` already.
JAXJPEG_INLINE void CostsAround(const int64_t* folded, int64_t n, int max_rice, int k,
                                __int128* cost, bool* known) {
  if (known[k]) return;
  const int lo = std::max(0, k - 1), hi = std::min(max_rice, k + 1);
  uint64_t sums[3];
  QuotientSums(folded, n, lo, sums);
  for (int j = lo; j <= hi; ++j) {
    cost[j] = static_cast<__int128>(static_cast<int64_t>(sums[j - lo])) +
              static_cast<__int128>(n) * (j + 1);
    known[j] = true;
  }
}

// The Rice walk of BestRiceParameter from the codes' `mean` (and the sum
// of their quotients on the width found, in `quotients` where given), a
// width's cost taken with its two neighbours' in one pass: a walk's first
// step needs all three (separate passes were most of a thin curve's step).
JAXJPEG_INLINE int RiceWalk(const int64_t* folded, int64_t n, int max_rice, double mean,
                            int64_t* quotients = nullptr) {
  max_rice = std::clamp(max_rice, 0, kMaxRiceWidth);
  __int128 cost[kMaxRiceWidth + 1];
  bool known[kMaxRiceWidth + 1] = {};
  int k = std::min(max_rice, std::max(0, static_cast<int>(std::log2(std::max(mean, 1.0)))));
  CostsAround(folded, n, max_rice, k, cost, known);
  for (int direction : {-1, 1}) {
    while (k + direction >= 0 && k + direction <= max_rice) {
      CostsAround(folded, n, max_rice, k + direction, cost, known);
      if (cost[k + direction] >= cost[k]) break;
      k += direction;
    }
  }
  if (quotients) *quotients = static_cast<int64_t>(cost[k] - static_cast<__int128>(n) * (k + 1));
  return k;
}

// RiceStepBytes, the fast pass given the values' `quotients` by a step of
// this one's mantissa `factor` times this step (or null: dividing).
template <class L, class IL, class UL>
JAXJPEG_INLINE int64_t StepBytesBody(const double* values, const double* weights, int64_t n,
                                     double step, const double* quotients, double factor,
                                     int64_t center, int max_rice, double& sse,
                                     int64_t* folded) {
  int64_t total = 0;
  sse = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const double* w = weights ? weights + start : nullptr;
    const double* q = quotients ? quotients + start : nullptr;
    int64_t sum;
    double block_sse;
    if (!StepBlockLanes<L, IL, UL>(values + start, w, m, step, q, factor, center,
                                   folded + start, sum, block_sse) &&
        !StepBlockExact(values + start, w, m, step, center, folded + start, sum, block_sse)) {
      return -1;
    }
    // (the folded codes are >= 0: the running sum passes 2^63 iff the total does)
    if (__builtin_add_overflow(total, sum, &total)) return -1;
    sse += block_sse;
  }
  // (the codes' sum fit: so does every sum of their quotients; their mean
  // as BestRiceParameter takes it, the sum exact in int64)
  int64_t quotient_sum;
  const int k = RiceWalk(folded, n, max_rice,
                         n ? static_cast<double>(total) / static_cast<double>(n) : 0.0,
                         &quotient_sum);
  if (quotient_sum > INT64_MAX - n - 7) return -1;
  return (quotient_sum + n + 7) / 8 + (n * k + 7) / 8;
}

int64_t StepBytesPortable(const double* values, const double* weights, int64_t n, double step,
                          const double* quotients, double factor, int64_t center, int max_rice,
                          double& sse, int64_t* folded) {
  return StepBytesBody<Lanes2, IntLanes2, SumLanes2>(values, weights, n, step, quotients, factor,
                                                     center, max_rice, sse, folded);
}

#if defined(JAXJPEG_X86_DISPATCH)
__attribute__((target("avx2"))) int64_t StepBytesAvx2(
    const double* values, const double* weights, int64_t n, double step,
    const double* quotients, double factor, int64_t center, int max_rice, double& sse,
    int64_t* folded) {
  return StepBytesBody<Lanes4, IntLanes4, SumLanes4>(values, weights, n, step, quotients, factor,
                                                     center, max_rice, sse, folded);
}
#endif

int64_t StepBytes(const double* values, const double* weights, int64_t n, double step,
                  const double* quotients, double factor, int64_t center, int max_rice,
                  double& sse, int64_t* folded, bool allow_avx2) {
#if defined(JAXJPEG_X86_DISPATCH)
  if (allow_avx2 && CpuHasAvx2()) {
    return StepBytesAvx2(values, weights, n, step, quotients, factor, center, max_rice, sse,
                         folded);
  }
#endif
  (void)allow_avx2;
  return StepBytesPortable(values, weights, n, step, quotients, factor, center, max_rice, sse,
                           folded);
}

// The values divided by up to kKeptMantissas steps of distinct mantissas:
// a thin curve's steps a quarter octave apart take four, and every other
// step scales one of them by a power of two instead of dividing again.
class StepQuotients {
 public:
  StepQuotients(const double* values, int64_t n) : values_(values), n_(n) {}

  // (quotients, factor) for `step`: quotients by a step of its mantissa
  // and the power of two that takes them to this step's; null where none
  // is kept (the values then divided in the pass).
  std::pair<const double*, double> For(double step) {
    int exponent;
    const double mantissa = std::frexp(step, &exponent);
    for (const Kept& kept : kept_) {
      const int shift = kept.exponent - exponent;
      // (|shift| bounded: the product of a quotient under 2^-1022 stays
      // under 2^-1022 times 2^shift, and rounds to 0 only while that does)
      if (kept.mantissa == mantissa && std::abs(shift) < 900) {
        return {kept.quotients.data(), std::ldexp(1.0, shift)};
      }
    }
    if (kept_.size() == kKeptMantissas) return {nullptr, 1.0};
    kept_.push_back({mantissa, exponent, std::vector<double>(static_cast<size_t>(n_))});
    double* q = kept_.back().quotients.data();
    for (int64_t i = 0; i < n_; ++i) q[i] = values_[i] / step;
    return {q, 1.0};
  }

 private:
  static constexpr size_t kKeptMantissas = 4;
  struct Kept {
    double mantissa;
    int exponent;
    std::vector<double> quotients;
  };
  const double* values_;
  int64_t n_;
  std::vector<Kept> kept_;
};

}  // namespace

int BestRiceParameter(const int64_t* folded, int64_t n, int max_rice) {
  __int128 total = 0;
  for (int64_t i = 0; i < n; ++i) total += folded[i];
  return RiceWalk(folded, n, max_rice,
                  n ? static_cast<double>(total) / static_cast<double>(n) : 0.0);
}

int64_t RiceStepBytes(const double* values, const double* weights, int64_t n, double step,
                      int64_t center, int max_rice, double& sse, int64_t* folded) {
  return StepBytes(values, weights, n, step, nullptr, 1.0, center, max_rice, sse, folded, true);
}

void RiceStepRates(const double* values, const double* weights, int64_t n,
                   const double* steps, const int64_t* centers, int64_t count, int max_rice,
                   int64_t* nbytes, double* sse, bool allow_avx2) {
  std::vector<int64_t> folded(static_cast<size_t>(n));
  StepQuotients quotients(values, n);
  for (int64_t i = 0; i < count; ++i) {
    sse[i] = 0.0;
    // (a center past 2^52 would wrap its folded codes)
    if (centers[i] <= -(int64_t{1} << 52) || centers[i] >= (int64_t{1} << 52)) {
      nbytes[i] = -1;
      continue;
    }
    const auto [q, factor] = quotients.For(steps[i]);
    nbytes[i] = StepBytes(values, weights, n, steps[i], q, factor, centers[i], max_rice,
                          sse[i], folded.data(), allow_avx2);
  }
}

// CountStepCodes, a block at a time in lanes of L where it can.
template <class L, class IL, class UL>
JAXJPEG_INLINE bool CountStepCodesBody(const double* x, const uint8_t* zero, int64_t n,
                                       double step, int64_t center, int k, StepCounts& counts,
                                       int64_t* folded) {
  const double inverse = ExactInverse(step);
  counts = {INT64_MAX, INT64_MIN, 0, 0};
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const uint8_t* z = zero ? zero + start : nullptr;
    int64_t* out = folded ? folded + start : nullptr;
    if (!CountBlockLanes<L, IL, UL>(x + start, z, m, step, inverse, center, k, counts, out) &&
        !CountBlockExact(x + start, z, m, step, center, k, counts, out)) {
      return false;
    }
  }
  return true;
}

bool CountStepCodesPortable(const double* x, const uint8_t* zero, int64_t n, double step,
                            int64_t center, int k, StepCounts& counts, int64_t* folded) {
  return CountStepCodesBody<Lanes2, IntLanes2, SumLanes2>(x, zero, n, step, center, k, counts,
                                                          folded);
}

#if defined(JAXJPEG_X86_DISPATCH)
__attribute__((target("avx2"))) bool CountStepCodesAvx2(
    const double* x, const uint8_t* zero, int64_t n, double step, int64_t center, int k,
    StepCounts& counts, int64_t* folded) {
  return CountStepCodesBody<Lanes4, IntLanes4, SumLanes4>(x, zero, n, step, center, k, counts,
                                                          folded);
}
#endif

bool CountStepCodes(const double* x, const uint8_t* zero, int64_t n, double step,
                    int64_t center, int k, StepCounts& counts, int64_t* folded,
                    bool allow_avx2) {
#if defined(JAXJPEG_X86_DISPATCH)
  if (allow_avx2 && CpuHasAvx2()) {
    return CountStepCodesAvx2(x, zero, n, step, center, k, counts, folded);
  }
#endif
  (void)allow_avx2;
  return CountStepCodesPortable(x, zero, n, step, center, k, counts, folded);
}

namespace {

// The 64 bits of `data` (`bytes` long) from bit `pos`, most significant
// first: 64 - (pos & 7) of them read, the rest (and any past the end) 0.
inline uint64_t Window(const uint8_t* data, int64_t bytes, int64_t pos) {
  const int64_t at = pos >> 3;
  uint64_t w = 0;
  if (at + 8 <= bytes) {
    std::memcpy(&w, data + at, 8);
    w = __builtin_bswap64(w);
  } else {
    for (int64_t i = at; i < at + 8; ++i) w = (w << 8) | (i < bytes ? data[i] : 0);
  }
  return w << (pos & 7);
}

// The `k` (1..62) bits of `data` from bit `pos` (inside it).
inline uint64_t BitsAt(const uint8_t* data, int64_t bytes, int64_t pos, int k) {
  if (k <= 56) return Window(data, bytes, pos) >> (64 - k);
  const int high = k - 32;
  return (Window(data, bytes, pos) >> (64 - high)) << 32 |
         Window(data, bytes, pos + high) >> 32;
}

}  // namespace

RiceStatus DecodeRice(const uint8_t* unary, int64_t unary_bytes, int64_t& unary_bit,
                      const uint8_t* remainders, int64_t remainder_bytes,
                      int64_t& remainder_bit, int k, int64_t max_quotient, int64_t n,
                      int64_t* folded) {
  const int64_t unary_bits = 8 * unary_bytes;
  const int64_t remainder_bits = 8 * remainder_bytes;
  for (int64_t i = 0; i < n; ++i) {
    int64_t q = 0;   // ones up to the next zero, a window at a time
    for (;;) {
      const int64_t left = unary_bits - unary_bit;
      if (left <= 0) return RiceStatus::kShortUnary;
      const int64_t read = std::min<int64_t>(64 - (unary_bit & 7), left);
      const uint64_t zeros = ~Window(unary, unary_bytes, unary_bit);
      const int64_t ones = zeros ? __builtin_clzll(zeros) : 64;
      if (ones < read) {   // the zero lies inside what was read
        q += ones;
        unary_bit += ones + 1;
        break;
      }
      q += read;
      unary_bit += read;
      if (q >= max_quotient) return RiceStatus::kLongQuotient;
    }
    if (q >= max_quotient) return RiceStatus::kLongQuotient;
    // a code past int64 is too long too (found by review: q << k wrapped to 0)
    if (k && (q >> (63 - k)) != 0) return RiceStatus::kLongQuotient;
    uint64_t r = 0;
    if (k) {
      // (as a difference: remainder_bit + k overflowed for a position near 2^63)
      if (k > remainder_bits - remainder_bit) return RiceStatus::kShortRemainders;
      r = BitsAt(remainders, remainder_bytes, remainder_bit, k);
      remainder_bit += k;
    }
    folded[i] = static_cast<int64_t>((static_cast<uint64_t>(q) << k) | r);
  }
  return RiceStatus::kOk;
}

RiceStatus DecodeRiceSteps(const uint8_t* unary, int64_t unary_bytes, int64_t& unary_bit,
                           const uint8_t* remainders, int64_t remainder_bytes,
                           int64_t& remainder_bit, int k, int64_t max_quotient, int64_t n,
                           bool zigzag, int64_t center, double step, double* values) {
  constexpr int64_t kPiece = 2048;   // codes decoded, then scaled, a piece at a time
  int64_t folded[kPiece];
  const double c = static_cast<double>(center);
  for (int64_t done = 0; done < n; done += kPiece) {
    const int64_t m = std::min(kPiece, n - done);
    const RiceStatus status = DecodeRice(unary, unary_bytes, unary_bit, remainders,
                                         remainder_bytes, remainder_bit, k, max_quotient, m,
                                         folded);
    if (status != RiceStatus::kOk) return status;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t f = folded[i];
      const int64_t code = zigzag ? Unzigzag(f) : f;
      values[done + i] = (static_cast<double>(code) + c) * step;
    }
  }
  return RiceStatus::kOk;
}

}  // namespace jaxjpeg
