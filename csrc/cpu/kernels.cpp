// CPU kernels: thin at::parallel_for loops around the element math in
// csrc/common. Work is split so that no two threads write the same output
// element, and every reduction runs in a fixed order (results do not depend on
// the thread count, nor on the instruction set the loops are compiled for).
//
// Speed (the README's Benchmarks section has the measurements):
// * Every loop body is compiled three times -- baseline x86-64, AVX2+FMA and
//   AVX-512 -- through GCC/Clang `target` attributes, and the best one the CPU
//   supports is picked at run time (override: TRIGSCAN_CPU_ISA=base|avx2|avx512,
//   which can only lower it). The build stays portable (no -march flags).
//   `flatten` inlines the shared element math into each clone, so fmaf becomes
//   one instruction there instead of a libm call, and the vectoriser can widen
//   the loops. The results are bit-identical across clones: -ffp-contract=off
//   forbids contracting a*b+c, fmaf is exact everywhere, and vectorisation only
//   runs independent elements side by side -- every reduction keeps its order.
// * Random words are drawn in separate loops, vectorised across Philox blocks
//   (AVX-512: hand-written, 48 blocks at a time; elsewhere the shared scalar
//   code, auto-vectorised); the Bernoulli / Box-Muller / squash math then runs
//   on them element-wise.
//   That math is branch-free straight-line code (csrc/common/math.h), so these
//   loops vectorise too -- given -fno-math-errno and -fno-trapping-math
//   (setup.py), which change no value.
// * Backward without grad_x (autograd's usual case: x is data) skips the
//   reduction over triggers and splits work by (trigger, pixel chunk).
// * Backward reductions: each task owns a spatial chunk (all t, n, c of a range
//   of pixels; x and grad_x of the chunk stay in L2) and sweeps contiguous rows
//   of it with the per-pixel accumulators in L1.
// * Large outputs (twice the last-level cache, at most 64 MiB; the NES query
//   batch: tens to hundreds of MiB) are advised to use transparent huge pages
//   before their first touch: one fault per 2 MiB instead of per 4 KiB (on this
//   project's VMs a 4 KiB fault costs ~3 us, more than writing the page). They
//   are also written with non-temporal stores, which saves the read-for-ownership
//   when the memory is reused rather than freshly mapped. TRIGSCAN_CPU_HUGEPAGES=0 and
//   TRIGSCAN_CPU_STREAM=0|1 switch these off (or streaming always on) for
//   experiments; none of it changes a value.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define TS_X86 1
// GCC 12 reports its own AVX-512 intrinsics' undefined pass-through operands as
// "may be used uninitialized" once they are inlined (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define TS_X86 0
#endif

#include "../common/math.h"
#include "../common/nes.h"
#include "../ops_impl.h"

namespace trigscan {
namespace {

// ---------------------------------------------------------------------------
// Instruction-set clones
// ---------------------------------------------------------------------------
enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

template <Isa I>
struct IsaTag {
  static constexpr Isa value = I;
};

#if TS_X86
#if defined(__clang__)
#define TS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), flatten))
#else
#define TS_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"), \
                 flatten))
#endif
#define TS_AVX2 __attribute__((target("avx2,fma"), flatten))
#endif
#if defined(__GNUC__) || defined(__clang__)
#define TS_FLATTEN __attribute__((flatten))
#define TS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TS_FLATTEN
#define TS_ALWAYS_INLINE inline
#endif

Isa detect_isa() {
  Isa isa = Isa::kBase;
#if TS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    isa = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      isa = Isa::kAvx512;
  }
#endif
  if (const char* env = std::getenv("TRIGSCAN_CPU_ISA")) {
    Isa cap = isa;
    if (std::strcmp(env, "base") == 0) cap = Isa::kBase;
    else if (std::strcmp(env, "avx2") == 0) cap = Isa::kAvx2;
    if (static_cast<int>(cap) < static_cast<int>(isa)) isa = cap;
  }
  return isa;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// body(begin, end, IsaTag<...>{}) with the body inlined into a clone per ISA.
template <class F>
TS_FLATTEN void run_base(const F& body, int64_t b, int64_t e) {
  body(b, e, IsaTag<Isa::kBase>{});
}
#if TS_X86
template <class F>
TS_AVX2 void run_avx2(const F& body, int64_t b, int64_t e) {
  body(b, e, IsaTag<Isa::kAvx2>{});
}
template <class F>
TS_AVX512 void run_avx512(const F& body, int64_t b, int64_t e) {
  body(b, e, IsaTag<Isa::kAvx512>{});
}
#endif

// at::parallel_for, running the clone for this CPU.
template <class F>
void parallel(int64_t begin, int64_t end, int64_t grain, const F& body) {
  switch (cpu_isa()) {
#if TS_X86
    case Isa::kAvx512:
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_avx512(body, b, e); });
      return;
    case Isa::kAvx2:
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_avx2(body, b, e); });
      return;
#endif
    default:
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_base(body, b, e); });
  }
}

// ---------------------------------------------------------------------------
// Large outputs: huge pages and non-temporal stores
// ---------------------------------------------------------------------------
// Size of the last-level cache one core sees. sysfs first: in VMs
// sysconf(_SC_LEVEL3_CACHE_SIZE) may report the whole host's L3.
int64_t last_level_cache_bytes() {
  static const int64_t cached = [] {
    int64_t bytes = 0;
#if defined(__linux__)
    int best_level = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir =
          "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      int level = 0;
      long long size = 0;
      char unit = 0;
      FILE* f = std::fopen((dir + "level").c_str(), "r");
      if (!f) break;
      const bool ok_level = std::fscanf(f, "%d", &level) == 1;
      std::fclose(f);
      f = std::fopen((dir + "size").c_str(), "r");
      if (!f) continue;
      const int got = std::fscanf(f, "%lld%c", &size, &unit);
      std::fclose(f);
      if (!ok_level || got < 1 || level < best_level) continue;
      best_level = level;
      bytes = size * (unit == 'K' ? 1024 : unit == 'M' ? (1 << 20) : 1);
    }
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (bytes <= 0) bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
#endif
    return bytes > 0 ? bytes : (int64_t(32) << 20);
  }();
  return cached;
}

// An output this large cannot stay in the caches. Twice the last-level cache,
// but at most 64 MiB: a VM may report its host socket's whole L3 (300 MiB on
// this project's 2-vCPU Xeon VMs), shared with other tenants. Measured there:
// a 70 MiB NES batch took 2.4 ms with plain stores and 2.8 ms streamed while the
// host was idle, but 11.5 vs 5.5 ms (one thread) once another process used the
// cache; at 150-375 MiB streaming halves the time either way.
int64_t large_output_bytes() {
  static const int64_t bytes = std::clamp<int64_t>(2 * last_level_cache_bytes(),
                                                   int64_t(16) << 20, int64_t(64) << 20);
  return bytes;
}

// Outputs at least this large bypass the caches: they cannot stay in them anyway.
int64_t stream_threshold() {
  static const int64_t threshold = [] {
    if (const char* env = std::getenv("TRIGSCAN_CPU_STREAM")) {
      if (std::strcmp(env, "0") == 0) return INT64_MAX;
      if (std::strcmp(env, "1") == 0) return int64_t(0);
    }
    return large_output_bytes();
  }();
  return threshold;
}

bool use_streaming(int64_t bytes) { return bytes >= stream_threshold(); }

// Best effort: ask for transparent huge pages on a freshly allocated output
// before its first touch. Only for buffers that are surely their own mapping
// (glibc maps every block >= 32 MiB separately) and large (see above).
bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("TRIGSCAN_CPU_HUGEPAGES");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return enabled;
}

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!huge_pages_enabled() ||
      bytes < std::max<int64_t>(int64_t(32) << 20, large_output_bytes()))
    return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

#if TS_X86
TS_AVX512 void stream_bytes_avx512(char* dst, const char* src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 64 <= n; i += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i),
                        _mm512_loadu_si512(reinterpret_cast<const void*>(src + i)));
  std::memcpy(dst + i, src + i, n - i);
}
TS_AVX2 void stream_bytes_avx2(char* dst, const char* src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, (32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 32 <= n; i += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  std::memcpy(dst + i, src + i, n - i);
}
inline void stream_bytes_sse2(char* dst, const char* src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 16 <= n; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  std::memcpy(dst + i, src + i, n - i);
}
#endif

// Copy n elements to dst with non-temporal stores (plain copy off x86).
template <Isa I, typename T>
inline void stream_store(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if TS_X86
  if constexpr (I == Isa::kAvx512) stream_bytes_avx512(d, s, bytes);
  else if constexpr (I == Isa::kAvx2) stream_bytes_avx2(d, s, bytes);
  else stream_bytes_sse2(d, s, bytes);
#else
  std::memcpy(d, s, bytes);
#endif
}

// Non-temporal stores are weakly ordered: fence them before the task ends.
inline void stream_fence() {
#if TS_X86
  _mm_sfence();
#endif
}

// Writes `len` elements computed by fill(dst, lo, n) (elements lo..lo+n of the
// row into dst[0..n)) to `out`, directly or through an L1 buffer + streaming.
constexpr int64_t kStreamChunk = 1024;

template <Isa I, typename T, class Fill>
inline void write_row(T* out, int64_t len, bool stream, const Fill& fill) {
  if (!stream) {
    fill(out, int64_t(0), len);
    return;
  }
  alignas(64) T buf[kStreamChunk];
  for (int64_t lo = 0; lo < len; lo += kStreamChunk) {
    const int64_t n = std::min(kStreamChunk, len - lo);
    fill(buf, lo, n);
    stream_store<I>(out + lo, buf, n);
  }
}

// ---------------------------------------------------------------------------
// Work splitting
// ---------------------------------------------------------------------------
// Grain sizes: enough elements per task to amortise scheduling.
constexpr int64_t kGrainElements = 32768;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// Spatial chunk of the backward kernels: each task owns whole chunks of pixels
// (all t, n, c of them), about four per thread so both threads stay busy and a
// chunk's slice of x and grad_x stays in L2; rows of a chunk are read
// contiguously and the per-pixel accumulators live in L1.
constexpr int64_t kMaxChunk = 1024;

int64_t spatial_chunk(int64_t HW) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = (HW + want - 1) / want;
  return std::clamp<int64_t>((per + 63) / 64 * 64, 64, kMaxChunk);
}

// Pixel chunk when tasks are (trigger, chunk) pairs: whole planes when there
// are enough triggers to keep every thread busy, smaller chunks otherwise.
int64_t trigger_chunk(int64_t T, int64_t HW) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t pieces = std::max<int64_t>(1, (want + T - 1) / T);
  const int64_t per = (HW + pieces - 1) / pieces;
  return std::clamp<int64_t>((per + 63) / 64 * 64, 64, kMaxChunk);
}

// Index of the mask element covering channel c (mask broadcast when Cm == 1).
inline int64_t mask_channel(const StampShape& s, int64_t c) { return s.Cm == 1 ? 0 : c; }

// Philox words of blocks b0 .. b0+nb-1 of one sample (t, j, domain): word w of
// block b at words[4 (b - b0) + w]. The same draw_block calls as nes_mask4 /
// nes_noise4 in common/nes.h, kept apart from the element math so that this
// loop vectorises across blocks.
inline void draw_words_scalar(const NesShape& sh, int64_t t, int64_t j, RngDomain domain,
                              int64_t b0, int64_t nb, uint32_t* words) {
  for (int64_t b = 0; b < nb; ++b) {
    const U32x4 w = draw_block(sh.seed, sh.offset, static_cast<uint32_t>(t),
                               static_cast<uint32_t>(j), domain, static_cast<uint32_t>(b0 + b));
    words[4 * b + 0] = w.v[0];
    words[4 * b + 1] = w.v[1];
    words[4 * b + 2] = w.v[2];
    words[4 * b + 3] = w.v[3];
  }
}

#if TS_X86
// The same words with AVX-512 intrinsics, 48 blocks at a time (three
// independent 16-lane chains, so the multiplies' latency overlaps). GCC
// vectorises the scalar loop with 64-bit multiplies (vpmullq, slow on Intel);
// here each 32x32->64 product is two vpmuludq on the even / odd lanes. The
// rounds are philox4x32_10's exactly (tests/test_rng.py: every op gives the
// same bits under TRIGSCAN_CPU_ISA=base|avx2, i.e. with the shared code).
TS_AVX512 inline void mulhilo16(__m512i a, __m512i mul, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, mul);                        // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), mul);  // lanes 1, 3, ...
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

TS_AVX512 void draw_words_avx512(const NesShape& sh, int64_t t, int64_t j, RngDomain domain,
                                 int64_t b0, int64_t nb, uint32_t* words) {
  using namespace philox_detail;
  constexpr int kChains = 3;
  const __m512i mul0 = _mm512_set1_epi32(static_cast<int>(kMul0));
  const __m512i mul1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // transpose of (c0, c1, c2, c3) x 16 lanes into 16 blocks of 4 words
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i quad_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i quad_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i sample =
      _mm512_set1_epi32(static_cast<int>((static_cast<uint32_t>(domain) << 28) |
                                         static_cast<uint32_t>(j)));
  const __m512i trigger = _mm512_set1_epi32(static_cast<int>(t));
  const __m512i offset = _mm512_set1_epi32(static_cast<int>(sh.offset));
  for (int64_t base = 0; base < nb; base += 16 * kChains) {
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int g = 0; g < kChains; ++g) {
      c0[g] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b0 + base + 16 * g)), lane);
      c1[g] = sample;
      c2[g] = trigger;
      c3[g] = offset;
    }
    uint32_t key0 = static_cast<uint32_t>(sh.seed), key1 = static_cast<uint32_t>(sh.seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        key0 += kWeyl0;
        key1 += kWeyl1;
      }
      const __m512i k0 = _mm512_set1_epi32(static_cast<int>(key0));
      const __m512i k1 = _mm512_set1_epi32(static_cast<int>(key1));
      for (int g = 0; g < kChains; ++g) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo16(c0[g], mul0, hi0, lo0);
        mulhilo16(c2[g], mul1, hi1, lo1);
        c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], k0, 0x96);  // three-way xor
        c1[g] = lo1;
        c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], k1, 0x96);
        c3[g] = lo0;
      }
    }
    for (int g = 0; g < kChains; ++g) {
      const int64_t first = base + 16 * g, blocks = std::min<int64_t>(16, nb - first);
      if (blocks <= 0) break;
      const __m512i w01_lo = _mm512_permutex2var_epi32(c0[g], pair_lo, c1[g]);
      const __m512i w01_hi = _mm512_permutex2var_epi32(c0[g], pair_hi, c1[g]);
      const __m512i w23_lo = _mm512_permutex2var_epi32(c2[g], pair_lo, c3[g]);
      const __m512i w23_hi = _mm512_permutex2var_epi32(c2[g], pair_hi, c3[g]);
      const __m512i quads[4] = {_mm512_permutex2var_epi64(w01_lo, quad_lo, w23_lo),
                                _mm512_permutex2var_epi64(w01_lo, quad_hi, w23_lo),
                                _mm512_permutex2var_epi64(w01_hi, quad_lo, w23_hi),
                                _mm512_permutex2var_epi64(w01_hi, quad_hi, w23_hi)};
      for (int q = 0; q < 4 && 4 * q < blocks; ++q) {  // quads[q]: blocks 4q .. 4q+3
        const int64_t left = blocks - 4 * q;
        const __mmask16 keep =
            left >= 4 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (4 * left)) - 1);
        _mm512_mask_storeu_epi32(words + 4 * (first + 4 * q), keep, quads[q]);
      }
    }
  }
}
#endif

template <Isa I>
TS_ALWAYS_INLINE void draw_words(const NesShape& sh, int64_t t, int64_t j, RngDomain domain,
                                 int64_t b0, int64_t nb, uint32_t* words) {
#if TS_X86
  if constexpr (I == Isa::kAvx512) {
    draw_words_avx512(sh, t, j, domain, b0, nb, words);
    return;
  }
#endif
  draw_words_scalar(sh, t, j, domain, b0, nb, words);
}

// Bernoulli decisions of elements 0..n-1 from their words (nes_mask4).
inline void masks_from_words(const uint32_t* words, const float* prob, float* m, int64_t n) {
  for (int64_t e = 0; e < n; ++e) m[e] = bernoulli(words[e], prob[e]);
}

// Standard normals of elements 0..n-1 (n even) from their words (normal4: words
// 2q, 2q+1 -> elements 2q, 2q+1).
inline void normals_from_words(const uint32_t* words, float* z, int64_t n) {
  for (int64_t q = 0; q < n; q += 2) box_muller(words[q], words[q + 1], z[q], z[q + 1]);
}

// P(b_p), P(b_n) of n elements (loops unswitched on use_tanh so that the clip
// branch vectorises).
template <typename T>
inline void perturbations(const T* b_p, const T* b_n, T* pp, T* pn, int64_t n, T maxp,
                          bool use_tanh) {
  if (use_tanh) {
    for (int64_t i = 0; i < n; ++i) {
      pp[i] = pixel_perturbation(b_p[i], maxp, true);
      pn[i] = pixel_perturbation(b_n[i], maxp, true);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      pp[i] = pixel_perturbation(b_p[i], maxp, false);
      pn[i] = pixel_perturbation(b_n[i], maxp, false);
    }
  }
}

// Four consecutive images (rows g, x, g + stride, x + stride, ...) added into
// the per-pixel accumulators: each is loaded and stored once per four terms,
// and the terms are still added one after the other (same sums as one image
// at a time). __restrict: the rows never alias the accumulators.
template <typename T>
TS_ALWAYS_INLINE void stamp_backward_4rows(const T* __restrict g, const T* __restrict x,
                                           int64_t stride, const T* __restrict p,
                                           const T* __restrict m, T* __restrict acc_m,
                                           T* __restrict acc_p, int64_t len) {
  const T *g1 = g + stride, *g2 = g + 2 * stride, *g3 = g + 3 * stride;
  const T *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
  for (int64_t i = 0; i < len; ++i) {
    const T pv = p[i], mv = m[i];
    T am = acc_m[i], ap = acc_p[i];
    am += g[i] * (pv - x[i]);
    ap += g[i] * mv;
    am += g1[i] * (pv - x1[i]);
    ap += g1[i] * mv;
    am += g2[i] * (pv - x2[i]);
    ap += g2[i] * mv;
    am += g3[i] * (pv - x3[i]);
    ap += g3[i] * mv;
    acc_m[i] = am;
    acc_p[i] = ap;
  }
}

template <typename T>
TS_ALWAYS_INLINE void pixel_backward_4rows(const T* __restrict g, const T* __restrict x,
                                           int64_t stride, const T* __restrict pp,
                                           const T* __restrict pn, T* __restrict acc,
                                           int64_t len, T maxp) {
  const T *g1 = g + stride, *g2 = g + 2 * stride, *g3 = g + 3 * stride;
  const T *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
  for (int64_t i = 0; i < len; ++i) {
    const T a = pp[i], b = pn[i];
    T v = acc[i];
    v += within(pixel_unclipped(x[i], a, b), T(0), maxp) ? g[i] : T(0);
    v += within(pixel_unclipped(x1[i], a, b), T(0), maxp) ? g1[i] : T(0);
    v += within(pixel_unclipped(x2[i], a, b), T(0), maxp) ? g2[i] : T(0);
    v += within(pixel_unclipped(x3[i], a, b), T(0), maxp) ? g3[i] : T(0);
    acc[i] = v;
  }
}

struct NoGuard {
  explicit NoGuard(const at::Tensor&) {}
};

struct CpuBackend {
  using Guard = NoGuard;

  template <typename T>
  static void stamp_forward(const T* x, const T* mask, const T* pattern, T* out, StampShape s) {
    const int64_t bytes = s.T * s.N * s.C * s.HW * static_cast<int64_t>(sizeof(T));
    advise_huge_pages(out, bytes);
    const bool stream = use_streaming(bytes);
    // One row = one (t, n, c) plane of HW pixels.
    parallel(0, s.T * s.N * s.C, grain_for(s.HW), [&](int64_t begin, int64_t end, auto isa) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % s.C, n = (row / s.C) % s.N, t = row / (s.C * s.N);
        const T* xr = x + (n * s.C + c) * s.HW;
        const T* mr = mask + (t * s.Cm + mask_channel(s, c)) * s.HW;
        const T* pr = pattern + (t * s.C + c) * s.HW;
        write_row<decltype(isa)::value>(out + row * s.HW, s.HW, stream,
                                        [&](T* o, int64_t lo, int64_t len) {
          for (int64_t i = 0; i < len; ++i)
            o[i] = stamp_value(xr[lo + i], mr[lo + i], pr[lo + i]);
        });
      }
      if (stream) stream_fence();
    });
  }

  // One pass over grad [T,N,C,HW]. Per pixel the sums run in the order:
  // grad_x over t; grad_pattern over n; grad_mask over n, and over c before n
  // when the mask is broadcast.
  // With grad_x: each task owns a spatial chunk (all t, n, c of it) and reduces
  // over n (mask, pattern) and over t (x) inside it. Without grad_x
  // (grad_x == nullptr) tasks are (trigger, chunk) pairs and nothing is written
  // per image.
  template <typename T>
  static void stamp_backward(const T* grad, const T* x, const T* mask, const T* pattern,
                             T* grad_x, T* grad_mask, T* grad_pattern, StampShape s) {
    if (grad_x == nullptr) {
      const int64_t chunk = trigger_chunk(s.T, s.HW);
      const int64_t chunks = (s.HW + chunk - 1) / chunk;
      parallel(0, s.T * chunks, 1, [&](int64_t begin, int64_t end, auto) {
        alignas(64) T acc_m[kMaxChunk], acc_p[kMaxChunk];
        for (int64_t item = begin; item < end; ++item) {
          const int64_t t = item / chunks, lo = (item % chunks) * chunk;
          stamp_backward_rows<T, false>(lo, std::min(s.HW, lo + chunk), t, grad, x, mask,
                                        pattern, nullptr, grad_mask, grad_pattern, s, acc_m,
                                        acc_p);
        }
      });
      return;
    }
    const int64_t chunk = spatial_chunk(s.HW);
    const int64_t chunks = (s.HW + chunk - 1) / chunk;
    parallel(0, chunks, 1, [&](int64_t begin, int64_t end, auto) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t lo = ch * chunk, hi = std::min(s.HW, lo + chunk);
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < s.C; ++c)
            std::fill(grad_x + (n * s.C + c) * s.HW + lo, grad_x + (n * s.C + c) * s.HW + hi,
                      T(0));
        alignas(64) T acc_m[kMaxChunk], acc_p[kMaxChunk];
        for (int64_t t = 0; t < s.T; ++t)
          stamp_backward_rows<T, true>(lo, hi, t, grad, x, mask, pattern, grad_x, grad_mask,
                                       grad_pattern, s, acc_m, acc_p);
      }
    });
  }

  // Pixels lo .. hi-1 of trigger t; accumulators acc_m, acc_p of hi - lo pixels.
  template <typename T, bool kWithX>
  static TS_ALWAYS_INLINE void stamp_backward_rows(
      int64_t lo, int64_t hi, int64_t t, const T* grad, const T* x, const T* mask,
      const T* pattern, T* grad_x, T* grad_mask, T* grad_pattern, const StampShape& s,
      T* acc_m, T* acc_p) {
    const int64_t len = hi - lo;
    for (int64_t c = 0; c < s.C; ++c) {
      if (s.Cm != 1 || c == 0) std::fill_n(acc_m, len, T(0));
      std::fill_n(acc_p, len, T(0));
      const T* mr = mask + (t * s.Cm + mask_channel(s, c)) * s.HW + lo;
      const T* pr = pattern + (t * s.C + c) * s.HW + lo;
      for (int64_t n = 0; n < s.N; ++n) {
        const T* gr = grad + ((t * s.N + n) * s.C + c) * s.HW + lo;
        const T* xr = x + (n * s.C + c) * s.HW + lo;
        if constexpr (kWithX) {
          T* gxr = grad_x + (n * s.C + c) * s.HW + lo;
          for (int64_t i = 0; i < len; ++i) {
            const T g = gr[i];
            acc_m[i] += g * (pr[i] - xr[i]);
            acc_p[i] += g * mr[i];
            gxr[i] += g * (T(1) - mr[i]);
          }
        } else {
          if (n + 4 <= s.N) {
            stamp_backward_4rows(gr, xr, s.C * s.HW, pr, mr, acc_m, acc_p, len);
            n += 3;
            continue;
          }
          for (int64_t i = 0; i < len; ++i) {
            const T g = gr[i];
            acc_m[i] += g * (pr[i] - xr[i]);
            acc_p[i] += g * mr[i];
          }
        }
      }
      std::copy_n(acc_p, len, grad_pattern + (t * s.C + c) * s.HW + lo);
      if (s.Cm != 1 || c == s.C - 1)
        std::copy_n(acc_m, len, grad_mask + (t * s.Cm + mask_channel(s, c)) * s.HW + lo);
    }
  }

  // Each task owns whole (t, row) query images: it draws that row's mask and
  // pattern once into a scratch of O(C*H*W) and stamps all N images with them.
  // g(theta_m) and g(theta_p) are computed once per trigger (O(T*d) memory).
  // fresh: `out` was just allocated by the op (not a caller's buffer), so it
  // may be advised to use huge pages before its first touch.
  static void nes_sample_stamp(const float* x, const float* theta_m, const float* theta_p,
                               float* out, NesShape sh, bool fresh) {
    const StampShape& s = sh.s;
    const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW, rows = sh.rows();
    const int64_t bm = (dm + 3) / 4, bp = (dp + 3) / 4;
    std::vector<float> prob(s.T * dm), pat(s.T * dp);
    parallel(0, s.T, 1, [&](int64_t begin, int64_t end, auto) {
      for (int64_t e = begin * dm; e < end * dm; ++e) prob[e] = squash(theta_m[e]);
      for (int64_t e = begin * dp; e < end * dp; ++e) pat[e] = squash(theta_p[e]);
    });
    const int64_t bytes = s.T * rows * s.N * dp * static_cast<int64_t>(sizeof(float));
    if (fresh) advise_huge_pages(out, bytes);
    const bool stream = use_streaming(bytes);
    parallel(0, s.T * rows, grain_for(s.N * dp), [&](int64_t begin, int64_t end, auto isa) {
      std::vector<float> m_buf(4 * bm), p_buf(4 * bp);
      std::vector<uint32_t> words(4 * std::max(bm, bp));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / rows, row = item % rows;
        const NesRow r = nes_row(sh, row);
        const float* prob_t = prob.data() + t * dm;
        const float* pat_t = pat.data() + t * dp;
        const float* m = prob_t;
        const float* p = pat_t;
        if (r.sampled_mask) {
          draw_words<decltype(isa)::value>(sh, t, r.j, kDomainMask, 0, bm, words.data());
          masks_from_words(words.data(), prob_t, m_buf.data(), dm);
          m = m_buf.data();
        }
        if (r.sampled_pattern) {
          draw_words<decltype(isa)::value>(sh, t, r.j, kDomainPattern, 0, bp, words.data());
          float* z = p_buf.data();
          normals_from_words(words.data(), z, 4 * bp);
          const float* tp = theta_p + t * dp;
          for (int64_t e = 0; e < dp; ++e) z[e] = squash(tp[e] + sh.sigma * z[e]);
          p = z;
        }
        float* o = out + item * s.N * dp;
        for (int64_t n = 0; n < s.N; ++n) {
          for (int64_t c = 0; c < s.C; ++c) {
            const float* xr = x + (n * s.C + c) * s.HW;
            const float* mr = m + mask_channel(s, c) * s.HW;
            const float* pr = p + c * s.HW;
            write_row<decltype(isa)::value>(o + (n * s.C + c) * s.HW, s.HW, stream,
                                            [&](float* orow, int64_t lo, int64_t len) {
              for (int64_t i = 0; i < len; ++i)
                orow[i] = stamp_value(xr[lo + i], mr[lo + i], pr[lo + i]);
            });
          }
        }
      }
      if (stream) stream_fence();
    });
  }

  // Each task owns a range of blocks of 4 elements of one trigger and
  // regenerates their k samples; nothing of size k * d is ever stored.
  static constexpr int64_t kGradBlocks = 64;  // blocks per task (256 elements)

  static void nes_grad(const float* losses, const float* theta_m, const float* theta_p,
                       float* grad_m, float* grad_p, NesShape sh, bool baseline) {
    const StampShape& s = sh.s;
    const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW, rows = sh.rows();
    const int64_t bm = (dm + 3) / 4, bp = (dp + 3) / 4;
    const int64_t rm = (bm + kGradBlocks - 1) / kGradBlocks;  // mask ranges per trigger
    const int64_t rp = (bp + kGradBlocks - 1) / kGradBlocks;  // pattern ranges per trigger
    const int64_t per_t = rm + rp;
    parallel(0, s.T * per_t, grain_for(4 * kGradBlocks * sh.k), [&](int64_t begin, int64_t end,
                                                                     auto isa) {
      alignas(64) uint32_t words[4 * kGradBlocks];
      alignas(64) float prob[4 * kGradBlocks], acc[4 * kGradBlocks], v[4 * kGradBlocks];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / per_t, r = item % per_t;
        const float* F = losses + t * rows;
        if (r < rm) {
          const int64_t b0 = r * kGradBlocks, nb = std::min(kGradBlocks, bm - b0);
          const int64_t e0 = 4 * b0, ne = std::min(4 * nb, dm - e0);
          const float mean = baseline ? nes_loss_mean(F, nes_mask_column(sh, 0), sh.k) : 0.0f;
          for (int64_t e = 0; e < 4 * nb; ++e) {
            prob[e] = e < ne ? squash(theta_m[t * dm + e0 + e]) : 0.0f;
            acc[e] = 0.0f;
          }
          for (int64_t j = 0; j < sh.k; ++j) {
            draw_words<decltype(isa)::value>(sh, t, j, kDomainMask, b0, nb, words);
            masks_from_words(words, prob, v, 4 * nb);
            const float f = F[nes_mask_column(sh, j)] - mean;
            for (int64_t e = 0; e < 4 * nb; ++e) acc[e] += f * (2.0f * (v[e] - prob[e]));
          }
          for (int64_t e = 0; e < ne; ++e)
            grad_m[t * dm + e0 + e] = acc[e] / static_cast<float>(sh.k);
        } else {
          const int64_t b0 = (r - rm) * kGradBlocks, nb = std::min(kGradBlocks, bp - b0);
          const int64_t e0 = 4 * b0, ne = std::min(4 * nb, dp - e0);
          const float mean = baseline ? nes_loss_mean(F, nes_pattern_column(sh, 0), sh.k) : 0.0f;
          for (int64_t e = 0; e < 4 * nb; ++e) acc[e] = 0.0f;
          for (int64_t j = 0; j < sh.k; ++j) {
            draw_words<decltype(isa)::value>(sh, t, j, kDomainPattern, b0, nb, words);
            normals_from_words(words, v, 4 * nb);
            const float f = F[nes_pattern_column(sh, j)] - mean;
            for (int64_t e = 0; e < 4 * nb; ++e) acc[e] += f * v[e];
          }
          const float scale = static_cast<float>(sh.k) * sh.sigma;
          for (int64_t e = 0; e < ne; ++e) grad_p[t * dp + e0 + e] = acc[e] / scale;
        }
      }
    });
  }

  static void nes_samples(const float* theta_m, float* masks, float* noise, NesShape sh) {
    const StampShape& s = sh.s;
    const int64_t dm = s.Cm * s.HW, dp = s.C * s.HW;
    const int64_t bm = (dm + 3) / 4, bp = (dp + 3) / 4;
    std::vector<float> prob(s.T * dm);
    parallel(0, s.T, 1, [&](int64_t begin, int64_t end, auto) {
      for (int64_t e = begin * dm; e < end * dm; ++e) prob[e] = squash(theta_m[e]);
    });
    parallel(0, s.T * sh.k, grain_for(dm + dp), [&](int64_t begin, int64_t end, auto isa) {
      std::vector<uint32_t> words(4 * std::max(bm, bp));
      std::vector<float> v(4 * std::max(bm, bp));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / sh.k, j = item % sh.k;
        draw_words<decltype(isa)::value>(sh, t, j, kDomainMask, 0, bm, words.data());
        masks_from_words(words.data(), prob.data() + t * dm, masks + item * dm, dm);
        draw_words<decltype(isa)::value>(sh, t, j, kDomainPattern, 0, bp, words.data());
        normals_from_words(words.data(), v.data(), 4 * bp);
        std::copy_n(v.data(), dp, noise + item * dp);
      }
    });
  }

  template <typename T>
  static void pixel_stamp_forward(const T* x, const T* b_p, const T* b_n, T* out, StampShape s,
                                  T maxp, bool use_tanh) {
    const int64_t bytes = s.T * s.N * s.C * s.HW * static_cast<int64_t>(sizeof(T));
    advise_huge_pages(out, bytes);
    const bool stream = use_streaming(bytes);
    // One task per (t, c) plane: P(b_p), P(b_n) are computed once and applied to all N images.
    parallel(0, s.T * s.C, grain_for(s.N * s.HW), [&](int64_t begin, int64_t end, auto isa) {
      std::vector<T> pp(s.HW), pn(s.HW);
      for (int64_t tc = begin; tc < end; ++tc) {
        const int64_t t = tc / s.C, c = tc % s.C;
        perturbations(b_p + tc * s.HW, b_n + tc * s.HW, pp.data(), pn.data(), s.HW, maxp,
                      use_tanh);
        const T* ppr = pp.data();
        const T* pnr = pn.data();
        for (int64_t n = 0; n < s.N; ++n) {
          const T* xr = x + (n * s.C + c) * s.HW;
          write_row<decltype(isa)::value>(out + ((t * s.N + n) * s.C + c) * s.HW, s.HW, stream,
                                          [&](T* o, int64_t lo, int64_t len) {
            for (int64_t i = 0; i < len; ++i)
              o[i] = clamp_value(pixel_unclipped(xr[lo + i], ppr[lo + i], pnr[lo + i]), T(0),
                                 maxp);
          });
        }
      }
      if (stream) stream_fence();
    });
  }

  // Same task layout as stamp_backward (grad_x == nullptr: not computed).
  template <typename T>
  static void pixel_stamp_backward(const T* grad, const T* x, const T* b_p, const T* b_n,
                                   T* grad_x, T* grad_p, T* grad_n, StampShape s, T maxp,
                                   bool use_tanh) {
    if (grad_x == nullptr) {
      const int64_t chunk = trigger_chunk(s.T, s.HW);
      const int64_t chunks = (s.HW + chunk - 1) / chunk;
      parallel(0, s.T * chunks, 1, [&](int64_t begin, int64_t end, auto) {
        alignas(64) T pp[kMaxChunk], pn[kMaxChunk], acc[kMaxChunk];
        for (int64_t item = begin; item < end; ++item) {
          const int64_t t = item / chunks, lo = (item % chunks) * chunk;
          pixel_backward_rows<T, false>(lo, std::min(s.HW, lo + chunk), t, grad, x, b_p, b_n,
                                        nullptr, grad_p, grad_n, s, maxp, use_tanh, pp, pn, acc);
        }
      });
      return;
    }
    const int64_t chunk = spatial_chunk(s.HW);
    const int64_t chunks = (s.HW + chunk - 1) / chunk;
    parallel(0, chunks, 1, [&](int64_t begin, int64_t end, auto) {
      alignas(64) T pp[kMaxChunk], pn[kMaxChunk], acc[kMaxChunk];
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t lo = ch * chunk, len = std::min(s.HW, lo + chunk) - lo;
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < s.C; ++c)
            std::fill_n(grad_x + (n * s.C + c) * s.HW + lo, len, T(0));
        for (int64_t t = 0; t < s.T; ++t)
          pixel_backward_rows<T, true>(lo, lo + len, t, grad, x, b_p, b_n, grad_x, grad_p,
                                       grad_n, s, maxp, use_tanh, pp, pn, acc);
      }
    });
  }

  // Pixels lo .. hi-1 of trigger t, every channel; scratch pp, pn, acc of hi - lo.
  template <typename T, bool kWithX>
  static TS_ALWAYS_INLINE void pixel_backward_rows(int64_t lo, int64_t hi, int64_t t,
                                                   const T* grad, const T* x, const T* b_p,
                                                   const T* b_n, T* grad_x, T* grad_p,
                                                   T* grad_n, const StampShape& s, T maxp,
                                                   bool use_tanh, T* pp, T* pn, T* acc) {
    const int64_t len = hi - lo;
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t base = (t * s.C + c) * s.HW + lo;
      perturbations(b_p + base, b_n + base, pp, pn, len, maxp, use_tanh);
      std::fill_n(acc, len, T(0));
      for (int64_t n = 0; n < s.N; ++n) {
        const T* gr = grad + ((t * s.N + n) * s.C + c) * s.HW + lo;
        const T* xr = x + (n * s.C + c) * s.HW + lo;
        if constexpr (kWithX) {
          T* gxr = grad_x + (n * s.C + c) * s.HW + lo;
          for (int64_t i = 0; i < len; ++i) {
            const T passed =
                within(pixel_unclipped(xr[i], pp[i], pn[i]), T(0), maxp) ? gr[i] : T(0);
            acc[i] += passed;
            gxr[i] += passed;
          }
        } else {
          if (n + 4 <= s.N) {  // four images per sweep, as in stamp_backward_rows
            pixel_backward_4rows(gr, xr, s.C * s.HW, pp, pn, acc, len, maxp);
            n += 3;
            continue;
          }
          for (int64_t i = 0; i < len; ++i)
            acc[i] += within(pixel_unclipped(xr[i], pp[i], pn[i]), T(0), maxp) ? gr[i] : T(0);
        }
      }
      // (loops unswitched on use_tanh so that the clip branch vectorises)
      if (use_tanh) {
        for (int64_t i = 0; i < len; ++i) {
          grad_p[base + i] = acc[i] * pixel_perturbation_grad(b_p[base + i], maxp, true);
          grad_n[base + i] = -acc[i] * pixel_perturbation_grad(b_n[base + i], maxp, true);
        }
      } else {
        for (int64_t i = 0; i < len; ++i) {
          grad_p[base + i] = acc[i] * pixel_perturbation_grad(b_p[base + i], maxp, false);
          grad_n[base + i] = -acc[i] * pixel_perturbation_grad(b_n[base + i], maxp, false);
        }
      }
    }
  }

  // Channel max of each pixel of bt [C, HW] into best[0..HW), as the scalar
  // loop `best = std::max(best, bt[c][i])` for c = 1..C-1 (channel-outer, so it
  // vectorises; per pixel the same comparisons in the same order). With `arg`,
  // also the first channel holding it (a later channel wins only if greater).
  template <typename T>
  static TS_ALWAYS_INLINE void channel_max(const T* bt, int64_t C, int64_t HW, T* best,
                                           int32_t* arg) {
    std::copy_n(bt, HW, best);
    if (arg) std::fill_n(arg, HW, 0);
    for (int64_t c = 1; c < C; ++c) {
      const T* row = bt + c * HW;
      if (arg) {
        for (int64_t i = 0; i < HW; ++i) {
          const bool greater = row[i] > best[i];
          arg[i] = greater ? static_cast<int32_t>(c) : arg[i];
          best[i] = greater ? row[i] : best[i];
        }
      } else {
        for (int64_t i = 0; i < HW; ++i) best[i] = best[i] < row[i] ? row[i] : best[i];
      }
    }
  }

  // sum over pixels of max over channels of g(b / gamma), for b_p and b_n.
  template <typename T>
  static void pixel_size_loss_forward(const T* b_p, const T* b_n, T* out, StampShape s, T gamma) {
    parallel(0, s.T, 1, [&](int64_t begin, int64_t end, auto) {
      std::vector<T> v(s.HW);
      for (int64_t t = begin; t < end; ++t) {
        T total = 0;
        for (const T* b : {b_p, b_n}) {
          channel_max(b + t * s.C * s.HW, s.C, s.HW, v.data(), nullptr);
          for (int64_t i = 0; i < s.HW; ++i) v[i] = squash(v[i] / gamma);
          for (int64_t i = 0; i < s.HW; ++i) total += v[i];  // in pixel order
        }
        out[t] = total;
      }
    });
  }

  // The gradient of a channel max goes to the first channel holding it.
  template <typename T>
  static void pixel_size_loss_backward(const T* grad, const T* b_p, const T* b_n, T* grad_p,
                                       T* grad_n, StampShape s, T gamma) {
    parallel(0, 2 * s.T, 1, [&](int64_t begin, int64_t end, auto) {
      std::vector<T> best(s.HW);
      std::vector<int32_t> arg(s.HW);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item >> 1, side = item & 1;
        const T* bt = (side == 0 ? b_p : b_n) + t * s.C * s.HW;
        T* gt = (side == 0 ? grad_p : grad_n) + t * s.C * s.HW;
        channel_max(bt, s.C, s.HW, best.data(), arg.data());
        for (int64_t i = 0; i < s.HW; ++i)
          best[i] = grad[t] * squash_grad_from_value(squash(best[i] / gamma)) / gamma;
        for (int64_t c = 0; c < s.C; ++c)
          for (int64_t i = 0; i < s.HW; ++i) gt[c * s.HW + i] = arg[i] == c ? best[i] : T(0);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(trigscan, CPU, m) { register_kernels<CpuBackend>(m); }

}  // namespace trigscan
