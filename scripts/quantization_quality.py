"""What quantising a trained model's weights costs: each scheme of `dgemma quantize` applied to a float checkpoint
(fp32 compute, so that only the weights differ), against the checkpoint itself.

    python scripts/quantization_quality.py [--model dgemma/bundled] [--out docs/quantization.json]

Per scheme, over the shipped held-out passages (24-word prompts, as `dgemma eval quality`):
- KL(float || quantised) of the decoder's next-canvas distributions, mean over positions, and how often the two
  argmaxes agree: at the first denoising step (a canvas of uniform noise) and mid-way (the true next canvas with
  half its tokens replaced by noise), the same noise for every scheme;
- tokens per forward with the checkpoint's own settings (adaptive stopping), two canvases per prompt, two seeds;
- the weights' bytes against the float weights'.
Two more rows hold the float weights in bf16, computed through the reference's kernels (and its sampler for tokens per
forward) and through the fast path's: what bf16 itself costs, and what the fast path's CPU kernels add to it.
The judge's gen-ppl of each scheme's samples is `dgemma eval quality --weights SCHEME` (docs/quantization.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dgemma  # noqa: E402
from dgemma.cache import KVCache  # noqa: E402
from dgemma.checkpoints import resolve_checkpoint  # noqa: E402
from dgemma.evaluation.passages import load_passages, split_passage, spread  # noqa: E402
from dgemma.quantized import SCHEMES, quantized_weights  # noqa: E402
from dgemma.tokenizer import Tokenizer  # noqa: E402


@torch.no_grad()
def canvas_log_probs(model, prompt: list[int], canvas: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """log-softmax of the decoder's logits [L, V] for `canvas` after `prompt` (first pass: no self-conditioning), in
    fp32, through the reference's kernels or (exact=False) the fast path's."""
    ids = torch.tensor([prompt])
    cache = KVCache(model.config, 1, model.dtype, model.device, capacity=len(prompt) + canvas.numel())
    valid = torch.ones_like(ids, dtype=torch.bool)
    model.encode(ids, cache.encoder_plan(model.rope, valid), exact=exact)
    cache.commit(valid)
    plan = cache.decoder_plan(model.rope, 1, canvas.numel())
    return model.logits(model.decode(canvas[None], plan, exact=exact), exact=exact)[0].float().log_softmax(-1)


def weight_bytes(model) -> int:
    floats = sum(p.numel() * p.element_size() for p in model.parameters())
    return floats + sum(w.nbytes() for _, w in quantized_weights(model))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a float checkpoint (default: the bundled model)")
    parser.add_argument("--passages", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/quantization.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = resolve_checkpoint(args.model)
    tokenizer = Tokenizer.from_checkpoint(directory)
    pairs = [split_passage(p.text, 24, 60) for p in spread(load_passages(None, min_words=84), args.passages)]
    prompts = [tokenizer.encode(prompt) for prompt, _ in pairs]
    reference = dgemma.load(directory, dtype=torch.float32)
    length, vocab = reference.config.canvas_length, reference.config.vocab_size
    noise = torch.Generator().manual_seed(0)
    canvases = []  # (prompt, first-step canvas, half-noised true canvas)
    for prompt, (_, continuation) in zip(prompts, pairs):
        truth = torch.tensor(tokenizer.encode(continuation, add_special_tokens=False)[:length])
        truth = torch.cat([truth, torch.full((length - truth.numel(),), reference.config.eos_token_ids[0])])
        uniform = torch.randint(0, vocab, (length,), generator=noise)
        half = torch.where(torch.rand(length, generator=noise) < 0.5, torch.randint(0, vocab, (length,),
                                                                                   generator=noise), truth)
        canvases.append((prompt, uniform, half))
    expected = [(canvas_log_probs(reference, p, u), canvas_log_probs(reference, p, h)) for p, u, h in canvases]

    def tokens_per_forward(model, sampling: str = "fast") -> float:
        tokens = forwards = 0
        for seed in range(args.seeds):
            for prompt in prompts:
                out = model.generate(torch.tensor([prompt]), max_new_tokens=2 * length, sampling=sampling,
                                     generator=torch.Generator().manual_seed(seed))
                tokens += 2 * length
                forwards += int(out.decoder_forward_passes[0])
        return tokens / forwards

    rows = [{"scheme": "float (fp32)", "weight_bytes": weight_bytes(reference),
             "tokens_per_forward": tokens_per_forward(reference)}]
    # Each scheme in fp32 through the reference's kernels; then bf16 weights and compute (no quantisation) through
    # the reference's kernels and through the fast path's (its attention on a CPU: `attend_with_matmuls`).
    variants = [(scheme, torch.float32, scheme, True) for scheme in SCHEMES]
    variants += [("bf16, reference path", torch.bfloat16, None, True), ("bf16, fast path", torch.bfloat16, None, False)]
    for name, dtype, scheme, exact in variants:
        model = dgemma.load(directory, dtype=dtype, quantize=scheme)
        row = {"scheme": name, "weight_bytes": weight_bytes(model),
               "types": sorted({w.qtype for _, w in quantized_weights(model)})}
        for step, index in (("first step", 0), ("half noised", 1)):
            kl, agree, count = 0.0, 0, 0
            for (prompt, uniform, half), truth in zip(canvases, expected):
                ours = canvas_log_probs(model, prompt, (uniform, half)[index], exact)
                ref = truth[index]
                kl += float((ref.exp() * (ref - ours)).sum())
                agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
                count += length
            row[f"kl {step}"] = kl / count
            row[f"argmax agreement {step}"] = agree / count
        row["tokens_per_forward"] = tokens_per_forward(model, "reference" if dtype != torch.float32 and exact
                                                      else "fast")
        rows.append(row)
        print(f"[quantization] {name}: done", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(directory), "passages": len(prompts), "seeds": args.seeds,
                               "rows": rows}, indent=1))
    print("| scheme | weights MB | KL first step | argmax agree | KL half noised | argmax agree | tokens/forward |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [(f"{r[k]:.2e}" if k.startswith("kl") else f"{r[k]:.3f}") if k in r else "-"
                 for k in ("kl first step", "argmax agreement first step", "kl half noised",
                           "argmax agreement half noised")]
        print(f"| {r['scheme']} | {r['weight_bytes'] / 1e6:.1f} | " + " | ".join(cells)
              + f" | {r['tokens_per_forward']:.2f} |")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
