"""Tokenizer benchmark: training time, encoding speed and compression, side by side in one run.

    python bench/bench_tokenizer.py                      # the classics corpus, vocabulary 8192
    python bench/bench_tokenizer.py --input my.jsonl --vocab-size 16384 --repeats 5 --unigram

What it measures, on the same machine in the same process (best of --repeats, the runs interleaved so
background load hits every contender alike):

- training: Hugging Face ``tokenizers`` BPE (same split regex and byte alphabet as ours), ``rustbpe`` alone
  (the same number of learned tokens as ours: vocab_size minus our 32 special tokens), and
  ``Tokenizer.train`` + ``save`` (rustbpe plus converting the ranks, building the tiktoken encoder and
  writing tokenizer.json), plus the CLI path (``train_from_files``: reading JSONL from disk too);
- encoding (MB of UTF-8 per second over every document): our vocabulary in ``tokenizers``, tiktoken's
  GPT-2, the raw ``tiktoken.Encoding`` lmstack wraps, and lmstack ``encode`` (one thread) /
  ``encode_batch`` (all cores) — and the ``tokenizers`` batch call for reference;
- bytes per token on held-out documents (every 20th document, never trained on): lmstack BPE (and
  unigram with --unigram) trained here vs GPT-2's 50,257-token vocabulary.

Records go in BENCHMARKS.md (section "Tokenizer"). Needs the GPT-2 file: pip install --no-deps
openai-whisper==20250625.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

from lmstack.data.corpora import resolve_inputs
from lmstack.data.readers import iter_documents
from lmstack.data.tokenizer_training import train_from_files
from lmstack.tokenizer import NUM_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, special_token_list
from lmstack.tokenizer.backends import TiktokenBackend


def best_of_interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict]:
    """Best wall time of each run over ``repeats`` rounds (every round runs all of them, in turn, so a
    burst of background load hits all contenders alike) and each run's last result."""
    seconds = {name: float("inf") for name in runs}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds, results


def train_lmstack(texts: list[str], vocab_size: int, out_dir: Path) -> Tokenizer:
    tok = Tokenizer.train(texts, vocab_size)
    tok.save(out_dir)
    return tok


def train_hf_bpe(texts: list[str], vocab_size: int) -> object:
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=special_token_list(NUM_SPECIAL_TOKENS))
    hf.train_from_iterator(texts, trainer)
    return hf


def train_rustbpe(texts: list[str], learned: int) -> object:
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), learned, pattern=SPLIT_PATTERN)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=["classics"], help="files, directories or corpus names")
    parser.add_argument("--text-field", default="text", help="JSONL key holding the text")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the best one counts)")
    parser.add_argument("--unigram", action="store_true", help="also train a unigram vocabulary (slow)")
    args = parser.parse_args()

    paths = resolve_inputs(args.input, progress=False)
    documents = [d.text for d in iter_documents(paths, text_field=args.text_field)]
    if len(documents) < 40:
        parser.error(f"{len(documents)} documents: the benchmark holds out every 20th, so give it at least 40 "
                     "(a .txt file is one document; use JSONL or a directory)")
    held_out = documents[::20]
    train_docs = [d for i, d in enumerate(documents) if i % 20]
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    train_megabytes = sum(len(d.encode()) for d in train_docs) / 1e6
    print(f"{len(documents):,} documents, {megabytes:.1f} MB; training on {train_megabytes:.1f} MB, "
          f"held out {len(held_out):,} documents; {os.cpu_count()} cores, {platform.processor() or platform.machine()}")

    vocab, learned = args.vocab_size, args.vocab_size - NUM_SPECIAL_TOKENS
    scratch = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    corpus_file = scratch / "train.jsonl"
    with open(corpus_file, "w") as f:
        for doc in train_docs:
            f.write(json.dumps({"text": doc}) + "\n")

    train_seconds, trained = best_of_interleaved({
        "hf": lambda: train_hf_bpe(train_docs, vocab),
        "rustbpe": lambda: train_rustbpe(train_docs, learned),
        "lmstack": lambda: train_lmstack(train_docs, vocab, scratch / "lmstack"),
        "lmstack_cli": lambda: train_from_files([corpus_file], scratch / "cli", vocab, progress=False),
    }, args.repeats)

    ours = Tokenizer.load(scratch / "lmstack")
    assert ours.backend == "tiktoken"
    hf_same_vocab = ours.hf_tokenizer()  # our vocabulary run by Hugging Face tokenizers
    hf_same_vocab.encode_special_tokens = True
    gpt2 = Tokenizer.load("gpt2")

    def convert_and_save() -> None:  # what Tokenizer.train + save do beyond rustbpe, from the learned ranks on
        backend = TiktokenBackend(dict(ours._backend.ranks), ours.special_tokens, SPLIT_PATTERN)
        Tokenizer(backend, ours.meta).save(scratch / "resave")

    train_seconds["overhead"] = best_of_interleaved({"overhead": convert_and_save}, args.repeats)[0]["overhead"]

    raw = ours._backend.encoding  # the tiktoken Encoding lmstack wraps: the wrapper's overhead shows against it
    encoders: dict[str, Callable[[], object]] = {
        "tokenizers (our vocab), one thread": lambda: [hf_same_vocab.encode(d, add_special_tokens=False)
                                                       for d in documents],
        "tiktoken GPT-2, one thread": lambda: [gpt2._backend.encoding.encode_ordinary(d) for d in documents],
        "tiktoken, our vocab (raw Encoding), one thread": lambda: [raw.encode_ordinary(d) for d in documents],
        "lmstack encode, one thread": lambda: [ours.encode(d) for d in documents],
        "tokenizers encode_batch (our vocab)": lambda: hf_same_vocab.encode_batch_fast(documents,
                                                                                        add_special_tokens=False),
        "lmstack encode_batch": lambda: ours.encode_batch(documents),
    }
    encode_seconds, _ = best_of_interleaved(encoders, args.repeats)
    encode_mb_s = {name: megabytes / seconds for name, seconds in encode_seconds.items()}

    held_bytes = sum(len(d.encode()) for d in held_out)
    compression = {f"lmstack BPE {vocab}": held_bytes / sum(len(ids) for ids in ours.encode_batch(held_out)),
                   "GPT-2 (50,257)": held_bytes / sum(len(ids) for ids in gpt2.encode_batch(held_out))}
    hf_trained = trained["hf"]
    compression[f"tokenizers BPE {vocab}"] = held_bytes / sum(
        len(e.ids) for e in hf_trained.encode_batch_fast(held_out, add_special_tokens=False))  # type: ignore[attr-defined]
    if args.unigram:
        start = time.perf_counter()
        unigram = Tokenizer.train(train_docs, vocab, kind="unigram")
        train_seconds["unigram"] = time.perf_counter() - start
        compression[f"lmstack unigram {vocab}"] = held_bytes / sum(len(i) for i in unigram.encode_batch(held_out))

    print(f"\n| training, vocabulary {vocab:,}, {train_megabytes:.1f} MB | seconds (best of {args.repeats}) |")
    print("|---|---:|")
    labels = {"hf": "Hugging Face tokenizers BPE", "rustbpe": f"rustbpe alone ({learned:,} learned tokens)",
              "lmstack": "lmstack Tokenizer.train + save (rustbpe + conversion)",
              "lmstack_cli": "lmstack train_from_files (+ reading JSONL, CLI path)",
              "overhead": "of which lmstack's own work (tiktoken encoder, derive merges, write files)", "unigram": "lmstack unigram (once)"}
    for name, seconds in train_seconds.items():
        print(f"| {labels[name]} | {seconds:.2f} |")
    print(f"\n| encoding {megabytes:.1f} MB ({len(documents):,} documents) | MB/s (best of {args.repeats}) |")
    print("|---|---:|")
    for name, rate in encode_mb_s.items():
        print(f"| {name} | {rate:.2f} |")
    print(f"\n| held-out text ({held_bytes / 1e6:.2f} MB, {len(held_out):,} documents) | bytes per token |")
    print("|---|---:|")
    for name, value in compression.items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
