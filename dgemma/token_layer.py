"""One token's layer off the reference path (`exact=False`) in one C++ object: dgemma/kernels/token_layer.cpp, built at
first use with the machine's C++ compiler against the installed torch and loaded as `torch.classes.dgemma.TokenLayer`.

`dgemma.model.Block.forward` for a single row (an autoregressive token: batch 1, one position) runs a string of some
forty operations, each behind module calls and the checks that choose its kernel. On a 2-core AMD EPYC of family 25
(Zen 3) a released layer's token (a 2-layer slice of the model, 4-bit weights, each kernel call timed) spent 3 to 4
ms outside its kernels against 5 to 6 in them, reading its 80 MB of weights. The object made here for a layer holds
its weights and the kernel each product takes, chosen once by the same checks the forward makes (`TokenProduct`; a
quantised weight answers for itself with its `token_product`), and runs the same ops in the same order: its result
is the forward's bit for bit (tests/test_token_layer.py), 1.5 to 1.8 ms a released layer sooner there
(scripts/token_layer_speed.py, docs/cpu.md). The attention stays in Python between its two calls, where the KV
cache appends the token's key and value.

A layer gets one where every product has a kernel the object can call (torch's linear and grouped matmul, or dgemma's
AVX2 products: `dgemma.avx2_rows`) and the fused ops run (`dgemma.fused_ops`): on a CPU with AVX2 and no AVX-512
the released model's layers in every form, and float32 ones (the bundled model's) on any CPU with AVX2. Layers with
quantised experts the forward does not read by index stay in Python, as do products in Inductor's compiled loops
or the AVX-512 and AMX kernels. Built for a layer at its first token and kept until a weight it reads is replaced
(a cast, a load, a quantisation).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .avx2_rows import available as avx2_rows_available
from .compiling import AVX2_FLAGS, compiling_allowed, library_loads
from .fused_ops import available as fused_ops_available, takes as fused_ops_take
from .one_row import takes_row

SOURCE = Path(__file__).parent / "kernels" / "token_layer.cpp"


@dataclass
class TokenProduct:
    """How the object multiplies a row by one weight, as the forward would: `kind` "linear" (torch's, the weight
    tensor), "half_rows" (bf16 or fp16 matrices [E, N, K]), "byte_codes" (codes, scale and offset of one-byte codes),
    "int4_rows" (codes in the AVX2 kernel's layout, scales and zeros in blocks of 32 columns, [E, ...]; `twice`: the row
    taken twice, for 8-bit codes held as two 4-bit halves), the tensors as dgemma's AVX2 op of that name takes them;
    or for experts "grouped" (a plain tensor [E, N, K]: the token's choices sorted into groups by expert, grouped
    matmuls)."""

    kind: str
    tensors: list[torch.Tensor]
    zero_code: int = 0
    twice: bool = False


@dataclass(eq=False)
class _Built:
    """A layer's object and where the block held what it reads when it was built (`_holders`)."""

    layer: object | None  # torch.classes.dgemma.TokenLayer, or None: the layer runs in Python
    dtype: torch.dtype
    holders: tuple[tuple[dict, str, object], ...]


_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Block -> _Built


@functools.cache
def available() -> bool:
    """Whether layers may run a token here: compiling allowed, the fused ops available, and this library builds and
    loads."""
    return (compiling_allowed() and fused_ops_available()
            and library_loads(SOURCE, AVX2_FLAGS, "a token's layer runs in Python"))


def for_token(block, x: torch.Tensor):
    """The object that runs `block` (a dgemma.model.Block) for x [1, 1, H], or None where the forward runs in Python:
    x is not a single row, gradients are recorded, or some product or op of the layer has no kernel the object
    calls."""
    if x.shape[0] != 1 or x.shape[1] != 1 or torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    built = _BUILT.get(block)
    if built is None or built.dtype != x.dtype or not _unchanged(built.holders):
        built = _build(block, x)
        _BUILT[block] = built
    return built.layer


def forget(modules) -> None:
    """Drop the objects built for these modules' blocks (a model's cast or move replaces every weight: the objects
    would otherwise hold the old ones until each layer's next token)."""
    for module in modules:
        _BUILT.pop(module, None)


# The object's slots (dgemma/kernels/token_layer.cpp) and the paths from a block to what fills them: norms (their
# weights), products (their weights and biases), and with experts the router's scales and the experts' norms.
_NORMS = {"input_norm": "input_layernorm", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
          "post_attention_norm": "post_attention_layernorm", "pre_feedforward_norm": "pre_feedforward_layernorm",
          "post_feedforward_norm": "post_feedforward_layernorm"}
_PRODUCTS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_EXPERT_NORMS = {"pre_feedforward_norm_2": "pre_feedforward_layernorm_2",
                 "post_feedforward_norm_1": "post_feedforward_layernorm_1",
                 "post_feedforward_norm_2": "post_feedforward_layernorm_2"}
_ROUTER_SCALES = {"router_scale": "router.scale", "per_expert_scale": "router.per_expert_scale"}
_EXPERT_WEIGHTS = ("router.proj.weight", "experts.gate_up_proj", "experts.down_proj")


def _at(block, path: str) -> object:
    """What `block` holds at a dotted path (None past a missing v_proj)."""
    return functools.reduce(lambda owner, name: None if owner is None else getattr(owner, name), path.split("."),
                            block)


def _read(block) -> list[str]:
    """The paths of everything the object reads from `block`: checked at every token, so that a replaced weight is
    never missed."""
    norms = _NORMS | (_EXPERT_NORMS if block.has_experts else {})
    paths = [f"{norm}.weight" for norm in norms.values()] + ["layer_scalar"]
    paths += [f"{linear}.{attr}" for linear in _PRODUCTS.values() for attr in ("weight", "bias")]
    return paths + ([*_ROUTER_SCALES.values(), *_EXPERT_WEIGHTS] if block.has_experts else [])


def _holders(block) -> tuple[tuple[dict, str, object], ...]:
    """(the dict that holds it, its name there, it) for every module, weight and tensor on the object's paths: a
    module's submodules, parameters, buffers or plain attributes (an attached weight, a missing v_proj's None).
    With these dict lookups `for_token` takes 10 us a layer on the Zen 3 EPYC; reading the paths through nn.Module's
    attribute lookup, 95 (2.6 ms more a 30-layer token)."""
    held: dict[tuple[int, str], tuple[dict, str, object]] = {}
    for path in _read(block):
        owner = block
        for name in path.split("."):
            if owner is None:  # a layer without v_proj
                break
            holder = next(d for d in (owner._modules, owner._parameters, owner._buffers, vars(owner)) if name in d)
            owner = holder[name]
            held[id(holder), name] = (holder, name, owner)
    return tuple(held.values())


def _unchanged(holders: tuple[tuple[dict, str, object], ...]) -> bool:
    return all(holder.get(name) is value for holder, name, value in holders)


def _build(block, x: torch.Tensor) -> _Built:
    holders = _holders(block)
    layer = _layer(block, x) if available() else None
    return _Built(layer=layer, dtype=x.dtype, holders=holders)


def _layer(block, x: torch.Tensor):
    """The object for `block` and rows like x, or None where a product or an op of the layer has none here."""
    norms = _NORMS | (_EXPERT_NORMS if block.has_experts else {})
    tensors = {name: _at(block, f"{path}.weight") for name, path in norms.items()}
    if block.has_experts:
        tensors |= {name: _at(block, path) for name, path in _ROUTER_SCALES.items()}
    products = {name: _at(block, path) for name, path in _PRODUCTS.items()}
    if not all(fused_ops_take(x, tensor) for tensor in tensors.values()):
        return None
    rows = {name: x.new_zeros(1, linear.weight.shape[-1]) for name, linear in products.items() if linear is not None}
    chosen = {name: _product(rows[name], linear.weight, exact=False) for name, linear in products.items()
              if linear is not None}
    if block.has_experts:
        experts, top_k = block.experts, block.router.top_k
        row = x.new_zeros(1, x.shape[-1])
        # The router's product is an exact one in the forward (its Linear is called without `exact`).
        chosen["router"] = _product(row, block.router.proj.weight, exact=True)
        chosen["experts_gate_up"], chosen["experts_down"] = _expert_products(experts, row, top_k)
    if any(product is None for product in chosen.values()):
        return None
    layer = torch.classes.dgemma.TokenLayer(block.input_layernorm.eps, block.self_attn.spec.head_dim,
                                            block.router.top_k if block.has_experts else 0,
                                            block.router.root_size if block.has_experts else 1.0,
                                            block.mlp.activation_kind)
    for name, tensor in (tensors | {"layer_scalar": block.layer_scalar}).items():
        layer.set_tensor(name, tensor.detach())
    for name, product in chosen.items():
        linear = products.get(name)
        bias = None if linear is None or linear.bias is None else linear.bias.detach()
        layer.set_product(name, product.kind, product.tensors, bias, product.zero_code, product.twice)
    return layer


def _product(row: torch.Tensor, weight: object, exact: bool) -> TokenProduct | None:
    """How `dgemma.model.linear(row, weight, exact=exact)` multiplies a single row, or None if not by a kernel the
    object calls."""
    if not isinstance(weight, torch.Tensor):
        return _answered(weight, row)
    if not exact and takes_row(row, weight):  # dgemma.one_row.row_product
        return TokenProduct("half_rows", [weight.detach().unsqueeze(0)]) if avx2_rows_available() else None
    return TokenProduct("linear", [weight.detach()])


def _expert_products(experts, row: torch.Tensor, top_k: int) -> tuple[TokenProduct | None, TokenProduct | None]:
    """How `dgemma.model.Experts` (`experts`) multiplies a token's row by its gate/up and down matrices: read by the
    chosen experts' indices where its own check says so (`Experts._read_by_index`), else, for plain tensors, its sort
    into groups by expert and grouped matmuls; None for a product the object has no kernel for."""
    weights = (experts.gate_up_proj, experts.down_proj)
    if not experts._read_by_index(row, top_k):
        return tuple(TokenProduct("grouped", [w.detach()]) if isinstance(w, torch.Tensor) else None for w in weights)
    rows = (row, row.new_zeros(1, experts.down_proj.shape[-1]))  # the rows each product takes
    return tuple(_by_index(weight, like) for weight, like in zip(weights, rows))


def _by_index(weight: object, row: torch.Tensor) -> TokenProduct | None:
    """How `dgemma.model.Experts._by_index` multiplies rows like `row` by matrices of `weight` read by index."""
    if isinstance(weight, torch.Tensor):  # dgemma.one_row.expert_products
        return TokenProduct("half_rows", [weight.detach()]) if avx2_rows_available() else None
    return _answered(weight, row)


def _answered(weight: object, row: torch.Tensor) -> TokenProduct | None:
    """A weight held in a kernel's form answers for itself (`token_product`); None if it cannot."""
    token_product = getattr(weight, "token_product", None)
    return None if token_product is None else token_product(row)
