"""Where diffusion quality is lost: the decoder (denoiser) against the encoder on the true continuations of
held-out prompts, no sampling involved.

    python -m dgemma.evaluation.denoiser [--model DIR] [--passages 12]

For the first canvas after each prompt it reports, in nats per token:
- `encoder`: the encoder's next-token NLL of the true tokens (teacher forcing), by canvas position;
- `decoder_left_to_right`: the decoder's NLL of the true token at position i when positions < i hold the true
  tokens and positions >= i uniform noise: the encoder's information plus noise, so a denoiser as good as the
  encoder scores at most the encoder's NLL;
- `corrupted_at_t` / `clean_at_t`: the training corruption (each position replaced by a uniform random token
  with probability t), NLL on the replaced and on the kept positions. The training loss averages both, so a
  low diffusion loss can hide a weak prediction of the replaced tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from ..cache import KVCache
from .passages import load_passages, split_passage, spread

NOISE_RATES = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _mean(values: list[torch.Tensor]) -> float | None:
    joined = torch.cat([v.reshape(-1) for v in values]) if values else torch.empty(0)
    return float(joined.mean()) if joined.numel() else None


@torch.no_grad()
def denoiser_report(model, tokenizer, prompts: list[tuple[str, str]], draws: int = 4, seed: int = 0) -> dict:
    """The NLLs above over (prompt, true continuation) pairs whose continuation fills at least one canvas."""
    length, vocab = model.config.canvas_length, model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)

    def noise() -> torch.Tensor:
        return torch.randint(0, vocab, (length,), generator=generator).to(model.device)

    encoder, left_to_right, used = [], [], 0
    corrupted: dict[float, list] = {t: [] for t in NOISE_RATES}
    clean: dict[float, list] = {t: [] for t in NOISE_RATES}
    for prompt, continuation in prompts:
        prompt_ids = tokenizer.encode(prompt)
        target = tokenizer.encode(continuation, add_special_tokens=False)[:length]
        if len(target) < length:
            continue
        used += 1
        y = torch.tensor(target, device=model.device)
        ids = torch.tensor([prompt_ids + target], device=model.device)
        cache = KVCache(model.config, 1, model.dtype, model.device)
        valid = torch.ones_like(ids, dtype=torch.bool)
        hidden = model.encode(ids, cache.encoder_plan(model.rope, valid))
        encoder.append(F.cross_entropy(model.logits(hidden[0, len(prompt_ids) - 1:-1]), y, reduction="none"))

        cache = KVCache(model.config, 1, model.dtype, model.device)
        valid = valid[:, :len(prompt_ids)]
        model.encode(ids[:, :len(prompt_ids)], cache.encoder_plan(model.rope, valid))
        cache.commit(valid)
        plan = cache.decoder_plan(model.rope, 1, length)

        def decoder_nll(canvas: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model.logits(model.decode(canvas[None], plan))[0], y, reduction="none")

        row = []
        for i in range(length):
            canvas = noise()
            canvas[:i] = y[:i]
            row.append(decoder_nll(canvas)[i])
        left_to_right.append(torch.stack(row))
        for t in NOISE_RATES:
            for _ in range(draws):
                replaced = torch.rand(length, generator=generator).to(model.device) < t
                nll = decoder_nll(torch.where(replaced, noise(), y))
                corrupted[t].append(nll[replaced])
                clean[t].append(nll[~replaced])
    if not used:
        raise ValueError(f"no continuation fills a canvas of {length} tokens")
    encoder_rows, decoder_rows = torch.stack(encoder), torch.stack(left_to_right)
    width = max(1, length // 4)
    return {
        "prompts": used, "canvas_length": length,
        "encoder": float(encoder_rows.mean()), "decoder_left_to_right": float(decoder_rows.mean()),
        "by_position": [{"positions": [a, min(a + width, length) - 1],
                         "encoder": float(encoder_rows[:, a:a + width].mean()),
                         "decoder_left_to_right": float(decoder_rows[:, a:a + width].mean())}
                        for a in range(0, length, width)],
        "corrupted_at_t": {str(t): _mean(v) for t, v in corrupted.items()},
        "clean_at_t": {str(t): _mean(v) for t, v in clean.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from .. import load
    from ..checkpoints import resolve_checkpoint
    from ..tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m dgemma.evaluation.denoiser", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--text", help="passages file (default: the shipped held-out passages)")
    parser.add_argument("--passages", type=int, default=12)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--continuation-words", type=int, default=60)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = resolve_checkpoint(args.model)
    model, tokenizer = load(directory), Tokenizer.from_checkpoint(directory)
    needed = args.prompt_words + args.continuation_words
    passages = spread(load_passages(args.text, min_words=needed), args.passages)
    pairs = [split_passage(p.text, args.prompt_words, args.continuation_words) for p in passages]
    print(json.dumps(denoiser_report(model, tokenizer, pairs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
