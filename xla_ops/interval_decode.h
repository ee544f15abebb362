// Decoding of one restart interval: a pure function of (its bytes, the tables,
// its first block, an output sink). Restart intervals reset the DC predictor
// and start byte-aligned, so every interval decodes independently: this is
// where all parallelism comes from, on CPU threads and GPU threads alike.
#ifndef JAXJPEG_INTERVAL_DECODE_H_
#define JAXJPEG_INTERVAL_DECODE_H_

#include "bit_reader.h"
#include "huffman_decode.h"
#include "idct_islow.h"
#include "jpeg_defs.h"

namespace jaxjpeg {

// Everything a decoder needs besides the bytes. Plain data: it is what the
// table operand of the custom call carries.
struct DecoderTables {
  HuffmanDecodeTable dc;
  HuffmanDecodeTable ac;
  int32_t quant[64];  // natural order
};

// Where an image's blocks land: a W x H image of 8x8 blocks, row-major.
struct BlockGrid {
  int32_t width;
  int32_t height;
  int32_t blocks_wide;
};

namespace detail {

// Decodes one AC coefficient (or zero run, or EOB) at zig-zag index k and
// stores it. Returns 0 to go on, 1 at the end of the block, or an error
// status. A code in the fast table needs at most 9 + 15 buffered bits (EOB and
// ZRL codes at most 10); longer codes refill for themselves.
template <bool kDequantize, typename Coef>
JJ_HD JJ_INLINE int DecodeAc(BitReader& r, const DecoderTables& t, Coef coef[64], int& k) {
  const uint32_t index = PeekBits(r, kFastAcBits);
  const int32_t fast = t.ac.fast_ac[index];
  int run;
  int32_t value;
  if (fast != 0) {  // one index gives the code's length, run and value size
    // The code and value bits, `total` of them, read as one unsigned number,
    // plus the entry's bias give the coefficient. They are read from the
    // buffer as it is, so that the only serial dependence from one
    // coefficient to the next is the table read and one shift. total <= 24,
    // so `fast & 63` is total and `-fast & 63` is 64 - total: written so, the
    // shifts take the entry as it is (CPUs mask shift counts the same way).
    const uint32_t bits = static_cast<uint32_t>(r.buffer >> ((0 - fast) & 63));
    value = static_cast<int32_t>(bits + static_cast<uint32_t>(t.ac.fast_ac_bias[index]));
    r.buffer <<= (fast & 63);
    r.count -= fast & 63;
    if (fast & kEndOfBlock) return 1;
    run = (fast >> 8) & 15;
  } else {
    if (r.count < 32) Refill(r);  // a code (<= 16 bits) and its value bits (<= 15)
    const int symbol = DecodeSymbol(r, t.ac);
    if (symbol < 0) return static_cast<int>(Status::kBadHuffmanCode);
    run = symbol >> 4;
    const int size = symbol & 15;
    if (size == 0 && run != 15) return 1;  // EOB (ZRL is run 15, size 0: 16 zeros)
    value = TakeMagnitude(r, size);
  }
  // k <= 63 on entry, so k + run <= 78; past 63 the value lands in slot 0 and
  // DecodeBlock reports the overshoot.
  k += run;
  const int n = ZigzagToNatural(k);
  coef[n] = kDequantize ? Coef(value) * t.quant[n] : Coef(value);
  ++k;
  return 0;
}

}  // namespace detail

// Decodes one block's coefficients into `coef` (natural order), which must be
// zero on entry: the quantized values, or with kDequantize each times its
// quantization step (in the IDCT's accumulator type, as libjpeg multiplies).
// `dc` carries the DC predictor; `last` receives the zig-zag index of the
// last coefficient written (0: only the DC).
template <bool kDequantize, typename Coef>
JJ_HD JJ_INLINE Status DecodeBlock(BitReader& r, const DecoderTables& t, int32_t& dc,
                                   Coef coef[64], int& last) {
  Refill(r);
  const int category = DecodeSymbol(r, t.dc);
  if (category < 0) return Status::kBadHuffmanCode;
  dc += TakeMagnitude(r, category);
  const int32_t dc16 = static_cast<int16_t>(dc);  // libjpeg keeps coefficients as 16-bit
  coef[0] = kDequantize ? Coef(dc16) * t.quant[0] : Coef(dc16);
  int k = 1;
  // Two coefficients per refill: a refill leaves >= 56 bits, and two codes
  // from the lookahead table with their value bits take at most 2 * 24. No
  // branch on the bit count, which the data decide and the CPU cannot
  // predict.
  for (;;) {
    if (!RefillFast(r)) Refill(r);
    int done = detail::DecodeAc<kDequantize>(r, t, coef, k);
    if (done == 0 && k < 64) done = detail::DecodeAc<kDequantize>(r, t, coef, k);
    if (done != 0 || k > 63) {
      if (k > 64) return Status::kBadCoefficients;  // a zero run went past the block
      last = k - 1;  // k is one past the last coefficient written
      return done > 1 ? static_cast<Status>(done) : Status::kOk;
    }
  }
}

// Decodes one block's coefficients (quantized, natural order) into `coef`,
// which must be zero on entry. `dc` carries the DC predictor.
JJ_HD JJ_INLINE Status DecodeBlockCoefficients(BitReader& r, const DecoderTables& t,
                                               int32_t& dc, int32_t coef[64]) {
  int last;
  return DecodeBlock<false>(r, t, dc, coef, last);
}

namespace detail {

// Zero, hidden from the host compiler's optimizer so that clearing a block's
// coefficients stays a few vector stores instead of becoming a memset call
// (which GCC expands to `rep stos`, slow for 256 bytes).
template <typename T>
JJ_HD JJ_INLINE T OpaqueZero() {
  T zero = 0;
#if defined(__GNUC__) && !defined(__CUDA_ARCH__)
  __asm__("" : "+r"(zero));
#endif
  return zero;
}

template <int kBits, typename Sink>
JJ_HD JJ_INLINE Status DecodeIntervalBody(const uint8_t* begin, const uint8_t* end,
                                          const DecoderTables& t, const BlockGrid& grid,
                                          int64_t first_block, int64_t num_blocks,
                                          const Sink& sink) {
  BitReader r = MakeBitReader(begin, end);
  int32_t dc = 0;
  // Dequantized coefficients fit 32 bits for 12-bit streams too: |quantized|
  // <= 2^15 and steps <= 65535 (DQT entries are 16-bit).
  int32_t coef[64];
  int32_t samples[64];
  const int32_t zero = OpaqueZero<int32_t>();
  for (int i = 0; i < 64; ++i) coef[i] = zero;
  const int64_t stop = first_block + num_blocks;
  int64_t by = first_block / grid.blocks_wide, bx = first_block % grid.blocks_wide;
  for (int64_t b = first_block; b < stop; ++b) {
    int last;
    const Status status = DecodeBlock<true>(r, t, dc, coef, last);
    if (status != Status::kOk) return status;
    if (ReadPastEnd(r)) return Status::kTruncated;
    if (last == 0) {  // DC only: a constant block
      const int32_t v = DcOnlySample<kBits>(coef[0]);
      coef[0] = zero;
      for (int i = 0; i < 64; ++i) samples[i] = v;
    } else {
      InverseDctDequantized<kBits>(coef, samples);
      for (int i = 0; i < 64; ++i) coef[i] = zero;
    }
    const int y0 = static_cast<int>(by) * 8, x0 = static_cast<int>(bx) * 8;
    if (++bx == grid.blocks_wide) {
      bx = 0;
      ++by;
    }
    const int rows = grid.height - y0 < 8 ? grid.height - y0 : 8;
    const int cols = grid.width - x0 < 8 ? grid.width - x0 : 8;
    if (rows == 8 && cols == 8) {  // whole block: fixed-size rows the compiler unrolls
      for (int y = 0; y < 8; ++y) sink.PutRow(y0 + y, x0, samples + 8 * y, 8);
    } else {
      for (int y = 0; y < rows; ++y) sink.PutRow(y0 + y, x0, samples + 8 * y, cols);
    }
  }
  return HasUnusedBytes(r) ? Status::kTrailingData : Status::kOk;
}

// Host builds for x86-64 also compile the decoder for AVX2 and pick it at run
// time: the same source, but the IDCT's 32-bit multiplies become single
// instructions (SSE2 has none), which makes the IDCT about 3x faster. Only
// the code generation differs (no intrinsics), and no FMA is enabled, so the
// results are the same bits. BMI2 (on every AVX2 CPU) gives the bit reader's
// variable shifts as single flag-free instructions. Off under nvcc, when AVX2
// is already the baseline, or with -DJAXJPEG_NO_RUNTIME_DISPATCH.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__AVX2__) && \
    !defined(JAXJPEG_NO_RUNTIME_DISPATCH)
#define JAXJPEG_AVX2_DISPATCH 1
template <int kBits, typename Sink>
__attribute__((target("avx2,bmi2"), noinline)) Status DecodeIntervalAvx2(
    const uint8_t* begin, const uint8_t* end, const DecoderTables& t, const BlockGrid& grid,
    int64_t first_block, int64_t num_blocks, const Sink& sink) {
  return DecodeIntervalBody<kBits>(begin, end, t, grid, first_block, num_blocks, sink);
}

inline bool HostHasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
  return has;
}
#endif

}  // namespace detail

// Decodes `num_blocks` blocks starting at block `first_block` from the
// entropy-coded bytes [begin, end) of one restart interval (the range may end
// at, or include, the marker that follows the interval).
template <int kBits, typename Sink>
JJ_HD Status DecodeInterval(const uint8_t* begin, const uint8_t* end, const DecoderTables& t,
                            const BlockGrid& grid, int64_t first_block, int64_t num_blocks,
                            const Sink& sink) {
#if defined(JAXJPEG_AVX2_DISPATCH)
  if (detail::HostHasAvx2()) {
    return detail::DecodeIntervalAvx2<kBits>(begin, end, t, grid, first_block, num_blocks, sink);
  }
#endif
  return detail::DecodeIntervalBody<kBits>(begin, end, t, grid, first_block, num_blocks, sink);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_INTERVAL_DECODE_H_
