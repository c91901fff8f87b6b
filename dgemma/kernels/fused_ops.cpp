// A layer's small operations fused, for forwards off the reference path (exact=False) on a CPU (dgemma/fused_ops.py
// builds and loads this file). Ops over rows of the last dimension, in float32, rounded once to the input's dtype
// (bf16, fp16 or float32):
//
// - dgemma::rms_norm(x [..., D], weight [D] or None, eps, residual [..., D] or None, multiplier [1] or None):
//   (residual + x * (mean(x^2) + eps)^-1/2 * weight) * multiplier.
// - dgemma::rms_norm_rope(x [B, T, H, D], weight [D] or None, cos [B * T, D], sin [B * T, D], eps): each head's
//   row normed and scaled as above, then rotated: out = n * cos + rotate_half(n) * sin, rotate_half(n) = (-n[D/2:],
//   n[:D/2]), with the cos and sin of the row's token.
// - dgemma::route(logits [N, E], k, per_expert_scale [E]) -> (weights [N, k] float32, index [N, k] int64): the
//   router's choice: softmax over the E logits in float32, the k largest in descending order (of equal ones the
//   lower index first), renormalised to sum to 1, each times its expert's scale.
// - dgemma::weighted_sum(rows [N * k, H], weights [N, k] float32) -> [N, H]: each token's k rows (its experts'
//   outputs, in choice order) times their weights, summed in float32 in that order.
//
// Why: a token's layer is a string of small operations between large matrix products, and each product streams
// megabytes of weights through the caches, evicting the code and data of what comes next. On a 2-core AMD EPYC of
// family 25 (Zen 3) torch's rms_norm of one released row (2,816 bf16 values), eight operations inside, took 25 us
// from warm caches and 60 to 180 us within a token; the RoPE that follows each of q and k is seven more, the router's
// softmax, top-k and scaling six, the experts' weighted sum four. Here each is one call, one pass. The reference rounds
// between operations (the norm, the sum with the residual, the product with the layer's scalar, each rotation's two
// products and their sum, each to bf16); these ops round once, so in bf16 they differ from the reference's path by
// its roundings, not by more.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int kLanes = 16;  // independent partial sums: the compiler keeps them in vector registers
constexpr int64_t kGrain = 1 << 15;  // values a thread takes at least: one released row stays on one thread

template <typename T>
float inverse_rms(const T* x, int64_t D, float eps) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = static_cast<float>(x[i + j]);
      lanes[j] += v * v;
    }
  float total = 0.0f;
  for (; i < D; ++i) total += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return 1.0f / std::sqrt(total / static_cast<float>(D) + eps);
}

template <typename T>
void norm_rows(const at::Tensor& x, const T* weight, float eps, const T* residual, float multiplier, at::Tensor& out) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  const T* in = x.data_ptr<T>();
  T* result = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / D), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* row = in + r * D;
      const float scale = inverse_rms(row, D, eps);
      for (int64_t i = 0; i < D; ++i) {
        float value = static_cast<float>(row[i]) * scale;
        if (weight) value *= static_cast<float>(weight[i]);
        if (residual) value += static_cast<float>(residual[r * D + i]);
        result[r * D + i] = static_cast<T>(value * multiplier);
      }
    }
  });
}

template <typename T>
void norm_rope_rows(const at::Tensor& x, const T* weight, const T* cos, const T* sin, float eps, at::Tensor& out) {
  const int64_t D = x.size(3), heads = x.size(2), rows = x.numel() / D, half = D / 2;
  const T* in = x.data_ptr<T>();
  T* result = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / D), [&](int64_t first, int64_t last) {
    std::vector<float> normed(D);
    for (int64_t r = first; r < last; ++r) {
      const T* row = in + r * D;
      const T* row_cos = cos + (r / heads) * D;
      const T* row_sin = sin + (r / heads) * D;
      const float scale = inverse_rms(row, D, eps);
      for (int64_t i = 0; i < D; ++i)
        normed[i] = static_cast<float>(row[i]) * scale * (weight ? static_cast<float>(weight[i]) : 1.0f);
      for (int64_t i = 0; i < half; ++i) {
        result[r * D + i] = static_cast<T>(normed[i] * static_cast<float>(row_cos[i]) -
                                           normed[i + half] * static_cast<float>(row_sin[i]));
        result[r * D + half + i] = static_cast<T>(normed[half + i] * static_cast<float>(row_cos[half + i]) +
                                                  normed[i] * static_cast<float>(row_sin[half + i]));
      }
    }
  });
}

void check_rows(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x) {
  TORCH_CHECK(tensor.scalar_type() == x.scalar_type() && tensor.is_contiguous() && tensor.is_cpu(), op, ": ", name,
              " must be a contiguous CPU tensor of ", x.scalar_type(), ", got ", tensor.scalar_type(), " ",
              tensor.sizes());
}

// x: the rows an op takes (`name`); weight: a vector of x's dtype as long as its rows (`weight_name`), or none.
void check_input(const char* op, const char* name, const at::Tensor& x, const char* weight_name,
                 const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.is_contiguous() && x.is_cpu() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                   x.scalar_type() == at::kFloat),
              op, ": ", name, " must be a contiguous bf16, fp16 or float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  if (weight.has_value()) {
    check_rows(op, weight_name, *weight, x);
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), op, ": ", weight_name, " must be [", x.size(-1),
                "] for ", name, " ", x.sizes(), ", got ", weight->sizes());
  }
}

template <typename T>
const T* pointer(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps,
                    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& multiplier) {
  check_input("dgemma::rms_norm", "x", x, "weight", weight);
  if (residual.has_value()) {
    check_rows("dgemma::rms_norm", "residual", *residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), "dgemma::rms_norm: residual must be ", x.sizes(), ", got ",
                residual->sizes());
  }
  TORCH_CHECK(!multiplier.has_value() || (multiplier->numel() == 1 && multiplier->is_cpu()),
              "dgemma::rms_norm: multiplier must be one CPU value, got ",
              multiplier.has_value() ? multiplier->sizes() : at::IntArrayRef{});
  const float times = multiplier.has_value() ? multiplier->item<float>() : 1.0f;
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dgemma::rms_norm", [&] {
    norm_rows<scalar_t>(x, pointer<scalar_t>(weight), static_cast<float>(eps), pointer<scalar_t>(residual), times,
                        out);
  });
  return out;
}

at::Tensor rms_norm_rope(const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& cos,
                         const at::Tensor& sin, double eps) {
  check_input("dgemma::rms_norm_rope", "x", x, "weight", weight);
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "dgemma::rms_norm_rope: x must be [B, T, H, D] with D even, got ",
              x.sizes());
  const int64_t tokens = x.size(0) * x.size(1);
  for (const auto& [name, table] : {std::pair{"cos", &cos}, std::pair{"sin", &sin}}) {
    check_rows("dgemma::rms_norm_rope", name, *table, x);
    TORCH_CHECK(table->dim() == 2 && table->size(0) == tokens && table->size(1) == x.size(3),
                "dgemma::rms_norm_rope: ", name, " must be [", tokens, ", ", x.size(3), "] for x ", x.sizes(),
                ", got ", table->sizes());
  }
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dgemma::rms_norm_rope", [&] {
    norm_rope_rows<scalar_t>(x, pointer<scalar_t>(weight), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                             static_cast<float>(eps), out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t k, const at::Tensor& per_expert_scale) {
  check_input("dgemma::route", "logits", logits, "per_expert_scale", per_expert_scale);
  TORCH_CHECK(logits.dim() == 2 && k >= 1 && k <= logits.size(1), "dgemma::route: logits must be [N, E] with k = ", k,
              " of E experts, got ", logits.sizes());
  const int64_t N = logits.size(0), E = logits.size(1);
  at::Tensor weights = at::empty({N, k}, logits.options().dtype(at::kFloat));
  at::Tensor index = at::empty({N, k}, logits.options().dtype(at::kLong));
  float* chosen_weights = weights.data_ptr<float>();
  int64_t* chosen = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dgemma::route", [&] {
    const scalar_t* all = logits.data_ptr<scalar_t>();
    const scalar_t* scale = per_expert_scale.data_ptr<scalar_t>();
    std::vector<float> probabilities(E);
    std::vector<bool> taken(E);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* row = all + n * E;
      float largest = static_cast<float>(row[0]);
      for (int64_t e = 1; e < E; ++e) largest = std::max(largest, static_cast<float>(row[e]));
      float total = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        probabilities[e] = std::exp(static_cast<float>(row[e]) - largest);
        total += probabilities[e];
      }
      std::fill(taken.begin(), taken.end(), false);
      float kept = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || probabilities[e] > probabilities[best])) best = e;
        taken[best] = true;
        chosen[n * k + j] = best;
        chosen_weights[n * k + j] = probabilities[best] / total;
        kept += chosen_weights[n * k + j];
      }
      for (int64_t j = 0; j < k; ++j)
        chosen_weights[n * k + j] = chosen_weights[n * k + j] / kept * static_cast<float>(scale[chosen[n * k + j]]);
    }
  });
  return {weights, index};
}

at::Tensor weighted_sum(const at::Tensor& rows, const at::Tensor& weights) {
  TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.is_cpu(),
              "dgemma::weighted_sum: weights must be a contiguous float32 CPU matrix [N, k], got ",
              weights.scalar_type(), " ", weights.sizes());
  check_input("dgemma::weighted_sum", "rows", rows, "", std::nullopt);
  const int64_t N = weights.size(0), k = weights.size(1);
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == N * k, "dgemma::weighted_sum: rows must be [", N * k,
              ", H] for weights ", weights.sizes(), ", got ", rows.sizes());
  const int64_t H = rows.size(1);
  at::Tensor out = at::empty({N, H}, rows.options());
  const float* w = weights.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "dgemma::weighted_sum", [&] {
    const scalar_t* in = rows.data_ptr<scalar_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / (H * k)), [&](int64_t first, int64_t last) {
      std::vector<float> total(H);
      for (int64_t n = first; n < last; ++n) {
        std::fill(total.begin(), total.end(), 0.0f);
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* row = in + (n * k + j) * H;
          const float weight = w[n * k + j];
          for (int64_t h = 0; h < H; ++h) total[h] += static_cast<float>(row[h]) * weight;
        }
        for (int64_t h = 0; h < H; ++h) result[n * H + h] = static_cast<scalar_t>(total[h]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgemma, m) {
  m.def("rms_norm(Tensor x, Tensor? weight, float eps, Tensor? residual, Tensor? multiplier) -> Tensor");
  m.def("rms_norm_rope(Tensor x, Tensor? weight, Tensor cos, Tensor sin, float eps) -> Tensor");
  m.def("route(Tensor logits, int k, Tensor per_expert_scale) -> (Tensor, Tensor)");
  m.def("weighted_sum(Tensor rows, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgemma, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_rope", &rms_norm_rope);
  m.impl("route", &route);
  m.impl("weighted_sum", &weighted_sum);
}

// No derivatives: a forward that records gradients raises when backward reaches these.
TORCH_LIBRARY_IMPL(dgemma, Autograd, m) {
  m.impl("rms_norm", torch::autograd::autogradNotImplementedFallback());
  m.impl("rms_norm_rope", torch::autograd::autogradNotImplementedFallback());
  m.impl("route", torch::autograd::autogradNotImplementedFallback());
  m.impl("weighted_sum", torch::autograd::autogradNotImplementedFallback());
}
