"""`dgemma serve`: the OpenAI-compatible HTTP API (FastAPI), its error shapes, streaming and the playground.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET / (playground).
Streaming is server-sent events in OpenAI's chunk format; with `stream_options: {"include_drafts": true}` extra
chunks carry the canvas after every denoising step in a top-level `draft` field (their `delta` is empty, so
clients that only concatenate deltas are unaffected).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import Tokenizer
from .engine import Commit, Draft, Engine, Finish, QueueFull
from .protocol import ChatRequest, CompletionRequest
from .service import ChoiceText, Limits, Prompt, RequestError, Service, completion_tokens

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str = "dgemma"
    api_key: str | None = None
    max_sequences: int = 8
    max_queue: int = 64
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code,
                                                               "param": param}})


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(model, tokenizer: Tokenizer, settings: ServerSettings) -> FastAPI:
    limits = Limits(settings.max_prompt_tokens, settings.max_tokens, settings.request_timeout)
    engine = Engine(model, max_sequences=settings.max_sequences, max_queue=settings.max_queue,
                    max_context=settings.max_prompt_tokens + settings.max_tokens)
    service = Service(engine, tokenizer, settings.model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # Uvicorn has stopped accepting connections and let open ones finish; now let the engine drain.
        await asyncio.to_thread(engine.stop, True, 30.0)

    app = FastAPI(title="dgemma", lifespan=lifespan)
    app.state.engine, app.state.service = engine, service

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") and settings.api_key:
            if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return error(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                             "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error(413, f"request body of {length} bytes exceeds {settings.max_body_bytes}",
                         code="body_too_large")
        try:
            return await call_next(request)
        except Exception:  # never let a bug take the server down or leave a client without an answer
            logger.exception("request failed")
            return error(500, "internal error", "server_error", "internal_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "dgemma"}]}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("dgemma.serving").joinpath("playground.html").read_text()

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != settings.model_name:
            return error(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                         code="model_not_found", param="model")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (wrong := check_model(body.model)) is not None:
            return wrong
        try:
            prompts = service.completion_prompts(body)
        except RequestError as err:
            return error(400, str(err), param="prompt")
        return await respond(body, prompts, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if (wrong := check_model(body.model)) is not None:
            return wrong
        try:
            prompt = service.chat_prompt(body)
        except RequestError as err:
            return error(400, str(err), param="messages")
        return await respond(body, [prompt], request, chat=True)

    async def respond(body, prompts: list[Prompt], request: Request, chat: bool):
        try:
            generation = service.start(body, prompts)
        except RequestError as err:
            return error(400, str(err))
        except QueueFull as err:
            return error(429, str(err), "rate_limit_error", "queue_full")
        except ValueError as err:  # e.g. prompt + max_tokens beyond the server's context
            return error(400, str(err))
        texts = [ChoiceText(tokenizer, body.stops, split_thinking=chat, skip=prompt.moved)
                 for prompt in prompts for _ in range(body.n)]
        request_id = service.new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        prompt_tokens = sum(len(p.ids) + p.moved for p in prompts) * body.n
        if body.stream:
            return StreamingResponse(stream(body, generation, texts, request_id, created, chat, prompt_tokens),
                                     media_type="text/event-stream")
        waiter = asyncio.create_task(collect(generation, texts))
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.25)
            if not waiter.done() and await request.is_disconnected():
                waiter.cancel()  # its `finally` frees the rows
                return error(499, "client closed the request", code="client_closed")
        finishes = waiter.result()
        for reason, status, kind in (("timeout", 504, "timeout_error"), ("error", 500, "server_error")):
            failed = [f for f in finishes.values() if f.reason == reason]
            if failed:
                return error(status, failed[0].message or reason, kind, reason)
        choices = []
        for index in sorted(finishes):
            text, finish = texts[index], finishes[index]
            reasoning, content = text.final_parts()
            reason = service.finish_reason(finish, text)
            if chat:
                message = {"role": "assistant", "content": content}
                if reasoning is not None:
                    message["reasoning_content"] = reasoning
                choices.append({"index": index, "message": message, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": content, "finish_reason": reason, "logprobs": None})
        used = sum(completion_tokens(f, body_eos()) for f in finishes.values())
        kind = "chat.completion" if chat else "text_completion"
        return {**service.envelope(kind, created, request_id), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                          "total_tokens": prompt_tokens + used}}

    def body_eos() -> list[int]:
        return service.defaults.eos_token_ids

    async def collect(generation, texts: list[ChoiceText]) -> dict[int, Finish]:
        finishes: dict[int, Finish] = {}
        async for index, sequence, event in generation.events():
            if index in finishes:
                continue
            if isinstance(event, Commit):
                texts[index].add(event.tokens, final=False)
                if texts[index].stopped:
                    engine.cancel(sequence)  # a stop string ended the choice: free its row now
            elif isinstance(event, Finish):
                texts[index].add([], final=True)
                finishes[index] = event
        return finishes

    async def stream(body, generation, texts: list[ChoiceText], request_id: str, created: int, chat: bool,
                     prompt_tokens: int) -> AsyncIterator[str]:
        envelope = service.envelope("chat.completion.chunk" if chat else "text_completion", created, request_id)
        done: set[int] = set()
        used = 0

        def chunk(index: int, content: str = "", reasoning: str = "", finish: str | None = None,
                  extra: dict | None = None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if content:
                    delta["content"] = content
                if reasoning:
                    delta["reasoning_content"] = reasoning
                choice = {"index": index, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": index, "text": content, "finish_reason": finish, "logprobs": None}
            return sse({**envelope, "choices": [choice], **(extra or {})})

        if chat:
            for index in range(len(texts)):
                yield chunk(index, role=True)
        async for index, sequence, event in generation.events():
            if index in done:
                continue
            if isinstance(event, Draft):
                yield chunk(index, extra={"draft": service.draft_payload(event)})
            elif isinstance(event, Commit):
                reasoning, content = texts[index].add(event.tokens, final=False)
                if reasoning or content:
                    yield chunk(index, content, reasoning)
                if texts[index].stopped:
                    engine.cancel(sequence)
                    done.add(index)
                    used += sum(1 for t in texts[index].ids if t not in body_eos())
                    yield chunk(index, finish="stop")
            elif isinstance(event, Finish):
                done.add(index)
                if event.reason in ("timeout", "error"):
                    yield sse({"error": {"message": event.message or event.reason, "type": f"{event.reason}_error",
                                         "code": event.reason, "param": None}})
                    continue
                reasoning, content = texts[index].add([], final=True)
                if reasoning or content:
                    yield chunk(index, content, reasoning)
                used += completion_tokens(event, body_eos())
                yield chunk(index, finish=service.finish_reason(event, texts[index]))
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**envelope, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                                            "total_tokens": prompt_tokens + used}})
        yield sse("[DONE]")

    return app


def serve(model_dir: str | None, host: str, port: int, settings: ServerSettings, dtype=None,
          threads: int | None = None) -> None:
    import torch

    from .. import load
    from ..cli import resolve_model_dir

    if threads:
        torch.set_num_threads(threads)
    directory = resolve_model_dir(model_dir)
    model = load(directory, dtype=dtype)
    app = create_app(model, Tokenizer.from_directory(directory), settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60)
    DrainingServer(config).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM/SIGINT end it with status 0 once running requests have drained
    (uvicorn re-raises the signal after its graceful shutdown, which makes the process die of it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
