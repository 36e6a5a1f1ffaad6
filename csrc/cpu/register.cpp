// CPU implementations of the fastloss schemas: the generic op layers over the CPU row kernels.
#include "register_impl.h"

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  fastloss::SoftmaxDeviceOps<&fastloss::cpu_softmax_kernels>::register_all(m);
  fastloss::CrossEntropyDeviceOps<&fastloss::cpu_softmax_kernels, &fastloss::cpu_cross_entropy_kernels>::register_all(m);
  fastloss::PolicyDeviceOps<&fastloss::cpu_policy_kernels>::register_all(m);
  fastloss::SphericalDeviceOps<&fastloss::cpu_spherical_kernels>::register_all(m);
}
