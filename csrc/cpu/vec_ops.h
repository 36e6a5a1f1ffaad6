// The math policy for at::vec::Vectorized<float>, so the shared formulas in fastloss/math.h run on SIMD lanes.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "fastloss/math.h"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {

template <>
struct Ops<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  using Mask = Vec;  // all-ones / all-zeros lanes, as at::vec's comparison operators return
  static Vec splat(float c) { return Vec(c); }
  static Vec fma(Vec a, Vec b, Vec c) { return at::vec::fmadd(a, b, c); }
  static Vec rint(Vec x) { return x.round(); }  // round half to even, like rintf
  // maxps without NaN fix-ups (3 instructions fewer): a NaN element still reaches every result through the sums,
  // which the formulas in math.h only ever multiply, never select away (see scale_pow2 / pow2_or_zero).
  static Vec max(Vec a, Vec b) {
#if defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_max_ps(a, b));
#else
    return at::vec::maximum(a, b);
#endif
  }
  static Vec log(Vec x) { return x.log(); }
  static Vec tanh(Vec x) { return x.tanh(); }
  static Mask lt(Vec a, Vec b) { return a < b; }
  static Mask eq(Vec a, Vec b) { return a == b; }
  static Vec select(Mask m, Vec a, Vec b) { return Vec::blendv(b, a, m); }
  static Vec shl23(Vec v) {
#if defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(v), 23)));
#else
    return at::vec::cast<float>(at::vec::cast<int32_t>(v) << IVec(23));
#endif
  }
};

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss
