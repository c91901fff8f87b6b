"""`dgemma bench`: dgemma's fast and reference modes against transformers' generate() and against autoregressive
decoding of the same weights, measured in one run.

Design choices:
- Every measurement runs in its own worker process (`python -m dgemma.bench worker ...`), so peak RSS is that
  system's alone and no system warms caches for another. Workers load the model, run one short warm-up, then
  time one generation; repetitions are interleaved (fast, reference, transformers, AR, fast, ...) so that
  drifting machine load hits every system alike. Results are medians with min/max.
- Random weights are fine for speed: a named config is built once with dgemma's initialiser and saved in
  transformers' layout, so every system loads the very same checkpoint.
- With `--adaptive`, diffusion runs with the checkpoint's own stopping settings and the interesting numbers are
  tokens per forward and tok/s against AR decoding of the same model (e.g. on the bundled model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .allocator import tune_allocator
from .engine import until_eos
from .onednn import available as onednn_available, product as reordered_product, reorder
from .widening import linear as widened_linear, widens

S, F = "sliding_attention", "full_attention"

# The "small" configuration of the performance issue: 8 layers with full attention at positions 5 and 7 (the
# last layer is forced to full, as in the reference), 16 experts top-2, canvas 256.
NAMED_CONFIGS = {
    "small": dict(vocab_size=262_144, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  layer_types=[S, S, S, S, F, S, F, S], sliding_window=512,
                  per_layer_config={str(i): {"head_dim": 128, "num_key_value_heads": 2} for i in (4, 6, 7)},
                  num_experts=16, top_k_experts=2, moe_intermediate_size=256),
    # DiffusionGemma-26B-A4B's shapes (docs/gguf layout: hidden 2816, 16 heads, 8 KV heads of 256 on sliding layers
    # and 2 of 512 on full ones, dense MLP 2112, 128 experts x 704 top-8, window 1024); its 30 layers (full
    # attention every sixth) are cut to --layers, the last one full as in the reference.
    "release": dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                    layer_types=[S if (i + 1) % 6 else F for i in range(30)], sliding_window=1024,
                    global_head_dim=512, num_global_key_value_heads=2, num_experts=128, top_k_experts=8,
                    moe_intermediate_size=704, max_position_embeddings=262_144),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, layer_types=[S, F], sliding_window=64,
                 per_layer_config={"1": {"head_dim": 32, "num_key_value_heads": 1}}, num_experts=4, top_k_experts=2,
                 moe_intermediate_size=32),
}
SYSTEMS = ("dgemma-fast", "dgemma-reference", "transformers", "dgemma-ar")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def named_config(name: str, canvas: int, vocab: int | None = None, layers: int | None = None):
    """The ModelConfig of a named config, optionally with another vocabulary or cut to its first `layers` layers
    (the last one full attention, as in the reference)."""
    import dgemma

    text = dict(NAMED_CONFIGS[name], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if vocab:
        text["vocab_size"] = vocab
    if layers:
        text.update(num_hidden_layers=layers, layer_types=text["layer_types"][:layers])
    return dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas,
                                         "text_config": text})


def build_checkpoint(name: str, vocab: int | None, canvas: int, directory: Path, seed: int = 0,
                     layers: int | None = None) -> Path:
    """A random bf16 checkpoint of a named config in transformers' layout (reused if already built), optionally
    cut to its first `layers` layers. Built in bf16 directly, so the released shapes need no fp32 copy."""
    import dgemma

    if (directory / "config.json").is_file():
        return directory
    config = named_config(name, canvas, vocab, layers)
    with torch.device("meta"):
        model = dgemma.DiffusionGemma(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gave the tied encoder its own tensors
    model.reset_rope("cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    dgemma.save(model, directory)
    return directory


def prompt_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


# ---- the roofline ---------------------------------------------------------------------------------------------

def step_cost(config, prompt: int, batch: int = 1) -> dict[str, float]:
    """FLOPs and weight bytes of one denoising step (decoder forward + sampler) from the model's shapes.

    Matmuls only (2 FLOPs per multiply-add); every weight is read once per step (all experts: a canvas of
    hundreds of tokens routes to every one of them); the vocabulary matrix is read twice (head and the
    self-conditioning soft embedding)."""
    h, v, canvas = config.hidden_size, config.vocab_size, config.canvas_length
    tokens = batch * canvas
    layer_flops = layer_params = 0.0
    for i, spec in enumerate(config.layers):
        q, kv = config.num_attention_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        projections = h * (q + kv * (2 if spec.has_v_proj else 1)) + q * h
        keys = canvas + (min(prompt, config.sliding_window - 1) if spec.is_sliding else prompt)
        attention = 2 * config.num_attention_heads * spec.head_dim * keys  # scores and values, per token
        mlp = 3 * h * config.intermediate_size
        experts = (config.top_k_experts * 3 * h * config.moe_intermediate_size + h * config.num_experts
                   if config.has_experts else 0)
        layer_flops += 2 * tokens * (projections + attention + mlp + experts)
        layer_params += projections + mlp + (config.num_experts * 3 * h * config.moe_intermediate_size
                                             if config.has_experts else 0)
    self_conditioning = 3 * h * config.intermediate_size
    layer_flops += 2 * tokens * self_conditioning
    vocab_flops = 2 * tokens * 2 * h * v
    itemsize = 2  # bf16 weights
    return {"layer_flops": layer_flops, "vocab_flops": vocab_flops, "flops": layer_flops + vocab_flops,
            "weight_bytes": itemsize * (layer_params + self_conditioning + 2 * v * h),
            "vocab_elements": tokens * v}


def roofline(config, prompt: int, steps: int, matmul_flops: float, bandwidth: float) -> dict[str, float]:
    """The fastest a step can be on a machine doing `matmul_flops` FLOP/s and `bandwidth` bytes/s."""
    cost = step_cost(config, prompt)
    seconds = max(cost["flops"] / matmul_flops, cost["weight_bytes"] / bandwidth)
    return {**cost, "floor_seconds_per_step": seconds,
            "floor_tokens_per_second": config.canvas_length / (steps * seconds)}


def call_times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds taken by each of `repeat` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def measure_machine(threads: int, repeat: int = 5, copy_bytes: int = 64 * 2**20) -> dict[str, float]:
    """bf16 matmul FLOP/s (a decoder-sized and a vocabulary-sized product) and memory copy bandwidth, here (of
    `copy_bytes`: make it larger than the last-level cache to time the memory itself). Each product's time is the
    fastest of torch's, where oneDNN multiplies bf16 here, of the product with its weight reordered once
    (`dgemma.onednn`, as dgemma runs large bf16 experts), and where this CPU has no native half-precision matmuls, of
    the product widened to float32 (`dgemma.widening`, as dgemma's fast path runs a canvas there): a floor is set by
    the fastest kernel at hand."""
    torch.set_num_threads(threads)

    def best(fn) -> float:
        return min(call_times(fn, repeat))

    def fastest(rows: torch.Tensor, weight: torch.Tensor) -> float:
        """seconds of rows @ weight.T, the faster way"""
        seconds = [best(lambda: torch.nn.functional.linear(rows, weight))]
        if onednn_available():
            reordered = reorder(weight, rows.shape[0])
            seconds.append(best(lambda: reordered_product(rows, reordered)))
        if widens(rows, weight):
            seconds.append(best(lambda: widened_linear(rows, weight)))
        return min(seconds)

    a, b = torch.randn(256, 512, dtype=torch.bfloat16), torch.randn(2048, 512, dtype=torch.bfloat16)
    head = torch.randn(65_536, 512, dtype=torch.bfloat16)
    big = torch.ones(copy_bytes, dtype=torch.uint8)
    copy = torch.empty_like(big)
    return {"matmul_flops_layer_shape": 2 * 256 * 512 * 2048 / fastest(a, b),
            "matmul_flops_vocab_shape": 2 * 256 * 512 * 65_536 / fastest(a, head),
            "copy_bytes_per_second": 2 * big.numel() / best(lambda: copy.copy_(big))}


def print_roofline(args: argparse.Namespace) -> dict:
    """The measured machine and, for the named config at both vocabulary sizes, each step's floor."""
    machine = measure_machine(args.threads)
    flops = machine["matmul_flops_vocab_shape"]
    rows = []
    for vocab in (args.vocab or 262_144, 32_768):
        config = named_config(args.config, args.canvas, vocab)
        floor = roofline(config, args.prompt_length, args.steps, flops, machine["copy_bytes_per_second"])
        rows.append({"vocab": vocab, **floor})
    report = {"machine": machine, "config": args.config, "steps": args.steps, "floors": rows}
    print(json.dumps(report, indent=2))
    return report


# ---- one measurement, in a worker process ---------------------------------------------------------------------

def run_worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.tune_allocator:  # every system alike, transformers too, so that the ratios compare the computations
        tune_allocator()
    directory, dtype = Path(args.checkpoint), DTYPES[args.dtype]
    overrides = json.loads(args.overrides)
    started = time.perf_counter()
    if args.system == "transformers":
        from transformers import DiffusionGemmaForBlockDiffusion
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(directory, dtype=dtype).eval().to(args.device)
        vocab = model.config.text_config.vocab_size
    else:
        import dgemma
        model = dgemma.load(directory, dtype=dtype, device=args.device)
        vocab = model.config.vocab_size
    load_seconds = time.perf_counter() - started
    if args.prompt:
        from .tokenizer import Tokenizer
        ids = torch.tensor([Tokenizer.from_checkpoint(directory).encode(args.prompt)])
    else:
        ids = prompt_ids(vocab, args.prompt_length)
    ids = ids.to(args.device)
    budget = args.max_new_tokens
    run = {"transformers": _run_transformers, "dgemma-ar": _run_ar}.get(args.system, _run_dgemma)
    run(model, ids, budget, dict(overrides, max_denoising_steps=1), args, warmup=True)
    result = run(model, ids, budget, overrides, args, warmup=False)
    result.update(system=args.system, load_seconds=load_seconds,
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return result


def _run_dgemma(model, ids, budget, overrides, args, warmup: bool) -> dict:
    from dgemma.generation import CanvasCommitted, GenerationOutput, generate_steps

    torch.manual_seed(args.seed)
    config = model.generation_config.updated(max_new_tokens=budget, **overrides)
    sampling = "reference" if args.system == "dgemma-reference" else "fast"
    started = time.perf_counter()
    first = None
    for event in generate_steps(model, ids, config, sampling=sampling):
        if first is None and isinstance(event, CanvasCommitted):
            first = time.perf_counter() - started
        if isinstance(event, GenerationOutput):
            output = event
    seconds = time.perf_counter() - started
    tokens = len(output.new_tokens(0, ids.shape[1], config.eos_token_ids))
    return {"tokens": tokens, "seconds": seconds, "forwards": int(output.decoder_forward_passes[0]),
            "time_to_first_token": first}


def _run_transformers(model, ids, budget, overrides, args, warmup: bool) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class FirstCanvas(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # the first put is the prompt itself
                self.first = time.perf_counter()

        def end(self):
            pass

    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    kwargs = dict(overrides)
    if "entropy_bound" in kwargs:
        kwargs["sampler_config"] = EntropyBoundSamplerConfig(float(kwargs.pop("entropy_bound")))
    torch.manual_seed(args.seed)
    streamer = FirstCanvas()
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=budget, streamer=streamer, **kwargs)
    seconds = time.perf_counter() - started
    new = out.sequences[0, ids.shape[1]:ids.shape[1] + budget].tolist()
    eos = model.generation_config.eos_token_id
    forwards = round(len(out.sequences[0, ids.shape[1]:]) / float(out.tokens_per_forward[0])) \
        if float(out.tokens_per_forward[0]) else 0
    tokens = len(until_eos(new, [eos] if isinstance(eos, int) else list(eos or []))[0])
    return {"tokens": tokens, "seconds": seconds, "forwards": forwards,
            "time_to_first_token": streamer.first - started if streamer.first else None}


def _run_ar(model, ids, budget, overrides, args, warmup: bool) -> dict:
    from dgemma.generation import autoregressive_steps

    budget = 4 if warmup else budget
    started = time.perf_counter()
    first, tokens = None, 0
    for _ in autoregressive_steps(model, ids, budget, model.generation_config.eos_token_ids,
                                  generator=torch.Generator().manual_seed(args.seed)):
        tokens += 1
        if first is None:
            first = time.perf_counter() - started
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "forwards": tokens, "time_to_first_token": first}


# ---- the run ----------------------------------------------------------------------------------------------------

def spawn(system: str, checkpoint: Path, args: argparse.Namespace, overrides: dict) -> dict:
    command = [sys.executable, "-m", "dgemma.bench", "worker", "--system", system, "--checkpoint", str(checkpoint),
               "--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads),
               "--prompt-length", str(args.prompt_length),
               "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
               "--overrides", json.dumps(overrides), "--prompt", args.prompt or ""]
    command += ["--tune-allocator"] if args.tune_allocator else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    tok_s = [r["tokens"] / r["seconds"] for r in runs]
    step_s = [r["seconds"] / r["forwards"] for r in runs if r["forwards"]]
    return {"runs": len(runs), "tokens_per_second": stat(tok_s), "seconds_per_forward": stat(step_s),
            "tokens_per_forward": stat([r["tokens"] / r["forwards"] for r in runs if r["forwards"]]),
            "time_to_first_token": stat([r["time_to_first_token"] for r in runs]),
            "peak_rss_bytes": stat([r["peak_rss_bytes"] for r in runs]), "tokens": stat([r["tokens"] for r in runs])}


def main_run(args: argparse.Namespace) -> dict:
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown} (choose from {', '.join(SYSTEMS)})")
    if "transformers" in systems:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: skipping that baseline", file=sys.stderr)
            systems.remove("transformers")
    if args.model:
        checkpoint, label = Path(args.model), Path(args.model).name
    else:
        work = Path(args.work_dir or tempfile.gettempdir()) / (f"dgemma-bench-{args.config}-{args.vocab}-{args.canvas}"
                                                               + (f"-{args.layers}l" if args.layers else ""))
        checkpoint = build_checkpoint(args.config, args.vocab, args.canvas, work, layers=args.layers)
        label = args.config + (f", {args.layers} layers" if args.layers else "")
    overrides = {} if args.adaptive else {"max_denoising_steps": args.steps, "stability_threshold": None}
    print(f"[bench] {label} ({args.dtype}, {args.device}, {args.threads} threads): {', '.join(systems)}; "
          f"{args.repeat} repetitions, each system in its own process, interleaved", file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {s: [] for s in systems}
    started, total = time.perf_counter(), args.repeat * len(systems)
    for repetition in range(args.repeat):
        for system in systems:
            run = spawn(system, checkpoint, args, overrides)
            results[system].append(run)
            done = sum(len(r) for r in results.values())
            eta = (time.perf_counter() - started) / done * (total - done)
            print(f"[bench] rep {repetition + 1}/{args.repeat} {system:17s} {run['tokens'] / run['seconds']:8.2f} tok/s "
                  f"({run['seconds']:.2f} s, {run['forwards']} forwards, RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB; "
                  f"ETA {eta:.0f} s)", file=sys.stderr, flush=True)
    summary = {s: summarise(r) for s, r in results.items()}
    ratios = {}
    if "dgemma-fast" in summary:
        fast = summary["dgemma-fast"]["tokens_per_second"]["median"]
        for other in systems:
            if other != "dgemma-fast":
                ratios[f"dgemma-fast / {other}"] = fast / summary[other]["tokens_per_second"]["median"]
    report = {"label": label, "checkpoint": str(checkpoint), "dtype": args.dtype, "device": args.device,
              "threads": args.threads,
              "prompt": repr(args.prompt) if args.prompt else f"{args.prompt_length} random tokens",
              "max_new_tokens": args.max_new_tokens,
              "allocator": "tuned (dgemma.allocator), every system" if args.tune_allocator else "glibc defaults",
              "settings": overrides or "checkpoint generation_config (adaptive stopping)", "repeat": args.repeat,
              "summary": summary, "ratios": ratios, "runs": results, "machine": machine()}
    return write_report(report, Path(args.out), chart, table)


def write_report(report: dict, out: Path, draw: Callable[[dict, Path], None], describe: Callable[[dict], str]) -> dict:
    """A benchmark's output: the JSON report, its chart beside it (PNG), its table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    draw(report, out.with_suffix(".png"))
    print(describe(report))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return report


def machine() -> dict:
    """What the numbers were measured on: the CPU's model name (with its family and model where the name alone does
    not tell them apart: a virtual machine's "AMD EPYC" may be a Zen 3 or a Zen 5), the vector instructions torch
    uses on it, whether it has AVX-512 BF16 and AMX, its cores, torch, and any GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            pairs = (line.split(":", 1) for line in info.read().split("\n\n")[0].splitlines() if ":" in line)
            fields = {key.strip(): value.strip() for key, value in pairs}
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields:
            cpu = f"{cpu} (family {fields['cpu family']}, model {fields.get('model', '?')})"
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "platform": sys.platform, "gpu": gpu}


def table(report: dict) -> str:
    lines = [f"{report['label']} on {report['machine']['cpu']} ({report['dtype']}, {report['device']}, "
             f"{report['threads']} threads, prompt {report['prompt']}, "
             f"{report['max_new_tokens']} new tokens, allocator: {report['allocator']}, {report['repeat']} runs each, "
             "medians [min-max])",
             f"{'system':18s} {'tok/s':>18s} {'s/forward':>10s} {'tok/forward':>11s} {'TTFT s':>8s} {'peak RSS':>9s}"]
    for system, s in report["summary"].items():
        t = s["tokens_per_second"]
        ttft = s["time_to_first_token"]["median"] if s["time_to_first_token"] else float("nan")
        lines.append(f"{system:18s} {t['median']:8.2f} [{t['min']:.1f}-{t['max']:.1f}] "
                     f"{s['seconds_per_forward']['median']:10.3f} {s['tokens_per_forward']['median']:11.2f} "
                     f"{ttft:8.2f} {s['peak_rss_bytes']['median'] / 2**20:6.0f} MiB")
    lines += [f"{name}: {value:.2f}x" for name, value in report["ratios"].items()]
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(report["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    medians = [report["summary"][s]["tokens_per_second"]["median"] for s in systems]
    lows = [m - report["summary"][s]["tokens_per_second"]["min"] for s, m in zip(systems, medians)]
    highs = [report["summary"][s]["tokens_per_second"]["max"] - m for s, m in zip(systems, medians)]
    axes[0].bar(systems, medians, yerr=[lows, highs], color=["#2b7", "#7ab", "#c75", "#999"][:len(systems)])
    axes[0].set_ylabel("tokens / second (median, min-max)")
    axes[0].set_title(f"{report['label']}, {report['dtype']}")
    rss = [report["summary"][s]["peak_rss_bytes"]["median"] / 2**20 for s in systems]
    axes[1].bar(systems, rss, color="#889")
    axes[1].set_ylabel("peak RSS (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="small", choices=sorted(NAMED_CONFIGS), help="named random config")
    parser.add_argument("--model", help="benchmark this checkpoint instead of a named random config "
                                        "(with --serving: the model to serve; default the bundled one)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--serving", action="store_true",
                        help="measure `dgemma serve`: --clients concurrent requests against the same one by one")
    parser.add_argument("--clients", type=int, default=8, help="requests per run with --serving")
    parser.add_argument("--decode", choices=("diffusion", "autoregressive"), default="diffusion",
                        help="with --serving: the decoding the requests ask for (their `decode` field)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time and memory part by part at a config's real shapes for each weight form (--forms) "
                             "against AR and transformers, projected to the full depth (bench_breakdown)")
    parser.add_argument("--vocab", type=int, help="override the named config's vocabulary size")
    parser.add_argument("--layers", type=int, help="keep the named config's first N layers (e.g. --config release "
                                                   "--layers 2: the released shapes, 2 of its 30 layers)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bfloat16 for named "
                                                                "configs, as stored for --serving)")
    parser.add_argument("--steps", type=int, default=16, help="fixed denoising steps (adaptive stopping off)")
    parser.add_argument("--adaptive", action="store_true", help="use the checkpoint's own stopping settings")
    parser.add_argument("--prompt-length", type=int, default=64, help="random prompt tokens (without --prompt)")
    parser.add_argument("--prompt", help="a text prompt, tokenized with the checkpoint's tokenizer")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--work-dir", help="where random checkpoints are built (default: the temp dir)")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="run every system, transformers included, with dgemma's allocator settings "
                             "(default: glibc's defaults for all, as a library user runs them)")
    parser.add_argument("--out", default="bench/result.json", help="JSON report (a PNG chart goes beside it)")
    parser.add_argument("--roofline", action="store_true",
                        help="measure this machine's matmul rate and bandwidth and print each step's floor")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        parser = argparse.ArgumentParser()
        for flag in ("--system", "--checkpoint", "--dtype", "--device", "--overrides"):
            parser.add_argument(flag, required=True)
        parser.add_argument("--prompt", default="")
        parser.add_argument("--tune-allocator", action="store_true")
        for flag in ("--threads", "--prompt-length", "--max-new-tokens", "--seed"):
            parser.add_argument(flag, type=int, required=True)
        print(json.dumps(run_worker(parser.parse_args(argv[1:]))))
        return
    parser = argparse.ArgumentParser(prog="dgemma bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    """The roofline or the generation benchmark, as the flags say (`dgemma bench --serving` is bench_serving's)."""
    if args.roofline:
        return print_roofline(args)
    args.dtype = args.dtype or "bfloat16"
    return main_run(args)


if __name__ == "__main__":
    main()
