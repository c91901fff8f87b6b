"""Evaluation of generated text against an external judge: `dgemma eval quality` (quality.py).

Nothing here is imported by generation; the judge (judge.py) needs the `eval` extra (transformers and the
Gemma 3 270M package), imported only when a judge is loaded."""
