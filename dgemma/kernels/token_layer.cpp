// One token's pass through a layer off the reference path (exact=False), as a C++ object holding the layer's weights
// (dgemma/token_layer.py builds it from a dgemma.model.Block and loads this file). It runs the operations that
// Block.forward runs for one row, in the same order, through the same ops (dgemma's fused ops and AVX2 products,
// torch's gelu, linear and the rest), so its result is that forward's bit for bit; what it removes is the Python
// between them: module calls, the checks that choose each kernel (made once, when the object is built) and the
// dispatch of quantised weights.
//
// Two calls a layer, around the attention, which stays with the caller (the KV cache appends the new key and value
// and hands back the visible ones):
// - attention_inputs(x [1, 1, H], cos, sin [1, 1, 1, D]) -> (q [1, heads, 1, D], k, v [1, kv heads, 1, D]): the
//   input norm, the projections, q's and k's norm and rotary embedding, v's scale-free norm.
// - finish(x, attended [1, heads, 1, D]) -> the layer's output [1, 1, H]: the output projection, the norms and
//   residuals, the dense MLP, and the router and the token's experts where the layer has them.
//
// Why: on a 2-core AMD EPYC of family 25 (Zen 3) a released layer's token spent 3 to 4 ms in the Python around its
// kernels (some 400 Python calls and 240 torch calls) against 5 to 6 in the kernels reading its 80 MB of 4-bit
// weights; in this object, 1.5 to 1.8 ms a layer less (docs/cpu.md).
//
// Products (set_product's kind): "linear" (torch's linear, bias inside), "half_rows" (dgemma::avx2_half_rows over
// [E, N, K] bf16 or fp16 matrices), "byte_codes" (dgemma::avx2_byte_codes_rows: codes, scale, offset), "int4_rows"
// (dgemma::avx2_int4_rows: codes [E, N, K / 2], scales and zeros; `twice` takes the row twice, for 8-bit codes held
// as two 4-bit halves), and for experts "grouped" (plain tensors [E, N, K] the forward does not read by index: its
// sort into groups and grouped matmul). A layer's matrices are [N, K] (one entry, index 0); the experts' are read by
// the token's expert indices.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> dgemma_op(const char* name) {
  // The ops' libraries are loaded before any layer is built (dgemma/token_layer.py), so they are there to find.
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor rms_norm(const Tensor& x, const OptionalTensor& weight, double eps, const OptionalTensor& residual = {},
                const OptionalTensor& multiplier = {}) {
  static const auto op = dgemma_op<Tensor(const Tensor&, const OptionalTensor&, double, const OptionalTensor&,
                                          const OptionalTensor&)>("dgemma::rms_norm");
  return op.call(x.contiguous(), weight, eps, residual ? OptionalTensor(residual->contiguous()) : residual,
                 multiplier);
}

// Each head of x [1, 1, heads, D] normed and rotated: [1, heads, 1, D].
Tensor rms_norm_rope(const Tensor& x, const Tensor& weight, const Tensor& cos, const Tensor& sin, double eps) {
  static const auto op = dgemma_op<Tensor(const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                                          double)>("dgemma::rms_norm_rope");
  const int64_t dim = cos.size(-1);
  return op.call(x.contiguous(), weight, cos.reshape({-1, dim}), sin.reshape({-1, dim}), eps).transpose(1, 2);
}

std::tuple<Tensor, Tensor> route(const Tensor& logits, int64_t k, const Tensor& per_expert_scale) {
  static const auto op = dgemma_op<std::tuple<Tensor, Tensor>(const Tensor&, int64_t, const Tensor&)>("dgemma::route");
  return op.call(logits.contiguous(), k, per_expert_scale.contiguous());
}

Tensor weighted_sum(const Tensor& rows, const Tensor& weights) {
  static const auto op = dgemma_op<Tensor(const Tensor&, const Tensor&)>("dgemma::weighted_sum");
  return op.call(rows.contiguous(), weights.contiguous());
}

enum class Kind { kLinear, kHalfRows, kByteCodes, kInt4Rows, kGrouped };

Kind kind_named(const std::string& name) {
  if (name == "linear") return Kind::kLinear;
  if (name == "half_rows") return Kind::kHalfRows;
  if (name == "byte_codes") return Kind::kByteCodes;
  if (name == "int4_rows") return Kind::kInt4Rows;
  if (name == "grouped") return Kind::kGrouped;
  TORCH_CHECK(false, "TokenLayer: unknown product kind '", name, "'");
}

struct Product {
  Kind kind = Kind::kLinear;
  std::vector<Tensor> tensors;
  OptionalTensor bias;
  int64_t zero_code = 0;
  bool twice = false;
  bool set = false;

  // rows [M, K] (contiguous) times matrix index[m] of this product's weight -> [M, N].
  Tensor indexed(const Tensor& rows, const Tensor& index) const {
    switch (kind) {
      case Kind::kHalfRows: {
        static const auto op =
            dgemma_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("dgemma::avx2_half_rows");
        return op.call(rows, tensors[0], index);
      }
      case Kind::kInt4Rows: {
        static const auto op = dgemma_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
            "dgemma::avx2_int4_rows");
        return op.call(twice ? at::cat({rows, rows}, -1) : rows, tensors[0], tensors[1], index);
      }
      case Kind::kByteCodes: {
        static const auto op = dgemma_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                                                int64_t)>("dgemma::avx2_byte_codes_rows");
        return op.call(rows, tensors[0], tensors[1],
                       tensors.size() > 2 ? OptionalTensor(tensors[2]) : OptionalTensor(), zero_code);
      }
      case Kind::kLinear:
      case Kind::kGrouped:
        break;
    }
    TORCH_CHECK(false, "TokenLayer: a linear or grouped product has no index");
  }

  // rows [S, K] grouped by expert (group e ends at ends[e]) times expert e's matrix of [E, N, K] -> [S, N], as
  // dgemma.model.grouped_linear multiplies a plain tensor: one grouped matmul where every stride is a multiple of 16
  // bytes (grouped_mm's need), else one linear per non-empty group.
  Tensor grouped(const Tensor& rows, const Tensor& ends) const {
    const Tensor& weight = tensors[0];
    const Tensor weight_t = weight.transpose(-2, -1);
    bool aligned = rows.scalar_type() == weight.scalar_type();
    for (const auto& strides : {rows.strides(), weight_t.strides()}) {
      for (const int64_t stride : strides) aligned = aligned && (stride == 1 || stride * rows.element_size() % 16 == 0);
    }
    if (aligned) return at::_grouped_mm(rows, weight_t, ends);
    Tensor out = at::empty({rows.size(0), weight.size(1)}, rows.options());
    const Tensor ends_on_host = ends.to(at::kLong).cpu();
    const int64_t* end = ends_on_host.data_ptr<int64_t>();
    for (int64_t expert = 0, begin = 0; expert < weight.size(0); begin = end[expert++]) {
      if (end[expert] > begin) {
        out.slice(0, begin, end[expert]).copy_(at::linear(rows.slice(0, begin, end[expert]), weight[expert]));
      }
    }
    return out;
  }

  // x [..., K] (one row) @ weight.T (+ bias) -> [..., N], as dgemma.model.linear computes it for that weight.
  Tensor operator()(const Tensor& x, const Tensor& first_matrix) const {
    if (kind == Kind::kLinear) return at::linear(x, tensors[0], bias);
    auto shape = x.sizes().vec();
    const Tensor out = indexed(x.reshape({-1, shape.back()}).contiguous(), first_matrix);
    shape.back() = out.size(-1);
    const Tensor product = out.view(shape);
    return bias ? product + *bias : product;
  }
};

class TokenLayer : public torch::CustomClassHolder {
 public:
  TokenLayer(double eps, int64_t head_dim, int64_t top_k, double root_size, std::string activation)
      : eps_(eps), head_dim_(head_dim), top_k_(top_k), root_size_(root_size), activation_(std::move(activation)),
        first_matrix_(at::zeros({1}, at::kLong)) {
    TORCH_CHECK(activation_ == "gelu_tanh" || activation_ == "gelu" || activation_ == "silu" || activation_ == "relu",
                "TokenLayer: unknown activation '", activation_, "'");
  }

  void set_tensor(const std::string& name, const Tensor& tensor) { slot_tensor(name) = tensor; }

  void set_product(const std::string& name, const std::string& kind, std::vector<Tensor> tensors, OptionalTensor bias,
                   int64_t zero_code, bool twice) {
    Product& product = slot_product(name);
    product = Product{kind_named(kind), std::move(tensors), std::move(bias), zero_code, twice, true};
  }

  std::tuple<Tensor, Tensor, Tensor> attention_inputs(const Tensor& x, const Tensor& cos, const Tensor& sin) const {
    const Tensor normed = rms_norm(x, input_norm_, eps_);
    const int64_t batch = x.size(0), length = x.size(1);
    const Tensor q = rms_norm_rope(q_(normed, first_matrix_).view({batch, length, -1, head_dim_}), q_norm_, cos, sin,
                                   eps_);
    const Tensor raw_k = k_(normed, first_matrix_).view({batch, length, -1, head_dim_});
    // Layers without v_proj use the raw key projection as values (before k-norm and RoPE).
    const Tensor v = v_.set ? v_(normed, first_matrix_).view({batch, length, -1, head_dim_}) : raw_k;
    const Tensor k = rms_norm_rope(raw_k, k_norm_, cos, sin, eps_);
    return {q, k, rms_norm(v, {}, eps_).transpose(1, 2)};
  }

  Tensor finish(const Tensor& x, const Tensor& attended) const {
    const Tensor attention = o_(attended.transpose(1, 2).reshape({x.size(0), x.size(1), -1}), first_matrix_);
    const Tensor residual = rms_norm(attention, post_attention_norm_, eps_, x);
    const Tensor mlp_input = rms_norm(residual, pre_feedforward_norm_, eps_);
    Tensor h = down_(activated(gate_(mlp_input, first_matrix_)) * up_(mlp_input, first_matrix_), first_matrix_);
    if (router_.set) {
      // The router reads the raw residual; the experts read a separately normed copy.
      const Tensor flat = residual.reshape({-1, residual.size(-1)});
      const Tensor logits = router_(rms_norm(flat, router_scale_, eps_) * root_size_, first_matrix_);
      const auto [weights, index] = route(logits, top_k_, per_expert_scale_);
      const Tensor normed = rms_norm(flat, pre_feedforward_norm_2_, eps_);
      const Tensor out = experts_gate_up_.kind == Kind::kGrouped ? grouped_experts(normed, index)
                                                                  : experts_by_index(normed, index[0].contiguous());
      h = rms_norm(weighted_sum(out, weights).reshape(residual.sizes()), post_feedforward_norm_2_, eps_,
                   rms_norm(h, post_feedforward_norm_1_, eps_));
    }
    return rms_norm(h, post_feedforward_norm_, eps_, residual, layer_scalar_);
  }

 private:
  // The token's k experts' outputs [k, H] in choice order, each expert's matrices read by its index.
  Tensor experts_by_index(const Tensor& normed, const Tensor& choices) const {
    const Tensor rows = normed.expand({top_k_, -1}).contiguous();
    const auto gate_up = experts_gate_up_.indexed(rows, choices).chunk(2, -1);
    return experts_down_.indexed((activated(gate_up[0]) * gate_up[1]).contiguous(), choices);
  }

  // The same through Experts.forward's grouped path (plain tensors not read by index): the token's choices sorted
  // into groups by expert, grouped products, the outputs taken back in choice order.
  Tensor grouped_experts(const Tensor& normed, const Tensor& index) const {
    const auto [expert_of, order] = at::sort(index.reshape({-1}));
    Tensor position = at::empty_like(order);
    position.index_put_({order}, at::arange(order.numel(), order.options()));
    const Tensor rows = normed.index({at::div(order, top_k_, "floor")});
    const Tensor counts = at::bincount(expert_of, {}, experts_gate_up_.tensors[0].size(0));
    const Tensor ends = at::cumsum(counts, 0).to(at::kInt);
    const auto gate_up = experts_gate_up_.grouped(rows, ends).chunk(2, -1);
    return experts_down_.grouped(activated(gate_up[0]) * gate_up[1], ends).index({position});
  }

  Tensor activated(const Tensor& x) const {
    if (activation_ == "gelu_tanh") return at::gelu(x, "tanh");
    if (activation_ == "gelu") return at::gelu(x);
    if (activation_ == "silu") return at::silu(x);
    return at::relu(x);
  }

  Tensor& slot_tensor(const std::string& name) {
    if (name == "input_norm") return input_norm_;
    if (name == "q_norm") return q_norm_;
    if (name == "k_norm") return k_norm_;
    if (name == "post_attention_norm") return post_attention_norm_;
    if (name == "pre_feedforward_norm") return pre_feedforward_norm_;
    if (name == "post_feedforward_norm") return post_feedforward_norm_;
    if (name == "layer_scalar") return layer_scalar_;
    if (name == "router_scale") return router_scale_;
    if (name == "per_expert_scale") return per_expert_scale_;
    if (name == "pre_feedforward_norm_2") return pre_feedforward_norm_2_;
    if (name == "post_feedforward_norm_1") return post_feedforward_norm_1_;
    if (name == "post_feedforward_norm_2") return post_feedforward_norm_2_;
    TORCH_CHECK(false, "TokenLayer: unknown tensor '", name, "'");
  }

  Product& slot_product(const std::string& name) {
    if (name == "q") return q_;
    if (name == "k") return k_;
    if (name == "v") return v_;
    if (name == "o") return o_;
    if (name == "gate") return gate_;
    if (name == "up") return up_;
    if (name == "down") return down_;
    if (name == "router") return router_;
    if (name == "experts_gate_up") return experts_gate_up_;
    if (name == "experts_down") return experts_down_;
    TORCH_CHECK(false, "TokenLayer: unknown product '", name, "'");
  }

  double eps_;
  int64_t head_dim_, top_k_;
  double root_size_;
  std::string activation_;
  Tensor first_matrix_;  // index [0]: a layer's matrix, the only one of its [1, N, K]
  Tensor input_norm_, q_norm_, k_norm_, post_attention_norm_, pre_feedforward_norm_, post_feedforward_norm_,
      layer_scalar_, router_scale_, per_expert_scale_, pre_feedforward_norm_2_, post_feedforward_norm_1_,
      post_feedforward_norm_2_;
  Product q_, k_, v_, o_, gate_, up_, down_, router_, experts_gate_up_, experts_down_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgemma, m) {
  m.class_<TokenLayer>("TokenLayer")
      .def(torch::init<double, int64_t, int64_t, double, std::string>())
      .def("set_tensor", &TokenLayer::set_tensor)
      .def("set_product", &TokenLayer::set_product)
      .def("attention_inputs", &TokenLayer::attention_inputs)
      .def("finish", &TokenLayer::finish);
}
