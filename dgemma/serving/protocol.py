"""OpenAI-compatible request bodies, validated; anything we do not implement is refused by name.

Design choices:
- Pydantic models with `extra="forbid"`, so an unknown field is a 400 that names it; OpenAI fields we know but do
  not support (logprobs, tools, penalties, ...) get a 400 with the reason instead of being silently ignored.
- Diffusion extensions (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `confidence_threshold`,
  `stability_threshold`) sit beside the OpenAI fields. `temperature` scales the whole t_min..t_max schedule;
  `temperature: 0` takes the argmax at every position (`do_sample=False`), as OpenAI's API means it.
- Nothing malformed gets past these models: a string that is not valid Unicode (a lone UTF-16 surrogate such as
  "\\ud800", which JSON can spell), JSON nested deeper than MAX_JSON_DEPTH, a seed outside the 64 bits a
  generator takes, numbers the engine's fp32/int32 settings cannot hold, chat_template_kwargs that would
  replace what the server passes to the template.
- `stream_options.include_drafts` asks for the per-step draft of the canvas as extra SSE chunks.
- `response_format` (json_object, json_schema) constrains every canvas with a grammar; completions accept
  `infill: true` with a `{{N}}` template prompt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_JSON_DEPTH = 64  # JSON nesting (of a schema, a message, anything in a body)
MAX_STOP_CHARS = 1000  # per stop string
SEED_RANGE = (-(1 << 63), 1 << 64)  # what a torch generator accepts: int64 or uint64
MIN_TEMPERATURE = 1e-6  # a smaller positive temperature is 0 or infinite once the engine divides by it in fp32
# chat_template_kwargs may not replace what the server itself passes to the chat template
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token", "unk_token")

# Known OpenAI fields with no equivalent here, and the value that means "not used".
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None,), "logit_bias": (None,), "tools": (None,),
    "tool_choice": (None, "none"), "functions": (None,), "function_call": (None, "none"),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "top_p": (None, 1, 1.0),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None,), "parallel_tool_calls": (None,),
    "modalities": (None,), "audio": (None,), "prediction": (None,),
}


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
    include_drafts: bool = False


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


class DiffusionParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=10)
    user: str | None = None
    # diffusion extensions, bounded so that every value is one the engine's fp32 and int32 settings hold
    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0, le=1e6)
    t_min: float | None = Field(default=None, ge=0, le=1000)
    t_max: float | None = Field(default=None, ge=0, le=1000)
    confidence_threshold: float | None = Field(default=None, gt=0, le=1e6)
    stability_threshold: int | None = Field(default=None, ge=0, le=1024)
    # the unsupported OpenAI fields, accepted only at their "unused" values
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    top_p: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    parallel_tool_calls: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def well_formed(cls, data):
        check_json(data)
        return data

    @model_validator(mode="after")
    def refuse_unsupported(self):
        for name, unused in UNSUPPORTED.items():
            value = getattr(self, name)
            if not any(value is u or (value == u and type(value) is type(u)) for u in unused):
                shown = repr(value)
                raise ValueError(f"`{name}` is not supported by dgemma (got {shown[:60]}"
                                 f"{'...' if len(shown) > 60 else ''})")
        return self

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
        overrides = {key: getattr(self, key) for key in ("max_denoising_steps", "entropy_bound", "t_min", "t_max",
                                                         "confidence_threshold", "stability_threshold")
                     if getattr(self, key) is not None}
        if self.temperature == 0:  # the argmax at every position; the schedule still drives acceptance
            overrides["do_sample"] = False
        elif self.temperature is not None:
            t_min = overrides.get("t_min", defaults_t_min)
            t_max = overrides.get("t_max", defaults_t_max)
            if t_min is not None and t_max is not None:
                overrides["t_min"], overrides["t_max"] = t_min * self.temperature, t_max * self.temperature
        return overrides


class CompletionRequest(DiffusionParameters):
    prompt: str | list[str] | list[int]
    # dgemma extension: the prompt is a template whose {{N}} marks are holes of N tokens to fill in place
    infill: bool = False

    @field_validator("prompt")
    @classmethod
    def check_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("`prompt` is empty")
        return value


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


class ChatRequest(DiffusionParameters):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def check_template_kwargs(cls, value):
        reserved = sorted(set(value or ()) & set(RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set here: the server passes "
                             f"{', '.join(RESERVED_TEMPLATE_KWARGS)} to the chat template itself")
        return value
