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

#include "jpeg_defs.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

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

JJ_INLINE Float4 LoadFloat4(const float* p) {
  Float4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

JJ_INLINE void StoreFloat4(float* p, Float4 v) { std::memcpy(p, &v, sizeof(v)); }

// The 8-point DCT of x[0..7] (four independent lanes), in place:
// x[u] <- sum_i basis[u][i] x[i]. Even frequencies are symmetric in i and
// odd ones antisymmetric, so the sums and differences of mirrored inputs
// halve the products (32 instead of 64), with the same basis values.
JJ_INLINE void Dct8(const DctBasis& dct, Float4 x[8]) {
  Float4 sum[4], difference[4];
  for (int i = 0; i < 4; ++i) {
    sum[i] = x[i] + x[7 - i];
    difference[i] = x[i] - x[7 - i];
  }
  for (int u = 0; u < 8; u += 2) {
    const Float4* in = sum;
    for (int parity = 0; parity < 2; ++parity, in = difference) {
      const float* b = dct.basis[u + parity];
      x[u + parity] = b[0] * in[0] + b[1] * in[1] + b[2] * in[2] + b[3] * in[3];
    }
  }
}

// Transposes the 4x4 block held in rows[0..3] (row r holds lanes 0..3).
JJ_INLINE void Transpose4(Float4 rows[4]) {
#if defined(__SSE__)
  __m128 r0 = rows[0], r1 = rows[1], r2 = rows[2], r3 = rows[3];
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  rows[0] = r0;
  rows[1] = r1;
  rows[2] = r2;
  rows[3] = r3;
#else
  Float4 t[4];
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 4; ++c) t[c][r] = rows[r][c];
  }
  for (int r = 0; r < 4; ++r) rows[r] = t[r];
#endif
}

// An 8x8 block as two halves of four columns each: half[h][y] holds
// columns 4h..4h+3 of row y. Transposed in place by 4x4 quarters.
JJ_INLINE void Transpose8x8(Float4 half[2][8]) {
  for (int h = 0; h < 2; ++h) {
    Transpose4(half[h]);
    Transpose4(half[h] + 4);
  }
  for (int i = 0; i < 4; ++i) {  // swap the off-diagonal quarters
    const Float4 t = half[0][4 + i];
    half[0][4 + i] = half[1][i];
    half[1][i] = t;
  }
}

// block: 64 centered samples (sample - 2^(bits-1)), row-major.
// coefficients: F(v,u) at v*8+u (natural order), scaled as in T.81.
// Columns first (four at a time, as Float4 lanes), then rows after a
// transpose, then back to row-major order.
JJ_INLINE void ForwardDct8x8(const DctBasis& dct, const float block[64], float coefficients[64]) {
  Float4 half[2][8];
  for (int h = 0; h < 2; ++h) {
    for (int y = 0; y < 8; ++y) half[h][y] = LoadFloat4(block + y * 8 + 4 * h);
    Dct8(dct, half[h]);  // half[h][v]: F over y, columns 4h..4h+3
  }
  Transpose8x8(half);    // half[h][x]: rows 4h..4h+3 of each column x
  for (int h = 0; h < 2; ++h) Dct8(dct, half[h]);
  Transpose8x8(half);
  for (int h = 0; h < 2; ++h) {
    for (int v = 0; v < 8; ++v) StoreFloat4(coefficients + v * 8 + 4 * h, half[h][v]);
  }
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_FORWARD_DCT_H_
