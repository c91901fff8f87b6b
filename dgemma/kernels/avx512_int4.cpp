// 4-bit weights times bf16 rows on CPUs with AVX-512 BF16 (dgemma/avx512_int4.py builds and loads this file).
//
// One op, dgemma::avx512_int4_grouped(rows [S, K] bf16, codes [E, N, K / 2] uint8, scales_and_zeros
// [E, N / 32, K / 32, 32, 2] bf16, ends int[E]) -> [S, N] bf16: rows ends[e - 1]..ends[e] times matrix e transposed,
// where matrix e's value at (n, k) is (code - 8) * scale + zero with the scale and zero of k's group of 32, as torch's
// int4 kernels define it. One matrix is E = 1; a mixture-of-experts layer passes every expert at once, rows grouped by
// expert.
//
// Scales and zeros, per matrix: for each block of 32 output columns, for each group of 32 k, the block's 32 (scale,
// zero) pairs. A block's are contiguous, and the next block's follow, so a thread that walks its blocks reads codes
// and scales as two streams. (In torch's layout, [K / 32, N, 2], a block's pairs for successive groups lie N * 4 bytes
// apart. Against it, the two kernels alternated in one process over released shapes read from memory on a 2-core AMD
// EPYC, Zen 5: one row 11 to 14 % faster, 16 rows 0 to 5 %; docs/quantization.md.)
//
// Codes layout, per matrix: blocks of 32 output columns; in a block, for each 8 consecutive k (a "quad" of four k
// pairs), 32 little-endian 32-bit words, word j for column j of the block. Bits 4i..4i+3 of a word hold k = 2i of the
// quad, bits 16+4i..16+4i+3 hold k = 2i+1. Shifted right by 4i and masked with 0x000F000F, a word is the pair (k = 2i,
// k = 2i+1) as two 16-bit integers 0..15 in the places of a bf16 pair; OR-ed with 0x43004300 they are the bf16 numbers
// 128 + code (128 is 2^7: bf16's 7 mantissa bits count units there), which VDPBF16PS multiplies with a pair of the
// row's values. So one 512-bit load, a shift and one ternary-logic op give 16 columns x 2 k of weights, no shuffle.
//
// Sums: per group of 32 k, A = sum_k x_k (128 + code_k) in fp32 (exact products, fp32 accumulation), and the group's
// contribution is scale * (A - 136 * X) + zero * X = scale * A + (zero - 136 * scale) * X, X the group's sum of x
// (128 for the bias, 8 for the code's zero point). Each output is one thread's fp32 sum in a fixed order, rounded to
// bf16 once: the same bits with any number of threads.
//
// Speed (a released expert, 1408 x 2816 and 2816 x 704, 64 matrices read from memory, a 2-core AMD EPYC, Zen 5): 16
// rows at 0.77 to 0.81 TFLOP/s against 0.44 to 0.50 for bf16 weights reordered for oneDNN and 0.32 for torch's int4
// kernel; one row as fast as torch's kernel or up to 1.5 times faster, both near the memory's rate. Without the
// software prefetch of the codes and scales a few groups ahead, 16 rows ran at 0.53 (the loop computes too long per
// cache line for the hardware prefetcher to keep up).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;      // k values per scale and zero
constexpr int64_t kBlock = 32;      // output columns per block of codes
constexpr int kMaxRows = 8;         // rows a block multiplies at once: 8 rows x 2 vectors = 16 accumulators
constexpr int64_t kPrefetchGroups = 16;  // how far ahead the codes and scales are prefetched

// One block of 32 columns times `Rows` rows: out[m, n0 .. n0 + 31] for m < Rows.
template <int Rows>
void multiply_block(const uint16_t* x, int64_t K, const float* group_sums, const uint32_t* codes,
                    const uint16_t* block_scales, int64_t N, int64_t n0, uint16_t* out) {
  // Independent accumulators per (row, vector): few rows get more, so that enough dot products are in flight.
  constexpr int kSplit = Rows >= 6 ? 1 : (Rows >= 3 ? 2 : 4);
  const int64_t groups = K / kGroup;
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 minus_136 = _mm512_set1_ps(-136.0f);
  alignas(64) float total[Rows][2][16] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const uint32_t* words = codes + g * 4 * kBlock;  // four quads of 32 words
    const uint16_t* scales = block_scales + g * kBlock * 2;
    // Past the end of this block (or of the tensor) a prefetch reads the next block's codes and scales, or nothing:
    // harmless.
    for (int line = 0; line < 8; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(words + kPrefetchGroups * 4 * kBlock) + 64 * line, _MM_HINT_T0);
    const char* ahead = reinterpret_cast<const char*>(scales + kPrefetchGroups * kBlock * 2);
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    __m512 sums[kSplit][Rows][2];
    for (int s = 0; s < kSplit; ++s)
      for (int m = 0; m < Rows; ++m) sums[s][m][0] = sums[s][m][1] = _mm512_setzero_ps();
    const uint16_t* xg = x + g * kGroup;
    for (int quad = 0; quad < 4; ++quad) {
      // The quad's words for the block's columns 0..15 and 16..31.
      const __m512i first = _mm512_loadu_si512(words + quad * kBlock);
      const __m512i second = _mm512_loadu_si512(words + quad * kBlock + 16);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const int pair = quad * 4 + i, s = pair % kSplit;
        // (word >> 4i) & 0x000F000F | 0x43004300: ternary-logic function 0xEA is (a & b) | c.
        const __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(first, 4 * i), nibbles, bias, 0xEA);
        const __m512bh w1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(second, 4 * i), nibbles, bias, 0xEA);
#pragma GCC unroll 8
        for (int m = 0; m < Rows; ++m) {
          int32_t values;  // x[m, 2 pair], x[m, 2 pair + 1]
          std::memcpy(&values, xg + m * K + 2 * pair, sizeof(values));
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(values);
          sums[s][m][0] = _mm512_dpbf16_ps(sums[s][m][0], w0, xv);
          sums[s][m][1] = _mm512_dpbf16_ps(sums[s][m][1], w1, xv);
        }
      }
    }
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      // 16 (scale, zero) bf16 pairs: as 32-bit words, the scale is the low half and the zero the high one.
      const __m512i pairs = _mm512_loadu_si512(scales + 32 * v);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      const __m512 offset = _mm512_fmadd_ps(scale, minus_136, zero);
#pragma GCC unroll 8
      for (int m = 0; m < Rows; ++m) {
        __m512 sum = sums[0][m][v];
        for (int s = 1; s < kSplit; ++s) sum = _mm512_add_ps(sum, sums[s][m][v]);
        const __m512 shifted = _mm512_fmadd_ps(offset, _mm512_set1_ps(group_sums[m * groups + g]),
                                               _mm512_load_ps(total[m][v]));
        _mm512_store_ps(total[m][v], _mm512_fmadd_ps(scale, sum, shifted));
      }
    }
  }
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < 2; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + n0 + 16 * v),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(total[m][v])));
}

using BlockFunction = void (*)(const uint16_t*, int64_t, const float*, const uint32_t*, const uint16_t*, int64_t,
                               int64_t, uint16_t*);
constexpr BlockFunction kBlockFunctions[kMaxRows + 1] = {
    nullptr, multiply_block<1>, multiply_block<2>, multiply_block<3>, multiply_block<4>,
    multiply_block<5>, multiply_block<6>, multiply_block<7>, multiply_block<8>};

at::Tensor grouped(const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scales_and_zeros,
                   at::IntArrayRef ends) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kBFloat16 && rows.is_contiguous() && rows.is_cpu(),
              "avx512_int4_grouped: rows must be a contiguous bf16 CPU matrix [S, K], got ", rows.scalar_type(), " ",
              rows.sizes());
  const int64_t S = rows.size(0), K = rows.size(1);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.is_cpu() &&
                  codes.size(2) * 2 == K && codes.size(1) % kBlock == 0 && K % kGroup == 0,
              "avx512_int4_grouped: codes must be contiguous uint8 [E, N, K / 2] with N a multiple of 32 and K of 32, "
              "got ", codes.scalar_type(), " ", codes.sizes(), " for rows of ", K);
  const int64_t E = codes.size(0), N = codes.size(1), groups = K / kGroup;
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.sizes() == at::IntArrayRef({E, N / kBlock, groups, kBlock, 2}),
              "avx512_int4_grouped: scales_and_zeros must be contiguous bf16 [", E, ", ", N / kBlock, ", ", groups,
              ", ", kBlock, ", 2], got ", scales_and_zeros.scalar_type(), " ", scales_and_zeros.sizes());
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == E, "avx512_int4_grouped: ", ends.size(), " ends for ", E,
              " matrices");
  std::vector<int64_t> begins(E), used;  // used: the matrices with rows
  for (int64_t e = 0, begin = 0; e < E; begin = ends[e], ++e) {
    TORCH_CHECK(ends[e] >= begin && ends[e] <= S, "avx512_int4_grouped: ends must rise from 0 to ", S, ", got ",
                ends);
    begins[e] = begin;
    if (ends[e] > begin) used.push_back(e);
  }
  TORCH_CHECK(E == 0 ? S == 0 : ends[E - 1] == S, "avx512_int4_grouped: ends must end at ", S, ", got ", ends);

  at::Tensor out = at::empty({S, N}, rows.options());
  at::Tensor sums = at::empty({S, groups}, rows.options().dtype(at::kFloat));
  const auto* x = reinterpret_cast<const uint16_t*>(rows.data_ptr());
  float* group_sums = sums.data_ptr<float>();
  at::parallel_for(0, S, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* values = x + r * K + g * kGroup;
        const __m512 a = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values)));
        const __m512 b = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 16)));
        group_sums[r * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
      }
  });
  const auto* words = reinterpret_cast<const uint32_t*>(codes.data_ptr());
  const auto* scales = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr());
  auto* result = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t blocks = N / kBlock, block_words = (K / 8) * kBlock;
  // Work items: (matrix with rows, block of 32 columns), each written by one thread.
  at::parallel_for(0, static_cast<int64_t>(used.size()) * blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t e = used[item / blocks], block = item % blocks;
      const uint32_t* block_codes = words + (e * blocks + block) * block_words;
      const uint16_t* block_scales = scales + (e * blocks + block) * groups * kBlock * 2;
      for (int64_t r = begins[e]; r < ends[e]; r += kMaxRows) {
        const int64_t count = std::min<int64_t>(kMaxRows, ends[e] - r);
        kBlockFunctions[count](x + r * K, K, group_sums + r * groups, block_codes, block_scales, N, block * kBlock,
                               result + r * N);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgemma, m) {
  m.def("avx512_int4_grouped(Tensor rows, Tensor codes, Tensor scales_and_zeros, int[] ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgemma, CPU, m) { m.impl("avx512_int4_grouped", &grouped); }

// Like torch's int4 kernels, no derivative: a product that records gradients raises when backward reaches it.
TORCH_LIBRARY_IMPL(dgemma, Autograd, m) {
  m.impl("avx512_int4_grouped", torch::autograd::autogradNotImplementedFallback());
}
