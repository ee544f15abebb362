// Huffman side of the encoder (host only): table specifications as a DHT
// segment carries them, optimal tables from symbol statistics (T.81 K.2),
// encoding code tables (T.81 C.2) and the entropy-coded-segment bit writer.
#ifndef JAXJPEG_HUFFMAN_ENCODE_H_
#define JAXJPEG_HUFFMAN_ENCODE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace jaxjpeg {

constexpr int kMaxHuffmanCodeLength = 16;

// What one DHT table carries: how many codes of each length, then the
// symbols in order of increasing code length.
struct HuffmanSpec {
  uint8_t counts[kMaxHuffmanCodeLength + 1] = {};  // counts[length], [0] unused
  uint8_t symbols[256] = {};
  int num_symbols = 0;
};

// Symbol -> canonical code. length 0 marks a symbol the table cannot code.
struct HuffmanCodeTable {
  uint16_t code[256];
  uint8_t length[256];
};

// How often each of the 256 symbols occurs in one scan.
struct SymbolHistogram {
  uint64_t count[256] = {};
};

// Tables of T.81 Annex K.3 (Tables K.3 and K.5): luminance DC and AC.
const HuffmanSpec& StandardLuminanceDcSpec();
const HuffmanSpec& StandardLuminanceAcSpec();

// Optimal code lengths for `histogram`, limited to 16 bits, never using the
// all-ones code word (T.81 K.2). Unused symbols get no code; a histogram with
// a single used symbol still yields a valid one-code table.
HuffmanSpec BuildOptimalSpec(const SymbolHistogram& histogram);

// Canonical code assignment (T.81 C.1, C.2).
HuffmanCodeTable BuildCodeTable(const HuffmanSpec& spec);

// Writes an entropy-coded segment: packs codes MSB first, stuffs a zero byte
// after every 0xFF, pads with 1 bits before markers. Appends to a vector it
// grows ahead of time (Reserve) so the hot path is free of capacity checks.
// It keeps the vector's data pointer and size itself: a hot loop working on a
// local copy (copied back when done) then keeps its whole state in registers
// (a byte stored through a vector's data may alias the vector, so its fields
// would be read again after every store).
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>* out)
      : out_(out), data_(out->data()), size_(out->size()), capacity_(out->size()) {}

  // Makes room for `bytes` more output bytes (may throw std::bad_alloc).
  void Reserve(size_t bytes) {
    if (size_ + bytes <= capacity_) return;
    const size_t grown = capacity_ * 2;
    out_->resize(grown > size_ + bytes ? grown : size_ + bytes);
    data_ = out_->data();
    capacity_ = out_->size();
  }

  // Appends the low `count` bits of `bits` (count <= 63, higher bits zero:
  // up to two codes with their extra bits). Bits gather in a 64-bit
  // accumulator emitted 8 bytes at a time.
  void Put(uint64_t bits, int count) {
    if (count < free_bits_) {
      free_bits_ -= count;
      pending_ = (pending_ << count) | bits;
      return;
    }
    // The accumulator fills up: its free bits take the high part of `bits`
    // (free_bits_ >= 1, so no shift reaches 64) and the rest starts the next
    // word (the bits above them shift out before they are emitted).
    const int rest = count - free_bits_;
    EmitWord((pending_ << free_bits_) | (bits >> rest));
    pending_ = bits;
    free_bits_ = 64 - rest;
  }

  // Completes the last byte with 1 bits (T.81 F.1.2.3) and emits it.
  void FlushWithPadding() {
    Reserve(16);
    int count = 64 - free_bits_;
    const int padding = (8 - count % 8) % 8;
    const uint64_t bits = (pending_ << padding) | ((1u << padding) - 1);
    for (count += padding; count >= 8;) {
      count -= 8;
      EmitByte(static_cast<uint8_t>(bits >> count));
    }
    pending_ = 0;
    free_bits_ = 64;
  }

  // A marker is only valid on a byte boundary: call after FlushWithPadding.
  void PutMarker(uint8_t code) {
    Reserve(2);
    uint8_t* dst = data_ + size_;
    dst[0] = 0xFF;
    dst[1] = code;
    size_ += 2;
  }

  // Trims the vector to what was written.
  void Finish() { out_->resize(size_); }

  // Bytes written so far (the offset of the next byte in the vector).
  size_t Position() const { return size_; }

 private:
  void EmitByte(uint8_t byte) {
    uint8_t* dst = data_ + size_;
    dst[0] = byte;
    dst[1] = 0;  // stuffed byte, kept only after 0xFF
    size_ += byte == 0xFF ? 2 : 1;
  }

  // Eight bytes, most significant first; a word without a 0xFF byte (the
  // usual case, found with one SWAR test) is stored whole.
  void EmitWord(uint64_t word) {
    const uint64_t inverted = ~word;  // a 0xFF byte becomes a zero byte
    const bool has_ff =
        ((inverted - 0x0101010101010101ull) & ~inverted & 0x8080808080808080ull) != 0;
    if (!has_ff) {
      const uint64_t big_endian = ToBigEndian(word);
      std::memcpy(data_ + size_, &big_endian, 8);
      size_ += 8;
      return;
    }
    for (int shift = 56; shift >= 0; shift -= 8) EmitByte(static_cast<uint8_t>(word >> shift));
  }

  static uint64_t ToBigEndian(uint64_t word) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap64(word);
#else
    return word;
#endif
  }

  std::vector<uint8_t>* out_;
  uint8_t* data_;             // out_->data()
  size_t size_;               // bytes written
  size_t capacity_;           // out_->size()
  uint64_t pending_ = 0;      // bits not yet emitted are the low 64 - free_bits_
  int free_bits_ = 64;        // 1..64 between calls
};

}  // namespace jaxjpeg

#endif  // JAXJPEG_HUFFMAN_ENCODE_H_
