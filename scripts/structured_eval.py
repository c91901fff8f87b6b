"""Structured output, measured: over the test suite's JSON schemas, how many completions finish within the
token budget, whether every finished one is valid (it must be: 100 %), and tokens per forward with and without
the grammar on the same prompts; with the frontier sample (the default) and without it (ablation).

    python scripts/structured_eval.py --model dgemma/bundled --seeds 3 --out runs/structured.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jsonschema
import torch

import dgemma
from dgemma.constraints import grammar_from
from dgemma.tasks import generate_structured
from dgemma.tokenizer import Tokenizer

SCHEMAS = json.loads((Path(__file__).parents[1] / "tests" / "data" / "schemas.json").read_text())


def run(model, tokenizer, prompt: list[int], grammar: str | None, seed: int, budget: int, steps: int,
        force_frontier: bool) -> tuple[list[int], int]:
    generator = torch.Generator().manual_seed(seed)
    if grammar is None:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=budget, max_denoising_steps=steps,
                             generator=generator)
    else:
        out = generate_structured(model, tokenizer, prompt, grammar, generator=generator, max_new_tokens=budget,
                                  max_denoising_steps=steps, force_frontier=force_frontier)
    return out.sequences[0, len(prompt):].tolist(), int(out.decoder_forward_passes[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path(dgemma.__file__).parent / "bundled"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default="runs/structured.json")
    args = parser.parse_args()
    model, tokenizer = dgemma.load(args.model), Tokenizer.from_directory(args.model)
    eos = set(model.generation_config.eos_token_ids or model.config.eos_token_ids)
    prompt = tokenizer.encode("The answer, as JSON:\n")
    results = {}
    for mode in ("grammar", "grammar without frontier sample", "unconstrained"):
        finished = valid = tokens = forwards = 0
        for schema in SCHEMAS:
            grammar = None if mode == "unconstrained" else grammar_from(json_schema=schema)
            for seed in range(args.seeds):
                new, passes = run(model, tokenizer, prompt, grammar, seed, args.budget, args.steps,
                                  force_frontier=mode == "grammar")
                end = next((i for i, t in enumerate(new) if t in eos), None)
                tokens += len(new) if end is None else end + 1
                forwards += passes
                if end is None:
                    continue
                finished += 1
                try:
                    jsonschema.validate(json.loads(tokenizer.decode(new[:end])), schema)
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError):
                    pass
        runs = len(SCHEMAS) * args.seeds
        results[mode] = {"runs": runs, "finished": finished, "finish_rate": finished / runs,
                         "valid_of_finished": valid / finished if finished else None,
                         "tokens_per_forward": tokens / forwards}
        print(f"{mode:34s} finished {finished}/{runs} ({finished / runs:.0%}), valid of finished "
              f"{(valid / finished if finished else float('nan')):.0%}, {tokens / forwards:.2f} tokens/forward",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "budget": args.budget, "steps": args.steps,
                                          "schemas": len(SCHEMAS), "results": results}, indent=2))


if __name__ == "__main__":
    main()
