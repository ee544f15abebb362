// A minimal fork-join loop for host code: work items are handed out in chunks
// from an atomic counter so uneven intervals balance across threads.
#ifndef JAXJPEG_PARALLEL_FOR_H_
#define JAXJPEG_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace jaxjpeg {

inline int DefaultThreadCount() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// Calls body(state, i) for every i in [0, n) on up to `threads` threads
// (<= 0: all cores), each thread with a default-constructed State of its
// own. Never throws: if threads cannot be started the loop runs inline.
template <typename State, typename Body>
void ParallelForWith(int64_t n, int threads, const Body& body) {
  if (threads <= 0) threads = DefaultThreadCount();
  const int64_t chunk = std::max<int64_t>(1, n / (int64_t(threads) * 16));
  threads = static_cast<int>(std::min<int64_t>(threads, (n + chunk - 1) / chunk));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    State state;
    for (int64_t start; (start = next.fetch_add(chunk)) < n;) {
      const int64_t stop = std::min(n, start + chunk);
      for (int64_t i = start; i < stop; ++i) body(state, i);
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  } catch (...) {
    // Fewer threads than asked for; the calling thread still finishes the work.
  }
  worker();
  for (auto& th : pool) th.join();
}

// Calls body(i) for every i in [0, n) (see ParallelForWith).
template <typename Body>
void ParallelFor(int64_t n, int threads, const Body& body) {
  struct NoState {};
  ParallelForWith<NoState>(n, threads, [&](NoState&, int64_t i) { body(i); });
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_PARALLEL_FOR_H_
