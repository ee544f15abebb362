// Whether a decode plan's tiles write every element of every output exactly
// once. Interval checks (decode_plan.h) keep each write inside its output;
// they cannot see a tile dropped with its intervals or moved onto another,
// which left memory's leftovers as weights and the call succeeded (found by
// review, with the operands of `jaxjpeg.load` edited).
//
// Each tile's written offsets are summed three ways, modulo 2^64: how many,
// their sum and the sum of their squares; an output's totals must equal
// those of 0 .. elements - 1. A missing, repeated or misplaced region changes
// them (short of one built to keep all three); tiles swapped with tiles of
// their own shape do not, as nothing in a plan tells them apart.
#ifndef JAXJPEG_PLAN_COVERAGE_H_
#define JAXJPEG_PLAN_COVERAGE_H_

#include <cstdint>
#include <vector>

#include "decode_plan.h"

namespace jaxjpeg {

struct CoverageSums {
  uint64_t count = 0, sum = 0, squares = 0;
};

JJ_HD JJ_INLINE bool SameCoverage(const CoverageSums& a, const CoverageSums& b) {
  return a.count == b.count && a.sum == b.sum && a.squares == b.squares;
}

// The sums of 0 .. n - 1: n, n (n - 1) / 2 and (n - 1) n (2n - 1) / 6, each
// division made on a factor it divides, so the rest wraps exactly.
JJ_HD inline CoverageSums WholeOutputCoverage(int64_t elements) {
  CoverageSums s;
  if (elements <= 0) return s;
  const uint64_t n = static_cast<uint64_t>(elements);
  uint64_t a = n - 1, b = n, c = 2 * n - 1;
  s.count = n;
  s.sum = n % 2 == 0 ? (n / 2) * (n - 1) : n * ((n - 1) / 2);
  if (a % 2 == 0) a /= 2; else b /= 2;
  if (a % 3 == 0) a /= 3; else if (b % 3 == 0) b /= 3; else c /= 3;
  s.squares = a * b * c;
  return s;
}

// Tile t's sums: it writes offset row_at(y) + col_at(x) for y < height,
// x < width, so with R1, R2 (C1, C2) the sums of the row (column) offsets
// and their squares: count = w h, sum = w R1 + h C1 and squares =
// w R2 + 2 R1 C1 + h C2. False where the tile's placement cannot be read
// (its intervals fail on their own then).
JJ_HD inline bool TileCoverage(const DecodePlan& p, int64_t t, CoverageSums* out) {
  const int64_t* tile = p.tiles + t * kTileColumns;
  const int64_t width = tile[kTileWidth], height = tile[kTileHeight];
  if (width < 1 || height < 1 || width > kMaxDimension || height > kMaxDimension) return false;
  const int64_t positions0 = tile[kTilePositions0], distance = tile[kTileRowStride];
  const int64_t* row_at = nullptr;
  if (positions0 >= 0) {  // placed by table; comparisons by subtraction, as in PlacedIntervalFits
    if (positions0 > p.num_positions - height || distance < -positions0 ||
        distance > p.num_positions - width - positions0) {
      return false;
    }
    row_at = p.positions + positions0;
  } else if (positions0 != -1) {
    return false;
  }
  uint64_t r1 = 0, r2 = 0, c1 = 0, c2 = 0;
  for (int64_t y = 0; y < height; ++y) {
    const uint64_t r = row_at != nullptr
                           ? static_cast<uint64_t>(row_at[y])
                           : (static_cast<uint64_t>(tile[kTileRow0]) + y) *
                                     static_cast<uint64_t>(distance) +
                                 static_cast<uint64_t>(tile[kTileCol0]);
    r1 += r;
    r2 += r * r;
  }
  for (int64_t x = 0; x < width; ++x) {
    const uint64_t c = row_at != nullptr ? static_cast<uint64_t>(row_at[distance + x])
                                         : static_cast<uint64_t>(x);
    c1 += c;
    c2 += c * c;
  }
  const uint64_t w = static_cast<uint64_t>(width), h = static_cast<uint64_t>(height);
  out->count = w * h;
  out->sum = w * r1 + h * c1;
  out->squares = w * r2 + 2 * r1 * c1 + h * c2;
  return true;
}

// Adds tile t's sums to its output's (kCoverageWords per output, zeroed
// before): atomically on the device, one thread per tile.
JJ_HD inline void AddTileCoverage(const DecodePlan& p, int64_t t, uint64_t* sums) {
  CoverageSums s;
  const int64_t output = p.tiles[t * kTileColumns + kTileOutput];
  if (output < 0 || output >= p.num_outputs || !TileCoverage(p, t, &s)) return;
  uint64_t* o = sums + output * kCoverageWords;
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(o), s.count);
  atomicAdd(reinterpret_cast<unsigned long long*>(o + 1), s.sum);
  atomicAdd(reinterpret_cast<unsigned long long*>(o + 2), s.squares);
#else
  o[0] += s.count;
  o[1] += s.sum;
  o[2] += s.squares;
#endif
}

JJ_HD JJ_INLINE bool OutputCovered(const DecodePlan& p, int64_t output, const uint64_t* sums) {
  const uint64_t* o = sums + output * kCoverageWords;
  return SameCoverage(CoverageSums{o[0], o[1], o[2]},
                      WholeOutputCoverage(p.outputs[output].elements));
}

// Elements first, first + step, ... of an output become NaN.
JJ_HD inline void FillOutputWithNaN(const PlanOutput& out, int64_t first, int64_t step) {
  WithOutputType(out.type, [&](auto type) {
    using Element = typename OutputElement<decltype(type)::value>::Type;
    const Element nan = OutputElement<decltype(type)::value>::From(__builtin_nanf(""));
    Element* data = static_cast<Element*>(out.data);
    for (int64_t k = first; k < out.elements; k += step) data[k] = nan;
  });
}

// The packed status of an output its tiles do not cover exactly once: the
// output's index in the interval's place (PlanFailure tells them apart).
JJ_HD JJ_INLINE int32_t UncoveredStatus(int64_t output) {
  return PackPlanStatus(output < kMaxPlanIntervals ? output : kMaxPlanIntervals - 1,
                        Status::kUncovered);   // (interval << 4) fits 31 bits
}

// The host's check of every output, after decoding: kPlanOk or the first
// uncovered output's status; with `fill`, each uncovered output becomes NaN
// (as the CUDA handler leaves it: nothing raises inside a jitted program).
inline int32_t PlanCoverageStatus(const DecodePlan& p, bool fill) {
  std::vector<uint64_t> sums(static_cast<size_t>(p.num_outputs * kCoverageWords), 0);
  for (int64_t t = 0; t < p.num_tiles; ++t) AddTileCoverage(p, t, sums.data());
  int32_t status = kPlanOk;
  for (int64_t o = p.num_outputs - 1; o >= 0; --o) {
    if (OutputCovered(p, o, sums.data())) continue;
    status = UncoveredStatus(o);
    if (fill) FillOutputWithNaN(p.outputs[o], 0, 1);
  }
  return status;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_PLAN_COVERAGE_H_
