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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "fastloss/math.h"
#include "fastloss/softmax_kernels.h"
#include "fastloss/topk.h"
#include "row_reduce.cuh"

namespace fastloss {
namespace cuda {

constexpr int kTopKThreads = 256;
constexpr int64_t kTopKMaxGrid = 65535;

// A (value, index, owner thread) candidate of the block-wide merge; `owner < 0` is "none".
struct Cand {
  float v;
  int64_t i;
  int owner;
};

__device__ __forceinline__ bool cand_before(const Cand& a, const Cand& b) {
  if (b.owner < 0) return a.owner >= 0;
  if (a.owner < 0) return false;
  return fm::topk_before(a.v, a.i, b.v, b.i);
}

__device__ __forceinline__ Cand shfl_cand(const Cand& c, int off) {
  return {__shfl_xor_sync(0xffffffffu, c.v, off), __shfl_xor_sync(0xffffffffu, c.i, off),
          __shfl_xor_sync(0xffffffffu, c.owner, off)};
}

// The block's best candidate, on every thread.
__device__ __forceinline__ Cand block_best(Cand c, Cand* slots) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const Cand o = shfl_cand(c, off);
    if (cand_before(o, c)) c = o;
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __syncthreads();  // slots may still be read by the previous round
  if (lane == 0) slots[warp] = c;
  __syncthreads();
  Cand best = slots[0];
  for (int w = 1; w < kTopKThreads / kWarpSize; ++w)
    if (cand_before(slots[w], best)) best = slots[w];
  return best;
}

template <typename scalar_t, int kMax>
__global__ void __launch_bounds__(kTopKThreads)
    softmax_topk_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t V, int k, scalar_t* __restrict__ out_v,
                        int64_t* __restrict__ out_i) {
  static_assert(std::is_same_v<acc_t<scalar_t>, float>, "double rows use the float64 instantiation below");
  __shared__ Cand slots[kTopKThreads / kWarpSize];
  float val[kMax];
  int64_t idx[kMax];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* xr = x + r * V;
    fm::TopKList<float> list(val, idx, k);
    fm::OnlineState<float> s = fm::online_init<float>();
    for (int64_t j = threadIdx.x; j < V; j += kTopKThreads) {
      const float v = static_cast<float>(xr[j]);
      s = fm::online_update(s, v);
      list.push(v, j);
    }
    s = block_allreduce(s);
    const double lse = finish_lse(s);
    int head = 0;
    for (int q = 0; q < k; ++q) {
      Cand c{0.f, 0, -1};
      if (head < list.n) c = {list.val[head], list.idx[head], static_cast<int>(threadIdx.x)};
      const Cand best = block_best(c, slots);
      if (best.owner == static_cast<int>(threadIdx.x)) {
        ++head;
        out_v[r * k + q] = static_cast<scalar_t>(fm::topk_probability(best.v, lse));
        out_i[r * k + q] = best.i;
      }
    }
  }
}

// float64 rows: the same kernel on doubles (a separate instantiation keeps the float path's registers small).
struct CandD {
  double v;
  int64_t i;
  int owner;
};

__device__ __forceinline__ bool cand_before(const CandD& a, const CandD& b) {
  if (b.owner < 0) return a.owner >= 0;
  if (a.owner < 0) return false;
  return fm::topk_before(a.v, a.i, b.v, b.i);
}

__device__ __forceinline__ CandD shfl_cand(const CandD& c, int off) {
  return {__shfl_xor_sync(0xffffffffu, c.v, off), __shfl_xor_sync(0xffffffffu, c.i, off),
          __shfl_xor_sync(0xffffffffu, c.owner, off)};
}

__device__ __forceinline__ CandD block_best(CandD c, CandD* slots) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const CandD o = shfl_cand(c, off);
    if (cand_before(o, c)) c = o;
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __syncthreads();
  if (lane == 0) slots[warp] = c;
  __syncthreads();
  CandD best = slots[0];
  for (int w = 1; w < kTopKThreads / kWarpSize; ++w)
    if (cand_before(slots[w], best)) best = slots[w];
  return best;
}

template <int kMax>
__global__ void __launch_bounds__(kTopKThreads)
    softmax_topk_kernel_f64(const double* __restrict__ x, int64_t rows, int64_t V, int k, double* __restrict__ out_v,
                            int64_t* __restrict__ out_i) {
  __shared__ CandD slots[kTopKThreads / kWarpSize];
  double val[kMax];
  int64_t idx[kMax];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const double* xr = x + r * V;
    fm::TopKList<double> list(val, idx, k);
    fm::OnlineState<double> s = fm::online_init<double>();
    for (int64_t j = threadIdx.x; j < V; j += kTopKThreads) {
      s = fm::online_update(s, xr[j]);
      list.push(xr[j], j);
    }
    s = block_allreduce(s);
    const double lse = finish_lse(s);
    int head = 0;
    for (int q = 0; q < k; ++q) {
      CandD c{0.0, 0, -1};
      if (head < list.n) c = {list.val[head], list.idx[head], static_cast<int>(threadIdx.x)};
      const CandD best = block_best(c, slots);
      if (best.owner == static_cast<int>(threadIdx.x)) {
        ++head;
        out_v[r * k + q] = fm::topk_probability(best.v, lse);
        out_i[r * k + q] = best.i;
      }
    }
  }
}

template <int kMax>
void launch(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  const int64_t rows = x.size(0), V = x.size(1);
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>(rows, 1, kTopKMaxGrid));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kDouble) {
    softmax_topk_kernel_f64<kMax><<<grid, kTopKThreads, 0, stream>>>(
        x.const_data_ptr<double>(), rows, V, static_cast<int>(k), values.mutable_data_ptr<double>(),
        indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastloss_softmax_topk_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      softmax_topk_kernel<scalar_t, kMax><<<grid, kTopKThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), rows, V, static_cast<int>(k), values.mutable_data_ptr<scalar_t>(),
          indices.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void softmax_topk_cuda(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices,
                       Algorithm /*online only: the running top-k needs no second pass either way*/) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(k <= kMaxTopK, "fastloss.softmax_topk: CUDA kernel handles k <= ", kMaxTopK, ", got ", k);
  if (k <= 8) return launch<8>(x, k, values, indices);
  if (k <= 32) return launch<32>(x, k, values, indices);
  return launch<static_cast<int>(kMaxTopK)>(x, k, values, indices);
}

}  // namespace cuda
}  // namespace fastloss
