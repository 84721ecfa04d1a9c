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
// Built on first use by bkn/layers/_native.py (torch.utils.cpp_extension.load).

#include <torch/extension.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <immintrin.h>
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <pthread.h>
#include <unordered_map>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Maybe = std::optional<Tensor>;

Tensor get(const Maybe& t) { return t.has_value() ? *t : Tensor(); }

// ctx->needs_input_grad(i) counts only the tensors given, while backward returns one
// gradient per argument: map argument positions to the inputs' indices (-1: not given).
std::vector<int64_t> input_index(std::initializer_list<bool> given) {
  std::vector<int64_t> index;
  int64_t next = 0;
  for (bool g : given) index.push_back(g ? next++ : -1);
  return index;
}

bool needs_grad(AutogradContext* ctx, int64_t argument) {
  const auto index = ctx->saved_data["input_index"].toIntVector()[argument];
  return index >= 0 && ctx->needs_input_grad(index);
}

// A (G, C) view of a per-channel tensor of shape (), (C,), (1, C) or (G, C): element (g, c).
template <typename T>
struct Rows {
  const T* data = nullptr;
  int64_t sg = 0, sc = 0;
  Rows() = default;
  explicit Rows(const Tensor& t) : data(t.data_ptr<T>()) {
    if (t.dim() == 1) {
      sc = t.stride(0);
    } else if (t.dim() == 2) {
      sg = t.size(0) == 1 ? 0 : t.stride(0);
      sc = t.stride(1);
    }
  }
  T operator()(int64_t g, int64_t c) const { return data[g * sg + c * sc]; }
};

template <typename T>
Rows<T> rows_or_empty(const Tensor& t) {
  return t.defined() ? Rows<T>(t) : Rows<T>();
}

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

// ------------------------------------------------------------------------------------------
// Kalman / ghost-batch normalization: y = weight (x - m) / sqrt(v + eps) + bias, with the
// posterior (m, v) of the observed moments and an optional prior (spec 1.1); see the
// docstring of bkn/layers/_function.py for the update and its backward.
struct KalmanOptions {
  int64_t groups;
  double eps, guard, gain, momentum;
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

struct KalmanNorm : public FusedFunction<KalmanNorm> {
  // Optional inputs are std::optional: autograd rejects undefined tensors as inputs.
  static variable_list forward(AutogradContext* ctx, Tensor x, Maybe weight, Maybe bias, Maybe prior_mean,
                               Maybe prior_var, Maybe gain, Maybe obs_mean, Maybe obs_var, Maybe running_mean,
                               Maybe running_var, Maybe steps, KalmanOptions o) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["input_index"] = input_index(
        {true, weight.has_value(), bias.has_value(), prior_mean.has_value(), prior_var.has_value(), gain.has_value(),
         obs_mean.has_value(), obs_var.has_value(), running_mean.has_value(), running_var.has_value(),
         steps.has_value()});
    variable_list out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bkn_kalman_forward", [&] {
      out = forward_impl<scalar_t>(ctx, x, get(weight), get(bias), get(prior_mean), get(prior_var), get(gain),
                                   get(obs_mean), get(obs_var), get(running_mean), get(running_var), get(steps), o);
    });
    return out;
  }

  template <typename T>
  static variable_list forward_impl(AutogradContext* ctx, const Tensor& x_in, const Tensor& weight,
                                    const Tensor& bias, const Tensor& prior_mean, const Tensor& prior_var,
                                    const Tensor& gain, const Tensor& obs_mean_in, const Tensor& obs_var_in,
                                    const Tensor& running_mean, const Tensor& running_var, const Tensor& steps,
                                    const KalmanOptions& o) {
    const Tensor x = take_layout(x_in);
    const Units u(x, o.groups);
    const int64_t G = u.G, C = u.C;
    bool has_prior = prior_mean.defined();

    Tensor obs_mean, obs_var;
    if (obs_mean_in.defined()) {
      obs_mean = obs_mean_in.expand({G, C}).contiguous();
      obs_var = obs_var_in.expand({G, C}).contiguous();
    } else {
      std::tie(obs_mean, obs_var) = unit_moments<T>(x, u);
    }
    const T *mo = obs_mean.data_ptr<T>(), *vo = obs_var.data_ptr<T>();

    // Gain, then the guard of the official code: mean over (G, C) of v_p / v_o >= guard.
    const bool gain_tensor = gain.defined();
    if (has_prior && !gain_tensor && o.gain == 0.0) has_prior = false;
    if (has_prior && std::isfinite(o.guard)) {
      const Rows<T> vp(prior_var);
      double ratio = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) ratio += double(vp(g, c)) / double(vo[g * C + c]);
      if (ratio >= o.guard * double(G * C)) has_prior = false;  // (a NaN ratio fails, as in Python)
    }

    // One (6, G, C) block for the per-unit quantities: posterior mean and var (outputs),
    // inverse std, the normalization's scale and shift, and m_o - m_p.
    Tensor block = at::empty({6, G, C}, obs_mean.options());
    Tensor mean = has_prior ? block[0] : obs_mean, var = has_prior ? block[1] : obs_var;
    Tensor inv_std = block[2], scale = block[3], shift = block[4], diff = block[5];
    T *m = mean.data_ptr<T>(), *v = var.data_ptr<T>(), *is = inv_std.data_ptr<T>(), *sc = scale.data_ptr<T>(),
      *sh = shift.data_ptr<T>(), *d = diff.data_ptr<T>();
    const bool w = weight.defined(), b = bias.defined();
    const Rows<T> wr = rows_or_empty<T>(weight), br = rows_or_empty<T>(bias);
    const Rows<T> mp = rows_or_empty<T>(has_prior ? prior_mean : Tensor());
    const Rows<T> vp = rows_or_empty<T>(has_prior ? prior_var : Tensor());
    const Rows<T> pr = rows_or_empty<T>(gain_tensor ? gain : Tensor());
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = g * C + c;
        if (has_prior) {
          const T p = gain_tensor ? pr(g, c) : T(o.gain);
          d[i] = mo[i] - mp(g, c);
          m[i] = mo[i] - p * d[i];
          v[i] = vo[i] * (1 - p) + vp(g, c) * p + d[i] * d[i] * (p - p * p);
        }
        is[i] = T(1) / std::sqrt(v[i] + T(o.eps));
        sc[i] = w ? is[i] * wr(g, c) : is[i];
        sh[i] = (b ? br(g, c) : T(0)) - m[i] * sc[i];
      }

    if (running_mean.defined()) {  // EMA of the statistics, averaged over groups; var scaled by n / (n - 1)
      T *rm = running_mean.data_ptr<T>(), *rv = running_var.data_ptr<T>();
      const int64_t count = u.count();
      const T f = T(count_step(steps, o.momentum)), unbiased = count > 1 ? T(double(count) / double(count - 1)) : T(1);
      for (int64_t c = 0; c < C; ++c) {
        T sm = 0, sv = 0;
        for (int64_t g = 0; g < G; ++g) sm += m[g * C + c], sv += v[g * C + c];
        rm[c] = rm[c] * (1 - f) + f * (sm / T(G));
        rv[c] = rv[c] * (1 - f) + (f * unbiased) * (sv / T(G));
      }
    }

    // A fresh tensor, never a view of x: callers apply in-place ops to a norm's output.
    Tensor y = unit_affine<T>(x, u, sc, sh);

    // Distinct tensors: the posterior (outputs 1, 2) is differentiable, the observation (3, 4) is
    // not; without a prior they hold the same values. The posterior gets the copies, so that
    // saved_data, which holds plain references, never holds an output of this node: that
    // would be a reference cycle through the output's grad_fn, and the node, with the input
    // it saved, would never be freed (a forward without a backward leaked it).
    if (!has_prior) {
      mean = obs_mean.clone();
      var = obs_var.clone();
    }
    ctx->save_for_backward({x, weight, mean});
    ctx->saved_data["block"] = block;
    ctx->saved_data["obs_mean"] = obs_mean;
    ctx->saved_data["has_prior"] = has_prior;
    ctx->saved_data["groups"] = G;
    ctx->saved_data["bias_sizes"] = bias.defined() ? bias.sizes().vec() : std::vector<int64_t>{};
    if (has_prior) {
      ctx->saved_data["obs_var"] = obs_var;
      ctx->saved_data["prior_var"] = prior_var;
      ctx->saved_data["gain"] = gain_tensor ? gain : at::scalar_tensor(o.gain, obs_mean.options());
      ctx->saved_data["prior_mean_sizes"] = prior_mean.sizes().vec();
    }
    ctx->mark_non_differentiable({obs_mean, obs_var});
    return {y, mean, var, obs_mean, obs_var};
  }

  template <typename T>
  static variable_list backward_impl(AutogradContext* ctx, const variable_list& saved, const variable_list& grads) {
    const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2];
    const Tensor dy = grads[0].defined() ? like_layout(grads[0], x) : Tensor();
    const Tensor dmean_ext = grads[1].defined() ? grads[1].contiguous() : Tensor();
    const Tensor dvar_ext = grads[2].defined() ? grads[2].contiguous() : Tensor();
    const Units u(x, ctx->saved_data["groups"].toInt());
    const int64_t G = u.G, C = u.C;
    const bool has_prior = ctx->saved_data["has_prior"].toBool();
    const Tensor block = ctx->saved_data["block"].toTensor(), obs_mean = ctx->saved_data["obs_mean"].toTensor();

    // Per-unit outputs besides dx: sum(dy), sum(dy xhat), and the prior's three gradients.
    Tensor sums = at::empty({has_prior ? 5 : 2, G, C}, mean.options());
    T *sum_dy = sums[0].data_ptr<T>(), *sum_dy_xhat = sums[1].data_ptr<T>();
    T *dmp = has_prior ? sums[2].data_ptr<T>() : nullptr, *dvp = has_prior ? sums[3].data_ptr<T>() : nullptr,
      *dp = has_prior ? sums[4].data_ptr<T>() : nullptr;
    const T *is = block[2].data_ptr<T>(), *d = block[5].data_ptr<T>(), *mo = obs_mean.data_ptr<T>();
    const Rows<T> wr = rows_or_empty<T>(weight);
    const T* dme = dmean_ext.defined() ? dmean_ext.data_ptr<T>() : nullptr;
    const T* dve = dvar_ext.defined() ? dvar_ext.data_ptr<T>() : nullptr;
    Tensor prior_var, obs_var, gain;
    Rows<T> vp, pr;
    const T* vo = nullptr;
    if (has_prior) {
      prior_var = ctx->saved_data["prior_var"].toTensor();
      obs_var = ctx->saved_data["obs_var"].toTensor();
      gain = ctx->saved_data["gain"].toTensor();
      vp = Rows<T>(prior_var), pr = Rows<T>(gain), vo = obs_var.data_ptr<T>();
    }
    const bool w = weight.defined();
    const double inv_count = 1.0 / double(u.count());

    // Closed-form coefficients (module docstring of bkn/layers/_function.py).
    auto coef = [&](int64_t g, int64_t c, double s1, double s2) {
      const int64_t i = g * C + c;
      const double isv = is[i], wsi = w ? isv * double(wr(g, c)) : isv, s2x = s2 * isv;
      double dmean = -wsi * s1, dvar = -0.5 * wsi * isv * s2x;
      if (dme) dmean += double(dme[i]);
      if (dve) dvar += double(dve[i]);
      double dmo = dmean, dvo = dvar;
      if (has_prior) {
        const double p = pr(g, c), di = d[i], cross = di * dvar * (2 * (p - p * p));
        dmo = dmean * (1 - p) + cross;
        dvo = dvar * (1 - p);
        dmp[i] = T(dmean * p - cross);
        dvp[i] = T(dvar * p);
        dp[i] = T((double(vp(g, c)) - double(vo[i]) + di * di * (1 - 2 * p)) * dvar - di * dmean);
      }
      sum_dy[i] = T(s1);
      sum_dy_xhat[i] = T(s2x);
      const double x_coef = 2 * dvo * inv_count;
      return DxCoefficients{wsi, x_coef, dmo * inv_count - x_coef * double(mo[i])};
    };
    Tensor dx = unit_backward<T>(dy, x, u, mean, needs_grad(ctx, 0), coef);

    variable_list out(12);
    if (dx.defined()) out[0] = dx;
    auto sizes = [&](const char* key) { return ctx->saved_data[key].toIntVector(); };
    if (needs_grad(ctx, 1)) out[1] = reduce_to(sums[1], weight.sizes());
    if (needs_grad(ctx, 2)) out[2] = reduce_to(sums[0], sizes("bias_sizes"));
    if (has_prior) {
      if (needs_grad(ctx, 3)) out[3] = reduce_to(sums[2], sizes("prior_mean_sizes"));
      if (needs_grad(ctx, 4)) out[4] = reduce_to(sums[3], prior_var.sizes());
      if (needs_grad(ctx, 5)) out[5] = reduce_to(sums[4], gain.sizes());
    }
    return out;
  }
};

std::vector<Tensor> kalman_norm(const Tensor& x, Maybe weight, Maybe bias, Maybe prior_mean, Maybe prior_var,
                                Maybe gain_tensor, double gain, Maybe obs_mean, Maybe obs_var, int64_t groups,
                                double eps, double guard, Maybe running_mean, Maybe running_var, Maybe steps,
                                double momentum) {
  if (!compiled_path_takes(x, {&weight, &bias, &prior_mean, &prior_var, &gain_tensor, &obs_mean, &obs_var,
                               &running_mean, &running_var}, steps))
    return {};
  KalmanOptions o{groups, eps, guard, gain, momentum};
  return KalmanNorm::apply(x, weight, bias, prior_mean, prior_var, gain_tensor, obs_mean, obs_var, running_mean,
                           running_var, steps, o);
}

// ------------------------------------------------------------------------------------------
// Batch Renormalization, one group (spec 2): with the constant corrections r, d the output is
// batch normalization with the affine (gamma r, beta + gamma d); see bkn/layers/_renorm_function.py.
// Returns (y, m_o, sigma_B, r, d).
struct Renorm : public FusedFunction<Renorm> {
  static variable_list forward(AutogradContext* ctx, Tensor x, Maybe weight, Maybe bias, Tensor running_mean,
                               Tensor running_std, Tensor running_var, Tensor steps, double momentum, double rmax,
                               double dmax, double eps) {
    ctx->saved_data["input_index"] =
        input_index({true, weight.has_value(), bias.has_value(), true, true, true, true});
    const double factor = count_step(steps, momentum);
    variable_list out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bkn_renorm_forward", [&] {
      out = forward_impl<scalar_t>(ctx, x, get(weight), get(bias), running_mean, running_std, running_var, rmax,
                                   dmax, factor, eps);
    });
    return out;
  }

  template <typename T>
  static variable_list forward_impl(AutogradContext* ctx, const Tensor& x_in, const Tensor& weight,
                                    const Tensor& bias, const Tensor& running_mean, const Tensor& running_std,
                                    const Tensor& running_var, double rmax, double dmax, double factor, double eps) {
    const Tensor x = take_layout(x_in);
    const Units u(x, 1);
    const int64_t C = u.C;
    Tensor obs_mean, obs_var;
    std::tie(obs_mean, obs_var) = unit_moments<T>(x, u);
    // Rows: sigma_B, 1 / sigma_B, r, d, scale, shift of the normalization (y = scale x + shift).
    Tensor block = at::empty({6, 1, C}, obs_mean.options());
    const T *m = obs_mean.data_ptr<T>(), *v = obs_var.data_ptr<T>();
    T *sb = block[0].data_ptr<T>(), *is = block[1].data_ptr<T>(), *pr = block[2].data_ptr<T>(),
      *pd = block[3].data_ptr<T>(), *sc = block[4].data_ptr<T>(), *sh = block[5].data_ptr<T>();
    const T* w = weight.defined() ? weight.data_ptr<T>() : nullptr;
    const T* b = bias.defined() ? bias.data_ptr<T>() : nullptr;
    T *mu = running_mean.data_ptr<T>(), *sigma = running_std.data_ptr<T>(), *rv = running_var.data_ptr<T>();
    const T f = T(factor), lo_r = T(1.0 / rmax), hi_r = T(rmax), hi_d = T(dmax);
    for (int64_t c = 0; c < C; ++c) {
      sb[c] = std::sqrt(v[c] + T(eps));
      is[c] = T(1) / sb[c];
      const T dm = m[c] - mu[c];
      pr[c] = std::min(std::max(sb[c] / sigma[c], lo_r), hi_r);
      pd[c] = std::min(std::max(dm / sigma[c], -hi_d), hi_d);
      mu[c] += f * dm;  // running estimates: mu towards m_o, sigma towards sigma_B
      sigma[c] = sigma[c] * (1 - f) + sb[c] * f;
      rv[c] = sigma[c] * sigma[c] - T(eps);
      const T gamma = w ? w[c] : T(1), beta = b ? b[c] : T(0);
      sc[c] = gamma * pr[c] * is[c];
      sh[c] = beta + gamma * pd[c] - m[c] * sc[c];
    }
    Tensor y = unit_affine<T>(x, u, sc, sh);
    ctx->save_for_backward({x, weight, obs_mean});
    ctx->saved_data["block"] = block;
    Tensor mean = obs_mean[0], std_b = block[0][0].clone(), r = block[2][0].clone(), d = block[3][0].clone();
    ctx->mark_non_differentiable({mean, std_b, r, d});
    return {y, mean, std_b, r, d};
  }

  // Batch normalization's backward with the weight gamma r (r, d constant), then
  // dgamma = r sum(dy xhat) + d sum(dy), dbeta = sum(dy).
  template <typename T>
  static variable_list backward_impl(AutogradContext* ctx, const variable_list& saved, const variable_list& grads) {
    variable_list out(11);
    if (!grads[0].defined()) return out;
    const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2];
    const Tensor dy = like_layout(grads[0], x);
    const Units u(x, 1);
    const Tensor block = ctx->saved_data["block"].toTensor();
    const T *is = block[1].data_ptr<T>(), *pr = block[2].data_ptr<T>();
    const T* w = weight.defined() ? weight.data_ptr<T>() : nullptr;
    Tensor sums = at::empty({2, u.C}, mean.options());  // dbeta = sum(dy), dgamma
    T *sum_dy = sums[0].data_ptr<T>(), *dgamma = sums[1].data_ptr<T>();
    const T* pd = block[3].data_ptr<T>();
    const double inv_count = 1.0 / double(u.count());
    const T* mo = mean.data_ptr<T>();
    auto coef = [&](int64_t, int64_t c, double s1, double s2) {
      const double isv = is[c], wsi = (w ? double(w[c]) : 1.0) * double(pr[c]) * isv, s2x = s2 * isv;
      sum_dy[c] = T(s1);
      dgamma[c] = T(double(pr[c]) * s2x + double(pd[c]) * s1);
      const double dmean = -wsi * s1, dvar = -0.5 * wsi * isv * s2x, x_coef = 2 * dvar * inv_count;
      return DxCoefficients{wsi, x_coef, dmean * inv_count - x_coef * double(mo[c])};
    };
    Tensor dx = unit_backward<T>(dy, x, u, mean, needs_grad(ctx, 0), coef);
    if (dx.defined()) out[0] = dx;
    if (needs_grad(ctx, 1)) out[1] = sums[1];
    if (needs_grad(ctx, 2)) out[2] = sums[0];
    return out;
  }
};

std::vector<Tensor> renorm(const Tensor& x, Maybe weight, Maybe bias, const Tensor& running_mean,
                           const Tensor& running_std, const Tensor& running_var, const Tensor& steps,
                           double momentum, double rmax, double dmax, double eps) {
  const Maybe mu(running_mean), sigma(running_std), var(running_var), count(steps);
  if (!compiled_path_takes(x, {&weight, &bias, &mu, &sigma, &var}, count)) return {};
  return Renorm::apply(x, weight, bias, running_mean, running_std, running_var, steps, momentum, rmax, dmax, eps);
}


// -- the analytic transition's convolution weight tap sums (bkn/transitions/analytic.py) ---------
//
// For a contiguous weight W viewed as (R = O * I/groups, K = kernel taps):
//   forward:  s1[r] = sum_k W[r, k], s2[r] = sum_k W[r, k]^2, one read of W (the Python path
//             reads it three times and writes a squared copy);
//   backward: dW[r, k] = g1[r] + 2 W[r, k] g2[r] (addcmul's formula, the same rounding),
//             one read of W and one write of dW.
// Rows are split over threads with at::parallel_for. Sums accumulate in the weight's dtype
// in tap order (K is a kernel's taps: 9 for 3x3).
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
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// For the loops that also use fused multiply-adds.
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

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

template <typename T>
std::vector<Tensor> tap_sums_impl(const Tensor& w, int64_t R, int64_t K) {
  Tensor s1 = at::empty({R}, w.options()), s2 = at::empty({R}, w.options());
  const T* pw = w.data_ptr<T>();
  T *p1 = s1.data_ptr<T>(), *p2 = s2.data_ptr<T>();
  at::parallel_for(0, R, 4096, [&](int64_t begin, int64_t end) { tap_sums_range<T>(pw, p1, p2, begin, end, K); });
  return {s1, s2};
}

template <typename T>
Tensor tap_sums_backward_impl(const Tensor& w, const Tensor& g1, const Tensor& g2, int64_t R, int64_t K) {
  Tensor dw = at::empty_like(w, at::MemoryFormat::Contiguous);
  const T *pw = w.data_ptr<T>(), *p1 = g1.data_ptr<T>(), *p2 = g2.data_ptr<T>();
  T* pd = dw.data_ptr<T>();
  at::parallel_for(0, R, 4096 / std::max<int64_t>(K, 1) + 1,
                   [&](int64_t begin, int64_t end) { tap_grad_range<T>(pw, p1, p2, nullptr, pd, begin, end, K); });
  return dw;
}

bool tap_sums_takes(const Tensor& w, std::initializer_list<const Tensor*> others) {
  if (w.device().type() != at::kCPU || !w.is_contiguous() || w.dim() < 3) return false;
  if (w.scalar_type() != at::kFloat && w.scalar_type() != at::kDouble) return false;
  for (const Tensor* t : others) {
    if (t->device().type() != at::kCPU || t->scalar_type() != w.scalar_type() || !t->is_contiguous()) return false;
    if (t->numel() != w.size(0) * w.size(1)) return false;
  }
  return true;
}

// (sum_taps W, sum_taps W^2), each (O, I/groups), or [] when these tensors take the Python path.
std::vector<Tensor> tap_sums(const Tensor& w) {
  if (!tap_sums_takes(w, {})) return {};
  at::NoGradGuard no_grad;
  const int64_t R = w.size(0) * w.size(1), K = R ? w.numel() / R : 0;
  auto out = AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "tap_sums", [&] { return tap_sums_impl<scalar_t>(w, R, K); });
  return {out[0].view({w.size(0), w.size(1)}), out[1].view({w.size(0), w.size(1)})};
}

// dW = g1 + 2 W g2 (g1, g2 of shape (O, I/groups) broadcast over the taps), or an undefined
// tensor when these tensors take the Python path.
Tensor tap_sums_backward(const Tensor& w, const Tensor& g1, const Tensor& g2) {
  if (!tap_sums_takes(w, {&g1, &g2})) return Tensor();
  at::NoGradGuard no_grad;
  const int64_t R = w.size(0) * w.size(1), K = R ? w.numel() / R : 0;
  return AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "tap_sums_backward",
                                    [&] { return tap_sums_backward_impl<scalar_t>(w, g1, g2, R, K); });
}

// Groups at most for the fused convolution rule below: for many groups the per-channel
// products (G axpys per output channel) cost more than they save, and the caller forms
// dS1, dS2 with matrix products instead.
constexpr int64_t MAX_FUSED_GROUPS = 16;

// CPU memory for the convolution rule's weight gradients and tap sums, kept for reuse: a
// small caching allocator (c10::Allocator, so its tensors are ordinary CPU tensors).
//
// The rule's dW is as large as the network's convolution weights (45 MB for ResNet-18) and
// is allocated afresh in every backward; autograd adds the convolution's own dW into it and
// it becomes the weight's .grad, which the optimizer's zero_grad frees. glibc hands blocks
// of that size back to the kernel when they are freed, so every page faults again on the
// next first touch. In a ResNet-18 step (batch 8 in groups of 2, 2 threads) the analytic
// transition took 10,300 minor page faults per step without this pool and 7,000 with it
// (means of 4 processes each; torch BN alone: 4,300-10,500), and its step ratio to torch
// BN, in three batches of alternating processes (6, 10 and 10 each), had medians 1.085,
// 1.10 and 1.11 with it against 1.11, 1.165 and 1.12 without (a noisy machine: single
// processes ranged 0.98-1.20). A freed block goes back to a free list per size (at most
// POOL_BYTES in all, the rest is freed) and the next allocation of that size reuses it; a
// block is reused only after its storage is released, so no two live tensors share memory.
// The memory stays with the process (bkn.layers._native.release_cached frees it), as with
// torch's own CUDA caching allocator.
constexpr size_t POOL_BYTES = size_t(512) << 20;
constexpr size_t POOL_HEADER = 64;  // the block's size, stored in front of the data (keeps 64-byte alignment)

struct BlockPool {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free;  // block size -> blocks (header included)
  size_t cached = 0;
};

void pool_after_fork_in_child();

BlockPool& block_pool() {
  static auto* pool = [] {
    // A child forked while another thread held the mutex would wait on it forever: the child
    // starts with an empty pool (the parent's blocks stay the parent's).
    pthread_atfork(nullptr, nullptr, &pool_after_fork_in_child);
    return new BlockPool();  // never destroyed: tensors may be freed during exit
  }();
  return *pool;
}

void pool_after_fork_in_child() { new (&block_pool()) BlockPool(); }

void pool_release(void* data) {
  void* block = static_cast<char*>(data) - POOL_HEADER;
  const size_t bytes = *static_cast<size_t*>(block);
  BlockPool& pool = block_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (pool.cached + bytes <= POOL_BYTES) {
      pool.free[bytes].push_back(block);
      pool.cached += bytes;
      return;
    }
  }
  std::free(block);
}

struct PoolAllocator final : at::Allocator {
  at::DataPtr allocate(size_t n) override {
    const size_t bytes = POOL_HEADER + (n + 63) / 64 * 64;
    void* block = nullptr;
    BlockPool& pool = block_pool();
    {
      std::lock_guard<std::mutex> lock(pool.mutex);
      auto it = pool.free.find(bytes);
      if (it != pool.free.end() && !it->second.empty()) {
        block = it->second.back();
        it->second.pop_back();
        pool.cached -= bytes;
      }
    }
    if (block == nullptr) block = std::aligned_alloc(64, bytes);
    TORCH_CHECK(block != nullptr, "bkn: out of memory allocating ", n, " bytes");
    *static_cast<size_t*>(block) = bytes;
    void* data = static_cast<char*>(block) + POOL_HEADER;
    return {data, data, &pool_release, at::Device(at::kCPU)};
  }
  at::DeleterFnPtr raw_deleter() const override { return &pool_release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// An uninitialised contiguous CPU tensor of these sizes and w's dtype, from the pool.
Tensor pooled_empty(at::IntArrayRef sizes, const Tensor& like) {
  static PoolAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), std::nullopt);
}

// How many bytes the pool holds for reuse.
int64_t pool_cached_bytes() {
  BlockPool& pool = block_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  return static_cast<int64_t>(pool.cached);
}

// Frees the blocks the pool holds (tensors in use are not touched); returns the bytes freed.
int64_t pool_release_cached() {
  BlockPool& pool = block_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  const auto freed = static_cast<int64_t>(pool.cached);
  for (auto& [bytes, blocks] : pool.free)
    for (void* block : blocks) std::free(block);
  pool.free.clear();
  pool.cached = 0;
  return freed;
}

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

// (mean @ S1^T, var @ S2^T, S1, S2), or [] for the Python path.
std::vector<Tensor> conv_moments_forward(const Tensor& w, const Tensor& mean, const Tensor& var) {
  if (!conv_moments_takes(w, {{&mean, w.size(1)}, {&var, w.size(1)}})) return {};
  at::NoGradGuard no_grad;
  return AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "conv_moments_forward",
                                    [&] { return conv_moments_forward_impl<scalar_t>(w, mean, var); });
}

// Whether the rule's backward takes W (O, I, *k), the (G, O) gradients and the (G, I) moments.
bool conv_moments_backward_takes(const Tensor& w, const Tensor& g_mean, const Tensor& mean, const Tensor& g_var,
                                 const Tensor& var) {
  const int64_t O = w.dim() >= 2 ? w.size(0) : -1, I = w.dim() >= 2 ? w.size(1) : -1;
  return conv_moments_takes(w, {{&mean, I}, {&g_mean, O}, {&var, I}, {&g_var, O}});
}

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

// -- the analytic transition's ReLU moments (bkn/transitions/analytic.py, _ReluMoments) -----------
//
// The rectified-Gaussian formula and its closed-form backward, elementwise over the (G, C)
// moments, in one loop each instead of some twenty tensor operations (a microsecond or more
// of dispatch each, on tensors of a few hundred values). The operations are those of the
// Python Function in the same order; erf and exp are the C library's (equal up to rounding).
constexpr double RELU_VAR_FLOOR = 1e-20;  // _VAR_FLOOR

// The rectified Gaussian's moments at one (group, channel), and what its backward needs.
template <typename T>
struct Rectified {
  T s, cdf, pdf, first, raw;
  Rectified(T m, T v) {
    const T sqrt2 = T(std::sqrt(2.0)), inv_sqrt2pi = T(1.0 / std::sqrt(2.0 * M_PI));
    s = std::sqrt(std::max(v, T(RELU_VAR_FLOOR)));  // NaN stays NaN, as clamp_min
    const T a = m / s;
    cdf = T(0.5) * (T(1) + std::erf(a / sqrt2));
    pdf = std::exp(T(-0.5) * a * a) * inv_sqrt2pi;
    first = m * cdf + s * pdf;
    const T second = (m * m + v) * cdf + m * s * pdf;
    raw = second - first * first;
  }
};

// (d mean, d var) of the rectified Gaussian at one (group, channel) from its saved values.
template <typename T>
inline std::pair<T, T> rectified_backward(T g_first, T g_var, T m, T v, T s, T cdf, T pdf, T first, T raw) {
  const T gv = g_var * T(raw > 0);  // no gradient where the variance was clamped
  const T ds_dv = T(v > T(RELU_VAR_FLOOR)) / (T(2) * s);
  const T d_second_d_mean = T(2) * m * cdf + s * pdf + v * pdf / s;
  const T d_mean = g_first * cdf + gv * (d_second_d_mean - T(2) * first * cdf);
  const T d_var = (g_first - T(2) * gv * first) * pdf * ds_dv + gv * cdf;
  return {d_mean, d_var};
}

bool relu_moments_takes(std::initializer_list<const Tensor*> ts) {
  const Tensor& first = **ts.begin();
  if (first.device().type() != at::kCPU) return false;
  if (first.scalar_type() != at::kFloat && first.scalar_type() != at::kDouble) return false;
  for (const Tensor* t : ts) {
    if (!t->defined() || t->device().type() != at::kCPU || t->scalar_type() != first.scalar_type()) return false;
    if (!t->is_contiguous() || !t->sizes().equals(first.sizes())) return false;
  }
  return true;
}

// (first, var_out, std, cdf, pdf, raw), or [] for the Python path.
std::vector<Tensor> relu_moments_forward(const Tensor& mean, const Tensor& var) {
  if (!relu_moments_takes({&mean, &var})) return {};
  at::NoGradGuard no_grad;
  std::vector<Tensor> out;
  for (int i = 0; i < 6; ++i) out.push_back(at::empty_like(mean, at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "relu_moments_forward", [&] {
    using T = scalar_t;
    const T *pm = mean.data_ptr<T>(), *pv = var.data_ptr<T>();
    T *first = out[0].data_ptr<T>(), *vout = out[1].data_ptr<T>(), *ps = out[2].data_ptr<T>(),
      *pc = out[3].data_ptr<T>(), *pp = out[4].data_ptr<T>(), *pr = out[5].data_ptr<T>();
    const int64_t n = mean.numel();
    for (int64_t i = 0; i < n; ++i) {
      const Rectified<T> r(pm[i], pv[i]);
      first[i] = r.first;
      vout[i] = std::max(r.raw, T(0));
      ps[i] = r.s;
      pc[i] = r.cdf;
      pp[i] = r.pdf;
      pr[i] = r.raw;
    }
  });
  return out;
}

// (grad_mean, grad_var), or [] for the Python path.
std::vector<Tensor> relu_moments_backward(const Tensor& g_first, const Tensor& g_var, const Tensor& mean,
                                          const Tensor& var, const Tensor& std_, const Tensor& cdf,
                                          const Tensor& pdf, const Tensor& first, const Tensor& raw) {
  if (!relu_moments_takes({&mean, &g_first, &g_var, &var, &std_, &cdf, &pdf, &first, &raw})) return {};
  at::NoGradGuard no_grad;
  Tensor grad_mean = at::empty_like(mean, at::MemoryFormat::Contiguous);
  Tensor grad_var = at::empty_like(mean, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "relu_moments_backward", [&] {
    using T = scalar_t;
    const T *gf = g_first.data_ptr<T>(), *gv0 = g_var.data_ptr<T>(), *pm = mean.data_ptr<T>(),
            *pv = var.data_ptr<T>(), *ps = std_.data_ptr<T>(), *pc = cdf.data_ptr<T>(), *pp = pdf.data_ptr<T>(),
            *pf = first.data_ptr<T>(), *pr = raw.data_ptr<T>();
    T *dm = grad_mean.data_ptr<T>(), *dv = grad_var.data_ptr<T>();
    const int64_t n = mean.numel();
    for (int64_t i = 0; i < n; ++i) {
      std::tie(dm[i], dv[i]) = rectified_backward(gf[i], gv0[i], pm[i], pv[i], ps[i], pc[i], pp[i], pf[i], pr[i]);
    }
  });
  return {grad_mean, grad_var};
}

// -- ReLU of a norm's affine output, plus optional moments added before it ---------------------------
// (bkn/transitions/analytic.py, _NormReluMoments): mean = beta (+ extra_mean), variance =
// gamma^2 v / (v + eps) (+ extra_var), then the rectified Gaussian above, in one loop; the
// backward likewise. The operations are those of the Python Function in the same order.
bool norm_relu_takes(const Tensor& var, const Tensor& weight, const Tensor& bias, const Maybe& extra_mean,
                     const Maybe& extra_var) {
  if (!relu_moments_takes({&var}) || var.dim() != 2) return false;
  const int64_t G = var.size(0), C = var.size(1);
  for (const Tensor* t : {&weight, &bias}) {
    if (t->device().type() != at::kCPU || t->scalar_type() != var.scalar_type() || t->dim() != 1 || t->size(0) != C)
      return false;
  }
  if (extra_mean.has_value() != extra_var.has_value()) return false;
  for (const Maybe* m : {&extra_mean, &extra_var}) {
    if (!m->has_value()) continue;
    const Tensor& t = **m;
    if (t.device().type() != at::kCPU || t.scalar_type() != var.scalar_type()) return false;
    const bool rows = t.dim() == 2 && (t.size(0) == 1 || t.size(0) == G) && t.size(1) == C;
    const bool ok = (t.dim() == 1 && t.size(0) == C) || rows;
    if (!ok) return false;
  }
  return true;
}

// (first, var_out, mean_in, var_in, std, cdf, pdf, raw, normalized), or [] for the Python path.
std::vector<Tensor> norm_relu_moments_forward(const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                                              Maybe extra_mean, Maybe extra_var) {
  if (!norm_relu_takes(var, weight, bias, extra_mean, extra_var)) return {};
  at::NoGradGuard no_grad;
  std::vector<Tensor> out;
  for (int i = 0; i < 9; ++i) out.push_back(at::empty_like(var, at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "norm_relu_moments_forward", [&] {
    using T = scalar_t;
    const T* pvar = var.data_ptr<T>();
    const Rows<T> w(weight), b(bias), em = rows_or_empty<T>(get(extra_mean)), ev = rows_or_empty<T>(get(extra_var));
    const bool extra = extra_mean.has_value();
    T *first = out[0].data_ptr<T>(), *vout = out[1].data_ptr<T>(), *pm = out[2].data_ptr<T>(),
      *pv = out[3].data_ptr<T>(), *ps = out[4].data_ptr<T>(), *pc = out[5].data_ptr<T>(), *pp = out[6].data_ptr<T>(),
      *pr = out[7].data_ptr<T>(), *pn = out[8].data_ptr<T>();
    const T e = T(eps);
    const int64_t G = var.size(0), C = var.size(1);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = g * C + c;
        const T normalized = pvar[i] / (pvar[i] + e);
        const T wc = w(0, c);
        T m = b(0, c), v = (wc * wc) * normalized;
        if (extra) {
          m = m + em(g, c);
          v = v + ev(g, c);
        }
        const Rectified<T> r(m, v);
        first[i] = r.first;
        vout[i] = std::max(r.raw, T(0));
        pm[i] = m;
        pv[i] = v;
        ps[i] = r.s;
        pc[i] = r.cdf;
        pp[i] = r.pdf;
        pr[i] = r.raw;
        pn[i] = normalized;
      }
    }
  });
  return out;
}

// (d var, d weight, d bias, d mean_in, d var_in) from the forward's saved values; d mean_in and
// d var_in are the gradients of the added moments (per (group, channel)). [] for the Python path.
std::vector<Tensor> norm_relu_moments_backward(const Tensor& g_first, const Tensor& g_var,
                                               const std::vector<Tensor>& saved, const Tensor& var,
                                               const Tensor& weight, double eps) {
  if (saved.size() != 8) return {};
  const Tensor &mean_in = saved[0], &var_in = saved[1], &std_ = saved[2], &cdf = saved[3], &pdf = saved[4],
               &first = saved[5], &raw = saved[6], &normalized = saved[7];
  if (!relu_moments_takes({&var, &g_first, &g_var, &mean_in, &var_in, &std_, &cdf, &pdf, &first, &raw, &normalized}))
    return {};
  if (var.dim() != 2 || weight.dim() != 1 || weight.size(0) != var.size(1) || weight.scalar_type() != var.scalar_type())
    return {};
  at::NoGradGuard no_grad;
  const int64_t G = var.size(0), C = var.size(1);
  Tensor d_var = at::empty_like(var, at::MemoryFormat::Contiguous), d_mean_in = at::empty_like(d_var),
         d_var_in = at::empty_like(d_var);
  Tensor d_weight = at::zeros({C}, var.options()), d_bias = at::zeros({C}, var.options());
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "norm_relu_moments_backward", [&] {
    using T = scalar_t;
    const T *gf = g_first.data_ptr<T>(), *gv0 = g_var.data_ptr<T>(), *pm = mean_in.data_ptr<T>(),
            *pv = var_in.data_ptr<T>(), *ps = std_.data_ptr<T>(), *pc = cdf.data_ptr<T>(), *pp = pdf.data_ptr<T>(),
            *pf = first.data_ptr<T>(), *pr = raw.data_ptr<T>(), *pn = normalized.data_ptr<T>(),
            *pvar = var.data_ptr<T>();
    const Rows<T> w(weight);
    T *dv = d_var.data_ptr<T>(), *dmi = d_mean_in.data_ptr<T>(), *dvi = d_var_in.data_ptr<T>(),
      *dw = d_weight.data_ptr<T>(), *db = d_bias.data_ptr<T>();
    const T e = T(eps);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = g * C + c;
        const auto [d_m, d_s2] = rectified_backward(gf[i], gv0[i], pm[i], pv[i], ps[i], pc[i], pp[i], pf[i], pr[i]);
        dmi[i] = d_m;
        dvi[i] = d_s2;
        const T wc = w(0, c), ve = pvar[i] + e;
        dv[i] = d_s2 * (wc * wc) * (e / (ve * ve));
        dw[c] += d_s2 * pn[i];  // sum over groups, times 2 gamma below
        db[c] += d_m;
      }
    }
    for (int64_t c = 0; c < C; ++c) dw[c] = T(2) * w(0, c) * dw[c];
  });
  return {d_var, d_weight, d_bias, d_mean_in, d_var_in};
}

// A new autograd node held as torch holds them (std::shared_ptr, or c10::intrusive_ptr in newer torch).
template <typename Pointer>
struct NodePointer;
template <typename N>
struct NodePointer<std::shared_ptr<N>> {
  template <typename T, typename... Args>
  static std::shared_ptr<N> make(Args&&... args) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
};
template <typename N>
struct NodePointer<c10::intrusive_ptr<N>> {
  template <typename T, typename... Args>
  static c10::intrusive_ptr<N> make(Args&&... args) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
};

// The ReLU moments of a norm's affine output (plus extra moments) as one C++ autograd node:
// the kernels above, without the Python autograd Function around them (about 9 us a node, forward
// and backward, at 4x256). Like the Python Function
// (_NormReluMoments, once_differentiable) its backward is not differentiable again: under
// create_graph its gradients hang on an Error node, which raises if a double backward reaches it.
struct NormReluMomentsFn : public torch::autograd::Function<NormReluMomentsFn> {
  static variable_list forward(AutogradContext* ctx, Tensor var, Tensor weight, Tensor bias, Maybe extra_mean,
                               Maybe extra_var, double eps) {
    ctx->saved_data["input_index"] = input_index({true, true, true, extra_mean.has_value(), extra_var.has_value()});
    ctx->saved_data["eps"] = eps;
    auto out = norm_relu_moments_forward(var, weight, bias, eps, extra_mean, extra_var);
    // first, relu_var, then what the backward reads: mean_in, var_in, std, cdf, pdf, raw, normalized
    // (not inputs or outputs, none requires grad); first is an output (saved as one: no cycle).
    ctx->save_for_backward({var, weight, out[0]});
    ctx->saved_data["parts"] = std::vector<Tensor>{out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
    return {out[0], out[1]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto parts = ctx->saved_data["parts"].toTensorVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor g_first = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(saved[2]);
    const Tensor g_var = grads[1].defined() ? grads[1].contiguous() : at::zeros_like(saved[2]);
    // saved order of norm_relu_moments_backward: mean_in, var_in, std, cdf, pdf, first, raw, normalized
    const std::vector<Tensor> relu_saved{parts[0], parts[1], parts[2], parts[3],
                                         parts[4], saved[2], parts[5], parts[6]};
    auto g = norm_relu_moments_backward(g_first, g_var, relu_saved, saved[0], saved[1], eps);
    TORCH_CHECK(!g.empty(), "bkn: the compiled ReLU moments' backward refused its gradients");
    std::vector<Tensor> out(6);
    for (int64_t a = 0; a < 5; ++a)
      if (needs_grad(ctx, a)) out[a] = g[a];
    if (at::GradMode::is_enabled()) {  // create_graph: these gradients are not differentiable again
      return torch::autograd::wrap_outputs(grads, std::move(out), [](torch::autograd::edge_list&& next) {
        return NodePointer<torch::autograd::function_constructor::result_type>::make<torch::autograd::Error>(
            "bkn: the analytic transition's ReLU moments are differentiable once (their backward is a compiled "
            "kernel): a double backward through a BKN prior is not supported; build the prior with "
            "detach_prior=True",
            std::move(next));
      });
    }
    return out;
  }
};

// (first, relu_var) as one autograd node, or [] for the Python path (tensors the kernels do not take).
std::vector<Tensor> norm_relu_moments(const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                                      Maybe extra_mean, Maybe extra_var) {
  if (!norm_relu_takes(var, weight, bias, extra_mean, extra_var)) return {};
  return NormReluMomentsFn::apply(var, weight, bias, extra_mean, extra_var, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bkn: fused training-mode kernels of the batch-statistic norms (CPU, float32/float64)";
  m.def("kalman_norm", &kalman_norm,
        "Kalman / ghost-batch normalization: (y, mean, var, obs_mean, obs_var), or [] for the Python path");
  m.def("renorm", &renorm, "Batch Renormalization, one group: (y, m_o, sigma_B, r, d), or [] for the Python path");
  m.def("tap_sums", &tap_sums, "(sum_taps W, sum_taps W^2) of a conv weight, or [] for the Python path");
  m.def("tap_sums_backward", &tap_sums_backward, "g1 + 2 W g2 over a conv weight, or None for the Python path");
  m.def("relu_moments_forward", &relu_moments_forward,
        "ReLU moments: (first, var, std, cdf, pdf, raw), or [] for the Python path");
  m.def("relu_moments_backward", &relu_moments_backward, "ReLU moments' backward, or [] for the Python path");
  m.def("conv_moments_forward", &conv_moments_forward,
        "the analytic convolution rule (mean @ S1^T, var @ S2^T) in one pass, or [] for the Python path");
  m.def("norm_relu_moments", &norm_relu_moments,
        "ReLU moments of a norm's output (plus extra moments) as one C++ autograd node, or [] for the Python path");
  m.def("norm_relu_moments_forward", &norm_relu_moments_forward,
        "ReLU moments of a norm's affine output (plus added moments), or [] for the Python path");
  m.def("norm_relu_moments_backward", &norm_relu_moments_backward, "its backward, or [] for the Python path");
  m.def("conv_moments_weight_grad", &conv_moments_weight_grad,
        "base + the convolution rule's weight gradient in one pass (into base itself with in_place), or None for "
        "the Python path",
        py::arg("w"), py::arg("g_mean"), py::arg("mean"), py::arg("g_var"), py::arg("var"), py::arg("base"),
        py::arg("in_place") = false);
  m.def("conv_moments_backward", &conv_moments_backward,
        "its backward (dW, d mean, d var) in one pass over the weight, or [] for the Python path");
  m.def("pool_cached_bytes", &pool_cached_bytes, "bytes of freed weight-gradient memory kept for reuse");
  m.def("pool_release_cached", &pool_release_cached, "free the memory kept for reuse; returns the bytes freed");
}
