// FASTLOSS_CUDA_EMU builds: the CUDA kernel tables (csrc/cuda/*.cu, compiled by the host compiler against the CPU
// execution layer) registered for CPU tensors in place of the CPU kernels, so the test suite, unchanged, runs the
// CUDA kernels and the op layer's CUDA branches against its float64 references.
//
// C entry points for Python (python/fastloss/_cuda_emu.py, through ctypes): the launch report, the schedule and the
// grid cap.
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "cuda_emu.h"
#include "register_impl.h"

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  fastloss::SoftmaxDeviceOps<&fastloss::cuda_softmax_kernels>::register_all(m);
  fastloss::CrossEntropyDeviceOps<&fastloss::cuda_softmax_kernels, &fastloss::cuda_cross_entropy_kernels>::register_all(m);
  fastloss::PolicyDeviceOps<&fastloss::cuda_policy_kernels>::register_all(m);
  fastloss::SphericalDeviceOps<&fastloss::cuda_spherical_kernels>::register_all(m);
}

extern "C" {

// One line per kernel instantiation compiled into the library (and per launched name, should one not be listed):
// "<launches>\t<name>\n". Writes at most cap bytes (NUL-terminated) and returns the length of the whole report.
__attribute__((visibility("default"))) size_t fastloss_cuda_emu_report(char* buf, size_t cap) {
  namespace emu = fastloss::emu;
  auto counts = emu::launch_counts();
  std::ostringstream os;
  for (const std::string& name : emu::compiled_kernels()) {
    auto it = counts.find(name);
    os << (it == counts.end() ? 0 : it->second) << '\t' << name << '\n';
    if (it != counts.end()) counts.erase(it);
  }
  for (const auto& [name, n] : counts) os << n << '\t' << name << '\n';
  const std::string s = os.str();
  if (buf != nullptr && cap > 0) {
    const size_t n = s.size() < cap - 1 ? s.size() : cap - 1;
    std::memcpy(buf, s.data(), n);
    buf[n] = '\0';
  }
  return s.size();
}

// 0 lane order, 1 reverse, odd >= 3 random rounds, even >= 2 warp-greedy, kMix = mixed (cuda_emu.h).
__attribute__((visibility("default"))) void fastloss_cuda_emu_set_schedule(uint64_t seed) {
  fastloss::emu::set_schedule(seed);
}

__attribute__((visibility("default"))) uint64_t fastloss_cuda_emu_schedule() { return fastloss::emu::schedule(); }

__attribute__((visibility("default"))) void fastloss_cuda_emu_set_max_grid(int64_t n) { fastloss::emu::set_max_grid_x(n); }

__attribute__((visibility("default"))) int64_t fastloss_cuda_emu_max_grid() { return fastloss::emu::max_grid_x(); }

__attribute__((visibility("default"))) void fastloss_cuda_emu_traffic(uint64_t* read, uint64_t* written) {
  fastloss::emu::traffic(read, written);
}

__attribute__((visibility("default"))) void fastloss_cuda_emu_reset_traffic() { fastloss::emu::reset_traffic(); }

}  // extern "C"
