// CPU implementations of the fastloss schemas: the generic op layer over the CPU row kernels.
#include "register_impl.h"

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { fastloss::DeviceOps<&fastloss::cpu_softmax_kernels>::register_all(m); }
