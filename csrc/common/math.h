// Per-element arithmetic shared by the CPU and CUDA kernels.
//
// The transcendental functions used on the float32 random path (exp, log,
// sin/cos) are written here with explicit fmaf instead of calling the
// platform's libm: glibc and CUDA's libdevice differ by an ulp or two, and we
// want the same samples and the same Bernoulli decisions on every device.
// Each is accurate to a few ulp over the range we use it on; the tests check
// them against float64 references. Builds use -ffp-contract=off (host) and
// --fmad=false (nvcc) so no compiler fuses the remaining a*b+c on one side only.
#pragma once

#include <math.h>
#include <string.h>

#include "macros.h"
#include "philox.h"

namespace trigscan {

// 32-bit word -> uniform float in (0, 1): an odd multiple of 2^-24, exact in
// float32, never 0 (so log is finite) and never 1.
TS_HD float uniform_open(uint32_t word) {
  return static_cast<float>((word >> 8) | 1u) * 5.9604644775390625e-08f;  // 2^-24
}

// Float <-> bits without a library call (vectorisable on the host).
TS_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}
TS_HD uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// The functions below are straight-line code (selects, no branches, no libm
// calls) so that the CPU loops vectorise them; each returns exactly what the
// textbook branchy form returns (ldexpf, frexpf, a quadrant switch).

// floorf(y) as an int, for |y| < 2^31 (not NaN): a truncating conversion and a
// select, which GCC vectorises (floorf itself it does not, under the default
// -ftrapping-math).
TS_HD int floor_to_int(float y) {
  const int t = static_cast<int>(y);
  return static_cast<float>(t) > y ? t - 1 : t;
}

// p * 2^n for n in [-252, 254], rounded once like ldexpf: two exact
// power-of-two factors, each a normal float; only the last product rounds.
TS_HD float scale_by_pow2(float p, int n) {
  const int n1 = n >> 1, n2 = n - n1;
  return p * float_from_bits(static_cast<uint32_t>(n1 + 127) << 23) *
         float_from_bits(static_cast<uint32_t>(n2 + 127) << 23);
}

// Float bits as an int32 that orders like the float (-0 just below +0, NaNs at
// the ends); the map is its own inverse. Clamping in this domain is an integer
// min/max, which compilers keep branch-free (a float clamp with constant arms
// gets jump-threaded by GCC, and the loop around it no longer vectorises).
TS_HD int32_t ordered_from_bits(int32_t b) { return b ^ ((b >> 31) & 0x7fffffff); }

// exp(x) for float: Cody-Waite reduction x = n ln2 + r, degree-7 Taylor on |r| <= ln2/2.
TS_HD float exp_f(float x) {
  constexpr float kHi = 88.72283f, kLo = -103.97208f;  // beyond: inf / 0
  constexpr int32_t kHiKey = 0x42b17217, kLoKey = -1120924085;  // their ordered keys
  int32_t key = ordered_from_bits(static_cast<int32_t>(bits_from_float(x)));
  key = key > kLoKey ? key : kLoKey;  // (a NaN is clamped too, and returned below)
  key = key < kHiKey ? key : kHiKey;
  const float xc = float_from_bits(static_cast<uint32_t>(ordered_from_bits(key)));
  const int ni = floor_to_int(fmaf(xc, 1.44269504f, 0.5f));
  const float n = static_cast<float>(ni);
  float r = fmaf(n, -0.693359375f, xc);  // ln2, high part (exact product)
  r = fmaf(n, 2.12194440e-4f, r);        // ln2, low part
  float p = 1.98412698e-4f;              // 1/7!
  p = fmaf(p, r, 1.38888889e-3f);        // 1/6!
  p = fmaf(p, r, 8.33333333e-3f);        // 1/5!
  p = fmaf(p, r, 4.16666667e-2f);        // 1/4!
  p = fmaf(p, r, 1.66666667e-1f);        // 1/3!
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  float result = scale_by_pow2(p, ni);
  result = x > kHi ? HUGE_VALF : result;
  result = x < kLo ? 0.0f : result;
  return x == x ? result : x;
}

// log(u) for normal positive floats: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = 2 atanh(s), s = (m-1)/(m+1), series to s^13 (|s| <= 0.1716).
TS_HD float log_f(float u) {
  const uint32_t bits = bits_from_float(u);
  // frexpf: m in [0.5, 1), u = m 2^e (u normal)
  float m = float_from_bits((bits & 0x007fffffu) | 0x3f000000u);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 126;
  const bool low = m < 0.70710678f;
  m = low ? 2.0f * m : m;
  e = low ? e - 1 : e;
  const float f = m - 1.0f;  // exact
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float p = 0.15384615f;        // 2/13
  p = fmaf(p, s2, 0.18181818f);  // 2/11
  p = fmaf(p, s2, 0.22222222f);  // 2/9
  p = fmaf(p, s2, 0.28571429f);  // 2/7
  p = fmaf(p, s2, 0.4f);         // 2/5
  p = fmaf(p, s2, 0.66666667f);  // 2/3
  const float log_m = fmaf(p * s2, s, 2.0f * s);
  const float ef = static_cast<float>(e);
  return fmaf(ef, 0.693359375f, fmaf(ef, -2.12194440e-4f, log_m));
}

// sin and cos of 2*pi*u. The reduction to a quarter turn is exact because u is
// a fraction of a turn: 4u = n + f with |f| <= 1/2, angle f*pi/2 in [-pi/4, pi/4].
TS_HD void sincos_2pi(float u, float& sin_out, float& cos_out) {
  const float q = 4.0f * u;
  int n = floor_to_int(q);
  float f = q - static_cast<float>(n);
  const bool up = f > 0.5f;
  f = up ? f - 1.0f : f;
  n = up ? n + 1 : n;
  const float a = f * 1.57079637f;
  const float a2 = a * a;
  float ps = 2.75573192e-6f;       // 1/9!
  ps = fmaf(ps, a2, -1.98412698e-4f);
  ps = fmaf(ps, a2, 8.33333333e-3f);
  ps = fmaf(ps, a2, -1.66666667e-1f);
  const float s = fmaf(a * a2, ps, a);
  float pc = -2.75573192e-7f;      // -1/10!
  pc = fmaf(pc, a2, 2.48015873e-5f);
  pc = fmaf(pc, a2, -1.38888889e-3f);
  pc = fmaf(pc, a2, 4.16666667e-2f);
  pc = fmaf(pc, a2, -0.5f);
  const float c = fmaf(a2, pc, 1.0f);
  // quadrant n mod 4: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s)
  const int quadrant = n & 3;
  const bool odd = (quadrant & 1) != 0;
  const float sin_abs = odd ? c : s, cos_abs = odd ? s : c;
  sin_out = (quadrant & 2) ? -sin_abs : sin_abs;
  cos_out = ((quadrant + 1) & 2) ? -cos_abs : cos_abs;
}

// Box-Muller on one pair of words: (u1, u2) -> (r cos 2pi u2, r sin 2pi u2).
TS_HD void box_muller(uint32_t w0, uint32_t w1, float& z0, float& z1) {
  const float r = sqrtf(-2.0f * log_f(uniform_open(w0)));
  float s, c;
  sincos_2pi(uniform_open(w1), s, c);
  z0 = r * c;
  z1 = r * s;
}

// Four standard normals from one Philox block: words (0,1) -> elements 0,1 of
// the block, words (2,3) -> elements 2,3.
TS_HD void normal4(const U32x4& w, float z[4]) {
  box_muller(w.v[0], w.v[1], z[0], z[1]);
  box_muller(w.v[2], w.v[3], z[2], z[3]);
}

// Bernoulli(p) from one word: 1 iff u < p (so p = 0 never fires, p = 1 always does).
TS_HD float bernoulli(uint32_t word, float p) {
  return uniform_open(word) < p ? 1.0f : 0.0f;
}

// g(z) = (tanh z + 1) / 2 = 1 / (1 + exp(-2z)), the box squashing of methods.md.
TS_HD float squash(float z) { return 1.0f / (1.0f + exp_f(-2.0f * z)); }
TS_HD double squash(double z) { return 1.0 / (1.0 + exp(-2.0 * z)); }

// dg/dz expressed through g itself.
template <typename T>
TS_HD T squash_grad_from_value(T g) {
  return T(2) * g * (T(1) - g);
}

template <typename T>
TS_HD T clamp_value(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Inclusive range test: the gradient convention of torch.clamp (a value equal to
// a bound still passes the gradient).
template <typename T>
TS_HD bool within(T v, T lo, T hi) {
  return v >= lo && v <= hi;
}

// ---- stamp ----
template <typename T>
TS_HD T stamp_value(T x, T m, T p) {
  return (T(1) - m) * x + m * p;
}

// ---- PixelBackdoor ----
// P(b): the pixel perturbation a variable b contributes, in [0, maxp].
template <typename T>
TS_HD T pixel_perturbation(T b, T maxp, bool use_tanh) {
  return use_tanh ? squash(b) * maxp : clamp_value(b * maxp, T(0), maxp);
}

template <typename T>
TS_HD T pixel_perturbation_grad(T b, T maxp, bool use_tanh) {
  if (use_tanh) return squash_grad_from_value(squash(b)) * maxp;
  return within(b * maxp, T(0), maxp) ? maxp : T(0);
}

// Unclipped stamped value y = x + P(b_p) - P(b_n); the output is clamp(y, 0, maxp).
template <typename T>
TS_HD T pixel_unclipped(T x, T pp, T pn) {
  return x + pp - pn;
}

}  // namespace trigscan
