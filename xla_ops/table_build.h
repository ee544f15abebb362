// A tile's Huffman and quantization tables as the decode call carries them
// (PackedTables, 672 bytes: the DHT and DQT contents) and the DecoderTables
// (19.5 KB of lookup tables) each executor builds from them where it
// decodes: a host worker when it meets a tile, the CUDA handler once per
// call into its workspace, a block per table. Carrying the expanded tables
// instead cost 19.5 KB a tile of host memory and of host-to-device bytes, a
// third more than the compressed weights of a CNN checkpoint.
#ifndef JAXJPEG_TABLE_BUILD_H_
#define JAXJPEG_TABLE_BUILD_H_

#include "interval_decode.h"

namespace jaxjpeg {

struct PackedHuffmanTable {
  uint8_t counts[16];    // codes of length 1..16
  uint8_t symbols[256];  // the first sum(counts) are used
};

struct PackedTables {
  PackedHuffmanTable dc;
  PackedHuffmanTable ac;
  uint16_t quant[64];  // natural order
};
static_assert(sizeof(PackedTables) == 672, "the plan's table operand is whole PackedTables");

// Phase "codes" (one thread): both tables' canonical codes and the steps.
// Returns what ParseStreamHeader reports for such tables. A table that
// fails (or a zero step) leaves both codes decoding nothing: the operands
// are untrusted, and every interval using the tables then fails
// (kBadHuffmanCode) on every executor alike.
JJ_HD inline Status BuildTableCodes(const PackedTables& packed, DecoderTables* t) {
  Status s = BuildCanonicalCode(packed.dc.counts, packed.dc.symbols, true, &t->dc);
  const Status ac = BuildCanonicalCode(packed.ac.counts, packed.ac.symbols, false, &t->ac);
  if (s == Status::kOk) s = ac;
  for (int i = 0; i < 64; ++i) {
    t->quant[i] = packed.quant[i];
    if (packed.quant[i] == 0 && s == Status::kOk) s = Status::kBadQuantTable;
  }
  if (s != Status::kOk) {
    for (int len = 0; len <= 16; ++len) t->dc.max_code[len] = t->ac.max_code[len] = -1;
  }
  t->fast_ac_pairs_common = 0;
  return s;
}

// Phase "lookahead", after "codes": thread `thread` of `threads` fills its
// share of both lookahead tables.
JJ_HD inline void BuildLookaheadPart(DecoderTables* t, int thread, int threads) {
  constexpr int kEntries = 1 << kLookaheadBits;
  for (int i = thread; i < 2 * kEntries; i += threads) {
    HuffmanDecodeTable& h = i < kEntries ? t->dc : t->ac;
    h.lookahead[i % kEntries] = LookaheadEntryAt(h, static_cast<uint32_t>(i % kEntries));
  }
}

// Phase "fast AC", after "lookahead": the thread's share of the AC fast
// table; returns how many of its entries hold two parts (PairsAreCommon
// then sets fast_ac_pairs_common from the sum over the threads).
JJ_HD inline int BuildFastAcPart(DecoderTables* t, int thread, int threads) {
  int pairs = 0;
  for (int i = thread; i < (1 << kFastAcBits); i += threads) {
    const FastAcEntry e = FastAcEntryAt(t->ac, static_cast<uint32_t>(i));
    t->fast_ac.entry[i] = e;
    pairs += HoldsPair(e) ? 1 : 0;
  }
  return pairs;
}

// The status BuildTableCodes would end with, without building anything but
// a scratch code: how a header's tables are checked (ParseStreamHeader).
inline Status CheckPackedTables(const PackedTables& packed) {
  HuffmanDecodeTable scratch;
  Status s = BuildCanonicalCode(packed.dc.counts, packed.dc.symbols, true, &scratch);
  if (s != Status::kOk) return s;
  s = BuildCanonicalCode(packed.ac.counts, packed.ac.symbols, false, &scratch);
  if (s != Status::kOk) return s;
  for (int i = 0; i < 64; ++i) {
    if (packed.quant[i] == 0) return Status::kBadQuantTable;
  }
  return Status::kOk;
}

// Every phase on one thread (the host).
inline Status BuildDecoderTables(const PackedTables& packed, DecoderTables* t) {
  const Status s = BuildTableCodes(packed, t);
  BuildLookaheadPart(t, 0, 1);
  t->fast_ac_pairs_common = PairsAreCommon(BuildFastAcPart(t, 0, 1));
  return s;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_TABLE_BUILD_H_
