"""`dgemma train`: train from scratch or fine-tune (optionally with LoRA), in one process or under torchrun.

Design choices:
- One config file (TOML or YAML) with sections model / tokenizer / data / train / lora / generation.
- Batches are pure functions of (seed, step) (see `data.py`), so the trainer keeps no data-loader state: resuming
  needs only the weights, the optimiser moments and the step, and continues the same trajectory.
- Losses are summed per micro-batch and divided by the global token counts of the step, so that gradient
  accumulation and any number of DDP processes (gloo on CPU) compute the same update as one big batch.
- State is saved without pickle: weights and optimiser moments as safetensors, the rest as JSON, written to a
  temporary directory that replaces the previous state in one rename, so a SIGKILL never leaves half a state.
- The exported model (`out_dir/model`) is a plain checkpoint in transformers' layout with LoRA merged in, plus
  the tokenizer files and a generation_config.json.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .. import load as load_checkpoint
from ..checkpoints import _replace_directory, save_model
from ..config import ModelConfig
from ..model import DiffusionGemma
from ..tokenizer import Tokenizer
from .data import ChatExamples, Source, TextWindows, lay_out, tokenize_texts
from .lora import add_lora, merge_lora
from .objective import Batch, Example, LossSums, Noise, diffusion_loss

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass
class TrainConfig:
    out_dir: str
    # Exactly one of: a config to build a model from scratch, or a checkpoint to fine-tune.
    model_config: dict[str, Any] | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None  # directory with tokenizer.json (default: the checkpoint's)
    # data
    data_kind: str = "text"  # "text" (a corpus directory) or "chat" (JSONL of messages)
    corpus_dir: str | None = None
    train_jsonl: str | None = None
    eval_jsonl: str | None = None
    window: int = 256
    min_prompt: int = 8
    # optimisation
    steps: int = 1000
    batch_size: int = 16  # global examples per step
    micro_batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False  # autocast matmuls to bf16 (weights and optimiser stay fp32)
    seed: int = 0
    threads: int | None = None
    # objective
    eps: float = 1e-3
    self_conditioning_prob: float = 0.5
    diffusion_weight: float = 1.0
    encoder_weight: float = 1.0
    # bookkeeping
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    log_interval: int = 10
    # LoRA (fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    freeze_router: bool = False
    generation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training config at {path}")
        if path.suffix == ".toml":
            raw = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(path.read_text()) or {}
        else:
            raise ValueError(f"{path}: the training config must be .toml or .yaml")
        return cls.from_sections(raw, base=path.parent)

    @classmethod
    def from_sections(cls, raw: dict[str, Any], base: Path = Path(".")) -> "TrainConfig":
        flat: dict[str, Any] = {}
        model = raw.get("model", {})
        if "config" in model:
            flat["model_config"] = model["config"]
        if "checkpoint" in model:
            flat["checkpoint"] = str(base / model["checkpoint"])
        if "tokenizer" in raw:
            flat["tokenizer"] = str(base / raw["tokenizer"]["path"])
        data = raw.get("data", {})
        flat["data_kind"] = data.get("kind", "text")
        for key in ("corpus_dir", "train_jsonl", "eval_jsonl"):
            if key in data:
                flat[key] = str(base / data[key])
        for key in ("window", "min_prompt"):
            if key in data:
                flat[key] = data[key]
        flat.update(raw.get("train", {}))
        lora = raw.get("lora", {})
        flat.update({f"lora_{k}": v for k, v in lora.items() if k in ("rank", "alpha", "targets")})
        if "freeze_router" in lora:
            flat["freeze_router"] = lora["freeze_router"]
        if "generation" in raw:
            flat["generation"] = raw["generation"]
        if "out_dir" in flat:
            flat["out_dir"] = str(base / flat["out_dir"])
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        if "betas" in flat:
            flat["betas"] = tuple(flat["betas"])
        config = cls(**flat)
        config.validate()
        return config

    def validate(self) -> None:
        if (self.model_config is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of [model] config (from scratch) or [model] checkpoint (fine-tune)")
        if self.data_kind not in ("text", "chat"):
            raise ValueError(f"data.kind must be 'text' or 'chat', got {self.data_kind!r}")
        if self.data_kind == "text" and not self.corpus_dir:
            raise ValueError("data.kind = 'text' needs data.corpus_dir")
        if self.data_kind == "chat" and not self.train_jsonl:
            raise ValueError("data.kind = 'chat' needs data.train_jsonl")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.steps <= 0 or self.warmup_steps < 0:
            raise ValueError("steps must be positive and warmup_steps non-negative")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class LossModule(nn.Module):
    """The objective as a module, so DistributedDataParallel can wrap it and synchronise gradients."""

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, noise: Noise) -> LossSums:
        return diffusion_loss(self.model, batch, noise)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(rank=int(os.environ.get("RANK", "0")), world=world)

    @property
    def main(self) -> bool:
        return self.rank == 0


class Progress:
    """One status line on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = step
        done = step + 1 - self.first_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        sys.stderr.write(f"\rstep {step + 1}/{self.total}  loss {loss:.4f}  {tokens_per_second:,.0f} tok/s  "
                         f"ETA {eta / 60:.1f} min   ")
        sys.stderr.flush()

    def newline(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.out = Path(config.out_dir)
        self.dist = Distributed.from_environment()
        if config.threads:
            torch.set_num_threads(config.threads)
        tokenizer_dir = Path(config.tokenizer or config.checkpoint or "")
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)
        self.tokenizer_dir = tokenizer_dir
        self.model = self._build_model()
        self.generation_config = (self.model.generation_config.updated(**config.generation) if config.generation
                                  else self.model.generation_config)
        self.trainable = self._trainable_parameters()
        decay = [p for p in self.trainable if p.dim() >= 2]
        no_decay = [p for p in self.trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=config.lr, betas=config.betas, fused=False)
        self.step = 0
        self.history: list[dict[str, float]] = []
        if resume:
            self._load_state()
        self.loss_module = LossModule(self.model)
        self.engine: nn.Module = self.loss_module
        if self.dist.world > 1:
            self.engine = nn.parallel.DistributedDataParallel(self.loss_module)
        self.train_source, self.eval_source = self._sources()

    # ---- setup ----------------------------------------------------------------------------------------------

    def _build_model(self) -> DiffusionGemma:
        config = self.config
        if config.checkpoint:
            model = load_checkpoint(config.checkpoint, dtype=torch.float32)
        else:
            model_config = ModelConfig.from_dict({"model_type": "diffusion_gemma", **config.model_config})
            if model_config.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(f"model vocab_size {model_config.vocab_size} differs from the tokenizer's "
                                 f"{self.tokenizer.vocab_size}")
            model = DiffusionGemma(model_config)
            model.init_weights(torch.Generator().manual_seed(config.seed))
        model.train()
        for param in model.parameters():
            param.requires_grad_(True)
        if config.lora_rank:
            add_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha,
                     torch.Generator().manual_seed(config.seed + 1))
        if config.freeze_router:
            for name, param in model.named_parameters():
                if ".router." in name:
                    param.requires_grad_(False)
        return model

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _sources(self) -> tuple[Source, Source]:
        config, tok = self.config, self.tokenizer
        canvas = self.model.config.canvas_length
        if config.data_kind == "text":
            from .corpus import split_documents
            corpus = Path(config.corpus_dir)
            files = sorted(corpus.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"data.corpus_dir {corpus} holds no .txt files")
            train, heldout = split_documents({f.name: f.read_bytes().decode("utf-8") for f in files})
            cache = corpus / "tokens" / _fingerprint(self.tokenizer_dir, files)
            streams = [tokenize_texts(tok, texts, cache / f"{name}.npy")
                       for name, texts in (("train", train), ("heldout", heldout))]
            return tuple(TextWindows(stream, config.window, canvas, tok.bos_token_id, config.min_prompt)
                         for stream in streams)
        eos = self._eos_id()
        train = ChatExamples.from_jsonl(Path(config.train_jsonl), tok, eos)
        evaluation = ChatExamples.from_jsonl(Path(config.eval_jsonl), tok, eos) if config.eval_jsonl else train
        return train, evaluation

    def _eos_id(self) -> int:
        eos = self.generation_config.eos_token_ids or self.model.config.eos_token_ids
        if not eos:
            raise ValueError("training needs an EOS token id (generation_config eos_token_id or the model config)")
        return eos[0]

    def _pad_id(self) -> int:
        pad = self.generation_config.pad_token_id
        return pad if pad is not None else (self.model.config.pad_token_id or 0)

    # ---- one step -----------------------------------------------------------------------------------------

    def _micro_batches(self, examples: list[Example], step: int, seed: int) -> list[tuple[Batch, Noise]]:
        cfg = self.config
        return lay_out(examples, cfg.micro_batch_size, self.model.config.canvas_length, self.model.config.vocab_size,
                       self._eos_id(), self._pad_id(), seed, step, cfg.eps, cfg.self_conditioning_prob)

    def _loss(self, sums: LossSums, canvas_tokens: int, encoder_tokens: int) -> torch.Tensor:
        cfg = self.config
        loss = cfg.diffusion_weight * sums.diffusion / canvas_tokens
        if encoder_tokens:
            loss = loss + cfg.encoder_weight * sums.encoder / encoder_tokens
        return loss

    def train_step(self) -> dict[str, float]:
        cfg, step = self.config, self.step
        started = time.perf_counter()
        examples = self.train_source.examples(cfg.seed, step, cfg.batch_size)
        canvas_tokens = cfg.batch_size * self.model.config.canvas_length
        encoder_tokens = sum(_encoder_target_count(e) for e in examples)
        per_rank = cfg.batch_size // self.dist.world
        mine = examples[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        micro = lay_out(mine, cfg.micro_batch_size, self.model.config.canvas_length, self.model.config.vocab_size,
                        self._eos_id(), self._pad_id(), cfg.seed, step, cfg.eps, cfg.self_conditioning_prob,
                        first_index=self.dist.rank * per_rank)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        diffusion_sum = encoder_sum = 0.0
        for i, (batch, noise) in enumerate(micro):
            sync = i == len(micro) - 1
            context = self.engine.no_sync() if (self.dist.world > 1 and not sync) else contextlib.nullcontext()
            with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                sums = self.engine(batch, noise)
                # DDP averages gradients over processes; scale so the result is the global mean's gradient.
                loss = self._loss(sums, canvas_tokens, encoder_tokens) * self.dist.world
            loss.backward()
            diffusion_sum += float(sums.diffusion.detach())
            encoder_sum += float(sums.encoder.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.tensor([diffusion_sum, encoder_sum], dtype=torch.float64)
        if self.dist.world > 1:
            dist.all_reduce(totals)
        diffusion, encoder = float(totals[0]) / canvas_tokens, float(totals[1]) / max(encoder_tokens, 1)
        tokens = sum(len(e.prompt) + len(e.response) for e in examples)
        self.step += 1
        return {"step": step + 1, "lr": learning_rate(cfg, step), "diffusion_loss": diffusion,
                "encoder_loss": encoder, "loss": cfg.diffusion_weight * diffusion + cfg.encoder_weight * encoder,
                "grad_norm": grad_norm, "tokens_per_second": tokens / (time.perf_counter() - started)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out diffusion loss (per canvas token) and encoder perplexity on fixed examples."""
        cfg = self.config
        self.model.eval()
        diffusion = encoder = 0.0
        canvas_tokens = encoder_tokens = 0
        for batch_index in range(cfg.eval_batches):
            examples = self.eval_source.examples(cfg.seed + 1, batch_index, cfg.micro_batch_size)
            for batch, noise in self._micro_batches(examples, batch_index, cfg.seed + 1):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    sums = diffusion_loss(self.model, batch, noise)
                diffusion += float(sums.diffusion)
                encoder += float(sums.encoder)
                canvas_tokens += sums.canvas_tokens
                encoder_tokens += sums.encoder_tokens
        self.model.train()
        encoder_loss = encoder / max(encoder_tokens, 1)
        return {"eval_diffusion_loss": diffusion / canvas_tokens, "eval_encoder_loss": encoder_loss,
                "eval_encoder_perplexity": math.exp(encoder_loss)}

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, float]]:
        cfg = self.config
        progress = Progress(cfg.steps, self.dist.main)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        while self.step < cfg.steps:
            record = self.train_step()
            progress.update(self.step - 1, record["loss"], record["tokens_per_second"] * self.dist.world)
            last = self.step == cfg.steps
            if self.step % cfg.eval_interval == 0 or last:
                if self.dist.main:
                    record.update(self.evaluate())
                    progress.newline()
                    print(json.dumps({k: round(v, 5) for k, v in record.items()}), file=sys.stderr)
                if self.dist.world > 1:
                    dist.barrier()
            self.history.append(record)
            if self.dist.main and (self.step % cfg.log_interval == 0 or last or "eval_diffusion_loss" in record):
                with open(self.out / "log.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            if self.step % cfg.save_interval == 0 or last:
                if self.dist.main:
                    self.save()
                if self.dist.world > 1:
                    dist.barrier()
        progress.newline()
        return self.history

    # ---- state --------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the trainer state (for --resume), the exported model and the loss curve, each atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        state_dir = Path(tempfile.mkdtemp(prefix=".state.", dir=self.out))
        params = dict(self.model.named_parameters())
        save_file({name: p.detach().contiguous() for name, p in params.items()}, state_dir / "parameters.safetensors")
        save_file({name: b.detach().contiguous() for name, b in self.model.named_buffers()},
                  state_dir / "buffers.safetensors")
        moments = {f"{index}.{key}": value.detach().contiguous()
                   for index, state in self.optimizer.state_dict()["state"].items() for key, value in state.items()}
        save_file(moments, state_dir / "optimizer.safetensors")
        (state_dir / "state.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config),
                                                          "history": self.history}, indent=1))
        _replace_directory(state_dir, self.out / "state")
        self.export(self.out / "model")
        plot_losses(self.history, self.out / "loss.png")

    def export(self, directory: Path) -> None:
        model = self.model
        if self.config.lora_rank:
            model = copy.deepcopy(self.model)
            merge_lora(model)
        extra: dict[str, str | bytes] = {"generation_config.json": self.generation_config.to_json()}
        for name in TOKENIZER_FILES:
            path = self.tokenizer_dir / name
            if path.is_file():
                extra[name] = path.read_bytes()
        save_model(model, directory, extra_files=extra)

    def _load_state(self) -> None:
        state_dir = self.out / "state"
        if not (state_dir / "state.json").is_file():
            raise FileNotFoundError(f"--resume: no saved state in {state_dir}")
        meta = json.loads((state_dir / "state.json").read_text())
        params = load_file(state_dir / "parameters.safetensors")
        buffers = load_file(state_dir / "buffers.safetensors")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(params[name])
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        moments = load_file(state_dir / "optimizer.safetensors")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        saved = self.optimizer.state_dict()
        saved["state"] = state
        self.optimizer.load_state_dict(saved)
        self.step = meta["step"]
        self.history = meta["history"]
        log = self.out / "log.jsonl"
        if self.dist.main and log.is_file():  # drop what a killed run logged after its last saved state
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(line + "\n" for line in kept))


def _encoder_target_count(example: Example) -> int:
    total = len(example.prompt) + len(example.response)
    return total - (1 if example.encoder_loss_on_prompt else len(example.prompt))


def _fingerprint(tokenizer_dir: Path, files: list[Path]) -> str:
    """Names the token cache: the tokenizer and the corpus files (names, order, contents)."""
    digest = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes())
    for path in files:
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    """Training and held-out losses against steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["diffusion_loss"] for r in history], label="train diffusion", alpha=0.6)
    ax.plot(steps, [r["encoder_loss"] for r in history], label="train encoder (AR)", alpha=0.6)
    evals = [r for r in history if "eval_diffusion_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_diffusion_loss"] for r in evals], "o-", label="held-out diffusion")
        ax.plot([r["step"] for r in evals], [r["eval_encoder_loss"] for r in evals], "s-", label="held-out encoder")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(config_path: str, resume: bool) -> int:
    trainer = Trainer(TrainConfig.from_file(config_path), resume=resume)
    trainer.run()
    if trainer.dist.world > 1:
        dist.destroy_process_group()
    return 0
