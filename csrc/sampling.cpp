// Fused sampler for CPU: per-row temperature / top-k / top-p / min-p and inverse-CDF sampling,
// without sorting the vocabulary. Contract: ctrlsafe/ops/sampling.py (the docstring).
//
// All three filters keep the logits at or above a value threshold (x / T is monotone in x), so
// a row is: one read for max / NaN / +inf; the top-k threshold (streaming selection when k is
// small, else bisection on counts); the masses e = exp((x - max) / T) (float, ~2 ulp) and their
// sum; min-p as x >= max + T log(min_p); a lower bound on the top-p threshold from that sum
// (tightened by one multi-probe pass), and the values above the bounds compacted (a few percent
// of the row); the top-p threshold by bisection on kept mass over those; then one inverse-CDF
// walk in vocabulary order. Top-p on a whole row (the common case) never stores the row's
// masses: as each L1-sized block is exponentiated, only the values that can still be kept are
// compacted (~28% of the row), and every later pass reads those. A flat row (N(0, 1) logits at
// T 0.8 keep half the vocabulary under top-p 0.9, and ~95% of it passes that bound) goes another
// way: a 1/31 subsample brackets the cut, one tally and one compaction check the bracket on the
// whole row, and the cut is searched among the ~5% of values inside it. Masses are summed in
// double so decisions match the float64 reference except within float rounding of a boundary.
//
// Rows run in parallel (OpenMP); a batch smaller than the thread count also splits each row's
// two full passes (max and exp) over fixed chunks, combined in a fixed order, so a row's result
// never depends on B or on the thread count.

// No code here observes floating-point exceptions; without this GCC will not if-convert the
// float -> double compare/select of the exp loop, which then stays scalar.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <omp.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// One build, three instruction sets picked at load time: the hot loops below are plain loops
// that GCC auto-vectorises for each.
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

// Float sums vectorise only when GCC may reorder them; the order is then fixed by the vector
// width, so results stay deterministic on a given machine. (omp simd reductions would also
// work but keep the accumulators in memory.) Only for loops that do nothing but sum.
#if defined(__GNUC__) && !defined(__clang__)
#define REORDER_SUMS __attribute__((optimize("associative-math", "no-signed-zeros")))
#else
#define REORDER_SUMS
#endif

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 16384;  // fixed split of a row's full passes (batch invariance)
constexpr int64_t kSub = 2048;     // L1-sized block of the exp pass
constexpr int64_t kBlock = 256;    // granularity of the inverse-CDF walk
constexpr int64_t kSmall = 256;    // bracket size at which the threshold search sorts

enum DType { F32 = 0, F16 = 1, BF16 = 2 };

inline float half_to_float(uint16_t h) {
  // IEEE binary16 -> binary32 by bit manipulation (portable; not vectorised, fp16 rows are rare).
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24 is exact in float
    float f = float(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Pass 1 over [0, n): max, and whether any value is NaN or +inf. fp16/bf16 are widened into
// `out` on the way so every later pass reads floats.
struct MaxStats {
  float max = -kInf;
  float min = kInf;  // smallest finite value (the bottom of every threshold search)
  bool bad = false;
};

HOT MaxStats max_f32(const float* x, int64_t n) {
  float m = -kInf, lo = kInf;
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(min : lo) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {  // plain ternaries: GCC does not vectorise std::max here
    const float v = x[i], finite = v == -kInf ? kInf : v;
    m = m > v ? m : v;
    lo = lo < finite ? lo : finite;
    bad |= (v != v) | (v == kInf);
  }
  return {m, lo, bad != 0};
}

HOT MaxStats widen_max(const uint16_t* src, float* out, int64_t n, int dtype) {
  if (dtype == F16)
    for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(src[i]);
  return max_f32(out, n);
}

// Sum of f[0..n) in double, from float sums of 4 values in each of 16 lanes: one float add per
// value in the hot loop, relative error below 2e-7 (float e carries ~1e-7 already), and an order
// fixed by the code, not by the vector width.
HOT double sum_floats(const float* f, int64_t n) {
  constexpr int kLanes = 16;
  double lanes[kLanes] = {}, sum = 0.0;
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes)
    for (int j = 0; j < kLanes; ++j)
      lanes[j] += double((f[i + j] + f[i + kLanes + j]) + (f[i + 2 * kLanes + j] + f[i + 3 * kLanes + j]));
  for (; i < n; ++i) sum += f[i];
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// The next row this thread will sample, pulled into L2 while the exp pass of this one computes:
// a row streams in from L3 or DRAM at ~1.3 cycles per value and the exp pass computes for about
// as long, but the core does not overlap the two by itself (measured: fusing the max and exp
// passes cost their sum). The exp pass pulls one line of the next row per 64 / width values it
// computes, so the next row's max pass reads it from L2.
struct Ahead {
  const char* next = nullptr;  // the next line to pull
  const char* end = nullptr;
  int64_t width = 0;  // bytes per value
  void pull(int64_t values) {
    if (!next) return;
    const char* stop = next + std::min<int64_t>(values * width, end - next);  // never past the row
    for (; next < stop; next += 64) __builtin_prefetch(next, 0, 2);  // 2: into L2 (prefetcht1)
  }
};

// e[i] = exp((x[i] - m) * invt) as float (0 below 2^-126, x = -inf included); returns their sum
// in double. The argument is reduced in double (x * invt is not exact in float), the polynomial
// runs in float (degree 6 on |r| <= ln2/2, error below 1.5 ulp): twice the values per vector of
// an all-double exp, for ~2 ulp instead of 0.5. Branch- and call-free so every ISA vectorises it;
// the sum is taken per L1-sized block, after it is written.
HOT double exp_into(const float* x, float* e, int64_t n, float m, double invt, Ahead& ahead) {
  const double c = double(m) * invt, shifter = 0x1.8p52;  // adding 1.5 * 2^52 rounds to an integer in the low bits
  double sum = 0.0;
  for (int64_t b = 0; b < n; b += kSub) {
    const int64_t end = b + kSub < n ? b + kSub : n;
    for (int64_t step = b; step < end; step += 64) {
      ahead.pull(64);
      for (int64_t i = step; i < (step + 64 < end ? step + 64 : end); ++i) {
        const double d = double(x[i]) * invt - c;  // <= 0 (up to rounding)
        const double t = d * 1.4426950408889634 + shifter;
        const float r = float(d - (t - shifter) * 0.6931471805599453);
        float p = 1.384140342e-03f;
        p = p * r + 8.374842815e-03f;
        p = p * r + 4.166814312e-02f;
        p = p * r + 1.666641980e-01f;
        p = p * r + 4.999999106e-01f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        const uint32_t bits = (uint32_t(__builtin_bit_cast(uint64_t, t)) + 127) << 23;  // 2^k: k sits in t's low bits
        e[i] = d >= -87.0 ? p * __builtin_bit_cast(float, bits) : 0.0f;  // below, 2^k is not a normal float
      }
    }
    sum += sum_floats(e + b, end - b);
  }
  return sum;
}

// Fills e and returns its sum, chunk by chunk in a fixed order: the split-row path sums the same
// chunks on different threads and must get the same bits.
double exp_sum(const float* x, float* e, int64_t n, float m, double invt, Ahead ahead = {}) {
  double sum = 0.0;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t len = std::min(kChunk, n - begin);
    sum += exp_into(x + begin, e + begin, len, m, invt, ahead);
  }
  return sum;
}

// Sum of w over x >= v and the count of x >= v. With w == nullptr the weight is 1.
struct Tally {
  double mass;
  int64_t count;
};

REORDER_SUMS HOT Tally tally(const float* x, const float* w, int64_t n, float v) {
  double mass = 0.0;
  int64_t count = 0;
  if (w) {
    for (int64_t i = 0; i < n; ++i) {
      bool in = x[i] >= v;
      mass += in ? double(w[i]) : 0.0;
      count += in;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) count += x[i] >= v;
    mass = double(count);
  }
  return {mass, count};
}

// The sum and the sum of squares of e[0..n), in double.
REORDER_SUMS HOT std::pair<double, double> sum_and_squares(const float* e, int64_t n) {
  double sum = 0.0, squares = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = e[i];
    sum += v, squares += v * v;
  }
  return {sum, squares};
}

// Approximate mass of {e >= t[j]} for kProbes thresholds at once, in one pass: float sums per
// kBlock elements (relative error below 1e-5) added in double. Cheap enough to narrow a search
// that then finishes exactly.
constexpr int kProbes = 8;
REORDER_SUMS HOT void masses_above(const float* e, int64_t n, const float* t, double* out) {
  for (int j = 0; j < kProbes; ++j) out[j] = 0.0;  // no std:: calls: they would not inline here
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = b + kBlock < n ? b + kBlock : n;
    float s[kProbes] = {};
    for (int64_t i = b; i < end; ++i) {
      const float v = e[i];
#pragma GCC unroll 8
      for (int j = 0; j < kProbes; ++j) s[j] += v >= t[j] ? v : 0.0f;
    }
    for (int j = 0; j < kProbes; ++j) out[j] += s[j];
  }
}

// A growable array that, unlike std::vector, does not zero what it grows into (the compaction
// writes a row-sized buffer of which it uses a few percent).
template <class T>
struct Buffer {
  std::unique_ptr<T[]> data;
  int64_t capacity = 0;
  T* get(int64_t n) {
    if (n > capacity) data.reset(new T[n]), capacity = n;
    return data.get();
  }
  T* get() const { return data.get(); }
};

// The working set after a filter: the values x >= lo of a row, with their masses e (when
// already computed) and their vocabulary ids, in vocabulary order.
struct Compacted {
  Buffer<float> x, e;
  Buffer<int32_t> ids;
};

// A stretch of a row in vocabulary order: values x, masses e (or nullptr), and vocabulary ids
// (ids[i], or first + i when ids is nullptr).
struct Run {
  const float* x;
  const float* e;
  const int32_t* ids;
  int64_t first, n;
};

// Copies the i of `in` with lo <= key[i] < hi (key is in.x or in.e) to c from position `at` on,
// in order, and returns the new end; -1 once it passes `limit`. c needs room for 16 values past
// the last one kept (see reserve) and may be `in` itself (in place: each 16 values are read
// before anything is written over them). A branch per value would mispredict at the ~5-60%
// densities top-p leaves, so the vector paths move a whole vector of values per step, kept
// lanes first, and advance by the kept count; the portable loop writes every value and advances
// by the predicate. Three paths, picked once per process (compaction_path):
//   avx512  compress 16 lanes, storing only the kept ones (a full 64-byte store would almost
//           always split a cache line);
//   avx2    8 lanes permuted by a 256-entry table indexed by the compare mask, stored whole (the
//           lanes past the kept ones are overwritten by the next step); AMD EPYC before Zen 4
//           and most desktop CPUs have AVX2 but no AVX-512;
//   scalar  everything else.
// The values i.. of `in` after a vector path's last full vector, one at a time, kept from c[k] on.
int64_t compact_rest(const Run& in, const float* key, float lo, float hi, Compacted& c, int64_t i, int64_t k,
                     int64_t limit) {
  float *cx = c.x.get(), *ce = c.e.get();
  int32_t* ci = c.ids.get();
  for (; i < in.n; ++i)
    if (key[i] >= lo && key[i] < hi) {
      cx[k] = in.x[i], ci[k] = in.ids ? in.ids[i] : int32_t(in.first + i);
      if (in.e) ce[k] = in.e[i];
      ++k;
    }
  return k <= limit ? k : -1;
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) int64_t compact_avx512(const Run& in, const float* key, float lo, float hi,
                                                           Compacted& c, int64_t at, int64_t limit) {
  // locals, so the loop keeps them in registers (the stores below could alias `in`)
  const float *x = in.x, *e = in.e;
  const int32_t* ids = in.ids;
  const int64_t n = in.n;
  float *cx = c.x.get(), *ce = c.e.get();
  int32_t* ci = c.ids.get();
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int32_t(in.first)),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  int64_t k = at, i = 0;
  for (; i + 16 <= n; i += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
    const __m512 kv = _mm512_loadu_ps(key + i);
    __mmask16 keep = _mm512_cmp_ps_mask(kv, vlo, _CMP_GE_OQ);
    if (hi != kInf) keep = _mm512_mask_cmp_ps_mask(keep, kv, vhi, _CMP_LT_OQ);
    const __m512 xv = _mm512_loadu_ps(x + i);
    const __m512i iv = ids ? _mm512_loadu_si512(ids + i) : idx;
    const __m512 ev = e ? _mm512_loadu_ps(e + i) : xv;
    const int count = __builtin_popcount(keep);
    const __mmask16 low = __mmask16((1u << count) - 1);
    _mm512_mask_storeu_ps(cx + k, low, _mm512_maskz_compress_ps(keep, xv));
    _mm512_mask_storeu_epi32(ci + k, low, _mm512_maskz_compress_epi32(keep, iv));
    if (e) _mm512_mask_storeu_ps(ce + k, low, _mm512_maskz_compress_ps(keep, ev));
    k += count;
    if (k > limit) return -1;
  }
  return compact_rest(in, key, lo, hi, c, i, k, limit);
}

// For each 8-bit keep mask, the lanes to move to the front, as 8 nibbles (lane j of the result
// comes from lane (entry >> 4j) & 7): 1 KB, so it stays in L1 next to the data.
struct PermuteTable {
  uint32_t lanes[256];
  constexpr PermuteTable() : lanes() {
    for (int mask = 0; mask < 256; ++mask)
      for (int j = 0, k = 0; j < 8; ++j)
        if (mask >> j & 1) lanes[mask] |= uint32_t(j) << (4 * k++);
  }
};
constexpr PermuteTable kPermute;

__attribute__((target("avx2"))) int64_t compact_avx2(const Run& in, const float* key, float lo, float hi,
                                                       Compacted& c, int64_t at, int64_t limit) {
  const float *x = in.x, *e = in.e;
  const int32_t* ids = in.ids;
  const int64_t n = in.n;
  float *cx = c.x.get(), *ce = c.e.get();
  int32_t* ci = c.ids.get();
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const __m256i nibble = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low3 = _mm256_set1_epi32(7);
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int32_t(in.first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  int64_t k = at, i = 0;
  for (; i + 8 <= n; i += 8, idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8))) {
    const __m256 kv = _mm256_loadu_ps(key + i);
    __m256 keepv = _mm256_cmp_ps(kv, vlo, _CMP_GE_OQ);
    if (hi != kInf) keepv = _mm256_and_ps(keepv, _mm256_cmp_ps(kv, vhi, _CMP_LT_OQ));
    const int keep = _mm256_movemask_ps(keepv);
    const __m256i perm = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int32_t(kPermute.lanes[keep])), nibble), low3);
    // every load before the first store: in place, the stores reach up to 7 values past k <= i
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256i iv = ids ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ids + i)) : idx;
    const __m256 ev = e ? _mm256_loadu_ps(e + i) : xv;
    _mm256_storeu_ps(cx + k, _mm256_permutevar8x32_ps(xv, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + k), _mm256_permutevar8x32_epi32(iv, perm));
    if (e) _mm256_storeu_ps(ce + k, _mm256_permutevar8x32_ps(ev, perm));
    k += __builtin_popcount(keep);
    if (k > limit) return -1;
  }
  return compact_rest(in, key, lo, hi, c, i, k, limit);
}
#endif

int64_t compact_scalar(const Run& in, const float* key, float lo, float hi, Compacted& c, int64_t at, int64_t limit) {
  float *cx = c.x.get(), *ce = c.e.get();
  int32_t* ci = c.ids.get();
  int64_t k = at;
  for (int64_t b = 0; b < in.n; b += 1024) {
    for (int64_t i = b; i < std::min(in.n, b + 1024); ++i) {
      const bool keep = key[i] >= lo && key[i] < hi;  // read before the writes below (in place, k may equal i)
      cx[k] = in.x[i], ci[k] = in.ids ? in.ids[i] : int32_t(in.first + i);
      if (in.e) ce[k] = in.e[i];
      k += keep;
    }
    if (k > limit) return -1;
  }
  return k;
}

// An environment switch: set to anything but "" or "0".
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

enum class Compaction { avx512, avx2, scalar };

// The widest compaction this CPU runs, unless narrowed: CTRLSAFE_NO_AVX512=1 skips the AVX-512
// one, CTRLSAFE_NO_AVX2=1 the AVX2 one (tests force each that way; read once per process).
Compaction compaction_path() {
  static const Compaction path = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && !env_flag("CTRLSAFE_NO_AVX512")) return Compaction::avx512;
    if (__builtin_cpu_supports("avx2") && !env_flag("CTRLSAFE_NO_AVX2")) return Compaction::avx2;
#endif
    return Compaction::scalar;
  }();
  return path;
}

int64_t compact(const Run& in, const float* key, float lo, float hi, Compacted& c, int64_t at, int64_t limit) {
#if defined(__GNUC__) && defined(__x86_64__)
  switch (compaction_path()) {
    case Compaction::avx512: return compact_avx512(in, key, lo, hi, c, at, limit);
    case Compaction::avx2: return compact_avx2(in, key, lo, hi, c, at, limit);
    case Compaction::scalar: break;
  }
#endif
  return compact_scalar(in, key, lo, hi, c, at, limit);
}

// Which code ran, for benchmarks and tests: the target clone of the auto-vectorised loops (GCC's
// resolver picks it by CPU; no switch narrows it) and the compaction path.
std::string sampling_isa() {
  std::string clone = "portable (no target clones)";
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  clone = __builtin_cpu_supports("x86-64-v4")   ? "x86-64-v4 (AVX-512)"
          : __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3 (AVX2+FMA)"
                                                : "x86-64 baseline (SSE2)";
#endif
  const Compaction path = compaction_path();
  return "loops " + clone + ", compaction " +
         (path == Compaction::avx512 ? "avx512" : path == Compaction::avx2 ? "avx2" : "scalar");
}

// Room for a compaction that keeps at most n values into c (with masses when `masses`).
void reserve(Compacted& c, int64_t n, bool masses) {
  c.x.get(n + 16), c.ids.get(n + 16);
  if (masses) c.e.get(n + 16);
}

// One bin of flat_bracket's histogram of a row's subsample.
struct FlatBin {
  double mass, squares;  // of the sampled masses e
  int64_t count;
};

// Per-thread buffers, reused across calls (no allocation once warm).
struct Scratch {
  std::vector<float> wide, e, block_max;
  std::vector<double> later;
  Compacted cand;
  Compacted kbuf;
  Compacted bracket;
  std::vector<std::pair<float, float>> tbuf;
  std::vector<float> sample_x, sample_e;  // flat_bracket's subsample
  std::vector<FlatBin> flat_bins;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Top-p on a whole row: fills s.cand with the values that may still be kept (with masses and
// ids) and returns how many, with the sum z of all the row's masses, never writing those anywhere.
// Masses below (1 - top_p) * Z / n are never kept (see sample_row); each kSub block's masses are
// computed into L1 (or read from e_row when a split pass has them), summed, and compacted against
// that bound with Z replaced by a lower bound: the sum so far plus the masses of the later
// blocks' maxima. It rises along the row and keeps ~28% of N(0, 3^2) logits where the final bound
// keeps ~23%. Sums are associated exactly as exp_sum's, so both give the same bits.
int64_t top_p_candidates(const float* x, const float* e_row, const float* block_max, int64_t n, float m, double invt,
                         double drop, Ahead ahead, Scratch& s, double& z) {
  Compacted& c = s.cand;
  reserve(c, n, true);
  // later[i]: the mass of the maxima of the blocks after block i, a lower bound on theirs
  const int64_t nb = (n + kSub - 1) / kSub;
  std::vector<double>& later = s.later;
  later.assign(nb, 0.0);
  for (int64_t i = nb - 2; i >= 0; --i) later[i] = later[i + 1] + std::exp((double(block_max[i + 1]) - double(m)) * invt);
  float eb[kSub];
  z = 0.0;
  int64_t k = 0;
  for (int64_t chunk = 0; chunk < n; chunk += kChunk) {
    double zc = 0.0;
    for (int64_t b = chunk; b < std::min(n, chunk + kChunk); b += kSub) {
      const int64_t len = std::min(kSub, n - b);
      const float* e = e_row ? e_row + b : eb;
      zc += e_row ? sum_floats(e, len) : exp_into(x + b, eb, len, m, invt, ahead);
      // a margin of 2e-3 for float rounding against the floors sample_row derives in x
      const float lo = float(drop * (z + zc + later[b / kSub]) / double(n) * (1 - 2e-3));
      k = compact(Run{x + b, e, nullptr, b, len}, e, lo, kInf, c, k, n);
    }
    z += zc;
  }
  return k;
}

// k-th largest value of x[0..n) (1 <= k <= n), streaming: keep only values >= a running
// threshold (the k-th largest kept so far, refreshed whenever 2k + 64 are kept), so after the
// first blocks almost every 64-value block is skipped on its vectorised max, and the others are
// compacted rather than walked with a branch per value. `kept` is scratch.
HOT float kth_largest(const float* x, int64_t n, int64_t k, Compacted& kept) {
  reserve(kept, n, false);
  float* v = kept.x.get();
  int64_t count = 0, cap = 2 * k + 64;
  float thr = -kInf;
  for (int64_t b = 0; b < n; b += 64) {
    const int64_t end = std::min<int64_t>(b + 64, n);
    float bm = -kInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = b; i < end; ++i) bm = bm > x[i] ? bm : x[i];
    if (bm < thr) continue;
    count = compact(Run{x + b, nullptr, nullptr, b, end - b}, x + b, thr, kInf, kept, count, n);
    if (count >= cap) {
      std::nth_element(v, v + (k - 1), v + count, std::greater<float>());
      thr = v[k - 1];
      count = std::remove_if(v, v + count, [&](float y) { return y < thr; }) - v;
      if (count > cap / 2) cap *= 2;  // many ties at thr: grow rather than re-select often
    }
  }
  std::nth_element(v, v + (k - 1), v + count, std::greater<float>());
  return v[k - 1];
}

// Order-preserving map of floats to integers (for bisection over huge value ranges).
inline int32_t float_key(float f) {
  int32_t b;
  std::memcpy(&b, &f, 4);
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}
inline float key_float(int32_t k) {
  int32_t b = k ^ ((k >> 31) & 0x7FFFFFFF);
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// A threshold search's answer: the value tau and the weight of {x >= tau}.
struct Cut {
  float tau;
  double mass;
};

// The largest value tau of x such that the weight (w, or 1 each) of {x >= tau} reaches target,
// given a bracket: at_lo = tally at lo (mass >= target) and hi with mass(x >= hi) < target.
// Each step is one vectorised pass that moves lo or hi to a new value chosen by regula falsi on
// the mass (Illinois variant: an end kept twice has its weight gap halved, so neither end
// stalls); over a huge value range it bisects the float bit patterns instead. Once few values
// remain between lo and hi they are sorted and walked exactly.
// at_hi is the tally at hi (zero when hi is above every value).
Cut weighted_threshold(const float* x, const float* w, int64_t n, float lo, Tally at_lo, float hi, double target,
                       Scratch& s, Tally at_hi = {0.0, 0}) {
  double w_lo = at_lo.mass, w_hi = at_hi.mass;  // tallies at the ends
  double f_lo = w_lo - target, f_hi = w_hi - target;  // regula falsi values (halved by Illinois)
  int64_t c_lo = at_lo.count, c_hi = at_hi.count;
  int side = 0;  // +1 if lo moved last, -1 if hi did
  while (c_lo - c_hi > kSmall) {
    const double f = std::clamp(f_lo / (f_lo - f_hi), 1.0 / 256, 255.0 / 256);
    float mid = double(hi) - double(lo) > 1e4 ? key_float(int32_t((int64_t(float_key(lo)) + float_key(hi)) / 2))
                                              : float(double(lo) + f * (double(hi) - double(lo)));
    if (!(mid > lo && mid < hi)) mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo && mid < hi)) break;  // lo and hi are adjacent floats: only ties remain
    const Tally t = tally(x, w, n, mid);
    if (t.mass >= target) {
      lo = mid, w_lo = t.mass, c_lo = t.count, f_lo = t.mass - target;
      if (side == +1) f_hi *= 0.5;
      side = +1;
    } else {
      hi = mid, w_hi = t.mass, c_hi = t.count, f_hi = t.mass - target;
      if (side == -1) f_lo *= 0.5;
      side = -1;
    }
  }
  // the c_lo - c_hi values in [lo, hi), compacted (they are scattered over the whole array)
  reserve(s.bracket, c_lo - c_hi, w != nullptr);
  const int64_t nb = compact(Run{x, w, nullptr, 0, n}, x, lo, hi, s.bracket, 0, c_lo - c_hi);
  auto& buf = s.tbuf;
  buf.clear();
  for (int64_t i = 0; i < nb; ++i) buf.emplace_back(s.bracket.x.get()[i], w ? s.bracket.e.get()[i] : 1.0f);
  std::sort(buf.begin(), buf.end(), [](auto& a, auto& b) { return a.first > b.first; });
  double acc = w_hi;
  for (size_t i = 0; i < buf.size();) {
    size_t j = i;
    for (; j < buf.size() && buf[j].first == buf[i].first; ++j) acc += buf[j].second;
    if (acc >= target) return {buf[i].first, acc};
    i = j;
  }
  return {buf.empty() ? lo : buf.back().first, acc};  // rounding left the walk just short of target
}

struct RowParams {
  float temperature, top_p, min_p, uniform;
  int64_t top_k;
};

struct RowResult {
  int64_t token;
  float logprob;
  bool valid;
};

// Rows sampled by each top-p path since the module was loaded (_C.sampling_counters(): tests
// check that a case took the path it is meant to cover, benchmarks print them).
struct Counters {
  std::atomic<int64_t> candidates{0}, flat{0}, flat_missed{0};
};
Counters counters;

// Inverse CDF in vocabulary order over x >= tau, on masses e whose kept total is `total`: the
// first element whose running kept mass exceeds u * total. One pass that stops there: each
// kBlock block's kept mass is tallied (vectorised) and added, and only the block where the
// running mass crosses the target is walked value by value. Returns the position and its
// probability; when float rounding leaves the target unreached (u near 1), the last kept element
// with positive mass, as the reference does.
std::pair<int64_t, double> inverse_cdf(const float* x, const float* e, int64_t n, float tau, double total, double u) {
  const double target = u * total;
  double cum = 0.0;
  int64_t last = -1;  // last kept element with positive mass seen
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    const double mass = tally(x + b, e + b, end - b, tau).mass;
    if (!(mass > 0.0)) continue;
    if (cum + mass > target) {
      for (int64_t i = b; i < end; ++i) {
        if (!(x[i] >= tau) || e[i] == 0.0f) continue;
        cum += e[i];
        last = i;
        if (cum > target) return {i, double(e[i]) / total};
      }
    } else {
      cum += mass;
      for (int64_t i = end - 1; i >= b; --i)
        if (x[i] >= tau && e[i] > 0.0f) {
          last = i;
          break;
        }
    }
  }
  return {last, double(e[last]) / total};
}

// min-p as a value threshold: p >= min_p * max(p)  <=>  (x - m) / T >= log(min_p); the smallest
// float meeting it.
float min_p_floor(float m, float temperature, float min_p) {
  const double bound = double(m) + double(temperature) * std::log(double(min_p));
  float tm = float(bound);
  if (double(tm) < bound) tm = std::nextafter(tm, kInf);
  return tm;
}

// The values with e < (1 - top_p) * mass / count weigh less than (1 - top_p) * mass together, so
// the values above reach top_p already: the top-p cut is at or above that mass.
double top_p_bound(float top_p, double mass, int64_t count) { return (1.0 - double(top_p)) * mass / double(count); }

// The x at which e = theta, a little lower (so float rounding can only widen the set above it).
float mass_floor(float m, float temperature, double theta) {
  return float(double(m) + double(temperature) * (std::log(theta) - 1e-3));
}

// Flat rows. Logits ~N(0, 1) at T 0.8 under top-p 0.9 keep half the vocabulary, and the bound
// top_p_candidates derives from the row's mean mass keeps ~95% of it: every later pass over the
// candidates costs a pass over the row, and finding the cut among them several. On such rows a
// subsample brackets the cut first (flat_bracket), then sample_flat checks the bracket exactly
// and searches only inside it.
constexpr int kFlatBins = 512;       // histogram bins over the range the top-p cut can be in
constexpr double kFlatSigmas = 4.0;  // bracket half-width, in standard errors of the estimate
constexpr double kFlatMinSamples = 150;  // effective sample size (sum e)^2 / sum e^2 below which a row is not flat
constexpr int64_t kFlatSide = 16;        // samples a bracket keeps on each side of the estimated cut

// The subsample is every flat_stride(n)-th value: 1/31 of a long row, at least ~1024 values of a
// shorter one, all of a row up to 2047 values. Odd, so a row with a period of 2 or 4 (masked
// stretches, interleaved vocabularies) is sampled in every phase.
int64_t flat_stride(int64_t n) { return std::clamp<int64_t>(n / 1024, 1, 31) | 1; }

// Brackets the top-p cut of a row from its subsample: true with [lo, hi) in x when the row is
// flat, false when its mass sits on too few values for an estimate or the bracket would hold
// more than n/4 of them (a peaked row: the candidate path is cheaper there). A histogram of the
// sample's masses by (m - x) / T estimates the share of the mass above each bin edge; the cut's
// estimate is the bin where that share reaches top_p. The standard error of this ratio estimator
// there, sqrt(sum e^2 (1[x above] - top_p)^2) / sum e, times kFlatSigmas on each side places the
// ends of the bracket, which also keep kFlatSide samples on each side of the estimate (with fewer
// values there, top_p near 0 or 1, the error is not that of a sum of many). The bracket is only a
// guess: sample_flat checks it on the whole row.
bool flat_bracket(const float* x, int64_t n, float m, float temperature, double invt, double top_p, Scratch& s, float& lo,
                  float& hi) {
  const int64_t stride = flat_stride(n), ns = (n + stride - 1) / stride;
  std::vector<float>&xs = s.sample_x, &es = s.sample_e;
  xs.resize(ns), es.resize(ns);
  for (int64_t j = 0; j < ns; ++j) xs[j] = x[j * stride];
  Ahead none;
  exp_into(xs.data(), es.data(), ns, m, invt, none);
  // A standard error means little with few effective samples (a row whose mass sits on a few
  // values, sampled or not): such rows are peaked, not flat, and leave before the histogram.
  const auto [total, squares] = sum_and_squares(es.data(), ns);
  if (!(total * total >= kFlatMinSamples * squares)) return false;
  // Masses below (1 - top_p) / n are never kept (top_p_bound, with the row's mass >= 1): the bins
  // cover (m - x) / T in [0, log(n / (1 - top_p))], the last takes what is below.
  const double span = std::log(double(n) / (1.0 - top_p));
  const float per_x = float((kFlatBins - 1) / (span * double(temperature)));  // bins per unit of x
  std::vector<FlatBin>& bins = s.flat_bins;
  bins.assign(kFlatBins, FlatBin{0.0, 0.0, 0});
  for (int64_t j = 0; j < ns; ++j) {
    const float v = (m - xs[j]) * per_x;  // >= 0, +inf for x = -inf
    FlatBin& bin = bins[int(std::min(v, float(kFlatBins - 1)))];
    const double e = es[j];
    bin.mass += e, bin.squares += e * e, ++bin.count;
  }
  for (int b = 1; b < kFlatBins; ++b)  // from here on, bins[b] sums bins 0..b
    bins[b].mass += bins[b - 1].mass, bins[b].squares += bins[b - 1].squares, bins[b].count += bins[b - 1].count;
  const auto upto = [&](int b) { return b < 0 ? FlatBin{0.0, 0.0, 0} : bins[b]; };
  constexpr int last = kFlatBins - 2;  // the last bin in range
  int cut = 0;
  while (cut < last && bins[cut].mass < top_p * total) ++cut;
  const double q = 1.0 - top_p, squares_above = upto(cut - 1).squares;
  const double margin = kFlatSigmas * std::sqrt(squares_above * q * q + (squares - squares_above) * top_p * top_p) / total;
  // hi: the top edge of the first bin where the mass from the top reaches top_p - margin; lo: the
  // bottom edge of the first where it reaches top_p + margin (at the bottom of the range, which
  // no cut is below, if none does)
  int b_hi = 0, b_lo = cut;
  while (b_hi < cut && bins[b_hi].mass < (top_p - margin) * total) ++b_hi;
  while (b_hi > 0 && upto(cut - 1).count - upto(b_hi - 1).count < kFlatSide) --b_hi;
  while (b_lo < last && (bins[b_lo].mass < (top_p + margin) * total || bins[b_lo].count - bins[cut].count < kFlatSide)) ++b_lo;
  if ((bins[b_lo].count - upto(b_hi - 1).count) * stride > n / 4) return false;
  hi = b_hi == 0 ? std::nextafter(m, kInf) : float(double(m) - b_hi / double(per_x));
  lo = float(double(m) - (b_lo + 1) / double(per_x));
  return true;
}

// Top-p (with min-p, if on) on a flat row, given flat_bracket's [lo, hi): the row's masses are
// computed and kept (or taken from the split pass, with their sum z), the bracket checked exactly
// (the mass of x >= hi short of the target, that of x >= lo reaching it) in one tally and one
// compaction of the values inside it (~5% of the row), the cut searched among those only, and the
// inverse CDF run over the row in one pass. If the check fails (the subsample misjudged the row:
// ~1% of the rows near the effective-size limit, where a few values carry much of the mass, or
// an adversarial layout) the values on the side of the bracket the cut is on are compacted and
// searched.
RowResult sample_flat(const float* x, int64_t n, const RowParams& p, const MaxStats& st, const float* e_row, double z,
                      Ahead ahead, float lo, float hi, Scratch& s) {
  const float m = st.max, above_max = std::nextafter(m, kInf);
  const float* e = e_row;
  if (!e) {
    s.e.resize(n);
    z = exp_sum(x, s.e.data(), n, m, 1.0 / double(p.temperature), ahead);
    e = s.e.data();
  }
  const double target = double(p.top_p) * z;
  const Tally above = hi < above_max ? tally(x, e, n, hi) : Tally{0.0, 0};
  Compacted& c = s.cand;
  reserve(c, n, true);
  const int64_t nb = compact(Run{x, e, nullptr, 0, n}, x, lo, hi, c, 0, n);
  const Tally inside = tally(c.x.get(), c.e.get(), nb, lo);
  Cut cut;
  if (above.mass < target && above.mass + inside.mass >= target) {
    ++counters.flat;
    cut = weighted_threshold(c.x.get(), c.e.get(), nb, lo, inside, hi, target - above.mass, s);
    cut.mass += above.mass;
  } else {
    // The cut is above hi or below lo: the values on that side that can still be kept (below lo,
    // down to top_p_bound's) are compacted and searched.
    ++counters.flat_missed;
    const bool up = above.mass >= target;
    const float from = up ? hi : mass_floor(m, p.temperature, top_p_bound(p.top_p, z, n)), to = up ? kInf : lo;
    const double beyond = up ? 0.0 : above.mass + inside.mass;  // the mass above the compacted side
    const int64_t k = compact(Run{x, e, nullptr, 0, n}, x, from, to, c, 0, n);
    const Tally side = tally(c.x.get(), c.e.get(), k, from);
    cut = weighted_threshold(c.x.get(), c.e.get(), k, from, side, up ? above_max : lo, target - beyond, s);
    cut.mass += beyond;
  }
  float tau = cut.tau;
  double kept = cut.mass;
  if (p.min_p > 0.0f) {
    const float floor = min_p_floor(m, p.temperature, p.min_p);
    if (floor > tau) tau = floor, kept = tally(x, e, n, tau).mass;
  }
  auto [pos, prob] = inverse_cdf(x, e, n, tau, kept, double(p.uniform));
  return {pos, float(std::log(prob)), true};
}

// One row. `x` holds n floats (the row itself for fp32). A chunk-parallel pass may have computed
// the row's masses e_row = exp((x - max) / T) and their sum z_row already (else e_row is null).
RowResult sample_row(const float* x, int64_t n, const RowParams& p, MaxStats st, const float* block_max, const float* e_row,
                     double z_row, Ahead ahead) {
  if (st.bad || st.max == -kInf) return {-1, std::numeric_limits<float>::quiet_NaN(), false};
  Scratch& s = scratch();
  const float m = st.max, above_max = std::nextafter(m, kInf);
  if (p.temperature == 0.0f) {  // greedy: argmax (first on ties), drawn with probability 1
    int64_t tok = 0;
    while (x[tok] != m) ++tok;
    return {tok, 0.0f, true};
  }
  const double invt = 1.0 / double(p.temperature);
  const bool k_on = p.top_k > 0 && p.top_k < n;
  float lo, hi;
  if (p.top_p < 1.0f && !k_on && flat_bracket(x, n, m, p.temperature, invt, p.top_p, s, lo, hi))
    return sample_flat(x, n, p, st, e_row, z_row, ahead, lo, hi, s);

  // Working set: the whole row, or (top-k with small k) the k largest and their ties, compacted
  // in vocabulary order so every later pass reads ~k values instead of n.
  const float* wx = x;
  const int32_t* wi = nullptr;  // vocabulary ids of a compacted working set
  int64_t wn = n;
  float tau = -kInf;  // the kept set is {x >= tau}
  if (k_on && !e_row && p.top_k * 16 <= n) {
    tau = kth_largest(x, n, p.top_k, s.kbuf);
    reserve(s.cand, n, false);
    wn = compact(Run{x, nullptr, nullptr, 0, n}, x, tau, kInf, s.cand, 0, n);
    wx = s.cand.x.get(), wi = s.cand.ids.get();
  } else if (k_on) {
    const Tally finite = tally(x, nullptr, n, st.min);
    if (finite.count >= p.top_k)  // else fewer finite logits than k: top-k keeps them all
      tau = weighted_threshold(x, nullptr, n, st.min, finite, above_max, double(p.top_k), s).tau;
  }

  // Masses of the working set. Top-p on a whole row never needs most of them: only the values
  // that may still be kept are compacted, with their masses, as the masses are computed.
  const bool whole_top_p = p.top_p < 1.0f && tau == -kInf && !wi;
  const float* e = e_row;
  double z_all = z_row;
  if (whole_top_p) {
    ++counters.candidates;
    wn = top_p_candidates(x, e_row, block_max, n, m, invt, 1.0 - double(p.top_p), ahead, s, z_all);
    wx = s.cand.x.get(), e = s.cand.e.get(), wi = s.cand.ids.get();
  } else if (!e) {
    s.e.resize(wn);
    z_all = exp_sum(wx, s.e.data(), wn, m, invt, ahead);
    e = s.e.data();
  }

  // Lower bounds on the final threshold, from each filter that is on.
  float floor = tau;
  if (p.min_p > 0.0f) floor = std::max(floor, min_p_floor(m, p.temperature, p.min_p));
  double top_p_target = 0.0;
  if (p.top_p < 1.0f) {
    // The top-k survivors' mass (z_all when nothing was cut, or the working set is the survivors).
    const Tally kept = tau == -kInf || wi ? Tally{z_all, whole_top_p ? n : wn} : tally(wx, e, wn, std::max(tau, st.min));
    top_p_target = double(p.top_p) * kept.mass;
    double theta = top_p_bound(p.top_p, kept.mass, kept.count);  // the cut is at or above it
    // On a whole row, one more pass (over the candidates) raises that bound to the largest of a
    // few values spaced evenly in log e above it that still keep top_p of the mass (with a
    // margin for float sums).
    if (whole_top_p) {
      float t[kProbes];
      double above[kProbes];
      for (int j = 0; j < kProbes; ++j) t[j] = float(std::pow(theta, 1.0 - double(j + 1) / (kProbes + 1)));
      masses_above(e, wn, t, above);
      for (int j = 0; j < kProbes; ++j)
        if (above[j] >= top_p_target * (1 + 1e-4)) theta = t[j];
    }
    floor = std::max(floor, mass_floor(m, p.temperature, theta));
  }
  // Nothing below the floor is ever drawn: compact what reaches it (typically a few percent of
  // the row) in vocabulary order, so the threshold search and the inverse CDF read only that. The
  // top-p candidates are compacted in place; a whole row only when at most 1/8 of it qualifies.
  if (whole_top_p) {
    wn = compact(Run{wx, e, wi, 0, wn}, wx, floor, kInf, s.cand, 0, wn);
  } else if (!wi && floor > -kInf) {
    reserve(s.cand, wn, true);
    const int64_t kept = compact(Run{wx, e, nullptr, 0, wn}, wx, floor, kInf, s.cand, 0, wn / 8);
    if (kept >= 0) wx = s.cand.x.get(), e = s.cand.e.get(), wi = s.cand.ids.get(), wn = kept;
  }
  tau = floor;
  if (p.top_p < 1.0f) {
    const float lo = std::max(floor, st.min);
    const Tally at_lo = tally(wx, e, wn, lo);
    // Less than the target above lo means a top-k or min-p floor already cuts deeper than top-p.
    if (at_lo.mass >= top_p_target) tau = std::max(tau, weighted_threshold(wx, e, wn, lo, at_lo, above_max, top_p_target, s).tau);
  }
  const double kept = tau == -kInf ? z_all : tally(wx, e, wn, tau).mass;  // no filter: the whole row's sum
  auto [pos, prob] = inverse_cdf(wx, e, wn, tau, kept, double(p.uniform));
  return {wi ? wi[pos] : pos, float(std::log(prob)), true};
}

// A per-row parameter: an array [B], or one value for every row (ptr == nullptr).
template <class T>
struct Param {
  const T* ptr;
  T value;
  T operator[](int64_t r) const { return ptr ? ptr[r] : value; }
};

struct Batch {
  const char* logits;
  int dtype;
  int64_t B, V, row_stride;  // stride in elements
  Param<float> temperature, top_p, min_p, uniforms;
  Param<int64_t> top_k;
  int64_t* tokens;
  float* logprobs;
  bool* valid;

  RowParams params(int64_t r) const { return {temperature[r], top_p[r], min_p[r], uniforms[r], top_k[r]}; }
  int64_t width() const { return dtype == F32 ? 4 : 2; }
  const void* row(int64_t r) const { return logits + r * row_stride * width(); }
  Ahead ahead(int64_t r) const {  // row r's bytes (none past the last row)
    if (r >= B) return {};
    const char* p = static_cast<const char*>(row(r));
    return {p, p + V * width(), width()};
  }
  void write(int64_t r, RowResult res) const { tokens[r] = res.token, logprobs[r] = res.logprob, valid[r] = res.valid; }
};

// The max stats of row r's values [begin, end) (begin a multiple of kSub), and the max of each
// kSub block in block_max[begin / kSub ...]. 16-bit rows are widened into wide[begin, end).
MaxStats scan(const Batch& b, int64_t r, int64_t begin, int64_t end, float* wide, float* block_max) {
  MaxStats st;
  for (int64_t i = begin; i < end; i += kSub) {
    const int64_t len = std::min(kSub, end - i);
    const MaxStats bs = b.dtype == F32 ? max_f32(static_cast<const float*>(b.row(r)) + i, len)
                                       : widen_max(static_cast<const uint16_t*>(b.row(r)) + i, wide + i, len, b.dtype);
    block_max[i / kSub] = bs.max;
    st.max = std::max(st.max, bs.max), st.min = std::min(st.min, bs.min), st.bad |= bs.bad;
  }
  return st;
}

void run_rows(const Batch& b, int threads) {
  // Rows are handed out one at a time (their cost varies with their parameters); each thread
  // claims its next row before sampling the current one, so it can pull it in meanwhile.
  std::atomic<int64_t> claimed{0};
  // Waking a thread team costs more than sampling a short row alone.
#pragma omp parallel num_threads(threads) if (threads > 1 && b.B * b.V >= (1 << 16))
  {
    Scratch& s = scratch();
    for (int64_t r = claimed++, next; r < b.B; r = next) {
      next = claimed++;
      if (b.dtype != F32) s.wide.resize(b.V);
      s.block_max.resize((b.V + kSub - 1) / kSub);
      const MaxStats st = scan(b, r, 0, b.V, s.wide.data(), s.block_max.data());
      const float* x = b.dtype == F32 ? static_cast<const float*>(b.row(r)) : s.wide.data();
      b.write(r, sample_row(x, b.V, b.params(r), st, s.block_max.data(), nullptr, 0.0, b.ahead(next)));
    }
  }
}

// Few rows, long vocabulary: the max and exp passes of each row are split over threads in
// fixed chunks; the rest (threshold passes over an L2-resident row) stays on one thread.
void run_split(const Batch& b) {
  const int64_t nc = (b.V + kChunk - 1) / kChunk;
  std::vector<float> wide(b.dtype == F32 ? 0 : b.V), e(b.V), block_max((b.V + kSub - 1) / kSub);
  std::vector<MaxStats> cst(nc);
  std::vector<double> csum(nc);
  for (int64_t r = 0; r < b.B; ++r) {
    const RowParams p = b.params(r);
    const float* x = b.dtype == F32 ? static_cast<const float*>(b.row(r)) : wide.data();
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t begin = c * kChunk, end = std::min(b.V, begin + kChunk);
      cst[c] = scan(b, r, begin, end, wide.data(), block_max.data());
    }
    MaxStats st;
    for (const MaxStats& c : cst) st.max = std::max(st.max, c.max), st.min = std::min(st.min, c.min), st.bad |= c.bad;
    // The exp pass pays off in parallel unless top-k (small k) will skip it.
    const bool k_small = p.temperature != 0.0f && p.top_k > 0 && p.top_k * 16 <= b.V;
    const bool do_exp = !st.bad && st.max != -kInf && !k_small && p.temperature != 0.0f;  // greedy needs no masses
    double z = 0.0;
    if (do_exp) {
      const double invt = p.temperature == 0.0f ? 1.0 : 1.0 / double(p.temperature);
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t begin = c * kChunk, end = std::min(b.V, begin + kChunk);
        csum[c] = exp_sum(x + begin, e.data() + begin, end - begin, st.max, invt);
      }
      for (double c : csum) z += c;
    }
    b.write(r, sample_row(x, b.V, p, st, block_max.data(), do_exp ? e.data() : nullptr, z, Ahead{}));
  }
}

template <class T>
Param<T> param(uintptr_t ptr, double value) {
  return {reinterpret_cast<const T*>(ptr), T(value)};
}

void sample_rows(uintptr_t logits, int dtype, int64_t B, int64_t V, int64_t row_stride, uintptr_t temperature,
                 double temperature_value, uintptr_t top_k, int64_t top_k_value, uintptr_t top_p, double top_p_value,
                 uintptr_t min_p, double min_p_value, uintptr_t uniforms, double uniform_value, uintptr_t tokens,
                 uintptr_t logprobs, uintptr_t valid) {
  const Batch b{reinterpret_cast<const char*>(logits), dtype, B, V, row_stride,
                param<float>(temperature, temperature_value), param<float>(top_p, top_p_value),
                param<float>(min_p, min_p_value), param<float>(uniforms, uniform_value),
                {reinterpret_cast<const int64_t*>(top_k), top_k_value}, reinterpret_cast<int64_t*>(tokens),
                reinterpret_cast<float*>(logprobs), reinterpret_cast<bool*>(valid)};
  if (V > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("sample_rows: vocabulary size " + std::to_string(V) + " exceeds 2^31 - 1");
  pybind11::gil_scoped_release release;
  const int threads = omp_get_max_threads();
  if (B < threads && V >= 4 * kChunk)
    run_split(b);
  else
    run_rows(b, int(std::min<int64_t>(threads, B)));
}

// The counter-based RNG of ctrlsafe.sampling.counter_uniforms (its docstring is the spec; its
// torch form serves other devices): murmur3's fmix32 chained over the 32-bit words of seed and
// step, top 24 bits / 2^24.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

float counter_uniform(int64_t seed, int64_t step) {
  const uint64_t s = uint64_t(seed), t = uint64_t(step);
  uint32_t h = 0x9E3779B9u;
  for (uint32_t word : {uint32_t(s), uint32_t(s >> 32), uint32_t(t), uint32_t(t >> 32)}) h = fmix32(h ^ word);
  return float(h >> 8) * (1.0f / (1 << 24));
}

void counter_uniforms(uintptr_t seed, int64_t seed_value, uintptr_t step, int64_t step_value, int64_t B,
                      uintptr_t out) {
  const Param<int64_t> seeds{reinterpret_cast<const int64_t*>(seed), seed_value};
  const Param<int64_t> steps{reinterpret_cast<const int64_t*>(step), step_value};
  float* u = reinterpret_cast<float*>(out);
  for (int64_t r = 0; r < B; ++r) u[r] = counter_uniform(seeds[r], steps[r]);
}

}  // namespace

void register_sampling(pybind11::module_& m) {
  using pybind11::arg;
  m.def("counter_uniform", &counter_uniform, "The uniform in [0,1) of (seed, step).", arg("seed"), arg("step"));
  m.def("counter_uniforms", &counter_uniforms,
        "Uniforms of B rows into float32 out; seed and step are int64 data pointers, or 0 with one value for "
        "every row next to it.",
        arg("seed"), arg("seed_value"), arg("step"), arg("step_value"), arg("B"), arg("out"));
  m.def("sample_rows", &sample_rows,
        "Fused sampler over logits [B,V] (row-contiguous, by data pointer; dtype 0=f32 1=f16 2=bf16; row "
        "stride in elements). Each parameter is a data pointer to B values (float32; int64 for top_k) or 0 "
        "with the value for every row next to it. Writes int64 tokens, float32 logprobs, bool valid.",
        arg("logits"), arg("dtype"), arg("B"), arg("V"), arg("row_stride"), arg("temperature"),
        arg("temperature_value"), arg("top_k"), arg("top_k_value"), arg("top_p"), arg("top_p_value"), arg("min_p"),
        arg("min_p_value"), arg("uniforms"), arg("uniform_value"), arg("tokens"), arg("logprobs"), arg("valid"));
  m.def("sampling_isa", &sampling_isa,
        "The code sample_rows runs on this CPU: the target clone of its loops and its compaction path (avx512, "
        "avx2 or scalar; CTRLSAFE_NO_AVX512=1 / CTRLSAFE_NO_AVX2=1 narrow it).");
  m.def(
      "sampling_counters",
      []() {
        return pybind11::dict(pybind11::arg("candidates") = counters.candidates.load(),
                              pybind11::arg("flat") = counters.flat.load(),
                              pybind11::arg("flat_missed") = counters.flat_missed.load());
      },
      "Rows sampled by each top-p path since load: candidates (bound + compaction as masses are computed), flat "
      "(subsample bracket, checked), flat_missed (the check failed: search on the side of the bracket the cut is on).");
  m.def("flat_stride", &flat_stride, "The stride of the subsample that brackets a flat row's top-p cut (V values).",
        arg("V"));
}
