"""OpenAI response shaping: error bodies, server-sent events, completion and chat choices, streamed chunks, and the
Responses API's objects and event stream.

Design choices:
- One `Shaper` per request knows whether it is a chat or a completion and builds every JSON body of it; every
  body and chunk carries `system_fingerprint` (the package version and a hash of the model served).
- `collect` (a whole response) and `stream` (SSE chunks) read the same events of a `Generation`; a stop string
  ends its choice at once (its rows are freed at the next step).
- The first chunk of a chat stream carries the role and `"content": ""`, as OpenAI's does.
- Drafts (`stream_options.include_drafts`) are extra chunks whose top-level `draft` field holds the canvas after
  a denoising step and whose `delta` is empty, so clients that only concatenate deltas are unaffected.
- Log-probabilities: chat's `logprobs.content` entries (`token`, `logprob`, `bytes`, `top_logprobs`), the legacy
  completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`; streamed with the canvas that
  committed their tokens (the text of a chunk may lag by a held-back character or stop-string prefix).
- The Responses API (`ResponsesShaper`): a `response` object with a reasoning item when the model thought and one
  message item; streamed as OpenAI's typed events (`response.created`, `response.output_text.delta`, ...,
  `response.completed` or `response.incomplete`), with `dgemma.draft` events per denoising step on request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi.responses import Response

from ..tokenizer import Tokenizer
from .guard import error_body
from .protocol import ResponsesRequest
from .scheduler import Commit, Draft, Finish
from .service import ChoiceText, Entry, Generation, TokenPieces, finite


RETRY_AFTER = "1"  # seconds a client told 429 should wait: rows free every step, the queue moves in about that


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's error shape, as ASCII JSON: safe whatever a message quotes from the request."""
    return Response(error_body(message, kind, code, param), status_code=status, headers=headers,
                    media_type="application/json")


def sse(payload: dict[str, Any] | str, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def entry_json(entry: Entry, pieces: TokenPieces) -> dict[str, Any]:
    """A chat (and Responses) logprobs entry: the token, its log-probability and bytes, and the alternatives."""
    text, raw = pieces(entry.token)
    return {"token": text, "logprob": finite(entry.logprob), "bytes": raw,
            "top_logprobs": [{"token": pieces(t)[0], "logprob": finite(v), "bytes": pieces(t)[1]}
                             for t, v in entry.top]}


@dataclass
class Shaper:
    chat: bool
    model_name: str
    request_id: str
    created: int
    tokenizer: Tokenizer
    eos_ids: list[int]
    fingerprint: str = ""
    pieces: TokenPieces | None = None  # set when the request asks for log-probabilities
    sent_bytes: dict[int, bytes] = field(default_factory=dict)  # completions: each choice's token bytes so far

    def envelope(self, streaming: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.fingerprint}

    def chunk(self, index: int, content: str = "", reasoning: str = "", finish: str | None = None,
              extra: dict | None = None, role: bool = False, entries: list[Entry] | None = None) -> str:
        logprobs = self.logprobs(index, entries) if entries else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if content:
                delta["content"] = content
            if reasoning:
                delta["reasoning_content"] = reasoning
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": content, "finish_reason": finish, "logprobs": logprobs}
        return sse({**self.envelope(streaming=True), "choices": [choice], **(extra or {})})

    def logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        """The `logprobs` of a choice (or of a chunk: the entries it adds). Completions' `text_offset` counts
        characters from the start of the choice's text."""
        if self.chat:
            return {"content": [entry_json(e, self.pieces) for e in entries], "refusal": None}
        seen = self.sent_bytes.get(index, b"")
        tokens, values, tops, offsets = [], [], [], []
        for entry in entries:
            text, raw = self.pieces(entry.token)
            offsets.append(len(seen.decode("utf-8", "ignore")))
            seen += bytes(raw)
            tokens.append(text)
            values.append(finite(entry.logprob))
            tops.append({self.pieces(t)[0]: finite(v) for t, v in entry.top})
        self.sent_bytes[index] = seen
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, index: int, text: ChoiceText, finish: Finish) -> dict[str, Any]:
        reasoning, content = text.final_parts()
        reason = finish_reason(finish, text)
        logprobs = self.logprobs(index, text.content_entries(self.pieces)) if self.pieces is not None else None
        if not self.chat:
            return {"index": index, "text": content, "finish_reason": reason, "logprobs": logprobs}
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": logprobs}

    def completion_tokens(self, tokens: list[int]) -> int:
        return sum(1 for t in tokens if t not in self.eos_ids)

    def draft(self, event: Draft) -> dict[str, Any]:
        return draft_json(self.tokenizer, event)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(event: Finish, text: ChoiceText) -> str:
    if text.stopped:
        return "stop"
    return {"stop": "stop", "length": "length"}.get(event.reason, event.reason)


FAILURES = {"timeout": (504, "timeout_error"), "error": (500, "server_error")}


def add_commit(text: ChoiceText, event: Commit, final: bool = False) -> tuple[str, str]:
    return text.add(event.tokens, final, event.logprobs, event.top_logprobs)


async def collect(generation: Generation, texts: list[ChoiceText]) -> dict[int, Finish]:
    """Every choice's end, with its text accumulated in `texts`."""
    finishes: dict[int, Finish] = {}
    async for index, event in generation.events():
        if index in finishes:
            continue
        if isinstance(event, Commit):
            add_commit(texts[index], event)
            if texts[index].stopped:
                generation.cancel_choice(index)
        elif isinstance(event, Finish):
            texts[index].add([], final=True)
            finishes[index] = event
    return finishes


def failure(finishes: dict[int, Finish]) -> Response | None:
    for reason, (status, kind) in FAILURES.items():
        failed = [f for f in finishes.values() if f.reason == reason]
        if failed:
            return error(status, failed[0].message or reason, kind, reason)
    return None


def whole_response(shaper: Shaper, finishes: dict[int, Finish], texts: list[ChoiceText],
                   prompt_tokens: int) -> dict[str, Any] | Response:
    failed = failure(finishes)
    if failed is not None:
        return failed
    choices = [shaper.choice(index, texts[index], finishes[index]) for index in sorted(finishes)]
    used = sum(shaper.completion_tokens(f.generated) for f in finishes.values())
    return {**shaper.envelope(streaming=False), "choices": choices, "usage": usage(prompt_tokens, used)}


async def stream(shaper: Shaper, generation: Generation, texts: list[ChoiceText], prompt_tokens: int,
                 include_usage: bool) -> AsyncIterator[str]:
    done: set[int] = set()
    used = 0
    pieces = shaper.pieces
    if shaper.chat:
        for index in range(len(texts)):
            yield shaper.chunk(index, role=True)
    async for index, event in generation.events():
        if index in done:
            continue
        text = texts[index]
        if isinstance(event, Draft):
            yield shaper.chunk(index, extra={"draft": shaper.draft(event)})
        elif isinstance(event, Commit):
            reasoning, content = add_commit(text, event)
            entries = text.new_entries(pieces) if pieces is not None and not text.stopped else None
            if reasoning or content or entries:
                yield shaper.chunk(index, content, reasoning, entries=entries)
            if text.stopped:
                generation.cancel_choice(index)
                done.add(index)
                used += shaper.completion_tokens(text.ids)
                entries = text.new_entries(pieces) if pieces is not None else None
                yield shaper.chunk(index, finish="stop", entries=entries)
        elif isinstance(event, Finish):
            done.add(index)
            if event.reason in FAILURES:
                yield sse({"error": {"message": event.message or event.reason, "type": FAILURES[event.reason][1],
                                     "code": event.reason, "param": None}})
                continue
            reasoning, content = text.add([], final=True)
            entries = text.new_entries(pieces) if pieces is not None else None
            if reasoning or content or entries:
                yield shaper.chunk(index, content, reasoning, entries=entries)
            used += shaper.completion_tokens(event.generated)
            yield shaper.chunk(index, finish=finish_reason(event, text))
    if include_usage:
        yield sse({**shaper.envelope(streaming=True), "choices": [], "usage": usage(prompt_tokens, used)})
    yield sse("[DONE]")


# ---- the Responses API -----------------------------------------------------------------------------------------

@dataclass
class ResponsesShaper:
    """The Responses API's objects for one request (one choice)."""

    request: ResponsesRequest
    model_name: str
    tokenizer: Tokenizer
    eos_ids: list[int]
    prompt_tokens: int
    pieces: TokenPieces | None = None
    response_id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    message_id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    reasoning_id: str = field(default_factory=lambda: "rs_" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], text: ChoiceText | None = None,
                 finish: Finish | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        request = self.request
        fmt = request.text.format.model_dump(by_alias=True, exclude_none=True) if (
            request.text is not None and request.text.format is not None) else {"type": "text"}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        body = {"id": self.response_id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model_name, "output": output, "error": error, "incomplete_details": incomplete,
                "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "top_logprobs": request.top_logprobs,
                "tools": [], "tool_choice": request.tool_choice or "auto", "parallel_tool_calls": False,
                "text": {"format": fmt}, "metadata": request.metadata or {}, "user": request.user,
                "truncation": request.truncation or "disabled", "reasoning": None, "background": False,
                "previous_response_id": None, "service_tier": "default", "usage": None}
        if text is not None and finish is not None:
            generated = sum(1 for t in finish.generated if t not in self.eos_ids)
            thought = text.reasoning_tokens()
            body["usage"] = {"input_tokens": self.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                             "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": thought},
                             "total_tokens": self.prompt_tokens + generated}
        return body

    def status(self, finish: Finish) -> str:
        return "incomplete" if finish.reason == "length" else "completed"

    def reasoning_item(self, reasoning: str, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": reasoning}]}

    def text_part(self, content: str, entries: list[Entry] | None) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": content, "annotations": []}
        part["logprobs"] = [entry_json(e, self.pieces) for e in entries] if entries is not None else []
        return part

    def message_item(self, status: str, part: dict[str, Any] | None) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [part] if part is not None else []}

    def output(self, text: ChoiceText, status: str) -> list[dict[str, Any]]:
        reasoning, content = text.final_parts()
        entries = text.content_entries(self.pieces) if self.pieces is not None else None
        items = [self.reasoning_item(reasoning, status)] if reasoning is not None else []
        return items + [self.message_item(status, self.text_part(content, entries))]

    def whole(self, text: ChoiceText, finish: Finish) -> dict[str, Any]:
        status = self.status(finish)
        return self.response(status, self.output(text, status), text, finish)


async def stream_response(shaper: ResponsesShaper, generation: Generation, text: ChoiceText,
                          drafts: bool) -> AsyncIterator[str]:
    """The Responses API's event stream for one generation."""
    number = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        number += 1
        return sse({"type": kind, "sequence_number": number - 1, **fields}, event=kind)

    pieces = shaper.pieces
    state = {"reasoning": None, "message": None}  # output index of each item once opened
    reasoning_text, content_text, entries_sent = [], [], []

    def open_reasoning() -> list[str]:
        if state["reasoning"] is not None or state["message"] is not None:
            return []
        state["reasoning"] = 0
        return [event("response.output_item.added", output_index=0,
                      item=shaper.reasoning_item("", "in_progress") | {"content": []}),
                event("response.content_part.added", item_id=shaper.reasoning_id, output_index=0, content_index=0,
                      part={"type": "reasoning_text", "text": ""})]

    def close_reasoning(status: str) -> list[str]:
        if state["reasoning"] is None or state["message"] is not None:
            return []
        whole = "".join(reasoning_text)
        index = state["reasoning"]
        return [event("response.reasoning_text.done", item_id=shaper.reasoning_id, output_index=index,
                      content_index=0, text=whole),
                event("response.content_part.done", item_id=shaper.reasoning_id, output_index=index,
                      content_index=0, part={"type": "reasoning_text", "text": whole}),
                event("response.output_item.done", output_index=index, item=shaper.reasoning_item(whole, status))]

    def open_message(status: str = "completed") -> list[str]:
        if state["message"] is not None:
            return []
        out = close_reasoning(status)
        state["message"] = 0 if state["reasoning"] is None else 1
        index = state["message"]
        return out + [event("response.output_item.added", output_index=index,
                            item=shaper.message_item("in_progress", None)),
                      event("response.content_part.added", item_id=shaper.message_id, output_index=index,
                            content_index=0, part=shaper.text_part("", [] if pieces is not None else None))]

    def deltas(reasoning: str, content: str, entries: list[Entry] | None) -> list[str]:
        out = []
        if reasoning:
            out += open_reasoning()
            reasoning_text.append(reasoning)
            out.append(event("response.reasoning_text.delta", item_id=shaper.reasoning_id,
                             output_index=state["reasoning"], content_index=0, delta=reasoning))
        if content or entries:
            out += open_message()
            content_text.append(content)
            entries_sent.extend(entries or [])
            out.append(event("response.output_text.delta", item_id=shaper.message_id,
                             output_index=state["message"], content_index=0, delta=content,
                             logprobs=[entry_json(e, pieces) for e in entries or []]))
        return out

    for chunk in (event("response.created", response=shaper.response("in_progress", [])),
                  event("response.in_progress", response=shaper.response("in_progress", []))):
        yield chunk
    async for _, item in generation.events():
        if isinstance(item, Draft):
            if drafts:
                yield event("dgemma.draft", draft=draft_json(shaper.tokenizer, item))
        elif isinstance(item, Commit):
            reasoning, content = add_commit(text, item)
            for chunk in deltas(reasoning, content, text.new_entries(pieces) if pieces is not None else None):
                yield chunk
        elif isinstance(item, Finish):
            if item.reason in FAILURES:
                failed = {"code": item.reason if item.reason != "error" else "server_error",
                          "message": item.message or item.reason}
                yield event("response.failed", response=shaper.response("failed", [], error=failed))
                return
            reasoning, content = text.add([], final=True)
            for chunk in deltas(reasoning, content, text.new_entries(pieces) if pieces is not None else None):
                yield chunk
            status = shaper.status(item)
            for chunk in open_message(status):  # an empty answer still has its (empty) message
                yield chunk
            whole = "".join(content_text)
            part = shaper.text_part(whole, entries_sent if pieces is not None else None)
            index = state["message"]
            yield event("response.output_text.done", item_id=shaper.message_id, output_index=index,
                        content_index=0, text=whole, logprobs=part["logprobs"])
            yield event("response.content_part.done", item_id=shaper.message_id, output_index=index,
                        content_index=0, part=part)
            yield event("response.output_item.done", output_index=index, item=shaper.message_item(status, part))
            final = shaper.response(status, shaper.output(text, status), text, item)
            yield event("response.completed" if status == "completed" else "response.incomplete", response=final)


def draft_json(tokenizer: Tokenizer, event: Draft) -> dict[str, Any]:
    """The canvas after a denoising step, as chat chunks' `draft` and the Responses API's `dgemma.draft` carry it."""
    return {"canvas": event.canvas_index, "step": event.step, "tokens": event.argmax,
            "text": tokenizer.decode(event.argmax), "accepted": event.accepted,
            "pieces": [tokenizer.decode([t]) for t in event.argmax], "entropy": [round(e, 4) for e in event.entropy]}
