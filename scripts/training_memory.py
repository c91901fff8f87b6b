"""Measure per-rank memory of sharded training at the released model's layer shapes, scaled down to few layers and
experts, on 2 CPU processes (gloo), and print the constants docs/training.md's memory plan is built from.

    python scripts/training_memory.py [--layers 2] [--experts 16] [--window 512] [--steps 2]

The model has DiffusionGemma-26B-A4B's shapes (hidden 2816; sliding layers with 16 query / 8 KV heads of 256, full
layers with 2 KV heads of 512 and keys as values; dense MLP 2112; experts of 704, top 8) but `--layers` layers (one
full layer in every six, at least one), `--experts` experts and the bundled tokenizer's 8,192-token vocabulary
(vocabulary-sized costs are reported per vocabulary entry, so they scale to 262,144 by arithmetic). It trains with
`dgemma.training.trainer.Trainer` exactly as `dgemma train` does: FSDP2 + expert parallelism over the 2 ranks, bf16
compute with fp32 master weights, micro-batch 1, one example of `--window` tokens (prompt + one 256-token canvas),
once without and once with activation checkpointing. Each rank reports:

- its local shards of the parameters, gradients and AdamW state (exact byte counts of the tensors it holds);
- the activations saved for backward during one step (every tensor autograd keeps, counted once per storage),
  split into vocabulary-sized ones (logits: [tokens, vocab]) and the rest, per token;
- its peak resident memory during the training steps (VmHWM, reset after setup), and after setup.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_config(layers: int, experts: int) -> dict:
    kinds = ["full_attention" if (i % 6 == 5 or i == layers - 1) else "sliding_attention" for i in range(layers)]
    return {"canvas_length": 256, "text_config": dict(
        vocab_size=8192, hidden_size=2816, intermediate_size=2112, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=2, head_dim=256, global_head_dim=512, layer_types=kinds,
        sliding_window=1024, num_experts=experts, top_k_experts=8, moe_intermediate_size=704, pad_token_id=0,
        eos_token_id=1, bos_token_id=2)}


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> None:
    import torch

    from dgemma.training.trainer import TrainConfig, Trainer

    directory = Path(args.data)
    sections = {
        "model": {"config": model_config(args.layers, args.experts)},
        "tokenizer": {"path": str(REPO / "dgemma" / "bundled")},
        "data": {"kind": "text", "text_file": str(directory / "text.txt"), "window": args.window},
        "train": {"out_dir": str(directory / f"run-{args.checkpointing}"), "steps": 1000, "batch_size": 2,
                  "micro_batch_size": 1, "parallel": "fsdp", "expert_parallel": 2, "bf16": True, "threads": 1,
                  "activation_checkpointing": bool(args.checkpointing), "freeze_router": False},
        "generation": {"eos_token_id": [1], "pad_token_id": 0},
    }
    trainer = Trainer(TrainConfig.from_sections(sections))
    vocab = trainer.model.config.vocab_size

    def local_bytes(tensors) -> int:
        from torch.distributed.tensor import DTensor
        total = 0
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
        return total

    params = {"experts": 0, "embedding": 0, "other": 0}
    for name, param in trainer.model.named_parameters():
        kind = "experts" if ".experts." in name else "embedding" if "embed_tokens" in name else "other"
        params[kind] += local_bytes([param])
    grads = {"bytes": 0}
    step = trainer.optimizer.step

    def counting_step(*a, **k):
        grads["bytes"] = local_bytes(p.grad for p in trainer.trainable if p.grad is not None)
        return step(*a, **k)

    trainer.optimizer.step = counting_step
    # Saved tensors, once per storage, by where they were saved: inside a transformer block, vocabulary-sized
    # (logits), or elsewhere. Views of parameters are not activations (FSDP frees a gathered weight's storage after
    # the unit's forward or backward even while autograd holds it), so their storages are recorded and skipped.
    from torch.distributed.tensor import DTensor
    from dgemma.model import Block
    saved: dict[int, tuple[int, str]] = {}
    parameter_storages: set[int] = set()
    depth = [0]

    def record_parameters(module, args):
        for param in module.parameters(recurse=False):
            param = param.to_local() if isinstance(param, DTensor) else param
            parameter_storages.add(param.untyped_storage()._cdata)

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    for module in trainer.model.modules():
        module.register_forward_pre_hook(record_parameters)
        if isinstance(module, Block):
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage._cdata not in parameter_storages:
            where = ("block" if depth[0] else
                     "vocab" if tensor.dim() and tensor.shape[-1] == vocab else "other")
            saved[storage._cdata] = (storage.nbytes(), where)
        return tensor

    setup_rss = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to what is resident now
    times, activations = [], []
    for _ in range(args.steps):
        saved.clear()
        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            record = trainer.train_step()
        times.append(time.perf_counter() - started)
        activations.append({where: sum(b for b, w in saved.values() if w == where)
                            for where in ("block", "vocab", "other")})
    batch = trainer.train_source.examples(trainer.config.seed, 0, 2)[trainer.dist.rank]
    encoder_tokens = len(batch.prompt) + len(batch.response)
    optimizer = local_bytes(v for state in trainer.optimizer.state.values() for v in state.values()
                            if torch.is_tensor(v) and v.dim() > 0)
    print(json.dumps({
        "rank": trainer.dist.rank, "checkpointing": bool(args.checkpointing), "params": params,
        "grads": grads["bytes"], "optimizer": optimizer, "saved": activations[-1],
        "encoder_tokens": encoder_tokens, "canvas": 256, "vocab": vocab, "layers": args.layers,
        "setup_rss": setup_rss, "peak_rss": rss("VmHWM"), "step_seconds": times, "loss": record["loss"]}),
        flush=True)
    import torch.distributed as dist
    dist.destroy_process_group()


def launch(args: argparse.Namespace, checkpointing: bool, data: Path) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        command = [sys.executable, __file__, "--worker", "--data", str(data), "--layers", str(args.layers),
                   "--experts", str(args.experts), "--window", str(args.window), "--steps", str(args.steps),
                   "--checkpointing", str(int(checkpointing))]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    reports = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"a rank failed (exit {process.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        # Enough text for windows of --window tokens in both splits: the repository's sample, repeated.
        sample = (REPO / "tests" / "data" / "heldout_sample.txt").read_text()
        (Path(tmp) / "text.txt").write_text((sample + "\n\n") * max(8, args.window // 64))
        print(f"2 ranks, FSDP + expert parallelism 2, bf16 compute, {args.layers} layers, {args.experts} experts, "
              f"window {args.window}, micro-batch 1")
        for checkpointing in (False, True):
            for r in launch(args, checkpointing, Path(tmp)):
                # Tokens that carry gradient: the encoder's (prompt + response) and the trained canvas's.
                tokens = r["encoder_tokens"] + r["canvas"]
                p, a = r["params"], r["saved"]
                print(json.dumps(r))
                print(f"  rank {r['rank']} checkpointing={checkpointing}: params {sum(p.values()) / gib:.3f} GiB "
                      f"(experts {p['experts'] / gib:.3f}, embedding {p['embedding'] / gib:.3f}, other "
                      f"{p['other'] / gib:.3f}), grads {r['grads'] / gib:.3f}, AdamW {r['optimizer'] / gib:.3f}; "
                      f"saved activations {sum(a.values()) / gib:.3f} GiB: in blocks "
                      f"{a['block'] / tokens / args.layers / 1024:.1f} KiB per token and layer, logits "
                      f"{a['vocab'] / (tokens * r['vocab']):.2f} B per token and vocabulary entry, other "
                      f"{a['other'] / tokens / 1024:.1f} KiB per token ({tokens} tokens); RSS after setup "
                      f"{r['setup_rss'] / gib:.2f} GiB, peak in steps {r['peak_rss'] / gib:.2f} GiB; "
                      f"{r['step_seconds'][-1]:.1f} s/step")

if __name__ == "__main__":
    main()
