#include "code_lengths.h"

#include <algorithm>
#include <array>

namespace jaxjpeg {

// Two queues (leaves and merged nodes, both in increasing weight order)
// replace a priority queue.
void AssignTreeDepths(CodeLeaf* leaves, int n) {
  std::array<uint64_t, 2 * kMaxCodeLeaves> weight;
  std::array<int, 2 * kMaxCodeLeaves> parent;
  for (int i = 0; i < n; ++i) weight[i] = leaves[i].count;
  int next_leaf = 0;
  int next_merged = n;
  auto take_lightest = [&](int merged_end) {
    const bool take_leaf =
        next_leaf < n && (next_merged >= merged_end || weight[next_leaf] <= weight[next_merged]);
    return take_leaf ? next_leaf++ : next_merged++;
  };
  for (int node = n; node < 2 * n - 1; ++node) {
    const int a = take_lightest(node);
    const int b = take_lightest(node);
    weight[node] = weight[a] + weight[b];
    parent[a] = parent[b] = node;
  }
  std::array<int, 2 * kMaxCodeLeaves> depth;
  depth[2 * n - 2] = 0;
  for (int node = 2 * n - 3; node >= 0; --node) depth[node] = depth[parent[node]] + 1;
  for (int i = 0; i < n; ++i) leaves[i].length = depth[i];
}

int TreeLengthCounts(CodeLeaf* leaves, int n, int* length_counts) {
  AssignTreeDepths(leaves, n);
  int max_length = 0;
  for (int i = 0; i < n; ++i) {
    ++length_counts[leaves[i].length];
    max_length = std::max(max_length, leaves[i].length);
  }
  return max_length;
}

void LimitCodeLengths(int* length_counts, int max_length, int limit) {
  for (int length = max_length; length > limit; --length) {
    while (length_counts[length] > 0) {
      int shorter = length - 2;
      while (length_counts[shorter] == 0) --shorter;
      length_counts[length] -= 2;
      length_counts[length - 1] += 1;
      length_counts[shorter + 1] += 2;
      length_counts[shorter] -= 1;
    }
  }
}

namespace {

constexpr int kDigitBits = 8;
constexpr int kRadixPasses = 3;   // counts under 2^24: every chunk's, most blocks'
constexpr int kFewLeaves = 48;    // std::stable_sort beats a radix pass's 256 buckets

}  // namespace

void SortLeavesByCount(CodeLeaf* leaves, int n) {
  uint64_t largest = 0;
  for (int i = 0; i < n; ++i) largest = std::max(largest, leaves[i].count);
  if (n <= kFewLeaves || largest >> (kDigitBits * kRadixPasses)) {
    std::stable_sort(leaves, leaves + n,
                     [](const CodeLeaf& a, const CodeLeaf& b) { return a.count < b.count; });
    return;
  }
  CodeLeaf buffer[kMaxCodeLeaves];
  CodeLeaf* from = leaves;
  CodeLeaf* to = buffer;
  for (int shift = 0; shift < kDigitBits * kRadixPasses && largest >> shift; shift += kDigitBits) {
    int start[(1 << kDigitBits) + 1] = {};
    for (int i = 0; i < n; ++i) ++start[((from[i].count >> shift) & 0xFF) + 1];
    for (int d = 0; d < (1 << kDigitBits); ++d) start[d + 1] += start[d];
    for (int i = 0; i < n; ++i) to[start[(from[i].count >> shift) & 0xFF]++] = from[i];
    std::swap(from, to);
  }
  if (from != leaves) std::copy(from, from + n, leaves);
}

void DeflateCodeLengths(const uint64_t* counts, int n, int limit, uint8_t* lengths) {
  CodeLeaf leaves[kMaxCodeLeaves];
  int used = 0;
  for (int symbol = 0; symbol < n; ++symbol) {
    lengths[symbol] = 0;
    if (counts[symbol] > 0) leaves[used++] = {counts[symbol], symbol, 0};
  }
  for (int symbol = 0; used < 2 && symbol < n; ++symbol) {
    if (counts[symbol] == 0) leaves[used++] = {0, symbol, 0};
  }
  SortLeavesByCount(leaves, used);
  int length_counts[kMaxCodeLeaves + 1] = {};
  LimitCodeLengths(length_counts, TreeLengthCounts(leaves, used, length_counts), limit);
  // The limited lengths, shortest first, to the leaves most counted first.
  int length = 1;
  for (int i = used - 1; i >= 0; --i) {
    while (length_counts[length] == 0) ++length;
    --length_counts[length];
    lengths[leaves[i].symbol] = static_cast<uint8_t>(length);
  }
}

}  // namespace jaxjpeg
