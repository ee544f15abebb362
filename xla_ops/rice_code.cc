#include "rice_code.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

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

// Sum of folded[i] >> k (each >= 0), wrapping past 2^63 as numpy's int64
// sum does; unsigned shifts, which the compiler vectorizes (half the time).
int64_t QuotientSum(const int64_t* folded, int64_t n, int k) {
  uint64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<uint64_t>(folded[i]) >> k;
  return static_cast<int64_t>(sum);
}

// x rounded half to even (the default rounding mode): the 2^52 + 2^51
// trick inline where it is exact, else nearbyint (a call: most of a pass).
inline double RoundHalfEven(double x) {
  constexpr double kShift = 6755399441055744.0;  // 2^52 + 2^51
  if (std::fabs(x) < 2251799813685248.0) return (x + kShift) - kShift;  // |x| < 2^51
  return std::nearbyint(x);
}

constexpr double kLargestCode = 4503599627370496.0;  // 2^52

}  // namespace

int BestRiceParameter(const int64_t* folded, int64_t n, int max_rice) {
  __int128 total = 0;
  for (int64_t i = 0; i < n; ++i) total += folded[i];
  const double mean = n ? static_cast<double>(total) / static_cast<double>(n) : 0.0;
  const auto cost = [&](int k) {
    return static_cast<__int128>(QuotientSum(folded, n, k)) + static_cast<__int128>(n) * (k + 1);
  };
  int k = std::min(max_rice, std::max(0, static_cast<int>(std::log2(std::max(mean, 1.0)))));
  std::map<int, __int128> known{{k, cost(k)}};
  for (int direction : {-1, 1}) {
    while (k + direction >= 0 && k + direction <= max_rice) {
      const int next = k + direction;
      if (!known.count(next)) known[next] = cost(next);
      if (known[next] >= known[k]) break;
      k = next;
    }
  }
  return k;
}

int64_t RiceStepBytes(const double* values, const double* weights, int64_t n, double step,
                      int64_t center, int max_rice, double* squares, int64_t* folded) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double code = RoundHalfEven(values[i] / step);
    if (!(std::fabs(code) < kLargestCode)) return -1;
    const double error = code * step - values[i];
    squares[i] = weights ? error * error * weights[i] : error * error;
    const int64_t c = static_cast<int64_t>(code) - center;
    folded[i] = static_cast<int64_t>(static_cast<uint64_t>(c) << 1) ^ (c >> 63);
    if (__builtin_add_overflow(total, folded[i], &total)) return -1;
  }
  // (the codes' sum fit: so does every sum of their quotients)
  const int k = BestRiceParameter(folded, n, max_rice);
  const int64_t quotients = QuotientSum(folded, n, k);
  if (quotients > INT64_MAX - n - 7) return -1;
  return (quotients + n + 7) / 8 + (n * k + 7) / 8;
}

bool CountStepCodes(const double* x, const uint8_t* zero, int64_t n, double step,
                    int64_t center, int k, StepCounts& counts, int64_t* folded) {
  int64_t lo = INT64_MAX, hi = INT64_MIN, largest = 0;
  uint64_t quotients = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double scaled = x[i] / step;
    const double code = zero && zero[i] ? std::floor(scaled) : RoundHalfEven(scaled);
    if (!(std::fabs(code) < kLargestCode)) return false;
    const int64_t c = static_cast<int64_t>(code);
    lo = std::min(lo, c);
    hi = std::max(hi, c);
    const int64_t d = c - center;   // |center| < 2^52: no overflow
    const int64_t f = static_cast<int64_t>(static_cast<uint64_t>(d) << 1) ^ (d >> 63);
    largest = std::max(largest, f);
    quotients += static_cast<uint64_t>(f >> k);
    if (folded) folded[i] = f;
  }
  counts = {lo, hi, largest, static_cast<int64_t>(quotients)};
  return true;
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
    uint64_t r = 0;
    if (k) {
      if (remainder_bit + k > remainder_bits) return RiceStatus::kShortRemainders;
      r = BitsAt(remainders, remainder_bytes, remainder_bit, k);
      remainder_bit += k;
    }
    folded[i] = static_cast<int64_t>((static_cast<uint64_t>(q) << k) | r);
  }
  return RiceStatus::kOk;
}

}  // namespace jaxjpeg
