"""OpenAI-compatible request bodies, validated; anything we cannot honour is refused by name.

Design choices:
- Pydantic models with `extra="forbid"`, so an unknown field is a 400 that names it (`param` set to it).
  OpenAI fields are in three kinds: those dgemma gives a meaning on the canvas (sampling controls, logprobs, ...),
  those that change nothing here (IGNORED: `store`, `metadata`, `user`, ...), accepted and ignored, and those
  whose meaning dgemma cannot honour (UNSUPPORTED: `tools`, `audio`, ...), accepted only at a value that asks for
  nothing and otherwise a 400 naming the field. Every field-level error names its field in `param`.
- Diffusion extensions (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `confidence_threshold`,
  `stability_threshold`) sit beside the OpenAI fields. `temperature` scales the whole t_min..t_max schedule;
  `temperature: 0` takes the argmax at every position (`do_sample=False`), as OpenAI's API means it. `top_k`
  (vLLM's and llama.cpp's extension; 0 or -1: off) sits beside `top_p`.
- The Responses API's body (`ResponsesRequest`) is validated here too and becomes a chat request
  (`to_chat`): input items and `instructions` become messages, `text.format` a response_format.
- Nothing malformed gets past these models: a string that is not valid Unicode (a lone UTF-16 surrogate such as
  "\\ud800", which JSON can spell), JSON nested deeper than MAX_JSON_DEPTH, a seed outside the 64 bits a
  generator takes, numbers the engine's fp32/int32 settings cannot hold, chat_template_kwargs that would
  replace what the server passes to the template.
- `stream_options.include_drafts` asks for the per-step draft of the canvas as extra SSE chunks.
- `response_format` (json_object, json_schema) constrains every canvas with a grammar; completions accept
  `infill: true` with a `{{N}}` template prompt.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_JSON_DEPTH = 64  # JSON nesting (of a schema, a message, anything in a body)
MAX_STOP_CHARS = 1000  # per stop string
SEED_RANGE = (-(1 << 63), 1 << 64)  # what a torch generator accepts: int64 or uint64
MIN_TEMPERATURE = 1e-6  # a smaller positive temperature is 0 or infinite once the engine divides by it in fp32
# chat_template_kwargs may not replace what the server itself passes to the chat template
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token", "unk_token")

MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; its completions allow 5)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, 100 forces it

# OpenAI fields that change nothing on this server: accepted (when of the right kind) and ignored.
IGNORED = ("store", "metadata", "user", "service_tier", "prompt_cache_key", "safety_identifier",
           "parallel_tool_calls")
# OpenAI fields whose meaning dgemma cannot honour, and the values that ask for nothing (accepted).
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,),
    # the Responses API's
    "reasoning": (None,), "previous_response_id": (None,), "conversation": (None,), "prompt": (None,),
    "background": (None, False), "context_management": (None,),
}


def refuse_unless_unused(value: Any, name: str) -> Any:
    """An UNSUPPORTED field's value, if it asks for nothing; a ValueError naming the field otherwise."""
    if not any(value is u or (value == u and type(value) is type(u)) for u in UNSUPPORTED[name]):
        shown = repr(value)
        raise ValueError(f"`{name}` is not supported by dgemma (got {shown[:60]}{'...' if len(shown) > 60 else ''})")
    return value


def _place(path: tuple) -> str:
    shown = ".".join(str(p)[:40] for p in path[:8]) + (".(...)" if len(path) > 8 else "")
    return shown or "the body"


def _bad_string(text: Any) -> bool:
    return type(text) is str and not text.isascii() and not valid_unicode(text)


def _well_formed(value: Any) -> bool:
    """Whether every string is valid Unicode and nothing nests deeper than MAX_JSON_DEPTH: one iterative pass,
    a type check per item, so that a 1 MiB body of small items costs milliseconds and no depth exhausts the
    stack."""
    stack: list[tuple[Any, int]] = [(value, 0)] if isinstance(value, (dict, list)) else []
    if _bad_string(value):
        return False
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_JSON_DEPTH:
            return False
        if type(item) is dict:
            if any(_bad_string(key) for key in item):
                return False
            item = item.values()
        for child in item:
            kind = type(child)
            if kind is str:
                if not child.isascii() and not valid_unicode(child):
                    return False
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True


def check_json(value: Any) -> None:
    """Refuse (ValueError naming where) strings that are not valid Unicode and nesting deeper than
    MAX_JSON_DEPTH. The fast pass finds whether; a second pass, with paths, says where."""
    if _well_formed(value):
        return
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if _bad_string(item):
            raise ValueError(f"{_place(path)}: holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                             "a character; send valid Unicode")
        if isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError(f"{_place(path)}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
            for key, child in (item.items() if isinstance(item, dict) else enumerate(item)):
                if _bad_string(key):
                    raise ValueError(f"{_place(path)}: a key holds a lone UTF-16 surrogate, which is not a "
                                     "character; send valid Unicode")
                stack.append((child, path + (key,), depth + 1))


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_drafts: bool = False  # dgemma's: a chunk per denoising step
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks against length analysis: ignored


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON valid against a schema (always strict)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs `json_schema`")
        return self


class Body(BaseModel):
    """What every route's body shares: unknown fields refused, malformed JSON refused, the ignored OpenAI fields,
    the sampling controls and the diffusion extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    seed: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=10)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=1 << 30)  # vLLM's and llama.cpp's; 0 or -1: off
    # accepted and ignored (IGNORED)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    # refused unless they ask for nothing (UNSUPPORTED)
    tools: Any = None
    tool_choice: Any = None
    # diffusion extensions, bounded so that every value is one the engine's fp32 and int32 settings hold
    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0, le=1e6)
    t_min: float | None = Field(default=None, ge=0, le=1000)
    t_max: float | None = Field(default=None, ge=0, le=1000)
    confidence_threshold: float | None = Field(default=None, gt=0, le=1e6)
    stability_threshold: int | None = Field(default=None, ge=0, le=1024)
    # dgemma's: "autoregressive" writes token by token with the encoder (then `temperature` is the sampling
    # temperature itself, default 1, and the diffusion extensions, drafts, infill and grammars do not apply)
    decode: Literal["diffusion", "autoregressive"] = "diffusion"

    @model_validator(mode="before")
    @classmethod
    def well_formed(cls, data):
        check_json(data)
        return data

    @field_validator("tools", "tool_choice")
    @classmethod
    def refuse_tools(cls, value, info):
        return refuse_unless_unused(value, info.field_name)

    @field_validator("temperature", "t_min", "t_max")
    @classmethod
    def zero_or_usable(cls, value, info):
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"`{info.field_name}` must be 0 or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("seed")
    @classmethod
    def check_seed(cls, value):
        if value is not None and not SEED_RANGE[0] <= value < SEED_RANGE[1]:
            raise ValueError("`seed` must be an integer from -2**63 to 2**64 - 1 (a 64-bit seed)")
        return value

    def logprob_settings(self) -> tuple[bool, int]:
        """(whether log-probabilities are asked for, how many alternatives per token)."""
        return False, 0

    def generation_overrides(self, defaults_t_min: float | None, defaults_t_max: float | None) -> dict[str, Any]:
        overrides = {key: getattr(self, key) for key in ("max_denoising_steps", "entropy_bound", "t_min", "t_max",
                                                         "confidence_threshold", "stability_threshold", "top_p")
                     if getattr(self, key) is not None}
        if self.top_k is not None and self.top_k > 0:
            overrides["top_k"] = self.top_k
        if self.temperature == 0:  # the argmax at every position; the schedule still drives acceptance
            overrides["do_sample"] = False
        elif self.temperature is not None:
            t_min = overrides.get("t_min", defaults_t_min)
            t_max = overrides.get("t_max", defaults_t_max)
            if t_min is not None and t_max is not None:
                overrides["t_min"], overrides["t_max"] = t_min * self.temperature, t_max * self.temperature
        wanted, top = self.logprob_settings()
        if wanted:
            overrides["logprobs"], overrides["top_logprobs"] = True, top
        return overrides


class DiffusionParameters(Body):
    """The fields /v1/completions and /v1/chat/completions share."""

    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # refused unless they ask for nothing (UNSUPPORTED)
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    response_format: ResponseFormat | None = None

    @field_validator("functions", "function_call", "best_of", "echo", "suffix", "modalities", "audio", "prediction",
                     "web_search_options", "reasoning_effort", "verbosity")
    @classmethod
    def refuse_unsupported(cls, value, info):
        return refuse_unless_unused(value, info.field_name)

    @field_validator("logit_bias")
    @classmethod
    def check_logit_bias(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"`logit_bias` may hold at most {MAX_LOGIT_BIAS} tokens (got {len(value)})")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 12:
                raise ValueError(f"`logit_bias` keys are token ids (non-negative integers as strings), got "
                                 f"{key[:40]!r}")
            if not math.isfinite(bias) or abs(bias) > LOGIT_BIAS_RANGE:
                raise ValueError(f"`logit_bias` values must be from -100 to 100, got {bias} for token {key}")
        return value

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("`stop` takes up to 4 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a `stop` string may have at most {MAX_STOP_CHARS} characters")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def wants_drafts(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_drafts)

    def generation_overrides(self, defaults_t_min: float | None, defaults_t_max: float | None) -> dict[str, Any]:
        overrides = super().generation_overrides(defaults_t_min, defaults_t_max)
        for key in ("frequency_penalty", "presence_penalty"):
            if getattr(self, key):
                overrides[key] = getattr(self, key)
        if self.logit_bias:
            overrides["logit_bias"] = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        return overrides


class CompletionRequest(DiffusionParameters):
    prompt: str | list[str] | list[int]
    # the number of alternatives per token, 0 for the chosen token's own log-probability only
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # dgemma extension: the prompt is a template whose {{N}} marks are holes of N tokens to fill in place
    infill: bool = False

    @field_validator("prompt")
    @classmethod
    def check_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("`prompt` is empty")
        return value

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def text_only(cls, value):
        if isinstance(value, list):
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported (dgemma runs the text model only)")
        return value


def check_template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    reserved = sorted(set(value or ()) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"{', '.join(reserved)} cannot be set here: the server passes "
                         f"{', '.join(RESERVED_TEMPLATE_KWARGS)} to the chat template itself")
    return value


class ChatRequest(DiffusionParameters):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def check_template_kwargs(cls, value):
        return check_template_kwargs(value)

    def logprob_settings(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


# ---- the Responses API -------------------------------------------------------------------------------------

RESPONSES_INCLUDABLE = ("message.output_text.logprobs",)  # what `include` may name here


class ResponsesStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None  # ignored
    include_drafts: bool = False  # dgemma's: a `response.draft` event per denoising step


class ResponsesTextFormat(BaseModel):
    """The Responses API's `text.format`: the JSON schema fields sit beside `type` (not under `json_schema`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs `schema`")
        return self


class ResponsesText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ResponsesTextFormat | None = None
    verbosity: Any = None

    @field_validator("verbosity")
    @classmethod
    def refuse_verbosity(cls, value):
        return refuse_unless_unused(value, "verbosity")


INPUT_TEXT_PARTS = ("input_text", "output_text", "text")


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Responses API's `input` as chat messages: a string is one user message; items are messages (`role`,
    `content` a string or text parts); reasoning items are dropped (thoughts are never fed back in)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"input.{index}: an input item is an object")
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue
        if kind != "message":
            raise ValueError(f"input.{index}: items of type {str(kind)[:40]!r} are not supported by dgemma (only "
                             "messages; it calls no tools)")
        unknown = sorted(set(item) - {"type", "role", "content", "id", "status", "phase"})
        if unknown:
            raise ValueError(f"input.{index}: unknown field {unknown[0][:40]!r}")
        role, content = item.get("role"), item.get("content")
        if role not in ("user", "assistant", "system", "developer"):
            raise ValueError(f"input.{index}.role: must be user, assistant, system or developer")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in INPUT_TEXT_PARTS \
                        or not isinstance(part.get("text"), str):
                    raise ValueError(f"input.{index}.content: only text parts are supported (dgemma runs the text "
                                     "model only)")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"input.{index}.content: a string or a list of text parts")
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError("`input` holds no message")
    return messages


class ResponsesRequest(Body):
    """POST /v1/responses."""

    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    text: ResponsesText | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    truncation: Literal["auto", "disabled"] | None = None  # ignored: a prompt past the context is a 400 either way
    chat_template_kwargs: dict[str, Any] | None = None
    # refused unless they ask for nothing (UNSUPPORTED)
    reasoning: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    background: Any = None
    context_management: Any = None
    max_tool_calls: int | None = None  # ignored: no tool is ever called

    @field_validator("reasoning", "previous_response_id", "conversation", "prompt", "background",
                     "context_management")
    @classmethod
    def refuse_unsupported(cls, value, info):
        return refuse_unless_unused(value, info.field_name)

    @field_validator("input")
    @classmethod
    def check_input(cls, value):
        input_messages(value)
        return value

    @field_validator("include")
    @classmethod
    def check_include(cls, value):
        for item in value or []:
            if item not in RESPONSES_INCLUDABLE:
                raise ValueError(f"`include` may name {', '.join(RESPONSES_INCLUDABLE)} here, not {item[:60]!r}")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def check_template_kwargs(cls, value):
        return check_template_kwargs(value)

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    def to_chat(self) -> ChatRequest:
        """The same request as /v1/chat/completions takes it (validated already: this cannot fail)."""
        messages = input_messages(self.input)
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        fmt = self.text.format if self.text is not None else None
        response_format = None
        if fmt is not None and fmt.type != "text":
            response_format = {"type": fmt.type}
            if fmt.type == "json_schema":
                response_format["json_schema"] = {"name": fmt.name or "response", "schema": fmt.schema_,
                                                  "strict": fmt.strict, "description": fmt.description}
        drafts = bool(self.stream_options and self.stream_options.include_drafts)
        shared = {key: getattr(self, key) for key in (
            "model", "seed", "temperature", "top_p", "top_k", "max_denoising_steps", "entropy_bound", "t_min",
            "t_max", "confidence_threshold", "stability_threshold", "chat_template_kwargs", "decode")}
        return ChatRequest.model_validate({
            **shared, "messages": messages, "max_tokens": self.max_output_tokens, "stream": self.stream,
            "stream_options": {"include_drafts": drafts} if drafts else None, "response_format": response_format,
            "logprobs": self.wants_logprobs or bool(self.top_logprobs),
            "top_logprobs": self.top_logprobs if self.wants_logprobs or self.top_logprobs else None})
