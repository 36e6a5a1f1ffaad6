// One instruction-set build of the CPU kernels; CMake sets CPU_CAPABILITY (and the -m flags) for this file.
#include "softmax_cpu_kernels.h"
