"""The live view of a generation in a terminal: the prompt, the committed text and the canvas being denoised.

Design choices:
- On a terminal the view redraws in place, never taller than the window (the canvas, then the tail of the committed
  text that fits), so every redraw lands on the frame's first row; elsewhere (a file, a pipe, TERM=dumb) it writes
  plain text as each canvas commits, with no escape codes.
- Model text is shown safely: control characters in caret notation, so that generated text can never drive the
  terminal.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
import unicodedata

def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal that understands cursor movement (not a file, a pipe or TERM=dumb)."""
    try:
        return os.isatty(stream.fileno()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


CANVAS_ACCEPTED, CANVAS_DRAFT, STATUS = "36", "2;36", "2"  # SGR: cyan; dim cyan; dim


def _cell(char: str) -> tuple[str, int]:
    """How one character of model text is shown in the live view, and how many columns it takes. Control
    characters are shown in caret notation (a model's ESC must not drive the terminal), format characters
    (bidi overrides, zero-width joiners) are dropped, combining marks take no column."""
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return "^" + chr(code ^ 0x40), 2
    if 0x80 <= code < 0xA0:
        return "\ufffd", 1
    category = unicodedata.category(char)
    if category == "Cf":
        return "", 0
    if category in ("Mn", "Me"):
        return char, 0
    return char, 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def terminal_safe(text: str) -> str:
    """Model text as written to a terminal: newlines and tabs kept, other control characters shown in caret
    notation (^[ for ESC) so that generated text can never move the cursor or recolour the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char in "\n\t" else _cell(char)[0] for char in text)


def write_text(text: str, stream=None) -> None:
    """Print the command's text: as it is to files and pipes, `terminal_safe` to a terminal."""
    stream = stream if stream is not None else sys.stdout
    stream.write((terminal_safe(text) if is_terminal(stream) else text) + "\n")


def wrap_cells(segments: list[tuple[str, str, bool]], width: int) -> tuple[list[list[tuple[str, str]]], int | None]:
    """Rows of (text, style) cells, at most `width` columns each, for `segments` of (text, style, is_canvas);
    and the row where the first canvas segment begins (None without one). Newlines end rows; tabs stop every 8."""
    rows: list[list[tuple[str, str]]] = [[]]
    column, canvas_row = 0, None
    for text, style, is_canvas in segments:
        if is_canvas and canvas_row is None:
            canvas_row = len(rows) - 1
        for char in text:
            if char == "\n":
                rows.append([])
                column = 0
                continue
            if char == "\t":
                if column >= width:
                    rows.append([])
                    column = 0
                size = min(8 - column % 8, width - column)
                rows[-1].append((" " * size, style))
                column += size
                continue
            shown, size = _cell(char)
            if size == 0:
                if shown and rows[-1]:
                    last_text, last_style = rows[-1][-1]
                    rows[-1][-1] = (last_text + shown, last_style)
                continue
            if column + size > width:
                rows.append([])
                column = 0
            rows[-1].append((shown, style))
            column += size
    return rows, canvas_row


class CanvasView:
    """The live view of one generation: the prompt, the committed text and the canvas being denoised.

    On a terminal it redraws in place after every step (throttled to `min_interval`): the canvas inline after
    the committed text, accepted tokens in cyan and the rest dim, and a status line. A frame never holds more
    rows than the terminal has (the canvas's rows, then as much of the committed text's tail as fits above
    them), so moving the cursor back up to redraw always lands on the frame's first row; `finish` replaces the
    last frame with the final text, printed as the command prints it without the view. Anywhere else (a file,
    a pipe, TERM=dumb) it writes no escape codes: the prefix and then each committed canvas's text as it
    commits, ending in the final text (`stream_plain`), or nothing until `finish`."""

    def __init__(self, tokenizer, prefix: str = "", stream=None, live: bool | None = None,
                 stream_plain: bool = True, eos_token_ids=(), min_interval: float = 1 / 30):
        self.tokenizer, self.prefix = tokenizer, prefix
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.color = self.live and not os.environ.get("NO_COLOR")
        self.stream_plain, self.eos = stream_plain, set(eos_token_ids)
        self.min_interval = min_interval
        self.committed: list[int] = []
        self.height = 0  # rows of the frame on screen; the cursor is at the end of its last row
        self.written = ""  # plain mode: the text written so far
        self.last_draw = 0.0
        self.closed = False

    # ---- events ---------------------------------------------------------------------------------------------

    def start(self, prompt_tokens: int | None = None) -> None:
        if self.live:
            self._draw(None, f"encoding the prompt ({prompt_tokens} tokens)" if prompt_tokens else "")
        elif self.stream_plain:
            self._write_plain(self.prefix)

    def step(self, draft) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self.last_draw < self.min_interval:
            return
        accepted = int(draft.accepted[0].sum())
        self._draw(draft, f"canvas {draft.canvas_index + 1}, step {draft.step}: {accepted}/"
                          f"{draft.accepted.shape[1]} accepted")

    def commit(self, tokens: list[int], canvas_index: int = 0, steps: int = 0) -> None:
        self.committed += tokens
        if self.live:
            self._draw(None, f"canvas {canvas_index + 1} committed after {steps} steps")
        elif self.stream_plain:
            kept = []
            for token in self.committed:
                if token in self.eos:
                    break
                kept.append(token)
            text = self.prefix + self.tokenizer.decode(kept)
            stable = text.rstrip("\ufffd")  # an unfinished UTF-8 sequence may still complete
            if stable.startswith(self.written):
                self._write_plain(stable[len(self.written):])

    def finish(self, text: str | None) -> None:
        """Replace the view by `text` (the command's output, printed with a newline), or just remove it."""
        if self.closed:
            return
        self.closed = True
        if self.live:
            self._erase()
            if text is not None:
                self.stream.write(terminal_safe(text) + "\n")
        elif text is not None:
            if not self.stream_plain:
                self.stream.write(text + "\n")
            elif text.startswith(self.written):
                self.stream.write(text[len(self.written):] + "\n")
            else:
                self.stream.write("\n" + text + "\n")
        self.stream.flush()

    def abort(self) -> None:
        """Leave the view where it is and move below it (an error or Ctrl-C ended the generation)."""
        if self.closed:
            return
        self.closed = True
        if self.live and self.height:
            self.stream.write("\x1b[0m\r\n")
        elif not self.live and self.written:
            self.stream.write("\n")
        self.stream.flush()

    # ---- drawing --------------------------------------------------------------------------------------------

    def _write_plain(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()
            self.written += text

    def _erase(self) -> None:
        if self.height:
            self.stream.write("\r" + (f"\x1b[{self.height - 1}A" if self.height > 1 else "") + "\x1b[J")
        self.height = 0

    def _style(self, style: str) -> str:
        return f"\x1b[0;{style}m" if style and self.color else ("\x1b[0m" if self.color else "")

    def _render(self, row: list[tuple[str, str]]) -> str:
        out, current = [], ""
        for text, style in row:
            if style != current:
                out.append(self._style(style))
                current = style
            out.append(text)
        if current and self.color:
            out.append("\x1b[0m")
        return "".join(out)

    def frame(self, draft, status: str, columns: int, rows: int) -> list[str]:
        """The frame's lines for a terminal of `columns` x `rows`: at most `rows` lines, none wider than
        `columns` - 1 (a full last column leaves some terminals waiting to wrap)."""
        width, limit = max(1, columns - 1), max(2, rows)
        text = self.prefix + self.tokenizer.decode(self.committed)
        text = text[-(limit * width * 4):]  # more than the rows above the canvas can show
        segments = [(text, "", False)]
        if draft is not None:
            for token, accepted in zip(draft.argmax[0].tolist(), draft.accepted[0].tolist()):
                segments.append((self.tokenizer.decode([token]), CANVAS_ACCEPTED if accepted else CANVAS_DRAFT, True))
        body, canvas_row = wrap_cells(segments, width)
        if canvas_row is not None and len(body) - canvas_row > limit - 1:
            body = body[canvas_row:canvas_row + limit - 1]  # the canvas alone does not fit: its first rows
            status = "canvas cut to fit: " + status
        else:
            body = body[-(limit - 1):]
        lines = [self._render(row) for row in body]
        lines.append(self._render([(status[:width], STATUS)]) if status else "")
        return lines

    def _draw(self, draft, status: str) -> None:
        columns, rows = shutil.get_terminal_size()
        lines = self.frame(draft, status, columns, rows)
        moves = "\r" + (f"\x1b[{self.height - 1}A" if self.height > 1 else "") if self.height else ""
        self.stream.write(moves + "\x1b[J" + "\r\n".join(lines))
        self.stream.flush()
        self.height = len(lines)
        self.last_draw = time.monotonic()
