"""The OpenAI API as vlmkit speaks it: request schemas (extra fields ignored), error bodies, the shape of
responses and stream chunks, and OpenAI messages turned into the processor's (images loaded, visual
prompts drawn). No HTTP here: `vlmkit.serve.server` routes requests through these."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmkit import safejson
from vlmkit.serve.config import ServerConfig
from vlmkit.serve.engine import Request as EngineRequest
from vlmkit.serve.engine import SamplingParams
from vlmkit.serve.errors import EngineError
from vlmkit.serve.output import TokenLogprob
from vlmkit.structured import CONSTRAINT_FIELDS, Constraint, check_constraint, constraint_from


class APIError(Exception):
    """An error answered the OpenAI way: HTTP `status` and {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    @classmethod
    def of(cls, error: EngineError, message: str | None = None) -> APIError:
        """The answer to an engine error: its status and type come from its kind, never its message."""
        return cls(error.status, message or str(error) or error.type, error.type)


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- request bodies -------------------------------------------------------------------------------


def parse_body(raw: bytes) -> Any:
    """A request body as bounded JSON (`vlmkit.safejson`): too deep, too long a number, NaN or a lone
    surrogate is a 400 that says so, never an exception from deep inside."""
    try:
        return safejson.loads(raw)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not UTF-8 JSON: {e}") from None
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


# -- request schemas (OpenAI's, strict: no coercion of booleans or strings into numbers) ------------


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    visual_prompts: list[dict[str, Any]] | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    visual_prompts: list[dict[str, Any]] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


# OpenAI request fields this server does not implement: a request that sets one gets a 400 naming it,
# never an answer that silently ignores it
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "service_tier",
    "store",
    "metadata",
    "web_search_options",
    "suffix",
    "echo",
    "best_of",
)
IGNORED = ("user",)  # an end-user id for the caller's own monitoring: no effect on an answer by definition


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _closed_schema(schema: dict[str, Any]) -> None:
    """The OpenAPI view of the fields a request may carry: the model's own and the ignored ones, nothing
    else (the model itself takes extra fields only to refuse them by name: `check_fields`)."""
    schema["additionalProperties"] = False
    for name in IGNORED:
        schema["properties"][name] = {"type": "string"}


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_closed_schema)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # vLLM's extension; 0: off
    repetition_penalty: float = Field(default=1.0, gt=0)  # vLLM's extension; 1: off
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's names for the other constraints
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None

    def check_fields(self, vocab_size: int) -> None:
        """A 400 naming the first field that is unknown, unsupported or invalid together with the others."""
        for name in self.model_extra or {}:
            if name in IGNORED:
                continue
            why = (
                "is not supported by this server" if name in UNSUPPORTED else "is not a field of this request"
            )
            raise APIError(400, f"{name!r} {why}", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise APIError(
                    400,
                    f"logit_bias: {key!r} is not a token id of this model (0..{vocab_size - 1})",
                    "logit_bias",
                )
            if not -100 <= bias <= 100:
                raise APIError(
                    400, f"logit_bias: {bias} for token {key} is outside [-100, 100]", "logit_bias"
                )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def top_alternatives(self) -> int | None:
        """None: no log-probabilities; k: each token's and its k most likely alternatives (the request
        kinds that offer log-probabilities say how they are asked for)."""
        return None

    def constraint(self) -> Constraint | None:
        """The constraint the request asks for; a 400 naming the field when it is malformed or doubled."""
        given = {name: getattr(self, name) for name in CONSTRAINT_FIELDS if getattr(self, name) is not None}
        try:
            constraint = constraint_from(**given)
            if constraint is not None:
                check_constraint(constraint)
            return constraint
        except (ValueError, TypeError) as e:
            raise APIError(
                400, f"{next(iter(given), 'response_format')}: {e}", param=next(iter(given), None)
            ) from None

    def params(self, max_tokens_default: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or max_tokens_default,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            seed=self.seed,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()} or None,
            logprobs=self.top_alternatives(),
            constraint=self.constraint(),
        )


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def top_alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def top_alternatives(self) -> int | None:
        return self.logprobs


# -- responses ------------------------------------------------------------------------------------


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)


@dataclass
class Reply:
    """What every piece of one response carries: its id (chatcmpl-... or cmpl-...), model and time; whether
    a stream ends with a usage chunk (and so every chunk has a "usage" key)."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def logprobs(self, tokens: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        """The OpenAI form of some tokens' log-probabilities: chat's `content` list, or the completions
        API's parallel lists (text_offset counts from `offset`, the characters of the choice before them)."""
        if tokens is None:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": t.token,
                        "logprob": t.logprob,
                        "bytes": list(t.token.encode()),
                        "top_logprobs": [
                            {"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in t.top
                        ],
                    }
                    for t in tokens
                ]
            }
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens],
            "text_offset": offsets,
        }

    def body(
        self,
        texts: list[str],
        reasons: list[str],
        job: EngineRequest,
        logprobs: list[list[TokenLogprob]] | None = None,
    ) -> dict[str, Any]:
        """The whole response: a choice per text (with its tokens' log-probabilities when asked), and the
        token counts."""
        choices = [
            {
                "index": i,
                **({"message": {"role": "assistant", "content": t}} if self.chat else {"text": t}),
                "finish_reason": r,
                "logprobs": self.logprobs(logprobs[i] if logprobs is not None else None),
            }
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head(kind), "choices": choices, "usage": usage(job)}

    def chunk(
        self,
        index: int,
        text: str | None,
        reason: str | None,
        *,
        role: bool = False,
        logprobs: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> str:
        """One server-sent event of a stream; `role` opens a chat choice."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            content: dict[str, Any] = {"delta": delta}
        else:
            content = {"text": text or ""}
        choice = {
            "index": index,
            **content,
            "finish_reason": reason,
            "logprobs": self.logprobs(logprobs, offset),
        }
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if self.include_usage else {}
        return f"data: {json.dumps({**self.head(kind), 'choices': [choice], **extra})}\n\n"

    def usage_chunk(self, job: EngineRequest) -> str:
        """The last event of a stream that asked for usage: no choices, the request's token counts."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head(kind), 'choices': [], 'usage': usage(job)})}\n\n"


def usage(job: EngineRequest) -> dict[str, Any]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": job.prompt_tokens + job.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
    }


# -- messages -----------------------------------------------------------------------------------


def convert_messages(messages: list[Message], config: ServerConfig, max_images: int) -> list[dict[str, Any]]:
    """OpenAI messages -> the processor's: images loaded (data: URIs; http(s) only when allowed), visual
    prompts drawn, at most `max_images` of them."""
    out: list[dict[str, Any]] = []
    n_images = 0
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{where}: a text part needs 'text'", param=where)
                parts.append({"type": "text", "text": part.text})
                continue
            n_images += 1
            if n_images > max_images:
                raise APIError(400, f"more than {max_images} images in one request", param=where)
            parts.append({"type": "image", "image": part_image(part, where, config)})
        out.append({"role": m.role, "content": parts})
    return out


def part_image(part: ContentPart, where: str, config: ServerConfig) -> Any:
    """The picture of an image_url part, with its visual prompts drawn; every refusal is a 400."""
    from vlmkit.images import load_image
    from vlmkit.visual_prompts import draw_visual_prompts

    if part.image_url is None:
        raise APIError(400, f"{where}: an image_url part needs 'image_url': {{'url': ...}}", param=where)
    url = part.image_url.url
    remote = url[:8].lower().startswith(("http://", "https://"))
    if not (url.startswith("data:") or (remote and config.allow_remote_images)):
        why = (
            "remote images are off on this server (start it with --allow-remote-images)"
            if remote
            else "only data: URIs (or http(s) URLs when allowed) are accepted, never local paths"
        )
        raise APIError(400, f"{where}: {why}", param=where)
    try:
        image = load_image(url, allow_remote=config.allow_remote_images, max_pixels=config.max_image_pixels)
        prompts = (part.image_url.visual_prompts or []) + (part.visual_prompts or [])
        return draw_visual_prompts(image, prompts) if prompts else image
    except (ValueError, TypeError, OSError) as e:
        raise APIError(400, f"{where}: {e}", param=where) from None
