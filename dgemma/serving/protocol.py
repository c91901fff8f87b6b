"""OpenAI-compatible request bodies, validated; anything we do not implement is refused by name.

Design choices:
- Pydantic models with `extra="forbid"`, so an unknown field is a 400 that names it; OpenAI fields we know but do
  not support (logprobs, tools, penalties, ...) get a 400 with the reason instead of being silently ignored.
- Diffusion extensions (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `confidence_threshold`,
  `stability_threshold`) sit beside the OpenAI fields. `temperature` scales the whole t_min..t_max schedule.
- `stream_options.include_drafts` asks for the per-step draft of the canvas as extra SSE chunks.
- `response_format` (json_object, json_schema) constrains every canvas with a grammar; completions accept
  `infill: true` with a `{{N}}` template prompt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Known OpenAI fields with no equivalent here, and the value that means "not used".
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None,), "logit_bias": (None,), "tools": (None,),
    "tool_choice": (None, "none"), "functions": (None,), "function_call": (None, "none"),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "top_p": (None, 1, 1.0),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None,), "parallel_tool_calls": (None,),
    "modalities": (None,), "audio": (None,), "prediction": (None,),
}


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
    temperature: float | None = Field(default=None, gt=0, le=10)
    user: str | None = None
    # diffusion extensions
    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0)
    t_min: float | None = Field(default=None, ge=0)
    t_max: float | None = Field(default=None, ge=0)
    confidence_threshold: float | None = Field(default=None, gt=0)
    stability_threshold: int | None = Field(default=None, ge=0)
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

    @model_validator(mode="after")
    def refuse_unsupported(self):
        for name, unused in UNSUPPORTED.items():
            value = getattr(self, name)
            if not any(value is u or (value == u and type(value) is type(u)) for u in unused):
                raise ValueError(f"`{name}` is not supported by dgemma (got {value!r})")
        return self

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("`stop` takes up to 4 non-empty strings")
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
        if self.temperature is not None:
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
