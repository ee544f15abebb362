// Parsing of a JPEG file's markers up to the entropy-coded data (T.81 B.2),
// and the restart-interval index a parallel decoder needs. Host code.
#ifndef JAXJPEG_STREAM_HEADER_H_
#define JAXJPEG_STREAM_HEADER_H_

#include "table_build.h"
#include "jpeg_defs.h"

namespace jaxjpeg {

struct StreamInfo {
  int32_t width = 0;
  int32_t height = 0;
  int32_t bits = 0;               // sample precision: 8 or 12
  int32_t restart_interval = 0;   // blocks per interval; 0 = one interval
  int64_t blocks_wide = 0;
  int64_t blocks_high = 0;
  int64_t scan_begin = 0;         // first byte of entropy-coded data
  PackedTables packed;            // the tables the scan uses (checked; BuildDecoderTables)

  int64_t NumBlocks() const { return blocks_wide * blocks_high; }
  int64_t NumIntervals() const {
    return restart_interval ? (NumBlocks() + restart_interval - 1) / restart_interval : 1;
  }
  BlockGrid Grid() const {
    return BlockGrid{width, height, static_cast<int32_t>(blocks_wide)};
  }
};

// Reads markers from SOI to the SOS header; fills `info` including the tables
// the scan selects, checked as BuildDecoderTables would (a decoder builds
// them: only the header is looked at here). Only what jaxjpeg decodes is accepted: one component,
// SOF0 or SOF1, Huffman coding, 8 or 12 bits; everything else is refused.
Status ParseStreamHeader(const uint8_t* data, int64_t size, StreamInfo* info);

// Writes the start of every restart interval's entropy-coded data into
// `starts[0 .. NumIntervals()]`; starts[NumIntervals()] is the position of
// the marker that ends the scan (EOI). Checks RST0..RST7 appear in sequence.
Status IndexRestartIntervals(const uint8_t* data, int64_t size, const StreamInfo& info,
                             int64_t* starts);

// Checks a recorded index (`count` offsets, as IndexRestartIntervals writes
// them) against the stream without scanning its entropy-coded data: starts[0]
// is where the scan begins, every later start follows RSTn with n = (i - 1)
// mod 8, no marker overlaps an earlier interval, and the last is the EOI
// marker. A tile whose
// markers are where its index says decodes as the file was written; an index
// shifted by a few bytes (decoding to other weights) fails. O(intervals).
Status CheckRestartIndex(const uint8_t* data, int64_t size, const StreamInfo& info,
                         const int64_t* starts, int64_t count);

}  // namespace jaxjpeg

#endif  // JAXJPEG_STREAM_HEADER_H_
