// Forward DCT of one 8x8 block (host only).
//
// A separable matrix product in float32: its rounding error (about 1e-7 of
// the block's range) is thousands of times below the smallest quantization
// step a weight tile uses, and every loop runs over 8 contiguous floats, so
// it is written for 4-wide SIMD (two SSE2 registers per row). The basis
// itself is computed in double and rounded once.
#ifndef JAXJPEG_FORWARD_DCT_H_
#define JAXJPEG_FORWARD_DCT_H_

#include <cmath>
#include <cstring>

namespace jaxjpeg {

// Orthonormal 8-point DCT-II basis, basis[u][x] = C(u)/2 cos((2x+1)u pi/16)
// with C(0) = 1/sqrt(2), C(u) = 1 otherwise. With it the 2-D DCT of T.81
// A.3.3, F(v,u) = 1/4 C(u)C(v) sum_y sum_x f(y,x) cos(..u..) cos(..v..), is the
// product F = B f B^T.
struct DctBasis {
  alignas(32) float basis[8][8];       // [frequency][position]
  alignas(32) float transposed[8][8];  // [position][frequency]

  DctBasis() {
    const double pi = 3.14159265358979323846;
    for (int u = 0; u < 8; ++u) {
      const double scale = u == 0 ? 0.5 / std::sqrt(2.0) : 0.5;
      for (int x = 0; x < 8; ++x) {
        basis[u][x] = static_cast<float>(scale * std::cos((2 * x + 1) * u * pi / 16.0));
        transposed[x][u] = basis[u][x];
      }
    }
  }
};

inline const DctBasis& ForwardDctBasis() {
  static const DctBasis kBasis;
  return kBasis;
}

// Four floats in one SIMD register wherever the target has one (GCC/Clang
// vector extension: SSE on x86-64, NEON on ARM, scalar code elsewhere).
typedef float Float4 __attribute__((vector_size(16)));

inline Float4 LoadFloat4(const float* p) {
  Float4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreFloat4(float* p, Float4 v) { std::memcpy(p, &v, sizeof(v)); }

// block: 64 centered samples (sample - 2^(bits-1)), row-major.
// coefficients: F(v,u) at v*8+u (natural order), scaled as in T.81.
// Each row of 8 values is two Float4; both passes accumulate whole rows.
inline void ForwardDct8x8(const DctBasis& dct, const float block[64], float coefficients[64]) {
  Float4 low[8], high[8];  // row pass: [y] holds sum_x f(y,x) basis[u][x], u = 0..3, 4..7
  for (int y = 0; y < 8; ++y) {
    Float4 a = {0.0f, 0.0f, 0.0f, 0.0f}, b = a;
    for (int x = 0; x < 8; ++x) {
      const float sample = block[y * 8 + x];
      a += sample * LoadFloat4(dct.transposed[x]);
      b += sample * LoadFloat4(dct.transposed[x] + 4);
    }
    low[y] = a;
    high[y] = b;
  }
  for (int v = 0; v < 8; ++v) {
    Float4 a = {0.0f, 0.0f, 0.0f, 0.0f}, b = a;
    for (int y = 0; y < 8; ++y) {
      const float weight = dct.basis[v][y];
      a += weight * low[y];
      b += weight * high[y];
    }
    StoreFloat4(coefficients + v * 8, a);
    StoreFloat4(coefficients + v * 8 + 4, b);
  }
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_FORWARD_DCT_H_
