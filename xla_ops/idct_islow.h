// Accurate integer inverse DCT, bit-exact with libjpeg-turbo's default method
// (JDCT_ISLOW: the Loeffler-Ligtenberg-Moschytz algorithm with 13-bit fixed
// point constants, as in IJG's jidctint.c), written from T.81 A.3.3 and the
// published algorithm. Bit-exactness is what lets CPU, GPU and any other JPEG
// decoder agree on every weight.
#ifndef JAXJPEG_IDCT_ISLOW_H_
#define JAXJPEG_IDCT_ISLOW_H_

#include <type_traits>

#include "jpeg_defs.h"

namespace jaxjpeg {
namespace idct {

constexpr int kConstBits = 13;
// cos-derived constants, round(x * 2^13).
constexpr int32_t k0_298631336 = 2446;
constexpr int32_t k0_390180644 = 3196;
constexpr int32_t k0_541196100 = 4433;
constexpr int32_t k0_765366865 = 6270;
constexpr int32_t k0_899976223 = 7373;
constexpr int32_t k1_175875602 = 9633;
constexpr int32_t k1_501321110 = 12299;
constexpr int32_t k1_847759065 = 15137;
constexpr int32_t k1_961570560 = 16069;
constexpr int32_t k2_053119869 = 16819;
constexpr int32_t k2_562915447 = 20995;
constexpr int32_t k3_072711026 = 25172;

// x >> n, arithmetic: the 8-bit accumulator is unsigned (wrapping), but its
// bits are a two's-complement value and descaling keeps its sign.
template <typename Acc>
JJ_HD JJ_INLINE Acc ShiftRight(Acc x, int n) {
  return static_cast<Acc>(static_cast<std::make_signed_t<Acc>>(x) >> n);
}

template <typename Acc>
JJ_HD JJ_INLINE Acc Descale(Acc x, int n) {
  return ShiftRight<Acc>(x + (Acc(1) << (n - 1)), n);
}

// One 8-point 1-D inverse DCT, outputs descaled by `shift` bits. `in` and
// `out` are strided views so the same code serves columns and rows.
template <typename Acc>
JJ_HD JJ_INLINE void Idct1D(Acc x0, Acc x1, Acc x2, Acc x3, Acc x4, Acc x5, Acc x6, Acc x7,
                            int shift, Acc out[8]) {
  // Even part: x0, x2, x4, x6.
  const Acc z1 = (x2 + x6) * k0_541196100;
  const Acc t2 = z1 - x6 * k1_847759065;
  const Acc t3 = z1 + x2 * k0_765366865;
  const Acc t0 = (x0 + x4) * (Acc(1) << kConstBits);
  const Acc t1 = (x0 - x4) * (Acc(1) << kConstBits);
  const Acc e10 = t0 + t3, e13 = t0 - t3, e11 = t1 + t2, e12 = t1 - t2;
  // Odd part: x7, x5, x3, x1.
  const Acc s1 = x7 + x1, s2 = x5 + x3, s3 = x7 + x3, s4 = x5 + x1;
  const Acc z5 = (s3 + s4) * k1_175875602;
  const Acc m1 = s1 * -k0_899976223, m2 = s2 * -k2_562915447;
  const Acc m3 = s3 * -k1_961570560 + z5, m4 = s4 * -k0_390180644 + z5;
  const Acc o0 = x7 * k0_298631336 + m1 + m3;
  const Acc o1 = x5 * k2_053119869 + m2 + m4;
  const Acc o2 = x3 * k3_072711026 + m2 + m3;
  const Acc o3 = x1 * k1_501321110 + m1 + m4;
  out[0] = Descale<Acc>(e10 + o3, shift);
  out[7] = Descale<Acc>(e10 - o3, shift);
  out[1] = Descale<Acc>(e11 + o2, shift);
  out[6] = Descale<Acc>(e11 - o2, shift);
  out[2] = Descale<Acc>(e12 + o1, shift);
  out[5] = Descale<Acc>(e12 - o1, shift);
  out[3] = Descale<Acc>(e13 + o0, shift);
  out[4] = Descale<Acc>(e13 - o0, shift);
}

// libjpeg's post-IDCT range limit: the descaled value is masked to
// 4 * 2^bits entries, then clamped; values that wrap the mask wrap the same
// way libjpeg-turbo's table lookup does.
template <int kBits>
JJ_HD JJ_INLINE int RangeLimit(int32_t x) {
  constexpr int kMax = (1 << kBits) - 1, kCenter = 1 << (kBits - 1);
  const int i = x & (4 * (kMax + 1) - 1);
  if (i < kCenter) return i + kCenter;
  if (i < 2 * (kMax + 1)) return kMax;
  if (i < 4 * (kMax + 1) - kCenter) return 0;
  return i - (4 * (kMax + 1) - kCenter);
}

}  // namespace idct

// Traits of a sample precision: 8-bit uses 32-bit arithmetic like
// libjpeg-turbo's SIMD code (enough for every coefficient a conforming 8-bit
// stream can carry). A hostile stream may overflow it, so it is unsigned: the
// sums wrap by the language's rules on the host and the GPU alike, where
// signed overflow would be undefined and the device compiler may assume it
// never happens. 12-bit needs 64 bits like libjpeg's JLONG (it cannot
// overflow: its inputs are 32-bit).
template <int kBits>
struct IdctTraits;
template <>
struct IdctTraits<8> {
  using Acc = uint32_t;
  static constexpr int kPass1Bits = 2;
};
template <>
struct IdctTraits<12> {
  using Acc = int64_t;
  static constexpr int kPass1Bits = 1;
};

namespace idct {

// Pass 2 output for one sample: descale by `shift` bits and range-limit, with
// the +2^(bits-1) level shift folded into the rounding constant. Equal to
// RangeLimit<kBits>(Descale(x, shift)) for every x (all arithmetic wraps, and
// the result only depends on the low bits), but branch-free so it vectorizes:
// t = level-shifted value masked to 4 * 2^bits entries, then t < 2^bits is a
// sample, t < 2 * 2^bits + 2^(bits-1) clamps to the maximum, the rest to 0.
template <int kBits, typename Acc>
JJ_HD JJ_INLINE int32_t DescaleToSample(Acc x, int shift) {
  constexpr int32_t kMax = (1 << kBits) - 1, kCenter = 1 << (kBits - 1);
  const Acc rounded = x + ((Acc(1) << (shift - 1)) + (Acc(kCenter) << shift));
  const int32_t t = static_cast<int32_t>(ShiftRight<Acc>(rounded, shift)) & (4 * (kMax + 1) - 1);
  const int32_t high = t < 2 * (kMax + 1) + kCenter ? kMax : 0;
  return t <= kMax ? t : high;
}

}  // namespace idct

// The IDCT's column pass (pass 1) over a block in natural order, element i
// at in[i * kStride]: the host keeps a block in a plain array (stride 1), the
// GPU in a column of a shared array, one column per thread. kDequantize:
// `in` holds quantized values, multiplied by `quant` here as the host's
// decoder does on the store (32-bit product, wrapping: the same bits). The
// pass may run in place (ws == in): each column is read whole before it is
// written. Without data-dependent branches, so the host compiler turns it
// into SIMD code (all 8 columns at once). libjpeg's zero-column and zero-row
// shortcuts are not needed: they give the same results as the full
// computation.
template <int kBits, int kStride, bool kDequantize>
JJ_HD JJ_INLINE void IdctColumns(const int32_t* in, const int32_t* quant, int32_t* ws) {
  using Acc = typename IdctTraits<kBits>::Acc;
  constexpr int kPass1 = IdctTraits<kBits>::kPass1Bits;
  JJ_UNROLL
  for (int c = 0; c < 8; ++c) {
    Acc x[8];
    JJ_UNROLL
    for (int r = 0; r < 8; ++r) {
      const int n = 8 * r + c;
      x[r] = kDequantize ? Acc(static_cast<int32_t>(static_cast<uint32_t>(in[n * kStride]) *
                                                    static_cast<uint32_t>(quant[n])))
                         : Acc(in[n * kStride]);
    }
    Acc out[8];
    idct::Idct1D<Acc>(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7],
                      idct::kConstBits - kPass1, out);
    JJ_UNROLL
    for (int r = 0; r < 8; ++r) ws[(r * 8 + c) * kStride] = static_cast<int32_t>(out[r]);
  }
}

// The row pass (pass 2): workspace rows to samples 0..2^bits-1, row-major,
// same layout as IdctColumns; may run in place (samples == ws).
template <int kBits, int kStride>
JJ_HD JJ_INLINE void IdctRows(const int32_t* ws, int32_t* samples) {
  using Acc = typename IdctTraits<kBits>::Acc;
  constexpr int kShift2 = idct::kConstBits + IdctTraits<kBits>::kPass1Bits + 3;
  JJ_UNROLL
  for (int r = 0; r < 8; ++r) {
    const int32_t* w = ws + r * 8 * kStride;
    // Pass 2 without descaling (shift 0 is not allowed by Descale): compute
    // the raw sums, then descale and range-limit each.
    const Acc x0 = w[0], x1 = w[kStride], x2 = w[2 * kStride], x3 = w[3 * kStride],
              x4 = w[4 * kStride], x5 = w[5 * kStride], x6 = w[6 * kStride],
              x7 = w[7 * kStride];
    const Acc z1 = (x2 + x6) * idct::k0_541196100;
    const Acc t2 = z1 - x6 * idct::k1_847759065;
    const Acc t3 = z1 + x2 * idct::k0_765366865;
    const Acc t0 = (x0 + x4) * (Acc(1) << idct::kConstBits);
    const Acc t1 = (x0 - x4) * (Acc(1) << idct::kConstBits);
    const Acc e10 = t0 + t3, e13 = t0 - t3, e11 = t1 + t2, e12 = t1 - t2;
    const Acc s1 = x7 + x1, s2 = x5 + x3, s3 = x7 + x3, s4 = x5 + x1;
    const Acc z5 = (s3 + s4) * idct::k1_175875602;
    const Acc m1 = s1 * -idct::k0_899976223, m2 = s2 * -idct::k2_562915447;
    const Acc m3 = s3 * -idct::k1_961570560 + z5, m4 = s4 * -idct::k0_390180644 + z5;
    const Acc o0 = x7 * idct::k0_298631336 + m1 + m3;
    const Acc o1 = x5 * idct::k2_053119869 + m2 + m4;
    const Acc o2 = x3 * idct::k3_072711026 + m2 + m3;
    const Acc o3 = x1 * idct::k1_501321110 + m1 + m4;
    int32_t* row = samples + r * 8 * kStride;
    row[0] = idct::DescaleToSample<kBits>(e10 + o3, kShift2);
    row[7 * kStride] = idct::DescaleToSample<kBits>(e10 - o3, kShift2);
    row[1 * kStride] = idct::DescaleToSample<kBits>(e11 + o2, kShift2);
    row[6 * kStride] = idct::DescaleToSample<kBits>(e11 - o2, kShift2);
    row[2 * kStride] = idct::DescaleToSample<kBits>(e12 + o1, kShift2);
    row[5 * kStride] = idct::DescaleToSample<kBits>(e12 - o1, kShift2);
    row[3 * kStride] = idct::DescaleToSample<kBits>(e13 + o0, kShift2);
    row[4 * kStride] = idct::DescaleToSample<kBits>(e13 - o0, kShift2);
  }
}

// The sample every position of a block with only a DC coefficient gets
// (`dc` dequantized): what IdctColumns and IdctRows compute for such a block.
template <int kBits>
JJ_HD JJ_INLINE int32_t DcOnlySample(int64_t dc) {
  using Acc = typename IdctTraits<kBits>::Acc;
  constexpr int kPass1 = IdctTraits<kBits>::kPass1Bits;
  const int32_t w0 = static_cast<int32_t>(Acc(dc) * (Acc(1) << kPass1));
  return idct::DescaleToSample<kBits>(Acc(w0), kPass1 + 3);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_IDCT_ISLOW_H_
