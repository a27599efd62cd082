"""lmstack.serve: the OpenAI-compatible HTTP server and the web chat page (static/).

app.py (factory and routes) · protocol.py (request/response schemas, error mapping) · validation.py
(server-side checks, SamplingParams) · generation.py (runs a request on the engine) · openai_format.py
(response bodies, SSE events, logprobs) · transport.py (gatekeeper, disconnects, SSE) · embeddings.py ·
state.py (ServerState, ServerLimits) · run.py (sockets, serve_in_thread, the `lmstack serve` verb) ·
adapters.py (LoRA adapters served over the base, `--adapter`) · feedback.py (/v1/feedback, `--feedback`) ·
tool_protocol.py (OpenAI tool calling: tools, tool_choice, tool_calls, streamed call deltas) ·
tool_grammar.py (the grammar that forces a tool call).
"""
