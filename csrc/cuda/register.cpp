// CUDA implementations of the fastloss schemas: the generic op layer over the row kernels of softmax_cuda.cu.
#include "register_impl.h"

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::DeviceOps<&fastloss::cuda_softmax_kernels>::register_all(m); }
