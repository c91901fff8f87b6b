"""Training data: plain-text windows and chat (SFT) examples, and the per-example noise of the objective.

Design choices:
- A global batch is a pure function of (seed, step): examples are drawn with a generator seeded from them, and so
  is each example's noise (canvas choice, t, corruption, self-conditioning coin). Gradient accumulation, any
  number of processes and resuming after a crash therefore see exactly the same batches.
- Plain text is tokenized once into a flat token stream (cached as .npy next to the corpus). A window of
  `window` tokens is cut into a prompt (BOS plus what comes before the cut) and a response of k whole canvases (no
  EOS: the text goes on). k is uniform over what fits (`response_canvases="random"`, the recipe's), or always the
  most that fit (`"most"`: with every canvas trained, the longest response gives the decoder the most targets per
  encoder pass). The cut is canvas-aligned from the window's end (`prompt_cut="aligned"`: a prompt is then
  window - k * canvas_length long, 32 to 224 tokens for windows of 256 and canvases of 32), or at any point from
  `min_prompt` on (`"any"`: the decoder also meets short prompts, as generation does after a short one, and
  canvases at every offset; the response ends where its last whole canvas does).
- Chat data is JSONL of {"messages": [...]}; the prompt is the conversation up to the last assistant turn
  rendered with the model's template, the response is what the template adds for that turn (its end-of-turn
  marker included) plus EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .objective import Batch, Example, Noise, collate, draw_noise


def example_generator(seed: int, step: int, index: int, purpose: str) -> torch.Generator:
    """An independent, reproducible random stream per (seed, step, example, purpose)."""
    digest = hashlib.sha256(f"{seed}/{step}/{index}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Source(Protocol):
    def examples(self, seed: int, step: int, count: int) -> list[Example]: ...


# ---- plain text ---------------------------------------------------------------------------------------------

def tokenize_texts(tokenizer: Tokenizer, texts: list[str], cache: Path | None = None) -> np.ndarray:
    """All texts as one int32 token stream, each text preceded by BOS; cached when `cache` is given."""
    if cache is not None and cache.is_file():
        return np.load(cache)
    bos = tokenizer.bos_token_id
    pieces = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces.append(np.asarray(([bos] if bos is not None else []) + ids, dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if cache is not None:  # written under another name and renamed, so a reader never sees half a file
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.stem}.{os.getpid()}.npy")
        np.save(partial, stream)
        os.replace(partial, cache)
    return stream


RESPONSE_CANVASES = ("random", "most")  # k canvases uniform over what fits, or the most that fit
PROMPT_CUTS = ("aligned", "any")  # the prompt ends canvas-aligned from the window's end, or anywhere


def check_window_names(response_canvases: str, prompt_cut: str) -> None:
    if response_canvases not in RESPONSE_CANVASES:
        raise ValueError(f"response_canvases must be one of {RESPONSE_CANVASES}, got {response_canvases!r}")
    if prompt_cut not in PROMPT_CUTS:
        raise ValueError(f"prompt_cut must be one of {PROMPT_CUTS}, got {prompt_cut!r}")


def check_window_rules(window: int, canvas_length: int, min_prompt: int, response_canvases: str,
                       prompt_cut: str) -> None:
    check_window_names(response_canvases, prompt_cut)
    if canvas_length < 1:
        raise ValueError(f"canvas_length must be at least 1, got {canvas_length}")
    if min_prompt < 1:
        raise ValueError(f"min_prompt must be at least 1 (the BOS token), got {min_prompt}")
    if window - min_prompt < canvas_length:
        raise ValueError(f"window {window} leaves no room for a canvas of {canvas_length} after {min_prompt} "
                         f"prompt tokens")


def cut_window(window: int, canvas_length: int, min_prompt: int, response_canvases: str, prompt_cut: str,
               gen: torch.Generator) -> tuple[int, int]:
    """Where a window of `window` tokens is cut: (prompt length, response canvases k), drawn from `gen`."""
    if prompt_cut == "any":
        prompt = int(torch.randint(min_prompt, window - canvas_length + 1, (), generator=gen))
        fit = (window - prompt) // canvas_length
    else:
        fit = (window - min_prompt) // canvas_length
    k = int(torch.randint(1, fit + 1, (), generator=gen))  # drawn either way: "most" keeps the same stream
    if response_canvases == "most":
        k = fit
    if prompt_cut == "aligned":
        prompt = window - k * canvas_length
    return prompt, k


@dataclass
class TextWindows:
    """Random windows of a token stream, each cut into a prompt and a response of whole canvases (see above)."""

    stream: np.ndarray
    window: int
    canvas_length: int
    bos_id: int
    min_prompt: int = 8
    response_canvases: str = "random"
    prompt_cut: str = "aligned"

    def __post_init__(self):
        check_window_rules(self.window, self.canvas_length, self.min_prompt, self.response_canvases, self.prompt_cut)
        if len(self.stream) <= self.window:
            raise ValueError(f"the token stream ({len(self.stream)} tokens) is shorter than one window "
                             f"({self.window})")

    def example(self, gen: torch.Generator) -> Example:
        start = int(torch.randint(0, len(self.stream) - self.window, (), generator=gen))
        tokens = self.stream[start:start + self.window].tolist()
        cut, k = cut_window(self.window, self.canvas_length, self.min_prompt, self.response_canvases,
                            self.prompt_cut, gen)
        # Every prompt starts with BOS, as prompts do at generation time.
        prompt = [self.bos_id] + tokens[1:cut] if tokens[0] != self.bos_id else tokens[:cut]
        return Example(prompt=prompt, response=tokens[cut:cut + k * self.canvas_length], encoder_loss_on_prompt=True)

    def examples(self, seed: int, step: int, count: int) -> list[Example]:
        return [self.example(example_generator(seed, step, i, "text")) for i in range(count)]


# ---- chat ---------------------------------------------------------------------------------------------------

def chat_example(tokenizer: Tokenizer, messages: list[dict], eos_id: int) -> Example:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a chat example must end with an assistant message")
    prompt = tokenizer.encode_chat(messages[:-1], add_generation_prompt=True)
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError("the chat template does not render the conversation as prompt + assistant turn")
    return Example(prompt=prompt, response=full[len(prompt):] + [eos_id], encoder_loss_on_prompt=False)


@dataclass
class ChatExamples:
    examples_list: list[Example]

    @classmethod
    def from_jsonl(cls, path: Path, tokenizer: Tokenizer, eos_id: int) -> "ChatExamples":
        out = []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                out.append(chat_example(tokenizer, record["messages"], eos_id))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: {err}") from err
        if not out:
            raise ValueError(f"{path} holds no examples")
        return cls(out)

    def examples(self, seed: int, step: int, count: int) -> list[Example]:
        picks = [int(torch.randint(0, len(self.examples_list), (), generator=example_generator(seed, step, i, "chat")))
                 for i in range(count)]
        return [self.examples_list[p] for p in picks]


def lay_out(examples: list[Example], micro_size: int, canvas_length: int, vocab_size: int, eos_id: int, pad_id: int,
            seed: int, step: int, eps: float, self_conditioning_prob: float, first_index: int = 0,
            canvases: str = "one", t_power: float = 1.0, own_samples_prob: float = 0.0) -> list[tuple[Batch, Noise]]:
    """Consecutive micro-batches with their noise; example i's noise depends only on (seed, step, i).
    `canvases`: train one canvas per example ("one") or all of them ("all"); `t_power`: how t is drawn;
    `own_samples_prob`: how often the second pass reads the first pass's samples; see objective.draw_noise."""
    out = []
    for begin in range(0, len(examples), micro_size):
        group = examples[begin:begin + micro_size]
        batch = collate(group, canvas_length, eos_id, pad_id)
        generators = [example_generator(seed, step, first_index + begin + i, "noise") for i in range(len(group))]
        out.append((batch, draw_noise(batch, canvas_length, vocab_size, generators, eps, self_conditioning_prob,
                                         canvases, t_power, own_samples_prob)))
    return out


def corpus_fingerprint(tokenizer_dir: Path, files: list[Path]) -> str:
    """Names the token cache: the tokenizer and the corpus files (names, order, contents)."""
    digest = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes())
    for path in files:
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
