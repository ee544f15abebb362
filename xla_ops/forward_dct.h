// Accurate forward DCT of one 8x8 block (host only).
//
// Weights, not pictures, are coded here, so the transform favours accuracy
// over libjpeg's fixed-point shortcuts: a separable matrix product in double
// precision. It is still cheap next to entropy coding, and its fixed-size
// loops vectorize.
#ifndef JAXJPEG_FORWARD_DCT_H_
#define JAXJPEG_FORWARD_DCT_H_

#include <cmath>

namespace jaxjpeg {

// Orthonormal 8-point DCT-II basis, basis[u][x] = C(u)/2 cos((2x+1)u pi/16)
// with C(0) = 1/sqrt(2), C(u) = 1 otherwise. With it the 2-D DCT of T.81
// A.3.3, F(v,u) = 1/4 C(u)C(v) sum_y sum_x f(y,x) cos(..u..) cos(..v..), is the
// product F = B f B^T.
struct DctBasis {
  double basis[8][8];       // [frequency][position]
  double transposed[8][8];  // [position][frequency]

  DctBasis() {
    const double pi = 3.14159265358979323846;
    for (int u = 0; u < 8; ++u) {
      const double scale = u == 0 ? 0.5 / std::sqrt(2.0) : 0.5;
      for (int x = 0; x < 8; ++x) {
        basis[u][x] = scale * std::cos((2 * x + 1) * u * pi / 16.0);
        transposed[x][u] = basis[u][x];
      }
    }
  }
};

inline const DctBasis& ForwardDctBasis() {
  static const DctBasis kBasis;
  return kBasis;
}

// block: 64 centered samples (sample - 2^(bits-1)), row-major.
// coefficients: F(v,u) at v*8+u (natural order), scaled as in T.81.
// Both passes accumulate whole rows so the innermost loop runs over 8
// contiguous values.
inline void ForwardDct8x8(const DctBasis& dct, const double block[64],
                          double coefficients[64]) {
  double rows[64];  // rows[y*8+u] = sum_x f(y,x) basis[u][x]
  for (int y = 0; y < 8; ++y) {
    double* row = rows + y * 8;
    for (int u = 0; u < 8; ++u) row[u] = 0.0;
    for (int x = 0; x < 8; ++x) {
      const double sample = block[y * 8 + x];
      for (int u = 0; u < 8; ++u) row[u] += sample * dct.transposed[x][u];
    }
  }
  for (int v = 0; v < 8; ++v) {
    double* out = coefficients + v * 8;
    for (int u = 0; u < 8; ++u) out[u] = 0.0;
    for (int y = 0; y < 8; ++y) {
      const double weight = dct.basis[v][y];
      for (int u = 0; u < 8; ++u) out[u] += weight * rows[y * 8 + u];
    }
  }
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_FORWARD_DCT_H_
