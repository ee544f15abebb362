// Runs a decode plan on the host: every restart interval on a thread pool.
#ifndef JAXJPEG_CPU_EXECUTOR_H_
#define JAXJPEG_CPU_EXECUTOR_H_

#include <atomic>

#include "decode_plan.h"
#include "parallel_for.h"

namespace jaxjpeg {

// Returns kPlanOk, or the packed status of the first failing interval.
inline int32_t RunDecodePlanOnHost(const DecodePlan& plan, int threads) {
  if (plan.num_intervals > kMaxPlanIntervals) return PackPlanStatus(0, Status::kBadArgument);
  std::atomic<int32_t> first_error{kPlanOk};
  ParallelFor(plan.num_intervals, threads, [&](int64_t i) {
    const int32_t status = DecodePlanInterval(plan, i);
    int32_t seen = first_error.load();
    while (status < seen && !first_error.compare_exchange_weak(seen, status)) {
    }
  });
  return first_error.load();
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_CPU_EXECUTOR_H_
