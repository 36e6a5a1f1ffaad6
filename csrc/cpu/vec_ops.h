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
  static Vec max(Vec a, Vec b) { return at::vec::maximum(a, b); }  // propagates NaN
  static Vec log(Vec x) { return x.log(); }
  static Mask lt(Vec a, Vec b) { return a < b; }
  static Mask eq(Vec a, Vec b) { return a == b; }
  static Vec select(Mask m, Vec a, Vec b) { return Vec::blendv(b, a, m); }
  static Vec pow2_bits(Vec k) {
    // Clamp to -127 first (NaN too): callers select 0 below -126, and the int conversion must stay defined.
    Vec kc = Vec::blendv(Vec(-127.0f), k, k >= Vec(-127.0f));
    IVec bits = (at::vec::convert_to_int_of_same_size(kc) + IVec(127)) << IVec(23);
    return at::vec::cast<float>(bits);
  }
};

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss
