// Compiler glue shared by the CPU (.cpp) and CUDA (.cu) translation units.
// Everything under csrc/common/ is torch-free, so nvcc compiles it in seconds
// and the CPU tests exercise exactly the code a GPU would run.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TS_HD __host__ __device__ __forceinline__
#else
#define TS_HD inline
#endif

namespace trigscan {

// Sizes of the ops, passed by value to every kernel. H*W is flattened into HW
// because no kernel needs the two separately.
struct StampShape {
  int64_t T;   // triggers (usually one per candidate class)
  int64_t N;   // images
  int64_t C;   // image channels
  int64_t Cm;  // mask channels: 1 (broadcast over C) or C
  int64_t HW;  // pixels per channel
};

struct NesShape {
  StampShape s;
  int64_t k;      // perturbations per estimate
  bool joint;     // one sample set drives both estimates (S = k), else S = 2k
  float sigma;    // pattern perturbation scale
  uint64_t seed;
  uint32_t offset;
  int64_t rows() const { return joint ? k : 2 * k; }  // S
};

}  // namespace trigscan
