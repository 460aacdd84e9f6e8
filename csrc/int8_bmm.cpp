// torchmerge::int8_bmm: exact int32 products of int8 activations, out[b] = a[b] · b[b].
// Semantics: torchmerge/ops/intlinear.py (int8_bmm_reference). Attention's Q·Kᵀ and P·V in the
// integer-only lowering are batches of small matrices (64×32 · 32×64 per head in MiniLM), too small
// for a GEMM library per head and too many for one call each; this kernel packs each batch's right
// operand once and runs a register-tiled AVX512-VNNI loop (vpdpbusd), with AVX2 and scalar paths.
#include "common.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace torchmerge {
namespace {

constexpr int64_t kMaxK = ((int64_t(1) << 31) - 1) / (128 * 128);  // 131071, see intlinear.MAX_K_BMM
constexpr int64_t kRowBlock = 16;                               // rows of `a` per parallel task

// Plain loop over one block of rows: out[m, n] = Σ_k a[m, k] · b[k, n] in int32 (exact: |Σ| < 2^31 for
// K ≤ kMaxK). Written along n so the compiler vectorises it; cloned for AVX2 and the baseline ISA.
#define TM_BMM_CLONES(ATTR, SUFFIX)                                                                   \
  ATTR void rows_##SUFFIX(const int8_t* a, const int8_t* b, int32_t* out, int64_t m0, int64_t m1,     \
                          int64_t K, int64_t N) {                                                     \
    for (int64_t m = m0; m < m1; ++m) {                                                               \
      int32_t* o = out + m * N;                                                               \
      for (int64_t n = 0; n < N; ++n) o[n] = 0;                                                       \
      for (int64_t k = 0; k < K; ++k) {                                                               \
        const int32_t x = a[m * K + k];                                                               \
        const int8_t* br = b + k * N;                                                                 \
        for (int64_t n = 0; n < N; ++n) o[n] += x * int32_t(br[n]);                                   \
      }                                                                                               \
    }                                                                                                 \
  }
TM_BMM_CLONES(__attribute__((target("avx2"))), avx2)
TM_BMM_CLONES(, scalar)
#undef TM_BMM_CLONES

// One batch's right operand in VNNI order: packed[kk][n][j] = b[4kk + j][n] (zero past K and N, N padded
// to a multiple of 16), and colsum[n] = Σ_k b[k][n] for the unsigned-offset correction below.
struct PackedB {
  int64_t KP = 0, NP = 0;
  std::vector<int8_t> data;
  std::vector<int32_t> colsum;
  void pack(const int8_t* b, int64_t K, int64_t N) {
    KP = (K + 3) / 4;
    NP = (N + 15) / 16 * 16;
    data.assign(size_t(KP * NP * 4), 0);
    colsum.assign(size_t(NP), 0);
    for (int64_t k = 0; k < K; ++k) {  // contiguous rows of b: vectorises
      const int8_t* br = b + k * N;
      for (int64_t n = 0; n < N; ++n) colsum[size_t(n)] += br[n];
    }
    for (int64_t kk = 0; kk < KP; ++kk) {
      int8_t* dst = data.data() + kk * NP * 4;
      for (int j = 0; j < 4 && 4 * kk + j < K; ++j) {
        const int8_t* br = b + (4 * kk + j) * N;
        for (int64_t n = 0; n < N; ++n) dst[n * 4 + j] = br[n];
      }
    }
  }
};

// vpdpbusd multiplies unsigned by signed bytes: with a' = a + 128 (a XOR 0x80),
// Σ_k a'·b = Σ_k a·b + 128·colsum, so out = Σ a'·b − 128·colsum (all in wrapping int32: exact).
// Four rows at a time against NB·16 output columns: the trip counts are compile-time constants so the
// 4·NB accumulators stay in registers (a' rows are zero-padded to a multiple of four).
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void cols_vnni(
    const uint8_t* abuf, const PackedB& pb, int32_t* out, int64_t m0, int64_t m1, int64_t N, int64_t n0) {
  const int64_t KP = pb.KP, NP = pb.NP, K4 = KP * 4;
  __m512i corr[NB];
  for (int j = 0; j < NB; ++j) corr[j] = _mm512_slli_epi32(_mm512_loadu_si512(pb.colsum.data() + n0 + 16 * j), 7);
  for (int64_t r0 = m0; r0 < m1; r0 += 4) {
    const uint8_t* ar = abuf + (r0 - m0) * K4;
    __m512i acc[4][NB];
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < KP; ++kk) {
      const int8_t* bp = pb.data.data() + (kk * NP + n0) * 4;
      __m512i bv[NB];
      for (int j = 0; j < NB; ++j) bv[j] = _mm512_loadu_si512(bp + 64 * j);
      for (int r = 0; r < 4; ++r) {
        int32_t word;
        std::memcpy(&word, ar + r * K4 + 4 * kk, 4);
        const __m512i av = _mm512_set1_epi32(word);
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
      }
    }
    const int rows = int(std::min<int64_t>(4, m1 - r0));
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < NB; ++j) {
        const int64_t c0 = n0 + 16 * j;
        if (c0 >= N) break;
        const __mmask16 mask = N - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - c0)) - 1);
        _mm512_mask_storeu_epi32(out + (r0 + r) * N + c0, mask, _mm512_sub_epi32(acc[r][j], corr[j]));
      }
  }
}

void rows_vnni(const int8_t* a, const PackedB& pb, int32_t* out, int64_t m0, int64_t m1, int64_t K, int64_t N,
               std::vector<uint8_t>& abuf) {
  const int64_t K4 = pb.KP * 4, padded = (m1 - m0 + 3) / 4 * 4;
  abuf.assign(size_t(padded * K4), 0);  // a' rows, zero-padded to 4·KP columns and a multiple of 4 rows
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* dst = abuf.data() + (m - m0) * K4;
    const int8_t* src = a + m * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = uint8_t(src[k]) ^ 0x80;
  }
  for (int64_t n0 = 0; n0 < pb.NP; n0 += 64) {
    switch (std::min<int64_t>(4, (pb.NP - n0) / 16)) {
      case 1: cols_vnni<1>(abuf.data(), pb, out, m0, m1, N, n0); break;
      case 2: cols_vnni<2>(abuf.data(), pb, out, m0, m1, N, n0); break;
      case 3: cols_vnni<3>(abuf.data(), pb, out, m0, m1, N, n0); break;
      default: cols_vnni<4>(abuf.data(), pb, out, m0, m1, N, n0); break;
    }
  }
}

at::Tensor int8_bmm_cpu(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "int8_bmm";
  TORCH_CHECK_VALUE(a.scalar_type() == at::kChar && a.dim() >= 2, op, ": a must be a torch.int8 tensor [..., M, K]; got ",
                    a.scalar_type(), " ", a.sizes());
  TORCH_CHECK_VALUE(b.scalar_type() == at::kChar && b.dim() == a.dim(), op, ": b must be a torch.int8 tensor [..., K, N] with a's ",
                    a.dim(), " dims; got ", b.scalar_type(), " ", b.sizes());
  TORCH_CHECK_VALUE(a.sizes().slice(0, a.dim() - 2) == b.sizes().slice(0, b.dim() - 2), op,
                    ": a and b must have the same batch dims; got ", a.sizes(), " and ", b.sizes());
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  TORCH_CHECK_VALUE(b.size(-2) == K, op, ": b's K (", b.size(-2), ") must equal a's last dim (", K, ")");
  TORCH_CHECK_VALUE(K <= kMaxK, op, ": K=", K, " is too large: the int32 accumulator holds at most K·128·128 < 2^31, i.e. K ≤ ",
                    kMaxK);
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, a.options().dtype(at::kInt));
  const int64_t batch = M * N ? out.numel() / (M * N) : 0;
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int8_t* ap = ac.data_ptr<int8_t>();
  const int8_t* bp = bc.data_ptr<int8_t>();
  int32_t* op_ = out.data_ptr<int32_t>();
  const Isa isa = active_isa();
  const bool vnni = isa >= Isa::Avx512Vnni;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    PackedB pb;
    std::vector<uint8_t> abuf;
    int64_t packed_for = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / blocks, m0 = (t % blocks) * kRowBlock, m1 = std::min(M, m0 + kRowBlock);
      const int8_t* A = ap + bi * M * K;
      const int8_t* B = bp + bi * K * N;
      int32_t* O = op_ + bi * M * N;
      if (vnni) {
        if (packed_for != bi) pb.pack(B, K, N), packed_for = bi;
        rows_vnni(A, pb, O, m0, m1, K, N, abuf);
      } else if (isa >= Isa::Avx2) {
        rows_avx2(A, B, O, m0, m1, K, N);
      } else {
        rows_scalar(A, B, O, m0, m1, K, N);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) { m.impl("int8_bmm", &int8_bmm_cpu); }

}  // namespace torchmerge
