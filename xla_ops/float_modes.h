// The floating-point modes the decoder's arithmetic assumes on host threads.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace jaxjpeg {

// Keeps subnormal floats (inputs and results) on the calling thread while in
// scope, restoring its modes after. XLA runs its CPU threads with
// flush-to-zero and denormals-are-zero set; the decoder's output stage must
// round as the CUDA kernel and its CPU harness do, which keep them (found by
// review: weights around 1e-39 decoded to 0 through the CPU custom call).
class KeepSubnormals {
 public:
  KeepSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(static_cast<unsigned>(saved_) & ~(kFlushToZero | kDenormalsAreZero));
#elif defined(__aarch64__)
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    asm volatile("msr fpcr, %0" : : "r"(saved_ & ~kArmFlushToZero));
#endif
  }
  ~KeepSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(static_cast<unsigned>(saved_));
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  KeepSubnormals(const KeepSubnormals&) = delete;
  KeepSubnormals& operator=(const KeepSubnormals&) = delete;

 private:
  static constexpr unsigned kFlushToZero = 1u << 15;      // MXCSR.FTZ
  static constexpr unsigned kDenormalsAreZero = 1u << 6;  // MXCSR.DAZ
  static constexpr uint64_t kArmFlushToZero = uint64_t{1} << 24;  // FPCR.FZ
  uint64_t saved_ = 0;
};

}  // namespace jaxjpeg
