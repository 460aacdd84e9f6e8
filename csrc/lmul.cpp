// L-Mul kernels (arXiv 2410.00907): torchmerge::lmul and torchmerge::lmul_matmul.
// Semantics are defined by torchmerge/ops/lmul.py (the references); these kernels are bit-exact with them.
//
// lmul_matmul keeps the reference's accumulation order: per output element a sequential fp32 sum over
// k = 0..K-1 starting at +0.0. Blocking over rows, columns and k-blocks never reorders k.
// Vector paths (products of non-special values, no possible overflow) use two encodings:
//  * FAST (tile has no zeros and no product can underflow): bits(a) - C + bits(b) computed mod 2^32
//    already is sign|magnitude of the product, so one vpaddd and one vaddps per 16 products.
//  * MASKED (zeros / possible underflow): magnitudes added as signed ints (zero codes chosen so nothing
//    wraps), products < 2^23 are skipped. Skipping a ±0 product is exact: the accumulator starts at
//    +0.0 and an fp32 sum is never -0 unless both operands are, so acc + (±0) == acc.
// Inputs with inf/NaN, or whose largest products could overflow, take the scalar path (exact, slower).
#include "common.h"

#include <immintrin.h>

// GCC 12 false positive inside avx512fintrin.h (_mm512_undefined_* operands of masked intrinsics)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>
#include <vector>

namespace torchmerge {
namespace {

constexpr uint32_t kSign = 0x80000000u;
constexpr uint32_t kInf = 0x7F800000u;
constexpr uint32_t kMinNormal = 0x00800000u;
constexpr uint32_t kQNaN = 0x7FC00000u;

int check_params(const char* op, int64_t m, int64_t l) {
  TORCH_CHECK_VALUE(m >= 1 && m <= 23, op, ": mantissa_bits must be an int in [1, 23]; got ", m);
  TORCH_CHECK_VALUE(l == -1 || (l >= 0 && l <= 23), op,
                    ": offset_exp must be -1 (paper default l(m)) or an int in [0, 23]; got ", l);
  if (l == -1) return m <= 3 ? int(m) : (m == 4 ? 3 : 4);
  return int(l);
}

// C = bias - 2^-l offset, both in units of the fp32 exponent/mantissa fields.
inline int64_t offset_constant(int l) { return (int64_t(127) << 23) - (int64_t(1) << (23 - l)); }

// RNE to (23 - shift) mantissa bits; subnormals flush to ±0; NaN keeps its payload.
inline uint32_t round_bits(uint32_t b, int shift) {
  const uint32_t mag = b & 0x7FFFFFFFu, sign = b & kSign;
  if (mag > kInf) return b;
  if (mag < kMinNormal) return sign;
  if (shift == 0) return b;
  const uint32_t r = ((mag + ((1u << (shift - 1)) - 1) + ((mag >> shift) & 1)) >> shift) << shift;
  return sign | r;
}

// L-Mul of rounded bit patterns (module docstring of torchmerge/ops/lmul.py, steps 2-3).
inline uint32_t lmul_bits(uint32_t a, uint32_t b, int64_t C) {
  const uint32_t s = (a ^ b) & kSign, ma = a & 0x7FFFFFFFu, mb = b & 0x7FFFFFFFu;
  if (ma > kInf || mb > kInf) return kQNaN;
  const bool az = ma == 0, bz = mb == 0;
  if (ma == kInf || mb == kInf) return (az || bz) ? kQNaN : (s | kInf);
  if (az || bz) return s;
  const int64_t r = int64_t(ma) + int64_t(mb) - C;
  if (r < int64_t(kMinNormal)) return s;
  if (r >= int64_t(kInf)) return s | kInf;
  return s | uint32_t(r);
}

inline float as_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }

std::vector<uint32_t> rounded_bits(const at::Tensor& t, int shift) {
  const int64_t n = t.numel();
  std::vector<uint32_t> out(n);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(t.data_ptr<float>());
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = round_bits(src[i], shift);
  });
  return out;
}

at::Tensor lmul_cpu(const at::Tensor& x, const at::Tensor& y, int64_t m, int64_t l_in) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "lmul: x must be a torch.float32 tensor; got ", x.scalar_type());
  TORCH_CHECK_VALUE(y.scalar_type() == at::kFloat, "lmul: y must be a torch.float32 tensor; got ", y.scalar_type());
  const int l = check_params("lmul", m, l_in);
  const auto shape = at::infer_size(x.sizes(), y.sizes());
  const at::Tensor xe = x.expand(shape).contiguous(), ye = y.expand(shape).contiguous();
  at::Tensor out = at::empty(shape, x.options());
  const uint32_t* px = reinterpret_cast<const uint32_t*>(xe.data_ptr<float>());
  const uint32_t* py = reinterpret_cast<const uint32_t*>(ye.data_ptr<float>());
  uint32_t* po = reinterpret_cast<uint32_t*>(out.data_ptr<float>());
  const int shift = 23 - int(m);
  const int64_t C = offset_constant(l);
  // Elementwise is memory-bound: one branch-light scalar loop for every ISA.
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) po[i] = lmul_bits(round_bits(px[i], shift), round_bits(py[i], shift), C);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// lmul_matmul

constexpr int64_t KB = 256;   // k-block: the B panel (KB x tile columns) stays in L2
constexpr int64_t RCHUNK = 32; // rows per parallel task

struct Operands {
  int64_t M, K, N;
  const uint32_t* ab;  // rounded bits of a [M, K]
  const uint32_t* bb;  // rounded bits of b [K, N]
  int64_t C;
  // Vector-path encodings (filled only when the vector path is usable).
  std::vector<uint32_t> afast;  // bits(a) - C (mod 2^32)
  std::vector<int32_t> amag;    // |a| bits - C, zero -> za
  std::vector<uint32_t> asgn;   // sign bit of a
  std::vector<int32_t> bmag;    // |b| bits, zero -> zb
  std::vector<uint32_t> bsgn;   // sign bit of b
  std::vector<uint8_t> a_fast_ok;   // [M, K/KB blocks]: no zero in the row block
  std::vector<int32_t> a_min;       // [M, kblocks]: min amag over non-zero entries
  std::vector<uint8_t> b_fast_ok;   // [kblocks, N/tile]: no zero
  std::vector<int32_t> b_min;       // [kblocks, N/tile]
};

void scalar_rows(const Operands& o, float* out, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  std::vector<float> acc(c1 - c0);
  for (int64_t i = r0; i < r1; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < o.K; ++k) {
      const uint32_t a = o.ab[i * o.K + k];
      const uint32_t* brow = o.bb + k * o.N;
      for (int64_t j = c0; j < c1; ++j) acc[j - c0] += as_float(lmul_bits(a, brow[j], o.C));
    }
    std::memcpy(out + i * o.N + c0, acc.data(), (c1 - c0) * sizeof(float));
  }
}

// Returns false when inf/NaN are present or the largest product could overflow (scalar path then).
bool prepare_vector(Operands& o, int64_t tile) {
  const int64_t nkb = (o.K + KB - 1) / KB, ntile = o.N / tile;
  int64_t amax = 0, bmax = 0;  // largest amag (non-zero a) and |b| bits
  for (int64_t i = 0; i < o.M * o.K; ++i) {
    const uint32_t m = o.ab[i] & 0x7FFFFFFFu;
    if (m >= kInf) return false;
    if (m) amax = std::max<int64_t>(amax, m);
  }
  for (int64_t i = 0; i < o.K * o.N; ++i) {
    const uint32_t m = o.bb[i] & 0x7FFFFFFFu;
    if (m >= kInf) return false;
    bmax = std::max<int64_t>(bmax, m);
  }
  const int64_t amax_c = amax - o.C;
  if (amax_c + bmax >= int64_t(kInf)) return false;
  // Zero codes: every product involving a zero lands in [-2^31, 2^23) (see header comment).
  const int32_t za = int32_t(-std::max<int64_t>(bmax, kMinNormal));
  const int32_t zb = int32_t(-std::max<int64_t>(amax_c, 0));
  o.afast.resize(o.M * o.K); o.amag.resize(o.M * o.K); o.asgn.resize(o.M * o.K);
  o.a_fast_ok.assign(o.M * nkb, 1); o.a_min.assign(o.M * nkb, INT32_MAX);
  for (int64_t i = 0; i < o.M; ++i)
    for (int64_t k = 0; k < o.K; ++k) {
      const int64_t idx = i * o.K + k, blk = i * nkb + k / KB;
      const uint32_t b = o.ab[idx], m = b & 0x7FFFFFFFu;
      o.afast[idx] = b - uint32_t(o.C);
      o.asgn[idx] = b & kSign;
      if (m == 0) { o.amag[idx] = za; o.a_fast_ok[blk] = 0; }
      else { o.amag[idx] = int32_t(int64_t(m) - o.C); o.a_min[blk] = std::min(o.a_min[blk], o.amag[idx]); }
    }
  o.bmag.resize(o.K * o.N); o.bsgn.resize(o.K * o.N);
  o.b_fast_ok.assign(nkb * std::max<int64_t>(ntile, 1), 1);
  o.b_min.assign(nkb * std::max<int64_t>(ntile, 1), INT32_MAX);
  for (int64_t k = 0; k < o.K; ++k)
    for (int64_t j = 0; j < o.N; ++j) {
      const int64_t idx = k * o.N + j;
      const uint32_t b = o.bb[idx], m = b & 0x7FFFFFFFu;
      o.bsgn[idx] = b & kSign;
      const bool in_tile = j < ntile * tile;
      const int64_t blk = (k / KB) * ntile + j / tile;
      if (m == 0) { o.bmag[idx] = zb; if (in_tile) o.b_fast_ok[blk] = 0; }
      else { o.bmag[idx] = int32_t(m); if (in_tile) o.b_min[blk] = std::min<int32_t>(o.b_min[blk], int32_t(m)); }
    }
  return true;
}

// FAST needs no zeros and min(amag) + min(|b|) >= 2^23 over the (rows, k-block, column tile).
bool tile_is_fast(const Operands& o, int64_t i0, int64_t rows, int64_t kb, int64_t jt, int64_t ntile) {
  const int64_t nkb = (o.K + KB - 1) / KB;
  if (!o.b_fast_ok[kb * ntile + jt]) return false;
  int64_t amin = INT32_MAX;
  for (int64_t r = 0; r < rows; ++r) {
    if (!o.a_fast_ok[(i0 + r) * nkb + kb]) return false;
    amin = std::min<int64_t>(amin, o.a_min[(i0 + r) * nkb + kb]);
  }
  return amin + o.b_min[kb * ntile + jt] >= int64_t(kMinNormal);
}

#define TM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define TM_AVX2 __attribute__((target("avx2,fma")))

// One micro-tile: R rows x 64 columns, k in [k0, k1), accumulators loaded from / stored to out.
template <int R, bool FAST>
TM_AVX512 void tile512(const Operands& o, float* out, int64_t i0, int64_t j0, int64_t k0, int64_t k1) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_loadu_ps(out + (i0 + r) * o.N + j0 + 16 * v);
  const __m512i thr = _mm512_set1_epi32(int32_t(kMinNormal) - 1);
  for (int64_t k = k0; k < k1; ++k) {
    if (FAST) {
      __m512i bv[4];
      for (int v = 0; v < 4; ++v) bv[v] = _mm512_loadu_si512(o.bb + k * o.N + j0 + 16 * v);
      for (int r = 0; r < R; ++r) {
        const __m512i av = _mm512_set1_epi32(int32_t(o.afast[(i0 + r) * o.K + k]));
        for (int v = 0; v < 4; ++v)
          acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_castsi512_ps(_mm512_add_epi32(av, bv[v])));
      }
    } else {
      __m512i bm[4], bs[4];
      for (int v = 0; v < 4; ++v) {
        bm[v] = _mm512_loadu_si512(o.bmag.data() + k * o.N + j0 + 16 * v);
        bs[v] = _mm512_loadu_si512(o.bsgn.data() + k * o.N + j0 + 16 * v);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t ai = (i0 + r) * o.K + k;
        const __m512i am = _mm512_set1_epi32(o.amag[ai]);
        const __m512i as = _mm512_set1_epi32(int32_t(o.asgn[ai]));
        for (int v = 0; v < 4; ++v) {
          const __m512i s = _mm512_add_epi32(am, bm[v]);
          const __mmask16 keep = _mm512_cmpgt_epi32_mask(s, thr);
          const __m512i p = _mm512_ternarylogic_epi32(s, as, bs[v], 0x96);  // s ^ as ^ bs
          acc[r][v] = _mm512_mask_add_ps(acc[r][v], keep, acc[r][v], _mm512_castsi512_ps(p));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + (i0 + r) * o.N + j0 + 16 * v, acc[r][v]);
}

// Same with 4 ymm (32 columns); MASKED uses an and-mask (adding +0 is exact, see header).
template <int R, bool FAST>
TM_AVX2 void tile256(const Operands& o, float* out, int64_t i0, int64_t j0, int64_t k0, int64_t k1) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_loadu_ps(out + (i0 + r) * o.N + j0 + 8 * v);
  const __m256i thr = _mm256_set1_epi32(int32_t(kMinNormal) - 1);
  for (int64_t k = k0; k < k1; ++k) {
    if (FAST) {
      __m256i bv[4];
      for (int v = 0; v < 4; ++v) bv[v] = _mm256_loadu_si256((const __m256i*)(o.bb + k * o.N + j0 + 8 * v));
      for (int r = 0; r < R; ++r) {
        const __m256i av = _mm256_set1_epi32(int32_t(o.afast[(i0 + r) * o.K + k]));
        for (int v = 0; v < 4; ++v)
          acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_castsi256_ps(_mm256_add_epi32(av, bv[v])));
      }
    } else {
      for (int r = 0; r < R; ++r) {
        const int64_t ai = (i0 + r) * o.K + k;
        const __m256i am = _mm256_set1_epi32(o.amag[ai]);
        const __m256i as = _mm256_set1_epi32(int32_t(o.asgn[ai]));
        for (int v = 0; v < 4; ++v) {
          const int64_t bi = k * o.N + j0 + 8 * v;
          const __m256i s = _mm256_add_epi32(am, _mm256_loadu_si256((const __m256i*)(o.bmag.data() + bi)));
          const __m256i keep = _mm256_cmpgt_epi32(s, thr);
          const __m256i sg = _mm256_xor_si256(as, _mm256_loadu_si256((const __m256i*)(o.bsgn.data() + bi)));
          const __m256i p = _mm256_and_si256(keep, _mm256_xor_si256(s, sg));
          acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_castsi256_ps(p));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + (i0 + r) * o.N + j0 + 8 * v, acc[r][v]);
}

using TileFn = void (*)(const Operands&, float*, int64_t, int64_t, int64_t, int64_t);

template <int R>
TileFn pick(bool avx512, bool fast) {
  if (avx512) return fast ? &tile512<R, true> : &tile512<R, false>;
  return fast ? &tile256<R, true> : &tile256<R, false>;
}

void vector_rows(const Operands& o, float* out, int64_t r0, int64_t r1, bool avx512) {
  const int64_t tile = avx512 ? 64 : 32, ntile = o.N / tile, nkb = (o.K + KB - 1) / KB;
  std::fill(out + r0 * o.N, out + r1 * o.N, 0.0f);
  for (int64_t jt = 0; jt < ntile; ++jt)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t k0 = kb * KB, k1 = std::min(o.K, k0 + KB);
      for (int64_t i = r0; i < r1; i += 4) {
        const int64_t rows = std::min<int64_t>(4, r1 - i);
        const bool fast = tile_is_fast(o, i, rows, kb, jt, ntile);
        TileFn fn = rows == 4 ? pick<4>(avx512, fast) : rows == 3 ? pick<3>(avx512, fast)
                  : rows == 2 ? pick<2>(avx512, fast) : pick<1>(avx512, fast);
        fn(o, out, i, jt * tile, k0, k1);
      }
    }
  if (ntile * tile < o.N) scalar_rows(o, out, r0, r1, ntile * tile, o.N);
}

at::Tensor lmul_matmul_cpu(const at::Tensor& a, const at::Tensor& b, int64_t m, int64_t l_in) {
  const char* op = "lmul_matmul";
  TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat, op, ": a must be a torch.float32 tensor; got ", a.scalar_type());
  TORCH_CHECK_VALUE(b.scalar_type() == at::kFloat, op, ": b must be a torch.float32 tensor; got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.dim() >= 1, op, ": a must have shape [..., K]; got a 0-d tensor");
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": b must be 2-D [K, N]; got shape ", b.sizes());
  TORCH_CHECK_VALUE(a.size(-1) == b.size(0), op, ": a's last dim (", a.size(-1), ") must equal b's K = b.shape[0] (",
                    b.size(0), ")");
  const int l = check_params(op, m, l_in);
  const int shift = 23 - int(m);
  Operands o;
  o.K = b.size(0); o.N = b.size(1); o.M = o.K ? a.numel() / o.K : 0;
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end() - 1);
  out_shape.push_back(o.N);
  if (o.K == 0) return at::zeros(out_shape, a.options());
  at::Tensor out = at::empty({o.M, o.N}, a.options());
  const std::vector<uint32_t> ab = rounded_bits(a.contiguous(), shift), bb = rounded_bits(b.contiguous(), shift);
  o.ab = ab.data(); o.bb = bb.data(); o.C = offset_constant(l);
  float* po = out.data_ptr<float>();
  const Isa isa = active_isa();
  const bool vec = isa != Isa::Scalar && o.M > 0 && prepare_vector(o, isa >= Isa::Avx512 ? 64 : 32);
  at::parallel_for(0, (o.M + RCHUNK - 1) / RCHUNK, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * RCHUNK, r1 = std::min(o.M, r0 + RCHUNK);
      if (vec) vector_rows(o, po, r0, r1, isa >= Isa::Avx512);
      else scalar_rows(o, po, r0, r1, 0, o.N);
    }
  });
  return out.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) {
  m.impl("lmul", &lmul_cpu);
  m.impl("lmul_matmul", &lmul_matmul_cpu);
}

}  // namespace torchmerge
