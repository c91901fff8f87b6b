"""`dgemma bench --serving`: what concurrent clients of `dgemma serve` get, against the same requests one by one.

Design choices:
- The server runs as a real `dgemma serve` process and is measured from outside over HTTP, as its clients see it.
- Both modes send the very same requests (prompts, seeds, budgets), so they do the same work: a seeded request
  gives the same tokens alone and batched. Sequential and concurrent runs alternate, so that drifting machine
  load hits both alike; results are medians with min/max.
- Reported: aggregate completion tokens per second, the server's steps per run (from /health: a step is a
  denoising step, or a token, of every running request at once), and per-request latency.
- `--decode autoregressive` sends the same requests decoded token by token (at temperature 1, the API's default
  for that decoding).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .bench import machine, write_report

PROMPTS = ["It is a truth universally acknowledged", "In the beginning", "Once upon a time there lived",
           "The king said unto them", "She walked along the river and", "My dear sister, I write to tell you",
           "And the evening and the morning were", "When the play was over, the actors"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "dgemma", "serve", "--port", str(port), "--threads", str(args.threads),
               "--device", args.device, "--max-sequences", str(args.clients),
               "--max-tokens", str(args.max_new_tokens)]
    command += ["--model", args.model] if args.model else []
    command += ["--dtype", args.dtype] if args.dtype else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def one_request(client, index: int, budget: int, decode: str) -> dict:
    started = time.perf_counter()
    response = await client.post("/v1/completions", json={"prompt": PROMPTS[index % len(PROMPTS)],
                                                           "max_tokens": budget, "seed": index, "decode": decode})
    response.raise_for_status()
    usage = response.json()["usage"]
    return {"tokens": usage["completion_tokens"], "seconds": time.perf_counter() - started}


async def run_mode(url: str, clients: int, budget: int, concurrent: bool, decode: str = "diffusion") -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        steps_before = (await client.get("/health")).json()["steps"]
        started = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*[one_request(client, i, budget, decode) for i in range(clients)])
        else:
            results = [await one_request(client, i, budget, decode) for i in range(clients)]
        seconds = time.perf_counter() - started
        steps = (await client.get("/health")).json()["steps"] - steps_before
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "engine_steps": steps,
            "latency_seconds": [r["seconds"] for r in results]}


def wait_for(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dgemma serve exited: {process.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("dgemma serve did not start in time")


def main_run(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"[bench] serving: {args.clients} completion requests of {args.max_new_tokens} tokens, sent one after "
          f"another and all at once, {args.repeat} times each, alternating; server: dgemma serve "
          f"(model {args.model or 'bundled'}, {args.threads} threads, {args.device})", file=sys.stderr, flush=True)
    process = start_server(args, port)
    runs: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
    try:
        wait_for(url, process)
        asyncio.run(run_mode(url, 1, args.max_new_tokens, concurrent=False, decode=args.decode))  # warm-up
        started = time.perf_counter()
        total = 2 * args.repeat
        for repetition in range(args.repeat):
            for mode in ("sequential", "concurrent"):
                run = asyncio.run(run_mode(url, args.clients, args.max_new_tokens, concurrent=mode == "concurrent",
                                           decode=args.decode))
                runs[mode].append(run)
                done = sum(len(r) for r in runs.values())
                eta = (time.perf_counter() - started) / done * (total - done)
                print(f"[bench] rep {repetition + 1}/{args.repeat} {mode:10s} {run['tokens_per_second']:8.2f} tok/s "
                      f"({run['tokens']} tokens, {run['seconds']:.2f} s, {run['engine_steps']} engine steps; "
                      f"ETA {eta:.0f} s)", file=sys.stderr, flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    summary = {mode: summarise(results) for mode, results in runs.items()}
    report = {"mode": "serving", "model": args.model or "bundled", "decode": args.decode, "clients": args.clients,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "device": args.device,
              "repeat": args.repeat, "summary": summary,
              "ratio": summary["concurrent"]["tokens_per_second"]["median"]
              / summary["sequential"]["tokens_per_second"]["median"],
              "runs": runs, "machine": machine()}
    return write_report(report, Path(args.out), chart, table)


def summarise(runs: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {"tokens_per_second": stat([r["tokens_per_second"] for r in runs]),
            "engine_steps": stat([r["engine_steps"] for r in runs]),
            "tokens": stat([r["tokens"] for r in runs]),
            "latency_seconds": stat([statistics.median(r["latency_seconds"]) for r in runs])}


def table(report: dict) -> str:
    lines = [f"serving, {report['model']} ({report['decode']}): {report['clients']} requests x "
             f"{report['max_new_tokens']} tokens, "
             f"{report['threads']} threads, {report['repeat']} runs each (medians [min-max])",
             f"{'mode':11s} {'tok/s':>20s} {'engine steps':>13s} {'median latency s':>17s}"]
    for mode, s in report["summary"].items():
        t = s["tokens_per_second"]
        lines.append(f"{mode:11s} {t['median']:8.2f} [{t['min']:.1f}-{t['max']:.1f}] "
                     f"{s['engine_steps']['median']:13.0f} {s['latency_seconds']['median']:17.2f}")
    lines.append(f"concurrent / sequential: {report['ratio']:.2f}x")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "tokens_per_second", "aggregate tokens / second"),
                           (axes[1], "engine_steps", "server steps")):
        stats = [report["summary"][m][key] for m in modes]
        medians = [s["median"] for s in stats]
        errors = [[m - s["min"] for m, s in zip(medians, stats)], [s["max"] - m for m, s in zip(medians, stats)]]
        ax.bar(modes, medians, yerr=errors, color=["#999", "#2b7"])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report['clients']} clients x {report['max_new_tokens']} tokens, {report['model']} "
                 f"({report['decode']}): "
                 f"{report['ratio']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
