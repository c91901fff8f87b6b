// A few rows times large matrices on CPUs with AVX2 and FMA and no AVX-512, as an autoregressive token multiplies
// (dgemma/avx2_rows.py builds and loads this file). Four ops over rows [M, K] of float32, bf16 or fp16, each
// returning [M, N] in the rows' dtype: float32 sums rounded once (the casts in and out inside the op, not one torch
// call each: within a token every call is paid from cold caches):
//
// - dgemma::avx2_half_rows(rows [M, K], weight [E, N, K] bf16 or fp16, index [M] int64): row m times matrix
//   index[m] of the stack, each weight widened exactly to float32 and multiplied and summed in float32.
// - dgemma::avx2_half_block(rows [M, K], weight [N, K] bf16 or fp16): every row times the one matrix, which is read and
//   widened once for all of them (an expert's few rows in a denoising step).
// - dgemma::avx2_byte_codes_rows(rows [M, K], codes [N, K] uint8, scale [N, K / G] float32, offset
//   [N, K / G] float32 or None, zero_code int): the matrix's value at (n, k) is (code - zero_code) * scale + offset
//   with the scale and offset of k's group of G = K / scale.size(1) values (16 or 32): the one-byte types of
//   `dgemma.quantized.GroupQuantized` (Q8_0, Q6_K, Q5_0, Q5_1, Q5_K).
// - dgemma::avx2_int4_rows(rows [M, K], codes [E, N, K / 2] uint8 in this kernel's layout (`dgemma.avx2_rows.pack`),
//   scales_and_zeros [E, N / 32, K / 32, 32, 2] bf16: each block of 32 output columns' (scale, zero) pairs group
//   after group, index [M] int64): value = (code - 8) * scale + zero per group of 32, what
//   torch._weight_int4pack_mm_for_cpu computes with the pairs in its layout [K / 32, N, 2], row m times matrix
//   index[m].
//
// The quantised ops take each group of the row at 16 bits: the group's values times a power of two (exact) that puts
// its largest magnitude in [2^14, 2^15), rounded to integers. A bf16 value within 2^7 of the group's largest is exact;
// any value is off by at most 2^-16 of the power of two above the largest (so 2^-15 of the largest). The codes (less
// their zero) times these integers are summed exactly in int32 (vpmaddwd, two products an instruction), and each
// group's sum enters a float32 total times scale x the power of two; the offsets (and torch's zeros) times the group's
// float32 sum of the row. Each output is one thread's sum in a fixed order: the same bits with any number of threads.
//
// Why: these products are bound by reading the matrix, and the loops before them were not: on a 2-core AMD EPYC of
// family 25 (Zen 3) torch's eager int4 kernel read one row's 4-bit matrix at 5.5 GB/s, dgemma's float32 loop over
// byte codes at 10 to 12 G codes/s and Inductor's one-row bf16 loop at 10 to 16 GB/s, each as slow from cache as from
// memory, where the machine reads memory at 20 GB/s (docs/cpu.md has the figures).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

// ---- rows in, sums out ---------------------------------------------------------------------------------------------

void check_rows(const char* op, const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.is_cpu() &&
                  (rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16 ||
                   rows.scalar_type() == at::kHalf),
              op, ": rows must be a contiguous float32, bf16 or fp16 CPU matrix [M, K], got ", rows.scalar_type(), " ",
              rows.sizes());
}

template <bool Bf16>
inline __m256 widen(const uint16_t* values) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
  if constexpr (Bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  return _mm256_cvtph_ps(half);
}

inline float widen_one(uint16_t value, bool bf16) {
  if (bf16) {
    const uint32_t bits = static_cast<uint32_t>(value) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  return _cvtsh_ss(value);
}

// The rows as float32: their own data, or a widened (exact) copy of bf16 or fp16 rows, eight values an instruction.
struct FloatRows {
  std::vector<float> widened;
  const float* data;

  explicit FloatRows(const at::Tensor& rows) {
    if (rows.scalar_type() == at::kFloat) {
      data = rows.data_ptr<float>();
      return;
    }
    const int64_t count = rows.numel();
    widened.resize(count);
    const auto* in = reinterpret_cast<const uint16_t*>(rows.data_ptr());
    const bool bf16 = rows.scalar_type() == at::kBFloat16;
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(widened.data() + i, bf16 ? widen<true>(in + i) : widen<false>(in + i));
    for (; i < count; ++i) widened[i] = widen_one(in[i], bf16);
    data = widened.data();
  }
};

// The float32 sums [M, N] a kernel writes (`data`), returned in the rows' dtype (`rounded`: once, to nearest even).
struct Sums {
  at::Tensor out;
  std::vector<float> scratch;
  float* data;

  Sums(const at::Tensor& rows, int64_t M, int64_t N) : out(at::empty({M, N}, rows.options())) {
    if (rows.scalar_type() == at::kFloat) {
      data = out.data_ptr<float>();
    } else {
      scratch.resize(M * N);
      data = scratch.data();
    }
  }

  at::Tensor rounded() {
    if (!scratch.empty())
      AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "round sums", [&] {
        scalar_t* result = out.data_ptr<scalar_t>();
        for (size_t i = 0; i < scratch.size(); ++i) result[i] = static_cast<scalar_t>(scratch[i]);
      });
    return out;
  }
};

// ---- rows at 16 bits a group ---------------------------------------------------------------------------------------

// The rows [M, K] as integers, group by group: value = integer * unit[group], unit a power of two; also each group's
// float32 sum of the row (for offsets and zeros; eight partial sums added in a fixed order) and sum of its integers
// (for a zero code taken out of the codes' sums). Groups of 16 or 32, eight values an instruction, and a row equal to
// the one before it (a token's row, once for each of its experts) copied, not converted again: every product of a
// token pays for it. On a 2-core Zen 3, 8 equal rows of 2,816 times a 32 x 2,816 4-bit matrix took 96 us a call
// converted one value at a time, 56 us so; one row 19 and 18 us.
struct SixteenBitRows {
  std::vector<int16_t> integers;  // [M, K]
  std::vector<float> unit, sums;  // [M, K / group]
  std::vector<int32_t> integer_sums;  // [M, K / group]

  SixteenBitRows(const float* x, int64_t M, int64_t K, int64_t group)
      : integers(M * K), unit(M * K / group), sums(M * K / group), integer_sums(M * K / group) {
    TORCH_CHECK(group % 8 == 0, "SixteenBitRows: groups of a multiple of 8 values, got ", group);
    const int64_t groups = K / group;
    for (int64_t m = 0; m < M; ++m) {
      if (m > 0 && std::memcmp(x + m * K, x + (m - 1) * K, K * sizeof(float)) == 0) {
        std::memcpy(integers.data() + m * K, integers.data() + (m - 1) * K, K * sizeof(int16_t));
        for (auto* column : {&unit, &sums})
          std::memcpy(column->data() + m * groups, column->data() + (m - 1) * groups, groups * sizeof(float));
        std::memcpy(integer_sums.data() + m * groups, integer_sums.data() + (m - 1) * groups,
                    groups * sizeof(int32_t));
        continue;
      }
      for (int64_t g = m * groups; g < (m + 1) * groups; ++g) convert(x + g * group, group, g);
    }
  }

 private:
  void convert(const float* values, int64_t group, int64_t g) {
    const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 largest8 = _mm256_setzero_ps(), sum8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < group; k += 8) {
      const __m256 v = _mm256_loadu_ps(values + k);
      largest8 = _mm256_max_ps(largest8, _mm256_and_ps(v, magnitude_mask));
      sum8 = _mm256_add_ps(sum8, v);
    }
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(largest8), _mm256_extractf128_ps(largest8, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    const float largest = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
    int exponent = 0;
    std::frexp(largest, &exponent);  // largest < 2^exponent
    // Scaled up by 2^(15 - exponent) in two exact steps (one could pass float32's range for tiny values).
    const int up = largest > 0.0f ? 15 - exponent : 0;
    const __m256 first = _mm256_set1_ps(std::ldexp(1.0f, up / 2));
    const __m256 second = _mm256_set1_ps(std::ldexp(1.0f, up - up / 2));
    const __m256i high = _mm256_set1_epi32(32767), low = _mm256_set1_epi32(-32767);
    __m256i integer_sum8 = _mm256_setzero_si256();
    for (int64_t k = 0; k < group; k += 8) {
      // |value| * 2^up < 2^15; rounding (to nearest even) may reach 2^15 only from within 2^-16 of it
      const __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(values + k), first), second);
      const __m256i rounded = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(scaled), high), low);
      integer_sum8 = _mm256_add_epi32(integer_sum8, rounded);
      const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(integers.data() + g * group + k), packed);
    }
    __m128i integer_half =
        _mm_add_epi32(_mm256_castsi256_si128(integer_sum8), _mm256_extracti128_si256(integer_sum8, 1));
    integer_half = _mm_hadd_epi32(integer_half, integer_half);
    integer_half = _mm_hadd_epi32(integer_half, integer_half);
    unit[g] = largest > 0.0f ? std::ldexp(1.0f, exponent - 15) : 0.0f;
    sums[g] = horizontal_sum(sum8);
    integer_sums[g] = _mm_cvtsi128_si32(integer_half);
  }
};

// ---- bf16 and fp16 matrices ----------------------------------------------------------------------------------------

// A bf16 or fp16 weight of `dims` dimensions (`shape` names them) whose rows are K values long, contiguous on the CPU.
void check_half_weight(const char* op, const at::Tensor& weight, int64_t dims, int64_t K, const char* shape) {
  TORCH_CHECK(weight.dim() == dims && (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf) &&
                  weight.is_contiguous() && weight.is_cpu() && weight.size(dims - 1) == K,
              op, ": weight must be a contiguous bf16 or fp16 CPU ", shape, " with K = ", K, ", got ",
              weight.scalar_type(), " ", weight.sizes());
}

template <bool Bf16>
float half_dot(const float* x, const uint16_t* weight, int64_t K) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps(), d = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen<Bf16>(weight + k), a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), widen<Bf16>(weight + k + 8), b);
    c = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), widen<Bf16>(weight + k + 16), c);
    d = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), widen<Bf16>(weight + k + 24), d);
  }
  for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen<Bf16>(weight + k), a);
  float total = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  for (; k < K; ++k) total += x[k] * widen_one(weight[k], Bf16);
  return total;
}

// Work items are (row, block of output columns): one row reads its matrix once; a block is small enough that the two
// cores share a row's matrix.
constexpr int64_t HALF_BLOCK = 64;

at::Tensor half_rows(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& index) {
  check_rows("avx2_half_rows", rows);
  const int64_t M = rows.size(0), K = rows.size(1);
  check_half_weight("avx2_half_rows", weight, 3, K, "stack [E, N, K]");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() && index.is_cpu() &&
                  index.size(0) == M,
              "avx2_half_rows: index must be a contiguous int64 CPU vector of ", M, " entries, got ",
              index.scalar_type(), " ", index.sizes());
  const int64_t E = weight.size(0), N = weight.size(1);
  const int64_t* chosen = index.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(chosen[m] >= 0 && chosen[m] < E, "avx2_half_rows: index ", chosen[m], " out of range for ", E,
                " matrices");
  const FloatRows float_rows(rows);
  const float* x = float_rows.data;
  Sums sums(rows, M, N);
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  float* result = sums.data;
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  const int64_t blocks = (N + HALF_BLOCK - 1) / HALF_BLOCK;
  at::parallel_for(0, M * blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t m = item / blocks, begin = (item % blocks) * HALF_BLOCK, end = std::min(N, begin + HALF_BLOCK);
      const uint16_t* matrix = w + chosen[m] * N * K;
      for (int64_t n = begin; n < end; ++n)
        result[m * N + n] = bf16 ? half_dot<true>(x + m * K, matrix + n * K, K)
                                 : half_dot<false>(x + m * K, matrix + n * K, K);
    }
  });
  return sums.rounded();
}

// ---- a few rows sharing one bf16 or fp16 matrix ---------------------------------------------------------------------

// Rows times one matrix, register-blocked: BLOCK_COLUMNS of the matrix's rows are widened a chunk of BLOCK_DEPTH
// values at a time into a buffer in L1, and every row (three at a time: twelve float32 accumulators and four weight
// vectors fill AVX2's sixteen registers) multiplies the chunk from there, so each weight is read from memory and
// widened once for all the rows. torch's float32 matmul of 16 rows by a widened tile ran at 45 GFLOP/s on a 2-core
// Zen 3 (an expert of the released model in a denoising step); this loop at about 70.
constexpr int BLOCK_COLUMNS = 4;
constexpr int64_t BLOCK_DEPTH = 256;

// Accumulate `Rows` rows (x: the first, rows K8 apart) times the widened chunk `chunk` of `depth` values (a multiple of
// 8) into their BLOCK_COLUMNS accumulators each.
template <int Rows>
inline void rows_times_chunk(const float* x, int64_t K8, const float (*chunk)[BLOCK_DEPTH], int64_t depth,
                             __m256* totals) {
  __m256 sum[Rows][BLOCK_COLUMNS];
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < BLOCK_COLUMNS; ++j) sum[r][j] = totals[r * BLOCK_COLUMNS + j];
  for (int64_t k = 0; k < depth; k += 8) {
    const __m256 w0 = _mm256_load_ps(chunk[0] + k), w1 = _mm256_load_ps(chunk[1] + k);
    const __m256 w2 = _mm256_load_ps(chunk[2] + k), w3 = _mm256_load_ps(chunk[3] + k);
    for (int r = 0; r < Rows; ++r) {
      const __m256 value = _mm256_loadu_ps(x + r * K8 + k);
      sum[r][0] = _mm256_fmadd_ps(value, w0, sum[r][0]);
      sum[r][1] = _mm256_fmadd_ps(value, w1, sum[r][1]);
      sum[r][2] = _mm256_fmadd_ps(value, w2, sum[r][2]);
      sum[r][3] = _mm256_fmadd_ps(value, w3, sum[r][3]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < BLOCK_COLUMNS; ++j) totals[r * BLOCK_COLUMNS + j] = sum[r][j];
}

at::Tensor half_block(const at::Tensor& rows, const at::Tensor& weight) {
  check_rows("avx2_half_block", rows);
  const int64_t M = rows.size(0), K = rows.size(1);
  check_half_weight("avx2_half_block", weight, 2, K, "matrix [N, K]");
  const int64_t N = weight.size(0), K8 = (K + 7) / 8 * 8;
  // The rows in float32, each padded with zeros to a multiple of 8 values (the chunk's padding is zero too).
  std::vector<float> x(M * K8, 0.0f);
  const FloatRows float_rows(rows);
  for (int64_t m = 0; m < M; ++m) std::memcpy(x.data() + m * K8, float_rows.data + m * K, K * sizeof(float));
  Sums sums(rows, M, N);
  float* result = sums.data;
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  const int64_t blocks = (N + BLOCK_COLUMNS - 1) / BLOCK_COLUMNS;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    alignas(32) float chunk[BLOCK_COLUMNS][BLOCK_DEPTH];
    std::vector<__m256> totals(M * BLOCK_COLUMNS);
    for (int64_t block = first; block < last; ++block) {
      const int64_t n0 = block * BLOCK_COLUMNS, columns = std::min<int64_t>(BLOCK_COLUMNS, N - n0);
      std::fill(totals.begin(), totals.end(), _mm256_setzero_ps());
      for (int64_t start = 0; start < K; start += BLOCK_DEPTH) {
        const int64_t depth = std::min(BLOCK_DEPTH, K - start), padded = (depth + 7) / 8 * 8;
        for (int j = 0; j < BLOCK_COLUMNS; ++j) {
          int64_t k = 0;
          if (j < columns) {
            const uint16_t* values = w + (n0 + j) * K + start;
            for (; k + 8 <= depth; k += 8)
              _mm256_store_ps(chunk[j] + k, bf16 ? widen<true>(values + k) : widen<false>(values + k));
            for (; k < depth; ++k) chunk[j][k] = widen_one(values[k], bf16);
          }
          for (; k < padded; ++k) chunk[j][k] = 0.0f;
        }
        int64_t m = 0;
        for (; m + 3 <= M; m += 3)
          rows_times_chunk<3>(x.data() + m * K8 + start, K8, chunk, padded, totals.data() + m * BLOCK_COLUMNS);
        for (; m < M; ++m)
          rows_times_chunk<1>(x.data() + m * K8 + start, K8, chunk, padded, totals.data() + m * BLOCK_COLUMNS);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < columns; ++j) result[m * N + n0 + j] = horizontal_sum(totals[m * BLOCK_COLUMNS + j]);
    }
  });
  return sums.rounded();
}

// ---- one-byte codes -------------------------------------------------------------------------------------------------

// sum over one group of code x integer (the zero code is taken out later, from the row's integer sums), as eight
// int32 partial sums: exact (|code x integer| < 2^8 x 2^15, 32 of them).
template <int Group>
inline __m256i group_dot(const int16_t* x, const uint8_t* codes) {
  static_assert(Group == 16 || Group == 32, "groups of 16 or 32 values");
  const __m256i first = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  __m256i sum = _mm256_madd_epi16(first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  if constexpr (Group == 32) {
    const __m256i second = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16)));
    const __m256i next_x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(second, next_x));
  }
  return sum;
}

// Eight groups' partial sums (eight int32 each) -> their eight totals, group j in lane j.
inline __m256i eight_totals(const __m256i* partial) {
  const __m256i pairs01 = _mm256_hadd_epi32(partial[0], partial[1]);
  const __m256i pairs23 = _mm256_hadd_epi32(partial[2], partial[3]);
  const __m256i pairs45 = _mm256_hadd_epi32(partial[4], partial[5]);
  const __m256i pairs67 = _mm256_hadd_epi32(partial[6], partial[7]);
  // lanes 0-3: groups 0-3's sums over their partial sums 0-3; lanes 4-7: over 4-7 (and the same for groups 4-7)
  const __m256i low = _mm256_hadd_epi32(pairs01, pairs23), high = _mm256_hadd_epi32(pairs45, pairs67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31));
}

// The rows' part of the zero code, zero_code x each group's integer sum, an int32 [M, K / Group]: subtracted from the
// codes' exact group sums (|code x integer sum| < 2^8 x 2^15 x 32, the difference too), so each group's sum is exact.
std::vector<int32_t> zero_parts(const SixteenBitRows& x, int32_t zero_code) {
  std::vector<int32_t> parts(x.integer_sums.size());
  for (size_t g = 0; g < parts.size(); ++g) parts[g] = zero_code * x.integer_sums[g];
  return parts;
}

// Eight groups at a time: their exact integer sums (eight vectors of partial sums reduced to one), less the zero
// code's part, enter a vector of eight float32 totals times scale x unit. A group so costs a few vector instructions
// and the totals' additions are one chain per eight groups, where a group at a time (a broadcast scale, a float32
// total per group, a scalar offset) bound the loop from cache: on a Zen 3 a Q6_K matrix from L3 went from 19 to 31
// GB/s; from memory a released layer's matrices took 0.94 to 0.97 of the time, the 262,144-row vocabulary matrix
// 0.82 to 0.89. The last groups (K / Group not a multiple of 8) one at a time. Each output is one thread's sum in this
// fixed order.
template <int Group>
void multiply_codes(const SixteenBitRows& x, int64_t M, int64_t K, const uint8_t* codes, const float* scale,
                    const float* offset, int32_t zero_code, int64_t N, float* out) {
  const int64_t groups = K / Group, whole = groups / 8 * 8;
  const std::vector<int32_t> zeros = zero_parts(x, zero_code);
  at::parallel_for(0, N, 16, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      const uint8_t* row_codes = codes + n * K;
      const float* row_scale = scale + n * groups;
      const float* row_offset = offset ? offset + n * groups : nullptr;
      for (int64_t m = 0; m < M; ++m) {  // the row's codes stay in L1 for the next input row
        const int16_t* integers = x.integers.data() + m * K;
        const float* unit = x.unit.data() + m * groups;
        const float* sums = x.sums.data() + m * groups;
        const int32_t* zero = zeros.data() + m * groups;
        __m256 total = _mm256_setzero_ps(), offsets = _mm256_setzero_ps();
        for (int64_t g = 0; g < whole; g += 8) {
          if (m == 0)  // the codes 16 groups ahead (a little faster from memory than the hardware's prefetch alone)
            for (int64_t line = 0; line < 8 * Group; line += 64)
              _mm_prefetch(reinterpret_cast<const char*>(row_codes + (g + 16) * Group + line), _MM_HINT_T0);
          __m256i partial[8];
          for (int j = 0; j < 8; ++j)
            partial[j] = group_dot<Group>(integers + (g + j) * Group, row_codes + (g + j) * Group);
          const __m256i exact = _mm256_sub_epi32(eight_totals(partial),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zero + g)));
          const __m256 factor = _mm256_mul_ps(_mm256_loadu_ps(row_scale + g), _mm256_loadu_ps(unit + g));
          total = _mm256_fmadd_ps(factor, _mm256_cvtepi32_ps(exact), total);
          if (row_offset)
            offsets = _mm256_fmadd_ps(_mm256_loadu_ps(row_offset + g), _mm256_loadu_ps(sums + g), offsets);
        }
        float rest = 0.0f;
        for (int64_t g = whole; g < groups; ++g) {
          const __m256i partial = group_dot<Group>(integers + g * Group, row_codes + g * Group);
          __m128i half = _mm_add_epi32(_mm256_castsi256_si128(partial), _mm256_extracti128_si256(partial, 1));
          half = _mm_hadd_epi32(half, half);
          half = _mm_hadd_epi32(half, half);
          rest += row_scale[g] * unit[g] * static_cast<float>(_mm_cvtsi128_si32(half) - zero[g]);
          if (row_offset) rest += row_offset[g] * sums[g];
        }
        out[m * N + n] = horizontal_sum(total) + horizontal_sum(offsets) + rest;
      }
    }
  });
}

at::Tensor byte_codes_rows(const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scale,
                           const std::optional<at::Tensor>& offset, int64_t zero_code) {
  check_rows("avx2_byte_codes_rows", rows);
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
  TORCH_CHECK(zero_code >= 0 && zero_code <= 255, "avx2_byte_codes_rows: zero_code must be a byte, got ", zero_code);
  if (offset.has_value())
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->is_contiguous() && offset->is_cpu() &&
                    offset->sizes() == scale.sizes(),
                "avx2_byte_codes_rows: offset must be contiguous float32 ", scale.sizes(), ", got ",
                offset->scalar_type(), " ", offset->sizes());
  const SixteenBitRows x(FloatRows(rows).data, M, K, group);
  Sums sums(rows, M, N);
  const float* offsets = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  auto* run = group == 32 ? &multiply_codes<32> : &multiply_codes<16>;
  run(x, M, K, codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), offsets, static_cast<int32_t>(zero_code), N,
      sums.data);
  return sums.rounded();
}

// ---- 4-bit codes in dgemma's AVX2 layout ---------------------------------------------------------------------------
// `dgemma.avx2_rows.pack` lays a matrix's [N, K] codes out in blocks of 32 output columns, block b K x 16 bytes: for
// each pair of depths (k, k + 1), k even, 32 bytes read as sixteen 16-bit lanes, lane 2i + s holding depth k + s of
// column i, 8 + i, 16 + i and 24 + i in its four nibbles, lowest first. A lane's four nibbles taken out by a mask and
// shifts are then four vectors, each holding depths (k, k + 1) of eight columns side by side: what vpmaddwd
// multiplies by the row's two values at (k, k + 1). torch's eager layout (a depth's 16 bytes, column j's code in the
// low nibble of byte j, column 16 + j's in its high one) needs four unpacks and two widenings more per pair of depths
// to put them so; on a 2-core Zen 3 the loop then read a matrix from cache at 10 GB/s a core, in this layout at 21.
constexpr int64_t INT4_BLOCK = 32, INT4_GROUP = 32;

// A float32 total [8 columns] of one block plus one group: its exact sums times scale x unit, and zero x the row's sum
// there. `pairs`: the eight columns' (scale, zero) bf16 pairs in this group.
inline __m256 add_group(__m256 total, __m256i dot, const uint16_t* pairs, float unit, float row_sum) {
  // as int32: scale in the low half, zero in the high one
  const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
  const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(both, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000))));
  total = _mm256_fmadd_ps(zero, _mm256_set1_ps(row_sum), total);
  return _mm256_fmadd_ps(_mm256_mul_ps(scale, _mm256_set1_ps(unit)), _mm256_cvtepi32_ps(dot), total);
}

// Rows (one or two: consecutive rows that read the same matrix) times one block's 32 columns: out[32] float32 for
// each row, N apart, the block's codes and its pairs (group after group) each one stream. Two rows share each
// unpacking of the codes: a denoising step sends each expert about 16 rows. Each row's sums and their float32 order
// are those of the row alone, so the bits do not depend on the pairing. Hint: how the codes and pairs are prefetched
// (see int4_rows).
template <_mm_hint Hint, int Rows>
void int4_block(const SixteenBitRows& x, int64_t m, const uint8_t* codes, const uint16_t* pairs, int64_t K, int64_t N,
                float* out) {
  static_assert(Rows == 1 || Rows == 2, "one row or two");
  const int64_t groups = K / INT4_GROUP;
  const int16_t* integers[Rows];
  const float *unit[Rows], *row_sums[Rows];
  const int32_t* integer_sums[Rows];
  for (int r = 0; r < Rows; ++r) {
    integers[r] = x.integers.data() + (m + r) * K;
    unit[r] = x.unit.data() + (m + r) * groups;
    row_sums[r] = x.sums.data() + (m + r) * groups;
    integer_sums[r] = x.integer_sums.data() + (m + r) * groups;
  }
  const __m256i nibble = _mm256_set1_epi16(0x0F);
  __m256 totals[Rows][4];  // columns 0-7, 8-15, 16-23, 24-31
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i) totals[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[Rows][4];
    for (int r = 0; r < Rows; ++r)
      for (int i = 0; i < 4; ++i) sums[r][i] = _mm256_setzero_si256();
    for (int line = 0; line < 8; ++line)  // the codes four groups ahead
      _mm_prefetch(reinterpret_cast<const char*>(codes + (g + 4) * INT4_GROUP * 16 + 64 * line), Hint);
    for (int64_t k = g * INT4_GROUP; k < (g + 1) * INT4_GROUP; k += 2) {
      const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 16));
      const __m256i codes_of[4] = {_mm256_and_si256(both, nibble), _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble),
                                   _mm256_and_si256(_mm256_srli_epi16(both, 8), nibble), _mm256_srli_epi16(both, 12)};
      for (int r = 0; r < Rows; ++r) {
        int32_t pair;
        std::memcpy(&pair, integers[r] + k, sizeof(pair));  // (x[k], x[k + 1])
        const __m256i xs = _mm256_set1_epi32(pair);
        for (int i = 0; i < 4; ++i) sums[r][i] = _mm256_add_epi32(sums[r][i], _mm256_madd_epi16(codes_of[i], xs));
      }
    }
    const uint16_t* group_pairs = pairs + g * INT4_BLOCK * 2;  // this block's 32 pairs in group g
    _mm_prefetch(reinterpret_cast<const char*>(group_pairs + 4 * INT4_BLOCK * 2), Hint);  // four groups ahead
    _mm_prefetch(reinterpret_cast<const char*>(group_pairs + 4 * INT4_BLOCK * 2 + 32), Hint);
    for (int r = 0; r < Rows; ++r) {
      // codes less 8: take 8 x the group's integers from every column's sum
      const __m256i eights = _mm256_set1_epi32(8 * integer_sums[r][g]);
      for (int i = 0; i < 4; ++i)
        totals[r][i] = add_group(totals[r][i], _mm256_sub_epi32(sums[r][i], eights), group_pairs + 16 * i,
                                 unit[r][g], row_sums[r][g]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + r * N + 8 * i, totals[r][i]);
}

at::Tensor int4_rows(const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scales_and_zeros,
                     const at::Tensor& index) {
  check_rows("avx2_int4_rows", rows);
  const int64_t M = rows.size(0), K = rows.size(1);
  TORCH_CHECK(K % INT4_GROUP == 0, "avx2_int4_rows: rows of a multiple of ", INT4_GROUP, " values, got ", K);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.is_cpu() &&
                  codes.size(2) * 2 == K && codes.size(1) % INT4_BLOCK == 0,
              "avx2_int4_rows: codes must be a contiguous uint8 CPU stack [E, N, K / 2] with K = ", K,
              " and N a multiple of ", INT4_BLOCK, ", got ", codes.scalar_type(), " ", codes.sizes());
  const int64_t E = codes.size(0), N = codes.size(1);
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.is_cpu() &&
                  scales_and_zeros.sizes() == at::IntArrayRef({E, N / INT4_BLOCK, K / INT4_GROUP, INT4_BLOCK, 2}),
              "avx2_int4_rows: scales_and_zeros must be contiguous bf16 [", E, ", ", N / INT4_BLOCK, ", ",
              K / INT4_GROUP, ", ", INT4_BLOCK, ", 2], got ", scales_and_zeros.scalar_type(), " ",
              scales_and_zeros.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() && index.is_cpu() &&
                  index.size(0) == M,
              "avx2_int4_rows: index must be a contiguous int64 CPU vector of ", M, " entries, got ",
              index.scalar_type(), " ", index.sizes());
  const int64_t* chosen = index.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(chosen[m] >= 0 && chosen[m] < E, "avx2_int4_rows: index ", chosen[m], " out of range for ", E,
                " matrices");
  const SixteenBitRows x(FloatRows(rows).data, M, K, INT4_GROUP);
  Sums sums(rows, M, N);
  const uint8_t* all_codes = codes.data_ptr<uint8_t>();
  const auto* all_pairs = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr());
  float* result = sums.data;
  const int64_t blocks = N / INT4_BLOCK, groups = K / INT4_GROUP;
  // Consecutive rows that read one matrix go two at a time (`int4_block`): (first row, 1 or 2).
  std::vector<std::pair<int64_t, int>> runs;
  for (int64_t m = 0; m < M; m += runs.back().second)
    runs.emplace_back(m, m + 1 < M && chosen[m + 1] == chosen[m] ? 2 : 1);
  // Where no two rows read one matrix (a token's experts, one row) nothing read is read again: the prefetches are
  // non-temporal, so that the stream evicts less of the caches' code and data for the token's next operations (a
  // 2-layer slice of the released model's token, 4-bit: 18.3 against 16.9 ms, alternated runs on a Zen 3).
  std::vector<int64_t> sorted(chosen, chosen + M);
  std::sort(sorted.begin(), sorted.end());
  const bool streamed = std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end();
  const int64_t work = static_cast<int64_t>(runs.size()) * blocks;
  at::parallel_for(0, work, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const auto [m, count] = runs[item / blocks];
      const int64_t block = item % blocks, matrix = chosen[m];
      const uint8_t* block_codes = all_codes + (matrix * N + block * INT4_BLOCK) * (K / 2);
      const uint16_t* block_pairs = all_pairs + (matrix * blocks + block) * groups * INT4_BLOCK * 2;
      float* out = result + m * N + block * INT4_BLOCK;
      if (count == 2)
        int4_block<_MM_HINT_T0, 2>(x, m, block_codes, block_pairs, K, N, out);
      else if (streamed)
        int4_block<_MM_HINT_NTA, 1>(x, m, block_codes, block_pairs, K, N, out);
      else
        int4_block<_MM_HINT_T0, 1>(x, m, block_codes, block_pairs, K, N, out);
    }
  });
  return sums.rounded();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgemma, m) {
  m.def("avx2_half_rows(Tensor rows, Tensor weight, Tensor index) -> Tensor");
  m.def("avx2_half_block(Tensor rows, Tensor weight) -> Tensor");
  m.def("avx2_byte_codes_rows(Tensor rows, Tensor codes, Tensor scale, Tensor? offset, int zero_code) -> Tensor");
  m.def("avx2_int4_rows(Tensor rows, Tensor codes, Tensor scales_and_zeros, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgemma, CPU, m) {
  m.impl("avx2_half_rows", &half_rows);
  m.impl("avx2_half_block", &half_block);
  m.impl("avx2_byte_codes_rows", &byte_codes_rows);
  m.impl("avx2_int4_rows", &int4_rows);
}

// No derivatives: a product that records gradients raises when backward reaches it.
TORCH_LIBRARY_IMPL(dgemma, Autograd, m) {
  m.impl("avx2_half_rows", torch::autograd::autogradNotImplementedFallback());
  m.impl("avx2_half_block", torch::autograd::autogradNotImplementedFallback());
  m.impl("avx2_byte_codes_rows", torch::autograd::autogradNotImplementedFallback());
  m.impl("avx2_int4_rows", torch::autograd::autogradNotImplementedFallback());
}
