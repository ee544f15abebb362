// Huffman code lengths from symbol counts, limited in length: shared by
// JPEG's optimal tables (T.81 K.2, 16 bits) and deflate's blocks (RFC 1951:
// 15 bits for literals and lengths, 7 for the code-length code).
#ifndef JAXJPEG_CODE_LENGTHS_H_
#define JAXJPEG_CODE_LENGTHS_H_

#include <cstdint>

namespace jaxjpeg {

constexpr int kMaxCodeLeaves = 320;  // symbols one tree may hold

// One symbol in a tree being built.
struct CodeLeaf {
  uint64_t count;
  int symbol;
  int length;  // the tree's depth, then the limited code length
};

// Huffman tree depths of `n` (2..kMaxCodeLeaves) leaves sorted by count,
// rarest first.
void AssignTreeDepths(CodeLeaf* leaves, int n);

// AssignTreeDepths, then how many codes each length has into
// `length_counts` (kMaxCodeLeaves + 1, zeroed); returns the longest.
int TreeLengthCounts(CodeLeaf* leaves, int n, int* length_counts);

// T.81 Figure K.3 on `length_counts` (codes per length, up to `max_length`):
// while a code is longer than `limit`, two sibling codes of the longest
// length move up and hang under a shorter code split in two. The Kraft sum
// stays the same, so a complete code stays complete.
void LimitCodeLengths(int* length_counts, int max_length, int limit);

// `leaves` (n <= kMaxCodeLeaves) sorted by count, stably: a
// least-significant-digit radix sort where they are many and their counts
// fit three bytes (a deflate block's cost builds two codes a 32 KiB chunk;
// on noise, std::stable_sort took a quarter of it), else std::stable_sort.
void SortLeavesByCount(CodeLeaf* leaves, int n);

// Deflate's code lengths of `n` (<= kMaxCodeLeaves) symbols: a complete code
// of at most `limit` bits over the symbols counted, the rarest on the
// longest codes; where fewer than two are counted, the first uncounted
// symbols make up two codes of 1 bit (an inflater refuses incomplete codes).
void DeflateCodeLengths(const uint64_t* counts, int n, int limit, uint8_t* lengths);

}  // namespace jaxjpeg

#endif  // JAXJPEG_CODE_LENGTHS_H_
