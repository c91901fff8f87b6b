"""Training past one process, on CPU with 2 gloo processes: FSDP2 (with activation checkpointing), expert
parallelism, FSDP + LoRA, sharded checkpoints killed and resumed, exports, and layouts refused at start.

Every comparison is against one process training on the same global batch in fp32: the losses *and* the gradient
norms of every step (gloo has computed ReduceOp.AVG as a sum, pytorch/pytorch#162338, which only the gradient
magnitudes would show), then the exported weights. The processes are started as torchrun starts them (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), without torchrun's launcher process, which saves a Python start per run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.training.parallel import check_parallel
from dgemma.training.trainer import TrainConfig, Trainer
from test_trainer import corpus, tiny_config, write_toml  # noqa: F401  (corpus is a fixture)

ROOT = Path(__file__).parents[1]
STEPS = 8


def sections_for(corpus: Path, out: Path, **train) -> dict:
    return tiny_config(corpus, out, steps=STEPS, save_interval=2, eval_interval=4, **train)


def launch(config: Path, *args: str, ranks: int = 2) -> list[subprocess.Popen]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        processes.append(subprocess.Popen([sys.executable, "-m", "dgemma", "train", "--config", str(config), *args],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          cwd=ROOT))
    return processes


def finish(processes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out, err))
    return results


def train_ranks(config: Path, *args: str) -> list[tuple[int, str, str]]:
    results = finish(launch(config, *args))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return results


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_curve(one: list[dict], other: list[dict], rel: float = 1e-5, grad_rel: float | None = None) -> None:
    assert [r["step"] for r in other] == [r["step"] for r in one]
    for a, b in zip(one, other):
        for key in ("loss", "diffusion_loss", "encoder_loss", "grad_norm"):
            tolerance = grad_rel if key == "grad_norm" and grad_rel and a["step"] > 1 else rel
            assert b[key] == pytest.approx(a[key], rel=tolerance), (a["step"], key)
        if "eval_diffusion_loss" in a:
            assert b["eval_diffusion_loss"] == pytest.approx(a["eval_diffusion_loss"], rel=rel)


def assert_same_weights(one: Path, other: Path, atol: float = 1e-5) -> None:
    a, b = dgemma.load(one).state_dict(), dgemma.load(other).state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    """The reference: one process, the same config and global batch."""
    out = tmp_path_factory.mktemp("single") / "run"
    Trainer(TrainConfig.from_sections(sections_for(corpus, out))).run()
    return out


@pytest.fixture(scope="module")
def expert_parallel_run(corpus, tmp_path_factory) -> Path:
    """FSDP with the experts split over the two ranks, run to the end without interruption."""
    out = tmp_path_factory.mktemp("ep") / "run"
    config = write_toml(out.parent / "ep.toml", sections_for(corpus, out, parallel="fsdp", expert_parallel=2))
    train_ranks(config)
    return out


def test_fsdp_with_activation_checkpointing_follows_one_process(corpus, single, tmp_path):
    out = tmp_path / "fsdp"
    config = write_toml(tmp_path / "fsdp.toml", sections_for(corpus, out, parallel="fsdp",
                                                             activation_checkpointing=True))
    results = train_ranks(config)
    # The ranks' gradients are summed in another order than one process's: the norms after the first step differ in
    # their fifth digit on some CPUs (4e-5 at step 6 on an AMD EPYC of family 25, AVX2).
    assert_same_curve(log(single), log(out), grad_rel=1e-4)
    assert_same_weights(single / "model", out / "model")
    # Rank 0 says where the model is; the sharded state is one DCP directory with a shard per rank.
    assert f"model written to {out / 'model'}" in results[0][1]
    assert results[1][1] == ""
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["format"] == "dcp" and state["step"] == STEPS and state["world"] == 2
    assert sorted(p.name for p in (out / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_expert_parallel_follows_one_process(single, expert_parallel_run):
    # Two ranks reduce the experts' gradients in another order than one process: the losses agree to 1e-5 at every
    # step, the first step's gradient norm too; later ones to 1e-3 (measured: up to 1.2e-5 at step 6 on an AMD EPYC,
    # below 1e-5 on an Intel Xeon), far from the 2x of a wrong reduction.
    assert_same_curve(log(single), log(expert_parallel_run), grad_rel=1e-3)
    assert_same_weights(single / "model", expert_parallel_run / "model")


def test_expert_parallelism_composes_with_fsdp_over_the_other_dimension(corpus, single, tmp_path):
    """Four ranks as a 2 x 2 mesh: each expert group of 2 ranks splits the experts, and FSDP shards every
    expert shard again over the other 2 ("dp"); the curve and the exported weights are one process's."""
    out = tmp_path / "dp-ep"
    config = write_toml(tmp_path / "dp-ep.toml", sections_for(corpus, out, parallel="fsdp", expert_parallel=2))
    for code, _, err in finish(launch(config, ranks=4)):
        assert code == 0, err[-3000:]
    # Four-way reductions sum in another order than one process. The losses agree to 1e-5 at every step and the
    # first step's gradient norm too (a wrong reduction, such as an average computed as a sum, is off by 2x to
    # 4x); later gradient norms to 1e-2, because a rounding difference can flip a near-tie in the top-2 routing
    # of a token, which moves its experts' gradients and not the loss (measured: up to 3.3e-3, at step 6 on an AMD
    # EPYC; below 1e-3 on an Intel Xeon).
    assert_same_curve(log(single), log(out), grad_rel=1e-2)
    # The exported weights, likewise: where a flipped routing moved a step's update, a few entries differ by up to
    # 1.5e-4 after 8 steps (2 of 9,600 embedding entries on the AMD EPYC); a misplaced shard differs by the weights'
    # own scale, 2e-2.
    assert_same_weights(single / "model", out / "model", atol=1e-3)


@pytest.mark.oracle
def test_expert_parallel_export_gives_transformers_the_same_logits(expert_parallel_run):
    """The export gathered each layer's experts back into the full packed tensors, loadable by the reference."""
    pytest.importorskip("transformers")
    from oracle import load_reference
    from test_model_parity import assert_logits_close, dgemma_pass, inputs, reference_pass
    ours, ref = dgemma.load(expert_parallel_run / "model"), load_reference(expert_parallel_run / "model")
    assert ours.decoder.layers[0].experts.gate_up_proj.shape[0] == 4
    ids, mask, canvas, sc = inputs(300, 2, 20, 8, 0, torch.float32, True)
    with torch.no_grad():
        ref_enc, ref_dec, _ = reference_pass(ref, ids, mask, canvas, sc)
        our_enc, our_dec, _ = dgemma_pass(ours, ids, mask, canvas, sc)
    assert torch.equal(ref_dec, our_dec)
    assert_logits_close(our_enc, ref_enc, mask, torch.float32, "encoder")


def test_fsdp_lora_follows_one_process(corpus, single, tmp_path):
    def lora_sections(out: Path, **train) -> dict:
        sections = tiny_config(corpus, out, steps=4, save_interval=4, eval_interval=4, lr=1e-2, **train)
        sections["model"] = {"checkpoint": str(single / "model")}
        del sections["tokenizer"]
        sections["lora"] = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj", "gate_proj"],
                            "freeze_router": True}
        return sections

    one = Trainer(TrainConfig.from_sections(lora_sections(tmp_path / "one")))
    one.run()
    config = write_toml(tmp_path / "lora.toml", lora_sections(tmp_path / "two", parallel="fsdp"))
    train_ranks(config)
    assert_same_curve(log(tmp_path / "one"), log(tmp_path / "two"))
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model")
    before, after = dgemma.load(single / "model").state_dict(), dgemma.load(tmp_path / "two" / "model").state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(("q_proj.weight", "o_proj.weight", "gate_proj.weight")) for n in changed)


def test_killed_sharded_run_resumes_as_if_uninterrupted(corpus, expert_parallel_run, tmp_path):
    out = tmp_path / "killed"
    config = write_toml(tmp_path / "killed.toml", sections_for(corpus, out, parallel="fsdp", expert_parallel=2))
    processes = launch(config)
    state = out / "state" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.02)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    finish(processes)
    saved = json.loads(state.read_text())["step"]
    assert 2 <= saved < STEPS, "the run should be killed part-way"
    assert (out / "log.jsonl").is_file()

    results = train_ranks(config, "--resume")
    assert_same_curve(log(expert_parallel_run), log(out), rel=1e-6)
    assert_same_weights(expert_parallel_run / "model", out / "model", atol=1e-6)
    # Resuming the finished run does nothing and says so.
    results = train_ranks(config, "--resume")
    assert "finished" in results[0][1] and results[1][1] == ""


def test_fsdp_bf16_mixed_precision_tracks_one_process_bf16(corpus, tmp_path):
    """bf16 compute with fp32 master weights: FSDP gathers bf16 weights where one process autocasts fp32 ones, so
    the curves agree to bf16 rounding, not exactly; the exported weights stay fp32. Gradient norms are compared at the
    first step only: Adam's first update moves every weight by about lr x the sign of its gradient, so gradients near
    zero, whose sign bf16 rounding decides, take full-size steps, and the next norms drift by several percent in
    either run (at step 2, on an AMD EPYC of family 25 without AVX-512: one process in bf16 5.4 % from fp32, FSDP in
    bf16 1.6 %)."""
    one = Trainer(TrainConfig.from_sections(tiny_config(corpus, tmp_path / "one", steps=2, bf16=True))).run()
    config = write_toml(tmp_path / "bf16.toml", tiny_config(corpus, tmp_path / "two", steps=2, bf16=True,
                                                            parallel="fsdp", expert_parallel=2))
    train_ranks(config)
    two = log(tmp_path / "two")
    assert [b["step"] for b in two] == [a["step"] for a in one] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=2e-2)
    assert dgemma.load(tmp_path / "two" / "model").dtype == torch.float32


@pytest.mark.parametrize("parallel, expert_parallel, world, batch, message", [
    ("fsdp", 3, 3, 9, "expert_parallel = 3 does not divide the model's 4 experts"),
    ("fsdp", 2, 3, 6, "world size 3 .* is not a multiple of \\[train\\] expert_parallel = 2"),
    ("ddp", 2, 2, 8, "expert_parallel = 2 needs parallel = 'fsdp'"),
    ("fsdp", 1, 1, 8, "parallel = 'fsdp' shards the model across processes, but this is one process"),
    ("ddp", 1, 3, 8, "batch_size 8 is not a multiple of the world size 3"),
])
def test_impossible_layouts_are_refused(parallel, expert_parallel, world, batch, message):
    config = dgemma.ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": dict(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=16, num_experts=4, top_k_experts=2, moe_intermediate_size=8)})
    with pytest.raises(ValueError, match=message):
        check_parallel(parallel, expert_parallel, world, config, batch, "cpu")


def test_bad_layouts_fail_at_start_with_one_message(corpus, tmp_path):
    # One process asked to shard: refused before a model is built.
    sections = sections_for(corpus, tmp_path / "one", parallel="fsdp")
    with pytest.raises(ValueError, match="launch it with `torchrun"):
        Trainer(TrainConfig.from_sections(sections))
    # Two processes, experts that do not split: every rank stops at once with the same one-line error.
    config = write_toml(tmp_path / "bad.toml", sections_for(corpus, tmp_path / "two", parallel="fsdp",
                                                            expert_parallel=3))
    for code, _, err in finish(launch(config), timeout=120):
        assert code == 2
        assert err.strip().splitlines()[-1] == ("dgemma: error: [train] expert_parallel = 3 does not divide the "
                                                "model's 4 experts")
    assert not (tmp_path / "two").exists()
