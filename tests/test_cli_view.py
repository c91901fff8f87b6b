"""The live denoising view on real terminals: under a pseudo-terminal of a small size the redraw stays within
the window (checked by emulating the terminal), the final screen holds the prompt and the answer, and output
that is not a terminal gets plain text."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import unicodedata
from types import SimpleNamespace

import pytest
import torch

from dgemma.cli import main
from dgemma.terminal import CanvasView, terminal_safe, wrap_cells
from dgemma.tokenizer import Tokenizer

ROWS, COLUMNS = 15, 60


class Terminal:
    """Just enough of a VT100 for what the live view writes, and strict about anything else: printable text
    with autowrap (deferred at the last column, as xterm does), CR, LF, cursor up (CSI n A), erase below
    (CSI J), erase line (CSI K), SGR (CSI ... m). Lines that scroll off the top go to `history`; `clamped`
    counts cursor-up moves that hit the top (a frame taller than the window)."""

    def __init__(self, rows: int, columns: int):
        self.rows, self.columns = rows, columns
        self.screen = [self._blank() for _ in range(rows)]
        self.wrapped = [False] * rows  # the row continues on the next one (autowrap)
        self.history: list[tuple[str, bool]] = []
        self.x = self.y = 0
        self.pending_wrap = False
        self.clamped = 0
        self.cursor_ups = 0

    def _blank(self) -> list[str]:
        return [" "] * self.columns

    def _linefeed(self) -> None:
        if self.y == self.rows - 1:
            self.history.append(("".join(self.screen.pop(0)), self.wrapped.pop(0)))
            self.screen.append(self._blank())
            self.wrapped.append(False)
        else:
            self.y += 1

    def feed(self, data: str) -> None:
        i = 0
        while i < len(data):
            char = data[i]
            if char == "\x1b":
                match = re.match(r"\x1b\[([0-9;]*)([A-Za-z])", data[i:])
                assert match, f"unexpected escape sequence {data[i:i + 12]!r}"
                params, op = match.group(1), match.group(2)
                if op == "A":
                    n = int(params or 1)
                    self.cursor_ups += 1
                    if n > self.y:
                        self.clamped += 1
                    self.y = max(0, self.y - n)
                elif op == "J":
                    assert params in ("", "0"), params
                    self.screen[self.y][self.x:] = [" "] * (self.columns - self.x)
                    for row in range(self.y + 1, self.rows):
                        self.screen[row] = self._blank()
                        self.wrapped[row] = False
                    self.wrapped[self.y] = False
                elif op == "K":
                    self.screen[self.y][self.x:] = [" "] * (self.columns - self.x)
                else:
                    assert op == "m", f"unexpected escape sequence {match.group(0)!r}"
                self.pending_wrap = False if op in "AJ" else self.pending_wrap
                i += match.end()
                continue
            if char == "\r":
                self.x, self.pending_wrap = 0, False
            elif char == "\n":
                self._linefeed()
                self.pending_wrap = False
            elif char == "\t":
                self.x = min(self.columns - 1, (self.x // 8 + 1) * 8)
            else:
                assert unicodedata.category(char) not in ("Cc", "Cf"), f"{char!r} reached the terminal raw"
                width = 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
                if self.pending_wrap or self.x + width > self.columns:
                    self.wrapped[self.y] = True
                    self.x, self.pending_wrap = 0, False
                    self._linefeed()
                self.screen[self.y][self.x] = char
                if width == 2:
                    self.screen[self.y][self.x + 1] = ""
                self.x += width
                if self.x >= self.columns:
                    self.x, self.pending_wrap = self.columns - 1, True
            i += 1

    def lines(self) -> list[str]:
        """Everything on the screen and in the scrollback, soft-wrapped rows joined into the lines they show."""
        rows = self.history + [("".join(row), wrapped) for row, wrapped in zip(self.screen, self.wrapped)]
        lines, current = [], ""
        for text, wrapped in rows:
            current += text if wrapped else text.rstrip()
            if not wrapped:
                lines.append(current)
                current = ""
        while lines and not lines[-1]:
            lines.pop()
        return lines


def run_in_terminal(argv: list[str], rows: int = ROWS, columns: int = COLUMNS, stdin: str | None = None,
                    timeout: float = 120) -> tuple[str, int]:
    """Run `dgemma argv` with a pseudo-terminal of rows x columns as stdout; everything it wrote and its exit
    status."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm"
    process = subprocess.Popen([sys.executable, "-m", "dgemma", *argv], stdout=follower, stderr=subprocess.PIPE,
                               stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, env=env)
    os.close(follower)
    if stdin is not None:
        process.stdin.write(stdin.encode())
        process.stdin.close()
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    code = process.wait(timeout=30)
    assert not process.stderr.read().strip() or code != 0
    return b"".join(chunks).decode("utf-8"), code


def shown_lines(text: str) -> list[str]:
    """The lines a terminal shows for `text` as dgemma writes it there (control characters made visible)."""
    return [line.rstrip() for line in terminal_safe(text).expandtabs().rstrip("\n").split("\n")]


# A prompt taller than the window: the committed text has to scroll inside the frame.
TALL_PROMPT = "\n".join(f"{i}. It is a truth universally acknowledged, that a single man" for i in range(20))
GENERATE = ["--max-new-tokens", "32", "--steps", "3", "--no-adaptive-stopping", "--seed", "0"]


def same_threads() -> list[str]:
    """The child computes with this process's thread count, so that its text is the one computed here."""
    return ["--threads", str(torch.get_num_threads())]


def test_live_view_stays_within_a_small_terminal_and_ends_on_the_prompt_and_the_answer(text_model_dir, capsys):
    assert main(["generate", "--model", str(text_model_dir), TALL_PROMPT, *GENERATE]) == 0
    expected = capsys.readouterr().out
    output, code = run_in_terminal(["generate", "--model", str(text_model_dir), TALL_PROMPT, "--show-denoising",
                                    *GENERATE, *same_threads()])
    assert code == 0
    terminal = Terminal(ROWS, COLUMNS)
    terminal.feed(output)
    # Every redraw went back up to its own first row: no frame was taller than the window.
    assert terminal.clamped == 0
    # Redrawn in place at least after every canvas (steps are drawn at most 30 times a second).
    assert terminal.cursor_ups >= 4 and "canvas 4 committed after 3 steps" in output
    # The first frame already shows the (tail of the) prompt, before any step.
    first = output[:output.index("\x1b[", 1)]
    assert "19. It is a truth" in first and "step" not in first
    # What is left, on the screen and in the scrollback, is exactly the text: no stale frame scrolled away.
    assert terminal.lines() == shown_lines(expected)


def test_chat_in_a_small_terminal_leaves_only_the_conversation(text_model_dir, capsys, monkeypatch):
    turns = ["Good morning", "And then?", ""]
    chat = ["chat", "--model", str(text_model_dir), "--seed", "0", "--max-new-tokens", "40"]

    def scripted_input(prompt=""):  # what input() does when stdin is a pipe
        print(prompt, end="")
        return lines.pop(0)

    lines = list(turns)
    monkeypatch.setattr("builtins.input", scripted_input)
    assert main(chat + ["--no-canvas"]) == 0
    expected = capsys.readouterr().out
    output, code = run_in_terminal(chat + same_threads(), stdin="\n".join(turns) + "\n")
    assert code == 0
    terminal = Terminal(ROWS, COLUMNS)
    terminal.feed(output)
    assert terminal.clamped == 0 and terminal.cursor_ups >= 2
    assert terminal.lines() == shown_lines(expected)
    assert sum(line.startswith("model> ") for line in terminal.lines()) == 2


def test_output_that_is_not_a_terminal_gets_the_same_text_without_escape_codes(text_model_dir, capsys):
    argv = ["generate", "--model", str(text_model_dir), "It is a truth", *GENERATE]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--show-denoising", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain  # the text as it commits, and nothing else: no escape codes, no status lines
    assert json.loads(captured.err.strip().splitlines()[-1])["decoder_passes"] == 12  # 4 canvases x 3 steps


def test_infill_shows_the_denoising_and_stats(text_model_dir, capsys):
    from dgemma.tasks import infill_text

    template = "It is a {{2}} universally {{3}}."
    assert main(["generate", "--model", str(text_model_dir), template, "--infill", "--seed", "0",
                 "--show-denoising", "--stats"]) == 0
    captured = capsys.readouterr()
    import dgemma
    model, tokenizer = dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)
    text, _ = infill_text(model, tokenizer, template, generator=torch.Generator().manual_seed(0))
    assert captured.out == text + "\n"
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["new_tokens"] == 5 and stats["decoder_passes"] >= 1


# ---- the frame, with hand-made events --------------------------------------------------------------------------

PIECES = ["<eos>", " the", " cat", "\x1b[2J", " sat", "\t", "\n", " on", " 世界", " mat", "e\u0301"]


class PieceTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids if i != 0 or not skip_special_tokens)


def draft(canvas_index: int, step: int, tokens: list[int], accepted: list[bool]):
    return SimpleNamespace(canvas_index=canvas_index, step=step, argmax=torch.tensor([tokens]),
                           accepted=torch.tensor([accepted]))


def drive(view: CanvasView, canvases: int, length: int, steps: int) -> str:
    view.start(3)
    for canvas in range(canvases):
        tokens = [(canvas * length + i) % (len(PIECES) - 1) + 1 for i in range(length)]
        for step in range(1, steps + 1):
            view.step(draft(canvas, step, tokens, [i < step * length // steps for i in range(length)]))
        view.commit(tokens, canvas, steps)
    text = view.prefix + PieceTokenizer().decode(view.committed)
    view.finish(text)
    return text


@pytest.mark.parametrize("rows, columns", [(15, 60), (4, 20), (2, 8)])
def test_every_frame_fits_the_window_whatever_its_size(monkeypatch, rows, columns):
    import io
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((columns, rows)))
    stream = io.StringIO()
    view = CanvasView(PieceTokenizer(), "Prompt:\n" * 3, stream, live=True, min_interval=0)
    text = drive(view, canvases=5, length=12, steps=3)
    terminal = Terminal(rows, columns)
    terminal.feed(stream.getvalue())  # no control character of the model's text reaches the terminal raw
    assert terminal.clamped == 0 and terminal.cursor_ups >= 15
    for frame in re.split(r"\r(?:\x1b\[\d+A)?\x1b\[J", stream.getvalue())[1:-1]:
        assert frame.count("\r\n") < rows
    assert "^[[2J" in stream.getvalue()  # the model's ESC, shown in caret notation
    assert terminal.lines()[-1].endswith(text.split("\n")[-1].rstrip()[-5:].rstrip())


def test_a_canvas_taller_than_the_window_is_cut_to_its_first_rows(monkeypatch):
    import io
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((20, 5)))
    view = CanvasView(PieceTokenizer(), "", io.StringIO(), live=True, min_interval=0)
    lines = view.frame(draft(0, 1, [1, 2, 4, 7, 9] * 8, [True] * 40), "canvas 1, step 1", 20, 5)
    assert len(lines) == 5 and "canvas cut to fit" in lines[-1]


def test_no_color_keeps_the_redraw_but_drops_the_colours(monkeypatch):
    import io
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((40, 10)))
    stream = io.StringIO()
    drive(CanvasView(PieceTokenizer(), "P", stream, live=True, min_interval=0), canvases=2, length=4, steps=2)
    assert not re.search(r"\x1b\[[0-9;]*m", stream.getvalue()) and "\x1b[J" in stream.getvalue()


def test_plain_view_streams_committed_text_and_ends_with_the_output():
    import io
    stream = io.StringIO()
    view = CanvasView(PieceTokenizer(), "Prompt:", stream, live=False, eos_token_ids=[0])
    view.start(3)
    view.step(draft(0, 1, [1, 2], [True, False]))
    assert stream.getvalue() == "Prompt:"
    view.commit([1, 2], 0, 1)
    assert stream.getvalue() == "Prompt: the cat"
    view.commit([4, 0, 7], 1, 1)  # text after an EOS is not part of the output
    assert stream.getvalue() == "Prompt: the cat sat"
    view.finish("Prompt: the cat sat")
    assert stream.getvalue() == "Prompt: the cat sat\n"


def test_wide_and_combining_characters_take_their_columns():
    rows, canvas_row = wrap_cells([("ab世界", "", False), ("e\u0301" * 3, "x", True)], width=5)
    assert ["".join(t for t, _ in row) for row in rows] == ["ab世", "界e\u0301e\u0301e\u0301"]
    assert canvas_row == 1
