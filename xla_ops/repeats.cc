#include "repeats.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace jaxjpeg {
namespace {

static_assert(kRepeatMinMatch == 4, "HashOf and IsRun read 4 bytes");
constexpr int kHashBits = 15;
constexpr int64_t kWindow = 32768;   // deflate's: the farthest back a match reaches
constexpr int64_t kLongestMatch = 258;
constexpr int64_t kLongestSkip = 32;

uint32_t HashOf(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, sizeof word);
  return (word * 2654435761u) >> (32 - kHashBits);   // Knuth's multiplicative hash
}

// Whether the kRepeatMinMatch (4) bytes at `p` are one byte repeated.
bool IsRun(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, sizeof word);
  return word == p[0] * 0x01010101u;
}

}  // namespace

RepeatCount CountRepeats(const uint8_t* data, int64_t n, int min_match) {
  RepeatCount count;
  if (data == nullptr || n < kRepeatMinMatch) return count;
  std::vector<int64_t> last(size_t{1} << kHashBits, -1);   // last position of each hash
  const int64_t end = n - kRepeatMinMatch;   // the last position a match may start at
  int64_t i = 0, misses = 0;
  while (i <= end) {
    const uint32_t h = HashOf(data + i);
    const int64_t candidate = last[h];
    last[h] = i;
    const int64_t distance = i - candidate;
    if (candidate < 0 || distance < 2 || distance > kWindow || IsRun(data + i) ||
        std::memcmp(data + candidate, data + i, kRepeatMinMatch) != 0) {
      // past a run of misses, positions are skipped, more the longer it
      // is (as LZ4 does): noise is crossed fast, and a long stretch of
      // repeats is still met (one match sets the pace back)
      i += std::min<int64_t>(1 + (misses++ >> 6), kLongestSkip);
      continue;
    }
    int64_t length = kRepeatMinMatch;
    while (length < kLongestMatch && i + length < n &&
           data[candidate + length] == data[i + length]) {
      ++length;
    }
    if (length < min_match) {
      i += std::min<int64_t>(1 + (misses++ >> 6), kLongestSkip);
      continue;
    }
    const int kind = length >= kRepeatLongMatch;
    count.bytes[kind] += length;
    ++count.matches[kind];
    misses = 0;
    i += length;
  }
  return count;
}

namespace {

constexpr int kDependenceWindows = 4;

// Sum of c log2 c over `counts`.
template <typename Count>
double CountLogCount(const Count* counts, int n) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) {
    if (counts[i] > 1) sum += static_cast<double>(counts[i]) * std::log2(counts[i]);
  }
  return sum;
}

}  // namespace

double SequentialDependence(const uint8_t* data, int64_t n) {
  if (data == nullptr || n < 2) return 1.0;
  // kDependenceWindows windows spread over data (all of it where small)
  const bool whole = n <= kDependenceSample;
  const int windows = whole ? 1 : kDependenceWindows;
  const int64_t length = whole ? n : kDependenceSample / kDependenceWindows;
  std::vector<uint32_t> pairs(size_t{1} << 16, 0);
  uint32_t firsts[256] = {};
  int64_t total = 0;
  for (int w = 0; w < windows; ++w) {
    const int64_t start = windows == 1 ? 0 : (n - length) / (windows - 1) * w;
    for (int64_t i = start + 1; i < start + length; ++i) {
      ++pairs[data[i - 1] << 8 | data[i]];
      ++firsts[data[i - 1]];
      ++total;
    }
  }
  // H(X) = log2 N - Σ c log2 c / N; H(Y | X) = H(X, Y) - H(X)
  const double log_total = std::log2(static_cast<double>(total));
  const double order0 = log_total - CountLogCount(firsts, 256) / total;
  const double joint = log_total - CountLogCount(pairs.data(), 1 << 16) / total;
  if (order0 <= 0.0) return 1.0;
  return std::clamp(1.0 - (joint - order0) / order0, 0.0, 1.0);
}

}  // namespace jaxjpeg
