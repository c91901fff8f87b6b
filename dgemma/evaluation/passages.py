"""Held-out passages to prompt with, and the word arithmetic of prompts and continuations.

Design choices:
- A passage is a run of whole lines of a held-out block of the corpus (`dgemma.recipes.corpus`: the same
  split rule the bundled model was trained with), long enough for a prompt and a continuation. Lines are
  kept as they are (line wraps, CRLF): that is the text the model was trained on.
- Words are whitespace-separated runs (`str.split`). The prompt is the text through the end of word
  `prompt_words`; the true continuation is what follows (starting with its whitespace) through the end of
  the next `continuation_words` words. Generated continuations are cut the same way.
- `heldout.jsonl` beside this file is `heldout_passages(load_corpus(CORPUS))` (12 passages of at least 160
  words per corpus file), so that the evaluation runs on a fresh machine without the corpus. Rebuild it with
  `python -m dgemma.evaluation.passages CORPUS_DIR dgemma/evaluation/heldout.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SHIPPED_PASSAGES = Path(__file__).with_name("heldout.jsonl")
PASSAGE_WORDS = 160  # shipped passages: room for e.g. 32-word prompts and 96-word continuations
PER_SOURCE = 12

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Passage:
    source: str  # the corpus file (or text file) it comes from
    text: str


def word_count(text: str) -> int:
    return len(text.split())


def complete_words(text: str) -> int:
    """Words of `text` known to be complete: followed by whitespace (the last one may still grow)."""
    return len(re.findall(r"\S+\s", text))


def cut_words(text: str, words: int) -> str:
    """`text` through the end of its `words`-th word (all of it when it has fewer)."""
    for i, match in enumerate(_WORD.finditer(text), 1):
        if i == words:
            return text[:match.end()]
    return text


def split_passage(text: str, prompt_words: int, continuation_words: int) -> tuple[str, str]:
    """(prompt, true continuation): the first `prompt_words` words, then the next `continuation_words` words
    with the whitespace before them. The passage must hold both."""
    if word_count(text) < prompt_words + continuation_words:
        raise ValueError(f"a passage of {word_count(text)} words is too short for {prompt_words} + "
                         f"{continuation_words}")
    prompt = cut_words(text, prompt_words)
    return prompt, cut_words(text[len(prompt):], continuation_words)


def passages_of(text: str, source: str, min_words: int) -> list[Passage]:
    """Consecutive, non-overlapping passages of whole lines of `text`, each of at least `min_words` words and
    starting at a non-blank line."""
    passages, lines = [], []
    for line in text.splitlines(keepends=True):
        if not lines and not line.strip():
            continue
        lines.append(line)
        if word_count("".join(lines)) >= min_words:
            passages.append(Passage(source, "".join(lines).rstrip()))
            lines = []
    return passages


def spread(items: Sequence, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def heldout_passages(texts: Mapping[str, str], per_source: int = PER_SOURCE,
                     min_words: int = PASSAGE_WORDS) -> list[Passage]:
    """`per_source` passages from the held-out blocks of each corpus file, spread evenly over them."""
    from ..recipes.corpus import split_documents

    passages = []
    for name, text in texts.items():
        _, heldout = split_documents({name: text})
        passages += spread([p for block in heldout for p in passages_of(block, name, min_words)], per_source)
    return passages


def load_passages(path: Path | None = None, corpus: Path | None = None, min_words: int = 0) -> list[Passage]:
    """Passages from a corpus directory (its held-out blocks), a JSONL file (one {"text", "source"} a line), a
    plain text file (cut into passages of whole lines), or, with neither, the shipped held-out passages.
    Passages shorter than `min_words` are left out."""
    if corpus is not None:
        from ..recipes.corpus import load_corpus

        passages = heldout_passages(load_corpus(Path(corpus)), min_words=max(min_words, PASSAGE_WORDS))
    else:
        path = Path(path) if path is not None else SHIPPED_PASSAGES
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            passages = [Passage(row.get("source", path.name), row["text"])
                        for row in map(json.loads, filter(str.strip, text.splitlines()))]
        else:
            passages = passages_of(text, path.name, min_words)
    return [p for p in passages if word_count(p.text) >= min_words]


def write_passages(passages: Sequence[Passage], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in passages), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the held-out passages of a corpus as JSONL")
    parser.add_argument("corpus_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    from ..recipes.corpus import load_corpus

    passages = heldout_passages(load_corpus(args.corpus_dir))
    write_passages(passages, args.out)
    print(f"{len(passages)} passages -> {args.out}")


if __name__ == "__main__":
    main()
