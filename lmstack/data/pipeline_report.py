"""The report of ``lmstack data clean``: report.json, summary.md, funnel.png and duplicates.tsv.

:func:`build_report` turns the merged per-stage statistics of a run into the ``report.json`` dict (documents
and bytes in/out per stage, removals per reason with examples, PII counts per kind, duplicates,
contamination, read problems, timing and the config); :func:`render_summary` writes the same as Markdown
and :func:`plot_funnel` as a PNG of documents and bytes left after each stage. All writers go through
lmstack.atomic, so a reader never sees half a report.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from lmstack.atomic import write_atomic
from lmstack.data.clean import StageStats
from lmstack.data.dedup import DedupIndex
from lmstack.data.dedup_stages import DedupSummary
from lmstack.data.pipeline_config import CleanConfig
from lmstack.data.readers import ReadStats

__all__ = ["build_report", "plot_funnel", "render_summary", "write_duplicates"]


def write_duplicates(path: Path, rows: list[tuple]) -> None:
    """duplicates.tsv: one removed duplicate per line (id, cluster id, exact|near, similarity, source)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("id\tcluster_id\tkind\tsimilarity\tsource\n")
            for row in rows:
                f.write("\t".join(str(x).replace("\t", " ").replace("\n", " ") for x in row) + "\n")

    write_atomic(path, write)


def build_report(inputs: Sequence[Path], out: Path, outputs: list[Path], cfg: CleanConfig, workers: int,
                 read_stats: ReadStats, stages: list[StageStats], index: DedupIndex | DedupSummary, decontam_info: dict,
                 timing: dict[str, float], ppl_cut: tuple[float, float] | None) -> dict:
    """The report.json dict: documents and bytes per stage, removals, PII, duplicates, timing, config."""
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
        "inputs": [str(p) for p in inputs],
        "out_dir": str(out),
        "outputs": [str(p) for p in outputs],
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
