// The quantized vectors' native Rice code (xla_ops/rice_code.cc) on random
// vectors, built with -fsanitize=address,undefined and without -fwrapv by
// tests/test_robustness.py::test_rice_code_under_sanitizers: every count
// (four values at a time on the portable and AVX2 passes, or one) against a
// plain reference, every coding packed, decoded back and cut short.
// Exactly-sized heap buffers, so AddressSanitizer sees any read or write past
// one; UBSan any signed overflow. Prints "rice checks: N vectors, 0 failures" and exits 0 when
// every check holds.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "rice_code.h"

namespace {

using jaxjpeg::StepCounts;

int failures = 0;

void Expect(bool ok, const char* what, int trial) {
  if (!ok && failures++ < 10) std::fprintf(stderr, "trial %d: %s\n", trial, what);
}

// CountStepCodes' answer computed plainly (nearbyint rounds half to even in
// the default mode).
bool Reference(const std::vector<double>& x, const std::vector<uint8_t>* zero, double step,
               int64_t center, int k, StepCounts& counts, std::vector<int64_t>& folded) {
  counts = {INT64_MAX, INT64_MIN, 0, 0};
  uint64_t quotients = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double scaled = x[i] / step;
    const double code = zero && (*zero)[i] ? std::floor(scaled) : std::nearbyint(scaled);
    if (!(std::fabs(code) < 4503599627370496.0)) return false;
    const int64_t c = static_cast<int64_t>(code);
    counts.lo = std::min(counts.lo, c);
    counts.hi = std::max(counts.hi, c);
    const int64_t d = c - center;
    const int64_t f = d < 0 ? -2 * d - 1 : 2 * d;
    counts.largest = std::max(counts.largest, f);
    quotients += static_cast<uint64_t>(f) >> k;
    folded[i] = f;
  }
  counts.quotients = static_cast<int64_t>(quotients);
  return true;
}

// Packs `folded` on parameter k, decodes it back, then decodes every
// stream cut short (which must stop with an error, inside the buffers).
void RoundTrip(const std::vector<int64_t>& folded, int k, int trial) {
  const int64_t n = static_cast<int64_t>(folded.size());
  std::vector<int64_t> quotients(folded.size());
  for (size_t i = 0; i < folded.size(); ++i) quotients[i] = folded[i] >> k;
  std::vector<uint8_t> unary, remainders;
  jaxjpeg::PendingBits pending;
  jaxjpeg::AppendUnary(quotients.data(), n, pending, unary);
  if (pending.count) {
    const int pad = 8 - pending.count;
    unary.push_back(static_cast<uint8_t>((pending.bits << pad) | ((1u << pad) - 1)));
  }
  if (k) jaxjpeg::AppendRemainders(folded.data(), n, k, remainders);
  for (size_t cut : {unary.size(), unary.size() / 2, size_t{0}}) {
    std::vector<uint8_t> u(unary.begin(), unary.begin() + static_cast<int64_t>(cut));
    std::vector<uint8_t> r(remainders);
    std::vector<int64_t> back(folded.size());
    int64_t unary_bit = 0, remainder_bit = 0;
    const jaxjpeg::RiceStatus status =
        jaxjpeg::DecodeRice(u.data(), static_cast<int64_t>(u.size()), unary_bit, r.data(),
                            static_cast<int64_t>(r.size()), remainder_bit, k, int64_t{1} << 20,
                            n, back.data());
    if (cut == unary.size()) {
      Expect(status == jaxjpeg::RiceStatus::kOk && back == folded, "decoded codes differ", trial);
    } else if (n && cut < unary.size()) {
      Expect(status != jaxjpeg::RiceStatus::kOk, "a stream cut short decoded", trial);
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  const int64_t sizes[] = {0, 1, 2, 3, 511, 512, 513, 1025, 4000};
  const double scales[] = {1e-3, 1.0, 40.0, 5e14, 2e15, 1e16};
  const double steps[] = {1.0, 0.015625, 0.3, 3.7, 1e-300, 1e300};
  const int64_t centers[] = {0, 3, -7, int64_t{1} << 48, -(int64_t{1} << 50)};
  const int kTrials = 4000;
  for (int trial = 0; trial < kTrials; ++trial) {
    const int64_t n = sizes[rng() % 9];
    const double scale = scales[rng() % 6], step = steps[rng() % 6];
    const int64_t center = centers[rng() % 5];
    const int k = static_cast<int>(rng() % 24);
    std::vector<double> x(static_cast<size_t>(n));
    for (double& v : x) v = (trial % 3 == 1 ? std::round(2 * normal(rng)) / 2 : normal(rng)) * scale;
    std::vector<uint8_t> zero(static_cast<size_t>(n));
    for (uint8_t& z : zero) z = rng() % 5 == 0;
    const std::vector<uint8_t>* flags = trial % 2 ? &zero : nullptr;

    StepCounts got, want;
    std::vector<int64_t> folded(x.size()), expected(x.size());
    const bool want_range = Reference(x, flags, step, center, k, want, expected);
    for (const bool avx2 : {true, false}) {   // both passes
      const bool in_range = jaxjpeg::CountStepCodes(x.data(), flags ? zero.data() : nullptr, n,
                                                    step, center, k, got, folded.data(), avx2);
      Expect(in_range == want_range, "range differs", trial);
      if (in_range && want_range) {
        Expect(got.lo == want.lo && got.hi == want.hi && got.largest == want.largest &&
                   got.quotients == want.quotients && folded == expected,
               "counts differ", trial);
        if ((got.largest >> k) < (int64_t{1} << 20)) RoundTrip(folded, k, trial);
      }
    }

    std::vector<double> weights(x.size(), 0.5);
    std::vector<int64_t> scratch(x.size());
    double sse = 0.0;
    const int64_t nbytes = jaxjpeg::RiceStepBytes(x.data(), trial % 4 ? weights.data() : nullptr,
                                                  n, step, center, 40, sse, scratch.data());
    Expect(nbytes >= -1, "negative bytes", trial);
    if (nbytes >= 0 && !flags) {
      const int best = jaxjpeg::BestRiceParameter(scratch.data(), n, 40);
      Expect(best >= 0 && best <= 40, "parameter out of range", trial);
    }
    // a ladder of steps a quarter octave apart, divided once a mantissa, on
    // both passes: the same figures as the steps one at a time
    const double ladder[6] = {step, step * 0.8408964152537145, step / 2, step / 4,
                              step * 0.8408964152537145 / 8, step * 1024};
    const int64_t centers[6] = {center, center, center, center, center, center};
    int64_t by_ladder[2][6];
    double ladder_sse[2][6];
    for (int avx2 = 0; avx2 < 2; ++avx2) {
      jaxjpeg::RiceStepRates(x.data(), nullptr, n, ladder, centers, 6, 40, by_ladder[avx2],
                             ladder_sse[avx2], avx2 == 1);
    }
    for (int i = 0; i < 6; ++i) {
      double one_sse = 0.0;
      const int64_t one = jaxjpeg::RiceStepBytes(x.data(), nullptr, n, ladder[i], center, 40,
                                                 one_sse, scratch.data());
      Expect(by_ladder[0][i] == one && by_ladder[1][i] == one, "ladder bytes differ", trial);
      Expect(one < 0 || (ladder_sse[0][i] == ladder_sse[1][i] &&
                         std::fabs(ladder_sse[0][i] - one_sse) <= 1e-9 * one_sse),
             "ladder errors differ", trial);
    }
  }
  std::printf("rice checks: %d vectors, %d failures\n", kTrials, failures);
  return failures ? 1 : 0;
}
