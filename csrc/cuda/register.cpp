// CUDA implementations of the fastloss schemas: the generic op layers over the row kernels of csrc/cuda/*.cu.
#include "register_impl.h"

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  fastloss::SoftmaxDeviceOps<&fastloss::cuda_softmax_kernels>::register_all(m);
  fastloss::CrossEntropyDeviceOps<&fastloss::cuda_softmax_kernels, &fastloss::cuda_cross_entropy_kernels>::register_all(m);
  fastloss::PolicyDeviceOps<&fastloss::cuda_policy_kernels>::register_all(m);
  fastloss::SphericalDeviceOps<&fastloss::cuda_spherical_kernels>::register_all(m);
}
