// CUDA softmax + top-k in one pass over each row (compiled here, not yet run on a GPU).
//
// One block per row (grid-stride over rows). Every thread scans its strided share of the row once, carrying the
// online normaliser (m, d) and a private best-first list of up to kMax (value, index) pairs (fastloss/topk.h; the
// list lives in local memory, only candidates beating the thread's k-th value touch it). The (m, d) states merge
// with block_allreduce; the lists merge in k rounds of a block-wide arg-best over the threads' current heads (the
// winner's thread advances its head). Only the k winners are exponentiated: p = exp(x - lse).
//
// k <= kMaxTopK (128) here; larger k is answered by the op layer's composite path. Indexing is int64 throughout.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "fastloss/softmax_kernels.h"
#include "launch.cuh"
#include "softmax_topk_kernel.cuh"

namespace fastloss {
namespace cuda {

template <int kMax>
// fl-passes: softmax_topk = 1R + 0W (floor 1R + 0W) (tests/test_emu_traffic.py)
void launch(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  const int64_t rows = x.size(0), V = x.size(1);
  const unsigned grid = grid_size(std::min<int64_t>(rows, kTopKMaxGrid));
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastloss_softmax_topk_cuda", [&] {
    launch_kernel<&softmax_topk_kernel<scalar_t, kMax>>(grid, kTopKThreads, 0, stream,
        x.const_data_ptr<scalar_t>(), rows, V, static_cast<int>(k), values.mutable_data_ptr<scalar_t>(),
        indices.mutable_data_ptr<int64_t>());
  });
}

void softmax_topk_cuda(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices,
                       Algorithm /*online only: the running top-k needs no second pass either way*/) {
  const DeviceGuard guard(x.device());
  TORCH_CHECK(k <= kMaxTopK, "fastloss.softmax_topk: CUDA kernel handles k <= ", kMaxTopK, ", got ", k);
  if (k <= 8) return launch<8>(x, k, values, indices);
  if (k <= 32) return launch<32>(x, k, values, indices);
  return launch<static_cast<int>(kMaxTopK)>(x, k, values, indices);
}

}  // namespace cuda
}  // namespace fastloss
