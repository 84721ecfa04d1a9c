// The analytic transition's tap sums over a whole convolution weight (tap_sums,
// tap_sums_backward; bkn/transitions/analytic.py, tap_sums): the kernels are in
// analytic_tap_sums.h, shared with analytic_conv_moments.cpp.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include "_native.h"
#include "analytic_tap_sums.h"

namespace bkn {
namespace {

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

}  // namespace

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

}  // namespace bkn
