"""Metrics of a set of continuations: the judge's generative perplexity and the repetition it can hide.

Definitions (docs/quality.md):
- Words are lowercased whitespace-separated runs. distinct-n of a continuation = distinct n-grams / n-grams;
  unigram entropy = entropy (bits) of its word frequencies. A set's value is the mean over its continuations
  (continuations with no n-gram are left out of distinct-n). Repetition lowers both: a loop of a few words
  has a low perplexity and a low distinct-n and entropy.
- Generative perplexity of a set = exp(sum of the judge's NLL over every continuation token of the set /
  number of those tokens): tokens pooled, so a long continuation weighs more than a short one, as in a
  corpus perplexity. The geometric mean of per-continuation perplexities is reported too.
- The 95 % interval resamples passages (a passage's seeds together) 1,000 times with a fixed seed.
- Letter words of a continuation = the share of its words holding at least one letter. Runs of quotes, stops and
  blank lines also buy a low perplexity (the judge reads whitespace collapsed, and `"."` after `"` is easy); held-out
  prose and the bundled model's AR samples are above 0.9, degenerate diffusion samples far below.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(tokens: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / n-grams of one sequence (None when it has no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def unigram_entropy(tokens: Sequence[str]) -> float | None:
    """Entropy in bits of the token frequencies of one sequence (None when it is empty)."""
    if not tokens:
        return None
    total = len(tokens)
    return -sum(c / total * math.log2(c / total) for c in Counter(tokens).values())


def letter_share(tokens: Sequence[str]) -> float | None:
    """The share of words holding at least one letter (None when there is no word)."""
    return sum(any(c.isalpha() for c in t) for t in tokens) / len(tokens) if tokens else None


def adjacent_repeats(tokens: Sequence[str]) -> float | None:
    """The share of adjacent word pairs that repeat a word ("the the", "KING. KING."): what sampling neighbouring
    positions in parallel writes and left-to-right decoding rarely does (None below two words)."""
    pairs = len(tokens) - 1
    return sum(a == b for a, b in zip(tokens, tokens[1:])) / pairs if pairs > 0 else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def text_metrics(texts: Sequence[str]) -> dict[str, float | None]:
    """Mean word count, letter words, adjacent repeats, unigram entropy and distinct-1/2/3 over a set of
    continuations."""
    split = [words(t) for t in texts]
    return {"mean_words": _mean([len(w) for w in split]), "letter_words": _mean([letter_share(w) for w in split]),
            "adjacent_repeats": _mean([adjacent_repeats(w) for w in split]),
            "unigram_entropy": _mean([unigram_entropy(w) for w in split]),
            **{f"distinct_{n}": _mean([distinct_n(w, n) for w in split]) for n in (1, 2, 3)}}


def perplexity(nll: Sequence[float], counts: Sequence[int]) -> float | None:
    """exp(total NLL / total tokens) (None without tokens)."""
    total = sum(counts)
    return math.exp(sum(nll) / total) if total else None


def perplexity_metrics(nll: Sequence[float], counts: Sequence[int], groups: Sequence[int],
                       draws: int = 1000, seed: int = 0) -> dict[str, object]:
    """Pooled gen-ppl, its 95 % bootstrap interval over `groups` (the passage of each continuation), and the
    geometric mean of per-continuation perplexities. `nll[i]` is the summed NLL of continuation i's
    `counts[i]` judge tokens."""
    nll, counts, groups = np.asarray(nll, dtype=np.float64), np.asarray(counts), np.asarray(groups)
    scored = counts > 0
    result: dict[str, object] = {"gen_ppl": perplexity(nll.tolist(), counts.tolist()),
                                 "judge_tokens": int(counts.sum()), "empty_continuations": int((~scored).sum()),
                                 "gen_ppl_geomean": (float(np.exp(np.mean(nll[scored] / counts[scored])))
                                                     if scored.any() else None)}
    labels = np.unique(groups)
    per_group_nll = np.array([nll[groups == g].sum() for g in labels])
    per_group_count = np.array([counts[groups == g].sum() for g in labels])
    picks = np.random.default_rng(seed).integers(0, len(labels), size=(draws, len(labels)))
    totals = per_group_count[picks].sum(axis=1)
    ok = totals > 0
    if ok.any():
        ppl = np.exp(per_group_nll[picks].sum(axis=1)[ok] / totals[ok])
        result["gen_ppl_ci95"] = [float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5))]
    else:
        result["gen_ppl_ci95"] = None
    return result
