// The dispatcher-facing op functions, written once for every backend.
//
// Each op validates its arguments (checks.h), makes inputs contiguous,
// allocates outputs (or checks a caller's) and hands raw pointers to `Backend`, which is CpuBackend
// (cpu/kernels.cpp) or CudaBackend (cuda/backend.cpp). A backend provides:
//   Guard(const at::Tensor&)  -- device guard (no-op on CPU)
//   and one static template function per kernel, named as below.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "common/macros.h"

namespace trigscan {

template <class Backend>
at::Tensor stamp_op(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& pattern) {
  const StampShape s = check_stamp("stamp", x, mask, pattern);
  typename Backend::Guard guard(x);
  const auto xc = x.contiguous(), mc = mask.contiguous(), pc = pattern.contiguous();
  auto out = at::empty({s.T, s.N, s.C, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "trigscan.stamp", [&] {
    Backend::template stamp_forward<scalar_t>(
        xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(),
        pc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), s);
  });
  return out;
}

// need_grad_x = false skips the reduction over triggers for grad_x (x is
// usually data, not a parameter) and returns an empty tensor in its place.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> stamp_backward_op(const at::Tensor& grad,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& mask,
                                                                 const at::Tensor& pattern,
                                                                 bool need_grad_x) {
  const StampShape s = check_stamp("stamp_backward", x, mask, pattern);
  check_grad("stamp_backward", grad, x, {s.T, s.N, s.C, x.size(2), x.size(3)});
  typename Backend::Guard guard(x);
  const auto gc = grad.contiguous(), xc = x.contiguous(), mc = mask.contiguous(),
             pc = pattern.contiguous();
  auto grad_x = need_grad_x ? at::empty_like(xc) : at::empty({0}, x.options());
  auto grad_mask = at::empty_like(mc), grad_pattern = at::empty_like(pc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "trigscan.stamp_backward", [&] {
    Backend::template stamp_backward<scalar_t>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
        mc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(),
        need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
        grad_mask.mutable_data_ptr<scalar_t>(), grad_pattern.mutable_data_ptr<scalar_t>(), s);
  });
  return {grad_x, grad_mask, grad_pattern};
}

template <class Backend>
void nes_sample_stamp_into(const at::Tensor& x, const at::Tensor& theta_m,
                           const at::Tensor& theta_p, const NesShape& sh,
                           const at::Tensor& out, bool fresh) {
  typename Backend::Guard guard(x);
  const auto xc = x.contiguous(), tmc = theta_m.contiguous(), tpc = theta_p.contiguous();
  Backend::nes_sample_stamp(xc.const_data_ptr<float>(), tmc.const_data_ptr<float>(),
                            tpc.const_data_ptr<float>(), out.mutable_data_ptr<float>(), sh,
                            fresh);
}

template <class Backend>
at::Tensor nes_sample_stamp_op(const at::Tensor& x, const at::Tensor& theta_m,
                               const at::Tensor& theta_p, int64_t k, double sigma,
                               int64_t seed, int64_t offset, bool joint) {
  const NesShape sh =
      check_nes("nes_sample_stamp", &x, theta_m, theta_p, k, sigma, seed, offset, joint);
  auto out = at::empty({sh.s.T, sh.rows(), sh.s.N, sh.s.C, x.size(2), x.size(3)}, x.options());
  nes_sample_stamp_into<Backend>(x, theta_m, theta_p, sh, out, true);
  return out;
}

// The same query batch written into a caller's buffer (a scan loop reuses one
// buffer for every step instead of mapping fresh memory each time).
template <class Backend>
void nes_sample_stamp_out_op(const at::Tensor& x, const at::Tensor& theta_m,
                             const at::Tensor& theta_p, int64_t k, double sigma, int64_t seed,
                             int64_t offset, bool joint, const at::Tensor& out) {
  const NesShape sh =
      check_nes("nes_sample_stamp_out", &x, theta_m, theta_p, k, sigma, seed, offset, joint);
  check_out("nes_sample_stamp_out", out, x,
            {sh.s.T, sh.rows(), sh.s.N, sh.s.C, x.size(2), x.size(3)},
            {{"x", &x}, {"theta_m", &theta_m}, {"theta_p", &theta_p}});
  nes_sample_stamp_into<Backend>(x, theta_m, theta_p, sh, out, false);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> nes_grad_op(const at::Tensor& losses, const at::Tensor& theta_m,
                                               const at::Tensor& theta_p, int64_t k, double sigma,
                                               int64_t seed, int64_t offset, bool joint,
                                               bool baseline) {
  const NesShape sh =
      check_nes("nes_grad", nullptr, theta_m, theta_p, k, sigma, seed, offset, joint);
  check_nes_losses("nes_grad", losses, sh);
  TORCH_CHECK_VALUE(losses.device() == theta_m.device(), "trigscan.nes_grad: losses is on ",
                    losses.device(), " but theta_m is on ", theta_m.device());
  typename Backend::Guard guard(theta_m);
  const auto lc = losses.contiguous(), tmc = theta_m.contiguous(), tpc = theta_p.contiguous();
  auto grad_m = at::empty_like(tmc), grad_p = at::empty_like(tpc);
  Backend::nes_grad(lc.const_data_ptr<float>(), tmc.const_data_ptr<float>(),
                    tpc.const_data_ptr<float>(), grad_m.mutable_data_ptr<float>(),
                    grad_p.mutable_data_ptr<float>(), sh, baseline);
  return {grad_m, grad_p};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> nes_samples_op(const at::Tensor& theta_m,
                                                  const at::Tensor& theta_p, int64_t k,
                                                  int64_t seed, int64_t offset) {
  const NesShape sh =
      check_nes("nes_samples", nullptr, theta_m, theta_p, k, 1.0, seed, offset, true);
  typename Backend::Guard guard(theta_m);
  const auto tmc = theta_m.contiguous();
  auto masks = at::empty({sh.s.T, k, sh.s.Cm, theta_m.size(2), theta_m.size(3)},
                         theta_m.options());
  auto noise = at::empty({sh.s.T, k, sh.s.C, theta_p.size(2), theta_p.size(3)},
                         theta_p.options());
  Backend::nes_samples(tmc.const_data_ptr<float>(), masks.mutable_data_ptr<float>(),
                       noise.mutable_data_ptr<float>(), sh);
  return {masks, noise};
}

template <class Backend>
at::Tensor pixel_stamp_op(const at::Tensor& x, const at::Tensor& b_p, const at::Tensor& b_n,
                          double maxp, bool use_tanh) {
  const StampShape s = check_pixel("pixel_stamp", x, b_p, b_n, maxp);
  typename Backend::Guard guard(x);
  const auto xc = x.contiguous(), pc = b_p.contiguous(), nc = b_n.contiguous();
  auto out = at::empty({s.T, s.N, s.C, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "trigscan.pixel_stamp", [&] {
    Backend::template pixel_stamp_forward<scalar_t>(
        xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(),
        nc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), s,
        static_cast<scalar_t>(maxp), use_tanh);
  });
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_stamp_backward_op(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& b_p, const at::Tensor& b_n,
    double maxp, bool use_tanh, bool need_grad_x) {
  const StampShape s = check_pixel("pixel_stamp_backward", x, b_p, b_n, maxp);
  check_grad("pixel_stamp_backward", grad, x, {s.T, s.N, s.C, x.size(2), x.size(3)});
  typename Backend::Guard guard(x);
  const auto gc = grad.contiguous(), xc = x.contiguous(), pc = b_p.contiguous(),
             nc = b_n.contiguous();
  auto grad_x = need_grad_x ? at::empty_like(xc) : at::empty({0}, x.options());
  auto grad_p = at::empty_like(pc), grad_n = at::empty_like(nc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "trigscan.pixel_stamp_backward", [&] {
    Backend::template pixel_stamp_backward<scalar_t>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
        pc.const_data_ptr<scalar_t>(), nc.const_data_ptr<scalar_t>(),
        need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, grad_p.mutable_data_ptr<scalar_t>(),
        grad_n.mutable_data_ptr<scalar_t>(), s, static_cast<scalar_t>(maxp), use_tanh);
  });
  return {grad_x, grad_p, grad_n};
}

template <class Backend>
at::Tensor pixel_size_loss_op(const at::Tensor& b_p, const at::Tensor& b_n, double gamma) {
  const StampShape s = check_pixel_size("pixel_size_loss", b_p, b_n, gamma);
  typename Backend::Guard guard(b_p);
  const auto pc = b_p.contiguous(), nc = b_n.contiguous();
  auto out = at::empty({s.T}, b_p.options());
  AT_DISPATCH_FLOATING_TYPES(b_p.scalar_type(), "trigscan.pixel_size_loss", [&] {
    Backend::template pixel_size_loss_forward<scalar_t>(
        pc.const_data_ptr<scalar_t>(), nc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), s, static_cast<scalar_t>(gamma));
  });
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> pixel_size_loss_backward_op(const at::Tensor& grad,
                                                               const at::Tensor& b_p,
                                                               const at::Tensor& b_n,
                                                               double gamma) {
  const StampShape s = check_pixel_size("pixel_size_loss_backward", b_p, b_n, gamma);
  check_grad("pixel_size_loss_backward", grad, b_p, {s.T});
  typename Backend::Guard guard(b_p);
  const auto gc = grad.contiguous(), pc = b_p.contiguous(), nc = b_n.contiguous();
  auto grad_p = at::empty_like(pc), grad_n = at::empty_like(nc);
  AT_DISPATCH_FLOATING_TYPES(b_p.scalar_type(), "trigscan.pixel_size_loss_backward", [&] {
    Backend::template pixel_size_loss_backward<scalar_t>(
        gc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(),
        nc.const_data_ptr<scalar_t>(), grad_p.mutable_data_ptr<scalar_t>(),
        grad_n.mutable_data_ptr<scalar_t>(), s, static_cast<scalar_t>(gamma));
  });
  return {grad_p, grad_n};
}

// One registration list for every backend.
template <class Backend>
void register_kernels(torch::Library& m) {
  m.impl("stamp", &stamp_op<Backend>);
  m.impl("stamp_backward", &stamp_backward_op<Backend>);
  m.impl("nes_sample_stamp", &nes_sample_stamp_op<Backend>);
  m.impl("nes_sample_stamp_out", &nes_sample_stamp_out_op<Backend>);
  m.impl("nes_grad", &nes_grad_op<Backend>);
  m.impl("nes_samples", &nes_samples_op<Backend>);
  m.impl("pixel_stamp", &pixel_stamp_op<Backend>);
  m.impl("pixel_stamp_backward", &pixel_stamp_backward_op<Backend>);
  m.impl("pixel_size_loss", &pixel_size_loss_op<Backend>);
  m.impl("pixel_size_loss_backward", &pixel_size_loss_backward_op<Backend>);
}

}  // namespace trigscan
