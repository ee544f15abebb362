// CUDA handler of the decode custom call. Everything runs on the stream XLA
// passes; nothing is allocated and nothing waits for the device, so the
// handler is safe to capture in a command buffer (CUDA graph). The destuffed
// intervals live in the workspace result, which the CUDA lowering sizes
// (DecodeWorkspaceBytes): an XLA buffer, so its address is fixed for as long
// as a captured graph that uses it.
#include <cuda_runtime.h>

#include <atomic>

#include <pybind11/pybind11.h>

#include "decode_kernel.h"
#include "ffi_decode.h"

namespace jaxjpeg {
namespace {

constexpr int kDescriptorsPerLaunch = 128;  // 128 * 24 B of kernel parameters

struct DescriptorChunk {
  PlanOutput items[kDescriptorsPerLaunch];
  int64_t first;
  int count;
};

__global__ void InitStatusKernel(int32_t* status, int32_t* starts_status) {
  *status = kPlanOk;
  *starts_status = kPlanOk;
}

// A warp per interval: reads its bytes 128 at a time as aligned words, coalesced, and writes
// them destuffed into the workspace (see destuff.h, DestuffPlanInterval).
constexpr int kDestuffThreadsPerBlock = 256;

__global__ void __launch_bounds__(kDestuffThreadsPerBlock)
    DestuffKernel(const __grid_constant__ DecodePlan plan, int32_t* __restrict__ status) {
  const int64_t i =
      (int64_t(blockIdx.x) * kDestuffThreadsPerBlock + threadIdx.x) / kDestuffLanes;
  if (i >= plan.num_intervals) return;  // the whole warp alike
  const int lane = static_cast<int>(threadIdx.x % kDestuffLanes);
  DestuffPlanInterval(plan, i, lane == 0, status,
                      [lane](const uint8_t* begin, const uint8_t* end, uint8_t* out) {
                        return DestuffWarp(begin, end, out, lane);
                      });
}

// A block per table: its DecoderTables built into the workspace from the
// plan's PackedTables (table_build.h's phases).
__global__ void __launch_bounds__(kBuildTablesThreads)
    BuildTablesKernel(const PackedTables* __restrict__ packed, DecoderTables* __restrict__ built) {
  DecoderTables* t = built + blockIdx.x;
  __shared__ int pairs;
  if (threadIdx.x == 0) {
    BuildTableCodes(packed[blockIdx.x], t);
    pairs = 0;
  }
  __syncthreads();
  BuildLookaheadPart(t, threadIdx.x, kBuildTablesThreads);
  __syncthreads();
  atomicAdd(&pairs, BuildFastAcPart(t, threadIdx.x, kBuildTablesThreads));
  __syncthreads();
  if (threadIdx.x == 0) t->fast_ac_pairs_common = PairsAreCommon(pairs);
}

__global__ void WriteDescriptorsKernel(const __grid_constant__ DescriptorChunk chunk,
                                       PlanOutput* workspace) {
  if (threadIdx.x < chunk.count) workspace[chunk.first + threadIdx.x] = chunk.items[threadIdx.x];
}

// The lock-step decode of this warp's intervals claimed in this round
// (`members`: the lanes that decode now): the phases of decode_kernel.h,
// with the warp's votes and barriers between them.
template <int kBits, OutputType kType>
__device__ __forceinline__ void DecodeWarpInLockStep(const DecodePlan& plan, const IntervalWork& w,
                                                     KernelShared& s, uint32_t members,
                                                     int32_t* status) {
  const int thread = static_cast<int>(threadIdx.x), lane = thread % kWarpLanes;
  const int64_t i = int64_t(blockIdx.x) * kDecodeThreadsPerBlock + thread;
  const LaneScratch scratch = ThreadScratch(s, thread);
  LaneDecode<kType> d = StartLane<kType>(plan, w, i, scratch);
  const int32_t steps = __reduce_max_sync(members, w.num_blocks);
  bool may_stage = false;
  if (members == kFullWarp) {
    int same_tile;
    __match_all_sync(kFullWarp, reinterpret_cast<uintptr_t>(w.tile), &same_tile);
    may_stage = __all_sync(kFullWarp, same_tile && LaneRowsAligned(d));
  }
  const int32_t* warp_columns = s.blocks + (thread - lane);
  for (int32_t step = 0; step < steps; ++step) {
    DecodeLaneBlock<kBits>(d, s.tables, scratch);
    const bool staged = may_stage && __all_sync(kFullWarp, LaneHasWholeBlock(d));
    if (staged) {
      FillConstantColumn(scratch, d.block);
      __syncwarp();  // every column written
      const uint32_t place = PackedBlockPlace(d);
      for (int k = 0; k < StagedChunksPerLane<kType>(); ++k) {
        const StagedChunk<kType> c(lane, k);
        WriteStagedChunk(d, c, __shfl_sync(kFullWarp, place, c.j), warp_columns);
      }
      __syncwarp();  // every column read
    } else {
      PutLaneBlock(d, scratch);
    }
    ClearLaneColumn(d, scratch, staged);
  }
  FinishLane(plan, d, w, i, status);
}

// See decode_kernel.h for the phases; the barriers between them are here.
// 16 warps per SM: at most 128 registers per thread (see decode_kernel.h).
template <int kBits, OutputType kType>
__global__ void __launch_bounds__(kDecodeThreadsPerBlock, kDecodeBlocksPerSM)
    DecodeKernel(const __grid_constant__ DecodePlan plan, int32_t* __restrict__ status) {
  if (!BlockHasKind<kBits, kType>(plan, blockIdx.x)) return;
  extern __shared__ uint4 shared_words[];
  KernelShared& s = *reinterpret_cast<KernelShared*>(shared_words);
  IntervalWork w;
  bool pending = ClaimInterval<kBits, kType>(plan, blockIdx.x, threadIdx.x, &w, status);
  if (!__syncthreads_or(pending)) return;
  StageZigzagPart(threadIdx.x, &s);
  for (;;) {
    if (threadIdx.x == 0) s.next_table = kNoTable;
    __syncthreads();
    if (pending) RecordFirstError(&s.next_table, TableOf(w));
    __syncthreads();
    const int32_t table = s.next_table;
    if (table == kNoTable) return;
    StageTablesPart(plan, table, threadIdx.x, &s.tables);
    __syncthreads();
    const bool decode_now = pending && TableOf(w) == table;
    const uint32_t members = __ballot_sync(kFullWarp, decode_now);
    if (decode_now) {
      DecodeWarpInLockStep<kBits, kType>(plan, w, s, members, status);
      pending = false;
    }
  }
}

__global__ void __launch_bounds__(kDecodeThreadsPerBlock)
    CheckDecodedKernel(const __grid_constant__ DecodePlan plan, int32_t* __restrict__ status) {
  const int64_t i = int64_t(blockIdx.x) * kDecodeThreadsPerBlock + threadIdx.x;
  if (i < plan.num_intervals) CheckIntervalDecoded(plan, i, status);
}

// Adds each tile's coverage sums to its output's (plan_coverage.h).
__global__ void CoverageKernel(const __grid_constant__ DecodePlan plan, uint64_t* sums) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < plan.num_tiles) AddTileCoverage(plan, t, sums);
}

// A block per output: one its tiles do not write exactly once becomes NaN.
__global__ void CheckCoverageKernel(const __grid_constant__ DecodePlan plan,
                                    const uint64_t* __restrict__ sums,
                                    int32_t* __restrict__ status) {
  CheckOutputCoverage(plan, blockIdx.x, sums, status, threadIdx.x, blockDim.x);
}

// Lets `kernel` take KernelShared as dynamic shared memory on the current
// device, once per device (`devices_done`: a bit per ordinal): the setting
// lasts as long as the device's context, and the call is host work that
// every decode paid. A failure is left for the launch's error check.
template <typename Kernel>
void AllowKernelShared(Kernel kernel, std::atomic<uint64_t>& devices_done) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (devices_done.load(std::memory_order_relaxed) & bit) != 0) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           sizeof(KernelShared)) == cudaSuccess) {
    devices_done.fetch_or(bit, std::memory_order_relaxed);
  }
}

// Launches the (kBits, kType) kernel over every interval.
struct LaunchDecodeKernel {
  cudaStream_t stream;
  const DecodePlan& plan;
  int32_t* status;
  const bool* wanted_types;  // by OutputType

  template <int kBits, OutputType kType>
  void operator()() const {
    if (!wanted_types[static_cast<int>(kType)]) return;
    const auto kernel = DecodeKernel<kBits, kType>;
    static std::atomic<uint64_t> devices_done{0};  // one per kernel
    AllowKernelShared(kernel, devices_done);
    kernel<<<KernelBlockCount(plan.num_intervals), kDecodeThreadsPerBlock, sizeof(KernelShared),
             stream>>>(plan, status);
  }
};

ffi::Error LaunchError(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(e));
}

// Writes the output descriptors into the workspace, a chunk per launch, from
// kernel parameters (no host buffer has to outlive the call).
// Also notes which output types occur (the kernels worth launching).
ffi::Error WriteDescriptors(cudaStream_t stream, ffi::RemainingRets& rets, PlanOutput* workspace,
                            bool wanted_types[3]) {
  DescriptorChunk chunk;
  for (size_t first = 0; first < rets.size(); first += kDescriptorsPerLaunch) {
    chunk.first = static_cast<int64_t>(first);
    chunk.count = static_cast<int>(std::min<size_t>(kDescriptorsPerLaunch, rets.size() - first));
    for (int k = 0; k < chunk.count; ++k) {
      ffi::Error err = DescribeOutput(rets, first + k, &chunk.items[k]);
      if (err.failure()) return err;
      wanted_types[static_cast<int>(chunk.items[k].type)] = true;
    }
    WriteDescriptorsKernel<<<1, kDescriptorsPerLaunch, 0, stream>>>(chunk, workspace);
  }
  return LaunchError("writing output descriptors");
}

// kWholeOutputs: as the CPU handler's (ffi_cpu.cc).
template <bool kWholeOutputs>
ffi::Error DecodeCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::U8> payload,
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
  if (plan.num_tables > INT32_MAX) return ffi::Error::InvalidArgument("too many tables");
  const int64_t needed = DecodeWorkspaceBytes(outputs.size(), plan.payload_size,
                                              plan.num_intervals, plan.num_tables);
  if (static_cast<int64_t>(workspace->element_count()) < needed) {
    return ffi::Error::InvalidArgument("the CUDA decode's workspace must hold " +
                                       std::to_string(needed) +
                                       " bytes (see DecodeWorkspaceBytes)");
  }
  const DecodeWorkspace parts = LayOutDecodeWorkspace(workspace->typed_data(), outputs.size(),
                                                      plan.num_intervals, plan.num_tables);
  PlanOutput* descriptors = parts.outputs;
  plan.destuffed = parts.destuffed;
  plan.built_tables = parts.built_tables;
  InitStatusKernel<<<1, 1, 0, stream>>>(status->typed_data(), plan.destuffed.starts_status);
  // Without outputs one kernel still runs: it reports the unusable intervals.
  bool wanted_types[3] = {outputs.size() == 0, false, false};
  err = WriteDescriptors(stream, outputs, descriptors, wanted_types);
  if (err.failure()) return err;
  plan.outputs = descriptors;
  plan.num_outputs = static_cast<int64_t>(outputs.size());
  constexpr int kCoverageThreads = 256;
  if (kWholeOutputs && plan.num_outputs > 0) {
    cudaMemsetAsync(parts.coverage, 0, plan.num_outputs * kCoverageWords * sizeof(uint64_t),
                    stream);
    if (plan.num_tiles > 0) {
      CoverageKernel<<<(plan.num_tiles + kCoverageThreads - 1) / kCoverageThreads,
                       kCoverageThreads, 0, stream>>>(plan, parts.coverage);
    }
  }
  if (plan.num_intervals > 0) {
    const int64_t warps_per_block = kDestuffThreadsPerBlock / kDestuffLanes;
    DestuffKernel<<<(plan.num_intervals + warps_per_block - 1) / warps_per_block,
                    kDestuffThreadsPerBlock, 0, stream>>>(plan, status->typed_data());
    if (plan.num_tables > 0) {
      BuildTablesKernel<<<static_cast<unsigned>(plan.num_tables), kBuildTablesThreads, 0,
                          stream>>>(plan.tables, parts.built_tables);
    }
    ForEachDecodeKernel(LaunchDecodeKernel{stream, plan, status->typed_data(), wanted_types});
    CheckDecodedKernel<<<KernelBlockCount(plan.num_intervals), kDecodeThreadsPerBlock, 0,
                         stream>>>(plan, status->typed_data());
  }
  if (kWholeOutputs && plan.num_outputs > 0) {
    CheckCoverageKernel<<<static_cast<unsigned>(plan.num_outputs), kCoverageThreads, 0, stream>>>(
        plan, parts.coverage, status->typed_data());
  }
  return LaunchError("launching the decode kernel");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxjpegDecodeCuda, DecodeCudaImpl<true>,
    BindDecodeOperands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxjpegDecodePartsCuda, DecodeCudaImpl<false>,
    BindDecodeOperands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxjpeg

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "jaxjpeg CUDA decoder: XLA FFI handler capsules for the CUDA platform";
  m.def("ffi_targets", [] {
    pybind11::dict targets;
    targets["jaxjpeg_decode"] =
        pybind11::capsule(reinterpret_cast<void*>(&jaxjpeg::JaxjpegDecodeCuda));
    targets["jaxjpeg_decode_parts"] =
        pybind11::capsule(reinterpret_cast<void*>(&jaxjpeg::JaxjpegDecodePartsCuda));
    return targets;
  });
}
