// Torch-free interface between the CUDA kernels (kernels.cu, compiled by nvcc
// without any ATen/c10 header, so it builds in seconds) and the dispatcher glue
// (backend.cpp, compiled by g++). Every launcher takes device pointers, a shape
// struct from common/macros.h and the cudaStream_t to launch on (as void*, so
// this header needs no CUDA header either), and returns a CudaStatus instead of
// throwing: backend.cpp turns a failure into TORCH_CHECK.
//
// A grad_x of nullptr means "not requested": that reduction is skipped.
// One launcher per Backend function used by ops_impl.h; the template ones are
// instantiated for float and double in kernels.cu. Each computes exactly what
// the CpuBackend loop of the same name computes (same element math from
// csrc/common, same per-element summation order, no atomics).
#pragma once

#include "../common/macros.h"

namespace trigscan {
namespace cuda {

struct CudaStatus {
  int code = 0;                  // cudaError_t, 0 = cudaSuccess
  const char* what = nullptr;    // cudaGetErrorString(code): static storage
  const char* kernel = nullptr;  // the launch that failed
  bool ok() const { return code == 0; }
};

template <typename T>
CudaStatus stamp_forward(const T* x, const T* mask, const T* pattern, T* out, StampShape s,
                         void* stream);

template <typename T>
CudaStatus stamp_backward(const T* grad, const T* x, const T* mask, const T* pattern, T* grad_x,
                          T* grad_mask, T* grad_pattern, StampShape s, void* stream);

CudaStatus nes_sample_stamp(const float* x, const float* theta_m, const float* theta_p,
                            float* out, NesShape sh, void* stream);

CudaStatus nes_grad(const float* losses, const float* theta_m, const float* theta_p,
                    float* grad_m, float* grad_p, NesShape sh, bool baseline, void* stream);

CudaStatus nes_samples(const float* theta_m, float* masks, float* noise, NesShape sh,
                       void* stream);

template <typename T>
CudaStatus pixel_stamp_forward(const T* x, const T* b_p, const T* b_n, T* out, StampShape s,
                               T maxp, bool use_tanh, void* stream);

template <typename T>
CudaStatus pixel_stamp_backward(const T* grad, const T* x, const T* b_p, const T* b_n, T* grad_x,
                                T* grad_p, T* grad_n, StampShape s, T maxp, bool use_tanh,
                                void* stream);

template <typename T>
CudaStatus pixel_size_loss_forward(const T* b_p, const T* b_n, T* out, StampShape s, T gamma,
                                   void* stream);

template <typename T>
CudaStatus pixel_size_loss_backward(const T* grad, const T* b_p, const T* b_n, T* grad_p,
                                    T* grad_n, StampShape s, T gamma, void* stream);

}  // namespace cuda
}  // namespace trigscan
