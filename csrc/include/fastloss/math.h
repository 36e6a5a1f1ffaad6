// fastloss/math.h: the per-element math shared by the CPU and CUDA kernels.
//
// Everything here is a template over a value type V with an `Ops<V>` policy (scalar float and double below;
// at::vec::Vectorized<float> in csrc/cpu/vec_ops.h). The CUDA kernels instantiate it with float, the CPU
// kernels with Vectorized<float> for the body of a row and float for its tail, so the CPU tests exercise the very
// formulas the GPU runs.
//
// Two reductions of a row x[0..V) to its log-sum-exp:
//
//  * online normaliser (Milakov & Gimelshein 2018): a pair (m, d) = (running max, sum of exp(x - m)).
//    m starts at -FLT_MAX rather than -inf, so exp(x - m) is never exp(-inf - (-inf)) = NaN: a row of all -inf
//    ends with d = 0 and lse = -inf. A row containing +inf ends with m = +inf and d = NaN; callers patch that
//    single case (`online_lse` returns +inf unless the row also holds a NaN, as torch.logsumexp does).
//
//  * two-pass (Dukhan & Ablavatski 2020): exp(x) = p * 2^n with n = rint(x log2 e), p = e^t, t = x - n ln2
//    (Cody-Waite split, |t| <= ln2/2). The accumulator (a, k) holds sum = a * 2^k; all rescales are exact
//    powers of two built from exponent bits, and no max pass is needed. The split is exact only while
//    |x| log2 e stays well inside float's integer range, so a row whose top exponent exceeds 2^22 in
//    magnitude (|max x| > ~2.9e6, or +inf) reports `needs_fallback` and is recomputed with the online rule.
//
// Both merges are associative and commutative: per lane, per warp, per block, per vocab chunk alike.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define FL_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define FL_UNROLL  // nvcc's host pass: cudafe++ rejects GCC's unroll pragma, gcc warns on nvcc's
#elif defined(__clang__)
#define FL_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define FL_UNROLL _Pragma("GCC unroll 16")
#else
#define FL_UNROLL
#endif

// CPU kernels are compiled once per instruction set (DEFAULT, AVX2) with ATen's CPU_CAPABILITY macro set; the
// inline namespace keeps each copy's symbols apart so the linker never swaps an AVX2 body into the DEFAULT path.
// The CUDA kernel files are compiled with FL_GPU_MATH (CMakeLists.txt), which swaps in the GPU's exponential and
// max (see exp_nonpos): their own namespace, so the CPU execution layer's copy -- host code too -- never meets the
// CPU kernels' copy at link time.
#if defined(FL_GPU_MATH)
#define FL_ISA_NAMESPACE gpu
#elif defined(CPU_CAPABILITY)
#define FL_ISA_NAMESPACE CPU_CAPABILITY
#else
#define FL_ISA_NAMESPACE generic
#endif

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {

// Cody-Waite split of ln 2 (XNNPACK's constants): n * kLn2Hi is exact for |n| < 2^16, and the
// fma-based split keeps t accurate well beyond that, up to |n| ~ 2^22.
constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62E400p-1f;
constexpr float kLn2Lo = 0x1.7F7D1Cp-20f;
constexpr float kLn2 = 0x1.62E430p-1f;
constexpr double kLn2HiD = 0x1.62e42fefa3800p-1;
constexpr double kLn2LoD = 0x1.ef35793c76730p-45;
// Minimax polynomial for e^t on [-ln2/2, ln2/2] (degree 5, max relative error ~1.2e-7).
constexpr float kExpC1 = 0x1.FFFFF6p-1f;
constexpr float kExpC2 = 0x1.FFFDC6p-2f;
constexpr float kExpC3 = 0x1.555A80p-3f;
constexpr float kExpC4 = 0x1.573A1Ap-5f;
constexpr float kExpC5 = 0x1.0F9F9Cp-7f;
// Exponents below this contribute nothing relative to the leading term (2^-126 is the smallest normal float).
constexpr float kMinExponent = -126.0f;
// 1.5 * 2^23 + 127: for |y| < 2^22, v = y + kMagic rounds y to the nearest integer n (ties to even) and leaves
// n + 127 in v's low mantissa bits, so v - kMagic is rint(y) and shl23(v) is the float 2^n, for n in [-126, 127].
constexpr float kMagic = 0x1.8000FEp23f;
// Above this |top exponent| the two-pass split loses exactness; see the file comment.
constexpr float kTwoPassMaxExponent = 4194304.0f;  // 2^22

// Policy: the arithmetic the generic code needs beyond + - *. Contract for max(a, b): NaN when b is NaN (x86's maxps
// semantics; when only a is NaN either answer is fine). The formulas always pass the new value second, and carry a
// NaN through sums that are only ever multiplied, so NaN inputs reach every result.
template <class V>
struct Ops;

template <>
struct Ops<float> {
  using Mask = bool;
  static FL_HD float splat(float c) { return c; }
  static FL_HD float fma(float a, float b, float c) { return fmaf(a, b, c); }
  static FL_HD float rint(float x) { return rintf(x); }
  // max that keeps NaN: a NaN operand makes the result NaN (torch semantics for reductions). On sm_80+ one
  // instruction (FMNMX.NAN) instead of a compare, a NaN test and a select.
  static FL_HD float max(float a, float b) {
#if defined(FL_GPU_MATH) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a > b || a != a) ? a : b;
#endif
  }
  static FL_HD float log(float x) { return logf(x); }
  static FL_HD float exact_exp(float x) { return expf(x); }
  static FL_HD float tanh(float x) { return tanhf(x); }
  static FL_HD bool lt(float a, float b) { return a < b; }
  static FL_HD bool eq(float a, float b) { return a == b; }
  static FL_HD float select(bool m, float a, float b) { return m ? a : b; }
  // Reinterpret x's bits as an integer, shift them left by 23 (into the exponent field), reinterpret back.
  // Applied to v = kMagic + n (n a small integer), this yields 2^n: see pow2_or_zero.
  static FL_HD float shl23(float v) {
#ifdef __CUDA_ARCH__
    return __int_as_float(static_cast<int>(static_cast<unsigned>(__float_as_int(v)) << 23));
#else
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(v));
    bits <<= 23;
    float r;
    std::memcpy(&r, &bits, sizeof(r));
    return r;
#endif
  }
};

template <>
struct Ops<double> {
  using Mask = bool;
  static FL_HD double splat(double c) { return c; }
  static FL_HD double fma(double a, double b, double c) { return ::fma(a, b, c); }
  static FL_HD double rint(double x) { return ::rint(x); }
  static FL_HD double max(double a, double b) { return (a > b || a != a) ? a : b; }
  static FL_HD double log(double x) { return ::log(x); }
  static FL_HD double exact_exp(double x) { return ::exp(x); }
  static FL_HD double tanh(double x) { return ::tanh(x); }
  static FL_HD bool lt(double a, double b) { return a < b; }
  static FL_HD bool eq(double a, double b) { return a == b; }
  static FL_HD double select(bool m, double a, double b) { return m ? a : b; }
};

template <class T>
struct Limits {
  static constexpr T lowest = -FLT_MAX;
  static constexpr T inf = INFINITY;
};
template <>
struct Limits<double> {
  static constexpr double lowest = -DBL_MAX;
  static constexpr double inf = INFINITY;
};

// ---------------------------------------------------------------- exp building blocks

#if defined(FL_GPU_MATH)
// 2^y from the GPU's special-function unit: ex2.approx.ftz.f32, one MUFU.EX2 instead of the 12-instruction
// polynomial below, which made a bf16 row instruction-bound (~22 SASS instructions per element). Its error: CUDA's
// programming guide bounds __expf(x) -- this instruction applied to x log2 e -- by 2 + floor(|1.173 x|) ulp, i.e.
// 2 ulp from the instruction and the rest from rounding x log2 e. The callers pass y = (x - m) log2 e with x - m
// exact near the row's max, so an element's relative error is about (2 + 1.2 |x - m|) 2^-24, and the sum of
// exp(x - m) over a row within (2 + 1.2 E_p|x - m|) 2^-24 of exact: 1.5e-6 relative where softmax's mean distance
// from the max is as large as 20, under the tests' float32 bound (relative-error norm 2e-6 against float64,
// tests/conftest.py). .ftz: results below 2^-126 are 0, as the polynomial path's. Off the GPU (the CPU execution
// layer, nvcc's host pass) the same function is exp2f with that flush, so the emulated kernels run this formula,
// not the GPU's rounding of it.
FL_HD float ex2_ftz(float y) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#else
  const float r = std::exp2(y);
  return r < FLT_MIN ? 0.0f : r;  // NaN compares false and passes through
#endif
}
#endif

// e^t for |t| <= ln2/2 (float: polynomial; double: libm, since the polynomial is float-accurate only).
template <class V>
FL_HD V exp_reduced(V t) {
  using O = Ops<V>;
  V p = O::fma(O::splat(kExpC5), t, O::splat(kExpC4));
  p = O::fma(p, t, O::splat(kExpC3));
  p = O::fma(p, t, O::splat(kExpC2));
  p = O::fma(p, t, O::splat(kExpC1));
  return O::fma(p, t, O::splat(1.0f));
}
template <>
FL_HD double exp_reduced<double>(double t) { return ::exp(t); }
#if defined(FL_GPU_MATH)
template <>
FL_HD float exp_reduced<float>(float t) { return ex2_ftz(t * kLog2e); }  // |t| <= ln2/2: no flush, no overflow
#endif

// 2^k for an integer-valued k <= 0, exactly 0 below 2^-126 (and for k = -inf or -FLT_MAX). NaN k gives some
// finite value: callers multiply it into a NaN anyway.
template <class V>
FL_HD V pow2_or_zero(V k) {
  using O = Ops<V>;
  return O::select(O::lt(k, O::splat(kMinExponent)), O::splat(0.0f), O::shl23(k + O::splat(kMagic)));
}
template <>
FL_HD double pow2_or_zero<double>(double k) { return k < -1022.0 ? 0.0 : ::ldexp(1.0, static_cast<int>(k)); }

// p * 2^k, exactly 0 below 2^-126 -- selected, not multiplied, so that a garbage p (an element far below the row's
// max whose split was inexact) is dropped rather than turned into NaN. Accumulators instead use
// a * pow2_or_zero(k), so a NaN already in the sum survives every rescale.
template <class V>
FL_HD V scale_pow2(V p, V k) {
  using O = Ops<V>;
  return O::select(O::lt(k, O::splat(kMinExponent)), O::splat(0.0f), p * O::shl23(k + O::splat(kMagic)));
}
template <>
FL_HD double scale_pow2<double>(double p, double k) { return k < -1022.0 ? 0.0 : ::ldexp(p, static_cast<int>(k)); }

// Split x into e^x = p * 2^n, n integer-valued, p = e^t. x = -inf gives (0, -FLT_MAX): the only way to reach the
// accumulator's initial exponent. Finite x below -FLT_MAX/2 in log2 units gets n = -FLT_MAX/2; beyond |n| = 2^22
// the split is inexact and exp_needs_fallback sends the row to the online rule (a NaN x leaves p = NaN).
template <class V>
struct Split {
  V p;
  V n;
};
template <class V>
FL_HD Split<V> split_exp(V x) {
  using O = Ops<V>;
  V n = O::fma(x, O::splat(kLog2e), O::splat(kMagic)) - O::splat(kMagic);
  n = O::max(O::splat(-0.5f * FLT_MAX), n);  // NaN n must survive: maxps returns its second operand on NaN
  V t = O::fma(n, O::splat(-kLn2Hi), x);
  t = O::fma(n, O::splat(-kLn2Lo), t);
  auto neg_inf = O::eq(x, O::splat(-Limits<float>::inf));
  return {O::select(neg_inf, O::splat(0.0f), exp_reduced(t)), O::select(neg_inf, O::splat(-FLT_MAX), n)};
}
template <>
FL_HD Split<double> split_exp<double>(double x) {
  if (x == -INFINITY) return {0.0, -DBL_MAX};
  double n = ::rint(x * 1.4426950408889634);
  n = n < -0.5 * DBL_MAX ? -0.5 * DBL_MAX : (n > 0.5 * DBL_MAX ? 0.5 * DBL_MAX : n);
  double t = ::fma(n, -kLn2HiD, x);  // fdlibm's Cody-Waite split of ln2 for double
  return {::exp(::fma(n, -kLn2LoD, t)), n};
}

// e^x for x <= 0 (or -inf, or NaN): every exp of the online algorithm, after subtracting the running max.
// 12 flops on a SIMD lane: magic-number rounding, Cody-Waite, degree-5 polynomial, exponent-bit scaling.
template <class V>
FL_HD V exp_nonpos(V x) {
  using O = Ops<V>;
  V v = O::fma(x, O::splat(kLog2e), O::splat(kMagic));
  V n = v - O::splat(kMagic);
  V t = O::fma(n, O::splat(-kLn2Hi), x);
  t = O::fma(n, O::splat(-kLn2Lo), t);
  return O::select(O::lt(n, O::splat(kMinExponent)), O::splat(0.0f), exp_reduced(t) * O::shl23(v));
}
template <>
FL_HD double exp_nonpos<double>(double x) { return ::exp(x); }
#if defined(FL_GPU_MATH)
// x = -inf gives 0, NaN stays NaN, x < -87.3 flushes to 0 (the polynomial path's cut-off is the same 2^-126).
template <>
FL_HD float exp_nonpos<float>(float x) { return ex2_ftz(x * kLog2e); }
#endif

// ---------------------------------------------------------------- online normaliser (m, d)

template <class V>
struct OnlineState {
  V m;  // running max, starts at -FLT_MAX (never -inf, see file comment)
  V d;  // sum of exp(x_i - m)
};

template <class T, class V = T>
FL_HD OnlineState<V> online_init() {
  return {Ops<V>::splat(Limits<T>::lowest), Ops<V>::splat(T(0))};
}

// Fold one element.
template <class V>
FL_HD OnlineState<V> online_update(OnlineState<V> s, V x) {
  using O = Ops<V>;
  V m = O::max(s.m, x);
  return {m, O::fma(s.d, exp_nonpos(s.m - m), exp_nonpos(x - m))};
}

// Fold a block of N values at once: the block's max first, then a single rescale of d for the whole block
// (1 + 1/N exponentials per element instead of 2).
template <class V, int N>
FL_HD OnlineState<V> online_update_block(OnlineState<V> s, const V (&x)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, x[i]);
  V sum = exp_nonpos(x[0] - m);
FL_UNROLL
  for (int i = 1; i < N; ++i) sum = sum + exp_nonpos(x[i] - m);
  return {m, O::fma(s.d, exp_nonpos(s.m - m), sum)};
}

// Merge two partial states (associative, commutative).
template <class V>
FL_HD OnlineState<V> online_merge(OnlineState<V> a, OnlineState<V> b) {
  using O = Ops<V>;
  V m = O::max(a.m, b.m);
  return {m, a.d * exp_nonpos(a.m - m) + b.d * exp_nonpos(b.m - m)};
}

// Final log-sum-exp of a scalar state. `m == +inf`: d is NaN by construction (inf - inf); torch.logsumexp gives
// +inf there unless the row has a NaN, which only the caller can tell (it rescans the row in that rare case).
template <class T>
FL_HD T online_lse(OnlineState<T> s) {
  return s.m + Ops<T>::log(s.d);
}

// ---------------------------------------------------------------- online normaliser with squares (m, d, d2)

// d2 = sum exp(2 (x - m)) beside d = sum exp(x - m), from the same exponentials (squentropy's sum of p^2 is
// d2 / d^2): one more multiply-add per element, no second exponential. The rescale of d2 is r^2.
template <class V>
struct OnlineSqState {
  V m;
  V d;
  V d2;
};

template <class T, class V = T>
FL_HD OnlineSqState<V> online_sq_init() {
  return {Ops<V>::splat(Limits<T>::lowest), Ops<V>::splat(T(0)), Ops<V>::splat(T(0))};
}

template <class V>
FL_HD OnlineSqState<V> online_sq_update(OnlineSqState<V> s, V x) {
  using O = Ops<V>;
  const V m = O::max(s.m, x);
  const V r = exp_nonpos(s.m - m), e = exp_nonpos(x - m);
  return {m, O::fma(s.d, r, e), O::fma(s.d2, r * r, e * e)};
}

template <class V, int N>
FL_HD OnlineSqState<V> online_sq_update_block(OnlineSqState<V> s, const V (&x)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, x[i]);
  V e = exp_nonpos(x[0] - m);
  V sum = e, sum2 = e * e;
FL_UNROLL
  for (int i = 1; i < N; ++i) {
    e = exp_nonpos(x[i] - m);
    sum = sum + e;
    sum2 = O::fma(e, e, sum2);
  }
  const V r = exp_nonpos(s.m - m);
  return {m, O::fma(s.d, r, sum), O::fma(s.d2, r * r, sum2)};
}

template <class V>
FL_HD OnlineSqState<V> online_sq_merge(OnlineSqState<V> a, OnlineSqState<V> b) {
  using O = Ops<V>;
  const V m = O::max(a.m, b.m);
  const V ra = exp_nonpos(a.m - m), rb = exp_nonpos(b.m - m);
  return {m, a.d * ra + b.d * rb, a.d2 * (ra * ra) + b.d2 * (rb * rb)};
}

// ---------------------------------------------------------------- two-pass (mantissa, exponent)

template <class V>
struct ExpState {
  V a;  // mantissa sum
  V k;  // common exponent: the row's partial sum is a * 2^k
};

template <class T, class V = T>
FL_HD ExpState<V> exp_init() {
  return {Ops<V>::splat(T(0)), Ops<V>::splat(Limits<T>::lowest)};
}

// Fold one element, already split.
template <class V>
FL_HD ExpState<V> exp_update(ExpState<V> s, Split<V> e) {
  using O = Ops<V>;
  V k = O::max(s.k, e.n);
  return {s.a * pow2_or_zero(s.k - k) + scale_pow2(e.p, e.n - k), k};
}

// Fold a block of N values: split each, then one common exponent for the block (exact power-of-two rescales).
template <class V, int N>
FL_HD ExpState<V> exp_update_block(ExpState<V> s, const V (&x)[N]) {
  using O = Ops<V>;
  Split<V> e[N];
  V k = s.k;
FL_UNROLL
  for (int i = 0; i < N; ++i) {
    e[i] = split_exp(x[i]);
    k = O::max(k, e[i].n);
  }
  V a = s.a * pow2_or_zero(s.k - k);
FL_UNROLL
  for (int i = 0; i < N; ++i) a = a + scale_pow2(e[i].p, e[i].n - k);
  return {a, k};
}

template <class V>
FL_HD ExpState<V> exp_merge(ExpState<V> a, ExpState<V> b) {
  using O = Ops<V>;
  V k = O::max(a.k, b.k);
  return {a.a * pow2_or_zero(a.k - k) + b.a * pow2_or_zero(b.k - k), k};
}

// True when the split could not be exact for this row: its top exponent is huge, +-inf-clamped or NaN. The
// caller then recomputes the row with the online rule. k == lowest means every element was -inf (lse = -inf).
template <class T>
FL_HD bool exp_needs_fallback(ExpState<T> s) {
  return s.k != Limits<T>::lowest && !(s.k <= T(kTwoPassMaxExponent) && s.k >= -T(kTwoPassMaxExponent));
}
template <>
FL_HD bool exp_needs_fallback<double>(ExpState<double> s) {
  // double's split stays exact while n = rint(x log2 e) is an exact integer with room to spare.
  return s.k != -DBL_MAX && !(s.k <= 0x1p50 && s.k >= -0x1p50);
}

// The same normaliser as an online pair: m = k ln2 rounded to T, and the rounding error folded into d, so the
// second pass (softmax_at / log_softmax_at) and the final lse are shared by both algorithms.
template <class T>
FL_HD OnlineState<T> exp_to_online(ExpState<T> s) {
  T m = s.k * T(kLn2);
  T r = Ops<T>::fma(s.k, T(kLn2Hi), -m);
  r = Ops<T>::fma(s.k, T(kLn2Lo), r);  // k ln2 - m, |r| < 0.05 for every k that reaches here
  return {m, s.a * Ops<T>::exact_exp(r)};
}
template <>
FL_HD OnlineState<double> exp_to_online<double>(ExpState<double> s) {
  double m = s.k * 0.6931471805599453;
  double r = ::fma(s.k, kLn2LoD, ::fma(s.k, kLn2HiD, -m));
  return {m, s.a * ::exp(r)};
}

// ---------------------------------------------------------------- second pass, from a finished (m, d)
//
// exp(x - m) / d rather than exp(x - lse): when |m| >> log d (logits near 1e30) the lse absorbs log d and
// exp(x - lse) would give 1 for every tied maximum. The special rows come out as torch's: all -inf gives
// 0/0 = NaN; a +inf gives d = NaN and so an all-NaN row.

template <class V>
FL_HD V softmax_at(V x, V m, V inv_d) {
  return exp_nonpos(x - m) * inv_d;
}

template <class V>
FL_HD V log_softmax_at(V x, V m, V log_d) {
  return (x - m) - log_d;
}

// A saved float64 lse split for per-element use in the value type T: m = lse rounded to T, log_scale = m - lse
// (exact in double, small), so p = e^(x - m) * scale and log p = (x - m) + log_scale. Then x - m is exact for
// logits near the max (Sterbenz) and p keeps full precision even when |lse| ~ 1e4 and one float ulp of lse is
// 1e-3: exp(x - float(lse)) would carry that error into every gradient entry. An lse of +-inf or NaN gives
// scale 1, log_scale 0 (every p follows x - m).
template <class T>
struct LseParts {
  T m;
  T scale;
  T log_scale;
};

template <class T>
FL_HD LseParts<T> lse_parts(double lse) {
  const T m = static_cast<T>(lse);
  if (!(lse - lse == 0.0)) return {m, T(1), T(0)};  // not finite
  const double ls = static_cast<double>(m) - lse;
  return {m, static_cast<T>(::exp(ls)), static_cast<T>(ls)};
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss
