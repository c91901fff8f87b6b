"""Held-out losses of a checkpoint under both training rules, on the corpus's held-out split, plus the
denoiser report (dgemma/evaluation/denoiser.py): one JSON object on stdout.

    python scripts/heldout_losses.py --model runs/bundled-stage2/model --corpus data/corpus [--batches 16]

- `one_canvas`: the recipe's rule (one canvas per window, k canvases uniform), the trainer's held-out figures
  for configs/bundled.toml; `all_canvases`: every canvas of the longest response (configs/bundled_distill.toml).
  Both on the same fixed held-out windows (seed 1 + 1, as the trainer's evaluation of seed-1 runs), so that
  checkpoints trained under either rule are compared on the same numbers.
- `denoiser`: the decoder against the encoder on the first true canvas after each of the shipped held-out
  prompts (no sampling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.training.trainer import TrainConfig, Trainer  # noqa: E402


def heldout(model: str, corpus: str, canvases: str, response: str, batches: int) -> dict:
    raw = {"model": {"checkpoint": model},
           "data": {"kind": "text", "corpus_dir": corpus, "window": 256, "min_prompt": 8,
                    "response_canvases": response},
           "train": {"out_dir": "/nonexistent", "steps": 1, "batch_size": 16, "micro_batch_size": 16,
                     "canvases": canvases, "eval_batches": batches, "seed": 1}}
    trainer = Trainer(TrainConfig.from_sections(raw))
    return trainer.evaluate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-denoiser", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"model": args.model,
              "one_canvas": heldout(args.model, args.corpus, "one", "random", args.batches),
              "all_canvases": heldout(args.model, args.corpus, "all", "most", args.batches)}
    if not args.no_denoiser:
        from dgemma import load
        from dgemma.evaluation.denoiser import denoiser_report
        from dgemma.evaluation.passages import load_passages, split_passage, spread
        from dgemma.tokenizer import Tokenizer
        model, tokenizer = load(args.model), Tokenizer.from_checkpoint(args.model)
        passages = spread(load_passages(None, min_words=84), 12)
        pairs = [split_passage(p.text, 24, 60) for p in passages]
        denoiser = denoiser_report(model, tokenizer, pairs)
        denoiser.pop("by_position")
        report["denoiser"] = denoiser
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
