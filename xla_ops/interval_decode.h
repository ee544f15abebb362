// Decoding of one restart interval: a pure function of (its bytes, the tables,
// its first block, an output sink). Restart intervals reset the DC predictor
// and start byte-aligned, so every interval decodes independently: this is
// where all parallelism comes from, on CPU threads and GPU threads alike.
#ifndef JAXJPEG_INTERVAL_DECODE_H_
#define JAXJPEG_INTERVAL_DECODE_H_

#include <type_traits>

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
  FastAcTable fast_ac;  // built from `ac`
  // Whether many fast entries hold two parts (see BuildFastAcTable): picks
  // the faster of two equivalent ways to decode them.
  int32_t fast_ac_pairs_common;
  int32_t quant[64];  // natural order
};

// Where an image's blocks land: a W x H image of 8x8 blocks, row-major.
struct BlockGrid {
  int32_t width;
  int32_t height;
  int32_t blocks_wide;
};

// Where one block lives while it is decoded: its coefficients (natural
// order), the IDCT's workspace and its samples, each element i at
// [i * kStride]. The host keeps three plain arrays (stride 1) and multiplies
// each coefficient by its step as it is stored. The GPU keeps all three in
// one column of a shared array, one column per thread of a block (a warp's
// lanes then hit 32 different banks whatever index each one stores), stores
// quantized values and multiplies inside the IDCT, where every lane reads
// the same step. Both give the same 32-bit products.
template <int kStride, bool kDequantizeOnStore>
struct BlockScratch {
  static constexpr int kElementStride = kStride;
  static constexpr bool kDequantizes = kDequantizeOnStore;
  int32_t* coef;
  int32_t* ws;       // may be coef: the IDCT runs in place
  int32_t* samples;  // may be coef
  const uint8_t* zigzag;  // zig-zag index 0..79 -> natural slot (see jpeg_defs.h)
};

namespace detail {

// Stores `value` as the coefficient at zig-zag index k (dequantized or not).
// k <= 78: past 63 the value lands in slot 0 and DecodeBlock reports the
// overshoot.
template <bool kDequantize, typename Scratch>
JJ_HD JJ_INLINE void StoreCoefficient(const DecoderTables& t, const Scratch& s, int k,
                                      int32_t value) {
  const int n = s.zigzag[k];
  s.coef[n * Scratch::kElementStride] = kDequantize ? value * t.quant[n] : value;
}

// The first part's value of an entry (see FastAcEntry) whose first part is
// `shift` bits short of 64, from the buffer as it was before the entry's
// bits were taken.
JJ_HD JJ_INLINE int32_t FirstValue(const FastAcEntry& e, int shift, uint64_t before) {
  return static_cast<int16_t>(
      static_cast<uint16_t>(static_cast<uint32_t>(before >> shift) + e.bias));
}

// Decodes the AC codes of one fast-table entry (one or two coefficients, zero
// runs or an EOB; see FastAcEntry) and stores them, without a branch on the
// kind of entry. Returns 0 to go on, 1 at the end of the block. Needs at
// most kFastAcBits - 1 + 15 buffered bits.
template <bool kDequantize, typename Scratch>
JJ_HD JJ_INLINE int DecodeFastAc(BitReader& r, const DecoderTables& t, const FastAcEntry& e,
                                 const Scratch& coef, int& k) {
  const uint64_t before = r.buffer;
  r.buffer <<= e.consumed;  // the only step on the chain from entry to entry
  r.count -= e.consumed;
  if (IsEobFirst(e)) return 1;
  const int32_t value = FirstValue(e, FirstShift(e), before);
  const int k1 = k + e.run, k2 = k + e.second_at;
  if (k2 > 63) {
    // The second part would land past the block: the block is full after
    // the first (the second's bits belong to what follows), or the second
    // overruns (decoded again on its own, it is reported then). Its bits go
    // back into the buffer. Without a second part, only an overrun of the
    // first comes here.
    r.buffer = before << (64 - FirstShift(e));
    r.count += e.consumed - (64 - FirstShift(e));
    StoreCoefficient<kDequantize>(t, coef, k1, value);
    k = k1 + 1;
    return 0;
  }
  // The second store first: without a second part it goes to k1 (a 0), and
  // the first value replaces it.
  StoreCoefficient<kDequantize>(t, coef, k2, e.second_value);
  StoreCoefficient<kDequantize>(t, coef, k1, value);
  k += e.advance;
  return EndsBlock(e);
}

// The same for a one-code entry (IsOneCode): less work, for streams where
// those are the rule (long codes and values, e.g. 12-bit) and a branch on
// the kind is predictable.
template <bool kDequantize, typename Scratch>
JJ_HD JJ_INLINE void DecodeFastAcOne(BitReader& r, const DecoderTables& t, const FastAcEntry& e,
                                     const Scratch& coef, int& k) {
  const uint64_t before = r.buffer;
  r.buffer <<= e.consumed;
  r.count -= e.consumed;
  k += e.run;
  // A one-code entry's kind bits are 0: shift_kind is the shift, unmasked.
  StoreCoefficient<kDequantize>(t, coef, k, FirstValue(e, e.shift_kind, before));
  ++k;
}

// Decodes the next AC entry: the fast table's, or one code the slow way.
// Returns 0 to go on, 1 at the end of the block, or an error status.
template <bool kDequantize, bool kPairsCommon, typename Reader, typename Scratch>
JJ_HD JJ_INLINE int DecodeAc(Reader& r, const DecoderTables& t, const Scratch& coef, int& k) {
  FastAcEntryRead e = LoadFastAcEntry(t.fast_ac, PeekBits(r, kFastAcBits));
  if (e.consumed != 0) {
    if (kPairsCommon || !IsOneCode(e)) return DecodeFastAc<kDequantize>(r, t, e, coef, k);
    DecodeFastAcOne<kDequantize>(r, t, e, coef, k);
    return 0;
  }
  if (r.count < 32) Refill(r);  // a code (<= 16 bits) and its value bits (<= 15)
  const int symbol = DecodeSymbol(r, t.ac);
  if (symbol < 0) return static_cast<int>(Status::kBadHuffmanCode);
  const int run = symbol >> 4;
  const int size = symbol & 15;
  if (size == 0 && run != 15) return 1;  // EOB (ZRL is run 15, size 0: 16 zeros)
  const int32_t value = TakeMagnitude(r, size);
  k += run;
  StoreCoefficient<kDequantize>(t, coef, k, value);
  ++k;
  return 0;
}

}  // namespace detail

// Decodes one block's coefficients into `coef.coef` (natural order), which
// must be zero on entry: the quantized values, or with kDequantize each times
// its quantization step (in 32 bits, as libjpeg multiplies for 8-bit
// streams; 12-bit products fit too: |quantized| <= 2^15, steps <= 65535).
// `dc` carries the DC predictor; `last` receives the zig-zag index of the
// last coefficient written (0: only the DC).
template <bool kDequantize, bool kPairsCommon = true, typename Reader, typename Scratch>
JJ_HD JJ_INLINE Status DecodeBlock(Reader& r, const DecoderTables& t, int32_t& dc,
                                   const Scratch& coef, int& last) {
  Refill(r);
  const int category = DecodeSymbol(r, t.dc);
  if (category < 0) return Status::kBadHuffmanCode;
  // Only the low 16 bits matter (libjpeg keeps coefficients as 16-bit), so
  // the predictor wraps in 16 bits: a hostile stream of many large DC
  // differences cannot overflow a signed int (undefined behaviour on the GPU).
  dc = static_cast<int16_t>(static_cast<uint16_t>(
      static_cast<uint32_t>(dc) + static_cast<uint32_t>(TakeMagnitude(r, category))));
  const int32_t dc16 = dc;
  coef.coef[0] = kDequantize ? dc16 * t.quant[0] : dc16;
  int k = 1;
  // Two entries per refill: a refill leaves >= 56 bits, and two fast-table
  // entries take at most 2 * (kFastAcBits - 1 + 15) = 50 (a slow code
  // refills for itself). No branch on the bit count, which the data decide
  // and the CPU cannot predict.
  static_assert(2 * (kFastAcBits - 1 + 15) <= 56, "two fast entries per refill");
  for (;;) {
    if (!RefillFast(r)) Refill(r);
    int done = detail::DecodeAc<kDequantize, kPairsCommon>(r, t, coef, k);
    if (done == 0 && k < 64) done = detail::DecodeAc<kDequantize, kPairsCommon>(r, t, coef, k);
    if (done != 0 || k > 63) {
      if (k > 64) return Status::kBadCoefficients;  // a zero run went past the block
      last = k - 1;  // k is one past the last coefficient written
      return done > 1 ? static_cast<Status>(done) : Status::kOk;
    }
  }
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

// One decoded block to the sink, row by row: `samples` (IDCT output, see
// BlockScratch), or `dc_sample` everywhere for a block with only a DC.
// Each row passes as 8 values in registers (a row of a shared column is not
// contiguous); whole blocks take fixed-size rows the compiler unrolls.
template <typename Sink, typename = void>
struct WritesColumns : std::false_type {};
template <typename Sink>
struct WritesColumns<Sink, decltype(void(&Sink::PutColumn))> : std::true_type {};

template <typename Scratch, typename Sink>
JJ_HD JJ_INLINE void PutBlock(const Sink& sink, const Scratch& s, bool dc_only,
                              int32_t dc_sample, int y0, int x0, int rows, int cols) {
  constexpr int kStride = Scratch::kElementStride;
  if constexpr (WritesColumns<Sink>::value) {  // a placed block, column by column
    if (rows == 8 && sink.RowsContiguous(y0)) {
      for (int x = 0; x < cols; ++x) {
        int32_t column[8];
        JJ_UNROLL
        for (int y = 0; y < 8; ++y) column[y] = dc_only ? dc_sample : s.samples[(8 * y + x) * kStride];
        sink.PutColumn(y0, x0 + x, column);
      }
      return;
    }
  }
  JJ_UNROLL
  for (int y = 0; y < 8; ++y) {
    if (y >= rows) break;
    int32_t row[8];
    JJ_UNROLL
    for (int x = 0; x < 8; ++x) row[x] = dc_only ? dc_sample : s.samples[(8 * y + x) * kStride];
    if (cols == 8) {
      sink.PutRow(y0 + y, x0, row, 8);
    } else {
      sink.PutRow(y0 + y, x0, row, cols);
    }
  }
}

// Where a decoded block lands: its top-left sample (y0, x0) and the rows and
// columns of it inside the image; its samples are in the scratch, or
// `dc_sample` everywhere for a constant block (`dc_only`).
struct DecodedBlock {
  int32_t y0, x0, rows, cols;
  bool dc_only;
  int32_t dc_sample;
};

// An interval's decode between two blocks: the reader, the DC predictor and
// the next block's place in the grid (block row, block column).
template <typename Reader>
struct IntervalCursor {
  Reader r;
  int32_t dc;
  int32_t by, bx;
};

// Zeroes the scratch's coefficients: all of them, or only the DC where a
// constant block left the others untouched (the IDCT, in place, overwrote
// them otherwise; without it the column pass leaves them as they were).
template <typename Scratch>
JJ_HD JJ_INLINE void ClearCoefficients(const Scratch& s, bool only_dc) {
  constexpr int kStride = Scratch::kElementStride;
  const int32_t zero = OpaqueZero<int32_t>();
  if (only_dc) {
    s.coef[0] = zero;
    return;
  }
  JJ_UNROLL
  for (int i = 0; i < 64; ++i) s.coef[i * kStride] = zero;
}

// Starts an interval at `first_block` of the grid; the scratch's
// coefficients become zero.
template <typename Reader, typename Scratch>
JJ_HD JJ_INLINE IntervalCursor<Reader> StartInterval(const Reader& r, const BlockGrid& grid,
                                                     int64_t first_block, const Scratch& s) {
  ClearCoefficients(s, false);
  // A tile has fewer than 2^31 blocks: a 32-bit division (see ResolveInterval).
  const int32_t first = static_cast<int32_t>(first_block);
  return IntervalCursor<Reader>{r, 0, first / grid.blocks_wide, first % grid.blocks_wide};
}

// Decodes the cursor's next block into the scratch (IDCT included) and says
// where it lands; the coefficients must be zero on entry (ClearCoefficients
// after the block is written out).
template <int kBits, typename Reader, typename Scratch>
JJ_HD JJ_INLINE Status DecodeNextBlock(IntervalCursor<Reader>& c, const DecoderTables& t,
                                       const BlockGrid& grid, const Scratch& s,
                                       DecodedBlock* out) {
  constexpr int kStride = Scratch::kElementStride;
  constexpr bool kDequantizeOnStore = Scratch::kDequantizes;
  int last;
  const Status status =
      t.fast_ac_pairs_common ? DecodeBlock<kDequantizeOnStore, true>(c.r, t, c.dc, s, last)
                             : DecodeBlock<kDequantizeOnStore, false>(c.r, t, c.dc, s, last);
  if (status != Status::kOk) return status;
  if (ReadPastEnd(c.r)) return Status::kTruncated;
  out->dc_only = last == 0;
  out->dc_sample = 0;
  if (out->dc_only) {  // a constant block
    out->dc_sample =
        DcOnlySample<kBits>(kDequantizeOnStore ? s.coef[0] : s.coef[0] * t.quant[0]);
  } else {
    IdctColumns<kBits, kStride, !kDequantizeOnStore>(s.coef, t.quant, s.ws);
    IdctRows<kBits, kStride>(s.ws, s.samples);
  }
  out->y0 = c.by * 8;
  out->x0 = c.bx * 8;
  if (++c.bx == grid.blocks_wide) {
    c.bx = 0;
    ++c.by;
  }
  out->rows = grid.height - out->y0 < 8 ? grid.height - out->y0 : 8;
  out->cols = grid.width - out->x0 < 8 ? grid.width - out->x0 : 8;
  return Status::kOk;
}

// Decodes an interval's blocks from the reader `r` (a BitReader over its
// raw bytes, or a DestuffedBitReader over its destuffed bytes).
template <int kBits, typename Reader, typename Scratch, typename Sink>
JJ_HD JJ_INLINE Status DecodeIntervalBody(Reader r, const DecoderTables& t, const BlockGrid& grid,
                                          int64_t first_block, int64_t num_blocks,
                                          const Sink& sink, const Scratch& s) {
  IntervalCursor<Reader> c = StartInterval(r, grid, first_block, s);
  const int32_t blocks = static_cast<int32_t>(num_blocks);
  for (int32_t b = 0; b < blocks; ++b) {
    DecodedBlock d;
    const Status status = DecodeNextBlock<kBits>(c, t, grid, s, &d);
    if (status != Status::kOk) return status;
    PutBlock(sink, s, d.dc_only, d.dc_sample, d.y0, d.x0, d.rows, d.cols);
    ClearCoefficients(s, d.dc_only);
  }
  return HasUnusedBytes(c.r) ? Status::kTrailingData : Status::kOk;
}

// The host's scratch: three arrays on the stack.
template <int kBits, typename Reader, typename Sink>
JJ_HD JJ_INLINE Status DecodeIntervalOnStack(Reader r, const DecoderTables& t,
                                             const BlockGrid& grid, int64_t first_block,
                                             int64_t num_blocks, const Sink& sink) {
  int32_t coef[64], ws[64], samples[64];
  const BlockScratch<1, true> s{coef, ws, samples, ZigzagTable()};
  return DecodeIntervalBody<kBits>(r, t, grid, first_block, num_blocks, sink, s);
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
template <int kBits, typename Reader, typename Sink>
__attribute__((target("avx2,bmi2"), noinline)) Status DecodeIntervalAvx2(
    Reader r, const DecoderTables& t, const BlockGrid& grid, int64_t first_block,
    int64_t num_blocks, const Sink& sink) {
  return DecodeIntervalOnStack<kBits>(r, t, grid, first_block, num_blocks, sink);
}

inline bool HostHasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
  return has;
}
#endif

}  // namespace detail

namespace detail {

// The host's decode from a reader: the AVX2 build where the CPU has it.
template <int kBits, typename Reader, typename Sink>
JJ_HD JJ_INLINE Status DecodeIntervalFrom(Reader r, const DecoderTables& t, const BlockGrid& grid,
                                          int64_t first_block, int64_t num_blocks,
                                          const Sink& sink) {
#if defined(JAXJPEG_AVX2_DISPATCH)
  if (HostHasAvx2()) return DecodeIntervalAvx2<kBits>(r, t, grid, first_block, num_blocks, sink);
#endif
  return DecodeIntervalOnStack<kBits>(r, t, grid, first_block, num_blocks, sink);
}

}  // namespace detail

// Decodes `num_blocks` blocks starting at block `first_block` from the
// entropy-coded bytes [begin, end) of one restart interval (the range may end
// at, or include, the marker that follows the interval).
template <int kBits, typename Sink>
JJ_HD Status DecodeInterval(const uint8_t* begin, const uint8_t* end, const DecoderTables& t,
                            const BlockGrid& grid, int64_t first_block, int64_t num_blocks,
                            const Sink& sink) {
  return detail::DecodeIntervalFrom<kBits>(MakeBitReader(begin, end), t, grid, first_block,
                                           num_blocks, sink);
}

// The same from an interval's destuffed bytes (see destuff.h), on the host.
template <int kBits, typename Sink>
Status DecodeDestuffedInterval(const uint8_t* data, int64_t n, const DecoderTables& t,
                               const BlockGrid& grid, int64_t first_block, int64_t num_blocks,
                               const Sink& sink) {
  return detail::DecodeIntervalFrom<kBits>(MakeDestuffedBitReader(data, n), t, grid,
                                           first_block, num_blocks, sink);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_INTERVAL_DECODE_H_
