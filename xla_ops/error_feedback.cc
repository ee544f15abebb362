#include "error_feedback.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_features.h"

namespace jaxjpeg {
namespace {

// Orthonormal 8-point DCT-II basis in double, [frequency][position].
struct Basis {
  double at[8][8];
  Basis() {
    const double pi = 3.14159265358979323846;
    for (int u = 0; u < 8; ++u) {
      const double scale = u == 0 ? std::sqrt(0.125) : 0.5;
      for (int x = 0; x < 8; ++x) at[u][x] = scale * std::cos((2 * x + 1) * u * pi / 16.0);
    }
  }
};

const Basis& DctBasis64() {
  static const Basis basis;
  return basis;
}

// Inlined into both builds below (an AVX2 one and the portable one), which
// give the same bits: -ffp-contract=off keeps multiplies and adds apart, and
// vectorising across independent sums does not reorder any of them.
#define JJ_FEEDBACK_INLINE inline __attribute__((always_inline))

// out = B in B^T (forward) or B^T in B (inverse), 8x8 row-major.
JJ_FEEDBACK_INLINE void Transform(const double in[8][8], bool inverse, double out[8][8]) {
  const auto& b = DctBasis64().at;
  double half[8][8];
  for (int i = 0; i < 8; ++i) {      // half = in B^T (rows) or in B
    for (int v = 0; v < 8; ++v) {
      double sum = 0.0;
      for (int j = 0; j < 8; ++j) sum += in[i][j] * (inverse ? b[j][v] : b[v][j]);
      half[i][v] = sum;
    }
  }
  for (int u = 0; u < 8; ++u) {      // out = B half (columns) or B^T half
    for (int v = 0; v < 8; ++v) {
      double sum = 0.0;
      for (int i = 0; i < 8; ++i) sum += (inverse ? b[i][u] : b[u][i]) * half[i][v];
      out[u][v] = sum;
    }
  }
}

JJ_FEEDBACK_INLINE void RestoreStripBody(const double* strip, size_t rows, size_t width,
                                         size_t stride, const double* table, int bits,
                                         double* out) {
  if (rows == 0 || width == 0) return;
  const double level = static_cast<double>(1 << (bits - 1));
  const double top = static_cast<double>((1 << bits) - 1);
  for (size_t r0 = 0; r0 < rows; r0 += 8) {
    double block[8][8], coef[8][8], restored[8][8];
    for (size_t i = 0; i < 8; ++i) {
      const size_t r = std::min(r0 + i, rows - 1);   // edge rows repeat the last
      for (size_t j = 0; j < 8; ++j) block[i][j] = strip[r * stride + std::min(j, width - 1)] - level;
    }
    Transform(block, false, coef);
    for (int u = 0; u < 8; ++u) {
      for (int v = 0; v < 8; ++v) {
        const double q = table[8 * u + v];
        const double c = coef[u][v] / q;
        coef[u][v] = std::trunc(c + std::copysign(0.5, c)) * q;
      }
    }
    Transform(coef, true, restored);
    for (size_t i = 0; i < 8 && r0 + i < rows; ++i) {
      for (size_t j = 0; j < width; ++j) {
        out[(r0 + i) * stride + j] = std::clamp(std::nearbyint(restored[i][j] + level), 0.0, top);
      }
    }
  }
}

JJ_FEEDBACK_INLINE void ShapeRankOneBody(double* samples, size_t rows, size_t inputs,
                                         const double* table, int bits, const double* w,
                                         const double* carriers) {
  const double top = static_cast<double>((1 << bits) - 1);
  std::vector<double> carried(rows, 0.0), clipped(rows * 8), restored(rows * 8);
  for (size_t g0 = 0; g0 < inputs; g0 += 8) {
    const size_t width = std::min<size_t>(8, inputs - g0);
    for (size_t r = 0; r < rows; ++r) {
      double* s = samples + r * inputs + g0;
      for (size_t j = 0; j < width; ++j) {
        s[j] -= carried[r] * w[g0 + j];
        clipped[r * 8 + j] = std::clamp(s[j], 0.0, top);
      }
    }
    RestoreStripBody(clipped.data(), rows, width, 8, table, bits, restored.data());
    for (size_t r = 0; r < rows; ++r) {
      double* s = samples + r * inputs + g0;
      double moved = 0.0;
      for (size_t j = 0; j < width; ++j) {
        moved += (s[j] - restored[r * 8 + j]) * carriers[g0 + j];
        s[j] = clipped[r * 8 + j];
      }
      carried[r] += moved;
    }
  }
}

void ShapeRankOnePortable(double* samples, size_t rows, size_t inputs, const double* table,
                          int bits, const double* w, const double* carriers) {
  ShapeRankOneBody(samples, rows, inputs, table, bits, w, carriers);
}

#if defined(JAXJPEG_X86_DISPATCH)
// 1.6-1.7x the portable build's speed (SSE2 moves two doubles at a time).
__attribute__((target("avx2"))) void ShapeRankOneAvx2(double* samples, size_t rows,
                                                      size_t inputs, const double* table,
                                                      int bits, const double* w,
                                                      const double* carriers) {
  ShapeRankOneBody(samples, rows, inputs, table, bits, w, carriers);
}
#endif

}  // namespace

void RestoreStrip(const double* strip, size_t rows, size_t width, size_t stride,
                  const double* table, int bits, double* out) {
  RestoreStripBody(strip, rows, width, stride, table, bits, out);
}

void ShapeRankOne(double* samples, size_t rows, size_t inputs, const double* table, int bits,
                  const double* w, const double* carriers, bool avx2) {
#if defined(JAXJPEG_X86_DISPATCH)
  if (avx2 && CpuHasAvx2()) {
    ShapeRankOneAvx2(samples, rows, inputs, table, bits, w, carriers);
    return;
  }
#endif
  ShapeRankOnePortable(samples, rows, inputs, table, bits, w, carriers);
}

}  // namespace jaxjpeg
