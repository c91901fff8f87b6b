"""How a denoising step of the engine grows with the number of canvases it carries: the median step time with one
request and with N, on a checkpoint (default the bundled model), in process. A tool behind docs/performance.md's
serving arithmetic, not a benchmark (`dgemma bench --serving` measures the server from outside).

    python scripts/engine_batch_steps.py [--model DIR] [--dtype float32|bfloat16] [--rows 8] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dgemma
from dgemma.allocator import tune_allocator
from dgemma.cache import KVCache
from dgemma.engine import Engine, Group


def median_step_seconds(model, groups: int, capacity_rows: int, steps: int, prompt_length: int = 20) -> float:
    cache = KVCache(model.config, capacity_rows, model.dtype, model.device, capacity=prompt_length + 2048)
    engine = Engine(model, cache)
    # Fixed steps (no adaptive stopping) and a budget no run reaches: every step carries every canvas.
    config = model.generation_config.updated(max_new_tokens=2048, stability_threshold=None)
    for index in range(groups):
        prompt = torch.randint(3, model.config.vocab_size, (1, prompt_length),
                               generator=torch.Generator().manual_seed(index))
        engine.add(Group(prompt, config, generator=torch.Generator().manual_seed(index), budget=2048))
    for _ in range(5):  # prefill and the first canvases
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as `dgemma serve` runs: without it, fresh [rows, vocab] buffers are mapped page by page
    model = dgemma.load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    one = median_step_seconds(model, 1, args.rows, args.steps)
    many = median_step_seconds(model, args.rows, args.rows, args.steps)
    print(json.dumps({"dtype": str(model.dtype).removeprefix("torch."), "threads": args.threads,
                      "step_ms_1": round(1000 * one, 2), f"step_ms_{args.rows}": round(1000 * many, 2),
                      "ratio": round(many / one, 2)}))


if __name__ == "__main__":
    main()
