// Fused sampler for CPU: per-row temperature / top-k / top-p / min-p and inverse-CDF sampling,
// without sorting the vocabulary. Contract: ctrlsafe/ops/sampling.py (the docstring).
//
// All three filters keep the logits at or above a value threshold (x / T is monotone in x), so
// a row is: one read for max / NaN / +inf; the top-k threshold (streaming selection when k is
// small, else bisection on counts); e = exp((x - max) / T) once into a per-thread buffer, with
// its sum; min-p as x >= max + T log(min_p); a lower bound on the top-p threshold from that sum
// (tightened by one multi-probe pass), and the values above the bounds compacted (a few percent
// of the row); the top-p threshold by bisection on kept mass over those; then one inverse-CDF
// walk in vocabulary order. Masses are summed in double so decisions match the float64
// reference except within float rounding of a boundary.
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

// e[i] = exp((x[i] - m) * invt) as float (0 where that underflows); returns their sum in double.
// Computed in double (degree-8 polynomial on |r| <= ln2/2, relative error ~2e-10) so e is
// correctly rounded to float for any temperature; written without branches or calls so every
// ISA vectorises it.
HOT double exp_into(const float* x, float* e, int64_t n, float m, double invt) {
  const double md = m, shifter = 0x1.8p52;  // adding 1.5 * 2^52 rounds to an integer in the low bits
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    // <= 0; clamped where exp underflows float (x = -inf included) so the result rounds to 0
    const double d = (double(x[i]) - md) * invt, a = d > -110.0 ? d : -110.0;
    const double t = a * 1.4426950408889634 + shifter;
    const double k = t - shifter;
    const double r = (a - k * 0.693145751953125) - k * 1.4286068203094173e-06;  // ln2 in two parts
    double p = 1.0 / 40320;
    p = p * r + 1.0 / 5040;
    p = p * r + 1.0 / 720;
    p = p * r + 1.0 / 120;
    p = p * r + 1.0 / 24;
    p = p * r + 1.0 / 6;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t bits = (__builtin_bit_cast(int64_t, t) + 1023) << 52;  // 2^k: k sits in t's low bits
    const float ei = float(p * __builtin_bit_cast(double, bits));
    e[i] = ei;
    sum += double(ei);
  }
  return sum;
}

// Fills e and returns its sum, chunk by chunk in a fixed order: the split-row path sums the same
// chunks on different threads and must get the same bits.
double exp_sum(const float* x, float* e, int64_t n, float m, double invt) {
  double sum = 0.0;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t len = std::min(kChunk, n - begin);
    sum += exp_into(x + begin, e + begin, len, m, invt);
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

// Kept mass (x >= tau) of each block of kBlock elements.
void block_mass(const float* x, const float* e, int64_t n, float tau, double* out) {
  for (int64_t b = 0; b * kBlock < n; ++b) out[b] = tally(x + b * kBlock, e + b * kBlock, std::min(kBlock, n - b * kBlock), tau).mass;
}

// Appends to `out` every i with lo <= x[i] < hi, in order. A vectorised count per 64-block
// skips the blocks without a hit, so a sparse selection costs about one read.
HOT void indices_in(const float* x, int64_t n, float lo, float hi, std::vector<int64_t>& out) {
  for (int64_t b = 0; b < n; b += 64) {
    const int64_t end = std::min<int64_t>(b + 64, n);
    int hits = 0;
    for (int64_t i = b; i < end; ++i) hits += (x[i] >= lo) & (x[i] < hi);
    if (hits == 0) continue;
    for (int64_t i = b; i < end; ++i)
      if (x[i] >= lo && x[i] < hi) out.push_back(i);
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
  int64_t n = 0;
};

// Fills c with the x[i] >= lo of x[0..n) (and e[i] if e != nullptr); false, leaving c unusable,
// once more than `limit` qualify. A branch per value would mispredict at the ~5-20% densities
// top-p leaves, so AVX-512 compresses 16 values per step and other CPUs write every value and
// advance by the predicate.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) bool compact_avx512(const float* x, const float* e, int64_t n, float lo,
                                                        int64_t limit, Compacted& c) {
  float *cx = c.x.get(n + 16), *ce = e ? c.e.get(n + 16) : nullptr;
  int32_t* ci = c.ids.get(n + 16);
  const __m512 vlo = _mm512_set1_ps(lo);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t k = 0, i = 0;
  for (; i + 16 <= n; i += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 in = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ);
    _mm512_storeu_ps(cx + k, _mm512_maskz_compress_ps(in, v));
    _mm512_storeu_si512(ci + k, _mm512_maskz_compress_epi32(in, idx));
    if (ce) _mm512_storeu_ps(ce + k, _mm512_maskz_compress_ps(in, _mm512_loadu_ps(e + i)));
    k += __builtin_popcount(in);
    if (k > limit) return false;
  }
  for (; i < n; ++i)
    if (x[i] >= lo) cx[k] = x[i], ci[k] = int32_t(i), ce ? ce[k] = e[i] : 0.0f, ++k;
  c.n = k;
  return k <= limit;
}
#endif

bool compact_scalar(const float* x, const float* e, int64_t n, float lo, int64_t limit, Compacted& c) {
  float *cx = c.x.get(n + 1), *ce = e ? c.e.get(n + 1) : nullptr;
  int32_t* ci = c.ids.get(n + 1);
  int64_t k = 0;
  for (int64_t b = 0; b < n; b += 1024) {
    for (int64_t i = b; i < std::min(n, b + 1024); ++i) {
      cx[k] = x[i], ci[k] = int32_t(i);
      if (ce) ce[k] = e[i];
      k += x[i] >= lo;
    }
    if (k > limit) return false;
  }
  c.n = k;
  return true;
}

bool compact(const float* x, const float* e, int64_t n, float lo, int64_t limit, Compacted& c) {
#if defined(__GNUC__) && defined(__x86_64__)
  // CTRLSAFE_NO_AVX512=1 forces the portable loop (tests run it that way too)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && !std::getenv("CTRLSAFE_NO_AVX512");
  if (avx512) return compact_avx512(x, e, n, lo, limit, c);
#endif
  return compact_scalar(x, e, n, lo, limit, c);
}

// Per-thread buffers, reused across calls (no allocation once warm).
struct Scratch {
  std::vector<float> wide, e;
  Compacted cand;
  std::vector<double> blocks;
  std::vector<float> kbuf;
  std::vector<std::pair<float, float>> tbuf;
  std::vector<int64_t> tidx;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// k-th largest value of x[0..n) (1 <= k <= n), streaming: keep only values >= a running
// threshold (the k-th largest seen so far, refreshed whenever 2k + 64 values are buffered), so
// after the first blocks almost every block is skipped on its vectorised max.
HOT float kth_largest(const float* x, int64_t n, int64_t k, std::vector<float>& buf) {
  buf.clear();
  size_t cap = 2 * size_t(k) + 64;
  float thr = -kInf;
  for (int64_t b = 0; b < n; b += 64) {
    const int64_t end = std::min<int64_t>(b + 64, n);
    float bm = -kInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = b; i < end; ++i) bm = bm > x[i] ? bm : x[i];
    if (bm < thr) continue;
    for (int64_t i = b; i < end; ++i)
      if (x[i] >= thr) buf.push_back(x[i]);
    if (buf.size() >= cap) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
      thr = buf[k - 1];
      buf.erase(std::remove_if(buf.begin(), buf.end(), [&](float v) { return v < thr; }), buf.end());
      if (buf.size() > cap / 2) cap *= 2;  // many ties at thr: grow rather than re-select often
    }
  }
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
  return buf[k - 1];
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

// The largest value tau of x such that the weight (w, or 1 each) of {x >= tau} reaches target,
// given a bracket: at_lo = tally at lo (mass >= target) and hi with mass(x >= hi) < target.
// Each step is one vectorised pass that moves lo or hi to a new value chosen by regula falsi on
// the mass (Illinois variant: an end kept twice has its weight gap halved, so neither end
// stalls); over a huge value range it bisects the float bit patterns instead. Once few values
// remain between lo and hi they are sorted and walked exactly.
float weighted_threshold(const float* x, const float* w, int64_t n, float lo, Tally at_lo, float hi, double target,
                         Scratch& s) {
  double w_lo = at_lo.mass, w_hi = 0.0;  // tallies at the ends
  double f_lo = w_lo - target, f_hi = -target;  // regula falsi values (halved by Illinois)
  int64_t c_lo = at_lo.count, c_hi = 0;
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
  s.tidx.clear();
  indices_in(x, n, lo, hi, s.tidx);
  auto& buf = s.tbuf;
  buf.clear();
  for (int64_t i : s.tidx) buf.emplace_back(x[i], w ? w[i] : 1.0f);
  std::sort(buf.begin(), buf.end(), [](auto& a, auto& b) { return a.first > b.first; });
  double acc = w_hi;
  for (size_t i = 0; i < buf.size();) {
    size_t j = i;
    for (; j < buf.size() && buf[j].first == buf[i].first; ++j) acc += buf[j].second;
    if (acc >= target) return buf[i].first;
    i = j;
  }
  return buf.empty() ? lo : buf.back().first;  // rounding left the walk just short of target
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


// Inverse CDF in vocabulary order over x >= tau, on masses e: the first element whose running
// kept mass exceeds u * (kept mass). Returns the position and its probability.
std::pair<int64_t, double> inverse_cdf(const float* x, const float* e, int64_t n, float tau, double u,
                                       std::vector<double>& blocks) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  blocks.resize(nb);
  block_mass(x, e, n, tau, blocks.data());
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) total += blocks[b];
  const double target = u * total;
  double cum = 0.0;
  int64_t last = -1;  // last kept element with positive mass seen (rounding fallback)
  for (int64_t b = 0; b < nb; ++b) {
    if (blocks[b] > 0) {
      if (cum + blocks[b] > target) {
        for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
          if (!(x[i] >= tau) || e[i] == 0.0f) continue;
          cum += e[i];
          last = i;
          if (cum > target) return {i, double(e[i]) / total};
        }
      } else {
        cum += blocks[b];
        for (int64_t i = std::min(n, (b + 1) * kBlock) - 1; i >= b * kBlock; --i)
          if (x[i] >= tau && e[i] > 0.0f) {
            last = i;
            break;
          }
      }
    }
  }
  return {last, double(e[last]) / total};
}

// One row. `x` holds n floats (the row itself for fp32). max_stats / e_sum may have been
// computed already by a chunk-parallel pass (e_ready).
RowResult sample_row(const float* x, int64_t n, const RowParams& p, MaxStats st, bool e_ready, double z_all) {
  if (st.bad || st.max == -kInf) return {-1, std::numeric_limits<float>::quiet_NaN(), false};
  Scratch& s = scratch();
  const float m = st.max, above_max = std::nextafter(m, kInf);
  if (p.temperature == 0.0f) {  // greedy: argmax (first on ties), untempered log-softmax
    int64_t tok = 0;
    while (x[tok] != m) ++tok;
    if (!e_ready) {
      s.e.resize(n);
      z_all = exp_sum(x, s.e.data(), n, m, 1.0);
    }
    return {tok, float(-std::log(z_all)), true};
  }
  const double invt = 1.0 / double(p.temperature);

  // Working set: the whole row, or (top-k with small k) the k largest and their ties, compacted
  // in vocabulary order so every later pass reads ~k values instead of n.
  const float* wx = x;
  const int32_t* wi = nullptr;  // vocabulary ids of a compacted working set
  int64_t wn = n;
  float tau = -kInf;  // the kept set is {x >= tau}
  const bool k_on = p.top_k > 0 && p.top_k < n;
  if (k_on && !e_ready && p.top_k * 16 <= n) {
    tau = kth_largest(x, n, p.top_k, s.kbuf);
    compact(x, nullptr, n, tau, n, s.cand);
    wx = s.cand.x.get(), wi = s.cand.ids.get(), wn = s.cand.n;
    e_ready = false;
  } else if (k_on) {
    const Tally finite = tally(x, nullptr, n, st.min);
    if (finite.count >= p.top_k)  // else fewer finite logits than k: top-k keeps them all
      tau = weighted_threshold(x, nullptr, n, st.min, finite, above_max, double(p.top_k), s);
  }
  if (!e_ready) {
    s.e.resize(wn);
    z_all = exp_sum(wx, s.e.data(), wn, m, invt);
  }
  const float* e = s.e.data();

  // Lower bounds on the final threshold, from each filter that is on.
  float floor = tau;
  if (p.min_p > 0.0f) {
    // p >= min_p * max(p)  <=>  (x - m) / T >= log(min_p): the smallest float meeting it.
    const double bound = double(m) + double(p.temperature) * std::log(double(p.min_p));
    float tm = float(bound);
    if (double(tm) < bound) tm = std::nextafter(tm, kInf);
    floor = std::max(floor, tm);
  }
  double top_p_target = 0.0;
  if (p.top_p < 1.0f) {
    // The top-k survivors' mass (z_all when nothing was cut, or the working set is the survivors).
    const Tally kept = tau == -kInf || wi ? Tally{z_all, wn} : tally(wx, e, wn, std::max(tau, st.min));
    top_p_target = double(p.top_p) * kept.mass;
    // The values with e < (1 - top_p) * mass / count weigh less than (1 - top_p) * mass together,
    // so the values above reach top_p already: the cut is at or above that bound (taken a little
    // lower in x, so float rounding can only widen the set).
    double theta = (1.0 - double(p.top_p)) * kept.mass / double(kept.count);
    // On the whole row, one more pass raises that bound to the largest of a few values spaced
    // evenly in log e above it that still keep top_p of the mass (with a margin for float sums).
    if (!wi && tau == -kInf) {
      float t[kProbes];
      double above[kProbes];
      for (int j = 0; j < kProbes; ++j) t[j] = float(std::pow(theta, 1.0 - double(j + 1) / (kProbes + 1)));
      masses_above(e, wn, t, above);
      for (int j = 0; j < kProbes; ++j)
        if (above[j] >= top_p_target * (1 + 1e-4)) theta = t[j];
    }
    floor = std::max(floor, float(double(m) + double(p.temperature) * (std::log(theta) - 1e-3)));
  }
  // Nothing below the floor is ever drawn: when few values reach it (typically a few hundred of
  // a 128k vocabulary), compact them in vocabulary order so the threshold search and the inverse
  // CDF read those instead of the row.
  if (!wi && floor > -kInf) {
    if (compact(wx, e, wn, floor, wn / 8, s.cand))
      wx = s.cand.x.get(), e = s.cand.e.get(), wi = s.cand.ids.get(), wn = s.cand.n;
  }
  tau = floor;
  if (p.top_p < 1.0f) {
    const float lo = std::max(floor, st.min);
    const Tally at_lo = tally(wx, e, wn, lo);
    // Less than the target above lo means a top-k or min-p floor already cuts deeper than top-p.
    if (at_lo.mass >= top_p_target)
      tau = std::max(tau, weighted_threshold(wx, e, wn, lo, at_lo, above_max, top_p_target, s));
  }
  auto [pos, prob] = inverse_cdf(wx, e, wn, tau, double(p.uniform), s.blocks);
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
  const void* row(int64_t r) const { return logits + r * row_stride * (dtype == F32 ? 4 : 2); }
  void write(int64_t r, RowResult res) const { tokens[r] = res.token, logprobs[r] = res.logprob, valid[r] = res.valid; }
};

// The row as floats: in place for fp32, widened into `wide` otherwise; returns max stats.
const float* row_floats(const Batch& b, int64_t r, int64_t begin, int64_t end, std::vector<float>& wide, MaxStats& st) {
  if (b.dtype == F32) {
    const float* x = static_cast<const float*>(b.row(r));
    st = max_f32(x + begin, end - begin);
    return x;
  }
  wide.resize(b.V);
  st = widen_max(static_cast<const uint16_t*>(b.row(r)) + begin, wide.data() + begin, end - begin, b.dtype);
  return wide.data();
}

void run_rows(const Batch& b, int threads) {
  // Waking a thread team costs more than sampling a short row alone.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && b.B * b.V >= (1 << 16))
  for (int64_t r = 0; r < b.B; ++r) {
    Scratch& s = scratch();
    MaxStats st;
    const float* x = row_floats(b, r, 0, b.V, s.wide, st);
    b.write(r, sample_row(x, b.V, b.params(r), st, false, 0.0));
  }
}

// Few rows, long vocabulary: the max and exp passes of each row are split over threads in
// fixed chunks; the rest (threshold passes over an L2-resident row) stays on one thread.
void run_split(const Batch& b) {
  const int64_t nc = (b.V + kChunk - 1) / kChunk;
  std::vector<float> wide(b.dtype == F32 ? 0 : b.V), e(b.V);
  std::vector<MaxStats> cst(nc);
  std::vector<double> csum(nc);
  for (int64_t r = 0; r < b.B; ++r) {
    const RowParams p = b.params(r);
    const float* x = b.dtype == F32 ? static_cast<const float*>(b.row(r)) : wide.data();
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t begin = c * kChunk, end = std::min(b.V, begin + kChunk);
      if (b.dtype == F32)
        cst[c] = max_f32(x + begin, end - begin);
      else
        cst[c] = widen_max(static_cast<const uint16_t*>(b.row(r)) + begin, wide.data() + begin, end - begin, b.dtype);
    }
    MaxStats st;
    for (const MaxStats& c : cst) st.max = std::max(st.max, c.max), st.min = std::min(st.min, c.min), st.bad |= c.bad;
    // The exp pass pays off in parallel unless top-k (small k) will skip it.
    const bool k_small = p.temperature != 0.0f && p.top_k > 0 && p.top_k * 16 <= b.V;
    const bool do_exp = !st.bad && st.max != -kInf && !k_small;
    double z = 0.0;
    if (do_exp) {
      const double invt = p.temperature == 0.0f ? 1.0 : 1.0 / double(p.temperature);
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t begin = c * kChunk, end = std::min(b.V, begin + kChunk);
        csum[c] = exp_sum(x + begin, e.data() + begin, end - begin, st.max, invt);
      }
      for (double c : csum) z += c;
      scratch().e.swap(e);
    }
    b.write(r, sample_row(x, b.V, p, st, do_exp, z));
    if (do_exp) scratch().e.swap(e);
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
}
