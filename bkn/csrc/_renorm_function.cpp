// Batch Renormalization as a C++ autograd Function (renorm): the compiled twin of
// bkn/layers/_renorm_function.py (Renorm). Its shared machinery is in _units.h.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include "_native.h"
#include "_units.h"

namespace bkn {
namespace {

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

}  // namespace

std::vector<Tensor> renorm(const Tensor& x, Maybe weight, Maybe bias, const Tensor& running_mean,
                           const Tensor& running_std, const Tensor& running_var, const Tensor& steps,
                           double momentum, double rmax, double dmax, double eps) {
  const Maybe mu(running_mean), sigma(running_std), var(running_var), count(steps);
  if (!compiled_path_takes(x, {&weight, &bias, &mu, &sigma, &var}, count)) return {};
  return Renorm::apply(x, weight, bias, running_mean, running_std, running_var, steps, momentum, rmax, dmax, eps);
}

}  // namespace bkn
