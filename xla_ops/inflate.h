// Raw deflate streams (RFC 1951) inflated into a buffer of known size: the
// pieces of byte planes (jaxjpeg.layout) restore decodes at once, each a
// stream of its own. A 64-bit bit buffer refilled 8 bytes at a time, an
// 11-bit table for the codes that short, runs one byte back as memset:
// 1.3-1.7x zlib's speed on the planes' literals and runs (2 MiB pieces:
// int8 codes 229 -> 320 MB/s, a 0/1 mask 418 -> 718 MB/s), 1.0-1.3x on
// zlib's own matches. Its checks refuse exactly the pieces zlib's inflate
// refuses (tests/fuzz/inflate_checks.cc).
#ifndef JAXJPEG_INFLATE_H_
#define JAXJPEG_INFLATE_H_

#include <cstdint>

namespace jaxjpeg {

enum class InflateStatus {
  kOk,
  kBadBlock,      // a reserved block type or stored lengths that disagree
  kBadCode,       // a Huffman code over-subscribed, incomplete or missing one it needs
  kBadSymbol,     // a length or distance symbol deflate does not define
  kTooFar,        // a distance back past the piece's first byte
  kTooLong,       // more bytes than the output holds
  kTooShort,      // fewer bytes than the output holds
  kTruncated,     // the input ended inside a block
  kBadEnd,        // a final block where none may be, or input left after the stream's end
};

const char* InflateStatusText(InflateStatus status);

// Inflates `in` (`in_size` bytes) into exactly `out_size` bytes of `out`.
// `last`: the stream ends with its final block (zero bits pad its last
// byte); otherwise with a block that is not final, on a byte boundary (a
// sync flush). A distance reaches back only to out[0]. Nothing outside the
// two buffers is read or written; `out` holds garbage unless kOk.
InflateStatus InflatePiece(const uint8_t* in, int64_t in_size, uint8_t* out, int64_t out_size,
                           bool last);

}  // namespace jaxjpeg

#endif  // JAXJPEG_INFLATE_H_
