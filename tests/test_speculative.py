"""Speculative decoding (`speculative_steps`): autoregressive samples verified from diffusion drafts. Its claim is
exactness: token for token what `autoregressive_steps` yields with the same generator, whatever the drafts, so the
tests compare the two over drafts that are mostly rejected (random models) and mostly kept (the bundled model at
temperature 0), through every logits processor, the token budget and EOS."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.checkpoints import bundled_model_dir
from dgemma.generation import SpeculativeStats, autoregressive_steps, speculative_steps
from dgemma.generation_config import GenerationConfig


def both(model, ids: torch.Tensor, budget: int, temperature: float, seed: int, draft: GenerationConfig,
         eos: list[int] | None = None, processors: GenerationConfig | None = None
         ) -> tuple[list[int], list[int], SpeculativeStats]:
    ar = list(autoregressive_steps(model, ids, budget, eos, temperature, torch.Generator().manual_seed(seed),
                                   processors=processors, exact=True))
    stats = SpeculativeStats()
    speculative = list(speculative_steps(model, ids, budget, eos, temperature, torch.Generator().manual_seed(seed),
                                         draft=draft, draft_generator=torch.Generator().manual_seed(seed + 1000),
                                         processors=processors, stats=stats))
    return ar, speculative, stats


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("name", ["moe", "moe_top3_bias"])
def test_speculative_decoding_yields_the_autoregressive_tokens(random_checkpoint, name, temperature):
    model = dgemma.load(random_checkpoint(name), dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    for seed, steps in ((0, 1), (1, 3)):
        draft = GenerationConfig(max_denoising_steps=steps).updated(entropy_bound=1.0)
        ar, speculative, stats = both(model, ids, 32, temperature, seed, draft)
        assert speculative == ar and len(ar) == 32
        assert stats.forwards == stats.decoder_passes + stats.encoder_passes
        assert stats.encoder_passes == stats.drafts and stats.decoder_passes <= steps * stats.drafts
        # after the prompt's token, every round yields its kept drafted tokens and one sampled token (the last
        # round none if the budget ended it on a kept token)
        assert len(ar) - 1 - stats.drafted_tokens_kept in (stats.drafts, stats.drafts - 1)


def test_drafts_of_a_trained_model_are_kept_and_the_tokens_stay_exact():
    model = dgemma.load(bundled_model_dir(), dtype=torch.float32)
    ids = torch.tensor([[2, 71, 1316, 15, 258, 1093, 2617]])
    config = model.generation_config
    ar, speculative, stats = both(model, ids, 48, 0.0, 0, config.updated(max_denoising_steps=2), config.eos_token_ids)
    assert speculative == ar
    assert stats.drafted_tokens_kept > 0  # greedy drafts agree with greedy decoding at some positions


def test_processors_budget_and_eos_are_those_of_autoregressive_decoding(random_checkpoint):
    model = dgemma.load(random_checkpoint("moe"), dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    draft = GenerationConfig(max_denoising_steps=2)
    processors = GenerationConfig(top_k=20, top_p=0.9, logit_bias={7: 3.0, 9: -100.0}, frequency_penalty=0.5,
                                  presence_penalty=0.3)
    ar, speculative, _ = both(model, ids, 30, 0.9, 4, draft, processors=processors)
    assert speculative == ar and 9 not in ar
    for budget in (1, 2, 17):
        ar, speculative, _ = both(model, ids, budget, 1.0, 2, draft)
        assert speculative == ar and len(ar) == budget
    eos = [ar[5]]  # a token the sample holds: both stop at its first appearance, with it
    ar, speculative, _ = both(model, ids, 17, 1.0, 2, draft, eos=eos)
    assert speculative == ar and ar[-1] == eos[0] and ar.count(eos[0]) == 1


def test_speculative_decoding_takes_one_sequence(random_checkpoint):
    model = dgemma.load(random_checkpoint("moe"), dtype=torch.float32)
    with pytest.raises(ValueError, match="speculative decoding takes one sequence"):
        list(speculative_steps(model, torch.ones(2, 3, dtype=torch.long), 4, draft=GenerationConfig()))
