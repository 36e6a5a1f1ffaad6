// CUDA row kernels for the spherical-family losses (the table of fastloss/spherical_kernels.h; compiled by nvcc and
// run by the CPU execution layer in CI, never yet on a GPU).
//
// The CPU kernels (csrc/cpu/spherical_cpu_kernels.h) are the reference: the same (count, mean, M2) state of
// o_k - o_c from fastloss/spherical_math.h, the same float64 per-row outputs. One block of kThreads threads per
// row, rows grid-stride; each thread folds its share of the row, read with 16-byte vector loads (segment_visit,
// kLoads vectors in flight), into its own state, one block merge per vector group; the block merges the states
// (block_allreduce with Chan's rule) and thread 0 writes the row's loss and statistics. The one-hot MSE's value
// takes a second visit of the row without its target entry (a sum of squares, fastloss/spherical_math.h). The
// backward is one elementwise pass (segment_map), the target's entry written last by thread 0 (the gradient may
// alias the logits).
// A target outside [0, V) fails CUDA_KERNEL_ASSERT; were asserts compiled out, the row is left unread (NaN loss).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#include "fastloss/spherical_kernels.h"
#include "fastloss/spherical_math.h"
#include "launch.cuh"
#include "row_reduce.cuh"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {
// Block all-reduction of the moment state (found by block_allreduce through argument-dependent lookup). Chan's
// merge is not bitwise commutative, but block_allreduce reads one lane per warp and folds the warps in one order,
// so every thread still ends with the same state.
template <typename T>
__device__ __forceinline__ MomentState<T> merge(MomentState<T> a, MomentState<T> b) {
  return moment_merge(a, b);
}
template <int kWidth, typename T>
__device__ __forceinline__ MomentState<T> shfl_xor(MomentState<T> s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.n, off, kWidth), __shfl_xor_sync(0xffffffffu, s.mean, off, kWidth),
          __shfl_xor_sync(0xffffffffu, s.m2, off, kWidth)};
}
}  // namespace FL_ISA_NAMESPACE
}  // namespace math

namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLoads = 2;  // vectors in flight per thread in the statistics pass

template <typename T>
struct SphericalArgs {
  const T* x;
  const int64_t* target;
  int64_t N, V, ignore_index;
  int kind;
  double a, b;
  double* loss;         // forward
  double* stats;        // [N, kSphericalStats]: written by the forward, read by the backward
  const double* g;      // backward: grad_loss
  T* grad;              // backward
};

template <typename T>
__global__ void __launch_bounds__(kThreads) spherical_forward_kernel(const SphericalArgs<T> a) {
  using acc = acc_t<T>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    // fl-audit: cold -- the row's target, one load per thread per row
    const int64_t c = a.target[row];
    double* st = a.stats + row * kSphericalStats;
    if (c == a.ignore_index) {
      if (tid == 0) {
        // fl-audit: cold -- thread 0 writes an ignored row's loss and statistics once per row
        a.loss[row] = 0.0;
        st[kStatShift] = st[kStatVar] = st[kStatTarget] = 0.0;
      }
      continue;
    }
    if (tid == 0) {
      CUDA_KERNEL_ASSERT(c >= 0 && c < a.V);
    }
    if (c < 0 || c >= a.V) {
      // fl-audit: cold -- thread 0 writes a bad-target row's NaN loss once per row
      if (tid == 0) a.loss[row] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const T* x = a.x + row * a.V;
    // fl-audit: cold -- the target's logit (the pivot), one load per thread per row
    const acc pivot = static_cast<acc>(x[c]);
    fm::MomentState<acc> s = fm::moment_init<acc>();
    segment_visit<kLoads, false>(x, x, a.V, aligned_head(x, a.V), tid, nt, [&](auto& v, auto&) {
      constexpr int M = sizeof(v) / sizeof(v[0]);
      acc d[M];
#pragma unroll
      for (int k = 0; k < M; ++k) d[k] = v[k] - pivot;
      s = fm::moment_add_block(s, d);
    });
    s = block_allreduce(s);
    acc rest_sq = acc(0);
    if (a.kind == fm::kOneHotMSE) {  // the value as a sum of squares without the target: [0, c) and (c, V)
      auto sq = [&](auto& v, auto&) {
        constexpr int M = sizeof(v) / sizeof(v[0]);
#pragma unroll
        for (int k = 0; k < M; ++k) rest_sq = fm::Ops<acc>::fma(v[k], v[k], rest_sq);
      };
      const T* y = x + c + 1;
      segment_visit<kLoads, false>(x, x, c, aligned_head(x, c), tid, nt, sq);
      segment_visit<kLoads, false>(y, y, a.V - c - 1, aligned_head(y, a.V - c - 1), tid, nt, sq);
      rest_sq = block_allreduce(rest_sq);
    }
    if (tid == 0) {
      const double V = static_cast<double>(a.V);
      const double var = static_cast<double>(s.m2) / V;
      const double dmu = static_cast<double>(s.mean);
      const double oc = static_cast<double>(pivot);
      // fl-audit: cold -- thread 0 writes the row's loss and statistics once per row
      a.loss[row] = a.kind == fm::kOneHotMSE ? fm::onehot_mse_value(static_cast<double>(rest_sq), oc)
                                             : fm::spherical_terms(a.kind, oc, dmu, var, V, a.a, a.b).loss;
      // fl-audit: cold -- the row's three statistics, as above
      st[kStatShift] = dmu;
      st[kStatVar] = var;
      st[kStatTarget] = oc;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spherical_backward_kernel(const SphericalArgs<T> a) {
  using acc = acc_t<T>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    // fl-audit: cold -- the row's target, one load per thread per row
    const int64_t c = a.target[row];
    const T* x = a.x + row * a.V;
    T* out = a.grad + row * a.V;
    const int64_t head = same_alignment(x, static_cast<const T*>(out)) ? aligned_head(x, a.V) : a.V;
    if (c == a.ignore_index || c < 0 || c >= a.V) {
      if (tid == 0) {
        CUDA_KERNEL_ASSERT(c == a.ignore_index);
      }
      // Zero for ignored rows (NaN for a bad target, should asserts be compiled out).
      const acc fill = c == a.ignore_index ? acc(0) : std::numeric_limits<acc>::quiet_NaN();
      segment_fill(out, a.V, static_cast<T>(fill), tid, nt);
      continue;
    }
    const double* st = a.stats + row * kSphericalStats;
    const double V = static_cast<double>(a.V);
    // fl-audit: cold -- the row's saved statistics and grad_loss, a few doubles per row
    const double oc = st[kStatTarget];
    const fm::SphericalGradCoef k = fm::spherical_grad_coef(
        a.kind, fm::spherical_terms(a.kind, oc, st[kStatShift], st[kStatVar], V, a.a, a.b), a.g[row], V, oc,
        st[kStatShift]);
    const acc c0 = static_cast<acc>(k.c0), c1 = static_cast<acc>(k.c1);
    const acc p1 = static_cast<acc>(k.p1), p2 = static_cast<acc>(k.p2);
    segment_map<false>(x, x, out, a.V, head, tid, nt, [&](acc v, acc) { return c0 + c1 * ((v - p1) - p2); });
    __syncthreads();  // every thread's pass is done before the target's entry is set
    // fl-audit: cold -- thread 0 writes the target's gradient entry once per row
    if (tid == 0) out[c] = static_cast<T>(fm::spherical_grad_at_target(k, oc));
  }
}

// One thread per row: the loss and its partials from the statistics alone (the linear version's rows); ignored
// rows 0. A target outside [0, V) fails CUDA_KERNEL_ASSERT (NaN, were asserts compiled out).
__global__ void __launch_bounds__(kThreads) spherical_terms_kernel(const double* stats, const int64_t* target,
                                                                  int64_t N, int64_t V, int64_t ignore_index,
                                                                  int kind, double a, double b, double* loss,
                                                                  double* partials) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < N;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double* s = stats + r * kSphericalStats;
    // fl-audit: cold -- one thread per row: its target
    const int64_t c = target[r];
    fm::SphericalTerms t{0.0, 0.0, 0.0, 0.0};
    if (c != ignore_index) {
      CUDA_KERNEL_ASSERT(c >= 0 && c < V);
      // fl-audit: cold -- one thread per row: its three saved statistics
      t = c >= 0 && c < V ? fm::spherical_terms(kind, s[kStatTarget], s[kStatShift], s[kStatVar],
                                                static_cast<double>(V), a, b)
                          : fm::SphericalTerms{NAN, NAN, NAN, NAN};
    }
    // fl-audit: cold -- one thread per row: its loss and three partials
    loss[r] = t.loss;
    partials[3 * r] = t.d_oc;
    partials[3 * r + 1] = t.d_mu;
    partials[3 * r + 2] = t.d_var;
  }
}

// ---------------------------------------------------------------- launchers

template <typename scalar_t>
SphericalArgs<scalar_t> make_args(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p) {
  SphericalArgs<scalar_t> args{};
  args.x = x.const_data_ptr<scalar_t>();
  args.target = target.const_data_ptr<int64_t>();
  args.N = x.size(0);
  args.V = x.size(1);
  args.ignore_index = p.ignore_index;
  args.kind = p.kind;
  args.a = p.a;
  args.b = p.b;
  return args;
}

// Passes over the logits (tests/test_emu_traffic.py; bench/audit_cuda.py); the one-hot MSE's forward adds a read.
// fl-passes: spherical = 1R + 0W (floor 1R + 0W)
// fl-passes: spherical_backward = 1R + 1W (floor 1R + 1W)
void spherical_forward(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p,
                       const at::Tensor& loss, const at::Tensor& stats) {
  const DeviceGuard guard(x.device());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_spherical_fwd_cuda", [&] {
    SphericalArgs<scalar_t> args = make_args<scalar_t>(x, target, p);
    args.loss = loss.mutable_data_ptr<double>();
    args.stats = stats.mutable_data_ptr<double>();
    launch_kernel<&spherical_forward_kernel<scalar_t>>(grid_size(x.size(0)), kThreads, 0, stream, args);
  });
}

void spherical_backward(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p,
                        const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& grad) {
  const DeviceGuard guard(x.device());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_spherical_bwd_cuda", [&] {
    SphericalArgs<scalar_t> args = make_args<scalar_t>(x, target, p);
    args.stats = const_cast<double*>(stats.const_data_ptr<double>());
    args.g = grad_loss.const_data_ptr<double>();
    args.grad = grad.mutable_data_ptr<scalar_t>();
    launch_kernel<&spherical_backward_kernel<scalar_t>>(grid_size(x.size(0)), kThreads, 0, stream, args);
  });
}

void spherical_terms(const at::Tensor& stats, const at::Tensor& target, int64_t V, const SphericalParams& p,
                     const at::Tensor& loss, const at::Tensor& partials) {
  const DeviceGuard guard(stats.device());
  const int64_t N = stats.size(0);
  launch_kernel<&spherical_terms_kernel>(grid_size((N + kThreads - 1) / kThreads), kThreads, 0, current_stream(),
                                         stats.const_data_ptr<double>(), target.const_data_ptr<int64_t>(), N, V,
                                         p.ignore_index, p.kind, p.a, p.b, loss.mutable_data_ptr<double>(),
                                         partials.mutable_data_ptr<double>());
}

}  // namespace
}  // namespace cuda

const SphericalKernels& cuda_spherical_kernels() {
  static const SphericalKernels table{&cuda::spherical_forward, &cuda::spherical_backward, &cuda::spherical_terms};
  return table;
}

}  // namespace fastloss
