// A few rows times a matrix of one-byte codes on CPUs with AVX2 and FMA (dgemma/avx2_byte_codes.py builds and loads
// this file).
//
// One op, dgemma::avx2_byte_codes_rows(rows [M, K] float32, codes [N, K] uint8, scale [N, K / G] float32, offset
// [N, K / G] float32 or None, zero_code int) -> [M, N] float32: row m times matrix row n, where the matrix's value at
// (n, k) is (code - zero_code) * scale + offset with the scale and offset of k's group of G = K / scale.size(1)
// values (16 or 32): `dgemma.quantized.GroupQuantized`'s one-byte types (Q8_0, Q6_K, Q5_0, Q5_1, Q5_K).
//
// Per group, A = sum_k x_k code_k (each product exact in float32: a code has 8 bits, a widened bf16 value 8), summed
// in float32, and X = sum_k x_k; the group adds scale * A + (offset - zero_code * scale) * X. Each output is one
// thread's sum in a fixed order, rounded once by the caller: the same bits with any number of threads.
//
// Why: Inductor's loop for the same product (dgemma.quantized._few_rows_product) loads 8 codes at a time through a
// partial load on AVX2 and reads a Q8_0 matrix at about 1 G codes/s on a 2-core AMD EPYC of family 25 (Zen 3), an
// autoregressive token's 8-bit vocabulary matrix 0.7 s; this loop loads 32 at a time (docs/cpu.md has the figures).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

// The codes' bytes lo..lo+7 as eight floats.
inline __m256 widen8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

inline float horizontal_sum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

// sum over one group of x[k] * code[k], as a vector of eight partial sums.
template <int Group>
inline __m256 group_dot(const float* x, const uint8_t* codes) {
  static_assert(Group == 16 || Group == 32, "groups of 16 or 32 values");
  const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  __m256 a = _mm256_mul_ps(_mm256_loadu_ps(x), widen8(first));
  __m256 b = _mm256_mul_ps(_mm256_loadu_ps(x + 8), widen8(_mm_srli_si128(first, 8)));
  if constexpr (Group == 32) {
    const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16));
    a = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), widen8(second), a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), widen8(_mm_srli_si128(second, 8)), b);
  }
  return _mm256_add_ps(a, b);
}

template <int Group>
void multiply(const float* x, int64_t M, int64_t K, const float* group_sums, const uint8_t* codes, const float* scale,
              const float* offset, float zero_code, int64_t N, float* out) {
  const int64_t groups = K / Group;
  at::parallel_for(0, N, 16, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      const uint8_t* row_codes = codes + n * K;
      const float* row_scale = scale + n * groups;
      const float* row_offset = offset ? offset + n * groups : nullptr;
      for (int64_t m = 0; m < M; ++m) {  // the row's codes stay in L1 for the next input row
        const float* xm = x + m * K;
        const float* sums = group_sums + m * groups;
        __m256 total = _mm256_setzero_ps();
        float affine = 0.0f;
        for (int64_t g = 0; g < groups; ++g) {
          total = _mm256_fmadd_ps(_mm256_set1_ps(row_scale[g]), group_dot<Group>(xm + g * Group, row_codes + g * Group),
                                  total);
          affine += ((row_offset ? row_offset[g] : 0.0f) - zero_code * row_scale[g]) * sums[g];
        }
        out[m * N + n] = horizontal_sum(total) + affine;
      }
    }
  });
}

at::Tensor rows_times_codes(const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scale,
                            const std::optional<at::Tensor>& offset, int64_t zero_code) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat && rows.is_contiguous() && rows.is_cpu(),
              "avx2_byte_codes_rows: rows must be a contiguous float32 CPU matrix [M, K], got ", rows.scalar_type(),
              " ", rows.sizes());
  const int64_t M = rows.size(0), K = rows.size(1);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.is_cpu() &&
                  codes.size(1) == K,
              "avx2_byte_codes_rows: codes must be contiguous uint8 [N, K] with K = ", K, ", got ",
              codes.scalar_type(), " ", codes.sizes());
  const int64_t N = codes.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.is_cpu() &&
                  scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0,
              "avx2_byte_codes_rows: scale must be contiguous float32 [N, K / group] for codes ", codes.sizes(),
              ", got ", scale.scalar_type(), " ", scale.sizes());
  const int64_t group = K / scale.size(1);
  TORCH_CHECK(group == 16 || group == 32, "avx2_byte_codes_rows: groups of 16 or 32 values, got ", group);
  if (offset.has_value())
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->is_contiguous() && offset->is_cpu() &&
                    offset->sizes() == scale.sizes(),
                "avx2_byte_codes_rows: offset must be contiguous float32 ", scale.sizes(), ", got ",
                offset->scalar_type(), " ", offset->sizes());
  const int64_t groups = K / group;
  at::Tensor sums = at::empty({M, groups}, rows.options());
  const float* x = rows.data_ptr<float>();
  float* group_sums = sums.data_ptr<float>();
  for (int64_t i = 0; i < M * groups; ++i) {
    float sum = 0.0f;
    for (int64_t k = 0; k < group; ++k) sum += x[i * group + k];
    group_sums[i] = sum;
  }
  at::Tensor out = at::empty({M, N}, rows.options());
  const float* offsets = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  auto* run = group == 32 ? &multiply<32> : &multiply<16>;
  run(x, M, K, group_sums, codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), offsets, static_cast<float>(zero_code),
      N, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgemma, m) {
  m.def("avx2_byte_codes_rows(Tensor rows, Tensor codes, Tensor scale, Tensor? offset, int zero_code) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgemma, CPU, m) { m.impl("avx2_byte_codes_rows", &rows_times_codes); }

// No derivative: a product that records gradients raises when backward reaches it.
TORCH_LIBRARY_IMPL(dgemma, Autograd, m) {
  m.impl("avx2_byte_codes_rows", torch::autograd::autogradNotImplementedFallback());
}
