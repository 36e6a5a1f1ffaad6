// softmax_topk's CUDA kernel body: one block per row (grid-stride), every thread keeps its best few strided
// elements in registers beside the online (m, d) normaliser; the block then picks the k winners one round at a time
// (block_allreduce over candidates: warp shuffles, then the per-warp winners), and only they are exponentiated,
// p = exp(x - lse) with the row's lse in double. Float accumulation for float / half / bfloat16 rows, double for
// double rows.
//
// Device code only (fastloss/math.h, fastloss/topk.h, row_reduce.cuh): csrc/cuda/softmax_topk_cuda.cu launches
// it, and the CUDA execution layer for the CPU (csrc/cuda_emu) runs the same body in its tests.
#pragma once

#include <cstdint>
#include <limits>
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

// A thread's best-first list of its kTopKCap best (value, index) pairs, in registers: every index into the arrays
// is a compile-time constant (unrolled insertion and pop), so nothing lives in local memory. Empty slots hold the
// sentinel (-inf, INT64_MAX), ranked after every element (a -inf logit has a smaller index). Elements are pushed in
// increasing index order, so a newcomer loses every tie against a listed entry (fastloss/topk.h TopKList).
constexpr int kTopKCap = 8;

template <typename T>
struct RegTopK {
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  T v[kTopKCap];
  int64_t i[kTopKCap];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int p = 0; p < kTopKCap; ++p) {
      v[p] = -fm::Limits<T>::inf;
      i[p] = kNone;
    }
  }
  __device__ __forceinline__ bool empty() const { return i[0] == kNone; }
  __device__ __forceinline__ bool full() const { return i[kTopKCap - 1] != kNone; }

  // x (index xi, larger than every listed index) ranked before the last slot: TopKList::admits.
  __device__ __forceinline__ bool admits(T x) const {
    const T w = v[kTopKCap - 1];
    return i[kTopKCap - 1] == kNone || ((x != x) ? (w == w) : (x > w));
  }

  __device__ __forceinline__ void push(T x, int64_t xi) {
    if (admits(x)) insert(x, xi);
  }

  // x, admitted, into its place; the last entry drops out.
  __device__ __forceinline__ void insert(T x, int64_t xi) {
    bool shifting = true;  // entries ranked after x move down one slot; x fills the gap
#pragma unroll
    for (int p = kTopKCap - 1; p > 0; --p) {
      if (shifting) {
        if (i[p - 1] == kNone || fm::topk_before(x, xi, v[p - 1], i[p - 1])) {
          v[p] = v[p - 1];
          i[p] = i[p - 1];
        } else {
          v[p] = x;
          i[p] = xi;
          shifting = false;
        }
      }
    }
    if (shifting) {
      v[0] = x;
      i[0] = xi;
    }
  }

  __device__ __forceinline__ void pop() {
#pragma unroll
    for (int p = 0; p + 1 < kTopKCap; ++p) {
      v[p] = v[p + 1];
      i[p] = i[p + 1];
    }
    v[kTopKCap - 1] = -fm::Limits<T>::inf;
    i[kTopKCap - 1] = kNone;
  }
};

// Each thread scans its strided share of the row once (16-byte loads, 2 in flight), carrying the online (m, d) and
// its best kTopKCap entries in registers. The block then picks the k winners one round at a time (block_allreduce
// over the threads' list heads; the winner pops its head). A thread whose list was full and has been emptied by
// the rounds may hold more winners: it alone rescans its share (from L2) for its next kTopKCap entries ranked
// after the last one it gave, while the others wait at the next round's barrier. A thread gives more than
// kTopKCap of the k winners only for rows whose largest logits gather in one thread's columns (k > kTopKCap and,
// for random rows, rarely even then), so one read of the row is the rule (tests/test_emu_traffic.py; the rescan
// is a thread's share, counted by the CPU execution layer only when thread 0 rescans).
template <typename scalar_t>
__global__ void __launch_bounds__(kTopKThreads)
    softmax_topk_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t V, int k, scalar_t* __restrict__ out_v,
                        int64_t* __restrict__ out_i) {
  using acc = acc_t<scalar_t>;
  constexpr int K = kVecOf<scalar_t>;
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* xr = x + r * V;
    const int64_t head = aligned_head(xr, V);
    RegTopK<acc> list;
    list.clear();
    fm::OnlineState<acc> s = fm::online_init<acc>();
    // Each thread meets its columns in increasing order, as push needs.
    row_pass<2, false, false>(xr, xr, static_cast<scalar_t*>(nullptr), V, head, tid, kTopKThreads,
                              [&](auto& v, auto&, int64_t c0, int64_t cs) {
                                constexpr int M = extent_of<decltype(v)>;
                                s = fm::online_update_block(s, v);
#pragma unroll
                                for (int e = 0; e < M; ++e) {
                                  const bool in = list.admits(v[e]);
                                  // fl-audit: rare -- an element beating the thread's kTopKCap-th best so far:
                                  // about kTopKCap ln(n / kTopKCap) of a thread's n elements in random order
                                  if (in) list.insert(v[e], c0 + col_off<K>(e, cs));
                                }
                              });
    s = block_allreduce(s);
    const double lse = finish_lse(s);
    bool more = list.full();  // entries ranked after the list's last may exist in this thread's share
    for (int q = 0; q < k; ++q) {
      Cand<acc> c{acc(0), 0, -1};
      if (!list.empty()) c = {list.v[0], list.i[0], tid};
      const Cand<acc> best = block_allreduce(c);
      if (best.owner == tid) {
        // fl-audit: cold -- the k winners: one value and one index store per selection round (k <= kMaxTopK)
        out_v[r * k + q] = static_cast<scalar_t>(fm::topk_probability(best.v, lse));
        out_i[r * k + q] = best.i;
        list.pop();
        if (list.empty() && more && q + 1 < k) {
          // This thread's next kTopKCap entries ranked after the one just given (best).
          const acc cv = best.v;
          const int64_t ci = best.i;
          // fl-audit: rare -- a thread giving more than kTopKCap of the k winners (see above)
          row_pass<2, false, false>(xr, xr, static_cast<scalar_t*>(nullptr), V, head, tid, kTopKThreads,
                                    [&](auto& v, auto&, int64_t c0, int64_t cs) {
                                      constexpr int M = extent_of<decltype(v)>;
#pragma unroll
                                      for (int e = 0; e < M; ++e) {
                                        const int64_t ei = c0 + col_off<K>(e, cs);
                                        if (fm::topk_before(cv, ci, v[e], ei)) list.push(v[e], ei);
                                      }
                                    });
          more = list.full();
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace fastloss
