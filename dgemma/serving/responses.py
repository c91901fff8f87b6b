"""OpenAI response shaping: error bodies, server-sent events, completion and chat choices, streamed chunks.

Design choices:
- One `Shaper` per request knows whether it is a chat or a completion and builds every JSON body of it.
- `collect` (a whole response) and `stream` (SSE chunks) read the same events of a `Generation`; a stop string
  ends its choice at once (its rows are freed at the next step).
- Drafts (`stream_options.include_drafts`) are extra chunks whose top-level `draft` field holds the canvas after
  a denoising step and whose `delta` is empty, so clients that only concatenate deltas are unaffected.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi.responses import Response

from ..tokenizer import Tokenizer
from .guard import error_body
from .scheduler import Commit, Draft, Finish
from .service import ChoiceText, Generation


RETRY_AFTER = "1"  # seconds a client told 429 should wait: rows free every step, the queue moves in about that


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's error shape, as ASCII JSON: safe whatever a message quotes from the request."""
    return Response(error_body(message, kind, code, param), status_code=status, headers=headers,
                    media_type="application/json")


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Shaper:
    chat: bool
    model_name: str
    request_id: str
    created: int
    tokenizer: Tokenizer
    eos_ids: list[int]

    def envelope(self, streaming: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model_name}

    def chunk(self, index: int, content: str = "", reasoning: str = "", finish: str | None = None,
              extra: dict | None = None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content:
                delta["content"] = content
            if reasoning:
                delta["reasoning_content"] = reasoning
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": content, "finish_reason": finish, "logprobs": None}
        return sse({**self.envelope(streaming=True), "choices": [choice], **(extra or {})})

    def choice(self, index: int, text: ChoiceText, finish: Finish) -> dict[str, Any]:
        reasoning, content = text.final_parts()
        reason = finish_reason(finish, text)
        if not self.chat:
            return {"index": index, "text": content, "finish_reason": reason, "logprobs": None}
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {"index": index, "message": message, "finish_reason": reason}

    def completion_tokens(self, tokens: list[int]) -> int:
        return sum(1 for t in tokens if t not in self.eos_ids)

    def draft(self, event: Draft) -> dict[str, Any]:
        return {"canvas": event.canvas_index, "step": event.step, "tokens": event.argmax,
                "text": self.tokenizer.decode(event.argmax), "accepted": event.accepted,
                "pieces": [self.tokenizer.decode([t]) for t in event.argmax],
                "entropy": [round(e, 4) for e in event.entropy]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(event: Finish, text: ChoiceText) -> str:
    if text.stopped:
        return "stop"
    return {"stop": "stop", "length": "length"}.get(event.reason, event.reason)


FAILURES = {"timeout": (504, "timeout_error"), "error": (500, "server_error")}


async def collect(generation: Generation, texts: list[ChoiceText]) -> dict[int, Finish]:
    """Every choice's end, with its text accumulated in `texts`."""
    finishes: dict[int, Finish] = {}
    async for index, event in generation.events():
        if index in finishes:
            continue
        if isinstance(event, Commit):
            texts[index].add(event.tokens, final=False)
            if texts[index].stopped:
                generation.cancel_choice(index)
        elif isinstance(event, Finish):
            texts[index].add([], final=True)
            finishes[index] = event
    return finishes


def whole_response(shaper: Shaper, finishes: dict[int, Finish], texts: list[ChoiceText],
                   prompt_tokens: int) -> dict[str, Any] | Response:
    for reason, (status, kind) in FAILURES.items():
        failed = [f for f in finishes.values() if f.reason == reason]
        if failed:
            return error(status, failed[0].message or reason, kind, reason)
    choices = [shaper.choice(index, texts[index], finishes[index]) for index in sorted(finishes)]
    used = sum(shaper.completion_tokens(f.generated) for f in finishes.values())
    return {**shaper.envelope(streaming=False), "choices": choices, "usage": usage(prompt_tokens, used)}


async def stream(shaper: Shaper, generation: Generation, texts: list[ChoiceText], prompt_tokens: int,
                 include_usage: bool) -> AsyncIterator[str]:
    done: set[int] = set()
    used = 0
    if shaper.chat:
        for index in range(len(texts)):
            yield shaper.chunk(index, role=True)
    async for index, event in generation.events():
        if index in done:
            continue
        if isinstance(event, Draft):
            yield shaper.chunk(index, extra={"draft": shaper.draft(event)})
        elif isinstance(event, Commit):
            reasoning, content = texts[index].add(event.tokens, final=False)
            if reasoning or content:
                yield shaper.chunk(index, content, reasoning)
            if texts[index].stopped:
                generation.cancel_choice(index)
                done.add(index)
                used += shaper.completion_tokens(texts[index].ids)
                yield shaper.chunk(index, finish="stop")
        elif isinstance(event, Finish):
            done.add(index)
            if event.reason in FAILURES:
                yield sse({"error": {"message": event.message or event.reason, "type": FAILURES[event.reason][1],
                                     "code": event.reason, "param": None}})
                continue
            reasoning, content = texts[index].add([], final=True)
            if reasoning or content:
                yield shaper.chunk(index, content, reasoning)
            used += shaper.completion_tokens(event.generated)
            yield shaper.chunk(index, finish=finish_reason(event, texts[index]))
    if include_usage:
        yield sse({**shaper.envelope(streaming=True), "choices": [], "usage": usage(prompt_tokens, used)})
    yield sse("[DONE]")
