"""Training past one process: the device and process group, FSDP2, expert parallelism, activation checkpointing,
and the sharded state (torch.distributed.checkpoint).

Design choices:
- PyTorch's own engine only: `fully_shard` (FSDP2) with a `MixedPrecisionPolicy`, `DeviceMesh`, DTensor,
  blocking collectives, `torch.utils.checkpoint` and `torch.distributed.checkpoint`. model.py is not touched:
  sharding is applied to the built network from outside.
- One FSDP unit per layer holds the encoder's and the decoder's block together (`fully_shard([enc, dec])`): with
  tied weights they are the same Parameters, so each is sharded exactly once. The root unit is the module whose
  forward computes the loss, so the embedding (also the head and the self-conditioning input) stays gathered for
  the whole forward.
- Gradients are *summed* across ranks (every rank's loss is already its share of the global mean), with FSDP
  told to use only SUM reductions and a divide factor of 1. This avoids ReduceOp.AVG, which gloo has computed as a
  sum (pytorch/pytorch#162338), and needs no rescaling for expert parallelism.
- Expert parallelism (`ExpertParallelExperts`): each rank of an expert group of N ranks holds num_experts / N
  experts as a DTensor sharded on dim 0 of the "ep" mesh dimension. Tokens and routing are all-gathered across the
  group, each rank runs its own experts on the (token, choice) pairs routed to them, and a reduce-scatter returns
  to each rank the sum for its own tokens. Both collectives exist on gloo and NCCL and are differentiable (their
  backward is the other one), so expert weights get exactly their gradient over the group's tokens. FSDP shards the
  experts further over the "dp" dimension (world / N). Exports gather the full packed tensors back.
- Activation checkpointing wraps each block's forward in non-reentrant `torch.utils.checkpoint`, leaving module
  and parameter names unchanged (checkpoints and exports keep their names).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import DiffusionGemma, Experts, grouped_linear

PARALLEL_MODES = ("ddp", "fsdp")
DEVICES = ("cpu", "cuda", "mps")


# ---- the processes --------------------------------------------------------------------------------------------

@dataclass
class Distributed:
    """Where this process runs and with whom."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "ddp"  # how a world > 1 trains: "ddp" (replicas) or "fsdp" (sharded)
    expert_parallel: int = 1
    mesh: Any = None  # fsdp: the 1-D mesh over all ranks
    expert_mesh: Any = None  # fsdp with expert_parallel > 1: the 2-D ("dp", "ep") mesh

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.parallel == "fsdp"

    @property
    def backend(self) -> str:
        return backend_for(self.device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks, in float64 (on the device: NCCL reduces device tensors only)."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; one process without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def check_parallel(parallel: str, expert_parallel: int, world: int, model: ModelConfig, batch_size: int,
                   device: str) -> None:
    """Refuse a parallel layout that cannot work, before any process group or model exists: one clear message."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"[train] parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if device not in DEVICES:
        raise ValueError(f"[train] device must be one of {DEVICES}, got {device!r}")
    if expert_parallel < 1:
        raise ValueError(f"[train] expert_parallel must be at least 1, got {expert_parallel}")
    launch = "launch it with `torchrun --nproc-per-node N -m dgemma train ...`"
    if parallel == "fsdp" and world == 1:
        raise ValueError(f"[train] parallel = 'fsdp' shards the model across processes, but this is one process: "
                         f"{launch} (N >= 2), or drop parallel = 'fsdp'")
    if expert_parallel > 1:
        if parallel != "fsdp":
            raise ValueError(f"[train] expert_parallel = {expert_parallel} needs parallel = 'fsdp' (the experts "
                             f"are sharded across the ranks of an expert group)")
        if not model.has_experts:
            raise ValueError(f"[train] expert_parallel = {expert_parallel}, but the model has no experts")
        if model.num_experts % expert_parallel:
            raise ValueError(f"[train] expert_parallel = {expert_parallel} does not divide the model's "
                             f"{model.num_experts} experts")
        if world % expert_parallel:
            raise ValueError(f"world size {world} (torchrun processes) is not a multiple of [train] "
                             f"expert_parallel = {expert_parallel}")
    if batch_size % world:
        raise ValueError(f"[train] batch_size {batch_size} is not a multiple of the world size {world} "
                         f"(torchrun processes): every process takes the same share of each batch")
    if world > 1 and device == "mps":
        raise ValueError("device = 'mps' trains in one process (there is no multi-process backend for it)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("[train] device = 'cuda', but torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("[train] device = 'mps', but torch sees no MPS device")


def init_distributed(device: str, parallel: str, expert_parallel: int) -> Distributed:
    """Start the process group (NCCL for CUDA, gloo otherwise) and the device meshes. Under torchrun with CUDA each
    rank uses cuda:LOCAL_RANK."""
    rank, world, local_rank = world_from_environment()
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", local_rank if world > 1 else (torch.cuda.current_device()))
        torch.cuda.set_device(where)
    setup = Distributed(rank=rank, world=world, local_rank=local_rank, device=where, parallel=parallel,
                        expert_parallel=expert_parallel)
    if world == 1:
        return setup
    if not dist.is_initialized():
        dist.init_process_group(backend_for(where), device_id=where if where.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        if expert_parallel > 1:
            setup.expert_mesh = init_device_mesh(where.type, (world // expert_parallel, expert_parallel),
                                                 mesh_dim_names=("dp", "ep"))
            setup.mesh = setup.expert_mesh._flatten("world")
        else:
            setup.mesh = init_device_mesh(where.type, (world,), mesh_dim_names=("world",))
    return setup


# ---- expert parallelism ---------------------------------------------------------------------------------------

class ExpertParallelExperts(nn.Module):
    """A drop-in for `Experts` (same forward, same parameter names) holding this rank's share of the experts.

    The parameters are DTensors of the full packed shape ([E, 2*moe, H] and [E, H, moe]) sharded on dim 0 over the
    expert mesh, so checkpoints (DCP) and exports see the whole tensors.
    """

    def __init__(self, experts: Experts, mesh: Any, device: torch.device):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard
        size, rank = mesh.size(), mesh.get_local_rank()
        self.num_experts = experts.num_experts
        self.local_experts = self.num_experts // size
        self.first = rank * self.local_experts
        self.act = experts.act
        self.group = mesh.get_group()
        self.group_size = size
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            # Only this rank's experts are copied (to the device, in fp32), never the whole packed tensor.
            local = full.detach()[self.first:self.first + self.local_experts]
            local = local.to(device=device, dtype=torch.float32, copy=True)
            shard = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape,
                                       stride=full.stride())
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, exact: bool = True) -> torch.Tensor:
        tokens, hidden = x.shape
        # Ranks may hold different numbers of tokens (sequence lengths differ): pad to the largest.
        counts = torch.empty(self.group_size, dtype=torch.long, device=x.device)
        dist.all_gather_into_tensor(counts, torch.tensor([tokens], device=x.device), group=self.group)
        most = int(counts.max())
        if most > tokens:
            pad = most - tokens
            x = F.pad(x, (0, 0, 0, pad))
            index = F.pad(index, (0, 0, 0, pad), value=-1)  # routed nowhere
            weights = F.pad(weights, (0, 0, 0, pad))
        all_x = GatherRows.apply(x, self.group)  # [size * most, H]
        all_index = _all_gather(index, self.group)
        all_weights = GatherRows.apply(weights, self.group)
        local = all_index - self.first
        token, choice = ((local >= 0) & (local < self.local_experts)).nonzero(as_tuple=True)
        expert, order = torch.sort(local[token, choice], stable=True)  # (token, choice) pairs grouped by expert
        token, choice = token[order], choice[order]
        ends = torch.cumsum(torch.bincount(expert, minlength=self.local_experts), 0).to(torch.int32)
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        gate, up = grouped_linear(all_x[token], gate_up, ends).chunk(2, dim=-1)
        out = grouped_linear(self.act(gate) * up, down, ends)
        # fp32 contributions, summed per token here and across the group by the reduce-scatter.
        partial = torch.zeros(all_x.shape[0], hidden, dtype=torch.float32, device=x.device)
        partial = partial.index_add(0, token, out * all_weights[token, choice][:, None])
        mine = ScatterSum.apply(partial, self.group)
        return mine[:tokens].to(dtype=x.dtype, copy=True)  # not a view: FSDP hooks the output's backward


# Blocking collectives with their gradients. The functional collectives used before return tensors whose gloo work
# is still running; with them a rank died on a corrupted heap (abort or segfault) in 3 of 4 two-rank expert-parallel
# runs of 200-400 steps; with these, which return once the work is done, in none of 10 runs of 200 steps.

class GatherRows(torch.autograd.Function):
    """The ranks' [n, ...] tensors stacked along dim 0 in rank order; the gradient is each rank's rows of the sum
    of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_gather(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, ctx.group), None


class ScatterSum(torch.autograd.Function):
    """The sum over ranks of a [size * n, ...] tensor, each rank keeping its own n rows; the gradient is the ranks'
    gradients stacked."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, ctx.group), None


def _all_gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor, group=group)
    return out


def _reduce_scatter(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = tensor.new_empty((tensor.shape[0] // dist.get_world_size(group), *tensor.shape[1:]))
    dist.reduce_scatter_tensor(out, tensor, op=dist.ReduceOp.SUM, group=group)
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def expert_modules(model: DiffusionGemma) -> list[tuple[nn.Module, ...]]:
    """The blocks that share each experts module's weights: (block, ...) per distinct weight set."""
    groups: dict[int, list[nn.Module]] = {}
    for stack in (model.decoder, model.encoder):
        for block in stack.layers:
            if getattr(block, "has_experts", False):
                groups.setdefault(id(block.experts.gate_up_proj), []).append(block)
    return [tuple(blocks) for blocks in groups.values()]


def distribute_experts(model: DiffusionGemma, mesh: Any, device: torch.device) -> list[ExpertParallelExperts]:
    """Replace each experts module by its expert-parallel shard (one module for blocks that share the weights)."""
    out = []
    for blocks in expert_modules(model):
        shard = ExpertParallelExperts(blocks[0].experts, mesh, device)
        for block in blocks:
            block.experts = shard
        out.append(shard)
    return out


# ---- FSDP2 ---------------------------------------------------------------------------------------------------

def layer_units(model: DiffusionGemma) -> list[list[nn.Module]]:
    """FSDP units: per layer, the decoder block and the encoder block together when they share weights."""
    units = []
    for i, decoder_block in enumerate(model.decoder.layers):
        encoder_block = model.encoder.layers[i]
        if model.config.tie_word_embeddings:
            units.append([encoder_block, decoder_block])
        else:
            units.extend([[encoder_block], [decoder_block]])
    return units


def shard(root: nn.Module, model: DiffusionGemma, setup: Distributed, bf16: bool) -> None:
    """Apply expert parallelism and FSDP2 to `model` (inside `root`, the module whose forward returns the loss).

    Parameters are moved to the device and to fp32 unit by unit as they are sharded, so a checkpoint loaded as
    memory-mapped bf16 is never held in full fp32 by any rank."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    device = setup.device

    def place(modules: Iterable[nn.Module]) -> None:
        """Parameters and buffers of `modules` (not their children) to the device, floating point ones in fp32."""
        for module in modules:
            for param in module.parameters(recurse=False):
                _place(param, device)
            for name, buffer in list(module.named_buffers(recurse=False)):
                dtype = torch.float32 if buffer.dtype.is_floating_point else buffer.dtype
                module._buffers[name] = buffer.to(device=device, dtype=dtype)  # keeps the buffer's persistence

    def unit_modules(unit: list[nn.Module]) -> list[nn.Module]:
        seen, out = set(), []
        for top in unit:
            for module in top.modules():
                if id(module) not in seen:
                    seen.add(id(module))
                    out.append(module)
        return out

    if setup.expert_parallel > 1:
        for experts in distribute_experts(model, setup.expert_mesh["ep"], device):
            fully_shard(experts, mesh=setup.expert_mesh["dp"], mp_policy=policy)
    for unit in layer_units(model):
        place(m for m in unit_modules(unit) if not isinstance(m, ExpertParallelExperts))
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=setup.mesh, mp_policy=policy)
        if len(unit) > 1:
            _gather_per_call(unit)
    place(root.modules())
    model.reset_rope(device)
    fully_shard(root, mesh=setup.mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Every rank's loss is its share of the global mean: gradients are summed, never averaged.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _gather_per_call(unit: list[nn.Module]) -> None:
    """Make a grouped FSDP unit gather and release its weights around every call of any of its modules.

    `fully_shard([a, b])` treats the group as one pass: its post-forward (release the gathered weights, hook the
    backward) runs once every module has run once. Here the encoder block runs once per step and the decoder block
    twice (the self-conditioning pass without gradient, then the trained pass), interleaved with the other layers,
    so each call is hooked as a single-module unit is: the unit's own pre- and post-forward around each call."""
    state = unit[0]._get_fsdp_state()
    state._pre_forward_hook_handle.remove()  # the grouped hooks (the post-forward handle is the same object)
    for module in unit:
        module.register_forward_pre_hook(state._pre_forward, prepend=True, with_kwargs=True)
        module.register_forward_hook(state._post_forward, prepend=False)


def encoder_kv_hook(model: DiffusionGemma):
    """For `diffusion_loss`: the decoder reads the encoder's keys and values, so their gradient reaches an encoder
    block's projections without passing through the block's output, where FSDP hooks its backward. A hook on them
    gathers the block's weights again (FSDP's own pre-backward) before that gradient is used."""
    states = [block._get_fsdp_state() for block in model.encoder.layers]

    def hook(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            for tensor in (keys, values):
                if tensor.requires_grad:
                    tensor.register_hook(states[layer]._pre_backward)

    return hook


@torch.no_grad()
def _place(param: nn.Parameter, device: torch.device) -> None:
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor):
        return
    if param.device != device or param.dtype != torch.float32:
        param.data = param.data.to(device=device, dtype=torch.float32)


def reshard(root: nn.Module) -> None:
    """Put every FSDP unit back into its sharded state (after forwards without backward, e.g. evaluation)."""
    from torch.distributed.fsdp import FSDPModule
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---- activation checkpointing ---------------------------------------------------------------------------------

def checkpoint_activations(model: DiffusionGemma) -> None:
    """Recompute each block's activations in backward instead of keeping them (names and hooks unchanged)."""
    for stack in (model.encoder, model.decoder):
        for block in stack.layers:
            block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# ---- gradients -----------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_gradients(parameters: list[nn.Parameter], max_norm: float, setup: Distributed) -> float:
    """Global L2 norm of the gradients (before clipping), then scale them to at most `max_norm`.

    Under FSDP every rank holds a disjoint shard of every gradient, so the squares are summed over ranks; under DDP
    the gradients are replicas and each rank's norm is already the global one."""
    squares = torch.zeros((), dtype=torch.float32, device=setup.device)
    grads = [p.grad for p in parameters if p.grad is not None]
    for grad in grads:
        squares += _local(grad).float().pow(2).sum()
    if setup.sharded:
        dist.all_reduce(squares)
    norm = float(squares.sqrt())
    if max_norm and max_norm > 0:
        coefficient = max_norm / (norm + 1e-6)
        if coefficient < 1:
            for grad in grads:
                grad.mul_(coefficient)
    return norm


# ---- sharded state (torch.distributed.checkpoint) -------------------------------------------------------------

def state_dict_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kwargs)


def _sharded_state(root: nn.Module, optimizer: torch.optim.Optimizer, tied: set[str]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    options = state_dict_options(ignore_frozen_params=True, strict=False)
    model_state, optimizer_state = get_state_dict(root, optimizer, options=options)
    # A tied weight is stored once, under the decoder's name (loading it there loads the encoder's too).
    model_state = {name: tensor for name, tensor in model_state.items() if name not in tied}
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(root: nn.Module, optimizer: torch.optim.Optimizer, directory: str, setup: Distributed,
                 tied: set[str]) -> None:
    """Every rank writes its shards of the trainable parameters, their optimiser state and its RNG state into
    `directory` (frozen parameters are rebuilt from the config or checkpoint on resume; `tied` names, the encoder's
    copies of the decoder's weights, are left out)."""
    import torch.distributed.checkpoint as dcp
    state = _sharded_state(root, optimizer, tied)
    state["rng"] = {f"rank{setup.rank}": rng_state(setup)}
    dcp.save(state, checkpoint_id=directory)


def load_sharded(root: nn.Module, optimizer: torch.optim.Optimizer, directory: str, setup: Distributed,
                 tied: set[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    options = state_dict_options(ignore_frozen_params=True, strict=False)
    state = _sharded_state(root, optimizer, tied)
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    rng_key = f"rank{setup.rank}"
    if f"rng.{rng_key}" in saved:  # the same world size: each rank continues its own RNG
        state["rng"] = {rng_key: rng_state(setup)}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    if "rng" in state:
        set_rng_state(state["rng"][rng_key], setup)


def rng_state(setup: Distributed) -> torch.Tensor:
    """This rank's RNG states (CPU, and the accelerator's) as one uint8 tensor."""
    states = [torch.get_rng_state()]
    if setup.device.type == "cuda":
        states.append(torch.cuda.get_rng_state(setup.device))
    sizes = torch.tensor([s.numel() for s in states], dtype=torch.int64).view(torch.uint8)
    return torch.cat([torch.tensor([len(states)], dtype=torch.uint8), sizes, *states])


def set_rng_state(packed: torch.Tensor, setup: Distributed) -> None:
    count = int(packed[0])
    sizes = packed[1:1 + 8 * count].clone().view(torch.int64).tolist()
    offset = 1 + 8 * count
    states = []
    for size in sizes:
        states.append(packed[offset:offset + size].clone())
        offset += size
    torch.set_rng_state(states[0])
    if len(states) > 1 and setup.device.type == "cuda":
        torch.cuda.set_rng_state(states[1], setup.device)


def full_state_dict(root: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The whole model's tensors gathered onto rank 0's CPU (empty on other ranks), names without `prefix`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(root, options=state_dict_options(full_state_dict=True, cpu_offload=True))
    return {name.removeprefix(prefix): tensor for name, tensor in state.items()}
