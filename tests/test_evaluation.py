"""`dgemma eval quality`: the metrics on hand-made texts, the judge's NLL against a manual computation with a tiny
causal LM, the passages, and a whole sweep on a tiny model (report, table and plot). No judge package needed."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from dgemma.evaluation import quality
from dgemma.evaluation.metrics import (distinct_n, perplexity, perplexity_metrics, text_metrics, unigram_entropy,
                                       words)
from dgemma.evaluation.passages import (Passage, complete_words, cut_words, heldout_passages, load_passages,
                                        passages_of, split_passage, spread, write_passages)



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads and lose much when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_distinct_n_and_unigram_entropy_of_hand_made_texts():
    assert words("The cat\nsat,  the CAT") == ["the", "cat", "sat,", "the", "cat"]
    loop = words("a b a b a b")
    assert distinct_n(loop, 1) == 2 / 6
    assert distinct_n(loop, 2) == 2 / 5  # (a b), (b a)
    assert distinct_n(loop, 3) == 2 / 4
    assert distinct_n(["x"], 2) is None
    assert unigram_entropy(loop) == pytest.approx(1.0)
    assert unigram_entropy(["x"] * 5) == 0.0
    assert unigram_entropy(list("abcd")) == pytest.approx(2.0)
    assert unigram_entropy([]) is None

    metrics = text_metrics(["a b a b", "one two three four", "solo", ""])
    assert metrics["mean_words"] == pytest.approx((4 + 4 + 1 + 0) / 4)
    assert metrics["distinct_1"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)  # the empty text has no unigram
    assert metrics["distinct_2"] == pytest.approx((2 / 3 + 1.0) / 2)  # nor does "solo" have a bigram
    assert metrics["unigram_entropy"] == pytest.approx((1.0 + 2.0 + 0.0) / 3)
    assert metrics["letter_words"] == 1.0
    assert text_metrics(['to lay . " ."'])["letter_words"] == pytest.approx(2 / 5)
    assert metrics["adjacent_repeats"] == 0.0  # "a b a b" repeats words, never next to each other
    assert text_metrics(["of of the the king", "solo"])["adjacent_repeats"] == pytest.approx(2 / 4)


def test_perplexity_pools_tokens_and_the_interval_resamples_passages():
    nll, counts, passages = [2.0, 6.0, 0.0, 3.0], [2, 3, 0, 1], [0, 0, 1, 1]
    assert perplexity(nll, counts) == pytest.approx(math.exp(11 / 6))
    metrics = perplexity_metrics(nll, counts, passages)
    assert metrics["gen_ppl"] == pytest.approx(math.exp(11 / 6))
    assert metrics["gen_ppl_geomean"] == pytest.approx(math.exp((1.0 + 2.0 + 3.0) / 3))  # the empty one left out
    assert metrics["judge_tokens"] == 6 and metrics["empty_continuations"] == 1
    low, high = metrics["gen_ppl_ci95"]
    # Passage 0 alone: exp(8/5); passage 1 alone: exp(3); every resample lies between.
    assert math.exp(8 / 5) - 1e-9 <= low <= metrics["gen_ppl"] <= high <= math.exp(3) + 1e-9
    assert perplexity_metrics(nll, counts, passages) == metrics  # seeded
    assert perplexity([0.0], [0]) is None


# ---- passages ----------------------------------------------------------------------------------------------------


def test_prompts_and_continuations_are_cut_at_words_with_their_whitespace():
    text = "One two\nthree,  four five\n\nsix seven eight"
    assert cut_words(text, 3) == "One two\nthree,"
    assert cut_words(text, 99) == text
    prompt, continuation = split_passage(text, 2, 4)
    assert prompt == "One two" and continuation == "\nthree,  four five\n\nsix"
    assert text.startswith(prompt + continuation)
    with pytest.raises(ValueError, match="too short"):
        split_passage(text, 4, 5)
    assert complete_words("a b c") == 2 and complete_words("a b c ") == 3


def test_passages_are_whole_lines_and_come_from_held_out_blocks_only():
    text = "\n\nalpha beta gamma\ndelta\n\nepsilon zeta eta theta\niota\n"
    assert passages_of(text, "t", 4) == [Passage("t", "alpha beta gamma\ndelta"),
                                         Passage("t", "epsilon zeta eta theta")]
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2]

    from dgemma.recipes.corpus import BLOCK_CHARS, split_blocks, is_heldout_block

    # A corpus file of numbered lines: only held-out blocks' lines may appear in passages.
    lines = [f"line {i} " + "word " * 8 for i in range(40 * BLOCK_CHARS // 50)]
    corpus = {"numbers.txt": "\n".join(lines)}
    passages = heldout_passages(corpus, per_source=5, min_words=30)
    held = "".join(b for i, b in enumerate(split_blocks(corpus["numbers.txt"])) if is_heldout_block(i))
    assert len(passages) == 5 and all(p.text in held and len(p.text.split()) >= 30 for p in passages)


def test_shipped_passages_cover_every_corpus_file(tmp_path):
    passages = load_passages()
    assert len(passages) == 48
    assert {p.source for p in passages} == {"janeausten.txt", "shakespeare_modern.txt", "milton.txt",
                                            "bible_kjv.txt"}
    assert all(len(p.text.split()) >= 160 for p in passages)
    assert {p.source for p in spread(passages, 12)} == {p.source for p in passages}  # the default 12 mix them
    path = tmp_path / "some.jsonl"
    write_passages(passages[:3], path)
    assert load_passages(path) == passages[:3]
    assert load_passages(path, min_words=170) == [p for p in passages[:3] if len(p.text.split()) >= 170]


# ---- settings ----------------------------------------------------------------------------------------------------


def test_sweep_settings_put_the_shipped_settings_first_without_repeating_them():
    from dgemma.generation_config import GenerationConfig

    assert quality.parse_schedules("0.8:0.4, 0.2:0.5,none") == [(0.8, 0.4), (0.5, 0.2), (None, None)]
    with pytest.raises(ValueError):
        quality.parse_schedules("0.5:0.5")
    base = GenerationConfig(max_denoising_steps=32, t_min=0.4, t_max=0.8).updated(entropy_bound=8.0)
    settings = quality.sweep_settings(base, [0.1, 8.0], [(0.8, 0.4), (0.3, 0.1)], [32], [True])
    assert [s.label for s in settings] == ["bound 8, t 0.8→0.4, 32 steps (shipped)",
                                          "bound 0.1, t 0.8→0.4, 32 steps", "bound 0.1, t 0.3→0.1, 32 steps",
                                          "bound 8, t 0.3→0.1, 32 steps"]
    off = quality.DiffusionSetting(1.0, None, None, 4, adaptive=False)
    assert off.overrides() == {"entropy_bound": 1.0, "t_min": None, "t_max": None, "max_denoising_steps": 4,
                               "guidance_scale": 1.0, "stability_threshold": None}
    assert off.label == "bound 1, t 1, 4 steps, all steps"
    config = base.updated(**off.overrides())
    assert not config.has_temperature and not config.stops_adaptively
    guided = quality.sweep_settings(base, [8.0], [(0.3, 0.1)], [32], [True], shipped=False, guidance=(1.0, 2.0))
    assert [s.label for s in guided] == ["bound 8, t 0.3→0.1, 32 steps", "bound 8, t 0.3→0.1, 32 steps, guidance 2"]
    assert base.updated(**guided[1].overrides()).guidance_scale == 2.0


# ---- the judge ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random Llama and a BPE tokenizer saved as a transformers causal LM directory."""
    transformers = pytest.importorskip("transformers")
    from dgemma.recipes.bpe import train_tokenizer

    directory = tmp_path_factory.mktemp("judge")
    train_tokenizer(["the quick brown fox jumps over the lazy dog. " * 50, "It is a truth universally known. " * 50],
                    300, directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


class PlainForward(torch.nn.Module):
    """The same model behind a forward without `logits_to_keep`: the judge must then slice the logits itself."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_judge_nll_equals_the_manual_sum_over_continuation_tokens(judge_dir):
    from dgemma.evaluation.judge import Judge, load_judge

    judge = load_judge(judge_dir, batch_size=2)
    assert judge._keeps_logits
    pairs = [("the quick brown", " fox jumps over the lazy dog."), ("It is", " a truth"), ("the lazy", ""),
             ("It is a truth universally", " known. the quick brown fox")]
    scores = judge.score(pairs)
    tokenizer, model = judge.tokenizer, judge.model
    for (prompt, continuation), (nll, count) in zip(pairs, scores):
        prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        assert count == len(continuation_ids)
        ids = torch.tensor([prompt_ids + continuation_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        manual = -sum(float(log_probs[len(prompt_ids) + j - 1, t]) for j, t in enumerate(continuation_ids))
        assert nll == pytest.approx(manual, abs=1e-4)
    assert scores[2] == (0.0, 0)
    # One at a time, or through a forward that returns every position's logits: the same numbers.
    alone = Judge(model, tokenizer, batch_size=1).score(pairs)
    plain = Judge(PlainForward(model), tokenizer, batch_size=3)
    assert not plain._keeps_logits
    for a, b, c in zip(scores, alone, plain.score(pairs)):
        assert a[1] == b[1] == c[1] and a[0] == pytest.approx(b[0], abs=1e-4) and a[0] == pytest.approx(c[0], abs=1e-4)


def test_judge_paths_that_are_not_judges_are_refused(tmp_path):
    pytest.importorskip("transformers")
    from dgemma.evaluation.judge import load_judge

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_judge(tmp_path / "google/gemma-3-270m")
    with pytest.raises(ValueError, match="causal LM directory"):
        load_judge(tmp_path)


def test_without_the_judge_package_the_command_says_what_to_install(monkeypatch, capsys):
    pytest.importorskip("transformers")
    import dgemma.evaluation.judge as judge

    monkeypatch.setattr(judge, "default_judge_available", lambda: False)
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    with pytest.raises(ValueError, match=r"pip install 'dgemma\[eval\]'"):
        quality.run(parser.parse_args([]))
    assert quality.main([]) == 2  # standalone: one line, no traceback
    assert capsys.readouterr().err.startswith("dgemma eval quality: error: the default judge")


# ---- a whole sweep -----------------------------------------------------------------------------------------------


def test_sweep_on_a_tiny_model_writes_a_complete_report_table_and_plot(text_model_dir, judge_dir, tmp_path, capsys):
    from conftest import TEXT

    text = tmp_path / "heldout.txt"
    text.write_text(TEXT.replace(". ", ".\n"))
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--model", str(text_model_dir), "--text", str(text), "--passages", "2", "--seeds", "2",
                              "--prompt-words", "6", "--continuation-words", "10", "--max-new-tokens", "24",
                              "--bounds", "0.1,8", "--temperatures", "0.8:0.4", "--steps", "4",
                              "--ar-temperatures", "0", "--judge", str(judge_dir), "--out", str(out)])
    assert quality.run(args) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    labels = [row["label"] for row in report["settings"]]
    # The tiny model's generation_config: bound 0.1, t 0.8 -> 0.4, 4 steps, adaptive.
    assert labels == ["bound 0.1, t 0.8→0.4, 4 steps (shipped)", "bound 8, t 0.8→0.4, 4 steps", "AR T 0"]
    assert report["passages"]["count"] == 2 and report["seeds"] == [0, 1]
    for row in [report["reference"], *report["settings"]]:
        metrics = row["metrics"]
        for key in ("gen_ppl", "gen_ppl_geomean", "gen_ppl_ci95", "unigram_entropy", "distinct_1", "distinct_2",
                    "distinct_3", "mean_words", "tokens_per_forward", "tokens_per_second", "judge_tokens"):
            assert key in metrics, (row["label"], key)
        assert row["label"] in captured.out  # the table
    for row in report["settings"]:
        samples = row["samples"]
        assert len(samples) == 4 and {(s["passage"], s["seed"]) for s in samples} == {(0, 0), (1, 0), (0, 1), (1, 1)}
        assert all(len(s["text"].split()) <= 10 and s["nll"] is not None for s in samples)
        m = row["metrics"]
        assert m["tokens_per_forward"] == pytest.approx(sum(s["tokens"] for s in samples) /
                                                        sum(s["forwards"] for s in samples))
        if row["kind"] == "autoregressive":
            assert m["tokens_per_forward"] == 1.0
    greedy = report["settings"][-1]["samples"]
    assert greedy[0]["text"] == greedy[2]["text"]  # temperature 0: both seeds alike
    assert report["reference"]["metrics"]["gen_ppl"] > 0
    assert "ETA" in captured.err


def test_samples_are_what_generate_and_autoregressive_decoding_give(text_model_dir):
    import dgemma
    from dgemma.generation import SpeculativeStats, autoregressive_steps, speculative_steps
    from dgemma.tokenizer import Tokenizer

    model, tokenizer = dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)
    ids = tokenizer.encode("It is a truth universally acknowledged")
    config = model.generation_config.updated(max_new_tokens=24, entropy_bound=2.0)
    eos = config.eos_token_ids
    text, tokens, forwards, _ = quality.sample_diffusion(model, tokenizer, ids, config,
                                                         torch.Generator().manual_seed(5), words=1000)
    out = model.generate(torch.tensor([ids]), generation_config=config, generator=torch.Generator().manual_seed(5))
    new = out.new_tokens(0, len(ids), eos)
    assert text == tokenizer.decode([t for t in new if t not in eos])
    assert (tokens, forwards) == (len(new), int(out.decoder_forward_passes[0]))

    # Stopping at a word count keeps the same first words.
    short, *_ = quality.sample_diffusion(model, tokenizer, ids, config, torch.Generator().manual_seed(5), words=3)
    assert cut_words(short, 3) == cut_words(text, 3)

    text, tokens, forwards, _ = quality.sample_autoregressive(model, tokenizer, ids, 24, eos, quality.ARSetting(0.9),
                                                              torch.Generator().manual_seed(5), words=1000)
    steps = list(autoregressive_steps(model, torch.tensor([ids]), 24, eos, 0.9, torch.Generator().manual_seed(5)))
    assert text == tokenizer.decode([t for t in steps if t not in eos]) and tokens == forwards == len(steps)

    # Speculative decoding writes the same sample; its forwards are its drafts' decoder passes and its encoder passes.
    speculative = quality.ARSetting(0.9, draft_steps=2)
    assert speculative.kind == "speculative" and "drafts of 2 steps" in speculative.label
    same, tokens, forwards, _ = quality.sample_autoregressive(model, tokenizer, ids, 24, eos, speculative,
                                                              torch.Generator().manual_seed(5), words=1000,
                                                              draft=config)
    stats = SpeculativeStats()
    list(speculative_steps(model, torch.tensor([ids]), 24, eos, 0.9, torch.Generator().manual_seed(5),
                           draft=config.updated(max_denoising_steps=2), draft_generator=torch.Generator().manual_seed(6),
                           stats=stats))
    assert same == text and tokens == len(steps) and forwards == stats.forwards


def test_denoiser_report_compares_decoder_and_encoder_on_true_continuations(text_model_dir):
    import dgemma
    from conftest import TEXT
    from dgemma.evaluation.denoiser import NOISE_RATES, denoiser_report
    from dgemma.tokenizer import Tokenizer

    model, tokenizer = dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)
    passages = passages_of(TEXT.replace(". ", ".\n"), "text", 20)[:2]
    report = denoiser_report(model, tokenizer, [split_passage(p.text, 6, 14) for p in passages], draws=1)
    assert report["prompts"] == 2 and report["canvas_length"] == 8
    assert [b["positions"] for b in report["by_position"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert report["encoder"] == pytest.approx(sum(b["encoder"] for b in report["by_position"]) / 4)
    assert set(report["corrupted_at_t"]) == {str(t) for t in NOISE_RATES}
    assert report["clean_at_t"]["1.0"] is None and all(math.isfinite(v) for v in report["corrupted_at_t"].values())
    with pytest.raises(ValueError, match="fills a canvas"):
        denoiser_report(model, tokenizer, [("It is", " a")])
