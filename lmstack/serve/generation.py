"""The generation driver: one HTTP request's prompts run on the engine as one merged stream of outputs.

A request with several prompts (``/v1/completions`` with a list) becomes one engine request per prompt,
each pumped by its own task into one queue, so :class:`Generation` yields ``(prompt_index,
RequestOutput)`` in arrival order. :func:`respond` runs a generation for a plain or a streamed response:
a stream is begun only once every prompt has produced its first output, so a full queue is still a
proper 429 rather than an error inside a 200 stream, and the generation is closed (the engine aborts its
requests and frees their KV memory) whenever the exchange ends early: a disconnect, the per-request
timeout, or a failure.

Engine errors map to HTTP as follows: a full queue is 429 (``queue_full``), a request the engine refuses
is 400, a request the engine stopped alone because a step failed for it is 500 (``engine_error``, logged
with its request id; the other requests go on), a stopped engine is 503 (``engine_unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from lmstack.engine.async_engine import QueueFull, RequestFailed
from lmstack.engine.engine import RequestOutput
from lmstack.engine.sampling import SamplingParams
from lmstack.serve.protocol import APIError
from lmstack.serve.state import ServerState
from lmstack.serve.transport import ClientGone, EventStreamResponse, until_disconnect

log = logging.getLogger("lmstack.serve")

_END = object()


class Generation:
    """Runs one engine request per prompt concurrently and merges their outputs into one stream.

    ``await start()`` returns once every prompt has produced its first output (so errors such as a
    full queue surface before a response is begun); ``events()`` then yields ``(prompt_index,
    RequestOutput)`` in arrival order; ``aclose()`` cancels whatever still runs, which makes the
    engine abort those requests and free their memory. Always used with ``try/finally: aclose()``.
    """

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams, request_id: str,
                 deadline: float):
        self.state, self.prompts, self.params = state, prompts, params
        self.request_id, self.deadline = request_id, deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.buffer: list[tuple[int, RequestOutput]] = []
        self.open = len(prompts)

    async def start(self) -> None:
        ids = [self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}" for i in range(len(self.prompts))]
        self.tasks = [asyncio.ensure_future(self._pump(i, p, rid)) for i, (p, rid) in enumerate(zip(self.prompts, ids))]
        started: set[int] = set()
        while len(started) < len(self.prompts):
            index, item = await self._next()
            started.add(index)
            if item is not _END:
                self.buffer.append((index, item))

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.buffer:
            yield self.buffer.pop(0)
        while self.open:
            index, item = await self._next()
            if item is not _END:
                yield index, item

    def has_ready(self) -> bool:
        """Whether the next output is already here (events() would not wait)."""
        return bool(self.buffer) or not self.queue.empty()

    async def _next(self) -> tuple[int, Any]:
        remaining = self.deadline - time.monotonic()
        try:
            if not self.queue.empty() and remaining > 0:  # the common case while streaming: no timer needed
                index, item, error = self.queue.get_nowait()
            else:
                index, item, error = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            self.state.counters["timeouts"] += 1
            raise APIError(503, f"The request did not finish within the server's limit of "
                                f"{self.state.limits.request_timeout_s:g} s; try fewer tokens or try again later.",
                           type="server_error", code="timeout") from None
        if error is not None:
            raise error
        if item is _END:
            self.open -= 1
        return index, item

    async def _pump(self, index: int, prompt_ids: list[int], request_id: str) -> None:
        error: BaseException | None = None
        outputs = None
        try:
            outputs = self.state.async_engine.generate(prompt_ids, self.params, request_id=request_id)
            async for out in outputs:
                self.queue.put_nowait((index, out, None))
        except QueueFull:
            self.state.counters["queue_full"] += 1
            error = APIError(429, "The server is at capacity: its request queue is full. Retry shortly.",
                             type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except RequestFailed:  # the engine logged the cause with this request id and went on with the others
            self.state.counters["engine_errors"] += 1
            error = APIError(500, f"The engine could not run request {request_id}; the server log has the cause. "
                                  "Other requests are not affected.", type="server_error", code="engine_error")
        except ValueError as e:  # the engine refused the request (e.g. too long for its KV budget)
            error = APIError(400, str(e), code="invalid_request")
        except RuntimeError as e:  # the engine is shut down / its thread died
            error = APIError(503, f"The engine is not available: {e}", type="server_error",
                             code="engine_unavailable")
        except Exception as e:  # a bug: report it rather than leave the request waiting for its timeout
            log.exception("generation %s failed", request_id)
            error = APIError(500, f"internal server error ({type(e).__name__}); see the server log",
                             type="server_error", code="internal_error")
        finally:
            if outputs is not None:
                await outputs.aclose()  # aborts the request in the engine if it is still running
        self.queue.put_nowait((index, None, error) if error else (index, _END, None))

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def respond(request: Request, gen: Generation, stream: bool, make_stream: Callable[[], AsyncIterator[str]],
                  make_result: Callable[[], Awaitable[Any]]) -> Any:
    """Run a generation for a plain or a streamed response, cancelling it if the client goes away."""
    counters = request.app.state.lmstack.counters

    def count_disconnect() -> None:
        counters["disconnects"] += 1

    handed_over = False
    try:
        if not stream:
            return await until_disconnect(request, make_result())
        await until_disconnect(request, gen.start())
        handed_over = True  # from here the response closes the generation when the stream ends
        return EventStreamResponse(make_stream(), on_close=gen.aclose, on_disconnect=count_disconnect,
                                   more_ready=gen.has_ready)
    except ClientGone:
        count_disconnect()
        return Response(status_code=499)  # nobody is left to read it
    finally:
        if not handed_over:
            await gen.aclose()
