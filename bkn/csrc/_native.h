// The entry points of the compiled kernels, one translation unit per family, bound into one
// Python module by _native.cpp (bkn/layers/_native.py builds all sources as one extension).
// Each returns [] (or an undefined tensor) for tensors it does not take: the caller then runs
// the Python Function.
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#pragma once

#include "_common.h"

namespace bkn {

// _function.cpp (bkn/layers/_function.py): Kalman / ghost-batch normalization.
std::vector<Tensor> kalman_norm(const Tensor& x, Maybe weight, Maybe bias, Maybe prior_mean, Maybe prior_var,
                                Maybe gain_tensor, double gain, Maybe obs_mean, Maybe obs_var, int64_t groups,
                                double eps, double guard, Maybe running_mean, Maybe running_var, Maybe steps,
                                double momentum);

// _renorm_function.cpp (bkn/layers/_renorm_function.py): Batch Renormalization, one group.
std::vector<Tensor> renorm(const Tensor& x, Maybe weight, Maybe bias, const Tensor& running_mean,
                           const Tensor& running_std, const Tensor& running_var, const Tensor& steps,
                           double momentum, double rmax, double dmax, double eps);

// analytic_tap_sums.cpp (bkn/transitions/analytic.py, tap_sums).
std::vector<Tensor> tap_sums(const Tensor& w);
Tensor tap_sums_backward(const Tensor& w, const Tensor& g1, const Tensor& g2);

// analytic_conv_moments.cpp (bkn/transitions/analytic.py, conv_moments; weight_grads.py).
std::vector<Tensor> conv_moments_forward(const Tensor& w, const Tensor& mean, const Tensor& var);
std::vector<Tensor> conv_moments_backward(const Tensor& w, const Tensor& g_mean, const Tensor& mean,
                                          const Tensor& g_var, const Tensor& var, const Tensor& s1,
                                          const Tensor& s2, bool weight_grad, bool input_grads);
Tensor conv_moments_weight_grad(const Tensor& w, const Tensor& g_mean, const Tensor& mean, const Tensor& g_var,
                                const Tensor& var, const Tensor& base, bool in_place);

// analytic_relu_moments.cpp (bkn/transitions/analytic.py, relu_moments and norm_relu_moments).
std::vector<Tensor> relu_moments_forward(const Tensor& mean, const Tensor& var);
std::vector<Tensor> relu_moments_backward(const Tensor& g_first, const Tensor& g_var, const Tensor& mean,
                                          const Tensor& var, const Tensor& std_, const Tensor& cdf,
                                          const Tensor& pdf, const Tensor& first, const Tensor& raw);
std::vector<Tensor> norm_relu_moments_forward(const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                                              Maybe extra_mean, Maybe extra_var);
std::vector<Tensor> norm_relu_moments_backward(const Tensor& g_first, const Tensor& g_var,
                                               const std::vector<Tensor>& saved, const Tensor& var,
                                               const Tensor& weight, double eps);
std::vector<Tensor> norm_relu_moments(const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                                      Maybe extra_mean, Maybe extra_var);

// _native_pool.cpp (bkn/layers/_native.py, cached_bytes and release_cached): the memory pool,
// one per process. pooled_empty is for the kernels (analytic_conv_moments.cpp), not bound.
Tensor pooled_empty(at::IntArrayRef sizes, const Tensor& like);
int64_t pool_cached_bytes();
int64_t pool_release_cached();

}  // namespace bkn
