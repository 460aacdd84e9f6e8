// Vectorised paths of the integer-only kernels (AVX-512 / AVX2 / baseline clones of one body).
// Included only by int_nonlinear.cpp, after int_nonlinear_scalar.h.
#pragma once

#include "int_nonlinear_scalar.h"

namespace torchmerge {
namespace {

// ---- vectorised paths -----------------------------------------------------------------------------------
// Every kernel body below is written once as an always-inline function over plain int64/double lanes with no
// data-dependent control flow, and instantiated three times: under target("avx512f,bw,vl,dq") (zmm: vpmullq,
// vpsravq, vcvtqq2pd), under target("avx2,fma") and with the baseline ISA (the scalar path), picked at run
// time from active_isa(). The per-element 64-bit divisions of the scalar code are replaced by a double-
// precision quotient estimate followed by an exact int64 remainder fix-up (fdiv_*), which yields exactly
// floor(a/b): the estimate is within ±1 because |quotient| < 2^41 and |a| < 2^53 on every call site.
#define TM_INLINE inline __attribute__((always_inline))
#define TM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define TM_AVX2 __attribute__((target("avx2,fma")))

// Sign-extending 8-lane loads for the hand-written AVX-512 bodies.
TM_AVX512 inline __m512i load8_i64(const int8_t* p) { return _mm512_cvtepi8_epi64(_mm_loadl_epi64((const __m128i*)p)); }
TM_AVX512 inline __m512i load8_i64(const int16_t* p) { return _mm512_cvtepi16_epi64(_mm_loadu_si128((const __m128i*)p)); }
TM_AVX512 inline __m512i load8_i64(const int32_t* p) { return _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i*)p)); }

// Clone fn (an always-inline template whose template arguments are deduced from its arguments) per ISA.
#define TM_CLONES(fn)                                                       \
  template <typename... A> TM_AVX512 void fn##_avx512(A... a) { fn(a...); } \
  template <typename... A> TM_AVX2 void fn##_avx2(A... a) { fn(a...); }     \
  template <typename... A> void fn##_scalar(A... a) { fn(a...); }

int vec_level() {  // 2: avx512 (+dq), 1: avx2, 0: scalar
  static const bool dq = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512dq"));
  }();
  const Isa isa = active_isa();
  return isa >= Isa::Avx512 ? (dq ? 2 : 1) : (isa == Isa::Avx2 ? 1 : 0);
}

#define TM_DISPATCH(fn, ...)                   \
  switch (vec_level()) {                       \
    case 2: fn##_avx512(__VA_ARGS__); break;   \
    case 1: fn##_avx2(__VA_ARGS__); break;     \
    default: fn##_scalar(__VA_ARGS__); break;  \
  }

// floor(x / d) for d < 0 (inv = 1.0 / d); also returns the remainder r = x - d·q in (d, 0].
TM_INLINE int64_t fdiv_neg(int64_t x, int64_t d, double inv, int64_t& r) {
  int64_t q = int64_t(std::floor(double(x) * inv));
  r = x - d * q;
  const bool hi = r > 0, lo = r <= d;
  q = hi ? q - 1 : (lo ? q + 1 : q);
  r = hi ? r + d : (lo ? r - d : r);
  return q;
}

// floor(x / d) for d > 0, x ≥ 0 from a double quotient estimate qe (≥ 0).
TM_INLINE int64_t fdiv_pos(int64_t x, int64_t d, double qe) {
  int64_t q = int64_t(qe);
  const int64_t r = x - d * q;
  return r < 0 ? q - 1 : (r >= d ? q + 1 : q);
}

// exp_core with x already ≤ 0 and the constant division done by fdiv_neg.
TM_INLINE int64_t exp_core_v(int64_t x, const ExpConsts& k, double inv_x0) {
  x = x < 0 ? x : 0;
  if (k.shift) x = x * 23;
  const int64_t lo = k.n * k.x0;
  x = x > lo ? x : lo;
  int64_t r;
  const int64_t q = fdiv_neg(x, k.x0, inv_x0, r);
  if (k.shift) return ((r - 2 * k.x0) << (k.n - q)) >> 1;
  return (r * (r + k.b) + k.c) >> q;
}

template <typename In>
TM_INLINE void i_exp_body(const In* __restrict in, int32_t* __restrict out, int64_t b, int64_t e, const ExpConsts* kp) {
  const ExpConsts k = *kp;
  const double inv = 1.0 / double(k.x0);
  if (k.shift) {
    ExpConsts ks = k; ks.shift = true;
    for (int64_t i = b; i < e; ++i) out[i] = int32_t(exp_core_v(in[i], ks, inv));
  } else {
    for (int64_t i = b; i < e; ++i) out[i] = int32_t(exp_core_v(in[i], k, inv));
  }
}
TM_CLONES(i_exp_body)

template <typename In, typename Out>
TM_INLINE void shiftmax_body(const In* __restrict x, Out* __restrict y, int64_t d, int64_t rb, int64_t re,
                             const ExpConsts* kp, int64_t out_bits, int64_t* __restrict e) {
  const ExpConsts k = *kp;
  const double inv = 1.0 / double(k.x0);
  const int64_t top = (int64_t(1) << (out_bits - 1)) - 1, half = int64_t(1) << (62 - out_bits);
  const int sh = int(63 - out_bits);
  for (int64_t r = rb; r < re; ++r) {
    const In* __restrict in = x + r * d;
    Out* __restrict out = y + r * d;
    In m = in[0];
    for (int64_t i = 1; i < d; ++i) m = in[i] > m ? in[i] : m;
    const int64_t m64 = m;
    int64_t sum = 0;
    if (k.shift) {
      for (int64_t i = 0; i < d; ++i) {
        const int64_t x0 = k.x0, t = exp_core_v(int64_t(in[i]) - m64, ExpConsts{true, x0, k.n, 0, 0}, inv);
        e[i] = t;
        sum += t;
      }
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const int64_t t = exp_core_v(int64_t(in[i]) - m64, k, inv);
        e[i] = t;
        sum += t;
      }
    }
    const int64_t factor = (int64_t(1) << 62) / sum;
    for (int64_t i = 0; i < d; ++i) {
      const int64_t v = (e[i] * factor + half) >> sh;
      out[i] = Out(v < top ? v : top);
    }
  }
}
TM_CLONES(shiftmax_body)

// Hand-written AVX-512 Shiftmax for int8/int16 logits and method="shift" with |x0| < 2^16: every step of
// exp_core fits 32-bit lanes (23·(x - max) ≥ -1.5M, clamp 15·x0 > -2^20 is exact in float, (r - 2·x0) << (15 - q)
// < 2^32 is shifted right logically), so 16 lanes per instruction; Σe and e·factor use 64-bit lanes.
// Pass 1: row max; pass 2: e (int32, kept in the L1-resident scratch row) and Σe; pass 3: normalise.
TM_AVX512 inline __m512i load16_i32(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
TM_AVX512 inline __m512i load16_i32(const int16_t* p) { return _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)p)); }
TM_AVX512 inline void store8(int8_t* p, __m512i v) { _mm_storel_epi64((__m128i*)p, _mm512_cvtepi64_epi8(v)); }
TM_AVX512 inline void store8(int16_t* p, __m512i v) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi64_epi16(v)); }

TM_AVX512 inline __m512i shift_exp16(__m512i xm, __m512i lo, __m512i x0v, __m512i twox0, __m512 inv) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i z = _mm512_max_epi32(_mm512_mullo_epi32(xm, _mm512_set1_epi32(23)), lo);
  __m512i q = _mm512_cvttps_epi32(
      _mm512_roundscale_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(z), inv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
  __m512i r = _mm512_sub_epi32(z, _mm512_mullo_epi32(q, x0v));
  const __mmask16 up = _mm512_cmpgt_epi32_mask(r, _mm512_setzero_si512()), dn = _mm512_cmple_epi32_mask(r, x0v);
  q = _mm512_mask_add_epi32(_mm512_mask_sub_epi32(q, up, q, one), dn, q, one);
  r = _mm512_mask_sub_epi32(_mm512_mask_add_epi32(r, up, r, x0v), dn, r, x0v);
  return _mm512_srli_epi32(_mm512_sllv_epi32(_mm512_sub_epi32(r, twox0), _mm512_sub_epi32(_mm512_set1_epi32(kShiftN), q)), 1);
}

// i_exp, method="shift", int8/int16 input: 16 lanes of shift_exp16 (check_exp guarantees |x0|·2^15 < 2^31).
template <typename In>
TM_AVX512 void i_exp_zmm(const In* __restrict in, int32_t* __restrict out, int64_t b, int64_t e, const ExpConsts* kp) {
  const int32_t x0 = int32_t(kp->x0);
  const __m512i lo = _mm512_set1_epi32(kShiftN * x0), x0v = _mm512_set1_epi32(x0), twox0 = _mm512_set1_epi32(2 * x0);
  const __m512 inv = _mm512_set1_ps(1.0f / float(x0));
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    const __m512i v = _mm512_min_epi32(load16_i32(in + i), _mm512_setzero_si512());
    _mm512_storeu_si512(out + i, shift_exp16(v, lo, x0v, twox0, inv));
  }
  i_exp_body(in, out, i, e, kp);  // tail (< 16 elements)
}

template <typename In, typename Out>
TM_AVX512 void shiftmax_zmm(const In* __restrict x, Out* __restrict y, int64_t d, int64_t rb, int64_t re,
                            const ExpConsts* kp, int64_t out_bits, int32_t* __restrict e) {
  const int32_t x0 = int32_t(kp->x0);
  const __m512i lo = _mm512_set1_epi32(kShiftN * x0), x0v = _mm512_set1_epi32(x0), twox0 = _mm512_set1_epi32(2 * x0);
  const __m512 inv = _mm512_set1_ps(1.0f / float(x0));  // exact-enough estimate: q ∈ [0, 15], fixed up above
  const int64_t top = (int64_t(1) << (out_bits - 1)) - 1, half = int64_t(1) << (62 - out_bits);
  const __m512i topv = _mm512_set1_epi64(top), halfv = _mm512_set1_epi64(half);
  const __m128i sh = _mm_cvtsi64_si128(63 - out_bits);
  const int64_t d16 = d / 16 * 16, d8 = d / 8 * 8;
  for (int64_t row = rb; row < re; ++row) {
    const In* __restrict in = x + row * d;
    Out* __restrict out = y + row * d;
    int32_t m = in[0];
    {
      __m512i mv = _mm512_set1_epi32(m);
      for (int64_t i = 0; i < d16; i += 16) mv = _mm512_max_epi32(mv, load16_i32(in + i));
      m = _mm512_reduce_max_epi32(mv);
      for (int64_t i = d16; i < d; ++i) m = in[i] > m ? int32_t(in[i]) : m;
    }
    const __m512i mv = _mm512_set1_epi32(m);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < d16; i += 16) {
      const __m512i ev = shift_exp16(_mm512_sub_epi32(load16_i32(in + i), mv), lo, x0v, twox0, inv);
      _mm512_storeu_si512(e + i, ev);
      acc = _mm512_add_epi64(acc, _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(ev)),
                                                   _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(ev, 1))));
    }
    int64_t sum = _mm512_reduce_add_epi64(acc);
    if (d16 < d) {  // tail: zero-padded 16-lane block, the pad lanes are excluded from the sum
      alignas(64) int32_t tmp[16] = {0};
      for (int64_t i = d16; i < d; ++i) tmp[i - d16] = int32_t(in[i]) - m;
      alignas(64) int32_t et[16];
      _mm512_store_si512(et, shift_exp16(_mm512_load_si512(tmp), lo, x0v, twox0, inv));
      for (int64_t i = d16; i < d; ++i) sum += (e[i] = et[i - d16]);
    }
    const __m512i fv = _mm512_set1_epi64((int64_t(1) << 62) / sum);
    for (int64_t i = 0; i < d8; i += 8) {
      const __m512i ev = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i*)(e + i)));
      const __m512i v = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mullo_epi64(ev, fv), halfv), sh);
      store8(out + i, _mm512_min_epi64(v, topv));
    }
    const int64_t factor = (int64_t(1) << 62) / sum;
    for (int64_t i = d8; i < d; ++i) {
      const int64_t v = (int64_t(uint32_t(e[i])) * factor + half) >> (63 - out_bits);
      out[i] = Out(v < top ? v : top);
    }
  }
}

// Corrected ShiftGELU: with m = max(x, 0) one of the two exponentials is e(0) = E0, the other t = e(-|x|).
template <typename In>
TM_INLINE void shift_gelu_body(const In* __restrict in, int32_t* __restrict out, int64_t b, int64_t e, int64_t x0,
                               int64_t sigmoid_bits) {
  const double inv = 1.0 / double(x0), two62 = 4611686018427387904.0;
  const int64_t lo = kGeluN * x0, E0 = (-2 * x0) << (kGeluN - 1);  // ((0 - 2·x0) << 23) >> 1
  const int64_t half = int64_t(1) << (62 - sigmoid_bits), top = (int64_t(1) << (sigmoid_bits - 1)) - 1;
  const int sh = int(63 - sigmoid_bits);
  for (int64_t i = b; i < e; ++i) {
    const int64_t v = in[i], a = v < 0 ? v : -v;  // -|v|
    int64_t z = a * 23;
    z = z > lo ? z : lo;
    int64_t r;
    const int64_t q = fdiv_neg(z, x0, inv, r);
    const int64_t t = ((r - 2 * x0) << (kGeluN - q)) >> 1;
    const int64_t sum = E0 + t, num = v >= 0 ? E0 : t;
    const int64_t f = fdiv_pos(int64_t(1) << 62, sum, two62 / double(sum));
    int64_t sig = (num * f + half) >> sh;
    sig = sig < top ? sig : top;
    out[i] = int32_t(v * sig);
  }
}
TM_CLONES(shift_gelu_body)

// Hand-written AVX-512 ShiftGELU (GCC does not vectorise the body above): 8 int64 lanes, the same steps.

template <typename In>
TM_AVX512 void shift_gelu_zmm(const In* __restrict in, int32_t* __restrict out, int64_t b, int64_t e, int64_t x0,
                              int64_t sigmoid_bits) {
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi64(1), x0v = _mm512_set1_epi64(x0);
  const __m512i lo = _mm512_set1_epi64(kGeluN * x0), c23 = _mm512_set1_epi64(23), twox0 = _mm512_set1_epi64(2 * x0);
  const __m512i E0 = _mm512_set1_epi64((-2 * x0) << (kGeluN - 1)), two62 = _mm512_set1_epi64(int64_t(1) << 62);
  const __m512i half = _mm512_set1_epi64(int64_t(1) << (62 - sigmoid_bits));
  const __m512i top = _mm512_set1_epi64((int64_t(1) << (sigmoid_bits - 1)) - 1);
  const __m128i sh = _mm_cvtsi64_si128(63 - sigmoid_bits);
  const __m512d inv = _mm512_set1_pd(1.0 / double(x0)), two62d = _mm512_set1_pd(4611686018427387904.0);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m512i v = load8_i64(in + i);
    const __m512i a = _mm512_min_epi64(v, _mm512_sub_epi64(zero, v));  // -|v|
    const __m512i z = _mm512_max_epi64(_mm512_mullo_epi64(a, c23), lo);
    __m512i q = _mm512_cvttpd_epi64(
        _mm512_roundscale_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(z), inv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    __m512i r = _mm512_sub_epi64(z, _mm512_mullo_epi64(q, x0v));
    const __mmask8 up = _mm512_cmpgt_epi64_mask(r, zero), dn = _mm512_cmple_epi64_mask(r, x0v);
    q = _mm512_mask_add_epi64(_mm512_mask_sub_epi64(q, up, q, one), dn, q, one);
    r = _mm512_mask_sub_epi64(_mm512_mask_add_epi64(r, up, r, x0v), dn, r, x0v);
    const __m512i t = _mm512_srai_epi64(_mm512_sllv_epi64(_mm512_sub_epi64(r, twox0), _mm512_sub_epi64(_mm512_set1_epi64(kGeluN), q)), 1);
    const __m512i sum = _mm512_add_epi64(E0, t);
    const __m512i num = _mm512_mask_blend_epi64(_mm512_cmpge_epi64_mask(v, zero), t, E0);
    __m512i f = _mm512_cvttpd_epi64(_mm512_div_pd(two62d, _mm512_cvtepi64_pd(sum)));
    const __m512i rr = _mm512_sub_epi64(two62, _mm512_mullo_epi64(f, sum));
    const __mmask8 fdn = _mm512_cmplt_epi64_mask(rr, zero), fup = _mm512_cmpge_epi64_mask(rr, sum);
    f = _mm512_mask_add_epi64(_mm512_mask_sub_epi64(f, fdn, f, one), fup, f, one);
    __m512i sig = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mullo_epi64(num, f), half), sh);
    sig = _mm512_min_epi64(sig, top);
    _mm256_storeu_si256((__m256i*)(out + i), _mm512_cvtepi64_epi32(_mm512_mullo_epi64(v, sig)));
  }
  shift_gelu_body(in, out, i, e, x0, sigmoid_bits);  // tail (< 8 elements)
}

// Published ShiftGELU: row max m, e_m = gelu_exp(-m) per row (scalar), factor = floor(cap31 / min(e + e_m, cap31)).
template <typename In>
TM_INLINE void shift_gelu_pub_body(const In* __restrict x, int32_t* __restrict y, int64_t d, int64_t rb, int64_t re,
                                   int64_t x0, int64_t sigmoid_bits) {
  const double inv = 1.0 / double(x0);
  const int64_t lo = kGeluN * x0, cap31 = (int64_t(1) << 31) - 1, top = (int64_t(1) << (sigmoid_bits - 1)) - 1;
  const int sh = int(32 - sigmoid_bits);
  for (int64_t row = rb; row < re; ++row) {
    const In* __restrict in = x + row * d;
    int32_t* __restrict out = y + row * d;
    In mm = in[0];
    for (int64_t i = 1; i < d; ++i) mm = in[i] > mm ? in[i] : mm;
    const int64_t m = mm, e_m = gelu_exp(-m, x0, true);
    for (int64_t i = 0; i < d; ++i) {
      const int64_t v = in[i], xm = v - m;  // ≤ 0, so q ≥ 0 and the shift never exceeds 23
      int64_t z = xm + (xm >> 1) - (xm >> 4);
      z = z > lo ? z : lo;
      int64_t r;
      const int64_t q = fdiv_neg(z, x0, inv, r);
      const int64_t ev = ((r - 2 * x0) << (kGeluN - q)) >> 1;
      int64_t total = ev + e_m;
      total = total < cap31 ? total : cap31;
      const int64_t f = fdiv_pos(cap31, total, double(cap31) / double(total));
      int64_t sig = (ev * f) >> sh;
      sig = sig < top ? sig : top;
      out[i] = int32_t(v * sig);
    }
  }
}
TM_CLONES(shift_gelu_pub_body)

// Published ShiftGELU, AVX-512: per row the max and e_m = gelu_exp(-max) in scalar, then 8 int64 lanes per step
// (x - max ≤ 0 so q ≥ 0 and the shift 23 - q never reaches the clamp at 40).
template <typename In>
TM_AVX512 void shift_gelu_pub_zmm(const In* __restrict x, int32_t* __restrict y, int64_t d, int64_t rb, int64_t re,
                                  int64_t x0, int64_t sigmoid_bits) {
  const int64_t cap31 = (int64_t(1) << 31) - 1;
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi64(1), x0v = _mm512_set1_epi64(x0);
  const __m512i lo = _mm512_set1_epi64(kGeluN * x0), twox0 = _mm512_set1_epi64(2 * x0), capv = _mm512_set1_epi64(cap31);
  const __m512i top = _mm512_set1_epi64((int64_t(1) << (sigmoid_bits - 1)) - 1), n23 = _mm512_set1_epi64(kGeluN);
  const __m128i sh = _mm_cvtsi64_si128(32 - sigmoid_bits);
  const __m512d inv = _mm512_set1_pd(1.0 / double(x0)), capd = _mm512_set1_pd(double(cap31));
  const int64_t d8 = d / 8 * 8;
  for (int64_t row = rb; row < re; ++row) {
    const In* __restrict in = x + row * d;
    int32_t* __restrict out = y + row * d;
    In mm = in[0];
    for (int64_t i = 1; i < d; ++i) mm = in[i] > mm ? in[i] : mm;
    const int64_t m = mm, e_m = gelu_exp(-m, x0, true);
    const __m512i mv = _mm512_set1_epi64(m), emv = _mm512_set1_epi64(e_m);
    for (int64_t i = 0; i < d8; i += 8) {
      const __m512i v = load8_i64(in + i), xm = _mm512_sub_epi64(v, mv);
      __m512i z = _mm512_sub_epi64(_mm512_add_epi64(xm, _mm512_srai_epi64(xm, 1)), _mm512_srai_epi64(xm, 4));
      z = _mm512_max_epi64(z, lo);
      __m512i q = _mm512_cvttpd_epi64(
          _mm512_roundscale_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(z), inv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
      __m512i r = _mm512_sub_epi64(z, _mm512_mullo_epi64(q, x0v));
      const __mmask8 up = _mm512_cmpgt_epi64_mask(r, zero), dn = _mm512_cmple_epi64_mask(r, x0v);
      q = _mm512_mask_add_epi64(_mm512_mask_sub_epi64(q, up, q, one), dn, q, one);
      r = _mm512_mask_sub_epi64(_mm512_mask_add_epi64(r, up, r, x0v), dn, r, x0v);
      const __m512i ev = _mm512_srai_epi64(_mm512_sllv_epi64(_mm512_sub_epi64(r, twox0), _mm512_sub_epi64(n23, q)), 1);
      const __m512i total = _mm512_min_epi64(_mm512_add_epi64(ev, emv), capv);
      __m512i f = _mm512_cvttpd_epi64(_mm512_div_pd(capd, _mm512_cvtepi64_pd(total)));
      const __m512i rr = _mm512_sub_epi64(capv, _mm512_mullo_epi64(f, total));
      f = _mm512_mask_add_epi64(_mm512_mask_sub_epi64(f, _mm512_cmplt_epi64_mask(rr, zero), f, one),
                                _mm512_cmpge_epi64_mask(rr, total), f, one);
      const __m512i sig = _mm512_min_epi64(_mm512_sra_epi64(_mm512_mullo_epi64(ev, f), sh), top);
      _mm256_storeu_si256((__m256i*)(out + i), _mm512_cvtepi64_epi32(_mm512_mullo_epi64(v, sig)));
    }
    for (int64_t i = d8; i < d; ++i) {  // tail: the scalar steps
      const int64_t v = in[i], e = gelu_exp(v - m, x0, true);
      const int64_t sig = (e * (cap31 / std::min(e + e_m, cap31))) >> (32 - sigmoid_bits);
      out[i] = int32_t(v * std::min<int64_t>(sig, (int64_t(1) << (sigmoid_bits - 1)) - 1));
    }
  }
}

struct GeluConsts {
  int64_t b, c, one;
};

template <typename In>
TM_INLINE void i_gelu_body(const In* __restrict in, int32_t* __restrict out, int64_t b, int64_t e, const GeluConsts* gp) {
  const int64_t cb = gp->b, cc = gp->c, one = gp->one, nb = -gp->b;
  const int64_t lo = -(int64_t(1) << 31), hi = (int64_t(1) << 31) - 1;
  for (int64_t i = b; i < e; ++i) {
    const int64_t v = in[i], av = v < 0 ? -v : v, a = av < nb ? av : nb;
    const int64_t mag = (-((a + cb) * (a + cb) + cc)) >> kGeluShift;
    const int64_t erf = v > 0 ? mag : (v < 0 ? -mag : 0);
    int64_t o = v * (erf + one);
    o = o < lo ? lo : (o > hi ? hi : o);
    out[i] = int32_t(o);
  }
}
TM_CLONES(i_gelu_body)

struct LnParams {
  const int64_t* mult;
  const int64_t* shift;
  const int64_t* rnd;
  const int64_t* bias;
  int64_t q;
};

template <typename In, typename Out>
TM_INLINE void i_layernorm_body(const In* __restrict x, Out* __restrict y, int64_t d, int64_t rb, int64_t re,
                                const LnParams* pp) {
  const int64_t* __restrict mult = pp->mult;
  const int64_t* __restrict shv = pp->shift;
  const int64_t* __restrict rnd = pp->rnd;
  const int64_t* __restrict bias = pp->bias;
  const int64_t qmax = pp->q, qmin = -pp->q - 1;
  for (int64_t row = rb; row < re; ++row) {
    const In* __restrict in = x + row * d;
    Out* __restrict out = y + row * d;
    int64_t sum = 0, sq = 0;
    for (int64_t i = 0; i < d; ++i) {
      const int32_t v = in[i];
      sum += v;
      sq += int64_t(v * v);
    }
    const int64_t v = d * sq - sum * sum;
    if (v > 0) {
      const int k = std::max(0, (62 - bit_length(uint64_t(v))) >> 1);
      const int64_t sigma = isqrt64(v << (2 * k)), scale = int64_t(1) << (k + kLnFracBits);
      const double inv = 1.0 / double(sigma);
      for (int64_t i = 0; i < d; ++i) {
        const int64_t num = (d * int64_t(in[i]) - sum) * scale;  // |num| < 2^52
        int64_t q = int64_t(std::floor(double(num) * inv));
        const int64_t r = num - q * sigma;
        q = r < 0 ? q - 1 : (r >= sigma ? q + 1 : q);
        int64_t o = ((q * mult[i] + rnd[i]) >> shv[i]) + bias[i];
        o = o < qmin ? qmin : (o > qmax ? qmax : o);
        out[i] = Out(o);
      }
    } else {
      for (int64_t i = 0; i < d; ++i) {
        int64_t o = bias[i];
        o = o < qmin ? qmin : (o > qmax ? qmax : o);
        out[i] = Out(o);
      }
    }
  }
}
TM_CLONES(i_layernorm_body)

// Hand-written AVX-512 I-LayerNorm for int8/int16 rows: Σx (32-bit lanes) and Σx² (64-bit lanes) in one pass,
// then 8 int64 lanes per step: y = D·x - S, ŷ = floor(y·2^(k+12) / σ) by a double estimate (y is exact in double,
// the quotient is < 2^21) and an exact int64 remainder fix-up, then the per-channel dyadic requantisation.
TM_AVX512 inline __m512i load8_x(const int8_t* p) { return load8_i64(p); }
TM_AVX512 inline __m512i load8_x(const int16_t* p) { return load8_i64(p); }

template <typename In, typename Out>
TM_AVX512 void i_layernorm_zmm(const In* __restrict x, Out* __restrict y, int64_t d, int64_t rb, int64_t re,
                               const LnParams* pp) {
  const int64_t* __restrict mult = pp->mult;
  const int64_t* __restrict shv = pp->shift;
  const int64_t* __restrict rnd = pp->rnd;
  const int64_t* __restrict bias = pp->bias;
  const int64_t qmax = pp->q, qmin = -pp->q - 1;
  const __m512i qmaxv = _mm512_set1_epi64(qmax), qminv = _mm512_set1_epi64(qmin), one = _mm512_set1_epi64(1);
  const __m512i zero = _mm512_setzero_si512(), dv = _mm512_set1_epi64(d);
  const int64_t d16 = d / 16 * 16, d8 = d / 8 * 8;
  for (int64_t row = rb; row < re; ++row) {
    const In* __restrict in = x + row * d;
    Out* __restrict out = y + row * d;
    __m512i s32 = zero, s64 = zero;
    for (int64_t i = 0; i < d16; i += 16) {
      const __m512i v = load16_i32(in + i), vv = _mm512_mullo_epi32(v, v);  // ≤ 2^30
      s32 = _mm512_add_epi32(s32, v);
      s64 = _mm512_add_epi64(s64, _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(vv)),
                                                   _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(vv, 1))));
    }
    int64_t sum = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(s32)),
                                                           _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s32, 1))));
    int64_t sq = _mm512_reduce_add_epi64(s64);
    for (int64_t i = d16; i < d; ++i) sum += in[i], sq += int64_t(in[i]) * in[i];
    const int64_t v = d * sq - sum * sum;
    if (v <= 0) {
      for (int64_t i = 0; i < d; ++i) out[i] = Out(bias[i] < qmin ? qmin : (bias[i] > qmax ? qmax : bias[i]));
      continue;
    }
    const int k = std::max(0, (62 - bit_length(uint64_t(v))) >> 1);
    const int64_t sigma = isqrt64(v << (2 * k));
    const double c = std::ldexp(1.0, k + kLnFracBits) / double(sigma);
    const __m512i sumv = _mm512_set1_epi64(sum), sigv = _mm512_set1_epi64(sigma);
    const __m128i kk = _mm_cvtsi64_si128(k + kLnFracBits);
    const __m512d cv = _mm512_set1_pd(c);
    for (int64_t i = 0; i < d8; i += 8) {
      const __m512i yv = _mm512_sub_epi64(_mm512_mullo_epi64(load8_x(in + i), dv), sumv);
      const __m512i num = _mm512_sll_epi64(yv, kk);
      __m512i q = _mm512_cvttpd_epi64(
          _mm512_roundscale_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(yv), cv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
      const __m512i r = _mm512_sub_epi64(num, _mm512_mullo_epi64(q, sigv));
      q = _mm512_mask_add_epi64(_mm512_mask_sub_epi64(q, _mm512_cmplt_epi64_mask(r, zero), q, one),
                                _mm512_cmpge_epi64_mask(r, sigv), q, one);
      __m512i o = _mm512_mullo_epi64(q, _mm512_loadu_si512(mult + i));
      o = _mm512_srav_epi64(_mm512_add_epi64(o, _mm512_loadu_si512(rnd + i)), _mm512_loadu_si512(shv + i));
      o = _mm512_add_epi64(o, _mm512_loadu_si512(bias + i));
      o = _mm512_min_epi64(_mm512_max_epi64(o, qminv), qmaxv);
      store8(out + i, o);
    }
    const int64_t scale = int64_t(1) << (k + kLnFracBits);
    for (int64_t i = d8; i < d; ++i) {
      const int64_t yh = floor_div((d * int64_t(in[i]) - sum) * scale, sigma);
      const int64_t o = ((yh * mult[i] + rnd[i]) >> shv[i]) + bias[i];
      out[i] = Out(o < qmin ? qmin : (o > qmax ? qmax : o));
    }
  }
}

}  // namespace
}  // namespace torchmerge
