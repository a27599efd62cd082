"""Language-model scoring of your own texts: ``--tasks ppl:PATH`` (a .txt / .jsonl / .parquet file or a directory).

Every document is scored whole with rolling windows (see EvalLM.loglikelihood_rolling); the task reports
token perplexity and bits per byte over the whole set (bits per byte compares models with different
tokenizers). Documents are read with :func:`lmstack.data.readers.iter_documents` (txt, jsonl with a "text"
field, parquet, directories; empty documents are skipped).

The documents are read once, when the task is built, so that a path holding no text is refused before a
model is loaded: an empty set would otherwise score a perfect perplexity of 1.0.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.data.readers import ReadStats, iter_documents
from lmstack.errors import DataError
from lmstack.evals.task import Example, PerplexityTask


class TextPerplexity(PerplexityTask):
    def __init__(self, path: str):
        if not path.strip():
            raise DataError("ppl: needs a path, e.g. --tasks ppl:notes/ (a .txt / .jsonl / .parquet file or a "
                            "directory)")
        self.path = Path(path)
        self.name = f"ppl:{self.path.name}"
        stats = ReadStats()
        self._examples = [Example(id=doc.id, context=doc.text) for doc in iter_documents([str(self.path)], stats=stats)
                          if doc.text.strip()]
        if not self._examples:
            raise DataError(f"ppl:{path} holds no text to score ({stats.summary()}); give a file or directory with "
                            "non-empty documents")

    def examples(self) -> list[Example]:
        return self._examples
