"""`dgemma serve`: the routes of the OpenAI-compatible HTTP API (FastAPI) and the playground.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET / (playground).
Layers: the guard (guard.py: Host, API key, body bytes and seconds; plain ASGI) -> routes (here) -> request models
(protocol.py) -> the service (service.py: sizes first, then prompts and settings in a thread pool) -> the
scheduler (scheduler.py: the one thread that owns the model); responses.py shapes what goes back.

A client that goes away, streaming or not, queued or running, ends its request at once: a queued one leaves the
queue, a running one frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from importlib import resources
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pretrained import DiffusionGemmaForBlockDiffusion
from ..tokenizer import Tokenizer
from .guard import Guard, guarded_h11
from .protocol import ChatRequest, CompletionRequest
from .responses import RETRY_AFTER, Shaper, collect, error, new_id, stream, whole_response
from .scheduler import NeverFits, QueueFull, Scheduler
from .service import ChoiceText, Generation, RequestError, Service
from .settings import ServerSettings

logger = logging.getLogger(__name__)

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}}}
ERRORS = {"400": "invalid request (bad JSON, a field out of range, a prompt over a limit, a request with more "
                 "sequences than the queue holds, a Host header not allowed)",
          "401": "missing or wrong API key (when the server has one)",
          "404": "unknown model", "408": "the body did not arrive in time", "413": "body over the size limit",
          "429": "the queue cannot take the request now (see Retry-After)", "500": "internal error",
          "504": "the request took longer than the server's time limit"}


def create_app(model: DiffusionGemmaForBlockDiffusion, tokenizer: Tokenizer, settings: ServerSettings) -> FastAPI:
    scheduler = Scheduler(model, tokenizer, settings.max_sequences, settings.max_queue, settings.max_context)
    service = Service(scheduler, tokenizer, settings, model.generation_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        # Uvicorn has stopped accepting connections and let open ones finish; now let the engine drain.
        await asyncio.to_thread(scheduler.stop, True, 30.0)
        service.close()

    app = FastAPI(title="dgemma", lifespan=lifespan)
    app.state.scheduler, app.state.service = scheduler, service
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p)[:40] for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error(400, f"{where}: {message}" if where else message, param=where or None)

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

    async def respond(body: CompletionRequest | ChatRequest, request: Request, chat: bool):
        if body.model is not None and body.model != settings.model_name:
            return error(404, f"model {body.model[:100]!r} does not exist; this server serves "
                              f"{settings.model_name!r}", code="model_not_found", param="model")
        try:
            plan = await service.plan(body)
            generation = service.start(body, plan)
        except RequestError as err:
            return error(400, str(err), param=err.param)
        except NeverFits as err:
            return error(400, str(err), code="too_many_sequences", param="n")
        except QueueFull as err:
            return error(429, str(err), "rate_limit_error", "queue_full", headers={"Retry-After": RETRY_AFTER})
        except ValueError as err:  # e.g. prompt + max_tokens beyond the server's context
            return error(400, str(err))
        texts = [ChoiceText(tokenizer, body.stops, split_thinking=chat, skip=prompt.moved)
                 for prompt in plan.prompts for _ in range(body.n)]
        shaper = Shaper(chat, settings.model_name, new_id("chatcmpl" if chat else "cmpl"), int(time.time()),
                        tokenizer, service.defaults.eos_token_ids)
        prompt_tokens = sum(len(p.ids) + p.moved for p in plan.prompts) * body.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GenerationStream(stream(shaper, generation, texts, prompt_tokens, include_usage), generation)
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
            return error(499, "client closed the request", code="client_closed")
        return whole_response(shaper, waiter.result(), texts, prompt_tokens)

    app.openapi = lambda: openapi(app)
    return app


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
    """Serve a loaded model until SIGTERM or SIGINT, then drain running requests and return."""
    DrainingServer(uvicorn_config(create_app(model, tokenizer, settings), settings)).run()


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
