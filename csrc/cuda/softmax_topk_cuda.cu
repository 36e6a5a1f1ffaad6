// CUDA softmax + top-k in one pass over each row (compiled here, not yet run on a GPU).
//
// One block per row (grid-stride over rows). Every thread scans its strided share of the row once, carrying the
// online normaliser (m, d) and a best-first list of its kTopKCap best (value, index) pairs in registers (only
// candidates beating the list's last entry touch it). The (m, d) states merge with block_allreduce; the lists merge
// in k rounds of a block-wide arg-best over the threads' list heads (the winner pops its head, and rescans its
// share for more in the rare case it gives more than kTopKCap winners; softmax_topk_kernel.cuh). Only the k
// winners are exponentiated: p = exp(x - lse).
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

// fl-passes: softmax_topk = 1R + 0W (floor 1R + 0W) (tests/test_emu_traffic.py)
void softmax_topk_cuda(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices,
                       Algorithm /*online only: the running top-k needs no second pass either way*/) {
  const DeviceGuard guard(x.device());
  TORCH_CHECK(k <= kMaxTopK, "fastloss.softmax_topk: CUDA kernel handles k <= ", kMaxTopK, ", got ", k);
  const int64_t rows = x.size(0), V = x.size(1);
  const unsigned grid = grid_size(std::min<int64_t>(rows, kTopKMaxGrid));
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastloss_softmax_topk_cuda", [&] {
    launch_kernel<&softmax_topk_kernel<scalar_t>>(grid, kTopKThreads, 0, stream, x.const_data_ptr<scalar_t>(), rows,
                                                  V, static_cast<int>(k), values.mutable_data_ptr<scalar_t>(),
                                                  indices.mutable_data_ptr<int64_t>());
  });
}

}  // namespace cuda
}  // namespace fastloss
