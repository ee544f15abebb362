// Adler-32 (RFC 1950 8.2), the checksum a zlib stream ends with: restore
// checks it over the byte planes it inflates, taken while their bytes are
// written out a value apart (jaxjpeg.layout: one pass over a piece, where
// numpy's scatter and zlib's adler32 took two, 40% of a float32 leaf's
// restore on one core). Host-only, header-only C++17.
//
// Adler32(Adler32(1, a), b) == Adler32(1, a + b).
#ifndef JAXJPEG_ADLER32_H_
#define JAXJPEG_ADLER32_H_

#include <algorithm>
#include <cstdint>

namespace jaxjpeg {

constexpr uint32_t kAdlerBase = 65521;
// The most bytes summed before the running sums must be reduced: 255 n (n +
// 1) / 2 + (n + 1) (kAdlerBase - 1) stays under 2^32 (zlib's NMAX).
constexpr int64_t kAdlerRun = 5552;

// The Adler-32 of `adler`'s bytes followed by `n` bytes from `data`, each
// also stored to out[k * stride] where `out` is not null.
inline uint32_t ScatterAdler32(uint32_t adler, const uint8_t* data, int64_t n, uint8_t* out,
                               int64_t stride) {
  uint32_t low = adler & 0xFFFF, high = adler >> 16;
  while (n > 0) {
    const int64_t run = std::min(n, kAdlerRun);
    int64_t k = 0;
    // Eight bytes a step: `high` gains 8 low plus the bytes weighted 8..1,
    // so the sums wait on one another once a step, not once a byte.
    for (; k + 8 <= run; k += 8) {
      uint32_t sum = 0, weighted = 0;
      for (int j = 0; j < 8; ++j) {
        const uint32_t byte = data[k + j];
        sum += byte;
        weighted += byte * static_cast<uint32_t>(8 - j);
        if (out) out[(k + j) * stride] = data[k + j];
      }
      high += 8 * low + weighted;
      low += sum;
    }
    for (; k < run; ++k) {
      low += data[k];
      high += low;
      if (out) out[k * stride] = data[k];
    }
    low %= kAdlerBase;
    high %= kAdlerBase;
    data += run;
    if (out) out += run * stride;
    n -= run;
  }
  return high << 16 | low;
}

// The Adler-32 of `adler`'s bytes followed by `n` bytes from `data`.
inline uint32_t Adler32(uint32_t adler, const uint8_t* data, int64_t n) {
  return ScatterAdler32(adler, data, n, nullptr, 0);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_ADLER32_H_
