"""Where ``data clean`` runs its tasks: local worker processes (the default) or a Ray cluster.

    lmstack data clean crawl/ --out runs/clean --workers 4                       # LocalExecutor
    lmstack data clean crawl/ --out runs/clean --executor ray --workers 4        # starts a local Ray
    lmstack data clean crawl/ --out runs/clean --executor ray --ray-address 10.0.0.5:6379

    executor = make_executor("ray", workers=4)
    executor.start(setup_fn, setup_args)        # once per worker process, before its first map task
    executor.imap(map_fn, tasks, on_result)     # per-shard work, a bounded number in flight
    results = executor.run_ranks(stage_fn, world_size, inputs, work_dir)   # one task per rank
    executor.close()

Both executors run the same task functions (lmstack.data.pipeline's per-shard map and finalize,
lmstack.data.dedup_stages' rank-of-world_size shuffle stages); the tasks talk only through files in the
run's work directory, so Ray needs storage that every node sees (one machine, NFS, a shared volume) and the
output is the same whichever executor ran it (a test compares the bytes). Ray is an optional dependency
(``pip install 'lmstack[ray]'``), imported only when ``--executor ray`` is chosen.

Choices: a Ray worker process keeps the state that ``start`` built (the stages, the MinHasher, a loaded
classifier) in a module global keyed by the setup arguments, as the local pool's initializer does, so a
model loads once per process, not once per shard. With ``--ray-address`` the address is checked with a
short TCP connect before Ray is asked, so an unreachable cluster is one line, not a long hang; without it a
local cluster with ``workers`` CPUs is started and shut down again; on an existing cluster every CPU it
offers is used (``--workers`` then only sets the local torch threads). An lmstack error raised inside a Ray
task is re-raised as itself, so the CLI still prints one line.

Caveats: the driver still reads the inputs and ships each shard's documents to its map task (through
Ray's object store), so reading is the ceiling at cluster scale; the dedup cluster stage is one task.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any, Callable, Iterable, Protocol

from lmstack.errors import LmstackError, UserError

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_S = 3.0


class Executor(Protocol):
    parallelism: int  # how many tasks run at once; the world size of the shuffle stages

    def start(self, setup: Callable[..., None], setup_args: tuple) -> None: ...

    def imap(self, fn: Callable[[Any], dict], tasks: Iterable[Any], on_result: Callable[[dict], None]) -> None: ...

    def run_ranks(self, fn: Callable[[int, int, dict, str], dict], world_size: int, inputs: dict,
                  work_dir: str) -> list: ...

    def close(self) -> None: ...

    def terminate(self) -> None: ...


def make_executor(kind: str, workers: int, ray_address: str | None = None) -> Executor:
    """The executor for ``--executor KIND``; checks Ray is installed and the address reachable first."""
    if kind == "local":
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, ray_address)
    raise UserError(f"--executor={kind!r}: choose one of {', '.join(EXECUTORS)}")


# ----------------------------------------------------------------------------- local processes


class LocalExecutor:
    """Tasks inline (workers=1) or in a spawn process pool with at most 2 x workers map tasks in flight."""

    def __init__(self, workers: int):
        self.parallelism = workers
        self.pool: Any = None

    def start(self, setup: Callable[..., None], setup_args: tuple) -> None:
        if self.parallelism > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(self.parallelism, initializer=setup, initargs=setup_args)
        else:
            setup(*setup_args)

    def imap(self, fn: Callable[[Any], dict], tasks: Iterable[Any], on_result: Callable[[dict], None]) -> None:
        if self.pool is None:
            for t in tasks:
                on_result(fn(t))
            return
        pending = []
        for t in tasks:
            pending.append(self.pool.apply_async(fn, (t,)))
            while len(pending) >= 2 * self.parallelism:  # bounded memory: wait for the oldest
                on_result(pending.pop(0).get())
        for p in pending:
            on_result(p.get())

    def run_ranks(self, fn: Callable[[int, int, dict, str], dict], world_size: int, inputs: dict,
                  work_dir: str) -> list:
        args = [(rank, world_size, inputs, work_dir) for rank in range(world_size)]
        if self.pool is None or world_size == 1:
            return [fn(*a) for a in args]
        return self.pool.starmap(fn, args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def terminate(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ----------------------------------------------------------------------------- Ray

_RAY_SETUP_DONE: str | None = None  # in a Ray worker process: the setup it has run


def _ray_call(setup: Callable[..., None] | None, setup_args: tuple, fn: Callable[..., dict], *args: Any) -> dict:
    """The body of every Ray task: run the setup once per worker process (per distinct arguments), then fn."""
    global _RAY_SETUP_DONE
    if setup is not None:
        key = json.dumps([setup.__module__, setup.__qualname__, list(setup_args)], sort_keys=True, default=str)
        if _RAY_SETUP_DONE != key:
            setup(*setup_args)
            _RAY_SETUP_DONE = key
    return fn(*args)


def _check_reachable(address: str) -> None:
    """One line now instead of Ray retrying for minutes: ADDRESS must accept a TCP connection."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address={address!r}: give HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--ray-address={address}: cannot connect within {CONNECT_TIMEOUT_S:.0f} s ({e}); "
                        "start the cluster (ray start --head) or drop --ray-address to start a local one") from None


class RayExecutor:
    """One ``ray.remote`` task per shard (map, finalize) and per rank (shuffle stages)."""

    def __init__(self, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'lmstack[ray]'") from None
        self.ray = ray
        self.started_here = False
        if not ray.is_initialized():
            quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            if address:
                _check_reachable(address)
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=workers, **quiet)
            self.started_here = True
        cpus = int(ray.cluster_resources().get("CPU", workers))
        self.parallelism = max(1, cpus if address else min(workers, cpus))
        self.remote = ray.remote(num_cpus=1)(_ray_call)
        self.setup: Callable[..., None] | None = None
        self.setup_args: tuple = ()

    def start(self, setup: Callable[..., None], setup_args: tuple) -> None:
        self.setup, self.setup_args = setup, setup_args

    def imap(self, fn: Callable[[Any], dict], tasks: Iterable[Any], on_result: Callable[[dict], None]) -> None:
        pending: list = []
        for t in tasks:
            pending.append(self.remote.remote(self.setup, self.setup_args, fn, t))
            while len(pending) >= 2 * self.parallelism:  # bounded memory, as the local pool
                done, pending = self.ray.wait(pending, num_returns=1)
                on_result(self._get(done[0]))
        for ref in pending:
            on_result(self._get(ref))

    def run_ranks(self, fn: Callable[[int, int, dict, str], dict], world_size: int, inputs: dict,
                  work_dir: str) -> list:
        refs = [self.remote.remote(None, (), fn, rank, world_size, inputs, work_dir) for rank in range(world_size)]
        return self._get(refs)

    def _get(self, refs: Any) -> Any:
        """ray.get, except that an lmstack error raised in a task comes back as itself (one line in the CLI),
        not wrapped in Ray's traceback."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, LmstackError):
                raise e.cause from None
            raise

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()

    def terminate(self) -> None:
        self.close()
