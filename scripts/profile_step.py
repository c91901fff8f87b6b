"""Where a denoising step's time goes: the decoder forward and each part of the fast sampler, timed separately
on a named random config. A tool for optimising, not a benchmark (use `dgemma bench` for claims).

    python scripts/profile_step.py --config small --vocab 262144 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics

import torch

import dgemma
from dgemma.allocator import tune_allocator
from dgemma.bench import NAMED_CONFIGS, call_times
from dgemma.cache import KVCache
from dgemma.sampling import draw_uniforms, fast_step
from dgemma.widening import linear as widened_linear, mix, widens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the CLI runs
    dtype = getattr(torch, args.dtype)
    text = dict(NAMED_CONFIGS[args.config], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if args.vocab:
        text["vocab_size"] = args.vocab
    config = dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": args.canvas,
                                           "text_config": text})
    model = dgemma.DiffusionGemma(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(dtype).eval()
    cache = KVCache(config, 1, dtype, capacity=args.prompt + args.canvas)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt))
    valid = torch.ones_like(prompt, dtype=torch.bool)
    with torch.no_grad():
        model.encode(prompt, cache.encoder_plan(model.rope, valid))
        cache.commit(valid)
        canvas = torch.randint(0, config.vocab_size, (1, args.canvas))
        plan = cache.decoder_plan(model.rope, 1, args.canvas)
        hidden = model.decode(canvas, plan)
        soft = torch.zeros_like(hidden)
        head, scale = model.head_matrix, model.decoder.embed_tokens.scale_as(dtype)
        rows = hidden.reshape(-1, config.hidden_size)
        weights = torch.nn.functional.linear(rows, head)  # stands in for the sampler's unnormalised weights
        chunk = max(1, (1 << 22) // config.vocab_size)  # the digest's chunk of logits
        one_exp = torch.compile(lambda x: torch.exp(x.float() * 0.5 - 40.0).sum(dim=-1), dynamic=False)

        def exp_pass() -> None:  # the least a pass that exponentiates every logit once costs: no stores, one sum
            for start in range(0, weights.shape[0], chunk):
                one_exp(weights[start:start + chunk])
        parts = {
            "decoder forward (with self-conditioning)": lambda: model.decode(canvas, plan, soft, exact=False),
            "fast sampler, total": lambda: fast_step(hidden, head, head, scale, 30.0, torch.tensor(0.6),
                                                    draw_uniforms(args.canvas, None)),
            # as the sampler multiplies: widened to float32 where this CPU has no native half-precision matmuls
            "  logits matmul": lambda: (widened_linear(rows, head) if widens(rows, head)
                                        else torch.nn.functional.linear(rows, head)),
            "  soft-embedding matmul": lambda: mix(weights, head) if widens(rows, head) else weights @ head,
            "  one compiled exp over every logit": exp_pass,
        }
        for name, fn in parts.items():
            print(f"{name:45s} {statistics.median(call_times(fn, args.repeat)) * 1000:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
