"""How long this corpus's sentences and paragraphs are in tokens: the measurement behind the bundled model's
canvas length (configs/bundled.toml). Sentences end at . ! or ? before whitespace; paragraphs at blank lines (CRLF or LF);
20,000 of each are drawn at random (seed 0).

    python scripts/canvas_lengths.py data/corpus --tokenizer dgemma/bundled
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from pathlib import Path

from dgemma.tokenizer import Tokenizer
from dgemma.recipes.corpus import load_corpus


def token_lengths(tokenizer: Tokenizer, pieces: list[str], sample: int, rng: random.Random) -> dict[str, float]:
    chosen = rng.sample(pieces, min(sample, len(pieces)))
    lengths = sorted(len(tokenizer.encode(piece, add_special_tokens=False)) for piece in chosen)
    return {"count": len(pieces), "sampled": len(chosen), "median": statistics.median(lengths),
            "p90": lengths[int(0.9 * len(lengths))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus_dir", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=Path("dgemma/bundled"))
    parser.add_argument("--sample", type=int, default=20_000)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_directory(args.tokenizer)
    text = "\n\n".join(load_corpus(args.corpus_dir).values())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    paragraphs = [p.strip() for p in re.split(r"\r?\n[ \t]*\r?\n", text) if p.strip()]
    rng = random.Random(0)
    print(json.dumps({"sentences": token_lengths(tokenizer, sentences, args.sample, rng),
                      "paragraphs": token_lengths(tokenizer, paragraphs, args.sample, rng)}, indent=2))


if __name__ == "__main__":
    main()
