"""Tokenizer, chat template and the `dgemma` command on a small model built here (no transformers needed)."""

from __future__ import annotations

import json

import pytest

import dgemma
from dgemma.cli import main
from dgemma.tokenizer import Tokenizer, TokenizerError, split_thinking, strip_thinking

@pytest.fixture(scope="module")
def model_dir(text_model_dir):
    return text_model_dir


def test_encode_adds_bos_once_and_decode_round_trips(model_dir):
    tok = Tokenizer.from_directory(model_dir)
    ids = tok.encode("a truth universally acknowledged")
    assert ids[0] == tok.bos_token_id == 2 and ids.count(2) == 1
    assert tok.decode(ids) == "a truth universally acknowledged"
    assert tok.encode("x", add_special_tokens=False)[0] != 2


def test_chat_template_renders_turns_and_strips_earlier_thoughts(model_dir):
    tok = Tokenizer.from_directory(model_dir)
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<|channel>thought\nsecret plan<channel|>Hello!"},
                {"role": "user", "content": "Again"}]
    text = tok.render_chat(messages)
    assert text == ("<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nAgain<turn|>\n"
                    "<|turn>model\n")
    assert "secret" not in text
    ids = tok.encode_chat(messages)
    assert ids[0] == 2 and ids.count(2) == 1 and tok.token_id("<|turn>") in ids


def test_thinking_is_split_from_the_answer():
    assert split_thinking("<|channel>thought\nweigh it<channel|>The answer.") == ("weigh it", "The answer.")
    assert split_thinking("Just an answer.") == (None, "Just an answer.")
    assert split_thinking("<|channel>thought\nunfinished") == ("unfinished", "")
    assert strip_thinking([{"role": "assistant", "content": "x", "reasoning_content": "y"}]) == [
        {"role": "assistant", "content": "x"}]


def test_template_errors_are_clear(model_dir, tmp_path):
    tok = Tokenizer.from_directory(model_dir)
    with pytest.raises(TokenizerError, match="messages\\[0\\]"):
        tok.render_chat([{"content": "no role"}])
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    tok.__dict__.pop("_template", None)
    with pytest.raises(TokenizerError, match="only user turns"):
        tok.render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_directory(tmp_path)


def test_generate_command_prints_the_completion(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "It is a truth", "--seed", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("It is a truth") and len(first) > len("It is a truth\n")
    assert main(["generate", "--model", str(model_dir), "It is a truth", "--seed", "0"]) == 0
    assert capsys.readouterr().out == first, "a seeded run repeats"


def test_chat_command_answers_each_turn_and_ends_on_an_empty_line(model_dir, capsys, monkeypatch):
    lines = iter(["Good morning", "And then?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(model_dir), "--no-canvas", "--seed", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_generate_command_reports_bad_input(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "x", "--steps", "0"]) == 2
    assert "max_denoising_steps" in capsys.readouterr().err


def test_info_command_counts_parameters(model_dir, capsys):
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = dgemma.load(model_dir)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info["active_parameters_per_token"] == info["parameters"] - experts // 2  # top-2 of 4 experts
    assert info["canvas_length"] == 8 and info["experts"] == 4 and info["layers"] == 2


def test_generate_command_structured_and_infill(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "Give JSON:", "--seed", "0", "--regex", "(yes|no)!",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Give JSON:") and out.strip().removeprefix("Give JSON:") in ("yes!", "no!", "")
    assert main(["generate", "--model", str(model_dir), "It is a {{2}} universally {{3}}.", "--infill",
                 "--seed", "0"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("It is a ") and " universally " in text and text.endswith(".")


def test_text_that_is_not_utf8_is_refused_naming_the_bytes(model_dir):
    tok = Tokenizer.from_directory(model_dir)
    # What Python makes of `dgemma generate "$(printf 'caf\xe9 \xff')"`: the bad bytes as lone surrogates.
    with pytest.raises(TokenizerError, match=r"not valid UTF-8: byte 0xe9 at byte 3 \('caf\\xe9 \\xff'\)"):
        tok.encode("caf\udce9 \udcff")
    with pytest.raises(TokenizerError, match="lone surrogate U\\+D800"):
        tok.encode("x\ud800")
    assert tok.decode(tok.encode("café")) == "café"
