// Quantization tables for the encoder (host only). All tables are in natural
// (row-major) order; the DQT writer reorders them to zig-zag.
#ifndef JAXJPEG_QUANT_TABLES_H_
#define JAXJPEG_QUANT_TABLES_H_

#include <cstdint>

namespace jaxjpeg {

// ITU T.81 Annex K, Table K.1 (luminance), natural order.
inline constexpr uint16_t kAnnexKLuminance[64] = {
    16, 11, 10, 16, 24,  40,  51,  61,   //
    12, 12, 14, 19, 26,  58,  60,  55,   //
    14, 13, 16, 24, 40,  57,  69,  56,   //
    14, 17, 22, 29, 51,  87,  80,  62,   //
    18, 22, 37, 56, 68,  109, 103, 77,   //
    24, 35, 55, 64, 81,  104, 113, 92,   //
    49, 64, 78, 87, 103, 121, 120, 101,  //
    72, 92, 95, 98, 112, 100, 103, 99,
};

// Largest step the quality helpers produce: 8-bit (baseline) DQT entries are
// one byte; for 12-bit the limit matches libjpeg's.
inline constexpr int MaxScaledQuantStep(int bits) { return bits == 12 ? 32767 : 255; }

inline constexpr int ClampQuantStep(long step, int bits) {
  return step < 1 ? 1 : (step > MaxScaledQuantStep(bits) ? MaxScaledQuantStep(bits) : static_cast<int>(step));
}

// libjpeg's quality convention: quality (clamped to 1..100) -> percentage
// applied to the reference table.
inline constexpr int QualityToPercent(int quality) {
  quality = quality < 1 ? 1 : (quality > 100 ? 100 : quality);
  return quality < 50 ? 5000 / quality : 200 - 2 * quality;
}

// Annex K luminance table scaled for `quality`; bits is 8 or 12.
inline void QualityScaledTable(int quality, int bits, uint16_t table[64]) {
  const long percent = QualityToPercent(quality);
  for (int i = 0; i < 64; ++i) {
    table[i] = static_cast<uint16_t>(ClampQuantStep((kAnnexKLuminance[i] * percent + 50) / 100, bits));
  }
}

// Same step everywhere: because the DCT is orthonormal this is plain uniform
// quantization of the coefficients, the natural choice for weights.
inline void FlatTable(int step, int bits, uint16_t table[64]) {
  const uint16_t clamped = static_cast<uint16_t>(ClampQuantStep(step, bits));
  for (int i = 0; i < 64; ++i) table[i] = clamped;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_QUANT_TABLES_H_
