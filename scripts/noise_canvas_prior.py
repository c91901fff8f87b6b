"""What the decoder predicts on the first step of a canvas (pure noise, no self-conditioning) after different
prompts, against what the encoder predicts next: a diagnostic of how much the decoder's first, most decisive step
uses the prompt. Prints JSON: per prompt, the encoder's next-token top 5 and the decoder's top 5 at canvas
positions 0 and `--position`, averaged over `--canvases` noise canvases, and the mean KL between its distributions
on two different noise canvases (how much it reads the noise); and the mean KL between the decoder's canvas
distributions after each pair of prompts (how much it reads the prompt).

With `--guidance W,...`, the same for the decoder's states pushed away from what it predicts after BOS alone on the
same noise (classifier-free guidance on the prompt: h + w (h - h_bos), which the vocabulary head, being linear before
its soft-cap, turns into the same combination of logits), one report per weight (0: the decoder as it is).

    python scripts/noise_canvas_prior.py [--model DIR] [--position 8] [--canvases 8] [--guidance 0,1,2]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.checkpoints import bundled_model_dir
from dgemma.tokenizer import Tokenizer

PROMPTS = {
    "austen": "It is a truth universally acknowledged that a single man in possession of a good fortune, must be in "
              "want of a wife.",
    "bible": "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
             "darkness was upon the face of the deep.",
    "shakespeare": "HAMLET. To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer",
    "bos only": "",
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--position", type=int, default=8)
    parser.add_argument("--canvases", type=int, default=8)
    parser.add_argument("--guidance", default="0", help="comma-separated guidance weights (default 0: none)")
    args = parser.parse_args()
    model = dgemma.load(args.model)
    tokenizer = Tokenizer.from_directory(args.model or bundled_model_dir())
    length, vocab = model.config.canvas_length, model.config.vocab_size
    noise = torch.randint(0, vocab, (args.canvases, length), generator=torch.Generator().manual_seed(0))

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
        """mean over positions of KL(p || q), from log-probabilities"""
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    def top(probabilities: torch.Tensor) -> str:
        values, ids = probabilities.topk(5)
        return ", ".join(f"{tokenizer.decode([i])!r} {v:.3f}" for v, i in zip(values.tolist(), ids.tolist()))

    hidden, encoder_next = {}, {}
    for name, text in PROMPTS.items():
        ids = torch.tensor([[model.config.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])
        ids = ids.expand(args.canvases, -1)
        cache = KVCache(model.config, args.canvases, model.dtype, capacity=ids.shape[1] + length)
        valid = torch.ones_like(ids, dtype=torch.bool)
        encoded = model.encode(ids, cache.encoder_plan(model.rope, valid))
        cache.commit(valid)
        hidden[name] = model.decode(noise, cache.decoder_plan(model.rope, args.canvases, length), exact=False)
        encoder_next[name] = top(model.logits(encoded[:1, -1:]).float().softmax(-1)[0, 0])

    reports = {}
    for weight in (float(w) for w in args.guidance.split(",")):
        report, decoder = {}, {}
        for name, states in hidden.items():
            guided = states + weight * (states - hidden["bos only"])
            log_probs = model.logits(guided).float().log_softmax(-1)  # [N, L, V]
            decoder[name] = log_probs
            mean = log_probs.exp().mean(0)
            # How much the prediction depends on which noise the canvas holds (it should not: noise carries nothing).
            pairs = list(itertools.combinations(range(args.canvases), 2))
            between_noise = sum(kl(log_probs[i], log_probs[j]) for i, j in pairs) / len(pairs)
            report[name] = {"encoder_next": encoder_next[name], "decoder_position_0": top(mean[0]),
                            f"decoder_position_{args.position}": top(mean[args.position]),
                            "mean_kl_between_noise_canvases": round(between_noise, 3)}
        report["mean_kl_between_prompts"] = {
            f"{a} | {b}": round(kl(decoder[a], decoder[b]), 3)
            for a, b in itertools.combinations(PROMPTS, 2)}
        reports[f"guidance {weight:g}"] = report
    print(json.dumps(reports if len(reports) > 1 else reports["guidance 0"], indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
