// The host-side CUDA surface the kernel files use, in one place: stream, device guard, SM count, kernel launch and
// block-shared arrays. Under nvcc these are the CUDA / c10 spellings; with FASTLOSS_CUDA_EMU the same .cu files are
// compiled by the host C++ compiler against the CPU execution layer (csrc/cuda_emu/cuda_emu.h), which runs every
// launch block by block with fibers for threads, so CI executes the kernels the GPU would (make test-emu).
//
// Block-shared arrays are declared with FL_SHARED (row_reduce.cuh): the emulator poisons them before every block.
//
// Every launch goes through launch_kernel<&kernel>(grid, block, smem, stream, args...): `kernel<<<...>>>` plus the
// launch check under nvcc; under the emulator also a per-kernel launch count, and a list of every kernel
// instantiation compiled into the library (so a run can say which kernels it never launched).
#pragma once

#include <c10/core/Device.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <string>

#ifdef FASTLOSS_CUDA_EMU
#include "cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#endif

#include "row_reduce.cuh"  // FL_SHARED

namespace fastloss {
namespace cuda {

#ifdef FASTLOSS_CUDA_EMU

using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

// The emulated device has as many SMs as an H100 SXM (132), so kernel selection that depends on filling the GPU
// (the split path for few long rows) chooses as it would there. FASTLOSS_EMU_SMS overrides it.
inline int sm_count() {
  static const int n = [] {
    const char* env = std::getenv("FASTLOSS_EMU_SMS");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return v > 0 ? v : 132;
  }();
  return n;
}

// One entry per kernel instantiation compiled into the library, registered when the library loads.
template <auto Kernel>
struct EmuKernel {
  static const char* name_from_signature() { return ::fastloss::emu::register_kernel(__PRETTY_FUNCTION__); }
  static inline const char* const name = name_from_signature();
};

// The largest grid (x) a launch uses; the kernels loop over the rest (grid-stride). On a GPU that is CUDA's limit,
// reached only past 2^31 blocks; the emulator can lower it (FASTLOSS_EMU_MAX_GRID, set_max_grid_x) so that the
// grid-stride loops, where a block handles several rows one after another, run in tests.
inline int64_t max_grid_x() { return ::fastloss::emu::max_grid_x(); }

template <auto Kernel, typename... Args>
void launch_kernel(dim3 grid, dim3 block, size_t smem, Stream, Args... args) {
  ::fastloss::emu::launch(EmuKernel<Kernel>::name, Kernel, grid, block, smem, args...);
}

#else  // nvcc

using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;

// Streaming multiprocessors of the current device, cached per device (an attribute query, no synchronisation).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < kMaxDevices) {
    if (int n = cache[dev].load(std::memory_order_relaxed)) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = std::max(n, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

inline int64_t max_grid_x() { return 2147483647; }  // gridDim.x limit

template <auto Kernel, typename... Args>
void launch_kernel(dim3 grid, dim3 block, size_t smem, Stream stream, Args... args) {
  Kernel<<<grid, block, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

// Blocks for a launch that wants `blocks` of them: at least 1, at most max_grid_x() (the kernels loop).
inline unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, max_grid_x()));
}

}  // namespace cuda
}  // namespace fastloss
