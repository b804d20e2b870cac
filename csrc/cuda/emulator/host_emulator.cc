// Host emulator of the CUDA kernels -- a test tool, not part of trigscan._C
// (setup.py only builds csrc/cuda/*.cu and csrc/cuda/*.cpp, not this folder).
//
// No machine of this project has a GPU, so the CUDA kernels can be compiled
// but never run. This file compiles the very same kernels_impl.cuh with g++
// and runs every launch on the CPU: each CUDA block in turn, each of its
// threads as a std::thread, __syncthreads as a std::barrier, __shared__ arrays
// as static locals (one block at a time, so they are per-block). The real
// launchers (grid sizes, chunking, early returns) run unchanged; only the
// <<<>>> launch is replaced. tests/test_cuda.py builds it with
//   g++ -std=c++20 -O2 -ffp-contract=off -shared -fPIC -pthread
//       -DTRIGSCAN_CUDA_MAX_BLOCKS=4 host_emulator.cc -o emulator.so
// (a tiny grid cap so the grid-stride loops really stride) and compares every
// op with the CPU kernels bit for bit through ctypes.
//
// What it proves: indexing, chunk/boundary handling, loop orders, barrier
// placement (a thread skipping or repeating a barrier is reported), that every
// output element is written, and that zero-sized launchers do not launch.
// What it cannot: device arithmetic (libdevice exp in squash(double)), memory
// model and coalescing, and hardware limits beyond the block-size check.
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

namespace {
struct EmuDim3 {
  unsigned x = 0, y = 1, z = 1;
};
}  // namespace

thread_local EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
thread_local std::barrier<>* emu_barrier = nullptr;
thread_local int64_t emu_barrier_calls = 0;
}  // namespace

inline void __syncthreads() {
  ++emu_barrier_calls;
  emu_barrier->arrive_and_wait();
}

#include "../launchers.h"

namespace trigscan {
namespace cuda {
namespace {

struct EmuStats {
  int64_t launches = 0;
  int64_t threads_run = 0;
};
EmuStats g_stats;
char g_message[256];

CudaStatus emu_error(int code, const char* what, const char* kernel) {
  CudaStatus status;
  status.code = code;
  status.what = what;
  status.kernel = kernel;
  return status;
}

template <typename... Params, typename... Args>
CudaStatus launch_kernel(const char* name, void (*kernel)(Params...), unsigned grid,
                         unsigned block, void* /*stream*/, Args... args) {
  // cudaErrorInvalidConfiguration = 9, as CUDA would report these.
  if (grid == 0 || block == 0 || block > 1024 || grid > 0x7FFFFFFFu)
    return emu_error(9, "invalid configuration argument (emulator)", name);
  ++g_stats.launches;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> barrier(static_cast<std::ptrdiff_t>(block));
    std::vector<int64_t> calls(block, 0);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = EmuDim3{t, 0, 0};
        blockIdx = EmuDim3{b, 0, 0};
        blockDim = EmuDim3{block, 1, 1};
        gridDim = EmuDim3{grid, 1, 1};
        emu_barrier = &barrier;
        emu_barrier_calls = 0;
        kernel(args...);
        calls[t] = emu_barrier_calls;
        // Leave the barrier so that a divergent thread cannot deadlock the
        // others; the mismatch is reported below.
        barrier.arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
    g_stats.threads_run += block;
    for (unsigned t = 1; t < block; ++t) {
      if (calls[t] != calls[0]) {
        std::snprintf(g_message, sizeof g_message,
                      "barrier divergence in block %u: thread 0 passed %lld barriers, thread %u "
                      "passed %lld (emulator)",
                      b, static_cast<long long>(calls[0]), t, static_cast<long long>(calls[t]));
        return emu_error(-1, g_message, name);
      }
    }
  }
  return {};
}

}  // namespace
}  // namespace cuda
}  // namespace trigscan

#include "../kernels_impl.cuh"

// ------------------------------------------------------- C API for ctypes ----
// shape = {T, N, C, Cm, HW}; dtype 0 = float32, 1 = float64. Every function
// returns the CudaStatus code (0 = success); emu_last_error() describes it.

namespace {
using trigscan::NesShape;
using trigscan::StampShape;
using trigscan::cuda::CudaStatus;

CudaStatus g_last;

StampShape stamp_shape(const int64_t* shape) {
  StampShape s{};
  s.T = shape[0];
  s.N = shape[1];
  s.C = shape[2];
  s.Cm = shape[3];
  s.HW = shape[4];
  return s;
}

NesShape nes_shape(const int64_t* shape, int64_t k, int joint, float sigma, uint64_t seed,
                   uint32_t offset) {
  NesShape sh{};
  sh.s = stamp_shape(shape);
  sh.k = k;
  sh.joint = joint != 0;
  sh.sigma = sigma;
  sh.seed = seed;
  sh.offset = offset;
  return sh;
}

int record(CudaStatus status) {
  g_last = status;
  return status.code;
}

template <typename T>
const T* in(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* out(void* p) {
  return static_cast<T*>(p);
}
}  // namespace

extern "C" {

const char* emu_last_error() {
  if (g_last.ok()) return "";
  static char text[512];
  std::snprintf(text, sizeof text, "%s: %s (code %d)", g_last.kernel ? g_last.kernel : "?",
                g_last.what ? g_last.what : "?", g_last.code);
  return text;
}

int64_t emu_launch_count() { return trigscan::cuda::g_stats.launches; }

int emu_stamp_forward(int dtype, const void* x, const void* mask, const void* pattern, void* o,
                      const int64_t* shape) {
  namespace tc = trigscan::cuda;
  const StampShape s = stamp_shape(shape);
  if (dtype == 0)
    return record(tc::stamp_forward<float>(in<float>(x), in<float>(mask), in<float>(pattern),
                                           out<float>(o), s, nullptr));
  return record(tc::stamp_forward<double>(in<double>(x), in<double>(mask), in<double>(pattern),
                                          out<double>(o), s, nullptr));
}

int emu_stamp_backward(int dtype, const void* grad, const void* x, const void* mask,
                       const void* pattern, void* grad_x, void* grad_mask, void* grad_pattern,
                       const int64_t* shape) {
  namespace tc = trigscan::cuda;
  const StampShape s = stamp_shape(shape);
  if (dtype == 0)
    return record(tc::stamp_backward<float>(in<float>(grad), in<float>(x), in<float>(mask),
                                            in<float>(pattern), out<float>(grad_x),
                                            out<float>(grad_mask), out<float>(grad_pattern), s,
                                            nullptr));
  return record(tc::stamp_backward<double>(in<double>(grad), in<double>(x), in<double>(mask),
                                           in<double>(pattern), out<double>(grad_x),
                                           out<double>(grad_mask), out<double>(grad_pattern), s,
                                           nullptr));
}

int emu_nes_sample_stamp(const float* x, const float* theta_m, const float* theta_p, float* o,
                         const int64_t* shape, int64_t k, int joint, float sigma, uint64_t seed,
                         uint32_t offset) {
  return record(trigscan::cuda::nes_sample_stamp(
      x, theta_m, theta_p, o, nes_shape(shape, k, joint, sigma, seed, offset), nullptr));
}

int emu_nes_grad(const float* losses, const float* theta_m, const float* theta_p, float* grad_m,
                 float* grad_p, const int64_t* shape, int64_t k, int joint, float sigma,
                 uint64_t seed, uint32_t offset, int baseline) {
  return record(trigscan::cuda::nes_grad(losses, theta_m, theta_p, grad_m, grad_p,
                                         nes_shape(shape, k, joint, sigma, seed, offset),
                                         baseline != 0, nullptr));
}

int emu_nes_samples(const float* theta_m, float* masks, float* noise, const int64_t* shape,
                    int64_t k, uint64_t seed, uint32_t offset) {
  return record(trigscan::cuda::nes_samples(theta_m, masks, noise,
                                            nes_shape(shape, k, 1, 1.0f, seed, offset), nullptr));
}

int emu_pixel_stamp_forward(int dtype, const void* x, const void* b_p, const void* b_n, void* o,
                            const int64_t* shape, double maxp, int use_tanh) {
  namespace tc = trigscan::cuda;
  const StampShape s = stamp_shape(shape);
  if (dtype == 0)
    return record(tc::pixel_stamp_forward<float>(in<float>(x), in<float>(b_p), in<float>(b_n),
                                                 out<float>(o), s, static_cast<float>(maxp),
                                                 use_tanh != 0, nullptr));
  return record(tc::pixel_stamp_forward<double>(in<double>(x), in<double>(b_p), in<double>(b_n),
                                                out<double>(o), s, maxp, use_tanh != 0, nullptr));
}

int emu_pixel_stamp_backward(int dtype, const void* grad, const void* x, const void* b_p,
                             const void* b_n, void* grad_x, void* grad_p, void* grad_n,
                             const int64_t* shape, double maxp, int use_tanh) {
  namespace tc = trigscan::cuda;
  const StampShape s = stamp_shape(shape);
  if (dtype == 0)
    return record(tc::pixel_stamp_backward<float>(
        in<float>(grad), in<float>(x), in<float>(b_p), in<float>(b_n), out<float>(grad_x),
        out<float>(grad_p), out<float>(grad_n), s, static_cast<float>(maxp), use_tanh != 0,
        nullptr));
  return record(tc::pixel_stamp_backward<double>(
      in<double>(grad), in<double>(x), in<double>(b_p), in<double>(b_n), out<double>(grad_x),
      out<double>(grad_p), out<double>(grad_n), s, maxp, use_tanh != 0, nullptr));
}

int emu_pixel_size_loss_forward(int dtype, const void* b_p, const void* b_n, void* o,
                                const int64_t* shape, double gamma) {
  namespace tc = trigscan::cuda;
  const StampShape s = stamp_shape(shape);
  if (dtype == 0)
    return record(tc::pixel_size_loss_forward<float>(in<float>(b_p), in<float>(b_n),
                                                     out<float>(o), s,
                                                     static_cast<float>(gamma), nullptr));
  return record(tc::pixel_size_loss_forward<double>(in<double>(b_p), in<double>(b_n),
                                                    out<double>(o), s, gamma, nullptr));
}

int emu_pixel_size_loss_backward(int dtype, const void* grad, const void* b_p, const void* b_n,
                                 void* grad_p, void* grad_n, const int64_t* shape, double gamma) {
  namespace tc = trigscan::cuda;
  const StampShape s = stamp_shape(shape);
  if (dtype == 0)
    return record(tc::pixel_size_loss_backward<float>(
        in<float>(grad), in<float>(b_p), in<float>(b_n), out<float>(grad_p), out<float>(grad_n),
        s, static_cast<float>(gamma), nullptr));
  return record(tc::pixel_size_loss_backward<double>(in<double>(grad), in<double>(b_p),
                                                     in<double>(b_n), out<double>(grad_p),
                                                     out<double>(grad_n), s, gamma, nullptr));
}

}  // extern "C"
