// Shared definitions of the jaxjpeg codec core: the host/device macro, status
// codes, marker values, limits and the zig-zag order. Everything here compiles
// as host C++17 and as CUDA device code.
#ifndef JAXJPEG_JPEG_DEFS_H_
#define JAXJPEG_JPEG_DEFS_H_

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define JJ_HD __host__ __device__
#define JJ_INLINE __forceinline__
#else
#define JJ_HD
#define JJ_INLINE inline __attribute__((always_inline))
#endif

// Fully unrolls the loop that follows in device code (constant indices into
// shared rows become immediate offsets); the host compiler decides itself.
#if defined(__CUDA_ARCH__)
#define JJ_UNROLL _Pragma("unroll")
#else
#define JJ_UNROLL
#endif

namespace jaxjpeg {

// Every failure the codec can report. Values are stable: they cross the FFI
// boundary and are read back by Python.
enum class Status : int32_t {
  kOk = 0,
  kTruncated = 1,            // ran out of bytes
  kBadMarker = 2,            // missing, unknown or misplaced marker
  kBadHuffmanTable = 3,      // malformed or over-subscribed DHT
  kBadHuffmanCode = 4,       // a code that no table defines
  kBadQuantTable = 5,        // malformed DQT or zero step
  kUnsupported = 6,          // valid JPEG outside what jaxjpeg decodes
  kBadSize = 7,              // zero or oversized dimensions
  kBadRestart = 8,           // restart marker missing or out of sequence
  kBadCoefficients = 9,      // run past coefficient 63 or bad magnitude
  kTrailingData = 10,        // an interval left whole unused bytes
  kBadArgument = 11,         // caller error (buffer too small, bad stride)
  kMissingTable = 12,        // scan references a table never defined
  kUncovered = 13,           // a plan's tiles do not write an output exactly once
};

JJ_HD inline const char* StatusMessage(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kTruncated: return "truncated JPEG stream";
    case Status::kBadMarker: return "missing, unknown or misplaced JPEG marker";
    case Status::kBadHuffmanTable: return "malformed Huffman table";
    case Status::kBadHuffmanCode: return "invalid Huffman code in entropy-coded data";
    case Status::kBadQuantTable: return "malformed quantization table";
    case Status::kUnsupported: return "unsupported JPEG variant (jaxjpeg decodes 1-component sequential Huffman, 8 or 12 bit)";
    case Status::kBadSize: return "bad image dimensions";
    case Status::kBadRestart: return "restart marker missing or out of sequence";
    case Status::kBadCoefficients: return "corrupt coefficient data (run past the end of a block or bad magnitude)";
    case Status::kTrailingData: return "unused bytes left at the end of an entropy-coded interval";
    case Status::kBadArgument: return "invalid argument";
    case Status::kMissingTable: return "scan references an undefined table";
    case Status::kUncovered: return "the plan's tiles do not write every element exactly once";
  }
  return "unknown error";
}

// Marker second bytes (ITU T.81 Table B.1).
namespace marker {
constexpr uint8_t kSOF0 = 0xC0;  // baseline sequential
constexpr uint8_t kSOF1 = 0xC1;  // extended sequential, Huffman
constexpr uint8_t kDHT = 0xC4;
constexpr uint8_t kRST0 = 0xD0;
constexpr uint8_t kSOI = 0xD8;
constexpr uint8_t kEOI = 0xD9;
constexpr uint8_t kSOS = 0xDA;
constexpr uint8_t kDQT = 0xDB;
constexpr uint8_t kDRI = 0xDD;
constexpr uint8_t kAPP0 = 0xE0;
constexpr uint8_t kCOM = 0xFE;
}  // namespace marker

constexpr int kMaxDimension = 65535;  // JPEG's 16-bit size fields
constexpr int kBlockSize = 64;

// Row-major position of the k-th coefficient in zig-zag order (T.81 Fig. A.6).
#define JJ_ZIGZAG_TO_NATURAL                                               \
  0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, \
      40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57,   \
      50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, \
      39, 46, 53, 60, 61, 54, 47, 55, 62, 63

// Entries 64..79 absorb a zero run that overshoots the block: they map to
// slot 0, so the decoder needs no range check per coefficient (it reports
// the overshoot once the block ends and discards the block).
#define JJ_ZIGZAG_OVERSHOOT 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
#if defined(__CUDACC__)
static __constant__ uint8_t kZigzagDevice[80] = {JJ_ZIGZAG_TO_NATURAL, JJ_ZIGZAG_OVERSHOOT};
#endif
static constexpr uint8_t kZigzagHost[80] = {JJ_ZIGZAG_TO_NATURAL, JJ_ZIGZAG_OVERSHOOT};
#undef JJ_ZIGZAG_OVERSHOOT

// Zig-zag index k (0..79) to natural order. One table for host and device:
// device code reads constant memory, host code (including the CPU harness
// that runs kernel bodies) reads the host copy.
JJ_HD JJ_INLINE int ZigzagToNatural(int k) {
#if defined(__CUDA_ARCH__)
  return kZigzagDevice[k];
#else
  return kZigzagHost[k];
#endif
}

// Set bits of a 32-bit word.
JJ_HD JJ_INLINE int PopCount(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Zero bits below the lowest set bit of a nonzero 32-bit word.
JJ_HD JJ_INLINE int CountTrailingZeros(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(x)) - 1;
#else
  return __builtin_ctz(x);
#endif
}

// The whole zig-zag table (80 entries), in constant memory on the device.
JJ_HD JJ_INLINE const uint8_t* ZigzagTable() {
#if defined(__CUDA_ARCH__)
  return kZigzagDevice;
#else
  return kZigzagHost;
#endif
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_JPEG_DEFS_H_
