#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>

#include <cmath>
#include <sstream>

namespace trigscan {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

namespace {

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "trigscan.", op, ": ", name, " is required (got None)");
}

void check_rank4(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 4, "trigscan.", op, ": ", name, " must be 4-D ", layout,
                    ", got shape ", shape_str(t));
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "trigscan.", op, ": ", name, " must be float32 or float64, got ",
                   t.scalar_type());
}

void check_float32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "trigscan.", op, ": ", name,
                   " must be float32 (the sampling path is defined in float32), got ",
                   t.scalar_type());
}

void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "trigscan.", op, ": ", name,
                   " has dtype ", t.scalar_type(), " but ", ref_name, " has ",
                   ref.scalar_type(), "; pass both in one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "trigscan.", op, ": ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device(),
                    "; move both to one device");
}

// Triggers [T, C, H, W] (pattern-like) and [T, 1|C, H, W] (mask-like) against an
// image shape [*, C, H, W].
StampShape trigger_shape(const char* op, const char* mask_name, const at::Tensor& mask,
                         const char* pattern_name, const at::Tensor& pattern) {
  check_rank4(op, mask_name, mask, "[T, 1 or C, H, W]");
  check_rank4(op, pattern_name, pattern, "[T, C, H, W]");
  StampShape s{};
  s.T = pattern.size(0);
  s.C = pattern.size(1);
  s.HW = pattern.size(2) * pattern.size(3);
  s.Cm = mask.size(1);
  TORCH_CHECK_VALUE(s.T >= 1 && s.C >= 1 && s.HW >= 1, "trigscan.", op, ": ", pattern_name,
                    " must have T, C, H, W >= 1, got ", shape_str(pattern));
  TORCH_CHECK_VALUE(mask.size(0) == s.T && (s.Cm == 1 || s.Cm == s.C) &&
                        mask.size(2) == pattern.size(2) && mask.size(3) == pattern.size(3),
                    "trigscan.", op, ": ", mask_name, " must have shape [T, 1 or C, H, W] = [",
                    s.T, ", 1 or ", s.C, ", ", pattern.size(2), ", ", pattern.size(3),
                    "] to match ", pattern_name, " ", shape_str(pattern), ", got ",
                    shape_str(mask));
  return s;
}

void check_images(const char* op, const at::Tensor& x, const at::Tensor& pattern,
                  const char* pattern_name, StampShape& s) {
  check_rank4(op, "x", x, "[N, C, H, W]");
  s.N = x.size(0);
  TORCH_CHECK_VALUE(s.N >= 1, "trigscan.", op, ": x must hold at least one image, got shape ",
                    shape_str(x));
  TORCH_CHECK_VALUE(x.size(1) == pattern.size(1) && x.size(2) == pattern.size(2) &&
                        x.size(3) == pattern.size(3),
                    "trigscan.", op, ": x ", shape_str(x), " and ", pattern_name, " ",
                    shape_str(pattern), " must agree in C, H, W");
}

}  // namespace

StampShape check_stamp(const char* op, const at::Tensor& x, const at::Tensor& mask,
                       const at::Tensor& pattern) {
  StampShape s = trigger_shape(op, "mask", mask, "pattern", pattern);
  check_images(op, x, pattern, "pattern", s);
  check_floating(op, "x", x);
  check_same(op, "mask", mask, "x", x);
  check_same(op, "pattern", pattern, "x", x);
  return s;
}

NesShape check_nes(const char* op, const at::Tensor* x, const at::Tensor& theta_m,
                   const at::Tensor& theta_p, int64_t k, double sigma, int64_t seed,
                   int64_t offset, bool joint) {
  NesShape sh{};
  sh.s = trigger_shape(op, "theta_m", theta_m, "theta_p", theta_p);
  check_float32(op, "theta_m", theta_m);
  check_same(op, "theta_p", theta_p, "theta_m", theta_m);
  if (x != nullptr) {
    check_images(op, *x, theta_p, "theta_p", sh.s);
    check_same(op, "x", *x, "theta_m", theta_m);
  }
  TORCH_CHECK_VALUE(k >= 1 && k < kMaxSamples, "trigscan.", op, ": k must be in [1, 2^28), got ",
                    k);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, "trigscan.", op,
                    ": sigma must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(seed >= 0, "trigscan.", op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= 0xFFFFFFFFLL, "trigscan.", op,
                    ": offset must be in [0, 2^32), got ", offset);
  TORCH_CHECK_VALUE(sh.s.T <= 0xFFFFFFFFLL && (sh.s.Cm * sh.s.HW + 3) / 4 <= 0xFFFFFFFFLL &&
                        (sh.s.C * sh.s.HW + 3) / 4 <= 0xFFFFFFFFLL,
                    "trigscan.", op, ": too many triggers or elements for the RNG counter layout");
  sh.k = k;
  sh.joint = joint;
  sh.sigma = static_cast<float>(sigma);
  sh.seed = static_cast<uint64_t>(seed);
  sh.offset = static_cast<uint32_t>(offset);
  return sh;
}

void check_nes_losses(const char* op, const at::Tensor& losses, const NesShape& sh) {
  check_defined(op, "losses", losses);
  TORCH_CHECK_VALUE(losses.dim() == 2 && losses.size(0) == sh.s.T && losses.size(1) == sh.rows(),
                    "trigscan.", op, ": losses must have shape [T, S] = [", sh.s.T, ", ",
                    sh.rows(), "] (S = ", sh.joint ? "k" : "2k", "), got ", shape_str(losses));
  check_float32(op, "losses", losses);
  TORCH_CHECK_VALUE(at::isfinite(losses).all().item<bool>(), "trigscan.", op,
                    ": losses contain NaN or infinity (did the model return garbage?)");
}

StampShape check_pixel(const char* op, const at::Tensor& x, const at::Tensor& b_p,
                       const at::Tensor& b_n, double maxp) {
  StampShape s = check_pixel_size(op, b_p, b_n, 1.0);
  check_images(op, x, b_p, "b_p", s);
  check_floating(op, "x", x);
  check_same(op, "b_p", b_p, "x", x);
  TORCH_CHECK_VALUE(std::isfinite(maxp) && maxp > 0, "trigscan.", op,
                    ": maxp must be a finite number > 0, got ", maxp);
  return s;
}

StampShape check_pixel_size(const char* op, const at::Tensor& b_p, const at::Tensor& b_n,
                            double gamma) {
  check_rank4(op, "b_p", b_p, "[T, C, H, W]");
  check_rank4(op, "b_n", b_n, "[T, C, H, W]");
  TORCH_CHECK_VALUE(b_p.sizes() == b_n.sizes(), "trigscan.", op, ": b_p ", shape_str(b_p),
                    " and b_n ", shape_str(b_n), " must have the same shape");
  check_floating(op, "b_p", b_p);
  check_same(op, "b_n", b_n, "b_p", b_p);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0, "trigscan.", op,
                    ": gamma must be a finite number > 0, got ", gamma);
  StampShape s{};
  s.T = b_p.size(0);
  s.C = b_p.size(1);
  s.Cm = s.C;
  s.HW = b_p.size(2) * b_p.size(3);
  s.N = 0;
  TORCH_CHECK_VALUE(s.T >= 1 && s.C >= 1 && s.HW >= 1, "trigscan.", op,
                    ": b_p must have T, C, H, W >= 1, got ", shape_str(b_p));
  return s;
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like,
                at::IntArrayRef expected) {
  check_defined(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.sizes() == expected, "trigscan.", op, ": grad must have shape ",
                    expected, ", got ", shape_str(grad));
  check_same(op, "grad", grad, "the forward inputs", like);
}

void check_out(const char* op, const at::Tensor& out, const at::Tensor& like,
               at::IntArrayRef expected,
               std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  check_defined(op, "out", out);
  TORCH_CHECK_VALUE(out.sizes() == expected, "trigscan.", op, ": out must have shape ", expected,
                    ", got ", shape_str(out));
  check_same(op, "out", out, "x", like);
  TORCH_CHECK_VALUE(out.is_contiguous(), "trigscan.", op,
                    ": out must be contiguous (it is written in place)");
  for (const auto& [name, input] : inputs) {
    TORCH_CHECK_VALUE(at::get_overlap_status(out, *input) == at::MemOverlapStatus::No, "trigscan.",
                      op, ": out shares memory with ", name, "; pass a separate buffer");
  }
}

}  // namespace trigscan
