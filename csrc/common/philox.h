// Philox4x32-10 (Salmon et al., SC'11), host and device, plus trigscan's
// counter layout. One call maps (counter, key) to four independent 32-bit
// words; nothing depends on thread ids, so any thread mapping -- a CPU loop or a
// CUDA grid -- produces the same numbers for the same element.
#pragma once

#include "macros.h"

namespace trigscan {

struct U32x4 {
  uint32_t v[4];
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

TS_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}
}  // namespace philox_detail

TS_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t key0, uint32_t key1) {
  using namespace philox_detail;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += kWeyl0;
      key1 += kWeyl1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, ctr.v[0], hi0, lo0);
    mulhilo(kMul1, ctr.v[2], hi1, lo1);
    ctr = U32x4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
  }
  return ctr;
}

// ---- trigscan's counter layout (the RNG contract; README "RNG contract") ----
// key     = (low32(seed), high32(seed))
// counter = (block, (domain << 28) | sample, trigger, offset)
// Element e of one sample's tensor (flat index into [Cm,H,W] or [C,H,W]) uses
// word e % 4 of block e / 4. Every field has its own lane, so distinct
// (offset, trigger, sample, domain, block) never share a counter.
enum RngDomain : uint32_t {
  kDomainMask = 0,     // Bernoulli mask samples m_j
  kDomainPattern = 1,  // Gaussian pattern noise eps_j
};

TS_HD U32x4 draw_block(uint64_t seed, uint32_t offset, uint32_t trigger,
                       uint32_t sample, RngDomain domain, uint32_t block) {
  const U32x4 ctr{{block, (static_cast<uint32_t>(domain) << 28) | sample,
                   trigger, offset}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Largest sample index the layout can address (28 bits).
constexpr int64_t kMaxSamples = int64_t(1) << 28;

}  // namespace trigscan
