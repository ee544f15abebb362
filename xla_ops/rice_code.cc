#include "rice_code.h"

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

}  // namespace jaxjpeg
