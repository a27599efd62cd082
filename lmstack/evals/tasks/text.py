"""Language-model scoring of your own texts: ``--tasks ppl:PATH`` (a .txt / .jsonl file or a directory).

Every document is scored whole with rolling windows (see EvalLM.loglikelihood_rolling); the task reports
token perplexity and bits per byte over the whole set (bits per byte compares models with different
tokenizers). Documents are read with lmstack.data.sources.iter_documents when it is available (txt, jsonl
with a "text" field, parquet, directories), else as plain UTF-8 text files, one document per file.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.evals.task import Example, PerplexityTask


class TextPerplexity(PerplexityTask):
    def __init__(self, path: str):
        self.path = Path(path)
        self.name = f"ppl:{self.path.name}"
        if not self.path.exists():
            raise FileNotFoundError(f"ppl:{path}: no such file or directory")

    def examples(self) -> list[Example]:
        try:
            from lmstack.data.readers import iter_documents

            docs = [(d.id, d.text) for d in iter_documents([str(self.path)])]
        except ImportError:
            files = sorted(self.path.rglob("*.txt")) if self.path.is_dir() else [self.path]
            docs = [(str(f), f.read_text(encoding="utf-8", errors="replace")) for f in files]
        return [Example(id=str(i), context=text) for i, text in docs if text.strip()]
