// The CPU harness of the CUDA decode: the destuff kernel, the decode
// kernels and the check kernel run phase by phase on the host, a loop over
// threads standing for those between two barriers (and a call per interval
// for a destuff warp). Tests (_native.run_plan_kernel_harness) and the
// fuzzer (tests/fuzz/fuzz_decode.cc) check it against the host decoder.
#ifndef JAXJPEG_KERNEL_HARNESS_H_
#define JAXJPEG_KERNEL_HARNESS_H_

#include <memory>
#include <vector>

#include "decode_kernel.h"

namespace jaxjpeg {

// Runs one decode kernel's phases over every (block, thread) on the host, in
// the kernel's order: claim, stage the zig-zag table, then rounds of (offer
// tables, stage them, decode those threads). A loop over threads stands for
// the threads between two barriers.
struct HarnessKernel {
  const DecodePlan& plan;
  KernelShared& shared;
  int32_t* status;

  template <int kBits, OutputType kType>
  void operator()() const {
    std::vector<IntervalWork> work(kDecodeThreadsPerBlock);
    std::vector<char> pending(kDecodeThreadsPerBlock);
    for (int64_t block = 0; block < KernelBlockCount(plan.num_intervals); ++block) {
      if (!BlockHasKind<kBits, kType>(plan, block)) continue;
      bool any = false;
      for (int t = 0; t < kDecodeThreadsPerBlock; ++t) {
        pending[t] = ClaimInterval<kBits, kType>(plan, block, t, &work[t], status);
        any = any || pending[t];
      }
      if (!any) continue;
      for (int t = 0; t < kDecodeThreadsPerBlock; ++t) StageZigzagPart(t, &shared);
      for (;;) {
        shared.next_table = kNoTable;
        for (int t = 0; t < kDecodeThreadsPerBlock; ++t) {
          if (pending[t]) RecordFirstError(&shared.next_table, TableOf(work[t]));
        }
        const int32_t table = shared.next_table;
        if (table == kNoTable) break;
        for (int t = 0; t < kDecodeThreadsPerBlock; ++t) {
          StageTablesPart(plan, table, t, &shared.tables);
        }
        for (int t = 0; t < kDecodeThreadsPerBlock; ++t) {
          if (pending[t] && TableOf(work[t]) == table) {
            DecodeClaimed<kBits, kType>(plan, work[t], shared, block, t, status);
            pending[t] = false;
          }
        }
      }
    }
  }
};

// Runs the destuff kernel (a call per interval stands for its warp) and
// every decode kernel, as the CUDA handler launches them, with the same
// workspace layout.
inline int32_t RunKernelHarness(const DecodePlan& host_plan) {
  DecodePlan plan = host_plan;
  std::vector<uint8_t> workspace(
      DecodeWorkspaceBytes(plan.num_outputs, plan.payload_size, plan.num_intervals));
  plan.destuffed =
      LayOutDecodeWorkspace(workspace.data(), plan.num_outputs, plan.num_intervals).destuffed;
  int32_t status = kPlanOk;
  *plan.destuffed.starts_status = kPlanOk;
  for (int64_t i = 0; i < plan.num_intervals; ++i) {
    DestuffPlanInterval(plan, i, true, &status, DestuffOnHost);
  }
  auto shared = std::make_unique<KernelShared>();
  ForEachDecodeKernel(HarnessKernel{plan, *shared, &status});
  for (int64_t i = 0; i < plan.num_intervals; ++i) CheckIntervalDecoded(plan, i, &status);
  return status;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_KERNEL_HARNESS_H_
