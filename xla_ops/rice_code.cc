#include "rice_code.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

namespace jaxjpeg {
namespace {

// Bits written most significant first through a 64-bit accumulator.
class BitSink {
 public:
  BitSink(std::vector<uint8_t>& out, PendingBits start) : out_(out) {
    acc_ = start.bits;
    count_ = start.count;
  }

  // The `n` (<= 32) low bits of `bits`.
  void Put(uint64_t bits, int n) {
    acc_ = (acc_ << n) | (bits & ((uint64_t{1} << n) - 1));
    count_ += n;
    while (count_ >= 8) {
      count_ -= 8;
      out_.push_back(static_cast<uint8_t>(acc_ >> count_));
    }
    acc_ &= (uint64_t{1} << count_) - 1;
  }

  PendingBits Pending() const { return {static_cast<uint32_t>(acc_), count_}; }

 private:
  std::vector<uint8_t>& out_;
  uint64_t acc_;
  int count_;
};

}  // namespace

void AppendUnary(const int64_t* quotients, int64_t n, PendingBits& pending,
                 std::vector<uint8_t>& out) {
  BitSink sink(out, pending);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t ones = quotients[i]; ones > 0; ones -= 32) {
      const int run = ones < 32 ? static_cast<int>(ones) : 32;
      sink.Put(~uint64_t{0}, run);
    }
    sink.Put(0, 1);
  }
  pending = sink.Pending();
}

void AppendRemainders(const int64_t* values, int64_t n, int k, std::vector<uint8_t>& out) {
  BitSink sink(out, PendingBits{});
  const int high = k > 32 ? k - 32 : 0;   // Put takes 32 bits at most
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = static_cast<uint64_t>(values[i]);
    if (high) sink.Put(v >> 32, high);
    sink.Put(v, k - high);
  }
  const PendingBits rest = sink.Pending();
  if (rest.count) sink.Put(0, 8 - rest.count);
}

namespace {

// Bits of the Rice coding of `folded` on parameter k, less n (k + 1).
int64_t QuotientBits(const int64_t* folded, int64_t n, int k) {
  int64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += folded[i] >> k;
  return sum;
}

}  // namespace

int64_t RiceStepBytes(const double* values, const double* weights, int64_t n, double step,
                      int64_t center, int max_rice, double* squares, int64_t* folded) {
  constexpr double kLargestCode = 4503599627370496.0;  // 2^52
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double code = std::nearbyint(values[i] / step);
    if (!(std::fabs(code) < kLargestCode)) return -1;
    const double error = code * step - values[i];
    squares[i] = weights ? error * error * weights[i] : error * error;
    const int64_t c = static_cast<int64_t>(code) - center;
    folded[i] = static_cast<int64_t>(static_cast<uint64_t>(c) << 1) ^ (c >> 63);
    if (__builtin_add_overflow(total, folded[i], &total)) return -1;
  }
  // the walk of quantized_vectors._rice_parameter: the cost is convex in k
  const double mean = n ? static_cast<double>(total) / static_cast<double>(n) : 0.0;
  int k = std::min(max_rice, std::max(0, static_cast<int>(std::log2(std::max(mean, 1.0)))));
  // (the codes' sum fit: so does every sum of their quotients)
  std::map<int, int64_t> known{{k, QuotientBits(folded, n, k) + n * (k + 1)}};
  for (int direction : {-1, 1}) {
    while (k + direction >= 0 && k + direction <= max_rice) {
      const int next = k + direction;
      if (!known.count(next)) known[next] = QuotientBits(folded, n, next) + n * (next + 1);
      if (known[next] >= known[k]) break;
      k = next;
    }
  }
  const int64_t quotients = QuotientBits(folded, n, k);
  if (quotients > INT64_MAX - n - 7) return -1;
  return (quotients + n + 7) / 8 + (n * k + 7) / 8;
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
