// The B3D search distributions, element by element (shared by CPU and CUDA).
//
// For trigger t and perturbation j:
//   mask sample   m_j[e] ~ Bernoulli(g(theta_m[e]))   e over [Cm, H, W]
//   noise sample  eps_j[e] ~ N(0, 1)                  e over [C, H, W]
// The same (t, j) gives the same m_j and eps_j in "separate" and "joint" modes;
// the modes only differ in which rows of the query batch use them:
//   separate (S = 2k): row j < k     -> (m_j,        g(theta_p))
//                      row k + j     -> (g(theta_m), g(theta_p + sigma eps_j))
//   joint    (S = k):  row j         -> (m_j,        g(theta_p + sigma eps_j))
#pragma once

#include "macros.h"
#include "math.h"
#include "philox.h"

namespace trigscan {

// Four mask decisions of block `block` (elements 4*block .. 4*block+3); `prob`
// holds g(theta_m) for those elements (entries past the end are ignored).
TS_HD void nes_mask4(const NesShape& sh, int64_t t, int64_t j, int64_t block,
                     const float prob[4], float m[4]) {
  const U32x4 w = draw_block(sh.seed, sh.offset, static_cast<uint32_t>(t),
                             static_cast<uint32_t>(j), kDomainMask,
                             static_cast<uint32_t>(block));
  for (int i = 0; i < 4; ++i) m[i] = bernoulli(w.v[i], prob[i]);
}

// Four standard normals eps_j of block `block`.
TS_HD void nes_noise4(const NesShape& sh, int64_t t, int64_t j, int64_t block,
                      float eps[4]) {
  const U32x4 w = draw_block(sh.seed, sh.offset, static_cast<uint32_t>(t),
                             static_cast<uint32_t>(j), kDomainPattern,
                             static_cast<uint32_t>(block));
  normal4(w, eps);
}

// Which sample a query row uses, and whether its mask / pattern are sampled.
struct NesRow {
  int64_t j;            // perturbation index
  bool sampled_mask;    // m_j, else g(theta_m)
  bool sampled_pattern; // g(theta_p + sigma eps_j), else g(theta_p)
};

TS_HD NesRow nes_row(const NesShape& sh, int64_t row) {
  if (sh.joint) return NesRow{row, true, true};
  if (row < sh.k) return NesRow{row, true, false};
  return NesRow{row - sh.k, false, true};
}

// Column of `losses` [T, S] that holds F for the mask / pattern estimate of sample j.
TS_HD int64_t nes_mask_column(const NesShape& sh, int64_t j) { return j; }
TS_HD int64_t nes_pattern_column(const NesShape& sh, int64_t j) {
  return sh.joint ? j : sh.k + j;
}

// Mean of F over the k columns starting at `first` (the optional baseline),
// summed in a fixed order so every device gets the same value.
template <typename T>
TS_HD float nes_loss_mean(const T* losses_row, int64_t first, int64_t k) {
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) sum += static_cast<float>(losses_row[first + j]);
  return sum / static_cast<float>(k);
}

}  // namespace trigscan
