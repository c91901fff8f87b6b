"""Choose a checkpoint's sampling settings by measurement: a grid over denoising steps, entropy bound and
confidence threshold, scored on held-out prompts by tokens per forward (speed) and by how likely the model's own
encoder finds the generated text (quality; repetition is reported too, as likelihood alone rewards loops).

    python scripts/tune_generation.py --model runs/bundled/model --corpus data/corpus --out runs/tune.json

Prints a table and writes JSON; pick the row to put in generation_config.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dgemma
from dgemma.cache import KVCache
from dgemma.tokenizer import Tokenizer
from dgemma.recipes.corpus import split_documents


def held_out_prompts(tokenizer: Tokenizer, corpus: Path, count: int, length: int) -> list[list[int]]:
    files = sorted(corpus.glob("*.txt"))
    _, heldout = split_documents({f.name: f.read_text() for f in files})
    prompts = []
    for i, text in enumerate(heldout):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids) - length, len(ids) // 3 + 1):
            prompts.append([tokenizer.bos_token_id] + ids[start:start + length])
    step = max(1, len(prompts) // count)
    return prompts[::step][:count]


@torch.no_grad()
def encoder_nll(model, prompt: list[int], continuation: list[int]) -> float:
    """Mean next-token negative log-likelihood of `continuation` after `prompt` under the model's encoder."""
    ids = torch.tensor([prompt + continuation])
    cache = KVCache(model.config, 1, model.dtype)
    valid = torch.ones_like(ids, dtype=torch.bool)
    hidden = model.encode(ids, cache.plan(model.rope(torch.arange(ids.shape[1])[None]), valid, encoder=True))
    logits = model.logits(hidden[0, len(prompt) - 1:-1])
    return float(F.cross_entropy(logits, ids[0, len(prompt):]))


def distinct_bigrams(tokens: list[int]) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / max(1, len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", default="8,16,32")
    parser.add_argument("--bounds", default="0.1,0.5,2.0")
    parser.add_argument("--confidence", default="0.005,0.1,0.5")
    parser.add_argument("--temperatures", default="0.4:0.8", help="t_min:t_max pairs, comma-separated")
    parser.add_argument("--out", default="runs/tune.json")
    args = parser.parse_args()

    model, tokenizer = dgemma.load(args.model), Tokenizer.from_directory(args.model)
    prompts = held_out_prompts(tokenizer, Path(args.corpus), args.prompts, args.prompt_length)
    rows = []
    temperatures = [tuple(float(t) for t in pair.split(":")) for pair in args.temperatures.split(",")]
    grid = itertools.product([int(s) for s in args.steps.split(",")], [float(b) for b in args.bounds.split(",")],
                             [float(c) for c in args.confidence.split(",")], temperatures)
    for steps, bound, confidence, (t_min, t_max) in grid:
        started = time.perf_counter()
        nll, forwards, tokens, distinct = [], 0, 0, []
        for i, prompt in enumerate(prompts):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, max_denoising_steps=steps,
                                 entropy_bound=bound, confidence_threshold=confidence, t_min=t_min, t_max=t_max,
                                 eos_token_id=None,
                                 generator=torch.Generator().manual_seed(i))
            new = out.sequences[0, len(prompt):].tolist()
            nll.append(encoder_nll(model, prompt, new))
            distinct.append(distinct_bigrams(new))
            forwards += int(out.decoder_forward_passes[0])
            tokens += len(new)
        row = {"max_denoising_steps": steps, "entropy_bound": bound, "confidence_threshold": confidence,
               "t_min": t_min, "t_max": t_max,
               "tokens_per_forward": tokens / forwards, "encoder_nll": sum(nll) / len(nll),
               "distinct_bigrams": sum(distinct) / len(distinct), "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"steps {steps:3d} bound {bound:5.2f} conf {confidence:6.3f} t {t_min}-{t_max}: "
              f"{row['tokens_per_forward']:5.2f} tok/fwd, "
              f"NLL {row['encoder_nll']:.3f}, distinct bigrams {row['distinct_bigrams']:.3f}, "
              f"{row['seconds']:.1f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "prompts": len(prompts), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
