"""Every mistake on the command line gets one line that names it and exit status 2, never a traceback; Ctrl-C
exits 130, a closed stdout 141, unfinished structured output 1 (see the conventions in dgemma/cli.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dgemma.cli import main

BAD = "caf\udce9 \udcff"  # what Python makes of the bytes b"caf\xe9 \xff" in a command line (surrogateescape)


def error_line(capsys) -> str:
    """The single line a failed command wrote to stderr (and nothing to stdout)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgemma: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("argv, what", [
    (["generate", BAD], "the prompt is not valid UTF-8: byte 0xe9 at byte 3"),
    (["generate", BAD, "--chat"], "the prompt is not valid UTF-8: byte 0xe9 at byte 3"),
    (["generate", BAD + " {{2}}", "--infill"], "the prompt is not valid UTF-8: byte 0xe9 at byte 3"),
    (["generate", "x", "--regex", BAD], "--regex is not valid UTF-8: byte 0xe9 at byte 3"),
    (["generate", "x", "--json-schema", '{"enum": ["' + BAD + '"]}'], "--json-schema is not valid UTF-8: byte 0xe9"),
    (["chat", "--system", BAD], "--system is not valid UTF-8: byte 0xe9 at byte 3"),
])
def test_text_that_is_not_utf8_is_refused_everywhere_it_enters(text_model_dir, capsys, argv, what):
    assert main(argv[:1] + ["--model", str(text_model_dir)] + argv[1:]) == 2
    line = error_line(capsys)
    assert what in line and "iconv" in line


def test_chat_refuses_a_line_that_is_not_utf8_and_keeps_the_conversation(text_model_dir, capsys, monkeypatch):
    from dgemma.tokenizer import Tokenizer

    conversations = []
    encode_chat = Tokenizer.encode_chat
    monkeypatch.setattr(Tokenizer, "encode_chat",
                        lambda self, messages, *a, **k: conversations.append(messages) or encode_chat(self, messages))
    lines = iter(["Good morning", BAD, "And then?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(text_model_dir), "--seed", "0", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("model> ") == 2 and "Traceback" not in captured.err
    assert "the line is not valid UTF-8" in captured.err and "not sent" in captured.err
    assert [m["content"] for m in conversations[-1] if m["role"] == "user"] == ["Good morning", "And then?"]


@pytest.fixture
def short_context_model(text_model_dir, tmp_path):
    """The tiny model with a context of 24 tokens."""
    directory = tmp_path / "short"
    shutil.copytree(text_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 24
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_prompt_longer_than_the_context_is_refused_with_the_numbers(short_context_model, capsys):
    long_prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    assert main(["generate", "--model", str(short_context_model), long_prompt, "--max-new-tokens", "4"]) == 2
    line = error_line(capsys)
    assert "the prompt is" in line and "context holds 24 " in line and "max_position_embeddings" in line
    assert main(["generate", "--model", str(short_context_model), "It is", "--max-new-tokens", "30"]) == 2
    line = error_line(capsys)
    assert "plus the token budget (30) exceed the model's context of 24 tokens" in line
    assert "--max-new-tokens 21 or less" in line  # BOS + 2 prompt tokens
    assert main(["generate", "--model", str(short_context_model), "It is", "--max-new-tokens", "21"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(short_context_model), "It is {{30}}.", "--infill"]) == 2
    assert "context holds 24" in error_line(capsys)


def test_chat_says_when_the_conversation_outgrows_the_context(short_context_model, capsys, monkeypatch):
    lines = iter(["Hi", "Once more", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(short_context_model), "--seed", "0", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("model> ") == 1
    assert "the conversation" in captured.err and "/reset" in captured.err and "Traceback" not in captured.err


def test_files_and_directories_are_named(text_model_dir, tmp_path, capsys):
    model = ["--model", str(text_model_dir)]
    assert main(["generate", *model, "x", "--json-schema", str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in error_line(capsys)
    assert main(["generate", *model, "x", "--json-schema", str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)
    (tmp_path / "bad.json").write_text("{'type': 'object'}")
    assert main(["generate", *model, "x", "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "bad.json is not valid JSON" in error_line(capsys)
    (tmp_path / "latin1.json").write_bytes(b'{"enum": ["caf\xe9"]}')
    assert main(["generate", *model, "x", "--json-schema", str(tmp_path / "latin1.json")]) == 2
    assert "latin1.json is not UTF-8 text (byte 0xe9 at byte 14)" in error_line(capsys)
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "x"]) == 2
    assert "nowhere does not exist" in error_line(capsys)
    for argv in (["info", str(tmp_path / "nowhere")], ["info", "--model", str(tmp_path / "nowhere")]):
        assert main(argv) == 2
        line = error_line(capsys)
        assert "nowhere does not exist" in line and "--model" not in line


def test_system_errors_are_one_line_too(text_model_dir, capsys, monkeypatch):
    def refuse(value):
        raise PermissionError(13, "Permission denied", "/models/secret/config.json")

    monkeypatch.setattr("dgemma.checkpoints.resolve_checkpoint", refuse)
    assert main(["info", "/models/secret"]) == 2
    assert error_line(capsys) == "dgemma: error: /models/secret/config.json: Permission denied"
    assert main(["generate", "x", "--device", "meta"]) == 2
    assert "--device meta: dgemma runs on cpu, cuda or mps" in error_line(capsys)


def test_usage_errors_show_the_command_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--no-such-flag", "x"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dgemma generate") and "unrecognized arguments: --no-such-flag" in err
    with pytest.raises(SystemExit) as exit:
        main(["info", "--threads", "2"])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith("usage: dgemma info")
    with pytest.raises(SystemExit) as exit:
        main(["generate", "x", "--threads", "0"])
    assert exit.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    import dgemma
    assert capsys.readouterr().out.startswith(f"dgemma {dgemma.__version__} (torch ")


def test_an_unavailable_device_is_named(capsys):
    assert main(["generate", "x", "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device" in error_line(capsys)
    import torch
    if not torch.cuda.is_available():
        assert main(["generate", "x", "--device", "cuda"]) == 2
        assert "--device cuda: this torch" in error_line(capsys)


def test_ctrl_c_exits_130_without_a_traceback(text_model_dir, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr("dgemma.generation.generate_steps", interrupted)
    assert main(["generate", "--model", str(text_model_dir), "x", "--show-denoising"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_structured_output_cut_by_the_budget_says_so_and_exits_1(text_model_dir, capsys):
    assert main(["generate", "--model", str(text_model_dir), "Give JSON:", "--json-object", "--seed", "0",
                 "--max-new-tokens", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("Give JSON:{")  # the partial text is still printed
    assert "reached the token budget (1 new token) before the JSON object was complete" in captured.err
    assert main(["generate", "--model", str(text_model_dir), "Answer:", "--regex", "(yes|no)", "--seed", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() in ("Answer:yes", "Answer:no")


def test_infill_refuses_what_it_cannot_honour(text_model_dir, capsys):
    assert main(["generate", "--model", str(text_model_dir), "a {{2}} b", "--infill", "--chat"]) == 2
    assert "does not combine with --chat" in error_line(capsys)
    assert main(["generate", "--model", str(text_model_dir), "a {{2}} b", "--infill", "--max-new-tokens", "4"]) == 2
    assert "drop --max-new-tokens" in error_line(capsys)


def test_a_closed_stdout_ends_quietly_with_141(text_model_dir):
    """`dgemma info | head -3` when head has already gone: no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "-m", "dgemma", "info", str(text_model_dir)], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_serve_says_when_it_cannot_listen_before_loading_anything(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "/nonexistent"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in error_line(capsys)
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port 70000 is not a TCP port" in error_line(capsys)
