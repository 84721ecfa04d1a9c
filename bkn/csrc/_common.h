// What every source of the compiled kernels shares: the includes, the tensor aliases and the
// small helpers of the C++ autograd Functions (optional inputs, needs_input_grad by argument,
// per-channel views).
//
// Helpers in headers are in an anonymous namespace, as they were when all kernels were one
// file: each translation unit has its own copy and the compiler sees (and inlines) every
// helper exactly as before, so splitting the sources changes no generated kernel code.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#pragma once

// Not torch/extension.h (only _native.cpp, the bindings, needs it): parsing it costs each
// translation unit about three times as much compiler time as these headers.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

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

namespace bkn {
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

}  // namespace
}  // namespace bkn
