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
//
// The pool is one per process: pooled_empty (analytic_conv_moments.cpp) and the counters
// bound for bkn/layers/_native.py (cached_bytes, release_cached) are declared in _native.h.
//
// One of the sources of one extension, built on first use by bkn/layers/_native.py (see its docstring).

#include "_native.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <pthread.h>
#include <unordered_map>
#include <vector>

namespace bkn {
namespace {

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

}  // namespace

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

}  // namespace bkn
