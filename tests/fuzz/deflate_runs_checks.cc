// The byte planes' run deflater (xla_ops/deflate_runs.cc) on random buffers,
// built with -fsanitize=address,undefined and zlib by
// tests/test_robustness.py::test_run_deflater_under_sanitizers: each buffer
// on the heap at exactly its size (AddressSanitizer sees any read past it),
// its blocks inflated by zlib back to it, their size the one counted.
// Prints "deflate checks: N buffers, 0 failures" and exits 0 when all hold.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "code_lengths.h"
#include "deflate_runs.h"

namespace {

int failures = 0;

void Expect(bool ok, const char* what, int trial) {
  if (!ok && failures++ < 10) std::fprintf(stderr, "trial %d: %s\n", trial, what);
}

// Noise, few values, runs of every length, or pieces of each in turn.
void Fill(std::mt19937_64& rng, uint8_t* d, int64_t n, int kind) {
  std::uniform_int_distribution<int> byte(0, 255);
  int64_t i = 0;
  while (i < n) {
    const int piece_kind = kind == 3 ? static_cast<int>(rng() % 3) : kind;
    const int64_t piece = kind == 3 ? 1 + static_cast<int64_t>(rng() % 50000) : n;
    const int alphabet = 1 + static_cast<int>(rng() % 4);
    for (int64_t end = std::min(n, i + piece); i < end;) {
      if (piece_kind == 0) {
        d[i++] = static_cast<uint8_t>(byte(rng));
      } else if (piece_kind == 1) {
        d[i++] = static_cast<uint8_t>(rng() % alphabet);
      } else {
        const int64_t run = std::min<int64_t>(end - i, 1 + static_cast<int64_t>(rng() % 600));
        const uint8_t value = static_cast<uint8_t>(byte(rng));
        for (int64_t k = 0; k < run; ++k) d[i++] = value;
      }
    }
  }
}

// zlib's inflate of `stream` (raw deflate): the bytes, and whether the
// final block ended it (`last`) or it stopped after a sync flush.
bool Inflates(const std::vector<uint8_t>& stream, const uint8_t* data, int64_t n, bool last) {
  z_stream z{};
  if (inflateInit2(&z, -15) != Z_OK) return false;
  std::vector<uint8_t> out(static_cast<size_t>(n) + 1);
  z.next_in = const_cast<uint8_t*>(stream.data());
  z.avail_in = static_cast<uInt>(stream.size());
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  const int status = inflate(&z, Z_SYNC_FLUSH);
  const bool ended = last ? status == Z_STREAM_END : status == Z_OK;
  const bool same = z.total_out == static_cast<uLong>(n) && z.avail_in == 0 &&
                    std::equal(out.begin(), out.begin() + n, data);
  inflateEnd(&z);
  return ended && same;
}

}  // namespace

// Random leaf counts (ties, 19 or 286 leaves, counts past 2^24) sorted as
// std::stable_sort sorts them; deflate code lengths of such counts complete
// and within their limit.
void CheckCodeLengths(std::mt19937_64& rng, int trials) {
  for (int trial = 0; trial < trials; ++trial) {
    const int n = trial % 3 == 0 ? 19 : 286;
    const int limit = n == 19 ? 7 : 15;
    const uint64_t spread = uint64_t{1} << (rng() % 40);
    const int used = 1 + static_cast<int>(rng() % n);
    std::vector<uint64_t> counts(n, 0);
    for (int k = 0; k < used; ++k) counts[rng() % n] = trial % 2 ? 1 + rng() % 4 : rng() % spread;
    std::vector<jaxjpeg::CodeLeaf> got, want;
    for (int s = 0; s < n; ++s) {
      if (counts[s] > 0) got.push_back({counts[s], s, 0});
    }
    want = got;
    jaxjpeg::SortLeavesByCount(got.data(), static_cast<int>(got.size()));
    std::stable_sort(want.begin(), want.end(), [](const jaxjpeg::CodeLeaf& a,
                                                  const jaxjpeg::CodeLeaf& b) {
      return a.count < b.count;
    });
    Expect(std::equal(got.begin(), got.end(), want.begin(),
                      [](const jaxjpeg::CodeLeaf& a, const jaxjpeg::CodeLeaf& b) {
                        return a.count == b.count && a.symbol == b.symbol;
                      }),
           "leaves sorted otherwise than by a stable sort", trial);
    uint8_t lengths[jaxjpeg::kMaxCodeLeaves];
    jaxjpeg::DeflateCodeLengths(counts.data(), n, limit, lengths);
    double kraft = 0.0;
    for (int s = 0; s < n; ++s) {
      Expect(lengths[s] <= limit, "a code over its limit", trial);
      if (lengths[s]) kraft += 1.0 / static_cast<double>(uint64_t{1} << lengths[s]);
    }
    Expect(kraft == 1.0, "an incomplete code", trial);
  }
}

int main() {
  std::mt19937_64 rng(13);
  CheckCodeLengths(rng, 3000);
  const int64_t sizes[] = {0,     1,     2,     3,     4,     258,   259,    32767,
                           32768, 32769, 65535, 65536, 65537, 98304, 200003};
  const int kTrials = 600;
  for (int trial = 0; trial < kTrials; ++trial) {
    const int64_t n = trial < 120 ? sizes[trial % 15] : static_cast<int64_t>(rng() % 300000);
    const int kind = static_cast<int>(rng() % 4);
    const bool last = trial % 2 == 1;
    std::unique_ptr<uint8_t[]> data(new uint8_t[n > 0 ? n : 1]);
    Fill(rng, data.get(), n, kind);
    const jaxjpeg::RunBlocks blocks(data.get(), n, last);
    std::vector<uint8_t> stream(static_cast<size_t>(blocks.size()));
    Expect(blocks.Write(stream.data()), "blocks written differ from their plan", trial);
    Expect(static_cast<int64_t>(stream.size()) == jaxjpeg::RunDeflatedSize(data.get(), n, last),
           "size counted differs from size written", trial);
    Expect(Inflates(stream, data.get(), n, last), "zlib inflates other bytes", trial);
  }
  std::printf("deflate checks: %d buffers, %d failures\n", kTrials, failures);
  return failures == 0 ? 0 : 1;
}
