"""What the app checks beyond the request schema, and the SamplingParams a request becomes.

protocol.py checks what depends only on the request (types, ranges, combinations); this module checks
what depends on the server: whether it is up and generates at all, the model name (the base or one of its
LoRA adapters), whether feedback is collected, token ids against the
vocabulary, the grammar a ``response_format`` or a forced tool call asks for, prompt and completion lengths against the context and the server's limits, and the number
of sequences (prompts x ``n``) against the waiting bound. Every failure is an
:class:`~lmstack.serve.protocol.APIError` with OpenAI's status, param and code.
"""

from __future__ import annotations

import time

from lmstack.engine.constraints import Grammar, GrammarCompiler
from lmstack.engine.sampling import SamplingParams
from lmstack.errors import UserError
from lmstack.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from lmstack.serve.state import ServerState
from lmstack.serve.tool_protocol import ToolPlan, tool_constraint


def check_ready(state: ServerState, generate: bool = True) -> None:
    if state.shutting_down:
        raise APIError(503, "The server is shutting down; retry on another instance.", type="server_error",
                       code="shutting_down")
    if generate and state.engine is None:  # OpenAI answers 404 when a model does not do an endpoint
        raise APIError(404, f"The model '{state.model_name}' is an encoder: it serves /v1/embeddings only, "
                            "not text generation.", param="model", code="model_not_supported")
    if generate and state.async_engine is None:
        raise APIError(503, "The engine is not running.", type="server_error", code="engine_unavailable")


def check_model(state: ServerState, model: str) -> str | None:
    """The adapter a model name selects (None for the base model); 404 for a name this server does not serve."""
    if model == state.model_name:
        return None
    if model in state.adapter_names:
        return model
    served = ", ".join(f"'{name}'" for name in (state.model_name, *state.adapter_names))
    raise APIError(404, f"The model '{model}' does not exist; this server serves {served} (see GET /v1/models).",
                   type="not_found_error", param="model", code="model_not_found")


def check_feedback(state: ServerState) -> None:
    if state.feedback is None:
        raise APIError(404, "This server does not collect feedback; start it with `lmstack serve --feedback FILE` "
                            "to enable /v1/feedback and the chat page's feedback mode.", type="not_found_error",
                       code="feedback_disabled")


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"'{param}' holds token id {bad[0]}, outside this model's vocabulary [0, {vocab})",
                       param=param, code="invalid_value")


def check_lengths(state: ServerState, prompt_len: int, max_tokens: int | None, param: str) -> int:
    """Validate prompt and generation lengths; returns the max_tokens to use."""
    lim = state.limits
    max_prompt = lim.max_prompt_tokens or state.max_model_len
    if prompt_len > max_prompt:
        raise APIError(400, f"The prompt is {prompt_len} tokens long; this server accepts at most {max_prompt}.",
                       param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > lim.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {lim.max_tokens_limit}.",
                       param="max_tokens", code="invalid_value")
    room = state.max_model_len - prompt_len
    if max_tokens is None:
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens and the "
                                f"prompt already uses {prompt_len}; shorten it.", param=param,
                           code="context_length_exceeded")
        return min(room, lim.max_tokens_limit)
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                            "for the completion). Shorten the prompt or lower max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def response_constraint(state: ServerState, req: ChatCompletionRequest) -> Grammar | None:
    """The grammar ``response_format`` asks for (None for plain text); 400 naming the part that cannot compile.

    The grammar engine's vocabulary is built on the first structured request and kept on the state.
    """
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        grammars = grammar_compiler(state)
        if fmt.type == "json_object":
            return grammars.json_object()
        return grammars.json_schema(fmt.json_schema.json_schema, f"response_format.json_schema "
                                                                 f"{fmt.json_schema.name!r}")
    except UserError as e:
        raise APIError(400, f"{e}; fix or simplify the schema.", param="response_format",
                       code="invalid_json_schema") from None


def tool_call_constraint(state: ServerState, plan: ToolPlan) -> Grammar | None:
    """The grammar of a forced tool call (None unless tool_choice is "required" or names a function);
    400 naming the tool whose parameters the grammar engine cannot compile."""
    if not plan.required:
        return None
    try:
        return tool_constraint(grammar_compiler(state), state.tokenizer, plan)
    except UserError as e:
        raise APIError(400, f"{e}; fix or simplify the tool's parameters schema.", param="tools",
                       code="invalid_json_schema") from None


def grammar_compiler(state: ServerState) -> GrammarCompiler:
    """The grammar engine's vocabulary, built on the first constrained request and kept on the state."""
    if state.grammars is None:
        state.grammars = GrammarCompiler(state.tokenizer, state.model.config.vocab_size, state.engine.eos_token_ids)
    return state.grammars


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, *,
                    logprobs: int | None, prompt_logprobs: int | None = None, adapter: str | None = None,
                    constraint: Grammar | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_k=max(req.top_k, 0), top_p=1.0 if req.top_p is None else req.top_p, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, stop=req.stop_list(),
        ignore_eos=req.ignore_eos, seed=req.seed, n=req.n, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        adapter=adapter, constraint=constraint)


def check_sequences(state: ServerState, num_prompts: int, n: int) -> None:
    """Every sample of every prompt waits for its own KV slot: prompts x n count against the waiting bound."""
    bound = state.async_engine.max_waiting if state.async_engine is not None else state.limits.max_waiting
    if num_prompts * n > bound:
        raise APIError(400, f"This request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x n={n}); "
                            f"this server queues at most {bound}. Send fewer prompts per request or lower n.",
                       param="n" if num_prompts == 1 else "prompt", code="too_many_sequences")


def deadline(state: ServerState) -> float:
    return time.monotonic() + state.limits.request_timeout_s
