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

// How many lock-step decode steps of warps wrote their blocks staged and how
// many each lane alone (see decode_kernel.h): tests check that both paths ran.
struct HarnessCounts {
  int64_t staged_steps = 0;
  int64_t simple_steps = 0;
};

// The lock-step decode of one warp's intervals of a round
// (DecodeWarpInLockStep in ffi_cuda.cu): `members` bit l set where lane l,
// thread first_thread + l, decodes now. Each loop over lanes stands for the
// lanes between two of the kernel's votes or barriers; a vote is a loop too.
template <int kBits, OutputType kType>
void RunWarpInLockStep(const DecodePlan& plan, KernelShared& shared, int64_t block,
                       int first_thread, uint32_t members, const IntervalWork* work,
                       int32_t* status, HarnessCounts* counts) {
  auto member = [members](int lane) { return ((members >> lane) & 1u) != 0; };
  LaneDecode<kType> lanes[kWarpLanes];
  int32_t steps = 0;
  bool may_stage = members == kFullWarp;
  for (int l = 0; l < kWarpLanes; ++l) {
    if (!member(l)) continue;
    const IntervalWork& w = work[l];
    const int64_t i = block * kDecodeThreadsPerBlock + first_thread + l;
    lanes[l] = StartLane<kType>(plan, w, i, ThreadScratch(shared, first_thread + l));
    steps = w.num_blocks > steps ? w.num_blocks : steps;
    may_stage = may_stage && w.tile == work[0].tile && LaneRowsAligned(lanes[l]);
  }
  const int32_t* warp_columns = shared.blocks + first_thread;
  for (int32_t step = 0; step < steps; ++step) {
    bool staged = may_stage;
    for (int l = 0; l < kWarpLanes; ++l) {
      if (!member(l)) continue;
      DecodeLaneBlock<kBits>(lanes[l], shared.tables, ThreadScratch(shared, first_thread + l));
      staged = staged && LaneHasWholeBlock(lanes[l]);
    }
    if (staged) {
      for (int l = 0; l < kWarpLanes; ++l) {
        FillConstantColumn(ThreadScratch(shared, first_thread + l), lanes[l].block);
      }
      for (int k = 0; k < StagedChunksPerLane<kType>(); ++k) {
        for (int l = 0; l < kWarpLanes; ++l) {
          const StagedChunk<kType> c(l, k);
          WriteStagedChunk(lanes[l], c, PackedBlockPlace(lanes[c.j]), warp_columns);
        }
      }
    } else {
      for (int l = 0; l < kWarpLanes; ++l) {
        if (member(l)) PutLaneBlock(lanes[l], ThreadScratch(shared, first_thread + l));
      }
    }
    ++(staged ? counts->staged_steps : counts->simple_steps);
    for (int l = 0; l < kWarpLanes; ++l) {
      if (member(l)) ClearLaneColumn(lanes[l], ThreadScratch(shared, first_thread + l), staged);
    }
  }
  for (int l = 0; l < kWarpLanes; ++l) {
    if (!member(l)) continue;
    const int64_t i = block * kDecodeThreadsPerBlock + first_thread + l;
    FinishLane(plan, lanes[l], work[l], i, status);
  }
}

// Runs one decode kernel's phases over every (block, thread) on the host, in
// the kernel's order: claim, stage the zig-zag table, then rounds of (offer
// tables, stage them, decode those threads, a warp at a time in lock step).
// A loop over threads stands for the threads between two barriers.
struct HarnessKernel {
  const DecodePlan& plan;
  KernelShared& shared;
  int32_t* status;
  HarnessCounts* counts;

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
        for (int first = 0; first < kDecodeThreadsPerBlock; first += kWarpLanes) {
          uint32_t members = 0;
          for (int l = 0; l < kWarpLanes; ++l) {
            if (pending[first + l] && TableOf(work[first + l]) == table) {
              members |= 1u << l;
              pending[first + l] = false;
            }
          }
          if (members != 0) {
            RunWarpInLockStep<kBits, kType>(plan, shared, block, first, members,
                                            work.data() + first, status, counts);
          }
        }
      }
    }
  }
};

// The table kernel's block for table `index` (BuildTablesKernel in
// ffi_cuda.cu): a loop over threads for each phase. Returns the build's
// status (the kernel has no use for it: a bad table decodes nothing).
inline Status RunBuildTablesBlock(const DecodePlan& plan, int64_t index, DecoderTables* built) {
  DecoderTables* t = built + index;
  const Status s = BuildTableCodes(plan.tables[index], t);
  for (int thread = 0; thread < kBuildTablesThreads; ++thread) {
    BuildLookaheadPart(t, thread, kBuildTablesThreads);
  }
  int pairs = 0;
  for (int thread = 0; thread < kBuildTablesThreads; ++thread) {
    pairs += BuildFastAcPart(t, thread, kBuildTablesThreads);
  }
  t->fast_ac_pairs_common = PairsAreCommon(pairs);
  return s;
}

// Runs the destuff kernel (a call per interval stands for its warp), the
// table kernel, every decode kernel and the check kernels, as the CUDA
// handler launches them, with the same workspace layout. Without
// `whole_outputs` the coverage kernels are left out, as the handler's
// "parts" target leaves them out (tests decode parts of outputs too).
inline int32_t RunKernelHarness(const DecodePlan& host_plan, HarnessCounts* counts = nullptr,
                                bool whole_outputs = true) {
  HarnessCounts ignored;
  DecodePlan plan = host_plan;
  std::vector<uint8_t> workspace(DecodeWorkspaceBytes(plan.num_outputs, plan.payload_size,
                                                      plan.num_intervals, plan.num_tables));
  const DecodeWorkspace parts =
      LayOutDecodeWorkspace(workspace.data(), plan.num_outputs, plan.num_intervals,
                            plan.num_tables);
  plan.destuffed = parts.destuffed;
  plan.built_tables = parts.built_tables;
  int32_t status = kPlanOk;
  *plan.destuffed.starts_status = kPlanOk;
  for (int64_t i = 0; i < plan.num_intervals; ++i) {
    DestuffPlanInterval(plan, i, true, &status, DestuffOnHost);
  }
  for (int64_t t = 0; t < plan.num_tables; ++t) RunBuildTablesBlock(plan, t, parts.built_tables);
  auto shared = std::make_unique<KernelShared>();
  ForEachDecodeKernel(HarnessKernel{plan, *shared, &status, counts ? counts : &ignored});
  for (int64_t i = 0; i < plan.num_intervals; ++i) CheckIntervalDecoded(plan, i, &status);
  if (whole_outputs) {
    for (int64_t t = 0; t < plan.num_tiles; ++t) AddTileCoverage(plan, t, parts.coverage);
    for (int64_t o = 0; o < plan.num_outputs; ++o) {
      CheckOutputCoverage(plan, o, parts.coverage, &status, 0, 1);
    }
  }
  return status;
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_KERNEL_HARNESS_H_
