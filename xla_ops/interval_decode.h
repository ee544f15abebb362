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

// Decodes one block's coefficients (quantized, natural order) into `coef`,
// which must be zero on entry. `dc` carries the DC predictor.
JJ_HD JJ_INLINE Status DecodeBlockCoefficients(BitReader& r, const DecoderTables& t,
                                               int32_t& dc, int32_t coef[64]) {
  Refill(r);
  const int category = DecodeSymbol(r, t.dc);
  if (category < 0) return Status::kBadHuffmanCode;
  if (category > 0) {
    dc += ExtendMagnitude(PeekBits(r, category), category);
    SkipBits(r, category);
  }
  coef[0] = static_cast<int16_t>(dc);  // libjpeg keeps coefficients as 16-bit
  for (int k = 1; k < 64;) {
    if (r.count < 32) Refill(r);  // a code (<= 16) plus its magnitude (<= 15)
    const int32_t fast = t.ac.fast_ac[PeekBits(r, kLookaheadBits)];
    int run, value;
    if (fast != 0) {
      SkipBits(r, fast & 0xFF);
      if (fast & kEndOfBlock) break;
      run = (fast >> 8) & 0xF;
      value = fast >> 16;
    } else {
      const int symbol = DecodeSymbol(r, t.ac);
      if (symbol < 0) return Status::kBadHuffmanCode;
      run = symbol >> 4;
      const int size = symbol & 15;
      if (size == 0 && run != 15) break;  // EOB
      value = 0;                          // ZRL: 15 zeros and a zero
      if (size != 0) {
        value = ExtendMagnitude(PeekBits(r, size), size);
        SkipBits(r, size);
      }
    }
    k += run;
    if (k > 63) return Status::kBadCoefficients;
    coef[ZigzagToNatural(k)] = value;
    ++k;
  }
  return Status::kOk;
}

// Decodes `num_blocks` blocks starting at block `first_block` from the
// entropy-coded bytes [begin, end) of one restart interval (the range may end
// at, or include, the marker that follows the interval).
template <int kBits, typename Sink>
JJ_HD Status DecodeInterval(const uint8_t* begin, const uint8_t* end, const DecoderTables& t,
                            const BlockGrid& grid, int64_t first_block, int64_t num_blocks,
                            const Sink& sink) {
  BitReader r = MakeBitReader(begin, end);
  int32_t dc = 0;
  int32_t coef[64];
  int32_t samples[64];
  for (int i = 0; i < 64; ++i) coef[i] = 0;
  for (int64_t b = first_block; b < first_block + num_blocks; ++b) {
    const Status status = DecodeBlockCoefficients(r, t, dc, coef);
    if (status != Status::kOk) return status;
    if (ReadPastEnd(r)) return Status::kTruncated;
    InverseDctIslow<kBits>(coef, t.quant, samples);
    for (int i = 0; i < 64; ++i) coef[i] = 0;
    const int y0 = static_cast<int>(b / grid.blocks_wide) * 8;
    const int x0 = static_cast<int>(b % grid.blocks_wide) * 8;
    const int rows = grid.height - y0 < 8 ? grid.height - y0 : 8;
    const int cols = grid.width - x0 < 8 ? grid.width - x0 : 8;
    for (int y = 0; y < rows; ++y) sink.PutRow(y0 + y, x0, samples + 8 * y, cols);
  }
  return HasUnusedBytes(r) ? Status::kTrailingData : Status::kOk;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_INTERVAL_DECODE_H_
