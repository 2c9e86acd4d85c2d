"""Request and response bodies of the OpenAI-compatible server, as pydantic models.

They mirror OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models` schemas, with vLLM's
extensions `top_k`, `ignore_eos` and `stop_token_ids`. Fields the engine cannot honour are accepted
only at their neutral value (`n=1`, `echo=false`, no logprobs, zero penalties); anything else is a
400 error that names the field, never silently ignored. Unknown fields are ignored, as OpenAI does.
Types are strict: an integer field takes only a JSON integer (`true` or `"16"` is a 400, not 1 or 16),
a number field a JSON number, a flag a JSON boolean. `seed` must be in [0, 2**63). Token ids (the
prompt's, `stop_token_ids`) are checked against the vocabulary by the server, which knows it.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


_STRICT = ConfigDict(extra="ignore", strict=True)
SEED_LIMIT = 2**63          # torch generators take a signed 64-bit seed


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields both generation routes share."""

    model_config = _STRICT

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None             # vLLM extension; 0 or -1 mean "off", as in vLLM
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None    # vLLM extension: stop on these too
    ignore_eos: bool = False                   # vLLM extension: do not stop at EOS (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty / frequency_penalty: penalties are not supported")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError("top_k: must be >= 1, or 0 / -1 for no limit")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict:
        """Keyword arguments of `AsyncEngine.generate`, but `max_tokens` and the stop tokens."""
        return {"temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k if self.top_k and self.top_k > 0 else None, "seed": self.seed}


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.echo:
            raise ValueError("echo: echoing the prompt is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs: log probabilities are not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only best_of=1 is supported")
        if self.suffix:
            raise ValueError("suffix: insertion is not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (a string or a list of token ids)")
            self.prompt = self.prompt[0]
        if not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self


class TextContent(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextContent] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.logprobs:
            raise ValueError("logprobs: log probabilities are not supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (`stream=true`) one server-sent chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "inferforge"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
