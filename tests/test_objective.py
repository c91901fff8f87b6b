"""Each rule of the training objective, and the loss against the reference model's own forward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.stats import chisquare

import dgemma
from dgemma.training.data import TextWindows, example_generator, lay_out
from dgemma.training.objective import Example, canvas_layout, collate, corrupt, diffusion_loss, draw_noise

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
    assert chisquare(torch.bincount(noise.chosen, minlength=5).numpy()).pvalue > 1e-3
    assert noise.t.min() >= 1e-3 and noise.t.max() < 1.0 and abs(noise.t.mean().item() - 0.5) < 0.02
    assert abs(noise.use_self_conditioning.float().mean().item() - 0.5) < 0.03
    # The same (seed, step, example) always draws the same noise.
    again = draw_noise(batch, 4, 50, [example_generator(0, 0, i, "noise") for i in range(4000)], 1e-3, 0.5)
    assert torch.equal(again.noisy, noise.noisy)


def test_text_windows_cut_at_canvas_aligned_points_with_bos_prompts():
    windows = TextWindows(stream=torch.arange(3, 1003).numpy(), window=40, canvas_length=8, bos_id=2, min_prompt=8)
    cuts = set()
    for i in range(200):
        ex = windows.example(example_generator(0, 0, i, "text"))
        assert ex.prompt[0] == 2 and len(ex.prompt) + len(ex.response) == 40
        assert len(ex.response) % 8 == 0 and len(ex.prompt) >= 8
        cuts.add(len(ex.response) // 8)
    assert cuts == {1, 2, 3, 4}


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
    noise.use_self_conditioning = torch.tensor([True, False, True])
    with torch.no_grad():
        sums = diffusion_loss(model, batch, noise)
        expected_diffusion = expected_encoder = 0.0
        for row in range(3):
            start = int(batch.prompt_lengths[row]) + int(noise.chosen[row]) * 16
            prefix = batch.input_ids[row:row + 1, :start]
            clean = batch.input_ids[row, start:start + 16]
            first = ref(input_ids=prefix, decoder_input_ids=noise.noisy[row:row + 1]).logits
            second = ref(input_ids=prefix, decoder_input_ids=noise.noisy[row:row + 1], self_conditioning_logits=first,
                         self_conditioning_mask=noise.use_self_conditioning[row:row + 1]).logits
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
