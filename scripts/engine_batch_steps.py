"""How a denoising step of the engine grows with the number of canvases it carries: the median step time with one
request and with N, on a checkpoint (default the bundled model), in process, and the time in matrix products
(`products_ms_*`: the median step times the share of products in further steps under torch's profiler). A tool
behind docs/performance.md's serving arithmetic, not a benchmark (`dgemma bench --serving` measures the server from
outside).

With `--serving FILE` (a `dgemma bench --serving` report of the same model) it also prints the most that serving N
requests at once can gain over serving them one after another on this machine: the one-by-one run takes S_seq
steps of one canvas (t_1 each); the concurrent run carries the same S_seq canvas-steps (a seeded request takes the
same steps alone and batched) in S_conc steps, and cannot spend less than each canvas-step's share of the products
of a full batch (m_N / N) plus, per step, the time a step of one canvas spends outside its products (o_1 = t_1 -
m_1; a step of more canvases runs every operation of a step of one). So

    ratio <= S_seq * t_1 / (S_seq * m_N / N + S_conc * o_1)

    python scripts/engine_batch_steps.py [--model DIR] [--dtype float32|bfloat16] [--rows 8] [--steps 40]
                                         [--serving docs/.../serving.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dgemma
from dgemma.allocator import tune_allocator
from dgemma.cache import KVCache
from dgemma.engine import Engine, Group


MATRIX_PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}


def step_seconds(model, groups: int, capacity_rows: int, steps: int, prompt_length: int = 20) -> tuple[float, float]:
    """The median seconds of a step carrying `groups` canvases, and the fraction of a profiled step spent in matrix
    products."""
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
    with torch.profiler.profile() as profile:
        for _ in range(max(steps // 4, 5)):
            engine.step()
    events = profile.key_averages()
    products = sum(event.self_cpu_time_total for event in events if event.key in MATRIX_PRODUCTS)
    return statistics.median(times), products / sum(event.self_cpu_time_total for event in events)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serving", help="a `dgemma bench --serving` report: print the ratio's bound from its steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as `dgemma serve` runs: without it, fresh [rows, vocab] buffers are mapped page by page
    model = dgemma.load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    one, one_products = step_seconds(model, 1, args.rows, args.steps)
    many, many_products = step_seconds(model, args.rows, args.rows, args.steps)
    report = {"dtype": str(model.dtype).removeprefix("torch."), "threads": args.threads,
              "step_ms_1": round(1000 * one, 2), f"step_ms_{args.rows}": round(1000 * many, 2),
              "ratio": round(many / one, 2), "products_ms_1": round(1000 * one * one_products, 2),
              f"products_ms_{args.rows}": round(1000 * many * many_products, 2)}
    if args.serving:
        summary = json.loads(Path(args.serving).read_text())["summary"]
        sequential, concurrent = (summary[mode]["engine_steps"]["median"] for mode in ("sequential", "concurrent"))
        outside_products = one * (1 - one_products)
        bound = sequential * one / (sequential * many * many_products / args.rows + concurrent * outside_products)
        report.update(sequential_steps=sequential, concurrent_steps=concurrent, ratio_bound=round(bound, 2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
