"""The OpenAI completions protocol as pydantic models, plus the shadowgate extension.

Validation here is what turns bad input into a 400 with a message. Fields of the OpenAI
spec that this server does not implement are accepted only at their neutral value. Bounds
that depend on the deployment (prompts per request, bytes per prompt, tokens) are the
gateway's (serving/settings.py GatewaySettings); the ones here hold for every deployment.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _encodable(text: str) -> None:
    """A JSON string may hold a lone surrogate ("\\ud800"); no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (a lone surrogate is not)") from None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1, description="what a torch generator takes")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    n: int = 1
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="shadowgate extension")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        for text in ([v] if isinstance(v, str) else v):
            if isinstance(text, str):
                _encodable(text)
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a token-id prompt must not be empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        # OpenAI allows 4; evaluation harnesses send more (their stop list plus EOS)
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("stop sequences must not be empty")
        for text in ([v] if isinstance(v, str) else v or []):
            _encodable(text)
            if len(text) > 256:
                raise ValueError("a stop sequence has at most 256 characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        unsupported = []
        if self.n != 1:
            unsupported.append("n other than 1")
        if self.best_of not in (None, 1):
            unsupported.append("best_of")
        if self.suffix:
            unsupported.append("suffix")
        if self.presence_penalty or self.frequency_penalty:
            unsupported.append("presence/frequency penalties")
        if self.logit_bias:
            unsupported.append("logit_bias")
        if self.stream and self.echo:
            unsupported.append("echo with stream")
        if self.stream and len(self.prompts()) > 1:
            unsupported.append("a batch of prompts with stream")
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only meaningful with echo")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt per choice index."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def prompt_count(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or all(isinstance(x, int) for x in p) else len(p)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


REQUEST_ID = re.compile(r"cmpl-[0-9a-f]{32}(-[0-9]{1,5})?")
_CORRELATION = re.compile(r"[\x21-\x7e]{1,128}")


def new_request_id() -> str:
    """Issued by the server for every request: canary arm and shadow sampling hash it."""
    return f"cmpl-{uuid.uuid4().hex}"


def correlation_id(header: str | None) -> str | None:
    """A client's X-Request-ID, kept in the audit record only: printable ASCII, at most 128
    characters, else dropped."""
    return header if header and _CORRELATION.fullmatch(header) else None


def completion_schema() -> dict:
    """The request body as an OpenAPI requestBody (the route parses the body itself, after
    the key and size checks)."""
    schema = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"body": {"required": True, "content": {"application/json": {"schema": schema}}}, "components": defs}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


class ApiError(Exception):
    """A refusal with its status and message: the app answers it as `error_body(message, kind)`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def completion_body(request_id: str, model: str, choices: list[dict], usage: dict, ext: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage, "shadowgate": ext}
