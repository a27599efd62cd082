"""`lmstack serve`: the OpenAI-compatible HTTP server (lmstack.serve.app) with its web chat page.

Every limit is checked while the command line is parsed, so a bad value fails before the model loads
and before a port is bound.
"""

from __future__ import annotations

import argparse
import os

from lmstack.cli.common import device, non_negative_int, port, positive_float, positive_int, verb_parser
from lmstack.cli.generate import tool_spec


def adapter_spec(value: str) -> tuple[str, str]:
    """--adapter NAME=DIR or DIR (named after the directory), checked while parsing."""
    from lmstack.errors import UserError
    from lmstack.serve.adapters import parse_adapter_spec

    try:
        name, path = parse_adapter_spec(value)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is not a directory; give NAME=DIR with a peft adapter directory "
                                         "(e.g. RUN/adapter from `lmstack sft --lora`)")
    return name, path


def api_keys_from(args: argparse.Namespace) -> list[str]:
    """--api-key values, else the comma-separated LMSTACK_API_KEYS; none means no authentication."""
    if args.api_key:
        return list(args.api_key)
    return [key.strip() for key in os.environ.get("LMSTACK_API_KEYS", "").split(",") if key.strip()]


def run_serve(args: argparse.Namespace) -> None:
    from lmstack.serve.run import serve

    serve(args.model, host=args.host, port=args.port, api_keys=api_keys_from(args), log_level=args.log_level,
          model_name=args.model_name, max_request_bytes=args.max_request_bytes,
          max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
          max_waiting=args.max_waiting, request_timeout_s=args.request_timeout, device=args.device,
          max_num_seqs=args.max_num_seqs, kv_cache_tokens=args.kv_cache_tokens, adapters=args.adapter or (),
          feedback=args.feedback, tools=args.tools, allow_unsafe_sandbox=args.unsafe_sandbox)


def add_serve(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "serve", "OpenAI-compatible HTTP server with a web chat page",
                         "Serve a checkpoint over an OpenAI-compatible API (/v1/models, /v1/completions,\n"
                         "/v1/chat/completions, /v1/embeddings) with a web chat page at /. Prints the URLs.\n"
                         "API keys: --api-key (repeatable) or LMSTACK_API_KEYS=key1,key2; none = no authentication.\n"
                         "LoRA adapters: --adapter NAME=DIR (repeatable) serves each adapter as model NAME over the\n"
                         "one base in shared batches. --feedback FILE turns on the chat page's feedback mode.\n"
                         "Tool calling (tools / tool_choice on /v1/chat/completions) needs no option; --tools\n"
                         "calculator,python,search=IDX also serves built-in tools at /v1/tools for the chat page.")
    parser.add_argument("--model", required=True, help="checkpoint or run directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=port, default=8000, help="TCP port (0 = any free port)")
    parser.add_argument("--api-key", action="append", default=None, help="accepted Bearer key (repeatable)")
    parser.add_argument("--model-name", default=None, help="model id clients send; unset = the directory name")
    parser.add_argument("--adapter", action="append", type=adapter_spec, default=None, metavar="NAME=DIR",
                        help="LoRA adapter (peft layout) served as model NAME over the base (repeatable; "
                             "a bare DIR is named after the directory); default: none")
    parser.add_argument("--feedback", default=None, metavar="FILE",
                        help="JSONL file that collects the chat page's judgements (preference pairs, ratings); "
                             "default: none (feedback mode off)")
    parser.add_argument("--tools", type=tool_spec, default=None, metavar="LIST",
                        help="built-in tools served at /v1/tools for the chat page: calculator, python, search=IDX "
                             "(comma-separated, as `lmstack chat --tools`); default: none")
    parser.add_argument("--unsafe-sandbox", action="store_true",
                        help="let the python tool run in the escapable sandbox when no contained one exists")
    parser.add_argument("--max-request-bytes", type=positive_int, default=1 << 20,
                        help="largest request body (413 above)")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="longest prompt in tokens; unset = the context length")
    parser.add_argument("--max-tokens-limit", type=positive_int, default=4096,
                        help="largest max_tokens a request may ask for")
    parser.add_argument("--max-waiting", type=non_negative_int, default=256,
                        help="requests that may wait for a slot (429 above)")
    parser.add_argument("--request-timeout", type=positive_float, default=600.0,
                        help="seconds a request may take in all")
    parser.add_argument("--max-num-seqs", type=positive_int, default=32, help="sequences decoded together")
    parser.add_argument("--kv-cache-tokens", type=positive_int, default=None,
                        help="cap on KV-cache tokens; unset = max-num-seqs x context")
    parser.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level")
    parser.set_defaults(func=run_serve)
