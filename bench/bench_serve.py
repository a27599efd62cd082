"""Load test for `lmstack serve`: many concurrent streaming clients that hang up at random.

    python bench/bench_serve.py                                # 64 clients x 3 rounds, tiny random model
    python bench/bench_serve.py --clients 16 --rounds 2 --model runs/speedrun/model
    python bench/bench_serve.py --threads 1 --layers 4 --width 256     # a wider random model

The server runs in a subprocess (`lmstack serve --port 0`, so its memory is measured on its own);
without --model a tiny random checkpoint is built in a temporary directory. Each round, every client
sends --requests streaming requests one after another (chat or plain completions, random lengths);
with probability --disconnect-prob a request is abandoned, half of them before the first byte
(while queued or prefilling) and half after a few chunks. After each round the script waits for the
engine to drain and records the server's RSS. It checks, and exits non-zero if any check fails:

* no response with a 5xx status;
* every stream that was not abandoned ends with ``data: [DONE]`` and carries no error event;
* the KV cache is back to 0 tokens (and nothing runs or waits) after every round;
* the server's RSS does not grow across rounds after the first (warm-up) one, within --rss-slack-mb.

Throughput is the completion tokens of finished streams per second of round wall time. The
reference printed next to it is the same engine configuration generating the same number of
sequences of the same lengths in-process (``Engine.generate``, no HTTP), measured in the same run.
Results are printed as a table and, with --json, written to a file. tests/test_serve_load.py runs a
smaller version of this (16 clients) in the default test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

WORDS = ("the model reads a token and writes the next one while the server streams every piece "
         "of text to the client who asked a question about cats dogs rivers code numbers and time").split()


# ----------------------------------------------------------------------------- a tiny model to serve

def build_tiny_checkpoint(path: Path, block_size: int = 1024, n_layer: int = 2, n_embd: int = 64,
                          seed: int = 0) -> Path:
    """A random-weight GPT with a BPE tokenizer trained on generated sentences (seconds on a CPU)."""
    import torch

    from lmstack.config import model_config_to_dict, tiny
    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.checkpoint import save_checkpoint

    rng = random.Random(seed)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(4, 14))).capitalize() + rng.choice(".?!:") + f" {i % 10}"
             for i in range(400)]
    tokenizer = Tokenizer.train(lines, vocab_size=384)
    cfg = tiny().model
    cfg.vocab_size, cfg.block_size = tokenizer.vocab_size, block_size
    cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd = n_layer, 2, 2, n_embd
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(cfg), {"model": model_config_to_dict(cfg)}, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- one client request

@dataclass
class Outcome:
    kind: str  # "done" | "abandoned_early" | "abandoned_mid" | "refused" (429) | "failed"
    status: int | None = None
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    problem: str = ""


@dataclass
class RoundResult:
    round: int
    wall_s: float
    outcomes: dict[str, int]
    server_errors: int
    problems: list[str]
    completion_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_p50_ms: float | None
    drain_s: float
    kv_tokens_used: int
    rss_mb: float


@dataclass
class LoadConfig:
    clients: int = 64
    rounds: int = 3
    requests: int = 3  # per client per round
    max_tokens: int = 48
    disconnect_prob: float = 0.25
    seed: int = 0
    timeout_s: float = 300.0


def _request_body(rng: random.Random, model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    words = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
    common = {"model": model, "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens), "stream": True,
              "stream_options": {"include_usage": True}, "temperature": rng.choice([0.0, 0.7, 1.0]),
              "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.7:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", {**common, "prompt": words}


async def _stream_once(client: httpx.AsyncClient, path: str, body: dict, hang_up_after: int | None) -> Outcome:
    """One streaming request; hang_up_after = number of data events after which to close (None = read all)."""
    start = time.perf_counter()
    out = Outcome(kind="failed")
    async with client.stream("POST", path, json=body) as response:
        out.status = response.status_code
        if response.status_code == 429:
            await response.aread()
            out.kind = "refused"
            return out
        if response.status_code != 200:
            out.problem = f"status {response.status_code}: {(await response.aread())[:200]!r}"
            return out
        events, last = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            last = data
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out.problem = f"error event: {chunk['error']}"
                return out
            events += 1
            if out.ttft_s is None and any((c.get("delta") or {}).get("content") or c.get("text")
                                          for c in chunk.get("choices", [])):
                out.ttft_s = time.perf_counter() - start
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
            if hang_up_after is not None and events >= hang_up_after:
                out.kind = "abandoned_mid"  # leaving the block closes the connection mid-stream
                out.latency_s = time.perf_counter() - start
                return out
        if last != "[DONE]":
            out.problem = f"stream ended without [DONE] (last event: {last!r})"
            return out
        out.kind = "done"
        out.latency_s = time.perf_counter() - start
        return out


async def _one_request(client: httpx.AsyncClient, rng: random.Random, model: str, cfg: LoadConfig) -> Outcome:
    path, body = _request_body(rng, model, cfg.max_tokens)
    mode = "full"
    if rng.random() < cfg.disconnect_prob:
        mode = rng.choice(["early", "mid"])
    hang_up_after = rng.randint(1, 6) if mode == "mid" else None
    task = asyncio.ensure_future(_stream_once(client, path, body, hang_up_after))
    if mode == "early":  # give up after a moment, most likely while queued or prefilling
        done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.05))
        if not done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return Outcome(kind="abandoned_early")
    try:
        return await task
    except httpx.HTTPError as e:
        return Outcome(kind="failed", problem=f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- rounds

def _server_stats(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health", timeout=30).json()["engine"]


def _wait_drained(base_url: str, timeout_s: float = 60.0) -> tuple[float, dict]:
    start = time.perf_counter()
    while True:
        stats = _server_stats(base_url)
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_tokens_used"] == 0:
            return time.perf_counter() - start, stats
        if time.perf_counter() - start > timeout_s:
            return time.perf_counter() - start, stats
        time.sleep(0.05)


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2 ** 20


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def _run_round(base_url: str, model: str, cfg: LoadConfig, round_index: int) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=cfg.clients * 2, max_keepalive_connections=cfg.clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=cfg.timeout_s) as client:
        async def client_loop(client_index: int) -> list[Outcome]:
            rng = random.Random(cfg.seed * 1_000_003 + round_index * 1009 + client_index)
            return [await _one_request(client, rng, model, cfg) for _ in range(cfg.requests)]

        start = time.perf_counter()
        per_client = await asyncio.gather(*[client_loop(i) for i in range(cfg.clients)])
        wall = time.perf_counter() - start
    return [o for outcomes in per_client for o in outcomes], wall


def run_load(base_url: str, server_pid: int, cfg: LoadConfig, model: str | None = None,
             log: Any = print) -> list[RoundResult]:
    """Run cfg.rounds rounds against a running server; returns one RoundResult per round."""
    model = model or httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    results = []
    for r in range(cfg.rounds):
        outcomes, wall = asyncio.run(_run_round(base_url, model, cfg, r))
        drain_s, stats = _wait_drained(base_url)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.kind] = counts.get(o.kind, 0) + 1
        done = [o for o in outcomes if o.kind == "done"]
        tokens = sum(o.completion_tokens for o in done)
        ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
        result = RoundResult(
            round=r, wall_s=round(wall, 3), outcomes=counts,
            server_errors=sum(1 for o in outcomes if o.status is not None and o.status >= 500),
            problems=[o.problem for o in outcomes if o.problem][:10], completion_tokens=tokens,
            tokens_per_s=round(tokens / wall, 1),
            ttft_p50_ms=None if not ttfts else round(1000 * _percentile(ttfts, 0.5), 1),
            ttft_p95_ms=None if not ttfts else round(1000 * _percentile(ttfts, 0.95), 1),
            latency_p50_ms=None if not done else round(1000 * _percentile([o.latency_s for o in done], 0.5), 1),
            drain_s=round(drain_s, 3), kv_tokens_used=stats["kv_tokens_used"], rss_mb=round(_rss_mb(server_pid), 1))
        results.append(result)
        log(f"round {r}: {counts} in {result.wall_s:.1f} s, {result.tokens_per_s} tok/s, "
            f"ttft p50 {result.ttft_p50_ms} ms, kv after {result.kv_tokens_used}, rss {result.rss_mb} MB")
    return results


def check(results: list[RoundResult], rss_slack_mb: float) -> list[str]:
    """The load test's pass criteria; returns the failures (empty = pass)."""
    failures = []
    for r in results:
        if r.server_errors:
            failures.append(f"round {r.round}: {r.server_errors} responses with a 5xx status")
        if r.outcomes.get("failed"):
            failures.append(f"round {r.round}: {r.outcomes['failed']} streams failed: {r.problems}")
        if r.kv_tokens_used != 0:
            failures.append(f"round {r.round}: {r.kv_tokens_used} KV tokens still in use after draining")
    steady = [r.rss_mb for r in results[1:]]
    if len(steady) >= 2 and max(steady) - steady[0] > rss_slack_mb:
        failures.append(f"server RSS grew across rounds: {[r.rss_mb for r in results]} MB "
                        f"(allowed {rss_slack_mb} MB after the warm-up round)")
    return failures


# ----------------------------------------------------------------------------- reference and main

def engine_reference(checkpoint: str, cfg: LoadConfig, max_num_seqs: int) -> float:
    """Tokens/s of the same engine on the same amount of work, in-process, without HTTP."""
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams

    engine = Engine.from_checkpoint(checkpoint, device="cpu", max_num_seqs=max_num_seqs)
    rng = random.Random(cfg.seed)
    prompts, params = [], []
    for _ in range(cfg.clients * cfg.requests):
        words = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
        prompts.append(engine.tokenizer.encode(words))
        params.append(SamplingParams(max_tokens=rng.randint(max(1, cfg.max_tokens // 4), cfg.max_tokens),
                                     temperature=0.7, ignore_eos=True))
    engine.generate(prompts[:4], params[:4])  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / wall


def start_server(checkpoint: str, max_num_seqs: int, max_waiting: int,
                 threads: int | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", checkpoint, "--port", "0", "--device", "cpu",
           "--max-num-seqs", str(max_num_seqs), "--max-waiting", str(max_waiting), "--log-level", "warning"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server exited during start-up:\n" + "".join(lines))
        lines.append(line)
        if "OpenAI API:" in line:
            return proc, line.split("OpenAI API:")[1].split()[0].rsplit("/v1", 1)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint to serve (default: a tiny random one)")
    p.add_argument("--layers", type=int, default=2, help="layers of the random model (without --model)")
    p.add_argument("--width", type=int, default=64, help="embedding width of the random model (without --model)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--rounds", type=int, default=3, help="rounds (the first one is the warm-up for RSS)")
    p.add_argument("--requests", type=int, default=3, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens of a request")
    p.add_argument("--disconnect-prob", type=float, default=0.25, help="share of requests abandoned midway")
    p.add_argument("--max-num-seqs", type=int, default=16, help="server's batch size (the rest queue)")
    p.add_argument("--max-waiting", type=int, default=256, help="server's waiting-queue bound")
    p.add_argument("--rss-slack-mb", type=float, default=32.0, help="allowed RSS growth after the warm-up round")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the server and the reference (default: torch's own choice); "
                        "1 avoids OpenMP spinning on a CPU shared with other work")
    p.add_argument("--no-reference", action="store_true", help="skip the in-process engine reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    cfg = LoadConfig(clients=a.clients, rounds=a.rounds, requests=a.requests, max_tokens=a.max_tokens,
                     disconnect_prob=a.disconnect_prob, seed=a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = a.model or str(build_tiny_checkpoint(Path(tmp) / "tiny-random", n_layer=a.layers,
                                                          n_embd=a.width))
        proc, url = start_server(checkpoint, a.max_num_seqs, a.max_waiting, a.threads)
        try:
            print(f"server {url} (pid {proc.pid}), {cfg.clients} clients x {cfg.requests} requests x "
                  f"{cfg.rounds} rounds, disconnect p={cfg.disconnect_prob}")
            results = run_load(url, proc.pid, cfg)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        reference = None if a.no_reference else engine_reference(checkpoint, cfg, a.max_num_seqs)
    failures = check(results, a.rss_slack_mb)
    steady = results[1:] or results
    served = statistics.mean(r.tokens_per_s for r in steady)
    print(f"\nthroughput through HTTP (rounds 1..): {served:.0f} completion tokens/s"
          + (f"; engine alone, same work: {reference:.0f} tokens/s" if reference else ""))
    print("rss per round (MB):", [r.rss_mb for r in results])
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    if a.json:
        Path(a.json).write_text(json.dumps({"config": asdict(cfg), "rounds": [asdict(r) for r in results],
                                            "engine_reference_tokens_per_s": reference,
                                            "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
