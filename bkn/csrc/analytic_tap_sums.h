// -- the analytic transition's convolution weight tap sums (bkn/transitions/analytic.py) ---------
//
// For a contiguous weight W viewed as (R = O * I/groups, K = kernel taps):
//   forward:  s1[r] = sum_k W[r, k], s2[r] = sum_k W[r, k]^2, one read of W (the Python path
//             reads it three times and writes a squared copy);
//   backward: dW[r, k] = g1[r] + 2 W[r, k] g2[r] (addcmul's formula, the same rounding),
//             one read of W and one write of dW.
// Rows are split over threads with at::parallel_for. Sums accumulate in the weight's dtype
// in tap order (K is a kernel's taps: 9 for 3x3).
//
// This header holds the row kernels (generic, SSE2, AVX2 chosen at run time) and their
// dispatch (tap_sums_range, tap_grad_range): analytic_tap_sums.cpp runs them over a whole
// weight, analytic_conv_moments.cpp one output channel at a time.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#pragma once

#include "_common.h"
#include "_simd.h"

namespace bkn {
namespace {

// Row sums, one row (K values) at a time: the generic loops (float64, kernels other than 3x3).
template <typename T>
void tap_sums_rows(const T* pw, T* p1, T* p2, int64_t begin, int64_t end, int64_t K) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = pw + r * K;
    T a = 0, b = 0;
    for (int64_t k = 0; k < K; ++k) {
      a += row[k];
      b += row[k] * row[k];
    }
    p1[r] = a;
    p2[r] = b;
  }
}

// dW = g1 + 2 W g2, or with pb (another gradient of W, e.g. the convolution's own) pb + that:
// the rule's gradient added to it in the same pass (the sum autograd would form, with the same
// rounding: the rule's term first).
template <typename T>
void tap_grad_rows(const T* pw, const T* p1, const T* p2, const T* pb, T* pd, int64_t begin, int64_t end, int64_t K) {
  for (int64_t r = begin; r < end; ++r) {
    const T a = p1[r], b = p2[r];
    const T* row = pw + r * K;
    T* out = pd + r * K;
    if (pb == nullptr) {
      for (int64_t k = 0; k < K; ++k) out[k] = a + T(2) * row[k] * b;
    } else {
      const T* base = pb + r * K;
      for (int64_t k = 0; k < K; ++k) out[k] = base[k] + (a + T(2) * row[k] * b);
    }
  }
}

#if defined(__SSE2__)
// float32 3x3 kernels (K = 9) with SSE2, which every x86-64 compiler targets. One row's 9
// additions are a chain of dependent scalar adds (about 4 cycles each), which leaves the
// loop at a fraction of the memory bandwidth; here 4 rows at a time: each row's taps 0-3
// and 4-7 as two vectors (added, and squared and added), the 4 rows' vectors transposed
// and added (4 row sums in one vector), tap 8 added last. Sums are in another order than
// the scalar loop's: equal up to rounding.
void tap_sums_rows9(const float* pw, float* p1, float* p2, int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const float* p = pw + r * 9;
    __m128 s[4], q[4];
    for (int i = 0; i < 4; ++i) {
      const __m128 lo = _mm_loadu_ps(p + 9 * i), hi = _mm_loadu_ps(p + 9 * i + 4);
      s[i] = _mm_add_ps(lo, hi);
      q[i] = _mm_add_ps(_mm_mul_ps(lo, lo), _mm_mul_ps(hi, hi));
    }
    _MM_TRANSPOSE4_PS(s[0], s[1], s[2], s[3]);
    _MM_TRANSPOSE4_PS(q[0], q[1], q[2], q[3]);
    const __m128 last = _mm_setr_ps(p[8], p[17], p[26], p[35]);
    const __m128 sum = _mm_add_ps(_mm_add_ps(_mm_add_ps(s[0], s[1]), _mm_add_ps(s[2], s[3])), last);
    const __m128 sq = _mm_add_ps(_mm_add_ps(_mm_add_ps(q[0], q[1]), _mm_add_ps(q[2], q[3])), _mm_mul_ps(last, last));
    _mm_storeu_ps(p1 + r, sum);
    _mm_storeu_ps(p2 + r, sq);
  }
  tap_sums_rows<float>(pw, p1, p2, r, end, 9);
}

// dW = g1 + 2 W g2 (or pb + that) for float32 3x3 kernels: taps 0-3 and 4-7 of a row as
// vectors (the same operations in the same order as the scalar loop: the same results), tap 8 scalar.
void tap_grad_rows9(const float* pw, const float* p1, const float* p2, const float* pb, float* pd, int64_t begin,
                    int64_t end) {
  const __m128 two = _mm_set1_ps(2.0f);
  for (int64_t r = begin; r < end; ++r) {
    const float* p = pw + r * 9;
    float* out = pd + r * 9;
    const __m128 a = _mm_set1_ps(p1[r]), b = _mm_set1_ps(p2[r]);
    __m128 low = _mm_add_ps(a, _mm_mul_ps(_mm_mul_ps(two, _mm_loadu_ps(p)), b));
    __m128 high = _mm_add_ps(a, _mm_mul_ps(_mm_mul_ps(two, _mm_loadu_ps(p + 4)), b));
    float last = p1[r] + 2.0f * p[8] * p2[r];
    if (pb != nullptr) {
      const float* base = pb + r * 9;
      low = _mm_add_ps(_mm_loadu_ps(base), low);
      high = _mm_add_ps(_mm_loadu_ps(base + 4), high);
      last = base[8] + last;
    }
    _mm_storeu_ps(out, low);
    _mm_storeu_ps(out + 4, high);
    out[8] = last;
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)

// The sums of the 8 lanes of each of v[0..7], as one vector (lane r: v[r]'s sum): pairwise
// horizontal adds, then the two 128-bit halves added.
__attribute__((target("avx2"))) inline __m256 lane_sums8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // s0123: rows 0-3's sums of lanes 0-3 in its low half, of lanes 4-7 in its high half; s4567 likewise.
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Tap sums for float32 3x3 kernels with AVX2, chosen at run time where the CPU has it: 8 rows at
// a time, each row's taps 0-7 as one vector with tap 8 added into lane 7 (from a second load one
// value further on), squared likewise, then the 8 rows' lane sums (lane_sums8). Where the SSE2
// loop (tap_sums_rows9) spends a scalar load per row on tap 8 and 4-row transposes, this is two
// loads and a blend per row; sums are in another order again: equal up to rounding.
__attribute__((target("avx2"))) void tap_sums_rows9_avx2(const float* pw, float* p1, float* p2, int64_t begin,
                                                          int64_t end) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t r = begin;
  for (; r + 8 <= end; r += 8) {
    const float* p = pw + r * 9;
    // The weight comes from memory (a convolution does not leave it in cache): asking for the
    // lines 8 KB ahead overlaps their loads with this loop's arithmetic (a 512x512x3x3 weight
    // out of cache: 0.33 ms without, 0.25 with; weight.sum() takes 0.21). A prefetch past the
    // end of the weight is harmless (no fault).
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + 2048 * sizeof(float);
    for (int c = 0; c < 288; c += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + c), _MM_HINT_T0);
    __m256 s[8], q[8];
    for (int i = 0; i < 8; ++i) {
      const __m256 taps = _mm256_loadu_ps(p + 9 * i);  // taps 0-7
      const __m256 last = _mm256_blend_ps(zero, _mm256_loadu_ps(p + 9 * i + 1), 0x80);  // tap 8 in lane 7
      s[i] = _mm256_add_ps(taps, last);
      q[i] = _mm256_add_ps(_mm256_mul_ps(taps, taps), _mm256_mul_ps(last, last));
    }
    _mm256_storeu_ps(p1 + r, lane_sums8(s));
    _mm256_storeu_ps(p2 + r, lane_sums8(q));
  }
  tap_sums_rows9(pw, p1, p2, r, end);
}
#endif

// Rows [begin, end) of the tap sums and (below) of their gradient, with or without a gradient
// to add to: the SSE2 loops for float32 3x3 kernels (AVX2 where the CPU has it), vectorized
// loops for 1x1 kernels, the generic ones otherwise (every caller below goes through these).
template <typename T>
void tap_sums_range(const T* pw, T* p1, T* p2, int64_t begin, int64_t end, int64_t K) {
  if (K == 1) {  // 1x1 kernels: the sums are the weight and its square (a loop the compiler vectorizes)
#pragma omp simd
    for (int64_t r = begin; r < end; ++r) {
      p1[r] = pw[r];
      p2[r] = pw[r] * pw[r];
    }
    return;
  }
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (K == 9 && cpu_has_avx2()) return tap_sums_rows9_avx2(pw, p1, p2, begin, end);
#endif
    if (K == 9) return tap_sums_rows9(pw, p1, p2, begin, end);
  }
#endif
  tap_sums_rows<T>(pw, p1, p2, begin, end, K);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Lane l of vector j of 8 rows' 72 values belongs to row (8j + l) / 9.
alignas(32) const int ROW_OF_LANE9[9][8] = {
    {0, 0, 0, 0, 0, 0, 0, 0}, {0, 1, 1, 1, 1, 1, 1, 1}, {1, 1, 2, 2, 2, 2, 2, 2}, {2, 2, 2, 3, 3, 3, 3, 3},
    {3, 3, 3, 3, 4, 4, 4, 4}, {4, 4, 4, 4, 4, 5, 5, 5}, {5, 5, 5, 5, 5, 5, 6, 6}, {6, 6, 6, 6, 6, 6, 6, 7},
    {7, 7, 7, 7, 7, 7, 7, 7}};

// dW = a + 2 W b (or pb + that) for 8 rows of 9 taps (72 values, 9 vectors), a8 and b8 holding
// the rows' coefficients, which a permute puts in place for each vector (ROW_OF_LANE9). The same
// operations per value as the scalar loop (no fused multiply-add): the same results.
__attribute__((target("avx2"))) inline void tap_grad_8rows9_avx2(const float* w, __m256 a8, __m256 b8, const float* pb,
                                                                 float* out) {
  const __m256 two = _mm256_set1_ps(2.0f);
  for (int j = 0; j < 9; ++j) {
    const __m256i lane = _mm256_load_si256(reinterpret_cast<const __m256i*>(ROW_OF_LANE9[j]));
    const __m256 a = _mm256_permutevar8x32_ps(a8, lane), b = _mm256_permutevar8x32_ps(b8, lane);
    __m256 term = _mm256_add_ps(a, _mm256_mul_ps(_mm256_mul_ps(two, _mm256_loadu_ps(w + 8 * j)), b));
    if (pb != nullptr) term = _mm256_add_ps(_mm256_loadu_ps(pb + 8 * j), term);
    _mm256_storeu_ps(out + 8 * j, term);
  }
}

// dW = g1 + 2 W g2 (or pb + that) for float32 3x3 kernels with AVX2, chosen at run time where the
// CPU has it: 8 rows at a time (tap_grad_8rows9_avx2), the rest by the SSE2 loop.
__attribute__((target("avx2"))) void tap_grad_rows9_avx2(const float* pw, const float* p1, const float* p2,
                                                          const float* pb, float* pd, int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + 8 <= end; r += 8)
    tap_grad_8rows9_avx2(pw + r * 9, _mm256_loadu_ps(p1 + r), _mm256_loadu_ps(p2 + r),
                         pb == nullptr ? nullptr : pb + r * 9, pd + r * 9);
  tap_grad_rows9(pw, p1, p2, pb, pd, r, end);
}

#endif

template <typename T>
void tap_grad_range(const T* pw, const T* p1, const T* p2, const T* pb, T* pd, int64_t begin, int64_t end,
                    int64_t K) {
  if (K == 1) {  // 1x1 kernels: one value per row, the generic loop's operations vectorized
    if (pb == nullptr) {
#pragma omp simd
      for (int64_t r = begin; r < end; ++r) pd[r] = p1[r] + T(2) * pw[r] * p2[r];
    } else {
#pragma omp simd
      for (int64_t r = begin; r < end; ++r) pd[r] = pb[r] + (p1[r] + T(2) * pw[r] * p2[r]);
    }
    return;
  }
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (K == 9 && cpu_has_avx2()) return tap_grad_rows9_avx2(pw, p1, p2, pb, pd, begin, end);
#endif
    if (K == 9) return tap_grad_rows9(pw, p1, p2, pb, pd, begin, end);
  }
#endif
  tap_grad_rows<T>(pw, p1, p2, pb, pd, begin, end, K);
}

}  // namespace
}  // namespace bkn
