// CUDA row kernels for distillation and token log-probabilities (the table of fastloss/policy_kernels.h; compiled
// by nvcc and run by the CPU execution layer in CI, never yet on a GPU).
//
// The CPU kernels (csrc/cpu/policy_cpu_kernels.h) are the reference: the same states and formulas from
// fastloss/policy_math.h, the same float64 per-row outputs, the same per-element p = e^(x - m) * scale from the saved
// float64 lse. One block of kThreads threads per row, rows grid-stride; each thread reads its share of the row with
// 16-byte vector loads (segment_visit / segment_map, row_reduce.cuh), keeps float states, and the block merges them
// (block_allreduce, with merge / shfl_xor for the new states below). Every thread ends with the same merged state,
// so every thread knows the row's normalisers; thread 0 writes the per-row outputs.
//
//  * logprob_forward_kernel<T, kEntropy>: (m, d) or (m, d, w) of x / T; log p(token), lse, entropy.
//  * logprob_stats_forward_kernel<T>: the same with (m, d, w, q, s) and the row's argmax (token_logprobs_fwd with
//    stats=True), through row_pass, which tells the callback its elements' columns.
//  * logprob_backward_kernel<T>: one elementwise pass from the saved lse (and entropy); the token's + g_lp written
//    last by thread 0 from the value it read before the pass (the gradient may alias the logits).
//  * distill_kernel<T, kDiv, kMode>: forward (pass 1: the weighted state of a, the normaliser of b, and of the raw
//    student for the hard term when T != 1; the JSD's pass 2), forward + in-place gradient, or backward from the
//    saved statistics.
//  * distill_entropy_kernel<T, kDiv, kMode>: the forward modes of the same, whose student state (a or b) carries
//    the entropy accumulator w (distill_fwd with student_entropy): the entropy of softmax(student / T) from pass 1.
//
// Block-per-row only: there is no warp-per-row variant for short rows (V below a few thousand) as the softmax and
// cross-entropy kernels have; LLM vocabularies are the target. Indices are int64_t; nothing synchronises the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastloss/policy_kernels.h"
#include "fastloss/policy_math.h"
#include "launch.cuh"
#include "row_reduce.cuh"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {
// Block all-reductions of the policy states (found by block_allreduce through argument-dependent lookup).
template <typename T>
__device__ __forceinline__ EntState<T> merge(EntState<T> a, EntState<T> b) {
  return ent_merge(a, b);
}
template <typename T>
__device__ __forceinline__ WState<T> merge(WState<T> a, WState<T> b) {
  return w_merge(a, b);
}
template <typename T>
__device__ __forceinline__ JsdTerms<T> merge(JsdTerms<T> a, JsdTerms<T> b) {
  return {a.loss + b.loss, a.kl_sm + b.kl_sm};
}
template <typename T>
__device__ __forceinline__ StatState<T> merge(StatState<T> a, StatState<T> b) {
  return stat_merge(a, b);
}
template <typename T>
__device__ __forceinline__ ArgMax<T> merge(ArgMax<T> a, ArgMax<T> b) {
  return argmax_merge(a, b);
}
template <int kWidth, typename T>
__device__ __forceinline__ StatState<T> shfl_xor(StatState<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.m, off, kWidth), __shfl_xor_sync(0xffffffffu, s.d, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.w, off, kWidth), __shfl_xor_sync(0xffffffffu, s.q, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.s, off, kWidth)};
}
template <int kWidth, typename T>
__device__ __forceinline__ ArgMax<T> shfl_xor(ArgMax<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.v, off, kWidth), __shfl_xor_sync(0xffffffffu, s.i, off, kWidth)};
}
template <int kWidth, typename T>
__device__ __forceinline__ EntState<T> shfl_xor(EntState<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.m, off, kWidth), __shfl_xor_sync(0xffffffffu, s.d, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.w, off, kWidth)};
}
template <int kWidth, typename T>
__device__ __forceinline__ WState<T> shfl_xor(WState<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.m, off, kWidth), __shfl_xor_sync(0xffffffffu, s.d, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.u, off, kWidth)};
}
template <typename T>
__device__ __forceinline__ OnlineEntState<T> merge(OnlineEntState<T> a, OnlineEntState<T> b) {
  return online_ent_merge(a, b);
}
template <typename T>
__device__ __forceinline__ WEntState<T> merge(WEntState<T> a, WEntState<T> b) {
  return w_ent_merge(a, b);
}
template <int kWidth, typename T>
__device__ __forceinline__ OnlineEntState<T> shfl_xor(OnlineEntState<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.m, off, kWidth), __shfl_xor_sync(0xffffffffu, s.d, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.w, off, kWidth)};
}
template <int kWidth, typename T>
__device__ __forceinline__ WEntState<T> shfl_xor(WEntState<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.m, off, kWidth), __shfl_xor_sync(0xffffffffu, s.d, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.u, off, kWidth), __shfl_xor_sync(0xffffffffu, s.w, off, kWidth)};
}
template <int kWidth, typename T>
__device__ __forceinline__ JsdTerms<T> shfl_xor(JsdTerms<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.loss, off, kWidth), __shfl_xor_sync(0xffffffffu, s.kl_sm, off, kWidth)};
}
}  // namespace FL_ISA_NAMESPACE
}  // namespace math

namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLoads = 2;  // vectors in flight per thread and stream in the reduction passes

template <int M, typename A>
__device__ __forceinline__ void scale_into(const A (&v)[M], A s, A (&out)[M]) {
#pragma unroll
  for (int k = 0; k < M; ++k) out[k] = v[k] * s;
}

// Scalar head that aligns every pointer at once, or the whole row scalar when they disagree.
template <typename T>
__device__ __forceinline__ int64_t common_head(const T* a, const T* b, const T* c, int64_t n) {
  return same_alignment(a, b) && same_alignment(a, c) ? aligned_head(a, n) : n;
}

template <typename acc>
__device__ __forceinline__ double lse_of(fm::OnlineState<acc> s) {
  return static_cast<double>(s.m) + ::log(static_cast<double>(s.d));
}

// ---------------------------------------------------------------- token log-probabilities

template <typename T>
struct LogprobArgs {
  const T* x;
  const int64_t* tokens;
  int64_t N, V;
  double inv_t;
  double* logp;
  double* entropy;
  double* lse;
  double* stats;    // [N, kTokenStats] (the stats kernel only)
  int64_t* argmax;  // [N] (the stats kernel only)
  const double* g_lp;
  const double* g_h;
  T* grad;
  int64_t vocab_start;  // the backward only: row r's token is column tokens[r] - vocab_start
  bool shard;           // the backward only: x a slice of a larger vocabulary, a column outside [0, V) is another
                        // slice's token
};

// One row of a log-prob kernel: its logits, its token's column, and whether that is in [0, V) -- the row prologue
// (logprob_row for the forwards, logprob_slice_row for the backward). A column outside [0, V) fails
// CUDA_KERNEL_ASSERT (like nll_loss) unless the backward's logits are a slice of the vocabulary (shard: another
// slice holds the token); either way the column is never read (log-probability NaN, no + g_lp in the gradient)
// and nothing outside the row is touched.
template <typename T>
struct LogprobRow {
  const T* x;
  int64_t tok;
  bool ok;
};

template <typename T>
__device__ __forceinline__ LogprobRow<T> logprob_row(const LogprobArgs<T>& a, int64_t row, int tid) {
  // fl-audit: cold -- the row's token, one load per thread per row
  const int64_t tok = a.tokens[row];
  if (tid == 0) {
    CUDA_KERNEL_ASSERT(tok >= 0 && tok < a.V);
  }
  return {a.x + row * a.V, tok, tok >= 0 && tok < a.V};
}

// The backward's prologue: the column tokens[r] - vocab_start; with shard, one outside [0, V) is not an error.
template <typename T>
__device__ __forceinline__ LogprobRow<T> logprob_slice_row(const LogprobArgs<T>& a, int64_t row, int tid) {
  // fl-audit: cold -- the row's token, one load per thread per row
  const int64_t tok = a.tokens[row] - a.vocab_start;
  const bool ok = tok >= 0 && tok < a.V;
  if (tid == 0 && !a.shard) {
    CUDA_KERNEL_ASSERT(ok);
  }
  return {a.x + row * a.V, tok, ok};
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) logprob_forward_kernel(const LogprobArgs<T> a) {
  using acc = acc_t<T>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const acc it = static_cast<acc>(a.inv_t);
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const LogprobRow<T> r = logprob_row(a, row, tid);
    using State = std::conditional_t<kEntropy, fm::EntState<acc>, fm::OnlineState<acc>>;
    State st;
    if constexpr (kEntropy) st = fm::ent_init<acc>();
    else st = fm::online_init<acc>();
    segment_visit<kLoads, false>(r.x, r.x, a.V, aligned_head(r.x, a.V), tid, nt, [&](auto& v, auto&) {
      constexpr int M = sizeof(v) / sizeof(v[0]);
      acc z[M];
      scale_into(v, it, z);
      if constexpr (kEntropy) st = fm::ent_update_block(st, z);
      else st = fm::online_update_block(st, z);
    });
    st = block_allreduce(st);
    if (tid == 0) {
      const double l = lse_of(fm::OnlineState<acc>{st.m, st.d});
      // fl-audit: cold -- thread 0, once per row: the row's lse and log p(token) (with the token's own logit)
      a.lse[row] = l;
      a.logp[row] = r.ok ? static_cast<double>(r.x[r.tok]) * a.inv_t - l : std::numeric_limits<double>::quiet_NaN();
      if constexpr (kEntropy) {
        // fl-audit: cold -- thread 0 writes the row's entropy once per row
        a.entropy[row] = ::log(static_cast<double>(st.d)) - static_cast<double>(st.w) / static_cast<double>(st.d);
      }
    }
  }
}

// The statistics of one row: the (m, d, w, q, s) state of z = x / T and the argmax of x, all-reduced at once.
template <typename acc>
struct RowStats {
  fm::StatState<acc> st;
  fm::ArgMax<acc> best;
};
template <typename acc>
__device__ __forceinline__ RowStats<acc> merge(RowStats<acc> a, RowStats<acc> b) {
  return {merge(a.st, b.st), merge(a.best, b.best)};
}
template <int kWidth, typename acc>
__device__ __forceinline__ RowStats<acc> shfl_xor(RowStats<acc> s, int off) {
  return {shfl_xor<kWidth>(s.st, off), shfl_xor<kWidth>(s.best, off)};
}

// token_logprobs_fwd(stats=True): the forward above with the statistics state (entropy included; written when
// a.entropy is set) and the row's argmax from the same pass. row_pass gives each callback its elements' columns;
// a thread meets its columns in increasing order, so a block is searched element by element only when its max
// could beat the thread's best so far.
template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_stats_forward_kernel(const LogprobArgs<T> a) {
  using acc = acc_t<T>;
  constexpr int K = kVecOf<T>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const acc it = static_cast<acc>(a.inv_t);
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const LogprobRow<T> r = logprob_row(a, row, tid);
    RowStats<acc> rs{fm::stat_init<acc>(), fm::argmax_init<acc>()};
    auto visit = [&](auto& v, auto&, int64_t c0, int64_t cs) {
      constexpr int M = extent_of<decltype(v)>;
      acc z[M];
      scale_into(v, it, z);
      rs.st = fm::stat_update_block(rs.st, z);
      acc bm = v[0];
#pragma unroll
      for (int e = 1; e < M; ++e) bm = fm::Ops<acc>::max(bm, v[e]);  // NaN-propagating
      const bool better = fm::argmax_may_improve(rs.best, bm);
      // fl-audit: rare -- a block whose max beats the thread's best so far: about ln(n) of a thread's n blocks
      if (better) {
#pragma unroll
        for (int e = 0; e < M; ++e) fm::argmax_update(rs.best, v[e], c0 + col_off<K>(e, cs));
      }
    };
    // 16 elements per callback (both 2-byte vectors at once): one rescale and one argmax test per 16, as the
    // default kernel's segment_visit.
    row_pass<kLoads, false, false, 16>(r.x, r.x, static_cast<T*>(nullptr), a.V, aligned_head(r.x, a.V), tid, nt,
                                       visit);
    rs = block_allreduce(rs);
    if (tid == 0) {
      const fm::StatState<acc>& st = rs.st;
      const double l = lse_of(fm::OnlineState<acc>{st.m, st.d});
      const double d = static_cast<double>(st.d);
      // fl-audit: cold -- thread 0, once per row: the row's lse and log p(token) (with the token's own logit)
      a.lse[row] = l;
      a.logp[row] = r.ok ? static_cast<double>(r.x[r.tok]) * a.inv_t - l : std::numeric_limits<double>::quiet_NaN();
      if (a.entropy != nullptr) {
        // fl-audit: cold -- thread 0 writes the row's entropy once per row
        a.entropy[row] = ::log(d) - static_cast<double>(st.w) / d;
      }
      // fl-audit: cold -- thread 0 writes the row's two statistics and its argmax once per row
      a.stats[row * kTokenStats + kLogSumSqProbs] = fm::stat_log_sum_sq(static_cast<double>(st.q), d);
      a.stats[row * kTokenStats + kMeanLogits] = static_cast<double>(st.s) / static_cast<double>(a.V);
      a.argmax[row] = rs.best.i;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_backward_kernel(const LogprobArgs<T> a) {
  using acc = acc_t<T>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const acc it = static_cast<acc>(a.inv_t);
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const LogprobRow<T> r = logprob_slice_row(a, row, tid);
    T* out = a.grad + row * a.V;
    // fl-audit: cold -- the row's upstream gradients and saved entropy / lse, one double each per row
    const acc glp = a.g_lp != nullptr ? static_cast<acc>(a.g_lp[row]) : acc(0);
    const acc gh = a.g_h != nullptr ? static_cast<acc>(a.g_h[row]) : acc(0);
    const acc h = a.g_h != nullptr ? static_cast<acc>(a.entropy[row]) : acc(0);
    const auto parts = fm::lse_parts<acc>(a.lse[row]);
    auto f = [&](acc v, acc) {
      const acc lp = fm::logprob_at(v * it, parts.m, parts.log_scale);
      return fm::logprob_entropy_grad(lp, glp, gh, h) * it;
    };
    // fl-audit: cold -- thread 0 reads the token's logit once per row
    const acc x_k = tid == 0 && r.ok ? static_cast<acc>(r.x[r.tok]) : acc(0);
    __syncthreads();  // x_k read before any thread overwrites the row (grad may alias x)
    segment_map<false>(r.x, r.x, out, a.V, common_head(r.x, r.x, static_cast<const T*>(out), a.V), tid, nt, f);
    __syncthreads();
    // fl-audit: cold -- thread 0 writes the token's gradient entry once per row
    if (tid == 0 && r.ok) out[r.tok] = static_cast<T>(f(x_k, x_k) + glp * it);
  }
}

// ---------------------------------------------------------------- distillation

enum class Mode : int { Forward = 0, ForwardGrad = 1, Backward = 2 };

template <typename T>
struct DistillArgs {
  const T* s;
  const T* t;
  const int64_t* target;  // nullptr: no masking, no hard term
  int64_t N, V, ignore_index;
  double inv_t, beta, hard_weight;
  bool raw;  // the hard term needs the untempered student's own lse (T != 1)
  double* loss;
  double* stats;      // [N, kDistillStats]: written by the forward, read by the backward
  const double* scale;  // ForwardGrad: grad_scale; Backward: grad_loss
  T* grad;
  // target != nullptr, and with a hard term (hard_weight != 0): kernel parameters, which ptxas re-reads where it
  // had kept the tests' predicates in local memory across the assertion's call (4 bytes per thread).
  bool has_target, hard;
};

// Pass 1's state of a (the weighted one) and of b (a plain normaliser); with kEnt (the student's, under
// student_entropy) grown by the entropy accumulator w, its m and d computed as without it (fastloss/policy_math.h
// OnlineEntState, WEntState).
template <typename acc, bool kEnt>
struct AStateOf {
  using type = fm::WState<acc>;
  static __device__ __forceinline__ type init() { return fm::w_init<acc>(); }
  template <int M>
  static __device__ __forceinline__ type update(type s, const acc (&z)[M], const acc (&y)[M]) {
    return fm::w_update_block(s, z, y);
  }
};
template <typename acc>
struct AStateOf<acc, true> {
  using type = fm::WEntState<acc>;
  static __device__ __forceinline__ type init() { return fm::w_ent_init<acc>(); }
  template <int M>
  static __device__ __forceinline__ type update(type s, const acc (&z)[M], const acc (&y)[M]) {
    return fm::w_ent_update_block(s, z, y);
  }
};
template <typename acc, bool kEnt>
struct BStateOf {
  using type = fm::OnlineState<acc>;
  static __device__ __forceinline__ type init() { return fm::online_init<acc>(); }
  template <int M>
  static __device__ __forceinline__ type update(type s, const acc (&z)[M]) {
    return fm::online_update_block(s, z);
  }
};
template <typename acc>
struct BStateOf<acc, true> {
  using type = fm::OnlineEntState<acc>;
  static __device__ __forceinline__ type init() { return fm::online_ent_init<acc>(); }
  template <int M>
  static __device__ __forceinline__ type update(type s, const acc (&z)[M]) {
    return fm::online_ent_update_block(s, z);
  }
};

// The rows of distill_kernel (kEnt false) and distill_entropy_kernel (kEnt true: the student's state of pass 1
// carries the entropy accumulator, written to stats[:, kStudentEntropy]; without it that column is written as 0).
// In the student's state only the merged w is new: every other value is computed as without it.
template <typename T, int kDiv, Mode kMode, bool kEnt>
__device__ __forceinline__ void distill_rows(const DistillArgs<T>& a) {
  using acc = acc_t<T>;
  constexpr bool kStudentIsA = kDiv == fm::kReverseKL;
  using SA = AStateOf<acc, kEnt && kStudentIsA>;
  using SB = BStateOf<acc, kEnt && !kStudentIsA>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const acc it = static_cast<acc>(a.inv_t), beta = static_cast<acc>(a.beta);
  const int64_t V = a.V;
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const T* s = a.s + row * V;
    const T* t = a.t + row * V;
    double* st = a.stats + row * kDistillStats;
    // fl-audit: cold -- the row's target, one load per thread per row
    const int64_t target = a.has_target ? a.target[row] : -1;
    const bool masked = a.has_target && target == a.ignore_index;
    if (a.has_target && !masked && tid == 0) {
      CUDA_KERNEL_ASSERT(target >= 0 && target < V);
    }
    const bool bad = a.has_target && !masked && !(target >= 0 && target < V);
    if (masked || bad) {  // uniform over the block
      const double fill = bad ? std::numeric_limits<double>::quiet_NaN() : 0.0;
      if (tid == 0 && kMode != Mode::Backward) {
        // fl-audit: cold -- thread 0, once per masked row: its loss and statistics
        a.loss[row] = fill;
        for (int i = 0; i < kDistillStats; ++i) st[i] = 0.0;
      }
      if constexpr (kMode != Mode::Forward) {
        T* out = a.grad + row * V;
        segment_fill(out, V, static_cast<T>(fill), tid, nt);
      }
      continue;
    }
    const bool hard = a.hard;

    if constexpr (kMode != Mode::Backward) {
      typename SA::type wa = SA::init();
      typename SB::type ob = SB::init();
      fm::OnlineState<acc> ox = fm::online_init<acc>();
      const bool raw = a.raw && hard;
      segment_visit<kLoads, true>(s, t, V, common_head(s, t, t, V), tid, nt, [&](auto& vs, auto& vt) {
        constexpr int M = sizeof(vs) / sizeof(vs[0]);
        acc za[M], zb[M], y[M];
#pragma unroll
        for (int k = 0; k < M; ++k) {
          const acc zs = vs[k] * it, zt = vt[k] * it;
          za[k] = kStudentIsA ? zs : zt;
          zb[k] = kStudentIsA ? zt : zs;
          y[k] = za[k] - zb[k];
        }
        wa = SA::update(wa, za, y);
        ob = SB::update(ob, zb);
        if (raw) ox = fm::online_update_block(ox, vs);
      });
      wa = block_allreduce(wa);
      ob = block_allreduce(ob);
      if (raw) ox = block_allreduce(ox);
      const double lse_a = lse_of(fm::OnlineState<acc>{wa.m, wa.d}), lse_b = lse_of(fm::OnlineState<acc>{ob.m, ob.d});
      double ent = 0.0;
      if constexpr (kEnt && kStudentIsA) ent = fm::entropy_of(static_cast<double>(wa.d), static_cast<double>(wa.w));
      if constexpr (kEnt && !kStudentIsA) ent = fm::entropy_of(static_cast<double>(ob.d), static_cast<double>(ob.w));
      const double lse_s = kStudentIsA ? lse_a : lse_b, lse_t = kStudentIsA ? lse_b : lse_a;
      double row_loss, aux = 0.0;
      if constexpr (kDiv == fm::kJSD) {
        const auto ps = fm::lse_parts<acc>(lse_s), pt = fm::lse_parts<acc>(lse_t);
        fm::JsdTerms<acc> sums{acc(0), acc(0)};
        segment_visit<kLoads, true>(s, t, V, common_head(s, t, t, V), tid, nt, [&](auto& vs, auto& vt) {
          constexpr int M = sizeof(vs) / sizeof(vs[0]);
#pragma unroll
          for (int k = 0; k < M; ++k) {
            const auto terms = fm::jsd_terms(fm::logprob_at(vs[k] * it, ps.m, ps.log_scale),
                                             fm::logprob_at(vt[k] * it, pt.m, pt.log_scale), beta);
            sums.loss += terms.loss;
            sums.kl_sm += terms.kl_sm;
          }
        });
        sums = block_allreduce(sums);
        row_loss = static_cast<double>(sums.loss);
        aux = static_cast<double>(sums.kl_sm);
      } else {
        row_loss = fm::kl_from_states(fm::WState<double>{static_cast<double>(wa.m), static_cast<double>(wa.d),
                                                         static_cast<double>(wa.u)},
                                      fm::OnlineState<double>{static_cast<double>(ob.m), static_cast<double>(ob.d)});
        if (kDiv == fm::kReverseKL) aux = row_loss;
      }
      double lse_x = 0.0;
      if (hard) {
        lse_x = raw ? lse_of(ox) : lse_s;
        // fl-audit: cold -- the target's student logit, one load per thread per row (hard term only)
        row_loss += a.hard_weight * (lse_x - static_cast<double>(s[target]));
      }
      __syncthreads();  // every thread has read s[target] before the gradient pass may overwrite it
      if (tid == 0) {
        // fl-audit: cold -- thread 0 writes the row's loss and statistics once per row
        a.loss[row] = row_loss;
        st[kLseStudent] = lse_s;
        st[kLseTeacher] = lse_t;
        // fl-audit: cold -- the last three statistics, as above
        st[kRowAux] = aux;
        st[kLseHard] = lse_x;
        st[kStudentEntropy] = ent;
      }
      __syncthreads();  // the statistics are in memory for the gradient pass below
    }

    if constexpr (kMode != Mode::Forward) {
      // fl-audit: cold -- the row's saved statistics and grad scale, a few doubles per row
      const auto ps = fm::lse_parts<acc>(st[kLseStudent]), pt = fm::lse_parts<acc>(st[kLseTeacher]);
      const auto px = fm::lse_parts<acc>(st[kLseHard]);
      const acc aux = static_cast<acc>(st[kRowAux]);
      const double scale = a.scale[row];
      const acc g = static_cast<acc>(scale * a.inv_t), gh = static_cast<acc>(scale * a.hard_weight);
      auto f = [&](acc vs, acc vt) {
        const acc ls = fm::logprob_at(vs * it, ps.m, ps.log_scale), lt = fm::logprob_at(vt * it, pt.m, pt.log_scale);
        acc d = fm::divergence_grad<kDiv>(ls, lt, beta, aux) * g;
        if (hard) d += gh * fm::exp_nonpos(fm::logprob_at(vs, px.m, px.log_scale));
        return d;
      };
      T* out = a.grad + row * V;
      // fl-audit: cold -- thread 0 reads the target's two logits once per row (hard term only)
      const acc s_k = hard && tid == 0 ? static_cast<acc>(s[target]) : acc(0);
      const acc t_k = hard && tid == 0 ? static_cast<acc>(t[target]) : acc(0);
      __syncthreads();  // s_k read before the row is overwritten (grad may alias the student logits)
      segment_map<true>(s, t, out, V, common_head(s, t, static_cast<const T*>(out), V), tid, nt, f);
      __syncthreads();
      // fl-audit: cold -- thread 0 writes the target's gradient entry once per row
      if (hard && tid == 0) out[target] = static_cast<T>(f(s_k, t_k) - gh);
    }
  }
}

template <typename T, int kDiv, Mode kMode>
__global__ void __launch_bounds__(kThreads) distill_kernel(const DistillArgs<T> a) {
  distill_rows<T, kDiv, kMode, false>(a);
}

// distill_fwd(student_entropy=True): the forward (with or without the gradient) whose student state carries the
// entropy accumulator. The backward never needs it.
template <typename T, int kDiv, Mode kMode>
__global__ void __launch_bounds__(kThreads) distill_entropy_kernel(const DistillArgs<T> a) {
  static_assert(kMode != Mode::Backward);
  distill_rows<T, kDiv, kMode, true>(a);
}

unsigned row_grid(int64_t N) { return grid_size(N); }

// ---------------------------------------------------------------- launchers

// Passes over the logits (tests/test_emu_traffic.py; bench/audit_cuda.py):
// fl-passes: token_logprobs = 1R + 0W (floor 1R + 0W)
// fl-passes: token_logprobs_backward = 1R + 1W (floor 1R + 1W)
// fl-passes: token_logprobs_train = 2R + 1W (floor 1R + 1W) -- forward then backward
void logprob_forward(const at::Tensor& x, const at::Tensor& tokens, double inv_t, const at::Tensor& logp,
                     const at::Tensor& entropy, const at::Tensor& lse, const at::Tensor& stats,
                     const at::Tensor& argmax) {
  const DeviceGuard guard(x.device());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_logprob_fwd_cuda", [&] {
    const LogprobArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                     tokens.const_data_ptr<int64_t>(),
                                     x.size(0),
                                     x.size(1),
                                     inv_t,
                                     logp.mutable_data_ptr<double>(),
                                     entropy.defined() ? entropy.mutable_data_ptr<double>() : nullptr,
                                     lse.mutable_data_ptr<double>(),
                                     stats.defined() ? stats.mutable_data_ptr<double>() : nullptr,
                                     stats.defined() ? argmax.mutable_data_ptr<int64_t>() : nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     0,
                                     false};
    if (stats.defined()) {
      launch_kernel<&logprob_stats_forward_kernel<scalar_t>>(row_grid(x.size(0)), kThreads, 0, stream, args);
    } else if (entropy.defined()) {
      launch_kernel<&logprob_forward_kernel<scalar_t, true>>(row_grid(x.size(0)), kThreads, 0, stream, args);
    } else {
      launch_kernel<&logprob_forward_kernel<scalar_t, false>>(row_grid(x.size(0)), kThreads, 0, stream, args);
    }
  });
}

void logprob_backward(const at::Tensor& x, const at::Tensor& tokens, int64_t vocab_start, bool shard, double inv_t,
                      const at::Tensor& g_lp, const at::Tensor& g_h, const at::Tensor& lse, const at::Tensor& entropy,
                      const at::Tensor& grad) {
  const DeviceGuard guard(x.device());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_logprob_bwd_cuda", [&] {
    const LogprobArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                     tokens.const_data_ptr<int64_t>(),
                                     x.size(0),
                                     x.size(1),
                                     inv_t,
                                     nullptr,
                                     g_h.defined() ? const_cast<double*>(entropy.const_data_ptr<double>()) : nullptr,
                                     const_cast<double*>(lse.const_data_ptr<double>()),
                                     nullptr,
                                     nullptr,
                                     g_lp.defined() ? g_lp.const_data_ptr<double>() : nullptr,
                                     g_h.defined() ? g_h.const_data_ptr<double>() : nullptr,
                                     grad.mutable_data_ptr<scalar_t>(),
                                     vocab_start,
                                     shard};
    launch_kernel<&logprob_backward_kernel<scalar_t>>(row_grid(x.size(0)), kThreads, 0, stream, args);
  });
}

template <Mode kMode>
// Forward with the gradient: the statistics of both rows, then both re-read to write the student's gradient.
// fl-passes: distillation_forward_kl = 4R + 1W (floor 2R + 1W)
// fl-passes: distillation_jsd = 6R + 1W (floor 2R + 1W) -- the two lse's, the mixture's sums, the gradient
void launch_distill(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                    const DistillParams& p, const at::Tensor& loss, const at::Tensor& stats, const at::Tensor& scale,
                    const at::Tensor& grad) {
  const DeviceGuard guard(student.device());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastloss_distill_cuda", [&] {
    const DistillArgs<scalar_t> args{
        student.const_data_ptr<scalar_t>(),
        teacher.const_data_ptr<scalar_t>(),
        target.defined() ? target.const_data_ptr<int64_t>() : nullptr,
        student.size(0),
        student.size(1),
        p.ignore_index,
        p.inv_temperature,
        p.beta,
        p.hard_weight,
        p.inv_temperature != 1.0,
        loss.defined() ? loss.mutable_data_ptr<double>() : nullptr,
        const_cast<double*>(stats.const_data_ptr<double>()),
        scale.defined() ? scale.const_data_ptr<double>() : nullptr,
        grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr,
        target.defined(),
        p.hard_weight != 0.0 && target.defined()};
    const unsigned grid = row_grid(student.size(0));
    if constexpr (kMode != Mode::Backward) {
      if (p.student_entropy) {
        if (p.divergence == fm::kForwardKL) {
          launch_kernel<&distill_entropy_kernel<scalar_t, fm::kForwardKL, kMode>>(grid, kThreads, 0, stream, args);
        } else if (p.divergence == fm::kReverseKL) {
          launch_kernel<&distill_entropy_kernel<scalar_t, fm::kReverseKL, kMode>>(grid, kThreads, 0, stream, args);
        } else {
          launch_kernel<&distill_entropy_kernel<scalar_t, fm::kJSD, kMode>>(grid, kThreads, 0, stream, args);
        }
        return;
      }
    }
    if (p.divergence == fm::kForwardKL) {
      launch_kernel<&distill_kernel<scalar_t, fm::kForwardKL, kMode>>(grid, kThreads, 0, stream, args);
    } else if (p.divergence == fm::kReverseKL) {
      launch_kernel<&distill_kernel<scalar_t, fm::kReverseKL, kMode>>(grid, kThreads, 0, stream, args);
    } else {
      launch_kernel<&distill_kernel<scalar_t, fm::kJSD, kMode>>(grid, kThreads, 0, stream, args);
    }
  });
}

void distill_forward(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                     const DistillParams& p, const at::Tensor& loss, const at::Tensor& stats,
                     const at::Tensor& grad_scale, const at::Tensor& grad) {
  if (grad.defined()) launch_distill<Mode::ForwardGrad>(student, teacher, target, p, loss, stats, grad_scale, grad);
  else launch_distill<Mode::Forward>(student, teacher, target, p, loss, stats, at::Tensor(), at::Tensor());
}

void distill_backward(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                      const DistillParams& p, const at::Tensor& grad_loss, const at::Tensor& stats,
                      const at::Tensor& grad) {
  launch_distill<Mode::Backward>(student, teacher, target, p, at::Tensor(), stats, grad_loss, grad);
}

}  // namespace
}  // namespace cuda

const PolicyKernels& cuda_policy_kernels() {
  static const PolicyKernels table{&cuda::logprob_forward, &cuda::logprob_backward, &cuda::distill_forward,
                                   &cuda::distill_backward};
  return table;
}

}  // namespace fastloss
