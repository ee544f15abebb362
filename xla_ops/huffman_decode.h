// Canonical Huffman decoding tables (T.81 C.2, F.2.2.3) with a lookahead table
// and the AC fast table. Every entry of the lookup tables is a function of
// its index (LookaheadEntryAt, FastAcEntryAt), so the host builds them in a
// loop and a GPU block builds them with a thread per share of the entries
// (table_build.h); the tables are plain data, decoded from shared memory on
// the GPU.
#ifndef JAXJPEG_HUFFMAN_DECODE_H_
#define JAXJPEG_HUFFMAN_DECODE_H_

#include "bit_reader.h"
#include "jpeg_defs.h"

namespace jaxjpeg {

constexpr int kLookaheadBits = 9;

// One DHT table ready for decoding.
struct HuffmanDecodeTable {
  // Codes of up to kLookaheadBits bits: (code length << 8) | symbol; 0 if the
  // code is longer (or no code starts with these bits).
  uint16_t lookahead[1 << kLookaheadBits];
  int32_t max_code[17];      // largest code of each length, -1 if none
  int32_t value_offset[17];  // index into symbols = code + value_offset[len]
  uint8_t symbols[256];
};

// Builds the canonical code of a DHT table (T.81 C.2) from its counts (codes
// of length 1..16) and symbols: the largest code of each length and where
// each length's symbols start; the lookahead table is LookaheadEntryAt's.
// Rejects over-subscribed code spaces the way libjpeg does (the all-ones
// code of any length is reserved), empty tables and DC symbols above 15. A
// rejected table is left decoding nothing (every max_code -1), so an
// executor that builds tables from untrusted operands fails the intervals
// that use it (kBadHuffmanCode) instead of reading a half-built table.
JJ_HD inline Status BuildCanonicalCode(const uint8_t counts[16], const uint8_t symbols[256],
                                       bool is_dc, HuffmanDecodeTable* t) {
  for (int len = 0; len <= 16; ++len) t->max_code[len] = -1;
  for (int len = 0; len <= 16; ++len) t->value_offset[len] = 0;
  int total = 0;
  for (int i = 0; i < 16; ++i) total += counts[i];
  if (total > 256 || total == 0) return Status::kBadHuffmanTable;
  for (int i = 0; i < 256; ++i) t->symbols[i] = i < total ? symbols[i] : 0;
  for (int i = 0; i < total; ++i) {
    if (is_dc && symbols[i] > 15) return Status::kBadHuffmanTable;
  }
  int32_t max_code[17];
  int32_t code = 0;
  int index = 0;
  for (int len = 1; len <= 16; ++len) {
    const int n = counts[len - 1];
    if (code + n >= (1 << len)) return Status::kBadHuffmanTable;
    t->value_offset[len] = index - code;
    code += n;
    index += n;
    max_code[len] = n ? code - 1 : -1;
    code <<= 1;
  }
  // Published only once the whole code is known to be sound.
  for (int len = 1; len <= 16; ++len) t->max_code[len] = max_code[len];
  return Status::kOk;
}

// The symbol of the code of `len` bits whose value is `code`, if the table
// has one: codes are searched from the shortest, so where no shorter code
// is a prefix, the canonical code of this length covers exactly the values
// up to max_code[len].
JJ_HD JJ_INLINE int SymbolOfCode(const HuffmanDecodeTable& t, int len, int32_t code) {
  if (code > t.max_code[len]) return -1;
  const int32_t index = code + t.value_offset[len];
  return (index >= 0 && index < 256) ? t.symbols[index] : -1;
}

// Lookahead entry `index` (kLookaheadBits bits): (code length << 8) | symbol
// of the code those bits start with, 0 if it is longer or undefined.
JJ_HD inline uint16_t LookaheadEntryAt(const HuffmanDecodeTable& t, uint32_t index) {
  for (int len = 1; len <= kLookaheadBits; ++len) {
    const int32_t code = static_cast<int32_t>(index >> (kLookaheadBits - len));
    if (code <= t.max_code[len]) {
      const int symbol = SymbolOfCode(t, len, code);
      return symbol < 0 ? 0 : static_cast<uint16_t>((len << 8) | symbol);
    }
  }
  return 0;
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

// The AC fast table: kFastAcBits bits of lookahead resolve one coefficient,
// and often the next one too. AC decoding is bound by a serial chain (peek
// the bits, load the entry, shift the consumed bits out) that no
// out-of-order CPU can overlap; an entry that covers two coefficients walks
// that chain once for both. The values are computed from the buffer and the
// entry off that chain.
constexpr int kFastAcBits = 11;

// One entry, for the codes at the start of its index: 8 bytes, read with one
// 64-bit load (one shared load per entry on the GPU). The first part is one
// AC code with its value bits (a coefficient, a ZRL or an EOB); its code and
// its value's sign bit lie in the index, its other value bits may not. Its
// value is those bits, code then value bits read as one unsigned number,
// plus its bias: minus the code's part, and for a leading 0 value bit
// (negative, T.81 F.2.2.1 EXTEND) minus 2^category - 1. Values have at most
// 15 bits and a sign, so the sum is taken modulo 2^16 and read as int16: a
// 16-bit bias is enough. The second part, if any, is the next code when it
// and all its value bits lie in the index too, so its value is a constant.
// Every entry stores twice, so that the decoder does not branch on the kind:
// without a second part, the second store puts a 0 where the first store
// then puts the first value. Byte fields: on the host reading one is a load,
// not shifts and masks; the kind shares a byte with the first part's shift,
// which x86 shifts mask to 6 bits anyway.
struct alignas(8) FastAcEntry {
  uint8_t consumed;      // bits of both parts; 0 = decode the slow way
  uint8_t shift_kind;    // 64 - the first part's bits | kind << 6 (see below)
  uint8_t run;           // zero run before the first value (15 for a ZRL's 0)
  uint8_t second_at;     // zig-zag position of the second store, from k
  uint8_t advance;       // k after the entry, from k
  int8_t second_value;   // 0 for an EOB or no second part
  uint16_t bias;         // added to the first part's bits, modulo 2^16
};
static_assert(sizeof(FastAcEntry) == 8, "one 64-bit load per entry");

// The kind of an entry (the top two bits of shift_kind): one value or ZRL;
// a second value after the first; a value then an EOB that ends the block
// (k stays one past the first value); or an EOB first (the other fields
// unused). Ordered so that each test the decoder makes is one comparison.
constexpr uint8_t kOneCode = 0;
constexpr uint8_t kTwoCodes = 1;
constexpr uint8_t kValueThenEob = 2;
constexpr uint8_t kEobFirst = 3;
constexpr int kKindShift = 6;

JJ_HD JJ_INLINE int FirstShift(const FastAcEntry& e) { return e.shift_kind & 63; }
JJ_HD JJ_INLINE bool IsEobFirst(const FastAcEntry& e) {
  return e.shift_kind >= (kEobFirst << kKindShift);
}
JJ_HD JJ_INLINE bool IsOneCode(const FastAcEntry& e) {
  return e.shift_kind < (kTwoCodes << kKindShift);
}
// 1 for kValueThenEob; also for kEobFirst, which the decoder handles first.
JJ_HD JJ_INLINE int EndsBlock(const FastAcEntry& e) { return e.shift_kind >> 7; }

JJ_HD JJ_INLINE uint8_t PackShiftKind(int first_shift, uint8_t kind) {
  return static_cast<uint8_t>(first_shift | (kind << kKindShift));
}

struct FastAcTable {
  FastAcEntry entry[1 << kFastAcBits];
};

// The entry at `index`. On the device a copy, made by one 64-bit load whose
// fields are then taken from the register pair (a plain struct copy compiles
// to a 32-bit and two 16-bit shared loads). On the host a reference: the
// compiler loads the fields it uses straight from the table (a copy cost
// 1-2% more instructions).
#if defined(__CUDA_ARCH__)
using FastAcEntryRead = FastAcEntry;
#else
using FastAcEntryRead = const FastAcEntry&;
#endif

JJ_HD JJ_INLINE FastAcEntryRead LoadFastAcEntry(const FastAcTable& table, uint32_t index) {
#if defined(__CUDA_ARCH__)
  const uint64_t word = reinterpret_cast<const uint64_t*>(table.entry)[index];
  FastAcEntry e;
  memcpy(&e, &word, sizeof e);
  return e;
#else
  return table.entry[index];
#endif
}

// The code of at most kFastAcBits bits that the kFastAcBits-bit string
// `bits` starts with, if any: false for a longer or undefined code.
JJ_HD inline bool ShortCodeAt(const HuffmanDecodeTable& t, uint32_t bits, int* len, int* symbol,
                              int32_t* code) {
  const uint16_t entry = t.lookahead[bits >> (kFastAcBits - kLookaheadBits)];
  if (entry != 0) {
    *len = entry >> 8;
    *symbol = entry & 0xFF;
    *code = static_cast<int32_t>(bits >> (kFastAcBits - *len));
    return true;
  }
  for (int n = kLookaheadBits + 1; n <= kFastAcBits; ++n) {
    const int32_t c = static_cast<int32_t>(bits >> (kFastAcBits - n));
    if (c <= t.max_code[n]) {
      *len = n;
      *symbol = SymbolOfCode(t, n, c);
      *code = c;
      return *symbol >= 0;
    }
  }
  return false;
}

// What a kFastAcBits-bit string starts with, when that could be the second
// part of an entry: a complete coefficient or ZRL whose value fits int8, or
// an EOB.
struct SecondPart {
  uint8_t bits;  // its code and value bits; 0xFF: none (longer, EOBn, undefined)
  uint8_t run;
  uint8_t is_eob;
  int8_t value;
};

// The coefficient a value of `category` bits `raw` stands for (T.81 F.2.2.1
// EXTEND): a leading 0 bit means a negative value.
JJ_HD JJ_INLINE int32_t Extend(int32_t raw, int category) {
  return (category != 0 && raw < (1 << (category - 1))) ? raw - (1 << category) + 1 : raw;
}

// The SecondPart that the kFastAcBits-bit string `bits` starts with.
JJ_HD inline SecondPart SecondPartAt(const HuffmanDecodeTable& t, uint32_t bits) {
  const SecondPart none = {0xFF, 0, 0, 0};
  int len, symbol;
  int32_t code;
  if (!ShortCodeAt(t, bits, &len, &symbol, &code)) return none;
  const int run = symbol >> 4, category = symbol & 15;
  if (category == 0 && run != 15 && symbol != 0x00) return none;  // EOBn: the slow path's
  if (len + category > kFastAcBits) return none;
  const int rest = kFastAcBits - len - category;
  const int32_t value = Extend(static_cast<int32_t>(bits >> rest) & ((1 << category) - 1), category);
  if (value < -128 || value > 127) return none;
  return SecondPart{static_cast<uint8_t>(len + category), static_cast<uint8_t>(run),
                    static_cast<uint8_t>(symbol == 0x00 ? 1 : 0), static_cast<int8_t>(value)};
}

// Adds to `e` the second part that starts the n bits left in its index (the
// part was looked up with zeros after them), if it fits them. Without
// branches: whether it fits changes from one index to the next.
JJ_HD inline void AddFastAcSecondPart(const SecondPart& part, int n, FastAcEntry* e) {
  const bool fits = part.bits <= n;
  const bool value = fits && !part.is_eob;
  const int second_at = e->run + 1 + part.run;  // after an EOB: a 0 after the first
  e->consumed = static_cast<uint8_t>(e->consumed + (fits ? part.bits : 0));
  e->second_at = static_cast<uint8_t>(fits ? second_at : e->second_at);
  e->advance = static_cast<uint8_t>(value ? second_at + 1 : e->advance);
  e->second_value = static_cast<int8_t>(value ? part.value : 0);
  e->shift_kind = PackShiftKind(FirstShift(*e), fits ? (part.is_eob ? kValueThenEob : kTwoCodes)
                                                     : kOneCode);
}

// Fast AC entry `index`, from a table whose lookahead is built: the code
// its bits start with and, where it fits, the next one (see FastAcEntry).
// 0 (decode the slow way) for longer codes or values, EOBn and undefined
// codes.
JJ_HD inline FastAcEntry FastAcEntryAt(const HuffmanDecodeTable& t, uint32_t index) {
  FastAcEntry e = {};
  int len, symbol;
  int32_t code;
  if (!ShortCodeAt(t, index, &len, &symbol, &code)) return e;
  const int run = symbol >> 4, category = symbol & 15;
  const int shift = kFastAcBits - len;
  if (symbol == 0x00) {  // EOB
    e.consumed = static_cast<uint8_t>(len);
    e.shift_kind = PackShiftKind(0, kEobFirst);
    return e;
  }
  if (category == 0 && run != 15) return e;  // EOBn
  if (category != 0 && shift == 0) return e;  // the value's sign bit is not in the index
  const int first = len + category;
  const int rest = kFastAcBits - first;  // may be negative: value bits beyond the index
  e.consumed = static_cast<uint8_t>(first);
  e.shift_kind = PackShiftKind(64 - first, kOneCode);
  e.run = static_cast<uint8_t>(run);
  e.second_at = static_cast<uint8_t>(run);
  e.advance = static_cast<uint8_t>(run + 1);
  const bool negative = category != 0 && ((index >> (shift - 1)) & 1) == 0;
  e.bias = static_cast<uint16_t>(-(code << category) - (negative ? (1 << category) - 1 : 0));
  if (rest > 0) {
    AddFastAcSecondPart(SecondPartAt(t, (index << first) & ((1u << kFastAcBits) - 1)), rest, &e);
  }
  return e;
}

// Whether entries with a second part are common (`pairs` of the table's
// entries): entropy-coded bits are close to random, so the share of indices
// that hold one estimates how often the decoder meets one.
JJ_HD JJ_INLINE int32_t PairsAreCommon(int pairs) { return pairs * 4 >= (1 << kFastAcBits) ? 1 : 0; }

JJ_HD JJ_INLINE bool HoldsPair(const FastAcEntry& e) {
  const int kind = e.shift_kind >> kKindShift;
  return kind == kTwoCodes || kind == kValueThenEob;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_HUFFMAN_DECODE_H_
