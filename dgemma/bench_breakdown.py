"""`dgemma bench --breakdown`: a named config at its real shapes, part by part, for each form of its weights (bf16,
int8, int4), against autoregressive decoding and transformers, each part beside its floor on this machine, and
projected to the model's full depth.

    dgemma bench --breakdown --config release --layers 2 --forms bf16,int8,int4 --out docs/cpu/breakdown.json

Design choices:
- K of the model's layers (`--layers`, the last one full attention as in the reference) with random weights: every
  matrix has the released shape, so each layer costs what a released layer costs; the per-layer times of a
  sliding and a full layer, times the model's count of each, give the full depth.
- int8 and int4 are GGUF files in dgemma's schemes (`dgemma.quantized.scheme_type`) loaded as a user loads one.
  Their codes and scales are random, not quantised from the bf16 weights: ggml's K-quant search takes minutes per
  released layer in numpy, and the speed of a matmul does not depend on the values of its codes.
- Each form is measured in its own process (resident memory is that form's alone): one prefill of the prompt
  through the encoder, denoising steps of one canvas (the decoder with self-conditioning, then the fast sampler,
  as the engine runs them), and autoregressive tokens after the prompt (an encoder pass of one token and the
  vocabulary head), with each layer's time from forward hooks (on a CPU the layers run one after another, so the
  parts add up to the whole). Medians over `--repeat` calls after a warm-up call; with `--rounds N`, every form is
  measured N times, the forms interleaved in each round (a shared machine's drift then slows them alike), and the
  report holds the medians over rounds and each round's projected step and token.
- Forms with 4-bit matrices or Q8_0 experts (int8, int4, int4_experts, q4_k_m) are measured once more loaded for
  autoregressive decoding (`dgemma.load(decode="autoregressive")`, the layout `--decode autoregressive` gets: on AMX
  experts in torch's int4 kernel, faster at one row, slower at a canvas's share; on the AVX-512 kernel 8-bit
  attention as 4-bit halves) where that layout differs (`one_row_layout_forms`): prefill and tokens only. Their
  projected AR token is that run's; the canvas layout's is kept beside it (`ar_token_seconds_canvas_layout`), and
  the prompt's prefill in the token layout too.
- With `--ar-context N`, tokens are timed once more after the cache is filled to N tokens (random ones, in prompts of
  512): a token then also reads its layers' keys and values (a sliding layer's last 1,024, a full layer's all), which
  the floor at that context counts too (`kv_bytes`).
- `generate()` of one canvas with `--steps` fixed steps, by dgemma (each form) and by transformers (bf16), in their
  own processes (`dgemma bench`'s workers): the whole step as a user sees it, prefill and commit included.
- Floors: a denoising step at the measured bf16 matmul rate (it is compute-bound: 256 tokens x 8 experts route to
  every expert, so every weight is used many times); an autoregressive token at the measured copy bandwidth
  times the bytes of the weights it reads (its layers' attention and dense MLP, its top-k experts, the head). The
  rates are measured at the run's start (`floor`) and, in each worker, just before and after its measurements
  (`floor_beside`: a step's floor at its worker's rates, a token's at its worker's), so that a shared machine's
  slow or fast minutes move a measurement and its floor together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bench import build_checkpoint, machine, measure_machine, named_config, spawn, step_cost, write_report

FORMS = ("bf16", "int8", "int4", "int4_experts", "q4_k_m")
SCHEME_OF_FORM = {"bf16": None, "int8": "int8", "int4": "int4", "int4_experts": "int4_experts", "q4_k_m": "q4_k_m"}
# The forms holding 4-bit matrices or Q8_0 experts, whose layout on a CPU may depend on the decoding they are loaded
# for; of them, those with 8-bit matrices other than experts (attention, the router, q4_k_m's dense down projection).
ONE_ROW_LAYOUT_FORMS = ("int8", "int4", "int4_experts", "q4_k_m")
EIGHT_BIT_LINEAR_FORMS = ("int8", "int4", "q4_k_m")
# The released model card's tokens per forward pass (../design: 15-20; vLLM runs 16 fixed steps per 256-token canvas)
# and the bundled model's at its shipped settings (docs/quality.md), for the diffusion tok/s projections.
TOKENS_PER_FORWARD = (1.0, 5.6, 16.0)
# A typical desktop, for the projection: a 16-core Zen 4 (Ryzen 9 7950X). bf16 matmuls: 16 x 175 GFLOP/s, the per-core
# rate measured on a 2-core Zen 4 EPYC (AVX-512 BF16, no AMX: ~350 GFLOP/s for 2 cores, issue 10); memory: dual-channel
# DDR5-6000, 96 GB/s peak, ~70 GB/s achievable by a copy. Assumptions, not measurements.
DESKTOP = {"name": "16-core Zen 4 desktop (Ryzen 9 7950X, dual-channel DDR5-6000)", "matmul_flops": 16 * 175e9,
           "copy_bytes_per_second": 70e9}


# ---- random quantised weights --------------------------------------------------------------------------------------

# Offsets of the fp16 fields (d, and dmin for Q4_K) in a block, and the d that gives random codes a standard deviation
# near `std`: Q8_0 codes -128..127 (std 74), Q4_0 codes - 8 (std 4.6), Q5_0 codes - 16 (std 9.2), Q4_K codes 0..15
# times 6-bit sub-scales (std about 145 in units of d), Q6_K codes - 32 (std 18.5) times int8 sub-scales (rms 74).
_SCALE_FIELDS = {"Q8_0": ((0,), 74.0), "Q4_0": ((0,), 4.6), "Q5_0": ((0,), 9.2), "Q4_K": ((0, 2), 145.0),
                 "Q6_K": ((208,), 18.5 * 74.0)}


def random_blocks(qtype: str, shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Valid GGUF block bytes of `qtype` for a tensor of `shape`: random codes (and sub-block scales), every fp16
    scale field set so that the values' spread is about `std`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if qtype not in _SCALE_FIELDS:
        raise ValueError(f"random blocks are made for {', '.join(_SCALE_FIELDS)}, not {qtype}")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    offsets, spread = _SCALE_FIELDS[qtype]
    data = rng.integers(0, 256, size=(int(np.prod(shape)) // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(std / spread).tobytes(), dtype=np.uint8)
    for at in offsets:
        data[:, at:at + 2] = scale
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def weights_file(checkpoint: Path, form: str, seed: int = 0) -> Path:
    """The form's weights: the bf16 checkpoint itself, or a GGUF file of it under the form's scheme with random codes
    (built once, beside the checkpoint)."""
    scheme = SCHEME_OF_FORM[form]
    if scheme is None:
        return checkpoint
    path = checkpoint.with_name(f"{checkpoint.name}-{form}.gguf")
    if path.is_file():
        return path
    from .checkpoints import load_model, to_checkpoint_names
    from .gguf import write_gguf
    from .quantized import scheme_type

    config = json.loads((checkpoint / "config.json").read_text())
    tensors = to_checkpoint_names(load_model(checkpoint, dtype=torch.bfloat16))
    rng = np.random.default_rng(seed)
    types, blocks = {}, {}
    for name, tensor in tensors.items():
        qtype = scheme_type(name, tuple(tensor.shape), scheme)
        if qtype is not None:
            types[name] = qtype
            blocks[name] = random_blocks(qtype, tuple(tensor.shape), 0.02, rng)
            tensors[name] = torch.empty(tensor.shape, device="meta")
    return write_gguf(path, config, tensors, types=types, blocks=blocks)


# ---- one form, in a worker process ----------------------------------------------------------------------------------

def resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class LayerClock:
    """Wall time of every call of every block of a layer stack, from forward hooks: (layer, tokens, seconds)."""

    def __init__(self, blocks: torch.nn.ModuleList):
        self.calls: list[tuple[int, int, float]] = []
        self._started = 0.0
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(self._start)
            block.register_forward_hook(lambda module, args, out, index=index: self._stop(index, args))

    def _start(self, module, args) -> None:
        self._started = time.perf_counter()

    def _stop(self, index: int, args) -> None:
        self.calls.append((index, args[0].shape[1], time.perf_counter() - self._started))

    def per_layer(self, tokens: int, skip: int) -> list[float]:
        """Median seconds of each layer over its calls with `tokens` tokens, after the first `skip` (warm-ups)."""
        times: dict[int, list[float]] = defaultdict(list)
        for index, count, seconds in self.calls:
            if count == tokens:
                times[index].append(seconds)
        return [statistics.median(times[i][skip:]) for i in sorted(times)]

    def clear(self) -> None:
        self.calls.clear()


def one_row_layout_forms() -> tuple[str, ...]:
    """The forms whose layout on this CPU depends on the decoding they are loaded for (`dgemma.quantized.
    cpu_int4_layout`): on the AVX-512 kernel those with 8-bit matrices other than experts (which take it as halves
    for a token's row only; 4-bit matrices and Q8_0 experts take it in either load), else those holding 4-bit
    matrices or Q8_0 experts."""
    from .quantized import fast_int4_layout

    return EIGHT_BIT_LINEAR_FORMS if fast_int4_layout() == "avx512" else ONE_ROW_LAYOUT_FORMS


def held_bytes(model) -> dict[str, int]:
    """Bytes of weights held, per decoder layer (its experts apart) and for the rest (embedding, norms, ...)."""
    from .model import attached_weights
    from .onednn import ReorderedExperts
    from .quantized import CpuInt4, GroupQuantized

    held: dict[str, int] = defaultdict(int)

    def place(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "decoder" and parts[1] == "layers":
            return f"layer{parts[2]}" + (".experts" if parts[3] == "experts" else "")
        return "rest"

    seen: set[int] = set()
    # Tied tensors are counted once, under the decoder's name (the encoder's layers are the decoder's weights).
    named = sorted(list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()),
                   key=lambda item: not item[0].startswith("decoder"))
    for name, tensor in named:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            held[place(name)] += tensor.numel() * tensor.element_size()
    for name, weight in attached_weights(model, (GroupQuantized, CpuInt4, ReorderedExperts)):
        held[place(name)] += weight.nbytes()
    return dict(held)


@torch.no_grad()
def measure_parts(path: Path, threads: int, prompt_length: int, repeat: int, ar_tokens: int, seed: int,
                  decode: str = "diffusion", ar_context: int = 0) -> dict:
    """One form's parts: see the module's design notes. Loaded for `decode`; for "autoregressive", the prompt's
    prefill and the tokens only. With `ar_context` past the prompt and its tokens, tokens once more at that
    context (`ar_token_seconds_at_context`, `ar_layers_at_context`)."""
    import dgemma
    from .cache import KVCache

    torch.set_num_threads(threads)
    before = resident_bytes()
    started = time.perf_counter()
    model = dgemma.load(path, dtype=torch.bfloat16, decode=decode)
    load_seconds = time.perf_counter() - started
    config, canvas_length = model.config, model.config.canvas_length
    generator = torch.Generator().manual_seed(seed)
    encoder_clock = LayerClock(model.encoder.layers)

    def timed(fn) -> float:
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    prompt = torch.randint(3, config.vocab_size, (1, prompt_length), generator=generator)
    valid = torch.ones_like(prompt, dtype=torch.bool)
    prefill = []
    capacity = max(prompt_length + canvas_length + ar_tokens, ar_context + ar_tokens + 1)
    for _ in range(repeat + 1):
        cache = KVCache(config, 1, model.dtype, model.device, capacity=capacity)
        prefill.append(timed(lambda: model.encode(prompt, cache.encoder_plan(model.rope, valid), exact=False)))
        cache.commit(valid)
    measured = {"load_seconds": load_seconds, "layer_types": [spec.is_sliding for spec in config.layers],
                "prefill_seconds": statistics.median(prefill[1:]),
                "prefill_layers": encoder_clock.per_layer(prompt_length, skip=1)}
    if decode == "diffusion":
        measured.update(denoising_parts(model, cache, canvas_length, repeat, generator))
    measured.update(autoregressive_parts(model, cache, prompt[:, -1:], ar_tokens, encoder_clock))
    if ar_context > cache.lengths[0]:
        while cache.lengths[0] < ar_context:  # filled by prompts of at most 512 tokens
            more = torch.randint(3, config.vocab_size, (1, min(512, ar_context - cache.lengths[0])),
                                 generator=generator)
            real = torch.ones_like(more, dtype=torch.bool)
            model.encode(more, cache.encoder_plan(model.rope, real), exact=False)
            cache.commit(real)
        at_context = autoregressive_parts(model, cache, prompt[:, -1:], ar_tokens, encoder_clock)
        measured.update(ar_context=ar_context, ar_token_seconds_at_context=at_context["ar_token_seconds"],
                        ar_layers_at_context=at_context["ar_layers"])
    return {**measured, "resident_bytes": resident_bytes() - before, "held_bytes": held_bytes(model)}


def denoising_parts(model, cache, canvas_length: int, repeat: int, generator: torch.Generator) -> dict:
    """Denoising steps of one canvas after the prompt in `cache`: the decoder's and the sampler's median seconds and
    each decoder layer's."""
    from .sampling import Workspace, draw_uniforms, fast_step

    config = model.config
    decoder_clock = LayerClock(model.decoder.layers)
    plan = cache.decoder_plan(model.rope, 1, canvas_length)
    canvas = torch.randint(0, config.vocab_size, (1, canvas_length), generator=generator)
    workspace, soft = Workspace(), None
    embed_scale = model.decoder.embed_tokens.scale_as(model.dtype)
    decoder, sampler = [], []
    for _ in range(repeat + 2):  # the first step (no self-conditioning yet) and one more warm up
        begin = time.perf_counter()
        hidden = model.decode(canvas, plan, soft, exact=False)
        middle = time.perf_counter()
        step = fast_step(hidden, model.head_matrix, model.embedding_matrix, embed_scale,
                         config.final_logit_softcapping, torch.tensor([0.8]),
                         draw_uniforms(canvas_length, generator), workspace)
        decoder.append(middle - begin)
        sampler.append(time.perf_counter() - middle)
        canvas, soft = step.sampled, step.self_conditioning
    return {"decoder_seconds": statistics.median(decoder[2:]),
            "decoder_layers": decoder_clock.per_layer(canvas_length, skip=2),
            "sampler_seconds": statistics.median(sampler[2:])}


def autoregressive_parts(model, cache, token: torch.Tensor, ar_tokens: int, encoder_clock: LayerClock) -> dict:
    """Tokens after the prompt in `cache`, one encoder pass and the head each, with the kernels autoregressive
    decoding runs (`exact=False`): median seconds and each layer's."""
    encoder_clock.clear()
    one = torch.ones_like(token, dtype=torch.bool)
    autoregressive = []
    for _ in range(ar_tokens + 1):
        begin = time.perf_counter()
        out = model.encode(token, cache.encoder_plan(model.rope, one), exact=False)
        cache.commit(one)
        token = model.logits(out[:, -1:], exact=False).argmax(-1)
        autoregressive.append(time.perf_counter() - begin)
    return {"ar_token_seconds": statistics.median(autoregressive[1:]), "ar_layers": encoder_clock.per_layer(1, skip=1)}


# ---- the run ---------------------------------------------------------------------------------------------------------

def spawn_parts(path: Path, args: argparse.Namespace, decode: str = "diffusion") -> dict:
    command = [sys.executable, "-m", "dgemma.bench_breakdown", "worker", str(path), str(args.threads),
               str(args.prompt_length), str(args.repeat), str(args.ar_tokens), str(args.seed), decode,
               str(args.ar_context)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"breakdown worker for {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def project(parts: dict, full, steps: int, tokens: dict | None = None) -> dict:
    """The full model from the slice: each layer kind's measured time (and bytes) times the model's count of that
    kind, plus the parts outside the layers (embedding, self-conditioning, sampler, head). `tokens`: the same form
    loaded for autoregressive decoding, whose tokens (and prefill) then give the AR figures."""
    sliding = [i for i, s in enumerate(parts["layer_types"]) if s]
    full_attention = [i for i, s in enumerate(parts["layer_types"]) if not s]
    counts = {"sliding": sum(s.is_sliding for s in full.layers), "full": sum(not s.is_sliding for s in full.layers)}

    def depth(per_layer: list[float]) -> float:
        mean = {kind: statistics.mean(per_layer[i] for i in members)
                for kind, members in (("sliding", sliding), ("full", full_attention))}
        return counts["sliding"] * mean["sliding"] + counts["full"] * mean["full"]

    def deepened(measured: dict, total: str, layers: str) -> float:
        """A pass's time at full depth: its layers' times at the model's counts, plus what it spent outside them."""
        return depth(measured[layers]) + measured[total] - sum(measured[layers])

    def ar_token_of(measured: dict) -> float:
        return deepened(measured, "ar_token_seconds", "ar_layers")

    def prefill_of(measured: dict) -> float:
        return deepened(measured, "prefill_seconds", "prefill_layers")

    step = deepened(parts, "decoder_seconds", "decoder_layers") + parts["sampler_seconds"]
    ar_token = ar_token_of(tokens or parts)
    held = parts["held_bytes"]
    layer_bytes = [held.get(f"layer{i}", 0) + held.get(f"layer{i}.experts", 0) for i in range(len(parts["layer_types"]))]
    memory = depth(layer_bytes) + held.get("rest", 0)
    runtime = parts["resident_bytes"] - sum(held.values())  # what loading held beyond the weights
    projection = {"step_seconds": step, "prefill_seconds": prefill_of(parts),
                  "ar_token_seconds": ar_token, "ar_tokens_per_second": 1 / ar_token,
                  "canvas_seconds_at_fixed_steps": steps * step,
                  "diffusion_tokens_per_second": {str(tpf): tpf / step for tpf in TOKENS_PER_FORWARD},
                  "break_even_tokens_per_forward": step / ar_token,
                  "weights_bytes": memory, "resident_bytes_estimate": memory + max(runtime, 0)}
    if tokens is not None:
        projection.update(ar_token_seconds_canvas_layout=ar_token_of(parts),
                          prefill_seconds_token_layout=prefill_of(tokens))
    timed = tokens or parts  # the load whose tokens give the AR figures
    if "ar_token_seconds_at_context" in timed:
        at_context = deepened(timed, "ar_token_seconds_at_context", "ar_layers_at_context")
        projection.update(ar_context=int(timed["ar_context"]), ar_token_seconds_at_context=at_context,
                          ar_tokens_per_second_at_context=1 / at_context)
    return projection


def ar_bytes(parts: dict, full) -> float:
    """Bytes of weights one autoregressive token reads in the full model: each layer's non-expert weights and its
    top-k experts' share, and the vocabulary head (the embedding row it looks up is negligible)."""
    held, types = parts["held_bytes"], parts["layer_types"]
    share = full.top_k_experts / full.num_experts if full.has_experts else 0.0
    per_layer = [held.get(f"layer{i}", 0) + share * held.get(f"layer{i}.experts", 0) for i in range(len(types))]
    mean = statistics.mean(per_layer)
    head = held.get("rest", 0)  # the embedding (the head, tied) dominates what is outside the layers
    return full.num_hidden_layers * mean + head


def kv_bytes(full, context: int, itemsize: int = 2) -> int:
    """Bytes of cached keys and values a token reads at `context` in the full model: each layer's (a sliding layer
    its last `sliding_window`, a full layer all), in a cache of `itemsize`-byte values (bf16)."""
    return sum(2 * (min(context, full.sliding_window) if spec.is_sliding else context) * spec.num_kv_heads
               * spec.head_dim * itemsize for spec in full.layers)


def floors(parts: dict, full, prompt: int, rates: dict, tokens: dict | None = None) -> dict:
    """A step's floor (its FLOPs or its weights' bytes, whichever takes longer) and a token's (the bytes it reads),
    at `rates`. A token's bytes are counted in the layout its time is measured in: `tokens`, the parts measured
    loaded for autoregressive decoding, where given (a load for diffusion may hold second copies a token never
    reads: the tiles kept beside a 4-bit layout). Where tokens were timed at a longer context, a token's floor
    there adds the keys and values it reads (`kv_bytes`)."""
    cost, token_bytes = step_cost(full, prompt), ar_bytes(tokens or parts, full)
    step = max(cost["flops"] / rates["matmul_flops"], cost["weight_bytes"] / rates["copy_bytes_per_second"])
    floor = {"step_seconds": step, "ar_token_seconds": token_bytes / rates["copy_bytes_per_second"],
             "step_flops": cost["flops"], "ar_token_bytes": token_bytes}
    context = (tokens or parts).get("ar_context")
    if context:
        at_context = token_bytes + kv_bytes(full, context)
        floor.update(ar_token_bytes_at_context=at_context,
                     ar_token_seconds_at_context=at_context / rates["copy_bytes_per_second"])
    return floor


RATE_COPY_BYTES = 2**30  # copies past a server CPU's last-level cache (480 MiB on the AMX Xeon)


def rates_here(threads: int, copy_bytes: int = RATE_COPY_BYTES, repeat: int = 5) -> dict[str, float]:
    """The floors' rates, measured now (the best of `repeat` tries): bf16 matmul FLOP/s (a vocabulary-sized product)
    and copy bandwidth."""
    here = measure_machine(threads, repeat=repeat, copy_bytes=copy_bytes)
    return {"matmul_flops": here["matmul_flops_vocab_shape"], "copy_bytes_per_second": here["copy_bytes_per_second"]}


def worker_parts(path: Path, threads: int, prompt_length: int, repeat: int, ar_tokens: int, seed: int,
                 decode: str = "diffusion", ar_context: int = 0,
                 measure_rates: Callable[[], dict[str, float]] | None = None) -> dict:
    """`measure_parts` with the floors' rates (`measure_rates`, default `rates_here(threads)`) measured just before
    and just after it in the same process, their means as `matmul_flops` and `copy_bytes_per_second`: on a shared
    machine the rates at the start of a run can be another minute's (the same `int4` token projected 0.227 to 0.331 s
    over one day's runs on a 2-core EPYC)."""
    measure_rates = measure_rates or (lambda: rates_here(threads))
    before = measure_rates()
    parts = measure_parts(path, threads, prompt_length, repeat, ar_tokens, seed, decode, ar_context)
    after = measure_rates()
    return {**parts, **{key: (before[key] + after[key]) / 2 for key in before}}


def floors_beside(parts: dict, full, prompt: int, tokens: dict | None = None) -> dict:
    """`floors` at the rates measured beside each measurement (`worker_parts`): a step's at its worker's, a token's
    at the worker's that timed it (`tokens`, where given)."""
    def rates_of(measured: dict) -> dict[str, float]:
        return {key: measured[key] for key in ("matmul_flops", "copy_bytes_per_second")}
    step = floors(parts, full, prompt, rates_of(parts), tokens)
    token = floors(parts, full, prompt, rates_of(tokens or parts), tokens)
    return {**token, "step_seconds": step["step_seconds"], "step_rates": rates_of(parts),
            "token_rates": rates_of(tokens or parts)}


def median_of(measurements: list[dict]) -> dict:
    """One measurement from several of the same thing: the median of each number, element by element for lists of
    numbers; anything else (flags, names, byte counts per part) from the first."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    first, merged = measurements[0], {}
    for key, value in first.items():
        values = [m[key] for m in measurements]
        if number(value):
            merged[key] = statistics.median(values)
        elif isinstance(value, list) and value and all(number(v) for v in value):
            merged[key] = [statistics.median(column) for column in zip(*values)]
        else:
            merged[key] = value
    return merged


def main_run(args: argparse.Namespace) -> dict:
    forms = [f for f in args.forms.split(",") if f]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        raise ValueError(f"unknown weight forms {unknown} (choose from {', '.join(FORMS)})")
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: measure every form at least once")
    if args.ar_context and args.ar_context <= args.prompt_length + args.ar_tokens + 1:
        raise ValueError(f"--ar-context {args.ar_context}: tokens are timed after the {args.prompt_length}-token prompt "
                         f"and {args.ar_tokens + 1} tokens already; ask for a longer context")
    layers = args.layers or 2
    if layers < 2:
        raise ValueError(f"--layers {layers}: the breakdown projects each layer kind, so the slice needs 2 layers or "
                         "more (the last is full attention, the first sliding)")
    work = Path(args.work_dir or tempfile.gettempdir()) / f"dgemma-breakdown-{args.config}-{args.canvas}-{layers}l"
    checkpoint = build_checkpoint(args.config, args.vocab, args.canvas, work, layers=layers)
    full = named_config(args.config, args.canvas)
    rates = rates_here(args.threads)
    print(f"[breakdown] {args.config}, {layers} of {full.num_hidden_layers} layers, forms {', '.join(forms)}, "
          f"{args.threads} threads; machine: {rates['matmul_flops'] / 1e9:.0f} GFLOP/s bf16, "
          f"{rates['copy_bytes_per_second'] / 1e9:.1f} GB/s copy", file=sys.stderr, flush=True)
    spawn_args = argparse.Namespace(dtype="bfloat16", device="cpu", threads=args.threads,
                                    prompt_length=args.prompt_length, max_new_tokens=args.canvas, seed=args.seed,
                                    prompt=None, tune_allocator=False)
    fixed = {"max_denoising_steps": args.steps, "stability_threshold": None}
    systems = [(form, system) for form in forms for system in ("parts", "generate")]
    systems += [(form, "tokens") for form in forms if form in one_row_layout_forms()]
    if "transformers" not in args.skip.split(",") and "bf16" in forms:
        try:
            import transformers  # noqa: F401
            systems.append(("bf16", "transformers"))
        except ImportError:
            print("transformers is not installed: skipping that baseline", file=sys.stderr)
    # Rounds interleave the forms (every form once per round), so that a machine whose speed drifts slows each form
    # alike, and the medians over rounds compare them.
    plan = [(round_, form, system) for round_ in range(args.rounds) for form, system in systems]
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    started = time.perf_counter()
    for done, (round_, form, system) in enumerate(plan):
        path = weights_file(checkpoint, form, args.seed)
        if system == "parts":
            parts = spawn_parts(path, args)
            runs[form, system].append(parts)
            note = (f"step {parts['decoder_seconds'] + parts['sampler_seconds']:.2f} s, AR token "
                    f"{parts['ar_token_seconds'] * 1e3:.0f} ms, {parts['resident_bytes'] / 2**30:.2f} GiB")
        elif system == "tokens":
            tokens = spawn_parts(path, args, decode="autoregressive")
            runs[form, system].append(tokens)
            note = (f"loaded for AR: token {tokens['ar_token_seconds'] * 1e3:.0f} ms, "
                    f"prefill {tokens['prefill_seconds']:.2f} s")
        else:
            run = spawn("transformers" if system == "transformers" else "dgemma-fast", path, spawn_args, fixed)
            runs[form, system].append({**run, "seconds_per_step": run["seconds"] / run["forwards"]})
            note = f"{run['seconds'] / run['forwards']:.2f} s per step"
        eta = (time.perf_counter() - started) / (done + 1) * (len(plan) - done - 1)
        print(f"[breakdown] round {round_ + 1}/{args.rounds} {form:5s} {system:12s} {note} (ETA {eta:.0f} s)",
              file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    for form in forms:
        entry = results[form] = {}
        measured, token_runs = runs[form, "parts"], runs.get((form, "tokens"))
        entry["parts"] = parts = median_of(measured)
        tokens = None
        if token_runs:
            entry["token_layout_parts"] = tokens = median_of(token_runs)
        entry["projection"] = project(parts, full, args.steps, tokens)
        entry["floor"] = floors(parts, full, args.prompt_length, rates, tokens)
        entry["floor_beside"] = floors_beside(parts, full, args.prompt_length, tokens)
        entry["desktop_floor"] = floors(parts, full, args.prompt_length, DESKTOP, tokens)
        entry["rounds"] = [{key: value for key, value in project(one, full, args.steps, token_run).items()
                            if key in ("step_seconds", "ar_token_seconds", "ar_token_seconds_canvas_layout",
                                       "ar_token_seconds_at_context")}
                           for one, token_run in zip(measured, token_runs or [None] * len(measured))]
        entry["generate"] = median_of(runs[form, "generate"])
    if ("bf16", "transformers") in runs:
        results["bf16"]["transformers_generate"] = median_of(runs["bf16", "transformers"])
    report = {"config": args.config, "layers": layers, "full_layers": full.num_hidden_layers, "steps": args.steps,
              "prompt_length": args.prompt_length, "threads": args.threads, "rounds": args.rounds,
              "machine": machine(), "rates": rates, "desktop": DESKTOP, "tokens_per_forward": TOKENS_PER_FORWARD,
              "forms": results}
    return write_report(report, Path(args.out), chart, table)


def table(report: dict) -> str:
    forms = report["forms"]
    lines = [f"{report['config']}: {report['layers']} of {report['full_layers']} layers measured on "
             f"{report['machine']['cpu']}, {report['threads']} threads (seconds; medians"
             f"{'' if report.get('rounds', 1) == 1 else ' of ' + str(report['rounds']) + ' interleaved rounds'})",
             "| form | decoder (K layers) | per sliding / full layer | sampler | step | generate() step | "
             "AR token (canvas layout / token layout) | weights held | resident |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for form, entry in forms.items():
        parts = entry["parts"]
        kinds = parts["layer_types"]
        sliding = statistics.mean(t for t, s in zip(parts["decoder_layers"], kinds) if s)
        full = statistics.mean(t for t, s in zip(parts["decoder_layers"], kinds) if not s)
        generate = entry.get("generate", {}).get("seconds_per_step", float("nan"))
        token_layout = entry.get("token_layout_parts")
        ar = f"{parts['ar_token_seconds']:.3f}" + (f" / {token_layout['ar_token_seconds']:.3f}" if token_layout
                                                   else "")
        lines.append(f"| {form} | {parts['decoder_seconds']:.3f} | {sliding:.3f} / {full:.3f} | "
                     f"{parts['sampler_seconds']:.3f} | {parts['decoder_seconds'] + parts['sampler_seconds']:.3f} | "
                     f"{generate:.3f} | {ar} | "
                     f"{sum(parts['held_bytes'].values()) / 2**30:.2f} GiB | {parts['resident_bytes'] / 2**30:.2f} GiB |")
    if "transformers_generate" in forms.get("bf16", {}):
        lines.append(f"transformers generate() step (bf16): "
                     f"{forms['bf16']['transformers_generate']['seconds_per_step']:.3f} s")
    context = next((e["projection"]["ar_context"] for e in forms.values() if "ar_context" in e["projection"]), None)
    lines += ["", f"projected to {report['full_layers']} layers on this machine (floor in brackets; AR tokens of 4-bit "
                  "forms in the layout they are loaded in for --decode autoregressive):",
              "| form | step s | AR token s | AR tok/s | diffusion tok/s at 16 tok/forward | break-even tok/forward | "
              "weights GiB | step / token x floor (rates beside) |"
              + (f" AR token at {context} tokens s | AR tok/s at {context} |" if context else ""),
              "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if context else "")]
    for form, entry in forms.items():
        p, f = entry["projection"], entry["floor"]
        at_context = (f" {p['ar_token_seconds_at_context']:.3f} [{f['ar_token_seconds_at_context']:.3f}] | "
                      f"{p['ar_tokens_per_second_at_context']:.2f} |" if context else "")
        lines.append(f"| {form} | {p['step_seconds']:.2f} [{f['step_seconds']:.2f}] | {p['ar_token_seconds']:.3f} "
                     f"[{f['ar_token_seconds']:.3f}] | {p['ar_tokens_per_second']:.2f} | "
                     f"{p['diffusion_tokens_per_second']['16.0']:.2f} | {p['break_even_tokens_per_forward']:.1f} | "
                     f"{p['weights_bytes'] / 2**30:.1f} | {beside_ratios(entry)} |" + at_context)
    return "\n".join(lines)


def beside_ratios(entry: dict) -> str:
    """A form's projected step and token over their floors at the rates measured beside them (`floors_beside`)."""
    beside, projected = entry["floor_beside"], entry["projection"]
    return (f"{projected['step_seconds'] / beside['step_seconds']:.2f}x / "
            f"{projected['ar_token_seconds'] / beside['ar_token_seconds']:.2f}x")


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = list(report["forms"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    parts = ("layers", "outside layers", "sampler")
    bottoms = [0.0] * len(forms)
    for part, color in zip(parts, ("#2b7", "#7ab", "#c75")):
        values = []
        for form in forms:
            p = report["forms"][form]["parts"]
            values.append({"layers": sum(p["decoder_layers"]),
                           "outside layers": p["decoder_seconds"] - sum(p["decoder_layers"]),
                           "sampler": p["sampler_seconds"]}[part])
        axes[0].bar(forms, values, bottom=bottoms, color=color, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    axes[0].set_ylabel("seconds")
    axes[0].set_title(f"one denoising step, {report['layers']} of {report['full_layers']} layers")
    axes[0].legend()
    projected = [report["forms"][f]["projection"] for f in forms]
    width = 0.35
    x = np.arange(len(forms))
    axes[1].bar(x - width / 2, [p["ar_tokens_per_second"] for p in projected], width, label="autoregressive",
                color="#999")
    axes[1].bar(x + width / 2, [p["diffusion_tokens_per_second"]["16.0"] for p in projected], width,
                label="diffusion, 16 tokens/forward", color="#2b7")
    axes[1].set_xticks(x, forms)
    axes[1].set_ylabel("tokens / second")
    axes[1].set_title(f"projected, {report['full_layers']} layers, this machine")
    axes[1].legend()
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forms", default=",".join(FORMS), help=f"with --breakdown: weight forms of {FORMS}")
    parser.add_argument("--ar-tokens", type=int, default=8, help="with --breakdown: autoregressive tokens timed")
    parser.add_argument("--ar-context", type=int, default=0,
                        help="with --breakdown: also time tokens with the cache filled to this many tokens")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --breakdown: measure every form this many times, interleaved, and report medians")
    parser.add_argument("--skip", default="", help="with --breakdown: 'transformers' to leave that baseline out")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        path, threads, prompt, repeat, ar_tokens, seed, decode, ar_context = argv[1:]
        print(json.dumps(worker_parts(Path(path), int(threads), int(prompt), int(repeat), int(ar_tokens),
                                      int(seed), decode, int(ar_context))))
        return
    raise SystemExit("run it as `dgemma bench --breakdown`")


if __name__ == "__main__":
    main()
