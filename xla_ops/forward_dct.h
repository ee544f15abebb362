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

#include "cpu_features.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(JAXJPEG_X86_DISPATCH)
#include <immintrin.h>  // AVX2 code, compiled with target attributes
#endif

namespace jaxjpeg {

// Zig-zag index -> index in the transposed coefficients of
// ForwardDct8x8Transposed (natural v*8+u -> u*8+v).
struct ZigzagTransposedTable {
  uint8_t index[64];
  constexpr ZigzagTransposedTable() : index() {
    for (int k = 0; k < 64; ++k) {
      const int natural = kZigzagHost[k];
      index[k] = static_cast<uint8_t>((natural % 8) * 8 + natural / 8);
    }
  }
};
inline constexpr ZigzagTransposedTable kZigzagToTransposed;

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
// transposed: F(v,u) at u*8+v (the transpose of natural order: the quantizer
// reads the coefficients in zig-zag order anyway, so the transform leaves
// out the transpose back), scaled as in T.81.
// Columns first (four at a time, as Float4 lanes), then rows after a
// transpose.
JJ_INLINE void ForwardDct8x8Transposed(const DctBasis& dct, const float block[64],
                                       float transposed[64]) {
  Float4 half[2][8];
  for (int h = 0; h < 2; ++h) {
    for (int y = 0; y < 8; ++y) half[h][y] = LoadFloat4(block + y * 8 + 4 * h);
    Dct8(dct, half[h]);  // half[h][v]: F over y, columns 4h..4h+3
  }
  Transpose8x8(half);    // half[h][x]: rows 4h..4h+3 of each column x
  for (int h = 0; h < 2; ++h) {
    Dct8(dct, half[h]);  // half[h][u]: F(v,u) for v = 4h..4h+3
    for (int u = 0; u < 8; ++u) StoreFloat4(transposed + u * 8 + 4 * h, half[h][u]);
  }
}

#if defined(JAXJPEG_X86_DISPATCH)
// ForwardDct8x8Transposed with eight lanes (one AVX register per row): each
// lane's operations are the same, in the same order (products, then sums left
// to right; no FMA), so the coefficients have the same bits.
__attribute__((target("avx2"))) inline void Dct8Avx2(const DctBasis& dct, __m256 x[8]) {
  __m256 sum[4], difference[4];
  for (int i = 0; i < 4; ++i) {
    sum[i] = _mm256_add_ps(x[i], x[7 - i]);
    difference[i] = _mm256_sub_ps(x[i], x[7 - i]);
  }
  for (int u = 0; u < 8; u += 2) {
    const __m256* in = sum;
    for (int parity = 0; parity < 2; ++parity, in = difference) {
      const float* b = dct.basis[u + parity];
      __m256 total = _mm256_mul_ps(_mm256_set1_ps(b[0]), in[0]);
      for (int i = 1; i < 4; ++i) total = _mm256_add_ps(total, _mm256_mul_ps(_mm256_set1_ps(b[i]), in[i]));
      x[u + parity] = total;
    }
  }
}

__attribute__((target("avx2"))) inline void Transpose8x8Avx2(__m256 r[8]) {
  __m256 t[8], q[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    q[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    q[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    q[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    q[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(q[i], q[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(q[i], q[i + 4], 0x31);
  }
}

// rows[y]: row y of the block (overwritten).
__attribute__((target("avx2"))) inline void ForwardDct8x8TransposedAvx2(
    const DctBasis& dct, __m256 rows[8], float transposed[64]) {
  Dct8Avx2(dct, rows);        // rows[v]: F over y, all columns
  Transpose8x8Avx2(rows);     // rows[x]: column x
  Dct8Avx2(dct, rows);        // rows[u]: F(v,u), v = 0..7
  for (int u = 0; u < 8; ++u) _mm256_storeu_ps(transposed + u * 8, rows[u]);
}

__attribute__((target("avx2"))) inline void ForwardDct8x8TransposedAvx2(
    const DctBasis& dct, const float block[64], float transposed[64]) {
  __m256 rows[8];
  for (int y = 0; y < 8; ++y) rows[y] = _mm256_loadu_ps(block + y * 8);
  ForwardDct8x8TransposedAvx2(dct, rows, transposed);
}
#endif

// One block's coefficients in natural order, F(v,u) at v*8+u, from the AVX2
// or (allow_avx2 false, or a CPU without AVX2) the portable transform: what
// tests compare.
inline void ForwardDct8x8(const float block[64], float coefficients[64], bool allow_avx2) {
  alignas(32) float transposed[64];
#if defined(JAXJPEG_X86_DISPATCH)
  if (allow_avx2 && CpuHasAvx2()) {
    ForwardDct8x8TransposedAvx2(ForwardDctBasis(), block, transposed);
  } else {
    ForwardDct8x8Transposed(ForwardDctBasis(), block, transposed);
  }
#else
  (void)allow_avx2;
  ForwardDct8x8Transposed(ForwardDctBasis(), block, transposed);
#endif
  for (int v = 0; v < 8; ++v) {
    for (int u = 0; u < 8; ++u) coefficients[v * 8 + u] = transposed[u * 8 + v];
  }
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_FORWARD_DCT_H_
