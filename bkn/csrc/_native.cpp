// The Python module of the compiled kernels: one binding per entry point of the other sources
// (declared in _native.h). bkn/layers/_native.py loads it.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include <torch/extension.h>

#include "_native.h"

using namespace bkn;  // the entry points, declared in _native.h

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
