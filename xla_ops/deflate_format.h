// RFC 1951's constants, shared by the byte planes' run writer
// (deflate_runs.cc) and the pieces' inflater (inflate.cc).
#ifndef JAXJPEG_DEFLATE_FORMAT_H_
#define JAXJPEG_DEFLATE_FORMAT_H_

#include <cstdint>

namespace jaxjpeg {
namespace deflate {

inline constexpr int kEndOfBlock = 256;
inline constexpr int kLiteralLengthCodes = 286;  // literals, end of block, lengths (3.2.5)
inline constexpr int kMaxCodeBits = 15;
inline constexpr int kCodeLengthSymbols = 19;
// The static code's lengths cover two literal/length symbols and two
// distances more than are ever sent: its canonical codes count them (3.2.6).
inline constexpr int kStaticLiteralLengthSymbols = 288;
inline constexpr int kStaticDistanceSymbols = 32;
inline constexpr int kStaticDistanceBits = 5;

// The order the code-length code's lengths are sent in (3.2.7).
inline constexpr uint8_t kCodeLengthOrder[kCodeLengthSymbols] = {16, 17, 18, 0, 8,  7, 9,
                                                                 6,  10, 5,  11, 4, 12, 3,
                                                                 13, 2,  14, 1,  15};

// Length symbols 257-285 and distance symbols 0-29: the first length or
// distance of each, and the extra bits that add to it (3.2.5).
inline constexpr int kLengthCodes = 29;
inline constexpr uint16_t kLengthBase[kLengthCodes] = {3,  4,  5,  6,  7,  8,   9,   10,  11, 13,
                                                       15, 17, 19, 23, 27, 31,  35,  43,  51, 59,
                                                       67, 83, 99, 115, 131, 163, 195, 227, 258};
inline constexpr uint8_t kLengthExtraBits[kLengthCodes] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
                                                           1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                                           4, 4, 4, 4, 5, 5, 5, 5, 0};
inline constexpr int kDistanceCodes = 30;
inline constexpr uint16_t kDistanceBase[kDistanceCodes] = {
    1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,    65,    97,    129,
    193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
inline constexpr uint8_t kDistanceExtraBits[kDistanceCodes] = {0, 0, 0, 0, 1, 1, 2,  2,  3,  3,
                                                               4, 4, 5, 5, 6, 6, 7,  7,  8,  8,
                                                               9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

// A literal/length symbol's length in the static code (3.2.6).
constexpr int StaticLength(int symbol) {
  return symbol < 144 ? 8 : symbol < 256 ? 9 : symbol < 280 ? 7 : 8;
}

}  // namespace deflate
}  // namespace jaxjpeg

#endif  // JAXJPEG_DEFLATE_FORMAT_H_
