"""Running the server: a listening socket, uvicorn in a background thread, and the `lmstack serve` verb.

    from lmstack.serve.app import create_app
    from lmstack.serve.run import serve_in_thread
    with serve_in_thread(create_app("runs/speedrun/model")) as url:    # uvicorn on a free loopback port
        ...

:func:`serve` binds the socket before loading the model, so a busy port fails at once; errors a user can
fix (a busy port, a missing checkpoint, a bad limit) are :class:`~lmstack.errors.LmstackError`, which the
command line prints as one line.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

from fastapi import FastAPI

from lmstack.errors import UserError
from lmstack.serve.app import create_app
from lmstack.serve.state import ServerState


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with ``sock.getsockname()[1]``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    """The base URL clients use for a listening socket (a wildcard address is shown as loopback)."""
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _uvicorn_server(app: FastAPI, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5,
                            lifespan="on", ws="none")
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields the base URL; stops it on exit."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmstack-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.02)
        yield url_for(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None,
          log_level: str = "info", **app_kwargs: Any) -> None:
    """Load ``model`` and serve it until interrupted (the `lmstack serve` verb)."""
    sock = bind_socket(host, port)  # bind first: a busy port fails before the model is loaded
    try:
        app = create_app(model, api_keys=api_keys, **app_kwargs)
    except BaseException:
        sock.close()
        raise
    state: ServerState = app.state.lmstack
    url = url_for(sock)
    print(f"lmstack serve: model '{state.model_name}' ({state.max_model_len}-token context) on {url}", flush=True)
    print(f"  web chat page:  {url}/", flush=True)
    print(f"  OpenAI API:     {url}/v1  (API key {'required' if state.api_keys else 'not required'})", flush=True)
    if state.adapter_names:
        print(f"  LoRA adapters:  {', '.join(state.adapter_names)} (request them by model name)", flush=True)
    if state.tools:
        print(f"  built-in tools: {', '.join(state.tools)} (GET /v1/tools; the chat page's Tools switch)", flush=True)
    if state.feedback is not None:
        print(f"  feedback:       appended to {state.feedback.path} (the chat page's Feedback mode)", flush=True)
    server = _uvicorn_server(app, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
