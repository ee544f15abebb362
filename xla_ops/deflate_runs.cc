#include "deflate_runs.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "code_lengths.h"
#include "deflate_format.h"

namespace jaxjpeg {
namespace {

using deflate::kCodeLengthOrder;
using deflate::kCodeLengthSymbols;
using deflate::kEndOfBlock;
using deflate::kMaxCodeBits;
using deflate::kStaticDistanceBits;
using deflate::StaticLength;

constexpr int kLiteralLengthSymbols = deflate::kLiteralLengthCodes;
constexpr int kStaticSymbols = deflate::kStaticLiteralLengthSymbols;
constexpr int kMinRun = 3;
constexpr int kMaxRun = 258;
constexpr int kMaxCodeLengthBits = 7;
constexpr int64_t kStoredMaxBytes = 65535;
// A run is a match 1 byte back: distance code 0. A second code, never used,
// makes the distance code complete (as zlib writes it): 1 bit each.
constexpr int kSentDistanceCodes = 2;
constexpr uint8_t kDistanceLengths[kSentDistanceCodes] = {1, 1};
constexpr int kBlockHeaderBits = 3;  // BFINAL, BTYPE
constexpr int kStoredLengthBits = 32;  // LEN, NLEN

enum BlockType : uint8_t { kStored = 0, kStatic = 1, kDynamic = 2 };

// A run's length symbol and its extra bits (RFC 1951 3.2.5).
struct LengthCode {
  uint16_t symbol;
  uint8_t extra_bits;
  uint16_t extra;
};

struct LengthCodes {
  LengthCode of[kMaxRun + 1];

  LengthCodes() {
    using deflate::kLengthBase;
    for (int code = 0; code < deflate::kLengthCodes; ++code) {
      const int end = code + 1 < deflate::kLengthCodes ? kLengthBase[code + 1] : kMaxRun + 1;
      for (int length = kLengthBase[code]; length < end; ++length) {
        of[length] = {static_cast<uint16_t>(257 + code), deflate::kLengthExtraBits[code],
                      static_cast<uint16_t>(length - kLengthBase[code])};
      }
    }
  }
};

const LengthCodes& RunLengthCodes() {
  static const LengthCodes codes;
  return codes;
}

// What a block's bits depend on.
struct Histogram {
  uint64_t count[kLiteralLengthSymbols] = {};  // the end of block counted once
  uint64_t extra_bits = 0;                     // the runs' length extra bits
  uint64_t runs = 0;
  int64_t bytes = 0;

  Histogram() { count[kEndOfBlock] = 1; }

  void Add(const Histogram& other) {
    for (int s = 0; s < kLiteralLengthSymbols; ++s) count[s] += other.count[s];
    count[kEndOfBlock] = 1;
    extra_bits += other.extra_bits;
    runs += other.runs;
    bytes += other.bytes;
  }
};

uint64_t Load64(const uint8_t* p) {
  uint64_t word;
  std::memcpy(&word, p, 8);
  return word;
}

// 0x80 in every byte of `word` that is zero (exact: no borrow between bytes).
uint64_t ZeroBytes(uint64_t word) {
  constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7Full;
  return ~(((word & kLow7) + kLow7) | word | kLow7);
}

// Positions tested at once for a run's start (noise's literals in bulk).
constexpr int kLiteralSpan = 14;

// The first of the kLiteralSpan positions from `at` (>= 1, 16 bytes
// readable from it) where a run starts: a byte equal to the one before it,
// and the two after it too; kLiteralSpan where none does.
int FirstRunStart(const uint8_t* at) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  const uint64_t low = ZeroBytes(Load64(at) ^ Load64(at - 1));       // positions 0-7
  const uint64_t high = ZeroBytes(Load64(at + 8) ^ Load64(at + 7));  // positions 8-15
  const uint64_t starts_low = low & (low >> 8 | high << 56) & (low >> 16 | high << 48);
  const uint64_t starts_high = high & (high >> 8) & (high >> 16) & 0x0000808080808080ull;
  if (starts_low) return __builtin_ctzll(starts_low) >> 3;
  if (starts_high) return 8 + (__builtin_ctzll(starts_high) >> 3);
  return kLiteralSpan;
#else
  (void)at;
  return 0;
#endif
}

// Literals and runs of [begin, end), greedy: a byte equal to the one before
// it starts a run, kept where 3 or more long (zlib's deflate_rle). The
// bytes before the next run start found (FirstRunStart) are literals at
// once.
template <typename Sink>
void ParseChunk(const uint8_t* data, int64_t begin, int64_t end, Sink& sink) {
  int64_t i = begin;
  while (i < end) {
    if (i > 0 && i + 16 <= end) {
      const int literals = FirstRunStart(data + i);
      if (literals == kLiteralSpan) {   // noise: a fixed count, unrolled
        sink.Literals(data + i, kLiteralSpan);
        i += kLiteralSpan;
        continue;
      }
      if (literals > 0) {
        sink.Literals(data + i, literals);
        i += literals;
        continue;
      }
    }
    if (i > 0 && data[i] == data[i - 1]) {
      const uint8_t repeated = data[i - 1];
      const int64_t limit = std::min<int64_t>(end - i, kMaxRun);
      int64_t run = 1;
      while (run < limit && data[i + run] == repeated) ++run;
      if (run >= kMinRun) {
        sink.Run(static_cast<int>(run));
        i += run;
        continue;
      }
    }
    sink.Literal(data[i]);
    ++i;
  }
}

// Parses [begin, end) a chunk at a time: a block's symbols are its chunks'.
template <typename Sink>
void ParseBlock(const uint8_t* data, int64_t begin, int64_t end, Sink& sink) {
  for (int64_t chunk = begin; chunk < end; chunk += kRunChunkBytes) {
    ParseChunk(data, chunk, std::min(end, chunk + kRunChunkBytes), sink);
  }
}

// Literals counted in four tables, merged at the end: a byte repeated
// close by waits on its own count's store otherwise.
struct Counter {
  Histogram* histogram;
  const LengthCodes& codes;
  uint32_t literals[4][256] = {};

  void Literal(uint8_t byte) { ++literals[0][byte]; }
  __attribute__((always_inline)) void Literals(const uint8_t* bytes, int count) {
    for (int k = 0; k < count; ++k) ++literals[k & 3][bytes[k]];
  }
  void Run(int length) {
    const LengthCode& code = codes.of[length];
    ++histogram->count[code.symbol];
    histogram->extra_bits += code.extra_bits;
    ++histogram->runs;
  }
  void Finish() {
    for (int byte = 0; byte < 256; ++byte) {
      histogram->count[byte] += uint64_t{literals[0][byte]} + literals[1][byte] +
                                literals[2][byte] + literals[3][byte];
    }
  }
};

Histogram Count(const uint8_t* data, int64_t begin, int64_t end) {
  static_assert(kRunChunkBytes < (int64_t{1} << 32), "a chunk's counts fit 32 bits");
  Histogram histogram;
  Counter counter{&histogram, RunLengthCodes()};
  ParseBlock(data, begin, end, counter);
  counter.Finish();
  histogram.bytes = end - begin;
  return histogram;
}

struct CodeLengthSymbol {
  uint8_t symbol;
  uint8_t extra;
};

int CodeLengthExtraBits(int symbol) {
  return symbol == 16 ? 2 : symbol == 17 ? 3 : symbol == 18 ? 7 : 0;
}

// A dynamic block's codes and the header that sends them.
struct DynamicCode {
  uint8_t lengths[kLiteralLengthSymbols];
  int literal_codes;  // HLIT + 257
  CodeLengthSymbol sequence[kLiteralLengthSymbols + kSentDistanceCodes];
  int sequence_size = 0;
  uint8_t code_length_lengths[kCodeLengthSymbols];
  int code_length_codes;  // HCLEN + 4
  uint64_t header_bits;   // after BFINAL and BTYPE
};

// The literal/length and distance code lengths as one sequence (a repeat
// may cross from one to the other): runs of zeros as symbols 17 and 18, a
// length repeated 3-6 times after itself as symbol 16.
void RunLengthCode(const uint8_t* lengths, int n, DynamicCode* code) {
  auto put = [code](int symbol, int extra) {
    code->sequence[code->sequence_size++] = {static_cast<uint8_t>(symbol),
                                             static_cast<uint8_t>(extra)};
  };
  for (int i = 0; i < n;) {
    const uint8_t length = lengths[i];
    int run = 1;
    while (i + run < n && lengths[i + run] == length) ++run;
    i += run;
    if (length == 0) {
      for (; run >= 11; run -= std::min(run, 138)) put(18, std::min(run, 138) - 11);
      if (run >= 3) {
        put(17, run - 3);
        run = 0;
      }
    } else {
      put(length, 0);
      for (--run; run >= 3; run -= std::min(run, 6)) put(16, std::min(run, 6) - 3);
    }
    for (; run > 0; --run) put(length, 0);
  }
}

void BuildDynamicCode(const Histogram& histogram, DynamicCode* code) {
  DeflateCodeLengths(histogram.count, kLiteralLengthSymbols, kMaxCodeBits, code->lengths);
  code->literal_codes = kLiteralLengthSymbols;
  while (code->literal_codes > 257 && code->lengths[code->literal_codes - 1] == 0) {
    --code->literal_codes;
  }
  uint8_t all[kLiteralLengthSymbols + kSentDistanceCodes];
  std::memcpy(all, code->lengths, code->literal_codes);
  std::memcpy(all + code->literal_codes, kDistanceLengths, kSentDistanceCodes);
  code->sequence_size = 0;
  RunLengthCode(all, code->literal_codes + kSentDistanceCodes, code);

  uint64_t counts[kCodeLengthSymbols] = {};
  for (int i = 0; i < code->sequence_size; ++i) ++counts[code->sequence[i].symbol];
  DeflateCodeLengths(counts, kCodeLengthSymbols, kMaxCodeLengthBits, code->code_length_lengths);
  code->code_length_codes = kCodeLengthSymbols;
  while (code->code_length_codes > 4 &&
         code->code_length_lengths[kCodeLengthOrder[code->code_length_codes - 1]] == 0) {
    --code->code_length_codes;
  }
  uint64_t bits = 5 + 5 + 4 + 3 * code->code_length_codes;
  for (int i = 0; i < code->sequence_size; ++i) {
    const int symbol = code->sequence[i].symbol;
    bits += code->code_length_lengths[symbol] + CodeLengthExtraBits(symbol);
  }
  code->header_bits = bits;
}

uint64_t DynamicBits(const Histogram& histogram, const DynamicCode& code) {
  uint64_t bits = kBlockHeaderBits + code.header_bits + histogram.extra_bits +
                  histogram.runs * kDistanceLengths[0];
  for (int s = 0; s < kLiteralLengthSymbols; ++s) bits += histogram.count[s] * code.lengths[s];
  return bits;
}

uint64_t StaticBits(const Histogram& histogram) {
  uint64_t bits = kBlockHeaderBits + histogram.extra_bits + histogram.runs * kStaticDistanceBits;
  for (int s = 0; s < kLiteralLengthSymbols; ++s) bits += histogram.count[s] * StaticLength(s);
  return bits;
}

// Stored blocks of at most kStoredMaxBytes from bit `position` on.
uint64_t StoredBits(int64_t bytes, uint64_t position) {
  uint64_t end = position;
  for (int64_t left = bytes; left > 0; left -= std::min(left, kStoredMaxBytes)) {
    end = ((end + kBlockHeaderBits + 7) & ~uint64_t{7}) + kStoredLengthBits +
          8 * static_cast<uint64_t>(std::min(left, kStoredMaxBytes));
  }
  return end - position;
}

// A block's bits wherever it starts: what merging chunks compares.
uint64_t BlockCost(const Histogram& histogram) {
  DynamicCode code;
  BuildDynamicCode(histogram, &code);
  const uint64_t stored = 8 * static_cast<uint64_t>(histogram.bytes) + 40;
  return std::min({DynamicBits(histogram, code), StaticBits(histogram), stored});
}

struct Block {
  int64_t begin;
  int64_t end;
  BlockType type;
  int code;  // index of its DynamicCode in the plan
};

}  // namespace

struct RunBlocks::Plan {
  std::vector<Block> blocks;
  std::vector<DynamicCode> codes;
  uint64_t bits = 0;
};

namespace {

using Plan = RunBlocks::Plan;

// Closes a block: the type of fewest bits where it starts.
void AddBlock(Plan* plan, const Histogram& histogram, int64_t begin, int64_t end) {
  DynamicCode code;
  BuildDynamicCode(histogram, &code);
  const uint64_t dynamic = DynamicBits(histogram, code);
  const uint64_t fixed = StaticBits(histogram);
  const uint64_t stored = StoredBits(end - begin, plan->bits);
  Block block{begin, end, kDynamic, -1};
  uint64_t bits = dynamic;
  if (fixed < bits) block.type = kStatic, bits = fixed;
  if (stored < bits) block.type = kStored, bits = stored;
  if (block.type == kDynamic) {
    block.code = static_cast<int>(plan->codes.size());
    plan->codes.push_back(code);
  }
  plan->blocks.push_back(block);
  plan->bits += bits;
}

uint64_t AlignedToByte(uint64_t bits) { return (bits + 7) & ~uint64_t{7}; }

// Chunks merged into one block while the merged block costs no more than
// the two apart.
Plan PlanBlocks(const uint8_t* data, int64_t n, bool last) {
  Plan plan;
  Histogram current;
  uint64_t current_cost = 0;
  int64_t begin = 0;
  for (int64_t chunk = 0; chunk < n; chunk += kRunChunkBytes) {
    const Histogram next = Count(data, chunk, std::min(n, chunk + kRunChunkBytes));
    const uint64_t next_cost = BlockCost(next);
    if (chunk > begin) {
      Histogram merged = current;
      merged.Add(next);
      const uint64_t merged_cost = BlockCost(merged);
      if (merged_cost <= current_cost + next_cost) {
        current = merged;
        current_cost = merged_cost;
        continue;
      }
      AddBlock(&plan, current, begin, chunk);
      begin = chunk;
    }
    current = next;
    current_cost = next_cost;
  }
  if (n > 0) AddBlock(&plan, current, begin, n);
  if (!last) {  // the sync flush's empty stored block
    plan.bits = AlignedToByte(plan.bits + kBlockHeaderBits) + kStoredLengthBits;
  } else {
    if (n == 0) plan.bits += kBlockHeaderBits + StaticLength(kEndOfBlock);
    plan.bits = AlignedToByte(plan.bits);
  }
  return plan;
}

// Bits least significant first into a buffer of known size; a write past
// its end is dropped and remembered.
class LsbBitWriter {
 public:
  LsbBitWriter(uint8_t* begin, uint8_t* end) : next_(begin), end_(end) {}

  // count <= 32
  void Put(uint64_t bits, int count) {
    pending_ |= bits << filled_;
    filled_ += count;
    if (filled_ >= 32) {
      PutWord(static_cast<uint32_t>(pending_));
      pending_ >>= 32;
      filled_ -= 32;
    }
  }

  void AlignToByte() {
    filled_ = (filled_ + 7) & ~7;
    for (; filled_ > 0; filled_ -= 8, pending_ >>= 8) PutByte(static_cast<uint8_t>(pending_));
  }

  void PutBytes(const uint8_t* bytes, int64_t n) {
    AlignToByte();
    if (n > end_ - next_) {
      overflow_ = true;
      return;
    }
    std::memcpy(next_, bytes, static_cast<size_t>(n));
    next_ += n;
  }

  uint8_t* next() const { return next_; }
  bool overflow() const { return overflow_; }

 private:
  void PutByte(uint8_t byte) {
    if (next_ == end_) {
      overflow_ = true;
      return;
    }
    *next_++ = byte;
  }

  // Four bytes, least significant first.
  void PutWord(uint32_t word) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (end_ - next_ >= 4) {
      std::memcpy(next_, &word, 4);
      next_ += 4;
      return;
    }
#endif
    for (int i = 0; i < 4; ++i) PutByte(static_cast<uint8_t>(word >> (8 * i)));
  }

  uint8_t* next_;
  uint8_t* end_;
  uint64_t pending_ = 0;
  int filled_ = 0;
  bool overflow_ = false;
};

// Canonical codes of `lengths` (RFC 1951 3.2.2), bit-reversed: deflate
// sends a code's most significant bit first into a stream read from its
// least significant end.
void CanonicalCodes(const uint8_t* lengths, int n, uint16_t* codes) {
  int count[kMaxCodeBits + 1] = {};
  for (int s = 0; s < n; ++s) ++count[lengths[s]];
  count[0] = 0;
  uint32_t next[kMaxCodeBits + 1] = {};
  uint32_t code = 0;
  for (int bits = 1; bits <= kMaxCodeBits; ++bits) {
    code = (code + count[bits - 1]) << 1;
    next[bits] = code;
  }
  for (int s = 0; s < n; ++s) {
    const int length = lengths[s];
    uint32_t value = length > 0 ? next[length]++ : 0;
    uint32_t reversed = 0;
    for (int b = 0; b < length; ++b, value >>= 1) reversed = (reversed << 1) | (value & 1);
    codes[s] = static_cast<uint16_t>(reversed);
  }
}

struct Emitter {
  LsbBitWriter* writer;
  const uint16_t* codes;
  const uint8_t* lengths;
  int distance_bits;  // distance code 0 is all zero bits in both codes
  const LengthCodes& runs;

  void Literal(uint8_t byte) { writer->Put(codes[byte], lengths[byte]); }
  // Two codes a write: 2 x 15 bits fit one Put (noise's literals took most
  // of the writing).
  __attribute__((always_inline)) void Literals(const uint8_t* bytes, int count) {
    static_assert(2 * kMaxCodeBits <= 32, "two codes must fit one Put");
    int k = 0;
    for (; k + 2 <= count; k += 2) {
      const uint8_t a = bytes[k], b = bytes[k + 1];
      writer->Put(codes[a] | (uint64_t{codes[b]} << lengths[a]), lengths[a] + lengths[b]);
    }
    if (k < count) Literal(bytes[k]);
  }
  // The length's code and extra bits, then the distance's code (all zero
  // bits), in one Put: at most 15 + 5 + 5 bits.
  void Run(int length) {
    const LengthCode& code = runs.of[length];
    writer->Put(codes[code.symbol] | (uint64_t{code.extra} << lengths[code.symbol]),
                lengths[code.symbol] + code.extra_bits + distance_bits);
  }
};

void WriteDynamicHeader(const DynamicCode& code, LsbBitWriter* writer) {
  writer->Put(code.literal_codes - 257, 5);
  writer->Put(kSentDistanceCodes - 1, 5);
  writer->Put(code.code_length_codes - 4, 4);
  for (int i = 0; i < code.code_length_codes; ++i) {
    writer->Put(code.code_length_lengths[kCodeLengthOrder[i]], 3);
  }
  uint16_t codes[kCodeLengthSymbols];
  CanonicalCodes(code.code_length_lengths, kCodeLengthSymbols, codes);
  for (int i = 0; i < code.sequence_size; ++i) {
    const CodeLengthSymbol& entry = code.sequence[i];
    writer->Put(codes[entry.symbol], code.code_length_lengths[entry.symbol]);
    writer->Put(entry.extra, CodeLengthExtraBits(entry.symbol));
  }
}

void WriteStored(const uint8_t* data, const Block& block, bool final_block,
                 LsbBitWriter* writer) {
  for (int64_t at = block.begin; at < block.end;) {
    const int64_t piece = std::min(block.end - at, kStoredMaxBytes);
    writer->Put(final_block && at + piece == block.end, 1);
    writer->Put(kStored, 2);
    writer->AlignToByte();
    writer->Put(static_cast<uint64_t>(piece), 16);
    writer->Put(static_cast<uint64_t>(piece) ^ 0xFFFF, 16);
    writer->PutBytes(data + at, piece);
    at += piece;
  }
}

void WriteCoded(const uint8_t* data, const Block& block, const uint8_t* lengths, int symbols,
                int distance_bits, LsbBitWriter* writer) {
  uint16_t codes[kStaticSymbols];
  CanonicalCodes(lengths, symbols, codes);
  Emitter emitter{writer, codes, lengths, distance_bits, RunLengthCodes()};
  ParseBlock(data, block.begin, block.end, emitter);
  writer->Put(codes[kEndOfBlock], lengths[kEndOfBlock]);
}

const uint8_t* StaticLengths() {
  static const auto lengths = [] {
    std::vector<uint8_t> all(kStaticSymbols);
    for (int s = 0; s < kStaticSymbols; ++s) all[s] = static_cast<uint8_t>(StaticLength(s));
    return all;
  }();
  return lengths.data();
}

void WriteBlocks(const uint8_t* data, const Plan& plan, bool last, LsbBitWriter* writer) {
  for (size_t i = 0; i < plan.blocks.size(); ++i) {
    const Block& block = plan.blocks[i];
    const bool final_block = last && i + 1 == plan.blocks.size();
    if (block.type == kStored) {
      WriteStored(data, block, final_block, writer);
      continue;
    }
    writer->Put(final_block, 1);
    writer->Put(block.type, 2);
    if (block.type == kStatic) {
      WriteCoded(data, block, StaticLengths(), kStaticSymbols, kStaticDistanceBits, writer);
    } else {
      const DynamicCode& code = plan.codes[block.code];
      WriteDynamicHeader(code, writer);
      WriteCoded(data, block, code.lengths, kLiteralLengthSymbols, kDistanceLengths[0],
                 writer);
    }
  }
  if (!last) {
    writer->Put(0, 1);
    writer->Put(kStored, 2);
    writer->AlignToByte();
    writer->Put(0xFFFF0000u, 32);
  } else if (plan.blocks.empty()) {
    writer->Put(1, 1);
    writer->Put(kStatic, 2);
    writer->Put(0, StaticLength(kEndOfBlock));  // the end of block: code 0
  }
  writer->AlignToByte();
}

}  // namespace

RunBlocks::RunBlocks(const uint8_t* data, int64_t n, bool last)
    : data_(data), last_(last), plan_(std::make_unique<Plan>(PlanBlocks(data, n, last))) {}

RunBlocks::~RunBlocks() = default;

int64_t RunBlocks::size() const { return static_cast<int64_t>(plan_->bits / 8); }

bool RunBlocks::Write(uint8_t* out) const {
  LsbBitWriter writer(out, out + size());
  WriteBlocks(data_, *plan_, last_, &writer);
  return !writer.overflow() && writer.next() == out + size();
}

int64_t RunDeflatedSize(const uint8_t* data, int64_t n, bool last) {
  return RunBlocks(data, n, last).size();
}

}  // namespace jaxjpeg
