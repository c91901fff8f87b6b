"""`dgemma generate` on an idle machine and beside a busy process, under several thread settings.

Each measurement is a fresh `dgemma generate --stats` process (the settings are environment variables that OpenMP
reads when torch starts). The busy neighbour is one CPU-bound process that never sleeps (a pure Python loop, or a
second `dgemma generate` in a loop with --neighbour generate). Runs alternate settings so that drift hits all
alike. Writes JSON, a table and a bar chart.

    python scripts/threads_under_load.py --out bench/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    # name: (environment, dgemma generate arguments); "DGEMMA_THREAD_POLICY=off" leaves OpenMP as torch has it
    "2 threads, OpenMP defaults (spin 300k)": ({"DGEMMA_THREAD_POLICY": "off"}, ["--threads", "2"]),
    "2 threads, spin 100k": ({"DGEMMA_THREAD_POLICY": "off", "GOMP_SPINCOUNT": "100000"}, ["--threads", "2"]),
    "2 threads, spin 30k": ({"DGEMMA_THREAD_POLICY": "off", "GOMP_SPINCOUNT": "30000"}, ["--threads", "2"]),
    "2 threads, spin 10k": ({"DGEMMA_THREAD_POLICY": "off", "GOMP_SPINCOUNT": "10000"}, ["--threads", "2"]),
    "2 threads, spin 1k": ({"DGEMMA_THREAD_POLICY": "off", "GOMP_SPINCOUNT": "1000"}, ["--threads", "2"]),
    "2 threads, passive (no spin)": ({"DGEMMA_THREAD_POLICY": "off", "OMP_WAIT_POLICY": "PASSIVE"},
                                     ["--threads", "2"]),
    "1 thread": ({"DGEMMA_THREAD_POLICY": "off"}, ["--threads", "1"]),
    "dgemma's defaults": ({}, []),
}


def generate_once(env: dict[str, str], extra: list[str], args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "dgemma", "generate", args.prompt, "--seed", "0", "--max-new-tokens",
               str(args.max_new_tokens), "--stats", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    stats["wall_seconds"] = time.perf_counter() - started
    return stats


def start_neighbour(kind: str) -> subprocess.Popen:
    if kind == "spin":
        code = "while True:\n    pass\n"
    else:  # a second generate, over and over
        code = ("import subprocess, sys\nwhile True:\n    subprocess.run([sys.executable, '-m', 'dgemma', 'generate', "
                "'It was the best of times', '--max-new-tokens', '96', '--seed', '1'], capture_output=True)\n")
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--neighbour", choices=("spin", "generate"), default="spin")
    parser.add_argument("--out", default="bench/threads.json")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {name: {"idle": [], "busy": []} for name in SETTINGS}
    total, done, started = 2 * args.repeat * len(SETTINGS), 0, time.perf_counter()
    for load in ("idle", "busy"):
        neighbour = start_neighbour(args.neighbour) if load == "busy" else None
        try:
            time.sleep(1.0 if neighbour else 0.0)
            for _ in range(args.repeat):
                for name, (env, extra) in SETTINGS.items():
                    stats = generate_once(env, extra, args)
                    results[name][load].append(stats["tokens_per_second"])
                    done += 1
                    eta = (time.perf_counter() - started) / done * (total - done)
                    print(f"[threads] {load:4s} {name:42s} {stats['tokens_per_second']:8.2f} tok/s "
                          f"(ETA {eta:.0f} s)", file=sys.stderr, flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    summary = {name: {load: statistics.median(values) for load, values in loads.items()}
               for name, loads in results.items()}
    report = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "repeat": args.repeat,
              "neighbour": args.neighbour, "cpus": os.cpu_count(), "summary": summary, "runs": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'setting':42s} {'idle tok/s':>11s} {'busy tok/s':>11s} {'busy/idle':>10s}")
    for name, value in summary.items():
        print(f"{name:42s} {value['idle']:11.2f} {value['busy']:11.2f} {value['busy'] / value['idle']:10.2f}")
    chart(report, out.with_suffix(".png"))


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    idle = [report["summary"][n]["idle"] for n in names]
    busy = [report["summary"][n]["busy"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    positions = range(len(names))
    ax.barh([p + 0.2 for p in positions], idle, height=0.4, label="idle machine", color="#7ab")
    ax.barh([p - 0.2 for p in positions], busy, height=0.4, label=f"beside one busy process ({report['neighbour']})",
            color="#c75")
    ax.set_yticks(list(positions), names)
    ax.set_xlabel("dgemma generate, tokens / second (median)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
