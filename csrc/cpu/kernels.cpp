// CPU kernels: thin at::parallel_for loops around the element math in
// csrc/common. Work is split so that no two threads write the same output
// element, and every reduction runs in a fixed order (results do not depend on
// the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/math.h"
#include "../common/nes.h"
#include "../ops_impl.h"

namespace trigscan {
namespace {

// Grain sizes: enough elements per task to amortise scheduling.
constexpr int64_t kGrainElements = 32768;
constexpr int64_t kChunk = 64;  // spatial chunk of the backward reductions

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// Index of the mask element covering channel c (mask broadcast when Cm == 1).
inline int64_t mask_channel(const StampShape& s, int64_t c) { return s.Cm == 1 ? 0 : c; }

struct NoGuard {
  explicit NoGuard(const at::Tensor&) {}
};

struct CpuBackend {
  using Guard = NoGuard;

  template <typename T>
  static void stamp_forward(const T* x, const T* mask, const T* pattern, T* out, StampShape s) {
    // One row = one (t, n, c) plane of HW pixels.
    at::parallel_for(0, s.T * s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % s.C, n = (row / s.C) % s.N, t = row / (s.C * s.N);
        const T* xr = x + (n * s.C + c) * s.HW;
        const T* mr = mask + (t * s.Cm + mask_channel(s, c)) * s.HW;
        const T* pr = pattern + (t * s.C + c) * s.HW;
        T* o = out + row * s.HW;
        for (int64_t i = 0; i < s.HW; ++i) o[i] = stamp_value(xr[i], mr[i], pr[i]);
      }
    });
  }

  // One pass over grad [T,N,C,HW]: each task owns a spatial chunk and reduces
  // over n (for mask and pattern) and over t (for x) inside it.
  template <typename T>
  static void stamp_backward(const T* grad, const T* x, const T* mask, const T* pattern,
                             T* grad_x, T* grad_mask, T* grad_pattern, StampShape s) {
    const int64_t chunks = (s.HW + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      T acc_m[kChunk], acc_p[kChunk];
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t lo = chunk * kChunk, len = std::min(kChunk, s.HW - lo);
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < s.C; ++c)
            std::fill_n(grad_x + (n * s.C + c) * s.HW + lo, len, T(0));
        for (int64_t t = 0; t < s.T; ++t) {
          for (int64_t c = 0; c < s.C; ++c) {
            const bool first_of_mask = s.Cm != 1 || c == 0;
            if (first_of_mask) std::fill_n(acc_m, len, T(0));
            std::fill_n(acc_p, len, T(0));
            const T* mr = mask + (t * s.Cm + mask_channel(s, c)) * s.HW + lo;
            const T* pr = pattern + (t * s.C + c) * s.HW + lo;
            for (int64_t n = 0; n < s.N; ++n) {
              const T* gr = grad + ((t * s.N + n) * s.C + c) * s.HW + lo;
              const T* xr = x + (n * s.C + c) * s.HW + lo;
              T* gxr = grad_x + (n * s.C + c) * s.HW + lo;
              for (int64_t i = 0; i < len; ++i) {
                acc_m[i] += gr[i] * (pr[i] - xr[i]);
                acc_p[i] += gr[i] * mr[i];
                gxr[i] += gr[i] * (T(1) - mr[i]);
              }
            }
            std::copy_n(acc_p, len, grad_pattern + (t * s.C + c) * s.HW + lo);
            const bool last_of_mask = s.Cm != 1 || c == s.C - 1;
            if (last_of_mask)
              std::copy_n(acc_m, len, grad_mask + (t * s.Cm + mask_channel(s, c)) * s.HW + lo);
          }
        }
      }
    });
  }

  // Each task owns whole (t, row) query images: it draws that row's mask and
  // pattern once into a scratch of O(C*H*W) and stamps all N images with them.
  static void nes_sample_stamp(const float* x, const float* theta_m, const float* theta_p,
                               float* out, NesShape sh) {
    const StampShape& s = sh.s;
    const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW, rows = sh.rows();
    at::parallel_for(0, s.T * rows, grain_for(s.N * dp), [&](int64_t begin, int64_t end) {
      std::vector<float> m(dm), p(dp), prob(dm + 3, 0.0f), eps(4);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / rows, row = item % rows;
        const NesRow r = nes_row(sh, row);
        const float* tm = theta_m + t * dm;
        const float* tp = theta_p + t * dp;
        for (int64_t e = 0; e < dm; ++e) prob[e] = squash(tm[e]);
        if (r.sampled_mask) {
          for (int64_t b = 0; b * 4 < dm; ++b) {
            float m4[4];
            nes_mask4(sh, t, r.j, b, &prob[b * 4], m4);
            for (int64_t i = 0; i < 4 && b * 4 + i < dm; ++i) m[b * 4 + i] = m4[i];
          }
        } else {
          std::copy_n(prob.begin(), dm, m.begin());
        }
        if (r.sampled_pattern) {
          for (int64_t b = 0; b * 4 < dp; ++b) {
            float z[4];
            nes_noise4(sh, t, r.j, b, z);
            for (int64_t i = 0; i < 4 && b * 4 + i < dp; ++i)
              p[b * 4 + i] = squash(tp[b * 4 + i] + sh.sigma * z[i]);
          }
        } else {
          for (int64_t e = 0; e < dp; ++e) p[e] = squash(tp[e]);
        }
        float* o = out + item * s.N * dp;
        for (int64_t n = 0; n < s.N; ++n) {
          for (int64_t c = 0; c < s.C; ++c) {
            const float* xr = x + (n * s.C + c) * s.HW;
            const float* mr = m.data() + mask_channel(s, c) * s.HW;
            const float* pr = p.data() + c * s.HW;
            float* orow = o + (n * s.C + c) * s.HW;
            for (int64_t i = 0; i < s.HW; ++i) orow[i] = stamp_value(xr[i], mr[i], pr[i]);
          }
        }
      }
    });
  }

  // Each task owns blocks of 4 elements of one trigger and regenerates their
  // k samples; nothing of size k * d is ever stored.
  static void nes_grad(const float* losses, const float* theta_m, const float* theta_p,
                       float* grad_m, float* grad_p, NesShape sh, bool baseline) {
    const StampShape& s = sh.s;
    const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW, rows = sh.rows();
    const int64_t bm = (dm + 3) / 4, bp = (dp + 3) / 4;
    at::parallel_for(0, s.T * (bm + bp), grain_for(4 * sh.k), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / (bm + bp), b = item % (bm + bp);
        const float* F = losses + t * rows;
        if (b < bm) {
          const float mean = baseline ? nes_loss_mean(F, nes_mask_column(sh, 0), sh.k) : 0.0f;
          float prob[4] = {0, 0, 0, 0}, acc[4] = {0, 0, 0, 0};
          for (int i = 0; i < 4 && b * 4 + i < dm; ++i) prob[i] = squash(theta_m[t * dm + b * 4 + i]);
          for (int64_t j = 0; j < sh.k; ++j) {
            float m4[4];
            nes_mask4(sh, t, j, b, prob, m4);
            const float f = F[nes_mask_column(sh, j)] - mean;
            for (int i = 0; i < 4; ++i) acc[i] += f * (2.0f * (m4[i] - prob[i]));
          }
          for (int i = 0; i < 4 && b * 4 + i < dm; ++i)
            grad_m[t * dm + b * 4 + i] = acc[i] / static_cast<float>(sh.k);
        } else {
          const int64_t bb = b - bm;
          const float mean = baseline ? nes_loss_mean(F, nes_pattern_column(sh, 0), sh.k) : 0.0f;
          float acc[4] = {0, 0, 0, 0};
          for (int64_t j = 0; j < sh.k; ++j) {
            float z[4];
            nes_noise4(sh, t, j, bb, z);
            const float f = F[nes_pattern_column(sh, j)] - mean;
            for (int i = 0; i < 4; ++i) acc[i] += f * z[i];
          }
          const float scale = static_cast<float>(sh.k) * sh.sigma;
          for (int i = 0; i < 4 && bb * 4 + i < dp; ++i)
            grad_p[t * dp + bb * 4 + i] = acc[i] / scale;
        }
      }
    });
  }

  static void nes_samples(const float* theta_m, float* masks, float* noise, NesShape sh) {
    const StampShape& s = sh.s;
    const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW;
    at::parallel_for(0, s.T * sh.k, grain_for(dm + dp), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / sh.k, j = item % sh.k;
        for (int64_t b = 0; b * 4 < dm; ++b) {
          float prob[4] = {0, 0, 0, 0}, m4[4];
          for (int i = 0; i < 4 && b * 4 + i < dm; ++i) prob[i] = squash(theta_m[t * dm + b * 4 + i]);
          nes_mask4(sh, t, j, b, prob, m4);
          for (int i = 0; i < 4 && b * 4 + i < dm; ++i) masks[item * dm + b * 4 + i] = m4[i];
        }
        for (int64_t b = 0; b * 4 < dp; ++b) {
          float z[4];
          nes_noise4(sh, t, j, b, z);
          for (int i = 0; i < 4 && b * 4 + i < dp; ++i) noise[item * dp + b * 4 + i] = z[i];
        }
      }
    });
  }

  template <typename T>
  static void pixel_stamp_forward(const T* x, const T* b_p, const T* b_n, T* out, StampShape s,
                                  T maxp, bool use_tanh) {
    // One task per (t, c) plane: P(b_p), P(b_n) are computed once and applied to all N images.
    at::parallel_for(0, s.T * s.C, grain_for(s.N * s.HW), [&](int64_t begin, int64_t end) {
      std::vector<T> pp(s.HW), pn(s.HW);
      for (int64_t tc = begin; tc < end; ++tc) {
        const int64_t t = tc / s.C, c = tc % s.C;
        for (int64_t i = 0; i < s.HW; ++i) {
          pp[i] = pixel_perturbation(b_p[tc * s.HW + i], maxp, use_tanh);
          pn[i] = pixel_perturbation(b_n[tc * s.HW + i], maxp, use_tanh);
        }
        for (int64_t n = 0; n < s.N; ++n) {
          const T* xr = x + (n * s.C + c) * s.HW;
          T* o = out + ((t * s.N + n) * s.C + c) * s.HW;
          for (int64_t i = 0; i < s.HW; ++i)
            o[i] = clamp_value(pixel_unclipped(xr[i], pp[i], pn[i]), T(0), maxp);
        }
      }
    });
  }

  template <typename T>
  static void pixel_stamp_backward(const T* grad, const T* x, const T* b_p, const T* b_n,
                                   T* grad_x, T* grad_p, T* grad_n, StampShape s, T maxp,
                                   bool use_tanh) {
    const int64_t chunks = (s.HW + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      T pp[kChunk], pn[kChunk], acc[kChunk];
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t lo = chunk * kChunk, len = std::min(kChunk, s.HW - lo);
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < s.C; ++c)
            std::fill_n(grad_x + (n * s.C + c) * s.HW + lo, len, T(0));
        for (int64_t t = 0; t < s.T; ++t) {
          for (int64_t c = 0; c < s.C; ++c) {
            const int64_t base = (t * s.C + c) * s.HW + lo;
            for (int64_t i = 0; i < len; ++i) {
              pp[i] = pixel_perturbation(b_p[base + i], maxp, use_tanh);
              pn[i] = pixel_perturbation(b_n[base + i], maxp, use_tanh);
            }
            std::fill_n(acc, len, T(0));
            for (int64_t n = 0; n < s.N; ++n) {
              const T* gr = grad + ((t * s.N + n) * s.C + c) * s.HW + lo;
              const T* xr = x + (n * s.C + c) * s.HW + lo;
              T* gxr = grad_x + (n * s.C + c) * s.HW + lo;
              for (int64_t i = 0; i < len; ++i) {
                const T passed =
                    within(pixel_unclipped(xr[i], pp[i], pn[i]), T(0), maxp) ? gr[i] : T(0);
                acc[i] += passed;
                gxr[i] += passed;
              }
            }
            for (int64_t i = 0; i < len; ++i) {
              grad_p[base + i] = acc[i] * pixel_perturbation_grad(b_p[base + i], maxp, use_tanh);
              grad_n[base + i] = -acc[i] * pixel_perturbation_grad(b_n[base + i], maxp, use_tanh);
            }
          }
        }
      }
    });
  }

  // sum over pixels of max over channels of g(b / gamma), for b_p and b_n.
  template <typename T>
  static void pixel_size_loss_forward(const T* b_p, const T* b_n, T* out, StampShape s, T gamma) {
    at::parallel_for(0, s.T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        T total = 0;
        for (const T* b : {b_p, b_n}) {
          const T* bt = b + t * s.C * s.HW;
          for (int64_t i = 0; i < s.HW; ++i) {
            T best = bt[i];
            for (int64_t c = 1; c < s.C; ++c) best = std::max(best, bt[c * s.HW + i]);
            total += squash(best / gamma);
          }
        }
        out[t] = total;
      }
    });
  }

  // The gradient of a channel max goes to the first channel holding it.
  template <typename T>
  static void pixel_size_loss_backward(const T* grad, const T* b_p, const T* b_n, T* grad_p,
                                       T* grad_n, StampShape s, T gamma) {
    at::parallel_for(0, s.T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int side = 0; side < 2; ++side) {
          const T* bt = (side == 0 ? b_p : b_n) + t * s.C * s.HW;
          T* gt = (side == 0 ? grad_p : grad_n) + t * s.C * s.HW;
          std::fill_n(gt, s.C * s.HW, T(0));
          for (int64_t i = 0; i < s.HW; ++i) {
            int64_t arg = 0;
            for (int64_t c = 1; c < s.C; ++c)
              if (bt[c * s.HW + i] > bt[arg * s.HW + i]) arg = c;
            const T g = squash(bt[arg * s.HW + i] / gamma);
            gt[arg * s.HW + i] = grad[t] * squash_grad_from_value(g) / gamma;
          }
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(trigscan, CPU, m) { register_kernels<CpuBackend>(m); }

}  // namespace trigscan
