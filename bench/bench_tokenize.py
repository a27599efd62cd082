"""Corpus size and tokenization throughput: `lmstack data tokenize` with 0, 1, 2, ... worker processes.

    python bench/bench_tokenize.py                      # classics corpus, workers 0 1 2, BPE vocab 8192
    python bench/bench_tokenize.py --workers 1 2 4 --repeats 3 --copies 4   # 4 x the corpus per run

Builds (or reuses) the 'classics' corpus in the cache, trains a byte-level BPE tokenizer on a 10%
document sample (training speed is not what this measures), then tokenizes the whole corpus into
shards once per setting and prints a Markdown table: text MB/s (UTF-8 bytes of input text per wall
second, pool start-up included), tokens/s, the speed-up over the in-process run (workers=0; the
tokenizer may still use threads there), the reference measured in the same run, and the CPU seconds
all processes spent (on a shared machine the honest measure of overhead). Every setting must write identical shards; the script checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="classics", help="corpus name or path")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (0 = in-process)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (best is reported)")
    parser.add_argument("--copies", type=int, default=1,
                        help="tokenize the corpus this many times in one run (amortises worker start-up)")
    args = parser.parse_args()

    from lmstack.data.shards import tokenize_to_shards
    from lmstack.data.corpora import resolve_inputs
    from lmstack.data.readers import iter_documents
    from lmstack.tokenizer import Tokenizer

    (corpus,) = resolve_inputs([args.corpus])
    manifest_path = corpus / "manifest.json" if corpus.is_dir() else None
    if manifest_path and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        print(f"corpus {args.corpus}: {manifest['documents']:,} documents, {manifest['text_bytes'] / 1e6:.2f} MB "
              f"of text, {manifest['bytes'] / 1e6:.2f} MB of JSONL in {len(manifest['files'])} files")
        for f in manifest["files"]:
            print(f"  {f['file']}: {f['documents']:,} documents, {f['text_bytes'] / 1e6:.2f} MB ({f['source']})")

    sample = [d.text for d in itertools.islice(iter_documents([corpus]), 0, None, 10)]
    started = time.time()
    tokenizer = Tokenizer.train(sample, vocab_size=args.vocab_size)
    print(f"tokenizer: BPE {tokenizer.vocab_size} trained on {len(sample):,} documents in {time.time() - started:.1f} s")

    rows, digests = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            best = None
            for _ in range(args.repeats):
                out = Path(tmp) / f"w{workers}"
                cpu_before = _cpu_seconds()
                started = time.time()
                meta = tokenize_to_shards([corpus] * args.copies, tokenizer, out, workers=workers, progress=False)
                seconds = time.time() - started
                if best is None or seconds < best[0]:
                    best = (seconds, _cpu_seconds() - cpu_before)
            tokens = sum(s["tokens"] for s in meta["splits"].values())
            text_bytes = sum(s["bytes"] for s in meta["splits"].values())
            digests[workers] = hashlib.sha256(b"".join((out / n).read_bytes() for s in meta["splits"].values()
                                                       for n in s["shards"])).hexdigest()
            rows.append((workers, best[0], text_bytes / 1e6 / best[0], tokens / best[0], tokens, best[1]))
    if len(set(digests.values())) != 1:
        sys.exit(f"shards differ between worker counts: {digests}")

    reference = next((r[1] for r in rows if r[0] == 0), rows[0][1])
    print(f"\n{os.cpu_count()} CPU cores; {args.copies} x the corpus, {rows[0][4]:,} tokens; identical shards "
          "for every setting\n")
    print("| workers | seconds | text MB/s | tokens/s | speed-up vs in-process | CPU seconds (all processes) |")
    print("|---|---|---|---|---|---|")
    for workers, seconds, mb_s, tok_s, _, cpu in rows:
        print(f"| {workers or 'in-process'} | {seconds:.2f} | {mb_s:.2f} | {tok_s:,.0f} | {reference / seconds:.2f}x "
              f"| {cpu:.2f} |")


def _cpu_seconds() -> float:
    """User + system CPU time of this process, its threads and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
