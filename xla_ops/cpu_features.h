// Run-time checks for host code compiled for x86-64 extensions beyond the
// build's baseline (function-level target attributes): the portable code
// always exists too, and both give the same bits.
#ifndef JAXJPEG_CPU_FEATURES_H_
#define JAXJPEG_CPU_FEATURES_H_

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JAXJPEG_X86_DISPATCH 1
#endif

namespace jaxjpeg {

// Whether this CPU runs AVX2 code.
inline bool CpuHasAvx2() {
#if defined(JAXJPEG_X86_DISPATCH)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
#else
  return false;
#endif
}

// Whether this CPU runs code built with target("avx2,bmi,bmi2"): AVX2 and
// the bit-manipulation instructions that CPUs with AVX2 have in practice.
inline bool CpuHasAvx2Bmi2() {
#if defined(JAXJPEG_X86_DISPATCH)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
                          __builtin_cpu_supports("bmi2");
  return has;
#else
  return false;
#endif
}

}  // namespace jaxjpeg

#endif  // JAXJPEG_CPU_FEATURES_H_
