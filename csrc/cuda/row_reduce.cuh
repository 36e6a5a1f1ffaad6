// Device building blocks for the CUDA row kernels: 16-byte vector loads, row-segment traversal and warp / block
// all-reductions of the (m, d), (a, k) and plain-sum states of fastloss/math.h.
//
// Only device code and tiny constexpr helpers live here, so a future kernel file (cross-entropy) can include it
// without pulling anything heavy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastloss/math.h"

// `FL_SHARED(T, name, [N]);` declares a block-shared array (the CUDA execution layer defines its own, which poisons
// the array before every block; csrc/cuda_emu/cuda_emu.h).
#ifndef FL_SHARED
#define FL_SHARED(type, name, dims) __shared__ type name dims
#endif

// FL_ROW_TRAFFIC(tid, read, written): under the CPU execution layer, thread 0 of the threads walking a row segment
// adds the segment's bytes to the layer's traffic counts (csrc/cuda_emu/cuda_emu.h add_traffic), once per segment.
// Nothing under nvcc.
#ifdef FASTLOSS_CUDA_EMU
#define FL_ROW_TRAFFIC(tid, read, written) \
  ((tid) == 0 ? ::fastloss::emu::add_traffic(static_cast<uint64_t>(read), static_cast<uint64_t>(written)) : void())
#else
#define FL_ROW_TRAFFIC(tid, read, written) ((void)0)
#endif

namespace fastloss {
namespace cuda {

namespace fm = fastloss::math;

// fp32 accumulation for float / half / bfloat16, fp64 for double.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// softmax_topk's per-thread list capacity (csrc/cuda/softmax_topk_cuda.cu); larger k takes the composite path.
constexpr int64_t kMaxTopK = 128;
constexpr int kVecBytes = 16;

// Elements of T in one 16-byte load: 4 float, 8 half / bfloat16, 2 double.
template <typename T>
constexpr int kVecOf = kVecBytes / static_cast<int>(sizeof(T));

// N elements loaded or stored as one 16-byte transaction (the alignment makes nvcc emit ld/st.global.v4).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename acc, typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& p, acc* dst) {
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = static_cast<acc>(p.v[k]);
}

// Number of elements before the first 16-byte boundary at or after p, capped at n. Tensor data is always aligned
// to its element size, so the boundary is a whole number of elements away.
template <typename T>
__device__ __forceinline__ int64_t aligned_head(const T* p, int64_t n) {
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(p) % kVecBytes);
  const int64_t head = mis == 0 ? 0 : (kVecBytes - mis) / static_cast<int>(sizeof(T));
  return head < n ? head : n;
}

// Whether p and q sit at the same offset from a 16-byte boundary, i.e. one head length aligns both. Rows of tensors
// from the caching allocator always agree (same base alignment, same row stride); a view with an odd storage
// offset may not, and then the row is read with scalar loads.
template <typename T>
__device__ __forceinline__ bool same_alignment(const T* p, const T* q) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == reinterpret_cast<uintptr_t>(q) % kVecBytes;
}

// ---------------------------------------------------------------- row segment traversal
//
// A segment a[0..n) is split into a scalar head of `head` elements (up to the first 16-byte boundary; head = n
// turns the whole segment scalar), a body of whole vectors, and a scalar tail. Thread `tid` of `nthreads` visits
// elements tid, tid + nthreads, ... in each part, so consecutive threads read consecutive vectors (coalesced).

// Reduction visit: f(va, vb) gets register arrays acc[N] of a (and b, when kTwo; else va twice) with N = 1 for
// head and tail elements, kUnroll * kVec for the body (kUnroll vectors loaded before any use, to keep several
// 16-byte loads in flight per thread) and kVec for the body's remainder. Element order inside an array does not
// matter to a reduction, so the kUnroll vectors need not be adjacent.
template <int kUnroll, bool kTwo, typename T, typename F>
__device__ __forceinline__ void segment_visit(const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                                              int64_t head, int tid, int nthreads, F&& f) {
  using acc = acc_t<T>;
  constexpr int kVec = kVecOf<T>;
  using P = Pack<T, kVec>;
  FL_ROW_TRAFFIC(tid, n * sizeof(T) * (kTwo ? 2 : 1), 0);
  // fl-audit: cold -- heads and tails: under one 16-byte vector per thread per segment (whole rows only when the
  // row's two tensors sit at different 16-byte offsets, see same_alignment)
  auto scalar = [&](int64_t j) {
    acc va[1] = {static_cast<acc>(a[j])};
    if constexpr (kTwo) {
      // fl-audit: cold -- (the same head / tail element of the second tensor)
      acc vb[1] = {static_cast<acc>(b[j])};
      f(va, vb);
    } else {
      f(va, va);
    }
  };
  for (int64_t j = tid; j < head; j += nthreads) scalar(j);

  const int64_t nvec = (n - head) / kVec;
  const P* pa = reinterpret_cast<const P*>(a + head);
  const P* pb = reinterpret_cast<const P*>(b + head);
  int64_t i = tid;
  // Addresses advance by pointer (as in row_pass), so every load's address is ready at the top of the iteration.
  const P* qa = pa + i;
  const P* qb = pb + i;
  const int64_t step = static_cast<int64_t>(kUnroll) * nthreads;
  for (; i + static_cast<int64_t>(kUnroll - 1) * nthreads < nvec; i += step, qa += step, qb += step) {
    // Every pack copied into registers before any is unpacked: a copy of a whole Pack is one 16-byte load
    // (LDG.E.128), and all kUnroll (x2) loads issue before the first use. (unpack reading through the global
    // pointer compiled to one 2- or 4-byte load per element.)
    P xa[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) xa[u] = qa[static_cast<int64_t>(u) * nthreads];
    P xb[kTwo ? kUnroll : 1];
    if constexpr (kTwo) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) xb[u] = qb[static_cast<int64_t>(u) * nthreads];
    }
    acc va[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack(xa[u], va + u * kVec);
    if constexpr (kTwo) {
      acc vb[kUnroll * kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) unpack(xb[u], vb + u * kVec);
      f(va, vb);
    } else {
      f(va, va);
    }
  }
  // fl-audit: cold -- the remainder: fewer than kUnroll vectors per thread per segment
  for (; i < nvec; i += nthreads) {
    const P xa = pa[i];
    acc va[kVec];
    unpack(xa, va);
    if constexpr (kTwo) {
      const P xb = pb[i];  // fl-audit: cold -- the remainder
      acc vb[kVec];
      unpack(xb, vb);
      f(va, vb);
    } else {
      f(va, va);
    }
  }

  for (int64_t j = head + nvec * kVec + tid; j < n; j += nthreads) scalar(j);
}

// Elementwise visit: out[j] = f(a[j], b[j]) (b[j] reads as 0 unless kTwo), computed in acc. `head` must align
// a, b (when kTwo) and out alike; pass head = n when they do not. out may alias a (in-place gradients): each
// element is loaded before it is stored, by the same thread, so the pointers are not __restrict__.
template <bool kTwo, typename T, typename F>
__device__ __forceinline__ void segment_map(const T* a, const T* b, T* out,
                                            int64_t n, int64_t head, int tid, int nthreads, F&& f) {
  using acc = acc_t<T>;
  constexpr int kVec = kVecOf<T>;
  using P = Pack<T, kVec>;
  FL_ROW_TRAFFIC(tid, n * sizeof(T) * (kTwo ? 2 : 1), n * sizeof(T));
  // fl-audit: cold -- heads and tails, as in segment_visit
  auto scalar = [&](int64_t j) {
    acc vb = acc(0);
    if constexpr (kTwo) vb = static_cast<acc>(b[j]);
    out[j] = static_cast<T>(f(static_cast<acc>(a[j]), vb));
  };
  for (int64_t j = tid; j < head; j += nthreads) scalar(j);

  const int64_t nvec = (n - head) / kVec;
  const P* pa = reinterpret_cast<const P*>(a + head);
  const P* pb = reinterpret_cast<const P*>(b + head);
  P* po = reinterpret_cast<P*>(out + head);
  auto map = [&](const P& xa, const P& xb) {
    P r;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc vb = acc(0);
      if constexpr (kTwo) vb = static_cast<acc>(xb.v[k]);
      r.v[k] = static_cast<T>(f(static_cast<acc>(xa.v[k]), vb));
    }
    return r;
  };
  // Two vectors per stream in flight per thread, loaded (addresses advancing by pointer) before either is stored:
  // one 16-byte load at a time left a thread 16 bytes in flight. out may alias a: each thread reads its elements
  // before it writes them.
  int64_t i = tid;
  const P* qa = pa + i;
  const P* qb = pb + i;
  P* qo = po + i;
  const int64_t step = 2 * static_cast<int64_t>(nthreads);
  for (; i + nthreads < nvec; i += step, qa += step, qb += step, qo += step) {
    const P xa0 = qa[0], xa1 = qa[nthreads];
    P xb0, xb1;
    if constexpr (kTwo) {
      xb0 = qb[0];
      xb1 = qb[nthreads];
    }
    qo[0] = map(xa0, xb0);
    qo[nthreads] = map(xa1, xb1);
  }
  if (i < nvec) {  // the remainder: at most one vector per thread
    const P xa = pa[i];  // fl-audit: cold -- the remainder
    P xb;
    if constexpr (kTwo) xb = pb[i];  // fl-audit: cold -- the remainder
    po[i] = map(xa, xb);  // fl-audit: cold -- the remainder
  }

  for (int64_t j = head + nvec * kVec + tid; j < n; j += nthreads) scalar(j);
}

// ---------------------------------------------------------------- row traversal with columns (row_pass)
//
// Thread `tid` of the `nt` threads of a group visits a[0..n): a scalar head of `head` elements (up to the first
// 16-byte boundary; head = n turns the whole row scalar), a body of 16-byte vectors, the body's remainder vector by
// vector, a scalar tail. In the body each thread first issues kLoads vector loads per stream (vectors i, i + nt,
// ..., so that a warp reads consecutive 16-byte words), keeps them packed while in flight, then unpacks and hands
// them to the callback kChunk vectors (kChunk * kVec elements, 8 or fewer) at a time. The callback gets acc
// arrays of M elements (M = 1, kVec, or kChunk * kVec); element e sits at column c0 + col_off<kVec>(e, cs). A
// thread meets its columns in increasing order (softmax_topk's per-thread lists rely on it).

template <int K>
__device__ __forceinline__ int64_t col_off(int e, int64_t cs) {
  return static_cast<int64_t>(e / K) * cs + e % K;
}

// Vectors per callback: kMaxElems (by default 8) elements of 2-byte types, 8 floats, 8 doubles (capped by the
// loads in flight).
template <typename T, int kLoads, int kMaxElems = 8>
constexpr int kChunkOf = std::min(kLoads, std::max(1, kMaxElems / kVecOf<T>));

// f(va, vb, c0, cs): va the elements of a, vb those of b (when kTwo; otherwise va again). f may modify va; with
// kStore, the values f leaves in va are then stored to out (which may alias a: every element is read before it is
// written, by the same thread). `head` must align a, b (kTwo) and out (kStore) alike. kMaxElems caps the elements
// per callback (a reduction with a per-callback cost, a rescale, takes 16: one callback per two 2-byte vectors).
template <int kLoads, bool kTwo, bool kStore, int kMaxElems = 8, typename T, typename F>
__device__ __forceinline__ void row_pass(const T* a, const T* b, T* out, int64_t n, int64_t head, int tid, int nt,
                                         F&& f) {
  using acc = acc_t<T>;
  constexpr int K = kVecOf<T>;
  constexpr int kChunk = kChunkOf<T, kLoads, kMaxElems>;
  static_assert(kLoads % kChunk == 0);
  using P = Pack<T, K>;
  FL_ROW_TRAFFIC(tid, n * sizeof(T) * (kTwo ? 2 : 1), kStore ? n * sizeof(T) : 0);
  auto scalar = [&](int64_t j) {
    // fl-audit: cold -- scalar head / tail (under one vector per thread); whole rows only for misaligned views
    acc va[1] = {static_cast<acc>(a[j])};
    acc vb[1] = {kTwo ? static_cast<acc>(b[j]) : acc(0)};
    f(va, vb, j, int64_t{0});
    if constexpr (kStore) out[j] = static_cast<T>(va[0]);
  };
  auto pack = [](const acc* v) {
    P r;
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = static_cast<T>(v[k]);
    return r;
  };
  P* po = kStore ? reinterpret_cast<P*>(out + head) : nullptr;  // out may be null without kStore
#pragma unroll 1
  for (int64_t j = tid; j < head; j += nt) scalar(j);
  const int64_t nvec = (n - head) / K;
  const P* pa = reinterpret_cast<const P*>(a + head);
  const P* pb = reinterpret_cast<const P*>(b + head);
  const int64_t cs = static_cast<int64_t>(nt) * K;
  int64_t i = tid;
  // Addresses advance by pointer: every load's address is ready at the top of the iteration, so all of them issue
  // before the first is used (with index arithmetic ptxas sometimes unpacked the first pack before computing the
  // second's address, halving the bytes in flight).
  const P* qa = pa + i;
  const P* qb = pb + i;
  const int64_t step = static_cast<int64_t>(kLoads) * nt;
#pragma unroll 1
  for (; i + static_cast<int64_t>(kLoads - 1) * nt < nvec; i += step, qa += step, qb += step) {
    P xa[kLoads], xb[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) xa[u] = qa[static_cast<int64_t>(u) * nt];
    if constexpr (kTwo) {
#pragma unroll
      for (int u = 0; u < kLoads; ++u) xb[u] = qb[static_cast<int64_t>(u) * nt];
    }
#pragma unroll
    for (int c = 0; c < kLoads; c += kChunk) {
      acc va[kChunk * K], vb[kChunk * K];
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        unpack(xa[c + u], va + u * K);
        if constexpr (kTwo) unpack(xb[c + u], vb + u * K);
      }
      const int64_t ic = i + static_cast<int64_t>(c) * nt;
      if constexpr (kTwo) f(va, vb, head + ic * K, cs);
      else f(va, va, head + ic * K, cs);
      if constexpr (kStore) {
#pragma unroll
        for (int u = 0; u < kChunk; ++u) po[ic + static_cast<int64_t>(u) * nt] = pack(va + u * K);
      }
    }
  }
  // The body's remainder: under kLoads vectors per thread per row. Each pack is copied whole first: one 16-byte
  // load (unpack(pa[i]) read it element by element).
#pragma unroll 1
  for (; i < nvec; i += nt) {
    acc va[K], vb[K];
    const P xa = pa[i];  // fl-audit: cold -- the remainder
    unpack(xa, va);
    if constexpr (kTwo) {
      const P xb = pb[i];  // fl-audit: cold -- the remainder
      unpack(xb, vb);
    }
    // fl-audit: cold-call -- the remainder: the callback's own loads (class weights) as cold as the row's here
    if constexpr (kTwo) f(va, vb, head + i * K, cs);
    else f(va, va, head + i * K, cs);
    if constexpr (kStore) po[i] = pack(va);  // fl-audit: cold -- the remainder
  }
#pragma unroll 1
  for (int64_t j = head + nvec * K + tid; j < n; j += nt) scalar(j);
}

// Class weights for a row whose 16-byte body starts at column `head`: of the 16 / sizeof(W) copies the op layer
// keeps (csrc/cross_entropy_ops.cpp prepare_weight; copy j starts j elements past a 16-byte boundary, `stride`
// elements after copy j - 1), the one in which column `head` sits on a 16-byte boundary. Null stays null.
template <typename W>
__device__ __forceinline__ const W* row_weights(const W* w, int64_t stride, int64_t head) {
  constexpr int kWv = kVecBytes / static_cast<int>(sizeof(W));
  if (w == nullptr) return w;
  return w + ((kWv - head % kWv) % kWv) * stride;
}

// Class weights of a row_pass callback's elements: wv[e] = w[c0 + col_off<K>(e, cs)] (M = 1 for head and tail
// elements, else whole groups of K consecutive columns), w from row_weights for the row's head, so that every
// group starts on a 16-byte boundary and is read as K * sizeof(W) / 16 vectors.
template <int K, typename W, int M>
__device__ __forceinline__ void class_weights(const W* __restrict__ w, int64_t c0, int64_t cs, W (&wv)[M]) {
  if constexpr (M == 1) {
    wv[0] = __ldg(w + c0);  // fl-audit: cold -- a head or tail element's weight: under one vector per row
  } else {
    constexpr int kWv = kVecBytes / static_cast<int>(sizeof(W));  // 4 float, 2 double
    static_assert(K % kWv == 0 && M % K == 0);
    using PW = Pack<W, kWv>;
#pragma unroll
    for (int u = 0; u < M / K; ++u) {
      const PW* q = reinterpret_cast<const PW*>(w + c0 + static_cast<int64_t>(u) * cs);
#pragma unroll
      for (int g = 0; g < K / kWv; ++g) {
        // fl-audit: l2 -- the [C] class weights, re-read by every row: L2 traffic, not HBM
        const PW x = q[g];
#pragma unroll
        for (int k = 0; k < kWv; ++k) wv[u * K + g * kWv + k] = x.v[k];
      }
    }
  }
}

template <typename V>
constexpr int extent_of = std::extent_v<std::remove_reference_t<V>>;

// out[0..n) = value with 16-byte stores (ignored rows' gradients: many, in prompt-masked fine-tuning).
template <typename T>
__device__ __forceinline__ void segment_fill(T* out, int64_t n, T value, int tid, int nthreads) {
  constexpr int kVec = kVecOf<T>;
  using P = Pack<T, kVec>;
  const int64_t head = aligned_head(out, n);
  FL_ROW_TRAFFIC(tid, 0, n * sizeof(T));
  // fl-audit: cold -- the head before the first 16-byte boundary: under one vector per thread
#pragma unroll 1
  for (int64_t j = tid; j < head; j += nthreads) out[j] = value;
  const int64_t nvec = (n - head) / kVec;
  P pv;
#pragma unroll
  for (int k = 0; k < kVec; ++k) pv.v[k] = value;
  P* po = reinterpret_cast<P*>(out + head);
#pragma unroll 1
  for (int64_t i = tid; i < nvec; i += nthreads) po[i] = pv;
  // fl-audit: cold -- the tail after the last whole vector: under one vector per thread
#pragma unroll 1
  for (int64_t j = head + nvec * kVec + tid; j < n; j += nthreads) out[j] = value;
}

// ---------------------------------------------------------------- all-reductions
//
// merge() is the associative, commutative combine of each state kind. Commutativity is exact in IEEE arithmetic
// here (max, and a sum of two products), so in a butterfly every lane ends with bit-identical results: all
// threads of a row agree on its lse.

template <typename T>
__device__ __forceinline__ fm::OnlineState<T> merge(fm::OnlineState<T> a, fm::OnlineState<T> b) {
  return fm::online_merge(a, b);
}
template <typename T>
__device__ __forceinline__ fm::ExpState<T> merge(fm::ExpState<T> a, fm::ExpState<T> b) {
  return fm::exp_merge(a, b);
}
__device__ __forceinline__ float merge(float a, float b) { return a + b; }
__device__ __forceinline__ double merge(double a, double b) { return a + b; }

template <int kWidth>
__device__ __forceinline__ float shfl_xor(float v, int off) {
  return __shfl_xor_sync(kFullMask, v, off, kWidth);
}
template <int kWidth>
__device__ __forceinline__ double shfl_xor(double v, int off) {
  return __shfl_xor_sync(kFullMask, v, off, kWidth);
}
template <int kWidth, typename T>
__device__ __forceinline__ fm::OnlineState<T> shfl_xor(fm::OnlineState<T> s, int off) {
  return {shfl_xor<kWidth>(s.m, off), shfl_xor<kWidth>(s.d, off)};
}
template <int kWidth, typename T>
__device__ __forceinline__ fm::ExpState<T> shfl_xor(fm::ExpState<T> s, int off) {
  return {shfl_xor<kWidth>(s.a, off), shfl_xor<kWidth>(s.k, off)};
}

// All-reduce over aligned groups of kWidth lanes (a power of two <= 32). Every lane of the warp must call it.
template <int kWidth, typename S>
__device__ __forceinline__ S warp_allreduce(S s) {
#pragma unroll
  for (int off = kWidth / 2; off > 0; off /= 2) s = merge(s, shfl_xor<kWidth>(s, off));
  return s;
}

// All-reduce over the block (blockDim.x a multiple of 32, at most 1024). Every thread gets the same value: each
// folds the per-warp results in the same order, which saves a broadcast and its barrier. The leading barrier
// lets the block call this again (next row of a grid-stride loop) without overwriting slots still being read.
template <typename S>
__device__ __forceinline__ S block_allreduce(S s) {
  FL_SHARED(S, warp_part, [kWarpSize]);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  s = warp_allreduce<kWarpSize>(s);
  __syncthreads();
  if (lane == 0) warp_part[warp] = s;
  __syncthreads();
  S r = warp_part[0];
  for (int w = 1; w < nwarps; ++w) r = merge(r, warp_part[w]);
  return r;
}

// lse of a fully merged online state. Ops::max propagates NaN through every update and merge, so a NaN anywhere
// in the row leaves m = NaN and the lse NaN; m = +inf therefore means "+inf and no NaN", where d is NaN (inf - inf)
// and torch.logsumexp gives +inf. (The CPU kernels re-scan the row for this case; here the state already knows.)
template <typename T>
__device__ __forceinline__ T finish_online(fm::OnlineState<T> s) {
  return s.m == fm::Limits<T>::inf ? s.m : fm::online_lse(s);
}

// The same lse formed in double, as the CPU kernels and the cross-entropy kernels keep it: with float state and
// logits around 1e3-1e4, m + logf(d) in float loses more than float32 tolerance once exponentiated against.
// m = +inf: the state's max keeps NaN (Ops::max), so the row holds a +inf and no NaN, and torch.logsumexp gives
// +inf (d is NaN there).
template <typename acc>
__device__ __forceinline__ double finish_lse(fm::OnlineState<acc> s) {
  if (s.m == fm::Limits<acc>::inf) return std::numeric_limits<double>::infinity();
  return static_cast<double>(s.m) + ::log(static_cast<double>(s.d));
}

}  // namespace cuda
}  // namespace fastloss
