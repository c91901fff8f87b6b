"""Generation parameters: defaults, overrides, and the reference's validation rules."""

from __future__ import annotations

import logging

import pytest
import torch

import dgemma
from dgemma.generation_config import EntropyBoundSamplerConfig, GenerationConfig


@pytest.mark.parametrize("overrides, message", [
    (dict(max_denoising_steps=0), "max_denoising_steps` must be a positive integer"),
    (dict(max_denoising_steps=2.5), "max_denoising_steps` must be a positive integer"),
    (dict(entropy_bound=0.0), "entropy_bound` must be a float > 0"),
    (dict(t_min=-0.1), "t_min` must be >= 0.0"),
    (dict(t_min=0.9, t_max=0.8), "t_max` must be > `t_min"),
    (dict(stability_threshold=-1), "stability_threshold` must be an integer >= 0"),
    (dict(confidence_threshold=0), "confidence_threshold` must be a float > 0"),
    (dict(max_new_tokens=0), "max_new_tokens` must be a positive integer"),
    (dict(max_length=-3), "max_length` must be a positive integer"),
    (dict(top_p=1.5), "top_p` must be a number from 0 to 1"),
    (dict(min_p=0.1), "Unexpected generation arguments: \\['min_p'\\]"),
])
def test_invalid_parameters_are_refused_with_the_reference_meaning(overrides, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig().updated(**overrides)


def test_none_disables_adaptive_stopping_and_json_null_means_default():
    assert GenerationConfig().updated(stability_threshold=None).stability_threshold is None
    assert GenerationConfig.from_dict({"stability_threshold": None, "max_denoising_steps": 16}).stability_threshold == 1
    config = GenerationConfig.from_dict({"sampler_config": {"entropy_bound": 0.25, "_cls_name":
                                                            "EntropyBoundSamplerConfig"}})
    assert config.entropy_bound == 0.25
    assert GenerationConfig().updated(sampler_config=EntropyBoundSamplerConfig(0.3)).entropy_bound == 0.3
    assert GenerationConfig.from_dict(config.to_dict()) == config


def test_max_new_tokens_is_exact_and_runs_stop_when_rows_finish(random_checkpoint):
    model = dgemma.load(random_checkpoint("moe"))
    prompt = torch.tensor([[3, 4, 5]])
    for budget in (1, 15, 16, 17, 40):
        out = model.generate(prompt, max_new_tokens=budget, max_denoising_steps=2)
        assert out.sequences.shape == (1, 3 + budget)
    out = model.generate(prompt, max_length=12, max_denoising_steps=2)
    assert out.sequences.shape == (1, 12)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompt, max_length=3)


def test_bad_generate_inputs_are_named(random_checkpoint):
    model = dgemma.load(random_checkpoint("moe"))
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[3, 4, 500]]))
    with pytest.raises(ValueError, match="attention_mask.*2D"):
        model.generate(torch.tensor([[3, 4, 5]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="sampling"):
        model.generate(torch.tensor([[3, 4, 5]]), sampling="greedy")


def test_vision_weights_are_skipped_with_one_notice(checkpoint_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        dgemma.load(checkpoint_dir("moe"))
    notices = [r.getMessage() for r in caplog.records if "vision" in r.getMessage()]
    assert len(notices) == 1 and "skipped 16 vision tensors" in notices[0]


def test_explicit_generator_makes_runs_repeatable_and_independent_of_global_seed(random_checkpoint):
    model = dgemma.load(random_checkpoint("moe"))
    prompt = torch.tensor([[3, 4, 5]])
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(model.generate(prompt, max_new_tokens=16, max_denoising_steps=3,
                                   generator=torch.Generator().manual_seed(42)).sequences)
    assert torch.equal(runs[0], runs[1])
