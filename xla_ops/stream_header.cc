#include "stream_header.h"

#include <cstring>

namespace jaxjpeg {
namespace {

// A DHT table as stored in the file, built into a decode table at SOS time
// (a scan may use tables defined in any order before it).
struct RawHuffmanTable {
  bool defined = false;
  uint8_t counts[16] = {};
  uint8_t symbols[256] = {};
  int num_symbols = 0;
};

struct HeaderState {
  bool have_frame = false;
  int component_id = 0;
  int quant_selector = 0;
  bool quant_defined[4] = {};
  int32_t quant[4][64] = {};
  RawHuffmanTable huffman[2][4];  // [class: 0 DC, 1 AC][slot]
};

int ReadU16(const uint8_t* p) { return (p[0] << 8) | p[1]; }

// Progressive, lossless, hierarchical and arithmetic-coded frames, DAC, JPG.
bool IsUnsupportedFrame(uint8_t m) { return m >= 0xC2 && m <= 0xCF && m != marker::kDHT; }

Status ParseFrame(const uint8_t* seg, int len, uint8_t m, HeaderState& st, StreamInfo* info) {
  if (st.have_frame) return Status::kBadMarker;
  if (len < 6) return Status::kTruncated;
  const int precision = seg[0];
  const int height = ReadU16(seg + 1), width = ReadU16(seg + 3), components = seg[5];
  if (components != 1) return Status::kUnsupported;
  if (len != 6 + 3 * components) return Status::kBadMarker;
  if (precision != 8 && !(precision == 12 && m == marker::kSOF1)) return Status::kUnsupported;
  if (width == 0 || height == 0) return Status::kBadSize;
  const int sampling = seg[7], selector = seg[8];
  if ((sampling >> 4) < 1 || (sampling >> 4) > 4 || (sampling & 15) < 1 || (sampling & 15) > 4 ||
      selector > 3) {
    return Status::kBadMarker;
  }
  st.have_frame = true;
  st.component_id = seg[6];
  st.quant_selector = selector;
  info->width = width;
  info->height = height;
  info->bits = precision;
  info->blocks_wide = (width + 7) / 8;
  info->blocks_high = (height + 7) / 8;
  return Status::kOk;
}

Status ParseQuantTables(const uint8_t* seg, int len, HeaderState& st) {
  int pos = 0;
  while (pos < len) {
    const int precision = seg[pos] >> 4, slot = seg[pos] & 15;
    const int entry_bytes = precision == 0 ? 1 : 2;
    if (precision > 1 || slot > 3) return Status::kBadQuantTable;
    if (pos + 1 + 64 * entry_bytes > len) return Status::kBadQuantTable;
    const uint8_t* values = seg + pos + 1;
    for (int k = 0; k < 64; ++k) {
      const int q = entry_bytes == 1 ? values[k] : ReadU16(values + 2 * k);
      if (q == 0) return Status::kBadQuantTable;
      st.quant[slot][ZigzagToNatural(k)] = q;
    }
    st.quant_defined[slot] = true;
    pos += 1 + 64 * entry_bytes;
  }
  return Status::kOk;
}

Status ParseHuffmanTables(const uint8_t* seg, int len, HeaderState& st) {
  int pos = 0;
  while (pos < len) {
    if (pos + 17 > len) return Status::kBadHuffmanTable;
    const int table_class = seg[pos] >> 4, slot = seg[pos] & 15;
    if (table_class > 1 || slot > 3) return Status::kBadHuffmanTable;
    RawHuffmanTable& t = st.huffman[table_class][slot];
    int total = 0;
    for (int i = 0; i < 16; ++i) total += t.counts[i] = seg[pos + 1 + i];
    if (total > 256 || pos + 17 + total > len) return Status::kBadHuffmanTable;
    // A redefined slot keeps no symbols of the old table: PackedTables
    // are compared whole when a plan shares them between tiles.
    for (int i = 0; i < 256; ++i) t.symbols[i] = i < total ? seg[pos + 17 + i] : 0;
    t.num_symbols = total;
    t.defined = true;
    pos += 17 + total;
  }
  return Status::kOk;
}

Status ParseRestartInterval(const uint8_t* seg, int len, StreamInfo* info) {
  if (len != 2) return Status::kBadMarker;
  info->restart_interval = ReadU16(seg);
  return Status::kOk;
}

Status ParseScan(const uint8_t* seg, int len, HeaderState& st, StreamInfo* info) {
  if (!st.have_frame) return Status::kBadMarker;
  if (len < 1 || seg[0] != 1 || len != 6) return Status::kUnsupported;
  if (seg[1] != st.component_id) return Status::kBadMarker;
  const int dc_slot = seg[2] >> 4, ac_slot = seg[2] & 15;
  if (seg[3] != 0 || seg[4] != 63 || seg[5] != 0) return Status::kUnsupported;  // not sequential
  if (dc_slot > 3 || ac_slot > 3) return Status::kBadHuffmanTable;
  const RawHuffmanTable& dc = st.huffman[0][dc_slot];
  const RawHuffmanTable& ac = st.huffman[1][ac_slot];
  if (!dc.defined || !ac.defined || !st.quant_defined[st.quant_selector]) {
    return Status::kMissingTable;
  }
  PackedTables& packed = info->packed;
  std::memcpy(packed.dc.counts, dc.counts, sizeof dc.counts);
  std::memcpy(packed.dc.symbols, dc.symbols, sizeof dc.symbols);
  std::memcpy(packed.ac.counts, ac.counts, sizeof ac.counts);
  std::memcpy(packed.ac.symbols, ac.symbols, sizeof ac.symbols);
  for (int i = 0; i < 64; ++i) {
    packed.quant[i] = static_cast<uint16_t>(st.quant[st.quant_selector][i]);  // 1..65535
  }
  return CheckPackedTables(packed);
}

// Refuses dimensions the remaining bytes cannot hold, before anyone sizes
// buffers from them: every block takes at least 2 bits (a DC code and an
// EOB), every interval but the last a 2-byte RST marker.
Status CheckScanFits(const StreamInfo& info, int64_t scan_bytes) {
  if (scan_bytes * 4 < info.NumBlocks()) return Status::kTruncated;
  if (info.NumIntervals() > scan_bytes / 2 + 1) return Status::kBadRestart;
  return Status::kOk;
}

}  // namespace

Status ParseStreamHeader(const uint8_t* data, int64_t size, StreamInfo* info) {
  *info = StreamInfo();
  if (size < 4 || data[0] != 0xFF || data[1] != marker::kSOI) return Status::kBadMarker;
  HeaderState st;
  int64_t pos = 2;
  while (true) {
    if (pos >= size || data[pos] != 0xFF) return pos >= size ? Status::kTruncated : Status::kBadMarker;
    while (pos < size && data[pos] == 0xFF) ++pos;  // fill bytes
    if (pos + 3 > size) return Status::kTruncated;
    const uint8_t m = data[pos];
    const int seg_len = ReadU16(data + pos + 1) - 2;
    if (seg_len < 0) return Status::kBadMarker;
    if (pos + 3 + seg_len > size) return Status::kTruncated;
    const uint8_t* seg = data + pos + 3;
    pos += 3 + seg_len;
    Status s = Status::kOk;
    if (m == marker::kSOF0 || m == marker::kSOF1) {
      s = ParseFrame(seg, seg_len, m, st, info);
    } else if (m == marker::kDQT) {
      s = ParseQuantTables(seg, seg_len, st);
    } else if (m == marker::kDHT) {
      s = ParseHuffmanTables(seg, seg_len, st);
    } else if (m == marker::kDRI) {
      s = ParseRestartInterval(seg, seg_len, info);
    } else if (m == marker::kSOS) {
      s = ParseScan(seg, seg_len, st, info);
      if (s != Status::kOk) return s;
      info->scan_begin = pos;
      return CheckScanFits(*info, size - pos);
    } else if (IsUnsupportedFrame(m)) {
      s = Status::kUnsupported;
    } else if (!((m >= marker::kAPP0 && m <= 0xEF) || m == marker::kCOM)) {
      s = Status::kBadMarker;  // SOI, EOI, RSTn, reserved or misplaced markers
    }
    if (s != Status::kOk) return s;
  }
}

Status IndexRestartIntervals(const uint8_t* data, int64_t size, const StreamInfo& info,
                             int64_t* starts) {
  const int64_t intervals = info.NumIntervals();
  int64_t found = 1;
  starts[0] = info.scan_begin;
  for (int64_t pos = info.scan_begin; pos < size;) {
    if (data[pos] != 0xFF) {
      ++pos;
      continue;
    }
    if (pos + 1 >= size) break;
    const uint8_t next = data[pos + 1];
    if (next == 0x00 || next == 0xFF) {  // stuffed 0xFF, or a fill byte
      pos += next == 0x00 ? 2 : 1;
      continue;
    }
    if (next >= marker::kRST0 && next <= marker::kRST0 + 7) {
      if (found >= intervals || next != marker::kRST0 + ((found - 1) & 7)) {
        return Status::kBadRestart;
      }
      starts[found++] = pos + 2;
      pos += 2;
      continue;
    }
    if (found != intervals) return Status::kBadRestart;
    if (next != marker::kEOI) return Status::kUnsupported;  // DNL, a second scan, ...
    starts[intervals] = pos;
    return Status::kOk;
  }
  return Status::kTruncated;
}

Status CheckRestartIndex(const uint8_t* data, int64_t size, const StreamInfo& info,
                         const int64_t* starts, int64_t count) {
  const int64_t intervals = info.NumIntervals();
  if (count != intervals + 1 || starts[0] != info.scan_begin) return Status::kBadArgument;
  for (int64_t i = 1; i <= intervals; ++i) {
    const int64_t s = starts[i];
    if (s < starts[i - 1]) return Status::kBadArgument;  // also keeps s - 2 from overflowing
    const bool last = i == intervals;
    // RSTn (2 bytes) precede their interval; EOI sits at the end offset. An
    // interval may be empty (the decoder refuses it), never overlap a marker.
    const int64_t at = last ? s : s - 2;
    if (at < starts[i - 1] || at > size - 2) return Status::kBadArgument;
    const uint8_t expected =
        last ? marker::kEOI : static_cast<uint8_t>(marker::kRST0 + ((i - 1) & 7));
    if (data[at] != 0xFF || data[at + 1] != expected) return Status::kBadArgument;
  }
  return Status::kOk;
}

}  // namespace jaxjpeg
