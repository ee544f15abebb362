#include "inflate.h"

#include <algorithm>
#include <cstring>

#include "deflate_format.h"

namespace jaxjpeg {
namespace {

using deflate::kCodeLengthOrder;
using deflate::kCodeLengthSymbols;
using deflate::kDistanceBase;
using deflate::kDistanceExtraBits;
using deflate::kEndOfBlock;
using deflate::kLengthBase;
using deflate::kLengthExtraBits;
using deflate::kStaticDistanceSymbols;
using deflate::kStaticLiteralLengthSymbols;

constexpr int kMaxBits = deflate::kMaxCodeBits;
constexpr int kRootBits = 11;  // codes this short decode with one table read
constexpr int kLiteralLengthSymbols = kStaticLiteralLengthSymbols;

// Bits least significant first; zeros past the input's end, counted, so
// that a block reading them is found truncated when it ends.
class BitReader {
 public:
  BitReader(const uint8_t* in, int64_t size) : begin_(in), next_(in), end_(in + size) {}

  // At least 56 bits held: a length, its extra bits, a distance and its
  // extra bits take at most 48.
  void Refill() {
    if (held_ > 56) return;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (end_ - next_ >= 8) {
      // Eight bytes at once; the ones past the bits counted as held are
      // the next bytes' own, which the next refill ORs in again.
      uint64_t word;
      std::memcpy(&word, next_, 8);
      bits_ |= word << held_;
      next_ += (63 - held_) >> 3;
      held_ |= 56;
      return;
    }
#endif
    while (held_ <= 56) {
      const uint64_t byte = next_ < end_ ? *next_++ : (++past_end_, 0);
      bits_ |= byte << held_;
      held_ += 8;
    }
  }

  int held() const { return held_; }
  uint64_t Peek() const { return bits_; }
  void Drop(int n) {
    bits_ >>= n;
    held_ -= n;
  }
  // n <= 32 bits, held.
  uint32_t Take(int n) {
    const uint32_t value = static_cast<uint32_t>(bits_ & ((uint64_t{1} << n) - 1));
    Drop(n);
    return value;
  }
  void AlignToByte() { Drop(held_ & 7); }

  // Bits read from the input's start (more than it holds where a read went past its end).
  int64_t Consumed() const { return 8 * (next_ - begin_ + past_end_) - held_; }

  // Reads on from byte `at` (<= the input's size).
  void Seek(int64_t at) {
    next_ = begin_ + at;
    bits_ = 0;
    held_ = 0;
    past_end_ = 0;
  }

  const uint8_t* begin() const { return begin_; }

 private:
  const uint8_t* begin_;
  const uint8_t* next_;
  const uint8_t* end_;
  uint64_t bits_ = 0;
  int held_ = 0;
  int64_t past_end_ = 0;
};

// A canonical Huffman code: a table indexed by the next kRootBits bits for
// codes that short, the counts and symbols in code order (as puff keeps
// them) for the longer ones.
struct Huffman {
  uint16_t count[kMaxBits + 1];
  uint16_t symbol[kLiteralLengthSymbols];
  uint32_t root[1 << kRootBits];  // symbol << 8 | code length; 0: a longer code
};

uint32_t Reversed(uint32_t code, int length) {
  uint32_t reversed = 0;
  for (int b = 0; b < length; ++b, code >>= 1) reversed = (reversed << 1) | (code & 1);
  return reversed;
}

// The code of `lengths` (n symbols); false where it is over-subscribed, or
// incomplete and not a code zlib takes so (a distance or literal/length
// code of at most one symbol, of one bit).
bool Build(const uint8_t* lengths, int n, bool may_be_incomplete, Huffman* code) {
  std::fill(code->count, code->count + kMaxBits + 1, 0);
  for (int s = 0; s < n; ++s) ++code->count[lengths[s]];
  code->count[0] = 0;
  int left = 1, longest = 0;
  for (int length = 1; length <= kMaxBits; ++length) {
    left = 2 * left - code->count[length];
    if (left < 0) return false;
    if (code->count[length] > 0) longest = length;
  }
  if (left > 0 && !(may_be_incomplete && longest <= 1)) return false;
  uint16_t offset[kMaxBits + 2] = {};
  for (int length = 1; length <= kMaxBits; ++length) {
    offset[length + 1] = offset[length] + code->count[length];
  }
  for (int s = 0; s < n; ++s) {
    if (lengths[s] != 0) code->symbol[offset[lengths[s]]++] = static_cast<uint16_t>(s);
  }
  std::fill(code->root, code->root + (1 << kRootBits), 0u);
  uint32_t next = 0;
  int index = 0;
  for (int length = 1; length <= kRootBits; ++length, next <<= 1) {
    for (int k = 0; k < code->count[length]; ++k, ++next) {
      const uint32_t entry = uint32_t{code->symbol[index++]} << 8 | static_cast<uint32_t>(length);
      for (uint32_t at = Reversed(next, length); at < (1u << kRootBits); at += 1u << length) {
        code->root[at] = entry;
      }
    }
  }
  return true;
}

// A code longer than kRootBits, a bit at a time (RFC 1951 3.2.2's
// canonical order); -1 where no code matches.
__attribute__((noinline)) int DecodeLong(BitReader* reader, const Huffman& code) {
  uint64_t bits = reader->Peek();
  int value = 0, first = 0, index = 0;
  for (int length = 1; length <= kMaxBits; ++length, bits >>= 1) {
    value |= static_cast<int>(bits & 1);
    const int count = code.count[length];
    if (value - count < first) {
      reader->Drop(length);
      return code.symbol[index + (value - first)];
    }
    index += count;
    first = (first + count) << 1;
    value <<= 1;
  }
  return -1;
}

// The next symbol (>= 15 bits held); -1 where no code matches.
inline int Decode(BitReader* reader, const Huffman& code) {
  const uint32_t entry = code.root[reader->Peek() & ((1u << kRootBits) - 1)];
  if (entry == 0) return DecodeLong(reader, code);
  reader->Drop(static_cast<int>(entry & 0xFF));
  return static_cast<int>(entry >> 8);
}

struct Output {
  uint8_t* data;
  int64_t size;
  int64_t at = 0;
};

// Copies `length` bytes from `distance` back (they may overlap the copy).
void CopyBack(Output* out, int64_t distance, int length) {
  uint8_t* to = out->data + out->at;
  const uint8_t* from = to - distance;
  if (distance == 1) {
    std::memset(to, *from, static_cast<size_t>(length));
  } else if (distance >= length) {
    std::memcpy(to, from, static_cast<size_t>(length));
  } else {
    for (int k = 0; k < length; ++k) to[k] = from[k];
  }
  out->at += length;
}

// The match a length symbol (257-285; 33 bits held) starts: its length's
// extra bits, its distance, copied.
InflateStatus CopyMatch(BitReader* reader, int symbol, const Huffman& distances, Output* out) {
  const int length_code = symbol - 257;
  if (length_code >= deflate::kLengthCodes) return InflateStatus::kBadSymbol;
  const int length =
      kLengthBase[length_code] + static_cast<int>(reader->Take(kLengthExtraBits[length_code]));
  const int distance_code = Decode(reader, distances);
  if (distance_code < 0) return InflateStatus::kBadCode;
  if (distance_code >= deflate::kDistanceCodes) return InflateStatus::kBadSymbol;
  const int64_t distance = kDistanceBase[distance_code] +
                           static_cast<int64_t>(reader->Take(kDistanceExtraBits[distance_code]));
  if (distance > out->at) return InflateStatus::kTooFar;
  if (length > out->size - out->at) return InflateStatus::kTooLong;
  CopyBack(out, distance, length);
  return InflateStatus::kOk;
}

// A Huffman-coded block's symbols up to its end of block. The bit reader
// and the output position live in locals: bytes stored through a uint8_t
// pointer may alias any object whose address escapes, which would reload
// them after every literal.
InflateStatus Codes(BitReader* reader_state, const Huffman& lengths, const Huffman& distances,
                    Output* out_state) {
  BitReader reader = *reader_state;
  Output out = *out_state;
  InflateStatus status = InflateStatus::kOk;
  for (;;) {
    if (reader.held() < 48) reader.Refill();
    const int symbol = Decode(&reader, lengths);
    if (symbol < kEndOfBlock) {
      if (symbol < 0) {
        status = InflateStatus::kBadCode;
        break;
      }
      if (out.at == out.size) {
        status = InflateStatus::kTooLong;
        break;
      }
      out.data[out.at++] = static_cast<uint8_t>(symbol);
      continue;
    }
    if (symbol == kEndOfBlock) break;
    status = CopyMatch(&reader, symbol, distances, &out);
    if (status != InflateStatus::kOk) break;
  }
  *reader_state = reader;
  *out_state = out;
  return status;
}

InflateStatus Stored(BitReader* reader, int64_t in_size, Output* out) {
  reader->AlignToByte();
  reader->Refill();
  const uint32_t length = reader->Take(16);
  if (reader->Take(16) != (~length & 0xFFFF)) return InflateStatus::kBadBlock;
  const int64_t consumed = reader->Consumed();
  if (consumed > 8 * in_size || length > in_size - consumed / 8) return InflateStatus::kTruncated;
  if (length > out->size - out->at) return InflateStatus::kTooLong;
  if (length > 0) {  // (found by review: memcpy of nothing to a null output is undefined)
    std::memcpy(out->data + out->at, reader->begin() + consumed / 8, length);
  }
  out->at += length;
  reader->Seek(consumed / 8 + length);
  return InflateStatus::kOk;
}

const Huffman& FixedLengths() {
  static const Huffman code = [] {
    uint8_t lengths[kLiteralLengthSymbols];
    for (int s = 0; s < kLiteralLengthSymbols; ++s) {
      lengths[s] = static_cast<uint8_t>(deflate::StaticLength(s));
    }
    Huffman built;
    Build(lengths, kLiteralLengthSymbols, false, &built);
    return built;
  }();
  return code;
}

const Huffman& FixedDistances() {
  static const Huffman code = [] {
    uint8_t lengths[kStaticDistanceSymbols];
    std::fill(lengths, lengths + kStaticDistanceSymbols, deflate::kStaticDistanceBits);
    Huffman built;
    Build(lengths, kStaticDistanceSymbols, false, &built);
    return built;
  }();
  return code;
}

// A dynamic block's header: its two codes, sent as code lengths coded by a
// third (RFC 1951 3.2.7).
InflateStatus DynamicCodes(BitReader* reader, Huffman* lengths, Huffman* distances) {
  reader->Refill();
  const int literal_codes = static_cast<int>(reader->Take(5)) + 257;
  const int distance_codes = static_cast<int>(reader->Take(5)) + 1;
  const int length_codes = static_cast<int>(reader->Take(4)) + 4;
  if (literal_codes > deflate::kLiteralLengthCodes || distance_codes > deflate::kDistanceCodes) {
    return InflateStatus::kBadCode;
  }
  uint8_t code_lengths[kCodeLengthSymbols] = {};
  for (int i = 0; i < length_codes; ++i) {
    if (reader->held() < 3) reader->Refill();
    code_lengths[kCodeLengthOrder[i]] = static_cast<uint8_t>(reader->Take(3));
  }
  Huffman code_length_code;
  if (!Build(code_lengths, kCodeLengthSymbols, false, &code_length_code)) {
    return InflateStatus::kBadCode;
  }
  uint8_t all[deflate::kLiteralLengthCodes + deflate::kDistanceCodes] = {};
  const int total = literal_codes + distance_codes;
  for (int at = 0; at < total;) {
    if (reader->held() < 32) reader->Refill();
    const int symbol = Decode(reader, code_length_code);
    if (symbol < 0) return InflateStatus::kBadCode;
    if (symbol < 16) {
      all[at++] = static_cast<uint8_t>(symbol);
      continue;
    }
    if (symbol == 16 && at == 0) return InflateStatus::kBadCode;  // nothing to repeat
    const uint8_t repeated = symbol == 16 ? all[at - 1] : 0;
    const int times = symbol == 16   ? 3 + static_cast<int>(reader->Take(2))
                      : symbol == 17 ? 3 + static_cast<int>(reader->Take(3))
                                     : 11 + static_cast<int>(reader->Take(7));
    if (times > total - at) return InflateStatus::kBadCode;
    std::fill(all + at, all + at + times, repeated);
    at += times;
  }
  if (all[kEndOfBlock] == 0) return InflateStatus::kBadCode;
  if (!Build(all, literal_codes, true, lengths) ||
      !Build(all + literal_codes, distance_codes, true, distances)) {
    return InflateStatus::kBadCode;
  }
  return InflateStatus::kOk;
}

}  // namespace

const char* InflateStatusText(InflateStatus status) {
  switch (status) {
    case InflateStatus::kOk: return "ok";
    case InflateStatus::kBadBlock: return "a bad block type or stored length";
    case InflateStatus::kBadCode: return "a bad Huffman code";
    case InflateStatus::kBadSymbol: return "a length or distance symbol deflate does not define";
    case InflateStatus::kTooFar: return "a distance too far back";
    case InflateStatus::kTooLong: return "more bytes than expected";
    case InflateStatus::kTooShort: return "fewer bytes than expected";
    case InflateStatus::kTruncated: return "the input ends inside a block";
    case InflateStatus::kBadEnd: return "a piece does not end where the next starts";
  }
  return "unknown";
}

InflateStatus InflatePiece(const uint8_t* in, int64_t in_size, uint8_t* out_data,
                           int64_t out_size, bool last) {
  BitReader reader(in, in_size);
  Output out{out_data, out_size};
  Huffman lengths, distances;
  for (;;) {
    reader.Refill();
    const bool final_block = reader.Take(1) != 0;
    const uint32_t type = reader.Take(2);
    if (final_block && !last) return InflateStatus::kBadEnd;
    InflateStatus status = InflateStatus::kBadBlock;
    if (type == 0) {
      status = Stored(&reader, in_size, &out);
    } else if (type == 1) {
      status = Codes(&reader, FixedLengths(), FixedDistances(), &out);
    } else if (type == 2) {
      status = DynamicCodes(&reader, &lengths, &distances);
      if (status == InflateStatus::kOk) status = Codes(&reader, lengths, distances, &out);
    }
    if (status != InflateStatus::kOk) return status;
    if (reader.Consumed() > 8 * in_size) return InflateStatus::kTruncated;
    if (final_block) break;
    if (!last && reader.Consumed() == 8 * in_size) break;  // a sync flush's end
  }
  if (last && (reader.Consumed() + 7) / 8 != in_size) return InflateStatus::kBadEnd;
  return out.at == out_size ? InflateStatus::kOk : InflateStatus::kTooShort;
}

}  // namespace jaxjpeg
