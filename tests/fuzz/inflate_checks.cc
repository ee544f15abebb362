// The plane pieces' inflater (xla_ops/inflate.cc) against zlib, built with
// -fsanitize=address,undefined and zlib by
// tests/test_robustness.py::test_inflater_under_sanitizers. Random buffers
// are deflated by the run writer and by zlib (every strategy, levels 1, 6,
// 9), ended by the final block or a sync flush; each stream and mutations of
// it (bit flips, cuts, inserted and overwritten bytes) are inflated from a
// heap buffer of exactly their size (AddressSanitizer sees any read past
// it) and by zlib: the two must accept the same streams, with the same
// bytes. Each buffer's Adler-32 (xla_ops/adler32.h), alone and written out
// a stride apart, must be zlib's. Prints "inflate checks: N streams, M
// mutations, 0 failures".
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "adler32.h"
#include "deflate_runs.h"
#include "inflate.h"

namespace {

int failures = 0;

void Expect(bool ok, const char* what, int trial) {
  if (!ok && failures++ < 10) std::fprintf(stderr, "trial %d: %s\n", trial, what);
}

// Noise, few values, runs, a random walk, or pieces of each in turn.
std::vector<uint8_t> Buffer(std::mt19937_64& rng) {
  const int64_t n = static_cast<int64_t>(rng() % 3 == 0 ? rng() % 64 : rng() % 200000);
  std::vector<uint8_t> d(static_cast<size_t>(n));
  const int kind = static_cast<int>(rng() % 5);
  const int alphabet = 1 + static_cast<int>(rng() % 20);
  uint8_t walk = 0;
  for (int64_t i = 0; i < n;) {
    const int piece_kind = kind == 4 ? static_cast<int>(rng() % 4) : kind;
    const int64_t end = std::min<int64_t>(n, i + 1 + static_cast<int64_t>(rng() % 40000));
    for (; i < end; ++i) {
      if (piece_kind == 0) d[i] = static_cast<uint8_t>(rng());
      if (piece_kind == 1) d[i] = static_cast<uint8_t>(rng() % alphabet);
      if (piece_kind == 2) d[i] = i > 0 && rng() % 50 != 0 ? d[i - 1] : static_cast<uint8_t>(rng());
      if (piece_kind == 3) d[i] = walk = static_cast<uint8_t>(walk + rng() % 5 - 2);
    }
  }
  return d;
}

std::vector<uint8_t> ZlibDeflate(const std::vector<uint8_t>& data, int level, int strategy,
                                 bool last) {
  z_stream z{};
  deflateInit2(&z, level, Z_DEFLATED, -15, 8, strategy);
  std::vector<uint8_t> out(deflateBound(&z, data.size()) + 64);
  z.next_in = const_cast<uint8_t*>(data.data());
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  deflate(&z, last ? Z_FINISH : Z_SYNC_FLUSH);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

// zlib's verdict on `stream` as a piece of `size` bytes: its bytes, or
// false where InflatePiece must refuse it.
bool ZlibAccepts(const std::vector<uint8_t>& stream, int64_t size, bool last,
                 std::vector<uint8_t>* out) {
  z_stream z{};
  if (inflateInit2(&z, -15) != Z_OK) return false;
  out->assign(static_cast<size_t>(size) + 1, 0);
  z.next_in = const_cast<uint8_t*>(stream.data());
  z.avail_in = static_cast<uInt>(stream.size());
  z.next_out = out->data();
  z.avail_out = static_cast<uInt>(out->size());
  const int status = inflate(&z, Z_SYNC_FLUSH);
  // (not last: every input bit used, the last block ended on a byte boundary)
  const bool ended = last ? status == Z_STREAM_END
                          : (status == Z_OK || status == Z_BUF_ERROR) && (z.data_type & 128) &&
                                (z.data_type & 7) == 0 && (z.data_type & 64) == 0;
  const bool ok = ended && z.avail_in == 0 && z.total_out == static_cast<uLong>(size);
  inflateEnd(&z);
  out->resize(static_cast<size_t>(size));
  return ok;
}

// InflatePiece from a heap buffer of exactly the stream's size.
bool OursAccepts(const std::vector<uint8_t>& stream, int64_t size, bool last,
                 std::vector<uint8_t>* out) {
  std::unique_ptr<uint8_t[]> in(new uint8_t[stream.size() + (stream.empty() ? 1 : 0)]);
  std::copy(stream.begin(), stream.end(), in.get());
  std::unique_ptr<uint8_t[]> to(new uint8_t[static_cast<size_t>(size) + (size == 0 ? 1 : 0)]);
  const bool ok = jaxjpeg::InflatePiece(in.get(), static_cast<int64_t>(stream.size()), to.get(),
                                        size, last) == jaxjpeg::InflateStatus::kOk;
  out->assign(to.get(), to.get() + size);
  return ok;
}

std::vector<uint8_t> Mutated(std::mt19937_64& rng, std::vector<uint8_t> s) {
  const int kind = static_cast<int>(rng() % 4);
  if (s.empty() || kind == 0) {
    s.insert(s.begin() + static_cast<int64_t>(s.empty() ? 0 : rng() % s.size()),
             static_cast<uint8_t>(rng()));
  } else if (kind == 1) {
    s[rng() % s.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
  } else if (kind == 2) {
    s.resize(rng() % s.size());
  } else {
    const size_t at = rng() % s.size();
    for (size_t k = at; k < std::min(s.size(), at + 1 + rng() % 8); ++k) {
      s[k] = static_cast<uint8_t>(rng());
    }
  }
  return s;
}

}  // namespace

int main() {
  std::mt19937_64 rng(57);
  const int strategies[] = {Z_DEFAULT_STRATEGY, Z_FILTERED, Z_HUFFMAN_ONLY, Z_RLE, Z_FIXED};
  int streams = 0, mutations = 0;
  for (int trial = 0; trial < 500; ++trial) {
    const std::vector<uint8_t> data = Buffer(rng);
    const bool last = rng() % 2 == 0;
    std::vector<uint8_t> stream;
    if (trial % 2 == 0) {
      jaxjpeg::RunBlocks blocks(data.data(), static_cast<int64_t>(data.size()), last);
      stream.resize(static_cast<size_t>(blocks.size()));
      blocks.Write(stream.data());
    } else {
      const int levels[] = {1, 6, 9};
      stream = ZlibDeflate(data, levels[rng() % 3], strategies[rng() % 5], last);
    }
    ++streams;
    std::vector<uint8_t> ours, theirs;
    const int64_t n = static_cast<int64_t>(data.size());
    Expect(OursAccepts(stream, n, last, &ours) && ours == data, "a stream did not inflate back",
           trial);
    Expect(ZlibAccepts(stream, n, last, &theirs) && theirs == data, "zlib refused a stream",
           trial);
    const uint32_t adler = static_cast<uint32_t>(adler32(1, data.data(), static_cast<uInt>(n)));
    Expect(jaxjpeg::Adler32(1, data.data(), n) == adler, "another Adler-32 than zlib's", trial);
    const int64_t stride = 1 + trial % 5;
    std::unique_ptr<uint8_t[]> spread(new uint8_t[static_cast<size_t>(n * stride + 1)]);
    Expect(jaxjpeg::ScatterAdler32(1, data.data(), n, spread.get(), stride) == adler,
           "another Adler-32 than zlib's, written out", trial);
    for (int64_t k = 0; k < n; ++k) {
      if (spread[k * stride] != data[k]) {
        Expect(false, "a byte written out elsewhere", trial);
        break;
      }
    }
    Expect(!OursAccepts(stream, n + 1, last, &ours), "a short stream was taken", trial);
    if (n > 0) Expect(!OursAccepts(stream, n - 1, last, &ours), "a long stream was taken", trial);
    for (int m = 0; m < 40; ++m, ++mutations) {
      const std::vector<uint8_t> bad = Mutated(rng, stream);
      const bool ours_ok = OursAccepts(bad, n, last, &ours);
      const bool zlib_ok = ZlibAccepts(bad, n, last, &theirs);
      Expect(ours_ok == zlib_ok, ours_ok ? "took what zlib refuses" : "refused what zlib takes",
             trial);
      if (ours_ok && zlib_ok) Expect(ours == theirs, "other bytes than zlib's", trial);
    }
  }
  // The sums' largest: every byte 255, runs of kAdlerRun and past them.
  for (const int64_t n : {jaxjpeg::kAdlerRun - 1, jaxjpeg::kAdlerRun, 3 * jaxjpeg::kAdlerRun + 7}) {
    const std::vector<uint8_t> full(static_cast<size_t>(n), 255);
    Expect(jaxjpeg::Adler32(1, full.data(), n) ==
               static_cast<uint32_t>(adler32(1, full.data(), static_cast<uInt>(n))),
           "another Adler-32 than zlib's over bytes of 255", -1);
  }
  // Null buffers of no bytes: an empty stored block, an empty fixed block.
  const uint8_t empty_stored[] = {0x01, 0x00, 0x00, 0xFF, 0xFF}, empty_fixed[] = {0x03, 0x00};
  Expect(jaxjpeg::InflatePiece(empty_stored, 5, nullptr, 0, true) == jaxjpeg::InflateStatus::kOk,
         "an empty stored block", -1);
  Expect(jaxjpeg::InflatePiece(empty_fixed, 2, nullptr, 0, true) == jaxjpeg::InflateStatus::kOk,
         "an empty fixed block", -1);
  std::printf("inflate checks: %d streams, %d mutations, %d failures\n", streams, mutations,
              failures);
  return failures == 0 ? 0 : 1;
}
