"""A token's layers in one C++ object (`dgemma.token_layer`) against the Python forward, alternated token by token in
one process, so that the machine's drift falls on both alike. Writes JSON and a plot and prints a table.

    python scripts/token_layer_speed.py MODEL [MODEL ...] [--tokens 150] [--prompt-length 256] [--dtype bfloat16]
        [--out FILE.json]

Each MODEL (a checkpoint directory or a GGUF file: e.g. the breakdown's cached slices of the released model,
/tmp/dgemma-breakdown-release-256-2l*, or dgemma/bundled) is loaded in --dtype for autoregressive decoding, a random
prompt is encoded into two caches, and then each token is encoded once on each cache, one with the object and one
with the forward in Python (which goes first alternates): the encoder pass alone (its layers, the token's plan,
embedding and final norm; no head), median milliseconds over the tokens after the first ten.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dgemma
import dgemma.model
from dgemma import token_layer
from dgemma.cache import KVCache


def alternated(path: str, tokens: int, prompt_length: int, dtype: torch.dtype) -> dict:
    with torch.no_grad():
        model = dgemma.load(path, dtype=dtype, decode="autoregressive")
        config = model.config
        prompt = torch.randint(3, config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(0))
        valid = torch.ones_like(prompt, dtype=torch.bool)
        caches = {}
        for way in ("object", "python"):
            caches[way] = KVCache(config, 1, model.dtype, model.device, capacity=prompt_length + tokens + 16)
            model.encode(prompt, caches[way].encoder_plan(model.rope, valid), exact=False)
            caches[way].commit(valid)
        one = torch.ones(1, 1, dtype=torch.bool)
        ways = {"object": token_layer.for_token, "python": lambda block, x: None}
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        x = torch.zeros(1, 1, config.hidden_size, dtype=model.dtype)
        in_object = sum(token_layer.for_token(block, x) is not None for block in model.encoder.layers)
        for index in range(tokens + 10):
            token = torch.randint(3, config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(index))
            for way in (("object", "python") if index % 2 else ("python", "object")):
                dgemma.model.token_layer_for = ways[way]
                begin = time.perf_counter()
                model.encode(token, caches[way].encoder_plan(model.rope, one), exact=False)
                caches[way].commit(one)
                seconds[way].append(time.perf_counter() - begin)
            if index % 50 == 49:
                print(f"  {Path(path).name}: {index + 1} of {tokens + 10} tokens", file=sys.stderr)
        dgemma.model.token_layer_for = token_layer.for_token
    medians = {way: statistics.median(times[10:]) for way, times in seconds.items()}
    return {"model": path, "dtype": str(dtype).removeprefix("torch."), "layers": len(config.layers),
            "layers_in_object": in_object,
            "object_ms": 1e3 * medians["object"], "python_ms": 1e3 * medians["python"],
            "saved_ms_per_layer": 1e3 * (medians["python"] - medians["object"]) / len(config.layers),
            "speedup": medians["python"] / medians["object"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [Path(r["model"]).name for r in results]
    positions = range(len(results))
    ax.bar([p - 0.2 for p in positions], [r["python_ms"] for r in results], 0.4, label="Python forward")
    ax.bar([p + 0.2 for p in positions], [r["object_ms"] for r in results], 0.4, label="one C++ object a layer")
    ax.set_xticks(list(positions), names, rotation=15, fontsize=7)
    ax.set_ylabel("ms per token's encoder pass (median)")
    ax.set_title("A token's layers: Python forward against one C++ object, alternated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("token_layer_speed.json"))
    args = parser.parse_args()
    if not token_layer.available():
        print("error: the token layer's object is not available here (no AVX2, compiling off, or no C++ compiler)",
              file=sys.stderr)
        return 2
    results = [alternated(path, args.tokens, args.prompt_length, getattr(torch, args.dtype)) for path in args.models]
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "tokens": args.tokens, "prompt_length": args.prompt_length, "results": results}
    args.out.write_text(json.dumps(report, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print("| model | layers in the object | object ms | Python ms | saved ms a layer | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {Path(r['model']).name} | {r['layers_in_object']} of {r['layers']} | {r['object_ms']:.2f} | "
              f"{r['python_ms']:.2f} | {r['saved_ms_per_layer']:.2f} | {r['speedup']:.2f}x |")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
