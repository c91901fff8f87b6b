"""`sampling="reference"` is token-identical to transformers' generate() under the same seed."""

from __future__ import annotations

import pytest
import torch

import dgemma

pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle
from conftest import exact_on_cpu_only  # noqa: E402
from oracle import load_reference  # noqa: E402
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig  # noqa: E402

CASES = {
    # name: (checkpoint, batch, prompt length, max_new_tokens, generation overrides)
    "fixed-steps-multi-canvas": ("moe", 1, 5, 48, dict(max_denoising_steps=4, stability_threshold=None)),
    "adaptive-stopping": ("stable", 2, 20, 48, dict(max_denoising_steps=12, confidence_threshold=1.0)),
    "stability-2": ("stable", 2, 9, 32, dict(max_denoising_steps=10, stability_threshold=2,
                                             confidence_threshold=1.2)),
    "stability-0": ("stable", 2, 9, 32, dict(max_denoising_steps=10, stability_threshold=0,
                                             confidence_threshold=1.0)),
    "eos-and-pad": ("stable", 2, 7, 64, dict(max_denoising_steps=5, eos_token_id=[90, 20], pad_token_id=0,
                                             confidence_threshold=1.0)),
    "sliding-window-prompt": ("moe", 2, 30, 32, dict(max_denoising_steps=3)),
    "no-temperature": ("untied", 2, 12, 32, dict(max_denoising_steps=3, t_min=None, stability_threshold=None)),
    # The reference's own sampler-config object is accepted as is.
    "budget-not-a-canvas-multiple": ("vision_flag", 1, 10, 21, dict(max_denoising_steps=6,
                                                                     sampler_config=EntropyBoundSamplerConfig(0.5))),
}


def padded_prompt(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:  # left padding on the second row
        mask[1, :3], ids[1, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_mode_is_token_identical(checkpoint_dir, case, dtype, device, request):
    exact_on_cpu_only(request, device)
    name, batch, prompt_len, budget, overrides = CASES[case]
    path = checkpoint_dir(name)
    ref, ours = load_reference(path, dtype, device), dgemma.load(path, dtype=dtype, device=device)
    for seed in range(3):
        ids, mask = (t.to(device) for t in padded_prompt(batch, prompt_len, ours.config.vocab_size, seed))
        torch.manual_seed(seed)
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=budget, **overrides)
        torch.manual_seed(seed)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=budget, sampling="reference", **overrides)
        assert got.sequences.shape[1] <= prompt_len + budget, "never more than max_new_tokens"
        assert torch.equal(got.sequences, expected.sequences[:, :prompt_len + budget]), f"seed {seed}"


@pytest.mark.parametrize("case", ["adaptive-stopping", "eos-and-pad"])
def test_cases_exercise_what_they_claim(checkpoint_dir, case):
    """The identity above covers stopping and EOS only if they happen: rows stop at different steps, and a row
    ends before the budget while the other goes on."""
    name, batch, prompt_len, budget, overrides = CASES[case]
    ours = dgemma.load(checkpoint_dir(name))
    ids, mask = padded_prompt(batch, prompt_len, ours.config.vocab_size, 0)
    config = ours.generation_config.updated(max_new_tokens=budget, **overrides)
    drafts, commits = [], []
    for event in dgemma.generation.generate_steps(ours, ids, config, mask, sampling="reference"):
        if isinstance(event, dgemma.generation.DraftStep):
            drafts.append(event.finished_denoising)
        elif isinstance(event, dgemma.generation.CanvasCommitted):
            commits.append(event.finished)
    assert any(bool(f.any()) and not bool(f.all()) for f in drafts), "rows should stop at different steps"
    if case == "adaptive-stopping":
        assert len(drafts) < len(commits) * overrides["max_denoising_steps"], "some canvas should end early"
    else:
        assert any(bool(f.any()) and not bool(f.all()) for f in commits), "one row should end before the other"


def test_continuation_from_returned_cache_matches_reference(checkpoint_dir):
    """Multi-turn: a second generate() on the returned cache, given only the uncached tokens, as in transformers."""
    path = checkpoint_dir("moe")
    ref, ours = load_reference(path), dgemma.load(path)
    ids, _ = padded_prompt(1, 6, ours.config.vocab_size, 1)
    kwargs = dict(max_new_tokens=32, max_denoising_steps=4)
    torch.manual_seed(7)
    first_ref = ref.generate(ids, **kwargs)
    ref_cached = first_ref.past_key_values.get_seq_length()  # the last canvas is not encoded yet
    follow_ref = ref.generate(torch.cat([first_ref.sequences[:, ref_cached:], ids], dim=1),
                              past_key_values=first_ref.past_key_values, **kwargs)
    torch.manual_seed(7)
    first = ours.generate(ids, sampling="reference", **kwargs)
    assert first.past_key_values.get_seq_length() == ref_cached
    follow = ours.generate(torch.cat([first.sequences[:, first.past_key_values.get_seq_length():], ids], dim=1),
                           past_key_values=first.past_key_values, sampling="reference", **kwargs)
    assert torch.equal(first.sequences, first_ref.sequences)
    assert torch.equal(follow.sequences, follow_ref.sequences)


def test_generation_config_json_supplies_defaults(checkpoint_dir, tmp_path):
    """generation_config.json (with its EntropyBoundSamplerConfig) is read by both, so defaults agree."""
    import shutil
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("moe"), path)
    ref = load_reference(path)
    ref.generation_config.max_denoising_steps = 5
    ref.generation_config.t_max = 0.9
    ref.generation_config.eos_token_id = [4, 8]
    ref.generation_config.pad_token_id = 0
    ref.generation_config.sampler_config = EntropyBoundSamplerConfig(0.3)
    ref.generation_config.save_pretrained(path)
    ref, ours = load_reference(path), dgemma.load(path)
    assert ours.generation_config.max_denoising_steps == 5 and ours.generation_config.entropy_bound == 0.3
    ids, _ = padded_prompt(1, 8, ours.config.vocab_size, 2)
    torch.manual_seed(3)
    expected = ref.generate(ids, max_new_tokens=32)
    torch.manual_seed(3)
    got = ours.generate(ids, max_new_tokens=32, sampling="reference")
    assert torch.equal(got.sequences, expected.sequences)
