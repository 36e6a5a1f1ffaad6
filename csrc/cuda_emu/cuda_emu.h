// A CUDA execution layer for the CPU: runs fastloss's CUDA C++ kernel bodies, compiled by the host C++ compiler,
// thread block by thread block (the idea of Triton's TRITON_INTERPRET=1, for CUDA C++).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; the block's fibers really interleave between
// synchronisation points, and the order in which they are resumed is a *schedule* chosen by a seed
// (FASTLOSS_EMU_SCHEDULE or set_schedule()): 0 = lane order, 1 = reverse lane order, odd seeds >= 3 = a fresh
// random permutation at every round (all threads advance one synchronisation point per round), even seeds >= 2 =
// warps in random order, each run as far as it can before the next (one warp runs ahead to the next barrier), `mix`
// a different one per launch. A missing __syncthreads, a shuffle with the wrong width or mask, or a shared slot read
// before it is written therefore changes the result under some schedule instead of passing by luck.
//
// What is modelled:
//  * threadIdx / blockIdx / blockDim / gridDim (x, y, z);
//  * __syncthreads, __syncthreads_or / _and / _count: block barriers. A barrier that not every thread of the block
//    reaches (some exited, or wait at another barrier or warp op) is reported as a deadlock, never a hang;
//  * __syncwarp, __shfl_sync / __shfl_xor_sync / __shfl_up_sync / __shfl_down_sync with widths, __any_sync,
//    __all_sync, __ballot_sync: every lane named in the mask must arrive (else deadlock), a lane outside the mask
//    that calls, a mask naming a lane the block does not have, or a read from a lane outside the mask is an error;
//  * static __shared__ memory: `static thread_local`, so private to the block running on this OS thread (blocks of
//    one launch run one after another on it); declared with FL_SHARED it is filled with a poison byte pattern
//    before every block, so a read before any write sees garbage (NaN for floats), not the previous block's values;
//  * __ldg, __float_as_int / __int_as_float / __double_as_longlong / __longlong_as_double, CUDA_KERNEL_ASSERT;
//  * launch(kernel, grid, block, smem, stream, args...): every block of the grid, and a launch count per kernel.
//
// What it cannot show: speed, occupancy, register limits, the GPU memory model (there is no concurrency between
// blocks or with the host), warp-synchronous code that relies on lockstep execution without a sync, libdevice's
// rounding of exp/log (the host libm runs instead), cuBLAS and the torch CUDA integration.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>  // CUDA declares its math functions (isfinite, expf, ...) in the global namespace
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace fastloss {
namespace emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

// A kernel did something CUDA leaves undefined or that would hang: deadlock, divergent shuffle, bad mask, assert.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kWarp = 32;
constexpr unsigned char kPoison = 0xff;  // NaN as float or double, -1 as integers

// Per CUDA thread, visible to the kernel body through the macros below.
struct ThreadState {
  uint3 tid;
  int linear = 0;  // linear thread index in the block
};

ThreadState& current_thread();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Schedule: 0 lane order, 1 reverse, odd >= 3 random rounds, even >= 2 random warp-greedy (seeded). Read from
// FASTLOSS_EMU_SCHEDULE at first use.
void set_schedule(uint64_t seed);
uint64_t schedule();

// schedule() under FASTLOSS_EMU_SCHEDULE=mix: a different schedule per launch, cycling reverse / random rounds /
// warp-greedy with a seed that changes at every launch.
constexpr uint64_t kMix = ~uint64_t(0) - 1;

// The largest grid.x the launch helper uses (csrc/cuda/launch.cuh); lowering it makes kernels run their grid-stride
// loops. FASTLOSS_EMU_MAX_GRID at first use, else CUDA's 2^31 - 1.
int64_t max_grid_x();
void set_max_grid_x(int64_t n);

// Launch counts per kernel name.
std::map<std::string, uint64_t> launch_counts();

// Global-memory bytes of row data the kernels read and wrote since the last reset: the row helpers of
// csrc/cuda/row_reduce.cuh (and the few kernels that walk rows themselves) add the bytes of each segment they
// traverse, once per segment (FL_ROW_TRAFFIC). Per-row scalars (targets, losses, statistics) are not counted, so
// bytes / (rows x V x element size) is the op's number of passes over its row data (tests/test_emu_traffic.py).
void add_traffic(uint64_t read, uint64_t written);
void traffic(uint64_t* read, uint64_t* written);
void reset_traffic();

// Kernel instantiations compiled into the program (registered at load by the launch helper of
// csrc/cuda/launch.cuh): `signature` is the helper's __PRETTY_FUNCTION__, from which the kernel's name with its
// template arguments is taken; returns that name (stable storage), the key of launch_counts().
const char* register_kernel(const char* signature);
std::vector<std::string> compiled_kernels();

namespace detail {

enum class Op : int { None, Barrier, Warp };
enum class WarpOp : int { Sync, ShflIdx, ShflXor, ShflUp, ShflDown, Any, All, Ballot };
enum class BarrierKind : int { Plain, Or, And, Count };

// Blocks the calling fiber at a barrier / warp op until the scheduler releases it; returns the op's result.
int64_t barrier(BarrierKind kind, int pred);
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width);
[[noreturn]] void fail(const std::string& what);

// Registers a static __shared__ array of this OS thread, so every block starts with it poisoned.
struct SharedRegistration {
  SharedRegistration(void* p, size_t n);
};

void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace detail

template <typename Kernel, typename... Args>
void launch(const char* name, Kernel* kernel, dim3 grid, dim3 block, size_t /*dynamic_smem*/, Args... args) {
  detail::run_grid(name, grid, block, [&] { kernel(args...); });
}

}  // namespace emu
}  // namespace fastloss

// ------------------------------------------------------------------------------------------------ CUDA spellings
using fastloss::emu::dim3;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::fastloss::emu::current_thread().tid)
#define blockIdx (::fastloss::emu::block_idx())
#define blockDim (::fastloss::emu::block_dim())
#define gridDim (::fastloss::emu::grid_dim())
#define warpSize 32

// `__shared__ T name[N];` -> one array per OS thread, so private to the block running there. Declared through
// FL_SHARED(T, name, [N]) (plain `__shared__ T name[N];` under nvcc) it is also poisoned before every block.
#define __shared__ static thread_local
#define FL_EMU_CAT2(a, b) a##b
#define FL_EMU_CAT(a, b) FL_EMU_CAT2(a, b)
#define FL_SHARED(type, name, dims)        \
  static thread_local type name dims;      \
  static thread_local ::fastloss::emu::detail::SharedRegistration FL_EMU_CAT(name, _fl_shared_reg)(&name, sizeof(name))

#define CUDA_KERNEL_ASSERT(cond)                                                                           \
  do {                                                                                                     \
    if (!(cond)) ::fastloss::emu::detail::fail(std::string("CUDA_KERNEL_ASSERT failed: ") + #cond + " at " + \
                                               __FILE__ + ":" + std::to_string(__LINE__));                  \
  } while (0)

inline void __syncthreads() { ::fastloss::emu::detail::barrier(::fastloss::emu::detail::BarrierKind::Plain, 0); }
inline int __syncthreads_or(int p) {
  return static_cast<int>(::fastloss::emu::detail::barrier(::fastloss::emu::detail::BarrierKind::Or, p != 0));
}
inline int __syncthreads_and(int p) {
  return static_cast<int>(::fastloss::emu::detail::barrier(::fastloss::emu::detail::BarrierKind::And, p != 0));
}
inline int __syncthreads_count(int p) {
  return static_cast<int>(::fastloss::emu::detail::barrier(::fastloss::emu::detail::BarrierKind::Count, p != 0));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fastloss::emu::detail::warp_op(::fastloss::emu::detail::WarpOp::Sync, mask, 0, 0, 32);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  using namespace ::fastloss::emu::detail;
  return from_bits<T>(warp_op(WarpOp::ShflIdx, mask, to_bits(v), src, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace ::fastloss::emu::detail;
  return from_bits<T>(warp_op(WarpOp::ShflXor, mask, to_bits(v), lane_mask, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::fastloss::emu::detail;
  return from_bits<T>(warp_op(WarpOp::ShflUp, mask, to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::fastloss::emu::detail;
  return from_bits<T>(warp_op(WarpOp::ShflDown, mask, to_bits(v), static_cast<int>(delta), width));
}
inline int __any_sync(unsigned mask, int p) {
  using namespace ::fastloss::emu::detail;
  return static_cast<int>(warp_op(WarpOp::Any, mask, p != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int p) {
  using namespace ::fastloss::emu::detail;
  return static_cast<int>(warp_op(WarpOp::All, mask, p != 0, 0, 32));
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  using namespace ::fastloss::emu::detail;
  return static_cast<unsigned>(warp_op(WarpOp::Ballot, mask, p != 0, 0, 32));
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __float_as_int(float v) { return ::fastloss::emu::detail::from_bits<int>(::fastloss::emu::detail::to_bits(v)); }
inline float __int_as_float(int v) { return ::fastloss::emu::detail::from_bits<float>(::fastloss::emu::detail::to_bits(v)); }
inline long long __double_as_longlong(double v) {
  return ::fastloss::emu::detail::from_bits<long long>(::fastloss::emu::detail::to_bits(v));
}
inline double __longlong_as_double(long long v) {
  return ::fastloss::emu::detail::from_bits<double>(::fastloss::emu::detail::to_bits(v));
}
