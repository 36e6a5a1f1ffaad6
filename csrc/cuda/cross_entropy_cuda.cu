// CUDA row kernels for cross-entropy from logits (the table of fastloss/cross_entropy_kernels.h).
//
// The CPU kernels (csrc/cpu/cross_entropy_cpu_kernels.h) are the reference: the same formulas from fastloss/math.h
// and fastloss/loss_math.h, the same per-row double outputs (loss, lse, sum_wy), the same shift of the fused sums,
// the same p = exp(x - m) / d from the saved float64 lse in the backward.
//
// Layout: a block of kThreads threads is cut into groups of G = 2^gshift threads (8 <= G <= kThreads, picked from
// the row length so that each thread gets about two body iterations), one row per group; the groups walk the
// rows grid-stride. G = kThreads is the classic block-per-row kernel of LLM vocabularies; G <= 32 puts 1 to 4 rows
// in a warp for short rows and reduces with shuffles only. Each thread reads its share of the row with 16-byte
// vector loads (a scalar head up to the first 16-byte boundary, a scalar tail), kLoads vectors in flight.
//
//  * ce_index_kernel<Mode> (index_forward without / with the gradient, index_backward): one pass reduces the row
//    to its normaliser (m, d) -- online, or two-pass with the online fallback -- together with sum_c w_c (x'_c -
//    shift) when label smoothing is on; lane 0 of the group evaluates the double loss; then (gradient requested)
//    the group writes the row, re-reading the logits (from L2 when the rows in flight fit in it). The backward skips
//    the reduction and takes (m, 1/d) from the saved lse. The target entry is written last, by lane 0, from the x_t it
//    read before anything was overwritten (the in-place variant aliases grad and logits). The three modes are
//    separate kernels, so that the plain forward and backward do not pay the in-place kernel's register pressure.
//    Vocabulary shards (cross_entropy_shard_*) are two more modes of the same kernel: ShardForward reduces the
//    row as Forward does and writes its statistics (m, d, x'_t, sum_c w_c x'_c or d2) instead of a loss; ShardBackward
//    is Backward with the coefficients from the combined rows and the target entry only in the target's shard.
//  * ce_shard_loss_kernel: a thread per row, the loss of the combined rows (no logits).
//  * ce_prob_forward_kernel / ce_prob_backward_kernel: the same with a second [N, C] stream (the probabilities).
//  * scale_rows_kernel: x[r, :] *= scale[r]; rows (or the whole launch, for one shared scale) whose scale is
//    exactly 1 return at once.
//
// Every kernel is a template over the logits' dtype and the transform (identity or softcap), those that reduce
// rows also over the algorithm (online or two-pass: each instantiation holds one algorithm's loops); smoothing,
// weights and z-loss are uniform runtime branches. All launches go to the current stream; nothing
// synchronises the host (the class-weight sum is read through its pointer on the device); indices are int64_t.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastloss/cross_entropy_kernels.h"
#include "fastloss/loss_math.h"
#include "fastloss/math.h"
#include "launch.cuh"
#include "row_reduce.cuh"

namespace fastloss {
namespace cuda {
namespace {

// ---------------------------------------------------------------- launch configuration

constexpr int kThreads = 256;    // every kernel: 256 threads...
constexpr int kMinBlocks = 4;    // ...4 blocks (1024 threads) per SM: at most 64 registers per thread (see below)
constexpr int kMinGroupShift = 3;  // rows get at least 8 threads
constexpr int kMaxWarps = kThreads / kWarpSize;
constexpr int kIndexLoads = 2;  // 16-byte loads in flight per thread: one stream (logits), 32 bytes
constexpr int kProbLoads = 1;   // two streams (logits and probabilities): 2 x 16 bytes

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// log2 of the threads per row: the smallest group (>= 8) whose threads each get two body iterations or more.
template <typename scalar_t>
int group_shift(int64_t C, int loads) {
  const int64_t per_thread = static_cast<int64_t>(kVecOf<scalar_t>) * loads * 2;
  int s = kMinGroupShift;
  while ((1 << s) < kThreads && (int64_t{1} << s) * per_thread < C) ++s;
  return s;
}

inline unsigned row_blocks(int64_t N, int gshift) { return grid_size(ceil_div(N, kThreads >> gshift)); }

// ShardForward / ShardBackward: the vocabulary-shard statistics and gradient (fastloss/loss_math.h kShardStats).
enum class Mode : int { Forward = 0, ForwardGrad = 1, Backward = 2, ShardForward = 3, ShardBackward = 4 };

// ---------------------------------------------------------------- per-element transforms

struct Identity {
  template <class V>
  __device__ __forceinline__ V operator()(V v) const { return v; }
};

template <typename acc>
struct Softcap {
  acc cap, inv;
  __device__ __forceinline__ acc operator()(acc v) const { return fm::softcap_apply(v, cap, inv); }
  __device__ __forceinline__ acc grad(acc capped) const { return fm::softcap_grad(capped, inv); }
};

// Blocks per SM the register budget must allow (ptxas caps registers at 65536 / (kThreads * blocks)): 4 (64
// registers) for the plain kernels; 3 (80) with the softcap, whose tanh per element needs a few more registers
// and makes the kernel more compute-heavy anyway, and for kernels with more live values (kHeavy: the in-place
// forward, a reduction and a row write in one kernel, which sits right at 64; the probability forward, whose
// weighted rows hold three streams' values); float64 rows run libm's double exp / log / tanh per element:
// register-hungry and off the LLM path, so they get the whole register file (one block) rather than spill.
template <typename T, class Tx, bool kHeavy = false>
constexpr int kMinBlocksOf =
    std::is_same_v<T, double> ? 1 : (std::is_same_v<Tx, Identity> && !kHeavy ? kMinBlocks : 3);

// g * dx'/dx (the identity's factor is 1: no multiply).
template <typename acc>
__device__ __forceinline__ acc times_grad(const Identity&, acc g, acc) { return g; }
template <typename acc>
__device__ __forceinline__ acc times_grad(const Softcap<acc>& tx, acc g, acc capped) { return g * tx.grad(capped); }

// ---------------------------------------------------------------- row-level helpers (as the CPU's row_ops.h)

// The shift of the fused sums: the row's first transformed logit when finite, else 0.
template <typename T, class Tx>
__device__ __forceinline__ acc_t<T> row_shift(const T* x, const Tx& tx) {
  // fl-audit: cold -- the row's first logit (the shift), once per row
  const acc_t<T> v = tx(static_cast<acc_t<T>>(x[0]));
  return isfinite(v) ? v : acc_t<T>(0);
}

// A float64 lse as (m, 1/d) for softmax_at (fastloss/math.h lse_parts).
template <typename acc>
__device__ __forceinline__ fm::OnlineState<acc> normaliser_from_lse(double lse) {
  const auto p = fm::lse_parts<acc>(lse);
  return {p.m, p.scale};
}


// ---------------------------------------------------------------- group all-reductions

// A row's partial reduction: the normaliser state and kSums (1 or 2) fused double sums (b unused when kSums = 1).
template <typename S, int kSums>
struct Partial {
  S s;
  double a;
  double b;
};

// The state merges are row_reduce.cuh's merge(); a Partial adds its fused sums beside them.
template <typename S, int kSums>
__device__ __forceinline__ Partial<S, kSums> combine(const Partial<S, kSums>& x, const Partial<S, kSums>& y) {
  return {merge(x.s, y.s), x.a + y.a, kSums > 1 ? x.b + y.b : 0.0};
}

// Shuffles: kXor = true exchanges with lane ^ arg, false reads lane `arg`.
template <bool kXor, typename T>
__device__ __forceinline__ T shfl(T v, int arg) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  if constexpr (kXor) return __shfl_xor_sync(kFullMask, v, arg);
  else return __shfl_sync(kFullMask, v, arg);
}
template <bool kXor, typename T>
__device__ __forceinline__ fm::OnlineState<T> shfl(fm::OnlineState<T> s, int arg) {
  return {shfl<kXor>(s.m, arg), shfl<kXor>(s.d, arg)};
}
template <bool kXor, typename T>
__device__ __forceinline__ fm::ExpState<T> shfl(fm::ExpState<T> s, int arg) {
  return {shfl<kXor>(s.a, arg), shfl<kXor>(s.k, arg)};
}
template <bool kXor, typename S, int kSums>
__device__ __forceinline__ Partial<S, kSums> shfl(const Partial<S, kSums>& p, int arg) {
  return {shfl<kXor>(p.s, arg), shfl<kXor>(p.a, arg), kSums > 1 ? shfl<kXor>(p.b, arg) : 0.0};
}

// All-reduce over the group of `gsize` threads (a power of two, 8..kThreads) holding this thread; every thread of
// the group gets bit-identical values (broadcast from the group's first lane, or the same fold of the per-warp
// parts in the same order), so uniform decisions (the two-pass fallback) stay uniform. Every thread of the block
// must call it (groups of more than a warp use two block barriers, the first protecting the slots of the previous
// call).
template <typename S>
__device__ __forceinline__ S group_allreduce(S s, int gsize) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    if (off < gsize) s = combine(s, shfl<true>(s, off));
  }
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (gsize <= kWarpSize) return shfl<false>(s, lane & ~(gsize - 1));
  FL_SHARED(S, part, [kMaxWarps]);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  __syncthreads();
  if (lane == 0) part[warp] = s;
  __syncthreads();
  const int first = (static_cast<int>(threadIdx.x) & ~(gsize - 1)) / kWarpSize;
  const int nwarps = gsize / kWarpSize;
  S r = part[first];
  for (int w = 1; w < nwarps; ++w) r = combine(r, part[first + w]);
  return r;
}

// True on every thread when `pred` holds for any thread of the warp (groups <= 32) or block (larger groups): for
// branches that contain group reductions.
__device__ __forceinline__ bool group_any(bool pred, int gsize) {
  if (gsize <= kWarpSize) return __any_sync(kFullMask, pred);
  return __syncthreads_or(pred) != 0;
}

// Orders every thread's earlier reads and writes of the row before the group's later accesses.
__device__ __forceinline__ void group_sync(int gsize) {
  if (gsize <= kWarpSize) __syncwarp();
  else __syncthreads();
}

// ---------------------------------------------------------------- per-thread reduction passes

template <bool kTwoPass, typename acc>
using StateT = std::conditional_t<kTwoPass, fm::ExpState<acc>, fm::OnlineState<acc>>;

template <bool kTwoPass, int kSums, typename acc>
__device__ __forceinline__ Partial<StateT<kTwoPass, acc>, kSums> partial_init() {
  if constexpr (kTwoPass) return {fm::exp_init<acc>(), 0.0, 0.0};
  else return {fm::online_init<acc>(), 0.0, 0.0};
}

// Folds an array into the state. Two-pass folds sub-blocks of 4: each element's split (p, n) must wait for the
// block's common exponent, and 8 of them at once cost 16 registers (one more exact rescale per 4 elements instead).
template <bool kTwoPass, typename S, typename acc, int M>
__device__ __forceinline__ S state_update(S s, const acc (&v)[M]) {
  if constexpr (kTwoPass) {
    if constexpr (M > 4 && M % 4 == 0) {
#pragma unroll
      for (int h = 0; h < M; h += 4) {
        const acc sub[4] = {v[h], v[h + 1], v[h + 2], v[h + 3]};
        s = fm::exp_update_block(s, sub);
      }
      return s;
    } else {
      return fm::exp_update_block(s, v);
    }
  } else {
    return fm::online_update_block(s, v);
  }
}

// Class-index rows: the state of tx(x) and, when `smooth`, a = sum_c w_c (x'_c - shift) (w = 1 when null): float
// within one array, double across (as the CPU's float lanes flushed into double).
template <bool kTwoPass, int kLoads, typename T, class Tx>
__device__ __forceinline__ Partial<StateT<kTwoPass, acc_t<T>>, 1> index_pass(const T* x, int64_t n, int tid, int nt,
                                                                          const Tx& tx, bool smooth,
                                                                          const acc_t<T>* w_all, int64_t w_stride,
                                                                          acc_t<T> shift) {
  using acc = acc_t<T>;
  constexpr int K = kVecOf<T>;
  auto r = partial_init<kTwoPass, 1, acc>();
  const int64_t head = aligned_head(x, n);
  const acc* w = row_weights(w_all, w_stride, head);
  auto f = [&](auto& v, const auto&, int64_t c0, int64_t cs) {
    constexpr int M = extent_of<decltype(v)>;
#pragma unroll
    for (int e = 0; e < M; ++e) v[e] = tx(v[e]);
    r.s = state_update<kTwoPass>(r.s, v);
    if (smooth) {
      acc part = acc(0);
      if (w != nullptr) {
        acc wv[M];
        class_weights<K>(w, c0, cs, wv);
#pragma unroll
        for (int e = 0; e < M; ++e) part = fm::Ops<acc>::fma(v[e] - shift, wv[e], part);
      } else {
#pragma unroll
        for (int e = 0; e < M; ++e) part += v[e] - shift;
      }
      r.a += static_cast<double>(part);
    }
  };
  row_pass<kLoads, false, false>(x, x, static_cast<T*>(nullptr), n, head, tid, nt, f);
  return r;
}

// squentropy: a = sum_c p_c^2 with p_c = exp(x'_c - m) * inv_d (a second pass over the row, from L2 for LLM rows;
// the CPU fuses it into the reduction as a second running accumulator). The state is left neutral.
template <int kLoads, typename T, class Tx>
__device__ __forceinline__ Partial<fm::OnlineState<acc_t<T>>, 1> sq_pass(const T* x, int64_t n, int tid, int nt,
                                                                      const Tx& tx, acc_t<T> m, acc_t<T> inv_d) {
  using acc = acc_t<T>;
  auto r = partial_init<false, 1, acc>();
  auto f = [&](auto& v, const auto&, int64_t, int64_t) {
    constexpr int M = extent_of<decltype(v)>;
    acc part = acc(0);
#pragma unroll
    for (int e = 0; e < M; ++e) {
      const acc p = fm::softmax_at(tx(v[e]), m, inv_d);
      part = fm::Ops<acc>::fma(p, p, part);
    }
    r.a += static_cast<double>(part);
  };
  row_pass<kLoads, false, false>(x, x, static_cast<T*>(nullptr), n, aligned_head(x, n), tid, nt, f);
  return r;
}

// Probability rows: the state of tx(x), a = sum_c w_c y'_c and b = sum_c w_c y'_c (x'_c - shift) with
// y' = keep * y + add (when `sums`; the online fallback pass recomputes the state only).
template <bool kTwoPass, int kLoads, typename T, class Tx>
__device__ __forceinline__ Partial<StateT<kTwoPass, acc_t<T>>, 2> prob_pass(const T* x, const T* y, int64_t n,
                                                                         int64_t head, int tid, int nt, const Tx& tx,
                                                                         bool sums, const acc_t<T>* w_all,
                                                                         int64_t w_stride, acc_t<T> keep, acc_t<T> add,
                                                                         acc_t<T> shift) {
  using acc = acc_t<T>;
  constexpr int K = kVecOf<T>;
  auto r = partial_init<kTwoPass, 2, acc>();
  const acc* w = row_weights(w_all, w_stride, head);
  auto f = [&](auto& v, const auto& yv, int64_t c0, int64_t cs) {
    constexpr int M = extent_of<decltype(v)>;
#pragma unroll
    for (int e = 0; e < M; ++e) v[e] = tx(v[e]);
    if (sums) {  // first, so that the probabilities are dead before the state's update
      acc sy = acc(0), syx = acc(0);
      acc wv[M];
      if (w != nullptr) class_weights<K>(w, c0, cs, wv);
#pragma unroll
      for (int e = 0; e < M; ++e) {
        acc t = fm::Ops<acc>::fma(yv[e], keep, add);
        if (w != nullptr) t *= wv[e];
        sy += t;
        syx = fm::Ops<acc>::fma(t, v[e] - shift, syx);
      }
      r.a += static_cast<double>(sy);
      r.b += static_cast<double>(syx);
    }
    r.s = state_update<kTwoPass>(r.s, v);
  };
  row_pass<kLoads, true, false>(x, y, static_cast<T*>(nullptr), n, head, tid, nt, f);
  return r;
}

// ---------------------------------------------------------------- kernel: class-index targets

template <typename T>
struct IndexArgs {
  using acc = acc_t<T>;
  const T* x;
  T* grad;  // ForwardGrad (may alias x) and Backward; null for Forward
  const int64_t* target;
  const acc* w;      // class weights (copy 0 of the op layer's shifted copies), or null
  int64_t w_stride;  // elements between the copies (row_weights)
  const acc* w_sum;  // their sum (0-d, on the device), or null: W = C
  double* loss;      // Forward, ForwardGrad
  double* lse;
  const double* grad_scale;  // ForwardGrad
  const double* grad_loss;   // Backward
  const double* grad_lse;    // Backward, or null
  const double* lse_in;      // Backward
  int64_t N, C, ignore_index;
  double eps, z, inv_C;    // label smoothing, z-loss, 1 / C: the loss in double...
  acc eps_a, z_a, inv_C_a;  // ...the gradient's coefficients in acc (kernel parameters, not registers)
  int loss_kind;            // fastloss/loss_math.h kLoss*; non-CE kinds need x_t on every lane of the group
  double loss_param;
  double inv_cm1;           // 1 / (C - 1) (0 when C = 1): squentropy
  acc inv_cm1_a;
  double* sq_out;           // squentropy: sum_c p_c^2 per row, written by the forward (or null)
  const double* sq_in;      // ... read by the backward (null: recomputed with a pass over the row)
  int gshift;
  // Vocabulary shards: the logits are the classes [vocab_start, vocab_start + C); inv_C and inv_cm1 are then 1 / V
  // and 1 / (V - 1), w_sum the vocabulary's weight sum (ShardBackward) or the shard's (ShardForward).
  int64_t vocab_start;
  double* stats;          // ShardForward: [N, kShardStats]
  const double* w_sum_d;  // ShardForward: the shard's weight sum in float64 (0-d), or null: C
  const double* rows_in;  // ShardBackward: the combined rows [N, kShardStats] = (lse, x'_t, w_t, s)
};

// W = sum_c w_c, read on the device (C when unweighted).
template <typename T>
__device__ __forceinline__ double class_weight_sum(const IndexArgs<T>& a) {
  // fl-audit: cold -- the 0-d weight sum, once per row
  return a.w_sum != nullptr ? static_cast<double>(*a.w_sum) : static_cast<double>(a.C);
}

// Forward: loss[r], lse[r]. ForwardGrad: also grad[r, :] = grad_scale[r] * dloss_r / dx (grad may be x itself).
// Backward: grad[r, :] = grad_loss[r] * dloss_r / dx + grad_lse[r] * softmax, from the saved lse.
// Ignored rows: loss = lse = 0 and a zero gradient row. A target outside [0, C) that is not ignore_index fails
// CUDA_KERNEL_ASSERT (like nll_loss); were device asserts compiled out, the row is never read and reports NaN.
// ShardForward: stats[r, :] = (m, d, x'_t or 0, sum_c w_c x'_c or d2 or 0) instead of the loss. ShardBackward: the
// gradient from the combined rows (lse, x'_t, w_t, s), the target entry only when the target is in the shard. Every
// target that is not ignore_index is valid there (it may lie in another shard).
template <typename T, class Tx, Mode kMode, bool kTwoPass>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T, Tx, kMode == Mode::ForwardGrad>)
    ce_index_kernel(const IndexArgs<T> a, const Tx tx) {
  using acc = acc_t<T>;
  const int gsize = 1 << a.gshift;
  const int lane = static_cast<int>(threadIdx.x) & (gsize - 1);
  const int rows_per_block = kThreads >> a.gshift;
  const int64_t C = a.C;
  constexpr bool kShard = kMode == Mode::ShardForward || kMode == Mode::ShardBackward;
  constexpr bool reduce = kMode != Mode::Backward && kMode != Mode::ShardBackward;
  constexpr bool write = kMode != Mode::Forward && kMode != Mode::ShardForward;
  const bool smooth = a.eps != 0.0;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

  const int group = static_cast<int>(threadIdx.x) >> a.gshift;
  // The exit test is uniform over the block (row - group is the block's first row), as the reductions need.
#pragma unroll 1
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + group; row - group < a.N;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const bool valid = row < a.N;
    // fl-audit: cold -- the row's target index, once per row
    const int64_t t = valid ? a.target[row] : a.ignore_index;
    const bool ignored = t == a.ignore_index;
    if constexpr (!kShard) {
      if (valid && !ignored && lane == 0) {
        CUDA_KERNEL_ASSERT(t >= 0 && t < C);
      }
    }
    const bool active = kShard ? valid && !ignored : valid && !ignored && t >= 0 && t < C;
    // The target's column in this row, and whether the row holds it (a shard's target may lie in another shard;
    // t >= vocab_start first, so that a negative target never overflows t - vocab_start).
    const bool has_t = kShard ? active && t >= a.vocab_start && t - a.vocab_start < C : active;
    const int64_t tc = kShard ? t - a.vocab_start : t;
    const int64_t n = active ? C : 0;
    const T* xr = a.x + (active ? row : 0) * C;

    // Reduction: (m, d) and the smoothing sum. The calls are uniform over the block; inactive groups reduce
    // nothing (n = 0).
    fm::OnlineState<acc> st{acc(0), acc(1)};
    double l = 0.0;
    double sq = 0.0;  // squentropy: sum_c p_c^2
    if constexpr (reduce) {
      const bool sums = smooth && active;
      const acc shift = sums ? row_shift(xr, tx) : acc(0);
      double sum_w_dx;
      if constexpr (kTwoPass) {
        const auto r = group_allreduce(
            index_pass<true, kIndexLoads>(xr, n, lane, gsize, tx, sums, a.w, a.w_stride, shift), gsize);
        sum_w_dx = r.a;
        const bool need = fm::exp_needs_fallback(r.s);
        st = fm::exp_to_online(r.s);
        if (group_any(need, gsize)) {
          // fl-audit: rare -- the two-pass split's online fallback: rows with |x| > ~2.9e6, an inf or a NaN
          const auto o = group_allreduce(
              index_pass<false, kIndexLoads>(xr, need ? n : 0, lane, gsize, tx, false, a.w, a.w_stride, shift), gsize);
          if (need) st = o.s;
        }
      } else {
        const auto r = group_allreduce(
            index_pass<false, kIndexLoads>(xr, n, lane, gsize, tx, sums, a.w, a.w_stride, shift), gsize);
        sum_w_dx = r.a;
        st = r.s;
      }
      l = finish_lse(st);
      if (a.loss_kind == fm::kLossSquentropy) {  // uniform over the block: a kernel argument
        // (a shard reports d2 = sum_c e^(2 (x'_c - m)): 1 / d = 1)
        sq = group_allreduce(sq_pass<kIndexLoads>(xr, n, lane, gsize, tx, st.m, kShard ? acc(1) : acc(1) / st.d),
                             gsize).a;
      }
      if constexpr (kShard) {
        if (valid && lane == 0) {
          const double x_t = has_t ? static_cast<double>(tx(static_cast<acc>(xr[tc]))) : 0.0;  // fl-audit: cold -- x'_t
          // fl-audit: cold -- the shard's weight sum, once per row
          const double W = a.w_sum_d != nullptr ? *a.w_sum_d : static_cast<double>(C);
          const double s3 = !active ? 0.0 : smooth ? sum_w_dx + W * static_cast<double>(shift) : sq;
          // fl-audit: cold -- lane 0, once per row: the shard's four statistics
          double* o = a.stats + row * fm::kShardStats;
          o[0] = active ? fm::shard_max(st.m, st.d) : 0.0;
          o[1] = active ? static_cast<double>(st.d) : 0.0;
          o[2] = x_t;
          o[3] = s3;  // fl-audit: cold -- (the fourth)
        }
      } else if (valid && lane == 0) {
        if (active) {
          // fl-audit: cold -- lane 0, once per row: x_t, w_t and the row's loss
          const acc x_t = tx(static_cast<acc>(xr[t]));
          const acc w_t = a.w != nullptr ? a.w[t] : acc(1);
          a.loss[row] = fm::ce_index_loss_kind<double>(a.loss_kind, a.loss_param, l, static_cast<double>(x_t),
                                                       static_cast<double>(w_t), sum_w_dx, static_cast<double>(shift),
                                                       class_weight_sum(a), a.eps, a.inv_C, a.z, sq, a.inv_cm1);
          // fl-audit: cold -- lane 0, once per row: the row's lse and squentropy statistic
          a.lse[row] = l;
          if (a.sq_out != nullptr) a.sq_out[row] = sq;
        } else {
          // fl-audit: cold -- lane 0, once per ignored / invalid row: its loss, lse and statistic
          a.loss[row] = ignored ? 0.0 : kNaN;
          a.lse[row] = ignored ? 0.0 : kNaN;
          if (a.sq_out != nullptr) a.sq_out[row] = ignored ? 0.0 : kNaN;
        }
      }
    }

    if constexpr (write) {
      T* gr = a.grad + (valid ? row : 0) * C;
      // The row's coefficients: grad_c = (ka p_c - kb w_c) dx'/dx with p_c = exp(x'_c - m) * inv_d.
      acc ka = acc(0), kb = acc(0), ka2 = acc(0), m = acc(0), inv_d = acc(1);
      T g_t = T(0);
      if constexpr (!reduce && !kShard) {  // (a shard's sum_c p_c^2 comes with its combined row)
        if (a.loss_kind == fm::kLossSquentropy) {
          // fl-audit: cold -- the saved per-row statistic (or the saved lse), once per row
          if (a.sq_in != nullptr) {  // saved by the forward
            sq = active ? a.sq_in[row] : 0.0;
          } else {  // recomputed from the saved lse: every lane, uniform (kernel arguments)
            const auto nd = normaliser_from_lse<acc>(active ? a.lse_in[row] : 0.0);
            sq = group_allreduce(sq_pass<kIndexLoads>(xr, n, lane, gsize, tx, nd.m, nd.d), gsize).a;
          }
        }
      }
      if (active) {
        acc w_t, x_tk;
        if constexpr (kShard) {
          // fl-audit: cold -- the combined row's target weight and logit, once per row
          w_t = static_cast<acc>(a.rows_in[row * fm::kShardStats + 2]);
          x_tk = static_cast<acc>(a.rows_in[row * fm::kShardStats + 1]);
        } else {
          // fl-audit: cold -- the target's class weight, once per row
          w_t = a.w != nullptr ? a.w[t] : acc(1);
          // Comp-sum kinds scale the row by a factor of p_t: every lane reads the (capped) target logit. In place,
          // this read precedes the group barrier that orders every read of the row before any write.
          // fl-audit: cold -- x_t, once per row (each lane of the group)
          x_tk = a.loss_kind != fm::kLossCE ? tx(static_cast<acc>(xr[t])) : acc(0);
        }
        const acc W = static_cast<acc>(class_weight_sum(a));
        const acc lp = static_cast<acc>(a.loss_param);
        fm::CeRow<acc> k;
        if constexpr (reduce) {
          // fl-audit: cold -- the row's grad_scale, once per row
          k = fm::ce_index_coefs_kind(a.loss_kind, lp, static_cast<acc>(a.grad_scale[row]), acc(0),
                                      static_cast<acc>(l), x_tk, w_t, W, a.eps_a, a.inv_C_a, a.z_a,
                                      static_cast<acc>(sq), a.inv_cm1_a);
          m = st.m;
          inv_d = acc(1) / st.d;
        } else {
          // fl-audit: cold -- the row's saved lse, grad_lse and grad_loss, once per row
          const double lr = kShard ? a.rows_in[row * fm::kShardStats] : a.lse_in[row];
          const acc gz = a.grad_lse != nullptr ? static_cast<acc>(a.grad_lse[row]) : acc(0);
          if constexpr (kShard) sq = a.rows_in[row * fm::kShardStats + 3];
          k = fm::ce_index_coefs_kind(a.loss_kind, lp, static_cast<acc>(a.grad_loss[row]), gz, static_cast<acc>(lr),
                                      x_tk, w_t, W, a.eps_a, a.inv_C_a, a.z_a, static_cast<acc>(sq), a.inv_cm1_a);
          const auto nd = normaliser_from_lse<acc>(lr);
          m = nd.m;
          inv_d = nd.d;
        }
        ka = k.a;
        kb = k.b;
        ka2 = k.a2;
        // Lane 0: the target entry, (a p_t - b w_t - c_t) dx'/dx in acc, from x_t read now (in place, the row pass
        // overwrites it). It is stored last, over what the row pass wrote there. (A shard without the target: none.)
        if (has_t && lane == 0) {
          // fl-audit: cold -- lane 0 reads x_t, once per row
          const acc x_t = tx(static_cast<acc>(xr[tc]));
          const acc p_t = fm::softmax_at(x_t, m, inv_d);
          g_t = static_cast<T>(times_grad(tx, ka * p_t + ka2 * p_t * p_t - kb * w_t - k.c_t, x_t));
        }
      }
      // In place: every read of the reduction pass (and lane 0's x_t) before any write of the row.
      if constexpr (reduce) group_sync(gsize);
      T* const target_out = gr + (has_t ? tc : 0);
      if (active) {
        const bool vec = same_alignment(xr, gr);
        const int64_t head = vec ? aligned_head(xr, C) : C;
        if (a.w != nullptr) {
          constexpr int K = kVecOf<T>;
          const acc* w = row_weights(a.w, a.w_stride, head);
          auto f = [&](auto& v, const auto&, int64_t c0, int64_t cs) {
            constexpr int M = extent_of<decltype(v)>;
            acc wv[M];
            class_weights<K>(w, c0, cs, wv);
#pragma unroll
            for (int e = 0; e < M; ++e) {
              const acc xp = tx(v[e]);
              const acc p = fm::softmax_at(xp, m, inv_d);
              v[e] = times_grad(tx, fm::Ops<acc>::fma(ka2 * p, p, ka * p) - kb * wv[e], xp);
            }
          };
          row_pass<kIndexLoads, false, true>(xr, xr, gr, C, head, lane, gsize, f);
        } else {
          auto f = [&](auto& v, const auto&, int64_t, int64_t) {
            constexpr int M = extent_of<decltype(v)>;
#pragma unroll
            for (int e = 0; e < M; ++e) {
              const acc xp = tx(v[e]);
              const acc p = fm::softmax_at(xp, m, inv_d);
              v[e] = times_grad(tx, fm::Ops<acc>::fma(ka2 * p, p, ka * p) - kb, xp);
            }
          };
          row_pass<kIndexLoads, false, true>(xr, xr, gr, C, head, lane, gsize, f);
        }
      } else if (valid) {
        segment_fill(gr, C, static_cast<T>(ignored ? 0.0 : kNaN), lane, gsize);
      }
      group_sync(gsize);
      // fl-audit: cold -- lane 0 writes the target entry, once per row
      if (has_t && lane == 0) *target_out = g_t;
    }
  }
}

// ---------------------------------------------------------------- kernels: probability targets

template <typename T>
struct ProbArgs {
  using acc = acc_t<T>;
  const T* x;
  const T* y;
  T* grad;  // backward
  const acc* w;       // class weights (copy 0 of the op layer's shifted copies), or null
  int64_t w_stride;   // elements between the copies (row_weights)
  double* loss;  // forward
  double* lse;
  double* sum_wy;
  const double* grad_loss;  // backward
  const double* grad_lse;   // backward, or null
  const double* lse_in;
  const double* sum_wy_in;
  int64_t N, C;
  double z;
  acc keep, add;  // y' = keep * y + add
  int gshift;
};

// 3 blocks per SM (80 registers, kHeavy): with class weights the probability forward holds three streams' values
// (logits, probabilities, weights) and spilled at 64; 768 threads x 2 streams x 16 bytes = 24 KB in flight per SM
// still covers the latency (bench/audit_cuda.py).
template <typename T, class Tx, bool kTwoPass>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T, Tx, true>)
    ce_prob_forward_kernel(const ProbArgs<T> a, const Tx tx) {
  using acc = acc_t<T>;
  const int gsize = 1 << a.gshift;
  const int lane = static_cast<int>(threadIdx.x) & (gsize - 1);
  const int rows_per_block = kThreads >> a.gshift;
  const int64_t C = a.C;
  const acc keep = a.keep, add = a.add;
  const int group = static_cast<int>(threadIdx.x) >> a.gshift;
  // The exit test is uniform over the block (row - group is the block's first row), as the reductions need.
#pragma unroll 1
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + group; row - group < a.N;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const bool valid = row < a.N;
    const int64_t n = valid ? C : 0;
    const T* xr = a.x + (valid ? row : 0) * C;
    const T* yr = a.y + (valid ? row : 0) * C;
    const int64_t head = same_alignment(xr, yr) ? aligned_head(xr, n) : n;
    const acc shift = valid ? row_shift(xr, tx) : acc(0);
    fm::OnlineState<acc> st;
    double sy, syx;
    if constexpr (kTwoPass) {
      const auto r = group_allreduce(
          prob_pass<true, kProbLoads>(xr, yr, n, head, lane, gsize, tx, true, a.w, a.w_stride, keep, add, shift), gsize);
      sy = r.a;
      syx = r.b;
      const bool need = fm::exp_needs_fallback(r.s);
      st = fm::exp_to_online(r.s);
      if (group_any(need, gsize)) {
        const int64_t nf = need ? n : 0;
        // fl-audit: rare -- the two-pass split's online fallback: rows with |x| > ~2.9e6, an inf or a NaN
        const auto o = group_allreduce(prob_pass<false, kProbLoads>(xr, yr, nf, need ? head : 0, lane, gsize, tx, false,
                                                                    a.w, a.w_stride, keep, add, shift),
                                       gsize);
        if (need) st = o.s;
      }
    } else {
      const auto r = group_allreduce(
          prob_pass<false, kProbLoads>(xr, yr, n, head, lane, gsize, tx, true, a.w, a.w_stride, keep, add, shift), gsize);
      sy = r.a;
      syx = r.b;
      st = r.s;
    }
    if (valid && lane == 0) {
      const double l = finish_lse(st);
      // fl-audit: cold -- lane 0, once per row: loss, lse and sum_wy
      a.loss[row] = fm::ce_prob_loss<double>(l, sy, syx, static_cast<double>(shift), a.z);
      a.lse[row] = l;
      a.sum_wy[row] = sy;
    }
  }
}

// grad[r, c] = (a p_c - g w_c y'_c) dx'/dx with g = grad_loss[r], a = g (sum_wy[r] + 2 z lse[r]) + grad_lse[r].
// No reductions: groups are independent.
template <typename T, class Tx>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T, Tx>)
    ce_prob_backward_kernel(const ProbArgs<T> a, const Tx tx) {
  using acc = acc_t<T>;
  constexpr int K = kVecOf<T>;
  const int gsize = 1 << a.gshift;
  const int lane = static_cast<int>(threadIdx.x) & (gsize - 1);
  const int rows_per_block = kThreads >> a.gshift;
  const int64_t C = a.C;
  const acc keep = a.keep, add = a.add;
#pragma unroll 1
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (static_cast<int>(threadIdx.x) >> a.gshift);
       row < a.N; row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    // fl-audit: cold -- the row's grad_loss, lse, sum_wy and grad_lse, once per row
    const double gl = a.grad_loss[row], lr = a.lse_in[row];
    const acc g = static_cast<acc>(gl);
    const acc ca = static_cast<acc>(gl * (a.sum_wy_in[row] + 2.0 * a.z * lr) +
                                    (a.grad_lse != nullptr ? a.grad_lse[row] : 0.0));
    const auto nd = normaliser_from_lse<acc>(lr);
    const acc m = nd.m, inv_d = nd.d;
    const T* xr = a.x + row * C;
    const T* yr = a.y + row * C;
    T* gr = a.grad + row * C;
    const int64_t head = same_alignment(xr, yr) && same_alignment(xr, gr) ? aligned_head(xr, C) : C;
    if (a.w != nullptr) {
      const acc* w = row_weights(a.w, a.w_stride, head);
      auto f = [&](auto& v, const auto& yv, int64_t c0, int64_t cs) {
        constexpr int M = extent_of<decltype(v)>;
        acc wv[M];
        class_weights<K>(w, c0, cs, wv);
#pragma unroll
        for (int e = 0; e < M; ++e) {
          const acc xp = tx(v[e]);
          const acc yp = yv[e] * keep + add;
          v[e] = times_grad(tx, ca * fm::softmax_at(xp, m, inv_d) - g * wv[e] * yp, xp);
        }
      };
      row_pass<kProbLoads, true, true>(xr, yr, gr, C, head, lane, gsize, f);
    } else {
      auto f = [&](auto& v, const auto& yv, int64_t, int64_t) {
        constexpr int M = extent_of<decltype(v)>;
#pragma unroll
        for (int e = 0; e < M; ++e) {
          const acc xp = tx(v[e]);
          const acc yp = yv[e] * keep + add;
          v[e] = times_grad(tx, ca * fm::softmax_at(xp, m, inv_d) - g * yp, xp);
        }
      };
      row_pass<kProbLoads, true, true>(xr, yr, gr, C, head, lane, gsize, f);
    }
  }
}

// ---------------------------------------------------------------- kernel: scale_rows

// x[r, :] *= scale[per_row ? r : 0] in acc; a scale of exactly 1 leaves the row (or, shared, the whole tensor)
// untouched without reading it.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T, Identity>)
    scale_rows_kernel(T* x, const double* scale, int64_t N, int64_t C, bool per_row, int gshift) {
  using acc = acc_t<T>;
  // fl-audit: cold -- the shared scale, once per thread
  if (!per_row && scale[0] == 1.0) return;
  const int gsize = 1 << gshift;
  const int lane = static_cast<int>(threadIdx.x) & (gsize - 1);
  const int rows_per_block = kThreads >> gshift;
#pragma unroll 1
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (static_cast<int>(threadIdx.x) >> gshift);
       row < N; row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    // fl-audit: cold -- the row's scale, once per row
    const double sd = scale[per_row ? row : 0];
    if (sd == 1.0) continue;
    const acc s = static_cast<acc>(sd);
    T* xr = x + row * C;
    auto f = [&](auto& v, const auto&, int64_t, int64_t) {
      constexpr int M = extent_of<decltype(v)>;
#pragma unroll
      for (int e = 0; e < M; ++e) v[e] = v[e] * s;
    };
    row_pass<kIndexLoads, false, true>(xr, xr, xr, C, aligned_head(xr, C), lane, gsize, f);
  }
}

// ---------------------------------------------------------------- kernel: a vocabulary shard's loss

struct ShardLossArgs {
  const double* rows;    // the combined rows [N, kShardStats] = (lse, x'_t, w_t, s)
  const int64_t* target;
  const double* w_sum;   // the vocabulary's class-weight sum (0-d), or null: V
  double* loss;
  int64_t N, V, ignore_index;
  int loss_kind;
  double loss_param, eps, z;
};

// One thread per row: fastloss/loss_math.h ce_shard_loss; ignored rows 0. A target outside [0, V) that is not
// ignore_index fails CUDA_KERNEL_ASSERT (the row is not read either way: it needs no index).
__global__ void __launch_bounds__(kThreads) ce_shard_loss_kernel(const ShardLossArgs a) {
  const double inv_vm1 = a.V > 1 ? 1.0 / static_cast<double>(a.V - 1) : 0.0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < a.N;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // fl-audit: cold -- one thread per row: its target
    const int64_t t = a.target[r];
    double l = 0.0;
    if (t != a.ignore_index) {
      CUDA_KERNEL_ASSERT(t >= 0 && t < a.V);
      // fl-audit: cold -- one thread per row: the weight sum and the row's four statistics
      const double W = a.w_sum != nullptr ? *a.w_sum : static_cast<double>(a.V);
      const double* s = a.rows + r * fm::kShardStats;
      l = fm::ce_shard_loss(a.loss_kind, a.loss_param, s[0], s[1], s[2], s[3], W, a.eps,
                            1.0 / static_cast<double>(a.V), a.z, inv_vm1);
    }
    // fl-audit: cold -- one thread per row: its loss
    a.loss[r] = l;
  }
}

// ---------------------------------------------------------------- host side

template <typename scalar_t, typename F>
void with_transform(const CrossEntropyParams& p, F&& f) {
  using acc = acc_t<scalar_t>;
  if (p.has_softcap) f(Softcap<acc>{static_cast<acc>(p.softcap), static_cast<acc>(1.0 / p.softcap)});
  else f(Identity{});
}

template <typename scalar_t>
const acc_t<scalar_t>* weight_ptr(const CrossEntropyInputs& in) {
  return in.weight.defined() ? in.weight.const_data_ptr<acc_t<scalar_t>>() : nullptr;
}

template <typename scalar_t>
const acc_t<scalar_t>* weight_sum_ptr(const CrossEntropyInputs& in) {
  return in.weight_sum.defined() ? in.weight_sum.const_data_ptr<acc_t<scalar_t>>() : nullptr;
}

// f(integral_constant<bool, two-pass>): the algorithm is a template parameter of the kernels that reduce rows, so
// that each instantiation holds one algorithm's loops (registers, and the audit's per-kernel ceilings).
template <typename F>
void with_algorithm(const CrossEntropyParams& p, F&& f) {
  if (p.algorithm == Algorithm::TwoPass) f(std::true_type{});
  else f(std::false_type{});
}

template <Mode kMode, typename scalar_t>
void launch_index(IndexArgs<scalar_t> args, const CrossEntropyParams& p) {
  args.gshift = group_shift<scalar_t>(args.C, kIndexLoads);
  const unsigned blocks = row_blocks(args.N, args.gshift);
  const Stream stream = current_stream();
  with_transform<scalar_t>(p, [&](auto tx) {
    if constexpr (kMode == Mode::Backward || kMode == Mode::ShardBackward) {  // no reduction: from the saved lse
      launch_kernel<&ce_index_kernel<scalar_t, decltype(tx), kMode, false>>(blocks, kThreads, 0, stream, args, tx);
    } else {
      with_algorithm(p, [&](auto two) {
        launch_kernel<&ce_index_kernel<scalar_t, decltype(tx), kMode, decltype(two)::value>>(blocks, kThreads, 0,
                                                                                            stream, args, tx);
      });
    }
  });
}

template <typename scalar_t>
IndexArgs<scalar_t> index_args(const CrossEntropyInputs& in, const CrossEntropyParams& p) {
  IndexArgs<scalar_t> a{};
  a.x = in.logits.const_data_ptr<scalar_t>();
  a.target = in.target.const_data_ptr<int64_t>();
  a.w = weight_ptr<scalar_t>(in);
  a.w_stride = in.weight_copy_stride;
  TORCH_INTERNAL_ASSERT(a.w == nullptr || a.w_stride > 0, "fastloss: class weights without their shifted copies");
  a.w_sum = weight_sum_ptr<scalar_t>(in);
  a.N = in.logits.size(0);
  a.C = in.logits.size(1);
  a.ignore_index = p.ignore_index;
  a.eps = p.label_smoothing;
  a.z = p.z_loss;
  a.inv_C = 1.0 / static_cast<double>(a.C);
  a.eps_a = static_cast<acc_t<scalar_t>>(a.eps);
  a.z_a = static_cast<acc_t<scalar_t>>(a.z);
  a.inv_C_a = static_cast<acc_t<scalar_t>>(a.inv_C);
  a.loss_kind = p.loss_kind;
  a.loss_param = p.loss_param;
  a.inv_cm1 = a.C > 1 ? 1.0 / static_cast<double>(a.C - 1) : 0.0;
  a.inv_cm1_a = static_cast<acc_t<scalar_t>>(a.inv_cm1);
  a.sq_out = nullptr;
  a.sq_in = nullptr;
  return a;
}

// Passes over the logits (checked against the CPU execution layer's byte counts, tests/test_emu_traffic.py; read by
// bench/audit_cuda.py for its pass-bound ceilings). Forward then backward is 2R + 1W against a floor of 1R + 1W.
// fl-passes: cross_entropy = 1R + 0W (floor 1R + 0W) -- the loss (and lse) only
// fl-passes: cross_entropy_backward = 1R + 1W (floor 1R + 1W) -- the logits re-read from HBM
// fl-passes: cross_entropy_train = 2R + 1W (floor 1R + 1W) -- forward then backward, as in training
// fl-passes: cross_entropy_inplace = 2R + 1W (floor 1R + 1W) -- the statistics, then the gradient pass re-reads
// the row (from L2 while the row is short: the kernel walks it right after), writing over the logits
void ce_index_forward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& loss,
                      const at::Tensor& lse, const at::Tensor& grad_scale, const at::Tensor& grad_logits) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(in.logits.device());
  const bool fused = grad_logits.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_fwd_cuda", [&] {
    auto a = index_args<scalar_t>(in, p);
    a.loss = loss.mutable_data_ptr<double>();
    a.lse = lse.mutable_data_ptr<double>();
    a.sq_out = in.sum_sq.defined() ? in.sum_sq.mutable_data_ptr<double>() : nullptr;
    if (fused) {
      // grad_logits may be in.logits itself (the in-place variant): the kernel reads each row before writing it.
      a.grad = grad_logits.mutable_data_ptr<scalar_t>();
      a.grad_scale = grad_scale.const_data_ptr<double>();
      launch_index<Mode::ForwardGrad>(a, p);
    } else {
      launch_index<Mode::Forward>(a, p);
    }
  });
}

void ce_index_backward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                       const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& grad_logits) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(in.logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_bwd_cuda", [&] {
    auto a = index_args<scalar_t>(in, p);
    a.grad = grad_logits.mutable_data_ptr<scalar_t>();
    a.grad_loss = grad_loss.const_data_ptr<double>();
    a.grad_lse = grad_lse.defined() ? grad_lse.const_data_ptr<double>() : nullptr;
    a.lse_in = lse.const_data_ptr<double>();
    a.sq_in = in.sum_sq.defined() ? in.sum_sq.const_data_ptr<double>() : nullptr;
    launch_index<Mode::Backward>(a, p);
  });
}

// Vocabulary shards: one pass over each row (the forward's reduction) for the statistics; the gradient pass as the
// backward's. (The op layer handles C = 0.)
void ce_shard_forward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& stats) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(in.logits.device());
  CrossEntropyInputs local = in;  // the weight sum is float64 here (w_sum_d)
  local.weight_sum = at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_shard_fwd_cuda", [&] {
    auto a = index_args<scalar_t>(local, p);
    a.vocab_start = p.vocab_start;
    a.stats = stats.mutable_data_ptr<double>();
    a.w_sum_d = in.weight_sum.defined() ? in.weight_sum.const_data_ptr<double>() : nullptr;
    launch_index<Mode::ShardForward>(a, p);
  });
}

void ce_shard_loss(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& weight_sum,
                   const CrossEntropyParams& p, const at::Tensor& loss) {
  const int64_t N = rows.size(0);
  if (N == 0) return;
  const DeviceGuard guard(rows.device());
  ShardLossArgs a{};
  a.rows = rows.const_data_ptr<double>();
  a.target = target.const_data_ptr<int64_t>();
  a.w_sum = weight_sum.defined() ? weight_sum.const_data_ptr<double>() : nullptr;
  a.loss = loss.mutable_data_ptr<double>();
  a.N = N;
  a.V = p.vocab_size;
  a.ignore_index = p.ignore_index;
  a.loss_kind = p.loss_kind;
  a.loss_param = p.loss_param;
  a.eps = p.label_smoothing;
  a.z = p.z_loss;
  launch_kernel<&ce_shard_loss_kernel>(grid_size(ceil_div(N, kThreads)), kThreads, 0, current_stream(), a);
}

// weight_sum: the vocabulary's, 0-d in the accumulation dtype (the op layer fills in V when there are no weights).
void ce_shard_backward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                       const at::Tensor& grad_lse, const at::Tensor& rows, const at::Tensor& weight_sum,
                       const at::Tensor& grad_logits) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1), V = p.vocab_size;
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(in.logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_shard_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    auto a = index_args<scalar_t>(in, p);
    a.w_sum = weight_sum.const_data_ptr<acc>();
    a.inv_C = 1.0 / static_cast<double>(V);
    a.inv_C_a = static_cast<acc>(a.inv_C);
    a.inv_cm1 = V > 1 ? 1.0 / static_cast<double>(V - 1) : 0.0;
    a.inv_cm1_a = static_cast<acc>(a.inv_cm1);
    a.vocab_start = p.vocab_start;
    a.rows_in = rows.const_data_ptr<double>();
    a.grad = grad_logits.mutable_data_ptr<scalar_t>();
    a.grad_loss = grad_loss.const_data_ptr<double>();
    a.grad_lse = grad_lse.defined() ? grad_lse.const_data_ptr<double>() : nullptr;
    launch_index<Mode::ShardBackward>(a, p);
  });
}

template <typename scalar_t>
ProbArgs<scalar_t> prob_args(const CrossEntropyInputs& in, const CrossEntropyParams& p) {
  ProbArgs<scalar_t> a{};
  a.x = in.logits.const_data_ptr<scalar_t>();
  a.y = in.target.const_data_ptr<scalar_t>();
  a.w = weight_ptr<scalar_t>(in);
  a.w_stride = in.weight_copy_stride;
  TORCH_INTERNAL_ASSERT(a.w == nullptr || a.w_stride > 0, "fastloss: class weights without their shifted copies");
  a.N = in.logits.size(0);
  a.C = in.logits.size(1);
  a.keep = static_cast<acc_t<scalar_t>>(1.0 - p.label_smoothing);
  a.add = static_cast<acc_t<scalar_t>>(p.label_smoothing / static_cast<double>(a.C));
  a.z = p.z_loss;
  a.gshift = group_shift<scalar_t>(a.C, kProbLoads);
  return a;
}

void ce_prob_forward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& loss,
                     const at::Tensor& lse, const at::Tensor& sum_wy) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(in.logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_prob_fwd_cuda",
                                  [&] {
    auto a = prob_args<scalar_t>(in, p);
    a.loss = loss.mutable_data_ptr<double>();
    a.lse = lse.mutable_data_ptr<double>();
    a.sum_wy = sum_wy.mutable_data_ptr<double>();
    const unsigned blocks = row_blocks(N, a.gshift);
    const Stream stream = current_stream();
    with_transform<scalar_t>(p, [&](auto tx) {
      with_algorithm(p, [&](auto two) {
        launch_kernel<&ce_prob_forward_kernel<scalar_t, decltype(tx), decltype(two)::value>>(blocks, kThreads, 0,
                                                                                            stream, a, tx);
      });
    });
  });
}

void ce_prob_backward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                      const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& sum_wy,
                      const at::Tensor& grad_logits) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(in.logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_prob_bwd_cuda",
                                  [&] {
    auto a = prob_args<scalar_t>(in, p);
    a.grad = grad_logits.mutable_data_ptr<scalar_t>();
    a.grad_loss = grad_loss.const_data_ptr<double>();
    a.grad_lse = grad_lse.defined() ? grad_lse.const_data_ptr<double>() : nullptr;
    a.lse_in = lse.const_data_ptr<double>();
    a.sum_wy_in = sum_wy.const_data_ptr<double>();
    const unsigned blocks = row_blocks(N, a.gshift);
    const Stream stream = current_stream();
    with_transform<scalar_t>(p, [&](auto tx) {
      launch_kernel<&ce_prob_backward_kernel<scalar_t, decltype(tx)>>(blocks, kThreads, 0, stream, a, tx);
    });
  });
}

void ce_scale_rows(const at::Tensor& x, const at::Tensor& scale) {
  const int64_t N = x.size(0), C = x.size(1);
  if (N == 0 || C == 0) return;
  const DeviceGuard guard(x.device());
  const bool per_row = scale.numel() == N && scale.dim() == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_scale_rows_cuda", [&] {
    const int gshift = group_shift<scalar_t>(C, kIndexLoads);
    launch_kernel<&scale_rows_kernel<scalar_t>>(row_blocks(N, gshift), kThreads, 0, current_stream(),
        x.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<double>(), N, C, per_row, gshift);
  });
}

}  // namespace
}  // namespace cuda

const CrossEntropyKernels& cuda_cross_entropy_kernels() {
  static const CrossEntropyKernels table{&cuda::ce_index_forward, &cuda::ce_index_backward, &cuda::ce_prob_forward,
                                         &cuda::ce_prob_backward, &cuda::ce_scale_rows,   &cuda::ce_shard_forward,
                                         &cuda::ce_shard_loss,    &cuda::ce_shard_backward};
  return table;
}

}  // namespace fastloss
