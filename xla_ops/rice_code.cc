#include "rice_code.h"

#include <algorithm>
#include <cmath>
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
    total += folded[i];
  }
  // the walk of quantized_vectors._rice_parameter: the cost is convex in k
  const double mean = n ? static_cast<double>(total) / static_cast<double>(n) : 0.0;
  int k = std::min(max_rice, std::max(0, static_cast<int>(std::log2(std::max(mean, 1.0)))));
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
  return (quotients + n + 7) / 8 + (n * k + 7) / 8;
}

}  // namespace jaxjpeg
