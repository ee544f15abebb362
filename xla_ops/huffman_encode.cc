#include "huffman_encode.h"

#include <algorithm>

#include "code_lengths.h"

namespace jaxjpeg {
namespace {

// A spec from the DHT layout: codes per length (1..16), then the symbols.
HuffmanSpec MakeSpec(const uint8_t (&counts)[16], const uint8_t* symbols) {
  HuffmanSpec spec;
  for (int length = 1; length <= kMaxHuffmanCodeLength; ++length) {
    spec.counts[length] = counts[length - 1];
    spec.num_symbols += counts[length - 1];
  }
  std::copy(symbols, symbols + spec.num_symbols, spec.symbols);
  return spec;
}

// T.81 Table K.3.
constexpr uint8_t kDcLuminanceCounts[16] = {0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
constexpr uint8_t kDcLuminanceSymbols[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};

// T.81 Table K.5.
constexpr uint8_t kAcLuminanceCounts[16] = {0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d};
constexpr uint8_t kAcLuminanceSymbols[162] = {
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
    0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
    0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25,
    0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45,
    0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
    0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
    0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
    0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6,
    0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3,
    0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8,
    0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
};

// Symbol 256 stands for the all-ones code word that JPEG forbids: it takes
// part in tree building with count 1 and its code is removed afterwards.
constexpr int kReservedSymbol = 256;
constexpr int kMaxLeaves = 257;

using Leaf = CodeLeaf;

// Used symbols plus the reserved one, rarest first. On equal counts the
// reserved symbol comes first so it tends to land on a longest code.
int CollectLeaves(const SymbolHistogram& histogram, Leaf* leaves) {
  int n = 0;
  leaves[n++] = {1, kReservedSymbol, 0};
  for (int symbol = 0; symbol < 256; ++symbol) {
    if (histogram.count[symbol] > 0) leaves[n++] = {histogram.count[symbol], symbol, 0};
  }
  if (n == 1) leaves[n++] = {1, 0, 0};  // nothing coded: keep the table non-empty
  std::stable_sort(leaves, leaves + n,
                   [](const Leaf& a, const Leaf& b) { return a.count < b.count; });
  return n;
}

// Codes of at most 16 bits (T.81 Figure K.3), then one longest code dropped:
// the reserved one.
void LimitJpegCodeLengths(int* length_counts, int max_length) {
  LimitCodeLengths(length_counts, max_length, kMaxHuffmanCodeLength);
  int longest = kMaxHuffmanCodeLength;
  while (length_counts[longest] == 0) --longest;
  length_counts[longest] -= 1;
}

}  // namespace

const HuffmanSpec& StandardLuminanceDcSpec() {
  static const HuffmanSpec spec = MakeSpec(kDcLuminanceCounts, kDcLuminanceSymbols);
  return spec;
}

const HuffmanSpec& StandardLuminanceAcSpec() {
  static const HuffmanSpec spec = MakeSpec(kAcLuminanceCounts, kAcLuminanceSymbols);
  return spec;
}

HuffmanSpec BuildOptimalSpec(const SymbolHistogram& histogram) {
  Leaf leaves[kMaxLeaves + 1];
  const int n = CollectLeaves(histogram, leaves);
  int length_counts[kMaxCodeLeaves + 1] = {};
  LimitJpegCodeLengths(length_counts, TreeLengthCounts(leaves, n, length_counts));

  // Symbols by (original length, value), reserved last: lengths are then
  // handed out in this order from the limited counts, so the reserved symbol
  // takes the dropped code.
  std::stable_sort(leaves, leaves + n, [](const Leaf& a, const Leaf& b) {
    const bool a_reserved = a.symbol == kReservedSymbol;
    const bool b_reserved = b.symbol == kReservedSymbol;
    if (a_reserved != b_reserved) return b_reserved;
    return a.length != b.length ? a.length < b.length : a.symbol < b.symbol;
  });
  HuffmanSpec spec;
  for (int length = 1; length <= kMaxHuffmanCodeLength; ++length) {
    spec.counts[length] = static_cast<uint8_t>(length_counts[length]);
  }
  spec.num_symbols = n - 1;
  for (int i = 0; i < spec.num_symbols; ++i) spec.symbols[i] = static_cast<uint8_t>(leaves[i].symbol);
  return spec;
}

HuffmanCodeTable BuildCodeTable(const HuffmanSpec& spec) {
  HuffmanCodeTable table;
  std::fill(table.code, table.code + 256, 0);
  std::fill(table.length, table.length + 256, 0);
  uint32_t code = 0;
  int index = 0;
  for (int length = 1; length <= kMaxHuffmanCodeLength; ++length) {
    for (int i = 0; i < spec.counts[length]; ++i, ++code) {
      const uint8_t symbol = spec.symbols[index++];
      table.code[symbol] = static_cast<uint16_t>(code);
      table.length[symbol] = static_cast<uint8_t>(length);
    }
    code <<= 1;
  }
  return table;
}

}  // namespace jaxjpeg
