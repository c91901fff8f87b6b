"""The engine on its own: groups that join, leave and differ in every setting give the tokens they give alone;
prompts and committed canvases that are due together are encoded in one forward."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.engine import CanvasCommitted, Engine, Group, until_eos

from conftest import exact_on_cpu_only

SETTINGS = [  # (prompt length, seed, generation overrides)
    (5, 1, dict(max_new_tokens=40, max_denoising_steps=4)),
    (11, 2, dict(max_new_tokens=16, max_denoising_steps=7, t_min=0.1, t_max=0.3, entropy_bound=2.0)),
    (3, 3, dict(max_new_tokens=24, max_denoising_steps=5, t_min=None, stability_threshold=None)),
    (8, 4, dict(max_new_tokens=33, max_denoising_steps=3, confidence_threshold=2.0, stability_threshold=0)),
]


@pytest.fixture
def model(random_checkpoint, device):
    return dgemma.load(random_checkpoint("moe"), device=device)


def prompt(length: int, seed: int) -> torch.Tensor:
    # On the CPU whatever the model's device: the engine moves prompts where they are needed.
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(100 + seed))


def alone(model, length: int, seed: int, overrides: dict, sampling: str = "fast") -> torch.Tensor:
    out = model.generate(prompt(length, seed), generator=torch.Generator().manual_seed(seed), sampling=sampling,
                         **overrides)
    return out.sequences[0, length:].cpu()


def run_engine(model, rows: int, arrivals: dict[int, list[int]], sampling: str = "fast",
               cancel: dict[int, int] | None = None, settings: list | None = None) -> dict[int, torch.Tensor]:
    """Step an engine, adding settings[i] (default SETTINGS) at the steps `arrivals` gives and cancelling per
    `cancel`."""
    settings = settings or SETTINGS
    engine = Engine(model, KVCache(model.config, rows, model.dtype, model.device, capacity=128, growable=False),
                    sampling)
    groups: dict[int, Group] = {}
    tokens: dict[int, list[torch.Tensor]] = {}
    step = 0
    while step == 0 or any(not (g.done or g.cancelled) for g in groups.values()) or any(s >= step for s in arrivals):
        for index in arrivals.get(step, []):
            length, seed, overrides = settings[index]
            config = model.generation_config.updated(**overrides)
            groups[index] = engine.add(Group(prompt(length, seed), config,
                                             generator=torch.Generator().manual_seed(seed)))
            tokens[index] = []
        for index, at in (cancel or {}).items():
            if at == step:
                engine.cancel(groups[index])
        for event in engine.step():
            if isinstance(event, CanvasCommitted):
                index = next(i for i, g in groups.items() if g is event.group)
                tokens[index].append(event.tokens[0].cpu())
        step += 1
    return {i: torch.cat(parts) if parts else torch.empty(0, dtype=torch.long) for i, parts in tokens.items()}


def test_groups_joining_at_different_steps_get_the_tokens_they_get_alone(model, device, request):
    exact_on_cpu_only(request, device)
    expected = {i: alone(model, *SETTINGS[i]) for i in range(len(SETTINGS))}
    got = run_engine(model, rows=3, arrivals={0: [0, 1], 2: [2], 9: [3]})
    for i in expected:
        assert torch.equal(got[i], expected[i][:len(got[i])]) and len(got[i]) == len(expected[i]), f"group {i}"


def test_reference_mode_groups_each_draw_their_own_numbers(model, device, request):
    exact_on_cpu_only(request, device)
    expected = {i: alone(model, *SETTINGS[i], sampling="reference") for i in (0, 1)}
    got = run_engine(model, rows=2, arrivals={0: [0, 1]}, sampling="reference")
    assert all(torch.equal(got[i], expected[i]) for i in expected)


def test_a_cancelled_group_frees_its_row_and_the_others_are_unaffected(model, device, request):
    exact_on_cpu_only(request, device)
    expected = {i: alone(model, *SETTINGS[i]) for i in (1, 2)}
    got = run_engine(model, rows=2, arrivals={0: [0, 1], 3: [2]}, cancel={0: 2})
    assert all(torch.equal(got[i], expected[i]) for i in expected)
    assert len(got[0]) < SETTINGS[0][2]["max_new_tokens"]


def test_prompts_and_commits_due_together_are_encoded_in_one_forward(model, monkeypatch):
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, plan, exact=True: calls.append(ids.shape) or encode(ids, plan,
                                                                                                        exact))
    config = model.generation_config.updated(max_new_tokens=32, max_denoising_steps=2, stability_threshold=None)
    engine = Engine(model, KVCache(model.config, 4, model.dtype, model.device, capacity=96, growable=False))
    for length in (3, 9, 5, 4):
        engine.add(Group(prompt(length, length), config, generator=torch.Generator().manual_seed(length)))
    engine.step()
    assert calls == [(4, 9)]  # four ragged prompts, one forward
    calls.clear()
    engine.step()  # every canvas ends after its second step
    engine.step()
    assert calls == [(4, model.config.canvas_length)]  # four committed canvases, one forward


def test_until_eos_keeps_the_end_token():
    assert until_eos([5, 6, 1, 7], [1, 9]) == ([5, 6, 1], True)
    assert until_eos([5, 6], [1]) == ([5, 6], False)


def test_a_group_whose_settings_cannot_be_written_takes_no_rows(random_checkpoint):
    """Engine.add fails before the group owns rows, so a bad group does not leave the engine short of rows."""
    model = dgemma.load(random_checkpoint("moe"))
    engine = Engine(model, KVCache(model.config, 2, model.dtype, model.device, capacity=64, growable=False))
    config = model.generation_config.updated(max_new_tokens=4, confidence_threshold=1e300)  # beyond fp32
    with pytest.raises(RuntimeError):
        engine.add(Group(torch.tensor([[2, 5, 6]]), config))
    assert engine.free_rows == 2 and not engine.groups


def test_do_sample_false_keeps_the_argmax_where_a_step_accepts(model):
    """Argmax sampling (OpenAI's temperature 0): every accepted position of the next canvas holds the step's
    argmax; with sampling at a high temperature some accepted positions hold other tokens."""
    def accepted_tokens(do_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        config = model.generation_config.updated(max_new_tokens=32, max_denoising_steps=4, t_min=2.0, t_max=3.0,
                                                 entropy_bound=50.0, stability_threshold=None, do_sample=do_sample)
        drafts = [e for e in dgemma.generation.generate_steps(model, prompt(6, 0), config,
                                                              generator=torch.Generator().manual_seed(0))
                  if isinstance(e, dgemma.generation.DraftStep)]
        return (torch.cat([d.canvas[d.accepted] for d in drafts]).cpu(),
                torch.cat([d.argmax[d.accepted] for d in drafts]).cpu())

    canvas, argmax = accepted_tokens(do_sample=False)
    assert canvas.numel() > 20 and torch.equal(canvas, argmax)
    canvas, argmax = accepted_tokens(do_sample=True)
    assert not torch.equal(canvas, argmax)
    with pytest.raises(ValueError, match="do_sample=False"):
        model.generate(prompt(4, 0), max_new_tokens=8, do_sample=False, sampling="reference")


# ---- logits processors and log-probabilities (issue 15) ------------------------------------------------------

CONTROLLED = [  # plain and controlled groups side by side
    (5, 1, dict(max_new_tokens=24, max_denoising_steps=4)),
    (7, 5, dict(max_new_tokens=32, max_denoising_steps=4, top_p=0.8, frequency_penalty=0.7, logit_bias={9: 2.0})),
    (4, 6, dict(max_new_tokens=24, max_denoising_steps=3, top_k=4, presence_penalty=1.5, logprobs=True)),
    (6, 7, dict(max_new_tokens=16, max_denoising_steps=5, t_min=None, top_k=30, top_p=0.9, logit_bias={3: -100.0})),
]


@pytest.mark.parametrize("sampling", ["fast", "reference"])
def test_controlled_and_plain_groups_together_get_the_tokens_they_get_alone(model, sampling):
    """Groups with a bias, penalties, top_k, top_p (through the sampler's controlled path) and plain groups, joining
    at different steps, give each the tokens it gives alone; the no-op values (top_p 1, top_k 0, no penalty)
    give exactly the plain tokens."""
    expected = {i: alone(model, *CONTROLLED[i], sampling=sampling) for i in range(len(CONTROLLED))}
    got = run_engine(model, rows=3, arrivals={0: [0, 1], 1: [2], 11: [3]}, sampling=sampling, settings=CONTROLLED)
    for i in expected:
        assert torch.equal(got[i], expected[i]), f"group {i}"
    assert not bool((expected[3] == 3).any())  # logit_bias -100 bans the token
    length, seed, overrides = CONTROLLED[0]
    no_ops = dict(overrides, top_p=1.0, top_k=0, frequency_penalty=0.0, presence_penalty=0.0, logit_bias={})
    assert torch.equal(alone(model, length, seed, no_ops, sampling), expected[0])


def test_penalties_count_the_tokens_committed_so_far(model):
    """After each commit the group's bias is logit_bias - frequency_penalty * c - presence_penalty * (c > 0), c
    counting the tokens committed so far (the prompt excluded); the first canvas has logit_bias alone."""
    config = model.generation_config.updated(max_new_tokens=48, max_denoising_steps=2, stability_threshold=None,
                                             logit_bias={4: 1.5, 9: -2.0}, frequency_penalty=0.5,
                                             presence_penalty=0.25)
    engine = Engine(model, KVCache(model.config, 2, model.dtype, model.device, capacity=96, growable=False))
    ids = prompt(6, 0)
    ids[0, :3] = 4  # prompt tokens do not count
    group = engine.add(Group(ids, config, generator=torch.Generator().manual_seed(0)))
    base = torch.zeros(model.config.vocab_size)
    base[4], base[9] = 1.5, -2.0
    row = group.rows[0]
    assert torch.equal(engine.bias[row].cpu(), base)
    commits = 0
    while commits < 2:
        commits += sum(isinstance(e, CanvasCommitted) for e in engine.step())
    counts = torch.bincount(group.sequences[0, ids.shape[1]:].cpu(), minlength=model.config.vocab_size).float()
    assert counts.sum() == 2 * model.config.canvas_length
    assert torch.equal(engine.bias[row].cpu(), base - 0.5 * counts - 0.25 * (counts > 0))


def test_logprobs_are_those_of_the_last_step_that_ran_for_each_row(random_checkpoint):
    """Each committed token's log-probability is log_softmax of the processed logits of the last step its row ran
    (a row that stopped early: its stopping step), at that step's temperature; the top alternatives come from
    the same distribution. Rows of one batch stop at different steps here."""
    from dgemma.sampling import temperature_at
    model = dgemma.load(random_checkpoint("stable"))
    with torch.no_grad():  # a decoder blind to the canvas (as the oracle's "stable" model): canvases settle
        embed = model.decoder.embed_tokens.weight
        embed.copy_(embed[0:1] + 0.01 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)))
        model.lm_head.weight.mul_(2.0)
    states = []
    decode = model.decode
    model.decode = lambda *args, **kwargs: states.append(decode(*args, **kwargs)) or states[-1]
    config = model.generation_config.updated(max_new_tokens=32, max_denoising_steps=12, confidence_threshold=2.0,
                                             logprobs=True, top_logprobs=3)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    events = list(dgemma.generation.generate_steps(model, ids, config, generator=torch.Generator().manual_seed(1)))
    drafts = [e for e in events if isinstance(e, dgemma.generation.DraftStep)]
    commits = [e for e in events if isinstance(e, CanvasCommitted)]
    output = events[-1]
    last_steps = set()
    for commit in commits:
        steps = [(d, states[i]) for i, d in enumerate(drafts) if d.canvas_index == commit.canvas_index]
        for row in range(2):
            # the row's last step: the first one after which it had stopped, or the canvas's last
            last = next(((d, h) for d, h in steps if bool(d.finished_denoising[row])), steps[-1])
            last_steps.add((commit.canvas_index, row, last[0].step))
            temperature = temperature_at(config.max_denoising_steps - last[0].step + 1, config.max_denoising_steps,
                                         config.t_min, config.t_max)
            logprobs = torch.log_softmax(model.logits(last[1][row]) / temperature, dim=-1)
            tokens = commit.tokens[row]
            real = ~torch.isnan(commit.logprobs[row])
            torch.testing.assert_close(commit.logprobs[row][real], logprobs.gather(-1, tokens[:, None])[real, 0],
                                       atol=1e-5, rtol=1e-5)
            best = torch.topk(logprobs, 3, dim=-1)
            torch.testing.assert_close(commit.top_logprobs[row][:len(tokens)], best.values[:len(tokens)],
                                       atol=1e-5, rtol=1e-5)
    assert len({step for _, _, step in last_steps}) > 1, "the test needs rows that stop at different steps"
    assert output.logprobs.shape == output.sequences[:, ids.shape[1]:].shape
    assert output.top_logprobs.shape[-1] == 3 and bool((output.logprobs[~output.logprobs.isnan()] <= 0).all())


GUIDED = [  # SETTINGS with guidance on the prompt, beside one without
    (5, 1, dict(max_new_tokens=40, max_denoising_steps=4, guidance_scale=2.0)),
    (11, 2, dict(max_new_tokens=16, max_denoising_steps=7, t_min=0.1, t_max=0.3, entropy_bound=2.0)),
    (8, 4, dict(max_new_tokens=33, max_denoising_steps=3, guidance_scale=1.5)),
]


def test_guided_and_unguided_groups_together_get_the_tokens_they_get_alone(model, device, request):
    exact_on_cpu_only(request, device)
    expected = {i: alone(model, *GUIDED[i]) for i in range(len(GUIDED))}
    got = run_engine(model, rows=3, arrivals={0: [0, 1], 3: [2]}, settings=GUIDED)
    for i in expected:
        assert torch.equal(got[i], expected[i]), f"group {i}"
    assert not torch.equal(expected[0], alone(model, 5, 1, dict(max_new_tokens=40, max_denoising_steps=4)))


def test_guidance_mixes_the_states_after_the_prompt_with_those_after_bos_alone(model, device, request, monkeypatch):
    """The oracle: two unguided groups with one seed, one after the prompt and one after BOS alone, whose decoder
    states are replaced, every step, by h_bos + scale * (h - h_bos) of the pair; both then sample and commit the
    same tokens. The guided group gives those tokens, in twice the decoder passes."""
    exact_on_cpu_only(request, device)
    scale, ids = 2.5, prompt(6, 7)
    config = model.generation_config.updated(max_new_tokens=40, max_denoising_steps=5)
    guided = model.generate(ids, generator=torch.Generator().manual_seed(7), guidance_scale=scale,
                            max_new_tokens=40, max_denoising_steps=5)
    decode = model.decode

    def mixed(canvas, plan, soft=None, exact=True):
        h = decode(canvas, plan, soft, exact)
        both = h[1] + scale * (h[0] - h[1])
        return torch.stack((both, both))

    monkeypatch.setattr(model, "decode", mixed)
    engine = Engine(model, KVCache(model.config, 2, model.dtype, model.device, capacity=128))
    pair = [engine.add(Group(first, config, generator=torch.Generator().manual_seed(7)))
            for first in (ids, torch.tensor([[model.config.bos_token_id]]))]
    while not all(group.done for group in pair):
        engine.step()
    # (a group's sequences hold whole canvases; generate cuts them to the budget)
    with_prompt, with_bos = (group.sequences[0, group.prompt_length:][:40].cpu() for group in pair)
    assert torch.equal(with_prompt, with_bos)
    assert torch.equal(guided.sequences[0, ids.shape[1]:].cpu(), with_prompt)
    assert guided.decoder_forward_passes.tolist() == [2 * int(pair[0].passes[0])]


def test_guidance_is_checked_and_needs_fast_sampling(model):
    for bad in (0.5, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="guidance_scale"):
            model.generation_config.updated(guidance_scale=bad)
    with pytest.raises(ValueError, match="guidance_scale needs sampling='fast'"):
        model.generate(prompt(4, 0), guidance_scale=2.0, sampling="reference", max_new_tokens=8)
    assert "guidance_scale" not in model.generation_config.updated(guidance_scale=3.0).to_dict()  # per call
