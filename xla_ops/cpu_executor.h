// Runs a decode plan on the host: every restart interval on a thread pool.
#ifndef JAXJPEG_CPU_EXECUTOR_H_
#define JAXJPEG_CPU_EXECUTOR_H_

#include <atomic>
#include <memory>

#include "decode_plan.h"
#include "parallel_for.h"
#include "plan_coverage.h"

namespace jaxjpeg {

// The DecoderTables a host worker decodes with, built from the plan's
// packed tables when the worker meets another table than the last
// (consecutive intervals share a tile: about once per tile and worker, a
// few microseconds beside the tile's decode). Built on first use.
class WorkerTables {
 public:
  const DecoderTables& Get(const DecodePlan& p, int64_t index) {
    if (!tables_) tables_ = std::make_unique<DecoderTables>();
    if (index != index_) {
      BuildDecoderTables(p.tables[index], tables_.get());  // a bad table decodes nothing
      index_ = index;
    }
    return *tables_;
  }

 private:
  int64_t index_ = -1;
  std::unique_ptr<DecoderTables> tables_;
};

// Decodes interval i of the plan with the worker's tables; returns kPlanOk
// or the packed status.
inline int32_t DecodePlanInterval(const DecodePlan& p, int64_t i, WorkerTables& tables) {
  IntervalWork w;
  if (!ResolveInterval(p, i, &w)) return PackPlanStatus(i, Status::kBadArgument);
  const DecoderTables& t = tables.Get(p, w.tile[kTileTables]);
  Status s = Status::kBadArgument;
  WithOutputType(p.outputs[w.tile[kTileOutput]].type, [&](auto type) {
    s = DecodeIntervalAs<decltype(type)::value>(p, w, t);
  });
  return s == Status::kOk ? kPlanOk : PackPlanStatus(i, s);
}

// Keeps the smallest packed status (the first failing interval) seen by any
// thread: the one first-error rule of every host loop (the CUDA kernel does
// the same with atomicMin).
inline void RecordFirstError(std::atomic<int32_t>& first_error, int32_t status) {
  int32_t seen = first_error.load();
  while (status < seen && !first_error.compare_exchange_weak(seen, status)) {
  }
}

// Returns kPlanOk, or the packed status of the first failing interval. With
// `whole_outputs`, the tiles must also write each output exactly once
// (plan_coverage.h): what the decode handlers require; tools and tests decode
// parts of outputs too.
inline int32_t RunDecodePlanOnHost(const DecodePlan& plan, int threads, bool whole_outputs) {
  if (PlanShapeError(plan) != nullptr) return PackPlanStatus(0, Status::kBadArgument);
  std::atomic<int32_t> first_error{PlanStartsStatus(plan)};
  if (first_error.load() != kPlanOk) {
    ParallelFor(plan.num_intervals, threads,
                [&](int64_t i) { FillUndecodedIntervalWithNaN(plan, i); });
  } else {
    ParallelForWith<WorkerTables>(plan.num_intervals, threads,
                                  [&](WorkerTables& tables, int64_t i) {
      RecordFirstError(first_error, DecodePlanInterval(plan, i, tables));
    });
  }
  if (whole_outputs) RecordFirstError(first_error, PlanCoverageStatus(plan, /*fill=*/true));
  return first_error.load();
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_CPU_EXECUTOR_H_
