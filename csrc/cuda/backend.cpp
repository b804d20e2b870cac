// CUDA dispatcher glue, compiled by g++ (setup.py builds csrc/cuda/*.cpp with
// -DWITH_CUDA): CudaBackend forwards ops_impl.h's raw-pointer calls to the
// torch-free launchers of kernels.cu on the current stream of the tensor's
// device, and registers every op for the CUDA dispatch key.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse.h, which the
// nvcc-only toolkits of this project do not have.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops_impl.h"
#include "launchers.h"

namespace trigscan {
namespace {

void check_launch(const cuda::CudaStatus& status) {
  TORCH_CHECK(status.ok(), "trigscan: CUDA launch of ", status.kernel, " failed: ", status.what,
              " (cudaError ", status.code, ")");
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaDeviceGuard {
  explicit CudaDeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};

struct CudaBackend {
  using Guard = CudaDeviceGuard;

  template <typename T>
  static void stamp_forward(const T* x, const T* mask, const T* pattern, T* out, StampShape s) {
    check_launch(cuda::stamp_forward<T>(x, mask, pattern, out, s, current_stream()));
  }

  template <typename T>
  static void stamp_backward(const T* grad, const T* x, const T* mask, const T* pattern,
                             T* grad_x, T* grad_mask, T* grad_pattern, StampShape s) {
    check_launch(cuda::stamp_backward<T>(grad, x, mask, pattern, grad_x, grad_mask, grad_pattern,
                                         s, current_stream()));
  }

  static void nes_sample_stamp(const float* x, const float* theta_m, const float* theta_p,
                               float* out, NesShape sh, bool /*fresh*/) {
    check_launch(cuda::nes_sample_stamp(x, theta_m, theta_p, out, sh, current_stream()));
  }

  static void nes_grad(const float* losses, const float* theta_m, const float* theta_p,
                       float* grad_m, float* grad_p, NesShape sh, bool baseline) {
    check_launch(cuda::nes_grad(losses, theta_m, theta_p, grad_m, grad_p, sh, baseline,
                                current_stream()));
  }

  static void nes_samples(const float* theta_m, float* masks, float* noise, NesShape sh) {
    check_launch(cuda::nes_samples(theta_m, masks, noise, sh, current_stream()));
  }

  template <typename T>
  static void pixel_stamp_forward(const T* x, const T* b_p, const T* b_n, T* out, StampShape s,
                                  T maxp, bool use_tanh) {
    check_launch(
        cuda::pixel_stamp_forward<T>(x, b_p, b_n, out, s, maxp, use_tanh, current_stream()));
  }

  template <typename T>
  static void pixel_stamp_backward(const T* grad, const T* x, const T* b_p, const T* b_n,
                                   T* grad_x, T* grad_p, T* grad_n, StampShape s, T maxp,
                                   bool use_tanh) {
    check_launch(cuda::pixel_stamp_backward<T>(grad, x, b_p, b_n, grad_x, grad_p, grad_n, s, maxp,
                                               use_tanh, current_stream()));
  }

  template <typename T>
  static void pixel_size_loss_forward(const T* b_p, const T* b_n, T* out, StampShape s, T gamma) {
    check_launch(cuda::pixel_size_loss_forward<T>(b_p, b_n, out, s, gamma, current_stream()));
  }

  template <typename T>
  static void pixel_size_loss_backward(const T* grad, const T* b_p, const T* b_n, T* grad_p,
                                       T* grad_n, StampShape s, T gamma) {
    check_launch(cuda::pixel_size_loss_backward<T>(grad, b_p, b_n, grad_p, grad_n, s, gamma,
                                                   current_stream()));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(trigscan, CUDA, m) { register_kernels<CudaBackend>(m); }

}  // namespace trigscan
