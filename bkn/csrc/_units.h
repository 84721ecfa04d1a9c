// Fused training-mode kernels of the batch-statistic norms (BKN, ghost-batch BN, BRN) for
// CPU float32/float64 tensors, as C++ autograd Functions.
//
// Why C++: the maths is the same as bkn/layers/_function.py (_NormalizeWithStats) and
// bkn/layers/_renorm_function.py (Renorm), which stay as the reference and the fallback. What the
// Python Functions cannot shed is their fixed cost per call: the Python autograd Function
// machinery, some 40 per-channel operations at microseconds of dispatch each, and four
// or five separate native kernels. At the small shapes of deep ResNet stages (2x512x7x7)
// that fixed cost is larger than the normalization itself.
//
// Here each (group, channel) is one unit of work, as in ATen's own CPU batch-norm kernel:
//   forward:  one parallel pass for the moments (two passes over the unit's values, the
//             second, centred, from cache; see chunked_sum for the accumulation), the
//             per-channel algebra as plain loops, one parallel pass y = a x + b;
//   backward: one parallel pass in which a unit computes S1 = sum(dy),
//             S2 = sum(dy (x - m)), its closed-form coefficients and then
//             dx = ws dy + x_coef x + const while its values are still in cache.
// NC...-contiguous and channels_last inputs are processed as they are (see Units); outputs
// and input gradients come in the input's layout.
//
// This header holds the machinery _function.cpp (BKN, ghost-batch BN) and
// _renorm_function.cpp (BRN) share: Units, the moments, the affine pass, the common backward.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#pragma once

#include "_common.h"

namespace bkn {
namespace {

// The values of (N, C, *S) that one statistic covers: unit (g, c) is channel c of the
// samples of group g. Two memory layouts are handled without copies:
//   planes (NC...-contiguous): a unit is N / G planes of S contiguous values; work is split
//     by unit, and a unit's values stay in cache between its passes;
//   rows (channels_last): position (n, s) is a row of C contiguous values; work is split by
//     rows, reductions go to per-thread (G, C) accumulators. Results are the same from run to
//     run, but the last bits can depend on the number of threads (the planes layout's do not).
// Any other layout is made NC...-contiguous first (take_layout).
struct Units {
  int64_t N, C, S, G, per_group;
  bool rows;
  Units(const Tensor& x, int64_t groups)
      : N(x.size(0)), C(x.size(1)), S(x.numel() / std::max<int64_t>(x.size(0) * x.size(1), 1)), G(groups),
        per_group(x.size(0) / groups), rows(!x.is_contiguous()) {}
  int64_t count() const { return per_group * S; }
  int64_t offset(int64_t g, int64_t c, int64_t k) const { return ((g * per_group + k) * C + c) * S; }
  int64_t group_of_row(int64_t r) const { return r / S / per_group; }

  // f(g, c) for every unit, in parallel (about 32k values per task).
  template <typename F>
  void for_each(const F& f) const {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(count(), 1));
    at::parallel_for(0, G * C, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) f(u / C, u % C);
    });
  }

  // f(first_row, end_row, thread) over the N * S rows, in parallel (about 32k values per task).
  template <typename F>
  void for_rows(const F& f) const {
    at::parallel_for(0, N * S, std::max<int64_t>(1, 32768 / C),
                     [&](int64_t lo, int64_t hi) { f(lo, hi, at::get_thread_num()); });
  }

  // Sums over rows of ``width`` per-channel quantities: add(r, acc) adds row r's values into
  // acc[k * C + c] (k < width) in the input's dtype; every 64 rows, and at each change of
  // group, those are added in double to per-thread (G, C) sums (so the adds vectorize and
  // the rounding stays about 1e-6 relative in float32). Returns the (width, G, C) totals.
  template <typename T, typename Add>
  std::vector<double> row_sums(int64_t width, const Add& add) const {
    std::vector<double> sums = thread_sums(width);
    for_rows([&](int64_t lo, int64_t hi, int thread) {
      double* total = sums.data() + thread * width * G * C;
      std::vector<T> acc(size_t(width * C), T(0));
      auto flush = [&](int64_t g) {
        for (int64_t k = 0; k < width; ++k)
          for (int64_t c = 0; c < C; ++c) {
            total[(k * G + g) * C + c] += double(acc[k * C + c]);
            acc[k * C + c] = T(0);
          }
      };
      int64_t g = group_of_row(lo), rows_in_acc = 0;
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t gr = group_of_row(r);
        if (gr != g || rows_in_acc == 64) {
          flush(g);
          g = gr, rows_in_acc = 0;
        }
        add(r, acc.data());
        ++rows_in_acc;
      }
      flush(g);
    });
    return reduce_threads(sums, width);
  }

  // Per-thread (G, C) accumulators of ``width`` sums each, zeroed; summed by reduce_threads.
  std::vector<double> thread_sums(int64_t width) const {
    return std::vector<double>(size_t(at::get_num_threads() * width * G * C), 0.0);
  }
  std::vector<double> reduce_threads(const std::vector<double>& sums, int64_t width) const {
    const int64_t block = width * G * C;
    std::vector<double> total(sums.begin(), sums.begin() + block);
    for (size_t t = 1; t * block < sums.size(); ++t)
      for (int64_t i = 0; i < block; ++i) total[i] += sums[t * block + i];
    return total;
  }
};

// x as the kernels take it: NC...-contiguous or channels_last as it is, anything else copied.
Tensor take_layout(const Tensor& x) {
  if (x.is_contiguous()) return x;
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    return x;
  return x.contiguous();
}

// ``t`` (e.g. the incoming gradient) in the layout of ``like``.
Tensor like_layout(const Tensor& t, const Tensor& like) {
  if (like.is_contiguous()) return t.contiguous();
  return t.contiguous(like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

// Sums are accumulated in the input's dtype over chunks of CHUNK values (so that the loops
// vectorize; rounding error about 1e-6 relative in float32) and the chunks' sums in double.
constexpr int64_t CHUNK = 1024;

// Sum of f(i) over i in [0, S).
template <typename T, typename F>
double chunked_sum(int64_t S, const F& f) {
  double total = 0;
  for (int64_t j = 0; j < S; j += CHUNK) {
    const int64_t end = std::min(S, j + CHUNK);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = j; i < end; ++i) acc += f(i);
    total += double(acc);
  }
  return total;
}

// Mean and biased variance of every unit, (G, C) each. Planes: a pass for the mean, then a
// centred pass (no cancellation) from cache. Rows: one shifted pass in double.
template <typename T>
std::pair<Tensor, Tensor> unit_moments(const Tensor& x, const Units& u) {
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor mean = at::empty({u.G, u.C}, opts), var = at::empty({u.G, u.C}, opts);
  const T* px = x.data_ptr<T>();
  T *pm = mean.data_ptr<T>(), *pv = var.data_ptr<T>();
  const int64_t S = u.S, C = u.C;
  const double inv = 1.0 / double(u.count());
  if (u.rows) {
    // One pass: sums of d = x - x0 and d^2, x0 = the unit's first value (a sample of it, so
    // |mean - x0| is of the order of the std and the variance keeps its precision).
    std::vector<T> x0(size_t(u.G * C));
    for (int64_t g = 0; g < u.G; ++g) std::copy_n(px + g * u.per_group * S * C, C, x0.data() + g * C);
    const std::vector<double> total = u.row_sums<T>(2, [&](int64_t r, T* acc) {
      const T *row = px + r * C, *shift = x0.data() + u.group_of_row(r) * C;
      T* a2 = acc + C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T d = row[c] - shift[c];
        acc[c] += d;
        a2[c] += d * d;
      }
    });
    for (int64_t i = 0; i < u.G * C; ++i) {
      const double dm = total[i] * inv;
      pm[i] = T(double(x0[i]) + dm);
      pv[i] = T(std::max(total[u.G * C + i] * inv - dm * dm, 0.0));
    }
    return {mean, var};
  }
  u.for_each([&](int64_t g, int64_t c) {
    double s = 0, q = 0;
    for (int64_t k = 0; k < u.per_group; ++k) {
      const T* p = px + u.offset(g, c, k);
      s += chunked_sum<T>(S, [p](int64_t i) { return p[i]; });
    }
    const T m = T(s * inv);
    for (int64_t k = 0; k < u.per_group; ++k) {
      const T* p = px + u.offset(g, c, k);
      q += chunked_sum<T>(S, [p, m](int64_t i) { return (p[i] - m) * (p[i] - m); });
    }
    pm[g * C + c] = m;
    pv[g * C + c] = T(q * inv);
  });
  return {mean, var};
}

// out = a x + b (+ e z, if pz) over the values of unit (g, c), planes layout.
template <typename T>
inline void affine_planes(const Units& u, int64_t g, int64_t c, const T* px, const T* pz, T* po, T a, T b, T e) {
  for (int64_t k = 0; k < u.per_group; ++k) {
    const int64_t o = u.offset(g, c, k);
    const T* p = px + o;
    T* q = po + o;
    if (pz) {
      const T* zr = pz + o;
#pragma omp simd
      for (int64_t i = 0; i < u.S; ++i) q[i] = a * p[i] + b + e * zr[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < u.S; ++i) q[i] = a * p[i] + b;
    }
  }
}

// out = a x + b + e z per unit (z optional): a, b, e of shape (G, C); out in x's layout.
template <typename T>
Tensor unit_affine(const Tensor& x, const Units& u, const T* pa, const T* pb, const Tensor& z = Tensor(),
                   const T* pe = nullptr) {
  Tensor out = at::empty_like(x);  // keeps x's layout (planes or rows)
  const T *px = x.data_ptr<T>(), *pz = z.defined() ? z.data_ptr<T>() : nullptr;
  T* po = out.data_ptr<T>();
  const int64_t C = u.C;
  if (u.rows) {
    u.for_rows([&](int64_t lo, int64_t hi, int) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t base = u.group_of_row(r) * C;
        const T *xr = px + r * C, *a = pa + base, *b = pb + base;
        T* o = po + r * C;
        if (pz) {
          const T *zr = pz + r * C, *e = pe + base;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = a[c] * xr[c] + b[c] + e[c] * zr[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = a[c] * xr[c] + b[c];
        }
      }
    });
    return out;
  }
  u.for_each([&](int64_t g, int64_t c) {
    const int64_t i = g * C + c;
    affine_planes<T>(u, g, c, px, pz, po, pa[i], pb[i], pz ? pe[i] : T(0));
  });
  return out;
}

// The backward pass shared by every Function here. For each unit: S1 = sum(dy) and
// S2 = sum(dy (x - m)) (zero without dy), then coef(g, c, S1, S2) -> {ws, x_coef, const},
// then dx = ws dy + x_coef x + const (if dx is wanted). Planes: one pass per unit, the second
// half from cache; rows: a reduction pass, the coefficients, then a pass for dx.
struct DxCoefficients {
  double ws, x_coef, constant;
};

template <typename T, typename Coef>
Tensor unit_backward(const Tensor& dy, const Tensor& x, const Units& u, const Tensor& mean, bool want_dx,
                     const Coef& coef) {
  const T *px = x.data_ptr<T>(), *pm = mean.data_ptr<T>(), *pdy = dy.defined() ? dy.data_ptr<T>() : nullptr;
  const int64_t S = u.S, C = u.C, GC = u.G * u.C;
  if (u.rows) {
    std::vector<double> total(size_t(2 * GC), 0.0);  // (G, C) of S1, then (G, C) of S2
    if (pdy) {
      total = u.row_sums<T>(2, [&](int64_t r, T* acc) {
        const T *d = pdy + r * C, *xr = px + r * C, *m = pm + u.group_of_row(r) * C;
        T* a2 = acc + C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          acc[c] += d[c];
          a2[c] += d[c] * (xr[c] - m[c]);
        }
      });
    }
    std::vector<T> k3(3 * GC);  // ws, x_coef, const per unit
    for (int64_t g = 0; g < u.G; ++g)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = g * C + c;
        const DxCoefficients k = coef(g, c, total[i], total[GC + i]);
        k3[i] = T(k.ws), k3[GC + i] = T(k.x_coef), k3[2 * GC + i] = T(k.constant);
      }
    if (!want_dx) return Tensor();
    if (pdy) return unit_affine<T>(x, u, k3.data() + GC, k3.data() + 2 * GC, dy, k3.data());
    return unit_affine<T>(x, u, k3.data() + GC, k3.data() + 2 * GC);
  }
  Tensor dx = want_dx ? at::empty_like(x) : Tensor();
  T* pdx = want_dx ? dx.data_ptr<T>() : nullptr;
  u.for_each([&](int64_t g, int64_t c) {
    double s1 = 0, s2 = 0;
    if (pdy) {
      const T m = pm[g * C + c];
      for (int64_t k = 0; k < u.per_group; ++k) {
        const int64_t o = u.offset(g, c, k);
        const T *d = pdy + o, *p = px + o;
        for (int64_t j = 0; j < S; j += CHUNK) {
          const int64_t end = std::min(S, j + CHUNK);
          T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
          for (int64_t i = j; i < end; ++i) {
            a1 += d[i];
            a2 += d[i] * (p[i] - m);
          }
          s1 += double(a1);
          s2 += double(a2);
        }
      }
    }
    const DxCoefficients k3 = coef(g, c, s1, s2);
    if (pdx) affine_planes<T>(u, g, c, px, pdy, pdx, T(k3.x_coef), T(k3.constant), T(k3.ws));
  });
  return dx;
}

// Sum a (G, C) gradient down to the shape of the input it belongs to: (), (C,), (1, C) or (G, C).
Tensor reduce_to(const Tensor& t, at::IntArrayRef shape) {
  if (t.sizes() == shape) return t;
  if (shape.empty()) return t.sum();
  if (t.size(0) == 1) return t.view(shape);  // one group: (1, C) to (C,), no reduction
  if (shape.size() == 1) return t.sum(0);
  return t.sum(0, true);
}

// The autograd Functions below: backward is Derived::backward_impl<T> for the saved input's dtype.
template <typename Derived>
struct FusedFunction : public torch::autograd::Function<Derived> {
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    variable_list result;
    AT_DISPATCH_FLOATING_TYPES(saved[0].scalar_type(), "bkn_fused_backward", [&] {
      result = Derived::template backward_impl<scalar_t>(ctx, saved, grads);
    });
    return result;
  }
};

// Counts this training step in ``steps`` (num_batches_tracked, if given) and returns the EMA
// factor: ``momentum``, or 1 / steps for a cumulative average (momentum NaN, torch's None).
double count_step(const Tensor& steps, double momentum) {
  if (!steps.defined()) return std::isnan(momentum) ? 0.0 : momentum;
  int64_t& n = *steps.data_ptr<int64_t>();
  n += 1;
  return std::isnan(momentum) ? 1.0 / double(n) : momentum;
}

// The compiled path takes CPU float32/float64 tensors of one dtype (and an int64 step
// counter); anything else goes to the Python Functions, told by an empty result.
bool compiled_path_takes(const Tensor& x, std::initializer_list<const Maybe*> tensors, const Maybe& steps) {
  if (!x.device().is_cpu() || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)) return false;
  for (const Maybe* t : tensors)
    if (t->has_value() && (!(*t)->device().is_cpu() || (*t)->scalar_type() != x.scalar_type())) return false;
  return !steps.has_value() || (steps->device().is_cpu() && steps->scalar_type() == at::kLong);
}

}  // namespace
}  // namespace bkn
