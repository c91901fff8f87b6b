"""The server's settings: every limit and default, defined once. `dgemma serve` builds its flags from them."""

from __future__ import annotations

from dataclasses import dataclass, field


def _setting(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class ServerSettings:
    host: str = _setting("127.0.0.1", "interface to bind (loopback only unless told otherwise)")
    port: int = _setting(8000, "port to listen on")
    api_key: str | None = _setting(None, "require `Authorization: Bearer KEY` on /v1/* (or set DGEMMA_API_KEY)")
    model_name: str = _setting("dgemma", "the model id clients ask for")
    max_sequences: int = _setting(8, "sequences denoised together (rows of the batch)")
    max_queue: int = _setting(64, "sequences waiting for a row before requests get 429")
    max_prompt_tokens: int = _setting(1536, "longest prompt, in tokens")
    max_tokens: int = _setting(512, "largest max_tokens a request may ask for (and the default)")
    timeout: float = _setting(300.0, "seconds a request may take before it gets 504")
    max_body_bytes: int = _setting(1 << 20, "largest request body, in bytes")

    @property
    def max_context(self) -> int:
        """The longest sequence a request may make: prompt plus completion."""
        return self.max_prompt_tokens + self.max_tokens
