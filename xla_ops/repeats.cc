#include "repeats.h"

#include <algorithm>
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
    if (length < min_match) {   // passed over, counted as a miss
      i += length + std::min<int64_t>(misses++ >> 6, kLongestSkip - 1);
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

}  // namespace jaxjpeg
