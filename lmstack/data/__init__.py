"""lmstack.data: from raw text to token shards.

readers.py / corpora.py     documents from files and directories / the downloadable corpora (pinned packages)
pipeline.py (+ _config, _report)  `lmstack data clean`: map (filters, PII), reduce (dedup), finalize phases
clean.py, dedup.py, pii.py, quality.py, decontam.py    the cleaning stages
outputs.py                  output directories that never overwrite what lmstack did not write
tokenizer_training.py       `lmstack tokenizer train` over files; shards.py / loader.py: token shards
benchmarks.py               offline readers for the evaluation benchmarks (below both data and evals)
"""
