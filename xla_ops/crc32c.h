// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the
// jaxjpeg container format. Host-only, header-only C++17.
//
// Crc32c(b, Crc32c(a)) == Crc32c(a + b), and Crc32c(nullptr, 0, c) == c.
// x86-64 CPUs with SSE4.2 use the crc32 instruction, chosen at run time so the
// header builds without -msse4.2; everything else uses slicing-by-8 tables.
#ifndef JAXJPEG_CRC32C_H_
#define JAXJPEG_CRC32C_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && \
    !defined(__CUDACC__)
#define JAXJPEG_CRC32C_HAVE_SSE42_PATH 1
#include <nmmintrin.h>
#endif

namespace jaxjpeg {
namespace crc32c_detail {

constexpr uint32_t kPolynomial = 0x82F63B78u;

// table[k][b]: the CRC state after byte b followed by k zero bytes.
struct SlicingTables {
  uint32_t table[8][256];
};

constexpr SlicingTables MakeSlicingTables() {
  SlicingTables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
    t.table[0][b] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (int b = 0; b < 256; ++b) {
      const uint32_t prev = t.table[k - 1][b];
      t.table[k][b] = (prev >> 8) ^ t.table[0][prev & 0xFF];
    }
  }
  return t;
}

inline constexpr SlicingTables kTables = MakeSlicingTables();

// Both update functions work on the inverted state (no pre/post inversion).
inline uint32_t UpdateByte(uint32_t state, uint8_t byte) {
  return kTables.table[0][(state ^ byte) & 0xFF] ^ (state >> 8);
}

inline uint32_t UpdateSoftware(const uint8_t* p, size_t n, uint32_t state) {
  const auto& t = kTables.table;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // memcpy: no alignment or aliasing assumptions
    word ^= state;
    state = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^
            t[5][(word >> 16) & 0xFF] ^ t[4][(word >> 24) & 0xFF] ^
            t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^
            t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
  }
#endif
  for (; n > 0; ++p, --n) state = UpdateByte(state, *p);
  return state;
}

#if defined(JAXJPEG_CRC32C_HAVE_SSE42_PATH)
__attribute__((target("sse4.2"))) inline uint32_t UpdateSse42(
    const uint8_t* p, size_t n, uint32_t state) {
#if defined(__x86_64__)
  uint64_t wide = state;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    wide = _mm_crc32_u64(wide, word);
  }
  state = static_cast<uint32_t>(wide);
#endif
  for (; n >= 4; p += 4, n -= 4) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    state = _mm_crc32_u32(state, word);
  }
  for (; n > 0; ++p, --n) state = _mm_crc32_u8(state, *p);
  return state;
}

inline bool CpuHasSse42() {
  static const bool has = [] {
    __builtin_cpu_init();  // needed if first called before static constructors
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return has;
}
#endif

}  // namespace crc32c_detail

// CRC-32C of data[0, n), continuing from `crc` (the CRC of the bytes before).
inline uint32_t Crc32c(const uint8_t* data, size_t n, uint32_t crc = 0) {
  if (n == 0) return crc;
  const uint32_t state = ~crc;
#if defined(JAXJPEG_CRC32C_HAVE_SSE42_PATH)
  if (crc32c_detail::CpuHasSse42()) {
    return ~crc32c_detail::UpdateSse42(data, n, state);
  }
#endif
  return ~crc32c_detail::UpdateSoftware(data, n, state);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_CRC32C_H_
