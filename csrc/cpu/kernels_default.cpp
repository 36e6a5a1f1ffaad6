// One instruction-set build of the CPU kernels; CMake sets CPU_CAPABILITY (and the -m flags) for this file.
#include "cross_entropy_cpu_kernels.h"
#include "softmax_cpu_kernels.h"
#include "policy_cpu_kernels.h"
#include "spherical_cpu_kernels.h"
