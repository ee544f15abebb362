// pybind11 module jaxjpeg._native: the codec core for numpy callers. Every
// function validates its arguments and turns codec failures into JpegError;
// heavy work runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adler32.h"
#include "cpu_executor.h"
#include "crc32c.h"
#include "decode_kernel.h"
#include "deflate_runs.h"
#include "inflate.h"
#include "destuff.h"
#include "encoder.h"
#include "error_feedback.h"
#include "ffi_decode.h"
#include "ffi_cpu.h"
#include "forward_dct.h"
#include "kernel_harness.h"
#include "matrix_stats.h"
#include "parallel_for.h"
#include "quant_tables.h"
#include "rate_probe.h"
#include "repeats.h"
#include "rice_code.h"
#include "stream_header.h"

namespace py = pybind11;

namespace jaxjpeg {
namespace {

struct JpegError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void Fail(Status s, const std::string& where) {
  throw JpegError(where + ": " + StatusMessage(s));
}

void Check(Status s, const std::string& where) {
  if (s != Status::kOk) Fail(s, where);
}

// Callers read size * itemsize bytes from ptr: every axis must be laid out
// C-contiguously (found by review: a reversed or broadcast view passed the
// old last-axis check, and crc32c read 1 GiB past a 16-byte buffer).
// `info`, refused unless C-contiguous.
py::buffer_info Contiguous(py::buffer_info info) {
  int64_t expected = info.itemsize;
  for (int64_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expected) {
      throw py::value_error("buffer must be C-contiguous");
    }
    expected *= info.shape[d];
  }
  return info;
}

py::buffer_info ContiguousBytes(const py::buffer& data) { return Contiguous(data.request()); }

// Whether [a, a + a_bytes) and [b, b + b_bytes) share a byte.
bool Overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  const auto lo = reinterpret_cast<uintptr_t>(a), other = reinterpret_cast<uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && lo < other + static_cast<uintptr_t>(b_bytes) &&
         other < lo + static_cast<uintptr_t>(a_bytes);
}

struct ParsedStream {
  StreamInfo info;
  std::vector<int64_t> starts;
  std::unique_ptr<DecoderTables> tables;
};

ParsedStream Parse(const uint8_t* data, int64_t size) {
  ParsedStream p;
  Check(ParseStreamHeader(data, size, &p.info), "JPEG header");
  p.starts.resize(p.info.NumIntervals() + 1);
  Check(IndexRestartIntervals(data, size, p.info, p.starts.data()), "JPEG scan");
  p.tables = std::make_unique<DecoderTables>();
  Check(BuildDecoderTables(p.info.packed, p.tables.get()), "JPEG tables");
  return p;
}

py::dict StreamInfoDict(const StreamInfo& info) {
  py::dict d;
  d["width"] = info.width;
  d["height"] = info.height;
  d["bits"] = info.bits;
  d["restart_interval"] = info.restart_interval;
  d["blocks_wide"] = info.blocks_wide;
  d["blocks_high"] = info.blocks_high;
  d["num_intervals"] = info.NumIntervals();
  d["scan_begin"] = info.scan_begin;
  return d;
}

py::array_t<uint8_t> PackedTablesArray(const PackedTables& packed) {
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(sizeof(PackedTables)));
  std::memcpy(out.mutable_data(), &packed, sizeof(PackedTables));
  return out;
}

// The DecoderTables the executors build from one PackedTables: on one
// thread (the host's workers) or through the table kernel's phases (its CPU
// harness); (bytes, status code of the build). Tests compare the two.
py::tuple BuildTables(const py::buffer& packed, bool kernel_phases) {
  const py::buffer_info b = ContiguousBytes(packed);
  if (b.size * b.itemsize != static_cast<py::ssize_t>(sizeof(PackedTables))) {
    throw py::value_error("packed tables must be " + std::to_string(sizeof(PackedTables)) +
                          " bytes");
  }
  PackedTables p;
  std::memcpy(&p, b.ptr, sizeof p);
  auto built = std::make_unique<DecoderTables>();
  std::memset(built.get(), 0xA5, sizeof(DecoderTables));  // both ways from the same bytes
  Status s;
  if (kernel_phases) {
    DecodePlan plan{};
    plan.tables = &p;
    plan.num_tables = 1;
    s = RunBuildTablesBlock(plan, 0, built.get());
  } else {
    s = BuildDecoderTables(p, built.get());
  }
  py::bytes out(reinterpret_cast<const char*>(built.get()), sizeof(DecoderTables));
  return py::make_tuple(out, static_cast<int>(s));
}

py::dict Inspect(const py::buffer& data) {
  const py::buffer_info b = ContiguousBytes(data);
  const auto* bytes = static_cast<const uint8_t*>(b.ptr);
  const int64_t size = b.size * b.itemsize;
  ParsedStream p;
  {
    py::gil_scoped_release release;
    p = Parse(bytes, size);
  }
  py::dict d = StreamInfoDict(p.info);
  py::array_t<int64_t> starts(static_cast<py::ssize_t>(p.starts.size()));
  std::memcpy(starts.mutable_data(), p.starts.data(), p.starts.size() * sizeof(int64_t));
  d["interval_starts"] = starts;
  d["tables"] = PackedTablesArray(p.info.packed);
  py::array_t<int32_t> quant(64);
  std::copy(p.info.packed.quant, p.info.packed.quant + 64, quant.mutable_data());
  d["quant_table"] = quant;
  return d;
}

// The PackedTables a tile's header defines, and the header's geometry
// (width, height, bits, restart interval) for checking against what the
// caller believes about the tile. Only the header is parsed.
py::tuple TileHeader(const py::buffer& data) {
  const py::buffer_info b = ContiguousBytes(data);
  StreamInfo info;
  {
    py::gil_scoped_release release;
    Check(ParseStreamHeader(static_cast<const uint8_t*>(b.ptr), b.size * b.itemsize, &info),
          "JPEG header");
  }
  return py::make_tuple(PackedTablesArray(info.packed), info.width, info.height, info.bits,
                        info.restart_interval);
}

bool CheckIntervalStarts(const py::buffer& data, const py::array& given) {
  const py::buffer_info b = ContiguousBytes(data);
  const auto* bytes = static_cast<const uint8_t*>(b.ptr);
  const int64_t size = b.size * b.itemsize;
  // byte offsets: a float start would be truncated to another offset
  const char kind = given.dtype().kind();
  if (kind != 'i' && kind != 'u') throw py::type_error("starts must be an integer array");
  using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  const auto starts = Int64Array::ensure(given);
  if (!starts) throw py::value_error("starts do not fit int64");
  if (starts.ndim() != 1) throw py::value_error("starts must be 1-D");
  StreamInfo info;
  Check(ParseStreamHeader(bytes, size, &info), "JPEG header");
  return CheckRestartIndex(bytes, size, info, starts.data(), starts.size()) == Status::kOk;
}

template <int kBits>
Status DecodeSamplesImpl(const uint8_t* data, const ParsedStream& p, uint16_t* out,
                         int threads, bool destuffed) {
  const SampleSink sink{out, p.info.width};
  const int64_t per = p.info.restart_interval ? p.info.restart_interval : p.info.NumBlocks();
  std::atomic<int32_t> first_error{kPlanOk};
  ParallelFor(p.info.NumIntervals(), threads, [&](int64_t i) {
    const int64_t first = i * per;
    const int64_t n = std::min(per, p.info.NumBlocks() - first);
    const uint8_t* begin = data + p.starts[i];
    const uint8_t* end = data + p.starts[i + 1];
    Status s;
    if (destuffed) {  // the destuff pass, then its reader (tests)
      thread_local std::vector<uint8_t> bytes;
      bytes.resize(std::max<size_t>(bytes.size(), DestuffCapacity(end - begin)));
      const int64_t length = DestuffOnHost(begin, end, bytes.data());
      s = DecodeDestuffedInterval<kBits>(bytes.data(), length, *p.tables, p.info.Grid(), first,
                                         n, sink);
    } else {
      s = DecodeInterval<kBits>(begin, end, *p.tables, p.info.Grid(), first, n, sink);
    }
    if (s != Status::kOk) RecordFirstError(first_error, PackPlanStatus(i, s));
  });
  const int32_t e = first_error.load();
  return e == kPlanOk ? Status::kOk : static_cast<Status>(e & 15);
}

// Decoded samples as libjpeg returns them: uint8 for 8-bit, uint16 for 12-bit.
py::array DecodeSamples(const py::buffer& data, int threads, bool destuffed) {
  const py::buffer_info b = ContiguousBytes(data);
  const auto* bytes = static_cast<const uint8_t*>(b.ptr);
  const int64_t size = b.size * b.itemsize;
  std::vector<uint16_t> samples;
  ParsedStream p;
  Status s;
  {
    py::gil_scoped_release release;
    p = Parse(bytes, size);
    samples.resize(static_cast<size_t>(p.info.width) * p.info.height);
    s = p.info.bits == 12 ? DecodeSamplesImpl<12>(bytes, p, samples.data(), threads, destuffed)
                          : DecodeSamplesImpl<8>(bytes, p, samples.data(), threads, destuffed);
  }
  Check(s, "JPEG data");
  if (p.info.bits == 12) {
    py::array_t<uint16_t> out({p.info.height, p.info.width});
    std::memcpy(out.mutable_data(), samples.data(), samples.size() * 2);
    return out;
  }
  py::array_t<uint8_t> out({p.info.height, p.info.width});
  uint8_t* dst = out.mutable_data();
  for (size_t i = 0; i < samples.size(); ++i) dst[i] = static_cast<uint8_t>(samples[i]);
  return out;
}

template <typename T>
const T* ArrayData(const py::array& a, int64_t expected, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " has the wrong dtype or is not C-contiguous");
  }
  if (expected >= 0 && a.size() != expected) {
    throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) +
                          " elements, expected " + std::to_string(expected));
  }
  return static_cast<const T*>(a.data());
}

// The decoder reads the operands while it writes the outputs (a placed
// tile's offsets are read again for every block): an output sharing memory
// with an operand or another output let a decode write anywhere (found by
// review: an output viewing the positions array).
void CheckOutputsApart(const std::vector<PlanOutput>& outputs,
                       const std::vector<std::pair<const void*, int64_t>>& inputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const int64_t bytes = outputs[i].bytes();
    bool shared = false;
    for (const auto& [data, size] : inputs) shared |= Overlaps(outputs[i].data, bytes, data, size);
    for (size_t j = 0; j < i; ++j) {
      shared |= Overlaps(outputs[i].data, bytes, outputs[j].data, outputs[j].bytes());
    }
    if (shared) {
      throw py::value_error("output " + std::to_string(i) +
                            " shares memory with an operand or another output");
    }
  }
}

// A decode plan over numpy arrays; owns the output descriptors and holds the
// exports of the buffers it points into (found by review: released when
// PlanFromArrays returned, an mmap payload closed mid-decode was read after
// it was unmapped).
struct HostPlan {
  DecodePlan plan{};
  std::vector<PlanOutput> outputs;
  py::buffer_info payload_view, tables_view;
};

HostPlan PlanFromArrays(const py::buffer& payload, const py::array& interval_starts,
                        const py::array& tiles, const py::buffer& tables,
                        const py::array& row_scale, const py::array& row_offset,
                        const std::vector<py::array>& outputs, const std::vector<int>& output_types,
                        const std::optional<py::array>& col_scale,
                        const std::optional<py::array>& positions) {
  if (outputs.size() != output_types.size()) throw py::value_error("one type per output");
  py::buffer_info pay = ContiguousBytes(payload);
  py::buffer_info tab = ContiguousBytes(tables);
  const int64_t table_bytes = tab.size * tab.itemsize;
  if (table_bytes % sizeof(PackedTables) != 0) throw py::value_error("tables size mismatch");
  if (interval_starts.ndim() != 1 || interval_starts.size() < 1) {
    throw py::value_error("interval_starts must be a 1-D int64 array of n + 1 offsets");
  }
  if (tiles.ndim() != 2 || tiles.shape(1) != kTileColumns) {
    throw py::value_error("tiles must be [n, " + std::to_string(kTileColumns) + "] int64");
  }
  HostPlan h;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const py::array& o = outputs[i];
    const int t = output_types[i];
    const int itemsize = t == static_cast<int>(OutputType::kFloat32) ? 4 : 2;
    if (t < 0 || t > 2 || o.itemsize() != itemsize || !(o.flags() & py::array::c_style) ||
        !o.writeable()) {
      throw py::value_error("output " + std::to_string(i) +
                            " is not a writable C-contiguous array of its type");
    }
    h.outputs.push_back(PlanOutput{const_cast<void*>(o.data()), o.size(), static_cast<OutputType>(t)});
  }
  DecodePlan& plan = h.plan;
  plan.payload = static_cast<const uint8_t*>(pay.ptr);
  plan.payload_size = pay.size * pay.itemsize;
  plan.interval_starts = ArrayData<int64_t>(interval_starts, -1, "interval_starts");
  plan.num_intervals = interval_starts.size() - 1;
  plan.tiles = ArrayData<int64_t>(tiles, -1, "tiles");
  plan.num_tiles = tiles.shape(0);
  plan.tables = static_cast<const PackedTables*>(tab.ptr);
  plan.num_tables = table_bytes / static_cast<int64_t>(sizeof(PackedTables));
  plan.row_scale = ArrayData<float>(row_scale, -1, "row_scale");
  plan.row_offset = ArrayData<float>(row_offset, row_scale.size(), "row_offset");
  plan.num_affine_rows = row_scale.size();
  if (col_scale) {
    plan.col_scale = ArrayData<float>(*col_scale, -1, "col_scale");
    plan.num_col_scales = col_scale->size();
  }
  if (positions) {
    plan.positions = ArrayData<int64_t>(*positions, -1, "positions");
    plan.num_positions = positions->size();
  }
  plan.outputs = h.outputs.data();
  plan.num_outputs = static_cast<int64_t>(h.outputs.size());
  std::vector<std::pair<const void*, int64_t>> inputs = {
      {pay.ptr, pay.size * pay.itemsize}, {tab.ptr, table_bytes}};
  for (const py::array* a : {&interval_starts, &tiles, &row_scale, &row_offset,
                             col_scale ? &*col_scale : nullptr, positions ? &*positions : nullptr}) {
    if (a != nullptr) inputs.emplace_back(a->data(), a->nbytes());
  }
  CheckOutputsApart(h.outputs, inputs);
  if (const char* error = PlanShapeError(h.plan)) {
    throw JpegError(std::string("decode plan refused: ") + error);
  }
  h.payload_view = std::move(pay);
  h.tables_view = std::move(tab);
  return h;
}

// The failure text is PlanFailure's, the one the FFI handlers report.
void RaiseOnFailure(int32_t status) {
  if (status != kPlanOk) throw JpegError(PlanFailure(status));
}

// Executes a decode plan into preallocated numpy outputs (see decode_plan.h).
void RunPlan(const py::buffer& payload, const py::array& interval_starts, const py::array& tiles,
             const py::buffer& tables, const py::array& row_scale, const py::array& row_offset,
             const std::vector<py::array>& outputs, const std::vector<int>& output_types,
             int threads, const std::optional<py::array>& col_scale,
             const std::optional<py::array>& positions, bool whole_outputs) {
  const HostPlan h = PlanFromArrays(payload, interval_starts, tiles, tables, row_scale,
                                    row_offset, outputs, output_types, col_scale, positions);
  int32_t status;
  {
    py::gil_scoped_release release;
    status = RunDecodePlanOnHost(h.plan, threads, whole_outputs);
  }
  RaiseOnFailure(status);
}

void RunPlanKernelHarness(const py::buffer& payload, const py::array& interval_starts,
                          const py::array& tiles, const py::buffer& tables,
                          const py::array& row_scale, const py::array& row_offset,
                          const std::vector<py::array>& outputs,
                          const std::vector<int>& output_types,
                          const std::optional<py::array>& col_scale,
                          const std::optional<py::array>& block_map,
                          std::optional<py::array> step_counts,
                          const std::optional<py::array>& positions, bool whole_outputs) {
  HostPlan h = PlanFromArrays(payload, interval_starts, tiles, tables, row_scale, row_offset,
                              outputs, output_types, col_scale, positions);
  if (block_map) {
    h.plan.block_map = ArrayData<int32_t>(*block_map, -1, "block_map");
    h.plan.num_map_blocks = block_map->size() / kBlockMapColumns;
  }
  int64_t* counts_out = nullptr;
  if (step_counts) {
    // Written in place: no conversion, which would write into a copy.
    if (!step_counts->dtype().is(py::dtype::of<int64_t>()) || step_counts->ndim() != 1 ||
        step_counts->size() != 2 || !step_counts->writeable() ||
        step_counts->strides(0) != sizeof(int64_t)) {
      throw py::value_error("step_counts must be a writeable contiguous int64 array of 2");
    }
    counts_out = static_cast<int64_t*>(step_counts->mutable_data());
  }
  int32_t status;
  HarnessCounts counts;
  {
    py::gil_scoped_release release;
    status = RunKernelHarness(h.plan, &counts, whole_outputs);
  }
  if (counts_out != nullptr) {
    counts_out[0] = counts.staged_steps;
    counts_out[1] = counts.simple_steps;
  }
  RaiseOnFailure(status);
}

// The block map of a plan's CUDA decode blocks (decode_plan.h,
// BuildBlockMap): int32 [blocks, kBlockMapColumns]; ValueError for a plan
// it cannot map.
py::array_t<int32_t> BlockMap(const py::array& interval_starts, const py::array& tiles,
                              const std::vector<int32_t>& output_types) {
  if (interval_starts.ndim() != 1 || interval_starts.size() < 1) {
    throw py::value_error("interval_starts must be a 1-D int64 array of n + 1 offsets");
  }
  if (tiles.ndim() != 2 || tiles.shape(1) != kTileColumns) {
    throw py::value_error("tiles must be [n, " + std::to_string(kTileColumns) + "] int64");
  }
  ArrayData<int64_t>(interval_starts, -1, "interval_starts");
  std::vector<int32_t> map;
  const std::string error =
      BuildBlockMap(interval_starts.size() - 1, ArrayData<int64_t>(tiles, -1, "tiles"),
                    tiles.shape(0), output_types.data(),
                    static_cast<int64_t>(output_types.size()), &map);
  if (!error.empty()) throw py::value_error("decode plan refused: " + error);
  py::array_t<int32_t> out({static_cast<py::ssize_t>(map.size() / kBlockMapColumns),
                            static_cast<py::ssize_t>(kBlockMapColumns)});
  if (!map.empty()) std::memcpy(out.mutable_data(), map.data(), map.size() * sizeof(int32_t));
  return out;
}

// The destuff pass's CPU harness over one interval's bytes: (the destuffed
// bytes, zero-filled to the pass's capacity; their count).
py::tuple Destuff(const py::buffer& data) {
  const py::buffer_info b = ContiguousBytes(data);
  const auto* begin = static_cast<const uint8_t*>(b.ptr);
  const int64_t size = b.size * b.itemsize;
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(DestuffCapacity(size)));
  const int64_t n = DestuffOnHost(begin, begin + size, out.mutable_data());
  return py::make_tuple(out, n);
}

// What a bit reader shows over one interval's bytes while bits are consumed
// `skips[j]` (1..16) at a time: before each skip, after a Refill, the next
// 16 bits, ReadPastEnd and HasUnusedBytes ([len(skips) + 1, 3] int64).
template <typename Reader>
void TraceReader(Reader r, const int32_t* skips, int64_t n, int64_t* row) {
  for (int64_t j = 0; j <= n; ++j, row += 3) {
    Refill(r);
    row[0] = PeekBits(r, 16);
    row[1] = ReadPastEnd(r);
    row[2] = HasUnusedBytes(r);
    if (j < n) SkipBits(r, skips[j]);
  }
}

// The trace of BitReader over the raw bytes, or with `destuffed` of
// DestuffedBitReader over the destuff pass's output.
py::array_t<int64_t> BitReaderTrace(
    const py::buffer& data,
    const py::array_t<double, py::array::c_style | py::array::forcecast>& skips_given,
    bool destuffed) {
  const py::buffer_info b = ContiguousBytes(data);
  const auto* begin = static_cast<const uint8_t*>(b.ptr);
  const int64_t size = b.size * b.itemsize;
  const int64_t n = skips_given.size();
  // checked before narrowing (found by review: 2^32 + 1 and 1.5 passed as 1)
  std::vector<int32_t> skip_bits(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    const double v = skips_given.data()[j];
    if (!(v >= 1 && v <= 16) || v != std::floor(v)) throw py::value_error("skips must be 1..16");
    skip_bits[static_cast<size_t>(j)] = static_cast<int32_t>(v);
  }
  const int32_t* skips = skip_bits.data();
  py::array_t<int64_t> trace({static_cast<py::ssize_t>(n + 1), py::ssize_t(3)});
  if (destuffed) {
    std::vector<uint8_t> bytes(DestuffCapacity(size));
    const int64_t length = DestuffOnHost(begin, begin + size, bytes.data());
    TraceReader(MakeDestuffedBitReader(bytes.data(), length), skips, n, trace.mutable_data());
  } else {
    TraceReader(MakeBitReader(begin, begin + size), skips, n, trace.mutable_data());
  }
  return trace;
}

// Quantization steps as Python gives them (any numeric array), checked to be
// whole numbers in 1..65535 before they are narrowed to a table's uint16:
// a forcecast had turned 65537 into 1 and 2.9 into 2 silently.
using StepArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
// no forcecast: a band flag of 300 or -1 had wrapped to 44 or 255 silently
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

std::vector<uint16_t> CheckedSteps(const StepArray& steps, const char* what) {
  std::vector<uint16_t> out(static_cast<size_t>(steps.size()));
  for (py::ssize_t i = 0; i < steps.size(); ++i) {
    const double v = steps.data()[i];
    if (!(v >= 1.0 && v <= 65535.0) || v != std::floor(v)) {
      throw py::value_error(std::string(what) + " entries must be whole numbers in 1..65535, got " +
                            std::string(py::str(py::float_(v))));
    }
    out[static_cast<size_t>(i)] = static_cast<uint16_t>(v);
  }
  return out;
}

// The sample precision and restart interval named where they are refused
// (found by review: the encoder's status said only "invalid argument").
void CheckCoding(int bits, int restart_interval) {
  if (bits != 8 && bits != 12) {
    throw py::value_error("bits must be 8 or 12, got " + std::to_string(bits));
  }
  if (restart_interval < 0 || restart_interval > 65535) {
    throw py::value_error("restart_interval must be in [0, 65535], got " +
                          std::to_string(restart_interval));
  }
}

EncodeOptions MakeEncodeOptions(const StepArray& qtable,
                                int bits, int restart_interval, bool optimize, bool rdo,
                                bool avx2) {
  CheckCoding(bits, restart_interval);
  if (qtable.size() != 64) throw py::value_error("qtable must have 64 entries");
  const std::vector<uint16_t> table = CheckedSteps(qtable, "qtable");
  EncodeOptions options;
  options.bits = bits;
  std::memcpy(options.qtable, table.data(), sizeof(options.qtable));
  options.restart_interval = restart_interval;
  options.optimize_huffman = optimize;
  options.rdo = rdo;
  options.allow_avx2 = avx2;
  return options;
}

// The encoder's output as Python values: bytes, or (bytes, interval starts).
py::object EncodedResult(const std::vector<uint8_t>& out, const std::vector<int64_t>& starts,
                         bool with_intervals) {
  py::bytes data(reinterpret_cast<const char*>(out.data()), out.size());
  if (!with_intervals) return std::move(data);
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(starts.size()));
  std::memcpy(offsets.mutable_data(), starts.data(), starts.size() * sizeof(int64_t));
  return py::make_tuple(data, offsets);
}

py::object Encode(const py::array_t<float, py::array::c_style | py::array::forcecast>& samples,
                  const StepArray& qtable,
                  int bits, int restart_interval, bool optimize, bool rdo, bool with_intervals,
                  bool avx2) {
  if (samples.ndim() != 2) throw py::value_error("samples must be 2-D");
  const EncodeOptions options = MakeEncodeOptions(qtable, bits, restart_interval, optimize, rdo, avx2);
  const py::ssize_t h = samples.shape(0), w = samples.shape(1);
  if (h < 1 || w < 1 || h > kMaxDimension || w > kMaxDimension) Fail(Status::kBadSize, "encode");
  std::vector<uint8_t> out;
  std::vector<int64_t> starts;
  Status s;
  {
    py::gil_scoped_release release;
    s = EncodeGrayscale(samples.data(), static_cast<int>(w), static_cast<int>(h), w, options, &out,
                        &starts);
  }
  Check(s, "encode");
  return EncodedResult(out, starts, with_intervals);
}

// The row stride (in elements) of a 2-D float32 array whose rows are
// contiguous (a slice of a larger C-order matrix qualifies).
py::ssize_t RowStride(const py::array& a, const char* what) {
  if (a.ndim() != 2 || !a.dtype().equal(py::dtype::of<float>())) {
    throw py::value_error(std::string(what) + " must be a 2-D float32 array");
  }
  const py::ssize_t h = a.shape(0), w = a.shape(1);
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(float));
  if (w > 1 && a.strides(1) != item) {
    throw py::value_error(std::string(what) + " rows must be contiguous");
  }
  if (h <= 1) return w;
  if (a.strides(0) % item != 0 || a.strides(0) / item < w) {
    throw py::value_error(std::string(what) + " rows must not overlap or run backwards");
  }
  return a.strides(0) / item;
}

// The layout of a 2-D float32 tile the encoder reads: (stride, transposed).
// Rows contiguous (RowStride), or else columns contiguous, value (y, x) at
// x * stride + y: a transposed view of a C-order matrix, coded without a copy.
std::pair<py::ssize_t, bool> TileLayout(const py::array& a, const char* what) {
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(float));
  if (a.ndim() == 2 && a.dtype().equal(py::dtype::of<float>()) && a.shape(1) > 1 &&
      a.strides(1) != item && (a.shape(0) <= 1 || a.strides(0) == item) &&
      a.strides(1) % item == 0 && a.strides(1) / item >= a.shape(0)) {
    return {a.strides(1) / item, true};
  }
  return {RowStride(a, what), false};
}

py::object EncodeMapped(const py::array& weights,
                        const py::array_t<float, py::array::c_style | py::array::forcecast>& row_scale,
                        const py::array_t<float, py::array::c_style | py::array::forcecast>& row_offset,
                        const StepArray& qtable,
                        int bits, int restart_interval, bool optimize, bool rdo,
                        bool with_intervals, bool avx2) {
  const auto [stride, transposed] = TileLayout(weights, "weights");
  const EncodeOptions options = MakeEncodeOptions(qtable, bits, restart_interval, optimize, rdo, avx2);
  const py::ssize_t h = weights.shape(0), w = weights.shape(1);
  if (h < 1 || w < 1 || h > kMaxDimension || w > kMaxDimension) {
    Fail(Status::kBadSize, "encode_mapped");
  }
  if (row_scale.ndim() != 1 || row_offset.ndim() != 1 || row_scale.shape(0) != h ||
      row_offset.shape(0) != h) {
    throw py::value_error("row_scale and row_offset must hold one value per row");
  }
  std::vector<uint8_t> out;
  std::vector<int64_t> starts;
  Status s;
  {
    py::gil_scoped_release release;
    s = EncodeMappedGrayscale(static_cast<const float*>(weights.data()), static_cast<int>(w),
                              static_cast<int>(h), stride, row_scale.data(), row_offset.data(),
                              options, &out, &starts, transposed);
  }
  Check(s, "encode_mapped");
  return EncodedResult(out, starts, with_intervals);
}

// MeasureSteps over numpy arrays: (entropy bytes, header bytes, squared
// error) per step, three arrays.
py::tuple MeasureStepsOf(const py::array& weights,
                         const py::array_t<float, py::array::c_style | py::array::forcecast>& row_scale,
                         const py::array_t<float, py::array::c_style | py::array::forcecast>& row_offset,
                         const StepArray& steps,
                         int bits, int restart_interval, const std::optional<py::array>& col_weight,
                         bool rdo) {
  const py::ssize_t stride = RowStride(weights, "weights");
  const py::ssize_t h = weights.shape(0), w = weights.shape(1);
  if (h < 1 || w < 1 || h > kMaxDimension || w > kMaxDimension) {
    Fail(Status::kBadSize, "measure_steps");
  }
  if (row_scale.ndim() != 1 || row_offset.ndim() != 1 || row_scale.shape(0) != h ||
      row_offset.shape(0) != h) {
    throw py::value_error("row_scale and row_offset must hold one value per row");
  }
  if (steps.ndim() != 1) throw py::value_error("steps must be 1-D");
  CheckCoding(bits, restart_interval);
  const float* col = nullptr;
  if (col_weight.has_value()) {
    if (RowStride(*col_weight, "col_weight") != stride || col_weight->shape(0) != h ||
        col_weight->shape(1) != w) {
      throw py::value_error("col_weight must have the weights' shape and row stride");
    }
    col = static_cast<const float*>(col_weight->data());
  }
  const std::vector<uint16_t> step_values = CheckedSteps(steps, "steps");
  const py::ssize_t n = steps.shape(0);
  std::vector<StepCost> costs(static_cast<size_t>(n));
  Status s;
  {
    py::gil_scoped_release release;
    s = MeasureSteps(static_cast<const float*>(weights.data()), static_cast<int>(w),
                     static_cast<int>(h), stride, row_scale.data(), row_offset.data(), col, bits,
                     restart_interval, rdo, step_values.data(), static_cast<int>(n), costs.data());
  }
  Check(s, "measure_steps");
  py::array_t<int64_t> entropy(n), header(n);
  py::array_t<double> error(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    entropy.mutable_data()[i] = costs[i].entropy_bytes;
    header.mutable_data()[i] = costs[i].header_bytes;
    error.mutable_data()[i] = costs[i].squared_error;
  }
  return py::make_tuple(entropy, header, error);
}

// A 2-D array's element steps (strides in elements), for reading it in place.
template <typename T>
StridedTile<T> StridedOf(const py::array& a, const char* what) {
  if (a.ndim() != 2 || !a.dtype().equal(py::dtype::of<T>())) {
    throw py::value_error(std::string(what) + " must be a 2-D " +
                          std::string(py::str(py::dtype::of<T>())) + " array");
  }
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(T));
  if (a.strides(0) % item != 0 || a.strides(1) % item != 0) {
    throw py::value_error(std::string(what) + " strides must be whole elements");
  }
  return {static_cast<const T*>(a.data()), a.strides(0) / item, a.strides(1) / item};
}

// The positions a side list keeps (a bool array of the tile's shape, read in
// place), as the error sums take them; none when not given.
std::optional<StridedTile<uint8_t>> KeptOf(const std::optional<py::array>& kept, py::ssize_t height,
                                           py::ssize_t width) {
  if (!kept.has_value()) return std::nullopt;
  if (kept->ndim() != 2 || kept->shape(0) != height || kept->shape(1) != width ||
      kept->itemsize() != 1 || kept->dtype().kind() != 'b') {
    throw py::value_error("kept must be a bool array of the weights' shape");
  }
  return StridedTile<uint8_t>{static_cast<const uint8_t*>(kept->data()), kept->strides(0),
                              kept->strides(1)};
}

// EncodeTileWithError over numpy arrays: (bytes, interval starts, squared
// error or None, row sums or None); weights as encode_mapped takes them,
// original (None: no error summed), col_scale and kept as tile_squared_error
// does; row_sums: each row's RowSum values as a [height, kRowSums] array,
// of the bands of 8 x 8 blocks `bands` sets where given.
py::tuple EncodeTileMeasured(const py::array& weights, const FloatArray& row_scale,
                             const FloatArray& row_offset, const StepArray& qtable, int bits,
                             int restart_interval, const std::optional<py::array>& original,
                             const std::optional<FloatArray>& col_scale,
                             const std::optional<py::array>& kept, bool row_sums,
                             const char* what, const std::optional<ByteArray>& bands = {},
                             int written = 0) {
  const auto [stride, transposed] = TileLayout(weights, "weights");
  const EncodeOptions options = MakeEncodeOptions(qtable, bits, restart_interval, true, true, true);
  const py::ssize_t h = weights.shape(0), w = weights.shape(1);
  if (h < 1 || w < 1 || h > kMaxDimension || w > kMaxDimension) Fail(Status::kBadSize, what);
  if (row_scale.ndim() != 1 || row_offset.ndim() != 1 || row_scale.shape(0) != h ||
      row_offset.shape(0) != h) {
    throw py::value_error("row_scale and row_offset must hold one value per row");
  }
  StridedTile<float> o{nullptr, 0, 0};
  if (original.has_value()) {
    o = StridedOf<float>(*original, "original");
    if (original->shape(0) != h || original->shape(1) != w) {
      throw py::value_error("original must have the weights' shape");
    }
  }
  if (col_scale.has_value() && (col_scale->ndim() != 1 || col_scale->shape(0) != w)) {
    throw py::value_error("col_scale must hold one value per column");
  }
  const std::optional<StridedTile<uint8_t>> k = KeptOf(kept, h, w);
  py::array_t<double> sums;
  // the weights as the encoder reads them: row y at y * stride, or column y
  // of a transpose
  RowSums request{nullptr,
                  {static_cast<const float*>(weights.data()), transposed ? 1 : stride,
                   transposed ? stride : 1},
                  row_scale.data(), row_offset.data()};
  if (row_sums) {
    if (written < 0 || written > 2) throw py::value_error("output_type must be 0, 1 or 2");
    request.written = static_cast<OutputType>(written);
    sums = py::array_t<double>({h, static_cast<py::ssize_t>(kRowSums)});
    request.sums = sums.mutable_data();
    if (bands.has_value()) {
      if (bands->ndim() != 1 || bands->shape(0) != (h + 7) / 8) {
        throw py::value_error("bands must hold one value per row of 8 x 8 blocks");
      }
      request.bands = bands->data();
    }
  }
  std::vector<uint8_t> out;
  std::vector<int64_t> starts;
  double error = 0.0;
  Status s;
  {
    py::gil_scoped_release release;
    s = EncodeTileWithError(static_cast<const float*>(weights.data()), static_cast<int>(w),
                            static_cast<int>(h), stride, transposed, row_scale.data(),
                            row_offset.data(), options, o, k ? &*k : nullptr,
                            col_scale ? col_scale->data() : nullptr, &out, &starts,
                            original.has_value() ? &error : nullptr,
                            row_sums ? &request : nullptr);
  }
  Check(s, what);
  py::object coded = EncodedResult(out, starts, true);
  return py::make_tuple(coded[py::int_(0)], coded[py::int_(1)],
                        original.has_value() ? py::object(py::float_(error)) : py::none(),
                        row_sums ? py::object(sums) : py::none());
}

py::tuple EncodeMappedWithErrorOf(const py::array& weights, const FloatArray& row_scale,
                                  const FloatArray& row_offset, const StepArray& qtable,
                                  int bits, int restart_interval, const py::array& original,
                                  const std::optional<FloatArray>& col_scale,
                                  const std::optional<py::array>& kept) {
  const py::tuple r = EncodeTileMeasured(weights, row_scale, row_offset, qtable, bits,
                                         restart_interval, original, col_scale, kept, false,
                                         "encode_mapped_with_error");
  return py::make_tuple(r[0], r[1], r[2]);
}

py::tuple EncodeMappedWithRowSumsOf(
    const py::array& weights, const FloatArray& row_scale, const FloatArray& row_offset,
    const StepArray& qtable, int bits, int restart_interval,
    const std::optional<py::array>& original, const std::optional<FloatArray>& col_scale,
    const std::optional<py::array>& kept, const std::optional<ByteArray>& bands,
    int output_type) {
  return EncodeTileMeasured(weights, row_scale, row_offset, qtable, bits, restart_interval,
                            original, col_scale, kept, true, "encode_mapped_with_row_sums", bands,
                            output_type);
}

// TileSquaredError over numpy arrays (weights and kept read in place).
double TileSquaredErrorOf(const py::buffer& data, const py::array& weights,
                          const py::array_t<float, py::array::c_style | py::array::forcecast>& row_scale,
                          const py::array_t<float, py::array::c_style | py::array::forcecast>& row_offset,
                          const std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>>& col_scale,
                          const std::optional<py::array>& kept) {
  const py::buffer_info b = ContiguousBytes(data);
  const StridedTile<float> w = StridedOf<float>(weights, "weights");
  // Checked before narrowing (found by review: a (2^32 + 16, 24) view was
  // taken for the 16 x 24 tile).
  if (weights.shape(0) > kMaxDimension || weights.shape(1) > kMaxDimension) {
    throw py::value_error("weights are larger than a JPEG tile can be");
  }
  const int height = static_cast<int>(weights.shape(0)), width = static_cast<int>(weights.shape(1));
  if (row_scale.ndim() != 1 || row_offset.ndim() != 1 || row_scale.shape(0) != height ||
      row_offset.shape(0) != height) {
    throw py::value_error("row_scale and row_offset must hold one value per row");
  }
  if (col_scale.has_value() && (col_scale->ndim() != 1 || col_scale->shape(0) != width)) {
    throw py::value_error("col_scale must hold one value per column");
  }
  const std::optional<StridedTile<uint8_t>> k = KeptOf(kept, height, width);
  double error = 0.0;
  Status s;
  {
    py::gil_scoped_release release;
    s = TileSquaredError(static_cast<const uint8_t*>(b.ptr), b.size * b.itemsize, w,
                         k ? &*k : nullptr, width, height, row_scale.data(), row_offset.data(),
                         col_scale ? col_scale->data() : nullptr, &error);
  }
  Check(s, "tile_squared_error");
  return error;
}

py::tuple MatrixStatsOf(const py::array& matrix, float limit, bool avx2) {
  const py::ssize_t stride = RowStride(matrix, "matrix");
  const py::ssize_t rows = matrix.shape(0), cols = matrix.shape(1);
  py::array_t<double> row_sum(rows), row_squares(rows), col_sum(cols), col_squares(cols);
  py::array_t<float> row_min(rows), row_max(rows), col_min(cols), col_max(cols);
  MatrixStats stats{row_sum.mutable_data(), row_squares.mutable_data(), row_min.mutable_data(),
                    row_max.mutable_data(),  col_sum.mutable_data(),     col_squares.mutable_data(),
                    col_min.mutable_data(),  col_max.mutable_data(),     0};
  Status s;
  {
    py::gil_scoped_release release;
    s = ComputeMatrixStats(static_cast<const float*>(matrix.data()), rows, cols, stride, limit,
                           &stats, avx2);
  }
  Check(s, "matrix_stats");
  return py::make_tuple(stats.special, py::make_tuple(row_sum, row_squares, row_min, row_max),
                        py::make_tuple(col_sum, col_squares, col_min, col_max));
}

// Codes for the Rice packers: int64 (or an integer type that widens to it
// exactly), C-contiguous; floats are refused, not truncated (found by
// review: [3.7, 2.2] was packed as [3, 2]).
using Int64Array = py::array_t<int64_t, py::array::c_style>;

// The Rice quotients' unary parts after `pending` bits (the low `count` of
// `bits`): (whole bytes, bits pending, their count). Quotients are refused
// outside 0..2^20 (the decoder's longest unary part), so that the bytes
// written are bounded by the values given.
py::tuple RiceUnaryOf(const Int64Array& quotients, uint32_t bits, int count) {
  if (count < 0 || count > 7 || bits >> count) throw py::value_error("bad pending bits");
  const int64_t* q = quotients.data();
  const int64_t n = quotients.size();
  std::vector<uint8_t> out;
  PendingBits pending{bits, count};
  bool in_range = true;
  {
    // (checked without the interpreter: holding it, the check kept the
    // threads coding other leaves waiting)
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) in_range &= q[i] >= 0 && q[i] <= (int64_t{1} << 20);
    if (in_range) AppendUnary(q, n, pending, out);
  }
  if (!in_range) throw py::value_error("quotient out of range");
  return py::make_tuple(py::bytes(reinterpret_cast<const char*>(out.data()), out.size()),
                        pending.bits, pending.count);
}

// The `k` low bits of every value (each in 0..2^k), padded to a byte.
py::bytes RiceRemaindersOf(const Int64Array& values, int k) {
  if (k < 1 || k > 62) throw py::value_error("k must be 1..62");
  std::vector<uint8_t> out;
  out.reserve(static_cast<size_t>((values.size() * k + 7) / 8));
  {
    py::gil_scoped_release release;
    AppendRemainders(values.data(), values.size(), k, out);
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
}

// quantized_vectors._decoded_codes: `n` folded Rice codes from the given bit
// positions of the unary and remainder streams: (codes, unary bit, remainder
// bit) after them, or ValueError saying what the blob holds instead.
// A step and the center codes are folded about, for the Rice step counts
// and decoding: a positive finite step, a center within 2^52 (found by review: codes
// folded about a farther one wrapped negative).
void CheckStepAndCenter(double step, int64_t center) {
  if (!(step > 0) || !std::isfinite(step)) throw py::value_error("step must be positive");
  if (center <= -(int64_t{1} << 52) || center >= (int64_t{1} << 52)) {
    throw py::value_error("center must be within 2^52");
  }
}

// Rice streams as contiguous bytes, and decode positions and bounds in range.
void CheckRiceStreams(const py::buffer_info& u, const py::buffer_info& r, int k, int64_t n,
                      int64_t unary_bit, int64_t remainder_bit, int64_t max_quotient) {
  if (u.itemsize != 1 || r.itemsize != 1 || u.ndim != 1 || r.ndim != 1 ||
      (u.size > 1 && u.strides[0] != 1) || (r.size > 1 && r.strides[0] != 1)) {
    throw py::value_error("streams must be contiguous bytes");
  }
  if (k < 0 || k > 62) throw py::value_error("k must be 0..62");
  if (n < 0 || unary_bit < 0 || remainder_bit < 0 || max_quotient < 1 ||
      max_quotient > (int64_t{1} << 40) || unary_bit > 8 * u.size ||
      remainder_bit > 8 * r.size) {
    // (found by review: a remainder position of 2^63 - 8 wrapped, then read 2^60 bytes away)
    throw py::value_error("bad decode positions or bounds");
  }
  if (n > 8 * u.size - unary_bit) {   // a bit a code at least: refused before allocating
    throw py::value_error("holds fewer unary codes than values");
  }
}

void ThrowOnRiceStatus(RiceStatus status) {
  switch (status) {
    case RiceStatus::kShortUnary: throw py::value_error("holds fewer unary codes than values");
    case RiceStatus::kLongQuotient: throw py::value_error("holds a unary code too long");
    case RiceStatus::kShortRemainders: throw py::value_error("holds too few remainder bits");
    case RiceStatus::kOk: break;
  }
}

py::tuple RiceDecodeOf(const py::buffer& unary, int64_t unary_bit, const py::buffer& remainders,
                       int64_t remainder_bit, int k, int64_t max_quotient, int64_t n) {
  const py::buffer_info u = unary.request(), r = remainders.request();
  CheckRiceStreams(u, r, k, n, unary_bit, remainder_bit, max_quotient);
  py::array_t<int64_t> out(n);
  RiceStatus status;
  {
    py::gil_scoped_release release;
    status = DecodeRice(static_cast<const uint8_t*>(u.ptr), u.size, unary_bit,
                        static_cast<const uint8_t*>(r.ptr), r.size, remainder_bit, k,
                        max_quotient, n, out.mutable_data());
  }
  ThrowOnRiceStatus(status);
  return py::make_tuple(out, unary_bit, remainder_bit);
}

// RiceDecodeOf, the codes as the values they stand for on `step` about
// `center` (DecodeRiceSteps).
py::tuple RiceDecodeStepsOf(const py::buffer& unary, int64_t unary_bit,
                            const py::buffer& remainders, int64_t remainder_bit, int k,
                            int64_t max_quotient, int64_t n, bool zigzag, int64_t center,
                            double step) {
  const py::buffer_info u = unary.request(), r = remainders.request();
  CheckRiceStreams(u, r, k, n, unary_bit, remainder_bit, max_quotient);
  CheckStepAndCenter(step, center);
  py::array_t<double> out(n);
  RiceStatus status;
  {
    py::gil_scoped_release release;
    status = DecodeRiceSteps(static_cast<const uint8_t*>(u.ptr), u.size, unary_bit,
                             static_cast<const uint8_t*>(r.ptr), r.size, remainder_bit, k,
                             max_quotient, n, zigzag, center, step, out.mutable_data());
  }
  ThrowOnRiceStatus(status);
  return py::make_tuple(out, unary_bit, remainder_bit);
}

// quantized_vectors.step_rates: each step's bytes about its center
// (RiceStepBytes; -1 where a code or the center reaches 2^52) and squared
// error, every step in one call (a thin curve's steps one call each spent
// as long in numpy's sums and the calls as in the counts).
py::tuple RiceStepRatesOf(const py::array_t<double, py::array::c_style>& values,
                          const py::array_t<double, py::array::c_style>& steps,
                          const py::array_t<int64_t, py::array::c_style>& centers,
                          py::object weights, int max_rice, bool avx2) {
  const py::ssize_t n = values.size(), count = steps.size();
  if (centers.size() != count) throw py::value_error("one center a step");
  if (max_rice < 0 || max_rice > kMaxRiceWidth) throw py::value_error("max_rice must be 0..62");
  const double* s = steps.data();
  for (py::ssize_t i = 0; i < count; ++i) {
    if (!(s[i] > 0) || !std::isfinite(s[i])) throw py::value_error("steps must be positive");
  }
  std::optional<py::array_t<double, py::array::c_style>> w;
  if (!weights.is_none()) {
    w = weights.cast<py::array_t<double, py::array::c_style>>();
    if (w->size() != n) throw py::value_error("one weight a value");
  }
  py::array_t<int64_t> nbytes(count);
  py::array_t<double> sse(count);
  const double* v = values.data();
  const double* wv = w ? w->data() : nullptr;
  const int64_t* c = centers.data();
  int64_t* out = nbytes.mutable_data();
  double* errors = sse.mutable_data();
  {
    py::gil_scoped_release release;
    RiceStepRates(v, wv, n, s, c, count, max_rice, out, errors, avx2);
  }
  return py::make_tuple(nbytes, sse);
}

// quantized_vectors' dense codings: one step's codes of transformed values
// counted (CountStepCodes); None where a code reaches 2^52.
py::object StepCountsOf(const py::array_t<double, py::array::c_style>& x, py::object zero,
                        double step, int64_t center, int k, py::object folded, bool avx2) {
  const py::ssize_t n = x.size();
  CheckStepAndCenter(step, center);
  if (k < 0 || k > 62) throw py::value_error("k must be 0..62");
  std::optional<py::array_t<uint8_t, py::array::c_style>> z;
  if (!zero.is_none()) {
    z = zero.cast<py::array_t<uint8_t, py::array::c_style>>();
    if (z->size() != n) throw py::value_error("one zero flag a value");
  }
  std::optional<py::array_t<int64_t, py::array::c_style>> out;
  if (!folded.is_none()) {
    // (cast, not converted: folded codes written into a copy would be lost)
    if (!py::isinstance<py::array_t<int64_t, py::array::c_style>>(folded)) {
      throw py::type_error("folded must be a C-contiguous int64 array");
    }
    out = folded.cast<py::array_t<int64_t, py::array::c_style>>();
    if (out->size() != n) throw py::value_error("one folded code a value");
  }
  const double* xv = x.data();
  const uint8_t* zv = z ? z->data() : nullptr;
  int64_t* fv = out ? out->mutable_data() : nullptr;
  StepCounts counts;
  bool in_range;
  {
    py::gil_scoped_release release;
    in_range = CountStepCodes(xv, zv, n, step, center, k, counts, fv, avx2);
  }
  if (!in_range) return py::none();
  return py::make_tuple(counts.lo, counts.hi, counts.largest, counts.quotients);
}

py::array_t<float> ForwardDctOf(
    const py::array_t<float, py::array::c_style | py::array::forcecast>& blocks, bool avx2) {
  if (blocks.ndim() != 2 || blocks.shape(1) != 64) {
    throw py::value_error("blocks must have shape (n, 64)");
  }
  py::array_t<float> out({blocks.shape(0), py::ssize_t{64}});
  const float* in = blocks.data();
  float* coefficients = out.mutable_data();
  for (py::ssize_t i = 0; i < blocks.shape(0); ++i) {
    ForwardDct8x8(in + 64 * i, coefficients + 64 * i, avx2);
  }
  return out;
}

// The 64 steps of a feedback table, checked (positive and finite).
const double* FeedbackTable(const py::array_t<double, py::array::c_style | py::array::forcecast>& t) {
  if (t.size() != 64) throw py::value_error("table must have 64 entries");
  const double* q = t.data();
  for (int i = 0; i < 64; ++i) {
    if (!(q[i] > 0) || !std::isfinite(q[i])) throw py::value_error("table steps must be positive");
  }
  return q;
}

void CheckFeedbackBits(int bits) {
  if (bits != 8 && bits != 12) throw py::value_error("bits must be 8 or 12");
}

py::array_t<double> RestoreStripOf(
    const py::array_t<double, py::array::c_style | py::array::forcecast>& strip,
    const py::array_t<double, py::array::c_style | py::array::forcecast>& table, int bits) {
  if (strip.ndim() != 2 || strip.shape(1) < 1 || strip.shape(1) > 8) {
    throw py::value_error("strip must have shape (rows, 1..8)");
  }
  CheckFeedbackBits(bits);
  const double* q = FeedbackTable(table);
  const size_t rows = strip.shape(0), width = strip.shape(1);
  py::array_t<double> out({strip.shape(0), strip.shape(1)});
  RestoreStrip(strip.data(), rows, width, width, q, bits, out.mutable_data());
  return out;
}

void ShapeRankOneOf(py::array_t<double, py::array::c_style> samples,
                    const py::array_t<double, py::array::c_style | py::array::forcecast>& table,
                    int bits, const py::array_t<double, py::array::c_style | py::array::forcecast>& w,
                    const py::array_t<double, py::array::c_style | py::array::forcecast>& carriers,
                    bool avx2) {
  if (samples.ndim() != 2) throw py::value_error("samples must be 2-D (rows, inputs)");
  CheckFeedbackBits(bits);
  const double* q = FeedbackTable(table);
  const size_t rows = samples.shape(0), inputs = samples.shape(1);
  if (static_cast<size_t>(w.size()) != inputs || static_cast<size_t>(carriers.size()) != inputs) {
    throw py::value_error("w and carriers need one entry per input (samples.shape[1])");
  }
  double* data = samples.mutable_data();   // raises if the array is read-only
  py::gil_scoped_release release;
  ShapeRankOne(data, rows, inputs, q, bits, w.data(), carriers.data(), avx2);
}

py::array_t<uint16_t> QualityTable(int quality, int bits) {
  if (quality < 1 || quality > 100) throw py::value_error("quality must be in 1..100");
  if (bits != 8 && bits != 12) throw py::value_error("bits must be 8 or 12");
  py::array_t<uint16_t> table(64);
  QualityScaledTable(quality, bits, table.mutable_data());
  return table;
}

py::tuple RepeatsOf(const py::buffer& data, bool long_only) {
  const py::buffer_info b = ContiguousBytes(data);
  RepeatCount count;
  {
    py::gil_scoped_release release;
    count = CountRepeats(static_cast<const uint8_t*>(b.ptr), b.size * b.itemsize,
                         long_only ? kRepeatLongMatch : kRepeatMinMatch);
  }
  return py::make_tuple(py::make_tuple(count.bytes[0], count.matches[0]),
                        py::make_tuple(count.bytes[1], count.matches[1]));
}

// Written straight into the bytes object returned (its size planned first).
py::bytes RunDeflateOf(const py::buffer& data, bool last) {
  const py::buffer_info b = ContiguousBytes(data);
  std::optional<RunBlocks> blocks;
  {
    py::gil_scoped_release release;
    blocks.emplace(static_cast<const uint8_t*>(b.ptr), b.size * b.itemsize, last);
  }
  PyObject* raw = PyBytes_FromStringAndSize(nullptr, blocks->size());
  if (raw == nullptr) throw py::error_already_set();
  py::bytes out = py::reinterpret_steal<py::bytes>(raw);
  bool written;
  {
    // (the bytes object is not shared yet: written without the interpreter)
    py::gil_scoped_release release;
    written = blocks->Write(reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(raw)));
  }
  if (!written) throw std::runtime_error("run_deflate: the blocks written differ from their plan");
  return out;
}

// Where inflate_piece_into writes: `bytes` bytes `stride` apart from `data`.
struct PieceOutput {
  // Held while the GIL is released: the export keeps `out` from being
  // closed or resized meanwhile (found by review: an mmap closed by another
  // thread mid-inflate was written after it was unmapped).
  py::buffer_info view;
  uint8_t* data;
  int64_t bytes;
  int64_t stride;
};

// A writable C-contiguous buffer (its bytes one apart), or a 1-D view of
// bytes a positive stride apart (a byte plane of wider values).
PieceOutput PieceOutputOf(const py::buffer& out) {
  py::buffer_info o = out.request(/*writable=*/true);
  if (o.readonly) throw py::value_error("inflate_piece_into: out is read-only");
  if (o.ndim == 1 && o.itemsize == 1 && o.shape[0] > 1 && o.strides[0] != 1) {
    if (o.strides[0] < 1) {
      throw py::value_error("inflate_piece_into: out must be C-contiguous or bytes a positive "
                            "stride apart");
    }
    auto* data = static_cast<uint8_t*>(o.ptr);
    const int64_t bytes = o.shape[0], stride = o.strides[0];
    return {std::move(o), data, bytes, stride};
  }
  py::buffer_info c = Contiguous(std::move(o));
  auto* data = static_cast<uint8_t*>(c.ptr);
  const int64_t bytes = c.size * c.itemsize;
  return {std::move(c), data, bytes, 1};
}

// A plane piece's raw deflate stream inflated into `out` (its size the
// piece's: see InflatePiece), its bytes' Adler-32 returned. Strided, it is
// inflated into a buffer of its own, then written out with its Adler-32 in
// one pass.
uint32_t InflatePieceInto(const py::buffer& data, const py::buffer& out, bool last) {
  const py::buffer_info b = ContiguousBytes(data);
  const PieceOutput o = PieceOutputOf(out);
  const int64_t span = o.bytes > 0 ? (o.bytes - 1) * o.stride + 1 : 0;
  if (Overlaps(b.ptr, b.size * b.itemsize, o.data, span)) {
    throw py::value_error("inflate_piece_into: out overlaps data");
  }
  const auto* in = static_cast<const uint8_t*>(b.ptr);
  InflateStatus status;
  uint32_t adler = 1;
  {
    py::gil_scoped_release release;
    if (o.stride == 1) {
      status = InflatePiece(in, b.size * b.itemsize, o.data, o.bytes, last);
      if (status == InflateStatus::kOk) adler = Adler32(1, o.data, o.bytes);
    } else {
      std::unique_ptr<uint8_t[]> piece(new uint8_t[static_cast<size_t>(o.bytes)]);
      status = InflatePiece(in, b.size * b.itemsize, piece.get(), o.bytes, last);
      if (status == InflateStatus::kOk) {
        adler = ScatterAdler32(1, piece.get(), o.bytes, o.data, o.stride);
      }
    }
  }
  if (status != InflateStatus::kOk) {
    throw py::value_error(std::string("does not inflate (") + InflateStatusText(status) + ")");
  }
  return adler;
}

int64_t RunDeflatedSizeOf(const py::buffer& data, bool last) {
  const py::buffer_info b = ContiguousBytes(data);
  py::gil_scoped_release release;
  return RunDeflatedSize(static_cast<const uint8_t*>(b.ptr), b.size * b.itemsize, last);
}

uint32_t Crc32cOf(const py::buffer& data, uint32_t crc) {
  const py::buffer_info b = ContiguousBytes(data);
  py::gil_scoped_release release;
  return Crc32c(static_cast<const uint8_t*>(b.ptr), static_cast<size_t>(b.size * b.itemsize), crc);
}

}  // namespace
}  // namespace jaxjpeg

PYBIND11_MODULE(_native, m) {
  using namespace jaxjpeg;
  m.doc() = "jaxjpeg codec core: JPEG encode/decode of weight tiles";
  py::register_exception<JpegError>(m, "JpegError", PyExc_ValueError);
  m.attr("PACKED_TABLES_SIZE") = sizeof(PackedTables);
  m.attr("DECODER_TABLES_SIZE") = sizeof(DecoderTables);
  m.attr("TILE_COLUMNS") = static_cast<int>(kTileColumns);
  m.attr("PLAN_OK") = kPlanOk;
  m.def("inspect", &Inspect, py::arg("data"),
        "Parse a JPEG: dimensions, precision, restart interval, interval start offsets, "
        "packed tables (the plan's table bytes), quantization table.");
  m.def("tile_header", &TileHeader, py::arg("data"),
        "(packed tables as the plan's table bytes, width, height, bits, restart interval) "
        "of a JPEG file's header.");
  m.def("check_interval_starts", &CheckIntervalStarts, py::arg("data"), py::arg("starts"),
        "Whether a recorded interval index (starts + EOI offset) sits on the tile's own "
        "restart markers (header parsed, entropy-coded data not scanned).");
  m.def("decode_samples", &DecodeSamples, py::arg("data"), py::arg("threads") = 0,
        py::arg("destuffed") = false,
        "Decode to samples (uint8 for 8-bit, uint16 for 12-bit), like libjpeg; destuffed: "
        "through the destuff pass and its reader (tests).");
  m.def("run_plan", &RunPlan, py::arg("payload"), py::arg("interval_starts"), py::arg("tiles"),
        py::arg("tables"), py::arg("row_scale"), py::arg("row_offset"), py::arg("outputs"),
        py::arg("output_types"), py::arg("threads") = 0, py::arg("col_scale") = py::none(),
        py::arg("positions") = py::none(), py::arg("whole_outputs") = false,
        "Decode many restart intervals of many tiles into preallocated outputs; "
        "whole_outputs: the tiles must write every element of every output exactly once, "
        "as the custom call requires (else JpegError, the uncovered outputs NaN).");
  m.def("run_plan_kernel_harness", &RunPlanKernelHarness, py::arg("payload"),
        py::arg("interval_starts"), py::arg("tiles"), py::arg("tables"), py::arg("row_scale"),
        py::arg("row_offset"), py::arg("outputs"), py::arg("output_types"),
        py::arg("col_scale") = py::none(), py::arg("block_map") = py::none(),
        py::arg("step_counts") = py::none(), py::arg("positions") = py::none(),
        py::arg("whole_outputs") = false,
        "Run the CUDA kernel body over every (block, thread) on the host (tests); "
        "step_counts (int64 [2], written even when decoding fails): the warps' "
        "lock-step decode steps written staged and written lane by lane.");
  m.def("block_map", &BlockMap, py::arg("interval_starts"), py::arg("tiles"),
        py::arg("output_types"),
        "The CUDA decode blocks' map (tile of the first interval, kinds present), "
        "int32 [blocks, 2]; ValueError for a plan out of order.");
  m.def("destuff", &Destuff, py::arg("data"),
        "The destuff pass's CPU harness on one interval: (bytes, count) (tests).");
  m.def("bit_reader_trace", &BitReaderTrace, py::arg("data"), py::arg("skips"),
        py::arg("destuffed") = false,
        "A bit reader's next 16 bits, ReadPastEnd, HasUnusedBytes before each skip (tests).");
  m.def("encode", &Encode, py::arg("samples"), py::arg("qtable"), py::arg("bits") = 8,
        py::arg("restart_interval") = 0, py::arg("optimize") = true, py::arg("rdo") = true,
        py::arg("with_intervals") = false, py::arg("avx2") = true,
        "Encode float32 samples in [0, 2^bits-1] as a grayscale JPEG file (samples outside "
        "are clamped into it, a NaN to 0, as encode_mapped clamps a leaf's special values "
        "whose side list restores them); with_intervals: "
        "(bytes, interval start offsets + the EOI offset, as inspect finds them). avx2=False: "
        "the portable code even where the CPU has AVX2 (same bytes; for tests).");
  m.def("encode_mapped", &EncodeMapped, py::arg("weights"), py::arg("row_scale"),
        py::arg("row_offset"), py::arg("qtable"), py::arg("bits") = 8,
        py::arg("restart_interval") = 0, py::arg("optimize") = true, py::arg("rdo") = true,
        py::arg("with_intervals") = false, py::arg("avx2") = true,
        "encode() of the samples of float32 weights (rows contiguous, e.g. a slice of a "
        "matrix, or columns contiguous, e.g. a slice of its transpose) under per-row maps: "
        "clip((w - row_offset) / row_scale, 0, 2^bits - 1), a "
        "row_scale <= 0 taken as 1 (mapping.to_samples), computed as the blocks are coded.");
  m.def("encode_mapped_with_error", &EncodeMappedWithErrorOf, py::arg("weights"),
        py::arg("row_scale"), py::arg("row_offset"), py::arg("qtable"), py::arg("bits"),
        py::arg("restart_interval"), py::arg("original"), py::arg("col_scale") = py::none(),
        py::arg("kept") = py::none(),
        "encode_mapped(..., with_intervals=True) that also returns the tile's squared error "
        "as tile_squared_error(data, original, row_scale, row_offset, col_scale, kept) gives "
        "it, to the last bit, from the values coded instead of decoding the file: "
        "(bytes, interval starts, error).");
  m.def("encode_mapped_with_row_sums", &EncodeMappedWithRowSumsOf, py::arg("weights"),
        py::arg("row_scale"), py::arg("row_offset"), py::arg("qtable"), py::arg("bits"),
        py::arg("restart_interval"), py::arg("original") = py::none(),
        py::arg("col_scale") = py::none(), py::arg("kept") = py::none(),
        py::arg("bands") = py::none(), py::arg("output_type") = 0,
        "encode_mapped_with_error (original None: no error) that also returns, for each row "
        "of the tile, over its positions kept leaves out, [count, sum w, sum w^2, sum e^2] "
        "with w = weight - center, center = row_offset + row_scale * 2^(bits-1) in float64, "
        "and e = weight - what the decoder writes for it (its sample on the row's map, "
        "rounded to output_type: 0 float32, 1 bfloat16, 2 float16; no column scales): "
        "(bytes, interval starts, error or None, float64 [height, 4]). bands (uint8, one per "
        "row of 8 x 8 blocks; without original only): the rows of the blocks set only, the "
        "others' sums 0.");
  m.def("measure_steps", &MeasureStepsOf, py::arg("weights"), py::arg("row_scale"),
        py::arg("row_offset"), py::arg("steps"), py::arg("bits") = 8,
        py::arg("restart_interval") = 0, py::arg("col_weight") = py::none(), py::arg("rdo") = true,
        "encode_mapped() of a tile at each flat step (uint16): (entropy-coded bytes, the "
        "other bytes, float64 squared error of the float32 decode against the weights, "
        "times col_weight (same shape and row stride) if given, summed from the coding's "
        "transform-domain error: within 1% of decoding at 1-9 bits/weight), one entry per "
        "step; rdo=False: plain rounding, as error feedback's tiles are coded.");
  m.def("tile_squared_error", &TileSquaredErrorOf, py::arg("data"), py::arg("weights"),
        py::arg("row_scale"), py::arg("row_offset"), py::arg("col_scale") = py::none(),
        py::arg("kept") = py::none(),
        "Sum of (weights - decoded)^2 in float64 over one coded tile, decoded as the float32 "
        "output stage writes it (row maps, then col_scale); weights: 2-D float32 of the "
        "tile's shape, any strides; kept (optional bool, same shape): positions counted 0.");
  m.def("matrix_stats", &MatrixStatsOf, py::arg("matrix"), py::arg("limit"),
        py::arg("avx2") = true,
        "One pass over a 2-D float32 matrix (rows contiguous): (count of values with "
        "!(|x| <= limit), (row sum, row sum of squares, row min, row max), (the same per "
        "column)); sums in float64. avx2=False: the portable code even where the CPU has "
        "AVX2 (the same bits; for tests).");
  m.def("rice_unary", &RiceUnaryOf, py::arg("quotients"), py::arg("bits"), py::arg("count"),
        "jaxjpeg.quantized_vectors' Rice quotients in unary after `count` pending bits: "
        "(whole bytes, pending bits, their count).");
  m.def("rice_remainders", &RiceRemaindersOf, py::arg("values"), py::arg("k"),
        "The k low bits of each value, most significant first, padded with 0 bits to a byte.");
  m.def("rice_decode", &RiceDecodeOf, py::arg("unary"), py::arg("unary_bit"),
        py::arg("remainders"), py::arg("remainder_bit"), py::arg("k"), py::arg("max_quotient"),
        py::arg("n"),
        "n folded Rice codes on parameter k from the given bit positions of the unary and "
        "remainder streams (uint8): (int64 codes, unary bit, remainder bit) after them.");
  m.def("rice_decode_steps", &RiceDecodeStepsOf, py::arg("unary"), py::arg("unary_bit"),
        py::arg("remainders"), py::arg("remainder_bit"), py::arg("k"), py::arg("max_quotient"),
        py::arg("n"), py::arg("zigzag"), py::arg("center"), py::arg("step"),
        "rice_decode, each code (unzigzagged where zigzag) as (code + center) * step in "
        "float64: (values, unary bit, remainder bit).");
  m.def("rice_step_rates", &RiceStepRatesOf, py::arg("values"), py::arg("steps"),
        py::arg("centers"), py::arg("weights"), py::arg("max_rice"), py::arg("avx2") = true,
        "(int64 bytes, float64 squared errors) of float64 values quantized on each of steps "
        "about its int64 center and Rice coded on their best parameter (-1: a code or the "
        "center reaches 2^52); squared errors times weights where given. avx2=False: the "
        "portable code even where the CPU has AVX2 (the same bits; for tests).");
  m.def("step_counts", &StepCountsOf, py::arg("x"), py::arg("zero"), py::arg("step"),
        py::arg("center"), py::arg("k"), py::arg("folded"), py::arg("avx2") = true,
        "Codes of float64 x on step (half to even; floored where the uint8 zero flags are "
        "set), folded about center: (lowest, highest, largest folded, sum of folded >> k), "
        "each folded code written to the int64 array folded where given; None where a code "
        "reaches 2^52. avx2=False: the portable code even where the CPU has AVX2 (the same "
        "answers; for tests).");
  m.def("rice_parameter", [](const py::array_t<int64_t, py::array::c_style>& folded,
                             int max_rice) {
    if (max_rice < 0 || max_rice > kMaxRiceWidth) {
      throw py::value_error("max_rice must be 0..62");
    }
    const int64_t* f = folded.data();
    const py::ssize_t n = folded.size();
    for (py::ssize_t i = 0; i < n; ++i) {
      if (f[i] < 0) throw py::value_error("folded codes must be >= 0");
    }
    py::gil_scoped_release release;
    return BestRiceParameter(f, n, max_rice);
  }, py::arg("folded"), py::arg("max_rice"),
        "The Rice parameter in 0..max_rice coding folded int64 codes (>= 0) in the fewest bits.");
  m.def("forward_dct", &ForwardDctOf, py::arg("blocks"), py::arg("avx2") = true,
        "The encoder's forward DCT of (n, 64) row-major float32 blocks, coefficients in "
        "natural order; avx2=False: the portable code even where the CPU has AVX2 (tests).");
  m.def("restore_strip", &RestoreStripOf, py::arg("strip"), py::arg("table"), py::arg("bits"),
        "What the codec restores of a float64 strip of samples (rows, <= 8 columns): error "
        "feedback's model of the encoder and decoder (table: 64 steps).");
  // noconvert: a converted copy of the samples would take the feedback and be
  // thrown away; anything but a writable C-contiguous float64 array is refused.
  m.def("shape_rank_one", &ShapeRankOneOf, py::arg("samples").noconvert(), py::arg("table"),
        py::arg("bits"), py::arg("w"), py::arg("carriers"), py::arg("avx2") = true,
        "Error feedback against a diagonal-plus-rank-one covariance, in place on C-contiguous "
        "float64 samples (rows, inputs); see jaxjpeg.feedback.RankOneFactor. avx2=False: the "
        "portable code even where the CPU has AVX2 (the same bits; for tests).");
  m.def("quality_table", &QualityTable, py::arg("quality"), py::arg("bits") = 8,
        "The Annex K luminance table scaled to a 1..100 quality (natural order).");
  m.def("crc32c", &Crc32cOf, py::arg("data"), py::arg("crc") = 0, "CRC-32C (Castagnoli).");
  m.def("run_deflate", &RunDeflateOf, py::arg("data"), py::arg("last"),
        "C-contiguous bytes as raw deflate blocks of literals and runs of one byte, "
        "ended on a byte boundary by a sync flush unless last (xla_ops/deflate_runs.h).");
  m.def("inflate_piece_into", &InflatePieceInto, py::arg("data"), py::arg("out"),
        py::arg("last"),
        "A raw deflate stream inflated into exactly out's bytes (C-contiguous, or a 1-D view of "
        "bytes a positive stride apart), ended by its final block (last) or, on a byte "
        "boundary, by a block that is not final; their Adler-32. ValueError otherwise.");
  m.def("run_deflated_size", &RunDeflatedSizeOf, py::arg("data"), py::arg("last"),
        "len(run_deflate(data, last)), without writing it.");
  m.def("repeats", &RepeatsOf, py::arg("data"), py::arg("long_only") = false,
        "((bytes inside, count) of matches of 4-7 bytes, the same of longer ones) of a greedy "
        "pass over C-contiguous bytes for copies 2 to 32,768 bytes back (xla_ops/repeats.h); "
        "long_only: matches under 8 bytes passed over, not counted.");
  m.def("ffi_targets", [] {
    py::dict targets;
    targets["jaxjpeg_decode"] = py::capsule(reinterpret_cast<void*>(&JaxjpegDecodeCpu));
    targets["jaxjpeg_decode_parts"] =
        py::capsule(reinterpret_cast<void*>(&JaxjpegDecodePartsCpu));
    return targets;
  }, "XLA FFI handler capsules for the CPU platform.");
  m.attr("PLAN_OUTPUT_SIZE") = sizeof(PlanOutput);
  m.def("decode_workspace_bytes", [](int64_t num_outputs, int64_t payload_size,
                                     int64_t num_intervals, int64_t num_tables) {
    if (num_outputs < 0 || payload_size < 0 || num_intervals < 0 || num_tables < 0) {
      throw py::value_error("decode_workspace_bytes: counts and sizes must be >= 0");
    }
    // bounds under which its sums fit (found by review: 2^63 - 1 outputs wrapped negative)
    if (num_outputs > (int64_t{1} << 31) || num_tables > (int64_t{1} << 31) ||
        num_intervals > kMaxPlanIntervals || payload_size > (int64_t{1} << 52)) {
      throw py::value_error("decode_workspace_bytes: counts or sizes too large for a plan");
    }
    return DecodeWorkspaceBytes(num_outputs, payload_size, num_intervals, num_tables);
  }, py::arg("num_outputs"),
        py::arg("payload_size"), py::arg("num_intervals"), py::arg("num_tables"),
        "Bytes of the CUDA decode's workspace result: output descriptors, built tables and "
        "destuffed intervals.");
  m.def("build_tables", &BuildTables, py::arg("packed"), py::arg("kernel_phases") = false,
        "The DecoderTables built from one PackedTables, on one thread or through the table "
        "kernel's phases (tests): (bytes, status code).");
  m.def("plan_failure", &PlanFailure, py::arg("status"),
        "The text of a failed decode's packed status word, as the FFI handlers report it.");
  m.def("pack_plan_status", [](int64_t interval, int code) {
    // (found by review: code 16 read as interval 1's "ok", intervals past 2^27 wrapped)
    if (interval < 0 || interval >= kMaxPlanIntervals || code < 1 ||
        code > static_cast<int>(Status::kUncovered)) {
      throw py::value_error("pack_plan_status: an interval in 0..2^27-1 and a failure code");
    }
    return PackPlanStatus(interval, static_cast<Status>(code));
  }, py::arg("interval"), py::arg("code"), "The packed status word of a failed interval.");
}
