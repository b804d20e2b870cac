// CUDA kernels and launchers (declared in launchers.h). Torch-free on purpose:
// only the CUDA runtime and the shared host/device headers are included, so
// nvcc compiles this file in seconds; the dispatcher glue lives in backend.cpp.
//
// The kernels themselves are in kernels_impl.cuh, which the host emulator used
// by tests/test_cuda.py also includes; this file only supplies the real launch.
#include <cuda_runtime.h>

#include "launchers.h"

namespace trigscan {
namespace cuda {
namespace {

// Launches `kernel` on `stream` and reports a launch error (bad configuration,
// no device, an earlier asynchronous fault surfacing here) as a CudaStatus.
template <typename... Params, typename... Args>
CudaStatus launch_kernel(const char* name, void (*kernel)(Params...), unsigned grid,
                         unsigned block, void* stream, Args... args) {
  kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(args...);
  const cudaError_t err = cudaGetLastError();
  CudaStatus status;
  if (err != cudaSuccess) {
    status.code = static_cast<int>(err);
    status.what = cudaGetErrorString(err);
    status.kernel = name;
  }
  return status;
}

}  // namespace
}  // namespace cuda
}  // namespace trigscan

#include "kernels_impl.cuh"
