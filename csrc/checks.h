// Argument validation for every op, shared by the CPU and CUDA entry points so
// that both reject bad input with the same message naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "common/macros.h"
#include "common/philox.h"

namespace trigscan {

std::string shape_str(const at::Tensor& t);

// x [N,C,H,W], mask [T,1|C,H,W], pattern [T,C,H,W]: same floating dtype and device.
StampShape check_stamp(const char* op, const at::Tensor& x, const at::Tensor& mask,
                       const at::Tensor& pattern);

// x [N,C,H,W] (or undefined for nes_samples), theta_m [T,1|C,H,W],
// theta_p [T,C,H,W], float32; k, sigma, seed, offset in range.
NesShape check_nes(const char* op, const at::Tensor* x, const at::Tensor& theta_m,
                   const at::Tensor& theta_p, int64_t k, double sigma, int64_t seed,
                   int64_t offset, bool joint);

// losses [T, S] float32, finite.
void check_nes_losses(const char* op, const at::Tensor& losses, const NesShape& sh);

// x [N,C,H,W], b_p and b_n [T,C,H,W]; maxp > 0.
StampShape check_pixel(const char* op, const at::Tensor& x, const at::Tensor& b_p,
                       const at::Tensor& b_n, double maxp);

// b_p and b_n [T,C,H,W]; gamma > 0.
StampShape check_pixel_size(const char* op, const at::Tensor& b_p, const at::Tensor& b_n,
                            double gamma);

// grad has the shape of the forward output [T,N,C,H,W].
void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like,
                at::IntArrayRef expected);

// A caller's output buffer: the expected shape, the dtype and device of `like`,
// contiguous, and sharing no memory with any of the named inputs.
void check_out(const char* op, const at::Tensor& out, const at::Tensor& like,
               at::IntArrayRef expected,
               std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs);

}  // namespace trigscan
