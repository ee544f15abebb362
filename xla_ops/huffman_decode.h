// Canonical Huffman decoding tables (T.81 C.2, F.2.2.3) with a lookahead table.
// Building runs on the host; the table is plain data so it can be copied to
// device memory (or staged in shared memory) and decoded from there.
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
  int32_t code = 0;
  int index = 0;
  for (int len = 1; len <= 16; ++len) {
    const int n = counts[len - 1];
    // Checked before the lookahead fill below writes anything: an
    // over-subscribed length would index past the table.
    if (code + n >= (1 << len)) return Status::kBadHuffmanTable;
    t->value_offset[len] = index - code;
    for (int i = 0; i < n; ++i, ++code, ++index) {
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

// What a kFastAcBits-bit string starts with, when that could be the second
// part of an entry: a complete coefficient or ZRL whose value fits int8, or
// an EOB.
struct SecondPart {
  uint8_t bits;  // its code and value bits; 0xFF: none (longer, EOBn, undefined)
  uint8_t run;
  uint8_t is_eob;
  int8_t value;
};

// Calls visit(code, len, symbol) for every code of up to kFastAcBits bits,
// in order. These are the codes DecodeSymbol finds: in a table that
// BuildHuffmanDecodeTable accepted, its length-by-length search ends exactly
// at the code that is a prefix.
template <typename Visit>
inline void ForEachShortCode(const HuffmanDecodeTable& t, Visit visit) {
  int32_t code = 0;
  for (int len = 1; len <= kFastAcBits; ++len) {
    for (; code <= t.max_code[len]; ++code) visit(code, len, t.symbols[code + t.value_offset[len]]);
    code <<= 1;
  }
}

// The coefficient a value of `category` bits `raw` stands for (T.81 F.2.2.1
// EXTEND): a leading 0 bit means a negative value.
inline int32_t Extend(int32_t raw, int category) {
  return (category != 0 && raw < (1 << (category - 1))) ? raw - (1 << category) + 1 : raw;
}

// SecondPart for every kFastAcBits-bit string.
inline void FillSecondParts(const HuffmanDecodeTable& t, SecondPart parts[1 << kFastAcBits]) {
  for (int i = 0; i < (1 << kFastAcBits); ++i) parts[i] = SecondPart{0xFF, 0, 0, 0};
  ForEachShortCode(t, [&](int32_t code, int len, int symbol) {
    const int run = symbol >> 4, category = symbol & 15;
    if (category == 0 && run != 15 && symbol != 0x00) return;  // EOBn: the slow path's
    if (len + category > kFastAcBits) return;
    const int shift = kFastAcBits - len;
    for (int fill = 0; fill < (1 << shift); ++fill) {
      const int32_t value = Extend((fill >> (shift - category)) & ((1 << category) - 1), category);
      if (value < -128 || value > 127) continue;
      parts[(code << shift) | fill] =
          SecondPart{static_cast<uint8_t>(len + category), static_cast<uint8_t>(run),
                     static_cast<uint8_t>(symbol == 0x00 ? 1 : 0), static_cast<int8_t>(value)};
    }
  });
}

// Adds to `e` the second part that starts the n bits left in its index (the
// part was looked up with zeros after them), if it fits them. Without
// branches: whether it fits changes from one index to the next, and
// mispredictions made building tables slow.
inline void AddFastAcSecondPart(const SecondPart& part, int n, FastAcEntry* e) {
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

// Fills the fast entries whose index starts with `code` (`len` bits) for
// `symbol`. Leaves the others (longer codes or values, EOBn) 0.
inline void FillFastAcCode(const SecondPart parts[1 << kFastAcBits], int32_t code, int len,
                           int symbol, FastAcTable* fast) {
  const int run = symbol >> 4, category = symbol & 15;
  const int shift = kFastAcBits - len;
  const uint32_t begin = static_cast<uint32_t>(code) << shift, end = begin + (1u << shift);
  if (symbol == 0x00) {  // EOB
    for (uint32_t i = begin; i < end; ++i) fast->entry[i].consumed = static_cast<uint8_t>(len);
    for (uint32_t i = begin; i < end; ++i) fast->entry[i].shift_kind = PackShiftKind(0, kEobFirst);
    return;
  }
  if (category == 0 && run != 15) return;  // EOBn
  if (category != 0 && shift == 0) return;  // the value's sign bit is not in the index
  const int first = len + category;
  const int rest = kFastAcBits - first;  // may be negative: value bits beyond the index
  for (uint32_t i = begin; i < end; ++i) {
    FastAcEntry e = {};
    e.consumed = static_cast<uint8_t>(first);
    e.shift_kind = PackShiftKind(64 - first, kOneCode);
    e.run = static_cast<uint8_t>(run);
    e.second_at = static_cast<uint8_t>(run);
    e.advance = static_cast<uint8_t>(run + 1);
    const bool negative = category != 0 && ((i >> (shift - 1)) & 1) == 0;
    e.bias = static_cast<uint16_t>(-(code << category) - (negative ? (1 << category) - 1 : 0));
    if (rest > 0) AddFastAcSecondPart(parts[(i << first) & ((1u << kFastAcBits) - 1)], rest, &e);
    fast->entry[i] = e;
  }
}

// Fills the AC fast table from a built AC decoding table. Returns whether
// entries with a second part are common: entropy-coded bits are close to
// random, so the share of indices that hold one estimates how often the
// decoder meets one.
inline bool BuildFastAcTable(const HuffmanDecodeTable& t, FastAcTable* fast) {
  SecondPart parts[1 << kFastAcBits];
  FillSecondParts(t, parts);
  for (int i = 0; i < (1 << kFastAcBits); ++i) fast->entry[i] = FastAcEntry{};
  ForEachShortCode(t, [&](int32_t code, int len, int symbol) {
    FillFastAcCode(parts, code, len, symbol, fast);
  });
  int pairs = 0;
  for (int i = 0; i < (1 << kFastAcBits); ++i) {
    const int kind = fast->entry[i].shift_kind >> kKindShift;
    pairs += kind == kTwoCodes || kind == kValueThenEob;
  }
  return pairs * 4 >= (1 << kFastAcBits);
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_HUFFMAN_DECODE_H_
