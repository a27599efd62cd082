"""Import / export against transformers as the reference, on tiny random models built here (CPU, fp32).

Each supported architecture (Llama, GPT-2, BERT) is built with transformers, saved as a Hugging Face
directory with a small tokenizer, imported with `lmstack import`, and compared: logits max-abs-diff
<= 1e-4, identical greedy generations, identical tokenization. GGUF files are written here with the
`gguf` package (Q/K rows permuted the way llama.cpp does, tensors quantized to several types) and
compared with transformers' own GGUF loader on the same file. Export round-trips through
transformers. Nothing is downloaded.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmstack.cli import main
from lmstack.engine.generate import generate
from lmstack.engine.sampling import SamplingParams
from lmstack.interop import ConversionError, import_model, models_report
from lmstack.interop.gguf_import import unpermute_rope_rows
from lmstack.interop.hf_export import export_hf
from lmstack.checkpoint import load_checkpoint

TOL = 1e-4
ROPE_THETA = 5000.0
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["the cat sat on the mat", "hello world, hello moon", "numbers 123 and 4567 too", "a quick brown fox"]
PROMPTS = ["the cat", "hello moon and the world", "a quick 12"]


def byte_bpe(vocab_size: int = 320) -> HFTokenizer:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT * 20, trainer)
    return tk


def save_chat_tokenizer(directory) -> HFTokenizer:
    tk = byte_bpe()
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tk


def tiny_llama(tmp_path, tie=False):
    torch.manual_seed(0)
    out = tmp_path / "hf_llama"
    out.mkdir()
    vocab_size = save_chat_tokenizer(out).get_vocab_size()
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                   rope_theta=ROPE_THETA, rms_norm_eps=1e-5, initializer_range=0.1,
                                   tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return model, out


def tiny_gpt2(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "hf_gpt2"
    out.mkdir()
    vocab_size = save_chat_tokenizer(out).get_vocab_size()
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out)
    return model, out


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # compare full-length continuations
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_decoder_parity(reference, checkpoint_dir, vocab_check: HFTokenizer | None = None):
    ckpt = load_checkpoint(checkpoint_dir)
    tok = ckpt.tokenizer
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        if vocab_check is not None:
            assert ids == vocab_check.encode(prompt).ids
        ref = hf_logits(reference, ids)
        assert ref.std() > 0.3, "reference logits too flat to discriminate a wrong mapping"
        assert (our_logits(ckpt.model, ids) - ref).abs().max().item() <= TOL
        ours = generate(ckpt.model, ids, SamplingParams(temperature=0.0, max_tokens=12))
        assert ours == hf_greedy(reference, ids, 12)
    return ckpt


# ----------------------------------------------------------------------------- Hugging Face import

def test_llama_hf_import_matches_transformers(tmp_path):
    reference, hf_dir = tiny_llama(tmp_path)
    out = import_model(hf_dir, tmp_path / "ck")
    ckpt = assert_decoder_parity(reference, out, HFTokenizer.from_file(str(hf_dir / "tokenizer.json")))
    cfg = ckpt.model.config
    assert (cfg.family, cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == ("gpt", 2, ROPE_THETA, False)
    tok = ckpt.tokenizer
    assert tok.chat_template == CHATML
    assert tok.stop_token_ids[0] == tok.token_to_id("<|im_end|>")
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]).startswith("hello<|im_end|>")
    assert json.loads((out / "config.json").read_text())["source"]["architecture"] == "llama"


def test_llama_tied_embeddings(tmp_path):
    reference, hf_dir = tiny_llama(tmp_path, tie=True)
    ckpt = assert_decoder_parity(reference, import_model(hf_dir, tmp_path / "ck"))
    assert ckpt.model.config.tie_embeddings
    assert ckpt.model.lm_head.weight.data_ptr() == ckpt.model.tok_emb.weight.data_ptr()


def test_gpt2_hf_import_matches_transformers(tmp_path):
    reference, hf_dir = tiny_gpt2(tmp_path)
    assert reference.config.activation_function == "gelu_new"  # tanh GELU -> lmstack "gelu"
    ckpt = assert_decoder_parity(reference, import_model(hf_dir, tmp_path / "ck"))
    cfg = ckpt.model.config
    assert (cfg.norm, cfg.activation, cfg.position, cfg.bias) == ("layernorm", "gelu", "learned", True)


def test_gpt2_from_vocab_and_merges(tmp_path):
    """Classic GPT-2 directories ship vocab.json + merges.txt instead of tokenizer.json."""
    reference, hf_dir = tiny_gpt2(tmp_path)
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    (hf_dir / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (hf_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    reference_tok = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer.json").unlink()
    assert_decoder_parity(reference, import_model(hf_dir, tmp_path / "ck"), reference_tok)


# ----------------------------------------------------------------------------- BERT

def tiny_bert(tmp_path, head: bool):
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for t in TEXT for w in t.replace(",", " ,").split()})
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list("abcdefghijklmnopqrstuvwxyz0123456789,")
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, initializer_range=0.1)
    model = (transformers.BertForMaskedLM if head else transformers.BertModel)(cfg).eval()
    out = tmp_path / ("hf_bert_mlm" if head else "hf_bert")
    model.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    return model, out


@pytest.mark.parametrize("head", [False, True], ids=["BertModel", "BertForMaskedLM"])
def test_bert_hf_import_matches_transformers(tmp_path, head):
    reference, hf_dir = tiny_bert(tmp_path, head)
    out = import_model(hf_dir, tmp_path / "ck")
    ckpt = load_checkpoint(out)
    source = json.loads((out / "config.json").read_text())["source"]
    assert source["initialised"] == ([] if head else ["mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight",
                                                      "mlm_norm.bias", "lm_head.bias"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    batch = hf_tok(["The cat sat", "hello world, hello moon and 123"], padding=True, return_tensors="pt")
    # the lmstack tokenizer gives the same pieces (the [CLS]/[SEP] frame is the embedder's job)
    assert ckpt.tokenizer.encode("The cat sat") == hf_tok("The cat sat", add_special_tokens=False).input_ids
    with torch.no_grad():
        hidden, _ = ckpt.model(batch.input_ids, attention_mask=batch.attention_mask,
                               token_type_ids=batch.token_type_ids, return_hidden=True)
        if head:
            ref_out = reference(**batch, output_hidden_states=True)
            ref_hidden = ref_out.hidden_states[-1]
            logits, _ = ckpt.model(batch.input_ids, attention_mask=batch.attention_mask)
            real = batch.attention_mask.bool()
            assert (logits - ref_out.logits)[real].abs().max().item() <= TOL
        else:
            ref_hidden = reference(**batch).last_hidden_state
    real = batch.attention_mask.bool()  # padded positions are undefined in both
    assert ref_hidden.std() > 0.3
    assert (hidden - ref_hidden)[real].abs().max().item() <= TOL


# ----------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q/K rows (pairs adjacent rotary dimensions)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k_bytes(rows: int, cols: int) -> np.ndarray:
    """Random but valid Q4_K blocks (gguf cannot quantize K-quants; it only dequantizes them)."""
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    raw[:, :, 0:4] = np.array([0.01, 0.005], dtype=np.float16).view(np.uint8)  # super-block scale, min
    return raw.reshape(rows, -1)


MIXED_TYPES = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q5_1, "attn_output": Q.Q8_0, "ffn_gate": Q.Q5_0,
               "ffn_up": Q.BF16, "ffn_down": Q.Q4_K, "token_embd": Q.Q8_0, "output": Q.F16}


def write_tiny_gguf(path, model, tokenizer: HFTokenizer, types: dict[str, Q], pre: str = "default",
                    arch: str = "llama", extra_tensor: tuple[str, Q] | None = None) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    spec = json.loads(tokenizer.to_str())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in hf_names.items()})
    for hf_name, tensor in model.state_dict().items():
        name = names[hf_name]
        w = tensor.float().numpy()
        kind = types.get(name.split(".")[-2], Q.F32) if w.ndim == 2 else Q.F32
        if ".attn_q." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".attn_k." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if kind == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(w))
        elif kind == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            data = q4_k_bytes(*w.shape) if kind == Q.Q4_K else gguf.quants.quantize(w, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    if extra_tensor is not None:
        name, kind = extra_tensor
        data = np.zeros(gguf.quants.quant_shape_to_byte_shape((4, 256), kind), dtype=np.uint8)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(byte_bpe().get_vocab()), hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                                   max_position_embeddings=128, rope_theta=ROPE_THETA, rms_norm_eps=1e-5,
                                   initializer_range=0.1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_rope_unpermute_inverts_llama_cpp():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_gguf_float_import_matches_original_model(tmp_path):
    """Unquantized GGUF: the import must reproduce the original HF model (checks the Q/K un-permutation)."""
    reference, tokenizer = gguf_llama(tmp_path), byte_bpe()
    write_tiny_gguf(tmp_path / "f32.gguf", reference, tokenizer, types={})
    ckpt = assert_decoder_parity(reference, import_model(tmp_path / "f32.gguf", tmp_path / "ck"), tokenizer)
    tok = ckpt.tokenizer
    assert tok.chat_template == CHATML
    assert tok.stop_token_ids[:2] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    ids, _ = tok.render_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_quantized_import_matches_transformers_gguf_loader(tmp_path):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, BF16, F16 tensors: same dequantized model as transformers builds."""
    original, tokenizer = gguf_llama(tmp_path), byte_bpe()
    write_tiny_gguf(tmp_path / "mixed.gguf", original, tokenizer, MIXED_TYPES)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="mixed.gguf", dtype=torch.float32).eval()
    out = import_model(tmp_path / "mixed.gguf", tmp_path / "ck", progress=False)
    assert_decoder_parity(reference, out, tokenizer)
    source = json.loads((out / "config.json").read_text())["source"]
    assert set(source["tensor_types"]) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K"}
    # quantization really happened: the import differs from the unquantized original
    ids = load_checkpoint(out).tokenizer.encode("the cat")
    assert (our_logits(load_checkpoint(out).model, ids) - hf_logits(original, ids)).abs().max() > 1e-2


def test_gguf_smollm_pre_tokenizer_splits_digits(tmp_path):
    reference, tokenizer = gguf_llama(tmp_path), byte_bpe()
    write_tiny_gguf(tmp_path / "s.gguf", reference, tokenizer, types={}, pre="smollm")
    tok = load_checkpoint(import_model(tmp_path / "s.gguf", tmp_path / "ck")).tokenizer
    pieces = [tok.decode([i]) for i in tok.encode("numbers 4567")]
    assert pieces[-4:] == ["4", "5", "6", "7"]


def test_gguf_unsupported_quantization_is_named(tmp_path):
    reference, tokenizer = gguf_llama(tmp_path), byte_bpe()
    write_tiny_gguf(tmp_path / "iq.gguf", reference, tokenizer, types={},
                    extra_tensor=("blk.0.ffn_extra.weight", Q.IQ4_NL))
    with pytest.raises(ConversionError, match=r"IQ4_NL.*supported types: F32, F16, BF16, Q8_0"):
        import_model(tmp_path / "iq.gguf", tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_gguf_unsupported_architecture_is_named(tmp_path):
    reference, tokenizer = gguf_llama(tmp_path), byte_bpe()
    write_tiny_gguf(tmp_path / "q.gguf", reference, tokenizer, types={}, arch="qwen2")
    with pytest.raises(ConversionError, match="'qwen2' is not supported; supported GGUF architectures: llama"):
        import_model(tmp_path / "q.gguf", tmp_path / "ck")


# ----------------------------------------------------------------------------- errors

def test_unsupported_hf_architecture_and_pickles_are_refused(tmp_path):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ConversionError, match="model_type 't5'.*supported model_type values: llama, gpt2, bert"):
        import_model(d, tmp_path / "ck")
    _, hf_dir = tiny_llama(tmp_path)
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="safetensors only"):
        import_model(hf_dir, tmp_path / "ck")


def test_llama_rope_scaling_is_refused(tmp_path):
    _, hf_dir = tiny_llama(tmp_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="rope scaling 'llama3' is not supported"):
        import_model(hf_dir, tmp_path / "ck")


def test_import_never_replaces_a_foreign_directory(tmp_path):
    _, hf_dir = tiny_llama(tmp_path)
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an lmstack checkpoint"):
        import_model(hf_dir, precious)
    with pytest.raises(ConversionError, match="not an lmstack checkpoint"):
        import_model(hf_dir, hf_dir)  # its config.json is a Hugging Face one
    assert (precious / "notes.txt").read_text() == "mine"
    out = import_model(hf_dir, tmp_path / "ck")
    assert import_model(hf_dir, out) == out  # re-importing over our own checkpoint is fine


# ----------------------------------------------------------------------------- export

def test_export_round_trip_through_transformers(tmp_path):
    reference, hf_dir = tiny_llama(tmp_path)
    ckpt_dir = import_model(hf_dir, tmp_path / "ck")
    exported = export_hf(ckpt_dir, tmp_path / "exported")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in exported.iterdir()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    ckpt = load_checkpoint(ckpt_dir)
    for prompt in PROMPTS:
        ids = hf_tok(prompt).input_ids
        assert ids == ckpt.tokenizer.encode(prompt)
        assert (hf_logits(loaded, ids) - hf_logits(reference, ids)).abs().max().item() <= TOL
        assert hf_greedy(loaded, ids, 12) == generate(ckpt.model, ids, SamplingParams(temperature=0.0, max_tokens=12))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == ckpt.tokenizer.decode(
        ckpt.tokenizer.render_chat(messages)[0])


def test_export_of_lmstack_trained_model_carries_its_chat_format(tmp_path):
    from lmstack.models import build_model
    from lmstack.models.gpt import GPTConfig
    from lmstack.tokenizer import Tokenizer
    from lmstack.checkpoint import save_checkpoint

    tok = Tokenizer.train(TEXT * 50, vocab_size=320)
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "ours", model, {"model": cfg.__dict__}, tokenizer=tok)
    exported = export_hf(tmp_path / "ours", tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = tok.encode("the cat sat")
    assert (hf_logits(loaded, ids) - our_logits(model, ids)).abs().max().item() <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    assert hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False) == tok.render_chat(messages)[0]


def test_export_refuses_options_llama_cannot_express(tmp_path):
    _, hf_dir = tiny_gpt2(tmp_path)
    ckpt_dir = import_model(hf_dir, tmp_path / "ck")
    with pytest.raises(ConversionError, match=r"model.norm='layernorm'.*model.activation='gelu'.*model.position"):
        export_hf(ckpt_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI

def test_cli_import_export_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    _, hf_dir = tiny_llama(tmp_path)
    assert main(["import", str(hf_dir), "--no-progress"]) == 0  # default --out: CACHE/models/NAME
    ckpt_dir = tmp_path / "cache" / "models" / "hf_llama"
    assert (ckpt_dir / "model.safetensors").is_file()
    assert main(["export", str(ckpt_dir), "--format", "hf", "--out", str(tmp_path / "hf_out")]) == 0
    assert (tmp_path / "hf_out" / "config.json").is_file()
    capsys.readouterr()
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for expected in ("llama", "gpt2", "bert", "Q4_1", "smollm2-135m-instruct", "all-minilm-l6-v2", str(ckpt_dir)):
        assert expected in text
    report = models_report()
    assert [c["path"] for c in report["checkpoints"]] == [str(ckpt_dir)]
    assert main(["import", str(tmp_path / "nope")]) == 2
    assert "known model name" in capsys.readouterr().err
    assert main(["export", str(ckpt_dir), "--out", str(tmp_path)]) == 2  # a non-empty foreign directory
    err = capsys.readouterr().err
    assert "not a model directory" in err and "Traceback" not in err
