// Fused T=1 decode attention of ctrlsafe.kv_cache.PrefixCache (CPU). Contract: the docstring of
// PrefixCache._attend_decode; the torch path of PrefixCache.attend is the reference.
//
// For each batch row r and kv head h (one OpenMP task each): write the new token's K/V at the
// row's offset in its slot, then for the g = Hq / Hkv query heads of h attend over
//   [prefix keys 0..prefix_len[p]-1 of the row's prompt p | the row's suffix keys 0..offset]
// with one softmax over the concatenation (scores kept in a per-thread buffer, max, exp, sum,
// weighted sum of V): no partial attentions and no log-sum-exp merge. Each key/value vector is
// read once per task for all g query heads; fp32 accumulation; storage fp32 or bf16.
// Consecutive tasks are consecutive (row, head) pairs, so rows of one prompt (adjacent in the
// engine's batches) reuse that prompt's prefix keys from the thread's L1/L2.
//
// ISA: one build, the per-task function compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA)
// and baseline, chosen at load time (target_clones, as csrc/sampling.cpp); plain loops that GCC
// vectorises for each.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <omp.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define HAVE_CLONES 1
#else
#define HOT
#define HAVE_CLONES 0
#endif

#if defined(__GNUC__)
#define INLINE __attribute__((always_inline)) inline
#else
#define INLINE inline
#endif

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

enum DType { F32 = 0, BF16 = 2 };  // codes as in ctrlsafe/ops/sampling.py

struct Args {
  const char* q;  // [R,Hq,D] (element strides q_sr, q_sh; d contiguous)
  int64_t q_sr, q_sh;
  const char *kn, *vn;  // new token's K/V [R,Hkv,D] (strides kn_sr, kn_sh / vn_sr, vn_sh)
  int64_t kn_sr, kn_sh, vn_sr, vn_sh;
  const char *pk, *pv;  // prefix K/V [P,Hkv,Lp,D] contiguous
  char *rk, *rv;        // row K/V [S,Hkv,Ls,D] contiguous
  char* out;            // [R,Hq,D] contiguous, storage dtype
  const int64_t *slot, *prompt, *plen, *off;  // per batch row (validated)
  int64_t Hq, Hkv, D, Lp, Ls;
  float scale;
  bool write;
};

INLINE float bf16_to_float(uint16_t h) { return __builtin_bit_cast(float, uint32_t(h) << 16); }

INLINE uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN (as torch)
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

template <class T>
INLINE float to_float(T x) {
  if constexpr (sizeof(T) == 4)
    return x;
  else
    return bf16_to_float(x);
}

// A key/value vector as floats: the storage itself (fp32) or widened into buf (bf16).
template <class T, int DC>
INLINE const float* as_floats(const T* src, float* buf, int64_t D) {
  if constexpr (sizeof(T) == 4) {
    return src;
  } else {
    const int64_t n = DC ? DC : D;
    for (int64_t d = 0; d < n; ++d) buf[d] = bf16_to_float(src[d]);
    return buf;
  }
}

// e = exp(x) for x <= 0 in float: range reduction by ln2, degree-6 polynomial (~2 ulp), 0 below
// -87 (and for -inf). Branch- and call-free so every ISA vectorises it.
INLINE float exp_nonpos(float x) {
  const float shifter = 0x1.8p23f;
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504f + shifter;
  const float k = t - shifter;
  const float r = (xc - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.384140342e-03f;
  p = p * r + 8.374842815e-03f;
  p = p * r + 4.166814312e-02f;
  p = p * r + 1.666641980e-01f;
  p = p * r + 4.999999106e-01f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = (__builtin_bit_cast(uint32_t, t) + 127u) << 23;  // 2^k: k in t's low bits
  return x >= -87.0f ? p * __builtin_bit_cast(float, bits) : 0.0f;
}

// One (row, kv head) task. scratch holds g*D (q) + D (widened vector) + g*D (acc) + g*n (scores).
template <class T, int DC>
INLINE void task_impl(const Args& a, int64_t task, std::vector<float>& scratch) {
  const int64_t D = DC ? DC : a.D, Hkv = a.Hkv, g = a.Hq / Hkv;
  const int64_t r = task / Hkv, h = task % Hkv;
  const int64_t slot = a.slot[r], p = a.prompt[r], plen = a.plen[r], off = a.off[r];
  const T* pk = reinterpret_cast<const T*>(a.pk) + (p * Hkv + h) * a.Lp * D;
  const T* pv = reinterpret_cast<const T*>(a.pv) + (p * Hkv + h) * a.Lp * D;
  T* rk = reinterpret_cast<T*>(a.rk) + (slot * Hkv + h) * a.Ls * D;
  T* rv = reinterpret_cast<T*>(a.rv) + (slot * Hkv + h) * a.Ls * D;
  if (a.write) {
    const T* kn = reinterpret_cast<const T*>(a.kn) + r * a.kn_sr + h * a.kn_sh;
    const T* vn = reinterpret_cast<const T*>(a.vn) + r * a.vn_sr + h * a.vn_sh;
    std::memcpy(rk + off * D, kn, D * sizeof(T));
    std::memcpy(rv + off * D, vn, D * sizeof(T));
  }
  const int64_t ns = off + 1, n = plen + ns;
  if (int64_t(scratch.size()) < g * (2 * D + n) + D) scratch.resize(g * (2 * D + n) + D);
  float* qf = scratch.data();
  float* buf = qf + g * D;
  float* acc = buf + D;
  float* s = acc + g * D;
  const T* q = reinterpret_cast<const T*>(a.q) + r * a.q_sr + h * g * a.q_sh;
  for (int64_t i = 0; i < g; ++i)
    for (int64_t d = 0; d < D; ++d) qf[i * D + d] = to_float(q[i * a.q_sh + d]) * a.scale;

  // scores s[i*n + j]: prefix keys then suffix keys
  const T* kseg[2] = {pk, rk};
  const int64_t klen[2] = {plen, ns}, kstart[2] = {0, plen};
  for (int seg = 0; seg < 2; ++seg) {
    for (int64_t jj = 0; jj < klen[seg]; ++jj) {
      const float* kv = as_floats<T, DC>(kseg[seg] + jj * D, buf, D);
      const int64_t j = kstart[seg] + jj;
      for (int64_t i = 0; i < g; ++i) {
        const float* qi = qf + i * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * kv[d];
        s[i * n + j] = dot;
      }
    }
  }
  // softmax weights per query head (normalisation applied to the output)
  float inv[64];
  float* invp = g <= 64 ? inv : acc;  // g > 64 never happens in practice (checked by the caller)
  for (int64_t i = 0; i < g; ++i) {
    float* si = s + i * n;
    float m = -kInf;
    int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
    for (int64_t j = 0; j < n; ++j) {
      m = m > si[j] ? m : si[j];
      bad |= si[j] != si[j];
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpos(si[j] - m);
      si[j] = e;
      sum += e;
    }
    // a NaN or infinite score makes the reference's softmax NaN: so does this one
    invp[i] = bad || m == kInf || m == -kInf ? std::numeric_limits<float>::quiet_NaN() : 1.0f / sum;
  }
  for (int64_t i = 0; i < g * D; ++i) acc[i] = 0.0f;
  const T* vseg[2] = {pv, rv};
  for (int seg = 0; seg < 2; ++seg) {
    for (int64_t jj = 0; jj < klen[seg]; ++jj) {
      const float* vv = as_floats<T, DC>(vseg[seg] + jj * D, buf, D);
      const int64_t j = kstart[seg] + jj;
      for (int64_t i = 0; i < g; ++i) {
        const float w = s[i * n + j];
        float* ai = acc + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ai[d] += w * vv[d];
      }
    }
  }
  T* o = reinterpret_cast<T*>(a.out) + (r * a.Hq + h * g) * D;
  for (int64_t i = 0; i < g; ++i) {
    const float c = invp[i];
    for (int64_t d = 0; d < D; ++d) {
      const float x = acc[i * D + d] * c;
      if constexpr (sizeof(T) == 4)
        o[i * D + d] = x;
      else
        o[i * D + d] = float_to_bf16(x);
    }
  }
}

using TaskFn = void (*)(const Args&, int64_t, std::vector<float>&);

#define DEFINE_TASK(name, T, DC) \
  HOT void name(const Args& a, int64_t t, std::vector<float>& s) { task_impl<T, DC>(a, t, s); }
DEFINE_TASK(task_f32_64, float, 64)
DEFINE_TASK(task_f32_128, float, 128)
DEFINE_TASK(task_f32_any, float, 0)
DEFINE_TASK(task_bf16_64, uint16_t, 64)
DEFINE_TASK(task_bf16_128, uint16_t, 128)
DEFINE_TASK(task_bf16_any, uint16_t, 0)
#undef DEFINE_TASK

TaskFn pick(int dtype, int64_t D) {
  if (dtype == F32) return D == 64 ? task_f32_64 : D == 128 ? task_f32_128 : task_f32_any;
  return D == 64 ? task_bf16_64 : D == 128 ? task_bf16_128 : task_bf16_any;
}

// The clone target_clones picks on this CPU (same tests as GCC's resolver, by feature).
std::string isa() {
#if HAVE_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 baseline (SSE2)";
#else
  return "portable (no target clones)";
#endif
}

void decode_attention(uintptr_t q, int64_t q_sr, int64_t q_sh, uintptr_t kn, int64_t kn_sr, int64_t kn_sh,
                      uintptr_t vn, int64_t vn_sr, int64_t vn_sh, uintptr_t pk, uintptr_t pv, uintptr_t rk,
                      uintptr_t rv, uintptr_t slots, uintptr_t row_prefix, uintptr_t prefix_len, uintptr_t positions,
                      int64_t pos_stride, uintptr_t out, int dtype, int64_t R, int64_t Hq, int64_t Hkv, int64_t D,
                      int64_t P, int64_t Lp, int64_t S, int64_t Ls, bool write) {
  if (dtype != F32 && dtype != BF16) throw std::invalid_argument("decode_attention: dtype must be 0 (f32) or 2 (bf16)");
  if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > 64)
    throw std::invalid_argument("decode_attention: Hq must be a multiple of Hkv (at most 64 query heads per kv head)");
  if (D <= 0) throw std::invalid_argument("decode_attention: head_dim must be positive");
  const int64_t* sl = reinterpret_cast<const int64_t*>(slots);
  const int64_t* rp = reinterpret_cast<const int64_t*>(row_prefix);
  const int64_t* pl = reinterpret_cast<const int64_t*>(prefix_len);
  const int64_t* pos = reinterpret_cast<const int64_t*>(positions);
  std::vector<int64_t> meta(4 * R);  // slot, prompt, prefix length, offset of each batch row
  for (int64_t r = 0; r < R; ++r) {
    const int64_t s = sl[r];
    if (s < 0 || s >= S) throw std::invalid_argument("decode_attention: slot " + std::to_string(s) + " out of range");
    const int64_t p = rp[s];
    if (p < 0 || p >= P) throw std::invalid_argument("decode_attention: row prompt out of range");
    const int64_t len = pl[p];
    if (len < 0 || len > Lp) throw std::invalid_argument("decode_attention: prefix length out of range");
    const int64_t off = pos[r * pos_stride] - len;
    if (off < 0 || off >= Ls)
      throw std::invalid_argument("suffix offset out of range 0.." + std::to_string(Ls - 1));
    meta[r] = s, meta[R + r] = p, meta[2 * R + r] = len, meta[3 * R + r] = off;
  }
  const Args a{reinterpret_cast<const char*>(q), q_sr, q_sh, reinterpret_cast<const char*>(kn),
               reinterpret_cast<const char*>(vn), kn_sr, kn_sh, vn_sr, vn_sh,
               reinterpret_cast<const char*>(pk), reinterpret_cast<const char*>(pv), reinterpret_cast<char*>(rk),
               reinterpret_cast<char*>(rv), reinterpret_cast<char*>(out), meta.data(), meta.data() + R,
               meta.data() + 2 * R, meta.data() + 3 * R, Hq, Hkv, D, Lp, Ls, float(1.0 / std::sqrt(double(D))), write};
  const TaskFn fn = pick(dtype, D);
  const int64_t tasks = R * Hkv;
  // work estimate: multiply-adds of the task set; a thread team costs ~ a few microseconds
  int64_t keys = 0;
  for (int64_t r = 0; r < R; ++r) keys += meta[2 * R + r] + meta[3 * R + r] + 1;
  const bool parallel = tasks > 1 && keys * Hq * D >= (1 << 15);
  pybind11::gil_scoped_release release;
#pragma omp parallel if (parallel)
  {
    std::vector<float> scratch;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) fn(a, t, scratch);
  }
}

}  // namespace

void register_decode_attention(pybind11::module_& m) {
  using pybind11::arg;
  m.def("decode_attention_isa", &isa, "The instruction set the decode-attention kernel runs on this CPU.");
  m.def("decode_attention", &decode_attention,
        "Fused T=1 attention of PrefixCache (see ctrlsafe/kv_cache.py PrefixCache._attend_decode). Tensors by "
        "data pointer; strides in elements; dtype 0=f32 2=bf16 for q, new K/V, storage and out alike.",
        arg("q"), arg("q_sr"), arg("q_sh"), arg("kn"), arg("kn_sr"), arg("kn_sh"), arg("vn"), arg("vn_sr"),
        arg("vn_sh"), arg("pk"), arg("pv"), arg("rk"), arg("rv"), arg("slots"), arg("row_prefix"), arg("prefix_len"),
        arg("positions"), arg("pos_stride"), arg("out"), arg("dtype"), arg("R"), arg("Hq"), arg("Hkv"), arg("D"),
        arg("P"), arg("Lp"), arg("S"), arg("Ls"), arg("write"));
}
