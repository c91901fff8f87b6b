"""`dgemma serve`: the routes of the OpenAI-compatible HTTP API (FastAPI) and the playground.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET / (playground).
Layers: routes (here) -> request models (protocol.py) -> the service (service.py: prompts and settings) ->
the scheduler (scheduler.py: the one thread that owns the model); responses.py shapes what goes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pretrained import DiffusionGemmaForBlockDiffusion
from ..tokenizer import Tokenizer
from .protocol import ChatRequest, CompletionRequest
from .responses import Shaper, collect, error, new_id, stream, whole_response
from .scheduler import QueueFull, Scheduler
from .service import ChoiceText, Prompt, RequestError, Service
from .settings import ServerSettings

logger = logging.getLogger(__name__)


def create_app(model: DiffusionGemmaForBlockDiffusion, tokenizer: Tokenizer, settings: ServerSettings) -> FastAPI:
    scheduler = Scheduler(model, tokenizer, settings.max_sequences, settings.max_queue, settings.max_context)
    service = Service(scheduler, tokenizer, settings, model.generation_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        # Uvicorn has stopped accepting connections and let open ones finish; now let the engine drain.
        await asyncio.to_thread(scheduler.stop, True, 30.0)

    app = FastAPI(title="dgemma", lifespan=lifespan)
    app.state.scheduler, app.state.service = scheduler, service

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
        return {"status": "ok", **scheduler.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "dgemma"}]}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("dgemma.serving").joinpath("playground.html").read_text()

    def wrong_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != settings.model_name:
            return error(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                         code="model_not_found", param="model")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (wrong := wrong_model(body.model)) is not None:
            return wrong
        try:
            prompts = service.completion_prompts(body)
        except RequestError as err:
            return error(400, str(err), param="prompt")
        return await respond(body, prompts, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if (wrong := wrong_model(body.model)) is not None:
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
        shaper = Shaper(chat, settings.model_name, new_id("chatcmpl" if chat else "cmpl"), int(time.time()),
                        tokenizer, service.defaults.eos_token_ids)
        prompt_tokens = sum(len(p.ids) + p.moved for p in prompts) * body.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(shaper, generation, texts, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        waiter = asyncio.create_task(collect(generation, texts))
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.25)
            if not waiter.done() and await request.is_disconnected():
                waiter.cancel()  # its `finally` frees the rows
                return error(499, "client closed the request", code="client_closed")
        return whole_response(shaper, waiter.result(), texts, prompt_tokens)

    return app


def serve(model: DiffusionGemmaForBlockDiffusion, tokenizer: Tokenizer, settings: ServerSettings) -> None:
    """Serve a loaded model until SIGTERM or SIGINT, then drain running requests and return."""
    app = create_app(model, tokenizer, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=60)
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
