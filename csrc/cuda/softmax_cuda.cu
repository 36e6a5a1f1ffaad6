// CUDA row kernels for softmax / log_softmax / logsumexp and their backwards (the table of softmax_kernels.h).
//
// Every problem is a contiguous [rows, V] matrix. The kernel is picked from the row length:
//
//  * warp path (V <= 1024, double: V <= 512): a row lives in the registers of a group of kLanes lanes (1..32,
//    at least one 16-byte vector per lane; with_warp_shape), rows shorter than 32 vectors share a warp. The row
//    is read once in 16-byte packs (a scalar head and tail of under a vector each), reduced with shuffles, and
//    (softmax) written from registers.
//  * block path (longer rows): one block per row (grid-stride over rows), 16-byte vector loads with a scalar head
//    up to the first 16-byte boundary and a scalar tail, a shuffle + shared-memory all-reduce; softmax re-reads
//    the row for its second pass (mostly from L2 for moderate V).
//  * split path (V >= 256K and fewer rows than fill the GPU): each row is cut into chunks of >= 16K elements, one
//    block per (row, chunk) writes its partial state to a workspace, a merge kernel combines them with the same
//    associative rules and finishes the row, and for softmax a third kernel writes exp(x - m) / d over (row,
//    chunk).
//
// The formulas are those of fastloss/math.h (the CPU kernels run the very same functions), accumulated in fp32
// for float / half / bfloat16 input and fp64 for double. Both algorithms finish a row as an online pair (m, d)
// (two-pass through exp_to_online, or the online rule where its split is inexact), from which come the lse
// (finish_online, row_reduce.cuh) and the second pass (softmax_at / log_softmax_at), as in
// csrc/cpu/softmax_cpu_kernels.h. All launches go to the current stream, nothing synchronises the host, and
// indices are int64_t.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fastloss/math.h"
#include "fastloss/softmax_kernels.h"
#include "launch.cuh"
#include "row_reduce.cuh"

namespace fastloss {
namespace cuda {
namespace {

enum class Mode : int { Lse = 0, Softmax = 1, LogSoftmax = 2 };

// ---------------------------------------------------------------- launch configuration

constexpr int kWarpThreads = 128;      // warp path: 4 warps per block
// Stated so that ptxas budgets registers from the real limit (255): with only the thread count it settled on 64
// for some shapes (double, 8 items per lane) and spilled.
constexpr int kWarpMinBlocks = 2;
constexpr int kBlockMinThreads = 128;  // block path: 128..512 threads, by row length
constexpr int kBlockMaxThreads = 512;  // (512 keeps 128 registers per thread available: no spills)
constexpr int kSplitThreads = 512;     // split path, all three kernels
constexpr int kEltThreads = 256;       // logsumexp backward (elementwise)
constexpr int kUnroll = 2;             // 16-byte vectors in flight per thread in the reduction loops

constexpr int64_t kSplitMinV = 256 * 1024;  // split rows only from this length...
constexpr int64_t kSplitMinChunk = 16 * 1024;  // ...into chunks of at least this many elements
constexpr int64_t kSplitChunkAlign = 1024;  // chunk lengths are multiples of this (keeps chunk starts congruent)
constexpr int kSplitBlocksPerSm = 4;        // 4 x 512 threads = a full sm_80 / sm_90 SM

// Longest row of the warp path: 32 elements per lane (16 for double, to stay clear of register spills).
template <typename scalar_t>
constexpr int64_t kWarpMaxV = std::is_same_v<scalar_t, double> ? 512 : 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block path threads: enough that each thread has about two unrolled iterations of the reduction loop.
template <typename scalar_t>
int block_threads(int64_t V) {
  const int64_t per_iter = static_cast<int64_t>(kVecOf<scalar_t>) * kUnroll;
  int t = kBlockMinThreads;
  while (t < kBlockMaxThreads && static_cast<int64_t>(t) * per_iter * 2 < V) t *= 2;
  return t;
}

// How to cut rows for the split path; chunks == 1 means "use the block path".
struct SplitPlan {
  int64_t chunks = 1;
  int64_t chunk_len = 0;
};

SplitPlan plan_split(int64_t rows, int64_t V) {
  SplitPlan p;
  p.chunk_len = V;
  if (V < kSplitMinV) return p;
  const int64_t sms = sm_count();
  // With one block per row, rows >= 2 * SMs already give every SM half its block slots or more.
  if (rows >= 2 * sms) return p;
  int64_t chunks = ceil_div(sms * kSplitBlocksPerSm, rows);
  chunks = std::min(chunks, V / kSplitMinChunk);
  if (chunks < 2) return p;
  const int64_t len = ceil_div(ceil_div(V, chunks), kSplitChunkAlign) * kSplitChunkAlign;
  p.chunks = ceil_div(V, len);  // every chunk non-empty: (chunks - 1) * len < V
  p.chunk_len = len;
  return p;
}

// Calls f(integral_constant<kLanes>, integral_constant<kItems>) for the warp-path shape of a row of length V
// (V <= kWarpMaxV): kNext = next_pow2(V) elements over kLanes lanes, at least one 16-byte vector (kVec elements)
// per lane, so that the body of a row is read in 16-byte packs; kLanes = kNext / kItems (1 for rows of one vector
// or less: a thread per row, no shuffles), 32 from kNext = 32 kVec on. Starts from kNext = kVec.
template <typename scalar_t, int kNextIn = 0, typename F>
void with_warp_shape(int64_t V, F&& f) {
  using std::integral_constant;
  constexpr int kNext = kNextIn == 0 ? kVecOf<scalar_t> : kNextIn;
  if constexpr (kNext > kWarpMaxV<scalar_t>) {
    TORCH_INTERNAL_ASSERT(false, "fastloss: row length ", V, " is too long for the warp path");
  } else {
    constexpr int kItems = std::max(kVecOf<scalar_t>, kNext / kWarpSize);
    if (V <= kNext) return f(integral_constant<int, kNext / kItems>{}, integral_constant<int, kItems>{});
    return with_warp_shape<scalar_t, 2 * kNext>(V, std::forward<F>(f));
  }
}

// ---------------------------------------------------------------- per-thread / per-block row pieces

// Per-thread partial online state of a[0..n).
template <typename T>
__device__ __forceinline__ fm::OnlineState<acc_t<T>> thread_online(const T* a, int64_t n, int64_t head) {
  auto s = fm::online_init<acc_t<T>>();
  segment_visit<kUnroll, false>(a, a, n, head, threadIdx.x, blockDim.x,
                                [&](const auto& v, const auto&) { s = fm::online_update_block(s, v); });
  return s;
}

// Per-thread partial two-pass state of a[0..n).
template <typename T>
__device__ __forceinline__ fm::ExpState<acc_t<T>> thread_exp(const T* a, int64_t n, int64_t head) {
  auto s = fm::exp_init<acc_t<T>>();
  segment_visit<kUnroll, false>(a, a, n, head, threadIdx.x, blockDim.x,
                                [&](const auto& v, const auto&) { s = fm::exp_update_block(s, v); });
  return s;
}

// The normaliser (m, d) of the row x[0..n), computed by the whole block (every thread returns it). Both
// algorithms end in an online pair (two-pass through exp_to_online), so the second pass and the lse are shared.
// Two-pass rows whose top exponent is out of the split's exact range (huge |x|, inf, NaN) are recomputed with the
// online rule, as on the CPU; the test is on the block-wide state, so the branch is uniform.
template <typename T>
__device__ fm::OnlineState<acc_t<T>> block_row_state(const T* x, int64_t n, Algorithm alg) {
  const int64_t head = aligned_head(x, n);
  if (alg == Algorithm::TwoPass) {
    const auto s = block_allreduce(thread_exp(x, n, head));
    if (!fm::exp_needs_fallback(s)) return fm::exp_to_online(s);
  }
  return block_allreduce(thread_online(x, n, head));
}

// out[0..n) = softmax_at / log_softmax_at from the row's finished (m, d), as the CPU kernels. This gives torch's
// NaN rows for all -inf (0 / 0) and for a +inf (d = NaN).
template <typename T>
__device__ __forceinline__ void block_write_softmax(const T* x, T* out, int64_t n, fm::OnlineState<acc_t<T>> st,
                                                    bool log) {
  using acc = acc_t<T>;
  const int64_t head = same_alignment(x, out) ? aligned_head(x, n) : n;
  const acc m = st.m;
  if (log) {
    const acc log_d = fm::Ops<acc>::log(st.d);
    segment_map<false>(x, x, out, n, head, threadIdx.x, blockDim.x,
                       [=](acc v, acc) { return fm::log_softmax_at(v, m, log_d); });
  } else {
    const acc inv_d = acc(1) / st.d;
    segment_map<false>(x, x, out, n, head, threadIdx.x, blockDim.x,
                       [=](acc v, acc) { return fm::softmax_at(v, m, inv_d); });
  }
}

// Head for a backward segment: vector loads only when grad, out and grad_input share their 16-byte offset.
template <typename T>
__device__ __forceinline__ int64_t backward_head(const T* g, const T* y, const T* gi, int64_t n) {
  return same_alignment(g, y) && same_alignment(g, gi) ? aligned_head(g, n) : n;
}

// Per-thread partial of the backward's row sum: sum(g * y) (softmax) or sum(g) (log_softmax).
template <typename T>
__device__ __forceinline__ acc_t<T> thread_backward_sum(const T* g, const T* y, int64_t n, int64_t head, bool log) {
  using acc = acc_t<T>;
  acc s = acc(0);
  if (log) {
    segment_visit<kUnroll, false>(g, g, n, head, threadIdx.x, blockDim.x, [&](const auto& gv, const auto&) {
      for (acc v : gv) s += v;
    });
  } else {
    segment_visit<kUnroll, true>(g, y, n, head, threadIdx.x, blockDim.x, [&](const auto& gv, const auto& yv) {
      constexpr int N = std::extent_v<std::remove_reference_t<decltype(gv)>>;
#pragma unroll
      for (int i = 0; i < N; ++i) s += gv[i] * yv[i];
    });
  }
  return s;
}

// grad_input = y * (g - s) (softmax) or g - exp(y) * s (log_softmax) over a segment, s the full row's sum.
template <typename T>
__device__ __forceinline__ void block_write_backward(const T* g, const T* y, T* gi, int64_t n, int64_t head,
                                                     acc_t<T> s, bool log) {
  using acc = acc_t<T>;
  if (log) {
    segment_map<true>(g, y, gi, n, head, threadIdx.x, blockDim.x,
                      [=](acc gv, acc yv) { return gv - fm::exp_nonpos(yv) * s; });
  } else {
    segment_map<true>(g, y, gi, n, head, threadIdx.x, blockDim.x, [=](acc gv, acc yv) { return yv * (gv - s); });
  }
}

// Normaliser (m, d) of a row held in registers by a group of kLanes lanes (padding = -inf, neutral for both
// states). The groups sharing a warp may disagree on the two-pass fallback, and the online recomputation
// shuffles, so it runs for the whole warp whenever any group needs it (rare: |x| > ~2.9e6, inf or NaN).
template <int kLanes, typename acc, int N>
__device__ __forceinline__ fm::OnlineState<acc> warp_row_state(const acc (&v)[N], Algorithm alg) {
  if (alg == Algorithm::TwoPass) {
    const auto s = warp_allreduce<kLanes>(fm::exp_update_block(fm::exp_init<acc>(), v));
    const bool fallback = fm::exp_needs_fallback(s);
    if (!__any_sync(kFullMask, fallback)) return fm::exp_to_online(s);
    const auto online = warp_allreduce<kLanes>(fm::online_update_block(fm::online_init<acc>(), v));
    return fallback ? online : fm::exp_to_online(s);
  }
  return warp_allreduce<kLanes>(fm::online_update_block(fm::online_init<acc>(), v));
}

// ---------------------------------------------------------------- kernels: warp path
//
// A group of kLanes lanes holds a row in registers: a scalar head of h elements (up to the row's first 16-byte
// boundary, h < kVec), a body of nb 16-byte packs, a scalar tail of under kVec elements. Body pack j of a lane is
// pack j kLanes + lane of the body (consecutive lanes touch consecutive packs: coalesced); the head and tail
// elements ("extras", E = h + tail of them) are spread over the lanes the same way, slot x of a lane being extra
// x kLanes + lane. A lane's values: v[0..kItems) the body, v[kItems..kItems + kExtra) its extras.
//
// The head length is the row's own, so every row length is read in packs; the row's tensors (x and out, or g, y
// and gin) must only sit at the same offset from a 16-byte boundary (a uniform test, once per launch). Otherwise
// (a misaligned view) the row is read one element per access: v[i] = column i kLanes + lane.

template <int kLanes, int kItems, typename T>
constexpr int kExtraOf = std::min((2 * (kVecOf<T> - 1) + kLanes - 1) / kLanes, kItems);

template <int kLanes, int kItems, typename T>
struct WarpRow {
  static constexpr int kW = kVecOf<T>;
  static constexpr int kExtra = kExtraOf<kLanes, kItems, T>;
  int64_t h, nb, extras;  // head length, body packs, head + tail elements

  __device__ __forceinline__ WarpRow(const T* row, int64_t V)
      : h(aligned_head(row, V)), nb((V - h) / kW), extras(V - nb * kW) {}
  // Column of extra e (< extras): the head's, then the tail's.
  __device__ __forceinline__ int64_t extra_col(int64_t e) const { return e < h ? e : e + nb * kW; }
};

// v = the lane's elements of row p[0..V) (`pad` where it has none, or for an invalid row).
template <int kLanes, int kItems, typename T, typename acc, int M>
__device__ __forceinline__ void warp_load(const T* __restrict__ p, int64_t V, bool valid, int lane, bool packed,
                                          acc pad, acc (&v)[M]) {
  using R = WarpRow<kLanes, kItems, T>;
  constexpr int kW = R::kW;
  static_assert(M == kItems + R::kExtra);
  using P = Pack<T, kW>;
  FL_ROW_TRAFFIC(valid ? lane : 1, V * sizeof(T), 0);
#pragma unroll
  for (int i = 0; i < M; ++i) v[i] = pad;
  if (!valid) return;
  if (packed) {
    const R row(p, V);
    const P* body = reinterpret_cast<const P*>(p + row.h);
#pragma unroll
    for (int j = 0; j < kItems / kW; ++j) {
      const int64_t pk = static_cast<int64_t>(j) * kLanes + lane;
      if (pk < row.nb) {
        const P x = body[pk];  // the pack copied whole: one 16-byte load (unpack through the pointer: one per element)
        unpack(x, v + j * kW);
      }
    }
#pragma unroll
    for (int x = 0; x < R::kExtra; ++x) {
      const int64_t e = static_cast<int64_t>(x) * kLanes + lane;
      // fl-audit: cold -- the row's head and tail: under one 16-byte vector each, per row
      if (e < row.extras) v[kItems + x] = static_cast<acc>(p[row.extra_col(e)]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * kLanes + lane;
      // fl-audit: cold -- misaligned views only (the row's tensors at different 16-byte offsets): one element per
      // load
      if (col < V) v[i] = static_cast<acc>(p[col]);
    }
  }
}

// out[0..V) of the lane's elements = f(i), i its value index as in warp_load, for a valid row.
template <int kLanes, int kItems, typename T, typename F>
__device__ __forceinline__ void warp_store(T* __restrict__ out, int64_t V, int lane, bool packed, F&& f) {
  using R = WarpRow<kLanes, kItems, T>;
  constexpr int kW = R::kW;
  using P = Pack<T, kW>;
  FL_ROW_TRAFFIC(lane, 0, V * sizeof(T));
  if (packed) {
    const R row(out, V);
    P* body = reinterpret_cast<P*>(out + row.h);
#pragma unroll
    for (int j = 0; j < kItems / kW; ++j) {
      const int64_t pk = static_cast<int64_t>(j) * kLanes + lane;
      if (pk < row.nb) {
        P r;
#pragma unroll
        for (int k = 0; k < kW; ++k) r.v[k] = static_cast<T>(f(j * kW + k));
        body[pk] = r;
      }
    }
#pragma unroll
    for (int x = 0; x < R::kExtra; ++x) {
      const int64_t e = static_cast<int64_t>(x) * kLanes + lane;
      // fl-audit: cold -- the row's head and tail (as warp_load)
      if (e < row.extras) out[row.extra_col(e)] = static_cast<T>(f(kItems + x));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * kLanes + lane;
      // fl-audit: cold -- misaligned views only (as warp_load): one element per store
      if (col < V) out[col] = static_cast<T>(f(i));
    }
  }
}

// Forward, one row per group of kLanes lanes. The loop bound is uniform over the block (groups past the last row
// run on padding and store nothing), so every shuffle sees the whole warp.
template <typename scalar_t, int kLanes, int kItems>
__global__ void __launch_bounds__(kWarpThreads, kWarpMinBlocks)
    warp_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows, int64_t V,
                        Mode mode, Algorithm alg) {
  using acc = acc_t<scalar_t>;
  constexpr int kRowsPerBlock = kWarpThreads / kLanes;
  constexpr int M = kItems + kExtraOf<kLanes, kItems, scalar_t>;
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const bool packed = mode == Mode::Lse || same_alignment(x, static_cast<const scalar_t*>(out));
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + group;
    const bool valid = row < rows;
    const int64_t base = (valid ? row : 0) * V;
    acc v[M];
    warp_load<kLanes, kItems>(x + base, V, valid, lane, packed, -fm::Limits<acc>::inf, v);
    const auto st = warp_row_state<kLanes>(v, alg);
    if (mode == Mode::Lse) {
      // fl-audit: cold -- lane 0 writes the row's lse once per row
      if (valid && lane == 0) out[row] = static_cast<scalar_t>(finish_online(st));
    } else if (valid && mode == Mode::LogSoftmax) {
      const acc log_d = fm::Ops<acc>::log(st.d);
      warp_store<kLanes, kItems>(out + base, V, lane, packed,
                                 [&](int i) { return fm::log_softmax_at(v[i], st.m, log_d); });
    } else if (valid) {
      const acc inv_d = acc(1) / st.d;
      warp_store<kLanes, kItems>(out + base, V, lane, packed,
                                 [&](int i) { return fm::softmax_at(v[i], st.m, inv_d); });
    }
  }
}

// Backward, one row per group of kLanes lanes: grad and out in registers, one shuffle sum.
template <typename scalar_t, int kLanes, int kItems>
__global__ void __launch_bounds__(kWarpThreads, kWarpMinBlocks)
    warp_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                         scalar_t* __restrict__ gin, int64_t rows, int64_t V, bool log) {
  using acc = acc_t<scalar_t>;
  constexpr int kRowsPerBlock = kWarpThreads / kLanes;
  constexpr int M = kItems + kExtraOf<kLanes, kItems, scalar_t>;
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const bool packed = same_alignment(g, y) && same_alignment(g, static_cast<const scalar_t*>(gin));
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + group;
    const bool valid = row < rows;
    const int64_t base = (valid ? row : 0) * V;
    acc gv[M], yv[M];
    warp_load<kLanes, kItems>(g + base, V, valid, lane, packed, acc(0), gv);
    warp_load<kLanes, kItems>(y + base, V, valid, lane, packed, acc(0), yv);
    acc s = acc(0);
#pragma unroll
    for (int i = 0; i < M; ++i) s += log ? gv[i] : gv[i] * yv[i];
    s = warp_allreduce<kLanes>(s);
    if (valid) {
      warp_store<kLanes, kItems>(gin + base, V, lane, packed, [&](int i) {
        return log ? gv[i] - fm::exp_nonpos(yv[i]) * s : yv[i] * (gv[i] - s);
      });
    }
  }
}

// ---------------------------------------------------------------- kernels: block path

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockMaxThreads)
    block_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows, int64_t V,
                         Mode mode, Algorithm alg) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* xr = x + r * V;
    const auto st = block_row_state(xr, V, alg);
    if (mode == Mode::Lse) {
      // fl-audit: cold -- thread 0 writes the row's lse once per row
      if (threadIdx.x == 0) out[r] = static_cast<scalar_t>(finish_online(st));
    } else {
      block_write_softmax(xr, out + r * V, V, st, mode == Mode::LogSoftmax);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockMaxThreads)
    block_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                          scalar_t* __restrict__ gin, int64_t rows, int64_t V, bool log) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* gr = g + r * V;
    const scalar_t* yr = y + r * V;
    scalar_t* ir = gin + r * V;
    const int64_t head = backward_head(gr, yr, ir, V);
    const auto s = block_allreduce(thread_backward_sum(gr, yr, V, head, log));
    block_write_backward(gr, yr, ir, V, head, s, log);
  }
}

// ---------------------------------------------------------------- kernels: split path
//
// Block b of the (row, chunk) kernels handles row b / chunks, elements [c * chunk_len, min((c + 1) * chunk_len,
// V)) with c = b % chunks. rows * chunks is small here (about 4 blocks per SM), the loops are for safety only.

// Partial state of each (row, chunk): ws[2b], ws[2b + 1] = (m, d) for online, (a, k) for two-pass.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    split_state_kernel(const scalar_t* __restrict__ x, acc_t<scalar_t>* __restrict__ ws, int64_t rows, int64_t V,
                       int64_t chunks, int64_t chunk_len, Algorithm alg) {
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t r = b / chunks, begin = (b - r * chunks) * chunk_len;
    const int64_t n = std::min(chunk_len, V - begin);
    const scalar_t* seg = x + r * V + begin;
    const int64_t head = aligned_head(seg, n);
    if (alg == Algorithm::TwoPass) {
      const auto s = block_allreduce(thread_exp(seg, n, head));
      if (threadIdx.x == 0) {
        // fl-audit: cold -- thread 0 writes the (row, chunk)'s partial (a, k) once per chunk
        ws[2 * b] = s.a;
        ws[2 * b + 1] = s.k;
      }
    } else {
      const auto s = block_allreduce(thread_online(seg, n, head));
      if (threadIdx.x == 0) {
        // fl-audit: cold -- thread 0 writes the (row, chunk)'s partial (m, d) once per chunk
        ws[2 * b] = s.m;
        ws[2 * b + 1] = s.d;
      }
    }
  }
}

// Merges the chunk states of each row and finishes it: out[r] = lse (logsumexp, when out is non-null) and / or
// row[2r], row[2r + 1] = the row's (m, d) (softmax, when row is non-null). A two-pass row that needs the fallback
// is recomputed with the online rule by this one block (rare, and slower: one block reads the whole row).
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    split_merge_kernel(const scalar_t* __restrict__ x, const acc_t<scalar_t>* __restrict__ ws,
                       scalar_t* __restrict__ out, acc_t<scalar_t>* __restrict__ row, int64_t rows, int64_t V,
                       int64_t chunks, Algorithm alg) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const acc* wr = ws + 2 * r * chunks;
    fm::OnlineState<acc> st;
    if (alg == Algorithm::TwoPass) {
      auto s = fm::exp_init<acc>();
      // fl-audit: cold -- the row's chunk states, one (a, k) pair per chunk: a few per thread per row at most
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) s = fm::exp_merge(s, {wr[2 * c], wr[2 * c + 1]});
      s = block_allreduce(s);
      st = fm::exp_needs_fallback(s) ? block_row_state(x + r * V, V, Algorithm::Online) : fm::exp_to_online(s);
    } else {
      auto s = fm::online_init<acc>();
      // fl-audit: cold -- the row's chunk states, one (m, d) pair per chunk: a few per thread per row at most
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) s = fm::online_merge(s, {wr[2 * c], wr[2 * c + 1]});
      st = block_allreduce(s);
    }
    if (threadIdx.x == 0) {
      // fl-audit: cold -- thread 0 writes the row's lse and / or its merged (m, d) once per row
      if (out != nullptr) out[r] = static_cast<scalar_t>(finish_online(st));
      if (row != nullptr) {
        row[2 * r] = st.m;
        row[2 * r + 1] = st.d;
      }
    }
  }
}

// Softmax second pass over (row, chunk), from the row's merged (m, d).
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    split_softmax_kernel(const scalar_t* __restrict__ x, const acc_t<scalar_t>* __restrict__ row,
                         scalar_t* __restrict__ out, int64_t rows, int64_t V, int64_t chunks, int64_t chunk_len,
                         bool log) {
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t r = b / chunks, begin = (b - r * chunks) * chunk_len;
    const int64_t n = std::min(chunk_len, V - begin);
    const int64_t off = r * V + begin;
    // fl-audit: cold -- the row's merged (m, d), two loads per thread per (row, chunk)
    block_write_softmax(x + off, out + off, n, {row[2 * r], row[2 * r + 1]}, log);
  }
}

// Backward partial sums of each (row, chunk): ws[b].
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    split_backward_sum_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                              acc_t<scalar_t>* __restrict__ ws, int64_t rows, int64_t V, int64_t chunks,
                              int64_t chunk_len, bool log) {
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t r = b / chunks, begin = (b - r * chunks) * chunk_len;
    const int64_t n = std::min(chunk_len, V - begin);
    const int64_t off = r * V + begin;
    const int64_t head = same_alignment(g + off, y + off) ? aligned_head(g + off, n) : n;
    const auto s = block_allreduce(thread_backward_sum(g + off, y + off, n, head, log));
    // fl-audit: cold -- thread 0 writes the (row, chunk)'s partial sum once per chunk
    if (threadIdx.x == 0) ws[b] = s;
  }
}

// Backward write over (row, chunk): every block re-sums its row's chunk partials (few, and in one fixed order,
// so all chunks of a row use the bit-identical sum).
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    split_backward_apply_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                const acc_t<scalar_t>* __restrict__ ws, scalar_t* __restrict__ gin, int64_t rows,
                                int64_t V, int64_t chunks, int64_t chunk_len, bool log) {
  using acc = acc_t<scalar_t>;
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t r = b / chunks, begin = (b - r * chunks) * chunk_len;
    const int64_t n = std::min(chunk_len, V - begin);
    const int64_t off = r * V + begin;
    acc s = acc(0);
    // fl-audit: cold -- the row's chunk partial sums, a few per thread per (row, chunk) at most
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) s += ws[r * chunks + c];
    s = block_allreduce(s);
    block_write_backward(g + off, y + off, gin + off, n, backward_head(g + off, y + off, gin + off, n), s, log);
  }
}

// ---------------------------------------------------------------- kernels: logsumexp backward

// gin[r, j] = grad[r] * exp(x[r, j] - lse[r]).
//
// Rows of at least one 16-byte vector per lane (V >= 32 kVec): warp w of the grid takes row segments of
// kLseSegVecs vectors per lane, loads the row's grad and lse once per segment and maps the segment with 16-byte
// loads and stores (segment_map; the head aligns x and gin alike, or the segment is read element by element when
// their offsets differ).
constexpr int kLseSegVecs = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kEltThreads)
    logsumexp_backward_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ lse, scalar_t* __restrict__ gin, int64_t rows,
                                   int64_t V) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kSeg = static_cast<int64_t>(kLseSegVecs) * kWarpSize * kVecOf<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t segs = (V + kSeg - 1) / kSeg;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize; w < rows * segs;
       w += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t r = w / segs, begin = (w - r * segs) * kSeg;
    const int64_t n = std::min(kSeg, V - begin);
    const int64_t off = r * V + begin;
    // fl-audit: cold -- the row's grad and lse, once per segment of kLseSegVecs vectors per lane
    const acc gr = static_cast<acc>(grad[r]), lr = static_cast<acc>(lse[r]);
    const int64_t head = same_alignment(x + off, gin + off) ? aligned_head(x + off, n) : n;
    segment_map<false>(x + off, x + off, gin + off, n, head, lane, kWarpSize,
                       [=](acc xv, acc) { return gr * fm::exp_nonpos(xv - lr); });
  }
}

// Shorter rows (V < 32 kVec), over the flat [rows * V] buffer: with vec_ok (x and gin 16-byte aligned) each thread
// handles one 16-byte vector at a time: one 64-bit division finds its first (row, column), later elements step the
// column and wrap into the next row (several times when V < kVec).
template <typename scalar_t>
__global__ void __launch_bounds__(kEltThreads)
    logsumexp_backward_flat_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ lse, scalar_t* __restrict__ gin, int64_t rows,
                                   int64_t V, bool vec_ok) {
  using acc = acc_t<scalar_t>;
  constexpr int kVec = kVecOf<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const int64_t n = rows * V;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  FL_ROW_TRAFFIC(tid, n * sizeof(scalar_t), n * sizeof(scalar_t));  // the grid walks the whole tensor once
  int64_t done = 0;
  if (vec_ok) {
    const int64_t nvec = n / kVec;
    const P* px = reinterpret_cast<const P*>(x);
    P* pi = reinterpret_cast<P*>(gin);
    for (int64_t i = tid; i < nvec; i += stride) {
      int64_t r = i * kVec / V;
      int64_t c = i * kVec - r * V;
      // fl-audit: cold -- short rows only (V < 32 vectors; longer rows take the rows kernel): the vector's row's
      // grad and lse, for a row of at most 31 vectors
      acc gr = static_cast<acc>(grad[r]), lr = static_cast<acc>(lse[r]);
      const P xv = px[i];
      P o;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        o.v[k] = static_cast<scalar_t>(gr * fm::exp_nonpos(static_cast<acc>(xv.v[k]) - lr));
        // Next element in the next row? (Never past the last row: element k + 1 of a full vector exists.)
        if (++c == V && k + 1 < kVec) {
          c = 0;
          ++r;
          // fl-audit: cold -- the next row's grad and lse, reloaded at a row boundary: once per row
          gr = static_cast<acc>(grad[r]);
          lr = static_cast<acc>(lse[r]);
        }
      }
      pi[i] = o;
    }
    done = nvec * kVec;
  }
  for (int64_t j = done + tid; j < n; j += stride) {
    const int64_t r = j / V;
    // fl-audit: cold -- the remainder (under kVec elements of the whole tensor), or the whole tensor when x
    // or gin is not 16-byte aligned (a misaligned view: the rare fallback)
    gin[j] = static_cast<scalar_t>(static_cast<acc>(grad[r]) *
                                   fm::exp_nonpos(static_cast<acc>(x[j]) - static_cast<acc>(lse[r])));
  }
}

// ---------------------------------------------------------------- host side

template <typename scalar_t>
// Passes over the row data (checked against the CPU execution layer's byte counts, tests/test_emu_traffic.py; read
// by bench/audit_cuda.py for its pass-bound ceilings):
// fl-passes: softmax = 2R + 1W (floor 1R + 1W) -- block path (V > 1024): the statistics, then a re-read to write
// fl-passes: softmax_warp = 1R + 1W (floor 1R + 1W) -- warp path (V <= 1024): the row stays in registers
// fl-passes: logsumexp = 1R + 0W (floor 1R + 0W)
void forward_impl(const at::Tensor& x, const at::Tensor& out, Mode mode, Algorithm alg) {
  using acc = acc_t<scalar_t>;
  const int64_t rows = x.size(0), V = x.size(1);
  if (rows == 0 || V == 0) return;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  const Stream stream = current_stream();

  if (V <= kWarpMaxV<scalar_t>) {
    with_warp_shape<scalar_t>(V, [&](auto lanes, auto items) {
      constexpr int kLanes = decltype(lanes)::value, kItems = decltype(items)::value;
      const unsigned blocks = grid_size(ceil_div(rows, kWarpThreads / kLanes));
      launch_kernel<&warp_forward_kernel<scalar_t, kLanes, kItems>>(blocks, kWarpThreads, 0, stream, px, po, rows, V,
                                                                     mode, alg);
    });
    return;
  }

  const SplitPlan plan = plan_split(rows, V);
  if (plan.chunks == 1) {
    launch_kernel<&block_forward_kernel<scalar_t>>(grid_size(rows), block_threads<scalar_t>(V), 0, stream, px, po,
                                                   rows, V, mode, alg);
    return;
  }

  // Workspace from the caching allocator (stream-ordered, no synchronisation): a state per (row, chunk), then
  // each row's merged (m, d) for the softmax pass.
  const int64_t parts = rows * plan.chunks;
  at::Tensor ws = at::empty({2 * parts + 2 * rows}, x.options().dtype(c10::CppTypeToScalarType<acc>::value));
  acc* pws = ws.mutable_data_ptr<acc>();
  acc* prow = pws + 2 * parts;
  launch_kernel<&split_state_kernel<scalar_t>>(grid_size(parts), kSplitThreads, 0, stream, px, pws, rows, V,
                                               plan.chunks, plan.chunk_len, alg);
  const bool lse_only = mode == Mode::Lse;
  launch_kernel<&split_merge_kernel<scalar_t>>(grid_size(rows), kSplitThreads, 0, stream,
      px, pws, lse_only ? po : nullptr, lse_only ? nullptr : prow, rows, V, plan.chunks, alg);
  if (lse_only) return;
  launch_kernel<&split_softmax_kernel<scalar_t>>(grid_size(parts), kSplitThreads, 0, stream,
      px, prow, po, rows, V, plan.chunks, plan.chunk_len, mode == Mode::LogSoftmax);
}

template <typename scalar_t>
// fl-passes: softmax_backward = 4R + 1W (floor 2R + 1W) -- block path: sum(g y), then g and y re-read to write
// fl-passes: softmax_backward_warp = 2R + 1W (floor 2R + 1W)
void backward_impl(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gin, bool log) {
  using acc = acc_t<scalar_t>;
  const int64_t rows = out.size(0), V = out.size(1);
  if (rows == 0 || V == 0) return;
  const scalar_t* pg = grad.const_data_ptr<scalar_t>();
  const scalar_t* py = out.const_data_ptr<scalar_t>();
  scalar_t* pi = gin.mutable_data_ptr<scalar_t>();
  const Stream stream = current_stream();

  if (V <= kWarpMaxV<scalar_t>) {
    with_warp_shape<scalar_t>(V, [&](auto lanes, auto items) {
      constexpr int kLanes = decltype(lanes)::value, kItems = decltype(items)::value;
      const unsigned blocks = grid_size(ceil_div(rows, kWarpThreads / kLanes));
      launch_kernel<&warp_backward_kernel<scalar_t, kLanes, kItems>>(blocks, kWarpThreads, 0, stream, pg, py, pi,
                                                                      rows, V, log);
    });
    return;
  }

  const SplitPlan plan = plan_split(rows, V);
  if (plan.chunks == 1) {
    launch_kernel<&block_backward_kernel<scalar_t>>(grid_size(rows), block_threads<scalar_t>(V), 0, stream, pg, py,
                                                    pi, rows, V, log);
    return;
  }

  const int64_t parts = rows * plan.chunks;
  at::Tensor ws = at::empty({parts}, out.options().dtype(c10::CppTypeToScalarType<acc>::value));
  acc* pws = ws.mutable_data_ptr<acc>();
  launch_kernel<&split_backward_sum_kernel<scalar_t>>(grid_size(parts), kSplitThreads, 0, stream,
      pg, py, pws, rows, V, plan.chunks, plan.chunk_len, log);
  launch_kernel<&split_backward_apply_kernel<scalar_t>>(grid_size(parts), kSplitThreads, 0, stream,
      pg, py, pws, pi, rows, V, plan.chunks, plan.chunk_len, log);
}

template <typename scalar_t>
// fl-passes: logsumexp_backward = 1R + 1W (floor 1R + 1W)
void logsumexp_backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse,
                             const at::Tensor& gin) {
  const int64_t rows = x.size(0), V = x.size(1);
  if (rows == 0 || V == 0) return;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  scalar_t* pi = gin.mutable_data_ptr<scalar_t>();
  const scalar_t* pg = grad.const_data_ptr<scalar_t>();
  const scalar_t* pl = lse.const_data_ptr<scalar_t>();
  constexpr int kVec = kVecOf<scalar_t>;
  // Enough blocks to fill the GPU several times over; beyond that threads loop (grid-stride).
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 32;
  if (V >= static_cast<int64_t>(kWarpSize) * kVec) {
    constexpr int64_t kSeg = static_cast<int64_t>(kLseSegVecs) * kWarpSize * kVec;
    const int64_t warps = rows * ceil_div(V, kSeg);
    const int64_t blocks = std::min<int64_t>(ceil_div(warps, kEltThreads / kWarpSize), max_blocks);
    launch_kernel<&logsumexp_backward_rows_kernel<scalar_t>>(grid_size(blocks), kEltThreads, 0, current_stream(),
        pg, px, pl, pi, rows, V);
    return;
  }
  const bool vec_ok = reinterpret_cast<uintptr_t>(px) % kVecBytes == 0 && reinterpret_cast<uintptr_t>(pi) % kVecBytes == 0;
  const int64_t work = vec_ok ? ceil_div(rows * V, kVec) : rows * V;
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kEltThreads), max_blocks);
  launch_kernel<&logsumexp_backward_flat_kernel<scalar_t>>(grid_size(blocks), kEltThreads, 0, current_stream(),
      pg, px, pl, pi, rows, V, vec_ok);
}

// ---------------------------------------------------------------- the kernel table

void logsumexp_kernel(const at::Tensor& x, const at::Tensor& out, Algorithm alg) {
  const DeviceGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastloss_logsumexp_cuda",
                                  [&] { forward_impl<scalar_t>(x, out, Mode::Lse, alg); });
}

void softmax_kernel(const at::Tensor& x, const at::Tensor& out, bool log, Algorithm alg) {
  const DeviceGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastloss_softmax_cuda", [&] {
    forward_impl<scalar_t>(x, out, log ? Mode::LogSoftmax : Mode::Softmax, alg);
  });
}

void softmax_backward_kernel(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gin, bool log) {
  const DeviceGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastloss_softmax_backward_cuda",
                                  [&] { backward_impl<scalar_t>(grad, out, gin, log); });
}

void logsumexp_backward_kernel_host(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse,
                                    const at::Tensor& gin) {
  const DeviceGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastloss_logsumexp_backward_cuda",
                                  [&] { logsumexp_backward_impl<scalar_t>(grad, x, lse, gin); });
}

// PLACEHOLDER, to be replaced by GPU measurements (fastloss-bench --suite softmax on the target GPUs): this
// build has never run on a GPU. Online is the safe default: it never needs the fallback re-read, and its block
// update costs 1 + 1/N exponentials per element, about what the two-pass split costs in polynomial work.
Algorithm choose_algorithm(int64_t rows, int64_t V, at::ScalarType dtype) { return Algorithm::Online; }

}  // namespace

// csrc/cuda/softmax_topk_cuda.cu
void softmax_topk_cuda(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices,
                       Algorithm alg);
}  // namespace cuda

const SoftmaxKernels& cuda_softmax_kernels() {
  static const SoftmaxKernels table{&cuda::logsumexp_kernel,
                                    &cuda::softmax_kernel,
                                    &cuda::softmax_backward_kernel,
                                    &cuda::logsumexp_backward_kernel_host,
                                    &cuda::choose_algorithm,
                                    &cuda::softmax_topk_cuda,
                                    cuda::kMaxTopK};
  return table;
}

}  // namespace fastloss
