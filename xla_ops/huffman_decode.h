// Canonical Huffman decoding tables (T.81 C.2, F.2.2.3) with a lookahead table.
// Building runs on the host; the table is plain data so it can be copied to
// device memory (or staged in shared memory) and decoded from there.
#ifndef JAXJPEG_HUFFMAN_DECODE_H_
#define JAXJPEG_HUFFMAN_DECODE_H_

#include "bit_reader.h"
#include "jpeg_defs.h"

namespace jaxjpeg {

constexpr int kLookaheadBits = 9;
// Index bits of the AC fast table: codes of up to 9 bits that carry a value
// (the index then holds the value's sign bit too), and EOB / ZRL codes of up
// to 10 bits.
constexpr int kFastAcBits = 10;

// One DHT table ready for decoding.
struct HuffmanDecodeTable {
  // Codes of up to kLookaheadBits bits: (code length << 8) | symbol; 0 if the
  // code is longer (or no code starts with these bits).
  uint16_t lookahead[1 << kLookaheadBits];
  // For AC tables, every code that fits kFastAcBits with its value's sign
  // bit, as one entry: the bits the coefficient takes in all, code plus value
  // bits (bits 0-7), the zero run (bits 8-11), and kEndOfBlock for the EOB
  // code. A ZRL (16 zeros) is run 15: it stores a zero. 0 = decode the slow
  // way (longer code, or undefined). fast_ac_bias is what turns those total
  // bits, read as an unsigned number (code bits then value bits), into the
  // coefficient: minus the code's part, and for a value with a leading 0 bit
  // (negative, T.81 F.2.2.1 EXTEND) minus 2^category - 1, which the index
  // already decides.
  int32_t fast_ac[1 << kFastAcBits];
  int32_t fast_ac_bias[1 << kFastAcBits];
  int32_t max_code[17];      // largest code of each length, -1 if none
  int32_t value_offset[17];  // index into symbols = code + value_offset[len]
  uint8_t symbols[256];
};

constexpr int32_t kEndOfBlock = 0x8000;

// Sign-extends a magnitude category value (T.81 F.2.2.1, EXTEND).
JJ_HD JJ_INLINE int32_t ExtendMagnitude(uint32_t bits, int category) {
  return bits < (1u << (category - 1)) ? static_cast<int32_t>(bits) - (1 << category) + 1
                                       : static_cast<int32_t>(bits);
}

// The fast AC entries of one code (length <= kFastAcBits) and its symbol.
inline void FillFastAc(int32_t code, int len, int symbol, HuffmanDecodeTable* t) {
  const int run = symbol >> 4, category = symbol & 15;
  const int shift = kFastAcBits - len;
  for (int fill = 0; fill < (1 << shift); ++fill) {
    const int i = (code << shift) | fill;
    if (symbol == 0x00) {  // EOB
      t->fast_ac[i] = kEndOfBlock | len;
      t->fast_ac_bias[i] = -code;
    } else if (category == 0) {  // ZRL: 16 zeros; other run/0 symbols end the block (slow path)
      if (run == 15) {
        t->fast_ac[i] = (run << 8) | len;
        t->fast_ac_bias[i] = -code;
      }
    } else if (len < kFastAcBits) {  // the value's leading bit is in the index
      const bool negative = ((fill >> (shift - 1)) & 1) == 0;
      t->fast_ac[i] = (run << 8) | (len + category);
      t->fast_ac_bias[i] = -(code << category) - (negative ? (1 << category) - 1 : 0);
    }
  }
}

// Builds a decoding table from DHT counts (codes of length 1..16) and symbols.
// Rejects over-subscribed code spaces the way libjpeg does (the all-ones code
// of any length is reserved), and DC symbols above 15.
inline Status BuildHuffmanDecodeTable(const uint8_t counts[16], const uint8_t* symbols,
                                      int num_symbols, bool is_dc, HuffmanDecodeTable* t) {
  int total = 0;
  for (int i = 0; i < 16; ++i) total += counts[i];
  if (total != num_symbols || total > 256 || total == 0) return Status::kBadHuffmanTable;
  for (int i = 0; i < total; ++i) {
    if (is_dc && symbols[i] > 15) return Status::kBadHuffmanTable;
    t->symbols[i] = symbols[i];
  }
  for (int i = 0; i < (1 << kLookaheadBits); ++i) t->lookahead[i] = 0;
  for (int i = 0; i < (1 << kFastAcBits); ++i) {
    t->fast_ac[i] = 0;
    t->fast_ac_bias[i] = 0;
  }
  int32_t code = 0;
  int index = 0;
  for (int len = 1; len <= 16; ++len) {
    const int n = counts[len - 1];
    // Checked before the lookahead fill below writes anything: an
    // over-subscribed length would index past the table.
    if (code + n >= (1 << len)) return Status::kBadHuffmanTable;
    t->value_offset[len] = index - code;
    for (int i = 0; i < n; ++i, ++code, ++index) {
      if (!is_dc && len <= kFastAcBits) FillFastAc(code, len, t->symbols[index], t);
      if (len > kLookaheadBits) continue;
      const int shift = kLookaheadBits - len;
      for (int fill = 0; fill < (1 << shift); ++fill) {
        t->lookahead[(code << shift) | fill] =
            static_cast<uint16_t>((len << 8) | t->symbols[index]);
      }
    }
    t->max_code[len] = n ? code - 1 : -1;
    code <<= 1;
  }
  t->max_code[0] = -1;
  t->value_offset[0] = 0;
  return Status::kOk;
}

// Takes the next `category` (0..15) bits as a sign-extended magnitude value
// (T.81 F.2.2.1 EXTEND), without branches; category 0 gives 0. Needs
// >= category buffered bits.
JJ_HD JJ_INLINE int32_t TakeMagnitude(BitReader& r, int category) {
  // (buffer >> 1) >> (63 - category): the top `category` bits, 0 for category 0.
  const int32_t bits = static_cast<int32_t>((r.buffer >> 1) >> (63 - category));
  // A leading 0 bit means a negative value: bits - (2^category - 1).
  const int32_t positive = static_cast<int32_t>(static_cast<int64_t>(r.buffer) >> 63);
  const int32_t value = bits - (((1 << category) - 1) & ~positive);
  r.buffer <<= category;
  r.count -= category;
  return value;
}

// Decodes one symbol; returns -1 for a code no table defines. Needs >= 16
// buffered bits.
JJ_HD JJ_INLINE int DecodeSymbol(BitReader& r, const HuffmanDecodeTable& t) {
  const uint16_t entry = t.lookahead[PeekBits(r, kLookaheadBits)];
  if (entry != 0) {
    SkipBits(r, entry >> 8);
    return entry & 0xFF;
  }
  for (int len = kLookaheadBits + 1; len <= 16; ++len) {
    const int32_t code = static_cast<int32_t>(PeekBits(r, len));
    if (code <= t.max_code[len]) {
      SkipBits(r, len);
      const int32_t index = code + t.value_offset[len];
      return (index >= 0 && index < 256) ? t.symbols[index] : -1;
    }
  }
  return -1;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_HUFFMAN_DECODE_H_
