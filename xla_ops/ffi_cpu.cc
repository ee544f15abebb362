// CPU handler of the decode custom call: the plan's restart intervals run on
// XLA's intra-op thread pool, the calling thread working alongside.
#include "ffi_cpu.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>

#include <sys/mman.h>

#include "cpu_executor.h"
#include "ffi_decode.h"
#include "float_modes.h"
#include "plan_coverage.h"

namespace jaxjpeg {
namespace {

// Shared by the caller and the pool tasks. Tasks may start after the work is
// done (or never); they hold this by shared_ptr and only touch the plan after
// registering in `active`, so the caller waits only for tasks that did work.
struct PoolLoop {
  const DecodePlan* plan = nullptr;  // read only after claiming work
  int64_t num_intervals = 0;         // a copy: late tasks must not read *plan
  int64_t chunk = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int32_t> first_error{kPlanOk};
  std::atomic<int> active{0};
  std::mutex mu;
  std::condition_variable idle;

  void Work() {
    active.fetch_add(1);
    KeepSubnormals modes;  // XLA's threads flush them; the GPU does not
    WorkerTables tables;
    for (int64_t start; (start = next.fetch_add(chunk)) < num_intervals;) {
      const int64_t stop = std::min(num_intervals, start + chunk);
      for (int64_t i = start; i < stop; ++i) Record(DecodePlanInterval(*plan, i, tables));
    }
    if (active.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> lock(mu);
      idle.notify_all();
    }
  }

  void Record(int32_t status) {
    int32_t seen = first_error.load();
    while (status < seen && !first_error.compare_exchange_weak(seen, status)) {
    }
  }

  void WaitIdle() {
    std::unique_lock<std::mutex> lock(mu);
    idle.wait(lock, [&] { return active.load() == 0; });
  }
};

// XLA hands us freshly allocated outputs; first-touch page faults on them
// cost about a third of the decode time with 4 KiB pages. Where the kernel
// does transparent huge pages on request, ask for them on large outputs.
void AdviseHugePages(const PlanOutput* outputs, int64_t count) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t bytes = outputs[i].bytes();
    const uintptr_t begin = reinterpret_cast<uintptr_t>(outputs[i].data);
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
}

int32_t RunOnPool(const DecodePlan& plan, ffi::ThreadPool& pool) {
  const int32_t starts = PlanStartsStatus(plan);
  if (starts != kPlanOk) return starts;  // the call fails: XLA drops the outputs
  auto loop = std::make_shared<PoolLoop>();
  loop->plan = &plan;
  loop->num_intervals = plan.num_intervals;
  const int64_t helpers = std::max<int64_t>(0, pool.num_threads());
  loop->chunk = std::max<int64_t>(1, plan.num_intervals / ((helpers + 1) * 16));
  const int64_t tasks = std::min(helpers, plan.num_intervals / loop->chunk);
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule([loop] { loop->Work(); });
  loop->Work();
  loop->WaitIdle();
  return loop->first_error.load();
}

// kWholeOutputs: every output element must be written exactly once
// (plan_coverage.h); the "parts" target decodes regions' boxes, which their
// tiles may write in part (the restore's own plans).
template <bool kWholeOutputs>
ffi::Error DecodeCpuImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> payload,
                         ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> tiles,
                         ffi::Buffer<ffi::U8> tables, ffi::Buffer<ffi::F32> row_scale,
                         ffi::Buffer<ffi::F32> row_offset, ffi::Buffer<ffi::F32> col_scale,
                          ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> block_map,
                         ffi::ResultBuffer<ffi::S32> status,
                         ffi::ResultBuffer<ffi::U8> workspace, ffi::RemainingRets outputs) {
  DecodePlan plan{};
  ffi::Error err = PlanFromOperands(payload, starts, tiles, tables, row_scale, row_offset,
                                    col_scale, positions, block_map, &plan);
  if (err.failure()) return err;
  err = CheckResults(status, workspace, outputs.size());
  if (err.failure()) return err;
  auto* described = reinterpret_cast<PlanOutput*>(workspace->typed_data());
  for (size_t i = 0; i < outputs.size(); ++i) {
    err = DescribeOutput(outputs, i, &described[i]);
    if (err.failure()) return err;
  }
  plan.outputs = described;
  plan.num_outputs = static_cast<int64_t>(outputs.size());
  AdviseHugePages(described, plan.num_outputs);
  // The first failure, as the CUDA handler's atomic min over both checks;
  // XLA drops the outputs of a failed call.
  const int32_t decoded = RunOnPool(plan, pool);
  const int32_t result =
      kWholeOutputs ? std::min(decoded, PlanCoverageStatus(plan, /*fill=*/false)) : decoded;
  status->typed_data()[0] = result;
  if (result != kPlanOk) return ffi::Error(ffi::ErrorCode::kDataLoss, PlanFailure(result));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxjpegDecodeCpu, DecodeCpuImpl<true>,
                              BindDecodeOperands(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxjpegDecodePartsCpu, DecodeCpuImpl<false>,
                              BindDecodeOperands(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace jaxjpeg
