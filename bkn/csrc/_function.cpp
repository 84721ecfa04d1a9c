// Kalman / ghost-batch normalization as a C++ autograd Function (kalman_norm): the compiled
// twin of bkn/layers/_function.py (_NormalizeWithStats). Its shared machinery is in _units.h.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include "_native.h"
#include "_units.h"

namespace bkn {
namespace {

// ------------------------------------------------------------------------------------------
// Kalman / ghost-batch normalization: y = weight (x - m) / sqrt(v + eps) + bias, with the
// posterior (m, v) of the observed moments and an optional prior (spec 1.1); see the
// docstring of bkn/layers/_function.py for the update and its backward.
struct KalmanOptions {
  int64_t groups;
  double eps, guard, gain, momentum;
};

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

}  // namespace

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

}  // namespace bkn
