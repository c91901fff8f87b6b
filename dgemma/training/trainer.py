"""`dgemma train`: train from scratch or fine-tune (optionally with LoRA), in one process or under torchrun.

Design choices:
- One config file (TOML or YAML) with sections model / tokenizer / data / train / lora / generation.
- Device-neutral: `[train] device` ("cpu", "cuda", "mps") places the model, batches and optimiser; autocast follows
  the device, the process group backend too (NCCL for CUDA, gloo otherwise), and under torchrun each CUDA rank uses
  cuda:LOCAL_RANK.
- Under torchrun, `[train] parallel` picks DistributedDataParallel ("ddp", replicas) or FSDP2 ("fsdp", sharded, with
  optional `expert_parallel` and `activation_checkpointing`); see `parallel.py`.
- Batches are pure functions of (seed, step) (see `data.py`), so the trainer keeps no data-loader state: resuming
  needs only the weights, the optimiser moments and the step (the data position), and continues the same
  trajectory. The learning rate is a function of the step too.
- Losses are summed per micro-batch and divided by the global token counts of the step, so that gradient
  accumulation and any number of processes compute the same update as one big batch.
- State for --resume: one process or DDP writes safetensors (weights, optimiser moments) and JSON, no pickle; FSDP
  writes each rank's shards with torch.distributed.checkpoint. Either is written into a temporary directory that
  replaces the previous state in one rename, so a SIGKILL never leaves half a state.
- The exported model (`out_dir/model`) is a plain checkpoint in transformers' layout with LoRA merged in (sharded
  runs gather it onto rank 0 first), plus the tokenizer files and a generation_config.json. Both directories are
  readable by others (the umask decides, not the temporary directory's 0700).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
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
from ..pretrained import DiffusionGemmaForBlockDiffusion
from ..tokenizer import Tokenizer
from .data import (ChatExamples, Source, TextWindows, check_window_names, corpus_fingerprint, lay_out,
                   tokenize_texts)
from .distill import DistilledExamples, Mixture
from .lora import add_lora, merge_lora
from .objective import CANVAS_RULES, Batch, Example, LossSums, Noise, diffusion_loss, trained_canvases
from .parallel import (Distributed, check_parallel, checkpoint_activations, clip_gradients, encoder_kv_hook, full_state_dict,
                       init_distributed, load_sharded, reshard, save_sharded, shard, world_from_environment)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# What a run writes into out_dir (and what --overwrite removes).
RUN_FILES = ("state", "model", "log.jsonl", "loss.png")


@dataclass
class TrainConfig:
    out_dir: str
    # Exactly one of: a config to build a model from scratch, or a checkpoint to fine-tune.
    model_config: dict[str, Any] | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None  # directory with tokenizer.json (default: the checkpoint's)
    # data
    data_kind: str = "text"  # "text" (a corpus directory or one text file) or "chat" (JSONL of messages)
    corpus_dir: str | None = None
    text_file: str | None = None
    train_jsonl: str | None = None
    eval_jsonl: str | None = None
    window: int = 256
    min_prompt: int = 8
    response_canvases: str = "random"  # text windows: k canvases uniform ("random") or as many as fit ("most")
    prompt_cut: str = "aligned"  # text windows and distilled samples: cut canvas-aligned, or anywhere ("any")
    distill_file: str | None = None  # text: a distillation .npz (distill.py) mixed into the training examples
    distill_fraction: float = 0.5  # the share of training examples drawn from it
    distill_encoder_loss: bool = False  # train the encoder on its own samples too
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
    bf16: bool = False  # bf16 compute (weights and optimiser stay fp32): autocast, plus FSDP's bf16 gathers
    seed: int = 0
    threads: int | None = None
    # where and how
    device: str = "cpu"  # "cpu", "cuda" or "mps"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2, sharded)
    expert_parallel: int = 1  # fsdp: split each MoE layer's experts across this many ranks
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # objective
    eps: float = 1e-3
    t_power: float = 1.0  # t = 1 - (1 - u)^t_power, u ~ U(eps, 1): 1 is the recipe's uniform t
    canvases: str = "one"  # train one canvas per example (the recipe) or "all" of them
    own_samples_prob: float = 0.0  # per canvas: the second pass reads the first pass's own samples (objective.py)
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
        if path.suffix not in (".toml", ".yaml", ".yml"):
            raise ValueError(f"{path}: the training config must be .toml or .yaml")
        import yaml
        try:
            raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else yaml.safe_load(path.read_text()) or {}
        except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a valid {path.suffix[1:].upper()} file: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the training config must be a table of sections, got {type(raw).__name__}")
        return cls.from_sections(raw, base=path.parent)

    @classmethod
    def from_sections(cls, raw: dict[str, Any], base: Path = Path(".")) -> "TrainConfig":
        flat: dict[str, Any] = {}
        model = raw.get("model", {})
        if "config" in model:
            flat["model_config"] = model["config"]
        if "checkpoint" in model:
            flat["checkpoint"] = _join(base, model["checkpoint"])
        if "tokenizer" in raw:
            flat["tokenizer"] = _join(base, raw["tokenizer"]["path"])
        data = raw.get("data", {})
        flat["data_kind"] = data.get("kind", "text")
        for key in ("corpus_dir", "text_file", "train_jsonl", "eval_jsonl", "distill_file"):
            if key in data:
                flat[key] = _join(base, data[key])
        for key in ("window", "min_prompt", "response_canvases", "prompt_cut", "distill_fraction",
                    "distill_encoder_loss"):
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
            flat["out_dir"] = _join(base, flat["out_dir"])
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
        if self.data_kind == "text" and bool(self.corpus_dir) == bool(self.text_file):
            raise ValueError("data.kind = 'text' needs one of data.corpus_dir (a directory of .txt files) or "
                             "data.text_file")
        if self.data_kind == "chat" and not self.train_jsonl:
            raise ValueError("data.kind = 'chat' needs data.train_jsonl")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.steps <= 0 or self.warmup_steps < 0:
            raise ValueError("steps must be positive and warmup_steps non-negative")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"[train] parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.device not in ("cpu", "cuda", "mps"):
            raise ValueError(f"[train] device must be 'cpu', 'cuda' or 'mps', got {self.device!r}")
        if self.t_power <= 0:
            raise ValueError(f"[train] t_power must be positive, got {self.t_power}")
        if not 0 <= self.own_samples_prob <= 1:
            raise ValueError(f"[train] own_samples_prob must be in [0, 1], got {self.own_samples_prob}")
        if self.canvases not in CANVAS_RULES:
            raise ValueError(f"[train] canvases must be one of {CANVAS_RULES}, got {self.canvases!r}")
        if self.distill_file and (self.data_kind != "text" or not 0 <= self.distill_fraction <= 1):
            raise ValueError("data.distill_file mixes into text data, with 0 <= data.distill_fraction <= 1")
        try:  # the sizes are checked when the windows are built, against the model's canvas length
            check_window_names(self.response_canvases, self.prompt_cut)
        except ValueError as err:
            raise ValueError(f"[data] {err}") from None

    def model_config_object(self) -> ModelConfig:
        """The architecture, read without building the model (from the config or the checkpoint's config.json)."""
        if self.checkpoint:
            from ..checkpoints import resolve_checkpoint
            return ModelConfig.from_file(resolve_checkpoint(self.checkpoint))
        return ModelConfig.from_dict({"model_type": "diffusion_gemma", **self.model_config})


def _join(base: Path, path: str) -> str:
    """A path from the config, relative to the config's directory (`configs/../runs/x` written `runs/x`)."""
    return os.path.normpath(base / path)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class LossModule(nn.Module):
    """The objective as a module: what DDP wraps, and FSDP's root unit."""

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model
        self.on_encoder_kv = None  # set when sharded (see parallel.encoder_kv_hook)

    def forward(self, batch: Batch, noise: Noise) -> LossSums:
        return diffusion_loss(self.model, batch, noise, self.on_encoder_kv)


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
        _, world, _ = world_from_environment()
        model_config = config.model_config_object()
        # Refuse a layout that cannot work before any process group, model or data exists.
        check_parallel(config.parallel, config.expert_parallel, world, model_config, config.batch_size,
                       config.device)
        self.dist: Distributed = init_distributed(config.device, config.parallel, config.expert_parallel)
        if config.threads:
            torch.set_num_threads(config.threads)
        tokenizer_dir = Path(config.tokenizer or config.checkpoint or "")
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)
        self.tokenizer_dir = tokenizer_dir
        self.model = self._build_model(model_config)
        self.generation_config = (self.model.generation_config.updated(**config.generation) if config.generation
                                  else self.model.generation_config)
        self.loss_module = LossModule(self.model)
        if config.activation_checkpointing:
            checkpoint_activations(self.model)
        self.engine: nn.Module = self.loss_module  # what a training forward calls
        if self.dist.sharded:
            shard(self.loss_module, self.model, self.dist, config.bf16)
            self.loss_module.on_encoder_kv = encoder_kv_hook(self.model)
        else:
            self.model.to(self.dist.device)
            if self.dist.world > 1:
                ids = [self.dist.device] if self.dist.device.type == "cuda" else None
                self.engine = nn.parallel.DistributedDataParallel(self.loss_module, device_ids=ids)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._parameter_groups(), lr=config.lr, betas=config.betas, fused=False)
        self.step = 0
        self.history: list[dict[str, float]] = []
        if resume:
            self._load_state()
        self.train_source, self.eval_source = self._sources()

    # ---- setup ----------------------------------------------------------------------------------------------

    def _build_model(self, model_config: ModelConfig) -> DiffusionGemmaForBlockDiffusion:
        config = self.config
        if config.checkpoint:
            # A sharded run keeps the stored dtype (memory-mapped, shared by the ranks of a machine) and converts
            # to fp32 unit by unit as it shards; otherwise fp32 now.
            model = load_checkpoint(config.checkpoint, dtype=None if self.dist.sharded else torch.float32,
                                    decode=None)  # parameters to train, in no decoding layout
        else:
            if model_config.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(f"model vocab_size {model_config.vocab_size} differs from the tokenizer's "
                                 f"{self.tokenizer.vocab_size}")
            model = DiffusionGemmaForBlockDiffusion(model_config)
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

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only; expert weights (on their own device mesh under expert parallelism) in
        groups of their own, so that no optimiser kernel mixes tensors of different meshes."""
        def groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
            return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.config.weight_decay},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

        if self.dist.expert_parallel == 1:
            return groups(self.trainable)
        experts = {id(p) for name, p in self.model.named_parameters() if ".experts." in name}
        split = (groups([p for p in self.trainable if id(p) not in experts])
                 + groups([p for p in self.trainable if id(p) in experts]))
        return [group for group in split if group["params"]]

    def _sources(self) -> tuple[Source, Source]:
        config, tok = self.config, self.tokenizer
        canvas = self.model.config.canvas_length
        if config.data_kind == "text":
            texts, cache = self._text_split()
            streams = []
            for name, pieces in (("train", texts[0]), ("heldout", texts[1])):
                # Rank 0 tokenizes and writes the cache; the others read it.
                if self.dist.main:
                    streams.append(tokenize_texts(tok, pieces, cache / f"{name}.npy"))
            self.dist.barrier()
            if not self.dist.main:
                streams = [tokenize_texts(tok, pieces, cache / f"{name}.npy")
                           for name, pieces in (("train", texts[0]), ("heldout", texts[1]))]
            train, heldout = (TextWindows(stream, config.window, canvas, tok.bos_token_id, config.min_prompt,
                                          config.response_canvases, config.prompt_cut) for stream in streams)
            if config.distill_file:  # the held-out figures stay on real text
                distilled = DistilledExamples.from_file(config.distill_file, config.distill_encoder_loss, canvas,
                                                        config.min_prompt, config.response_canvases, config.prompt_cut)
                train = Mixture(train, distilled, config.distill_fraction)
            return train, heldout
        eos = self._eos_id()
        train = ChatExamples.from_jsonl(Path(config.train_jsonl), tok, eos)
        evaluation = ChatExamples.from_jsonl(Path(config.eval_jsonl), tok, eos) if config.eval_jsonl else train
        return train, evaluation

    def _text_split(self) -> tuple[tuple[list[str], list[str]], Path]:
        """(train texts, held-out texts) and the token cache directory.

        A corpus directory is split by the corpus recipe's rule (one 16 kB block in 64 held out; the cache lives in
        the corpus directory). A single text file too, but when that holds nothing out (files under about half a
        megabyte) its last tenth, from a paragraph break, is held out; its cache lives in out_dir."""
        from ..recipes.corpus import split_documents
        config = self.config
        if config.text_file:
            path = Path(config.text_file)
            if not path.is_file():
                raise FileNotFoundError(f"data.text_file {path} does not exist")
            files, directory = [path], self.out / "tokens"
        else:
            directory = Path(config.corpus_dir)
            files = sorted(directory.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"data.corpus_dir {directory} holds no .txt files")
            directory = directory / "tokens"
        texts = {f.name: f.read_bytes().decode("utf-8") for f in files}
        train, heldout = split_documents(texts)
        if config.text_file and not heldout:
            text = texts[files[0].name]
            cut = _paragraph_cut(text, int(len(text) * 0.9))
            train, heldout = [text[:cut]], [text[cut:]]
        return (train, heldout), directory / corpus_fingerprint(self.tokenizer_dir, files)

    def _eos_id(self) -> int:
        eos = self.generation_config.eos_token_ids or self.model.config.eos_token_ids
        if not eos:
            raise ValueError("training needs an EOS token id (generation_config eos_token_id or the model config)")
        return eos[0]

    def _pad_id(self) -> int:
        pad = self.generation_config.pad_token_id
        return pad if pad is not None else (self.model.config.pad_token_id or 0)

    # ---- one step -----------------------------------------------------------------------------------------

    def _micro_batches(self, examples: list[Example], step: int, seed: int, first_index: int = 0
                       ) -> list[tuple[Batch, Noise]]:
        cfg = self.config
        return lay_out(examples, cfg.micro_batch_size, self.model.config.canvas_length, self.model.config.vocab_size,
                       self._eos_id(), self._pad_id(), seed, step, cfg.eps, cfg.self_conditioning_prob,
                       first_index=first_index, canvases=cfg.canvases, t_power=cfg.t_power,
                       own_samples_prob=cfg.own_samples_prob)

    def _loss(self, sums: LossSums, canvas_tokens: int, encoder_tokens: int) -> torch.Tensor:
        cfg = self.config
        loss = cfg.diffusion_weight * sums.diffusion / canvas_tokens
        if encoder_tokens:
            loss = loss + cfg.encoder_weight * sums.encoder / encoder_tokens
        return loss

    def _autocast(self):
        # bf16 compute. Under FSDP the mixed-precision policy also gathers the weights in bf16; autocast still
        # runs the ops that mix them with fp32 activations (the per-layer scalars are fp32 buffers) in bf16.
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def train_step(self) -> dict[str, float]:
        cfg, step = self.config, self.step
        started = time.perf_counter()
        examples = self.train_source.examples(cfg.seed, step, cfg.batch_size)
        canvas_length = self.model.config.canvas_length
        canvas_tokens = canvas_length * sum(trained_canvases(e, canvas_length, cfg.canvases) for e in examples)
        encoder_tokens = sum(_encoder_target_count(e) for e in examples)
        per_rank = cfg.batch_size // self.dist.world
        first = self.dist.rank * per_rank
        micro = self._micro_batches(examples[first:first + per_rank], step, cfg.seed, first_index=first)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        # DDP averages gradients over processes: scale so the result is the global mean's gradient. FSDP sums them.
        scale = self.dist.world if (self.dist.world > 1 and not self.dist.sharded) else 1
        diffusion_sum = encoder_sum = 0.0
        for i, (batch, noise) in enumerate(micro):
            sync = i == len(micro) - 1
            replicas = self.dist.world > 1 and not self.dist.sharded
            context = self.engine.no_sync() if (replicas and not sync) else contextlib.nullcontext()
            with context, self._autocast():
                sums = self.engine(batch, noise)
                loss = self._loss(sums, canvas_tokens, encoder_tokens) * scale
            loss.backward()
            diffusion_sum += float(sums.diffusion.detach())
            encoder_sum += float(sums.encoder.detach())
        grad_norm = clip_gradients(self.trainable, cfg.grad_clip, self.dist)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        diffusion_sum, encoder_sum = self.dist.all_reduce_sum([diffusion_sum, encoder_sum])
        diffusion, encoder = diffusion_sum / canvas_tokens, encoder_sum / max(encoder_tokens, 1)
        tokens = sum(len(e.prompt) + len(e.response) for e in examples)  # the global batch
        self.step += 1
        return {"step": step + 1, "lr": learning_rate(cfg, step), "diffusion_loss": diffusion,
                "encoder_loss": encoder, "loss": cfg.diffusion_weight * diffusion + cfg.encoder_weight * encoder,
                "grad_norm": grad_norm, "tokens_per_second": tokens / (time.perf_counter() - started)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out diffusion loss (per canvas token) and encoder perplexity on fixed examples. Under torchrun the
        eval batches are dealt out to the ranks; sharded ranks all run the same number of forwards (a rank with no
        batch left runs one whose result it drops), since every forward gathers weights from all of them."""
        cfg = self.config
        self.model.eval()
        module = self.engine if self.dist.sharded else self.loss_module
        sums = [0.0, 0.0, 0.0, 0.0]  # diffusion, encoder, canvas tokens, encoder tokens
        rounds = math.ceil(cfg.eval_batches / self.dist.world)
        for round_index in range(rounds):
            batch_index = round_index * self.dist.world + self.dist.rank
            real = batch_index < cfg.eval_batches
            if not real and not self.dist.sharded:
                continue
            index = batch_index if real else 0
            examples = self.eval_source.examples(cfg.seed + 1, index, cfg.micro_batch_size)
            for batch, noise in self._micro_batches(examples, index, cfg.seed + 1):
                with self._autocast():
                    result = module(batch, noise)
                if real:
                    sums[0] += float(result.diffusion)
                    sums[1] += float(result.encoder)
                    sums[2] += result.canvas_tokens
                    sums[3] += result.encoder_tokens
        if self.dist.sharded:
            reshard(self.engine)
        self.model.train()
        diffusion, encoder, canvas_tokens, encoder_tokens = self.dist.all_reduce_sum(sums)
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
            progress.update(self.step - 1, record["loss"], record["tokens_per_second"])
            last = self.step == cfg.steps
            if self.step % cfg.eval_interval == 0 or last:
                record.update(self.evaluate())
                if self.dist.main:
                    progress.newline()
                    print(json.dumps({k: round(v, 5) for k, v in record.items()}), file=sys.stderr)
            self.history.append(record)
            if self.dist.main and (self.step % cfg.log_interval == 0 or last or "eval_diffusion_loss" in record):
                with open(self.out / "log.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            if self.step % cfg.save_interval == 0 or last:
                self.save()
        progress.newline()
        return self.history

    # ---- state --------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the trainer state (for --resume), the exported model and the loss curve, each atomically."""
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        if self.dist.sharded:
            self._save_sharded_state()
        elif self.dist.main:
            self._save_state()
        self.export(self.out / "model")
        if self.dist.main:
            plot_losses(self.history, self.out / "loss.png")
        self.dist.barrier()

    def _meta(self, format: str) -> str:
        return json.dumps({"step": self.step, "format": format, "world": self.dist.world,
                           "parallel": self.config.parallel if self.dist.world > 1 else "none",
                           "lr": learning_rate(self.config, max(self.step - 1, 0)), "data_position": self.step,
                           "config": asdict(self.config), "history": self.history}, indent=1)

    def _save_state(self) -> None:
        state_dir = Path(tempfile.mkdtemp(prefix=".state.", dir=self.out))
        params = dict(self.model.named_parameters())
        save_file({name: p.detach().contiguous().cpu() for name, p in params.items()},
                  state_dir / "parameters.safetensors")
        save_file({name: b.detach().contiguous().cpu() for name, b in self.model.named_buffers()},
                  state_dir / "buffers.safetensors")
        moments = {f"{index}.{key}": value.detach().contiguous().cpu()
                   for index, state in self.optimizer.state_dict()["state"].items() for key, value in state.items()}
        save_file(moments, state_dir / "optimizer.safetensors")
        (state_dir / "state.json").write_text(self._meta("safetensors"))
        _publish(state_dir, self.out / "state")

    def _save_sharded_state(self) -> None:
        state_dir = self.out / f".state.step{self.step}"
        if self.dist.main:
            shutil.rmtree(state_dir, ignore_errors=True)  # a killed run's leftover
            state_dir.mkdir(parents=True)
        self.dist.barrier()
        save_sharded(self.engine, self.optimizer, str(state_dir), self.dist, self._tied_names())  # returns once every rank has written
        if self.dist.main:
            (state_dir / "state.json").write_text(self._meta("dcp"))
            _publish(state_dir, self.out / "state")

    def _tied_names(self) -> set[str]:
        """The loss module's names of the encoder's tied copies of the decoder's weights."""
        return {f"model.encoder.{name}" for name in self.model.tied_parameter_names()}

    def export(self, directory: Path) -> None:
        """The model in transformers' layout, LoRA merged in; a sharded run gathers it onto rank 0 first."""
        if self.dist.sharded:
            state = full_state_dict(self.engine, prefix="model.")
        elif self.dist.main:
            state = self.model.state_dict() if self.config.lora_rank else None
        else:
            return
        if not self.dist.main:
            return
        model = self.model if state is None else self._plain_model(state)
        extra: dict[str, str | bytes] = {"generation_config.json": self.generation_config.to_json()}
        for name in TOKENIZER_FILES:
            path = self.tokenizer_dir / name
            if path.is_file():
                extra[name] = path.read_bytes()
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            save_model(model, staging / directory.name, extra_files=extra)
            _publish(staging / directory.name, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _plain_model(self, state: dict[str, torch.Tensor]) -> DiffusionGemma:
        """A DiffusionGemma holding `state` (no copies), its LoRA adapters merged in (into new tensors)."""
        with torch.device("meta"):
            model = DiffusionGemma(self.model.config)
            if self.config.lora_rank:
                add_lora(model, self.config.lora_targets, self.config.lora_rank, self.config.lora_alpha)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        if self.config.lora_rank:
            merge_lora(model)
        return model

    def _load_state(self) -> None:
        state_dir = self.out / "state"
        meta = read_state(self.out)
        if meta is None:
            raise FileNotFoundError(f"--resume: {self.out} holds no saved training state to resume")
        written = meta.get("format", "safetensors")
        if written == "dcp" and not self.dist.sharded:
            raise ValueError(f"--resume: the state in {state_dir} was written by a sharded run (parallel = 'fsdp'); "
                             "resume it the same way, under torchrun")
        if written != "dcp" and self.dist.sharded:
            raise ValueError(f"--resume: the state in {state_dir} was written by an unsharded run; resume it "
                             "without parallel = 'fsdp'")
        if written == "dcp":
            load_sharded(self.engine, self.optimizer, str(state_dir), self.dist, self._tied_names())
        else:
            self._load_safetensors_state(state_dir)
        self.step = meta["step"]
        self.history = meta["history"]
        log = self.out / "log.jsonl"
        if self.dist.main and log.is_file():  # drop what a killed run logged after its last saved state
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(line + "\n" for line in kept))

    def _load_safetensors_state(self, state_dir: Path) -> None:
        params = load_file(state_dir / "parameters.safetensors")
        buffers = load_file(state_dir / "buffers.safetensors")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(params[name])
            for name, buffer in self.model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        moments = load_file(state_dir / "optimizer.safetensors", device=str(self.dist.device))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        saved = self.optimizer.state_dict()
        saved["state"] = state
        self.optimizer.load_state_dict(saved)


def read_state(out: Path) -> dict[str, Any] | None:
    """The saved trainer state's metadata (step, history, config), or None when there is none."""
    path = Path(out) / "state" / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _paragraph_cut(text: str, limit: int) -> int:
    """The last paragraph break (else line break) at or before `limit`, else `limit`."""
    for mark in ("\n\n", "\n"):
        found = text.rfind(mark, 0, limit)
        if found > 0:
            return found + len(mark)
    return limit


def _publish(directory: Path, target: Path) -> None:
    """Give a finished temporary directory the permissions of an ordinary one, then rename it onto `target`."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    _replace_directory(directory, target)


def _encoder_target_count(example: Example) -> int:
    if not example.encoder_loss:
        return 0
    total = len(example.prompt) + len(example.response)
    return total - (1 if example.encoder_loss_on_prompt else len(example.prompt))


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


def prepare_out_dir(config: TrainConfig, resume: bool, overwrite: bool) -> str | None:
    """Check what `out_dir` holds against the flags. Returns a message when there is nothing to do (a finished run
    to resume); raises ValueError when the run must not start; with `overwrite` rank 0 removes the old run."""
    out = Path(config.out_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in out_dir and --overwrite deletes it: give one of them")
    meta = read_state(out)
    if resume:
        if meta is None:
            raise ValueError(f"--resume: {out} holds no saved training state to resume (start it without --resume)")
        if meta["step"] >= config.steps:
            return (f"the run in {out} is finished ({meta['step']} of {config.steps} steps): nothing to resume. "
                    f"Its model is in {out / 'model'} (raise [train] steps to train further)")
        return None
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"{out} already holds a training run ({', '.join(existing)}): pass --resume to continue it "
                         "or --overwrite to delete it and start over")
    if existing and world_from_environment()[0] == 0:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return None


def main(config_path: str, resume: bool = False, overwrite: bool = False, device: str | None = None) -> int:
    """`dgemma train`: train per the config into its out_dir. `device` overrides `[train] device`."""
    config = TrainConfig.from_file(config_path)
    if device is not None:
        config.device = device
        config.validate()
    rank = world_from_environment()[0]
    done = prepare_out_dir(config, resume, overwrite)
    if done is not None:
        if rank == 0:
            print(done)
        return 0
    trainer = Trainer(config, resume=resume)
    trainer.run()
    if trainer.dist.main:
        model = Path(config.out_dir) / "model"
        print(f"model written to {model} (try: dgemma generate --model {model} \"...\"); "
              f"loss curve in {Path(config.out_dir) / 'loss.png'}")
    if trainer.dist.world > 1:
        # Every rank past its last collective, then the trainer's tensors (FSDP's too) freed while the interpreter
        # is whole: a tensor that gloo's work still holds when the interpreter shuts down aborts the process
        # ("terminate called without an active exception", seen once in the 2-rank tests).
        trainer.dist.barrier()
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return 0
