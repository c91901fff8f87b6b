"""`dgemma serve`: the routes of the OpenAI-compatible HTTP API (FastAPI) and the playground.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/responses (the
Responses API, served as a chat with one choice), GET / (playground).
Layers: the guard (guard.py: Host, API key, body bytes and seconds; plain ASGI) -> routes (here) -> request models
(protocol.py) -> the service (service.py: sizes first, then prompts and settings in a thread pool) -> the
scheduler (scheduler.py: the one thread that owns the model, the main one under `dgemma serve`); responses.py
shapes what goes back.

A client that goes away, streaming or not, queued or running, ends its request at once: a queued one leaves the
queue, a running one frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from importlib import resources
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..pretrained import DiffusionGemmaForBlockDiffusion
from ..tokenizer import Tokenizer
from .guard import Guard, guarded_h11
from .protocol import ChatRequest, CompletionRequest, ResponsesRequest
from .responses import (RETRY_AFTER, ResponsesShaper, Shaper, collect, error, failure, new_id, stream,
                        stream_response, whole_response)
from .scheduler import NeverFits, QueueFull, Scheduler, model_fingerprint
from .service import CONTEXT, ChoiceText, Generation, RequestError, Service, named_field
from .settings import ServerSettings

logger = logging.getLogger(__name__)

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}}}
ERRORS = {"400": "invalid request (bad JSON, a field out of range or not supported, named in `param`; a prompt past "
                 "the context, code `context_length_exceeded`; a request with more sequences than the queue holds; "
                 "a Host header not allowed)",
          "401": "missing or wrong API key (when the server has one)",
          "404": "unknown model", "408": "the body did not arrive in time", "413": "body over the size limit",
          "429": "the queue cannot take the request now (see Retry-After)", "500": "internal error",
          "504": "the request took longer than the server's time limit"}


def create_app(model: DiffusionGemmaForBlockDiffusion, tokenizer: Tokenizer, settings: ServerSettings,
               engine_thread: bool = True) -> FastAPI:
    """The application. With `engine_thread` its startup runs the scheduler's loop on a thread of its own;
    without, the caller runs `app.state.scheduler.run()` (as `serve` does, on the main thread)."""
    scheduler = Scheduler(model, tokenizer, settings.max_sequences, settings.max_queue, settings.max_context)
    service = Service(scheduler, tokenizer, settings, model.generation_config)
    fingerprint = f"dgemma-{__version__}-{model_fingerprint(model)}"  # OpenAI's system_fingerprint

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            scheduler.start()
        yield
        # Uvicorn has stopped accepting connections and let open ones finish; now let the engine drain.
        await asyncio.to_thread(scheduler.stop, True, 30.0)
        service.close()

    app = FastAPI(title="dgemma", lifespan=lifespan)
    app.state.scheduler, app.state.service, app.state.fingerprint = scheduler, service, fingerprint
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p)[:40] for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        # `param`: the field at fault; for an error about the body as a whole, the field its message names
        param = where or named_field(message)
        return error(400, f"{where}: {message}" if where else message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                     headers=dict(exc.headers or {}))  # 405 keeps its Allow

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "dgemma"}]}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("dgemma.serving").joinpath("playground.html").read_text()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await respond(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await respond(body, request, chat=True)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        try:
            chat = body.to_chat()
        except ValidationError as err:  # not expected: the body was validated as a Responses request
            return error(400, f"the request cannot be served as a chat: {err.errors()[0].get('msg', '')}")
        return await respond(chat, request, chat=True, responses=body)

    async def respond(body: CompletionRequest | ChatRequest, request: Request, chat: bool,
                      responses: ResponsesRequest | None = None):
        if body.model is not None and body.model != settings.model_name:
            return error(404, f"model {body.model[:100]!r} does not exist; this server serves "
                              f"{settings.model_name!r}", code="model_not_found", param="model")
        # The Responses API names some fields otherwise than the chat request it is served as.
        renamed = (lambda p: RESPONSES_PARAMS.get(p, p)) if responses is not None else (lambda p: p)
        try:
            plan = await service.plan(body)
            generation = service.start(body, plan)
        except RequestError as err:
            message = str(err) if responses is None else str(err).replace("`max_tokens`", "`max_output_tokens`")
            return error(400, message, code=err.code, param=renamed(err.param))
        except NeverFits as err:
            return error(400, str(err), code="too_many_sequences", param="n")
        except QueueFull as err:
            return error(429, str(err), "rate_limit_error", "queue_full", headers={"Retry-After": RETRY_AFTER})
        except ValueError as err:  # the prompt plus max_tokens past the server's context (an infill region)
            return error(400, str(err), code=CONTEXT, param=renamed("max_tokens"))
        texts = [ChoiceText(tokenizer, body.stops, split_thinking=chat, skip=prompt.moved)
                 for prompt in plan.prompts for _ in range(body.n)]
        pieces = service.pieces if body.logprob_settings()[0] else None
        prompt_tokens = sum(len(p.ids) + p.moved for p in plan.prompts)  # the prompt once, whatever n
        if responses is not None:
            return await respond_responses(responses, body, request, generation, texts[0], pieces, prompt_tokens)
        shaper = Shaper(chat, settings.model_name, new_id("chatcmpl" if chat else "cmpl"), int(time.time()),
                        tokenizer, service.defaults.eos_token_ids, fingerprint, pieces)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GenerationStream(stream(shaper, generation, texts, prompt_tokens, include_usage), generation)
        finishes = await until_done(generation, texts, request)
        if finishes is None:
            return error(499, "client closed the request", code="client_closed")
        return whole_response(shaper, finishes, texts, prompt_tokens)

    async def respond_responses(body: ResponsesRequest, chat: ChatRequest, request: Request, generation: Generation,
                                text: ChoiceText, pieces, prompt_tokens: int):
        shaper = ResponsesShaper(body, settings.model_name, tokenizer, service.defaults.eos_token_ids, prompt_tokens,
                                 pieces)
        if body.stream:
            return GenerationStream(stream_response(shaper, generation, text, chat.wants_drafts), generation)
        finishes = await until_done(generation, [text], request)
        if finishes is None:
            return error(499, "client closed the request", code="client_closed")
        failed = failure(finishes)
        return failed if failed is not None else shaper.whole(text, finishes[0])

    app.openapi = lambda: openapi(app)
    return app


# Fields of a Responses request that its chat form names otherwise (for `param` in errors).
RESPONSES_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text",
                    "logprobs": "include"}


async def until_done(generation: Generation, texts: list[ChoiceText], request: Request):
    """Every choice's end (see `collect`), or None when the client went away first (its places are freed)."""
    waiter = asyncio.create_task(collect(generation, texts))
    watcher = asyncio.create_task(disconnected(request))
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, watcher):
            if not task.done():
                task.cancel()
        if not waiter.done():
            generation.cancel()  # the client has gone (or the server is stopping): free its places now
    if not waiter.done() or waiter.cancelled():
        return None
    return waiter.result()


class GenerationStream(StreamingResponse):
    """A generation's server-sent events. Starlette watches the client while it streams; however the response
    ends (the last chunk, the client gone before or during the stream, an error), the generation ends with it."""

    def __init__(self, chunks: AsyncIterator[str], generation: Generation):
        super().__init__(chunks, media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()  # nothing left to do when it has finished; frees its places otherwise


async def disconnected(request: Request) -> None:
    """Return when the client has gone (the guard has read the body already; what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the errors this server really answers (400 for bad input, not 422)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if method == "post" and "200" in responses:  # `"stream": true` answers server-sent events
                    responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": {}}
                codes = ["400", "404", "408", "413", "429", "500", "504"] if method == "post" else ["400"]
                if path.startswith("/v1/"):
                    codes.append("401")
                for code in codes:
                    responses[code] = {"description": ERRORS[code],
                                       "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for the app: h11 with a deadline on headers, the keep-alive timeout, graceful drain."""
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level="info",
                                   http=guarded_h11(settings.read_timeout),
                                   timeout_keep_alive=settings.keep_alive_timeout, timeout_graceful_shutdown=60)
    return uvicorn.Config(app, **{**options, **overrides})


def serve(model: DiffusionGemmaForBlockDiffusion, tokenizer: Tokenizer, settings: ServerSettings) -> None:
    """Serve a loaded model until SIGTERM or SIGINT, then drain running requests and return. Call it on the
    process's main thread: the engine's loop runs there (see the scheduler's module docstring for why), uvicorn on a
    thread of its own. Raises SystemExit with uvicorn's status when it could not start (it has logged why)."""
    app = create_app(model, tokenizer, settings, engine_thread=False)
    server = DrainingServer(uvicorn_config(app, settings))
    scheduler: Scheduler = app.state.scheduler
    failed: list[int | str | None] = []

    def http() -> None:
        try:
            server.run()
        except SystemExit as exit_:  # uvicorn's way out when it cannot start
            failed.append(exit_.code)
        finally:  # no client can be answered any more: end what is left (after the drain: nothing)
            scheduler.stop(drain=False, timeout=0)

    thread = threading.Thread(target=http, name="dgemma-http")
    with server.capture_signals():
        thread.start()
        scheduler.run()
    thread.join()
    if failed or not server.started:
        raise SystemExit(failed[0] if failed and failed[0] else 1)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM/SIGINT end it with status 0 once running requests have drained
    (uvicorn re-raises the signal after its graceful shutdown, which makes the process die of it). Signals reach
    the main thread only: run on another thread, it leaves them to whoever calls `capture_signals` there."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
