"""Sequence-level distillation data: the model's own autoregressive samples, for training its diffusion decoder.

    python -m dgemma.training.distill --model runs/bundled/model --corpus data/corpus --out data/distill.npz \
        --count 4096 [--prompt-tokens 32 --new-tokens 224 --temperature 0.7 --seed 0 --batch 64]

Every example is a prompt of real text from the corpus's *training* split (the held-out blocks are never read)
followed by what the model's encoder, an autoregressive LM, writes after it at a low temperature. A decoder
trained on such text learns a sharper, more self-consistent distribution than the corpus's (the known remedy for
non-autoregressive decoders: Kim & Rush 2016, Gu et al. 2018), which is easier to sample many tokens at a time.
Nothing but the model being trained and the public-domain corpus goes in: no outside model's output.

Design choices:
- The output is one `.npz`: `prompts` [N, P] and `responses` [N, R] (int32), and `meta` (JSON: the model's
  weights digest, the corpus fingerprint, the settings), so that a training config names a file whose making is
  recorded. Prompts all have the same length, so sampling batches them without padding.
- Prompts are drawn like the trainer's text windows: a random start in the training token stream, the first
  token replaced by BOS. Sample i's prompt and random stream depend only on (seed, i) (`example_generator`), so
  the batch size changes the file only through float rounding of the batched forwards.
- `DistilledExamples` is a training source: prompt + response as an Example whose encoder loss is off by default
  (the encoder keeps learning from real text only, so the autoregressive model is not trained on its own samples).
  `Mixture` mixes it with the text windows, the choice per example a pure function of (seed, step, index). With the
  text windows' `prompt_cut="any"`, each drawn sample is cut again at a random point, as a text window is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import Source, check_window_rules, corpus_fingerprint, cut_window, example_generator, tokenize_texts
from .objective import Example


@torch.no_grad()
def sample_continuations(model, prompts: torch.Tensor, new_tokens: int, temperature: float,
                         generators: list[torch.Generator]) -> torch.Tensor:
    """[N, new_tokens] tokens sampled by the encoder after prompts [N, P] (one generator per row; temperature 0 is
    greedy). Rows run to `new_tokens` whatever they write (an end-of-text token is kept as a token)."""
    from ..cache import KVCache
    rows = prompts.shape[0]
    cache = KVCache(model.config, rows, model.dtype, model.device, capacity=prompts.shape[1] + new_tokens)
    tokens = prompts.to(model.device)
    out = torch.empty(rows, new_tokens, dtype=torch.long)
    for i in range(new_tokens):
        valid = torch.ones_like(tokens, dtype=torch.bool)
        hidden = model.encode(tokens, cache.encoder_plan(model.rope, valid))
        cache.commit(valid)
        logits = model.logits(hidden[:, -1]).cpu()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
        out[:, i] = nxt
        tokens = nxt[:, None].to(model.device)
    return out


def training_stream(corpus_dir: Path, tokenizer_dir: Path) -> tuple[np.ndarray, str]:
    """The corpus's training split as the trainer tokenizes it (and its cache), and the cache's fingerprint."""
    from ..recipes.corpus import split_documents
    from ..tokenizer import Tokenizer
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{corpus_dir} holds no .txt files")
    train, _ = split_documents({f.name: f.read_bytes().decode("utf-8") for f in files})
    fingerprint = corpus_fingerprint(Path(tokenizer_dir), files)
    stream = tokenize_texts(Tokenizer.from_directory(tokenizer_dir), train,
                            Path(corpus_dir) / "tokens" / fingerprint / "train.npy")
    return stream, fingerprint


def draw_prompts(stream: np.ndarray, count: int, length: int, bos_id: int, seed: int, first: int = 0) -> torch.Tensor:
    rows = []
    for i in range(first, first + count):
        gen = example_generator(seed, 0, i, "distill-prompt")
        start = int(torch.randint(0, len(stream) - length, (), generator=gen))
        tokens = stream[start:start + length].tolist()
        rows.append([bos_id] + tokens[1:])
    return torch.tensor(rows)


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(model_dir: str, corpus_dir: str, out: str, count: int, prompt_tokens: int = 32, new_tokens: int = 224,
          temperature: float = 0.7, seed: int = 0, batch: int = 64, log=print) -> Path:
    from .. import load
    from ..checkpoints import resolve_checkpoint
    from ..tokenizer import Tokenizer
    directory = resolve_checkpoint(model_dir)
    model = load(directory, dtype=torch.float32)
    tokenizer = Tokenizer.from_checkpoint(directory)
    stream, fingerprint = training_stream(Path(corpus_dir), directory)
    prompts, responses = [], []
    started = time.perf_counter()
    for first in range(0, count, batch):
        n = min(batch, count - first)
        rows = draw_prompts(stream, n, prompt_tokens, tokenizer.bos_token_id, seed, first)
        generators = [example_generator(seed, 1, first + i, "distill-sample") for i in range(n)]
        responses.append(sample_continuations(model, rows, new_tokens, temperature, generators))
        prompts.append(rows)
        done = first + n
        rate = done * new_tokens / (time.perf_counter() - started)
        log(f"[distill] {done}/{count} samples, {rate:,.0f} tokens/s, ETA {(count - done) * new_tokens / rate / 60:.1f} min")
    meta = {"model": str(model_dir), "weights_sha256_16": weights_digest(directory), "corpus": str(corpus_dir),
            "corpus_fingerprint": fingerprint, "split": "train", "count": count, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "temperature": temperature, "seed": seed}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.npz")
    np.savez(partial, prompts=torch.cat(prompts).numpy().astype(np.int32),
             responses=torch.cat(responses).numpy().astype(np.int32), meta=np.array(json.dumps(meta)))
    partial.replace(path)
    return path


@dataclass
class DistilledExamples:
    """Prompt + sampled response pairs of a distillation file, drawn uniformly per (seed, step, index)."""

    prompts: np.ndarray
    responses: np.ndarray
    encoder_loss: bool = False  # also train the encoder's next-token loss on them (off: real text only)
    # With prompt_cut="any", prompt + response is re-cut like a text window (data.cut_window); "aligned" keeps the
    # file's own split.
    canvas_length: int = 0
    min_prompt: int = 8
    response_canvases: str = "most"
    prompt_cut: str = "aligned"

    def __post_init__(self):
        if self.prompt_cut == "any":
            check_window_rules(self.prompts.shape[1] + self.responses.shape[1], self.canvas_length, self.min_prompt,
                               self.response_canvases, self.prompt_cut)

    @classmethod
    def from_file(cls, path: str | Path, encoder_loss: bool = False, canvas_length: int = 0, min_prompt: int = 8,
                  response_canvases: str = "most", prompt_cut: str = "aligned") -> "DistilledExamples":
        with np.load(path) as data:
            return cls(data["prompts"], data["responses"], encoder_loss, canvas_length, min_prompt, response_canvases,
                       prompt_cut)

    def example(self, index: int, gen: torch.Generator) -> Example:
        prompt, response = self.prompts[index].tolist(), self.responses[index].tolist()
        if self.prompt_cut == "any":
            tokens = prompt + response
            cut, k = cut_window(len(tokens), self.canvas_length, self.min_prompt, self.response_canvases,
                                self.prompt_cut, gen)
            prompt, response = tokens[:cut], tokens[cut:cut + k * self.canvas_length]
        return Example(prompt=prompt, response=response, encoder_loss_on_prompt=True, encoder_loss=self.encoder_loss)

    def examples(self, seed: int, step: int, count: int) -> list[Example]:
        out = []
        for i in range(count):
            gen = example_generator(seed, step, i, "distill")
            out.append(self.example(int(torch.randint(0, len(self.prompts), (), generator=gen)), gen))
        return out


@dataclass
class Mixture:
    """Each example from `other` with probability `fraction`, else from `base` (a coin per (seed, step, index))."""

    base: Source
    other: Source
    fraction: float

    def examples(self, seed: int, step: int, count: int) -> list[Example]:
        coins = [bool(torch.rand((), generator=example_generator(seed, step, i, "mix")) < self.fraction)
                 for i in range(count)]
        base = self.base.examples(seed, step, count)
        other = self.other.examples(seed, step, count)
        return [o if coin else b for coin, b, o in zip(coins, base, other)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgemma.training.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint whose encoder writes the samples")
    parser.add_argument("--corpus", required=True, help="corpus directory (prompts from its training split)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=224)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = build(args.model, args.corpus, args.out, args.count, args.prompt_tokens, args.new_tokens, args.temperature,
                 args.seed, args.batch, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
