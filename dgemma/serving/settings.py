"""The server's settings: every limit and default, defined once. `dgemma serve` builds its flags from them.

What a client gets past each limit (the README's serving section lists the same):
- `max_body_bytes`: 413, checked while the body is read, whatever its transfer encoding.
- `max_prompt_bytes`, `max_prompt_tokens`, `max_tokens`: 400 naming the limit, bytes checked before tokenising.
- `max_sequences` + `max_queue`: the sequences held at once (running or waiting); past them, 429 with
  `Retry-After` when a request's sequences do not fit now, 400 when they never can.
- `timeout`: 504. `read_timeout`: 408 and the connection closed. `keep_alive_timeout`: the idle connection closed.
- `api_key`: 401. `allowed_hosts`: 400 for any other Host header.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _setting(default, help_text: str):
    return field(default=default, metadata={"help": help_text})



@dataclass
class ServerSettings:
    host: str = _setting("127.0.0.1", "interface to bind (loopback only unless told otherwise)")
    port: int = _setting(8000, "port to listen on")
    api_key: str | None = _setting(None, "require `Authorization: Bearer KEY` on /v1/* (or set DGEMMA_API_KEY)")
    allowed_hosts: str = _setting("", "comma-separated Host header names the server answers (`*`: any); default: "
                                      "localhost and loopback addresses when bound to loopback, any otherwise")
    model_name: str = _setting("dgemma", "the model id clients ask for")
    max_sequences: int = _setting(8, "sequences denoised together (rows of the batch)")
    max_queue: int = _setting(64, "sequences waiting for a row: past max_sequences + max_queue held, requests get "
                                  "429 (a request with more sequences, prompts times n, than that gets 400)")
    max_prompt_tokens: int = _setting(1536, "longest prompt, in tokens")
    max_prompt_bytes: int = _setting(65536, "longest prompt (all chat messages together, or an infill template), "
                                            "in UTF-8 bytes, checked before tokenising")
    max_tokens: int = _setting(512, "largest max_tokens a request may ask for (and the default); also the largest "
                                    "infill region")
    timeout: float = _setting(300.0, "seconds a request may take before it gets 504")
    max_body_bytes: int = _setting(1 << 20, "largest request body, in bytes (413 past it, whatever the encoding)")
    read_timeout: float = _setting(10.0, "seconds a client may take to send a request's headers, and again its "
                                         "body, before it gets 408 and the connection is closed")
    keep_alive_timeout: float = _setting(5.0, "seconds an idle keep-alive connection stays open")

    @property
    def max_context(self) -> int:
        """The longest sequence a request may make: prompt plus completion."""
        return self.max_prompt_tokens + self.max_tokens
