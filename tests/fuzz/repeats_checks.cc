// The byte planes' repeat counter (xla_ops/repeats.cc) on random buffers,
// built with -fsanitize=address,undefined by
// tests/test_robustness.py::test_repeat_counter_under_sanitizers: each
// buffer on the heap at exactly its size (AddressSanitizer sees any read
// past it), every count against a plain reference of the same greedy pass.
// Prints "repeat checks: N buffers, 0 failures" and exits 0 when all hold.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "repeats.h"

namespace {

int failures = 0;

void Expect(bool ok, const char* what, int trial) {
  if (!ok && failures++ < 10) std::fprintf(stderr, "trial %d: %s\n", trial, what);
}

// CountRepeats' pass written plainly: byte by byte, no word loads.
jaxjpeg::RepeatCount Reference(const uint8_t* d, int64_t n, int min_match) {
  jaxjpeg::RepeatCount count;
  if (n < 4) return count;
  std::vector<int64_t> last(1 << 15, -1);
  int64_t i = 0, misses = 0;
  while (i <= n - 4) {
    const uint32_t word = d[i] | d[i + 1] << 8 | d[i + 2] << 16 | uint32_t{d[i + 3]} << 24;
    const uint32_t h = (word * 2654435761u) >> 17;
    const int64_t candidate = last[h];
    last[h] = i;
    bool run = true, same = candidate >= 0;
    for (int j = 0; j < 4; ++j) {
      run = run && d[i + j] == d[i];
      same = same && d[candidate + j] == d[i + j];
    }
    if (candidate < 0 || i - candidate < 2 || i - candidate > 32768 || run || !same) {
      const int64_t skip = 1 + (misses++ >> 6);
      i += skip < 32 ? skip : 32;
      continue;
    }
    int64_t length = 4;
    while (length < 258 && i + length < n && d[candidate + length] == d[i + length]) ++length;
    if (length < min_match) {   // passed over, counted as a miss
      const int64_t skip = misses++ >> 6;
      i += length + (skip < 31 ? skip : 31);
      continue;
    }
    count.bytes[length >= 8] += length;
    ++count.matches[length >= 8];
    misses = 0;
    i += length;
  }
  return count;
}

}  // namespace

int main() {
  std::mt19937_64 rng(11);
  const int64_t sizes[] = {0, 1, 3, 4, 5, 258, 4096, 40000, 70001, 300000};
  const int kTrials = 400;
  int64_t matched = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    const int64_t n = sizes[rng() % 10];
    const int64_t period = 2 + static_cast<int64_t>(rng() % 40000);
    const int alphabet = 1 + static_cast<int>(rng() % 256);
    std::unique_ptr<uint8_t[]> data(new uint8_t[static_cast<size_t>(n)]);
    for (int64_t i = 0; i < n; ++i) {   // noise, or a stretch repeating at `period`
      const bool repeat = trial % 3 == 1 && i >= period && (i / 1000) % 3 != 0;
      data[i] = repeat ? data[i - period] : static_cast<uint8_t>(rng() % alphabet);
    }
    const int min_match = trial % 2 ? jaxjpeg::kRepeatLongMatch : jaxjpeg::kRepeatMinMatch;
    const jaxjpeg::RepeatCount got = jaxjpeg::CountRepeats(data.get(), n, min_match);
    const jaxjpeg::RepeatCount want = Reference(data.get(), n, min_match);
    Expect(min_match == jaxjpeg::kRepeatMinMatch || got.matches[0] == 0,
           "a short match counted where only long ones are", trial);
    for (int kind = 0; kind < 2; ++kind) {
      Expect(got.bytes[kind] == want.bytes[kind] && got.matches[kind] == want.matches[kind],
             "counts differ", trial);
      Expect(got.matches[kind] * (kind ? 8 : 4) <= got.bytes[kind] &&
                 got.bytes[kind] <= (kind ? 258 : 7) * got.matches[kind],
             "counts out of range", trial);
      matched += got.bytes[kind];
    }
    Expect(got.bytes[0] + got.bytes[1] <= n, "more bytes than the buffer", trial);
  }
  Expect(matched > 0, "no repeat met in any buffer", -1);
  Expect(jaxjpeg::CountRepeats(nullptr, 100).matches[1] == 0, "a null buffer counted", -1);
  std::printf("repeat checks: %d buffers, %d failures\n", kTrials, failures);
  return failures ? 1 : 0;
}
