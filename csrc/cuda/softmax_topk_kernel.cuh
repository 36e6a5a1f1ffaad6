// softmax_topk's CUDA kernel body: one block per row (grid-stride), every thread keeps a running top-k list of its
// strided elements beside the online (m, d) normaliser; the block then picks the k winners one round at a time
// (block_allreduce over candidates: warp shuffles, then the per-warp winners), and only they are exponentiated, p = exp(x - lse) with the row's lse in
// double. One template on the accumulator type: float for float / half / bfloat16 rows, double for double rows.
//
// Device code only (fastloss/math.h, fastloss/topk.h, row_reduce.cuh): csrc/cuda/softmax_topk_cuda.cu launches
// it, and the CUDA execution layer for the CPU (csrc/cuda_emu) runs the same body in its tests.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fastloss/math.h"
#include "fastloss/topk.h"
#include "row_reduce.cuh"

namespace fastloss {
namespace cuda {

constexpr int kTopKThreads = 256;
constexpr int64_t kTopKMaxGrid = 65535;

// A (value, index, owner thread) candidate of the block-wide merge; `owner < 0` is "none".
template <typename T>
struct Cand {
  T v;
  int64_t i;
  int owner;
};

template <typename T>
__device__ __forceinline__ bool cand_before(const Cand<T>& a, const Cand<T>& b) {
  if (b.owner < 0) return a.owner >= 0;
  if (a.owner < 0) return false;
  return fm::topk_before(a.v, a.i, b.v, b.i);
}

// A candidate is one more state kind for row_reduce.cuh's all-reductions: merge() keeps the better of two (a
// total order on (value, index), "none" last: commutative, so every lane ends with the same winner) and
// shfl_xor moves one between lanes. block_allreduce then gives the block's best candidate to every thread.
template <typename T>
__device__ __forceinline__ Cand<T> merge(Cand<T> a, Cand<T> b) {
  return cand_before(b, a) ? b : a;
}

template <int kWidth, typename T>
__device__ __forceinline__ Cand<T> shfl_xor(const Cand<T>& c, int off) {
  return {__shfl_xor_sync(kFullMask, c.v, off, kWidth), __shfl_xor_sync(kFullMask, c.i, off, kWidth),
          __shfl_xor_sync(kFullMask, c.owner, off, kWidth)};
}

// kMax: the list capacity (8, 32 or kMaxTopK), so registers are sized for the k asked.
// fl-audit: accepted -- the per-thread top-k list is indexed at run time, so it lives in local memory (L1: 256
// threads x kMax x 12 bytes); each element costs one read of its last entry, and a register or shared-memory list
// is pending
template <typename scalar_t, int kMax>
__global__ void __launch_bounds__(kTopKThreads)
    softmax_topk_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t V, int k, scalar_t* __restrict__ out_v,
                        int64_t* __restrict__ out_i) {
  using acc = acc_t<scalar_t>;
  acc val[kMax];
  int64_t idx[kMax];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* xr = x + r * V;
    fm::TopKList<acc> list(val, idx, k);
    fm::OnlineState<acc> s = fm::online_init<acc>();
    // 16-byte loads, 2 in flight per thread; each thread meets its columns in increasing order, as push needs.
    constexpr int K = kVecOf<scalar_t>;
    auto visit = [&](auto& v, auto&, int64_t c0, int64_t cs) {
      constexpr int M = extent_of<decltype(v)>;
      s = fm::online_update_block(s, v);
#pragma unroll
      for (int e = 0; e < M; ++e) list.push(v[e], c0 + col_off<K>(e, cs));
    };
    row_pass<2, false, false>(xr, xr, static_cast<scalar_t*>(nullptr), V, aligned_head(xr, V),
                              static_cast<int>(threadIdx.x), kTopKThreads, visit);
    s = block_allreduce(s);
    const double lse = finish_lse(s);
    int head = 0;
    for (int q = 0; q < k; ++q) {
      Cand<acc> c{acc(0), 0, -1};
      if (head < list.n) c = {list.val[head], list.idx[head], static_cast<int>(threadIdx.x)};
      const Cand<acc> best = block_allreduce(c);
      if (best.owner == static_cast<int>(threadIdx.x)) {
        ++head;
        // fl-audit: cold -- the k winners: one value and one index store per selection round (k <= kMaxTopK)
        out_v[r * k + q] = static_cast<scalar_t>(fm::topk_probability(best.v, lse));
        out_i[r * k + q] = best.i;
      }
    }
  }
}

}  // namespace cuda
}  // namespace fastloss
