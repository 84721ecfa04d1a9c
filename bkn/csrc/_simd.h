// The SIMD intrinsics and the run-time CPU checks (AVX2, AVX2+FMA) that choose the vector
// loops: SSE2 is every x86-64 compiler's baseline, AVX2/FMA loops are compiled with
// __attribute__((target(...))) and taken only where __builtin_cpu_supports says so.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#pragma once

#if defined(__SSE2__)
#include <emmintrin.h>
#include <immintrin.h>
#include <xmmintrin.h>
#endif

namespace bkn {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// For the loops that also use fused multiply-adds.
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace
}  // namespace bkn
