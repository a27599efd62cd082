"""The dedup reduce of ``data clean`` as a shuffle: task functions that each run rank ``rank`` of ``world_size``.

    from lmstack.data.dedup_stages import sharded_dedup, run_ranks_inline
    result = sharded_dedup(run_ranks_inline, work_dir, key_files, cfg.dedup, world_size=4)

Every task function has the signature ``fn(rank, world_size, inputs, work_dir) -> dict`` (``inputs`` is a
JSON-able dict), reads only files under ``work_dir`` and writes its output there, so any task runner can run
them: the local process pool and Ray (lmstack.data.executors), or one Slurm array task per rank on shared
storage. The stages, in order (the way datatrove splits its MinHash dedup):

1. **partition** -- rank r reads the dedup keys of shards r, r+W, r+2W, ... (written by the map phase) and
   appends, for each destination rank p, the exact keys and the document-line hashes whose hash falls in p's
   range of the 64-bit space, and the LSH band keys whose (band, key) bucket falls in p's range, as packed
   records (:data:`PART_RECORDS`) to ``part/{exact,bands,lines}/to{p}_from{r}.bin``.
2. **exact** -- rank p groups its exact keys: in every group the lowest ordinal (input order) is kept and
   the rest point to it.
3. **buckets** -- rank p groups its band keys by (band, key) bucket, leaves out exact duplicates, and
   writes every pair of documents that share a bucket (``pairs/r{p}.npy``).
4. **cluster** -- one task: replays the keep-first rule over the candidate pairs in input order (a document
   is a near duplicate of its most similar earlier *kept* candidate when their signatures agree on at least
   ``threshold`` of their values), loading only the signatures of documents that have a candidate.
5. **lines** -- rank p groups its line hashes among kept documents: a unit is cut from every kept document
   after the first one that holds it (repeats inside one document stay).

The result equals :class:`lmstack.data.dedup.DedupIndex` walking the same keys in order -- statuses,
representatives, similarities, cut spans and counts (a test pins this for several world sizes). Bands are
always keyed with :meth:`BandIndex.band_keys` (the same candidates as datasketch's MinHashLSH, pinned in
tests/test_data_dedup.py), so ``dedup.lsh`` only selects the index of the in-memory :class:`DedupIndex`.

Honest caveats: a bucket emits every pair of its members, so a cluster of k near copies (not exact copies,
which are removed first) costs k^2/2 pairs; the cluster stage is one task (as in datatrove), holding the
pairs and the signatures of documents with a candidate. The shuffle is re-run from the map output on
every run (it is a small fraction of the map's cost); only the map and finalize phases resume.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lmstack.atomic import write_atomic
from lmstack.data.dedup import EXACT, NEAR, BandIndex, BatchDecisions, DedupConfig

SHUFFLE_DIR = "dedup"
# The records one partition task appends to the file of each destination rank (little-endian, packed).
PART_RECORDS = {
    "exact": np.dtype([("ordinal", "<i8"), ("key", "<u8")]),  # 16 B per document
    "bands": np.dtype([("ordinal", "<i8"), ("band", "<i4"), ("key", "<u8")]),  # 20 B per document and band
    "lines": np.dtype([("ordinal", "<i8"), ("start", "<i4"), ("end", "<i4"), ("hash", "<u8")]),  # 24 B per unit
}
_BAND_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: spreads (band, key) over one bucket space
RunRanks = Callable[[Callable[[int, int, dict, str], dict], int, dict, str], list]


def run_ranks_inline(fn: Callable[[int, int, dict, str], dict], world_size: int, inputs: dict,
                     work_dir: str) -> list[dict]:
    """Run ranks 0..world_size-1 one after another in this process (the reference task runner)."""
    return [fn(rank, world_size, inputs, work_dir) for rank in range(world_size)]


# ----------------------------------------------------------------------------- file helpers


def _hash_range(keys: np.ndarray, world_size: int) -> np.ndarray:
    """Destination rank per uint64 key: the 64-bit space cut into ``world_size`` equal ranges."""
    return ((keys >> np.uint64(32)) * np.uint64(world_size) >> np.uint64(32)).astype(np.int64)


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(path, write)


def _load_all(pattern_dir: Path, pattern: str, names: Sequence[str], dtypes: Sequence[Any]) -> dict[str, np.ndarray]:
    """Concatenate the named arrays of every file matching ``pattern`` (sorted, so the order is fixed)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for path in sorted(pattern_dir.glob(pattern)):
        with np.load(path, allow_pickle=False) as z:
            for n in names:
                parts[n].append(z[n])
    return {n: np.concatenate(parts[n]).astype(dt) if parts[n] else np.zeros(0, dt) for n, dt in zip(names, dtypes)}


def _load_part(work: Path, kind: str, rank: int) -> np.ndarray:
    """Every record sent to ``rank`` by every partition task, as one structured array."""
    parts = [np.fromfile(path, dtype=PART_RECORDS[kind])
             for path in sorted((work / "part" / kind).glob(f"to{rank:04d}_from*.bin"))]
    return np.concatenate(parts) if parts else np.zeros(0, PART_RECORDS[kind])


def _removed_ordinals(work: Path, kinds: Sequence[str]) -> np.ndarray:
    found = [_load_all(work / kind, "r*.npz", ["ordinal"], [np.int64])["ordinal"] for kind in kinds]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- the task functions


def partition_task(rank: int, world_size: int, inputs: dict, work_dir: str) -> dict:
    """Stage 1: split the keys of shards rank, rank+W, ... into per-destination files by hash range.

    Records are appended shard by shard (memory holds one shard) to temporary files that are renamed when
    the task is done, so a destination never reads a half-written partition."""
    work = Path(work_dir) / SHUFFLE_DIR
    cfg = DedupConfig(**inputs["dedup"])
    bands = BandIndex(cfg.bands, cfg.rows)
    files: dict[tuple[str, int], Any] = {}  # (kind, destination rank) -> open temporary file

    def add(kind: str, dest: np.ndarray, **columns: np.ndarray) -> None:
        records = np.empty(len(dest), dtype=PART_RECORDS[kind])
        for name, col in columns.items():
            records[name] = col
        for p in np.unique(dest).tolist():
            if (kind, p) not in files:
                path = work / "part" / kind / f"to{p:04d}_from{rank:04d}.bin.tmp"
                path.parent.mkdir(parents=True, exist_ok=True)
                files[kind, p] = open(path, "wb")
            records[dest == p].tofile(files[kind, p])

    try:
        _partition_shards(rank, world_size, inputs, cfg, bands, add)
    finally:
        for f in files.values():
            f.close()
    for f in files.values():
        Path(f.name).rename(f.name[:-len(".tmp")])
    return {"rank": rank}


def _partition_shards(rank: int, world_size: int, inputs: dict, cfg: DedupConfig, bands: BandIndex,
                      add: Callable[..., None]) -> None:
    """Hand each of rank's shards' keys to ``add`` with their destination ranks, one shard at a time."""
    for k in range(rank, len(inputs["key_files"]), world_size):
        with np.load(inputs["key_files"][k], allow_pickle=False) as z:
            exact, signatures = z["dedup_exact"], z["dedup_signatures"]
            line_doc, line_start, line_end, line_hash = (z["dedup_line_doc"], z["dedup_line_start"],
                                                         z["dedup_line_end"], z["dedup_line_hash"])
        ordinals = inputs["offsets"][k] + np.arange(len(exact), dtype=np.int64)  # (N,) global input order
        if cfg.exact and len(exact):
            add("exact", _hash_range(exact, world_size), ordinal=ordinals, key=exact)
        if cfg.near and len(exact):
            keys = bands.band_keys(signatures)  # (N, bands) uint64
            band = np.broadcast_to(np.arange(cfg.bands, dtype=np.int32), keys.shape)  # (N, bands)
            bucket = keys + band.astype(np.uint64) * _BAND_MIX  # (N, bands)
            add("bands", _hash_range(bucket.ravel(), world_size), ordinal=np.repeat(ordinals, cfg.bands),
                band=band.ravel(), key=keys.ravel())
        if cfg.lines and len(line_hash):
            add("lines", _hash_range(line_hash, world_size), ordinal=ordinals[line_doc], start=line_start,
                end=line_end, hash=line_hash)


def exact_task(rank: int, world_size: int, inputs: dict, work_dir: str) -> dict:
    """Stage 2: in rank's hash range, every document after the first with the same exact key is removed."""
    work = Path(work_dir) / SHUFFLE_DIR
    a = _load_part(work, "exact", rank)
    order = np.lexsort((a["ordinal"], a["key"]))  # by key, then input order
    ordinal, key = a["ordinal"][order], a["key"][order]
    first_of_group = np.ones(len(key), dtype=bool)
    first_of_group[1:] = key[1:] != key[:-1]
    representative = ordinal[np.maximum.accumulate(np.where(first_of_group, np.arange(len(key)), 0))]
    removed = ~first_of_group
    _save(work / "exact" / f"r{rank:04d}.npz", ordinal=ordinal[removed], representative=representative[removed])
    return {"rank": rank, "removed": int(removed.sum())}


def buckets_task(rank: int, world_size: int, inputs: dict, work_dir: str) -> dict:
    """Stage 3: every pair (earlier, later) of non-exact-duplicate documents sharing a band bucket."""
    work = Path(work_dir) / SHUFFLE_DIR
    a = _load_part(work, "bands", rank)
    keep = ~np.isin(a["ordinal"], _removed_ordinals(work, ["exact"]))
    ordinal, band, key = a["ordinal"][keep], a["band"][keep], a["key"][keep]
    order = np.lexsort((ordinal, key, band))
    ordinal, band, key = ordinal[order], band[order], key[order]
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])]) if len(key) else \
        np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(key)].astype(np.int64)
    pairs = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s > 1:
            members = ordinal[s:e]  # ascending input order
            i, j = np.triu_indices(e - s, k=1)
            pairs.append(np.stack([members[i], members[j]], axis=1))  # (pairs, 2): earlier, later
    found = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
    _save(work / "pairs" / f"r{rank:04d}.npz", pairs=found)
    return {"rank": rank, "pairs": int(len(found))}


def cluster_task(rank: int, world_size: int, inputs: dict, work_dir: str) -> dict:
    """Stage 4 (one task): the keep-first near-duplicate decisions, replayed over the candidate pairs."""
    work = Path(work_dir) / SHUFFLE_DIR
    pieces = []
    for path in sorted((work / "pairs").glob("r*.npz")):
        with np.load(path, allow_pickle=False) as z:
            pieces.append(z["pairs"])
    pairs = np.unique(np.concatenate(pieces), axis=0) if pieces else np.zeros((0, 2), np.int64)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by later document, then earlier
    similarity = _pair_similarity(pairs, inputs["key_files"], inputs["offsets"])
    threshold = float(inputs["dedup"]["threshold"])
    near: dict[int, tuple[int, float]] = {}  # later ordinal -> (representative, similarity)
    candidates = 0
    starts = np.flatnonzero(np.r_[True, pairs[1:, 1] != pairs[:-1, 1]]) if len(pairs) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(pairs)].astype(np.int64)
    for s, e in zip(starts.tolist(), ends.tolist()):
        best, best_sim = -1, 0.0
        for earlier, sim in zip(pairs[s:e, 0].tolist(), similarity[s:e].tolist()):
            if earlier in near:  # removed documents are never candidates
                continue
            candidates += 1
            if sim > best_sim:  # strict: ties go to the earliest document
                best, best_sim = earlier, sim
        if best >= 0 and best_sim >= threshold:
            near[int(pairs[s, 1])] = (best, best_sim)
    ordinals = np.array(sorted(near), dtype=np.int64)
    _save(work / "near" / "r0000.npz", ordinal=ordinals,
          representative=np.array([near[o][0] for o in ordinals.tolist()], dtype=np.int64),
          similarity=np.array([near[o][1] for o in ordinals.tolist()], dtype=np.float32),
          candidates=np.array([candidates], dtype=np.int64))
    return {"rank": rank, "near": len(near), "candidates": candidates}


def _pair_similarity(pairs: np.ndarray, key_files: Sequence[str], offsets: Sequence[int]) -> np.ndarray:
    """Share of equal MinHash values per pair (float64, as DedupIndex computes it); loads only needed rows."""
    needed = np.unique(pairs) if len(pairs) else np.zeros(0, np.int64)
    rows: dict[int, np.ndarray] = {}
    bounds = list(offsets) + [np.iinfo(np.int64).max]
    for k, path in enumerate(key_files):
        local = needed[(needed >= bounds[k]) & (needed < bounds[k + 1])]
        if len(local):
            with np.load(path, allow_pickle=False) as z:
                signatures = z["dedup_signatures"][local - bounds[k]]  # (n, P)
            rows.update(zip(local.tolist(), signatures))
    if not len(pairs):
        return np.zeros(0, np.float64)
    earlier = np.stack([rows[o] for o in pairs[:, 0].tolist()])  # (pairs, P)
    later = np.stack([rows[o] for o in pairs[:, 1].tolist()])
    return np.mean(earlier == later, axis=1)


def lines_task(rank: int, world_size: int, inputs: dict, work_dir: str) -> dict:
    """Stage 5: in rank's hash range, a unit is cut from every kept document after the first holding it."""
    work = Path(work_dir) / SHUFFLE_DIR
    a = _load_part(work, "lines", rank)
    kept = ~np.isin(a["ordinal"], _removed_ordinals(work, ["exact", "near"]))
    ordinal, start, end, unit = a["ordinal"][kept], a["start"][kept], a["end"][kept], a["hash"][kept]
    order = np.lexsort((start, ordinal, unit))
    ordinal, start, end, unit = ordinal[order], start[order], end[order], unit[order]
    first_of_group = np.ones(len(unit), dtype=bool)
    first_of_group[1:] = unit[1:] != unit[:-1]
    first_holder = ordinal[np.maximum.accumulate(np.where(first_of_group, np.arange(len(unit)), 0))]
    cut = ordinal != first_holder  # a later kept document holding a unit seen before
    _save(work / "lines" / f"r{rank:04d}.npz", ordinal=ordinal[cut], start=start[cut], end=end[cut])
    return {"rank": rank, "units_removed": int(cut.sum())}


# ----------------------------------------------------------------------------- the driver


@dataclass
class DedupSummary:
    """What the report needs from the dedup reduce (the same fields as :class:`DedupIndex`)."""

    counts: dict[str, int]
    cluster_sizes: dict[int, int] = field(default_factory=dict)  # representative ordinal -> cluster size

    @property
    def clusters(self) -> int:
        return len(self.cluster_sizes)


def sharded_dedup(run_ranks: RunRanks, work_dir: str | Path, key_files: Sequence[str | Path], cfg: DedupConfig,
                  world_size: int) -> tuple[list[BatchDecisions], DedupSummary]:
    """Run the five stages with ``run_ranks`` and return per-shard decisions (in shard order) and the counts.

    key_files: each shard's ``.keys.npz`` from the map phase, in input order. ``world_size`` changes how the
    work is split, never the result.
    """
    work = Path(work_dir)
    shutil.rmtree(work / SHUFFLE_DIR, ignore_errors=True)  # a fresh shuffle: no stale partition files
    sizes = []
    for path in key_files:
        with np.load(path, allow_pickle=False) as z:
            sizes.append(len(z["dedup_exact"]))
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    dedup = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    inputs = {"key_files": [str(p) for p in key_files], "offsets": offsets[:-1].tolist(), "dedup": dedup}
    run_ranks(partition_task, world_size, inputs, str(work))
    if cfg.exact:
        run_ranks(exact_task, world_size, inputs, str(work))
    candidates = 0
    if cfg.near:
        run_ranks(buckets_task, world_size, inputs, str(work))
        candidates = run_ranks(cluster_task, 1, inputs, str(work))[0]["candidates"]
    if cfg.lines:
        run_ranks(lines_task, world_size, inputs, str(work))
    return _assemble(work / SHUFFLE_DIR, sizes, int(offsets[-1]), candidates)


def _assemble(work: Path, sizes: list[int], total: int, candidates: int) -> tuple[list[BatchDecisions], DedupSummary]:
    """The stage outputs as DedupIndex.add_batch would have returned them, shard by shard."""
    status = np.zeros(total, dtype=np.int8)
    representative = np.full(total, -1, dtype=np.int64)
    similarity = np.zeros(total, dtype=np.float32)
    exact = _load_all(work / "exact", "r*.npz", ["ordinal", "representative"], [np.int64, np.int64])
    status[exact["ordinal"]], representative[exact["ordinal"]], similarity[exact["ordinal"]] = EXACT, \
        exact["representative"], 1.0
    near = _load_all(work / "near", "r*.npz", ["ordinal", "representative", "similarity"],
                     [np.int64, np.int64, np.float32])
    status[near["ordinal"]], representative[near["ordinal"]], similarity[near["ordinal"]] = NEAR, \
        near["representative"], near["similarity"]
    lines = _load_all(work / "lines", "r*.npz", ["ordinal", "start", "end"], [np.int64, np.int64, np.int64])
    order = np.lexsort((lines["start"], lines["ordinal"]))  # spans in text order, as DedupIndex records them
    drops: dict[int, list[tuple[int, int]]] = {}
    for o, s, e in zip(lines["ordinal"][order].tolist(), lines["start"][order].tolist(), lines["end"][order].tolist()):
        drops.setdefault(o, []).append((s, e))
    summary = DedupSummary(counts={"exact": len(exact["ordinal"]), "near": len(near["ordinal"]),
                                   "lines_removed": len(lines["ordinal"]),
                                   "line_chars_removed": int((lines["end"] - lines["start"]).sum()),
                                   "candidates": candidates})
    for rep in representative[representative >= 0].tolist():
        summary.cluster_sizes[rep] = summary.cluster_sizes.get(rep, 1) + 1
    shard_drops: list[dict[int, list[tuple[int, int]]]] = [{} for _ in sizes]
    starts = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    for o, spans in drops.items():
        k = int(np.searchsorted(starts, o, side="right")) - 1
        shard_drops[k][o - int(starts[k])] = spans
    shards, offset = [], 0
    for k, n in enumerate(sizes):
        shards.append(BatchDecisions(status=status[offset:offset + n], representative=representative[offset:offset + n],
                                     similarity=similarity[offset:offset + n], drop_spans=shard_drops[k]))
        offset += n
    return shards, summary
