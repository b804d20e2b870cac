// The CUDA kernels and their launchers, shared by two translation units:
//   * kernels.cu (nvcc): the real thing, compiled into trigscan._C;
//   * emulator/host_emulator.cc (g++, tests only): runs the same kernels and
//     launch configurations on the CPU, one std::thread per CUDA thread, so the
//     index arithmetic, chunking, grid-stride loops and barriers are tested on
//     machines without a GPU (tests/test_cuda.py).
// Include it exactly once, after defining in namespace trigscan::cuda
//   CudaStatus launch_kernel(const char* name, void (*kernel)(P...), unsigned grid,
//                            unsigned block, void* stream, A... args);
// and, for g++, the CUDA keywords (see the emulator).
//
// Every kernel is the CpuBackend loop of the same name (cpu/kernels.cpp) with
// the loop over output elements spread over threads:
//   * the per-element arithmetic is the same csrc/common function;
//   * every reduction is done by one thread, sequentially, in the order the
//     CPU loop accumulates it (no atomics, no tree reductions), so results are
//     deterministic and identical to the CPU's (nvcc builds with --fmad=false,
//     g++ with -ffp-contract=off, so neither side fuses a*b+c);
//   * random numbers come from Philox counters that depend only on
//     (seed, offset, trigger, sample, element), never on thread ids.
// The only float64 values that can differ from the CPU are those going through
// squash(double), which calls the platform's exp (glibc vs libdevice, <= 1 ulp).
#pragma once

#include "../common/macros.h"
#include "../common/math.h"
#include "../common/nes.h"
#include "../common/philox.h"
#include "launchers.h"

namespace trigscan {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Grids are capped and kernels grid-stride beyond that, so no size overflows
// gridDim; 2^20 blocks of 256 threads is far more than any GPU runs at once.
// (The host emulator lowers the cap to exercise the grid-stride loops.)
#ifndef TRIGSCAN_CUDA_MAX_BLOCKS
#define TRIGSCAN_CUDA_MAX_BLOCKS (int64_t(1) << 20)
#endif
constexpr int64_t kMaxBlocks = TRIGSCAN_CUDA_MAX_BLOCKS;

unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Index of the mask element covering channel c (mask broadcast when Cm == 1).
__device__ __forceinline__ int64_t mask_channel(const StampShape& s, int64_t c) {
  return s.Cm == 1 ? 0 : c;
}

// std::max as the CPU calls it: (a < b) ? b : a.
template <typename T>
__device__ __forceinline__ T max_like_std(T a, T b) {
  return (a < b) ? b : a;
}

// ---------------------------------------------------------------- stamp ----

// One thread per output element [T, N, C, HW].
template <typename T>
__global__ void stamp_forward_kernel(const T* __restrict__ x, const T* __restrict__ mask,
                                     const T* __restrict__ pattern, T* __restrict__ out,
                                     StampShape s) {
  const int64_t total = s.T * s.N * s.C * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, row = idx / s.HW;
    const int64_t c = row % s.C, n = (row / s.C) % s.N, t = row / (s.C * s.N);
    out[idx] = stamp_value(x[(n * s.C + c) * s.HW + i],
                           mask[(t * s.Cm + mask_channel(s, c)) * s.HW + i],
                           pattern[(t * s.C + c) * s.HW + i]);
  }
}

// grad_pattern (and grad_mask when Cm == C): one thread per (t, c, i), summing
// over n = 0..N-1 exactly as the CPU's acc_p / acc_m.
template <typename T>
__global__ void stamp_backward_trigger_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                              const T* __restrict__ mask,
                                              const T* __restrict__ pattern,
                                              T* __restrict__ grad_mask,
                                              T* __restrict__ grad_pattern, StampShape s) {
  const int64_t total = s.T * s.C * s.HW;
  const bool per_channel_mask = s.Cm != 1;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, tc = idx / s.HW;
    const int64_t c = tc % s.C, t = tc / s.C;
    const T m = mask[(t * s.Cm + mask_channel(s, c)) * s.HW + i];
    const T p = pattern[idx];
    T acc_m = T(0), acc_p = T(0);
    for (int64_t n = 0; n < s.N; ++n) {
      const T g = grad[((t * s.N + n) * s.C + c) * s.HW + i];
      const T xv = x[(n * s.C + c) * s.HW + i];
      acc_m += g * (p - xv);
      acc_p += g * m;
    }
    grad_pattern[idx] = acc_p;
    if (per_channel_mask) grad_mask[idx] = acc_m;
  }
}

// grad_mask for a broadcast mask (Cm == 1): one thread per (t, i) with one
// accumulator over c (outer) and n (inner), the CPU's order.
template <typename T>
__global__ void stamp_backward_bcast_mask_kernel(const T* __restrict__ grad,
                                                 const T* __restrict__ x,
                                                 const T* __restrict__ pattern,
                                                 T* __restrict__ grad_mask, StampShape s) {
  const int64_t total = s.T * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, t = idx / s.HW;
    T acc = T(0);
    for (int64_t c = 0; c < s.C; ++c) {
      const T p = pattern[(t * s.C + c) * s.HW + i];
      for (int64_t n = 0; n < s.N; ++n) {
        const T g = grad[((t * s.N + n) * s.C + c) * s.HW + i];
        acc += g * (p - x[(n * s.C + c) * s.HW + i]);
      }
    }
    grad_mask[idx] = acc;
  }
}

// grad_x: one thread per (n, c, i), summing over t = 0..T-1.
template <typename T>
__global__ void stamp_backward_x_kernel(const T* __restrict__ grad, const T* __restrict__ mask,
                                        T* __restrict__ grad_x, StampShape s) {
  const int64_t total = s.N * s.C * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, nc = idx / s.HW;
    const int64_t c = nc % s.C, n = nc / s.C;
    T acc = T(0);
    for (int64_t t = 0; t < s.T; ++t) {
      acc += grad[((t * s.N + n) * s.C + c) * s.HW + i] *
             (T(1) - mask[(t * s.Cm + mask_channel(s, c)) * s.HW + i]);
    }
    grad_x[idx] = acc;
  }
}

// ------------------------------------------------------------------ NES ----

// Upper bound of the pixel chunk one nes_sample_stamp block owns (= its threads).
constexpr int kSampleChunk = 256;

// dst[0..len) = the mask values of flat mask elements [lo, lo + len) of trigger
// t for query row r: Bernoulli samples m_j, or g(theta_m) for unsampled rows.
// Threads split the Philox blocks overlapping the range; a block straddling
// the range's edge is also drawn by the neighbouring chunk (same values).
__device__ void fill_mask_chunk(float* dst, const float* __restrict__ tm, int64_t lo, int64_t len,
                                const NesShape& sh, int64_t t, const NesRow& r) {
  if (!r.sampled_mask) {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) dst[i] = squash(tm[lo + i]);
    return;
  }
  const int64_t hi = lo + len;
  for (int64_t b = lo / 4 + threadIdx.x; b * 4 < hi; b += blockDim.x) {
    float prob[4], m4[4];
    for (int q = 0; q < 4; ++q) {
      const int64_t e = b * 4 + q;
      prob[q] = (e >= lo && e < hi) ? squash(tm[e]) : 0.0f;
    }
    nes_mask4(sh, t, r.j, b, prob, m4);
    for (int q = 0; q < 4; ++q) {
      const int64_t e = b * 4 + q;
      if (e >= lo && e < hi) dst[e - lo] = m4[q];
    }
  }
}

// dst[0..len) = the pattern values of flat pattern elements [lo, lo + len):
// g(theta_p + sigma eps_j) for sampled rows, g(theta_p) otherwise.
__device__ void fill_pattern_chunk(float* dst, const float* __restrict__ tp, int64_t lo,
                                   int64_t len, const NesShape& sh, int64_t t, const NesRow& r) {
  if (!r.sampled_pattern) {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) dst[i] = squash(tp[lo + i]);
    return;
  }
  const int64_t hi = lo + len;
  for (int64_t b = lo / 4 + threadIdx.x; b * 4 < hi; b += blockDim.x) {
    float z[4];
    nes_noise4(sh, t, r.j, b, z);
    for (int q = 0; q < 4; ++q) {
      const int64_t e = b * 4 + q;
      if (e >= lo && e < hi) dst[e - lo] = squash(tp[e] + sh.sigma * z[q]);
    }
  }
}

// One block per (t, row, chunk of blockDim.x pixels). For each channel the
// block draws that chunk's mask and pattern into shared memory (the mask once
// when it is broadcast), then stamps them onto all N images. Scratch is two
// chunks of shared memory; nothing of size k * d exists anywhere.
__global__ void nes_sample_stamp_kernel(const float* __restrict__ x,
                                        const float* __restrict__ theta_m,
                                        const float* __restrict__ theta_p,
                                        float* __restrict__ out, NesShape sh, int64_t rows,
                                        int64_t chunks) {
  __shared__ float sm_m[kSampleChunk];
  __shared__ float sm_p[kSampleChunk];
  const StampShape& s = sh.s;
  const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW, chunk_len = blockDim.x;
  const int64_t items = s.T * rows * chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t chunk = item % chunks, tr = item / chunks;
    const int64_t t = tr / rows, row = tr % rows;
    const NesRow r = nes_row(sh, row);
    const int64_t i0 = chunk * chunk_len;
    const int64_t len = s.HW - i0 < chunk_len ? s.HW - i0 : chunk_len;
    const float* tm = theta_m + t * dm;
    const float* tp = theta_p + t * dp;
    float* o = out + tr * s.N * dp;
    if (s.Cm == 1) fill_mask_chunk(sm_m, tm, i0, len, sh, t, r);
    for (int64_t c = 0; c < s.C; ++c) {
      if (s.Cm != 1) fill_mask_chunk(sm_m, tm, c * s.HW + i0, len, sh, t, r);
      fill_pattern_chunk(sm_p, tp, c * s.HW + i0, len, sh, t, r);
      __syncthreads();
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t base = (n * s.C + c) * s.HW + i0;
        for (int64_t i = threadIdx.x; i < len; i += blockDim.x)
          o[base + i] = stamp_value(x[base + i], sm_m[i], sm_p[i]);
      }
      __syncthreads();
    }
  }
}

// One thread per (t, block of 4 elements) of [theta_m | theta_p], looping
// j = 0..k-1 exactly like the CPU. (grad_p does not depend on theta_p.)
__global__ void nes_grad_kernel(const float* __restrict__ losses,
                                const float* __restrict__ theta_m,
                                const float* __restrict__ /*theta_p*/, float* __restrict__ grad_m,
                                float* __restrict__ grad_p, NesShape sh, bool baseline,
                                int64_t rows) {
  const StampShape& s = sh.s;
  const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW;
  const int64_t bm = (dm + 3) / 4, bp = (dp + 3) / 4;
  const int64_t total = s.T * (bm + bp);
  for (int64_t item = global_thread(); item < total; item += grid_threads()) {
    const int64_t t = item / (bm + bp), b = item % (bm + bp);
    const float* F = losses + t * rows;
    if (b < bm) {
      const float mean = baseline ? nes_loss_mean(F, nes_mask_column(sh, 0), sh.k) : 0.0f;
      float prob[4] = {0, 0, 0, 0}, acc[4] = {0, 0, 0, 0};
      for (int i = 0; i < 4 && b * 4 + i < dm; ++i)
        prob[i] = squash(theta_m[t * dm + b * 4 + i]);
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
      for (int i = 0; i < 4 && bb * 4 + i < dp; ++i) grad_p[t * dp + bb * 4 + i] = acc[i] / scale;
    }
  }
}

// One thread per (t, j, block of 4 elements) of [mask | noise].
__global__ void nes_samples_kernel(const float* __restrict__ theta_m, float* __restrict__ masks,
                                   float* __restrict__ noise, NesShape sh) {
  const StampShape& s = sh.s;
  const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW;
  const int64_t bm = (dm + 3) / 4, bp = (dp + 3) / 4;
  const int64_t total = s.T * sh.k * (bm + bp);
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t item = idx / (bm + bp), b = idx % (bm + bp);  // item = t * k + j
    const int64_t t = item / sh.k, j = item % sh.k;
    if (b < bm) {
      float prob[4] = {0, 0, 0, 0}, m4[4];
      for (int i = 0; i < 4 && b * 4 + i < dm; ++i)
        prob[i] = squash(theta_m[t * dm + b * 4 + i]);
      nes_mask4(sh, t, j, b, prob, m4);
      for (int i = 0; i < 4 && b * 4 + i < dm; ++i) masks[item * dm + b * 4 + i] = m4[i];
    } else {
      const int64_t bb = b - bm;
      float z[4];
      nes_noise4(sh, t, j, bb, z);
      for (int i = 0; i < 4 && bb * 4 + i < dp; ++i) noise[item * dp + bb * 4 + i] = z[i];
    }
  }
}

// -------------------------------------------------------- PixelBackdoor ----

// One thread per (t, c, i): P(b_p), P(b_n) once, then all N images.
template <typename T>
__global__ void pixel_stamp_forward_kernel(const T* __restrict__ x, const T* __restrict__ b_p,
                                           const T* __restrict__ b_n, T* __restrict__ out,
                                           StampShape s, T maxp, bool use_tanh) {
  const int64_t total = s.T * s.C * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, tc = idx / s.HW;
    const int64_t c = tc % s.C, t = tc / s.C;
    const T pp = pixel_perturbation(b_p[idx], maxp, use_tanh);
    const T pn = pixel_perturbation(b_n[idx], maxp, use_tanh);
    for (int64_t n = 0; n < s.N; ++n) {
      out[((t * s.N + n) * s.C + c) * s.HW + i] =
          clamp_value(pixel_unclipped(x[(n * s.C + c) * s.HW + i], pp, pn), T(0), maxp);
    }
  }
}

// grad_p / grad_n: one thread per (t, c, i), summing the passed gradient over n.
template <typename T>
__global__ void pixel_stamp_backward_trigger_kernel(const T* __restrict__ grad,
                                                    const T* __restrict__ x,
                                                    const T* __restrict__ b_p,
                                                    const T* __restrict__ b_n,
                                                    T* __restrict__ grad_p, T* __restrict__ grad_n,
                                                    StampShape s, T maxp, bool use_tanh) {
  const int64_t total = s.T * s.C * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, tc = idx / s.HW;
    const int64_t c = tc % s.C, t = tc / s.C;
    const T pp = pixel_perturbation(b_p[idx], maxp, use_tanh);
    const T pn = pixel_perturbation(b_n[idx], maxp, use_tanh);
    T acc = T(0);
    for (int64_t n = 0; n < s.N; ++n) {
      const T g = grad[((t * s.N + n) * s.C + c) * s.HW + i];
      const T passed =
          within(pixel_unclipped(x[(n * s.C + c) * s.HW + i], pp, pn), T(0), maxp) ? g : T(0);
      acc += passed;
    }
    grad_p[idx] = acc * pixel_perturbation_grad(b_p[idx], maxp, use_tanh);
    grad_n[idx] = -acc * pixel_perturbation_grad(b_n[idx], maxp, use_tanh);
  }
}

// grad_x: one thread per (n, c, i), summing the passed gradient over t.
template <typename T>
__global__ void pixel_stamp_backward_x_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                              const T* __restrict__ b_p,
                                              const T* __restrict__ b_n, T* __restrict__ grad_x,
                                              StampShape s, T maxp, bool use_tanh) {
  const int64_t total = s.N * s.C * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, nc = idx / s.HW;
    const int64_t c = nc % s.C, n = nc / s.C;
    const T xv = x[idx];
    T acc = T(0);
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t tidx = (t * s.C + c) * s.HW + i;
      const T pp = pixel_perturbation(b_p[tidx], maxp, use_tanh);
      const T pn = pixel_perturbation(b_n[tidx], maxp, use_tanh);
      const T g = grad[((t * s.N + n) * s.C + c) * s.HW + i];
      acc += within(pixel_unclipped(xv, pp, pn), T(0), maxp) ? g : T(0);
    }
    grad_x[idx] = acc;
  }
}

// One block per trigger: threads evaluate g(max_c b / gamma) for a chunk of
// pixels (b_p's, then b_n's) into shared memory, and thread 0 adds them in
// pixel order -- the CPU's single sequential sum.
template <typename T>
__global__ void pixel_size_loss_forward_kernel(const T* __restrict__ b_p,
                                               const T* __restrict__ b_n, T* __restrict__ out,
                                               StampShape s, T gamma) {
  __shared__ T values[kThreads];
  const int64_t terms = 2 * s.HW;
  for (int64_t t = blockIdx.x; t < s.T; t += gridDim.x) {
    T total = T(0);
    for (int64_t q0 = 0; q0 < terms; q0 += blockDim.x) {
      const int64_t q = q0 + threadIdx.x;
      if (q < terms) {
        const int64_t side = q / s.HW, i = q % s.HW;
        const T* bt = (side == 0 ? b_p : b_n) + t * s.C * s.HW;
        T best = bt[i];
        for (int64_t c = 1; c < s.C; ++c) best = max_like_std(best, bt[c * s.HW + i]);
        values[threadIdx.x] = squash(best / gamma);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        const int64_t count = terms - q0 < blockDim.x ? terms - q0 : blockDim.x;
        for (int64_t u = 0; u < count; ++u) total += values[u];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) out[t] = total;
  }
}

// One thread per (t, side, i): the whole channel column of that pixel, zero
// except at the first channel holding the max.
template <typename T>
__global__ void pixel_size_loss_backward_kernel(const T* __restrict__ grad,
                                                const T* __restrict__ b_p,
                                                const T* __restrict__ b_n, T* __restrict__ grad_p,
                                                T* __restrict__ grad_n, StampShape s, T gamma) {
  const int64_t total = s.T * 2 * s.HW;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t i = idx % s.HW, ts = idx / s.HW;
    const int64_t side = ts % 2, t = ts / 2;
    const T* bt = (side == 0 ? b_p : b_n) + t * s.C * s.HW;
    T* gt = (side == 0 ? grad_p : grad_n) + t * s.C * s.HW;
    int64_t arg = 0;
    for (int64_t c = 1; c < s.C; ++c)
      if (bt[c * s.HW + i] > bt[arg * s.HW + i]) arg = c;
    const T g = squash(bt[arg * s.HW + i] / gamma);
    const T value = grad[t] * squash_grad_from_value(g) / gamma;
    for (int64_t c = 0; c < s.C; ++c) gt[c * s.HW + i] = c == arg ? value : T(0);
  }
}

}  // namespace

// ------------------------------------------------------------ launchers ----
// A zero-sized launch is an error in CUDA, so every launcher returns early
// when it has nothing to compute.

template <typename T>
CudaStatus stamp_forward(const T* x, const T* mask, const T* pattern, T* out, StampShape s,
                         void* stream) {
  const int64_t total = s.T * s.N * s.C * s.HW;
  if (total <= 0) return {};
  return launch_kernel("stamp_forward", stamp_forward_kernel<T>, blocks_for(total, kThreads),
                       kThreads, stream, x, mask, pattern, out, s);
}

template <typename T>
CudaStatus stamp_backward(const T* grad, const T* x, const T* mask, const T* pattern, T* grad_x,
                          T* grad_mask, T* grad_pattern, StampShape s, void* stream) {
  const int64_t per_trigger = s.T * s.C * s.HW;
  if (per_trigger > 0) {
    const CudaStatus status = launch_kernel(
        "stamp_backward (grad_mask, grad_pattern)", stamp_backward_trigger_kernel<T>,
        blocks_for(per_trigger, kThreads), kThreads, stream, grad, x, mask, pattern, grad_mask,
        grad_pattern, s);
    if (!status.ok()) return status;
  }
  const int64_t bcast = s.T * s.HW;
  if (s.Cm == 1 && bcast > 0) {
    const CudaStatus status = launch_kernel(
        "stamp_backward (broadcast grad_mask)", stamp_backward_bcast_mask_kernel<T>,
        blocks_for(bcast, kThreads), kThreads, stream, grad, x, pattern, grad_mask, s);
    if (!status.ok()) return status;
  }
  const int64_t per_image = s.N * s.C * s.HW;
  if (per_image > 0 && grad_x != nullptr) {  // (nullptr: grad_x not requested)
    return launch_kernel("stamp_backward (grad_x)", stamp_backward_x_kernel<T>,
                         blocks_for(per_image, kThreads), kThreads, stream, grad, mask, grad_x,
                         s);
  }
  return {};
}

CudaStatus nes_sample_stamp(const float* x, const float* theta_m, const float* theta_p,
                            float* out, NesShape sh, void* stream) {
  const StampShape& s = sh.s;
  const int64_t rows = sh.joint ? sh.k : 2 * sh.k;
  if (s.T <= 0 || rows <= 0 || s.N <= 0 || s.C <= 0 || s.HW <= 0) return {};
  // Small images get a smaller block (a multiple of the warp size) so few
  // threads idle; a block's pixel chunk is as long as the block.
  int threads = kSampleChunk;
  if (s.HW < threads) threads = static_cast<int>((s.HW + 31) / 32 * 32);
  const int64_t chunks = (s.HW + threads - 1) / threads;
  return launch_kernel("nes_sample_stamp", nes_sample_stamp_kernel,
                       blocks_for(s.T * rows * chunks, 1), threads, stream, x, theta_m, theta_p,
                       out, sh, rows, chunks);
}

CudaStatus nes_grad(const float* losses, const float* theta_m, const float* theta_p,
                    float* grad_m, float* grad_p, NesShape sh, bool baseline, void* stream) {
  const StampShape& s = sh.s;
  const int64_t rows = sh.joint ? sh.k : 2 * sh.k;
  const int64_t total = s.T * ((s.Cm * s.HW + 3) / 4 + (s.C * s.HW + 3) / 4);
  if (total <= 0 || sh.k <= 0) return {};
  return launch_kernel("nes_grad", nes_grad_kernel, blocks_for(total, kThreads), kThreads,
                       stream, losses, theta_m, theta_p, grad_m, grad_p, sh, baseline, rows);
}

CudaStatus nes_samples(const float* theta_m, float* masks, float* noise, NesShape sh,
                       void* stream) {
  const StampShape& s = sh.s;
  const int64_t total = s.T * sh.k * ((s.Cm * s.HW + 3) / 4 + (s.C * s.HW + 3) / 4);
  if (total <= 0) return {};
  return launch_kernel("nes_samples", nes_samples_kernel, blocks_for(total, kThreads), kThreads,
                       stream, theta_m, masks, noise, sh);
}

template <typename T>
CudaStatus pixel_stamp_forward(const T* x, const T* b_p, const T* b_n, T* out, StampShape s,
                               T maxp, bool use_tanh, void* stream) {
  const int64_t total = s.T * s.C * s.HW;
  if (total <= 0 || s.N <= 0) return {};
  return launch_kernel("pixel_stamp_forward", pixel_stamp_forward_kernel<T>,
                       blocks_for(total, kThreads), kThreads, stream, x, b_p, b_n, out, s, maxp,
                       use_tanh);
}

template <typename T>
CudaStatus pixel_stamp_backward(const T* grad, const T* x, const T* b_p, const T* b_n, T* grad_x,
                                T* grad_p, T* grad_n, StampShape s, T maxp, bool use_tanh,
                                void* stream) {
  const int64_t per_trigger = s.T * s.C * s.HW;
  if (per_trigger > 0) {
    const CudaStatus status = launch_kernel(
        "pixel_stamp_backward (grad_p, grad_n)", pixel_stamp_backward_trigger_kernel<T>,
        blocks_for(per_trigger, kThreads), kThreads, stream, grad, x, b_p, b_n, grad_p, grad_n,
        s, maxp, use_tanh);
    if (!status.ok()) return status;
  }
  const int64_t per_image = s.N * s.C * s.HW;
  if (per_image > 0 && grad_x != nullptr) {  // (nullptr: grad_x not requested)
    return launch_kernel("pixel_stamp_backward (grad_x)", pixel_stamp_backward_x_kernel<T>,
                         blocks_for(per_image, kThreads), kThreads, stream, grad, x, b_p, b_n,
                         grad_x, s, maxp, use_tanh);
  }
  return {};
}

template <typename T>
CudaStatus pixel_size_loss_forward(const T* b_p, const T* b_n, T* out, StampShape s, T gamma,
                                   void* stream) {
  if (s.T <= 0) return {};
  // One block per trigger (grid-stride beyond the cap); HW == 0 gives out[t] = 0.
  return launch_kernel("pixel_size_loss_forward", pixel_size_loss_forward_kernel<T>,
                       blocks_for(s.T, 1), kThreads, stream, b_p, b_n, out, s, gamma);
}

template <typename T>
CudaStatus pixel_size_loss_backward(const T* grad, const T* b_p, const T* b_n, T* grad_p,
                                    T* grad_n, StampShape s, T gamma, void* stream) {
  const int64_t total = s.T * 2 * s.HW;
  if (total <= 0) return {};
  return launch_kernel("pixel_size_loss_backward", pixel_size_loss_backward_kernel<T>,
                       blocks_for(total, kThreads), kThreads, stream, grad, b_p, b_n, grad_p,
                       grad_n, s, gamma);
}

// ------------------------------------------------- explicit instantiations ----

#define TRIGSCAN_INSTANTIATE(T)                                                                   \
  template CudaStatus stamp_forward<T>(const T*, const T*, const T*, T*, StampShape, void*);      \
  template CudaStatus stamp_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*,       \
                                        StampShape, void*);                                       \
  template CudaStatus pixel_stamp_forward<T>(const T*, const T*, const T*, T*, StampShape, T,     \
                                             bool, void*);                                        \
  template CudaStatus pixel_stamp_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, \
                                              StampShape, T, bool, void*);                        \
  template CudaStatus pixel_size_loss_forward<T>(const T*, const T*, T*, StampShape, T, void*);   \
  template CudaStatus pixel_size_loss_backward<T>(const T*, const T*, const T*, T*, T*,           \
                                                  StampShape, T, void*);

TRIGSCAN_INSTANTIATE(float)
TRIGSCAN_INSTANTIATE(double)
#undef TRIGSCAN_INSTANTIATE

}  // namespace cuda
}  // namespace trigscan
