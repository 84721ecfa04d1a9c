// The whole convolution rule in one pass over the weight each way (float32/float64, CPU,
// up to MAX_FUSED_GROUPS groups): no (O, I) product goes to memory and no matrix product
// is dispatched:
//   forward:  for each output channel o, the tap sums S1[o], S2[o] of W[o] (I values each,
//             as tap_sums computes them; written out for the backward, 2/K of the weight's
//             size), then mean_out[g, o] = S1[o, :] . mean[g, :] and
//             var_out[g, o] = S2[o, :] . var[g, :] for every group g from cache;
//   backward: for each o, the rows dS1[o, :] = sum_g g_mean[g, o] mean[g, :] and dS2[o, :]
//             likewise into a buffer (G axpys over I values, from cache), used at once for
//             dW[o, i, k] = dS1[o, i] + 2 W[o, i, k] dS2[o, i] (the (O, I) products never go
//             to memory), and d mean[g, :] += g_mean[g, o] S1[o, :], d var likewise.
// The backward's input gradients are sums over o: each block of BLOCK output channels adds
// into its own (G, I) buffers, summed in block order at the end, so that results do not
// depend on the number of threads.
//
// The analytic transition's convolution rule (bkn/transitions/analytic.py, conv_moments;
// conv_moments_weight_grad also serves bkn/transitions/weight_grads.py). The tap sums' row
// kernels come from analytic_tap_sums.h, the weight-gradient memory from _native_pool.cpp.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include "_native.h"
#include "analytic_tap_sums.h"

namespace bkn {
namespace {

// Groups at most for the fused convolution rule below: for many groups the per-channel
// products (G axpys per output channel) cost more than they save, and the caller forms
// dS1, dS2 with matrix products instead.
constexpr int64_t MAX_FUSED_GROUPS = 16;

#if defined(__x86_64__) && defined(__GNUC__)
// The forward's products for one output channel with AVX2 and FMA (float32, where the CPU has
// them): mo[g * O] = a . m[g], vo[g * O] = b . v[g] for every group g, 4 groups per sweep over
// the I inputs (a and b loaded once for the 4; 8 independent accumulators, where one running sum
// per product leaves the loop waiting on each addition's latency). Equal up to rounding.
__attribute__((target("avx2,fma"))) void group_dots_avx2(const float* a, const float* b, const float* m,
                                                         const float* v, float* mo, float* vo, int64_t G, int64_t I,
                                                         int64_t O) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t n = std::min<int64_t>(4, G - g0);
    __m256 am[4], av[4];
    for (int j = 0; j < 4; ++j) am[j] = av[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 a8 = _mm256_loadu_ps(a + i), b8 = _mm256_loadu_ps(b + i);
      for (int j = 0; j < n; ++j) {
        am[j] = _mm256_fmadd_ps(a8, _mm256_loadu_ps(m + (g0 + j) * I + i), am[j]);
        av[j] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(v + (g0 + j) * I + i), av[j]);
      }
    }
    for (int j = 0; j < n; ++j) {
      alignas(32) float lm[8], lv[8];
      _mm256_store_ps(lm, am[j]);
      _mm256_store_ps(lv, av[j]);
      float dm = ((lm[0] + lm[1]) + (lm[2] + lm[3])) + ((lm[4] + lm[5]) + (lm[6] + lm[7]));
      float dv = ((lv[0] + lv[1]) + (lv[2] + lv[3])) + ((lv[4] + lv[5]) + (lv[6] + lv[7]));
      const float *rm = m + (g0 + j) * I, *rv = v + (g0 + j) * I;
      for (int64_t k = i; k < I; ++k) {  // the tail
        dm += a[k] * rm[k];
        dv += b[k] * rv[k];
      }
      mo[(g0 + j) * O] = dm;
      vo[(g0 + j) * O] = dv;
    }
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// The backward's dW for one output channel o of a float32 3x3 weight with AVX2 and FMA: the
// coefficients dS1[o, i] = sum_g gm[g * O] m[g, i] and dS2[o, i] likewise, 8 inputs i at a time
// in registers, used at once for those 8 rows' dW (tap_grad_8rows9_avx2), where the generic loop
// writes them to a buffer with one pass of loads and stores per group first. w, pb and out
// point at row o; gm and gv at column o of the (G, O) gradients.
__attribute__((target("avx2,fma"))) void rule_grad_row9_avx2(const float* w, const float* gm, const float* gv,
                                                             int64_t O, const float* m, const float* v, int64_t G,
                                                             int64_t I, const float* pb, float* out) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    __m256 a8 = _mm256_setzero_ps(), b8 = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      a8 = _mm256_fmadd_ps(_mm256_set1_ps(gm[g * O]), _mm256_loadu_ps(m + g * I + i), a8);
      b8 = _mm256_fmadd_ps(_mm256_set1_ps(gv[g * O]), _mm256_loadu_ps(v + g * I + i), b8);
    }
    tap_grad_8rows9_avx2(w + i * 9, a8, b8, pb == nullptr ? nullptr : pb + i * 9, out + i * 9);
  }
  for (; i < I; ++i) {  // the last I % 8 rows: the same operations, one lane
    float a = 0, b = 0;
    for (int64_t g = 0; g < G; ++g) {
      a = std::fma(gm[g * O], m[g * I + i], a);
      b = std::fma(gv[g * O], v[g * I + i], b);
    }
    for (int k = 0; k < 9; ++k) {
      const float term = a + 2.0f * w[i * 9 + k] * b;
      out[i * 9 + k] = pb == nullptr ? term : pb[i * 9 + k] + term;
    }
  }
}

// The backward's input gradients d mean = g_mean @ S1 and d var = g_var @ S2 ((G, O) @ (O, I))
// for inputs [i_begin, i_end) with AVX2 and FMA: 8 inputs and 4 groups at a time, summed over o
// in registers (each S1, S2 value read once per 4 groups), where the generic loop adds one
// output channel's rank-one update into (G, I) buffers at a time. Sums in o order, so the
// result does not depend on how the inputs are split over threads.
__attribute__((target("avx2,fma"))) void rule_input_grads_avx2(const float* s1, const float* s2, const float* gm,
                                                               const float* gv, int64_t G, int64_t O, int64_t I,
                                                               float* dm, float* dv, int64_t i_begin,
                                                               int64_t i_end) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t n = std::min<int64_t>(4, G - g0);
    int64_t i = i_begin;
    for (; i + 8 <= i_end; i += 8) {
      __m256 am[4], av[4];
      for (int j = 0; j < 4; ++j) am[j] = av[j] = _mm256_setzero_ps();
      for (int64_t o = 0; o < O; ++o) {
        const __m256 x1 = _mm256_loadu_ps(s1 + o * I + i), x2 = _mm256_loadu_ps(s2 + o * I + i);
        for (int j = 0; j < n; ++j) {
          am[j] = _mm256_fmadd_ps(_mm256_set1_ps(gm[(g0 + j) * O + o]), x1, am[j]);
          av[j] = _mm256_fmadd_ps(_mm256_set1_ps(gv[(g0 + j) * O + o]), x2, av[j]);
        }
      }
      for (int j = 0; j < n; ++j) {
        _mm256_storeu_ps(dm + (g0 + j) * I + i, am[j]);
        _mm256_storeu_ps(dv + (g0 + j) * I + i, av[j]);
      }
    }
    for (; i < i_end; ++i) {  // fewer than 8 inputs left: the same sums, one lane
      for (int64_t j = 0; j < n; ++j) {
        float a = 0, b = 0;
        for (int64_t o = 0; o < O; ++o) {
          a = std::fma(gm[(g0 + j) * O + o], s1[o * I + i], a);
          b = std::fma(gv[(g0 + j) * O + o], s2[o * I + i], b);
        }
        dm[(g0 + j) * I + i] = a;
        dv[(g0 + j) * I + i] = b;
      }
    }
  }
}
#endif

constexpr int64_t CONV_MOMENTS_BLOCK = 16;

template <typename T>
std::vector<Tensor> conv_moments_forward_impl(const Tensor& w, const Tensor& m, const Tensor& v) {
  const int64_t O = w.size(0), I = w.size(1), G = m.size(0), K = O * I ? w.numel() / (O * I) : 0;
  Tensor mo = at::empty({G, O}, m.options()), vo = at::empty({G, O}, m.options());
  Tensor s1 = pooled_empty({O, I}, w), s2 = pooled_empty({O, I}, w);
  const T *pw = w.data_ptr<T>(), *pm = m.data_ptr<T>(), *pv = v.data_ptr<T>();
  T *pmo = mo.data_ptr<T>(), *pvo = vo.data_ptr<T>(), *ps1 = s1.data_ptr<T>(), *ps2 = s2.data_ptr<T>();
  at::parallel_for(0, O, std::max<int64_t>(1, 4096 / std::max<int64_t>(I * K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T *a = ps1 + o * I, *b = ps2 + o * I;
      tap_sums_range<T>(pw + o * I * K, ps1 + o * I, ps2 + o * I, 0, I, K);
#if defined(__x86_64__) && defined(__GNUC__)
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx2_fma()) {
          group_dots_avx2(a, b, pm, pv, pmo + o, pvo + o, G, I, O);
          continue;
        }
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        const T *rm = pm + g * I, *rv = pv + g * I;
        T dm = 0, dv = 0;
#pragma omp simd reduction(+ : dm, dv)
        for (int64_t i = 0; i < I; ++i) {
          dm += a[i] * rm[i];
          dv += b[i] * rv[i];
        }
        pmo[g * O + o] = dm;
        pvo[g * O + o] = dv;
      }
    }
  });
  return {mo, vo, s1, s2};
}

template <typename T>
std::vector<Tensor> conv_moments_backward_impl(const Tensor& w, const Tensor& gm, const Tensor& m, const Tensor& gv,
                                               const Tensor& v, const Tensor& s1, const Tensor& s2, bool weight_grad,
                                               bool input_grads, const Tensor& base, bool into_base = false) {
  const int64_t O = w.size(0), I = w.size(1), G = m.size(0), K = O * I ? w.numel() / (O * I) : 0;
  const int64_t blocks = (O + CONV_MOMENTS_BLOCK - 1) / CONV_MOMENTS_BLOCK;
  // float32 where the CPU has AVX2 and FMA: the input gradients as matrix products summed in registers
  // (rule_input_grads_avx2), and for 3x3 kernels dW with its coefficients in registers.
  bool avx2 = false;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) avx2 = cpu_has_avx2_fma();
#endif
  const bool blocked_inputs = input_grads && !avx2;
  Tensor dw = weight_grad ? (into_base ? base : pooled_empty(w.sizes(), w)) : Tensor();
  // Per block: d mean (G, I) then d var (G, I).
  std::vector<T> partial(blocked_inputs ? static_cast<size_t>(blocks * 2 * G * I) : 0, T(0));
  const T *pw = w.data_ptr<T>(), *pgm = gm.data_ptr<T>(), *pm = m.data_ptr<T>(), *pgv = gv.data_ptr<T>(),
          *pv = v.data_ptr<T>();
  const T* ps1 = input_grads ? s1.data_ptr<T>() : nullptr;
  const T* ps2 = input_grads ? s2.data_ptr<T>() : nullptr;
  T* pd = weight_grad ? dw.data_ptr<T>() : nullptr;
  const T* pbase = weight_grad && base.defined() ? base.data_ptr<T>() : nullptr;
  if (weight_grad || blocked_inputs) {
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<T> a(static_cast<size_t>(I)), b(static_cast<size_t>(I));
      for (int64_t blk = block_begin; blk < block_end; ++blk) {
        T* acc_m = blocked_inputs ? partial.data() + blk * 2 * G * I : nullptr;
        T* acc_v = blocked_inputs ? acc_m + G * I : nullptr;
        for (int64_t o = blk * CONV_MOMENTS_BLOCK; o < std::min(O, (blk + 1) * CONV_MOMENTS_BLOCK); ++o) {
          const T* row = pw + o * I * K;
          if (blocked_inputs) {
            for (int64_t g = 0; g < G; ++g) {
              const T cm = pgm[g * O + o], cv = pgv[g * O + o];
              T *am = acc_m + g * I, *av = acc_v + g * I;
              const T *p1 = ps1 + o * I, *p2 = ps2 + o * I;
#pragma omp simd
              for (int64_t i = 0; i < I; ++i) {
                am[i] += cm * p1[i];
                av[i] += cv * p2[i];
              }
            }
          }
          if (!weight_grad) continue;
          const T* row_base = pbase == nullptr ? nullptr : pbase + o * I * K;
#if defined(__x86_64__) && defined(__GNUC__)
          if constexpr (std::is_same_v<T, float>) {
            if (avx2 && K == 9) {
              rule_grad_row9_avx2(row, pgm + o, pgv + o, O, pm, pv, G, I, row_base, pd + o * I * K);
              continue;
            }
          }
#endif
          // a = dS1[o, :] = sum_g g_mean[g, o] mean[g, :], b = dS2[o, :] likewise, then dW[o].
          T *pa = a.data(), *pb = b.data();
          std::fill(a.begin(), a.end(), T(0));
          std::fill(b.begin(), b.end(), T(0));
          for (int64_t g = 0; g < G; ++g) {
            const T cm = pgm[g * O + o], cv = pgv[g * O + o];
            const T *rm = pm + g * I, *rv = pv + g * I;
#pragma omp simd
            for (int64_t i = 0; i < I; ++i) {
              pa[i] += cm * rm[i];
              pb[i] += cv * rv[i];
            }
          }
          tap_grad_range<T>(row, pa, pb, row_base, pd + o * I * K, 0, I, K);
        }
      }
    });
  }
  Tensor d_mean, d_var;
  if (input_grads && !blocked_inputs) {
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (std::is_same_v<T, float>) {
      d_mean = at::empty({G, I}, m.options());
      d_var = at::empty({G, I}, m.options());
      T *dm = d_mean.data_ptr<T>(), *dv = d_var.data_ptr<T>();
      const int64_t chunks = (I + 7) / 8;
      at::parallel_for(0, chunks, std::max<int64_t>(1, 32768 / std::max<int64_t>(8 * O * G, 1)),
                       [&](int64_t begin, int64_t end) {
                         rule_input_grads_avx2(ps1, ps2, pgm, pgv, G, O, I, dm, dv, begin * 8, std::min(I, end * 8));
                       });
    }
#endif
  } else if (input_grads) {  // the blocks' partial sums, in block order
    d_mean = at::zeros({G, I}, m.options());
    d_var = at::zeros({G, I}, m.options());
    T *dm = d_mean.data_ptr<T>(), *dv = d_var.data_ptr<T>();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const T *am = partial.data() + blk * 2 * G * I, *av = am + G * I;
      for (int64_t j = 0; j < G * I; ++j) {
        dm[j] += am[j];
        dv[j] += av[j];
      }
    }
  }
  return {dw, d_mean, d_var};
}

// Whether the fused convolution rule takes these tensors: CPU, float32/float64 of one dtype,
// contiguous, a (O, I, *k) weight and (G, cols) matrices with 1 <= G <= MAX_FUSED_GROUPS.
bool conv_moments_takes(const Tensor& w, std::initializer_list<std::pair<const Tensor*, int64_t>> parts) {
  if (w.device().type() != at::kCPU || !w.is_contiguous() || w.dim() < 3) return false;
  if (w.scalar_type() != at::kFloat && w.scalar_type() != at::kDouble) return false;
  const int64_t G = parts.begin()->first->dim() == 2 ? parts.begin()->first->size(0) : -1;
  if (G < 1 || G > MAX_FUSED_GROUPS) return false;
  for (const auto& [t, cols] : parts) {
    if (t->device().type() != at::kCPU || t->scalar_type() != w.scalar_type() || !t->is_contiguous()) return false;
    if (t->dim() != 2 || t->size(0) != G || t->size(1) != cols) return false;
  }
  return true;
}

}  // namespace

// (mean @ S1^T, var @ S2^T, S1, S2), or [] for the Python path.
std::vector<Tensor> conv_moments_forward(const Tensor& w, const Tensor& mean, const Tensor& var) {
  if (!conv_moments_takes(w, {{&mean, w.size(1)}, {&var, w.size(1)}})) return {};
  at::NoGradGuard no_grad;
  return AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "conv_moments_forward",
                                    [&] { return conv_moments_forward_impl<scalar_t>(w, mean, var); });
}

namespace {

// Whether the rule's backward takes W (O, I, *k), the (G, O) gradients and the (G, I) moments.
bool conv_moments_backward_takes(const Tensor& w, const Tensor& g_mean, const Tensor& mean, const Tensor& g_var,
                                 const Tensor& var) {
  const int64_t O = w.dim() >= 2 ? w.size(0) : -1, I = w.dim() >= 2 ? w.size(1) : -1;
  return conv_moments_takes(w, {{&mean, I}, {&g_mean, O}, {&var, I}, {&g_var, O}});
}

}  // namespace

// (dW or undefined, d mean, d var) from the forward's S1, S2, or [] for the Python path;
// weight_grad=false leaves dW undefined, input_grads=false the last two.
std::vector<Tensor> conv_moments_backward(const Tensor& w, const Tensor& g_mean, const Tensor& mean,
                                          const Tensor& g_var, const Tensor& var, const Tensor& s1,
                                          const Tensor& s2, bool weight_grad, bool input_grads) {
  if (!conv_moments_backward_takes(w, g_mean, mean, g_var, var)) return {};
  const int64_t O = w.size(0), I = w.size(1);
  for (const Tensor* s : {&s1, &s2}) {
    if (s->scalar_type() != w.scalar_type() || !s->is_contiguous() || s->dim() != 2 || s->size(0) != O ||
        s->size(1) != I || s->device().type() != at::kCPU)
      return {};
  }
  at::NoGradGuard no_grad;
  return AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "conv_moments_backward", [&] {
    return conv_moments_backward_impl<scalar_t>(w, g_mean, mean, g_var, var, s1, s2, weight_grad, input_grads,
                                                Tensor());
  });
}

// base + the rule's dW in one pass (base: another gradient of W, of its shape and dtype, e.g.
// the convolution's own; bkn/transitions/weight_grads.py), or an undefined tensor for the
// Python path.
// With in_place, the sum is written into base itself (each value read before it is written):
// the pass then reads W and base and writes base back, where a new tensor costs a third stream
// (the memory of the new tensor is read into the cache before it is written).
Tensor conv_moments_weight_grad(const Tensor& w, const Tensor& g_mean, const Tensor& mean, const Tensor& g_var,
                                const Tensor& var, const Tensor& base, bool in_place) {
  if (!conv_moments_backward_takes(w, g_mean, mean, g_var, var)) return Tensor();
  if (base.sizes() != w.sizes() || base.scalar_type() != w.scalar_type() || !base.is_contiguous() ||
      base.device().type() != at::kCPU)
    return Tensor();
  at::NoGradGuard no_grad;
  return AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "conv_moments_weight_grad", [&] {
    return conv_moments_backward_impl<scalar_t>(w, g_mean, mean, g_var, var, Tensor(), Tensor(), true, false, base,
                                                in_place)[0];
  });
}

}  // namespace bkn
