"""Each rule of the training objective, and the loss against the reference model's own forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

import dgemma
from dgemma.training.data import TextWindows, example_generator, lay_out
from dgemma.training.objective import (Example, Noise, OwnSamples, canvas_layout, collate, corrupt, diffusion_loss,
                                       draw_noise, trained_canvases, with_own_samples)

EOS, PAD = 1, 0


def test_response_is_cut_into_canvases_and_the_last_is_filled_with_eos():
    assert canvas_layout([5, 6, 7], 4, EOS) == [5, 6, 7, EOS]
    assert canvas_layout([5, 6, 7, 8], 4, EOS) == [5, 6, 7, 8]  # an exact fit gets no extra canvas
    assert canvas_layout(list(range(10, 19)), 4, EOS) == list(range(10, 19)) + [EOS] * 3
    batch = collate([Example([2, 3], [5, 6, 7]), Example([2], list(range(10, 19)), encoder_loss_on_prompt=False)],
                    4, EOS, PAD)
    assert batch.num_canvases.tolist() == [1, 3]
    assert batch.input_ids[0].tolist() == [2, 3, 5, 6, 7, EOS] + [PAD] * 7  # canvases past the last are padding
    assert batch.valid[0].tolist() == [True] * 6 + [False] * 7
    # Encoder targets: text learns every next token; chat learns the response only; EOS fill is not a target.
    assert batch.encoder_targets[0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert batch.encoder_targets[1].nonzero().flatten().tolist() == list(range(1, 10))


def test_corruption_rate_matches_t_and_noise_is_uniform():
    canvas = torch.zeros(200_000, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for t in (0.05, 0.5, 0.95):
        noisy, replaced = corrupt(canvas, t, 50, gen)
        assert abs(replaced.float().mean().item() - t) < 0.005
        assert torch.equal(noisy[~replaced], canvas[~replaced])
    counts = torch.bincount(noisy[replaced], minlength=50).numpy()
    assert chisquare(counts).pvalue > 1e-3


def test_noise_draws_canvas_uniformly_t_in_range_and_self_conditioning_half_the_time():
    batch = collate([Example([2], list(range(10, 30)))] * 4000, 4, EOS, PAD)  # 5 canvases each
    gens = [example_generator(0, 0, i, "noise") for i in range(4000)]
    noise = draw_noise(batch, 4, 50, gens, eps=1e-3, self_conditioning_prob=0.5)
    assert noise.chosen.shape == (4000, 1) and noise.noisy.shape == (4000, 1, 4)
    assert chisquare(torch.bincount(noise.chosen[:, 0], minlength=5).numpy()).pvalue > 1e-3
    assert noise.t.min() >= 1e-3 and noise.t.max() < 1.0 and abs(noise.t.mean().item() - 0.5) < 0.02
    assert abs(noise.use_self_conditioning.float().mean().item() - 0.5) < 0.03
    # The same (seed, step, example) always draws the same noise.
    again = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(4000)], 1e-3, 0.5)
    assert torch.equal(again.noisy, noise.noisy)


def test_t_power_puts_more_canvases_near_pure_noise_and_corrupts_at_that_rate():
    """t = 1 - (1 - u)^p: P(t > 0.9) = 0.1^(1/p); p = 1 is the recipe's uniform t, draw for draw."""
    batch = collate([Example([2], list(range(10, 30)))] * 4000, 4, EOS, PAD)
    uniform = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(4000)], 1e-3, 0.5)
    same = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(4000)], 1e-3, 0.5,
                      t_power=1.0)
    assert torch.equal(same.t, uniform.t) and torch.equal(same.noisy, uniform.noisy)
    noisier = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(4000)], 1e-3, 0.5,
                         t_power=3.0)
    assert abs((noisier.t > 0.9).float().mean().item() - 0.1 ** (1 / 3)) < 0.03
    assert abs((uniform.t > 0.9).float().mean().item() - 0.1) < 0.02
    assert noisier.t.min() >= 1e-3 and noisier.t.max() <= 1.0
    # The corruption follows the drawn t: the share of replaced tokens (a replacement can draw the same token,
    # 1 in 50) is about t * 49 / 50 on average.
    clean = batch.input_ids[:, 1:21].view(-1, 5, 4).gather(1, noisier.chosen[:, :, None].expand(-1, -1, 4))
    changed = (noisier.noisy != clean).float().mean()
    assert abs(changed.item() - noisier.t.mean().item() * 49 / 50) < 0.02


def test_own_samples_fill_the_lowest_entropy_share_of_the_corrupted_positions_with_draws_from_the_logits():
    """Under own_samples_prob the second pass's canvas keeps every clean position, puts a draw from the first pass's
    logits at round(share x corrupted) corrupted positions, the most confident first, and leaves the rest as noise."""
    vocab, length = 12, 6
    noisy = torch.tensor([[[9, 9, 9, 9, 9, 9], [9, 9, 9, 9, 9, 9]]])
    replaced = torch.tensor([[[True, False, True, True, True, False], [True] * 6]])
    # Position p's logits: a peak at token p whose height falls with p, so entropy rises with p; position 0 is the
    # flattest, out of order.
    heights = torch.tensor([0.5, 30.0, 25.0, 20.0, 15.0, 10.0])
    logits = torch.zeros(1, 2, length, vocab)
    logits[0, :, torch.arange(length), torch.arange(length)] = heights
    own = OwnSamples(use=torch.tensor([[True, False]]), temperature=torch.tensor([[0.1, 0.1]]),
                     share=torch.tensor([[0.5, 1.0]]), uniforms=torch.full((1, 2, length), 0.5, dtype=torch.float64))
    out = with_own_samples(noisy, logits, replaced, own)
    # 4 corrupted positions, share 0.5: the two most confident of them (2 and 3; 1 is clean) take their peaks.
    assert out[0, 0].tolist() == [9, 9, 2, 3, 9, 9]
    assert torch.equal(out[0, 1], noisy[0, 1])  # a canvas without the coin is left as drawn
    # The draw follows the tempered distribution: at temperature 1 and a flat position, the uniform picks the token
    # at its quantile (inverse CDF).
    flat = OwnSamples(use=torch.tensor([[True, True]]), temperature=torch.ones(1, 2), share=torch.ones(1, 2),
                      uniforms=torch.full((1, 2, length), 0.49, dtype=torch.float64))
    drawn = with_own_samples(noisy, torch.zeros(1, 2, length, vocab), replaced, flat)
    assert drawn[0, 1].tolist() == [5] * 6 and drawn[0, 0].tolist() == [5, 9, 5, 5, 5, 9]


def test_own_samples_are_drawn_per_canvas_and_leave_the_recipe_noise_alone_when_off():
    batch = collate([Example([2], list(range(10, 30)))] * 2000, 4, EOS, PAD)
    plain = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(2000)], 1e-3, 0.5)
    off = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(2000)], 1e-3, 0.5,
                     own_samples_prob=0.0)
    assert off.own is None and plain.own is None and torch.equal(off.noisy, plain.noisy)
    clean = batch.input_ids[:, 1:21].view(-1, 5, 4).gather(1, plain.chosen[:, :, None].expand(-1, -1, 4))
    assert not ((plain.noisy != clean) & ~plain.replaced).any()  # `replaced` holds every corrupted position
    on = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(2000)], 1e-3, 0.5,
                    own_samples_prob=0.3)
    assert abs(on.own.use.float().mean().item() - 0.3) < 0.03
    assert on.own.temperature.min() >= 0.1 and on.own.temperature.max() <= 1.0
    assert abs(on.own.share.mean().item() - 0.5) < 0.03 and on.own.uniforms.shape == (2000, 1, 4)
    assert torch.equal(on.noisy, plain.noisy)  # one canvas per example: its own draws come after the recipe's


def test_all_canvases_rule_trains_every_canvas_with_its_own_t():
    examples = [Example([2], list(range(10, 30))), Example([2, 3], list(range(10, 17)))] * 1000  # 5 and 2 canvases
    batch = collate(examples, 4, EOS, PAD)
    noise = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(2000)], 1e-3, 0.5,
                       canvases="all")
    assert noise.chosen.shape == (2000, 5) and noise.noisy.shape == (2000, 5, 4)
    assert noise.chosen[0].tolist() == [0, 1, 2, 3, 4] and noise.chosen[1].tolist() == [0, 1, -1, -1, -1]
    assert [trained_canvases(e, 4, "all") for e in examples[:2]] == [5, 2]
    assert [trained_canvases(e, 4, "one") for e in examples[:2]] == [1, 1]
    t = noise.t[::2]  # the 5-canvas rows: every canvas its own t, uniform, independent of its neighbour's
    assert t.min() >= 1e-3 and t.max() < 1.0 and abs(t.mean().item() - 0.5) < 0.02
    assert abs(torch.corrcoef(t[:, :2].T)[0, 1].item()) < 0.1
    assert abs(noise.use_self_conditioning[::2].float().mean().item() - 0.5) < 0.03
    # Each canvas is corrupted at its own rate: the share of changed tokens follows t.
    changed = (noise.noisy[::2] != batch.input_ids[::2, 1:21].view(-1, 5, 4)).float().mean(-1)
    assert torch.corrcoef(torch.stack([changed.flatten(), t.flatten()]))[0, 1] > 0.6


def test_text_windows_cut_at_canvas_aligned_points_with_bos_prompts():
    windows = TextWindows(stream=torch.arange(3, 1003).numpy(), window=40, canvas_length=8, bos_id=2, min_prompt=8)
    cuts = set()
    for i in range(200):
        ex = windows.example(example_generator(0, 0, i, "text"))
        assert ex.prompt[0] == 2 and len(ex.prompt) + len(ex.response) == 40
        assert len(ex.response) % 8 == 0 and len(ex.prompt) >= 8
        cuts.add(len(ex.response) // 8)
    assert cuts == {1, 2, 3, 4}
    most = TextWindows(stream=torch.arange(3, 1003).numpy(), window=40, canvas_length=8, bos_id=2, min_prompt=8,
                       response_canvases="most")
    for i in range(20):
        ex, same = most.example(example_generator(0, 0, i, "text")), windows.example(example_generator(0, 0, i, "text"))
        assert len(ex.response) == 32 and len(ex.prompt) == 8
        assert ex.prompt[1:] + ex.response == (same.prompt[1:] + same.response)[-39:]  # the same window


def test_text_windows_cut_anywhere_give_short_prompts_and_unaligned_canvases():
    """prompt_cut="any": the prompt ends at any point from min_prompt on (short prompts included), the response is
    the whole canvases that fit after it, and prompt + response is the start of the window."""
    stream = torch.arange(3, 1003).numpy()
    lengths = set()
    for rule in ("random", "most"):
        windows = TextWindows(stream=stream, window=40, canvas_length=8, bos_id=2, min_prompt=2,
                              response_canvases=rule, prompt_cut="any")
        for i in range(400):
            ex = windows.example(example_generator(0, 0, i, "text"))
            fit = (40 - len(ex.prompt)) // 8
            assert ex.prompt[0] == 2 and 2 <= len(ex.prompt) <= 32 and len(ex.response) % 8 == 0
            assert 8 <= len(ex.response) <= 8 * fit and (rule == "random" or len(ex.response) == 8 * fit)
            run = ex.prompt[1:] + ex.response
            assert run == list(range(run[0], run[0] + len(run)))  # one unbroken stretch of the stream
            lengths.add(len(ex.prompt))
    assert lengths == set(range(2, 33))  # every length, not only the aligned 8, 16, 24, 32
    with pytest.raises(ValueError, match="prompt_cut must be one of"):
        TextWindows(stream=stream, window=40, canvas_length=8, bos_id=2, prompt_cut="anywhere")
    with pytest.raises(ValueError, match="no room for a canvas of 8 after 36 prompt tokens"):
        TextWindows(stream=stream, window=40, canvas_length=8, bos_id=2, min_prompt=36, prompt_cut="any")


def test_distilled_samples_cut_anywhere_are_prefixes_of_prompt_and_sample(tmp_path):
    import numpy as np
    from dgemma.training.distill import DistilledExamples

    prompts = np.arange(2, 2 + 4 * 8, dtype=np.int32).reshape(4, 8)
    responses = np.arange(100, 100 + 4 * 24, dtype=np.int32).reshape(4, 24)
    np.savez(tmp_path / "d.npz", prompts=prompts, responses=responses, meta=np.array("{}"))
    aligned = DistilledExamples.from_file(tmp_path / "d.npz")
    cut = DistilledExamples.from_file(tmp_path / "d.npz", canvas_length=8, min_prompt=2, prompt_cut="any")
    seen = set()
    for a, b in zip(aligned.examples(0, 3, 200), cut.examples(0, 3, 200)):
        assert len(a.prompt) == 8 and len(a.response) == 24  # the file's own split
        assert (b.prompt + b.response) == (a.prompt + a.response)[:len(b.prompt) + len(b.response)]
        assert 2 <= len(b.prompt) <= 24 and len(b.response) == 8 * ((32 - len(b.prompt)) // 8)
        assert not b.encoder_loss
        seen.add(len(b.prompt))
    assert min(seen) < 8 and len(seen) > 15
    with pytest.raises(ValueError, match="canvas_length must be at least 1"):
        DistilledExamples.from_file(tmp_path / "d.npz", prompt_cut="any")  # cutting needs the canvas length


def test_loss_equals_cross_entropy_of_the_reference_forward_over_the_chosen_canvas(checkpoint_dir):
    """The decoder pass of training is the reference's forward with the prefix before the chosen canvas: the
    diffusion loss is the cross-entropy over all canvas positions of its second pass, and the encoder loss the
    next-token cross-entropy of the reference encoder."""
    from oracle import load_reference
    path = checkpoint_dir("moe")
    model, ref = dgemma.load(path), load_reference(path)
    examples = [Example([2, 7, 9, 11, 4], list(range(20, 61))), Example([2, 30], list(range(40, 52))),
                Example(list(range(3, 25)), [8, 9, 10], encoder_loss_on_prompt=False)]
    ((batch, noise),) = lay_out(examples, 3, 16, 96, EOS, PAD, seed=3, step=0, eps=1e-3, self_conditioning_prob=0.5)
    noise.use_self_conditioning = torch.tensor([[True], [False], [True]])
    with torch.no_grad():
        sums = diffusion_loss(model, batch, noise)
        expected_diffusion = expected_encoder = 0.0
        for row in range(3):
            start = int(batch.prompt_lengths[row]) + int(noise.chosen[row, 0]) * 16
            prefix = batch.input_ids[row:row + 1, :start]
            clean = batch.input_ids[row, start:start + 16]
            first = ref(input_ids=prefix, decoder_input_ids=noise.noisy[row]).logits
            second = ref(input_ids=prefix, decoder_input_ids=noise.noisy[row], self_conditioning_logits=first,
                         self_conditioning_mask=noise.use_self_conditioning[row]).logits
            expected_diffusion += F.cross_entropy(second[0], clean, reduction="sum").item()
            full = batch.input_ids[row:row + 1, :int(batch.valid[row].sum())]
            hidden = ref.model.encoder(input_ids=full).last_hidden_state
            enc_logits = torch.tanh(ref.lm_head(hidden).float() / 30) * 30
            targets = batch.encoder_targets[row, 1:full.shape[1]]
            expected_encoder += F.cross_entropy(enc_logits[0, :-1][targets], full[0, 1:][targets],
                                                reduction="sum").item()
    assert abs(sums.diffusion.item() - expected_diffusion) < 1e-3
    assert abs(sums.encoder.item() - expected_encoder) < 1e-3
    assert sums.canvas_tokens == 3 * 16
    assert sums.encoder_tokens == int(batch.encoder_targets[:, 1:].sum())


def test_no_gradient_flows_through_the_first_decoder_pass(checkpoint_dir):
    model = dgemma.load(checkpoint_dir("moe")).train()
    modes = []
    model.decoder.layers[0].register_forward_pre_hook(lambda module, args: modes.append(torch.is_grad_enabled()))
    model.decoder.self_conditioning.register_forward_hook(
        lambda module, args, out: modes.append(("soft", None if args[1] is None else args[1].requires_grad)))
    ((batch, noise),) = lay_out([Example([2, 5, 6], list(range(10, 30)))], 1, 16, 96, EOS, PAD, 0, 0, 1e-3, 1.0)
    sums = diffusion_loss(model, batch, noise)
    # First pass: no signal, no grad. Second pass: a detached signal, with grad.
    assert modes == [("soft", None), False, ("soft", False), True]
    (sums.diffusion + sums.encoder).backward()
    assert model.decoder.self_conditioning.gate_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("own_samples_prob", [0.0, 0.5])
def test_all_canvases_in_one_pass_equal_each_canvas_alone(random_checkpoint, own_samples_prob):
    """Under canvases="all" every canvas sees exactly what it sees alone (the clean prefix before it, the sliding
    layers' window of it, itself, no other canvas): the loss and its gradient are the sums of the one-canvas losses
    with the same corruption, self-conditioning coin and own samples. Rows have 4, 1 and 3 canvases (unused slots)
    and the sliding window (8) is shorter than a canvas (16)."""
    model = dgemma.load(random_checkpoint("moe")).train()
    examples = [Example([2, 7, 9, 11, 4], list(range(20, 80))), Example([2, 30], list(range(40, 52))),
                Example(list(range(3, 25)), list(range(30, 70)), encoder_loss_on_prompt=False)]
    ((batch, noise),) = lay_out(examples, 3, 16, 96, EOS, PAD, seed=3, step=0, eps=1e-3, self_conditioning_prob=0.5,
                                canvases="all", own_samples_prob=own_samples_prob)
    assert noise.chosen.tolist() == [[0, 1, 2, 3], [0, -1, -1, -1], [0, 1, 2, -1]]
    assert noise.use_self_conditioning[noise.chosen >= 0].any() and not noise.use_self_conditioning[
        noise.chosen >= 0].all()
    if own_samples_prob:
        assert noise.own.use[noise.chosen >= 0].any() and not noise.own.use[noise.chosen >= 0].all()

    def gradient(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    together = diffusion_loss(model, batch, noise)
    assert together.canvas_tokens == 8 * 16
    grad_together = gradient(together.diffusion)
    alone, tokens = 0.0, 0
    for row in range(3):
        for slot in range(int((noise.chosen[row] >= 0).sum())):
            cut = (slice(row, row + 1), slice(slot, slot + 1))
            own = None if noise.own is None else OwnSamples(noise.own.use[cut], noise.own.temperature[cut],
                                                            noise.own.share[cut], noise.own.uniforms[cut])
            one = Noise(noise.chosen[cut], noise.noisy[cut], noise.use_self_conditioning[cut], noise.t[cut],
                        noise.replaced[cut], own)
            part = collate([examples[row]], 16, EOS, PAD)
            sums = diffusion_loss(model, part, one)
            alone = alone + sums.diffusion
            tokens += sums.canvas_tokens
    grad_alone = gradient(alone)
    assert tokens == together.canvas_tokens
    assert abs(together.diffusion.item() - alone.item()) < 1e-3 * abs(alone.item())
    # fp32 sums in another order: 1e-4 of the gradient's norm (a canvas seeing a wrong key is off by far more)
    assert (grad_together - grad_alone).norm() < 1e-4 * grad_alone.norm()


def test_an_example_without_encoder_loss_has_no_encoder_targets():
    batch = collate([Example([2, 3], [5, 6, 7], encoder_loss=False), Example([2, 3], [5, 6, 7])], 4, EOS, PAD)
    assert batch.encoder_targets[0].sum() == 0
    assert batch.encoder_targets[1].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_distillation_samples_and_mixture(random_checkpoint, tmp_path):
    """The encoder's batched samples are what it samples one row at a time (greedy: the same tokens as
    autoregressive_steps); a distillation file's examples train the decoder only; a mixture draws from it the
    given share of the time, reproducibly."""
    import numpy as np
    from dgemma.generation import autoregressive_steps
    from dgemma.training.distill import DistilledExamples, Mixture, sample_continuations

    model = dgemma.load(random_checkpoint("moe"))
    prompts = torch.tensor([[2, 5, 9, 30, 7], [2, 40, 41, 42, 43], [2, 11, 3, 60, 61]])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    greedy = sample_continuations(model, prompts, 6, 0.0, gens)
    for row in range(3):
        assert greedy[row].tolist() == list(autoregressive_steps(model, prompts[row:row + 1], 6, None, 0.0))
    sampled = sample_continuations(model, prompts, 6, 0.7, [torch.Generator().manual_seed(i) for i in range(3)])
    again = sample_continuations(model, prompts[1:], 6, 0.7, [torch.Generator().manual_seed(i) for i in range(1, 3)])
    assert torch.equal(sampled[1:], again)  # a row's sample does not depend on the others

    path = tmp_path / "distill.npz"
    np.savez(path, prompts=prompts.numpy(), responses=sampled.numpy(), meta=np.array("{}"))
    distilled = DistilledExamples.from_file(path)
    ex = distilled.example(1, torch.Generator())
    assert ex.prompt == prompts[1].tolist() and ex.response == sampled[1].tolist() and not ex.encoder_loss
    windows = TextWindows(stream=torch.arange(3, 1003).numpy(), window=40, canvas_length=8, bos_id=2)
    mixture = Mixture(windows, distilled, 0.25)
    drawn = mixture.examples(0, 5, 2000)
    share = sum(len(e.response) == 6 for e in drawn) / 2000
    assert abs(share - 0.25) < 0.03
    assert [e.response for e in mixture.examples(0, 5, 50)] == [e.response for e in drawn[:50]]
