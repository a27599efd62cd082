"""The data-cleaning pipeline: ``lmstack data clean INPUT... --out DIR`` and :func:`clean_corpus`.

    lmstack data clean classics --out runs/clean --workers 2
    lmstack data clean crawl/ more.jsonl.zst --out runs/clean --config clean.yaml --set dedup.threshold=0.7
    lmstack data clean --print-config > clean.yaml      # every knob with its default

    from lmstack.data.pipeline import clean_corpus, CleanConfig
    report = clean_corpus([Path("crawl/")], Path("runs/clean"), CleanConfig(), workers=2)

Stages, in order (each a pure function over a batch of documents, see lmstack.data.clean.Stage):

    read -> normalize -> heuristics -> language -> quality (classifier) -> decontam -> pii
         -> [perplexity score] -> dedup map (hashes, MinHash signatures)          ... per shard, in workers
    -> dedup reduce (exact, near, line decisions) -> perplexity cut            ... once, in the main process
    -> dedup_exact -> dedup_near -> perplexity -> dedup_lines -> write shard   ... per shard, in workers

Three phases, because two decisions need the whole dataset (keep-first dedup, perplexity quantiles):

1. **map** -- the main process streams documents (lmstack.data.sources.iter_documents, bounded memory)
   into shards of ``output.shard_docs`` documents / ``output.shard_bytes`` bytes; a worker runs the
   per-document stages and writes ``DIR/.work/shard_NNNNN.jsonl`` (survivors), ``.keys.npz`` (dedup
   keys, perplexities) and, last, ``.done.json`` (its statistics). At most 2 x workers shards are in
   flight, so memory does not grow with the corpus.
2. **reduce** -- the main process walks the keys of all shards in input order (lmstack.data.dedup).
3. **finalize** -- workers apply the decisions and write ``DIR/shard_NNNNN.jsonl`` (or ``.parquet``).

Every file is written to a temporary name and renamed. A re-run with the same inputs and config skips
every shard whose ``.done.json`` exists (and rewrites no output whose decisions did not change); a
different config or changed inputs start over. Outputs: the shards, ``report.json`` (documents and
bytes in/out per stage, removals per reason, PII counts per kind, duplicates, contamination, read
errors, timing), ``summary.md`` (the same, readable, with examples of removed documents per reason),
``funnel.png`` (documents and bytes left after each stage) and ``duplicates.tsv`` (every removed
duplicate with its cluster id). The non-shard outputs are types that ``iter_documents`` ignores, so
``lmstack data tokenize DIR`` reads only the cleaned text.

Scale: phases 1 and 3 are maps over shards with no shared state (a worker only needs the config), so
they map one-to-one onto tasks of a distributed engine (Ray, Spark, Beam, Slurm arrays) reading and
writing the same shard files on shared storage. Phase 2 is the only reduce; see lmstack.data.dedup for
how its near-duplicate part is bucketed by LSH band when one process no longer holds the keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lmstack.atomic import write_atomic, write_text_atomic
from lmstack.config import ConfigError, _as_items, load_config_file, set_section_value
from lmstack.data.clean import (CleanDoc, HeuristicConfig, HeuristicFilter, LanguageConfig, LanguageFilter,
                                Normalize, NormalizeConfig, Stage, StageStats)
from lmstack.data.decontam import DecontamConfig, Decontaminate, load_eval_index
from lmstack.data.dedup import EXACT, KEEP, NEAR, DedupConfig, DedupIndex, DedupKeys, MinHasher, cut_spans, \
    dedup_keys, stable_hash
from lmstack.data.pii import PIIConfig, ScrubPII
from lmstack.data.quality import PerplexityScore, QualityConfig, QualityFilter, perplexity_cutoffs

log = logging.getLogger("lmstack.data.pipeline")
PIPELINE_VERSION = 1

# ----------------------------------------------------------------------------- configuration


@dataclass
class ReadConfig:
    """How inputs are read (lmstack.data.sources.iter_documents)."""

    text_field: str = "text"  # JSONL key / Parquet column with the text
    id_field: str = "id"  # a record's own id, when present
    delimiter: str | None = None  # .txt files: split into documents at lines equal to this (e.g. '%')
    on_bad_record: str = "error"  # error | skip: a record without the text field

    def validate(self) -> None:
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"read.on_bad_record={self.on_bad_record!r}: choose error or skip")
        if not self.text_field:
            raise ConfigError("read.text_field is empty; name the JSONL key / Parquet column holding the text")


@dataclass
class OutputConfig:
    """Shards and the report."""

    format: str = "jsonl"  # jsonl | parquet
    shard_docs: int = 2000  # input documents per shard (the unit of parallelism and of resuming)
    shard_bytes: int = 4_000_000  # ... or this many bytes of input text, whichever comes first
    examples_per_reason: int = 3  # removed documents shown per reason in the report
    plot: bool = True  # write funnel.png

    def validate(self) -> None:
        if self.format not in ("jsonl", "parquet"):
            raise ConfigError(f"output.format={self.format!r}: choose jsonl or parquet")
        if self.shard_docs < 1 or self.shard_bytes < 1:
            raise ConfigError("output.shard_docs and output.shard_bytes must be >= 1")
        if self.examples_per_reason < 0:
            raise ConfigError("output.examples_per_reason must be >= 0")


@dataclass
class CleanConfig:
    """The whole pipeline; one YAML/TOML/JSON file with these sections configures it."""

    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    heuristics: HeuristicConfig = field(default_factory=HeuristicConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "CleanConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CleanConfig":
        return apply_config_overrides(cls(), d)


SECTIONS = [f.name for f in dataclasses.fields(CleanConfig)]


def apply_config_overrides(cfg: CleanConfig, overrides: dict[str, Any] | Sequence[str]) -> CleanConfig:
    """Set ``section.key`` values (a nested/flat dict, or ``section.key=value`` strings) on ``cfg``.

    Unknown sections or keys raise ConfigError listing the valid ones; values are converted to the
    field's type with the same rules as model/optim/train overrides (lmstack.config).
    """
    for key, value in _as_items(overrides, example="dedup.threshold=0.7"):
        set_section_value(cfg, key, value, SECTIONS)
    return cfg


def load_clean_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CleanConfig:
    """Defaults, then the config file, then ``section.key=value`` overrides; validated."""
    cfg = CleanConfig()
    if path:
        apply_config_overrides(cfg, load_config_file(path))
    if overrides:
        apply_config_overrides(cfg, list(overrides))
    return cfg.validate()


def config_yaml(cfg: CleanConfig | None = None) -> str:
    """The config as YAML with one comment line per section (what ``--print-config`` prints)."""
    import yaml

    cfg = cfg or CleanConfig()
    parts = ["# lmstack data clean configuration (every key with its value; null switches a rule off)"]
    for name in SECTIONS:
        section = getattr(cfg, name)
        doc = (type(section).__doc__ or "").strip().splitlines()[0]
        parts.append(f"\n# {doc}")
        parts.append(yaml.safe_dump({name: dataclasses.asdict(section)}, sort_keys=False, width=110,
                                    default_flow_style=None).rstrip())
    return "\n".join(parts) + "\n"


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
        from lmstack.data.decontam import EvalIndex

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


def _write_json(path: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")

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
    _write_json(base.with_suffix(".done.json"), done)
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
    _write_json(Path(task["marker"]), result)
    return result


# ----------------------------------------------------------------------------- orchestration


def _input_signature(inputs: Sequence[Path]) -> list:
    from lmstack.data.sources import list_input_files

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


class _Runner:
    """Runs tasks inline (workers=1) or in a process pool with a bounded number in flight."""

    def __init__(self, workers: int, initializer, initargs):
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)
        else:
            initializer(*initargs)

    def imap(self, fn, tasks: Iterable, on_result) -> None:
        if self.pool is None:
            for t in tasks:
                on_result(fn(t))
            return
        pending = []
        for t in tasks:
            pending.append(self.pool.apply_async(fn, (t,)))
            while len(pending) >= 2 * self.workers:  # bounded memory: wait for the oldest
                on_result(pending.pop(0).get())
        for p in pending:
            on_result(p.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def terminate(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _merge(stats_by_name: dict[str, StageStats], order: list[str], stage_dicts: list[dict], examples: int) -> None:
    for d in stage_dicts:
        s = StageStats.from_dict(d)
        if s.name not in stats_by_name:
            stats_by_name[s.name] = StageStats(s.name)
            order.append(s.name)
        stats_by_name[s.name].merge(s, examples)


def clean_corpus(inputs: Sequence[str | Path], out_dir: str | Path, config: CleanConfig | None = None,
                 workers: int = 1, progress: bool = True) -> dict:
    """Clean ``inputs`` (files, directories or corpus names) into ``out_dir``; returns the report dict.

    Writes DIR/shard_NNNNN.{jsonl,parquet}, DIR/report.json, DIR/summary.md, DIR/funnel.png and
    DIR/duplicates.tsv (see the module docstring). Safe to re-run: finished shards are skipped.
    """
    from lmstack.data.sources import ReadStats, iter_documents, resolve_inputs
    from lmstack.progress import Progress

    t_start = time.perf_counter()
    cfg = (config or CleanConfig()).validate()
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    paths = resolve_inputs(inputs, progress=progress)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    map_cfg = {k: v for k, v in cfg_dict.items() if k != "output"}
    map_cfg["shard"] = [cfg.output.shard_docs, cfg.output.shard_bytes]
    fingerprint = f"{stable_hash(json.dumps([PIPELINE_VERSION, map_cfg, _input_signature(paths)])):016x}"
    manifest_path = work / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("fingerprint") != fingerprint:  # new inputs or config: nothing in .work is reusable
        for f in work.glob("shard_*"):
            f.unlink()
        _write_json(manifest_path, {"fingerprint": fingerprint, "config": cfg_dict,
                                    "inputs": [str(p) for p in paths]})

    timing: dict[str, float] = {}
    eval_index_path = None
    decontam_on = cfg.decontam.enabled and bool(cfg.decontam.benchmarks or cfg.decontam.files)
    decontam_info: dict[str, Any] = {"enabled": decontam_on}
    if decontam_on:
        t0 = time.perf_counter()
        index = load_eval_index(cfg.decontam)
        eval_index_path = str(work / "eval_ngrams.npz")
        index.save(Path(eval_index_path))
        decontam_info.update(ngram=index.ngram, ngrams=int(len(index.hashes)), eval_sets=index.texts,
                             skipped=index.skipped)
        timing["decontam_index_s"] = round(time.perf_counter() - t0, 3)
    torch_threads = max(1, (os.cpu_count() or 1) // workers)
    runner = _Runner(workers, _init_worker, (cfg_dict, str(work), eval_index_path, torch_threads))
    read_stats = ReadStats()
    stats_by_name: dict[str, StageStats] = {}
    order: list[str] = []
    shard_done: dict[int, dict] = {}
    n_shards = 0
    total_bytes = sum(p.stat().st_size for p, _ in _iter_files(paths))
    try:
        with Progress(enabled=progress, bytes_mode=True) as bar:
            task_id = bar.add("clean: filter + hash", total=total_bytes)

            def tasks() -> Iterator[tuple[int, list]]:
                nonlocal n_shards
                docs = iter_documents(paths, text_field=cfg.read.text_field, stats=read_stats,
                                      delimiter=cfg.read.delimiter, on_bad_record=cfg.read.on_bad_record,  # type: ignore[arg-type]
                                      id_field=cfg.read.id_field)
                for k, rows in enumerate(_batches(docs, cfg.output.shard_docs, cfg.output.shard_bytes)):
                    n_shards = k + 1
                    marker = work / f"{_shard_name(k)}.done.json"
                    if marker.is_file() and (work / f"{_shard_name(k)}.keys.npz").is_file():
                        on_done(json.loads(marker.read_text()))  # finished by an earlier run
                        continue
                    yield k, rows

            def on_done(done: dict) -> None:
                shard_done[done["shard"]] = done
                bar.advance(task_id, done["stages"][0]["bytes_in"])

            t0 = time.perf_counter()
            runner.imap(_map_shard, tasks(), on_done)
            timing["map_s"] = round(time.perf_counter() - t0, 3)
            bar.update(task_id, completed=total_bytes)

            # phase 2: global decisions
            t0 = time.perf_counter()
            index_ = DedupIndex(cfg.dedup)
            decisions = []
            ids_all: list[str] = []
            ppl_all: list[np.ndarray] = []
            for k in range(n_shards):
                with np.load(work / f"{_shard_name(k)}.keys.npz", allow_pickle=False) as z:
                    arrays = {name: z[name] for name in z.files}
                keys = DedupKeys.from_arrays(arrays)
                decisions.append(index_.add_batch(keys))
                ids_all.extend(arrays["ids"].tolist())
                ppl_all.append(arrays["perplexity"])
            ppl_cut = None
            if cfg.quality.perplexity_model:
                scores = np.concatenate(ppl_all) if ppl_all else np.zeros(0)
                ppl_cut = perplexity_cutoffs(scores.tolist(), cfg.quality)
            timing["reduce_s"] = round(time.perf_counter() - t0, 3)

            # phase 3: finalize
            t0 = time.perf_counter()
            fin_id = bar.add("clean: write shards", total=n_shards, unit="shards")
            ext = "jsonl" if cfg.output.format == "jsonl" else "parquet"
            finals: dict[int, dict] = {}

            def final_tasks() -> Iterator[dict]:
                ordinal = 0
                for k, dec in enumerate(decisions):
                    n = len(dec.status)
                    cluster: list[str | None] = []
                    for i in range(n):
                        rep = int(dec.representative[i])
                        if rep >= 0:
                            cluster.append(ids_all[rep])
                        elif index_.cluster_sizes.get(ordinal + i, 1) > 1:
                            cluster.append(ids_all[ordinal + i])
                        else:
                            cluster.append(None)
                    ordinal += n
                    spec = [fingerprint, ext, dec.status.tolist(), cluster, sorted(dec.drop_spans.items()),
                            ppl_cut, cfg.output.examples_per_reason]
                    shard_fp = f"{stable_hash(json.dumps(spec)):016x}"
                    marker = work / f"{_shard_name(k)}.final.json"
                    target = out / f"{_shard_name(k)}.{ext}"
                    if marker.is_file() and target.is_file():
                        previous = json.loads(marker.read_text())
                        if previous.get("fingerprint") == shard_fp:
                            on_final(previous)
                            continue
                    yield {"shard": k, "work": str(work / f"{_shard_name(k)}.jsonl"), "out": str(target),
                           "marker": str(marker), "fingerprint": shard_fp, "format": cfg.output.format,
                           "status": dec.status, "cluster": cluster, "similarity": dec.similarity,
                           "drop": dec.drop_spans, "exact": cfg.dedup.exact, "near": cfg.dedup.near,
                           "lines": cfg.dedup.lines, "min_chars_after_lines": cfg.dedup.min_chars_after_lines,
                           "perplexity": ppl_cut, "examples": cfg.output.examples_per_reason}

            def on_final(result: dict) -> None:
                finals[result["shard"]] = result
                bar.advance(fin_id, 1)

            runner.imap(_finalize_shard, final_tasks(), on_final)
            timing["finalize_s"] = round(time.perf_counter() - t0, 3)
        runner.close()
    except BaseException:
        runner.terminate()
        raise
    _remove_stale_outputs(out, n_shards, ext)

    for k in range(n_shards):
        _merge(stats_by_name, order, shard_done[k]["stages"], cfg.output.examples_per_reason)
    for k in range(n_shards):
        _merge(stats_by_name, order, finals[k]["stages"], cfg.output.examples_per_reason)
    duplicates = [row for k in range(n_shards) for row in finals[k]["duplicates"]]
    _write_duplicates(out / "duplicates.tsv", duplicates)
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    report = _build_report(paths, out, cfg, workers, read_stats, [stats_by_name[n] for n in order], index_,
                           decontam_info, timing, n_shards, ext, ppl_cut)
    _write_json(out / "report.json", report)
    write_text_atomic(out / "summary.md", render_summary(report))
    if cfg.output.plot:
        plot_funnel(report, out / "funnel.png")
    return report


def _iter_files(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    from lmstack.data.sources import list_input_files

    return list_input_files(paths)


def _remove_stale_outputs(out: Path, n_shards: int, ext: str) -> None:
    for f in out.glob("shard_*.*"):
        stem, _, suffix = f.name.partition(".")
        if suffix not in ("jsonl", "parquet"):
            continue
        try:
            k = int(stem[len("shard_"):])
        except ValueError:
            continue
        if k >= n_shards or suffix != ext:
            f.unlink()


def _write_duplicates(path: Path, rows: list[tuple]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("id\tcluster_id\tkind\tsimilarity\tsource\n")
            for row in rows:
                f.write("\t".join(str(x).replace("\t", " ").replace("\n", " ") for x in row) + "\n")

    write_atomic(path, write)


# ----------------------------------------------------------------------------- report


def _build_report(paths, out, cfg, workers, read_stats, stages: list[StageStats], index: DedupIndex,
                  decontam_info, timing, n_shards, ext, ppl_cut) -> dict:
    removed: Counter = Counter()
    for s in stages:
        removed.update(s.removed)
    pii = {k: v for s in stages if s.name == "pii" for k, v in s.counters.items() if k != "docs_changed"}
    contamination = {k.split(":", 1)[1]: v for s in stages for k, v in s.counters.items()
                     if k.startswith("contaminated:")}
    docs_in, bytes_in = read_stats.documents, read_stats.text_bytes
    final = [s for s in stages if s.name != "dedup_map"]
    docs_out = final[-1].docs_out if final else docs_in
    bytes_out = final[-1].bytes_out if final else bytes_in
    cpu_seconds = sum(s.seconds for s in stages)
    wall = timing.get("total_s", 0.0) or 1e-9
    line_stats = next((s for s in stages if s.name == "dedup_lines"), None)
    return {
        "inputs": [str(p) for p in paths],
        "out_dir": str(out),
        "outputs": [str(out / f"{_shard_name(k)}.{ext}") for k in range(n_shards)],
        "workers": workers,
        "documents_in": docs_in, "bytes_in": bytes_in, "documents_out": docs_out, "bytes_out": bytes_out,
        "read": read_stats.to_dict(),
        "stages": [{k: v for k, v in s.to_dict().items() if k != "examples"} for s in stages],
        "removed": dict(removed.most_common()),
        "examples": {reason: ex for s in stages for reason, ex in s.examples.items()},
        "pii": pii,
        "duplicates": {"exact": index.counts["exact"], "near": index.counts["near"], "clusters": index.clusters,
                       "lsh_candidates_checked": index.counts["candidates"],
                       "units_removed": index.counts["lines_removed"],
                       "unit_chars_removed": index.counts["line_chars_removed"],
                       "docs_emptied_by_unit_dedup": line_stats.removed.get("empty_after_line_dedup", 0)
                       if line_stats else 0},
        "decontamination": {**decontam_info, "documents": contamination, "action": cfg.decontam.action},
        "perplexity_cutoffs": list(ppl_cut) if ppl_cut else None,
        "timing": {**timing, "stage_cpu_s": round(cpu_seconds, 3),
                   "docs_per_s": round(docs_in / wall, 1), "mb_per_s": round(bytes_in / 1e6 / wall, 3),
                   "mb_per_s_per_worker": round(bytes_in / 1e6 / wall / workers, 3)},
        "config": cfg.to_dict(),
    }


def render_summary(report: dict) -> str:
    """A readable Markdown summary of a report."""
    din, dout = report["documents_in"], report["documents_out"]
    bin_, bout = report["bytes_in"], report["bytes_out"]
    pct = (lambda a, b: f"{100 * a / b:.1f}%" if b else "-")
    t = report["timing"]
    lines = ["# Data cleaning report", "",
             f"Inputs: {', '.join(report['inputs'])}  ",
             f"Kept **{dout:,} of {din:,} documents** ({pct(dout, din)}) and **{bout / 1e6:.2f} of "
             f"{bin_ / 1e6:.2f} MB** ({pct(bout, bin_)}) in {len(report['outputs'])} shard(s); "
             f"{t['total_s']:.1f} s with {report['workers']} worker(s) ({t['docs_per_s']:,.0f} docs/s, "
             f"{t['mb_per_s']:.2f} MB/s).", "",
             "## Stages", "", "| stage | docs in | docs out | removed | MB in | MB out | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['docs_in'] - s['docs_out']:,} | "
                     f"{s['bytes_in'] / 1e6:.2f} | {s['bytes_out'] / 1e6:.2f} | {s['seconds']:.2f} |")
    lines += ["", "## Removed documents per reason", ""]
    if report["removed"]:
        lines += ["| reason | documents | share of input |", "|---|---:|---:|"]
        lines += [f"| {r} | {n:,} | {pct(n, din)} |" for r, n in report["removed"].items()]
    else:
        lines.append("Nothing was removed.")
    pii = report["pii"]
    lines += ["", "## Personal information replaced", "",
              ", ".join(f"{k}: {v:,}" for k, v in sorted(pii.items())) if pii else "None found."]
    d = report["duplicates"]
    lines += ["", "## Duplicates", "",
              f"{d['exact']:,} exact and {d['near']:,} near-duplicate documents removed ({d['clusters']:,} clusters; "
              f"the first document of each is kept, see duplicates.tsv); {d['units_removed']:,} repeated "
              f"lines/sentences cut ({d['unit_chars_removed']:,} characters), "
              f"{d['docs_emptied_by_unit_dedup']:,} documents emptied by that."]
    dc = report["decontamination"]
    lines += ["", "## Decontamination", ""]
    if dc.get("enabled"):
        lines.append(f"{dc.get('ngram')}-gram index of {dc.get('ngrams', 0):,} n-grams from "
                     f"{', '.join(dc.get('eval_sets', {})) or 'no evaluation sets'}.")
        if dc.get("skipped"):
            lines.append(f"Skipped (data not installed): {', '.join(dc['skipped'])}.")
        docs = dc.get("documents", {})
        lines.append("Contaminated documents " + ("flagged" if dc["action"] == "flag" else "removed") + ": " +
                     (", ".join(f"{k}: {v}" for k, v in docs.items()) if docs else "none") + ".")
    else:
        lines.append("Off.")
    r = report["read"]
    if r.get("undecodable_bytes") or r.get("skipped_records"):
        lines += ["", "## Read problems", ""]
        for f, n in r.get("undecodable_bytes", {}).items():
            lines.append(f"- {f}: {n:,} undecodable bytes replaced")
        for f, n in r.get("skipped_records", {}).items():
            lines.append(f"- {f}: {n:,} records without text skipped")
    lines += ["", "## Examples of removed documents", ""]
    for reason, examples in report["examples"].items():
        lines.append(f"### {reason}")
        for ex in examples:
            detail = f" ({ex['detail']})" if ex.get("detail") else ""
            snippet = ex["text"][:300].replace("```", "'''")
            lines += ["", f"`{ex['id']}`{detail}:", "", "```", snippet + ("..." if len(ex["text"]) > 300 else ""),
                      "```"]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_funnel(report: dict, path: Path) -> None:
    """Horizontal bars: documents and bytes left after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if s["name"] != "dedup_map"]
    names = ["input"] + [s["name"] for s in stages]
    docs = [report["documents_in"]] + [s["docs_out"] for s in stages]
    mbytes = [report["bytes_in"] / 1e6] + [s["bytes_out"] / 1e6 for s in stages]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    for ax, values, label in ((axes[0], docs, "documents"), (axes[1], mbytes, "MB of text")):
        y = np.arange(len(names))
        ax.barh(y, values, color="#4C72B0")
        top = max(values) if values and max(values) > 0 else 1
        for yi, v, prev in zip(y, values, [values[0]] + values[:-1]):
            drop = prev - v
            note = f"{v:,.0f}" if label == "documents" else f"{v:.2f}"
            if drop > 0:
                note += f"  (-{drop:,.0f})" if label == "documents" else f"  (-{drop:.2f})"
            ax.text(v + 0.01 * top, yi, note, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.35)
        ax.set_xlabel(label)
    axes[0].invert_yaxis()  # the axes share y: inverting one inverts both (input on top)
    axes[0].set_yticks(np.arange(len(names)))
    axes[0].set_yticklabels(names)
    fig.suptitle(f"lmstack data clean: kept {report['documents_out']:,} of {report['documents_in']:,} documents")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
