"""Benchmark `lmstack data clean` against datatrove 0.10.1, measured in the same run on the same documents.

    python bench/bench_clean.py                      # everything; results in bench/results/clean.json
    python bench/bench_clean.py --skip-datatrove     # lmstack only
    python bench/bench_clean.py --families 500       # a larger synthetic near-duplicate set

What it measures (one process unless stated; all numbers go to BENCHMARKS.md):

1. **Gopher heuristics**: lmstack's HeuristicFilter with the Gopher thresholds (``gopher_heuristics()``)
   vs datatrove's GopherRepetitionFilter + GopherQualityFilter (repetition first, as in datatrove's own
   pipelines) over every document of the classics corpus: MB/s, documents/s, their ratio, and how often
   the two keep/drop decisions agree.
2. **The default pipeline** (``clean_corpus`` with the default config) on the classics corpus with 1 and
   2 workers: documents/s and MB/s overall and per worker. The decontamination index is built once
   before timing (it is cached between runs in normal use too).
3. **MinHash dedup throughput**: lmstack's map (signatures) + reduce (LSH, fast banding and datasketch's
   MinHashLSH) vs datatrove's four MinHash stages (signatures, buckets, clusters, filter) on the classics
   corpus; and **precision / recall** of both on a generated near-duplicate set (lmstack.data.dedup.
   synthetic_near_duplicates), each at its default settings, against exact 5-gram Jaccard >= 0.8.

datatrove runs in its own virtualenv (default /tmp/lmstack-bench-datatrove, created on first use with
``pip install datatrove==0.10.1 regex nltk spacy xxhash==3.4.1 tokenizers orjson``;
newer xxhash releases refuse the str input datatrove 0.10.1 hashes) so it never touches lmstack's environment;
this script drives it through a small helper program and reads back its timings and decisions.
Caveat: the machine is shared, so compare ratios measured in one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATATROVE_HELPER = textwrap.dedent('''
    import json, sys, time
    mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "gopher":
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
        docs = [Document(text=r["text"], id=r["id"]) for r in map(json.loads, open(src))]
        repetition, quality = GopherRepetitionFilter(), GopherQualityFilter()
        quality.filter(Document(text="warm up the spaCy tokenizer " * 20, id="w"))
        start, cpu = time.perf_counter(), time.process_time()
        reasons = {}  # id -> None (kept) or datatrove's reason string
        for d in docs:
            r = repetition.filter(d)
            if r is True:
                r = quality.filter(d)
            reasons[d.id] = None if r is True else (r[1] if isinstance(r, tuple) else str(r))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "reasons": reasons}, open(out, "w"))
    else:  # minhash over a folder holding one jsonl file
        import glob, os, shutil
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                              MinhashDedupSignature)
        from datatrove.pipeline.dedup.minhash import MinhashConfig
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter
        work = out + ".work"
        shutil.rmtree(work, ignore_errors=True)
        cfg = MinhashConfig()
        def run(pipeline, tasks=1):  # logging_dir=None would mean ./logs in the caller's directory
            LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs",
                                  skip_completed=False).run()
        import resource
        def cpu_now():  # this process and any children it waited for (workers=1 runs tasks in-process)
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        start, cpu = time.perf_counter(), cpu_now()
        run([JsonlReader(src), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)])
        run([MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)],
            tasks=cfg.num_buckets)
        run([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg)])
        run([JsonlReader(src), MinhashDedupFilter(input_folder=f"{work}/remove_ids",
                                                  exclusion_writer=JsonlWriter(f"{work}/removed")),
             JsonlWriter(f"{work}/kept")])
        seconds, cpu = time.perf_counter() - start, cpu_now() - cpu
        removed = []
        for f in glob.glob(f"{work}/removed/*"):
            import gzip
            opener = gzip.open if f.endswith(".gz") else open
            removed += [json.loads(line)["id"] for line in opener(f, "rt")]
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "removed": removed, "config": str(cfg)}, open(out, "w"))
''')


def datatrove_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} with datatrove==0.10.1 (one time)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "datatrove==0.10.1", "regex", "nltk", "spacy",
                        "xxhash==3.4.1", "tokenizers", "orjson"], check=True)
    return py


def run_datatrove(py: Path, mode: str, src: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        helper = Path(tmp) / "helper.py"
        helper.write_text(DATATROVE_HELPER)
        out = Path(tmp) / "result.json"
        env = {**os.environ, "DATATROVE_COLORIZE_LOGS": "0", "PYTHONPATH": ""}
        proc = subprocess.run([str(py), str(helper), mode, str(src), str(out)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"datatrove {mode} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def bench_heuristics(docs, tmp: Path, py: Path | None) -> dict:
    from lmstack.data.clean import HeuristicConfig, HeuristicFilter, gopher_heuristics

    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    out: dict = {"documents": len(docs), "mb": round(mb, 3)}
    for name, cfg in (("lmstack_gopher", gopher_heuristics()), ("lmstack_default", HeuristicConfig())):
        f = HeuristicFilter(cfg)
        start, cpu = time.perf_counter(), time.process_time()
        reasons = {d.id: f.reason(d.text) for d in docs}
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        decisions = {k: r is None for k, r in reasons.items()}
        out[name] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "mb_per_s": round(mb / seconds, 3),
                     "mb_per_cpu_s": round(mb / cpu, 3), "docs_per_s": round(len(docs) / seconds, 1),
                     "kept": sum(decisions.values())}
        if name == "lmstack_gopher":
            ours, our_reasons = decisions, reasons
    if py is not None:
        src = write_jsonl(tmp / "docs.jsonl", ({"id": d.id, "text": d.text} for d in docs))
        dt = run_datatrove(py, "gopher", src)
        their_reasons = dt["reasons"]
        theirs = {k: r is None for k, r in their_reasons.items()}
        out["datatrove_gopher"] = {"seconds": round(dt["seconds"], 3), "cpu_seconds": round(dt["cpu_seconds"], 3),
                                   "mb_per_s": round(mb / dt["seconds"], 3), "mb_per_cpu_s": round(mb / dt["cpu_seconds"], 3),
                                   "docs_per_s": round(len(docs) / dt["seconds"], 1), "kept": sum(theirs.values())}
        out["speedup_vs_datatrove"] = round(dt["seconds"] / out["lmstack_gopher"]["seconds"], 2)
        out["cpu_speedup_vs_datatrove"] = round(dt["cpu_seconds"] / out["lmstack_gopher"]["cpu_seconds"], 2)
        out["decision_agreement"] = round(np.mean([ours[k] == theirs[k] for k in ours]), 4)
        # where they differ, which rule of each side decided (lmstack reason | datatrove reason; None = kept)
        differ = Counter(f"{our_reasons[k]} | {their_reasons[k]}" for k in ours if ours[k] != theirs[k])
        out["disagreements"] = dict(differ.most_common(12))
        # the alphabetic-word rule counts words differently on purpose (whitespace tokens here, spaCy tokens
        # including punctuation marks there); agreement once documents only datatrove drops for it are left out
        alpha = {k for k in ours if ours[k] and their_reasons[k] == "gopher_below_alpha_threshold"}
        out["decision_agreement_without_alpha_rule"] = round(
            np.mean([ours[k] == theirs[k] for k in ours if k not in alpha]), 4)
    return out


def bench_pipeline(corpus: Path, tmp: Path, workers_list: list[int]) -> dict:
    from lmstack.data.decontam import load_eval_index
    from lmstack.data.pipeline import clean_corpus
    from lmstack.data.pipeline_config import CleanConfig

    cfg = CleanConfig()
    load_eval_index(cfg.decontam)  # build/cache the benchmark n-gram index outside the timed runs
    out = {}
    for w in workers_list:
        before = _cpu_seconds()
        report = clean_corpus([corpus], tmp / f"clean_w{w}", cfg, workers=w, progress=False)
        cpu = _cpu_seconds() - before  # this process plus its (joined) workers: independent of machine load
        t = report["timing"]
        mb = report["bytes_in"] / 1e6
        out[f"workers_{w}"] = {"seconds": t["total_s"], "cpu_seconds": round(cpu, 3),
                               "mb_per_cpu_s": round(mb / cpu, 3), "docs_per_cpu_s": round(report["documents_in"] / cpu, 1),
                               "docs_per_s": t["docs_per_s"], "mb_per_s": t["mb_per_s"],
                               "mb_per_s_per_worker": t["mb_per_s_per_worker"],
                               "docs_per_s_per_worker": round(t["docs_per_s"] / w, 1),
                               "documents_in": report["documents_in"], "documents_out": report["documents_out"],
                               "mb_in": round(report["bytes_in"] / 1e6, 3), "mb_out": round(report["bytes_out"] / 1e6, 3),
                               # wall seconds inside each stage, summed over workers (not CPU seconds)
                               "stage_wall_s": {s["name"]: s["seconds"] for s in report["stages"]},
                               "removed": report["removed"]}
    return out


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_minhash(docs, tmp: Path, py: Path | None, families: int) -> dict:
    from lmstack.data.dedup import (DedupConfig, DedupIndex, MinHasher, dedup_keys, near_dedup_quality,
                                    synthetic_near_duplicates)

    texts = [d.text for d in docs]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    out: dict = {"classics": {"documents": len(texts), "mb": round(mb, 3)}}
    for lsh in ("fast", "datasketch"):
        cfg = DedupConfig(lines=False, exact=False, lsh=lsh)
        hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.shingle_size)
        cpu = time.process_time()
        start = time.perf_counter()
        keys = [dedup_keys(texts[i:i + 2000], cfg, hasher) for i in range(0, len(texts), 2000)]
        mapped = time.perf_counter()
        index = DedupIndex(cfg)
        for k in keys:
            index.add_batch(k)
        done = time.perf_counter()
        cpu = time.process_time() - cpu
        out["classics"][f"lmstack_{lsh}"] = {"cpu_seconds": round(cpu, 3), "mb_per_cpu_s": round(mb / cpu, 3),
            "signature_s": round(mapped - start, 3), "lsh_s": round(done - mapped, 3),
            "seconds": round(done - start, 3), "docs_per_s": round(len(texts) / (done - start), 1),
            "mb_per_s": round(mb / (done - start), 3), "near_duplicates": index.counts["near"]}
    if py is not None:
        (tmp / "mh").mkdir(exist_ok=True)
        write_jsonl(tmp / "mh" / "docs.jsonl", ({"id": d.id, "text": d.text} for d in docs))
        dt = run_datatrove(py, "minhash", tmp / "mh")
        out["classics"]["datatrove"] = {"seconds": round(dt["seconds"], 3), "cpu_seconds": round(dt["cpu_seconds"], 3),
                                        "mb_per_cpu_s": round(mb / dt["cpu_seconds"], 3),
                                        "docs_per_s": round(len(texts) / dt["seconds"], 1),
                                        "mb_per_s": round(mb / dt["seconds"], 3), "near_duplicates": len(dt["removed"]),
                                        "config": dt["config"]}
        out["classics"]["speedup_vs_datatrove"] = round(dt["seconds"] / out["classics"]["lmstack_fast"]["seconds"], 2)
        out["classics"]["cpu_speedup_vs_datatrove"] = round(
            dt["cpu_seconds"] / out["classics"]["lmstack_fast"]["cpu_seconds"], 2)

    texts, fams = synthetic_near_duplicates(families=families, variants=4, seed=0)
    cfg = DedupConfig(lines=False)
    quality = {"set": {"families": families, "variants_per_family": 4, "documents": len(texts),
                       "threshold": cfg.threshold, "shingle_size": cfg.shingle_size},
               "lmstack": near_dedup_quality(texts, fams, cfg)}
    if py is not None:
        truth_run = quality["lmstack"]
        (tmp / "syn").mkdir(exist_ok=True)
        write_jsonl(tmp / "syn" / "docs.jsonl", ({"id": str(i), "text": t} for i, t in enumerate(texts)))
        dt = run_datatrove(py, "minhash", tmp / "syn")
        removed = np.zeros(len(texts), dtype=bool)
        removed[[int(i) for i in dt["removed"]]] = True
        truth = _truth(texts, fams, cfg)
        tp = int((removed & truth).sum())
        p, r = tp / max(removed.sum(), 1), tp / max(truth.sum(), 1)
        quality["datatrove"] = {"removed": int(removed.sum()), "true_positives": tp, "precision": round(p, 4),
                                "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-9), 4),
                                "seconds": round(dt["seconds"], 3), "config": dt["config"]}
        assert truth_run["true_duplicates"] == int(truth.sum())
    out["synthetic"] = quality
    return out


def _truth(texts, fams, cfg) -> np.ndarray:
    from lmstack.data.dedup import _shingle_set

    sh = [_shingle_set(t, cfg.shingle_size) for t in texts]
    truth = np.zeros(len(texts), dtype=bool)
    seen: dict[int, list[int]] = {}
    for i, f in enumerate(fams):
        truth[i] = any(len(sh[i] & sh[j]) / len(sh[i] | sh[j]) >= cfg.threshold for j in seen.get(f, []))
        seen.setdefault(f, []).append(i)
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datatrove-venv", default="/tmp/lmstack-bench-datatrove", help="virtualenv for datatrove")
    ap.add_argument("--skip-datatrove", action="store_true", help="measure lmstack only")
    ap.add_argument("--workers", default="1,2", help="worker counts for the pipeline run")
    ap.add_argument("--families", type=int, default=500, help="originals in the synthetic near-duplicate set")
    ap.add_argument("--sections", default="heuristics,pipeline,minhash", help="which parts to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "clean.json"), help="results file")
    args = ap.parse_args()

    from lmstack.data.corpora import download_corpus
    from lmstack.data.readers import iter_documents

    corpus = download_corpus("classics", progress=False)
    docs = list(iter_documents([corpus]))
    py = None if args.skip_datatrove else datatrove_python(Path(args.datatrove_venv))
    results: dict = {"machine": f"{os.cpu_count()}-core CPU", "load_average": os.getloadavg(), "corpus": str(corpus),
                     "command": "python bench/bench_clean.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sections = args.sections.split(",")
        if "heuristics" in sections:
            print("Gopher heuristics: lmstack vs datatrove ...", flush=True)
            results["heuristics"] = bench_heuristics(docs, tmp, py)
            print(json.dumps(results["heuristics"], indent=1), flush=True)
        if "pipeline" in sections:
            print("default pipeline ...", flush=True)
            results["pipeline"] = bench_pipeline(corpus, tmp, [int(w) for w in args.workers.split(",")])
            print(json.dumps(results["pipeline"], indent=1), flush=True)
        if "minhash" in sections:
            print("MinHash dedup: throughput and precision/recall ...", flush=True)
            results["minhash"] = bench_minhash(docs, tmp, py, args.families)
            print(json.dumps(results["minhash"], indent=1), flush=True)
    results["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
