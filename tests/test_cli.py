"""The command line: every verb documents itself, user errors are one readable line (exit 2)."""

import subprocess
import sys

import pytest

from lmstack.cli import build_parser, main


def _verbs(parser=None):
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def _all_parsers():
    out = []
    for name, p in _verbs().items():
        out.append((name, p))
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                out += [(f"{name} {sub}", sp) for sub, sp in action.choices.items()]
    return out


CORE_VERBS = {"speedrun", "pretrain", "generate", "chat"}
# The public command surface: changing it is a decision, so it is pinned here.
ALL_VERBS = {"speedrun", "data", "tokenizer", "pretrain", "sft", "self-instruct", "generate", "chat", "serve", "import", "export",
             "models", "embed", "index", "eval", "report", "scaling", "reward", "reward-score", "dpo", "grpo", "ppo"}
SUBVERBS = {"data": {"download", "tokenize", "clean", "train-classifier"},
            "tokenizer": {"train", "encode", "info"}, "scaling": {"sweep", "fit"},
            "index": {"build", "search"}}


def test_verb_surface_is_pinned():
    verbs = _verbs()
    assert set(verbs) == ALL_VERBS
    for verb, subs in SUBVERBS.items():
        found = {name.split(" ", 1)[1] for name, _ in _all_parsers() if name.startswith(verb + " ")}
        assert found == subs


@pytest.mark.parametrize("name,parser", _all_parsers(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_verb_has_help_with_defaults(name, parser):
    text = parser.format_help()
    assert "usage:" in text and len(text) > 80
    has_defaults = any(a.default not in (None, False, [], "==SUPPRESS==") and a.help
                       for a in parser._actions if a.option_strings)
    if has_defaults:
        assert "(default:" in text, f"`lmstack {name} --help` must show defaults"


def test_help_from_the_console_script_is_fast_and_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "lmstack.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for verb in CORE_VERBS:
        assert verb in out.stdout


def test_user_errors_are_one_line(tmp_path, capsys):
    code = main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "meta.json" in err and "Traceback" not in err
    code = main(["generate", "--model", str(tmp_path), "--max-tokens", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("lmstack generate: error: argument --max-tokens")
