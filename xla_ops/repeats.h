// Repeats within deflate's window, counted in one pass (jaxjpeg.layout,
// host only): whether deflate's string matching may pay on a byte plane
// beyond coding its runs and Huffman codes (zlib's Z_RLE), without running
// zlib's matcher (3x Z_RLE's time on float weights, where it never pays).
#ifndef JAXJPEG_REPEATS_H_
#define JAXJPEG_REPEATS_H_

#include <cstdint>

namespace jaxjpeg {

constexpr int kRepeatMinMatch = 4;
constexpr int kRepeatLongMatch = 8;

// Matches shorter than kRepeatLongMatch and the others apart: a short
// match's code may cost more than its bytes did (chance matches in a
// plane's skewed bytes), and must not hide the long ones a copied stretch
// gives.
struct RepeatCount {
  int64_t bytes[2] = {0, 0};     // bytes inside the short matches, the long ones
  int64_t matches[2] = {0, 0};   // how many
};

// Greedy, as a fast LZ77 matcher: each position's 4-byte hash finds the last
// position that shared it; where that lies 2 to 32,768 bytes back and the
// next kRepeatMinMatch bytes agree, the match is extended (to 258 bytes,
// deflate's longest) and counted, and the scan goes on past it; after every
// 64 misses in a row one more position is skipped (up to 31). Runs of one
// byte are left out (distance 1, or 4 equal bytes): Z_RLE codes them too.
// `min_match` kRepeatLongMatch: only long matches counted; a shorter one is
// passed over as a miss (skipped past, and the skips grow: skewed bytes
// repeat 4-7 bytes by chance every few bytes).
RepeatCount CountRepeats(const uint8_t* data, int64_t n, int min_match = kRepeatMinMatch);

}  // namespace jaxjpeg

#endif  // JAXJPEG_REPEATS_H_
