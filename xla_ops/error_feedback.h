// Error feedback's inner loop (host only): see jaxjpeg/feedback.py.
//
// Feedback codes a leaf's inputs eight at a time (a column of 8x8 blocks)
// and moves each group's rounding error onto the inputs not yet coded. With
// the BatchNorm prior's diagonal-plus-rank-one covariance every such update
// is rank one, so one number per row carries it; the loop over groups is
// sequential and short, which is why it is native (in numpy it cost most of
// a default save of a BatchNorm network).
#ifndef JAXJPEG_ERROR_FEEDBACK_H_
#define JAXJPEG_ERROR_FEEDBACK_H_

#include <cstddef>

namespace jaxjpeg {

// What the codec restores of a strip of samples [rows, width <= 8] (row
// stride `stride`), written to `out` (same shape and stride): the
// orthonormal DCT of each 8x8 block (edge blocks padded by repeating the
// last row and column, as the encoder does) less the level shift, divided
// by `table` (64 steps, [vertical][horizontal] frequency) and rounded half
// away from zero; restored by the inverse DCT, rounded half to even and
// clamped to [0, 2^bits - 1] as the decoder does.
void RestoreStrip(const double* strip, size_t rows, size_t width, size_t stride,
                  const double* table, int bits, double* out);

// Feedback against diag + v v^T on `samples` [rows, inputs] (row-major, in
// place): before group g is coded its samples lose carried[r] * w[j]; after
// it, carried[r] += sum_j (sample - restored) * carriers[j]; the samples are
// left clamped to [0, 2^bits - 1] (the encoder quantizes them). `w` and
// `carriers` have `inputs` entries (jaxjpeg.feedback.RankOneFactor).
// avx2=false: the portable build even where the CPU has AVX2 (the same bits;
// for tests).
void ShapeRankOne(double* samples, size_t rows, size_t inputs, const double* table, int bits,
                  const double* w, const double* carriers, bool avx2 = true);

}  // namespace jaxjpeg

#endif  // JAXJPEG_ERROR_FEEDBACK_H_
