"""The sampler on hand-made inputs, and the fast path's statistical equivalence to the reference's sampling."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

import dgemma
from dgemma.sampling import (Workspace, categorical_entropy, digest_logits, draw_uniforms, entropy_bound_acceptance,
                             fast_step, reference_step, sample_from_blocks, stable_and_confident, temperature_at,
                             temperature_schedule)


def test_entropy_bound_accepts_lowest_entropies_within_the_bound():
    entropy = torch.tensor([[0.30, 0.01, 0.05, 2.0, 0.02]])
    # sorted: 0.01, 0.02, 0.05, 0.30, 2.0 -> cumsum - self: 0, 0.01, 0.03, 0.08, 0.38
    assert entropy_bound_acceptance(entropy, 0.1).tolist() == [[True, True, True, False, True]]
    assert entropy_bound_acceptance(entropy, 0.02).tolist() == [[False, True, False, False, True]]
    # The lowest-entropy position is always accepted, whatever the bound.
    assert entropy_bound_acceptance(torch.tensor([[5.0, 7.0]]), 1e-9).tolist() == [[True, False]]


def test_temperature_schedule_runs_from_t_max_to_t_min_over_remaining_steps():
    assert float(temperature_at(10, 10, 0.4, 0.8)) == pytest.approx(0.8)
    assert float(temperature_at(1, 10, 0.4, 0.8)) == pytest.approx(0.44)
    assert temperature_at(5, 10, 0.4, 0.8).dtype == torch.float32


def test_row_wise_temperature_schedule_is_bit_identical_to_the_scalar_one():
    settings = [(s, m, lo, hi) for m in (1, 7, 16, 48) for s in range(1, m + 1) for lo, hi in ((0.4, 0.8), (0.1, 0.3),
                                                                                              (0.0, 1.7))]
    rows = temperature_schedule(torch.tensor([s for s, *_ in settings], dtype=torch.int32),
                                torch.tensor([m for _, m, *_ in settings], dtype=torch.int32),
                                torch.tensor([lo for *_, lo, _ in settings], dtype=torch.float32),
                                torch.tensor([hi - lo for *_, lo, hi in settings], dtype=torch.float32))
    # Exact, on any machine and thread count: the same elementwise +, *, / in the same order, each correctly
    # rounded by IEEE 754 (no reduction, no transcendental function whose vector and scalar versions differ).
    assert torch.equal(rows, torch.stack([temperature_at(*setting) for setting in settings]))


class Stopper:
    """The stopping rule stepped through a canvas, as the engine steps it."""

    def __init__(self, stability: int, confidence: float, rows: int = 2):
        self.stability = torch.full((rows,), stability, dtype=torch.int32)
        self.confidence = torch.full((rows,), confidence)
        self.previous = torch.full((rows, 3), -1)
        self.run = torch.zeros(rows, dtype=torch.int32)

    def __call__(self, argmax, entropy):
        stop, self.run = stable_and_confident(argmax, self.previous, self.run, self.stability, self.confidence,
                                              entropy)
        self.previous = argmax
        return stop


def test_stopping_needs_a_stable_argmax_and_low_mean_entropy():
    stop = Stopper(stability=1, confidence=0.5)
    canvas = torch.tensor([[1, 2, 3], [4, 5, 6]])
    low, high = torch.full((2, 3), 0.1), torch.full((2, 3), 0.9)
    assert stop(canvas, low).tolist() == [False, False]  # nothing to compare with yet
    assert stop(canvas, low).tolist() == [True, True]
    assert stop(canvas, high).tolist() == [False, False]  # stable, not confident
    changed = canvas.clone()
    changed[1, 0] = 9
    assert stop(changed, low).tolist() == [True, False]  # row 1 changed
    two = Stopper(stability=2, confidence=0.5)
    assert [two(canvas, low).tolist() for _ in range(3)] == [[False, False], [False, False], [True, True]]
    assert Stopper(0, 0.5)(canvas, low).tolist() == [True, True]


def make_head(vocab: int, width: int, seed: int, sharpness: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, width, generator=gen)
    head = torch.randn(vocab, width, generator=gen) * sharpness
    return hidden, head


@pytest.mark.parametrize("vocab", [37, 1024, 3000])
@pytest.mark.parametrize("temperature", [None, 0.55])
def test_fast_step_computes_what_the_reference_computes(vocab, temperature):
    """Entropy, argmax and the self-conditioning embeddings agree with the reference's fp32 [B, L, V] route."""
    hidden, head = make_head(vocab, 16, seed=vocab, sharpness=2.0)
    embed_scale = torch.tensor(4.0)
    temp = None if temperature is None else torch.tensor(temperature)
    logits = torch.tanh(hidden @ head.T / 30.0) * 30.0
    ref = reference_step(logits, temp, torch.float32, torch.Generator().manual_seed(0))
    fast = fast_step(hidden, head, head, embed_scale, 30.0, temp, draw_uniforms(10, torch.Generator().manual_seed(0)),
                     matmul_elements=4 * vocab, digest_elements=vocab)
    torch.testing.assert_close(fast.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    # The same argmax, up to ties within the two routes' rounding of the logits (1e-5, as the entropy above):
    # where they differ, the reference's logit at the fast route's choice is within 1e-5 of its maximum.
    scaled = logits / temp if temp is not None else logits
    best, chosen = scaled.gather(-1, ref.argmax[..., None]), scaled.gather(-1, fast.argmax[..., None])
    assert bool((best - chosen <= 1e-5).all())
    soft = (ref.self_conditioning.softmax(-1) @ head) * embed_scale
    torch.testing.assert_close(fast.self_conditioning, soft, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vocab", [3072, 16384])  # the eager digest, and the compiled one (16k and more)
def test_chunk_sizes_change_no_result(vocab):
    """How many logits the matmuls and the digest take at a time is a speed choice only: every output is
    bit-identical, with chunks that split the rows (unevenly too, for the eager digest) and with one chunk for all."""
    hidden, head = make_head(vocab, 16, seed=vocab, sharpness=2.0)
    hidden, head = hidden.to(torch.bfloat16), head.to(torch.bfloat16)
    args = (hidden, head, head, torch.tensor(4.0), 30.0, torch.tensor([0.7, 0.3]))
    results = [fast_step(*args, draw_uniforms(10, torch.Generator().manual_seed(0)), matmul_elements=matmul,
                         digest_elements=digest)
               for matmul, digest in [(1 << 27, 1 << 22), (10 * vocab, 5 * vocab), (4 * vocab, 3 * vocab)]
               [:None if vocab < 16_384 else 2]]  # each chunk shape is compiled anew: two are enough there
    for other in results[1:]:
        for name in ("sampled", "argmax", "entropy", "self_conditioning"):
            assert torch.equal(getattr(other, name), getattr(results[0], name)), name


def test_workspace_reuses_its_buffers_and_changes_no_result():
    """Steps that share a workspace (as a generation's do) give exactly what fresh buffers give, and a smaller
    step reuses the storage of a larger one."""
    workspace = Workspace()
    taken = []  # kept alive, so that a fresh allocation could not land on a freed address
    for seed, batch in [(1, 2), (2, 1), (3, 2)]:
        hidden, head = make_head(1536, 16, seed=seed, sharpness=2.0)
        hidden = hidden[:batch]
        args = (hidden, head, head, torch.tensor(4.0), 30.0, torch.tensor(0.7))
        fresh = fast_step(*args, draw_uniforms(5 * batch, torch.Generator().manual_seed(seed)))
        shared = fast_step(*args, draw_uniforms(5 * batch, torch.Generator().manual_seed(seed)), workspace)
        # Exact: the same kernels on the same inputs in the same process, only the output buffers differ; a
        # difference of any size would mean a reused buffer leaked an earlier step's values.
        for name in ("sampled", "argmax", "entropy", "self_conditioning"):
            assert torch.equal(getattr(fresh, name), getattr(shared, name)), name
        taken.append(workspace.take("logits", 1, 1536, head.dtype, head.device))
    assert len({tensor.data_ptr() for tensor in taken}) == 1


def draws(logits: torch.Tensor, count: int, seed: int, block: int = 64) -> torch.Tensor:
    """`count` samples from softmax(logits) through the fast sampler's digest and two-level inverse CDF."""
    rows = logits.expand(count, -1).contiguous()
    block = block if logits.numel() % block == 0 else logits.numel()  # as fast_step does
    scale = torch.ones(count, 1)
    peak = rows.max(dim=-1, keepdim=True).values
    _, block_sums, _ = digest_logits(rows, peak, None, scale, block)
    uniforms = torch.rand(count, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return sample_from_blocks(rows, block_sums.double(), peak, None, scale, uniforms, block)


@pytest.mark.parametrize("vocab", [7, 1536])
def test_inverse_cdf_sampling_follows_the_distribution(vocab):
    """Chi-square goodness of fit of 40k draws against the exact probabilities (fixed seed, so deterministic)."""
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 2
    samples = draws(logits, 40_000, seed=2)
    assert chi_square_pvalue(samples, logits.softmax(-1)) > 1e-3


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.full((2048,), -1e4)
    logits[5], logits[2047] = 0.0, 1.0  # the first entry of the first block, the last of the last
    samples = draws(logits, 1000, seed=0, block=64)
    assert set(samples.tolist()) == {5, 2047}


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer samples to probabilities, rare outcomes pooled so expected counts are >= 5."""
    order = torch.argsort(probs, descending=True)
    counts = torch.bincount(samples, minlength=probs.numel())[order].double()
    expected = probs[order].double() * samples.numel()
    keep = expected >= 5
    if not bool(keep.all()):
        rest_counts, rest_expected = counts[~keep].sum(0, keepdim=True), expected[~keep].sum(0, keepdim=True)
        counts, expected = counts[keep], expected[keep]
        if bool(rest_counts > 0) or bool(rest_expected > 0):  # outcomes of probability 0 never drawn: no bin
            counts, expected = torch.cat([counts, rest_counts]), torch.cat([expected, rest_expected])
    return float(chisquare(counts.numpy(), expected.numpy() * counts.sum().item() / expected.sum().item()).pvalue)


@torch.no_grad()
def decoder_states(model) -> torch.Tensor:
    """The decoder's final states [1, L, H] for a fixed noise canvas after a fixed 6-token prompt."""
    from dgemma.cache import KVCache
    cache = KVCache(model.config, 1, model.dtype)
    prompt = torch.tensor([[5, 17, 33, 2, 9, 41]])
    valid = torch.ones_like(prompt, dtype=torch.bool)
    model.encode(prompt, cache.encoder_plan(model.rope, valid))
    cache.commit(valid)
    length = model.config.canvas_length
    canvas = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(0))
    return model.decode(canvas, cache.decoder_plan(model.rope, 1, length))


@pytest.mark.parametrize("temperature", [0.45, 0.8])
def test_fast_step_samples_the_reference_distribution_on_model_states(random_checkpoint, temperature):
    """Draws of the fast step for one real decoder state follow softmax(softcap(logits) / T) exactly."""
    model = dgemma.load(random_checkpoint("moe"))
    hidden = decoder_states(model)
    with torch.no_grad():
        state = hidden[:, 3:4].expand(20_000, 1, -1).contiguous()  # one position, drawn 20k times
        temp = torch.tensor(temperature)
        fast = fast_step(state, model.head_matrix, model.embedding_matrix, torch.tensor(1.0), 30.0, temp,
                         draw_uniforms(20_000, torch.Generator().manual_seed(1)))
        probs = (model.logits(hidden[0, 3]) / temp).softmax(-1)
        ref = reference_step(model.logits(state), temp, model.dtype, torch.Generator().manual_seed(2))
    assert chi_square_pvalue(fast.sampled.flatten(), probs) > 1e-3
    assert chi_square_pvalue(ref.sampled.flatten(), probs) > 1e-3  # the same test passes for the reference
    assert probs.max() < 0.9, "the test needs a spread-out distribution"


def test_fast_and_reference_generation_sample_the_same_distribution(random_checkpoint):
    """End to end on a tiny model: the committed tokens of many runs have the same distribution in both modes
    (two-sample chi-square on the first generated token, pooled over rare values). The runs are the rows of one
    batch a mode, each row's noise drawn from its own stretch of the generator's stream."""
    model = dgemma.load(random_checkpoint("moe"))
    prompt = torch.tensor([[5, 17, 33, 2, 9, 41]])
    runs = 300

    def first_tokens(sampling: str) -> list[int]:
        gen = torch.Generator().manual_seed(10_000 * (sampling == "fast"))
        result = model.generate(prompt.expand(runs, -1), max_new_tokens=4, max_denoising_steps=3,
                                stability_threshold=None, sampling=sampling, generator=gen)
        return result.sequences[:, prompt.shape[1]].tolist()

    fast, ref = first_tokens("fast"), first_tokens("reference")
    values = sorted(set(fast) | set(ref))
    table = torch.tensor([[fast.count(v) for v in values], [ref.count(v) for v in values]])
    common = table.sum(0) >= 10
    table = torch.cat([table[:, common], table[:, ~common].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    assert table.shape[1] >= 3, "the test needs a non-degenerate distribution"
    assert chi2_contingency(table.numpy()).pvalue > 1e-3


def test_reference_step_matches_categorical_entropy():
    logits = torch.randn(2, 3, 11)
    result = reference_step(logits, torch.tensor(0.5), torch.float32, torch.Generator().manual_seed(0))
    assert torch.equal(result.entropy, categorical_entropy(logits / 0.5))  # the same function on the same input


def test_processed_logits_match_the_reference_soft_cap():
    from dgemma.sampling import processed
    logits = torch.linspace(-2000, 2000, 100_001)
    torch.testing.assert_close(processed(logits, 1 / 30.0, torch.tensor(30.0 / 0.6)),
                               torch.tanh(logits / 30.0) * 30.0 / 0.6, atol=2e-5, rtol=1e-6)


def test_compiled_kernels_for_large_vocabularies_match_the_eager_ones():
    """Vocabularies from 16k on go through torch.compile: the fused kernels compute what the eager ops do."""
    from dgemma.sampling import _kernel, block_maxima, processed
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 32_768, generator=gen) * 4).to(torch.bfloat16)
    scale = torch.full((8, 1), 30.0 / 0.6)
    peak = processed(logits.max(dim=-1, keepdim=True).values, 1 / 30.0, scale)
    eager = digest_logits(logits, peak, 1 / 30.0, scale, 1024)
    fused = _kernel("digest", digest_logits, large=True)(logits, peak, 1 / 30.0, scale, 1024)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=2e-3)
    # Exact: a maximum involves no rounding, whatever order a kernel visits the values in.
    assert torch.equal(block_maxima(logits, 1024), _kernel("maxima", block_maxima, large=True)(logits, 1024))


def test_weights_too_small_for_a_normal_float_are_zero_and_change_no_result():
    """At a low temperature much of the vocabulary lies 87 to 104 nats below the maximum, where exp gives fp32
    subnormals (slow on x86: microcode). The digest sets those weights to 0 instead, eager and compiled alike, and
    the step still computes what the reference (which keeps them) computes."""
    from dgemma.sampling import NORMAL_EXP_FLOOR, _kernel, processed
    vocab, temperature = 16384, torch.tensor(0.1)
    hidden, head = make_head(vocab, 16, seed=5, sharpness=3.0)
    logits = torch.tanh(hidden @ head.T / 30.0) * 30.0
    shifted = (logits - logits.amax(-1, keepdim=True)) / temperature
    subnormal_range = ((shifted < NORMAL_EXP_FLOOR) & (shifted > -103.9)).float().mean()
    assert subnormal_range > 0.01  # the case this test is about: exp would give subnormals here
    rows = logits.view(-1, vocab)
    scale = torch.full((rows.shape[0], 1), 30.0 / temperature.item())
    peak = processed(rows.max(dim=-1, keepdim=True).values, 1 / 30.0, scale)
    for large in (False, True):
        weights, block_w, block_wx = _kernel("digest", digest_logits, large)(rows, peak, 1 / 30.0, scale, 1024)
        tiny = torch.finfo(torch.float32).tiny
        for tensor in (weights.float(), block_w, block_wx):
            assert not bool(((tensor != 0) & (tensor.abs() < tiny)).any()), "a subnormal number was computed"
    ref = reference_step(logits, temperature, torch.float32, torch.Generator().manual_seed(0))
    fast = fast_step(hidden, head, head, torch.tensor(1.0), 30.0, temperature,
                     draw_uniforms(10, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(fast.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.argmax, ref.argmax)
    torch.testing.assert_close(fast.self_conditioning, ref.self_conditioning.softmax(-1) @ head, atol=1e-4, rtol=1e-4)


# ---- logits processors: bias, top_k, top_p (issue 15) ------------------------------------------------------------

def test_truncation_threshold_keeps_what_sorting_keeps():
    """The fast path's threshold (candidates, raised when the nucleus is larger) keeps exactly the set that the
    sorted definition (`truncate`) keeps: flat rows whose nucleus needs more than the first candidates, peaked
    rows, rows with ties at the boundary, top_k and top_p alone and together, top_p 0 and 1."""
    from dgemma.sampling import CANDIDATES, truncate, truncation_threshold
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.3] * 4 + [3.0] * 4 + [1.0] * 4)[:, None]
    x = torch.randn(12, 3000, generator=gen) * spread
    x[8:] = (x[8:] * 2).round() / 2  # many ties
    top_k = torch.tensor([0, 5, 0, 40, 0, 3, 2999, 0, 7, 0, 1, 0])
    top_p = torch.tensor([0.9, 1.0, 0.99, 0.5, 0.3, 0.8, 1.0, 0.95, 1.0, 0.6, 0.9, 0.0])
    peak = x.max(dim=-1, keepdim=True).values
    threshold = truncation_threshold(x, peak, top_k, top_p, int(top_k.max()), True, block=1000)
    sizes = []
    for row in range(12):
        expected = truncate(x[row], int(top_k[row]) or None, float(top_p[row])) > float("-inf")
        assert torch.equal(x[row] >= threshold[row], expected), f"row {row}"
        sizes.append(int(expected.sum()))
    assert max(sizes) > CANDIDATES and min(sizes) >= 1  # the candidates were raised at least once
    assert sizes[8] > 7  # ties at the 7th value are kept


def controlled(rows: int, vocab: int, top_k: int = 0, top_p: float = 1.0, bias: torch.Tensor | None = None):
    from dgemma.sampling import Controls
    return Controls(bias=None if bias is None else bias.expand(rows, vocab).contiguous(),
                    top_k=torch.full((rows,), top_k), top_p=torch.full((rows,), top_p), max_top_k=top_k,
                    uses_top_p=top_p < 1)


def test_sample_from_blocks_never_takes_a_truncated_entry():
    """A uniform that rounding puts past a block's last kept weight takes the last kept entry."""
    logits = torch.zeros(4, 128)
    logits[:, 60:] = -5.0  # below the threshold
    peak = torch.zeros(4, 1)
    threshold = torch.full((4, 1), -1.0)
    weights = torch.where(logits >= threshold, torch.exp(logits), 0.0)
    block_sums = weights.view(4, -1, 64).sum(dim=-1).double()
    uniforms = torch.tensor([[0.0], [0.5], [1 - 2 ** -53], [0.9999999]], dtype=torch.float64)
    got = sample_from_blocks(logits, block_sums, peak, None, torch.ones(4, 1), uniforms, 64, threshold)
    assert got.tolist()[0] == 0 and all(0 <= t < 60 for t in got.tolist())


@pytest.mark.parametrize("vocab", [96, 3072])
def test_fast_step_with_controls_computes_what_the_reference_computes(vocab):
    """With a bias, top_k and top_p (different per row; one row without any), the fast step's entropy, argmax and
    self-conditioning are those of the reference's processed distribution: (softcap(l) + bias) / T, truncated."""
    hidden, head = make_head(vocab, 16, seed=vocab, sharpness=2.0)
    embed_scale, temp = torch.tensor(4.0), torch.tensor([0.7, 1.3])
    logits = torch.tanh(hidden @ head.T / 30.0) * 30.0
    bias = torch.zeros(2, vocab)
    bias[0, :vocab // 3] = 1.5
    bias[0, 5], bias[1, 7] = -100.0, 100.0
    from dgemma.sampling import Controls
    controls = Controls(bias=bias, top_k=torch.tensor([0, 9]), top_p=torch.tensor([0.85, 1.0]), max_top_k=9)
    fast = fast_step(hidden, head, head, embed_scale, 30.0, temp, draw_uniforms(10, torch.Generator().manual_seed(0)),
                     matmul_elements=4 * vocab, digest_elements=3 * vocab, controls=controls)
    for row, (k, p) in enumerate([(None, 0.85), (9, None)]):
        ref = reference_step(logits[row:row + 1], temp[row], torch.float32, torch.Generator().manual_seed(0),
                             bias[row:row + 1], k, p)
        torch.testing.assert_close(fast.entropy[row:row + 1], ref.entropy, atol=1e-5, rtol=1e-5)
        assert torch.equal(fast.argmax[row:row + 1], ref.argmax)
        soft = (ref.self_conditioning.softmax(-1) @ head) * embed_scale
        torch.testing.assert_close(fast.self_conditioning[row:row + 1], soft, atol=1e-4, rtol=1e-4)
    assert bool((fast.argmax[1] == 7).all()) and not bool((fast.sampled[0] == 5).any())


@pytest.mark.parametrize("settings", [dict(top_k=6), dict(top_p=0.7), dict(top_k=20, top_p=0.9),
                                      dict(top_p=0.8, bias=True)], ids=["top_k", "top_p", "both", "top_p+bias"])
def test_fast_and_reference_steps_sample_the_truncated_distribution(random_checkpoint, settings):
    """Draws of the fast step and of the reference step for one decoder state follow the truncated distribution
    softmax(truncate((softcap(l) + bias) / T)) exactly (chi-square), never a token outside it; the untruncated
    distribution is rejected by the same test, so it tells them apart."""
    from dgemma.sampling import truncate
    model = dgemma.load(random_checkpoint("moe"))
    vocab, draws_ = model.config.vocab_size, 20_000
    top_k, top_p = settings.get("top_k"), settings.get("top_p")
    bias = None
    if settings.get("bias"):
        bias = torch.zeros(vocab)
        bias[::3] = 1.0
    hidden = decoder_states(model)
    with torch.no_grad():
        state = hidden[:, 3:4].expand(draws_, 1, -1).contiguous()
        temp = torch.tensor(2.0)  # spread out, so that the truncation removes real mass
        logits = model.logits(hidden[0, 3])
        exact = truncate((logits + (bias if bias is not None else 0)) / temp, top_k, top_p).double().softmax(-1)
        untruncated = ((logits + (bias if bias is not None else 0)) / temp).double().softmax(-1)
        fast = fast_step(state, model.head_matrix, model.embedding_matrix, torch.tensor(1.0), 30.0, temp,
                         draw_uniforms(draws_, torch.Generator().manual_seed(1)),
                         controls=controlled(draws_, vocab, top_k or 0, top_p or 1.0, bias))
        rows_bias = None if bias is None else bias.expand(draws_, vocab)
        ref = reference_step(model.logits(state), temp, model.dtype, torch.Generator().manual_seed(2), rows_bias,
                             top_k, top_p)
    kept = int((exact > 0).sum())
    assert 3 <= kept <= vocab - 16, "the test needs a truncation that keeps several tokens and drops many"
    for samples in (fast.sampled.flatten(), ref.sampled.flatten()):
        assert bool((exact[samples] > 0).all()), "a token outside the truncation was drawn"
        assert chi_square_pvalue(samples, exact) > 1e-3
        assert chi_square_pvalue(samples, untruncated) < 1e-6


def test_truncated_draws_across_vocabulary_blocks_follow_the_distribution():
    """A 2048-token vocabulary in two blocks of 1024, a nucleus reaching into both and larger than the first
    candidates: the fast step's draws follow the truncated distribution (chi-square)."""
    from dgemma.sampling import CANDIDATES, truncate
    hidden, head = make_head(2048, 16, seed=3, sharpness=0.35)
    state = hidden[:1, :1].expand(12_000, 1, -1).contiguous()
    logits = torch.tanh(hidden[0, 0] @ head.T / 30.0) * 30.0
    exact = truncate(logits, None, 0.6).double().softmax(-1)
    kept = (exact > 0).nonzero().flatten()
    assert CANDIDATES < kept.numel() < 1500 and kept.min() < 1024 <= kept.max()
    fast = fast_step(state, head, head, torch.tensor(1.0), 30.0, None,
                     draw_uniforms(12_000, torch.Generator().manual_seed(4)), controls=controlled(12_000, 2048,
                                                                                              top_p=0.6))
    assert bool((exact[fast.sampled.flatten()] > 0).all())
    assert chi_square_pvalue(fast.sampled.flatten(), exact) > 1e-3
