// Picks the CPU kernel table for the running processor: AVX2+FMA when the CPU has them, else the portable build.
#include "fastloss/cross_entropy_kernels.h"
#include "fastloss/policy_kernels.h"
#include "fastloss/softmax_kernels.h"
#include "fastloss/spherical_kernels.h"

namespace fastloss {
namespace cpu {
namespace DEFAULT {
const SoftmaxKernels& kernel_table();
const CrossEntropyKernels& ce_kernel_table();
const PolicyKernels& policy_kernel_table();
const SphericalKernels& spherical_kernel_table();
}  // namespace DEFAULT
#ifdef FASTLOSS_HAVE_AVX2
namespace AVX2 {
const SoftmaxKernels& kernel_table();
const CrossEntropyKernels& ce_kernel_table();
const PolicyKernels& policy_kernel_table();
const SphericalKernels& spherical_kernel_table();
}  // namespace AVX2
#endif

static bool use_avx2() {
#ifdef FASTLOSS_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  return avx2;
#else
  return false;
#endif
}
}  // namespace cpu

const SoftmaxKernels& cpu_softmax_kernels() {
#ifdef FASTLOSS_HAVE_AVX2
  if (cpu::use_avx2()) return cpu::AVX2::kernel_table();
#endif
  return cpu::DEFAULT::kernel_table();
}

const CrossEntropyKernels& cpu_cross_entropy_kernels() {
#ifdef FASTLOSS_HAVE_AVX2
  if (cpu::use_avx2()) return cpu::AVX2::ce_kernel_table();
#endif
  return cpu::DEFAULT::ce_kernel_table();
}

const PolicyKernels& cpu_policy_kernels() {
#ifdef FASTLOSS_HAVE_AVX2
  if (cpu::use_avx2()) return cpu::AVX2::policy_kernel_table();
#endif
  return cpu::DEFAULT::policy_kernel_table();
}

const SphericalKernels& cpu_spherical_kernels() {
#ifdef FASTLOSS_HAVE_AVX2
  if (cpu::use_avx2()) return cpu::AVX2::spherical_kernel_table();
#endif
  return cpu::DEFAULT::spherical_kernel_table();
}

}  // namespace fastloss
