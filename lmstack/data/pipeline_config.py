"""The configuration of ``lmstack data clean``: one typed section per stage, one file, one override syntax.

    lmstack data clean --print-config > clean.yaml        # every knob with its default, commented
    cfg = load_clean_config("clean.yaml", ["dedup.threshold=0.7"])

A config file (YAML, TOML or JSON) holds the sections named in :data:`SECTIONS`; ``section.key=value``
strings (``--set`` on the command line) are applied after it. Values are converted to the field's type and
unknown sections or keys are refused by the same setter the training config uses
(:func:`lmstack.config.set_section_value`), so both take the same syntax and give the same errors. Each
stage's own section (NormalizeConfig, DedupConfig, ...) lives next to that stage; this module only
assembles them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmstack.config import load_config_file, set_section_value
from lmstack.data.clean import HeuristicConfig, LanguageConfig, NormalizeConfig
from lmstack.data.decontam import DecontamConfig
from lmstack.data.dedup import DedupConfig
from lmstack.data.pii import PIIConfig
from lmstack.data.quality import QualityConfig
from lmstack.errors import ConfigError

__all__ = ["CleanConfig", "OutputConfig", "ReadConfig", "SECTIONS", "apply_config_overrides", "config_yaml",
           "load_clean_config"]


@dataclass
class ReadConfig:
    """How inputs are read (lmstack.data.readers.iter_documents)."""

    text_field: str = "text"  # JSONL key / Parquet column with the text
    id_field: str = "id"  # a record's own id, when present
    delimiter: str | None = None  # .txt files: split into documents at lines equal to this (e.g. '%')
    on_bad_record: str = "error"  # error | skip: a record without the text field

    def validate(self) -> None:
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"read.on_bad_record={self.on_bad_record!r}: choose error or skip")
        if not self.text_field:
            raise ConfigError("read.text_field is empty; name the JSONL key / Parquet column holding the text")


@dataclass
class OutputConfig:
    """Shards and the report."""

    format: str = "jsonl"  # jsonl | parquet
    shard_docs: int = 2000  # input documents per shard (the unit of parallelism and of resuming)
    shard_bytes: int = 4_000_000  # ... or this many bytes of input text, whichever comes first
    examples_per_reason: int = 3  # removed documents shown per reason in the report
    plot: bool = True  # write funnel.png

    def validate(self) -> None:
        if self.format not in ("jsonl", "parquet"):
            raise ConfigError(f"output.format={self.format!r}: choose jsonl or parquet")
        if self.shard_docs < 1 or self.shard_bytes < 1:
            raise ConfigError("output.shard_docs and output.shard_bytes must be >= 1")
        if self.examples_per_reason < 0:
            raise ConfigError("output.examples_per_reason must be >= 0")


@dataclass
class CleanConfig:
    """The whole pipeline; one YAML/TOML/JSON file with these sections configures it."""

    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    heuristics: HeuristicConfig = field(default_factory=HeuristicConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "CleanConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CleanConfig":
        return apply_config_overrides(cls(), d)


SECTIONS = [f.name for f in dataclasses.fields(CleanConfig)]


def apply_config_overrides(cfg: CleanConfig, overrides: dict[str, Any] | Sequence[str]) -> CleanConfig:
    """Set ``section.key`` values (a nested/flat dict, or ``section.key=value`` strings) on ``cfg``.

    Unknown sections or keys raise ConfigError listing the valid ones; values are converted to the
    field's type with the same rules as model/optim/train overrides (lmstack.config).
    """
    for key, value in _override_items(overrides):
        set_section_value(cfg, key, value, SECTIONS)
    return cfg


def _override_items(overrides: dict[str, Any] | Sequence[str]) -> list[tuple[str, Any]]:
    """(``section.key``, value) pairs from ``{section: {key: value}}``, ``{"section.key": value}`` or
    ``["section.key=value", ...]``; the cleaning config is exactly two levels deep."""
    if isinstance(overrides, dict):
        items: list[tuple[str, Any]] = []
        for key, value in overrides.items():
            if isinstance(value, dict):
                items.extend((f"{key}.{name}", v) for name, v in value.items())
            else:
                items.append((key, value))
        return items
    items = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. dedup.threshold=0.7)")
        items.append((key.strip(), value.strip()))
    return items


def load_clean_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CleanConfig:
    """Defaults, then the config file, then ``section.key=value`` overrides; validated."""
    cfg = CleanConfig()
    if path:
        apply_config_overrides(cfg, load_config_file(path))
    if overrides:
        apply_config_overrides(cfg, list(overrides))
    return cfg.validate()


def config_yaml(cfg: CleanConfig | None = None) -> str:
    """The config as YAML with one comment line per section (what ``--print-config`` prints)."""
    import yaml

    cfg = cfg or CleanConfig()
    parts = ["# lmstack data clean configuration (every key with its value; null switches a rule off)"]
    for name in SECTIONS:
        section = getattr(cfg, name)
        doc = (type(section).__doc__ or "").strip().splitlines()[0]
        parts.append(f"\n# {doc}")
        parts.append(yaml.safe_dump({name: dataclasses.asdict(section)}, sort_keys=False, width=110,
                                    default_flow_style=None).rstrip())
    return "\n".join(parts) + "\n"
