"""`dgemma train` on a tiny model: learning, export, resume after SIGKILL, two processes, LoRA, chat data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.recipes.bpe import train_tokenizer
from dgemma.training.trainer import TrainConfig, Trainer, learning_rate

WORDS = ("the house was quiet and the evening came on slowly while she read her letters by the window "
         "he said that nothing could be done before the morning and they walked along the river").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 700 KB of word salad with a little structure, so that the held-out split is not empty."""
    directory = tmp_path_factory.mktemp("corpus")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(12000):
        picks = torch.randint(0, len(WORDS), (10,), generator=gen).tolist()
        lines.append(" ".join(WORDS[p] for p in sorted(picks)) + ".")
        if i % 5 == 4:
            lines.append("")
    (directory / "salad.txt").write_text("\n".join(lines))
    train_tokenizer([(directory / "salad.txt").read_text()[:200_000]], 300, directory / "tokenizer")
    return directory


def tiny_config(corpus: Path, out: Path, **train) -> dict:
    sections = {
        "model": {"config": {"canvas_length": 8, "text_config": dict(
            vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, layer_types=["sliding_attention", "full_attention"],
            sliding_window=16, per_layer_config={"1": {"head_dim": 16, "num_key_value_heads": 1}},
            num_experts=4, top_k_experts=2, moe_intermediate_size=16, pad_token_id=0, eos_token_id=1,
            bos_token_id=2)}},
        "tokenizer": {"path": str(corpus / "tokenizer")},
        "data": {"kind": "text", "corpus_dir": str(corpus), "window": 40},
        "train": {"out_dir": str(out), "steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3,
                  "min_lr": 3e-4, "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2, "save_interval": 2,
                  "log_interval": 1, "threads": 1, **train},
        "generation": {"eos_token_id": [1, 5], "pad_token_id": 0, "max_new_tokens": 16, "max_denoising_steps": 4},
    }
    return sections


def write_toml(path: Path, sections: dict) -> Path:
    def value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = []

    def emit(prefix, table):
        scalars = {k: v for k, v in table.items() if not (isinstance(v, dict) and k in ("config", "text_config"))}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict) and k in ("config", "text_config"):
                emit(f"{prefix}.{k}", v)

    for name, table in sections.items():
        emit(name, table)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    config = TrainConfig(out_dir="x", model_config={}, steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 10) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=1e-3)


def test_training_lowers_held_out_loss_and_exports_a_loadable_checkpoint(corpus, tmp_path):
    config = TrainConfig.from_sections(tiny_config(corpus, tmp_path / "run", steps=30, eval_interval=30,
                                                   save_interval=30, eval_batches=4))
    trainer = Trainer(config)
    before = trainer.evaluate()
    history = trainer.run()
    after = history[-1]
    assert after["eval_diffusion_loss"] < before["eval_diffusion_loss"] - 0.5
    assert after["eval_encoder_loss"] < before["eval_encoder_loss"] - 0.5
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model = dgemma.load(tmp_path / "run" / "model")
    assert model.generation_config.eos_token_ids == [1, 5]
    out = model.generate(torch.tensor([[2, 40, 41]]), max_new_tokens=16)
    assert out.sequences.shape[1] <= 19
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "run" / "model" / name).is_file()


@pytest.mark.oracle
def test_exported_checkpoint_loads_in_transformers_with_identical_logits(corpus, tmp_path):
    pytest.importorskip("transformers")
    from oracle import load_reference
    from test_model_parity import dgemma_pass, inputs, reference_pass
    trainer = Trainer(TrainConfig.from_sections(tiny_config(corpus, tmp_path / "run", steps=2)))
    trainer.run()
    ours, ref = dgemma.load(tmp_path / "run" / "model"), load_reference(tmp_path / "run" / "model")
    ids, mask, canvas, sc = inputs(300, 2, 20, 8, 0, torch.float32, True)
    with torch.no_grad():
        ref_enc, ref_dec, _ = reference_pass(ref, ids, mask, canvas, sc)
        our_enc, our_dec, _ = dgemma_pass(ours, ids, mask, canvas, sc)
    assert torch.equal(ref_dec, our_dec)


def run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "dgemma", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_follows_the_uninterrupted_trajectory(corpus, tmp_path):
    straight = Trainer(TrainConfig.from_sections(tiny_config(corpus, tmp_path / "straight", steps=8))).run()

    config = write_toml(tmp_path / "killed.toml", tiny_config(corpus, tmp_path / "killed", steps=8))
    process = run_cli(["train", "--config", str(config)])
    state = tmp_path / "killed" / "state" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = json.loads(state.read_text())["step"]
    assert 4 <= saved_step < 8, "the run should be killed part-way"
    resumed = Trainer(TrainConfig.from_file(config), resume=True)
    assert resumed.step == saved_step
    history = resumed.run()
    assert [r["step"] for r in history] == list(range(1, 9))
    for a, b in zip(straight, history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), a["step"]
    final_straight = dgemma.load(tmp_path / "straight" / "model").state_dict()
    final_resumed = dgemma.load(tmp_path / "killed" / "model").state_dict()
    for name in final_straight:
        torch.testing.assert_close(final_straight[name], final_resumed[name], atol=1e-6, rtol=1e-5)


def test_two_processes_match_one_with_the_same_global_batch(corpus, tmp_path):
    single = Trainer(TrainConfig.from_sections(tiny_config(corpus, tmp_path / "one", steps=3, save_interval=3))).run()
    config = write_toml(tmp_path / "two.toml", tiny_config(corpus, tmp_path / "two", steps=3, save_interval=3))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "dgemma", "train", "--config", str(config)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    result = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(single, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    one_model = dgemma.load(tmp_path / "one" / "model").state_dict()
    two_model = dgemma.load(tmp_path / "two" / "model").state_dict()
    for name in one_model:
        torch.testing.assert_close(one_model[name], two_model[name], atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    """Also with the decoder reading its own samples: they are drawn per example, so micro-batching cannot change
    them, and the rule reaches the objective (the loss differs from the recipe's)."""
    def run(name: str, micro: int, own: float) -> list[dict]:
        sections = tiny_config(corpus, tmp_path / name, steps=2, micro_batch_size=micro, own_samples_prob=own)
        return Trainer(TrainConfig.from_sections(sections)).run()

    for own in (0.0, 1.0):
        big, small = run(f"a{own}", 8, own), run(f"b{own}", 2, own)
        for a, b in zip(big, small):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if own:
            assert abs(big[0]["diffusion_loss"] - recipe[0]["diffusion_loss"]) > 1e-3
        recipe = big


def test_lora_fine_tune_trains_adapters_only_and_exports_merged_weights(corpus, tmp_path):
    Trainer(TrainConfig.from_sections(tiny_config(corpus, tmp_path / "base", steps=2))).run()
    base = tmp_path / "base" / "model"
    sections = tiny_config(corpus, tmp_path / "lora", steps=4, lr=1e-2)
    sections["model"] = {"checkpoint": str(base)}
    del sections["tokenizer"]
    sections["lora"] = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj"], "freeze_router": True}
    trainer = Trainer(TrainConfig.from_sections(sections))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.run()
    before, after = dgemma.load(base).state_dict(), dgemma.load(tmp_path / "lora" / "model").state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(("q_proj.weight", "o_proj.weight")) for n in changed)
    assert not any("router" in n for n in changed)


def test_chat_data_trains_on_the_assistant_turn(corpus, tmp_path):
    from dgemma.tokenizer import Tokenizer
    from dgemma.training.data import ChatExamples
    lines = [json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                      {"role": "assistant", "content": f"{w} {w}"}]}) for w in WORDS[:6]]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines))
    tok = Tokenizer.from_directory(corpus / "tokenizer")
    examples = ChatExamples.from_jsonl(tmp_path / "chat.jsonl", tok, eos_id=1).examples_list
    first = examples[0]
    assert tok.decode(first.prompt, skip_special_tokens=False).endswith("<|turn>model\n")
    assert tok.decode(first.response, skip_special_tokens=False) == f"{WORDS[0]} {WORDS[0]}<turn|>\n<eos>"
    assert not first.encoder_loss_on_prompt
    sections = tiny_config(corpus, tmp_path / "sft", steps=2)
    sections["data"] = {"kind": "chat", "train_jsonl": str(tmp_path / "chat.jsonl")}
    assert Trainer(TrainConfig.from_sections(sections)).run()[-1]["encoder_loss"] > 0
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*end with an assistant message"):
        ChatExamples.from_jsonl(tmp_path / "bad.jsonl", tok, eos_id=1)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["train"].update(warp_speed=True), "unknown training config keys: \\['warp_speed'\\]"),
    (lambda s: s["model"].update(checkpoint="x"), "exactly one of"),
    (lambda s: s["train"].update(batch_size=6, micro_batch_size=4), "not a multiple"),
    (lambda s: s["data"].update(kind="images"), "data.kind"),
    (lambda s: s["data"].update(prompt_cut="anywhere"), "prompt_cut must be one of \\('aligned', 'any'\\)"),
    (lambda s: s["data"].update(response_canvases="all"), "response_canvases must be one of"),
    (lambda s: s["train"].update(t_power=0), "t_power must be positive"),
    (lambda s: s["train"].update(own_samples_prob=1.5), "own_samples_prob must be in \\[0, 1\\], got 1.5"),
])
def test_bad_training_configs_are_refused(corpus, tmp_path, mutate, message):
    sections = tiny_config(corpus, tmp_path / "x")
    mutate(sections)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_sections(sections)


def test_the_repository_training_configs_parse():
    """Every config under configs/ (the documented commands that rebuild the bundled model and the experiments)
    is a valid training config, its data rules included."""
    paths = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))
    assert len(paths) >= 5
    cuts = {path.name: TrainConfig.from_file(path).prompt_cut for path in paths}
    assert cuts["bundled_short_prompts.toml"] == "any" and cuts["bundled_distill.toml"] == "aligned"
    assert TrainConfig.from_file(paths[0].parent / "bundled_own_samples.toml").own_samples_prob == 0.5


def test_a_run_is_not_started_over_by_accident_and_resume_says_what_it_does(corpus, tmp_path, capsys):
    from dgemma.training.trainer import main
    out = tmp_path / "run"
    config = write_toml(tmp_path / "run.toml", tiny_config(corpus, out, steps=2))
    with pytest.raises(ValueError, match="holds no saved training state to resume"):
        main(str(config), resume=True)
    assert main(str(config)) == 0
    assert f"model written to {out / 'model'}" in capsys.readouterr().out
    def curve():
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"}
                for line in (out / "log.jsonl").read_text().splitlines()]

    first = curve()
    with pytest.raises(ValueError, match="already holds a training run .*pass --resume to continue it or "
                                         "--overwrite to delete it and start over"):
        main(str(config))
    assert main(str(config), resume=True) == 0  # finished: nothing to do
    assert "is finished (2 of 2 steps): nothing to resume" in capsys.readouterr().out
    assert curve() == first
    assert main(str(config), overwrite=True) == 0  # starts over: one fresh curve, not two
    assert curve() == first


def test_model_and_state_are_readable_by_others(corpus, tmp_path):
    previous = os.umask(0o022)
    try:
        Trainer(TrainConfig.from_sections(tiny_config(corpus, tmp_path / "run", steps=2))).run()
    finally:
        os.umask(previous)
    for directory in (tmp_path / "run" / "model", tmp_path / "run" / "state"):
        assert directory.stat().st_mode & 0o777 == 0o755, directory
        for path in directory.iterdir():
            assert path.stat().st_mode & 0o044 == 0o044, path


def test_device_setting_is_checked_and_cpu_is_the_default(corpus, tmp_path):
    config = TrainConfig.from_sections(tiny_config(corpus, tmp_path / "run"))
    assert config.device == "cpu" and config.parallel == "ddp"
    sections = tiny_config(corpus, tmp_path / "run", device="tpu")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'mps'"):
        TrainConfig.from_sections(sections)


def test_quickstart_config_trains_from_files_in_the_repository(tmp_path):
    repo = Path(__file__).parents[1]
    config = TrainConfig.from_file(repo / "configs" / "quickstart.toml")
    assert Path(config.text_file).is_file() and (Path(config.tokenizer) / "tokenizer.json").is_file()
    assert Path(config.out_dir) == Path(os.path.normpath(repo / "runs" / "quickstart"))
    config.out_dir, config.steps, config.eval_interval, config.save_interval = str(tmp_path / "q"), 3, 3, 3
    config.threads = 1
    history = Trainer(config).run()
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["eval_diffusion_loss"] > 0  # the held-out paragraph exists
    model = dgemma.load(tmp_path / "q" / "model")
    out = model.generate(torch.tensor([[2, 100, 200]]), max_new_tokens=16, sampling="reference")
    assert out.sequences.shape[1] <= 19


def test_a_config_that_does_not_parse_is_named(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 3\n")
    with pytest.raises(ValueError, match="broken.toml is not a valid TOML file"):
        TrainConfig.from_file(broken)
