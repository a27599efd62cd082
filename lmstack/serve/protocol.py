"""OpenAI wire format: the request and response schemas of `lmstack serve`, and its error mapping.

Requests are pydantic models that mirror the OpenAI API (``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``, ``/v1/models``) closely enough that the official ``openai`` client, LangChain and
friends work unchanged. Range checks live here, so a request that reaches the app is well-formed;
what depends on the model (context length, vocabulary) is checked in app.py.

Error mapping (every error body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``):

    400 invalid_request_error   malformed JSON, a wrong type, a value out of range, an unknown field,
                                a prompt longer than the context, max_tokens over the server's limit
    401 invalid_request_error   missing or wrong API key (code ``invalid_api_key``), as OpenAI answers
    404 not_found_error         unknown route (``unknown_url``) or model (``model_not_found``)
    405 invalid_request_error   a known route with the wrong method
    413 invalid_request_error   request body larger than the server accepts (``request_too_large``)
    422 invalid_request_error   a well-formed request for something this server cannot do: legacy
                                ``functions``, logit_bias, suffix, images, embedding ``dimensions``
                                (``unsupported_parameter`` / ``unsupported_value``)
    429 rate_limit_error        the waiting queue is full (``queue_full``); Retry-After is set
    503 server_error            shutting down (``shutting_down``), engine stopped (``engine_unavailable``),
                                or the request ran past the server's per-request timeout (``timeout``)

OpenAI itself answers 400 for schema errors (:func:`validation_error` turns pydantic's errors into one
naming the field); FastAPI's default of 422 for them is overridden in app.py. 422 is kept for "valid but
unsupported" so a client can tell a typo from a missing feature.
Unknown fields are rejected like OpenAI does, except a few that are harmless to ignore
(``user``, ``metadata``, ``store``, ``service_tier``, ...; see ``IGNORED_FIELDS``).

Structured output: ``response_format`` ``{"type": "json_object"}`` (any JSON object) and ``{"type":
"json_schema", "json_schema": {"name", "schema", "strict"}}`` are enforced by grammar-constrained
decoding (lmstack.engine.constraints); a schema the grammar engine cannot compile is a 400 naming the
problem (validation.py).

Tool calling: ``tools`` (function definitions: name, description, JSON-schema ``parameters``),
``tool_choice`` (``"none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}``) and
``parallel_tool_calls`` are read here (:class:`ToolDefinition`, :class:`NamedToolChoice`; a definition
without a name, with non-object parameters or a name used twice is a 400 naming it); what they do is in
tool_protocol.py. Replies carry ``tool_calls`` (:class:`ToolCallOut`, streamed as :class:`ToolCallDelta`);
assistant messages with ``tool_calls`` and ``tool`` messages with ``tool_call_id`` are accepted back.
The legacy ``functions`` / ``function_call`` fields stay unsupported (422).

Non-OpenAI sampling knobs that vLLM also accepts are allowed as extra fields: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos`` (the openai client sends them with ``extra_body=``).

Types are strict, as OpenAI's are: ``"stream": "yes"``, ``"n": "2"``, ``"n": 2.0`` and ``"n": true`` are
400s, not coerced (an integer is accepted where a number is expected). Every numeric field has a range
the engine can honour, so nothing a client sends can overflow the batched sampler; NaN and infinity are
refused. Values inside the ranges may still be extreme (``temperature: 1e-300``); the sampler handles
those safely (lmstack.engine.sampling).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmstack.engine.sampling import MAX_TOP_K

# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered to the client in OpenAI's JSON shape with the given HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unsupported(param: str, what: str) -> APIError:
    return APIError(422, f"'{param}': {what} is not supported by this server", param=param,
                    code="unsupported_parameter")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic/FastAPI validation errors -> one OpenAI-style 400 naming the first offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{first.get('ctx', {}).get('error', first.get('msg'))}. Send valid JSON "
                             "with Content-Type: application/json.", code="invalid_json")
    if first.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return APIError(400, "The request body must be a JSON object; send it with Content-Type: application/json.",
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request body is missing; send a JSON object.", code="invalid_json")
    param = _dotted(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "Unrecognized request argument supplied"
    elif first.get("type") == "missing":
        msg = "Missing required parameter"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{msg}{more}", param=param or None,
                    code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value")


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        # union branches show up as type names ("str", "list[int]"); they are not part of the path
        if part in ("str", "int", "float", "bool") or "[" in part or part.startswith("function-"):
            continue
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


# ----------------------------------------------------------------------------- request models

# OpenAI fields that change nothing about the output here; accepted and ignored rather than rejected.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier",
                  "prompt_cache_key", "prompt_cache_retention", "verbosity")

StopSpec = Union[str, list[str], None]
MAX_INT = 2 ** 31 - 1  # upper bound of token counts: far above any context, far below any overflow
SEED_RANGE = dict(ge=-2 ** 63, le=2 ** 63 - 1)  # a 64-bit integer, as OpenAI's seed
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Request(BaseModel):
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
        return data


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None  # newer OpenAI clients may send it; nothing to obfuscate here


class _SamplingFields(_Request):
    """Sampling fields shared by completions and chat completions (OpenAI names and ranges)."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopSpec = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, **SEED_RANGE)
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM names)
    top_k: int = Field(default=0, ge=-1, le=MAX_TOP_K)  # 0 or -1 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: StopSpec) -> StopSpec:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.logit_bias:
            raise unsupported("logit_bias", "biasing token logits")


PromptSpec = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptSpec
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_INT)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=16)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptSpec) -> PromptSpec:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if isinstance(v[0], list) and any(len(p) == 0 for p in v):
                raise ValueError("a token-id prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise unsupported("suffix", "inserting text before a suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "best_of different from n (server-side ranking)")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo=true (scoring the prompt)",
                           param="max_tokens", code="invalid_value")


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part of another kind (image_url, input_audio, file): parsed only to be refused with 422."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCallIn(BaseModel):
    """``function`` of a tool call an assistant message carries back: the name and the JSON-string arguments."""

    model_config = STRICT
    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(BaseModel):
    model_config = STRICT
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, OtherPart]], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if not isinstance(part, TextPart):
                raise unsupported("messages", f"content of type {part.type!r}")
            parts.append(part.text)
        return "".join(parts)


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must follow (enforced by constrained decoding)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: Union[dict[str, Any], bool] = Field(default=True, alias="schema")  # True = any JSON value
    strict: bool | None = None  # the schema is always enforced here, so strict only documents intent


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object "
                             "({\"name\": ..., \"schema\": {...}})")
        return self


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class FunctionDefinition(BaseModel):
    """A function the model may call: OpenAI's ``tools[i].function``."""

    model_config = STRICT
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; None = no arguments
    strict: bool | None = None  # enforced schemas are always strict here; documents intent

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of an object (\"type\": \"object\"), "
                             f"got type {v.get('type')!r}")
        return v

    def schema(self) -> dict[str, Any]:
        """The arguments' JSON schema (an empty object when the function takes none)."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ToolDefinition(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` that forces one function: ``{"type": "function", "function": {"name": ...}}``."""

    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @field_validator("tools")
    @classmethod
    def _check_tool_names(cls, v: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        seen: set[str] = set()
        for tool in v or []:
            if tool.function.name in seen:
                raise ValueError(f"two tools are named {tool.function.name!r}; tool names must be unique")
            seen.add(tool.function.name)
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.functions or self.function_call not in (None, "none"):
            raise unsupported("functions", "the legacy functions / function_call fields (send tools / "
                                           "tool_choice)")
        if self.response_format is not None and self.response_format.type not in RESPONSE_FORMATS:
            raise unsupported("response_format", f"response_format {self.response_format.type!r}")
        if self.modalities and any(m != "text" for m in self.modalities):
            raise unsupported("modalities", "output other than text")


EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class EmbeddingRequest(_Request):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=MAX_INT)

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: EmbeddingInput) -> EmbeddingInput:
        if isinstance(v, str):
            if not v:
                raise ValueError("input must not be an empty string")
        elif not v:
            raise ValueError("input must not be an empty list")
        elif isinstance(v[0], str) and any(not s for s in v):
            raise ValueError("input strings must not be empty")
        elif isinstance(v[0], list) and any(not ids for ids in v):
            raise ValueError("token-id inputs must not be empty")
        return v

    def inputs(self) -> list[str | list[int]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if isinstance(v[0], int):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        if self.dimensions is not None:
            raise unsupported("dimensions", "shortening embeddings")


# ----------------------------------------------------------------------------- response models


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "lmstack"
    max_model_len: int | None = None
    parent: str | None = None  # for a LoRA adapter: the base model it runs on


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object as a string, OpenAI's wire form


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """One piece of a streamed tool call: the first of a call has id, type and name; later ones arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
