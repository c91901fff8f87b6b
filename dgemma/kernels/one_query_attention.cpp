// One query a row attending to bf16 keys and values in float32, on CPUs with AVX-512 BF16 or with AVX2 and FMA
// (dgemma/one_query_attention.py builds this file once for the CPU it runs on, with that CPU's instructions).
//
// One op, dgemma::avx512_one_query_attention or dgemma::avx2_one_query_attention by the build (q [B, H, 1, D] bf16,
// keys [B, Hkv, S, D] bf16, values [B, Hkv, S, D] bf16, mask [B, 1, 1, S] bool or None) -> [B, H, 1, D] bf16:
// softmax(q . k) v per head, scale 1, the H / Hkv query heads of a key head sharing it, masked keys left out;
// computed in float32 and rounded once to bf16. It is what dgemma.model.attend_one_query computes eagerly, which
// widens every key and value to a float32 copy before two batched matmuls: five times the cache's bytes through
// memory for a token, where this reads them once (keys and values may be views of a longer cache: only the last
// dimension must be contiguous).
//
// Work items: (row, key head, chunk of kChunk keys), each one thread's, giving the chunk's maximum score, sum of
// exponentials and weighted values per query head; a second pass combines a head's chunks in order. So the bits do
// not depend on the thread count, and a long cache keeps every thread busy on a layer with few key heads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // keys a work item reads
constexpr int kMaxGroup = 16;    // query heads a key head may serve

// The float32 vector of the build's instructions, and what the kernel does with it.
#if defined(__AVX512F__)
#define DGEMMA_ONE_QUERY_OP "avx512_one_query_attention"
constexpr int64_t kLanes = 16;
using Vector = __m512;
inline Vector zeros() { return _mm512_setzero_ps(); }
inline Vector broadcast(float value) { return _mm512_set1_ps(value); }
inline Vector load(const float* values) { return _mm512_loadu_ps(values); }
inline void store(float* target, Vector v) { _mm512_storeu_ps(target, v); }
inline Vector fmadd(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
inline Vector subtract(Vector a, Vector b) { return _mm512_sub_ps(a, b); }
inline Vector multiply(Vector a, Vector b) { return _mm512_mul_ps(a, b); }
inline Vector divide(Vector a, Vector b) { return _mm512_div_ps(a, b); }
inline float sum_of(Vector v) { return _mm512_reduce_add_ps(v); }
// kLanes bf16 values widened to float32 (exactly: a bf16 is a float32's upper half).
inline Vector widen(const uint16_t* values) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
// 2^n for whole n in [-160, 128]
inline Vector two_to_the(Vector n, Vector p) { return _mm512_scalef_ps(p, n); }
inline Vector nearest_integer(Vector t) {
  return _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Vector larger(Vector a, Vector b) { return _mm512_max_ps(a, b); }
constexpr float kLowestExponent = -160.0f;
// v rounded to bf16, nearest even
inline void store_bf16(uint16_t* target, Vector v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(target), (__m256i)_mm512_cvtneps_pbh(v));
}
#else
#define DGEMMA_ONE_QUERY_OP "avx2_one_query_attention"
constexpr int64_t kLanes = 8;
using Vector = __m256;
inline Vector zeros() { return _mm256_setzero_ps(); }
inline Vector broadcast(float value) { return _mm256_set1_ps(value); }
inline Vector load(const float* values) { return _mm256_loadu_ps(values); }
inline void store(float* target, Vector v) { _mm256_storeu_ps(target, v); }
inline Vector fmadd(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
inline Vector subtract(Vector a, Vector b) { return _mm256_sub_ps(a, b); }
inline Vector multiply(Vector a, Vector b) { return _mm256_mul_ps(a, b); }
inline Vector divide(Vector a, Vector b) { return _mm256_div_ps(a, b); }
inline float sum_of(Vector v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}
inline Vector widen(const uint16_t* values) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
// p times 2^n for whole n in [-126, 127], through the exponent's bits
inline Vector two_to_the(Vector n, Vector p) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
inline Vector nearest_integer(Vector t) { return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vector larger(Vector a, Vector b) { return _mm256_max_ps(a, b); }
constexpr float kLowestExponent = -126.0f;  // exp(x) below 2^-126 counts as 2^-126 x p, about 1e-38: nothing beside 1
inline void store_bf16(uint16_t* target, Vector v) {
  // round to nearest even on the upper half's last bit (the values are finite)
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(target), packed);
}
#endif

// exp(x) for x <= 0, to about 2 ulp: 2^(x log2 e) as 2^n times a degree-6 polynomial of the fraction.
inline Vector exp_nonpositive(Vector x) {
  const Vector t = larger(multiply(x, broadcast(1.4426950408889634f)), broadcast(kLowestExponent));
  const Vector n = nearest_integer(t);
  const Vector f = subtract(t, n);  // in [-0.5, 0.5]
  Vector p = broadcast(1.5353362e-4f);
  p = fmadd(p, f, broadcast(1.3398874e-3f));
  p = fmadd(p, f, broadcast(9.6182985e-3f));
  p = fmadd(p, f, broadcast(5.5504109e-2f));
  p = fmadd(p, f, broadcast(2.4022652e-1f));
  p = fmadd(p, f, broadcast(6.9314718e-1f));
  p = fmadd(p, f, broadcast(1.0f));
  return two_to_the(n, p);
}

// A chunk's scores and weighted values are computed for a tile of query heads at a time, its sums held in registers:
// the scores of kTile[T].keys keys at once (each key row widened once for the tile's heads), the weighted values
// kTile[T].blocks vectors of the head size at once over every key (each probability broadcast once for them). A loop
// that kept one sum per query head in memory (loaded, multiplied in and stored back for every vector of a key) read
// a cache that the CPU's caches held at 9 GB/s on a 2-core AMD EPYC of family 25 (Zen 3); this at 20. From memory
// both read at 8 to 9 GB/s there. Each sum adds the same products in the same order as that loop did.
constexpr int kMaxTile = 4;  // query heads a tile holds
struct TileShape {
  int keys;    // keys scored at once
  int blocks;  // vectors of the head size weighted at once
};
// Tile heads x keys sums for the scores, tile heads x blocks for the values: at most 8 vectors, which with the keys or
// values read for them stay within AVX2's 16 registers.
constexpr TileShape kTile[kMaxTile + 1] = {{0, 0}, {4, 4}, {4, 4}, {2, 2}, {2, 2}};

// Rows first, first + 1, .., first + count - 1 (D bf16 values each, stride apart) asked for ahead of their use (rows
// past the chunk's end too: a prefetch of an address outside the tensor does not fault).
constexpr int64_t kKeysAhead = 16;
inline void rows_ahead(const uint16_t* rows, int64_t stride, int64_t first, int count, int64_t D) {
  for (int r = 0; r < count; ++r)
    for (int64_t byte = 0; byte < D * 2; byte += 64)
      _mm_prefetch(reinterpret_cast<const char*>(rows + (first + r) * stride) + byte, _MM_HINT_T0);
}

// Scores of T query heads (q: T rows of D) against keys s, s + 1, .., s + Keys - 1 of the chunk (key row s at
// keys + s * key_stride), written to scores[t * kChunk + s + k].
template <int T, int Keys>
inline void score_keys(const float* q, int64_t D, const uint16_t* keys, int64_t key_stride, int64_t s,
                       float* scores) {
  Vector sums[T][Keys];
#pragma GCC unroll 16
  for (int i = 0; i < T * Keys; ++i) sums[i / Keys][i % Keys] = zeros();
  for (int64_t d = 0; d < D; d += kLanes) {
    Vector key[Keys];
#pragma GCC unroll 8
    for (int k = 0; k < Keys; ++k) key[k] = widen(keys + (s + k) * key_stride + d);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const Vector query = load(q + t * D + d);
#pragma GCC unroll 8
      for (int k = 0; k < Keys; ++k) sums[t][k] = fmadd(query, key[k], sums[t][k]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < T * Keys; ++i) scores[(i / Keys) * kChunk + s + i % Keys] = sum_of(sums[i / Keys][i % Keys]);
}

// out[t][d, d + Blocks * kLanes) = sum over the chunk's visible keys s of weights[t * kChunk + s] * value s there.
template <int T, int Blocks>
inline void weigh_values(const float* weights, const uint16_t* values, int64_t value_stride, const bool* mask,
                         int64_t count, int64_t D, int64_t d, float* out) {
  Vector sums[T][Blocks];
#pragma GCC unroll 16
  for (int i = 0; i < T * Blocks; ++i) sums[i / Blocks][i % Blocks] = zeros();
  for (int64_t s = 0; s < count; ++s) {
    if (mask != nullptr && !mask[s]) continue;  // its weight is 0, and its row may hold anything (an unwritten slot)
    Vector value[Blocks];
#pragma GCC unroll 8
    for (int b = 0; b < Blocks; ++b) value[b] = widen(values + s * value_stride + d + b * kLanes);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const Vector weight = broadcast(weights[t * kChunk + s]);
#pragma GCC unroll 8
      for (int b = 0; b < Blocks; ++b) sums[t][b] = fmadd(weight, value[b], sums[t][b]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < T * Blocks; ++i)
    store(out + (i / Blocks) * D + d + (i % Blocks) * kLanes, sums[i / Blocks][i % Blocks]);
}

// Turns a head's scores[0, count) into exponentials less its maximum in place; gives the maximum and their sum.
void exponentials(float* scores, int64_t count, float* maximum, float* total) {
  const float lowest = -std::numeric_limits<float>::infinity();
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;  // the exponentials a vector at a time
  for (int64_t s = count; s < padded; ++s) scores[s] = lowest;
  float peak = lowest;
  for (int64_t s = 0; s < count; ++s) peak = std::max(peak, scores[s]);
  *maximum = peak;
  float sum = 0.0f;
  if (peak == lowest) {  // every key of the chunk masked
    for (int64_t s = 0; s < count; ++s) scores[s] = 0.0f;
  } else {
    const Vector shift = broadcast(peak);
    for (int64_t s = 0; s < padded; s += kLanes) store(&scores[s], exp_nonpositive(subtract(load(&scores[s]), shift)));
    for (int64_t s = 0; s < count; ++s) sum += scores[s];  // masked keys: exp(-inf) = 0
  }
  *total = sum;
}

// One tile of T query heads (q: T rows of D) against the chunk's count keys: their scores (masked keys -inf), each
// head's exponentials less its maximum (maximum[t], their sum total[t]), then out[t] = those times the values, summed.
template <int T>
void attend_tile(const float* q, int64_t D, const uint16_t* keys, const uint16_t* values, int64_t key_stride,
                 int64_t value_stride, const bool* mask, int64_t count, bool first_tile, float* maximum, float* total,
                 float* out) {
  constexpr int Keys = kTile[T].keys, Blocks = kTile[T].blocks;
  alignas(64) float scores[T][kChunk];
  int64_t s = 0;
  for (; s + Keys <= count; s += Keys) {
    if (first_tile) {
      rows_ahead(keys, key_stride, s + kKeysAhead, Keys, D);
      rows_ahead(values, value_stride, s, Keys, D);
    }
    score_keys<T, Keys>(q, D, keys, key_stride, s, &scores[0][0]);
  }
  for (; s < count; ++s) score_keys<T, 1>(q, D, keys, key_stride, s, &scores[0][0]);
  if (mask != nullptr)
    for (int64_t k = 0; k < count; ++k)
      if (!mask[k])
        for (int t = 0; t < T; ++t) scores[t][k] = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < T; ++t) exponentials(scores[t], count, maximum + t, total + t);
  int64_t d = 0;
  for (; d + Blocks * kLanes <= D; d += Blocks * kLanes)
    weigh_values<T, Blocks>(&scores[0][0], values, value_stride, mask, count, D, d, out);
  for (; d < D; d += kLanes) weigh_values<T, 1>(&scores[0][0], values, value_stride, mask, count, D, d, out);
}

// One item: query heads q[g] (float32, D each) against keys first..last of one key head, kMaxTile heads at a time.
// Writes the chunk's maximum score and sum of exponentials per query head and out[g] = sum over keys of
// exp(score - maximum) * value.
void attend_chunk(const float* q, int group, int64_t D, const uint16_t* keys, const uint16_t* values,
                  int64_t key_stride, int64_t value_stride, const bool* mask, int64_t first, int64_t last,
                  float* maximum, float* total, float* out) {
  const int64_t count = last - first;
  keys += first * key_stride;
  values += first * value_stride;
  if (mask != nullptr) mask += first;
  for (int g = 0; g < group; g += kMaxTile) {
    auto* run = &attend_tile<kMaxTile>;
    switch (std::min(kMaxTile, group - g)) {
      case 1: run = &attend_tile<1>; break;
      case 2: run = &attend_tile<2>; break;
      case 3: run = &attend_tile<3>; break;
    }
    run(q + g * D, D, keys, values, key_stride, value_stride, mask, count, g == 0, maximum + g, total + g,
        out + g * D);
  }
}

at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                               const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kBFloat16 && q.is_cpu(),
              DGEMMA_ONE_QUERY_OP ": q must be a bf16 CPU tensor [B, H, 1, D], got ", q.scalar_type(), " ",
              q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kBFloat16 && keys.is_cpu() && keys.size(0) == B &&
                  keys.size(3) == D && keys.stride(3) == 1 && values.sizes() == keys.sizes() &&
                  values.scalar_type() == at::kBFloat16 && values.is_cpu() && values.stride(3) == 1,
              DGEMMA_ONE_QUERY_OP ": keys and values must be bf16 CPU tensors [", B, ", Hkv, S, ", D,
              "] with contiguous rows, got ", keys.scalar_type(), " ", keys.sizes(), " and ", values.scalar_type(), " ",
              values.sizes());
  const int64_t kv_heads = keys.size(1), S = keys.size(2);
  TORCH_CHECK(kv_heads > 0 && H % kv_heads == 0 && H / kv_heads <= kMaxGroup && D % 16 == 0,
              DGEMMA_ONE_QUERY_OP ": ", H, " query heads over ", kv_heads, " key heads (at most ", kMaxGroup,
              " a key head) of size ", D, " (a multiple of 16)");
  at::Tensor flags;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_cpu() && mask->numel() == B * S &&
                    mask->dim() == 4 && mask->size(0) == B && mask->size(3) == S,
                DGEMMA_ONE_QUERY_OP ": mask must be bool [", B, ", 1, 1, ", S, "], got ",
                mask->scalar_type(), " ", mask->sizes());
    flags = mask->contiguous();
  }
  const int group = static_cast<int>(H / kv_heads);
  const at::Tensor queries = q.to(at::kFloat).contiguous();  // [B, H, 1, D]: a key head's queries adjacent
  const int64_t chunks = std::max<int64_t>(1, (S + kChunk - 1) / kChunk), heads = B * kv_heads;
  at::Tensor maxima = at::empty({heads, chunks, group}, queries.options());
  at::Tensor totals = at::empty({heads, chunks, group}, queries.options());
  at::Tensor partial = at::empty({heads, chunks, group, D}, queries.options());
  const auto* key_data = reinterpret_cast<const uint16_t*>(keys.data_ptr());
  const auto* value_data = reinterpret_cast<const uint16_t*>(values.data_ptr());
  const bool* mask_data = flags.defined() ? flags.data_ptr<bool>() : nullptr;
  const float* query_data = queries.data_ptr<float>();
  float *maximum = maxima.data_ptr<float>(), *total = totals.data_ptr<float>(), *out = partial.data_ptr<float>();
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / chunks, chunk = item % chunks, b = head / kv_heads, h = head % kv_heads;
      attend_chunk(query_data + (b * H + h * group) * D, group, D,
                   key_data + b * keys.stride(0) + h * keys.stride(1),
                   value_data + b * values.stride(0) + h * values.stride(1), keys.stride(2), values.stride(2),
                   mask_data == nullptr ? nullptr : mask_data + b * S, chunk * kChunk,
                   std::min(S, (chunk + 1) * kChunk), maximum + item * group, total + item * group,
                   out + item * group * D);
    }
  });
  at::Tensor result = at::empty({B, H, 1, D}, q.options());
  auto* result_data = reinterpret_cast<uint16_t*>(result.data_ptr());
  at::parallel_for(0, heads * group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // one query head: its key head's chunks in order
      const int64_t head = row / group, g = row % group;
      float peak = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) peak = std::max(peak, maximum[(head * chunks + c) * group + g]);
      // The chunks that saw a key, each with its exponentials' factor to the row's maximum.
      std::vector<int64_t> seen;
      std::vector<float> scales;
      float sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float m = maximum[(head * chunks + c) * group + g];
        if (m == -std::numeric_limits<float>::infinity()) continue;
        seen.push_back(c);
        scales.push_back(std::exp(m - peak));
        sum += total[(head * chunks + c) * group + g] * scales.back();
      }
      const int64_t b = head / kv_heads, h = head % kv_heads;
      uint16_t* target = result_data + (b * H + h * group + g) * D;
      for (int64_t d = 0; d < D; d += kLanes) {
        Vector acc = zeros();
        for (size_t i = 0; i < seen.size(); ++i)
          acc = fmadd(broadcast(scales[i]), load(out + ((head * chunks + seen[i]) * group + g) * D + d), acc);
        // A query that sees no key gets zeros (as from dgemma's batched attention), not a softmax's NaN.
        store_bf16(target + d, sum > 0.0f ? divide(acc, broadcast(sum)) : zeros());
      }
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgemma, m) {
  m.def(DGEMMA_ONE_QUERY_OP "(Tensor q, Tensor keys, Tensor values, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgemma, CPU, m) { m.impl(DGEMMA_ONE_QUERY_OP, &one_query_attention); }

// No derivative (a token's forward records none): backward through it raises.
TORCH_LIBRARY_IMPL(dgemma, Autograd, m) {
  m.impl(DGEMMA_ONE_QUERY_OP, torch::autograd::autogradNotImplementedFallback());
}
