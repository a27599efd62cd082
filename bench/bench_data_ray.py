"""Benchmark `lmstack data clean` on the local executor against the Ray executor, in one run, same corpus.

    python bench/bench_data_ray.py                    # results in bench/results/data_ray.json
    python bench/bench_data_ray.py --mb 4 --workers 2

Needs Ray (``pip install 'lmstack[ray]'``). The corpus is the first ``--mb`` MB of the classics corpus
(real text: the King James Bible, Shakespeare, Milton, fortunes), written as one JSONL file under
``runs/bench_data_ray``, cleaned with the default config (decontamination index cached before timing):

1. ``local`` with 1 worker: the reference.
2. ``local`` with ``--workers`` worker processes (a fresh spawn pool per run: its start-up is in the time).
3. ``ray`` on a local cluster of ``--workers`` CPUs, started once before the runs and timed separately
   (its worker processes live across runs, as on a long-lived cluster).

Two rounds, the second in the reverse order, so a change in the machine's load hits every configuration;
each configuration's best wall time counts. Reported per configuration: wall seconds of both rounds, MB/s,
the ratio to the reference, the phase times from report.json (map, dedup shuffle, finalize), and a check
that every run's output shards and duplicates.tsv are byte-identical to the reference. The shuffle's traffic (the size of the hash-partitioned files the dedup stages exchange) is
reported per MB of input, which is what the stages would move between machines.
Caveat: the machine is shared with other work, so only ratios measured within one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from lmstack.data.corpora import resolve_inputs
from lmstack.data.pipeline import clean_corpus
from lmstack.data.pipeline_config import CleanConfig
from lmstack.data.readers import iter_documents

ROOT = Path(__file__).resolve().parent.parent


def _write_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """The first MEGABYTES of classics as JSONL; returns (documents, bytes of text)."""
    docs, size, limit = 0, 0, int(megabytes * 1e6)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in iter_documents(resolve_inputs(["classics"], progress=False)):
            f.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
            docs, size = docs + 1, size + len(d.text.encode("utf-8"))
            if size >= limit:
                break
    return docs, size


def _outputs(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.jsonl"))}
    files["duplicates.tsv"] = (out / "duplicates.tsv").read_bytes()
    return files


def _shuffle_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in (out / ".work" / "dedup" / "part").rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=3.0, help="MB of classics text to clean")
    parser.add_argument("--workers", type=int, default=2, help="worker processes / Ray CPUs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_ray.json"))
    args = parser.parse_args()
    import ray

    work = ROOT / "runs" / "bench_data_ray"
    shutil.rmtree(work, ignore_errors=True)
    corpus = work / "classics.jsonl"
    documents, text_bytes = _write_corpus(corpus, args.mb)
    cfg = CleanConfig()
    cfg.output.plot = False
    cfg.output.shard_docs = 1000  # ~10 shards for 3 MB: enough tasks for 2 workers
    clean_corpus([corpus], work / "warmup", cfg, progress=False)  # builds the cached decontamination index

    configs = {"local_1": {"workers": 1}, f"local_{args.workers}": {"workers": args.workers},
               f"ray_{args.workers}": {"workers": args.workers, "executor": "ray"}}
    runs: dict[str, dict] = {name: {"wall_s": []} for name in configs}

    def measure(name: str, round_: int) -> None:
        out = work / f"{name}_round{round_}"
        t0 = time.perf_counter()
        report = clean_corpus([corpus], out, cfg, progress=False, **configs[name])
        wall = round(time.perf_counter() - t0, 2)
        r = runs[name]
        r["wall_s"].append(wall)
        if wall <= min(r["wall_s"]):  # the phases of the best run
            timing = report["timing"]
            r.update(map_s=timing["map_s"], dedup_shuffle_s=timing["reduce_s"], finalize_s=timing["finalize_s"],
                     documents_out=report["documents_out"], shuffle_mb=round(_shuffle_bytes(out) / 1e6, 3))
        r.setdefault("outputs", []).append(out)

    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        for round_, order in enumerate((list(configs), list(reversed(configs)))):
            for name in order:
                measure(name, round_)
    finally:
        ray.shutdown()
    reference = _outputs(runs["local_1"]["outputs"][0])
    best_reference = min(runs["local_1"]["wall_s"])
    for r in runs.values():
        best = min(r["wall_s"])
        r["mb_per_s"] = round(text_bytes / 1e6 / best, 3)
        r["speed_vs_local_1"] = round(best_reference / best, 3)
        r["identical_to_local_1"] = all(_outputs(out) == reference for out in r.pop("outputs"))
    result = {"command": f"python bench/bench_data_ray.py --mb {args.mb} --workers {args.workers}",
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores (shared)",
              "ray": ray.__version__, "documents": documents, "text_mb": round(text_bytes / 1e6, 3),
              "shards": len(reference) - 1, "ray_cluster_start_s": round(ray_start, 2), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
