// -- the analytic transition's ReLU moments (bkn/transitions/analytic.py, _ReluMoments) -----------
//
// The rectified-Gaussian formula and its closed-form backward, elementwise over the (G, C)
// moments, in one loop each instead of some twenty tensor operations (a microsecond or more
// of dispatch each, on tensors of a few hundred values). The operations are those of the
// Python Function in the same order; erf and exp are the C library's (equal up to rounding).
//
// Also the ReLU of a norm's affine output (norm_relu_moments, _NormReluMoments), below.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include "_native.h"

namespace bkn {
namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

// (first, relu_var) as one autograd node, or [] for the Python path (tensors the kernels do not take).
std::vector<Tensor> norm_relu_moments(const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                                      Maybe extra_mean, Maybe extra_var) {
  if (!norm_relu_takes(var, weight, bias, extra_mean, extra_var)) return {};
  return NormReluMomentsFn::apply(var, weight, bias, extra_mean, extra_var, eps);
}

}  // namespace bkn
