"""AsyncEngine: the engine behind an asyncio server, stepped by one background thread.

    engine = AsyncEngine(Engine.from_checkpoint(path), max_waiting=256)
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):
        send(out.outputs[0].new_text)          # RequestOutput deltas, the last one has finished=True
    engine.shutdown()

The :class:`~lmstack.engine.engine.Engine` is not thread-safe, so only the stepping thread touches
it: ``generate`` posts an "add" command and then awaits its own asyncio.Queue, which the thread
fills with ``loop.call_soon_threadsafe``. Leaving the ``async for`` early, closing the iterator or
cancelling the task posts an "abort", which frees the request's KV slots before the next step.
``generate`` raises :class:`QueueFull` (at the first iteration, before anything is queued) when the
request's ``n`` sequences would take the sequences waiting for a slot past ``max_waiting``, so a server
can answer 429 at once instead of letting latency grow without bound; the bound counts sequences, not
requests, because each sample of an ``n > 1`` request takes its own slot. Invalid requests (empty
prompt, bad parameters, ``n`` above ``max_waiting``) raise their :class:`~lmstack.errors.UserError`
from the iterator before the queue check.

When a step fails for one request only, the engine stops that request alone (see engine.py) and its
iterator raises :class:`RequestFailed`; the other requests go on. If a step fails for a reason no single
request explains (a bug in the engine itself), every open request fails with RuntimeError and the error is
logged. Torch releases the GIL inside its kernels, so the event loop stays responsive while the thread
computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from typing import Any, AsyncIterator, Sequence

from lmstack.engine.engine import Engine, RequestOutput
from lmstack.engine.sampling import SamplingParams
from lmstack.errors import UserError

log = logging.getLogger("lmstack.engine")


class QueueFull(RuntimeError):
    """Too many requests are waiting for the engine; retry later."""


class RequestFailed(Exception):
    """The engine stopped this request alone because a step failed for it (the server log has the cause)."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        if max_waiting < 1:
            raise UserError(f"max_waiting={max_waiting} must be >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: deque[tuple] = deque()  # ("add", id, prompt, params) | ("abort", id)
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_seqs = 0  # sequences (sum of n) of "add" commands not yet handed to the engine
        self._wake = threading.Event()
        self._stopped = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="lmstack-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def num_waiting(self) -> int:
        """Sequences waiting for a KV slot (each of a request's n samples counts)."""
        return self._pending_seqs + self.engine.scheduler.waiting_seqs

    def stats(self) -> dict[str, Any]:
        """The engine's stats as of the end of the last step (plus requests not yet handed over)."""
        return {**self._stats, "waiting": self.num_waiting()}

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        params = params or SamplingParams()
        self.engine.check_request(prompt_token_ids, params)  # bad input fails at once, even when busy
        if params.n > self.max_waiting:
            raise UserError(f"n={params.n} sequences can never wait here: at most {self.max_waiting} may "
                            "(max_waiting); lower n")
        if self.num_waiting() + params.n > self.max_waiting:
            raise QueueFull(f"{self.num_waiting()} sequences are already waiting (at most {self.max_waiting}); "
                            "retry later")
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._pending_seqs += params.n
            self._commands.append(("add", request_id, list(prompt_token_ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped (or never took) this request
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailed(f"request {request_id} failed inside the engine ({item.error})")
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
                if not finished:
                    self._commands.append(("abort", request_id))
            self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Abort a request from outside its iterator; the iterator ends with finish_reason "abort"."""
        with self._lock:
            self._commands.append(("abort", request_id))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the stepping thread; open iterators raise RuntimeError."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            streams = list(self._streams.items())
        for request_id, _ in streams:
            self._deliver(request_id, RuntimeError("the engine has been shut down"))

    # ------------------------------------------------------------------ the stepping thread
    def _run(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails every open request instead of hanging them
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            self._stats = self.engine.stats()

    def _drain_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            _, request_id, prompt, params = command
            with self._lock:
                wanted = request_id in self._streams  # the consumer may have left already
            try:
                if wanted:
                    self.engine.add_request(prompt, params, request_id)
            except Exception as e:
                self._deliver(request_id, e)
            finally:  # only now: the sequences were counted as pending until the scheduler counts them
                with self._lock:
                    self._pending_seqs -= params.n

    def _fail_all(self, error: Exception) -> None:
        log.error("engine step failed outside any one request; failing all %d open requests",
                  len(self.engine._requests), exc_info=error)
        for request_id in list(self.engine._requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"engine step failed: {error!r}"))
        self.engine._collect_outputs()  # drop the abort notices: the consumers already got the error

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed
            pass
