"""The data-cleaning pipeline: ``lmstack data clean INPUT... --out DIR`` and :func:`clean_corpus`.

    lmstack data clean classics --out runs/clean --workers 2
    lmstack data clean crawl/ more.jsonl.zst --out runs/clean --config clean.yaml --set dedup.threshold=0.7
    lmstack data clean --print-config > clean.yaml      # every knob with its default
    lmstack data clean crawl/ --out runs/clean --executor ray --workers 8   # the same stages on Ray

    from lmstack.data.pipeline import clean_corpus
    from lmstack.data.pipeline_config import CleanConfig
    report = clean_corpus([Path("crawl/")], Path("runs/clean"), CleanConfig(), workers=2)

Stages, in order (each a pure function over a batch of documents, see lmstack.data.clean.Stage):

    read -> normalize -> heuristics -> language -> quality (classifier) -> decontam -> pii
         -> [perplexity score] -> dedup map (hashes, MinHash signatures)          ... per shard, in workers
    -> dedup shuffle (exact, near, line decisions)                          ... rank of world_size tasks
    -> perplexity cut                                                        ... once, in the main process
    -> dedup_exact -> dedup_near -> perplexity -> dedup_lines -> write shard   ... per shard, in workers

Three phases, because two decisions need the whole dataset (keep-first dedup, perplexity quantiles);
:func:`clean_corpus` reads as their table of contents:

1. **map** (:func:`_map_phase`) -- the main process streams documents (lmstack.data.readers, bounded
   memory) into shards of ``output.shard_docs`` documents / ``output.shard_bytes`` bytes; a worker runs
   the per-document stages and writes ``DIR/.work/shard_NNNNN.jsonl`` (survivors), ``.keys.npz`` (dedup
   keys, perplexities) and, last, ``.done.json`` (its statistics). At most 2 x workers shards are in
   flight, so memory does not grow with the corpus.
2. **reduce** (:func:`_reduce_phase`) -- the keep-first dedup decisions as a shuffle of task functions that
   each run rank r of world_size and exchange files partitioned by hash range or LSH bucket
   (lmstack.data.dedup_stages; equal to walking the keys in input order with lmstack.data.dedup.DedupIndex);
   the main process fixes the perplexity cut-offs.
3. **finalize** (:func:`_finalize_phase`) -- workers apply the decisions and write
   ``DIR/shard_NNNNN.jsonl`` (or ``.parquet``); then the report is published (lmstack.data.pipeline_report).

The user's files are safe (lmstack.data.outputs): ``DIR`` may only hold what an earlier ``data clean``
recorded writing there (``.lmstack-output.json``), unless ``overwrite=True``; a ``DIR`` that is, holds or
lies inside an input is always refused. While the run writes, ``DIR/_INCOMPLETE`` exists and every lmstack
reader refuses the directory; it is removed last, after ``report.json``, so a killed run is visible.

Every file is written to a temporary name and renamed. A re-run with the same inputs and config skips
every shard whose ``.done.json`` exists (and rewrites no output whose decisions did not change); a
different config or changed inputs start over. Outputs: the shards, ``report.json`` (documents and
bytes in/out per stage, removals per reason, PII counts per kind, duplicates, contamination, read
errors, timing), ``summary.md`` (the same, readable, with examples of removed documents per reason),
``funnel.png`` (documents and bytes left after each stage) and ``duplicates.tsv`` (every removed
duplicate with its cluster id). The non-shard outputs are types that ``iter_documents`` ignores, so
``lmstack data tokenize DIR`` reads only the cleaned text.

Executors (lmstack.data.executors): every task -- a shard of phase 1 or 3, a rank of phase 2 -- is a
function of its arguments and the files in ``DIR/.work``, run by ``LocalExecutor`` (worker processes) or
``RayExecutor`` (``--executor ray``; ``--ray-address`` for an existing cluster on shared storage). The
output does not depend on the executor or on the number of workers. Phases 1 and 3 are embarrassingly
parallel; phase 2 moves the dedup keys once (hash-partitioned) and its clustering step is one task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lmstack.atomic import write_atomic, write_json_atomic, write_text_atomic
from lmstack.data.clean import CleanDoc, HeuristicFilter, LanguageFilter, Normalize, Stage, StageStats
from lmstack.data.corpora import resolve_inputs
from lmstack.data.decontam import Decontaminate, EvalIndex, load_eval_index
from lmstack.data.dedup import EXACT, KEEP, NEAR, MinHasher, cut_spans, dedup_keys, stable_hash
from lmstack.data.dedup_stages import DedupSummary, sharded_dedup
from lmstack.data.executors import Executor, make_executor
from lmstack.data.outputs import claim_output_dir, mark_complete, mark_incomplete, record_outputs, recorded_outputs
from lmstack.data.pii import ScrubPII
from lmstack.data.pipeline_config import CleanConfig
from lmstack.data.pipeline_report import build_report, plot_funnel, render_summary, write_duplicates
from lmstack.data.quality import PerplexityScore, QualityFilter, perplexity_cutoffs
from lmstack.data.readers import ReadStats, iter_documents, list_input_files
from lmstack.errors import ConfigError
from lmstack.progress import Progress

PIPELINE_VERSION = 1
JOB = "data clean"  # the name in the output record and the _INCOMPLETE marker
WORK_DIR = ".work"
REPORT_FILES = ("report.json", "summary.md", "funnel.png", "duplicates.tsv")

# ----------------------------------------------------------------------------- building the stages


def build_stages(cfg: CleanConfig, eval_index=None, classifier=None, scorer=None) -> list[Stage]:
    """The per-document stages of phase 1, in order, for this config (pure: no I/O besides models)."""
    stages: list[Stage] = [Normalize(cfg.normalize)]
    if cfg.heuristics.enabled:
        stages.append(HeuristicFilter(cfg.heuristics))
    if cfg.language.enabled:
        stages.append(LanguageFilter(cfg.language))
    if cfg.quality.classifier or classifier is not None:
        stages.append(QualityFilter(cfg.quality, classifier))
    if cfg.decontam.enabled and eval_index is not None:
        stages.append(Decontaminate(cfg.decontam, eval_index))
    if cfg.pii.enabled:
        stages.append(ScrubPII(cfg.pii))
    if cfg.quality.perplexity_model or scorer is not None:
        stages.append(PerplexityScore(cfg.quality, scorer))
    for s in stages:
        s.max_examples = cfg.output.examples_per_reason
    return stages


def run_stages(docs: Iterable[Any], stages: Sequence[Stage]) -> tuple[list[CleanDoc], list[StageStats]]:
    """Run stages over one batch in memory (the Python API for a quick look; no dedup, no files)."""
    batch: list = [CleanDoc.of(d) for d in docs]
    all_stats = []
    for stage in stages:
        stats = StageStats(stage.name)
        batch = stage(batch, stats)
        all_stats.append(stats)
    return batch, all_stats


# ----------------------------------------------------------------------------- phase 1: map (workers)


@dataclass
class _WorkerState:
    cfg: CleanConfig
    work_dir: Path
    stages: list[Stage]
    hasher: MinHasher | None


_STATE: _WorkerState | None = None


def _init_worker(cfg_dict: dict, work_dir: str, eval_index_path: str | None, torch_threads: int) -> None:
    global _STATE
    cfg = CleanConfig.from_dict(cfg_dict)
    eval_index = None
    if eval_index_path:
        eval_index = EvalIndex.load(Path(eval_index_path))
    if cfg.quality.perplexity_model and torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    hasher = MinHasher(cfg.dedup.num_perm, cfg.dedup.seed, cfg.dedup.shingle_size) if cfg.dedup.near else None
    _STATE = _WorkerState(cfg, Path(work_dir), build_stages(cfg, eval_index), hasher)


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False))
                f.write("\n")

    write_atomic(path, write)


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _map_shard(task: tuple[int, list[tuple[str, str, str]]]) -> dict:
    """Phase 1 for one shard; returns (and writes last, as the completion marker) its statistics."""
    k, rows = task
    st = _STATE
    assert st is not None, "worker not initialised"
    t0 = time.perf_counter()
    docs: list = [CleanDoc(i, t, s) for i, t, s in rows]
    stage_stats = []
    for stage in st.stages:
        stats = StageStats(stage.name)
        docs = stage(docs, stats)
        stage_stats.append(stats)
    keys_stats = StageStats("dedup_map", docs_in=len(docs), docs_out=len(docs))
    t1 = time.perf_counter()
    keys = dedup_keys([d.text for d in docs], st.cfg.dedup, st.hasher)
    keys_stats.seconds = time.perf_counter() - t1
    stage_stats.append(keys_stats)
    base = st.work_dir / _shard_name(k)
    _write_jsonl(base.with_suffix(".jsonl"), (d.record() for d in docs))
    perplexity = np.array([np.nan if d.meta.get("perplexity") is None else d.meta["perplexity"] for d in docs],
                          dtype=np.float64)
    ids = np.array([d.id for d in docs], dtype=str) if docs else np.zeros(0, dtype="<U1")

    def write_keys(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, perplexity=perplexity, **keys.to_arrays())

    write_atomic(base.with_suffix(".keys.npz"), write_keys)
    done = {"shard": k, "docs_in": len(rows), "docs_out": len(docs), "seconds": time.perf_counter() - t0,
            "stages": [s.to_dict() for s in stage_stats]}
    write_json_atomic(base.with_suffix(".done.json"), done)
    return done


# ----------------------------------------------------------------------------- phase 3: finalize (workers)


class _DedupRemoval(Stage):
    def __init__(self, status: int, name: str):
        self.status, self.name = status, name

    def process(self, docs: list, stats: StageStats) -> list:
        kept = []
        for d in docs:
            if d.meta["_status"] == self.status:
                stats.remove(d, self.name, self.max_examples,
                             detail=f"cluster {d.meta['cluster_id']} similarity {d.meta['_similarity']:.2f}")
            else:
                kept.append(d)
        return kept


class _PerplexityCut(Stage):
    name = "perplexity"

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def process(self, docs: list, stats: StageStats) -> list:
        kept = []
        for d in docs:
            p = d.meta.get("perplexity")
            if p is not None and p < self.low:
                stats.remove(d, "perplexity_low", self.max_examples, detail=f"ppl={p:.1f} < {self.low:.1f}")
            elif p is not None and p > self.high:
                stats.remove(d, "perplexity_high", self.max_examples, detail=f"ppl={p:.1f} > {self.high:.1f}")
            else:
                kept.append(d)
        return kept


class _LineDedup(Stage):
    name = "dedup_lines"

    def __init__(self, min_chars: int):
        self.min_chars = min_chars

    def process(self, docs: list, stats: StageStats) -> list:
        kept = []
        for d in docs:
            spans = d.meta.get("_drop")
            if spans:
                stats.counters["units_removed"] += len(spans)
                stats.counters["docs_changed"] += 1
                d = dataclasses.replace(d, text=cut_spans(d.text, spans))
                if len(d.text.strip()) < self.min_chars:
                    stats.remove(d, "empty_after_line_dedup", self.max_examples)
                    continue
            kept.append(d)
        return kept


def _finalize_shard(task: dict) -> dict:
    """Phase 3 for one shard: apply the global decisions, write the output shard, return statistics."""
    t0 = time.perf_counter()
    work = Path(task["work"])
    status, cluster, sim, drop = task["status"], task["cluster"], task["similarity"], task["drop"]
    docs = []
    for i, r in enumerate(_read_jsonl(work)):
        meta = {k: v for k, v in r.items() if k not in ("id", "text", "source")}
        if cluster[i] is not None:
            meta["cluster_id"] = cluster[i]
        meta.update(_status=int(status[i]), _similarity=float(sim[i]), _drop=drop.get(i))
        docs.append(CleanDoc(r["id"], r["text"], r["source"], meta))
    stages: list[Stage] = []
    if task["exact"]:
        stages.append(_DedupRemoval(EXACT, "dedup_exact"))
    if task["near"]:
        stages.append(_DedupRemoval(NEAR, "dedup_near"))
    if task["perplexity"] is not None:
        stages.append(_PerplexityCut(*task["perplexity"]))
    if task["lines"]:
        stages.append(_LineDedup(task["min_chars_after_lines"]))
    for s in stages:
        s.max_examples = task["examples"]
    duplicates = [(d.id, d.meta["cluster_id"], "exact" if d.meta["_status"] == EXACT else "near",
                   round(d.meta["_similarity"], 3), d.source) for d in docs if d.meta["_status"] != KEEP]
    docs, stage_stats = run_stages(docs, stages)
    records = []
    for d in docs:
        meta = {k: v for k, v in d.meta.items() if not k.startswith("_")}
        records.append({"id": d.id, "text": d.text, "source": d.source, **meta})
    out = Path(task["out"])
    if task["format"] == "jsonl":
        _write_jsonl(out, records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(records) if records else pa.table({"id": pa.array([], pa.string()),
                                                                         "text": pa.array([], pa.string()),
                                                                         "source": pa.array([], pa.string())})
        write_atomic(out, lambda tmp: pq.write_table(table, tmp))
    result = {"shard": task["shard"], "fingerprint": task["fingerprint"], "docs_out": len(records),
              "bytes_out": sum(len(r["text"].encode("utf-8", "surrogatepass")) for r in records),
              "seconds": time.perf_counter() - t0, "stages": [s.to_dict() for s in stage_stats],
              "duplicates": duplicates}
    write_json_atomic(Path(task["marker"]), result)
    return result


# ----------------------------------------------------------------------------- plumbing


def _input_signature(inputs: Sequence[Path]) -> list:
    sig = []
    for path, _label in list_input_files(inputs):
        st = path.stat()
        sig.append([str(path.resolve()), st.st_size, int(st.st_mtime)])
    return sig


def _batches(docs: Iterator, max_docs: int, max_bytes: int) -> Iterator[list[tuple[str, str, str]]]:
    batch: list[tuple[str, str, str]] = []
    size = 0
    for d in docs:
        batch.append((d.id, d.text, d.source))
        size += len(d.text)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _merge(stats_by_name: dict[str, StageStats], order: list[str], stage_dicts: list[dict], examples: int) -> None:
    for d in stage_dicts:
        s = StageStats.from_dict(d)
        if s.name not in stats_by_name:
            stats_by_name[s.name] = StageStats(s.name)
            order.append(s.name)
        stats_by_name[s.name].merge(s, examples)




# ----------------------------------------------------------------------------- the run


def clean_corpus(inputs: Sequence[str | Path], out_dir: str | Path, config: CleanConfig | None = None,
                 workers: int = 1, progress: bool = True, overwrite: bool = False, executor: str | Executor = "local",
                 ray_address: str | None = None) -> dict:
    """Clean ``inputs`` (files, directories or corpus names) into ``out_dir``; returns the report dict.

    Writes DIR/shard_NNNNN.{jsonl,parquet}, DIR/report.json, DIR/summary.md, DIR/funnel.png and
    DIR/duplicates.tsv (see the module docstring). Safe to re-run: finished shards are skipped.
    overwrite: write into a DIR that holds files an earlier ``data clean`` did not write (``--overwrite``);
        stale ``shard_*`` files there are replaced. A DIR overlapping an input is refused regardless.
    executor: ``local`` (worker processes) or ``ray`` (lmstack.data.executors; ``ray_address`` joins an
        existing cluster, else a local one with ``workers`` CPUs is started), or an Executor object.
        The output is the same.
    """
    t_start = time.perf_counter()
    cfg = (config or CleanConfig()).validate()
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    out = Path(out_dir)
    paths = resolve_inputs(inputs, progress=progress)
    # a missing Ray or a dead address fails here, before any output exists
    runner = make_executor(executor, workers, ray_address) if isinstance(executor, str) else executor
    _open_output_dir(out, paths, overwrite)  # refuses the user's files; DIR is _INCOMPLETE from here on
    work = out / WORK_DIR
    fingerprint = _prepare_work_dir(work, cfg, paths)
    timing: dict[str, float] = {}
    decontam_info, eval_index_path = _build_eval_index(cfg, work, timing)

    torch_threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        runner.start(_init_worker, (cfg.to_dict(), str(work), eval_index_path, torch_threads))
        with Progress(enabled=progress, bytes_mode=True) as bar:
            with _timed(timing, "map_s"):
                mapped = _map_phase(paths, cfg, work, runner, bar)
            with _timed(timing, "reduce_s"):
                decisions = _reduce_phase(work, mapped.n_shards, cfg, runner)
            with _timed(timing, "finalize_s"):
                outputs = _planned_outputs(out, mapped.n_shards, cfg)
                finals = _finalize_phase(decisions, cfg, work, outputs, fingerprint, runner, bar)
        runner.close()
    except BaseException:
        runner.terminate()
        raise
    _remove_stale_outputs(out, outputs)
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    report = _publish_report(paths, out, outputs, cfg, workers, mapped, decisions, finals, decontam_info, timing)
    mark_complete(out)
    return report


def _open_output_dir(out: Path, paths: Sequence[Path], overwrite: bool) -> None:
    """Check that the run may write into OUT (lmstack.data.outputs), create it and mark it incomplete."""
    claim_output_dir(out, paths, JOB, recorded_outputs(out, JOB), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    record_outputs(out, JOB, [WORK_DIR])
    mark_incomplete(out, JOB)


def _planned_outputs(out: Path, n_shards: int, cfg: CleanConfig) -> list[Path]:
    """The output shard paths, recorded as this job's (with the report files) before any is written."""
    outputs = [out / f"{_shard_name(k)}.{cfg.output.format}" for k in range(n_shards)]
    record_outputs(out, JOB, [p.name for p in outputs] + list(REPORT_FILES))
    return outputs


@contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timing[key] = round(time.perf_counter() - t0, 3)


def _prepare_work_dir(work: Path, cfg: CleanConfig, paths: Sequence[Path]) -> str:
    """DIR/.work for this run; returns the run's fingerprint. A different config or changed inputs empty it,
    because none of its shards is reusable then."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    map_cfg = {k: v for k, v in cfg_dict.items() if k != "output"}
    map_cfg["shard"] = [cfg.output.shard_docs, cfg.output.shard_bytes]
    fingerprint = f"{stable_hash(json.dumps([PIPELINE_VERSION, map_cfg, _input_signature(paths)])):016x}"
    manifest_path = work / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        for f in work.glob("shard_*"):
            f.unlink()
        write_json_atomic(manifest_path, {"fingerprint": fingerprint, "config": cfg_dict,
                                          "inputs": [str(p) for p in paths]})
    return fingerprint


def _build_eval_index(cfg: CleanConfig, work: Path, timing: dict[str, float]) -> tuple[dict[str, Any], str | None]:
    """The decontamination index, saved in WORK for the workers: (report section, path or None when off)."""
    decontam_on = cfg.decontam.enabled and bool(cfg.decontam.benchmarks or cfg.decontam.files)
    info: dict[str, Any] = {"enabled": decontam_on}
    if not decontam_on:
        return info, None
    t0 = time.perf_counter()
    index = load_eval_index(cfg.decontam)
    path = work / "eval_ngrams.npz"
    index.save(path)
    info.update(ngram=index.ngram, ngrams=int(len(index.hashes)), eval_sets=index.texts, skipped=index.skipped)
    timing["decontam_index_s"] = round(time.perf_counter() - t0, 3)
    return info, str(path)


# ----------------------------------------------------------------------------- phase 1: map


@dataclass
class _Mapped:
    """What phase 1 leaves for the others: the shard count, each shard's statistics, the read statistics."""

    n_shards: int = 0
    done: dict[int, dict] = field(default_factory=dict)  # shard -> its .done.json
    read_stats: ReadStats = field(default_factory=ReadStats)


def _map_phase(paths: Sequence[Path], cfg: CleanConfig, work: Path, runner: Executor, bar: Progress) -> _Mapped:
    """Stream the inputs into shards and run the per-document stages on each (in the workers)."""
    mapped = _Mapped()
    total_bytes = sum(p.stat().st_size for p, _ in list_input_files(paths))
    task = bar.add("clean: filter + hash", total=total_bytes)

    def on_done(done: dict) -> None:
        mapped.done[done["shard"]] = done
        bar.advance(task, done["stages"][0]["bytes_in"])

    runner.imap(_map_shard, _map_tasks(paths, cfg, work, mapped, on_done), on_done)
    bar.update(task, completed=total_bytes)
    return mapped


def _map_tasks(paths: Sequence[Path], cfg: CleanConfig, work: Path, mapped: _Mapped,
               on_done: Any) -> Iterator[tuple[int, list]]:
    """(shard number, rows) for every shard an earlier run has not finished; finished ones go to on_done."""
    docs = iter_documents(paths, text_field=cfg.read.text_field, stats=mapped.read_stats,
                          delimiter=cfg.read.delimiter, on_bad_record=cfg.read.on_bad_record,  # type: ignore[arg-type]
                          id_field=cfg.read.id_field)
    for k, rows in enumerate(_batches(docs, cfg.output.shard_docs, cfg.output.shard_bytes)):
        mapped.n_shards = k + 1
        marker = work / f"{_shard_name(k)}.done.json"
        if marker.is_file() and (work / f"{_shard_name(k)}.keys.npz").is_file():
            on_done(json.loads(marker.read_text()))
            continue
        yield k, rows


# ----------------------------------------------------------------------------- phase 2: reduce


@dataclass
class _Decisions:
    """The global decisions of phase 2, per shard in input order."""

    index: DedupSummary
    shards: list  # per shard: the DedupIndex.add_batch decisions (status, representative, similarity, drop_spans)
    ids: list[str]  # every surviving document id of phase 1, in order (cluster ids are looked up here)
    perplexity_cut: tuple[float, float] | None


def _reduce_phase(work: Path, n_shards: int, cfg: CleanConfig, runner: Executor) -> _Decisions:
    """The keep-first dedup decisions (a shuffle over the executor, lmstack.data.dedup_stages) and the
    perplexity cut-offs (here: one quantile over all scores)."""
    key_files = [work / f"{_shard_name(k)}.keys.npz" for k in range(n_shards)]
    shards, index = sharded_dedup(runner.run_ranks, work, key_files, cfg.dedup, runner.parallelism)
    ids: list[str] = []
    perplexities: list[np.ndarray] = []
    for path in key_files:
        with np.load(path, allow_pickle=False) as z:
            ids.extend(z["ids"].tolist())
            perplexities.append(z["perplexity"])
    cut = None
    if cfg.quality.perplexity_model:
        scores = np.concatenate(perplexities) if perplexities else np.zeros(0)
        cut = perplexity_cutoffs(scores.tolist(), cfg.quality)
    return _Decisions(index, shards, ids, cut)


# ----------------------------------------------------------------------------- phase 3: finalize


def _finalize_phase(decisions: _Decisions, cfg: CleanConfig, work: Path, outputs: list[Path], fingerprint: str,
                    runner: Executor, bar: Progress) -> dict[int, dict]:
    """Apply the decisions to every shard and write the output shards (in the workers); shard -> statistics."""
    task = bar.add("clean: write shards", total=len(outputs), unit="shards")
    finals: dict[int, dict] = {}

    def on_final(result: dict) -> None:
        finals[result["shard"]] = result
        bar.advance(task, 1)

    runner.imap(_finalize_shard, _finalize_tasks(decisions, cfg, work, outputs, fingerprint, on_final), on_final)
    return finals


def _finalize_tasks(decisions: _Decisions, cfg: CleanConfig, work: Path, outputs: list[Path], fingerprint: str,
                    on_final: Any) -> Iterator[dict]:
    """A task per shard whose decisions changed since the last run; unchanged ones go to on_final."""
    ordinal = 0
    for k, dec in enumerate(decisions.shards):
        cluster = _cluster_ids(dec, decisions, ordinal)
        ordinal += len(dec.status)
        spec = [fingerprint, cfg.output.format, dec.status.tolist(), cluster, sorted(dec.drop_spans.items()),
                decisions.perplexity_cut, cfg.output.examples_per_reason]
        shard_fingerprint = f"{stable_hash(json.dumps(spec)):016x}"
        marker = work / f"{_shard_name(k)}.final.json"
        if marker.is_file() and outputs[k].is_file():
            previous = json.loads(marker.read_text())
            if previous.get("fingerprint") == shard_fingerprint:
                on_final(previous)
                continue
        yield {"shard": k, "work": str(work / f"{_shard_name(k)}.jsonl"), "out": str(outputs[k]),
               "marker": str(marker), "fingerprint": shard_fingerprint, "format": cfg.output.format,
               "status": dec.status, "cluster": cluster, "similarity": dec.similarity,
               "drop": dec.drop_spans, "exact": cfg.dedup.exact, "near": cfg.dedup.near,
               "lines": cfg.dedup.lines, "min_chars_after_lines": cfg.dedup.min_chars_after_lines,
               "perplexity": decisions.perplexity_cut, "examples": cfg.output.examples_per_reason}


def _cluster_ids(dec: Any, decisions: _Decisions, ordinal: int) -> list[str | None]:
    """Per document of one shard: the id of its duplicate cluster's first document, or None when alone.
    ORDINAL is the shard's first document in the global order."""
    cluster: list[str | None] = []
    for i in range(len(dec.status)):
        representative = int(dec.representative[i])
        if representative >= 0:
            cluster.append(decisions.ids[representative])
        elif decisions.index.cluster_sizes.get(ordinal + i, 1) > 1:
            cluster.append(decisions.ids[ordinal + i])
        else:
            cluster.append(None)
    return cluster


# ----------------------------------------------------------------------------- publishing


def _publish_report(paths: Sequence[Path], out: Path, outputs: list[Path], cfg: CleanConfig, workers: int,
                    mapped: _Mapped, decisions: _Decisions, finals: dict[int, dict], decontam_info: dict,
                    timing: dict[str, float]) -> dict:
    """Merge the per-shard statistics and write duplicates.tsv, report.json, summary.md and funnel.png."""
    stats_by_name: dict[str, StageStats] = {}
    order: list[str] = []
    for shard_stats in (mapped.done, finals):
        for k in range(len(outputs)):
            _merge(stats_by_name, order, shard_stats[k]["stages"], cfg.output.examples_per_reason)
    write_duplicates(out / "duplicates.tsv", [row for k in range(len(outputs)) for row in finals[k]["duplicates"]])
    report = build_report(paths, out, outputs, cfg, workers, mapped.read_stats, [stats_by_name[n] for n in order],
                          decisions.index, decontam_info, timing, decisions.perplexity_cut)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "summary.md", render_summary(report))
    if cfg.output.plot:
        plot_funnel(report, out / "funnel.png")
    return report


def _remove_stale_outputs(out: Path, outputs: list[Path]) -> None:
    """Delete output shards of an earlier run that this run did not write (more shards, another format)."""
    current = {p.name for p in outputs}
    for f in out.glob("shard_*.*"):
        stem, _, suffix = f.name.partition(".")
        if suffix in ("jsonl", "parquet") and stem[len("shard_"):].isdigit() and f.name not in current:
            f.unlink()
