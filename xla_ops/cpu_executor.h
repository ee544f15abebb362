// Runs a decode plan on the host: every restart interval on a thread pool.
#ifndef JAXJPEG_CPU_EXECUTOR_H_
#define JAXJPEG_CPU_EXECUTOR_H_

#include <atomic>

#include "decode_plan.h"
#include "parallel_for.h"

namespace jaxjpeg {

// Keeps the smallest packed status (the first failing interval) seen by any
// thread: the one first-error rule of every host loop (the CUDA kernel does
// the same with atomicMin).
inline void RecordFirstError(std::atomic<int32_t>& first_error, int32_t status) {
  int32_t seen = first_error.load();
  while (status < seen && !first_error.compare_exchange_weak(seen, status)) {
  }
}

// Returns kPlanOk, or the packed status of the first failing interval.
inline int32_t RunDecodePlanOnHost(const DecodePlan& plan, int threads) {
  if (plan.num_intervals > kMaxPlanIntervals) return PackPlanStatus(0, Status::kBadArgument);
  const int32_t starts = PlanStartsStatus(plan);
  if (starts != kPlanOk) {
    ParallelFor(plan.num_intervals, threads,
                [&](int64_t i) { FillUndecodedIntervalWithNaN(plan, i); });
    return starts;
  }
  std::atomic<int32_t> first_error{kPlanOk};
  ParallelFor(plan.num_intervals, threads, [&](int64_t i) {
    RecordFirstError(first_error, DecodePlanInterval(plan, i));
  });
  return first_error.load();
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_CPU_EXECUTOR_H_
